//! The URL-service ingress: plain HTTP/1.1 on `--ingress-addr`, routed by Host to a
//! live instance through a tunnel stream over that instance's control connection.
//!
//! Routing (`DOMAIN` = `--url-domain`, default `localhost`):
//! - `NAME.DOMAIN` → any live instance of app NAME that has the URL service on, the one with the
//!   fewest open streams first;
//! - `NAME--ID.DOMAIN` → the live instance of NAME whose hex id starts with ID (when no app is
//!   called `NAME--ID` itself);
//! - a custom domain (`waypost domain add`; ingress_tls.rs) → its app, like `NAME.DOMAIN`;
//! - unknown app → 404; the app has no (URL-enabled) live instance → 502; the app does not
//!   start answering within `--ingress-timeout` of the last byte moved → 504; an ambiguous host
//!   (two Host headers, an unreadable one, or an absolute-form target naming another host than
//!   Host) → 400. Each error is a short HTML page with an `x-waypost-error` header
//!   (`unknown-app`, `no-instance`, `bad-gateway`, `timeout`, `bad-host`) for scripts.
//!
//! Upstream connections are pooled per instance: a request goes over an idle keep-alive HTTP
//! connection to the app (one tunnel stream, one TCP connection to the app) when one is there,
//! else over a new stream; after the response the connection goes back to the pool. The instance
//! is chosen per request (least open streams), not per visitor connection. When an instance
//! starts a zero-downtime restart it says so (Status RESTARTING): its idle pooled connections are
//! closed and none are returned to the pool, so the old child's streams end with their requests,
//! and the entrypoint holds new ones for the new child. A pooled connection the app closed in the
//! meantime costs nothing: a request that could not be sent on it is sent again on a new stream.
//! WebSocket (any `Upgrade`) requests get their own stream for the upgraded connection's life,
//! bridged byte for byte.
//!
//! Bodies are streamed both ways with backpressure (hyper's body streams over
//! [`TunnelStream`], whose writes wait for credits): nothing is ever buffered whole.
//! `Expect: 100-continue` is answered by our side (hyper sends the 100 when the upstream copy starts
//! reading the body) and not forwarded. `X-Forwarded-For` (appended), `-Proto` and `-Host` are set.

#[path = "ingress_raw.rs"]
pub(crate) mod raw;

use crate::server::model::InstanceId;
use crate::server::model::metrics::{AppLabel, AppStatus, metrics};
use crate::server::model::urlauth::Decision;
use crate::server::service::mux::{PickError, StreamProbe};
use crate::server::store;
use crate::server::transport::{Shared, accept, peer, serve_http};
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type Body = Either<Incoming, Full<Bytes>>;

/// Idle upstream connections kept per instance (beyond, they are closed after their response).
const POOL_PER_INSTANCE: usize = 64;
/// An idle upstream connection older than this is closed rather than reused.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// An idle keep-alive HTTP connection to an instance's app, over one tunnel stream.
struct Idle {
    sender: hyper::client::conn::http1::SendRequest<Incoming>,
    stream: u64,
    probe: StreamProbe,
    since: std::time::Instant,
}

/// Upstream keep-alive connections per instance, and the instances draining for a restart.
#[derive(Default)]
pub struct Pool {
    inner: std::sync::Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    idle: std::collections::HashMap<InstanceId, Vec<Idle>>,
    draining: std::collections::HashSet<InstanceId>,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection to `id` that is still usable, if any.
    fn take(&self, id: &InstanceId) -> Option<Idle> {
        let mut inner = self.lock();
        let list = inner.idle.get_mut(id)?;
        while let Some(idle) = list.pop() {
            if !idle.sender.is_closed() && idle.since.elapsed() < POOL_IDLE {
                return Some(idle);
            }
        }
        None
    }

    fn put(&self, id: InstanceId, idle: Idle) {
        let mut inner = self.lock();
        if inner.draining.contains(&id) {
            return; // dropped: the stream closes, the old child can go
        }
        let list = inner.idle.entry(id).or_default();
        list.retain(|i| !i.sender.is_closed());
        if list.len() < POOL_PER_INSTANCE {
            list.push(idle);
        }
    }

    /// The instance's child state changed (a Status frame): while it restarts (drains), no
    /// connection to it stays idle.
    pub fn note_state(&self, id: &InstanceId, restarting: bool) {
        let mut inner = self.lock();
        if restarting {
            if inner.draining.insert(*id) {
                inner.idle.remove(id);
            }
        } else {
            inner.draining.remove(id);
        }
    }

