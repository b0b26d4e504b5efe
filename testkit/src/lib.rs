//! waypost-testkit: the one protocol-level fake entrypoint, and the pieces it is made of.
//!
//! A fake entrypoint speaks the control protocol (docs/protocol.md) the way the real one does —
//! TLS 1.3 with ALPN `waypost/1`, a Hello, then length-prefixed frames — but is driven by the
//! caller, frame by frame. Three users:
//!
//! - the server's integration tests (`server/tests/it`), through [`Fake`]: connect, Hello,
//!   send, receive with a timeout, expect the server to close; every failure panics;
//! - the fleet simulator (`bench/fleet`), through the parts [`Fake`] is made of —
//!   [`client_config`], [`hello`], [`encode`], [`FrameReader`] — because its hot loop reads and
//!   writes one connection from two halves inside a `select!` and must survive a lost server
//!   instead of panicking;
//! - the fuzz targets that build a fake peer.
//!
//! Also [`pg`]: a throwaway PostgreSQL cluster, for the server's tests against PostgreSQL.
//!
//! Never a dependency of a shipped binary, and independent of the server crate, so the server's
//! tests depend on it without a cycle.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use waypost_proto::{self as proto, Frame, Kind, RecvBuf};

pub mod bao;
pub mod etcd;
pub mod pg;

/// Upper bound for anything a test waits for. Generous: CI machines are slow and shared.
pub const WAIT: Duration = Duration::from_secs(20);

/// Bytes asked of the stream per read while frames are small: a batch of small frames, and the
/// size of one TLS record.
const READ_CHUNK: usize = 16 * 1024;

// ---- TLS ------------------------------------------------------------------------------------

/// A TLS 1.3 client configuration (ring, as everywhere in waypost) that trusts the CA in
/// `ca_pem` and offers `alpn` (None: no ALPN at all, to test that the server insists on it).
///
/// Session resumption is off: every connection is a full handshake, as a freshly started
/// entrypoint makes, so a load test does not measure a cheaper handshake than the fleet's.
pub fn client_config(ca_pem: &str, alpn: Option<&[u8]>) -> io::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let bad =
        |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"the CA contains no PEM certificate"));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| bad(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// [`client_config`] as a connector; panics on a CA that is not PEM (a broken test).
pub fn tls_connector(ca_pem: &str, alpn: Option<&[u8]>) -> TlsConnector {
    TlsConnector::from(Arc::new(
        client_config(ca_pem, alpn).expect("the server's CA"),
    ))
}

/// The server name the test servers' certificates carry (the fleet passes its own).
pub fn localhost() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("localhost").expect("a valid DNS name")
}

// ---- what an entrypoint says ------------------------------------------------------------------

/// A Hello as a fresh entrypoint sends it: this protocol version, `token`, instance id `id`.
/// Callers change what they need with struct update syntax (`Hello { pid: 1, ..hello(t, id) }`).
pub fn hello(token: &str, id: &[u8; 16]) -> proto::Hello {
    proto::Hello {
        protocol_version: proto::PROTOCOL_VERSION,
        token: token.to_string(),
        instance_id: id.to_vec(),
        entrypoint_version: "test-0.0.1".into(),
        hostname: "test-host".into(),
        pid: 4242,
        ..Default::default()
    }
}

/// A distinct instance id per call, also across processes (nextest runs each test in its own).
pub fn new_id() -> [u8; 16] {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(t ^ std::process::id() as u64).to_be_bytes());
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

/// A Status frame body with only the child's state set.
pub fn status(state: proto::status::State) -> proto::Status {
    proto::Status {
        state: state as i32,
        ..Default::default()
    }
}

/// Replaces `out` with the wire bytes of one frame per kind, back to back (one write for all).
/// Panics on a frame larger than `MAX_FRAME`: a fake builds only frames it knows to fit.
pub fn encode(kinds: impl IntoIterator<Item = Kind>, out: &mut Vec<u8>) {
    out.clear();
    for k in kinds {
        proto::encode(&Frame::from(k), out).expect("a fake entrypoint's frame fits MAX_FRAME");
    }
}

// ---- receiving frames -------------------------------------------------------------------------

/// One read from `rd` into `rb` (0: end of stream). Cancel-safe: a read that does not complete
/// has taken nothing from the stream.
async fn fill<R: AsyncRead + Unpin>(rb: &mut RecvBuf, rd: &mut R) -> io::Result<usize> {
    let n = rd.read(rb.spare(READ_CHUNK)).await?;
    rb.filled(n);
    Ok(n)
}

