//! The one event loop. The only place that polls, registers fds, does I/O, or reads the clock
//! (house rule 1). Policy lives in the sans-IO cores; this file turns readiness and time into
//! their inputs and their actions into system calls.
//!
//! mio is edge-triggered: every ready fd is drained until `WouldBlock` (house rule 3), and a
//! stream that stopped reading because its buffer was full is resumed by hand once there is room.

use crate::appconfig::{ConfigCore, Step};
use crate::config::{HostPort, SECRET_VARS, Settings};
use crate::error::Error;
use crate::exec::{self, MAX_SESSIONS};
use crate::logger::{self, Record};
use crate::logs::Logs;
use crate::relay::Relay;
use crate::session::{self, Session};
use crate::supervisor::{Action, ChildState, Leftovers, Supervisor, Target};
use crate::tls::{Conn, Received};
use crate::tunnel::{self, MAX_STREAMS};
use crate::wire::{RecvBuf, SendBuf};
use crate::sys::signals::{self, SigSet};
use crate::sys::spawn::{self, Placement, Spec, Stdio};
use crate::{debug, error, info, trace, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use waypost_proto::{
    status, window_update, ConfigApplied, ConfigFile, ExecExit, ExecOutput, ExecStart, ExecStarted, Features, Frame, Hello, Kind, LogStream,
    OutputStream, Status, StreamClose, StreamData, StreamOpen, WindowUpdate,
};

/// Wall-clock milliseconds since the Unix epoch (for log timestamps).
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock microseconds since the Unix epoch (for log entries).
fn wall_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Reports an error that ends the entrypoint before the loop runs, and gives its exit code.
pub fn fail_early(e: &Error) -> i32 {
    let mut line = Vec::new();
    logger::format_line(&Record { level: logger::Level::Error, msg: e.to_string() }, wall_ms(), &mut line);
    let _ = rustix::io::write(rustix::stdio::stderr(), &line);
    e.exit_code()
}

/// The child's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Stdout = 0,
    Stderr = 1,
}

/// First token number of exec sessions (4 per slot).
const EXEC_TOKENS: usize = 0x100;
/// First token number of URL-service streams (1 per slot).
const TUNNEL_TOKENS: usize = 0x1000;

/// Every registered fd, as one enum (DESIGN.md); dispatch is an exhaustive match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// The signalfd.
    Signals,
    /// Our read end of the child's stdout/stderr pipe.
    ChildPipe(Out),
    /// Our own stdout/stderr, when writes to it can block.
    Sink(Out),
    /// The connection to the server (or its proxy).
    Control,
    /// Wake-ups from the DNS helper thread.
    Waker,
    /// An exec session's fd: slot, and which (0 stdin or PTY master, 1 stdout, 2 stderr).
    Exec(u8, u8),
    /// A URL-service stream's socket to the app, by slot.
    Tunnel(u16),
}

impl Tok {
    fn token(self) -> Token {
        Token(match self {
            Tok::Signals => 0,
            Tok::ChildPipe(o) => 1 + o as usize,
            Tok::Sink(o) => 3 + o as usize,
            Tok::Control => 5,
            Tok::Waker => 6,
            Tok::Exec(slot, which) => EXEC_TOKENS + 4 * slot as usize + which as usize,
            Tok::Tunnel(slot) => TUNNEL_TOKENS + slot as usize,
        })
    }

    fn from_token(t: Token) -> Option<Tok> {
        Some(match t.0 {
            0 => Tok::Signals,
            1 => Tok::ChildPipe(Out::Stdout),
            2 => Tok::ChildPipe(Out::Stderr),
            3 => Tok::Sink(Out::Stdout),
            4 => Tok::Sink(Out::Stderr),
            5 => Tok::Control,
            6 => Tok::Waker,
            t if (EXEC_TOKENS..EXEC_TOKENS + 4 * MAX_SESSIONS).contains(&t) && (t - EXEC_TOKENS) % 4 < 3 => {
                Tok::Exec(((t - EXEC_TOKENS) / 4) as u8, ((t - EXEC_TOKENS) % 4) as u8)
            }
            t if (TUNNEL_TOKENS..TUNNEL_TOKENS + MAX_STREAMS).contains(&t) => Tok::Tunnel((t - TUNNEL_TOKENS) as u16),
            _ => return None,
        })
    }
}

/// How bytes get written to one of our own output fds without blocking the loop.
enum SinkMode {
    /// A private non-blocking open file description of the same pipe/FIFO/terminal (reopened
    /// through /proc/self/fd), so the shared one others may use is left blocking.
    Reopened(OwnedFd),
    /// A socket: `send(MSG_DONTWAIT)` is non-blocking per call.
    Socket,
    /// A pipe we had to switch to non-blocking itself (no /proc); restored at exit.
    SharedNonBlocking(OFlags),
    /// A regular file or device: writes complete without waiting for a reader.
    Blocking,
}

struct Sink {
    out: Out,
    mode: SinkMode,
    /// Whether the last write did not hit `WouldBlock` (edge-triggered readiness).
    writable: bool,
    /// The reader went away (EPIPE): output is discarded from now on.
    broken: bool,
}

impl Sink {
    /// Sets up writing to our fd 1 or 2.
    fn new(out: Out) -> Sink {
        let fd = std_fd(out);
        let mode = match rustix::fs::fstat(fd).map(|st| FileType::from_raw_mode(st.st_mode)) {
            Ok(FileType::Socket) => SinkMode::Socket,
            Ok(FileType::Fifo) => Sink::reopen(fd).unwrap_or_else(|| {
                // No /proc: switch the shared description itself, and restore it at exit.
                match rustix::fs::fcntl_getfl(fd) {
                    Ok(orig) if rustix::fs::fcntl_setfl(fd, orig | OFlags::NONBLOCK).is_ok() => SinkMode::SharedNonBlocking(orig),
                    _ => SinkMode::Blocking,
                }
            }),
            // A terminal we cannot reopen gets plain writes (only ^S stalls those).
            Ok(FileType::CharacterDevice) if rustix::termios::isatty(fd) => Sink::reopen(fd).unwrap_or(SinkMode::Blocking),
            _ => SinkMode::Blocking,
        };
        Sink { out, mode, writable: true, broken: false }
    }

    /// A new open file description of `fd`'s pipe or terminal, non-blocking for us alone.
    fn reopen(fd: BorrowedFd<'_>) -> Option<SinkMode> {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        rustix::fs::open(path.as_str(), flags, Mode::empty()).ok().map(SinkMode::Reopened)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match &self.mode {
            SinkMode::Reopened(own) => own.as_fd(),
            _ => std_fd(self.out),
        }
    }

    /// Whether writes can return `WouldBlock` (and so need WRITABLE interest).
    fn can_block(&self) -> bool {
        !matches!(self.mode, SinkMode::Blocking)
    }

    fn write(&self, buf: &[u8]) -> rustix::io::Result<usize> {
        match self.mode {
            SinkMode::Socket => rustix::net::send(self.fd(), buf, rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL),
            _ => rustix::io::write(self.fd(), buf),
        }
    }

    /// Undoes what [`Sink::new`] changed on the shared description.
    fn restore(&self) {
        if let SinkMode::SharedNonBlocking(orig) = self.mode {
            let _ = rustix::fs::fcntl_setfl(std_fd(self.out), orig);
        }
    }
}

fn std_fd(out: Out) -> BorrowedFd<'static> {
    match out {
        Out::Stdout => rustix::stdio::stdout(),
        Out::Stderr => rustix::stdio::stderr(),
    }
}

/// One captured output stream of the child: its pipe, the buffer, our fd.
struct Stream {
    /// Our read end of the child's pipe; `None` when not captured or at EOF.
    pipe: Option<OwnedFd>,
    /// Readiness seen and not yet drained to `WouldBlock`.
    readable: bool,
    /// The pipe reached EOF; the log shipper is told once it has every byte before it.
    eof: bool,
    relay: Relay,
}

/// Own log lines waiting for stderr: a handful of lines; beyond this they are dropped (counted
/// by the logger queue before they get here).
const OWN_LOG_CAP: usize = 16 * 1024;

/// While cleaning up, how often to look for descendants that are not our children (their exit
/// does not raise SIGCHLD here).
const CLEANUP_TICK: Duration = Duration::from_millis(50);

/// DNS answers from the helper thread.
type Resolved = Result<Vec<SocketAddr>, String>;

/// A URL-service stream: its state and its socket to the app (None while held or retrying).
struct TunnelIo {
    state: tunnel::Stream,
    sock: Option<mio::net::TcpStream>,
    /// The address to try next if this connect is refused (::1 after 127.0.0.1).
    fallback: Option<SocketAddr>,
    readable: bool,
    writable: bool,
}

/// An exec session's file descriptors: `fds[0]` is stdin (or the PTY master, which carries
/// both directions), `fds[1]`/`fds[2]` stdout/stderr pipes.
struct ExecIo {
    state: exec::Session,
    fds: [Option<OwnedFd>; 3],
    /// Readiness seen and not yet drained: readable for 0 (PTY), 1, 2.
    readable: [bool; 3],
    writable: bool,
}

