//! The HTTPS ingress (`--ingress-tls-addr`): TLS 1.3 in front of the same routing as the plain
//! ingress (every request goes to [`ingress::handle`]), HTTP/2 or HTTP/1.1 as ALPN picks, and the
//! custom domains of apps.
//!
//! Certificates, picked by SNI ([`Resolver`]):
//! - a custom domain (`waypost domain add`, store/domains.rs) → its own certificate;
//! - anything else → the default certificate for `*.URL_DOMAIN` and `URL_DOMAIN`, signed by the
//!   server CA at start (service/pki.rs [`IngressSigner`]). Under a single-label URL domain (the
//!   default `localhost`) clients refuse the wildcard, so an app host name `LABEL.URL_DOMAIN`
//!   gets a certificate of its own, signed on first use and kept (at most [`HOST_CERTS`]).
//!
//! The custom-domain table ([`Domains`]) also routes Host = DOMAIN to its app on both listeners
//! (ingress.rs `route`). It is loaded at start, after each change made through this replica's
//! API, and — on PostgreSQL — whenever another replica announces a change on
//! [`DOMAINS_CHANNEL`] (a thread `LISTEN`s, like service/fanout.rs's; a (re)connection reloads
//! the whole table, since notifications sent while it was down are lost).
//!
//! WebSockets (an HTTP/1.1 Upgrade) work as on the plain listener; an HTTP/2 connection carries
//! no upgrades (no extended CONNECT: browsers then open an HTTP/1.1 connection for them).

