//! The control session end to end: the real server, the REAL entrypoint binary, real children.
//! The entrypoint must keep its app alive through every server failure.

use crate::common::entrypoint::{Builder, Entrypoint};
use crate::common::{Server, wait_for};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A child that counts in `$D/count` every 50 ms until `$D/stop` appears, then exits with $1.
const COUNTER: &str = r#"
i=0
echo "app started"
while [ ! -e "$D/stop" ]; do
  i=$((i+1)); echo $i > "$D/count.tmp"; mv "$D/count.tmp" "$D/count"
  sleep 0.05
done
echo "app stopping"
exit ${CODE:-0}
"#;

fn count(e: &Entrypoint) -> u64 {
    e.file("count")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The counter keeps going: the child is alive and unbothered.
fn assert_counting(e: &Entrypoint) {
    let before = count(e);
    wait_for("the child's counter to keep advancing", || {
        (count(e) > before + 3).then_some(())
    });
}

/// A port nothing listens on right now (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn instance_is_live_while_the_child_runs_and_gone_with_its_exit_code_after() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    let Some(mut e) = Builder::new(&server, "web", COUNTER)
        .env("CODE", "7")
        .spawn()
    else {
        return;
    };
    let inst = e.instance(&server);
    let id = inst["id"].as_str().unwrap().to_string();
    assert_eq!(inst["app"], "web");
    // Heartbeats fill in the child's state, pid, RSS.
    let inst = wait_for("a heartbeat with the child's RSS", || {
        server
            .instances(false)
            .into_iter()
            .find(|i| i["id"] == id.as_str() && i["child_rss_bytes"].as_u64() > Some(0))
    });
    assert_eq!(inst["child_state"], "running");
    assert!(inst["child_pid"].as_u64().unwrap() > 0);
    // The table form shows it too.
    let table = server.cli(&["instances"]).ok().stdout;
    assert!(
        table.contains(&id[..8]) && table.contains("running"),
        "{table}"
    );

    std::fs::write(e.dir.join("stop"), "").unwrap();
    assert_eq!(e.wait().code(), Some(7));
    let gone = wait_for("the instance to be marked gone", || {
        server
            .instances(true)
            .into_iter()
            .find(|i| i["id"] == id.as_str() && i["live"] == false)
    });
    assert_eq!(gone["ended"], "exited", "{gone}");
    assert_eq!(gone["exit_code"], 7, "{gone}");
    assert!(
        server
            .instances(false)
            .iter()
            .all(|i| i["id"] != id.as_str()),
        "not listed as live any more"
    );
    let all = server.cli(&["instances", "--all"]).ok().stdout;
    assert!(all.contains("exited 7"), "{all}");
}

#[test]
fn server_killed_the_child_keeps_running_and_the_same_instance_comes_back() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start(&["--control-addr", &addr, "--heartbeat-interval", "300ms"]);
    let Some(mut e) = Builder::new(&server, "web", COUNTER).spawn() else {
        return;
    };
    let id = e.instance(&server)["id"].as_str().unwrap().to_string();
    assert_counting(&e);

    let env = server.kill();
    // The app does not notice: it keeps counting, the entrypoint keeps running.
    assert_counting(&e);
    std::thread::sleep(Duration::from_secs(2));
    assert_counting(&e);
    assert!(e.running());

    let server = Server::start_in(
        env,
        &["--control-addr", &addr, "--heartbeat-interval", "300ms"],
    );
    let t0 = Instant::now();
    // Held by the new server: on PostgreSQL the row the killed one held still looks live (with
    // what it last flushed) until its lease runs out.
    let replica = server.replica_id();
    let back = wait_for("the same instance id to be live again", || {
        server
            .instances(false)
            .into_iter()
            .find(|i| i["id"] == id.as_str() && i["replica"] == replica.as_str())
    });
    assert_eq!(back["child_state"], "running");
    // Down ~2.5 s: the backoff after 6 quick attempts is at most ~6.4 s, well inside WAIT.
    eprintln!("reconnected {:?} after the server came back", t0.elapsed());
    assert_counting(&e);
    std::fs::write(e.dir.join("stop"), "").unwrap();
    assert_eq!(e.wait().code(), Some(0));
}

