//! Child policy, sans-IO: what to do with the main child when signals arrive, when it exits, and
//! when timers fire. The reactor feeds events in (`handle_*`, each with `now`) and carries out the
//! [`Action`]s it takes out with [`Supervisor::poll_action`]; [`Supervisor::poll_timeout`] says
//! when to call [`Supervisor::handle_timeout`] next.
//!
//! Lifecycle: `Waiting` (not started) → `Running` → `Cleanup` (the child is gone; its descendants
//! get SIGTERM, then SIGKILL after [`CLEANUP_GRACE`]; outputs are drained; the server is handed
//! the last log lines and the final status, and gets the flush timeout to take them) → `Done`
//! (exit code decided, [`Action::Exit`] emitted once).
//!
//! Also here, as pure functions: whether the child was killed by the kernel's OOM killer, from
//! its cgroup's `oom_kill` counter read when it started and when it ended (the reactor reads the
//! files; [`oom_counter_paths`] and [`parse_oom_kills`] say which and how).

use heapless::Deque;
use std::time::{Duration, Instant};

/// After the child exits, how long its leftover descendants get between SIGTERM and SIGKILL.
pub const CLEANUP_GRACE: Duration = Duration::from_secs(2);
/// After that SIGKILL, how long we still wait for the last pipes to close before exiting anyway
/// (a descendant stuck in uninterruptible sleep must not keep a container alive forever).
pub const FINAL_GRACE: Duration = Duration::from_secs(1);

/// Whom a signal goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The main child's pid.
    Child,
    /// The main child's process group.
    Group,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start the child now.
    Spawn,
    /// Send a signal.
    Signal(Target, i32),
    /// Send a signal to every descendant still alive: the child's process group and every
    /// orphan we adopted.
    SignalDescendants(i32),
    /// The child is gone: hand its final status to the server and reconnect at once if the
    /// connection is down (the last log lines and the status wait for it).
    LastWords,
    /// Everything is finished: exit with this code.
    Exit(i32),
}

/// What the reactor observes each round while cleaning up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leftovers {
    /// Some descendant is still alive (we still have children, or the child's group is not empty).
    pub descendants: bool,
    /// A captured stdout/stderr pipe is still open or has bytes not yet written out.
    pub output: bool,
    /// The server has not yet confirmed our last words (final status, log lines), connected or
    /// not at the moment.
    pub server: bool,
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The exit code we will exit with (the child's, or 128+N).
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The kernel's OOM killer did it.
    pub oom_killed: bool,
}

/// The child's state as the server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// Not started yet (waiting for the server's config).
    Starting,
    Running(i32),
    /// Being stopped to start again with new config.
    Restarting(i32),
    /// Gone; `None` if it never ran (stopped or failed before it started).
    Exited(Option<Ended>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started; start at `start_at` even without the server's config (None: wait forever).
    Waiting {
        start_at: Option<Instant>,
    },
    Running {
        pid: i32,
        /// Set when a terminating signal was forwarded: SIGKILL at this time.
        kill_at: Option<Instant>,
    },
    /// Stopping the child to start it again (new config).
    Restarting {
        pid: i32,
        /// SIGKILL at this time if it has not exited.
        kill_at: Option<Instant>,
        /// A terminating signal arrived meanwhile: do not start it again, exit.
        then_exit: bool,
    },
    Cleanup {
        code: i32,
        /// SIGKILL the leftovers at this time (None once sent).
        kill_at: Option<Instant>,
        /// Exit even if pipes are still open at this time (set once SIGKILL was sent).
        give_up_at: Option<Instant>,
        /// Exit even if the server has not taken everything at this time (set once the local
        /// cleanup is done).
        flush_until: Option<Instant>,
    },
    Done,
}

/// Action queue capacity: one event yields at most three actions, and the reactor drains the
/// queue after every event.
const ACTIONS: usize = 8;

pub struct Supervisor {
    state: State,
    stop_timeout: Duration,
    /// `WAYPOST_FLUSH_TIMEOUT`: how long the server gets for our last words.
    flush_timeout: Duration,
    /// The cgroup's OOM-kill count when the child started (None: unknown).
    oom_at_start: Option<u64>,
    signal_group: bool,
    actions: Deque<Action, ACTIONS>,
    /// How the child ended, once it has.
    ended: Option<Ended>,
    /// Times the child was started.
    starts: u32,
}

/// Signals after which a child that has not exited is killed at the stop timeout (what
/// `docker stop`, systemd and Ctrl-C send). HUP is not among them: many apps reload on it.
pub fn is_terminating(sig: i32) -> bool {
    matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT)
}

