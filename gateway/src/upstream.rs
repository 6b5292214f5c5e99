//! Upstream HTTP/1.1 connections, pooled per worker thread.
//!
//! hyper-util's pooled client spawns an extra task per request to hand the connection back and
//! locks a pool shared by every thread. Here a worker's upstream connections live in that
//! worker's pool, and a connection goes back the moment the exchange is complete (response body
//! read to the end, request body sent: `UpstreamBody`), so the next request on the same thread
//! reuses it without a task switch.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use crate::deadline::{Count, Deadline};
use crate::upstream_dns::GuardedResolver;

/// Idle connections older than this are closed instead of reused (upstreams commonly close
/// idle keep-alive connections after 60 s or more; reusing one they are closing fails the request).
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// At most this many idle connections per upstream per worker.
const MAX_IDLE_PER_UPSTREAM: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the upstream: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    #[error("upstream HTTP/1.1: {0}")]
    Http(#[from] hyper::Error),
    #[error("is not an absolute URL with a host")]
    NoAuthority,
    #[error("must be http or https")]
    Scheme,
    #[error(
        "is a link-local or cloud instance-metadata address, which the gateway never proxies to"
    )]
    MetadataAddress,
}

/// An upstream's pool key: a number per distinct (scheme, authority), assigned when a
/// configuration is compiled. Per request the pool then hashes and compares one integer, and
/// the key is copied, not an `Authority` (shared bytes) cloned and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key(u64);

impl Key {
    /// The same upstream spelled differently (host letter case) gets the same key. Keys are
    /// never freed: one entry (its authority and a number) per upstream any configuration of
    /// this process named, which stays small unless upstream names change all the time.
    fn new(https: bool, authority: &Authority) -> Key {
        static KEYS: std::sync::LazyLock<Mutex<std::collections::HashMap<(bool, String), u64>>> =
            std::sync::LazyLock::new(Default::default);
        let lower = authority.as_str().to_ascii_lowercase();
        let mut keys = KEYS.lock().unwrap_or_else(|p| p.into_inner());
        let next = keys.len() as u64;
        Key(*keys.entry((https, lower)).or_insert(next))
    }
}

/// One upstream connection: how to send on it, and its driver task.
pub struct Conn {
    sender: SendRequest<RequestBody>,
    driver: tokio::task::AbortHandle,
}

/// Ends a connection whose exchange was given up before the response head came (the proxy's
/// deadline passed, or its client went away): otherwise its driver would go on writing the
/// request body to an upstream that does not read it, or waiting for an answer, for ever,
/// holding the client's connection and body with it.
struct EndUnlessAnswered(Option<tokio::task::AbortHandle>);

impl EndUnlessAnswered {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for EndUnlessAnswered {
    fn drop(&mut self) {
        if let Some(driver) = self.0.take() {
            driver.abort();
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        !self.conn.sender.is_closed() && now.duration_since(self.since) < IDLE_TIMEOUT
    }
}

#[derive(Default)]
struct Pool {
    // Only this worker's thread touches the lock, except for a body finishing elsewhere.
    idle: Mutex<foldhash::HashMap<Key, Vec<Idle>>>,
}

impl Pool {
    /// The most recently used open connection to `key`; stale and closed ones are dropped.
    fn checkout(&self, key: &Key, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(entry) = list.pop() {
            if entry.usable(now) {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Closes every connection that is closed or idle too long; drops empty upstreams.
    fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain(|e| e.usable(now));
            !list.is_empty()
        });
    }

