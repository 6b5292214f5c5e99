//! Shared state of one gateway process.

use std::cell::RefCell;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::client_ip::TrustedProxies;
use crate::ratelimit::Limiter;
use crate::ratelimit::local::AddressThrottle;
use crate::snapshot::Snapshot;
use crate::store::Store;

thread_local! {
    /// The shared configuration this thread saw last, and this thread's copy of it.
    static LOCAL_CONFIG: RefCell<Option<(Arc<Snapshot>, Arc<Snapshot>)>> = const { RefCell::new(None) };
}

pub struct AppState {
    pub config: ArcSwap<Snapshot>,
    pub store: Arc<dyn Store>,
    pub limiter: Arc<dyn Limiter>,
    /// Public base URL, no trailing slash (metadata, `iss`).
    pub issuer: String,
    /// X-Forwarded-Proto for upstreams: the scheme of the public URL (TLS ends before the
    /// gateway, at the ingress, when the issuer is https).
    pub forwarded_proto: &'static str,
    /// Minimum password length for signups.
    pub password_min_len: usize,
    /// Signups allowed per client IP per hour.
    pub max_signups_per_ip: u64,
    /// Sign-ins (password checks) allowed per client IP per 15 minutes.
    pub max_password_checks_per_ip: u64,
    /// Seconds after a rotation during which the token rotated last may be redeemed again by
    /// a client that did not get the answer (`--refresh-retry-seconds`; 0: never).
    pub refresh_retry_secs: u64,
    /// Sign refresh tokens' family ids; read from (or first written to) the store at the first
    /// use and again once a minute (`refresh::refresh_keys`).
    pub refresh_keys: arc_swap::ArcSwapOption<crate::oauth::refresh::RefreshKeys>,
    /// Proxies whose X-Forwarded-For names the client for the login, signup and sign-in
    /// throttles.
    pub trusted_proxies: TrustedProxies,
    /// Sign-in requests (`/oauth2/authorize`) per client address (per user once signed in),
    /// on this replica.
    pub sign_in_starts: AddressThrottle,
    /// Token grants per client and user (per client for client_credentials), on this replica
    /// (`--max-token-grants-per-minute`).
    pub token_grants: AddressThrottle,
    /// One permit per WebSocket tunnel this process may hold (`--max-websockets`).
    pub websocket_slots: Arc<tokio::sync::Semaphore>,
    /// Tunnels per caller (`--max-websockets-per-caller`).
    pub websocket_callers: Arc<crate::tunnel::PerCaller>,
    /// False until the start-up sweep has recorded accounts from before email normalization
    /// under their normalized email (`accounts::index_normalized_emails`): signups wait for it,
    /// so none can take such an account's address in another spelling meanwhile.
    pub accounts_indexed: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, limiter: Arc<dyn Limiter>, issuer: &str) -> AppState {
        AppState {
            config: ArcSwap::from_pointee(Snapshot::default()),
            store,
            limiter,
            issuer: issuer.trim_end_matches('/').to_string(),
            forwarded_proto: if is_https(issuer) { "https" } else { "http" },
            password_min_len: crate::password::MIN_LENGTH,
            max_signups_per_ip: crate::oauth::login::MAX_SIGNUPS_PER_IP,
            max_password_checks_per_ip: crate::oauth::login::MAX_PASSWORD_CHECKS_PER_IP,
            refresh_retry_secs: crate::oauth::refresh::REFRESH_RETRY_SECONDS,
            refresh_keys: arc_swap::ArcSwapOption::empty(),
            trusted_proxies: TrustedProxies::default(),
            sign_in_starts: AddressThrottle::per_minute(
                crate::oauth::authorize::MAX_SIGN_IN_STARTS_PER_MINUTE,
            ),
            token_grants: AddressThrottle::per_minute(
                crate::oauth::token::MAX_TOKEN_GRANTS_PER_MINUTE,
            ),
            websocket_slots: Arc::new(tokio::sync::Semaphore::new(crate::tunnel::MAX_TUNNELS)),
            websocket_callers: Arc::new(crate::tunnel::PerCaller::new(
                crate::tunnel::MAX_PER_CALLER,
            )),
            accounts_indexed: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// A state on the embedded store in `dir`, the in-process limiter and `http://gw`, for
    /// unit tests.
    #[cfg(test)]
    pub fn for_tests(dir: &std::path::Path) -> AppState {
        AppState::new(
            Arc::new(crate::store::embedded::EmbeddedStore::open(dir).expect("embedded store")),
            Arc::new(crate::ratelimit::local::LocalLimiter::default()),
            "http://gw",
        )
    }

    /// Session cookies get `Secure` when the public URL is https.
    pub fn secure_cookies(&self) -> bool {
        is_https(&self.issuer)
    }

    /// The current configuration as this thread's own copy, for the proxy path. Every proxied
    /// request clones the snapshot's `Arc` and four of its header values (reference counts):
    /// shared by all workers, those counters' cache lines moved between cores on each request
    /// (perf: the `Bytes` clone and drop ran 6-9 times slower per instruction than the rest).
    /// A copy per thread keeps each worker's counters in its own cache. Building it costs one
    /// `Snapshot::build` per thread per configuration change.
    pub fn local_config(&self) -> Arc<Snapshot> {
        let shared = self.config.load();
        LOCAL_CONFIG.with(|cell| {
            let mut cell = cell.borrow_mut();
            if let Some((seen, copy)) = &*cell
                && Arc::ptr_eq(seen, &shared)
            {
                return copy.clone();
            }
            let copy = Arc::new(shared.copy());
            *cell = Some((Arc::clone(&shared), copy.clone()));
            copy
        })
    }

    /// Installs a new configuration; requests in flight keep the one they started with.
    pub fn swap_config(&self, snapshot: Snapshot) {
        self.config.store(Arc::new(snapshot));
    }
}

/// Is the public URL https (TLS ends at the ingress in front of the gateway)?
fn is_https(issuer: &str) -> bool {
    issuer.starts_with("https://")
}
