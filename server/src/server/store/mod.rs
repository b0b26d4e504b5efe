//! Durable state: the only way to the database. Everything above this module (services,
//! transports) sees the plain types of `model` and the functions here, never a database type:
//! see "The store" in docs/architecture.md.
//!
//! Two backends, one set of functions and one schema ([`sql`] bridges them): the embedded
//! default is one SQLite file (`DATA_DIR/waypost.db`, WAL); replicas share one PostgreSQL
//! (`--database postgres://…`). Either holds server metadata (the PKI), apps, tokens (hashed),
//! instance history and which replica holds each live instance, app configuration and logs.
//! Live connections are NOT here; see service/live.rs.
//!
//! Every function takes a [`Db`] (one connection) and is synchronous; async callers go through
//! [`Store::call`], which runs them on tokio's blocking pool so the database never stalls a
//! runtime worker. The schema is the ordered list [`MIGRATIONS`] of `.sql` files in
//! `server/migrations/`.

pub mod apps;
pub mod backup;
pub mod config;
pub mod domains;
pub mod logs;
pub mod members;
pub mod pgtls;
pub mod sql;
pub mod urlauth;

pub use crate::server::model::{
    App, ChildStatus, Connected, FlushRow, InstanceRow, Revoke, TokenRow, TokenScope,
};
use crate::server::model::{Conflict, Labels, labels};
use anyhow::{Context as _, Result, bail};
pub(crate) use sql::args;
pub use sql::{Backend, Begin, Db, Row};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Schema migrations, applied in order; how many are applied is SQLite's `PRAGMA user_version`
/// or PostgreSQL's `waypost_schema` row. Append a new file for a new migration; never edit an
/// applied one (a database that has it would not get the edit, and the test
/// `migration_history_is_unchanged` compares them byte for byte). They are written for SQLite;
/// PostgreSQL runs them through [`sql::pg_schema`].
pub const MIGRATIONS: &[&str] = &[
    // 1: the core tables.
    include_str!("../../../migrations/0001_core.sql"),
    // 2: application config.
    include_str!("../../../migrations/0002_config.sql"),
    // 3: logs.
    include_str!("../../../migrations/0003_logs.sql"),
    // 4: an instance id is bound to the token that first registered it (with its app and
    // deployment), so another token cannot take it over. NULL: recorded before this column
    // existed; such a row binds on app and deployment, and takes the token of its next Hello.
    include_str!("../../../migrations/0004_instance_token.sql"),
    // 5: logs stored as chunks of lines (log_chunks); rows left in log_lines are moved into
    // chunks by the log service when it starts (store/logs.rs `convert_line_rows`).
    include_str!("../../../migrations/0005_log_chunks.sql"),
    // 6: replicas (membership) and which replica holds each live instance.
    include_str!("../../../migrations/0006_replicas.sql"),
    // 7: the entrypoint's own RSS from its Status frames.
    include_str!("../../../migrations/0007_entrypoint_rss.sql"),
    // 8: config scopes (global and per app) as versioned documents, their history, sources.
    include_str!("../../../migrations/0008_config_scopes.sql"),
    // 9: labels of tokens and instances (config selectors, filters).
    include_str!("../../../migrations/0009_labels.sql"),
    // 10: access control of apps' URLs (basic users, bearer tokens, CIDRs).
    include_str!("../../../migrations/0010_url_auth.sql"),
    // 11: custom domains of apps' URLs, with their certificates.
    include_str!("../../../migrations/0011_domains.sql"),
    // 12: named admin tokens with an optional expiry.
    include_str!("../../../migrations/0012_admin_tokens.sql"),
];

/// How many gone instances per app `instances --all` returns (newest first).
pub const GONE_PER_APP: i64 = 100;

/// How long opening a PostgreSQL connection may take when the URL does not say
/// (`connect_timeout`): a replica whose database is unreachable reports it instead of hanging.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The session-scoped advisory lock held while migrating PostgreSQL, so replicas starting at
/// once migrate one after the other ("wp" + 0).
const PG_MIGRATE_LOCK: i64 = 0x7770_0000;

/// Where the database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The embedded default: one SQLite file (`DATA_DIR/waypost.db`).
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://USER@HOST:PORT/DB`), shared by every replica.
    Postgres(String),
}

impl Location {
    /// `--database`: a `postgres://` or `postgresql://` URL; anything else is refused.
    pub fn parse_url(url: &str) -> Result<Location> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "--database must be a postgres:// URL (without it the server uses SQLite in its data dir)"
            );
        }
        url.parse::<postgres::Config>()
            .with_context(|| format!("--database: not a valid PostgreSQL URL: {}", redact(url)))?;
        Ok(Location::Postgres(url.to_string()))
    }

    /// For logs: the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(u) => redact(u),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Connections a [`Store`] keeps to PostgreSQL. Each call holds one for its statements only,
/// so a few let a replica's Hellos, flushes and API reads overlap on the database's cores (with
/// one, a reconnect storm of 5,000 instances was admitted at ~300-600 Welcomes/s against SQLite's
/// ~2,000). Per replica add the log writer's, the log reader's and the two listeners'.
const PG_POOL: usize = 4;

/// A shared handle to the database: a few connections, each behind a mutex. SQLite: one (it
/// serialises writers anyway, and every statement here is short); PostgreSQL: [`PG_POOL`].
#[derive(Clone)]
pub struct Store {
    pool: Arc<Pool>,
    location: Location,
}

struct Pool {
    conns: Vec<Mutex<Db>>,
    /// Where the next call starts looking for a free connection (round robin).
    next: std::sync::atomic::AtomicUsize,
}

impl Store {
    /// Opens (creating if needed) and migrates the database.
    pub fn open(location: &Location) -> Result<Store> {
        let db = connect(location)?;
        blocking(|| migrate(&db))?;
        let mut conns = vec![Mutex::new(db)];
        if let Location::Postgres(_) = location {
            for _ in 1..PG_POOL {
                conns.push(Mutex::new(connect(location)?));
            }
        }
        Ok(Store {
            pool: Arc::new(Pool {
                conns,
                next: Default::default(),
            }),
            location: location.clone(),
        })
    }

    /// Where the database is (for [`connect`]).
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Runs `f` with a connection, synchronously: the first free one, else waits for one. A
    /// PostgreSQL connection the server closed (a restart, a network cut) is opened anew first,
    /// so a replica catches up by itself when its database comes back.
    ///
    /// Timed, by the caller's module, in `waypost_db_statement_duration_seconds` (failures also
    /// in `waypost_db_errors_total`): see [`op_of`].
    pub fn with<R>(&self, f: impl FnOnce(&mut Db) -> Result<R>) -> Result<R> {
        let (op, start) = (op_of(&f), std::time::Instant::now());
        let r = self.with_untimed(f);
        observe(op, start, r.is_err());
        r
    }

    /// [`Store::with`] without the timing (for [`Store::call`], which times its wait for the
    /// blocking pool too).
    fn with_untimed<R>(&self, f: impl FnOnce(&mut Db) -> Result<R>) -> Result<R> {
        use std::sync::TryLockError;
        let conns = &self.pool.conns;
        let start = self
            .pool
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % conns.len();
        let free =
            (0..conns.len()).find_map(|i| match conns[(start + i) % conns.len()].try_lock() {
                Ok(g) => Some(g),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            });
        let mut db = match free {
            Some(g) => g,
            None => conns[start].lock().unwrap_or_else(|e| e.into_inner()),
        };
        blocking(|| {
            if db.is_closed() {
                *db = connect(&self.location).context("reconnecting to the database")?;
            }
            f(&mut db)
        })
    }

    /// Runs `f` with the connection on the blocking pool. Timed as [`Store::with`] is, from the
    /// call (the wait for a blocking thread and a free connection included: what the caller
    /// waits).
    pub async fn call<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Db) -> Result<R> + Send + 'static,
    {
        let (op, start) = (op_of(&f), std::time::Instant::now());
        let this = self.clone();
        let r = tokio::task::spawn_blocking(move || this.with_untimed(f))
            .await
            .context("database task panicked")
            .and_then(|r| r);
        observe(op, start, r.is_err());
        r
    }
}

/// Records one database call in the metrics (model/metrics.rs).
fn observe(op: &'static str, start: std::time::Instant, failed: bool) {
    use crate::server::model::metrics::{OpLabel, metrics};
    let m = metrics();
    let label = OpLabel { op };
    m.db_statement_duration_seconds
        .get_or_create(&label)
        .observe(start.elapsed().as_secs_f64());
    if failed {
        m.db_errors.get_or_create(&label).inc();
    }
}

/// The `op` label of a database call: the module of the code that made it, read from the type
/// name of its closure (`waypost::server::transport::api::list_apps::{{closure}}` →
/// `transport::api`): the function and any type (`ConfigService`) dropped, `server::` left out.
/// A slice of the type name, so no allocation; a bounded set (the crate's modules). Type names
/// are not a stable format, but a different one only makes the label less precise.
fn op_of<F>(_: &F) -> &'static str {
    label_of(std::any::type_name::<F>())
}

