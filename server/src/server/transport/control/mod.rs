//! The control listener: TLS 1.3 + ALPN `waypost/1`, then length-prefixed frames (the
//! `waypost-proto` codec). One task per connection reads and dispatches frames; one writer task
//! per connection drains its outgoing queue, so any part of the server can push a frame to an
//! instance through the live registry.
//!
//! The protocol itself (Hello admission, frame dispatch, the silence deadline) is the sans-IO
//! [`session::ControlSession`]; this module does its I/O: TLS, frames in and out, the store and
//! registry calls its actions ask for.
//!
//! Before a Hello is admitted a connection is cheap and short-lived: it counts against caps per
//! source address and in total (checked at accept, before any TLS work), has one deadline for
//! the handshake and the Hello together, and may send a first frame of a few KiB only. An
//! admitted Hello gets its instance id only if the id is new or already its owner's (same app,
//! deployment and token; see `claim`): instance ids cannot move between apps.

pub mod session;

pub use session::FIRST_FRAME_CAP;
use session::{Action, Claim, ClaimError, ControlSession, End, REJECT_RETRY_MS, Rejected};

use crate::server::model::metrics::{self, AppLabel, GaugeGuard, metrics};
use crate::server::model::{Labels, labels};
use crate::server::service::mux::Queued;
use crate::server::service::{auth, mux};
use crate::server::store;
use crate::server::transport::{Shared, accept};
use crate::util;
use anyhow::{Context as _, Result};
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use waypost_proto::{self as proto, Frame, Kind, MAX_FRAME, RecvBuf, reject::Reason};

/// Connections accepted but not yet admitted (TLS handshake in flight, or waiting for / checking
/// the Hello), per source address (an IPv6 /64 counts as one address) and in total. Beyond either
/// cap a new connection is closed at once, before any TLS work; a real entrypoint backs off and
/// retries.
///
/// Cost of one such connection, at worst (TLS done, a first frame of [`FIRST_FRAME_CAP`] bytes
/// announced and all but its last byte sent): its task, the TLS state (rustls holds at most one
/// 16 KiB record being decrypted plus the decrypted bytes not read yet), the frame buffer (at
/// most `FIRST_FRAME_CAP` plus its prefix) and the idle writer task with its queue — measured at
/// about 40 KB of server RSS each (1,024 of them: +39 MB; the security tests measure it). So all
/// unauthenticated connections together cost at most ~40 MB, each for at most
/// [`session::PREAUTH_TIMEOUT`]; before these caps 150 clients sending half of a 1 MiB first frame cost
/// 83 MB, and more clients cost more without bound.
///
/// The caps do not keep a fleet out: entrypoints reconnecting after a server restart arrive
/// spread over their jittered backoff, and those refused in a burst come back one backoff step
/// later, while the ones let in get the CPU the refused handshakes would have taken. (Measured
/// with `waypost bench fleet`: 10,000 instances, 5,000 per source address, all reconnected after a
/// restart, sooner than without the caps on a loaded 2-core machine.) 256 per address still
/// lets many entrypoints behind one NAT address connect at once.
pub const PREAUTH_PER_ADDR: usize = 256;
pub const PREAUTH_TOTAL: usize = 1024;
/// A refused connection is logged at debug; a summary at warn at most this often.
const PREAUTH_WARN_EVERY: Duration = Duration::from_secs(10);
/// Outgoing frames queued per connection before senders wait (or, for Pong, the connection is
/// dropped: a peer that does not read its Pongs is broken).
const OUT_QUEUE: usize = 64;
/// Bytes asked of the socket per read when no larger frame is pending. Small, because every idle
/// connection keeps a buffer this big (10,000 instances × 4 KiB = 40 MiB); a large frame sizes
/// the buffer from its checked length prefix instead, and the buffer shrinks back after it (see
/// `waypost_proto::RecvBuf`).
const READ_CHUNK: usize = 4 * 1024;
/// Queued frames coalesced into one TLS write, at most this many bytes (plus one frame).
const WRITE_BATCH: usize = 64 * 1024;
/// The writer's encode buffer is dropped after a batch that grew it past this (a big frame), so
/// 10,000 idle instances do not each keep a 1 MiB buffer.
const SHRINK_ABOVE: usize = 64 * 1024;
/// How long the writer may take to flush queued frames (e.g. a Reject) when a connection closes.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads frames from a byte stream with one bounded buffer: the protocol's sans-IO
/// [`RecvBuf`] driven by async reads.
pub struct FrameReader<R> {
    rd: R,
    buf: RecvBuf,
    /// Largest frame body this reader accepts: [`MAX_FRAME`], or less while the peer is not
    /// authenticated (see [`FrameReader::set_cap`]).
    cap: usize,
    /// Length on the wire (prefix included) of the last frame returned.
    last_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(rd: R) -> Self {
        FrameReader {
            rd,
            buf: RecvBuf::new(),
            cap: MAX_FRAME,
            last_len: 0,
        }
    }

