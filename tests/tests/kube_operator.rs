//! The operator and the in-cluster gateway against a real kube-apiserver + etcd (+
//! kube-controller-manager for owner-reference garbage collection), built by
//! `scripts/kube-tools.sh`: two `gatehouse-operator` processes (one leader, one standby), a
//! `gatehouse-gateway --kube --redis` process, redis-server and an echo upstream. It applies a
//! copy of examples/mobile and checks statuses, generated credentials, publishing, the PKCE and
//! client_credentials flows through the gateway, live limit changes, invalid resources, deletion,
//! approval and leader hand-over.
//!
//! Run: `cargo test -p gatehouse-tests --test kube_operator -- --nocapture`
//! (skip with `--skip kube_`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use gatehouse_tests::flow;
use gatehouse_tests::kube::{KubeApiServer, KubeOptions};
use gatehouse_tests::procs::{Gateway, free_port, http_body, workspace_bin};
use gatehouse_tests::redis::RedisServer;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::Digest as _;

const CRDS: [&str; 4] = [
    "apis.gatehouse.dev",
    "plans.gatehouse.dev",
    "applications.gatehouse.dev",
    "subscriptions.gatehouse.dev",
];
const OPERATOR_NS: &str = "gatehouse-system";
const CONFIG_MAP: &str = "gatehouse-gateway-config";
const LEASE: &str = "gatehouse-operator";
const HASH_ANNOTATION: &str = "gatehouse.dev/config-hash";
const SESSION_COOKIE: &str = "gatehouse_session";
const REDIRECT: &str = "myapp://callback";

/// Additions to examples/mobile: a confidential subscription without clientSecretRef (and
/// without clientId: both generated), and one to the premium plan (needs approval).
const EXTRA: &str = "apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: demo-backend, namespace: demo}
spec:
  displayName: Demo Backend
  owner: dev@example.com
  clientType: confidential
  redirectUris: []
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: demo-backend-mobile, namespace: demo}
spec:
  application: demo-backend
  api: mobile
  plan: basic
  grants: [client_credentials]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: demo-partner, namespace: demo}
spec:
  displayName: Demo Partner
  owner: partner@example.com
  clientType: confidential
  redirectUris: []
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: demo-partner-mobile, namespace: demo}
spec:
  application: demo-partner
  api: mobile
  plan: premium
  grants: [client_credentials]
";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The last `max` lines of a file.
fn tail_file(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max)..].join("\n")
}

/// One `gatehouse-operator` process.
struct Operator {
    identity: String,
    child: Option<Child>,
    log: PathBuf,
    admin: SocketAddr,
}

