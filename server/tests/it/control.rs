//! The control protocol against a real server process, with a protocol-level fake entrypoint.

use crate::common::*;
use std::time::Duration;
use waypost_proto::{self as proto, Frame, Kind, reject::Reason, status::State};

fn expect_reject(frame: Frame) -> proto::Reject {
    match frame.kind {
        Some(Kind::Reject(r)) => r,
        other => panic!("expected Reject, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_gets_welcome() {
    let server = Server::start(&["--heartbeat-interval", "7s"]);
    let token = server.entrypoint_token("web", Some("blue"));
    let id = new_id();
    let (mut conn, welcome) = Fake::welcomed(&server, &token, &id).await;
    assert_eq!(welcome.protocol_version, proto::PROTOCOL_VERSION);
    assert_eq!(welcome.heartbeat_interval_ms, 7000);
    assert_eq!(welcome.app, "web");
    assert_eq!(welcome.deployment, "blue");
    assert_eq!(welcome.server_version, env!("CARGO_PKG_VERSION"));
    assert!(welcome.config.is_none());
    assert_eq!(welcome.log_acked_seq, 0);

    // Listed as live, with what the Hello said.
    let inst = wait_for("the instance to be listed", || server.instance(&id, false));
    assert_eq!(inst["live"], true);
    assert_eq!(inst["app"], "web");
    assert_eq!(inst["deployment"], "blue");
    assert_eq!(inst["hostname"], "test-host");
    assert_eq!(inst["entrypoint_pid"], 4242);
    assert_eq!(inst["entrypoint_version"], "test-0.0.1");
    assert!(inst["ended"].is_null() && inst["disconnected_at"].is_null());

    // Frames of unknown kind (kind None) and of kinds not handled yet are ignored.
    conn.send(Frame { kind: None }).await;
    conn.send(Kind::LogBatch(proto::LogBatch::default()).into())
        .await;
    conn.ping(1).await;
}

#[tokio::test]
async fn bad_tokens_are_rejected_and_closed() {
    let server = Server::start(&[]);
    let admin = server.admin_token();
    let good = server.entrypoint_token("web", None);

    let (mut conn, answer) = Fake::hello(&server, "wpe_not_a_real_token", &new_id()).await;
    let r = expect_reject(answer);
    assert_eq!(r.reason, Reason::BadToken as i32);
    assert_eq!(r.message, "invalid token");
    assert!(r.retry_after_ms > 0);
    conn.expect_closed().await;

    let (mut conn, answer) = Fake::hello(&server, &admin, &new_id()).await;
    assert_eq!(expect_reject(answer).reason, Reason::Forbidden as i32);
    conn.expect_closed().await;

    // Wrong protocol version.
    let mut conn = Fake::connect(&server).await;
    let mut h = hello(&good, &new_id());
    h.protocol_version = 99;
    conn.send(Kind::Hello(h).into()).await;
    assert_eq!(
        expect_reject(conn.recv().await.unwrap()).reason,
        Reason::UnsupportedVersion as i32
    );
    conn.expect_closed().await;

    // Instance id of the wrong length.
    let mut conn = Fake::connect(&server).await;
    let mut h = hello(&good, &new_id());
    h.instance_id = vec![1, 2, 3];
    conn.send(Kind::Hello(h).into()).await;
    let r = expect_reject(conn.recv().await.unwrap());
    assert!(r.message.contains("16 bytes"), "{}", r.message);
    conn.expect_closed().await;

    // A first frame that is not Hello.
    let mut conn = Fake::connect(&server).await;
    conn.send(Kind::Ping(proto::Ping { nonce: 1 }).into()).await;
    expect_reject(conn.recv().await.unwrap());
    conn.expect_closed().await;

    // Negative control: the good token is welcomed, even after an ignorable empty frame.
    let mut conn = Fake::connect(&server).await;
    conn.send(Frame { kind: None }).await;
    conn.send(Kind::Hello(hello(&good, &new_id())).into()).await;
    assert!(matches!(
        conn.recv().await.unwrap().kind,
        Some(Kind::Welcome(_))
    ));
}

#[tokio::test]
async fn alpn_is_required() {
    let server = Server::start(&[]);
    // Offering another protocol fails the handshake; offering none gets the connection closed.
    assert!(
        Fake::connect_to(&server.control_addr, &server.ca_pem(), Some(b"h2"))
            .await
            .is_err()
    );
    match Fake::connect_to(&server.control_addr, &server.ca_pem(), None).await {
        Err(_) => {}
        Ok(mut f) => {
            let token = server.entrypoint_token("web", None);
            f.send(Kind::Hello(hello(&token, &new_id())).into()).await;
            assert!(f.recv().await.is_none(), "no ALPN must not get an answer");
        }
    }
}

#[tokio::test]
async fn ping_pong_both_ways() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let (mut conn, _) = Fake::welcomed(&server, &token, &new_id()).await;
    for nonce in [0, 1, u64::MAX] {
        conn.ping(nonce).await;
    }
    // A Pong the server did not ask for is accepted (liveness) and ignored.
    conn.send(Kind::Pong(proto::Pong { nonce: 5 }).into()).await;
    conn.ping(6).await;
}

#[tokio::test]
async fn status_updates_are_visible() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let id = new_id();
    let (mut conn, _) = Fake::welcomed(&server, &token, &id).await;
    conn.send(
        Kind::Status(proto::Status {
            state: State::Running as i32,
            child_pid: 1234,
            child_rss_bytes: 5 * 1024 * 1024,
            child_cpu_ms: 1500,
            starts: 1,
            ..Default::default()
        })
        .into(),
    )
    .await;
    let inst = wait_for("the Status to show", || {
        server
            .instance(&id, false)
            .filter(|i| i["child_state"] == "running")
    });
    assert_eq!(inst["child_pid"], 1234);
    assert_eq!(inst["child_rss_bytes"], 5 * 1024 * 1024);
    assert_eq!(inst["child_cpu_ms"], 1500);
    assert_eq!(inst["starts"], 1);
    assert_eq!(inst["live"], true);

    // The table shows it too.
    let table = server.cli(&["instances", "--app", "web"]).ok().stdout;
    let header = table.lines().next().unwrap();
    for col in [
        "ID",
        "APP",
        "DEPLOYMENT",
        "HOST",
        "STATE",
        "CHILD PID",
        "RSS",
        "CPU",
        "UP/SINCE",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with(&hex(&id)[..8]))
        .expect(&table);
    assert!(
        row.contains("running") && row.contains("1234") && row.contains("5.0M"),
        "{row}"
    );

    // The heartbeat data reaches the database too (flushed every few seconds, not per frame):
    // after a SIGKILL the gone instance still shows it.
    let sql = format!("SELECT child_pid FROM instances WHERE id = '{}'", hex(&id));
    wait_for("the heartbeat flush", || {
        let pid = server.env.query(&sql).ok()??;
        (pid == "1234").then_some(())
    });
    drop(conn);
    let env = server.kill();
    let server = Server::start_in(env, &[]);
    let inst = wait_for_lost_after_restart(&server, &id);
    assert_eq!(inst["child_pid"], 1234);
    assert_eq!(inst["child_rss_bytes"], 5 * 1024 * 1024);
    assert_eq!(inst["ended"], "lost");
}

