//! Application configuration (issue #4): variables per app and per deployment, files, and the
//! on-change policy, stored in SQLite and pushed to every connected instance as a full,
//! versioned snapshot (`Config` frame) the moment they change.
//!
//! - Snapshot of an instance = the app's variables overridden by its deployment's, the app's
//!   files, the policy. One version counter per app, bumped by every change that changes
//!   something (a no-op change keeps the version and pushes nothing).
//! - Welcome carries the snapshot when the app's version is newer than the one in the Hello.
//! - Ordering: the Welcome of a connection and every push go through one async lock, and pushes
//!   only reach connections whose Welcome is already queued, so an instance never receives a
//!   Config before its Welcome (the entrypoint would ignore it) nor misses a change made while it
//!   was connecting.
//! - Every input is checked before anything is written; a change that would make any
//!   deployment's snapshot too big for one frame is refused as a whole.

use super::Shared;
use super::live::InstanceId;
use super::store;
use crate::util;
use anyhow::Result;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use waypost_proto::{self as proto, Frame, Kind, on_change::Action};

/// Schema of this feature (appended to `store::MIGRATIONS`).
pub const MIGRATION: &str = "
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
    );";

/// Restart splay when the app's policy does not set one: a config change never restarts a whole
/// fleet at the same instant (the predecessor did), at the price of a delay of up to this for a
/// single instance. `config policy --splay 0` opts out.
pub const DEFAULT_SPLAY: Duration = Duration::from_secs(5);
/// Largest splay or stop grace accepted (the wire carries u32 milliseconds; a day is plenty).
const MAX_DURATION_MS: u64 = 86_400_000;
/// Room kept in a frame for what a Welcome adds around the snapshot (app, deployment, version
/// strings, numbers): a snapshot that fits a Config frame must also fit a Welcome.
const WELCOME_RESERVE: usize = 1024;
/// Longest variable name and file path accepted.
const MAX_KEY: usize = 256;
const MAX_PATH: usize = 4096;
/// How long a push may wait for a full outgoing queue before giving up on that connection (the
/// instance gets the newest snapshot at its next Welcome anyway).
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// A push yields to the runtime after queueing the snapshot for this many connections.
const PUSH_BATCH: usize = 64;

// ---- validation (shared with the CLI, which checks before calling the API) -----------------

/// Variable names: `[A-Za-z_][A-Za-z0-9_]*` (what a POSIX shell can export).
pub fn check_key(k: &str) -> Result<(), String> {
    let b = k.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_KEY
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid variable name {k:?}: use letters, digits and '_', not starting with a digit \
             ([A-Za-z_][A-Za-z0-9_]*, at most {MAX_KEY} characters)"
        ))
    }
}

/// Values go into the child's environment: no NUL bytes.
pub fn check_value(k: &str, v: &str) -> Result<(), String> {
    if v.contains('\0') {
        return Err(format!(
            "the value of {k} contains a NUL byte, which an environment variable cannot hold"
        ));
    }
    Ok(())
}

/// File paths: absolute, normalised (no `.`/`..`/empty components), not a directory.
pub fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!(
            "config file path {p:?} is relative; it must be absolute (e.g. /etc/app/config.toml)"
        ));
    }
    if p.len() > MAX_PATH || p.contains('\0') {
        return Err(format!(
            "invalid config file path {p:?} (NUL byte or over {MAX_PATH} bytes)"
        ));
    }
    let comps: Vec<&str> = p[1..].split('/').collect();
    if p == "/"
        || p.ends_with('/')
        || comps
            .iter()
            .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(format!(
            "invalid config file path {p:?}: it must name a file, without '.', '..' or '//' in it"
        ));
    }
    Ok(())
}

/// Permission bits 0..=0o7777.
pub fn check_mode(mode: u32) -> Result<(), String> {
    if mode > 0o7777 {
        return Err(format!(
            "invalid file mode {mode:o}: use permission bits like 0644 (at most 07777)"
        ));
    }
    Ok(())
}

