//! The agent core, sans-IO: everything the entrypoint decides, in one place. It owns the
//! control session, the supervisor, the log shipper, the app's config, the exec sessions and the
//! URL-service streams, and it decides frame routing, the zero-downtime restart, the last words
//! at exit and the write priority on the one connection.
//!
//! The reactor (the only code that touches fds or reads the clock) drives it the way quinn-proto
//! and str0m are driven, with the time passed in:
//! - inputs: [`Agent::handle_frame`] (a frame from the server), [`Agent::handle_io`] (what the
//!   reactor did or saw: a spawn, an exit, a signal, a connection, a connect result, ...),
//!   [`Agent::handle_timeout`] (called once per loop round), plus a few byte-level calls for the
//!   data paths (`handle_output`, `exec_pending`/`exec_wrote`, `tunnel_pending`/`tunnel_wrote`);
//! - outputs: [`Agent::poll_io`] (what to do: spawn, signal, connect, write files, exit, ...),
//!   [`Agent::poll_transmit`] (the next frame for the server, in priority order),
//!   [`Agent::poll_timeout`] (when to call `handle_timeout` at the latest).
//!
//! The reactor carries out the [`IoAction`]s after every input, in order: an action names a slot
//! that the agent has already reserved (or freed), and no other input comes in between.
//! See docs/architecture.md ("The agent core").

use crate::app_config::{ConfigCore, Step};
use crate::exec::{self, MAX_SESSIONS};
use crate::logs::Logs;
use crate::session::{Event, Session};
use crate::settings::{ENTRYPOINT_ONLY_VARS, SECRET_VARS, Settings, UrlPorts};
use crate::supervisor::{Action, ChildState, Leftovers, Supervisor, Target};
use crate::tunnel::{self, MAX_STREAMS};
use crate::{debug, info, trace, warn};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};
use waypost_proto::{
    ConfigApplied, ConfigFile, ExecExit, ExecOutput, ExecStart, ExecStarted, Features, Hello, Kind,
    LogStream, OutputStream, Status, StreamClose, StreamData, StreamOpen, WindowUpdate, status,
    window_update,
};

#[cfg(test)]
mod tests;

/// While cleaning up, how often to look for descendants that are not our children (their exit
/// does not raise SIGCHLD here).
pub const CLEANUP_TICK: Duration = Duration::from_millis(50);

/// At most one WARN per this long about streams refused by `WAYPOST_URL_PORTS` (a server probing
/// ports could otherwise flood the log); the ones in between are counted into the next WARN.
pub const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// What the agent learns about its process at start (the reactor gathers it).
pub struct Identity {
    /// Random, made once at start, kept across reconnects.
    pub instance_id: Vec<u8>,
    pub hostname: String,
    /// Our own pid.
    pub pid: i32,
    /// Our environment, already without the credentials (the child's starts from it).
    pub env: Vec<(OsString, OsString)>,
    /// Seeds for the backoff jitter and the restart splay.
    pub seeds: [u64; 2],
}

/// Something the reactor did or saw.
#[derive(Debug)]
pub enum IoEvent<'a> {
    /// A signal other than SIGCHLD arrived at the entrypoint.
    Signal(i32),
    /// The main child started; `oom_kills`: the cgroup's OOM-kill count now.
    ChildSpawned { pid: i32, oom_kills: Option<u64> },
    /// Starting the main child failed (exit 126/127).
    ChildSpawnFailed { code: i32 },
    /// A process was reaped (the main child, an exec process, an adopted orphan).
    Reaped {
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
        oom_kills: Option<u64>,
    },
    /// The connection to the server is up (TLS done).
    Connected,
    /// The connection failed to open, or closed; the reason is for the log.
    Closed(&'a str),
    /// The files of [`IoAction::WriteConfig`] were written and removed, or not.
    ConfigWritten {
        version: u64,
        wrote: usize,
        removed: usize,
        result: Result<(), String>,
    },
    /// An exec process of [`IoAction::StartExec`] runs.
    ExecStarted { slot: usize, pid: i32 },
    /// It could not be started: reported to the server as an exit with this code.
    ExecFailed {
        slot: usize,
        code: i32,
        error: String,
    },
    /// A stream's connect to the app completed.
    TunnelConnected(usize),
    /// A stream's connect to the app failed after it was started (its socket is gone).
    TunnelRefused { slot: usize, error: &'a io::Error },
    /// A stream's connect could not even be started: it has no socket.
    TunnelNoSocket(usize),
    /// While cleaning up: what is still around locally.
    Leftovers(Local),
}

/// What is still around locally while the entrypoint finishes (the reactor looks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Local {
    /// Some descendant is alive.
    pub descendants: bool,
    /// A captured pipe is open or has bytes not yet written to our stdout/stderr.
    pub output: bool,
    /// Output the log shipper has not taken yet (block mode), or an end of stream it was not
    /// told yet.
    pub unlogged: bool,
}

/// What the reactor must do.
#[derive(Debug, PartialEq)]
pub enum IoAction {
    /// Start the main child with [`Agent::child_env`].
    SpawnChild,
    /// `kill(pid, sig)` (`pid < 0`: a process group); `report`: log failures other than ESRCH.
    Kill { pid: i32, sig: i32, report: bool },
    /// Signal the child's leftovers: its group `pgid`, and every process we adopted.
    SignalDescendants { pgid: Option<i32>, sig: i32 },
    /// Exit with this code.
    Exit(i32),
    /// Open a connection to this entry of the server list (resolve off the loop, TCP, proxy,
    /// TLS).
    Connect(crate::session::Target),
    /// Close the connection (`polite`: TLS close_notify first) and forget its buffers.
    Disconnect { polite: bool },
    /// Write these config files and remove these; report [`IoEvent::ConfigWritten`].
    WriteConfig {
        version: u64,
        write: Vec<ConfigFile>,
        remove: Vec<String>,
    },
    /// Start an exec process in `slot` (on a PTY of rows×cols, or pipes); report
    /// [`IoEvent::ExecStarted`] or [`IoEvent::ExecFailed`].
    StartExec {
        slot: usize,
        id: u64,
        argv: Vec<OsString>,
        env: Vec<(OsString, OsString)>,
        pty: Option<(u32, u32)>,
        stdin: bool,
    },
    /// Set an exec session's terminal size.
    ResizeExec { slot: usize, rows: u32, cols: u32 },
    /// Close an exec session's stdin pipe (its input is over).
    CloseExecStdin(usize),
    /// Close one of an exec session's output fds (it reached EOF).
    CloseExecOutput { slot: usize, which: usize },
    /// Close every fd of an exec session (it is over).
    CloseExec(usize),
    /// Connect stream `id`'s socket (in `slot`) to the app at `addr`; report
    /// [`IoEvent::TunnelNoSocket`] if that cannot even start.
    ConnectTunnel {
        slot: usize,
        id: u64,
        addr: SocketAddr,
    },
    /// Shut down the write side of a stream's socket.
    ShutdownTunnel(usize),
    /// Close a stream's socket (it is over).
    CloseTunnel(usize),
}

