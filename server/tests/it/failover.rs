//! The real entrypoint against two replicas: `WAYPOST_SERVER` as a list. On PostgreSQL, replica
//! B is a second server on A's database (each with its own data dir), as replicas are deployed;
//! on SQLite, B is a second server on a COPY of A's data dir (same database contents → same
//! tokens and CA), which stands in for that. What is checked is the entrypoint's side — a random
//! start, the next entry on refusal or loss, the same instance id, the child untouched, buffered
//! lines delivered after the move (docs/protocol.md, "Reconnect backoff").

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::{Env, Server, wait_for};
use serde_json::Value;
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

const FLAGS: &[&str] = &["--heartbeat-interval", "300ms"];

/// A child that counts in `$D/count` every 50 ms, and writes one marked line once `$D/mark`
/// appears (then `$D/marked`).
const COUNTER: &str = r#"
i=0
echo "app started"
while [ ! -e "$D/stop" ]; do
  i=$((i+1)); echo $i > "$D/count.tmp"; mv "$D/count.tmp" "$D/count"
  if [ -e "$D/mark" ] && [ ! -e "$D/marked" ]; then
    echo "written during the move"; : > "$D/marked"
  fi
  sleep 0.05
done
"#;

fn count(e: &Entrypoint) -> u64 {
    e.file("count")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn assert_counting(e: &Entrypoint) {
    let before = count(e);
    wait_for("the child's counter to keep advancing", || {
        (count(e) > before + 3).then_some(())
    });
}

/// A port nothing listens on right now (bound, then released).
fn closed_port() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// An address that accepts TCP connections and closes them at once: a TLS failure, not a
/// refusal. The accepting thread lives as long as the test process.
fn hangs_up() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    addr
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::DirBuilder::new().mode(0o700).create(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), &dst).unwrap();
        }
    }
}

/// A server and its replica id (`server members`), which instances name as their holder.
struct Replica {
    server: Server,
    id: String,
}

impl Replica {
    fn new(server: Server) -> Replica {
        let id = server.replica_id();
        Replica { server, id }
    }
}

/// Replicas A and B with the same database contents, and an entrypoint token for app `web`.
fn two_replicas() -> (Replica, Replica, String) {
    let a = Server::start(FLAGS);
    let token = a.entrypoint_token("web", None);
    let (a, b) = match a.env.database_url() {
        Some(url) => {
            let b = Server::start_in(Env::with_database(&url), FLAGS);
            (a, b)
        }
        None => {
            let (_, env_a) = a.terminate();
            let env_b = Env::new();
            copy_dir(&env_a.data_dir(), &env_b.data_dir());
            (
                Server::start_in(env_a, FLAGS),
                Server::start_in(env_b, FLAGS),
            )
        }
    };
    (Replica::new(a), Replica::new(b), token)
}

fn spawn(server: &Server, token: &str, list: &str) -> Option<Entrypoint> {
    Builder::with_token(server, token, COUNTER)
        .env("WAYPOST_SERVER", list)
        .env("WAYPOST_LOG_LEVEL", "DEBUG")
        .spawn()
}

/// The entrypoint's instance if replica `r` lists it live and holds it right now. (On one
/// shared database every replica lists every instance: the holder is the one it names.)
fn live_on(r: &Replica, e: &Entrypoint) -> Option<Value> {
    let pid = e.pid();
    r.server
        .instances(false)
        .into_iter()
        .find(|i| i["entrypoint_pid"] == pid && i["live"] == true && i["replica"] == r.id.as_str())
}

/// Texts of the stored stdout lines of app `web` on `server`.
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

