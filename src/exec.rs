//! Exec sessions, sans-IO: who may run what, the table of live sessions, their credit windows
//! in both directions, pending stdin, and when a session's exit may be reported.
//!
//! Each session owns its state; the agent (`crate::agent`) keeps them in a table whose slots the
//! reactor's fd table (a PTY master, or stdin/stdout/stderr pipes) shares.
//!
//! Flow control: each direction of each session starts with [`INITIAL_WINDOW`] credits. Output
//! is read from the process only while the server has granted credits (a session printing fast
//! can't grow our memory; its process blocks on a full pipe instead). Input is accepted up to the
//! window we granted; we grant more as the process consumes it.

use crate::flow::{Inbound, Outbound, Overrun};
use std::time::{Duration, Instant};
use waypost_proto::{ExecExit, ExecStart};

/// Concurrent sessions per instance.
pub const MAX_SESSIONS: usize = 16;
/// Output bytes per ExecOutput frame.
pub const CHUNK: usize = 16 * 1024;
/// After the connection is lost: SIGHUP at once, SIGKILL this much later.
pub const HANGUP_GRACE: Duration = Duration::from_secs(5);
/// After the process exits, how long its output may still trickle in (from a background process
/// holding the pipe) before the session is reported over anyway.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Whether `argv0` may be run, given `WAYPOST_EXEC_ALLOW`. A bare name matches a bare entry
/// (resolved on PATH later); a path matches the same path exactly — so allowing `sh` does not
/// allow `/tmp/x/sh`.
pub fn allowed(argv0: &str, allow: Option<&[String]>) -> bool {
    allow.is_none_or(|list| list.iter().any(|a| a == argv0))
}

/// Checks an ExecStart before anything is spawned; the error text goes back to the user.
pub fn admit(
    start: &ExecStart,
    disabled: bool,
    allow: Option<&[String]>,
    active: usize,
) -> Result<(), String> {
    if disabled {
        return Err("exec is disabled on this instance (WAYPOST_DISABLE_EXEC=1)".into());
    }
    let Some(argv0) = start.argv.first().filter(|a| !a.is_empty()) else {
        return Err("no command given".into());
    };
    if !allowed(argv0, allow) {
        return Err(format!(
            "{argv0:?} is not allowed here (WAYPOST_EXEC_ALLOW={})",
            allow.unwrap_or_default().join(",")
        ));
    }
    if active >= MAX_SESSIONS {
        return Err(format!(
            "too many exec sessions on this instance (at most {MAX_SESSIONS})"
        ));
    }
    Ok(())
}

/// The state of one session.
#[derive(Debug)]
pub struct Session {
    id: u64,
    /// 0 until the process is started.
    pid: i32,
    pty: bool,
    /// Output: the credits the server granted.
    output: Outbound,
    /// Input received and not yet written to the process.
    input: Inbound,
    /// Exit status, once reaped: (code, signal).
    exit: Option<(i32, i32)>,
    exited_at: Option<Instant>,
    /// The connection was lost at this time: SIGHUP sent, SIGKILL due after the grace.
    hung_up_at: Option<Instant>,
    /// SIGKILL was sent after the hang-up grace.
    killed: bool,
    /// PTY sessions: the EOF character was sent for the end of input.
    eof_sent: bool,
    /// PTY sessions: the master reported the terminal closed.
    output_closed: bool,
    /// Pipe sessions: stdout and stderr not at EOF yet.
    outputs: [bool; 2],
    /// Pipe sessions: stdin was closed after the end of input.
    stdin_closed: bool,
}

