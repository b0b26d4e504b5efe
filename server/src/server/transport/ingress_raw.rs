//! The ingress's fast path for plain HTTP/1.1 visitor connections: request heads are parsed
//! (for routing, access control and the forwarded headers) and rewritten, bodies are copied by
//! length, and the app's response goes back with only its head rewritten (hop headers out) and
//! its framing tracked (Content-Length, chunked, or up to the end of the stream) so the next
//! request can use the same upstream stream. No second HTTP parse and serialisation, no hyper
//! connection tasks: one task per visitor connection moves the bytes.
//!
//! It takes only the common case and hands everything else to the hyper path ([`super::handle`],
//! with the bytes already read put back in front of the socket), for the rest of that visitor
//! connection: HTTP/1.0, an `Upgrade`, `Expect`, a chunked or large (> [`MAX_BODY`]) request
//! body, anything but an origin-form target, not exactly one Host, a head that is not plain
//! (obs-fold, bare LF, odd names), a host that is no app here, a request access control does not
//! allow (the 401/403 pages), an app with no instance on this replica (the replica hop and the
//! error pages), and `--ingress-redirect-https`. So every guarantee of the module doc of
//! ingress.rs holds: what the fast path does itself is the same as the hyper path does for such a
//! request (X-Forwarded-For appended, -Proto and -Host set, hop headers stripped both ways, 502
//! with `x-waypost-error` when the app cannot be reached, 504 after `--ingress-timeout` without a
//! byte moving, a request that could not be sent on an idle pooled stream sent again on a new one
//! — a non-idempotent one only if the stream never took it —, no stream kept idle while the
//! instance restarts). Framing is never lost: Content-Length, Transfer-Encoding and Host stay
//! even when `Connection` lists them, so one message is never read as two.
//!
//! Idle upstream streams are pooled per instance here (the hyper path pools hyper connections;
//! the two do not share), with the same bounds and the same draining rule.

use super::{HostRoute, POOL_IDLE, POOL_PER_INSTANCE, route};
use crate::server::model::InstanceId;
use crate::server::model::metrics::{AppLabel, AppStatus, metrics};
use crate::server::model::urlauth::Decision;
use crate::server::service::mux::TunnelStream;
use crate::server::transport::{Shared, serve_http, wait_shutdown};
use http_body_util::BodyExt as _;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;

/// Whether the plain listener's connections take the fast path (off: all go to hyper).
pub const ENABLED: bool = true;

/// Largest request head the fast path reads before leaving the request to hyper.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body the fast path takes (it keeps the whole request, so a request that could
/// not be sent on an idle pooled stream can be sent again on a new one).
pub const MAX_BODY: usize = 64 * 1024;
/// Headers per head the fast path takes.
const MAX_HEADERS: usize = 100;
/// A connection's response buffers are kept between requests up to this size.
const KEEP_BUF: usize = 128 * 1024;
/// Response bytes gathered before a write to the visitor.
const OUT_FLUSH: usize = 64 * 1024;

// ---- the pool of idle upstream streams -------------------------------------------------------

struct IdleStream {
    stream: TunnelStream,
    since: Instant,
}

#[derive(Default)]
struct RawPool {
    idle: HashMap<InstanceId, Vec<IdleStream>>,
    draining: HashSet<InstanceId>,
}

/// Keyed by instance id (random, unique), so servers sharing a process (tests) never mix.
fn pool() -> std::sync::MutexGuard<'static, RawPool> {
    static POOL: OnceLock<Mutex<RawPool>> = OnceLock::new();
    POOL.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn take(id: &InstanceId) -> Option<TunnelStream> {
    let mut p = pool();
    let list = p.idle.get_mut(id)?;
    while let Some(idle) = list.pop() {
        if idle.stream.is_reusable() && idle.since.elapsed() < POOL_IDLE {
            return Some(idle.stream);
        }
    }
    None
}