#[test]
fn server_refusing_connections_at_start_the_child_starts_at_the_startup_timeout() {
    let port = free_port();
    let (ca, _, _) = test_pki();
    let t0 = Instant::now();
    let Some(mut e) = Builder::bare(&format!("127.0.0.1:{port}"), "wpe_x", &ca, COUNTER)
        .env("WAYPOST_STARTUP_TIMEOUT", "1s")
        .spawn()
    else {
        return;
    };
    let started = wait_for("the child to start", || {
        e.file("count").map(|_| t0.elapsed())
    });
    assert!(
        started >= Duration::from_millis(900),
        "started before the startup timeout: {started:?}"
    );
    assert!(e.stderr().contains("starting without it"), "{}", e.stderr());
    assert_counting(&e);
    std::fs::write(e.dir.join("stop"), "").unwrap();
    assert_eq!(e.wait().code(), Some(0));
}

#[test]
fn server_that_accepts_but_never_answers_the_child_still_starts() {
    // A listener that takes connections and says nothing (not even a TLS handshake).
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            acc.fetch_add(1, Ordering::Relaxed);
            held.push(conn);
        }
    });
    let (ca, _, _) = test_pki();
    let t0 = Instant::now();
    let Some(mut e) = Builder::bare(&addr, "wpe_x", &ca, COUNTER)
        .env("WAYPOST_STARTUP_TIMEOUT", "1s")
        .spawn()
    else {
        return;
    };
    let started = wait_for("the child to start", || {
        e.file("count").map(|_| t0.elapsed())
    });
    assert!(started >= Duration::from_millis(900), "{started:?}");
    assert!(
        accepted.load(Ordering::Relaxed) >= 1,
        "the entrypoint did connect"
    );
    assert_counting(&e);
    std::fs::write(e.dir.join("stop"), "").unwrap();
    assert_eq!(e.wait().code(), Some(0));
}

#[test]
fn server_required_waits_for_the_server() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start(&["--control-addr", &addr]);
    let token = server.entrypoint_token("web", None);
    let ca = server.ca_pem();
    let env = server.kill();
    let Some(mut e) = Builder::bare(&addr, &token, &ca, COUNTER)
        .env("WAYPOST_SERVER_REQUIRED", "1")
        .env("WAYPOST_STARTUP_TIMEOUT", "500ms")
        .spawn()
    else {
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        e.file("count").is_none(),
        "started without the server: {}",
        e.stderr()
    );
    assert!(e.running());
    let server = Server::start_in(env, &["--control-addr", &addr]);
    wait_for("the child to start once the server is there", || {
        e.file("count")
    });
    e.instance(&server);
    std::fs::write(e.dir.join("stop"), "").unwrap();
    assert_eq!(e.wait().code(), Some(0));
}

#[test]
fn stopped_before_the_server_answers_the_app_never_starts() {
    let port = free_port();
    let (ca, _, _) = test_pki();
    let Some(mut e) = Builder::bare(&format!("127.0.0.1:{port}"), "wpe_x", &ca, COUNTER)
        .env("WAYPOST_SERVER_REQUIRED", "1")
        .spawn()
    else {
        return;
    };
    std::thread::sleep(Duration::from_millis(500));
    e.signal(libc::SIGTERM);
    assert_eq!(e.wait().code(), Some(143));
    assert!(e.file("count").is_none());
}

