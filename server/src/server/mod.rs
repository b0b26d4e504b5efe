//! `waypost server run`: one process, one SQLite file, three listeners (control, API, ingress).
//!
//! Start-up order: umask 077 → data dir (0700; modes checked) → database (migrate; rows left
//! live by a crash become "lost") → PKI → bind listeners → admin token + CLI context →
//! `server.json` → serve until SIGTERM/SIGINT.
//!
//! The data dir holds secrets (the database has the CA and server private keys, `admin-token`
//! the admin token), so it is owner-only: see [`PRIVATE_UMASK`] and [`check_data_dir`]. The admin
//! token never goes to the server's output unless that output is a terminal.
//!
//! Inside, four layers; a lower one never uses a higher one (`scripts/check-layers.sh` checks it
//! in `make test`; the table is in docs/architecture.md):
//!
//! | layer | what |
//! |---|---|
//! | `model` | plain types: ids, states, rows, the config model and its rules |
//! | `store` | the database: every SQL statement, the migrations; no SQLite type leaves it |
//! | `service` | live registry, config service, log service, the exec/tunnel mux, PKI, tokens |
//! | `transport` | the control listener, the HTTPS API, the URL ingress |
//!
//! This file is above them all: it starts the server and wires the layers together.

pub mod model;
pub mod service;
pub mod store;
pub mod transport;

// The paths these modules had before the layers (the CLI, the tests and the bench tools use
// them).
pub use service::{auth, live, mux as tunnel, pki};
pub use transport::{Shared, api, control, ingress};
/// The app-configuration rules and service (model/config.rs, service/config.rs).
pub mod config {
    pub use super::model::config::*;
    pub use super::service::config::*;
}
/// The log service and the logs endpoint (service/logs.rs, transport/api/logs.rs).
pub mod logs {
    pub use super::service::logs::*;
    pub use super::transport::api::logs::{INTAKE_HEADER, fmt_us, intake_json};
}
pub use transport::api::exec;

use crate::{context, util};
use anyhow::{Context as _, Result};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
pub use transport::wait_shutdown;

/// How often live instances' heartbeat data is written to SQLite.
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// On shutdown, connections get this long to close before the process exits anyway.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's umask, set before it creates anything: every file it creates is then 0600 and
/// every directory 0700, whatever umask it was started with. It has to be the umask (not only
/// explicit modes on our own files): SQLite creates the database and its -wal/-shm files itself
/// (the -wal/-shm with the database's mode), and they hold the CA and server private keys.
const PRIVATE_UMASK: u32 = 0o077;

/// Where a newly minted admin token goes when stdout is not a terminal (a service's stdout ends up
/// in journald or a container log, readable by more people than the token should be).
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Files in the data dir that are the server's own (`server.log` is written by `waypost up`'s
/// background server). A looser mode on one of them (an older version, a restore from a backup)
/// is tightened to 0600 at start, with a warning; anything else in the data dir is the user's
/// and only gets a warning.
const OWNED_FILES: &[&str] = &[
    "waypost.db",
    "waypost.db-wal",
    "waypost.db-shm",
    "server.json",
    "server.lock",
    "server.log",
    "ca.pem",
    ADMIN_TOKEN_FILE,
];

/// Options of `waypost server run`.
#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    pub control_addr: String,
    pub api_addr: String,
    pub url_domain: String,
    pub tls_san: Vec<String>,
    pub heartbeat: Duration,
    /// What entrypoints are told to connect to; default derived from the control listener.
    pub advertise_addr: Option<String>,
    /// Address of the URL-service ingress listener (plain HTTP). Port 0 picks a free port.
    pub ingress_addr: String,
    /// The ingress answers 504 when the app has not answered for this long.
    pub ingress_timeout: Duration,
    /// Address of the HTTPS ingress (transport/ingress_tls.rs); None: off. Port 0 picks a port.
    pub ingress_tls_addr: Option<String>,
    /// The plain ingress answers apps' requests with a 308 to the HTTPS ingress.
    pub ingress_redirect_https: bool,
    /// `HOST:PORT` other replicas reach this one at (checked by the CLI); None: not reachable.
    pub peer_addr: Option<String>,
    /// PostgreSQL shared by replicas; None: SQLite in the data dir.
    pub database: Option<store::Location>,
    /// Address of the metrics listener (transport/metrics.rs); None: off. Port 0 picks a port.
    pub metrics_addr: Option<String>,
    /// `--log-export`: the OTLP/HTTP collector every stored log line is forwarded to; None: off.
    pub log_export: Option<String>,
    /// The async runtime's worker threads; None: [`default_threads`].
    pub threads: Option<usize>,
}

