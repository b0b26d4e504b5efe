//! Exec: `GET /v1/exec?app=NAME[&instance=ID_PREFIX]` upgraded to a WebSocket, relayed
//! to an exec session on one live instance. Admin tokens only (the API's auth layer answers 403
//! to an entrypoint token before anything here runs).
//!
//! Instance: the one whose hex id starts with `instance`, else the live instance of the app with
//! the fewest exec sessions, never one that announced exec disabled. Errors found before the
//! upgrade are ordinary API errors (`{"error": ...}`, 404 no such app/instance, 409 no usable
//! instance). Session ids come from a counter in the `meta` table, so they are unique across server
//! restarts (an entrypoint that kept a session through a server restart never sees its id reused).
//!
//! ## The WebSocket protocol
//!
//! Client → server:
//! - first message, text: `{"type":"start","argv":["sh","-c","..."],"tty":false,"stdin":true,
//!   "rows":24,"cols":80,"term":"xterm-256color","env":{"K":"V"}}` (`type` optional; `rows`,
//!   `cols`, `term` only matter with `tty`; `env` optional);
//! - binary: stdin, `[0] ++ bytes` (ignored unless the start said `stdin`);
//! - text: `{"type":"resize","rows":R,"cols":C}`, `{"type":"signal","signal":N}` (Linux number),
//!   `{"type":"eof"}` (closes stdin; on a PTY sends ^D).
//!
//! Server → client:
//! - text `{"type":"started","session":S,"instance":"<hex id>","pid":P}`;
//! - binary `[1] ++ bytes` (stdout; everything with a PTY) or `[2] ++ bytes` (stderr);
//! - text `{"type":"exit","code":C,"signal":N,"error":"..."}`, then a normal close. `code` is the
//!   process's exit code, or 128+N when signal N killed it. A non-empty `error` means the session
//!   did not run (refused by the instance: WAYPOST_DISABLE_EXEC, WAYPOST_EXEC_ALLOW, the session
//!   cap, command not found; code 126/127) or was cut off (the instance disconnected: code 255).
//!
//! Flow control end to end: stdin is read from the WebSocket only while the instance has granted
//! input credits (so a fast client is held back by TCP, not buffered here), and output credits are
//! granted back to the instance only after the output was written to the WebSocket (so a slow
//! client holds back the remote process). If the client goes away before the exit, the session's
//! process group gets SIGHUP, and SIGKILL 5 s later if it is still there.

use super::{ApiError, require_app};
use crate::server::service::mux::{ExecRoute, INITIAL_WINDOW, OUT_CHUNK, PickError};
use crate::server::store;
use crate::server::transport::Shared;
use crate::server::transport::peer::{self, Hopped};
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use waypost_proto::{self as proto, Kind, window_update::Target};

type AppState = Arc<Shared>;

/// The client has this long to send its start message.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After the client went away: SIGHUP, then SIGKILL after this, then give up after as much again.
const HANGUP_GRACE: Duration = Duration::from_secs(5);
/// Largest WebSocket message accepted from a client (stdin chunks are far smaller).
const MAX_MESSAGE: usize = 1 << 20;
/// Output credits go back in batches of at least this much, or when the relay caught up.
const GRANT_AT: u32 = 64 * 1024;
/// Exit code reported when the session was cut off rather than ended by its process.
pub const LOST_CODE: i32 = 255;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/exec", get(exec_ws))
}

#[derive(Deserialize)]
struct ExecQuery {
    app: Option<String>,
    instance: Option<String>,
}

async fn exec_ws(
    State(s): State<AppState>,
    hopped: Option<axum::Extension<Hopped>>,
    headers: axum::http::HeaderMap,
    q: Result<Query<ExecQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return err(StatusCode::BAD_REQUEST, "invalid query string");
    };
    let Some(app) = q.app.filter(|a| !a.is_empty()) else {
        return err(StatusCode::BAD_REQUEST, "missing ?app=NAME");
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                &format!("this endpoint speaks WebSocket ({})", e.body_text()),
            );
        }
    };
    if let Err(e) = require_app(&s, &app).await {
        return e.into_response();
    }
    let prefix = q.instance.filter(|i| !i.is_empty());
    if let Some(p) = &prefix {
        if p.len() > 32 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return err(
                StatusCode::BAD_REQUEST,
                &format!("invalid instance id {p:?}: give a prefix of its hex id"),
            );
        }
    }
    let session = match s.store.call(store::next_exec_session).await {
        Ok(id) => id,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let route = match s.mux.open_exec(&app, prefix.as_deref(), session) {
        Ok(r) => r,
        // Not here: another replica may hold it (one hop; a hopped request is never sent on).
        Err(e @ (PickError::NoLive { .. } | PickError::NoSuchInstance { .. }))
            if hopped.is_none() =>
        {
            return match forward(&s, &app, prefix.as_deref(), &headers, ws).await {
                Some(r) => r,
                None => err(pick_status(&e), &e.to_string()),
            };
        }
        Err(e) => {
            let status = match e {
                PickError::NoSuchInstance { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::CONFLICT,
            };
            return err(status, &e.to_string());
        }
    };
    tracing::info!(
        app,
        instance = crate::util::hex(&route.instance),
        session,
        "exec session opening"
    );
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move { relay(socket, route).await })
}

