//! The entrypoint's settings, parsed from environment variables only (containers set env, not
//! flags). Sans-IO: [`Settings::from_vars`] takes the variables as pairs, so every rule here is
//! unit-tested without touching the process environment.
//!
//! Rules (the README's "Entrypoint settings"): a malformed value of a known variable is an error before anything is
//! spawned (exit 2); an unknown `WAYPOST_*` variable is a warning; an empty value counts as unset
//! (compose files and `docker run -e X=` produce those); legacy `WAYPOINT_*` names are aliases
//! and the `WAYPOST_*` name wins when both are set.

use crate::error::Error;
use crate::logger::Level;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::time::Duration;
use waypost_proto::{parse_duration, parse_size};

/// Default `PORT` given to the child when it has none.
pub const DEFAULT_PORT: u16 = 5000;
/// Upper bound for `WAYPOST_LOG_BUFFER`: more would only hide a server that never reads.
pub const MAX_LOG_BUFFER: u64 = 1 << 30;
/// Default `WAYPOST_FLUSH_TIMEOUT`: after the child exits, how long the server gets to take the
/// last log lines and the final status (long enough to ride out a quick server restart).
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Lower bound for `WAYPOST_LOG_BUFFER`: one longest log entry (a line cut at the 64 KiB cap;
/// the ring adds room for its header on top). Any less and a single long line could never be
/// buffered at all: every such entry would be dropped the moment it was made.
pub const MIN_LOG_BUFFER: u64 = crate::logs::LINE_CAP as u64;

/// Variables that carry credentials: never passed to the child or to exec sessions, and blanked
/// in the entrypoint's own environment once parsed. (`HTTPS_PROXY` could carry some too, but a
/// proxy URL with credentials is refused outright, so a proxy variable never holds a secret.)
pub const SECRET_VARS: [&str; 3] = [
    "WAYPOST_TOKEN",
    "WAYPOINT_CEB_INVITE_TOKEN",
    "WAYPOINT_CEB_TOKEN",
];

/// Variables for the entrypoint alone that are no secret but still never reach the child or exec
/// sessions. `WAYPOST_LABELS` describes this instance to the server; an entrypoint the app itself
/// starts (a nested one, a sidecar) would otherwise claim this instance's labels as its own.
pub const ENTRYPOINT_ONLY_VARS: [&str; 1] = ["WAYPOST_LABELS"];

/// Most labels `WAYPOST_LABELS` may set; the server (model/labels.rs) has the same cap.
pub const MAX_LABELS: usize = 16;
/// Longest label key, and longest label value, in bytes (the server's limit too).
pub const MAX_LABEL_LEN: usize = 63;

/// Most entries `WAYPOST_SERVER` may list: a handful of replicas (or one DNS name for many) is
/// the use; a longer list is a mistake, and each entry costs a slot in the link.
pub const MAX_SERVERS: usize = 32;

/// Most distinct ports `WAYPOST_URL_PORTS` may list: the list lives inline in the settings (no
/// allocation, a binary search per stream); a few services per instance is the use, and a
/// longer list is better written `*`.
pub const MAX_URL_PORTS: usize = 64;

/// `WAYPOST_URL_PORTS`: the ports on 127.0.0.1 a tunnel stream (the URL service, port-forward)
/// may reach. The app's `PORT` is always allowed, whether the server names it as 0 or by its
/// number: the list only adds ports, so unset means the app's `PORT` alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlPorts {
    /// `*`: any port.
    Any,
    /// These ports besides `PORT`. INVARIANT: sorted, no duplicates (for the binary search).
    Only(heapless::Vec<u16, MAX_URL_PORTS>),
}

impl Default for UrlPorts {
    /// Unset: the app's `PORT` alone.
    fn default() -> UrlPorts {
        UrlPorts::Only(heapless::Vec::new())
    }
}

impl UrlPorts {
    /// Whether a stream may reach `port`; `app_port`: the app's `PORT`.
    pub fn allows(&self, app_port: u16, port: u16) -> bool {
        match self {
            UrlPorts::Any => true,
            UrlPorts::Only(list) => port == app_port || list.binary_search(&port).is_ok(),
        }
    }
}

/// Where trust anchors for the server's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `WAYPOST_CA` holds PEM text itself (so a `FROM scratch` image needs no file).
    Pem(String),
    /// `WAYPOST_CA` is a path to a PEM file.
    Path(String),
    /// Unset: the system bundle, if there is one.
    System,
}

/// `host:port` of the server, split and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP literal, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

