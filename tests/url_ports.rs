//! `WAYPOST_URL_PORTS` end to end: the real entrypoint, connected to a fake control server in
//! this test (TLS 1.3 + ALPN `waypost/1`, the frame codec of `waypost-proto`), is asked by
//! `StreamOpen` for ports on 127.0.0.1 where this test listens. A port the setting does not allow
//! is refused with a `StreamClose` and its listener never sees a connection; a listed one is
//! connected. Negative control: with `*` the same unlisted port is connected, so the refusal comes
//! from the setting, not from the listener or the fake server.
//!
//! The fake server's certificate is made at test time with the `openssl` command line tool (the
//! entrypoint runs with `WAYPOST_TLS_SKIP_VERIFY=1`, but still checks that the server holds the
//! certificate's key).

mod common;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use waypost_proto::{Frame, Kind, StreamClose, StreamOpen, Welcome};

/// A self-signed P-256 certificate and its key, in `dir`.
fn server_tls(dir: &TestDir) -> Arc<ServerConfig> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("this test needs the openssl command line tool to make the server's certificate");
    assert!(out.status.success(), "openssl: {out:?}");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    config.alpn_protocols = vec![waypost_proto::ALPN.to_vec()];
    Arc::new(config)
}

/// The server end of one control connection.
struct Control {
    tls: StreamOwned<ServerConnection, TcpStream>,
    buf: Vec<u8>,
}

impl Control {
    /// Accepts the entrypoint's connection on `listener` (within [`TIMEOUT`]).
    fn accept(listener: &TcpListener, config: Arc<ServerConfig>, ep: &mut Running) -> Control {
        listener.set_nonblocking(true).unwrap();
        let mut sock = None;
        ep.wait_until("the entrypoint connects to the fake server", || {
            match listener.accept() {
                Ok((s, _)) => sock = Some(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            sock.is_some()
        });
        let sock = sock.unwrap();
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(POLL)).unwrap();
        let conn = ServerConnection::new(config).unwrap();
        Control {
            tls: StreamOwned::new(conn, sock),
            buf: Vec::new(),
        }
    }

    fn send(&mut self, kind: Kind) {
        let mut out = Vec::new();
        waypost_proto::encode(&Frame { kind: Some(kind) }, &mut out).unwrap();
        self.tls.write_all(&out).unwrap();
        self.tls.flush().unwrap();
    }

    /// The next frame `pick` wants (others — logs, status, pings — are skipped), within
    /// [`TIMEOUT`]; `None` if none came by then.
    fn next<T>(&mut self, timeout: Duration, mut pick: impl FnMut(Kind) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(frame) = waypost_proto::decode(&mut &self.buf[..]) {
                let frame = frame.expect("the entrypoint sends valid frames");
                let n = waypost_proto::encoded_len(&frame);
                self.buf.drain(..n);
                if let Some(t) = frame.kind.and_then(&mut pick) {
                    return Some(t);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.tls.read(&mut chunk) {
                Ok(0) => panic!("the entrypoint closed the control connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading from the entrypoint: {e}"),
            }
        }
    }

    /// Asks for a stream to `port`; returns the entrypoint's StreamClose for it if one comes
    /// within `wait` (a refusal), else `None`.
    fn open(&mut self, stream: u64, port: u16, wait: Duration) -> Option<StreamClose> {
        self.send(Kind::StreamOpen(StreamOpen {
            stream,
            target_port: port.into(),
            client_addr: "203.0.113.9:4000".into(),
        }));
        self.next(wait, |k| match k {
            Kind::StreamClose(c) if c.stream == stream => Some(c),
            _ => None,
        })
    }
}

/// A listener on a free port of 127.0.0.1 that counts the connections it gets.
fn app_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// The connection waiting on `l`, if any (accepted, so the caller keeps it open).
fn connection(l: &TcpListener) -> Option<TcpStream> {
    match l.accept() {
        Ok((s, _)) => Some(s),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    }
}

/// The entrypoint, connected and welcomed, with `url_ports` as `WAYPOST_URL_PORTS`.
fn start(dir: &TestDir, url_ports: &str) -> (Running, Control) {
    let config = server_tls(dir);
    let control = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = entrypoint_sh(dir, "exec sleep 60");
    cmd.env("WAYPOST_SERVER", control.local_addr().unwrap().to_string())
        .env("WAYPOST_TOKEN", "t")
        .env("WAYPOST_TLS_SKIP_VERIFY", "1")
        .env("WAYPOST_URL_PORTS", url_ports);
    let mut ep = Running::spawn_captured(cmd);
    let mut c = Control::accept(&control, config, &mut ep);
    c.next(TIMEOUT, |k| matches!(k, Kind::Hello(_)).then_some(()))
        .expect("a Hello");
    c.send(Kind::Welcome(Welcome {
        heartbeat_interval_ms: 60_000,
        ..Default::default()
    }));
    (ep, c)
}

#[test]
fn streams_reach_only_the_ports_in_waypost_url_ports() {
    let dir = TestDir::new("url-ports");
    let (listed, listed_port) = app_listener();
    let (other, other_port) = app_listener();
    let (_ep, mut c) = start(&dir, &listed_port.to_string());

    let refusal = c
        .open(1, other_port, TIMEOUT)
        .expect("a stream to an unlisted port is refused");
    let mut allowed = [5000, listed_port];
    allowed.sort();
    assert_eq!(
        refusal.error,
        format!(
            "port {other_port} is not in WAYPOST_URL_PORTS (allowed: {}, {})",
            allowed[0], allowed[1]
        )
    );
    assert!(!refusal.half);

    // The listed port is connected (and the stream stays open).
    assert_eq!(c.open(2, listed_port, Duration::ZERO), None);
    let mut app = None;
    wait_until("the listed port gets a connection", || {
        app = connection(&listed);
        app.is_some()
    });
    assert_eq!(
        c.next(Duration::from_millis(300), |k| match k {
            Kind::StreamClose(s) => Some(s),
            _ => None,
        }),
        None,
        "the stream to the listed port is not closed"
    );
    // The refused stream was decided before the listed one was asked for: had it connected, the
    // connection would be waiting by now.
    assert!(
        connection(&other).is_none(),
        "the unlisted port must never see a connection"
    );
}

#[test]
fn with_a_star_the_same_port_is_reached() {
    let dir = TestDir::new("url-ports-any");
    let (other, other_port) = app_listener();
    let (_ep, mut c) = start(&dir, "*");
    assert_eq!(c.open(1, other_port, Duration::ZERO), None);
    let mut app = None;
    wait_until("the port gets a connection", || {
        app = connection(&other);
        app.is_some()
    });
    assert_eq!(
        c.next(Duration::from_millis(300), |k| match k {
            Kind::StreamClose(s) => Some(s),
            _ => None,
        }),
        None,
        "the stream is not refused"
    );
}
