//! The app-configuration model: what a scope's configuration is (the global scope and each
//! app: variables with their targets — everyone, a label selector, a deployment —, internal
//! and secret variables, templates, dynamic values read from config sources, files, the
//! on-change policy), how an app's view of both scopes becomes the snapshot one instance gets,
//! and the rules every change is checked against before anything is written. The CLI checks its
//! input with the same rules before calling the API. Dynamic values themselves are never here:
//! the resolver (service/resolve.rs) holds them in memory and hands them to [`View::snapshot`].

use super::Labels;
use super::template::{self, Name};
use crate::util;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use waypost_proto::{self as proto, Frame, Kind, on_change::Action};

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

/// `HUP`, `SIGHUP`, `sighup` or a number 1..=64 → the canonical name (`SIGHUP`, or the number).
/// Names and numbers are the entrypoint's (`waypost_proto::signal`).
pub fn normalize_signal(s: &str) -> Result<String, String> {
    use waypost_proto::signal;
    match signal::from_name(s) {
        Some(n) => Ok(signal::name(n).map_or_else(|| n.to_string(), str::to_owned)),
        None if s.trim().parse::<i32>().is_ok() => {
            Err(format!("unknown signal {s:?}: numbers go from 1 to 64"))
        }
        None => Err(format!(
            "unknown signal name {s:?} (use e.g. SIGHUP, SIGUSR1, SIGUSR2 or a number)"
        )),
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

/// The name of the global scope (its definitions apply to every app). App names are never empty.
pub const GLOBAL: &str = "";
/// How many versions of each scope `config history` keeps (older ones are pruned).
pub const HISTORY_KEPT: u64 = 100;

/// Which instances of its scope a definition applies to. The narrower wins (see [`View`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every instance.
    #[default]
    All,
    /// Instances whose labels include every one of these (`--where k=v`).
    Labels(Labels),
    /// Instances of this deployment (app scope only).
    Deployment(String),
}

impl Target {
    /// Narrowness: all < a label selector (more labels narrower) < one deployment.
    fn rank(&self) -> (u8, usize) {
        match self {
            Target::All => (0, 0),
            Target::Labels(l) => (1, l.len()),
            Target::Deployment(_) => (2, 0),
        }
    }

    pub fn matches(&self, deployment: &str, labels: &Labels) -> bool {
        match self {
            Target::All => true,
            Target::Labels(sel) => sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
            Target::Deployment(d) => d == deployment,
        }
    }

    /// For listings: "" (all), "where k=v,k2=v2", "deployment D".
    pub fn describe(&self) -> String {
        match self {
            Target::All => String::new(),
            Target::Labels(l) => format!("where {}", super::labels::format(l)),
            Target::Deployment(d) => format!("deployment {d}"),
        }
    }
}

/// A dynamic value: `SOURCE:PATH#FIELD`, read from a config source by the server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DynRef {
    pub source: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Source names: like app names, plus `_`.
pub fn check_source_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid source name {n:?}: 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        ))
    }
}

impl DynRef {
    /// `SOURCE:PATH` or `SOURCE:PATH#FIELD`.
    pub fn parse(s: &str) -> Result<DynRef, String> {
        let bad = || {
            format!(
                "invalid dynamic value {s:?}: use SOURCE:PATH#FIELD, e.g. bao:secret/data/web#password"
            )
        };
        let (source, rest) = s.split_once(':').ok_or_else(bad)?;
        check_source_name(source).map_err(|e| format!("{}: {e}", bad()))?;
        let (path, field) = match rest.rsplit_once('#') {
            Some((p, f)) if !f.is_empty() => (p, Some(f.to_string())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        // Kept as written: an etcd key's leading '/' is part of the key (OpenBao/Vault paths
        // ignore it).
        if path.trim_start_matches('/').is_empty()
            || path.len() > MAX_PATH
            || path.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad());
        }
        Ok(DynRef {
            source: source.to_string(),
            path: path.to_string(),
            field,
        })
    }
}

