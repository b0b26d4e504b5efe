//! The web console (transport/api/console.rs) end to end. A real headless Chromium, driven over
//! the DevTools protocol, is redirected to the sign-in page, signs in with the admin token, sees
//! the app and its instance (the real entrypoint running an `sh` child), opens the instance's
//! logs with "follow" and sees a line the child prints after `waypost signal` arrive. Plain HTTPS
//! requests check the rest: redirects without a session, refused sign-ins, the cookie's
//! attributes, the CSRF rules, bearer tokens unchanged, and sessions that end with their token.
//!
//! Chromium is required (Debian package `chromium`; .ci/run installs it): without it the browser
//! test fails. `WAYPOST_CONSOLE_SCREENSHOT=PATH` makes it also save its screenshot (1280×800 PNG
//! of the instance and its logs) there; docs/console.png is made that way:
//! `WAYPOST_CONSOLE_SCREENSHOT=$PWD/docs/console.png cargo nextest run -p waypost --test it console::browser`.

use crate::common::entrypoint::Builder;
use crate::common::*;
use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{self, Message};

const COOKIE: &str = "__Host-waypost-console";

/// The child: a start line (stdout and stderr), then a line for each SIGHUP.
const CHILD: &str = r#"echo "web: listening on :8080"; echo "web: cache is cold" >&2
n=0; trap 'n=$((n+1)); echo "web: got SIGHUP #$n, config reloaded"' HUP
while :; do sleep 0.1; done"#;

// ---- a small DevTools-protocol client --------------------------------------------------------

