//! The HTTPS API and the CLI against a real server process.

use crate::common::*;
use hyper::{Method, StatusCode};
use std::os::unix::fs::PermissionsExt as _;

#[tokio::test]
async fn api_requires_an_admin_token() {
    let server = Server::start(&[]);
    let app_token = server.entrypoint_token("web", None);

    // No token: 401 with a JSON error body.
    let (status, body) = server
        .api(None)
        .request(Method::GET, "/v1/apps", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("token"), "{body}");

    // A wrong token: 401.
    let (status, body) = server
        .api(Some("wpa_0000000000000000000000000000000000000000"))
        .request(Method::GET, "/v1/apps", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid token");

    // An entrypoint token is valid but not allowed: 403, on every endpoint.
    for (method, path) in [
        (Method::GET, "/v1/apps"),
        (Method::GET, "/v1/instances"),
        (Method::POST, "/v1/tokens"),
        (Method::GET, "/v1/tokens"),
        (Method::DELETE, "/v1/tokens/abcdef012345"),
    ] {
        let body = serde_json::json!({ "app": "web" });
        let (status, resp) = server
            .api(Some(&app_token))
            .request(method, path, Some(&body))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {resp}");
        assert!(resp["error"].is_string());
    }

    // Negative control: the admin token works.
    let admin = server.admin_token();
    let (status, body) = server
        .api(Some(&admin))
        .request(Method::GET, "/v1/server", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["control_addr"], server.control_addr.as_str());
    assert_eq!(body["ca_pem"], server.ca_pem().as_str());
    assert_eq!(body["url_domain"], "localhost");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

    // Unknown endpoints and methods: JSON errors too (after authentication).
    let (status, body) = server
        .api(None)
        .request(Method::GET, "/v1/nope", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = server
        .api(Some(&admin))
        .request(Method::GET, "/v1/nope", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    let (status, body) = server
        .api(Some(&admin))
        .request(Method::DELETE, "/v1/apps", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn api_validates_input() {
    let server = Server::start(&[]);
    let api = server.api(Some(&server.admin_token()));
    for bad in ["Bad", "-x", "a_b", "", &"a".repeat(64)] {
        let (status, body) = api
            .request(
                Method::POST,
                "/v1/apps",
                Some(&serde_json::json!({ "name": bad })),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
        assert!(body["error"].as_str().unwrap().contains("invalid app name"));
    }
    let (status, body) = api
        .request(
            Method::POST,
            "/v1/apps",
            Some(&serde_json::json!({ "nom": 1 })),
        )
        .await
        .unwrap();
    assert!(status.is_client_error(), "{status}");
    assert!(body["error"].is_string(), "{body}");
    let (status, _) = api
        .request(
            Method::POST,
            "/v1/tokens",
            Some(&serde_json::json!({ "app": "missing" })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .request(Method::GET, "/v1/instances?app=missing", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api
        .request(
            Method::POST,
            "/v1/apps",
            Some(&serde_json::json!({ "name": "ok-1" })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["name"], "ok-1");
    let (status, _) = api
        .request(
            Method::POST,
            "/v1/apps",
            Some(&serde_json::json!({ "name": "ok-1" })),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
}

#[test]
fn app_create_and_list() {
    let server = Server::start(&[]);
    let out = server.cli(&["app", "create", "web"]).ok();
    assert!(out.stdout.contains("web"));
    server.cli(&["app", "create", "api-2"]).ok();

    let list = server.cli(&["app", "list"]).ok();
    let names: Vec<&str> = list
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names, ["api-2", "web"]);
    let json = server.cli(&["app", "list", "-o", "json"]).ok().json();
    assert_eq!(json["apps"].as_array().unwrap().len(), 2);

    let dup = server.cli(&["app", "create", "web"]).fails();
    assert!(dup.stderr.contains("already exists"), "{}", dup.stderr);
    let bad = server.cli(&["app", "create", "Not_Valid"]).fails();
    assert!(bad.stderr.contains("invalid app name"), "{}", bad.stderr);
    // Nothing was added by the failures.
    assert_eq!(
        server.cli(&["app", "list", "-o", "json"]).ok().json()["apps"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn token_create_outputs() {
    let server = Server::start(&[]);
    server.create_app("web");
    let ca = server.ca_pem();

    // Default: the token alone on stdout, a hint on stderr.
    let plain = server.cli(&["token", "create", "--app", "web"]).ok();
    assert_eq!(plain.stdout.lines().count(), 1);
    assert!(plain.stdout.starts_with("wpe_"), "{}", plain.stdout);
    assert!(!plain.stderr.is_empty());

    // env: three KEY=VALUE lines, each value one line with no spaces or quotes.
    let env = server
        .cli(&[
            "token",
            "create",
            "--app",
            "web",
            "--deployment",
            "d1",
            "-o",
            "env",
        ])
        .ok();
    let lines: Vec<&str> = env.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", env.stdout);
    let get = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}"))
            .to_string()
    };
    for l in &lines {
        assert!(
            !l.contains(' ') && !l.contains('"') && !l.contains('\''),
            "{l}"
        );
    }
    assert_eq!(get("WAYPOST_SERVER"), server.control_addr);
    assert!(get("WAYPOST_TOKEN").starts_with("wpe_"));
    let ca_b64 = get("WAYPOST_CA");
    assert!(ca_b64.starts_with("LS0tLS1CRUdJTi"), "{ca_b64}");
    let decoded = String::from_utf8(waypost::util::base64_decode(&ca_b64).unwrap()).unwrap();
    assert_eq!(decoded, ca);

    // json: the API's answer.
    let json = server
        .cli(&["token", "create", "--app", "web", "-o", "json"])
        .ok()
        .json();
    assert!(json["token"].as_str().unwrap().starts_with("wpe_"));
    assert_eq!(json["app"], "web");
    assert!(json["deployment"].is_null());
    assert_eq!(json["control_addr"], server.control_addr.as_str());
    assert_eq!(json["ca_pem"], ca.as_str());

    // Tokens are unique and stored hashed only: nowhere in the database (SQLite: its files;
    // PostgreSQL: a dump of its data).
    assert_ne!(json["token"], get("WAYPOST_TOKEN").as_str());
    let hay = server.env.database_contents();
    for t in [json["token"].as_str().unwrap(), &server.admin_token()] {
        // Negative control: what is stored (the hash) is found, so the search can find things.
        let h = waypost::server::service::auth::hash_token(t);
        assert!(
            hay.windows(h.len()).any(|w| w == h.as_bytes()),
            "the hash of {t} not found in the database"
        );
        assert!(
            !hay.windows(t.len()).any(|w| w == t.as_bytes()),
            "token {t} stored in clear"
        );
    }

    let missing = server.cli(&["token", "create", "--app", "nope"]).fails();
    assert!(missing.stderr.contains("nope"), "{}", missing.stderr);
}

#[test]
fn first_start_writes_context_and_restart_keeps_state() {
    let server = Server::start(&[]);
    let env = &server.env;
    // Data dir 0700, context 0600 with everything the CLI needs.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.data_dir()), 0o700);
    assert_eq!(mode(&env.context_path()), 0o600);
    let ctx = env.context();
    assert_eq!(ctx["api_addr"], server.api_addr.as_str());
    assert_eq!(ctx["control_addr"], server.control_addr.as_str());
    assert_eq!(ctx["ca_pem"], server.ca_pem().as_str());
    let token = ctx["admin_token"].as_str().unwrap().to_string();
    assert!(token.starts_with("wpa_"));
    // The listeners' lines are printed on first start; the admin token is not (stdout is not a
    // terminal here): it is in the 0600 file the output names.
    let out = server.stdout();
    assert!(!out.contains(&token), "{out}");
    let token_file = env.data_dir().join("admin-token");
    assert!(out.contains(&token_file.display().to_string()), "{out}");
    assert_eq!(
        std::fs::read_to_string(&token_file).unwrap().trim(),
        token.as_str()
    );
    assert!(
        out.contains(&format!(
            "waypost: control listening on {}",
            server.control_addr
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("waypost: api listening on {}", server.api_addr)),
        "{out}"
    );
    server.create_app("keep");

    // Clean stop (SIGTERM): exit 0, server.json removed.
    let (code, env) = server.terminate();
    assert_eq!(code, Some(0));
    assert!(!env.data_dir().join("server.json").exists());

    // Restart: new ports, same CA, same admin token (not printed again), app kept, context
    // rewritten with the new addresses.
    let ca_before = std::fs::read_to_string(env.data_dir().join("ca.pem")).unwrap();
    let server = Server::start_in(env, &[]);
    assert_eq!(server.ca_pem(), ca_before);
    assert_eq!(server.admin_token(), token);
    assert!(!server.stdout().contains(&token));
    assert_eq!(server.env.context()["api_addr"], server.api_addr.as_str());
    let apps = server.cli(&["app", "list", "-o", "json"]).ok().json();
    assert_eq!(apps["apps"][0]["name"], "keep");

    // A changed --tls-san re-issues the server certificate but keeps the CA.
    let env = server.kill();
    let server = Server::start_in(
        env,
        &["--tls-san", "waypost.example.com", "--tls-san", "10.1.2.3"],
    );
    assert_eq!(server.ca_pem(), ca_before);
    server.cli(&["app", "list"]).ok();
}

#[test]
fn one_server_per_data_dir() {
    let server = Server::start(&[]);
    let out = server
        .env
        .command()
        .args([
            "server",
            "run",
            "--control-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "off",
            "--data-dir",
        ])
        .arg(server.env.data_dir())
        .args(server.env.database_args())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    assert!(err.contains(&server.pid().to_string()), "{err}");
    // The first one is unaffected.
    server.cli(&["app", "list"]).ok();
}

#[test]
fn cli_finds_the_server_through_env_vars() {
    let server = Server::start(&[]);
    let token = server.admin_token();
    let ca_path = server.env.data_dir().join("ca.pem");
    let ca_pem = server.ca_pem();
    let ca_b64 = waypost::util::base64_encode(ca_pem.as_bytes());
    let no_ctx = server.env.root.path().join("no-such-context.json");
    for ca in [ca_path.to_str().unwrap(), ca_pem.as_str(), ca_b64.as_str()] {
        let out = server
            .env
            .command()
            .env("WAYPOST_CONTEXT", &no_ctx)
            .env("WAYPOST_ADDR", &server.api_addr)
            .env("WAYPOST_ADMIN_TOKEN", &token)
            .env("WAYPOST_CA", ca)
            .args(["app", "list"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without any configuration: one clear line.
    let out = server
        .env
        .command()
        .env("WAYPOST_CONTEXT", &no_ctx)
        .args(["app", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("waypost server run"), "{err}");

    // A CA that did not sign the server's certificate: refused.
    let other = Server::start(&[]);
    let out = server
        .env
        .command()
        .env("WAYPOST_CA", other.ca_pem())
        .args(["app", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn help_everywhere() {
    let env = Env::new();
    for args in [
        &["--help"][..],
        &["server", "run", "--help"],
        &["app", "--help"],
        &["app", "create", "--help"],
        &["app", "list", "--help"],
        &["token", "create", "--help"],
        &["token", "list", "--help"],
        &["token", "revoke", "--help"],
        &["instances", "--help"],
        &["up", "--help"],
    ] {
        let out = env.command().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}
