//! The entrypoint's control-session core fed arbitrary frame sequences, the way the reactor
//! drives it: bytes from the "server" go through `wire::RecvBuf` (split at arbitrary points) into
//! `Session::handle_frame`; the session's events are routed to the log shipper (`logs::Logs`) and
//! the config core (`appconfig::ConfigCore`) exactly as `reactor.rs` routes them; time is a fake
//! clock advanced by the input; the transmit queue is drained only when the input says so (a
//! server that stops reading).
//!
//! Invariants checked on every step (beyond "no panic"):
//! - the session's transmit queue stays bounded, even when the server floods Pings and never reads;
//! - nothing but Hello is queued before the Welcome; events carrying frames arrive only while Ready;
//! - a due timer always moves forward when handled (the reactor can never spin on it);
//! - is_ready ⇒ has_connection; a started session always has a timer;
//! - the log ring stays within its byte cap (data cap + 0.1% for headers), sequence numbers
//!   never go backwards, and every
//!   hand-encoded LogBatch decodes (with prost) to the entries in sequence;
//! - the config version in force never goes backwards.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use waypost_entrypoint::appconfig::{ConfigCore, Step};
use waypost_entrypoint::logs::{LINE_CAP, LogMode, Logs};
use waypost_entrypoint::session::{Event, Session};
use waypost_entrypoint::wire::RecvBuf;
use waypost_proto::{
    self as proto, Config, ConfigApplied, ConfigFile, Hello, Kind, LogAck, LogStream, OnChange,
    Ping, Pong, Reject, Status, Welcome,
};

/// The session's own transmit cap is 4096 control frames (it replaces the connection rather than
/// exceed it); Hello is queued on top of an empty queue.
const TRANSMIT_BOUND: usize = 4096;
/// A small log buffer so the fuzzer reaches the drop paths quickly.
const LOG_CAP: usize = 4096;
/// What the ring may hold for LOG_CAP: the cap is on log data, entry headers get 0.1% on top
/// plus one header (`Logs::new`). `logs::HEADER` is private (16 bytes today): 64 bounds it.
const LOG_RING_MAX: usize = LOG_CAP + LOG_CAP / 1024 + 64;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.byte().unwrap_or(0)) | u16::from(self.byte().unwrap_or(0)) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    /// A small number, usually tiny, sometimes large.
    fn small(&mut self) -> u64 {
        match self.byte().unwrap_or(0) {
            b @ 0..=199 => u64::from(b),
            200..=249 => u64::from(self.u16()),
            _ => self.u64(),
        }
    }
    fn bytes(&mut self, max: usize) -> &[u8] {
        let n = (self.byte().unwrap_or(0) as usize)
            .min(max)
            .min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes(32)).into_owned()
    }
}

/// A structurally valid server frame built from the input (the fuzzer finds raw protobuf
/// slowly; this reaches every session state directly).
fn server_frame(inp: &mut Input) -> Kind {
    match inp.byte().unwrap_or(0) % 8 {
        0 => Kind::Welcome(Welcome {
            protocol_version: inp.byte().unwrap_or(1).into(),
            heartbeat_interval_ms: match inp.byte().unwrap_or(0) % 4 {
                0 => 0,
                1 => 15_000,
                2 => u32::MAX,
                _ => inp.u32(),
            },
            app: inp.string(),
            deployment: inp.string(),
            server_version: String::new(),
            config: if inp.byte().unwrap_or(0) & 1 == 1 {
                Some(config(inp))
            } else {
                None
            },
            log_acked_seq: inp.small(),
        }),
        1 => Kind::Ping(Ping { nonce: inp.small() }),
        2 => Kind::Pong(Pong { nonce: inp.small() }),
        3 => Kind::Reject(Reject {
            reason: inp.byte().unwrap_or(0).into(),
            message: inp.string(),
            retry_after_ms: inp.u32(),
        }),
        4 => Kind::LogAck(LogAck {
            up_to_seq: inp.small(),
        }),
        5 => Kind::Config(config(inp)),
        6 => Kind::Status(Status::default()), // a frame kind the entrypoint never receives
        _ => Kind::Hello(Hello::default()),
    }
}

