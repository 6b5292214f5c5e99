//! A real Kubernetes API server for tests, without Docker: etcd, kube-apiserver and (optionally)
//! kube-controller-manager as processes on free loopback ports, with a private temp directory,
//! generated certificates, a static admin token and a kubeconfig.
//!
//! The binaries are built once per machine by `scripts/kube-tools.sh` into
//! `${GATEHOUSE_TOOLS_DIR:-$HOME/.cache/gatehouse-tools}/<KUBE_VERSION>/`. Certificates and the
//! service-account key are generated with the `openssl` command-line tool.
//!
//! What this is: the real API server with real validation, defaulting, CRD structural-schema
//! checks, RBAC, watches and (with the controller-manager) owner-reference garbage collection and
//! namespace deletion. What it is not: a cluster. There is no kubelet and no scheduler, so pods
//! never run.
//!
//! ```no_run
//! let kube = gatehouse_tests::kube::KubeApiServer::start();
//! let out = kube.kubectl_ok(&["get", "namespaces", "-o", "name"]);
//! assert!(out.contains("namespace/default"));
//! // kube-rs clients: KUBECONFIG=kube.kubeconfig_path()
//! ```

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::procs::{free_port, http_status};

/// The Kubernetes release `scripts/kube-tools.sh` builds (keep the two in sync; a unit test
/// below checks the script).
pub const KUBE_VERSION: &str = "v1.33.13";

/// How long to wait for kube-apiserver's /readyz.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The directory holding the binaries for [`KUBE_VERSION`].
pub fn tools_dir() -> PathBuf {
    let root = match std::env::var_os("GATEHOUSE_TOOLS_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache").join("gatehouse-tools")
        }
    };
    root.join(KUBE_VERSION)
}

/// Path of one cached binary (`kube-apiserver`, `kube-controller-manager`, `kubectl`, `etcd`,
/// `helm`); panics with instructions when it has not been built.
pub fn tool(name: &str) -> PathBuf {
    let path = tools_dir().join(name);
    if !path.is_file() {
        panic!(
            "{name} not found at {}: run scripts/kube-tools.sh first (it builds Kubernetes \
             {KUBE_VERSION}, etcd and helm from their Go modules; needs Go >= 1.24)",
            path.display()
        );
    }
    path
}

/// Are all the binaries there? For tests that want to say why they cannot run.
pub fn tools_available() -> bool {
    [
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
        "etcd",
        "helm",
    ]
    .iter()
    .all(|b| tools_dir().join(b).is_file())
}

/// What to start besides etcd and kube-apiserver.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// kube-controller-manager with `garbagecollector,namespace,serviceaccount`: owner-reference
    /// cleanup, namespace deletion, `default` service accounts. On by default.
    pub controller_manager: bool,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            controller_manager: true,
        }
    }
}

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().expect("dup log")))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name, child, log }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `max` lines of `text`.
fn tail(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max)..].join("\n")
}

/// A running etcd + kube-apiserver (+ kube-controller-manager); everything is killed and the
/// temp directory removed on drop (set `GATEHOUSE_KUBE_KEEP=1` to keep the directory and logs).
pub struct KubeApiServer {
    procs: Vec<Proc>,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    port: u16,
    etcd_url: String,
    token: String,
    kubeconfig: PathBuf,
    startup: Duration,
}

/// Why one attempt to start failed; `retry` when it looks like a lost race for a port.
struct StartError {
    retry: bool,
    message: String,
}

impl KubeApiServer {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until the API server
    /// is ready. Panics with the processes' logs when that fails.
    pub fn start() -> KubeApiServer {
        KubeApiServer::start_with(KubeOptions::default())
    }

    pub fn start_with(options: KubeOptions) -> KubeApiServer {
        for name in ["etcd", "kube-apiserver", "kubectl"] {
            tool(name);
        }
        if options.controller_manager {
            tool("kube-controller-manager");
        }
        let mut last = String::new();
        for _attempt in 0..3 {
            match KubeApiServer::try_start(&options) {
                Ok(kube) => return kube,
                Err(e) if e.retry => last = e.message,
                Err(e) => panic!("{}", e.message),
            }
        }
        panic!("{last}");
    }

    fn try_start(options: &KubeOptions) -> Result<KubeApiServer, StartError> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("gatehouse-kube-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().to_path_buf();
        let token = random_hex(32);
        write_credentials(&path, &token);

        let port = free_port();
        let kubeconfig = path.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(port, &path.join("ca.crt"), &token),
        )
        .expect("writing kubeconfig");