/// Reads frames from one byte stream (e.g. the read half of a split connection), through the
/// codec's bounded receive buffer (`waypost_proto::RecvBuf`).
pub struct FrameReader<R> {
    rd: R,
    rb: RecvBuf,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(rd: R) -> Self {
        FrameReader {
            rd,
            rb: RecvBuf::new(),
        }
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames. Errors: I/O, an
    /// undecodable or oversized frame (`InvalidData`), end of stream mid-frame
    /// (`UnexpectedEof`). Cancel-safe, so it can be one arm of a `select!`.
    pub async fn next(&mut self) -> io::Result<Option<Frame>> {
        loop {
            match self.rb.next_frame(proto::MAX_FRAME) {
                Some(Ok(f)) => return Ok(Some(f)),
                Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                None => {}
            }
            if fill(&mut self.rb, &mut self.rd).await? == 0 {
                if self.rb.pending() == 0 {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.rd
    }
}

// ---- the fake entrypoint ----------------------------------------------------------------------

/// A control listener a fake entrypoint can reach (the tests' server process).
pub trait ControlTarget {
    /// `host:port` of the control listener.
    fn control_addr(&self) -> String;
    /// The CA (PEM) that signed the listener's certificate.
    fn ca_pem(&self) -> String;
}

/// A fake entrypoint on one control connection, for tests: every method panics on what a test
/// would call a failure, and every wait ends after [`WAIT`].
pub struct Fake {
    /// The connection itself, for tests that write raw or partial bytes.
    pub stream: TlsStream<TcpStream>,
    rx: RecvBuf,
}

impl Fake {
    /// TLS-connects to the control listener with ALPN waypost/1, trusting the server's CA.
    pub async fn connect(server: &impl ControlTarget) -> Fake {
        Fake::connect_to(&server.control_addr(), &server.ca_pem(), Some(proto::ALPN))
            .await
            .unwrap()
    }

    /// TCP + TLS to `addr` (server name `localhost`) offering `alpn`; the error of either.
    pub async fn connect_to(addr: &str, ca_pem: &str, alpn: Option<&[u8]>) -> io::Result<Fake> {
        let tcp = TcpStream::connect(addr).await?;
        let stream = tls_connector(ca_pem, alpn)
            .connect(localhost(), tcp)
            .await?;
        Ok(Fake {
            stream,
            rx: RecvBuf::new(),
        })
    }

    /// Connects and sends Hello; returns the connection and the server's answer.
    pub async fn hello(server: &impl ControlTarget, token: &str, id: &[u8; 16]) -> (Fake, Frame) {
        let mut f = Fake::connect(server).await;
        f.send(Kind::Hello(hello(token, id)).into()).await;
        let answer = f.recv().await.expect("an answer to Hello");
        (f, answer)
    }

    /// Connects, sends Hello, asserts Welcome.
    pub async fn welcomed(
        server: &impl ControlTarget,
        token: &str,
        id: &[u8; 16],
    ) -> (Fake, proto::Welcome) {
        let (f, answer) = Fake::hello(server, token, id).await;
        match answer.kind {
            Some(Kind::Welcome(w)) => (f, w),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut out = Vec::new();
        proto::encode(&frame, &mut out).unwrap();
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next frame, or None when the server closed the connection (EOF or reset). Panics on
    /// an undecodable frame, and after [`WAIT`].
    pub async fn recv(&mut self) -> Option<Frame> {
        within(WAIT, "a frame", self.recv_inner()).await
    }

    async fn recv_inner(&mut self) -> Option<Frame> {
        loop {
            match self.rx.next_frame(proto::MAX_FRAME) {
                Some(Ok(f)) => return Some(f),
                Some(Err(e)) => panic!("server sent a bad frame: {e}"),
                None => {}
            }
            match fill(&mut self.rx, &mut self.stream).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Asserts the server closes the connection (within [`WAIT`]), skipping any frames; returns
    /// how long that took.
    pub async fn expect_closed(&mut self) -> Duration {
        let start = Instant::now();
        while let Some(f) = self.recv().await {
            let _ = f;
        }
        start.elapsed()
    }

    /// Ping with `nonce`; asserts the next frame is the matching Pong.
    pub async fn ping(&mut self, nonce: u64) {
        self.send(Kind::Ping(proto::Ping { nonce }).into()).await;
        match self.recv().await.and_then(|f| f.kind) {
            Some(Kind::Pong(p)) => assert_eq!(p.nonce, nonce),
            other => panic!("expected Pong {nonce}, got {other:?}"),
        }
    }
}

/// `fut`'s output, or a panic naming `what` after `limit`.
async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(kinds: Vec<Kind>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(kinds, &mut out);
        out
    }

    /// Hands out its bytes `chunk` at a time.
    struct Dribble {
        data: Vec<u8>,
        chunk: usize,
    }

    impl AsyncRead for Dribble {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let n = self.chunk.min(self.data.len()).min(buf.remaining());
            let head: Vec<u8> = self.data.drain(..n).collect();
            buf.put_slice(&head);
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_split_at_every_size_come_out_whole() {
        let kinds: Vec<Kind> = (0..5)
            .map(|n| Kind::Ping(proto::Ping { nonce: n }))
            .chain([Kind::Hello(hello("wpe_x", &[7; 16]))])
            .collect();
        let bytes = wire(kinds.clone());
        for chunk in 1..=bytes.len() {
            let mut r = FrameReader::new(Dribble {
                data: bytes.clone(),
                chunk,
            });
            for k in &kinds {
                assert_eq!(r.next().await.unwrap().unwrap().kind.as_ref(), Some(k));
            }
            assert!(
                r.next().await.unwrap().is_none(),
                "clean end at chunk {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn eof_mid_frame_and_oversized_prefix_are_errors() {
        let mut bytes = wire(vec![Kind::Ping(proto::Ping { nonce: 1 })]);
        bytes.pop();
        let mut r = FrameReader::new(Dribble {
            data: bytes,
            chunk: 3,
        });
        assert_eq!(
            r.next().await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );

        let huge = ((proto::MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        let mut r = FrameReader::new(Dribble {
            data: huge,
            chunk: 64,
        });
        assert_eq!(
            r.next().await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn client_config_refuses_a_ca_without_a_certificate() {
        assert!(client_config("not a certificate", None).is_err());
        assert!(client_config("", Some(proto::ALPN)).is_err());
    }

    #[test]
    fn ids_differ() {
        assert_ne!(new_id(), new_id());
    }
}