impl std::fmt::Display for DynRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.source, self.path)?;
        if let Some(field) = &self.field {
            write!(f, "#{field}")?;
        }
        Ok(())
    }
}

/// What a variable holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarValue {
    /// A template (model/template.rs): literal text unless it has `${…}`.
    Text(String),
    /// Read from a config source.
    Dynamic(DynRef),
}

/// One definition of a variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Var {
    pub key: String,
    /// Template-only (`${internal.KEY}`), never exported to the app.
    #[serde(default, skip_serializing_if = "is_false")]
    pub internal: bool,
    #[serde(default, skip_serializing_if = "is_all")]
    pub target: Target,
    /// Masked in listings; shown by `config get --reveal` only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub secret: bool,
    pub value: VarValue,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_all(t: &Target) -> bool {
    *t == Target::All
}

/// A definition's identity within a scope: (internal, key, target).
pub type VarId = (bool, String, Target);

impl Var {
    pub fn id(&self) -> VarId {
        (self.internal, self.key.clone(), self.target.clone())
    }

    pub fn name(&self) -> Name {
        Name {
            internal: self.internal,
            key: self.key.clone(),
        }
    }
}

/// A config file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileData {
    /// Bytes as given (base64 in the stored document).
    Bytes(#[serde(with = "b64")] Vec<u8>),
    /// A template rendered over the snapshot's variables (`--template`).
    Template(String),
    /// Read from a config source.
    Dynamic(DynRef),
}

