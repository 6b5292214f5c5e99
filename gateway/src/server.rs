//! Wires the routers and runs the listeners until SIGTERM/SIGINT, then drains in-flight requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use http::{HeaderValue, Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::deadline::{Count, Deadline, WriteDeadline};
use crate::drain::Drain;
use crate::oauth;
use crate::proxy::{self, ProxyBody};
use crate::state::AppState;
use crate::store::unix_now;

/// Slow clients get this long to send a request's headers (slowloris), to send the gateway's
/// forms whole, between two pieces of a proxied request body, and to take a piece of a response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The admin port serves three cheap GETs (metrics, readiness); beyond this many connections at
/// once, new ones wait, so it can never use up the process's file descriptors.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// The largest body the gateway's own endpoints read (forms, token requests).
pub const FORM_BODY_LIMIT: usize = 16 * 1024;

/// The public router: OAuth endpoints first, everything else is proxied by pathPrefix.
pub fn router(state: Arc<AppState>) -> Router {
    // The sign-in pages: a POST that fails is answered with a 303 to its error page's address.
    let pages = Router::new()
        .route(
            "/login",
            get(oauth::login::login_page).post(oauth::login::login_post),
        )
        .route(
            "/signup",
            get(oauth::login::signup_page).post(oauth::login::signup_post),
        )
        .route(
            "/consent",
            get(oauth::login::consent_page).post(oauth::login::consent_post),
        )
        .route(
            "/logout",
            get(oauth::login::logout_page).post(oauth::login::logout_post),
        )
        .route_layer(axum::middleware::from_fn(oauth::error_pages::after_post))
        .route("/oauth2/error", get(oauth::error_pages::show));
    Router::new()
        .route("/oauth2/authorize", get(oauth::authorize::handle))
        .route("/oauth2/token", post(oauth::token::handle))
        .route("/oauth2/revoke", post(oauth::revoke::handle))
        .route("/oauth2/introspect", post(oauth::introspect::handle))
        .route("/oauth2/userinfo", get(oauth::userinfo::handle))
        .route(
            "/.well-known/oauth-authorization-server",
            get(oauth::metadata::handle),
        )
        .merge(pages)
        .fallback(proxy::handle)
        // The gateway's own forms and token requests are a few hundred bytes (axum's default
        // allows 2 MB). Proxied bodies are not read through extractors: no limit applies.
        .layer(axum::extract::DefaultBodyLimit::max(FORM_BODY_LIMIT))
        .with_state(state)
}

/// Periodic housekeeping: expired tokens, idle rate-limit keys.
pub fn spawn_janitor(state: Arc<AppState>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match state.store.purge_expired(unix_now()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(purged = n, "expired tokens removed"),
                Err(e) => tracing::warn!(error = %e, "purge failed"),
            }
        }
    })
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: draining in-flight requests");
}

/// Serves the admin router until SIGTERM/SIGINT, with the public listener's client deadlines
/// (axum::serve gives hyper no timer, which silently turns its header deadline off) and at most
/// [`MAX_ADMIN_CONNECTIONS`] connections at once.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) {
    serve_until(listener, app, CLIENT_TIMEOUT, shutdown_signal()).await;
}

async fn serve_until(
    listener: tokio::net::TcpListener,
    app: Router,
    client_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let builder = http1_builder(client_timeout);
    let graceful = Drain::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut stop = std::pin::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let Some(tcp) = accept(&listener, &mut stop).await else {
            break;
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection(client_io(tcp.0, client_timeout), svc);
        let conn = graceful.watch(conn, |c| c.graceful_shutdown());
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.stop();
    graceful.drained().await;
}

/// HTTP/1.1 with a deadline for each request's headers, which also covers a connection that
/// never sends anything and idle keep-alive connections.
/// hyper's own HTTP/1 server, not hyper-util's auto builder: even limited to HTTP/1 that one
/// wraps every connection's reads (`Rewind`) and adds its own state machine per poll.
fn http1_builder(client_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(client_timeout)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES);
    builder
}

/// Request line plus headers: larger gets 431 (hyper checks between reads, so up to about twice
/// this may pass). hyper's default (about 400 KB) let one request make the header rewrite walk
/// 200,000 Connection tokens; nginx allows 32 KB.
pub const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// The next connection, or None once `stop` fired.
async fn accept(
    listener: &tokio::net::TcpListener,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => return Some(c),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = stop.as_mut() => return None,
        }
    }
}

/// A client connection for hyper: Nagle off (responses are written whole; it would only delay
/// the last segment), writes that fail when the client stops reading.
fn client_io(
    tcp: tokio::net::TcpStream,
    client_timeout: Duration,
) -> WriteDeadline<TokioIo<tokio::net::TcpStream>> {
    let _ = tcp.set_nodelay(true);
    WriteDeadline::new(TokioIo::new(tcp), client_timeout)
}

/// What the public listener serves: the gateway's own pages and endpoints through the axum
/// router, every other path straight to the proxy (no routing table, no boxed response body).
#[derive(Clone)]
pub struct Public {
    router: Router,
    proxy: Option<Arc<AppState>>,
    client_timeout: Duration,
}

