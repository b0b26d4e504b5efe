//! The control connection's transport: a mio `TcpStream` carrying, optionally, an HTTP CONNECT
//! exchange with a proxy, then TLS 1.3 (rustls, ring). Every rustls call lives here.
//!
//! Nothing here blocks: each method does what the socket allows right now and says whether to
//! call again. The crypto provider is cut down to what the protocol uses (one AEAD suite that
//! every TLS 1.3 server must implement, X25519, no client keys) so the binary stays small.

use crate::error::Error;
use crate::settings::CaSource;
use mio::Interest;
use mio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// Plaintext rustls may hold for sending before `write_plain` says "full": with the socket's own
/// buffer, enough to keep a fast link busy; small enough that a log flood cannot queue far ahead
/// of a keystroke.
const SEND_BUFFER: usize = 64 * 1024;
/// Longest proxy reply header we accept.
const PROXY_REPLY_CAP: usize = 8 * 1024;
/// Where distributions keep the system trust bundle.
const SYSTEM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// Signature algorithms for certificate chains and the TLS 1.3 CertificateVerify: what public CAs
/// and our own server (ECDSA P-256) use.
static SIG_ALGS: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[
        webpki::ring::ECDSA_P256_SHA256,
        webpki::ring::ECDSA_P256_SHA384,
        webpki::ring::ECDSA_P384_SHA256,
        webpki::ring::ECDSA_P384_SHA384,
        webpki::ring::ED25519,
        webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
        webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
        webpki::ring::RSA_PKCS1_2048_8192_SHA256,
        webpki::ring::RSA_PKCS1_2048_8192_SHA384,
        webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    ],
    mapping: &[
        (
            SignatureScheme::ECDSA_NISTP384_SHA384,
            &[
                webpki::ring::ECDSA_P384_SHA384,
                webpki::ring::ECDSA_P256_SHA384,
            ],
        ),
        (
            SignatureScheme::ECDSA_NISTP256_SHA256,
            &[
                webpki::ring::ECDSA_P256_SHA256,
                webpki::ring::ECDSA_P384_SHA256,
            ],
        ),
        (SignatureScheme::ED25519, &[webpki::ring::ED25519]),
        (
            SignatureScheme::RSA_PSS_SHA512,
            &[webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PSS_SHA384,
            &[webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PSS_SHA256,
            &[webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA512,
            &[webpki::ring::RSA_PKCS1_2048_8192_SHA512],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA384,
            &[webpki::ring::RSA_PKCS1_2048_8192_SHA384],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA256,
            &[webpki::ring::RSA_PKCS1_2048_8192_SHA256],
        ),
    ],
};

/// The entrypoint never presents a client certificate, so it loads no private keys (and links
/// none of the signing code).
#[derive(Debug)]
struct NoKeys;

impl KeyProvider for NoKeys {
    fn load_private_key(
        &self,
        _: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        Err(rustls::Error::General(
            "the entrypoint has no client keys".into(),
        ))
    }
}

#[derive(Debug)]
struct Random;

impl SecureRandom for Random {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        crate::sys::random::fill(buf).map_err(|_| GetRandomFailed)
    }
}

fn provider() -> CryptoProvider {
    CryptoProvider {
        // TLS_AES_128_GCM_SHA256 is the one suite RFC 8446 requires every TLS 1.3 peer to have.
        cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![rustls::crypto::ring::kx_group::X25519],
        signature_verification_algorithms: SIG_ALGS,
        secure_random: &Random,
        key_provider: &NoKeys,
    }
}

/// `WAYPOST_TLS_SKIP_VERIFY=1`: accept any certificate (development only; warned about at start).
#[derive(Debug)]
struct SkipVerify;

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }
    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The peer still proves it holds the key of the certificate it sent.
        rustls::crypto::verify_tls13_signature(msg, cert, dss, &SIG_ALGS)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SIG_ALGS.supported_schemes()
    }
}

