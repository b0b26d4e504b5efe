//! Logs end to end: the real server, the real entrypoint, real children (sh), and
//! `waypost logs` reading what was stored.

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// `waypost logs --app APP -o json ARGS...` as a list of rows.
fn logs_json(server: &Server, app: &str, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["logs", "--app", app, "-o", "json"];
    a.extend_from_slice(args);
    let r = server.cli(&a).ok();
    r.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn data(row: &Value) -> Vec<u8> {
    let b64 = row["data_b64"]
        .as_str()
        .unwrap_or_else(|| panic!("not a line (a loss marker?): {row}"));
    waypost::util::base64_decode(b64).unwrap()
}

/// Texts of the stored lines of `stream`, in order.
fn texts(rows: &[Value], stream: &str) -> Vec<String> {
    rows.iter()
        .filter(|r| r["stream"] == stream)
        .map(|r| String::from_utf8(data(r)).unwrap())
        .collect()
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

/// Waits until the app's logs hold a stdout line equal to `last`; returns all rows.
fn wait_for_line(server: &Server, app: &str, last: &str, ep: &Entrypoint) -> Vec<Value> {
    wait_for(&format!("{last:?} in the logs\n{}", ep.stderr()), || {
        let rows = logs_json(server, app, &[]);
        rows.iter()
            .any(|r| r["stream"] == "stdout" && data(r) == last.as_bytes())
            .then_some(rows)
    })
}

fn spawn(b: Builder) -> Option<Entrypoint> {
    b.spawn()
}

#[test]
fn every_line_arrives_on_its_stream_in_order_and_passthrough_is_identical() {
    let server = Server::start(&[]);
    let n = 2000;
    let script = format!(
        r#"i=1; while [ $i -le {n} ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done"#
    );
    let Some(mut ep) = spawn(Builder::new(&server, "web", &script)) else {
        return;
    };
    assert!(ep.wait().success());
    let rows = logs_json(&server, "web", &[]);
    assert_eq!(texts(&rows, "stdout"), numbered("out", n));
    assert_eq!(texts(&rows, "stderr"), numbered("err", n));
    assert!(
        rows.iter().all(|r| r.get("dropped").is_none()),
        "nothing dropped"
    );

    // Passthrough at the same time: stdout byte for byte; stderr too, around the entrypoint's
    // own lines.
    let want_out: String = numbered("out", n)
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(ep.stdout(), want_out);
    let err: Vec<String> = ep
        .stderr()
        .lines()
        .filter(|l| !l.starts_with("[waypost]"))
        .map(str::to_string)
        .collect();
    assert_eq!(err, numbered("err", n));

    // --stream and --tail.
    let tail = logs_json(&server, "web", &["--stream", "stderr", "--tail", "3"]);
    assert_eq!(texts(&tail, "stderr"), ["err 1998", "err 1999", "err 2000"]);
    assert_eq!(tail.len(), 3);
}

#[test]
fn a_crashing_apps_last_lines_are_kept() {
    let server = Server::start(&[]);
    let script = r#"i=1; while [ $i -le 50 ]; do echo "last words $i"; i=$((i+1)); done; echo "fatal: giving up" >&2; exit 3"#;
    let Some(mut ep) = spawn(Builder::new(&server, "web", script)) else {
        return;
    };
    let t0 = Instant::now();
    assert_eq!(ep.wait().code(), Some(3));
    eprintln!("entrypoint ran and exited in {:?}", t0.elapsed());
    let rows = logs_json(&server, "web", &[]);
    assert_eq!(texts(&rows, "stdout"), numbered("last words", 50));
    assert_eq!(texts(&rows, "stderr"), ["fatal: giving up"]);
    // Logs outlive the instance: it is gone, its lines stay (and survive a restart below).
    let (_, env) = server.terminate();
    let server = Server::start_in(env, &[]);
    let rows = logs_json(&server, "web", &[]);
    assert_eq!(texts(&rows, "stdout").len(), 50);
}

/// A child printing `line 1..=n`, one every `gap` seconds, then idling.
fn steady(n: usize, gap: &str) -> String {
    format!(
        r#"i=1; while [ $i -le {n} ]; do echo "line $i"; i=$((i+1)); sleep {gap}; done; exec sleep 1000"#
    )
}

#[test]
fn a_server_killed_mid_stream_loses_nothing_when_the_outage_fits_the_buffer() {
    let server = Server::start(&[]);
    let control = server.control_addr.clone();
    let n = 600;
    let Some(ep) = spawn(Builder::new(&server, "web", &steady(n, "0.005"))) else {
        return;
    };
    wait_for_line(&server, "web", "line 20", &ep);
    let env = server.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let server = Server::start_in(env, &["--control-addr", &control]);
    let rows = wait_for_line(&server, "web", &format!("line {n}"), &ep);
    assert_eq!(
        texts(&rows, "stdout"),
        numbered("line", n),
        "every line, once, in order"
    );
    assert!(rows.iter().all(|r| r.get("dropped").is_none()));
}

#[test]
fn with_a_tiny_buffer_the_dropped_count_is_exactly_the_missing_lines() {
    let server = Server::start(&[]);
    let control = server.control_addr.clone();
    let n = 500;
    // Lines padded to ~1.5 KiB, so the smallest buffer allowed (64 KiB) holds only ~43 of them.
    let script = format!(
        r#"P=x; k=0; while [ $k -lt 1500 ]; do P=${{P}}x; k=$((k+1)); done
i=1; while [ $i -le {n} ]; do echo "line $i $P"; i=$((i+1)); sleep 0.01; done; exec sleep 1000"#
    );
    let Some(ep) = spawn(
        Builder::new(&server, "web", &script)
            .env("WAYPOST_LOG_BUFFER", "64KiB")
            // No own lines: every entry is a numbered child line, so seq = number - 1.
            .env("WAYPOST_LOG_LEVEL", "ERROR"),
    ) else {
        return;
    };
    let wait_for_numbered = |server: &Server, k: usize| {
        let prefix = format!("line {k} ");
        wait_for(&format!("{prefix:?} in the logs\n{}", ep.stderr()), || {
            let rows = logs_json(server, "web", &[]);
            rows.iter()
                .any(|r| {
                    r["stream"] == "stdout"
                        && r.get("data_b64").is_some()
                        && data(r).starts_with(prefix.as_bytes())
                })
                .then_some(rows)
        })
    };
    wait_for_numbered(&server, 10);
    let env = server.kill();
    // ~150 lines of output while away, far more than 64 KiB holds (~43 entries).
    std::thread::sleep(Duration::from_millis(1500));
    let server = Server::start_in(env, &["--control-addr", &control]);
    let rows = wait_for_numbered(&server, n);

    let mut stored = BTreeSet::new();
    let mut dropped = 0u64;
    let mut covered = BTreeSet::new();
    for r in &rows {
        let seq = r["seq"].as_u64().unwrap();
        match r.get("dropped").and_then(Value::as_u64) {
            Some(d) => {
                dropped += d;
                for s in seq..seq + d {
                    assert!(covered.insert(s), "seq {s} counted twice");
                }
            }
            None => {
                assert_eq!(r["stream"], "stdout");
                let line = String::from_utf8(data(r)).unwrap();
                let num = line.strip_prefix("line ").unwrap();
                let num: u64 = num.split(' ').next().unwrap().parse().unwrap();
                assert_eq!(seq, num - 1, "entry seq matches the line number");
                assert!(stored.insert(num), "line {num} stored twice");
                assert!(covered.insert(seq), "seq {seq} both stored and dropped");
            }
        }
    }
    let missing = n as u64 - stored.len() as u64;
    eprintln!(
        "stored {} lines, {missing} missing, dropped markers say {dropped}",
        stored.len()
    );
    assert!(missing > 0, "the outage should overflow a 64 KiB buffer");
    assert_eq!(
        dropped, missing,
        "the dropped count is exactly the number of missing lines"
    );
    assert_eq!(
        covered.len() as u64,
        n as u64,
        "every sequence number accounted for"
    );
    // The marker shows in the text output and in --stats.
    let text = server.cli(&["logs", "--app", "web"]).ok().stdout;
    assert!(text.contains(" lines dropped]"), "{text}");
    let stats = server
        .cli(&["logs", "--app", "web", "--stats", "-o", "json"])
        .ok()
        .json();
    assert_eq!(stats["instances"][0]["lost"].as_u64(), Some(dropped));
}

#[test]
fn a_one_mib_line_arrives_in_flagged_pieces_that_concatenate_to_it() {
    let server = Server::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    // Every byte value except the newline, so the pieces must be exact (not UTF-8).
    let mut x: u32 = 12345;
    let big: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            match (x >> 16) as u8 {
                b'\n' => b'n',
                b => b,
            }
        })
        .collect();
    let path = tmp.path().join("big");
    std::fs::write(&path, &big).unwrap();
    let Some(mut ep) = spawn(
        Builder::new(&server, "web", r#"cat "$BIG"; echo; echo after"#)
            .env("BIG", &path.display().to_string())
            // The whole line (16 pieces of 64 KiB plus headers) must fit the resend buffer while
            // unacknowledged; the default 1 MiB is a few bytes short of that.
            .env("WAYPOST_LOG_BUFFER", "4MiB"),
    ) else {
        return;
    };
    assert!(ep.wait().success());
    let rows = logs_json(&server, "web", &["--stream", "stdout"]);
    let pieces: Vec<&Value> = rows.iter().filter(|r| data(r) != b"after").collect();
    assert!(
        pieces.len() >= 16,
        "split into pieces of at most 64 KiB: {}",
        pieces.len()
    );
    let mut joined = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        assert_eq!(
            p["truncated"], !last,
            "piece {i}: all but the last are flagged"
        );
        assert!(data(p).len() <= 64 * 1024);
        joined.extend(data(p));
    }
    assert!(joined == big, "the pieces concatenate to the original line");
    let mut want = big.clone();
    want.extend_from_slice(b"\nafter\n");
    assert!(
        std::fs::read(ep.dir.join("stdout")).unwrap() == want,
        "passthrough byte-identical"
    );
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Runs a flood of `bytes` of 64-byte lines through an entrypoint once `$D/go` exists; returns
/// (the child's own seconds for writing it, the entrypoint's RSS before and at its peak, KiB).
fn flood(ep: &Entrypoint, bytes: usize, before_go: impl FnOnce()) -> (f64, u64, u64) {
    wait_for("the child to wait for go", || ep.file("ready"));
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = vm_rss_kib(ep.pid()).unwrap();
    before_go();
    std::fs::write(ep.dir.join("go"), "").unwrap();
    let mut peak = rss0;
    let t = wait_for(
        &format!("the flood of {bytes} bytes to be written\n{}", ep.stderr()),
        || {
            peak = peak.max(vm_rss_kib(ep.pid()).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(10));
            ep.file("elapsed").filter(|s| s.ends_with('\n'))
        },
    );
    let ns: f64 = t.trim().parse().unwrap();
    (ns / 1e9, rss0, peak)
}

#[test]
fn a_stalled_server_slows_neither_the_app_nor_passthrough_and_memory_stays_capped() {
    let server = Server::start(&[]);
    let bytes = 20_000_000;
    let script = format!(
        r#"touch "$D/ready"; while [ ! -e "$D/go" ]; do sleep 0.02; done
t0=$(date +%s%N); yes 'a log line of sixty-four bytes, give or take a few, for the test' | head -c {bytes}; t1=$(date +%s%N)
echo $((t1 - t0)) > "$D/elapsed"; exec sleep 1000"#
    );
    let want: Vec<u8> = b"a log line of sixty-four bytes, give or take a few, for the test\n"
        .iter()
        .copied()
        .cycle()
        .take(bytes)
        .collect();

    // Reference: the same flood with the server reading.
    let Some(healthy) =
        spawn(Builder::new(&server, "ref", &script).env("WAYPOST_LOG_BUFFER", "1MiB"))
    else {
        return;
    };
    healthy.instance(&server);
    let (t_ok, _, _) = flood(&healthy, bytes, || {});
    drop(healthy);

    // The server stops reading (SIGSTOP) before the flood starts.
    let Some(ep) = spawn(Builder::new(&server, "web", &script).env("WAYPOST_LOG_BUFFER", "1MiB"))
    else {
        return;
    };
    ep.instance(&server);
    let pid = server.pid() as i32;
    let (t_stalled, rss0, peak) = flood(&ep, bytes, || {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    });
    let out = std::fs::read(ep.dir.join("stdout")).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    eprintln!(
        "flood of {} MB: {t_ok:.2}s with the server reading, {t_stalled:.2}s with it stopped \
         ({:.0} and {:.0} MB/s); entrypoint RSS {rss0} KiB before, {peak} KiB at peak (+{} KiB)",
        bytes / 1_000_000,
        bytes as f64 / 1e6 / t_ok,
        bytes as f64 / 1e6 / t_stalled,
        peak - rss0
    );
    assert!(
        out == want,
        "passthrough byte-identical ({} of {bytes} bytes)",
        out.len()
    );
    assert!(
        t_stalled < 4.0 * t_ok + 3.0,
        "the stalled server slowed the app: {t_stalled:.2}s vs {t_ok:.2}s"
    );
    // The log buffer is 1 MiB; what else the entrypoint holds is bounded too (TLS records, one
    // batch being encoded). Without a cap it would hold all 20 MB.
    assert!(
        peak - rss0 < 1024 + 3 * 1024,
        "RSS grew by {} KiB",
        peak - rss0
    );

    // Once the server reads again, the loss is reported, not hidden.
    wait_for("a dropped marker after the stall", || {
        logs_json(&server, "web", &[])
            .iter()
            .find_map(|r| r.get("dropped").and_then(Value::as_u64))
    });
}

#[test]
fn follow_shows_lines_of_instances_that_start_later() {
    let server = Server::start(&[]);
    // An earlier instance: with --tail 1 only its last line is shown before following.
    let Some(mut early) = spawn(
        Builder::new(&server, "web", "echo early 1; echo early 2; echo early 3")
            .env("WAYPOST_LOG_LEVEL", "ERROR"),
    ) else {
        return;
    };
    assert!(early.wait().success());
    let mut follower = server
        .env
        .command()
        .args(["logs", "--app", "web", "-f", "--tail", "1", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The follower is running (and has nothing to show) before the instance exists.
    std::thread::sleep(Duration::from_millis(500));
    assert!(follower.try_wait().unwrap().is_none());
    let Some(_ep) = spawn(Builder::new(
        &server,
        "web",
        r#"echo "hello from later"; exec sleep 1000"#,
    )) else {
        let _ = follower.kill();
        return;
    };
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["stream"] == "stdout" && data(&v) == b"hello from later" {
                    break true;
                }
                seen.push(line);
            }
            Err(_) => break false,
        }
    };
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(found, "the follower showed: {seen:?}");
    let before: Vec<Vec<u8>> = seen
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["stream"] == "stdout")
        .map(|v| data(&v))
        .collect();
    assert_eq!(
        before,
        [b"early 3".to_vec()],
        "the tail, then the new instance's lines"
    );
}