fn pick_status(e: &PickError) -> StatusCode {
    match e {
        PickError::NoSuchInstance { .. } => StatusCode::NOT_FOUND,
        _ => StatusCode::CONFLICT,
    }
}

/// The exec goes to an instance held by another replica, if there is one: the WebSocket is
/// opened there first (so its refusal reaches the client as an ordinary error), then the
/// client's is accepted and the two are relayed (transport/peer.rs). None: no other replica
/// holds a matching instance.
async fn forward(
    s: &Arc<Shared>,
    app: &str,
    prefix: Option<&str>,
    headers: &axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Option<Response> {
    let remote = match peer::find_remote(s, app, prefix).await {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => return Some(ApiError::from(e).into_response()),
    };
    let auth = headers.get(axum::http::header::AUTHORIZATION);
    let upstream = match peer::open_exec(s, &remote, app, auth).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(refused)) => return Some(err(refused.status, &refused.message)),
        Err(e) => {
            tracing::warn!(
                app,
                replica = remote.replica,
                error = format!("{e:#}"),
                "exec hop failed"
            );
            return Some(err(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "instance {} is held by replica {} at {}, which cannot be reached: {e:#}",
                    remote.id, remote.replica, remote.peer_addr
                ),
            ));
        }
    };
    tracing::info!(
        app,
        instance = remote.id,
        replica = remote.replica,
        "exec session relayed to the holding replica"
    );
    Some(
        ws.max_message_size(MAX_MESSAGE)
            .max_frame_size(MAX_MESSAGE)
            .on_upgrade(move |socket| peer::relay_exec(socket, upstream)),
    )
}

fn err(status: StatusCode, msg: &str) -> Response {
    ApiError::new(status, msg).into_response()
}

/// The client's messages (text).
#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMsg {
    Start(StartMsg),
    Resize { rows: u32, cols: u32 },
    Signal { signal: i32 },
    Eof,
}

#[derive(Deserialize, Default, Debug)]
struct StartMsg {
    argv: Vec<String>,
    #[serde(default)]
    tty: bool,
    #[serde(default)]
    stdin: bool,
    #[serde(default)]
    rows: u32,
    #[serde(default)]
    cols: u32,
    #[serde(default)]
    term: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

fn parse_start(text: &str) -> Result<StartMsg, String> {
    let mut v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the start message is not JSON: {e}"))?;
    if v.get("type").is_none() {
        v["type"] = json!("start");
    }
    match serde_json::from_value::<ClientMsg>(v) {
        Ok(ClientMsg::Start(s)) if !s.argv.is_empty() && !s.argv[0].is_empty() => Ok(s),
        Ok(ClientMsg::Start(_)) => Err("no command given".into()),
        Ok(_) => Err("the first message must be the start message".into()),
        Err(e) => Err(format!("invalid start message: {e}")),
    }
}

/// Input credits: what the instance lets us send, as semaphore permits. One taker (the input
/// loop), one giver (the output loop).
struct Credits(Semaphore);

impl Credits {
    fn new(initial: u32) -> Self {
        Credits(Semaphore::new(initial as usize))
    }

    /// Grants `k` more, never holding more than `u32::MAX` (what a window can express; an
    /// instance granting without end must not overflow the semaphore).
    fn add(&self, k: u32) {
        let room = (u32::MAX as usize).saturating_sub(self.0.available_permits());
        self.0.add_permits((k as usize).min(room));
    }

    /// Waits for credits, then takes up to `max` (at least 1).
    async fn take(&self, max: usize) -> usize {
        let Ok(first) = self.0.acquire().await else {
            return 0; // never closed
        };
        first.forget();
        // The only taker: what is available now stays available.
        let more = self.0.available_permits().min(max.saturating_sub(1));
        if let Ok(p) = self.0.try_acquire_many(more as u32) {
            p.forget();
            return 1 + more;
        }
        1
    }

