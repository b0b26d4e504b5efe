//! An instance id belongs to the app, deployment and token that first registered it. Another
//! app's (or deployment's, or token's) Hello presenting it — it is shown by `instances` and in
//! the logs' JSON — is rejected with FORBIDDEN, and the instance is left alone: its connection,
//! its row and its logs. Log sequence numbers that jump further than an entrypoint can have
//! dropped are refused, so an instance's later lines cannot be made to look like duplicates.

use crate::common::*;
use serde_json::Value;
use std::time::Duration;
use waypost_proto::{self as proto, Frame, Kind, reject::Reason, status::State};

fn expect_forbidden(answer: Frame, id: &[u8; 16], whose: &str) {
    match answer.kind {
        Some(Kind::Reject(r)) => {
            assert_eq!(r.reason, Reason::Forbidden as i32, "{r:?}");
            assert!(r.message.contains(&hex(id)), "{}", r.message);
            assert!(r.message.contains(whose), "{}", r.message);
        }
        other => panic!("expected Reject FORBIDDEN, got {other:?}"),
    }
}

/// `waypost logs --app APP -o json` as rows.
fn logs_json(server: &Server, app: &str) -> Vec<Value> {
    let r = server.cli(&["logs", "--app", app, "-o", "json"]).ok();
    r.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn texts(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["text"].as_str().unwrap_or("<marker>").to_string())
        .collect()
}

fn batch(first_seq: u64, lines: &[&str]) -> Frame {
    Kind::LogBatch(proto::LogBatch {
        first_seq,
        entries: lines
            .iter()
            .map(|l| proto::LogEntry {
                stream: proto::LogStream::Stdout as i32,
                timestamp_unix_us: 1_700_000_000_000_000,
                data: l.as_bytes().to_vec(),
                truncated: false,
            })
            .collect(),
        dropped: 0,
    })
    .into()
}

/// The next LogAck on `conn` (other frames skipped).
async fn next_ack(conn: &mut Fake) -> u64 {
    loop {
        match conn.recv().await.and_then(|f| f.kind) {
            Some(Kind::LogAck(a)) => return a.up_to_seq,
            Some(_) => continue,
            None => panic!("connection closed while waiting for a LogAck"),
        }
    }
}

fn running(pid: u32) -> Frame {
    Kind::Status(proto::Status {
        state: State::Running as i32,
        child_pid: pid,
        ..Default::default()
    })
    .into()
}

#[tokio::test]
async fn another_apps_token_cannot_take_a_live_instance() {
    let server = Server::start(&[]);
    let token_a = server.entrypoint_token("a", None);
    let token_b = server.entrypoint_token("b", None);
    let id = new_id();
    let (mut b, _) = Fake::welcomed(&server, &token_b, &id).await;

    // App A presents B's id (as `instances` shows it), before B has any logs...
    let (mut a, answer) = Fake::hello(&server, &token_a, &id).await;
    expect_forbidden(answer, &id, "another app");
    a.expect_closed().await;
    // ...and after.
    b.send(batch(0, &["b says 0", "b says 1"])).await;
    assert_eq!(next_ack(&mut b).await, 2);
    let (mut a, answer) = Fake::hello(&server, &token_a, &id).await;
    expect_forbidden(answer, &id, "another app");
    a.expect_closed().await;
    wait_for("the refusal in the server log, with the peer", || {
        let logs = server.logs();
        logs.lines()
            .any(|l| {
                l.contains("WARN")
                    && l.contains("refused a Hello for an instance id of another owner")
                    && l.contains("peer=127.0.0.1:")
                    && l.contains(&hex(&id))
            })
            .then_some(())
    });

    // B's connection is untouched: it answers, its Status still lands, its logs still arrive.
    b.ping(1).await;
    b.send(running(4321)).await;
    b.ping(2).await;
    let inst = wait_for("B's Status to show", || {
        server
            .instance(&id, false)
            .filter(|i| i["child_pid"] == 4321)
    });
    assert_eq!(inst["app"], "b");
    assert_eq!(inst["live"], true);
    b.send(batch(2, &["b says 2"])).await;
    assert_eq!(next_ack(&mut b).await, 3);
    assert_eq!(
        texts(&logs_json(&server, "b")),
        ["b says 0", "b says 1", "b says 2"]
    );
    assert!(
        logs_json(&server, "a").is_empty(),
        "nothing stored under app a"
    );
    assert!(
        server.instances(true).iter().all(|i| i["app"] != "a"),
        "no instance of app a"
    );
}

