//! Logs (issue #5): every entry of every instance, stored in SQLite, de-duplicated by
//! (instance, sequence), acknowledged only once committed, kept per app within a line and a
//! byte budget, served (and followed) by the API as NDJSON.
//!
//! Ingest path: a connection task hands each LogBatch to [`LogService::on_batch`], which takes
//! byte credits from a bounded budget (a slow disk pushes back on the connections that send,
//! through TCP, instead of queueing without bound) and queues it for the one writer thread. The
//! writer takes everything queued (group commit: the busier the server, the bigger the
//! transactions), writes it in one transaction, and only then sends each batch's connection its
//! LogAck. It also prunes apps over their retention between commits, and publishes the highest
//! committed row id so `logs -f` requests wake up.
//!
//! Sequence accounting per instance ("source"): `next_seq` (H) = every entry below it is stored
//! or known lost. A batch's entries below H are duplicates (a resend after a reconnect) and are
//! skipped; if the first new entry is above H, exactly that many entries were lost (the
//! entrypoint's buffer overflowed while the server was away) and a marker row records it there.

use super::Shared;
use super::config::{Fail, require_app};
use super::live::InstanceId;
use crate::util;
use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use waypost_proto::{self as proto, Frame, Kind, LogStream};

/// Schema of this feature (appended to `store::MIGRATIONS`).
pub const MIGRATION: &str = "
    CREATE TABLE log_sources (
        id INTEGER PRIMARY KEY,              -- referenced by log_lines.src (smaller than the hex)
        instance TEXT NOT NULL UNIQUE,       -- hex instance id
        app TEXT NOT NULL,
        next_seq INTEGER NOT NULL DEFAULT 0, -- H: every entry below is stored or known lost
        lost INTEGER NOT NULL DEFAULT 0,     -- entries known lost (sum of the markers)
        reported_dropped INTEGER NOT NULL DEFAULT 0 -- sum of LogBatch.dropped (informational)
    );
    CREATE INDEX log_sources_app ON log_sources (app);
    CREATE TABLE log_lines (
        id INTEGER PRIMARY KEY,              -- arrival order: the order `logs` shows
        app TEXT NOT NULL,
        src INTEGER NOT NULL,                -- log_sources.id
        seq INTEGER NOT NULL,
        stream INTEGER NOT NULL,             -- 0 stdout, 1 stderr, 2 entrypoint
        ts_us INTEGER NOT NULL,              -- first byte of the line, Unix µs
        truncated INTEGER NOT NULL DEFAULT 0,-- 1: the line continues in a later entry
        dropped INTEGER NOT NULL DEFAULT 0,  -- > 0: a marker: entries seq..seq+dropped were lost
        data BLOB NOT NULL
    );
    -- Reading an app in arrival order, and one instance of it (src is in the index, so the
    -- filter needs no table lookups). Not (src, id): with many instances logging at once its
    -- inserts land all over the tree, which costs about a quarter of the ingest rate.
    CREATE INDEX log_lines_app ON log_lines (app, id, src);
    -- Where --since starts (appends near the end: timestamps grow).
    CREATE INDEX log_lines_time ON log_lines (app, ts_us);
    CREATE TABLE log_settings (
        app TEXT PRIMARY KEY REFERENCES apps(name),
        max_lines INTEGER,                   -- NULL: DEFAULT_MAX_LINES
        max_bytes INTEGER                    -- NULL: DEFAULT_MAX_BYTES
    );
    CREATE TABLE log_usage (
        app TEXT PRIMARY KEY,
        lines INTEGER NOT NULL DEFAULT 0,    -- rows in log_lines (markers included)
        bytes INTEGER NOT NULL DEFAULT 0     -- sum of length(data)
    );";

/// Default retention per app. A busy service logs ~20 lines/s around the clock (1.7 M lines a
/// day) at 100-300 bytes a line, so 2 M lines keep its last day; 512 MiB bounds the disk use of
/// an app with long lines (with indexes and SQLite overhead the file takes ~1.5x that) — a
/// laptop can afford a few apps of that. Change per app with `waypost app set`.
pub const DEFAULT_MAX_LINES: u64 = 2_000_000;
pub const DEFAULT_MAX_BYTES: u64 = 512 * 1024 * 1024;
/// Pruning deletes down to this fraction of the limits, so it runs in chunks now and then rather
/// than a few rows after every commit.
const PRUNE_TO: f64 = 0.9;
/// Rows deleted per pruning transaction (the writer interleaves them with inserts).
const PRUNE_CHUNK: usize = 50_000;
/// Bytes of log batches queued for the writer before connections wait (TCP backpressure on the
/// entrypoints, which buffer on their side). 64 MiB: a second or more of the busiest ingest.
const QUEUE_BUDGET: usize = 64 * 1024 * 1024;
/// Per-entry cost on that budget beyond its data (the decoded struct).
const ENTRY_COST: usize = 64;
/// One transaction holds at most about this many rows / bytes, so a commit (and the lock other
/// writers wait for) stays short.
const TX_ROWS: usize = 20_000;
const TX_BYTES: usize = 16 * 1024 * 1024;
/// The writer checks retention at least this often when idle.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Sources cached by the writer; beyond this the cache is emptied and refilled on demand.
const SOURCE_CACHE: usize = 200_000;
/// Rows per read query when serving logs.
const PAGE: i64 = 2000;
/// A follower waits at least this long between queries (it batches commits).
const FOLLOW_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// A follower sends an empty line after this much silence (keeps proxies and dead-peer
/// detection working).
const FOLLOW_KEEPALIVE: Duration = Duration::from_secs(15);
/// How long an ack may wait for a full outgoing queue.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Most entries an entrypoint's resend buffer can hold: `WAYPOST_LOG_BUFFER` is at most 1 GiB,
/// the buffer adds 1/1024 of it (and one header) for entry headers, and every entry costs at
/// least 16 bytes of it (the metadata of an empty line). About 67 million.
const MAX_BUFFER_ENTRIES: u64 = ((1 << 30) + (1 << 30) / 1024 + 16) / 16;
/// How far past a source's high-water mark H a batch may start beyond what its own `dropped`
/// count explains. An entrypoint numbers its entries consecutively and loses entries only by
/// dropping them from that bounded buffer. Those dropped before they were ever sent are counted
/// in the next batch's `dropped`. The ones it cannot report are those it had sent on a
/// connection that died before the server stored them, and dropped afterwards: at most what its
/// buffer held, plus what was in flight (socket buffers and this server's intake queue, fewer
/// still). The server does not know an instance's buffer size, so the largest is assumed, and
/// twice its entries covers both. A batch starting further out is not from a working
/// entrypoint (a bug, or forged sequence numbers): storing it would move H so far that the
/// instance's real later entries would all be discarded as duplicates.
const UNREPORTED_GAP: u64 = 2 * MAX_BUFFER_ENTRIES;

