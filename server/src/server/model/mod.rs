//! The server's plain types: ids, states and rows, shared by every layer above (see "The server
//! in layers" in docs/architecture.md). Nothing here does I/O, holds a lock, or knows how it is
//! stored or served; it may use the wire types of `waypost-proto`.

pub mod config;
pub mod domains;
pub mod labels;
pub mod logs;
pub mod members;
pub mod metrics;
pub mod sources;
pub mod template;
pub mod urlauth;

/// The 16-byte id an entrypoint makes at start and keeps across reconnects.
pub type InstanceId = [u8; 16];

/// Labels of an instance (`WAYPOST_LABELS`, merged with its token's) or of a selector: key →
/// value, sorted. Config variables may apply only where a selector matches (model/config.rs).
pub type Labels = std::collections::BTreeMap<String, String>;

/// Parses the hex form back to an id.
pub fn parse_id(hex: &str) -> Option<InstanceId> {
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

// ---- apps and tokens -----------------------------------------------------------------------

#[derive(Debug, Clone, serde::Serialize)]
pub struct App {
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    Admin,
    /// May run an entrypoint for this app (and this deployment, if set).
    Entrypoint {
        app: String,
        deployment: Option<String>,
    },
}

/// A token as `token list` shows it: never the token text (only its hash is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub hash: String,
    pub kind: String,
    pub app: Option<String>,
    pub deployment: Option<String>,
    pub created_at: i64,
    /// Labels given to every instance that connects with it (they win over the instance's own).
    pub labels: Labels,
    /// An admin token's name (`token create --admin --name`); None for entrypoint tokens.
    pub name: Option<String>,
    /// Unix ms after which the token is refused; None: it never expires.
    pub expires_at: Option<i64>,
}

impl TokenRow {
    /// Whether the token is past its expiry at `now` (unix ms).
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// What deleting a token by id (a prefix of its hash) found.
#[derive(Debug, PartialEq, Eq)]
pub enum Revoke {
    /// Deleted; its full hash, so live connections that used it can be closed.
    Done(TokenRow),
    NotFound,
    /// The prefix matches more than one token.
    Ambiguous,
    /// The last admin token that has not expired: revoking it would lock every operator out.
    LastAdmin(TokenRow),
}

// ---- instances -----------------------------------------------------------------------------

/// What the entrypoint last reported about its child (Status frames). Kept in memory while the
/// instance is live and flushed to the row periodically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildStatus {
    pub state: Option<&'static str>,
    pub child_pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub oom_killed: bool,
    pub child_rss_bytes: u64,
    pub child_cpu_ms: u64,
    pub starts: u32,
    pub config_version: u64,
    /// The entrypoint's own resident memory (bytes): what waypost costs next to the app.
    pub entrypoint_rss_bytes: u64,
}

impl ChildStatus {
    /// Folds a Status frame into the previous state. Exit details only change when the frame
    /// says EXITED, so a restarted child still shows how the previous one ended.
    pub fn apply(&mut self, s: &waypost_proto::Status) {
        use waypost_proto::status::State;
        let state = State::try_from(s.state).unwrap_or(State::Unspecified);
        self.state = match state {
            State::Unspecified => self.state,
            State::Starting => Some("starting"),
            State::Running => Some("running"),
            State::Restarting => Some("restarting"),
            State::Exited => Some("exited"),
        };
        if s.child_pid != 0 {
            self.child_pid = Some(s.child_pid);
        } else if state != State::Exited {
            self.child_pid = None;
        }
        if state == State::Exited {
            if s.exit_signal != 0 {
                self.exit_code = None;
                self.exit_signal = Some(s.exit_signal);
            } else {
                self.exit_code = Some(s.exit_code);
                self.exit_signal = None;
            }
            self.oom_killed = s.oom_killed;
        }
        self.child_rss_bytes = s.child_rss_bytes;
        if s.entrypoint_rss_bytes != 0 {
            self.entrypoint_rss_bytes = s.entrypoint_rss_bytes;
        }
        self.child_cpu_ms = s.child_cpu_ms;
        self.starts = s.starts;
        self.config_version = s.config_version;
    }

    /// The stored text of a child state back as the one `&'static str` it came from (unknown
    /// text: no state).
    pub fn state_from_text(s: Option<&str>) -> Option<&'static str> {
        match s {
            Some("starting") => Some("starting"),
            Some("running") => Some("running"),
            Some("restarting") => Some("restarting"),
            Some("exited") => Some("exited"),
            _ => None,
        }
    }
}

/// Whose a connection is: what its token allows. An instance id belongs to the owner that first
/// registered it; no other owner may take it over (see [`Owner::conflict`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub app: String,
    pub deployment: String,
    /// Hash of the token it authenticated with.
    pub token_hash: String,
}

/// Why an instance id may not be used by an owner: it is held or recorded under another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    App,
    Deployment,
    Token,
}

