//! The admin listener: /healthz (process alive), /readyz (config loaded and store reachable),
//! /metrics (Prometheus).

use std::sync::Arc;

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
}

pub fn router(state: Arc<AppState>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Admin { state, metrics })
}

async fn readyz(State(a): State<Admin>) -> (StatusCode, String) {
    if !a.state.config.load().loaded {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no configuration loaded yet\n".into(),
        );
    }
    match a.state.store.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
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
