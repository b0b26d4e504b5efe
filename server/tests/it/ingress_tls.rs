//! The HTTPS ingress end to end (`--ingress-tls-addr`): the real server, the REAL entrypoint and
//! the test app (tests/apps/testapp.py), reached with curl (SNI by `--resolve`, `--cacert`,
//! `--http2`) and a WebSocket client over rustls. Custom domains get certificates made here by a
//! CA of their own (rcgen), as a user's would come from theirs.
//!
//! Needs the entrypoint binary (`cargo build -p waypost-entrypoint`, or WAYPOST_ENTRYPOINT_BIN),
//! python3 and curl; without them a test prints SKIPPED and passes.

use crate::apps::{self, rt, start_app, within};
use crate::common::{Env, Server, wait_for};
use std::path::{Path, PathBuf};
use std::process::Command;
use waypost_testkit::pg::Cluster;

const TLS: &[&str] = &["--ingress-tls-addr", "127.0.0.1:0"];

/// The HTTPS ingress's address from server.json.
fn tls_addr(server: &Server) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.env.data_dir().join("server.json")).unwrap())
            .unwrap();
    v["ingress_tls_addr"]
        .as_str()
        .expect("server.json has ingress_tls_addr")
        .to_string()
}

fn port(addr: &str) -> &str {
    addr.rsplit_once(':').unwrap().1
}

fn have_curl() -> bool {
    let ok = Command::new("curl").arg("--version").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: curl is needed");
    }
    ok
}

/// What curl did: exit code, stdout, stderr.
struct Curl {
    code: i32,
    out: String,
    err: String,
}

/// `curl -sS -m 20 ARGS` with `NAME` resolved to the ingress at `addr`, for `https://NAME:PORT
/// PATH`.
fn curl(addr: &str, name: &str, path: &str, args: &[&str]) -> Curl {
    let o = Command::new("curl")
        .args(["-sS", "-m", "20", "--resolve"])
        .arg(format!("{name}:{}:127.0.0.1", port(addr)))
        .args(args)
        .arg(format!("https://{name}:{}{path}", port(addr)))
        .output()
        .unwrap();
    Curl {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The `subject:` and `issuer:` lines of `curl -v`'s certificate report.
fn cert_lines(verbose: &str) -> (String, String) {
    let find = |key: &str| {
        verbose
            .lines()
            .find_map(|l| l.trim_start_matches(['*', ' ']).strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} line in curl -v output:\n{verbose}"))
            .trim()
            .to_string()
    };
    (find("subject:"), find("issuer:"))
}

/// A CA of a user's own and certificates it signs, as PEM files in `dir`.
struct UserCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

/// (year, month, day) of `days` after the epoch, for `rcgen::date_time_ymd`.
fn ymd(days: i64) -> (i32, u8, u8) {
    let (y, m, d) = waypost_proto::date::civil_from_days(days);
    (y as i32, m as u8, d as u8)
}

fn today() -> i64 {
    waypost::util::now_ms() / 86_400_000
}

impl UserCa {
    fn new(dir: &Path) -> UserCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "Example Test CA");
        p.distinguished_name = dn;
        let cert = p.clone().self_signed(&key).unwrap();
        std::fs::write(dir.join("user-ca.pem"), cert.pem()).unwrap();
        UserCa {
            issuer: rcgen::Issuer::new(p, key),
            dir: dir.to_path_buf(),
        }
    }

    fn ca_path(&self) -> String {
        self.dir.join("user-ca.pem").to_str().unwrap().to_string()
    }

    /// A certificate for `sans` valid from `nb` to `na` (days from today), written as
    /// NAME.crt/NAME.key; returns their paths.
    fn issue(&self, name: &str, sans: &[&str], nb: i64, na: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, sans[0]);
        p.distinguished_name = dn;
        let (y, m, d) = ymd(today() + nb);
        p.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = ymd(today() + na);
        p.not_after = rcgen::date_time_ymd(y, m, d);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (
            c.to_str().unwrap().to_string(),
            k.to_str().unwrap().to_string(),
        )
    }
}