/// Linux signal names, by number (1..=31), as the entrypoint knows them.
const SIGNALS: [&str; 31] = [
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

/// `HUP`, `SIGHUP`, `sighup` or a number 1..=64 → the canonical name (`SIGHUP`, or the number).
pub fn normalize_signal(s: &str) -> Result<String, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(SIGNALS
                .get(n as usize - 1)
                .map(|name| format!("SIG{name}"))
                .unwrap_or_else(|| n.to_string()))
        } else {
            Err(format!("unknown signal {s:?}: numbers go from 1 to 64"))
        };
    }
    let up = t.to_ascii_uppercase();
    let bare = up.strip_prefix("SIG").unwrap_or(&up);
    if SIGNALS.contains(&bare) {
        Ok(format!("SIG{bare}"))
    } else {
        Err(format!(
            "unknown signal name {s:?} (use e.g. SIGHUP, SIGUSR1, SIGUSR2 or a number)"
        ))
    }
}

/// `restart` | `none` | `signal:NAME` → (action, canonical signal name).
pub fn parse_on_change(s: &str) -> Result<(Action, String), String> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "restart" => return Ok((Action::Restart, String::new())),
        "none" => return Ok((Action::None, String::new())),
        _ => {}
    }
    match t.split_once(':') {
        Some((kind, sig)) if kind.eq_ignore_ascii_case("signal") => {
            Ok((Action::Signal, normalize_signal(sig)?))
        }
        _ => Err(format!(
            "invalid --on-change {s:?}: use restart, none, or signal:NAME (e.g. signal:SIGHUP)"
        )),
    }
}

/// The text form of a policy action, as `parse_on_change` reads it back.
pub fn on_change_text(action: Action, signal: &str) -> String {
    match action {
        Action::Restart => "restart".into(),
        Action::None => "none".into(),
        Action::Signal => format!("signal:{signal}"),
    }
}

/// Deployment ids (as accepted for tokens).
pub fn check_deployment(d: &str) -> Result<(), String> {
    if d.is_empty() || d.len() > 128 || d.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid deployment id {d:?}: 1-128 characters, no whitespace"
        ));
    }
    Ok(())
}

// ---- the model -------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub mode: u32,
    pub contents: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub action: Action,
    /// Canonical name (`SIGHUP`) when action is Signal, else empty.
    pub signal: String,
    /// None: [`DEFAULT_SPLAY`].
    pub splay_ms: Option<u32>,
    /// 0: the entrypoint's WAYPOST_STOP_TIMEOUT.
    pub stop_grace_ms: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            action: Action::Restart,
            signal: String::new(),
            splay_ms: None,
            stop_grace_ms: 0,
        }
    }
}

impl Policy {
    pub fn splay_ms(&self) -> u32 {
        self.splay_ms.unwrap_or(DEFAULT_SPLAY.as_millis() as u32)
    }
}

/// Everything configured for one app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppConfig {
    pub version: u64,
    /// deployment ('' = app-wide) → variables.
    pub vars: BTreeMap<String, BTreeMap<String, String>>,
    /// By path.
    pub files: BTreeMap<String, FileEntry>,
    pub policy: Policy,
}