/// Whether a batch starting at `first_seq` that reports `dropped` entries may follow the
/// high-water mark `h`: `Err(largest gap allowed)` if it starts too far past it.
fn check_jump(h: u64, first_seq: u64, dropped: u64) -> Result<(), u64> {
    let allowed = dropped.saturating_add(UNREPORTED_GAP);
    if first_seq.saturating_sub(h) <= allowed {
        Ok(())
    } else {
        Err(allowed)
    }
}

fn stream_name(s: i64) -> &'static str {
    match s {
        1 => "stderr",
        2 => "entrypoint",
        _ => "stdout",
    }
}

fn parse_stream(s: &str) -> Option<i64> {
    match s.to_ascii_lowercase().as_str() {
        "stdout" | "out" => Some(0),
        "stderr" | "err" => Some(1),
        "entrypoint" | "ep" => Some(2),
        _ => None,
    }
}

/// A LogBatch waiting for the writer.
struct Item {
    instance: InstanceId,
    app: String,
    batch: proto::LogBatch,
    /// The connection to acknowledge on (weak: never keeps a closed connection open).
    ack: mpsc::WeakSender<Frame>,
    _credits: OwnedSemaphorePermit,
}

enum Msg {
    Batch(Item),
    /// An app's retention changed.
    Retention {
        app: String,
        max_lines: u64,
        max_bytes: u64,
    },
}

/// Log intake has stalled: storing logs fails (a full disk, an I/O error) and the writer keeps
/// retrying. Set by the writer on the first failure, cleared by the next successful commit;
/// shown by `GET /v1/instances` and the logs endpoint so `instances` and `logs` can say so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntakeStall {
    pub since_ms: i64,
    pub error: String,
}

/// The intake state as the API shows it: `{"stalled": false}`, or `{"stalled": true, "since":
/// RFC 3339, "error": "database or disk is full"}`.
pub fn intake_json(stall: Option<&IntakeStall>) -> serde_json::Value {
    match stall {
        None => json!({ "stalled": false }),
        Some(s) => json!({
            "stalled": true,
            "since": util::fmt_rfc3339(s.since_ms),
            "error": s.error,
        }),
    }
}

pub struct LogService {
    tx: std_mpsc::Sender<Msg>,
    /// Whether storing logs currently fails (see [`IntakeStall`]).
    intake: watch::Sender<Option<IntakeStall>>,
    budget: Arc<Semaphore>,
    /// Highest committed log_lines id.
    committed: watch::Receiver<i64>,
    db_path: PathBuf,
    /// For the Welcome lookups (short point queries).
    reader: Arc<Mutex<Connection>>,
}

fn open(path: &FsPath) -> Result<Connection> {
    let c = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(c)
}

impl LogService {
    /// Opens the writer's and the reader's connections (the schema must be migrated) and starts
    /// the writer thread. Call from inside the runtime.
    pub fn start(db_path: &FsPath) -> Result<LogService> {
        let mut conn = open(db_path)?;
        // A bigger page cache: the three indexes of log_lines are updated on every insert.
        conn.pragma_update(None, "cache_size", -32_000)?;
        let (tx, rx) = std_mpsc::channel();
        let last_id: i64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM log_lines", [], |r| {
                r.get(0)
            })?;
        let (committed_tx, committed) = watch::channel(last_id);
        let mut writer = Writer::new(&mut conn)?;
        let handle = tokio::runtime::Handle::current();
        let intake = watch::Sender::new(None);
        let writer_intake = intake.clone();
        std::thread::Builder::new()
            .name("waypost-logs".into())
            .spawn(move || writer.run(conn, rx, committed_tx, handle, writer_intake))
            .context("starting the log writer thread")?;
        Ok(LogService {
            tx,
            intake,
            budget: Arc::new(Semaphore::new(QUEUE_BUDGET)),
            committed,
            db_path: db_path.to_path_buf(),
            reader: Arc::new(Mutex::new(open(db_path)?)),
        })
    }

    /// Some while storing logs fails.
    pub fn intake_stall(&self) -> Option<IntakeStall> {
        self.intake.borrow().clone()
    }

    /// H of an instance (for Welcome.log_acked_seq): committed, so never ahead of the truth.
    pub async fn acked_seq(&self, id: &InstanceId) -> u64 {
        let reader = self.reader.clone();
        let hex = util::hex(id);
        let r = tokio::task::spawn_blocking(move || -> Result<u64> {
            let c = reader.lock().unwrap_or_else(|e| e.into_inner());
            let v: Option<i64> = c
                .query_row(
                    "SELECT next_seq FROM log_sources WHERE instance = ?1",
                    [&hex],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(v.unwrap_or(0) as u64)
        })
        .await;
        match r {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "reading an instance's log position failed"
                );
                0 // the entrypoint resends what it holds; duplicates are skipped
            }
            Err(_) => 0,
        }
    }

    /// A LogBatch arrived on a connection. Waits (backpressure) while the writer is behind.
    pub async fn on_batch(
        &self,
        id: &InstanceId,
        app: &str,
        batch: proto::LogBatch,
        conn: &mpsc::Sender<Frame>,
    ) {
        if batch.entries.is_empty() && batch.first_seq == 0 && batch.dropped == 0 {
            return; // nothing to store or acknowledge
        }
        // Sequence numbers are stored as SQLite integers (i64); a batch running past that is
        // not from a real entrypoint (one would need 2^63 lines).
        let end = batch.first_seq.checked_add(batch.entries.len() as u64);
        if end.is_none_or(|e| e > i64::MAX as u64) || batch.dropped > i64::MAX as u64 {
            tracing::warn!(
                instance = util::hex(id),
                first_seq = batch.first_seq,
                "ignoring a log batch with impossible sequence numbers"
            );
            return;
        }
        let cost: usize = batch
            .entries
            .iter()
            .map(|e| e.data.len() + ENTRY_COST)
            .sum::<usize>()
            .clamp(1, QUEUE_BUDGET);
        let Ok(credits) = self.budget.clone().acquire_many_owned(cost as u32).await else {
            return;
        };
        let _ = self.tx.send(Msg::Batch(Item {
            instance: *id,
            app: app.to_string(),
            batch,
            ack: conn.downgrade(),
            _credits: credits,
        }));
    }
}

// ---- the writer --------------------------------------------------------------------------------

#[derive(Clone)]
struct Source {
    rowid: i64,
    /// The app the instance's logs belong to: a batch of any other app is never stored here.
    app: String,
    next_seq: u64,
    lost: u64,
    reported: u64,
    /// The last batch was refused (see [`check_jump`]): one notice per run of refusals.
    refusing: bool,
}

#[derive(Clone, Copy, Default)]
struct Usage {
    lines: u64,
    bytes: u64,
}

struct Writer {
    sources: HashMap<InstanceId, Source>,
    usage: HashMap<String, Usage>,
    limits: HashMap<String, (u64, u64)>,
    /// When retention was last checked (after commits when over a limit, else on a timer).
    last_prune_check: Instant,
    /// The last pruning failed: retry on the timer, not after every commit.
    prune_failing: bool,
}

