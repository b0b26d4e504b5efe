//! Dynamic config from config sources end to end: a real OpenBao dev server and a real etcd
//! (`waypost_testkit::{bao, etcd}`), the real server resolving values, the real entrypoint, and
//! `sh` children that append one line per start (when, and the value they got) under `$D`.
//! Restarts are counted from those lines, so every "no restart" check has a positive
//! counterpart that shows a restart would have been seen.
//!
//! A missing `bao`, `etcd` or entrypoint binary fails these tests: they never skip.

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::*;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use waypost_testkit::bao::Bao;
use waypost_testkit::etcd::Etcd;

/// The child: one line per start, `SECONDS.NANOS|VALUE` of `$VAR` (which variable: `$VAR`
/// names it), then waits to be stopped.
const RECORDER: &str = r#"eval "v=\${$VAR-unset}"; printf '%s|%s\n' "$(date +%s.%N)" "$v" >> "$D/starts"; exec sleep 1000"#;

/// Margin for a change to travel: source → server → entrypoint → restarted child, on a
/// loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(3);

/// The real entrypoint running [`RECORDER`] over `var`, for `app` on `server`; panics (never
/// skips) without an entrypoint binary.
fn recorder(server: &Server, app: &str, var: &str) -> Entrypoint {
    spawn(Builder::new(server, app, RECORDER).env("VAR", var))
}

fn spawn(b: Builder) -> Entrypoint {
    b.env("WAYPOST_STARTUP_TIMEOUT", "20s").spawn().expect(
        "the entrypoint binary is needed: set WAYPOST_ENTRYPOINT_BIN or build waypost-entrypoint",
    )
}

