//! Port-forward: `GET /v1/apps/{app}/port-forward?port=N[&instance=ID_PREFIX]`, the server side
//! of `waypost port-forward` (cli/forward.rs). Admin tokens only (the API's auth layer answers
//! 401 without a token and 403 to an entrypoint token before anything here runs).
//!
//! ## Checks, in order (errors are ordinary API errors, `{"error": ...}`)
//! 1. `port` is a number from 1 to 65535 (else 400); `instance`, if given, a hex prefix (400);
//! 2. the app exists (404);
//! 3. an instance is picked as the ingress and `exec` pick one: the one whose id starts with
//!    `instance` (404 if none matches, 409 if several do), else the live instance with the fewest
//!    tunnel streams; never one started with `WAYPOST_DISABLE_URL=1` (409, saying so). If this
//!    replica holds no matching instance, another replica that does is asked over the hop
//!    (transport/peer.rs), pinned to that instance's full id; a request that came over the hop is
//!    never sent on.
//!
//! ## Two forms
//! - **Plain GET** (no `Upgrade`): the checks only; nothing is opened. `200 {"instance": "<hex
//!   id>", "port": N}`. The CLI asks once at start, so a typo fails before it listens, and then
//!   pins every connection to that instance (as kubectl stays on one pod).
//! - **WebSocket**: one per forwarded TCP connection. After the upgrade a tunnel stream
//!   (StreamOpen with `target_port` = N) goes to the instance, whose entrypoint connects to
//!   `127.0.0.1:N` (then `[::1]:N`) — or refuses: a port not in `WAYPOST_URL_PORTS`, a connect
//!   that fails, too many streams.
//!
//! ## The WebSocket protocol (both directions alike)
//! - binary: bytes of the connection (never empty);
//! - text `{"type":"eof"}`: this side sends no more bytes (a TCP FIN; the stream's half-close).
//!   The other direction goes on;
//! - server → client text `{"type":"error","error":"..."}`: the stream failed (the instance's
//!   refusal, e.g. "port 5432 is not in WAYPOST_URL_PORTS (allowed: 5000)", or "the instance
//!   disconnected"), followed by a close with code 1011 and the same text as its reason (cut to
//!   the 123 bytes a close reason holds);
//! - once both directions are done, the server closes normally (1000). A client that closes
//!   early, or drops the connection, aborts the stream both ways (the app's socket is closed).
//!
//! Flow control: bounded everywhere, nothing buffers without limit. A binary message is read from
//! the WebSocket only after the previous one was written into the tunnel stream, which waits for
//! the entrypoint's credits (so a fast client is held back by TCP); the tunnel stream returns
//! credits as the relay reads it, and the relay reads the next chunk only once the previous one
//! was written to the WebSocket (so a slow client holds back the app, within one window).

use super::{ApiError, require_app};
use crate::server::service::mux::{OUT_CHUNK, PickError, TunnelStream};
use crate::server::transport::Shared;
use crate::server::transport::peer::{self, Hopped};
use axum::extract::ws::{
    CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type AppState = Arc<Shared>;

/// Largest WebSocket message accepted from a client (the CLI sends at most 64 KiB).
const MAX_MESSAGE: usize = 1 << 20;
/// Close code for a stream that failed (RFC 6455 "internal error": the far side's failure).
const CLOSE_FAILED: u16 = 1011;
/// A close frame's reason holds at most this many bytes.
const MAX_REASON: usize = 123;
/// What the entrypoint logs as the stream's client (it only traces it).
const CLIENT_ADDR: &str = "port-forward";

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/apps/{app}/port-forward", get(port_forward))
}

#[derive(Deserialize)]
struct ForwardQuery {
    port: Option<String>,
    instance: Option<String>,
}

fn err(status: StatusCode, msg: &str) -> Response {
    ApiError::new(status, msg).into_response()
}

/// The `port` parameter: 1..=65535, or the 400's message.
fn parse_port(p: Option<&str>) -> Result<u16, String> {
    let Some(p) = p.filter(|p| !p.is_empty()) else {
        return Err("missing ?port=N (the port inside the instance, 1-65535)".into());
    };
    match p.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!(
            "invalid port {p:?}: give a port number from 1 to 65535"
        )),
    }
}

