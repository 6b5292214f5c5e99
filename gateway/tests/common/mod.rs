//! Shared setup for the gateway's router and socket tests: manifests written to a temp dir,
//! compiled through the real loader, an in-process echo upstream.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use base64::Engine;
use gatehouse_gateway::ratelimit::local::LocalLimiter;
use gatehouse_gateway::state::AppState;
use gatehouse_gateway::store::Store;
use gatehouse_gateway::store::embedded::EmbeddedStore;
use gatehouse_gateway::{server, source};
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::ServiceExt;

pub const SECRET: &str = "service-secret-0123456789abcdef0123";

/// Manifests for one namespace: Api `mobile` at /mobile (plan basic: `limit` per second),
/// Api `other` at /other, a confidential app `svc` subscribed to both, a public app `app`.
pub fn manifests(upstream: &str, limit: u32) -> String {
    format!(
        r#"
apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: basic, namespace: t}}
spec:
  rateLimits:
    - {{requests: {limit}, per: second}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: unlimited, namespace: t}}
spec: {{}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: mobile, namespace: t}}
spec:
  pathPrefix: /mobile
  upstream: {{url: "{upstream}", timeoutSeconds: 1}}
  plans: [basic]
  auth:
    grants: [authorization_code, refresh_token, client_credentials]
    scopes: [{{name: profile, description: Your profile}}, {{name: orders, description: Orders}}]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: v2, namespace: t}}
spec:
  pathPrefix: /mobile/v2
  upstream: {{url: "{upstream}/version2", stripPrefix: true}}
  plans: [unlimited]
  auth: {{grants: [client_credentials]}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: other, namespace: t}}
spec:
  pathPrefix: /other
  hosts: [api.example.com]
  upstream: {{url: "{upstream}", stripPrefix: false}}
  plans: [unlimited]
  auth: {{grants: [client_credentials]}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: dead, namespace: t}}
spec:
  pathPrefix: /dead
  upstream: {{url: "http://127.0.0.1:1"}}
  plans: [unlimited]
  auth: {{grants: [client_credentials]}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: svc, namespace: t}}
spec: {{clientType: confidential, displayName: Service}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {{name: app, namespace: t}}
spec: {{clientType: public, redirectUris: ["myapp://cb"]}}
---
apiVersion: v1
kind: Secret
metadata: {{name: svc-secret, namespace: t, labels: {{gatehouse.dev/client-secret: "true"}}}}
stringData: {{clientSecret: "{SECRET}"}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: svc-mobile, namespace: t}}
spec:
  application: svc
  api: mobile
  plan: basic
  clientId: svc-mobile
  grants: [client_credentials]
  clientSecretRef: {{name: svc-secret, key: clientSecret}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: svc-v2, namespace: t}}
spec: {{application: svc, api: v2, plan: unlimited, clientId: svc-v2, clientSecretRef: {{name: svc-secret}}}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: svc-other, namespace: t}}
spec: {{application: svc, api: other, plan: unlimited, clientId: svc-other, clientSecretRef: {{name: svc-secret}}}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: svc-dead, namespace: t}}
spec: {{application: svc, api: dead, plan: unlimited, clientId: svc-dead, clientSecretRef: {{name: svc-secret}}}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: app-mobile, namespace: t}}
spec: {{application: app, api: mobile, plan: basic, clientId: app-mobile}}
"#
    )
}

pub struct Harness {
    pub state: Arc<AppState>,
    pub dir: tempfile::TempDir,
    pub upstream: SocketAddr,
}

impl Harness {
    pub async fn new(limit: u32) -> Harness {
        let upstream = gatehouse_tests::echo::spawn().await;
        Harness::with_manifests(manifests(&format!("http://{upstream}"), limit), upstream).await
    }

    pub async fn with_manifests(yaml: String, upstream: SocketAddr) -> Harness {
        Harness::with_issuer(yaml, upstream, "http://gw.test").await
    }

    /// With the public URL `issuer` (https behind a TLS-terminating ingress).
    pub async fn with_issuer(yaml: String, upstream: SocketAddr, issuer: &str) -> Harness {
        Harness::with_store(yaml, upstream, issuer, |s| Arc::new(s), |_| {}).await
    }