#[test]
fn text_output_instance_prefix_and_non_utf8() {
    let server = Server::start(&[]);
    let script = r#"printf 'plain\n'; printf 'bad \377\376 bytes\n'; echo "on stderr" >&2; printf 'no newline'; sleep 1; exit 0"#;
    let Some(mut a) = spawn(Builder::new(&server, "web", script)) else {
        return;
    };
    let id = a.instance(&server)["id"].as_str().unwrap().to_string();
    assert!(a.wait().success());
    let Some(mut b) = spawn(Builder::new(&server, "web", "echo other instance")) else {
        return;
    };
    assert!(b.wait().success());

    // --instance takes a unique prefix of the id.
    let prefix = &id[..6];
    let rows = logs_json(&server, "web", &["--instance", prefix]);
    assert!(rows.iter().all(|r| r["instance"] == id.as_str()));
    let out: Vec<Vec<u8>> = rows
        .iter()
        .filter(|r| r["stream"] == "stdout")
        .map(data)
        .collect();
    assert_eq!(out, [&b"plain"[..], b"bad \xff\xfe bytes", b"no newline"]);
    // A partial line shipped at the idle timeout is flagged as not ending a line... unless the
    // stream closed after it; either way it is there. The JSON has a lossy text too.
    let bad = rows.iter().find(|r| data(r).starts_with(b"bad")).unwrap();
    assert_eq!(bad["text"], "bad \u{fffd}\u{fffd} bytes");

    // Text: timestamp, short id, stream, line; bytes that are not UTF-8 escaped.
    let text = server
        .cli(&["logs", "--app", "web", "--instance", prefix])
        .ok()
        .stdout;
    let line = text.lines().find(|l| l.contains("bad ")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(waypost::util::parse_rfc3339(fields[0]).is_some(), "{line}");
    assert_eq!(fields[1], &id[..8]);
    assert_eq!(fields[2], "stdout");
    assert!(line.ends_with("bad \\xff\\xfe bytes"), "{line}");
    assert!(
        !text.contains('\x1b'),
        "no colours when stdout is not a terminal"
    );
    assert!(text.contains("stderr") && text.contains("on stderr"));

    // Both instances without --instance; errors are one clear line.
    let all = logs_json(&server, "web", &[]);
    assert!(all.iter().any(|r| data(r) == b"other instance"));
    server
        .cli(&["logs", "--app", "web", "--instance", "zz"])
        .fails();
    let r = server
        .cli(&["logs", "--app", "web", "--instance", "0000000000"])
        .fails();
    assert!(r.stderr.contains("no instance"), "{}", r.stderr);
    let r = server.cli(&["logs", "--app", "nope"]).fails();
    assert!(r.stderr.contains("no app named nope"), "{}", r.stderr);

    // --since: everything is recent; a far-past cut-off keeps all, a future one keeps none.
    assert_eq!(
        logs_json(&server, "web", &["--since", "1h"]).len(),
        all.len()
    );
    assert!(logs_json(&server, "web", &["--since", "2999-01-01T00:00:00Z"]).is_empty());
}

#[test]
fn retention_prunes_the_oldest_lines_per_app() {
    let server = Server::start(&[]);
    server.create_app("web");
    let r = server
        .cli(&["app", "set", "web", "--log-lines", "100"])
        .ok();
    assert!(r.stdout.contains("at most 100 lines"), "{}", r.stdout);
    let Some(mut ep) = spawn(
        Builder::new(
            &server,
            "web",
            r#"i=1; while [ $i -le 300 ]; do echo "line $i"; i=$((i+1)); done"#,
        )
        .env("WAYPOST_LOG_LEVEL", "ERROR"),
    ) else {
        return;
    };
    assert!(ep.wait().success());
    let rows = wait_for("pruning down to the limit", || {
        let rows = logs_json(&server, "web", &[]);
        (rows.len() <= 100).then_some(rows)
    });
    let t = texts(&rows, "stdout");
    assert_eq!(
        t.last().map(String::as_str),
        Some("line 300"),
        "the newest are kept"
    );
    assert!(t.len() >= 50, "{}", t.len());
    let stats = server
        .cli(&["logs", "--app", "web", "--stats", "-o", "json"])
        .ok()
        .json();
    assert_eq!(stats["usage"]["lines"].as_u64(), Some(rows.len() as u64));
}

#[test]
fn lines_stored_one_row_each_before_chunks_are_served_after_an_upgrade() {
    // A database upgraded from the build that stored a row per line: its rows are still in
    // log_lines when the new server starts.
    if backend() == "postgres" {
        eprintln!(
            "skipped on postgres: only SQLite databases predate log chunks (the build that \
             stored a row per line had no PostgreSQL backend)"
        );
        return;
    }
    let server = Server::start(&[]);
    server.create_app("web");
    let env = server.kill();
    let old_id = "ab".repeat(16);
    {
        let c = rusqlite::Connection::open(env.data_dir().join("waypost.db")).unwrap();
        c.execute(
            "INSERT INTO log_sources (id, instance, app, next_seq) VALUES (7, ?1, 'web', 3)",
            [&old_id],
        )
        .unwrap();
        let now_us = waypost::util::now_ms() * 1000;
        for (id, stream, text) in [(1, 0, "old 1"), (2, 1, "old err"), (3, 0, "old 2")] {
            c.execute(
                "INSERT INTO log_lines (id, app, src, seq, stream, ts_us, data)
                 VALUES (?1, 'web', 7, ?1 - 1, ?2, ?3, ?4)",
                rusqlite::params![id, stream, now_us - 1000 + id, text.as_bytes()],
            )
            .unwrap();
        }
        c.execute("INSERT INTO log_usage VALUES ('web', 3, 17)", [])
            .unwrap();
    }
    let server = Server::start_in(env, &[]);
    let rows = logs_json(&server, "web", &[]);
    let got: Vec<(i64, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap(),
                r["stream"].as_str().unwrap().to_string(),
                String::from_utf8(data(r)).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, "stdout".into(), "old 1".into()),
            (2, "stderr".into(), "old err".into()),
            (3, "stdout".into(), "old 2".into()),
        ]
    );
    assert!(rows.iter().all(|r| r["instance"] == old_id.as_str()));
    let err = logs_json(
        &server,
        "web",
        &["--stream", "stderr", "--instance", "abab"],
    );
    assert_eq!(texts(&err, "stderr"), ["old err"]);
    assert_eq!(err.len(), 1);
    let tail = logs_json(&server, "web", &["--tail", "1", "--since", "1h"]);
    assert_eq!(texts(&tail, "stdout"), ["old 2"]);
    // New lines come after them, with higher ids.
    let Some(mut ep) =
        spawn(Builder::new(&server, "web", "echo new line").env("WAYPOST_LOG_LEVEL", "ERROR"))
    else {
        return;
    };
    assert!(ep.wait().success());
    let rows = wait_for_line(&server, "web", "new line", &ep);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows[3]["id"].as_i64().unwrap() > 3);
    let stats = server
        .cli(&["logs", "--app", "web", "--stats", "-o", "json"])
        .ok()
        .json();
    assert_eq!(stats["usage"]["lines"].as_u64(), Some(4));
    // Moved once: another restart serves the same rows, none twice.
    let server = Server::start_in(server.kill(), &[]);
    assert_eq!(logs_json(&server, "web", &[]), rows);
}