/// The lines of `$D/name` so far.
fn lines(ep: &Entrypoint, name: &str) -> Vec<String> {
    ep.file(name)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The values the child had at each start so far.
fn starts(ep: &Entrypoint) -> Vec<String> {
    lines(ep, "starts")
        .iter()
        .map(|l| l.split_once('|').expect("time|value").1.to_string())
        .collect()
}

/// When (seconds since the epoch) the child started each time.
fn start_times(ep: &Entrypoint) -> Vec<f64> {
    lines(ep, "starts")
        .iter()
        .map(|l| l.split_once('|').expect("time|value").0.parse().unwrap())
        .collect()
}

/// Waits for the child's `n`th start and returns the values of all starts so far.
fn wait_starts(ep: &Entrypoint, n: usize) -> Vec<String> {
    wait_for(
        &format!(
            "start {n} of the child (starts so far: {:?})\n{}",
            starts(ep),
            ep.stderr()
        ),
        || {
            let s = starts(ep);
            (s.len() >= n).then_some(s)
        },
    )
}

/// Waits `quiet`, then asserts the child has started exactly `values` (no more, no fewer).
fn assert_steady(ep: &Entrypoint, quiet: Duration, values: &[&str], why: &str) {
    std::thread::sleep(quiet);
    assert_eq!(starts(ep), values, "{why}\n{}", ep.stderr());
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `config source set NAME --kind openbao --addr … --token ROOT --refresh REFRESH`.
fn bao_source(server: &Server, name: &str, bao: &Bao, refresh: &str) {
    server
        .cli(&[
            "config",
            "source",
            "set",
            name,
            "--kind",
            "openbao",
            "--addr",
            &bao.addr,
            "--token",
            &bao.token,
            "--refresh",
            refresh,
        ])
        .ok();
}

/// An app with `--splay 0` (so restarts can be counted at once) and the given on-change policy.
fn app_with_policy(server: &Server, app: &str, on_change: &str) {
    server.create_app(app);
    server
        .cli(&[
            "config",
            "policy",
            "-a",
            app,
            "--on-change",
            on_change,
            "--splay",
            "0",
        ])
        .ok();
}

/// `config set -a APP --dynamic KEY=REF`.
fn set_dynamic(server: &Server, app: &str, key: &str, reference: &str) {
    server
        .cli(&[
            "config",
            "set",
            "-a",
            app,
            "--dynamic",
            &format!("{key}={reference}"),
        ])
        .ok();
}

/// The entry of variable `key` in `config list -a APP -o json`.
fn entry(server: &Server, app: &str, key: &str) -> serde_json::Value {
    let v = server
        .cli(&["config", "list", "-a", app, "-o", "json"])
        .ok()
        .json();
    v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["key"] == key)
        .unwrap_or_else(|| panic!("no entry {key} in {v}"))
        .clone()
}

/// Waits until the dynamic variable `key` has `status` and returns its entry.
fn wait_status(server: &Server, app: &str, key: &str, status: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_for(&format!("{key} to be {status}"), || {
        last = entry(server, app, key);
        (last["status"] == status).then(|| last.clone())
    })
}

/// `config get -a APP KEY --reveal`: the value instances get now.
fn revealed(server: &Server, app: &str, key: &str) -> String {
    server
        .cli(&["config", "get", "-a", app, key, "--reveal"])
        .ok()
        .stdout
        .trim_end_matches('\n')
        .to_string()
}

/// `bao kv put secret/web password=VALUE`.
fn put_password(bao: &Bao, value: &str) {
    bao.cli(&["kv", "put", "secret/web", &format!("password={value}")]);
}

/// The remaining TTL (seconds) `bao token lookup` gives `token`, or why it is not valid.
fn token_ttl(bao: &Bao, token: &str) -> Result<u64, String> {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new("bao")
        .args(["token", "lookup", "-format=json", token])
        .env("BAO_ADDR", &bao.addr)
        .env("BAO_TOKEN", &bao.token)
        .env("HOME", home.path())
        .env_remove("VAULT_ADDR")
        .env_remove("VAULT_TOKEN")
        .output()
        .expect("running bao token lookup");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    v["data"]["ttl"]
        .as_u64()
        .filter(|ttl| *ttl > 0)
        .ok_or_else(|| format!("no remaining TTL: {v}"))
}

#[test]
fn a_kv_secret_becomes_env_and_rotation_restarts_once() {
    let t0 = Instant::now();
    let bao = Bao::start();
    put_password(&bao, "one");
    let server = Server::start(&[]);
    app_with_policy(&server, "web", "restart");
    bao_source(&server, "bao", &bao, "1s");
    set_dynamic(&server, "web", "DB_PASS", "bao:secret/data/web#password");

    // Started right away: the entrypoints wait for the first read, so no child ever starts
    // without the value.
    let a = recorder(&server, "web", "DB_PASS");
    let b = recorder(&server, "web", "DB_PASS");
    assert_eq!(wait_starts(&a, 1), ["one"]);
    assert_eq!(wait_starts(&b, 1), ["one"]);
    let e = wait_status(&server, "web", "DB_PASS", "ok");
    assert_eq!(e["dynamic"], "bao:secret/data/web#password", "{e}");
    assert!(e["value"].is_null(), "dynamic values are never listed: {e}");
    assert_eq!(revealed(&server, "web", "DB_PASS"), "one");
    let masked = server.cli(&["config", "get", "-a", "web", "DB_PASS"]).ok();
    assert!(!masked.stdout.contains("one"), "{}", masked.stdout);

    // What a session on the instance sees: the app's environment, the resolved value in it.
    let id = a.instance(&server)["id"].as_str().unwrap().to_string();
    let r = server
        .cli(&["exec", "--app", "web", "--instance", &id, "--", "env"])
        .ok();
    assert!(r.stdout.lines().any(|l| l == "DB_PASS=one"), "{}", r.stdout);

    // Rotated: every instance restarts once, with the new value.
    put_password(&bao, "two");
    assert_eq!(wait_starts(&a, 2), ["one", "two"]);
    assert_eq!(wait_starts(&b, 2), ["one", "two"]);
    assert_steady(&a, MARGIN, &["one", "two"], "one restart per rotation");
    assert_eq!(starts(&b), ["one", "two"], "one restart per rotation");
    assert_eq!(revealed(&server, "web", "DB_PASS"), "two");

    // The same value again (a new KV version): several refreshes later, nothing restarted.
    put_password(&bao, "two");
    assert_steady(&a, MARGIN, &["one", "two"], "same value: no restart");
    assert_eq!(starts(&b), ["one", "two"], "same value: no restart");

    // The control: refreshing still works, and a real change still restarts, once.
    put_password(&bao, "three");
    assert_eq!(wait_starts(&a, 3), ["one", "two", "three"]);
    assert_eq!(wait_starts(&b, 3), ["one", "two", "three"]);
    assert_steady(&b, Duration::from_secs(2), &["one", "two", "three"], "once");
    eprintln!(
        "a_kv_secret_becomes_env_and_rotation_restarts_once took {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_leased_secret_is_renewed_or_read_anew_and_the_file_follows() {
    let t0 = Instant::now();
    let bao = Bao::start();
    let server = Server::start(&[]);
    app_with_policy(&server, "web", "signal:SIGHUP");
    bao_source(&server, "bao", &bao, "30s");
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("secrets/token");
    let file_arg = format!(
        "{}=bao:auth/token/create?ttl=10s&explicit_max_ttl=25s&policies=default#client_token",
        tok.display()
    );
    server
        .cli(&[
            "config",
            "set",
            "-a",
            "web",
            "--dynamic",
            "--file",
            &file_arg,
        ])
        .ok();

    // The child reads the file at start and again on every SIGHUP (one line per read).
    let script = r#"echo x >> "$D/starts"; cat "$TOK" >> "$D/seen"; echo >> "$D/seen"
trap 'cat "$TOK" >> "$D/seen"; echo >> "$D/seen"' HUP
while :; do sleep 0.05; done"#;
    let ep = spawn(Builder::new(&server, "web", script).env("TOK", &tok.display().to_string()));
    let first = wait_for("the child to read the token file", || {
        lines(&ep, "seen")
            .first()
            .filter(|t| !t.is_empty())
            .cloned()
    });
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&tok).unwrap().permissions().mode() & 0o777,
        0o600,
        "a dynamic file is private by default"
    );

    // Over several TTLs and past the token's max TTL (renewed at ⅔ of its TTL, read anew before
    // the max TTL): every look finds a valid token, and the token changes.
    let mut tokens = vec![first.clone()];
    let until = Instant::now() + Duration::from_secs(36);
    while Instant::now() < until {
        let t = std::fs::read_to_string(&tok).unwrap();
        let at = t0.elapsed();
        match token_ttl(&bao, &t) {
            Ok(ttl) => eprintln!("{at:?}: token …{} valid, ttl {ttl}s", &t[t.len() - 4..]),
            Err(e) => panic!("{at:?}: the app's token is not valid: {e}"),
        }
        if tokens.last() != Some(&t) {
            tokens.push(t);
        }
        // Often enough that the last stretch of a token (⅓ of its final TTL, here under 2 s)
        // cannot pass unseen.
        std::thread::sleep(Duration::from_millis(800));
    }
    assert!(
        tokens.len() >= 2,
        "the token was never read anew: {tokens:?}"
    );
    assert_eq!(
        lines(&ep, "starts").len(),
        1,
        "a file change under signal:SIGHUP signals, never restarts"
    );
    let seen = lines(&ep, "seen");
    assert!(
        tokens[1..].iter().all(|t| seen.contains(t)),
        "the child was signalled to re-read each new token: saw {seen:?}, had {tokens:?}"
    );
    let e = server
        .cli(&["config", "list", "-a", "web", "-o", "json"])
        .ok()
        .json();
    assert_eq!(e["files"][0]["status"], "ok", "{e}");
    eprintln!(
        "a_leased_secret_is_renewed_or_read_anew_and_the_file_follows took {:?} ({} tokens)",
        t0.elapsed(),
        tokens.len()
    );
}