/// The exit code for a child that exited with `code` or was killed by `signal` (128 + N).
pub fn exit_code(code: Option<i32>, signal: Option<i32>) -> i32 {
    match (code, signal) {
        (Some(c), _) => c & 0xff,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    }
}

impl Supervisor {
    pub fn new(stop_timeout: Duration, signal_group: bool, flush_timeout: Duration) -> Supervisor {
        Supervisor {
            state: State::Waiting { start_at: None },
            stop_timeout,
            flush_timeout,
            oom_at_start: None,
            signal_group,
            actions: Deque::new(),
            ended: None,
            starts: 0,
        }
    }

    fn push(&mut self, a: Action) {
        // INVARIANT: the reactor drains after every handle_* call and no call pushes more than
        // three actions, so the queue never fills.
        let _ = self.actions.push_back(a);
    }

    /// The main child's pid while it runs.
    pub fn child_pid(&self) -> Option<i32> {
        match self.state {
            State::Running { pid, .. } | State::Restarting { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// Stops the child (SIGTERM, then SIGKILL after `grace` or the stop timeout) and starts it
    /// again. Ignored unless it is running normally.
    pub fn restart(&mut self, grace: Option<Duration>, now: Instant) {
        if let State::Running { pid, kill_at: None } = self.state {
            let grace = grace.unwrap_or(self.stop_timeout);
            self.state = State::Restarting {
                pid,
                kill_at: Some(now + grace),
                then_exit: false,
            };
            self.push(Action::Signal(self.target(), libc::SIGTERM));
        }
    }

    /// Sends `sig` to the running child (the config policy's reload signal).
    pub fn signal_child(&mut self, sig: i32) {
        if let State::Running { .. } = self.state {
            self.push(Action::Signal(self.target(), sig));
        }
    }

    fn target(&self) -> Target {
        if self.signal_group {
            Target::Group
        } else {
            Target::Child
        }
    }

    /// Whether the child has not been started yet.
    pub fn waiting(&self) -> bool {
        matches!(self.state, State::Waiting { .. })
    }

    /// The child's state, for Status frames.
    pub fn child_state(&self) -> ChildState {
        match self.state {
            State::Waiting { .. } => ChildState::Starting,
            State::Running { pid, .. } => ChildState::Running(pid),
            State::Restarting { pid, .. } => ChildState::Restarting(pid),
            State::Cleanup { .. } | State::Done => ChildState::Exited(self.ended),
        }
    }

    /// How many times the child was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Whether the child has exited and we are on our way out.
    pub fn finishing(&self) -> bool {
        matches!(self.state, State::Cleanup { .. } | State::Done)
    }

    /// The child may start now (no server, or config arrived, or the startup timeout passed).
    pub fn start(&mut self) {
        if self.waiting() {
            self.push(Action::Spawn);
        }
    }

    /// Do not start before the server's config arrives ([`Supervisor::start`]), but at
    /// `start_at` at the latest (fail open); `None`: wait as long as it takes.
    pub fn wait_for_config(&mut self, start_at: Option<Instant>) {
        if self.waiting() {
            self.state = State::Waiting { start_at };
        }
    }

    /// The child was started with `pid`; `oom_kills`: its cgroup's OOM-kill count now.
    pub fn handle_spawned(&mut self, pid: i32, oom_kills: Option<u64>) {
        self.oom_at_start = oom_kills;
        self.state = State::Running { pid, kill_at: None };
        self.starts += 1;
    }

    /// Starting the child failed after the entrypoint was already up (exit 126/127).
    pub fn handle_spawn_failed(&mut self, code: i32, now: Instant) {
        // The server is told how it ended (127 not found, 126 not executable), not "exit 0".
        self.ended = Some(Ended {
            code,
            signal: None,
            oom_killed: false,
        });
        self.enter_cleanup(code, now);
    }

    /// A signal arrived at the entrypoint (never SIGCHLD: the reactor reaps on that).
    pub fn handle_signal(&mut self, sig: i32, now: Instant) {
        match &mut self.state {
            State::Waiting { .. } => {
                // Stopped before the child ever ran: leave as if killed by it, like the child
                // would, and tell the server so (its last Status is not "exit 0").
                if is_terminating(sig) {
                    self.ended = Some(Ended {
                        code: 128 + sig,
                        signal: Some(sig),
                        oom_killed: false,
                    });
                    self.enter_cleanup(128 + sig, now);
                }
            }
            State::Running { kill_at, .. } => {
                if is_terminating(sig) && kill_at.is_none() {
                    *kill_at = Some(now + self.stop_timeout);
                }
                self.push(Action::Signal(self.target(), sig));
            }
            State::Restarting { then_exit, .. } => {
                if is_terminating(sig) {
                    *then_exit = true;
                }
                self.push(Action::Signal(self.target(), sig));
            }
            // Leftovers are being terminated already; the child is gone.
            State::Cleanup { .. } | State::Done => {}
        }
    }

    /// Some process `pid` was reaped, having exited with `code` or been killed by `signal`;
    /// `oom_kills`: the cgroup's OOM-kill count now. Only the main child matters here.
    pub fn handle_exit(
        &mut self,
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
        oom_kills: Option<u64>,
        now: Instant,
    ) {
        match self.state {
            State::Running { pid: child, .. }
            | State::Restarting {
                pid: child,
                then_exit: true,
                ..
            } if child == pid => {
                let oom_killed = oom_killed(self.oom_at_start, oom_kills, signal);
                let ended = Ended {
                    code: exit_code(code, signal),
                    signal,
                    oom_killed,
                };
                self.ended = Some(ended);
                self.enter_cleanup(ended.code, now);
            }
            State::Restarting {
                pid: child,
                then_exit: false,
                ..
            } if child == pid => {
                // Whatever the old child left in its group goes too, then the new one starts.
                self.push(Action::Signal(Target::Group, libc::SIGTERM));
                self.state = State::Waiting { start_at: None };
                self.push(Action::Spawn);
            }
            _ => {}
        }
    }

    fn enter_cleanup(&mut self, code: i32, now: Instant) {
        self.state = State::Cleanup {
            code,
            kill_at: Some(now + CLEANUP_GRACE),
            give_up_at: None,
            flush_until: None,
        };
        self.push(Action::SignalDescendants(libc::SIGTERM));
        // Reconnecting starts now, while the leftovers are cleaned up, not after.
        self.push(Action::LastWords);
    }

    /// During cleanup, what is still around. When nothing is, the exit is decided.
    pub fn handle_leftovers(&mut self, left: Leftovers, now: Instant) {
        if let State::Cleanup { flush_until, .. } = self.state {
            if left.descendants || left.output {
                return;
            }
            if !left.server {
                if let State::Cleanup { code, .. } = self.state {
                    self.finish(code);
                }
            } else if flush_until.is_none() {
                self.start_flush(now);
            }
        }
    }

    /// Local cleanup is over and the server still lacks our last words: it gets the flush
    /// timeout from now (none at all: exit now).
    fn start_flush(&mut self, now: Instant) {
        if let State::Cleanup {
            code,
            kill_at,
            give_up_at,
            ..
        } = self.state
        {
            if self.flush_timeout.is_zero() {
                self.finish(code);
            } else {
                self.state = State::Cleanup {
                    code,
                    kill_at,
                    give_up_at,
                    flush_until: Some(now + self.flush_timeout),
                };
            }
        }
    }

    fn finish(&mut self, code: i32) {
        self.state = State::Done;
        self.push(Action::Exit(code));
    }

    /// The earliest time [`Supervisor::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Waiting { start_at } => start_at,
            State::Running { kill_at, .. } | State::Restarting { kill_at, .. } => kill_at,
            State::Cleanup {
                kill_at,
                give_up_at,
                flush_until,
                ..
            } => [kill_at, give_up_at, flush_until]
                .into_iter()
                .flatten()
                .min(),
            State::Done => None,
        }
    }

    /// Acts on every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, left: Leftovers) {
        // Several timers can be due at once (e.g. the cleanup grace and the flush grace).
        loop {
            let before = self.state;
            self.timeout_step(now, left);
            if self.state == before {
                return;
            }
        }
    }

