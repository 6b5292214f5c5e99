//! WebSocket handshakes through the gateway's real listener: checked like any request (token,
//! rate limit, identity headers), then tunnelled byte for byte to an upstream that switched
//! protocols; other upgrades are never passed on.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use gatehouse_gateway::server::Public;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Sec-WebSocket-Accept for `key` (RFC 6455 4.2.2), computed here, apart from the gateway's.
fn accept_for(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::Digest;
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// What the test upstream saw: each request's path and headers, and how many connections it
/// accepted.
struct Seen {
    requests: mpsc::UnboundedReceiver<(String, HeaderMap)>,
    accepted: Arc<AtomicUsize>,
}

/// An upstream that switches to WebSocket when asked (then echoes every byte); on paths ending
/// in `/refuse` it declines (403), in `/badaccept` it switches without proving it read the key,
/// in `/otherproto` it switches to h2c; anything else gets 200 `plain`.
async fn upstream() -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let _ = tx.send((req.uri().path().to_string(), req.headers().clone()));
                let path = req.uri().path().to_string();
                let reply = |status: u16, body: &'static str| {
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from_static(body.as_bytes())))
                        .unwrap()
                };
                let switch = |upgrade: &str, accept: &str| {
                    Response::builder()
                        .status(101)
                        .header("upgrade", upgrade)
                        .header("connection", "Upgrade")
                        .header("sec-websocket-accept", accept)
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                };
                let asked = req
                    .headers()
                    .get("upgrade")
                    .is_some_and(|v| v == "websocket");
                let resp = if path.ends_with("/refuse") {
                    reply(403, "no")
                } else if asked && path.ends_with("/badaccept") {
                    switch("websocket", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                } else if asked && path.ends_with("/otherproto") {
                    switch("h2c", ACCEPT)
                } else if asked {
                    let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
                    let switched = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(switched.await.unwrap());
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = io.read(&mut buf).await
                            && n > 0
                        {
                            io.write_all(&buf[..n]).await.unwrap();
                        }
                    });
                    switch("websocket", &accept_for(&key))
                } else {
                    reply(200, "plain")
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (
        addr,
        Seen {
            requests: rx,
            accepted,
        },
    )
}

/// Sends a handshake for `path` asking for `upgrade`; returns the connection and the response
/// head (status line and headers, lowercased).
async fn handshake(
    gw: SocketAddr,
    path: &str,
    token: Option<&str>,
    upgrade: &str,
) -> (TcpStream, String) {
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    handshake_with(gw, path, token, &format!("Upgrade: {upgrade}\r\n{key}")).await
}

/// `handshake` with `extra` header lines (each ending in CRLF) instead of Upgrade and the key.
async fn handshake_with(
    gw: SocketAddr,
    path: &str,
    token: Option<&str>,
    extra: &str,
) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(gw).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: gw.test\r\n{auth}Connection: Upgrade\r\n{extra}Sec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
            .await
            .expect("a response head")
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    (tcp, String::from_utf8(head).unwrap().to_ascii_lowercase())
}

async fn echo(tcp: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    tcp.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut got))
        .await
        .expect("the echo")
        .unwrap();
    got
}

