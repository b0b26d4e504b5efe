//! The app-configuration model: what an app's configuration is (variables per app and per
//! deployment, files, the on-change policy), the snapshot an instance gets, and the rules every
//! change is checked against before anything is written. The CLI checks its input with the same
//! rules before calling the API.

use crate::util;
use serde::Deserialize;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn set(kv: &[(&str, &str)]) -> Change {
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
