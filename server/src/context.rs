//! The CLI context file: named contexts — each where an API is, which CA to trust and an admin
//! token — and which one is current (like kubeconfig). `waypost server run` writes the context
//! `default` so the CLI on the same machine works with no setup; `waypost login` adds others;
//! `waypost context list|use|remove` manage them; the CLI uses the current one.
//!
//! The file (`$WAYPOST_CONTEXT`, default `~/.config/waypost/context.json`, mode 0600):
//!
//! ```json
//! { "current": "prod",
//!   "contexts": { "default": { "api_addr": "…", "ca_pem": "…", "admin_token": "…", "control_addr": "…" },
//!                 "prod": { … } },
//!   "api_addr": "…", "ca_pem": "…", "admin_token": "…", "control_addr": "…" }
//! ```
//!
//! The top-level `api_addr`… fields are a copy of the current context: the whole file of
//! earlier versions, kept so their readers (an older CLI, scripts doing `jq .admin_token`) still
//! work. A file of that older form (those four fields and nothing else) is read as one context,
//! `default`, current.

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The context `waypost server run` writes, and the name an old single-context file's context
/// gets.
pub const DEFAULT: &str = "default";

/// One context: a server and the credentials to use it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Context {
    /// `host:port` of the HTTPS API.
    pub api_addr: String,
    /// PEM of the CA that signed the server's certificate; the CLI trusts exactly this.
    pub ca_pem: String,
    pub admin_token: String,
    /// `host:port` of the control listener (what entrypoints connect to).
    #[serde(default)]
    pub control_addr: String,
}

/// The whole file: every context by name, and which one is current.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contexts {
    /// The context the CLI uses; None when none is chosen (e.g. the current one was removed).
    pub current: Option<String>,
    pub contexts: BTreeMap<String, Context>,
}

impl Contexts {
    /// The current context, if one is chosen and exists.
    pub fn current(&self) -> Option<(&str, &Context)> {
        let name = self.current.as_deref()?;
        self.contexts.get(name).map(|c| (name, c))
    }

    /// The file's JSON (see the module doc).
    fn to_json(&self) -> serde_json::Value {
        let mut doc = match self.current() {
            // INVARIANT: a Context always serialises to an object.
            Some((_, ctx)) => serde_json::to_value(ctx).expect("a context is JSON"),
            None => serde_json::json!({}),
        };
        doc["current"] = serde_json::json!(self.current);
        doc["contexts"] = serde_json::to_value(&self.contexts).expect("contexts are JSON");
        doc
    }

    /// Reads the file's JSON, new or old form.
    fn from_json(v: serde_json::Value) -> Result<Contexts> {
        if v.get("contexts").is_none() {
            // The single-context file of earlier versions: it becomes `default`.
            let ctx: Context = serde_json::from_value(v)?;
            return Ok(Contexts {
                current: Some(DEFAULT.to_string()),
                contexts: BTreeMap::from([(DEFAULT.to_string(), ctx)]),
            });
        }
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            current: Option<String>,
            contexts: BTreeMap<String, Context>,
        }
        let f: File = serde_json::from_value(v)?;
        Ok(Contexts {
            current: f.current,
            contexts: f.contexts,
        })
    }
}

/// Whether `name` can name a context: 1-63 letters, digits, `.`, `_` or `-`, not starting with
/// `-` or `.` (so it never looks like a flag or a hidden file).
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `$WAYPOST_CONTEXT`, else `~/.config/waypost/context.json` (`$XDG_CONFIG_HOME` honoured).
pub fn path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WAYPOST_CONTEXT").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let config = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .context("neither WAYPOST_CONTEXT nor HOME is set")?;
            PathBuf::from(home).join(".config")
        }
    };
    Ok(config.join("waypost").join("context.json"))
}