impl AppConfig {
    /// The snapshot an instance of `deployment` gets.
    pub fn snapshot(&self, deployment: &str) -> proto::Config {
        let mut env = self.vars.get("").cloned().unwrap_or_default();
        if !deployment.is_empty() {
            if let Some(over) = self.vars.get(deployment) {
                env.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        proto::Config {
            version: self.version,
            env,
            files: self
                .files
                .values()
                .map(|f| proto::ConfigFile {
                    path: f.path.clone(),
                    mode: f.mode,
                    contents: f.contents.clone(),
                })
                .collect(),
            on_change: Some(proto::OnChange {
                action: self.policy.action as i32,
                signal: self.policy.signal.clone(),
            }),
            stop_grace_ms: self.policy.stop_grace_ms,
            restart_splay_ms: self.policy.splay_ms(),
        }
    }

    /// Largest encoded Config frame over every deployment with overrides (and none), with its
    /// deployment.
    fn largest_frame(&self) -> (usize, String) {
        self.vars
            .keys()
            .chain(std::iter::once(&String::new()))
            .map(|d| {
                let frame: Frame = Kind::Config(self.snapshot(d)).into();
                (proto::encoded_len(&frame), d.clone())
            })
            .max()
            .unwrap_or_default()
    }
}

pub fn load(conn: &Connection, app: &str) -> Result<AppConfig> {
    let mut cfg = AppConfig::default();
    let row: Option<(i64, String, String, Option<i64>, i64)> = conn
        .query_row(
            "SELECT version, on_change, signal, splay_ms, stop_grace_ms FROM config_apps WHERE app = ?1",
            [app],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    if let Some((version, on_change, signal, splay, grace)) = row {
        cfg.version = version as u64;
        cfg.policy = Policy {
            action: match on_change.as_str() {
                "signal" => Action::Signal,
                "none" => Action::None,
                _ => Action::Restart,
            },
            signal,
            splay_ms: splay.map(|s| s as u32),
            stop_grace_ms: grace as u32,
        };
    }
    let mut stmt = conn.prepare("SELECT deployment, key, value FROM config_vars WHERE app = ?1")?;
    let rows = stmt.query_map([app], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (d, k, v) = row?;
        cfg.vars.entry(d).or_default().insert(k, v);
    }
    let mut stmt = conn.prepare("SELECT path, mode, contents FROM config_files WHERE app = ?1")?;
    let rows = stmt.query_map([app], |r| {
        Ok(FileEntry {
            path: r.get(0)?,
            mode: r.get(1)?,
            contents: r.get(2)?,
        })
    })?;
    for f in rows {
        let f = f?;
        cfg.files.insert(f.path.clone(), f);
    }
    Ok(cfg)
}

/// Writes `new` over `old` (only the rows that differ) with its version.
fn save(conn: &Connection, app: &str, old: &AppConfig, new: &AppConfig) -> Result<()> {
    let p = &new.policy;
    conn.execute(
        "INSERT INTO config_apps (app, version, on_change, signal, splay_ms, stop_grace_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (app) DO UPDATE SET version = excluded.version,
             on_change = excluded.on_change, signal = excluded.signal,
             splay_ms = excluded.splay_ms, stop_grace_ms = excluded.stop_grace_ms",
        params![
            app,
            new.version as i64,
            match p.action {
                Action::Restart => "restart",
                Action::Signal => "signal",
                Action::None => "none",
            },
            p.signal,
            p.splay_ms,
            p.stop_grace_ms
        ],
    )?;
    let empty = BTreeMap::new();
    for (d, vars) in &old.vars {
        let now = new.vars.get(d).unwrap_or(&empty);
        for k in vars.keys().filter(|k| !now.contains_key(*k)) {
            conn.execute(
                "DELETE FROM config_vars WHERE app = ?1 AND deployment = ?2 AND key = ?3",
                params![app, d, k],
            )?;
        }
    }
    for (d, vars) in &new.vars {
        let before = old.vars.get(d).unwrap_or(&empty);
        for (k, v) in vars.iter().filter(|(k, v)| before.get(*k) != Some(*v)) {
            conn.execute(
                "INSERT INTO config_vars (app, deployment, key, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (app, deployment, key) DO UPDATE SET value = excluded.value",
                params![app, d, k, v],
            )?;
        }
    }
    for path in old.files.keys().filter(|p| !new.files.contains_key(*p)) {
        conn.execute(
            "DELETE FROM config_files WHERE app = ?1 AND path = ?2",
            params![app, path],
        )?;
    }
    for f in new
        .files
        .values()
        .filter(|f| old.files.get(&f.path) != Some(*f))
    {
        conn.execute(
            "INSERT INTO config_files (app, path, mode, contents) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (app, path) DO UPDATE SET mode = excluded.mode, contents = excluded.contents",
            params![app, f.path, f.mode, f.contents],
        )?;
    }
    Ok(())
}

/// A requested change, checked by [`Change::apply_to`].
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Scope of `set`/`unset`: None = app-wide.
    #[serde(default)]
    pub deployment: Option<String>,
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
    #[serde(default)]
    pub files: Vec<FileSet>,
    #[serde(default)]
    pub unset_files: Vec<String>,
    #[serde(default)]
    pub policy: Option<PolicyChange>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSet {
    pub path: String,
    /// Permission bits: a number (420) or an octal string ("0644"). Default 0644.
    #[serde(default)]
    pub mode: Option<ModeJson>,
    /// The contents, base64.
    pub contents_b64: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ModeJson {
    Number(u32),
    Octal(String),
}

impl ModeJson {
    fn bits(&self) -> Result<u32, String> {
        let m = match self {
            ModeJson::Number(n) => *n,
            ModeJson::Octal(s) => u32::from_str_radix(s.trim(), 8)
                .map_err(|_| format!("invalid file mode {s:?}: use octal like 0644"))?,
        };
        check_mode(m)?;
        Ok(m)
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    /// restart | none | signal:NAME
    #[serde(default)]
    pub on_change: Option<String>,
    #[serde(default)]
    pub splay_ms: Option<u64>,
    #[serde(default)]
    pub stop_grace_ms: Option<u64>,
}

impl Change {
    /// The config after this change, or why it is refused (nothing is changed then).
    pub fn apply_to(&self, cur: &AppConfig, app: &str) -> Result<AppConfig, String> {
        let mut new = cur.clone();
        let scope = match self.deployment.as_deref().filter(|d| !d.is_empty()) {
            Some(d) => {
                check_deployment(d)?;
                d.to_string()
            }
            None => String::new(),
        };
        if !scope.is_empty() && (!self.files.is_empty() || !self.unset_files.is_empty()) {
            return Err(
                "config files belong to the whole app; set them without --deployment".into(),
            );
        }
        for (k, v) in &self.set {
            check_key(k)?;
            check_value(k, v)?;
        }
        for k in &self.unset {
            check_key(k)?;
            if self.set.contains_key(k) {
                return Err(format!("{k} is both set and unset in one change"));
            }
        }
        let vars = new.vars.entry(scope.clone()).or_default();
        for k in &self.unset {
            vars.remove(k);
        }
        vars.extend(self.set.iter().map(|(k, v)| (k.clone(), v.clone())));
        if vars.is_empty() {
            new.vars.remove(&scope);
        }
        for path in &self.unset_files {
            check_path(path)?;
            new.files.remove(path);
        }
        for f in &self.files {
            check_path(&f.path)?;
            if self.unset_files.contains(&f.path) {
                return Err(format!("{} is both set and unset in one change", f.path));
            }
            let mode = match &f.mode {
                Some(m) => m.bits()?,
                None => 0o644,
            };
            let contents = util::base64_decode(&f.contents_b64)
                .ok_or_else(|| format!("the contents of {} are not valid base64", f.path))?;
            new.files.insert(
                f.path.clone(),
                FileEntry {
                    path: f.path.clone(),
                    mode,
                    contents,
                },
            );
        }
        if let Some(p) = &self.policy {
            if let Some(oc) = &p.on_change {
                let (action, signal) = parse_on_change(oc)?;
                new.policy.action = action;
                new.policy.signal = signal;
            }
            let ms = |what: &str, v: u64| -> Result<u32, String> {
                if v > MAX_DURATION_MS {
                    Err(format!("{what} is too long (at most 24h)"))
                } else {
                    Ok(v as u32)
                }
            };
            if let Some(s) = p.splay_ms {
                new.policy.splay_ms = Some(ms("the splay", s)?);
            }
            if let Some(g) = p.stop_grace_ms {
                new.policy.stop_grace_ms = ms("the stop grace", g)?;
            }
        }
        if new == *cur {
            return Ok(new);
        }
        let (size, dep) = new.largest_frame();
        let limit = proto::MAX_FRAME + proto::HEADER_LEN - WELCOME_RESERVE;
        if size > limit {
            let whose = if dep.is_empty() {
                format!("app {app}")
            } else {
                format!("app {app}, deployment {dep}")
            };
            return Err(format!(
                "refused: the config of {whose} would take {size} bytes on the wire, over the \
                 limit of {limit} bytes (one 1 MiB frame); nothing was changed"
            ));
        }
        new.version = cur.version + 1;
        Ok(new)
    }
}

// ---- the service: cache, welcome, push -------------------------------------------------------

/// A connection that has been welcomed with config enabled.
struct Member {
    session: i64,
    app: String,
    deployment: String,
    /// Weak: a connection's writer ends when its last strong sender is dropped; this map must not
    /// keep it open.
    tx: mpsc::WeakSender<Frame>,
    /// What its ConfigApplied said last: (version, error).
    applied: u64,
    error: String,
}

#[derive(Default)]
pub struct ConfigService {
    /// Serialises changes, pushes and Welcomes (see the module comment).
    order: tokio::sync::Mutex<()>,
    /// Every app's config as last loaded or written (only this module writes the tables).
    cache: Mutex<HashMap<String, Arc<AppConfig>>>,
    members: Mutex<HashMap<InstanceId, Member>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConfigService {
    async fn app_config(&self, shared: &Shared, app: &str) -> Result<Arc<AppConfig>> {
        if let Some(c) = lock(&self.cache).get(app) {
            return Ok(c.clone());
        }
        let name = app.to_string();
        let cfg = Arc::new(shared.store.call(move |c| load(c, &name)).await?);
        lock(&self.cache).insert(app.to_string(), cfg.clone());
        Ok(cfg)
    }

    /// Queues `frame` for a connection without ever waiting with the lock held: when its queue
    /// is full, a task delivers it (a later snapshot overtaking it is harmless: versions only
    /// grow and the entrypoint ignores older ones).
    fn deliver(tx: &mpsc::Sender<Frame>, frame: Frame) {
        if let Err(mpsc::error::TrySendError::Full(frame)) = tx.try_send(frame) {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(PUSH_TIMEOUT, tx.send(frame)).await;
            });
        }
    }

    /// Pushes the app's new snapshot to each of its welcomed live connections. They are picked
    /// here, under the ordering lock (so each gets every change made after its Welcome); the
    /// frames are queued by a task that yields every [`PUSH_BATCH`] connections, so a push to
    /// 10,000 instances neither holds a lock meanwhile nor builds every copy of the frame before
    /// the connections' writers start sending them.
    fn push(&self, app: &str, cfg: Arc<AppConfig>) -> usize {
        let targets: Vec<(mpsc::Sender<Frame>, String)> = {
            let mut members = lock(&self.members);
            let mut targets = Vec::new();
            members.retain(|_, m| {
                let Some(tx) = m.tx.upgrade() else {
                    return false; // the connection is gone
                };
                if m.app == app {
                    targets.push((tx, m.deployment.clone()));
                }
                true
            });
            targets
        };
        let n = targets.len();
        tokio::spawn(async move {
            let mut per_dep: HashMap<String, Frame> = HashMap::new();
            for (i, (tx, dep)) in targets.into_iter().enumerate() {
                let frame = per_dep
                    .entry(dep)
                    .or_insert_with_key(|d| Kind::Config(cfg.snapshot(d)).into())
                    .clone();
                Self::deliver(&tx, frame);
                if i % PUSH_BATCH == PUSH_BATCH - 1 {
                    tokio::task::yield_now().await;
                }
            }
        });
        n
    }

    /// Applies a change: checks it, writes it, and pushes the new snapshot. Returns the new
    /// config and whether anything changed.
    pub async fn change(
        &self,
        shared: &Shared,
        app: &str,
        change: Change,
    ) -> Result<(Arc<AppConfig>, bool), Fail> {
        let _order = self.order.lock().await;
        let name = app.to_string();
        let outcome = shared
            .store
            .call(move |c| -> Result<Result<(AppConfig, bool), Fail>> {
                if !store::app_exists(c, &name)? {
                    return Ok(Err(Fail::not_found(format!("no app named {name}"))));
                }
                // IMMEDIATE: read then write; deferred, a commit by another connection (the log
                // writer) in between fails the write at once ("database is locked").
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let cur = load(&tx, &name)?;
                let new = match change.apply_to(&cur, &name) {
                    Ok(new) => new,
                    Err(msg) => return Ok(Err(Fail::bad(msg))),
                };
                if new == cur {
                    return Ok(Ok((cur, false)));
                }
                save(&tx, &name, &cur, &new)?;
                tx.commit()?;
                Ok(Ok((new, true)))
            })
            .await??;
        let (cfg, changed) = outcome;
        let cfg = Arc::new(cfg);
        lock(&self.cache).insert(app.to_string(), cfg.clone());
        if changed {
            let n = self.push(app, cfg.clone());
            tracing::info!(
                app,
                version = cfg.version,
                instances = n,
                "config changed; pushed"
            );
        }
        Ok((cfg, changed))
    }

    /// Sends the Welcome of a new connection (filling in the snapshot if the app has a newer
    /// one than the entrypoint's) and, unless the entrypoint disabled config, subscribes the
    /// connection to pushes — in one step under the ordering lock.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_welcome(
        &self,
        shared: &Shared,
        tx: &mpsc::Sender<Frame>,
        id: InstanceId,
        session: i64,
        app: &str,
        deployment: &str,
        hello: &proto::Hello,
        welcome: Kind,
    ) {
        let Kind::Welcome(mut welcome) = welcome else {
            Self::deliver(tx, welcome.into());
            return;
        };
        let disabled = hello.disabled.as_ref().is_some_and(|f| f.config);
        let _order = self.order.lock().await;
        if !disabled {
            match self.app_config(shared, app).await {
                Ok(cfg) if cfg.version > hello.config_version => {
                    welcome.config = Some(cfg.snapshot(deployment));
                }
                Ok(_) => {}
                Err(e) => tracing::error!(
                    app,
                    error = format!("{e:#}"),
                    "loading the app's config failed; welcoming without it"
                ),
            }
            let mut members = lock(&self.members);
            members.insert(
                id,
                Member {
                    session,
                    app: app.to_string(),
                    deployment: deployment.to_string(),
                    tx: tx.downgrade(),
                    applied: hello.config_version,
                    error: String::new(),
                },
            );
            // Forget connections that are gone (amortised: only when the map has grown).
            if members.len() > 2 * shared.live.len() + 64 {
                members.retain(|_, m| m.tx.strong_count() > 0);
            }
        }
        Self::deliver(tx, Kind::Welcome(welcome).into());
    }

    /// The entrypoint reports a snapshot applied (or failed).
    pub fn on_applied(
        &self,
        shared: &Shared,
        id: &InstanceId,
        session: i64,
        a: proto::ConfigApplied,
    ) {
        {
            let mut members = lock(&self.members);
            let Some(m) = members.get_mut(id).filter(|m| m.session == session) else {
                return;
            };
            if a.error.is_empty() {
                m.applied = m.applied.max(a.version);
                m.error.clear();
            } else {
                m.error = format!("version {}: {}", a.version, a.error);
            }
        }
        if !a.error.is_empty() {
            tracing::warn!(
                instance = util::hex(id),
                version = a.version,
                error = a.error,
                "an instance could not apply its config"
            );
            return;
        }
        tracing::debug!(
            instance = util::hex(id),
            version = a.version,
            "config applied"
        );
        // Shown by `instances` right away (Status frames confirm it at the next heartbeat).
        if let Some((_, mut status)) = shared.live.snapshot_own(id, session) {
            if a.version > status.config_version {
                status.config_version = a.version;
                shared.live.set_status(id, session, status);
            }
        }
    }

    /// Live welcomed connections of an app: (id hex, deployment, applied version, error).
    fn instances_of(&self, app: &str) -> Vec<(String, String, u64, String)> {
        let mut v: Vec<_> = lock(&self.members)
            .iter()
            .filter(|(_, m)| m.app == app && m.tx.strong_count() > 0)
            .map(|(id, m)| {
                (
                    util::hex(id),
                    m.deployment.clone(),
                    m.applied,
                    m.error.clone(),
                )
            })
            .collect();
        v.sort();
        v
    }
}

// ---- the API ---------------------------------------------------------------------------------

/// An API error of this module: rendered like `api::ApiError`, `{"error": "..."}`.
#[derive(Debug)]
pub struct Fail(pub StatusCode, pub String);

impl Fail {
    pub fn bad(msg: impl Into<String>) -> Fail {
        Fail(StatusCode::BAD_REQUEST, msg.into())
    }
    pub fn not_found(msg: impl Into<String>) -> Fail {
        Fail(StatusCode::NOT_FOUND, msg.into())
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = format!("{e:#}"), "API request failed");
        Fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal server error".into(),
        )
    }
}

impl From<JsonRejection> for Fail {
    fn from(e: JsonRejection) -> Self {
        // A body that parses but does not fit the schema is a bad request like any other.
        let status = match e.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        Fail(status, e.body_text())
    }
}

impl From<QueryRejection> for Fail {
    fn from(e: QueryRejection) -> Self {
        Fail(e.status(), e.body_text())
    }
}

/// 404 unless the app exists.
pub async fn require_app(s: &Shared, app: &str) -> Result<(), Fail> {
    let name = app.to_string();
    if s.store.call(move |c| store::app_exists(c, &name)).await? {
        Ok(())
    } else {
        Err(Fail::not_found(format!("no app named {app}")))
    }
}

pub fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/apps/{app}/config", get(get_config).patch(patch_config))
}

