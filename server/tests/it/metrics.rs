//! The metrics listener (`--metrics-addr`): a real Prometheus scrapes it and answers for the
//! live-instance gauge; `promtool check metrics` passes on what it serves; a parser finds the
//! series real activity (the REAL entrypoint, the ingress, exec, a restart) produced; health
//! checks there; and the negatives: `off`, an address already taken, other methods and paths.
//!
//! Needs `prometheus` and `promtool` (Debian package prometheus, installed by .ci/run): without
//! them the tests that use them FAIL. The app-driven tests need the entrypoint binary and python3
//! (as the url and exec tests do; without them they print SKIPPED).

use crate::apps::{self, Http, rt, start_app};
use crate::common::{Env, Server, wait_for};
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One plain HTTP/1.0 exchange (the server closes after it): (status, headers, body).
fn http(addr: &str, method: &str, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {raw:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn scrape(server: &Server) -> String {
    let (status, head, body) = http(server.metrics_addr(), "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// A sample: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text format's samples (comments skipped). Label values here never hold `"`, `,`
/// or `}` (app names, fixed words, numbers), which keeps this small.
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("{l:?}"));
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').unwrap_or_else(|| panic!("{l:?}"));
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (n, labels)
                }
                None => (series, BTreeMap::new()),
            };
            Sample {
                name: name.to_string(),
                labels,
                value: value
                    .parse()
                    .unwrap_or_else(|e| panic!("{l:?}: value: {e}")),
            }
        })
        .collect()
}

/// The sum of `name`'s samples whose labels include every pair of `with`.
fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn has(samples: &[Sample], name: &str) -> bool {
    samples.iter().any(|s| s.name == name)
}

/// `promtool check metrics` on `text` (stdin): its complaints, empty when it passes.
fn promtool(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is needed (Debian package prometheus; .ci/run installs it): cannot run it",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said
    } else {
        format!("exit {}: {said}", out.status)
    }
}

/// A Prometheus of the test's own (temp dir, free port), scraping `target` every second; killed
/// on drop.
struct Prometheus {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: waypost\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", apps::free_port());
        let log = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect(
                "prometheus is needed (Debian package prometheus; .ci/run installs it): cannot \
                 run it",
            );
        let mut p = Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        };
        wait_for("Prometheus to be ready", || {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            TcpStream::connect(&p.addr).ok()?;
            (http(&p.addr, "GET", "/-/ready", None).0 == 200).then_some(())
        });
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query's result vector (`/api/v1/query`).
    fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, _, body) = http(&self.addr, "GET", &format!("/api/v1/query?query={q}"), None);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{v}");
        v["data"]["result"].as_array().unwrap().clone()
    }

    /// The value of the single series `promql` selects, once Prometheus has one.
    fn value(&self, promql: &str) -> Option<String> {
        let r = self.query(promql);
        Some(r.first()?["value"][1].as_str()?.to_string())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}

#[test]
fn prometheus_scrapes_the_live_instance_gauge() {
    let server = Server::start(&[]);
    let Some(app) = start_app(&server, "web", &[]) else {
        return;
    };
    let prom = Prometheus::start(server.metrics_addr());
    let live = wait_for("Prometheus to see one live instance of web", || {
        prom.value(r#"waypost_instances_live{app="web"}"#)
            .filter(|v| v == "1")
    });
    assert_eq!(live, "1");
    // The target is healthy: Prometheus parsed what it got (it asks for OpenMetrics).
    let targets = prom.query(r#"up{job="waypost"}"#);
    assert_eq!(targets[0]["value"][1], "1", "{targets:?}");
    // A counter and the process's own figures arrived too.
    assert!(
        prom.value("waypost_control_handshakes_total{result=\"ok\"}")
            .is_some()
    );
    assert!(prom.value("process_resident_memory_bytes").is_some());

    // The instance goes away: the app's series drops to 0 (the app still exists).
    drop(app);
    wait_for("Prometheus to see no live instance of web", || {
        prom.value(r#"waypost_instances_live{app="web"}"#)
            .filter(|v| v == "0")
    });
}

#[test]
fn the_output_passes_promtool_and_counts_real_activity() {
    let server = Server::start(&[]);
    let Some(app) = start_app(&server, "web", &[]) else {
        return;
    };
    // A config push (the default policy restarts the child), then an explicit restart that
    // waits for the new start.
    server
        .cli(&["config", "set", "--app", "web", "GREETING=hey"])
        .ok();
    server.cli(&["restart", "--app", "web"]).ok();
    wait_for("the app to listen again", || {
        TcpStream::connect(("127.0.0.1", app.port)).ok()
    });
    // Exactly one exec session.
    let r = server.cli(&["exec", "--app", "web", "--", "true"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);

    // Ingress requests: 200s and the app's own 404 over one visitor connection (the fast path),
    // a 502 for an instance that does not exist and a 404 for a host that is no app (the hyper
    // path).
    let ingress = apps::ingress_addr(&server);
    let port = ingress.rsplit_once(':').unwrap().1.to_string();
    const OK: usize = 7;
    rt().block_on(async {
        let mut c = Http::connect(&ingress, &format!("web.localhost:{port}"))
            .await
            .unwrap();
        for _ in 0..OK {
            let (status, body) = c.get("/").await.unwrap();
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(c.get("/no-such-page").await.unwrap().0, 404);
        let r = apps::get_once(&ingress, &format!("web--ffffffff.localhost:{port}"), "/")
            .await
            .unwrap();
        assert_eq!((r.0, r.2.as_str()), (502, "no-instance"));
        let r = apps::get_once(&ingress, &format!("nosuch.localhost:{port}"), "/")
            .await
            .unwrap();
        assert_eq!((r.0, r.2.as_str()), (404, "unknown-app"));
    });

    // The exec session has ended (its gauge is back to 0) by the time we look.
    let text = wait_for("exec_sessions_open back to 0", || {
        let t = scrape(&server);
        (sum(&parse(&t), "waypost_exec_sessions_open", &[]) == 0.0).then_some(t)
    });
    let complaints = promtool(&text);
    assert!(
        complaints.is_empty(),
        "promtool check metrics: {complaints}\n{text}"
    );
    let s = parse(&text);
    eprintln!(
        "metrics with one app: {} bytes, {} samples ({} without the histograms' buckets)",
        text.len(),
        s.len(),
        s.iter().filter(|s| !s.name.ends_with("_bucket")).count()
    );

    // Bounded labels: never an instance id.
    for sample in &s {
        assert!(
            !sample.labels.contains_key("instance"),
            "an instance label: {sample:?}"
        );
    }
    let web = [("app", "web")];
    assert_eq!(sum(&s, "waypost_instances_live", &web), 1.0);
    // The control connection: accepted, admitted, frames and bytes both ways.
    assert!(sum(&s, "waypost_control_connections_total", &[]) >= 1.0);
    assert!(sum(&s, "waypost_control_connections_open", &[]) >= 1.0);
    assert!(sum(&s, "waypost_control_handshakes_total", &[("result", "ok")]) >= 1.0);
    for direction in ["in", "out"] {
        let d = [("direction", direction)];
        assert!(
            sum(&s, "waypost_control_frames_total", &d) > 0.0,
            "{direction}"
        );
        assert!(
            sum(&s, "waypost_control_frame_bytes_total", &d) > 0.0,
            "{direction}"
        );
    }
    assert!(
        sum(
            &s,
            "waypost_control_frames_total",
            &[("direction", "in"), ("kind", "Hello")]
        ) >= 1.0
    );
    // Config pushed, the child restarted (by the config change and by `restart`).
    assert!(sum(&s, "waypost_config_pushes_total", &web) >= 1.0);
    assert!(sum(&s, "waypost_child_restarts_total", &web) >= 1.0);
    // One exec session, none open.
    assert_eq!(sum(&s, "waypost_exec_sessions_total", &web), 1.0);
    assert_eq!(sum(&s, "waypost_exec_sessions_open", &[]), 0.0);
    // Tunnel streams for the ingress.
    assert!(
        sum(
            &s,
            "waypost_tunnel_streams_total",
            &[("app", "web"), ("kind", "ingress")]
        ) >= 1.0
    );
    // Ingress requests by status, and the histogram counted each once.
    let status = |app: &str, code: &str| {
        sum(
            &s,
            "waypost_ingress_requests_total",
            &[("app", app), ("status", code)],
        )
    };
    assert_eq!(status("web", "200"), OK as f64);
    assert_eq!(status("web", "404"), 1.0);
    assert_eq!(status("web", "502"), 1.0);
    assert_eq!(status("", "404"), 1.0);
    for app in ["web", ""] {
        let a = [("app", app)];
        let requests = sum(&s, "waypost_ingress_requests_total", &a);
        let count = sum(&s, "waypost_ingress_request_duration_seconds_count", &a);
        let inf = sum(
            &s,
            "waypost_ingress_request_duration_seconds_bucket",
            &[("app", app), ("le", "+Inf")],
        );
        assert_eq!((count, inf), (requests, requests), "app {app:?}");
        assert!(sum(&s, "waypost_ingress_request_duration_seconds_sum", &a) > 0.0);
    }
    // Database calls, timed by the part of the server that made them.
    assert!(has(&s, "waypost_db_statement_duration_seconds_bucket"));
    assert!(
        sum(
            &s,
            "waypost_db_statement_duration_seconds_count",
            &[("op", "transport::control")]
        ) >= 1.0,
        "the control listener's token lookups and claims"
    );
    // The process's own figures.
    assert!(sum(&s, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(sum(&s, "process_virtual_memory_bytes", &[]) > 0.0);
    assert!(sum(&s, "process_open_fds", &[]) > 0.0);
    assert!(sum(&s, "process_max_fds", &[]) >= sum(&s, "process_open_fds", &[]));
    assert!(sum(&s, "process_threads", &[]) >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = sum(&s, "process_start_time_seconds", &[]);
    assert!(
        started > now - 600.0 && started <= now + 5.0,
        "start time {started}, now {now}"
    );

    // OpenMetrics for a client that asks for it (Prometheus does): the same samples, `# EOF`.
    let (status, head, om) = http(
        server.metrics_addr(),
        "GET",
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(has(&parse(&om), "waypost_ingress_requests_total"));
}

/// The TCP ports `pid` listens on (from its socket fds and /proc/PID/net/tcp{,6}).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address (hex ip:port), st 0A = LISTEN, inode.
            if f.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)) {
                let port = f[1].rsplit_once(':').unwrap().1;
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn health_checks_and_refusals_on_the_metrics_listener() {
    let server = Server::start(&[]);
    let addr = server.metrics_addr();
    assert!(
        server
            .stdout()
            .contains(&format!("waypost: metrics listening on {addr}")),
        "{}",
        server.stdout()
    );
    // No token anywhere on this listener; the health checks are the API's.
    assert_eq!(http(addr, "GET", "/healthz", None).0, 200);
    let (status, _, body) = http(addr, "GET", "/readyz", None);
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(http(addr, "GET", "/metrics", None).0, 200);
    // Only GET, only these paths.
    assert_eq!(http(addr, "POST", "/metrics", None).0, 405);
    assert_eq!(http(addr, "DELETE", "/healthz", None).0, 405);
    assert_eq!(http(addr, "GET", "/v1/server", None).0, 404);
    assert_eq!(http(addr, "GET", "/metrics/x", None).0, 404);
    assert_eq!(http(addr, "GET", "/", None).0, 404);
    // It is a listener of its own, next to the other three.
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.env.data_dir().join("server.json")).unwrap())
            .unwrap();
    let mut want: Vec<u16> = ["control_addr", "api_addr", "ingress_addr", "metrics_addr"]
        .iter()
        .map(|k| port_of(info[k].as_str().unwrap()))
        .collect();
    want.sort_unstable();
    assert_eq!(listening_ports(server.pid()), want);
}