/// Stack for the DNS helper thread: getaddrinfo needs a few KiB (musl) to tens of KiB (glibc NSS).
const DNS_STACK: usize = 256 * 1024;

/// The server side: the session core and the connection it rides on.
struct Control {
    session: Session,
    tls: Arc<rustls::ClientConfig>,
    server: HostPort,
    /// The HTTP proxy to go through, unless NO_PROXY exempts the server.
    proxy: Option<HostPort>,
    conn: Option<Conn>,
    /// What `conn`'s socket is registered for.
    interest: Option<Interest>,
    /// Addresses of the current attempt, tried in order.
    addrs: Vec<SocketAddr>,
    /// An answer from the DNS thread, while one is outstanding.
    dns: Option<Receiver<Resolved>>,
    waker: Arc<Waker>,
    rbuf: RecvBuf,
    wbuf: SendBuf,
    /// The fixed part of our Hello.
    hello: Hello,
}

pub struct Reactor {
    poll: Poll,
    events: Events,
    signals: OwnedFd,
    sup: Supervisor,
    argv: Vec<OsString>,
    child_env: Vec<(OsString, OsString)>,
    /// Whether the child's stdout/stderr go through us (else it inherits ours).
    capture: [bool; 2],
    streams: [Stream; 2],
    sinks: [Sink; 2],
    /// The main child's process group (= its pid), for group signals and cleanup.
    child_pgid: Option<i32>,
    own_pid: i32,
    /// Formatted own log lines not yet written to stderr.
    own_log: Vec<u8>,
    reap_pending: bool,
    exit: Option<i32>,
    /// The loop's clock reading for this round (read only in `run`).
    now: Instant,
    control: Option<Control>,
    /// The server's configuration for the app.
    cfg: ConfigCore,
    /// WAYPOST_DISABLE_CONFIG: configuration from the server is ignored.
    config_disabled: bool,
    /// Log shipping (with a server, unless WAYPOST_DISABLE_LOGS).
    logs: Option<Logs>,
    /// Exec sessions by slot.
    exec: [Option<ExecIo>; MAX_SESSIONS],
    /// Where to start looking for exec output next (round robin, so no session starves).
    exec_next: usize,
    exec_disabled: bool,
    exec_allow: Option<Vec<String>>,
    /// URL-service streams by slot (grows up to MAX_STREAMS).
    tunnels: Vec<Option<TunnelIo>>,
    tunnel_next: usize,
    url_disabled: bool,
    url_hold: bool,
    /// The app's port (`PORT`).
    app_port: u16,
    stop_timeout: Duration,
    /// A config restart waiting for the app's in-flight streams to finish: (grace, deadline).
    restart_pending: Option<(Option<Duration>, Instant)>,
    /// Streams opened around a restart are retried until the new child listens, up to this.
    hold_until: Option<Instant>,
    /// The file counting OOM kills in our cgroup (and so the child's), if there is one.
    oom_counter: Option<String>,
}

/// Runs the child under the loop until it is done; returns the exit code.
pub fn run(settings: Settings, argv: Vec<OsString>) -> i32 {
    match Reactor::new(&settings, argv) {
        Ok(mut r) => {
            for name in &settings.unknown {
                warn!("unknown variable {name} ignored");
            }
            r.run()
        }
        Err(e) => fail_early(&e),
    }
}

impl Reactor {
    fn new(settings: &Settings, argv: Vec<OsString>) -> Result<Reactor, Error> {
        // Block before anything can send us a signal or a child can exit: from here on every
        // signal waits in the signalfd.
        let set = SigSet::handled();
        signals::block(&set).map_err(Error::io("blocking signals"))?;
        let signals_fd = signals::signalfd(&set).map_err(Error::io("creating the signalfd"))?;
        let own_pid = rustix::process::getpid().as_raw_nonzero().get();
        if own_pid != 1 {
            // Orphans of the app are re-parented to us (not to the host's init), and reaped.
            rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
                .map_err(|e| Error::Io { context: "becoming a child subreaper", source: e.into() })?;
        }

        let stdout_tty = rustix::termios::isatty(rustix::stdio::stdout());
        let stderr_tty = rustix::termios::isatty(rustix::stdio::stderr());
        // A terminal is inherited directly (the app sees a TTY) unless WAYPOST_CAPTURE asks for
        // the output anyway; WAYPOST_DISABLE means no capture at all.
        let capture_out = !settings.disable && (!stdout_tty || settings.capture);
        let capture = [capture_out, capture_out && (!stderr_tty || settings.capture)];

        let poll = Poll::new().map_err(Error::io("creating the epoll instance"))?;
        poll.registry()
            .register(&mut SourceFd(&signals_fd.as_raw_fd()), Tok::Signals.token(), Interest::READABLE)
            .map_err(Error::io("registering the signalfd"))?;
        let sinks = [Sink::new(Out::Stdout), Sink::new(Out::Stderr)];
        for sink in &sinks {
            // Only the streams we write to need readiness; stderr always carries our own lines.
            if sink.can_block() && (sink.out == Out::Stderr || capture[sink.out as usize]) {
                let fd = sink.fd().as_raw_fd();
                if poll.registry().register(&mut SourceFd(&fd), Tok::Sink(sink.out).token(), Interest::WRITABLE).is_err() {
                    debug!("own {:?} cannot be polled; writing to it directly", sink.out);
                }
            }
        }

        let now = Instant::now();
        let mut sup = Supervisor::new(settings.stop_timeout, settings.signal_group, settings.flush_timeout);
        let control = match &settings.server {
            Some(server) if settings.server_enabled() => {
                if settings.token.is_none() {
                    return Err(Error::Env { name: "WAYPOST_TOKEN", why: "is not set, but WAYPOST_SERVER is".into() });
                }
                if settings.tls_skip_verify {
                    warn!("WAYPOST_TLS_SKIP_VERIFY=1: the server's certificate is not checked (development only)");
                }
                let tls = crate::tls::client_config(&settings.ca, settings.tls_skip_verify)?;
                let waker = Arc::new(Waker::new(poll.registry(), Tok::Waker.token()).map_err(Error::io("creating the waker"))?);
                let mut instance_id = vec![0u8; 16];
                crate::sys::random::fill(&mut instance_id).map_err(Error::io("reading random bytes"))?;
                let hello = Hello {
                    protocol_version: waypost_proto::PROTOCOL_VERSION,
                    token: settings.token.clone().unwrap_or_default(),
                    instance_id,
                    entrypoint_version: env!("CARGO_PKG_VERSION").into(),
                    hostname: rustix::system::uname().nodename().to_string_lossy().into_owned(),
                    pid: own_pid as u32,
                    disabled: Some(Features {
                        config: settings.disable_config,
                        logs: settings.disable_logs,
                        exec: settings.disable_exec,
                        url: settings.disable_url,
                    }),
                    ..Default::default()
                };
                let proxy = settings.https_proxy.clone().filter(|_| !settings.bypasses_proxy(&server.host));
                let mut session = Session::new(crate::sys::random::u64());
                session.start(now);
                // Fail open: start at the startup timeout even without the server's config;
                // WAYPOST_SERVER_REQUIRED waits for it (the Welcome) as long as it takes.
                if settings.server_required {
                    sup.wait_for_config(None);
                } else if settings.disable_config {
                    sup.start();
                } else {
                    sup.wait_for_config(Some(now + settings.startup_timeout));
                }
                Some(Control {
                    session,
                    tls,
                    server: server.clone(),
                    proxy,
                    conn: None,
                    interest: None,
                    addrs: Vec::new(),
                    dns: None,
                    waker,
                    rbuf: RecvBuf::new(),
                    wbuf: SendBuf::default(),
                    hello,
                })
            }
            _ => {
                // Without a server there is nothing to wait for.
                sup.start();
                None
            }
        };
        Ok(Reactor {
            poll,
            events: Events::with_capacity(32),
            signals: signals_fd,
            sup,
            argv,
            child_env: child_env(settings),
            capture,
            streams: std::array::from_fn(|_| Stream { pipe: None, readable: false, eof: false, relay: Relay::new() }),
            sinks,
            child_pgid: None,
            own_pid,
            own_log: Vec::new(),
            reap_pending: false,
            exit: None,
            now,
            control,
            cfg: ConfigCore::new(crate::sys::random::u64()),
            config_disabled: settings.disable_config,
            logs: (settings.server_enabled() && !settings.disable_logs).then(|| Logs::new(settings.log_buffer as usize, settings.log_mode)),
            exec: std::array::from_fn(|_| None),
            exec_next: 0,
            exec_disabled: settings.disable_exec,
            exec_allow: settings.exec_allow.clone(),
            tunnels: Vec::new(),
            tunnel_next: 0,
            url_disabled: settings.disable_url,
            url_hold: settings.url_hold,
            app_port: settings.port,
            stop_timeout: settings.stop_timeout,
            restart_pending: None,
            hold_until: None,
            // Only the server is told about OOM kills: without one, no files to read.
            oom_counter: if settings.server_enabled() { find_oom_counter() } else { None },
        })
    }