impl Operator {
    fn start(dir: &Path, kubeconfig: &Path, identity: &str) -> Operator {
        let bin = workspace_bin("gatehouse-operator", "gatehouse-operator");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("{identity}.log"));
        let file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(bin)
            .args([
                "--config-map",
                &format!("{OPERATOR_NS}/{CONFIG_MAP}"),
                "--lease-name",
                LEASE,
                "--identity",
                identity,
                "--admin-listen",
                &admin.to_string(),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("GATEHOUSE_LOG", "info,gatehouse_operator=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().expect("dup log")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("starting gatehouse-operator");
        Operator {
            identity: identity.to_string(),
            child: Some(child),
            log,
            admin,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as Kubernetes stops a pod; its exit status once it ended (within 10 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("the operator did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Env {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    gw: Option<Gateway>,
    operators: Vec<Operator>,
    _redis: RedisServer,
    kube: KubeApiServer,
    manifests: PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    /// The tails of our processes' logs, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for op in &self.operators {
            s += &format!(
                "\n----- operator {} ({}) -----\n{}\n",
                op.identity,
                op.log.display(),
                tail_file(&op.log, 40)
            );
        }
        if let Some(gw) = &self.gw {
            s += &format!(
                "\n----- gateway ({}) -----\n{}\n",
                gw.log.display(),
                tail_file(&gw.log, 40)
            );
        }
        s
    }

    fn gw(&self) -> &Gateway {
        self.gw.as_ref().expect("gateway started")
    }

    /// Polls `f` until it returns Some, or panics after `within` with `what` and the logs.
    fn wait<T>(&self, what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                eprintln!("  {what}: {:.1?}", start.elapsed());
                return v;
            }
            if start.elapsed() > within {
                panic!(
                    "timed out after {within:?} waiting for: {what}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kubectl get <kind> <name> -n demo -o json`, or None when it does not exist.
    fn get(&self, kind: &str, name: &str, ns: &str) -> Option<Value> {
        let out = self
            .kube
            .kubectl(&["get", kind, name, "-n", ns, "-o", "json"]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("NotFound"), "kubectl get {kind} {name}: {err}");
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("kubectl json"))
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kube.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits for `phase` with a Ready condition that matches it and observedGeneration equal to
    /// the resource's generation; returns the resource. In namespace demo.
    fn wait_phase(&self, kind: &str, name: &str, phase: &str) -> Value {
        self.wait_phase_in("demo", kind, name, phase)
    }

    /// `wait_phase` in namespace `ns`.
    fn wait_phase_in(&self, ns: &str, kind: &str, name: &str, phase: &str) -> Value {
        let ready = if phase == "Active" { "True" } else { "False" };
        self.wait(
            &format!("{kind} {ns}/{name} phase {phase}"),
            Duration::from_secs(15),
            || {
                let obj = self.get(kind, name, ns)?;
                let status = &obj["status"];
                let cond = status["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Ready")?
                    .clone();
                (status["phase"] == phase
                    && cond["status"] == ready
                    && status["observedGeneration"] == obj["metadata"]["generation"]
                    && cond["observedGeneration"] == obj["metadata"]["generation"])
                    .then_some(obj)
            },
        )
    }

    fn config_map(&self) -> Option<Value> {
        self.get("configmap", CONFIG_MAP, OPERATOR_NS)
    }

    fn lease_holder(&self) -> Option<String> {
        let lease = self.get("lease", LEASE, OPERATOR_NS)?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_string)
    }

    /// A client_credentials access token, or the token endpoint's status.
    fn client_token(&self, client_id: &str, secret: &str) -> Result<String, u16> {
        self.rt.block_on(async {
            let resp = self
                .http
                .post(self.gw().url("/oauth2/token"))
                .basic_auth(client_id, Some(secret))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await
                .expect("token request");
            if resp.status() != StatusCode::OK {
                return Err(resp.status().as_u16());
            }
            let v: Value = resp.json().await.expect("token json");
            Ok(v["access_token"]
                .as_str()
                .expect("access_token")
                .to_string())
        })
    }

    /// GET /mobile/orders/42 with `token`: status and the echoed request (when 200).
    fn call(&self, token: &str) -> (u16, Value) {
        self.rt.block_on(async {
            let resp = self
                .http
                .get(self.gw().url("/mobile/orders/42"))
                .bearer_auth(token)
                .send()
                .await
                .expect("API call");
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            (status, serde_json::from_str(&body).unwrap_or(Value::Null))
        })
    }

    fn assert_calls_ok(&self, what: &str, token: &str) {
        let (status, _) = self.call(token);
        assert_eq!(status, 200, "{what}: API call refused\n{}", self.logs());
    }

    /// The clientId and clientSecret of a credentials Secret.
    fn credentials(&self, secret: &Value) -> (String, String) {
        let get = |k: &str| {
            let b64 = secret["data"][k]
                .as_str()
                .unwrap_or_else(|| panic!("Secret has no {k}: {secret}"));
            String::from_utf8(STANDARD.decode(b64).expect("base64")).expect("utf-8")
        };
        (get("clientId"), get("clientSecret"))
    }
}

/// A browser for the gateway's forms: no redirects followed, the session cookie kept.
struct Browser<'e> {
    env: &'e Env,
    http: reqwest::Client,
    session: Option<String>,
}

struct Page {
    status: StatusCode,
    location: String,
    body: String,
}

impl Page {
    fn hidden(&self, name: &str) -> String {
        flow::input_value(&self.body, name)
            .unwrap_or_else(|| panic!("no hidden {name} in:\n{}", self.body))
    }
}

impl Browser<'_> {
    fn send(&mut self, mut req: reqwest::RequestBuilder) -> Page {
        if let Some(sid) = &self.session {
            req = req.header("cookie", format!("{SESSION_COOKIE}={sid}"));
        }
        self.env.rt.block_on(async {
            let resp = req.send().await.expect("request to the gateway");
            for c in resp.headers().get_all("set-cookie") {
                if let Some(v) = c
                    .to_str()
                    .ok()
                    .and_then(|c| flow::set_cookie_value(c, SESSION_COOKIE))
                {
                    self.session = Some(v.to_string());
                }
            }
            Page {
                status: resp.status(),
                location: resp
                    .headers()
                    .get("location")
                    .and_then(|l| l.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                body: resp.text().await.unwrap_or_default(),
            }
        })
    }

    fn get(&mut self, path: &str) -> Page {
        let req = self.http.get(self.env.gw().url(path));
        self.send(req)
    }

    fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let req = self.http.post(self.env.gw().url(path)).form(fields);
        self.send(req)
    }
}

/// Signup, consent and code exchange with PKCE for `client_id`; returns the access token.
fn pkce_tokens(env: &Env, client_id: &str, email: &str) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut b = Browser {
        env,
        http,
        session: None,
    };
    let verifier = format!(
        "verifier-{}-0123456789abcdefghijklmnopqrstuvwxyz",
        email.len()
    );
    let challenge = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    let state = "st4te-kube";
    let authorize = format!(
        "/oauth2/authorize?{}",
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("scope", "profile")
            .append_pair("state", state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .finish()
    );
    let login = b.get(&authorize);
    assert_eq!(
        login.status,
        StatusCode::OK,
        "authorize: {}\n{}",
        login.body,
        env.logs()
    );
    let signup = b.get(&format!("/signup?req={}", login.hidden("req")));
    assert_eq!(signup.status, StatusCode::OK, "{}", signup.body);
    let (csrf, req) = (signup.hidden("csrf"), signup.hidden("req"));
    let done = b.post(
        "/signup",
        &[
            ("csrf", &csrf),
            ("req", &req),
            ("email", email),
            ("password", flow::PASSWORD),
        ],
    );
    assert!(
        done.location.starts_with("/consent?req="),
        "signup: {} {} {}\n{}",
        done.status,
        done.location,
        done.body,
        env.logs()
    );
    let mut page = b.get(&done.location);
    if page.status == StatusCode::OK {
        assert!(page.body.contains("action=\"/consent\""), "{}", page.body);
        let (csrf, req) = (page.hidden("csrf"), page.hidden("req"));
        page = b.post(
            "/consent",
            &[("csrf", &csrf), ("req", &req), ("decision", "allow")],
        );
    }
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let (base, query) = page
        .location
        .split_once('?')
        .unwrap_or_else(|| panic!("no query in {}", page.location));
    assert_eq!(base, REDIRECT, "{}", page.location);
    let params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(param("state").as_deref(), Some(state), "{}", page.location);
    let code = param("code").unwrap_or_else(|| panic!("no code: {}", page.location));
    env.rt.block_on(async {
        let resp = env
            .http
            .post(env.gw().url("/oauth2/token"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("client_id", client_id),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
            ])
            .send()
            .await
            .expect("token request");
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(
            status,
            StatusCode::OK,
            "code exchange: {body}\n{}",
            env.logs()
        );
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    })
}

fn install_crds(kube: &KubeApiServer) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("crds"))
        .expect("crds/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        kube.kubectl_ok(&["apply", "--server-side", "-f", &file.display().to_string()]);
    }
    let mut args = vec!["wait", "--for=condition=Established", "--timeout=30s"];
    let names: Vec<String> = CRDS.iter().map(|c| format!("crd/{c}")).collect();
    args.extend(names.iter().map(String::as_str));
    kube.kubectl_ok(&args);
}

/// A copy of examples/mobile with the Api's upstream at `upstream`, plus [`EXTRA`].
fn write_manifests(dir: &Path, upstream: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let examples = repo().join("examples/mobile");
    for entry in std::fs::read_dir(&examples).expect("examples/mobile") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let text = if path.file_name().is_some_and(|n| n == "api.yaml") {
            assert!(text.contains("http://127.0.0.1:9001"), "{text}");
            text.replace("http://127.0.0.1:9001", upstream)
        } else {
            text
        };
        std::fs::write(dir.join(path.file_name().unwrap()), text).unwrap();
    }
    std::fs::write(dir.join("zz-extra.yaml"), EXTRA).unwrap();
}

