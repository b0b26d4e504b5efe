//! Application configuration end to end: the real server, the real entrypoint, real
//! child processes (sh) that record what they see in files under `$D`.

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::*;
use std::time::{Duration, Instant};

/// The child: counts its starts and records FOO (and whether WAYPOST_LOG_LEVEL leaked into its
/// environment) at each start, then waits to be stopped.
const RECORDER: &str = r#"echo x >> "$D/starts"; printf '%s|%s\n' "${FOO-unset}" "${WAYPOST_LOG_LEVEL-unset}" >> "$D/values"; exec sleep 1000"#;

fn file_lines(ep: &Entrypoint, name: &str) -> Vec<String> {
    ep.file(name)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until `$D/name` has exactly `n` lines and returns them.
fn wait_lines(ep: &Entrypoint, name: &str, n: usize) -> Vec<String> {
    wait_for(
        &format!(
            "{n} lines in {name} (have {:?})\n{}",
            file_lines(ep, name),
            ep.stderr()
        ),
        || {
            let l = file_lines(ep, name);
            (l.len() >= n).then_some(l)
        },
    )
}

fn app_version(server: &Server, app: &str) -> u64 {
    server
        .cli(&["config", "list", "--app", app, "-o", "json"])
        .ok()
        .json()["version"]
        .as_u64()
        .unwrap()
}

/// Waits until the instance reports config version `v` applied.
fn wait_applied(server: &Server, ep: &Entrypoint, v: u64) {
    let pid = ep.pid();
    wait_for(&format!("the instance to apply config version {v}"), || {
        server
            .instances(false)
            .into_iter()
            .find(|i| i["entrypoint_pid"] == pid)
            .filter(|i| i["config_version"].as_u64() >= Some(v))
    });
}

fn spawn(b: Builder) -> Option<Entrypoint> {
    b.env("WAYPOST_STARTUP_TIMEOUT", "20s").spawn()
}

#[test]
fn variables_reach_the_child_and_only_real_changes_restart_it() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let set = server
        .cli(&["config", "set", "--app", "web", "FOO=one"])
        .ok();
    assert!(set.stdout.contains("config version 1"), "{}", set.stdout);
    server
        .cli(&["config", "policy", "--app", "web", "--splay", "0"])
        .ok();
    let Some(ep) = spawn(Builder::with_token(&server, &token, RECORDER)) else {
        return;
    };

    // Set before start: in the child's environment at its first start.
    assert_eq!(wait_lines(&ep, "values", 1), ["one|unset"]);
    wait_applied(&server, &ep, 2);

    // A real change restarts the child with the new value.
    server
        .cli(&["config", "set", "--app", "web", "FOO=two"])
        .ok();
    assert_eq!(wait_lines(&ep, "values", 2), ["one|unset", "two|unset"]);
    wait_applied(&server, &ep, 3);

    // The same value again: nothing changes, not even the version.
    let same = server
        .cli(&["config", "set", "--app", "web", "FOO=two"])
        .ok();
    assert!(same.stdout.contains("nothing changed"), "{}", same.stdout);
    assert_eq!(app_version(&server, "web"), 3);

    // Changes that leave this instance's child environment as it is: a new version reaches the
    // instance and is applied, but the child is not restarted. WAYPOST_LOG_LEVEL configures
    // the entrypoint itself (live) and never reaches the child.
    server
        .cli(&[
            "config",
            "set",
            "--app",
            "web",
            "--deployment",
            "other",
            "FOO=x",
        ])
        .ok();
    server
        .cli(&["config", "set", "--app", "web", "WAYPOST_LOG_LEVEL=debug"])
        .ok();
    assert_eq!(app_version(&server, "web"), 5);
    wait_applied(&server, &ep, 5);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        file_lines(&ep, "starts").len(),
        2,
        "no restart for a change that leaves the child's environment as it is"
    );

    // The negative control for the above: the same kind of command with a real change does
    // restart the child.
    server
        .cli(&["config", "set", "--app", "web", "FOO=three"])
        .ok();
    assert_eq!(wait_lines(&ep, "values", 3)[2], "three|unset");
    wait_applied(&server, &ep, 6);

    // `instances` shows the version each instance runs.
    let table = server.cli(&["instances", "--app", "web"]).ok().stdout;
    assert!(table.contains("CONFIG") && table.contains("v6"), "{table}");
    let list = server.cli(&["config", "list", "--app", "web"]).ok().stdout;
    assert!(list.contains("config version 6"), "{list}");
    assert!(
        list.contains("FOO") && list.contains("deployment other"),
        "{list}"
    );
}

