//! `waypost port-forward -a APP [--instance ID] [LOCAL:]REMOTE`: like `kubectl port-forward`, a
//! listener on `127.0.0.1:LOCAL` whose every connection is carried to `127.0.0.1:REMOTE` inside a
//! live instance of the app (the server side and the WebSocket protocol: server/transport/api/
//! forward.rs).
//!
//! - `REMOTE` alone listens on the same port; `0:REMOTE` or `:REMOTE` on a free port. Either way
//!   `Forwarding from 127.0.0.1:LOCAL -> REMOTE` is printed once listening (stdout), and
//!   `Handling connection for REMOTE` for each connection.
//! - The instance is checked and picked once at start (the endpoint's plain GET: app, instance,
//!   port, URL service on), so mistakes fail before anything listens (exit 1); every connection
//!   then goes to that same instance.
//! - Each accepted connection gets its own WebSocket. A refusal by the instance (e.g. a port not
//!   in `WAYPOST_URL_PORTS`, nothing listening there) or a failure ends that connection only, with
//!   a line on stderr; the listener keeps serving.
//! - Bytes flow both ways with backpressure (a TCP read only after the previous chunk was sent);
//!   a TCP FIN is passed on as a half-close, so request/response protocols that shut down their
//!   write side keep working.
//! - SIGINT (Ctrl-C), SIGTERM or SIGHUP: the listener and every open connection are closed and it
//!   exits 0.
//! - Keep-alive: each connection's WebSocket sends a Ping every [`PING_INTERVAL`] (30 s;
//!   `WAYPOST_PORT_FORWARD_PING` changes it), so a load balancer or NAT between the CLI and the
//!   API does not drop an idle connection (a database session left open); when nothing at all
//!   (not even the Pong) has come back for [`DEAD_AFTER`] intervals, the API is taken for gone
//!   and that connection is closed with a message, instead of hanging forever.

use super::Target;
use super::exec::connect;
use crate::util;
use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use std::io::Write as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_tungstenite::tungstenite::{self, Message};

#[derive(Args)]
pub struct ForwardArgs {
    /// The app (default: $WAYPOST_APP).
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: String,
    /// A prefix of the instance's id (see `waypost instances`). Default: the app's live instance
    /// with the fewest open tunnel streams, picked once at start.
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
    /// The port inside the instance, and the local one: `5432` (both the same), `8080:5432`,
    /// `0:5432` or `:5432` (a free local port, printed).
    #[arg(value_name = "[LOCAL:]REMOTE")]
    ports: String,
}

/// Bytes read from a local connection per WebSocket message.
const CHUNK: usize = 64 * 1024;
/// TLS + WebSocket handshake with the API, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// After the last byte, how long the close handshake may take before the connection is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an open connection's WebSocket sends a Ping. Under the idle timeouts of common load
/// balancers (60 s) and NAT tables.
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A connection from which nothing came back for this many ping intervals is given up.
const DEAD_AFTER: u32 = 3;

/// [`PING_INTERVAL`], or `WAYPOST_PORT_FORWARD_PING` (e.g. `10s`, `500ms`).
fn ping_interval() -> Result<Duration> {
    match std::env::var("WAYPOST_PORT_FORWARD_PING") {
        Ok(v) => {
            let d = util::parse_duration(&v)
                .map_err(|e| anyhow!("invalid WAYPOST_PORT_FORWARD_PING {v:?}: {e}"))?;
            if d < Duration::from_millis(100) {
                bail!("invalid WAYPOST_PORT_FORWARD_PING {v:?}: at least 100ms");
            }
            Ok(d)
        }
        Err(_) => Ok(PING_INTERVAL),
    }
}

/// `[LOCAL:]REMOTE` as (local, remote); local 0 means a free port.
fn parse_ports(spec: &str) -> Result<(u16, u16)> {
    let port = |what: &str, p: &str, zero_ok: bool| -> Result<u16> {
        match p.parse::<u16>() {
            Ok(0) if !zero_ok => {
                bail!("invalid {what} port 0 in {spec:?}: give a port from 1 to 65535")
            }
            Ok(n) => Ok(n),
            Err(_) => bail!(
                "invalid {what} port {p:?} in {spec:?}: give [LOCAL:]REMOTE, ports from 1 to 65535 \
                 (LOCAL 0 or empty: a free port)"
            ),
        }
    };
    match spec.split_once(':') {
        None => {
            let r = port("remote", spec, false)?;
            Ok((r, r))
        }
        Some((l, r)) => {
            let r = port("remote", r, false)?;
            let l = if l.is_empty() {
                0
            } else {
                port("local", l, true)?
            };
            Ok((l, r))
        }
    }
}