impl Session {
    pub fn new(id: u64, pid: i32, pty: bool) -> Session {
        Session {
            id,
            pid,
            pty,
            output: Outbound::default(),
            input: Inbound::default(),
            exit: None,
            exited_at: None,
            hung_up_at: None,
            killed: false,
            eof_sent: false,
            output_closed: false,
            outputs: [true; 2],
            stdin_closed: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The process's pid (0 while it is being started).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn is_pty(&self) -> bool {
        self.pty
    }

    /// The process was started as `pid`.
    pub fn started(&mut self, pid: i32) {
        self.pid = pid;
    }

    /// Whether output is read from fd `which` (0: the PTY master, 1 stdout, 2 stderr).
    pub fn reads_from(&self, which: usize) -> bool {
        match which {
            0 => self.pty && !self.output_closed,
            _ => !self.pty && self.outputs[which - 1],
        }
    }

    /// Fd `which` reached its end (a PTY master says EIO once the terminal side is closed
    /// everywhere).
    pub fn output_eof(&mut self, which: usize) {
        match which {
            0 => self.output_closed = true,
            _ => self.outputs[which - 1] = false,
        }
    }

    /// Whether output may still come.
    pub fn outputs_open(&self) -> bool {
        if self.pty {
            !self.output_closed
        } else {
            self.outputs.iter().any(|&o| o)
        }
    }

    /// What to write to the process now: pending input, or on a PTY the EOF character (^D) once
    /// the input is over — a terminal has no half-close, and a shell takes ^D on an empty line
    /// as the end.
    pub fn to_write(&self) -> &[u8] {
        let pending = self.input.pending();
        if pending.is_empty() && self.pty && self.stdin_done() {
            b"\x04"
        } else {
            pending
        }
    }

    /// `n` bytes of [`Session::to_write`] were written; returns credits to grant back, if due.
    pub fn wrote(&mut self, n: usize) -> Option<u32> {
        if self.input.pending().is_empty() {
            if self.pty && self.stdin_done() && n > 0 {
                self.mark_eof_sent();
            }
            return None;
        }
        self.wrote_input(n)
    }

    /// Writing failed: the process closed its stdin, and what it did not read is dropped.
    pub fn write_failed(&mut self) {
        let n = self.input.pending().len();
        self.wrote_input(n);
    }

    /// Whether a pipe stdin must be closed now (the input is over and written); true once.
    pub fn take_stdin_close(&mut self) -> bool {
        let due = !self.pty && !self.stdin_closed && self.stdin_done();
        self.stdin_closed |= due;
        due
    }

    /// PTY: the EOF character went out; it is not sent again.
    pub fn mark_eof_sent(&mut self) {
        self.eof_sent = true;
    }

    /// PTY: the terminal side is closed everywhere (EIO on the master).
    pub fn mark_output_closed(&mut self) {
        self.output_closed = true;
    }

    pub fn output_closed(&self) -> bool {
        self.output_closed
    }

    /// How many output bytes to read now (0: wait for credits).
    pub fn readable_budget(&self) -> usize {
        self.output.budget(CHUNK)
    }

    /// `n` output bytes were sent.
    pub fn sent(&mut self, n: usize) {
        self.output.sent(n);
    }

    /// The server granted more output credits.
    pub fn handle_window(&mut self, credits: u32) {
        self.output.grant(credits);
    }

    /// Input arrived. `Err` if the server sent more than its window (the session is then killed
    /// rather than letting memory grow).
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), Overrun> {
        self.input.push(data)
    }

    pub fn handle_stdin_close(&mut self) {
        self.input.close();
    }

    /// Input waiting to be written to the process.
    pub fn pending_input(&self) -> &[u8] {
        self.input.pending()
    }

    /// `n` input bytes were written to the process; returns credits to grant back, if due.
    pub fn wrote_input(&mut self, n: usize) -> Option<u32> {
        self.input.took(n)
    }

    /// Whether the process's stdin should be closed now (all input written, and EOF received,
    /// and for a PTY the EOF character not sent yet).
    pub fn stdin_done(&self) -> bool {
        self.input.finished() && !self.eof_sent
    }

    pub fn handle_exit(&mut self, code: Option<i32>, signal: Option<i32>, now: Instant) {
        self.exit = Some((code.unwrap_or(0), signal.unwrap_or(0)));
        self.exited_at = Some(now);
    }

    pub fn has_exited(&self) -> bool {
        self.exit.is_some()
    }

    /// The exit report, once the process is gone and its output is out (or `outputs_open` for too
    /// long after it exited).
    pub fn exit_report(&self, outputs_open: bool, now: Instant) -> Option<ExecExit> {
        let (code, signal) = self.exit?;
        let drained = !outputs_open || self.exited_at.is_some_and(|t| now >= t + DRAIN_GRACE);
        drained.then(|| ExecExit {
            session: self.id,
            code: if signal != 0 { 128 + signal } else { code },
            signal,
            error: String::new(),
        })
    }

    /// The connection is gone: returns true the first time (send SIGHUP now).
    pub fn hang_up(&mut self, now: Instant) -> bool {
        if self.hung_up_at.is_some() {
            return false;
        }
        self.hung_up_at = Some(now);
        true
    }

    pub fn is_hung_up(&self) -> bool {
        self.hung_up_at.is_some()
    }

