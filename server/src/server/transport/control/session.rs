//! One control connection's protocol, sans-IO: Hello admission and frame dispatch. It takes
//! frames, lookup results and the time (`handle_*`, `now` passed in) and returns what to do
//! ([`ControlSession::poll_action`]); it never touches a socket, the store or the clock. The
//! connection task in `mod.rs` does the I/O and carries the actions out.
//!
//! Admission, in order: protocol version → token (looked up by its hash: unknown → BAD_TOKEN,
//! admin → FORBIDDEN) → a 16-byte instance id → the claim on that id (another owner's →
//! FORBIDDEN; see `claim` in `mod.rs`) → Welcome. Before the Hello is admitted a frame may be at
//! most [`FIRST_FRAME_CAP`] bytes and the whole phase, TLS handshake included, has one deadline
//! ([`PREAUTH_TIMEOUT`]); the first frame must be a Hello (frames of unknown kind are skipped).
//! Once admitted: Ping → Pong, Status → instance state, ConfigApplied → config service,
//! LogBatch → log service, exec/tunnel frames → the mux; every frame counts as liveness, and
//! three heartbeat intervals of silence close the connection.

use crate::server::model::{Connected, InstanceId, Owner, TokenScope};
use crate::server::service::auth;
use crate::util;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use waypost_proto::{self as proto, Frame, Kind, MAX_FRAME, reject::Reason};

/// Time from accept until the Hello has arrived: the TLS handshake and the Hello share it, so an
/// unauthenticated connection lives at most this long whatever it does (a slow-loris handshake, a
/// Hello sent a byte at a time). A real entrypoint sends its Hello right after the handshake.
pub const PREAUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame accepted before a Hello is admitted. A Hello is a token (~50 bytes), a 16-byte
/// instance id, a host name and version (kept to 255 bytes each), a pid, a few flags and a
/// Status: well under 1 KiB from a real entrypoint. 8 KiB leaves room for long host names and
/// later fields, while a client nobody has authenticated cannot make the server hold a 1 MiB
/// frame. Checked from the length prefix, before the body is read.
pub const FIRST_FRAME_CAP: usize = 8 * 1024;
/// Retry hint sent with BAD_TOKEN / FORBIDDEN rejects: a misconfigured entrypoint should not
/// hammer the server.
pub const REJECT_RETRY_MS: u32 = 5000;
/// Retry hint when the server could not decide (a database error).
const UNAVAILABLE_RETRY_MS: u32 = 1000;
/// Longest host name / version string kept from a Hello.
pub const MAX_LABEL: usize = 255;
/// Heartbeat intervals of silence after which an admitted connection is closed.
const SILENT_HEARTBEATS: u32 = 3;
/// Actions queued at most by one input (a Ping: Touch + Reply); a small fixed bound.
const ACTIONS_CAP: usize = 4;

/// What the connection task must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Look the Hello's token up by its hash and give the scope to
    /// [`ControlSession::handle_token`].
    LookupToken {
        hash: String,
    },
    /// Bind the instance id to its owner and register the connection; give the outcome to
    /// [`ControlSession::handle_claim`].
    Claim(Claim),
    /// The Hello is admitted: send the Welcome (config snapshot, log position), attach the mux.
    /// Frames up to [`MAX_FRAME`] are accepted from now on.
    Admitted(Admitted),
    /// Send this Reject, then close the connection.
    Reject {
        frame: Frame,
        why: Rejected,
    },
    /// Queue this reply (a Pong); a peer whose queue is full is not reading: close.
    Reply(Frame),
    /// A frame arrived: the instance is alive.
    Touch,
    /// Fold a Status into the instance's state (counts as liveness too).
    Status(proto::Status),
    ConfigApplied(proto::ConfigApplied),
    LogBatch(proto::LogBatch),
    /// Any other frame: an exec or tunnel frame for the mux (which ignores what is not its own).
    Deliver(Kind),
    /// Close the connection.
    Close(End),
}

/// The claim on an instance id (see `claim` in mod.rs).
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub id: InstanceId,
    pub owner: Owner,
    /// The row to record.
    pub connected: Connected,
    /// The Hello's Status, folded into the recorded one.
    pub hello_status: Option<proto::Status>,
}