impl Writer {
    fn new(conn: &mut Connection) -> Result<Writer> {
        let mut usage = HashMap::new();
        {
            let mut stmt = conn.prepare("SELECT app, lines, bytes FROM log_usage")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            for row in rows {
                let (app, lines, bytes) = row?;
                usage.insert(
                    app,
                    Usage {
                        lines: lines.max(0) as u64,
                        bytes: bytes.max(0) as u64,
                    },
                );
            }
        }
        let mut limits = HashMap::new();
        {
            let mut stmt = conn.prepare("SELECT app, max_lines, max_bytes FROM log_settings")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })?;
            for row in rows {
                let (app, l, b) = row?;
                limits.insert(
                    app,
                    (
                        l.map_or(DEFAULT_MAX_LINES, |v| v as u64),
                        b.map_or(DEFAULT_MAX_BYTES, |v| v as u64),
                    ),
                );
            }
        }
        Ok(Writer {
            sources: HashMap::new(),
            usage,
            limits,
            last_prune_check: Instant::now(),
            prune_failing: false,
        })
    }

    fn limits(&self, app: &str) -> (u64, u64) {
        self.limits
            .get(app)
            .copied()
            .unwrap_or((DEFAULT_MAX_LINES, DEFAULT_MAX_BYTES))
    }

    fn run(
        &mut self,
        mut conn: Connection,
        rx: std_mpsc::Receiver<Msg>,
        committed: watch::Sender<i64>,
        rt: tokio::runtime::Handle,
        intake: watch::Sender<Option<IntakeStall>>,
    ) {
        loop {
            let first = match rx.recv_timeout(PRUNE_EVERY) {
                Ok(m) => Some(m),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut items = Vec::new();
            let (mut rows, mut bytes) = (0usize, 0usize);
            let mut next = first;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Batch(item) => {
                        rows += item.batch.entries.len() + 1;
                        bytes += item
                            .batch
                            .entries
                            .iter()
                            .map(|e| e.data.len())
                            .sum::<usize>();
                        items.push(item);
                    }
                    Msg::Retention {
                        app,
                        max_lines,
                        max_bytes,
                    } => {
                        self.limits.insert(app, (max_lines, max_bytes));
                        self.last_prune_check = Instant::now() - PRUNE_EVERY;
                    }
                }
                if rows >= TX_ROWS || bytes >= TX_BYTES {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if !items.is_empty() {
                // A failed commit (disk full, I/O error) is retried until it succeeds: the
                // entrypoints resend only after a reconnect, so skipping these batches would turn
                // entries they still hold into a gap. Meanwhile the queue credits stay taken, the
                // connections stop being read, and the entrypoints buffer (and count what their
                // buffers cannot hold).
                let mut backoff = Duration::from_millis(100);
                loop {
                    match self.commit(&mut conn, &items) {
                        Ok((acks, max_id)) => {
                            if intake.send_replace(None).is_some() {
                                tracing::info!("storing logs works again; log intake resumed");
                            }
                            if max_id > 0 {
                                committed.send_replace(max_id);
                            }
                            for (weak, up_to) in acks {
                                send_ack(&rt, weak, up_to);
                            }
                            break;
                        }
                        Err(e) => {
                            // The outermost message ("database or disk is full"): rusqlite's
                            // cause only repeats it with the code.
                            let error = e.to_string();
                            intake.send_if_modified(|st| match st {
                                Some(s) if s.error == error => false,
                                Some(s) => {
                                    s.error = error.clone();
                                    true
                                }
                                None => {
                                    *st = Some(IntakeStall {
                                        since_ms: util::now_ms(),
                                        error: error.clone(),
                                    });
                                    true
                                }
                            });
                            tracing::error!(
                                error = format!("{e:#}"),
                                batches = items.len(),
                                retry_in = ?backoff,
                                "storing logs failed"
                            );
                            // The transaction rolled back; the caches may be ahead of it.
                            self.sources.clear();
                            if let Ok(w) = Writer::new(&mut conn) {
                                *self = w;
                            }
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                drop(items); // returns the queue credits
            }
            let over = self.usage.iter().any(|(app, u)| {
                let (l, b) = self.limits(app);
                u.lines > l || u.bytes > b
            });
            // Over a limit: prune now (unless pruning just failed: then on the timer only).
            if (over && !self.prune_failing) || self.last_prune_check.elapsed() >= PRUNE_EVERY {
                self.last_prune_check = Instant::now();
                match self.prune(&mut conn) {
                    Ok(()) => self.prune_failing = false,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "pruning logs failed");
                        if let Ok(w) = Writer::new(&mut conn) {
                            *self = w;
                        }
                        self.prune_failing = true;
                    }
                }
            }
        }
    }

    fn source(&mut self, conn: &Connection, id: &InstanceId, app: &str) -> Result<Source> {
        if let Some(s) = self.sources.get(id) {
            return Ok(s.clone());
        }
        if self.sources.len() >= SOURCE_CACHE {
            self.sources.clear();
        }
        let hex = util::hex(id);
        let row: Option<(i64, i64, i64, i64, String)> = conn
            .query_row(
                "SELECT id, next_seq, lost, reported_dropped, app FROM log_sources WHERE instance = ?1",
                [&hex],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let s = match row {
            Some((rowid, next, lost, reported, app)) => Source {
                rowid,
                app,
                next_seq: next as u64,
                lost: lost as u64,
                reported: reported as u64,
                refusing: false,
            },
            None => {
                conn.execute(
                    "INSERT INTO log_sources (instance, app) VALUES (?1, ?2)",
                    params![hex, app],
                )?;
                Source {
                    rowid: conn.last_insert_rowid(),
                    app: app.to_string(),
                    next_seq: 0,
                    lost: 0,
                    reported: 0,
                    refusing: false,
                }
            }
        };
        self.sources.insert(*id, s.clone());
        Ok(s)
    }

    /// Stores the batches in one transaction. Returns the acks to send and the highest row id.
    #[allow(clippy::type_complexity)]
    fn commit(
        &mut self,
        conn: &mut Connection,
        items: &[Item],
    ) -> Result<(Vec<(mpsc::WeakSender<Frame>, u64)>, i64)> {
        let tx = conn.transaction()?;
        let mut acks = Vec::with_capacity(items.len());
        let mut touched: HashMap<InstanceId, Source> = HashMap::new();
        let mut usage_delta: HashMap<&str, Usage> = HashMap::new();
        let mut max_id = 0i64;
        {
            let mut insert = tx.prepare(
                "INSERT INTO log_lines (app, src, seq, stream, ts_us, truncated, dropped, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for item in items {
                let mut src = match touched.get(&item.instance) {
                    Some(s) => s.clone(),
                    None => self.source(&tx, &item.instance, &item.app)?,
                };
                let b = &item.batch;
                let n = b.entries.len() as u64;
                let h = src.next_seq;
                if src.app != item.app {
                    // Connections are bound to their instance's owner, so this means a bug:
                    // never store one app's lines under another's instance.
                    tracing::error!(
                        instance = util::hex(&item.instance),
                        app = item.app,
                        owner = src.app,
                        "refused a log batch for an instance of another app"
                    );
                    continue;
                }
                if let Err(allowed) = check_jump(h, b.first_seq, b.dropped) {
                    // Not stored, not acknowledged, H unchanged; said once per run of refusals,
                    // in the server's log and in the instance's own logs.
                    if !src.refusing {
                        let text = format!(
                            "waypost server: refused log entries from sequence {} on: {} past the \
                             last entry stored, more than an entrypoint can have dropped ({allowed} \
                             at most); entries from sequence {h} on are still taken",
                            b.first_seq,
                            b.first_seq - h,
                        );
                        tracing::warn!(
                            instance = util::hex(&item.instance),
                            app = item.app,
                            first_seq = b.first_seq,
                            high_water = h,
                            dropped = b.dropped,
                            "refused a log batch whose sequence numbers jump too far"
                        );
                        insert.execute(params![
                            item.app,
                            src.rowid,
                            h as i64,
                            LogStream::Entrypoint as i64,
                            util::now_ms() * 1000,
                            false,
                            0i64,
                            text.as_bytes()
                        ])?;
                        max_id = max_id.max(tx.last_insert_rowid());
                        let u = usage_delta.entry(item.app.as_str()).or_default();
                        u.lines += 1;
                        u.bytes += text.len() as u64;
                        src.refusing = true;
                    } else {
                        tracing::debug!(
                            instance = util::hex(&item.instance),
                            first_seq = b.first_seq,
                            high_water = h,
                            "refused another log batch that jumps too far"
                        );
                    }
                    touched.insert(item.instance, src);
                    continue;
                }
                src.refusing = false;
                // Entries below H are already stored (a resend): skip them.
                let skip = h.saturating_sub(b.first_seq).min(n);
                let start = b.first_seq + skip;
                let new = &b.entries[skip as usize..];
                let u = usage_delta.entry(item.app.as_str()).or_default();
                if start > h {
                    // Entries h..start never arrived and never will: record the loss where it
                    // happened.
                    let gap = start - h;
                    let (stream, ts) = new
                        .first()
                        .map(|e| (e.stream as i64, e.timestamp_unix_us))
                        .unwrap_or((LogStream::Entrypoint as i64, util::now_ms() * 1000));
                    insert.execute(params![
                        item.app,
                        src.rowid,
                        h as i64,
                        stream,
                        ts,
                        false,
                        gap as i64,
                        &[] as &[u8]
                    ])?;
                    max_id = max_id.max(tx.last_insert_rowid());
                    src.lost += gap;
                    src.next_seq = start;
                    u.lines += 1;
                    tracing::info!(
                        instance = util::hex(&item.instance),
                        app = item.app,
                        from_seq = h,
                        lost = gap,
                        "log entries were lost (the entrypoint's buffer overflowed)"
                    );
                }
                for (i, e) in new.iter().enumerate() {
                    let stream = match LogStream::try_from(e.stream) {
                        Ok(s) => s as i64,
                        Err(_) => 0,
                    };
                    insert.execute(params![
                        item.app,
                        src.rowid,
                        (start + i as u64) as i64,
                        stream,
                        e.timestamp_unix_us,
                        e.truncated,
                        0i64,
                        e.data
                    ])?;
                    max_id = max_id.max(tx.last_insert_rowid());
                    u.lines += 1;
                    u.bytes += e.data.len() as u64;
                }
                src.next_seq = src.next_seq.max(b.first_seq + n);
                src.reported = src.reported.saturating_add(b.dropped).min(i64::MAX as u64);
                acks.push((item.ack.clone(), src.next_seq));
                touched.insert(item.instance, src);
            }
            let mut upd = tx.prepare(
                "UPDATE log_sources SET next_seq = ?2, lost = ?3, reported_dropped = ?4 WHERE id = ?1",
            )?;
            for s in touched.values() {
                upd.execute(params![
                    s.rowid,
                    s.next_seq as i64,
                    s.lost as i64,
                    s.reported as i64
                ])?;
            }
            let mut usage = tx.prepare(
                "INSERT INTO log_usage (app, lines, bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (app) DO UPDATE SET lines = lines + excluded.lines,
                     bytes = bytes + excluded.bytes",
            )?;
            for (app, d) in &usage_delta {
                usage.execute(params![app, d.lines as i64, d.bytes as i64])?;
            }
        }
        tx.commit()?;
        for (app, d) in usage_delta {
            let u = self.usage.entry(app.to_string()).or_default();
            u.lines += d.lines;
            u.bytes += d.bytes;
        }
        self.sources.extend(touched);
        Ok((acks, max_id))
    }

    /// Deletes the oldest rows of every app over its limits, a chunk per transaction, down to
    /// [`PRUNE_TO`] of the limits.
    fn prune(&mut self, conn: &mut Connection) -> Result<()> {
        let over: Vec<String> = self
            .usage
            .iter()
            .filter(|(app, u)| {
                let (l, b) = self.limits(app);
                u.lines > l || u.bytes > b
            })
            .map(|(app, _)| app.clone())
            .collect();
        for app in over {
            let (max_lines, max_bytes) = self.limits(&app);
            let want_lines = (max_lines as f64 * PRUNE_TO) as u64;
            let want_bytes = (max_bytes as f64 * PRUNE_TO) as u64;
            let u = self.usage.get(&app).copied().unwrap_or_default();
            let (mut del_lines, mut del_bytes, mut cutoff) = (0u64, 0u64, None);
            {
                let mut stmt = conn.prepare(
                    "SELECT id, length(data) FROM log_lines WHERE app = ?1 ORDER BY id LIMIT ?2",
                )?;
                let mut rows = stmt.query(params![app, PRUNE_CHUNK as i64])?;
                while let Some(r) = rows.next()? {
                    if u.lines - del_lines <= want_lines && u.bytes - del_bytes <= want_bytes {
                        break;
                    }
                    cutoff = Some(r.get::<_, i64>(0)?);
                    del_lines += 1;
                    del_bytes += r.get::<_, i64>(1)? as u64;
                }
            }
            let tx = conn.transaction()?;
            match cutoff {
                Some(cut) => {
                    tx.execute(
                        "DELETE FROM log_lines WHERE app = ?1 AND id <= ?2",
                        params![app, cut],
                    )?;
                }
                None => {
                    // Counters out of step with the table (nothing left to delete): resync.
                    del_lines = u.lines;
                    del_bytes = u.bytes;
                }
            }
            let left = Usage {
                lines: u.lines.saturating_sub(del_lines),
                bytes: u.bytes.saturating_sub(del_bytes),
            };
            tx.execute(
                "INSERT INTO log_usage (app, lines, bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (app) DO UPDATE SET lines = excluded.lines, bytes = excluded.bytes",
                params![app, left.lines as i64, left.bytes as i64],
            )?;
            tx.commit()?;
            self.usage.insert(app.clone(), left);
            tracing::debug!(
                app,
                lines = del_lines,
                bytes = del_bytes,
                "pruned old log lines"
            );
        }
        Ok(())
    }
}

/// Queues a LogAck without blocking the writer; a full queue gets a task (acks are cumulative,
/// so one arriving late or out of order is harmless).
fn send_ack(rt: &tokio::runtime::Handle, weak: mpsc::WeakSender<Frame>, up_to: u64) {
    let Some(tx) = weak.upgrade() else { return };
    let frame: Frame = Kind::LogAck(proto::LogAck { up_to_seq: up_to }).into();
    if let Err(mpsc::error::TrySendError::Full(frame)) = tx.try_send(frame) {
        rt.spawn(async move {
            let _ = tokio::time::timeout(ACK_TIMEOUT, tx.send(frame)).await;
        });
    }
}

// ---- reading -------------------------------------------------------------------------------------

/// Which rows a `logs` request wants.
#[derive(Debug, Clone)]
struct Filter {
    app: String,
    src: Option<i64>,
    stream: Option<i64>,
    since_us: Option<i64>,
}

/// One stored row.
struct Row {
    id: i64,
    instance: String,
    seq: i64,
    stream: i64,
    ts_us: i64,
    truncated: bool,
    dropped: i64,
    data: Vec<u8>,
}

/// A row as the API sends it: one JSON object per line, fields in this order. A marker (lost
/// entries) has `dropped` and no stream or data.
#[derive(Serialize)]
struct RowJson<'a> {
    ts: String,
    instance: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    truncated: Option<bool>,
    /// Exact bytes (the line need not be UTF-8; `text` is lossy).
    #[serde(skip_serializing_if = "Option::is_none")]
    data_b64: Option<String>,
    seq: i64,
    ts_us: i64,
    /// Arrival order (the order rows are listed in).
    id: i64,
}

impl Row {
    fn json(&self) -> RowJson<'_> {
        let marker = self.dropped > 0;
        RowJson {
            ts: fmt_us(self.ts_us),
            instance: &self.instance,
            stream: (!marker).then(|| stream_name(self.stream)),
            text: (!marker).then(|| String::from_utf8_lossy(&self.data)),
            dropped: marker.then_some(self.dropped),
            truncated: (!marker).then_some(self.truncated),
            data_b64: (!marker).then(|| util::base64_encode(&self.data)),
            seq: self.seq,
            ts_us: self.ts_us,
            id: self.id,
        }
    }
}

