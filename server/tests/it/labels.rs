//! Instance labels end to end: `WAYPOST_LABELS` in the real entrypoint's Hello, the token's
//! labels (`token create --label`), merged by the server (the token wins), stored on the
//! instance and shown by `instances`; bad labels refused by the CLI and the API, dropped (with a
//! warning, never a refusal) from a Hello; an older Hello without labels still welcome.

use crate::common::entrypoint::Builder;
use crate::common::*;
use hyper::{Method, StatusCode};
use serde_json::json;
use waypost_proto::{self as proto, Kind};

/// Writes the child's environment to `$D/env` (atomically), then waits to be stopped.
const DUMP_ENV: &str = r#"env > "$D/env.tmp" && mv "$D/env.tmp" "$D/env"; exec sleep 600"#;

/// A token for `app` (created if needed) with `labels` as `--label` flags; the CLI's JSON.
fn token_with_labels(server: &Server, app: &str, labels: &[&str]) -> serde_json::Value {
    if !server.cli(&["app", "list"]).ok().stdout.contains(app) {
        server.create_app(app);
    }
    let mut args = vec!["token", "create", "--app", app, "-o", "json"];
    for l in labels {
        args.extend(["--label", l]);
    }
    server.cli(&args).ok().json()
}

/// The instance with hex id `id` in `instances -o json`, once listed live.
fn live_instance(server: &Server, id: &str) -> serde_json::Value {
    wait_for(&format!("instance {id} to be listed live"), || {
        server
            .instances(false)
            .into_iter()
            .find(|i| i["id"] == id && i["live"] == true)
    })
}

#[test]
fn an_instance_has_its_own_labels_under_its_tokens() {
    let server = Server::start(&[]);
    let token = token_with_labels(&server, "web", &["tier=api"]);
    assert_eq!(token["labels"], json!({"tier": "api"}), "{token}");
    let Some(e) = Builder::with_token(&server, token["token"].as_str().unwrap(), DUMP_ENV)
        .env("WAYPOST_LABELS", "env=prod,tier=web")
        .spawn()
    else {
        return;
    };
    let inst = e.instance(&server);
    // The token's tier=api wins over the instance's own tier=web; env=prod is the instance's.
    assert_eq!(
        inst["labels"],
        json!({"env": "prod", "tier": "api"}),
        "{inst}"
    );

    // The table gets a LABELS column, in the canonical form.
    let table = server.cli(&["instances"]).ok().stdout;
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("LABELS"), "{table}");
    assert!(table.contains("env=prod,tier=api"), "{table}");

    // The token list shows the token's own labels.
    let tokens = server.cli(&["token", "list", "-o", "json"]).ok().json();
    let listed = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == token["id"])
        .unwrap_or_else(|| panic!("token {} not listed: {tokens}", token["id"]))
        .clone();
    assert_eq!(listed["labels"], json!({"tier": "api"}));
    let table = server.cli(&["token", "list"]).ok().stdout;
    assert!(
        table.contains("LABELS") && table.contains("tier=api"),
        "{table}"
    );

    // The child never sees WAYPOST_LABELS; the dump is the child's real environment (another
    // WAYPOST_ variable that is no secret does reach it).
    let env = wait_for("the child's environment dump", || e.file("env"));
    assert!(
        env.lines().any(|l| l.starts_with("WAYPOST_SERVER=")),
        "premise: the dump shows the child's environment: {env}"
    );
    assert!(
        !env.lines().any(|l| l.starts_with("WAYPOST_LABELS=")),
        "WAYPOST_LABELS reached the child: {env}"
    );
}

#[test]
fn an_instance_without_labels_has_none_and_the_table_no_labels_column() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let Some(e) = Builder::with_token(&server, &token, DUMP_ENV).spawn() else {
        return;
    };
    let inst = e.instance(&server);
    assert_eq!(inst["labels"], json!({}), "{inst}");
    let table = server.cli(&["instances"]).ok().stdout;
    assert!(!table.contains("LABELS"), "{table}");
}