#[test]
fn an_etcd_put_reaches_the_app_within_a_second() {
    let t0 = Instant::now();
    let etcd = Etcd::start();
    etcd.put("/config/web/color", "red");
    let server = Server::start(&[]);
    app_with_policy(&server, "web", "restart");
    // A refresh far longer than the wait below: only the watch can explain a fast update.
    server
        .cli(&[
            "config",
            "source",
            "set",
            "kv",
            "--kind",
            "etcd",
            "--addr",
            &etcd.addr,
            "--refresh",
            "60s",
        ])
        .ok();
    set_dynamic(&server, "web", "COLOR", "kv:/config/web/color");
    let ep = recorder(&server, "web", "COLOR");
    assert_eq!(wait_starts(&ep, 1), ["red"]);
    wait_status(&server, "web", "COLOR", "ok");
    // Let the watch be established after the first read.
    std::thread::sleep(Duration::from_millis(500));

    let put_at = now_secs();
    etcd.put("/config/web/color", "blue");
    assert_eq!(wait_starts(&ep, 2), ["red", "blue"]);
    let latency = start_times(&ep)[1] - put_at;
    eprintln!("etcd put → child restarted with the new value: {latency:.3}s");
    assert!(
        (0.0..5.0).contains(&latency),
        "latency {latency:.3}s: not watched?"
    );
    assert_eq!(revealed(&server, "web", "COLOR"), "blue");
    assert_steady(
        &ep,
        Duration::from_secs(2),
        &["red", "blue"],
        "one restart per put",
    );
    eprintln!(
        "an_etcd_put_reaches_the_app_within_a_second took {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_stopped_source_keeps_last_values_and_resumes_without_spurious_restart() {
    let t0 = Instant::now();
    let mut bao = Bao::start();
    put_password(&bao, "one");
    let server = Server::start(&[]);
    app_with_policy(&server, "web", "restart");
    bao_source(&server, "bao", &bao, "1s");
    set_dynamic(&server, "web", "DB_PASS", "bao:secret/data/web#password");
    wait_status(&server, "web", "DB_PASS", "ok");
    let mut ep = recorder(&server, "web", "DB_PASS");
    assert_eq!(wait_starts(&ep, 1), ["one"]);

    // The source goes away: the value is stale, kept, and nothing restarts.
    bao.stop();
    let e = wait_status(&server, "web", "DB_PASS", "stale");
    let err = e["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {e}"));
    assert!(!err.is_empty(), "{e}");
    eprintln!("while OpenBao is down: {err}");
    assert_eq!(
        revealed(&server, "web", "DB_PASS"),
        "one",
        "the last good value"
    );
    let table = server.cli(&["config", "list", "-a", "web"]).ok().stdout;
    assert!(table.contains("stale"), "{table}");
    assert_steady(&ep, MARGIN, &["one"], "a failing source restarts nothing");
    assert!(ep.running());

    // Back (empty: dev mode) with the same value: current again, still no restart.
    bao.start_again();
    put_password(&bao, "one");
    let e = wait_status(&server, "web", "DB_PASS", "ok");
    assert!(e["error"].is_null(), "{e}");
    assert_steady(
        &ep,
        MARGIN,
        &["one"],
        "the same value after an outage: no restart",
    );

    // And a new value after that: exactly one restart.
    put_password(&bao, "two");
    assert_eq!(wait_starts(&ep, 2), ["one", "two"]);
    assert_steady(
        &ep,
        Duration::from_secs(2),
        &["one", "two"],
        "exactly one restart",
    );
    eprintln!(
        "a_stopped_source_keeps_last_values_and_resumes_without_spurious_restart took {:?}",
        t0.elapsed()
    );
}