/// The instance `id`, which was live when the only server was SIGKILLed, as the restarted
/// `server` lists it once it is `lost`. SQLite marks such rows lost at start, so it must be
/// at once; PostgreSQL leaves it to the leases (another replica's, here the restarted one's,
/// heartbeat marks the rows of a replica that has not beaten for the lease), so it may take
/// that long.
fn wait_for_lost_after_restart(server: &Server, id: &[u8; 16]) -> serde_json::Value {
    let lost = || {
        server
            .instance(id, true)
            .filter(|i| i["ended"] == "lost" && i["live"] == false)
    };
    if backend() == "sqlite" {
        assert!(server.instance(id, false).is_none(), "still live");
        return lost().expect("the old instance listed as lost under --all at once");
    }
    wait_for("the old instance to be marked lost by the lease", lost)
}

#[tokio::test]
async fn hello_status_is_recorded() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let id = new_id();
    let mut conn = Fake::connect(&server).await;
    let mut h = hello(&token, &id);
    h.status = Some(proto::Status {
        state: State::Running as i32,
        child_pid: 555,
        starts: 2,
        ..Default::default()
    });
    conn.send(Kind::Hello(h).into()).await;
    assert!(matches!(
        conn.recv().await.unwrap().kind,
        Some(Kind::Welcome(_))
    ));
    let inst = wait_for("listed", || server.instance(&id, false));
    assert_eq!(inst["child_state"], "running");
    assert_eq!(inst["child_pid"], 555);
    assert_eq!(inst["starts"], 2);
}