use crate::server::model::domains::{self, DomainRow};
use crate::server::service::pki::IngressSigner;
use crate::server::store::{self, Location, Store, domains::DOMAINS_CHANNEL};
use crate::server::transport::ingress::{self, HostRoute};
use crate::server::transport::{Shared, accept, wait_shutdown};
use anyhow::{Context as _, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

/// A visitor has this long to finish the TLS handshake (a silent connection holds a task).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an HTTP/1.1 client has to send its request headers; as on the plain ingress.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// On shutdown, in-flight requests get this long to finish; as on the plain ingress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-host certificates kept (single-label URL domains); beyond, the cache starts over.
pub const HOST_CERTS: usize = 4096;
/// How long one wait for domain notifications lasts: also how soon the thread sees it should stop.
const WAIT: Duration = Duration::from_millis(500);
/// Pause before reconnecting after the listening connection failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// What the ingresses need of the HTTPS side, in [`Shared`].
pub struct Https {
    /// The custom domains.
    pub domains: Arc<Domains>,
    /// `ip:port` of the HTTPS ingress as a local client reaches it; None: it is off.
    pub addr: Option<String>,
    /// `--ingress-redirect-https`: the plain ingress answers app requests with a 308 to HTTPS.
    pub redirect: bool,
}

impl Https {
    /// The `:PORT` of an https URL (nothing for 443); None while the HTTPS ingress is off.
    pub fn port_suffix(&self) -> Option<String> {
        let addr = self.addr.as_deref()?;
        Some(port_suffix(addr))
    }
}

fn port_suffix(addr: &str) -> String {
    match addr.rsplit_once(':').map(|(_, p)| p) {
        Some("443") | None => String::new(),
        Some(p) => format!(":{p}"),
    }
}

/// Marks a request that came in over the HTTPS ingress (a request extension), for
/// `X-Forwarded-Proto: https`.
#[derive(Debug, Clone, Copy)]
pub struct ViaTls;

/// The https URL of an app: `https://NAME.DOMAIN[:PORT]/` (`addr`: the HTTPS ingress's).
pub fn app_url(app: &str, domain: &str, addr: &str) -> String {
    format!(
        "https://{app}.{}{}/",
        domain.trim_end_matches('.'),
        port_suffix(addr)
    )
}

/// One custom domain as served.
struct Entry {
    app: String,
    key: Arc<CertifiedKey>,
}

/// The custom domains by name: their app and certificate. Replaced whole on a reload, so a
/// lookup never waits for the database.
#[derive(Default)]
pub struct Domains {
    map: RwLock<Arc<HashMap<String, Entry>>>,
}

impl Domains {
    fn current(&self) -> Arc<HashMap<String, Entry>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The app a Host header (port, trailing dot and case ignored) names as a custom domain.
    pub fn app_for(&self, host: &str) -> Option<String> {
        let map = self.current();
        if map.is_empty() {
            return None;
        }
        map.get(&normal_host(host)).map(|e| e.app.clone())
    }

    fn key_for(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.current().get(name).map(|e| e.key.clone())
    }

    /// Replaces the table with `rows`; a row whose certificate no longer parses is skipped
    /// (logged): its domain gets the default certificate and no routing.
    pub fn set(&self, rows: Vec<DomainRow>) {
        let mut map = HashMap::with_capacity(rows.len());
        for row in rows {
            match domains::row_key(&row) {
                Ok(key) => {
                    map.insert(row.domain, Entry { app: row.app, key });
                }
                Err(e) => tracing::warn!(
                    domain = row.domain,
                    app = row.app,
                    error = e,
                    "a stored custom domain's certificate is unusable; skipping it"
                ),
            }
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    /// Reloads the table from the database.
    pub async fn reload(&self, store: &Store) -> Result<()> {
        let rows = store
            .call(|c| store::domains::list(c, None))
            .await
            .context("loading the custom domains")?;
        tracing::debug!(count = rows.len(), "custom domains loaded");
        self.set(rows);
        Ok(())
    }
}

/// A Host header's host: lowercase, without port, trailing dot or IPv6 brackets' content.
fn normal_host(host: &str) -> String {
    let h = host.trim();
    let h = if h.starts_with('[') {
        h
    } else {
        h.rsplit_once(':').map_or(h, |(h, _)| h)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Picks the certificate by SNI: see the module doc.
pub struct Resolver {
    domains: Arc<Domains>,
    url_domain: String,
    wildcard: Arc<CertifiedKey>,
    /// Set when the URL domain is a single label (per-host certificates).
    signer: Option<IngressSigner>,
    hosts: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("url_domain", &self.url_domain)
            .finish_non_exhaustive()
    }
}

fn certified(
    provider: &rustls::crypto::CryptoProvider,
    (chain, key): (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
) -> Result<Arc<CertifiedKey>> {
    Ok(Arc::new(CertifiedKey::from_der(chain, key, provider)?))
}

impl Resolver {
    /// The resolver for `url_domain`, its default certificate signed by `signer` now.
    pub fn new(domains: Arc<Domains>, url_domain: &str, signer: IngressSigner) -> Result<Self> {
        let provider = rustls::crypto::ring::default_provider();
        let wildcard = certified(&provider, signer.wildcard(url_domain)?)
            .context("making the ingress's default certificate")?;
        let per_host = IngressSigner::for_host(url_domain);
        Ok(Resolver {
            domains,
            url_domain: url_domain.trim_end_matches('.').to_ascii_lowercase(),
            wildcard,
            signer: per_host.then_some(signer),
            hosts: Mutex::default(),
        })
    }

    /// The certificate for an SNI name (None: no SNI).
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else {
            return self.wildcard.clone();
        };
        if let Some(key) = self.domains.key_for(&name) {
            return key;
        }
        if let Some(signer) = &self.signer {
            if let HostRoute::Label(label) = ingress::host_route(&name, &self.url_domain) {
                return self.host_cert(signer, &label, name);
            }
        }
        self.wildcard.clone()
    }

    /// The certificate of `LABEL.URL_DOMAIN`, from the cache or signed now (the wildcard if the
    /// label is no possible app host, or signing fails).
    fn host_cert(&self, signer: &IngressSigner, label: &str, name: String) -> Arc<CertifiedKey> {
        let plausible = crate::util::valid_app_name(label)
            || ingress::split_instance(label).is_some_and(|(n, _)| crate::util::valid_app_name(n));
        if !plausible {
            return self.wildcard.clone();
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = hosts.get(&name) {
            return k.clone();
        }
        let provider = rustls::crypto::ring::default_provider();
        match signer
            .sign(std::slice::from_ref(&name))
            .and_then(|c| certified(&provider, c))
        {
            Ok(k) => {
                if hosts.len() >= HOST_CERTS {
                    hosts.clear();
                }
                hosts.insert(name, k.clone());
                k
            }
            Err(e) => {
                tracing::warn!(
                    host = name,
                    error = format!("{e:#}"),
                    "signing a host certificate failed"
                );
                self.wildcard.clone()
            }
        }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// The HTTPS ingress's TLS config: TLS 1.3, ring, ALPN `h2` then `http/1.1`, certificates by SNI.
pub fn server_config(resolver: Arc<Resolver>) -> Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts visitor connections until shutdown. `done`: see `control::serve`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: TlsAcceptor,
    done: mpsc::Sender<()>,
) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let Some((tcp, peer)) = accept(&listener, &mut shutdown, "ingress (TLS)").await else {
            break;
        };
        let shared = shared.clone();
        let tls = tls.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _done = done;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "ingress TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "ingress TLS handshake timed out");
                    return;
                }
            };
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let mut shutdown = shared.shutdown.clone();
            let svc_shared = shared.clone();
            let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(ViaTls);
                let shared = svc_shared.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(ingress::handle(&shared, peer, req).await)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true);
            builder.http2().timer(TokioTimer::new());
            // ALPN has decided; no guessing from the first bytes.
            let builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = wait_shutdown(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(DRAIN_TIMEOUT, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = r {
                tracing::debug!(%peer, h2, error = %e, "ingress (TLS) connection error");
            }
        });
    }
}

/// Keeps `domains` in step with the database: on PostgreSQL a thread `LISTEN`s on
/// [`DOMAINS_CHANNEL`] and every notification (and every (re)connection) reloads the table;
/// nothing on SQLite (one server: its own API reloads after each change). Ends at shutdown.
pub fn follow(shared: Arc<Shared>) {
    let location = shared.store.location().clone();
    let Location::Postgres(_) = location else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("waypost-domains".into())
        .spawn(move || listen_loop(&location, &tx, &thread_stop));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the custom-domain listener; domains added on other replicas are served here after a restart");
        return;
    }
    tokio::spawn(async move {
        let mut shutdown = shared.shutdown.clone();
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        break;
                    }
                    // Several notifications at once: one reload covers them.
                    while rx.try_recv().is_ok() {}
                    if let Err(e) = shared.https.domains.reload(&shared.store).await {
                        tracing::warn!(error = format!("{e:#}"), "reloading the custom domains failed");
                    }
                }
                _ = wait_shutdown(&mut shutdown) => break,
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
}

