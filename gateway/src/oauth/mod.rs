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

use http::{HeaderValue, header};

/// Token and introspection answers must never be cached (RFC 6749 5.1).
pub fn no_store(h: &mut http::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The client's IP as seen on the socket ("unknown" when served without connect info, as in
/// router tests). Used for login throttling and X-Forwarded-For.
pub struct PeerIp(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PeerIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(PeerIp(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string()),
        ))
    }
}