fn config(inp: &mut Input) -> Config {
    let mut c = Config {
        version: inp.small(),
        restart_splay_ms: inp.u16().into(),
        stop_grace_ms: inp.u16().into(),
        ..Default::default()
    };
    for _ in 0..inp.byte().unwrap_or(0) % 4 {
        let k = inp.string();
        let v = inp.string();
        c.env.insert(k, v);
    }
    if inp.byte().unwrap_or(0) & 1 == 1 {
        c.files.push(ConfigFile {
            path: format!("/tmp/x/{}", inp.byte().unwrap_or(0)),
            mode: 0o644,
            contents: inp.bytes(16).to_vec(),
        });
    }
    c.on_change = Some(OnChange {
        action: (inp.byte().unwrap_or(0) % 4).into(),
        signal: inp.string(),
    });
    c
}

struct Harness {
    session: Session,
    logs: Logs,
    cfg: ConfigCore,
    rbuf: RecvBuf,
    now: Instant,
    started: bool,
    /// The reactor holds a socket (between Event::Connect and Lost/Disconnect).
    socket: bool,
    /// Config versions in force, ever.
    cfg_version: u64,
    log_next_seq: u64,
    /// Whether the child is running (config effects depend on it).
    running: bool,
}

impl Harness {
    fn events(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                Event::Connect => self.socket = true,
                Event::Disconnect(_) => {
                    self.socket = false;
                    self.rbuf.clear();
                }
                Event::Lost => {
                    self.socket = false;
                    self.rbuf.clear();
                }
                Event::Welcome(w) => {
                    assert!(self.session.is_ready(), "Welcome event while not Ready");
                    self.logs.handle_reconnect(w.log_acked_seq, self.now);
                    if let Some(c) = w.config {
                        self.config(c);
                    }
                }
                Event::Heartbeat => {
                    self.session.send(Kind::Status(Status {
                        config_version: self.cfg.version(),
                        ..Default::default()
                    }), self.now);
                }
                Event::Frame(kind) => {
                    assert!(
                        self.session.is_ready(),
                        "a frame was routed while not Ready"
                    );
                    assert!(
                        !matches!(kind, Kind::Ping(_) | Kind::Pong(_) | Kind::Welcome(_)),
                        "the session must consume its own frames"
                    );
                    match kind {
                        Kind::Config(c) => self.config(c),
                        Kind::LogAck(a) => self.logs.handle_ack(a.up_to_seq),
                        _ => {}
                    }
                }
            }
        }
    }

    fn config(&mut self, c: Config) {
        self.cfg.handle_config(c, self.running, self.now);
        self.config_steps();
    }

    fn config_steps(&mut self) {
        while let Some(step) = self.cfg.poll_step() {
            match step {
                Step::Apply { version, .. } => {
                    // Alternate success and failure deterministically from the version.
                    let ok = version % 3 != 1;
                    self.cfg.handle_applied(ok);
                    self.session.send(Kind::ConfigApplied(ConfigApplied {
                        version,
                        error: String::new(),
                    }), self.now);
                }
                Step::Restart | Step::Signal(_) => {}
                Step::LogLevel(_) => {
                    waypost_entrypoint::logger::set_level(waypost_entrypoint::logger::Level::Error)
                }
            }
        }
        let v = self.cfg.version();
        assert!(
            v >= self.cfg_version,
            "config version went backwards: {} -> {v}",
            self.cfg_version
        );
        self.cfg_version = v;
    }

    fn frame(&mut self, kind: Kind) {
        self.session.handle_frame(kind, self.now);
        self.events();
    }

    /// Raw bytes from the server, split into reads of the given sizes.
    fn wire(&mut self, mut bytes: &[u8], split: usize) {
        if !self.socket || !self.session.has_connection() {
            return;
        }
        while !bytes.is_empty() {
            let space = self.rbuf.space();
            assert!(!space.is_empty(), "RecvBuf offered an empty read buffer");
            let n = space.len().min(bytes.len()).min(split.max(1));
            space[..n].copy_from_slice(&bytes[..n]);
            self.rbuf.filled(n);
            bytes = &bytes[n..];
            assert!(
                self.rbuf.capacity() <= proto::MAX_FRAME + proto::HEADER_LEN + 64 * 1024,
                "RecvBuf grew past one frame"
            );
            while let Some(f) = self.rbuf.next_frame() {
                match f {
                    Ok(proto::Frame { kind: Some(kind) }) => self.frame(kind),
                    Ok(proto::Frame { kind: None }) => {}
                    Err(_) => {
                        // The reactor drops the connection and tells the session.
                        self.rbuf.clear();
                        self.socket = false;
                        self.session.handle_closed("bad frame", self.now);
                        self.events();
                        return;
                    }
                }
                if !self.socket {
                    return; // a Reject closed it
                }
            }
        }
    }

    fn timers(&mut self) {
        if let Some(t) = self.session.poll_timeout() {
            if t <= self.now {
                self.session.handle_timeout(self.now);
                self.events();
                if let Some(t2) = self.session.poll_timeout() {
                    assert!(
                        t2 > self.now,
                        "a handled timer is still due: the reactor would spin"
                    );
                }
            }
        }
        if let Some(t) = self.cfg.poll_timeout() {
            if t <= self.now {
                self.cfg.handle_timeout(self.now);
                self.config_steps();
            }
        }
        if self
            .logs
            .poll_timeout(self.session.is_ready(), self.now)
            .is_some_and(|t| t <= self.now)
        {
            self.logs.handle_timeout(self.now);
        }
    }

    /// What the reactor's writer does when the socket takes `max` frames.
    fn drain(&mut self, max: usize) {
        let mut n = 0;
        while n < max {
            let Some(kind) = self.session.poll_transmit() else {
                // The whole queue came out: it was within the bound.
                assert!(n <= TRANSMIT_BOUND + 1, "transmit queue grew to {n} frames");
                break;
            };
            n += 1;
            if !self.session.is_ready() {
                assert!(
                    matches!(kind, Kind::Hello(_)),
                    "{kind:?} queued before the Welcome"
                );
            }
            let mut out = Vec::new();
            proto::encode(&proto::Frame::from(kind), &mut out).expect("a control frame encodes");
        }
    }

    fn ship_logs(&mut self) {
        if !self.session.is_ready() || !self.logs.batch_due(self.now, true) {
            return;
        }
        let mut out = Vec::new();
        if !self.logs.encode_batch(&mut out, self.now) {
            return;
        }
        let mut input = &out[..];
        let frame = proto::decode(&mut input)
            .expect("a complete frame")
            .expect("a LogBatch decodes");
        assert!(input.is_empty(), "encode_batch wrote trailing bytes");
        let Some(Kind::LogBatch(b)) = frame.kind else {
            panic!("encode_batch wrote {frame:?}")
        };
        assert!(!b.entries.is_empty(), "an empty LogBatch");
        assert!(
            b.first_seq + b.entries.len() as u64 <= self.logs.next_seq(),
            "a batch beyond next_seq"
        );
        for e in &b.entries {
            assert!(e.data.len() <= LINE_CAP, "an entry longer than LINE_CAP");
        }
        // The server acknowledges some of it, sometimes.
        if b.first_seq % 2 == 0 {
            self.logs.handle_ack(b.first_seq + b.entries.len() as u64);
        }
    }

    fn check(&mut self) {
        if self.session.is_ready() {
            assert!(self.session.has_connection());
        }
        if self.started {
            assert!(
                self.session.poll_timeout().is_some(),
                "a started session without a timer"
            );
        }
        assert!(
            self.logs.held() <= LOG_RING_MAX,
            "the log ring exceeded its cap: {}",
            self.logs.held()
        );
        let next = self.logs.next_seq();
        assert!(next >= self.log_next_seq, "log sequence went backwards");
        self.log_next_seq = next;
        assert!(
            self.session.heartbeat() >= waypost_entrypoint::session::MIN_HEARTBEAT,
            "heartbeat below the minimum"
        );
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(|| {
        waypost_entrypoint::logger::set_level(waypost_entrypoint::logger::Level::Error);
        Instant::now()
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let mut inp = Input(data);
    let seed = inp.u64();
    let mut h = Harness {
        session: Session::new(seed),
        logs: Logs::new(LOG_CAP, LogMode::Drop),
        cfg: ConfigCore::new(seed),
        rbuf: RecvBuf::new(),
        now: base,
        started: false,
        socket: false,
        cfg_version: 0,
        log_next_seq: 0,
        running: false,
    };
    let mut steps = 0;
    while let Some(op) = inp.byte() {
        steps += 1;
        if steps > 4096 {
            break;
        }
        match op % 12 {
            0 => {
                h.session.start(h.now);
                h.started = true;
                h.events();
            }
            1 => {
                let hello = Hello {
                    protocol_version: 1,
                    instance_id: vec![7; 16],
                    next_log_seq: h.logs.next_seq(),
                    config_version: h.cfg.version(),
                    ..Default::default()
                };
                if h.socket {
                    h.session.handle_connected(hello, h.now);
                    h.events();
                }
            }
            2 => {
                h.socket = false;
                h.rbuf.clear();
                h.session.handle_closed("closed", h.now);
                h.events();
            }
            3 => {
                // Time passes; the reactor handles whatever is due.
                let ms = inp.small().min(1 << 40);
                h.now += Duration::from_millis(ms);
                h.timers();
            }
            4 => {
                // Jump to exactly the session's deadline (the boundary case).
                if let Some(t) = h.session.poll_timeout() {
                    if t > h.now {
                        h.now = t;
                    }
                }
                h.timers();
            }
            5 => {
                let kind = server_frame(&mut inp);
                if h.socket && h.session.has_connection() {
                    h.frame(kind);
                }
            }
            6 => {
                // Raw wire bytes: an encoded frame of the input's choosing, or garbage.
                let split = usize::from(inp.byte().unwrap_or(1));
                let mut wire = Vec::new();
                if inp.byte().unwrap_or(0) & 1 == 0 {
                    let kind = server_frame(&mut inp);
                    proto::encode(&proto::Frame::from(kind), &mut wire).unwrap();
                } else {
                    wire.extend_from_slice(inp.bytes(64));
                }
                h.wire(&wire, split);
            }
            7 => {
                let n = usize::from(inp.byte().unwrap_or(0));
                h.drain(n);
            }
            8 => {
                let stream = match inp.byte().unwrap_or(0) % 3 {
                    0 => LogStream::Stdout,
                    1 => LogStream::Stderr,
                    _ => LogStream::Entrypoint,
                };
                let bytes = inp.bytes(255).to_vec();
                let now = h.now;
                if stream == LogStream::Entrypoint {
                    h.logs.handle_own(&bytes, 1, now);
                } else {
                    h.logs.handle_output(stream, &bytes, 1, now);
                    if inp.byte().unwrap_or(0) == 0 {
                        h.logs.handle_eof(stream, now);
                    }
                }
            }
            9 => h.ship_logs(),
            10 => {
                // The child starts or stops (config effects depend on it); a heartbeat status.
                h.running = !h.running;
                let now = h.now;
                h.session.send(Kind::Status(Status::default()), now);
            }
            _ => {
                // Everything the socket can take (the common case of a healthy connection).
                h.drain(usize::MAX);
            }
        }
        h.check();
    }
    // Whatever is still queued is within the bound.
    let mut queued = 0;
    while h.session.poll_transmit().is_some() {
        queued += 1;
    }
    assert!(
        queued <= TRANSMIT_BOUND + 1,
        "transmit queue grew to {queued} frames"
    );
    waypost_entrypoint::logger::drain(|_| {});
});