    /// When this session next needs attention (SIGKILL after a hang-up, end of the drain
    /// grace); never a time already past, so a deadline that is waiting on something else (a
    /// blocked connection) cannot make the loop spin.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let at = match (self.exit, self.hung_up_at, self.exited_at) {
            (None, Some(t), _) if !self.killed => t + HANGUP_GRACE,
            (Some(_), _, Some(t)) => t + DRAIN_GRACE,
            _ => return None,
        };
        (at > now).then_some(at)
    }

    /// Whether the hang-up grace is over and the process must be killed (true once).
    pub fn kill_due(&mut self, now: Instant) -> bool {
        let due = !self.killed
            && self.exit.is_none()
            && self.hung_up_at.is_some_and(|t| now >= t + HANGUP_GRACE);
        self.killed |= due;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(argv: &[&str]) -> ExecStart {
        ExecStart {
            session: 1,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn admission() {
        assert!(admit(&start(&["sh"]), false, None, 0).is_ok());
        let e = admit(&start(&["sh"]), true, None, 0).unwrap_err();
        assert!(e.contains("disabled"), "{e}");
        let allow = vec!["sh".to_string(), "/bin/ls".to_string()];
        assert!(admit(&start(&["sh", "-c", "x"]), false, Some(&allow), 0).is_ok());
        assert!(admit(&start(&["/bin/ls"]), false, Some(&allow), 0).is_ok());
        let e = admit(&start(&["bash"]), false, Some(&allow), 0).unwrap_err();
        assert!(
            e.contains("\"bash\" is not allowed") && e.contains("WAYPOST_EXEC_ALLOW=sh,/bin/ls"),
            "{e}"
        );
        assert!(
            admit(&start(&["/tmp/evil/sh"]), false, Some(&allow), 0).is_err(),
            "a path is not a name"
        );
        assert!(
            admit(&start(&["ls"]), false, Some(&allow), 0).is_err(),
            "a name is not a path"
        );
        assert!(
            admit(&start(&[]), false, None, 0)
                .unwrap_err()
                .contains("no command")
        );
        let e = admit(&start(&["sh"]), false, None, MAX_SESSIONS).unwrap_err();
        assert!(e.contains("at most 16"), "{e}");
    }

    #[test]
    fn output_waits_for_credits_and_input_is_bounded() {
        let mut s = Session::new(1, 10, false);
        assert_eq!(s.readable_budget(), CHUNK);
        let mut sent = 0;
        while s.readable_budget() > 0 {
            let n = s.readable_budget();
            s.sent(n);
            sent += n;
        }
        assert_eq!(
            sent,
            waypost_proto::INITIAL_WINDOW as usize,
            "never beyond the window"
        );
        s.handle_window(1000);
        assert_eq!(s.readable_budget(), 1000);
        let big = vec![0u8; waypost_proto::INITIAL_WINDOW as usize];
        s.handle_input(&big).unwrap();
        assert!(s.handle_input(&[1]).is_err(), "beyond the granted window");
    }

    #[test]
    fn stdin_eof_after_the_last_byte() {
        let mut s = Session::new(1, 10, false);
        s.handle_input(b"abc").unwrap();
        s.handle_stdin_close();
        assert!(!s.stdin_done());
        assert!(s.handle_input(b"more").is_err(), "nothing after EOF");
        s.wrote_input(3);
        assert!(s.stdin_done());
    }

    #[test]
    fn exit_is_reported_after_the_output() {
        let t0 = Instant::now();
        let mut s = Session::new(9, 10, false);
        assert_eq!(s.exit_report(false, t0), None, "still running");
        s.handle_exit(Some(3), None, t0);
        assert_eq!(s.exit_report(true, t0), None, "output still open");
        let r = s.exit_report(false, t0).unwrap();
        assert_eq!((r.session, r.code, r.signal), (9, 3, 0));
        // A background process keeps the pipe open: reported at the drain grace anyway.
        assert!(s.exit_report(true, t0 + DRAIN_GRACE).is_some());
        let mut s = Session::new(9, 10, false);
        s.handle_exit(None, Some(9), t0);
        assert_eq!(s.exit_report(false, t0).unwrap().code, 137);
    }

    #[test]
    fn hang_up_then_kill() {
        let t0 = Instant::now();
        let mut s = Session::new(1, 10, true);
        assert!(s.hang_up(t0));
        assert!(!s.hang_up(t0), "once");
        assert_eq!(s.poll_timeout(t0), Some(t0 + HANGUP_GRACE));
        assert!(!s.kill_due(t0));
        assert!(s.kill_due(t0 + HANGUP_GRACE));
        assert!(!s.kill_due(t0 + HANGUP_GRACE), "once");
        assert_eq!(
            s.poll_timeout(t0 + HANGUP_GRACE),
            None,
            "nothing more to wait for until it exits"
        );
        let mut s = Session::new(1, 10, true);
        s.hang_up(t0);
        s.handle_exit(None, Some(1), t0 + Duration::from_secs(1));
        assert!(!s.kill_due(t0 + HANGUP_GRACE), "already gone");
        assert_eq!(
            s.poll_timeout(t0 + DRAIN_GRACE * 2),
            None,
            "past deadlines are not reported"
        );
    }
}