impl Conflict {
    /// The Reject message. It names neither the other app nor its deployment: an entrypoint
    /// must not learn anything about instances that are not its own.
    pub fn message(self, id_hex: &str) -> String {
        let whose = match self {
            Conflict::App => "another app",
            Conflict::Deployment => "another deployment of this app",
            Conflict::Token => "another token of this app",
        };
        format!("instance id {id_hex} is registered to {whose}; an instance id cannot move")
    }
}

impl Owner {
    /// Why `self` may not use an instance id held or recorded under (`app`, `deployment`,
    /// `token_hash`); None if it may (it is the same owner: a reconnect). A `token_hash` of None
    /// is a row recorded before instances were bound to their token: app and deployment decide.
    pub fn conflict(
        &self,
        app: &str,
        deployment: &str,
        token_hash: Option<&str>,
    ) -> Option<Conflict> {
        if self.app != app {
            Some(Conflict::App)
        } else if self.deployment != deployment {
            Some(Conflict::Deployment)
        } else if token_hash.is_some_and(|t| t != self.token_hash) {
            Some(Conflict::Token)
        } else {
            None
        }
    }
}

/// What a Hello tells us about a newly connected instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub id: String,
    pub app: String,
    pub deployment: String,
    pub hostname: String,
    pub entrypoint_pid: u32,
    pub entrypoint_version: String,
    /// Random per connection (see `LiveInstance::session` in service/live.rs).
    pub session: i64,
    /// Hash of the token of the Hello: with app and deployment, the owner of the id.
    pub token_hash: String,
}

impl Connected {
    pub fn owner(&self) -> Owner {
        Owner {
            app: self.app.clone(),
            deployment: self.deployment.clone(),
            token_hash: self.token_hash.clone(),
        }
    }
}

/// One row of instance history.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub id: String,
    pub app: String,
    pub deployment: String,
    pub hostname: String,
    pub entrypoint_pid: u32,
    pub entrypoint_version: String,
    pub connected_at: i64,
    pub last_seen_at: i64,
    pub disconnected_at: Option<i64>,
    pub ended: Option<String>,
    pub status: ChildStatus,
    /// The replica that holds (or, once gone, last held) its connection; None: recorded before
    /// replicas were.
    pub replica: Option<String>,
    /// Its labels as of its latest Hello: its own merged with its token's (model/labels.rs).
    pub labels: Labels,
}

/// What a flush writes for one instance: (id hex, session, last seen, status).
pub type FlushRow = (String, i64, i64, ChildStatus);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entrypoints_rss_is_kept_until_a_status_reports_a_new_one() {
        let mut st = ChildStatus::default();
        st.apply(&waypost_proto::Status {
            entrypoint_rss_bytes: 1_400_000,
            ..Default::default()
        });
        assert_eq!(st.entrypoint_rss_bytes, 1_400_000);
        // A Status without the figure (an older entrypoint, the Hello's) keeps the last one.
        st.apply(&waypost_proto::Status::default());
        assert_eq!(st.entrypoint_rss_bytes, 1_400_000);
        st.apply(&waypost_proto::Status {
            entrypoint_rss_bytes: 1_500_000,
            ..Default::default()
        });
        assert_eq!(st.entrypoint_rss_bytes, 1_500_000);
    }

    #[test]
    fn rows_without_a_token_bind_on_app_and_deployment() {
        let o = Owner {
            app: "a".into(),
            deployment: String::new(),
            token_hash: "t".into(),
        };
        assert_eq!(o.conflict("a", "", None), None);
        assert_eq!(o.conflict("a", "", Some("t")), None);
        assert_eq!(o.conflict("a", "", Some("x")), Some(Conflict::Token));
        assert_eq!(o.conflict("a", "d", None), Some(Conflict::Deployment));
        assert_eq!(o.conflict("b", "", None), Some(Conflict::App));
        let msg = Conflict::App.message("00ff");
        assert!(msg.contains("00ff") && msg.contains("another app"), "{msg}");
    }

    #[test]
    fn id_hex_round_trip() {
        let id: InstanceId = core::array::from_fn(|i| i as u8 * 17);
        assert_eq!(parse_id(&crate::util::hex(&id)), Some(id));
        assert_eq!(parse_id("zz"), None);
    }

    #[test]
    fn signal_exit_replaces_code() {
        let mut st = ChildStatus::default();
        st.apply(&waypost_proto::Status {
            state: 4,
            exit_code: 3,
            ..Default::default()
        });
        assert_eq!((st.exit_code, st.exit_signal), (Some(3), None));
        st.apply(&waypost_proto::Status {
            state: 2,
            child_pid: 7,
            ..Default::default()
        });
        assert_eq!(st.exit_code, Some(3), "a restart keeps the last exit");
        st.apply(&waypost_proto::Status {
            state: 4,
            exit_signal: 15,
            ..Default::default()
        });
        assert_eq!((st.exit_code, st.exit_signal), (None, Some(15)));
    }
}