#[derive(Deserialize)]
struct GetQuery {
    /// Include each file's contents (base64).
    #[serde(default)]
    contents: bool,
}

#[derive(Serialize)]
struct FileJson {
    path: String,
    /// Octal, e.g. "0644".
    mode: String,
    size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    contents_b64: Option<String>,
}

fn view(
    s: &Shared,
    app: &str,
    cfg: &AppConfig,
    contents: bool,
    changed: Option<bool>,
) -> serde_json::Value {
    let p = &cfg.policy;
    let mut deployments = cfg.vars.clone();
    let vars = deployments.remove("").unwrap_or_default();
    let files: Vec<FileJson> = cfg
        .files
        .values()
        .map(|f| FileJson {
            path: f.path.clone(),
            mode: format!("{:04o}", f.mode),
            size: f.contents.len(),
            contents_b64: contents.then(|| util::base64_encode(&f.contents)),
        })
        .collect();
    let instances: Vec<serde_json::Value> = s
        .config
        .instances_of(app)
        .into_iter()
        .map(|(id, deployment, applied, error)| {
            json!({
                "id": id,
                "deployment": deployment,
                "applied_version": applied,
                "error": (!error.is_empty()).then_some(error),
            })
        })
        .collect();
    let mut v = json!({
        "app": app,
        "version": cfg.version,
        "vars": vars,
        "deployments": deployments,
        "files": files,
        "policy": {
            "on_change": on_change_text(p.action, &p.signal),
            "splay_ms": p.splay_ms(),
            "splay_default": p.splay_ms.is_none(),
            "stop_grace_ms": p.stop_grace_ms,
        },
        "instances": instances,
    });
    if let Some(changed) = changed {
        v["changed"] = json!(changed);
    }
    v
}