    fn run(&mut self) -> i32 {
        let mut now = Instant::now();
        loop {
            self.now = now;
            self.after_events(now);
            if let Some(code) = self.exit {
                self.shutdown();
                return code;
            }
            let mut deadline = self.sup.poll_timeout();
            if let Some(c) = &self.control {
                deadline = earliest(deadline, c.session.poll_timeout());
            }
            deadline = earliest(deadline, self.cfg.poll_timeout());
            if let Some(logs) = &self.logs {
                let connected = self.control.as_ref().is_some_and(|c| c.session.is_ready());
                deadline = earliest(deadline, logs.poll_timeout(connected, now));
            }
            for e in self.exec.iter().flatten() {
                deadline = earliest(deadline, e.state.poll_timeout(now));
            }
            if self.restart_pending.is_none() && !matches!(self.sup.child_state(), ChildState::Restarting(_)) {
                // (While the old child drains or stops, held streams wait for the restart — the
                // new child's spawn wakes the loop — not a timer that would stay due.)
                for t in self.tunnels.iter().flatten() {
                    deadline = earliest(deadline, t.state.retry_at);
                }
            }
            deadline = earliest(deadline, self.restart_pending.map(|(_, at)| at));
            if self.sup.finishing() {
                deadline = Some(deadline.map_or(now + CLEANUP_TICK, |d| d.min(now + CLEANUP_TICK)));
            }
            let timeout = deadline.map(|d| d.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut self.events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // epoll_wait cannot fail on a valid epoll fd short of a kernel bug; back off
                    // rather than spin, and keep supervising.
                    error!("poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            now = Instant::now();
            self.now = now;
            // Take the events out so handlers may borrow self (capacity 0: no allocation).
            let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
            for event in events.iter() {
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                let writable = event.is_writable() || event.is_write_closed() || event.is_error();
                match Tok::from_token(event.token()) {
                    Some(Tok::Signals) => self.on_signals(now),
                    Some(Tok::ChildPipe(o)) => {
                        if readable {
                            self.streams[o as usize].readable = true;
                        }
                    }
                    Some(Tok::Sink(o)) => {
                        if writable {
                            self.sinks[o as usize].writable = true;
                        }
                    }
                    Some(Tok::Control) => self.on_control(now),
                    Some(Tok::Waker) => self.on_resolved(now),
                    Some(Tok::Tunnel(slot)) => {
                        if let Some(Some(t)) = self.tunnels.get_mut(slot as usize) {
                            t.readable |= readable;
                            t.writable |= writable;
                        }
                    }
                    Some(Tok::Exec(slot, which)) => {
                        if let Some(e) = &mut self.exec[slot as usize] {
                            if readable {
                                e.readable[which as usize] = true;
                            }
                            if writable && which == 0 {
                                e.writable = true;
                            }
                        }
                    }
                    None => debug!("event for unknown token {}", event.token().0),
                }
            }
            self.events = events;
            if self.sup.poll_timeout().is_some_and(|d| d <= now) {
                let left = self.leftovers();
                self.sup.handle_timeout(now, left);
            }
            if let Some(c) = &mut self.control {
                if c.session.poll_timeout().is_some_and(|d| d <= now) {
                    c.session.handle_timeout(now);
                }
            }
            if self.cfg.poll_timeout().is_some_and(|d| d <= now) {
                self.cfg.handle_timeout(now);
                self.config_steps(now);
            }
            if let Some(logs) = &mut self.logs {
                logs.handle_timeout(now);
            }
        }
    }

    /// Everything that follows a round of events: reap, move bytes, carry out actions.
    fn after_events(&mut self, now: Instant) {
        if self.reap_pending {
            self.reap(now);
        }
        self.apply_actions(now);
        self.pump(Out::Stdout, now);
        self.pump(Out::Stderr, now);
        self.session_events(now);
        self.apply_actions(now);
        self.exec_input(now);
        self.tunnel_io(now);
        self.flush_own_log();
        self.write_control(now);
        if self.sup.finishing() {
            let left = self.leftovers();
            self.sup.handle_leftovers(left, now);
        }
        self.apply_actions(now);
        self.flush_own_log();
    }

    fn apply_actions(&mut self, now: Instant) {
        while let Some(action) = self.sup.poll_action() {
            match action {
                Action::Spawn => self.spawn_child(now),
                Action::Signal(target, sig) => {
                    let pid = match (target, self.sup.child_pid(), self.child_pgid) {
                        (Target::Child, Some(pid), _) => pid,
                        (Target::Group, _, Some(pgid)) => -pgid,
                        _ => continue,
                    };
                    if let Err(e) = signals::kill(pid, sig) {
                        if e.raw_os_error() != Some(libc::ESRCH) {
                            warn!("sending {} to {pid}: {e}", signals::name(sig));
                        }
                    }
                }
                Action::SignalDescendants(sig) => self.signal_descendants(sig),
                Action::LastWords => {
                    let st = self.status();
                    if let Some(c) = &mut self.control {
                        c.session.handle_last_words(st, now);
                    }
                    self.session_events(now);
                }
                Action::Exit(code) => self.exit = Some(code),
            }
        }
    }

    fn spawn_child(&mut self, now: Instant) {
        let stdio = |captured: bool| if captured { Stdio::Pipe } else { Stdio::Inherit };
        // The container's environment, overridden by the server's config.
        let mut env: Vec<(OsString, OsString)> = self.child_env.iter().filter(|(k, _)| !self.cfg.child_env().any(|(c, _)| k == c.as_str())).cloned().collect();
        env.extend(self.cfg.child_env().map(|(k, v)| (k.into(), v.into())));
        let spec = Spec {
            argv: &self.argv,
            env: &env,
            stdin: Stdio::Inherit,
            stdout: stdio(self.capture[0]),
            stderr: stdio(self.capture[1]),
            placement: Placement::Group { foreground: true },
        };
        match spawn::spawn(spec) {
            Ok(child) => {
                debug!("started {} (pid {})", self.argv[0].to_string_lossy(), child.pid);
                self.child_pgid = Some(child.pid);
                let oom_kills = self.oom_kills();
                self.sup.handle_spawned(child.pid, oom_kills);
                self.send_status();
                for (out, pipe) in [(Out::Stdout, child.stdout), (Out::Stderr, child.stderr)] {
                    if let Some(pipe) = pipe {
                        self.add_pipe(out, pipe);
                    }
                }
            }
            Err(e) => {
                error!("{e}");
                self.sup.handle_spawn_failed(e.exit_code(), now);
            }
        }
    }

    fn add_pipe(&mut self, out: Out, pipe: OwnedFd) {
        let ok = rustix::fs::fcntl_getfl(&pipe).and_then(|f| rustix::fs::fcntl_setfl(&pipe, f | OFlags::NONBLOCK));
        let reg = self.poll.registry().register(&mut SourceFd(&pipe.as_raw_fd()), Tok::ChildPipe(out).token(), Interest::READABLE);
        if let Err(e) = ok.map_err(io::Error::from).and(reg) {
            // Cannot happen for a fresh pipe; if it did, reading it blocking would stall the loop.
            error!("cannot watch the child's {out:?}: {e}; its output is lost");
            return;
        }
        let s = &mut self.streams[out as usize];
        s.pipe = Some(pipe);
        s.readable = true;
    }

    fn on_signals(&mut self, now: Instant) {
        let mut batch = [0; signals::BATCH];
        loop {
            let n = match signals::read_batch(&self.signals, &mut batch) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    error!("reading signals: {e}");
                    return;
                }
            };
            for &sig in &batch[..n] {
                if sig == libc::SIGCHLD {
                    self.reap_pending = true;
                } else {
                    debug!("received {}, forwarding", signals::name(sig));
                    self.sup.handle_signal(sig, now);
                }
            }
            // INVARIANT: at most BATCH actions queued at once, under the supervisor's capacity.
            self.apply_actions(now);
        }
    }