#[tokio::test]
async fn exited_instance_is_gone_with_its_exit_code() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let id = new_id();
    let (mut conn, _) = Fake::welcomed(&server, &token, &id).await;
    conn.send(
        Kind::Status(proto::Status {
            state: State::Running as i32,
            child_pid: 77,
            ..Default::default()
        })
        .into(),
    )
    .await;
    conn.send(
        Kind::Status(proto::Status {
            state: State::Exited as i32,
            child_pid: 77,
            exit_code: 3,
            ..Default::default()
        })
        .into(),
    )
    .await;
    conn.ping(1).await; // the Status frames were processed
    drop(conn);

    let inst = wait_for("the instance to be gone", || {
        server.instance(&id, true).filter(|i| i["live"] == false)
    });
    assert_eq!(inst["ended"], "exited");
    assert_eq!(inst["exit_code"], 3);
    assert!(inst["exit_signal"].is_null());
    assert!(inst["disconnected_at"].is_string());
    assert!(
        server.instance(&id, false).is_none(),
        "gone instances are only listed with --all"
    );

    let table = server.cli(&["instances", "--all"]).ok().stdout;
    let row = table
        .lines()
        .find(|l| l.starts_with(&hex(&id)[..8]))
        .expect(&table);
    assert!(row.contains("exited 3"), "{row}");

    // Killed by a signal.
    let id2 = new_id();
    let (mut conn, _) = Fake::welcomed(&server, &token, &id2).await;
    conn.send(
        Kind::Status(proto::Status {
            state: State::Exited as i32,
            exit_signal: 15,
            ..Default::default()
        })
        .into(),
    )
    .await;
    conn.ping(1).await;
    drop(conn);
    let inst = wait_for("the second instance to be gone", || {
        server.instance(&id2, true).filter(|i| i["live"] == false)
    });
    assert_eq!(inst["exit_signal"], 15);
    let table = server.cli(&["instances", "--all"]).ok().stdout;
    let row = table
        .lines()
        .find(|l| l.starts_with(&hex(&id2)[..8]))
        .expect(&table);
    assert!(row.contains("killed by SIGTERM"), "{row}");
}

#[tokio::test]
async fn abrupt_disconnect_is_lost() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let id = new_id();
    let (mut conn, _) = Fake::welcomed(&server, &token, &id).await;
    conn.send(Kind::Status(status(State::Running)).into()).await;
    conn.ping(1).await;
    drop(conn); // no EXITED status: the connection just went away
    let inst = wait_for("the instance to be gone", || {
        server.instance(&id, true).filter(|i| i["live"] == false)
    });
    assert_eq!(inst["ended"], "lost");
    let table = server.cli(&["instances", "--all"]).ok().stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&hex(&id)[..8]) && l.contains("lost")),
        "{table}"
    );
}

#[tokio::test]
async fn sigkilled_server_restarts_with_state() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let id = new_id();
    let (conn, _) = Fake::welcomed(&server, &token, &id).await;
    wait_for("live", || server.instance(&id, false));

    let env = server.kill();
    drop(conn);
    let server = Server::start_in(env, &[]);
    // Apps kept; the instance left live by the crash is now lost.
    let apps = server.cli(&["app", "list", "-o", "json"]).ok().json();
    assert_eq!(apps["apps"][0]["name"], "web");
    let inst = wait_for_lost_after_restart(&server, &id);
    assert_eq!(inst["ended"], "lost");
    assert_eq!(inst["live"], false);
    assert!(server.instance(&id, false).is_none());

    // The token survived, and the same instance id reconnecting is live again.
    let (mut conn, welcome) = Fake::welcomed(&server, &token, &id).await;
    assert_eq!(welcome.app, "web");
    let inst = wait_for("live again", || server.instance(&id, false));
    assert_eq!(inst["live"], true);
    assert!(inst["ended"].is_null());
    conn.ping(9).await;
    // Only one row for the id.
    assert_eq!(
        server
            .instances(true)
            .iter()
            .filter(|i| i["id"] == hex(&id).as_str())
            .count(),
        1
    );
}