/// An admitted connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    pub id: InstanceId,
    pub app: String,
    pub deployment: String,
    pub hello: proto::Hello,
}

/// Why a connection was rejected (for the server's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// The Hello failed a check (version, token, instance id) or the token lookup failed.
    Admission,
    /// The instance id belongs to another owner.
    Conflict,
    /// Recording the instance failed (already logged where it failed).
    Unavailable,
    /// The first frame was not a Hello (its kind).
    NotHello(&'static str),
}

/// How a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Before admission, nothing to say (the peer went away).
    Quiet,
    /// Before admission, an error.
    Failed(String),
    /// An admitted connection ended, for this reason.
    Disconnected(&'static str),
}

/// Why a claim failed (see `claim` in mod.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    Conflict(crate::server::model::Conflict),
    /// The store failed.
    Unavailable,
}

#[derive(Debug)]
enum State {
    AwaitingHello,
    /// The token of this Hello is being looked up.
    LookingUpToken {
        hello: proto::Hello,
        hash: String,
    },
    /// The claim on this id is being made.
    Claiming {
        id: InstanceId,
        app: String,
        deployment: String,
        hello: proto::Hello,
    },
    Ready,
    Closed,
}

/// The protocol state of one control connection. See the module docs.
#[derive(Debug)]
pub struct ControlSession {
    state: State,
    /// Random per connection (stored with the instance row; see service/live.rs).
    nonce: i64,
    silence: Duration,
    /// Pre-auth deadline until admitted, then the silence deadline.
    deadline: Instant,
    actions: VecDeque<Action>,
}

/// A Reject frame.
pub fn reject(reason: Reason, message: impl Into<String>, retry_after_ms: u32) -> Frame {
    Kind::Reject(proto::Reject {
        reason: reason as i32,
        message: message.into(),
        retry_after_ms,
    })
    .into()
}