fn label_of(name: &'static str) -> &'static str {
    let name = name.trim_start_matches('<');
    let name = name.split(" as ").next().unwrap_or(name);
    let path = name.split("::{{closure}}").next().unwrap_or(name);
    let path = path.split('<').next().unwrap_or(path);
    let path = path.strip_prefix("waypost::").unwrap_or(path);
    let path = path.strip_prefix("server::").unwrap_or(path);
    // Up to the first type (CamelCase) or the function (the last segment).
    let (mut end, mut off) = (0, 0);
    let mut segments = path.split("::").peekable();
    while let Some(seg) = segments.next() {
        if segments.peek().is_none() || seg.starts_with(|c: char| c.is_ascii_uppercase()) {
            break;
        }
        end = off + seg.len();
        off = end + 2;
    }
    if end == 0 { "server" } else { &path[..end] }
}

#[cfg(test)]
mod op_label_tests {
    use super::*;

    #[test]
    fn ops_are_the_callers_module() {
        // The crate's paths spelled in two pieces: scripts/check-layers.sh reads strings too.
        macro_rules! path {
            ($rest:literal) => {
                concat!("waypost::", $rest)
            };
        }
        assert_eq!(
            label_of(path!(
                "server::transport::api::list_apps::{{closure}}::{{closure}}"
            )),
            "transport::api"
        );
        assert_eq!(
            label_of(path!(
                "server::service::config::ConfigService::reload::{{closure}}"
            )),
            "service::config"
        );
        assert_eq!(label_of(path!("server::run_async::{{closure}}")), "server");
        assert_eq!(
            label_of(path!("cli::backup::run::{{closure}}")),
            "cli::backup"
        );
        assert_eq!(label_of(path!("server::store::ping")), "store");
        // The real thing: a closure made here.
        let f = |db: &mut Db| ping(db);
        assert_eq!(op_of(&f), "store::op_label_tests");
    }
}

/// Runs `f`, which may block on the database, from wherever it is called. PostgreSQL's client
/// runs a runtime of its own per call; on a worker of the server's runtime that must be announced
/// ([`tokio::task::block_in_place`]), elsewhere (the blocking pool, threads, tests) it just runs.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The TLS connector for PostgreSQL (see pgtls.rs), made once per process.
fn pg_tls() -> Result<pgtls::Rustls> {
    static TLS: std::sync::OnceLock<std::result::Result<pgtls::Rustls, String>> =
        std::sync::OnceLock::new();
    TLS.get_or_init(|| pgtls::Rustls::from_env().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Another connection to a database [`Store::open`] has migrated, for a thread or a request of
/// its own (the log writer, log readers). SQLite: WAL lets it read while the shared one writes.
pub fn connect(location: &Location) -> Result<Db> {
    match location {
        Location::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            // WAL: readers never block the writer; NORMAL is durable across process crashes
            // (the state lost on power loss is at most the last flush of heartbeats).
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.busy_timeout(Duration::from_secs(10))?;
            Ok(Db::sqlite(conn))
        }
        Location::Postgres(url) => blocking(|| {
            let mut config: postgres::Config = url.parse()?;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(PG_CONNECT_TIMEOUT);
            }
            config.application_name("waypost");
            let client = config
                .connect(pg_tls()?)
                .with_context(|| format!("connecting to {}", redact(url)))?;
            Ok(Db::postgres(client))
        }),
    }
}

/// Whether `e` comes from the database being out of reach (PostgreSQL: the connection could
/// not be made or was lost; SQLite: the file is busy beyond the timeout), rather than from the
/// request: callers answer 503 and the store reconnects on the next call.
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if let Some(pg) = c.downcast_ref::<postgres::Error>() {
            // SQLSTATE class 08 (connection exception) and 57P01-03 (the server is shutting down,
            // crashed or starting): an outage. Any other SQLSTATE: the statement's own fault.
            if let Some(code) = pg.code() {
                let code = code.code();
                return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
            }
            // No SQLSTATE: a connection-level failure (closed, I/O, connect or timeout), unless it
            // is a conversion (a bug, not an outage).
            use std::error::Error as _;
            let io = pg.source().is_some_and(|s| s.is::<std::io::Error>());
            let text = pg.to_string();
            return pg.is_closed()
                || io
                || text.starts_with("error connecting")
                || text.starts_with("error communicating")
                || text.starts_with("timeout");
        }
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = c.downcast_ref::<rusqlite::Error>() {
            return matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            );
        }
        false
    })
}

/// An in-memory SQLite database with the schema, for unit tests.
#[cfg(test)]
pub(crate) fn memory() -> Db {
    let db = Db::sqlite(rusqlite::Connection::open_in_memory().unwrap());
    db.batch("PRAGMA foreign_keys = ON").unwrap();
    migrate(&db).unwrap();
    db
}

/// For the tests of the layers above: runs raw SQL on a SQLite connection (to set up states the
/// store's functions cannot reach, and to check rows).
#[cfg(test)]
pub(crate) fn raw<R>(db: &Db, f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<R>) -> R {
    db.with_sqlite(|c| f(c).expect("raw SQL in a test"))
        .expect("raw SQL needs SQLite")
}

/// The steps of a migration that SQL alone cannot do, run in its transaction right after its SQL.
fn after_migration(db: &Db, version: usize) -> Result<()> {
    match version {
        8 => config::convert_legacy(db).context("schema migration 8: converting the app config"),
        _ => Ok(()),
    }
}

fn migrate(db: &Db) -> Result<()> {
    match db.backend() {
        Backend::Sqlite => {
            let applied: i64 = db.query_one("PRAGMA user_version", &[])?.get(0)?;
            for (i, sql) in pending(applied)? {
                db.transaction(Begin::Immediate, |db| {
                    db.batch(sql)
                        .with_context(|| format!("schema migration {}", i + 1))?;
                    after_migration(db, i + 1)?;
                    db.batch(&format!("PRAGMA user_version = {}", i + 1))
                })?;
            }
            Ok(())
        }
        Backend::Postgres => {
            db.query("SELECT pg_advisory_lock(?1)", args![PG_MIGRATE_LOCK])?;
            let r = (|| {
                db.batch(
                    "CREATE TABLE IF NOT EXISTS waypost_schema (version BIGINT NOT NULL);
                     INSERT INTO waypost_schema (version)
                         SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM waypost_schema);",
                )?;
                let applied: i64 = db
                    .query_one("SELECT version FROM waypost_schema", &[])?
                    .get(0)?;
                for (i, sql) in pending(applied)? {
                    db.transaction(Begin::Deferred, |db| {
                        db.batch(&sql::pg_schema(sql))
                            .with_context(|| format!("schema migration {}", i + 1))?;
                        after_migration(db, i + 1)?;
                        db.execute(
                            "UPDATE waypost_schema SET version = ?1",
                            args![(i + 1) as i64],
                        )
                        .map(drop)
                    })?;
                }
                Ok(())
            })();
            let unlocked = db.query("SELECT pg_advisory_unlock(?1)", args![PG_MIGRATE_LOCK]);
            r.and(unlocked.map(drop))
        }
    }
}

/// The migrations a database with `applied` of them still needs, with their indexes.
fn pending(applied: i64) -> Result<impl Iterator<Item = (usize, &'static str)>> {
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        bail!(
            "the database was written by a newer waypost (schema {applied}, this build knows {})",
            MIGRATIONS.len()
        );
    }
    Ok(MIGRATIONS.iter().copied().enumerate().skip(applied))
}

// ---- notifications (PostgreSQL) -------------------------------------------------------------

/// The channel config changes are announced on (payload: the app's name); see
/// [`config::notify_changed`] and service/fanout.rs.
pub use config::CONFIG_CHANNEL;

/// Subscribes this connection to `channel` (PostgreSQL `LISTEN`); false on SQLite, which has no
/// other replicas to hear from.
pub fn listen(db: &Db, channel: &str) -> Result<bool> {
    if db.backend() != Backend::Postgres {
        return Ok(false);
    }
    // A channel is an identifier, not a parameter: only ours, spelled by us.
    if !channel.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        bail!("invalid channel name {channel:?}");
    }
    db.batch(&format!("LISTEN {channel}"))?;
    Ok(true)
}

/// At most this many notifications are returned by one [`wait_notifications`].
const NOTIFICATIONS_PER_WAIT: usize = 1024;

/// Waits up to `timeout` for a notification on a connection that [`listen`]s, then takes every
/// other one already arrived; returns their payloads (empty on timeout, and on SQLite).
pub fn wait_notifications(db: &Db, timeout: Duration) -> Result<Vec<String>> {
    use postgres::fallible_iterator::FallibleIterator as _;
    db.with_postgres(|c| -> Result<Vec<String>> {
        let mut n = c.notifications();
        let mut out = Vec::new();
        let first = n.timeout_iter(timeout).next()?;
        if let Some(first) = first {
            out.push(first.payload().to_string());
            let mut more = n.iter();
            while out.len() < NOTIFICATIONS_PER_WAIT {
                match more.next()? {
                    Some(m) => out.push(m.payload().to_string()),
                    None => break,
                }
            }
        }
        Ok(out)
    })
    .unwrap_or(Ok(Vec::new()))
}