fn pick_status(e: &PickError) -> StatusCode {
    match e {
        PickError::NoSuchInstance { .. } => StatusCode::NOT_FOUND,
        _ => StatusCode::CONFLICT,
    }
}

async fn port_forward(
    State(s): State<AppState>,
    Path(app): Path<String>,
    hopped: Option<axum::Extension<Hopped>>,
    headers: HeaderMap,
    q: Result<Query<ForwardQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return err(StatusCode::BAD_REQUEST, "invalid query string");
    };
    let port = match parse_port(q.port.as_deref()) {
        Ok(p) => p,
        Err(why) => return err(StatusCode::BAD_REQUEST, &why),
    };
    let prefix = q.instance.filter(|i| !i.is_empty());
    if let Some(p) = &prefix {
        if p.len() > 32 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return err(
                StatusCode::BAD_REQUEST,
                &format!("invalid instance id {p:?}: give a prefix of its hex id"),
            );
        }
    }
    // No Upgrade header: the plain GET (checks only). An upgrade that is not a valid WebSocket
    // handshake is the client's mistake.
    let ws = match ws {
        Ok(ws) => Some(ws),
        Err(e) if headers.contains_key(header::UPGRADE) => {
            return err(
                StatusCode::BAD_REQUEST,
                &format!("this endpoint speaks WebSocket ({})", e.body_text()),
            );
        }
        Err(_) => None,
    };
    if let Err(e) = require_app(&s, &app).await {
        return e.into_response();
    }
    let id = match s.mux.pick_url(&app, prefix.as_deref()) {
        Ok(id) => id,
        // Not here: another replica may hold it (one hop; a hopped request is never sent on).
        Err(e @ (PickError::NoLive { .. } | PickError::NoSuchInstance { .. }))
            if hopped.is_none() =>
        {
            return match forward(&s, &app, prefix.as_deref(), port, &headers, ws).await {
                Some(r) => r,
                None => err(pick_status(&e), &e.to_string()),
            };
        }
        Err(e) => return err(pick_status(&e), &e.to_string()),
    };
    let instance = crate::util::hex(&id);
    let Some(ws) = ws else {
        return axum::Json(json!({ "instance": instance, "port": port })).into_response();
    };
    tracing::info!(app, instance, port, "port-forward connection opening");
    let mux = s.mux.clone();
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |mut socket| async move {
            // Opened only now: a client that never completes the upgrade never reaches the app.
            match mux.open_stream_to_port(id, port, CLIENT_ADDR) {
                Some(stream) => relay(socket, stream).await,
                None => fail(&mut socket, "the instance disconnected").await,
            }
        })
}

/// The instance is held by another replica, if one holds a match: that replica answers the plain
/// GET, or its WebSocket is opened first (so its refusal reaches the client as an ordinary error)
/// and then relayed to the client's. None: no other replica holds a matching instance.
async fn forward(
    s: &Arc<Shared>,
    app: &str,
    prefix: Option<&str>,
    port: u16,
    headers: &HeaderMap,
    ws: Option<WebSocketUpgrade>,
) -> Option<Response> {
    let remote = match peer::find_remote(s, app, prefix).await {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => return Some(ApiError::from(e).into_response()),
    };
    let auth = headers.get(header::AUTHORIZATION);
    let unreachable = |e: anyhow::Error| {
        tracing::warn!(
            app,
            replica = remote.replica,
            error = format!("{e:#}"),
            "port-forward hop failed"
        );
        err(
            StatusCode::BAD_GATEWAY,
            &format!(
                "instance {} is held by replica {} at {}, which cannot be reached: {e:#}",
                remote.id, remote.replica, remote.peer_addr
            ),
        )
    };
    let Some(ws) = ws else {
        return Some(
            match peer::check_port_forward(s, &remote, app, port, auth).await {
                Ok((status, body)) => {
                    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
                }
                Err(e) => unreachable(e),
            },
        );
    };
    let upstream = match peer::open_port_forward(s, &remote, app, port, auth).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(refused)) => return Some(err(refused.status, &refused.message)),
        Err(e) => return Some(unreachable(e)),
    };
    crate::server::model::metrics::metrics().count_hop(app);
    tracing::info!(
        app,
        instance = remote.id,
        replica = remote.replica,
        port,
        "port-forward connection relayed to the holding replica"
    );
    Some(
        ws.max_message_size(MAX_MESSAGE)
            .max_frame_size(MAX_MESSAGE)
            .on_upgrade(move |socket| peer::relay_port_forward(socket, upstream)),
    )
}