/// Cuts a label from the Hello to [`MAX_LABEL`] bytes, on a character boundary.
fn truncate(mut s: String) -> String {
    if s.len() > MAX_LABEL {
        let mut cut = MAX_LABEL;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl ControlSession {
    /// A connection accepted at `now`; `nonce` is its random session number; `heartbeat` the
    /// interval the Welcome announces.
    pub fn new(now: Instant, nonce: i64, heartbeat: Duration) -> ControlSession {
        ControlSession {
            state: State::AwaitingHello,
            nonce,
            silence: heartbeat * SILENT_HEARTBEATS,
            deadline: now + PREAUTH_TIMEOUT,
            actions: VecDeque::with_capacity(ACTIONS_CAP),
        }
    }

    /// The connection's session number.
    pub fn nonce(&self) -> i64 {
        self.nonce
    }

    /// The largest frame body accepted now.
    pub fn frame_cap(&self) -> usize {
        match self.state {
            State::Ready => MAX_FRAME,
            _ => FIRST_FRAME_CAP,
        }
    }

    /// When [`ControlSession::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Instant {
        self.deadline
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn close(&mut self, end: End) {
        self.state = State::Closed;
        self.actions.push_back(Action::Close(end));
    }

    fn reject(&mut self, frame: Frame, why: Rejected) {
        self.state = State::Closed;
        self.actions.push_back(Action::Reject { frame, why });
    }

    /// A frame arrived.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        match self.state {
            State::AwaitingHello => match frame.kind {
                None => {} // a kind this server does not know: skipped
                Some(Kind::Hello(hello)) => self.on_hello(hello),
                Some(other) => self.reject(
                    reject(Reason::Unspecified, "the first frame must be Hello", 0),
                    Rejected::NotHello(other.name()),
                ),
            },
            State::Ready => {
                self.deadline = now + self.silence;
                let action = match frame.kind {
                    None => Action::Touch,
                    Some(Kind::Ping(p)) => {
                        self.actions.push_back(Action::Touch);
                        Action::Reply(Kind::Pong(proto::Pong { nonce: p.nonce }).into())
                    }
                    Some(Kind::Pong(_)) => Action::Touch,
                    Some(Kind::Status(s)) => Action::Status(s),
                    Some(Kind::ConfigApplied(a)) => {
                        self.actions.push_back(Action::Touch);
                        Action::ConfigApplied(a)
                    }
                    Some(Kind::LogBatch(b)) => {
                        self.actions.push_back(Action::Touch);
                        Action::LogBatch(b)
                    }
                    Some(other) => {
                        self.actions.push_back(Action::Touch);
                        Action::Deliver(other)
                    }
                };
                self.actions.push_back(action);
            }
            // The connection task does not read while a lookup or claim is pending, and not at
            // all once closed.
            State::LookingUpToken { .. } | State::Claiming { .. } | State::Closed => {}
        }
    }

    fn on_hello(&mut self, hello: proto::Hello) {
        if hello.protocol_version != proto::PROTOCOL_VERSION {
            let msg = format!(
                "this server speaks protocol version {}, the entrypoint sent {}",
                proto::PROTOCOL_VERSION,
                hello.protocol_version
            );
            return self.reject(
                reject(Reason::UnsupportedVersion, msg, 0),
                Rejected::Admission,
            );
        }
        let hash = auth::hash_token(&hello.token);
        self.actions
            .push_back(Action::LookupToken { hash: hash.clone() });
        self.state = State::LookingUpToken { hello, hash };
    }

    /// The token lookup's result (Err: the lookup failed).
    pub fn handle_token(&mut self, scope: Result<Option<TokenScope>, ()>) {
        let State::LookingUpToken { hello, hash } =
            std::mem::replace(&mut self.state, State::Closed)
        else {
            return;
        };
        let (app, deployment) = match scope {
            Err(()) => {
                return self.reject(
                    reject(
                        Reason::Unavailable,
                        "server error; try again",
                        UNAVAILABLE_RETRY_MS,
                    ),
                    Rejected::Admission,
                );
            }
            Ok(None) => {
                return self.reject(
                    reject(Reason::BadToken, "invalid token", REJECT_RETRY_MS),
                    Rejected::Admission,
                );
            }
            Ok(Some(TokenScope::Admin)) => {
                return self.reject(
                    reject(
                        Reason::Forbidden,
                        "an admin token cannot run an entrypoint; create one with `waypost token create --app NAME`",
                        REJECT_RETRY_MS,
                    ),
                    Rejected::Admission,
                );
            }
            Ok(Some(TokenScope::Entrypoint { app, deployment })) => {
                (app, deployment.unwrap_or_default())
            }
        };
        let Ok(id) = <InstanceId>::try_from(hello.instance_id.as_slice()) else {
            let msg = format!(
                "instance_id must be 16 bytes, got {}",
                hello.instance_id.len()
            );
            return self.reject(reject(Reason::Unspecified, msg, 0), Rejected::Admission);
        };
        let owner = Owner {
            app: app.clone(),
            deployment: deployment.clone(),
            token_hash: hash,
        };
        let connected = Connected {
            id: util::hex(&id),
            app: app.clone(),
            deployment: deployment.clone(),
            hostname: truncate(hello.hostname.clone()),
            entrypoint_pid: hello.pid,
            entrypoint_version: truncate(hello.entrypoint_version.clone()),
            session: self.nonce,
            token_hash: owner.token_hash.clone(),
        };
        self.actions.push_back(Action::Claim(Claim {
            id,
            owner,
            connected,
            hello_status: hello.status.clone(),
        }));
        self.state = State::Claiming {
            id,
            app,
            deployment,
            hello,
        };
    }

    /// The claim's outcome. Admitted at `now`: the silence deadline starts.
    pub fn handle_claim(&mut self, outcome: Result<(), ClaimError>, now: Instant) {
        let State::Claiming {
            id,
            app,
            deployment,
            hello,
        } = std::mem::replace(&mut self.state, State::Closed)
        else {
            return;
        };
        match outcome {
            Err(ClaimError::Conflict(c)) => self.reject(
                reject(
                    Reason::Forbidden,
                    c.message(&util::hex(&id)),
                    REJECT_RETRY_MS,
                ),
                Rejected::Conflict,
            ),
            Err(ClaimError::Unavailable) => self.reject(
                reject(
                    Reason::Unavailable,
                    "server error; try again",
                    UNAVAILABLE_RETRY_MS,
                ),
                Rejected::Unavailable,
            ),
            Ok(()) => {
                self.state = State::Ready;
                self.deadline = now + self.silence;
                self.actions.push_back(Action::Admitted(Admitted {
                    id,
                    app,
                    deployment,
                    hello,
                }));
            }
        }
    }

    /// The peer closed the stream cleanly (between frames).
    pub fn handle_eof(&mut self) {
        match self.state {
            State::Ready => self.close(End::Disconnected("closed by the entrypoint")),
            State::Closed => {}
            _ => self.close(End::Quiet),
        }
    }

    /// Time passed: past the deadline, the connection closes.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.deadline {
            return;
        }
        match self.state {
            State::Ready => self.close(End::Disconnected("silent for 3 heartbeat intervals")),
            State::Closed => {}
            _ => self.close(End::Failed(format!(
                "no Hello within {PREAUTH_TIMEOUT:?} of connecting"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::Conflict;

    const HB: Duration = Duration::from_secs(10);

    fn hello(token: &str) -> proto::Hello {
        proto::Hello {
            protocol_version: proto::PROTOCOL_VERSION,
            token: token.into(),
            instance_id: vec![7; 16],
            hostname: "host".into(),
            entrypoint_version: "0.1.0".into(),
            pid: 42,
            ..Default::default()
        }
    }

    fn actions(s: &mut ControlSession) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn entrypoint(app: &str, dep: Option<&str>) -> TokenScope {
        TokenScope::Entrypoint {
            app: app.into(),
            deployment: dep.map(str::to_string),
        }
    }

    /// The Reject a session produced: (reason, message, why).
    fn rejected(a: &[Action]) -> (Reason, String, Rejected) {
        match a {
            [
                Action::Reject {
                    frame:
                        Frame {
                            kind: Some(Kind::Reject(r)),
                        },
                    why,
                },
            ] => (
                Reason::try_from(r.reason).unwrap(),
                r.message.clone(),
                why.clone(),
            ),
            other => panic!("not one Reject: {other:?}"),
        }
    }

    /// A session fed `h`; returns it with the token lookup asked for.
    fn after_hello(h: proto::Hello, t0: Instant) -> ControlSession {
        let mut s = ControlSession::new(t0, 99, HB);
        s.handle_frame(Kind::Hello(h.clone()).into(), t0);
        assert_eq!(
            actions(&mut s),
            [Action::LookupToken {
                hash: auth::hash_token(&h.token)
            }]
        );
        s
    }

    /// A session admitted at `t0`.
    fn admitted(t0: Instant) -> ControlSession {
        let mut s = after_hello(hello("wpe_x"), t0);
        s.handle_token(Ok(Some(entrypoint("web", None))));
        assert!(matches!(actions(&mut s).as_slice(), [Action::Claim(_)]));
        s.handle_claim(Ok(()), t0);
        assert!(matches!(actions(&mut s).as_slice(), [Action::Admitted(_)]));
        s
    }

    #[test]
    fn a_good_hello_is_claimed_then_admitted() {
        let t0 = Instant::now();
        let mut h = hello("wpe_x");
        h.hostname = "é".repeat(200); // 400 bytes: cut on a character boundary
        h.status = Some(proto::Status {
            state: 2,
            ..Default::default()
        });
        let mut s = after_hello(h.clone(), t0);
        assert_eq!(s.frame_cap(), FIRST_FRAME_CAP, "not admitted yet");
        s.handle_token(Ok(Some(entrypoint("web", Some("blue")))));
        let [Action::Claim(c)] = <[Action; 1]>::try_from(actions(&mut s)).unwrap() else {
            panic!("a claim")
        };
        let owner = Owner {
            app: "web".into(),
            deployment: "blue".into(),
            token_hash: auth::hash_token("wpe_x"),
        };
        assert_eq!(c.id, [7; 16]);
        assert_eq!(c.owner, owner);
        assert_eq!(c.connected.owner(), owner);
        assert_eq!(c.connected.session, 99);
        assert_eq!(c.connected.entrypoint_pid, 42);
        assert_eq!(
            c.connected.hostname.len(),
            254,
            "cut to 255 bytes at most, whole chars"
        );
        assert_eq!(c.hello_status, h.status);
        let later = t0 + Duration::from_secs(3);
        s.handle_claim(Ok(()), later);
        assert_eq!(
            actions(&mut s),
            [Action::Admitted(Admitted {
                id: [7; 16],
                app: "web".into(),
                deployment: "blue".into(),
                hello: h,
            })]
        );
        assert_eq!(s.frame_cap(), MAX_FRAME);
        assert_eq!(
            s.poll_timeout(),
            later + 3 * HB,
            "the silence deadline runs from admission"
        );
    }

    #[test]
    fn admission_matrix() {
        let t0 = Instant::now();
        // Wrong protocol version: refused before any lookup.
        let mut s = ControlSession::new(t0, 1, HB);
        let mut h = hello("wpe_x");
        h.protocol_version = proto::PROTOCOL_VERSION + 1;
        s.handle_frame(Kind::Hello(h).into(), t0);
        let (reason, msg, why) = rejected(&actions(&mut s));
        assert_eq!(
            (reason, why),
            (Reason::UnsupportedVersion, Rejected::Admission)
        );
        assert!(msg.contains("protocol version"), "{msg}");

        // Token scopes.
        let forbidden_admin = "an admin token cannot run an entrypoint";
        for (scope, want, text) in [
            (Ok(None), Reason::BadToken, "invalid token"),
            (
                Ok(Some(TokenScope::Admin)),
                Reason::Forbidden,
                forbidden_admin,
            ),
            (Err(()), Reason::Unavailable, "server error"),
        ] {
            let mut s = after_hello(hello("wpe_x"), t0);
            s.handle_token(scope);
            let (reason, msg, why) = rejected(&actions(&mut s));
            assert_eq!((reason, why), (want, Rejected::Admission), "{msg}");
            assert!(msg.contains(text), "{msg}");
        }

        // An instance id that is not 16 bytes (checked after the token).
        let mut h = hello("wpe_x");
        h.instance_id = vec![1; 15];
        let mut s = after_hello(h, t0);
        s.handle_token(Ok(Some(entrypoint("web", None))));
        let (reason, msg, _) = rejected(&actions(&mut s));
        assert_eq!(reason, Reason::Unspecified);
        assert!(msg.contains("got 15"), "{msg}");

        // The claim: another owner's id is FORBIDDEN without naming the other owner; a store
        // failure is UNAVAILABLE.
        for (conflict, whose) in [
            (Conflict::App, "another app"),
            (Conflict::Deployment, "another deployment"),
            (Conflict::Token, "another token"),
        ] {
            let mut s = after_hello(hello("wpe_x"), t0);
            s.handle_token(Ok(Some(entrypoint("web", None))));
            actions(&mut s);
            s.handle_claim(Err(ClaimError::Conflict(conflict)), t0);
            let (reason, msg, why) = rejected(&actions(&mut s));
            assert_eq!((reason, why), (Reason::Forbidden, Rejected::Conflict));
            assert!(
                msg.contains(whose) && msg.contains(&"07".repeat(16)),
                "{msg}"
            );
            assert_eq!(s.frame_cap(), FIRST_FRAME_CAP, "never admitted");
        }
        let mut s = after_hello(hello("wpe_x"), t0);
        s.handle_token(Ok(Some(entrypoint("web", None))));
        actions(&mut s);
        s.handle_claim(Err(ClaimError::Unavailable), t0);
        let (reason, _, why) = rejected(&actions(&mut s));
        assert_eq!((reason, why), (Reason::Unavailable, Rejected::Unavailable));
    }

    #[test]
    fn the_first_frame_must_be_a_hello() {
        let t0 = Instant::now();
        let mut s = ControlSession::new(t0, 1, HB);
        // A frame of a kind this server does not know is skipped...
        s.handle_frame(Frame { kind: None }, t0);
        assert!(actions(&mut s).is_empty());
        // ...any other is refused.
        s.handle_frame(Kind::Ping(proto::Ping { nonce: 1 }).into(), t0);
        let (reason, msg, why) = rejected(&actions(&mut s));
        assert_eq!(reason, Reason::Unspecified);
        assert!(msg.contains("must be Hello"), "{msg}");
        assert_eq!(why, Rejected::NotHello("Ping"));
        // Closed: nothing more happens.
        s.handle_frame(Kind::Hello(hello("wpe_x")).into(), t0);
        s.handle_timeout(t0 + PREAUTH_TIMEOUT);
        assert!(actions(&mut s).is_empty());
    }

    #[test]
    fn before_the_hello_one_deadline_and_a_quiet_eof() {
        let t0 = Instant::now();
        let mut s = ControlSession::new(t0, 1, HB);
        assert_eq!(s.poll_timeout(), t0 + PREAUTH_TIMEOUT);
        s.handle_timeout(t0 + PREAUTH_TIMEOUT - Duration::from_millis(1));
        assert!(actions(&mut s).is_empty(), "not yet");
        // Unknown frames do not extend it.
        s.handle_frame(Frame { kind: None }, t0 + Duration::from_secs(9));
        assert_eq!(s.poll_timeout(), t0 + PREAUTH_TIMEOUT);
        s.handle_timeout(t0 + PREAUTH_TIMEOUT);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [Action::Close(End::Failed(m))] if m.contains("no Hello within")
        ));

        let mut s = ControlSession::new(t0, 1, HB);
        s.handle_eof();
        assert_eq!(actions(&mut s), [Action::Close(End::Quiet)]);
    }

    #[test]
    fn dispatch_of_each_frame_kind() {
        let t0 = Instant::now();
        let mut s = admitted(t0);
        let mut feed = |k: Option<Kind>| {
            s.handle_frame(Frame { kind: k }, t0);
            actions(&mut s)
        };
        assert_eq!(feed(None), [Action::Touch]);
        assert_eq!(
            feed(Some(Kind::Ping(proto::Ping { nonce: 5 }))),
            [
                Action::Touch,
                Action::Reply(Kind::Pong(proto::Pong { nonce: 5 }).into())
            ]
        );
        assert_eq!(
            feed(Some(Kind::Pong(proto::Pong { nonce: 5 }))),
            [Action::Touch]
        );
        let st = proto::Status {
            state: 3,
            ..Default::default()
        };
        assert_eq!(
            feed(Some(Kind::Status(st.clone()))),
            [Action::Status(st)],
            "a Status updates last-seen with the status"
        );
        let ca = proto::ConfigApplied {
            version: 3,
            ..Default::default()
        };
        assert_eq!(
            feed(Some(Kind::ConfigApplied(ca.clone()))),
            [Action::Touch, Action::ConfigApplied(ca)]
        );
        let lb = proto::LogBatch {
            first_seq: 9,
            ..Default::default()
        };
        assert_eq!(
            feed(Some(Kind::LogBatch(lb.clone()))),
            [Action::Touch, Action::LogBatch(lb)]
        );
        for k in [
            Kind::ExecOutput(proto::ExecOutput::default()),
            Kind::StreamData(proto::StreamData::default()),
            Kind::WindowUpdate(proto::WindowUpdate::default()),
            // A second Hello is not admission again: it goes where unknown frames go.
            Kind::Hello(hello("wpe_y")),
        ] {
            assert_eq!(feed(Some(k.clone())), [Action::Touch, Action::Deliver(k)]);
        }
    }

    #[test]
    fn silence_closes_after_three_heartbeats_and_frames_reset_it() {
        let t0 = Instant::now();
        let mut s = admitted(t0);
        assert_eq!(s.poll_timeout(), t0 + 3 * HB);
        let t1 = t0 + 2 * HB;
        s.handle_frame(Frame { kind: None }, t1);
        actions(&mut s);
        assert_eq!(s.poll_timeout(), t1 + 3 * HB, "any frame is liveness");
        s.handle_timeout(t0 + 3 * HB);
        assert!(
            actions(&mut s).is_empty(),
            "the old deadline passed, the new one has not"
        );
        s.handle_timeout(t1 + 3 * HB);
        assert_eq!(
            actions(&mut s),
            [Action::Close(End::Disconnected(
                "silent for 3 heartbeat intervals"
            ))]
        );

        let mut s = admitted(t0);
        s.handle_eof();
        assert_eq!(
            actions(&mut s),
            [Action::Close(End::Disconnected("closed by the entrypoint"))]
        );
    }
}
