//! The one event loop. The only place that polls, registers fds, does I/O, or reads the clock
//! (house rule 1). Policy lives in the sans-IO cores; this file turns readiness and time into
//! their inputs and their actions into system calls.
//!
//! mio is edge-triggered: every ready fd is drained until `WouldBlock` (house rule 3), and a
//! stream that stopped reading because its buffer was full is resumed by hand once there is room.

use crate::config::{SECRET_VARS, Settings};
use crate::error::Error;
use crate::logger::{self, Record};
use crate::relay::Relay;
use crate::supervisor::{Action, Leftovers, Supervisor, Target};
use crate::sys::signals::{self, SigSet};
use crate::sys::spawn::{self, Placement, Spec, Stdio};
use crate::{debug, error, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch (for log timestamps).
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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

/// Every registered fd, as one enum (DESIGN.md); dispatch is an exhaustive match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// The signalfd.
    Signals,
    /// Our read end of the child's stdout/stderr pipe.
    ChildPipe(Out),
    /// Our own stdout/stderr, when writes to it can block.
    Sink(Out),
}

impl Tok {
    fn token(self) -> Token {
        Token(match self {
            Tok::Signals => 0,
            Tok::ChildPipe(o) => 1 + o as usize,
            Tok::Sink(o) => 3 + o as usize,
        })
    }

    fn from_token(t: Token) -> Option<Tok> {
        Some(match t.0 {
            0 => Tok::Signals,
            1 => Tok::ChildPipe(Out::Stdout),
            2 => Tok::ChildPipe(Out::Stderr),
            3 => Tok::Sink(Out::Stdout),
            4 => Tok::Sink(Out::Stderr),
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
    relay: Relay,
}

/// Own log lines waiting for stderr: a handful of lines; beyond this they are dropped (counted
/// by the logger queue before they get here).
const OWN_LOG_CAP: usize = 16 * 1024;

/// While cleaning up, how often to look for descendants that are not our children (their exit
/// does not raise SIGCHLD here).
const CLEANUP_TICK: Duration = Duration::from_millis(50);

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
        // A terminal is inherited directly (the app sees a TTY); WAYPOST_DISABLE means no capture.
        let capture_out = !settings.disable && !stdout_tty;
        let capture = [capture_out, capture_out && !stderr_tty];

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

        let mut sup = Supervisor::new(settings.stop_timeout, settings.signal_group);
        // Without a server there is nothing to wait for.
        sup.start();
        Ok(Reactor {
            poll,
            events: Events::with_capacity(32),
            signals: signals_fd,
            sup,
            argv,
            child_env: child_env(settings),
            capture,
            streams: [Stream { pipe: None, readable: false, relay: Relay::new() }, Stream { pipe: None, readable: false, relay: Relay::new() }],
            sinks,
            child_pgid: None,
            own_pid,
            own_log: Vec::new(),
            reap_pending: false,
            exit: None,
        })
    }

    fn run(&mut self) -> i32 {
        let mut now = Instant::now();
        loop {
            self.after_events(now);
            if let Some(code) = self.exit {
                self.shutdown();
                return code;
            }
            let mut deadline = self.sup.poll_timeout();
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
                    None => debug!("event for unknown token {}", event.token().0),
                }
            }
            self.events = events;
            if self.sup.poll_timeout().is_some_and(|d| d <= now) {
                let left = self.leftovers();
                self.sup.handle_timeout(now, left);
            }
        }
    }

    /// Everything that follows a round of events: reap, move bytes, carry out actions.
    fn after_events(&mut self, now: Instant) {
        if self.reap_pending {
            self.reap(now);
        }
        self.apply_actions(now);
        self.pump(Out::Stdout);
        self.pump(Out::Stderr);
        self.flush_own_log();
        if self.sup.finishing() {
            let left = self.leftovers();
            self.sup.handle_leftovers(left);
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
                Action::Exit(code) => self.exit = Some(code),
            }
        }
    }

    fn spawn_child(&mut self, now: Instant) {
        let stdio = |captured: bool| if captured { Stdio::Pipe } else { Stdio::Inherit };
        let spec = Spec {
            argv: &self.argv,
            env: &self.child_env,
            stdin: Stdio::Inherit,
            stdout: stdio(self.capture[0]),
            stderr: stdio(self.capture[1]),
            placement: Placement::Group { foreground: true },
        };
        match spawn::spawn(spec) {
            Ok(child) => {
                debug!("started {} (pid {})", self.argv[0].to_string_lossy(), child.pid);
                self.child_pgid = Some(child.pid);
                self.sup.handle_spawned(child.pid);
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
                    let code = crate::supervisor::exit_code(status.exit_status(), status.terminating_signal());
                    if Some(pid) == self.sup.child_pid() {
                        match status.terminating_signal() {
                            Some(sig) => info!("child (pid {pid}) killed by {}", signals::name(sig)),
                            None => debug!("child (pid {pid}) exited with code {code}"),
                        }
                    } else {
                        debug!("reaped pid {pid}");
                    }
                    self.sup.handle_exit(pid, code, now);
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

    /// Moves bytes from the child's pipe to our fd until neither side can make progress.
    fn pump(&mut self, out: Out) {
        let i = out as usize;
        loop {
            let mut progress = false;
            let s = &mut self.streams[i];
            if s.readable && !s.relay.is_full() {
                if let Some(pipe) = &s.pipe {
                    match rustix::io::read(pipe, s.relay.space()) {
                        Ok(0) => {
                            self.close_pipe(out);
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
            logger::drain(|rec| {
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
        let output = self
            .streams
            .iter()
            .zip(&self.sinks)
            .any(|(s, sink)| s.pipe.is_some() || (!s.relay.is_empty() && !sink.broken));
        Leftovers { descendants: children || group, output }
    }

    fn shutdown(&mut self) {
        self.flush_own_log();
        for sink in &self.sinks {
            sink.restore();
        }
    }
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
        for t in [Tok::Signals, Tok::ChildPipe(Out::Stdout), Tok::ChildPipe(Out::Stderr), Tok::Sink(Out::Stdout), Tok::Sink(Out::Stderr)] {
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