    /// Length on the wire (prefix included) of the frame [`FrameReader::next`] returned last.
    pub fn last_len(&self) -> usize {
        self.last_len
    }

    /// Limits the frames read from now on to `max_frame` bytes of body (at most [`MAX_FRAME`]):
    /// a frame announcing more is an error as soon as its length prefix is read, without reading
    /// or allocating for its body. For the first frame of a connection nobody has authenticated.
    pub fn set_cap(&mut self, max_frame: usize) {
        self.cap = max_frame.min(MAX_FRAME);
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames. An error means the
    /// stream is unusable (I/O error, oversized or malformed frame, or EOF mid-frame).
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            // Before every read, so an oversized prefix is refused before its body is read.
            let before = self.buf.pending();
            if let Some(frame) = self.buf.next_frame(self.cap) {
                self.last_len = before - self.buf.pending();
                return Ok(Some(frame?));
            }
            let n = self.rd.read(self.buf.spare(READ_CHUNK)).await?;
            if n == 0 {
                if self.buf.pending() == 0 {
                    return Ok(None);
                }
                anyhow::bail!("connection closed in the middle of a frame");
            }
            self.buf.filled(n);
        }
    }
}

/// Counts a control frame by direction (`in`, `out`) and kind (`waypost_control_frames_total`).
fn count_frame(direction: &'static str, frame: &Frame) {
    let kind = frame.kind.as_ref().map_or("none", Kind::name);
    metrics()
        .control_frames
        .get_or_create(&metrics::FrameLabel { direction, kind })
        .inc();
}

/// A frame read from an instance: counted, with its bytes on the wire.
fn count_in(frame: &Frame, len: usize) {
    count_frame("in", frame);
    FRAME_BYTES_IN.inc_by(len as u64);
}

/// `waypost_control_frame_bytes_total` by direction, looked up once (the family is never
/// cleared, so the handles stay its series).
static FRAME_BYTES_IN: LazyLock<Counter> = LazyLock::new(|| frame_bytes("in"));
static FRAME_BYTES_OUT: LazyLock<Counter> = LazyLock::new(|| frame_bytes("out"));

fn frame_bytes(direction: &'static str) -> Counter {
    metrics()
        .control_frame_bytes
        .get_or_create(&metrics::Direction { direction })
        .clone()
}

/// A connection's handshake outcome (`waypost_control_handshakes_total`), counted once when
/// the handshake phase ends, however it ends: the first outcome set, else `closed`.
struct Handshake(Option<&'static str>);

impl Handshake {
    fn set(&mut self, result: &'static str) {
        self.0.get_or_insert(result);
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let result = self.0.unwrap_or("closed");
        metrics()
            .control_handshakes
            .get_or_create(&metrics::ResultLabel { result })
            .inc();
    }
}

/// Drains `rx` onto the stream, batching whatever is queued into one write, then closes the
/// stream (TLS close_notify + FIN) when every sender is gone.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Queued>,
    // Exec and tunnel frames, written after control frames (see `mux::Lanes`).
    mut lanes: mux::Lanes,
) -> Result<()> {
    // Allocated on first use and shrunk after big frames: idle connections hold almost nothing.
    let mut out = Vec::new();
    while let Some(frame) = lanes.next(&mut rx).await {
        out.clear();
        proto::encode(&frame, &mut out)?;
        count_frame("out", &frame);
        // Let the other tasks that are ready now (ingress requests, exec relays) run first and
        // queue their frames, so a busy connection writes one TLS record for many of them
        // instead of one syscall each. On an idle runtime this returns at once.
        tokio::task::yield_now().await;
        // Coalesce frames that are already queued, up to a bound, into one TLS write.
        while out.len() < WRITE_BATCH {
            match lanes.try_next(&mut rx) {
                Some(f) => {
                    proto::encode(&f, &mut out)?;
                    count_frame("out", &f);
                }
                None => break,
            }
        }
        FRAME_BYTES_OUT.inc_by(out.len() as u64);
        wr.write_all(&out).await?;
        wr.flush().await?;
        if out.capacity() > SHRINK_ABOVE {
            out = Vec::new();
        }
    }
    wr.shutdown().await?;
    Ok(())
}

