//! `waypost port-forward` end to end: the real server, the REAL entrypoint with real children (a
//! python TCP echo server; a PostgreSQL cluster on the same host), the real CLI as a child
//! process, real sockets; every port 0 or found free just before.
//!
//! Needs the entrypoint binary (`cargo build -p waypost-entrypoint`, or WAYPOST_ENTRYPOINT_BIN)
//! and python3; without them each test prints SKIPPED and passes. The PostgreSQL and replica
//! tests also need the PostgreSQL binaries (Debian: `postgresql`).

use crate::apps::{self, free_port, python, rt};
use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::{Env, Run, Server, wait_for};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use waypost_testkit::pg::Cluster;

const MIB: usize = 1024 * 1024;

/// A TCP echo server on $ECHO_PORT (127.0.0.1): every connection gets its bytes back, and its
/// FIN answered with ours once everything was echoed (so a half-close is seen both ways).
const ECHO: &str = r#"
import os, socket, threading
def serve(c):
    try:
        while True:
            b = c.recv(262144)
            if not b:
                break
            c.sendall(b)
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["ECHO_PORT"])))
s.listen(128)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The echo server as app `web` under the entrypoint on `server`, its `WAYPOST_URL_PORTS` set to
/// `*`, or to the echo port only: (entrypoint, echo port, instance id). None: skipped.
fn start_echo(server: &Server, only_echo_port: bool) -> Option<(Entrypoint, u16, String)> {
    let py = python()?;
    let port = free_port();
    let port_s = port.to_string();
    let ep = Builder::new(server, "web", r#"exec "$PY" -c "$ECHO""#)
        .env("PY", py.to_str().unwrap())
        .env("ECHO", ECHO)
        .env("ECHO_PORT", &port_s)
        .env("PORT", &port_s)
        .env(
            "WAYPOST_URL_PORTS",
            if only_echo_port { &port_s } else { "*" },
        )
        .spawn()?;
    let id = ep.instance(server)["id"].as_str().unwrap().to_string();
    wait_for(&format!("the echo server to listen on {port}"), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    Some((ep, port, id))
}

/// A running `waypost port-forward`, its output collected; killed on drop.
struct Forward {
    child: Child,
    /// The local port it printed.
    port: u16,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

/// Collects a pipe's text into a shared string, on a thread.
fn collect(pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut t = t.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    text
}

impl Forward {
    /// `waypost port-forward -a web ARGS...` against `server`, once it printed where it listens.
    fn start(server: &Server, args: &[&str]) -> Forward {
        Forward::start_env(server, args, &[])
    }

    /// [`Forward::start`] with extra environment variables for the CLI.
    fn start_env(server: &Server, args: &[&str], env: &[(&str, &str)]) -> Forward {
        let mut child = server
            .env
            .command()
            .envs(env.iter().copied())
            .args(["port-forward", "-a", "web"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning waypost port-forward");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let port = wait_for("port-forward to print where it listens", || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("port-forward exited ({status}): {}", stderr.lock().unwrap());
            }
            let out = stdout.lock().unwrap();
            let line = out.lines().find(|l| l.starts_with("Forwarding from "))?;
            // "Forwarding from 127.0.0.1:LOCAL -> REMOTE"
            let rest = line.strip_prefix("Forwarding from 127.0.0.1:").unwrap();
            Some(rest.split_once(" -> ").unwrap().0.parse::<u16>().unwrap())
        });
        Forward {
            child,
            port,
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to the forward");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- port-forward stdout ---\n{}--- port-forward stderr ---\n{}",
                self.stdout.lock().unwrap(),
                self.stderr.lock().unwrap()
            );
        }
    }
}

/// Sends `len` bytes of the seeded stream through `s`, half-closes, and reads everything back:
/// (bytes read, their SHA-256). Writing and reading run at once (an echo sends back while it
/// reads), so neither side's buffers have to hold the whole transfer.
fn round_trip(s: TcpStream, len: usize, seed: u8) -> (usize, String) {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..len.div_ceil(65536) {
            w.write_all(&apps::pattern(i, 65536.min(len - i * 65536), seed))
                .expect("writing into the forward");
        }
        // The FIN: the echo finishes and answers with its own once everything came back.
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                ctx.update(&buf[..k]);
                n += k;
            }
            Err(e) => panic!("reading from the forward after {n} bytes: {e}"),
        }
    }
    writer.join().unwrap();
    (n, crate::common::hex(ctx.finish().as_ref()))
}