#[test]
fn the_default_certificate_http2_and_websockets_over_tls() {
    if !have_curl() {
        return;
    }
    let server = Server::start(TLS);
    assert!(
        server.stdout().contains(&format!(
            "waypost: ingress (TLS) listening on {}",
            tls_addr(&server)
        )),
        "{}",
        server.stdout()
    );
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let addr = tls_addr(&server);
    let ca = server.env.data_dir().join("ca.pem");
    let ca = ca.to_str().unwrap();

    // `waypost url` shows both URLs.
    let url = server.cli(&["url", "-a", "web"]).ok().stdout;
    let lines: Vec<&str> = url.lines().collect();
    assert_eq!(lines.len(), 2, "{url}");
    assert_eq!(lines[1], format!("https://web.localhost:{}/", port(&addr)));

    // The default certificate verifies against the server CA, by name; HTTP/2 by ALPN.
    let c = curl(
        &addr,
        "web.localhost",
        "/",
        &["--cacert", ca, "--http2", "-v", "-w", "\n%{http_version}"],
    );
    assert_eq!(c.code, 0, "{}", c.err);
    assert!(c.out.starts_with("hello hi pid="), "{}", c.out);
    assert!(c.out.ends_with("\n2"), "not HTTP/2: {}", c.out);
    let (subject, issuer) = cert_lines(&c.err);
    assert!(subject.contains("waypost ingress"), "{subject}");
    assert!(issuer.contains("waypost CA"), "{issuer}");
    // HTTP/1.1 when the client offers only that; the headers the app sees.
    let c = curl(
        &addr,
        "web.localhost",
        "/headers",
        &["--cacert", ca, "--http1.1", "-w", "\n%{http_version}"],
    );
    assert_eq!(c.code, 0, "{}", c.err);
    let (json, version) = c.out.rsplit_once('\n').unwrap();
    assert_eq!(version, "1.1");
    let seen: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        seen["host"],
        format!("web.localhost:{}", port(&addr)),
        "{seen}"
    );
    assert_eq!(seen["x-forwarded-proto"], "https", "{seen}");
    // A request body over HTTP/2 reaches the app whole.
    let upload = server.env.root.path().join("upload.bin");
    std::fs::write(&upload, apps::pattern(0, 3 * 1024 * 1024, 9)).unwrap();
    let c = curl(
        &addr,
        "web.localhost",
        "/upload",
        &[
            "--cacert",
            ca,
            "--http2",
            "--data-binary",
            &format!("@{}", upload.display()),
        ],
    );
    assert_eq!(c.code, 0, "{}", c.err);
    let seen: serde_json::Value = serde_json::from_str(&c.out).unwrap();
    assert_eq!(seen["len"], 3 * 1024 * 1024, "{seen}");

    // An app that does not exist: the certificate still verifies, the answer is the 404 page.
    let c = curl(
        &addr,
        "nope.localhost",
        "/",
        &["--cacert", ca, "-i", "--http2"],
    );
    assert_eq!(c.code, 0, "{}", c.err);
    assert!(c.out.starts_with("HTTP/2 404"), "{}", c.out);
    assert!(c.out.contains("x-waypost-error: unknown-app"), "{}", c.out);
    // An SNI name that is nobody's: the default certificate (not valid for it, so -k), 404.
    let c = curl(&addr, "other.test", "/", &["-k", "-v", "-i"]);
    assert_eq!(c.code, 0, "{}", c.err);
    assert!(c.out.contains("x-waypost-error: unknown-app"), "{}", c.out);
    let (subject, issuer) = cert_lines(&c.err);
    assert!(subject.contains("waypost ingress"), "{subject}");
    assert!(issuer.contains("waypost CA"), "{issuer}");
    // And it is not trusted for that name (the negative of the checks above).
    let c = curl(&addr, "other.test", "/", &["--cacert", ca]);
    assert_ne!(c.code, 0, "a certificate for other.test?");

    // A WebSocket through TLS (HTTP/1.1 upgrade).
    rt().block_on(async {
        use futures_util::{SinkExt as _, StreamExt as _};
        use tokio_tungstenite::tungstenite::Message;
        let cfg = waypost::server::pki::client_config(&server.ca_pem(), &[b"http/1.1"]).unwrap();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("web.localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut ws, resp) = within(
            "the WebSocket handshake",
            20,
            tokio_tungstenite::client_async(format!("wss://web.localhost:{}/ws", port(&addr)), tls),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 101);
        for i in 0..10 {
            let text = format!("hello {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            let back = within("an echo", 20, ws.next()).await.unwrap().unwrap();
            assert_eq!(back, Message::text(text));
        }
        let big: Vec<u8> = apps::pattern(0, 300 * 1024, 5);
        ws.send(Message::binary(big.clone())).await.unwrap();
        let back = within("a big echo", 20, ws.next()).await.unwrap().unwrap();
        assert_eq!(back.into_data().as_ref(), &big[..]);
        ws.close(None).await.unwrap();
    });
}

