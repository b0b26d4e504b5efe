//! The entrypoint's agent core (`agent::Agent`, the code that ships) fed arbitrary frame
//! sequences and I/O outcomes, the way the reactor drives it: bytes from the "server" go through
//! `wire::RecvBuf` (split at arbitrary points) into `Agent::handle_frame`; the agent's actions
//! are carried out by this harness (connections, config files, the child, exec processes, app
//! sockets — each succeeding or failing as the input says); exec and stream output comes from a
//! fake `Pull`; time is a fake clock advanced by the input; the connection is written only when
//! the input says so (a server that stops reading).
//!
//! Invariants checked on every step (beyond "no panic"):
//! - the session's transmit queue stays bounded, even when the server floods Pings and never reads;
//! - nothing but Hello goes out before the Welcome; exec processes and app connections are
//!   started only while Ready (frames are routed only then);
//! - a due session timer always moves forward when handled (the reactor can never spin on it);
//! - is_ready ⇒ has_connection; the started session always has a timer;
//! - the log ring stays within its byte cap (data cap + 0.1% for headers), sequence numbers
//!   never go backwards, and every hand-encoded LogBatch decodes (with prost) to entries in
//!   sequence;
//! - the config version in force never goes backwards.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::ffi::OsString;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use waypost_entrypoint::agent::{
    Agent, Identity, IoAction, IoEvent, Local, Pull, Read, Source, Transmit,
};
use waypost_entrypoint::logs::LINE_CAP;
use waypost_entrypoint::settings::Settings;
use waypost_entrypoint::wire::RecvBuf;
use waypost_proto::{
    self as proto, Config, ConfigFile, ExecInput, ExecStart, ExecStdinClose, Kind, LogAck,
    LogStream, OnChange, Ping, Pong, Reject, Status, StreamClose, StreamData, StreamOpen, Welcome,
    WindowUpdate, window_update,
};