/// Loads every context; empty if the file does not exist.
pub fn load_all() -> Result<Contexts> {
    let path = path()?;
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(anyhow::Error::from)
            .and_then(Contexts::from_json)
            .with_context(|| format!("context file {} is not valid", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Contexts::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The context `waypost server run` wrote ([`DEFAULT`]); `Ok(None)` if there is none. The CLI
/// uses [`load_current`] instead.
pub fn load() -> Result<Option<Context>> {
    Ok(load_all()?.contexts.remove(DEFAULT))
}

/// The current context and its name; `Ok(None)` if none is chosen or the file does not exist.
pub fn load_current() -> Result<Option<(String, Context)>> {
    let all = load_all()?;
    Ok(all.current().map(|(n, c)| (n.to_string(), c.clone())))
}

/// Writes the file at `path` atomically with mode 0600 (it holds admin tokens); its directory
/// exists ([`update`] made it).
fn save_all(path: &std::path::Path, all: &Contexts) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(&all.to_json())?;
    json.push(b'\n');
    crate::util::write_atomic(path, &json, 0o600)
}

/// Reads the file, lets `change` edit the contexts and writes them back, holding an exclusive
/// lock (`flock` on `FILE.lock` next to it) from the read to the write: two commands changing
/// the file at once (a `login` while a server starts and writes its context) each keep the
/// other's change, where a plain read-modify-write would lose one. `change` returning an error
/// writes nothing.
pub fn update<T>(change: impl FnOnce(&mut Contexts) -> Result<T>) -> Result<(T, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = path()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::util::create_private_dir(dir)?;
    }
    let mut lock_path = path.clone().into_os_string();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .with_context(|| format!("opening {}", PathBuf::from(&lock_path).display()))?;
    // Blocks while another command holds it (each holds it for one read and one write).
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", PathBuf::from(&lock_path).display()))?;
    let mut all = load_all()?;
    let out = change(&mut all)?;
    save_all(&path, &all)?;
    drop(lock); // the kernel releases the lock with the last descriptor
    Ok((out, path))
}

/// Sets context `name` (keeping the others); it becomes current if `make_current`, or if no
/// context is current yet.
pub fn save_named(name: &str, ctx: &Context, make_current: bool) -> Result<PathBuf> {
    if !valid_name(name) {
        bail!(
            "invalid context name {name:?}: use 1-63 letters, digits, '.', '_' or '-', not starting \
             with '-' or '.'"
        );
    }
    let ((), path) = update(|all| {
        all.contexts.insert(name.to_string(), ctx.clone());
        if make_current || all.current().is_none() {
            all.current = Some(name.to_string());
        }
        Ok(())
    })?;
    Ok(path)
}

/// What `waypost server run` writes: context [`DEFAULT`], current unless the user chose
/// another one (`waypost context use`, `waypost login`).
pub fn save(ctx: &Context) -> Result<PathBuf> {
    save_named(DEFAULT, ctx, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(addr: &str) -> Context {
        Context {
            api_addr: addr.into(),
            ca_pem: "PEM".into(),
            admin_token: format!("token-{addr}"),
            control_addr: "c:1".into(),
        }
    }

    #[test]
    fn an_old_single_context_file_is_the_default_context() {
        let old = serde_json::json!({
            "api_addr": "127.0.0.1:9702", "ca_pem": "PEM",
            "admin_token": "token-127.0.0.1:9702", "control_addr": "c:1"
        });
        let all = Contexts::from_json(old).unwrap();
        assert_eq!(all.current(), Some((DEFAULT, &ctx("127.0.0.1:9702"))));
        assert_eq!(all.contexts.len(), 1);
    }

    #[test]
    fn the_file_round_trips_and_mirrors_the_current_context_on_top() {
        let all = Contexts {
            current: Some("prod".into()),
            contexts: BTreeMap::from([
                (DEFAULT.to_string(), ctx("a:1")),
                ("prod".to_string(), ctx("b:2")),
            ]),
        };
        let json = all.to_json();
        // What an older reader takes for the whole context is the current one.
        assert_eq!(json["admin_token"], "token-b:2");
        assert_eq!(json["api_addr"], "b:2");
        assert_eq!(Contexts::from_json(json).unwrap(), all);
        // No current context: no copy on top, and still readable.
        let none = Contexts {
            current: None,
            ..all
        };
        let json = none.to_json();
        assert!(json.get("admin_token").is_none());
        assert_eq!(Contexts::from_json(json).unwrap(), none);
    }

    #[test]
    fn names() {
        for ok in ["default", "prod", "eu-west.1", "a_b", "10.0.0.5"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "a:1", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