    /// The one reaper (house rule 7): every exited child, including adopted orphans.
    fn reap(&mut self, now: Instant) {
        self.reap_pending = false;
        loop {
            match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    let pid = pid.as_raw_nonzero().get();
                    let (code, signal) = (status.exit_status(), status.terminating_signal());
                    if Some(pid) == self.sup.child_pid() {
                        match signal {
                            Some(sig) => info!("child (pid {pid}) killed by {}", signals::name(sig)),
                            None => debug!("child (pid {pid}) exited with code {}", code.unwrap_or(0)),
                        }
                        let oom_kills = self.oom_kills();
                        self.sup.handle_exit(pid, code, signal, oom_kills, now);
                        if let ChildState::Exited(Some(e)) = self.sup.child_state() {
                            if e.oom_killed {
                                warn!("the child was killed by the kernel's OOM killer (its cgroup ran out of memory)");
                            }
                        }
                        if !self.sup.finishing() {
                            // (A final status goes out with the last words, confirmed.)
                            self.send_status();
                        }
                    } else if let Some(e) = self.exec.iter_mut().flatten().find(|e| e.state.pid == pid && !e.state.has_exited()) {
                        debug!("exec session {} (pid {pid}) ended", e.state.id);
                        e.state.handle_exit(code, signal, now);
                    } else {
                        debug!("reaped pid {pid}");
                    }
                }
                Ok(None) | Err(Errno::CHILD) => return,
                Err(Errno::INTR) => continue,
                Err(e) => {
                    error!("waitpid: {e}");
                    return;
                }
            }
        }
    }

    /// Moves bytes from the child's pipe to our fd and to the log shipper until no side can make
    /// progress. A relay byte is freed once both have it, so a log buffer that refuses bytes
    /// (block mode, server behind) stops the reading like a slow stdout does: the pipe fills and
    /// the app's writes wait.
    fn pump(&mut self, out: Out, now: Instant) {
        let i = out as usize;
        let stream = if out == Out::Stdout { LogStream::Stdout } else { LogStream::Stderr };
        loop {
            let mut progress = false;
            let s = &mut self.streams[i];
            let fresh = s.relay.unlogged();
            if !fresh.is_empty() {
                let took = match &mut self.logs {
                    Some(logs) => logs.handle_output(stream, fresh, wall_us(), now),
                    None => fresh.len(),
                };
                if took > 0 {
                    s.relay.logged(took);
                    progress = true;
                }
            }
            if s.eof && s.relay.unlogged().is_empty() {
                s.eof = false;
                if let Some(logs) = &mut self.logs {
                    logs.handle_eof(stream, now);
                }
            }
            // (A new child's pipe waits until the old one's end was told: its first line must
            // not be glued to the old child's last partial one.)
            if s.readable && !s.relay.is_full() && !s.eof {
                if let Some(pipe) = &s.pipe {
                    match rustix::io::read(pipe, s.relay.space()) {
                        Ok(0) => {
                            self.close_pipe(out);
                            self.streams[i].eof = true;
                            progress = true;
                        }
                        Ok(n) => {
                            s.relay.filled(n);
                            progress = true;
                        }
                        Err(Errno::AGAIN) => s.readable = false,
                        Err(Errno::INTR) => progress = true,
                        Err(e) => {
                            warn!("reading the child's {out:?}: {e}");
                            self.close_pipe(out);
                            self.streams[i].eof = true;
                        }
                    }
                }
            }
            let s = &mut self.streams[i];
            let sink = &mut self.sinks[i];
            if !s.relay.is_empty() && sink.writable {
                if sink.broken {
                    s.relay.clear();
                    progress = true;
                } else {
                    match sink.write(s.relay.pending()) {
                        Ok(n) => {
                            s.relay.consume(n);
                            progress = true;
                        }
                        Err(Errno::AGAIN) => sink.writable = false,
                        Err(Errno::INTR) => progress = true,
                        Err(e) => {
                            // Our reader is gone. Mirror it to the app: closing its pipe makes
                            // its next write fail (EPIPE/SIGPIPE) as if it wrote to ours.
                            warn!("writing {out:?}: {e}; closing the app's {out:?} too");
                            sink.broken = true;
                            s.relay.clear();
                            self.close_pipe(out);
                            self.streams[i].eof = true;
                            progress = true;
                        }
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    fn close_pipe(&mut self, out: Out) {
        let s = &mut self.streams[out as usize];
        if let Some(pipe) = s.pipe.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&pipe.as_raw_fd()));
        }
        s.readable = false;
    }

    /// Writes queued own log lines to stderr, after the child's pending stderr bytes so lines do
    /// not interleave mid-buffer.
    fn flush_own_log(&mut self) {
        if logger::pending() {
            let ms = wall_ms();
            let own = &mut self.own_log;
            let logs = &mut self.logs;
            let now = Instant::now();
            logger::drain(|rec| {
                if let Some(logs) = logs {
                    logs.handle_own(format!("{} {}", rec.level.as_str(), rec.msg).as_bytes(), ms as i64 * 1000, now);
                }
                if own.len() < OWN_LOG_CAP {
                    logger::format_line(&rec, ms, own);
                }
            });
        }
        let sink = &mut self.sinks[Out::Stderr as usize];
        while !self.own_log.is_empty() && self.streams[Out::Stderr as usize].relay.is_empty() && sink.writable && !sink.broken {
            match sink.write(&self.own_log) {
                Ok(n) => {
                    self.own_log.drain(..n);
                }
                Err(Errno::AGAIN) => sink.writable = false,
                Err(Errno::INTR) => {}
                Err(_) => sink.broken = true,
            }
        }
        if sink.broken {
            self.own_log.clear();
        }
    }

    /// SIGTERM/SIGKILL to whatever the child left behind: its process group, and every process
    /// we adopted (found through /proc, as they may have left the group).
    fn signal_descendants(&mut self, sig: i32) {
        if let Some(pgid) = self.child_pgid {
            let _ = signals::kill(-pgid, sig);
        }
        let mut n = 0;
        for pid in children_of(self.own_pid) {
            if signals::kill(pid, sig).is_ok() {
                n += 1;
            }
        }
        if n > 0 {
            debug!("sent {} to {n} leftover processes", signals::name(sig));
        }
    }

    /// What still keeps us from exiting.
    fn leftovers(&self) -> Leftovers {
        use rustix::process::{WaitId, WaitIdOptions, waitid};
        let children = !matches!(
            waitid(WaitId::All, WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT),
            Err(Errno::CHILD)
        );
        let group = self.child_pgid.is_some_and(|pgid| signals::kill(-pgid, 0).is_ok());
        // Bytes the log shipper has not taken yet (block mode: the server is behind) are last
        // words for the server, and so is a pipe we stopped reading for them: both get the flush
        // timeout, not the local cleanup's grace.
        let for_logs = |s: &Stream| !s.relay.unlogged().is_empty() || s.eof;
        let server = self.control.as_ref().is_some_and(|c| {
            c.session.last_words_pending() || self.logs.as_ref().is_some_and(Logs::unacked) || self.streams.iter().any(for_logs)
        });
        let output = self
            .streams
            .iter()
            .zip(&self.sinks)
            .any(|(s, sink)| (s.pipe.is_some() && !for_logs(s)) || (!s.relay.is_empty() && !sink.broken));
        Leftovers { descendants: children || group, output, server }
    }

    fn shutdown(&mut self) {
        if let Some(conn) = self.control.as_mut().and_then(|c| c.conn.as_mut()) {
            conn.close();
        }
        // What the log shipper could not take in time (block mode, a server that never caught
        // up) still goes to our own stdout/stderr, as far as they take it without blocking:
        // the local copy stays whole.
        self.logs = None;
        for out in [Out::Stdout, Out::Stderr] {
            let s = &mut self.streams[out as usize];
            s.readable = s.pipe.is_some();
            self.pump(out, self.now);
        }
        self.flush_own_log();
        for sink in &self.sinks {
            sink.restore();
        }
    }
}


impl Reactor {
    /// Carries out what the session asks for.
    fn session_events(&mut self, now: Instant) {
        loop {
            let Some(c) = &mut self.control else { return };
            let Some(event) = c.session.poll_event() else { return };
            match event {
                session::Event::Connect => self.begin_connect(now),
                session::Event::Disconnect(why) => {
                    debug!("closing the server connection: {why}");
                    self.drop_conn(true);
                }
                session::Event::Lost => {
                    self.drop_conn(false);
                    self.exec_hang_up(now);
                    for slot in 0..self.tunnels.len() {
                        self.tunnel_remove(slot);
                    }
                }
                session::Event::Welcome(welcome) => {
                    if let Some(logs) = &mut self.logs {
                        logs.handle_reconnect(welcome.log_acked_seq, now);
                    }
                    // The first config is in force (files written) before the child starts.
                    if let Some(config) = welcome.config {
                        self.on_config(config, now);
                    }
                    self.sup.start();
                }
                session::Event::Heartbeat => self.send_status(),
                session::Event::Frame(Kind::Config(config)) => self.on_config(config, now),
                session::Event::Frame(Kind::ExecStart(start)) => self.exec_start(start),
                session::Event::Frame(Kind::ExecInput(input)) => {
                    let violated = self.exec_by_id(input.session).is_some_and(|e| e.state.handle_input(&input.data).is_err());
                    if violated {
                        self.exec_abort(input.session, "the server sent input beyond its window");
                    }
                }
                session::Event::Frame(Kind::ExecStdinClose(close)) => {
                    if let Some(e) = self.exec_by_id(close.session) {
                        e.state.handle_stdin_close();
                    }
                }
                session::Event::Frame(Kind::ExecResize(r)) => {
                    if let Some(Some(master)) = self.exec_by_id(r.session).filter(|e| e.state.pty).map(|e| e.fds[0].as_ref()) {
                        let size = rustix::termios::Winsize { ws_row: r.rows as u16, ws_col: r.cols as u16, ws_xpixel: 0, ws_ypixel: 0 };
                        // The kernel sends SIGWINCH to the terminal's foreground group.
                        let _ = rustix::termios::tcsetwinsize(master, size);
                    }
                }
                session::Event::Frame(Kind::ExecSignal(sig)) => {
                    if let Some(e) = self.exec_by_id(sig.session) {
                        // The session leads its own process group (setsid).
                        let _ = signals::kill(-e.state.pid, sig.signal);
                    }
                }
                session::Event::Frame(Kind::StreamOpen(open)) => self.tunnel_open(open, now),
                session::Event::Frame(Kind::StreamData(data)) => {
                    if let Some(slot) = self.tunnel_slot(data.stream) {
                        let t = self.tunnels[slot].as_mut().expect("slot found");
                        if t.state.input.push(&data.data).is_err() {
                            self.tunnel_abort(slot, "the server sent data beyond its window");
                        }
                    }
                }
                session::Event::Frame(Kind::StreamClose(close)) => {
                    if let Some(slot) = self.tunnel_slot(close.stream) {
                        if close.half {
                            self.tunnels[slot].as_mut().expect("slot found").state.input.close();
                        } else {
                            self.tunnel_remove(slot);
                        }
                    }
                }
                session::Event::Frame(Kind::WindowUpdate(WindowUpdate { target: Some(window_update::Target::Stream(id)), credits })) => {
                    if let Some(slot) = self.tunnel_slot(id) {
                        self.tunnels[slot].as_mut().expect("slot found").state.output.grant(credits);
                    }
                }
                session::Event::Frame(Kind::WindowUpdate(WindowUpdate { target: Some(window_update::Target::ExecSession(id)), credits })) => {
                    if let Some(e) = self.exec_by_id(id) {
                        e.state.handle_window(credits);
                    }
                }
                session::Event::Frame(Kind::LogAck(ack)) => {
                    if let Some(logs) = &mut self.logs {
                        logs.handle_ack(ack.up_to_seq);
                    }
                }
                session::Event::Frame(kind) => debug!("ignoring a {} frame (feature not available)", kind.name()),
            }
        }
    }

    fn on_config(&mut self, config: waypost_proto::Config, now: Instant) {
        if self.sup.finishing() {
            // A reconnect for the last words: the app is gone, nothing to configure.
            return;
        }
        if self.config_disabled {
            debug!("ignoring config version {} (WAYPOST_DISABLE_CONFIG)", config.version);
            return;
        }
        let running = matches!(self.sup.child_state(), ChildState::Running(_));
        self.cfg.handle_config(config, running, now);
        self.config_steps(now);
    }

    /// Carries out what the config core decided.
    fn config_steps(&mut self, now: Instant) {
        while let Some(step) = self.cfg.poll_step() {
            match step {
                Step::Apply { version, write, remove } => {
                    let result = apply_files(&write, &remove);
                    if let Err(e) = &result {
                        error!("config version {version} not applied: {e}");
                    } else if !write.is_empty() || !remove.is_empty() {
                        info!("config version {version}: wrote {} files, removed {}", write.len(), remove.len());
                    }
                    self.cfg.handle_applied(result.is_ok());
                    let error = result.err().unwrap_or_default();
                    if let Some(c) = &mut self.control {
                        c.session.send(Kind::ConfigApplied(ConfigApplied { version, error }), now);
                    }
                }
                Step::Restart => {
                    let grace = self.cfg.stop_grace();
                    if self.url_hold && self.control.is_some() && !self.url_disabled {
                        // Zero-downtime: new visitors wait; the old child goes once its
                        // streams are done (or at the stop timeout).
                        info!("config changed: restarting the app once its open URL streams finish");
                        self.restart_pending = Some((grace, now + grace.unwrap_or(self.stop_timeout)));
                        self.send_status();
                        self.restart_when_drained(now);
                    } else {
                        info!("config changed: restarting the app");
                        self.sup.restart(grace, now);
                        self.send_status();
                    }
                }
                Step::Signal(sig) => {
                    info!("config files changed: sending {} to the app", signals::name(sig));
                    self.sup.signal_child(sig);
                }
                Step::LogLevel(level) => {
                    logger::set_level(level);
                    info!("log level set to {} by the server's config", level.as_str());
                }
            }
        }
        self.apply_actions(now);
    }

    /// Resolves (off the loop unless the host is an IP literal) and starts connecting.
    fn begin_connect(&mut self, now: Instant) {
        let Some(c) = &mut self.control else { return };
        let target = c.proxy.as_ref().unwrap_or(&c.server).clone();
        c.addrs.clear();
        if let Some(ips) = literal_addrs(&target.host) {
            c.addrs = ips.into_iter().map(|ip| SocketAddr::new(ip, target.port)).collect();
            self.connect_next(now);
            return;
        }
        let (tx, rx) = mpsc::channel();
        let waker = Arc::clone(&c.waker);
        let spawned = std::thread::Builder::new().name("dns".into()).stack_size(DNS_STACK).spawn(move || {
            let answer = (target.host.as_str(), target.port)
                .to_socket_addrs()
                .map(|a| a.collect())
                .map_err(|e| format!("cannot resolve {}: {e}", target.host));
            let _ = tx.send(answer);
            let _ = waker.wake();
        });
        match spawned {
            Ok(_) => c.dns = Some(rx),
            Err(e) => c.session.handle_closed(&format!("cannot start the DNS thread: {e}"), now),
        }
    }

    fn on_resolved(&mut self, now: Instant) {
        let Some(c) = &mut self.control else { return };
        let Some(answer) = c.dns.as_ref().and_then(|rx| rx.try_recv().ok()) else { return };
        c.dns = None;
        if !c.session.has_connection() || c.conn.is_some() {
            return; // the attempt was abandoned meanwhile
        }
        match answer {
            Ok(addrs) if !addrs.is_empty() => {
                c.addrs = addrs;
                self.connect_next(now);
            }
            Ok(_) => c.session.handle_closed("the name has no addresses", now),
            Err(why) => c.session.handle_closed(&why, now),
        }
    }

    /// Starts a TCP connect to the next address of the attempt.
    fn connect_next(&mut self, now: Instant) {
        let Some(c) = &mut self.control else { return };
        let mut last_err = String::from("no address to connect to");
        while !c.addrs.is_empty() {
            let addr = c.addrs.remove(0);
            let target = c.proxy.is_some().then(|| format_host_port(&c.server));
            let conn = mio::net::TcpStream::connect(addr)
                // Frames are small and often alone (a keystroke, a Pong): no Nagle delay.
                .and_then(|sock| sock.set_nodelay(true).map(|()| sock))
                .map_err(Error::io("connecting"))
                .and_then(|sock| Conn::new(sock, Arc::clone(&c.tls), &c.server.host, target.as_deref()));
            match conn {
                Ok(mut conn) => {
                    let interest = conn.interest();
                    if let Err(e) = self.poll.registry().register(conn.socket(), Tok::Control.token(), interest) {
                        last_err = format!("registering the connection: {e}");
                        continue;
                    }
                    trace!("connecting to {addr}");
                    c.conn = Some(conn);
                    c.interest = Some(interest);
                    return;
                }
                Err(e) => last_err = format!("{addr}: {e}"),
            }
        }
        c.session.handle_closed(&last_err, now);
    }

    /// Closes the connection (`polite`: TLS close_notify first) and forgets its buffers.
    fn drop_conn(&mut self, polite: bool) {
        let Some(c) = &mut self.control else { return };
        if let Some(mut conn) = c.conn.take() {
            if polite {
                conn.close();
            }
            let _ = self.poll.registry().deregister(conn.socket());
        }
        c.interest = None;
        c.addrs.clear();
        c.rbuf.clear();
        c.wbuf.clear();
    }

    /// The connection's socket is ready: advance setup, read frames, write.
    fn on_control(&mut self, now: Instant) {
        let Some(c) = &mut self.control else { return };
        let Some(conn) = &mut c.conn else { return };
        if !conn.is_open() {
            match conn.drive() {
                Ok(true) => {
                    let hello = self.hello();
                    let Some(c) = &mut self.control else { return };
                    c.session.handle_connected(hello, now);
                }
                Ok(false) => {}
                Err(e) => {
                    // A refused connection may have other addresses to try.
                    let more = !c.addrs.is_empty() && matches!(e, Error::Io { context: "connecting", .. });
                    self.drop_conn_keep_addrs();
                    if more {
                        self.connect_next(now);
                    } else if let Some(c) = &mut self.control {
                        c.session.handle_closed(&e.to_string(), now);
                    }
                    return;
                }
            }
        }
        self.read_control(now);
        // Carry out what the frames just read mean before writing: a Welcome among them sets
        // where the log resend starts, and a batch written first would skip the entries the
        // last connection never got acknowledged.
        self.session_events(now);
        self.write_control(now);
    }

    fn drop_conn_keep_addrs(&mut self) {
        let Some(c) = &mut self.control else { return };
        if let Some(mut conn) = c.conn.take() {
            let _ = self.poll.registry().deregister(conn.socket());
        }
        c.interest = None;
    }

    /// Reads and dispatches every complete frame until the socket would block.
    fn read_control(&mut self, now: Instant) {
        let Some(c) = &mut self.control else { return };
        let Some(conn) = &mut c.conn else { return };
        if !conn.is_open() {
            return;
        }
        let why: String = 'read: loop {
            match conn.read(c.rbuf.space()) {
                Ok(Received::Data(n)) => {
                    c.rbuf.filled(n);
                    while let Some(frame) = c.rbuf.next_frame() {
                        match frame {
                            Ok(Frame { kind: Some(kind) }) => c.session.handle_frame(kind, now),
                            Ok(Frame { kind: None }) => trace!("ignoring a frame of an unknown kind"),
                            Err(e) => break 'read format!("the server sent a bad frame: {e}"),
                        }
                    }
                }
                Ok(Received::Blocked) => return,
                Ok(Received::Closed) => break "closed by the server".into(),
                Err(e) => break e.to_string(),
            }
        };
        self.drop_conn(false);
        if let Some(c) = &mut self.control {
            c.session.handle_closed(&why, now);
        }
    }

    /// Moves queued frames into TLS and TLS into the socket, highest priority first, until
    /// either side is full; then keeps the socket's interest in step.
    fn write_control(&mut self, now: Instant) {
        let Some(c) = &mut self.control else { return };
        let Some(conn) = &mut c.conn else { return };
        let urgent = self.sup.finishing();
        if conn.is_open() {
            loop {
                while c.wbuf.wants_more() {
                    if let Some(kind) = c.session.poll_transmit() {
                        if let Err(e) = c.wbuf.push(&Frame::from(kind)) {
                            error!("dropping a frame that cannot be sent: {e}");
                        }
                        continue;
                    }
                    // Then exec output (and exit reports, after the last output).
                    if c.session.is_ready() {
                        if let Some(frame) = next_exec_frame(&mut self.exec, &mut self.exec_next, &self.poll, now) {
                            if let Err(e) = c.wbuf.push(&frame) {
                                error!("dropping an exec frame: {e}");
                            }
                            continue;
                        }
                    }
                    // Then URL-service data.
                    if c.session.is_ready() {
                        if let Some(frame) = next_tunnel_frame(&mut self.tunnels, &mut self.tunnel_next, &self.poll) {
                            if let Err(e) = c.wbuf.push(&frame) {
                                error!("dropping a stream frame: {e}");
                            }
                            continue;
                        }
                    }
                    // Lowest priority: logs, only once everything else is out.
                    match &mut self.logs {
                        Some(logs) if c.session.is_ready() && logs.batch_due(now, urgent) => {
                            c.wbuf.append(|out| logs.encode_batch(out, now));
                        }
                        _ => break,
                    }
                }
                // The buffer filled before every source was drained: after this write, pull
                // again (the sources were not read to WouldBlock, so no new edge will come).
                let more = !c.wbuf.wants_more();
                let n = if c.wbuf.is_empty() { 0 } else { conn.write(c.wbuf.pending()) };
                c.wbuf.consume(n);
                let drained = match conn.flush() {
                    Ok(d) => d,
                    Err(e) => {
                        debug!("write failed: {e}");
                        // The read side will see the connection close; leave it to that path.
                        break;
                    }
                };
                if (c.wbuf.is_empty() && !more) || (n == 0 && !drained) {
                    break;
                }
            }
        }
        let want = conn.interest();
        if c.interest != Some(want) && self.poll.registry().reregister(conn.socket(), Tok::Control.token(), want).is_ok() {
            c.interest = Some(want);
        }
    }

    /// Our Hello for a new connection: the fixed part plus what we know right now.
    fn hello(&self) -> Hello {
        let Some(c) = &self.control else { return Hello::default() };
        Hello {
            status: Some(self.status()),
            config_version: self.cfg.version(),
            next_log_seq: self.logs.as_ref().map_or(0, Logs::next_seq),
            ..c.hello.clone()
        }
    }

    /// The child's state for the server.
    fn status(&self) -> Status {
        let mut st = Status {
            starts: self.sup.starts(),
            entrypoint_rss_bytes: proc_rss(self.own_pid),
            config_version: self.cfg.version(),
            ..Default::default()
        };
        match self.sup.child_state() {
            ChildState::Starting => st.state = status::State::Starting as i32,
            ChildState::Running(pid) | ChildState::Restarting(pid) => {
                // Draining for a restart counts as restarting: the server then stops keeping
                // idle connections to the old child.
                let running = matches!(self.sup.child_state(), ChildState::Running(_)) && self.restart_pending.is_none();
                st.state = if running { status::State::Running } else { status::State::Restarting } as i32;
                st.child_pid = pid as u32;
                st.child_rss_bytes = proc_rss(pid);
                st.child_cpu_ms = proc_cpu_ms(pid);
            }
            ChildState::Exited(ended) => {
                st.state = status::State::Exited as i32;
                if let Some(e) = ended {
                    st.exit_code = e.code;
                    st.exit_signal = e.signal.unwrap_or(0);
                    st.oom_killed = e.oom_killed;
                }
            }
        }
        st
    }

    /// Sends a Status now (heartbeat, or a change of the child's state).
    fn send_status(&mut self) {
        if self.control.as_ref().is_some_and(|c| c.session.is_ready()) {
            let st = self.status();
            if let Some(c) = &mut self.control {
                c.session.send(Kind::Status(st), self.now);
            }
        }
    }
}