/// A data source read while the connection is filled (see [`Agent::poll_transmit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An exec session's output: slot, and 0 (the PTY master), 1 (stdout) or 2 (stderr).
    Exec(usize, usize),
    /// A stream's socket to the app, by slot.
    Tunnel(usize),
}

/// The outcome of one read for [`Pull`].
#[derive(Debug)]
pub enum Read {
    Data(usize),
    Eof,
    /// Nothing now (not ready, or no fd).
    Blocked,
    /// The source failed (an app's socket reset).
    Failed(io::Error),
}

/// Reads from exec and stream sources on the agent's behalf: the agent decides whom to read and
/// how much (credits, priority, fairness), the reactor does the read. Output is read only when
/// the connection has room for it, so a busy source waits in its own pipe or socket.
pub trait Pull {
    fn read(&mut self, src: Source, buf: &mut [u8]) -> Read;
}

/// The next thing to write to the server.
// Allowed: a Transmit is returned by value, one at a time, and encoded at once; never stored
// or queued. Boxing the frame would allocate for every frame sent instead.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Transmit {
    /// This frame.
    Frame(Kind),
    /// A log batch: have [`Agent::encode_logs`] write it straight into the send buffer.
    LogBatch,
}

pub struct Agent {
    sup: Supervisor,
    /// The control session, with a server.
    session: Option<Session>,
    /// The fixed part of our Hello.
    hello: Hello,
    cfg: ConfigCore,
    config_disabled: bool,
    /// Log shipping (with a server, unless WAYPOST_DISABLE_LOGS).
    logs: Option<Logs>,
    /// Exec sessions by slot (the reactor's fd table uses the same slots).
    exec: [Option<exec::Session>; MAX_SESSIONS],
    /// Where to look for exec output next (round robin, so no session starves).
    exec_next: usize,
    exec_disabled: bool,
    exec_allow: Option<Vec<String>>,
    /// URL-service streams by slot (grows up to MAX_STREAMS).
    tunnels: Vec<Option<tunnel::Stream>>,
    tunnel_next: usize,
    /// The buffer exec output and app bytes are read into before they become a frame: allocated
    /// on the first such read and reused, because a fresh zeroed 16 KiB array for every slot
    /// polled cost more CPU than the tunnel's syscalls (profiled: memset 13% under keep-alive load).
    scratch: Vec<u8>,
    url_disabled: bool,
    url_hold: bool,
    /// The app's port (`PORT`).
    app_port: u16,
    /// `WAYPOST_URL_PORTS`: the other ports streams may reach.
    url_ports: UrlPorts,
    /// Streams refused by `url_ports`: when the last WARN went out, and how many were refused
    /// since without one.
    refusals: (Option<Instant>, u32),
    stop_timeout: Duration,
    /// A config restart waiting for the app's in-flight streams to finish: (grace, deadline).
    restart_pending: Option<(Option<Duration>, Instant)>,
    /// Streams opened around a restart are retried until the new child listens, up to this.
    hold_until: Option<Instant>,
    /// Our environment minus credentials and [`ENTRYPOINT_ONLY_VARS`], plus `PORT` if unset: the
    /// base of every child's.
    base_env: Vec<(OsString, OsString)>,
    /// The main child's process group (= its first pid), for group signals and cleanup.
    child_pgid: Option<i32>,
    /// What the reactor last saw locally while cleaning up.
    local: Local,
    /// Actions for the reactor. INVARIANT: drained after every input, so it stays short.
    io: VecDeque<IoAction>,
}

impl Agent {
    pub fn new(settings: &Settings, id: Identity, now: Instant) -> Agent {
        let mut sup = Supervisor::new(
            settings.stop_timeout,
            settings.signal_group,
            settings.flush_timeout,
        );
        let server = settings.server_enabled();
        let session = server.then(|| {
            let mut session = Session::with_servers(id.seeds[0], settings.servers.len());
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
            session
        });
        if !server {
            // Without a server there is nothing to wait for.
            sup.start();
        }
        let hello = Hello {
            protocol_version: waypost_proto::PROTOCOL_VERSION,
            token: settings.token.clone().unwrap_or_default(),
            instance_id: id.instance_id,
            entrypoint_version: env!("CARGO_PKG_VERSION").into(),
            hostname: id.hostname,
            pid: id.pid as u32,
            disabled: Some(Features {
                config: settings.disable_config,
                logs: settings.disable_logs,
                exec: settings.disable_exec,
                url: settings.disable_url,
            }),
            labels: settings.labels.clone(),
            ..Default::default()
        };
        let mut base_env: Vec<(OsString, OsString)> = id
            .env
            .into_iter()
            .filter(|(k, _)| {
                !SECRET_VARS
                    .iter()
                    .chain(&ENTRYPOINT_ONLY_VARS)
                    .any(|s| k == s)
            })
            .collect();
        if !settings.port_set {
            base_env.retain(|(k, _)| k != "PORT");
            base_env.push(("PORT".into(), settings.port.to_string().into()));
        }
        let mut agent = Agent {
            sup,
            session,
            hello,
            cfg: ConfigCore::new(id.seeds[1]),
            config_disabled: settings.disable_config,
            logs: (server && !settings.disable_logs)
                .then(|| Logs::new(settings.log_buffer as usize, settings.log_mode)),
            exec: std::array::from_fn(|_| None),
            exec_next: 0,
            exec_disabled: settings.disable_exec,
            exec_allow: settings.exec_allow.clone(),
            tunnels: Vec::new(),
            tunnel_next: 0,
            scratch: Vec::new(),
            url_disabled: settings.disable_url,
            url_hold: settings.url_hold,
            app_port: settings.port,
            url_ports: settings.url_ports.clone(),
            refusals: (None, 0),
            stop_timeout: settings.stop_timeout,
            restart_pending: None,
            hold_until: None,
            base_env,
            child_pgid: None,
            local: Local::default(),
            io: VecDeque::new(),
        };
        agent.route(now);
        agent.sup_actions(now);
        agent
    }

