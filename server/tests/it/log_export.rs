//! `--log-export`: stored log lines forwarded to an OpenTelemetry collector over OTLP/HTTP
//! (server/src/server/service/export.rs). The collector is `otlp_receiver.py` (next to this
//! file), which decodes with the official OTLP protobuf definitions (PyPI
//! `opentelemetry-proto`) and writes what it got as JSON lines; the app is the real entrypoint
//! running `sh`. The exporter's counters are read from `GET /v1/server` (`log_export`).

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::*;
use serde_json::Value;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RECEIVER: &str = include_str!("otlp_receiver.py");

/// Whether python3 with the official OTLP protobufs is here; a loud skip otherwise (.ci/run
/// installs `opentelemetry-proto`).
fn receiver_available(test: &str) -> bool {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import opentelemetry.proto.collector.logs.v1.logs_service_pb2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "\n!!! SKIPPING {test}: python3 with opentelemetry-proto is not installed \
             (pip install opentelemetry-proto)\n"
        );
    }
    ok
}

/// The test collector: a python3 process, its output file and its mode file.
struct Receiver {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    tls: Option<(PathBuf, PathBuf)>,
}

impl Receiver {
    fn start() -> Receiver {
        Receiver::start_tls(None)
    }

    /// With `tls` (cert, key): answers over TLS.
    fn start_tls(tls: Option<(PathBuf, PathBuf)>) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("receiver.py"), RECEIVER).unwrap();
        let mut r = Receiver {
            dir,
            child: None,
            port: 0,
            tls,
        };
        r.spawn();
        r
    }

    /// Starts the process (again), on the same port as before if there was one.
    fn spawn(&mut self) {
        let d = self.dir.path();
        let mut cmd = Command::new("python3");
        cmd.arg(d.join("receiver.py"))
            .arg(d.join("out.jsonl"))
            .arg(d.join("mode"))
            .arg(self.port.to_string());
        if let Some((cert, key)) = &self.tls {
            cmd.arg(cert).arg(key);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join("stderr")).unwrap())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        self.port = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "the receiver did not start: {:?}\n{}",
                line,
                std::fs::read_to_string(d.join("stderr")).unwrap_or_default()
            )
        });
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("otlp+{scheme}://127.0.0.1:{}", self.port)
    }

    /// `ok`, `status N` or `hang` (see otlp_receiver.py).
    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.path().join("mode"), mode).unwrap();
    }

    fn rows(&self, kind: &str) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("out.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    fn records(&self) -> Vec<Value> {
        self.rows("record")
    }

    fn requests(&self) -> Vec<Value> {
        self.rows("request")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- receiver stderr ---\n{}",
                std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
            );
        }
    }
}

/// The bodies of the records of `stream` (`waypost.stream`), in arrival order.
fn bodies(records: &[Value], stream: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["attributes"]["waypost.stream"] == stream)
        .map(|r| r["body"].as_str().unwrap().to_string())
        .collect()
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

/// `GET /v1/server`'s `log_export` counters.
fn export_stats(server: &Server) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt
        .block_on(server.api(Some(&server.admin_token())).request(
            hyper::Method::GET,
            "/v1/server",
            None,
        ))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["log_export"].clone()
}

/// A sample of the server's Prometheus metrics (`/metrics` on the metrics listener), e.g.
/// `waypost_log_export_dropped_total` or `waypost_log_lines_stored_total{app="web"}`; 0 when
/// absent (a counter never touched).
fn metric(server: &Server, series: &str) -> u64 {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(server.metrics_addr()).unwrap();
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

fn stat(server: &Server, name: &str) -> u64 {
    export_stats(server)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no log_export.{name}: {}", export_stats(server)))
}

/// The lines `waypost logs` has of `app` (markers included), as (stream, text).
fn stored(server: &Server, app: &str) -> Vec<(String, String)> {
    server
        .cli(&["logs", "--app", app, "-o", "json"])
        .ok()
        .stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let data = v["data_b64"]
                .as_str()
                .and_then(waypost::util::base64_decode)
                .unwrap_or_default();
            (
                v["stream"].as_str().unwrap_or_default().to_string(),
                String::from_utf8_lossy(&data).into_owned(),
            )
        })
        .collect()
}

fn wait_stored(server: &Server, app: &str, line: &str, ep: &Entrypoint) {
    wait_for(&format!("{line:?} stored\n{}", ep.stderr()), || {
        stored(server, app)
            .iter()
            .any(|(_, t)| t == line)
            .then_some(())
    });
}

