//! A throwaway PostgreSQL cluster for tests: its own temp dir, a free port on 127.0.0.1, trust
//! authentication for the superuser `postgres`, durability off (a test never needs its data
//! after a crash). Nothing is installed or configured system-wide; the Debian package
//! `postgresql` only has to provide the binaries.
//!
//! Two users: [`Cluster`], which a test starts and owns (killed and removed on drop), and
//! [`create_database_at`], which makes a fresh database in a cluster someone else started
//! (`scripts/with-postgres.sh` exports its base URL as `WAYPOST_TEST_DATABASE` for the server's
//! integration tests). Every failure panics with what went wrong: this is test code.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The PostgreSQL binaries a cluster and its databases need (all in Debian's `postgresql-NN`).
const SERVER_TOOLS: [&str; 4] = ["initdb", "pg_ctl", "createdb", "dropdb"];

/// Where Debian's `postgresql-NN` packages put the binaries (they are not on PATH there).
const DEBIAN_LIB: &str = "/usr/lib/postgresql";

/// The OS user PostgreSQL runs as when we are root (it refuses to run as root). Debian's
/// `postgresql-common` creates it.
const OS_USER: &str = "postgres";

/// Start attempts, each on a new free port: between choosing a port and the server binding it,
/// another process can take it.
const START_ATTEMPTS: usize = 3;

/// Connections the server accepts: every integration test runs its own server processes, each
/// with a connection pool, and nextest runs tests in parallel on one cluster (default: 100).
const MAX_CONNECTIONS: u32 = 300;

/// A running PostgreSQL cluster in a temp dir; `pg_ctl stop -m immediate` and the dir removed
/// on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
}

impl Cluster {
    /// initdb + start on a free port. Panics (with the server log) if that fails.
    pub fn start() -> Cluster {
        let bin = bin_dir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("waypost-pg")
            .tempdir()
            .expect("a temp dir for the PostgreSQL cluster");
        if as_postgres {
            // The data dir must belong to the user the server runs as. The temp dir's parent
            // (normally /tmp) must let that user through, which the usual 1777 does.
            run(Command::new("chown").arg(OS_USER).arg(dir.path()));
        }
        let mut cluster = Cluster {
            dir,
            bin,
            as_postgres,
            port: 0,
        };
        let data = cluster.data_dir();
        run(cluster
            .pg("initdb")
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            // The C locale: initdb fails on a LANG whose locale is not generated on the machine.
            .arg("--locale=C"));
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(e) if attempt == START_ATTEMPTS => panic!("{e}"),
                Err(_) => {}
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `postgres://postgres@127.0.0.1:PORT`: the cluster, without a database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user the cluster runs as when the tests run as root (`postgres`), else None: files put
    /// in [`Cluster::data_dir`] (e.g. `server.crt`/`server.key` for `ssl = on`) must be its.
    pub fn os_user(&self) -> Option<&'static str> {
        self.as_postgres.then_some(OS_USER)
    }

    /// The directory of the PostgreSQL binaries this cluster runs (for tests that want `psql`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A fresh, empty database with a unique name; its full URL.
    pub fn create_database(&self) -> String {
        create_database_in(&self.bin, "127.0.0.1", self.port)
    }

    /// Stops the server (`-m fast`: sessions are disconnected, as when a database is shut down
    /// for maintenance); the data stays for [`Cluster::start_again`].
    pub fn stop(&self) {
        run(self
            .pg("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w"]));
    }

    /// Starts the server again after [`Cluster::stop`], on the same port and data.
    pub fn start_again(&self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// `pg_ctl start` and wait until it accepts connections; the error says why, with the log.
    fn try_start(&self) -> Result<(), String> {
        let dir = self.dir.path().display();
        let options = format!(
            "-p {} -k '{dir}' -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections={MAX_CONNECTIONS}",
            self.port
        );
        let out = self
            .pg("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-o", &options])
            .stdin(Stdio::null())
            .output()
            .expect("spawning pg_ctl");
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "pg_ctl start on port {} failed ({}):\n{}\n--- server log ---\n{}",
            self.port,
            out.status,
            output_text(&out),
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        ))
    }

    /// The cluster's data directory (its `postgresql.conf`, `server.crt`, ...).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// A command for the PostgreSQL binary `name`, as the `postgres` user when we are root,
    /// run from the cluster's dir (the user may not be allowed into the caller's).
    fn pg(&self, name: &str) -> Command {
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", OS_USER, "--"]).arg(self.bin.join(name));
            c
        } else {
            Command::new(self.bin.join(name))
        };
        c.current_dir(self.dir.path()).stdin(Stdio::null());
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Immediate: nothing needs to survive, and a test should not wait for a checkpoint.
        // Fails harmlessly when the server is not running (stopped, or never started).
        let _ = self
            .pg("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The TempDir removes the directory after this.
    }
}

/// A fresh, empty database in the running cluster at `base_url` (`postgres://postgres@HOST:PORT`,
/// as [`Cluster::url`] gives); its full URL `postgres://postgres@HOST:PORT/NAME`.
pub fn create_database_at(base_url: &str) -> String {
    let (host, port) = parse_base_url(base_url)
        .unwrap_or_else(|| panic!("not a base URL postgres://postgres@HOST:PORT: {base_url:?}"));
    create_database_in(&bin_dir(), &host, port)
}

