//! Shared state of one gateway process.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::ratelimit::Limiter;
use crate::snapshot::Snapshot;
use crate::store::Store;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

pub struct AppState {
    pub config: ArcSwap<Snapshot>,
    pub store: Arc<dyn Store>,
    pub limiter: Arc<dyn Limiter>,
    /// Public base URL, no trailing slash (metadata, `iss`).
    pub issuer: String,
    /// Minimum password length for signups.
    pub password_min_len: usize,
    /// Signups allowed per client IP per hour.
    pub max_signups_per_ip: u64,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, limiter: Arc<dyn Limiter>, issuer: &str) -> AppState {
        AppState {
            config: ArcSwap::from_pointee(Snapshot::default()),
            store,
            limiter,
            issuer: issuer.trim_end_matches('/').to_string(),
            password_min_len: crate::password::MIN_LENGTH,
            max_signups_per_ip: crate::oauth::login::MAX_SIGNUPS_PER_IP,
        }
    }

    /// Session cookies get `Secure` when the public URL is https.
    pub fn secure_cookies(&self) -> bool {
        self.issuer.starts_with("https://")
    }

    /// Installs a new configuration; requests in flight keep the one they started with.
    pub fn swap_config(&self, snapshot: Snapshot) {
        self.config.store(Arc::new(snapshot));
    }
}

thread_local! {
    // One upstream pool per thread: a worker's upstream connections are driven by that worker's
    // runtime, so forwarding a request never wakes another thread.
    static UPSTREAM: HttpClient = http_client();
}

/// Sends a request upstream through this thread's pool.
pub fn send_upstream(req: http::Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
    UPSTREAM.with(|c| c.request(req))
}

/// Pooled keep-alive client for upstreams, http and https (webpki roots).
pub fn http_client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .pool_max_idle_per_host(512)
        .build(https)
}