impl Public {
    pub fn new(state: Arc<AppState>) -> Public {
        Public {
            router: router(state.clone()),
            proxy: Some(state),
            client_timeout: CLIENT_TIMEOUT,
        }
    }

    /// Every request through `router`.
    pub fn router_only(router: Router) -> Public {
        Public {
            router,
            proxy: None,
            client_timeout: CLIENT_TIMEOUT,
        }
    }

    /// How long a client may take to send a request's headers, a form's body, the next piece of
    /// a proxied body, or to take the next piece of a response, before its connection is closed.
    pub fn client_timeout(mut self, timeout: Duration) -> Public {
        self.client_timeout = timeout;
        self
    }

    async fn call(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        peer_ip: &HeaderValue,
    ) -> Response<ProxyBody> {
        let proxied = self.proxy.is_some() && !served_by_gateway(req.uri().path());
        // Forms are small: whole within the deadline. Proxied bodies may be long uploads: no
        // pause longer than it. A request without a body (most) gets no wrapper.
        let count = if proxied { Count::Idle } else { Count::Total };
        let limit = self.client_timeout;
        let mut req = req.map(|b| {
            if hyper::body::Body::is_end_stream(&b) {
                // Known empty: `Body::empty()` boxes a zero-sized body, which allocates nothing
                // (boxing `Incoming` cost an allocation per proxied GET).
                Body::empty()
            } else {
                Body::new(Deadline::new(b, limit, count))
            }
        });
        if let Some(state) = &self.proxy
            && proxied
        {
            return proxy::serve(state, req, peer_ip).await;
        }
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = self.router.clone();
        match tower::Service::call(&mut router, req).await {
            Ok(resp) => resp.map(Either::Right),
            Err(never) => match never {},
        }
    }
}

/// True for paths under the prefixes no Api may use (the router's routes live there).
fn served_by_gateway(path: &str) -> bool {
    let first = path.strip_prefix('/').map_or("", |p| {
        // A byte scan: `split` sets up a char searcher on every proxied request.
        p.as_bytes()
            .iter()
            .position(|&b| b == b'/')
            .map_or(p, |end| &p[..end])
    });
    gatehouse_crds::compile::RESERVED_PREFIXES
        .iter()
        .any(|r| r[1..] == *first)
}

/// Binds `addr` once per worker with SO_REUSEPORT (Linux spreads new connections across the
/// sockets). With port 0 every socket takes the port the first one got.
pub fn bind_workers(
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(workers.max(1));
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        #[cfg(target_os = "linux")]
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Serves the public router with one single-threaded runtime per listener, each on its own OS
/// thread. A request is accepted, checked, proxied and answered on one thread: with tokio's
/// work-stealing runtime, perf showed 23% of the gateway's CPU in cross-thread wake-ups.
/// Returns when `stop` fires and every worker has drained its in-flight requests.
pub async fn serve_workers(
    listeners: Vec<std::net::TcpListener>,
    app: Public,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let (app, mut rx) = (app.clone(), rx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("gatehouse-worker-{i}"))
            .spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let stop = async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    };
                    serve_public(listener, app, stop).await;
                    Ok(())
                })
            })?;
        threads.push(thread);
    }
    drop(rx);
    stop.await;
    let _ = tx.send(true);
    tokio::task::spawn_blocking(move || {
        let mut result = Ok(());
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(std::io::Error::other("a worker thread panicked")),
            }
        }
        result
    })
    .await
    .map_err(std::io::Error::other)?
}