mod b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::util::base64_encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        crate::util::base64_decode(&s).ok_or_else(|| serde::de::Error::custom("invalid base64"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    pub secret: bool,
    pub data: FileData,
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

/// Everything configured in one scope (the global scope, or one app).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeConfig {
    /// Bumped by every change an operator makes (the versions of `config history`).
    pub version: u64,
    /// Bumped when a dynamic value this scope uses changed (values are never stored).
    pub epoch: u64,
    pub vars: BTreeMap<VarId, Var>,
    /// By path.
    pub files: BTreeMap<String, FileEntry>,
    /// App scope only.
    pub policy: Policy,
}

/// The stored form of a scope's definitions (JSON in `config_scopes.doc` and the history).
#[derive(Serialize, Deserialize, Default)]
struct Doc {
    #[serde(default)]
    vars: Vec<Var>,
    #[serde(default)]
    files: Vec<FileEntry>,
    #[serde(default)]
    policy: PolicyDoc,
}

#[derive(Serialize, Deserialize)]
struct PolicyDoc {
    on_change: String,
    #[serde(default)]
    splay_ms: Option<u32>,
    #[serde(default)]
    stop_grace_ms: u32,
}

impl Default for PolicyDoc {
    fn default() -> Self {
        PolicyDoc {
            on_change: "restart".into(),
            splay_ms: None,
            stop_grace_ms: 0,
        }
    }
}

impl ScopeConfig {
    /// The definitions as the stored JSON document (version and epoch are stored beside it).
    pub fn to_doc(&self) -> String {
        let p = &self.policy;
        let doc = Doc {
            vars: self.vars.values().cloned().collect(),
            files: self.files.values().cloned().collect(),
            policy: PolicyDoc {
                on_change: on_change_text(p.action, &p.signal),
                splay_ms: p.splay_ms,
                stop_grace_ms: p.stop_grace_ms,
            },
        };
        serde_json::to_string(&doc).expect("a config document serialises")
    }

    /// Reads a stored document back.
    pub fn from_doc(version: u64, epoch: u64, doc: &str) -> Result<ScopeConfig, String> {
        let d: Doc = serde_json::from_str(doc)
            .map_err(|e| format!("a stored config document is unreadable: {e}"))?;
        let (action, signal) = parse_on_change(&d.policy.on_change)?;
        Ok(ScopeConfig {
            version,
            epoch,
            vars: d.vars.into_iter().map(|v| (v.id(), v)).collect(),
            files: d.files.into_iter().map(|f| (f.path.clone(), f)).collect(),
            policy: Policy {
                action,
                signal,
                splay_ms: d.policy.splay_ms,
                stop_grace_ms: d.policy.stop_grace_ms,
            },
        })
    }

    /// Every dynamic reference of this scope (variables and files).
    pub fn dynamic_refs(&self) -> impl Iterator<Item = &DynRef> {
        let vars = self.vars.values().filter_map(|v| match &v.value {
            VarValue::Dynamic(r) => Some(r),
            VarValue::Text(_) => None,
        });
        let files = self.files.values().filter_map(|f| match &f.data {
            FileData::Dynamic(r) => Some(r),
            _ => None,
        });
        vars.chain(files)
    }

    /// The same definitions (ignoring version and epoch).
    pub fn same_definitions(&self, other: &ScopeConfig) -> bool {
        self.vars == other.vars && self.files == other.files && self.policy == other.policy
    }
}

/// What changed between two versions of a scope, for `config history` (names only, never values).
pub fn summary(old: &ScopeConfig, new: &ScopeConfig) -> String {
    let mut parts = Vec::new();
    let label = |v: &Var| {
        let mut s = if v.internal {
            format!("internal.{}", v.key)
        } else {
            v.key.clone()
        };
        let t = v.target.describe();
        if !t.is_empty() {
            s = format!("{s} ({t})");
        }
        s
    };
    let set: Vec<String> = new
        .vars
        .iter()
        .filter(|(id, v)| old.vars.get(*id) != Some(*v))
        .map(|(_, v)| label(v))
        .collect();
    let unset: Vec<String> = old
        .vars
        .iter()
        .filter(|(id, _)| !new.vars.contains_key(*id))
        .map(|(_, v)| label(v))
        .collect();
    let files: Vec<String> = new
        .files
        .iter()
        .filter(|(p, f)| old.files.get(*p) != Some(*f))
        .map(|(p, _)| p.clone())
        .collect();
    let unset_files: Vec<String> = old
        .files
        .keys()
        .filter(|p| !new.files.contains_key(*p))
        .cloned()
        .collect();
    if !set.is_empty() {
        parts.push(format!("set {}", set.join(", ")));
    }
    if !unset.is_empty() {
        parts.push(format!("unset {}", unset.join(", ")));
    }
    if !files.is_empty() {
        parts.push(format!("file {}", files.join(", ")));
    }
    if !unset_files.is_empty() {
        parts.push(format!("removed file {}", unset_files.join(", ")));
    }
    if old.policy != new.policy {
        parts.push("policy".into());
    }
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join("; ")
    }
}

// ---- the view of one app: global + app, snapshots, checks ------------------------------------

/// The configuration an app's instances see: the global scope under the app's own.
///
/// Precedence for each variable name (exported and internal names apart): among the definitions
/// whose target matches the instance, the app's beat the global ones; within a scope a deployment
/// override beats a label selector, which beats an unrestricted definition; between selectors the
/// one with more labels wins, and between equally specific ones the one that sorts last
/// (deterministic). Files: the app's file at a path replaces the global one.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub global: &'a ScopeConfig,
    pub app_name: &'a str,
    pub app: &'a ScopeConfig,
}

/// What [`View::snapshot`] produced.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub config: proto::Config,
    /// Some dynamic value this instance would get has never been resolved: the snapshot lacks
    /// it. An instance that already has a config must not be given this one (it would lose the
    /// value it still has); see service/config.rs.
    pub missing_dynamic: bool,
    /// Variables left out and why (a template referring to something missing, a cycle, a
    /// non-UTF-8 value), for the server's log and `config list`.
    pub problems: Vec<String>,
}

impl<'a> View<'a> {
    /// The version instances see: every bump of either scope makes it grow.
    pub fn version(&self) -> u64 {
        self.global.version + self.global.epoch + self.app.version + self.app.epoch
    }

