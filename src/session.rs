//! The control connection's state machine, sans-IO: when to connect, what to say first, when to
//! beat the heart, when to give up on a silent server, how long to back off.
//!
//! `Idle → Connecting → AwaitingWelcome → Ready`, and from any of the last three to `Backoff`
//! when the connection fails or closes; `Backoff → Connecting` when the delay is over. The reactor
//! opens the connection when asked (`Event::Connect`: DNS, TCP, proxy, TLS — all off-loop or
//! non-blocking), reports the outcome with `handle_connected` / `handle_closed`, feeds received
//! frames to `handle_frame`, and writes what `poll_transmit` returns. Frames meant for other cores
//! (config, logs, exec, tunnel) come back out as `Event::Frame`.
//!
//! Last words: once the child has exited, [`Session::handle_last_words`] hands over its final
//! Status. From then on the session hurries — out of any backoff at once, and a failed attempt
//! is retried after [`HURRY_RETRY`], not the exponential delay — and every Ready connection
//! carries that Status followed by a Ping. The server handles a connection's frames in order, so
//! the Pong to that Ping means it has the Status ([`Session::last_words_pending`] turns false).
//!
//! Replicas: `WAYPOST_SERVER` may list several servers. The session walks them in *rounds*
//! (docs/protocol.md, "Reconnect backoff"): the first attempt goes to a random entry (from the
//! seed, so a fleet spreads); a failed attempt (refused, TLS, Reject, timeout) moves to the next
//! entry at once; only when every entry of a round has failed does the exponential backoff
//! apply. Losing an established connection starts a new round at the next entry after the
//! first backoff step. [`Session::target`] says where the next `Event::Connect` goes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};
use waypost_proto::{Hello, Kind, Ping, Pong, Reject, Status, Welcome, reject};

/// First reconnect delay; doubles per failed attempt (docs/protocol.md, "Reconnect backoff").
pub const BACKOFF_MIN: Duration = waypost_proto::backoff::MIN;
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = waypost_proto::backoff::MAX;
/// After the child exited, a failed connection attempt is retried after this instead of the
/// exponential backoff: the flush timeout is a couple of seconds, and one exiting instance
/// retrying this often costs a restarting server nothing.
pub const HURRY_RETRY: Duration = Duration::from_millis(100);
/// DNS + TCP + proxy + TLS handshake must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After sending Hello, the server must answer within this.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat interval until the server's Welcome says otherwise.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Smallest heartbeat we accept from a server (a bad value must not make us spin).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Control frames waiting to be written. They are small (~100 bytes) and the writer drains them
/// first, so a backlog this long (a few hundred KiB) means the server stopped reading: the
/// connection is replaced rather than a frame dropped (a lost WindowUpdate or ExecExit would
/// stall its stream for good).
const TRANSMIT_CAP: usize = 4096;

/// What the reactor must do, or learn.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Open a connection to the server now.
    Connect,
    /// Close the connection now (the session has already moved on to `Backoff`).
    Disconnect(&'static str),
    /// The server accepted us (possibly with a first config).
    Welcome(Welcome),
    /// The connection is gone (closed, failed, or abandoned): sessions riding on it must end.
    Lost,
    /// Time to send a Status (the heartbeat carries one).
    Heartbeat,
    /// A frame for another core.
    Frame(Kind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Backoff {
        until: Instant,
    },
    Connecting {
        deadline: Instant,
    },
    AwaitingWelcome {
        deadline: Instant,
    },
    Ready {
        next_beat: Instant,
        dead_at: Instant,
    },
}

/// Where to connect: an entry of the server list, and a turn counter from which the reactor picks
/// the first of that entry's resolved addresses (`turn % addresses`), so a DNS name with several
/// addresses is rotated through like a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub entry: usize,
    pub turn: u32,
}

pub struct Session {
    state: State,
    /// Failed rounds since the last Welcome (with one server: failed attempts).
    attempts: u32,
    /// Entries in the server list (at least 1).
    servers: usize,
    /// Where the current or next attempt goes.
    target: Target,
    /// Entries that failed in the current round.
    tried: usize,
    /// The longest Reject retry hint of the current round: the round's backoff is at least this.
    round_hint: Duration,
    heartbeat: Duration,
    rng: u64,
    nonce: u64,
    transmit: VecDeque<Kind>,
    events: VecDeque<Event>,
    /// Rejections in a row, for logging once per cause.
    rejected: bool,
    /// The server asked (Reject's retry hint) not to come back before this; hurrying respects it.
    hinted_until: Option<Instant>,
    /// Reconnect at once and retry quickly (the child exited; its last words wait).
    hurry: bool,
    /// The child's final Status, to be confirmed by the server.
    last_words: Option<Status>,
    /// The nonce of the Ping queued right after the final Status on this connection.
    last_words_ping: Option<u64>,
    /// The Pong to that Ping arrived: the server has the final Status.
    last_words_confirmed: bool,
}

