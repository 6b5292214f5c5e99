//! Starting the real `gatehouse-gateway` binary for end-to-end tests.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A free loopback port (bound and released; the window for a race is tiny).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Path of a workspace binary, built once per test process with the same profile as the tests.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == bin) {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
        // Cargo sets these for the test process. Build scripts that watch them (ring watches
        // CARGO_MANIFEST_DIR and CARGO_PKG_*) would otherwise rerun, and everything above them
        // would rebuild, on every test binary's first gateway start.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || name.starts_with("CARGO_BIN_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&name.as_ref())
            {
                cmd.env_remove(name.as_ref());
            }
        }
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {bin} failed"
        );
        built.push(bin.to_string());
    }
    profile_dir.join(bin)
}

pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// Starts a gateway with `--manifests` and fresh ports; `extra` are more flags.
    pub fn start(manifests: &Path, data_dir: &Path, extra: &[&str]) -> Gateway {
        let mut gw = Gateway::launch(manifests, data_dir, extra);
        gw.wait_ready(Duration::from_secs(30));
        gw
    }

    /// Starts the process without waiting for readiness (for tests of the not-ready state).
    pub fn launch(manifests: &Path, data_dir: &Path, extra: &[&str]) -> Gateway {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args = vec![
            "--manifests".to_string(),
            manifests.display().to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--listen".to_string(),
            addr.to_string(),
            "--admin-listen".to_string(),
            admin.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = data_dir.with_extension(format!("{}.log", addr.port()));
        let mut gw = Gateway {
            child: None,
            addr,
            admin,
            data_dir: data_dir.to_path_buf(),
            log,
            args,
            env: Vec::new(),
        };
        gw.spawn();
        gw
    }

    /// Starts a gateway with exactly `args` (plus `--listen`/`--admin-listen` on fresh ports) and
    /// the extra environment `env`, e.g. `--kube --config-map NS/NAME` with `KUBECONFIG`; waits
    /// until it is ready. Its log goes into `dir`.
    pub fn start_args(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut gw = Gateway::launch_args(dir, args, env);
        gw.wait_ready(Duration::from_secs(60));
        gw
    }

    /// [`Gateway::start_args`] without waiting for readiness.
    pub fn launch_args(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut all = vec![
            "--listen".to_string(),
            addr.to_string(),
            "--admin-listen".to_string(),
            admin.to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let log = dir.join(format!("gateway-{}.log", addr.port()));
        let mut gw = Gateway {
            child: None,
            addr,
            admin,
            data_dir: dir.to_path_buf(),
            log,
            args: all,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        gw.spawn();
        gw
    }

    fn spawn(&mut self) {
        let bin = workspace_bin("gatehouse-gateway", "gatehouse-gateway");
        let log = std::fs::File::create(&self.log).expect("log file");
        let child = Command::new(bin)
            .args(&self.args)
            .env("GATEHOUSE_LOG", "info,gatehouse_gateway=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone().expect("dup log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting gatehouse-gateway");
        self.child = Some(child);
    }

    /// Blocks until /readyz answers 200, or panics with the gateway's log.
    pub fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("gateway exited with {status}:\n{}", self.logs());
            }
            if http_status(self.admin, "/readyz") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("gateway not ready within {within:?}:\n{}", self.logs());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The admin port's Prometheus text.
    pub async fn metrics(&self) -> String {
        let resp = reqwest::get(self.admin_url("/metrics")).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    /// Peak resident memory of the running gateway (VmHWM), in KiB. Linux only.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// Resident memory of the running gateway now (VmRSS), in KiB. Linux only.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> Option<u64> {
        status_kib(self.child.as_ref()?.id(), field)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the process (SIGKILL: nothing gets a chance to flush; the store must already be durable).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts again with the same ports, flags and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready(Duration::from_secs(30));
    }

    /// Sends SIGTERM (what Kubernetes does on rollout) and waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let status = terminate(self.child.as_mut()?, within)?;
        self.child = None;
        Some(status)
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends SIGTERM and waits up to `within` for the exit; None if the process is still running.
pub fn terminate(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A size field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`, ...), in KiB. Linux only.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Minimal blocking GET returning the status code, for readiness polling without a runtime:
/// only the first bytes of the answer are read.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::Read;
    let mut s = send_get(addr, path)?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split(' ').nth(1)?.parse().ok()
}

/// Minimal blocking GET returning the body (read until the server closes).
pub fn http_body(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::Read;
    let mut response = String::new();
    send_get(addr, path)?.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// A connection that has sent `GET path` with `Connection: close`.
fn send_get(addr: SocketAddr, path: &str) -> Option<std::net::TcpStream> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    Some(s)
}