#[test]
fn approle_auth_works() {
    let t0 = Instant::now();
    let bao = Bao::start();
    put_password(&bao, "one");
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("read-secret.hcl");
    std::fs::write(&policy, "path \"secret/*\" { capabilities = [\"read\"] }\n").unwrap();
    bao.cli(&["auth", "enable", "approle"]);
    bao.cli(&[
        "policy",
        "write",
        "read-secret",
        &policy.display().to_string(),
    ]);
    // Tokens that cannot outlive 6 s: the server must log in again to keep reading.
    bao.cli(&[
        "write",
        "auth/approle/role/web",
        "token_policies=read-secret",
        "token_ttl=3s",
        "token_max_ttl=6s",
    ]);
    let role_id = bao.cli(&["read", "-field=role_id", "auth/approle/role/web/role-id"]);
    let secret_id = bao.cli(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/web/secret-id",
    ]);
    let approle = format!("{}:{}", role_id.trim(), secret_id.trim());

    let server = Server::start(&[]);
    app_with_policy(&server, "web", "restart");
    server
        .cli(&[
            "config",
            "source",
            "set",
            "bao",
            "--kind",
            "openbao",
            "--addr",
            &bao.addr,
            "--approle",
            &approle,
            "--refresh",
            "1s",
        ])
        .ok();
    let list = server.cli(&["config", "source", "list", "-o", "json"]).ok();
    assert_eq!(
        list.json()["sources"][0]["auth"],
        "approle",
        "{}",
        list.stdout
    );
    assert!(!list.stdout.contains(secret_id.trim()), "{}", list.stdout);
    set_dynamic(&server, "web", "DB_PASS", "bao:secret/data/web#password");
    let ep = recorder(&server, "web", "DB_PASS");
    assert_eq!(wait_starts(&ep, 1), ["one"]);

    // Each update after the previous login's token has expired (> max TTL 6 s).
    let mut want = vec!["one".to_string()];
    for value in ["two", "three"] {
        std::thread::sleep(Duration::from_secs(7));
        let e = entry(&server, "web", "DB_PASS");
        eprintln!(
            "{:?}: DB_PASS is {} {}",
            t0.elapsed(),
            e["status"],
            e["error"]
        );
        put_password(&bao, value);
        want.push(value.to_string());
        assert_eq!(wait_starts(&ep, want.len()), want, "{value} after re-login");
    }
    assert_eq!(revealed(&server, "web", "DB_PASS"), "three");
    wait_status(&server, "web", "DB_PASS", "ok");
    eprintln!("approle_auth_works took {:?}", t0.elapsed());
}