    /// Stale entries are left to `checkout` and the sweeper.
    fn put(&self, key: Key, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

thread_local! {
    static POOL: Arc<Pool> = Arc::new(Pool::default());
    static CONNECTOR: HttpsConnector<HttpConnector<GuardedResolver>> = connector();
}

/// Closes this thread's idle connections once they outlive the idle timeout, also when no
/// request comes to reuse or replace them (an Api removed, traffic stopped). One per worker.
pub fn spawn_idle_sweeper() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
        loop {
            tick.tick().await;
            POOL.with(|p| p.sweep(Instant::now()));
        }
    })
}

/// TCP (no Nagle) or TLS with the webpki roots; HTTP/1.1 only. Never to a metadata address.
fn connector() -> HttpsConnector<HttpConnector<GuardedResolver>> {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver::new());
    http.set_nodelay(true);
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Where an Api's requests go: parsed once per configuration, not per request.
#[derive(Clone)]
pub struct Target {
    key: Key,
    /// `scheme://authority/`, what the connector dials.
    dial: Uri,
    /// The upstream's own Host header.
    host: HeaderValue,
}

impl Target {
    /// The Host header the upstream expects (its authority).
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// From an absolute http(s) URL; its path is ignored here (see `ApiRuntime::base_path`).
    pub fn new(url: &Uri) -> Result<Target, UpstreamError> {
        let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
            return Err(UpstreamError::NoAuthority);
        };
        if *scheme != Scheme::HTTP && *scheme != Scheme::HTTPS {
            return Err(UpstreamError::Scheme);
        }
        // The connector dials an address literal without asking the resolver; a configuration
        // not compiled by this version (an older operator's) may still name one.
        let literal = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if literal
            .parse::<std::net::IpAddr>()
            .is_ok_and(gatehouse_crds::compile::is_metadata_ip)
        {
            return Err(UpstreamError::MetadataAddress);
        }
        let dial = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| UpstreamError::NoAuthority)?;
        Ok(Target {
            key: Key::new(*scheme == Scheme::HTTPS, authority),
            dial,
            host: HeaderValue::from_str(authority.as_str())
                .map_err(|_| UpstreamError::NoAuthority)?,
        })
    }
}