/// Everything the environment configures. Field docs name the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `WAYPOST_SERVER` (`WAYPOINT_SERVER_ADDR`): the replicas, in the order given. Empty: no
    /// server features.
    pub servers: Vec<HostPort>,
    /// `WAYPOST_TOKEN`.
    pub token: Option<String>,
    /// `WAYPOST_CA`.
    pub ca: CaSource,
    /// `WAYPOST_TLS_SKIP_VERIFY` (`WAYPOINT_SERVER_TLS_SKIP_VERIFY`).
    pub tls_skip_verify: bool,
    /// `WAYPOST_DISABLE` (`WAYPOINT_CEB_DISABLE`): init duties only.
    pub disable: bool,
    /// `WAYPOST_DISABLE_CONFIG`.
    pub disable_config: bool,
    /// `WAYPOST_DISABLE_LOGS`.
    pub disable_logs: bool,
    /// `WAYPOST_DISABLE_EXEC` (`WAYPOINT_CEB_DISABLE_EXEC`).
    pub disable_exec: bool,
    /// `WAYPOST_DISABLE_URL`.
    pub disable_url: bool,
    /// `WAYPOST_CAPTURE`: relay (and ship) the child's output even when our stdout is a
    /// terminal; the child then writes to pipes, not the terminal.
    pub capture: bool,
    /// `WAYPOST_URL_HOLD` (default on): during a config restart, hold new URL-service streams
    /// until the new child listens, and stop the old one only after its streams finish.
    pub url_hold: bool,
    /// `WAYPOST_EXEC_ALLOW`: program names or absolute paths exec may run; `None` = any.
    pub exec_allow: Option<Vec<String>>,
    /// `WAYPOST_SERVER_REQUIRED` (`WAYPOINT_CEB_SERVER_REQUIRED`).
    pub server_required: bool,
    /// `WAYPOST_STARTUP_TIMEOUT`.
    pub startup_timeout: Duration,
    /// `WAYPOST_STOP_TIMEOUT`.
    pub stop_timeout: Duration,
    /// `WAYPOST_SIGNAL_GROUP`.
    pub signal_group: bool,
    /// `WAYPOST_LOG_LEVEL` (`WAYPOINT_LOG_LEVEL`).
    pub log_level: Level,
    /// `WAYPOST_LOG_BUFFER`, bytes.
    pub log_buffer: u64,
    /// `WAYPOST_LOG_MODE`: what a full log buffer does.
    pub log_mode: crate::logs::LogMode,
    /// `WAYPOST_FLUSH_TIMEOUT`.
    pub flush_timeout: Duration,
    /// `PORT`: the app's port for the URL service.
    pub port: u16,
    /// Whether `PORT` was set; if not, the child gets `PORT=5000`.
    pub port_set: bool,
    /// `WAYPOST_URL_PORTS`: the ports streams may reach besides `port`.
    pub url_ports: UrlPorts,
    /// `HTTPS_PROXY` / `https_proxy`.
    pub https_proxy: Option<HostPort>,
    /// `NO_PROXY` / `no_proxy`: comma-separated hosts or domain suffixes that bypass the proxy.
    pub no_proxy: Vec<String>,
    /// `WAYPOST_LABELS`: this instance's labels, sent in every Hello.
    pub labels: BTreeMap<String, String>,
    /// Unknown `WAYPOST_*` variables, to be warned about once logging is up.
    pub unknown: Vec<String>,
}

impl Settings {
    /// Whether the server connection is wanted at all.
    pub fn server_enabled(&self) -> bool {
        !self.servers.is_empty() && !self.disable
    }

    /// Parses the variables (typically `std::env::vars_os()`).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Settings, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let vars: Vec<(OsString, OsString)> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .collect();
        let env = Env { vars: &vars };
        let unknown: Vec<String> = vars
            .iter()
            .filter_map(|(k, _)| k.to_str())
            .filter(|k| k.starts_with("WAYPOST_") && !KNOWN.contains(k))
            .map(str::to_owned)
            .collect();