#[test]
fn a_wrong_token_is_rejected_with_a_clear_line_the_child_runs_and_retries_back_off() {
    let server = Server::start(&[]);
    server.create_app("web");
    let Some(mut e) = Builder::with_token(&server, "wpe_definitely_not_a_token", COUNTER)
        .env("WAYPOST_STARTUP_TIMEOUT", "500ms")
        .spawn()
    else {
        return;
    };
    wait_for("the rejection in the entrypoint's log", || {
        e.stderr().contains("refused this entrypoint").then_some(())
    });
    assert!(e.stderr().contains("BAD_TOKEN"), "{}", e.stderr());
    assert_counting(&e);
    // Count Hello attempts over 4 s: the server hints 5 s between retries; without backoff there
    // would be dozens.
    let attempts = |s: &Server| s.logs().matches("invalid token").count();
    let before = attempts(&server);
    std::thread::sleep(Duration::from_secs(4));
    let during = attempts(&server) - before;
    assert!(
        during <= 2,
        "{during} attempts in 4 s: no backoff\n{}",
        server.logs()
    );
    assert!(server.instances(true).is_empty(), "never admitted");
    std::fs::write(e.dir.join("stop"), "").unwrap();
    assert_eq!(e.wait().code(), Some(0));
    // Only one ERROR line for the whole episode, not one per attempt.
    assert_eq!(
        e.stderr().matches("refused this entrypoint").count(),
        1,
        "{}",
        e.stderr()
    );
}

#[test]
fn a_revoked_token_disconnects_its_instances_and_the_apps_keep_running() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    server.create_app("web");
    let created = server
        .cli(&["token", "create", "--app", "web", "-o", "json"])
        .ok()
        .json();
    let (token, id) = (
        created["token"].as_str().unwrap(),
        created["id"].as_str().unwrap(),
    );
    assert_eq!(id.len(), 12, "{created}");
    let other = server.entrypoint_token("web", None);
    let Some(mut e) = Builder::with_token(&server, token, COUNTER).spawn() else {
        return;
    };
    let Some(mut keep) = Builder::with_token(&server, &other, COUNTER).spawn() else {
        return;
    };
    let inst = e.instance(&server);
    let kept = keep.instance(&server);

    // `token list` shows both tokens with their live use (and never the token text).
    let list = server
        .cli(&["token", "list", "--app", "web", "-o", "json"])
        .ok()
        .json();
    let rows = list["tokens"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{list}");
    let row = rows
        .iter()
        .find(|r| r["id"] == id)
        .expect("the created token is listed");
    assert_eq!(row["live_instances"], 1, "{list}");
    assert_eq!(row["kind"], "entrypoint");
    assert!(
        !list.to_string().contains(token),
        "token text in the listing"
    );
    let table = server.cli(&["token", "list"]).ok().stdout;
    assert!(table.contains(id) && table.contains("admin"), "{table}");

    // Negative control: before the revoke, the instance is live.
    let live = |i: &serde_json::Value| server.instances(false).iter().any(|x| x["id"] == i["id"]);
    assert!(live(&inst));

    let out = server.cli(&["token", "revoke", &id[..8]]).ok().stdout;
    assert!(out.contains("disconnected 1 live instance"), "{out}");
    wait_for("the revoked instance to be disconnected", || {
        (!live(&inst)).then_some(())
    });
    wait_for("the entrypoint to log why", || {
        e.stderr().contains("token revoked").then_some(())
    });
    assert!(e.stderr().contains("BAD_TOKEN"), "{}", e.stderr());
    // Its reconnects are refused; the app never notices; the other token's instance stays.
    wait_for("a refused reconnect", || {
        server.logs().contains("invalid token").then_some(())
    });
    assert_counting(&e);
    assert!(!live(&inst), "a revoked token got back in");
    assert!(
        live(&kept),
        "the other token's instance was disconnected too"
    );
    assert!(
        server.cli(&["token", "list", "-o", "json"]).ok().json()["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"] != id)
    );

    // Bad ids are clear errors; the admin token is not revocable here; a second revoke is 404.
    let again = server.cli(&["token", "revoke", id]).fails();
    assert!(
        again.stderr.contains("no token with id"),
        "{}",
        again.stderr
    );
    let bad = server.cli(&["token", "revoke", "xyz"]).fails();
    assert!(bad.stderr.contains("invalid token id"), "{}", bad.stderr);
    let admin_id = server.cli(&["token", "list", "-o", "json"]).ok().json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "admin")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .unwrap();
    let admin = server.cli(&["token", "revoke", &admin_id]).fails();
    assert!(admin.stderr.contains("admin token"), "{}", admin.stderr);

    std::fs::write(e.dir.join("stop"), "").unwrap();
    assert_eq!(e.wait().code(), Some(0));
    std::fs::write(keep.dir.join("stop"), "").unwrap();
    assert_eq!(keep.wait().code(), Some(0));
}

