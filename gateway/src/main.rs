use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gatehouse_gateway::cli::{Args, LogFormat};
use gatehouse_gateway::ratelimit::local::{LocalLimiter, now_us};
use gatehouse_gateway::state::AppState;
use gatehouse_gateway::store::embedded::EmbeddedStore;
use gatehouse_gateway::{admin, server, source};
use tracing_subscriber::EnvFilter;

#[tokio::main]
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
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;

    let store = EmbeddedStore::open(&args.data_dir).context("opening the embedded store")?;
    let limiter = Arc::new(LocalLimiter::default());
    let state = Arc::new(AppState::new(
        Arc::new(store),
        limiter.clone(),
        &args.issuer(),
    ));

    // The first load must succeed: starting without any configuration is a mistake to report.
    source::reload(&state, &args.manifests).context("loading --manifests")?;
    let _watch =
        source::watch(state.clone(), args.manifests.clone()).context("watching --manifests")?;
    server::spawn_janitor(state.clone(), Duration::from_secs(60));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            limiter.purge_idle(now_us());
        }
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding --admin-listen {}", args.admin_listen))?;
    tracing::info!(listen = %listener.local_addr()?, admin = %admin_listener.local_addr()?, issuer = %state.issuer, "gatehouse gateway serving");

    let admin_app = admin::router(state.clone(), Some(metrics));
    tokio::spawn(async move {
        if let Err(e) = server::serve(admin_listener, admin_app).await {
            tracing::error!("admin listener failed: {e}");
        }
    });
    server::serve(listener, server::router(state)).await?;
    Ok(())
}