/// Whether something accepts connections on 127.0.0.1:`port`.
fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// The connection was closed by the forward without a byte: EOF or a reset.
fn closed_without_data(mut s: TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn a_hundred_mib_round_trip_intact_through_one_forwarded_connection() {
    let server = Server::start(&[]);
    let Some((_ep, echo_port, _id)) = start_echo(&server, false) else {
        return;
    };
    let fwd = Forward::start(&server, &[&format!("0:{echo_port}")]);
    assert_ne!(fwd.port, echo_port, "0:REMOTE listens on a free port");
    assert!(fwd.stdout.lock().unwrap().contains(&format!(
        "Forwarding from 127.0.0.1:{} -> {echo_port}\n",
        fwd.port
    )));

    let len = 100 * MIB;
    let t0 = Instant::now();
    let (n, sha) = round_trip(fwd.connect(), len, 7);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(n, len, "bytes echoed back");
    assert_eq!(
        sha,
        apps::stream_sha256(len, 7),
        "100 MiB came back different"
    );
    eprintln!(
        "port-forward: 100 MiB each way through one connection in {secs:.2}s = {:.1} MiB/s each way",
        100.0 / secs
    );
    assert!(fwd.stderr().is_empty(), "{}", fwd.stderr());
}

#[test]
fn twenty_concurrent_connections_each_echo_their_own_data() {
    let server = Server::start(&[]);
    let Some((_ep, echo_port, _id)) = start_echo(&server, false) else {
        return;
    };
    let fwd = Forward::start(&server, &[&format!(":{echo_port}")]);
    let len = 2 * MIB;
    let conns: Vec<TcpStream> = (0..20).map(|_| fwd.connect()).collect();
    let t0 = Instant::now();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| std::thread::spawn(move || (i, round_trip(s, len, i as u8))))
        .collect();
    for t in threads {
        let (i, (n, sha)) = t.join().unwrap();
        assert_eq!(n, len, "connection {i}");
        assert_eq!(
            sha,
            apps::stream_sha256(len, i as u8),
            "connection {i} got other data"
        );
    }
    eprintln!(
        "20 concurrent connections x 2 MiB each way in {:?}",
        t0.elapsed()
    );
    let handled = fwd
        .stdout
        .lock()
        .unwrap()
        .matches("Handling connection for")
        .count();
    assert_eq!(handled, 20);
    assert!(fwd.stderr().is_empty(), "{}", fwd.stderr());
}

#[test]
fn a_postgresql_session_runs_through_the_forward() {
    let server = Server::start(&[]);
    let pg = Cluster::start();
    let pg_port = pg.port().to_string();
    // The instance only has to be up on the same host; its child does nothing.
    let Some(ep) = Builder::new(&server, "web", "exec sleep 1000")
        .env("WAYPOST_URL_PORTS", &pg_port)
        .spawn()
    else {
        return;
    };
    let id = ep.instance(&server)["id"].as_str().unwrap().to_string();
    let fwd = Forward::start(&server, &["--instance", &id[..8], &format!("0:{pg_port}")]);
    let psql = |sql: &str| {
        Run::from_output(
            std::process::Command::new(pg.bin_dir().join("psql"))
                .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p"])
                .arg(fwd.port.to_string())
                .args(["-U", "postgres", "-d", "postgres", "-c", sql])
                .env("PGCONNECT_TIMEOUT", "20")
                .stdin(Stdio::null())
                .output()
                .expect("spawning psql"),
        )
    };
    let r = psql("select 42").ok();
    assert_eq!(r.stdout.trim(), "42");
    // A bigger answer, to be sure it is no accident of one small packet.
    let r = psql("select sum(length(repeat('x', g))) from generate_series(1, 2000) g").ok();
    assert_eq!(r.stdout.trim(), "2001000");
    assert!(fwd.stderr().is_empty(), "{}", fwd.stderr());
}

