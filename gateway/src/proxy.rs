//! The proxy: token check, rate limits, header rewriting, streaming forward (design 4.2).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Response, StatusCode, Uri, Version, header};
use http_body_util::Either;

use crate::error::{GatewayError, set_rate_limit_headers};
use crate::headers::{self, Bearer, Forwarded, Identity};
use crate::ratelimit::{Decision, limit_checks};
use crate::routing::{self, PathRefusal};
use crate::state::AppState;
use crate::store::unix_now;
use crate::tokens;
use crate::tunnel;
use crate::upstream::{self, UpstreamBody};

/// A proxied response: the upstream's body streamed through, or the gateway's own error.
pub type ProxyBody = Either<UpstreamBody, Body>;

/// The router's fallback (in-process use and tests); the listeners call `serve` directly.
pub async fn handle(State(state): State<Arc<AppState>>, req: Request) -> axum::response::Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    serve(&state, req, &peer_header(peer)).await.map(Body::new)
}

/// The client address as forwarded in X-Forwarded-For; computed once per connection.
pub fn peer_header(peer: Option<IpAddr>) -> HeaderValue {
    peer.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok())
        .unwrap_or_else(|| HeaderValue::from_static("unknown"))
}

/// Checks and forwards one request from the client at `peer`.
pub async fn serve(state: &Arc<AppState>, req: Request, peer: &HeaderValue) -> Response<ProxyBody> {
    let request_id = headers::request_id(req.headers());
    let started = std::time::Instant::now();
    let resp = match forward(state, req, &request_id, peer, started).await {
        Ok(resp) => resp.map(Either::Left),
        Err(e) => e.to_response(Some(&request_id)).map(Either::Right),
    };
    let m = proxy_metrics();
    m.responses[status_class(resp.status())].increment(1);
    m.duration.record(started.elapsed().as_secs_f64());
    resp
}

/// For an open tunnel: is the token behind `hash` still live (not revoked or expired) and its
/// subscription still in the configuration for the same Api? A store that cannot answer keeps
/// the tunnel (requests in flight are not cut for a Redis blip either).
pub async fn token_still_opens(state: &AppState, hash: &tokens::TokenHash) -> bool {
    let record = match state.store.get_token(hash).await {
        Ok(Some(record)) => record,
        Ok(None) => return false,
        Err(e) => {
            tracing::debug!(error = %e, "cannot recheck a WebSocket's token; keeping it");
            return true;
        }
    };
    state.config.load().access_client(&record).is_some()
}

/// The proxy's request duration histogram and its buckets (seconds).
pub const PROXY_DURATION: &str = "gatehouse_proxy_duration_seconds";
pub const PROXY_DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Metric handles registered once: the macros hash their name and labels on every call.
struct ProxyMetrics {
    responses: [metrics::Counter; 5],
    duration: metrics::Histogram,
}

fn proxy_metrics() -> &'static ProxyMetrics {
    // First use happens on the first request, after main installed the recorder.
    static METRICS: std::sync::OnceLock<ProxyMetrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(|| ProxyMetrics {
        responses: ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .map(|class| metrics::counter!("gatehouse_proxy_responses_total", "class" => class)),
        duration: metrics::histogram!(PROXY_DURATION),
    })
}

