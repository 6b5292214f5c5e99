//! Wires the routers and runs the listeners until SIGTERM/SIGINT, then drains in-flight requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};

use crate::state::AppState;
use crate::store::unix_now;
use crate::{oauth, proxy};

/// The public router: OAuth endpoints first, everything else is proxied by pathPrefix.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/oauth2/authorize", get(oauth::authorize::handle))
        .route("/oauth2/token", post(oauth::token::handle))
        .route("/oauth2/revoke", post(oauth::revoke::handle))
        .route("/oauth2/introspect", post(oauth::introspect::handle))
        .route("/oauth2/userinfo", get(oauth::userinfo::handle))
        .route(
            "/.well-known/oauth-authorization-server",
            get(oauth::metadata::handle),
        )
        .route(
            "/login",
            get(oauth::login::login_page).post(oauth::login::login_post),
        )
        .route(
            "/signup",
            get(oauth::login::signup_page).post(oauth::login::signup_post),
        )
        .route(
            "/consent",
            get(oauth::login::consent_page).post(oauth::login::consent_post),
        )
        .fallback(proxy::handle)
        .with_state(state)
}

/// Periodic housekeeping: expired tokens, idle rate-limit keys.
pub fn spawn_janitor(state: Arc<AppState>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match state.store.purge_expired(unix_now()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(purged = n, "expired tokens removed"),
                Err(e) => tracing::warn!(error = %e, "purge failed"),
            }
        }
    })
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: draining in-flight requests");
}

/// Serves `app` on `addr` with peer addresses available to handlers.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
}