#[test]
fn the_api_refuses_bad_tokens_apps_instances_and_ports() {
    let server = Server::start(&[]);
    let Some((_ep, echo_port, id)) = start_echo(&server, false) else {
        return;
    };
    let admin = server.admin_token();
    let ep_token = server.entrypoint_token("web", None);
    let rt = rt();
    let get = |token: Option<&str>, path: &str| {
        let (status, body) = rt
            .block_on(server.api(token).request(hyper::Method::GET, path, None))
            .unwrap();
        (
            status.as_u16(),
            body["error"].as_str().unwrap_or_default().to_string(),
            body,
        )
    };
    let ok = format!("/v1/apps/web/port-forward?port={echo_port}");
    // The plain GET says which instance every connection would go to.
    let (status, _, body) = get(Some(&admin), &ok);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["instance"], id.as_str());
    assert_eq!(body["port"], echo_port);
    for (token, path, want, says) in [
        (None, ok.clone(), 401, "missing bearer token"),
        (Some(ep_token.as_str()), ok.clone(), 403, "entrypoint token"),
        (
            Some(admin.as_str()),
            "/v1/apps/nope/port-forward?port=80".to_string(),
            404,
            "no app named nope",
        ),
        (
            Some(admin.as_str()),
            format!("/v1/apps/web/port-forward?port={echo_port}&instance=ffff"),
            404,
            "no live instance of app web has an id starting with \"ffff\"",
        ),
        (
            Some(admin.as_str()),
            "/v1/apps/web/port-forward?port=0".to_string(),
            400,
            "invalid port \"0\"",
        ),
        (
            Some(admin.as_str()),
            "/v1/apps/web/port-forward?port=70000".to_string(),
            400,
            "invalid port \"70000\"",
        ),
        (
            Some(admin.as_str()),
            "/v1/apps/web/port-forward".to_string(),
            400,
            "missing ?port=N",
        ),
        (
            Some(admin.as_str()),
            "/v1/apps/web/port-forward?port=80&instance=xyz".to_string(),
            400,
            "invalid instance id",
        ),
    ] {
        let (status, error, body) = get(token, &path);
        assert_eq!(status, want, "{path}: {body}");
        assert!(error.contains(says), "{path}: {error}");
    }

    // The CLI says the same before it listens, in one line, exit 1.
    let r = server.cli(&["port-forward", "-a", "nope", "5432"]).fails();
    assert!(r.stderr.contains("no app named nope"), "{}", r.stderr);
    let r = server
        .cli(&["port-forward", "-a", "web", "--instance", "ffff", "5432"])
        .fails();
    assert!(
        r.stderr.contains("has an id starting with \"ffff\""),
        "{}",
        r.stderr
    );
    let r = server.cli(&["port-forward", "-a", "web", "70000"]).fails();
    assert!(
        r.stderr.contains("invalid remote port \"70000\""),
        "{}",
        r.stderr
    );
    let r = server.cli(&["port-forward", "-a", "web", "8080:0"]).fails();
    assert!(r.stderr.contains("invalid remote port 0"), "{}", r.stderr);
    // A local port that is taken.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = format!("{}:{echo_port}", taken.local_addr().unwrap().port());
    let r = server.cli(&["port-forward", "-a", "web", &spec]).fails();
    assert!(
        r.stderr.contains("cannot listen on 127.0.0.1:"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_instance_with_the_url_service_disabled_is_refused_clearly() {
    let server = Server::start(&[]);
    let Some(ep) = Builder::new(&server, "web", "exec sleep 1000")
        .env("WAYPOST_DISABLE_URL", "1")
        .spawn()
    else {
        return;
    };
    let id = ep.instance(&server)["id"].as_str().unwrap().to_string();
    let r = server.cli(&["port-forward", "-a", "web", "0:5432"]).fails();
    assert!(
        r.stderr.contains(
            "the URL service is disabled on the live instance of app web (WAYPOST_DISABLE_URL=1)"
        ),
        "{}",
        r.stderr
    );
    let r = server
        .cli(&[
            "port-forward",
            "-a",
            "web",
            "--instance",
            &id[..6],
            "0:5432",
        ])
        .fails();
    assert!(
        r.stderr.contains(&format!(
            "disabled on instance {id} (WAYPOST_DISABLE_URL=1)"
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn a_refused_connection_is_reported_and_the_forward_keeps_serving() {
    let server = Server::start(&[]);
    let Some((_ep, _echo_port, _id)) = start_echo(&server, false) else {
        return;
    };
    // Nothing listens on this port inside the instance (the same host) yet.
    let target = free_port();
    let mut fwd = Forward::start(&server, &[&format!("0:{target}")]);
    assert!(
        closed_without_data(fwd.connect()),
        "the refused connection is closed"
    );
    wait_for("the refusal on stderr", || {
        fwd.stderr()
            .contains("port-forward: connection refused by the instance: ")
            .then_some(())
    });
    assert!(
        fwd.running(),
        "one refused connection does not end the forward"
    );
    // Now something listens there: the next connection goes through.
    let l = TcpListener::bind(("127.0.0.1", target)).unwrap();
    let server_side = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).unwrap();
        c.write_all(&b.map(|x| x.to_ascii_uppercase())).unwrap();
    });
    let mut c = fwd.connect();
    c.write_all(b"hello").unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(
        got, b"HELLO",
        "after the app closed, EOF reaches the client"
    );
    server_side.join().unwrap();
    assert_eq!(fwd.stderr().lines().count(), 1, "{}", fwd.stderr());
}

/// Passes once the entrypoint's allow-list (`WAYPOST_URL_PORTS`, issue #18) is in the entrypoint
/// binary under test; before it, every port is reachable and the refused connection goes through.
#[test]
fn a_port_not_in_waypost_url_ports_is_refused_with_the_entrypoints_message() {
    let server = Server::start(&[]);
    let Some((_ep, echo_port, _id)) = start_echo(&server, true) else {
        return;
    };
    // Allowed: only the echo port. Something does listen on the other one (the same host), so
    // only the allow-list can refuse it.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let mut fwd = Forward::start(&server, &[&format!("0:{other_port}")]);
    assert!(closed_without_data(fwd.connect()));
    let want = format!(
        "port-forward: connection refused by the instance: port {other_port} is not in \
         WAYPOST_URL_PORTS (allowed: {echo_port})"
    );
    wait_for(&format!("{want:?} on stderr"), || {
        fwd.stderr().contains(&want).then_some(())
    });
    // Still serving: the next connection is accepted (and refused the same way).
    assert!(fwd.running());
    assert!(closed_without_data(fwd.connect()));
    wait_for("the second refusal", || {
        (fwd.stderr().matches(&want).count() == 2).then_some(())
    });
    // The allowed port works.
    let ok = Forward::start(&server, &[&format!("0:{echo_port}")]);
    let (n, sha) = round_trip(ok.connect(), MIB, 3);
    assert_eq!((n, sha), (MIB, apps::stream_sha256(MIB, 3)));
}

#[test]
fn ctrl_c_closes_the_listener_and_open_connections_and_exits_0() {
    let server = Server::start(&[]);
    let Some((_ep, echo_port, _id)) = start_echo(&server, false) else {
        return;
    };
    let mut fwd = Forward::start(&server, &[&format!("0:{echo_port}")]);
    // An open connection, known to work end to end.
    let mut open = fwd.connect();
    open.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    open.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");

    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(fwd.child.id() as i32, libc::SIGINT) };
    let status = wait_for("port-forward to exit after SIGINT", || {
        fwd.child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{}", fwd.stderr());
    assert!(!listening(fwd.port), "the local port is closed");
    assert!(closed_without_data(open), "the open connection was closed");
}

/// Two replicas on one PostgreSQL database (as in replicas.rs): the instance held by A, the
/// port-forward through B.
#[test]
fn a_forward_through_another_replica_reaches_the_instance() {
    const FLAGS: &[&str] = &[
        "--heartbeat-interval",
        "300ms",
        "--peer-addr",
        "127.0.0.1:0",
    ];
    let pg = Cluster::start();
    let url = pg.create_database();
    let a = Server::start_in(Env::with_database(&url), FLAGS);
    let b = Server::start_in(Env::with_database(&url), FLAGS);
    let Some((_ep, echo_port, id)) = start_echo(&a, false) else {
        return;
    };
    wait_for("B to list the instance held by A", || {
        b.instances(false)
            .into_iter()
            .find(|i| i["id"] == id.as_str())
    });

    let fwd = Forward::start(&b, &[&format!("0:{echo_port}")]);
    let len = 16 * MIB;
    let t0 = Instant::now();
    let (n, sha) = round_trip(fwd.connect(), len, 5);
    assert_eq!((n, sha), (len, apps::stream_sha256(len, 5)));
    eprintln!(
        "16 MiB each way through replica B to A in {:?}",
        t0.elapsed()
    );
    assert!(
        b.logs()
            .contains("port-forward connection relayed to the holding replica")
            && a.logs().contains("port-forward connection opening"),
        "the connection went B -> A"
    );
    // A refusal by the instance comes back through the hop too.
    let nothing = free_port();
    let mut refused = Forward::start(&b, &[&format!("0:{nothing}")]);
    assert!(closed_without_data(refused.connect()));
    wait_for("the refusal through the hop", || {
        refused
            .stderr()
            .contains("port-forward: connection refused by the instance: ")
            .then_some(())
    });
    assert!(refused.running());
}

/// Keep-alive: with pings every 300 ms an idle connection stays open across many intervals (the
/// API answers them), and when the API stops answering (the server is SIGSTOPped: its sockets stay
/// open, nothing comes back) the connection is given up within a few intervals with a message,
/// while the forward keeps serving once the server is back. A malformed interval is refused.
#[test]
fn pings_keep_an_idle_connection_and_a_silent_api_ends_it() {
    let server = Server::start(&[]);
    let Some((_ep, echo_port, _id)) = start_echo(&server, true) else {
        return;
    };
    let r = Run::from_output(
        server
            .env
            .command()
            .env("WAYPOST_PORT_FORWARD_PING", "soon")
            .args(["port-forward", "-a", "web", &echo_port.to_string()])
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        r.stderr.contains("invalid WAYPOST_PORT_FORWARD_PING"),
        "{}",
        r.stderr
    );

    let fwd = Forward::start_env(
        &server,
        &[&format!("0:{echo_port}")],
        &[("WAYPOST_PORT_FORWARD_PING", "300ms")],
    );
    let mut c = fwd.connect();
    c.write_all(b"ping?").unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).unwrap();
    // Idle for 2 s (more than DEAD_AFTER intervals): still open, still echoing.
    std::thread::sleep(Duration::from_secs(2));
    c.write_all(b"still").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still");
    assert!(!fwd.stderr().contains("timed out"), "{}", fwd.stderr());

    // The API goes silent.
    let pid = server.pid() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = Instant::now();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    let gone = c.read_to_end(&mut rest);
    let waited = started.elapsed();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        gone.is_ok()
            || gone
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the local connection was closed: {gone:?}"
    );
    assert!(waited < Duration::from_secs(15), "closed after {waited:?}");
    wait_for("the timeout on stderr", || {
        fwd.stderr()
            .contains("the connection to the waypost API timed out")
            .then_some(())
    });
    // The server is back: a new connection works.
    let mut c = fwd.connect();
    c.write_all(b"again").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"again");
}
