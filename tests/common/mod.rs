//! Shared harness for the entrypoint's integration tests (init, server, logs, exec, ...).
//!
//! Every test drives the real binary with real child processes. The pieces:
//!
//! - [`entrypoint_bin`]: where the binary is (`WAYPOST_ENTRYPOINT_BIN`, else Cargo's build).
//! - [`TestDir`]: a private temporary directory per test, removed when the test passes and kept
//!   (with its path printed) when it fails. [`TestDir::script`] writes `sh` scripts that know the
//!   directory as `$D` and get a few helper functions (see [`SCRIPT_PRELUDE`]).
//! - [`entrypoint`] / [`entrypoint_sh`]: a `Command` for the entrypoint with a clean, explicit
//!   environment (only `PATH`, plus what the test adds), stdin `/dev/null`, cwd = the test dir.
//! - [`Running`]: a spawned process (usually the entrypoint) that is killed, with everything
//!   below it, when dropped — so a failing test never leaves processes behind. It can capture
//!   stdout/stderr in background threads, and every failure message it produces carries the
//!   process's stderr (the entrypoint's own log lines are there).
//! - Waiting: [`wait_until`], [`poll_until`], [`wait_for_file`] and the `Running` variants poll
//!   every [`POLL`] up to [`TIMEOUT`] and then panic with a clear message. Tests never assert an
//!   upper bound on speed: machines (and CI) are noisy; lower bounds that follow from the
//!   contract (e.g. "not killed before the stop timeout") are fine.
//! - `/proc` readers: [`proc_stat`] (State, PPid, pgrp — parsed after the last `)`, since the
//!   command name may contain spaces and parentheses), [`zombies_of`], [`descendants_of`],
//!   [`vm_rss_kib`], [`sig_ignored`].
//!
//! A note on test runners: nextest runs each test in its own process; `cargo test` runs them as
//! threads of one process. Nothing here changes process-wide state of the test process (no
//! signal handlers, no subreaper flag, no `waitpid(-1)`), so both work.

#![allow(dead_code)] // each test crate uses a different subset of the harness

use std::ffi::CStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long any wait (for a file, a condition, a process to exit) may take before the test fails.
/// Generous on purpose: this is a hang detector, not a speed requirement.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// How often waits re-check their condition.
pub const POLL: Duration = Duration::from_millis(20);
/// The `PATH` every spawned process gets unless the test overrides it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The prefix of the entrypoint's own log lines on stderr (DESIGN/CONTRACT: `[waypost] ...`).
pub const LOG_PREFIX: &str = "[waypost] ";
/// How much of a process's output failure messages show (the end of it).
const CONTEXT_BYTES: usize = 4096;

// ---------------------------------------------------------------------------------------------
// The binary

/// The entrypoint binary: `$WAYPOST_ENTRYPOINT_BIN` if set (`make test` points it at the static
/// musl build), else the one Cargo built for this test run.
pub fn entrypoint_bin() -> PathBuf {
    let path = match std::env::var_os("WAYPOST_ENTRYPOINT_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_waypost-entrypoint")),
    };
    assert!(
        path.is_file(),
        "entrypoint binary {} does not exist (WAYPOST_ENTRYPOINT_BIN={:?})",
        path.display(),
        std::env::var_os("WAYPOST_ENTRYPOINT_BIN")
    );
    path
}

/// A `Command` for the entrypoint with a clean environment (`env_clear` + [`DEFAULT_PATH`]; add
/// what the test needs with `.env()`), stdin `/dev/null`, and the test dir as working directory.
/// stdout/stderr are inherited unless the test (or [`Running::spawn_captured`]) sets them.
///
/// Remember: by default the entrypoint captures the child's stdout/stderr (pipes it owns), unless
/// `WAYPOST_DISABLE=1` or its stdout is a terminal; and it writes its own log lines, prefixed
/// with [`LOG_PREFIX`], to its stderr (level `DEBUG` unless `WAYPOST_LOG_LEVEL` says otherwise).
pub fn entrypoint(dir: &TestDir) -> Command {
    let mut cmd = Command::new(entrypoint_bin());
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .current_dir(dir.path())
        .stdin(Stdio::null());
    cmd
}

/// [`entrypoint`] running `sh -c SCRIPT` as its child.
pub fn entrypoint_sh(dir: &TestDir, script: &str) -> Command {
    let mut cmd = entrypoint(dir);
    cmd.args(["sh", "-c", script]);
    cmd
}

