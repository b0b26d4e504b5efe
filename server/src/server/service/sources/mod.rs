//! Config sources: the outside stores dynamic config values are read from (OpenBao/Vault, etcd),
//! resolved on the server and never in the entrypoint (docs/architecture.md, "Config sources").
//!
//! Each backend follows one (source, path) at a time: it reads the path, then keeps the value
//! current — OpenBao/Vault by refreshing (KV) or renewing/re-reading leases, etcd by watching —
//! and reports every outcome on an [`Out`] channel: the new value, or why it could not read it.
//! What a value means for the apps (which field, which variable, restarts) is the resolver's
//! business (service/resolve.rs); the backends only fetch.

pub mod etcd;
pub mod http;
pub mod vault;

use std::sync::Arc;
use tokio::sync::mpsc;

pub use crate::server::model::sources::{Auth, DEFAULT_REFRESH, SourceKind, SourceSpec};

/// One outcome of following a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// The value now at the path. OpenBao/Vault: the object a `#FIELD` is looked up in (for
    /// KV v2 the secret's `data.data`, for responses that carry an `auth` block that block,
    /// otherwise `data`). etcd: the key's value as a JSON string.
    Value(serde_json::Value),
    /// Reading failed (unreachable, denied, not found…): the message says why, for
    /// `config list`. The last good value stays in force.
    Failed(String),
}

/// Where a follower reports; it stops when the receiver is gone.
pub type Out = mpsc::UnboundedSender<Fetched>;

/// A connected source: one per [`SourceSpec`], shared by every path followed on it (so an
/// OpenBao login and its token renewal happen once per source, not once per path).
pub enum Client {
    Vault(Arc<vault::VaultSource>),
    Etcd(Arc<etcd::EtcdSource>),
}

impl Client {
    pub fn new(spec: SourceSpec) -> anyhow::Result<Client> {
        let spec = Arc::new(spec);
        Ok(if spec.kind.is_vault() {
            Client::Vault(vault::VaultSource::new(spec)?)
        } else {
            Client::Etcd(etcd::EtcdSource::new(spec)?)
        })
    }

    /// Follows `path` until the task is aborted or `out`'s receiver is dropped. Never returns
    /// an error: failures are reported on `out` and retried.
    pub async fn follow(&self, path: String, out: Out) {
        match self {
            Client::Vault(v) => v.clone().follow(path, out).await,
            Client::Etcd(e) => e.clone().follow(path, out).await,
        }
    }
}