    /// The instance's connection is gone.
    pub fn forget(&self, id: &InstanceId) {
        let mut inner = self.lock();
        inner.idle.remove(id);
        inner.draining.remove(id);
    }
}

/// Accepts visitor connections until shutdown. `done`: see `control::serve`.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, done: mpsc::Sender<()>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let Some((tcp, peer)) = accept(&listener, &mut shutdown, "ingress").await else {
            break;
        };
        let shared = shared.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _done = done;
            if raw::ENABLED {
                // The fast path (ingress_raw.rs), which hands hyper what it does not take.
                return raw::serve_conn(shared, tcp, peer).await;
            }
            let shutdown = shared.shutdown.clone();
            let svc_shared = shared.clone();
            let service = hyper::service::service_fn(move |req| {
                let shared = svc_shared.clone();
                async move {
                    if let Some(resp) = redirect(&shared, &req) {
                        return Ok(resp);
                    }
                    Ok::<_, std::convert::Infallible>(handle(&shared, peer, req).await)
                }
            });
            if let Err(e) = serve_http(TokioIo::new(tcp), service, shutdown).await {
                tracing::debug!(%peer, error = %e, "ingress connection error");
            }
        });
    }
}

/// An instance of `app` held by another replica (transport/peer.rs), if any; a database error
/// counts as none (logged).
async fn remote(
    shared: &Shared,
    app: &str,
    prefix: Option<&str>,
) -> Option<crate::server::model::members::RemoteInstance> {
    match peer::find_remote(shared, app, prefix).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                app,
                error = format!("{e:#}"),
                "looking for another replica's instance failed"
            );
            None
        }
    }
}

/// Where a Host header points.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRoute {
    /// `LABEL.DOMAIN`: an app name, possibly `NAME--ID`.
    Label(String),
    /// The bare domain, an IP, or another domain.
    None,
}

/// Parses a Host header value (port and a trailing dot ignored, case-insensitive).
pub fn host_route(host: &str, domain: &str) -> HostRoute {
    let host = host.trim();
    // Strip the port; an IPv6 literal is never an app.
    if host.starts_with('[') {
        return HostRoute::None;
    }
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    match host
        .strip_suffix(&domain)
        .and_then(|rest| rest.strip_suffix('.'))
    {
        Some(label) if !label.is_empty() && !label.contains('.') => {
            HostRoute::Label(label.to_string())
        }
        _ => HostRoute::None,
    }
}

/// Where a Host header points on this server: a custom domain (`waypost domain add`,
/// ingress_tls.rs) is its app's label, else [`host_route`] under `--url-domain`.
pub fn route(shared: &Shared, host: &str) -> HostRoute {
    match shared.https.domains.app_for(host) {
        Some(app) => HostRoute::Label(app),
        None => host_route(host, &shared.url_domain),
    }
}

/// `--ingress-redirect-https`: a request for an app (`NAME.DOMAIN` or a custom domain) gets a
/// 308 to the same path on the HTTPS ingress. None: served here (the option is off, or the host is
/// no app's, which keeps the "no app here" page and ambiguous hosts' 400 as they are).
fn redirect(shared: &Shared, req: &Request<Incoming>) -> Option<Response<Body>> {
    if !shared.https.redirect {
        return None;
    }
    let port = shared.https.port_suffix()?;
    let host = request_host(req.headers(), req.uri()).ok()?;
    if route(shared, &host) == HostRoute::None {
        return None;
    }
    let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = HeaderValue::from_str(&format!("https://{name}{port}{path}")).ok()?;
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "This app is served over HTTPS: {}\n",
        location.to_str().unwrap_or_default()
    )))));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Some(resp)
}

/// The host a request is for, or why it is ambiguous (answered 400, as RFC 9112 §3.2 asks for
/// more than one Host or an invalid one). Routing by one of two hosts while the app or a proxy in
/// front reads the other is how requests get past per-host rules, so none is picked. An
/// absolute-form target (`GET http://a.example/`) must agree with Host (port and case aside);
/// with no Host it is the host. No Host at all: empty (the ingress's "no app here" page).
pub fn request_host(headers: &HeaderMap, uri: &hyper::Uri) -> Result<String, &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("The request has more than one Host header.");
    }
    let host = match host {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| "The request's Host header is not a valid host.")?,
        ),
        None => None,
    };
    match (host, uri.authority()) {
        (Some(h), Some(a)) if !same_host(h, a.as_str()) => {
            Err("The request's target names another host than its Host header.")
        }
        (Some(h), _) => Ok(h.to_string()),
        (None, Some(a)) => Ok(a.to_string()),
        (None, None) => Ok(String::new()),
    }
}