/// RFC 3339 UTC with microseconds.
pub fn fmt_us(ts_us: i64) -> String {
    let ms = util::fmt_rfc3339(ts_us.div_euclid(1000));
    // "....sss" + "uuu" before the Z.
    format!("{}{:03}Z", &ms[..ms.len() - 1], ts_us.rem_euclid(1000))
}

fn where_clause(f: &Filter) -> String {
    let by_src = if f.src.is_some() {
        " AND l.src = ?2"
    } else {
        ""
    };
    format!(
        "l.app = ?1{by_src} AND l.id > ?3 AND l.id <= ?4
         AND (?5 IS NULL OR l.stream = ?5 OR l.dropped > 0)
         AND (?6 IS NULL OR l.ts_us >= ?6)"
    )
}

/// Matching rows with `after < id <= upto`, ascending, at most `limit`. Returns NDJSON text,
/// the highest id returned (or `after`), and the number of rows.
fn query(
    c: &Connection,
    f: &Filter,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<(Vec<u8>, i64, usize)> {
    let sql = format!(
        "SELECT l.id, s.instance, l.seq, l.stream, l.ts_us, l.truncated, l.dropped, l.data
         FROM log_lines l JOIN log_sources s ON s.id = l.src
         WHERE {} ORDER BY l.id LIMIT ?7",
        where_clause(f)
    );
    let mut stmt = c.prepare(&sql)?;
    let mut rows = stmt.query(params![
        f.app, f.src, after, upto, f.stream, f.since_us, limit
    ])?;
    let mut out = Vec::new();
    let (mut max, mut n) = (after, 0);
    while let Some(r) = rows.next()? {
        let row = Row {
            id: r.get(0)?,
            instance: r.get(1)?,
            seq: r.get(2)?,
            stream: r.get(3)?,
            ts_us: r.get(4)?,
            truncated: r.get(5)?,
            dropped: r.get(6)?,
            data: r.get(7)?,
        };
        max = max.max(row.id);
        n += 1;
        serde_json::to_writer(&mut out, &row.json())?;
        out.push(b'\n');
    }
    Ok((out, max, n))
}

/// Where reading must start (exclusive) to show only the last `n` matching rows up to `upto`.
fn tail_start(c: &Connection, f: &Filter, after: i64, upto: i64, n: i64) -> Result<i64> {
    if n <= 0 {
        return Ok(upto);
    }
    let sql = format!(
        "SELECT l.id FROM log_lines l WHERE {} ORDER BY l.id DESC LIMIT 1 OFFSET ?7",
        where_clause(f)
    );
    let id: Option<i64> = c
        .query_row(
            &sql,
            params![f.app, f.src, after, upto, f.stream, f.since_us, n - 1],
            |r| r.get(0),
        )
        .optional()?;
    Ok(id.map_or(after, |id| id - 1))
}

/// Reading starts after this id: below the first row at or after `since` (rows after it that
/// are older — late arrivals — are still filtered by time), else after everything stored.
fn start_id(c: &Connection, f: &Filter) -> Result<i64> {
    let Some(since) = f.since_us else {
        return Ok(0);
    };
    Ok(c.query_row(
        "SELECT COALESCE((SELECT MIN(id) FROM log_lines WHERE app = ?1 AND ts_us >= ?2) - 1,
                         (SELECT COALESCE(MAX(id), 0) FROM log_lines))",
        params![f.app, since],
        |r| r.get(0),
    )?)
}