    /// For each name, the definition that applies to an instance (and its scope's name).
    pub fn winners(&self, deployment: &str, labels: &Labels) -> BTreeMap<Name, (&'a Var, &'a str)> {
        /// (scope level, target narrowness, target for ties): the greatest wins.
        type Rank<'t> = (u8, (u8, usize), &'t Target);
        let mut best: BTreeMap<Name, (Rank<'a>, &'a Var, &'a str)> = BTreeMap::new();
        for (level, scope, cfg) in [(0u8, GLOBAL, self.global), (1, self.app_name, self.app)] {
            for v in cfg.vars.values() {
                if !v.target.matches(deployment, labels) {
                    continue;
                }
                let rank = (level, v.target.rank(), &v.target);
                let e = best.entry(v.name());
                match e {
                    std::collections::btree_map::Entry::Vacant(s) => {
                        s.insert((rank, v, scope));
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if rank > o.get().0 {
                            o.insert((rank, v, scope));
                        }
                    }
                }
            }
        }
        best.into_iter().map(|(n, (_, v, s))| (n, (v, s))).collect()
    }

    /// The snapshot an instance of `deployment` with `labels` gets. `dynamic(scope, r)` is the
    /// current value of a dynamic reference defined in `scope` (None: never resolved).
    pub fn snapshot(
        &self,
        deployment: &str,
        labels: &Labels,
        dynamic: &dyn Fn(&str, &DynRef) -> Option<Vec<u8>>,
    ) -> Snapshot {
        let winners = self.winners(deployment, labels);
        let mut ev = Eval {
            winners: &winners,
            memo: BTreeMap::new(),
            active: Vec::new(),
            dynamic,
            missing_dynamic: false,
            problems: Vec::new(),
        };
        let mut env = BTreeMap::new();
        for name in winners.keys().filter(|n| !n.internal) {
            if let Some(v) = ev.value(name) {
                if v.contains('\0') {
                    ev.problems
                        .push(format!("{name}: the value contains a NUL byte; left out"));
                    continue;
                }
                env.insert(name.key.clone(), v);
            }
        }
        let mut files: BTreeMap<&str, (&FileEntry, &str)> = BTreeMap::new();
        for (scope, cfg) in [(GLOBAL, self.global), (self.app_name, self.app)] {
            for f in cfg.files.values() {
                files.insert(&f.path, (f, scope));
            }
        }
        let mut out_files = Vec::new();
        for (f, scope) in files.into_values() {
            let contents = match &f.data {
                FileData::Bytes(b) => Some(b.clone()),
                FileData::Template(t) => ev.render(&f.path, t).map(String::into_bytes),
                FileData::Dynamic(r) => {
                    let v = (ev.dynamic)(scope, r);
                    if v.is_none() {
                        ev.missing_dynamic = true;
                    }
                    v
                }
            };
            if let Some(contents) = contents {
                out_files.push(proto::ConfigFile {
                    path: f.path.clone(),
                    mode: f.mode,
                    contents,
                });
            }
        }
        let p = &self.app.policy;
        Snapshot {
            config: proto::Config {
                version: self.version(),
                env,
                files: out_files,
                on_change: Some(proto::OnChange {
                    action: p.action as i32,
                    signal: p.signal.clone(),
                }),
                stop_grace_ms: p.stop_grace_ms,
                restart_splay_ms: p.splay_ms(),
            },
            missing_dynamic: ev.missing_dynamic,
            problems: ev.problems,
        }
    }

    /// The value one name (exported or internal) has for an instance of `deployment` with
    /// `labels` (None: not set for it, or no value: see [`View::snapshot`]).
    pub fn value_of(
        &self,
        name: &Name,
        deployment: &str,
        labels: &Labels,
        dynamic: &dyn Fn(&str, &DynRef) -> Option<Vec<u8>>,
    ) -> Option<String> {
        let winners = self.winners(deployment, labels);
        let mut ev = Eval {
            winners: &winners,
            memo: BTreeMap::new(),
            active: Vec::new(),
            dynamic,
            missing_dynamic: false,
            problems: Vec::new(),
        };
        ev.value(name)
    }