/// A scripted control server for one entrypoint: TLS with a fresh CA, the real frame codec.
mod scripted {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use waypost_proto::{self as proto, Frame, Kind};

    pub struct Peer {
        pub stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        buf: Vec<u8>,
    }

    impl Peer {
        pub async fn recv(&mut self) -> Option<Kind> {
            loop {
                let mut rest = &self.buf[..];
                if let Some(r) = proto::decode(&mut rest) {
                    let used = self.buf.len() - rest.len();
                    self.buf.drain(..used);
                    return r.expect("a valid frame").kind;
                }
                let mut chunk = [0u8; 16384];
                match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return None,
                    Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(_) => panic!("timed out waiting for a frame"),
                }
            }
        }

        pub async fn send(&mut self, kind: Kind) {
            let mut out = Vec::new();
            proto::encode(&Frame::from(kind), &mut out).unwrap();
            self.stream.write_all(&out).await.unwrap();
            self.stream.flush().await.unwrap();
        }

        /// Reads the Hello and answers with a Welcome saying the server has every log entry
        /// below `acked`.
        pub async fn welcome(&mut self, acked: u64) -> proto::Hello {
            let hello = match self.recv().await {
                Some(Kind::Hello(h)) => h,
                other => panic!("expected Hello, got {other:?}"),
            };
            self.send(Kind::Welcome(proto::Welcome {
                protocol_version: proto::PROTOCOL_VERSION,
                heartbeat_interval_ms: 15_000,
                app: "web".into(),
                log_acked_seq: acked,
                ..Default::default()
            }))
            .await;
            hello
        }

