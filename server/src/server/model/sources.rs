//! Config sources as configured (`waypost config source set`): what kind of store, where, and
//! with which credentials. The clients that read them are in service/sources/.

use std::time::Duration;

/// Default refresh interval of a source (`--refresh`): how often a KV path without a lease is
/// read again.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);

/// What kind of store a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Openbao,
    Vault,
    Etcd,
}

impl SourceKind {
    pub fn parse(s: &str) -> Option<SourceKind> {
        match s.to_ascii_lowercase().as_str() {
            "openbao" | "bao" => Some(SourceKind::Openbao),
            "vault" => Some(SourceKind::Vault),
            "etcd" => Some(SourceKind::Etcd),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Openbao => "openbao",
            SourceKind::Vault => "vault",
            SourceKind::Etcd => "etcd",
        }
    }

    /// OpenBao and Vault speak the same HTTP API.
    pub fn is_vault(self) -> bool {
        matches!(self, SourceKind::Openbao | SourceKind::Vault)
    }
}

/// How the server authenticates to a source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    /// No credentials (etcd without auth).
    None,
    /// OpenBao/Vault: a token (`X-Vault-Token`), renewed with `renew-self` while renewable.
    /// etcd: `USER:PASSWORD`, exchanged for an etcd auth token.
    Token(String),
    /// OpenBao/Vault AppRole: logged in at `auth/approle/login`, the token renewed, and logged
    /// in again when it can no longer be renewed.
    Approle { role_id: String, secret_id: String },
}

/// One configured source, as the backends need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// '' = global, else the app it belongs to.
    pub scope: String,
    pub name: String,
    pub kind: SourceKind,
    /// Base URL: `http://host:port` or `https://host:port` (a path prefix is kept).
    pub addr: String,
    /// PEM CA certificate(s) trusted for https (None: the system bundle).
    pub ca_pem: Option<String>,
    pub auth: Auth,
    /// How often a path without a lease (or watch) is read again.
    pub refresh: Duration,
}