#[test]
fn metrics_off_listens_nowhere() {
    let server = Server::start(&["--metrics-addr", "off"]);
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.env.data_dir().join("server.json")).unwrap())
            .unwrap();
    assert!(info["metrics_addr"].is_null(), "{info}");
    assert!(!server.stdout().contains("metrics listening"));
    let mut want: Vec<u16> = ["control_addr", "api_addr", "ingress_addr"]
        .iter()
        .map(|k| port_of(info[k].as_str().unwrap()))
        .collect();
    want.sort_unstable();
    assert_eq!(
        listening_ports(server.pid()),
        want,
        "only control, API and ingress"
    );
    // The API's health checks are still there.
    server.cli(&["app", "list"]).ok();
}

#[test]
fn a_metrics_address_in_use_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let env = Env::new();
    let out = env
        .command()
        .args(["server", "run", "--data-dir"])
        .arg(env.data_dir())
        .args(["--control-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .args(["--ingress-addr", "127.0.0.1:0", "--metrics-addr", &addr])
        .args(env.database_args())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (metrics listener)")),
        "{stderr}"
    );
    assert!(!env.data_dir().join("server.json").exists());
    // Negative control: the same command with the port free starts.
    drop(taken);
    let server = Server::start_in(Env::new(), &["--metrics-addr", &addr]);
    assert_eq!(server.metrics_addr(), addr);
}

