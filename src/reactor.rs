//! The one event loop: the only place that polls, registers fds, does I/O, or reads the clock.
//! It holds no policy: readiness, bytes and time go into the agent core (`crate::agent`), and the
//! agent's actions come back out as system calls. See docs/architecture.md ("The loop").
//!
//! mio is edge-triggered: every ready fd is drained until `WouldBlock`, and a source that stopped
//! because a buffer was full is resumed by hand once there is room (no new edge comes).
//!
//! This file holds the loop, the dispatch and the child; the fd tables of each kind are in
//! submodules: `output` (the child's pipes, our stdout/stderr), `link` (the connection to the
//! server), `fds` (exec sessions and URL-service streams); `tokens` maps fds to mio tokens.

mod fds;
mod link;
mod output;
mod tokens;

use crate::agent::{Agent, Identity, IoAction, IoEvent, Local, Transmit};
use crate::error::Error;
use crate::settings::Settings;
use crate::sys::proc;
use crate::sys::signals::{self, SigSet};
use crate::sys::sink::Out;
use crate::sys::spawn::{self, Placement, Spec, Stdio};
use crate::{debug, error, warn};
use fds::{ExecSpec, Fds};
use link::Link;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Waker};
use output::Output;
pub use output::fail_early;
use rustix::io::Errno;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};
use tokens::Tok;
use waypost_proto::Frame;

pub use output::wall_ms;

