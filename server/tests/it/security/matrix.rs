//! Who may do what: every API route against every kind of token, and the control listener's
//! admission of tokens. An entrypoint token can only do entrypoint things for its own app: it
//! cannot call the API (any route, its own app's or another's), read another app's config over
//! the control protocol, or run an entrypoint once revoked.

use crate::common::*;
use hyper::{Method, StatusCode};
use waypost_proto::{Kind, reject::Reason};

/// Every route of the HTTP API, with a path naming app `web` where the route takes an app.
fn routes() -> Vec<(Method, &'static str)> {
    vec![
        (Method::GET, "/v1/server"),
        (Method::GET, "/v1/server/members"),
        (Method::GET, "/v1/apps"),
        (Method::POST, "/v1/apps"),
        (Method::GET, "/v1/tokens"),
        (Method::POST, "/v1/tokens"),
        (Method::DELETE, "/v1/tokens/abcdef012345"),
        (Method::GET, "/v1/instances"),
        (Method::GET, "/v1/exec?app=web"),
        (Method::GET, "/v1/apps/web/config"),
        (Method::PATCH, "/v1/apps/web/config"),
        (Method::GET, "/v1/apps/web/logs"),
        (Method::GET, "/v1/apps/web/logs/stats"),
        (Method::PATCH, "/v1/apps/web/logs/retention"),
        (Method::GET, "/v1/nope"),
    ]
}

#[tokio::test]
async fn every_route_refuses_everything_but_an_admin_token() {
    let server = Server::start(&[]);
    let web = server.entrypoint_token("web", None);
    let other = server.entrypoint_token("other", None);
    let web_deploy = server.entrypoint_token("web", Some("v2"));
    let created = server
        .cli(&["token", "create", "--app", "web", "-o", "json"])
        .ok()
        .json();
    let revoked = created["token"].as_str().unwrap().to_string();
    server
        .cli(&["token", "revoke", created["id"].as_str().unwrap()])
        .ok();
    let body = serde_json::json!({ "app": "web", "name": "x", "set": {"A": "1"} });

    let unauthorized: Vec<(&str, Option<&str>)> = vec![
        ("no token", None),
        ("a malformed token", Some("not a token")),
        (
            "a wrong token",
            Some("wpa_0000000000000000000000000000000000000000"),
        ),
        ("a revoked entrypoint token", Some(revoked.as_str())),
        ("an empty token", Some("")),
    ];
    let forbidden: Vec<(&str, Option<&str>)> = vec![
        ("web's own entrypoint token", Some(web.as_str())),
        ("web's deployment token", Some(web_deploy.as_str())),
        ("another app's entrypoint token", Some(other.as_str())),
    ];
    for (method, path) in routes() {
        for (who, token) in &unauthorized {
            let (status, resp) = server
                .api(*token)
                .request(method.clone(), path, Some(&body))
                .await
                .unwrap();
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {who}: {resp}"
            );
            assert!(
                resp["error"].is_string(),
                "{method} {path} with {who}: {resp}"
            );
        }
        for (who, token) in &forbidden {
            let (status, resp) = server
                .api(*token)
                .request(method.clone(), path, Some(&body))
                .await
                .unwrap();
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{method} {path} with {who}: {resp}"
            );
            assert!(
                resp["error"].is_string(),
                "{method} {path} with {who}: {resp}"
            );
        }
        // Negative control: the admin token passes authentication on every route (what the
        // route then answers — 200, 400 for a body it does not want, 404 — is its own business).
        let admin = server.admin_token();
        let (status, resp) = server
            .api(Some(&admin))
            .request(method.clone(), path, Some(&body))
            .await
            .unwrap();
        assert!(
            status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
            "{method} {path} with the admin token: {status} {resp}"
        );
    }
}

#[tokio::test]
async fn an_entrypoint_token_gets_its_own_apps_config_and_nothing_else() {
    let server = Server::start(&[]);
    let web = server.entrypoint_token("web", None);
    let other = server.entrypoint_token("other", None);
    server
        .cli(&["config", "set", "--app", "web", "WHO=web-value"])
        .ok();
    server
        .cli(&["config", "set", "--app", "other", "WHO=other-secret"])
        .ok();

    let (_f, welcome) = Fake::welcomed(&server, &web, &new_id()).await;
    assert_eq!(welcome.app, "web");
    let config = welcome.config.expect("web's config in the Welcome");
    assert_eq!(config.env.get("WHO").map(String::as_str), Some("web-value"));
    assert!(
        !format!("{config:?}").contains("other-secret"),
        "another app's value reached web's instance: {config:?}"
    );
    // Negative control: other's own instance does get other's value, so the check above can fail.
    let (_g, welcome) = Fake::welcomed(&server, &other, &new_id()).await;
    assert_eq!(welcome.app, "other");
    assert_eq!(
        welcome.config.unwrap().env.get("WHO").map(String::as_str),
        Some("other-secret")
    );
}

#[tokio::test]
async fn the_control_listener_admits_only_valid_entrypoint_tokens() {
    let server = Server::start(&[]);
    let admin = server.admin_token();
    let reason = |f: waypost_proto::Frame| match f.kind {
        Some(Kind::Reject(r)) => Reason::try_from(r.reason).unwrap(),
        other => panic!("expected a Reject, got {other:?}"),
    };
    for (who, token, want) in [
        ("no token", String::new(), Reason::BadToken),
        (
            "a wrong token",
            "wpe_00000000000000000000000000000000".to_string(),
            Reason::BadToken,
        ),
        ("the admin token", admin, Reason::Forbidden),
    ] {
        let (mut f, answer) = Fake::hello(&server, &token, &new_id()).await;
        assert_eq!(reason(answer), want, "{who}");
        f.expect_closed().await;
    }

    // A live instance whose token is revoked is told so and closed; a new Hello with it fails.
    let token = server.entrypoint_token("web", None);
    let (mut live, _) = Fake::welcomed(&server, &token, &new_id()).await;
    let id = waypost::server::api::token_id(&waypost::server::auth::hash_token(&token));
    server.cli(&["token", "revoke", &id]).ok();
    let mut saw_reject = false;
    while let Some(f) = live.recv().await {
        if let Some(Kind::Reject(r)) = f.kind {
            assert_eq!(Reason::try_from(r.reason).unwrap(), Reason::BadToken);
            saw_reject = true;
        }
    }
    assert!(
        saw_reject,
        "the revoked instance got no Reject before the close"
    );
    let (_f, answer) = Fake::hello(&server, &token, &new_id()).await;
    assert_eq!(reason(answer), Reason::BadToken);
}