/// How one direction of the relay ended, when it did not simply finish.
enum End {
    /// The client closed early or went away: abort the stream, nothing to tell anyone.
    ClientGone,
    /// The stream failed; the reason goes to the client.
    Failed(String),
}

fn eof_msg() -> Message {
    Message::text(json!({"type": "eof"}).to_string())
}

/// Tells the client why its connection ends: the error as a message, then a close with it as
/// the reason.
async fn fail(socket: &mut WebSocket, why: &str) {
    let _ = socket
        .send(Message::text(
            json!({"type": "error", "error": why}).to_string(),
        ))
        .await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: CLOSE_FAILED,
            reason: close_reason(why).into(),
        })))
        .await;
}

/// `why` cut to what a close frame's reason holds, at a character boundary.
fn close_reason(why: &str) -> &str {
    let mut end = why.len().min(MAX_REASON);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    &why[..end]
}

/// Relays one connection between the client's WebSocket and the tunnel stream (see the module
/// docs for the protocol).
async fn relay(socket: WebSocket, stream: TunnelStream) {
    let probe = stream.probe();
    let id = stream.id();
    // The stream's error, if it failed (the instance's own words), else what the I/O said.
    let why = |e: std::io::Error| probe.error().unwrap_or_else(|| e.to_string());
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (mut sink, mut ws_rx) = socket.split();
    let outcome = {
        // client → instance
        let up = async {
            loop {
                match ws_rx.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        if let Err(e) = wr.write_all(&b).await {
                            return Err(End::Failed(why(e)));
                        }
                    }
                    Some(Ok(Message::Text(t))) => {
                        let v: serde_json::Value =
                            serde_json::from_str(t.as_str()).unwrap_or_default();
                        if v["type"] == "eof" {
                            // The half-close: the app reads EOF, and may still answer.
                            let _ = wr.shutdown().await;
                            return Ok(());
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return Err(End::ClientGone),
                }
            }
        };
        // instance → client
        let down = async {
            let mut buf = vec![0u8; OUT_CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => {
                        return match sink.send(eof_msg()).await {
                            Ok(()) => Ok(()),
                            Err(_) => Err(End::ClientGone),
                        };
                    }
                    Ok(n) => {
                        if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                            return Err(End::ClientGone);
                        }
                    }
                    Err(e) => return Err(End::Failed(why(e))),
                }
            }
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break Err(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break Err(e),
                },
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
    let mut socket = match sink.reunite(ws_rx) {
        Ok(s) => s,
        Err(_) => return, // never: the two halves of one socket
    };
    match outcome {
        Ok(()) => {
            tracing::debug!(stream = id, "port-forward connection done");
            let _ = socket.send(Message::Close(None)).await;
        }
        Err(End::ClientGone) => {
            tracing::debug!(
                stream = id,
                "port-forward client went away; aborting the stream"
            );
        }
        Err(End::Failed(why)) => {
            tracing::info!(stream = id, error = why, "port-forward connection failed");
            fail(&mut socket, &why).await;
        }
    }
    // Dropping the stream's halves here: an unfinished stream is aborted both ways.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(parse_port(Some("1")).ok(), Some(1));
        assert_eq!(parse_port(Some("65535")).ok(), Some(65535));
        for bad in [
            None,
            Some(""),
            Some("0"),
            Some("65536"),
            Some("70000"),
            Some("-1"),
            Some("x"),
        ] {
            let why = parse_port(bad).expect_err("refused");
            assert!(why.contains("port"), "{bad:?}: {why}");
        }
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100); // 200 bytes, 2 each
        let r = close_reason(&long);
        assert!(
            r.len() <= MAX_REASON && r.len() >= MAX_REASON - 1,
            "{}",
            r.len()
        );
        assert!(long.starts_with(r));
    }
}