        /// The next LogBatch (skipping other frames).
        pub async fn batch(&mut self) -> proto::LogBatch {
            loop {
                match self.recv().await {
                    Some(Kind::LogBatch(b)) => return b,
                    Some(_) => continue,
                    None => panic!("connection closed before a LogBatch"),
                }
            }
        }
    }

    pub struct FakeServer {
        pub listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        pub ca_pem: String,
        _dir: tempfile::TempDir,
    }

    impl FakeServer {
        pub async fn new() -> FakeServer {
            let dir = tempfile::tempdir().unwrap();
            let st = waypost::server::store::Store::open(
                &waypost::server::store::Location::Sqlite(dir.path().join("pki.db")),
            )
            .unwrap();
            let sans = waypost::server::pki::wanted_sans(&[]);
            let pki = st
                .with(|c| waypost::server::pki::load_or_create(c, &sans))
                .unwrap();
            let cfg = waypost::server::pki::server_config(&pki, &[proto::ALPN]).unwrap();
            FakeServer {
                listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
                acceptor: tokio_rustls::TlsAcceptor::from(cfg),
                ca_pem: pki.ca_pem,
                _dir: dir,
            }
        }

        pub async fn accept(&self) -> Peer {
            let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept())
                .await
                .expect("the entrypoint to connect")
                .unwrap();
            Peer {
                stream: self.acceptor.accept(tcp).await.unwrap(),
                buf: Vec::new(),
            }
        }
    }
}