/// Host names equal ignoring case, a trailing dot, the port and any userinfo.
fn same_host(a: &str, b: &str) -> bool {
    fn norm(h: &str) -> String {
        let h = h.trim();
        let h = h.rsplit_once('@').map_or(h, |(_, h)| h);
        let h = if h.starts_with('[') {
            h.split_inclusive(']').next().unwrap_or(h)
        } else {
            h.rsplit_once(':').map_or(h, |(h, _)| h)
        };
        h.trim_end_matches('.').to_ascii_lowercase()
    }
    norm(a) == norm(b)
}

/// `NAME--ID` → (NAME, ID) when ID looks like a hex instance-id prefix.
pub fn split_instance(label: &str) -> Option<(&str, &str)> {
    let (name, id) = label.rsplit_once("--")?;
    (!name.is_empty()
        && !id.is_empty()
        && id.len() <= 32
        && id.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some((name, id))
}

fn page(status: StatusCode, code: &'static str, title: &str, detail: &str) -> Response<Body> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{} {}</title></head>\n\
         <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\">\n\
         <h1>{}</h1>\n<p>{}</p>\n<p><small>waypost ingress</small></p>\n</body></html>\n",
        status.as_u16(),
        esc(title),
        esc(title),
        esc(detail)
    );
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(html))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-waypost-error", HeaderValue::from_static(code));
    resp
}