#[tokio::test]
async fn a_gone_instance_stays_bound_to_its_app() {
    let server = Server::start(&[]);
    let token_a = server.entrypoint_token("a", None);
    let token_b = server.entrypoint_token("b", None);
    // One gone instance without logs (only its row binds it), then one with logs.
    let quiet = new_id();
    let (q, _) = Fake::welcomed(&server, &token_b, &quiet).await;
    drop(q);
    wait_for("the quiet instance to be recorded as gone", || {
        server.instance(&quiet, true).filter(|i| i["live"] == false)
    });
    let (mut a, answer) = Fake::hello(&server, &token_a, &quiet).await;
    expect_forbidden(answer, &quiet, "another app");
    a.expect_closed().await;
    assert_eq!(server.instance(&quiet, true).unwrap()["app"], "b");

    let id = new_id();
    let (mut b, _) = Fake::welcomed(&server, &token_b, &id).await;
    b.send(batch(0, &["last words of b"])).await;
    assert_eq!(next_ack(&mut b).await, 1);
    b.send(
        Kind::Status(proto::Status {
            state: State::Exited as i32,
            exit_code: 3,
            ..Default::default()
        })
        .into(),
    )
    .await;
    b.ping(1).await;
    drop(b);
    let gone = wait_for("B to be recorded as gone", || {
        server.instance(&id, true).filter(|i| i["live"] == false)
    });
    assert_eq!(gone["ended"], "exited");

    let (mut a, answer) = Fake::hello(&server, &token_a, &id).await;
    expect_forbidden(answer, &id, "another app");
    a.expect_closed().await;
    // The row keeps its app and how it ended; the logs are B's alone.
    let after = server.instance(&id, true).expect("still listed");
    assert_eq!(after["app"], "b");
    assert_eq!(after["ended"], "exited");
    assert_eq!(after["exit_code"], 3);
    assert_eq!(texts(&logs_json(&server, "b")), ["last words of b"]);
    assert!(logs_json(&server, "a").is_empty());

    // Negative control: B itself may come back under the same id.
    let (mut b, w) = Fake::welcomed(&server, &token_b, &id).await;
    assert_eq!(w.app, "b");
    assert_eq!(w.log_acked_seq, 1, "B resumes its own log sequence");
    b.ping(2).await;
    wait_for("B live again", || {
        server.instance(&id, false).filter(|i| i["live"] == true)
    });
}

#[tokio::test]
async fn another_deployment_or_token_of_the_same_app_is_refused() {
    let server = Server::start(&[]);
    let blue = server.entrypoint_token("web", Some("blue"));
    let blue2 = server.entrypoint_token("web", Some("blue"));
    let green = server.entrypoint_token("web", Some("green"));
    let id = new_id();
    let (mut owner, _) = Fake::welcomed(&server, &blue, &id).await;

    let (mut c, answer) = Fake::hello(&server, &green, &id).await;
    expect_forbidden(answer, &id, "another deployment of this app");
    c.expect_closed().await;
    let (mut c, answer) = Fake::hello(&server, &blue2, &id).await;
    expect_forbidden(answer, &id, "another token of this app");
    c.expect_closed().await;

    owner.ping(1).await;
    let inst = server.instance(&id, false).expect("still live");
    assert_eq!(inst["deployment"], "blue");
    assert_eq!(inst["live"], true);
}

#[tokio::test]
async fn the_owner_reconnecting_still_supersedes_its_old_connection() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let id = new_id();
    let (mut old, _) = Fake::welcomed(&server, &token, &id).await;
    let (mut new, w) = Fake::welcomed(&server, &token, &id).await;
    assert_eq!(w.app, "web");
    old.expect_closed().await;
    new.send(running(99)).await;
    new.ping(1).await;
    wait_for("the new connection's Status", || {
        server.instance(&id, false).filter(|i| i["child_pid"] == 99)
    });
}

#[tokio::test]
async fn racing_hellos_of_two_apps_for_a_new_id_bind_it_once() {
    let server = Server::start(&[]);
    let token_a = server.entrypoint_token("a", None);
    let token_b = server.entrypoint_token("b", None);
    for _ in 0..5 {
        let id = new_id();
        let (ra, rb) = tokio::join!(
            Fake::hello(&server, &token_a, &id),
            Fake::hello(&server, &token_b, &id)
        );
        let welcomed: Vec<(&str, Fake)> = [("a", ra), ("b", rb)]
            .into_iter()
            .filter_map(|(app, (conn, answer))| match answer.kind {
                Some(Kind::Welcome(w)) => {
                    assert_eq!(w.app, app);
                    Some((app, conn))
                }
                Some(Kind::Reject(r)) => {
                    assert_eq!(r.reason, Reason::Forbidden as i32, "{r:?}");
                    None
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(welcomed.len(), 1, "exactly one app gets the id");
        let (app, mut conn) = welcomed.into_iter().next().unwrap();
        conn.ping(1).await;
        assert_eq!(server.instance(&id, false).unwrap()["app"], app);
    }
}

#[tokio::test]
async fn a_log_batch_that_jumps_too_far_is_refused() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("b", None);
    let id = new_id();
    let (mut b, _) = Fake::welcomed(&server, &token, &id).await;
    b.send(batch(0, &["line 0", "line 1"])).await;
    assert_eq!(next_ack(&mut b).await, 2);

    // Far beyond anything an entrypoint's buffer can have dropped.
    b.send(batch(1 << 40, &["from the future"])).await;
    // The next real lines are stored, and the ack shows the high-water mark never moved (a
    // moved one would ack 2^40 + 1 and drop "line 2" as a duplicate).
    b.send(batch(2, &["line 2", "line 3"])).await;
    assert_eq!(next_ack(&mut b).await, 4);
    b.ping(1).await;

    let rows = logs_json(&server, "b");
    let t = texts(&rows);
    assert!(!t.iter().any(|l| l == "from the future"), "{t:?}");
    let real: Vec<&String> = t.iter().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(real, ["line 0", "line 1", "line 2", "line 3"]);
    // Reported: a notice among the instance's own logs, and a warning in the server's log.
    let notice = rows
        .iter()
        .find(|r| {
            r["text"].as_str().is_some_and(|s| {
                s.starts_with("waypost server: refused log entries from sequence 1099511627776")
            })
        })
        .unwrap_or_else(|| panic!("no refusal notice in {t:?}"));
    assert_eq!(notice["instance"], hex(&id));
    assert_eq!(notice["stream"], "entrypoint");
    wait_for("the warning in the server log", || {
        server
            .logs()
            .contains("refused a log batch whose sequence numbers jump too far")
            .then_some(())
    });

    // The same instance reconnecting resumes from the real high-water mark.
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_b, w) = Fake::welcomed(&server, &token, &id).await;
    assert_eq!(w.log_acked_seq, 4);
}