#[test]
fn deployment_values_override_app_values_and_unset_removes() {
    let server = Server::start(&[]);
    let blue = server.entrypoint_token("web", Some("blue"));
    let green = server.entrypoint_token("web", Some("green"));
    server
        .cli(&["config", "policy", "--app", "web", "--splay", "0"])
        .ok();
    server
        .cli(&["config", "set", "--app", "web", "FOO=app"])
        .ok();
    server
        .cli(&[
            "config",
            "set",
            "--app",
            "web",
            "--deployment",
            "blue",
            "FOO=blue",
        ])
        .ok();
    let Some(b) = spawn(Builder::with_token(&server, &blue, RECORDER)) else {
        return;
    };
    let Some(g) = spawn(Builder::with_token(&server, &green, RECORDER)) else {
        return;
    };
    assert_eq!(wait_lines(&b, "values", 1), ["blue|unset"]);
    assert_eq!(wait_lines(&g, "values", 1), ["app|unset"]);

    // Removing the override: blue falls back to the app value.
    server
        .cli(&[
            "config",
            "unset",
            "--app",
            "web",
            "--deployment",
            "blue",
            "FOO",
        ])
        .ok();
    assert_eq!(wait_lines(&b, "values", 2)[1], "app|unset");

    // Removing the app value: gone for everyone.
    server.cli(&["config", "unset", "--app", "web", "FOO"]).ok();
    assert_eq!(wait_lines(&b, "values", 3)[2], "unset|unset");
    assert_eq!(wait_lines(&g, "values", 2)[1], "unset|unset");
    let v = server
        .cli(&["config", "list", "--app", "web", "-o", "json"])
        .ok()
        .json();
    assert!(v["vars"].as_object().unwrap().is_empty(), "{v}");
    assert!(v["deployments"].as_object().unwrap().is_empty(), "{v}");
}

#[test]
fn files_are_written_and_signal_policy_signals_instead_of_restarting() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("etc/app/app.conf"); // parent directories do not exist yet
    let local = tmp.path().join("local.conf");
    std::fs::write(&local, "color=red\n").unwrap();
    server
        .cli(&[
            "config",
            "policy",
            "--app",
            "web",
            "--on-change",
            "signal:SIGHUP",
            "--splay",
            "0",
        ])
        .ok();
    let file_arg = format!("{}=@{}", conf.display(), local.display());
    server
        .cli(&[
            "config", "set", "--app", "web", "--file", &file_arg, "--mode", "0640",
        ])
        .ok();
    let list = server.cli(&["config", "list", "--app", "web"]).ok().stdout;
    assert!(
        list.contains("0640") && list.contains("signal:SIGHUP"),
        "{list}"
    );

    // The child reads the file at start and again on every SIGHUP.
    let script = r#"echo x >> "$D/starts"; cat "$CONF" > "$D/read.0"; n=0
trap 'n=$((n+1)); cat "$CONF" > "$D/read.$n"' HUP
while :; do sleep 0.05; done"#;
    let Some(ep) = spawn(
        Builder::with_token(&server, &token, script).env("CONF", &conf.display().to_string()),
    ) else {
        return;
    };
    assert_eq!(
        wait_for("the child to read the file", || ep
            .file("read.0")
            .filter(|s| !s.is_empty())),
        "color=red\n"
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o7777,
        0o640
    );

    // A new file version: written, then the child is signalled (and re-reads it), not restarted.
    std::fs::write(&local, "color=blue\n").unwrap();
    server
        .cli(&[
            "config", "set", "--app", "web", "--file", &file_arg, "--mode", "0600",
        ])
        .ok();
    assert_eq!(
        wait_for("the child to re-read the file after SIGHUP", || ep
            .file("read.1")
            .filter(|s| !s.is_empty())),
        "color=blue\n"
    );
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    assert_eq!(
        file_lines(&ep, "starts").len(),
        1,
        "signalled, not restarted"
    );

    // A variable change still restarts (env is fixed at exec) — the negative control for the
    // restart counter above.
    server.cli(&["config", "set", "--app", "web", "FOO=1"]).ok();
    wait_lines(&ep, "starts", 2);

    // Unsetting the file removes it.
    server
        .cli(&[
            "config",
            "unset",
            "--app",
            "web",
            "--file",
            &conf.display().to_string(),
        ])
        .ok();
    wait_for("the file to be removed", || (!conf.exists()).then_some(()));
}

/// Seconds since the epoch as a float, from `date +%s.%N` lines.
fn times(ep: &Entrypoint) -> Vec<f64> {
    file_lines(ep, "times")
        .iter()
        .map(|l| l.parse().unwrap())
        .collect()
}