async fn get_config(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    q: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, Fail> {
    let Query(q) = q?;
    require_app(&s, &app).await?;
    let cfg = s.config.app_config(&s, &app).await?;
    Ok(Json(view(&s, &app, &cfg, q.contents, None)))
}

async fn patch_config(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<Change>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Fail> {
    let Json(change) = body?;
    let (cfg, changed) = s.config.change(&s, &app, change).await?;
    Ok(Json(view(&s, &app, &cfg, false, Some(changed))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE apps (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL);
             INSERT INTO apps VALUES ('web', 0);",
        )
        .unwrap();
        c.execute_batch(MIGRATION).unwrap();
        c
    }

    fn set(kv: &[(&str, &str)]) -> Change {
        Change {
            set: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn names_paths_signals() {
        for ok in ["A", "_x", "FOO_BAR1", "a"] {
            assert!(check_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A B", "É", "A=B"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        assert!(check_path("/etc/app.conf").is_ok());
        for bad in ["etc/x", "./x", "/", "/a/../b", "/a//b", "/a/", "/a/./b", ""] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        assert!(check_path("etc/x").unwrap_err().contains("relative"));
        assert_eq!(normalize_signal("hup").unwrap(), "SIGHUP");
        assert_eq!(normalize_signal("SIGUSR2").unwrap(), "SIGUSR2");
        assert_eq!(normalize_signal("10").unwrap(), "SIGUSR1");
        assert_eq!(normalize_signal("40").unwrap(), "40");
        assert!(normalize_signal("SIGNOPE").is_err());
        assert!(normalize_signal("0").is_err());
        assert_eq!(
            parse_on_change("signal:SIGHUP").unwrap(),
            (Action::Signal, "SIGHUP".to_string())
        );
        assert_eq!(parse_on_change("restart").unwrap().0, Action::Restart);
        assert_eq!(parse_on_change("NONE").unwrap().0, Action::None);
        assert!(parse_on_change("signal:").is_err());
        assert!(parse_on_change("reload").is_err());
        assert_eq!(on_change_text(Action::Signal, "SIGHUP"), "signal:SIGHUP");
    }

    #[test]
    fn changes_version_and_persist() {
        let c = mem();
        let cur = load(&c, "web").unwrap();
        assert_eq!(cur.version, 0);
        let new = set(&[("A", "1"), ("B", "2")])
            .apply_to(&cur, "web")
            .unwrap();
        assert_eq!(new.version, 1);
        save(&c, "web", &cur, &new).unwrap();
        assert_eq!(load(&c, "web").unwrap(), new);

        // The same values again: no change, same version.
        let same = set(&[("A", "1")]).apply_to(&new, "web").unwrap();
        assert_eq!(same, new);

        // Deployment override, a file, a policy.
        let mut ch = set(&[("A", "blue")]);
        ch.deployment = Some("blue".into());
        let d = ch.apply_to(&new, "web").unwrap();
        save(&c, "web", &new, &d).unwrap();
        let ch = Change {
            files: vec![FileSet {
                path: "/etc/x".into(),
                mode: Some(ModeJson::Octal("0640".into())),
                contents_b64: util::base64_encode(b"hi\xff"),
            }],
            unset: vec!["B".into()],
            policy: Some(PolicyChange {
                on_change: Some("signal:hup".into()),
                splay_ms: Some(0),
                stop_grace_ms: None,
            }),
            ..Default::default()
        };
        let f = ch.apply_to(&d, "web").unwrap();
        assert_eq!(f.version, 3);
        save(&c, "web", &d, &f).unwrap();
        let loaded = load(&c, "web").unwrap();
        assert_eq!(loaded, f);
        let snap = loaded.snapshot("blue");
        assert_eq!(snap.env.get("A").map(String::as_str), Some("blue"));
        assert!(!snap.env.contains_key("B"));
        assert_eq!(
            loaded.snapshot("green").env.get("A").map(String::as_str),
            Some("1")
        );
        assert_eq!(snap.files[0].mode, 0o640);
        assert_eq!(snap.files[0].contents, b"hi\xff");
        assert_eq!(snap.on_change.as_ref().unwrap().signal, "SIGHUP");
        assert_eq!(
            snap.on_change.as_ref().unwrap().action,
            Action::Signal as i32
        );
        assert_eq!(snap.restart_splay_ms, 0);
        assert_eq!(loaded.snapshot("").restart_splay_ms, 0);
        assert_eq!(
            load(&c, "nope").unwrap().policy.splay_ms(),
            DEFAULT_SPLAY.as_millis() as u32
        );
    }

    #[test]
    fn bad_changes_are_refused_whole() {
        let cur = AppConfig::default();
        let mut ch = set(&[("GOOD", "1"), ("1BAD", "2")]);
        assert!(
            ch.apply_to(&cur, "web")
                .unwrap_err()
                .contains("invalid variable name")
        );
        ch = Change {
            files: vec![FileSet {
                path: "etc/x".into(),
                mode: None,
                contents_b64: String::new(),
            }],
            ..Default::default()
        };
        assert!(ch.apply_to(&cur, "web").unwrap_err().contains("relative"));
        ch = Change {
            policy: Some(PolicyChange {
                on_change: Some("signal:SIGNOPE".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            ch.apply_to(&cur, "web")
                .unwrap_err()
                .contains("unknown signal")
        );
        let big = "x".repeat(proto::MAX_FRAME);
        assert!(
            set(&[("BIG", &big)])
                .apply_to(&cur, "web")
                .unwrap_err()
                .contains("limit")
        );
        // Just under the limit is fine.
        let fits = "x".repeat(proto::MAX_FRAME - 2 * WELCOME_RESERVE);
        assert!(set(&[("BIG", &fits)]).apply_to(&cur, "web").is_ok());
    }
}
