//! An app's last words: the lines it printed and how it ended reach the server even when it
//! exits while the server is restarting (`WAYPOST_FLUSH_TIMEOUT`); an OOM kill is reported as
//! such; and `WAYPOST_LOG_MODE=block` makes the app wait for a stalled server instead of losing
//! lines. Real server, real entrypoint, real children.

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `waypost logs --app APP -o json ARGS...` as a list of rows.
fn logs_json(server: &Server, app: &str, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["logs", "--app", app, "-o", "json"];
    a.extend_from_slice(args);
    server
        .cli(&a)
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Texts of the stored stdout lines, in order.
fn stdout_lines(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .filter(|r| r["stream"] == "stdout")
        .map(|r| {
            let b64 = r["data_b64"].as_str().unwrap();
            String::from_utf8(waypost::util::base64_decode(b64).unwrap()).unwrap()
        })
        .collect()
}

/// Loss markers among the rows (entries the entrypoint had to drop).
fn markers(rows: &[Value]) -> usize {
    rows.iter()
        .filter(|r| r.get("dropped").is_some_and(|d| !d.is_null()))
        .count()
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

/// Processes that keep both cores busy for as long as the guard lives ("under load").
struct Burners(Vec<Child>);

impl Burners {
    fn start(n: usize) -> Burners {
        Burners(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .stdin(Stdio::null())
                        .spawn()
                        .expect("starting a CPU burner")
                })
                .collect(),
        )
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The instance `id` (hex) as `instances --all -o json` lists it, once it is no longer live.
fn ended_instance(server: &Server, id: &str) -> Value {
    wait_for(&format!("instance {id} to be listed as ended"), || {
        server
            .instances(true)
            .into_iter()
            .find(|i| i["id"] == id && i["live"] == false)
    })
}

/// A child that waits for `$D/go`, then prints `n` numbered lines and exits 7.
fn last_words_script(prefix: &str, n: usize) -> String {
    format!(
        r#"while [ ! -e "$D/go" ]; do sleep 0.02; done; i=1; while [ $i -le {n} ]; do echo "{prefix} $i"; i=$((i+1)); done; exit 7"#
    )
}

/// One round: the entrypoint is connected, the server is killed, ~1 s later the app prints its
/// lines and exits, and the server comes back on the same control address. Returns the
/// entrypoint's exit code, whether it was still running when the server was back, and the
/// lines the server stored for the instance.
fn exit_during_a_restart(
    server: Server,
    control: &str,
    round: usize,
    n: usize,
    flush_timeout: Option<&str>,
) -> (Server, Option<i32>, bool, Vec<Value>, String) {
    let prefix = format!("r{round}");
    let mut b = Builder::new(&server, "lw", &last_words_script(&prefix, n));
    if let Some(t) = flush_timeout {
        b = b.env("WAYPOST_FLUSH_TIMEOUT", t);
    }
    let mut ep = b.spawn().expect("checked by the caller");
    let id = ep.instance(&server)["id"].as_str().unwrap().to_string();
    let env = server.kill();
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(ep.dir.join("go"), "").unwrap();
    if flush_timeout == Some("0s") {
        // The negative control waits for the entrypoint to be gone before the server is back
        // (otherwise whether it got lucky would depend on timing).
        ep.wait();
    }
    let server = Server::start_in(env, &["--control-addr", control]);
    let running_when_back = ep.running();
    let code = ep.wait().code();
    let rows = logs_json(&server, "lw", &["--instance", &id]);
    (server, code, running_when_back, rows, id)
}

#[test]
fn an_app_exiting_during_a_server_restart_keeps_every_line_and_its_exit_code() {
    if crate::common::entrypoint::binary().is_none() {
        return;
    }
    let mut server = Server::start(&[]);
    let control = server.control_addr.clone();
    let _load = Burners::start(2);
    let n = 300;
    let rounds = 20;
    let t0 = Instant::now();
    for round in 0..rounds {
        let (s, code, _, rows, id) = exit_during_a_restart(server, &control, round, n, None);
        server = s;
        assert_eq!(
            code,
            Some(7),
            "round {round}: the entrypoint exits with the app's code"
        );
        let got = stdout_lines(&rows);
        assert_eq!(
            got.len(),
            n,
            "round {round}: {} of {n} lines stored, after {:?}",
            got.len(),
            t0.elapsed()
        );
        assert_eq!(
            got,
            numbered(&format!("r{round}"), n),
            "round {round}: in order, once"
        );
        assert_eq!(markers(&rows), 0, "round {round}: nothing dropped");
        let inst = ended_instance(&server, &id);
        assert_eq!(
            inst["exit_code"], 7,
            "round {round}: final status recorded: {inst}"
        );
    }
    eprintln!("{rounds} rounds under load in {:?}", t0.elapsed());
}

#[test]
fn without_a_flush_timeout_the_same_exit_loses_the_lines() {
    // Negative control for the test above: WAYPOST_FLUSH_TIMEOUT=0s gives the server no time,
    // so an entrypoint between connections exits at once and the lines are gone.
    if crate::common::entrypoint::binary().is_none() {
        return;
    }
    let server = Server::start(&[]);
    let control = server.control_addr.clone();
    let (server, code, running_when_back, rows, id) =
        exit_during_a_restart(server, &control, 0, 300, Some("0s"));
    assert_eq!(code, Some(7));
    assert!(!running_when_back);
    assert!(
        stdout_lines(&rows).is_empty(),
        "the lines printed while the server was away are lost: {rows:?}"
    );
    // What the server last heard is "running": the exit itself went unreported.
    let inst = ended_instance(&server, &id);
    assert_ne!(inst["exit_code"], 7, "{inst}");
}

#[test]
fn malformed_flush_timeout_or_log_mode_stops_before_the_app_starts() {
    if crate::common::entrypoint::binary().is_none() {
        return;
    }
    let server = Server::start(&[]);
    for (var, value) in [
        ("WAYPOST_FLUSH_TIMEOUT", "soon"),
        ("WAYPOST_FLUSH_TIMEOUT", "-1s"),
        ("WAYPOST_LOG_MODE", "sometimes"),
        ("WAYPOST_LOG_MODE", "blocking"),
    ] {
        let mut ep = Builder::new(&server, "bad", r#"touch "$D/ran""#)
            .env(var, value)
            .spawn()
            .unwrap();
        assert_eq!(ep.wait().code(), Some(2), "{var}={value}");
        let err = ep.stderr();
        assert!(
            err.contains(var) && err.contains(value),
            "{var}={value}: {err}"
        );
        assert!(
            ep.file("ran").is_none(),
            "{var}={value}: the app must not start"
        );
    }
    // The well-formed values are accepted (and the app runs).
    let mut ep = Builder::new(&server, "bad", r#"touch "$D/ran""#)
        .env("WAYPOST_FLUSH_TIMEOUT", "500ms")
        .env("WAYPOST_LOG_MODE", "block")
        .spawn()
        .unwrap();
    assert_eq!(ep.wait().code(), Some(0), "{}", ep.stderr());
    assert!(ep.file("ran").is_some());
}

// ---- OOM ------------------------------------------------------------------------------------

/// A cgroup v1 memory cgroup with a limit, removed on drop.
struct MemCgroup(PathBuf);

impl MemCgroup {
    /// None (after a loud SKIPPED line) where it cannot be made: not root, no v1 memory
    /// controller.
    fn create(limit: u64) -> Option<MemCgroup> {
        let root = Path::new("/sys/fs/cgroup/memory");
        let dir = root.join(format!("waypost-test-{}", hex(&new_id()[..6])));
        let made = std::fs::create_dir(&dir).and_then(|()| {
            let cg = MemCgroup(dir.clone());
            std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string())?;
            if dir.join("memory.memsw.limit_in_bytes").exists() {
                // Else the kernel swaps instead of killing.
                std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string())?;
            }
            Ok(cg)
        });
        match made {
            Ok(cg) => Some(cg),
            Err(e) => {
                eprintln!(
                    "SKIPPED: cannot create a v1 memory cgroup at {} ({e}); needs root and the cgroup v1 memory controller",
                    dir.display()
                );
                None
            }
        }
    }

    fn oom_kills(&self) -> u64 {
        let text = std::fs::read_to_string(self.0.join("memory.oom_control")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Whatever is left in it must go first, or rmdir fails (EBUSY).
        for _ in 0..100 {
            let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) with a pid read from our own test cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

/// The real entrypoint for `app` on `server`, started inside `cg` (the shell moves itself
/// there, then execs the entrypoint), running `sh -c script`.
fn spawn_in_cgroup(
    server: &Server,
    app: &str,
    cg: &MemCgroup,
    script: &str,
) -> (Child, tempfile::TempDir) {
    let bin = crate::common::entrypoint::binary().expect("checked by the caller");
    let tmp = tempfile::tempdir().unwrap();
    let token = server.entrypoint_token(app, None);
    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$CG/cgroup.procs" && exec "$@""#)
        .arg("sh")
        .arg(bin)
        .args(["sh", "-c", script])
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        )
        .env("CG", &cg.0)
        .env("D", tmp.path())
        .env("WAYPOST_SERVER", &server.control_addr)
        .env("WAYPOST_TOKEN", token)
        .env("WAYPOST_CA", server.ca_pem())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(tmp.path().join("stdout")).unwrap())
        .stderr(std::fs::File::create(tmp.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    (child, tmp)
}

fn wait_exit(child: &mut Child, tmp: &tempfile::TempDir) -> Option<i32> {
    let what = format!(
        "the entrypoint to exit; its stderr:\n{}",
        std::fs::read_to_string(tmp.path().join("stderr")).unwrap_or_default()
    );
    wait_for(&what, || child.try_wait().unwrap()).code()
}

/// The instance row of the table `waypost instances --all` prints for `id`.
fn table_row(server: &Server, id: &str) -> String {
    let table = server.cli(&["instances", "--all"]).ok().stdout;
    table
        .lines()
        .find(|l| l.starts_with(&id[..8]))
        .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
        .to_string()
}

#[test]
fn an_oom_killed_app_is_reported_as_oom_killed_and_a_plain_kill_9_is_not() {
    if crate::common::entrypoint::binary().is_none() {
        return;
    }
    let Some(cg) = MemCgroup::create(48 << 20) else {
        return;
    };
    let server = Server::start(&[]);

    // The app doubles a string until the cgroup's limit: the kernel's OOM killer picks it
    // (far the largest, and it asks to be picked first).
    let before = cg.oom_kills();
    let hog =
        r#"echo 1000 > /proc/self/oom_score_adj; exec awk 'BEGIN { s = "x"; while (1) s = s s }'"#;
    let (mut ep, tmp) = spawn_in_cgroup(&server, "hog", &cg, hog);
    assert_eq!(wait_exit(&mut ep, &tmp), Some(137), "killed by SIGKILL");
    assert!(
        cg.oom_kills() > before,
        "the kernel did kill for memory in the test cgroup"
    );
    let inst = wait_for("the hog's instance to be listed as ended", || {
        server
            .instances(true)
            .into_iter()
            .find(|i| i["app"] == "hog" && i["live"] == false)
    });
    assert_eq!(inst["oom_killed"], true, "{inst}");
    assert_eq!(inst["exit_signal"], 9, "{inst}");
    let id = inst["id"].as_str().unwrap().to_string();
    let row = table_row(&server, &id);
    assert!(row.contains("OOM-killed"), "{row}");

    // Negative control: same cgroup, a child killed by a plain SIGKILL from outside.
    let sleeper = r#"echo $$ > "$D/pid"; exec sleep 1000"#;
    let (mut ep, tmp) = spawn_in_cgroup(&server, "sleeper", &cg, sleeper);
    let pid: i32 = wait_for("the sleeper's pid", || {
        std::fs::read_to_string(tmp.path().join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    // Connected (and so its start was counted) before the kill.
    wait_for("the sleeper to be live", || {
        server
            .instances(false)
            .into_iter()
            .find(|i| i["app"] == "sleeper" && i["child_state"] == "running")
    });
    let before = cg.oom_kills();
    // SAFETY: kill(2) on the pid our own test's child wrote.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(wait_exit(&mut ep, &tmp), Some(137));
    assert_eq!(cg.oom_kills(), before, "no OOM kill happened");
    let inst = wait_for("the sleeper's instance to be listed as ended", || {
        server
            .instances(true)
            .into_iter()
            .find(|i| i["app"] == "sleeper" && i["live"] == false)
    });
    assert_eq!(inst["oom_killed"], false, "{inst}");
    assert_eq!(inst["exit_signal"], 9, "{inst}");
    let row = table_row(&server, inst["id"].as_str().unwrap());
    assert!(
        row.contains("killed by SIGKILL") && !row.contains("OOM"),
        "{row}"
    );
}

// ---- WAYPOST_LOG_MODE=block -----------------------------------------------------------------

/// A child that waits for `$D/go`, then writes `n` numbered lines (~100 bytes each) on stdout
/// as fast as it can, recording its progress in `$D/count` every 100 lines (each after the
/// lines are in the pipe: a full pipe holds the count back).
fn writer_script(n: usize) -> String {
    format!(
        r#"while [ ! -e "$D/go" ]; do sleep 0.02; done; exec awk -v n={n} 'BEGIN {{ f = ENVIRON["D"] "/count"; pad = sprintf("%090d", 0); for (i = 1; i <= n; i++) {{ printf "line %d %s\n", i, pad; if (i % 100 == 0 || i == n) {{ fflush(); print i > f; close(f) }} }} }}'"#
    )
}

fn line(i: usize) -> String {
    format!("line {i} {}", "0".repeat(90))
}

fn progress(ep: &Entrypoint) -> usize {
    ep.file("count")
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the child's progress stops changing for a while; returns where it stopped (or
/// `n` if it finished).
fn progress_settles(ep: &Entrypoint, n: usize) -> usize {
    let mut last = (progress(ep), Instant::now());
    wait_for("the child's progress to finish or stop", || {
        let p = progress(ep);
        if p == n {
            return Some(p);
        }
        if p != last.0 {
            last = (p, Instant::now());
            return None;
        }
        (p > 0 && last.1.elapsed() > Duration::from_millis(1500)).then_some(p)
    })
}

fn stop(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own test server's pid.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The app writes ~500 KB while the server is SIGSTOPped; returns where its progress settled
/// while the server was stopped, the stored rows, and the entrypoint's stdout.
fn write_under_a_stalled_server(
    mode: Option<&str>,
    n: usize,
) -> Option<(usize, Vec<Value>, String, Option<i32>)> {
    let server = Server::start(&[]);
    // The smallest buffer allowed: the app must outrun it many times over.
    let mut b = Builder::new(&server, "blk", &writer_script(n)).env("WAYPOST_LOG_BUFFER", "64KiB");
    if let Some(m) = mode {
        b = b.env("WAYPOST_LOG_MODE", m);
    }
    let mut ep = b.spawn()?;
    let id = ep.instance(&server)["id"].as_str().unwrap().to_string();
    stop(server.pid(), libc::SIGSTOP);
    std::fs::write(ep.dir.join("go"), "").unwrap();
    let settled = progress_settles(&ep, n);
    stop(server.pid(), libc::SIGCONT);
    let code = ep.wait().code();
    let rows = logs_json(&server, "blk", &["--instance", &id]);
    Some((settled, rows, ep.stdout(), code))
}

#[test]
fn block_mode_makes_the_app_wait_for_a_stalled_server_and_loses_nothing() {
    // 2 MB: ten times what the 64 KiB buffer, the relay and the pipe hold together.
    let n = 20_000;
    let Some((settled, rows, stdout, code)) = write_under_a_stalled_server(Some("block"), n) else {
        return;
    };
    assert!(
        settled < n,
        "the app was held back while the server was stopped ({settled} of {n} lines)"
    );
    assert_eq!(code, Some(0));
    let want: Vec<String> = (1..=n).map(line).collect();
    assert_eq!(markers(&rows), 0, "no drop marker");
    assert_eq!(
        stdout_lines(&rows),
        want,
        "every line stored, in order, once"
    );
    // The entrypoint's own stdout copy is byte for byte (only later).
    let want_out: String = want.iter().map(|l| format!("{l}\n")).collect();
    assert!(
        stdout == want_out,
        "stdout differs ({} bytes, want {})",
        stdout.len(),
        want_out.len()
    );
}

#[test]
fn drop_mode_under_the_same_stall_never_blocks_and_reports_drops() {
    // Negative control for the test above: the default mode lets the app run on and drops. In
    // drop mode lines leave as fast as the connection takes them, so a loss needs more output
    // than the TCP buffers towards the stopped server hold (a few MB): 20 MB.
    let n = 200_000;
    let Some((settled, rows, stdout, code)) = write_under_a_stalled_server(None, n) else {
        return;
    };
    assert_eq!(settled, n, "the app ran to the end with the server stopped");
    assert_eq!(code, Some(0));
    assert!(markers(&rows) > 0, "the loss is recorded as a drop marker");
    assert!(stdout_lines(&rows).len() < n);
    assert_eq!(
        stdout.lines().count(),
        n,
        "the local copy is complete either way"
    );
}

#[test]
fn block_mode_an_app_that_exits_while_the_server_is_stalled_gets_the_flush_timeout_and_a_whole_local_copy()
 {
    // ~150 KB: more than the 64 KiB buffer, less than the buffer, the relay and the pipe
    // together, so the app's writes all complete and it exits while its last lines still wait
    // (in the pipe) for the stopped server.
    let n = 1500;
    let script = writer_script(n);
    let want: Vec<String> = (1..=n).map(line).collect();
    let want_out: String = want.iter().map(|l| format!("{l}\n")).collect();
    for (flush, resume_after) in [("10s", Some(Duration::from_millis(500))), ("1s", None)] {
        let server = Server::start(&[]);
        let Some(mut ep) = Builder::new(&server, "blk", &script)
            .env("WAYPOST_LOG_BUFFER", "64KiB")
            .env("WAYPOST_LOG_MODE", "block")
            .env("WAYPOST_FLUSH_TIMEOUT", flush)
            .spawn()
        else {
            return;
        };
        let id = ep.instance(&server)["id"].as_str().unwrap().to_string();
        stop(server.pid(), libc::SIGSTOP);
        std::fs::write(ep.dir.join("go"), "").unwrap();
        wait_for("the app to finish writing (it exits right after)", || {
            (progress(&ep) == n).then_some(())
        });
        match resume_after {
            Some(d) => {
                // The server comes back within the flush timeout: every line is stored.
                std::thread::sleep(d);
                assert!(ep.running(), "the entrypoint waits for the server");
                stop(server.pid(), libc::SIGCONT);
                assert_eq!(ep.wait().code(), Some(0));
                let rows = logs_json(&server, "blk", &["--instance", &id]);
                assert_eq!(
                    stdout_lines(&rows),
                    want,
                    "flush {flush}: every line stored"
                );
                assert_eq!(markers(&rows), 0);
            }
            None => {
                // It does not: the entrypoint gives up at the deadline, but what the server
                // never took still reaches our stdout.
                assert_eq!(ep.wait().code(), Some(0));
                stop(server.pid(), libc::SIGCONT);
                let rows = logs_json(&server, "blk", &["--instance", &id]);
                assert!(
                    stdout_lines(&rows).len() < n,
                    "(the server really was away)"
                );
            }
        }
        assert!(
            ep.stdout() == want_out,
            "flush {flush}: the local copy is whole ({} bytes of {})",
            ep.stdout().len(),
            want_out.len()
        );
    }
}