        let servers = match env.get("WAYPOST_SERVER", Some("WAYPOINT_SERVER_ADDR"))? {
            Some((name, v)) => parse_server_list(&v).map_err(|why| Error::Env { name, why })?,
            None => Vec::new(),
        };
        let ca = match env.get("WAYPOST_CA", None)? {
            None => CaSource::System,
            Some((_, v)) if v.trim_start().starts_with("-----BEGIN") => CaSource::Pem(v),
            // The one-line form `waypost token create -o env` prints: base64 of the PEM text
            // ("-----BEGIN" encodes to "LS0tLS1CRUdJTi"), safe in env files and shells alike.
            Some((name, v)) if v.trim_start().starts_with("LS0tLS1CRUdJTi") => {
                let pem =
                    waypost_proto::base64::decode(v.trim()).and_then(|b| String::from_utf8(b).ok());
                CaSource::Pem(pem.ok_or(Error::Env {
                    name,
                    why: "looks like base64-encoded PEM but does not decode".into(),
                })?)
            }
            Some((_, v)) => CaSource::Path(v),
        };
        let exec_allow = env.get("WAYPOST_EXEC_ALLOW", None)?.map(|(name, v)| {
            let list: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if list.is_empty() {
                Err(Error::Env {
                    name,
                    why: "lists no program".into(),
                })
            } else {
                Ok(list)
            }
        });
        let (port, port_set) = match env.get("PORT", None)? {
            None => (DEFAULT_PORT, false),
            Some((name, v)) => match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => (p, true),
                _ => {
                    return Err(Error::Env {
                        name,
                        why: format!("{v:?} is not a TCP port (1-65535)"),
                    });
                }
            },
        };
        let https_proxy = match env.get("HTTPS_PROXY", Some("https_proxy"))? {
            None => None,
            Some((name, v)) => Some(parse_proxy(&v).map_err(|why| Error::Env { name, why })?),
        };
        let no_proxy = env
            .get("NO_PROXY", Some("no_proxy"))?
            .map(|(_, v)| {
                v.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let url_ports = match env.get("WAYPOST_URL_PORTS", None)? {
            Some((name, v)) => parse_url_ports(&v).map_err(|why| Error::Env { name, why })?,
            None => UrlPorts::default(),
        };
        let labels = match env.get("WAYPOST_LABELS", None)? {
            Some((name, v)) => parse_labels(&v).map_err(|why| Error::Env { name, why })?,
            None => BTreeMap::new(),
        };

        Ok(Settings {
            servers,
            token: env.get("WAYPOST_TOKEN", None)?.map(|(_, v)| v),
            ca,
            tls_skip_verify: env.flag(
                "WAYPOST_TLS_SKIP_VERIFY",
                Some("WAYPOINT_SERVER_TLS_SKIP_VERIFY"),
            )?,
            disable: env.flag("WAYPOST_DISABLE", Some("WAYPOINT_CEB_DISABLE"))?,
            disable_config: env.flag("WAYPOST_DISABLE_CONFIG", None)?,
            disable_logs: env.flag("WAYPOST_DISABLE_LOGS", None)?,
            disable_exec: env.flag("WAYPOST_DISABLE_EXEC", Some("WAYPOINT_CEB_DISABLE_EXEC"))?,
            disable_url: env.flag("WAYPOST_DISABLE_URL", None)?,
            url_hold: env.get("WAYPOST_URL_HOLD", None)?.is_none()
                || env.flag("WAYPOST_URL_HOLD", None)?,
            capture: env.flag("WAYPOST_CAPTURE", None)?,
            exec_allow: exec_allow.transpose()?,
            server_required: env.flag(
                "WAYPOST_SERVER_REQUIRED",
                Some("WAYPOINT_CEB_SERVER_REQUIRED"),
            )?,
            startup_timeout: env.duration("WAYPOST_STARTUP_TIMEOUT", Duration::from_secs(5))?,
            stop_timeout: env.duration("WAYPOST_STOP_TIMEOUT", Duration::from_secs(30))?,
            signal_group: env.flag("WAYPOST_SIGNAL_GROUP", None)?,
            log_level: match env.get("WAYPOST_LOG_LEVEL", Some("WAYPOINT_LOG_LEVEL"))? {
                None => Level::Debug,
                Some((name, v)) => Level::parse(&v).ok_or_else(|| Error::Env {
                    name,
                    why: format!("{v:?} is not one of TRACE, DEBUG, INFO, WARN, ERROR"),
                })?,
            },
            log_buffer: match env.get("WAYPOST_LOG_BUFFER", None)? {
                None => 1 << 20,
                Some((name, v)) => match parse_size(&v) {
                    Ok(n) if (MIN_LOG_BUFFER..=MAX_LOG_BUFFER).contains(&n) => n,
                    Ok(n) if n < MIN_LOG_BUFFER => {
                        return Err(Error::Env {
                            name,
                            why: format!("{v:?} is below the 64KiB minimum (one longest log line)"),
                        });
                    }
                    Ok(_) => {
                        return Err(Error::Env {
                            name,
                            why: format!("{v:?} is over the 1GiB limit"),
                        });
                    }
                    Err(why) => return Err(Error::Env { name, why }),
                },
            },
            log_mode: match env.get("WAYPOST_LOG_MODE", None)? {
                None => crate::logs::LogMode::Drop,
                Some((name, v)) => crate::logs::LogMode::parse(&v).ok_or_else(|| Error::Env {
                    name,
                    why: format!("{v:?} is not drop or block"),
                })?,
            },
            flush_timeout: env.duration("WAYPOST_FLUSH_TIMEOUT", DEFAULT_FLUSH_TIMEOUT)?,
            port,
            port_set,
            url_ports,
            https_proxy,
            no_proxy,
            labels,
            unknown,
        })
    }

    /// Whether `NO_PROXY` exempts `host` from the proxy (exact match, domain suffix, or `*`).
    pub fn bypasses_proxy(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.no_proxy.iter().any(|rule| {
            let rule = rule.trim_start_matches('.');
            rule == "*"
                || host == rule
                || host
                    .strip_suffix(rule)
                    .is_some_and(|head| head.ends_with('.'))
        })
    }
}

/// Every variable this version reads, for the unknown-variable warning.
pub(crate) const KNOWN: [&str; 23] = [
    "WAYPOST_SERVER",
    "WAYPOST_TOKEN",
    "WAYPOST_CA",
    "WAYPOST_TLS_SKIP_VERIFY",
    "WAYPOST_DISABLE",
    "WAYPOST_DISABLE_CONFIG",
    "WAYPOST_DISABLE_LOGS",
    "WAYPOST_DISABLE_EXEC",
    "WAYPOST_DISABLE_URL",
    "WAYPOST_URL_HOLD",
    "WAYPOST_CAPTURE",
    "WAYPOST_EXEC_ALLOW",
    "WAYPOST_SERVER_REQUIRED",
    "WAYPOST_STARTUP_TIMEOUT",
    "WAYPOST_STOP_TIMEOUT",
    "WAYPOST_SIGNAL_GROUP",
    "WAYPOST_LOG_LEVEL",
    "WAYPOST_LOG_BUFFER",
    "WAYPOST_LOG_MODE",
    "WAYPOST_FLUSH_TIMEOUT",
    "WAYPOST_LABELS",
    "WAYPOST_URL_PORTS",
    // Read by the server-side CLI, harmless here; not worth a warning.
    "WAYPOST_DATA_DIR",
];