    /// Whether the value of `name` for such an instance holds a secret: its definition is secret
    /// or dynamic, or its template uses (directly or through other templates) one that is.
    pub fn is_secret(&self, name: &Name, deployment: &str, labels: &Labels) -> bool {
        let winners = self.winners(deployment, labels);
        let mut seen = std::collections::BTreeSet::new();
        let mut todo = vec![name.clone()];
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            let Some((var, _)) = winners.get(&n) else {
                continue;
            };
            match &var.value {
                _ if var.secret => return true,
                VarValue::Dynamic(_) => return true,
                VarValue::Text(t) => {
                    if let Ok(tpl) = template::parse(t) {
                        todo.extend(tpl.refs().into_iter().map(|(r, _)| r));
                    }
                }
            }
        }
        false
    }

    /// Checks the templates of both scopes together: each parses, each name a template requires
    /// is defined somewhere in the view (any target), and no name depends on itself.
    pub fn check_templates(&self) -> Result<(), String> {
        check_templates(&[self.global, self.app], self.app_name)
    }

    /// A bound on the snapshot's size in bytes: every name at its largest static definition plus
    /// every file (dynamic values and template expansion are not known here; the service checks
    /// the real snapshot before sending it).
    fn size_bound(&self) -> usize {
        let mut per_name: BTreeMap<Name, usize> = BTreeMap::new();
        for cfg in [self.global, self.app] {
            for v in cfg.vars.values().filter(|v| !v.internal) {
                let n = match &v.value {
                    VarValue::Text(t) => v.key.len() + t.len() + 8,
                    VarValue::Dynamic(_) => 0,
                };
                let e = per_name.entry(v.name()).or_default();
                *e = (*e).max(n);
            }
        }
        let files: BTreeMap<&str, usize> = [self.global, self.app]
            .iter()
            .flat_map(|c| c.files.values())
            .map(|f| {
                let n = match &f.data {
                    FileData::Bytes(b) => b.len(),
                    FileData::Template(t) => t.len(),
                    FileData::Dynamic(_) => 0,
                };
                (f.path.as_str(), f.path.len() + n + 16)
            })
            .collect();
        per_name.values().sum::<usize>() + files.values().sum::<usize>() + 64
    }
}

/// The largest snapshot (encoded Config frame) that fits in a Welcome.
pub fn frame_limit() -> usize {
    proto::MAX_FRAME + proto::HEADER_LEN - WELCOME_RESERVE
}

/// Encoded size of a snapshot as a Config frame.
pub fn frame_size(c: &proto::Config) -> usize {
    let frame: Frame = Kind::Config(c.clone()).into();
    proto::encoded_len(&frame)
}

fn check_templates(scopes: &[&ScopeConfig], what: &str) -> Result<(), String> {
    let mut defined: std::collections::BTreeSet<Name> = Default::default();
    let mut graph: BTreeMap<Name, Vec<Name>> = BTreeMap::new();
    let mut parsed: Vec<(String, template::Template)> = Vec::new();
    for cfg in scopes {
        for v in cfg.vars.values() {
            defined.insert(v.name());
            if let VarValue::Text(t) = &v.value {
                let tpl = template::parse(t).map_err(|e| format!("{}: {e}", v.name()))?;
                graph
                    .entry(v.name())
                    .or_default()
                    .extend(tpl.refs().into_iter().map(|(n, _)| n));
                parsed.push((v.name().to_string(), tpl));
            } else {
                graph.entry(v.name()).or_default();
            }
        }
        for f in cfg.files.values() {
            if let FileData::Template(t) = &f.data {
                let tpl = template::parse(t).map_err(|e| format!("file {}: {e}", f.path))?;
                parsed.push((format!("file {}", f.path), tpl));
            }
        }
    }
    for (who, tpl) in &parsed {
        for (name, required) in tpl.refs() {
            if required && !defined.contains(&name) {
                let hint = if name.internal {
                    format!("set it with `config set --internal {}=…`", name.key)
                } else {
                    format!(
                        "define it, use default({name}, \"…\"), or write $${{ for a literal ${{"
                    )
                };
                let whose = if what.is_empty() {
                    "the global config".to_string()
                } else {
                    format!("app {what}")
                };
                return Err(format!(
                    "{who} refers to ${{{name}}}, which is not defined in {whose}: {hint}"
                ));
            }
        }
    }
    if let Some(cycle) = template::find_cycle(&graph) {
        let path: Vec<String> = cycle.iter().map(|n| n.to_string()).collect();
        return Err(format!(
            "refused: the templates form a cycle: {}; nothing was changed",
            path.join(" → ")
        ));
    }
    Ok(())
}