impl Session {
    /// `seed` makes the backoff jitter deterministic in tests; use a random one in production.
    pub fn new(seed: u64) -> Session {
        Session::with_servers(seed, 1)
    }

    /// A session over a list of `servers` replicas (0 counts as 1). The first entry and the
    /// first address turn are drawn from `seed` (without touching the jitter's generator, so
    /// one server behaves exactly as [`Session::new`]).
    pub fn with_servers(seed: u64, servers: usize) -> Session {
        let servers = servers.max(1);
        let mixed = mix(seed);
        Session {
            state: State::Idle,
            attempts: 0,
            servers,
            target: Target {
                entry: (mixed % servers as u64) as usize,
                turn: (mixed >> 32) as u32,
            },
            tried: 0,
            round_hint: Duration::ZERO,
            heartbeat: DEFAULT_HEARTBEAT,
            rng: seed | 1,
            nonce: 0,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            rejected: false,
            hinted_until: None,
            hurry: false,
            last_words: None,
            last_words_ping: None,
            last_words_confirmed: false,
        }
    }

    /// Starts connecting (once, at startup).
    pub fn start(&mut self, now: Instant) {
        if self.state == State::Idle {
            self.connect(now);
        }
    }

    /// Where the current (or next) connection attempt goes.
    pub fn target(&self) -> Target {
        self.target
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready { .. })
    }

    /// Whether a connection is open or being opened (the reactor holds a socket).
    pub fn has_connection(&self) -> bool {
        matches!(
            self.state,
            State::Connecting { .. } | State::AwaitingWelcome { .. } | State::Ready { .. }
        )
    }

    /// The server's heartbeat interval (ours until the Welcome).
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    fn connect(&mut self, now: Instant) {
        self.state = State::Connecting {
            deadline: now + CONNECT_TIMEOUT,
        };
        self.transmit.clear();
        self.events.push_back(Event::Connect);
    }

    /// The connection is open (TLS handshake done); `hello` is what we tell the server.
    pub fn handle_connected(&mut self, hello: Hello, now: Instant) {
        if let State::Connecting { .. } = self.state {
            self.state = State::AwaitingWelcome {
                deadline: now + WELCOME_TIMEOUT,
            };
            self.transmit.push_back(Kind::Hello(hello));
        }
    }

    /// The connection failed to open, or closed. `why` is for the log.
    pub fn handle_closed(&mut self, why: &str, now: Instant) {
        match self.state {
            State::Idle | State::Backoff { .. } => return,
            State::Ready { .. } => {
                crate::warn!("lost the connection to the server: {why}; reconnecting")
            }
            State::Connecting { .. } | State::AwaitingWelcome { .. } => {
                if self.tried + 1 < self.servers && self.attempts == 0 {
                    // Once per entry in the first round; later rounds only at debug level.
                    crate::warn!(
                        "cannot reach server {} of {}: {why}; trying the next",
                        self.target.entry + 1,
                        self.servers
                    )
                } else if self.attempts == 0 && !self.rejected {
                    crate::warn!("cannot reach the server: {why}; retrying with backoff")
                } else {
                    crate::debug!("connection attempt {} failed: {why}", self.attempts + 1)
                }
            }
        }
        self.events.push_back(Event::Lost);
        self.fail(now, Duration::ZERO);
    }

    /// The current attempt failed or the connection was lost: on to the next entry — at once
    /// within a round, after the round's backoff when every entry failed, after the first
    /// backoff step when an established connection was lost.
    fn fail(&mut self, now: Instant, hint: Duration) {
        let was_ready = self.is_ready();
        self.target.entry = (self.target.entry + 1) % self.servers;
        self.target.turn = self.target.turn.wrapping_add(1);
        if was_ready {
            // A new round begins at the next entry (the Welcome reset the counters).
            (self.tried, self.round_hint) = (0, Duration::ZERO);
            return self.back_off(now, hint);
        }
        self.tried += 1;
        self.round_hint = self.round_hint.max(hint);
        if self.tried < self.servers {
            self.transmit.clear();
            self.last_words_ping = None;
            return self.connect(now);
        }
        let hint = std::mem::take(&mut self.round_hint);
        self.tried = 0;
        self.back_off(now, hint);
    }

    fn back_off(&mut self, now: Instant, at_least: Duration) {
        let delay = if self.hurry {
            HURRY_RETRY
        } else {
            backoff_delay(self.attempts, &mut self.rng)
        }
        .max(at_least);
        self.attempts = self.attempts.saturating_add(1);
        self.hinted_until = (at_least > Duration::ZERO).then_some(now + at_least);
        self.state = State::Backoff { until: now + delay };
        self.transmit.clear();
        self.last_words_ping = None;
    }

    /// Connect now if backing off (unless the server itself asked for the wait), and from now on
    /// retry failed attempts after [`HURRY_RETRY`]. For the exit flush: the child's last words
    /// must not wait out a backoff that grew while the server was away.
    pub fn handle_hurry(&mut self, now: Instant) {
        self.hurry = true;
        if let State::Backoff { until } = self.state {
            let at = self.hinted_until.map_or(now, |h| h.max(now));
            if at < until {
                self.state = State::Backoff { until: at };
            }
            if at <= now {
                self.connect(now);
            }
        }
    }

    /// The child is gone and `status` says how: send it on this connection if Ready, else on
    /// the next one; until the server confirms it, hurry (see [`Session::handle_hurry`]).
    pub fn handle_last_words(&mut self, status: Status, now: Instant) {
        self.last_words = Some(status);
        self.last_words_confirmed = false;
        self.last_words_ping = None;
        if self.is_ready() {
            self.send_last_words(now);
        }
        self.handle_hurry(now);
    }

    /// Whether a final Status was handed over and the server has not confirmed it yet.
    pub fn last_words_pending(&self) -> bool {
        self.last_words.is_some() && !self.last_words_confirmed
    }

    /// Queues the final Status and a Ping whose Pong confirms it.
    fn send_last_words(&mut self, now: Instant) {
        let Some(status) = self.last_words.clone() else {
            return;
        };
        self.queue(Kind::Status(status), now);
        self.nonce = self.nonce.wrapping_add(1);
        self.queue(Kind::Ping(Ping { nonce: self.nonce }), now);
        // (A full queue abandons the connection; the next one sends them again.)
        if self.is_ready() {
            self.last_words_ping = Some(self.nonce);
        }
    }

    /// Gives up on the current connection: the reactor closes it, we retry after the backoff.
    fn abandon(&mut self, why: &'static str, now: Instant, at_least: Duration) {
        self.events.push_back(Event::Disconnect(why));
        self.events.push_back(Event::Lost);
        self.fail(now, at_least);
    }

    /// A frame arrived from the server.
    pub fn handle_frame(&mut self, kind: Kind, now: Instant) {
        match (self.state, kind) {
            (State::AwaitingWelcome { .. }, Kind::Welcome(w)) => {
                if w.heartbeat_interval_ms > 0 {
                    self.heartbeat = Duration::from_millis(u64::from(w.heartbeat_interval_ms))
                        .max(MIN_HEARTBEAT);
                }
                crate::info!(
                    "connected to the server as app {:?}{}",
                    w.app,
                    if w.deployment.is_empty() {
                        String::new()
                    } else {
                        format!(", deployment {:?}", w.deployment)
                    }
                );
                self.attempts = 0;
                (self.tried, self.round_hint) = (0, Duration::ZERO);
                self.rejected = false;
                self.state = State::Ready {
                    next_beat: now + self.heartbeat,
                    dead_at: now + self.dead_after(),
                };
                self.events.push_back(Event::Welcome(w));
                // Tell the server right away what the child is doing.
                self.events.push_back(Event::Heartbeat);
                if self.last_words_pending() {
                    self.send_last_words(now);
                }
            }
            (State::AwaitingWelcome { .. } | State::Ready { .. }, Kind::Reject(r)) => {
                self.rejected(r, now)
            }
            (State::AwaitingWelcome { .. }, other) => {
                crate::debug!("ignoring {} before the Welcome", other.name());
            }
            (State::Ready { next_beat, .. }, kind) => {
                self.state = State::Ready {
                    next_beat,
                    dead_at: now + self.dead_after(),
                };
                match kind {
                    // Through the bounded queue: a server that pings but never reads cannot grow
                    // it (found by the `session` fuzz target).
                    Kind::Ping(p) => self.queue(Kind::Pong(Pong { nonce: p.nonce }), now),
                    Kind::Pong(p) => {
                        if self.last_words_ping == Some(p.nonce) {
                            self.last_words_confirmed = true;
                        }
                    }
                    Kind::Welcome(_) => {}
                    other => self.events.push_back(Event::Frame(other)),
                }
            }
            (State::Idle | State::Backoff { .. } | State::Connecting { .. }, _) => {}
        }
    }

    fn rejected(&mut self, r: Reject, now: Instant) {
        let reason = reject::Reason::try_from(r.reason).map_or("UNKNOWN", |x| x.as_str_name());
        if !self.rejected {
            crate::error!(
                "the server refused this entrypoint ({reason}): {}; retrying with backoff",
                r.message
            );
        }
        self.rejected = true;
        self.abandon(
            "rejected",
            now,
            Duration::from_millis(u64::from(r.retry_after_ms)),
        );
    }

    /// Silence longer than this means the server (or the path to it) is gone: two heartbeats,
    /// each answered by a Pong, plus one interval of slack.
    fn dead_after(&self) -> Duration {
        self.heartbeat * 3
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Backoff { until } => Some(until),
            State::Connecting { deadline } | State::AwaitingWelcome { deadline } => Some(deadline),
            State::Ready { next_beat, dead_at } => Some(next_beat.min(dead_at)),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Backoff { until } if now >= until => self.connect(now),
            State::Connecting { deadline } if now >= deadline => {
                crate::debug!("connecting to the server timed out");
                self.abandon("connect timeout", now, Duration::ZERO);
            }
            State::AwaitingWelcome { deadline } if now >= deadline => {
                if self.attempts == 0 {
                    crate::warn!(
                        "the server accepted the connection but did not answer; retrying with backoff"
                    );
                }
                self.abandon("no welcome", now, Duration::ZERO);
            }
            State::Ready { dead_at, .. } if now >= dead_at => {
                crate::warn!("the server went silent; reconnecting");
                self.abandon("server silent", now, Duration::ZERO);
            }
            State::Ready { next_beat, dead_at } if now >= next_beat => {
                self.nonce = self.nonce.wrapping_add(1);
                self.queue(Kind::Ping(Ping { nonce: self.nonce }), now);
                if !self.is_ready() {
                    return;
                }
                self.events.push_back(Event::Heartbeat);
                // Beats are spaced from the last one, not from now: no drift, no catch-up burst.
                let mut next = next_beat + self.heartbeat;
                if next <= now {
                    next = now + self.heartbeat;
                }
                self.state = State::Ready {
                    next_beat: next,
                    dead_at,
                };
            }
            _ => {}
        }
    }

    /// Queues a control frame (Status, ConfigApplied, ...) if connected and welcomed.
    pub fn send(&mut self, kind: Kind, now: Instant) {
        if self.is_ready() {
            self.queue(kind, now);
        }
    }

    fn queue(&mut self, kind: Kind, now: Instant) {
        if self.transmit.len() >= TRANSMIT_CAP {
            crate::warn!("the server stopped reading our frames; reconnecting");
            self.abandon("server not reading", now, Duration::ZERO);
            return;
        }
        self.transmit.push_back(kind);
    }

    /// Whether control frames are waiting to be written.
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    pub fn poll_transmit(&mut self) -> Option<Kind> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

