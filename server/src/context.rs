//! The CLI context file: where the API is, which CA to trust, and the admin token. Written by
//! `waypost server run` so the CLI on the same machine works with no setup; read by the CLI.

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Context {
    /// `host:port` of the HTTPS API.
    pub api_addr: String,
    /// PEM of the CA that signed the server's certificate; the CLI trusts exactly this.
    pub ca_pem: String,
    pub admin_token: String,
    /// `host:port` of the control listener (what entrypoints connect to).
    pub control_addr: String,
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

/// Loads the context file; `Ok(None)` if it does not exist.
pub fn load() -> Result<Option<Context>> {
    let path = path()?;
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("context file {} is not valid", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the context file atomically with mode 0600 (it holds the admin token), creating its
/// directory (0700) if needed.
pub fn save(ctx: &Context) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let path = path()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut json = serde_json::to_vec_pretty(ctx)?;
    json.push(b'\n');
    crate::util::write_atomic(&path, &json, 0o600)?;
    Ok(path)
}
