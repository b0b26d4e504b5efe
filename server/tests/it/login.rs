//! Remote operators: named admin tokens (create, list, use, revoke, expiry), `waypost login`
//! into a context file of another "machine", and `waypost context list|use|remove` — with the
//! real server and the real CLI.

use crate::common::*;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The CLI with `context` as its context file: another machine's CLI, same server.
fn cli_with(server: &Server, context: &Path, args: &[&str]) -> Run {
    Run::from_output(
        server
            .env
            .command()
            .env("WAYPOST_CONTEXT", context)
            .args(args)
            .output()
            .unwrap(),
    )
}

/// A second context file's path in the server's temp dir (not created).
fn laptop(server: &Server, name: &str) -> PathBuf {
    server.env.root.path().join(format!("{name}.json"))
}

fn ca_file(server: &Server) -> String {
    server
        .env
        .data_dir()
        .join("ca.pem")
        .to_str()
        .unwrap()
        .to_string()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("context file")).unwrap()
}

/// `token list -o json`'s rows.
fn tokens(server: &Server) -> Vec<serde_json::Value> {
    server.cli(&["token", "list", "-o", "json"]).ok().json()["tokens"]
        .as_array()
        .unwrap()
        .clone()
}

fn token_named<'a>(all: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    all.iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no token named {name}: {all:?}"))
}