fn put(id: InstanceId, stream: TunnelStream) {
    let mut p = pool();
    if p.draining.contains(&id) || !stream.is_reusable() {
        return; // dropped: the stream closes (and the old child of a restart can go)
    }
    let list = p.idle.entry(id).or_default();
    if list.len() >= POOL_PER_INSTANCE {
        // Only when full: each check takes the stream's lock.
        list.retain(|i| i.stream.is_reusable());
    }
    if list.len() < POOL_PER_INSTANCE {
        list.push(IdleStream {
            stream,
            since: Instant::now(),
        });
    }
}

/// The instance's child state changed (see [`super::Pool::note_state`]): while it restarts no
/// stream to it stays idle.
pub fn note_state(id: &InstanceId, restarting: bool) {
    let dropped = {
        let mut p = pool();
        if restarting {
            p.draining.insert(*id);
            p.idle.remove(id)
        } else {
            p.draining.remove(id);
            None
        }
    };
    drop(dropped); // outside the lock: dropping streams takes the mux's
}

/// The instance's connection is gone.
pub fn forget(id: &InstanceId) {
    let dropped = {
        let mut p = pool();
        p.draining.remove(id);
        p.idle.remove(id)
    };
    drop(dropped);
}

// ---- heads -------------------------------------------------------------------------------------

/// Where the head ends (the index after its blank line), if it is all here.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn is_token(b: &[u8]) -> bool {
    !b.is_empty()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// `(name, value)` of each header line of a head (after its first line), value trimmed; `None`
/// when a line is not a plain `name: value` (obs-fold, bare LF, control bytes), or too many.
fn headers(lines: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut out = Vec::with_capacity(16);
    for line in lines.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r")?;
        if line.is_empty() {
            break;
        }
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if !is_token(name) || value.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f) {
            return None;
        }
        out.push((name, value));
        if out.len() > MAX_HEADERS {
            return None;
        }
    }
    Some(out)
}

fn comma_has(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Hop-by-hop names (RFC 9110 §7.6.1) plus the replica hop's, never forwarded either way.
fn is_hop(name: &[u8], listed: &[&[u8]]) -> bool {
    const HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "expect",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        || name.eq_ignore_ascii_case(super::peer::HOP_HEADER.as_bytes())
        || name.eq_ignore_ascii_case(super::peer::HOP_CLIENT_HEADER.as_bytes())
        || name.eq_ignore_ascii_case(super::peer::HOP_PROTO_HEADER.as_bytes())
        || listed.iter().any(|l| name.eq_ignore_ascii_case(l))
}

/// Names a Connection header lists (hop-by-hop too) — except the framing headers
/// (Content-Length, Transfer-Encoding) and Host: the body is passed on as it was framed, so
/// removing its framing because `Connection` named it would let the bytes of one request (or
/// response) be read as two (request smuggling; tests/it/ingress_fastpath.rs).
fn listed<'a>(hs: &[(&'a [u8], &'a [u8])]) -> Vec<&'a [u8]> {
    hs.iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"content-length")
                && !t.eq_ignore_ascii_case(b"transfer-encoding")
                && !t.eq_ignore_ascii_case(b"host")
        })
        .collect()
}

/// A request the fast path takes, rewritten for the app.
struct Request {
    /// Head and body as the app gets them.
    bytes: Vec<u8>,
    /// Bytes of the visitor's buffer this request used.
    used: usize,
    head: bool,
    close: bool,
    /// GET, HEAD, OPTIONS, TRACE, PUT, DELETE (RFC 9110 §9.2.2): may be sent again when a pooled
    /// stream fails before any answer.
    idempotent: bool,
    app: String,
    instance: InstanceId,
}

enum Parsed {
    /// More bytes are needed (the body is not all here).
    More,
    /// Not for the fast path: hyper serves the rest of the connection.
    Fallback,
    Ok(Request),
}