pub fn run(a: ForwardArgs) -> Result<i32> {
    if !util::valid_app_name(&a.app) {
        bail!("invalid app name {:?}", a.app);
    }
    if let Some(i) = &a.instance {
        if i.is_empty() || i.len() > 32 || !i.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "invalid instance id {i:?}: give a prefix of its hex id (see `waypost instances`)"
            );
        }
    }
    let (local, remote) = parse_ports(&a.ports)?;
    let ping = ping_interval()?;
    let target = super::resolve_target()?;
    // Two workers: each connection moves bytes both ways through TLS, and several may be open.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(forward(target, a, local, remote, ping))
}

async fn forward(
    target: Target,
    a: ForwardArgs,
    local: u16,
    remote: u16,
    ping: Duration,
) -> Result<i32> {
    // Handlers first: from here on these end the forward through our code, cleanly.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;

    // The checks, and the instance every connection goes to.
    let mut check = format!("/v1/apps/{}/port-forward?port={remote}", a.app);
    if let Some(i) = &a.instance {
        check.push_str(&format!("&instance={}", i.to_ascii_lowercase()));
    }
    let client = super::client_for(&target)?;
    let picked: serde_json::Value = tokio::select! {
        r = client.get(&check) => r?,
        // Stopped before it listened: nothing to close.
        _ = sigint.recv() => return Ok(0),
        _ = sigterm.recv() => return Ok(0),
        _ = sighup.recv() => return Ok(0),
    };
    let instance = picked["instance"]
        .as_str()
        .context("the server did not say which instance it picked (is it older than this CLI?)")?
        .to_string();
    let path = format!(
        "/v1/apps/{}/port-forward?port={remote}&instance={instance}",
        a.app
    );

    let listener = TcpListener::bind(("127.0.0.1", local))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{local}"))?;
    let local = listener.local_addr()?.port();
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "Forwarding from 127.0.0.1:{local} -> {remote}");
        let _ = out.flush();
    }

    let target = std::sync::Arc::new(target);
    let path = std::sync::Arc::new(path);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => {
                    {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "Handling connection for {remote}");
                        let _ = out.flush();
                    }
                    let (target, path) = (target.clone(), path.clone());
                    conns.spawn(async move {
                        if let Err(e) = connection(&target, &path, tcp, ping).await {
                            let msg = format!("{e:#}").replace('\n', " ");
                            eprintln!("port-forward: {msg}");
                        }
                    });
                }
                // E.g. out of file descriptors: this connection is lost, the listener is not.
                Err(e) => {
                    eprintln!("port-forward: accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
        }
    }
    // Stop: no new connections, and every open one closed (its WebSocket dropped, so the server
    // aborts the stream to the app).
    drop(listener);
    conns.shutdown().await;
    Ok(0)
}