/// Resolves an instance id prefix among the app's log sources and instances.
fn resolve_instance(
    c: &Connection,
    app: &str,
    prefix: &str,
) -> Result<Result<(i64, String), Fail>> {
    let p = prefix.to_ascii_lowercase();
    if p.is_empty() || p.len() > 32 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Err(Fail::bad(format!(
            "invalid instance id {prefix:?}: give its hex id or a unique prefix of it"
        ))));
    }
    let mut stmt = c.prepare(
        "SELECT id FROM instances WHERE app = ?1 AND id LIKE ?2 || '%'
         UNION SELECT instance FROM log_sources WHERE app = ?1 AND instance LIKE ?2 || '%'
         LIMIT 10",
    )?;
    let ids: Vec<String> = stmt
        .query_map(params![app, p], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    match ids.as_slice() {
        [] => Ok(Err(Fail::not_found(format!(
            "no instance of app {app} has an id starting with {p}"
        )))),
        [one] => {
            let src: Option<i64> = c
                .query_row(
                    "SELECT id FROM log_sources WHERE instance = ?1",
                    [one],
                    |r| r.get(0),
                )
                .optional()?;
            // An instance with no logs yet: -1 matches no row; a follower looks again.
            Ok(Ok((src.unwrap_or(-1), one.clone())))
        }
        many => Ok(Err(Fail::bad(format!(
            "instance id prefix {p} is ambiguous in app {app}: {}",
            many.iter()
                .map(|s| s[..12.min(s.len())].to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))),
    }
}

#[derive(Deserialize)]
struct LogsQuery {
    instance: Option<String>,
    #[serde(default)]
    follow: bool,
    /// A duration back from now (`10m`) or an RFC 3339 time.
    since: Option<String>,
    tail: Option<u64>,
    stream: Option<String>,
}

/// A streaming response body fed by a channel.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

fn parse_since(s: &str) -> Result<i64, Fail> {
    if let Some(ms) = util::parse_rfc3339(s) {
        return Ok(ms * 1000);
    }
    let d = util::parse_duration(s).map_err(|_| {
        Fail::bad(format!(
            "invalid since {s:?}: give a duration (10m, 2h) or an RFC 3339 time"
        ))
    })?;
    Ok(util::now_ms() * 1000 - d.as_micros().min(i64::MAX as u128) as i64)
}

/// GET /v1/apps/{app}/logs: NDJSON, one object per row; with follow=true the response stays open
/// and new rows are sent as they are committed.
async fn get_logs(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, Fail> {
    let Query(q) = q?;
    require_app(&s, &app).await?;
    let stream = match q.stream.as_deref().filter(|v| !v.is_empty()) {
        Some(v) => Some(parse_stream(v).ok_or_else(|| {
            Fail::bad(format!(
                "invalid stream {v:?}: use stdout, stderr or entrypoint"
            ))
        })?),
        None => None,
    };
    let since_us = q
        .since
        .as_deref()
        .filter(|v| !v.is_empty())
        .map(parse_since)
        .transpose()?;
    let tail = q.tail.map(|t| t.min(i64::MAX as u64) as i64);
    let conn = Arc::new(Mutex::new(open(&s.logs.db_path)?));
    let mut filter = Filter {
        app: app.clone(),
        src: None,
        stream,
        since_us,
    };
    let mut instance_hex = None;
    if let Some(prefix) = q.instance.as_deref().filter(|p| !p.is_empty()) {
        let (c, a, p) = (conn.clone(), app.clone(), prefix.to_string());
        let (src, hex) = blocking(move || {
            let c = c.lock().unwrap_or_else(|e| e.into_inner());
            resolve_instance(&c, &a, &p)
        })
        .await???;
        filter.src = Some(src);
        instance_hex = Some(hex);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let mut committed = s.logs.committed.clone();
    // Subscribed before the header is made, so a change after it reaches a follower.
    let mut intake = s.logs.intake.subscribe();
    let stall = intake.borrow().clone();
    let follow = q.follow;
    let mut shutdown = s.shutdown.clone();
    tokio::spawn(async move {
        // A follower ends with the server (the client sees the end of the stream).
        let res = tokio::select! {
            r = stream_rows(conn, filter, instance_hex, tail, follow, &tx, &mut committed, &mut intake) => r,
            _ = super::wait_shutdown(&mut shutdown) => Ok(()),
        };
        if let Err(e) = res {
            tracing::debug!(error = format!("{e:#}"), "logs stream ended");
            let line = json!({ "error": format!("{e:#}") }).to_string() + "\n";
            let _ = tx.send(Bytes::from(line)).await;
        }
    });
    let mut resp = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::new(ChannelBody { rx }),
    )
        .into_response();
    if let Some(stall) = &stall {
        // A header, not a row: the body stays rows only. Non-ASCII would not be a valid value.
        let v: String = intake_json(Some(stall))
            .to_string()
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = header::HeaderValue::from_str(&v) {
            resp.headers_mut().insert(INTAKE_HEADER, v);
        }
    }
    Ok(resp)
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    tokio::task::spawn_blocking(f)
        .await
        .context("database task panicked")
}

/// Response header of the logs endpoint while log intake is stalled: the JSON of
/// [`intake_json`]. A follower is told of later changes by a `{"log_intake": {...}}` line.
pub const INTAKE_HEADER: &str = "waypost-log-intake";

/// Sends every matching row with `after < id <= upto` to `tx`, page by page. Returns the id to
/// continue after. None: the client is gone.
async fn drain(
    conn: &Arc<Mutex<Connection>>,
    filter: &Filter,
    mut after: i64,
    upto: i64,
    tx: &mpsc::Sender<Bytes>,
) -> Result<Option<i64>> {
    loop {
        let (c, f) = (conn.clone(), filter.clone());
        let (text, max, n) = blocking(move || {
            let c = c.lock().unwrap_or_else(|e| e.into_inner());
            query(&c, &f, after, upto, PAGE)
        })
        .await??;
        if n > 0 && tx.send(Bytes::from(text)).await.is_err() {
            return Ok(None);
        }
        after = max;
        if (n as i64) < PAGE {
            // Complete up to `upto`: continue past it even if its last rows did not match, so
            // a follower never rescans rows it has already filtered out.
            return Ok(Some(upto));
        }
    }
}

/// Streams the matching rows into `tx`; then, when following, waits for commits and sends what
/// is new, until the client goes away.
#[allow(clippy::too_many_arguments)]
async fn stream_rows(
    conn: Arc<Mutex<Connection>>,
    mut filter: Filter,
    instance_hex: Option<String>,
    tail: Option<i64>,
    follow: bool,
    tx: &mpsc::Sender<Bytes>,
    committed: &mut watch::Receiver<i64>,
    intake: &mut watch::Receiver<Option<IntakeStall>>,
) -> Result<()> {
    // History is what is committed now (one consistent cut); every later commit wakes the
    // follower.
    let upto = *committed.borrow_and_update();
    let start = {
        let (c, f) = (conn.clone(), filter.clone());
        blocking(move || -> Result<i64> {
            let c = c.lock().unwrap_or_else(|e| e.into_inner());
            let start = start_id(&c, &f)?.min(upto);
            match tail {
                Some(n) => tail_start(&c, &f, start, upto, n),
                None => Ok(start),
            }
        })
        .await??
    };
    let Some(mut last) = drain(&conn, &filter, start, upto, tx).await? else {
        return Ok(());
    };
    if !follow {
        return Ok(());
    }
    let mut last_query = Instant::now();
    loop {
        tokio::select! {
            r = committed.changed() => if r.is_err() { return Ok(()) },
            _ = tokio::time::sleep(FOLLOW_KEEPALIVE) => {
                if tx.send(Bytes::from_static(b"\n")).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            _ = tx.closed() => return Ok(()),
            // Nothing new is committed while intake is stalled: say why, and when it resumes.
            r = intake.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let state = intake_json(intake.borrow_and_update().as_ref());
                let line = json!({ "log_intake": state }).to_string() + "\n";
                if tx.send(Bytes::from(line)).await.is_err() {
                    return Ok(());
                }
                continue;
            }
        }
        let wait = FOLLOW_MIN_INTERVAL.saturating_sub(last_query.elapsed());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        last_query = Instant::now();
        let upto = *committed.borrow_and_update();
        if filter.src == Some(-1) {
            // The followed instance had no logs when we began: look for its source now.
            if let Some(hex) = instance_hex.clone() {
                let c = conn.clone();
                let src: Option<i64> = blocking(move || {
                    c.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .query_row(
                            "SELECT id FROM log_sources WHERE instance = ?1",
                            [hex],
                            |r| r.get(0),
                        )
                        .optional()
                })
                .await??;
                if let Some(src) = src {
                    filter.src = Some(src);
                }
            }
        }
        match drain(&conn, &filter, last, upto, tx).await? {
            Some(l) => last = l,
            None => return Ok(()),
        }
    }
}

// ---- retention and stats -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionBody {
    /// null or absent: unchanged; 0: back to the default.
    #[serde(default)]
    max_lines: Option<u64>,
    #[serde(default)]
    max_bytes: Option<u64>,
}

fn retention_of(c: &Connection, app: &str) -> Result<(Option<u64>, Option<u64>)> {
    Ok(c.query_row(
        "SELECT max_lines, max_bytes FROM log_settings WHERE app = ?1",
        [app],
        |r| {
            Ok((
                r.get::<_, Option<i64>>(0)?.map(|v| v as u64),
                r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
            ))
        },
    )
    .optional()?
    .unwrap_or((None, None)))
}

fn stats_json(c: &Connection, app: &str) -> Result<serde_json::Value> {
    let (l, b) = retention_of(c, app)?;
    let (lines, bytes): (i64, i64) = c
        .query_row(
            "SELECT lines, bytes FROM log_usage WHERE app = ?1",
            [app],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, 0));
    let mut stmt = c.prepare(
        "SELECT instance, next_seq, lost, reported_dropped FROM log_sources WHERE app = ?1
         ORDER BY id DESC LIMIT 1000",
    )?;
    let instances: Vec<serde_json::Value> = stmt
        .query_map([app], |r| {
            Ok(json!({
                "instance": r.get::<_, String>(0)?,
                "next_seq": r.get::<_, i64>(1)?,
                "lost": r.get::<_, i64>(2)?,
                "reported_dropped": r.get::<_, i64>(3)?,
            }))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(json!({
        "app": app,
        "retention": {
            "max_lines": l.unwrap_or(DEFAULT_MAX_LINES),
            "max_bytes": b.unwrap_or(DEFAULT_MAX_BYTES),
            "default_lines": l.is_none(),
            "default_bytes": b.is_none(),
        },
        "usage": { "lines": lines, "bytes": bytes },
        "instances": instances,
    }))
}

async fn get_stats(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
) -> Result<Json<serde_json::Value>, Fail> {
    require_app(&s, &app).await?;
    let path = s.logs.db_path.clone();
    let v = blocking(move || stats_json(&open(&path)?, &app)).await??;
    Ok(Json(v))
}

async fn patch_retention(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<RetentionBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Fail> {
    let Json(body) = body?;
    require_app(&s, &app).await?;
    if body.max_lines.is_none() && body.max_bytes.is_none() {
        return Err(Fail::bad(
            "nothing to change: give max_lines and/or max_bytes",
        ));
    }
    let a = app.clone();
    let (l, b) = s
        .store
        .call(move |c| {
            let (mut l, mut b) = retention_of(c, &a)?;
            if let Some(v) = body.max_lines {
                l = (v > 0).then_some(v);
            }
            if let Some(v) = body.max_bytes {
                b = (v > 0).then_some(v);
            }
            c.execute(
                "INSERT INTO log_settings (app, max_lines, max_bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (app) DO UPDATE SET max_lines = excluded.max_lines,
                     max_bytes = excluded.max_bytes",
                params![a, l.map(|v| v as i64), b.map(|v| v as i64)],
            )?;
            Ok((l, b))
        })
        .await?;
    let _ = s.logs.tx.send(Msg::Retention {
        app: app.clone(),
        max_lines: l.unwrap_or(DEFAULT_MAX_LINES),
        max_bytes: b.unwrap_or(DEFAULT_MAX_BYTES),
    });
    tracing::info!(app, max_lines = l, max_bytes = b, "log retention changed");
    let path = s.logs.db_path.clone();
    let v = blocking(move || stats_json(&open(&path)?, &app)).await??;
    Ok(Json(v))
}

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/apps/{app}/logs", get(get_logs))
        .route("/apps/{app}/logs/stats", get(get_stats))
        .route(
            "/apps/{app}/logs/retention",
            axum::routing::patch(patch_retention),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch(
            "CREATE TABLE apps (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL);
             CREATE TABLE instances (id TEXT PRIMARY KEY, app TEXT NOT NULL);
             INSERT INTO apps VALUES ('web', 0);",
        )
        .unwrap();
        c.execute_batch(MIGRATION).unwrap();
        (dir, path)
    }

    fn entry(stream: LogStream, text: &str) -> proto::LogEntry {
        proto::LogEntry {
            stream: stream as i32,
            timestamp_unix_us: 1_000_000,
            data: text.as_bytes().to_vec(),
            truncated: false,
        }
    }

    fn item(id: InstanceId, first_seq: u64, texts: &[&str], credits: &Arc<Semaphore>) -> Item {
        let (tx, _rx) = mpsc::channel(1);
        Item {
            instance: id,
            app: "web".into(),
            batch: proto::LogBatch {
                first_seq,
                entries: texts.iter().map(|t| entry(LogStream::Stdout, t)).collect(),
                dropped: 0,
            },
            ack: tx.downgrade(),
            _credits: credits.clone().try_acquire_owned().unwrap(),
        }
    }

    fn all(c: &Connection) -> Vec<serde_json::Value> {
        let f = Filter {
            app: "web".into(),
            src: None,
            stream: None,
            since_us: None,
        };
        let (text, _, _) = query(c, &f, 0, i64::MAX, 1000).unwrap();
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    #[test]
    fn jump_window() {
        // Gaps the entrypoint can explain: up to its buffer's worth beyond what it reports.
        assert_eq!(check_jump(10, 5, 0), Ok(()), "a resend");
        assert_eq!(check_jump(10, 10, 0), Ok(()));
        assert_eq!(check_jump(10, 10 + UNREPORTED_GAP, 0), Ok(()));
        assert_eq!(check_jump(10, 11 + UNREPORTED_GAP, 0), Err(UNREPORTED_GAP));
        assert_eq!(
            check_jump(10, 11 + UNREPORTED_GAP, 1),
            Ok(()),
            "one reported drop"
        );
        assert_eq!(check_jump(0, 1 << 40, 0), Err(UNREPORTED_GAP));
        assert_eq!(check_jump(0, u64::MAX, u64::MAX), Ok(()), "no overflow");
        // At least what the largest buffer holds (1 GiB of empty lines), and nowhere near 2^63.
        const { assert!(UNREPORTED_GAP >= (1 << 30) / 16) };
        const { assert!(UNREPORTED_GAP < 1 << 32) };
    }

    #[test]
    fn a_jump_too_far_is_refused_and_the_source_keeps_working() {
        let (_d, path) = db();
        let mut conn = open(&path).unwrap();
        let mut w = Writer::new(&mut conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        let a = [3u8; 16];
        w.commit(&mut conn, &[item(a, 0, &["l0", "l1", "l2"], &credits)])
            .unwrap();
        // Two refused batches in a row: no ack, one notice, H unchanged.
        let huge = 1u64 << 40;
        let (acks, _) = w
            .commit(
                &mut conn,
                &[
                    item(a, huge, &["forged"], &credits),
                    item(a, huge + 1, &["forged2"], &credits),
                ],
            )
            .unwrap();
        assert!(acks.is_empty(), "a refused batch is not acknowledged");
        let h = |c: &Connection| -> i64 {
            c.query_row("SELECT next_seq FROM log_sources", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(h(&conn), 3);
        // The instance's real next lines are still stored.
        let (acks, _) = w
            .commit(&mut conn, &[item(a, 3, &["l3"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 4);
        // A later refusal is noticed again (a new run of them); the writer's cache and the
        // database agree after a restart of the writer.
        drop(w);
        let mut w = Writer::new(&mut conn).unwrap();
        let (acks, _) = w
            .commit(&mut conn, &[item(a, huge, &["forged3"], &credits)])
            .unwrap();
        assert!(acks.is_empty());
        assert_eq!(h(&conn), 4);
        let texts: Vec<String> = all(&conn)
            .iter()
            .map(|r| r["text"].as_str().unwrap_or("?").to_string())
            .collect();
        assert_eq!(texts.len(), 6, "{texts:?}");
        assert_eq!(&texts[..3], ["l0", "l1", "l2"]);
        assert!(
            texts[3]
                .starts_with("waypost server: refused log entries from sequence 1099511627776 on"),
            "{texts:?}"
        );
        assert!(
            texts[3].contains("from sequence 3 on are still taken"),
            "{texts:?}"
        );
        assert_eq!(texts[4], "l3");
        assert!(
            texts[5].contains("from sequence 4 on are still taken"),
            "{texts:?}"
        );
        assert!(!texts.iter().any(|t| t.starts_with("forged")));
        // Negative control: a gap the batch's dropped count explains is a loss, not a refusal.
        let mut ok = item(
            a,
            4 + UNREPORTED_GAP + 5,
            &["after a long outage"],
            &credits,
        );
        ok.batch.dropped = 5;
        let (acks, _) = w.commit(&mut conn, &[ok]).unwrap();
        assert_eq!(acks[0].1, 4 + UNREPORTED_GAP + 6);
    }

    #[test]
    fn another_apps_batch_is_never_stored_under_an_instance() {
        let (_d, path) = db();
        let mut conn = open(&path).unwrap();
        let mut w = Writer::new(&mut conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        let b = [4u8; 16];
        w.commit(&mut conn, &[item(b, 0, &["b0"], &credits)])
            .unwrap();
        let mut from_a = item(b, 1, &["from a"], &credits);
        from_a.app = "other".into();
        let (acks, _) = w.commit(&mut conn, &[from_a]).unwrap();
        assert!(acks.is_empty());
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM log_lines", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        // Also when the writer starts cold (the source comes from the database).
        drop(w);
        let mut w = Writer::new(&mut conn).unwrap();
        let mut from_a = item(b, 1, &["from a"], &credits);
        from_a.app = "other".into();
        assert!(w.commit(&mut conn, &[from_a]).unwrap().0.is_empty());
        let (acks, _) = w
            .commit(&mut conn, &[item(b, 1, &["b1"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 2);
    }

    #[test]
    fn dedup_gaps_and_acks() {
        let (_d, path) = db();
        let mut conn = open(&path).unwrap();
        let mut w = Writer::new(&mut conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        let a = [1u8; 16];
        let (acks, _) = w
            .commit(&mut conn, &[item(a, 0, &["l0", "l1", "l2"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 3);
        // Resent overlap + new: only l3 is new.
        let (acks, _) = w
            .commit(&mut conn, &[item(a, 1, &["l1", "l2", "l3"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 4);
        // A gap: 4..7 lost.
        let (acks, _) = w
            .commit(&mut conn, &[item(a, 7, &["l7"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 8);
        // A pure duplicate: acked, nothing stored.
        let (acks, _) = w
            .commit(&mut conn, &[item(a, 0, &["l0"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 8);
        let rows = all(&conn);
        let texts: Vec<String> = rows
            .iter()
            .map(|r| match r.get("dropped") {
                Some(d) => format!("[{d} dropped @{}]", r["seq"]),
                None => r["text"].as_str().unwrap().to_string(),
            })
            .collect();
        assert_eq!(texts, ["l0", "l1", "l2", "l3", "[3 dropped @4]", "l7"]);
        // Survives a restart of the writer (state from the database).
        drop(w);
        let mut w = Writer::new(&mut conn).unwrap();
        let (acks, _) = w
            .commit(&mut conn, &[item(a, 8, &["l8"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 9);
        let c2 = open(&path).unwrap();
        assert_eq!(
            c2.query_row("SELECT next_seq, lost FROM log_sources", [], |r| Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?
            )))
            .unwrap(),
            (9, 3)
        );
        assert_eq!(w.usage["web"].lines, 7);
        assert_eq!(w.usage["web"].bytes, 12);
    }

    #[test]
    fn retention_prunes_oldest() {
        let (_d, path) = db();
        let mut conn = open(&path).unwrap();
        let mut w = Writer::new(&mut conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        w.limits.insert("web".into(), (100, 1 << 30));
        let texts: Vec<String> = (0..150).map(|i| format!("{i}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        w.commit(&mut conn, &[item([2u8; 16], 0, &refs, &credits)])
            .unwrap();
        w.prune(&mut conn).unwrap();
        let rows = all(&conn);
        assert_eq!(rows.len(), 90);
        assert_eq!(rows[0]["text"], "60");
        assert_eq!(w.usage["web"].lines, 90);
        // By bytes too.
        w.limits.insert("web".into(), (1000, 100));
        w.prune(&mut conn).unwrap();
        let rows = all(&conn);
        let bytes: usize = rows.iter().map(|r| r["text"].as_str().unwrap().len()).sum();
        assert!(bytes <= 90, "{bytes}");
        assert_eq!(rows.last().unwrap()["text"], "149");
    }

    #[test]
    fn timestamps_with_micros() {
        assert_eq!(fmt_us(1_500_000_000_123_456), "2017-07-14T02:40:00.123456Z");
        assert_eq!(fmt_us(0), "1970-01-01T00:00:00.000000Z");
    }
}
