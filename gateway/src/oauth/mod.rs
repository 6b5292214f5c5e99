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

/// A value the client sent, as it may appear in an `error_description`: RFC 6749 5.2 allows
/// only printable ASCII without `"` and `\`, so anything else, or anything long, is not shown.
pub fn shown(value: &str) -> &str {
    let allowed = |b: u8| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E);
    if value.len() <= 64 && value.bytes().all(allowed) {
        value
    } else {
        "(not shown)"
    }
}

/// Token and introspection answers must never be cached (RFC 6749 5.1).
pub fn no_store(h: &mut http::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The login, signup and sign-in throttles' key for the client: its address (behind a trusted proxy,
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

#[cfg(test)]
mod tests {
    #[test]
    fn error_descriptions_show_only_plain_short_values() {
        assert_eq!(super::shown("orders"), "orders");
        assert_eq!(super::shown("a\"b"), "(not shown)");
        assert_eq!(super::shown("a\\b"), "(not shown)");
        assert_eq!(super::shown("caf\u{e9}"), "(not shown)");
        assert_eq!(super::shown("a\nb"), "(not shown)");
        assert_eq!(super::shown(&"x".repeat(65)), "(not shown)");
    }
}