#[test]
fn splay_spreads_restarts_within_its_bound() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let splay = Duration::from_secs(8);
    server
        .cli(&["config", "policy", "--app", "web", "--splay", "8s"])
        .ok();
    let script = r#"date +%s.%N >> "$D/times"; exec sleep 1000"#;
    let Some(a) = spawn(Builder::with_token(&server, &token, script)) else {
        return;
    };
    let Some(b) = spawn(Builder::with_token(&server, &token, script)) else {
        return;
    };
    wait_lines(&a, "times", 1);
    wait_lines(&b, "times", 1);
    wait_applied(&server, &a, 1);
    wait_applied(&server, &b, 1);

    let changed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    server
        .cli(&["config", "set", "--app", "web", "FOO=new"])
        .ok();
    wait_lines(&a, "times", 2);
    wait_lines(&b, "times", 2);
    let (ta, tb) = (times(&a)[1] - changed_at, times(&b)[1] - changed_at);
    eprintln!("restart delays after the change: {ta:.3}s and {tb:.3}s (splay {splay:?})");
    // Each within the splay (plus time to deliver and restart: a stop and a spawn).
    let slack = 3.0;
    for d in [ta, tb] {
        assert!(d >= 0.0 && d < splay.as_secs_f64() + slack, "delay {d}");
    }
    // Not at once: random delays in [0, 8s) land this close together about 0.5% of the time,
    // while without a splay both would restart within a few milliseconds of each other.
    assert!((ta - tb).abs() > 0.02, "restarted together: {ta} vs {tb}");
    assert!(ta.max(tb) > 0.2, "both restarted at once: {ta} vs {tb}");
}

#[test]
fn changes_while_disconnected_are_applied_once_on_reconnect() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    server
        .cli(&["config", "policy", "--app", "web", "--splay", "0"])
        .ok();
    server
        .cli(&["config", "set", "--app", "web", "FOO=v1"])
        .ok();
    let control = server.control_addr.clone();
    let Some(ep) = spawn(Builder::with_token(&server, &token, RECORDER)) else {
        return;
    };
    assert_eq!(wait_lines(&ep, "values", 1), ["v1|unset"]);
    wait_applied(&server, &ep, 2);

    // The server goes away; the instance cannot reach it while the config changes twice (on a
    // server listening elsewhere, with the same database).
    let env = server.kill();
    let other = Server::start_in(env, &["--control-addr", "127.0.0.1:0"]);
    assert_ne!(other.control_addr, control);
    other.cli(&["config", "set", "--app", "web", "FOO=v2"]).ok();
    other.cli(&["config", "set", "--app", "web", "FOO=v3"]).ok();
    assert_eq!(app_version(&other, "web"), 4);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        file_lines(&ep, "starts").len(),
        1,
        "the child is untouched while the server is away"
    );

    // Back on the address the instance knows: the newest version is applied, once.
    let (_, env) = other.terminate();
    let server = Server::start_in(env, &["--control-addr", &control]);
    assert_eq!(wait_lines(&ep, "values", 2), ["v1|unset", "v3|unset"]);
    wait_applied(&server, &ep, 4);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(file_lines(&ep, "starts").len(), 2, "applied exactly once");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let server = Server::start(&[]);
    server.create_app("web");
    server
        .cli(&["config", "set", "--app", "web", "GOOD=1"])
        .ok();
    let before = server
        .cli(&["config", "list", "--app", "web", "-o", "json"])
        .ok()
        .json();
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big");
    std::fs::write(&big, "x".repeat(1100 * 1024)).unwrap();
    let big_var = format!("BIG=@{}", big.display());
    let big_file = format!("/etc/big=@{}", big.display());

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["config", "set", "--app", "web", "--file", "etc/app.conf=x"],
            "relative",
        ),
        (
            vec![
                "config",
                "policy",
                "--app",
                "web",
                "--on-change",
                "signal:SIGNOPE",
            ],
            "unknown signal",
        ),
        (
            vec!["config", "policy", "--app", "web", "--on-change", "reload"],
            "invalid --on-change",
        ),
        (
            vec!["config", "set", "--app", "web", "1BAD=x"],
            "invalid variable name",
        ),
        (
            vec!["config", "set", "--app", "web", "BAD-NAME=x"],
            "invalid variable name",
        ),
        (
            vec!["config", "set", "--app", "web", "OK=1", &big_var],
            "limit",
        ),
        (
            vec!["config", "set", "--app", "web", "--file", &big_file],
            "limit",
        ),
        (
            vec!["config", "set", "--app", "nope", "A=1"],
            "no app named nope",
        ),
        (
            vec![
                "config", "set", "--app", "web", "--mode", "999", "--file", "/etc/x=1",
            ],
            "mode",
        ),
    ];
    for (args, want) in &cases {
        let r = server.cli(args).fails();
        assert!(
            r.stderr.contains(want),
            "{args:?}: expected {want:?} in {:?}",
            r.stderr
        );
    }

    // The server refuses the same on its own (a client that skips the CLI's checks).
    let api = server.api(Some(&server.admin_token()));
    let bodies = [
        (
            serde_json::json!({"files": [{"path": "etc/x", "contents_b64": ""}]}),
            "relative",
        ),
        (
            serde_json::json!({"policy": {"on_change": "signal:NOPE"}}),
            "unknown signal",
        ),
        (
            serde_json::json!({"set": {"1BAD": "x"}}),
            "invalid variable name",
        ),
        (
            serde_json::json!({"set": {"OK": "y", "BIG": "x".repeat(1100 * 1024)}}),
            "limit",
        ),
        (serde_json::json!({"unknown_field": 1}), "unknown field"),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (body, want) in &bodies {
        let (status, v) = rt
            .block_on(api.request(hyper::Method::PATCH, "/v1/apps/web/config", Some(body)))
            .unwrap();
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{want}: {v}");
    }
    let (status, _) = rt
        .block_on(api.request(
            hyper::Method::PATCH,
            "/v1/apps/nope/config",
            Some(&serde_json::json!({"set": {"A": "1"}})),
        ))
        .unwrap();
    assert_eq!(status, 404);

    let after = server
        .cli(&["config", "list", "--app", "web", "-o", "json"])
        .ok()
        .json();
    assert_eq!(before, after, "nothing changed");
    assert_eq!(after["version"], 1);
}

