//! Shared by the `url` and `exec` modules: the test app (`testapp.py`) under the REAL
//! entrypoint, connected to a real server; a small async HTTP client for the ingress.

use crate::common::Server;
use crate::common::entrypoint::{Builder, Entrypoint};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpStream;

/// The absolute path of python3 (the entrypoint runs with a cleared environment, so a PATH
/// shim that needs HOME would not work there). None, after a loud skip line, if there is none.
pub fn python() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        }
        _ => {
            eprintln!(
                "SKIPPED: python3 is needed for the test app (server/tests/it/apps/testapp.py)"
            );
            None
        }
    }
}

pub fn testapp() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/apps/testapp.py")
}

/// A port nothing listens on right now (bind 0, read it, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The ingress address the server reported in server.json.
pub fn ingress_addr(server: &Server) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.env.data_dir().join("server.json")).unwrap())
            .unwrap();
    v["ingress_addr"]
        .as_str()
        .expect("server.json has ingress_addr")
        .to_string()
}

/// The test app running under an entrypoint.
pub struct App {
    pub ep: Entrypoint,
    pub port: u16,
    /// The instance's hex id.
    pub id: String,
}

impl App {
    /// The entrypoint's resident set size (VmRSS), bytes.
    pub fn entrypoint_rss(&self) -> u64 {
        rss(self.ep.pid())
    }
}

pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Starts `testapp.py` as app `app` under the entrypoint (extra entrypoint env in `env`), and
/// waits until the instance is live and the app accepts connections. None: skipped (no python or
/// no entrypoint binary; the reason was printed).
pub fn start_app(server: &Server, app: &str, env: &[(&str, &str)]) -> Option<App> {
    let py = python()?;
    let port = free_port();
    let mut b = Builder::new(server, app, r#"exec "$PY" "$TESTAPP""#)
        .env("PY", py.to_str().unwrap())
        .env("TESTAPP", testapp().to_str().unwrap())
        .env("PORT", &port.to_string());
    for (k, v) in env {
        b = b.env(k, v);
    }
    let ep = b.spawn()?;
    let id = ep.instance(server)["id"].as_str().unwrap().to_string();
    crate::common::wait_for(&format!("the test app to listen on {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    Some(App { ep, port, id })
}

/// A multi-threaded runtime for a test's async part.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One HTTP/1.1 connection to the ingress, sending `Host: host`.
pub struct Http {
    sender: hyper::client::conn::http1::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
    >,
    host: String,
}

pub type ReqBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub fn empty() -> ReqBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

#[allow(dead_code)] // the harness's counterpart of `empty`; no test sends a fixed body now
pub fn full(b: impl Into<Bytes>) -> ReqBody {
    http_body_util::Full::new(b.into())
        .map_err(|never| match never {})
        .boxed()
}

/// `len` bytes of a deterministic stream (seeded), produced lazily in 64 KiB pieces.
pub fn stream_body(len: usize, seed: u8) -> ReqBody {
    let chunks = (0..len.div_ceil(65536)).map(move |i| {
        let n = 65536.min(len - i * 65536);
        Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(pattern(i, n, seed))))
    });
    http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed()
}

/// Piece `i` of the deterministic stream.
pub fn pattern(i: usize, n: usize, seed: u8) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed as u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// SHA-256 (hex) of the deterministic stream of `len` bytes.
pub fn stream_sha256(len: usize, seed: u8) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for i in 0..len.div_ceil(65536) {
        ctx.update(&pattern(i, 65536.min(len - i * 65536), seed));
    }
    crate::common::hex(ctx.finish().as_ref())
}

impl Http {
    pub async fn connect(addr: &str, host: &str) -> std::io::Result<Http> {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http {
            sender,
            host: host.to_string(),
        })
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ReqBody,
    ) -> hyper::Result<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if body.size_hint().exact().is_some_and(|n| n > 0) {
            req = req.header(
                "content-length",
                body.size_hint().exact().unwrap().to_string(),
            );
        }
        self.sender.ready().await?;
        self.sender.send_request(req.body(body).unwrap()).await
    }

    /// A GET returning (status, body as text).
    pub async fn get(&mut self, path: &str) -> hyper::Result<(u16, String)> {
        let resp = self.send("GET", path, &[], empty()).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// One GET on a new connection: (status, body text, x-waypost-error header).
pub async fn get_once(
    addr: &str,
    host: &str,
    path: &str,
) -> std::io::Result<(u16, String, String)> {
    let mut c = Http::connect(addr, host).await?;
    let resp = c
        .send("GET", path, &[], empty())
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let err = resp
        .headers()
        .get("x-waypost-error")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), err))
}

/// Streams a response body through SHA-256: (bytes, hex digest).
pub async fn sha256_body(body: Incoming) -> hyper::Result<(usize, String)> {
    let mut body = body;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len();
            ctx.update(&data);
        }
    }
    Ok((n, crate::common::hex(ctx.finish().as_ref())))
}

/// Bounded wait helper for async code.
pub async fn within<T>(what: &str, secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {secs}s: {what}"))
}
