//! `waypost restart` and `waypost signal` end to end: the real server, the REAL entrypoint and
//! `sh` children that record their starts and the signals they trap under `$D`.

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::*;

/// The child: one line per start; `hup` lines for each SIGHUP; waits (interruptibly, so traps run).
const CHILD: &str =
    r#"echo start >> "$D/starts"; trap 'echo hup >> "$D/hups"' HUP; while :; do sleep 0.1; done"#;

fn count(ep: &Entrypoint, file: &str) -> usize {
    ep.file(file).unwrap_or_default().lines().count()
}

fn spawn(server: &Server) -> Entrypoint {
    Builder::new(server, "web", CHILD)
        .env("WAYPOST_STARTUP_TIMEOUT", "20s")
        .env("WAYPOST_STOP_TIMEOUT", "2s")
        .spawn()
        .expect("the entrypoint binary is needed: set WAYPOST_ENTRYPOINT_BIN")
}

#[test]
fn restart_restarts_each_instance_once_and_waits_for_it() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    server.create_app("web");
    let a = spawn(&server);
    let b = spawn(&server);
    for ep in [&a, &b] {
        wait_for("the first start", || {
            (count(ep, "starts") == 1).then_some(())
        });
        ep.instance(&server);
    }
    let out = server.cli(&["restart", "-a", "web"]).ok();
    assert_eq!(out.stdout.matches("restarted").count(), 2, "{}", out.stdout);
    for ep in [&a, &b] {
        assert_eq!(count(ep, "starts"), 2, "one restart each");
    }
    // One instance by id prefix.
    let id = a.instance(&server)["id"].as_str().unwrap().to_string();
    server
        .cli(&["restart", "-a", "web", "--instance", &id[..8]])
        .ok();
    assert_eq!(count(&a, "starts"), 3);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(count(&b, "starts"), 2, "the other instance untouched");
}

#[test]
fn signal_reaches_the_child_and_a_terminating_one_ends_it() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    server.create_app("web");
    let mut ep = spawn(&server);
    wait_for("the first start", || {
        (count(&ep, "starts") == 1).then_some(())
    });
    let id = ep.instance(&server)["id"].as_str().unwrap().to_string();
    let out = server.cli(&["signal", "-a", "web", "HUP"]).ok();
    assert!(
        out.stdout.contains("sent HUP to 1 instance"),
        "{}",
        out.stdout
    );
    wait_for("the child to trap SIGHUP", || {
        (count(&ep, "hups") == 1).then_some(())
    });
    assert_eq!(count(&ep, "starts"), 1, "a signal is not a restart");

    // SIGTERM: the sh child dies of it (its loop does not trap TERM); the entrypoint exits with
    // 128+15 and the instance shows how it ended.
    server.cli(&["signal", "-a", "web", "SIGTERM"]).ok();
    let status = ep.wait();
    assert_eq!(status.code(), Some(143), "{}", ep.stderr());
    let gone = wait_for("the instance to be listed as ended", || {
        server
            .instances(true)
            .into_iter()
            .find(|i| i["id"] == id && i["live"] == false)
    });
    assert_eq!(gone["exit_signal"], 15, "{gone}");
}

#[test]
fn bad_requests_are_refused() {
    let server = Server::start(&[]);
    server.create_app("web");
    let r = server.cli(&["restart", "-a", "web"]).fails();
    assert!(r.stderr.contains("no live instance"), "{}", r.stderr);
    let r = server.cli(&["signal", "-a", "web", "SIGNOPE"]).fails();
    assert!(r.stderr.contains("unknown signal"), "{}", r.stderr);
    let r = server.cli(&["signal", "-a", "nope", "HUP"]).fails();
    assert!(r.stderr.contains("nope"), "{}", r.stderr);
    let r = server
        .cli(&["restart", "-a", "web", "--instance", "xyz"])
        .fails();
    assert!(r.stderr.contains("hex prefix"), "{}", r.stderr);
    let token = server.entrypoint_token("web", None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (tok, want) in [(None, 401), (Some(token.as_str()), 403)] {
            let (status, _) = server
                .api(tok)
                .request(
                    hyper::Method::POST,
                    "/v1/apps/web/signal",
                    Some(&serde_json::json!({ "signal": "HUP" })),
                )
                .await
                .unwrap();
            assert_eq!(status.as_u16(), want);
        }
        let admin = server.admin_token();
        let (status, _) = server
            .api(Some(&admin))
            .request(
                hyper::Method::POST,
                "/v1/apps/web/signal",
                Some(&serde_json::json!({ "signal": "CHLD" })),
            )
            .await
            .unwrap();
        assert_eq!(status.as_u16(), 400);
    });
}