/// `ip:port` a local client can connect to: an unspecified bind address becomes loopback.
fn local_connect_addr(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// Address given to entrypoints: a specific bind address as it is; for 0.0.0.0/:: the machine's
/// host name (which is in the certificate), since loopback would be wrong for remote instances.
fn advertised_control_addr(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("{}:{}", util::hostname().to_ascii_lowercase(), addr.port())
    } else {
        addr.to_string()
    }
}

async fn bind(what: &str, addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what} listener)"))
}

/// The host of a checked `HOST:PORT` (brackets of an IPv6 address removed).
fn peer_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Binds the peer listener for `--peer-addr HOST:PORT` (checked by the CLI): on HOST when it is an
/// IP address, else on every interface; returns it with the address to advertise (PORT 0
/// replaced by the port bound).
async fn bind_peer(addr: &str) -> Result<(TcpListener, String)> {
    let host = peer_host(addr);
    let port = addr.rsplit_once(':').map_or("0", |(_, p)| p);
    let bind_at = match host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port.parse().unwrap_or(0)),
        Err(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port.parse().unwrap_or(0)),
    };
    let listener = bind("peer", &bind_at.to_string()).await?;
    let bound = listener.local_addr()?.port();
    let advertised = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{host}]:{bound}"),
        _ => format!("{host}:{bound}"),
    };
    Ok((listener, advertised))
}

fn create_data_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))
}

/// Checks the modes in an existing data dir (a new one is 0700 and empty). The directory itself
/// only gets a warning: it may be a path the operator chose and shares on purpose (a volume, a
/// backup target), and with its files 0600 nothing secret is exposed through it. The server's own
/// files ([`OWNED_FILES`]) are tightened to 0600 (with a warning), since they hold the keys and
/// nobody else has a reason to read them; other files are left alone and named in a warning.
/// Symlinks are not followed (and not chmod'ed).
fn check_data_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            "the data directory {} has mode {mode:04o}: other users can look into it; \
             it holds the server's private keys, make it 0700 (chmod 700 {})",
            dir.display(),
            dir.display()
        );
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() || mode & 0o077 == 0 {
            continue;
        }
        let owned = meta.is_file()
            && entry
                .file_name()
                .to_str()
                .is_some_and(|n| OWNED_FILES.contains(&n));
        if owned {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} 0600", path.display()))?;
            tracing::warn!(
                "{} had mode {mode:04o} (readable by other users); changed it to 0600",
                path.display()
            );
        } else {
            tracing::warn!(
                "{} in the data directory has mode {mode:04o}: other users can read it",
                path.display()
            );
        }
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard limit: each instance holds one socket, and the
/// usual soft default (1024) would cap a server at about a thousand instances. Returns the soft
/// limit in force afterwards (`u64::MAX`: unlimited). The fleet simulator uses it too.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    // None is "unlimited".
    let (cur, max) = (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    );
    if cur < max {
        let wanted = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, wanted).is_ok() {
            tracing::debug!(from = cur, to = max, "raised the open-files limit");
            return max;
        }
    }
    cur
}

/// Takes an exclusive lock on `DATA_DIR/server.lock` for the life of the process, so two servers
/// never share one database. The kernel drops the lock when the process dies, even by SIGKILL.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("server.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let pid = std::fs::read_to_string(dir.join("server.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["pid"].as_u64())
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        anyhow::bail!(
            "another waypost server{pid} is already running with the data directory {}",
            dir.display()
        );
    }
    Ok(file)
}