    fn timeout_step(&mut self, now: Instant, left: Leftovers) {
        match self.state {
            State::Waiting { start_at: Some(at) } if now >= at => {
                crate::warn!(
                    "no config from the server yet; starting without it (WAYPOST_STARTUP_TIMEOUT)"
                );
                self.state = State::Waiting { start_at: None };
                self.push(Action::Spawn);
            }
            State::Running {
                pid,
                kill_at: Some(at),
            } if now >= at => {
                self.state = State::Running { pid, kill_at: None };
                // The child ignored the stop signal: kill it and everything in its group.
                self.push(Action::Signal(Target::Group, libc::SIGKILL));
                self.push(Action::Signal(Target::Child, libc::SIGKILL));
            }
            State::Restarting {
                pid,
                kill_at: Some(at),
                then_exit,
            } if now >= at => {
                self.state = State::Restarting {
                    pid,
                    kill_at: None,
                    then_exit,
                };
                self.push(Action::Signal(Target::Group, libc::SIGKILL));
                self.push(Action::Signal(Target::Child, libc::SIGKILL));
            }
            State::Cleanup {
                code,
                kill_at: Some(at),
                flush_until,
                ..
            } if now >= at => {
                self.state = State::Cleanup {
                    code,
                    kill_at: None,
                    give_up_at: Some(now + FINAL_GRACE),
                    flush_until,
                };
                if left.descendants {
                    self.push(Action::SignalDescendants(libc::SIGKILL));
                } else {
                    self.handle_leftovers(left, now);
                }
            }
            State::Cleanup {
                code,
                kill_at,
                give_up_at: Some(at),
                flush_until,
            } if now >= at => {
                // Local leftovers are given up on (a pipe held open by something we cannot
                // kill); the server still gets its flush window, once.
                self.state = State::Cleanup {
                    code,
                    kill_at,
                    give_up_at: None,
                    flush_until,
                };
                if flush_until.is_none() {
                    if left.server {
                        self.start_flush(now);
                    } else {
                        self.finish(code);
                    }
                }
            }
            State::Cleanup {
                code,
                flush_until: Some(at),
                ..
            } if now >= at => {
                crate::warn!("the server did not take our last log lines and status in time");
                self.finish(code);
            }
            _ => {}
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

/// Whether the kernel's OOM killer ended the child: it died of SIGKILL and its cgroup's
/// `oom_kill` count rose while it lived. (Another process of the same cgroup killed for memory
/// while the child was SIGKILLed by someone else would also match: rare, and the cgroup was out
/// of memory either way.) Unknown counts mean no.
pub fn oom_killed(at_start: Option<u64>, at_exit: Option<u64>, signal: Option<i32>) -> bool {
    signal == Some(libc::SIGKILL) && matches!((at_start, at_exit), (Some(a), Some(b)) if b > a)
}

/// The files that count OOM kills in our cgroup, most likely first, from the text of
/// `/proc/self/cgroup`: cgroup v2 (`0::/path`) keeps `oom_kill` in `memory.events` (under
/// `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host); cgroup v1 (`N:memory:/path`,
/// the controller possibly among others: `N:cpu,memory:/path`) in `memory.oom_control` under
/// `/sys/fs/cgroup/memory`. Inside a container with a cgroup namespace the path is `/`.
pub fn oom_counter_paths(proc_self_cgroup: &str) -> Vec<String> {
    let mut v2 = Vec::new();
    let mut v1 = Vec::new();
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        let path = path.trim_end_matches('/');
        if id == "0" && controllers.is_empty() {
            v2.push(format!("/sys/fs/cgroup{path}/memory.events"));
            v2.push(format!("/sys/fs/cgroup/unified{path}/memory.events"));
        } else if controllers.split(',').any(|c| c == "memory") {
            v1.push(format!("/sys/fs/cgroup/memory{path}/memory.oom_control"));
        }
    }
    v2.extend(v1);
    v2
}

/// The `oom_kill` count of a `memory.events` (v2) or `memory.oom_control` (v1) file: lines of
/// `key value`.
pub fn parse_oom_kills(contents: &str) -> Option<u64> {
    contents.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == "oom_kill")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: i32 = libc::SIGTERM;
    const FLUSH: Duration = crate::settings::DEFAULT_FLUSH_TIMEOUT;
    const KILL: i32 = libc::SIGKILL;

    fn drain(s: &mut Supervisor) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn running(stop: u64, group: bool) -> (Supervisor, Instant) {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Duration::from_secs(stop), group, FLUSH);
        s.start();
        assert_eq!(drain(&mut s), [Action::Spawn]);
        s.handle_spawned(100, None);
        (s, t0)
    }