/// A trivial query: whether the database answers (`/readyz`).
pub fn ping(db: &Db) -> Result<()> {
    db.query_one("SELECT 1", &[])?;
    Ok(())
}

// ---- meta ----------------------------------------------------------------------------------

pub fn meta_get(db: &Db, key: &str) -> Result<Option<String>> {
    db.query_opt("SELECT value FROM meta WHERE key = ?1", args![key])?
        .map(|r| r.get(0))
        .transpose()
}

pub fn meta_set(db: &Db, key: &str, value: &str) -> Result<()> {
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        args![key, value],
    )?;
    Ok(())
}

/// Sets `key` to `value` unless it is set already; returns the value that is stored after (the
/// caller's, or the one another replica stored first). How the first replica's CA becomes every
/// replica's.
pub fn meta_set_once(db: &Db, key: &str, value: &str) -> Result<String> {
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
        args![key, value],
    )?;
    meta_get(db, key)?.context("a meta value vanished right after it was set")
}

/// The `meta` key of the next exec session id.
const EXEC_SESSION_KEY: &str = "exec_next_session";

/// Allocates the next exec session id. The counter is stored, so ids stay unique across server
/// restarts and across replicas (an entrypoint that kept a session through a restart or a move
/// never sees its id reused).
pub fn next_exec_session(db: &mut Db) -> Result<u64> {
    // Immediate: the read and the write are one step for every connection and replica.
    db.transaction(Begin::Immediate, |db| {
        let next: u64 = meta_get(db, EXEC_SESSION_KEY)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
            .max(1);
        meta_set(db, EXEC_SESSION_KEY, &(next + 1).to_string())?;
        Ok(next)
    })
}

// ---- apps ----------------------------------------------------------------------------------

/// Creates an app; `Ok(false)` if it already exists.
pub fn create_app(db: &Db, name: &str, now: i64) -> Result<bool> {
    let n = db.execute(
        "INSERT INTO apps (name, created_at) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        args![name, now],
    )?;
    Ok(n == 1)
}

pub fn app_exists(db: &Db, name: &str) -> Result<bool> {
    Ok(db
        .query_opt("SELECT 1 FROM apps WHERE name = ?1", args![name])?
        .is_some())
}

pub fn list_apps(db: &Db) -> Result<Vec<App>> {
    db.query("SELECT name, created_at FROM apps ORDER BY name", &[])?
        .iter()
        .map(|r| {
            Ok(App {
                name: r.get(0)?,
                created_at: r.get(1)?,
            })
        })
        .collect()
}

// ---- tokens --------------------------------------------------------------------------------

/// Inserts a token without labels. An admin token made this way (the one `server run` mints at
/// first start) is named `initial`, or `initial-2`, `initial-3`… if that name is taken (the CLI
/// context was lost and a new one minted), and never expires.
pub fn insert_token(db: &Db, hash: &str, scope: &TokenScope, now: i64) -> Result<()> {
    insert_token_with_labels(db, hash, scope, &Labels::new(), now)
}

/// [`insert_token`] with labels for the instances that connect with it; the caller has checked
/// them (`labels::check_all`).
pub fn insert_token_with_labels(
    db: &Db,
    hash: &str,
    scope: &TokenScope,
    token_labels: &Labels,
    now: i64,
) -> Result<()> {
    let (kind, app, deployment, name) = match scope {
        TokenScope::Admin => ("admin", None, None, Some(free_initial_name(db)?)),
        TokenScope::Entrypoint { app, deployment } => (
            "entrypoint",
            Some(app.as_str()),
            deployment.as_deref(),
            None,
        ),
    };
    db.execute(
        "INSERT INTO tokens (hash, kind, app, deployment, created_at, labels, name)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        args![
            hash,
            kind,
            app,
            deployment,
            now,
            labels::format(token_labels),
            name
        ],
    )?;
    Ok(())
}

/// The first of `initial`, `initial-2`, `initial-3`… that no admin token has.
fn free_initial_name(db: &Db) -> Result<String> {
    let taken: std::collections::HashSet<String> = db
        .query(
            "SELECT name FROM tokens WHERE kind = 'admin' AND name LIKE 'initial%'",
            &[],
        )?
        .iter()
        .map(|r| r.get::<String>(0))
        .collect::<Result<_>>()?;
    Ok(std::iter::once("initial".to_string())
        .chain((2..).map(|n| format!("initial-{n}")))
        .find(|n| !taken.contains(n))
        .expect("an unbounded sequence has a free name"))
}

/// What [`insert_admin_token`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum NewAdmin {
    Created,
    /// Another admin token already has this name (expired or not); nothing was inserted.
    NameTaken(TokenRow),
}

/// Inserts an admin token named `name` (unique among admin tokens), expiring at `expires_at`
/// (unix ms; None: never).
pub fn insert_admin_token(
    db: &mut Db,
    hash: &str,
    name: &str,
    expires_at: Option<i64>,
    now: i64,
) -> Result<NewAdmin> {
    // Immediate: the name check and the insert are one step, also across replicas.
    db.transaction(Begin::Immediate, |db| {
        if let Some(r) = db.query_opt(
            &format!("SELECT {TOKEN_COLS} FROM tokens WHERE kind = 'admin' AND name = ?1"),
            args![name],
        )? {
            return Ok(NewAdmin::NameTaken(token_row(&r)?));
        }
        db.execute(
            "INSERT INTO tokens (hash, kind, app, deployment, created_at, labels, name, expires_at)
             VALUES (?1, 'admin', NULL, NULL, ?2, '', ?3, ?4)",
            args![hash, now, name, expires_at],
        )?;
        Ok(NewAdmin::Created)
    })
}

/// Stored label text (canonical, see model/labels.rs) back as labels.
fn stored_labels(text: &str) -> Result<Labels> {
    labels::parse(text).map_err(|e| anyhow::anyhow!("stored labels {text:?}: {e}"))
}

/// The columns [`token_row`] reads, in order.
const TOKEN_COLS: &str = "hash, kind, app, deployment, created_at, labels, name, expires_at";

fn token_row(r: &Row) -> Result<TokenRow> {
    Ok(TokenRow {
        hash: r.get(0)?,
        kind: r.get(1)?,
        app: r.get(2)?,
        deployment: r.get(3)?,
        created_at: r.get(4)?,
        labels: stored_labels(&r.get::<String>(5)?)?,
        name: r.get(6)?,
        expires_at: r.get(7)?,
    })
}

/// Tokens, oldest first; `app`: only that app's entrypoint tokens.
pub fn list_tokens(db: &Db, app: Option<&str>) -> Result<Vec<TokenRow>> {
    db.query(
        &format!(
            "SELECT {TOKEN_COLS} FROM tokens
             WHERE CAST(?1 AS TEXT) IS NULL OR app = ?1 ORDER BY created_at, hash"
        ),
        args![app],
    )?
    .iter()
    .map(token_row)
    .collect()
}

/// Deletes the token whose hash starts with `id_prefix` (hex) — any entrypoint token, and an
/// admin token unless it is the last one that has not expired at `now` (unix ms).
pub fn revoke_token(db: &mut Db, id_prefix: &str, now: i64) -> Result<Revoke> {
    // Ids are hex (LIKE would treat % and _ as wildcards).
    if id_prefix.is_empty() || !id_prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Revoke::NotFound);
    }
    let pattern = format!("{}%", id_prefix.to_ascii_lowercase());
    // Immediate: two operators revoking the last two admin tokens at once cannot both pass the
    // check.
    db.transaction(Begin::Immediate, |db| {
        let found: Vec<TokenRow> = db
            .query(
                &format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash LIKE ?1 LIMIT 2"),
                args![pattern],
            )?
            .iter()
            .map(token_row)
            .collect::<Result<_>>()?;
        let row = match found.as_slice() {
            [] => return Ok(Revoke::NotFound),
            [_, _, ..] => return Ok(Revoke::Ambiguous),
            [row] => row.clone(),
        };
        if row.kind == "admin" && !row.expired(now) {
            let others: i64 = db
                .query_one(
                    "SELECT COUNT(*) FROM tokens WHERE kind = 'admin' AND hash <> ?1
                       AND (expires_at IS NULL OR expires_at > ?2)",
                    args![row.hash, now],
                )?
                .get(0)?;
            if others == 0 {
                return Ok(Revoke::LastAdmin(row));
            }
        }
        db.execute("DELETE FROM tokens WHERE hash = ?1", args![row.hash])?;
        // Other replicas close their connections with it (server/mod.rs).
        config::notify_changed(db, config::TOKENS_CHANGED)?;
        Ok(Revoke::Done(row))
    })
}

