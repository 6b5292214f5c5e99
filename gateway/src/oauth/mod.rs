//! The authorization server's endpoints.

pub mod authorize;
pub mod client_auth;
pub mod error_pages;
pub mod form;
pub mod introspect;
pub mod login;
pub mod metadata;
pub mod pkce;
pub mod redirect;
pub mod refresh;
pub mod revoke;
pub mod session;
pub mod token;
pub mod userinfo;

use std::sync::Arc;

use axum::extract::FromRequest;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, header};
use tokio_util::sync::CancellationToken;

use crate::error::{GatewayError, OAuthErrorCode, oauth};
use crate::state::AppState;

/// Runs an endpoint's work on a task of its own, so it goes to its end even when the client
/// goes away: hyper drops a request's future when its connection closes, and a code exchange,
/// a refresh or a revocation changes the store in several steps. Stopped between two of them,
/// the embedded store (which commits its file before it changes memory) would keep a revoked
/// token working, or a spent code or refresh token usable, until the next restart. `work` gets
/// a token that is cancelled once nobody waits for its answer, so work whose answer only that
/// client would have got can be undone (a refresh puts the presented token back).
pub async fn to_completion<T, W>(
    work: impl FnOnce(CancellationToken) -> W,
) -> Result<T, GatewayError>
where
    T: Send + 'static,
    W: Future<Output = Result<T, GatewayError>> + Send + 'static,
{
    let gone = CancellationToken::new();
    // Dropped with this future: when hyper drops the request's, or after the answer came.
    let _waiting = gone.clone().drop_guard();
    let task = TASKS.with(|tasks| tasks.spawn(work(gone)));
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "an authorization server task failed");
        Err(oauth(OAuthErrorCode::ServerError, "internal error"))
    })
}

thread_local! {
    /// This thread's `to_completion` tasks. A worker's runtime ends with its server and would
    /// cancel them there, so the server waits for them first (`finish_tasks`).
    static TASKS: tokio_util::task::TaskTracker = tokio_util::task::TaskTracker::new();
}

/// Waits for this thread's `to_completion` tasks: a server calls it once its connections are
/// drained, before its runtime goes.
pub async fn finish_tasks() {
    let tasks = TASKS.with(Clone::clone);
    tasks.close();
    tasks.wait().await;
}

/// The body of a request to an OAuth endpoint (at most `server::FORM_BODY_LIMIT`). One too
/// large, or one that stops arriving, is answered as an RFC 6749 `invalid_request` (JSON,
/// no-store) with the rejection's status, not with axum's plain-text rejection.
pub struct OAuthBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for OAuthBody {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        Bytes::from_request(req, state)
            .await
            .map(OAuthBody)
            .map_err(|e| {
                let mut r = oauth(OAuthErrorCode::InvalidRequest, e.body_text()).into_response();
                *r.status_mut() = e.status();
                r
            })
    }
}

/// The body of a form the sign-in pages post. Rejected as a page (with the pages' security
/// headers), not as axum's plain text.
pub struct PageBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for PageBody {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        Bytes::from_request(req, state)
            .await
            .map(PageBody)
            .map_err(|e| match e.status() {
                http::StatusCode::PAYLOAD_TOO_LARGE => {
                    error_pages::known(error_pages::FORM_TOO_LARGE)
                }
                _ => error_pages::known(error_pages::FORM_NOT_ACCEPTED),
            })
    }
}

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