/// Lazy, memoised evaluation of a snapshot's variables (cycles and missing values leave a
/// variable out rather than failing the snapshot).
struct Eval<'w, 'a> {
    winners: &'w BTreeMap<Name, (&'a Var, &'a str)>,
    memo: BTreeMap<Name, Option<String>>,
    active: Vec<Name>,
    dynamic: &'w dyn Fn(&str, &DynRef) -> Option<Vec<u8>>,
    missing_dynamic: bool,
    problems: Vec<String>,
}

impl Eval<'_, '_> {
    fn value(&mut self, name: &Name) -> Option<String> {
        if let Some(v) = self.memo.get(name) {
            return v.clone();
        }
        if self.active.contains(name) {
            self.problems
                .push(format!("{name}: part of a template cycle; left out"));
            return None;
        }
        let (var, scope) = *self.winners.get(name)?;
        self.active.push(name.clone());
        let v = match &var.value {
            VarValue::Text(t) => self.render(&name.to_string(), t),
            VarValue::Dynamic(r) => match (self.dynamic)(scope, r) {
                None => {
                    self.missing_dynamic = true;
                    None
                }
                Some(bytes) => match String::from_utf8(bytes) {
                    Ok(s) => Some(s),
                    Err(_) => {
                        self.problems.push(format!(
                            "{name}: the value of {r} is not UTF-8 text; left out (put it in a file)"
                        ));
                        None
                    }
                },
            },
        };
        self.active.pop();
        self.memo.insert(name.clone(), v.clone());
        v
    }

    fn render(&mut self, who: &str, text: &str) -> Option<String> {
        let tpl = match template::parse(text) {
            Ok(t) => t,
            Err(e) => {
                self.problems.push(format!("{who}: {e}"));
                return None;
            }
        };
        match tpl.render(&mut |n| self.value(n)) {
            Ok(s) => Some(s),
            Err(template::RenderError::Missing(n)) => {
                self.problems
                    .push(format!("{who}: ${{{n}}} has no value; left out"));
                None
            }
            Err(e) => {
                self.problems.push(format!("{who}: {e}; left out"));
                None
            }
        }
    }
}

// ---- changes ---------------------------------------------------------------------------------

/// A requested change of one scope, checked by [`Change::apply_to`].
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Target of `set`/`dynamic`/`unset`: this deployment only (app scope).
    #[serde(default)]
    pub deployment: Option<String>,
    /// Target of `set`/`dynamic`/`unset`: instances with all these labels.
    #[serde(default, rename = "where")]
    pub selector: Option<Labels>,
    /// Variables with text (templates) values.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Variables read from a source: KEY → `SOURCE:PATH#FIELD`.
    #[serde(default)]
    pub dynamic: BTreeMap<String, String>,
    /// `set`/`dynamic`/`unset` name internal (template-only) variables.
    #[serde(default)]
    pub internal: bool,
    /// `set`/`dynamic` values are secret (masked in listings).
    #[serde(default)]
    pub secret: bool,
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
    /// Permission bits: a number (420) or an octal string ("0644"). Default 0644 (0600 for
    /// secret and dynamic files).
    #[serde(default)]
    pub mode: Option<ModeJson>,
    /// The contents, base64 (static files).
    #[serde(default)]
    pub contents_b64: Option<String>,
    /// `SOURCE:PATH#FIELD` (dynamic files), instead of contents.
    #[serde(default)]
    pub dynamic: Option<String>,
    /// Render the contents as a template.
    #[serde(default)]
    pub template: bool,
    #[serde(default)]
    pub secret: bool,
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

