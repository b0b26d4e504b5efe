//! The replica-to-replica hop: how the API and ingress of one replica reach an instance whose
//! control connection another replica holds (see "Replicas" in docs/architecture.md).
//!
//! Each replica started with `--peer-addr` runs a peer listener there: TLS 1.3 with its server
//! certificate, and a client certificate signed by the cluster CA required of every connection
//! (replicas sign themselves one at start, service/pki.rs; nobody else holds the CA key). Over it
//! a replica speaks plain HTTP/1.1:
//! - API requests (`/v1/...`, the exec and port-forward WebSockets) are served by the same router
//!   as the API listener, with the caller's `Authorization` forwarded and checked again;
//! - ingress requests carry `x-waypost-hop: ingress`, `x-waypost-hop-client: IP:PORT` (the
//!   visitor, for X-Forwarded-For) and, when the visitor came over HTTPS, `x-waypost-hop-proto:
//!   https` (for X-Forwarded-Proto), and are served by the ingress as if they had arrived there.
//!
//! Every request that arrives over the hop is marked ([`Hopped`]) and served from this replica's
//! own instances only: one hop, never a loop. Where a request goes: the instance registry in the
//! database says which replica holds an instance ([`find_remote`]); only replicas that beat within
//! the lease and have a peer address are used.
//!
//! Not here: `logs -f` needs no hop (every replica's log writer commits into the one database and
//! announces it; service/logs.rs), nor do config pushes (service/fanout.rs).

use crate::server::model::members::{LEASE, RemoteInstance};
use crate::server::service::pki::{self, Pki};
use crate::server::store;
use crate::server::transport::{Shared, accept, ingress, serve_http};
use anyhow::{Context as _, Result, anyhow};
use axum::extract::ws::{Message as AxMessage, WebSocket};
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::{self, Message as TgMessage, client::ClientRequestBuilder};

/// Marks a request that arrived over the hop (an extension set by the peer listener).
#[derive(Debug, Clone, Copy)]
pub struct Hopped;

/// The header that routes a hopped request to the ingress, and its value.
pub const HOP_HEADER: &str = "x-waypost-hop";
const HOP_INGRESS: &str = "ingress";
/// The visitor's address on a hopped ingress request (trusted only over the hop).
pub const HOP_CLIENT_HEADER: &str = "x-waypost-hop-client";
/// `https` on a hopped ingress request that came to the first replica over its HTTPS ingress, so
/// the holder tells the app `X-Forwarded-Proto: https` (trusted only over the hop).
pub const HOP_PROTO_HEADER: &str = "x-waypost-hop-proto";

/// Connecting to a peer (TCP and TLS) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer connection has this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest WebSocket message relayed (as the exec endpoint's own cap).
const MAX_MESSAGE: usize = 1 << 20;

/// Idle hop connections kept per peer for forwarded ingress requests.
const HOP_POOL_PER_PEER: usize = 32;
/// A pooled hop connection is used again only within this long: under the peer listener's idle
/// close (`HEADER_READ_TIMEOUT`, 30 s), so a request rarely meets a connection the peer is
/// closing (and one that does is sent again on a new connection: [`forward_ingress`]).
const HOP_POOL_IDLE: Duration = Duration::from_secs(20);

type HopSender = hyper::client::conn::http1::SendRequest<Incoming>;

/// The client side of the hop.
pub struct Peers {
    connector: TlsConnector,
    /// Ingress hop connections by peer address, newest last: each one carries one request at a
    /// time and goes back here once the response head arrived (it is busy, not ready, until the
    /// body has been read).
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<(HopSender, std::time::Instant)>>>,
}

impl Peers {
    pub fn new(pki: &Pki) -> Result<Peers> {
        Ok(Peers {
            connector: TlsConnector::from(pki::peer_client_config(pki, &[b"http/1.1"])?),
            idle: Default::default(),
        })
    }

    /// A pooled connection to `addr` that can take a request now; busy ones stay, closed and
    /// stale ones are dropped.
    fn take_idle(&self, addr: &str) -> Option<HopSender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(addr)?;
        list.retain(|(s, since)| !s.is_closed() && since.elapsed() < HOP_POOL_IDLE);
        let i = list.iter().rposition(|(s, _)| s.is_ready())?;
        Some(list.remove(i).0)
    }

    fn put_idle(&self, addr: &str, sender: HopSender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(addr.to_string()).or_default();
        if list.len() >= HOP_POOL_PER_PEER {
            list.remove(0); // the oldest: closes once its response is done
        }
        list.push((sender, std::time::Instant::now()));
    }

    /// A new HTTP/1.1 connection to the peer at `addr`, its driver task spawned.
    async fn open_hop(&self, addr: &str) -> Result<HopSender> {
        let tls = self.connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP with the replica")?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// A TLS connection to the peer listener at `addr` (HOST:PORT), both ends authenticated.
    pub async fn connect(&self, addr: &str) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let host = addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| anyhow!("peer address {addr:?} has no port"))?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .with_context(|| format!("peer address {addr:?}: not a host name"))?;
        let connect = async {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            self.connector.connect(name, tcp).await
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| anyhow!("replica {addr} did not answer within {CONNECT_TIMEOUT:?}"))?
            .with_context(|| format!("cannot reach replica {addr}"))
    }
}