/// A headless Chromium and one page of it, spoken to over the DevTools WebSocket.
struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<std::net::TcpStream>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-gpu",
                "--disable-extensions",
                "--hide-scrollbars",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect(
                "starting `chromium`: the console test needs headless Chromium \
                 (Debian: apt-get install chromium; .ci/run installs it)",
            );
        // The DevTools address is on stderr; keep draining it afterwards so Chromium never
        // blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
            }
        });
        let url = rx
            .recv_timeout(WAIT)
            .expect("chromium did not print its DevTools address");
        let hostport = url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .unwrap()
            .to_string();
        let tcp = std::net::TcpStream::connect(&hostport).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client::client(url.as_str(), tcp).expect("DevTools handshake");
        let mut b = Browser {
            child,
            ws,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false }),
        );
        b
    }

    /// One command (on the page once attached); its result, or Err with the protocol's error.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().expect("reading from DevTools");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            // Events (no id) and other answers are not waited for.
            if v["id"] == id {
                return match v.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    /// The value of a JavaScript expression in the page; Err while it throws (or the page is
    /// between documents).
    fn eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self
            .try_call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .map_err(|e| e.to_string())?;
        if let Some(ex) = r.get("exceptionDetails") {
            return Err(ex.to_string());
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `expr` is truthy (not null/false/""/0); returns its value.
    fn wait(&mut self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = match self.eval(expr) {
                Ok(v)
                    if !matches!(&v, Value::Null | Value::Bool(false))
                        && v != json!("")
                        && v != json!(0) =>
                {
                    return v;
                }
                Ok(v) => v.to_string(),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                let page = self
                    .eval("location.href + '\\n' + (document.body ? document.body.innerText : '')")
                    .unwrap_or_default();
                panic!("timed out waiting for {what} (last: {last})\npage: {page}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JavaScript string literal of `s`.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[test]
fn browser_signs_in_and_follows_an_instances_logs() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    server.create_app("web");
    server
        .cli(&[
            "config",
            "set",
            "--app",
            "web",
            "GREETING=hello",
            "WORKERS=4",
        ])
        .ok();
    server
        .cli(&[
            "config",
            "set",
            "--app",
            "web",
            "--secret",
            "DB_PASSWORD=hunter2-secret",
        ])
        .ok();
    let ep = Builder::new(&server, "web", CHILD)
        .env("WAYPOST_LABELS", "tier=frontend,zone=eu-1")
        .spawn()
        .expect("the entrypoint binary is needed: set WAYPOST_ENTRYPOINT_BIN");
    let id = ep.instance(&server)["id"].as_str().unwrap().to_string();
    let pid = wait_for(
        "the child's pid and memory in the instance's status",
        || {
            let i = server
                .instances(false)
                .into_iter()
                .find(|i| i["id"] == id.as_str())?;
            (i["child_rss_bytes"].as_u64() > Some(0)).then(|| i["child_pid"].as_u64())?
        },
    );

    let mut b = Browser::start();
    let base = format!("https://{}", server.api_addr);
    b.navigate(&format!("{base}/"));
    b.wait(
        "the redirect to the sign-in page",
        "location.pathname === '/console/sign-in' && !!document.querySelector('input[name=token]')",
    );
    // Filled and submitted like a person would (the form posts; no script on that page).
    b.eval(&format!(
        "document.querySelector('input[name=token]').value = {}; \
         document.querySelector('form').submit(); true",
        js(&server.admin_token())
    ))
    .unwrap();
    b.wait(
        "the apps list after signing in",
        "location.pathname === '/' && [...document.querySelectorAll('#apps a')].some(a => a.textContent === 'web')",
    );
    // The cookie is HttpOnly: the page's scripts cannot read it.
    assert_eq!(b.eval("document.cookie").unwrap(), json!(""));

    b.eval("location.hash = '#/apps/web'; true").unwrap();
    let row = b.wait(
        "the instance in the app's view",
        &format!("(document.querySelector('[data-instance=\"{id}\"]') || {{}}).innerText"),
    );
    let row = row.as_str().unwrap();
    assert!(row.contains(&pid.to_string()), "pid {pid} in {row:?}");
    assert!(row.contains("running"), "{row:?}");
    assert!(row.contains("tier=frontend"), "{row:?}");
    let config = b.wait(
        "the app's config",
        "(document.querySelector('#config-vars') || {}).innerText",
    );
    let config = config.as_str().unwrap();
    assert!(
        config.contains("GREETING") && config.contains("hello"),
        "{config}"
    );
    assert!(
        config.contains("DB_PASSWORD") && config.contains("(secret)"),
        "{config}"
    );
    let page = b.eval("document.documentElement.outerHTML").unwrap();
    assert!(
        !page.as_str().unwrap().contains("hunter2"),
        "a secret value reached the page"
    );
    b.wait(
        "the app's URL",
        "(document.querySelector('#urls') || {}).innerText?.includes('http://web.')",
    );

    // The instance's own view, its logs followed.
    b.eval(&format!(
        "document.querySelector('[data-instance=\"{id}\"] a').click(); true"
    ))
    .unwrap();
    b.wait(
        "the instance's earlier lines",
        "(document.querySelector('#log') || {}).innerText?.includes('listening on :8080')",
    );
    b.wait(
        "the log stream following",
        "document.querySelector('#follow').checked && document.querySelector('#log-status').textContent === 'following'",
    );
    let line_count = "document.querySelectorAll('#log > div').length";
    let before = b.eval(line_count).unwrap().as_u64().unwrap();
    server.cli(&["signal", "-a", "web", "HUP"]).ok();
    b.wait(
        "the new line, live",
        "document.querySelector('#log').innerText.includes('got SIGHUP #1')",
    );
    assert!(b.eval(line_count).unwrap().as_u64().unwrap() > before);
    server.cli(&["signal", "-a", "web", "HUP"]).ok();
    b.wait(
        "the second new line",
        "document.querySelector('#log').innerText.includes('got SIGHUP #2')",
    );
    b.wait(
        "the instance's details",
        &format!("document.querySelector('#instance [data-pid=\"{pid}\"]') !== null"),
    );

    let shot = b.call(
        "Page.captureScreenshot",
        json!({ "format": "png", "clip": { "x": 0, "y": 0, "width": 1280, "height": 800, "scale": 1 } }),
    );
    let png = waypost::util::base64_decode(shot["data"].as_str().unwrap()).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    if let Some(path) = std::env::var_os("WAYPOST_CONSOLE_SCREENSHOT") {
        std::fs::write(&path, &png).unwrap();
        eprintln!("wrote the screenshot to {}", path.to_string_lossy());
    }

    // Signing out ends the session: the console is back to the sign-in page.
    b.eval("document.querySelector('header form button').click(); true")
        .unwrap();
    b.wait(
        "the sign-in page after signing out",
        "location.pathname === '/console/sign-in'",
    );
    b.navigate(&format!("{base}/"));
    b.wait(
        "the redirect after signing out",
        "location.pathname === '/console/sign-in' && document.readyState === 'complete'",
    );
}

// ---- plain HTTPS -----------------------------------------------------------------------------

struct Resp {
    status: u16,
    headers: hyper::HeaderMap,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// One request with exactly these headers (and Host).
fn request(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    use http_body_util::BodyExt as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = waypost::server::pki::client_config(&server.ca_pem(), &[b"http/1.1"]).unwrap();
        let tcp = tokio::net::TcpStream::connect(&server.api_addr)
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &server.api_addr);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
}

fn origin(server: &Server) -> String {
    format!("https://{}", server.api_addr)
}

fn sign_in(server: &Server, token: &str) -> Resp {
    let body = format!("token={token}");
    let o = origin(server);
    request(
        server,
        "POST",
        "/console/sign-in",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &o),
        ],
        &body,
    )
}

/// `NAME=VALUE` of the session cookie a successful sign-in set.
fn session_cookie(r: &Resp) -> String {
    assert_eq!(r.status, 303, "sign-in: {}", r.body);
    assert_eq!(r.header("location"), "/");
    let set = r.header("set-cookie");
    set.split(';').next().unwrap().trim().to_string()
}

fn get_with(server: &Server, path: &str, cookie: &str) -> Resp {
    request(server, "GET", path, &[("cookie", cookie)], "")
}

fn is_sign_in_redirect(r: &Resp) -> bool {
    r.status == 303 && r.header("location") == "/console/sign-in"
}

#[test]
fn pages_without_a_session_redirect_to_sign_in() {
    let server = Server::start(&[]);
    let r = request(&server, "GET", "/", &[], "");
    assert!(is_sign_in_redirect(&r), "{} {:?}", r.status, r.headers);
    assert!(r.header("set-cookie").is_empty());
    // Forged, malformed and unknown cookies alike.
    let cookies = [
        format!("{COOKIE}={}", "ab".repeat(32)),
        format!("{COOKIE}=x"),
        format!("{COOKIE}="),
        "other=1".to_string(),
    ];
    for cookie in &cookies {
        let r = get_with(&server, "/", cookie);
        assert!(is_sign_in_redirect(&r), "{cookie}: {} {}", r.status, r.body);
        let r = get_with(&server, "/v1/apps", cookie);
        assert_eq!(r.status, 401, "{cookie}: {}", r.body);
    }

    // The sign-in page and the static files are public, with the console's headers.
    let page = request(&server, "GET", "/console/sign-in", &[], "");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("name=\"token\""), "{}", page.body);
    assert_security_headers(&page);
    let js = request(&server, "GET", "/console/console.js", &[], "");
    assert_eq!(js.status, 200);
    assert_eq!(js.header("content-type"), "text/javascript; charset=utf-8");
    assert_eq!(js.header("x-content-type-options"), "nosniff");
    assert_eq!(js.header("cache-control"), "no-cache");
    let etag = js.header("etag").to_string();
    assert!(etag.starts_with('"'), "{etag}");
    let again = request(
        &server,
        "GET",
        "/console/console.js",
        &[("if-none-match", &etag)],
        "",
    );
    assert_eq!(again.status, 304);
    let css = request(&server, "GET", "/console/console.css", &[], "");
    assert_eq!(css.header("content-type"), "text/css; charset=utf-8");
    // Only those: other /console paths need a session like everything else.
    assert_eq!(
        request(&server, "GET", "/console/apps/web/urls", &[], "").status,
        401
    );
    assert_eq!(
        request(&server, "GET", "/console/nope.js", &[], "").status,
        401
    );
}

fn assert_security_headers(r: &Resp) {
    let csp = r.header("content-security-policy");
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(r.header("x-frame-options"), "DENY");
    assert_eq!(r.header("referrer-policy"), "no-referrer");
    assert_eq!(r.header("x-content-type-options"), "nosniff");
    assert_eq!(r.header("cache-control"), "no-store");
}

#[test]
fn sign_in_takes_only_a_valid_admin_token() {
    let server = Server::start(&[]);
    for (token, status) in [
        ("wpa_0123456789abcdef0123456789abcdef01234567", 401),
        ("", 401),
        ("nonsense", 401),
    ] {
        let r = sign_in(&server, token);
        assert_eq!(r.status, status, "{token:?}: {}", r.body);
        assert!(r.header("set-cookie").is_empty(), "{token:?}: a cookie");
        assert!(r.body.contains("class=\"error\""), "{}", r.body);
        assert!(r.body.contains("name=\"token\""), "the form again");
    }
    let ep_token = server.entrypoint_token("web", None);
    let r = sign_in(&server, &ep_token);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.header("set-cookie").is_empty());
    assert!(r.body.contains("entrypoint token"), "{}", r.body);
    // From another site's form: refused.
    let r = request(
        &server,
        "POST",
        "/console/sign-in",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", "https://evil.example"),
        ],
        &format!("token={}", server.admin_token()),
    );
    assert_eq!(r.status, 403);
    assert!(r.header("set-cookie").is_empty());
    // A form under `no-referrer` sends `Origin: null`; then Sec-Fetch-Site decides.
    let r = request(
        &server,
        "POST",
        "/console/sign-in",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
        ],
        &format!("token={}", server.admin_token()),
    );
    assert_eq!(r.status, 403);
    assert!(r.header("set-cookie").is_empty());

    let admin = server.admin_token();
    let r = sign_in(&server, &admin);
    let set = r.header("set-cookie").to_string();
    for attr in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=43200",
    ] {
        assert!(set.split("; ").any(|a| a == attr), "{attr} in {set}");
    }
    assert!(!set.contains(&admin), "the token itself is not the cookie");
    assert!(!set.contains(&admin[4..]), "nor its random part");
    let cookie = session_cookie(&r);
    let page = get_with(&server, "/", &cookie);
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert!(page.body.contains("/console/console.js"));
    assert!(!page.body.contains("<script>"), "no inline script");
    assert_security_headers(&page);
    // Signed in already: the sign-in page sends the browser on.
    let r = get_with(&server, "/console/sign-in", &cookie);
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), "/");
}