/// A CA and a `localhost`/127.0.0.1 server certificate it signed: (CA PEM, cert PEM, key PEM).
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.clone().self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

/// A TLS "server" that completes the handshake, then sends something a waypost server never
/// would: an oversized frame, then garbage. Returns (address, its CA PEM, connections so far).
fn hostile_server() -> (String, String, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    let (ca, cert, key) = test_pki();
    let certs = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![b"waypost/1".to_vec()];
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { continue };
            let k = count.fetch_add(1, Ordering::Relaxed);
            let config = Arc::clone(&config);
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf); // the Hello
                let evil: &[u8] = if k % 2 == 0 {
                    &[0xff, 0xff, 0xff, 0xff]
                } else {
                    b"\x00\x00\x00\x05\xff\xff\xff\xff\xff"
                };
                let _ = tls.write_all(evil);
                let _ = tls.flush();
                std::thread::sleep(Duration::from_millis(500));
            });
        }
    });
    (addr, ca, n)
}

#[test]
fn oversized_or_garbage_frames_make_it_reconnect_and_the_child_never_notices() {
    let (addr, ca, connections) = hostile_server();
    let Some(e) = Builder::bare(&addr, "wpe_x", &ca, COUNTER)
        .env("WAYPOST_STARTUP_TIMEOUT", "300ms")
        .spawn()
    else {
        return;
    };
    wait_for("three connections (so two reconnects)", || {
        (connections.load(Ordering::Relaxed) >= 3).then_some(())
    });
    assert_counting(&e);
    let err = e.stderr();
    assert!(
        err.contains("exceeds the 1048576-byte limit") || err.contains("bad frame"),
        "{err}"
    );
}

#[test]
fn the_ca_works_inline_as_a_file_and_as_base64_and_a_wrong_ca_is_refused_clearly() {
    let server = Server::start(&[]);
    server.create_app("web");
    let pem = server.ca_pem();
    let b64 = server
        .cli(&["token", "create", "--app", "web", "-o", "env"])
        .ok()
        .stdout;
    let b64 = b64
        .lines()
        .find_map(|l| l.strip_prefix("WAYPOST_CA="))
        .unwrap()
        .to_string();
    let path = server.env.data_dir().join("ca.pem").display().to_string();
    let mut good = Vec::new();
    for ca in [pem.as_str(), b64.as_str(), path.as_str()] {
        let Some(e) = Builder::new(&server, "web", COUNTER)
            .env("WAYPOST_CA", ca)
            .spawn()
        else {
            return;
        };
        e.instance(&server);
        good.push(e);
    }
    // Another CA: verification fails, with a line that says so.
    let (other_ca, _, _) = test_pki();
    let Some(e) = Builder::new(&server, "web", COUNTER)
        .env("WAYPOST_CA", &other_ca)
        .env("WAYPOST_STARTUP_TIMEOUT", "300ms")
        .spawn()
    else {
        return;
    };
    wait_for("a certificate error in the entrypoint's log", || {
        e.stderr()
            .contains("invalid peer certificate")
            .then_some(())
    });
    assert!(e.stderr().contains("UnknownIssuer"), "{}", e.stderr());
    assert_counting(&e);
    assert_eq!(
        server.instances(false).len(),
        3,
        "only the three good ones are live"
    );
}