#[test]
fn a_custom_domain_is_served_with_its_certificate_and_bad_ones_are_refused() {
    if !have_curl() {
        return;
    }
    let server = Server::start(TLS);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    server.create_app("api");
    let addr = tls_addr(&server);
    let ca = UserCa::new(server.env.root.path());
    let (cert, key) = ca.issue("www", &["www.example.test"], -1, 90);

    // Not added yet: the default certificate, which the user's CA does not vouch for.
    let c = curl(&addr, "www.example.test", "/", &["--cacert", &ca.ca_path()]);
    assert_ne!(c.code, 0, "served before it was added: {}", c.out);

    let added = server
        .cli(&[
            "domain",
            "add",
            "-a",
            "web",
            "www.example.test",
            "--cert",
            &cert,
            "--key",
            &key,
        ])
        .ok();
    assert!(
        added
            .stdout
            .contains(&format!("https://www.example.test:{}/", port(&addr))),
        "{}",
        added.stdout
    );
    let c = curl(
        &addr,
        "www.example.test",
        "/",
        &["--cacert", &ca.ca_path(), "-v"],
    );
    assert_eq!(c.code, 0, "{}", c.err);
    assert!(c.out.starts_with("hello hi pid="), "{}", c.out);
    let (subject, issuer) = cert_lines(&c.err);
    assert!(subject.contains("CN=www.example.test"), "{subject}");
    assert!(issuer.contains("CN=Example Test CA"), "{issuer}");
    // The plain listener routes the domain too.
    let ingress = apps::ingress_addr(&server);
    let (status, body, _) = rt()
        .block_on(apps::get_once(&ingress, "www.example.test", "/"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("hello hi pid="), "{body}");

    // Listed, with the certificate's subject and expiry; never the key.
    let list = server.cli(&["domain", "list", "-o", "json"]).ok().json();
    let d = &list["domains"][0];
    assert_eq!(d["domain"], "www.example.test", "{list}");
    assert_eq!(d["app"], "web");
    assert_eq!(d["subject"], "CN=www.example.test");
    assert!(d["not_after"].as_str().unwrap().starts_with(&{
        let (y, m, dd) = waypost_proto::date::civil_from_days(today() + 90);
        format!("{y:04}-{m:02}-{dd:02}")
    }));
    assert!(!list.to_string().contains("PRIVATE KEY"), "{list}");
    let table = server.cli(&["domain", "list", "-a", "web"]).ok().stdout;
    assert!(table.contains("www.example.test"), "{table}");
    let empty = server
        .cli(&["domain", "list", "-a", "api", "-o", "json"])
        .ok()
        .json();
    assert_eq!(empty["domains"], serde_json::json!([]));

    // Refusals, each with a clear message.
    let add = |app: &str, domain: &str, cert: &str, key: &str| {
        server
            .cli(&[
                "domain", "add", "-a", app, domain, "--cert", cert, "--key", key,
            ])
            .fails()
            .stderr
    };
    let (_, other_key) = ca.issue("other", &["www.example.test"], -1, 90);
    let e = add("web", "shop.example.test", &cert, &key);
    assert!(e.contains("does not cover shop.example.test"), "{e}");
    let e = add("web", "www.example.test", &cert, &other_key);
    assert!(
        e.contains("private key does not match the certificate"),
        "{e}"
    );
    let (old, old_key) = ca.issue("old", &["old.example.test"], -100, -1);
    let e = add("web", "old.example.test", &old, &old_key);
    assert!(e.contains("the certificate expired on"), "{e}");
    let e = add("api", "www.example.test", &cert, &key);
    assert!(e.contains("already a domain of app web"), "{e}");
    let e = add("nope", "www.example.test", &cert, &key);
    assert!(e.contains("no app named nope"), "{e}");
    let e = add("web", "x.localhost", &cert, &key);
    assert!(e.contains("under the server's URL domain"), "{e}");
    let e = add("web", "www.example.test", &key, &key);
    assert!(e.contains("holds no certificate"), "{e}");
    // Still served, and still web's.
    let c = curl(&addr, "www.example.test", "/", &["--cacert", &ca.ca_path()]);
    assert!(c.out.starts_with("hello hi pid="), "{} {}", c.out, c.err);

    // The API wants the admin token.
    rt().block_on(async {
        let body = serde_json::json!({
            "app": "web", "domain": "api.example.test",
            "cert_pem": std::fs::read_to_string(&cert).unwrap(),
            "key_pem": std::fs::read_to_string(&key).unwrap(),
        });
        let (status, _) = server
            .api(None)
            .request(hyper::Method::POST, "/v1/domains", Some(&body))
            .await
            .unwrap();
        assert_eq!(status, 401);
        let ep = server.entrypoint_token("web", None);
        let (status, v) = server
            .api(Some(&ep))
            .request(hyper::Method::GET, "/v1/domains", None)
            .await
            .unwrap();
        assert_eq!(status, 403, "{v}");
    });

    // A renewal: adding it again replaces the certificate.
    let (renewed, renewed_key) =
        ca.issue("renewed", &["www.example.test", "example.test"], -1, 200);
    server
        .cli(&[
            "domain",
            "add",
            "-a",
            "web",
            "www.example.test",
            "--cert",
            &renewed,
            "--key",
            &renewed_key,
        ])
        .ok();
    let list = server.cli(&["domain", "list", "-o", "json"]).ok().json();
    assert_eq!(list["domains"].as_array().unwrap().len(), 1, "{list}");
    let c = curl(&addr, "www.example.test", "/", &["--cacert", &ca.ca_path()]);
    assert!(c.out.starts_with("hello hi pid="), "{} {}", c.out, c.err);

    // Removed: the default certificate again, and no route.
    server.cli(&["domain", "remove", "www.example.test"]).ok();
    let e = server
        .cli(&["domain", "remove", "www.example.test"])
        .fails()
        .stderr;
    assert!(e.contains("no custom domain www.example.test"), "{e}");
    let c = curl(&addr, "www.example.test", "/", &["--cacert", &ca.ca_path()]);
    assert_ne!(c.code, 0, "still its certificate after remove: {}", c.out);
    let c = curl(&addr, "www.example.test", "/", &["-k", "-i"]);
    assert!(c.out.contains("x-waypost-error: unknown-app"), "{}", c.out);
}

#[test]
fn the_plain_listener_redirects_apps_to_https() {
    if !have_curl() {
        return;
    }
    let server = Server::start(&[
        "--ingress-tls-addr",
        "127.0.0.1:0",
        "--ingress-redirect-https",
    ]);
    server.create_app("web");
    let ingress = apps::ingress_addr(&server);
    let addr = tls_addr(&server);
    let plain = |host: &str| {
        let o = Command::new("curl")
            .args(["-sS", "-m", "20", "-i", "-H"])
            .arg(format!("Host: {host}"))
            .arg(format!("http://{ingress}/a/b?c=d"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = plain(&format!("web.localhost:{}", port(&ingress)));
    assert!(out.starts_with("HTTP/1.1 308"), "{out}");
    let location = format!("https://web.localhost:{}/a/b?c=d", port(&addr));
    assert!(
        out.to_ascii_lowercase()
            .contains(&format!("location: {location}")),
        "{out}"
    );
    // Not an app's host: answered here, not redirected.
    let out = plain(&ingress);
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");

    // The option without an HTTPS ingress: refused at start, with why.
    let o = server
        .env
        .command()
        .args(["server", "run", "--ingress-redirect-https", "--data-dir"])
        .arg(server.env.root.path().join("other-data"))
        .args(["--api-addr", "127.0.0.1:0", "--control-addr", "127.0.0.1:0"])
        .args(["--ingress-addr", "127.0.0.1:0", "--metrics-addr", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--ingress-redirect-https needs --ingress-tls-addr"),
        "{err}"
    );
}

#[test]
fn a_domain_added_on_one_replica_is_served_by_the_other() {
    if !have_curl() {
        return;
    }
    let pg = Cluster::start();
    let url = pg.create_database();
    let flags = [TLS, &["--peer-addr", "127.0.0.1:0"]].concat();
    let a = Server::start_in(Env::with_database(&url), &flags);
    let b = Server::start_in(Env::with_database(&url), &flags);
    a.create_app("web");
    let ca = UserCa::new(a.env.root.path());
    let (cert, key) = ca.issue("www", &["www.example.test"], -1, 90);
    a.cli(&[
        "domain",
        "add",
        "-a",
        "web",
        "www.example.test",
        "--cert",
        &cert,
        "--key",
        &key,
    ])
    .ok();
    // B serves its certificate (the app has no instance: 502, after the TLS handshake).
    let b_addr = tls_addr(&b);
    wait_for("replica B to serve the new domain", || {
        let c = curl(
            &b_addr,
            "www.example.test",
            "/",
            &["--cacert", &ca.ca_path(), "-i"],
        );
        (c.code == 0).then_some(c.out)
    });
    // An instance held by A, reached over B's HTTPS ingress: the hop keeps "it came over TLS".
    if let Some(_app) = start_app(&a, "web", &[]) {
        let ca_pem = a.env.data_dir().join("ca.pem");
        let c = wait_for("B to reach A's instance over HTTPS", || {
            let c = curl(
                &b_addr,
                "web.localhost",
                "/headers",
                &["--cacert", ca_pem.to_str().unwrap()],
            );
            (c.code == 0 && c.out.starts_with('{')).then_some(c)
        });
        let seen: serde_json::Value = serde_json::from_str(&c.out).unwrap();
        assert_eq!(seen["x-forwarded-proto"], "https", "{seen}");
        assert!(seen.get("x-waypost-hop-proto").is_none(), "{seen}");
        // Over B's plain listener, a visitor cannot claim TLS with the hop's header.
        let plain = b.stdout();
        let ingress = plain
            .lines()
            .find_map(|l| l.strip_prefix("waypost: ingress listening on "))
            .unwrap()
            .to_string();
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-H",
                "Host: web.localhost",
                "-H",
                "x-waypost-hop-proto: https",
            ])
            .arg(format!("http://{ingress}/headers"))
            .output()
            .unwrap();
        let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(seen["x-forwarded-proto"], "http", "{seen}");
    }
    // And forgets it when it is removed on A.
    a.cli(&["domain", "remove", "www.example.test"]).ok();
    wait_for("replica B to drop the domain", || {
        let c = curl(
            &b_addr,
            "www.example.test",
            "/",
            &["--cacert", &ca.ca_path()],
        );
        (c.code != 0).then_some(())
    });
}