#[test]
fn token_create_refuses_bad_labels() {
    let server = Server::start(&[]);
    server.create_app("web");
    for (labels, why) in [
        (&["tier"][..], "label \"tier\" is not key=value"),
        (
            &["a=1", "a=2"][..],
            "label \"a=2\" repeats the key of an earlier label",
        ),
        (&["a=1,=2"][..], "label \"=2\" has an empty key"),
        (
            &["tier=a b"][..],
            "label \"tier=a b\" has a value with characters other than",
        ),
    ] {
        let mut args = vec!["token", "create", "--app", "web"];
        for l in labels {
            args.extend(["--label", l]);
        }
        let run = server.cli(&args).fails();
        assert!(
            run.stderr.contains("--label") && run.stderr.contains(why),
            "{labels:?}: {}",
            run.stderr
        );
    }
    // No token was made by any of them.
    let tokens = server
        .cli(&["token", "list", "--app", "web", "-o", "json"])
        .ok()
        .json();
    assert_eq!(tokens["tokens"], json!([]), "{tokens}");

    // The API checks them itself (a client other than the CLI): 400, naming the label.
    let api = server.api(Some(&server.admin_token()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let many: serde_json::Map<String, serde_json::Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    for (labels, why) in [
        (
            json!({"bad key": "x"}),
            "label \"bad key=x\" has a key with",
        ),
        (json!({"k": "v".repeat(64)}), "has a value longer than 63"),
        (json!(many), "17 labels given; at most 16"),
    ] {
        let body = json!({"app": "web", "labels": labels});
        let (status, answer) = rt
            .block_on(api.request(Method::POST, "/v1/tokens", Some(&body)))
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let msg = answer["error"].as_str().unwrap_or_default();
        assert!(msg.contains(why), "{body}: {answer}");
    }
    // Control: good labels through the API make a token that has them.
    let body = json!({"app": "web", "labels": {"env": "prod", "zone": "eu-1:a"}});
    let (status, answer) = rt
        .block_on(api.request(Method::POST, "/v1/tokens", Some(&body)))
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["labels"], json!({"env": "prod", "zone": "eu-1:a"}));
}

#[tokio::test]
async fn a_hello_without_labels_still_works_and_gets_the_tokens() {
    let server = Server::start(&[]);
    let token = token_with_labels(&server, "web", &["tier=api,team=x"]);
    let token = token["token"].as_str().unwrap().to_string();
    // The testkit's Hello is an older entrypoint's: no labels field at all.
    let id = new_id();
    assert!(hello(&token, &id).labels.is_empty());
    let (_conn, welcome) = Fake::welcomed(&server, &token, &id).await;
    assert_eq!(welcome.app, "web");
    let inst = live_instance(&server, &hex(&id));
    assert_eq!(
        inst["labels"],
        json!({"team": "x", "tier": "api"}),
        "{inst}"
    );

    // And with a token without labels: none at all.
    let plain = server.entrypoint_token("web", None);
    let id = new_id();
    let (_conn2, _) = Fake::welcomed(&server, &plain, &id).await;
    let inst = live_instance(&server, &hex(&id));
    assert_eq!(inst["labels"], json!({}), "{inst}");
}

#[tokio::test]
async fn invalid_hello_labels_are_dropped_not_refused() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let id = new_id();
    let mut f = Fake::connect(&server).await;
    let labels = [("env", "prod"), ("bad key", "x"), ("tier", "a b")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    f.send(
        Kind::Hello(proto::Hello {
            labels,
            ..hello(&token, &id)
        })
        .into(),
    )
    .await;
    match f.recv().await.and_then(|fr| fr.kind) {
        Some(Kind::Welcome(_)) => {}
        other => panic!("expected Welcome despite the bad labels, got {other:?}"),
    }
    let inst = live_instance(&server, &hex(&id));
    assert_eq!(inst["labels"], json!({"env": "prod"}), "{inst}");
    // Each dropped label is a warning in the server's log, naming it.
    let logs = wait_for("the warnings about the dropped labels", || {
        let logs = server.logs();
        (logs.contains("bad key=x") && logs.contains("tier=a b")).then_some(logs)
    });
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("dropped an invalid label")),
        "{logs}"
    );
}