impl Reactor {
    fn exec_by_id(&mut self, id: u64) -> Option<&mut ExecIo> {
        self.exec.iter_mut().flatten().find(|e| e.state.id == id)
    }

    /// Sends a frame on the control connection, if it is up.
    fn control_send(&mut self, kind: Kind) {
        if let Some(c) = &mut self.control {
            c.session.send(kind, self.now);
        }
    }

    /// The server asks to run a command: check, spawn on a PTY or pipes, register, report.
    fn exec_start(&mut self, start: ExecStart) {
        let active = self.exec.iter().flatten().count();
        let refuse = |code: i32, error: String| Kind::ExecExit(ExecExit { session: start.session, code, signal: 0, error });
        if let Err(why) = exec::admit(&start, self.exec_disabled, self.exec_allow.as_deref(), active) {
            info!("exec refused: {why}");
            self.control_send(refuse(126, why));
            return;
        }
        if self.exec_by_id(start.session).is_some() {
            self.control_send(refuse(126, "duplicate session id".into()));
            return;
        }
        let slot = self.exec.iter().position(Option::is_none).expect("admit checked the cap");
        // The app's environment (config applied, tokens removed), plus the session's own.
        let mut env: Vec<(OsString, OsString)> = self.child_env.iter().filter(|(k, _)| !self.cfg.child_env().any(|(c, _)| k == c.as_str())).cloned().collect();
        env.extend(self.cfg.child_env().map(|(k, v)| (k.into(), v.into())));
        let mut extra: Vec<(OsString, OsString)> = start.env.iter().filter(|(k, _)| !SECRET_VARS.contains(&k.as_str())).map(|(k, v)| (k.into(), v.into())).collect();
        if let Some(pty) = &start.pty {
            if !pty.term.is_empty() {
                extra.push(("TERM".into(), pty.term.clone().into()));
            }
        }
        env.retain(|(k, _)| !extra.iter().any(|(x, _)| x == k));
        env.extend(extra);
        let argv: Vec<OsString> = start.argv.iter().map(OsString::from).collect();

        let (spawned, master) = match &start.pty {
            Some(pty) => match open_pty(pty.rows, pty.cols) {
                Ok((master, slave)) => {
                    let fds = (slave.try_clone(), slave.try_clone());
                    let (Ok(a), Ok(b)) = fds else {
                        self.control_send(refuse(126, "cannot duplicate the terminal".into()));
                        return;
                    };
                    let spec = Spec { argv: &argv, env: &env, stdin: Stdio::Fd(a), stdout: Stdio::Fd(b), stderr: Stdio::Fd(slave), placement: Placement::Terminal };
                    (spawn::spawn(spec), Some(master))
                }
                Err(e) => {
                    self.control_send(refuse(126, format!("cannot open a terminal: {e}")));
                    return;
                }
            },
            None => {
                let stdin = if start.stdin { Stdio::Pipe } else { Stdio::Null };
                let spec = Spec { argv: &argv, env: &env, stdin, stdout: Stdio::Pipe, stderr: Stdio::Pipe, placement: Placement::Session };
                (spawn::spawn(spec), None)
            }
        };
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                info!("exec {:?} failed: {e}", start.argv[0]);
                self.control_send(refuse(e.exit_code(), e.to_string()));
                return;
            }
        };
        let pty = master.is_some();
        let fds = [master.or(child.stdin), child.stdout, child.stderr];
        for (which, fd) in fds.iter().enumerate() {
            if let Some(fd) = fd {
                let interest = match (which, pty) {
                    (0, true) => Interest::READABLE | Interest::WRITABLE,
                    (0, false) => Interest::WRITABLE,
                    _ => Interest::READABLE,
                };
                let nonblocking = rustix::fs::fcntl_getfl(fd).and_then(|f| rustix::fs::fcntl_setfl(fd, f | OFlags::NONBLOCK));
                let reg = self.poll.registry().register(&mut SourceFd(&fd.as_raw_fd()), Tok::Exec(slot as u8, which as u8).token(), interest);
                if nonblocking.is_err() || reg.is_err() {
                    error!("cannot watch exec session {}'s fds", start.session);
                }
            }
        }
        debug!("exec session {} started {:?} (pid {}{})", start.session, start.argv[0], child.pid, if pty { ", on a terminal" } else { "" });
        self.exec[slot] = Some(ExecIo { state: exec::Session::new(start.session, child.pid, pty), fds, readable: [true; 3], writable: true });
        self.control_send(Kind::ExecStarted(ExecStarted { session: start.session, pid: child.pid as u32 }));
    }

    /// Writes pending input to each session's process; grants credits back; closes stdin at EOF;
    /// kills sessions whose hang-up grace is over.
    fn exec_input(&mut self, now: Instant) {
        let mut grants: Vec<(u64, u32)> = Vec::new();
        for slot in 0..MAX_SESSIONS {
            let Some(e) = &mut self.exec[slot] else { continue };
            if e.state.kill_due(now) {
                let _ = signals::kill(-e.state.pid, libc::SIGKILL);
            }
            if e.state.is_hung_up() && e.state.has_exited() {
                // Nobody to report to: the connection it belonged to is gone.
                self.exec_remove(slot);
                continue;
            }
            while e.writable && !e.state.pending_input().is_empty() {
                let Some(fd) = &e.fds[0] else { break };
                match rustix::io::write(fd, e.state.pending_input()) {
                    Ok(n) => {
                        if let Some(credits) = e.state.wrote_input(n) {
                            grants.push((e.state.id, credits));
                        }
                    }
                    Err(Errno::AGAIN) => e.writable = false,
                    Err(Errno::INTR) => {}
                    Err(_) => {
                        // The process closed its stdin: what it did not read is dropped.
                        let n = e.state.pending_input().len();
                        e.state.wrote_input(n);
                        break;
                    }
                }
            }
            if e.state.stdin_done() {
                if e.state.pty {
                    // A terminal has no half-close: end of input is the EOF character (^D), sent
                    // once, on an empty line as a shell expects.
                    if let Some(master) = &e.fds[0] {
                        if e.writable && rustix::io::write(master, &[4]).is_ok() {
                            e.state.mark_eof_sent();
                        }
                    }
                } else if let Some(stdin) = e.fds[0].take() {
                    let _ = self.poll.registry().deregister(&mut SourceFd(&stdin.as_raw_fd()));
                }
            }
        }
        for (id, credits) in grants {
            self.control_send(Kind::WindowUpdate(WindowUpdate { target: Some(window_update::Target::ExecSession(id)), credits }));
        }
    }

    /// The connection is gone: every session's process group gets SIGHUP (SIGKILL after the
    /// grace); sessions whose process is already gone are dropped.
    fn exec_hang_up(&mut self, now: Instant) {
        for slot in 0..MAX_SESSIONS {
            let Some(e) = &mut self.exec[slot] else { continue };
            if e.state.has_exited() {
                self.exec_remove(slot);
            } else if e.state.hang_up(now) {
                debug!("connection lost: hanging up exec session {}", e.state.id);
                let _ = signals::kill(-e.state.pid, libc::SIGHUP);
            }
        }
    }

    /// Ends a misbehaving session at once.
    fn exec_abort(&mut self, id: u64, why: &str) {
        if let Some(slot) = self.exec.iter().position(|e| e.as_ref().is_some_and(|e| e.state.id == id)) {
            warn!("exec session {id}: {why}; killing it");
            if let Some(e) = &self.exec[slot] {
                let _ = signals::kill(-e.state.pid, libc::SIGKILL);
            }
        }
    }

    fn exec_remove(&mut self, slot: usize) {
        if let Some(e) = self.exec[slot].take() {
            for fd in e.fds.iter().flatten() {
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
            }
        }
    }
}

