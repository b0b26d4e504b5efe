//! Access control of an app's URL end to end (`waypost url auth`): the real server's ingress, the
//! REAL entrypoint and the test app (apps/testapp.py, which echoes the headers it got), real
//! sockets. What a visitor without, with wrong and with right credentials gets; that the app
//! never sees the ingress's credentials but does see its own when the URL is open; networks.
//!
//! Needs the entrypoint binary and python3; without them each test prints SKIPPED and passes.

use crate::apps::{self, Http, empty, rt, start_app};
use crate::common::Server;
use http_body_util::BodyExt as _;

fn host(app: &str, addr: &str) -> String {
    format!("{app}.localhost:{}", addr.rsplit_once(':').unwrap().1)
}

/// One request on a new connection: (status, WWW-Authenticate, body).
fn request(ingress: &str, h: &str, path: &str, auth: Option<&str>) -> (u16, String, String) {
    rt().block_on(async {
        let mut c = Http::connect(ingress, h).await.unwrap();
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let resp = c.send("GET", path, &headers, empty()).await.unwrap();
        let status = resp.status().as_u16();
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            challenge,
            String::from_utf8_lossy(&body).into_owned(),
        )
    })
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        waypost::util::base64_encode(format!("{user}:{pass}").as_bytes())
    )
}

#[test]
fn basic_and_bearer_auth_guard_the_url_and_never_reach_the_app() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);

    // Open by default: the app's own Authorization header passes through untouched.
    let (status, _, body) = request(&ingress, &h, "/headers", Some("Bearer apps-own"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("apps-own"),
        "the app's own credentials reach it: {body}"
    );
    let shown = server.cli(&["url", "-a", "web"]).ok();
    assert!(shown.stderr.contains("open to anyone"), "{}", shown.stderr);

    server
        .cli(&["url", "auth", "-a", "web", "--basic", "alice:correct horse"])
        .ok();
    let shown = server.cli(&["url", "-a", "web"]).ok();
    assert!(
        shown.stderr.contains("basic auth users: alice"),
        "{}",
        shown.stderr
    );
    assert!(!shown.stderr.contains("correct horse"));

    // No credentials, wrong ones, an unknown user: 401 with a challenge, the app not reached.
    for auth in [
        None,
        Some(basic("alice", "wrong pass").as_str()),
        Some(basic("bob", "correct horse").as_str()),
    ] {
        let (status, challenge, body) = request(&ingress, &h, "/headers", auth);
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert!(challenge.starts_with("Basic realm="), "{challenge}");
        assert!(!body.contains("user-agent"), "not the app's answer: {body}");
    }
    // Right: 200, and the app does not see the header.
    let good = basic("alice", "correct horse");
    let (status, _, body) = request(&ingress, &h, "/headers", Some(&good));
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains("authorization"),
        "credentials forwarded: {body}"
    );
    // Again on a keep-alive connection (the verified-header cache): still 200, several times.
    rt().block_on(async {
        let mut c = Http::connect(&ingress, &h).await.unwrap();
        for _ in 0..5 {
            let resp = c
                .send("GET", "/", &[("authorization", good.as_str())], empty())
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            resp.into_body().collect().await.unwrap();
        }
    });

    // A bearer token, printed once, works alongside.
    let out = server
        .cli(&["url", "auth", "-a", "web", "--bearer"])
        .ok()
        .stdout;
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("bearer token (shown once): "))
        .unwrap_or_else(|| panic!("no token printed: {out}"))
        .to_string();
    let (status, _, body) = request(&ingress, &h, "/headers", Some(&format!("Bearer {token}")));
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(&token));
    let (status, challenge, _) = request(&ingress, &h, "/", Some("Bearer wpu_nope"));
    assert_eq!(status, 401);
    assert!(challenge.contains("Bearer"), "{challenge}");

    // A new password replaces the old one at once (the verified cache is dropped).
    server
        .cli(&[
            "url",
            "auth",
            "-a",
            "web",
            "--basic",
            "alice:battery staple",
        ])
        .ok();
    assert_eq!(request(&ingress, &h, "/", Some(&good)).0, 401);
    assert_eq!(
        request(&ingress, &h, "/", Some(&basic("alice", "battery staple"))).0,
        200
    );

    // --clear: open again.
    server.cli(&["url", "auth", "-a", "web", "--clear"]).ok();
    assert_eq!(request(&ingress, &h, "/", None).0, 200);
}

#[test]
fn a_network_that_excludes_the_visitor_is_refused_with_403() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);
    server
        .cli(&["url", "auth", "-a", "web", "--allow-cidr", "10.0.0.0/8"])
        .ok();
    let (status, _, body) = request(&ingress, &h, "/", None);
    assert_eq!(status, 403, "{body}");
    // Adding the loopback network lets us in (the real peer address counts, not a header).
    let (status, _, _) = rt().block_on(async {
        let mut c = Http::connect(&ingress, &h).await.unwrap();
        let resp = c
            .send("GET", "/", &[("x-forwarded-for", "10.1.2.3")], empty())
            .await
            .unwrap();
        (resp.status().as_u16(), (), ())
    });
    assert_eq!(status, 403, "X-Forwarded-For is not the visitor's address");
    server
        .cli(&["url", "auth", "-a", "web", "--allow-cidr", "127.0.0.0/8"])
        .ok();
    assert_eq!(request(&ingress, &h, "/", None).0, 200);
    let shown = server.cli(&["url", "-a", "web"]).ok();
    assert!(
        shown.stderr.contains("10.0.0.0/8, 127.0.0.0/8"),
        "{}",
        shown.stderr
    );
}

#[test]
fn bad_input_and_tokens_are_refused() {
    let server = Server::start(&[]);
    server.create_app("web");
    for (args, want) in [
        (vec!["--basic", "nocolon"], "USER:PASSWORD"),
        (vec!["--basic", "a:short"], "8-"),
        (vec!["--allow-cidr", "10.0.0.0/33"], "invalid network"),
        (vec![], "nothing to change"),
    ] {
        let mut a = vec!["url", "auth", "-a", "web"];
        a.extend(args);
        let r = server.cli(&a).fails();
        assert!(r.stderr.contains(want), "{a:?}: {}", r.stderr);
    }
    let r = server
        .cli(&["url", "auth", "-a", "nope", "--clear"])
        .fails();
    assert!(r.stderr.contains("nope"), "{}", r.stderr);
    // The API: no token 401, an entrypoint token 403, bad JSON 400.
    let token = server.entrypoint_token("web", None);
    rt().block_on(async {
        let body = serde_json::json!({ "clear": true });
        for (tok, want) in [(None, 401), (Some(token.as_str()), 403)] {
            let (status, _) = server
                .api(tok)
                .request(hyper::Method::PATCH, "/v1/apps/web/url/auth", Some(&body))
                .await
                .unwrap();
            assert_eq!(status.as_u16(), want);
        }
        let admin = server.admin_token();
        let (status, _) = server
            .api(Some(&admin))
            .request(
                hyper::Method::PATCH,
                "/v1/apps/web/url/auth",
                Some(&serde_json::json!({ "basic": ["x:12345678"], "sneaky": 1 })),
            )
            .await
            .unwrap();
        assert_eq!(status.as_u16(), 400);
        let (status, v) = server
            .api(Some(&admin))
            .request(hyper::Method::GET, "/v1/apps/web/url/auth", None)
            .await
            .unwrap();
        assert_eq!(status.as_u16(), 200);
        assert_eq!(v["open"], true, "the refused change wrote nothing: {v}");
    });
}