#[test]
fn a_server_restart_does_not_restart_the_app() {
    let t0 = Instant::now();
    let bao = Bao::start();
    put_password(&bao, "one");
    let server = Server::start(&[]);
    app_with_policy(&server, "web", "restart");
    bao_source(&server, "bao", &bao, "1s");
    set_dynamic(&server, "web", "DB_PASS", "bao:secret/data/web#password");
    let ep = recorder(&server, "web", "DB_PASS");
    assert_eq!(wait_starts(&ep, 1), ["one"]);
    let id = ep.instance(&server)["id"].clone();
    let control = server.control_addr.clone();

    // The server restarts on the address the instance knows; it has to read the source again
    // (values live in its memory only) while the instance reconnects.
    let (_, env) = server.terminate();
    let server = Server::start_in(env, &["--control-addr", &control]);
    let back = ep.instance(&server);
    assert_eq!(back["id"], id, "the same instance reconnected");
    wait_status(&server, "web", "DB_PASS", "ok");
    assert_steady(
        &ep,
        MARGIN,
        &["one"],
        "a server restart does not restart the app",
    );
    assert_eq!(revealed(&server, "web", "DB_PASS"), "one");

    // The control: the reconnected instance does follow changes from the new server.
    put_password(&bao, "two");
    assert_eq!(wait_starts(&ep, 2), ["one", "two"]);
    assert_steady(
        &ep,
        Duration::from_secs(2),
        &["one", "two"],
        "exactly one restart",
    );
    eprintln!(
        "a_server_restart_does_not_restart_the_app took {:?}",
        t0.elapsed()
    );
}

