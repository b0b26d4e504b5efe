//! Test harness: a real `waypost server run` process per test (its own temp data dir, context
//! file and HOME; every port 0), the CLI run with the matching environment, and the real
//! entrypoint (`entrypoint`). The protocol-level fake entrypoint is `waypost_testkit::Fake`
//! (re-exported here with its helpers), which connects to a [`Server`] as a `ControlTarget`.
//!
//! The database: SQLite in the data dir by default. With `WAYPOST_TEST_DATABASE` set to a
//! PostgreSQL cluster's base URL (`postgres://postgres@HOST:PORT`, as `scripts/with-postgres.sh`
//! exports it), every [`Env`] gets a fresh database of its own in that cluster and every server
//! started by [`Server::start_in`] runs with `--database <its URL>`; see [`backend`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
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

/// The variable naming the PostgreSQL cluster the tests run against (unset: SQLite).
const DATABASE_VAR: &str = "WAYPOST_TEST_DATABASE";

/// The PostgreSQL cluster's base URL from [`DATABASE_VAR`], if the tests run against one.
fn postgres_base() -> Option<String> {
    std::env::var(DATABASE_VAR).ok().filter(|v| !v.is_empty())
}

/// The database the servers of this run use: "postgres" (with `WAYPOST_TEST_DATABASE`) or
/// "sqlite", for tests that look at the database itself or only make sense on one backend.
// Allowed unused: the harness offers it whether or not a test calls it yet.
#[allow(dead_code)]
pub fn backend() -> &'static str {
    if postgres_base().is_some() {
        "postgres"
    } else {
        "sqlite"
    }
}

/// How many [`Env`]s use each database this process created; the last one to go drops it, so a
/// run of many tests does not fill the cluster's disk with a database per test.
static DATABASE_USERS: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Counts one more [`Env`] on `url`; false if the database is not one this process created.
fn database_acquire(url: &str, created: bool) -> bool {
    let mut users = DATABASE_USERS.lock().unwrap_or_else(|e| e.into_inner());
    match users.get_mut(url) {
        Some(n) => *n += 1,
        None if created => {
            users.insert(url.to_string(), 1);
        }
        None => return false,
    }
    true
}

/// Counts one [`Env`] less on `url`; drops the database after the last.
fn database_release(url: &str) {
    let last = {
        let mut users = DATABASE_USERS.lock().unwrap_or_else(|e| e.into_inner());
        let n = users.get_mut(url).expect("a database acquired before");
        *n -= 1;
        *n == 0 && users.remove(url).is_some()
    };
    if last {
        // Not a panic: this runs in Drop, possibly while the test is already failing.
        if let Err(e) = waypost_testkit::pg::drop_database_at(url) {
            eprintln!("leaving database {url} behind: {e}");
        }
    }
}

/// Where Debian's `postgresql-NN` packages put the PostgreSQL binaries (not on PATH there).
const PG_DEBIAN_LIB: &str = "/usr/lib/postgresql";

