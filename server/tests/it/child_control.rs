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
