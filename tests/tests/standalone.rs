//! The real `gatehouse-gateway` binary in standalone mode: manifests in, tokens issued, requests
//! proxied to an echo upstream; reloads, restarts and large bodies.

use std::time::{Duration, Instant};

use gatehouse_tests::procs::Gateway;
use serde_json::Value;

const SECRET: &str = "e2e-service-secret-0123456789abcdef";

fn manifests(upstream: &str, per_second: u32) -> String {
    format!(
        r#"apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: basic, namespace: e2e}}
spec:
  rateLimits: [{{requests: {per_second}, per: second}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: e2e}}
spec:
  pathPrefix: /mobile
  upstream: {{url: "{upstream}"}}
  plans: [basic]
  auth:
    grants: [client_credentials]
    scopes: [{{name: profile}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: svc, namespace: e2e}}
spec: {{clientType: confidential}}
---
apiVersion: v1
kind: Secret
metadata: {{name: svc-credentials, namespace: e2e, labels: {{gatehouse.dev/client-secret: "true"}}}}
stringData: {{clientSecret: "{SECRET}"}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: svc-mobile, namespace: e2e}}
spec:
  application: svc
  api: mobile
  plan: basic
  clientId: svc-mobile
  clientSecretRef: {{name: svc-credentials, key: clientSecret}}
"#
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    manifest: std::path::PathBuf,
    gw: Gateway,
    http: reqwest::Client,
}

async fn setup(per_second: u32) -> Setup {
    let upstream = gatehouse_tests::echo::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("manifests");
    std::fs::create_dir_all(&mdir).unwrap();
    let manifest = mdir.join("gatehouse.yaml");
    std::fs::write(
        &manifest,
        manifests(&format!("http://{upstream}"), per_second),
    )
    .unwrap();
    let gw = tokio::task::block_in_place(|| Gateway::start(&mdir, &dir.path().join("data"), &[]));
    Setup {
        _dir: dir,
        manifest,
        gw,
        http: reqwest::Client::new(),
    }
}