/// A command for the PostgreSQL client `name` (`psql`, `pg_dump`): the highest version under
/// [`PG_DEBIAN_LIB`]`/*/bin` that has it, else from PATH. A client runs as whoever we are (the
/// cluster trusts the user name in the URL); a client is only needed when the tests run against
/// PostgreSQL.
fn pg_client(name: &str) -> Command {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(PG_DEBIAN_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin").join(name)))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    versions.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    let program = versions
        .into_iter()
        .next()
        .map_or_else(|| PathBuf::from(name), |(_, p)| p);
    let mut c = Command::new(program);
    c.stdin(Stdio::null());
    c
}

/// A temp directory laid out as one "machine": `data/` (the server's data dir),
/// `context.json` (WAYPOST_CONTEXT) and `home/` (HOME, so nothing touches the real one); and,
/// when the tests run against PostgreSQL, the database its servers use.
pub struct Env {
    pub root: tempfile::TempDir,
    /// The PostgreSQL database URL its servers get as `--database`; None: SQLite in the data dir.
    database: Option<String>,
    /// Whether `database` is counted in [`DATABASE_USERS`] (dropped after its last Env).
    counted: bool,
    /// More variables for every command of this Env (e.g. WAYPOST_DATABASE_CA for its servers).
    vars: Vec<(String, std::ffi::OsString)>,
}

impl Env {
    /// A fresh environment; against PostgreSQL, with a fresh database of its own.
    pub fn new() -> Env {
        let mut env = Env::without_database();
        if let Some(base) = postgres_base() {
            let url = waypost_testkit::pg::create_database_at(&base);
            env.counted = database_acquire(&url, true);
            env.database = Some(url);
        }
        env
    }

    /// A fresh environment whose servers use the PostgreSQL database at `url` (e.g. another
    /// Env's [`Env::database_url`]): two replicas on one database, each with its own data dir.
    // Allowed unused, as `backend`.
    #[allow(dead_code)]
    pub fn with_database(url: &str) -> Env {
        let mut env = Env::without_database();
        env.counted = database_acquire(url, false);
        env.database = Some(url.to_string());
        env
    }

    /// Directories only: also what a [`Server`] is left with after giving its Env back.
    fn without_database() -> Env {
        let root = tempfile::Builder::new()
            .prefix("waypost-test")
            .tempdir()
            .unwrap();
        std::fs::create_dir(root.path().join("home")).unwrap();
        Env {
            root,
            database: None,
            counted: false,
            vars: Vec::new(),
        }
    }

    /// The PostgreSQL database this Env's servers use; None on SQLite.
    // Allowed unused, as `backend`.
    #[allow(dead_code)]
    pub fn database_url(&self) -> Option<String> {
        self.database.clone()
    }

    /// `--database URL` for a `server run` started by hand, so that it uses this Env's database
    /// as [`Server::start_in`] would; nothing on SQLite.
    // Allowed unused, as `backend`.
    #[allow(dead_code)]
    pub fn database_args(&self) -> Vec<String> {
        match &self.database {
            Some(url) => vec!["--database".to_string(), url.clone()],
            None => vec![],
        }
    }

    /// The first column of the first row `sql` returns, as text (NULL: None; no row: Ok(None)),
    /// from this Env's database whichever the backend: `waypost.db` in the data dir (read-only)
    /// or its PostgreSQL database (through `psql`). For tests that check what the server
    /// stored; `sql` must be valid on both.
    // Allowed unused, as `backend`.
    #[allow(dead_code)]
    pub fn query(&self, sql: &str) -> Result<Option<String>, String> {
        use rusqlite::types::Value;
        let Some(url) = &self.database else {
            let c = rusqlite::Connection::open_with_flags(
                self.data_dir().join("waypost.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .map_err(|e| e.to_string())?;
            let v = match c.query_row(sql, [], |r| r.get::<_, Value>(0)) {
                Ok(v) => v,
                Err(rusqlite::Error::QueryReturnedNoRows) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            return Ok(match v {
                Value::Null => None,
                Value::Integer(i) => Some(i.to_string()),
                Value::Real(f) => Some(f.to_string()),
                Value::Text(t) => Some(t),
                Value::Blob(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            });
        };
        // -X: no ~/.psqlrc; -A -t: bare values; a NULL is shown as the marker below.
        const NULL: &str = "<waypost-test-null>";
        let out = pg_client("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-P"])
            .arg(format!("null={NULL}"))
            .args(["-d", url, "-c", sql])
            .output()
            .map_err(|e| format!("spawning psql: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .next()
            .map(|l| l.split('|').next().unwrap_or(l))
            .filter(|v| *v != NULL)
            .map(str::to_string))
    }

    /// Everything the database holds, as bytes to search: on SQLite the files `waypost.db` and
    /// its WAL, on PostgreSQL a `pg_dump` of the Env's database (data as the server stored it).
    // Allowed unused, as `backend`.
    #[allow(dead_code)]
    pub fn database_contents(&self) -> Vec<u8> {
        let Some(url) = &self.database else {
            let data = self.data_dir();
            let mut all = std::fs::read(data.join("waypost.db")).expect("waypost.db");
            all.extend(std::fs::read(data.join("waypost.db-wal")).unwrap_or_default());
            return all;
        };
        let out = pg_client("pg_dump")
            .args(["--no-owner", "-d", url])
            .output()
            .expect("spawning pg_dump");
        assert!(
            out.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
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
            "WAYPOST_DATABASE",
            "WAYPOST_DATABASE_CA",
            "WAYPOST_DATABASE_URL",
            "WAYPOST_DATA_DIR",
            "WAYPOST_METRICS_ADDR",
            "WAYPOST_SERVER",
            "WAYPOST_SERVER_THREADS",
            "WAYPOST_TOKEN",
            "XDG_CONFIG_HOME",
        ] {
            c.env_remove(var);
        }
        c.env("WAYPOST_CONTEXT", self.context_path())
            .env("HOME", self.home())
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .current_dir(self.root.path())
            .stdin(Stdio::null());
        c
    }

    /// Sets a variable for every later command of this Env (servers and CLI alike).
    #[allow(dead_code)] // used by some test modules only
    pub fn set_var(&mut self, key: &str, value: impl Into<std::ffi::OsString>) {
        self.vars.push((key.to_string(), value.into()));
    }

    pub fn context(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.context_path()).expect("context file")).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let (true, Some(url)) = (self.counted, &self.database) {
            database_release(url);
        }
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
    /// The metrics listener's address from server.json (None: `--metrics-addr off`).
    metrics: Option<String>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Server {
    /// Starts a server in a fresh environment. `extra`: more `server run` flags.
    pub fn start(extra: &[&str]) -> Server {
        Server::start_in(Env::new(), extra)
    }

    /// Starts a server on an existing environment (e.g. after [`Server::kill`]): its data dir
    /// and, against PostgreSQL, its database (`--database`, unless `extra` names one).
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
            .args(match &env.database {
                Some(url) if !extra.contains(&"--database") => vec!["--database", url.as_str()],
                _ => vec![],
            })
            .args(if extra.contains(&"--ingress-addr") {
                &[][..]
            } else {
                &["--ingress-addr", "127.0.0.1:0"][..]
            })
            // Never the default port: tests run servers in parallel.
            .args(if extra.contains(&"--metrics-addr") {
                &[][..]
            } else {
                &["--metrics-addr", "127.0.0.1:0"][..]
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
            metrics: None,
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
        server.metrics = info["metrics_addr"].as_str().map(str::to_string);
        server
    }

    /// The metrics listener's `ip:port` (panics when it is off).
    pub fn metrics_addr(&self) -> &str {
        self.metrics
            .as_deref()
            .expect("the server's metrics listener is off")
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
        std::mem::replace(&mut self.env, Env::without_database())
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
        let env = std::mem::replace(&mut self.env, Env::without_database());
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

    /// This server's replica id (its own row in `server members`), which instances name as
    /// their holder (`replica`): on one shared database every replica lists every instance.
    // Allowed unused, as `backend`.
    #[allow(dead_code)]
    pub fn replica_id(&self) -> String {
        let v = self.cli(&["server", "members", "-o", "json"]).ok().json();
        v["members"]
            .as_array()
            .expect("members array")
            .iter()
            .find(|m| m["self"] == true)
            .and_then(|m| m["id"].as_str())
            .unwrap_or_else(|| panic!("no own member row: {v}"))
            .to_string()
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
