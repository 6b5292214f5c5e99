//! The authorization server's endpoints.

pub mod client_auth;
pub mod form;
pub mod token;

use http::{HeaderValue, header};

/// Token and introspection answers must never be cached (RFC 6749 5.1).
pub fn no_store(h: &mut http::HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}