/// The next exec frame to send: output from a session that has credits (round robin), or the
/// exit report of one whose process is gone and whose output is all out. Sessions reported (or
/// hung up and exited) are removed here.
fn next_exec_frame(table: &mut [Option<ExecIo>; MAX_SESSIONS], next: &mut usize, poll: &Poll, now: Instant) -> Option<Frame> {
    for k in 0..MAX_SESSIONS {
        let slot = (*next + k) % MAX_SESSIONS;
        let Some(e) = &mut table[slot] else { continue };
        for which in 0..3 {
            let budget = e.state.readable_budget();
            let is_output = which > 0 || e.state.pty;
            if !is_output || !e.readable[which] || budget == 0 {
                continue;
            }
            let Some(fd) = &e.fds[which] else { continue };
            let mut buf = [0u8; exec::CHUNK];
            match rustix::io::read(fd, &mut buf[..budget]) {
                Ok(0) | Err(Errno::IO) => {
                    // EOF (a PTY master says EIO once the terminal side is closed everywhere).
                    e.readable[which] = false;
                    if which > 0 {
                        if let Some(fd) = e.fds[which].take() {
                            let _ = poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
                        }
                    } else {
                        e.state.mark_output_closed();
                    }
                }
                Ok(n) => {
                    e.state.sent(n);
                    *next = (slot + 1) % MAX_SESSIONS;
                    let stream = if which == 2 { OutputStream::Err } else { OutputStream::Out } as i32;
                    return Some(Frame::from(Kind::ExecOutput(ExecOutput { session: e.state.id, stream, data: buf[..n].to_vec() })));
                }
                Err(Errno::AGAIN) => e.readable[which] = false,
                Err(_) => e.readable[which] = false,
            }
        }
        let outputs_open = if e.state.pty { !e.state.output_closed() } else { e.fds[1].is_some() || e.fds[2].is_some() };
        if let Some(report) = e.state.exit_report(outputs_open, now) {
            let hung_up = e.state.is_hung_up();
            if let Some(e) = table[slot].take() {
                for fd in e.fds.iter().flatten() {
                    let _ = poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
                }
            }
            if !hung_up {
                return Some(Frame::from(Kind::ExecExit(report)));
            }
        }
    }
    None
}

