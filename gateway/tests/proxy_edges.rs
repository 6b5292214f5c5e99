//! Proxy edge cases found in review: path spellings a backend resolves differently, the
//! forwarded scheme, the session cookie, and upstream responses that are stalled, conflicting
//! or carry their own rate-limit headers.

mod common;

use std::time::Duration;

use axum::body::Body;
use common::*;
use http_body_util::BodyExt;

/// Two Apis on one backend, a parent and a child prefix, both forwarding the full path
/// (stripPrefix: false), as a Kong user would set up "/shop" (cheap plan) and "/shop/admin".
fn nested_manifests(upstream: &str) -> String {
    format!(
        r#"
apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: basic, namespace: t}}
spec: {{rateLimits: [{{requests: 100, per: second}}]}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: shop, namespace: t}}
spec:
  pathPrefix: /shop
  upstream: {{url: "{upstream}", stripPrefix: false}}
  plans: [basic]
  auth: {{grants: [client_credentials]}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: shop-admin, namespace: t}}
spec:
  pathPrefix: /shop/admin
  upstream: {{url: "{upstream}", stripPrefix: false}}
  plans: [basic]
  auth: {{grants: [client_credentials]}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: svc, namespace: t}}
spec: {{clientType: confidential}}
---
apiVersion: v1
kind: Secret
metadata: {{name: svc-secret, namespace: t, labels: {{gatehouse.dev/client-secret: "true"}}}}
stringData: {{clientSecret: "{SECRET}"}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: svc-mobile, namespace: t}}
spec: {{application: svc, api: shop, plan: basic, clientId: svc-mobile, clientSecretRef: {{name: svc-secret}}}}
"#
    )
}