#[test]
fn losing_the_replica_moves_the_same_instance_to_the_other_with_the_child_untouched() {
    let (a, b, token) = two_replicas();
    let list = format!("{},{}", a.server.control_addr, b.server.control_addr);
    let Some(mut e) = spawn(&a.server, &token, &list) else {
        return;
    };
    // It starts at a random entry: find out which one holds it.
    let (inst, on_a) = wait_for("the instance live on A or B", || {
        live_on(&a, &e)
            .map(|i| (i, true))
            .or_else(|| live_on(&b, &e).map(|i| (i, false)))
    });
    let (holder, other, name) = if on_a { (a, b, "B") } else { (b, a, "A") };
    let id = inst["id"].as_str().unwrap().to_string();
    let child_pid = wait_for("the child's pid in a heartbeat", || {
        live_on(&holder, &e).and_then(|i| i["child_pid"].as_u64())
    });
    assert_counting(&e);

    // SIGKILL the replica holding it, then have the child write a line while the entrypoint
    // moves over.
    let _env = holder.server.kill();
    std::fs::write(e.dir.join("mark"), "").unwrap();
    let moved = wait_for(&format!("the instance live on replica {name}"), || {
        live_on(&other, &e)
    });
    assert_eq!(moved["id"], id.as_str(), "the same instance id");
    let moved = wait_for("the child's pid on the new replica", || {
        live_on(&other, &e).filter(|i| i["child_pid"].as_u64().is_some())
    });
    assert_eq!(
        moved["child_pid"].as_u64(),
        Some(child_pid),
        "the child was not restarted"
    );
    assert_counting(&e);
    assert!(e.running());
    assert_eq!(
        e.stdout().matches("app started").count(),
        1,
        "started once: {}",
        e.stdout()
    );
    // The line written during the move is stored by the new replica. (On SQLite its database is
    // a copy taken before the entrypoint started, so it holds only what reached it; on one
    // shared database it serves the lines both replicas stored.)
    wait_for(
        "the line written during the move stored on the new replica",
        || {
            stored_lines(&other.server)
                .iter()
                .any(|l| l == "written during the move")
                .then_some(())
        },
    );
}

#[test]
fn a_dead_entry_is_skipped_at_once_not_after_a_backoff() {
    let (a, b, token) = two_replicas();
    drop(a);
    // Three dead entries (two refuse, one hangs up before TLS) and B: each entrypoint starts at
    // a random one; whichever dead ones it meets are skipped within the first round, so it never
    // logs a backoff. (All 8 starting at B, which would test nothing, has a chance of 4^-8.)
    let list = format!(
        "{},{},{},{}",
        closed_port(),
        hangs_up(),
        closed_port(),
        b.server.control_addr
    );
    let mut eps = Vec::new();
    for _ in 0..8 {
        let Some(e) = spawn(&b.server, &token, &list) else {
            return;
        };
        eps.push(e);
    }
    let mut skipped = 0;
    for e in &eps {
        wait_for("the instance live on B", || live_on(&b, e));
        let err = e.stderr();
        assert!(
            !err.contains("retrying with backoff"),
            "a dead entry must not cost a backoff while another is untried:\n{err}"
        );
        if err.contains("trying the next") {
            skipped += 1;
        }
    }
    assert!(skipped > 0, "no entrypoint started at a dead entry");
}

#[test]
fn a_fleet_spreads_over_the_list() {
    let (a, b, token) = two_replicas();
    let list = format!("{},{}", a.server.control_addr, b.server.control_addr);
    // 16 entrypoints, each starting at a random entry: all on one replica has a chance of
    // 2 × 2^-16.
    let mut eps = Vec::new();
    for _ in 0..16 {
        let Some(e) = spawn(&a.server, &token, &list) else {
            return;
        };
        eps.push(e);
    }
    let (mut on_a, mut on_b) = (0, 0);
    for e in &eps {
        let which = wait_for("each instance live on A or B", || {
            live_on(&a, e)
                .map(|_| 'a')
                .or_else(|| live_on(&b, e).map(|_| 'b'))
        });
        if which == 'a' {
            on_a += 1;
        } else {
            on_b += 1;
        }
    }
    assert!(on_a > 0 && on_b > 0, "A: {on_a}, B: {on_b}");
}

#[test]
fn control_a_single_server_is_not_replaced_by_another() {
    let (a, b, token) = two_replicas();
    let Some(mut e) = spawn(&a.server, &token, &a.server.control_addr) else {
        return;
    };
    e.instance(&a.server);
    let _env = a.server.kill();
    // The child keeps running; B is up, but not in the list: the instance never shows there.
    for _ in 0..6 {
        assert_counting(&e);
        std::thread::sleep(Duration::from_millis(300));
        assert!(live_on(&b, &e).is_none(), "the instance moved to B");
    }
    assert!(e.running());
}