#[test]
fn readyz_on_the_metrics_listener_follows_the_database() {
    use waypost_testkit::pg::Cluster;
    let pg = Cluster::start();
    let url = pg.create_database();
    let server = Server::start_in(Env::with_database(&url), &[]);
    let addr = server.metrics_addr().to_string();
    assert_eq!(http(&addr, "GET", "/readyz", None).0, 200);
    pg.stop();
    let (_, _, body) = wait_for("readyz to say not ready", || {
        let r = http(&addr, "GET", "/readyz", None);
        (r.0 == 503).then_some(r)
    });
    assert!(body.contains("database"), "{body}");
    assert_eq!(http(&addr, "GET", "/healthz", None).0, 200);
    // Metrics are still served while the database is away (the app list is skipped).
    assert_eq!(http(&addr, "GET", "/metrics", None).0, 200);
    pg.start_again();
    wait_for("readyz to say ready again", || {
        (http(&addr, "GET", "/readyz", None).0 == 200).then_some(())
    });
}

#[tokio::test]
async fn handshakes_reconnects_and_restarts_are_counted() {
    use crate::common::{Fake, hello, new_id, status};
    use waypost_proto::{Kind, status::State};
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    // Refused Hellos: a token nobody issued, and an admin token (not an entrypoint's).
    let (mut c, _) = Fake::hello(&server, "wpe_not_a_real_token", &new_id()).await;
    c.expect_closed().await;
    let (mut c, _) = Fake::hello(&server, &server.admin_token(), &new_id()).await;
    c.expect_closed().await;
    // A TLS handshake that fails (no protocol in common).
    assert!(
        Fake::connect_to(&server.control_addr, &server.ca_pem(), Some(b"h2"))
            .await
            .is_err()
    );
    // One instance, connecting twice: the second Hello is a reconnect. Its child reports a
    // start count of 1, then 3: two restarts.
    let id = new_id();
    let (c, _) = Fake::welcomed(&server, &token, &id).await;
    drop(c);
    let mut c = Fake::connect(&server).await;
    let mut h = hello(&token, &id);
    let mut s = status(State::Running);
    s.starts = 1;
    h.status = Some(s.clone());
    c.send(Kind::Hello(h).into()).await;
    assert!(matches!(
        c.recv().await.unwrap().kind,
        Some(Kind::Welcome(_))
    ));
    s.starts = 3;
    c.send(Kind::Status(s).into()).await;
    c.ping(1).await;

    let want = [
        ("waypost_control_handshakes_total", "result", "ok", 2.0),
        (
            "waypost_control_handshakes_total",
            "result",
            "bad_token",
            1.0,
        ),
        (
            "waypost_control_handshakes_total",
            "result",
            "rejected",
            1.0,
        ),
        ("waypost_control_reconnects_total", "app", "web", 1.0),
        ("waypost_child_restarts_total", "app", "web", 2.0),
    ];
    let s = tokio::task::spawn_blocking(move || {
        wait_for(
            "the handshakes, the reconnect and the restarts counted",
            || {
                let s = parse(&scrape(&server));
                want.iter()
                    .all(|(name, k, v, n)| sum(&s, name, &[(k, v)]) == *n)
                    .then_some(s)
            },
        )
    })
    .await
    .unwrap();
    assert!(
        sum(
            &s,
            "waypost_control_handshakes_total",
            &[("result", "tls_error")]
        ) >= 1.0
    );
    assert!(sum(&s, "waypost_control_connections_total", &[]) >= 5.0);
    // This connection is open; those before are closed.
    assert_eq!(sum(&s, "waypost_control_connections_open", &[]), 1.0);
    drop(c);
}