/// Makes sure the CLI context holds a working admin token and this server's addresses.
/// Returns (token, context path, minted): a new admin token is minted on first start, or when the
/// context file is missing or holds a token this server does not know (e.g. it belonged to
/// another server) — whoever can start the server on this data dir may administer it.
fn ensure_context(
    st: &store::Store,
    api_addr: &str,
    control_addr: &str,
    ca_pem: &str,
) -> Result<(String, Option<PathBuf>, bool)> {
    let existing = match context::load() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "ignoring the unreadable CLI context file"
            );
            None
        }
    };
    let known = |token: &str| -> Result<bool> {
        let h = auth::hash_token(token);
        Ok(st.with(|c| store::lookup_token(c, &h))? == Some(model::TokenScope::Admin))
    };
    let (token, minted) = match existing {
        Some(ctx) if known(&ctx.admin_token)? => (ctx.admin_token, false),
        _ => {
            let token = auth::new_token(auth::ADMIN_PREFIX);
            let h = auth::hash_token(&token);
            st.with(|c| store::insert_token(c, &h, &model::TokenScope::Admin, util::now_ms()))?;
            (token, true)
        }
    };
    let ctx = context::Context {
        api_addr: api_addr.to_string(),
        ca_pem: ca_pem.to_string(),
        admin_token: token.clone(),
        control_addr: control_addr.to_string(),
    };
    match context::save(&ctx) {
        Ok(path) => Ok((token, Some(path), minted)),
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not write the CLI context file"
            );
            Ok((token, None, minted))
        }
    }
}

/// Installs the tracing subscriber: stderr, filter from `RUST_LOG` (`info` by default; the
/// syntax is `LEVEL` and/or `target=LEVEL` pairs, comma-separated).
pub fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| match s.parse::<Targets>() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("waypost: ignoring invalid RUST_LOG {s:?}: {e}");
                None
            }
        })
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .try_init();
}

/// Runs the server until SIGTERM/SIGINT.
pub fn run(opts: Options) -> Result<()> {
    // First of all, before any file is created (see PRIVATE_UMASK). Process-wide and before the
    // runtime's threads exist.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(PRIVATE_UMASK));
    init_logging();
    let threads = opts.threads.unwrap_or_else(default_threads);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .thread_name("waypost-server")
        .build()
        .context("starting the async runtime")?;
    tracing::debug!(threads, "runtime started");
    rt.block_on(run_async(opts))
}

/// The runtime's worker threads when `--threads` is not given: half the CPUs, at least one.
/// The server's work on them is moving bytes (frames, tunnel streams, the ingress) — each task
/// short, most of the time spent waking the next one — and every extra worker adds wake-ups of
/// idle workers that find nothing to steal: on 2 CPUs one worker moves ~10% more requests per
/// second through the ingress for ~12% less CPU per request than two (bench/REPORT.md). The
/// database, the log writer and password hashing have threads of their own. What one worker costs
/// is work over every instance at once (TLS for 10,000 config pushes or reconnections): a
/// machine serving many instances may want more (`--threads`).
fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.div_ceil(2)
}