/// One worker's accept loop: HTTP/1.1 with a header-read deadline that also covers a connection
/// that never sends anything and idle keep-alive connections; on `stop` it stops accepting and
/// waits for in-flight requests (idle keep-alive connections are closed). HTTP/1.1 only: h2c
/// would need its own idle deadline, and ingresses and mobile clients reach us over HTTP/1.1
/// (TLS, and with it HTTP/2, ends at the ingress).
async fn serve_public(
    listener: tokio::net::TcpListener,
    app: Public,
    stop: impl Future<Output = ()>,
) {
    let _sweeper = crate::upstream::spawn_idle_sweeper();
    let builder = http1_builder(app.client_timeout);
    let graceful = Drain::new();
    let app = Arc::new(app);
    let mut stop = std::pin::pin!(stop);
    while let Some((tcp, peer)) = accept(&listener, &mut stop).await {
        let io = client_io(tcp, app.client_timeout);
        let conn_ctx = Arc::new((app.clone(), peer, proxy::peer_header(Some(peer.ip()))));
        let svc = hyper::service::service_fn(move |req| {
            let ctx = conn_ctx.clone();
            async move {
                let (app, peer, peer_ip) = &*ctx;
                Ok::<_, Infallible>(app.call(req, *peer, peer_ip).await)
            }
        });
        // With upgrades: a WebSocket handshake the upstream accepts hands the connection over
        // to `tunnel::run`. Requests without an Upgrade header cost nothing more.
        let conn = builder.serve_connection(io, svc).with_upgrades();
        let conn = graceful.watch(conn, |c| c.graceful_shutdown());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.stop();
    graceful.drained().await;
    // Token and revocation work whose client went away during the drain.
    crate::oauth::finish_tasks().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_paths_go_to_the_router_everything_else_to_the_proxy() {
        for p in [
            "/oauth2/authorize",
            "/oauth2/token",
            "/oauth2/revoke",
            "/oauth2/introspect",
            "/oauth2/userinfo",
            "/.well-known/oauth-authorization-server",
            "/login",
            "/signup",
            "/consent",
            "/logout",
            "/oauth2/error",
            "/oauth2",
        ] {
            assert!(served_by_gateway(p), "{p}");
        }
        for p in [
            "/",
            "",
            "/api/x",
            "/oauth2x/token",
            "/logins",
            "/api/oauth2/token",
        ] {
            assert!(!served_by_gateway(p), "{p}");
        }
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listeners = bind_workers("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let app = Public::router_only(Router::new().route("/", get(|| async { "ok" })))
            .client_timeout(Duration::from_millis(300));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve_workers(listeners, app, async move {
            let _ = stop_rx.await;
        }));
        // Connected, never a byte: closed too.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "silent connection still open after 10 s");
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        // The server answers 408 or just closes; either way the read ends well before 10 s.
        let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "connection still open after 10 s");
        assert!(started.elapsed() >= Duration::from_millis(250));
        let text = String::from_utf8_lossy(&buf);
        assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
        stop_tx.send(()).unwrap();
        served.await.unwrap().unwrap();
    }

    /// A public listener on a free port serving `router` with 300 ms client deadlines.
    fn serve_router(
        router: Router,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listeners = bind_workers("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let app = Public::router_only(router).client_timeout(Duration::from_millis(300));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve_workers(listeners, app, async move {
            let _ = stop_rx.await;
        }));
        (addr, stop_tx, served)
    }

    #[tokio::test]
    async fn a_form_body_that_stalls_or_trickles_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let router = Router::new().route(
            "/oauth2/token",
            post(|body: bytes::Bytes| async move { body.len().to_string() }),
        );
        let (addr, stop, served) = serve_router(router);
        let head =
            b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\ncontent-length: 1000\r\n\r\ngrant_type=";
        // Stalled: the headers and 11 bytes, then nothing.
        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        stalled.write_all(head).await.unwrap();
        // Trickled: a byte every 100 ms never pauses for 300 ms, but the form must be whole by then.
        let mut trickled = tokio::net::TcpStream::connect(addr).await.unwrap();
        trickled.write_all(head).await.unwrap();
        let trickle = tokio::spawn(async move {
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if trickled.write_all(b"x").await.is_err() {
                    break;
                }
            }
            let mut buf = Vec::new();
            let _ = trickled.read_to_end(&mut buf).await;
            (started.elapsed(), buf)
        });
        let mut buf = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "connection with a stalled body still open after 10 s"
        );
        let text = String::from_utf8_lossy(&buf);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
        let (took, buf) = trickle.await.unwrap();
        assert!(
            took < Duration::from_secs(5),
            "a trickled form kept its connection {took:?}"
        );
        let text = String::from_utf8_lossy(&buf);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
        stop.send(()).unwrap();
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_its_response_is_disconnected() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SIZE: usize = 64 << 20; // more than both sockets' buffers hold
        let router = Router::new().route("/big", get(|| async { vec![b'x'; SIZE] }));
        let (addr, stop, served) = serve_router(router);
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Not reading for longer than the deadline: the gateway gives up on the connection.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "the connection did not end");
        assert!(
            got < SIZE,
            "the whole response arrived after the client had stalled for 2 s"
        );
        stop.send(()).unwrap();
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_admin_listener_closes_silent_connections() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", get(|| async { "ok" }));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve_until(
            listener,
            app,
            Duration::from_millis(300),
            async move {
                let _ = stop_rx.await;
            },
        ));
        assert_eq!(
            tokio::task::spawn_blocking(move || gatehouse_tests::procs::http_status(
                addr, "/healthz"
            ))
            .await
            .unwrap(),
            Some(200)
        );
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "silent admin connection still open after 10 s"
        );
        stop_tx.send(()).unwrap();
        served.await.unwrap();
    }

    #[test]
    fn workers_share_one_port_even_when_asked_for_port_zero() {
        let listeners = bind_workers("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(listeners.len(), 3);
        let port = listeners[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for l in &listeners {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
    }

    #[tokio::test]
    async fn every_worker_answers_and_all_stop_together() {
        let listeners = bind_workers("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let app = Public::router_only(Router::new().route("/", get(|| async { "ok" })));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve_workers(listeners, app, async move {
            let _ = stop_rx.await;
        }));
        // Many fresh connections: the kernel spreads them over both sockets.
        for _ in 0..20 {
            let status =
                tokio::task::spawn_blocking(move || gatehouse_tests::procs::http_status(addr, "/"))
                    .await
                    .unwrap();
            assert_eq!(status, Some(200));
        }
        stop_tx.send(()).unwrap();
        served.await.unwrap().unwrap();
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "nothing listens after stop"
        );
    }
}