struct Env<'a> {
    vars: &'a [(OsString, OsString)],
}

impl Env<'_> {
    fn raw(&self, name: &str) -> Option<&OsStr> {
        // The last occurrence wins, as with getenv on a duplicated environment.
        self.vars
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_os_str())
    }

    /// The value of `name`, else of its legacy `alias`, with the name actually used. Empty = unset.
    fn get(
        &self,
        name: &'static str,
        alias: Option<&'static str>,
    ) -> Result<Option<(&'static str, String)>, Error> {
        for n in std::iter::once(name).chain(alias) {
            if let Some(v) = self.raw(n) {
                if v.is_empty() {
                    continue;
                }
                let v = v.to_str().ok_or(Error::Env {
                    name: n,
                    why: "is not valid UTF-8".into(),
                })?;
                return Ok(Some((n, v.to_owned())));
            }
        }
        Ok(None)
    }

    fn flag(&self, name: &'static str, alias: Option<&'static str>) -> Result<bool, Error> {
        match self.get(name, alias)? {
            None => Ok(false),
            Some((n, v)) => parse_bool(&v).ok_or_else(|| Error::Env {
                name: n,
                why: format!("{v:?} is not a boolean ({BOOL_WORDS})"),
            }),
        }
    }

    fn duration(&self, name: &'static str, default: Duration) -> Result<Duration, Error> {
        match self.get(name, None)? {
            None => Ok(default),
            Some((n, v)) => parse_duration(&v).map_err(|why| Error::Env { name: n, why }),
        }
    }
}

/// What [`parse_bool`] accepts, as the error message lists it.
pub const BOOL_WORDS: &str = "1/0, true/false, yes/no, on/off, any case";

/// `1/0`, `true/false`, `yes/no`, `on/off`, any case ([`BOOL_WORDS`]: keep the two in step).
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `host:port`, `[v6]:port`.
/// `host:port[,host:port...]`: the replicas to try, in order (docs/protocol.md, "Reconnect
/// backoff"). An empty entry is an error (a stray comma usually means a name went missing).
pub fn parse_server_list(s: &str) -> Result<Vec<HostPort>, String> {
    let entries: Vec<&str> = s.split(',').collect();
    if entries.len() > MAX_SERVERS {
        return Err(format!(
            "lists {} servers; at most {MAX_SERVERS}",
            entries.len()
        ));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if e.trim().is_empty() {
                Err(format!("{s:?}: entry {} is empty", i + 1))
            } else {
                parse_host_port(e)
            }
        })
        .collect()
}

/// `*` or `port[,port...]` (`WAYPOST_URL_PORTS`): ports 1-65535, spaces around an entry ignored,
/// duplicates merged, at most [`MAX_URL_PORTS`] distinct. An empty entry is an error (a stray
/// comma usually means a port went missing), and so is `*` inside a list.
pub fn parse_url_ports(s: &str) -> Result<UrlPorts, String> {
    if s.trim() == "*" {
        return Ok(UrlPorts::Any);
    }
    let mut list = heapless::Vec::new();
    for (i, entry) in s.split(',').map(str::trim).enumerate() {
        let port = match entry.parse::<u16>() {
            Ok(p) if p > 0 => p,
            // One message site for every bad entry: each format! costs binary size.
            _ => {
                let why = match entry {
                    "" => "is empty (a stray comma?)",
                    "*" => "is * (any port), which stands alone, not in a list",
                    _ => "is not a TCP port (1-65535)",
                };
                return Err(format!("entry {} {entry:?} {why}", i + 1));
            }
        };
        if let Err(at) = list.binary_search(&port) {
            list.insert(at, port)
                .map_err(|_| format!("lists more than {MAX_URL_PORTS} ports (use * for any)"))?;
        }
    }
    Ok(UrlPorts::Only(list))
}

/// `k=v,k2=v2` (`WAYPOST_LABELS`): a key is 1-63 characters of `A-Z a-z 0-9 . _ / -` starting
/// with a letter or digit, a value 0-63 characters of those and `:`; at most [`MAX_LABELS`], no
/// key twice. Spaces around an entry are ignored. The server applies the same rules
/// (server/src/server/model/labels.rs) and drops a label that breaks them.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let n = s.split(',').count();
    if n > MAX_LABELS {
        return Err(format!("lists {n} labels; at most {MAX_LABELS}"));
    }
    let mut labels = BTreeMap::new();
    for entry in s.split(',').map(str::trim) {
        // One message site for every problem of an entry: each format! costs binary size.
        let why = match entry.split_once('=') {
            None if entry.is_empty() => "is empty (a stray comma?)",
            None => "is not key=value",
            Some((k, v)) => match check_label(k, v) {
                Err(why) => why,
                Ok(()) if labels.insert(k.to_owned(), v.to_owned()).is_some() => {
                    "repeats the key of an earlier label"
                }
                Ok(()) => continue,
            },
        };
        return Err(format!("label {entry:?} {why}"));
    }
    Ok(labels)
}