#[tokio::test]
async fn corrupt_streams_are_dropped_and_others_keep_working() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let (mut good, _) = Fake::welcomed(&server, &token, &new_id()).await;

    // An oversized length prefix (before Hello)...
    let mut bad = Fake::connect(&server).await;
    bad.send_raw(&u32::MAX.to_be_bytes()).await;
    bad.expect_closed().await;
    // ...and just above the limit, after a Welcome.
    let (mut bad, _) = Fake::welcomed(&server, &token, &new_id()).await;
    bad.send_raw(&((proto::MAX_FRAME as u32) + 1).to_be_bytes())
        .await;
    bad.expect_closed().await;
    // Garbage that is not a protobuf Frame.
    let (mut bad, _) = Fake::welcomed(&server, &token, &new_id()).await;
    bad.send_raw(&[0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await;
    bad.expect_closed().await;
    // Plain garbage instead of TLS.
    let mut tcp = tokio::net::TcpStream::connect(&server.control_addr)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, async {
        let mut total = 0;
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("plain-text client closed");
    let _ = n;

    // The good connection and new ones still work.
    good.ping(42).await;
    let (mut again, _) = Fake::welcomed(&server, &token, &new_id()).await;
    again.ping(43).await;
}

#[tokio::test]
async fn silent_instance_is_dropped_after_three_heartbeats() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    let token = server.entrypoint_token("web", None);

    // Negative control: a client that pings every 100 ms outlives the silence limit many times.
    let chatty_id = new_id();
    let (mut chatty, w) = Fake::welcomed(&server, &token, &chatty_id).await;
    assert_eq!(w.heartbeat_interval_ms, 300);

    let id = new_id();
    let (mut silent, _) = Fake::welcomed(&server, &token, &id).await;
    let start = std::time::Instant::now();
    let silent_closed = tokio::spawn(async move { silent.expect_closed().await });
    for n in 0..30 {
        chatty.ping(n).await; // 30 × 100 ms = 3 s = 10 heartbeat intervals
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = silent_closed.await.unwrap();
    assert!(
        waited >= Duration::from_millis(800),
        "closed too early: {waited:?}"
    );
    assert!(start.elapsed() >= Duration::from_secs(3));
    chatty.ping(99).await;

    let inst = wait_for("the silent instance to be lost", || {
        server.instance(&id, true).filter(|i| i["live"] == false)
    });
    assert_eq!(inst["ended"], "lost");
    assert_eq!(server.instance(&chatty_id, false).unwrap()["live"], true);
}

#[tokio::test]
async fn no_hello_within_ten_seconds_closes() {
    let server = Server::start(&[]);
    let mut conn = Fake::connect(&server).await;
    let waited = conn.expect_closed().await;
    assert!(waited >= Duration::from_secs(9), "closed after {waited:?}");
}

#[tokio::test]
async fn reconnect_replaces_a_stale_connection() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let id = new_id();
    let (mut old, _) = Fake::welcomed(&server, &token, &id).await;
    let (mut new, _) = Fake::welcomed(&server, &token, &id).await;
    old.expect_closed().await;
    new.ping(1).await;
    // The old connection's end did not mark the (reconnected) instance gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let inst = server.instance(&id, false).expect("still live");
    assert_eq!(inst["live"], true);
    new.send(Kind::Status(status(State::Running)).into()).await;
    new.ping(2).await;
    assert_eq!(
        server.instance(&id, false).unwrap()["child_state"],
        "running"
    );
}

/// Not run by default (`cargo nextest run -p waypost --run-ignored only many_instances`):
/// N instances connected at once, each sending a Status, then listed; prints the server's RSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn many_instances() {
    let n: usize = std::env::var("WAYPOST_TEST_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let server = Server::start(&[]);
    let token = server.entrypoint_token("load", None);
    let rss = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap()
            .to_string()
    };
    eprintln!("idle server: {}", rss(server.pid()));
    let started = std::time::Instant::now();
    let mut conns = Vec::new();
    for i in 0..n {
        let (mut c, _) = Fake::welcomed(&server, &token, &new_id()).await;
        c.send(
            Kind::Status(proto::Status {
                state: State::Running as i32,
                child_pid: i as u32 + 1,
                ..Default::default()
            })
            .into(),
        )
        .await;
        conns.push(c);
    }
    eprintln!("{n} instances connected in {:?}", started.elapsed());
    let listed = wait_for("all listed", || {
        let v = server.instances(false);
        (v.len() == n && v.iter().all(|i| i["child_state"] == "running")).then_some(v.len())
    });
    eprintln!(
        "{listed} listed; server with {n} live instances: {}",
        rss(server.pid())
    );
    for c in &mut conns {
        c.ping(1).await;
    }
}