/// What the token with a hash is at a moment, for the API's authentication.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Valid(TokenScope),
    /// Known but past its expiry (unix ms); refused with a message that says so.
    Expired {
        expires_at: i64,
    },
    Unknown,
}

/// The token with this hash at `now` (unix ms): valid, expired or unknown.
pub fn lookup_token_at(db: &Db, hash: &str, now: i64) -> Result<Lookup> {
    let Some(r) = db.query_opt(
        "SELECT kind, app, deployment, expires_at FROM tokens WHERE hash = ?1",
        args![hash],
    )?
    else {
        return Ok(Lookup::Unknown);
    };
    let (kind, app, deployment, expires_at): (String, Option<String>, Option<String>, Option<i64>) =
        (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
    if let Some(t) = expires_at.filter(|t| *t <= now) {
        return Ok(Lookup::Expired { expires_at: t });
    }
    Ok(match (kind.as_str(), app) {
        ("admin", _) => Lookup::Valid(TokenScope::Admin),
        ("entrypoint", Some(app)) => Lookup::Valid(TokenScope::Entrypoint { app, deployment }),
        _ => Lookup::Unknown,
    })
}

/// The scope of a valid token; None for an unknown or expired one.
pub fn lookup_token(db: &Db, hash: &str) -> Result<Option<TokenScope>> {
    Ok(lookup_token_with_labels(db, hash)?.map(|(scope, _)| scope))
}

/// [`lookup_token`] and the token's labels, in one query (the control handshake needs both).
/// An expired token is None, like an unknown one.
pub fn lookup_token_with_labels(db: &Db, hash: &str) -> Result<Option<(TokenScope, Labels)>> {
    let Some(r) = db.query_opt(
        "SELECT kind, app, deployment, labels FROM tokens
         WHERE hash = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
        args![hash, crate::util::now_ms()],
    )?
    else {
        return Ok(None);
    };
    let (kind, app, deployment): (String, Option<String>, Option<String>) =
        (r.get(0)?, r.get(1)?, r.get(2)?);
    let scope = match (kind.as_str(), app) {
        ("admin", _) => TokenScope::Admin,
        ("entrypoint", Some(app)) => TokenScope::Entrypoint { app, deployment },
        _ => return Ok(None),
    };
    Ok(Some((scope, stored_labels(&r.get::<String>(3)?)?)))
}

// ---- instances -----------------------------------------------------------------------------

/// Whether the instance id has a row (it connected before, here or to another replica): its
/// Hello is a reconnect (`waypost_control_reconnects_total`).
pub fn instance_known(db: &Db, id: &str) -> Result<bool> {
    Ok(db
        .query_opt("SELECT 1 FROM instances WHERE id = ?1", args![id])?
        .is_some())
}

/// After a crash of the only server (SQLite: one server per data dir), rows still marked live
/// belong to connections that no longer exist.
pub fn mark_all_lost(db: &Db, now: i64) -> Result<usize> {
    db.execute(
        "UPDATE instances SET disconnected_at = ?1, ended = 'lost' WHERE disconnected_at IS NULL",
        args![now],
    )
}

/// The lease: live rows held by a replica that is not in `replicas` any more or was last seen
/// before `stale_before` (unix ms) turn `lost` — its connections died with it. Rows of
/// `except` (the caller) are never touched. Returns how many turned lost.
pub fn expire_leases(db: &Db, except: &str, stale_before: i64, now: i64) -> Result<usize> {
    db.execute(
        "UPDATE instances SET disconnected_at = ?1, ended = 'lost'
         WHERE disconnected_at IS NULL AND (replica IS NULL OR replica <> ?2)
           AND NOT EXISTS (SELECT 1 FROM replicas r
                           WHERE r.id = instances.replica AND r.last_seen >= ?3)",
        args![now, except, stale_before],
    )
}

/// The status columns as parameters, in [`STATUS_COLS`] order.
fn status_values(s: &ChildStatus) -> [sql::Value<'static>; 10] {
    use sql::Value;
    let opt = |v: Option<i64>| v.map_or(Value::Null, Value::Int);
    [
        s.state
            .map_or(Value::Null, |t| Value::Text(std::borrow::Cow::Borrowed(t))),
        opt(s.child_pid.map(i64::from)),
        opt(s.exit_code.map(i64::from)),
        opt(s.exit_signal.map(i64::from)),
        Value::Int(i64::from(s.oom_killed)),
        Value::Int(s.child_rss_bytes as i64),
        Value::Int(s.child_cpu_ms as i64),
        Value::Int(i64::from(s.starts)),
        Value::Int(s.config_version as i64),
        Value::Int(s.entrypoint_rss_bytes as i64),
    ]
}

/// Inserts the instance, or revives its row if the same instance id was seen before, and
/// returns the child status to keep in memory: the row's previous status (so a reconnect keeps
/// the last exit) with the Hello's status folded in.
///
/// The id must be free or already the caller's: `Ok(Err(conflict))`, with nothing written, if
/// its row (live or gone) was recorded under another app, deployment or token, or its logs under
/// another app. This is the binding's source of truth: the check and the write are one
/// transaction, so of two Hellos racing for a new id the second finds the first's row.
pub fn upsert_connected(
    db: &mut Db,
    c: &Connected,
    hello_status: Option<&waypost_proto::Status>,
    now: i64,
) -> Result<Result<ChildStatus, Conflict>> {
    upsert_connected_on(db, c, hello_status, None, now)
}

/// [`upsert_connected`], recording `replica` (the id of the server replica that holds the
/// connection; see store/members.rs) on the row.
pub fn upsert_connected_on(
    db: &mut Db,
    c: &Connected,
    hello_status: Option<&waypost_proto::Status>,
    replica: Option<&str>,
    now: i64,
) -> Result<Result<ChildStatus, Conflict>> {
    upsert_connected_with_labels(db, c, &Labels::new(), hello_status, replica, now)
}

/// [`upsert_connected_on`], recording the instance's labels (its own merged with its token's,
/// see model/labels.rs) on the row; they replace whatever an earlier Hello recorded.
pub fn upsert_connected_with_labels(
    db: &mut Db,
    c: &Connected,
    instance_labels: &Labels,
    hello_status: Option<&waypost_proto::Status>,
    replica: Option<&str>,
    now: i64,
) -> Result<Result<ChildStatus, Conflict>> {
    let label_text = labels::format(instance_labels);
    // Immediate: this reads, then writes. On SQLite a deferred transaction would fail at once
    // (not after the busy timeout) if another connection (the log writer) committed in between;
    // on both, taking the write lock before the read makes the owner check and the insert atomic
    // (across replicas too).
    db.transaction(Begin::Immediate, |db| {
        let row = db
            .query_opt(
                &format!(
                    "SELECT app, deployment, token_hash, {STATUS_COLS} FROM instances WHERE id = ?1"
                ),
                args![c.id],
            )?
            .map(|r| -> Result<_> {
                Ok((
                    r.get::<String>(0)?,
                    r.get::<String>(1)?,
                    r.get::<Option<String>>(2)?,
                    status_from_row(&r, 3)?,
                ))
            })
            .transpose()?;
        let owner = c.owner();
        if let Some((app, deployment, token, _)) = &row
            && let Some(conflict) = owner.conflict(app, deployment, token.as_deref())
        {
            return Ok(Err(conflict));
        }
        // Logs outlive instance rows in principle (and are stored per instance id): they must
        // never be appended to another app's.
        let log_app: Option<String> = db
            .query_opt(
                "SELECT app FROM log_sources WHERE instance = ?1",
                args![c.id],
            )?
            .map(|r| r.get(0))
            .transpose()?;
        if log_app.is_some_and(|a| a != c.app) {
            return Ok(Err(Conflict::App));
        }
        let mut status = row.map(|r| r.3).unwrap_or_default();
        if let Some(s) = hello_status {
            status.apply(s);
        }
        let [s1, s2, s3, s4, s5, s6, s7, s8, s9, s10] = status_values(&status);
        // The owner columns are checked above and never change on a revival; a row recorded
        // without a token takes this one's.
        db.execute(
            "INSERT INTO instances (id, app, deployment, hostname, entrypoint_pid, entrypoint_version,
             connected_at, last_seen_at, disconnected_at, ended,
             child_state, child_pid, exit_code, exit_signal, oom_killed, child_rss_bytes,
             child_cpu_ms, starts, config_version, session, token_hash, replica,
             entrypoint_rss_bytes, labels)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, NULL, NULL, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)
         ON CONFLICT (id) DO UPDATE SET
             token_hash = COALESCE(instances.token_hash, excluded.token_hash),
             hostname = excluded.hostname,
             entrypoint_pid = excluded.entrypoint_pid,
             entrypoint_version = excluded.entrypoint_version,
             connected_at = excluded.connected_at, last_seen_at = excluded.last_seen_at,
             disconnected_at = NULL, ended = NULL,
             child_state = excluded.child_state, child_pid = excluded.child_pid,
             exit_code = excluded.exit_code, exit_signal = excluded.exit_signal,
             oom_killed = excluded.oom_killed, child_rss_bytes = excluded.child_rss_bytes,
             child_cpu_ms = excluded.child_cpu_ms, starts = excluded.starts,
             config_version = excluded.config_version, session = excluded.session,
             replica = excluded.replica, entrypoint_rss_bytes = excluded.entrypoint_rss_bytes,
             labels = excluded.labels",
            args![
                c.id,
                c.app,
                c.deployment,
                c.hostname,
                c.entrypoint_pid,
                c.entrypoint_version,
                now,
                s1,
                s2,
                s3,
                s4,
                s5,
                s6,
                s7,
                s8,
                s9,
                c.session,
                c.token_hash,
                replica,
                s10,
                label_text
            ],
        )?;
        Ok(Ok(status))
    })
}