/// Builds the client configuration once, at startup: a bad `WAYPOST_CA` is an error before the
/// child is spawned.
pub fn client_config(ca: &CaSource, skip_verify: bool) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls("configuring TLS", e))?;
    let mut config = if skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipVerify))
            .with_no_client_auth()
    } else {
        builder
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![waypost_proto::ALPN.to_vec()];
    // No session resumption: one long-lived connection, and less state held in memory.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

fn roots(ca: &CaSource) -> Result<RootCertStore, Error> {
    let (pem, origin): (Vec<u8>, String) = match ca {
        CaSource::Pem(text) => (text.clone().into_bytes(), "WAYPOST_CA".into()),
        CaSource::Path(p) => (
            std::fs::read(p).map_err(|e| Error::Env {
                name: "WAYPOST_CA",
                why: format!("cannot read {p}: {e}"),
            })?,
            p.clone(),
        ),
        CaSource::System => {
            let found = std::env::var("SSL_CERT_FILE")
                .ok()
                .into_iter()
                .chain(SYSTEM_BUNDLES.iter().map(|s| s.to_string()))
                .find_map(|p| std::fs::read(&p).ok().map(|b| (b, p)));
            found.ok_or_else(|| Error::Env {
                name: "WAYPOST_CA",
                why: "is unset and no system CA bundle was found; set it to the server's CA (PEM text or a file)"
                    .into(),
            })?
        }
    };
    let mut store = RootCertStore::empty();
    let mut bad = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        if cert.ok().is_none_or(|c| store.add(c).is_err()) {
            bad += 1;
        }
    }
    if store.is_empty() {
        return Err(Error::Env {
            name: "WAYPOST_CA",
            why: format!("{origin} holds no usable PEM certificate"),
        });
    }
    if bad > 0 && !matches!(ca, CaSource::System) {
        crate::warn!("{bad} certificates in {origin} could not be used");
    }
    Ok(store)
}

/// Where a connection is in its setup.
enum Phase {
    /// TCP connect in progress; then the proxy exchange if `proxy_req` is set, else TLS.
    Connecting { proxy_req: Option<Vec<u8>> },
    /// Talking to the HTTP proxy: `req[sent..]` still to send, then its reply header.
    Proxy {
        req: Vec<u8>,
        sent: usize,
        reply: Vec<u8>,
    },
    /// TLS handshake.
    Handshake,
    /// Ready for frames.
    Open,
}

/// What one read round produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// This many plaintext bytes were put into the buffer; call again.
    Data(usize),
    /// Nothing more until the socket is readable again.
    Blocked,
    /// The server closed the connection.
    Closed,
}

/// One connection to the server (or to the proxy in front of it).
pub struct Conn {
    sock: TcpStream,
    tls: ClientConnection,
    phase: Phase,
    /// The TCP stream has ended.
    eof: bool,
}

