//! The API client used by the CLI (and the integration tests): one HTTPS/1.1 request per
//! connection over tokio-rustls, trusting exactly the server's CA.

use anyhow::{Context as _, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response body accepted (instance lists are bounded server-side).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// The API answered with an error status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

/// The server could not be reached at all (nothing listening, unreachable). `waypost up` uses
/// this to decide to start a server.
#[derive(Debug)]
pub struct Unreachable {
    pub addr: String,
    pub source: std::io::Error,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot reach the waypost API at {}: {}",
            self.addr, self.source
        )
    }
}

impl std::error::Error for Unreachable {}

#[derive(Clone)]
pub struct ApiClient {
    addr: String,
    token: Option<String>,
    tls: TlsConnector,
    server_name: ServerName<'static>,
}

/// Splits `host:port` / `[v6]:port` into the host part.
pub fn host_of(addr: &str) -> Result<&str> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("address {addr:?} must be host:port"))?;
    port.parse::<u16>()
        .with_context(|| format!("address {addr:?} has an invalid port"))?;
    Ok(host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host))
}

impl ApiClient {
    /// `addr` is `host:port`; `token` goes in `Authorization: Bearer` (None: no header, for
    /// tests); `ca_pem` is the only trust anchor.
    pub fn new(addr: &str, token: Option<String>, ca_pem: &str) -> Result<ApiClient> {
        let host = host_of(addr)?;
        let server_name = ServerName::try_from(host.to_string())
            .with_context(|| format!("{host:?} is not a valid host name or IP address"))?;
        let cfg = crate::server::pki::client_config(ca_pem, &[b"http/1.1"])?;
        Ok(ApiClient {
            addr: addr.to_string(),
            token,
            tls: TlsConnector::from(cfg),
            server_name,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request; returns the status and the body parsed as JSON (Null if empty).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value)> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| {
                anyhow!(
                    "the waypost API at {} did not answer within {REQUEST_TIMEOUT:?}",
                    self.addr
                )
            })?
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value)> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the API response: {e}"))?
            .to_bytes();
        let json = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| serde_json::json!({ "error": String::from_utf8_lossy(&body).trim().to_string() }))
        };
        Ok((status, json))
    }

    /// Sends one request and returns the response with its body unread, for streaming
    /// responses (`logs -f`). No overall timeout: the caller reads as long as it wants.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(Unreachable {
                    addr: self.addr.clone(),
                    source: e,
                }
                .into());
            }
            Err(_) => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(Unreachable {
                    addr: self.addr.clone(),
                    source: e,
                }
                .into());
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| {
                format!(
                    "TLS with the waypost API at {} failed (wrong CA?)",
                    self.addr
                )
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("waypost-cli/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        Ok(sender.send_request(req.body(Full::new(bytes))?).await?)
    }

    /// Sends a request and maps a non-2xx answer to [`ApiError`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T> {
        let (status, json) = self.request(method, path, body).await?;
        if !status.is_success() {
            let message = json["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
            return Err(ApiError { status, message }.into());
        }
        serde_json::from_value(json).context("unexpected response from the waypost API")
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        let v = serde_json::to_value(body)?;
        self.call(Method::POST, path, Some(&v)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:9702").unwrap(), "127.0.0.1");
        assert_eq!(host_of("[::1]:9702").unwrap(), "::1");
        assert_eq!(host_of("example.com:1").unwrap(), "example.com");
        assert!(host_of("example.com").is_err());
        assert!(host_of("example.com:x").is_err());
    }
}