async fn run_async(opts: Options) -> Result<()> {
    // Signals first, so a SIGTERM during start-up is not lost (default action would kill us
    // halfway through writing files).
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    raise_fd_limit();
    create_data_dir(&opts.data_dir)?;
    let _lock = lock_data_dir(&opts.data_dir)?;
    // Under the lock: a second server refused above must not touch a running one's files.
    check_data_dir(&opts.data_dir)?;
    let location = opts
        .database
        .clone()
        .unwrap_or_else(|| store::Location::Sqlite(opts.data_dir.join("waypost.db")));
    let st = store::Store::open(&location)?;
    tracing::info!(database = %location.describe(), "database open and migrated");
    // The peer listener is bound before joining: a `--peer-addr` with port 0 is advertised with
    // the port it got.
    let peer = match &opts.peer_addr {
        Some(addr) => Some(bind_peer(addr).await?),
        None => None,
    };
    let membership = Arc::new(service::members::Membership::join(
        &st,
        peer.as_ref().map(|(_, advertised)| advertised.clone()),
    )?);
    let lost = membership.expire_on_start(&location)?;
    if lost > 0 {
        tracing::info!(
            count = lost,
            "marked instances whose server is gone as lost"
        );
    }
    // One CA for every replica on the database: the first to start mints it, the others load
    // it (see service/pki.rs). The server certificate is this replica's own.
    let mut sans = opts.tls_san.clone();
    if let Some((_, advertised)) = &peer {
        // Other replicas check the peer listener's certificate against the name they dial.
        sans.push(peer_host(advertised).to_string());
    }
    let pki = st.with(|c| service::pki::load_or_create(c, &service::pki::wanted_sans(&sans)))?;
    util::write_atomic(&opts.data_dir.join("ca.pem"), pki.ca_pem.as_bytes(), 0o600)?;

    let control_tls = TlsAcceptor::from(pki::server_config(&pki, &[waypost_proto::ALPN])?);
    let api_tls = TlsAcceptor::from(pki::server_config(&pki, &[b"http/1.1"])?);
    let control_listener = bind("control", &opts.control_addr).await?;
    let api_listener = bind("API", &opts.api_addr).await?;
    let ingress_listener = bind("ingress", &opts.ingress_addr).await?;
    // The HTTPS ingress: the default certificate is signed now (never stored), custom domains'
    // come from the database (and follow its changes: ingress_tls.rs).
    anyhow::ensure!(
        !opts.ingress_redirect_https || opts.ingress_tls_addr.is_some(),
        "--ingress-redirect-https needs --ingress-tls-addr (where to redirect to)"
    );
    let domains = Arc::new(transport::ingress_tls::Domains::default());
    domains.set(st.with(|c| store::domains::list(c, None))?);
    let ingress_tls = match &opts.ingress_tls_addr {
        Some(addr) => {
            let signer = st.with(|c| pki::IngressSigner::load(c))?;
            let resolver =
                transport::ingress_tls::Resolver::new(domains.clone(), &opts.url_domain, signer)?;
            let tls = TlsAcceptor::from(transport::ingress_tls::server_config(Arc::new(resolver))?);
            Some((bind("ingress (TLS)", addr).await?, tls))
        }
        None => None,
    };
    // Metrics and health checks for Prometheus (transport/metrics.rs): plain HTTP, no token.
    let metrics_listener = match &opts.metrics_addr {
        Some(addr) => Some(bind("metrics", addr).await?),
        None => None,
    };
    let metrics_local = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let ingress_tls_local = match &ingress_tls {
        Some((l, _)) => Some(l.local_addr()?),
        None => None,
    };
    let ingress_local = ingress_listener.local_addr()?;
    let control_local = control_listener.local_addr()?;
    let api_local = api_listener.local_addr()?;
    let control_addr = opts
        .advertise_addr
        .clone()
        .unwrap_or_else(|| advertised_control_addr(control_local));
    let api_addr = local_connect_addr(api_local);

    let (admin_token, ctx_path, minted) =
        ensure_context(&st, &api_addr, &control_addr, &pki.ca_pem)?;

    println!("waypost: control listening on {control_local}");
    println!("waypost: api listening on {api_local}");
    println!("waypost: ingress listening on {ingress_local}");
    if let Some(addr) = ingress_tls_local {
        println!("waypost: ingress (TLS) listening on {addr}");
    }
    if let Some(addr) = metrics_local {
        println!("waypost: metrics listening on {addr}");
    }
    if minted {
        // Shown once to a person at a terminal; otherwise stdout is a log (journald, a container
        // log, `waypost up`'s server.log) and the token goes to an owner-only file instead.
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            println!("waypost: admin token: {admin_token}");
        } else {
            let path = opts.data_dir.join(ADMIN_TOKEN_FILE);
            util::write_atomic(&path, format!("{admin_token}\n").as_bytes(), 0o600)?;
            println!(
                "waypost: admin token written to {} (mode 0600)",
                path.display()
            );
        }
        match &ctx_path {
            Some(p) => println!(
                "waypost: CLI context written to {} (the CLI needs no setup)",
                p.display()
            ),
            None => println!(
                "waypost: no CLI context written; set WAYPOST_ADDR, WAYPOST_ADMIN_TOKEN, WAYPOST_CA"
            ),
        }
    }
    let info = json!({
        "pid": std::process::id(),
        "control_addr": control_local.to_string(),
        "api_addr": api_local.to_string(),
        "ingress_addr": ingress_local.to_string(),
        "ingress_tls_addr": ingress_tls_local.map(|a| a.to_string()),
        "metrics_addr": metrics_local.map(|a| a.to_string()),
        "version": crate::VERSION,
    });
    let server_json = opts.data_dir.join("server.json");
    util::write_atomic(&server_json, format!("{info:#}\n").as_bytes(), 0o600)?;
    tracing::info!(data_dir = %opts.data_dir.display(), control = %control_local, api = %api_local, "waypost server started");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        store: st.clone(),
        live: service::live::Registry::default(),
        heartbeat: opts.heartbeat,
        control_addr,
        api_addr,
        ca_pem: pki.ca_pem.clone(),
        url_domain: opts.url_domain.clone(),
        mux: Default::default(),
        ingress_addr: local_connect_addr(ingress_local),
        ingress_timeout: opts.ingress_timeout,
        pool: transport::ingress::Pool::default(),
        https: transport::ingress_tls::Https {
            domains,
            addr: ingress_tls_local.map(local_connect_addr),
            redirect: opts.ingress_redirect_https,
        },
        config: service::config::ConfigService::new(st.clone()),
        urlauth: service::urlauth::UrlAuthService::new(st.clone()),
        logs: service::logs::LogService::start_exporting(&location, opts.log_export.as_deref())?,
        replica: membership.id().to_string(),
        peers: transport::peer::Peers::new(&pki)?,
        shutdown: shutdown_rx,
    });
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::spawn(transport::control::serve(
        shared.clone(),
        control_listener,
        control_tls,
        done_tx.clone(),
    ));
    tokio::spawn(transport::api::serve(
        shared.clone(),
        api_listener,
        api_tls,
        done_tx.clone(),
    ));
    tokio::spawn(transport::ingress::serve(
        shared.clone(),
        ingress_listener,
        done_tx.clone(),
    ));
    if let Some((listener, tls)) = ingress_tls {
        tokio::spawn(transport::ingress_tls::serve(
            shared.clone(),
            listener,
            tls,
            done_tx.clone(),
        ));
    }
    if let Some(listener) = metrics_listener {
        tokio::spawn(transport::metrics::serve(
            shared.clone(),
            listener,
            done_tx.clone(),
        ));
    }
    // Custom domains added or removed on other replicas (PostgreSQL only).
    transport::ingress_tls::follow(shared.clone());
    if let Some((listener, advertised)) = peer {
        let tls = TlsAcceptor::from(pki::peer_server_config(&pki, &[b"http/1.1"])?);
        println!(
            "waypost: peer listening on {} (advertised as {advertised})",
            listener.local_addr()?
        );
        tokio::spawn(transport::peer::serve(
            shared.clone(),
            listener,
            tls,
            done_tx.clone(),
        ));
    }
    let flusher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let down = shared.shutdown.clone();
            service::live::flush_loop(&shared.live, &shared.store, FLUSH_INTERVAL, down).await
        })
    };
    let beats = tokio::spawn(membership.clone().heartbeat_loop(shared.shutdown.clone()));
    // Every scope and source loaded, dynamic values followed (service/resolve.rs); what the
    // resolver reads reaches the instances through the config service.
    if let Some(mut resolved) = shared.config.start().await? {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(e) = resolved.recv().await {
                // A value that cannot be applied now (the database is down: the epoch bump
                // failed) is retried until it can, or the instances would keep the old one
                // until the next change.
                let mut pause = Duration::from_millis(500);
                while let Err(err) = shared.config.on_resolved(e.clone()).await {
                    tracing::warn!(
                        error = format!("{err:#}"),
                        source = e.key.source,
                        path = e.key.path,
                        retry_in = ?pause,
                        "applying a dynamic config value failed"
                    );
                    if *shared.shutdown.borrow() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        });
    }
    // Config changes made on other replicas (PostgreSQL only; see service/fanout.rs).
    let stop_listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(mut reloads) = service::fanout::start(&location, stop_listening.clone()) {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(r) = reloads.recv().await {
                let done = match &r {
                    // URL access control changed (store/urlauth.rs): only a cache to drop.
                    service::fanout::Reload::App(p)
                        if p.starts_with(store::urlauth::CHANGED_PREFIX) =>
                    {
                        shared
                            .urlauth
                            .invalidate(&p[store::urlauth::CHANGED_PREFIX.len()..]);
                        Ok(())
                    }
                    // Tokens were revoked or deleted on some replica: close what used them here.
                    service::fanout::Reload::App(p) if p == store::config::TOKENS_CHANGED => {
                        close_revoked(&shared).await
                    }
                    service::fanout::Reload::App(app) => shared.config.reload(app).await,
                    service::fanout::Reload::All => {
                        shared.urlauth.invalidate_all();
                        // Notifications may have been missed while the listener was down.
                        if let Err(e) = close_revoked(&shared).await {
                            tracing::warn!(
                                error = format!("{e:#}"),
                                "checking live connections' tokens failed"
                            );
                        }
                        shared.config.reload_all().await
                    }
                };
                if let Err(e) = done {
                    tracing::warn!(error = format!("{e:#}"), reload = ?r, "config reload failed");
                }
            }
        });
    }
    drop(done_tx);

    let sig = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal = sig, "shutting down");
    let _ = shutdown_tx.send(true);
    stop_listening.store(true, std::sync::atomic::Ordering::Relaxed);
    // Wait for every connection task (each marks its instance disconnected); a second signal
    // or the timeout cuts this short.
    tokio::select! {
        _ = done_rx.recv() => {}
        _ = tokio::time::sleep(SHUTDOWN_TIMEOUT) => tracing::warn!("connections did not close in time"),
        _ = sigterm.recv() => tracing::warn!("second signal: exiting now"),
        _ = sigint.recv() => tracing::warn!("second signal: exiting now"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), flusher).await;
    let _ = beats.await;
    // Last: a replica that still holds connections must not look gone.
    if let Err(e) = membership.leave().await {
        tracing::warn!(
            error = format!("{e:#}"),
            "could not remove this replica's row"
        );
    }
    // Only remove server.json if it is still ours (a newer server may have replaced it).
    if let Ok(text) = std::fs::read_to_string(&server_json) {
        if serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["pid"].as_u64())
            == Some(std::process::id() as u64)
        {
            let _ = std::fs::remove_file(&server_json);
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Closes the connections held here whose token no longer exists (revoked, or its app deleted,
/// on another replica: that replica closed its own at once). Expired tokens are left alone, as
/// on the replica where they expire.
async fn close_revoked(shared: &Shared) -> Result<()> {
    let hashes: Vec<String> = shared.live.token_counts().into_keys().collect();
    if hashes.is_empty() {
        return Ok(());
    }
    let now = util::now_ms();
    let gone = shared
        .store
        .call(move |db| {
            let mut gone = Vec::new();
            for h in hashes {
                if store::lookup_token_at(db, &h, now)? == store::Lookup::Unknown {
                    gone.push(h);
                }
            }
            Ok(gone)
        })
        .await?;
    for h in gone {
        let n = shared.live.close_token(
            &h,
            "its token was revoked",
            transport::control::revoked_goodbye,
        );
        tracing::info!(
            connections = n,
            "closed connections whose token was revoked on another replica"
        );
    }
    Ok(())
}