impl Conn {
    /// A connection whose TCP connect to `sock`'s peer has been started. `host` is the server's
    /// name (for SNI and certificate checks); `proxy_target` the `host:port` to ask an HTTP
    /// proxy for, when `sock` goes to a proxy.
    pub fn new(
        sock: TcpStream,
        config: Arc<ClientConfig>,
        host: &str,
        proxy_target: Option<&str>,
    ) -> Result<Conn, Error> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| Error::Env {
            name: "WAYPOST_SERVER",
            why: format!("{host:?} is not a valid host name"),
        })?;
        let mut tls =
            ClientConnection::new(config, name).map_err(|e| Error::Tls("starting TLS", e))?;
        tls.set_buffer_limit(Some(SEND_BUFFER));
        let proxy_req = proxy_target.map(|t| {
            format!(
                "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nUser-Agent: waypost-entrypoint/{}\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            )
            .into_bytes()
        });
        Ok(Conn {
            sock,
            tls,
            phase: Phase::Connecting { proxy_req },
            eof: false,
        })
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    /// The interest the socket needs now.
    pub fn interest(&self) -> Interest {
        let write = match &self.phase {
            Phase::Connecting { .. } => true,
            Phase::Proxy { req, sent, .. } => *sent < req.len(),
            Phase::Handshake | Phase::Open => self.tls.wants_write(),
        };
        if write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }

    /// Advances connect, proxy and handshake as far as the socket allows. `Ok(true)` exactly once:
    /// when the connection has just become open.
    pub fn drive(&mut self) -> Result<bool, Error> {
        loop {
            match &mut self.phase {
                Phase::Connecting { proxy_req } => {
                    if let Some(e) = self.sock.take_error().map_err(Error::io("connecting"))? {
                        return Err(Error::Io {
                            context: "connecting",
                            source: e,
                        });
                    }
                    match self.sock.peer_addr() {
                        Ok(_) => {
                            self.phase = match proxy_req.take() {
                                Some(req) => Phase::Proxy {
                                    req,
                                    sent: 0,
                                    reply: Vec::new(),
                                },
                                None => Phase::Handshake,
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
                        Err(e) => {
                            return Err(Error::Io {
                                context: "connecting",
                                source: e,
                            });
                        }
                    }
                }
                Phase::Proxy { req, sent, reply } => {
                    while *sent < req.len() {
                        match self.sock.write(&req[*sent..]) {
                            Ok(n) => *sent += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                return Err(Error::Io {
                                    context: "talking to the proxy",
                                    source: e,
                                });
                            }
                        }
                    }
                    // The reply header ends before the server says anything (it waits for our
                    // ClientHello), so whatever arrives now belongs to the header.
                    let mut buf = [0u8; 512];
                    match self.sock.read(&mut buf) {
                        Ok(0) => {
                            return Err(Error::Proxy("the proxy closed the connection".into()));
                        }
                        Ok(n) => reply.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(Error::Io {
                                context: "talking to the proxy",
                                source: e,
                            });
                        }
                    }
                    match proxy_reply(reply).map_err(Error::Proxy)? {
                        Some(n) if n == reply.len() => self.phase = Phase::Handshake,
                        Some(_) => {
                            return Err(Error::Proxy("the proxy sent data after its reply".into()));
                        }
                        None if reply.len() > PROXY_REPLY_CAP => {
                            return Err(Error::Proxy("the proxy's reply is too long".into()));
                        }
                        None => {}
                    }
                }
                Phase::Handshake => {
                    self.flush()?;
                    if !self.tls.is_handshaking() {
                        self.phase = Phase::Open;
                        return Ok(true);
                    }
                    match self.tls.read_tls(&mut self.sock) {
                        Ok(0) => {
                            return Err(Error::Proxy(
                                "the server closed the connection during the TLS handshake".into(),
                            ));
                        }
                        Ok(_) => {
                            self.tls
                                .process_new_packets()
                                .map_err(|e| Error::Tls("TLS handshake", e))?;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(Error::Io {
                                context: "TLS handshake",
                                source: e,
                            });
                        }
                    }
                }
                Phase::Open => return Ok(false),
            }
        }
    }

    /// Reads decrypted bytes into `space` (which must not be empty).
    pub fn read(&mut self, space: &mut [u8]) -> Result<Received, Error> {
        debug_assert!(!space.is_empty());
        loop {
            match self.tls.reader().read(space) {
                Ok(0) => return Ok(Received::Closed),
                Ok(n) => return Ok(Received::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.eof => {
                    return Ok(Received::Closed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The TCP stream ended without a TLS close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Received::Closed),
                Err(e) => {
                    return Err(Error::Io {
                        context: "reading from the server",
                        source: e,
                    });
                }
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    // EOF: the next round hands out what was still decrypted, then Closed.
                    self.tls
                        .process_new_packets()
                        .map_err(|e| Error::Tls("reading from the server", e))?;
                    self.eof = true;
                }
                Ok(_) => {
                    self.tls
                        .process_new_packets()
                        .map_err(|e| Error::Tls("reading from the server", e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Received::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Io {
                        context: "reading from the server",
                        source: e,
                    });
                }
            }
        }
    }

    /// Hands plaintext to TLS; returns how much it took (0: its send buffer is full, flush first).
    pub fn write(&mut self, data: &[u8]) -> usize {
        self.tls.writer().write(data).unwrap_or(0)
    }

    /// Writes encrypted bytes to the socket until it would block. `Ok(true)`: nothing left.
    pub fn flush(&mut self) -> Result<bool, Error> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Io {
                        context: "writing to the server",
                        source: e,
                    });
                }
            }
        }
        Ok(true)
    }

    /// Whether TLS still holds bytes to send.
    pub fn has_unsent(&self) -> bool {
        self.tls.wants_write()
    }

    /// A clean goodbye: TLS close_notify, best effort, then the TCP FIN.
    pub fn close(&mut self) {
        if self.is_open() {
            self.tls.send_close_notify();
            let _ = self.flush();
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }
}

/// Whether the proxy accepted the CONNECT: `Ok(Some(header length))`, `Ok(None)` = incomplete.
fn proxy_reply(reply: &[u8]) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(reply) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(n)) => match resp.code {
            Some(200..=299) => Ok(Some(n)),
            code => Err(format!(
                "the proxy refused the tunnel: {} {}",
                code.unwrap_or(0),
                resp.reason.unwrap_or("")
            )),
        },
        Err(e) => Err(format!("bad reply from the proxy: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_replies() {
        assert_eq!(
            proxy_reply(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(Some(39))
        );
        assert_eq!(
            proxy_reply(b"HTTP/1.0 200 OK\r\nProxy-Agent: x\r\n\r\n"),
            Ok(Some(35))
        );
        assert_eq!(proxy_reply(b"HTTP/1.1 200 Conn"), Ok(None));
        assert_eq!(proxy_reply(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        let e = proxy_reply(b"HTTP/1.1 403 Forbidden\r\n\r\n").unwrap_err();
        assert!(e.contains("403 Forbidden"), "{e}");
        assert!(proxy_reply(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn a_ca_that_is_not_pem_is_a_clear_error() {
        let e = client_config(
            &CaSource::Pem(
                "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
            ),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no usable PEM certificate"), "{e}");
        let e = client_config(&CaSource::Path("/nonexistent/ca.pem".into()), false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        assert!(
            client_config(&CaSource::System, true).is_ok(),
            "skip-verify needs no roots"
        );
    }
}