/// A live instance of `app` (whose hex id starts with `prefix`, if given) held by another replica
/// that is up and reachable; the most recently connected first. None if there is none.
pub async fn find_remote(
    shared: &Shared,
    app: &str,
    prefix: Option<&str>,
) -> Result<Option<RemoteInstance>> {
    let (app, prefix, me) = (
        app.to_string(),
        prefix.map(str::to_string),
        shared.replica.clone(),
    );
    let fresh_after = crate::util::now_ms().saturating_sub(LEASE.as_millis() as i64);
    let found = shared
        .store
        .call(move |c| {
            store::members::remote_instances(c, &app, prefix.as_deref(), &me, fresh_after)
        })
        .await?;
    Ok(found.into_iter().next())
}

// ---- the listener ------------------------------------------------------------------------------

/// Accepts peer connections until shutdown. `done`: see `control::serve`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    done: mpsc::Sender<()>,
) {
    let api = super::api::router(shared.clone());
    let mut shutdown = shared.shutdown.clone();
    loop {
        let Some((tcp, peer)) = accept(&listener, &mut shutdown, "peer").await else {
            break;
        };
        let (acceptor, api, done, shared) =
            (acceptor.clone(), api.clone(), done.clone(), shared.clone());
        tokio::spawn(async move {
            let _done = done;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    return tracing::info!(%peer, error = %e, "peer TLS handshake refused");
                }
                Err(_) => return tracing::debug!(%peer, "peer TLS handshake timed out"),
            };
            let shutdown = shared.shutdown.clone();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let (api, shared) = (api.clone(), shared.clone());
                req.extensions_mut().insert(Hopped);
                async move {
                    let is_ingress = req
                        .headers()
                        .get(HOP_HEADER)
                        .is_some_and(|v| v.as_bytes() == HOP_INGRESS.as_bytes());
                    let resp = if is_ingress {
                        if req
                            .headers()
                            .get(HOP_PROTO_HEADER)
                            .is_some_and(|v| v.as_bytes() == b"https")
                        {
                            req.extensions_mut()
                                .insert(crate::server::transport::ingress_tls::ViaTls);
                        }
                        let client = req
                            .headers()
                            .get(HOP_CLIENT_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<SocketAddr>().ok())
                            .unwrap_or(peer);
                        ingress::handle(&shared, client, req)
                            .await
                            .map(axum::body::Body::new)
                    } else {
                        use hyper::service::Service as _;
                        let svc = hyper_util::service::TowerToHyperService::new(api);
                        match svc.call(req).await {
                            Ok(r) => r,
                            Err(never) => match never {},
                        }
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            if let Err(e) = serve_http(TokioIo::new(tls), service, shutdown).await {
                tracing::debug!(%peer, error = %e, "peer connection error");
            }
        });
    }
}

// ---- forwarding: the ingress ---------------------------------------------------------------------

/// Sends a visitor's request on to the replica holding `to`, and its response back (bodies
/// streamed both ways; an upgrade, e.g. a WebSocket, bridged byte for byte).
pub async fn forward_ingress(
    shared: &Shared,
    to: &RemoteInstance,
    client: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Either<Incoming, http_body_util::Full<Bytes>>>> {
    let upgrade = req
        .headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let via_tls = req
        .extensions()
        .get::<crate::server::transport::ingress_tls::ViaTls>()
        .is_some();
    let h = req.headers_mut();
    h.insert(HOP_HEADER, HeaderValue::from_static(HOP_INGRESS));
    // Set or removed, never passed on from the visitor.
    if via_tls {
        h.insert(HOP_PROTO_HEADER, HeaderValue::from_static("https"));
    } else {
        h.remove(HOP_PROTO_HEADER);
    }
    h.insert(
        HOP_CLIENT_HEADER,
        HeaderValue::from_str(&client.to_string()).context("client address")?,
    );
    // A pooled connection first; if the peer closed it before taking the request (hyper hands
    // the request back unsent), once more on a new one.
    let mut req = Some(req);
    let mut pooled = shared.peers.take_idle(&to.peer_addr);
    let (mut resp, sender) = loop {
        let from_pool = pooled.is_some();
        let mut sender = match pooled.take() {
            Some(s) => s,
            None => shared.peers.open_hop(&to.peer_addr).await?,
        };
        match sender
            .try_send_request(req.take().expect("a request to send"))
            .await
        {
            Ok(resp) => break (resp, sender),
            Err(mut e) => match e.take_message() {
                // Unsent on a pooled connection: once more, on a new one.
                Some(unsent) if from_pool => req = Some(unsent),
                _ => {
                    return Err(anyhow::Error::new(e.into_error())
                        .context("the replica dropped the request"));
                }
            },
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        shared.peers.put_idle(&to.peer_addr, sender);
    }
    if let (Some(visitor), StatusCode::SWITCHING_PROTOCOLS) = (upgrade, resp.status()) {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(a), Ok(b)) = (visitor.await, upstream.await) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
            }
        });
    }
    Ok(resp.map(Either::Left))
}

