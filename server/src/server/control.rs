//! The control listener: TLS 1.3 + ALPN `waypost/1`, then length-prefixed frames (the
//! `waypost-proto` codec). One task per connection reads and dispatches frames; one writer task
//! per connection drains its outgoing queue, so any part of the server can push a frame to an
//! instance through the live registry.
//!
//! Session: the entrypoint's first frame is Hello → Welcome or Reject (then close). After that,
//! Ping → Pong, Status → instance state, any frame → liveness; three heartbeat intervals of
//! silence close the connection and mark the instance lost.

use super::Shared;
use super::auth;
use super::store::{self, TokenScope};
use crate::util;
use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use waypost_proto::{self as proto, Frame, HEADER_LEN, Kind, MAX_FRAME, reject::Reason};

/// Time allowed for the TLS handshake, and then again for the Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing frames queued per connection before senders wait (or, for Pong, the connection is
/// dropped: a peer that does not read its Pongs is broken).
const OUT_QUEUE: usize = 64;
/// Bytes asked of the socket per read when no larger frame is pending. Small, because every idle
/// connection keeps a buffer this big (10,000 instances × 4 KiB = 40 MiB); a large frame sizes
/// the buffer from its checked length prefix instead.
const READ_CHUNK: usize = 4 * 1024;
/// Queued frames coalesced into one TLS write, at most this many bytes (plus one frame).
const WRITE_BATCH: usize = 64 * 1024;
/// An idle connection's read buffer is shrunk back when it grew past this (after a big frame),
/// so 10,000 idle instances do not each keep a 1 MiB buffer.
const SHRINK_ABOVE: usize = 64 * 1024;
/// Upper bound of a connection's read buffer: one maximal frame.
const READ_CAP: usize = HEADER_LEN + MAX_FRAME;
/// How long the writer may take to flush queued frames (e.g. a Reject) when a connection closes.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Retry hint sent with BAD_TOKEN / FORBIDDEN rejects: a misconfigured entrypoint should not
/// hammer the server.
const REJECT_RETRY_MS: u32 = 5000;
/// Longest host name / version string kept from a Hello.
const MAX_LABEL: usize = 255;

/// Reads frames from a byte stream with one bounded buffer.
pub struct FrameReader<R> {
    rd: R,
    buf: Vec<u8>,
    /// INVARIANT: start <= buf.len() <= READ_CAP; bytes before `start` are consumed.
    start: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(rd: R) -> Self {
        FrameReader {
            rd,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames. An error means the
    /// stream is unusable (I/O error, oversized or malformed frame, or EOF mid-frame).
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            let mut rest = &self.buf[self.start..];
            match proto::decode(&mut rest) {
                Some(Ok(frame)) => {
                    self.start = self.buf.len() - rest.len();
                    return Ok(Some(frame));
                }
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
            // Compact: move the partial frame to the front.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
                self.buf = Vec::new();
            }
            // Size the read by the checked prefix only: never more than one maximal frame.
            let need = match proto::frame_len(&self.buf) {
                Some(Ok(total)) => total,
                Some(Err(e)) => return Err(e.into()),
                None => HEADER_LEN,
            };
            let target = need.max(self.buf.len() + READ_CHUNK).min(READ_CAP);
            // INVARIANT: buf.len() < need <= target <= READ_CAP (a complete frame would have
            // decoded above), so there is room to read.
            let room = target - self.buf.len();
            self.buf.reserve_exact(room);
            let n = {
                use bytes::BufMut as _;
                let mut limited = (&mut self.buf).limit(room);
                self.rd.read_buf(&mut limited).await?
            };
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                anyhow::bail!("connection closed in the middle of a frame");
            }
        }
    }
}

/// Drains `rx` onto the stream, batching whatever is queued into one write, then closes the
/// stream (TLS close_notify + FIN) when every sender is gone.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Frame>,
    // Exec and tunnel frames, written after control frames (see `tunnel::Lanes`).
    mut lanes: super::tunnel::Lanes,
) -> Result<()> {
    // Allocated on first use and shrunk after big frames: idle connections hold almost nothing.
    let mut out = Vec::new();
    while let Some(frame) = lanes.next(&mut rx).await {
        out.clear();
        proto::encode(&frame, &mut out)?;
        // Let the other tasks that are ready now (ingress requests, exec relays) run first and
        // queue their frames, so a busy connection writes one TLS record for many of them
        // instead of one syscall each. On an idle runtime this returns at once.
        tokio::task::yield_now().await;
        // Coalesce frames that are already queued, up to a bound, into one TLS write.
        while out.len() < WRITE_BATCH {
            match lanes.try_next(&mut rx) {
                Some(f) => proto::encode(&f, &mut out)?,
                None => break,
            }
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
        if out.capacity() > SHRINK_ABOVE {
            out = Vec::new();
        }
    }
    wr.shutdown().await?;
    Ok(())
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
    loop {
        let Some((tcp, peer)) = super::accept(&listener, &mut shutdown, "control").await else {
            break;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _done = done;
            if let Err(e) = connection(&shared, tcp, peer, acceptor).await {
                tracing::debug!(%peer, error = format!("{e:#}"), "control connection ended");
            }
        });
    }
}