fn status_class(s: http::StatusCode) -> usize {
    match s.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// When the upstream's response head is due, asked each time the current deadline passes
/// (first `timeout` after the request arrived). A request body decides (nginx counts
/// proxy_read_timeout from the end of sending, proxy_send_timeout between writes):
/// - sent: `timeout` after its last byte went out;
/// - hyper is waiting for the client's next piece: not yet (`timeout` from now). The client's
///   own pace bounds that (at most 30 s between pieces, `server.rs`);
/// - hyper holds a piece the upstream does not take (or the connection is not up): `timeout`
///   after hyper last took one, or never if it never asked.
///
/// None: no body, so the deadline that passed stands. Pure.
fn head_due(
    body: Option<upstream::Progress>,
    now: std::time::Instant,
    timeout: std::time::Duration,
) -> Option<std::time::Instant> {
    match body? {
        upstream::Progress::Sent(at) => at.checked_add(timeout),
        upstream::Progress::WaitingForClient => now.checked_add(timeout),
        upstream::Progress::Taken(at) => at?.checked_add(timeout),
    }
}

async fn forward(
    state: &Arc<AppState>,
    mut req: Request,
    request_id: &HeaderValue,
    peer: &HeaderValue,
    // When the request arrived: the one clock read the checks, the pool and the deadline share.
    arrived: std::time::Instant,
) -> Result<Response<UpstreamBody>, GatewayError> {
    if req.method() == Method::TRACE || req.method() == Method::CONNECT {
        return Err(GatewayError::MethodNotAllowed);
    }
    let snap = state.local_config();
    // RFC 9112 3.2: more than one Host is refused; a proxy in front may have routed by the
    // other one than the gateway would.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err(GatewayError::InvalidRequest(
            "the request has more than one Host header",
        ));
    }
    if !headers::transfer_coding_supported(req.headers()) {
        return Err(GatewayError::UnsupportedTransferCoding);
    }
    // RFC 9112 3.2.2: a proxy replaces Host with an absolute-form target's authority, so the
    // route, X-Forwarded-Host and the upstream all see the one a front proxy would route by.
    if let Some(authority) = req.uri().authority() {
        if authority.as_str().contains('@') {
            return Err(GatewayError::InvalidRequest(
                "the request target must not name a user",
            ));
        }
        let value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| GatewayError::InvalidRequest("the request target has an invalid host"))?;
        req.headers_mut().insert(header::HOST, value);
    }
    // RFC 9112 3.2: an HTTP/1.1 request without Host, or with an invalid one, is a 400.
    let host = match req.headers().get(header::HOST) {
        Some(h) if routing::valid_host(h.as_bytes()) => h.to_str().ok(),
        Some(_) => {
            return Err(GatewayError::InvalidRequest(
                "the Host header is not a valid host",
            ));
        }
        None if req.version() >= Version::HTTP_11 => {
            return Err(GatewayError::InvalidRequest(
                "the request has no Host header",
            ));
        }
        None => None,
    };
    let api_idx = match routing::route(
        &snap.config.apis,
        host,
        req.uri().path(),
        snap.upper_case_prefix,
    ) {
        Ok(Some(i)) => i,
        Ok(None) => return Err(GatewayError::NoRoute),
        Err(PathRefusal::DotSegment) => {
            return Err(GatewayError::InvalidRequest(
                "the path must not contain '.' or '..' segments",
            ));
        }
        Err(PathRefusal::OtherApi) => {
            return Err(GatewayError::InvalidRequest(
                "the path names another API once decoded or normalized (escaped letters, '//', ';' parameters, letter case); send it in its plain form",
            ));
        }
    };
    let api = &snap.apis[api_idx];

    if headers::query_has_token(req.uri().query()) {
        return Err(GatewayError::InvalidRequest(
            "access tokens in the query string are not accepted; send Authorization: Bearer <token>",
        ));
    }
    let token = match headers::bearer(req.headers()) {
        Bearer::Missing => return Err(GatewayError::MissingToken),
        Bearer::Malformed => {
            return Err(GatewayError::InvalidRequest(
                "the Authorization header must be exactly one 'Bearer <token>'",
            ));
        }
        Bearer::Token(t) => t,
    };
    if !tokens::looks_like_token(token) {
        return Err(GatewayError::InvalidToken);
    }
    let hash = tokens::hash(token);
    let record = match state.store.get_token_now(&hash) {
        Some(known) => known,
        None => state.store.get_token(&hash).await.map_err(|e| {
            tracing::warn!(error = %e, "token lookup failed");
            GatewayError::StoreUnavailable
        })?,
    }
    .ok_or(GatewayError::InvalidToken)?;
    // The token must be an access token of a subscription that still exists, for this Api.
    let client = snap
        .access_client(&record)
        .filter(|c| c.api == api_idx)
        .ok_or(GatewayError::InvalidToken)?;

    // A WebSocket handshake, checked like any request: its connection becomes a tunnel to the
    // upstream's when both agree (tunnel.rs). Its slot is taken before the limits count it, so
    // a handshake refused for want of one spends no quota. Without a connection to hand over
    // (the in-process router) it goes on as a plain request.
    let websocket = match headers::websocket_handshake(req.method(), req.version(), req.headers()) {
        Some(key) => match req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() {
            Some(client_side) => {
                // A slot first: no upstream connection for a tunnel that cannot be held.
                let caller = format!(
                    "{}\n{}",
                    client.cfg.subscription,
                    record.user_id.as_deref().unwrap_or("-")
                );
                let Some(slot) =
                    tunnel::slot(&state.websocket_slots, &state.websocket_callers, caller)
                else {
                    metrics::counter!("gatehouse_websocket_refused_total").increment(1);
                    return Err(GatewayError::TooManyWebSockets);
                };
                Some((key, client_side, slot))
            }
            None => None,
        },
        None => None,
    };

    let plan = &snap.plans[client.plan];
    let checks = limit_checks(plan, &client.cfg.subscription, record.user_id.as_deref());
    let checked = match state.limiter.check_now(&checks, arrived) {
        Some(d) => Ok(d),
        None => state.limiter.check(checks).await,
    };
    let decision = match checked {
        Ok(d) => d,
        Err(e) if plan.fail_open => {
            tracing::warn!(error = %e, plan = %plan.id, "rate limits unchecked (plan fails open)");
            Decision::unlimited()
        }
        Err(e) => {
            tracing::warn!(error = %e, "rate limits cannot be checked; refusing (fail closed)");
            return Err(GatewayError::LimiterUnavailable);
        }
    };
    if !decision.allowed {
        return Err(GatewayError::RateLimited(decision));
    }

    // Changed in place rather than taken apart and rebuilt (each moves the whole head).
    let path = routing::upstream_path(
        &api.base_path,
        &api.cfg.path_prefix,
        req.uri().path(),
        api.cfg.upstream.strip_prefix,
        req.uri().query(),
    );
    *req.uri_mut() = PathAndQuery::from_maybe_shared(bytes::Bytes::from(path))
        .map(Uri::from)
        .map_err(|_| GatewayError::InvalidRequest("the request path cannot be forwarded"))?;
    *req.version_mut() = Version::HTTP_11;

    let user_header = match &record.user_id {
        Some(u) => Some(HeaderValue::from_str(u).map_err(|_| GatewayError::InvalidToken)?),
        None => None,
    };
    let identity = Identity {
        user_id: user_header,
        scope: HeaderValue::from_str(&record.scope).map_err(|_| GatewayError::InvalidToken)?,
        client_id: &client.client_id_header,
        application_id: &client.application_header,
        plan: &client.plan_header,
    };
    let fwd = Forwarded {
        peer_ip: peer,
        proto: state.forwarded_proto,
        request_id,
        upstream_host: api.target.host(),
    };
    headers::rewrite_request(req.headers_mut(), &identity, &fwd);
    // A GET or HEAD whose body came chunked (no length): hyper would send it upstream as an
    // empty body unless told otherwise, and the body would be lost.
    if matches!(*req.method(), Method::GET | Method::HEAD)
        && !hyper::body::Body::is_end_stream(req.body())
        && !req.headers().contains_key(header::CONTENT_LENGTH)
    {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }

    let deadline = tokio::time::Instant::from_std(arrived) + api.timeout;
    // Boxed: the exchange's state is large, and this future is moved whole several times.
    let sent = if websocket.is_some() {
        headers::set_websocket_upgrade(req.headers_mut());
        let handshake = upstream::send_upgrade(&api.target, req, api.timeout);
        tokio::time::timeout_at(deadline, Box::pin(handshake)).await
    } else {
        let body_sent = upstream::BodySent::for_body(req.body());
        let exchange = upstream::send(&api.target, req, api.timeout, arrived, body_sent.clone());
        let mut exchange = Box::pin(exchange);
        let mut deadline = deadline;
        loop {
            match tokio::time::timeout_at(deadline, exchange.as_mut()).await {
                Err(elapsed) => {
                    let now = std::time::Instant::now();
                    match head_due(body_sent.as_deref().map(|b| b.progress()), now, api.timeout) {
                        Some(later) if later > now => {
                            deadline = tokio::time::Instant::from_std(later);
                        }
                        _ => break Err(elapsed),
                    }
                }
                done => break done,
            }
        }
    };
    let mut resp = match sent {
        Err(_) => return Err(GatewayError::UpstreamTimeout),
        // The client's request body stopped coming (server.rs puts a deadline on it).
        Ok(Err(e)) if crate::deadline::is_stalled(&e) => {
            return Err(GatewayError::ClientTooSlow);
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, api = %api.cfg.id, "upstream request failed");
            return Err(GatewayError::UpstreamUnreachable);
        }
        Ok(Ok(resp)) => resp,
    };
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let Some((key, client_side, slot)) = websocket
        && switched
    {
        if !headers::switched_to_websocket(resp.headers(), &key) {
            tracing::warn!(api = %api.cfg.id, "the upstream answered a WebSocket handshake without switching to WebSocket for it (Upgrade, Sec-WebSocket-Accept)");
            return Err(GatewayError::UpstreamUnreachable);
        }
        let limits = tunnel::Limits::new(api.timeout, record.expires_at, unix_now());
        let state = state.clone();
        let still_valid = move || {
            let state = state.clone();
            async move { token_still_opens(&state, &hash).await }
        };
        tokio::spawn(tunnel::run(
            client_side,
            hyper::upgrade::on(&mut resp),
            limits,
            slot,
            still_valid,
        ));
    } else if switched {
        // Nothing asked for it (or the client's connection cannot be handed over).
        tracing::warn!(api = %api.cfg.id, "the upstream switched protocols unasked");
        return Err(GatewayError::UpstreamUnreachable);
    }
    let out = resp.headers_mut();
    headers::rewrite_response(out);
    if switched {
        headers::set_websocket_upgrade(out);
    }
    set_rate_limit_headers(out, &decision);
    out.insert(headers::REQUEST_ID, request_id.clone());
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_head_is_due_a_timeout_after_the_body_was_sent() {
        use std::time::{Duration, Instant};
        use upstream::Progress::*;
        let (t0, timeout) = (Instant::now(), Duration::from_secs(30));
        let at = |s| t0 + Duration::from_secs(s);
        // No body: the deadline from arrival stands.
        assert_eq!(head_due(None, at(30), timeout), None);
        // Waiting for the client's next piece: asked again a timeout later.
        assert_eq!(
            head_due(Some(WaitingForClient), at(30), timeout),
            Some(at(60))
        );
        // Sent at 50 s: due at 80 s, whenever asked.
        assert_eq!(head_due(Some(Sent(at(50))), at(60), timeout), Some(at(80)));
        assert_eq!(
            head_due(Some(Sent(t0)), at(30), timeout),
            Some(at(30)),
            "sent at once: no later than the first deadline"
        );
        // The upstream stopped taking the body at 40 s: due at 70 s, not later.
        assert_eq!(
            head_due(Some(Taken(Some(at(40)))), at(60), timeout),
            Some(at(70))
        );
        assert_eq!(
            head_due(Some(Taken(Some(at(40)))), at(70), timeout),
            Some(at(70))
        );
        // Never taken a byte (no connection, a hung TLS handshake): the first deadline stands.
        assert_eq!(head_due(Some(Taken(None)), at(30), timeout), None);
    }
}