/// A new pseudo-terminal of `rows`×`cols`: (master, terminal side).
fn open_pty(rows: u32, cols: u32) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{grantpt, ioctl_tiocgptpeer, openpt, unlockpt, OpenptFlags};
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = openpt(flags)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave = ioctl_tiocgptpeer(&master, flags)?;
    let size = rustix::termios::Winsize { ws_row: rows.clamp(1, 4096) as u16, ws_col: cols.clamp(1, 4096) as u16, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(&master, size)?;
    Ok((master, slave))
}


impl Reactor {
    fn tunnel_slot(&self, id: u64) -> Option<usize> {
        self.tunnels.iter().position(|t| t.as_ref().is_some_and(|t| t.state.id == id))
    }

    /// A visitor connected through the ingress: connect to the app (or hold, during a restart).
    fn tunnel_open(&mut self, open: StreamOpen, now: Instant) {
        let active = self.tunnels.iter().flatten().count();
        if let Err(why) = tunnel::admit(self.url_disabled, active) {
            self.control_send(Kind::StreamClose(StreamClose { stream: open.stream, half: false, error: why }));
            return;
        }
        let slot = match self.tunnels.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.tunnels.push(None);
                self.tunnels.len() - 1
            }
        };
        let hold = self.hold_until.filter(|&t| t > now);
        let port = if open.target_port != 0 { open.target_port as u16 } else { self.app_port };
        trace!("stream {} from {} to port {port}", open.stream, open.client_addr);
        let mut io = TunnelIo { state: tunnel::Stream::new(open.stream, hold), sock: None, fallback: None, readable: false, writable: false };
        // While the old child drains or is being stopped, a connect could still land in its
        // listen queue and be reset when it dies: wait for the new child instead.
        let old_child = self.url_hold && matches!(self.sup.child_state(), ChildState::Restarting(_));
        if self.restart_pending.is_some() || old_child {
            // The old child is draining: this one waits for the new child.
            io.state.retry_at = Some(now + tunnel::RETRY);
            io.state.retry_until = Some(now + self.stop_timeout * 2);
        } else {
            io.fallback = Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port));
            self.tunnel_connect(&mut io, slot, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        }
        self.tunnels[slot] = Some(io);
    }

    fn tunnel_connect(&mut self, io: &mut TunnelIo, slot: usize, addr: SocketAddr) {
        // The app's replies go out as soon as they arrive: no Nagle delay on this hop either.
        match mio::net::TcpStream::connect(addr).and_then(|sock| sock.set_nodelay(true).map(|()| sock)) {
            Ok(mut sock) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if self.poll.registry().register(&mut sock, Tok::Tunnel(slot as u16).token(), interest).is_ok() {
                    io.sock = Some(sock);
                    io.readable = false;
                    io.writable = false;
                }
            }
            Err(e) => debug!("stream {}: connecting to {addr}: {e}", io.state.id),
        }
    }

    /// Moves data between the server and the app sockets; finishes connects, half-closes and
    /// retries; removes finished streams.
    fn tunnel_io(&mut self, now: Instant) {
        let mut grants: Vec<(u64, u32)> = Vec::new();
        let mut closes: Vec<(usize, String)> = Vec::new();
        for slot in 0..self.tunnels.len() {
            let Some(mut io) = self.tunnels[slot].take() else { continue };
            // A held or refused stream whose retry is due.
            if io.sock.is_none() && io.state.retry_at.is_some_and(|t| now >= t) && self.restart_pending.is_none() && !matches!(self.sup.child_state(), ChildState::Restarting(_)) {
                io.state.retry_at = None;
                let port = self.app_port;
                io.fallback = Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port));
                self.tunnel_connect(&mut io, slot, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
            }
            if let Some(sock) = &io.sock {
                if !io.state.connected && (io.writable || io.readable) {
                    match sock.take_error().ok().flatten().map(Err).unwrap_or_else(|| sock.peer_addr().map(|_| ())) {
                        Ok(()) => io.state.connected = true,
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(e) => {
                            let mut old = io.sock.take().expect("checked");
                            let _ = self.poll.registry().deregister(&mut old);
                            if let Some(next) = io.fallback.take() {
                                self.tunnel_connect(&mut io, slot, next);
                            } else if !io.state.refused(now) {
                                closes.push((slot, format!("cannot connect to the app on port {}: {e}", self.app_port)));
                            }
                        }
                    }
                }
            }
            if let (Some(sock), true) = (&mut io.sock, io.state.connected) {
                while io.writable && !io.state.input.pending().is_empty() {
                    match sock.write(io.state.input.pending()) {
                        Ok(n) => {
                            if let Some(credits) = io.state.input.took(n) {
                                grants.push((io.state.id, credits));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            closes.push((slot, format!("writing to the app: {e}")));
                            break;
                        }
                    }
                }
                if io.state.should_shut_down() {
                    let _ = sock.shutdown(std::net::Shutdown::Write);
                    io.state.shut_down = true;
                }
            }
            if io.state.finished() {
                if let Some(mut sock) = io.sock.take() {
                    let _ = self.poll.registry().deregister(&mut sock);
                }
                continue;
            }
            self.tunnels[slot] = Some(io);
        }
        for (id, credits) in grants {
            self.control_send(Kind::WindowUpdate(WindowUpdate { target: Some(window_update::Target::Stream(id)), credits }));
        }
        for (slot, why) in closes {
            self.tunnel_abort(slot, &why);
        }
        while self.tunnels.last().is_some_and(Option::is_none) {
            self.tunnels.pop();
        }
        self.restart_when_drained(now);
    }

    /// A pending config restart goes ahead once no stream is connected to the old child, or at
    /// its deadline.
    fn restart_when_drained(&mut self, now: Instant) {
        let Some((grace, deadline)) = self.restart_pending else { return };
        // A connect still in progress counts: the old child's kernel may already have queued it,
        // and stopping the child then resets it.
        let busy = self.tunnels.iter().flatten().any(|t| t.state.connected || t.sock.is_some());
        if busy && now < deadline {
            return;
        }
        self.restart_pending = None;
        info!("restarting the app");
        self.sup.restart(grace, now);
        self.send_status();
        // Until the new child listens, refused connects are retried.
        let until = now + grace.unwrap_or(self.stop_timeout) + self.stop_timeout;
        self.hold_until = Some(until);
        for t in self.tunnels.iter_mut().flatten() {
            if !t.state.connected {
                t.state.retry_until = Some(until);
            }
        }
        self.apply_actions(now);
    }

    /// Ends a stream with an error both ways.
    fn tunnel_abort(&mut self, slot: usize, why: &str) {
        if let Some(Some(t)) = self.tunnels.get(slot) {
            debug!("stream {}: {why}", t.state.id);
            let id = t.state.id;
            self.control_send(Kind::StreamClose(StreamClose { stream: id, half: false, error: why.to_owned() }));
        }
        self.tunnel_remove(slot);
    }

    fn tunnel_remove(&mut self, slot: usize) {
        if let Some(Some(mut t)) = self.tunnels.get_mut(slot).map(Option::take) {
            if let Some(mut sock) = t.sock.take() {
                let _ = self.poll.registry().deregister(&mut sock);
            }
        }
    }
}