async fn token(s: &Setup) -> String {
    let resp = s
        .http
        .post(s.gw.url("/oauth2/token"))
        .basic_auth("svc-mobile", Some(SECRET))
        .form(&[("grant_type", "client_credentials"), ("scope", "profile")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", s.gw.logs());
    let v: Value = resp.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

async fn call(s: &Setup, token: &str) -> reqwest::Response {
    s.http
        .get(s.gw.url("/mobile/hello"))
        .bearer_auth(token)
        .header("X-Authenticated-UserId", "spoofed")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn client_credentials_token_reaches_the_upstream_with_identity_headers() {
    let s = setup(100).await;
    let t = token(&s).await;
    let resp = call(&s, &t).await;
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["path"], "/hello");
    assert_eq!(echo["headers"]["x-client-id"][0], "svc-mobile");
    assert_eq!(echo["headers"]["x-application-id"][0], "e2e/svc");
    assert_eq!(echo["headers"]["x-api-plan"][0], "basic");
    assert_eq!(echo["headers"]["x-authenticated-scope"][0], "profile");
    assert!(
        echo["headers"].get("x-authenticated-userid").is_none(),
        "spoofed header removed"
    );
    assert!(echo["headers"].get("authorization").is_none());
    assert_eq!(echo["headers"]["x-forwarded-for"][0], "127.0.0.1");

    // admin endpoints
    let health = s.http.get(s.gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = s.gw.metrics().await;
    assert!(
        metrics.contains("gatehouse_proxy_responses_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_tokens_issued_total"),
        "{metrics}"
    );
    // Durations are a histogram (buckets add up across replicas), with this run's requests in it.
    assert!(
        metrics.contains("gatehouse_proxy_duration_seconds_bucket{le=\"+Inf\"}"),
        "{metrics}"
    );
    let count = metric(&metrics, "gatehouse_proxy_duration_seconds_count ");
    assert!(count >= 1, "{metrics}");
    // Workers count on their own and hand over when /metrics is read: every response is in.
    let ok = metric(&metrics, "gatehouse_proxy_responses_total{class=\"2xx\"} ");
    for _ in 0..3 {
        assert_eq!(call(&s, &t).await.status(), 200);
    }
    let metrics = s.gw.metrics().await;
    assert_eq!(
        metric(&metrics, "gatehouse_proxy_duration_seconds_count "),
        count + 3
    );
    assert_eq!(
        metric(&metrics, "gatehouse_proxy_responses_total{class=\"2xx\"} "),
        ok + 3
    );
}

/// The value on the line of `metrics` that starts with `prefix`.
fn metric(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in {metrics}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_tokens() {
    let mut s = setup(100).await;
    let t = token(&s).await;
    assert_eq!(call(&s, &t).await.status(), 200);
    tokio::task::block_in_place(|| s.gw.restart()); // SIGKILL, then start on the same data dir
    assert_eq!(call(&s, &t).await.status(), 200, "{}", s.gw.logs());
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within 10 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_on_file_change_and_keeps_the_last_good_config_on_a_broken_edit() {
    let s = setup(2).await;
    let t = token(&s).await;
    // 2 per second: the third call in a burst is refused
    for _ in 0..2 {
        assert_eq!(call(&s, &t).await.status(), 200);
    }
    assert_eq!(call(&s, &t).await.status(), 429);

    // Raise the limit in the file: the gateway picks it up by itself.
    let yaml = std::fs::read_to_string(&s.manifest).unwrap();
    std::fs::write(&s.manifest, yaml.replace("requests: 2,", "requests: 1000,")).unwrap();
    eventually("reload with the new limit", async || {
        let r = call(&s, &t).await;
        r.headers()
            .get("ratelimit-limit")
            .is_some_and(|v| v == "1000")
    })
    .await;

    // A broken edit (invalid YAML) keeps the last good configuration and says why.
    std::fs::write(&s.manifest, "kind: Api\nspec: [this is: not valid").unwrap();
    eventually("the broken edit to be logged", async || {
        s.gw.logs().contains("keeping the previous configuration")
    })
    .await;
    let r = call(&s, &t).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-limit"], "1000");
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_both_ways() {
    let s = setup(1000).await;
    let t = token(&s).await;
    const SIZE: u64 = 100 * 1024 * 1024;

    // Upload 100 MB generated on the fly; the echo upstream counts what arrives.
    let chunk = bytes::Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = (SIZE / chunk.len() as u64) as usize;
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let resp = s
        .http
        .post(s.gw.url("/mobile/upload"))
        .bearer_auth(&t)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["bodyBytes"], SIZE);

    // Download 100 MB, counting as it arrives.
    let mut resp = s
        .http
        .get(s.gw.url(&format!("/mobile/download/{SIZE}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = 0u64;
    while let Some(c) = resp.chunk().await.unwrap() {
        got += c.len() as u64;
    }
    assert_eq!(got, SIZE);

    // Neither direction was held in memory: the gateway's peak RSS stays far below 100 MB.
    let hwm = s.gw.peak_rss_kib().expect("reading /proc/<pid>/status");
    assert!(
        hwm < 60 * 1024,
        "gateway peak RSS {hwm} KiB: bodies were buffered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let mut s = setup(1000).await;
    let t = token(&s).await;
    // A request the upstream answers after 1.5 s is in flight when SIGTERM arrives.
    let http = s.http.clone();
    let url = s.gw.url("/mobile/slow/1500");
    let t2 = t.clone();
    let in_flight = tokio::spawn(async move {
        http.get(url)
            .bearer_auth(t2)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| s.gw.terminate(Duration::from_secs(10)));
    assert_eq!(
        in_flight.await.unwrap().ok(),
        Some(200),
        "the in-flight request completed"
    );
    let status = status.expect("the gateway exited after draining");
    assert!(status.success(), "clean exit, got {status}");
    assert!(
        started.elapsed() >= Duration::from_millis(1_000),
        "it waited for the request"
    );
    // and it no longer accepts connections
    assert!(reqwest::get(s.gw.url("/mobile/hello")).await.is_err());
}

/// Container runtimes start processes with a soft limit of 1,024 open files; every client
/// connection holds one, so the gateway raises its soft limit to the hard limit at start.
#[cfg(target_os = "linux")]
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let bin = gatehouse_tests::procs::workspace_bin("gatehouse-gateway", "gatehouse-gateway");
    let dir = tempfile::tempdir().unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let (port, admin) = (
        gatehouse_tests::procs::free_port(),
        gatehouse_tests::procs::free_port(),
    );
    // A soft limit of 256 under a hard limit of 1,024 (lowering both needs no privilege).
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -Sn 256 && ulimit -Hn 1024 && exec "$0" "$@""#)
        .arg(&bin)
        .arg("--manifests")
        .arg(repo.join("examples/mobile"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin}"))
        .env("GATEHOUSE_LOG", "warn")
        .spawn()
        .unwrap();
    let limits = format!("/proc/{}/limits", child.id());
    let started = Instant::now();
    let soft = loop {
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        let soft: Option<u64> = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok());
        if soft == Some(1024) || started.elapsed() > Duration::from_secs(20) {
            break soft;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        soft,
        Some(1024),
        "the soft limit was not raised to the hard one"
    );
}