/// Carries one local connection over its own WebSocket until both directions are done, or
/// either side fails. The error is the line to print (none when the local client left).
async fn connection(t: &Target, path: &str, tcp: TcpStream, ping: Duration) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let ws = match tokio::time::timeout(CONNECT_TIMEOUT, connect(t, path, "port-forward")).await {
        Ok(ws) => ws.context("cannot open a connection to the instance")?,
        Err(_) => bail!(
            "cannot open a connection to the instance: the waypost API at {} did not answer within {CONNECT_TIMEOUT:?}",
            t.addr
        ),
    };
    let (mut tr, mut tw) = tcp.into_split();
    let (sink, mut stream) = ws.split();
    // Shared by the data direction and the keep-alive (one task: never contended for long).
    let sink = tokio::sync::Mutex::new(sink);
    // When the last message (of any kind, Pongs included) came from the API.
    let heard = std::sync::Mutex::new(tokio::time::Instant::now());
    let result = {
        // Pings while the connection is open; Err once the API has been silent too long.
        let keepalive = async {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
            loop {
                tick.tick().await;
                let silent = heard.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                if silent >= ping * DEAD_AFTER {
                    return Err::<(), _>(anyhow!(
                        "the connection to the waypost API timed out: no answer for {silent:.1?}"
                    ));
                }
                sink.lock()
                    .await
                    .send(Message::Ping(Vec::new().into()))
                    .await
                    .map_err(lost)?;
            }
        };
        // local → instance; Ok once the local side sent its FIN (passed on as `eof`).
        let up = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match tr.read(&mut buf).await {
                    Ok(0) => {
                        let eof = Message::text(json!({"type": "eof"}).to_string());
                        return sink.lock().await.send(eof).await.map_err(lost);
                    }
                    Ok(n) => {
                        // Waiting here is the backpressure: the next read only after this went.
                        sink.lock()
                            .await
                            .send(Message::binary(buf[..n].to_vec()))
                            .await
                            .map_err(lost)?;
                    }
                    // The local client reset the connection: abort.
                    Err(_) => return Err(LocalGone.into()),
                }
            }
        };
        // instance → local; Ok once the server closed normally (both directions done).
        let down = async {
            // Whether the instance sent anything: an error before that is a refusal.
            let mut received = false;
            let mut error: Option<String> = None;
            loop {
                let m = match stream.next().await {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(lost(e)),
                    None => return Err(anyhow!("the server closed the connection")),
                };
                *heard.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
                match m {
                    Message::Binary(b) => {
                        received = true;
                        if tw.write_all(&b).await.is_err() {
                            // The local client is gone: nothing more to deliver.
                            return Err(LocalGone.into());
                        }
                    }
                    Message::Text(t) => {
                        let v: serde_json::Value =
                            serde_json::from_str(t.as_str()).unwrap_or_default();
                        match v["type"].as_str() {
                            // The app's FIN: the local client reads EOF, and may still send.
                            Some("eof") => {
                                let _ = tw.shutdown().await;
                            }
                            Some("error") => {
                                error = v["error"].as_str().map(str::to_string);
                            }
                            _ => {}
                        }
                    }
                    Message::Close(frame) => {
                        let reason = frame
                            .as_ref()
                            .map(|f| f.reason.to_string())
                            .filter(|r| !r.is_empty());
                        let normal = frame.as_ref().is_none_or(|f| {
                            f.code == tungstenite::protocol::frame::coding::CloseCode::Normal
                        });
                        return match (error.take().or(reason), normal) {
                            (None, true) => Ok(()),
                            (why, _) => {
                                let why = why.unwrap_or_else(|| "the stream failed".into());
                                Err(anyhow!(
                                    "{}{why}",
                                    if received {
                                        "the connection to the instance failed: "
                                    } else {
                                        "connection refused by the instance: "
                                    }
                                ))
                            }
                        };
                    }
                    _ => {}
                }
            }
        };
        tokio::pin!(up, down, keepalive);
        let mut up_done = false;
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break Err(e),
                },
                r = &mut down => break r,
                r = &mut keepalive => break r,
            }
        }
    };
    match result {
        Ok(()) => {
            // Answer the server's close so the TLS connection ends cleanly.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.lock().await.close()).await;
            Ok(())
        }
        // The local client's choice: no message. Dropping the WebSocket aborts the stream, so
        // the app's socket is closed too.
        Err(e) if e.is::<LocalGone>() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The local client went away (a reset, or a close while data was still coming): the connection
/// is aborted without a message.
#[derive(Debug)]
struct LocalGone;

impl std::fmt::Display for LocalGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the local connection went away")
    }
}

impl std::error::Error for LocalGone {}

fn lost(e: tungstenite::Error) -> anyhow::Error {
    anyhow!("the connection to the waypost API failed: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        assert_eq!(parse_ports("5432").unwrap(), (5432, 5432));
        assert_eq!(parse_ports("8080:5432").unwrap(), (8080, 5432));
        assert_eq!(parse_ports("0:5432").unwrap(), (0, 5432));
        assert_eq!(parse_ports(":5432").unwrap(), (0, 5432));
        for bad in [
            "0", "70000", "x", "80:0", "80:", ":", "a:80", "70000:80", "1:2:3", "",
        ] {
            let e = parse_ports(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
