//! Replicas on one PostgreSQL database, end to end: a throwaway cluster per test (so these run
//! with or without `WAYPOST_TEST_DATABASE`), two real `waypost server run` processes on one
//! database, each with its own data dir and `--peer-addr 127.0.0.1:0`, the REAL entrypoint with
//! real children, and the real CLI pointed at either replica (each Env's own context file).
//!
//! What is checked: an instance held by replica A is listed, logged, exec'd, reached by URL and
//! reconfigured through replica B (the one hop to A's peer listener); the hop refuses strangers;
//! an entrypoint moves to B when A dies, with its child untouched and its lines kept; a restarted
//! replica rejoins and entrypoints spread over both; a dead replica's instances are marked lost
//! by the other after the lease; a database outage is answered with 503 and survived.
//!
//! Needs the PostgreSQL binaries (Debian: `postgresql`), the entrypoint binary and python3 (for
//! the test app); without the latter two a test prints SKIPPED and passes.

use crate::apps::{self, start_app};
use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::{Env, Run, Server, wait_for};
use serde_json::Value;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use waypost_testkit::pg::Cluster;

/// Instance heartbeats every 300 ms (child pids and states show up quickly); a peer listener on
/// a free port.
const FLAGS: &[&str] = &[
    "--heartbeat-interval",
    "300ms",
    "--peer-addr",
    "127.0.0.1:0",
];

/// How long a replica's lease takes to run out and be acted on: 9 s without beats, acted on by a
/// replica itself healthy for 9 s, found on its next beat (3 s). Waits for it allow twice that.
const LEASE_WAIT: Duration = Duration::from_secs(45);

/// A cluster with one database and replicas A and B on it (A first: it mints the CA).
fn two_replicas() -> (Cluster, String, Server, Server) {
    let pg = Cluster::start();
    let url = pg.create_database();
    let a = Server::start_in(Env::with_database(&url), FLAGS);
    let b = Server::start_in(Env::with_database(&url), FLAGS);
    (pg, url, a, b)
}

/// `server members -o json` on `server`.
fn members(server: &Server) -> Vec<Value> {
    server.cli(&["server", "members", "-o", "json"]).ok().json()["members"]
        .as_array()
        .expect("members array")
        .clone()
}

/// The row `server` lists for itself.
fn me(server: &Server) -> Value {
    let all = members(server);
    let mine: Vec<_> = all.iter().filter(|m| m["self"] == true).collect();
    assert_eq!(mine.len(), 1, "{all:?}");
    mine[0].clone()
}

/// The replica id of `server`.
fn replica_id(server: &Server) -> String {
    me(server)["id"].as_str().unwrap().to_string()
}

/// The peer address `server` advertises.
fn peer_addr(server: &Server) -> String {
    me(server)["peer_addr"]
        .as_str()
        .expect("a peer address")
        .to_string()
}

/// The instance with hex id `id` as `server` lists it (`--all`: also ended ones).
fn listed(server: &Server, id: &str, all: bool) -> Option<Value> {
    server.instances(all).into_iter().find(|i| i["id"] == id)
}

/// The entrypoint's instance if `server` lists it live right now.
fn live_by_pid(server: &Server, e: &Entrypoint) -> Option<Value> {
    let pid = e.pid();
    server
        .instances(false)
        .into_iter()
        .find(|i| i["entrypoint_pid"] == pid && i["live"] == true)
}

/// Whether the process is running (not gone, not a zombie): a server that crashed stays an
/// unreaped zombie of ours.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// [`wait_for`] with its own bound, for waits that include a lease.
fn wait_long<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {bound:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Texts of the stored stdout lines of app `web`, as `server` serves them.
fn stored_lines(server: &Server) -> Vec<String> {
    let r = server
        .cli(&["logs", "--app", "web", "--stream", "stdout", "-o", "json"])
        .ok();
    r.stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|row| {
            let b = waypost::util::base64_decode(row["data_b64"].as_str()?)?;
            Some(String::from_utf8_lossy(&b).trim_end().to_string())
        })
        .collect()
}