fn setup() -> Env {
    let dir = tempfile::tempdir().unwrap();
    // Build both binaries before the clocks below start.
    workspace_bin("gatehouse-operator", "gatehouse-operator");
    workspace_bin("gatehouse-gateway", "gatehouse-gateway");
    let t = Instant::now();

    let mut kube = KubeApiServer::start_with(KubeOptions {
        controller_manager: false,
    });
    install_crds(&kube);
    kube.start_controller_manager();
    kube.kubectl_ok(&["create", "namespace", OPERATOR_NS]);
    eprintln!(
        "API server, CRDs and controller-manager: {:.1?}",
        t.elapsed()
    );

    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let upstream = rt.block_on(gatehouse_tests::echo::spawn());
    let manifests = dir.path().join("manifests");
    write_manifests(&manifests, &format!("http://{upstream}"));

    let kubeconfig = kube.kubeconfig_path().to_path_buf();
    let operators = vec![
        Operator::start(dir.path(), &kubeconfig, "operator-a"),
        Operator::start(dir.path(), &kubeconfig, "operator-b"),
    ];
    Env {
        rt,
        http: reqwest::Client::new(),
        gw: None,
        operators,
        _redis: redis,
        kube,
        manifests,
        _dir: dir,
    }
}

#[test]
fn kube_operator_end_to_end() {
    let started = Instant::now();
    let mut env = setup();
    let manifests = env.manifests.display().to_string();
    env.kubectl_ok(&["apply", "-f", &manifests]);

    // --- 1. statuses ------------------------------------------------------------------------
    eprintln!("1. statuses");
    env.wait_phase("apis.gatehouse.dev", "mobile", "Active");
    for plan in ["basic", "premium"] {
        env.wait_phase("plans.gatehouse.dev", plan, "Active");
    }
    for app in ["demo-app", "demo-service", "demo-backend", "demo-partner"] {
        env.wait_phase("applications.gatehouse.dev", app, "Active");
    }
    for sub in [
        "demo-app-mobile",
        "demo-service-mobile",
        "demo-backend-mobile",
    ] {
        let obj = env.wait_phase("subscriptions.gatehouse.dev", sub, "Active");
        assert!(
            obj["status"]["clientId"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{sub} has no status.clientId: {obj}"
        );
    }
    let app_sub = env
        .get("subscriptions.gatehouse.dev", "demo-app-mobile", "demo")
        .unwrap();
    assert_eq!(app_sub["status"]["clientId"], "demo-app-mobile");
    let backend_sub = env
        .get("subscriptions.gatehouse.dev", "demo-backend-mobile", "demo")
        .unwrap();
    let backend_client_id = backend_sub["status"]["clientId"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        backend_client_id.starts_with("demo-backend-mobile-"),
        "generated client id: {backend_client_id}"
    );
    let partner = env.wait_phase(
        "subscriptions.gatehouse.dev",
        "demo-partner-mobile",
        "PendingApproval",
    );
    eprintln!(
        "  pending: {}",
        partner["status"]["conditions"][0]["message"]
    );
    let table = env.kubectl_ok(&["get", "subscriptions.gatehouse.dev", "-n", "demo"]);
    eprintln!("{table}");
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.contains("PHASE") && header.contains("CLIENT ID"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("demo-backend-mobile "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("Active") && row.contains(&backend_client_id),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("demo-partner-mobile ") && l.contains("PendingApproval")),
        "{table}"
    );

    // --- 2. generated Secret, ConfigMap, idempotent publishing -----------------------------
    eprintln!("2. Secret and ConfigMap");
    let secret = env.wait(
        "Secret demo-backend-mobile-credentials",
        Duration::from_secs(10),
        || env.get("secret", "demo-backend-mobile-credentials", "demo"),
    );
    let (cid, backend_secret) = env.credentials(&secret);
    assert_eq!(cid, backend_client_id);
    assert_eq!(backend_secret.len(), 64, "256-bit hex secret");
    let owners = secret["metadata"]["ownerReferences"]
        .as_array()
        .unwrap_or_else(|| panic!("no ownerReferences: {secret}"));
    assert_eq!(owners.len(), 1, "{secret}");
    assert_eq!(owners[0]["kind"], "Subscription");
    assert_eq!(owners[0]["name"], "demo-backend-mobile");
    assert_eq!(owners[0]["uid"], backend_sub["metadata"]["uid"]);
    assert_eq!(
        backend_sub["status"]["credentialsSecret"], "demo-backend-mobile-credentials",
        "{backend_sub}"
    );
    // The status records the very Secret the operator created (only it is adopted).
    assert_eq!(
        backend_sub["status"]["credentialsSecretUid"], secret["metadata"]["uid"],
        "{backend_sub}"
    );
    // Public clients and subscriptions with their own Secret get none.
    assert!(
        env.get("secret", "demo-app-mobile-credentials", "demo")
            .is_none()
    );
    assert!(
        env.get("secret", "demo-partner-mobile-credentials", "demo")
            .is_none()
    );

    let cm = env.wait("ConfigMap published", Duration::from_secs(10), || {
        env.config_map()
    });
    let hash = cm["metadata"]["annotations"][HASH_ANNOTATION]
        .as_str()
        .unwrap_or_else(|| panic!("no hash annotation: {}", cm["metadata"]))
        .to_string();
    let rv = cm["metadata"]["resourceVersion"].clone();
    let sub_rv = env
        .get("subscriptions.gatehouse.dev", "demo-app-mobile", "demo")
        .unwrap()["metadata"]["resourceVersion"]
        .clone();
    // A no-op re-apply plus a change the configuration does not depend on (triggers a reconcile).
    env.kubectl_ok(&["apply", "-f", &manifests]);
    env.kubectl_ok(&[
        "annotate",
        "plans.gatehouse.dev",
        "basic",
        "-n",
        "demo",
        "example.com/touched=1",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let cm2 = env.config_map().unwrap();
    assert_eq!(
        cm2["metadata"]["resourceVersion"],
        rv,
        "the ConfigMap was rewritten without a change\n{}",
        env.logs()
    );
    assert_eq!(
        cm2["metadata"]["annotations"][HASH_ANNOTATION],
        hash.as_str()
    );
    let sub_rv2 = env
        .get("subscriptions.gatehouse.dev", "demo-app-mobile", "demo")
        .unwrap()["metadata"]["resourceVersion"]
        .clone();
    assert_eq!(
        sub_rv,
        sub_rv2,
        "the Subscription's status was rewritten without a change\n{}",
        env.logs()
    );
    // A created Secret's uid is recorded at once and the pass's status write still applies: no
    // status write was refused as decided on an older version.
    for op in &env.operators {
        let metrics = http_body(op.admin, "/metrics").unwrap_or_default();
        let conflicts: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("gatehouse_operator_status_conflicts_total"))
            .collect();
        assert!(conflicts.is_empty(), "{conflicts:?}\n{}", env.logs());
    }

    // --- 3. gateway: PKCE flow and client_credentials ---------------------------------------
    eprintln!("3. gateway");
    let kubeconfig = env.kube.kubeconfig_path().display().to_string();
    let redis_url = env._redis.url();
    let t = Instant::now();
    let gw_dir = env._dir.path().to_path_buf();
    env.gw = Some(Gateway::launch_args(
        &gw_dir,
        &[
            "--kube",
            "--config-map",
            &format!("{OPERATOR_NS}/{CONFIG_MAP}"),
            "--redis",
            &redis_url,
        ],
        &[("KUBECONFIG", &kubeconfig)],
    ));
    env.wait("gateway ready", Duration::from_secs(30), || {
        (gatehouse_tests::procs::http_status(env.gw().admin, "/readyz") == Some(200)).then_some(())
    });
    eprintln!("  gateway ready in {:.1?}", t.elapsed());
    let user_token = pkce_tokens(&env, "demo-app-mobile", "kube-user@example.com");
    let (status, echo) = env.call(&user_token);
    assert_eq!(status, 200, "{echo}\n{}", env.logs());
    let user_id = echo["headers"]["x-authenticated-userid"][0]
        .as_str()
        .unwrap_or_default();
    assert!(!user_id.is_empty(), "no X-Authenticated-UserId: {echo}");
    eprintln!("  PKCE flow ok (user {user_id})");
    let backend_token = env
        .client_token(&backend_client_id, &backend_secret)
        .unwrap_or_else(|s| {
            panic!(
                "client_credentials with the generated secret: {s}\n{}",
                env.logs()
            )
        });
    env.assert_calls_ok("generated credentials", &backend_token);
    let service_token = env
        .client_token(
            "demo-service-mobile",
            "demo-secret-change-me-0123456789abcdef",
        )
        .unwrap_or_else(|s| {
            panic!(
                "client_credentials with the example secret: {s}\n{}",
                env.logs()
            )
        });
    env.assert_calls_ok("example credentials", &service_token);

    // Rotating a client secret is editing its Secret (the operator watches Secrets' metadata
    // and reads a named Secret again when its resourceVersion changes).
    let rotated = "rotated-secret-0123456789abcdef0123456789";
    env.kubectl_ok(&[
        "patch",
        "secret",
        "demo-service-mobile-credentials",
        "-n",
        "demo",
        "--type=merge",
        "-p",
        &format!(r#"{{"stringData":{{"clientSecret":"{rotated}"}}}}"#),
    ]);
    env.wait(
        "the rotated secret accepted",
        Duration::from_secs(15),
        || {
            std::thread::sleep(Duration::from_millis(300));
            env.client_token("demo-service-mobile", rotated).ok()
        },
    );
    assert_eq!(
        env.client_token(
            "demo-service-mobile",
            "demo-secret-change-me-0123456789abcdef"
        ),
        Err(401),
        "the secret rotated away still works"
    );

    // --- 4. plan limit change ---------------------------------------------------------------
    eprintln!("4. plan limit change");
    env.kubectl_ok(&[
        "patch",
        "plans.gatehouse.dev",
        "basic",
        "-n",
        "demo",
        "--type=merge",
        "-p",
        r#"{"spec":{"rateLimits":[{"requests":2,"per":"second"}]}}"#,
    ]);
    env.wait(
        "3rd call of a burst gets 429",
        Duration::from_secs(10),
        || {
            let codes: Vec<u16> = (0..3).map(|_| env.call(&service_token).0).collect();
            if codes == [200, 200, 429] {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(1100));
            None
        },
    );
    env.wait_phase("plans.gatehouse.dev", "basic", "Active");
    std::thread::sleep(Duration::from_millis(1100));

    // --- 5. invalid resources ----------------------------------------------------------------
    eprintln!("5. invalid resources");
    env.kube.apply(
        "apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {name: broken, namespace: demo}
spec:
  pathPrefix: mobile-no-slash
  upstream: {url: 'http://127.0.0.1:9'}
  plans: [basic]
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: orphan-app, namespace: demo}
spec:
  owner: dev@example.com
  clientType: public
  redirectUris: ['myapp://orphan']
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: orphan-app-mobile, namespace: demo}
spec:
  application: orphan-app
  api: mobile
  plan: gold
",
    );
    let broken = env.wait_phase("apis.gatehouse.dev", "broken", "Invalid");
    let msg = broken["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("  Api broken: {msg}");
    assert!(msg.contains("pathPrefix") || msg.contains('/'), "{broken}");
    let orphan = env.wait_phase(
        "subscriptions.gatehouse.dev",
        "orphan-app-mobile",
        "Invalid",
    );
    let msg = orphan["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("  Subscription orphan-app-mobile: {msg}");
    assert!(
        msg.contains("gold"),
        "message should name the missing plan: {orphan}"
    );
    // clientSecretRef naming a Secret without the opt-in label (here, some other workload's
    // password): not a client secret, and the status tells nothing of its content.
    env.kube.apply(
        "apiVersion: v1
kind: Secret
metadata: {name: db-password, namespace: demo}
type: Opaque
stringData: {password: not-a-client-secret-0123456789abcdef}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: borrower, namespace: demo}
spec: {owner: dev@example.com, clientType: confidential, redirectUris: []}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: borrower-mobile, namespace: demo}
spec:
  application: borrower
  api: mobile
  plan: basic
  grants: [client_credentials]
  clientSecretRef: {name: db-password, key: password}
",
    );
    let borrower = env.wait_phase("subscriptions.gatehouse.dev", "borrower-mobile", "Invalid");
    let cond = &borrower["status"]["conditions"][0];
    assert_eq!(cond["reason"], "MissingClientSecret", "{borrower}");
    let msg = cond["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("labelled gatehouse.dev/client-secret=true"),
        "{msg}"
    );
    // Labelling it is the owner's consent; the label changes the Secret's resourceVersion, so
    // the operator reads it again.
    env.kubectl_ok(&[
        "label",
        "secret",
        "db-password",
        "-n",
        "demo",
        "gatehouse.dev/client-secret=true",
    ]);
    let borrower = env.wait_phase("subscriptions.gatehouse.dev", "borrower-mobile", "Active");
    let borrower_id = borrower["status"]["clientId"].as_str().expect("clientId");
    env.wait(
        "the labelled Secret's value works as the client secret",
        Duration::from_secs(15),
        || {
            env.client_token(borrower_id, "not-a-client-secret-0123456789abcdef")
                .ok()
        },
    );
    // A Secret that merely has the name the operator would generate is never adopted: neither
    // another workload's (unlabelled; the operator does not even read it) nor one labelled
    // for clientSecretRef. Each subscription stays out, its status naming no key or length.
    env.kube.apply(
        "apiVersion: v1
kind: Secret
metadata: {name: payments-credentials, namespace: demo}
type: Opaque
stringData: {clientSecret: other-workloads-secret-0123456789abcdef}
---
apiVersion: v1
kind: Secret
metadata:
  name: shared-credentials
  namespace: demo
  labels: {gatehouse.dev/client-secret: 'true'}
type: Opaque
stringData: {clientSecret: labelled-but-not-generated-0123456789abcdef}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: squatter, namespace: demo}
spec: {owner: dev@example.com, clientType: confidential, redirectUris: []}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: payments, namespace: demo}
spec: {application: squatter, api: mobile, plan: basic, clientId: payments, grants: [client_credentials]}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: squatter-2, namespace: demo}
spec: {owner: dev@example.com, clientType: confidential, redirectUris: []}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: shared, namespace: demo}
spec: {application: squatter-2, api: mobile, plan: basic, clientId: shared, grants: [client_credentials]}
",
    );
    for (name, reason, value) in [
        (
            "payments",
            "CredentialsSecretFailed",
            "other-workloads-secret-0123456789abcdef",
        ),
        (
            "shared",
            "MissingClientSecret",
            "labelled-but-not-generated-0123456789abcdef",
        ),
    ] {
        let sub = env.wait_phase("subscriptions.gatehouse.dev", name, "Invalid");
        let cond = &sub["status"]["conditions"][0];
        assert_eq!(cond["reason"], reason, "{sub}");
        let msg = cond["message"].as_str().unwrap_or_default();
        assert!(
            !msg.contains("bytes long") && !msg.contains("no key"),
            "{msg}"
        );
        assert!(
            env.client_token(name, value).is_err(),
            "{name}: a Secret with the generated name works as its client secret"
        );
        eprintln!("  {name}: {msg}");
    }
    env.wait_phase("subscriptions.gatehouse.dev", "demo-app-mobile", "Active");
    env.wait_phase("apis.gatehouse.dev", "mobile", "Active");
    std::thread::sleep(Duration::from_secs(1));
    env.assert_calls_ok("user token with invalid neighbours", &user_token);
    std::thread::sleep(Duration::from_millis(600));
    env.assert_calls_ok("service token with invalid neighbours", &service_token);
    std::thread::sleep(Duration::from_millis(600));
    env.assert_calls_ok("backend token with invalid neighbours", &backend_token);

    // --- 5b. one namespace cannot take another's path prefix ------------------------------------
    // tenant/first is older than demo/second; once demo/second serves /second, first moving onto
    // /second/x must not take part of its paths, nor knock it out by being older.
    eprintln!("5b. path prefixes across namespaces");
    env.kubectl_ok(&["create", "namespace", "tenant"]);
    let api_yaml = |ns: &str, name: &str, prefix: &str| {
        format!(
            "apiVersion: gatehouse.dev/v1alpha1
kind: Plan
metadata: {{name: {name}-plan, namespace: {ns}}}
spec: {{}}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Api
metadata: {{name: {name}, namespace: {ns}}}
spec:
  pathPrefix: {prefix}
  upstream: {{url: 'http://127.0.0.1:9'}}
  plans: [{name}-plan]
  auth: {{grants: [client_credentials]}}
"
        )
    };
    let tenant_phase =
        |phase: &str| env.wait_phase_in("tenant", "apis.gatehouse.dev", "first", phase);
    env.kube.apply(&api_yaml("tenant", "first", "/first"));
    tenant_phase("Active");
    // Creation times have one-second resolution: make demo/second clearly the newer.
    std::thread::sleep(Duration::from_millis(1100));
    env.kube.apply(&api_yaml("demo", "second", "/second"));
    // A pass writes statuses, then publishes; the next pass (which sees the edit below) starts
    // after that, so it finds demo/second in the published configuration.
    env.wait_phase("apis.gatehouse.dev", "second", "Active");
    env.kube.apply(&api_yaml("tenant", "first", "/second/x"));
    let moved = tenant_phase("Invalid");
    let msg = moved["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("  Api tenant/first: {msg}");
    assert!(msg.contains("demo/second"), "{moved}");
    assert_eq!(
        moved["status"]["conditions"][0]["reason"], "PathPrefixConflict",
        "{moved}"
    );
    env.wait_phase("apis.gatehouse.dev", "second", "Active");
    env.kubectl_ok(&["delete", "apis.gatehouse.dev", "second", "-n", "demo"]);
    tenant_phase("Active");
    env.kubectl_ok(&["delete", "namespace", "tenant", "--wait=false"]);

    // --- approval ------------------------------------------------------------------------------
    eprintln!("approval");
    assert!(
        env.client_token("demo-partner-mobile", "anything").is_err(),
        "a pending subscription got a token"
    );
    // While it waits, someone allowed to create Secrets (not to read them) plants one under the
    // name the operator will generate, claiming the subscription as its controller (its uid is
    // readable by all who can list Subscriptions), with a client secret of their choosing.
    let pending = env
        .get("subscriptions.gatehouse.dev", "demo-partner-mobile", "demo")
        .unwrap();
    let planted = "chosen-by-the-planter-0123456789abcdef";
    env.kube.apply(&format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: demo-partner-mobile-credentials
  namespace: demo
  ownerReferences:
  - {{apiVersion: gatehouse.dev/v1alpha1, kind: Subscription, name: demo-partner-mobile, uid: {}, controller: true}}
type: Opaque
stringData: {{clientSecret: {planted}}}
",
        pending["metadata"]["uid"].as_str().unwrap()
    ));
    env.kubectl_ok(&[
        "annotate",
        "subscriptions.gatehouse.dev",
        "demo-partner-mobile",
        "-n",
        "demo",
        "gatehouse.dev/approved=true",
    ]);
    let refused = env.wait(
        "the approved subscription refuses the planted Secret",
        Duration::from_secs(15),
        || {
            let sub = env.get("subscriptions.gatehouse.dev", "demo-partner-mobile", "demo")?;
            (sub["status"]["conditions"][0]["reason"] == "MissingClientSecret").then_some(sub)
        },
    );
    let partner_id = refused["status"]["clientId"].as_str().unwrap().to_string();
    // The status said so before the approval too; for 5 s after it (the operator reconciles
    // within a second of a change, the gateways reload within another) it stays refused and
    // the planted value gets no token.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        let sub = env
            .get("subscriptions.gatehouse.dev", "demo-partner-mobile", "demo")
            .unwrap();
        assert_eq!(sub["status"]["phase"], "Invalid", "{sub}");
        assert_eq!(
            env.client_token(&partner_id, planted),
            Err(401),
            "the planted Secret's value works as the client secret"
        );
    }
    // Its administrator deletes it, as the status says; the operator generates its own.
    env.kubectl_ok(&[
        "delete",
        "secret",
        "demo-partner-mobile-credentials",
        "-n",
        "demo",
    ]);
    let partner = env.wait_phase(
        "subscriptions.gatehouse.dev",
        "demo-partner-mobile",
        "Active",
    );
    let partner_id = partner["status"]["clientId"].as_str().unwrap().to_string();
    let partner_secret = env.wait(
        "Secret demo-partner-mobile-credentials",
        Duration::from_secs(10),
        || env.get("secret", "demo-partner-mobile-credentials", "demo"),
    );
    let (pid, psecret) = env.credentials(&partner_secret);
    assert_eq!(pid, partner_id);
    assert_ne!(psecret, planted);
    assert_eq!(
        partner["status"]["credentialsSecretUid"], partner_secret["metadata"]["uid"],
        "{partner}"
    );
    let partner_token = env.wait(
        "approved client in the gateway",
        Duration::from_secs(10),
        || env.client_token(&partner_id, &psecret).ok(),
    );
    env.assert_calls_ok("approved subscription", &partner_token);
    // spec.clientId set later: the Secret's clientId follows, its secret stays.
    env.kubectl_ok(&[
        "patch",
        "subscriptions.gatehouse.dev",
        "demo-partner-mobile",
        "-n",
        "demo",
        "--type=merge",
        "-p",
        r#"{"spec":{"clientId":"partner-renamed"}}"#,
    ]);
    env.wait(
        "the credentials Secret names the new client id",
        Duration::from_secs(10),
        || {
            let s = env.get("secret", "demo-partner-mobile-credentials", "demo")?;
            let (id, secret) = env.credentials(&s);
            assert_eq!(secret, psecret, "the secret was kept");
            (id == "partner-renamed").then_some(())
        },
    );
    env.wait(
        "the renamed client in the gateway",
        Duration::from_secs(10),
        || env.client_token("partner-renamed", &psecret).ok(),
    );

    // --- 6. deleting a subscription ----------------------------------------------------------
    eprintln!("6. deletion");
    env.kube.wait_garbage_collector_knows(
        "gatehouse.dev/v1alpha1, Resource=subscriptions",
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_millis(600));
    env.assert_calls_ok("backend token before deletion", &backend_token);
    env.kubectl_ok(&[
        "delete",
        "subscriptions.gatehouse.dev",
        "demo-backend-mobile",
        "-n",
        "demo",
    ]);
    env.wait(
        "tokens of the deleted subscription get 401",
        Duration::from_secs(10),
        || {
            std::thread::sleep(Duration::from_millis(500));
            (env.call(&backend_token).0 == 401).then_some(())
        },
    );
    assert_eq!(
        env.client_token(&backend_client_id, &backend_secret),
        Err(401),
        "the deleted client still gets tokens"
    );
    env.wait("Secret garbage-collected", Duration::from_secs(30), || {
        env.get("secret", "demo-backend-mobile-credentials", "demo")
            .is_none()
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(600));
    env.assert_calls_ok("other subscriptions after deletion", &service_token);

    // --- 6b. a Secret the API server refuses ----------------------------------------------------
    // An admission policy refuses one generated Secret (as a quota or a site policy could): that
    // subscription stays out of the configuration and every other change keeps reaching the
    // gateways (step 7 waits for one). A name too long for its generated Secret is reported by
    // compile instead, before any Secret is tried.
    eprintln!("6b. a Secret that cannot be created");
    env.kube.apply(
        "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: test-refuse-one-secret}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {apiGroups: [''], apiVersions: [v1], operations: [CREATE], resources: [secrets]}
  validations:
    - {expression: \"object.metadata.name != 'refused-credentials'\", message: refused by the test's policy}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: test-refuse-one-secret}
spec: {policyName: test-refuse-one-secret, validationActions: [Deny]}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: refused-app, namespace: demo}
spec: {owner: dev@example.com, clientType: confidential, redirectUris: []}
",
    );
    // Policies take effect a moment after they are created.
    env.wait("the policy in force", Duration::from_secs(20), || {
        let out = env.kube.kubectl(&[
            "create",
            "secret",
            "generic",
            "refused-credentials",
            "-n",
            "demo",
            "--from-literal=probe=1",
        ]);
        if out.status.success() {
            env.kubectl_ok(&["delete", "secret", "refused-credentials", "-n", "demo"]);
            std::thread::sleep(Duration::from_millis(300));
            return None;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("refused by the test's policy"), "{err}");
        Some(())
    });
    let long_name = format!("long-{}", "x".repeat(240));
    for (name, app, client_id) in [
        ("refused", "refused-app", "refused-client"),
        (long_name.as_str(), "demo-backend", "long-name-client"),
    ] {
        env.kube.apply(&format!(
            "apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {{name: {name}, namespace: demo}}
spec:
  application: {app}
  api: mobile
  plan: basic
  clientId: {client_id}
  grants: [client_credentials]
"
        ));
    }
    let long = env.wait_phase("subscriptions.gatehouse.dev", &long_name, "Invalid");
    let message = long["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("Kubernetes names are at most 253"),
        "the too-long subscription's message: {message}"
    );
    let refused = env.wait_phase("subscriptions.gatehouse.dev", "refused", "Invalid");
    let condition = &refused["status"]["conditions"][0];
    assert_eq!(condition["reason"], "CredentialsSecretFailed", "{refused}");
    // The API server's reason and code; its words (the operator's account, the policy's
    // message) stay in the operator's log.
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the API server refused it (") && message.contains("HTTP 4"),
        "{refused}"
    );
    assert!(
        !message.contains("refused by the test's policy"),
        "{refused}"
    );
    assert!(
        env.get("secret", "refused-credentials", "demo").is_none(),
        "the policy let the Secret through"
    );
    // A Secret of the generated name that is not Opaque (invisible to the operator's watch):
    // creating the generated one is a conflict, and the subscription stays out rather than
    // being published with a secret nobody holds.
    env.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "typed-credentials",
        "-n",
        "demo",
        "--type=kubernetes.io/basic-auth",
        "--from-literal=username=u",
        "--from-literal=password=p",
    ]);
    env.kube.apply(
        "apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: typed-app, namespace: demo}
spec: {owner: dev@example.com, clientType: confidential, redirectUris: []}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: typed, namespace: demo}
spec: {application: typed-app, api: mobile, plan: basic, clientId: typed-client, grants: [client_credentials]}
",
    );
    env.wait_phase("applications.gatehouse.dev", "typed-app", "Active");
    let typed = env.wait_phase("subscriptions.gatehouse.dev", "typed", "Invalid");
    assert_eq!(
        typed["status"]["conditions"][0]["reason"], "CredentialsSecretFailed",
        "{typed}"
    );

    // --- 6c. a configuration that cannot be published ---------------------------------------
    // A policy refuses every write to the gateways' ConfigMap (as RBAC or a size limit could):
    // a new subscription must not read Ready while the gateways cannot have it, and becomes
    // Ready once the configuration is published.
    eprintln!("6c. a configuration that cannot be published");
    env.kube.apply(&format!(
        "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: test-refuse-publish}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {{apiGroups: [''], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [configmaps]}}
  validations:
    - {{expression: \"object.metadata.name != '{CONFIG_MAP}'\", message: publishing refused by the test's policy}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: test-refuse-publish}}
spec: {{policyName: test-refuse-publish, validationActions: [Deny]}}
"
    ));
    env.wait(
        "the publish policy in force",
        Duration::from_secs(20),
        || {
            let out = env.kube.kubectl(&[
                "annotate",
                "configmap",
                CONFIG_MAP,
                "-n",
                OPERATOR_NS,
                "--overwrite",
                "gatehouse.test/probe=1",
            ]);
            if out.status.success() {
                std::thread::sleep(Duration::from_millis(300));
                return None;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("publishing refused"), "{err}");
            Some(())
        },
    );
    env.kube.apply(
        "apiVersion: gatehouse.dev/v1alpha1
kind: Application
metadata: {name: unpublished-app, namespace: demo}
spec: {owner: dev@example.com, clientType: confidential, redirectUris: []}
---
apiVersion: gatehouse.dev/v1alpha1
kind: Subscription
metadata: {name: unpublished-mobile, namespace: demo}
spec: {application: unpublished-app, api: mobile, plan: basic, grants: [client_credentials]}
",
    );
    let unpublished = env.wait(
        "the new subscription Ready=False PublishFailed",
        Duration::from_secs(15),
        || {
            let sub = env.get("subscriptions.gatehouse.dev", "unpublished-mobile", "demo")?;
            let ready = &sub["status"]["conditions"][0];
            (ready["status"] == "False" && ready["reason"] == "PublishFailed").then_some(sub)
        },
    );
    let message = unpublished["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("cannot publish"), "{unpublished}");
    // The operator's error (its account, namespace, the policy's words) stays in its log.
    assert!(!message.contains("publishing refused"), "{unpublished}");
    // What the gateways already serve still reads Ready; the new client they do not know.
    env.wait_phase("subscriptions.gatehouse.dev", "demo-app-mobile", "Active");
    let secret = env
        .get("secret", "unpublished-mobile-credentials", "demo")
        .expect("the generated credentials");
    let (client_id, client_secret) = env.credentials(&secret);
    assert!(
        env.client_token(&client_id, &client_secret).is_err(),
        "the gateways serve a client whose configuration was never published"
    );
    env.kubectl_ok(&[
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        "test-refuse-publish",
    ]);
    env.wait_phase(
        "subscriptions.gatehouse.dev",
        "unpublished-mobile",
        "Active",
    );
    env.wait(
        "the gateways serve the published client",
        Duration::from_secs(15),
        || env.client_token(&client_id, &client_secret).ok(),
    );

    // --- 7. leader hand-over -------------------------------------------------------------------
    eprintln!("7. leader hand-over");
    let leader = env.wait("a lease holder", Duration::from_secs(5), || {
        env.lease_holder()
    });
    let idx = env
        .operators
        .iter()
        .position(|o| o.identity == leader)
        .unwrap_or_else(|| panic!("unknown lease holder {leader}"));
    let standby = env.operators[1 - idx].identity.clone();
    let standby_admin = env.operators[1 - idx].admin;
    assert_eq!(
        gatehouse_tests::procs::http_status(standby_admin, "/readyz"),
        Some(200),
        "the standby is ready"
    );
    env.operators[idx].kill();
    let killed = Instant::now();
    env.kubectl_ok(&[
        "patch",
        "plans.gatehouse.dev",
        "basic",
        "-n",
        "demo",
        "--type=merge",
        "-p",
        r#"{"spec":{"rateLimits":[{"requests":50,"per":"second"}]}}"#,
    ]);
    env.wait(
        "the standby holds the lease",
        Duration::from_secs(25),
        || (env.lease_holder().as_deref() == Some(standby.as_str())).then_some(()),
    );
    env.wait_phase("plans.gatehouse.dev", "basic", "Active");
    env.wait(
        "the new leader's limit in the gateway",
        Duration::from_secs(10),
        || {
            let codes: Vec<u16> = (0..5).map(|_| env.call(&service_token).0).collect();
            if codes.iter().all(|c| *c == 200) {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(1100));
            None
        },
    );
    eprintln!(
        "hand-over complete {:.1?} after killing the leader",
        killed.elapsed()
    );
    // Stopped as Kubernetes stops a pod, the leader gives the Lease up and exits cleanly, so a
    // standby need not wait for it to expire.
    let status = env.operators[1 - idx].terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        env.lease_holder(),
        None,
        "the lease was released on SIGTERM"
    );
    eprintln!("total {:.1?}", started.elapsed());
}