/// What a change of one scope is checked against besides the scope itself.
pub struct Context<'a> {
    /// The scope changed: [`GLOBAL`] or an app's name.
    pub scope: &'a str,
    /// For an app: the global scope (its templates may use global variables).
    pub global: Option<&'a ScopeConfig>,
    /// For the global scope: every app's config (a global change must not break any app).
    pub apps: &'a [(String, std::sync::Arc<ScopeConfig>)],
    /// Whether a source of this name is visible from the scope.
    pub has_source: &'a dyn Fn(&str) -> bool,
}

impl Change {
    /// The scope's config after this change, or why it is refused (nothing is changed then).
    /// The version is bumped when anything changed.
    pub fn apply_to(&self, cur: &ScopeConfig, ctx: &Context) -> Result<ScopeConfig, String> {
        let global = ctx.scope == GLOBAL;
        let mut new = cur.clone();
        let target = match (
            self.deployment.as_deref().filter(|d| !d.is_empty()),
            &self.selector,
        ) {
            (Some(_), Some(s)) if !s.is_empty() => {
                return Err("give --deployment or --where, not both".into());
            }
            (Some(_), _) if global => {
                return Err(
                    "a deployment belongs to an app: --deployment needs --app (use --where for \
                     labels across apps)"
                        .into(),
                );
            }
            (Some(d), _) => {
                check_deployment(d)?;
                Target::Deployment(d.to_string())
            }
            (None, Some(s)) if !s.is_empty() => {
                for (k, v) in s {
                    super::labels::check(k, v)?;
                }
                if s.len() > super::labels::MAX_LABELS {
                    return Err(format!(
                        "a selector has at most {} labels",
                        super::labels::MAX_LABELS
                    ));
                }
                Target::Labels(s.clone())
            }
            _ => Target::All,
        };
        let has_vars = !self.set.is_empty() || !self.dynamic.is_empty() || !self.unset.is_empty();
        if target != Target::All && (!self.files.is_empty() || !self.unset_files.is_empty()) {
            return Err(
                "config files belong to the whole app (or all apps); set them without --deployment or --where"
                    .into(),
            );
        }
        if (self.internal || self.secret) && !has_vars && self.files.is_empty() {
            return Err("--internal and --secret apply to variables given with them".into());
        }
        for (k, v) in &self.set {
            check_key(k)?;
            check_value(k, v)?;
            check_reserved(k, self.internal)?;
        }
        for (k, r) in &self.dynamic {
            check_key(k)?;
            check_reserved(k, self.internal)?;
            if self.set.contains_key(k) {
                return Err(format!("{k} is given both a value and a dynamic source"));
            }
            let r = DynRef::parse(r)?;
            if !(ctx.has_source)(&r.source) {
                return Err(format!(
                    "{k}: there is no config source named {:?}{}; add it with `waypost config \
                     source set {} --kind … --addr …`",
                    r.source,
                    if global { " (global)" } else { "" },
                    r.source
                ));
            }
        }
        for k in &self.unset {
            check_key(k)?;
            if self.set.contains_key(k) || self.dynamic.contains_key(k) {
                return Err(format!("{k} is both set and unset in one change"));
            }
        }
        for k in &self.unset {
            new.vars.remove(&(self.internal, k.clone(), target.clone()));
        }
        let sets = self
            .set
            .iter()
            .map(|(k, v)| (k, VarValue::Text(v.clone())))
            .chain(self.dynamic.iter().map(|(k, r)| {
                (
                    k,
                    VarValue::Dynamic(DynRef::parse(r).expect("checked above")),
                )
            }));
        for (k, value) in sets {
            let v = Var {
                key: k.clone(),
                internal: self.internal,
                target: target.clone(),
                secret: self.secret,
                value,
            };
            new.vars.insert(v.id(), v);
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
            let data = match (&f.contents_b64, &f.dynamic) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(format!(
                        "file {}: give either its contents or a dynamic source",
                        f.path
                    ));
                }
                (None, Some(r)) => {
                    if f.template {
                        return Err(format!("file {}: a dynamic file is not a template", f.path));
                    }
                    let r = DynRef::parse(r)?;
                    if !(ctx.has_source)(&r.source) {
                        return Err(format!(
                            "file {}: there is no config source named {:?}",
                            f.path, r.source
                        ));
                    }
                    FileData::Dynamic(r)
                }
                (Some(b64), None) => {
                    let bytes = util::base64_decode(b64).ok_or_else(|| {
                        format!("the contents of {} are not valid base64", f.path)
                    })?;
                    if f.template {
                        FileData::Template(String::from_utf8(bytes).map_err(|_| {
                            format!("file {}: a template must be UTF-8 text", f.path)
                        })?)
                    } else {
                        FileData::Bytes(bytes)
                    }
                }
            };
            let private = f.secret || matches!(data, FileData::Dynamic(_));
            let mode = match &f.mode {
                Some(m) => m.bits()?,
                None if private => 0o600,
                None => 0o644,
            };
            new.files.insert(
                f.path.clone(),
                FileEntry {
                    path: f.path.clone(),
                    mode,
                    secret: f.secret,
                    data,
                },
            );
        }
        if let Some(p) = &self.policy {
            if global {
                return Err("the on-change policy belongs to an app: give --app".into());
            }
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
        if new.same_definitions(cur) {
            return Ok(cur.clone());
        }
        check_scope(&new, ctx)?;
        new.version = cur.version + 1;
        Ok(new)
    }
}