/// splitmix64's finalizer: spreads a seed's bits (the start entry must not follow the jitter).
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Exponential backoff with "equal jitter": half the delay fixed, half random, so a fleet that
/// lost its server at the same moment does not come back at the same moment. The one rule, shared
/// with the fleet simulator: [`waypost_proto::backoff::delay`].
pub fn backoff_delay(attempts: u32, rng: &mut u64) -> Duration {
    waypost_proto::backoff::delay(attempts, rng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypost_proto::{LogAck, Status};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn sent(s: &mut Session) -> Vec<Kind> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    fn welcome(hb_ms: u32) -> Kind {
        Kind::Welcome(Welcome {
            heartbeat_interval_ms: hb_ms,
            app: "web".into(),
            ..Default::default()
        })
    }

    /// A session that is Ready at `t0` with a 1 s heartbeat.
    fn ready() -> (Session, Instant) {
        let t0 = Instant::now();
        let mut s = Session::new(7);
        s.start(t0);
        assert_eq!(events(&mut s), [Event::Connect]);
        s.handle_connected(
            Hello {
                token: "t".into(),
                ..Default::default()
            },
            t0,
        );
        assert!(matches!(sent(&mut s)[..], [Kind::Hello(_)]));
        s.handle_frame(welcome(1000), t0);
        let ev = events(&mut s);
        assert!(
            matches!(ev[..], [Event::Welcome(_), Event::Heartbeat]),
            "{ev:?}"
        );
        assert!(s.is_ready());
        (s, t0)
    }

    #[test]
    fn connect_hello_welcome_ready() {
        let (s, t0) = ready();
        assert_eq!(s.heartbeat(), ms(1000));
        assert_eq!(s.poll_timeout(), Some(t0 + ms(1000)));
    }

    #[test]
    fn heartbeats_are_regular_and_answered_pings_keep_us_alive() {
        let (mut s, t0) = ready();
        for i in 1..=10u64 {
            let t = t0 + ms(1000 * i);
            assert_eq!(s.poll_timeout(), Some(t));
            s.handle_timeout(t);
            assert_eq!(events(&mut s), [Event::Heartbeat]);
            assert_eq!(sent(&mut s), [Kind::Ping(Ping { nonce: i })]);
            s.handle_frame(Kind::Pong(Pong { nonce: i }), t + ms(5));
        }
        assert!(s.is_ready());
    }

    #[test]
    fn a_silent_server_is_abandoned_after_three_intervals() {
        let (mut s, t0) = ready();
        let t = loop {
            let t = s.poll_timeout().unwrap();
            s.handle_timeout(t);
            let ev = events(&mut s);
            sent(&mut s);
            if ev.contains(&Event::Lost) {
                assert_eq!(ev, [Event::Disconnect("server silent"), Event::Lost]);
                break t;
            }
        };
        assert_eq!(t, t0 + ms(3000));
        assert!(!s.is_ready());
    }

    #[test]
    fn server_pings_are_answered() {
        let (mut s, t0) = ready();
        s.handle_frame(Kind::Ping(Ping { nonce: 42 }), t0 + ms(10));
        assert_eq!(sent(&mut s), [Kind::Pong(Pong { nonce: 42 })]);
    }

    #[test]
    fn other_frames_go_to_the_other_cores() {
        let (mut s, t0) = ready();
        s.handle_frame(Kind::LogAck(LogAck { up_to_seq: 9 }), t0);
        assert_eq!(
            events(&mut s),
            [Event::Frame(Kind::LogAck(LogAck { up_to_seq: 9 }))]
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_30s() {
        let t0 = Instant::now();
        let mut s = Session::new(99);
        s.start(t0);
        events(&mut s);
        let mut t = t0;
        let mut delays = Vec::new();
        for _ in 0..14 {
            s.handle_closed("refused", t);
            assert_eq!(events(&mut s), [Event::Lost]);
            let until = s.poll_timeout().unwrap();
            delays.push(until - t);
            s.handle_timeout(until - ms(1));
            assert_eq!(events(&mut s), [], "not before the delay");
            s.handle_timeout(until);
            assert_eq!(events(&mut s), [Event::Connect]);
            t = until;
        }
        for (n, d) in delays.iter().enumerate() {
            let base = (BACKOFF_MIN * (1 << n)).min(BACKOFF_MAX);
            assert!(
                *d >= base / 2 && *d <= base,
                "attempt {n}: {d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
        assert!(
            delays[13] >= ms(15_000),
            "capped at 30 s, at least half of it"
        );
        // Jitter: two sessions with different seeds do not retry in lockstep.
        let mut a = 1u64;
        let mut b = 2u64;
        let da: Vec<_> = (0..8).map(|n| backoff_delay(n, &mut a)).collect();
        let db: Vec<_> = (0..8).map(|n| backoff_delay(n, &mut b)).collect();
        assert_ne!(da, db);
    }

    #[test]
    fn welcome_resets_the_backoff() {
        let t0 = Instant::now();
        let mut s = Session::new(5);
        s.start(t0);
        for _ in 0..6 {
            s.handle_closed("refused", t0);
            let until = s.poll_timeout().unwrap();
            s.handle_timeout(until);
        }
        events(&mut s);
        s.handle_connected(Hello::default(), t0);
        s.handle_frame(welcome(1000), t0);
        events(&mut s);
        // Lost again: the first retry is quick again.
        s.handle_closed("reset", t0);
        assert!(s.poll_timeout().unwrap() <= t0 + BACKOFF_MIN);
    }

    #[test]
    fn accepts_but_never_answers() {
        let t0 = Instant::now();
        let mut s = Session::new(1);
        s.start(t0);
        events(&mut s);
        s.handle_connected(Hello::default(), t0);
        sent(&mut s);
        assert_eq!(s.poll_timeout(), Some(t0 + WELCOME_TIMEOUT));
        s.handle_timeout(t0 + WELCOME_TIMEOUT);
        assert_eq!(
            events(&mut s),
            [Event::Disconnect("no welcome"), Event::Lost]
        );
        // A connection that never completes is abandoned too.
        let t1 = s.poll_timeout().unwrap();
        s.handle_timeout(t1);
        assert_eq!(events(&mut s), [Event::Connect]);
        s.handle_timeout(t1 + CONNECT_TIMEOUT);
        assert_eq!(
            events(&mut s),
            [Event::Disconnect("connect timeout"), Event::Lost]
        );
    }

    /// A session over `n` servers, started at `t0`, its first Connect consumed.
    fn started(seed: u64, n: usize) -> (Session, Instant) {
        let t0 = Instant::now();
        let mut s = Session::with_servers(seed, n);
        s.start(t0);
        assert_eq!(events(&mut s), [Event::Connect]);
        (s, t0)
    }

    #[test]
    fn one_server_is_exactly_the_single_address_session() {
        // Same jitter, same timeouts, entry always 0.
        let (mut a, t0) = started(42, 1);
        let mut b = Session::new(42);
        b.start(t0);
        events(&mut b);
        let mut t = t0;
        for _ in 0..6 {
            a.handle_closed("refused", t);
            b.handle_closed("refused", t);
            assert_eq!(a.poll_timeout(), b.poll_timeout());
            assert_eq!(a.target().entry, 0);
            t = a.poll_timeout().unwrap();
            a.handle_timeout(t);
            b.handle_timeout(t);
            assert_eq!(events(&mut a), events(&mut b));
        }
    }

    #[test]
    fn the_start_entry_is_random_per_seed_and_covers_the_list() {
        let mut seen = [0usize; 3];
        for seed in 0..300u64 {
            let s = Session::with_servers(seed.wrapping_mul(0x1234_5678_9abc_def1), 3);
            seen[s.target().entry] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        // Deterministic for one seed.
        assert_eq!(
            Session::with_servers(5, 4).target(),
            Session::with_servers(5, 4).target()
        );
    }

    #[test]
    fn a_failed_attempt_moves_to_the_next_entry_at_once_and_a_full_round_backs_off() {
        let (mut s, t0) = started(9, 3);
        let first = s.target().entry;
        // Refused: the next entry, right now, no backoff.
        s.handle_closed("refused", t0);
        assert_eq!(events(&mut s), [Event::Lost, Event::Connect]);
        assert_eq!(s.target().entry, (first + 1) % 3);
        assert!(s.has_connection());
        // TLS failure after the TCP connect: the same.
        s.handle_closed("tls: bad certificate", t0);
        assert_eq!(events(&mut s), [Event::Lost, Event::Connect]);
        assert_eq!(s.target().entry, (first + 2) % 3);
        // The third entry fails too: the round is over, now the backoff (first step).
        s.handle_closed("refused", t0);
        assert_eq!(events(&mut s), [Event::Lost]);
        assert!(!s.has_connection());
        let until = s.poll_timeout().unwrap();
        assert!(until - t0 >= BACKOFF_MIN / 2 && until - t0 <= BACKOFF_MIN);
        s.handle_timeout(until);
        assert_eq!(events(&mut s), [Event::Connect]);
        // The next round starts where the last left off, and its backoff is the second step.
        assert_eq!(s.target().entry, first);
        for _ in 0..2 {
            s.handle_closed("refused", until);
            assert_eq!(events(&mut s), [Event::Lost, Event::Connect]);
        }
        s.handle_closed("refused", until);
        assert_eq!(events(&mut s), [Event::Lost]);
        let d = s.poll_timeout().unwrap() - until;
        assert!(d >= BACKOFF_MIN && d <= BACKOFF_MIN * 2, "{d:?}");
    }

    #[test]
    fn timeouts_move_on_like_refusals() {
        let (mut s, t0) = started(11, 2);
        let first = s.target().entry;
        s.handle_timeout(t0 + CONNECT_TIMEOUT);
        assert_eq!(
            events(&mut s),
            [
                Event::Disconnect("connect timeout"),
                Event::Lost,
                Event::Connect
            ]
        );
        assert_eq!(s.target().entry, 1 - first);
        let t1 = t0 + CONNECT_TIMEOUT;
        s.handle_connected(Hello::default(), t1);
        sent(&mut s);
        s.handle_timeout(t1 + WELCOME_TIMEOUT);
        assert_eq!(
            events(&mut s),
            [Event::Disconnect("no welcome"), Event::Lost],
            "both entries failed: backoff"
        );
    }

    #[test]
    fn losing_an_established_connection_goes_to_the_next_entry_after_the_first_step() {
        let (mut s, t0) = started(13, 2);
        let a = s.target().entry;
        s.handle_connected(Hello::default(), t0);
        s.handle_frame(welcome(1000), t0);
        events(&mut s);
        let turn = s.target().turn;
        s.handle_closed("reset by peer", t0 + ms(5000));
        assert_eq!(events(&mut s), [Event::Lost]);
        let until = s.poll_timeout().unwrap();
        let d = until - (t0 + ms(5000));
        assert!(d >= BACKOFF_MIN / 2 && d <= BACKOFF_MIN, "{d:?}");
        s.handle_timeout(until);
        assert_eq!(events(&mut s), [Event::Connect]);
        assert_eq!(s.target().entry, 1 - a, "the other replica");
        assert_eq!(s.target().turn, turn.wrapping_add(1), "the next address");
        // The other one is dead too: back to the first at once (a new round began at the loss).
        s.handle_closed("refused", until);
        assert_eq!(events(&mut s), [Event::Lost, Event::Connect]);
        assert_eq!(s.target().entry, a);
        // A server that went silent counts as a loss as well.
        s.handle_connected(Hello::default(), until);
        s.handle_frame(welcome(1000), until);
        events(&mut s);
        s.handle_timeout(until + ms(3000));
        assert_eq!(
            events(&mut s),
            [Event::Disconnect("server silent"), Event::Lost]
        );
        assert_eq!(s.target().entry, 1 - a);
    }

    #[test]
    fn a_reject_moves_on_at_once_and_its_hint_floors_the_rounds_backoff() {
        let (mut s, t0) = started(17, 2);
        let reject = |ms_: u32| {
            Kind::Reject(Reject {
                reason: reject::Reason::BadToken as i32,
                message: "invalid token".into(),
                retry_after_ms: ms_,
            })
        };
        s.handle_connected(Hello::default(), t0);
        s.handle_frame(reject(5000), t0);
        assert_eq!(
            events(&mut s),
            [Event::Disconnect("rejected"), Event::Lost, Event::Connect],
            "another replica may take us: no wait for this one's hint"
        );
        s.handle_connected(Hello::default(), t0);
        s.handle_frame(reject(0), t0);
        assert_eq!(events(&mut s), [Event::Disconnect("rejected"), Event::Lost]);
        assert_eq!(
            s.poll_timeout(),
            Some(t0 + ms(5000)),
            "the round's backoff honours the first server's hint"
        );
        // Hurrying (the child exited) still waits for it.
        s.handle_hurry(t0);
        assert_eq!(events(&mut s), []);
        assert_eq!(s.poll_timeout(), Some(t0 + ms(5000)));
    }

    #[test]
    fn hurry_retries_a_failed_round_quickly_but_walks_the_list_at_once() {
        let (mut s, t0) = started(19, 3);
        s.handle_last_words(exited(0), t0);
        events(&mut s);
        s.handle_closed("refused", t0);
        s.handle_closed("refused", t0);
        assert_eq!(
            events(&mut s),
            [Event::Lost, Event::Connect, Event::Lost, Event::Connect]
        );
        s.handle_closed("refused", t0);
        assert_eq!(events(&mut s), [Event::Lost]);
        assert_eq!(s.poll_timeout(), Some(t0 + HURRY_RETRY));
    }

    #[test]
    fn reject_backs_off_at_least_the_hint() {
        let t0 = Instant::now();
        let mut s = Session::new(3);
        s.start(t0);
        events(&mut s);
        s.handle_connected(Hello::default(), t0);
        s.handle_frame(
            Kind::Reject(Reject {
                reason: reject::Reason::BadToken as i32,
                message: "invalid token".into(),
                retry_after_ms: 5000,
            }),
            t0,
        );
        assert_eq!(events(&mut s), [Event::Disconnect("rejected"), Event::Lost]);
        assert!(s.poll_timeout().unwrap() >= t0 + ms(5000));
    }

    #[test]
    fn nothing_is_sent_unless_ready() {
        let t0 = Instant::now();
        let mut s = Session::new(3);
        s.send(Kind::Status(Status::default()), t0);
        assert_eq!(sent(&mut s), []);
        s.start(t0);
        s.handle_connected(Hello::default(), t0);
        s.send(Kind::Status(Status::default()), t0);
        assert!(
            matches!(sent(&mut s)[..], [Kind::Hello(_)]),
            "Status waits for the Welcome"
        );
    }

    #[test]
    fn a_server_that_stops_reading_gets_a_new_connection_not_dropped_frames() {
        // Regression (fuzz target `session`): Pongs and heartbeat Pings bypassed the queue's cap,
        // so a server that kept pinging without reading grew the queue without bound. A full
        // queue now means the connection is stuck: it is replaced, nothing is silently dropped.
        let (mut s, t0) = ready();
        let mut i = 0;
        while s.is_ready() {
            s.send(Kind::Status(Status::default()), t0 + ms(i));
            s.handle_frame(Kind::Ping(Ping { nonce: i }), t0 + ms(i));
            i += 1;
            assert!(i < 10 * TRANSMIT_CAP as u64, "never abandoned");
        }
        assert_eq!(
            events(&mut s),
            [Event::Disconnect("server not reading"), Event::Lost]
        );
        assert!(
            sent(&mut s).is_empty(),
            "the stuck queue went with the connection"
        );
        // A burst well within the cap is fine.
        let (mut s, t0) = ready();
        for k in 0..1000 {
            s.send(Kind::Status(Status::default()), t0 + ms(k));
        }
        assert!(s.is_ready());
        assert_eq!(sent(&mut s).len(), 1000);
    }

    #[test]
    fn a_tiny_heartbeat_from_the_server_is_clamped() {
        let t0 = Instant::now();
        let mut s = Session::new(3);
        s.start(t0);
        s.handle_connected(Hello::default(), t0);
        s.handle_frame(welcome(1), t0);
        assert_eq!(s.heartbeat(), MIN_HEARTBEAT);
    }

    /// A session whose attempts kept failing until its backoff is long (seconds), at `t`.
    fn backed_off_far() -> (Session, Instant) {
        let t0 = Instant::now();
        let mut s = Session::new(11);
        s.start(t0);
        let mut t = t0;
        for _ in 0..8 {
            s.handle_closed("refused", t);
            t = s.poll_timeout().unwrap();
            s.handle_timeout(t);
        }
        s.handle_closed("refused", t);
        events(&mut s);
        assert!(
            s.poll_timeout().unwrap() >= t + ms(10_000),
            "a long backoff"
        );
        (s, t)
    }

    #[test]
    fn hurry_connects_at_once_out_of_a_long_backoff_and_retries_quickly() {
        let (mut s, t) = backed_off_far();
        let now = t + ms(300);
        s.handle_hurry(now);
        assert_eq!(
            events(&mut s),
            [Event::Connect],
            "no waiting out the backoff"
        );
        // Refused again (the server is still restarting): retried after HURRY_RETRY, every time.
        let mut at = now;
        for _ in 0..10 {
            s.handle_closed("refused", at);
            assert_eq!(events(&mut s), [Event::Lost]);
            assert_eq!(s.poll_timeout(), Some(at + HURRY_RETRY));
            at += HURRY_RETRY;
            s.handle_timeout(at);
            assert_eq!(events(&mut s), [Event::Connect]);
        }
        // Negative control: without the hurry the same session would still be waiting.
        let (mut calm, t) = backed_off_far();
        calm.handle_timeout(t + ms(300));
        assert_eq!(events(&mut calm), []);
    }

    #[test]
    fn hurry_while_connected_or_connecting_changes_nothing_now() {
        let (mut s, t0) = ready();
        s.handle_hurry(t0);
        assert!(s.is_ready());
        assert_eq!(events(&mut s), []);
        let t0 = Instant::now();
        let mut s = Session::new(2);
        s.start(t0);
        events(&mut s);
        s.handle_hurry(t0);
        assert_eq!(events(&mut s), [], "already connecting");
    }

    #[test]
    fn hurry_still_waits_for_the_servers_own_retry_hint() {
        let t0 = Instant::now();
        let mut s = Session::new(3);
        s.start(t0);
        events(&mut s);
        s.handle_connected(Hello::default(), t0);
        s.handle_frame(
            Kind::Reject(Reject {
                reason: reject::Reason::Unavailable as i32,
                message: "busy".into(),
                retry_after_ms: 1000,
            }),
            t0,
        );
        events(&mut s);
        s.handle_hurry(t0 + ms(10));
        assert_eq!(events(&mut s), []);
        assert_eq!(s.poll_timeout(), Some(t0 + ms(1000)));
        s.handle_hurry(t0 + ms(1000));
        assert_eq!(events(&mut s), [Event::Connect]);
    }

    fn exited(code: i32) -> Status {
        Status {
            state: waypost_proto::status::State::Exited as i32,
            exit_code: code,
            ..Default::default()
        }
    }

    #[test]
    fn last_words_on_a_ready_session_are_confirmed_by_the_pong_that_follows_them() {
        let (mut s, t0) = ready();
        assert!(!s.last_words_pending());
        s.handle_last_words(exited(3), t0);
        assert!(s.last_words_pending());
        let out = sent(&mut s);
        let [Kind::Status(st), Kind::Ping(Ping { nonce })] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(st.exit_code, 3);
        // Some other Pong (a heartbeat's) proves nothing about the Status.
        s.handle_frame(
            Kind::Pong(Pong {
                nonce: nonce.wrapping_add(100),
            }),
            t0,
        );
        assert!(s.last_words_pending());
        s.handle_frame(Kind::Pong(Pong { nonce: *nonce }), t0);
        assert!(!s.last_words_pending());
    }

    #[test]
    fn last_words_while_away_reconnect_at_once_and_survive_another_loss() {
        let (mut s, t) = backed_off_far();
        s.handle_last_words(exited(0), t);
        assert_eq!(events(&mut s), [Event::Connect]);
        assert_eq!(sent(&mut s), [], "nothing goes before a Welcome");
        s.handle_connected(Hello::default(), t);
        s.handle_frame(welcome(1000), t);
        let out = sent(&mut s);
        assert!(
            matches!(out[..], [Kind::Hello(_), Kind::Status(_), Kind::Ping(_)]),
            "{out:?}"
        );
        // Lost before the Pong: the next connection says it again.
        s.handle_closed("reset", t + ms(5));
        assert!(s.last_words_pending());
        assert_eq!(s.poll_timeout(), Some(t + ms(5) + HURRY_RETRY));
        s.handle_timeout(t + ms(5) + HURRY_RETRY);
        s.handle_connected(Hello::default(), t + ms(200));
        // A late Pong from the old connection's numbering does not count on the new one.
        let Kind::Ping(Ping { nonce: old }) = out[2] else {
            unreachable!()
        };
        s.handle_frame(welcome(1000), t + ms(200));
        s.handle_frame(Kind::Pong(Pong { nonce: old }), t + ms(200));
        assert!(s.last_words_pending());
        let again = sent(&mut s);
        let Some(Kind::Ping(Ping { nonce })) = again.last() else {
            panic!("{again:?}")
        };
        assert!(again.iter().any(|k| matches!(k, Kind::Status(_))));
        s.handle_frame(Kind::Pong(Pong { nonce: *nonce }), t + ms(210));
        assert!(!s.last_words_pending());
    }
}