#[test]
fn the_token_is_not_in_the_childs_environment() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let Some(mut e) = Builder::with_token(&server, &token, "env > \"$D/env\"; exit 0").spawn()
    else {
        return;
    };
    assert_eq!(e.wait().code(), Some(0));
    let env = e.file("env").unwrap();
    assert!(
        !env.contains(&token),
        "the token leaked into the app:\n{env}"
    );
    assert!(
        env.contains("WAYPOST_SERVER="),
        "other settings stay visible"
    );
}

#[test]
fn localhost_needs_no_resolver() {
    let server = Server::start(&[]);
    let port = server.control_addr.rsplit(':').next().unwrap().to_string();
    let Some(e) = Builder::new(&server, "web", COUNTER)
        .env("WAYPOST_SERVER", &format!("localhost:{port}"))
        .spawn()
    else {
        return;
    };
    e.instance(&server);
}

/// A minimal HTTP CONNECT proxy; counts tunnels.
fn connect_proxy() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let count = Arc::clone(&count);
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && client.read(&mut b).unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let target = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split(' ').next())
                    .unwrap_or("")
                    .to_string();
                let Ok(upstream) = TcpStream::connect(&target) else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .unwrap();
                let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let mut upstream = upstream;
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut u2);
                    let _ = u2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut upstream, &mut client);
            });
        }
    });
    (addr, n)
}

#[test]
fn an_https_proxy_carries_the_connection_unless_no_proxy_says_otherwise() {
    let server = Server::start(&[]);
    let (proxy, tunnels) = connect_proxy();
    let Some(e) = Builder::new(&server, "web", COUNTER)
        .env("HTTPS_PROXY", &format!("http://{proxy}"))
        .spawn()
    else {
        return;
    };
    e.instance(&server);
    assert_eq!(tunnels.load(Ordering::Relaxed), 1, "went through the proxy");
    drop(e);
    let Some(e) = Builder::new(&server, "web", COUNTER)
        .env("HTTPS_PROXY", &format!("http://{proxy}"))
        .env("NO_PROXY", "127.0.0.1")
        .spawn()
    else {
        return;
    };
    e.instance(&server);
    assert_eq!(tunnels.load(Ordering::Relaxed), 1, "NO_PROXY: direct");
}

#[test]
fn a_proxy_that_refuses_is_reported_and_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            let mut b = [0u8; 1024];
            let _ = c.read(&mut b);
            let _ = c.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
        }
    });
    let server = Server::start(&[]);
    let Some(e) = Builder::new(&server, "web", COUNTER)
        .env("HTTPS_PROXY", &proxy)
        .env("WAYPOST_STARTUP_TIMEOUT", "300ms")
        .spawn()
    else {
        return;
    };
    wait_for("the proxy's refusal in the log", || {
        e.stderr().contains("407").then_some(())
    });
    assert_counting(&e);
}

#[test]
fn a_child_killed_by_a_signal_is_shown_so() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    let Some(mut e) = Builder::new(
        &server,
        "web",
        "trap 'exit 0' USR1; echo hi; while :; do sleep 0.05; done",
    )
    .spawn() else {
        return;
    };
    let id = e.instance(&server)["id"].as_str().unwrap().to_string();
    // The child must be running (its trap set) before the signal: the instance is listed from
    // the entrypoint's Hello, which can come before the child starts.
    wait_for("the child to start", || {
        e.stdout().contains("hi").then_some(())
    });
    e.signal(libc::SIGTERM);
    assert_eq!(e.wait().code(), Some(143));
    let gone = wait_for("the instance gone", || {
        server
            .instances(true)
            .into_iter()
            .find(|i| i["id"] == id.as_str() && i["live"] == false)
    });
    assert_eq!(gone["exit_signal"], 15, "{gone}");
    let all = server.cli(&["instances", "--all"]).ok().stdout;
    assert!(all.contains("SIGTERM"), "{all}");
}