/// Names the entrypoint keeps for itself (it never passes them to the app), so a variable with
/// one could never reach it. `WAYPOST_LOG_LEVEL` is the exception: it sets the entrypoint's own
/// log level, live (docs/protocol.md).
fn check_reserved(k: &str, internal: bool) -> Result<(), String> {
    if internal || k == "WAYPOST_LOG_LEVEL" {
        return Ok(());
    }
    if k.starts_with("WAYPOST_") || k.starts_with("WAYPOINT_") {
        return Err(format!(
            "{k}: names starting with WAYPOST_ or WAYPOINT_ belong to the entrypoint, which never \
             passes them to the app (only WAYPOST_LOG_LEVEL may be set, to change its log level)"
        ));
    }
    Ok(())
}

/// Checks a scope's config as it would be after a change (or a rollback): templates, and the
/// size of every app's snapshot it is part of.
pub fn check_scope(new: &ScopeConfig, ctx: &Context) -> Result<(), String> {
    let empty = ScopeConfig::default();
    let mut views: Vec<View> = Vec::new();
    if ctx.scope == GLOBAL {
        // Global templates stand on their own; each app must still work with the new global.
        check_templates(&[new], GLOBAL)?;
        views.push(View {
            global: new,
            app_name: "",
            app: &empty,
        });
        for (name, app) in ctx.apps {
            views.push(View {
                global: new,
                app_name: name,
                app,
            });
        }
    } else {
        views.push(View {
            global: ctx.global.unwrap_or(&empty),
            app_name: ctx.scope,
            app: new,
        });
    }
    for v in &views {
        v.check_templates().map_err(|e| {
            if ctx.scope == GLOBAL && !v.app_name.is_empty() {
                format!("refused (it would break app {}): {e}", v.app_name)
            } else {
                e
            }
        })?;
        let size = v.size_bound();
        let limit = frame_limit();
        if size > limit {
            let whose = if v.app_name.is_empty() {
                "the global config".to_string()
            } else {
                format!("the config of app {}", v.app_name)
            };
            return Err(format!(
                "refused: {whose} would take up to {size} bytes on the wire, over the limit of \
                 {limit} bytes (one 1 MiB frame); nothing was changed"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