/// A new connection to `target`. With `upgrades`, a 101 answer hands the connection over
/// (`hyper::upgrade::on` on the response) instead of ending it.
async fn connect(target: &Target, upgrades: bool) -> Result<Conn, UpstreamError> {
    let connector = CONNECTOR.with(Clone::clone);
    let io = connector
        .oneshot(target.dial.clone())
        .await
        .map_err(UpstreamError::Connect)?;
    let (sender, conn) = http1::handshake(io).await?;
    let driver = tokio::spawn(async move {
        let ended = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(Conn {
        sender,
        driver: driver.abort_handle(),
    })
}

/// `req` taken apart, with the upstream's own Host unless it names one.
fn with_host(target: &Target, req: Request<Body>) -> (http::request::Parts, Body) {
    let (mut parts, body) = req.into_parts();
    if !parts.headers.contains_key(http::header::HOST) {
        parts
            .headers
            .insert(http::header::HOST, target.host.clone());
    }
    (parts, body)
}

/// Sends a WebSocket handshake (`headers::websocket_handshake`) on a connection of its own. If the
/// upstream switches protocols, that connection becomes the tunnel (`hyper::upgrade::on` on the
/// response); if it answers otherwise, the connection is closed after the response, never
/// pooled: the upstream may still take the rest of the stream as the new protocol.
pub async fn send_upgrade(
    target: &Target,
    req: Request<Body>,
    body_idle: Duration,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let (parts, body) = with_host(target, req);
    let req = Request::from_parts(
        parts,
        Watched {
            inner: body,
            at_end: MarkSent(None),
        },
    );
    let mut conn = Box::pin(connect(target, true)).await?;
    let unanswered = EndUnlessAnswered(Some(conn.driver.clone()));
    let resp = ready_and_send(&mut conn.sender, req)
        .await
        .map_err(|e| UpstreamError::Http(e.into_error()))?;
    unanswered.answered();
    let (parts, body) = resp.into_parts();
    let at_end = ReturnToPool {
        request_sent: None,
        back: None,
    };
    Ok(Response::from_parts(
        parts,
        Watched {
            inner: Deadline::new(body, body_idle, Count::Idle),
            at_end,
        },
    ))
}

/// Sends `req` (origin-form URI: path and query) to `target` on a pooled connection of this
/// thread, or a new one, with the upstream's Host unless the request has one. A request a pooled
/// connection could not take (closed under us) is retried once on a new connection; nothing of
/// it was sent. The response body fails (and the connection is dropped) when the upstream
/// sends nothing of it for `body_idle`.
/// `now`: about now (the proxy passes the instant the request arrived, not a new clock read).
/// `sent`: for a request with a body, where the instant its last byte went out is recorded
/// (`BodySent::for_body`).
pub async fn send(
    target: &Target,
    req: Request<Body>,
    body_idle: Duration,
    now: Instant,
    sent: Option<Arc<BodySent>>,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let (parts, body) = with_host(target, req);
    let req = Request::from_parts(
        parts,
        Watched {
            inner: body,
            at_end: MarkSent(sent.clone()),
        },
    );
    let pool = POOL.with(Arc::clone);
    let pooled = pool.checkout(&target.key, now);
    let reused = pooled.is_some();
    // connect's future is large (dialer, TLS, handshake: 2.4 KB) and rarely runs; boxed, it no
    // longer sizes this future, which every request moves several times.
    let mut conn = match pooled {
        Some(c) => c,
        None => Box::pin(connect(target, false)).await?,
    };
    let mut unanswered = EndUnlessAnswered(Some(conn.driver.clone()));
    let resp = match ready_and_send(&mut conn.sender, req).await {
        Ok(resp) => resp,
        Err(mut e) if reused => match e.take_message() {
            Some(req) => {
                conn = Box::pin(connect(target, false)).await?;
                unanswered.0 = Some(conn.driver.clone());
                ready_and_send(&mut conn.sender, req)
                    .await
                    .map_err(|e| UpstreamError::Http(e.into_error()))?
            }
            None => return Err(UpstreamError::Http(e.into_error())),
        },
        Err(e) => return Err(UpstreamError::Http(e.into_error())),
    };
    unanswered.answered();
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(
        parts,
        upstream_body(body, body_idle, sent, pool, target.key, conn),
    ))
}

async fn ready_and_send(
    sender: &mut SendRequest<RequestBody>,
    req: Request<RequestBody>,
) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>> {
    // A pooled connection becomes ready once its dispatcher has seen the previous exchange end.
    // If it closed instead, `try_send_request` hands the untouched request back for a retry.
    let _ = sender.ready().await;
    sender.try_send_request(req).await
}

/// A body passed through unchanged that tells its `AtEnd` when the last frame has been taken
/// (hyper stops polling a body that reports its end, so the last data frame counts, not only
/// the final `None`) or when the body failed.
pub struct Watched<B, E> {
    inner: B,
    at_end: E,
}

/// What a `Watched` body does at its end.
pub trait AtEnd: Unpin {
    fn ended(&mut self);
    fn failed(&mut self);
    /// Each poll of the body: whether it had nothing yet (`pending`). Most watchers ignore it.
    #[inline]
    fn polled(&mut self, _pending: bool) {}
}

impl<B, E> hyper::body::Body for Watched<B, E>
where
    B: hyper::body::Body + Unpin,
    E: AtEnd,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        this.at_end.polled(poll.is_pending());
        let frame = ready!(poll);
        match &frame {
            None => this.at_end.ended(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.at_end.ended(),
            Some(Ok(_)) => {}
            Some(Err(_)) => this.at_end.failed(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body as sent upstream. With a body it records when hyper took its last frame:
/// an upstream may answer before reading the whole request, and until hyper has sent the rest
/// the connection cannot take another request.
pub type RequestBody = Watched<Body, MarkSent>;

pub struct MarkSent(Option<Arc<BodySent>>);

/// How far hyper has got with sending a request body upstream, for the response-head deadline
/// (`proxy::head_due`) and for pooling (a connection is reused only once the body is all sent).
pub struct BodySent {
    base: Instant,
    /// Nanoseconds after `base`, plus one (0: not yet): when hyper took the body's last frame.
    done: AtomicU64,
    /// The same for the last time hyper asked for more of the body.
    asked: AtomicU64,
    /// Whether that ask found nothing yet: hyper is waiting for the client, not the other way.
    waiting_for_client: AtomicBool,
}

/// Where a request body is, as `BodySent::progress` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// All sent, at that instant.
    Sent(Instant),
    /// The upstream side wants more and the client has not sent it yet.
    WaitingForClient,
    /// Hyper last asked for more at that instant (None: never), and has the last piece in hand:
    /// the upstream is not taking it (or the connection is not up yet).
    Taken(Option<Instant>),
}

impl BodySent {
    /// One for a request that has a body to send, None for one without (nothing to wait for).
    pub fn for_body(body: &Body) -> Option<Arc<BodySent>> {
        (!hyper::body::Body::is_end_stream(body)).then(|| {
            Arc::new(BodySent {
                base: Instant::now(),
                done: AtomicU64::new(0),
                asked: AtomicU64::new(0),
                waiting_for_client: AtomicBool::new(false),
            })
        })
    }

    fn stamp(&self, at: &AtomicU64) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        at.store(nanos + 1, Ordering::Release);
    }

    fn read(&self, at: &AtomicU64) -> Option<Instant> {
        match at.load(Ordering::Acquire) {
            0 => None,
            n => self.base.checked_add(Duration::from_nanos(n - 1)),
        }
    }

    /// When the last frame was taken, once it has been.
    pub fn at(&self) -> Option<Instant> {
        self.read(&self.done)
    }

    pub fn progress(&self) -> Progress {
        if let Some(at) = self.at() {
            Progress::Sent(at)
        } else if self.waiting_for_client.load(Ordering::Acquire) {
            Progress::WaitingForClient
        } else {
            Progress::Taken(self.read(&self.asked))
        }
    }
}

impl AtEnd for MarkSent {
    fn ended(&mut self) {
        if let Some(sent) = &self.0 {
            sent.stamp(&sent.done);
        }
    }

    fn failed(&mut self) {}

    fn polled(&mut self, pending: bool) {
        if let Some(sent) = &self.0 {
            sent.stamp(&sent.asked);
            sent.waiting_for_client.store(pending, Ordering::Release);
        }
    }
}

/// The upstream's response body; returns its connection to the pool when read to the end and
/// the request body was all sent. Dropped early (client went away), or with the request body
/// still being sent, the connection is closed instead (after hyper finishes what it is sending).
pub type UpstreamBody = Watched<Deadline<Incoming>, ReturnToPool>;

pub struct ReturnToPool {
    request_sent: Option<Arc<BodySent>>,
    back: Option<(Arc<Pool>, Key, Conn)>,
}

impl AtEnd for ReturnToPool {
    fn ended(&mut self) {
        let request_done = self.request_sent.as_ref().is_none_or(|s| s.at().is_some());
        if let Some((pool, key, conn)) = self.back.take()
            && request_done
        {
            pool.put(key, conn);
        }
    }

    /// The connection is in an unknown state: never reuse it.
    fn failed(&mut self) {
        self.back = None;
    }
}

fn upstream_body(
    inner: Incoming,
    idle: Duration,
    request_sent: Option<Arc<BodySent>>,
    pool: Arc<Pool>,
    key: Key,
    conn: Conn,
) -> UpstreamBody {
    let mut at_end = ReturnToPool {
        request_sent,
        back: Some((pool, key, conn)),
    };
    // An empty body (204, Content-Length: 0) is never polled: release now.
    if hyper::body::Body::is_end_stream(&inner) {
        at_end.ended();
    }
    Watched {
        inner: Deadline::new(inner, idle, Count::Idle),
        at_end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const IDLE: Duration = Duration::from_secs(30);

    /// `send` to the test upstream at `addr`, now.
    async fn send_to(
        addr: std::net::SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let sent = BodySent::for_body(req.body());
        send(&target(addr), req, IDLE, Instant::now(), sent).await
    }

    /// A test upstream: `handle` runs for every accepted connection; the counter says how many.
    async fn serve_each<F, Fut>(handle: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handle(tcp));
            }
        });
        (addr, accepted)
    }

    /// A hyper HTTP/1.1 upstream (keep-alive unless `keep_alive` is false).
    async fn hyper_upstream(keep_alive: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        serve_each(move |tcp| async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let body = match req.uri().path() {
                    "/empty" => String::new(),
                    "/host" => format!("host={:?}", req.headers().get(http::header::HOST)),
                    p => format!("path={p}"),
                };
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(body),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(keep_alive)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        })
        .await
    }

    async fn upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        hyper_upstream(true).await
    }

    fn target(addr: std::net::SocketAddr) -> Target {
        Target::new(&format!("http://{addr}/ignored").parse().unwrap()).unwrap()
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = upstream().await;
        for i in 0..5 {
            let resp = send_to(addr, get(&format!("/r{i}?q=1"))).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("path=/r{i}"));
        }
        let resp = send_to(addr, get("/host")).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("host=Some(\"{addr}\")"));
        // Empty bodies are never polled by a server: the connection must come back anyway.
        for _ in 0..3 {
            let resp = send_to(addr, get("/empty")).await.unwrap();
            assert!(hyper::body::Body::is_end_stream(resp.body()));
            drop(resp);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_still_being_read_is_not_shared_and_a_dropped_one_is_not_reused() {
        let (addr, accepted) = upstream().await;
        let first = send_to(addr, get("/a")).await.unwrap();
        // `first`'s body is unread: the second request needs its own connection.
        let second = send_to(addr, get("/b")).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let body = second.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "path=/b");
        drop(first);
        // The connection of the finished body is reused; the dropped one is gone.
        let third = send_to(addr, get("/c")).await.unwrap();
        let body = third.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "path=/c");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced() {
        // An upstream that answers one request per connection, then closes it.
        let (addr, accepted) = hyper_upstream(false).await;
        for _ in 0..4 {
            let resp = send_to(addr, get("/")).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "path=/");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_connection_still_sending_the_request_body_is_not_reused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Answers as soon as it has the headers, then reads (and ignores) whatever follows.
        let (addr, accepted) = serve_each(|mut tcp| async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
            while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        // A request body that sends one chunk, then waits for us.
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        tx.send(bytes::Bytes::from_static(b"first")).await.unwrap();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
        });
        let upload = Request::post("/upload")
            .header(http::header::CONTENT_LENGTH, "10")
            .body(Body::from_stream(stream))
            .unwrap();
        let resp = send_to(addr, upload).await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        // The first connection is still owed 5 bytes: the next request must not wait for it.
        let next = tokio::time::timeout(Duration::from_secs(5), send_to(addr, get("/")))
            .await
            .expect("a request waited behind an unfinished upload");
        assert_eq!(next.unwrap().status(), 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(tx);
    }

    #[tokio::test]
    async fn idle_connections_are_swept() {
        let (addr, _) = upstream().await;
        let resp = send_to(addr, get("/x")).await.unwrap();
        resp.into_body().collect().await.unwrap();
        let pool = POOL.with(Arc::clone);
        let key = target(addr).key;
        assert_eq!(pool.idle.lock().unwrap()[&key].len(), 1);
        pool.sweep(Instant::now());
        assert_eq!(pool.idle.lock().unwrap()[&key].len(), 1, "fresh ones stay");
        pool.sweep(Instant::now() + IDLE_TIMEOUT);
        assert!(!pool.idle.lock().unwrap().contains_key(&key));
    }

    #[test]
    fn targets_need_an_absolute_http_url() {
        let t = |u: &str| Target::new(&u.parse().unwrap());
        assert!(matches!(t("/relative"), Err(UpstreamError::NoAuthority)));
        assert!(matches!(
            t("ftp://files.example"),
            Err(UpstreamError::Scheme)
        ));
        let ok = t("https://api.example:8443/base").unwrap();
        assert_eq!(ok.host, "api.example:8443");
        assert_eq!(ok.dial, "https://api.example:8443/");
        for metadata in [
            "http://169.254.169.254/latest",
            "http://[fe80::1]:8080/",
            "http://[::ffff:169.254.169.254]/",
        ] {
            assert!(
                matches!(t(metadata), Err(UpstreamError::MetadataAddress)),
                "{metadata}"
            );
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_a_metadata_address_is_never_dialed() {
        // Not an address literal to the connector, so it asks the resolver, whose getaddrinfo
        // reads it as 169.254.169.254.
        let target = Target::new(&"http://0xA9FEA9FE/".parse().unwrap()).unwrap();
        let e = send(
            &target,
            get("/latest/meta-data"),
            IDLE,
            Instant::now(),
            None,
        )
        .await
        .err()
        .expect("refused");
        let UpstreamError::Connect(cause) = &e else {
            panic!("{e}")
        };
        let mut text = cause.to_string();
        let mut source = cause.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        assert!(text.contains("metadata"), "{text}");
    }

    #[test]
    fn one_upstream_spelled_two_ways_shares_a_pool_entry() {
        let key = |u: &str| Target::new(&u.parse().unwrap()).unwrap().key;
        let (a, b) = (
            key("http://API.example:8080/"),
            key("http://api.example:8080/x"),
        );
        assert_eq!(a, b);
        // Scheme and port still tell upstreams apart.
        assert!(a != key("https://api.example:8080/"));
        assert!(a != key("http://api.example:8081/"));
        let pool = Pool::default();
        let mut map = pool.idle.lock().unwrap();
        map.insert(a, Vec::new());
        assert!(map.contains_key(&b));
    }

    #[tokio::test]
    async fn unreachable_upstream_is_an_error_not_a_hang() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            send_to(addr, get("/")).await,
            Err(UpstreamError::Connect(_))
        ));
    }
}