/// Drops the database at `url` (as [`create_database_at`] returns it), disconnecting whoever is
/// still connected (`--force`); nothing if it does not exist. An error rather than a panic: the
/// callers drop databases in `Drop`, where a panic would hide the test's own failure.
pub fn drop_database_at(url: &str) -> Result<(), String> {
    let parsed = url
        .rsplit_once('/')
        .and_then(|(base, name)| Some((parse_base_url(base)?, name)))
        .filter(|(_, name)| !name.is_empty());
    let Some(((host, port), name)) = parsed else {
        return Err(format!(
            "not a database URL postgres://postgres@HOST:PORT/NAME: {url:?}"
        ));
    };
    let port = port.to_string();
    let out = Command::new(bin_dir().join("dropdb"))
        .args(["--force", "--if-exists", "-h", &host, "-p", &port])
        .args(["-U", "postgres", name])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawning dropdb: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "dropdb {name} failed ({}): {}",
        out.status,
        output_text(&out)
    ))
}

/// `createdb` over TCP as the superuser; being a client, it runs as whoever we are (trust
/// authentication takes the user name from `-U`).
fn create_database_in(bin: &Path, host: &str, port: u16) -> String {
    let name = unique_name();
    run(Command::new(bin.join("createdb"))
        .args(["-h", host, "-p", &port.to_string(), "-U", "postgres", &name])
        .stdin(Stdio::null()));
    format!("postgres://postgres@{host}:{port}/{name}")
}

/// Host and port of `postgres://postgres@HOST:PORT` (also with a trailing `/`); None for
/// anything else.
fn parse_base_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("postgres://")?.trim_end_matches('/');
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, hp)| hp);
    let (host, port) = host_port.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty() && !host.contains('/')).then(|| (host.to_string(), port))
}

/// A database name unique across processes and calls: `wp_` + pid, time and a counter.
fn unique_name() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("wp_{}_{t:x}_{n}", std::process::id())
}

/// The directory with [`SERVER_TOOLS`]: the highest version under
/// /usr/lib/postgresql/*/bin, else the first PATH entry that has all three.
fn bin_dir() -> PathBuf {
    let has_all = |d: &Path| SERVER_TOOLS.iter().all(|t| d.join(t).is_file());
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    let path = std::env::var_os("PATH").unwrap_or_default();
    versions
        .into_iter()
        .map(|(_, d)| d)
        .chain(std::env::split_paths(&path))
        .find(|d| has_all(d))
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL not found: no {} in {DEBIAN_LIB}/*/bin or on PATH \
                 (Debian: apt-get install postgresql)",
                SERVER_TOOLS.join(", ")
            )
        })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A port nothing listens on right now (the kernel's choice for port 0).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Runs `c` to completion; panics with its output if it fails.
fn run(c: &mut Command) -> Output {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("spawning {:?}: {e}", c.get_program()));
    if !out.status.success() {
        panic!("{c:?} failed ({}):\n{}", out.status, output_text(&out));
    }
    out
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    /// The databases `psql -l` lists.
    fn databases(c: &Cluster) -> Vec<String> {
        let out = run(Command::new(c.bin_dir().join("psql"))
            .args(["-h", "127.0.0.1", "-p", &c.port().to_string()])
            .args(["-U", "postgres", "-lqtA"])
            .stdin(Stdio::null()));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split('|').next())
            .map(str::to_string)
            .collect()
    }

    fn accepts(c: &Cluster) -> bool {
        TcpStream::connect((Ipv4Addr::LOCALHOST, c.port())).is_ok()
    }

    /// Needs the PostgreSQL binaries (Debian: `postgresql`); as root, also the `postgres` user
    /// the package creates.
    #[test]
    fn cluster_lifecycle() {
        let c = Cluster::start();
        assert!(c.url().starts_with("postgres://postgres@127.0.0.1:"));
        let a = c.create_database();
        let b = create_database_at(&c.url());
        assert_ne!(a, b);
        let name = |u: &str| u.rsplit_once('/').unwrap().1.to_string();
        assert_eq!(format!("{}/{}", c.url(), name(&a)), a);
        let listed = databases(&c);
        for db in [&a, &b] {
            assert!(listed.contains(&name(db)), "{db} not in {listed:?}");
        }

        c.stop();
        assert!(!accepts(&c), "stopped, yet port {} accepts", c.port());
        c.start_again();
        assert!(accepts(&c));
        let listed = databases(&c);
        assert!(listed.contains(&name(&a)), "{a} survives a restart");

        drop_database_at(&b).unwrap();
        assert!(!databases(&c).contains(&name(&b)), "{b} dropped");
        drop_database_at(&b).unwrap();
        assert!(
            drop_database_at(&c.url()).is_err(),
            "a URL without a database"
        );

        let dir = c.dir.path().to_path_buf();
        drop(c);
        assert!(!dir.exists(), "the cluster's dir is removed");
    }

    #[test]
    fn base_urls_parse() {
        assert_eq!(
            parse_base_url("postgres://postgres@127.0.0.1:5433"),
            Some(("127.0.0.1".to_string(), 5433))
        );
        assert_eq!(
            parse_base_url("postgres://postgres@localhost:1/"),
            Some(("localhost".to_string(), 1))
        );
        for bad in [
            "postgres://postgres@h",
            "http://h:1",
            "postgres://h:x",
            "postgres://h:1/db",
        ] {
            assert_eq!(parse_base_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_differ() {
        assert_ne!(unique_name(), unique_name());
    }
}