    // ----- what the reactor asks -----

    /// The next thing to do.
    pub fn poll_io(&mut self) -> Option<IoAction> {
        self.io.pop_front()
    }

    /// The main child's pid while it runs.
    pub fn child_pid(&self) -> Option<i32> {
        self.sup.child_pid()
    }

    /// The child has exited and the entrypoint is on its way out.
    pub fn finishing(&self) -> bool {
        self.sup.finishing()
    }

    /// The main child's process group (it stays known after the child exited).
    pub fn child_pgid(&self) -> Option<i32> {
        self.child_pgid
    }

    /// The control session, for inspection (tests, the fuzzer).
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// The log shipper, for inspection (tests, the fuzzer).
    pub fn logs(&self) -> Option<&Logs> {
        self.logs.as_ref()
    }

    /// Version of the config snapshot in force (0: none).
    pub fn config_version(&self) -> u64 {
        self.cfg.version()
    }

    /// Whether connected and welcomed.
    pub fn is_ready(&self) -> bool {
        self.session.as_ref().is_some_and(Session::is_ready)
    }

    /// Whether the session holds a connection (open or being opened).
    pub fn has_connection(&self) -> bool {
        self.session.as_ref().is_some_and(Session::has_connection)
    }

    /// The child's environment: ours without credentials, `PORT` if unset, the config's on top.
    pub fn child_env(&self) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = self
            .base_env
            .iter()
            .filter(|(k, _)| !self.cfg.child_env().any(|(c, _)| k == c.as_str()))
            .cloned()
            .collect();
        env.extend(self.cfg.child_env().map(|(k, v)| (k.into(), v.into())));
        env
    }

    /// The earliest time [`Agent::handle_timeout`] must be called.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut deadline = self.sup.poll_timeout();
        if let Some(s) = &self.session {
            deadline = earliest(deadline, s.poll_timeout());
        }
        deadline = earliest(deadline, self.cfg.poll_timeout());
        if let Some(logs) = &self.logs {
            deadline = earliest(deadline, logs.poll_timeout(self.is_ready(), now));
        }
        for e in self.exec.iter().flatten() {
            deadline = earliest(deadline, e.poll_timeout(now));
        }
        if !self.restarting() {
            // (While the old child drains or stops, held streams wait for the restart — the
            // new child's spawn wakes the loop — not a timer that would stay due.)
            for t in self.tunnels.iter().flatten() {
                deadline = earliest(deadline, t.retry_at());
            }
        }
        deadline = earliest(deadline, self.restart_pending.map(|(_, at)| at));
        if self.sup.finishing() {
            deadline = earliest(deadline, Some(now + CLEANUP_TICK));
        }
        deadline
    }

    // ----- inputs -----

    /// A frame arrived from the server.
    pub fn handle_frame(&mut self, kind: Kind, now: Instant) {
        if let Some(s) = &mut self.session {
            s.handle_frame(kind, now);
        }
        self.route(now);
    }

    /// What the reactor did or saw.
    pub fn handle_io(&mut self, event: IoEvent<'_>, now: Instant) {
        match event {
            IoEvent::Signal(sig) => {
                debug!("received {}, forwarding", crate::sys::signals::name(sig));
                self.sup.handle_signal(sig, now);
            }
            IoEvent::ChildSpawned { pid, oom_kills } => {
                self.child_pgid = Some(pid);
                self.sup.handle_spawned(pid, oom_kills);
                self.send_status(now);
            }
            IoEvent::ChildSpawnFailed { code } => self.sup.handle_spawn_failed(code, now),
            IoEvent::Reaped {
                pid,
                code,
                signal,
                oom_kills,
            } => self.reaped(pid, code, signal, oom_kills, now),
            IoEvent::Connected => {
                let hello = self.hello_now();
                if let Some(s) = &mut self.session {
                    s.handle_connected(hello, now);
                }
            }
            IoEvent::Closed(why) => {
                if let Some(s) = &mut self.session {
                    s.handle_closed(why, now);
                }
            }
            IoEvent::ConfigWritten {
                version,
                wrote,
                removed,
                result,
            } => {
                match &result {
                    Err(e) => crate::error!("config version {version} not applied: {e}"),
                    Ok(()) if wrote > 0 || removed > 0 => {
                        info!("config version {version}: wrote {wrote} files, removed {removed}")
                    }
                    Ok(()) => {}
                }
                self.cfg.handle_applied(result.is_ok());
                let error = result.err().unwrap_or_default();
                self.send(Kind::ConfigApplied(ConfigApplied { version, error }), now);
                self.config_steps(now);
            }
            IoEvent::ExecStarted { slot, pid } => {
                if let Some(e) = &mut self.exec[slot] {
                    e.started(pid);
                    let id = e.id();
                    self.send(
                        Kind::ExecStarted(ExecStarted {
                            session: id,
                            pid: pid as u32,
                        }),
                        now,
                    );
                }
            }
            IoEvent::ExecFailed { slot, code, error } => {
                if let Some(e) = self.exec[slot].take() {
                    self.send(
                        Kind::ExecExit(ExecExit {
                            session: e.id(),
                            code,
                            signal: 0,
                            error,
                        }),
                        now,
                    );
                }
            }
            IoEvent::TunnelConnected(slot) => {
                if let Some(Some(t)) = self.tunnels.get_mut(slot) {
                    t.handle_connected();
                    self.tunnel_check(slot, now);
                }
            }
            IoEvent::TunnelRefused { slot, error } => self.tunnel_refused(slot, error, now),
            IoEvent::TunnelNoSocket(slot) => {
                if let Some(Some(t)) = self.tunnels.get_mut(slot) {
                    t.handle_no_socket();
                }
                self.restart_when_drained(now);
            }
            IoEvent::Leftovers(local) => {
                self.local = local;
                if self.sup.finishing() {
                    let left = self.leftovers();
                    self.sup.handle_leftovers(left, now);
                }
            }
        }
        self.route(now);
        self.sup_actions(now);
    }

    /// What is still around locally, for the next [`Agent::handle_timeout`] (no other effect).
    pub fn set_local(&mut self, local: Local) {
        self.local = local;
    }

    /// Acts on everything due at `now`; call once per loop round.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.sup.poll_timeout().is_some_and(|d| d <= now) {
            let left = self.leftovers();
            self.sup.handle_timeout(now, left);
            self.sup_actions(now);
        }
        if let Some(s) = &mut self.session {
            if s.poll_timeout().is_some_and(|d| d <= now) {
                s.handle_timeout(now);
                self.route(now);
            }
        }
        if self.cfg.poll_timeout().is_some_and(|d| d <= now) {
            self.cfg.handle_timeout(now);
            self.config_steps(now);
        }
        if let Some(logs) = &mut self.logs {
            logs.handle_timeout(now);
        }
        for e in self.exec.iter_mut().flatten() {
            if e.kill_due(now) && e.pid() > 0 {
                self.io.push_back(IoAction::Kill {
                    pid: -e.pid(),
                    sig: libc::SIGKILL,
                    report: false,
                });
            }
        }
        if !self.restarting() {
            // A held or refused stream whose retry is due.
            for slot in 0..self.tunnels.len() {
                if let Some(t) = &mut self.tunnels[slot] {
                    if t.retry_due(now) {
                        let port = t.port();
                        t.connecting(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)));
                        let (id, addr) = (
                            t.id(),
                            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                        );
                        self.io
                            .push_back(IoAction::ConnectTunnel { slot, id, addr });
                    }
                }
            }
        }
        self.restart_when_drained(now);
    }

    /// Bytes the child wrote on `stream`; `wall_us`: now, Unix µs. Returns how many the log
    /// shipper took (all of them without one).
    pub fn handle_output(
        &mut self,
        stream: LogStream,
        bytes: &[u8],
        wall_us: i64,
        now: Instant,
    ) -> usize {
        match &mut self.logs {
            Some(logs) => logs.handle_output(stream, bytes, wall_us, now),
            None => bytes.len(),
        }
    }

    /// The child's `stream` ended (every byte before was taken).
    pub fn handle_output_eof(&mut self, stream: LogStream, now: Instant) {
        if let Some(logs) = &mut self.logs {
            logs.handle_eof(stream, now);
        }
    }

    /// One of our own log lines, for the `entrypoint` stream.
    pub fn handle_own_log(&mut self, rec: &crate::logger::Record, wall_us: i64, now: Instant) {
        if let Some(logs) = &mut self.logs {
            logs.handle_own(
                format!("{} {}", rec.level.as_str(), rec.msg).as_bytes(),
                wall_us,
                now,
            );
        }
    }

    /// The end: no more log shipping; what the shipper did not take goes to our own fds only.
    pub fn stop_logs(&mut self) {
        self.logs = None;
    }

    /// What to write to exec session `slot`'s stdin (or PTY) now.
    pub fn exec_pending(&self, slot: usize) -> &[u8] {
        self.exec[slot]
            .as_ref()
            .map_or(&[], exec::Session::to_write)
    }

    /// `n` bytes of [`Agent::exec_pending`] were written.
    pub fn exec_wrote(&mut self, slot: usize, n: usize, now: Instant) {
        let Some(e) = &mut self.exec[slot] else {
            return;
        };
        if let Some(credits) = e.wrote(n) {
            let id = e.id();
            self.send(
                Kind::WindowUpdate(WindowUpdate {
                    target: Some(window_update::Target::ExecSession(id)),
                    credits,
                }),
                now,
            );
        }
        self.exec_stdin_check(slot);
    }

    /// Writing to exec session `slot`'s stdin failed: the process closed it.
    pub fn exec_write_failed(&mut self, slot: usize) {
        if let Some(e) = &mut self.exec[slot] {
            e.write_failed();
        }
        self.exec_stdin_check(slot);
    }

    /// What to write to stream `slot`'s socket now.
    pub fn tunnel_pending(&self, slot: usize) -> &[u8] {
        match self.tunnels.get(slot) {
            Some(Some(t)) if t.is_connected() => t.pending(),
            _ => &[],
        }
    }

    /// Whether stream `slot`'s connect completed.
    pub fn tunnel_connected(&self, slot: usize) -> bool {
        matches!(self.tunnels.get(slot), Some(Some(t)) if t.is_connected())
    }

    /// `n` bytes of [`Agent::tunnel_pending`] were written to the app.
    pub fn tunnel_wrote(&mut self, slot: usize, n: usize, now: Instant) {
        let Some(Some(t)) = self.tunnels.get_mut(slot) else {
            return;
        };
        if let Some(credits) = t.wrote(n) {
            let id = t.id();
            self.send(
                Kind::WindowUpdate(WindowUpdate {
                    target: Some(window_update::Target::Stream(id)),
                    credits,
                }),
                now,
            );
        }
        self.tunnel_check(slot, now);
    }

    /// Writing to stream `slot`'s socket failed: the stream ends with an error both ways.
    pub fn tunnel_write_failed(&mut self, slot: usize, error: &io::Error, now: Instant) {
        self.tunnel_abort(slot, &format!("writing to the app: {error}"), now);
    }

    // ----- output to the server -----

    /// The next thing to write to the server, highest priority first: control frames, then exec
    /// output and exit reports, then stream data, and log batches last — so a log flood never
    /// makes an interactive session lag. Call it only while the send buffer has room: exec and
    /// stream output is read (through `pull`) only here, and only as much as credits allow.
    pub fn poll_transmit(&mut self, now: Instant, pull: &mut impl Pull) -> Option<Transmit> {
        let session = self.session.as_mut()?;
        if let Some(kind) = session.poll_transmit() {
            return Some(Transmit::Frame(kind));
        }
        if !session.is_ready() {
            return None;
        }
        if let Some(kind) = self.next_exec_frame(now, pull) {
            return Some(Transmit::Frame(kind));
        }
        if let Some(kind) = self.next_tunnel_frame(now, pull) {
            return Some(Transmit::Frame(kind));
        }
        let urgent = self.sup.finishing();
        self.logs
            .as_ref()
            .is_some_and(|l| l.batch_due(now, urgent))
            .then_some(Transmit::LogBatch)
    }

    /// Writes the log batch [`Transmit::LogBatch`] announced into `out`.
    pub fn encode_logs(&mut self, out: &mut Vec<u8>, now: Instant) -> bool {
        self.logs.as_mut().is_some_and(|l| l.encode_batch(out, now))
    }

    // ----- routing -----

    fn restarting(&self) -> bool {
        self.restart_pending.is_some()
            || matches!(self.sup.child_state(), ChildState::Restarting(_))
    }

    /// Queues a frame for the server, if connected and welcomed.
    fn send(&mut self, kind: Kind, now: Instant) {
        if let Some(s) = &mut self.session {
            s.send(kind, now);
        }
    }

    /// Carries out what the session asks for, and routes the frames meant for other cores.
    fn route(&mut self, now: Instant) {
        while let Some(event) = self.session.as_mut().and_then(Session::poll_event) {
            match event {
                // Events are drained after every call into the session, so its target is
                // still the one this Connect was made for.
                Event::Connect => {
                    if let Some(s) = &self.session {
                        self.io.push_back(IoAction::Connect(s.target()));
                    }
                }
                Event::Disconnect(why) => {
                    debug!("closing the server connection: {why}");
                    self.io.push_back(IoAction::Disconnect { polite: true });
                }
                Event::Lost => self.lost(now),
                Event::Welcome(welcome) => {
                    if let Some(logs) = &mut self.logs {
                        logs.handle_reconnect(welcome.log_acked_seq, now);
                    }
                    // The first config is in force (files written) before the child starts.
                    if let Some(config) = welcome.config {
                        self.on_config(config, now);
                    }
                    self.sup.start();
                    self.sup_actions(now);
                }
                Event::Heartbeat => self.send_status(now),
                Event::Frame(kind) => self.on_frame(kind, now),
            }
        }
    }

    fn on_frame(&mut self, kind: Kind, now: Instant) {
        match kind {
            Kind::Config(config) => self.on_config(config, now),
            Kind::ExecStart(start) => self.exec_start(start, now),
            Kind::ExecInput(input) => {
                if let Some(slot) = self.exec_slot(input.session) {
                    let e = self.exec[slot].as_mut().expect("slot found");
                    if e.handle_input(&input.data).is_err() {
                        warn!(
                            "exec session {}: the server sent input beyond its window; killing it",
                            input.session
                        );
                        self.kill_exec(slot, libc::SIGKILL);
                    }
                }
            }
            Kind::ExecStdinClose(close) => {
                if let Some(slot) = self.exec_slot(close.session) {
                    self.exec[slot]
                        .as_mut()
                        .expect("slot found")
                        .handle_stdin_close();
                    self.exec_stdin_check(slot);
                }
            }
            Kind::ExecResize(r) => {
                if let Some(slot) = self
                    .exec_slot(r.session)
                    .filter(|&s| self.exec[s].as_ref().is_some_and(exec::Session::is_pty))
                {
                    // The kernel sends SIGWINCH to the terminal's foreground group.
                    self.io.push_back(IoAction::ResizeExec {
                        slot,
                        rows: r.rows,
                        cols: r.cols,
                    });
                }
            }
            Kind::ExecSignal(sig) => {
                if let Some(slot) = self.exec_slot(sig.session) {
                    self.kill_exec(slot, sig.signal);
                }
            }
            Kind::ChildControl(c) => {
                if c.restart {
                    self.restart_child("restart requested by the server", now);
                } else if (1..=64).contains(&c.signal) && c.signal != libc::SIGCHLD {
                    info!(
                        "the server asked to send {} to the app",
                        crate::sys::signals::name(c.signal)
                    );
                    // As if the entrypoint had received it: a terminating signal is followed
                    // by SIGKILL after the stop timeout.
                    self.sup.handle_signal(c.signal, now);
                } else {
                    warn!("ignoring a request to send an invalid signal {}", c.signal);
                }
                self.sup_actions(now);
            }
            Kind::StreamOpen(open) => self.tunnel_open(open, now),
            Kind::StreamData(data) => {
                if let Some(slot) = self.tunnel_slot(data.stream) {
                    if self.tunnels[slot]
                        .as_mut()
                        .expect("slot found")
                        .handle_data(&data.data)
                        .is_err()
                    {
                        self.tunnel_abort(slot, "the server sent data beyond its window", now);
                    }
                }
            }
            Kind::StreamClose(close) => {
                if let Some(slot) = self.tunnel_slot(close.stream) {
                    if close.half {
                        self.tunnels[slot]
                            .as_mut()
                            .expect("slot found")
                            .handle_close();
                        self.tunnel_check(slot, now);
                    } else {
                        self.tunnel_remove(slot, now);
                    }
                }
            }
            Kind::WindowUpdate(WindowUpdate {
                target: Some(window_update::Target::Stream(id)),
                credits,
            }) => {
                if let Some(slot) = self.tunnel_slot(id) {
                    self.tunnels[slot]
                        .as_mut()
                        .expect("slot found")
                        .handle_window(credits);
                }
            }
            Kind::WindowUpdate(WindowUpdate {
                target: Some(window_update::Target::ExecSession(id)),
                credits,
            }) => {
                if let Some(slot) = self.exec_slot(id) {
                    self.exec[slot]
                        .as_mut()
                        .expect("slot found")
                        .handle_window(credits);
                }
            }
            Kind::LogAck(ack) => {
                if let Some(logs) = &mut self.logs {
                    logs.handle_ack(ack.up_to_seq);
                }
            }
            kind => debug!("ignoring a {} frame (feature not available)", kind.name()),
        }
    }

    /// The connection is gone: exec sessions hang up, streams end.
    fn lost(&mut self, now: Instant) {
        self.io.push_back(IoAction::Disconnect { polite: false });
        for slot in 0..MAX_SESSIONS {
            let Some(e) = &mut self.exec[slot] else {
                continue;
            };
            if e.has_exited() {
                self.exec_remove(slot);
            } else if e.hang_up(now) {
                debug!("connection lost: hanging up exec session {}", e.id());
                self.kill_exec(slot, libc::SIGHUP);
            }
        }
        for slot in 0..self.tunnels.len() {
            if self.tunnels[slot].take().is_some() {
                self.io.push_back(IoAction::CloseTunnel(slot));
            }
        }
        self.tunnels.clear();
        self.restart_when_drained(now);
    }

    // ----- the child -----

    /// Turns the supervisor's decisions into actions.
    fn sup_actions(&mut self, now: Instant) {
        while let Some(action) = self.sup.poll_action() {
            match action {
                Action::Spawn => self.io.push_back(IoAction::SpawnChild),
                Action::Signal(target, sig) => {
                    let pid = match (target, self.sup.child_pid(), self.child_pgid) {
                        (Target::Child, Some(pid), _) => pid,
                        (Target::Group, _, Some(pgid)) => -pgid,
                        _ => continue,
                    };
                    self.io.push_back(IoAction::Kill {
                        pid,
                        sig,
                        report: true,
                    });
                }
                Action::SignalDescendants(sig) => self.io.push_back(IoAction::SignalDescendants {
                    pgid: self.child_pgid,
                    sig,
                }),
                Action::LastWords => {
                    let st = self.status();
                    if let Some(s) = &mut self.session {
                        s.handle_last_words(st, now);
                    }
                    self.route(now);
                }
                Action::Exit(code) => self.io.push_back(IoAction::Exit(code)),
            }
        }
    }

    fn reaped(
        &mut self,
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
        oom_kills: Option<u64>,
        now: Instant,
    ) {
        if Some(pid) == self.sup.child_pid() {
            match signal {
                Some(sig) => info!(
                    "child (pid {pid}) killed by {}",
                    crate::sys::signals::name(sig)
                ),
                None => debug!("child (pid {pid}) exited with code {}", code.unwrap_or(0)),
            }
            self.sup.handle_exit(pid, code, signal, oom_kills, now);
            if let ChildState::Exited(Some(e)) = self.sup.child_state() {
                if e.oom_killed {
                    warn!(
                        "the child was killed by the kernel's OOM killer (its cgroup ran out of memory)"
                    );
                }
            }
            if !self.sup.finishing() {
                // (A final status goes out with the last words, confirmed.)
                self.send_status(now);
            }
        } else if let Some(slot) = self.exec.iter().position(|e| {
            e.as_ref()
                .is_some_and(|e| e.pid() == pid && !e.has_exited())
        }) {
            let e = self.exec[slot].as_mut().expect("slot found");
            debug!("exec session {} (pid {pid}) ended", e.id());
            e.handle_exit(code, signal, now);
            if e.is_hung_up() {
                // Nobody to report to: the connection it belonged to is gone.
                self.exec_remove(slot);
            }
        } else {
            debug!("reaped pid {pid}");
        }
    }

    /// The supervisor's view of what still keeps us from exiting.
    fn leftovers(&self) -> Leftovers {
        // Bytes the log shipper has not taken yet (block mode: the server is behind) are last
        // words for the server, and so is a pipe we stopped reading for them: both get the flush
        // timeout, not the local cleanup's grace.
        let server = self.session.as_ref().is_some_and(|s| {
            s.last_words_pending()
                || self.logs.as_ref().is_some_and(Logs::unacked)
                || self.local.unlogged
        });
        Leftovers {
            descendants: self.local.descendants,
            output: self.local.output,
            server,
        }
    }

    /// Our Hello for a new connection: the fixed part plus what we know right now.
    fn hello_now(&self) -> Hello {
        Hello {
            status: Some(self.status()),
            config_version: self.cfg.version(),
            next_log_seq: self.logs.as_ref().map_or(0, Logs::next_seq),
            ..self.hello.clone()
        }
    }

    /// The child's state for the server. The reactor adds the memory and CPU figures (read from
    /// /proc) when it encodes the frame.
    fn status(&self) -> Status {
        let mut st = Status {
            starts: self.sup.starts(),
            config_version: self.cfg.version(),
            ..Default::default()
        };
        match self.sup.child_state() {
            ChildState::Starting => st.state = status::State::Starting as i32,
            ChildState::Running(pid) | ChildState::Restarting(pid) => {
                // Draining for a restart counts as restarting: the server then stops keeping
                // idle connections to the old child.
                let running = matches!(self.sup.child_state(), ChildState::Running(_))
                    && self.restart_pending.is_none();
                st.state = if running {
                    status::State::Running
                } else {
                    status::State::Restarting
                } as i32;
                st.child_pid = pid as u32;
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
    fn send_status(&mut self, now: Instant) {
        if self.is_ready() {
            let st = self.status();
            self.send(Kind::Status(st), now);
        }
    }

    // ----- config -----

    fn on_config(&mut self, config: waypost_proto::Config, now: Instant) {
        if self.sup.finishing() {
            // A reconnect for the last words: the app is gone, nothing to configure.
            return;
        }
        if self.config_disabled {
            debug!(
                "ignoring config version {} (WAYPOST_DISABLE_CONFIG)",
                config.version
            );
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
                Step::Apply {
                    version,
                    write,
                    remove,
                } => self.io.push_back(IoAction::WriteConfig {
                    version,
                    write,
                    remove,
                }),
                Step::Restart => self.restart_child("config changed", now),
                Step::Signal(sig) => {
                    info!(
                        "config files changed: sending {} to the app",
                        crate::sys::signals::name(sig)
                    );
                    self.sup.signal_child(sig);
                }
                Step::LogLevel(level) => {
                    crate::logger::set_level(level);
                    info!("log level set to {} by the server's config", level.as_str());
                }
            }
        }
        self.sup_actions(now);
    }

    /// Restarts the child (a config change, or the server's `ChildControl`): zero-downtime with
    /// the URL service — new visitors wait, the old child goes once its streams are done (or at
    /// the stop timeout) — else at once. `why` starts the log line.
    fn restart_child(&mut self, why: &str, now: Instant) {
        let grace = self.cfg.stop_grace();
        if self.url_hold && self.session.is_some() && !self.url_disabled {
            info!("{why}: restarting the app once its open URL streams finish");
            self.restart_pending = Some((grace, now + grace.unwrap_or(self.stop_timeout)));
            self.send_status(now);
            self.restart_when_drained(now);
        } else {
            info!("{why}: restarting the app");
            self.sup.restart(grace, now);
            self.send_status(now);
        }
    }

    /// A pending config restart goes ahead once no stream is connected to the old child, or at
    /// its deadline.
    fn restart_when_drained(&mut self, now: Instant) {
        let Some((grace, deadline)) = self.restart_pending else {
            return;
        };
        // A connect still in progress counts: the old child's kernel may already have queued it,
        // and stopping the child then resets it.
        let busy = self.tunnels.iter().flatten().any(tunnel::Stream::is_busy);
        if busy && now < deadline {
            return;
        }
        self.restart_pending = None;
        info!("restarting the app");
        self.sup.restart(grace, now);
        self.send_status(now);
        // Until the new child listens, refused connects are retried.
        let until = now + grace.unwrap_or(self.stop_timeout) + self.stop_timeout;
        self.hold_until = Some(until);
        for t in self.tunnels.iter_mut().flatten() {
            t.extend_hold(until);
        }
        self.sup_actions(now);
    }

    // ----- exec -----

    fn exec_slot(&self, id: u64) -> Option<usize> {
        self.exec
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.id() == id))
    }

    /// The server asks to run a command: check it, reserve a slot, have the reactor start it.
    fn exec_start(&mut self, start: ExecStart, now: Instant) {
        let active = self.exec.iter().flatten().count();
        let refuse = |code: i32, error: String| {
            Kind::ExecExit(ExecExit {
                session: start.session,
                code,
                signal: 0,
                error,
            })
        };
        if let Err(why) = exec::admit(
            &start,
            self.exec_disabled,
            self.exec_allow.as_deref(),
            active,
        ) {
            info!("exec refused: {why}");
            self.send(refuse(126, why), now);
            return;
        }
        if self.exec_slot(start.session).is_some() {
            self.send(refuse(126, "duplicate session id".into()), now);
            return;
        }
        let slot = self
            .exec
            .iter()
            .position(Option::is_none)
            .expect("admit checked the cap");
        // The app's environment (config applied, tokens removed), plus the session's own.
        let mut env = self.child_env();
        let mut extra: Vec<(OsString, OsString)> = start
            .env
            .iter()
            .filter(|(k, _)| !SECRET_VARS.contains(&k.as_str()))
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        if let Some(pty) = &start.pty {
            if !pty.term.is_empty() {
                extra.push(("TERM".into(), pty.term.clone().into()));
            }
        }
        env.retain(|(k, _)| !extra.iter().any(|(x, _)| x == k));
        env.extend(extra);
        let argv = start.argv.iter().map(OsString::from).collect();
        let pty = start.pty.as_ref().map(|p| (p.rows, p.cols));
        self.exec[slot] = Some(exec::Session::new(start.session, 0, pty.is_some()));
        self.io.push_back(IoAction::StartExec {
            slot,
            id: start.session,
            argv,
            env,
            pty,
            stdin: start.stdin,
        });
    }

    /// Signals a session's process group (it leads its own, by setsid).
    fn kill_exec(&mut self, slot: usize, sig: i32) {
        if let Some(e) = &self.exec[slot] {
            if e.pid() > 0 {
                self.io.push_back(IoAction::Kill {
                    pid: -e.pid(),
                    sig,
                    report: false,
                });
            }
        }
    }

    fn exec_stdin_check(&mut self, slot: usize) {
        if self.exec[slot]
            .as_mut()
            .is_some_and(exec::Session::take_stdin_close)
        {
            self.io.push_back(IoAction::CloseExecStdin(slot));
        }
    }

    fn exec_remove(&mut self, slot: usize) {
        if self.exec[slot].take().is_some() {
            self.io.push_back(IoAction::CloseExec(slot));
        }
    }

    /// The next exec frame: output from a session that has credits (round robin), or the exit
    /// report of one whose process is gone and whose output is all out. Sessions reported (or
    /// hung up and exited) are removed here.
    fn next_exec_frame(&mut self, now: Instant, pull: &mut impl Pull) -> Option<Kind> {
        for k in 0..MAX_SESSIONS {
            let slot = (self.exec_next + k) % MAX_SESSIONS;
            let Some(e) = &mut self.exec[slot] else {
                continue;
            };
            for which in 0..3 {
                let budget = e.readable_budget();
                if !e.reads_from(which) || budget == 0 {
                    continue;
                }
                let buf = scratch(&mut self.scratch, exec::CHUNK);
                match pull.read(Source::Exec(slot, which), &mut buf[..budget]) {
                    Read::Data(n) => {
                        e.sent(n);
                        self.exec_next = (slot + 1) % MAX_SESSIONS;
                        let stream = if which == 2 {
                            OutputStream::Err
                        } else {
                            OutputStream::Out
                        } as i32;
                        return Some(Kind::ExecOutput(ExecOutput {
                            session: e.id(),
                            stream,
                            data: buf[..n].to_vec(),
                        }));
                    }
                    Read::Eof => {
                        e.output_eof(which);
                        if which > 0 {
                            self.io.push_back(IoAction::CloseExecOutput { slot, which });
                        }
                    }
                    Read::Blocked | Read::Failed(_) => {}
                }
            }
            if let Some(report) = e.exit_report(e.outputs_open(), now) {
                let hung_up = e.is_hung_up();
                self.exec_remove(slot);
                if !hung_up {
                    return Some(Kind::ExecExit(report));
                }
            }
        }
        None
    }

    // ----- URL-service streams -----

    fn tunnel_slot(&self, id: u64) -> Option<usize> {
        self.tunnels
            .iter()
            .position(|t| t.as_ref().is_some_and(|t| t.id() == id))
    }

    /// A visitor connected through the ingress: connect to the app (or hold, during a restart).
    fn tunnel_open(&mut self, open: StreamOpen, now: Instant) {
        let active = self.tunnels.iter().flatten().count();
        // The port is checked before a slot is taken: a refused one never gets near a socket.
        let admitted = tunnel::admit(self.url_disabled, active).and_then(|()| {
            tunnel::target_port(open.target_port, self.app_port, &self.url_ports)
                .inspect_err(|why| self.log_port_refusal(&open, why, now))
        });
        let port = match admitted {
            Ok(port) => port,
            Err(why) => {
                self.send(
                    Kind::StreamClose(StreamClose {
                        stream: open.stream,
                        half: false,
                        error: why,
                    }),
                    now,
                );
                return;
            }
        };
        let slot = match self.tunnels.iter().position(Option::is_none) {
            Some(slot) => slot,
            None => {
                self.tunnels.push(None);
                self.tunnels.len() - 1
            }
        };
        debug_assert!(slot < MAX_STREAMS);
        let hold = self.hold_until.filter(|&t| t > now);
        trace!(
            "stream {} from {} to port {port}",
            open.stream, open.client_addr
        );
        let mut t = tunnel::Stream::new(open.stream, port, hold);
        // While the old child drains or is being stopped, a connect could still land in its
        // listen queue and be reset when it dies: wait for the new child instead.
        let old_child =
            self.url_hold && matches!(self.sup.child_state(), ChildState::Restarting(_));
        if self.restart_pending.is_some() || old_child {
            t.hold(now, now + self.stop_timeout * 2);
        } else {
            t.connecting(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)));
            self.io.push_back(IoAction::ConnectTunnel {
                slot,
                id: open.stream,
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            });
        }
        self.tunnels[slot] = Some(t);
    }

    /// Logs a stream refused by `WAYPOST_URL_PORTS`: a security-relevant event (the server asked
    /// for a port it may not reach), so at WARN, at most once per [`REFUSAL_WARN_EVERY`].
    fn log_port_refusal(&mut self, open: &StreamOpen, why: &str, now: Instant) {
        let (last, quiet) = &mut self.refusals;
        if last.is_some_and(|t| now < t + REFUSAL_WARN_EVERY) {
            *quiet += 1;
            debug!(
                "stream {} from {} refused: {why}",
                open.stream, open.client_addr
            );
            return;
        }
        let (id, from) = (open.stream, &open.client_addr);
        if *quiet == 0 {
            warn!("stream {id} from {from} refused: {why}");
        } else {
            warn!("stream {id} from {from} refused: {why} ({quiet} more since the last warning)");
        }
        *last = Some(now);
        *quiet = 0;
    }

    fn tunnel_refused(&mut self, slot: usize, error: &io::Error, now: Instant) {
        let Some(Some(t)) = self.tunnels.get_mut(slot) else {
            return;
        };
        t.handle_no_socket();
        if let Some(addr) = t.take_fallback() {
            t.connecting(None);
            self.io.push_back(IoAction::ConnectTunnel {
                slot,
                id: t.id(),
                addr,
            });
        } else if !t.refused(now) {
            let why = format!("cannot connect to the app on port {}: {error}", t.port());
            self.tunnel_abort(slot, &why, now);
        }
        self.restart_when_drained(now);
    }

    /// After a change: shut the app socket's write side once the server's end is written; drop
    /// the stream once both directions are over.
    fn tunnel_check(&mut self, slot: usize, now: Instant) {
        let Some(Some(t)) = self.tunnels.get_mut(slot) else {
            return;
        };
        if t.should_shut_down() {
            t.mark_shut_down();
            self.io.push_back(IoAction::ShutdownTunnel(slot));
        }
        if t.finished() {
            self.tunnel_remove(slot, now);
        }
    }

    /// Ends a stream with an error both ways.
    fn tunnel_abort(&mut self, slot: usize, why: &str, now: Instant) {
        if let Some(Some(t)) = self.tunnels.get(slot) {
            debug!("stream {}: {why}", t.id());
            let id = t.id();
            self.send(
                Kind::StreamClose(StreamClose {
                    stream: id,
                    half: false,
                    error: why.to_owned(),
                }),
                now,
            );
        }
        self.tunnel_remove(slot, now);
    }

    fn tunnel_remove(&mut self, slot: usize, now: Instant) {
        if let Some(Some(_)) = self.tunnels.get_mut(slot).map(Option::take) {
            self.io.push_back(IoAction::CloseTunnel(slot));
        }
        while self.tunnels.last().is_some_and(Option::is_none) {
            self.tunnels.pop();
        }
        self.restart_when_drained(now);
    }

    /// The next stream frame: data read from an app socket that has credits (round robin), or
    /// the half-close after the app's EOF.
    fn next_tunnel_frame(&mut self, now: Instant, pull: &mut impl Pull) -> Option<Kind> {
        let len = self.tunnels.len();
        for k in 0..len {
            let slot = (self.tunnel_next + k) % len;
            let Some(t) = &mut self.tunnels[slot] else {
                continue;
            };
            let budget = t.budget();
            if budget == 0 {
                continue;
            }
            let buf = scratch(&mut self.scratch, tunnel::CHUNK);
            match pull.read(Source::Tunnel(slot), &mut buf[..budget]) {
                Read::Eof => {
                    t.handle_app_eof();
                    self.tunnel_next = (slot + 1) % len;
                    let frame = Kind::StreamClose(StreamClose {
                        stream: t.id(),
                        half: true,
                        error: String::new(),
                    });
                    if t.finished() {
                        self.tunnel_remove(slot, now);
                    }
                    return Some(frame);
                }
                Read::Data(n) => {
                    t.sent(n);
                    self.tunnel_next = (slot + 1) % len;
                    return Some(Kind::StreamData(StreamData {
                        stream: t.id(),
                        data: buf[..n].to_vec(),
                    }));
                }
                Read::Blocked => {}
                Read::Failed(e) => {
                    let id = t.id();
                    self.tunnel_remove(slot, now);
                    return Some(Kind::StreamClose(StreamClose {
                        stream: id,
                        half: false,
                        error: format!("the app reset the connection: {e}"),
                    }));
                }
            }
        }
        None
    }
}

/// `buf` at least `len` bytes long (grown once, zeroed only then).
fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