// ---- forwarding: exec ----------------------------------------------------------------------------

type PeerWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Why the replica holding the instance refused an exec: its status and message, passed on.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub message: String,
}

/// Opens the exec WebSocket on the replica holding `to` (the request as the client made it, with
/// the instance pinned to `to`'s id). `Ok(Err(refused))`: that replica answered with an error
/// before the upgrade (as the client should see it).
pub async fn open_exec(
    shared: &Shared,
    to: &RemoteInstance,
    app: &str,
    authorization: Option<&HeaderValue>,
) -> Result<std::result::Result<PeerWs, Refused>> {
    let path = format!("/v1/exec?app={}&instance={}", app, to.id);
    open_ws(shared, to, &path, authorization, "exec").await
}

/// Opens the port-forward WebSocket on the replica holding `to`: a tunnel stream to
/// `127.0.0.1:port` inside that instance (transport/api/forward.rs). `Ok(Err(refused))` as for
/// [`open_exec`].
pub async fn open_port_forward(
    shared: &Shared,
    to: &RemoteInstance,
    app: &str,
    port: u16,
    authorization: Option<&HeaderValue>,
) -> Result<std::result::Result<PeerWs, Refused>> {
    let path = forward_path(app, port, &to.id);
    open_ws(shared, to, &path, authorization, "port-forward").await
}

/// The port-forward endpoint's path on the holding replica, pinned to instance `id`.
fn forward_path(app: &str, port: u16, id: &str) -> String {
    format!("/v1/apps/{app}/port-forward?port={port}&instance={id}")
}

/// Asks the replica holding `to` whether a port-forward to `port` there would be accepted (the
/// endpoint's plain GET, which opens nothing): its status and JSON body, as the client should
/// see them.
pub async fn check_port_forward(
    shared: &Shared,
    to: &RemoteInstance,
    app: &str,
    port: u16,
    authorization: Option<&HeaderValue>,
) -> Result<(StatusCode, Bytes)> {
    let path = forward_path(app, port, &to.id);
    call(
        shared,
        &to.peer_addr,
        hyper::Method::GET,
        &path,
        authorization,
        None,
    )
    .await
}

/// One API request to the replica at `peer_addr` (the caller's Authorization passed on, a JSON
/// body if given): its status and body (at most [`MAX_MESSAGE`] bytes), as the client should see
/// them. The other replica serves it from its own instances only (it arrives [`Hopped`]).
pub async fn call(
    shared: &Shared,
    peer_addr: &str,
    method: hyper::Method,
    path: &str,
    authorization: Option<&HeaderValue>,
    json: Option<&serde_json::Value>,
) -> Result<(StatusCode, Bytes)> {
    use http_body_util::BodyExt as _;
    let tls = shared.peers.connect(peer_addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .context("HTTP with the replica")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder().method(method).uri(path).header(
        hyper::header::HOST,
        HeaderValue::from_str(peer_addr).context("peer address")?,
    );
    if let Some(auth) = authorization {
        req = req.header(hyper::header::AUTHORIZATION, auth);
    }
    let body = match json {
        Some(v) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(serde_json::to_vec(v)?)
        }
        None => Bytes::new(),
    };
    let req = req
        .body(http_body_util::Full::new(body))
        .context("building the request to the replica")?;
    let resp = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| anyhow!("replica {peer_addr} did not answer in time"))?
        .context("the replica dropped the request")?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_MESSAGE)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the replica's answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// A WebSocket to `path` on the replica holding `to`, with the client's Authorization passed