/// Counts connections that are not authenticated yet, per source address and in total (see
/// [`PREAUTH_PER_ADDR`]).
struct PreAuthLimits {
    per_addr_cap: usize,
    total_cap: usize,
    counts: Mutex<PreAuthCounts>,
}

#[derive(Default)]
struct PreAuthCounts {
    total: usize,
    /// Only addresses with a count above zero: at most `total_cap` entries.
    per_addr: HashMap<IpAddr, usize>,
    /// Refused since the last warning, and when that was.
    refused: u64,
    last_warn: Option<std::time::Instant>,
}

/// One unauthenticated connection's place under the caps; given back on drop.
struct PreAuthPermit {
    limits: Arc<PreAuthLimits>,
    addr: IpAddr,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreAuthFull {
    Addr,
    Total,
}

/// The address a cap counts: IPv4 (also when mapped into IPv6) as it is; IPv6 by its /64, since
/// one host is usually given a whole /64.
fn preauth_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

impl PreAuthLimits {
    fn new(per_addr_cap: usize, total_cap: usize) -> Arc<Self> {
        Arc::new(PreAuthLimits {
            per_addr_cap,
            total_cap,
            counts: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PreAuthCounts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<PreAuthPermit, PreAuthFull> {
        let addr = preauth_key(ip);
        let mut c = self.lock();
        if c.total >= self.total_cap {
            return Err(PreAuthFull::Total);
        }
        if c.per_addr.get(&addr).copied().unwrap_or(0) >= self.per_addr_cap {
            return Err(PreAuthFull::Addr);
        }
        *c.per_addr.entry(addr).or_insert(0) += 1;
        c.total += 1;
        Ok(PreAuthPermit {
            limits: self.clone(),
            addr,
        })
    }

    /// Counts a refusal. Some(refusals since the last warning) when it is time for another one.
    fn note_refused(&self, now: std::time::Instant) -> Option<u64> {
        let mut c = self.lock();
        c.refused += 1;
        if c.last_warn
            .is_some_and(|t| now.duration_since(t) < PREAUTH_WARN_EVERY)
        {
            return None;
        }
        c.last_warn = Some(now);
        Some(std::mem::take(&mut c.refused))
    }
}

impl Drop for PreAuthPermit {
    fn drop(&mut self) {
        let mut c = self.limits.lock();
        c.total -= 1;
        if let Some(n) = c.per_addr.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                c.per_addr.remove(&self.addr);
            }
        }
    }
}

/// Accepts control connections until shutdown.
/// `done` is held by every connection task: the caller knows all have ended when the last
/// clone is dropped.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    done: mpsc::Sender<()>,
) {
    let mut shutdown = shared.shutdown.clone();
    let limits = PreAuthLimits::new(PREAUTH_PER_ADDR, PREAUTH_TOTAL);
    loop {
        let Some((tcp, peer)) = accept(&listener, &mut shutdown, "control").await else {
            break;
        };
        metrics().control_connections.inc();
        // Before any TLS work: a client that is not authenticated yet gets a place under the
        // caps or nothing at all.
        let permit = match limits.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(full) => {
                let why = match full {
                    PreAuthFull::Addr => "too many unauthenticated connections from this address",
                    PreAuthFull::Total => "too many unauthenticated connections",
                };
                drop(tcp);
                drop(Handshake(Some("refused")));
                tracing::debug!(%peer, reason = why, "refused a control connection");
                if let Some(n) = limits.note_refused(std::time::Instant::now()) {
                    tracing::warn!(
                        %peer,
                        reason = why,
                        refused = n,
                        per_address = PREAUTH_PER_ADDR,
                        total = PREAUTH_TOTAL,
                        "refusing control connections: too many have not authenticated yet"
                    );
                }
                continue;
            }
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _done = done;
            let _open = GaugeGuard::new(&metrics().control_connections_open);
            if let Err(e) = connection(&shared, tcp, peer, acceptor, permit).await {
                tracing::debug!(%peer, error = format!("{e:#}"), "control connection ended");
            }
        });
    }
}

