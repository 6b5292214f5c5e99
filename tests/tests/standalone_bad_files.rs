//! The real `gatehouse-gateway` binary with a manifests folder holding a bad file: it starts with
//! the other files, and while one file is broken the other files' changes apply (DESIGN §2: one
//! invalid resource never blocks the others).

use std::path::Path;
use std::time::{Duration, Instant};

use gatehouse_tests::procs::Gateway;

const SECRET: &str = "e2e-service-secret-0123456789abcdef";

fn base(upstream: &str) -> String {
    format!(
        r#"apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: basic, namespace: e2e}}
spec:
  rateLimits: [{{requests: 100, per: second}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: e2e}}
spec:
  pathPrefix: /mobile
  upstream: {{url: "{upstream}"}}
  plans: [basic]
  auth: {{grants: [client_credentials]}}
---
apiVersion: v1
kind: Secret
metadata: {{name: credentials, namespace: e2e, labels: {{gatehouse.dev/client-secret: "true"}}}}
stringData: {{clientSecret: "{SECRET}"}}
"#
    )
}

/// An application with its own subscription: one client.
fn client(name: &str) -> String {
    format!(
        r#"---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: {name}, namespace: e2e}}
spec: {{clientType: confidential}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: {name}, namespace: e2e}}
spec:
  application: {name}
  api: mobile
  plan: basic
  clientId: {name}
  clientSecretRef: {{name: credentials, key: clientSecret}}
"#
    )
}

/// A valid YAML document the gateway cannot use: a typo in an enum value.
const TYPO: &str = "apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: other, namespace: e2e}
spec: {clientType: confidentail}
";

async fn token_status(http: &reqwest::Client, gw: &Gateway, client_id: &str) -> u16 {
    http.post(gw.url("/oauth2/token"))
        .basic_auth(client_id, Some(SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn eventually(what: &str, gw: &Gateway, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within 10 s\n{}", gw.logs());
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_file_is_left_out_at_start_and_blocks_no_other_file() {
    let upstream = gatehouse_tests::echo::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    write(
        &m,
        "a.yaml",
        &(base(&format!("http://{upstream}")) + &client("svc-mobile")),
    );
    write(&m, "b.yaml", &client("svc-web"));
    write(&m, "c.yaml", TYPO);
    // Waits until ready: before, the gateway refused to start.
    let gw = tokio::task::block_in_place(|| Gateway::start(&m, &dir.path().join("data"), &[]));
    let http = reqwest::Client::new();
    let logs = gw.logs();
    assert!(
        logs.contains("c.yaml: document 1: Application e2e/other: spec.clientType"),
        "{logs}"
    );
    assert!(logs.contains("this file is left out"), "{logs}");
    assert!(
        !logs.contains("keeping the previous configuration"),
        "{logs}"
    );
    assert_eq!(token_status(&http, &gw, "svc-mobile").await, 200, "{logs}");
    assert_eq!(token_status(&http, &gw, "svc-web").await, 200, "{logs}");

    // Cutting off a client while c.yaml is still bad: it applies.
    write(&m, "b.yaml", "");
    eventually("svc-web to be refused", &gw, async || {
        token_status(&http, &gw, "svc-web").await == 401
    })
    .await;

    // A half-saved a.yaml keeps its last good version; the rest of the folder is unaffected.
    write(&m, "a.yaml", "kind: Api\nspec: [this is: not valid");
    eventually("the broken edit to be logged", &gw, async || {
        gw.logs()
            .contains("keeping the previous configuration from this file")
    })
    .await;
    assert_eq!(token_status(&http, &gw, "svc-mobile").await, 200);
    assert_eq!(token_status(&http, &gw, "svc-web").await, 401);
}