/// Which app (and instance prefix) a label means: an existing app of that exact name first, else
/// `NAME--ID`. `None`: no such app.
async fn resolve(shared: &Shared, label: &str) -> Result<Option<(String, Option<String>)>, ()> {
    let exists = |name: String| async move {
        if shared.mux.has_app(&name) {
            return Ok(true);
        }
        shared
            .store
            .call(move |c| store::app_exists(c, &name))
            .await
            .map_err(|e| tracing::error!(error = format!("{e:#}"), "app lookup failed"))
    };
    if exists(label.to_string()).await? {
        return Ok(Some((label.to_string(), None)));
    }
    if let Some((name, id)) = split_instance(label) {
        if exists(name.to_string()).await? {
            return Ok(Some((name.to_string(), Some(id.to_string()))));
        }
    }
    Ok(None)
}

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1), plus Expect (we
/// answer it ourselves).
fn strip_hop_headers(h: &mut HeaderMap, keep_upgrade: bool) {
    // Names listed in Connection are hop-by-hop too.
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        // The replica-to-replica headers (peer.rs): for this server, never for the app.
        peer::HOP_HEADER,
        peer::HOP_CLIENT_HEADER,
        peer::HOP_PROTO_HEADER,
    ] {
        h.remove(n);
    }
    h.remove(header::CONNECTION);
    h.remove(header::EXPECT);
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Serves one visitor request (also one that another replica forwarded over the hop: then
/// `peer` is the visitor and the request is marked [`peer::Hopped`]), and counts it in the
/// metrics — where the visitor arrived: a hopped request was counted by the replica it came
/// from.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let hopped = req.extensions().get::<peer::Hopped>().is_some();
    let start = std::time::Instant::now();
    let mut app = None;
    let resp = serve_request(shared, peer, req, &mut app).await;
    if !hopped {
        count_request(app.as_deref().unwrap_or(""), resp.status().as_u16(), start);
    }
    resp
}

/// Counts an ingress request: by app (`""`: the host names no app) and status, and its time
/// until the response head (`start` to now).
pub(crate) fn count_request(app: &str, status: u16, start: std::time::Instant) {
    let m = metrics();
    let app = AppLabel::new(app);
    m.ingress_request_duration_seconds
        .get_or_create(&app)
        .observe(start.elapsed().as_secs_f64());
    m.ingress_requests
        .get_or_create(&AppStatus {
            app: app.app,
            status,
        })
        .inc();
}

/// [`handle`] without the counting; sets `app_out` once the host's app is known.
async fn serve_request(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    app_out: &mut Option<String>,
) -> Response<Body> {
    let host = match request_host(req.headers(), req.uri()) {
        Ok(h) => h,
        Err(why) => {
            tracing::debug!(%peer, why, "ingress request with an ambiguous host refused");
            return page(StatusCode::BAD_REQUEST, "bad-host", "Bad request", why);
        }
    };
    let domain = &shared.url_domain;
    let HostRoute::Label(label) = route(shared, &host) else {
        return page(
            StatusCode::NOT_FOUND,
            "unknown-app",
            "No app here",
            &format!(
                "This is the waypost ingress. Apps are served at http://NAME.{domain}{}/ \
                 (see `waypost url --app NAME`).",
                port_suffix(&shared.ingress_addr)
            ),
        );
    };
    let (app, prefix) = match resolve(shared, &label).await {
        Ok(Some(x)) => x,
        Ok(None) => {
            return page(
                StatusCode::NOT_FOUND,
                "unknown-app",
                "No such app",
                &format!("There is no app named {label} on this waypost server."),
            );
        }
        Err(()) => {
            return page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad-gateway",
                "Server error",
                "The waypost server could not look the app up; try again.",
            );
        }
    };
    *app_out = Some(app.clone());
    // Access control (`waypost url auth`), checked by the replica the visitor reached: a
    // request hopped from another replica was checked there.
    if req.extensions().get::<peer::Hopped>().is_none() {
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match shared.urlauth.decide(&app, peer.ip(), authorization).await {
            Ok(Decision::Allow { strip }) => {
                if strip {
                    // Our credentials, not the app's.
                    req.headers_mut().remove(header::AUTHORIZATION);
                }
            }
            Ok(Decision::Unauthorized(challenge)) => {
                let mut resp = page(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "Sign in",
                    &format!("App {app} needs credentials (see `waypost url auth`)."),
                );
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                return resp;
            }
            Ok(Decision::Forbidden) => {
                tracing::debug!(app, %peer, "ingress request from a network not allowed");
                return page(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "Forbidden",
                    &format!("App {app} is not served to your network."),
                );
            }
            Err(e) => {
                tracing::error!(app, error = format!("{e:#}"), "checking URL access failed");
                return page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "bad-gateway",
                    "Server error",
                    "The waypost server could not check access to this app; try again.",
                );
            }
        }
    }
    let instance = match shared.mux.pick_url(&app, prefix.as_deref()) {
        Ok(id) => id,
        // Not here: another replica may hold one (one hop; a hopped request is never sent on).
        Err(PickError::NoLive { .. } | PickError::NoSuchInstance { .. })
            if req.extensions().get::<peer::Hopped>().is_none()
                && let Some(remote) = remote(shared, &app, prefix.as_deref()).await =>
        {
            metrics().count_hop(&app);
            return match peer::forward_ingress(shared, &remote, peer, req).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::warn!(
                        app,
                        replica = remote.replica,
                        error = format!("{e:#}"),
                        "ingress hop failed"
                    );
                    page(
                        StatusCode::BAD_GATEWAY,
                        "bad-gateway",
                        "Bad gateway",
                        &format!(
                            "The waypost replica holding app {app}'s instance could not be reached."
                        ),
                    )
                }
            };
        }
        Err(e) => {
            let detail = match &e {
                PickError::NoLive { .. } => format!(
                    "App {app} has no running instance connected to waypost right now. \
                     Start one (waypost-entrypoint with a token for {app}) and reload."
                ),
                other => format!("{other}."),
            };
            return page(
                StatusCode::BAD_GATEWAY,
                "no-instance",
                "No instance available",
                &detail,
            );
        }
    };
    tracing::debug!(app, instance = crate::util::hex(&instance), %peer, method = %req.method(), path = %req.uri().path(), "ingress request");

    // ---- the upstream request ----
    let upgrade = wants_upgrade(req.headers());
    let visitor_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = path
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    parts.version = hyper::Version::HTTP_11;
    let h = &mut parts.headers;
    strip_hop_headers(h, upgrade);
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{}, {}", prev.trim(), peer.ip()),
        _ => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    let proto = if parts
        .extensions
        .get::<crate::server::transport::ingress_tls::ViaTls>()
        .is_some()
    {
        "https"
    } else {
        "http"
    };
    h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Ok(v) = HeaderValue::from_str(&host) {
        h.insert("x-forwarded-host", v.clone());
        h.insert(header::HOST, v);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut up_req = Some(Request::from_parts(parts, body));

    // A pooled connection first (never for an upgrade), else a new stream; a request that could
    // not even be sent on a pooled connection (the app had closed it) goes again on a new one.
    let mut pooled = if upgrade {
        None
    } else {
        shared.pool.take(&instance)
    };
    let timeout = shared.ingress_timeout;
    let (resp, mut sender, stream_id, probe) = loop {
        let (mut sender, stream_id, probe, fresh) = match pooled.take() {
            Some(idle) => (idle.sender, idle.stream, idle.probe, false),
            None => {
                let Some(stream) = shared.mux.open_stream_on(instance, &peer.to_string()) else {
                    return page(
                        StatusCode::BAD_GATEWAY,
                        "no-instance",
                        "No instance available",
                        &format!("The instance of {app} went away; reload."),
                    );
                };
                let (stream_id, probe) = (stream.id(), stream.probe());
                match hyper::client::conn::http1::Builder::new()
                    .handshake::<_, Incoming>(TokioIo::new(stream))
                    .await
                {
                    Ok((sender, conn)) => {
                        tokio::spawn(async move {
                            if let Err(e) = conn.with_upgrades().await {
                                tracing::debug!(stream = stream_id, error = %e, "upstream connection ended");
                            }
                        });
                        (sender, stream_id, probe, true)
                    }
                    Err(e) => {
                        return page(
                            StatusCode::BAD_GATEWAY,
                            "bad-gateway",
                            "Bad gateway",
                            &format!("{e}"),
                        );
                    }
                }
            }
        };
        let req = up_req.take().expect("a request to send");

        // ---- wait for the response head, with the idle timer ----
        let send = sender.try_send_request(req);
        tokio::pin!(send);
        let result = loop {
            let deadline = probe.last_activity() + timeout;
            tokio::select! {
                r = &mut send => break r,
                _ = tokio::time::sleep_until(deadline) => {
                    if probe.last_activity() + timeout <= tokio::time::Instant::now() {
                        tracing::info!(app, stream = stream_id, "the app did not answer in time");
                        return page(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            "The app did not answer",
                            &format!("App {app} did not answer within {timeout:?}."),
                        );
                    }
                }
            }
        };
        match result {
            Ok(resp) => break (resp, sender, stream_id, probe),
            Err(mut e) => {
                if !fresh {
                    if let Some(req) = e.take_message() {
                        up_req = Some(req);
                        continue;
                    }
                }
                let e = e.into_error();
                let why = probe.error().unwrap_or_else(|| {
                    if e.is_incomplete_message() {
                        "the app closed the connection without answering".to_string()
                    } else {
                        e.to_string()
                    }
                });
                tracing::debug!(
                    app,
                    stream = stream_id,
                    error = why,
                    "ingress request failed"
                );
                return page(
                    StatusCode::BAD_GATEWAY,
                    "bad-gateway",
                    "Bad gateway",
                    &format!("App {app} could not be reached: {why}"),
                );
            }
        }
    };
    let mut resp = resp;

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(visitor) = visitor_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(bridge(visitor, upstream, stream_id, probe));
            let (parts, body) = resp.into_parts();
            return Response::from_parts(parts, Either::Left(body));
        }
    }
    // Back to the pool once the response is complete (the visitor has read its body), unless
    // the app closes the connection or the instance is draining.
    if !upgrade {
        let pool = shared.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.pool.put(
                    instance,
                    Idle {
                        sender,
                        stream: stream_id,
                        probe,
                        since: std::time::Instant::now(),
                    },
                );
            }
        });
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_headers(&mut parts.headers, false);
    Response::from_parts(parts, Either::Left(body))
}

