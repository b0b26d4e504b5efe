//! `waypost exec --app NAME [--instance ID] [-t] [-i] -- CMD [ARG...]`: runs a command next to a
//! live instance of the app, over the API's exec WebSocket (docs/protocol.md; the server side is
//! `server/transport/api/exec.rs`).
//!
//! - `-t`: a pseudo-terminal of this terminal's size and `TERM`; this terminal goes into raw mode
//!   for the session (so ^C, ^D, ^Z travel to the remote side) and is ALWAYS restored: on return,
//!   on error, on panic (a panic hook), and on SIGTERM/SIGHUP/SIGINT/SIGQUIT (which end the session
//!   with 128+N; the server then hangs up the remote process). Window resizes (SIGWINCH) are
//!   forwarded.
//! - `-i`: stdin is forwarded; local end of input closes the remote stdin. Without `-i` the remote
//!   stdin is /dev/null (or, with `-t`, a terminal nobody types into).
//! - Without `-t`, remote stdout/stderr go to local stdout/stderr, and SIGINT/SIGTERM/SIGHUP/
//!   SIGQUIT are forwarded to the remote process group (a second one of the same kind gives up
//!   waiting and exits 128+N).
//!
//! Exit code: the remote command's (128+N when signal N killed it). A refusal by the instance
//! (exec disabled, not in WAYPOST_EXEC_ALLOW, too many sessions, command not found) prints the
//! instance's message and exits with its code (126/127); a lost connection exits 255; API errors
//! (no such app, no live instance, bad token) exit 1.

use super::Target;
use crate::util;
use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::ServerName;
use serde_json::json;
use std::io::Read as _;
use std::sync::Mutex;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::{self, Message, client::ClientRequestBuilder};