    const NONE: Leftovers = Leftovers {
        descendants: false,
        output: false,
        server: false,
    };

    #[test]
    fn exit_codes() {
        for c in 0..=255 {
            assert_eq!(exit_code(Some(c), None), c);
        }
        assert_eq!(exit_code(None, Some(15)), 143);
        assert_eq!(exit_code(None, Some(9)), 137);
    }

    #[test]
    fn signals_are_forwarded_to_child_or_group() {
        let (mut s, t0) = running(30, false);
        s.handle_signal(libc::SIGUSR1, t0);
        assert_eq!(
            drain(&mut s),
            [Action::Signal(Target::Child, libc::SIGUSR1)]
        );
        assert_eq!(s.poll_timeout(), None, "USR1 arms no stop timer");

        let (mut s, t0) = running(30, true);
        s.handle_signal(libc::SIGHUP, t0);
        assert_eq!(drain(&mut s), [Action::Signal(Target::Group, libc::SIGHUP)]);
    }

    #[test]
    fn ignored_term_is_followed_by_kill_at_the_stop_timeout() {
        let (mut s, t0) = running(30, false);
        s.handle_signal(TERM, t0);
        assert_eq!(drain(&mut s), [Action::Signal(Target::Child, TERM)]);
        let at = t0 + Duration::from_secs(30);
        assert_eq!(s.poll_timeout(), Some(at));
        // A second TERM does not push the deadline back.
        s.handle_signal(TERM, t0 + Duration::from_secs(10));
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(at));
        // Early timeout: nothing.
        s.handle_timeout(at - Duration::from_millis(1), NONE);
        assert_eq!(drain(&mut s), []);
        s.handle_timeout(at, NONE);
        assert_eq!(
            drain(&mut s),
            [
                Action::Signal(Target::Group, KILL),
                Action::Signal(Target::Child, KILL)
            ]
        );
        assert_eq!(s.poll_timeout(), None);
        // The child dies of it: 137.
        s.handle_exit(100, None, Some(9), None, at);
        assert_eq!(
            drain(&mut s),
            [Action::SignalDescendants(TERM), Action::LastWords]
        );
        s.handle_leftovers(NONE, t0);
        assert_eq!(drain(&mut s), [Action::Exit(137)]);
    }

    #[test]
    fn child_exit_cleans_up_descendants_then_exits() {
        let (mut s, t0) = running(30, false);
        s.handle_exit(999, Some(0), None, None, t0); // not the child (an adopted orphan): nothing happens
        assert_eq!(drain(&mut s), []);
        s.handle_exit(100, Some(3), None, None, t0);
        assert_eq!(
            drain(&mut s),
            [Action::SignalDescendants(TERM), Action::LastWords]
        );
        assert!(s.finishing());
        // Descendants still alive: wait.
        s.handle_leftovers(
            Leftovers {
                descendants: true,
                output: true,
                server: false,
            },
            t0,
        );
        assert_eq!(drain(&mut s), []);
        let kill_at = t0 + CLEANUP_GRACE;
        assert_eq!(s.poll_timeout(), Some(kill_at));
        s.handle_timeout(
            kill_at,
            Leftovers {
                descendants: true,
                output: true,
                server: false,
            },
        );
        assert_eq!(drain(&mut s), [Action::SignalDescendants(KILL)]);
        assert_eq!(s.poll_timeout(), Some(kill_at + FINAL_GRACE));
        // They die, the pipes close: exit with the child's code.
        s.handle_leftovers(NONE, t0);
        assert_eq!(drain(&mut s), [Action::Exit(3)]);
        // Exit is decided once.
        s.handle_leftovers(NONE, t0);
        s.handle_timeout(kill_at + FINAL_GRACE, NONE);
        assert_eq!(drain(&mut s), []);
    }

    #[test]
    fn stuck_pipe_does_not_keep_us_forever() {
        let (mut s, t0) = running(30, false);
        s.handle_exit(100, Some(0), None, None, t0);
        drain(&mut s);
        let stuck = Leftovers {
            descendants: false,
            output: true,
            server: false,
        };
        s.handle_leftovers(stuck, t0);
        s.handle_timeout(t0 + CLEANUP_GRACE, stuck);
        assert_eq!(drain(&mut s), [], "no one left to kill");
        s.handle_timeout(t0 + CLEANUP_GRACE + FINAL_GRACE, stuck);
        assert_eq!(drain(&mut s), [Action::Exit(0)]);
    }

    #[test]
    fn term_before_start_exits_143_without_spawning() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Duration::from_secs(30), false, FLUSH);
        s.handle_signal(libc::SIGUSR1, t0);
        assert_eq!(drain(&mut s), []);
        s.handle_signal(TERM, t0);
        assert_eq!(
            drain(&mut s),
            [Action::SignalDescendants(TERM), Action::LastWords]
        );
        s.start();
        assert_eq!(drain(&mut s), [], "never spawned after a stop");
        // The server's last Status says how it ended, as if the child had been killed.
        let ended = Ended {
            code: 143,
            signal: Some(TERM),
            oom_killed: false,
        };
        assert_eq!(s.child_state(), ChildState::Exited(Some(ended)));
        s.handle_leftovers(NONE, t0);
        assert_eq!(drain(&mut s), [Action::Exit(143)]);
    }

    #[test]
    fn signals_after_exit_are_not_forwarded() {
        let (mut s, t0) = running(30, false);
        s.handle_exit(100, Some(0), None, None, t0);
        drain(&mut s);
        s.handle_signal(TERM, t0);
        assert_eq!(drain(&mut s), []);
    }

    #[test]
    fn waits_for_config_then_fails_open_at_the_deadline() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Duration::from_secs(30), false, FLUSH);
        s.wait_for_config(Some(t0 + Duration::from_secs(5)));
        assert_eq!(s.child_state(), ChildState::Starting);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        s.handle_timeout(t0 + Duration::from_secs(4), NONE);
        assert_eq!(drain(&mut s), []);
        s.handle_timeout(t0 + Duration::from_secs(5), NONE);
        assert_eq!(drain(&mut s), [Action::Spawn]);
        // Config arriving later does not spawn a second child.
        s.handle_spawned(7, None);
        s.start();
        assert_eq!(drain(&mut s), []);
        assert_eq!(s.child_state(), ChildState::Running(7));
        assert_eq!(s.starts(), 1);
    }

    #[test]
    fn config_before_the_deadline_starts_at_once() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Duration::from_secs(30), false, FLUSH);
        s.wait_for_config(Some(t0 + Duration::from_secs(5)));
        s.start();
        assert_eq!(drain(&mut s), [Action::Spawn]);
    }

    #[test]
    fn server_required_waits_forever() {
        let mut s = Supervisor::new(Duration::from_secs(30), false, FLUSH);
        s.wait_for_config(None);
        assert_eq!(s.poll_timeout(), None);
        s.start();
        assert_eq!(drain(&mut s), [Action::Spawn]);
    }

    #[test]
    fn last_words_to_the_server_get_at_most_the_flush_grace() {
        let (mut s, t0) = running(30, false);
        s.handle_exit(100, None, Some(15), None, t0);
        drain(&mut s);
        assert_eq!(
            s.child_state(),
            ChildState::Exited(Some(Ended {
                code: 143,
                signal: Some(15),
                oom_killed: false
            }))
        );
        let pending = Leftovers {
            descendants: false,
            output: false,
            server: true,
        };
        let t1 = t0 + Duration::from_millis(10);
        s.handle_leftovers(pending, t1);
        assert_eq!(drain(&mut s), [], "waits for the server");
        assert_eq!(
            s.poll_timeout(),
            Some(t1 + FLUSH).min(Some(t0 + CLEANUP_GRACE))
        );
        // Flushed in time: exit at once.
        s.handle_leftovers(NONE, t1 + Duration::from_millis(500));
        assert_eq!(drain(&mut s), [Action::Exit(143)]);

        // Never flushed: exit at the grace.
        let (mut s, t0) = running(30, false);
        s.handle_exit(100, Some(1), None, None, t0);
        drain(&mut s);
        s.handle_leftovers(pending, t0);
        s.handle_timeout(t0 + FLUSH, pending);
        assert_eq!(drain(&mut s), [Action::Exit(1)]);
    }

    #[test]
    fn restart_stops_then_starts_again() {
        let (mut s, t0) = running(30, false);
        s.restart(Some(Duration::from_secs(5)), t0);
        assert_eq!(drain(&mut s), [Action::Signal(Target::Child, TERM)]);
        assert_eq!(s.child_state(), ChildState::Restarting(100));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        // A second restart request while restarting changes nothing.
        s.restart(None, t0);
        assert_eq!(drain(&mut s), []);
        s.handle_exit(100, None, Some(15), None, t0 + Duration::from_secs(1));
        assert_eq!(
            drain(&mut s),
            [Action::Signal(Target::Group, TERM), Action::Spawn]
        );
        assert!(!s.finishing(), "a restart is not an exit");
        s.handle_spawned(101, None);
        assert_eq!(s.child_state(), ChildState::Running(101));
        assert_eq!(s.starts(), 2);
    }

    #[test]
    fn restart_of_a_stubborn_child_kills_it_at_the_grace() {
        let (mut s, t0) = running(30, true);
        s.restart(None, t0);
        assert_eq!(drain(&mut s), [Action::Signal(Target::Group, TERM)]);
        s.handle_timeout(t0 + Duration::from_secs(30), NONE);
        assert_eq!(
            drain(&mut s),
            [
                Action::Signal(Target::Group, KILL),
                Action::Signal(Target::Child, KILL)
            ]
        );
        s.handle_exit(100, None, Some(9), None, t0 + Duration::from_secs(30));
        assert_eq!(
            drain(&mut s),
            [Action::Signal(Target::Group, TERM), Action::Spawn]
        );
    }

    #[test]
    fn term_during_a_restart_means_exit() {
        let (mut s, t0) = running(30, false);
        s.restart(None, t0);
        drain(&mut s);
        s.handle_signal(TERM, t0);
        assert_eq!(drain(&mut s), [Action::Signal(Target::Child, TERM)]);
        s.handle_exit(100, None, Some(15), None, t0);
        assert_eq!(
            drain(&mut s),
            [Action::SignalDescendants(TERM), Action::LastWords]
        );
        s.handle_leftovers(NONE, t0);
        assert_eq!(drain(&mut s), [Action::Exit(143)]);
    }

    #[test]
    fn reload_signal_goes_to_the_child() {
        let (mut s, _) = running(30, false);
        s.signal_child(libc::SIGHUP);
        assert_eq!(drain(&mut s), [Action::Signal(Target::Child, libc::SIGHUP)]);
    }

    #[test]
    fn the_flush_timeout_is_configurable_and_zero_means_no_wait() {
        let pending = Leftovers {
            descendants: false,
            output: false,
            server: true,
        };
        let t0 = Instant::now();
        let mut s = Supervisor::new(Duration::from_secs(30), false, Duration::from_secs(7));
        s.start();
        s.handle_spawned(100, None);
        drain(&mut s);
        s.handle_exit(100, Some(0), None, None, t0);
        assert_eq!(
            drain(&mut s),
            [Action::SignalDescendants(TERM), Action::LastWords]
        );
        s.handle_leftovers(pending, t0);
        s.handle_timeout(t0 + Duration::from_secs(6), pending);
        assert_eq!(drain(&mut s), [], "7 s, not the default 2 s");
        s.handle_timeout(t0 + Duration::from_secs(7), pending);
        assert_eq!(drain(&mut s), [Action::Exit(0)]);

        let mut s = Supervisor::new(Duration::from_secs(30), false, Duration::ZERO);
        s.start();
        s.handle_spawned(100, None);
        s.handle_exit(100, Some(4), None, None, t0);
        drain(&mut s);
        s.handle_leftovers(pending, t0);
        assert_eq!(drain(&mut s), [Action::Exit(4)], "no flush window at all");
    }

    #[test]
    fn a_stuck_pipe_does_not_cut_the_servers_flush_window_short() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Duration::from_secs(30), false, Duration::from_secs(10));
        s.start();
        s.handle_spawned(100, None);
        s.handle_exit(100, Some(0), None, None, t0);
        drain(&mut s);
        let stuck = Leftovers {
            descendants: false,
            output: true,
            server: true,
        };
        s.handle_leftovers(stuck, t0);
        s.handle_timeout(t0 + CLEANUP_GRACE, stuck);
        let gave_up = t0 + CLEANUP_GRACE + FINAL_GRACE;
        s.handle_timeout(gave_up, stuck);
        assert_eq!(drain(&mut s), [], "the server still gets its window");
        assert_eq!(s.poll_timeout(), Some(gave_up + Duration::from_secs(10)));
        s.handle_leftovers(
            Leftovers {
                descendants: false,
                output: true,
                server: false,
            },
            gave_up + Duration::from_secs(1),
        );
        assert_eq!(
            drain(&mut s),
            [],
            "(output still counts until the window ends)"
        );
        s.handle_timeout(gave_up + Duration::from_secs(10), stuck);
        assert_eq!(drain(&mut s), [Action::Exit(0)]);
    }

    #[test]
    fn last_words_are_asked_for_once_whichever_way_the_end_comes() {
        let t0 = Instant::now();
        // Stopped before it ever started.
        let mut s = Supervisor::new(Duration::from_secs(30), false, FLUSH);
        s.handle_signal(TERM, t0);
        assert_eq!(
            drain(&mut s),
            [Action::SignalDescendants(TERM), Action::LastWords]
        );
        // Could not be started.
        let mut s = Supervisor::new(Duration::from_secs(30), false, FLUSH);
        s.start();
        drain(&mut s);
        s.handle_spawn_failed(127, t0);
        assert_eq!(
            drain(&mut s),
            [Action::SignalDescendants(TERM), Action::LastWords]
        );
        let ended = Ended {
            code: 127,
            signal: None,
            oom_killed: false,
        };
        assert_eq!(
            s.child_state(),
            ChildState::Exited(Some(ended)),
            "not exit 0"
        );
        s.handle_leftovers(NONE, t0);
        s.handle_timeout(t0 + CLEANUP_GRACE, NONE);
        assert_eq!(drain(&mut s), [Action::Exit(127)]);
    }

    #[test]
    fn oom_kill_is_a_sigkill_with_a_rising_cgroup_count() {
        assert!(oom_killed(Some(0), Some(1), Some(KILL)));
        assert!(oom_killed(Some(7), Some(9), Some(KILL)));
        assert!(!oom_killed(Some(1), Some(1), Some(KILL)), "a plain kill -9");
        assert!(
            !oom_killed(Some(0), Some(1), Some(TERM)),
            "killed for memory means SIGKILL"
        );
        assert!(!oom_killed(Some(0), Some(1), None));
        assert!(
            !oom_killed(None, Some(1), Some(KILL)),
            "unknown counts mean no"
        );
        assert!(!oom_killed(Some(0), None, Some(KILL)));

        let (mut s, t0) = running(30, false);
        s.handle_spawned(100, Some(4));
        s.handle_exit(100, None, Some(KILL), Some(5), t0);
        assert_eq!(
            s.child_state(),
            ChildState::Exited(Some(Ended {
                code: 137,
                signal: Some(KILL),
                oom_killed: true
            }))
        );
        let (mut s, t0) = running(30, false);
        s.handle_spawned(100, Some(4));
        s.handle_exit(100, None, Some(KILL), Some(4), t0);
        assert_eq!(
            s.child_state(),
            ChildState::Exited(Some(Ended {
                code: 137,
                signal: Some(KILL),
                oom_killed: false
            }))
        );
        // The count is taken per start: a kill of an earlier child does not count for this one.
        let (mut s, t0) = running(30, false);
        s.handle_spawned(100, Some(2));
        s.restart(None, t0);
        s.handle_exit(100, None, Some(KILL), Some(3), t0);
        s.handle_spawned(101, Some(3));
        s.handle_exit(101, None, Some(KILL), Some(3), t0);
        assert_eq!(
            s.child_state(),
            ChildState::Exited(Some(Ended {
                code: 137,
                signal: Some(KILL),
                oom_killed: false
            }))
        );
    }

    #[test]
    fn oom_counter_files_for_every_cgroup_layout() {
        // Pure cgroup v2.
        assert_eq!(
            oom_counter_paths("0::/system.slice/app.service\n"),
            [
                "/sys/fs/cgroup/system.slice/app.service/memory.events",
                "/sys/fs/cgroup/unified/system.slice/app.service/memory.events"
            ]
        );
        // A container with its own cgroup namespace: the path is `/`.
        assert_eq!(
            oom_counter_paths("0::/\n")[0],
            "/sys/fs/cgroup/memory.events"
        );
        // Hybrid: v2 first (it may lack the memory controller), then the v1 memory hierarchy.
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/f654\n3:cpuset:/\n1:cpu:/\n0::/\n";
        assert_eq!(
            oom_counter_paths(hybrid),
            [
                "/sys/fs/cgroup/memory.events",
                "/sys/fs/cgroup/unified/memory.events",
                "/sys/fs/cgroup/memory/process_api/f654/memory.oom_control"
            ]
        );
        // v1 with the memory controller co-mounted, and at the root.
        assert_eq!(
            oom_counter_paths("5:cpu,memory:/docker/abc"),
            ["/sys/fs/cgroup/memory/docker/abc/memory.oom_control"]
        );
        assert_eq!(
            oom_counter_paths("5:memory:/"),
            ["/sys/fs/cgroup/memory/memory.oom_control"]
        );
        // Not memory, or not a line at all.
        assert!(
            oom_counter_paths("3:memoryx:/a\n2:cpu:/b\ngarbage\n7:memory:relative\n").is_empty()
        );
        assert!(oom_counter_paths("").is_empty());
    }

    #[test]
    fn oom_kill_counts_from_either_file_format() {
        let v2 = "low 0\nhigh 0\nmax 31\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 17\n";
        assert_eq!(parse_oom_kills(v1), Some(17));
        // Kernels before 4.13 have no oom_kill line in memory.oom_control.
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
        assert_eq!(
            parse_oom_kills("oom_group_kill 5\n"),
            None,
            "not the same counter"
        );
        assert_eq!(parse_oom_kills("oom_kill many\n"), None);
        assert_eq!(parse_oom_kills(""), None);
    }
}
