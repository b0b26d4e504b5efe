//! `waypost-fleet`: N simulated entrypoints — tokio tasks speaking the real protocol (TLS
//! 1.3 + ALPN `waypost/1`, Hello → Welcome, Ping + Status every heartbeat, LogBatch with
//! sequence numbers and resend after reconnect, ConfigApplied, the entrypoint's jittered
//! exponential backoff) — against one server or several replicas sharing PostgreSQL, and what
//! that fleet costs the servers (and the database).
//!
//! Phases, one run:
//! 1. ramp: every instance connects (at most `--connect-concurrency` handshakes in flight, so
//!    the ramp measures the server, not a SYN flood);
//! 2. idle: logs paused, heartbeats only; server CPU over `--idle-window`, RSS per instance;
//! 3. logs: a trickle (`--log-lines-per-sec` per instance) for the rest of `--duration`; lines the
//!    server acknowledged per second;
//! 4. config: `waypost config set --app APP BENCH_FLEET_GEN=n` through the API; time until each
//!    instance has the new snapshot (p50/p99/max);
//! 5. burst: every instance sends batches back to back (one unacknowledged batch each) for
//!    `--burst`; the server's peak ingest rate;
//! 6. restart (with `--spawn-server`): SIGKILL the server, start it again on the same ports and
//!    data directory; time until every instance is welcomed again. With `--replicas N` (and
//!    `--database URL`) a failover instead: SIGKILL the last replica; time until its instances
//!    are welcomed by another (each instance starts at a random replica and moves to the next on
//!    loss, as the entrypoint does with a WAYPOST_SERVER list), and until the first replica's API
//!    lists them all live there.
//!
//! The simulator shares the machine with the server (that is the point of a loopback test), so
//! its own CPU is reported next to the server's.
//!
//! A simulated instance is made of the test kit's fake-entrypoint parts (`waypost_testkit`: the
//! TLS client config, the Hello, the frame encoder and reader) and the protocol's own backoff
//! and PRNG (`waypost_proto::{backoff, rand}`), but not of `waypost_testkit::Fake` itself: its
//! loop reads and writes one connection from two halves inside a `select!` and must live
//! through a lost server, where `Fake` panics.

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use rustix::process::Signal;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt as _, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::{sleep, sleep_until, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use waypost_proto::{self as proto, Frame, Kind, backoff, rand::next as next_random};
use waypost_testkit::{FrameReader, encode as frame_bytes};

/// Mirrors the entrypoint: TCP + TLS must finish within this, and the Welcome within as long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines a simulated instance keeps for resending before it drops the oldest (the entrypoint
/// keeps WAYPOST_LOG_BUFFER bytes; ~10,000 of these lines is about its 1 MiB default).
const MAX_UNACKED: u64 = 10_000;
/// Entries per LogBatch frame when resending or bursting.
const BATCH_LINES: u64 = 100;
/// Attempts at `waypost config set` before the figure is n/a.
const CONFIG_TRIES: usize = 5;
/// The config variable whose value marks a config generation.
const GEN_KEY: &str = "BENCH_FLEET_GEN";

/// Simulate a fleet of entrypoints against one server and report what it costs the server:
/// RSS per instance, CPU at idle, config propagation, log ingest, reconnect after a restart.
#[derive(Parser, Debug)]
#[command(name = "waypost-fleet", version)]
pub struct FleetArgs {
    /// Number of simulated entrypoints.
    #[arg(long, default_value_t = 1000)]
    instances: usize,
    /// Control address of an existing server, or several replicas' comma-separated (needs --ca
    /// and --token). Each instance starts at a random one and moves to the next on loss, as the
    /// entrypoint does with a WAYPOST_SERVER list.
    #[arg(long, value_name = "HOST:PORT[,...]", conflicts_with = "spawn_server", requires_all = ["ca", "token"])]
    server: Option<String>,
    /// The server's CA: PEM text, base64 of it, or a path.
    #[arg(long)]
    ca: Option<String>,
    /// An entrypoint token for the app the fleet joins.
    #[arg(long)]
    token: Option<String>,
    /// The existing server's pid, to read its RSS and CPU from /proc (default: from
    /// --server-data-dir/server.json, else not measured).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Start a private server (fresh data dir, free ports) for the run, and restart it at the end.
    #[arg(long)]
    spawn_server: bool,
    /// Data directory of the spawned server (default: a new temporary one, removed afterwards);
    /// with --replicas N > 1, replica i gets DIR/replica-i.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Server replicas to spawn (with --spawn-server; more than one needs --database). The run
    /// ends with a failover instead of a restart: the last replica is SIGKILLed and its instances
    /// move to the others.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    replicas: u16,
    /// A PostgreSQL URL the spawned replicas share (`server run --database`; each also gets
    /// `--peer-addr 127.0.0.1:0`). Default: SQLite in the data dir.
    #[arg(long, value_name = "URL", requires = "spawn_server")]
    database: Option<String>,
    /// The database server's main process (e.g. the postmaster's pid): its CPU, with its child
    /// processes', is reported next to the servers'.
    #[arg(long, value_name = "PID")]
    database_pid: Option<u32>,
    /// JSON results of another run (`--json`) to print side by side in the Markdown table, e.g.
    /// the one-server SQLite fleet next to replicas on PostgreSQL.
    #[arg(long, value_name = "FILE")]
    baseline: Option<PathBuf>,
    /// The `waypost` binary used to run the server and `config set` (default: the `waypost` next
    /// to this executable, else the one on PATH).
    #[arg(long)]
    waypost_bin: Option<PathBuf>,
    /// Heartbeat interval the spawned server gives its entrypoints.
    #[arg(long, default_value = "15s", value_parser = proto::parse_duration)]
    heartbeat_interval: Duration,
    /// Steady-state time after the ramp: the idle window, then logs for the rest.
    #[arg(long, default_value = "60s", value_parser = proto::parse_duration)]
    duration: Duration,
    /// Server CPU at idle fleet is measured over this long (logs paused, heartbeats only).
    #[arg(long, default_value = "30s", value_parser = proto::parse_duration)]
    idle_window: Duration,
    /// Log lines per second each instance sends during the log phase (batched every second).
    #[arg(long, default_value_t = 1.0)]
    log_lines_per_sec: f64,
    /// Length of the burst phase (0s: skip).
    #[arg(long, default_value = "10s", value_parser = proto::parse_duration)]
    burst: Duration,
    /// Skip the config-change phase.
    #[arg(long)]
    no_config: bool,
    /// Skip the server restart (only possible with --spawn-server anyway).
    #[arg(long)]
    no_restart: bool,
    /// Handshakes in flight during the initial ramp.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Source addresses, comma-separated (e.g. 127.0.0.1,127.0.0.2); default: enough 127.0.0.x
    /// for ~8,000 connections each when the server is on loopback.
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// How long to wait for the ramp, a config change, or the reconnect before giving up.
    #[arg(long, default_value = "300s", value_parser = proto::parse_duration)]
    phase_timeout: Duration,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the results as a Markdown table here (for bench/REPORT.md).
    #[arg(long)]
    markdown: Option<PathBuf>,
}

pub fn run(a: FleetArgs) -> Result<i32> {
    let limit = waypost::server::raise_fd_limit();
    if a.replicas > 1 && (!a.spawn_server || a.database.is_none()) {
        bail!("--replicas above 1 needs --spawn-server and --database (replicas share PostgreSQL)");
    }
    if (limit as usize) < a.instances + 64 {
        bail!(
            "the open-files limit is {limit}, too low for {} instances (raise the hard limit: ulimit -Hn)",
            a.instances
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fleet")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(fleet(a))
}

// ---- the simulated entrypoint -----------------------------------------------------------------

/// `Fleet::replica_of` of an instance without a connection.
const NONE: usize = usize::MAX;

const LOGS_OFF: u8 = 0;
const LOGS_TRICKLE: u8 = 1;
const LOGS_BURST: u8 = 2;

/// State shared by the coordinator and every simulated instance.
struct Fleet {
    /// The servers (replicas) an instance may connect to, in list order.
    targets: Vec<(SocketAddr, rustls::pki_types::ServerName<'static>)>,
    connector: TlsConnector,
    token: String,
    sources: Vec<IpAddr>,
    /// Limits handshakes in flight during the initial ramp only.
    ramp_gate: Semaphore,
    /// The log mode (LOGS_*); instances wake on a change, and not at all while it is off.
    logs: watch::Sender<u8>,
    lines_per_sec: f64,
    epoch: Instant,
    /// Per instance: when it was last welcomed (ns since `epoch` + 1; 0 = never).
    welcomed_at: Vec<AtomicU64>,
    /// Per instance: the index in `targets` of the server it is connected to (NONE: none).
    replica_of: Vec<AtomicUsize>,
    /// Per instance: the newest config generation it has, and when it got it.
    config_gen: Vec<AtomicU64>,
    config_at: Vec<AtomicU64>,
    ready: AtomicUsize,
    lines_sent: AtomicU64,
    lines_acked: AtomicU64,
    frames_sent: AtomicU64,
    rejects: AtomicU64,
    failures: AtomicU64,
    /// The app name from the first Welcome.
    app: OnceLock<String>,
    /// The heartbeat interval the server gave (ms, from the last Welcome).
    heartbeat_ms: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Fleet {
    fn stamp(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }
    fn at(&self, stamp: u64) -> Option<Instant> {
        (stamp > 0).then(|| self.epoch + Duration::from_nanos(stamp - 1))
    }
    fn note_error(&self, e: impl std::fmt::Display) {
        self.failures.fetch_add(1, Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }
}

/// What one simulated instance keeps across reconnects (the entrypoint's resume state).
struct Sim {
    idx: usize,
    id: [u8; 16],
    rng: u64,
    attempts: u32,
    /// The index in `targets` of the server the next attempt goes to.
    target: usize,
    /// Failed attempts in the current round through `targets`.
    failed_in_round: usize,
    /// Sequence number of the next new line.
    next_seq: u64,
    /// Every line below this is acknowledged by the server (or dropped).
    acked: u64,
    /// Lines below this were sent on the current connection.
    sent: u64,
    /// Lines dropped since the last batch (buffer full), reported in the next batch.
    dropped_unsent: u64,
    /// Fractional lines owed by the trickle.
    owed: f64,
    config_version: u64,
    /// Burst mode: the end of the batch in flight.
    in_flight: Option<u64>,
}

enum End {
    Stop,
    Lost,
    Rejected(Duration),
}

fn status(idx: usize, config_version: u64) -> proto::Status {
    proto::Status {
        state: proto::status::State::Running as i32,
        child_pid: 1000 + idx as u32,
        child_rss_bytes: 8 << 20,
        child_cpu_ms: 1,
        starts: 1,
        config_version,
        entrypoint_rss_bytes: 2 << 20,
        ..Default::default()
    }
}

fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// How a connection or an attempt ended, for the rounds over the server list.
enum Outcome {
    /// An established connection was lost.
    Lost,
    /// An attempt failed (refused, TLS, timeout, Reject with its retry hint).
    Failed(Duration),
}

impl Sim {
    /// Moves to the next server and returns the delay before the next attempt: the entrypoint's
    /// rounds over its server list. A lost connection starts a new round at the next entry after
    /// one backoff step; a failed attempt moves to the next entry at once, and only a round of
    /// failures backs off (with one server: every failure).
    fn next_attempt(&mut self, outcome: Outcome, n_targets: usize) -> Duration {
        let n_targets = n_targets.max(1);
        self.target = (self.target + 1) % n_targets;
        let (at_least, round_over) = match outcome {
            Outcome::Lost => {
                self.failed_in_round = 0;
                (Duration::ZERO, true)
            }
            Outcome::Failed(hint) => {
                self.failed_in_round += 1;
                (hint, self.failed_in_round >= n_targets)
            }
        };
        if !round_over {
            return at_least;
        }
        self.failed_in_round = 0;
        let d = backoff::delay(self.attempts, &mut self.rng);
        self.attempts = self.attempts.saturating_add(1);
        d.max(at_least)
    }

    /// A LogBatch of up to `max` unsent lines, or None.
    fn batch(&mut self, max: u64) -> Option<Kind> {
        // Drop the oldest beyond the resend buffer, as the entrypoint does.
        if self.next_seq - self.acked > MAX_UNACKED {
            let drop_to = self.next_seq - MAX_UNACKED;
            let unsent_from = self.sent.max(self.acked);
            if unsent_from < drop_to {
                self.dropped_unsent += drop_to - unsent_from;
                self.sent = drop_to;
            }
            self.acked = drop_to;
        }
        let from = self.sent.max(self.acked);
        if from >= self.next_seq {
            return None;
        }
        let to = self.next_seq.min(from + max);
        let ts = unix_us();
        let entries = (from..to)
            .map(|seq| proto::LogEntry {
                stream: proto::LogStream::Stdout as i32,
                timestamp_unix_us: ts,
                data: format!(
                    "fleet instance {:05} line {seq:08} GET /healthz 200 0.3ms ok",
                    self.idx
                )
                .into_bytes(),
                truncated: false,
            })
            .collect();
        let dropped = std::mem::take(&mut self.dropped_unsent);
        self.sent = to;
        Some(Kind::LogBatch(proto::LogBatch {
            first_seq: from,
            entries,
            dropped,
        }))
    }
}

async fn sim(f: Arc<Fleet>, idx: usize, mut stop: watch::Receiver<bool>) {
    let mut id = [0u8; 16];
    // Random like a real instance id (so runs do not collide in one data dir), then the index.
    rustix::rand::getrandom(&mut id[..8], rustix::rand::GetRandomFlags::empty())
        .expect("the kernel's random numbers");
    id[8..].copy_from_slice(&(idx as u64).to_be_bytes());
    let mut sim = Sim {
        idx,
        id,
        rng: u64::from_le_bytes(id[..8].try_into().expect("8 bytes")) | 1,
        attempts: 0,
        target: 0,
        failed_in_round: 0,
        next_seq: 0,
        acked: 0,
        sent: 0,
        dropped_unsent: 0,
        owed: 0.0,
        config_version: 0,
        in_flight: None,
    };
    // The first attempt goes to a random entry, so a fleet spreads over the replicas.
    let n_targets = f.targets.len().max(1);
    sim.target = (next_random(&mut sim.rng) % n_targets as u64) as usize;
    let mut first = true;
    loop {
        if f.stop.load(Relaxed) {
            return;
        }
        let end = session(&f, &mut sim, &mut stop, first).await;
        first = false;
        let outcome = match end {
            Ok(End::Stop) => return,
            Ok(End::Lost) => Outcome::Lost,
            Ok(End::Rejected(hint)) => Outcome::Failed(hint),
            Err(e) => {
                f.note_error(format!("{e:#}"));
                Outcome::Failed(Duration::ZERO)
            }
        };
        let delay = sim.next_attempt(outcome, n_targets);
        tokio::select! {
            _ = sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn connect(f: &Fleet, idx: usize, target: usize) -> Result<TlsStream<TcpStream>> {
    let (addr, server_name) = &f.targets[target];
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !f.sources.is_empty() {
        let src = f.sources[idx % f.sources.len()];
        if src.is_ipv4() == addr.is_ipv4() {
            use std::os::fd::AsRawFd as _;
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
            // IP_BIND_ADDRESS_NO_PORT: the port is picked at connect time per destination, so
            // binding the source address does not use up the ephemeral range.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            sock.bind(SocketAddr::new(src, 0))?;
        }
    }
    sock.set_nodelay(true)?;
    let tcp = sock.connect(*addr).await?;
    let tls = f.connector.connect(server_name.clone(), tcp).await?;
    if tls.get_ref().1.alpn_protocol() != Some(proto::ALPN) {
        bail!("the server did not negotiate ALPN waypost/1");
    }
    Ok(tls)
}

async fn send(
    wr: &mut WriteHalf<TlsStream<TcpStream>>,
    f: &Fleet,
    buf: &[u8],
    frames: u64,
) -> Result<()> {
    wr.write_all(buf).await?;
    wr.flush().await?;
    f.frames_sent.fetch_add(frames, Relaxed);
    Ok(())
}

/// One connection, from connect to loss. Err: the attempt failed before the Welcome.
async fn session(
    f: &Fleet,
    sim: &mut Sim,
    stop: &mut watch::Receiver<bool>,
    first: bool,
) -> Result<End> {
    let idx = sim.idx;
    let permit = if first {
        Some(f.ramp_gate.acquire().await.expect("never closed"))
    } else {
        None
    };
    let tls = tokio::select! {
        r = timeout(CONNECT_TIMEOUT, connect(f, idx, sim.target)) => r.context("connect timed out")??,
        _ = stop.changed() => return Ok(End::Stop),
    };
    let (rd, mut wr) = tokio::io::split(tls);
    let mut reader = FrameReader::new(rd);
    let mut buf = Vec::with_capacity(256);
    let hello = proto::Hello {
        entrypoint_version: "fleet-sim".into(),
        hostname: format!("fleet-{idx:05}"),
        pid: 1,
        disabled: None,
        config_version: sim.config_version,
        next_log_seq: sim.next_seq,
        status: Some(status(idx, sim.config_version)),
        ..waypost_testkit::hello(&f.token, &sim.id)
    };
    frame_bytes([Kind::Hello(hello)], &mut buf);
    send(&mut wr, f, &buf, 1).await?;
    let deadline = tokio::time::Instant::now() + WELCOME_TIMEOUT;
    let welcome = loop {
        let frame = tokio::select! {
            r = reader.next() => r?,
            _ = sleep_until(deadline) => bail!("no Welcome within {WELCOME_TIMEOUT:?}"),
            _ = stop.changed() => return Ok(End::Stop),
        };
        match frame.and_then(|f| f.kind) {
            Some(Kind::Welcome(w)) => break w,
            Some(Kind::Reject(r)) => {
                f.rejects.fetch_add(1, Relaxed);
                *f.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("rejected: {}", r.message));
                return Ok(End::Rejected(Duration::from_millis(u64::from(
                    r.retry_after_ms,
                ))));
            }
            Some(_) => continue,
            None => bail!("the server closed the connection before its Welcome"),
        }
    };
    drop(permit);
    sim.attempts = 0;
    let _ = f.app.set(welcome.app.clone());
    f.heartbeat_ms
        .store(u64::from(welcome.heartbeat_interval_ms), Relaxed);
    sim.failed_in_round = 0;
    f.replica_of[idx].store(sim.target, Relaxed);
    f.welcomed_at[idx].store(f.stamp(), Relaxed);
    f.ready.fetch_add(1, Relaxed);
    let end = ready(f, sim, stop, &mut reader, &mut wr, welcome).await;
    f.ready.fetch_sub(1, Relaxed);
    f.replica_of[idx].store(NONE, Relaxed);
    // Leave politely (close_notify + FIN) unless the connection is already gone.
    if matches!(end, Ok(End::Stop)) {
        let _ = timeout(Duration::from_secs(1), wr.shutdown()).await;
    }
    end
}

fn on_config(f: &Fleet, sim: &mut Sim, c: &proto::Config) -> Kind {
    sim.config_version = sim.config_version.max(c.version);
    if let Some(g) = c.env.get(GEN_KEY).and_then(|v| v.parse::<u64>().ok()) {
        if g > f.config_gen[sim.idx].load(Relaxed) {
            f.config_at[sim.idx].store(f.stamp(), Relaxed);
            f.config_gen[sim.idx].store(g, Relaxed);
        }
    }
    Kind::ConfigApplied(proto::ConfigApplied {
        version: c.version,
        error: String::new(),
    })
}

async fn ready(
    f: &Fleet,
    sim: &mut Sim,
    stop: &mut watch::Receiver<bool>,
    reader: &mut FrameReader<tokio::io::ReadHalf<TlsStream<TcpStream>>>,
    wr: &mut WriteHalf<TlsStream<TcpStream>>,
    welcome: proto::Welcome,
) -> Result<End> {
    let idx = sim.idx;
    let hb = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let mut buf = Vec::with_capacity(1024);
    // Resume: the server has everything below log_acked_seq; the rest goes again.
    sim.acked = sim.acked.max(welcome.log_acked_seq.min(sim.next_seq));
    sim.sent = sim.acked;
    sim.in_flight = None;
    let mut out = vec![Kind::Status(status(idx, sim.config_version))];
    if let Some(c) = &welcome.config {
        out.insert(0, on_config(f, sim, c));
    }
    frame_bytes(out, &mut buf);
    send(wr, f, &buf, 1).await?;
    let now = tokio::time::Instant::now();
    let mut next_beat = now + hb;
    let mut dead_at = now + hb * 3;
    // Log batches once a second, each instance at its own phase.
    let phase = Duration::from_micros(next_random(&mut sim.rng) % 1_000_000);
    let mut next_log = now + phase;
    let mut nonce = 0u64;
    let mut mode_rx = f.logs.subscribe();
    let mut logging = *mode_rx.borrow_and_update() != LOGS_OFF;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(End::Stop),
            _ = mode_rx.changed() => {
                logging = *mode_rx.borrow_and_update() != LOGS_OFF;
                next_log = tokio::time::Instant::now() + phase;
            }
            r = reader.next() => {
                let frame = match r {
                    Ok(Some(fr)) => fr,
                    Ok(None) | Err(_) => return Ok(End::Lost),
                };
                dead_at = tokio::time::Instant::now() + hb * 3;
                let reply = match frame.kind {
                    Some(Kind::Ping(p)) => Some(Kind::Pong(proto::Pong { nonce: p.nonce })),
                    Some(Kind::LogAck(a)) => {
                        let up = a.up_to_seq.min(sim.next_seq);
                        if up > sim.acked {
                            f.lines_acked.fetch_add(up - sim.acked, Relaxed);
                            sim.acked = up;
                        }
                        if sim.in_flight.is_some_and(|end| sim.acked >= end) {
                            sim.in_flight = None;
                            if *f.logs.borrow() == LOGS_BURST {
                                next_log = tokio::time::Instant::now();
                            }
                        }
                        None
                    }
                    Some(Kind::Config(c)) => Some(on_config(f, sim, &c)),
                    Some(Kind::ExecStart(s)) => Some(Kind::ExecExit(proto::ExecExit {
                        session: s.session, code: 126, signal: 0, error: "the fleet simulator runs no commands".into(),
                    })),
                    Some(Kind::StreamOpen(s)) => Some(Kind::StreamClose(proto::StreamClose {
                        stream: s.stream, half: false, error: "the fleet simulator has no app".into(),
                    })),
                    Some(Kind::Reject(r)) => {
                        f.rejects.fetch_add(1, Relaxed);
                        return Ok(End::Rejected(Duration::from_millis(u64::from(r.retry_after_ms))));
                    }
                    _ => None,
                };
                if let Some(k) = reply {
                    frame_bytes([k], &mut buf);
                    if send(wr, f, &buf, 1).await.is_err() {
                        return Ok(End::Lost);
                    }
                }
            }
            _ = sleep_until(next_beat) => {
                nonce += 1;
                frame_bytes([Kind::Ping(proto::Ping { nonce }), Kind::Status(status(idx, sim.config_version))], &mut buf);
                if send(wr, f, &buf, 2).await.is_err() {
                    return Ok(End::Lost);
                }
                next_beat += hb;
            }
            _ = sleep_until(dead_at) => return Ok(End::Lost),
            _ = sleep_until(next_log), if logging => {
                let mode = *f.logs.borrow();
                let now = tokio::time::Instant::now();
                let max = match mode {
                    LOGS_TRICKLE => {
                        sim.owed += f.lines_per_sec;
                        let n = sim.owed.floor();
                        sim.owed -= n;
                        sim.next_seq += n as u64;
                        f.lines_sent.fetch_add(n as u64, Relaxed);
                        next_log += Duration::from_secs(1);
                        u64::MAX
                    }
                    LOGS_BURST if sim.in_flight.is_none() => {
                        sim.next_seq = sim.next_seq.max(sim.sent) + BATCH_LINES;
                        f.lines_sent.fetch_add(BATCH_LINES, Relaxed);
                        // Until the ack comes back (or a slow server: a second later).
                        next_log = now + Duration::from_secs(1);
                        BATCH_LINES
                    }
                    _ => {
                        next_log = now + Duration::from_millis(200);
                        0
                    }
                };
                if next_log <= now {
                    next_log = now + Duration::from_secs(1);
                }
                // Unsent lines (new, or owed after a reconnect), in frames of BATCH_LINES.
                buf.clear();
                let mut frames = 0;
                let mut budget = if max == 0 { 0 } else { 10 };
                while budget > 0 {
                    let Some(k) = sim.batch(BATCH_LINES) else { break };
                    proto::encode(&Frame::from(k), &mut buf).expect("a batch fits a frame");
                    frames += 1;
                    budget -= 1;
                }
                if frames > 0 {
                    if mode == LOGS_BURST {
                        sim.in_flight = Some(sim.sent);
                    }
                    if send(wr, f, &buf, frames).await.is_err() {
                        return Ok(End::Lost);
                    }
                }
            }
        }
    }
}

// ---- measuring the server ---------------------------------------------------------------------

/// (utime + stime) of a process, seconds.
fn proc_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // After the comm: state is field 3, utime 14, stime 15 (1-based) → index 11, 12 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    Some(ticks as f64 / hz)
}

/// A `kB` field of /proc/PID/status, in KiB.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The parent pid of a process.
fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

/// CPU seconds of `pid` and its direct children: PostgreSQL's backends and background workers
/// are the postmaster's children. A child that exits within a window takes its CPU with it
/// (the servers' connections stay; autovacuum workers come and go).
fn tree_cpu_s(pid: u32) -> Option<f64> {
    let mut total = proc_cpu_s(pid)?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if proc_ppid(child) == Some(pid) {
            total += proc_cpu_s(child).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// Cores used over a window: per server (replica), by the database, by this simulator.
struct Cpu {
    servers: Vec<Option<f64>>,
    database: Option<f64>,
    sim: Option<f64>,
}

impl Cpu {
    /// All servers together (None when none was measured).
    fn servers_total(&self) -> Option<f64> {
        let v: Vec<f64> = self.servers.iter().flatten().copied().collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }
}

/// CPU of the servers, the database (a process tree) and this process over `window`.
async fn cpu_over(pids: &[Option<u32>], database: Option<u32>, window: Duration) -> Cpu {
    let me = std::process::id();
    let sample = || {
        (
            pids.iter()
                .map(|p| p.and_then(proc_cpu_s))
                .collect::<Vec<_>>(),
            database.and_then(tree_cpu_s),
            proc_cpu_s(me),
        )
    };
    let (s0, d0, m0) = sample();
    let t0 = Instant::now();
    sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let (s1, d1, m1) = sample();
    let d = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / secs);
    Cpu {
        servers: s0.into_iter().zip(s1).map(|(a, b)| d(a, b)).collect(),
        database: d(d0, d1),
        sim: d(m0, m1),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---- a spawned server -------------------------------------------------------------------------

struct Spawned {
    bin: PathBuf,
    data_dir: PathBuf,
    temp: bool,
    child: Option<std::process::Child>,
    pid: u32,
    control_addr: String,
    api_addr: String,
    heartbeat: Duration,
    ingress_flag: bool,
    /// `--database URL` (and then `--peer-addr 127.0.0.1:0`), else SQLite in the data dir.
    database: Option<String>,
}

impl Spawned {
    fn context_path(&self) -> PathBuf {
        self.data_dir.join("bench-context.json")
    }

    fn start(&mut self, control: &str, api: &str) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("server.log"))
            .context("opening the server log")?;
        let _ = std::fs::remove_file(self.data_dir.join("server.json"));
        let mut cmd = std::process::Command::new(&self.bin);
        cmd.args(["server", "run", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--control-addr", control, "--api-addr", api])
            .arg("--heartbeat-interval")
            .arg(format!("{}ms", self.heartbeat.as_millis()));
        if self.ingress_flag {
            cmd.args(["--ingress-addr", "127.0.0.1:0"]);
        }
        if let Some(url) = &self.database {
            cmd.args(["--database", url, "--peer-addr", "127.0.0.1:0"]);
        }
        // The metrics listener on a free port, not the default a running server may hold (older
        // servers ignore the variable).
        cmd.env("WAYPOST_CONTEXT", self.context_path())
            .env("WAYPOST_METRICS_ADDR", "127.0.0.1:0")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.pid = child.id();
        self.child = Some(child);
        // Ready once server.json names this process.
        let t0 = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(self.data_dir.join("server.json")) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if v["pid"].as_u64() == Some(u64::from(self.pid)) {
                        self.control_addr =
                            v["control_addr"].as_str().unwrap_or_default().to_string();
                        self.api_addr = v["api_addr"].as_str().unwrap_or_default().to_string();
                        return Ok(());
                    }
                }
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let tail =
                    std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                bail!(
                    "the server exited ({st}) during start-up: {}",
                    tail.join(" | ")
                );
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("the server did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(&mut self, sig: Signal) {
        if let Some(mut c) = self.child.take() {
            // Our own unreaped child: the pid cannot have been reused.
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, sig);
            }
            let t0 = Instant::now();
            loop {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(15) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn context(&self) -> Result<waypost::context::Context> {
        let bytes =
            std::fs::read(self.context_path()).context("reading the spawned server's context")?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill(Signal::TERM);
        if self.temp {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

// ---- the run ----------------------------------------------------------------------------------

/// How the CLI reaches the server's API: (address, admin token, CA PEM).
type ApiAccess = (String, String, String);

/// One replica's figures (with --replicas; JSON keys follow the field names).
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct ReplicaResults {
    control_addr: String,
    connected: usize,
    rss_base_kib: Option<u64>,
    rss_kib: Option<u64>,
    rss_per_instance_kib: Option<f64>,
    cpu_idle_cores: Option<f64>,
    config_reached: usize,
    config_p50_ms: Option<f64>,
    config_p99_ms: Option<f64>,
}

/// Figures of one run (JSON keys follow the field names; a `--baseline` file is read back into
/// this, missing keys as defaults).
#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Results {
    /// "sqlite" or "postgres".
    database: String,
    instances: usize,
    connected: usize,
    heartbeat_s: f64,
    ramp_s: Option<f64>,
    server_rss_base_kib: Option<u64>,
    server_rss_kib: Option<u64>,
    server_rss_per_instance_kib: Option<f64>,
    server_cpu_idle_cores: Option<f64>,
    sim_cpu_idle_cores: Option<f64>,
    log_lines_offered_per_s: Option<f64>,
    log_lines_acked_per_s: Option<f64>,
    server_cpu_logs_cores: Option<f64>,
    log_burst_lines_acked_per_s: Option<f64>,
    server_cpu_burst_cores: Option<f64>,
    config: Option<String>,
    config_p50_ms: Option<f64>,
    config_p99_ms: Option<f64>,
    config_max_ms: Option<f64>,
    config_reached: Option<usize>,
    config_cli_ms: Option<f64>,
    /// Errors of `config set` attempts that failed before one succeeded.
    config_failures: Option<String>,
    restart: Option<String>,
    restart_server_up_ms: Option<f64>,
    reconnect_all_from_kill_ms: Option<f64>,
    reconnect_all_from_up_ms: Option<f64>,
    reconnect_p50_ms: Option<f64>,
    reconnect_p99_ms: Option<f64>,
    reconnected: Option<usize>,
    server_rss_after_restart_kib: Option<u64>,
    /// With --replicas: per replica, in start order (the first takes `config set`, the last is
    /// killed).
    replicas: Vec<ReplicaResults>,
    /// With --database-pid: the database's cores (postmaster + children) per phase.
    database_cpu_idle_cores: Option<f64>,
    database_cpu_logs_cores: Option<f64>,
    database_cpu_burst_cores: Option<f64>,
    /// Failover (--replicas > 1): "ok" or why not; instances on the killed replica; how many of
    /// them were welcomed again by a survivor, and when (ms after the SIGKILL).
    failover: Option<String>,
    failover_moved: Option<usize>,
    failover_reconnected: Option<usize>,
    failover_all_ms: Option<f64>,
    failover_p50_ms: Option<f64>,
    failover_p99_ms: Option<f64>,
    /// When the API (on the first replica) first listed every instance live on a survivor, ms
    /// after the SIGKILL (polled every API_POLL).
    failover_api_all_live_ms: Option<f64>,
    failover_api_note: Option<String>,
    /// RSS of the surviving replica(s) with the whole fleet.
    failover_survivor_rss_kib: Option<u64>,
    rejects: u64,
    failed_attempts: u64,
    last_error: Option<String>,
    load_avg: String,
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn help_mentions(bin: &Path, args: &[&str], needle: &str) -> bool {
    std::process::Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(needle))
        .unwrap_or(false)
}

/// `waypost` next to this executable (both are built into the same target directory), else the
/// one on PATH.
fn default_waypost_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join("waypost")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("waypost"))
}

/// Waits until `done()` or the timeout; polls every 20 ms.
async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > limit {
            return false;
        }
        sleep(Duration::from_millis(20)).await;
    }
    true
}

async fn fleet(a: FleetArgs) -> Result<i32> {
    let bin = match &a.waypost_bin {
        Some(b) => b.clone(),
        None => default_waypost_bin(),
    };
    let mut res = Results {
        database: if a.database.is_some() {
            "postgres".into()
        } else {
            "sqlite".into()
        },
        instances: a.instances,
        heartbeat_s: a.heartbeat_interval.as_secs_f64(),
        ..Default::default()
    };

    // ---- the server(s) ----
    let mut spawned: Vec<Spawned> = Vec::new();
    // The temporary parent of the replicas' data dirs, removed at the end.
    let mut temp_base: Option<PathBuf> = None;
    let (controls, ca_pem, token, mut server_pids, api): (
        Vec<String>,
        _,
        _,
        Vec<Option<u32>>,
        Option<ApiAccess>,
    ) = if a.spawn_server {
        let (base, temp) = match &a.data_dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("waypost-fleet-{}", std::process::id())),
                true,
            ),
        };
        let many = a.replicas > 1;
        if many && temp {
            temp_base = Some(base.clone());
        }
        // One after the other: the first creates the CA in the shared database, the others
        // load it, so one CA PEM trusts every replica.
        for i in 0..a.replicas {
            let data_dir = if many {
                base.join(format!("replica-{i}"))
            } else {
                base.clone()
            };
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let mut s = Spawned {
                bin: bin.clone(),
                data_dir,
                temp: temp && !many,
                child: None,
                pid: 0,
                control_addr: String::new(),
                api_addr: String::new(),
                heartbeat: a.heartbeat_interval,
                ingress_flag: help_mentions(&bin, &["server", "run"], "--ingress-addr"),
                database: a.database.clone(),
            };
            s.start("127.0.0.1:0", "127.0.0.1:0")
                .with_context(|| format!("starting replica {i}"))?;
            spawned.push(s);
        }
        let s = &spawned[0];
        let ctx = s.context()?;
        let c = waypost::client::ApiClient::new(
            &s.api_addr,
            Some(ctx.admin_token.clone()),
            &ctx.ca_pem,
        )?;
        let _: serde_json::Value = c
            .post("/v1/apps", &json!({ "name": "fleet" }))
            .await
            .context("creating the app")?;
        let t: serde_json::Value = c
            .post("/v1/tokens", &json!({ "app": "fleet", "deployment": null }))
            .await
            .context("creating a token")?;
        let token = t["token"]
            .as_str()
            .context("the server's answer has no token")?
            .to_string();
        (
            spawned.iter().map(|s| s.control_addr.clone()).collect(),
            ctx.ca_pem.clone(),
            token,
            spawned.iter().map(|s| Some(s.pid)).collect(),
            Some((s.api_addr.clone(), ctx.admin_token, ctx.ca_pem)),
        )
    } else {
        let Some(server) = a.server.clone() else {
            bail!("give --spawn-server, or --server ADDR --ca PEM --token T");
        };
        let ca = waypost::cli::read_ca(a.ca.as_deref().unwrap_or_default())?;
        let controls: Vec<String> = server
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let mut pids = vec![None; controls.len()];
        pids[0] = a.server_pid;
        (
            controls,
            ca,
            a.token.clone().unwrap_or_default(),
            pids,
            None,
        )
    };

    let mut targets = Vec::new();
    for control in &controls {
        let addr: SocketAddr = tokio::net::lookup_host(control)
            .await
            .with_context(|| format!("resolving {control}"))?
            .next()
            .with_context(|| format!("{control} has no address"))?;
        let host = waypost::client::host_of(control)?.to_string();
        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
            .with_context(|| format!("server name {host}"))?;
        targets.push((addr, server_name));
    }
    let addr = targets.first().context("no server address")?.0;
    // Every reconnect is a full handshake, like a fresh entrypoint (the test kit's config has
    // resumption off: no ticket from the old server).
    let tls = waypost_testkit::client_config(&ca_pem, Some(proto::ALPN))?;
    let sources = if !a.sources.is_empty() {
        a.sources.clone()
    } else if addr.ip().is_loopback() && addr.is_ipv4() && a.instances > 8000 {
        (1..=a.instances.div_ceil(8000) as u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect()
    } else {
        Vec::new()
    };
    let n = a.instances;
    let f = Arc::new(Fleet {
        targets,
        connector: TlsConnector::from(Arc::new(tls)),
        token,
        sources,
        ramp_gate: Semaphore::new(a.connect_concurrency.max(1)),
        logs: watch::Sender::new(LOGS_OFF),
        lines_per_sec: a.log_lines_per_sec,
        epoch: Instant::now(),
        welcomed_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
        replica_of: (0..n).map(|_| AtomicUsize::new(NONE)).collect(),
        config_gen: (0..n).map(|_| AtomicU64::new(0)).collect(),
        config_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
        ready: AtomicUsize::new(0),
        lines_sent: AtomicU64::new(0),
        lines_acked: AtomicU64::new(0),
        frames_sent: AtomicU64::new(0),
        rejects: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        app: OnceLock::new(),
        heartbeat_ms: AtomicU64::new(0),
        last_error: std::sync::Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    if server_pids[0].is_none() {
        server_pids[0] = (|| {
            let text = std::fs::read_to_string(a.data_dir.as_ref()?.join("server.json")).ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()?["pid"]
                .as_u64()
                .map(|p| p as u32)
        })();
    }
    sleep(Duration::from_millis(500)).await;
    let rss = |pids: &[Option<u32>]| -> Vec<Option<u64>> {
        pids.iter()
            .map(|p| p.and_then(|p| proc_status_kb(p, "VmRSS")))
            .collect()
    };
    let sum = |v: &[Option<u64>]| -> Option<u64> {
        let known: Vec<u64> = v.iter().flatten().copied().collect();
        (!known.is_empty()).then(|| known.iter().sum())
    };
    let rss_base = rss(&server_pids);
    res.server_rss_base_kib = sum(&rss_base);
    eprintln!(
        "fleet: {n} instances against {controls:?} (server pids {server_pids:?}, sources {:?})",
        f.sources
    );

    // ---- ramp ----
    let (stop_tx, stop_rx) = watch::channel(false);
    let t_ramp = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for idx in 0..n {
        tasks.spawn(sim(f.clone(), idx, stop_rx.clone()));
    }
    let all_welcomed = |f: &Fleet| f.welcomed_at.iter().all(|w| w.load(Relaxed) > 0);
    let ramp_ok = {
        let f2 = f.clone();
        let mut last = Instant::now();
        wait_for(a.phase_timeout, move || {
            if last.elapsed() > Duration::from_secs(5) {
                last = Instant::now();
                eprintln!("fleet: ramp: {} of {n} connected", f2.ready.load(Relaxed));
            }
            all_welcomed(&f2)
        })
        .await
    };
    res.connected = f.ready.load(Relaxed);
    if ramp_ok {
        res.ramp_s = Some(t_ramp.elapsed().as_secs_f64());
        eprintln!(
            "fleet: all {n} connected in {:.1} s",
            t_ramp.elapsed().as_secs_f64()
        );
    } else {
        eprintln!(
            "fleet: only {} of {n} connected within {:?}",
            res.connected, a.phase_timeout
        );
    }

    // ---- idle ----
    let hb = f.heartbeat_ms.load(Relaxed);
    if hb > 0 {
        res.heartbeat_s = hb as f64 / 1000.0;
    }
    sleep(Duration::from_secs(3)).await;
    let idle = a.idle_window.min(a.duration);
    eprintln!("fleet: idle window {idle:?} (heartbeats only)");
    let cpu = cpu_over(&server_pids, a.database_pid, idle).await;
    res.server_cpu_idle_cores = cpu.servers_total();
    res.sim_cpu_idle_cores = cpu.sim;
    res.database_cpu_idle_cores = cpu.database;
    let rss_now = rss(&server_pids);
    res.server_rss_kib = sum(&rss_now);
    if let (Some(r), Some(b)) = (res.server_rss_kib, res.server_rss_base_kib) {
        let c = f.ready.load(Relaxed).max(1);
        res.server_rss_per_instance_kib = Some((r.saturating_sub(b)) as f64 / c as f64);
    }
    if controls.len() > 1 {
        res.replicas = (0..controls.len())
            .map(|r| {
                let connected = f.replica_of.iter().filter(|x| x.load(Relaxed) == r).count();
                let (base, now) = (rss_base[r], rss_now[r]);
                ReplicaResults {
                    control_addr: controls[r].clone(),
                    connected,
                    rss_base_kib: base,
                    rss_kib: now,
                    rss_per_instance_kib: base
                        .zip(now)
                        .map(|(b, n)| n.saturating_sub(b) as f64 / connected.max(1) as f64),
                    cpu_idle_cores: cpu.servers[r],
                    ..Default::default()
                }
            })
            .collect();
    }

    // ---- log trickle ----
    let log_window = a.duration.saturating_sub(idle);
    if log_window >= Duration::from_secs(2) && a.log_lines_per_sec > 0.0 {
        eprintln!(
            "fleet: log trickle for {log_window:?} ({} lines/s per instance)",
            a.log_lines_per_sec
        );
        f.logs.send_replace(LOGS_TRICKLE);
        // Let the first batches and acks flow before measuring.
        sleep(Duration::from_secs(1)).await;
        let (s0, a0) = (f.lines_sent.load(Relaxed), f.lines_acked.load(Relaxed));
        let t0 = Instant::now();
        let cpu = cpu_over(
            &server_pids,
            a.database_pid,
            log_window - Duration::from_secs(1),
        )
        .await;
        let secs = t0.elapsed().as_secs_f64();
        res.log_lines_offered_per_s = Some((f.lines_sent.load(Relaxed) - s0) as f64 / secs);
        res.log_lines_acked_per_s = Some((f.lines_acked.load(Relaxed) - a0) as f64 / secs);
        res.server_cpu_logs_cores = cpu.servers_total();
        res.database_cpu_logs_cores = cpu.database;
    }

    // ---- config change ----
    if !a.no_config {
        res.config = Some(config_phase(&a, &f, &bin, api.as_ref(), &mut res).await);
    }

    // ---- burst ----
    if !a.burst.is_zero() {
        eprintln!("fleet: log burst for {:?}", a.burst);
        f.logs.send_replace(LOGS_BURST);
        sleep(Duration::from_secs(1)).await;
        let a0 = f.lines_acked.load(Relaxed);
        let t0 = Instant::now();
        let cpu = cpu_over(&server_pids, a.database_pid, a.burst).await;
        res.log_burst_lines_acked_per_s =
            Some((f.lines_acked.load(Relaxed) - a0) as f64 / t0.elapsed().as_secs_f64());
        res.server_cpu_burst_cores = cpu.servers_total();
        res.database_cpu_burst_cores = cpu.database;
    }
    f.logs.send_replace(LOGS_OFF);
    // Let the last acks arrive so the restart does not measure a resend storm of old lines only.
    sleep(Duration::from_secs(2)).await;

    // ---- restart (one server) or failover (replicas) ----
    if spawned.len() > 1 && !a.no_restart {
        failover_phase(&a, &f, &mut spawned, api.as_ref(), &mut res).await;
        res.restart = Some("n/a (replicas: failover instead)".into());
    } else {
        match spawned.first_mut() {
            Some(s) if !a.no_restart => {
                let (control_addr, api_addr) = (s.control_addr.clone(), s.api_addr.clone());
                eprintln!(
                    "fleet: restarting the server (SIGKILL, then the same ports and data dir)"
                );
                let t_kill = Instant::now();
                s.kill(Signal::KILL);
                let started = s.start(&control_addr, &api_addr);
                match started {
                    Err(e) => res.restart = Some(format!("the server did not come back: {e:#}")),
                    Ok(()) => {
                        let t_up = Instant::now();
                        res.restart_server_up_ms = Some((t_up - t_kill).as_secs_f64() * 1e3);
                        let kill_stamp = (t_kill - f.epoch).as_nanos() as u64 + 1;
                        let f2 = f.clone();
                        let ok = wait_for(a.phase_timeout, move || {
                            f2.welcomed_at.iter().all(|w| w.load(Relaxed) > kill_stamp)
                        })
                        .await;
                        let mut lat: Vec<f64> = f
                            .welcomed_at
                            .iter()
                            .filter_map(|w| f.at(w.load(Relaxed)).filter(|&t| t > t_kill))
                            .map(|t| (t - t_kill).as_secs_f64() * 1e3)
                            .collect();
                        lat.sort_by(f64::total_cmp);
                        res.reconnected = Some(lat.len());
                        res.reconnect_p50_ms = Some(percentile(&lat, 50.0));
                        res.reconnect_p99_ms = Some(percentile(&lat, 99.0));
                        if ok {
                            let all = *lat.last().unwrap_or(&0.0);
                            res.reconnect_all_from_kill_ms = Some(all);
                            res.reconnect_all_from_up_ms =
                                Some(all - (t_up - t_kill).as_secs_f64() * 1e3);
                            res.restart = Some("ok".into());
                        } else {
                            res.restart = Some(format!(
                                "only {} of {n} reconnected within {:?}",
                                lat.len(),
                                a.phase_timeout
                            ));
                        }
                        sleep(Duration::from_secs(2)).await;
                        res.server_rss_after_restart_kib = proc_status_kb(s.pid, "VmRSS");
                    }
                }
            }
            Some(_) => res.restart = Some("skipped (--no-restart)".into()),
            None => res.restart = Some("n/a (needs --spawn-server)".into()),
        }
    }

    // ---- stop ----
    f.stop.store(true, Relaxed);
    let _ = stop_tx.send(true);
    let _ = timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    res.rejects = f.rejects.load(Relaxed);
    res.failed_attempts = f.failures.load(Relaxed);
    res.last_error = f
        .last_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    res.load_avg = load_avg();
    drop(spawned);
    if let Some(base) = temp_base {
        let _ = std::fs::remove_dir_all(base);
    }

    let text = summary(&res);
    print!("{text}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&res)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.markdown {
        let text = if res.replicas.is_empty() && a.baseline.is_none() {
            markdown(&res)
        } else {
            let baseline = match &a.baseline {
                None => None,
                Some(b) => Some(
                    std::fs::read(b)
                        .map_err(anyhow::Error::from)
                        .and_then(|j| Ok(serde_json::from_slice::<Results>(&j)?))
                        .with_context(|| format!("reading the baseline {}", b.display()))?,
                ),
            };
            markdown_side_by_side(&res, baseline.as_ref())
        };
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(if ramp_ok { 0 } else { 1 })
}

/// How often the failover phase asks the API whether every instance is live on a survivor.
const API_POLL: Duration = Duration::from_millis(500);

/// SIGKILLs the last replica and measures how long its instances take to be welcomed by a
/// survivor (they move on loss, as the entrypoint does with a server list), and when the API of
/// the first replica lists every instance live again, none on the killed one.
async fn failover_phase(
    a: &FleetArgs,
    f: &Arc<Fleet>,
    spawned: &mut [Spawned],
    api: Option<&ApiAccess>,
    res: &mut Results,
) {
    let victim = spawned.len() - 1;
    let moved: Vec<usize> = (0..f.replica_of.len())
        .filter(|&i| f.replica_of[i].load(Relaxed) == victim)
        .collect();
    res.failover_moved = Some(moved.len());
    eprintln!(
        "fleet: failover: SIGKILL replica {victim} ({} instances on it)",
        moved.len()
    );
    let t_kill = Instant::now();
    spawned[victim].kill(Signal::KILL);
    let kill_stamp = (t_kill - f.epoch).as_nanos() as u64 + 1;
    let (f2, moved2) = (f.clone(), moved.clone());
    let ok = wait_for(a.phase_timeout, move || {
        moved2
            .iter()
            .all(|&i| f2.welcomed_at[i].load(Relaxed) > kill_stamp)
    })
    .await;
    let mut lat: Vec<f64> = moved
        .iter()
        .filter_map(|&i| f.at(f.welcomed_at[i].load(Relaxed)).filter(|&t| t > t_kill))
        .map(|t| (t - t_kill).as_secs_f64() * 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    res.failover_reconnected = Some(lat.len());
    res.failover_p50_ms = Some(percentile(&lat, 50.0));
    res.failover_p99_ms = Some(percentile(&lat, 99.0));
    if ok {
        res.failover_all_ms = lat.last().copied().or(Some(0.0));
        res.failover = Some("ok".into());
    } else {
        res.failover = Some(format!(
            "only {} of {} moved within {:?}",
            lat.len(),
            moved.len(),
            a.phase_timeout
        ));
    }
    // The server's view: the survivors' own rows say live, the killed replica's rows are marked
    // lost by a survivor once its heartbeat is overdue, then replaced as its instances return.
    res.failover_api_note = Some(match api {
        None => "n/a (no API access)".into(),
        Some((addr, token, ca)) => match api_all_live(f, addr, token, ca, t_kill, a).await {
            Ok(ms) => {
                res.failover_api_all_live_ms = Some(ms);
                "ok".into()
            }
            Err(e) => format!("{e:#}"),
        },
    });
    res.failover_survivor_rss_kib = spawned[..victim]
        .iter()
        .filter_map(|s| proc_status_kb(s.pid, "VmRSS"))
        .reduce(|x, y| x + y);
}

/// Polls `GET /v1/instances?app=APP` until it lists every simulated instance live, each on the
/// replica the simulator is connected to; ms after `t0`.
async fn api_all_live(
    f: &Fleet,
    addr: &str,
    token: &str,
    ca: &str,
    t0: Instant,
    a: &FleetArgs,
) -> Result<f64> {
    let app = f.app.get().context("no instance connected")?;
    let c = waypost::client::ApiClient::new(addr, Some(token.to_string()), ca)?;
    let ids: std::collections::HashSet<String> = (0..f.welcomed_at.len())
        .map(|i| format!("fleet-{i:05}"))
        .collect();
    loop {
        let v: serde_json::Value = c.get(&format!("/v1/instances?app={app}")).await?;
        let rows = v
            .as_array()
            .or_else(|| v["instances"].as_array())
            .context("the instance list is not an array")?;
        let live: Vec<&serde_json::Value> = rows
            .iter()
            .filter(|r| r["live"].as_bool() == Some(true))
            .filter(|r| r["hostname"].as_str().is_some_and(|h| ids.contains(h)))
            .collect();
        let mut by_replica = std::collections::BTreeMap::<String, usize>::new();
        for r in &live {
            *by_replica
                .entry(r["replica"].as_str().unwrap_or("-").to_string())
                .or_default() += 1;
        }
        // Every instance live, and no live row still on more replicas than survive.
        if live.len() >= ids.len() && by_replica.len() < f.targets.len() {
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }
        let last = format!("{} live rows by replica {by_replica:?}", live.len());
        if t0.elapsed() > a.phase_timeout {
            bail!("the API never listed every instance live on a survivor: {last}");
        }
        sleep(API_POLL).await;
    }
}

/// Changes the config through the API (`waypost config set`) and waits for every instance to
/// have it. Returns "ok" or why the figure is n/a.
async fn config_phase(
    a: &FleetArgs,
    f: &Arc<Fleet>,
    bin: &Path,
    api: Option<&ApiAccess>,
    res: &mut Results,
) -> String {
    if !help_mentions(bin, &["config", "set"], "--app") {
        return "n/a (`waypost config set` is not built yet)".into();
    }
    let Some(app) = f.app.get().cloned() else {
        return "n/a (no instance connected)".into();
    };
    let gen_value = 1 + f
        .config_gen
        .iter()
        .map(|g| g.load(Relaxed))
        .max()
        .unwrap_or(0);
    eprintln!("fleet: config change ({GEN_KEY}={gen_value}) to all instances");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "config",
        "set",
        "--app",
        &app,
        &format!("{GEN_KEY}={gen_value}"),
    ]);
    if let Some((addr, token, ca)) = api {
        cmd.env("WAYPOST_ADDR", addr)
            .env("WAYPOST_ADMIN_TOKEN", token)
            .env("WAYPOST_CA", ca);
    }
    // A failed `config set` is retried (as a user would) and reported with the figure.
    let mut failures = Vec::new();
    let t0 = loop {
        let t0 = Instant::now();
        let out = match cmd.output().await {
            Ok(o) => o,
            Err(e) => return format!("n/a (running `waypost config set`: {e})"),
        };
        res.config_cli_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        if out.status.success() {
            break t0;
        }
        failures.push(String::from_utf8_lossy(&out.stderr).trim().to_string());
        if failures.len() >= CONFIG_TRIES {
            return format!(
                "n/a (`waypost config set` failed {CONFIG_TRIES} times: {})",
                failures.join(" / ")
            );
        }
        sleep(Duration::from_secs(1)).await;
    };
    if !failures.is_empty() {
        res.config_failures = Some(failures.join(" / "));
    }
    let f2 = f.clone();
    let ok = wait_for(a.phase_timeout.min(Duration::from_secs(120)), move || {
        f2.config_gen.iter().all(|g| g.load(Relaxed) >= gen_value)
    })
    .await;
    let mut lat: Vec<f64> = f
        .config_gen
        .iter()
        .zip(&f.config_at)
        .filter(|(g, _)| g.load(Relaxed) >= gen_value)
        .filter_map(|(_, t)| f.at(t.load(Relaxed)))
        .map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    res.config_reached = Some(lat.len());
    res.config_p50_ms = Some(percentile(&lat, 50.0));
    res.config_p99_ms = Some(percentile(&lat, 99.0));
    res.config_max_ms = lat.last().copied();
    // Per replica: the change is made through the first replica's API; the others learn it from
    // the database's notification.
    for (r, rr) in res.replicas.iter_mut().enumerate() {
        let mut lat: Vec<f64> = (0..f.config_gen.len())
            .filter(|&i| f.replica_of[i].load(Relaxed) == r)
            .filter(|&i| f.config_gen[i].load(Relaxed) >= gen_value)
            .filter_map(|i| f.at(f.config_at[i].load(Relaxed)))
            .map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3)
            .collect();
        lat.sort_by(f64::total_cmp);
        rr.config_reached = lat.len();
        rr.config_p50_ms = Some(percentile(&lat, 50.0));
        rr.config_p99_ms = Some(percentile(&lat, 99.0));
    }
    if ok {
        "ok".into()
    } else {
        format!("only {} of {} got it", lat.len(), f.welcomed_at.len())
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "n/a".into(),
    }
}

fn summary(r: &Results) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<44} {v}\n"));
    line(
        "instances (connected at ramp end)",
        format!("{} ({})", r.instances, r.connected),
    );
    line("ramp, s", opt(r.ramp_s, 1));
    line(
        "server RSS before / with fleet, KiB",
        format!(
            "{} / {}",
            r.server_rss_base_kib
                .map_or("n/a".into(), |v| v.to_string()),
            r.server_rss_kib.map_or("n/a".into(), |v| v.to_string())
        ),
    );
    line(
        "server RSS per instance, KiB",
        opt(r.server_rss_per_instance_kib, 1),
    );
    line(
        &format!("server CPU at idle fleet (hb {}s), cores", r.heartbeat_s),
        opt(r.server_cpu_idle_cores, 4),
    );
    line(
        "simulator CPU at idle fleet, cores",
        opt(r.sim_cpu_idle_cores, 4),
    );
    line(
        "log lines offered / acked per s (trickle)",
        format!(
            "{} / {}",
            opt(r.log_lines_offered_per_s, 0),
            opt(r.log_lines_acked_per_s, 0)
        ),
    );
    line(
        "log lines acked per s (burst)",
        opt(r.log_burst_lines_acked_per_s, 0),
    );
    line(
        "config change",
        r.config.clone().unwrap_or_else(|| "skipped".into()),
    );
    line(
        "config to all: p50 / p99 / max, ms",
        format!(
            "{} / {} / {}",
            opt(r.config_p50_ms, 1),
            opt(r.config_p99_ms, 1),
            opt(r.config_max_ms, 1)
        ),
    );
    for (i, x) in r.replicas.iter().enumerate() {
        line(
            &format!("replica {i}: instances / RSS per instance KiB"),
            format!("{} / {}", x.connected, opt(x.rss_per_instance_kib, 1)),
        );
        line(
            &format!("replica {i}: config p50 / p99, ms"),
            format!("{} / {}", opt(x.config_p50_ms, 1), opt(x.config_p99_ms, 1)),
        );
    }
    if r.database_cpu_idle_cores.is_some() {
        line(
            "database CPU idle / trickle / burst, cores",
            format!(
                "{} / {} / {}",
                opt(r.database_cpu_idle_cores, 3),
                opt(r.database_cpu_logs_cores, 3),
                opt(r.database_cpu_burst_cores, 3)
            ),
        );
    }
    if let Some(fo) = &r.failover {
        line("failover", fo.clone());
        line(
            "failover: moved / all back, p50, p99 ms",
            format!(
                "{} of {} / {} {} {}",
                r.failover_reconnected.unwrap_or(0),
                r.failover_moved.unwrap_or(0),
                opt(r.failover_all_ms, 0),
                opt(r.failover_p50_ms, 0),
                opt(r.failover_p99_ms, 0)
            ),
        );
        line(
            "failover: API all live on survivor, ms",
            format!(
                "{} ({})",
                opt(r.failover_api_all_live_ms, 0),
                r.failover_api_note.clone().unwrap_or_default()
            ),
        );
    }
    line("restart", r.restart.clone().unwrap_or_default());
    line(
        "server back up after kill, ms",
        opt(r.restart_server_up_ms, 0),
    );
    line(
        "all reconnected after kill / after up, ms",
        format!(
            "{} / {}",
            opt(r.reconnect_all_from_kill_ms, 0),
            opt(r.reconnect_all_from_up_ms, 0)
        ),
    );
    line(
        "reconnect p50 / p99 after kill, ms",
        format!(
            "{} / {}",
            opt(r.reconnect_p50_ms, 0),
            opt(r.reconnect_p99_ms, 0)
        ),
    );
    line(
        "rejects / failed attempts",
        format!("{} / {}", r.rejects, r.failed_attempts),
    );
    if let Some(e) = &r.last_error {
        line("last error", e.clone());
    }
    line("load average at end", r.load_avg.clone());
    s
}

fn markdown(r: &Results) -> String {
    let kib = |v: Option<u64>| v.map_or("n/a".into(), |v| format!("{:.1} MiB", v as f64 / 1024.0));
    let mut s = String::new();
    s.push_str("| fleet figure | value | baseline / note |\n|---|---|---|\n");
    let mut row = |k: &str, v: String, b: String| s.push_str(&format!("| {k} | {v} | {b} |\n"));
    row(
        "instances connected",
        format!("{} of {}", r.connected, r.instances),
        format!("ramp {} s (≤ 64 handshakes in flight)", opt(r.ramp_s, 1)),
    );
    row(
        "server RSS per connected instance",
        format!("{} KiB", opt(r.server_rss_per_instance_kib, 1)),
        format!(
            "server RSS {} with the fleet vs {} before it",
            kib(r.server_rss_kib),
            kib(r.server_rss_base_kib)
        ),
    );
    row(
        "server CPU at idle fleet",
        format!(
            "{} % of one core",
            opt(r.server_cpu_idle_cores.map(|c| c * 100.0), 2)
        ),
        format!(
            "heartbeat {} s, logs paused; the simulator itself: {} %",
            r.heartbeat_s,
            opt(r.sim_cpu_idle_cores.map(|c| c * 100.0), 2)
        ),
    );
    row(
        "log ingest, trickle",
        format!("{} lines/s acked", opt(r.log_lines_acked_per_s, 0)),
        format!(
            "offered {} lines/s; server CPU {} %",
            opt(r.log_lines_offered_per_s, 0),
            opt(r.server_cpu_logs_cores.map(|c| c * 100.0), 1)
        ),
    );
    row(
        "log ingest, burst",
        format!("{} lines/s acked", opt(r.log_burst_lines_acked_per_s, 0)),
        format!(
            "every instance 100-line batches back to back; server CPU {} %",
            opt(r.server_cpu_burst_cores.map(|c| c * 100.0), 1)
        ),
    );
    let config_note = match r.config.as_deref() {
        Some("ok") => format!(
            "reached {} of {}; `config set` took {} ms{}",
            r.config_reached.unwrap_or(0),
            r.instances,
            opt(r.config_cli_ms, 0),
            r.config_failures
                .as_ref()
                .map_or(String::new(), |e| format!(
                    "; **earlier attempts failed**: {}",
                    e.replace('|', "/")
                ))
        ),
        Some(other) => other.to_string(),
        None => "skipped".into(),
    };
    row(
        "config change to all: p50 / p99 / max",
        format!(
            "{} / {} / {} ms",
            opt(r.config_p50_ms, 1),
            opt(r.config_p99_ms, 1),
            opt(r.config_max_ms, 1)
        ),
        config_note,
    );
    let restart_note = match r.restart.as_deref() {
        Some("ok") => format!(
            "SIGKILL, same ports + data dir; server listening again after {} ms; p50 / p99 {} / {} ms",
            opt(r.restart_server_up_ms, 0),
            opt(r.reconnect_p50_ms, 0),
            opt(r.reconnect_p99_ms, 0)
        ),
        Some(other) => other.to_string(),
        None => "skipped".into(),
    };
    row(
        "all reconnected after a restart",
        format!(
            "{} ms after the kill ({} ms after the server was up)",
            opt(r.reconnect_all_from_kill_ms, 0),
            opt(r.reconnect_all_from_up_ms, 0)
        ),
        restart_note,
    );
    row(
        "server RSS after the reconnect",
        kib(r.server_rss_after_restart_kib),
        "fresh process, whole fleet reconnected".into(),
    );
    if r.rejects > 0 || r.failed_attempts > 0 {
        row(
            "rejects / failed connection attempts",
            format!("{} / {}", r.rejects, r.failed_attempts),
            format!(
                "attempts refused while the server was down for the restart count here; last error: {}",
                r.last_error.clone().unwrap_or_default().replace('|', "/")
            ),
        );
    }
    s
}

/// The replicas run's table, with a baseline run (e.g. one server on SQLite) in its own column.
fn markdown_side_by_side(r: &Results, b: Option<&Results>) -> String {
    let mib = |v: Option<u64>| v.map_or("n/a".into(), |v| format!("{:.1} MiB", v as f64 / 1024.0));
    let pct = |v: Option<f64>| format!("{} %", opt(v.map(|c| c * 100.0), 1));
    let label = |x: &Results| {
        let n = x.replicas.len().max(1);
        format!(
            "{n} {} + {}",
            if n == 1 { "server" } else { "replicas" },
            if x.database == "postgres" {
                "PostgreSQL"
            } else {
                "SQLite"
            }
        )
    };
    let name = |i: usize| (b'A' + i as u8) as char;
    let per = |f: &dyn Fn(&ReplicaResults) -> String| {
        r.replicas
            .iter()
            .enumerate()
            .map(|(i, x)| format!("{}: {}", name(i), f(x)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let none = Results::default();
    let base = b.unwrap_or(&none);
    let mut s = String::new();
    s.push_str(&format!(
        "| fleet figure | {} | {} | note |\n|---|---|---|---|\n",
        label(r),
        b.map_or("baseline".into(), label)
    ));
    let mut row = |k: &str, v: String, bv: String, note: String| {
        let bv = if b.is_some() { bv } else { "—".into() };
        s.push_str(&format!(
            "| {k} | {v} | {bv} | {} |\n",
            note.replace('|', "/")
        ))
    };
    let connected = |x: &Results| format!("{} of {}", x.connected, x.instances);
    row(
        "instances connected",
        connected(r),
        connected(base),
        if r.replicas.is_empty() {
            String::new()
        } else {
            format!("per replica {}", per(&|x| x.connected.to_string()))
        },
    );
    row(
        "time to connect them all (ramp)",
        format!("{} s", opt(r.ramp_s, 1)),
        format!("{} s", opt(base.ramp_s, 1)),
        "≤ 64 handshakes in flight".into(),
    );
    row(
        "server RSS per connected instance",
        if r.replicas.is_empty() {
            format!("{} KiB", opt(r.server_rss_per_instance_kib, 1))
        } else {
            per(&|x| format!("{} KiB", opt(x.rss_per_instance_kib, 1)))
        },
        format!("{} KiB", opt(base.server_rss_per_instance_kib, 1)),
        if r.replicas.is_empty() {
            String::new()
        } else {
            format!(
                "(RSS with the fleet − before) / its instances: {}",
                per(&|x| format!("{} vs {}", mib(x.rss_kib), mib(x.rss_base_kib)))
            )
        },
    );
    row(
        "server CPU at idle fleet (all servers)",
        pct(r.server_cpu_idle_cores),
        pct(base.server_cpu_idle_cores),
        format!(
            "heartbeat {} s, logs paused; database {}{}",
            r.heartbeat_s,
            pct(r.database_cpu_idle_cores),
            if r.replicas.is_empty() {
                String::new()
            } else {
                format!("; {}", per(&|x| pct(x.cpu_idle_cores)))
            }
        ),
    );
    row(
        "log ingest, trickle",
        format!("{} lines/s acked", opt(r.log_lines_acked_per_s, 0)),
        format!("{} lines/s acked", opt(base.log_lines_acked_per_s, 0)),
        format!(
            "offered {} lines/s; servers CPU {} (baseline {}), database {}",
            opt(r.log_lines_offered_per_s, 0),
            pct(r.server_cpu_logs_cores),
            pct(base.server_cpu_logs_cores),
            pct(r.database_cpu_logs_cores)
        ),
    );
    row(
        "log ingest, burst",
        format!("{} lines/s acked", opt(r.log_burst_lines_acked_per_s, 0)),
        format!("{} lines/s acked", opt(base.log_burst_lines_acked_per_s, 0)),
        format!(
            "every instance 100-line batches back to back; servers CPU {} (baseline {}), database {}",
            pct(r.server_cpu_burst_cores),
            pct(base.server_cpu_burst_cores),
            pct(r.database_cpu_burst_cores)
        ),
    );
    let cfg = |x: &Results| {
        format!(
            "{} / {} / {} ms",
            opt(x.config_p50_ms, 1),
            opt(x.config_p99_ms, 1),
            opt(x.config_max_ms, 1)
        )
    };
    row(
        "config change to all: p50 / p99 / max",
        cfg(r),
        cfg(base),
        match r.config.as_deref() {
            Some("ok") => format!(
                "reached {} of {}; `config set` through A's API took {} ms",
                r.config_reached.unwrap_or(0),
                r.instances,
                opt(r.config_cli_ms, 0)
            ),
            Some(other) => other.to_string(),
            None => "skipped".into(),
        },
    );
    for (i, x) in r.replicas.iter().enumerate() {
        row(
            &format!("config change, instances on {}: p50 / p99", name(i)),
            format!(
                "{} / {} ms",
                opt(x.config_p50_ms, 1),
                opt(x.config_p99_ms, 1)
            ),
            String::new(),
            format!(
                "{} of {} reached{}",
                x.config_reached,
                x.connected,
                if i == 0 {
                    ", the replica that took the change"
                } else {
                    ", via the database's NOTIFY"
                }
            ),
        );
    }
    if !r.replicas.is_empty() {
        let last = name(r.replicas.len() - 1);
        row(
            &format!("SIGKILL {last}: all its instances back on a survivor"),
            format!("{} ms", opt(r.failover_all_ms, 0)),
            format!("restart: {} ms", opt(base.reconnect_all_from_kill_ms, 0)),
            format!(
                "{}; {} of {} moved, p50 / p99 {} / {} ms after the kill; the API (on A) listed every instance live, none on {last}, after {} ms ({}); survivor RSS then {}. Baseline: the one server SIGKILLed and restarted on the same ports (p50 / p99 {} / {} ms)",
                r.failover.clone().unwrap_or_else(|| "skipped".into()),
                r.failover_reconnected.unwrap_or(0),
                r.failover_moved.unwrap_or(0),
                opt(r.failover_p50_ms, 0),
                opt(r.failover_p99_ms, 0),
                opt(r.failover_api_all_live_ms, 0),
                r.failover_api_note.clone().unwrap_or_default(),
                mib(r.failover_survivor_rss_kib),
                opt(base.reconnect_p50_ms, 0),
                opt(base.reconnect_p99_ms, 0)
            ),
        );
    }
    row(
        "rejects / failed connection attempts",
        format!("{} / {}", r.rejects, r.failed_attempts),
        format!("{} / {}", base.rejects, base.failed_attempts),
        format!(
            "attempts refused by a killed server count here; last error: {}",
            r.last_error.clone().unwrap_or_default()
        ),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_matches_the_entrypoint() {
        let mut rng = 42u64;
        for n in 0..20u32 {
            let d = backoff::delay(n, &mut rng);
            let base = (backoff::MIN * (1u32 << n.min(16))).min(backoff::MAX);
            assert!(d >= base / 2 && d <= base, "attempt {n}: {d:?}");
        }
    }

    fn sim_at(target: usize) -> Sim {
        Sim {
            idx: 0,
            id: [0; 16],
            rng: 7,
            attempts: 0,
            target,
            failed_in_round: 0,
            next_seq: 0,
            acked: 0,
            sent: 0,
            dropped_unsent: 0,
            owed: 0.0,
            config_version: 0,
            in_flight: None,
        }
    }

    #[test]
    fn rounds_over_the_server_list_like_the_entrypoint() {
        // Two replicas: a failed attempt tries the other at once; a whole round backs off.
        let mut s = sim_at(1);
        assert_eq!(
            s.next_attempt(Outcome::Failed(Duration::ZERO), 2),
            Duration::ZERO
        );
        assert_eq!(s.target, 0);
        let d = s.next_attempt(Outcome::Failed(Duration::ZERO), 2);
        assert!(d >= backoff::MIN / 2, "{d:?}");
        assert_eq!((s.target, s.attempts), (1, 1));
        // A Reject's hint is honoured even when the next entry is tried.
        let hint = Duration::from_secs(3);
        assert_eq!(s.next_attempt(Outcome::Failed(hint), 2), hint);
        // A lost connection: the next entry, after one backoff step.
        let mut s = sim_at(0);
        let d = s.next_attempt(Outcome::Lost, 2);
        assert!(d >= backoff::MIN / 2 && d <= backoff::MIN, "{d:?}");
        assert_eq!(s.target, 1);
        // One server: every failure backs off, as before replicas.
        let mut s = sim_at(0);
        for n in 0..3u32 {
            let d = s.next_attempt(Outcome::Failed(Duration::ZERO), 1);
            assert!(d >= backoff::MIN * (1 << n) / 2, "attempt {n}: {d:?}");
            assert_eq!(s.target, 0);
        }
    }

    #[test]
    fn batches_are_in_sequence_and_bounded() {
        let mut s = Sim {
            idx: 3,
            id: [0; 16],
            rng: 1,
            attempts: 0,
            target: 0,
            failed_in_round: 0,
            next_seq: 250,
            acked: 0,
            sent: 0,
            dropped_unsent: 0,
            owed: 0.0,
            config_version: 0,
            in_flight: None,
        };
        let Some(Kind::LogBatch(b)) = s.batch(BATCH_LINES) else {
            panic!()
        };
        assert_eq!((b.first_seq, b.entries.len()), (0, 100));
        let Some(Kind::LogBatch(b)) = s.batch(BATCH_LINES) else {
            panic!()
        };
        assert_eq!(b.first_seq, 100);
        s.batch(BATCH_LINES);
        assert!(s.batch(BATCH_LINES).is_none());
        // Far behind: the oldest are dropped and reported.
        s.next_seq = 250 + MAX_UNACKED + 50;
        let Some(Kind::LogBatch(b)) = s.batch(BATCH_LINES) else {
            panic!()
        };
        assert_eq!(b.first_seq, 300);
        assert_eq!(b.dropped, 50);
        let mut wire = Vec::new();
        proto::encode(&Frame::from(Kind::LogBatch(b)), &mut wire).unwrap();
        assert!(wire.len() < proto::MAX_FRAME);
    }

    #[test]
    fn proc_readers() {
        let me = std::process::id();
        assert!(proc_cpu_s(me).is_some());
        assert!(proc_status_kb(me, "VmRSS").unwrap() > 0);
    }
}
