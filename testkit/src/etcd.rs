//! A throwaway single-member etcd for tests: its own temp data dir, client and peer URLs on free
//! 127.0.0.1 ports, killed and removed on drop. Keys are written with `etcdctl` (Debian
//! `etcd-client`), which keeps this crate free of an HTTP client and JSON. Every failure panics
//! with what went wrong: this is test code.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Start attempts, each on new free ports: between choosing a port and etcd binding it, another
/// process can take it.
const START_ATTEMPTS: usize = 3;

/// How long a stop may take before the process is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running etcd (or one stopped by [`Etcd::stop`], to be started again).
pub struct Etcd {
    /// `http://127.0.0.1:CLIENT_PORT`: the client URL, also the v3 JSON gateway's base URL.
    pub addr: String,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// `USER:PASSWORD` for etcdctl once [`Etcd::enable_auth`] ran.
    user: Option<String>,
}

impl Etcd {
    /// Starts `etcd` with its own temp data dir on free ports and waits until `/health` answers
    /// true. Panics if `etcd` is not installed, or with etcd's log if it does not come up.
    pub fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("waypost-etcd")
            .tempdir()
            .expect("a temp dir for etcd");
        let mut etcd = Etcd {
            addr: String::new(),
            dir,
            client_port: 0,
            peer_port: 0,
            child: None,
            user: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            etcd.addr = format!("http://127.0.0.1:{}", etcd.client_port);
            match etcd.try_start() {
                Ok(()) => return etcd,
                Err(e) if attempt == START_ATTEMPTS => panic!("{e}"),
                Err(_) => {}
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Sets `key` to `value` (through etcdctl, as root once auth is enabled).
    pub fn put(&self, key: &str, value: &str) {
        // `--` so that a value starting with '-' is not taken for a flag.
        self.etcdctl(&["put", "--", key, value]);
    }

    /// Deletes `key` (nothing if it does not exist).
    pub fn delete(&self, key: &str) {
        self.etcdctl(&["del", "--", key]);
    }

    /// The value of `key`, None if it does not exist.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", "--print-value-only", "--", key]);
        let text = String::from_utf8(out.stdout).expect("etcdctl prints UTF-8");
        // etcdctl prints the value and a newline, nothing for a missing key.
        text.strip_suffix('\n').map(str::to_string)
    }

    /// Creates the user `root` with `password`, gives it the root role and turns authentication
    /// on; later [`Etcd::put`]/[`Etcd::delete`] authenticate as root.
    pub fn enable_auth(&mut self, password: &str) {
        self.etcdctl(&["user", "add", &format!("root:{password}")]);
        self.etcdctl(&["user", "grant-role", "root", "root"]);
        self.etcdctl(&["auth", "enable"]);
        self.user = Some(format!("root:{password}"));
    }

    /// Runs `etcdctl` (v3 API) with `args` against this etcd; panics with its output if it fails.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.addr))
            .arg("--dial-timeout=5s")
            .arg("--command-timeout=10s");
        if let Some(user) = &self.user {
            c.arg(format!("--user={user}"));
        }
        c.args(args).stdin(Stdio::null());
        let out = c.output().unwrap_or_else(|e| {
            panic!("running etcdctl: {e} (install it: apt-get install etcd-client)")
        });
        if !out.status.success() {
            panic!(
                "etcdctl {args:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// Stops etcd (SIGTERM, then SIGKILL after a grace period); the data stays for
    /// [`Etcd::start_again`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts etcd again after [`Etcd::stop`], on the same ports and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is still running");
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// Spawns etcd and waits until it is healthy; the error says why, with etcd's log.
    fn try_start(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd's log file");
        let child = Command::new("etcd")
            .arg("--name=waypost-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=waypost-test={peer}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log file"))
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("etcd is not on PATH; install it: apt-get install etcd-server")
            }
            Err(e) => panic!("spawning etcd: {e}"),
        };
        let child = self.child.insert(child);
        let deadline = Instant::now() + crate::WAIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "etcd on {client} exited ({status}) while starting:\n{}",
                    self.log()
                ));
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "etcd on {client} not healthy within {:?}:\n{}",
                    crate::WAIT,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Nothing needs to survive: kill rather than stop, so a test does not wait.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The TempDir removes the directory after this.
    }
}

/// Whether etcd's `/health` on `port` answers `"health":"true"` (a plain HTTP/1.0 GET: the
/// server closes the connection after the answer).
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// A port nothing listens on right now (the kernel's choice for port 0).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs `etcd` and `etcdctl` (Debian: etcd-server, etcd-client); fails if they are missing.
    #[test]
    fn etcd_lifecycle() {
        let mut e = Etcd::start();
        assert!(e.addr.starts_with("http://127.0.0.1:"));
        assert_eq!(e.get("k"), None);
        e.put("k", "v1");
        assert_eq!(e.get("k").as_deref(), Some("v1"));
        e.put("dash", "-x");
        assert_eq!(e.get("dash").as_deref(), Some("-x"));

        e.stop();
        assert!(!healthy(e.client_port), "stopped, yet etcd answers");
        e.start_again();
        assert_eq!(e.get("k").as_deref(), Some("v1"), "data survives a restart");
        e.delete("k");
        assert_eq!(e.get("k"), None);

        e.enable_auth("pw");
        e.put("k", "v2");
        assert_eq!(e.get("k").as_deref(), Some("v2"));
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", e.addr))
            .args(["get", "k"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "auth is on: no user, no read");

        let dir = e.dir.path().to_path_buf();
        drop(e);
        assert!(!dir.exists(), "the data dir is removed");
    }
}
