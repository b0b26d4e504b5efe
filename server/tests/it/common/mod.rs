//! Test harness: a real `waypost server run` process per test (its own temp data dir, context
//! file and HOME; every port 0), the CLI run with the matching environment, and the real
//! entrypoint (`entrypoint`). The protocol-level fake entrypoint is `waypost_testkit::Fake`
//! (re-exported here with its helpers), which connects to a [`Server`] as a `ControlTarget`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
pub use waypost_testkit::{Fake, WAIT, hello, new_id, status, tls_connector};

pub mod entrypoint;

pub fn waypost_bin() -> &'static str {
    env!("CARGO_BIN_EXE_waypost")
}

/// Polls `f` every 50 ms until it returns Some, or panics after [`WAIT`] with `what`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {WAIT:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async version of [`wait_for`].
pub async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A temp directory laid out as one "machine": `data/` (the server's data dir),
/// `context.json` (WAYPOST_CONTEXT) and `home/` (HOME, so nothing touches the real one).
pub struct Env {
    pub root: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let root = tempfile::Builder::new()
            .prefix("waypost-test")
            .tempdir()
            .unwrap();
        std::fs::create_dir(root.path().join("home")).unwrap();
        Env { root }
    }
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }
    pub fn context_path(&self) -> PathBuf {
        self.root.path().join("context.json")
    }
    pub fn home(&self) -> PathBuf {
        self.root.path().join("home")
    }

    /// A `waypost` command with this environment: context file, HOME, no inherited WAYPOST_*
    /// variables that could point elsewhere.
    pub fn command(&self) -> Command {
        let mut c = Command::new(waypost_bin());
        for var in [
            "WAYPOST_ADDR",
            "WAYPOST_ADMIN_TOKEN",
            "WAYPOST_CA",
            "WAYPOST_DATA_DIR",
            "WAYPOST_SERVER",
            "WAYPOST_TOKEN",
            "XDG_CONFIG_HOME",
        ] {
            c.env_remove(var);
        }
        c.env("WAYPOST_CONTEXT", self.context_path())
            .env("HOME", self.home())
            .current_dir(self.root.path())
            .stdin(Stdio::null());
        c
    }

    pub fn context(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.context_path()).expect("context file")).unwrap()
    }
}

/// The result of a CLI run.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code,
            Some(0),
            "command failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }
    /// Asserts failure with exactly one non-empty line on stderr.
    pub fn fails(self) -> Run {
        assert_ne!(
            self.code,
            Some(0),
            "command unexpectedly succeeded: {}",
            self.stdout
        );
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "error must be one line: {:?}",
            self.stderr
        );
        self
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// A running server process, killed on drop.
pub struct Server {
    pub env: Env,
    child: Option<Child>,
    pub control_addr: String,
    pub api_addr: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Server {
    /// Starts a server in a fresh environment. `extra`: more `server run` flags.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_in(Env::new(), extra)
    }

    /// Starts a server on an existing environment (e.g. after [`Server::kill`]).
    pub fn start_in(env: Env, extra: &[&str]) -> Server {
        static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stdout = env.root.path().join(format!("server-{n}.out"));
        let stderr = env.root.path().join(format!("server-{n}.err"));
        let child = env
            .command()
            .args(["server", "run", "--data-dir"])
            .arg(env.data_dir())
            .args(if extra.contains(&"--control-addr") {
                &[][..]
            } else {
                &["--control-addr", "127.0.0.1:0"][..]
            })
            .args(["--api-addr", "127.0.0.1:0"])
            .args(if extra.contains(&"--ingress-addr") {
                &[][..]
            } else {
                &["--ingress-addr", "127.0.0.1:0"][..]
            })
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning waypost server run");
        let mut server = Server {
            env,
            child: Some(child),
            control_addr: String::new(),
            api_addr: String::new(),
            stdout,
            stderr,
        };
        let pid = server.pid();
        let json_path = server.env.data_dir().join("server.json");
        let info: serde_json::Value = wait_for("server.json of the new server", || {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "server exited during start-up ({status}):\n{}",
                    server.logs()
                );
            }
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&json_path).ok()?).ok()?;
            (v["pid"].as_u64() == Some(pid as u64)).then_some(v)
        });
        server.control_addr = info["control_addr"].as_str().unwrap().to_string();
        server.api_addr = info["api_addr"].as_str().unwrap().to_string();
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// stdout and stderr so far, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- server stdout ---\n{}\n--- server stderr ---\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// SIGKILL (no clean-up at all), keeping the environment for a restart.
    pub fn kill(mut self) -> Env {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        std::mem::replace(&mut self.env, Env::new())
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(mut self) -> (Option<i32>, Env) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let code = wait_for("the server to exit after SIGTERM", || {
            child.try_wait().unwrap()
        })
        .code();
        let env = std::mem::replace(&mut self.env, Env::new());
        (code, env)
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Run {
        Run::from_output(self.env.command().args(args).output().unwrap())
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.env.data_dir().join("ca.pem")).unwrap()
    }

    pub fn admin_token(&self) -> String {
        self.env.context()["admin_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// An API client with the given bearer token (None: no Authorization header).
    pub fn api(&self, token: Option<&str>) -> waypost::client::ApiClient {
        waypost::client::ApiClient::new(&self.api_addr, token.map(str::to_string), &self.ca_pem())
            .unwrap()
    }

    pub fn create_app(&self, app: &str) {
        self.cli(&["app", "create", app]).ok();
    }

    /// A new entrypoint token for `app` (created if needed).
    pub fn entrypoint_token(&self, app: &str, deployment: Option<&str>) -> String {
        let apps = self.cli(&["app", "list", "-o", "json"]).ok().json();
        if !apps["apps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == app)
        {
            self.create_app(app);
        }
        let mut args = vec!["token", "create", "--app", app, "-o", "json"];
        if let Some(d) = deployment {
            args.extend(["--deployment", d]);
        }
        self.cli(&args).ok().json()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// `waypost instances -o json [--all]` as a list.
    pub fn instances(&self, all: bool) -> Vec<serde_json::Value> {
        let mut args = vec!["instances", "-o", "json"];
        if all {
            args.push("--all");
        }
        self.cli(&args).ok().json()["instances"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// The instance with this id (hex) in `instances [--all]`, if listed.
    pub fn instance(&self, id: &[u8; 16], all: bool) -> Option<serde_json::Value> {
        let hex = hex(id);
        self.instances(all)
            .into_iter()
            .find(|i| i["id"] == hex.as_str())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl waypost_testkit::ControlTarget for Server {
    fn control_addr(&self) -> String {
        self.control_addr.clone()
    }
    fn ca_pem(&self) -> String {
        Server::ca_pem(self)
    }
}

/// The entrypoint binary for `waypost up` tests: $WAYPOST_ENTRYPOINT_BIN, else the workspace's
/// debug build. None (the caller skips loudly) if neither exists.
pub fn entrypoint_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WAYPOST_ENTRYPOINT_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/waypost-entrypoint");
    p.exists().then_some(p)
}