fn wait_record(r: &Receiver, body: &str, server: &Server) -> Vec<Value> {
    wait_for(
        &format!("{body:?} at the collector (stats {})", export_stats(server)),
        || {
            let recs = r.records();
            recs.iter().any(|x| x["body"] == body).then_some(recs)
        },
    )
}

fn start_server(env: Env, r: &Receiver) -> Server {
    Server::start_in(env, &["--log-export", &r.url()])
}

#[test]
fn lines_of_a_running_app_arrive_with_their_attributes_in_order() {
    if !receiver_available("lines_of_a_running_app_arrive_with_their_attributes_in_order") {
        return;
    }
    let r = Receiver::start();
    let mut env = Env::new();
    env.set_var("WAYPOST_LOG_EXPORT_HEADERS", "authorization=Bearer%20t0ken");
    let server = start_server(env, &r);
    let token = server.entrypoint_token("web", Some("canary"));
    let script = "for i in $(seq 1 50); do echo \"out $i\"; echo \"err $i\" >&2; done; \
                  printf 'bad \\377 byte\\n'; exec sleep 1000";
    let Some(ep) = Builder::with_token(&server, &token, script).spawn() else {
        return;
    };
    let inst = ep.instance(&server);
    let id = inst["id"].as_str().unwrap();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    wait_record(&r, "bad \u{fffd} byte", &server);
    wait_record(&r, "err 50", &server);

    // Every stored line was exported, once: the counters and the collector agree with `logs`.
    let all = wait_for("the queue to drain", || {
        let s = export_stats(&server);
        let n = stored(&server, "web").len() as u64;
        (s["queued"] == 0 && s["sent"] == n).then_some(n)
    });
    let recs = r.records();
    assert_eq!(recs.len() as u64, all, "{recs:#?}");
    let s = export_stats(&server);
    assert_eq!(
        (s["dropped"].as_u64(), s["failed"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    // The same in the metrics, with the intake's: received per stream, stored per app.
    assert_eq!(metric(&server, "waypost_log_export_lines_total"), all);
    assert_eq!(metric(&server, "waypost_log_export_queue"), 0);
    assert_eq!(
        metric(&server, r#"waypost_log_lines_stored_total{app="web"}"#),
        all
    );
    let received = |stream: &str| {
        metric(
            &server,
            &format!(r#"waypost_log_lines_received_total{{app="web",stream="{stream}"}}"#),
        )
    };
    assert!(
        received("stdout") >= 51 && received("stderr") >= 50,
        "every line came in"
    );
    assert!(metric(&server, r#"waypost_log_bytes_received_total{app="web"}"#) > 500);

    // Order per stream, exactly what the app wrote (a non-UTF-8 byte replaced).
    let mut want_out = numbered("out", 50);
    want_out.push("bad \u{fffd} byte".into());
    assert_eq!(bodies(&recs, "stdout"), want_out);
    assert_eq!(bodies(&recs, "stderr"), numbered("err", 50));
    for rec in &recs {
        let res = &rec["resource"];
        assert_eq!(res["service.name"], "web", "{rec}");
        assert_eq!(res["service.instance.id"], id, "{rec}");
        assert_eq!(res["waypost.deployment"], "canary", "{rec}");
        assert_eq!(res["host.name"], inst["hostname"], "{rec}");
        assert_eq!(rec["scope"], "waypost");
        assert_eq!(rec["scope_version"], env!("CARGO_PKG_VERSION"));
        let a = &rec["attributes"];
        let (iostream, stream) = (a["log.iostream"].as_str(), a["waypost.stream"].as_str());
        match stream {
            Some("stdout") => assert_eq!(iostream, Some("stdout")),
            // The entrypoint writes its own lines to stderr.
            Some("stderr") | Some("entrypoint") => assert_eq!(iostream, Some("stderr")),
            other => panic!("stream {other:?}: {rec}"),
        }
        // Timestamps: the entrypoint's time of the line, and the server's of its arrival.
        let (time, observed) = (
            rec["time"].as_u64().unwrap(),
            rec["observed"].as_u64().unwrap(),
        );
        let minute = 60_000_000_000;
        assert!(time > t0 - minute && time < t0 + minute, "{rec}");
        assert!(observed > t0 - minute && observed < t0 + minute, "{rec}");
    }
    // The entrypoint's own lines are there too, with their level as the severity; an app's
    // lines have none (stderr is not "error").
    let own: Vec<_> = recs
        .iter()
        .filter(|x| x["attributes"]["waypost.stream"] == "entrypoint")
        .collect();
    assert!(!own.is_empty(), "no entrypoint lines: {recs:#?}");
    for x in own {
        let level = x["body"].as_str().unwrap().split(' ').next().unwrap();
        assert_eq!(x["severity_text"], level, "{x}");
        assert!(x["severity_number"].as_i64().unwrap() > 0, "{x}");
    }
    let err = recs.iter().find(|x| x["body"] == "err 1").unwrap();
    assert_eq!(
        (err["severity_number"].as_i64(), &err["severity_text"]),
        (Some(0), &Value::from(""))
    );
    // The request: protobuf to /v1/logs, with the configured header.
    for q in r.requests() {
        assert_eq!(q["path"], "/v1/logs");
        assert_eq!(q["content_type"], "application/x-protobuf");
        assert_eq!(q["authorization"], "Bearer t0ken");
    }
}

#[test]
fn lines_logged_while_the_collector_is_down_arrive_when_it_is_back() {
    if !receiver_available("lines_logged_while_the_collector_is_down_arrive_when_it_is_back") {
        return;
    }
    let mut r = Receiver::start();
    let server = start_server(Env::new(), &r);
    let script = "for i in $(seq 1 20); do echo \"early $i\"; done; \
                  while [ ! -e \"$D/go\" ]; do sleep 0.05; done; \
                  for i in $(seq 1 300); do echo \"late $i\"; done; exec sleep 1000";
    let Some(ep) = Builder::new(&server, "web", script).spawn() else {
        return;
    };
    wait_record(&r, "early 20", &server);
    r.kill();
    std::fs::write(ep.dir.join("go"), "").unwrap();
    wait_stored(&server, "web", "late 300", &ep);
    // The collector is down: attempts fail and the lines wait.
    wait_for("a failed export", || {
        (stat(&server, "failed") >= 1 && stat(&server, "queued") >= 300).then_some(())
    });
    assert!(r.records().iter().all(|x| x["body"] != "late 1"));
    r.spawn(); // back, on the same port
    let recs = wait_record(&r, "late 300", &server);
    let mut want = numbered("early", 20);
    want.extend(numbered("late", 300));
    assert_eq!(
        bodies(&recs, "stdout"),
        want,
        "none lost, none twice, in order"
    );
    wait_for("the queue to drain", || {
        (stat(&server, "queued") == 0).then_some(())
    });
    assert_eq!(stat(&server, "dropped"), 0);
}

#[test]
fn an_overflowing_queue_drops_the_oldest_lines_and_counts_them() {
    if !receiver_available("an_overflowing_queue_drops_the_oldest_lines_and_counts_them") {
        return;
    }
    let mut r = Receiver::start();
    r.kill(); // down from the start: everything queues
    let mut env = Env::new();
    env.set_var("WAYPOST_LOG_EXPORT_QUEUE", "10");
    let server = start_server(env, &r);
    let script = "for i in $(seq 1 200); do echo \"n $i\"; done; exec sleep 1000";
    let Some(ep) = Builder::new(&server, "web", script).spawn() else {
        return;
    };
    wait_stored(&server, "web", "n 200", &ep);
    wait_for("the overflow to be counted", || {
        let s = export_stats(&server);
        (s["dropped"].as_u64() >= Some(150) && s["failed"].as_u64() >= Some(1)).then_some(())
    });
    // At most the cap, plus the one batch in flight (itself at most the cap).
    assert!(stat(&server, "queued") <= 20, "{}", export_stats(&server));
    r.spawn();
    let recs = wait_record(&r, "n 200", &server);
    let total = wait_for("sent + dropped = stored", || {
        let s = export_stats(&server);
        let n = stored(&server, "web").len() as u64;
        let (sent, dropped) = (s["sent"].as_u64().unwrap(), s["dropped"].as_u64().unwrap());
        (s["queued"] == 0 && sent + dropped == n).then_some((sent, dropped))
    });
    let recs = if recs.len() as u64 == total.0 {
        recs
    } else {
        r.records()
    };
    assert_eq!(metric(&server, "waypost_log_export_dropped_total"), total.1);
    assert_eq!(metric(&server, "waypost_log_export_lines_total"), total.0);
    assert!(metric(&server, "waypost_log_export_failures_total") >= 1);
    assert_eq!(
        recs.len() as u64,
        total.0,
        "the collector got what was sent"
    );
    // The newest lines are kept, still in order.
    let got = bodies(&recs, "stdout");
    let nums: Vec<u32> = got
        .iter()
        .map(|b| b.strip_prefix("n ").unwrap().parse().unwrap())
        .collect();
    assert!(nums.windows(2).all(|w| w[0] < w[1]), "{nums:?}");
    assert!(nums.len() < 200 && nums.ends_with(&[199, 200]), "{nums:?}");
}

#[test]
fn a_collector_refusing_requests_drops_them_and_the_server_keeps_storing() {
    if !receiver_available("a_collector_refusing_requests_drops_them_and_the_server_keeps_storing")
    {
        return;
    }
    let r = Receiver::start();
    r.set_mode("status 400");
    let server = start_server(Env::new(), &r);
    let script = "for i in $(seq 1 30); do echo \"n $i\"; done; \
                  while [ ! -e \"$D/go\" ]; do sleep 0.05; done; echo after; exec sleep 1000";
    let Some(ep) = Builder::new(&server, "web", script).spawn() else {
        return;
    };
    wait_stored(&server, "web", "n 30", &ep);
    let n = wait_for("every line dropped", || {
        let s = export_stats(&server);
        let n = stored(&server, "web").len() as u64;
        (s["queued"] == 0 && s["dropped"] == n).then_some(n)
    });
    // Each refused request is dropped at once: never retried.
    let requests = r.requests();
    assert!(!requests.is_empty());
    assert!(requests.iter().all(|q| q["status"] == 400));
    assert_eq!(stat(&server, "failed"), requests.len() as u64);
    assert_eq!(
        requests
            .iter()
            .map(|q| q["records"].as_u64().unwrap())
            .sum::<u64>(),
        n
    );
    assert_eq!(stat(&server, "sent"), 0);
    assert!(r.records().is_empty());
    // One warning in the server's log, not one per batch.
    let warnings = server.logs().matches("log export failing").count();
    assert_eq!(warnings, 1, "{}", server.logs());
    // The collector takes requests again: later lines go through.
    r.set_mode("ok");
    std::fs::write(ep.dir.join("go"), "").unwrap();
    wait_record(&r, "after", &server);
    wait_stored(&server, "web", "after", &ep);
}

#[test]
fn a_hanging_collector_times_out_is_retried_and_nothing_else_waits() {
    if !receiver_available("a_hanging_collector_times_out_is_retried_and_nothing_else_waits") {
        return;
    }
    let r = Receiver::start();
    r.set_mode("hang");
    let mut env = Env::new();
    env.set_var("WAYPOST_LOG_EXPORT_TIMEOUT", "300ms");
    let server = start_server(env, &r);
    let script = "for i in $(seq 1 10); do echo \"n $i\"; done; exec sleep 1000";
    let Some(ep) = Builder::new(&server, "web", script).spawn() else {
        return;
    };
    // Storing and reading logs does not wait for the collector.
    wait_stored(&server, "web", "n 10", &ep);
    wait_for("timed-out requests retried", || {
        (stat(&server, "failed") >= 3 && r.requests().len() >= 3).then_some(())
    });
    assert!(stat(&server, "queued") >= 10);
    assert_eq!(stat(&server, "dropped"), 0);
    assert!(
        server.logs().contains("no answer within 300ms"),
        "{}",
        server.logs()
    );
    // The collector answers again: the same lines arrive.
    r.set_mode("ok");
    let recs = wait_record(&r, "n 10", &server);
    assert_eq!(bodies(&recs, "stdout"), numbered("n", 10));
    wait_for("the queue to drain", || {
        (stat(&server, "queued") == 0).then_some(())
    });
}

/// Runs `waypost server run` with `args` and `env`, expecting it to refuse to start: its exit
/// code and stderr (killed after [`WAIT`] if it does start).
fn refused_start(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let e = Env::new();
    let stderr = e.root.path().join("stderr");
    let mut child = e
        .command()
        .args(["server", "run", "--data-dir"])
        .arg(e.data_dir())
        .args(["--control-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .args(["--ingress-addr", "127.0.0.1:0", "--metrics-addr", "off"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !e.data_dir().join("server.json").exists(),
        "{args:?}: the server got as far as listening"
    );
    (
        status.and_then(|s| s.code()),
        std::fs::read_to_string(&stderr).unwrap(),
    )
}

#[test]
fn malformed_log_export_settings_stop_the_start() {
    for (url, says) in [
        ("http://x", "otlp+http://x"),
        ("otlp+http://", "no host"),
        ("otlp+ftp://h", "unsupported scheme"),
        ("otlp+http://h:0", "not a port"),
        ("collector:4318", "not a URL"),
    ] {
        let (code, err) = refused_start(&["--log-export", url], &[]);
        assert_eq!(code, Some(2), "{url}: {err}");
        assert!(
            err.contains("--log-export") && err.contains(says),
            "{url}: {err}"
        );
    }
    for (url, var, value, says) in [
        ("otlp+http://h", "WAYPOST_LOG_EXPORT_QUEUE", "0", "positive"),
        (
            "otlp+http://h",
            "WAYPOST_LOG_EXPORT_TIMEOUT",
            "soon",
            "WAYPOST_LOG_EXPORT_TIMEOUT",
        ),
        (
            "otlp+http://h",
            "WAYPOST_LOG_EXPORT_HEADERS",
            "nokey",
            "key=value",
        ),
        (
            "otlp+https://h",
            "WAYPOST_LOG_EXPORT_CA",
            "/nonexistent/ca.pem",
            "/nonexistent/ca.pem",
        ),
    ] {
        let (code, err) = refused_start(&["--log-export", url], &[(var, value)]);
        assert_eq!(code, Some(2), "{var}={value}: {err}");
        assert!(err.contains(says), "{var}={value}: {err}");
    }
    // Negative control: the same flag with a good URL starts (and is stopped by the harness).
    let server = Server::start(&["--log-export", "otlp+http://127.0.0.1:9"]);
    assert_eq!(export_stats(&server)["queued"], 0);
    // An empty WAYPOST_LOG_EXPORT (a unit file's `Environment=WAYPOST_LOG_EXPORT=`) is off.
    let mut env = Env::new();
    env.set_var("WAYPOST_LOG_EXPORT", "");
    let off = Server::start_in(env, &[]);
    assert_eq!(export_stats(&off), Value::Null);
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the openssl CLI in `dir`:
/// (ca.pem, cert.pem, key.pem). None if openssl is missing.
fn make_pki(dir: &Path, name: &str) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (ca, ca_key, cert, key, csr, ext) = (
        p("ca.pem"),
        p("ca.key"),
        p("cert.pem"),
        p("key.pem"),
        p("req.csr"),
        p("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let ok = run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
        "-days",
        "2",
        "-subj",
        "/CN=test collector CA",
    ]) && run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
        "-subj",
        "/CN=127.0.0.1",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-out",
        &s(&cert),
        "-days",
        "2",
        "-extfile",
        &s(&ext),
    ]);
    if !ok {
        eprintln!("\n!!! SKIPPING the otlp+https test: openssl could not make certificates\n");
    }
    ok.then_some((ca, cert, key))
}

#[test]
fn otlp_over_https_trusts_only_the_configured_ca() {
    if !receiver_available("otlp_over_https_trusts_only_the_configured_ca") {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let (Some((ca, cert, key)), Some((other_ca, _, _))) =
        (make_pki(pki.path(), "good"), make_pki(pki.path(), "other"))
    else {
        return;
    };
    let r = Receiver::start_tls(Some((cert, key)));
    // Negative control first: another CA → the TLS handshake fails, nothing arrives.
    let mut env = Env::new();
    env.set_var("WAYPOST_LOG_EXPORT_CA", &other_ca);
    let wrong = start_server(env, &r);
    let script = "echo secret line; exec sleep 1000";
    let Some(_ep1) = Builder::new(&wrong, "wrong", script).spawn() else {
        return;
    };
    wait_for("a failed TLS export", || {
        (stat(&wrong, "failed") >= 1).then_some(())
    });
    assert!(
        wrong.logs().contains("TLS with 127.0.0.1"),
        "{}",
        wrong.logs()
    );
    // The right CA (as PEM text, as WAYPOST_CA takes it): the lines arrive.
    let mut env = Env::new();
    env.set_var(
        "WAYPOST_LOG_EXPORT_CA",
        std::fs::read_to_string(&ca).unwrap(),
    );
    let right = start_server(env, &r);
    let Some(_ep2) = Builder::new(&right, "right", "echo over tls; exec sleep 1000").spawn() else {
        return;
    };
    let recs = wait_record(&r, "over tls", &right);
    assert!(
        recs.iter()
            .all(|x| x["resource"]["service.name"] == "right"),
        "{recs:#?}"
    );
    assert_eq!(stat(&right, "failed"), 0);
}