/// The path an Api is chosen by must be the path the backend will serve. Spellings that common
/// backends resolve to /shop/admin/... (nginx and Go merge or redirect `//`; WSGI, Go 1.22
/// ServeMux, nginx decode `%61`; Spring/Tomcat drop `;params`) are not routed to /shop and
/// forwarded as sent: they are refused (400), or reach /shop/admin, where a /shop token is 401.
#[tokio::test]
async fn paths_a_backend_normalizes_cannot_reach_a_longer_prefix_under_a_shorter_one() {
    let upstream = gatehouse_tests::echo::spawn().await;
    let h =
        Harness::with_manifests(nested_manifests(&format!("http://{upstream}")), upstream).await;
    let token = h.cc_token("svc-mobile", None).await;
    // Control: the direct path is refused for a /shop token.
    let direct = h
        .call(
            get("/shop/admin/users", Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(direct.status(), 401);
    for path in [
        "/shop//admin/users",
        "/shop/%61dmin/users",
        "/shop/%61%64%6d%69%6e/users",
        "/shop/admin;x/users",
        "/shop/admin%2Fusers",
    ] {
        let resp = h
            .call(get(path, Some(&token)).body(Body::empty()).unwrap())
            .await;
        assert!(
            resp.status() == 400 || resp.status() == 401,
            "{path}: {} (forwarded to the backend under the /shop plan)",
            resp.status()
        );
    }
    // Ordinary escapes still work.
    let resp = h
        .call(
            get("/shop/items/a%20b", Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
}

/// Two Host headers are refused (RFC 9112 3.2): a proxy in front may have chosen its route by
/// the other one than the gateway would.
#[tokio::test]
async fn a_request_with_two_host_headers_is_refused() {
    let upstream = gatehouse_tests::echo::spawn().await;
    let h = Harness::with_manifests(manifests(&format!("http://{upstream}"), 100), upstream).await;
    let token = h.cc_token("svc-mobile", None).await;
    let one = h
        .call(
            get("/mobile/hello", Some(&token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(one.status(), 200);
    let mut req = get("/mobile/hello", Some(&token))
        .body(Body::empty())
        .unwrap();
    req.headers_mut().append(
        http::header::HOST,
        http::HeaderValue::from_static("gw.test"),
    );
    req.headers_mut().append(
        http::header::HOST,
        http::HeaderValue::from_static("other.test"),
    );
    let two = h.call(req).await;
    assert_eq!(two.status(), 400);
    let body = two.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("more than one Host"),
        "{body:?}"
    );
}

/// TRACE would echo the request (cookies, the gateway's identity headers) back to a page's
/// script, CONNECT would open a tunnel from the gateway: both are refused before any check,
/// with the methods that are proxied in `Allow`.
#[tokio::test]
async fn trace_and_connect_are_not_proxied() {
    let upstream = gatehouse_tests::echo::spawn().await;
    let h = Harness::with_manifests(manifests(&format!("http://{upstream}"), 100), upstream).await;
    let token = h.cc_token("svc-mobile", None).await;
    for (method, uri) in [("TRACE", "/mobile/hello"), ("CONNECT", "gw.test:443")] {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let resp = h.call(req).await;
        assert_eq!(resp.status(), 405, "{method}");
        assert_eq!(
            resp.headers()["allow"],
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        );
        let v = json(resp).await;
        assert_eq!(v["error"], "method_not_allowed", "{method}");
    }
}

/// Behind the TLS-terminating ingress the README prescribes, the issuer is https: the backend
/// is told the client used https (it builds absolute URLs and redirects from it), whatever the
/// client claimed.
#[tokio::test]
async fn x_forwarded_proto_follows_the_public_url() {
    for (issuer, claimed, want) in [
        ("https://api.example.com", "http", "https"),
        ("http://gw.test", "https", "http"),
    ] {
        let upstream = gatehouse_tests::echo::spawn().await;
        let h = Harness::with_issuer(
            manifests(&format!("http://{upstream}"), 100),
            upstream,
            issuer,
        )
        .await;
        let token = h.cc_token("svc-mobile", None).await;
        let resp = h
            .call(
                get("/mobile/x", Some(&token))
                    .header("x-forwarded-proto", claimed)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let echo = json(resp).await;
        assert_eq!(seen(&echo, "x-forwarded-proto"), Some(want), "{issuer}");
    }
}

/// The browser session at the gateway is not the backend's: a backend holding it could act as
/// the user on the login and consent pages.
#[tokio::test]
async fn the_gateway_session_cookie_does_not_reach_the_upstream() {
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let resp = h
        .call(
            get("/mobile/x", Some(&token))
                .header("cookie", "theme=dark; gatehouse_session=abc123")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let echo = json(resp).await;
    assert_eq!(seen(&echo, "cookie"), Some("theme=dark"));
}

/// An upstream that answers with the bytes `answer`, whatever it is asked, then holds the
/// connection open for a minute.
async fn raw_upstream(answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp.write_all(answer).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    addr
}

/// /mobile has timeoutSeconds: 1. An upstream that sends its headers and then
/// stalls mid-body must not keep the client waiting forever: the body must end (with an
/// error: the connection is aborted) within a bounded time.
#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off() {
    let upstream = raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc").await;
    let h = Harness::with_manifests(manifests(&format!("http://{upstream}"), 100), upstream).await;
    let token = h.cc_token("svc-mobile", None).await;
    let resp = h
        .call(get("/mobile/x", Some(&token)).body(Body::empty()).unwrap())
        .await;
    assert_eq!(resp.status(), 200);
    let read = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await;
    let body = read.expect("the response body was still open 10 s after the upstream stalled");
    assert!(
        body.is_err(),
        "a truncated body must end in an error, not look complete"
    );
}

/// The plan `unlimited` has no rate limits, so the gateway sets no RateLimit-*
/// headers; the backend's own copies must not reach the client as if the gateway sent them.
#[tokio::test]
async fn upstream_rate_limit_headers_do_not_reach_the_client() {
    let upstream = raw_upstream(
        b"HTTP/1.1 200 OK\r\nratelimit-limit: 999999\r\nratelimit-remaining: 999999\r\nratelimit-reset: 0\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let h = Harness::with_manifests(manifests(&format!("http://{upstream}"), 100), upstream).await;
    // /other (plan unlimited) needs Host api.example.com.
    let token = h.cc_token("svc-other", None).await;
    let resp = h
        .call(
            get("/other/x", Some(&token))
                .header("host", "api.example.com")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert!(
            !resp.headers().contains_key(name),
            "{name}: {:?} came from the upstream",
            resp.headers().get(name)
        );
    }
}

/// An upstream response with both Transfer-Encoding: chunked and Content-Length: RFC 9112 6.3
/// says the chunked framing wins and an intermediary must drop Content-Length before
/// forwarding (forwarding it gave the client `content-length: 5` and 5 of the 20 bytes).
#[tokio::test]
async fn chunked_wins_over_a_conflicting_content_length_from_the_upstream() {
    let upstream = raw_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n14\r\nAAAAABBBBBCCCCCDDDDD\r\n0\r\n\r\n",
    )
    .await;
    let h = Harness::with_manifests(manifests(&format!("http://{upstream}"), 100), upstream).await;
    let token = h.cc_token("svc-mobile", None).await;
    let resp = h
        .call(get("/mobile/x", Some(&token)).body(Body::empty()).unwrap())
        .await;
    // Either refuse the ambiguous response (502) or forward the chunked body whole.
    if resp.status() == 200 {
        assert!(!resp.headers().contains_key("content-length"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"AAAAABBBBBCCCCCDDDDD");
    } else {
        assert_eq!(resp.status(), 502);
    }
}

/// A proxied request whose body stops arriving ends in 408 (the client's fault, not the
/// upstream's 502/504), and the connection is closed; bodies that keep moving go through.
#[tokio::test]
async fn a_proxied_body_that_stalls_gets_408() {
    use gatehouse_gateway::server::Public;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let listening =
        Listening::start(Public::new(h.state.clone()).client_timeout(Duration::from_millis(300)));
    let addr = listening.addr;
    let head = format!(
        "POST /mobile/upload HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\ncontent-length: 12\r\n\r\n"
    );
    // Moving: two halves 200 ms apart.
    let mut moving = tokio::net::TcpStream::connect(addr).await.unwrap();
    moving.write_all(head.as_bytes()).await.unwrap();
    moving.write_all(b"hello ").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    moving.write_all(b"world!").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), moving.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Stalled: half the body, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(b"hello ").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut buf))
        .await
        .expect("the connection was not closed")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    listening.stop().await;
}

/// A request head well over 64 KiB gets 431 (hyper's default allowed about 400 KB; it checks
/// the limit between reads, so a head up to about twice it may pass). One under it, with a
/// Connection header of 30,000 tokens, is proxied without the header it names.
#[tokio::test]
async fn a_request_head_far_over_64_kib_gets_431() {
    use gatehouse_gateway::server::{MAX_REQUEST_HEAD_BYTES, Public};
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let listening = Listening::start(Public::new(h.state.clone()));
    let answer = |tokens: usize| {
        let head = format!(
            "GET /mobile/hello HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\nConnection: close,x-other{}\r\nX-Other: 1\r\n\r\n",
            ",a".repeat(tokens)
        );
        let listening = &listening;
        async move { (head.len(), listening.exchange(&head).await) }
    };
    let (len, text) = answer(30_000).await;
    assert!(len < MAX_REQUEST_HEAD_BYTES, "{len}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("x-other"), "{text}");
    let (len, text) = answer(100_000).await;
    assert!(len > 3 * MAX_REQUEST_HEAD_BYTES, "{len}");
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    listening.stop().await;
}

/// RFC 9112 3.2: an HTTP/1.1 request without Host, or with one that is not a host, is 400
/// (HTTP/1.0 needed none). 3.2.2: an absolute-form target's authority replaces Host, so the
/// route and X-Forwarded-Host follow the target a front proxy would route by.
#[tokio::test]
async fn host_is_required_valid_and_replaced_by_an_absolute_target() {
    use gatehouse_gateway::server::Public;
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let listening = Listening::start(Public::new(h.state.clone()));
    let send = |request_line: &str, host: Option<&str>| {
        let mut head =
            format!("{request_line}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n");
        if let Some(host) = host {
            head.push_str(&format!("Host: {host}\r\n"));
        }
        head.push_str("\r\n");
        let listening = &listening;
        async move { listening.exchange(&head).await }
    };
    let ok = send("GET /mobile/hello HTTP/1.1", Some("gw.test")).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains(r#""x-forwarded-host":["gw.test"]"#), "{ok}");
    let none = send("GET /mobile/hello HTTP/1.1", None).await;
    assert!(none.starts_with("HTTP/1.1 400"), "{none}");
    assert!(none.contains("no Host header"), "{none}");
    for bad in ["user@gw.test", "gw.test/x", "gw.test\\x"] {
        let answer = send("GET /mobile/hello HTTP/1.1", Some(bad)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{bad}: {answer}");
    }
    let old = send("GET /mobile/hello HTTP/1.0", None).await;
    assert!(
        old.starts_with("HTTP/1.0 200") || old.starts_with("HTTP/1.1 200"),
        "{old}"
    );
    let absolute = send(
        "GET http://target.example/mobile/hello HTTP/1.1",
        Some("gw.test"),
    )
    .await;
    assert!(absolute.starts_with("HTTP/1.1 200"), "{absolute}");
    assert!(
        absolute.contains(r#""x-forwarded-host":["target.example"]"#),
        "{absolute}"
    );
    listening.stop().await;
}

/// The Api's timeout counts from the end of the request body, not from its start: an upload
/// that keeps moving for longer than the timeout (here 2.5 s against /mobile's 1 s) is
/// answered, as nginx counts proxy_read_timeout after sending.
#[tokio::test]
async fn an_upload_longer_than_the_api_timeout_is_not_a_504() {
    use gatehouse_gateway::server::Public;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let listening = Listening::start(Public::new(h.state.clone()));
    let addr = listening.addr;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST /mobile/upload HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\nContent-Length: 6\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for piece in [b"a", b"b", b"c", b"d", b"e", b"f"] {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.write_all(piece).await.unwrap();
    }
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""bodyBytes":6"#), "{text}");
    listening.stop().await;
}

/// A GET whose body comes chunked reaches the upstream with that body (hyper alone would send
/// a GET of unknown length as empty); a transfer coding other than chunked is 501 (RFC 9112
/// 6.1), not passed on still applied to the bytes.
#[tokio::test]
async fn chunked_get_bodies_are_forwarded_and_other_transfer_codings_refused() {
    use gatehouse_gateway::server::Public;
    let h = Harness::new(100).await;
    let token = h.cc_token("svc-mobile", None).await;
    let listening = Listening::start(Public::new(h.state.clone()));
    let send = |method: &str, coding: &str| {
        let request = format!(
            "{method} /mobile/search HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let listening = &listening;
        async move { listening.exchange(&request).await }
    };
    let get = send("GET", "chunked").await;
    assert!(get.starts_with("HTTP/1.1 200"), "{get}");
    assert!(get.contains(r#""bodyBytes":5"#), "{get}");
    let post = send("POST", "chunked").await;
    assert!(post.contains(r#""bodyBytes":5"#), "{post}");
    let gzip = send("POST", "gzip, chunked").await;
    assert!(gzip.starts_with("HTTP/1.1 501"), "{gzip}");
    assert!(gzip.contains("not_implemented"), "{gzip}");
    listening.stop().await;
}

/// An upstream that accepts the connection but never reads the request body gets no more time
/// than /mobile's 1 s timeout from when it stopped taking the body: 504, not a request that
/// waits as long as the client keeps trying to send. The abandoned upstream connection is
/// closed, so it does not hold the client's connection (and the gateway's shutdown) for ever.
#[tokio::test]
async fn an_upstream_that_stops_taking_the_body_gets_a_504() {
    use gatehouse_gateway::server::Public;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deaf = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = deaf.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (tcp, _) = deaf.accept().await.unwrap();
            held.push(tcp); // never read, never answered
        }
    });
    let h = Harness::with_manifests(manifests(&format!("http://{upstream}"), 100), upstream).await;
    let token = h.cc_token("svc-mobile", None).await;
    let listening = Listening::start(Public::new(h.state.clone()));
    let addr = listening.addr;
    const BODY: usize = 64 << 20; // far more than the sockets between us and the upstream hold
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = s.into_split();
    let started = std::time::Instant::now();
    let sender = tokio::spawn(async move {
        let head = format!(
            "POST /mobile/upload HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\nContent-Length: {BODY}\r\n\r\n"
        );
        write.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..BODY / chunk.len() {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), read.read(&mut buf))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // The client goes away (the gateway would otherwise wait for the rest of the body).
    sender.abort();
    drop(read);
    // Only once the abandoned upstream exchange let go of the connection can the gateway stop.
    listening.stop().await;
}