#[test]
fn config_survives_a_server_restart_and_a_first_connect_gets_it_in_welcome() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", Some("d1"));
    server
        .cli(&["config", "set", "--app", "web", "A=1", "B=2"])
        .ok();
    server
        .cli(&["config", "set", "--app", "web", "--deployment", "d1", "B=3"])
        .ok();
    let (_, env) = server.terminate();
    let server = Server::start_in(env, &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let id = new_id();
        let (_conn, welcome) = Fake::welcomed(&server, &token, &id).await;
        let cfg = welcome.config.expect("a snapshot in the Welcome");
        assert_eq!(cfg.version, 2);
        assert_eq!(cfg.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(cfg.env.get("B").map(String::as_str), Some("3"));
        assert_eq!(cfg.restart_splay_ms, 5000, "the default splay");

        // Already at that version: no snapshot.
        let mut hello = hello(&token, &new_id());
        hello.config_version = 2;
        let mut f = Fake::connect(&server).await;
        f.send(waypost_proto::Kind::Hello(hello).into()).await;
        match f.recv().await.and_then(|f| f.kind) {
            Some(waypost_proto::Kind::Welcome(w)) => assert!(w.config.is_none()),
            other => panic!("expected Welcome, got {other:?}"),
        }

        // A change is pushed at once to both connections, with the instance's own view.
        let t0 = Instant::now();
        let out = tokio::task::spawn_blocking({
            let cmd = server.env.command();
            move || {
                let mut cmd = cmd;
                cmd.args(["config", "set", "--app", "web", "A=9"])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(out.status.success());
        match f.recv().await.and_then(|f| f.kind) {
            Some(waypost_proto::Kind::Config(c)) => {
                assert_eq!(c.version, 3);
                assert_eq!(c.env.get("A").map(String::as_str), Some("9"));
                assert_eq!(c.env.get("B").map(String::as_str), Some("3"));
            }
            other => panic!("expected Config, got {other:?}"),
        }
        eprintln!("pushed within {:?}", t0.elapsed());
    });
}

#[test]
fn an_instance_that_cannot_apply_a_snapshot_reports_why() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    // Valid for the server, impossible on this machine: nothing can be created under /proc.
    server
        .cli(&[
            "config",
            "set",
            "--app",
            "web",
            "--file",
            "/proc/waypost-test/app.conf=x",
        ])
        .ok();
    let Some(ep) = spawn(Builder::with_token(&server, &token, RECORDER)) else {
        return;
    };
    let v = wait_for("the instance's failure in `config list`", || {
        let v = server
            .cli(&["config", "list", "--app", "web", "-o", "json"])
            .ok()
            .json();
        v["instances"][0]["error"].is_string().then_some(v)
    });
    let err = v["instances"][0]["error"].as_str().unwrap();
    assert!(
        err.contains("version 1") && err.contains("/proc/waypost-test"),
        "{err}"
    );
    assert_eq!(v["instances"][0]["applied_version"], 0);
    let text = server.cli(&["config", "list", "--app", "web"]).ok().stdout;
    assert!(text.contains("failed"), "{text}");
    drop(ep);
}