#[test]
fn bad_sources_are_refused_and_credentials_never_shown() {
    let t0 = Instant::now();
    let bao = Bao::start();
    put_password(&bao, "one");
    let server = Server::start(&[]);
    server.create_app("web");
    let refused: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "config",
                "source",
                "set",
                "bad",
                "--kind",
                "openbao",
                "--addr",
                "127.0.0.1:8200",
            ],
            "http://",
        ),
        (
            vec![
                "config",
                "source",
                "set",
                "bad",
                "--kind",
                "etcd",
                "--addr",
                "http://127.0.0.1:2379",
                "--approle",
                "role:secret",
            ],
            "AppRole",
        ),
        (
            vec![
                "config",
                "source",
                "set",
                "bad",
                "--kind",
                "consul",
                "--addr",
                "http://x:1",
            ],
            "unknown source kind",
        ),
    ];
    for (args, want) in &refused {
        let r = server.cli(args).fails();
        assert!(
            r.stderr.contains(want),
            "{args:?}: want {want:?} in {:?}",
            r.stderr
        );
    }
    let none = server.cli(&["config", "source", "list", "-o", "json"]).ok();
    assert_eq!(
        none.json()["sources"],
        serde_json::json!([]),
        "nothing stored"
    );

    // A working source, in use, so its token has been used by the server.
    bao_source(&server, "bao", &bao, "1s");
    set_dynamic(&server, "web", "DB_PASS", "bao:secret/data/web#password");
    wait_status(&server, "web", "DB_PASS", "ok");
    for args in [
        &["config", "source", "list"][..],
        &["config", "source", "list", "-o", "json"],
        &["config", "list", "-a", "web", "-o", "json"],
    ] {
        let out = server.cli(args).ok().stdout;
        assert!(out.contains("bao"), "{args:?}: {out}");
        assert!(!out.contains(&bao.token), "{args:?} shows the token: {out}");
    }
    let v = server
        .cli(&["config", "source", "list", "-o", "json"])
        .ok()
        .json();
    assert_eq!(v["sources"][0]["auth"], "token", "{v}");
    assert_eq!(v["sources"][0]["paths"], 1, "{v}");
    assert!(
        !server.logs().contains(&bao.token),
        "the server logged the source's token"
    );

    // An entrypoint's token is no admin: it can neither list nor change sources.
    let ep_token = server.entrypoint_token("web", None);
    let api = server.api(Some(&ep_token));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, v) = rt
        .block_on(api.request(hyper::Method::GET, "/v1/config/sources", None))
        .unwrap();
    assert!(matches!(status.as_u16(), 401 | 403), "{status}: {v}");
    assert!(!v.to_string().contains(&bao.token), "{v}");
    let body = serde_json::json!({"kind": "openbao", "addr": "http://127.0.0.1:1"});
    let (status, v) = rt
        .block_on(api.request(hyper::Method::PUT, "/v1/config/sources/evil", Some(&body)))
        .unwrap();
    assert!(matches!(status.as_u16(), 401 | 403), "{status}: {v}");
    let mut cmd = server.env.command();
    let r = Run::from_output(
        cmd.args(["config", "source", "list"])
            .env("WAYPOST_ADMIN_TOKEN", &ep_token)
            .env("WAYPOST_ADDR", &server.api_addr)
            .env("WAYPOST_CA", server.env.data_dir().join("ca.pem"))
            .output()
            .unwrap(),
    );
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    assert!(!r.stdout.contains(&bao.token), "{}", r.stdout);

    // The source is still in use: removing it is refused, with the reason.
    let r = server.cli(&["config", "source", "unset", "bao"]).fails();
    assert!(r.stderr.contains("DB_PASS"), "{}", r.stderr);
    eprintln!(
        "bad_sources_are_refused_and_credentials_never_shown took {:?}",
        t0.elapsed()
    );
}

/// A TCP proxy to `target` on a free loopback port that counts the connections it accepted
/// (the server's source client makes one connection per request). Returns (address, counter).
fn counting_proxy(target: &str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let (target, n) = (target.to_string(), count.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { continue };
            n.fetch_add(1, Ordering::SeqCst);
            let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let (mut c1, mut u1) = (client, upstream);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c1, &mut u1);
                let _ = u1.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, count)
}

#[test]
fn the_server_reads_a_path_once_however_many_instances_use_it() {
    use std::sync::atomic::Ordering;
    let bao = Bao::start();
    put_password(&bao, "one");
    let (proxy, requests) = counting_proxy(bao.addr.trim_start_matches("http://"));
    let server = Server::start(&[]);
    server
        .cli(&[
            "config",
            "source",
            "set",
            "bao",
            "--kind",
            "openbao",
            "--addr",
            &format!("http://{proxy}"),
            "--token",
            &bao.token,
            "--refresh",
            "1s",
        ])
        .ok();
    app_with_policy(&server, "web", "restart");
    // Two variables from the same path: still one read per refresh.
    set_dynamic(&server, "web", "DB_PASS", "bao:secret/data/web#password");
    set_dynamic(&server, "web", "DB_PASS2", "bao:secret/data/web#password");
    let eps: Vec<Entrypoint> = (0..6)
        .map(|_| recorder(&server, "web", "DB_PASS"))
        .collect();
    for ep in &eps {
        assert_eq!(wait_starts(ep, 1), ["one"]);
    }
    let before = requests.load(Ordering::SeqCst);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(6));
    let reads = requests.load(Ordering::SeqCst) - before;
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "{reads} requests to OpenBao in {elapsed:.1} s with 6 instances, 2 variables, refresh 1 s"
    );
    // Once per refresh (plus one for timing slack), not once per instance or variable: the
    // instances each polling would make at least 36 (and the entrypoints have no route there).
    assert!(
        reads >= 3 && reads <= elapsed.ceil() as usize + 1,
        "{reads} requests in {elapsed:.1} s"
    );
}
