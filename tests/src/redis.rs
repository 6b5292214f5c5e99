//! A private `redis-server` per test, on a free loopback port with its own directory; never the
//! machine's 6379.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::free_port;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
}

impl RedisServer {
    /// Starts redis-server (no persistence) and waits until it answers PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// With `appendonly`, AOF persistence (everysec) in the server's directory, so a restart
    /// keeps the data as the chart's default does.
    pub fn start_with(appendonly: bool) -> RedisServer {
        RedisServer::start_on(free_port(), appendonly)
    }

    /// On a given port (e.g. one a gateway already tries to reach).
    pub fn start_on(port: u16, appendonly: bool) -> RedisServer {
        let mut s = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            appendonly,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let bin = which_redis();
        let child = Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", if self.appendonly { "yes" } else { "no" }])
            .args(["--appendfsync", "everysec"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not answer PING within 10 s",
            self.port
        );
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    /// Kills the server (SIGKILL: like a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The redis-server binary, or a panic that says how to get it.
fn which_redis() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("redis-server"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin/redis-server"), PathBuf::from("/usr/sbin/redis-server")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("redis-server is not installed: run scripts/test.sh (it installs it) or apt-get install -y redis-server")
        })
}
