use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gatehouse_operator::controller::{Controller, Options};
use gatehouse_operator::leader::{self, Elector};
use gatehouse_operator::{admin, validate};
use k8s_openapi::api::coordination::v1::Lease;
use kube_client::Api;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "gatehouse-operator",
    version,
    about = "Reconciles gatehouse resources into gateway configuration"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Check manifests offline and print each resource's verdict; exit 1 when any is invalid.
    Validate {
        #[arg(long = "manifests", required = true)]
        manifests: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespaces to watch (repeatable); all namespaces when absent.
    #[arg(
        long = "namespace",
        env = "GATEHOUSE_NAMESPACES",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Where to publish the gateway configuration, NAMESPACE/NAME (default: the operator's
    /// namespace from POD_NAMESPACE, name gatehouse-gateway-config).
    #[arg(long, env = "GATEHOUSE_CONFIG_MAP")]
    config_map: Option<String>,
    /// Lease used for leader election (in the config map's namespace).
    #[arg(
        long,
        env = "GATEHOUSE_LEASE_NAME",
        default_value = "gatehouse-operator"
    )]
    lease_name: String,
    /// Identity in the Lease (default: POD_NAME or the host name plus a random suffix).
    #[arg(long, env = "GATEHOUSE_IDENTITY")]
    identity: Option<String>,
    #[arg(long, env = "GATEHOUSE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    #[arg(long, env = "GATEHOUSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Validate { manifests }) = &cli.command {
        let ok = validate::run(manifests, &mut std::io::stdout())?;
        std::process::exit(if ok { 0 } else { 1 });
    }
    let args = cli.run;
    let filter =
        EnvFilter::try_from_env("GATEHOUSE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;

    let client = kube_client::Client::try_default()
        .await
        .context("connecting to Kubernetes")?;
    let (cm_ns, cm_name) = match &args.config_map {
        Some(s) => s
            .split_once('/')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .context("--config-map must be NAMESPACE/NAME")?,
        None => (
            std::env::var("POD_NAMESPACE")
                .unwrap_or_else(|_| client.default_namespace().to_string()),
            "gatehouse-gateway-config".to_string(),
        ),
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", uuid_suffix())
    });

    let controller = Arc::new(Controller::new(
        client.clone(),
        Options {
            namespaces: args.namespaces.clone(),
            config_map_namespace: cm_ns.clone(),
            config_map_name: cm_name,
        },
    ));
    let is_leader = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));

    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen).await?;
    let health = admin::Health {
        ready: ready.clone(),
        metrics,
    };
    tokio::spawn(async move {
        let _ = axum::serve(admin_listener, admin::router(health)).await;
    });

    // Leader election: only the holder of the Lease reconciles; losing it ends the process so
    // the Deployment restarts it as a standby (no split brain).
    let elector = Arc::new(Elector::new(
        Api::<Lease>::namespaced(client.clone(), &cm_ns),
        &args.lease_name,
        &identity,
    ));
    // SIGTERM (a rollout, a drain): stop reconciling and give the Lease up, so the standby takes
    // over at its next round (2 s) instead of after LEASE_DURATION. As PID 1 in its container
    // the process would otherwise ignore SIGTERM and wait for SIGKILL.
    // One lease round or the release at a time, and no round after the release: a round that
    // renewed after it would keep the Lease held by a process about to exit.
    let rounds = Arc::new(tokio::sync::Mutex::new(()));
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let elector = elector.clone();
        let is_leader = is_leader.clone();
        let (rounds, stopping) = (rounds.clone(), stopping.clone());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stopping.store(true, Ordering::SeqCst);
            let _no_more_rounds = rounds.lock().await;
            if is_leader.swap(false, Ordering::SeqCst) {
                match tokio::time::timeout(Duration::from_secs(3), elector.release()).await {
                    Ok(Ok(())) => tracing::info!("released the leader lease"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not release the lease"),
                    Err(_) => tracing::warn!("releasing the lease timed out"),
                }
            }
            tracing::info!("stopping");
            std::process::exit(0);
        });
    }
    {
        let is_leader = is_leader.clone();
        let ready = ready.clone();
        let synced = controller.synced.clone();
        let controller = controller.clone();
        tokio::spawn(async move {
            let mut last_renew = std::time::Instant::now();
            loop {
                let round_lock = rounds.lock().await;
                if stopping.load(Ordering::SeqCst) {
                    return; // the release has been or is being done; the process exits
                }
                let was = is_leader.load(Ordering::SeqCst);
                let Some(budget) = leader::round_budget(was, last_renew.elapsed()) else {
                    tracing::error!("could not renew the lease in time; exiting");
                    std::process::exit(1);
                };
                // The server stamps the renewal during the round: count from its start.
                let started = std::time::Instant::now();
                let round = match tokio::time::timeout(budget, elector.try_lead()).await {
                    Ok(r) => r.map_err(anyhow::Error::from),
                    Err(_) => Err(anyhow::anyhow!("the lease round took over {budget:?}")),
                };
                let round_ok = round.is_ok();
                match round {
                    Ok(true) => {
                        if !was {
                            tracing::info!(identity = %elector.identity(), "became the leader");
                        }
                        last_renew = started;
                        is_leader.store(true, Ordering::SeqCst);
                        if !was {
                            controller.kick();
                        }
                    }
                    Ok(false) if was => {
                        tracing::error!("lost the leader lease; exiting");
                        std::process::exit(1);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "lease round failed");
                        if was && leader::round_budget(true, last_renew.elapsed()).is_none() {
                            tracing::error!("could not renew the lease in time; exiting");
                            std::process::exit(1);
                        }
                    }
                }
                // A standby is ready (it can take over); the leader once it has reconciled.
                let leading = is_leader.load(Ordering::SeqCst);
                ready.store(!leading || synced.load(Ordering::SeqCst), Ordering::SeqCst);
                drop(round_lock);
                tokio::time::sleep(leader::pause(leading, round_ok)).await;
            }
        });
    }
    tracing::info!(identity = %identity, "gatehouse operator started");
    controller.run(is_leader).await;
    Ok(())
}

fn uuid_suffix() -> String {
    use rand::RngCore;
    let mut b = [0u8; 3];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}