const STATUS_COLS: &str = "child_state, child_pid, exit_code, exit_signal, oom_killed, \
    child_rss_bytes, child_cpu_ms, starts, config_version, entrypoint_rss_bytes";

/// Reads the [`STATUS_COLS`] starting at column `at`.
fn status_from_row(r: &Row, at: usize) -> Result<ChildStatus> {
    Ok(ChildStatus {
        state: ChildStatus::state_from_text(r.get::<Option<String>>(at)?.as_deref()),
        child_pid: r.get(at + 1)?,
        exit_code: r.get(at + 2)?,
        exit_signal: r.get(at + 3)?,
        oom_killed: r.get(at + 4)?,
        child_rss_bytes: r.get::<i64>(at + 5)? as u64,
        child_cpu_ms: r.get::<i64>(at + 6)? as u64,
        starts: r.get(at + 7)?,
        config_version: r.get::<i64>(at + 8)? as u64,
        entrypoint_rss_bytes: r.get::<i64>(at + 9)? as u64,
    })
}

/// Periodic flush of live instances' last-seen time and child status, in one transaction.
pub fn flush_live(db: &mut Db, rows: &[FlushRow]) -> Result<()> {
    db.transaction(Begin::Deferred, |db| {
        for (id, session, last_seen, status) in rows {
            let [s1, s2, s3, s4, s5, s6, s7, s8, s9, s10] = status_values(status);
            db.execute(
                "UPDATE instances SET last_seen_at = ?2, child_state = ?3, child_pid = ?4,
                     exit_code = ?5, exit_signal = ?6, oom_killed = ?7, child_rss_bytes = ?8,
                     child_cpu_ms = ?9, starts = ?10, config_version = ?11,
                     entrypoint_rss_bytes = ?13
                 WHERE id = ?1 AND session = ?12 AND disconnected_at IS NULL",
                args![
                    id, last_seen, s1, s2, s3, s4, s5, s6, s7, s8, s9, session, s10
                ],
            )?;
        }
        Ok(())
    })
}

/// The connection ended: record the final status and how it ended.
pub fn mark_disconnected(
    db: &Db,
    id: &str,
    session: i64,
    last_seen: i64,
    status: &ChildStatus,
    now: i64,
) -> Result<()> {
    let ended = if status.state == Some("exited") {
        "exited"
    } else {
        "lost"
    };
    let [s1, s2, s3, s4, s5, s6, s7, s8, s9, s10] = status_values(status);
    db.execute(
        "UPDATE instances SET last_seen_at = ?2, disconnected_at = ?3, ended = ?4,
             child_state = ?5, child_pid = ?6, exit_code = ?7, exit_signal = ?8, oom_killed = ?9,
             child_rss_bytes = ?10, child_cpu_ms = ?11, starts = ?12, config_version = ?13,
             entrypoint_rss_bytes = ?15
         WHERE id = ?1 AND session = ?14",
        args![
            id, last_seen, now, ended, s1, s2, s3, s4, s5, s6, s7, s8, s9, session, s10
        ],
    )?;
    Ok(())
}