/// `--threads N` (or WAYPOST_SERVER_THREADS) sets the runtime's worker threads, said at debug
/// level; 0 and non-numbers are refused before anything starts (exit 2).
#[test]
fn the_runtime_takes_its_worker_count_from_threads() {
    for bad in ["0", "many", "-1"] {
        let env = Env::new();
        let out = env
            .command()
            .args(["server", "run", "--data-dir"])
            .arg(env.data_dir())
            .arg(format!("--threads={bad}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--threads {bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--threads"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!env.data_dir().exists(), "nothing created");
    }
    let mut env = Env::new();
    env.set_var("RUST_LOG", "waypost=debug");
    env.set_var("WAYPOST_SERVER_THREADS", "3");
    let server = Server::start_in(env, &[]);
    assert!(server.logs().contains("threads=3"), "{}", server.logs());
    let mut env = Env::new();
    env.set_var("RUST_LOG", "waypost=debug");
    let server = Server::start_in(env, &["--threads", "1"]);
    assert!(server.logs().contains("threads=1"), "{}", server.logs());
    // The default: half the CPUs, at least one.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut env = Env::new();
    env.set_var("RUST_LOG", "waypost=debug");
    let server = Server::start_in(env, &[]);
    let want = format!("threads={}", cpus.div_ceil(2));
    assert!(server.logs().contains(&want), "{want}: {}", server.logs());
}