#[derive(Args)]
pub struct ExecArgs {
    /// The app whose instance runs the command.
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: String,
    /// A prefix of the instance's id (see `waypost instances`). Default: the app's live instance
    /// with the fewest exec sessions.
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
    /// Allocate a pseudo-terminal (this terminal's size and TERM) and put this terminal in raw mode.
    #[arg(short = 't', long)]
    tty: bool,
    /// Forward stdin; end of input closes the remote stdin.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// The command and its arguments (looked up on the instance's PATH).
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// Stdin is read in chunks of at most this (one WebSocket message each).
const STDIN_CHUNK: usize = 32 * 1024;
/// Messages queued for the WebSocket writer; small, so stdin is read only as fast as it is sent.
const SEND_QUEUE: usize = 8;
/// Exit code when the session was cut off (as ssh does).
const LOST: i32 = 255;
/// TLS + WebSocket handshake with the API, at most.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub fn run(a: ExecArgs) -> Result<i32> {
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
    let target = super::resolve_target()?;
    let (rows, cols) = if a.tty {
        term_size().unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    let tty = a.tty;
    super::block_on(async move {
        // Handlers first: from here on a SIGTERM/SIGHUP/SIGINT ends the session through our
        // code (which restores the terminal), never by the default action.
        let winch = if tty {
            Some(signal(SignalKind::window_change())?)
        } else {
            None
        };
        let sigs = [
            (libc::SIGINT, signal(SignalKind::interrupt())?),
            (libc::SIGTERM, signal(SignalKind::terminate())?),
            (libc::SIGHUP, signal(SignalKind::hangup())?),
            (libc::SIGQUIT, signal(SignalKind::quit())?),
        ];
        // Raw mode only when there is a terminal to put in it; restored when `raw` drops (also
        // on an early error return) and by the panic hook.
        let raw = if tty && stdin_is_terminal() {
            Some(RawMode::enter()?)
        } else {
            None
        };
        let result = session(target, a, rows, cols, winch, sigs).await;
        drop(raw);
        result
    })?
}

async fn session(
    target: Target,
    a: ExecArgs,
    rows: u16,
    cols: u16,
    mut winch: Option<Signal>,
    mut sigs: [(i32, Signal); 4],
) -> Result<i32> {
    let mut query = format!("/v1/exec?app={}", a.app);
    if let Some(i) = &a.instance {
        query.push_str(&format!("&instance={}", i.to_ascii_lowercase()));
    }
    let ws = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&target, &query, "exec")) => match r {
            Ok(ws) => ws?,
            Err(_) => bail!("the waypost API at {} did not answer within {CONNECT_TIMEOUT:?}", target.addr),
        },
        sig = next_signal(&mut sigs) => return Ok(128 + sig),
    };
    let (mut sink, mut stream) = ws.split();

    // One writer task, so reading output never waits on sending input (which waits for the
    // instance's credits): output keeps flowing while stdin is held back.
    let (wtx, mut wrx) = mpsc::channel::<Message>(SEND_QUEUE);
    tokio::spawn(async move {
        while let Some(m) = wrx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "xterm".into());
    let start = json!({
        "type": "start",
        "argv": a.cmd,
        "tty": a.tty,
        "stdin": a.interactive,
        "rows": rows,
        "cols": cols,
        "term": if a.tty { term } else { String::new() },
    });
    wtx.send(Message::text(start.to_string()))
        .await
        .map_err(|_| anyhow!("the exec connection closed"))?;
    if a.interactive {
        stdin_thread(wtx.clone());
    }

    let mut forwarded: Vec<i32> = Vec::new();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        tokio::select! {
            m = stream.next() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        eprintln!("waypost: error: the exec connection failed: {e}");
                        return Ok(LOST);
                    }
                    None => {
                        eprintln!("waypost: error: the server closed the exec session without an exit status");
                        return Ok(LOST);
                    }
                };
                match m {
                    Message::Binary(b) => {
                        let (out, data): (&mut (dyn tokio::io::AsyncWrite + Unpin + Send), _) = match b.first() {
                            Some(1) => (&mut stdout, &b[1..]),
                            Some(2) => (&mut stderr, &b[1..]),
                            _ => continue,
                        };
                        // Waiting here is the backpressure: a slow local stdout slows the remote.
                        if out.write_all(data).await.is_err() || out.flush().await.is_err() {
                            // Local output is gone (e.g. a closed pipe): end like a SIGPIPE'd tool.
                            return Ok(128 + libc::SIGPIPE);
                        }
                    }
                    Message::Text(t) => {
                        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                        if v["type"] == "exit" {
                            let code = v["code"].as_i64().unwrap_or(LOST as i64) as i32;
                            let error = v["error"].as_str().unwrap_or_default();
                            let _ = stdout.flush().await;
                            if !error.is_empty() {
                                eprintln!("waypost: error: {error}");
                            }
                            return Ok(code);
                        }
                    }
                    Message::Close(_) => {
                        eprintln!("waypost: error: the server closed the exec session without an exit status");
                        return Ok(LOST);
                    }
                    _ => {}
                }
            }
            Some(()) = recv_opt(&mut winch) => {
                if let Some((rows, cols)) = term_size() {
                    let _ = wtx.try_send(Message::text(json!({"type": "resize", "rows": rows, "cols": cols}).to_string()));
                }
            }
            sig = next_signal(&mut sigs) => {
                if a.tty || forwarded.contains(&sig) {
                    // The terminal is restored by the caller; the server hangs up the session.
                    let _ = stdout.flush().await;
                    return Ok(128 + sig);
                }
                forwarded.push(sig);
                let _ = wtx.try_send(Message::text(json!({"type": "signal", "signal": sig}).to_string()));
            }
        }
    }
}