        let mut kube = KubeApiServer {
            procs: Vec::new(),
            dir: Some(dir),
            path,
            port,
            etcd_url: String::new(),
            token,
            kubeconfig,
            startup: Duration::ZERO,
        };
        kube.start_etcd()?;
        kube.start_apiserver()?;
        kube.wait_ready()?;
        if options.controller_manager {
            kube.try_start_controller_manager()?;
        }
        kube.startup = started.elapsed();
        eprintln!(
            "kube-apiserver {KUBE_VERSION} ready at {} in {:.1?} (dir {})",
            kube.server_url(),
            kube.startup,
            kube.path.display()
        );
        Ok(kube)
    }

    fn start_etcd(&mut self) -> Result<(), StartError> {
        let client = free_port();
        let peer = free_port();
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = self.path.join("etcd-data");
        let mut cmd = Command::new(tool("etcd"));
        cmd.arg("--name=gatehouse-test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=gatehouse-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            // A throwaway store: durability is not what the tests are about.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        self.procs.push(Proc::spawn("etcd", &mut cmd, &self.path));
        self.etcd_url = client_url;
        let addr: SocketAddr = format!("127.0.0.1:{client}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.procs[0].exited() {
                let log = self.procs[0].log_text();
                return Err(StartError {
                    retry: log.contains("address already in use"),
                    message: format!("etcd exited with {status}:\n{}", tail(&log, 60)),
                });
            }
            if http_status(addr, "/health") == Some(200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(StartError {
            retry: false,
            message: format!(
                "etcd not healthy within 20 s:\n{}",
                tail(&self.procs[0].log_text(), 60)
            ),
        })
    }

    /// The etcd client URL (for tests that look at storage directly).
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    fn start_apiserver(&mut self) -> Result<(), StartError> {
        let p = &self.path;
        let mut cmd = Command::new(tool("kube-apiserver"));
        cmd.arg(format!("--etcd-servers={}", self.etcd_url()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.port))
            .arg(format!(
                "--cert-dir={}",
                p.join("apiserver-certs").display()
            ))
            .arg(format!(
                "--tls-cert-file={}",
                p.join("server.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                p.join("server.key").display()
            ))
            .arg(format!(
                "--token-auth-file={}",
                p.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-key-file={}",
                p.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p.join("sa.key").display()
            ))
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .arg("--v=1");
        self.procs
            .push(Proc::spawn("kube-apiserver", &mut cmd, &self.path));
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + READY_WITHIN;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.procs[1].exited() {
                let log = self.procs[1].log_text();
                return Err(StartError {
                    retry: log.contains("address already in use"),
                    message: format!("kube-apiserver exited with {status}\n{}", self.logs()),
                });
            }
            let out = self.kubectl(&["get", "--raw", "/readyz", "--request-timeout=2s"]);
            if out.status.success() {
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(StartError {
            retry: false,
            message: format!(
                "kube-apiserver not ready within {READY_WITHIN:?} (last /readyz: {last})\n{}",
                self.logs()
            ),
        })
    }

    /// Starts kube-controller-manager now (for a server started without it). Starting it after
    /// the CRDs are installed makes its garbage collector watch them from its first discovery,
    /// instead of after its next 30 s re-read.
    pub fn start_controller_manager(&mut self) {
        assert!(
            !self
                .procs
                .iter()
                .any(|p| p.name == "kube-controller-manager"),
            "kube-controller-manager already started"
        );
        let started = Instant::now();
        if let Err(e) = self.try_start_controller_manager() {
            panic!("{}", e.message);
        }
        eprintln!(
            "kube-controller-manager started in {:.1?}",
            started.elapsed()
        );
    }

    fn try_start_controller_manager(&mut self) -> Result<(), StartError> {
        let mut cmd = Command::new(tool("kube-controller-manager"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg("--controllers=garbagecollector,namespace,serviceaccount")
            .arg("--leader-elect=false")
            .arg("--secure-port=0")
            .arg("--use-service-account-credentials=false")
            // v=2: logs the resources the garbage collector monitors (see wait_garbage_collector_knows).
            .arg("--v=2");
        self.procs
            .push(Proc::spawn("kube-controller-manager", &mut cmd, &self.path));
        // It starts in well under a second once the API server is ready; fail early and clearly
        // when it cannot run at all (bad flags, cannot reach the server).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let cm = self.procs.last_mut().expect("controller-manager");
            if let Some(status) = cm.exited() {
                return Err(StartError {
                    retry: false,
                    message: format!(
                        "kube-controller-manager exited with {status}\n{}",
                        self.logs()
                    ),
                });
            }
            if cm
                .log_text()
                .contains("\"Started controller\" controller=\"garbage-collector-controller\"")
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(StartError {
            retry: false,
            message: format!(
                "kube-controller-manager did not start its garbage collector within 30 s\n{}",
                self.logs()
            ),
        })
    }

    /// Blocks until the garbage collector monitors `resource` (as it prints a
    /// GroupVersionResource, e.g. `gatehouse.dev/v1alpha1, Resource=subscriptions`). It
    /// re-reads discovery every 30 s, so a CRD created after start is picked up within about
    /// 30 s; owner references to objects of a kind it does not know yet are resolved late.
    pub fn wait_garbage_collector_knows(&mut self, resource: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let cm = self
                .procs
                .iter()
                .find(|p| p.name == "kube-controller-manager")
                .expect("started without the controller-manager");
            let log = cm.log_text();
            let known = log
                .lines()
                .filter(|l| l.contains("syncing garbage collector with updated resources"))
                .any(|l| l.contains(resource));
            if known {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the garbage collector did not pick up {resource} within {within:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `https://127.0.0.1:<port>`
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The admin bearer token (user `admin`, group `system:masters`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A kubeconfig for kubectl, helm and kube-rs (`KUBECONFIG=...`): the server URL, the CA
    /// that signed the serving certificate (a file next to it), and the admin token.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// PEM of the CA that signed kube-apiserver's serving certificate.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.path.join("ca.crt")
    }

    /// The temp directory with certificates, logs and etcd's data.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// From the call to start until the API server answered /readyz (and the controller-manager
    /// was up, when started).
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Runs the cached kubectl against this server (its discovery cache in the temp dir).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("running kubectl")
    }

    /// kubectl with `input` on standard input (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = self
            .kubectl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing kubectl stdin");
        child.wait_with_output().expect("kubectl output")
    }

    /// kubectl that must succeed: returns stdout, panics with stderr and the server logs.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        self.expect_ok("kubectl", args, out)
    }

    /// `kubectl apply -f -` of a YAML (or JSON) document; must succeed.
    pub fn apply(&self, yaml: &str) -> String {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], yaml);
        self.expect_ok("kubectl", &["apply", "-f", "-"], out)
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl_ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kubectl {all:?} printed no JSON ({e}):\n{out}"))
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(tool("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                self.path.join("kubectl-cache").display()
            ))
            .args(args)
            .env_remove("KUBECONFIG");
        cmd
    }

    /// Runs the cached helm against this server (its cache, config and data in the temp dir).
    pub fn helm(&self, args: &[&str]) -> Output {
        Command::new(tool("helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.path.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.path.join("helm/config"))
            .env("HELM_DATA_HOME", self.path.join("helm/data"))
            .stdin(Stdio::null())
            .output()
            .expect("running helm")
    }

    /// helm that must succeed: returns stdout, panics with stderr and the server logs.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        let out = self.helm(args);
        self.expect_ok("helm", args, out)
    }

    fn expect_ok(&self, what: &str, args: &[&str], out: Output) -> String {
        if !out.status.success() {
            panic!(
                "{what} {args:?} failed ({}):\n{}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last lines of every process's log, for panic messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in &self.procs {
            let _ = write!(
                s,
                "\n----- {} ({}), last lines -----\n{}\n",
                p.name,
                p.log.display(),
                tail(&p.log_text(), 40)
            );
        }
        s
    }

    /// Kills every process (controller-manager, API server, etcd, in that order).
    pub fn stop(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            p.kill();
        }
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("GATEHOUSE_KUBE_KEEP").is_some_and(|v| v == "1")
            && let Some(dir) = self.dir.take()
        {
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut f, &mut buf).expect("reading /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}); the Kubernetes test harness needs the openssl CLI")
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a serving certificate for 127.0.0.1/localhost signed by it, the service-account RSA
/// key pair and the static token file.
fn write_credentials(dir: &Path, token: &str) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=gatehouse-test-ca",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-new", "-nodes"];
    csr.extend_from_slice(&ec);
    csr.extend_from_slice(&[
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=kube-apiserver",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectAltName = IP:127.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, \
         DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local, IP:10.0.0.1\n",
    )
    .expect("server.ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
        ],
    );
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
    // token,user,uid,"group,..."
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{token},admin,admin,\"system:masters\"\n"),
    )
    .expect("tokens.csv");
}

fn kubeconfig_yaml(port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: gatehouse-test
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: gatehouse-test
  context:
    cluster: gatehouse-test
    user: admin
    namespace: default
current-context: gatehouse-test
",
        ca = ca.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_matches_the_build_script() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-tools.sh");
        let text = std::fs::read_to_string(&script).expect("scripts/kube-tools.sh");
        assert!(
            text.lines()
                .any(|l| l.trim() == format!("KUBE_VERSION={KUBE_VERSION}")),
            "scripts/kube-tools.sh does not build {KUBE_VERSION}; keep KUBE_VERSION in sync"
        );
    }

    #[test]
    fn tools_dir_honours_the_env_layout() {
        assert!(tools_dir().ends_with(KUBE_VERSION));
    }
}
