//! Redis mode when the server behind the Redis address changes or goes silent, and when
//! revocation messages are refused or lost.
//!
//! A `Switch` stands between the gateways and Redis like a DNS name / Service / managed
//! "primary endpoint": new connections go to its current target; `freeze` makes the live
//! connections that match go silent without FIN or RST (a half-open path: a crashed host, a
//! partition, an idle connection dropped by a NAT or load balancer).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_tests::procs::Gateway;
use gatehouse_tests::redis::RedisServer;
use gatehouse_tests::service::{self, SECRET, call, token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One command over RESP; the raw reply (enough for "+OK", ":1", role lines).
fn redis_cmd(port: u16, args: &[&str]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

struct Conn {
    frozen: Arc<std::sync::atomic::AtomicBool>,
    subscribed: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone)]
struct Switch {
    port: u16,
    target: Arc<AtomicU16>,
    conns: Arc<Mutex<Vec<Conn>>>,
}

impl Switch {
    async fn start(target: u16) -> Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sw = Switch {
            port: listener.local_addr().unwrap().port(),
            target: Arc::new(AtomicU16::new(target)),
            conns: Arc::default(),
        };
        let me = sw.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let to = me.target.load(Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let subscribed = Arc::new(std::sync::atomic::AtomicBool::new(false));
                me.conns.lock().unwrap().push(Conn {
                    frozen: frozen.clone(),
                    subscribed: subscribed.clone(),
                });
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (f1, f2, sub) = (frozen.clone(), frozen, subscribed);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = cr.read(&mut buf).await.unwrap_or(0);
                        if f1.load(Ordering::SeqCst) {
                            std::future::pending::<()>().await; // silent, never closed
                        }
                        if n == 0 {
                            return;
                        }
                        if buf[..n]
                            .to_ascii_uppercase()
                            .windows(9)
                            .any(|w| w == b"SUBSCRIBE")
                        {
                            sub.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = sr.read(&mut buf).await.unwrap_or(0);
                        if f2.load(Ordering::SeqCst) {
                            std::future::pending::<()>().await;
                        }
                        if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        sw
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn retarget(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }

    /// Freezes the live connections (only those that sent SUBSCRIBE when `only_pubsub`).
    fn freeze(&self, only_pubsub: bool) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for c in conns.iter() {
            if !only_pubsub || c.subscribed.load(Ordering::SeqCst) {
                c.frozen.store(true, Ordering::SeqCst);
                n += 1;
            }
        }
        n
    }
}

async fn gateway(redis_url: &str) -> (tempfile::TempDir, Gateway) {
    let (dir, mdir) = service::folder(1000).await;
    let data = dir.path().join("d");
    // One worker: every request then goes over the one per-thread Redis connection the test
    // warmed (with several, a request on a worker that never connected would open a fresh one).
    let gw = tokio::task::block_in_place(|| {
        Gateway::start(&mdir, &data, &["--redis", redis_url, "--workers", "1"])
    });
    (dir, gw)
}

/// Calls until `want` or `within` has passed; the time it took, or None.
async fn until(
    http: &reqwest::Client,
    gw: &Gateway,
    token: &str,
    want: u16,
    within: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        if call(http, gw, token).await == want {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Failover behind a primary endpoint: the old primary becomes a replica (it keeps the
/// gateway's connections and answers READONLY to writes), new connections reach the new
/// primary. The gateway moves to new connections, and /readyz does not call a replica ready.
#[tokio::test(flavor = "multi_thread")]
async fn a_failover_behind_the_redis_endpoint_is_followed() {
    let (a, b) = tokio::task::block_in_place(|| (RedisServer::start(), RedisServer::start()));
    redis_cmd(b.port, &["REPLICAOF", "127.0.0.1", &a.port.to_string()]);
    let sw = Switch::start(a.port).await;
    let (_dir, gw) = gateway(&sw.url()).await;
    let http = reqwest::Client::new();
    let tok = token(&http, &gw).await;
    assert_eq!(call(&http, &gw, &tok).await, 200);
    // b has the token (replicated), then takes over.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis_cmd(b.port, &["INFO", "replication"]).contains("master_link_status:up") {
        assert!(Instant::now() < deadline, "b never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis_cmd(b.port, &["REPLICAOF", "NO", "ONE"]);
    redis_cmd(a.port, &["REPLICAOF", "127.0.0.1", &b.port.to_string()]);
    sw.retarget(b.port);
    let took = until(&http, &gw, &tok, 200, Duration::from_secs(10)).await;
    assert!(
        took.is_some(),
        "still failing 10 s after the failover (READONLY from the old primary)"
    );
    // Readiness must not have claimed a writable store while it was a replica; at the end it is ready.
    let ready = reqwest::get(gw.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
}

/// The gateway's connections go silent (no FIN/RST) while Redis is reachable on a new
/// connection: the gateway replaces them instead of timing out into 503s for as long as the
/// kernel keeps a dead connection (about 15 minutes on Linux; forever through this switch).
#[tokio::test(flavor = "multi_thread")]
async fn a_silently_dead_connection_is_replaced() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let sw = Switch::start(redis.port).await;
    let (_dir, gw) = gateway(&sw.url()).await;
    let http = reqwest::Client::new();
    let tok = token(&http, &gw).await;
    assert_eq!(call(&http, &gw, &tok).await, 200);
    assert!(sw.freeze(false) > 0);
    let took = until(&http, &gw, &tok, 200, Duration::from_secs(10)).await;
    assert!(
        took.is_some(),
        "503s for 10 s although a new connection would work"
    );
}

/// Only gateway A's pub/sub connection goes silent (an idle connection dropped by a NAT or
/// load balancer). Gateway B revokes a token A has cached: A notices the lost channel within
/// its 5 s ping and stops using its cache, instead of accepting the token for the 30 s TTL.
#[tokio::test(flavor = "multi_thread")]
async fn a_silently_lost_revocation_channel_is_noticed() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let sw = Switch::start(redis.port).await;
    let (_da, a) = gateway(&sw.url()).await;
    let (_db, b) = gateway(&redis.url()).await;
    let http = reqwest::Client::new();
    let tok = token(&http, &b).await;
    assert_eq!(call(&http, &a, &tok).await, 200); // cached on A
    assert_eq!(sw.freeze(true), 1, "A's one SUBSCRIBE connection");
    let resp = http
        .post(b.url("/oauth2/revoke"))
        .basic_auth("svc-mobile", Some(SECRET))
        .form(&[("token", tok.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // With a pub/sub PING every 5 s (1 s timeout) A notices within about 6 s and stops using
    // its cache (without the ping: the full 30 s TTL).
    let took = until(&http, &a, &tok, 401, Duration::from_secs(10)).await;
    assert!(
        took.is_some(),
        "A still accepts the revoked token 10 s later"
    );
}