async fn recv_opt(s: &mut Option<Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_signal(sigs: &mut [(i32, Signal); 4]) -> i32 {
    let [(a, sa), (b, sb), (c, sc), (d, sd)] = sigs;
    tokio::select! {
        Some(()) = sa.recv() => *a,
        Some(()) = sb.recv() => *b,
        Some(()) = sc.recv() => *c,
        Some(()) = sd.recv() => *d,
    }
}

/// Reads stdin on a plain thread (a blocking read must never hold up the runtime or its
/// shutdown) and queues `[0] ++ bytes` messages; at end of input, an `eof` message.
fn stdin_thread(wtx: mpsc::Sender<Message>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; STDIN_CHUNK];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut m = Vec::with_capacity(n + 1);
                    m.push(0u8);
                    m.extend_from_slice(&buf[..n]);
                    if wtx.blocking_send(Message::binary(m)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = wtx.blocking_send(Message::text(json!({"type": "eof"}).to_string()));
    });
}

pub(super) type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// TLS (trusting exactly the context's CA) and the WebSocket handshake with the bearer token,
/// for `exec` and `port-forward` (`what` names it in errors). An HTTP error answer becomes the
/// API's error message.
pub(super) async fn connect(t: &Target, path: &str, what: &str) -> Result<Ws> {
    let host = crate::client::host_of(&t.addr)?;
    let server_name = ServerName::try_from(host.to_string())
        .with_context(|| format!("{host:?} is not a valid host name or IP address"))?;
    let cfg = crate::server::pki::client_config(&t.ca_pem, &[b"http/1.1"])?;
    let tcp = TcpStream::connect(&t.addr)
        .await
        .with_context(|| format!("cannot reach the waypost API at {}", t.addr))?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(cfg)
        .connect(server_name, tcp)
        .await
        .with_context(|| format!("TLS with the waypost API at {} failed (wrong CA?)", t.addr))?;
    let uri: tungstenite::http::Uri = format!("wss://{}{}", t.addr, path)
        .parse()
        .with_context(|| format!("building the {what} URL"))?;
    let req = ClientRequestBuilder::new(uri)
        .with_header("Authorization", format!("Bearer {}", t.token))
        .with_header(
            "User-Agent",
            concat!("waypost-cli/", env!("CARGO_PKG_VERSION")),
        );
    let mut config = tungstenite::protocol::WebSocketConfig::default();
    config.max_message_size = Some(1 << 20);
    config.max_frame_size = Some(1 << 20);
    match tokio_tungstenite::client_async_with_config(req, tls, Some(config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let body = resp.body().clone().unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
            Err(crate::client::ApiError {
                status: hyper::StatusCode::from_u16(status.as_u16())
                    .unwrap_or(hyper::StatusCode::BAD_GATEWAY),
                message,
            }
            .into())
        }
        Err(e) => Err(anyhow!("the {what} WebSocket handshake failed: {e}")),
    }
}

// ---- the local terminal --------------------------------------------------------------------

/// Whether stdin is a terminal.
fn stdin_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdin())
}

/// (rows, cols) of the terminal on stdin, stdout or stderr, whichever is one.
fn term_size() -> Option<(u16, u16)> {
    use std::os::fd::AsFd as _;
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()]
        .into_iter()
        .filter_map(|fd| rustix::termios::tcgetwinsize(fd).ok())
        .find(|ws| ws.ws_row > 0 && ws.ws_col > 0)
        .map(|ws| (ws.ws_row, ws.ws_col))
}

/// The terminal settings to put back; also read by the panic hook.
static SAVED: Mutex<Option<rustix::termios::Termios>> = Mutex::new(None);

fn restore_terminal() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = saved {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Drain,
            &t,
        );
    }
}

/// Raw mode on stdin's terminal for as long as this lives (and never longer than the process:
/// a panic hook restores it too).
struct RawMode;

impl RawMode {
    fn enter() -> Result<RawMode> {
        use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
        let t = tcgetattr(std::io::stdin())
            .map_err(std::io::Error::from)
            .context("reading the terminal settings")?;
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.clone());
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                prev(info);
            }));
        });
        let mut raw = t;
        raw.make_raw();
        if let Err(e) = tcsetattr(std::io::stdin(), OptionalActions::Drain, &raw) {
            restore_terminal();
            return Err(std::io::Error::from(e)).context("putting the terminal in raw mode");
        }
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}