#[test]
fn the_cookie_reads_but_changes_nothing_without_the_console_header() {
    let server = Server::start(&[]);
    let cookie = session_cookie(&sign_in(&server, &server.admin_token()));
    let o = origin(&server);
    let body = r#"{"name":"made-by-cookie"}"#;
    let post = |headers: &[(&str, &str)]| {
        let mut h = vec![
            ("cookie", cookie.as_str()),
            ("content-type", "application/json"),
        ];
        h.extend_from_slice(headers);
        request(&server, "POST", "/v1/apps", &h, body)
    };

    // Reads: fine.
    let r = get_with(&server, "/v1/apps", &cookie);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get_with(&server, "/console/apps/nope/urls", &cookie);
    assert_eq!(r.status, 404, "{}", r.body);

    // Changes without the header, or from another origin: 403, nothing done.
    assert_eq!(post(&[]).status, 403);
    assert_eq!(post(&[("origin", o.as_str())]).status, 403);
    assert_eq!(post(&[("x-waypost-console", "1")]).status, 403, "no Origin");
    let r = post(&[
        ("x-waypost-console", "1"),
        ("origin", "https://evil.example"),
    ]);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = post(&[("x-waypost-console", "1"), ("origin", "null")]);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = request(
        &server,
        "DELETE",
        "/v1/apps/web",
        &[("cookie", cookie.as_str())],
        "",
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let apps = server.cli(&["app", "list", "-o", "json"]).ok().json();
    assert_eq!(apps["apps"], json!([]), "nothing was created");
    // Reads from another site: 403 as well.
    let r = request(
        &server,
        "GET",
        "/v1/apps",
        &[
            ("cookie", cookie.as_str()),
            ("origin", "https://evil.example"),
        ],
        "",
    );
    assert_eq!(r.status, 403);
    let r = request(
        &server,
        "GET",
        "/v1/apps",
        &[
            ("cookie", cookie.as_str()),
            ("sec-fetch-site", "cross-site"),
        ],
        "",
    );
    assert_eq!(r.status, 403);
    // A WebSocket (exec) with the cookie: a browser's WebSocket cannot send the header.
    let r = request(
        &server,
        "GET",
        "/v1/exec?app=web",
        &[
            ("cookie", cookie.as_str()),
            ("origin", o.as_str()),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "",
    );
    assert_eq!(r.status, 403, "{}", r.body);

    // The console's own way: the header and this server's Origin.
    let r = post(&[("x-waypost-console", "1"), ("origin", o.as_str())]);
    assert_eq!(r.status, 201, "{}", r.body);

    // A bearer token works as before, with no header and no cookie.
    let admin = server.admin_token();
    let auth = format!("Bearer {admin}");
    let r = request(
        &server,
        "POST",
        "/v1/apps",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        r#"{"name":"made-by-bearer"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = request(&server, "GET", "/v1/apps", &[("authorization", &auth)], "");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("made-by-cookie") && r.body.contains("made-by-bearer"));
    // And without anything: 401 as before.
    let r = request(&server, "GET", "/v1/apps", &[], "");
    assert_eq!(r.status, 401);
    assert!(r.body.contains("missing bearer token"), "{}", r.body);
}

#[test]
fn a_session_ends_with_its_token_and_on_sign_out() {
    let server = Server::start(&[]);
    let ops = server
        .cli(&["token", "create", "--admin", "--name", "ops", "-o", "json"])
        .ok()
        .json();
    let cookie = session_cookie(&sign_in(&server, ops["token"].as_str().unwrap()));
    assert_eq!(get_with(&server, "/v1/apps", &cookie).status, 200);
    assert_eq!(get_with(&server, "/", &cookie).status, 200);
    server
        .cli(&["token", "revoke", ops["id"].as_str().unwrap()])
        .ok();
    let r = get_with(&server, "/v1/apps", &cookie);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(is_sign_in_redirect(&get_with(&server, "/", &cookie)));

    // A token that expires takes its session with it.
    let brief = server
        .cli(&[
            "token", "create", "--admin", "--name", "brief", "--ttl", "2s", "-o", "json",
        ])
        .ok()
        .json();
    let cookie = session_cookie(&sign_in(&server, brief["token"].as_str().unwrap()));
    assert_eq!(get_with(&server, "/", &cookie).status, 200);
    wait_for("the token's expiry to end the session", || {
        is_sign_in_redirect(&get_with(&server, "/", &cookie)).then_some(())
    });
    assert_eq!(
        sign_in(&server, brief["token"].as_str().unwrap()).status,
        401
    );

    // Sign-out clears the cookie and ends the session on the server.
    let cookie = session_cookie(&sign_in(&server, &server.admin_token()));
    let o = origin(&server);
    let r = request(
        &server,
        "POST",
        "/console/sign-out",
        &[("cookie", cookie.as_str()), ("origin", o.as_str())],
        "",
    );
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), "/console/sign-in");
    assert!(
        r.header("set-cookie").contains("Max-Age=0"),
        "{:?}",
        r.headers
    );
    assert!(is_sign_in_redirect(&get_with(&server, "/", &cookie)));
    // The admin token itself is untouched.
    assert_eq!(server.cli(&["app", "list"]).code, Some(0));
}
