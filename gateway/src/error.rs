//! The gateway's one error type and its mapping to HTTP responses (JSON for APIs and the token
//! endpoint; RFC 6750 `WWW-Authenticate` for bearer failures; RFC 6749 codes for OAuth).

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::headers;
use crate::ratelimit::Decision;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no API is served at this path")]
    NoRoute,
    /// 401 without an error code: the request carried no credentials (RFC 6750 3.1).
    #[error("an access token is required: send Authorization: Bearer <token>")]
    MissingToken,
    #[error("{0}")]
    InvalidRequest(&'static str),
    #[error("the access token is invalid, expired, revoked or not issued for this API")]
    InvalidToken,
    #[error("rate limit exceeded")]
    RateLimited(Decision),
    #[error("the rate-limit store is unavailable")]
    LimiterUnavailable,
    #[error("the token store is unavailable")]
    StoreUnavailable,
    #[error("this gateway holds as many WebSocket connections as it may; try again later")]
    TooManyWebSockets,
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the request body stopped arriving")]
    ClientTooSlow,
    /// TRACE (echoes the request, credentials included, back to a script: cross-site tracing)
    /// and CONNECT (a tunnel to anywhere the gateway can reach) are never proxied.
    #[error("TRACE and CONNECT are not proxied")]
    MethodNotAllowed,
    /// RFC 9112 6.1: a transfer coding other than chunked (hyper undoes only chunked; the
    /// rest would reach the upstream still applied, and unannounced).
    #[error("only the chunked transfer coding is supported")]
    UnsupportedTransferCoding,
    #[error("{1}")]
    OAuth(OAuthErrorCode, String),
    /// The token endpoint's issuance limit; the seconds until a grant is allowed again.
    /// `slow_down` is the token endpoint's code for "ask less often" (RFC 8628 3.5).
    #[error("too many token requests for this client; retry in {0} s")]
    SlowDown(u64),
}

/// RFC 6749 5.2 error codes (and RFC 7009/7662 reuse them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    ServerError,
    TemporarilyUnavailable,
}

impl OAuthErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthErrorCode::InvalidRequest => "invalid_request",
            OAuthErrorCode::InvalidClient => "invalid_client",
            OAuthErrorCode::InvalidGrant => "invalid_grant",
            OAuthErrorCode::UnauthorizedClient => "unauthorized_client",
            OAuthErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthErrorCode::InvalidScope => "invalid_scope",
            OAuthErrorCode::ServerError => "server_error",
            OAuthErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            OAuthErrorCode::InvalidClient => StatusCode::UNAUTHORIZED,
            OAuthErrorCode::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            OAuthErrorCode::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

pub fn oauth(code: OAuthErrorCode, description: impl Into<String>) -> GatewayError {
    GatewayError::OAuth(code, description.into())
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::MissingToken | GatewayError::InvalidToken => StatusCode::UNAUTHORIZED,
            GatewayError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::RateLimited(_) | GatewayError::SlowDown(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::LimiterUnavailable
            | GatewayError::StoreUnavailable
            | GatewayError::TooManyWebSockets => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::ClientTooSlow => StatusCode::REQUEST_TIMEOUT,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            GatewayError::OAuth(code, _) => code.status(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "not_found",
            GatewayError::MissingToken => "unauthorized",
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::InvalidToken => "invalid_token",
            GatewayError::RateLimited(_) => "rate_limited",
            GatewayError::LimiterUnavailable
            | GatewayError::StoreUnavailable
            | GatewayError::TooManyWebSockets => "temporarily_unavailable",
            GatewayError::UpstreamUnreachable => "bad_gateway",
            GatewayError::UpstreamTimeout => "gateway_timeout",
            GatewayError::ClientTooSlow => "request_timeout",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::UnsupportedTransferCoding => "not_implemented",
            GatewayError::OAuth(code, _) => code.as_str(),
            GatewayError::SlowDown(_) => "slow_down",
        }
    }

    /// The response, with the request id in the body and header when there is one.
    pub fn to_response(&self, request_id: Option<&HeaderValue>) -> Response {
        let mut body = json!({ "error": self.code(), "error_description": self.to_string() });
        if let Some(id) = request_id.and_then(|v| v.to_str().ok()) {
            body["request_id"] = json!(id);
        }
        let mut resp = (self.status(), Json(body)).into_response();
        let h = resp.headers_mut();
        if let Some(id) = request_id {
            h.insert(headers::REQUEST_ID, id.clone());
        }
        match self {
            GatewayError::MissingToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"gatehouse\""),
                );
            }
            GatewayError::InvalidToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"gatehouse\", error=\"invalid_token\", error_description=\"The access token is invalid, expired, revoked or not issued for this API\"",
                    ),
                );
            }
            GatewayError::InvalidRequest(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"gatehouse\", error=\"invalid_request\"",
                    ),
                );
            }
            GatewayError::RateLimited(d) => {
                h.insert(
                    header::RETRY_AFTER,
                    headers::number(d.retry_after_seconds()),
                );
                set_rate_limit_headers(h, d);
            }
            GatewayError::SlowDown(seconds) => {
                h.insert(header::RETRY_AFTER, headers::number(*seconds));
                crate::oauth::no_store(h);
            }
            GatewayError::MethodNotAllowed => {
                h.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            GatewayError::OAuth(code, _) => {
                crate::oauth::no_store(h);
                if *code == OAuthErrorCode::InvalidClient {
                    h.insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"gatehouse\""),
                    );
                }
            }
            _ => {}
        }
        resp
    }
}

/// RateLimit-Limit / -Remaining / -Reset (IETF draft, the form Kong and Envoy send).
pub fn set_rate_limit_headers(h: &mut http::HeaderMap, d: &Decision) {
    if d.limit == 0 {
        return;
    }
    // With the X-Request-Id the proxy adds next: grow the map once.
    h.reserve(4);
    h.insert(headers::RATELIMIT_LIMIT, headers::number(d.limit));
    h.insert(headers::RATELIMIT_REMAINING, headers::number(d.remaining));
    h.insert(headers::RATELIMIT_RESET, headers::number(d.reset_seconds()));
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.to_response(None)
    }
}
