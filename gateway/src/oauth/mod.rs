//! The authorization server's endpoints.

pub mod authorize;
pub mod client_auth;
pub mod form;
pub mod introspect;
pub mod login;
pub mod metadata;
pub mod pkce;
pub mod redirect;
pub mod revoke;
pub mod session;
pub mod token;
pub mod userinfo;

use std::sync::Arc;

use http::{HeaderValue, header};

use crate::state::AppState;

/// Token and introspection answers must never be cached (RFC 6749 5.1).
pub fn no_store(h: &mut http::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The login and signup throttles' key for the client: its address (behind a trusted proxy,
/// the one in X-Forwarded-For; an IPv6 client's /64), "unknown" when served without connect
/// info, as in router tests.
pub struct PeerIp(pub String);

impl axum::extract::FromRequestParts<Arc<AppState>> for PeerIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(PeerIp(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map_or_else(
                    || "unknown".to_string(),
                    |c| {
                        let ip = state.trusted_proxies.client_ip(c.0.ip(), &parts.headers);
                        crate::client_ip::throttle_key(ip)
                    },
                ),
        ))
    }
}