/// Waits until `reader` serves a stdout line of app `web` starting with `line`; on timeout, says what
/// `writer` (the replica that stored it) serves, to tell "not stored" from "not visible here".
fn wait_stored(reader: &Server, writer: &Server, line: &str) {
    let deadline = Instant::now() + crate::common::WAIT;
    loop {
        let seen = stored_lines(reader);
        if seen.iter().any(|l| l.starts_with(line)) {
            return;
        }
        if Instant::now() > deadline {
            let at_writer = stored_lines(writer);
            panic!(
                "timed out after {:?} waiting for {line:?} in the logs served by one replica: \
                 it serves {} lines {seen:?}; the replica that stored them serves {} lines, \
                 {} that one",
                crate::common::WAIT,
                seen.len(),
                at_writer.len(),
                if at_writer.iter().any(|l| l.starts_with(line)) {
                    "including"
                } else {
                    "not"
                },
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Established TCP connections whose remote end is port `port` on loopback: the client ends of
/// open connections to a listener there.
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let want = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.get(2) == Some(&want.as_str()) && f.get(3) == Some(&"01"))
        .count()
}

/// One plain HTTP/1.1 GET to the app itself (not through waypost), so that it prints
/// `GET path` on its stdout: a log line on demand.
fn poke_app(port: u16, path: &str) {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    let _ = c.read_to_end(&mut resp);
    assert!(resp.starts_with(b"HTTP/1."), "the app answered: {resp:?}");
}

/// A child that prints `line N` (N = 1, 2, ...) every 50 ms and keeps the last N in `$D/count`.
const NUMBERED: &str = r#"
i=0
while :; do
  i=$((i+1)); echo "line $i"
  echo $i > "$D/count.tmp"; mv "$D/count.tmp" "$D/count"
  sleep 0.05
done
"#;

fn count(e: &Entrypoint) -> u64 {
    e.file("count")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the child's counter moves on by a few: it is running.
fn assert_counting(e: &Entrypoint) {
    let before = count(e);
    wait_for("the child's counter to keep advancing", || {
        (count(e) > before + 3).then_some(())
    });
}

// ---- a pseudo-terminal (as in exec.rs) ---------------------------------------------------------

/// A pseudo-terminal pair: (master, terminal side).
fn openpty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into our ints; the other pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fds we own.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: zeroed termios is a valid out-parameter; tcgetattr fills it, on a live fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

/// Everything read from the master side so far.
fn screen(master: &OwnedFd) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut f = std::fs::File::from(master.try_clone().unwrap());
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = f.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

// ---- the tests ---------------------------------------------------------------------------------

#[test]
fn an_instance_held_by_one_replica_is_served_through_the_other() {
    let (_pg, _url, a, b) = two_replicas();
    let (id_a, id_b) = (replica_id(&a), replica_id(&b));
    assert_ne!(id_a, id_b);
    assert_eq!(a.ca_pem(), b.ca_pem(), "one CA for the cluster");
    // The entrypoint knows A only.
    let Some(app) = start_app(&a, "web", &[]) else {
        return;
    };

    // Listed by B, as held by A.
    let inst = wait_for("B to list the instance held by A", || {
        listed(&b, &app.id, false)
    });
    assert_eq!(inst["replica"], id_a.as_str(), "{inst}");
    assert_eq!(inst["live"], true, "{inst}");
    let by_b = me(&b);
    assert_eq!(by_b["instances"], 0, "B holds nothing: {by_b}");

    // exec through B: stdout, stderr and the remote exit code.
    let r = b.cli(&[
        "exec",
        "--app",
        "web",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(r.code, Some(3), "stderr: {}", r.stderr);
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
    // By prefix, with stdin.
    let mut cmd = b.env.command();
    cmd.args(["exec", "--app", "web", "--instance", &app.id[..10], "-i"])
        .args(["--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through B\n")
        .unwrap();
    let r = Run::from_output(child.wait_with_output().unwrap());
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "through B\n"),
        "{}",
        r.stderr
    );
    // The sessions ran on A's instance: A opened them, B only relayed.
    assert!(
        a.logs().contains("exec session opening"),
        "A opened no session:\n{}",
        a.logs()
    );
    assert!(
        b.logs()
            .contains("exec session relayed to the holding replica")
            && !b.logs().contains("exec session opening"),
        "B did not relay:\n{}",
        b.logs()
    );

    // exec -t -i through B: a remote terminal, and its exit code.
    let (master, slave) = openpty(24, 80);
    let mut cmd = b.env.command();
    cmd.args(["exec", "--app", "web", "-t", "-i", "--", "sh"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    let mut tty_cli = cmd.spawn().unwrap();
    let shown = screen(&master);
    let mut keys = std::fs::File::from(master.try_clone().unwrap());
    wait_for("the CLI to put the terminal in raw mode", || {
        (lflag(&slave) & (libc::ECHO | libc::ICANON) == 0).then_some(())
    });
    // Quotes split the marker, so the echo of what we type never matches it.
    keys.write_all(b"tty; echo rem''ote\n").unwrap();
    let text = || String::from_utf8_lossy(&shown.lock().unwrap()).into_owned();
    wait_for("the remote shell's answer on the terminal", || {
        text().contains("remote\r\n").then_some(())
    });
    assert!(text().contains("/dev/pts/"), "{}", text());
    keys.write_all(b"exit 6\n").unwrap();
    let status = wait_for("the tty exec to end", || tty_cli.try_wait().unwrap());
    assert_eq!(status.code(), Some(6), "{}", text());

    // Its URL through B's ingress.
    let rt = apps::rt();
    let ingress_b = apps::ingress_addr(&b);
    let get = |path: &str| {
        rt.block_on(apps::get_once(&ingress_b, "web.localhost", path))
            .unwrap()
    };
    let (status, body, err) = get("/");
    assert_eq!(status, 200, "{body} {err}");
    assert!(body.starts_with("hello hi pid="), "{body}");
    // Twenty more visitors, one after another: B keeps its hop connection to A open and reuses
    // it (one or two stay open; negative controls: without the pool none stays open, and a pool
    // that did not reuse would hold one per request).
    for _ in 0..20 {
        assert_eq!(get("/").0, 200);
    }
    let hop_port = peer_addr(&a).rsplit_once(':').unwrap().1.parse().unwrap();
    let open = established_to(hop_port);
    assert!(
        (1..=3).contains(&open),
        "{open} open connections to A's peer port after 21 requests"
    );

    // `config set` through B: A's instance restarts its child with the new value.
    b.cli(&["config", "policy", "--app", "web", "--splay", "0"])
        .ok();
    b.cli(&["config", "set", "--app", "web", "GREETING=set-on-b"])
        .ok();
    wait_for("the new greeting through B's ingress", || {
        let (status, body, _) = rt
            .block_on(apps::get_once(&ingress_b, "web.localhost", "/"))
            .ok()?;
        (status == 200 && body.starts_with("hello set-on-b")).then_some(())
    });
    let r = b.cli(&["exec", "--app", "web", "--", "printenv", "GREETING"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "set-on-b\n"),
        "{}",
        r.stderr
    );
    let inst = listed(&b, &app.id, false).expect("still live");
    assert_eq!(inst["replica"], id_a.as_str(), "not moved: {inst}");

    // Its stored lines (written by A), read on B.
    let hello = format!("testapp listening on 127.0.0.1:{}", app.port);
    wait_stored(&b, &a, &hello);

    // `logs -f` on B shows a line the app prints after the follow started.
    let mut follower = b
        .env
        .command()
        .args([
            "logs", "--app", "web", "-f", "--tail", "1", "--stream", "stdout",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The tail line first: the follow is under way.
    let first = rx
        .recv_timeout(crate::common::WAIT)
        .expect("the tail line from `logs -f` on B");
    poke_app(app.port, "/after-the-follow-started");
    let deadline = Instant::now() + crate::common::WAIT;
    let mut seen = vec![first];
    let found = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("GET /after-the-follow-started") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(found, "`logs -f` on B showed only: {seen:?}");
}

#[test]
fn the_hop_refuses_strangers_and_the_api_refuses_unknown_instances_and_entrypoint_tokens() {
    let (_pg, _url, a, b) = two_replicas();
    let Some(app) = start_app(&a, "web", &[]) else {
        return;
    };
    wait_for("B to list the instance held by A", || {
        listed(&b, &app.id, false)
    });
    let rt = apps::rt();
    let admin = b.admin_token();
    let get = |client: &waypost::client::ApiClient| {
        rt.block_on(async {
            tokio::time::timeout(
                crate::common::WAIT,
                client.request(hyper::Method::GET, "/v1/instances", None),
            )
            .await
            .expect("an answer or an error, not a hang")
        })
    };

    // Negative control: this client (the admin token, the cluster CA, no client certificate)
    // is served by B's API listener.
    let (status, body) = get(&b.api(Some(&admin))).unwrap();
    assert_eq!(status, 200, "{body}");
    // A's peer listener requires a client certificate signed by the cluster CA.
    let peer_a = peer_addr(&a);
    let to_peer =
        waypost::client::ApiClient::new(&peer_a, Some(admin.clone()), &a.ca_pem()).unwrap();
    // Refused: an error, or (seen once in CI, under load) no answer at all — never an answer.
    let stranger = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            to_peer.request(hyper::Method::GET, "/v1/instances", None),
        )
        .await
    });
    if let Ok(Ok((status, body))) = stranger {
        panic!("the peer listener served a stranger: {status} {body}");
    }
    wait_for("A to log the refused peer handshake", || {
        a.logs()
            .contains("peer TLS handshake refused")
            .then_some(())
    });
    // Nor does it speak plain HTTP.
    let mut c = std::net::TcpStream::connect(&peer_a).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = c.write_all(
        format!("GET /v1/instances HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\r\n")
            .as_bytes(),
    );
    let mut resp = Vec::new();
    let _ = c.read_to_end(&mut resp);
    assert!(!resp.starts_with(b"HTTP/"), "plain HTTP answered: {resp:?}");

    // exec through B for an instance prefix that matches nothing on any replica.
    let r = b
        .cli(&[
            "exec",
            "--app",
            "web",
            "--instance",
            "ffffffffffff",
            "--",
            "true",
        ])
        .fails();
    assert!(
        r.stderr.contains("no live instance") && r.stderr.contains("ffffffffffff"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("404"), "{}", r.stderr);
    // An entrypoint token is not an admin token on B, also for A's instance.
    let token = b.entrypoint_token("web", None);
    for args in [
        &[
            "exec",
            "--app",
            "web",
            "--instance",
            &app.id[..10],
            "--",
            "true",
        ][..],
        &["instances", "--app", "web"][..],
        &["logs", "--app", "web"][..],
    ] {
        let out = b
            .env
            .command()
            .env("WAYPOST_ADMIN_TOKEN", &token)
            .args(args)
            .output()
            .unwrap();
        let r = Run::from_output(out).fails();
        assert!(
            r.stderr.contains("403") && r.stderr.contains("entrypoint token"),
            "{args:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn losing_a_replica_moves_the_instance_to_the_other_with_its_child_and_lines() {
    let (_pg, _url, a, b) = two_replicas();
    let (id_a, id_b) = (replica_id(&a), replica_id(&b));
    let list = format!("{},{}", a.control_addr, b.control_addr);
    let Some(mut e) = Builder::new(&a, "web", NUMBERED)
        .env("WAYPOST_SERVER", &list)
        .env("WAYPOST_LOG_LEVEL", "DEBUG")
        .spawn()
    else {
        return;
    };
    // It starts at a random entry; either replica's listing says which holds it.
    let inst = wait_for("the instance live", || live_by_pid(&b, &e));
    let id = inst["id"].as_str().unwrap().to_string();
    let on_a = inst["replica"] == id_a.as_str();
    assert!(on_a || inst["replica"] == id_b.as_str(), "{inst}");
    let (holder, other, other_id) = if on_a { (a, b, id_b) } else { (b, a, id_a) };
    let child_pid = wait_for("the child's pid in a heartbeat", || {
        live_by_pid(&other, &e).and_then(|i| i["child_pid"].as_u64())
    });
    assert_counting(&e);
    let before_kill = count(&e);
    // Stored by the holder (before the kill: nothing to resend for these).
    wait_for("lines written before the kill stored", || {
        stored_lines(&holder)
            .contains(&format!("line {before_kill}"))
            .then_some(())
    });

    let _gone = holder.kill();
    let moved = wait_for("the instance live on the other replica", || {
        live_by_pid(&other, &e).filter(|i| i["replica"] == other_id.as_str())
    });
    assert_eq!(moved["id"], id.as_str(), "the same instance id");
    let moved = wait_for("the child's pid on the new replica", || {
        live_by_pid(&other, &e).filter(|i| i["child_pid"].as_u64().is_some())
    });
    assert_eq!(
        moved["child_pid"].as_u64(),
        Some(child_pid),
        "the child was not restarted"
    );
    assert!(e.running());
    assert_counting(&e);

    // Every line up to one written after the move is stored: before, during and after.
    let after = count(&e) + 5;
    let lines = wait_for(&format!("line {after} stored"), || {
        let l = stored_lines(&other);
        l.contains(&format!("line {after}")).then_some(l)
    });
    let missing: Vec<u64> = (1..=after)
        .filter(|n| !lines.contains(&format!("line {n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "lines missing (killed at about line {before_kill}): {missing:?}"
    );
}

#[test]
fn a_restarted_replica_rejoins_and_new_entrypoints_spread_over_both() {
    let (_pg, _url, a, b) = two_replicas();
    let (old_a, id_b) = (replica_id(&a), replica_id(&b));
    let env_a = a.kill();
    let a = Server::start_in(env_a, FLAGS);
    let new_a = replica_id(&a);
    assert_ne!(new_a, old_a, "a new id per start");

    // B sees both up; the crashed A's row is gone or stale.
    wait_for(
        "B to list the new A and itself up, the old A not up",
        || {
            let list = members(&b);
            let state = |id: &str| {
                list.iter()
                    .find(|m| m["id"] == id)
                    .map(|m| m["state"].as_str().unwrap().to_string())
            };
            let up = list.iter().filter(|m| m["state"] == "up").count();
            (up == 2
                && state(&new_a).as_deref() == Some("up")
                && state(&id_b).as_deref() == Some("up")
                && state(&old_a).is_none_or(|s| s == "stale"))
            .then_some(())
        },
    );

    // Ten entrypoints with both in their list, each starting at a random entry: all on one
    // replica has a chance of 2 × 2^-10.
    let token = a.entrypoint_token("web", None);
    let list = format!("{},{}", a.control_addr, b.control_addr);
    let mut eps = Vec::new();
    for _ in 0..10 {
        let Some(e) = Builder::with_token(&a, &token, "exec sleep 1000")
            .env("WAYPOST_SERVER", &list)
            .spawn()
        else {
            return;
        };
        eps.push(e);
    }
    let (mut on_a, mut on_b) = (0, 0);
    for e in &eps {
        let inst = wait_for("each instance live", || live_by_pid(&b, e));
        match inst["replica"].as_str() {
            Some(r) if r == new_a => on_a += 1,
            Some(r) if r == id_b => on_b += 1,
            other => panic!("held by {other:?}, neither A ({new_a}) nor B ({id_b})"),
        }
    }
    assert!(on_a > 0 && on_b > 0, "A: {on_a}, B: {on_b}");
    // Each replica counts what it holds.
    let counted = |s: &Server| me(s)["instances"].as_u64().unwrap();
    assert_eq!(counted(&a) + counted(&b), 10);
}

#[test]
fn a_dead_replicas_instances_are_marked_lost_by_the_other_after_the_lease() {
    let (_pg, _url, a, b) = two_replicas();
    // The entrypoint knows A only: it cannot move.
    let Some(mut e) = Builder::new(&a, "web", NUMBERED).spawn() else {
        return;
    };
    let id = e.instance(&a)["id"].as_str().unwrap().to_string();
    wait_for("B to list it live", || {
        listed(&b, &id, false).filter(|i| i["live"] == true)
    });
    let _gone = a.kill();
    let inst = wait_long("B to mark A's instance lost", LEASE_WAIT, || {
        listed(&b, &id, true).filter(|i| i["live"] == false)
    });
    assert_eq!(inst["ended"], "lost", "{inst}");
    assert!(listed(&b, &id, false).is_none(), "not among the live ones");
    // The entrypoint itself is untouched: its child still runs.
    assert!(e.running());
    assert_counting(&e);
    assert!(alive(b.pid()));
}

/// An outage longer than a replica's lease: when the database is back, every replica's last beat
/// is older than the lease, and none may take that for a dead peer.
const OUTAGE: Duration = Duration::from_secs(12);

/// `GET /v1/instances` on `server` with its admin token: (status, JSON body), or why there was
/// no HTTP answer within 15 s (a hang is what this bound catches, not slowness).
fn instances_raw(rt: &tokio::runtime::Runtime, server: &Server) -> Result<(u16, Value), String> {
    let client = server.api(Some(&server.admin_token()));
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(15),
            client.request(hyper::Method::GET, "/v1/instances", None),
        )
        .await
    })
    .map_err(|_| "no answer within 15 s".to_string())?
    .map(|(status, body)| (status.as_u16(), body))
    .map_err(|e| format!("{e:#}"))
}

#[test]
fn a_database_outage_is_answered_with_503_and_survived() {
    let (pg, _url, a, b) = two_replicas();
    let id_a = replica_id(&a);
    let Some(mut e) = Builder::new(&a, "web", NUMBERED).spawn() else {
        return;
    };
    let id = e.instance(&a)["id"].as_str().unwrap().to_string();
    wait_for("B to list it live", || {
        listed(&b, &id, false).filter(|i| i["live"] == true)
    });
    let rt = apps::rt();

    pg.stop();
    let down = Instant::now();
    // Every answer while the database is down, from the first on: 503 with a JSON message.
    let mut answers = 0;
    while down.elapsed() < OUTAGE {
        for (name, s) in [("B", &b), ("A", &a)] {
            let (status, body) = instances_raw(&rt, s)
                .unwrap_or_else(|e| panic!("replica {name}, database down: {e}"));
            assert_eq!(
                status, 503,
                "replica {name}, answer {answers} while the database is down: {body}"
            );
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("database is unavailable")),
                "{body}"
            );
            answers += 1;
        }
        // The app is not affected, nor are the servers.
        assert_counting(&e);
        assert!(e.running());
        assert!(alive(a.pid()) && alive(b.pid()), "a server died");
        std::thread::sleep(Duration::from_millis(500));
    }
    let r = b.cli(&["instances"]).fails();
    assert!(r.stderr.contains("database"), "{}", r.stderr);

    pg.start_again();
    for s in [&a, &b] {
        let inst = wait_for(
            "`instances` to work again and list the instance live",
            || {
                let r = s.cli(&["instances", "-o", "json"]);
                if r.code != Some(0) {
                    return None;
                }
                r.json()["instances"]
                    .as_array()?
                    .iter()
                    .find(|i| i["id"] == id.as_str() && i["live"] == true)
                    .cloned()
            },
        );
        assert_eq!(inst["replica"], id_a.as_str(), "{inst}");
    }
    // And it stays live: B does not mistake A's beats, missed during the outage, for A's death
    // (a lease and a beat after the database is back).
    let back = Instant::now();
    while back.elapsed() < OUTAGE {
        let inst = listed(&b, &id, true).expect("listed");
        assert_eq!(inst["live"], true, "after the outage: {inst}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_counting(&e);
    assert!(e.running());
    assert!(alive(a.pid()) && alive(b.pid()));
    let up = members(&b).iter().filter(|m| m["state"] == "up").count();
    assert_eq!(up, 2, "{:?}", members(&b));
}
