use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gatehouse_gateway::cli::{Args, LogFormat};
use gatehouse_gateway::proxy::{PROXY_DURATION, PROXY_DURATION_BUCKETS};
use gatehouse_gateway::ratelimit::Limiter;
use gatehouse_gateway::ratelimit::local::{AddressThrottle, LocalLimiter, now_us};
use gatehouse_gateway::ratelimit::redis::RedisLimiter;
use gatehouse_gateway::state::AppState;
use gatehouse_gateway::store::Store;
use gatehouse_gateway::store::embedded::EmbeddedStore;
use gatehouse_gateway::store::redis::{RedisOptions, RedisStore};
use gatehouse_gateway::{admin, kube_source, server, source};
use tracing_subscriber::EnvFilter;

// Per-thread caches keep the proxy's short-lived allocations off a shared heap lock; jemalloc's
// background thread hands freed memory back to the OS while the gateway is idle (see
// .cargo/config.toml for the settings).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// The public listener runs on its own per-core threads (server::serve_workers); this runtime
// only drives the admin listener, configuration watchers, Redis and housekeeping.
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        EnvFilter::try_from_env("GATEHOUSE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    // Every connection holds a file descriptor, and container runtimes start processes with a
    // soft limit of 1,024: raise it to the hard limit, as nginx (worker_rlimit_nofile) and Go
    // programs do, so a few hundred slow clients cannot make accept fail.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    // Request durations as a histogram with fixed buckets, not a summary: buckets add up across
    // replicas, and counting a sample into one costs a fraction of inserting it into a quantile
    // sketch (measured: about 800 instructions per request less).
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PROXY_DURATION.into()),
            &PROXY_DURATION_BUCKETS,
        )
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    // Samples pile up in the recorder until upkeep counts them into the histogram buckets;
    // without it memory grows with every request between scrapes (or forever, if nobody scrapes).
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });

    // One TLS implementation for every client (upstreams, rediss://).
    let _ = rustls::crypto::ring::default_provider().install_default();

    let local_limiter = Arc::new(LocalLimiter::default());
    let (store, limiter): (Arc<dyn Store>, Arc<dyn Limiter>) = match &args.redis {
        Some(url) => {
            let store = RedisStore::connect(&RedisOptions::new(url)).context("--redis")?;
            spawn_redis_watch(store.clone(), gatehouse_crds::without_user_info(url));
            let limiter = Arc::new(RedisLimiter::new(store.connection()));
            // Refusals of callers that never came back (the others end when next looked up).
            let purged = limiter.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    purged.purge_refusals(std::time::Instant::now());
                }
            });
            (store, limiter)
        }
        None => {
            let store =
                EmbeddedStore::open(&args.data_dir).context("opening the embedded store")?;
            (Arc::new(store), local_limiter.clone())
        }
    };
    let mut state = AppState::new(store, limiter, &args.issuer());
    state.password_min_len = args.password_min_length as usize;
    state.max_signups_per_ip = args.max_signups_per_ip;
    state.max_password_checks_per_ip = args.max_password_checks_per_ip;
    state.refresh_retry_secs = args.refresh_retry_seconds;
    state.websocket_slots = Arc::new(tokio::sync::Semaphore::new(args.max_websockets as usize));
    state.websocket_callers = Arc::new(gatehouse_gateway::tunnel::PerCaller::new(
        args.max_websockets_per_caller as usize,
    ));
    state.sign_in_starts = AddressThrottle::per_minute(args.max_sign_in_starts_per_minute);
    state.token_grants = AddressThrottle::per_minute(args.max_token_grants_per_minute);
    state.trusted_proxies = args.trusted_proxies.clone();
    if args.kube && args.trusted_proxies.is_empty() {
        // In a cluster the gateway usually sits behind an ingress; said once, at start.
        tracing::warn!(
            "no --trusted-proxies: behind an ingress or load balancer every client counts as its address for the login, signup and sign-in throttles"
        );
    }
    let state = Arc::new(state);

    let _watch = if args.kube {
        let cm = args.config_map.as_deref().unwrap_or_default();
        let (ns, name) =
            kube_source::parse_ref(cm).context("--config-map must be NAMESPACE/NAME")?;
        let client = kube_client::Client::try_default()
            .await
            .context("connecting to Kubernetes")?;
        // Not ready until the first configuration arrives.
        tokio::spawn(kube_source::watch(state.clone(), client, ns, name))
    } else {
        // A file with errors is left out (and logged); a path that cannot be read at all is a
        // mistake to report.
        let mut manifests = source::Manifests::new(args.manifests.clone());
        manifests.reload(&state).context("loading --manifests")?;
        source::watch(state.clone(), manifests).context("watching --manifests")?
    };
    server::spawn_janitor(state.clone(), Duration::from_secs(60));
    // Signups wait for the sweep; a store that is down at start is retried every few seconds.
    // After 5 minutes without one, signups open anyway (logged): a look-alike of an account
    // from before normalization is the lesser harm than no signups at all.
    state
        .accounts_indexed
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let indexed = state.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(500);
        loop {
            match gatehouse_gateway::accounts::index_normalized_emails(&*indexed.store).await {
                Ok((accounts, recorded)) => {
                    tracing::info!(
                        accounts,
                        recorded,
                        "accounts indexed by their normalized email"
                    );
                    indexed
                        .accounts_indexed
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                Err(e) => {
                    let waited = started.elapsed();
                    if waited >= Duration::from_secs(300)
                        && !indexed
                            .accounts_indexed
                            .swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        tracing::error!(error = %e, "accounts not indexed by their normalized email after 5 minutes; signups open without it (still retried)");
                    } else {
                        let signups = if waited >= Duration::from_secs(300) {
                            "open"
                        } else {
                            "wait"
                        };
                        tracing::warn!(error = %e, retry_in = ?pause, signups, "cannot index accounts by their normalized email yet");
                    }
                    tokio::time::sleep(pause).await;
                    // Every few seconds while signups wait, every minute once they do not.
                    let cap = if waited >= Duration::from_secs(300) {
                        60
                    } else {
                        5
                    };
                    pause = (pause * 2).min(Duration::from_secs(cap));
                }
            }
        }
    });
    let purged = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            local_limiter.purge_idle(now_us());
            purged.sign_in_starts.purge_idle(now_us());
            purged.token_grants.purge_idle(now_us());
        }
    });

    let workers = args.workers();
    let listeners = server::bind_workers(args.listen, workers)
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding --admin-listen {}", args.admin_listen))?;
    tracing::info!(listen = %listeners[0].local_addr()?, workers, admin = %admin_listener.local_addr()?, issuer = %state.issuer, "gatehouse gateway serving");

    let admin_app = admin::router(state.clone(), Some(metrics));
    tokio::spawn(server::serve(admin_listener, admin_app));
    server::serve_workers(
        listeners,
        server::Public::new(state),
        server::shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// Logs whether Redis answers, retrying with backoff; /readyz reports the same.
fn spawn_redis_watch(store: Arc<RedisStore>, url: String) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(250);
        let mut was_up = None;
        loop {
            let up = store.ready().await;
            match (&up, was_up) {
                (Ok(()), Some(true)) => {}
                (Ok(()), _) => tracing::info!(redis = %url, "connected to Redis"),
                (Err(e), Some(false)) => {
                    tracing::debug!(redis = %url, error = %e, "Redis still unreachable")
                }
                (Err(e), _) => {
                    tracing::error!(redis = %url, error = %e, "cannot reach Redis; not ready, retrying with backoff")
                }
            }
            let ok = up.is_ok();
            was_up = Some(ok);
            delay = if ok {
                Duration::from_secs(2)
            } else {
                (delay * 2).min(Duration::from_secs(5))
            };
            tokio::time::sleep(delay).await;
        }
    });
}