/// Copies bytes both ways between an upgraded visitor connection and the upgraded upstream
/// stream until both sides are done.
async fn bridge(
    visitor: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    stream_id: u64,
    _probe: StreamProbe,
) {
    let (v, u) = match tokio::try_join!(visitor, upstream) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!(stream = stream_id, error = %e, "upgrade failed");
            return;
        }
    };
    let mut v = TokioIo::new(v);
    let mut u = TokioIo::new(u);
    match tokio::io::copy_bidirectional(&mut v, &mut u).await {
        Ok((up, down)) => {
            tracing::debug!(stream = stream_id, up, down, "upgraded connection closed")
        }
        Err(e) => tracing::debug!(stream = stream_id, error = %e, "upgraded connection failed"),
    }
}

/// `:PORT` for a URL, or nothing for port 80.
pub fn port_suffix(addr: &str) -> String {
    match addr.rsplit_once(':').map(|(_, p)| p) {
        Some("80") | None => String::new(),
        Some(p) => format!(":{p}"),
    }
}

/// The URL of an app: `http://NAME.DOMAIN[:PORT]/`.
pub fn app_url(app: &str, domain: &str, ingress_addr: &str) -> String {
    format!(
        "http://{app}.{}{}/",
        domain.trim_end_matches('.'),
        port_suffix(ingress_addr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_route_to_labels() {
        let l = |s: &str| HostRoute::Label(s.into());
        assert_eq!(host_route("web.localhost:9080", "localhost"), l("web"));
        assert_eq!(host_route("WEB.LocalHost.", "localhost"), l("web"));
        assert_eq!(
            host_route("web--ab12.example.com", "example.com"),
            l("web--ab12")
        );
        assert_eq!(host_route("localhost:9080", "localhost"), HostRoute::None);
        assert_eq!(host_route("a.b.localhost", "localhost"), HostRoute::None);
        assert_eq!(host_route("127.0.0.1:9080", "localhost"), HostRoute::None);
        assert_eq!(host_route("[::1]:9080", "localhost"), HostRoute::None);
        assert_eq!(host_route("webxlocalhost", "localhost"), HostRoute::None);
        assert_eq!(host_route("", "localhost"), HostRoute::None);
    }

    #[test]
    fn ambiguous_hosts_are_refused() {
        let req = |hosts: &[&[u8]], uri: &str| {
            let mut h = HeaderMap::new();
            for v in hosts {
                h.append(header::HOST, HeaderValue::from_bytes(v).unwrap());
            }
            request_host(&h, &uri.parse().unwrap())
        };
        assert_eq!(
            req(&[b"web.localhost:9080"], "/"),
            Ok("web.localhost:9080".into())
        );
        assert_eq!(
            req(&[], "http://web.localhost/x"),
            Ok("web.localhost".into())
        );
        assert_eq!(req(&[], "/"), Ok(String::new()));
        assert_eq!(req(&[b""], "/"), Ok(String::new()));
        // Absolute form agreeing with Host (case, port, trailing dot aside).
        assert_eq!(
            req(&[b"Web.LOCALHOST."], "http://web.localhost:9080/x"),
            Ok("Web.LOCALHOST.".into())
        );
        assert_eq!(req(&[b"[::1]:80"], "http://[::1]/"), Ok("[::1]:80".into()));
        // Negative cases: two Host lines (even equal ones), a disagreeing target, a Host that is
        // not text.
        assert!(req(&[b"a.localhost", b"b.localhost"], "/").is_err());
        assert!(req(&[b"a.localhost", b"a.localhost"], "/").is_err());
        assert!(req(&[b"a.localhost"], "http://b.localhost/").is_err());
        assert!(req(&[b"a.localhost"], "http://a.localhost.evil/").is_err());
        assert!(req(&[b"\xffa.localhost"], "/").is_err());
    }

    #[test]
    fn instance_labels() {
        assert_eq!(split_instance("web--ab12"), Some(("web", "ab12")));
        assert_eq!(split_instance("my--app--0f"), Some(("my--app", "0f")));
        assert_eq!(split_instance("web--zz"), None);
        assert_eq!(split_instance("web"), None);
        assert_eq!(split_instance("--ab"), None);
    }

    #[test]
    fn hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert(peer::HOP_HEADER, HeaderValue::from_static("ingress"));
        h.insert(
            peer::HOP_CLIENT_HEADER,
            HeaderValue::from_static("10.0.0.9:4000"),
        );
        h.insert(peer::HOP_PROTO_HEADER, HeaderValue::from_static("https"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_headers(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_headers(&mut h, true);
        assert!(h.contains_key(header::UPGRADE));
    }

    #[test]
    fn urls() {
        assert_eq!(
            app_url("web", "localhost", "127.0.0.1:9080"),
            "http://web.localhost:9080/"
        );
        assert_eq!(
            app_url("web", "example.com.", "0.0.0.0:80"),
            "http://web.example.com/"
        );
    }
}