    /// Waits until there is at least one credit, taking none.
    async fn wait_any(&self) {
        let _ = self.0.acquire().await;
    }
}

/// How the relay of one direction ended.
enum End {
    /// The session ended (exit reported to the client, or it was never started).
    Exited,
    /// The client went away (or broke the protocol) before the exit.
    ClientGone,
}

async fn relay(socket: WebSocket, mut route: ExecRoute) {
    let session = route.session;
    let instance = crate::util::hex(&route.instance);
    let (mut sink, mut stream) = socket.split();

    // ---- start ----
    let start = match tokio::time::timeout(START_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => parse_start(t.as_str()),
        Ok(Some(Ok(_))) => Err("the first message must be the start message (JSON text)".into()),
        Ok(_) | Err(_) => return, // gone or silent: nothing was started
    };
    let start = match start {
        Ok(s) => s,
        Err(e) => {
            let _ = sink.send(exit_msg(126, 0, &e)).await;
            let _ = sink.close().await;
            return;
        }
    };
    let pty = start.tty.then(|| proto::Pty {
        rows: if start.rows == 0 { 24 } else { start.rows },
        cols: if start.cols == 0 { 80 } else { start.cols },
        term: if start.term.is_empty() {
            "xterm".into()
        } else {
            start.term.clone()
        },
    });
    tracing::info!(session, instance, argv = ?start.argv, tty = start.tty, stdin = start.stdin, "exec session starting");
    route.out.exec(Kind::ExecStart(proto::ExecStart {
        session,
        argv: start.argv,
        pty,
        env: start.env,
        stdin: start.stdin,
    }));

    let credits = Credits::new(INITIAL_WINDOW);
    let out = route.out.clone();
    let want_stdin = start.stdin;

    // ---- client → instance ----
    let input = async {
        loop {
            // No credits: stop reading the WebSocket (TCP holds the client back).
            credits.wait_any().await;
            let msg = match stream.next().await {
                Some(Ok(m)) => m,
                Some(Err(_)) | None => return End::ClientGone,
            };
            match msg {
                Message::Binary(b) if b.first() == Some(&0) => {
                    if !want_stdin {
                        continue;
                    }
                    let mut data = &b[1..];
                    while !data.is_empty() {
                        let n = credits.take(data.len().min(OUT_CHUNK)).await;
                        out.exec(Kind::ExecInput(proto::ExecInput {
                            session,
                            data: data[..n].to_vec(),
                        }));
                        data = &data[n..];
                    }
                }
                Message::Binary(_) => {} // unknown channel: ignore
                Message::Text(t) => match serde_json::from_str::<ClientMsg>(t.as_str()) {
                    Ok(ClientMsg::Resize { rows, cols }) => {
                        out.exec(Kind::ExecResize(proto::ExecResize {
                            session,
                            rows,
                            cols,
                        }));
                    }
                    Ok(ClientMsg::Signal { signal }) => {
                        out.exec(Kind::ExecSignal(proto::ExecSignal { session, signal }));
                    }
                    Ok(ClientMsg::Eof) => {
                        out.exec(Kind::ExecStdinClose(proto::ExecStdinClose { session }));
                    }
                    Ok(ClientMsg::Start(_)) | Err(_) => {
                        tracing::debug!(session, "ignoring an unexpected exec message");
                    }
                },
                Message::Close(_) => return End::ClientGone,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
    };

    // ---- instance → client ----
    let output = async {
        // What the instance may still send us, and what we forwarded since the last grant.
        let mut window = INITIAL_WINDOW;
        let mut consumed = 0u32;
        loop {
            let Some(kind) = route.rx.recv().await else {
                let _ = sink
                    .send(exit_msg(
                        LOST_CODE,
                        0,
                        "lost the connection to the instance",
                    ))
                    .await;
                let _ = sink.close().await;
                return End::Exited;
            };
            match kind {
                Kind::ExecStarted(s) => {
                    let msg = json!({"type": "started", "session": session, "instance": instance, "pid": s.pid});
                    if sink.send(Message::text(msg.to_string())).await.is_err() {
                        return End::ClientGone;
                    }
                }
                Kind::ExecOutput(o) => {
                    let n = o.data.len() as u32;
                    if n > window {
                        tracing::warn!(
                            session,
                            "the instance sent output beyond its window; killing the session"
                        );
                        out.exec(Kind::ExecSignal(proto::ExecSignal {
                            session,
                            signal: libc::SIGKILL,
                        }));
                        let _ = sink
                            .send(exit_msg(
                                LOST_CODE,
                                0,
                                "protocol error: output beyond the window",
                            ))
                            .await;
                        let _ = sink.close().await;
                        return End::Exited;
                    }
                    window -= n;
                    let tag = if o.stream == proto::OutputStream::Err as i32 {
                        2
                    } else {
                        1
                    };
                    let mut msg = Vec::with_capacity(o.data.len() + 1);
                    msg.push(tag);
                    msg.extend_from_slice(&o.data);
                    // Backpressure: credits go back only once the client has taken the data.
                    if sink.send(Message::binary(msg)).await.is_err() {
                        return End::ClientGone;
                    }
                    consumed += n;
                    if consumed >= GRANT_AT || route.rx.is_empty() {
                        window += consumed;
                        out.exec(Kind::WindowUpdate(proto::WindowUpdate {
                            target: Some(Target::ExecSession(session)),
                            credits: std::mem::take(&mut consumed),
                        }));
                    }
                }
                Kind::WindowUpdate(w) => credits.add(w.credits),
                Kind::ExecExit(x) => {
                    tracing::info!(
                        session,
                        code = x.code,
                        signal = x.signal,
                        error = x.error,
                        "exec session ended"
                    );
                    let _ = sink.send(exit_msg(x.code, x.signal, &x.error)).await;
                    let _ = sink.close().await;
                    return End::Exited;
                }
                _ => {}
            }
        }
    };

    let end = tokio::select! {
        e = input => e,
        e = output => e,
    };
    if let End::ClientGone = end {
        hang_up(&mut route).await;
    }
}

/// The client left before the session ended: SIGHUP the process group, SIGKILL after the grace,
/// discarding output (credits still go back so the process is not stuck on a full pipe).
async fn hang_up(route: &mut ExecRoute) {
    let session = route.session;
    tracing::info!(session, "exec client went away; hanging up the session");
    route
        .out
        .exec(Kind::ExecStdinClose(proto::ExecStdinClose { session }));
    route.out.exec(Kind::ExecSignal(proto::ExecSignal {
        session,
        signal: libc::SIGHUP,
    }));
    for (signal_next, grace) in [(Some(libc::SIGKILL), HANGUP_GRACE), (None, HANGUP_GRACE)] {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, route.rx.recv()).await {
                Ok(Some(Kind::ExecExit(_))) | Ok(None) => return,
                Ok(Some(Kind::ExecOutput(o))) => {
                    route.out.exec(Kind::WindowUpdate(proto::WindowUpdate {
                        target: Some(Target::ExecSession(session)),
                        credits: o.data.len() as u32,
                    }));
                }
                Ok(Some(_)) => {}
                Err(_) => break,
            }
        }
        if let Some(sig) = signal_next {
            route.out.exec(Kind::ExecSignal(proto::ExecSignal {
                session,
                signal: sig,
            }));
        }
    }
}

fn exit_msg(code: i32, signal: i32, error: &str) -> Message {
    Message::text(
        json!({"type": "exit", "code": code, "signal": signal, "error": error}).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credits_wait_take_and_cap() {
        let c = Credits::new(10);
        assert_eq!(c.take(4).await, 4);
        assert_eq!(c.take(100).await, 6, "what is there, up to max");
        // None left: waiting until a grant arrives, then taking only what was granted.
        let waiting = tokio::time::timeout(Duration::from_millis(20), c.wait_any()).await;
        assert!(waiting.is_err(), "no credits: wait_any waits");
        c.add(3);
        c.wait_any().await;
        assert_eq!(c.0.available_permits(), 3, "wait_any takes nothing");
        assert_eq!(c.take(100).await, 3);
        // A taker blocked on an empty window wakes up on the grant.
        let (c, got) = {
            let c = Arc::new(c);
            let c2 = c.clone();
            let t = tokio::spawn(async move { c2.take(5).await });
            tokio::time::sleep(Duration::from_millis(10)).await;
            c.add(7);
            (c, t.await.unwrap())
        };
        assert_eq!(got, 5);
        assert_eq!(c.0.available_permits(), 2);
        // Grants never add up past what a window can express.
        c.add(u32::MAX);
        c.add(u32::MAX);
        assert_eq!(c.0.available_permits(), u32::MAX as usize);
    }

    #[test]
    fn start_messages() {
        let s = parse_start(r#"{"argv":["sh","-c","x"],"tty":true,"rows":5,"cols":7}"#).unwrap();
        assert_eq!(
            (s.argv.len(), s.tty, s.rows, s.cols, s.stdin),
            (3, true, 5, 7, false)
        );
        assert!(
            parse_start(r#"{"type":"start","argv":[]}"#)
                .unwrap_err()
                .contains("no command")
        );
        assert!(parse_start(r#"{"type":"eof"}"#).is_err());
        assert!(parse_start("nope").is_err());
        assert!(matches!(
            serde_json::from_str::<ClientMsg>(r#"{"type":"resize","rows":1,"cols":2}"#),
            Ok(ClientMsg::Resize { rows: 1, cols: 2 })
        ));
    }
}