/// The Reject a connection gets when its token is revoked while it is live.
pub fn revoked_goodbye() -> Frame {
    reject(Reason::BadToken, "token revoked", REJECT_RETRY_MS)
}

fn reject(reason: Reason, message: impl Into<String>, retry_after_ms: u32) -> Frame {
    Kind::Reject(proto::Reject {
        reason: reason as i32,
        message: message.into(),
        retry_after_ms,
    })
    .into()
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_LABEL {
        let mut cut = MAX_LABEL;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// What the Hello checks produced.
enum Admission {
    Welcome {
        id: [u8; 16],
        app: String,
        deployment: String,
        hello: proto::Hello,
    },
    Reject(Frame),
}

async fn admit(shared: &Shared, hello: proto::Hello) -> Admission {
    if hello.protocol_version != proto::PROTOCOL_VERSION {
        return Admission::Reject(reject(
            Reason::UnsupportedVersion,
            format!(
                "this server speaks protocol version {}, the entrypoint sent {}",
                proto::PROTOCOL_VERSION,
                hello.protocol_version
            ),
            0,
        ));
    }
    let hash = auth::hash_token(&hello.token);
    let scope = match shared
        .store
        .call(move |c| store::lookup_token(c, &hash))
        .await
    {
        Ok(scope) => scope,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "token lookup failed");
            return Admission::Reject(reject(Reason::Unavailable, "server error; try again", 1000));
        }
    };
    let (app, deployment) = match scope {
        None => {
            return Admission::Reject(reject(Reason::BadToken, "invalid token", REJECT_RETRY_MS));
        }
        Some(TokenScope::Admin) => {
            return Admission::Reject(reject(
                Reason::Forbidden,
                "an admin token cannot run an entrypoint; create one with `waypost token create --app NAME`",
                REJECT_RETRY_MS,
            ));
        }
        Some(TokenScope::Entrypoint { app, deployment }) => (app, deployment.unwrap_or_default()),
    };
    let Ok(id) = <[u8; 16]>::try_from(hello.instance_id.as_slice()) else {
        return Admission::Reject(reject(
            Reason::Unspecified,
            format!(
                "instance_id must be 16 bytes, got {}",
                hello.instance_id.len()
            ),
            0,
        ));
    };
    Admission::Welcome {
        id,
        app,
        deployment,
        hello,
    }
}