async fn parse_request(shared: &Arc<Shared>, peer: SocketAddr, buf: &[u8], end: usize) -> Parsed {
    let head = &buf[..end];
    let Some(nl) = head.iter().position(|&b| b == b'\n') else {
        return Parsed::Fallback;
    };
    let Some(line) = head[..nl].strip_suffix(b"\r") else {
        return Parsed::Fallback;
    };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Fallback;
    };
    if version != b"HTTP/1.1"
        || !is_token(method)
        || !target.starts_with(b"/")
        || target.iter().any(|&c| c <= b' ' || c == 0x7f)
    {
        return Parsed::Fallback;
    }
    let Some(hs) = headers(&head[nl + 1..]) else {
        return Parsed::Fallback;
    };
    let mut host = None;
    let mut length: Option<usize> = None;
    let mut close = false;
    let mut authorization = None;
    let mut xff: Option<&[u8]> = None;
    for &(n, v) in &hs {
        if n.eq_ignore_ascii_case(b"host") {
            if host.replace(v).is_some() {
                return Parsed::Fallback; // two: hyper answers 400
            }
        } else if n.eq_ignore_ascii_case(b"content-length") {
            let Some(len) = std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|s| s.parse::<usize>().ok())
            else {
                return Parsed::Fallback;
            };
            if length.replace(len).is_some_and(|l| l != len) {
                return Parsed::Fallback;
            }
        } else if n.eq_ignore_ascii_case(b"transfer-encoding")
            || n.eq_ignore_ascii_case(b"upgrade")
            || n.eq_ignore_ascii_case(b"expect")
        {
            return Parsed::Fallback;
        } else if n.eq_ignore_ascii_case(b"connection") {
            if comma_has(v, "upgrade") {
                return Parsed::Fallback;
            }
            close |= comma_has(v, "close");
        } else if n.eq_ignore_ascii_case(b"authorization") {
            if authorization.replace(v).is_some() {
                return Parsed::Fallback;
            }
        } else if n.eq_ignore_ascii_case(b"x-forwarded-for") && xff.is_none() {
            xff = Some(v);
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY {
        return Parsed::Fallback;
    }
    let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
        return Parsed::Fallback;
    };
    if buf.len() < end + length {
        return Parsed::More;
    }
    let HostRoute::Label(label) = route(shared, host) else {
        return Parsed::Fallback;
    };
    let Ok(Some((app, prefix))) = super::resolve(shared, &label).await else {
        return Parsed::Fallback;
    };
    let authorization = match authorization.map(std::str::from_utf8) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => return Parsed::Fallback,
    };
    let strip = match shared.urlauth.decide(&app, peer.ip(), authorization).await {
        Ok(Decision::Allow { strip }) => strip,
        _ => return Parsed::Fallback,
    };
    // No instance here: the replica hop or the error pages.
    let Ok(instance) = shared.mux.pick_url(&app, prefix.as_deref()) else {
        return Parsed::Fallback;
    };

    // ---- the request for the app ----
    let listed = listed(&hs);
    let mut out = Vec::with_capacity(end + length + 128);
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for &(n, v) in &hs {
        if is_hop(n, &listed)
            || n.eq_ignore_ascii_case(b"host")
            || n.eq_ignore_ascii_case(b"x-forwarded-for")
            || n.eq_ignore_ascii_case(b"x-forwarded-proto")
            || n.eq_ignore_ascii_case(b"x-forwarded-host")
            || (strip && n.eq_ignore_ascii_case(b"authorization"))
        {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = xff.filter(|p| !p.is_empty()) {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.ip().to_string().as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&buf[end..end + length]);
    Parsed::Ok(Request {
        bytes: out,
        used: end + length,
        head: method == b"HEAD",
        close,
        idempotent: matches!(
            method,
            b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
        ),
        app,
        instance,
    })
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// At the end of the upstream stream (the visitor connection closes after it).
    Eof,
}

/// A response head rewritten for the visitor, and its body's framing; `None` if malformed.
/// `upstream_close`: the app ends its connection after this response.
struct ResponseHead {
    bytes: Vec<u8>,
    status: u16,
    framing: Framing,
    upstream_close: bool,
}

fn parse_response(head: &[u8], request_head: bool, visitor_close: bool) -> Option<ResponseHead> {
    let nl = head.iter().position(|&b| b == b'\n')?;
    let line = head[..nl].strip_suffix(b"\r")?;
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (minor, rest) = rest.split_first()?;
    // "HTTP/1.x SP 3DIGIT [SP reason]" (RFC 9112 §4): exactly three digits.
    if !matches!(minor, b'0' | b'1')
        || rest.first() != Some(&b' ')
        || rest.len() < 4
        || !rest[1..4].iter().all(u8::is_ascii_digit)
        || rest.get(4).is_some_and(|&b| b != b' ')
    {
        return None;
    }
    let status: u16 = std::str::from_utf8(&rest[1..4]).ok()?.parse().ok()?;
    if !(100..600).contains(&status) {
        return None;
    }
    let hs = headers(&head[nl + 1..])?;
    let listed = listed(&hs);
    let mut length = None;
    let mut chunked = None;
    let mut upstream_close = *minor == b'0';
    for &(n, v) in &hs {
        if n.eq_ignore_ascii_case(b"content-length") {
            // 1*DIGIT only (a `+` or a sign would parse as a number).
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let l: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
            if length.replace(l).is_some_and(|p| p != l) {
                return None;
            }
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = v.rsplit(|&b| b == b',').next().unwrap_or(v).trim_ascii();
            chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if n.eq_ignore_ascii_case(b"connection") {
            if comma_has(v, "close") {
                upstream_close = true;
            } else if *minor == b'0' && comma_has(v, "keep-alive") {
                upstream_close = false;
            }
        }
    }
    let framing = if request_head || status < 200 || status == 204 || status == 304 {
        Framing::None
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) | (None, None) => Framing::Eof,
            (None, Some(l)) => Framing::Length(l),
        }
    };
    if framing == Framing::Eof {
        upstream_close = true;
    }
    let mut out = Vec::with_capacity(head.len() + 32);
    out.extend_from_slice(b"HTTP/1.1");
    out.extend_from_slice(&rest[..rest.len()]);
    out.extend_from_slice(b"\r\n");
    for &(n, v) in &hs {
        // Transfer-Encoding describes the bytes we pass on as they are (unlike hyper, which
        // re-frames): kept, and Content-Length beside it dropped (RFC 9112 §6.3).
        let te = n.eq_ignore_ascii_case(b"transfer-encoding");
        if (is_hop(n, &listed) && !te)
            || (chunked.is_some() && n.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if status >= 200 && (visitor_close || framing == Framing::Eof) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(ResponseHead {
        bytes: out,
        status,
        framing,
        upstream_close,
    })
}

// ---- the connection ----------------------------------------------------------------------------

/// A visitor connection's socket with bytes already read put back in front (for the hyper path).
struct Rewind {
    pre: Vec<u8>,
    off: usize,
    tcp: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.off < self.pre.len() {
            let n = (self.pre.len() - self.off).min(buf.remaining());
            let off = self.off;
            buf.put_slice(&self.pre[off..off + n]);
            self.off += n;
            if self.off == self.pre.len() {
                self.pre = Vec::new();
                self.off = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The hyper path for the rest of a visitor connection.
async fn fallback(shared: Arc<Shared>, tcp: TcpStream, pre: Vec<u8>, peer: SocketAddr) {
    let shutdown = shared.shutdown.clone();
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        async move {
            if let Some(resp) = super::redirect(&shared, &req) {
                return Ok(resp);
            }
            Ok::<_, std::convert::Infallible>(super::handle(&shared, peer, req).await)
        }
    });
    let io = Rewind { pre, off: 0, tcp };
    if let Err(e) = serve_http(TokioIo::new(io), service, shutdown).await {
        tracing::debug!(%peer, error = %e, "ingress connection error");
    }
}

/// An error page of the ingress (the hyper path's, serialised): without its body for a HEAD
/// request (the Content-Length still the body's, RFC 9110 §9.3.2), and with `connection: close`
/// when the visitor asked for it.
async fn page_bytes(
    req: &Request,
    status: StatusCode,
    code: &'static str,
    title: &str,
    detail: &str,
) -> Vec<u8> {
    let resp = super::page(status, code, title, detail);
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (n, v) in &parts.headers {
        out.extend_from_slice(n.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if req.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    if !req.head {
        out.extend_from_slice(&body);
    }
    out
}

/// Serves a plain-listener visitor connection: the fast path, or hyper for what it does not
/// take (see the module doc).
pub async fn serve_conn(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    if shared.https.redirect {
        return fallback(shared, tcp, Vec::new(), peer).await;
    }
    let mut shutdown = shared.shutdown.clone();
    let mut conn = Conn {
        tcp: Some(tcp),
        buf: Vec::with_capacity(4096),
        rbuf: Vec::new(),
        out: Vec::new(),
        answered: None,
        counted: None,
    };
    let handed = tokio::select! {
        r = conn.run(&shared, peer) => r,
        // Like the hyper path: in-flight requests get the drain time, then the connection goes.
        _ = async {
            wait_shutdown(&mut shutdown).await;
            tokio::time::sleep(crate::server::transport::DRAIN_TIMEOUT).await
        } => None,
    };
    if let Some(tcp) = handed {
        fallback(shared, tcp, std::mem::take(&mut conn.buf), peer).await;
    }
}

struct Conn {
    tcp: Option<TcpStream>,
    /// Visitor bytes read and not yet used.
    buf: Vec<u8>,
    /// The upstream bytes and the visitor-bound bytes of a response, kept between requests.
    rbuf: Vec<u8>,
    out: Vec<u8>,
    /// The status the current request was answered with, and when its head was ready.
    answered: Option<(u16, Instant)>,
    /// The metrics of the app this connection's requests went to, looked up once.
    counted: Option<AppCounters>,
}

/// One app's series of the ingress metrics, held by a visitor connection so a request costs no
/// family lookup (a visitor's requests are for one app, save for a rare change of Host, and use
/// a handful of statuses).
struct AppCounters {
    app: String,
    duration: prometheus_client::metrics::histogram::Histogram,
    statuses: Vec<(u16, prometheus_client::metrics::counter::Counter)>,
}

impl AppCounters {
    fn new(app: &str) -> Self {
        AppCounters {
            app: app.to_string(),
            duration: metrics()
                .ingress_request_duration_seconds
                .get_or_create(&AppLabel::new(app))
                .clone(),
            statuses: Vec::new(),
        }
    }

    fn count(&mut self, status: u16, took: std::time::Duration) {
        self.duration.observe(took.as_secs_f64());
        if let Some((_, c)) = self.statuses.iter().find(|(s, _)| *s == status) {
            c.inc();
            return;
        }
        let c = metrics()
            .ingress_requests
            .get_or_create(&AppStatus {
                app: self.app.clone(),
                status,
            })
            .clone();
        c.inc();
        self.statuses.push((status, c));
    }
}

/// What became of one request.
enum Outcome {
    /// Answered; the visitor connection may carry another.
    KeepAlive,
    /// Answered (or failed); close the visitor connection.
    Close,
}

impl Conn {
    /// Serves requests until the visitor is done (None) or one is for the hyper path (the socket,
    /// with the bytes in `buf`).
    async fn run(&mut self, shared: &Arc<Shared>, peer: SocketAddr) -> Option<TcpStream> {
        let mut shutdown = shared.shutdown.clone();
        loop {
            // ---- a whole request ----
            let deadline =
                tokio::time::Instant::now() + crate::server::transport::HEADER_READ_TIMEOUT;
            let req = loop {
                if let Some(end) = head_end(&self.buf) {
                    match parse_request(shared, peer, &self.buf, end).await {
                        Parsed::Ok(r) => break r,
                        Parsed::Fallback => return self.tcp.take(),
                        Parsed::More => {}
                    }
                } else if self.buf.len() > MAX_HEAD {
                    return self.tcp.take();
                }
                let tcp = self.tcp.as_mut()?;
                if self.buf.capacity() - self.buf.len() < 2048 {
                    self.buf.reserve(8192);
                }
                let idle = self.buf.is_empty();
                let n = tokio::select! {
                    r = tcp.read_buf(&mut self.buf) => r.ok()?,
                    _ = tokio::time::sleep_until(deadline) => return None,
                    _ = wait_shutdown(&mut shutdown), if idle => return None,
                };
                if n == 0 {
                    return None;
                }
            };
            self.buf.drain(..req.used);
            match self.forward(shared, peer, req).await {
                Outcome::KeepAlive => {}
                Outcome::Close => return None,
            }
        }
    }

    /// Writes an answer of the ingress's own; `close`: the visitor asked for the connection to
    /// end after it.
    async fn reply(&mut self, bytes: &[u8], close: bool) -> Outcome {
        let Some(tcp) = self.tcp.as_mut() else {
            return Outcome::Close;
        };
        match tcp.write_all(bytes).await {
            Ok(()) if close => {
                let _ = tcp.shutdown().await;
                Outcome::Close
            }
            Ok(()) => Outcome::KeepAlive,
            Err(_) => Outcome::Close,
        }
    }

    /// Answers `req` with an error page of the ingress, recorded as its status.
    async fn error_page(
        &mut self,
        req: &Request,
        status: StatusCode,
        code: &'static str,
        title: &str,
        detail: &str,
    ) -> Outcome {
        self.answered = Some((status.as_u16(), Instant::now()));
        let page = page_bytes(req, status, code, title, detail).await;
        self.reply(&page, req.close).await
    }

    /// Sends `req` to an instance of its app and the response back.
    async fn forward(&mut self, shared: &Arc<Shared>, peer: SocketAddr, req: Request) -> Outcome {
        let start = Instant::now();
        self.answered = None;
        let instance = req.instance;
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let outcome = self
            .exchange(shared, peer, &req, instance, &mut rbuf, &mut out)
            .await;
        if let Some((status, head_at)) = self.answered.take() {
            let counted = match &mut self.counted {
                Some(c) if c.app == req.app => c,
                other => other.insert(AppCounters::new(&req.app)),
            };
            counted.count(status, head_at.saturating_duration_since(start));
        }
        // Kept for the next request unless a big response grew them.
        if rbuf.capacity() <= KEEP_BUF && out.capacity() <= KEEP_BUF {
            rbuf.clear();
            (self.rbuf, self.out) = (rbuf, out);
        }
        outcome
    }

    async fn exchange(
        &mut self,
        shared: &Arc<Shared>,
        peer: SocketAddr,
        req: &Request,
        instance: InstanceId,
        rbuf: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let app = &req.app;
        let timeout = shared.ingress_timeout;
        let mut pooled = take(&instance);
        // ---- send, and wait for the response head (once more on a new stream when an idle
        // pooled one turns out closed before answering) ----
        let (mut up, head) = loop {
            let fresh = pooled.is_none();
            let mut up = match pooled.take() {
                Some(s) => s,
                None => match shared.mux.open_stream_on(instance, &peer.to_string()) {
                    Some(s) => s,
                    None => {
                        let detail = format!("The instance of {app} went away; reload.");
                        return self
                            .error_page(
                                req,
                                StatusCode::BAD_GATEWAY,
                                "no-instance",
                                "No instance available",
                                &detail,
                            )
                            .await;
                    }
                },
            };
            let probe = up.probe();
            rbuf.clear();
            // Whether the request was handed to the stream (the app may have got it).
            let mut sent = false;
            let result: io::Result<Option<usize>> = async {
                up.write_all(&req.bytes).await?;
                sent = true;
                loop {
                    if let Some(end) = head_end(rbuf) {
                        return Ok(Some(end));
                    }
                    if rbuf.len() > 64 * 1024 {
                        return Err(io::Error::other("the app's response head is too large"));
                    }
                    rbuf.reserve(16 * 1024);
                    let deadline = probe.last_activity() + timeout;
                    tokio::select! {
                        r = up.read_buf(rbuf) => {
                            if r? == 0 {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "the app closed the connection without answering",
                                ));
                            }
                        }
                        _ = tokio::time::sleep_until(deadline) => {
                            if probe.last_activity() + timeout <= tokio::time::Instant::now() {
                                return Ok(None);
                            }
                        }
                    }
                }
            }
            .await;
            match result {
                Ok(Some(end)) => break (up, end),
                Ok(None) => {
                    tracing::info!(app, stream = up.id(), "the app did not answer in time");
                    return self
                        .error_page(
                            req,
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            "The app did not answer",
                            &format!("App {app} did not answer within {timeout:?}."),
                        )
                        .await;
                }
                // A pooled stream that failed before any answer was most likely closed by the
                // app while idle: the request again on a new stream — unless the app may have
                // got it and it is not idempotent (a POST is never sent twice; RFC 9112 §9.3.1).
                Err(_) if !fresh && rbuf.is_empty() && (!sent || req.idempotent) => continue,
                Err(e) => {
                    let why = probe.error().unwrap_or_else(|| e.to_string());
                    tracing::debug!(app, stream = up.id(), error = why, "ingress request failed");
                    return self
                        .error_page(
                            req,
                            StatusCode::BAD_GATEWAY,
                            "bad-gateway",
                            "Bad gateway",
                            &format!("App {app} could not be reached: {why}"),
                        )
                        .await;
                }
            }
        };
        // ---- the response ----
        let mut head = head;
        let resp = loop {
            let Some(resp) = parse_response(&rbuf[..head], req.head, req.close) else {
                let detail = format!("App {app} sent a response that is not valid HTTP/1.1.");
                let answered = self
                    .error_page(
                        req,
                        StatusCode::BAD_GATEWAY,
                        "bad-gateway",
                        "Bad gateway",
                        &detail,
                    )
                    .await;
                return match answered {
                    Outcome::KeepAlive if out.is_empty() => Outcome::KeepAlive,
                    _ => Outcome::Close,
                };
            };
            rbuf.drain(..head);
            out.extend_from_slice(&resp.bytes);
            if resp.status >= 200 {
                self.answered = Some((resp.status, Instant::now()));
                break resp;
            }
            if resp.status == 101 {
                // We never forward Upgrade, so the app has no business switching.
                return Outcome::Close;
            }
            // 1xx interim (e.g. 103): passed on, the final head follows.
            head = loop {
                if let Some(end) = head_end(rbuf) {
                    break end;
                }
                rbuf.reserve(16 * 1024);
                match up.read_buf(rbuf).await {
                    Ok(n) if n > 0 => {}
                    _ => return Outcome::Close,
                }
            };
        };
        let Some(tcp) = self.tcp.as_mut() else {
            return Outcome::Close;
        };
        let done = copy_body(&mut up, rbuf, out, tcp, resp.framing).await;
        match done {
            Ok(()) => {
                if !resp.upstream_close && rbuf.is_empty() {
                    put(instance, up);
                }
                if req.close || resp.framing == Framing::Eof {
                    let _ = tcp.shutdown().await;
                    Outcome::Close
                } else {
                    Outcome::KeepAlive
                }
            }
            Err(e) => {
                tracing::debug!(app, stream = up.id(), error = %e, "ingress response failed");
                Outcome::Close
            }
        }
    }
}

/// Reads more of the upstream response into `rbuf`, writing what is gathered in `out` to the
/// visitor first (so nothing waits behind a slow app). EOF is an error unless `eof_ok`.
async fn fill(
    up: &mut TunnelStream,
    rbuf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    tcp: &mut TcpStream,
    eof_ok: bool,
) -> io::Result<usize> {
    if !out.is_empty() {
        tcp.write_all(out).await?;
        out.clear();
    }
    rbuf.reserve(16 * 1024);
    let n = up.read_buf(rbuf).await?;
    if n == 0 && !eof_ok {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the app closed the connection in the middle of a response",
        ));
    }
    Ok(n)
}

/// Moves `n` bytes from the front of `rbuf` to `out`, flushing `out` when it is large.
async fn pass(
    rbuf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    tcp: &mut TcpStream,
    n: usize,
) -> io::Result<()> {
    out.extend_from_slice(&rbuf[..n]);
    rbuf.drain(..n);
    if out.len() >= OUT_FLUSH {
        tcp.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Copies a response body of `framing` from the upstream stream (what is already in `rbuf`
/// first) to the visitor, after the head in `out`. On success `rbuf` holds what the app sent
/// beyond the response (nothing, from a well-behaved app).
async fn copy_body(
    up: &mut TunnelStream,
    rbuf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    tcp: &mut TcpStream,
    framing: Framing,
) -> io::Result<()> {
    match framing {
        Framing::None => {}
        Framing::Length(mut left) => loop {
            let n = (rbuf.len() as u64).min(left) as usize;
            pass(rbuf, out, tcp, n).await?;
            left -= n as u64;
            if left == 0 {
                break;
            }
            fill(up, rbuf, out, tcp, false).await?;
        },
        Framing::Eof => loop {
            let n = rbuf.len();
            pass(rbuf, out, tcp, n).await?;
            if fill(up, rbuf, out, tcp, true).await? == 0 {
                break;
            }
        },
        Framing::Chunked => loop {
            // The chunk-size line.
            let nl = loop {
                if let Some(i) = rbuf.iter().position(|&b| b == b'\n') {
                    break i;
                }
                if rbuf.len() > 4096 {
                    return Err(io::Error::other("a chunk-size line is too long"));
                }
                fill(up, rbuf, out, tcp, false).await?;
            };
            let line = &rbuf[..nl];
            let hex = line
                .split(|&b| b == b';')
                .next()
                .unwrap_or(line)
                .trim_ascii();
            let size = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or_else(|| io::Error::other("a malformed chunk size"))?;
            pass(rbuf, out, tcp, nl + 1).await?;
            if size == 0 {
                // Trailer lines up to an empty one.
                loop {
                    let nl = loop {
                        if let Some(i) = rbuf.iter().position(|&b| b == b'\n') {
                            break i;
                        }
                        if rbuf.len() > 16 * 1024 {
                            return Err(io::Error::other("the trailers are too long"));
                        }
                        fill(up, rbuf, out, tcp, false).await?;
                    };
                    let empty = rbuf[..nl]
                        .strip_suffix(b"\r")
                        .unwrap_or(&rbuf[..nl])
                        .is_empty();
                    pass(rbuf, out, tcp, nl + 1).await?;
                    if empty {
                        break;
                    }
                }
                break;
            }
            // The data and its CRLF.
            let mut left = size + 2;
            while left > 0 {
                if rbuf.is_empty() {
                    fill(up, rbuf, out, tcp, false).await?;
                }
                let n = (rbuf.len() as u64).min(left) as usize;
                pass(rbuf, out, tcp, n).await?;
                left -= n as u64;
            }
        },
    }
    if !out.is_empty() {
        tcp.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_are_rewritten_and_framed() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-p\r\nx-p: 1\r\nKeep-Alive: timeout=5\r\nx-kept: 1\r\n\r\n",
            false,
            false,
        )
        .unwrap();
        assert_eq!(r.framing, Framing::Length(5));
        assert!(!r.upstream_close);
        assert_eq!(
            r.bytes,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nx-kept: 1\r\n\r\n".to_vec()
        );
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
            true,
        )
        .unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert_eq!(
            r.bytes,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n".to_vec()
        );
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", false, false).unwrap();
        assert_eq!(r.framing, Framing::Eof);
        assert!(r.upstream_close);
        assert!(r.bytes.ends_with(b"connection: close\r\n\r\n"));
        let r = parse_response(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
            false,
        )
        .unwrap();
        assert_eq!(r.framing, Framing::None);
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false).unwrap();
        assert_eq!(r.framing, Framing::None);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n", false, false).is_none());
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                false
            )
            .is_none()
        );
        assert!(parse_response(b"HTTP/2 200 OK\r\n\r\n", false, false).is_none());
    }

    #[test]
    fn plain_heads_only() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nxx"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        let hs = headers(b"Host: a\r\nX-A:  b c \r\n\r\n").unwrap();
        assert_eq!(
            hs,
            vec![(&b"Host"[..], &b"a"[..]), (&b"X-A"[..], &b"b c"[..])]
        );
        assert!(headers(b"Host: a\nX: b\r\n\r\n").is_none(), "bare LF");
        assert!(headers(b"Bad Name: a\r\n\r\n").is_none());
        assert!(headers(b"X: a\x01\r\n\r\n").is_none());
        let l = listed(&[(&b"Connection"[..], &b"close, X-Private"[..])]);
        assert!(
            is_hop(b"x-private", &l)
                && is_hop(b"TE", &l)
                && is_hop(b"x-waypost-hop", &l)
                && is_hop(b"X-Waypost-Hop-Proto", &l)
        );
        assert!(!is_hop(b"x-kept", &l));
    }
}
