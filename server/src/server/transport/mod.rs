//! The transports: the listeners and what they speak. `control` (TLS, the frame protocol, for
//! entrypoints), `api` (HTTPS JSON, for the CLI), `ingress` (plain HTTP, the URL service) and,
//! with `--peer-addr`, `peer` (TLS with client certificates: the hop between replicas).
//! They hold no state of their own beyond connections: everything they share is in [`Shared`]
//! (the services and the store), built by `server::run`.

pub mod api;
pub mod control;
pub mod ingress;
pub mod ingress_tls;
pub mod metrics;
pub mod peer;

use crate::server::service::{config::ConfigService, live, logs::LogService, mux::Mux};
use crate::server::store::Store;
use hyper::body::{Body, Incoming};
use hyper::rt::{Read, Write};
use hyper::service::HttpService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// State shared by every task of the server.
pub struct Shared {
    pub store: Store,
    pub live: live::Registry,
    pub heartbeat: Duration,
    /// `host:port` entrypoints connect to (given out with tokens).
    pub control_addr: String,
    /// `host:port` of the API, as written to the context file.
    pub api_addr: String,
    pub ca_pem: String,
    pub url_domain: String,
    /// Exec sessions and URL-service streams of live connections.
    pub mux: Arc<Mux>,
    /// `ip:port` of the ingress, as a local client reaches it (for `waypost url`).
    pub ingress_addr: String,
    pub ingress_timeout: Duration,
    /// The ingress's idle upstream connections per instance.
    pub pool: ingress::Pool,
    /// The HTTPS ingress's address and options, and the custom domains (ingress_tls.rs).
    pub https: ingress_tls::Https,
    /// App configuration: cache, pushes, Welcome snapshots.
    pub config: ConfigService,
    /// Who may reach each app's URL (the ingress asks it per request).
    pub urlauth: crate::server::service::urlauth::UrlAuthService,
    /// Log ingest (the writer thread) and reading.
    pub logs: LogService,
    /// This replica's id (service/members.rs), recorded on the instances it holds.
    pub replica: String,
    /// The client side of the replica-to-replica hop (peer.rs).
    pub peers: peer::Peers,
    /// Flips to true once on SIGTERM/SIGINT.
    pub shutdown: watch::Receiver<bool>,
}

/// The next connection on `listener` (TCP_NODELAY set), or None once shutdown is signalled.
/// Accept errors (EMFILE and friends) are logged and retried after a pause instead of spinning.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}

/// Resolves once shutdown has begun.
pub async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|&down| down).await;
}

/// Time an HTTP client has to send its request headers (slowloris guard); also closes idle
/// keep-alive connections after this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, in-flight requests get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one HTTP/1.1 connection (keep-alive, with upgrades: exec and the ingress's WebSockets)
/// until it ends; once shutdown begins, it finishes the requests in flight (at most
/// [`DRAIN_TIMEOUT`]) and closes. The one serve-and-drain of the API and the ingress.
pub(crate) async fn serve_http<I, S, B>(
    io: I,
    service: S,
    mut shutdown: watch::Receiver<bool>,
) -> hyper::Result<()>
where
    I: Read + Write + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = wait_shutdown(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(DRAIN_TIMEOUT, conn.as_mut()).await.unwrap_or(Ok(()))
        }
    }
}