/// Two replicas on one PostgreSQL database; the entrypoint knows A only, the operator talks to B:
/// restart and signal reach the child over the hop, and revoking the token (or deleting the app)
/// through B closes A's connection.
#[test]
fn restart_signal_and_revocation_reach_an_instance_held_by_the_other_replica() {
    use waypost_testkit::pg::Cluster;
    let flags = [
        "--heartbeat-interval",
        "300ms",
        "--peer-addr",
        "127.0.0.1:0",
    ];
    let pg = Cluster::start();
    let url = pg.create_database();
    let a = Server::start_in(Env::with_database(&url), &flags);
    let b = Server::start_in(Env::with_database(&url), &flags);
    b.create_app("web");
    let out = b
        .cli(&["token", "create", "-a", "web", "-o", "json"])
        .ok()
        .json();
    let token = out["token"].as_str().unwrap().to_string();
    let token_id = out["id"].as_str().unwrap().to_string();
    let mut ep = Builder::with_token(&a, &token, CHILD)
        .env("WAYPOST_STARTUP_TIMEOUT", "20s")
        .env("WAYPOST_STOP_TIMEOUT", "2s")
        .spawn()
        .expect("the entrypoint binary is needed: set WAYPOST_ENTRYPOINT_BIN");
    wait_for("the first start", || {
        (count(&ep, "starts") == 1).then_some(())
    });
    let id = wait_for("B to list the instance held by A", || {
        b.instances(false)
            .into_iter()
            .find(|i| i["live"] == true)
            .and_then(|i| i["id"].as_str().map(str::to_string))
    });

    // restart through B: A's instance restarts, and the CLI saw it done (no "not reached" note).
    let r = b.cli(&["restart", "-a", "web"]).ok();
    assert!(r.stdout.contains("restarted"), "{}\n{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("not reached"), "{}", r.stderr);
    assert_eq!(count(&ep, "starts"), 2, "one restart");
    // signal by id prefix through B.
    let r = b
        .cli(&["signal", "-a", "web", "--instance", &id[..8], "HUP"])
        .ok();
    assert!(r.stdout.contains("sent HUP to 1 instance"), "{}", r.stdout);
    wait_for("the child to trap SIGHUP", || {
        (count(&ep, "hups") == 1).then_some(())
    });
    assert!(
        a.logs().contains("restart requested") && a.logs().contains("signal requested"),
        "A carried them out:\n{}",
        a.logs()
    );
    // Negative control: a prefix that matches nothing anywhere is still a 409.
    let r = b.cli(&["restart", "-a", "web", "--instance", "ffffffffffff"]);
    assert_ne!(r.code, Some(0), "{}", r.stdout);

    // Revoking the token through B closes the connection A holds; the entrypoint's reconnects
    // are refused (its child keeps running: an entrypoint never stops the app for the server).
    b.cli(&["token", "revoke", &token_id]).ok();
    wait_for("A to close the revoked token's connection", || {
        a.instances(true)
            .into_iter()
            .find(|i| i["id"] == id.as_str() && i["live"] == false)
    });
    assert!(
        a.logs()
            .contains("closed connections whose token was revoked on another replica"),
        "{}",
        a.logs()
    );
    assert!(ep.running(), "the child is not stopped by a revocation");
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(
        a.instances(false)
            .into_iter()
            .all(|i| i["id"] != id.as_str()),
        "the revoked token cannot reconnect"
    );

    // Deleting an app through B with --force closes its connections held by A as well.
    let out = b
        .cli(&["token", "create", "-a", "web", "-o", "json"])
        .ok()
        .json();
    let token = out["token"].as_str().unwrap().to_string();
    let ep2 = Builder::with_token(&a, &token, CHILD)
        .env("WAYPOST_STARTUP_TIMEOUT", "20s")
        .spawn()
        .unwrap();
    wait_for("the second instance on A", || {
        ep2.file("starts")?;
        a.instances(false)
            .into_iter()
            .find(|i| i["live"] == true)
            .map(|_| ())
    });
    b.cli(&["app", "delete", "web", "--force"]).ok();
    // (The instance rows went with the app: A's log says what A did.)
    wait_for("A to close the deleted app's connection", || {
        (a.logs()
            .matches("closed connections whose token was revoked on another replica")
            .count()
            >= 2)
            .then_some(())
    });
    assert!(
        ep2.stderr().contains("revoked") || ep2.stderr().contains("refused"),
        "the entrypoint was told: {}",
        ep2.stderr()
    );
    drop(pg);
}