/// A `Command` for any other program, with the same clean environment as [`entrypoint`].
pub fn plain_command(dir: &TestDir, program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .current_dir(dir.path())
        .stdin(Stdio::null());
    cmd
}

// ---------------------------------------------------------------------------------------------
// Per-test directory and scripts

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Shell functions available in every script written by [`TestDir::script`]. `$D` is the test
/// directory (exported, so nested `sh -c '...'` can use it too; functions are not inherited).
///
/// - `put NAME VALUE`: write VALUE to `$D/NAME` atomically (tmp file + rename), so a test that
///   sees the file also sees its whole content.
/// - `wait_for NAME`: block until `$D/NAME` exists (the test creates it to say "go on").
/// - `stat_field PID N`: the Nth field of /proc/PID/stat after the command name (1 = state,
///   2 = ppid, 3 = pgrp); fails if the process is gone.
/// - `count_zombies`: the number of processes in state Z visible in /proc.
pub const SCRIPT_PRELUDE: &str = r#"
put() { printf '%s\n' "$2" > "$D/$1.tmp" && mv -f "$D/$1.tmp" "$D/$1"; }
wait_for() { while [ ! -e "$D/$1" ]; do sleep 0.02; done; }
stat_field() {
  read -r _line 2>/dev/null < "/proc/$1/stat" || return 1
  set -- "$2" ${_line##*\)}
  shift "$1"
  echo "$1"
}
count_zombies() {
  _n=0
  for _p in /proc/[0-9]*; do
    _s=$(stat_field "${_p#/proc/}" 1) && [ "$_s" = Z ] && _n=$((_n + 1))
  done
  echo "$_n"
}
"#;

/// A private temporary directory for one test, under `std::env::temp_dir()`, named after the
/// test plus pid and a counter. Removed on drop if the test passed; kept (and its path printed)
/// if it panicked, for inspection.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let n = DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("waypost-test-{name}-{}-{n}", std::process::id()));
        // A leftover from an earlier run whose pid was reused: start clean.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(rel)`.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// The absolute path of `rel`, single-quoted for use in a shell script.
    pub fn sh(&self, rel: &str) -> String {
        sh_quote(&self.join(rel).to_string_lossy())
    }

    /// Writes `contents` to `rel` (mode 0644) and returns its path.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(rel);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Writes a `sh` script: `D=<this dir>`, [`SCRIPT_PRELUDE`], then `body`. Mode 0755; run it
    /// as `sh PATH` (or directly). Returns its path as a `String`, ready for `Command::arg`.
    pub fn script(&self, rel: &str, body: &str) -> String {
        let text = format!(
            "#!/bin/sh\n# written by the waypost-entrypoint test harness\nD={}\nexport D\n{SCRIPT_PRELUDE}\n{body}\n",
            sh_quote(&self.path.to_string_lossy())
        );
        let path = self.write(rel, text);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path.to_string_lossy().into_owned()
    }

    /// Creates an empty file `rel` (a "go" signal for a script's `wait_for`).
    pub fn touch(&self, rel: &str) {
        self.write(rel, "");
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.join(rel).exists()
    }

    /// The content of `rel` with surrounding whitespace trimmed; `None` if it does not exist.
    pub fn read(&self, rel: &str) -> Option<String> {
        match fs::read(self.join(rel)) {
            Ok(b) => Some(String::from_utf8_lossy(&b).trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => panic!("reading {}: {e}", self.join(rel).display()),
        }
    }

    /// The content of `rel` parsed as a pid; panics with a clear message if absent or garbage.
    pub fn read_pid(&self, rel: &str) -> i32 {
        let text = self
            .read(rel)
            .unwrap_or_else(|| panic!("{} does not exist", self.join(rel).display()));
        text.parse().unwrap_or_else(|_| {
            panic!("{} does not hold a pid: {text:?}", self.join(rel).display())
        })
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "test failed: keeping its directory {} for inspection",
                self.path.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// `s` in single quotes, safe to paste into a shell script.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Polls `cond` every [`POLL`] until it holds (true) or `timeout` passes (false).
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Polls `cond` until it holds; panics after [`TIMEOUT`] saying what was awaited.
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(TIMEOUT, cond),
        "timed out after {TIMEOUT:?} waiting until {what}"
    );
}

/// Waits until `path` exists; panics after [`TIMEOUT`].
pub fn wait_for_file(path: &Path) {
    wait_until(&format!("{} exists", path.display()), || path.exists());
}

// ---------------------------------------------------------------------------------------------
// Output capture

/// Reads a stream to its end in a background thread, keeping everything read. Any read error
/// (e.g. `EIO` from a PTY master after hang-up) counts as the end.
pub struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    pub fn start(mut reader: impl Read + Send + 'static) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (buf, done) = (buf.clone(), done.clone());
            thread::spawn(move || {
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    match reader.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        Capture {
            buf,
            done,
            thread: Some(thread),
        }
    }

    /// A copy of what has been read so far.
    pub fn snapshot(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    /// Whether the stream has ended.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for the end of the stream; false if it is still open.
    pub fn wait_eof(&mut self, timeout: Duration) -> bool {
        if !poll_until(timeout, || self.is_done()) {
            return false;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        true
    }

    /// Everything read (call after [`Capture::wait_eof`]).
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut *self.buf.lock().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------
// Running processes

/// A spawned process — usually the entrypoint — that is killed together with all its
/// descendants when dropped (also on panic), so no test leaves processes behind.
pub struct Running {
    child: Child,
    label: String,
    stdout: Option<Capture>,
    stderr: Option<Capture>,
    status: Option<ExitStatus>,
    also_kill: Vec<i32>,
}

/// The result of a process that has exited and whose output has been collected.
pub struct Finished {
    pub label: String,
    pub pid: i32,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Running {
    /// Spawns `cmd` as it is (its stdio settings are kept; take piped streams with
    /// [`Running::child_mut`] or capture them with [`Running::capture_stdout`] /
    /// [`Running::capture_stderr`]). `cmd` is dropped right after the spawn, which closes any
    /// file descriptors it owned (e.g. a PTY slave passed as stdio).
    pub fn spawn(mut cmd: Command) -> Running {
        let label = command_label(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {label}: {e}"));
        drop(cmd);
        Running {
            child,
            label,
            stdout: None,
            stderr: None,
            status: None,
            also_kill: Vec::new(),
        }
    }

    /// Spawns `cmd` with stdout and stderr piped and read by background threads.
    pub fn spawn_captured(mut cmd: Command) -> Running {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut running = Running::spawn(cmd);
        running.capture_stdout();
        running.capture_stderr();
        running
    }

    /// Starts reading the (piped) stdout in the background.
    pub fn capture_stdout(&mut self) {
        let out = self
            .child
            .stdout
            .take()
            .expect("stdout is not piped or already taken");
        self.stdout = Some(Capture::start(out));
    }

    /// Starts reading the (piped) stderr in the background.
    pub fn capture_stderr(&mut self) {
        let err = self
            .child
            .stderr
            .take()
            .expect("stderr is not piped or already taken");
        self.stderr = Some(Capture::start(err));
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Also SIGKILL `pid` when this is dropped (e.g. a daemon the test learned about that may
    /// have escaped the process tree).
    pub fn kill_on_drop(&mut self, pid: i32) {
        self.also_kill.push(pid);
    }

    /// The exit status if the process has exited (it is reaped and the status remembered).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.label));
        }
        self.status
    }

    /// What has been captured from stdout so far (empty if not captured).
    pub fn stdout_so_far(&self) -> Vec<u8> {
        self.stdout
            .as_ref()
            .map(Capture::snapshot)
            .unwrap_or_default()
    }

    /// What has been captured from stderr so far (empty if not captured).
    pub fn stderr_so_far(&self) -> Vec<u8> {
        self.stderr
            .as_ref()
            .map(Capture::snapshot)
            .unwrap_or_default()
    }

    /// A description for failure messages: the command, its pid and state, and the end of its
    /// captured stderr and stdout.
    pub fn context(&mut self) -> String {
        let state = match self.try_status() {
            Some(s) => describe_status(s),
            None => "still running".to_owned(),
        };
        let mut s = format!("{} (pid {}, {state})", self.label, self.pid());
        if self.stderr.is_some() {
            let _ = write!(
                s,
                "\n--- its stderr (end) ---\n{}",
                tail_lossy(&self.stderr_so_far(), CONTEXT_BYTES)
            );
        }
        if self.stdout.is_some() {
            let _ = write!(
                s,
                "\n--- its stdout (end) ---\n{}",
                tail_lossy(&self.stdout_so_far(), CONTEXT_BYTES)
            );
        }
        s
    }

    /// Sends `sig` to the process. Panics if it has already exited (the signal would be lost
    /// and the test's premise is broken).
    pub fn signal(&mut self, sig: i32) {
        if self.try_status().is_some() {
            panic!(
                "cannot send SIG{} to it: it has already exited: {}",
                signal_name(sig),
                self.context()
            );
        }
        send_signal(self.pid(), sig)
            .unwrap_or_else(|e| panic!("kill({}, SIG{}): {e}", self.pid(), signal_name(sig)));
    }

    /// Polls `cond` until it holds. Panics after [`TIMEOUT`], or as soon as the process has
    /// exited without `cond` holding, with [`Running::context`].
    pub fn wait_until(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if cond() {
                return;
            }
            if self.try_status().is_some() {
                // It may have made `cond` true just before exiting; give stragglers a moment.
                if poll_until(Duration::from_millis(200), &mut cond) {
                    return;
                }
                panic!("it exited before {what}: {}", self.context());
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {TIMEOUT:?} waiting until {what}: {}",
                    self.context()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until `path` exists (see [`Running::wait_until`]).
    pub fn wait_for_file(&mut self, path: &Path) {
        self.wait_until(&format!("{} exists", path.display()), || path.exists());
    }

    /// Waits for the process to exit, up to [`TIMEOUT`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.wait_exit_within(TIMEOUT)
    }

    /// Waits for the process to exit, up to `timeout`; panics with context after that.
    pub fn wait_exit_within(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for it to exit: {}",
                    self.context()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits (up to [`TIMEOUT`]) for exit and for the end of the captured streams.
    pub fn finish(self) -> Finished {
        self.finish_within(TIMEOUT)
    }

    /// Waits (up to `timeout`) for exit, then up to `timeout` more for the end of the captured
    /// streams: they end only when every writer is gone, so a stream still open after the
    /// process exited means some descendant outlived it holding the stream.
    pub fn finish_within(mut self, timeout: Duration) -> Finished {
        let status = self.wait_exit_within(timeout);
        for name in ["stdout", "stderr"] {
            let cap = if name == "stdout" {
                &mut self.stdout
            } else {
                &mut self.stderr
            };
            if let Some(cap) = cap {
                if !cap.wait_eof(timeout) {
                    let ctx = self.context();
                    panic!(
                        "its {name} was still open {timeout:?} after it exited: some process it left \
                         behind still holds it: {ctx}"
                    );
                }
            }
        }
        let stdout = self.stdout.as_mut().map(Capture::take).unwrap_or_default();
        let stderr = self.stderr.as_mut().map(Capture::take).unwrap_or_default();
        Finished {
            label: self.label.clone(),
            pid: self.pid(),
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let pid = self.pid();
            // Kill the descendants first, so that a still-working entrypoint reaps them (else
            // they would linger as zombies of PID 1 for a while), then the process itself.
            for _ in 0..3 {
                let below = descendants_of(pid);
                if below.is_empty() {
                    break;
                }
                for p in below {
                    let _ = send_signal(p, libc::SIGKILL);
                }
            }
            poll_until(Duration::from_secs(2), || descendants_of(pid).is_empty());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for &p in &self.also_kill {
            let _ = send_signal(p, libc::SIGKILL);
        }
        if thread::panicking() {
            eprintln!(
                "--- process at the time of the failure ---\n{}",
                self.context()
            );
        }
    }
}

impl Finished {
    /// The exit code; panics with context if the process was killed by a signal instead.
    pub fn code(&self) -> i32 {
        match self.status.code() {
            Some(c) => c,
            None => panic!("expected an exit code, but {}", self.context()),
        }
    }

    /// Asserts the exit code, explaining `why` it is expected.
    pub fn assert_code(&self, expected: i32, why: &str) {
        assert_eq!(
            self.status.code(),
            Some(expected),
            "{why}: expected exit code {expected}; {}",
            self.context()
        );
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// stderr without the entrypoint's own log lines (those starting with [`LOG_PREFIX`]).
    pub fn stderr_without_logs(&self) -> String {
        self.stderr_str()
            .lines()
            .filter(|l| !l.starts_with(LOG_PREFIX))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    pub fn context(&self) -> String {
        format!(
            "{} (pid {}) {}\n--- its stderr (end) ---\n{}\n--- its stdout (end) ---\n{}",
            self.label,
            self.pid,
            describe_status(self.status),
            tail_lossy(&self.stderr, CONTEXT_BYTES),
            tail_lossy(&self.stdout, CONTEXT_BYTES)
        )
    }
}

/// "exited with code N" / "was killed by SIGX (N)".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!(
            "was killed by SIG{} ({s}){}",
            signal_name(s),
            if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            }
        ),
        _ => format!("ended with {status:?}"),
    }
}

fn command_label(cmd: &Command) -> String {
    let mut label = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        let arg = if arg.len() > 200 {
            format!(
                "{}...",
                &arg[..arg.char_indices().nth(200).map_or(arg.len(), |(i, _)| i)]
            )
        } else {
            arg.into_owned()
        };
        label.push(' ');
        if arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
            && !arg.is_empty()
        {
            label.push_str(&arg);
        } else {
            label.push_str(&sh_quote(&arg));
        }
    }
    label
}

/// The last `max` bytes of `bytes`, lossily decoded, with a marker if cut.
pub fn tail_lossy(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        String::from_utf8_lossy(bytes).into_owned()
    } else {
        format!(
            "[... {} bytes cut ...]{}",
            bytes.len() - max,
            String::from_utf8_lossy(&bytes[bytes.len() - max..])
        )
    }
}

/// Asserts two (possibly huge) byte strings are equal without printing them: reports lengths
/// and the first differing offset with a little context.
pub fn assert_bytes_eq(what: &str, actual: &[u8], expected: &[u8]) {
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    let around = |b: &[u8]| {
        let start = first.saturating_sub(16);
        let end = (first + 16).min(b.len());
        format!("{:02x?}", &b[start.min(end)..end])
    };
    panic!(
        "{what}: got {} bytes, expected {}; first difference at offset {first}\n  got      [{}..]: {}\n  expected [{}..]: {}",
        actual.len(),
        expected.len(),
        first.saturating_sub(16),
        around(actual),
        first.saturating_sub(16),
        around(expected)
    );
}

/// `n` random bytes from `/dev/urandom` (no crates needed).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf
}

// ---------------------------------------------------------------------------------------------
// Signals

/// `kill(pid, sig)`.
pub fn send_signal(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The short name of a signal ("TERM" for 15), as `kill -NAME` and `trap ... NAME` take it.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "HUP",
        libc::SIGINT => "INT",
        libc::SIGQUIT => "QUIT",
        libc::SIGILL => "ILL",
        libc::SIGTRAP => "TRAP",
        libc::SIGABRT => "ABRT",
        libc::SIGBUS => "BUS",
        libc::SIGFPE => "FPE",
        libc::SIGKILL => "KILL",
        libc::SIGUSR1 => "USR1",
        libc::SIGSEGV => "SEGV",
        libc::SIGUSR2 => "USR2",
        libc::SIGPIPE => "PIPE",
        libc::SIGALRM => "ALRM",
        libc::SIGTERM => "TERM",
        libc::SIGCHLD => "CHLD",
        libc::SIGCONT => "CONT",
        libc::SIGSTOP => "STOP",
        libc::SIGTSTP => "TSTP",
        libc::SIGTTIN => "TTIN",
        libc::SIGTTOU => "TTOU",
        libc::SIGURG => "URG",
        libc::SIGXCPU => "XCPU",
        libc::SIGXFSZ => "XFSZ",
        libc::SIGVTALRM => "VTALRM",
        libc::SIGPROF => "PROF",
        libc::SIGWINCH => "WINCH",
        libc::SIGIO => "IO",
        libc::SIGPWR => "PWR",
        libc::SIGSYS => "SYS",
        _ => "?",
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

/// The fields of /proc/PID/stat the tests care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    /// The command name (without the parentheses).
    pub comm: String,
    /// R, S, D, Z, T, ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
}

/// Reads /proc/PID/stat; `None` if the process does not exist (any more).
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces and ')': the fixed
    // fields start after the LAST ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let mut rest = text[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    let session = rest.next()?.parse().ok()?;
    Some(ProcStat {
        pid,
        comm,
        state,
        ppid,
        pgrp,
        session,
    })
}

/// Every pid currently in /proc.
pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The processes whose parent is `ppid` (zombies included).
pub fn children_of(ppid: i32) -> Vec<ProcStat> {
    all_pids()
        .into_iter()
        .filter_map(proc_stat)
        .filter(|s| s.ppid == ppid)
        .collect()
}

/// The pids of every process below `pid` in the process tree (zombies included).
pub fn descendants_of(pid: i32) -> Vec<i32> {
    let stats: Vec<ProcStat> = all_pids().into_iter().filter_map(proc_stat).collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for s in stats.iter().filter(|s| s.ppid == parent) {
            if !found.contains(&s.pid) {
                found.push(s.pid);
                frontier.push(s.pid);
            }
        }
    }
    found
}

/// The zombies (state Z) whose parent is `ppid`.
pub fn zombies_of(ppid: i32) -> Vec<i32> {
    children_of(ppid)
        .into_iter()
        .filter(|s| s.state == 'Z')
        .map(|s| s.pid)
        .collect()
}

/// How many zombies have `ppid` as their parent.
pub fn count_zombies_of(ppid: i32) -> usize {
    zombies_of(ppid).len()
}

/// Whether `pid` still exists in any form (running, stopped or zombie): `kill(pid, 0)` does not
/// fail with ESRCH.
pub fn pid_exists(pid: i32) -> bool {
    match send_signal(pid, 0) {
        Ok(()) => true,
        Err(e) => e.raw_os_error() != Some(libc::ESRCH),
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|s| s.state != 'Z')
}

/// A one-line description of a process for failure messages.
pub fn describe_pid(pid: i32) -> String {
    match proc_stat(pid) {
        None => format!("pid {pid}: gone"),
        Some(s) => format!(
            "pid {pid} ({}): state {}, ppid {}, pgrp {}, wchan {}",
            s.comm,
            s.state,
            s.ppid,
            s.pgrp,
            wchan(pid)
        ),
    }
}

/// What the process is blocked in (/proc/PID/wchan), e.g. `pipe_write`; "?" if unknown.
pub fn wchan(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/wchan"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

/// A `Key:` line of /proc/PID/status, trimmed (e.g. `status_field(pid, "VmRSS")` → "1234 kB").
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')
            .map(|v| v.trim().to_owned())
    })
}

/// The resident set size of `pid` in KiB.
pub fn vm_rss_kib(pid: i32) -> Option<u64> {
    status_field(pid, "VmRSS")?
        .strip_suffix(" kB")?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` ignores `sig` (SigIgn in /proc/PID/status).
pub fn sig_ignored(pid: i32, sig: i32) -> Option<bool> {
    let mask = u64::from_str_radix(&status_field(pid, "SigIgn")?, 16).ok()?;
    Some(mask & (1u64 << (sig - 1)) != 0)
}

/// Where `/proc/PID/fd/FD` points, e.g. `pipe:[1234]` or `/dev/pts/3`.
pub fn fd_target(pid: i32, fd: i32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/fd/{fd}: {e}"))
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// Terminals

/// A new pseudo-terminal: (master, slave, slave path such as `/dev/pts/3`). Both ends are
/// close-on-exec, so processes spawned concurrently by other tests (threads under `cargo test`)
/// do not inherit them and keep the slave open; pass the slave to a child as stdio explicitly.
pub fn open_pty() -> (OwnedFd, OwnedFd, String) {
    // SAFETY: plain libc calls on fds we own; the name buffer is NUL-terminated by ptsname_r
    // on success and outlives its use.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(m >= 0, "posix_openpt: {}", io::Error::last_os_error());
        let master = OwnedFd::from_raw_fd(m);
        assert_eq!(
            libc::grantpt(m),
            0,
            "grantpt: {}",
            io::Error::last_os_error()
        );
        assert_eq!(
            libc::unlockpt(m),
            0,
            "unlockpt: {}",
            io::Error::last_os_error()
        );
        let mut name = [0 as libc::c_char; 128];
        let rc = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        assert_eq!(rc, 0, "ptsname_r: {}", io::Error::from_raw_os_error(rc));
        let s = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(
            s >= 0,
            "opening the pty slave: {}",
            io::Error::last_os_error()
        );
        let slave = OwnedFd::from_raw_fd(s);
        (
            master,
            slave,
            CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
        )
    }
}
