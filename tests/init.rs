//! Integration tests of the entrypoint's init duties (the README's "The entrypoint as an init":
//! exit codes, signal forwarding, zombie reaping (as PID 1 and as a subreaper),
//! stop timeout, cleanup of descendants, byte-exact output with backpressure, terminals,
//! `WAYPOST_DISABLE`, the command line and configuration errors, and the child's environment.
//!
//! Every test runs the real binary (see `common::entrypoint_bin`) with real `sh` children in its
//! own temporary directory. Where one is possible, a negative control shows that the scenario
//! would fail without the feature under test (House rule 11).

mod common;

use common::*;
use std::fs;
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Exit codes and the child's signal state

#[test]
fn exit_codes_0_to_255_propagate() {
    let dir = TestDir::new("exit-codes");
    let mut wrong = Vec::new();
    for n in 0..=255 {
        let out = Running::spawn_captured(entrypoint_sh(&dir, &format!("exit {n}"))).finish();
        if out.status.code() != Some(n) {
            wrong.push(format!(
                "child `exit {n}`: entrypoint {}\n{}",
                describe_status(out.status),
                out.context()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 256 exit codes did not propagate:\n{}",
        wrong.len(),
        wrong.join("\n\n")
    );
}

#[test]
fn child_killed_by_signal_gives_128_plus_signal_number() {
    let dir = TestDir::new("killed-by-signal");
    let signals = [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGTERM,
        libc::SIGKILL,
        libc::SIGSEGV,
        libc::SIGPIPE,
        libc::SIGALRM,
    ];
    let mut wrong = Vec::new();
    for sig in signals {
        let name = signal_name(sig);
        let script = format!("kill -{name} $$; echo 'still alive after kill -{name}'; exit 99");
        // Premise: without the entrypoint, this child really dies of the signal (dash does not
        // ignore INT/QUIT here, since std's spawn gives it default dispositions).
        let direct = plain_command(&dir, "sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(
            direct.signal(),
            Some(sig),
            "premise: `sh -c 'kill -{name} $$'` run directly {}",
            describe_status(direct)
        );

        let out = Running::spawn_captured(entrypoint_sh(&dir, &script)).finish();
        if out.status.code() != Some(128 + sig) {
            wrong.push(format!(
                "SIG{name}: expected exit code {}, but {}",
                128 + sig,
                out.context()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "child killed by a signal → 128+N failed for:\n{}",
        wrong.join("\n\n")
    );
}

#[test]
fn child_starts_with_default_signal_dispositions_and_empty_mask() {
    // The entrypoint blocks the signals it reads from a signalfd and may ignore some itself
    // (Rust ignores SIGPIPE at startup); none of that may leak into the child, or e.g. a child
    // writing to a closed pipe would get EPIPE instead of dying of SIGPIPE. The baseline is the
    // same child run directly by the test. Only the standard signals 1..=31 are compared: glibc's
    // posix_spawn leaves its internal signals 32/33 ignored in spawned programs, depending on
    // the spawning process's state, which is not the entrypoint's business.
    let dir = TestDir::new("child-signal-state");
    let script = "grep -E '^(SigBlk|SigIgn):' /proc/self/status";
    let masks = |text: &str| -> (u64, u64) {
        let field = |key: &str| {
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {text:?}"));
            u64::from_str_radix(line.trim(), 16).unwrap() & ((1 << 31) - 1)
        };
        (field("SigBlk:"), field("SigIgn:"))
    };
    let names = |mask: u64| -> Vec<&str> {
        (1..=31)
            .filter(|s| mask & (1 << (s - 1)) != 0)
            .map(signal_name)
            .collect()
    };
    let direct = plain_command(&dir, "sh")
        .args(["-c", script])
        .output()
        .unwrap();
    let (direct_blk, direct_ign) = masks(&String::from_utf8_lossy(&direct.stdout));
    let out = Running::spawn_captured(entrypoint_sh(&dir, script)).finish();
    out.assert_code(0, "grep exits 0");
    let (blk, ign) = masks(&out.stdout_str());
    assert_eq!(
        names(blk),
        names(direct_blk),
        "signals blocked in the child (left: under the entrypoint, right: run directly): {}",
        out.context()
    );
    assert_eq!(
        names(ign),
        names(direct_ign),
        "signals ignored in the child (left: under the entrypoint, right: run directly): {}",
        out.context()
    );
}

// ---------------------------------------------------------------------------------------------
// Signal forwarding

/// The child traps `sig`, records its name in `got` and exits 0; the test sends `sig` to the
/// entrypoint once the child is ready and expects the record and exit code 0.
fn assert_signal_forwarded(sig: i32, extra_env: &[(&str, &str)]) {
    let name = signal_name(sig);
    let dir = TestDir::new(&format!("forward-{name}"));
    // sh runs traps only between commands: wait on a background sleep (`wait` is interrupted by
    // a trapped signal) so the trap runs at once. The trap also kills that sleep on the way out.
    let child = dir.script(
        "child.sh",
        &format!(
            "trap 'put got {name}; kill $! 2>/dev/null; exit 0' {name}\n\
             : > \"$D/ready\"\n\
             while :; do sleep 1 & wait $!; done"
        ),
    );
    let mut cmd = entrypoint(&dir);
    cmd.args(["sh", &child]).envs(extra_env.iter().copied());
    let mut ep = Running::spawn_captured(cmd);
    ep.wait_for_file(&dir.join("ready"));
    ep.signal(sig);
    ep.wait_until(
        &format!("the child received SIG{name} (forwarded by the entrypoint)"),
        || dir.exists("got"),
    );
    assert_eq!(
        dir.read("got").as_deref(),
        Some(name),
        "the child's trap recorded the wrong signal"
    );
    let out = ep.finish();
    out.assert_code(0, &format!("the child exits 0 from its SIG{name} trap"));
}

macro_rules! forwarding_tests {
    ($($test:ident: $sig:expr,)*) => {$(
        #[test]
        fn $test() {
            assert_signal_forwarded($sig, &[]);
        }
    )*};
}

forwarding_tests! {
    forwards_sigterm: libc::SIGTERM,
    forwards_sigint: libc::SIGINT,
    forwards_sighup: libc::SIGHUP,
    forwards_sigquit: libc::SIGQUIT,
    forwards_sigusr1: libc::SIGUSR1,
    forwards_sigusr2: libc::SIGUSR2,
    forwards_sigwinch: libc::SIGWINCH,
    forwards_sigcont: libc::SIGCONT,
    forwards_sigalrm: libc::SIGALRM,
}

/// The child starts a grandchild in its own process group; both trap USR1. The test sends USR1
/// to the entrypoint. Returns (dir, entrypoint, grandchild pid) with the child's receipt
/// already confirmed; the child exits 0 once the test creates `go`.
fn signal_group_scenario(group: bool) -> (TestDir, Running, i32) {
    let dir = TestDir::new(if group {
        "signal-group"
    } else {
        "signal-no-group"
    });
    let grandchild = dir.script(
        "grandchild.sh",
        "trap 'put gc_got USR1; kill $! 2>/dev/null; exit 0' USR1\n\
         put gc.pid $$\n\
         while :; do sleep 1 & wait $!; done",
    );
    // A non-interactive sh has no job control: the background grandchild stays in the child's
    // process group.
    let child = dir.script(
        "child.sh",
        &format!(
            "trap 'put child_got USR1' USR1\n\
             put child.pid $$\n\
             sh {} &\n\
             wait_for gc.pid\n\
             : > \"$D/ready\"\n\
             while [ ! -e \"$D/child_got\" ]; do sleep 1 & wait $!; done\n\
             wait_for go\n\
             exit 0",
            sh_quote(&grandchild)
        ),
    );
    let mut cmd = entrypoint(&dir);
    cmd.args(["sh", &child]);
    if group {
        cmd.env("WAYPOST_SIGNAL_GROUP", "1");
    }
    let mut ep = Running::spawn_captured(cmd);
    ep.wait_for_file(&dir.join("ready"));
    let (child_pid, gc_pid) = (dir.read_pid("child.pid"), dir.read_pid("gc.pid"));
    ep.kill_on_drop(gc_pid);
    let (c, g) = (proc_stat(child_pid), proc_stat(gc_pid));
    assert!(
        c.is_some() && g.is_some() && c.as_ref().map(|s| s.pgrp) == g.as_ref().map(|s| s.pgrp),
        "premise: the grandchild is in the child's process group: child {c:?}, grandchild {g:?}"
    );
    // SAFETY: getpgrp has no preconditions.
    let test_pgrp = unsafe { libc::getpgrp() };
    assert_ne!(
        c.map(|s| s.pgrp),
        Some(test_pgrp),
        "premise: the child is not in the test's process group"
    );
    ep.signal(libc::SIGUSR1);
    ep.wait_until("the child received SIGUSR1", || dir.exists("child_got"));
    (dir, ep, gc_pid)
}

#[test]
fn signal_group_forwards_to_whole_process_group() {
    let (dir, mut ep, _gc) = signal_group_scenario(true);
    ep.wait_until(
        "the grandchild received SIGUSR1 (WAYPOST_SIGNAL_GROUP=1 forwards to the child's process group)",
        || dir.exists("gc_got"),
    );
    dir.touch("go");
    ep.finish()
        .assert_code(0, "the child exits 0 after its USR1 trap");
}

#[test]
fn without_signal_group_only_the_child_gets_the_signal() {
    // Negative control for the test above.
    let (dir, mut ep, gc) = signal_group_scenario(false);
    // A group-wide kill() reaches every member in the same system call, and the grandchild's
    // trap runs as soon as its `wait` is interrupted; half a second is ample for a wrong
    // group delivery to show.
    thread::sleep(Duration::from_millis(500));
    assert!(
        !dir.exists("gc_got"),
        "without WAYPOST_SIGNAL_GROUP the grandchild must not receive SIGUSR1: {}",
        ep.context()
    );
    // Control: the grandchild was able to receive it, had it been sent.
    send_signal(gc, libc::SIGUSR1).expect("signalling the grandchild directly");
    ep.wait_until(
        "the grandchild's own USR1 trap ran when signalled directly",
        || dir.exists("gc_got"),
    );
    dir.touch("go");
    ep.finish()
        .assert_code(0, "the child exits 0 after its USR1 trap");
}

// ---------------------------------------------------------------------------------------------
// Zombies

/// Makes three double-forked orphans (`( sh orphan.sh NAME & )`: the subshell exits at once and
/// the orphan is re-parented to the nearest subreaper, or PID 1). Each orphan writes its pid to
/// `$D/NAME.pid`, then waits for `$D/release` and exits.
fn write_orphan_scripts(dir: &TestDir) -> String {
    let orphan = dir.script("orphan.sh", "put \"$1.pid\" $$\nwait_for release");
    format!(
        "for i in 1 2 3; do ( sh {} orphan$i & ); done",
        sh_quote(&orphan)
    )
}

const ORPHANS: [&str; 3] = ["orphan1.pid", "orphan2.pid", "orphan3.pid"];

/// `unshare` can make a PID namespace here, else a loud reason to skip.
fn pid_namespace_unavailable() -> Option<String> {
    let out = match Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "true"])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some("`unshare` is not installed".to_owned());
        }
        Err(e) => panic!("running unshare: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        None
    } else if stderr.contains("Operation not permitted") || stderr.contains("EPERM") {
        Some(format!("unshare is not permitted here: {stderr}"))
    } else {
        panic!(
            "`unshare --pid --fork --mount-proc true` failed unexpectedly ({}): {stderr}",
            describe_status(out.status)
        )
    }
}

/// The zombie scenario run inside a PID namespace: orphans re-parented to PID 1 exit; then it
/// polls up to ARG1 × 50 ms for the zombie count to drop to 0 and writes
/// `zombies=N ppid=P pid1=COMM` to `$D/result` (P = its own parent, COMM = PID 1's name).
fn write_namespace_scenario(dir: &TestDir) -> String {
    let make_orphans = write_orphan_scripts(dir);
    dir.script(
        "scenario.sh",
        &format!(
            "{make_orphans}\n\
             for f in orphan1 orphan2 orphan3; do wait_for $f.pid; done\n\
             # each orphan is re-parented to PID 1 once its subshell has exited\n\
             for f in orphan1 orphan2 orphan3; do\n\
               p=$(cat \"$D/$f.pid\")\n\
               while [ \"$(stat_field $p 2)\" != 1 ]; do sleep 0.02; done\n\
             done\n\
             : > \"$D/release\"\n\
             # wait until each orphan has exited (it is then gone or a zombie)\n\
             for f in orphan1 orphan2 orphan3; do\n\
               p=$(cat \"$D/$f.pid\")\n\
               while s=$(stat_field $p 1) && [ \"$s\" != Z ]; do sleep 0.02; done\n\
             done\n\
             n=0\n\
             while z=$(count_zombies) && [ \"$z\" != 0 ] && [ $n -lt $1 ]; do n=$((n + 1)); sleep 0.05; done\n\
             put result \"zombies=$z ppid=$PPID pid1=$(cat /proc/1/comm)\""
        ),
    )
}

fn parse_result(dir: &TestDir) -> (usize, String, String) {
    let text = dir.read("result").unwrap();
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {k}= in the scenario's result {text:?}"))
            .to_owned()
    };
    (
        field("zombies").parse().unwrap(),
        field("ppid"),
        field("pid1"),
    )
}

#[test]
fn reaps_zombies_as_pid_1_in_a_pid_namespace() {
    if let Some(why) = pid_namespace_unavailable() {
        eprintln!("\n!!!!! SKIPPED reaps_zombies_as_pid_1_in_a_pid_namespace: {why} !!!!!\n");
        return;
    }
    let dir = TestDir::new("zombies-pid1");
    let scenario = write_namespace_scenario(&dir);
    let mut cmd = plain_command(&dir, "unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(entrypoint_bin())
        .args(["sh", &scenario, "400"]);
    let mut ns = Running::spawn_captured(cmd);
    ns.wait_for_file(&dir.join("result"));
    let (zombies, ppid, pid1) = parse_result(&dir);
    let bin_name = entrypoint_bin()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let comm: String = bin_name.chars().take(15).collect(); // the kernel truncates comm to 15 bytes
    assert_eq!(
        (ppid.as_str(), pid1.as_str()),
        ("1", comm.as_str()),
        "premise: the entrypoint is PID 1 and the scenario's parent"
    );
    assert_eq!(
        zombies,
        0,
        "zombies left in the namespace with the entrypoint as PID 1: {}",
        ns.context()
    );
    ns.finish().assert_code(
        0,
        "the scenario exits 0, and so do the entrypoint and unshare",
    );
}

#[test]
fn zombies_pile_up_under_a_pid_1_that_does_not_reap() {
    // Negative control for the test above: the same scenario with `sleep` as PID 1.
    if let Some(why) = pid_namespace_unavailable() {
        eprintln!(
            "\n!!!!! SKIPPED zombies_pile_up_under_a_pid_1_that_does_not_reap: {why} !!!!!\n"
        );
        return;
    }
    let dir = TestDir::new("zombies-pid1-control");
    let scenario = write_namespace_scenario(&dir);
    let mut cmd = plain_command(&dir, "unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "sh",
        "-c",
    ])
    .arg(format!("sh {} 20 & exec sleep 1000", sh_quote(&scenario)));
    let mut ns = Running::spawn_captured(cmd);
    ns.wait_for_file(&dir.join("result"));
    let (zombies, ppid, pid1) = parse_result(&dir);
    assert_eq!(
        (ppid.as_str(), pid1.as_str()),
        ("1", "sleep"),
        "premise: `sleep` is PID 1 and the scenario's parent"
    );
    assert!(
        zombies > 0,
        "control: the orphans should stay zombies under a non-reaping PID 1, got {zombies}"
    );
    // Dropping `ns` kills unshare, whose --kill-child takes the namespace (and its zombies) down.
}

/// The child of the subreaper tests: makes the orphans, then becomes `sleep` (which never
/// calls wait, so it cannot reap anything itself).
fn write_subreaper_child(dir: &TestDir) -> String {
    let make_orphans = write_orphan_scripts(dir);
    dir.script("child.sh", &format!("{make_orphans}\nexec sleep 1000"))
}

fn orphan_pids(dir: &TestDir, waiter: &mut Running) -> Vec<i32> {
    ORPHANS
        .iter()
        .map(|f| {
            waiter.wait_for_file(&dir.join(f));
            let pid = dir.read_pid(f);
            waiter.kill_on_drop(pid);
            pid
        })
        .collect()
}

#[test]
fn reaps_adopted_orphans_as_subreaper() {
    let dir = TestDir::new("zombies-subreaper");
    let child = write_subreaper_child(&dir);
    let mut cmd = entrypoint(&dir);
    cmd.args(["sh", &child]);
    let mut ep = Running::spawn_captured(cmd);
    let ep_pid = ep.pid();
    let orphans = orphan_pids(&dir, &mut ep);
    for &p in &orphans {
        ep.wait_until(
            &format!("orphan {p} is re-parented to the entrypoint {ep_pid} (a child subreaper)"),
            || proc_stat(p).is_some_and(|s| s.ppid == ep_pid),
        );
    }
    dir.touch("release");
    for &p in &orphans {
        // Reaped = gone from /proc altogether; a zombie would stay, with the entrypoint as parent.
        let reaped = poll_until(TIMEOUT, || !pid_exists(p));
        assert!(
            reaped,
            "orphan {p} was not reaped: {}; {}",
            describe_pid(p),
            ep.context()
        );
    }
    assert_eq!(
        zombies_of(ep_pid),
        Vec::<i32>::new(),
        "zombies whose parent is the entrypoint"
    );
    ep.signal(libc::SIGTERM);
    ep.finish().assert_code(
        128 + libc::SIGTERM,
        "the child (`sleep`) dies of the forwarded SIGTERM",
    );
}

#[test]
fn adopted_orphans_stay_zombies_under_a_subreaper_that_does_not_reap() {
    // Negative control for the test above. The brief suggested making the test process itself
    // the subreaper (safe under nextest, one process per test); instead the *child* is made a
    // subreaper right before exec (`pre_exec`), so that this works under `cargo test` too,
    // where all tests share one process and a subreaper test process would adopt the orphans
    // of every concurrent test. The child becomes `sleep`, which never reaps.
    let dir = TestDir::new("zombies-subreaper-control");
    let child = write_subreaper_child(&dir);
    let mut cmd = plain_command(&dir, "sh");
    cmd.arg(&child);
    // SAFETY: the closure only makes one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut reaper = Running::spawn_captured(cmd);
    let reaper_pid = reaper.pid();
    let orphans = orphan_pids(&dir, &mut reaper);
    for &p in &orphans {
        reaper.wait_until(
            &format!("orphan {p} is re-parented to the subreaper {reaper_pid}"),
            || proc_stat(p).is_some_and(|s| s.ppid == reaper_pid),
        );
    }
    dir.touch("release");
    reaper.wait_until(
        "all three orphans are zombies of the non-reaping subreaper",
        || {
            let zombies = zombies_of(reaper_pid);
            orphans.iter().all(|p| zombies.contains(p))
        },
    );
    // Dropping `reaper` kills it; its zombies go to PID 1, which reaps them.
}

// ---------------------------------------------------------------------------------------------
// Command line and configuration errors

/// Runs the entrypoint with `args` and `env`; the would-be child creates `spawned`. Returns the
/// result after checking that the child did not run.
fn run_not_spawned(dir: &TestDir, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut cmd = entrypoint(dir);
    cmd.args(args).envs(env.iter().copied());
    let out = Running::spawn_captured(cmd).finish();
    assert!(
        !dir.exists("spawned"),
        "the child must not be spawned: {}",
        out.context()
    );
    out
}

fn spawn_marker_script(dir: &TestDir) -> String {
    format!(": > {}; exit 0", dir.sh("spawned"))
}

#[test]
fn command_not_found_gives_127() {
    let dir = TestDir::new("not-found");
    for cmd in [
        "waypost-test-no-such-command",
        "/nonexistent/waypost-test-no-such-command",
    ] {
        let out = run_not_spawned(&dir, &[cmd, "arg"], &[]);
        out.assert_code(127, &format!("CMD {cmd} does not exist"));
        assert!(
            out.stderr_str().contains("waypost-test-no-such-command"),
            "stderr should name the command: {}",
            out.context()
        );
    }
}

#[test]
fn command_not_executable_gives_126() {
    let dir = TestDir::new("not-executable");
    let text = format!("#!/bin/sh\n{}\n", spawn_marker_script(&dir));
    let file = dir.write("not-executable", &text); // mode 0644: no execute bit for anyone
    fs::create_dir(dir.join("bin")).unwrap();
    dir.write("bin/waypost-test-noexec", &text);
    fs::create_dir(dir.join("a-directory")).unwrap();
    let path_with_bin = format!("{}:{DEFAULT_PATH}", dir.join("bin").display());

    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(&str, String, Env); 3] = [
        (
            "a file without execute permission (by path)",
            file.to_string_lossy().into_owned(),
            &[],
        ),
        (
            "a file without execute permission (found on PATH)",
            "waypost-test-noexec".to_owned(),
            &[("PATH", &path_with_bin)],
        ),
        (
            "a directory",
            dir.join("a-directory").to_string_lossy().into_owned(),
            &[],
        ),
    ];
    for (what, cmd, env) in cases {
        let out = run_not_spawned(&dir, &[&cmd], env);
        out.assert_code(126, &format!("CMD is {what}: {cmd}"));
        assert!(
            out.stderr_str().contains(&cmd),
            "stderr should name the command {cmd}: {}",
            out.context()
        );
    }
}

#[test]
fn missing_command_is_a_usage_error() {
    let dir = TestDir::new("no-command");
    let out = run_not_spawned(&dir, &[], &[]);
    out.assert_code(2, "no CMD is a usage error");
    assert!(
        !out.stderr.is_empty(),
        "a usage error should say something on stderr: {}",
        out.context()
    );
    let out = run_not_spawned(&dir, &["--"], &[]);
    out.assert_code(2, "`--` without CMD is a usage error");
}

#[test]
fn unknown_option_is_a_usage_error() {
    let dir = TestDir::new("unknown-option");
    let script = spawn_marker_script(&dir);
    let out = run_not_spawned(&dir, &["--frobnicate", "sh", "-c", &script], &[]);
    out.assert_code(2, "an unknown option before CMD is a usage error");
    assert!(
        out.stderr_str().contains("--frobnicate"),
        "stderr should name the unknown option: {}",
        out.context()
    );
    let out = run_not_spawned(&dir, &["--frobnicate"], &[]);
    out.assert_code(2, "an unknown option alone is a usage error");
}

#[test]
fn malformed_env_values_are_errors_before_spawn() {
    let dir = TestDir::new("malformed-env");
    let script = spawn_marker_script(&dir);
    let cases = [
        ("WAYPOST_STARTUP_TIMEOUT", "abc"),
        ("WAYPOST_STOP_TIMEOUT", "x"),
        ("WAYPOST_LOG_LEVEL", "LOUD"),
        ("PORT", "http"),
        ("WAYPOST_SIGNAL_GROUP", "maybe"),
        ("WAYPOST_TLS_SKIP_VERIFY", "sure"),
        // Below the minimum (one longest log line): nothing could ever be buffered.
        ("WAYPOST_LOG_BUFFER", "1"),
        ("WAYPOST_LOG_BUFFER", "65535"),
    ];
    let mut wrong = Vec::new();
    for (var, value) in cases {
        let mut cmd = entrypoint_sh(&dir, &script);
        cmd.env(var, value);
        let out = Running::spawn_captured(cmd).finish();
        let mut problems = Vec::new();
        if out.status.code() != Some(2) {
            problems.push(format!(
                "exit: {} (expected code 2)",
                describe_status(out.status)
            ));
        }
        if dir.exists("spawned") {
            problems.push("the child was spawned".to_owned());
            fs::remove_file(dir.join("spawned")).unwrap();
        }
        if !out.stderr_str().contains(var) {
            problems.push(format!("stderr does not name {var}"));
        }
        if !problems.is_empty() {
            wrong.push(format!(
                "{var}={value}: {}\n{}",
                problems.join("; "),
                out.context()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "malformed values must be an error (exit 2) before spawning:\n{}",
        wrong.join("\n\n")
    );
}

#[test]
fn malformed_server_lists_are_errors_before_spawn() {
    let dir = TestDir::new("malformed-server-list");
    let script = spawn_marker_script(&dir);
    for (var, value, why) in [
        ("WAYPOST_SERVER", "127.0.0.1:9701,", "entry 2 is empty"),
        ("WAYPOST_SERVER", ",127.0.0.1:9701", "entry 1 is empty"),
        ("WAYPOST_SERVER", "a:1,,b:2", "entry 2 is empty"),
        ("WAYPOST_SERVER", "a:1,b:99999", "bad port"),
        ("WAYPOST_SERVER", "a:1,b:0", "bad port"),
        ("WAYPOST_SERVER", "a:1,b", "no port"),
        ("WAYPOINT_SERVER_ADDR", "a:1,,b:2", "entry 2 is empty"),
    ] {
        let mut cmd = entrypoint_sh(&dir, &script);
        cmd.env(var, value).env("WAYPOST_TOKEN", "t");
        let out = Running::spawn_captured(cmd).finish();
        out.assert_code(2, &format!("{var}={value} is a config error"));
        assert!(
            !dir.exists("spawned"),
            "{var}={value}: the child was spawned"
        );
        let err = out.stderr_str();
        assert!(
            err.contains(var) && err.contains(why),
            "{var}={value}: stderr should name the variable and say {why:?}\n{}",
            out.context()
        );
    }
    // Control: a well-formed list passes the check (disabled, so nothing connects).
    let mut cmd = entrypoint_sh(&dir, &script);
    cmd.env("WAYPOST_SERVER", "127.0.0.1:1, [::1]:2,localhost:3")
        .env("WAYPOST_DISABLE", "1");
    let out = Running::spawn_captured(cmd).finish();
    assert!(dir.exists("spawned"), "{}", out.context());
}

#[test]
fn malformed_labels_are_errors_before_spawn() {
    let dir = TestDir::new("malformed-labels");
    let script = spawn_marker_script(&dir);
    let seventeen: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
    for (value, why) in [
        ("env", "label \"env\" is not key=value"),
        ("a=b,=c", "label \"=c\" has an empty key"),
        (&seventeen.join(","), "lists 17 labels; at most 16"),
        (
            "a=b,a=c",
            "label \"a=c\" repeats the key of an earlier label",
        ),
        (
            "a=b c",
            "label \"a=b c\" has a value with characters other than",
        ),
    ] {
        let mut cmd = entrypoint_sh(&dir, &script);
        cmd.env("WAYPOST_LABELS", value);
        let out = Running::spawn_captured(cmd).finish();
        out.assert_code(2, &format!("WAYPOST_LABELS={value} is a config error"));
        assert!(
            !dir.exists("spawned"),
            "WAYPOST_LABELS={value}: the child was spawned"
        );
        let err = out.stderr_str();
        assert!(
            err.contains("WAYPOST_LABELS") && err.contains(why),
            "WAYPOST_LABELS={value}: stderr should name the variable and say {why:?}\n{}",
            out.context()
        );
    }
    // Control: well-formed labels pass the check, without a warning about the variable.
    let mut cmd = entrypoint_sh(&dir, &script);
    cmd.env("WAYPOST_LABELS", seventeen[..16].join(","));
    let out = Running::spawn_captured(cmd).finish();
    out.assert_code(0, "16 well-formed labels are accepted");
    assert!(dir.exists("spawned"), "{}", out.context());
    assert!(
        !out.stderr_str().contains("WAYPOST_LABELS"),
        "{}",
        out.context()
    );
}

#[test]
fn malformed_url_ports_are_errors_before_spawn() {
    let dir = TestDir::new("malformed-url-ports");
    let script = spawn_marker_script(&dir);
    for (value, why) in [
        ("abc", "entry 1 \"abc\" is not a TCP port (1-65535)"),
        ("0", "entry 1 \"0\" is not a TCP port (1-65535)"),
        ("70000", "entry 1 \"70000\" is not a TCP port (1-65535)"),
        ("1,,2", "entry 2 \"\" is empty"),
        ("80,*", "entry 2 \"*\" is * (any port), which stands alone"),
    ] {
        let mut cmd = entrypoint_sh(&dir, &script);
        cmd.env("WAYPOST_URL_PORTS", value);
        let out = Running::spawn_captured(cmd).finish();
        out.assert_code(2, &format!("WAYPOST_URL_PORTS={value} is a config error"));
        assert!(
            !dir.exists("spawned"),
            "WAYPOST_URL_PORTS={value}: the child was spawned"
        );
        let err = out.stderr_str();
        assert!(
            err.contains("WAYPOST_URL_PORTS") && err.contains(why),
            "WAYPOST_URL_PORTS={value}: stderr should name the variable and say {why:?}\n{}",
            out.context()
        );
    }
    // Control: well-formed values pass the check, without a warning about the variable.
    for value in ["8080, 9090,8080", "*"] {
        let mut cmd = entrypoint_sh(&dir, &script);
        cmd.env("WAYPOST_URL_PORTS", value);
        let out = Running::spawn_captured(cmd).finish();
        out.assert_code(0, &format!("WAYPOST_URL_PORTS={value} is accepted"));
        assert!(dir.exists("spawned"), "{}", out.context());
        fs::remove_file(dir.join("spawned")).unwrap();
        assert!(
            !out.stderr_str().contains("WAYPOST_URL_PORTS"),
            "{}",
            out.context()
        );
    }
}

#[test]
fn unknown_waypost_variable_is_only_a_warning() {
    let dir = TestDir::new("unknown-var");
    let mut cmd = entrypoint_sh(&dir, &format!(": > {}; exit 3", dir.sh("spawned")));
    cmd.env("WAYPOST_FOO", "1");
    let out = Running::spawn_captured(cmd).finish();
    assert!(
        dir.exists("spawned"),
        "the child must run despite an unknown WAYPOST_ variable: {}",
        out.context()
    );
    out.assert_code(3, "the exit code is the child's");
    assert!(
        out.stderr_str().contains("WAYPOST_FOO"),
        "the warning should name the variable: {}",
        out.context()
    );
}

// ---------------------------------------------------------------------------------------------
// Stop timeout

#[test]
fn child_ignoring_sigterm_is_killed_after_stop_timeout() {
    let dir = TestDir::new("stop-timeout");
    // `trap '' TERM` sets SIG_IGN, which survives the exec into `sleep`.
    let mut cmd = entrypoint_sh(
        &dir,
        &format!("trap '' TERM; : > {}; exec sleep 1000", dir.sh("ready")),
    );
    cmd.env("WAYPOST_STOP_TIMEOUT", "500ms");
    let mut ep = Running::spawn_captured(cmd);
    ep.wait_for_file(&dir.join("ready"));
    let ep_pid = ep.pid();
    ep.wait_until("the child ignores SIGTERM", || {
        children_of(ep_pid)
            .iter()
            .any(|c| c.comm == "sleep" && sig_ignored(c.pid, libc::SIGTERM) == Some(true))
    });
    let sent = Instant::now();
    ep.signal(libc::SIGTERM);
    let out = ep.finish();
    let elapsed = sent.elapsed();
    out.assert_code(
        128 + libc::SIGKILL,
        "a child that ignores SIGTERM is SIGKILLed after WAYPOST_STOP_TIMEOUT",
    );
    assert!(
        elapsed >= Duration::from_millis(500),
        "the child was killed {elapsed:?} after SIGTERM, before WAYPOST_STOP_TIMEOUT=500ms: {}",
        out.context()
    );
}

#[test]
fn child_dying_of_forwarded_sigterm_gives_143() {
    let dir = TestDir::new("term-143");
    let mut ep = Running::spawn_captured(entrypoint_sh(
        &dir,
        &format!(": > {}; exec sleep 100", dir.sh("ready")),
    ));
    ep.wait_for_file(&dir.join("ready"));
    ep.signal(libc::SIGTERM);
    ep.finish().assert_code(
        128 + libc::SIGTERM,
        "the child dies of the forwarded SIGTERM (default action)",
    );
}

// ---------------------------------------------------------------------------------------------
// Descendants are cleaned up when the child exits

/// Runs `setup` (sh, may start descendants and `put NAME.pid`) in a child that then waits for
/// `go` and exits 0. Returns the pids named by `pid_files`, checked alive, and the entrypoint.
fn descendants_scenario(dir: &TestDir, setup: &str, pid_files: &[&str]) -> (Running, Vec<i32>) {
    let waits: String = pid_files
        .iter()
        .map(|f| format!("wait_for {f}\n"))
        .collect();
    let child = dir.script(
        "child.sh",
        &format!("{setup}\n{waits}: > \"$D/ready\"\nwait_for go\nexit 0"),
    );
    let mut cmd = entrypoint(dir);
    cmd.args(["sh", &child]);
    let mut ep = Running::spawn_captured(cmd);
    ep.wait_for_file(&dir.join("ready"));
    let pids: Vec<i32> = pid_files.iter().map(|f| dir.read_pid(f)).collect();
    for &p in &pids {
        ep.kill_on_drop(p);
        assert!(
            is_alive(p),
            "premise: descendant {p} is running: {}",
            describe_pid(p)
        );
    }
    (ep, pids)
}

fn assert_all_gone(pids: &[i32], what: &str, out: &Finished) {
    for &p in pids {
        // They are reaped as the entrypoint exits; allow a moment for that.
        let gone = poll_until(TIMEOUT, || !pid_exists(p));
        assert!(
            gone,
            "{what} {p} survived the entrypoint: {}\n{}",
            describe_pid(p),
            out.context()
        );
    }
}

#[test]
fn descendants_are_terminated_when_the_child_exits() {
    let dir = TestDir::new("descendants");
    let setup = "sleep 1000 &\n\
                 put bg.pid $!\n\
                 setsid sh -c 'echo $$ > \"$D/daemon.pid.tmp\" && mv \"$D/daemon.pid.tmp\" \"$D/daemon.pid\"; exec sleep 1000' &";
    let (ep, pids) = descendants_scenario(&dir, setup, &["bg.pid", "daemon.pid"]);
    let (bg, daemon) = (pids[0], pids[1]);
    let (bg_stat, daemon_stat) = (proc_stat(bg).unwrap(), proc_stat(daemon).unwrap());
    assert_ne!(
        bg_stat.pgrp, daemon_stat.pgrp,
        "premise: the daemon left the child's process group"
    );
    dir.touch("go");
    let out = ep.finish();
    out.assert_code(
        0,
        "the exit code is the child's, whatever its descendants do",
    );
    assert_all_gone(
        &[bg],
        "the background `sleep` in the child's process group",
        &out,
    );
    assert_all_gone(
        &[daemon],
        "the daemon that left the process group (adopted by the entrypoint)",
        &out,
    );
}

#[test]
fn descendant_ignoring_sigterm_is_killed_after_grace() {
    let dir = TestDir::new("descendant-stubborn");
    let setup = "sh -c 'trap \"\" TERM; echo $$ > \"$D/stubborn.pid.tmp\" && mv \"$D/stubborn.pid.tmp\" \"$D/stubborn.pid\"; exec sleep 1000' &";
    let (mut ep, pids) = descendants_scenario(&dir, setup, &["stubborn.pid"]);
    let stubborn = pids[0];
    ep.wait_until("the stubborn descendant ignores SIGTERM", || {
        sig_ignored(stubborn, libc::SIGTERM) == Some(true)
    });
    let go = Instant::now();
    dir.touch("go");
    let out = ep.finish();
    let elapsed = go.elapsed();
    out.assert_code(
        0,
        "the exit code is the child's, whatever its descendants do",
    );
    assert_all_gone(&[stubborn], "the descendant ignoring SIGTERM", &out);
    // SIGTERM is sent after the child exited, which is after `go`; SIGKILL follows 2 s later
    // (CONTRACT), and the entrypoint exits after that. 100 ms of slack for timer rounding.
    assert!(
        elapsed >= Duration::from_millis(1900),
        "the entrypoint exited {elapsed:?} after the child was told to exit: it did not give the \
         descendant the 2 s grace between SIGTERM and SIGKILL\n{}",
        out.context()
    );
}

// ---------------------------------------------------------------------------------------------
// Output

const BIG: usize = 10 * 1024 * 1024;

/// Runs `script` (which may use `$D/a.bin`, `$D/b.bin`: BIG random bytes each) and returns the
/// result with the contents of a and b. WAYPOST_LOG_LEVEL=ERROR so the entrypoint's own log
/// lines (on stderr, `[waypost] ` prefixed) do not appear in the normal case and stderr can be
/// compared byte for byte.
fn big_output(name: &str, script: &str) -> (Finished, Vec<u8>, Vec<u8>) {
    let dir = TestDir::new(name);
    let (a, b) = (random_bytes(BIG), random_bytes(BIG));
    dir.write("a.bin", &a);
    dir.write("b.bin", &b);
    let child = dir.script("child.sh", script);
    let mut cmd = entrypoint(&dir);
    cmd.args(["sh", &child]).env("WAYPOST_LOG_LEVEL", "ERROR");
    let out = Running::spawn_captured(cmd).finish_within(Duration::from_secs(60));
    out.assert_code(0, "the child exits 0");
    (out, a, b)
}

#[test]
fn stdout_is_byte_identical() {
    let (out, a, _) = big_output("stdout-bytes", "cat \"$D/a.bin\"");
    assert_bytes_eq("stdout", &out.stdout, &a);
    assert_bytes_eq("stderr (WAYPOST_LOG_LEVEL=ERROR)", &out.stderr, b"");
}

#[test]
fn stderr_is_byte_identical() {
    let (out, _, b) = big_output("stderr-bytes", "cat \"$D/b.bin\" >&2");
    assert_bytes_eq("stderr (WAYPOST_LOG_LEVEL=ERROR)", &out.stderr, &b);
    assert_bytes_eq("stdout", &out.stdout, b"");
}

#[test]
fn stdout_and_stderr_written_at_once_are_byte_identical() {
    let (out, a, b) = big_output(
        "both-bytes",
        "cat \"$D/a.bin\" & cat \"$D/b.bin\" >&2; wait",
    );
    assert_bytes_eq("stdout", &out.stdout, &a);
    assert_bytes_eq("stderr (WAYPOST_LOG_LEVEL=ERROR)", &out.stderr, &b);
}

#[test]
fn stdout_and_stderr_stay_separate() {
    let dir = TestDir::new("separate");
    let out = Running::spawn_captured(entrypoint_sh(&dir, "echo out; echo err >&2")).finish();
    out.assert_code(0, "the child exits 0");
    assert_eq!(
        out.stdout_str(),
        "out\n",
        "stdout must hold exactly the child's stdout: {}",
        out.context()
    );
    assert_eq!(
        out.stderr_without_logs(),
        "err\n",
        "stderr, apart from the entrypoint's own `{LOG_PREFIX}` lines, must hold exactly the child's stderr: {}",
        out.context()
    );
}

#[test]
fn slow_reader_gets_backpressure_and_nothing_is_lost() {
    const LINES: u64 = 2_000_000; // ~14.9 MB of output
    const RSS_LIMIT_KIB: u64 = 8 * 1024;
    const NOT_READING: Duration = Duration::from_millis(1500);
    let dir = TestDir::new("backpressure");
    let mut cmd = entrypoint_sh(&dir, &format!("exec seq 1 {LINES}"));
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut ep = Running::spawn(cmd);
    ep.capture_stderr();
    // stdout is a pipe nobody reads for a while: `seq` must stall (the entrypoint stops reading
    // its output) instead of the entrypoint buffering ~15 MB in memory.
    let start = Instant::now();
    let mut max_rss = 0;
    while start.elapsed() < NOT_READING {
        if let Some(rss) = vm_rss_kib(ep.pid()) {
            max_rss = max_rss.max(rss);
        }
        thread::sleep(POLL);
    }
    let seq: Vec<ProcStat> = children_of(ep.pid())
        .into_iter()
        .filter(|c| c.comm == "seq")
        .collect();
    assert!(
        ep.try_status().is_none() && seq.iter().any(|s| s.state != 'Z'),
        "the child should be stalled, still running, while stdout is not read; children: {:?}; {}",
        seq.iter().map(|s| describe_pid(s.pid)).collect::<Vec<_>>(),
        ep.context()
    );
    assert!(
        max_rss < RSS_LIMIT_KIB,
        "the entrypoint's RSS reached {max_rss} KiB (limit {RSS_LIMIT_KIB}) while its stdout was not read: \
         it buffers instead of applying backpressure; {}",
        ep.context()
    );
    ep.capture_stdout();
    let out = ep.finish_within(Duration::from_secs(60));
    out.assert_code(0, "seq exits 0");
    let mut expected = 1u64;
    for line in out
        .stdout
        .strip_suffix(b"\n")
        .unwrap_or(&out.stdout)
        .split(|&b| b == b'\n')
    {
        let got = std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        assert_eq!(
            got,
            Some(expected),
            "line {expected} of seq's output is {:?} (stdout was {} bytes)",
            String::from_utf8_lossy(line),
            out.stdout.len()
        );
        expected += 1;
    }
    assert_eq!(expected - 1, LINES, "number of lines received");
}

// ---------------------------------------------------------------------------------------------
// Terminal

/// Runs `script` under the entrypoint on a new PTY, as `docker run -t` would (the entrypoint
/// leads a session with the PTY as its controlling terminal and as stdin/stdout/stderr); returns
/// the exit status, what appeared on the terminal (CRs removed), and the PTY's name.
fn run_on_a_terminal(
    name: &str,
    script: &str,
    env: &[(&str, &str)],
) -> (std::process::ExitStatus, String, String) {
    let dir = TestDir::new(name);
    let (master, slave, slave_name) = open_pty();
    let mut cmd = entrypoint_sh(&dir, script);
    cmd.envs(env.iter().copied())
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: only async-signal-safe system calls in the closure.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Reading the master ends with EIO once every slave fd is closed (hang-up).
    let mut term = Capture::start(fs::File::from(master));
    let mut ep = Running::spawn(cmd); // drops our copies of the slave
    let status = ep.wait_exit();
    assert!(
        term.wait_eof(TIMEOUT),
        "the terminal was not hung up after the entrypoint exited"
    );
    let output = String::from_utf8_lossy(&term.take()).replace('\r', "");
    (status, output, slave_name)
}

#[test]
fn child_inherits_the_terminal() {
    let (status, output, slave_name) = run_on_a_terminal(
        "tty",
        "tty; readlink /proc/self/fd/1; test -t 1 && echo STDOUT_IS_TTY; exit 0",
        &[],
    );
    assert_eq!(
        status.code(),
        Some(0),
        "entrypoint {}; terminal output:\n{output}",
        describe_status(status)
    );
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| !l.starts_with(LOG_PREFIX))
        .collect();
    assert!(
        lines.len() >= 3
            && lines[0] == slave_name
            && lines[1] == slave_name
            && lines[2] == "STDOUT_IS_TTY",
        "the child's stdin and stdout should be the terminal {slave_name} itself; terminal output:\n{output}"
    );
}

#[test]
fn capture_on_a_terminal_relays_through_pipes() {
    // WAYPOST_CAPTURE=1 (what `waypost up` sets): on a terminal too, the output goes through the
    // entrypoint (so it can be shipped as logs); the child writes to a pipe, and the text still
    // reaches the terminal.
    let (status, output, _) = run_on_a_terminal(
        "tty-capture",
        "test -t 1 || echo STDOUT_IS_A_PIPE; echo to-stderr >&2; exit 0",
        &[("WAYPOST_CAPTURE", "1")],
    );
    assert_eq!(status.code(), Some(0), "terminal output:\n{output}");
    assert!(
        output.contains("STDOUT_IS_A_PIPE") && output.contains("to-stderr"),
        "terminal output:\n{output}"
    );
}

// ---------------------------------------------------------------------------------------------
// WAYPOST_DISABLE=1 and capture

/// The child reports where its fd 1 and 2 point; returns them with the entrypoint's own.
fn stdio_identity(disable: bool) -> (Finished, [String; 2], [String; 2]) {
    let dir = TestDir::new(if disable {
        "disable-stdio"
    } else {
        "captured-stdio"
    });
    let child = dir.script(
        "child.sh",
        "readlink /proc/self/fd/1\nreadlink /proc/self/fd/2 >&2\n: > \"$D/ready\"\nwait_for go\nexit 5",
    );
    let mut cmd = entrypoint(&dir);
    cmd.args(["sh", &child]);
    if disable {
        cmd.env("WAYPOST_DISABLE", "1");
    }
    let mut ep = Running::spawn_captured(cmd);
    ep.wait_for_file(&dir.join("ready"));
    let ep_fds = [fd_target(ep.pid(), 1), fd_target(ep.pid(), 2)];
    dir.touch("go");
    let out = ep.finish();
    out.assert_code(5, "the exit code is the child's");
    let child_fds = [
        out.stdout_str().trim().to_owned(),
        out.stderr_without_logs().trim().to_owned(),
    ];
    (out, ep_fds, child_fds)
}

#[test]
fn disable_gives_the_child_the_entrypoints_own_stdout_and_stderr() {
    let (out, ep_fds, child_fds) = stdio_identity(true);
    assert_eq!(
        child_fds,
        ep_fds,
        "with WAYPOST_DISABLE=1 the child's fd 1 and 2 are the entrypoint's (no capture): {}",
        out.context()
    );
}

#[test]
fn output_is_captured_by_default() {
    // Negative control for the test above: without WAYPOST_DISABLE (and stdout not a terminal)
    // the entrypoint captures the child's output through pipes of its own.
    let (out, ep_fds, child_fds) = stdio_identity(false);
    assert!(
        child_fds[0] != ep_fds[0] && child_fds[1] != ep_fds[1],
        "by default the child's stdout/stderr ({child_fds:?}) should be the entrypoint's capture pipes, \
         not its own stdout/stderr ({ep_fds:?}): {}",
        out.context()
    );
}

#[test]
fn disable_keeps_signals_and_exit_codes() {
    assert_signal_forwarded(libc::SIGTERM, &[("WAYPOST_DISABLE", "1")]);
    assert_signal_forwarded(libc::SIGUSR1, &[("WAYPOST_DISABLE", "1")]);
    let dir = TestDir::new("disable-killed");
    let mut cmd = entrypoint_sh(&dir, "kill -TERM $$");
    cmd.env("WAYPOST_DISABLE", "1");
    Running::spawn_captured(cmd).finish().assert_code(
        128 + libc::SIGTERM,
        "child killed by SIGTERM under WAYPOST_DISABLE=1",
    );
    let mut cmd = entrypoint_sh(&dir, "exit 42");
    cmd.env("WAYPOST_DISABLE", "1");
    Running::spawn_captured(cmd)
        .finish()
        .assert_code(42, "child's exit code under WAYPOST_DISABLE=1");
}

// ---------------------------------------------------------------------------------------------
// Command line

#[test]
fn version_flag() {
    let dir = TestDir::new("version");
    let mut cmd = entrypoint(&dir);
    cmd.arg("--version");
    let out = Running::spawn_captured(cmd).finish();
    out.assert_code(0, "--version succeeds");
    assert!(
        out.stdout_str().contains(env!("CARGO_PKG_VERSION")),
        "--version should print the version {} on stdout: {}",
        env!("CARGO_PKG_VERSION"),
        out.context()
    );
}

#[test]
fn help_flag() {
    let dir = TestDir::new("help");
    let mut cmd = entrypoint(&dir);
    cmd.arg("--help");
    let out = Running::spawn_captured(cmd).finish();
    out.assert_code(0, "--help succeeds");
    assert!(
        out.stdout_str().contains("WAYPOST_SERVER"),
        "--help should print usage mentioning WAYPOST_SERVER on stdout: {}",
        out.context()
    );
}

#[test]
fn double_dash_separates_the_command() {
    let dir = TestDir::new("double-dash");
    let mut cmd = entrypoint(&dir);
    cmd.args(["--", "sh", "-c", "exit 7"]);
    Running::spawn_captured(cmd)
        .finish()
        .assert_code(7, "`waypost-entrypoint -- sh -c 'exit 7'`");
}

#[test]
fn options_after_the_command_belong_to_the_child() {
    let dir = TestDir::new("child-options");
    let mut cmd = entrypoint(&dir);
    cmd.args(["sh", "-c", "echo \"$1\"", "x", "--version"]);
    let out = Running::spawn_captured(cmd).finish();
    out.assert_code(0, "the child exits 0");
    assert_eq!(
        out.stdout_str(),
        "--version\n",
        "`--version` after CMD is the child's argument: {}",
        out.context()
    );
}

// ---------------------------------------------------------------------------------------------
// The child's environment

fn child_env(extra: &[(&str, &str)]) -> (Finished, Vec<String>) {
    let dir = TestDir::new("child-env");
    let mut cmd = entrypoint(&dir);
    cmd.arg("env").envs(extra.iter().copied());
    let out = Running::spawn_captured(cmd).finish();
    out.assert_code(0, "`env` exits 0");
    let lines = out.stdout_str().lines().map(str::to_owned).collect();
    (out, lines)
}

#[test]
fn child_gets_port_5000_when_unset() {
    let (out, env) = child_env(&[("WAYPOST_TEST_MARKER", "passed-through")]);
    assert!(
        env.iter()
            .any(|l| l == "WAYPOST_TEST_MARKER=passed-through"),
        "premise: the environment reaches the child: {}",
        out.context()
    );
    assert_eq!(
        env.iter()
            .filter(|l| l.starts_with("PORT="))
            .collect::<Vec<_>>(),
        ["PORT=5000"],
        "{}",
        out.context()
    );
}

#[test]
fn child_keeps_port_when_set() {
    let (out, env) = child_env(&[("PORT", "8080")]);
    assert_eq!(
        env.iter()
            .filter(|l| l.starts_with("PORT="))
            .collect::<Vec<_>>(),
        ["PORT=8080"],
        "{}",
        out.context()
    );
}

#[test]
fn token_is_not_passed_to_the_child() {
    let (out, env) = child_env(&[
        ("WAYPOST_TOKEN", "secret-token-value"),
        ("APP_SETTING", "kept"),
    ]);
    assert!(
        env.iter().any(|l| l == "APP_SETTING=kept"),
        "premise: other variables reach the child: {}",
        out.context()
    );
    assert!(
        !env.iter()
            .any(|l| l.starts_with("WAYPOST_TOKEN=") || l.contains("secret-token-value")),
        "WAYPOST_TOKEN leaked into the child's environment: {env:?}"
    );
}

#[test]
fn labels_are_not_passed_to_the_child() {
    let (out, env) = child_env(&[
        ("WAYPOST_LABELS", "env=prod,tier=web"),
        ("WAYPOST_TEST_MARKER", "passed-through"),
    ]);
    assert!(
        env.iter()
            .any(|l| l == "WAYPOST_TEST_MARKER=passed-through"),
        "premise: other WAYPOST_ variables reach the child: {}",
        out.context()
    );
    assert!(
        !env.iter().any(|l| l.starts_with("WAYPOST_LABELS=")),
        "WAYPOST_LABELS reached the child's environment: {env:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Accepted values agree with what the errors say

/// Runs `true`-like child under the entrypoint with `var=value`; whether the child ran.
fn accepted(dir: &TestDir, var: &str, value: &str) -> (bool, Finished) {
    let _ = fs::remove_file(dir.join("spawned"));
    let mut cmd = entrypoint_sh(dir, &spawn_marker_script(dir));
    cmd.env(var, value);
    let out = Running::spawn_captured(cmd).finish();
    (dir.exists("spawned") && out.status.code() == Some(0), out)
}

#[test]
fn a_boolean_error_lists_exactly_the_words_accepted() {
    let dir = TestDir::new("boolean-words");
    let (ran, out) = accepted(&dir, "WAYPOST_SIGNAL_GROUP", "maybe");
    assert!(!ran, "premise: a non-boolean is refused: {}", out.context());
    out.assert_code(2, "a malformed boolean is a config error");
    // "... is not a boolean (1/0, true/false, yes/no, on/off, any case)"
    let err = out.stderr_str();
    let list = err
        .split_once("is not a boolean (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(list, _)| list.to_owned())
        .unwrap_or_else(|| {
            panic!(
                "the error should list the accepted words in parentheses: {}",
                out.context()
            )
        });
    let words: Vec<&str> = list
        .split(", ")
        .filter(|w| w.contains('/'))
        .flat_map(|w| w.split('/'))
        .collect();
    assert_eq!(
        words,
        ["1", "0", "true", "false", "yes", "no", "on", "off"],
        "listed: {list:?}"
    );
    assert!(list.contains("any case"), "{list:?}");
    let mut wrong = Vec::new();
    for w in words
        .iter()
        .flat_map(|w| [w.to_string(), w.to_ascii_uppercase()])
    {
        let (ran, out) = accepted(&dir, "WAYPOST_SIGNAL_GROUP", &w);
        if !ran {
            wrong.push(format!("WAYPOST_SIGNAL_GROUP={w}: {}", out.context()));
        }
    }
    assert!(
        wrong.is_empty(),
        "words the error lists must be accepted:\n{}",
        wrong.join("\n\n")
    );
}

#[test]
fn the_smallest_log_buffer_holds_one_longest_line() {
    let dir = TestDir::new("log-buffer-min");
    for ok in ["64KiB", "65536", "1MiB"] {
        let (ran, out) = accepted(&dir, "WAYPOST_LOG_BUFFER", ok);
        assert!(
            ran,
            "WAYPOST_LOG_BUFFER={ok} is accepted: {}",
            out.context()
        );
    }
    let (ran, out) = accepted(&dir, "WAYPOST_LOG_BUFFER", "64000");
    assert!(
        !ran,
        "WAYPOST_LOG_BUFFER=64000 is below the minimum: {}",
        out.context()
    );
    out.assert_code(2, "a too small log buffer is a config error");
    assert!(
        out.stderr_str().contains("minimum") && out.stderr_str().contains("64KiB"),
        "the error says the minimum: {}",
        out.context()
    );
}

// ---------------------------------------------------------------------------------------------
// The entrypoint's own copy of its secrets

/// Secret variables with values the tests search for, including the legacy token names.
const SECRETS: [(&str, &str); 3] = [
    ("WAYPOST_TOKEN", "tok-4f1d9e-secret"),
    ("WAYPOINT_CEB_INVITE_TOKEN", "legacy-invite-8c2e51"),
    ("WAYPOINT_CEB_TOKEN", "legacy-ceb-77aa03"),
];

/// The secret values found in `bytes` (an environ block or any text).
fn leaked(bytes: &[u8]) -> Vec<&'static str> {
    let text = String::from_utf8_lossy(bytes);
    SECRETS
        .iter()
        .flat_map(|(name, value)| [*name, *value])
        .filter(|s| text.contains(s))
        .collect()
}

#[test]
fn removing_a_variable_leaves_it_in_proc_environ() {
    // The premise of the scrub: /proc/PID/environ shows the environment as the process was
    // started with it; unsetting the variable (here: sh's `unset`) does not change that. So the
    // reading in the test below would see a token that was merely unset.
    let dir = TestDir::new("unset-is-not-enough");
    let out = plain_command(&dir, "sh")
        .args(["-c", "unset WAYPOST_TOKEN; cat /proc/$$/environ"])
        .env("WAYPOST_TOKEN", SECRETS[0].1)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(SECRETS[0].1),
        "premise: unset left the bytes: {out:?}"
    );
}

#[test]
fn the_token_is_blanked_in_the_entrypoints_own_environ() {
    let dir = TestDir::new("own-environ");
    // The app reads its parent's (the entrypoint's) environ, and its own, then waits.
    let script = dir.script(
        "app.sh",
        r#"cat /proc/$PPID/environ > "$D/parent-env.tmp" && mv "$D/parent-env.tmp" "$D/parent-env"
cat /proc/self/environ > "$D/own-env"
wait_for go"#,
    );
    let mut cmd = entrypoint(&dir);
    cmd.args(["sh", &script])
        .envs(SECRETS)
        .env("WAYPOST_LOG_LEVEL", "DEBUG")
        .env("APP_SETTING", "kept");
    let mut ep = Running::spawn_captured(cmd);
    let parent_env = dir.join("parent-env");
    ep.wait_for_file(&parent_env);
    // And what anyone allowed to read it (root, here) sees, while the entrypoint runs.
    let seen_by_us = fs::read(format!("/proc/{}/environ", ep.pid())).unwrap();
    dir.touch("go");
    let out = ep.finish();
    out.assert_code(0, "the app exits 0");

    for (what, bytes) in [
        (
            "the entrypoint's environ read by the app",
            fs::read(&parent_env).unwrap(),
        ),
        ("the entrypoint's environ read by the test", seen_by_us),
    ] {
        let text = String::from_utf8_lossy(&bytes).replace('\0', "\n");
        // Negative control: the block is readable and non-secret variables are still in it, so
        // the absence below is not an empty or unreadable file.
        assert!(
            text.lines().any(|l| l == "WAYPOST_LOG_LEVEL=DEBUG")
                && text.lines().any(|l| l == "APP_SETTING=kept"),
            "{what}: {text}"
        );
        assert_eq!(
            leaked(&bytes),
            Vec::<&str>::new(),
            "{what} still shows secrets: {text}"
        );
    }
    let own = fs::read(dir.join("own-env")).unwrap();
    assert!(
        String::from_utf8_lossy(&own).contains("APP_SETTING=kept"),
        "premise: the app's environ was read"
    );
    assert_eq!(
        leaked(&own),
        Vec::<&str>::new(),
        "the app's own environment shows secrets"
    );
}

/// The `setpriv` prefix that runs a command as nobody (65534), or None (after a loud skip line)
/// where that is impossible: not root, or no setpriv.
fn as_nobody() -> Option<[&'static str; 5]> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root || !setpriv {
        eprintln!(
            "SKIPPED: needs root and setpriv(1) to run the entrypoint as another user (root: {root}, setpriv: {setpriv})"
        );
        return None;
    }
    Some([
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ])
}

/// Run by the app as nobody: can it read its parent's environ, and its own; who owns them.
const INSPECT_PARENT: &str = r#"if cat /proc/$PPID/environ > /dev/null 2> "$D/parent.err"; then put parent readable; else put parent denied; fi
put parent-owner "$(stat -c %u /proc/$PPID/environ)"
if cat /proc/self/environ > /dev/null; then put self readable; else put self denied; fi
put self-owner "$(stat -c %u /proc/self/environ)"
put me "$(id -u)"
put done yes"#;

fn inspect_results(dir: &TestDir) -> [String; 5] {
    ["me", "parent", "parent-owner", "self", "self-owner"]
        .map(|f| dir.read(f).unwrap_or_else(|| panic!("{f} not written")))
}

#[test]
fn the_entrypoint_is_not_dumpable_but_its_child_is() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(nobody) = as_nobody() else { return };
    let dir = TestDir::new("not-dumpable");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    // A copy nobody can surely execute (the build tree may not be reachable for it).
    let bin = dir.join("waypost-entrypoint");
    fs::copy(entrypoint_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.script("inspect.sh", INSPECT_PARENT);

    // Negative control: under a plain parent of the same user (a shell, dumpable as usual), the
    // same script reads its parent's environ — so a refusal below comes from the entrypoint.
    let status = plain_command(&dir, nobody[0])
        .args(&nobody[1..])
        .args(["sh", "-c", &format!("sh {script}; true")])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "the control run failed: {}",
        describe_status(status)
    );
    let [me, parent, owner, ..] = inspect_results(&dir);
    assert_eq!(
        (me.as_str(), parent.as_str(), owner.as_str()),
        ("65534", "readable", "65534"),
        "premise: same-user processes read each other's environ"
    );
    for f in ["me", "parent", "parent-owner", "self", "self-owner", "done"] {
        fs::remove_file(dir.join(f)).unwrap();
    }

    let mut cmd = plain_command(&dir, nobody[0]);
    cmd.args(&nobody[1..])
        .arg(&bin)
        .args(["sh", &script])
        .env("WAYPOST_TOKEN", SECRETS[0].1);
    let out = Running::spawn_captured(cmd).finish();
    out.assert_code(0, "the app exits 0");
    let [me, parent, owner, own, own_owner] = inspect_results(&dir);
    assert_eq!(
        me,
        "65534",
        "premise: the app runs as nobody: {}",
        out.context()
    );
    assert_eq!(
        parent,
        "denied",
        "the app must not read the entrypoint's environ: {}",
        out.context()
    );
    assert_eq!(
        owner, "0",
        "a non-dumpable process's /proc files belong to root"
    );
    assert_eq!(
        (own.as_str(), own_owner.as_str()),
        ("readable", "65534"),
        "the app itself is dumpable again after its execve"
    );
}