#[test]
fn a_command_that_cannot_start_is_shown_with_its_127_not_as_exit_0() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    let Some(mut e) = Builder::new(&server, "web", "")
        .argv(&["/nonexistent/waypost-test-command"])
        .env("WAYPOST_SERVER_REQUIRED", "1")
        .spawn()
    else {
        return;
    };
    assert_eq!(e.wait().code(), Some(127));
    let gone = wait_for("the instance gone with its exit", || {
        server
            .instances(true)
            .into_iter()
            .find(|i| i["app"] == "web" && i["live"] == false)
    });
    assert_eq!(
        (gone["ended"].as_str(), gone["exit_code"].as_i64()),
        (Some("exited"), Some(127)),
        "{gone}"
    );
}

#[test]
fn the_entrypoints_own_memory_is_shown_live_and_kept_after_it_ends() {
    let server = Server::start(&["--heartbeat-interval", "300ms"]);
    let Some(mut e) = Builder::new(&server, "web", "echo hi; exec sleep 60").spawn() else {
        return;
    };
    let rss = |i: &serde_json::Value| i["entrypoint_rss_bytes"].as_u64().unwrap_or(0);
    let live = wait_for("a Status with the entrypoint's RSS", || {
        let i = e.instance(&server);
        (rss(&i) > 0).then_some(i)
    });
    // A static binary of ~1.4 MB mapped: between half a megabyte and a few tens.
    assert!((500_000..50_000_000).contains(&rss(&live)), "{live}");
    let table = server.cli(&["instances", "--app", "web"]).ok().stdout;
    assert!(table.lines().next().unwrap().contains("EP RSS"), "{table}");
    let id = live["id"].as_str().unwrap().to_string();
    e.signal(libc::SIGTERM);
    e.wait();
    let gone = wait_for("the instance gone", || {
        server
            .instances(true)
            .into_iter()
            .find(|i| i["id"] == id.as_str() && i["live"] == false)
    });
    assert!(rss(&gone) > 0, "stored, not only in memory: {gone}");
}

/// voluntary + involuntary context switches of `pid` so far.
fn switches(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn idle_means_no_wake_ups_between_heartbeats() {
    // Idle with a session open: the loop sleeps until the next heartbeat (15 s by default). A
    // timer that stays due (a spin) would show as thousands of switches.
    let server = Server::start(&[]);
    let Some(e) = Builder::new(&server, "web", "exec sleep 1000")
        .env("WAYPOST_LOG_LEVEL", "ERROR")
        .spawn()
    else {
        return;
    };
    e.instance(&server);
    std::thread::sleep(Duration::from_secs(1));
    let before = switches(e.pid());
    std::thread::sleep(Duration::from_secs(4));
    let woke = switches(e.pid()) - before;
    assert!(woke <= 6, "{woke} wake-ups in 4 idle seconds");
}

#[test]
fn a_stalled_server_does_not_make_the_entrypoint_spin() {
    // The server stops reading (SIGSTOP) while the app keeps logging: the entrypoint must wait
    // for the socket, not busy-loop on a due batch.
    let server = Server::start(&[]);
    let Some(e) = Builder::new(&server, "web", "while :; do echo some log line that is not very long; done > /dev/null 2>&1 & while :; do echo tick; sleep 0.01; done")
        .env("WAYPOST_LOG_LEVEL", "ERROR")
        .spawn()
    else {
        return;
    };
    e.instance(&server);
    // SAFETY: kill(2) on the server process we started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(2));
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu(e.pid());
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu(e.pid()) - before;
    // SAFETY: as above.
    unsafe { libc::kill(server.pid() as i32, libc::SIGCONT) };
    // 100 ticks = one CPU-second; the app prints ~100 lines/s here, which costs next to nothing.
    assert!(
        ticks < 60,
        "{ticks} clock ticks of CPU in 3 s while the server was stalled"
    );
}
