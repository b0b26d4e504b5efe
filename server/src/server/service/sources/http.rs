//! The HTTP client the source backends share: one HTTP/1.1 request per connection (a source is
//! read every few seconds at most, so pooling buys nothing), plain or over TLS 1.3 trusting the
//! source's own CA (`--ca`) or the system bundle, with a timeout on everything but a watch.

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Connecting (TCP and TLS) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request/response exchange (not a watch) may take this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body read into memory (a secret, a KV entry: small; the cap keeps a
/// misbehaving source from filling the server's memory).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Where the system's CA bundle is (Debian, Alpine, …) when a source has no `--ca`.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A source's base URL, ready to send requests to.
#[derive(Clone)]
pub struct Endpoint {
    /// `host:port` to dial.
    authority: String,
    /// Path prefix of the base URL without a trailing `/` ("" for none).
    prefix: String,
    /// Some: https.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// A whole response.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    /// The body as JSON (Null when empty).
    pub fn json(&self) -> Result<serde_json::Value> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| anyhow!("the answer is not JSON: {e}"))
    }
}

impl Endpoint {
    /// `addr` is `http://host:port[/prefix]` or `https://…`; `ca_pem` the CA(s) trusted for
    /// https (None: the system bundle).
    pub fn new(addr: &str, ca_pem: Option<&str>) -> Result<Endpoint> {
        let (https, rest) = if let Some(r) = addr.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = addr.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("source address {addr:?} must start with http:// or https://");
        };
        let (hostport, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if hostport.is_empty() {
            bail!("source address {addr:?} has no host");
        }
        let authority = if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !hostport.ends_with(']')
        {
            hostport.to_string()
        } else {
            format!("{hostport}:{}", if https { 443 } else { 80 })
        };
        let host = crate::client::host_of(&authority)?;
        let tls = if https {
            let pem = match ca_pem {
                Some(p) => p.to_string(),
                None => std::fs::read_to_string(SYSTEM_BUNDLE).with_context(|| {
                    format!("no --ca given and the system CA bundle {SYSTEM_BUNDLE} is unreadable")
                })?,
            };
            let cfg = crate::server::service::pki::client_config(&pem, &[b"http/1.1"])
                .context("the source's CA")?;
            let name = ServerName::try_from(host.to_string())
                .with_context(|| format!("{host:?} is not a valid host name or IP address"))?;
            Some((TlsConnector::from(cfg), name))
        } else {
            None
        };
        Ok(Endpoint {
            authority,
            prefix: prefix.to_string(),
            tls,
        })
    }

    /// Sends one request and reads the whole answer (at most [`MAX_BODY`]), within
    /// [`REQUEST_TIMEOUT`]. `path` starts with `/` and is appended to the base URL's prefix.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<Response> {
        let fut = async {
            let resp = self.send(method, path, headers, body).await?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the answer: {e}"))?
                .to_bytes();
            Ok(Response { status, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("no answer within {REQUEST_TIMEOUT:?}"))?
    }

    /// Sends one request and returns the response with its body unread (a watch): no timeout
    /// once the headers arrived.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| anyhow!("connecting to {} timed out", self.authority))?
            .with_context(|| format!("connecting to {}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("waypost/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(bytes))?;
        match &self.tls {
            None => send_on(tcp, req).await,
            Some((connector, name)) => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| anyhow!("TLS with {} timed out", self.authority))?
                        .with_context(|| {
                            format!("TLS with {} failed (wrong --ca?)", self.authority)
                        })?;
                send_on(tls, req).await
            }
        }
    }
}

async fn send_on<S>(
    io: S,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}

/// Keeps the type in one place for the backends' shared state.
pub type Shared = Arc<Endpoint>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base_urls() {
        let e = Endpoint::new("http://127.0.0.1:8200", None).unwrap();
        assert_eq!(e.authority, "127.0.0.1:8200");
        assert_eq!(e.prefix, "");
        let e = Endpoint::new("http://vault.internal/prefix/", None).unwrap();
        assert_eq!(e.authority, "vault.internal:80");
        assert_eq!(e.prefix, "/prefix");
        assert!(Endpoint::new("vault:8200", None).is_err());
        assert!(Endpoint::new("http://", None).is_err());
        let err = Endpoint::new("https://127.0.0.1:1", Some("not a pem"))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("CA"), "{err:#}");
    }
}
