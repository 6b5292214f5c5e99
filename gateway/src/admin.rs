//! The admin listener: /healthz (process alive), /readyz (config loaded, and the store reached
//! once since start), /metrics (Prometheus).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::state::AppState;

#[derive(Clone)]
struct Admin {
    state: Arc<AppState>,
    metrics: Option<PrometheusHandle>,
    /// The store answered a readiness check once.
    store_reached: Arc<AtomicBool>,
}

pub fn router(state: Arc<AppState>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Admin {
            state,
            metrics,
            store_reached: Arc::default(),
        })
}

async fn readyz(State(a): State<Admin>) -> (StatusCode, String) {
    if !a.state.config.load().loaded {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no configuration loaded yet\n".into(),
        );
    }
    // Only until the store first answers: a pod that cannot reach it (a wrong password, a
    // network policy) never takes traffic. A store that fails later fails for every replica
    // alike; taking them all out of the Service would turn the gateways' JSON 503s (and plans
    // with failOpen, which let traffic through) into the ingress's own errors.
    if a.store_reached.load(Ordering::Relaxed) {
        return (StatusCode::OK, "ready\n".into());
    }
    match a.state.store.ready().await {
        Ok(()) => {
            a.store_reached.store(true, Ordering::Relaxed);
            (StatusCode::OK, "ready\n".into())
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

async fn render_metrics(State(a): State<Admin>) -> (StatusCode, String) {
    match &a.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".into(),
        ),
    }
}