    /// With the embedded store as `wrap` makes it (e.g. one that fails on demand).
    /// A harness on the store `wrap` makes of the embedded one, with `tweak` applied to the
    /// state (settings a flag would set).
    pub async fn with_store(
        yaml: String,
        upstream: SocketAddr,
        issuer: &str,
        wrap: impl FnOnce(EmbeddedStore) -> Arc<dyn Store>,
        tweak: impl FnOnce(&mut AppState),
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mdir = dir.path().join("manifests");
        std::fs::create_dir_all(&mdir).unwrap();
        std::fs::write(mdir.join("all.yaml"), yaml).unwrap();
        let store = EmbeddedStore::open(&dir.path().join("data")).unwrap();
        let mut state = AppState::new(wrap(store), Arc::new(LocalLimiter::default()), issuer);
        tweak(&mut state);
        let state = Arc::new(state);
        source::reload(&state, &[mdir]).expect("manifests load");
        Harness {
            state,
            dir,
            upstream,
        }
    }

    pub fn manifest_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("manifests")
    }

    /// Takes the Subscription `name` out of the manifests and reloads them.
    pub fn remove_subscription(&self, name: &str) {
        let path = self.manifest_dir().join("all.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let cut = yaml
            .find(&format!("kind: Subscription\nmetadata: {{name: {name}"))
            .unwrap();
        let end = cut + yaml[cut..].find("---").unwrap();
        let start = yaml[..cut].rfind("---").unwrap();
        std::fs::write(&path, format!("{}{}", &yaml[..start], &yaml[end..])).unwrap();
        assert!(gatehouse_gateway::source::reload(&self.state, &[self.manifest_dir()]).unwrap());
    }

    /// Sends a request as a client would: with a Host header when it has none.
    pub async fn call(&self, mut req: Request<Body>) -> Response<Body> {
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut().insert(
                http::header::HOST,
                http::HeaderValue::from_static("gw.test"),
            );
        }
        server::router(self.state.clone())
            .oneshot(req)
            .await
            .unwrap()
    }

    /// A client_credentials token for `client_id` (secret SECRET).
    pub async fn cc_token(&self, client_id: &str, scope: Option<&str>) -> String {
        let mut body = "grant_type=client_credentials".to_string();
        if let Some(s) = scope {
            body.push_str(&format!("&scope={}", s.replace(' ', "+")));
        }
        let resp = self
            .call(token_request(&body, Some((client_id, SECRET))))
            .await;
        assert_eq!(resp.status(), 200);
        let v = json(resp).await;
        v["access_token"].as_str().unwrap().to_string()
    }
}

pub fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

pub fn token_request(body: &str, basic_auth: Option<(&str, &str)>) -> Request<Body> {
    let mut b =
        Request::post("/oauth2/token").header("content-type", "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic_auth {
        b = b.header("authorization", basic(id, secret));
    }
    b.body(Body::from(body.to_string())).unwrap()
}

pub fn get(path: &str, token: Option<&str>) -> http::request::Builder {
    let b = Request::get(path);
    match token {
        Some(t) => b.header("authorization", format!("Bearer {t}")),
        None => b,
    }
}

pub async fn json(resp: Response<Body>) -> serde_json::Value {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not json ({e}): {}", String::from_utf8_lossy(&bytes)))
}

/// The first value of a header the echo upstream received.
pub fn seen<'a>(echo: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    echo["headers"][name].get(0).and_then(|v| v.as_str())
}

/// The public listener (one worker) on a free loopback port, serving `app`.
pub struct Listening {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Listening {
    pub fn start(app: server::Public) -> Listening {
        let listeners = server::bind_workers("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(server::serve_workers(listeners, app, async move {
            let _ = stopped.await;
        }));
        Listening { addr, stop, served }
    }

    /// Stops it and waits (at most 10 s) until its connections have ended.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), self.served)
            .await
            .expect("the gateway's connections ended")
            .unwrap()
            .unwrap();
    }
}

impl Listening {
    /// Sends `request` (raw bytes, which should ask for `Connection: close`) on a new connection
    /// and returns everything the gateway answered before closing it (at most 10 s).
    pub async fn exchange(&self, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("an answer, then the connection closed")
            .unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }
}