/// What `openssl x509 -fingerprint -sha256` prints for the server's CA.
fn ca_fingerprint(server: &Server) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::pem_slice_iter(server.ca_pem().as_bytes())
        .next()
        .unwrap()
        .unwrap();
    ring::digest::digest(&ring::digest::SHA256, &der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn a_second_admin_token_logs_in_elsewhere_and_revoking_it_takes_effect_at_once() {
    let server = Server::start(&[]);
    // The first-start token is `initial`.
    let initial = token_named(&tokens(&server), "initial").clone();
    assert_eq!(initial["kind"], "admin");
    assert!(initial["expires_at"].is_null());

    let created = server
        .cli(&[
            "token", "create", "--admin", "--name", "alice", "-o", "json",
        ])
        .ok()
        .json();
    let alice = created["token"].as_str().unwrap().to_string();
    assert_eq!(created["name"], "alice");
    assert_eq!(created["kind"], "admin");
    // Names are unique among admin tokens.
    let dup = server
        .cli(&["token", "create", "--admin", "--name", "alice"])
        .fails();
    assert!(dup.stderr.contains("already exists"), "{}", dup.stderr);
    // An admin token has no app.
    let bad = server
        .cli(&["token", "create", "--admin", "--app", "web"])
        .fails();
    assert!(bad.stderr.contains("no app"), "{}", bad.stderr);

    // Listed: kind, name, created, expires.
    let all = tokens(&server);
    let row = token_named(&all, "alice");
    assert_eq!(row["id"], created["id"]);
    assert_eq!(row["expired"], false);
    let table = server.cli(&["token", "list"]).ok().stdout;
    let line = table.lines().find(|l| l.contains("alice")).unwrap();
    assert!(line.contains("admin") && line.contains("never"), "{table}");
    assert!(table.lines().next().unwrap().contains("EXPIRES"), "{table}");

    // Alice logs in from her machine (its own context file) with the CA file and her token.
    let ctx = laptop(&server, "alice");
    let out = cli_with(
        &server,
        &ctx,
        &[
            "login",
            &server.api_addr,
            "--token",
            &alice,
            "--ca",
            &ca_file(&server),
            "--name",
            "prod",
        ],
    )
    .ok();
    assert!(out.stdout.contains("context prod"), "{}", out.stdout);
    let file = read_json(&ctx);
    assert_eq!(file["current"], "prod");
    assert_eq!(file["contexts"]["prod"]["admin_token"], alice.as_str());
    assert_eq!(
        file["contexts"]["prod"]["control_addr"],
        server.control_addr.as_str()
    );
    // The old single-context fields mirror the current context, for older readers.
    assert_eq!(file["admin_token"], alice.as_str());
    assert_eq!(
        std::fs::metadata(&ctx).unwrap().permissions().mode() & 0o777,
        0o600
    );
    cli_with(&server, &ctx, &["app", "create", "web"]).ok();
    let list = cli_with(&server, &ctx, &["context", "list"]).ok().stdout;
    assert!(
        list.lines()
            .any(|l| l.starts_with('*') && l.contains("prod")),
        "{list}"
    );
    // The server's own context file is untouched.
    let own = read_json(&server.env.context_path());
    assert_eq!(own["current"], "default");
    assert!(own["contexts"].get("prod").is_none());

    // Revoked with the initial token: Alice's next call is refused at once.
    let id = created["id"].as_str().unwrap();
    let out = server.cli(&["token", "revoke", id]).ok();
    assert!(out.stdout.contains("revoked admin token"), "{}", out.stdout);
    let refused = cli_with(&server, &ctx, &["app", "list"]).fails();
    assert!(
        refused.stderr.contains("invalid token") && refused.stderr.contains("401"),
        "{}",
        refused.stderr
    );
    assert!(tokens(&server).iter().all(|t| t["name"] != "alice"));

    // The last admin token cannot be revoked, and the error says why.
    let last = server
        .cli(&["token", "revoke", initial["id"].as_str().unwrap()])
        .fails();
    assert!(last.stderr.contains("last admin token"), "{}", last.stderr);
    server.cli(&["app", "list"]).ok();
}

#[test]
fn login_by_fingerprint_needs_a_confirmation_and_a_valid_token() {
    let server = Server::start(&[]);
    let admin = server.admin_token();
    let fp = ca_fingerprint(&server);

    // Not a terminal and no --yes: refused, the fingerprint shown, nothing written.
    let ctx = laptop(&server, "fp");
    let out = cli_with(
        &server,
        &ctx,
        &["login", &server.api_addr, "--token", &admin],
    )
    .fails();
    assert!(
        out.stderr.contains("not a terminal") && out.stderr.contains(&fp),
        "{}",
        out.stderr
    );
    assert!(!ctx.exists());

    // A wrong token, or an entrypoint token: refused by the server, nothing written.
    let app_token = server.entrypoint_token("web", None);
    for (token, want) in [
        (
            "wpa_0000000000000000000000000000000000000000",
            "invalid token",
        ),
        (app_token.as_str(), "entrypoint token"),
    ] {
        let out = cli_with(
            &server,
            &ctx,
            &["login", &server.api_addr, "--token", token, "--yes"],
        );
        // Not `fails()`: with --yes the fingerprint is shown on stderr before the error.
        assert_ne!(out.code, Some(0), "{}", out.stdout);
        let last = out.stderr.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.contains("refused the token") && last.contains(want),
            "{}",
            out.stderr
        );
        assert!(!ctx.exists(), "a refused login wrote {}", ctx.display());
    }

    // --yes: the fetched CA is trusted; its fingerprint is shown; the token comes from stdin
    // (not a terminal: one line). Given as https://…, the scheme is dropped.
    let mut child = server
        .env
        .command()
        .env("WAYPOST_CONTEXT", &ctx)
        .args(["login", &format!("https://{}", server.api_addr), "--yes"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{admin}").unwrap();
    let out = Run::from_output(child.wait_with_output().unwrap()).ok();
    assert!(out.stderr.contains(&fp), "{}", out.stderr);
    let file = read_json(&ctx);
    // Named after the host by default.
    assert_eq!(file["current"], "127.0.0.1");
    assert_eq!(
        file["contexts"]["127.0.0.1"]["ca_pem"]
            .as_str()
            .unwrap()
            .trim(),
        server.ca_pem().trim()
    );
    assert_eq!(
        file["contexts"]["127.0.0.1"]["api_addr"],
        server.api_addr.as_str()
    );
    cli_with(&server, &ctx, &["app", "list"]).ok();
}

#[test]
fn an_expired_admin_token_is_refused_saying_it_expired() {
    let server = Server::start(&[]);
    let created = server
        .cli(&[
            "token", "create", "--admin", "--name", "brief", "--ttl", "1s", "-o", "json",
        ])
        .ok()
        .json();
    let token = created["token"].as_str().unwrap().to_string();
    assert!(created["expires_at"].is_string(), "{created}");
    let with_token = |args: &[&str]| {
        Run::from_output(
            server
                .env
                .command()
                .env("WAYPOST_ADMIN_TOKEN", &token)
                .args(args)
                .output()
                .unwrap(),
        )
    };
    // WAYPOST_ADMIN_TOKEN overrides the context's token. Valid for its first second (the
    // call is made at once; a slow machine makes this the only timing assumption).
    with_token(&["app", "list"]).ok();
    std::thread::sleep(std::time::Duration::from_millis(1300));
    let out = with_token(&["app", "list"]).fails();
    assert!(
        out.stderr.contains("this admin token expired at")
            && out.stderr.contains("waypost token create --admin")
            && out.stderr.contains("401"),
        "{}",
        out.stderr
    );
    // Listed as expired.
    let all = tokens(&server);
    assert_eq!(token_named(&all, "brief")["expired"], true);
    let table = server.cli(&["token", "list"]).ok().stdout;
    assert!(
        table
            .lines()
            .any(|l| l.contains("brief") && l.contains("(expired)")),
        "{table}"
    );
    // Login with it is refused with the same reason.
    let ctx = laptop(&server, "late");
    let out = cli_with(
        &server,
        &ctx,
        &[
            "login",
            &server.api_addr,
            "--token",
            &token,
            "--ca",
            &ca_file(&server),
        ],
    )
    .fails();
    assert!(out.stderr.contains("expired"), "{}", out.stderr);
    assert!(!ctx.exists());
    // An expired token does not count as another admin: `initial` stays the last valid one.
    let initial = token_named(&all, "initial")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let last = server.cli(&["token", "revoke", &initial]).fails();
    assert!(last.stderr.contains("last admin token"), "{}", last.stderr);
    // The expired one can be revoked.
    let id = created["id"].as_str().unwrap();
    server.cli(&["token", "revoke", id]).ok();
}

#[test]
fn contexts_list_use_remove_and_an_old_single_context_file_still_works() {
    let server = Server::start(&[]);
    let admin = server.admin_token();
    // The file of earlier versions: one context, no names.
    let old = laptop(&server, "old");
    let old_doc = serde_json::json!({
        "api_addr": server.api_addr,
        "ca_pem": server.ca_pem(),
        "admin_token": admin,
        "control_addr": server.control_addr,
    });
    std::fs::write(&old, old_doc.to_string()).unwrap();
    cli_with(&server, &old, &["app", "create", "web"]).ok();
    let list = cli_with(&server, &old, &["context", "list"]).ok().stdout;
    assert!(
        list.lines()
            .any(|l| l.starts_with('*') && l.contains("default") && l.contains(&server.api_addr)),
        "{list}"
    );

    // A second context in the same file (a second server's, here the same one's again).
    server
        .cli(&["token", "create", "--admin", "--name", "ops"])
        .ok();
    let ops_token = server
        .cli(&["token", "create", "--admin", "--name", "ops2"])
        .ok()
        .stdout
        .trim()
        .to_string();
    cli_with(
        &server,
        &old,
        &[
            "login",
            &server.api_addr,
            "--token",
            &ops_token,
            "--ca",
            &ca_file(&server),
            "--name",
            "second",
        ],
    )
    .ok();
    let doc = read_json(&old);
    assert_eq!(doc["current"], "second");
    assert_eq!(doc["admin_token"], ops_token.as_str());
    assert_eq!(doc["contexts"]["default"]["admin_token"], admin.as_str());
    let list = cli_with(&server, &old, &["context", "list", "-o", "json"])
        .ok()
        .json();
    assert_eq!(list["current"], "second");
    assert_eq!(list["contexts"].as_array().unwrap().len(), 2);

    // use: switches; the top-level copy follows.
    cli_with(&server, &old, &["context", "use", "default"]).ok();
    assert_eq!(read_json(&old)["admin_token"], admin.as_str());
    let out = cli_with(&server, &old, &["context", "use", "nope"]).fails();
    assert!(out.stderr.contains("no context named"), "{}", out.stderr);

    // remove: another one, then the current one (nothing current afterwards).
    cli_with(&server, &old, &["context", "remove", "second"]).ok();
    let list = cli_with(&server, &old, &["context", "list"]).ok().stdout;
    assert!(!list.contains("second"), "{list}");
    cli_with(&server, &old, &["context", "remove", "default"]).ok();
    let out = cli_with(&server, &old, &["app", "list"]).fails();
    assert!(out.stderr.contains("waypost login"), "{}", out.stderr);
    // The variables still override (here: stand in for) the context.
    Run::from_output(
        server
            .env
            .command()
            .env("WAYPOST_CONTEXT", &old)
            .env("WAYPOST_ADDR", &server.api_addr)
            .env("WAYPOST_ADMIN_TOKEN", &admin)
            .env("WAYPOST_CA", ca_file(&server))
            .args(["app", "list"])
            .output()
            .unwrap(),
    )
    .ok();
}

#[test]
fn a_server_restart_keeps_other_contexts_and_the_users_choice() {
    let server = Server::start(&[]);
    let admin = server.admin_token();
    let ops = server
        .cli(&["token", "create", "--admin", "--name", "ops"])
        .ok()
        .stdout
        .trim()
        .to_string();
    // In the server's own context file: login adds `remote`, made current.
    server
        .cli(&[
            "login",
            &server.api_addr,
            "--token",
            &ops,
            "--ca",
            &ca_file(&server),
            "--name",
            "remote",
        ])
        .ok();
    let env = server.kill();
    let server = Server::start_in(env, &[]);
    let doc = read_json(&server.env.context_path());
    // The server rewrote `default` (same token: it still works, no new one minted) and left
    // `remote` and the user's choice alone.
    assert_eq!(doc["current"], "remote");
    assert_eq!(doc["contexts"]["default"]["admin_token"], admin.as_str());
    assert_eq!(
        doc["contexts"]["default"]["api_addr"],
        server.api_addr.as_str()
    );
    assert_eq!(doc["contexts"]["remote"]["admin_token"], ops.as_str());
    let admins: Vec<_> = tokens_with(&server, &ops)
        .into_iter()
        .filter(|t| t["kind"] == "admin")
        .collect();
    assert_eq!(admins.len(), 2, "{admins:?}");
}

/// `token list -o json` with a given admin token (the current context's may be another).
fn tokens_with(server: &Server, token: &str) -> Vec<serde_json::Value> {
    let out = Run::from_output(
        server
            .env
            .command()
            .env("WAYPOST_ADDR", &server.api_addr)
            .env("WAYPOST_ADMIN_TOKEN", token)
            .env("WAYPOST_CA", server.env.data_dir().join("ca.pem"))
            .args(["token", "list", "-o", "json"])
            .output()
            .unwrap(),
    )
    .ok();
    out.json()["tokens"].as_array().unwrap().clone()
}

/// Logins into one context file at the same time each keep their context: the file is changed
/// under a lock (negative control: without it, concurrent read-modify-writes lose entries).
#[test]
fn concurrent_logins_into_one_context_file_keep_every_context() {
    let server = Server::start(&[]);
    let admin = server.admin_token();
    let ctx = laptop(&server, "shared");
    let ca = ca_file(&server);
    let children: Vec<_> = (0..12)
        .map(|i| {
            server
                .env
                .command()
                .env("WAYPOST_CONTEXT", &ctx)
                .args(["login", &server.api_addr, "--token", &admin, "--ca", &ca])
                .args(["--name", &format!("c{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc = read_json(&ctx);
    let names: Vec<&str> = doc["contexts"]
        .as_object()
        .expect("contexts")
        .keys()
        .map(String::as_str)
        .collect();
    for i in 0..12 {
        assert!(
            names.contains(&format!("c{i}").as_str()),
            "lost c{i}: {names:?}"
        );
    }
    let mode = std::fs::metadata(&ctx).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The lock file holds nothing and is private too.
    let lock = std::fs::metadata(format!("{}.lock", ctx.display())).unwrap();
    assert_eq!((lock.len(), lock.permissions().mode() & 0o777), (0, 0o600));
}