/// The session's own transmit cap is 4096 control frames (it replaces the connection rather than
/// exceed it); Hello is queued on top of an empty queue. Exec exit reports and stream half-closes
/// are pulled on the fly, at most one per session or stream.
const TRANSMIT_BOUND: usize = 4096 + 1 + 16 + 1024;
/// A small log buffer so the fuzzer reaches the drop paths quickly (the smallest allowed).
const LOG_CAP: usize = 64 * 1024;
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
    match inp.byte().unwrap_or(0) % 14 {
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
        7 => Kind::ExecStart(ExecStart {
            session: inp.small(),
            argv: vec![inp.string()],
            stdin: inp.byte().unwrap_or(0) & 1 == 1,
            ..Default::default()
        }),
        8 => Kind::ExecInput(ExecInput {
            session: inp.small(),
            data: inp.bytes(64).to_vec(),
        }),
        9 => Kind::ExecStdinClose(ExecStdinClose {
            session: inp.small(),
        }),
        10 => Kind::StreamOpen(StreamOpen {
            stream: inp.small(),
            target_port: inp.u16().into(),
            client_addr: String::new(),
        }),
        11 => Kind::StreamData(StreamData {
            stream: inp.small(),
            data: inp.bytes(64).to_vec(),
        }),
        12 => Kind::StreamClose(StreamClose {
            stream: inp.small(),
            half: inp.byte().unwrap_or(0) & 1 == 1,
            error: String::new(),
        }),
        _ => Kind::WindowUpdate(WindowUpdate {
            target: Some(if inp.byte().unwrap_or(0) & 1 == 1 {
                window_update::Target::Stream(inp.small())
            } else {
                window_update::Target::ExecSession(inp.small())
            }),
            credits: inp.u32(),
        }),
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

/// Exec and stream output as the input plays it: bytes waiting per source, sources at EOF.
#[derive(Default)]
struct FakeFds {
    data: Vec<(Source, Vec<u8>)>,
    eof: Vec<Source>,
}

impl Pull for FakeFds {
    fn read(&mut self, src: Source, buf: &mut [u8]) -> Read {
        if let Some(i) = self.data.iter().position(|(s, _)| *s == src) {
            let data = &mut self.data[i].1;
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            data.drain(..n);
            if data.is_empty() {
                self.data.remove(i);
            }
            return Read::Data(n);
        }
        if self.eof.contains(&src) {
            Read::Eof
        } else {
            Read::Blocked
        }
    }
}

struct Harness {
    agent: Agent,
    rbuf: RecvBuf,
    fds: FakeFds,
    now: Instant,
    /// The reactor holds a socket (between IoAction::Connect and Disconnect).
    socket: bool,
    /// The main child's pid, while it runs.
    child: Option<i32>,
    next_pid: i32,
    /// Whether spawns, exec starts and app connects succeed (from the input).
    succeed: bool,
    exited: bool,
    /// Config versions in force, ever.
    cfg_version: u64,
    log_next_seq: u64,
}

impl Harness {
    /// Carries out the agent's actions as the reactor would, succeeding or failing by the input.
    fn act(&mut self) {
        while let Some(action) = self.agent.poll_io() {
            let now = self.now;
            match action {
                IoAction::Connect(_) => self.socket = true,
                IoAction::Disconnect { .. } => {
                    self.socket = false;
                    self.rbuf.clear();
                }
                IoAction::WriteConfig {
                    version,
                    write,
                    remove,
                } => {
                    // Alternate success and failure deterministically from the version.
                    let result = if version % 3 != 1 {
                        Ok(())
                    } else {
                        Err("disk full".into())
                    };
                    let (wrote, removed) = (write.len(), remove.len());
                    self.agent.handle_io(
                        IoEvent::ConfigWritten {
                            version,
                            wrote,
                            removed,
                            result,
                        },
                        now,
                    );
                }
                IoAction::SpawnChild => {
                    if self.succeed {
                        self.next_pid += 1;
                        self.child = Some(self.next_pid);
                        self.agent.handle_io(
                            IoEvent::ChildSpawned {
                                pid: self.next_pid,
                                oom_kills: None,
                            },
                            now,
                        );
                    } else {
                        self.agent
                            .handle_io(IoEvent::ChildSpawnFailed { code: 127 }, now);
                    }
                }
                IoAction::StartExec { slot, .. } => {
                    assert!(
                        self.agent.is_ready(),
                        "an exec process started while not Ready"
                    );
                    if self.succeed {
                        self.next_pid += 1;
                        self.agent.handle_io(
                            IoEvent::ExecStarted {
                                slot,
                                pid: self.next_pid,
                            },
                            now,
                        );
                    } else {
                        self.agent.handle_io(
                            IoEvent::ExecFailed {
                                slot,
                                code: 126,
                                error: "no".into(),
                            },
                            now,
                        );
                    }
                }
                IoAction::ConnectTunnel { slot, .. } => {
                    assert!(
                        self.agent.is_ready(),
                        "an app connection started while not Ready"
                    );
                    if self.succeed {
                        self.agent.handle_io(IoEvent::TunnelConnected(slot), now);
                    } else {
                        let error = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                        self.agent.handle_io(
                            IoEvent::TunnelRefused {
                                slot,
                                error: &error,
                            },
                            now,
                        );
                    }
                }
                IoAction::Exit(_) => self.exited = true,
                IoAction::Kill { .. }
                | IoAction::SignalDescendants { .. }
                | IoAction::ResizeExec { .. }
                | IoAction::CloseExecStdin(_)
                | IoAction::CloseExecOutput { .. }
                | IoAction::CloseExec(_)
                | IoAction::ShutdownTunnel(_)
                | IoAction::CloseTunnel(_) => {}
            }
        }
        let v = self.agent.config_version();
        assert!(
            v >= self.cfg_version,
            "config version went backwards: {} -> {v}",
            self.cfg_version
        );
        self.cfg_version = v;
    }

    fn frame(&mut self, kind: Kind) {
        self.agent.handle_frame(kind, self.now);
        self.act();
    }

    fn io(&mut self, event: IoEvent<'_>) {
        self.agent.handle_io(event, self.now);
        self.act();
    }

    /// Raw bytes from the server, split into reads of the given sizes.
    fn wire(&mut self, mut bytes: &[u8], split: usize) {
        if !self.socket || !self.agent.has_connection() {
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
                        // The reactor drops the connection and tells the agent.
                        self.rbuf.clear();
                        self.socket = false;
                        self.io(IoEvent::Closed("bad frame"));
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
        let session_due = self
            .agent
            .session()
            .and_then(|s| s.poll_timeout())
            .is_some_and(|t| t <= self.now);
        self.agent.handle_timeout(self.now);
        self.act();
        if session_due {
            if let Some(t2) = self.agent.session().and_then(|s| s.poll_timeout()) {
                assert!(
                    t2 > self.now,
                    "a handled timer is still due: the reactor would spin"
                );
            }
        }
    }

    /// What the reactor's writer does when the socket takes `max` frames.
    fn drain(&mut self, max: usize) {
        let mut n = 0;
        while n < max {
            let Some(t) = self.agent.poll_transmit(self.now, &mut self.fds) else {
                // The whole queue came out: it was within the bound.
                assert!(n <= TRANSMIT_BOUND, "transmit queue grew to {n} frames");
                break;
            };
            let kind = match t {
                Transmit::Frame(kind) => kind,
                Transmit::LogBatch => {
                    self.ship_logs();
                    continue;
                }
            };
            if matches!(kind, Kind::ExecOutput(_) | Kind::StreamData(_)) {
                continue; // pulled from the fake fds, as much as the input queued
            }
            n += 1;
            if !self.agent.is_ready() {
                assert!(
                    matches!(kind, Kind::Hello(_)),
                    "{kind:?} queued before the Welcome"
                );
            }
            let mut out = Vec::new();
            proto::encode(&proto::Frame::from(kind), &mut out).expect("a frame encodes");
        }
        self.act();
    }

    fn ship_logs(&mut self) {
        let mut out = Vec::new();
        if !self.agent.encode_logs(&mut out, self.now) {
            return;
        }
        let mut input = &out[..];
        let frame = proto::decode(&mut input)
            .expect("a complete frame")
            .expect("a LogBatch decodes");
        assert!(input.is_empty(), "encode_logs wrote trailing bytes");
        let Some(Kind::LogBatch(b)) = frame.kind else {
            panic!("encode_logs wrote {frame:?}")
        };
        assert!(!b.entries.is_empty(), "an empty LogBatch");
        let next_seq = self.agent.logs().expect("logs").next_seq();
        assert!(
            b.first_seq + b.entries.len() as u64 <= next_seq,
            "a batch beyond next_seq"
        );
        for e in &b.entries {
            assert!(e.data.len() <= LINE_CAP, "an entry longer than LINE_CAP");
        }
        // The server acknowledges some of it, sometimes.
        if b.first_seq % 2 == 0 {
            self.frame(Kind::LogAck(LogAck {
                up_to_seq: b.first_seq + b.entries.len() as u64,
            }));
        }
    }

    fn check(&mut self) {
        let session = self.agent.session().expect("a server is configured");
        if session.is_ready() {
            assert!(session.has_connection());
        }
        assert!(
            session.poll_timeout().is_some(),
            "a started session without a timer"
        );
        assert!(
            session.heartbeat() >= waypost_entrypoint::session::MIN_HEARTBEAT,
            "heartbeat below the minimum"
        );
        let logs = self.agent.logs().expect("logs are on");
        assert!(
            logs.held() <= LOG_RING_MAX,
            "the log ring exceeded its cap: {}",
            logs.held()
        );
        let next = logs.next_seq();
        assert!(next >= self.log_next_seq, "log sequence went backwards");
        self.log_next_seq = next;
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(|| {
        waypost_entrypoint::logger::set_level(waypost_entrypoint::logger::Level::Error);
        Instant::now()
    })
}

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let log_cap = LOG_CAP.to_string();
        let vars = [
            ("WAYPOST_SERVER", "127.0.0.1:9701"),
            ("WAYPOST_TOKEN", "t"),
            ("WAYPOST_LOG_BUFFER", log_cap.as_str()),
            ("WAYPOST_STARTUP_TIMEOUT", "1s"),
        ];
        Settings::from_vars(vars).expect("valid settings")
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let mut inp = Input(data);
    let seed = inp.u64();
    let env: Vec<(OsString, OsString)> = vec![("PATH".into(), "/bin".into())];
    let id = Identity {
        instance_id: vec![7; 16],
        hostname: "fuzz".into(),
        pid: 1,
        env,
        seeds: [seed, seed ^ 1],
    };
    let mut h = Harness {
        agent: Agent::new(settings(), id, base),
        rbuf: RecvBuf::new(),
        fds: FakeFds::default(),
        now: base,
        socket: false,
        child: None,
        next_pid: 100,
        succeed: true,
        exited: false,
        cfg_version: 0,
        log_next_seq: 0,
    };
    h.act();
    let mut steps = 0;
    while let Some(op) = inp.byte() {
        steps += 1;
        if steps > 4096 || h.exited {
            break;
        }
        match op % 14 {
            0 => {
                // The main child exits (or some other process is reaped).
                let pid = h.child.take().unwrap_or(7);
                let code = inp.byte().map(i32::from);
                h.io(IoEvent::Reaped {
                    pid,
                    code,
                    signal: None,
                    oom_kills: None,
                });
            }
            1 => {
                if h.socket {
                    h.io(IoEvent::Connected);
                }
            }
            2 => {
                h.socket = false;
                h.rbuf.clear();
                h.io(IoEvent::Closed("closed"));
            }
            3 => {
                // Time passes; the reactor handles whatever is due.
                let ms = inp.small().min(1 << 40);
                h.now += Duration::from_millis(ms);
                h.timers();
            }
            4 => {
                // Jump to exactly the agent's deadline (the boundary case).
                if let Some(t) = h.agent.poll_timeout(h.now) {
                    if t > h.now {
                        h.now = t;
                    }
                }
                h.timers();
            }
            5 => {
                let kind = server_frame(&mut inp);
                if h.socket && h.agent.has_connection() {
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
                    let rec = waypost_entrypoint::logger::Record {
                        level: waypost_entrypoint::logger::Level::Info,
                        msg: String::from_utf8_lossy(&bytes).into_owned(),
                    };
                    h.agent.handle_own_log(&rec, 1, now);
                } else {
                    h.agent.handle_output(stream, &bytes, 1, now);
                    if inp.byte().unwrap_or(0) == 0 {
                        h.agent.handle_output_eof(stream, now);
                    }
                }
            }
            9 => h.succeed = !h.succeed,
            10 => {
                let sig = if inp.byte().unwrap_or(0) & 1 == 0 {
                    libc_sigterm()
                } else {
                    1
                };
                h.io(IoEvent::Signal(sig));
            }
            11 => {
                // Output from an exec session or an app socket, or its end.
                let slot = usize::from(inp.byte().unwrap_or(0));
                let src = if slot & 1 == 0 {
                    Source::Exec((slot >> 1) % 16, slot % 3)
                } else {
                    Source::Tunnel(slot >> 1)
                };
                if inp.byte().unwrap_or(0) & 1 == 0 {
                    h.fds.data.push((src, inp.bytes(255).to_vec()));
                } else {
                    h.fds.eof.push(src);
                }
            }
            12 => {
                let bits = inp.byte().unwrap_or(0);
                let local = Local {
                    descendants: bits & 1 != 0,
                    output: bits & 2 != 0,
                    unlogged: bits & 4 != 0,
                };
                h.io(IoEvent::Leftovers(local));
            }
            _ => {
                // Everything the socket can take (the common case of a healthy connection).
                h.drain(usize::MAX);
            }
        }
        h.check();
    }
    waypost_entrypoint::logger::drain(|_| {});
});

/// SIGTERM's number on Linux (the fuzz crate has no libc dependency).
fn libc_sigterm() -> i32 {
    15
}
