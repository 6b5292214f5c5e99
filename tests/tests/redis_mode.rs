//! Several real gateways on one private redis-server behave as one: shared tokens, revocation
//! everywhere, one rate limit in total; and Redis faults give bounded 503s, never a crash.

use std::time::{Duration, Instant};

use gatehouse_tests::procs::{Gateway, free_port};
use gatehouse_tests::redis::RedisServer;
use serde_json::Value;

const SECRET: &str = "redis-mode-secret-0123456789abcdef";

fn manifests(upstream: &str, per_second: u32) -> String {
    format!(
        r#"apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: basic, namespace: r}}
spec:
  rateLimits: [{{requests: {per_second}, per: second}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: r}}
spec:
  pathPrefix: /mobile
  upstream: {{url: "{upstream}"}}
  plans: [basic]
  auth: {{grants: [client_credentials]}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: svc, namespace: r}}
spec: {{clientType: confidential}}
---
apiVersion: v1
kind: Secret
metadata: {{name: svc-credentials, namespace: r}}
stringData: {{clientSecret: "{SECRET}"}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: svc-mobile, namespace: r}}
spec: {{application: svc, api: mobile, plan: basic, clientId: svc-mobile, clientSecretRef: {{name: svc-credentials}}}}
"#
    )
}

struct Cluster {
    dir: tempfile::TempDir,
    gateways: Vec<Gateway>,
    http: reqwest::Client,
}

async fn cluster(redis: &RedisServer, n: usize, per_second: u32) -> Cluster {
    let upstream = gatehouse_tests::echo::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("manifests");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(
        mdir.join("all.yaml"),
        manifests(&format!("http://{upstream}"), per_second),
    )
    .unwrap();
    let url = redis.url();
    let gateways = (0..n)
        .map(|i| {
            let data = dir.path().join(format!("data{i}"));
            tokio::task::block_in_place(|| Gateway::start(&mdir, &data, &["--redis", &url]))
        })
        .collect();
    Cluster {
        dir,
        gateways,
        http: reqwest::Client::new(),
    }
}

impl Cluster {
    async fn token(&self, gw: usize) -> String {
        let resp = self
            .http
            .post(self.gateways[gw].url("/oauth2/token"))
            .basic_auth("svc-mobile", Some(SECRET))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        v["access_token"].as_str().unwrap().to_string()
    }

    async fn call(&self, gw: usize, token: &str) -> u16 {
        self.http
            .get(self.gateways[gw].url("/mobile/x"))
            .bearer_auth(token)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_shared_and_revocation_reaches_every_replica_within_a_second() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let c = cluster(&redis, 3, 1000).await;
    let token = c.token(0).await;
    for gw in 0..3 {
        assert_eq!(
            c.call(gw, &token).await,
            200,
            "gateway {gw} accepts a token issued by gateway 0"
        );
    }
    // Revoke on gateway 1; the others have the token cached.
    let resp = c
        .http
        .post(c.gateways[1].url("/oauth2/revoke"))
        .basic_auth("svc-mobile", Some(SECRET))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let revoked_at = Instant::now();
    for gw in [0, 2, 1] {
        loop {
            let s = c.call(gw, &token).await;
            if s == 401 {
                break;
            }
            assert_eq!(s, 200);
            assert!(
                revoked_at.elapsed() < Duration::from_secs(1),
                "gateway {gw} still accepts a revoked token after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(c.dir.path().exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_limit_of_five_per_second_holds_across_three_gateways() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let c = cluster(&redis, 3, 5).await;
    let token = c.token(0).await;
    // Warm every gateway's connections (these calls are outside the measured burst window).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let burst: Vec<_> = (0..15).map(|i| c.call(i % 3, &token)).collect();
    let statuses = futures_util::future::join_all(burst).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, limited), (5, 10), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn not_ready_while_redis_is_unreachable_then_ready_when_it_comes() {
    let port = free_port();
    let upstream = gatehouse_tests::echo::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(
        mdir.join("all.yaml"),
        manifests(&format!("http://{upstream}"), 100),
    )
    .unwrap();
    let url = format!("redis://127.0.0.1:{port}/");
    let mut gw = Gateway::launch(&mdir, &dir.path().join("d"), &["--redis", &url]);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(gw.alive(), "{}", gw.logs());
    let ready = reqwest::get(gw.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(gw.logs().contains("cannot reach Redis"), "{}", gw.logs());
    // Requests that need Redis get a 503 JSON error, quickly.
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(gw.url("/oauth2/token"))
        .basic_auth("svc-mobile", Some(SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(3));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "temporarily_unavailable");

    let _redis = tokio::task::block_in_place(|| RedisServer::start_on(port, false));
    tokio::task::block_in_place(|| gw.wait_ready(Duration::from_secs(15)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.logs().contains("connected to Redis") {
        assert!(
            Instant::now() < deadline,
            "no 'connected to Redis' log line:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_dying_under_load_gives_bounded_503s_and_recovers() {
    let mut redis = tokio::task::block_in_place(|| RedisServer::start_with(true));
    let c = cluster(&redis, 1, 100_000).await;
    let token = c.token(0).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await; // AOF everysec has synced the token

    let deadline = Instant::now() + Duration::from_secs(8);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let http = c.http.clone();
            let url = c.gateways[0].url("/mobile/x");
            let token = token.clone();
            tokio::spawn(async move {
                let mut seen: Vec<(u16, Duration)> = vec![];
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let s = http
                        .get(&url)
                        .bearer_auth(&token)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    seen.push((s, t.elapsed()));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| redis.stop());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| redis.restart());

    let mut all = vec![];
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let count = |code: u16| all.iter().filter(|(s, _)| *s == code).count();
    let others: Vec<_> = all.iter().filter(|(s, _)| *s != 200 && *s != 503).collect();
    assert!(
        others.is_empty(),
        "only 200 and 503 allowed, saw {others:?}"
    );
    assert!(count(503) > 0, "the outage was noticed");
    let slowest = all.iter().map(|(_, d)| *d).max().unwrap();
    assert!(
        slowest < Duration::from_secs(2),
        "a request hung for {slowest:?}"
    );
    // After Redis is back, the same token works again: recovered by itself.
    let tail = &all[all.len().saturating_sub(8)..];
    assert!(
        tail.iter().all(|(s, _)| *s == 200),
        "not recovered: {tail:?}"
    );
    let mut gws = c.gateways;
    assert!(gws[0].alive(), "the gateway survived the outage");
    eprintln!(
        "outage: {} ok, {} x 503, slowest {slowest:?}",
        count(200),
        count(503)
    );
}