/// Live rows (optionally of one app) and, with `all`, the newest [`GONE_PER_APP`] gone ones of
/// each app. Live first (newest connection first), then gone (newest disconnection first).
pub fn list_instances(db: &Db, app: Option<&str>, all: bool) -> Result<Vec<InstanceRow>> {
    const COLS: &str = "id, app, deployment, hostname, entrypoint_pid, entrypoint_version,
        connected_at, last_seen_at, disconnected_at, ended, child_state, child_pid, exit_code,
        exit_signal, oom_killed, child_rss_bytes, child_cpu_ms, starts, config_version,
        entrypoint_rss_bytes, replica, labels";
    let sql = format!(
        "SELECT {COLS} FROM (
             SELECT {COLS}, 0 AS grp, connected_at AS ord FROM instances
                 WHERE disconnected_at IS NULL AND (CAST(?1 AS TEXT) IS NULL OR app = ?1)
             UNION ALL
             SELECT {COLS}, 1 AS grp, disconnected_at AS ord FROM (
                 SELECT *, ROW_NUMBER() OVER (PARTITION BY app ORDER BY disconnected_at DESC) AS rn
                 FROM instances WHERE ?2 = 1 AND disconnected_at IS NOT NULL
                     AND (CAST(?1 AS TEXT) IS NULL OR app = ?1)
             ) AS gone WHERE rn <= {GONE_PER_APP}
         ) AS listed ORDER BY grp, ord DESC, id"
    );
    db.query(&sql, args![app, all])?
        .iter()
        .map(|r| {
            Ok(InstanceRow {
                id: r.get(0)?,
                app: r.get(1)?,
                deployment: r.get(2)?,
                hostname: r.get(3)?,
                entrypoint_pid: r.get(4)?,
                entrypoint_version: r.get(5)?,
                connected_at: r.get(6)?,
                last_seen_at: r.get(7)?,
                disconnected_at: r.get(8)?,
                ended: r.get(9)?,
                status: status_from_row(r, 10)?,
                replica: r.get(20)?,
                labels: stored_labels(&r.get::<String>(21)?)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use rusqlite::Connection;
    use std::path::Path;

    fn mem() -> Db {
        memory()
    }

    fn connected(id: &str, app: &str) -> Connected {
        Connected {
            id: id.into(),
            app: app.into(),
            deployment: String::new(),
            hostname: "h".into(),
            entrypoint_pid: 1,
            entrypoint_version: "0.1.0".into(),
            session: 1,
            token_hash: "t".into(),
        }
    }

    fn app_of(c: &Db, id: &str) -> (String, String, Option<String>, i64) {
        raw(c, |c| {
            c.query_row(
                "SELECT app, deployment, token_hash, session FROM instances WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
        })
    }

    #[test]
    fn an_instance_id_stays_with_its_first_owner() {
        use super::Conflict;
        let mut c = mem();
        create_app(&c, "a", 1).unwrap();
        create_app(&c, "b", 1).unwrap();
        upsert_connected(&mut c, &connected("bb", "b"), None, 10)
            .unwrap()
            .unwrap();
        let before = app_of(&c, "bb");
        let other_app = Connected {
            session: 2,
            ..connected("bb", "a")
        };
        let other_dep = Connected {
            session: 3,
            deployment: "d".into(),
            ..connected("bb", "b")
        };
        let other_token = Connected {
            session: 4,
            token_hash: "u".into(),
            ..connected("bb", "b")
        };
        for (who, want) in [
            (&other_app, Conflict::App),
            (&other_dep, Conflict::Deployment),
            (&other_token, Conflict::Token),
        ] {
            assert_eq!(upsert_connected(&mut c, who, None, 20).unwrap(), Err(want));
            assert_eq!(app_of(&c, "bb"), before, "nothing written");
        }
        // Gone (exited or lost) rows stay bound too.
        mark_disconnected(&c, "bb", 1, 30, &ChildStatus::default(), 31).unwrap();
        assert_eq!(
            upsert_connected(&mut c, &other_app, None, 40).unwrap(),
            Err(Conflict::App)
        );
        assert_eq!(list_instances(&c, Some("a"), true).unwrap().len(), 0);
        // The owner's reconnect revives it (negative control).
        let again = Connected {
            session: 5,
            ..connected("bb", "b")
        };
        assert!(upsert_connected(&mut c, &again, None, 50).unwrap().is_ok());
        assert_eq!(app_of(&c, "bb").3, 5);
    }

    #[test]
    fn rows_from_before_token_binding_bind_on_app_and_deployment() {
        use super::Conflict;
        let mut c = mem();
        create_app(&c, "a", 1).unwrap();
        create_app(&c, "b", 1).unwrap();
        upsert_connected(&mut c, &connected("old", "b"), None, 10)
            .unwrap()
            .unwrap();
        raw(&c, |c| {
            c.execute("UPDATE instances SET token_hash = NULL", [])
        });
        assert_eq!(
            upsert_connected(&mut c, &connected("old", "a"), None, 20).unwrap(),
            Err(Conflict::App)
        );
        // Same app and deployment, any token: allowed, and the row now holds that token.
        let t2 = Connected {
            token_hash: "t2".into(),
            ..connected("old", "b")
        };
        assert!(upsert_connected(&mut c, &t2, None, 30).unwrap().is_ok());
        assert_eq!(app_of(&c, "old").2.as_deref(), Some("t2"));
        assert_eq!(
            upsert_connected(&mut c, &connected("old", "b"), None, 40).unwrap(),
            Err(Conflict::Token)
        );
    }

    #[test]
    fn logs_of_an_id_bind_it_to_their_app() {
        use super::Conflict;
        let mut c = mem();
        create_app(&c, "a", 1).unwrap();
        raw(&c, |c| {
            c.execute(
                "INSERT INTO log_sources (instance, app) VALUES ('ll', 'b')",
                [],
            )
        });
        assert_eq!(
            upsert_connected(&mut c, &connected("ll", "a"), None, 10).unwrap(),
            Err(Conflict::App)
        );
        assert!(
            upsert_connected(&mut c, &connected("ll", "b"), None, 10)
                .unwrap()
                .is_ok()
        );
    }

    #[test]
    fn racing_hellos_for_a_new_id_bind_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("race.db");
        let st = Store::open(&Location::Sqlite(path.clone())).unwrap();
        st.with(|c| {
            create_app(c, "a", 1)?;
            create_app(c, "b", 1)
        })
        .unwrap();
        for round in 0..20 {
            let id = format!("race{round}");
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let threads: Vec<_> = ["a", "b"]
                .into_iter()
                .map(|app| {
                    // Separate connections: SQLite's locking decides, not the Store's mutex.
                    let conn = Connection::open(&path).unwrap();
                    conn.busy_timeout(std::time::Duration::from_secs(5))
                        .unwrap();
                    let mut conn = Db::sqlite(conn);
                    let (id, barrier) = (id.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        upsert_connected(&mut conn, &connected(&id, app), None, 1)
                            .unwrap()
                            .is_ok()
                    })
                })
                .collect();
            let won: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(
                won.iter().filter(|w| **w).count(),
                1,
                "round {round}: {won:?}"
            );
            let winner = if won[0] { "a" } else { "b" };
            assert_eq!(st.with(|c| Ok(app_of(c, &id).0)).unwrap(), winner);
        }
    }

    #[test]
    fn exec_session_ids_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let st = Store::open(&Location::Sqlite(path.clone())).unwrap();
        assert_eq!(st.with(next_exec_session).unwrap(), 1);
        assert_eq!(st.with(next_exec_session).unwrap(), 2);
        drop(st);
        let st = Store::open(&Location::Sqlite(path.clone())).unwrap();
        assert_eq!(st.with(next_exec_session).unwrap(), 3);
    }

    /// The schema as the build before the migrations became `.sql` files wrote it, frozen here:
    /// databases made by it must keep opening.
    const OLD_MIGRATIONS: [&str; 5] = [
        r#"CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE apps (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL);
     CREATE TABLE tokens (
         hash TEXT PRIMARY KEY,               -- hex SHA-256 of the token text
         kind TEXT NOT NULL CHECK (kind IN ('admin', 'entrypoint')),
         app TEXT REFERENCES apps(name),      -- entrypoint tokens: the app they are scoped to
         deployment TEXT,                     -- NULL: any deployment ('' on the instance)
         created_at INTEGER NOT NULL
     );
     CREATE TABLE instances (
         id TEXT PRIMARY KEY,                 -- hex of the 16-byte instance id
         app TEXT NOT NULL,
         deployment TEXT NOT NULL DEFAULT '',
         hostname TEXT NOT NULL DEFAULT '',
         entrypoint_pid INTEGER NOT NULL DEFAULT 0,
         entrypoint_version TEXT NOT NULL DEFAULT '',
         connected_at INTEGER NOT NULL,       -- unix ms, of the latest connection
         last_seen_at INTEGER NOT NULL,       -- unix ms; flushed from memory every few seconds
         disconnected_at INTEGER,             -- NULL while live
         ended TEXT,                          -- 'exited' | 'lost' once disconnected
         child_state TEXT,                    -- starting | running | restarting | exited
         child_pid INTEGER,
         exit_code INTEGER,                   -- of the last exit
         exit_signal INTEGER,
         oom_killed INTEGER NOT NULL DEFAULT 0,
         child_rss_bytes INTEGER NOT NULL DEFAULT 0,
         child_cpu_ms INTEGER NOT NULL DEFAULT 0,
         starts INTEGER NOT NULL DEFAULT 0,
         config_version INTEGER NOT NULL DEFAULT 0,
         session INTEGER NOT NULL DEFAULT 0   -- random per connection; guards late writes
     );
     CREATE INDEX instances_live ON instances (disconnected_at, app);
     CREATE INDEX instances_gone ON instances (app, disconnected_at);"#,
        r#"
    CREATE TABLE config_apps (
        app TEXT PRIMARY KEY REFERENCES apps(name),
        version INTEGER NOT NULL DEFAULT 0,     -- bumped by every change
        on_change TEXT NOT NULL DEFAULT 'restart' CHECK (on_change IN ('restart', 'signal', 'none')),
        signal TEXT NOT NULL DEFAULT '',        -- e.g. SIGHUP when on_change = 'signal'
        splay_ms INTEGER,                       -- NULL: DEFAULT_SPLAY
        stop_grace_ms INTEGER NOT NULL DEFAULT 0 -- 0: the entrypoint's WAYPOST_STOP_TIMEOUT
    );
    CREATE TABLE config_vars (
        app TEXT NOT NULL REFERENCES apps(name),
        deployment TEXT NOT NULL DEFAULT '',    -- '': app-wide; else overrides for that deployment
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (app, deployment, key)
    );
    CREATE TABLE config_files (
        app TEXT NOT NULL REFERENCES apps(name),
        path TEXT NOT NULL,                     -- absolute, inside the app's environment
        mode INTEGER NOT NULL,
        contents BLOB NOT NULL,
        PRIMARY KEY (app, path)
    );"#,
        r#"
    CREATE TABLE log_sources (
        id INTEGER PRIMARY KEY,              -- referenced by log_lines.src (smaller than the hex)
        instance TEXT NOT NULL UNIQUE,       -- hex instance id
        app TEXT NOT NULL,
        next_seq INTEGER NOT NULL DEFAULT 0, -- H: every entry below is stored or known lost
        lost INTEGER NOT NULL DEFAULT 0,     -- entries known lost (sum of the markers)
        reported_dropped INTEGER NOT NULL DEFAULT 0 -- sum of LogBatch.dropped (informational)
    );
    CREATE INDEX log_sources_app ON log_sources (app);
    CREATE TABLE log_lines (
        id INTEGER PRIMARY KEY,              -- arrival order: the order `logs` shows
        app TEXT NOT NULL,
        src INTEGER NOT NULL,                -- log_sources.id
        seq INTEGER NOT NULL,
        stream INTEGER NOT NULL,             -- 0 stdout, 1 stderr, 2 entrypoint
        ts_us INTEGER NOT NULL,              -- first byte of the line, Unix µs
        truncated INTEGER NOT NULL DEFAULT 0,-- 1: the line continues in a later entry
        dropped INTEGER NOT NULL DEFAULT 0,  -- > 0: a marker: entries seq..seq+dropped were lost
        data BLOB NOT NULL
    );
    -- Reading an app in arrival order, and one instance of it (src is in the index, so the
    -- filter needs no table lookups). Not (src, id): with many instances logging at once its
    -- inserts land all over the tree, which costs about a quarter of the ingest rate.
    CREATE INDEX log_lines_app ON log_lines (app, id, src);
    -- Where --since starts (appends near the end: timestamps grow).
    CREATE INDEX log_lines_time ON log_lines (app, ts_us);
    CREATE TABLE log_settings (
        app TEXT PRIMARY KEY REFERENCES apps(name),
        max_lines INTEGER,                   -- NULL: DEFAULT_MAX_LINES
        max_bytes INTEGER                    -- NULL: DEFAULT_MAX_BYTES
    );
    CREATE TABLE log_usage (
        app TEXT PRIMARY KEY,
        lines INTEGER NOT NULL DEFAULT 0,    -- rows in log_lines (markers included)
        bytes INTEGER NOT NULL DEFAULT 0     -- sum of length(data)
    );"#,
        r#"ALTER TABLE instances ADD COLUMN token_hash TEXT;"#,
        // The build before replicas ended at migration 5 (log chunks); its text is the file's.
        include_str!("../../../migrations/0005_log_chunks.sql"),
    ];

    /// Builds a database the way the previous build did: its migrations, up to `upto`, counted
    /// by `PRAGMA user_version`.
    fn old_database(path: &Path, upto: usize) {
        let mut conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        for (i, sql) in OLD_MIGRATIONS.iter().enumerate().take(upto) {
            let tx = conn.transaction().unwrap();
            tx.execute_batch(sql).unwrap();
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .unwrap();
            tx.commit().unwrap();
        }
    }

    /// Every table, index and its SQL text, and the schema version.
    fn schema(path: &Path) -> (Vec<(String, String, Option<String>)>, i64) {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let v = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        (rows, v)
    }

    #[test]
    fn migration_history_is_unchanged() {
        // Applied migrations are never edited: the files are the old text, byte for byte (later
        // ones may follow).
        assert!(MIGRATIONS.len() >= OLD_MIGRATIONS.len());
        for (i, old) in OLD_MIGRATIONS.iter().enumerate() {
            assert_eq!(MIGRATIONS[i], *old, "migration {} changed", i + 1);
        }
    }

    #[test]
    fn databases_of_the_previous_build_open_and_migrate() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("fresh.db");
        drop(Store::open(&Location::Sqlite(fresh.clone())).unwrap());
        let (want, version) = schema(&fresh);
        assert_eq!(version as usize, MIGRATIONS.len());
        // A database at every schema version the previous build could leave behind: this build
        // brings each to the same schema as a new one, and keeps its rows.
        for upto in 0..=OLD_MIGRATIONS.len() {
            let path = dir.path().join(format!("old-{upto}.db"));
            old_database(&path, upto);
            if upto >= 1 {
                let c = Connection::open(&path).unwrap();
                c.execute_batch(
                    "INSERT INTO apps VALUES ('web', 1);
                     INSERT INTO meta VALUES ('ca_cn', 'waypost CA 0000');
                     INSERT INTO tokens VALUES ('aa11', 'entrypoint', 'web', NULL, 1);
                     INSERT INTO instances (id, app, connected_at, last_seen_at)
                         VALUES ('00ff', 'web', 1, 2);",
                )
                .unwrap();
            }
            let st = Store::open(&Location::Sqlite(path.clone())).unwrap();
            assert_eq!(
                schema(&path),
                (want.clone(), version),
                "from version {upto}"
            );
            if upto >= 1 {
                st.with(|db| {
                    assert_eq!(list_apps(db)?.len(), 1);
                    assert_eq!(meta_get(db, "ca_cn")?.as_deref(), Some("waypost CA 0000"));
                    assert!(lookup_token(db, "aa11")?.is_some());
                    let rows = list_instances(db, Some("web"), true)?;
                    assert_eq!((rows.len(), rows[0].last_seen_at), (1, 2));
                    Ok(())
                })
                .unwrap();
            }
        }
        // A database from a newer build is refused, not touched.
        let newer = dir.path().join("newer.db");
        old_database(&newer, OLD_MIGRATIONS.len());
        Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", (MIGRATIONS.len() + 1) as i64)
            .unwrap();
        let err = Store::open(&Location::Sqlite(newer.clone()))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("newer waypost"), "{err}");
    }

    #[test]
    fn log_lines_of_the_previous_build_are_served_after_migration() {
        use crate::server::model::logs::LogFilter;
        // Line rows as the build before chunks stored them: two instances interleaved, a loss
        // marker, a truncated stderr line, non-UTF-8 data.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        // Schema 4: the last one with line rows only.
        old_database(&path, 4);
        type Row = (i64, i64, i64, i64, i64, bool, i64, Vec<u8>);
        let old: Vec<Row> = vec![
            (1, 1, 0, 0, 1_000, false, 0, b"a0".to_vec()),
            (2, 2, 0, 0, 1_100, false, 0, b"b0".to_vec()),
            (3, 1, 1, 1, 2_000, true, 0, vec![0xff, 0xfe]),
            (4, 1, 2, 0, 2_500, false, 0, b"a2".to_vec()),
            (5, 1, 3, 0, 3_000, false, 4, Vec::new()),
            (6, 1, 7, 0, 3_000, false, 0, b"a7".to_vec()),
            (9, 2, 1, 2, 4_000, false, 0, b"b1".to_vec()),
        ];
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "INSERT INTO apps VALUES ('web', 0);
                 INSERT INTO log_sources (id, instance, app, next_seq, lost) VALUES
                     (1, 'aaaa', 'web', 8, 4), (2, 'bbbb', 'web', 2, 0);
                 INSERT INTO log_usage VALUES ('web', 7, 12);",
            )
            .unwrap();
            for r in &old {
                c.execute(
                    "INSERT INTO log_lines (id, app, src, seq, stream, ts_us, truncated, dropped, data)
                     VALUES (?1, 'web', ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    rusqlite::params![r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7],
                )
                .unwrap();
            }
        }
        drop(Store::open(&Location::Sqlite(path.clone())).unwrap());
        let db = connect(&Location::Sqlite(path.clone())).unwrap();
        assert_eq!(logs::convert_line_rows(&db).unwrap(), 7);
        assert_eq!(logs::convert_line_rows(&db).unwrap(), 0, "once only");
        assert_eq!(
            logs::max_line_id(&db).unwrap(),
            9,
            "new ids continue after them"
        );
        let left: i64 = raw(&db, |c| {
            c.query_row("SELECT COUNT(*) FROM log_lines", [], |r| r.get(0))
        });
        assert_eq!(left, 0);
        let read = |src: Option<i64>, stream: Option<i64>, since_us: Option<i64>| {
            let f = LogFilter {
                app: "web".into(),
                src,
                stream,
                since_us,
            };
            let mut got: Vec<Row> = Vec::new();
            logs::lines(&db, &f, 0, i64::MAX, 1000, |l| {
                let src = if l.instance == "aaaa" { 1 } else { 2 };
                got.push((
                    l.id,
                    src,
                    l.seq,
                    l.stream,
                    l.ts_us,
                    l.truncated,
                    l.dropped,
                    l.data,
                ));
                Ok(())
            })
            .unwrap();
            (f, got)
        };
        // Every field of every line, in the same order with the same ids.
        assert_eq!(read(None, None, None).1, old);
        let (_, a) = read(Some(1), None, None);
        assert_eq!(a.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 3, 4, 5, 6]);
        // A stream filter keeps the marker.
        let (_, err) = read(None, Some(1), None);
        assert_eq!(err.iter().map(|r| r.0).collect::<Vec<_>>(), [3, 5]);
        let (f, late) = read(None, None, Some(2_500));
        assert_eq!(late.iter().map(|r| r.0).collect::<Vec<_>>(), [4, 5, 6, 9]);
        assert!(logs::start_id(&db, &f).unwrap() < 4);
        let (f, _) = read(None, None, None);
        assert_eq!(
            logs::tail_start(&db, &f, 0, 9, 2).unwrap(),
            5,
            "the last 2: ids 6 and 9"
        );
    }

    #[test]
    fn migrations_are_idempotent() {
        let c = mem();
        migrate(&c).unwrap();
        let v: i64 = raw(&c, |c| {
            c.pragma_query_value(None, "user_version", |r| r.get(0))
        });
        assert_eq!(v as usize, MIGRATIONS.len());
    }

    #[test]
    fn admin_tokens_from_before_names_are_named_initial() {
        // Migrations 1-11, the admin tokens a server of then minted (a second one after a lost
        // context), then migration 12.
        let db = Db::sqlite(Connection::open_in_memory().unwrap());
        for sql in &MIGRATIONS[..11] {
            db.batch(sql).unwrap();
        }
        db.batch(
            "INSERT INTO tokens (hash, kind, created_at) VALUES ('bb22', 'admin', 2);
             INSERT INTO tokens (hash, kind, created_at) VALUES ('aa11', 'admin', 1);",
        )
        .unwrap();
        db.batch(MIGRATIONS[11]).unwrap();
        let rows = list_tokens(&db, None).unwrap();
        let names: Vec<_> = rows.iter().map(|t| t.name.as_deref().unwrap()).collect();
        assert_eq!(names, ["initial", "initial-bb22"]);
        assert!(rows.iter().all(|t| t.expires_at.is_none()));
    }

    #[test]
    fn named_admin_tokens_expire_and_the_last_valid_one_stays() {
        let mut c = mem();
        // The first-start token is `initial`; one minted again later gets the next free name.
        insert_token(&c, "a0", &TokenScope::Admin, 1).unwrap();
        insert_token(&c, "a1", &TokenScope::Admin, 2).unwrap();
        let names: Vec<_> = list_tokens(&c, None)
            .unwrap()
            .into_iter()
            .map(|t| t.name.unwrap())
            .collect();
        assert_eq!(names, ["initial", "initial-2"]);
        // Names are unique among admin tokens.
        assert_eq!(
            insert_admin_token(&mut c, "b0", "alice", Some(1_000), 3).unwrap(),
            NewAdmin::Created
        );
        assert!(matches!(
            insert_admin_token(&mut c, "b1", "alice", None, 4).unwrap(),
            NewAdmin::NameTaken(r) if r.hash == "b0"
        ));
        // Before its expiry alice's token is valid, at and after it expired (and None for the
        // control handshake's lookup, whose clock is now: long after 1000 ms).
        assert_eq!(
            lookup_token_at(&c, "b0", 999).unwrap(),
            Lookup::Valid(TokenScope::Admin)
        );
        assert_eq!(
            lookup_token_at(&c, "b0", 1_000).unwrap(),
            Lookup::Expired { expires_at: 1_000 }
        );
        assert_eq!(lookup_token(&c, "b0").unwrap(), None);
        assert_eq!(lookup_token_at(&c, "zz", 1).unwrap(), Lookup::Unknown);
        // Revoking: fine while another valid admin token remains; the last valid one stays,
        // whether or not expired ones are left.
        assert!(matches!(
            revoke_token(&mut c, "a0", 5).unwrap(),
            Revoke::Done(_)
        ));
        assert!(matches!(
            revoke_token(&mut c, "a1", 5_000).unwrap(),
            Revoke::LastAdmin(r) if r.hash == "a1"
        ));
        // An expired token can always go.
        assert!(matches!(
            revoke_token(&mut c, "b0", 5_000).unwrap(),
            Revoke::Done(_)
        ));
        // At a time alice's token was valid, a1 was not the last.
        insert_admin_token(&mut c, "b0", "alice", Some(1_000), 3).unwrap();
        assert!(matches!(
            revoke_token(&mut c, "a1", 500).unwrap(),
            Revoke::Done(_)
        ));
    }

    #[test]
    fn apps_and_tokens() {
        let mut c = mem();
        assert!(create_app(&c, "web", 1).unwrap());
        assert!(!create_app(&c, "web", 2).unwrap());
        assert_eq!(list_apps(&c).unwrap().len(), 1);
        let scope = TokenScope::Entrypoint {
            app: "web".into(),
            deployment: Some("d1".into()),
        };
        insert_token(&c, "aa11", &scope, 1).unwrap();
        insert_token(&c, "aa22", &TokenScope::Admin, 1).unwrap();
        assert_eq!(lookup_token(&c, "aa11").unwrap(), Some(scope.clone()));
        assert_eq!(lookup_token(&c, "aa22").unwrap(), Some(TokenScope::Admin));
        assert_eq!(lookup_token(&c, "nope").unwrap(), None);
        // Listing never needs the token text; revoking takes a hash prefix.
        let all = list_tokens(&c, None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(list_tokens(&c, Some("web")).unwrap().len(), 1);
        assert_eq!(revoke_token(&mut c, "aa", 1).unwrap(), Revoke::Ambiguous);
        assert!(matches!(
            revoke_token(&mut c, "aa22", 1).unwrap(),
            Revoke::LastAdmin(r) if r.name.as_deref() == Some("initial")
        ));
        assert_eq!(revoke_token(&mut c, "ff", 1).unwrap(), Revoke::NotFound);
        assert_eq!(revoke_token(&mut c, "a%", 1).unwrap(), Revoke::NotFound);
        assert!(
            matches!(revoke_token(&mut c, "AA11", 1).unwrap(), Revoke::Done(r) if r.hash == "aa11")
        );
        assert_eq!(lookup_token(&c, "aa11").unwrap(), None);
        assert_eq!(lookup_token(&c, "aa22").unwrap(), Some(TokenScope::Admin));
        insert_token(&c, "aa11", &scope, 1).unwrap();
        // Foreign key: tokens for unknown apps are refused.
        let bad = TokenScope::Entrypoint {
            app: "nope".into(),
            deployment: None,
        };
        assert!(insert_token(&c, "h3", &bad, 1).is_err());
    }

    fn labels_of(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn tokens_keep_their_labels() {
        let c = mem();
        create_app(&c, "web", 1).unwrap();
        let scope = TokenScope::Entrypoint {
            app: "web".into(),
            deployment: None,
        };
        let l = labels_of(&[("tier", "api"), ("env", "prod")]);
        insert_token_with_labels(&c, "bb11", &scope, &l, 1).unwrap();
        insert_token(&c, "bb22", &scope, 2).unwrap();
        assert_eq!(
            lookup_token_with_labels(&c, "bb11").unwrap(),
            Some((scope.clone(), l.clone()))
        );
        assert_eq!(
            lookup_token_with_labels(&c, "bb22").unwrap(),
            Some((scope.clone(), Labels::new()))
        );
        assert_eq!(lookup_token_with_labels(&c, "nope").unwrap(), None);
        // Stored in the canonical text form.
        let text: String = raw(&c, |c| {
            c.query_row("SELECT labels FROM tokens WHERE hash = 'bb11'", [], |r| {
                r.get(0)
            })
        });
        assert_eq!(text, "env=prod,tier=api");
        let listed: Vec<(String, Labels)> = list_tokens(&c, Some("web"))
            .unwrap()
            .into_iter()
            .map(|t| (t.hash, t.labels))
            .collect();
        assert_eq!(
            listed,
            [("bb11".to_string(), l), ("bb22".to_string(), Labels::new())]
        );
    }

    #[test]
    fn an_instance_has_the_labels_of_its_latest_hello() {
        let mut c = mem();
        create_app(&c, "web", 1).unwrap();
        let l = labels_of(&[("env", "prod"), ("tier", "api")]);
        upsert_connected_with_labels(&mut c, &connected("aa", "web"), &l, None, None, 10)
            .unwrap()
            .unwrap();
        let rows = list_instances(&c, Some("web"), false).unwrap();
        assert_eq!(rows[0].labels, l);
        mark_disconnected(&c, "aa", 1, 20, &ChildStatus::default(), 20).unwrap();
        assert_eq!(
            list_instances(&c, Some("web"), true).unwrap()[0].labels,
            l,
            "a gone instance keeps its labels"
        );
        // A reconnect with other labels replaces them; one without any (an older entrypoint)
        // clears them.
        let l2 = labels_of(&[("env", "staging")]);
        upsert_connected_with_labels(&mut c, &connected("aa", "web"), &l2, None, None, 30)
            .unwrap()
            .unwrap();
        assert_eq!(list_instances(&c, None, false).unwrap()[0].labels, l2);
        upsert_connected(&mut c, &connected("aa", "web"), None, 40)
            .unwrap()
            .unwrap();
        assert!(
            list_instances(&c, None, false).unwrap()[0]
                .labels
                .is_empty()
        );
    }

    #[test]
    fn instance_lifecycle() {
        let mut c = mem();
        create_app(&c, "web", 1).unwrap();
        upsert_connected(&mut c, &connected("aa", "web"), None, 10)
            .unwrap()
            .unwrap();
        let mut st = ChildStatus::default();
        st.apply(&waypost_proto::Status {
            state: 2,
            child_pid: 42,
            child_rss_bytes: 1000,
            ..Default::default()
        });
        flush_live(&mut c, &[("aa".into(), 1, 20, st.clone())]).unwrap();
        let rows = list_instances(&c, Some("web"), false).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status.child_pid, Some(42));
        assert_eq!(rows[0].last_seen_at, 20);

        st.apply(&waypost_proto::Status {
            state: 4,
            child_pid: 42,
            exit_code: 3,
            ..Default::default()
        });
        mark_disconnected(&c, "aa", 1, 30, &st, 31).unwrap();
        assert!(list_instances(&c, Some("web"), false).unwrap().is_empty());
        let rows = list_instances(&c, Some("web"), true).unwrap();
        assert_eq!(rows[0].ended.as_deref(), Some("exited"));
        assert_eq!(rows[0].status.exit_code, Some(3));
        assert_eq!(rows[0].disconnected_at, Some(31));

        // Reconnect revives the row; the last exit is kept.
        let st = upsert_connected(&mut c, &connected("aa", "web"), None, 40)
            .unwrap()
            .unwrap();
        assert_eq!(
            st.exit_code,
            Some(3),
            "the in-memory status starts from the row"
        );
        let rows = list_instances(&c, None, false).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].ended, None);
        assert_eq!(rows[0].status.exit_code, Some(3));

        assert_eq!(mark_all_lost(&c, 50).unwrap(), 1);
        let rows = list_instances(&c, None, true).unwrap();
        assert_eq!(rows[0].ended.as_deref(), Some("lost"));
    }

    #[test]
    fn gone_instances_are_bounded_per_app() {
        let mut c = mem();
        create_app(&c, "a", 1).unwrap();
        for i in 0..(GONE_PER_APP + 5) {
            let id = format!("{i:04}");
            upsert_connected(&mut c, &connected(&id, "a"), None, i)
                .unwrap()
                .unwrap();
            mark_disconnected(&c, &id, 1, i, &ChildStatus::default(), 1000 + i).unwrap();
        }
        upsert_connected(&mut c, &connected("live", "a"), None, 5)
            .unwrap()
            .unwrap();
        let rows = list_instances(&c, Some("a"), true).unwrap();
        assert_eq!(rows.len() as i64, GONE_PER_APP + 1);
        assert_eq!(rows[0].id, "live");
        assert_eq!(
            rows[1].id,
            format!("{:04}", GONE_PER_APP + 4),
            "newest gone first"
        );
    }
}
