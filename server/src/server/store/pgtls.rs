//! TLS to PostgreSQL with rustls (ring), so `--database postgres://…?sslmode=require` encrypts
//! and verifies the way the rest of the server does, with no OpenSSL.
//!
//! `sslmode` is the URL's: `disable` (never TLS), `prefer` (the client library's default: TLS if
//! the server offers it) or `require` (TLS or no connection). Whenever TLS is used, the server's
//! certificate is verified — against `WAYPOST_DATABASE_CA` (a PEM file, or the PEM text itself)
//! when set, else the system bundle — and must name the host the URL dials. libpq's `require`
//! does not verify; ours always does, as its `verify-full` would: a database that holds the
//! cluster's CA key is not one to reach through an unverified connection.

use anyhow::{Context as _, Result, bail};
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The environment variable naming the CA that signed the database server's certificate.
pub const CA_ENV: &str = "WAYPOST_DATABASE_CA";
/// Where Debian (and most distributions) keep the system's trusted CAs.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The connector handed to the PostgreSQL client: rustls with the trusted CAs.
#[derive(Clone)]
pub struct Rustls(Arc<rustls::ClientConfig>);

impl Rustls {
    /// Trusts `WAYPOST_DATABASE_CA` if set, else the system bundle (if there is none, TLS
    /// connections fail verification with a clear error; plain ones still work).
    pub fn from_env() -> Result<Rustls> {
        let pem = match std::env::var(CA_ENV) {
            Ok(v) if v.trim_start().starts_with("-----BEGIN") => v,
            Ok(path) if !path.is_empty() => std::fs::read_to_string(&path)
                .with_context(|| format!("{CA_ENV}: reading {path}"))?,
            _ => std::fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default(),
        };
        Rustls::with_ca(&pem)
    }

    /// Trusts exactly the certificates in `pem` (none: every TLS connection fails verification).
    pub fn with_ca(pem: &str) -> Result<Rustls> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.context("the database CA is not valid PEM")?;
            // A bundle may hold certificates webpki cannot use; skip those, as browsers do.
            let _ = roots.add(cert);
        }
        if std::env::var(CA_ENV).is_ok_and(|v| !v.is_empty()) && roots.is_empty() {
            bail!("{CA_ENV} holds no usable certificate");
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        // TLS 1.3 only, as everywhere in the server (PostgreSQL speaks it since 12 with
        // OpenSSL 1.1.1).
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Rustls(Arc::new(cfg)))
    }
}

impl<S> MakeTlsConnect<S> for Rustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, Self::Error> {
        Ok(Connect {
            cfg: self.0.clone(),
            name: ServerName::try_from(host.to_string())?,
        })
    }
}

/// One connection's handshake.
pub struct Connect {
    cfg: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.cfg)
                .connect(self.name, stream)
                .await
                .map(Stream)
        })
    }
}

/// An established TLS connection to the database.
pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM channel binding (tls-server-end-point) is optional; without it SCRAM-SHA-256
        // still authenticates, over the verified TLS connection.
        ChannelBinding::none()
    }
}
