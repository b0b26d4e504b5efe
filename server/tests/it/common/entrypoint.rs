//! The real `waypost-entrypoint` binary under test, connected to a test [`Server`]: spawned
//! with the server's address, a fresh token and the CA inline, output captured to files, killed
//! (with its whole process tree) on drop.

use super::{Server, entrypoint_bin, wait_for};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};

/// A running entrypoint.
pub struct Entrypoint {
    child: Option<Child>,
    pub dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The entrypoint binary, or a loud skip: returns None and prints why.
pub fn binary() -> Option<PathBuf> {
    let bin = entrypoint_bin();
    if bin.is_none() {
        eprintln!(
            "SKIPPED: no entrypoint binary (set WAYPOST_ENTRYPOINT_BIN or `cargo build -p waypost-entrypoint`)"
        );
    }
    bin
}

/// How to start one.
pub struct Builder {
    env: HashMap<String, String>,
    argv: Vec<String>,
}

impl Builder {
    /// An entrypoint for `app` on `server` (token created), running `sh -c script`.
    pub fn new(server: &Server, app: &str, script: &str) -> Builder {
        let token = server.entrypoint_token(app, None);
        Builder::with_token(server, &token, script)
    }

    pub fn with_token(server: &Server, token: &str, script: &str) -> Builder {
        let mut env = HashMap::new();
        env.insert("WAYPOST_SERVER".into(), server.control_addr.clone());
        env.insert("WAYPOST_TOKEN".into(), token.to_string());
        env.insert("WAYPOST_CA".into(), server.ca_pem());
        Builder {
            env,
            argv: vec!["sh".into(), "-c".into(), script.into()],
        }
    }

    /// An entrypoint not connected to any server yet: `server_addr` may be anything.
    pub fn bare(server_addr: &str, token: &str, ca_pem: &str, script: &str) -> Builder {
        let mut env = HashMap::new();
        env.insert("WAYPOST_SERVER".into(), server_addr.to_string());
        env.insert("WAYPOST_TOKEN".into(), token.to_string());
        env.insert("WAYPOST_CA".into(), ca_pem.to_string());
        Builder {
            env,
            argv: vec!["sh".into(), "-c".into(), script.into()],
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> Builder {
        self.env.insert(k.into(), v.into());
        self
    }

    /// Runs `argv` instead of `sh -c script`.
    pub fn argv(mut self, argv: &[&str]) -> Builder {
        self.argv = argv.iter().map(|a| a.to_string()).collect();
        self
    }

    #[allow(dead_code)] // the harness's counterpart of `env`; no test removes a variable now
    pub fn unset(mut self, k: &str) -> Builder {
        self.env.remove(k);
        self
    }

    /// Starts it; None (after a loud skip line) if there is no entrypoint binary.
    pub fn spawn(self) -> Option<Entrypoint> {
        let bin = binary()?;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let mut cmd = Command::new(bin);
        cmd.args(&self.argv)
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .env("D", &dir)
            .envs(&self.env)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = cmd.spawn().expect("spawning the entrypoint");
        Some(Entrypoint {
            child: Some(child),
            dir,
            stdout,
            stderr,
            _tmp: tmp,
        })
    }
}

impl Entrypoint {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for it to exit (bounded) and returns how.
    pub fn wait(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        wait_for("the entrypoint to exit", || child.try_wait().unwrap())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// The instance this entrypoint registered as, once the server lists it live.
    pub fn instance(&self, server: &Server) -> serde_json::Value {
        let pid = self.pid();
        wait_for(
            &format!("entrypoint pid {pid} to be listed live\n{}", self.stderr()),
            || {
                server
                    .instances(false)
                    .into_iter()
                    .find(|i| i["entrypoint_pid"] == pid && i["live"] == true)
            },
        )
    }

    /// A file the test's script wrote into `$D`.
    pub fn file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok()
    }
}

impl Drop for Entrypoint {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                // SIGTERM first: the entrypoint forwards it and cleans up the app's whole tree;
                // SIGKILL if that takes too long.
                // SAFETY: kill(2) on our own unreaped child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let t0 = std::time::Instant::now();
                while c.try_wait().ok().flatten().is_none()
                    && t0.elapsed() < std::time::Duration::from_secs(5)
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                // SAFETY: as above.
                unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            }
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- entrypoint stdout ---\n{}\n--- entrypoint stderr ---\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }
}