/// on. `what` names the feature in errors.
async fn open_ws(
    shared: &Shared,
    to: &RemoteInstance,
    path: &str,
    authorization: Option<&HeaderValue>,
    what: &str,
) -> Result<std::result::Result<PeerWs, Refused>> {
    let tls = shared.peers.connect(&to.peer_addr).await?;
    let uri: tungstenite::http::Uri = format!("wss://{}{path}", to.peer_addr)
        .parse()
        .with_context(|| format!("building the {what} URL"))?;
    let mut req = ClientRequestBuilder::new(uri);
    if let Some(auth) = authorization.and_then(|v| v.to_str().ok()) {
        req = req.with_header("Authorization", auth);
    }
    let mut config = tungstenite::protocol::WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE);
    config.max_frame_size = Some(MAX_MESSAGE);
    match tokio_tungstenite::client_async_with_config(req, tls, Some(config)).await {
        Ok((ws, _)) => Ok(Ok(ws)),
        Err(tungstenite::Error::Http(resp)) => {
            let status =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = resp.body().clone().unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| status.to_string());
            Ok(Err(Refused { status, message }))
        }
        Err(e) => Err(anyhow!(
            "the {what} WebSocket to replica {} failed: {e}",
            to.peer_addr
        )),
    }
}

/// Relays messages between the client's WebSocket and the one to the holding replica until
/// either side closes. Backpressure end to end: a message is read from one side only after the
/// previous one was written to the other.
pub async fn relay_exec(client: WebSocket, upstream: PeerWs) {
    let (mut c_tx, mut c_rx) = client.split();
    let (mut u_tx, mut u_rx) = upstream.split();
    let up = async {
        while let Some(Ok(m)) = c_rx.next().await {
            let m = match m {
                AxMessage::Text(t) => TgMessage::Text(t.as_str().into()),
                AxMessage::Binary(b) => TgMessage::Binary(b),
                AxMessage::Close(_) => break,
                AxMessage::Ping(_) | AxMessage::Pong(_) => continue,
            };
            if u_tx.send(m).await.is_err() {
                break;
            }
        }
        let _ = u_tx.close().await;
    };
    let down = async {
        while let Some(Ok(m)) = u_rx.next().await {
            let m = match m {
                TgMessage::Text(t) => AxMessage::Text(t.as_str().into()),
                TgMessage::Binary(b) => AxMessage::Binary(b),
                TgMessage::Close(_) => break,
                TgMessage::Ping(_) | TgMessage::Pong(_) | TgMessage::Frame(_) => continue,
            };
            if c_tx.send(m).await.is_err() {
                break;
            }
        }
        let _ = c_tx.close().await;
    };
    // The exit message comes down before the upstream closes; the client's close ends both.
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

// ---- forwarding: port-forward ------------------------------------------------------------------

/// Relays a port-forward WebSocket between the client and the holding replica, message for
/// message, until either side closes. Unlike [`relay_exec`], a close frame is passed on with its
/// code and reason (the reason carries the instance's refusal), and neither direction's end stops
/// the other: a half-close travels as a message and data may still flow the other way. Backpressure
/// end to end: a message is read from one side only after the previous one was written to the
/// other.
pub async fn relay_port_forward(client: WebSocket, upstream: PeerWs) {
    use axum::extract::ws::CloseFrame as AxClose;
    use tungstenite::protocol::CloseFrame as TgClose;
    let (mut c_tx, mut c_rx) = client.split();
    let (mut u_tx, mut u_rx) = upstream.split();
    let up = async {
        while let Some(Ok(m)) = c_rx.next().await {
            let m = match m {
                AxMessage::Text(t) => TgMessage::Text(t.as_str().into()),
                AxMessage::Binary(b) => TgMessage::Binary(b),
                AxMessage::Close(f) => {
                    let _ = u_tx
                        .send(TgMessage::Close(f.map(|f| TgClose {
                            code: f.code.into(),
                            reason: f.reason.as_str().into(),
                        })))
                        .await;
                    return;
                }
                AxMessage::Ping(_) | AxMessage::Pong(_) => continue,
            };
            if u_tx.send(m).await.is_err() {
                return;
            }
        }
        let _ = u_tx.close().await;
    };
    let down = async {
        while let Some(Ok(m)) = u_rx.next().await {
            let m = match m {
                TgMessage::Text(t) => AxMessage::Text(t.as_str().into()),
                TgMessage::Binary(b) => AxMessage::Binary(b),
                TgMessage::Close(f) => {
                    let _ = c_tx
                        .send(AxMessage::Close(f.map(|f| AxClose {
                            code: f.code.into(),
                            reason: f.reason.as_str().into(),
                        })))
                        .await;
                    return;
                }
                TgMessage::Ping(_) | TgMessage::Pong(_) | TgMessage::Frame(_) => continue,
            };
            if c_tx.send(m).await.is_err() {
                return;
            }
        }
        let _ = c_tx.close().await;
    };
    // Either side's close ends the relay: it was passed on, and the other side answers it.
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}