/// The resend contract across a reconnect, against a scripted server: entries sent on a
/// connection that died before acknowledging them are sent again, from the point the new
/// Welcome names, before anything newer. (Regression: the entrypoint used to write a batch on the
/// new connection before it had processed the Welcome, so the unacknowledged entries were skipped
/// and the server had to record them as lost.)
#[tokio::test]
async fn unacknowledged_entries_are_resent_first_after_a_reconnect() {
    let fake = scripted::FakeServer::new().await;
    let addr = fake.listener.local_addr().unwrap().to_string();
    let Some(_ep) = spawn(
        Builder::bare(&addr, "wpe_fake", &fake.ca_pem, &steady(100_000, "0.01"))
            .env("WAYPOST_LOG_LEVEL", "ERROR"),
    ) else {
        return;
    };
    // First connection: take batches, acknowledge none, then drop it.
    let mut first = fake.accept().await;
    first.welcome(0).await;
    let b = first.batch().await;
    assert_eq!(b.first_seq, 0);
    let b2 = first.batch().await;
    assert!(b2.first_seq > 0, "a second batch was sent unacknowledged");
    drop(first);
    // Entries pile up while the entrypoint backs off, so a batch is due the moment the next
    // Welcome arrives.
    let mut second = fake.accept().await;
    second.welcome(0).await;
    let b = second.batch().await;
    assert_eq!(
        b.first_seq, 0,
        "the first batch on the new connection starts where the Welcome said"
    );
    assert_eq!(b.dropped, 0);
}
