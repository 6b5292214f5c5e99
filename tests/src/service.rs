//! One Api (`/mobile`) and a confidential service client of it (`svc-mobile`, client
//! credentials) on a plan of N requests per second (or per another unit): the setup the
//! multi-gateway Redis tests share.

use std::time::Duration;

use serde_json::Value;

use crate::procs::Gateway;

pub const CLIENT_ID: &str = "svc-mobile";
pub const SECRET: &str = "service-secret-0123456789abcdef0123";

pub fn manifests(upstream: &str, per_second: u32) -> String {
    manifests_per(upstream, per_second, "second")
}

/// `manifests` with a plan of `requests` per `per` (second, minute, hour or day).
pub fn manifests_per(upstream: &str, requests: u32, per: &str) -> String {
    format!(
        r#"apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: basic, namespace: r}}
spec:
  rateLimits: [{{requests: {requests}, per: {per}}}]
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
metadata: {{name: svc-credentials, namespace: r, labels: {{gatehouse.dev/client-secret: "true"}}}}
stringData: {{clientSecret: "{SECRET}"}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: {CLIENT_ID}, namespace: r}}
spec: {{application: svc, api: mobile, plan: basic, clientId: {CLIENT_ID}, clientSecretRef: {{name: svc-credentials}}}}
"#
    )
}

/// A temporary folder holding `manifests(per_second)` for a fresh echo upstream, as
/// `<dir>/m/all.yaml`; returns the folder (dropped: deleted) and the manifests path.
pub async fn folder(per_second: u32) -> (tempfile::TempDir, std::path::PathBuf) {
    folder_per(per_second, "second").await
}

/// `folder` with a plan of `requests` per `per`.
pub async fn folder_per(requests: u32, per: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let upstream = crate::echo::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(
        mdir.join("all.yaml"),
        manifests_per(&format!("http://{upstream}"), requests, per),
    )
    .unwrap();
    (dir, mdir)
}

/// A client_credentials token from `gw` (the request must succeed).
pub async fn token(http: &reqwest::Client, gw: &Gateway) -> String {
    let resp = http
        .post(gw.url("/oauth2/token"))
        .basic_auth(CLIENT_ID, Some(SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

/// `GET /mobile/x` with `token`: the status, or 0 when no answer came within 5 s.
pub async fn call(http: &reqwest::Client, gw: &Gateway, token: &str) -> u16 {
    http.get(gw.url("/mobile/x"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}
