//! Several real gateways on one private redis-server behave as one: shared tokens, revocation
//! everywhere, one rate limit in total; and Redis faults give bounded 503s, never a crash.

use std::time::{Duration, Instant};

use gatehouse_tests::procs::{Gateway, free_port};
use gatehouse_tests::redis::RedisServer;
use gatehouse_tests::service::{self, SECRET};
use serde_json::Value;

struct Cluster {
    dir: tempfile::TempDir,
    gateways: Vec<Gateway>,
    http: reqwest::Client,
}

async fn cluster(redis: &RedisServer, n: usize, per_second: u32) -> Cluster {
    let (dir, mdir) = service::folder(per_second).await;
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
        service::token(&self.http, &self.gateways[gw]).await
    }

    async fn call(&self, gw: usize, token: &str) -> u16 {
        service::call(&self.http, &self.gateways[gw], token).await
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
    let (dir, mdir) = service::folder(100).await;
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
    let ready = |gw: &Gateway| reqwest::get(gw.admin_url("/readyz"));
    assert_eq!(ready(&c.gateways[0]).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| redis.stop());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Still ready: a Redis outage hits every replica alike, and the gateways' own answers
    // (JSON 503s, or traffic let through for failOpen plans) beat an ingress with no backend.
    assert_eq!(ready(&c.gateways[0]).await.unwrap().status(), 200);
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

/// The PKCE flow with every step on a different replica than the one before: the browser
/// session, pending request, code, tokens and their revocation live in the shared Redis.
#[tokio::test(flavor = "multi_thread")]
async fn pkce_flow_across_two_gateways_sharing_redis() {
    use base64::Engine;
    use gatehouse_tests::flow::{self, PASSWORD, PHONE_APP, PROFILE, input_value};
    use sha2::Digest;

    let redis = tokio::task::block_in_place(RedisServer::start);
    let upstream = gatehouse_tests::echo::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(
        mdir.join("all.yaml"),
        flow::manifests(&format!("http://{upstream}"), 3600),
    )
    .unwrap();
    let url = redis.url();
    let (a, b) = tokio::task::block_in_place(|| {
        (
            Gateway::start(
                &mdir,
                &dir.path().join("a"),
                &["--redis", &url, "--refresh-retry-seconds", "30"],
            ),
            Gateway::start(
                &mdir,
                &dir.path().join("b"),
                &["--redis", &url, "--refresh-retry-seconds", "30"],
            ),
        )
    });
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let verifier = "b".repeat(20) + "-verifier-for-two-gateways-0123456789";
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    let redirect = "myapp://callback";

    // A: authorize -> login page with the session cookie
    let resp = http
        .get(a.url("/oauth2/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", PHONE_APP),
            ("redirect_uri", redirect),
            ("scope", PROFILE),
            ("state", "st-1"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = flow::session_cookie(&resp).expect("session cookie");
    let html = resp.text().await.unwrap();
    let req = input_value(&html, "req").unwrap();
    // B: the signup page for that pending request (same session, other replica)
    let page = http
        .get(b.url(&format!("/signup?req={req}")))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "{}", b.logs());
    let csrf = input_value(&page.text().await.unwrap(), "csrf").unwrap();
    // A: sign up
    let resp = http
        .post(a.url("/signup"))
        .header("cookie", &cookie)
        .form(&[
            ("email", "two@example.com"),
            ("password", PASSWORD),
            ("csrf", &csrf),
            ("req", &req),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = flow::session_cookie(&resp).expect("session cookie");
    let consent_path = resp.headers()["location"].to_str().unwrap().to_string();
    // B: consent page; A: allow
    let html = http
        .get(b.url(&consent_path))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = input_value(&html, "csrf").expect("consent form");
    let resp = http
        .post(a.url("/consent"))
        .header("cookie", &cookie)
        .form(&[("decision", "allow"), ("csrf", &csrf), ("req", &req)])
        .send()
        .await
        .unwrap();
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let cb = url::Url::parse(&location).unwrap();
    let q: std::collections::HashMap<_, _> = cb.query_pairs().into_owned().collect();
    assert_eq!(q["state"], "st-1");
    let code = q["code"].clone();

    // B: exchange; A: call the API as the user
    let exchange = |gw: &Gateway| {
        http.post(gw.url("/oauth2/token")).form(&[
            ("grant_type", "authorization_code"),
            ("client_id", PHONE_APP),
            ("code", code.as_str()),
            ("redirect_uri", redirect),
            ("code_verifier", verifier.as_str()),
        ])
    };
    let tokens: Value = exchange(&b).send().await.unwrap().json().await.unwrap();
    let access = tokens["access_token"]
        .as_str()
        .expect("access token")
        .to_string();
    let echo: Value = http
        .get(a.url("/mobile/me"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let user = echo["headers"]["x-authenticated-userid"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(user.len(), 36);

    // Both replicas allow a retry for 30 s (`--refresh-retry-seconds`).
    // A: refresh, whose answer the app never gets; B: the app's retry with the same token gets
    // a pair, and the lost answer's access token stops working on both replicas (one family
    // record for all of them). B: the lost answer's refresh token after all -> reuse, and the
    // family is revoked everywhere.
    let refresh = tokens["refresh_token"].as_str().unwrap().to_string();
    let rotate = |gw: &Gateway, t: &str| {
        http.post(gw.url("/oauth2/token")).form(&[
            ("grant_type", "refresh_token"),
            ("client_id", PHONE_APP),
            ("refresh_token", t),
        ])
    };
    let pair = |v: Value| {
        let field = |k: &str| v[k].as_str().unwrap().to_string();
        (field("access_token"), field("refresh_token"))
    };
    let status_on = |gw: &Gateway, access: &str| {
        let call = http.get(gw.url("/mobile/me")).bearer_auth(access);
        async move { call.send().await.unwrap().status() }
    };
    let lost = rotate(&a, &refresh).send().await.unwrap();
    assert_eq!(lost.status(), 200);
    let (lost_access, lost_refresh) = pair(lost.json().await.unwrap());
    let retry = rotate(&b, &refresh).send().await.unwrap();
    assert_eq!(retry.status(), 200, "a retry on another replica");
    let (new_access, _) = pair(retry.json().await.unwrap());
    for gw in [&a, &b] {
        assert_eq!(status_on(gw, &lost_access).await, 401);
    }
    // Only B has seen the new access token, so A's answer below cannot come from its cache.
    assert_eq!(status_on(&b, &new_access).await, 200);
    let reuse = rotate(&b, &lost_refresh).send().await.unwrap();
    assert_eq!(reuse.status(), 400);
    for gw in [&a, &b] {
        assert_eq!(
            status_on(gw, &new_access).await,
            401,
            "family revoked on every replica"
        );
    }
    // A replayed code (on the other replica) is refused too.
    let replay = exchange(&a).send().await.unwrap();
    assert_eq!(replay.status(), 400);
}

/// A Redis that restarted while the gateway was idle (a pod rescheduled, a failover to a fresh
/// server) costs no request once it is back: every worker's connection closed with the old
/// server, and the first command on it goes again on a new one instead of answering 503.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restarted_while_idle_costs_no_request() {
    let mut redis = tokio::task::block_in_place(|| RedisServer::start_with(true));
    let c = cluster(&redis, 1, 100_000).await;
    let token = c.token(0).await;
    // New connections land on every worker (SO_REUSEPORT), so each opens its Redis connection.
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    for _ in 0..16 {
        assert_eq!(service::call(&fresh(), &c.gateways[0], &token).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await; // AOF everysec has synced the token
    tokio::task::block_in_place(|| redis.restart());
    let gw = &c.gateways[0];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reqwest::get(gw.admin_url("/readyz"))
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "not ready again after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut statuses = vec![];
    for _ in 0..16 {
        statuses.push(service::call(&fresh(), gw, &token).await);
    }
    for _ in 0..4 {
        let resp = fresh()
            .post(gw.url("/oauth2/token"))
            .basic_auth(service::CLIENT_ID, Some(SECRET))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "after the restart: {statuses:?}\n{}",
        gw.logs()
    );
}

/// A caller over its limit is refused by the gateway itself, with the wait Redis reported: its
/// refused requests cost no Redis round trip (no script call) but one every 5 s, so a client
/// hammering past its limit does not load Redis.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_over_its_limit_is_refused_without_asking_redis_again() {
    let redis = tokio::task::block_in_place(RedisServer::start);
    let script_calls = || -> u64 {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "INFO", "commandstats"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    let (dir, mdir) = service::folder_per(2, "minute").await;
    let url = redis.url();
    let gw = tokio::task::block_in_place(|| {
        Gateway::start(&mdir, &dir.path().join("d"), &["--redis", &url])
    });
    let http = reqwest::Client::new();
    let token = service::token(&http, &gw).await;
    let get = || {
        http.get(gw.url("/mobile/x"))
            .bearer_auth(&token)
            .timeout(Duration::from_secs(5))
            .send()
    };
    let header = |r: &reqwest::Response, name: &str| -> u64 {
        r.headers()[name].to_str().unwrap().parse().unwrap()
    };
    for _ in 0..2 {
        assert_eq!(get().await.unwrap().status(), 200);
    }
    // 2 per minute: the next request may pass 30 s after the burst.
    let hammering = Instant::now();
    let refused = get().await.unwrap();
    assert_eq!(refused.status(), 429);
    let wait = header(&refused, "retry-after");
    assert!((29..=30).contains(&wait), "Retry-After {wait}");
    let calls = tokio::task::block_in_place(script_calls);
    assert!(
        calls >= 3,
        "each checked request so far went to Redis ({calls} calls)"
    );

    for i in 0..20 {
        let r = get().await.unwrap();
        assert_eq!(r.status(), 429, "request {i}");
        let again = header(&r, "retry-after");
        assert!(
            (1..=wait).contains(&again),
            "Retry-After {again} after {wait}"
        );
        assert_eq!(header(&r, "ratelimit-limit"), 2);
        assert_eq!(header(&r, "ratelimit-remaining"), 0);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "rate_limited");
    }
    // Redis is asked again every 5 s (refusals::MAX_TRUSTED): on a slow machine these 20
    // requests may have taken that long.
    let allowed_calls = hammering.elapsed().as_secs() / 5;
    let extra = tokio::task::block_in_place(script_calls) - calls;
    assert!(
        extra <= allowed_calls,
        "refused requests were asked of Redis again: {extra} script calls in {:?}",
        hammering.elapsed()
    );
}

/// The start-up sweep that records old accounts under their normalized email reads Redis's key
/// space with SCAN: every account key is found (past SCAN's page size), nothing outside the
/// prefix, and a prefix's glob characters match only themselves.
#[tokio::test(flavor = "multi_thread")]
async fn old_accounts_are_indexed_by_their_normalized_email_in_redis() {
    use gatehouse_gateway::accounts;
    use gatehouse_gateway::store::Store;
    use gatehouse_gateway::store::redis::{RedisOptions, RedisStore};
    let redis = tokio::task::block_in_place(RedisServer::start);
    let store = RedisStore::connect(&RedisOptions::new(&redis.url())).unwrap();
    let old = accounts::create(&*store, "je\u{0301}ro\u{0302}me@example.com", "h".into())
        .await
        .unwrap()
        .unwrap();
    for i in 0..2500 {
        accounts::create(&*store, &format!("user{i}@example.com"), "h".into())
            .await
            .unwrap()
            .unwrap();
    }
    store.kv_put("user:emailish", b"x", 0).await.unwrap();
    store.kv_put("a*b:1", b"x", 0).await.unwrap();
    store.kv_put("aXb:1", b"x", 0).await.unwrap();
    assert_eq!(store.kv_keys("a*b:", |_| true).await.unwrap(), ["a*b:1"]);
    let all = store.kv_keys("user:email:", |_| true).await.unwrap();
    assert_eq!(all.len(), 2501, "every page of SCAN, once each");

    assert_eq!(
        accounts::index_normalized_emails(&*store).await.unwrap(),
        (1, 1)
    );
    let found = accounts::find(&*store, "j\u{00E9}r\u{00F4}me@example.com", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, old.id);
    assert_eq!(
        accounts::index_normalized_emails(&*store).await.unwrap(),
        (2, 0)
    );
}