/// One label against the rules of [`parse_labels`]: what is wrong with it, if anything.
fn check_label(k: &str, v: &str) -> Result<(), &'static str> {
    let key_char = |b: u8| b.is_ascii_alphanumeric() || b"._/-".contains(&b);
    if k.is_empty() {
        Err("has an empty key")
    } else if k.len() > MAX_LABEL_LEN {
        Err("has a key longer than 63 characters")
    } else if !k.as_bytes()[0].is_ascii_alphanumeric() {
        Err("has a key that does not start with a letter or digit")
    } else if !k.bytes().all(key_char) {
        Err("has a key with characters other than letters, digits and . _ / -")
    } else if v.len() > MAX_LABEL_LEN {
        Err("has a value longer than 63 characters")
    } else if !v.bytes().all(|b| key_char(b) || b == b':') {
        Err("has a value with characters other than letters, digits and . _ : / -")
    } else {
        Ok(())
    }
}

pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    let t = s.trim();
    let bad = |what: &str| format!("{s:?} is not host:port ({what})");
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let (h, p) = rest.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        (h, p.strip_prefix(':').ok_or_else(|| bad("no port"))?)
    } else {
        t.rsplit_once(':').ok_or_else(|| bad("no port"))?
    };
    if host.is_empty() || host.contains(['/', ' ']) || (host.contains(':') && !t.starts_with('[')) {
        return Err(bad("bad host"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| bad("bad port"))?;
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

/// `http://host:port`, `host:port` (and a trailing `/`). Only plain-HTTP CONNECT proxies.
fn parse_proxy(s: &str) -> Result<HostPort, String> {
    let t = s.trim();
    if t.starts_with("https://") || t.starts_with("socks") {
        return Err(format!("{s:?}: only http:// CONNECT proxies are supported"));
    }
    let t = t.strip_prefix("http://").unwrap_or(t).trim_end_matches('/');
    if t.contains('@') {
        return Err(format!("{s:?}: proxy credentials are not supported"));
    }
    // A proxy without a port means the HTTP default.
    if !t.contains(':') || t.ends_with(']') {
        return parse_host_port(&format!("{t}:80"));
    }
    parse_host_port(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Settings, Error> {
        Settings::from_vars(vars.iter().copied())
    }

    fn env_error(vars: &[(&str, &str)]) -> String {
        match parse(vars) {
            Err(e @ Error::Env { .. }) => e.to_string(),
            other => panic!("expected an env error, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let s = parse(&[("HOME", "/root")]).unwrap();
        assert_eq!(s.servers, []);
        assert!(!s.server_enabled());
        assert_eq!(s.startup_timeout, Duration::from_secs(5));
        assert_eq!(s.stop_timeout, Duration::from_secs(30));
        assert_eq!(s.log_level, Level::Debug);
        assert_eq!(s.log_buffer, 1 << 20);
        assert_eq!((s.port, s.port_set), (5000, false));
        assert_eq!(s.ca, CaSource::System);
        assert_eq!(s.exec_allow, None);
        assert!(s.url_hold);
        assert!(s.unknown.is_empty());
        assert!(!parse(&[("WAYPOST_URL_HOLD", "0")]).unwrap().url_hold);
    }

    #[test]
    fn durations() {
        // The one duration syntax (waypost_proto::parse_duration, tested there), for every
        // duration variable; a malformed value names the variable.
        for name in [
            "WAYPOST_STARTUP_TIMEOUT",
            "WAYPOST_STOP_TIMEOUT",
            "WAYPOST_FLUSH_TIMEOUT",
        ] {
            let field = |s: Settings| match name {
                "WAYPOST_STARTUP_TIMEOUT" => s.startup_timeout,
                "WAYPOST_STOP_TIMEOUT" => s.stop_timeout,
                _ => s.flush_timeout,
            };
            for (v, want) in [
                ("500ms", Duration::from_millis(500)),
                ("1.5s", Duration::from_millis(1500)),
                ("17", Duration::from_secs(17)),
                ("1d", Duration::from_secs(86_400)),
                (" 1m30s ", Duration::from_secs(90)),
            ] {
                assert_eq!(field(parse(&[(name, v)]).unwrap()), want, "{name}={v}");
            }
            for v in ["abc", " ", "5x", "-1s", "1m30", "99999999999999999h"] {
                let e = env_error(&[(name, v)]);
                assert!(
                    e.contains(name) && e.contains("is not a duration"),
                    "{name}={v:?}: {e}"
                );
            }
        }
    }

    #[test]
    fn booleans() {
        for s in ["1", "true", "TRUE", "yes", "on"] {
            assert_eq!(parse_bool(s), Some(true));
        }
        for s in ["0", "false", "False", "no", "off"] {
            assert_eq!(parse_bool(s), Some(false));
        }
        assert_eq!(parse_bool("2"), None);
        let e = env_error(&[("WAYPOST_SIGNAL_GROUP", "maybe")]);
        assert!(e.contains("WAYPOST_SIGNAL_GROUP"), "{e}");
        // The message lists exactly the accepted words: every one it names parses, both ways.
        let listed: Vec<&str> = BOOL_WORDS
            .split(", ")
            .filter(|w| w.contains('/'))
            .flat_map(|w| w.split('/'))
            .collect();
        assert_eq!(listed.len(), 8, "{BOOL_WORDS}");
        for w in listed {
            assert!(e.contains(w), "{e} should list {w}");
            assert!(
                parse_bool(w).is_some() && parse_bool(&w.to_ascii_uppercase()).is_some(),
                "{w}"
            );
        }
    }

    #[test]
    fn malformed_values_name_the_variable() {
        let e = env_error(&[("WAYPOST_STARTUP_TIMEOUT", "abc")]);
        assert!(
            e.contains("WAYPOST_STARTUP_TIMEOUT") && e.contains("abc"),
            "{e}"
        );
        assert!(env_error(&[("WAYPOST_STOP_TIMEOUT", "forever")]).contains("WAYPOST_STOP_TIMEOUT"));
        assert!(env_error(&[("WAYPOST_LOG_LEVEL", "LOUD")]).contains("TRACE"));
        assert!(env_error(&[("WAYPOST_LOG_BUFFER", "lots")]).contains("WAYPOST_LOG_BUFFER"));
        assert!(env_error(&[("WAYPOST_LOG_BUFFER", "2GiB")]).contains("limit"));
        assert!(env_error(&[("WAYPOST_LOG_BUFFER", "1")]).contains("minimum"));
        assert!(env_error(&[("WAYPOST_LOG_BUFFER", "65535")]).contains("minimum"));
        assert_eq!(
            parse(&[("WAYPOST_LOG_BUFFER", "64KiB")])
                .unwrap()
                .log_buffer,
            MIN_LOG_BUFFER
        );
        assert!(env_error(&[("WAYPOST_SERVER", "nohost")]).contains("host:port"));
        assert!(env_error(&[("WAYPOST_SERVER", "h:99999")]).contains("port"));
        assert!(env_error(&[("PORT", "http")]).contains("PORT"));
        assert!(env_error(&[("PORT", "0")]).contains("PORT"));
        assert!(env_error(&[("WAYPOST_EXEC_ALLOW", " , ")]).contains("WAYPOST_EXEC_ALLOW"));
        assert!(env_error(&[("HTTPS_PROXY", "socks5://p:1080")]).contains("HTTPS_PROXY"));
    }

    #[test]
    fn legacy_aliases_and_precedence() {
        let s = parse(&[
            ("WAYPOINT_SERVER_ADDR", "old:1"),
            ("WAYPOINT_SERVER_TLS_SKIP_VERIFY", "true"),
            ("WAYPOINT_CEB_DISABLE_EXEC", "1"),
            ("WAYPOINT_CEB_SERVER_REQUIRED", "1"),
            ("WAYPOINT_LOG_LEVEL", "warn"),
        ])
        .unwrap();
        assert_eq!(
            s.servers,
            [HostPort {
                host: "old".into(),
                port: 1
            }]
        );
        assert!(s.tls_skip_verify && s.disable_exec && s.server_required);
        assert_eq!(s.log_level, Level::Warn);
        assert!(parse(&[("WAYPOINT_CEB_DISABLE", "1")]).unwrap().disable);

        let s = parse(&[
            ("WAYPOINT_SERVER_ADDR", "old:1"),
            ("WAYPOST_SERVER", "new:2"),
            ("WAYPOINT_LOG_LEVEL", "warn"),
            ("WAYPOST_LOG_LEVEL", "error"),
        ])
        .unwrap();
        assert_eq!(
            s.servers,
            [HostPort {
                host: "new".into(),
                port: 2
            }]
        );
        assert_eq!(s.log_level, Level::Error);
        // A malformed legacy value is still an error, named by its own name.
        assert!(env_error(&[("WAYPOINT_CEB_DISABLE", "sure")]).contains("WAYPOINT_CEB_DISABLE"));
    }

    #[test]
    fn log_mode_and_flush_timeout() {
        let s = parse(&[]).unwrap();
        assert_eq!(
            (s.log_mode, s.flush_timeout),
            (crate::logs::LogMode::Drop, DEFAULT_FLUSH_TIMEOUT)
        );
        let s = parse(&[
            ("WAYPOST_LOG_MODE", "BLOCK"),
            ("WAYPOST_FLUSH_TIMEOUT", "0s"),
        ])
        .unwrap();
        assert_eq!(
            (s.log_mode, s.flush_timeout),
            (crate::logs::LogMode::Block, Duration::ZERO)
        );
        assert_eq!(
            parse(&[("WAYPOST_FLUSH_TIMEOUT", "1m30s")])
                .unwrap()
                .flush_timeout,
            Duration::from_secs(90)
        );
        let e = env_error(&[("WAYPOST_LOG_MODE", "blocking")]);
        assert!(
            e.contains("WAYPOST_LOG_MODE") && e.contains("drop or block"),
            "{e}"
        );
        let e = env_error(&[("WAYPOST_FLUSH_TIMEOUT", "soon")]);
        assert!(
            e.contains("WAYPOST_FLUSH_TIMEOUT") && e.contains("soon"),
            "{e}"
        );
        assert!(
            parse(&[
                ("WAYPOST_LOG_MODE", "drop"),
                ("WAYPOST_FLUSH_TIMEOUT", "5s")
            ])
            .unwrap()
            .unknown
            .is_empty()
        );
    }

    #[test]
    fn empty_is_unset() {
        let s = parse(&[
            ("WAYPOST_SERVER", ""),
            ("WAYPOST_STOP_TIMEOUT", ""),
            ("PORT", ""),
        ])
        .unwrap();
        assert_eq!(s.servers, []);
        assert_eq!(s.stop_timeout, Duration::from_secs(30));
        assert!(!s.port_set);
    }

    #[test]
    fn unknown_waypost_variables_are_collected() {
        let s = parse(&[
            ("WAYPOST_SERVR", "x:1"),
            ("WAYPOST_STOP_TIMEOUT", "1s"),
            ("WAYPOINT_SOMETHING", "1"),
        ])
        .unwrap();
        assert_eq!(s.unknown, vec!["WAYPOST_SERVR".to_string()]);
    }

    #[test]
    fn server_lists() {
        let hp = |h: &str, p| HostPort {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            parse(&[("WAYPOST_SERVER", "a:1, [::1]:2 ,c.example:3")])
                .unwrap()
                .servers,
            [hp("a", 1), hp("::1", 2), hp("c.example", 3)]
        );
        // The legacy name takes a list too.
        assert_eq!(
            parse(&[("WAYPOINT_SERVER_ADDR", "a:1,b:2")])
                .unwrap()
                .servers,
            [hp("a", 1), hp("b", 2)]
        );
        for (bad, why) in [
            ("a:1,", "entry 2 is empty"),
            (",a:1", "entry 1 is empty"),
            ("a:1,,b:2", "entry 2 is empty"),
            ("a:1, ,b:2", "entry 2 is empty"),
            ("a:1,b:0", "bad port"),
            ("a:1,b:x", "bad port"),
            ("a:1,b", "no port"),
        ] {
            let e = env_error(&[("WAYPOST_SERVER", bad)]);
            assert!(
                e.contains("WAYPOST_SERVER") && e.contains(why),
                "{bad}: {e}"
            );
        }
        let long = vec!["h:1"; MAX_SERVERS + 1].join(",");
        assert!(env_error(&[("WAYPOST_SERVER", &long)]).contains("at most"));
        let max = vec!["h:1"; MAX_SERVERS].join(",");
        assert_eq!(
            parse(&[("WAYPOST_SERVER", &max)]).unwrap().servers.len(),
            MAX_SERVERS
        );
    }

    #[test]
    fn server_addresses() {
        assert_eq!(
            parse_host_port("127.0.0.1:9701"),
            Ok(HostPort {
                host: "127.0.0.1".into(),
                port: 9701
            })
        );
        assert_eq!(
            parse_host_port("[::1]:9701"),
            Ok(HostPort {
                host: "::1".into(),
                port: 9701
            })
        );
        assert_eq!(
            parse_host_port("waypost.example.com:443"),
            Ok(HostPort {
                host: "waypost.example.com".into(),
                port: 443
            })
        );
        for bad in [
            "::1:9701", ":9701", "host:", "host", "[::1]", "a b:1", "h:0",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ca_inline_or_path() {
        let pem = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n";
        assert_eq!(
            parse(&[("WAYPOST_CA", pem)]).unwrap().ca,
            CaSource::Pem(pem.into())
        );
        assert_eq!(
            parse(&[("WAYPOST_CA", "/etc/ca.pem")]).unwrap().ca,
            CaSource::Path("/etc/ca.pem".into())
        );
    }

    #[test]
    fn ca_as_base64_of_pem() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        // base64 of `pem`, as `waypost token create -o env` prints it.
        let b64 =
            "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo=";
        assert_eq!(
            parse(&[("WAYPOST_CA", b64)]).unwrap().ca,
            CaSource::Pem(pem.into())
        );
        assert!(env_error(&[("WAYPOST_CA", "LS0tLS1CRUdJTi!!")]).contains("base64"));
        // Padding optional, whitespace ignored (waypost_proto::base64, tested there).
        assert_eq!(
            parse(&[("WAYPOST_CA", &b64.replace('=', ""))]).unwrap().ca,
            CaSource::Pem(pem.into())
        );
        let wrapped: String = b64
            .as_bytes()
            .chunks(20)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            parse(&[("WAYPOST_CA", &wrapped)]).unwrap().ca,
            CaSource::Pem(pem.into())
        );
    }

    #[test]
    fn exec_allow_and_proxy() {
        let s = parse(&[
            ("WAYPOST_EXEC_ALLOW", "sh, /bin/ls,,"),
            ("HTTPS_PROXY", "http://proxy:3128/"),
            ("NO_PROXY", "localhost, .internal"),
        ])
        .unwrap();
        assert_eq!(s.exec_allow, Some(vec!["sh".into(), "/bin/ls".into()]));
        assert_eq!(
            s.https_proxy,
            Some(HostPort {
                host: "proxy".into(),
                port: 3128
            })
        );
        assert!(s.bypasses_proxy("localhost"));
        assert!(s.bypasses_proxy("svc.internal"));
        assert!(!s.bypasses_proxy("internal.example"));
        assert!(!s.bypasses_proxy("example.com"));
        assert_eq!(
            parse(&[("https_proxy", "proxy")]).unwrap().https_proxy,
            Some(HostPort {
                host: "proxy".into(),
                port: 80
            })
        );
    }

    #[test]
    fn labels() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(parse(&[]).unwrap().labels, map(&[]));
        // Empty counts as unset, like every variable.
        assert_eq!(parse(&[("WAYPOST_LABELS", "")]).unwrap().labels, map(&[]));
        assert_eq!(
            parse(&[("WAYPOST_LABELS", "env=prod, tier=web ,empty=")])
                .unwrap()
                .labels,
            map(&[("env", "prod"), ("tier", "web"), ("empty", "")])
        );
        // Every allowed character, at the longest lengths.
        let key = format!("a.b_c/d-E9{}", "k".repeat(MAX_LABEL_LEN - 10));
        let value = format!("x.y_z:/-Q0{}", "v".repeat(MAX_LABEL_LEN - 10));
        assert_eq!(
            parse_labels(&format!("{key}={value}")),
            Ok(map(&[(&key, &value)]))
        );
        let sixteen: Vec<String> = (0..MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        assert_eq!(parse_labels(&sixteen.join(",")).unwrap().len(), MAX_LABELS);
        assert!(
            !parse(&[("WAYPOST_LABELS", "a=b")])
                .unwrap()
                .unknown
                .contains(&"WAYPOST_LABELS".to_string())
        );

        let seventeen: Vec<String> = (0..=MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        for (bad, why) in [
            ("env", "label \"env\" is not key=value"),
            ("a=b,=c", "label \"=c\" has an empty key"),
            (
                "a=b,a=c",
                "label \"a=c\" repeats the key of an earlier label",
            ),
            (&seventeen.join(","), "lists 17 labels; at most 16"),
            ("a=b,", "label \"\" is empty"),
            (" ", "label \"\" is empty"),
            ("-a=b", "does not start with a letter or digit"),
            ("a b=c", "has a key with characters other than"),
            ("a:b=c", "has a key with characters other than"),
            ("a=b c", "has a value with characters other than"),
            ("a=b=c", "has a value with characters other than"),
            ("a=é", "has a value with characters other than"),
            (&format!("{}=v", "k".repeat(64)), "key longer than 63"),
            (&format!("k={}", "v".repeat(64)), "value longer than 63"),
        ] {
            let e = env_error(&[("WAYPOST_LABELS", bad)]);
            assert!(
                e.starts_with("WAYPOST_LABELS: ") && e.contains(why),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn url_ports() {
        let only = |ports: &[u16]| UrlPorts::Only(heapless::Vec::from_slice(ports).unwrap());
        // Unset (or empty): the app's PORT alone.
        let s = parse(&[]).unwrap();
        assert_eq!(s.url_ports, only(&[]));
        assert!(s.url_ports.allows(5000, 5000));
        assert!(!s.url_ports.allows(5000, 22));
        assert_eq!(
            parse(&[("WAYPOST_URL_PORTS", "")]).unwrap().url_ports,
            only(&[])
        );
        let s = parse(&[("PORT", "8080")]).unwrap();
        assert!(s.url_ports.allows(s.port, 8080) && !s.url_ports.allows(s.port, 5000));
        // Sorted, duplicates merged, spaces ignored.
        let s = parse(&[("WAYPOST_URL_PORTS", " 9090, 22 ,9090,65535,1")]).unwrap();
        assert_eq!(s.url_ports, only(&[1, 22, 9090, 65535]));
        assert!(s.unknown.is_empty(), "a known variable: {:?}", s.unknown);
        // The list adds ports: PORT stays allowed.
        for p in [5000, 1, 22, 9090, 65535] {
            assert!(s.url_ports.allows(5000, p), "{p}");
        }
        for p in [2, 21, 23, 8080, 65534] {
            assert!(!s.url_ports.allows(5000, p), "{p}");
        }
        for any in ["*", " * "] {
            let s = parse(&[("WAYPOST_URL_PORTS", any)]).unwrap();
            assert_eq!(s.url_ports, UrlPorts::Any);
            assert!(s.url_ports.allows(5000, 1) && s.url_ports.allows(5000, 65535));
        }
        // The cap counts distinct ports.
        let max: Vec<String> = (1..=MAX_URL_PORTS).map(|p| p.to_string()).collect();
        let twice = format!("{0},{0}", max.join(","));
        match parse(&[("WAYPOST_URL_PORTS", &twice)]).unwrap().url_ports {
            UrlPorts::Only(list) => assert_eq!(list.len(), MAX_URL_PORTS),
            other => panic!("{other:?}"),
        }
        let over = format!("{},{}", max.join(","), MAX_URL_PORTS + 1);

        for (bad, why) in [
            ("abc", "entry 1 \"abc\" is not a TCP port (1-65535)"),
            ("0", "entry 1 \"0\" is not a TCP port"),
            ("70000", "entry 1 \"70000\" is not a TCP port"),
            ("80,-1", "entry 2 \"-1\" is not a TCP port"),
            ("80 443", "entry 1 \"80 443\" is not a TCP port"),
            ("1,,2", "entry 2 \"\" is empty"),
            ("1,", "entry 2 \"\" is empty"),
            (" ", "entry 1 \"\" is empty"),
            ("*,80", "entry 1 \"*\" is * (any port), which stands alone"),
            ("80,*", "entry 2 \"*\" is * (any port), which stands alone"),
            (&over, "lists more than 64 ports (use * for any)"),
        ] {
            let e = env_error(&[("WAYPOST_URL_PORTS", bad)]);
            assert!(
                e.starts_with("WAYPOST_URL_PORTS: ") && e.contains(why),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn non_utf8_value_is_a_clear_error() {
        use std::os::unix::ffi::OsStrExt;
        let v = OsStr::from_bytes(b"\xff5s");
        let e = Settings::from_vars([(OsStr::new("WAYPOST_STOP_TIMEOUT"), v)]).unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }
}