pub struct Reactor {
    poll: Poll,
    events: Events,
    signals: OwnedFd,
    agent: Agent,
    argv: Vec<OsString>,
    output: Output,
    /// The connection to the server, with one.
    link: Option<Link>,
    fds: Fds,
    own_pid: i32,
    reap_pending: bool,
    exit: Option<i32>,
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
            rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(|e| {
                Error::Io {
                    context: "becoming a child subreaper",
                    source: e.into(),
                }
            })?;
        }
        // A terminal is inherited directly (the app sees a TTY) unless WAYPOST_CAPTURE asks for
        // the output anyway; WAYPOST_DISABLE means no capture at all.
        let tty = |fd| rustix::termios::isatty(fd) && !settings.capture;
        let capture_out = !settings.disable && !tty(rustix::stdio::stdout());
        let capture = [capture_out, capture_out && !tty(rustix::stdio::stderr())];

        let poll = Poll::new().map_err(Error::io("creating the epoll instance"))?;
        let reg = poll.registry();
        reg.register(
            &mut SourceFd(&signals_fd.as_raw_fd()),
            Tok::Signals.token(),
            Interest::READABLE,
        )
        .map_err(Error::io("registering the signalfd"))?;
        let output = Output::new(capture, reg, |out| Tok::Sink(out).token());
        let random = crate::sys::random::u64;
        let mut id = Identity {
            instance_id: Vec::new(),
            hostname: String::new(),
            pid: own_pid,
            env: std::env::vars_os().collect(),
            seeds: [random(), random()],
        };
        let link = match &settings.servers[..] {
            servers if settings.server_enabled() => {
                let waker =
                    Waker::new(reg, Tok::Waker.token()).map_err(Error::io("creating the waker"))?;
                let link = Link::new(settings, servers, Tok::Control.token(), waker)?;
                id.instance_id = vec![0u8; 16];
                crate::sys::random::fill(&mut id.instance_id)
                    .map_err(Error::io("reading random bytes"))?;
                id.hostname = rustix::system::uname()
                    .nodename()
                    .to_string_lossy()
                    .into_owned();
                Some(link)
            }
            _ => None,
        };
        Ok(Reactor {
            agent: Agent::new(settings, id, Instant::now()),
            poll,
            events: Events::with_capacity(32),
            signals: signals_fd,
            argv,
            output,
            link,
            fds: Fds::default(),
            own_pid,
            reap_pending: false,
            exit: None,
            // Only the server is told about OOM kills: without one, no files to read.
            oom_counter: if settings.server_enabled() {
                proc::find_oom_counter()
            } else {
                None
            },
        })
    }

    fn run(&mut self) -> i32 {
        let mut now = Instant::now();
        loop {
            self.after_events(now);
            if let Some(code) = self.exit {
                if let Some(link) = &mut self.link {
                    link.close();
                }
                self.output
                    .finish(&mut self.agent, self.poll.registry(), now);
                return code;
            }
            let timeout = self
                .agent
                .poll_timeout(now)
                .map(|d| d.saturating_duration_since(now));
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
                    Some(Tok::ChildPipe(o)) if readable => self.output.readable(o),
                    Some(Tok::Sink(o)) if writable => self.output.writable(o),
                    Some(Tok::ChildPipe(_) | Tok::Sink(_)) => {}
                    Some(Tok::Control) => self.on_control(now),
                    Some(Tok::Waker) => {
                        if let Some(link) = &mut self.link {
                            link.resolved(self.poll.registry(), &mut self.agent, now);
                        }
                        self.act(now);
                    }
                    Some(Tok::Tunnel(slot)) => self.fds.tunnel_ready(
                        slot as usize,
                        readable,
                        writable,
                        event.is_read_closed() || event.is_error(),
                    ),
                    Some(Tok::Exec(slot, which)) => {
                        self.fds
                            .exec_ready(slot as usize, which as usize, readable, writable)
                    }
                    None => debug!("event for unknown token {}", event.token().0),
                }
            }
            self.events = events;
            if self.agent.finishing() {
                self.agent.set_local(self.local());
            }
            self.agent.handle_timeout(now);
            self.act(now);
        }
    }

    /// Everything that follows a round of events: reap, move bytes, carry out actions.
    fn after_events(&mut self, now: Instant) {
        if self.reap_pending {
            self.reap(now);
        }
        self.act(now);
        for out in [Out::Stdout, Out::Stderr] {
            self.output
                .pump(out, &mut self.agent, self.poll.registry(), now);
        }
        self.fds.exec_input(&mut self.agent, now);
        self.act(now);
        self.fds
            .tunnel_io(self.poll.registry(), &mut self.agent, now);
        self.act(now);
        self.output.flush_own_log(&mut self.agent);
        self.write_control(now);
        self.act(now);
        if self.agent.finishing() {
            let local = self.local();
            self.agent.handle_io(IoEvent::Leftovers(local), now);
            self.act(now);
        }
        self.output.flush_own_log(&mut self.agent);
    }

    /// Carries out the agent's actions, in order, until it has none.
    fn act(&mut self, now: Instant) {
        while let Some(action) = self.agent.poll_io() {
            let reg = self.poll.registry();
            match action {
                IoAction::SpawnChild => self.spawn_child(now),
                IoAction::Kill { pid, sig, report } => {
                    if let Err(e) = signals::kill(pid, sig) {
                        if report && e.raw_os_error() != Some(libc::ESRCH) {
                            warn!("sending {} to {pid}: {e}", signals::name(sig));
                        }
                    }
                }
                IoAction::SignalDescendants { pgid, sig } => {
                    if let Some(pgid) = pgid {
                        let _ = signals::kill(-pgid, sig);
                    }
                    let n = proc::children_of(self.own_pid)
                        .into_iter()
                        .filter(|&pid| signals::kill(pid, sig).is_ok())
                        .count();
                    if n > 0 {
                        debug!("sent {} to {n} leftover processes", signals::name(sig));
                    }
                }
                IoAction::Exit(code) => self.exit = Some(code),
                IoAction::Connect(to) => {
                    if let Some(link) = &mut self.link {
                        link.connect(reg, &mut self.agent, to, now);
                    }
                }
                IoAction::Disconnect { polite } => {
                    if let Some(link) = &mut self.link {
                        link.drop_conn(reg, polite);
                    }
                }
                IoAction::WriteConfig {
                    version,
                    write,
                    remove,
                } => {
                    let result = crate::sys::files::apply(&write, &remove);
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
                IoAction::StartExec {
                    slot,
                    id,
                    argv,
                    env,
                    pty,
                    stdin,
                } => {
                    let spec = ExecSpec {
                        slot,
                        id,
                        argv: &argv,
                        env: &env,
                        pty,
                        stdin,
                    };
                    self.fds.start_exec(spec, reg, &mut self.agent, now);
                }
                IoAction::ResizeExec { slot, rows, cols } => self.fds.resize_exec(slot, rows, cols),
                IoAction::CloseExecStdin(slot) => self.fds.close_exec(reg, slot, Some(0)),
                IoAction::CloseExecOutput { slot, which } => {
                    self.fds.close_exec(reg, slot, Some(which))
                }
                IoAction::CloseExec(slot) => self.fds.close_exec(reg, slot, None),
                IoAction::ConnectTunnel { slot, id, addr } => {
                    self.fds
                        .connect_tunnel(slot, id, addr, reg, &mut self.agent, now)
                }
                IoAction::ShutdownTunnel(slot) => self.fds.shutdown_tunnel(slot),
                IoAction::CloseTunnel(slot) => self.fds.close_tunnel(reg, slot),
            }
        }
    }

    fn spawn_child(&mut self, now: Instant) {
        let env = self.agent.child_env();
        let (stdout, stderr) = (
            self.output.stdio(Out::Stdout),
            self.output.stdio(Out::Stderr),
        );
        let spec = Spec {
            argv: &self.argv,
            env: &env,
            stdin: Stdio::Inherit,
            stdout,
            stderr,
            placement: Placement::Group { foreground: true },
        };
        match spawn::spawn(spec) {
            Ok(child) => {
                debug!(
                    "started {} (pid {})",
                    self.argv[0].to_string_lossy(),
                    child.pid
                );
                let oom_kills = self.oom_counter.as_deref().and_then(proc::oom_kills);
                self.agent.handle_io(
                    IoEvent::ChildSpawned {
                        pid: child.pid,
                        oom_kills,
                    },
                    now,
                );
                for (out, pipe) in [(Out::Stdout, child.stdout), (Out::Stderr, child.stderr)] {
                    if let Some(pipe) = pipe {
                        self.output.add_pipe(
                            out,
                            pipe,
                            self.poll.registry(),
                            Tok::ChildPipe(out).token(),
                        );
                    }
                }
            }
            Err(e) => {
                error!("{e}");
                self.agent.handle_io(
                    IoEvent::ChildSpawnFailed {
                        code: e.exit_code(),
                    },
                    now,
                );
            }
        }
    }

    fn on_signals(&mut self, now: Instant) {
        let mut batch = [0; signals::BATCH];
        loop {
            let n = match signals::read_batch(&self.signals, &mut batch) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => return error!("reading signals: {e}"),
            };
            for &sig in &batch[..n] {
                if sig == libc::SIGCHLD {
                    self.reap_pending = true;
                } else {
                    self.agent.handle_io(IoEvent::Signal(sig), now);
                }
            }
            self.act(now);
        }
    }

    /// The one reaper: every exited child, including adopted orphans (`wait` is
    /// `waitpid(-1)`; rustix's `waitpid(None)` would mean our own process group only).
    fn reap(&mut self, now: Instant) {
        self.reap_pending = false;
        loop {
            match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    let pid = pid.as_raw_nonzero().get();
                    // The OOM-kill count matters only for the main child.
                    let counter = self
                        .oom_counter
                        .as_deref()
                        .filter(|_| Some(pid) == self.agent.child_pid());
                    let (code, signal, oom_kills) = (
                        status.exit_status(),
                        status.terminating_signal(),
                        counter.and_then(proc::oom_kills),
                    );
                    self.agent.handle_io(
                        IoEvent::Reaped {
                            pid,
                            code,
                            signal,
                            oom_kills,
                        },
                        now,
                    );
                }
                Ok(None) | Err(Errno::CHILD) => return,
                Err(Errno::INTR) => continue,
                Err(e) => return error!("waitpid: {e}"),
            }
        }
    }

    /// What is still around locally while finishing.
    fn local(&self) -> Local {
        let children = proc::has_children();
        let group = self
            .agent
            .child_pgid()
            .is_some_and(|pgid| signals::kill(-pgid, 0).is_ok());
        let (output, unlogged) = self.output.leftovers();
        Local {
            descendants: children || group,
            output,
            unlogged,
        }
    }

    /// The connection's socket is ready: advance setup, read, write (which also keeps the
    /// socket's registration in step with what the handshake wants).
    fn on_control(&mut self, now: Instant) {
        let Some(link) = &mut self.link else { return };
        link.drive(self.poll.registry(), &mut self.agent, now);
        self.act(now);
        self.read_control(now);
        self.write_control(now);
        self.act(now);
    }

    /// Reads frames until the socket would block, and carries out what each one means before
    /// the next (an ExecStart's process exists before that session's input arrives; a Welcome
    /// sets where the log resend starts before any batch is written).
    fn read_control(&mut self, now: Instant) {
        while let Some(next) = self
            .link
            .as_mut()
            .and_then(|l| l.next_frame(self.poll.registry()))
        {
            match next {
                Ok(kind) => self.agent.handle_frame(kind, now),
                Err(why) => self.agent.handle_io(IoEvent::Closed(&why), now),
            }
            self.act(now);
        }
    }

    /// Fills the connection in the agent's priority order (exec and stream output is read only
    /// as the send buffer has room), adding our /proc figures to Status frames.
    fn write_control(&mut self, now: Instant) {
        let Some(link) = &mut self.link else { return };
        let (agent, fds, own_pid) = (&mut self.agent, &mut self.fds, self.own_pid);
        link.write(self.poll.registry(), |wbuf| {
            while wbuf.wants_more() {
                match agent.poll_transmit(now, fds) {
                    Some(Transmit::Frame(mut kind)) => {
                        proc::fill_status(&mut kind, own_pid);
                        if let Err(e) = wbuf.push(&Frame::from(kind)) {
                            error!("dropping a frame that cannot be sent: {e}");
                        }
                    }
                    Some(Transmit::LogBatch) => {
                        // Announced as due; should nothing be encoded after all, stop here
                        // rather than be offered the same batch again in this loop.
                        if !wbuf.append(|out| agent.encode_logs(out, now)) {
                            break;
                        }
                    }
                    None => break,
                }
            }
        });
    }
}