/// The next URL-service frame: data read from an app socket that has credits (round robin), or
/// the half-close after the app's EOF.
fn next_tunnel_frame(table: &mut [Option<TunnelIo>], next: &mut usize, poll: &Poll) -> Option<Frame> {
    let len = table.len();
    for k in 0..len {
        let slot = (*next + k) % len;
        let Some(t) = &mut table[slot] else { continue };
        let budget = t.state.budget();
        if !t.readable || budget == 0 {
            continue;
        }
        let Some(sock) = &mut t.sock else { continue };
        let mut buf = [0u8; tunnel::CHUNK];
        match sock.read(&mut buf[..budget]) {
            Ok(0) => {
                t.state.app_eof = true;
                t.state.fin_sent = true;
                *next = (slot + 1) % len;
                let frame = Frame::from(Kind::StreamClose(StreamClose { stream: t.state.id, half: true, error: String::new() }));
                if t.state.finished() {
                    if let Some(mut sock) = t.sock.take() {
                        let _ = poll.registry().deregister(&mut sock);
                    }
                    table[slot] = None;
                }
                return Some(frame);
            }
            Ok(n) => {
                t.state.output.sent(n);
                *next = (slot + 1) % len;
                return Some(Frame::from(Kind::StreamData(StreamData { stream: t.state.id, data: buf[..n].to_vec() })));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => t.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let id = t.state.id;
                if let Some(mut sock) = t.sock.take() {
                    let _ = poll.registry().deregister(&mut sock);
                }
                table[slot] = None;
                return Some(Frame::from(Kind::StreamClose(StreamClose { stream: id, half: false, error: format!("the app reset the connection: {e}") })));
            }
        }
    }
    None
}

/// Writes config files atomically and removes the ones no longer configured; every step after
/// opening a file's directory goes by its fd, so an app that can write there cannot redirect it
/// (see `sys::files`).
fn apply_files(write: &[ConfigFile], remove: &[String]) -> Result<(), String> {
    for f in write {
        crate::sys::files::write(&f.path, f.mode, &f.contents)?;
    }
    for path in remove {
        crate::sys::files::remove(path)?;
    }
    Ok(())
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Addresses for a host that needs no DNS: an IP literal, or `localhost` (musl resolves it only
/// through /etc/hosts, which a scratch image may lack).
fn literal_addrs(host: &str) -> Option<Vec<IpAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(vec![ip]);
    }
    host.eq_ignore_ascii_case("localhost").then(|| vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)])
}

fn format_host_port(hp: &HostPort) -> String {
    if hp.host.contains(':') { format!("[{}]:{}", hp.host, hp.port) } else { format!("{}:{}", hp.host, hp.port) }
}

/// The first of our cgroup's OOM-kill counter files that can be read (None: no cgroup memory
/// controller, or no /proc or /sys — then OOM kills are simply not reported).
fn find_oom_counter() -> Option<String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = crate::supervisor::oom_counter_paths(&cgroups)
        .into_iter()
        .find(|p| std::fs::read_to_string(p).ok().as_deref().and_then(crate::supervisor::parse_oom_kills).is_some());
    match &path {
        Some(p) => debug!("counting OOM kills in {p}"),
        None => debug!("no cgroup OOM-kill counter found; OOM kills will not be told apart"),
    }
    path
}

impl Reactor {
    /// The cgroup's OOM-kill count now.
    fn oom_kills(&self) -> Option<u64> {
        let path = self.oom_counter.as_deref()?;
        crate::supervisor::parse_oom_kills(&std::fs::read_to_string(path).ok()?)
    }
}

/// Resident set size of `pid` in bytes (0 if unknown).
fn proc_rss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// User + system CPU time of `pid` in milliseconds (0 if unknown).
fn proc_cpu_ms(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(close) = stat.rfind(')') else { return 0 };
    // After "pid (comm)": state is field 3, utime field 14, stime field 15.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|x| x.parse::<u64>().ok()).sum());
    let hz = rustix::param::clock_ticks_per_second().max(1);
    ticks * 1000 / hz
}

/// The child's environment: ours, minus credentials, plus `PORT` if unset.
fn child_env(settings: &Settings) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().filter(|(k, _)| !SECRET_VARS.iter().any(|s| k == s)).collect();
    if !settings.port_set {
        env.retain(|(k, _)| k != "PORT");
        env.push(("PORT".into(), settings.port.to_string().into()));
    }
    env
}

/// Pids whose parent is `ppid`, from /proc (empty if /proc is not mounted).
fn children_of(ppid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| parse_ppid(&stat)) == Some(ppid)
        })
        .collect()
}

/// The parent pid from a /proc/PID/stat line: `pid (comm) state ppid ...`; comm may contain
/// spaces and parentheses, so parse after the last `)`.
fn parse_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for t in [Tok::Signals, Tok::ChildPipe(Out::Stdout), Tok::ChildPipe(Out::Stderr), Tok::Sink(Out::Stdout), Tok::Sink(Out::Stderr), Tok::Control, Tok::Waker, Tok::Exec(0, 0), Tok::Exec(15, 2), Tok::Exec(7, 1), Tok::Tunnel(0), Tok::Tunnel(1023)] {
            assert_eq!(Tok::from_token(t.token()), Some(t));
        }
        assert_eq!(Tok::from_token(Token(999)), None);
    }

    #[test]
    fn ppid_from_stat() {
        assert_eq!(parse_ppid("42 (sleep) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_ppid("42 (we ird) (x) Z 1 0"), Some(1));
        assert_eq!(parse_ppid("garbage"), None);
    }
}