/// The Reject a connection gets when its token is revoked while it is live.
pub fn revoked_goodbye() -> Frame {
    session::reject(Reason::BadToken, "token revoked", REJECT_RETRY_MS)
}

/// One control connection, from TCP accept to close: the I/O of a [`ControlSession`]. `preauth`
/// is its place under the caps on unauthenticated connections, given back once its Hello is
/// admitted (or it ends).
async fn connection(
    shared: &Shared,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: TlsAcceptor,
    preauth: PreAuthPermit,
) -> Result<()> {
    let nonce = i64::from_ne_bytes(auth::random_bytes::<8>());
    let mut cs = ControlSession::new(std::time::Instant::now(), nonce, shared.heartbeat);
    // One deadline for the whole unauthenticated phase, from accept to the Hello.
    let preauth_deadline = Instant::from_std(cs.poll_timeout());
    let mut handshake = Handshake(None);
    let tls = match tokio::time::timeout_at(preauth_deadline, acceptor.accept(tcp)).await {
        Ok(r) => r
            .inspect_err(|_| handshake.set("tls_error"))
            .context("TLS handshake")?,
        Err(_) => {
            handshake.set("timeout");
            anyhow::bail!(
                "TLS handshake not done within {:?}",
                session::PREAUTH_TIMEOUT
            )
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(proto::ALPN) {
        handshake.set("tls_error");
        // rustls already refuses a client that offers only other protocols; this catches one
        // that offers none.
        anyhow::bail!("client did not negotiate ALPN waypost/1");
    }
    let (rd, wr) = tokio::io::split(tls);
    let mut reader = FrameReader::new(rd);
    reader.set_cap(cs.frame_cap());
    let (tx, rx) = mpsc::channel::<Queued>(OUT_QUEUE);
    let (lane_tx, lanes) = mux::lanes();
    let mut writer = tokio::spawn(write_loop(wr, rx, lanes));

    // ---- Hello and admission ----
    let mut kick = None;
    // What was claimed, for the log when the claim is refused.
    let mut claimed = None;
    // The instance's labels: its own from the Hello (read as the frame passes to the session),
    // merged at the claim with its token's, which win (model/labels.rs). Stored on its row and
    // given to the config service with the Welcome.
    let mut hello_labels: Option<Labels> = None;
    let mut token_labels = Labels::new();
    let mut instance_labels = Labels::new();
    let admitted = 'hello: loop {
        while let Some(action) = cs.poll_action() {
            match action {
                Action::LookupToken { hash } => {
                    let scope = shared
                        .store
                        .call(move |c| store::lookup_token_with_labels(c, &hash))
                        .await
                        .map(|found| {
                            found.map(|(scope, l)| {
                                token_labels = l;
                                scope
                            })
                        })
                        .map_err(|e| {
                            tracing::error!(error = format!("{e:#}"), "token lookup failed");
                        });
                    cs.handle_token(scope);
                }
                Action::Claim(c) => {
                    // Invalid labels are the instance's own mistake: dropped, never a refusal.
                    let (own, dropped) =
                        labels::from_hello(hello_labels.as_ref().unwrap_or(&Labels::new()));
                    for problem in dropped {
                        tracing::warn!(
                            instance = c.connected.id,
                            app = c.connected.app,
                            %peer,
                            problem,
                            "dropped an invalid label of an instance (WAYPOST_LABELS)"
                        );
                    }
                    instance_labels = labels::merge(&own, &token_labels);
                    claimed = Some(c.connected.clone());
                    let outcome = claim(shared, c, &instance_labels, &tx)
                        .await
                        .map(|k| kick = Some(k));
                    cs.handle_claim(outcome, std::time::Instant::now());
                }
                Action::Admitted(a) => {
                    handshake.set("ok");
                    break 'hello a;
                }
                Action::Reject { frame, why } => {
                    if let Some(Kind::Reject(r)) = &frame.kind {
                        handshake.set(if r.reason == Reason::BadToken as i32 {
                            "bad_token"
                        } else {
                            "rejected"
                        });
                        let reason = Reason::try_from(r.reason)
                            .map(|r| r.as_str_name())
                            .unwrap_or("?");
                        match &why {
                            Rejected::Admission => tracing::info!(
                                reason,
                                message = r.message,
                                %peer,
                                "rejected an entrypoint"
                            ),
                            Rejected::Conflict => {
                                let c = claimed.as_ref();
                                tracing::warn!(
                                    instance = c.map(|c| c.id.as_str()),
                                    app = c.map(|c| c.app.as_str()),
                                    deployment = c.map(|c| c.deployment.as_str()),
                                    %peer,
                                    message = r.message,
                                    "refused a Hello for an instance id of another owner"
                                )
                            }
                            Rejected::Unavailable | Rejected::NotHello(_) => {}
                        }
                    }
                    let _ = tx.try_send(Box::new(frame));
                    drop(tx);
                    // Let the writer send the Reject and close the stream.
                    let flushed = timeout(CLOSE_FLUSH_TIMEOUT, &mut writer).await.is_ok();
                    if let Rejected::NotHello(kind) = why {
                        anyhow::bail!("first frame was not Hello: {kind}");
                    }
                    if !flushed {
                        writer.abort();
                    }
                    return Ok(());
                }
                Action::Close(End::Failed(why)) => {
                    // The one failure before admission: no Hello in time.
                    handshake.set("timeout");
                    anyhow::bail!(why)
                }
                Action::Close(_) => return Ok(()),
                // Not before admission.
                Action::Reply(_)
                | Action::Touch
                | Action::Status(_)
                | Action::ConfigApplied(_)
                | Action::LogBatch(_)
                | Action::Deliver(_) => {}
            }
        }
        let deadline = Instant::from_std(cs.poll_timeout());
        tokio::select! {
            r = reader.next() => match r.context("before Hello")? {
                Some(frame) => {
                    count_in(&frame, reader.last_len());
                    if let (None, Some(Kind::Hello(h))) = (&hello_labels, &frame.kind) {
                        hello_labels = Some(h.labels.clone());
                    }
                    cs.handle_frame(frame, std::time::Instant::now())
                }
                None => cs.handle_eof(),
            },
            _ = tokio::time::sleep_until(deadline) => cs.handle_timeout(std::time::Instant::now()),
            _ = wait_shutdown(shared) => return Ok(()),
        }
    };
    drop(handshake);
    let kick = kick.context("admitted without a claim")?;
    let session::Admitted {
        id,
        app,
        deployment,
        hello,
    } = admitted;
    let session = cs.nonce();
    let id_hex = util::hex(&id);

    // ---- welcome ----
    // Authenticated: the connection leaves the pre-auth caps, and may send full-size frames.
    drop(preauth);
    reader.set_cap(cs.frame_cap());
    tracing::info!(
        instance = id_hex,
        app,
        deployment,
        hostname = hello.hostname,
        version = hello.entrypoint_version,
        labels = labels::format(&instance_labels),
        %peer,
        "instance connected"
    );
    let welcome = Kind::Welcome(proto::Welcome {
        protocol_version: proto::PROTOCOL_VERSION,
        heartbeat_interval_ms: shared.heartbeat.as_millis().min(u32::MAX as u128) as u32,
        app: app.clone(),
        deployment: deployment.clone(),
        server_version: crate::VERSION.to_string(),
        config: None,
        log_acked_seq: shared.logs.acked_seq(&id).await,
    });
    // With the app's config snapshot, in order with config pushes (see service/config.rs).
    shared
        .config
        .send_welcome(
            &shared.live,
            &tx,
            id,
            session,
            &app,
            &deployment,
            &hello,
            &instance_labels,
            welcome,
        )
        .await;
    // After the Welcome is queued, so no exec/tunnel frame can precede it.
    let disabled = hello.disabled.as_ref();
    shared.mux.attach(id, session, &app, disabled, lane_tx);

    // ---- session loop ----
    let mut writer_done = false;
    // The child's start count as last reported (Status.starts), for `child_restarts`.
    let mut starts = hello.status.as_ref().map_or(0, |s| s.starts);
    let restarts = metrics()
        .child_restarts
        .get_or_create(&AppLabel::new(&app))
        .clone();
    let end: Result<&'static str> = 'run: loop {
        let deadline = Instant::from_std(cs.poll_timeout());
        tokio::select! {
            r = reader.next() => match r {
                Ok(Some(frame)) => {
                    count_in(&frame, reader.last_len());
                    cs.handle_frame(frame, std::time::Instant::now())
                }
                Ok(None) => cs.handle_eof(),
                Err(e) => break Err(e),
            },
            _ = tokio::time::sleep_until(deadline) => cs.handle_timeout(std::time::Instant::now()),
            _ = kick.notified() => break Ok(shared.live.close_reason(&id, session)),
            _ = wait_shutdown(shared) => break Ok("server shutting down"),
            _ = &mut writer, if !writer_done => {
                writer_done = true;
                break Ok("write failed");
            }
        }
        let now_ms = util::now_ms();
        while let Some(action) = cs.poll_action() {
            match action {
                Action::Touch => shared.live.touch(&id, session, now_ms),
                Action::Reply(frame) => {
                    if tx.try_send(Box::new(frame)).is_err() {
                        break 'run Ok("not reading its Pongs (outgoing queue full)");
                    }
                }
                Action::Status(s) => {
                    // A start counted by the entrypoint after the first one seen here: a restart.
                    if s.starts > starts {
                        if starts > 0 {
                            restarts.inc_by(u64::from(s.starts - starts));
                        }
                        starts = s.starts;
                    }
                    // A restarting instance drains: the ingress stops keeping connections to it
                    // idle.
                    let restarting = s.state == proto::status::State::Restarting as i32;
                    shared.pool.note_state(&id, restarting);
                    crate::server::transport::ingress::raw::note_state(&id, restarting);
                    shared.live.apply_status(&id, session, &s, now_ms)
                }
                Action::ConfigApplied(a) => shared.config.on_applied(&shared.live, &id, session, a),
                // Waits while the log writer is behind (backpressure on this connection).
                Action::LogBatch(b) => shared.logs.on_batch(&id, &app, b, &tx).await,
                Action::Deliver(kind) => {
                    // Exec and tunnel frames go to their sessions/streams.
                    if let Some(other) = shared.mux.deliver(&id, session, kind) {
                        tracing::debug!(
                            instance = id_hex,
                            kind = other.name(),
                            "ignoring a frame this server does not handle yet"
                        );
                    }
                }
                Action::Close(End::Disconnected(why)) => break 'run Ok(why),
                // Only before admission.
                Action::Close(_)
                | Action::LookupToken { .. }
                | Action::Claim(_)
                | Action::Admitted(_)
                | Action::Reject { .. } => {}
            }
        }
    };

    // ---- disconnect ----
    // Record the end first and only then leave the registry, so the API never shows the
    // instance as neither live nor ended. A superseded connection (its entry replaced by a
    // reconnect) records nothing: the row belongs to the new session now.
    if let Some((last_seen, status)) = shared.live.snapshot_own(&id, session) {
        let now = util::now_ms();
        let id_hex2 = id_hex.clone();
        let res = shared
            .store
            .call(move |c| store::mark_disconnected(c, &id_hex2, session, last_seen, &status, now))
            .await;
        if let Err(e) = res {
            tracing::error!(
                instance = id_hex,
                error = format!("{e:#}"),
                "recording the disconnect failed"
            );
        }
    }
    shared.live.remove(&id, session);
    shared.mux.detach(&id, session);
    shared.pool.forget(&id);
    crate::server::transport::ingress::raw::forget(&id);
    // Nothing can queue frames for this connection any more: let the writer flush and close.
    drop(tx);
    if !writer_done && timeout(CLOSE_FLUSH_TIMEOUT, &mut writer).await.is_err() {
        writer.abort();
    }
    match &end {
        Ok(why) => tracing::info!(
            instance = id_hex,
            app,
            reason = why,
            "instance disconnected"
        ),
        Err(e) => tracing::info!(
            instance = id_hex,
            app,
            error = format!("{e:#}"),
            "instance connection failed"
        ),
    }
    end.map(|_| ())
}

/// Binds the claimed instance id to its owner and registers this connection as its live one:
/// the only way a connection gets an instance. An id held by a live connection of another owner,
/// or recorded (live or gone) under another app, deployment or token, is refused, and the
/// instance is left as it was. The same owner's reconnect supersedes its previous connection.
///
/// Order: the live registry is asked first (no write), then the store — the source of truth,
/// where the owner check and the insert are one transaction, so of two Hellos racing for a new id
/// only the first binds it — and only then is the connection registered (which checks the owner
/// again under the registry's lock, and only then tells a superseded connection to close).
async fn claim(
    shared: &Shared,
    c: Claim,
    instance_labels: &Labels,
    tx: &mpsc::Sender<Queued>,
) -> std::result::Result<Arc<tokio::sync::Notify>, ClaimError> {
    let Claim {
        id,
        owner,
        connected,
        hello_status,
    } = c;
    if let Some(c) = shared.live.conflict(&id, &owner) {
        return Err(ClaimError::Conflict(c));
    }
    let now = util::now_ms();
    let session = connected.session;
    let replica = shared.replica.clone();
    let instance_labels = instance_labels.clone();
    let app = connected.app.clone();
    let status = match shared
        .store
        .call(move |c| {
            let known = store::instance_known(c, &connected.id)?;
            store::upsert_connected_with_labels(
                c,
                &connected,
                &instance_labels,
                hello_status.as_ref(),
                Some(&replica),
                now,
            )
            .map(|r| r.map(|status| (known, status)))
        })
        .await
    {
        Ok(Ok((known, status))) => {
            if known {
                metrics()
                    .control_reconnects
                    .get_or_create(&AppLabel::new(&app))
                    .inc();
            }
            status
        }
        Ok(Err(c)) => return Err(ClaimError::Conflict(c)),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "recording the instance failed");
            return Err(ClaimError::Unavailable);
        }
    };
    let kick = shared
        .live
        .register(id, session, owner, tx.clone(), now)
        .map_err(ClaimError::Conflict)?;
    shared.live.set_status(&id, session, status);
    Ok(kick)
}