#[tokio::test]
async fn a_checked_handshake_becomes_a_tunnel_and_nothing_else_does() {
    let (up, mut seen) = upstream().await;
    // 6 per minute: the handshakes below that reach the limiter use them up.
    let yaml = manifests(&format!("http://{up}"), 6).replace("per: second", "per: minute");
    let h = Harness::with_manifests(yaml, up).await;
    let token = h.cc_token("svc-mobile", Some("profile")).await;
    let listening = Listening::start(Public::new(h.state.clone()));
    let gw = listening.addr;

    // Without a token: 401, and the upstream hears nothing.
    let (_, head) = handshake(gw, "/mobile/ws", None, "websocket").await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(seen.requests.try_recv().is_err());

    // With one (1): switched, with the upstream's accept key and the gateway's headers; the
    // client's own identity headers do not pass.
    assert_eq!(
        accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
        ACCEPT,
        "RFC 6455 1.3"
    );
    let key = "x3JJHMbDL1EzLkh9GBhXDw==";
    let spoof = format!(
        "Upgrade: websocket\r\nSec-WebSocket-Key: {key}\r\nX-Authenticated-UserId: admin\r\nX-Api-Plan: gold\r\n"
    );
    let (mut tunnel, head) = handshake_with(gw, "/mobile/ws", Some(&token), &spoof).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    let accept = accept_for(key.as_bytes()).to_ascii_lowercase();
    assert!(
        head.contains(&format!("sec-websocket-accept: {accept}")),
        "{head}"
    );
    assert!(head.contains("\r\nratelimit-limit: 6\r\n"), "{head}");
    assert!(head.contains("\r\nx-request-id: "), "{head}");
    let (path, headers) = seen.requests.recv().await.unwrap();
    assert_eq!(path, "/ws");
    assert_eq!(headers["x-client-id"], "svc-mobile");
    assert_eq!(headers["x-authenticated-scope"], "profile");
    assert_eq!(headers["x-application-id"], "t/svc");
    assert_eq!(headers["x-api-plan"], "basic");
    assert!(!headers.contains_key("x-authenticated-userid"), "spoofed");
    assert!(!headers.contains_key("authorization"), "the token stays");
    assert_eq!(headers["upgrade"], "websocket");
    assert_eq!(headers["connection"], "upgrade");
    assert_eq!(headers["sec-websocket-key"], key);
    assert_eq!(headers["sec-websocket-version"], "13");
    // Bytes both ways, several times, on the switched connection.
    assert_eq!(echo(&mut tunnel, b"hello").await, b"hello");
    let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    assert_eq!(echo(&mut tunnel, &big).await, big);

    // (2) An upstream that declines answers as usual, and nothing is switched.
    let (mut declined, head) = handshake(gw, "/mobile/refuse", Some(&token), "websocket").await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(!head.contains("upgrade"), "{head}");
    let mut body = [0u8; 2];
    declined.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"no");
    seen.requests.recv().await.unwrap();

    // (3, 4) A 101 without the proof that the upstream read this handshake's key, or naming
    // another protocol: 502, no tunnel.
    for path in ["/mobile/badaccept", "/mobile/otherproto"] {
        let (_, head) = handshake(gw, path, Some(&token), "websocket").await;
        assert!(head.starts_with("http/1.1 502"), "{path}: {head}");
        seen.requests.recv().await.unwrap();
    }

    // (5) Other protocols are not passed on: h2c arrives as a plain request.
    let (_, head) = handshake(gw, "/mobile/h2c", Some(&token), "h2c").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (_, headers) = seen.requests.recv().await.unwrap();
    assert!(!headers.contains_key("upgrade") && !headers.contains_key("connection"));
    // (6) Nor is a WebSocket handshake without a proper key.
    let (_, head) =
        handshake_with(gw, "/mobile/nokey", Some(&token), "Upgrade: websocket\r\n").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (_, headers) = seen.requests.recv().await.unwrap();
    assert!(!headers.contains_key("upgrade"));
    // Each handshake had a connection of its own, and the declined one was not reused for
    // the plain requests (which share one pooled connection).
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 5);

    // While this gateway holds as many tunnels as it may, a handshake gets 503 and spends no
    // quota.
    let spare = h.state.websocket_slots.available_permits();
    h.state.websocket_slots.forget_permits(spare);
    let (_, head) = handshake(gw, "/mobile/ws", Some(&token), "websocket").await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(seen.requests.try_recv().is_err());
    h.state.websocket_slots.add_permits(spare);

    // The handshake counts against the plan like any request: 6 counted above.
    let (_, head) = handshake(gw, "/mobile/ws", Some(&token), "websocket").await;
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("\r\nretry-after: "), "{head}");
    assert!(seen.requests.try_recv().is_err());

    // The first tunnel is still open; closing it gives its slot back.
    assert_eq!(echo(&mut tunnel, b"still here").await, b"still here");
    let before = h.state.websocket_slots.available_permits();
    drop(tunnel);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.state.websocket_slots.available_permits() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was not given back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    listening.stop().await;
}

/// What an open tunnel asks every 30 s (`tunnel::RECHECK`): a live token of a subscription
/// still configured for its Api keeps it; a revoked token, or a removed subscription, ends it.
#[tokio::test]
async fn a_tunnel_recheck_sees_revocations_and_removed_subscriptions() {
    use gatehouse_gateway::proxy::token_still_opens;
    use gatehouse_gateway::tokens;
    let h = Harness::new(100).await;
    let revoked = h.cc_token("svc-mobile", None).await;
    let kept = h.cc_token("svc-mobile", None).await;
    assert!(token_still_opens(&h.state, &tokens::hash(&revoked)).await);
    let resp = h
        .call(
            Request::post("/oauth2/revoke")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("authorization", basic("svc-mobile", SECRET))
                .body(axum::body::Body::from(format!("token={revoked}")))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(!token_still_opens(&h.state, &tokens::hash(&revoked)).await);
    assert!(token_still_opens(&h.state, &tokens::hash(&kept)).await);
    assert!(!token_still_opens(&h.state, &tokens::hash("never-issued")).await);

    // The subscription leaves the manifests: its tokens no longer open the Api.
    h.remove_subscription("svc-mobile");
    assert!(!token_still_opens(&h.state, &tokens::hash(&kept)).await);
}