/// One control connection, from TCP accept to close.
async fn connection(
    shared: &Shared,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: TlsAcceptor,
) -> Result<()> {
    let tls = timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await??;
    if tls.get_ref().1.alpn_protocol() != Some(proto::ALPN) {
        // rustls already refuses a client that offers only other protocols; this catches one
        // that offers none.
        anyhow::bail!("client did not negotiate ALPN waypost/1");
    }
    let (rd, wr) = tokio::io::split(tls);
    let mut reader = FrameReader::new(rd);
    let (tx, rx) = mpsc::channel::<Frame>(OUT_QUEUE);
    let (lane_tx, lanes) = super::tunnel::lanes();
    let mut writer = tokio::spawn(write_loop(wr, rx, lanes));

    // ---- Hello ----
    let hello_deadline = Instant::now() + HELLO_TIMEOUT;
    let hello = loop {
        let frame = tokio::select! {
            r = reader.next() => r?,
            _ = tokio::time::sleep_until(hello_deadline) => anyhow::bail!("no Hello within {HELLO_TIMEOUT:?}"),
            _ = wait_shutdown(shared) => return Ok(()),
        };
        match frame {
            None => return Ok(()),
            Some(Frame { kind: None }) => continue, // unknown kind: ignore
            Some(Frame {
                kind: Some(Kind::Hello(h)),
            }) => break h,
            Some(Frame { kind: Some(other) }) => {
                let _ = tx.try_send(reject(
                    Reason::Unspecified,
                    "the first frame must be Hello",
                    0,
                ));
                drop(tx);
                let _ = timeout(CLOSE_FLUSH_TIMEOUT, &mut writer).await;
                anyhow::bail!("first frame was not Hello: {}", other.name());
            }
        }
    };
    let (id, app, deployment, hello) = match admit(shared, hello).await {
        Admission::Welcome {
            id,
            app,
            deployment,
            hello,
        } => (id, app, deployment, hello),
        Admission::Reject(frame) => {
            if let Some(Kind::Reject(r)) = &frame.kind {
                tracing::info!(
                    reason = Reason::try_from(r.reason)
                        .map(|r| r.as_str_name())
                        .unwrap_or("?"),
                    message = r.message,
                    %peer,
                    "rejected an entrypoint"
                );
            }
            let _ = tx.try_send(frame);
            drop(tx);
            // Let the writer send the Reject and close the stream.
            if timeout(CLOSE_FLUSH_TIMEOUT, &mut writer).await.is_err() {
                writer.abort();
            }
            return Ok(());
        }
    };

    // ---- register, record, welcome ----
    let id_hex = util::hex(&id);
    let session = i64::from_ne_bytes(auth::random_bytes::<8>());
    let now = util::now_ms();
    let kick = shared.live.register(
        id,
        session,
        super::live::Owner {
            app: app.clone(),
            deployment: deployment.clone(),
            token_hash: auth::hash_token(&hello.token),
        },
        tx.clone(),
        now,
    );
    let connected = store::Connected {
        id: id_hex.clone(),
        app: app.clone(),
        deployment: deployment.clone(),
        hostname: truncate(hello.hostname.clone()),
        entrypoint_pid: hello.pid,
        entrypoint_version: truncate(hello.entrypoint_version.clone()),
        session,
    };
    let hello_status = hello.status.clone();
    let status = shared
        .store
        .call(move |c| store::upsert_connected(c, &connected, hello_status.as_ref(), now))
        .await;
    match status {
        Ok(status) => shared.live.set_status(&id, session, status),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "recording the instance failed");
            shared.live.remove(&id, session);
            let _ = tx.try_send(reject(Reason::Unavailable, "server error; try again", 1000));
            drop(tx);
            let _ = timeout(CLOSE_FLUSH_TIMEOUT, &mut writer).await;
            return Ok(());
        }
    }
    tracing::info!(
        instance = id_hex,
        app,
        deployment,
        hostname = hello.hostname,
        version = hello.entrypoint_version,
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
    // With the app's config snapshot, in order with config pushes (see `config.rs`).
    shared
        .config
        .send_welcome(shared, &tx, id, session, &app, &deployment, &hello, welcome)
        .await;
    // After the Welcome is queued, so no exec/tunnel frame can precede it.
    let disabled = hello.disabled.as_ref();
    shared.mux.attach(id, session, &app, disabled, lane_tx);

    // ---- session loop ----
    let silence = shared.heartbeat * 3;
    let mut deadline = Instant::now() + silence;
    let mut writer_done = false;
    let end: Result<&'static str> = loop {
        let frame = tokio::select! {
            r = reader.next() => r,
            _ = tokio::time::sleep_until(deadline) => break Ok("silent for 3 heartbeat intervals"),
            _ = kick.notified() => break Ok(shared.live.close_reason(&id, session)),
            _ = wait_shutdown(shared) => break Ok("server shutting down"),
            _ = &mut writer, if !writer_done => {
                writer_done = true;
                break Ok("write failed");
            }
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok("closed by the entrypoint"),
            Err(e) => break Err(e),
        };
        let now_ms = util::now_ms();
        deadline = Instant::now() + silence;
        match frame.kind {
            None => shared.live.touch(&id, session, now_ms),
            Some(Kind::Ping(p)) => {
                shared.live.touch(&id, session, now_ms);
                if tx
                    .try_send(Kind::Pong(proto::Pong { nonce: p.nonce }).into())
                    .is_err()
                {
                    break Ok("not reading its Pongs (outgoing queue full)");
                }
            }
            Some(Kind::Pong(_)) => shared.live.touch(&id, session, now_ms),
            Some(Kind::Status(s)) => {
                // A restarting instance drains: the ingress stops keeping connections to it idle.
                let restarting = s.state == proto::status::State::Restarting as i32;
                shared.pool.note_state(&id, restarting);
                shared.live.apply_status(&id, session, &s, now_ms)
            }
            Some(Kind::ConfigApplied(a)) => {
                shared.live.touch(&id, session, now_ms);
                shared.config.on_applied(shared, &id, session, a);
            }
            Some(Kind::LogBatch(b)) => {
                shared.live.touch(&id, session, now_ms);
                // Waits while the log writer is behind (backpressure on this connection).
                shared.logs.on_batch(&id, &app, b, &tx).await;
            }
            Some(other) => {
                shared.live.touch(&id, session, now_ms);
                // Exec and tunnel frames go to their sessions/streams.
                let Some(other) = shared.mux.deliver(&id, session, other) else {
                    continue;
                };
                tracing::debug!(
                    instance = id_hex,
                    kind = other.name(),
                    "ignoring a frame this server does not handle yet"
                );
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

async fn wait_shutdown(shared: &Shared) {
    super::wait_shutdown(&mut shared.shutdown.clone()).await
}

/// Writes every dirty live instance's heartbeat data to SQLite, every `every`, until shutdown
/// (then once more).
pub async fn flusher(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let down = tokio::select! {
            _ = tick.tick() => false,
            _ = wait_shutdown(&shared) => true,
        };
        let rows = shared.live.take_dirty();
        if !rows.is_empty() {
            let n = rows.len();
            if let Err(e) = shared
                .store
                .call(move |c| store::flush_live(c, &rows))
                .await
            {
                tracing::error!(
                    error = format!("{e:#}"),
                    rows = n,
                    "flushing instance heartbeats failed"
                );
            }
        }
        if down {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                r.buf.capacity() <= READ_CAP + 64,
                "capacity {}",
                r.buf.capacity()
            );
        }
    }
}
