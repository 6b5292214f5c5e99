//! Command-line flags; each also reads a GATEHOUSE_* environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gatehouse-gateway",
    version,
    about = "gatehouse gateway: OAuth 2.0 for mobile apps, token checks, rate limits, reverse proxy"
)]
pub struct Args {
    /// Api/Plan/Application/Subscription/Secret YAML files or folders (repeatable; reloaded on change).
    #[arg(
        long = "manifests",
        env = "GATEHOUSE_MANIFESTS",
        value_delimiter = ',',
        required_unless_present = "kube"
    )]
    pub manifests: Vec<PathBuf>,

    /// In a cluster: run from the GatewayConfig the operator publishes (see --config-map).
    #[arg(
        long,
        env = "GATEHOUSE_KUBE",
        conflicts_with = "manifests",
        requires = "config_map"
    )]
    pub kube: bool,

    /// NAMESPACE/NAME of the ConfigMap the operator publishes (with --kube).
    #[arg(long, env = "GATEHOUSE_CONFIG_MAP")]
    pub config_map: Option<String>,

    /// Shared state in Redis (redis:// or rediss://, user:password@ in the URL); required for
    /// more than one replica. Without it the embedded store under --data-dir is used.
    #[arg(long, env = "GATEHOUSE_REDIS")]
    pub redis: Option<String>,

    /// Embedded persistent store directory (without --redis).
    #[arg(long, env = "GATEHOUSE_DATA_DIR", default_value = "./gatehouse-data")]
    pub data_dir: PathBuf,

    /// Address for OAuth endpoints, login pages and proxied APIs.
    #[arg(long, env = "GATEHOUSE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "GATEHOUSE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Public base URL of this gateway (metadata and `iss`). Default: http://localhost:<listen port>.
    #[arg(long, env = "GATEHOUSE_ISSUER")]
    pub issuer: Option<String>,

    /// Minimum password length for new accounts (NIST SP 800-63B rev 4 asks 15 for
    /// password-only sign-in; the default 12 relies on throttling and the strength check too).
    #[arg(long, env = "GATEHOUSE_PASSWORD_MIN_LENGTH", default_value_t = gatehouse_gateway_min_len(), value_parser = clap::value_parser!(u16).range(8..=64))]
    pub password_min_length: u16,

    /// Signups allowed per client IP per hour (throttles scripted account creation).
    #[arg(long, env = "GATEHOUSE_MAX_SIGNUPS_PER_IP", default_value_t = crate::oauth::login::MAX_SIGNUPS_PER_IP)]
    pub max_signups_per_ip: u64,

    /// Sign-ins at /login (each an Argon2id check, right password or wrong) allowed per client
    /// IP per 15 minutes. Failed ones are limited more tightly (20) on top of this.
    #[arg(long, env = "GATEHOUSE_MAX_PASSWORD_CHECKS_PER_IP", default_value_t = crate::oauth::login::MAX_PASSWORD_CHECKS_PER_IP, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_password_checks_per_ip: u64,

    /// Seconds after a refresh during which the refresh token it spent may be used again by a
    /// client that never got the answer (a connection dropped after the gateway sent it): the
    /// pair that answer held is revoked and a new one issued, as often as asked within the
    /// window. After it, or once the new refresh token was used, it is reuse and revokes the
    /// family. 0 (the default, design section 5) makes every second use reuse; at most 60 (as
    /// Okta and Cognito). A rotation whose client went away before the answer is undone anyway.
    #[arg(long, env = "GATEHOUSE_REFRESH_RETRY_SECONDS", default_value_t = crate::oauth::refresh::REFRESH_RETRY_SECONDS, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub refresh_retry_seconds: u64,

    /// Sign-in requests (`/oauth2/authorize`) one client IP may start per minute on each
    /// replica, as a burst, then evenly spaced (a browser signed in at the gateway counts as
    /// its user). Each parks a pending request in the store for 10 minutes; over the limit the
    /// app gets `error=temporarily_unavailable`.
    #[arg(long, env = "GATEHOUSE_MAX_SIGN_IN_STARTS_PER_MINUTE", default_value_t = crate::oauth::authorize::MAX_SIGN_IN_STARTS_PER_MINUTE, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sign_in_starts_per_minute: u64,

    /// Token grants (code exchanges, refreshes) per client and user, and client_credentials
    /// grants per client, per minute on each replica, as a burst, then evenly spaced. Every
    /// grant stores tokens for their lifetime, so a client asking in a loop (a token per API
    /// call is a common mistake) would fill the store for everybody; over the limit the token
    /// endpoint answers 429 `slow_down` with `Retry-After`.
    #[arg(long, env = "GATEHOUSE_MAX_TOKEN_GRANTS_PER_MINUTE", default_value_t = crate::oauth::token::MAX_TOKEN_GRANTS_PER_MINUTE, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_token_grants_per_minute: u64,

    /// Proxies in front of the gateway (ingress, load balancer) as comma-separated CIDRs or
    /// addresses. Requests from them are attributed to the client named in X-Forwarded-For for
    /// the login, signup and sign-in throttles; without this, behind an ingress, every client
    /// shares the ingress's address: one attacker's failed logins lock everybody out, and one
    /// script's sign-in requests use up everybody's.
    #[arg(long, env = "GATEHOUSE_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: crate::client_ip::TrustedProxies,

    /// WebSocket connections this gateway holds open at once (each takes two sockets); a
    /// handshake over it gets 503.
    #[arg(long, env = "GATEHOUSE_MAX_WEBSOCKETS", default_value_t = crate::tunnel::MAX_TUNNELS as u32, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_websockets: u32,

    /// WebSocket connections one caller (a subscription's user, or its application for
    /// client_credentials tokens) holds open at once on this gateway.
    #[arg(long, env = "GATEHOUSE_MAX_WEBSOCKETS_PER_CALLER", default_value_t = crate::tunnel::MAX_PER_CALLER as u32, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_websockets_per_caller: u32,

    /// Threads serving the public listener, each with its own runtime and SO_REUSEPORT socket
    /// (default: one per CPU).
    #[arg(long, env = "GATEHOUSE_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// Log format.
    #[arg(long, env = "GATEHOUSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Args {
    pub fn workers(&self) -> usize {
        match self.workers {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

const fn gatehouse_gateway_min_len() -> u16 {
    crate::password::MIN_LENGTH as u16
}

impl Args {
    pub fn issuer(&self) -> String {
        self.issuer
            .clone()
            .unwrap_or_else(|| format!("http://localhost:{}", self.listen.port()))
    }
}