fn listen_loop(location: &Location, tx: &mpsc::UnboundedSender<()>, stop: &AtomicBool) {
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
        let db = match store::connect(location)
            .and_then(|db| store::listen(&db, DOMAINS_CHANNEL).map(|_| db))
        {
            Ok(db) => db,
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "custom-domain listener: cannot reach the database; retrying"
                    );
                    failing = true;
                }
                std::thread::sleep(RECONNECT_AFTER);
                continue;
            }
        };
        failing = false;
        // Whatever was announced while not listening is lost: reload everything once.
        if tx.send(()).is_err() {
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            match store::wait_notifications(&db, WAIT) {
                Ok(n) if n.is_empty() => {}
                Ok(_) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "custom-domain listener: connection lost; reconnecting"
                    );
                    std::thread::sleep(RECONNECT_AFTER);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: &CertifiedKey) -> Vec<String> {
        let ee = webpki::EndEntityCert::try_from(&k.cert[0]).unwrap();
        [
            "web.localhost",
            "web.example.com",
            "example.com",
            "a.b.example.com",
        ]
        .iter()
        .filter(|n| {
            let n = rustls::pki_types::ServerName::try_from(**n).unwrap();
            ee.verify_is_valid_for_subject_name(&n).is_ok()
        })
        .map(|s| s.to_string())
        .collect()
    }

    fn signer() -> IngressSigner {
        let db = store::memory();
        crate::server::service::pki::load_or_create(&db, &["localhost".into()]).unwrap();
        IngressSigner::load(&db).unwrap()
    }

    #[test]
    fn the_default_certificate_is_the_wildcard_of_the_url_domain() {
        let r = Resolver::new(Arc::default(), "example.com", signer()).unwrap();
        let k = r.pick(Some("web.example.com"));
        assert_eq!(names(&k), ["web.example.com", "example.com"]);
        assert!(Arc::ptr_eq(&k, &r.pick(None)));
        assert!(Arc::ptr_eq(&k, &r.pick(Some("unknown.test"))));
        assert_eq!(k.cert.len(), 2, "leaf and CA");
    }

    #[test]
    fn a_single_label_url_domain_gets_host_certificates_cached() {
        let r = Resolver::new(Arc::default(), "localhost", signer()).unwrap();
        let k = r.pick(Some("Web.localhost."));
        assert_eq!(names(&k), ["web.localhost"]);
        assert!(Arc::ptr_eq(&k, &r.pick(Some("web.localhost"))));
        // Not a possible app host: the wildcard, nothing signed.
        let w = r.pick(Some("a_b.localhost"));
        assert!(names(&w).is_empty(), "{:?}", names(&w));
        assert_eq!(r.hosts.lock().unwrap().len(), 1);
    }

    #[test]
    fn custom_domains_get_their_own_certificate_and_route() {
        let t = crate::util::now_ms() / 86_400_000;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["www.example.test".to_string()]).unwrap();
        let (y, m, d) = waypost_proto::date::civil_from_days(t + 30);
        p.not_after = rcgen::date_time_ymd(y as i32, m as u8, d as u8);
        let cert = p.self_signed(&key).unwrap();
        let domains = Arc::new(Domains::default());
        domains.set(vec![
            DomainRow {
                domain: "www.example.test".into(),
                app: "web".into(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                subject: String::new(),
                not_after: 0,
                created_at: 0,
            },
            DomainRow {
                domain: "broken.example.test".into(),
                app: "web".into(),
                cert_pem: "garbage".into(),
                key_pem: "garbage".into(),
                subject: String::new(),
                not_after: 0,
                created_at: 0,
            },
        ]);
        assert_eq!(
            domains.app_for("WWW.example.test.:8443").as_deref(),
            Some("web")
        );
        assert_eq!(domains.app_for("broken.example.test"), None);
        assert_eq!(domains.app_for("other.example.test"), None);
        let r = Resolver::new(domains.clone(), "localhost", signer()).unwrap();
        assert_eq!(r.pick(Some("www.example.test")).cert[0], *cert.der());
        domains.set(vec![]);
        assert_ne!(r.pick(Some("www.example.test")).cert[0], *cert.der());
    }
}