async fn wait_shutdown(shared: &Shared) {
    crate::server::transport::wait_shutdown(&mut shared.shutdown.clone()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use session::MAX_LABEL;

    fn wire(frames: &[Frame]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            proto::encode(f, &mut v).unwrap();
        }
        v
    }

    #[tokio::test]
    async fn reader_handles_any_split() {
        let frames: Vec<Frame> = (0..5)
            .map(|i| Kind::Ping(proto::Ping { nonce: i }).into())
            .chain([
                Frame { kind: None },
                Kind::StreamData(proto::StreamData {
                    stream: 1,
                    data: vec![7; 100_000],
                })
                .into(),
            ])
            .collect();
        let bytes = wire(&frames);
        for split in [1usize, 3, 7, 4096, bytes.len()] {
            let (mut a, b) = tokio::io::duplex(split.max(1));
            let data = bytes.clone();
            tokio::spawn(async move {
                for chunk in data.chunks(split) {
                    a.write_all(chunk).await.unwrap();
                }
            });
            let mut r = FrameReader::new(b);
            for f in &frames {
                assert_eq!(r.next().await.unwrap().as_ref(), Some(f));
            }
            assert!(r.next().await.unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn reader_rejects_oversized_prefix_without_allocating() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        let mut r = FrameReader::new(b);
        assert!(r.next().await.is_err());
        assert!(r.buf.capacity() < 64 * 1024);
    }

    #[tokio::test]
    async fn first_frame_cap_is_checked_from_the_prefix() {
        // A Hello-sized frame passes...
        let hello: Frame = Kind::Hello(proto::Hello {
            token: "wpe_".repeat(20),
            instance_id: vec![1; 16],
            hostname: "h".repeat(MAX_LABEL),
            entrypoint_version: "v".repeat(MAX_LABEL),
            ..Default::default()
        })
        .into();
        let (mut a, b) = tokio::io::duplex(64);
        let bytes = wire(std::slice::from_ref(&hello));
        tokio::spawn(async move { a.write_all(&bytes).await.unwrap() });
        let mut r = FrameReader::new(b);
        r.set_cap(FIRST_FRAME_CAP);
        assert_eq!(r.next().await.unwrap(), Some(hello));

        // ...a prefix announcing more is refused with only the prefix sent: nothing of the body
        // is waited for or allocated.
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&((FIRST_FRAME_CAP + 1) as u32).to_be_bytes())
            .await
            .unwrap();
        let mut r = FrameReader::new(b);
        r.set_cap(FIRST_FRAME_CAP);
        let e = r.next().await.unwrap_err().to_string();
        assert!(e.contains("8193 bytes announced"), "{e}");
        assert!(r.buf.capacity() <= 2 * READ_CHUNK);

        // Negative control: the same prefix with the authenticated cap waits for the body.
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&((FIRST_FRAME_CAP + 1) as u32).to_be_bytes())
            .await
            .unwrap();
        let mut r = FrameReader::new(b);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), r.next())
                .await
                .is_err()
        );
        // set_cap never raises the cap past one maximal frame.
        r.set_cap(usize::MAX);
        assert_eq!(r.cap, MAX_FRAME);
    }

    #[test]
    fn preauth_caps_per_address_and_in_total() {
        let limits = PreAuthLimits::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limits.try_acquire(a).unwrap();
        let a2 = limits.try_acquire(a).unwrap();
        assert_eq!(limits.try_acquire(a).err(), Some(PreAuthFull::Addr));
        // IPv4-mapped IPv6 is the same address.
        assert_eq!(
            limits.try_acquire("::ffff:10.0.0.1".parse().unwrap()).err(),
            Some(PreAuthFull::Addr)
        );
        let b1 = limits.try_acquire(b).unwrap();
        assert_eq!(
            limits.try_acquire("10.0.0.3".parse().unwrap()).err(),
            Some(PreAuthFull::Total)
        );
        // Places come back when connections authenticate or end.
        drop(a1);
        let a3 = limits.try_acquire(a).unwrap();
        drop((a2, a3, b1));
        let c = limits.lock();
        assert_eq!(c.total, 0);
        assert!(c.per_addr.is_empty(), "no entry left for idle addresses");
    }

    #[test]
    fn preauth_counts_an_ipv6_slash_64_as_one_address() {
        let limits = PreAuthLimits::new(1, 10);
        let _p = limits
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert_eq!(
            limits
                .try_acquire("2001:db8:1:2:ffff::9".parse().unwrap())
                .err(),
            Some(PreAuthFull::Addr)
        );
        assert!(
            limits
                .try_acquire("2001:db8:1:3::1".parse().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn refusals_are_summarised_not_logged_each() {
        let limits = PreAuthLimits::new(1, 1);
        let t0 = std::time::Instant::now();
        assert_eq!(limits.note_refused(t0), Some(1));
        assert_eq!(limits.note_refused(t0 + Duration::from_secs(1)), None);
        assert_eq!(limits.note_refused(t0 + Duration::from_secs(2)), None);
        assert_eq!(limits.note_refused(t0 + PREAUTH_WARN_EVERY), Some(3));
    }

    #[tokio::test]
    async fn reader_errors_on_garbage_and_truncation() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(FrameReader::new(b).next().await.is_err());

        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        drop(a);
        assert!(FrameReader::new(b).next().await.is_err());
    }

    #[tokio::test]
    async fn reader_buffer_never_exceeds_one_frame() {
        let big: Frame = Kind::StreamData(proto::StreamData {
            stream: 1,
            data: vec![1; MAX_FRAME - 16],
        })
        .into();
        let bytes = wire(&[big.clone(), big.clone()]);
        let (mut a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move { a.write_all(&bytes).await.unwrap() });
        let mut r = FrameReader::new(b);
        for _ in 0..2 {
            assert_eq!(r.next().await.unwrap(), Some(big.clone()));
            assert!(
                r.buf.capacity() <= proto::HEADER_LEN + MAX_FRAME + 64,
                "capacity {}",
                r.buf.capacity()
            );
        }
    }
}
