//! The log service: every entry of every instance, stored through the store, de-duplicated by
//! (instance, sequence), acknowledged only once committed, kept per app within a line and a
//! byte budget. The logs endpoint (transport/api/logs.rs) serves and follows them.
//!
//! Ingest path: a connection task hands each LogBatch to [`LogService::on_batch`], which takes
//! byte credits from a bounded budget (a slow disk pushes back on the connections that send,
//! through TCP, instead of queueing without bound) and queues it for the one writer thread. The
//! writer takes everything queued (group commit: the busier the server, the bigger the
//! transactions), writes it in one transaction, and only then sends each batch's connection its
//! LogAck. It also prunes apps over their retention between commits, and publishes the highest
//! committed line id so `logs -f` requests wake up. Lines are stored in chunks (one row of
//! consecutive lines of one instance, see store/logs.rs); each line keeps an id of its own.
//!
//! Sequence accounting per instance ("source"): `next_seq` (H) = every entry below it is stored
//! or known lost. A batch's entries below H are duplicates (a resend after a reconnect) and are
//! skipped; if the first new entry is above H, exactly that many entries were lost (the
//! entrypoint's buffer overflowed while the server was away) and a marker line records it there.
//!
//! Replicas sharing one PostgreSQL each run a writer. Their transactions take turns (see
//! store/logs.rs), so line ids stay unique and grow in commit order. What a writer caches of
//! the tables is then a hint only: the sources of a commit's instances are read again inside it
//! (an instance may have moved to another replica and back), and the usage before pruning. The
//! highest committed line id published here is that of every replica: each commit announces its
//! own, and every replica listens ([`follow_other_writers`]).

use crate::server::model::InstanceId;
pub use crate::server::model::logs::IntakeStall;
use crate::server::model::logs::{ChunkBuilder, NewLine, Retention, SourceRow, Usage};
use crate::server::model::metrics::{AppLabel, AppStream, metrics};
use crate::server::service::export::{self, ExportStats, Exporter};
use crate::server::service::mux::Queued;
use crate::server::store::{self, Backend, Db, Location};
use crate::util;
use anyhow::{Context as _, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use waypost_proto::{self as proto, Frame, Kind, LogStream};

/// Default retention per app. A busy service logs ~20 lines/s around the clock (1.7 M lines a
/// day) at 100-300 bytes a line, so 2 M lines keep its last day; 512 MiB bounds the disk use of
/// an app with long lines (with indexes and SQLite overhead the file takes ~1.5x that) — a
/// laptop can afford a few apps of that. Change per app with `waypost app set`.
pub const DEFAULT_MAX_LINES: u64 = 2_000_000;
pub const DEFAULT_MAX_BYTES: u64 = 512 * 1024 * 1024;
/// Pruning deletes down to this fraction of the limits, so it runs in chunks now and then rather
/// than a few lines after every commit.
const PRUNE_TO: f64 = 0.9;
/// Chunks deleted per pruning transaction (the writer interleaves them with inserts): up to
/// [`CHUNK_LINES`] lines each.
const PRUNE_CHUNKS: usize = 1_000;
/// Bytes of log batches queued for the writer before connections wait (TCP backpressure on the
/// entrypoints, which buffer on their side). 64 MiB: a second or more of the busiest ingest.
const QUEUE_BUDGET: usize = 64 * 1024 * 1024;
/// Per-entry cost on that budget beyond its data (the decoded struct).
const ENTRY_COST: usize = 64;
/// One transaction holds at most about this many lines / bytes, so a commit (and the lock other
/// writers wait for) stays short: 16 MiB is about 0.1 s of writing. Lines cost little on their
/// own now that they are stored in chunks; the line cap binds only for very short lines.
const TX_ROWS: usize = 200_000;
const TX_BYTES: usize = 16 * 1024 * 1024;
/// A chunk (one row of log_chunks) holds at most this many lines / data bytes; an instance's
/// lines of one commit go into as few chunks as these allow. Bigger chunks write faster (one
/// row, one index entry each); smaller ones cost less to decode when a reader wants a few
/// lines of them (`logs --tail`, a follower) and trim less coarsely. 1 MiB is ~10,000 lines of
/// 100 bytes and decodes in well under a millisecond.
const CHUNK_LINES: i64 = 8192;
const CHUNK_BYTES: usize = 1024 * 1024;
/// The writer checks retention at least this often when idle.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Sources cached by the writer; beyond this the cache is emptied and refilled on demand.
const SOURCE_CACHE: usize = 200_000;
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

/// A LogBatch waiting for the writer.
struct Item {
    instance: InstanceId,
    app: String,
    batch: proto::LogBatch,
    /// When it arrived (ns since the Unix epoch): the exported lines' observed time.
    received_ns: u64,
    /// The connection to acknowledge on (weak: never keeps a closed connection open).
    ack: mpsc::WeakSender<Queued>,
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

pub struct LogService {
    tx: std_mpsc::Sender<Msg>,
    /// Whether storing logs currently fails (see [`IntakeStall`]).
    intake: watch::Sender<Option<IntakeStall>>,
    budget: Arc<Semaphore>,
    /// Highest committed line id.
    committed: watch::Receiver<i64>,
    location: Location,
    /// For the Welcome lookups (short point queries).
    reader: Arc<Mutex<Db>>,
    /// `--log-export`: where stored lines are forwarded (service/export.rs).
    export: Option<Exporter>,
}

impl LogService {
    /// Opens the writer's and the reader's connections (the schema must be migrated) and starts
    /// the writer thread, and on PostgreSQL the thread that hears of other replicas' commits.
    /// Call from inside the runtime.
    pub fn start(location: &Location) -> Result<LogService> {
        LogService::start_exporting(location, None)
    }

    /// [`LogService::start`], and with `log_export` (`--log-export`: an OTLP/HTTP URL) every
    /// stored line is also forwarded there (service/export.rs). A malformed URL or
    /// `WAYPOST_LOG_EXPORT_*` setting is an error here, before anything is served.
    pub fn start_exporting(location: &Location, log_export: Option<&str>) -> Result<LogService> {
        let export = match log_export {
            Some(url) => Some(Exporter::start(
                export::Settings::new(url, |k| std::env::var(k).ok()).context("--log-export")?,
            )),
            None => None,
        };
        let (db, last_id, mut writer, reader) = store::blocking(|| -> Result<_> {
            let db = store::logs::connect_writer(location)?;
            let moved = store::logs::convert_line_rows(&db)?;
            if moved > 0 {
                tracing::info!(lines = moved, "moved stored log lines into chunks");
            }
            let last_id = store::logs::max_line_id(&db)?;
            let writer = Writer::new(&db)?;
            Ok((db, last_id, writer, store::connect(location)?))
        })?;
        let (tx, rx) = std_mpsc::channel();
        let (committed_tx, committed) = watch::channel(last_id);
        if let Location::Postgres(_) = location {
            let (location, committed) = (location.clone(), committed_tx.clone());
            std::thread::Builder::new()
                .name("waypost-logs-listen".into())
                .spawn(move || follow_other_writers(&location, &committed))
                .context("starting the log listener thread")?;
        }
        let handle = tokio::runtime::Handle::current();
        let intake = watch::Sender::new(None);
        let writer_intake = intake.clone();
        let writer_location = location.clone();
        let feed = export.clone().map(Feed::new);
        std::thread::Builder::new()
            .name("waypost-logs".into())
            .spawn(move || {
                let out = Outlets {
                    committed: committed_tx,
                    rt: handle,
                    intake: writer_intake,
                    feed,
                };
                writer.run(db, &writer_location, rx, out)
            })
            .context("starting the log writer thread")?;
        Ok(LogService {
            tx,
            intake,
            budget: Arc::new(Semaphore::new(QUEUE_BUDGET)),
            committed,
            location: location.clone(),
            reader: Arc::new(Mutex::new(reader)),
            export,
        })
    }

    /// The log exporter's counters; None without `--log-export`.
    pub fn export_stats(&self) -> Option<ExportStats> {
        self.export.as_ref().map(Exporter::stats)
    }

    /// Some while storing logs fails.
    pub fn intake_stall(&self) -> Option<IntakeStall> {
        self.intake.borrow().clone()
    }

    /// Changes of [`LogService::intake_stall`].
    pub fn watch_intake(&self) -> watch::Receiver<Option<IntakeStall>> {
        self.intake.subscribe()
    }

    /// The highest committed line id, changed after every commit (on PostgreSQL: of every
    /// replica).
    pub fn committed(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }

    /// A connection of its own for a reader of the logs (one per request).
    pub fn reader(&self) -> Result<Db> {
        store::connect(&self.location)
    }

    /// An app's retention was changed (and stored): the writer prunes to the new limits.
    pub fn retention_changed(&self, app: &str, r: Retention) {
        let _ = self.tx.send(Msg::Retention {
            app: app.to_string(),
            max_lines: r.max_lines.unwrap_or(DEFAULT_MAX_LINES),
            max_bytes: r.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
        });
    }

    /// H of an instance (for Welcome.log_acked_seq): committed, so never ahead of the truth.
    pub async fn acked_seq(&self, id: &InstanceId) -> u64 {
        let reader = self.reader.clone();
        let location = self.location.clone();
        let hex = util::hex(id);
        let r = tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut db = reader.lock().unwrap_or_else(|e| e.into_inner());
            let r = store::logs::next_seq(&db, &hex);
            if r.is_err() && db.is_closed() {
                // PostgreSQL closed the connection (a restart, a network cut): once more on a
                // new one.
                *db = store::connect(&location)?;
                return Ok(store::logs::next_seq(&db, &hex)?.unwrap_or(0));
            }
            Ok(r?.unwrap_or(0))
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
        conn: &mpsc::Sender<Queued>,
    ) {
        if batch.entries.is_empty() && batch.first_seq == 0 && batch.dropped == 0 {
            return; // nothing to store or acknowledge
        }
        count_received(app, &batch);
        // Before any wait for the writer: the moment the server got it.
        let received_ns = export::now_ns();
        // Sequence numbers are stored as 64-bit signed integers; a batch running past that is
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
            received_ns,
            ack: conn.downgrade(),
            _credits: credits,
        }));
    }
}

/// The received-lines metrics of a batch as it arrives (resends after a reconnect included:
/// this is what the connections carried; `log_lines_stored` counts each line once).
fn count_received(app: &str, batch: &proto::LogBatch) {
    let mut lines = [0u64; 3];
    let mut bytes = 0u64;
    for e in &batch.entries {
        // As stored: an unknown stream is stdout.
        let i = match e.stream {
            1 | 2 => e.stream as usize,
            _ => 0,
        };
        lines[i] += 1;
        bytes += e.data.len() as u64;
    }
    let m = metrics();
    for (stream, n) in lines.into_iter().enumerate() {
        if n > 0 {
            let stream = crate::server::model::logs::stream_name(stream as i64);
            m.log_lines_received
                .get_or_create(&AppStream {
                    app: app.to_string(),
                    stream,
                })
                .inc_by(n);
        }
    }
    if bytes > 0 {
        m.log_bytes_received
            .get_or_create(&AppLabel::new(app))
            .inc_by(bytes);
    }
}

// ---- the writer --------------------------------------------------------------------------------

/// Where the writer's results go.
struct Outlets {
    /// The highest committed line id, for followers.
    committed: watch::Sender<i64>,
    /// The runtime acks are sent on.
    rt: tokio::runtime::Handle,
    /// Whether storing fails (see [`IntakeStall`]).
    intake: watch::Sender<Option<IntakeStall>>,
    /// The log exporter, with `--log-export`.
    feed: Option<Feed>,
}

/// What a commit stored.
struct Committed {
    /// LogAcks to send: (connection, up to).
    acks: Vec<(mpsc::WeakSender<Queued>, u64)>,
    /// The highest line id (0: nothing stored).
    max_id: i64,
    /// Lines stored per app (markers included).
    stored: Vec<(String, u64)>,
    /// Entries the entrypoints reported dropping, per app (each report counted once).
    reported: Vec<(String, u64)>,
    /// The stored lines in commit order, for the exporter.
    stored_lines: Vec<Stored>,
}

/// A run of stored lines, pointing into the committed items (so the exporter gets their data
/// without a copy).
enum Stored {
    /// The entries of item `item` from `skip` on (those before were already stored).
    Entries { item: usize, skip: usize },
    /// A marker before them: `lost` entries never arrived.
    Gap {
        item: usize,
        lost: u64,
        stream: i32,
        ts_us: i64,
    },
    /// The server's own line about a refused batch of item `item`.
    Text {
        item: usize,
        ts_us: i64,
        text: String,
    },
}

/// The writer's side of the exporter: the resource of each instance (its deployment and host,
/// read once from its row), and the handle lines are pushed to.
struct Feed {
    exporter: Exporter,
    origins: HashMap<InstanceId, Arc<export::Origin>>,
}

impl Feed {
    fn new(exporter: Exporter) -> Feed {
        Feed {
            exporter,
            origins: HashMap::new(),
        }
    }

    fn origin(&mut self, db: &Db, item: &Item) -> Arc<export::Origin> {
        if let Some(o) = self.origins.get(&item.instance) {
            return o.clone();
        }
        if self.origins.len() >= SOURCE_CACHE {
            self.origins.clear();
        }
        let instance = util::hex(&item.instance);
        // Every instance has its row (written at its Hello, before any batch); a failed read
        // costs only the attributes, not the lines, and is tried again next time.
        let (deployment, host, keep) = match store::logs::instance_origin(db, &instance) {
            Ok(Some((d, h))) => (d, h, true),
            Ok(None) => (String::new(), String::new(), true),
            Err(e) => {
                tracing::debug!(error = format!("{e:#}"), "log export: reading an instance");
                (String::new(), String::new(), false)
            }
        };
        let o = Arc::new(export::Origin {
            app: item.app.clone(),
            deployment,
            instance,
            host,
        });
        if keep {
            self.origins.insert(item.instance, o.clone());
        }
        o
    }

    /// Hands a commit's lines to the exporter (never waits).
    fn send(&mut self, db: &Db, items: &mut [Item], stored: Vec<Stored>) {
        let lines = export_lines(items, stored, |it| self.origin(db, it));
        self.exporter.push(lines);
    }
}

/// A commit's stored lines as the exporter takes them, in commit order, their data moved out
/// of the items (which are dropped next).
fn export_lines(
    items: &mut [Item],
    stored: Vec<Stored>,
    mut origin: impl FnMut(&Item) -> Arc<export::Origin>,
) -> Vec<export::Line> {
    let mut lines = Vec::new();
    for s in stored {
        match s {
            Stored::Entries { item, skip } => {
                let o = origin(&items[item]);
                let it = &mut items[item];
                let observed_ns = it.received_ns;
                lines.extend(it.batch.entries[skip..].iter_mut().map(|e| export::Line {
                    origin: o.clone(),
                    stream: e.stream,
                    time_us: e.timestamp_unix_us,
                    observed_ns,
                    data: std::mem::take(&mut e.data),
                    truncated: e.truncated,
                    lost: 0,
                }));
            }
            Stored::Gap {
                item,
                lost,
                stream,
                ts_us,
            } => lines.push(export::Line {
                origin: origin(&items[item]),
                stream,
                time_us: ts_us,
                observed_ns: items[item].received_ns,
                data: Vec::new(),
                truncated: false,
                lost,
            }),
            Stored::Text { item, ts_us, text } => lines.push(export::Line {
                origin: origin(&items[item]),
                stream: LogStream::Entrypoint as i32,
                time_us: ts_us,
                observed_ns: items[item].received_ns,
                data: text.into_bytes(),
                truncated: false,
                lost: 0,
            }),
        }
    }
    lines
}

/// A source as the writer keeps it.
#[derive(Clone)]
struct Source {
    row: SourceRow,
    /// The last batch was refused (see [`check_jump`]): one notice per run of refusals.
    refusing: bool,
}

struct Writer {
    sources: HashMap<InstanceId, Source>,
    usage: HashMap<String, Usage>,
    limits: HashMap<String, (u64, u64)>,
    /// When retention was last checked (after commits when over a limit, else on a timer).
    last_prune_check: Instant,
    /// The last pruning failed: retry on the timer, not after every commit.
    prune_failing: bool,
    /// The id after the last line this writer stored: where the next commit's ids start, unless
    /// other writers (replicas) stored more since (see [`store::logs::write`]).
    next_id: i64,
}

/// The chunks a commit is filling: one per instance, in the order the instances came.
#[derive(Default)]
struct OpenChunks {
    index: HashMap<InstanceId, usize>,
    /// (app, source row id, lines so far).
    chunks: Vec<(String, i64, ChunkBuilder)>,
}

impl OpenChunks {
    /// The open chunk of an instance (one lookup per batch, not per line), with room for
    /// `bytes` more (capped: a full chunk is stored and a new one started).
    fn open(&mut self, instance: &InstanceId, src: &SourceRow, bytes: usize) -> usize {
        let i = *self.index.entry(*instance).or_insert_with(|| {
            self.chunks
                .push((src.app.clone(), src.rowid, ChunkBuilder::default()));
            self.chunks.len() - 1
        });
        self.chunks[i].2.data.reserve(bytes.min(CHUNK_BYTES));
        i
    }

    /// Adds a line to chunk `i`; a full chunk is stored at once and gets the next ids.
    fn push(
        &mut self,
        tx: &mut store::logs::LogTx<'_>,
        i: usize,
        line: &NewLine<'_>,
    ) -> Result<()> {
        let (app, rowid, c) = &mut self.chunks[i];
        c.push(line);
        if c.lines >= CHUNK_LINES || c.data.len() >= CHUNK_BYTES {
            tx.insert_chunk(app, *rowid, c)?;
            *c = ChunkBuilder::default();
        }
        Ok(())
    }

    /// Stores what is left.
    fn finish(self, tx: &mut store::logs::LogTx<'_>) -> Result<()> {
        for (app, rowid, c) in self.chunks {
            if !c.is_empty() {
                tx.insert_chunk(&app, rowid, &c)?;
            }
        }
        Ok(())
    }
}

impl Writer {
    fn new(db: &Db) -> Result<Writer> {
        let usage = store::logs::usage(db)?;
        let limits = store::logs::retentions(db)?
            .into_iter()
            .map(|(app, r)| {
                (
                    app,
                    (
                        r.max_lines.unwrap_or(DEFAULT_MAX_LINES),
                        r.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
                    ),
                )
            })
            .collect();
        Ok(Writer {
            sources: HashMap::new(),
            usage,
            limits,
            last_prune_check: Instant::now(),
            prune_failing: false,
            next_id: store::logs::max_line_id(db)? + 1,
        })
    }

    fn limits(&self, app: &str) -> (u64, u64) {
        self.limits
            .get(app)
            .copied()
            .unwrap_or((DEFAULT_MAX_LINES, DEFAULT_MAX_BYTES))
    }

    fn run(&mut self, mut db: Db, location: &Location, rx: std_mpsc::Receiver<Msg>, out: Outlets) {
        let Outlets {
            committed,
            rt,
            intake,
            mut feed,
        } = out;
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
                    match self.commit(&db, &items) {
                        Ok(done) => {
                            if intake.send_replace(None).is_some() {
                                tracing::info!("storing logs works again; log intake resumed");
                            }
                            publish(&committed, done.max_id);
                            for (weak, up_to) in done.acks {
                                send_ack(&rt, weak, up_to);
                            }
                            let m = metrics();
                            for (app, n) in &done.stored {
                                m.log_lines_stored
                                    .get_or_create(&AppLabel::new(app))
                                    .inc_by(*n);
                            }
                            for (app, n) in &done.reported {
                                m.log_lines_dropped
                                    .get_or_create(&AppLabel::new(app))
                                    .inc_by(*n);
                            }
                            // After the acks: the collector never delays an entrypoint.
                            if let Some(feed) = &mut feed {
                                feed.send(&db, &mut items, done.stored_lines);
                            }
                            break;
                        }
                        Err(e) => {
                            // SQLite: the outermost message ("database or disk is full"), its
                            // cause only repeats it with the code. PostgreSQL's outermost is
                            // "db error"; the server's message is in the causes.
                            let error = match db.backend() {
                                Backend::Sqlite => e.to_string(),
                                Backend::Postgres => format!("{e:#}"),
                            };
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
                            reconnect(&mut db, location);
                            if let Ok(w) = Writer::new(&db) {
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
                match self.prune(&db) {
                    Ok(()) => self.prune_failing = false,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "pruning logs failed");
                        reconnect(&mut db, location);
                        if let Ok(w) = Writer::new(&db) {
                            *self = w;
                        }
                        self.prune_failing = true;
                    }
                }
            }
        }
    }

    fn source(
        &mut self,
        tx: &mut store::logs::LogTx<'_>,
        id: &InstanceId,
        app: &str,
    ) -> Result<Source> {
        if let Some(s) = self.sources.get(id) {
            return Ok(s.clone());
        }
        if self.sources.len() >= SOURCE_CACHE {
            self.sources.clear();
        }
        let s = Source {
            row: tx.source(&util::hex(id), app)?,
            refusing: false,
        };
        self.sources.insert(*id, s.clone());
        Ok(s)
    }

    /// Stores the batches in one transaction, each instance's new lines in as few chunks as
    /// [`CHUNK_LINES`] and [`CHUNK_BYTES`] allow. Returns the acks to send, the highest line id
    /// (0: nothing stored) and what was stored.
    fn commit(&mut self, db: &Db, items: &[Item]) -> Result<Committed> {
        let mut acks = Vec::with_capacity(items.len());
        let mut touched: HashMap<InstanceId, Source> = HashMap::new();
        let mut usage_delta: HashMap<&str, Usage> = HashMap::new();
        let mut reported: HashMap<&str, u64> = HashMap::new();
        let mut stored_lines = Vec::new();
        let mut open = OpenChunks::default();
        let ((), ids) = store::logs::write(db, self.next_id, |tx| {
            if tx.shared() {
                self.refresh_sources(tx, items)?;
            }
            for (index, item) in items.iter().enumerate() {
                let mut src = match touched.get(&item.instance) {
                    Some(s) => s.clone(),
                    None => self.source(tx, &item.instance, &item.app)?,
                };
                let b = &item.batch;
                let n = b.entries.len() as u64;
                let h = src.row.next_seq;
                if src.row.app != item.app {
                    // Connections are bound to their instance's owner, so this means a bug:
                    // never store one app's lines under another's instance.
                    tracing::error!(
                        instance = util::hex(&item.instance),
                        app = item.app,
                        owner = src.row.app,
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
                        let line = NewLine {
                            seq: h as i64,
                            stream: LogStream::Entrypoint as i64,
                            ts_us: util::now_ms() * 1000,
                            truncated: false,
                            dropped: 0,
                            data: text.as_bytes(),
                        };
                        let i = open.open(&item.instance, &src.row, text.len() + 16);
                        open.push(tx, i, &line)?;
                        let u = usage_delta.entry(item.app.as_str()).or_default();
                        u.lines += 1;
                        u.bytes += text.len() as u64;
                        stored_lines.push(Stored::Text {
                            item: index,
                            ts_us: line.ts_us,
                            text,
                        });
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
                if b.first_seq >= h {
                    // Not a resend of stored entries: its drop count is news (counted once).
                    *reported.entry(item.app.as_str()).or_default() += b.dropped;
                }
                // Entries below H are already stored (a resend): skip them.
                let skip = h.saturating_sub(b.first_seq).min(n);
                let start = b.first_seq + skip;
                let new = &b.entries[skip as usize..];
                let u = usage_delta.entry(item.app.as_str()).or_default();
                // The encoding adds about 8 bytes to a line (flags, seq and time deltas, length).
                let want = new.iter().map(|e| e.data.len() + 8).sum::<usize>() + 32;
                let chunk = open.open(&item.instance, &src.row, want);
                if start > h {
                    // Entries h..start never arrived and never will: record the loss where it
                    // happened.
                    let gap = start - h;
                    let (stream, ts) = new
                        .first()
                        .map(|e| (e.stream as i64, e.timestamp_unix_us))
                        .unwrap_or((LogStream::Entrypoint as i64, util::now_ms() * 1000));
                    let line = NewLine {
                        seq: h as i64,
                        stream,
                        ts_us: ts,
                        truncated: false,
                        dropped: gap as i64,
                        data: &[],
                    };
                    open.push(tx, chunk, &line)?;
                    src.row.lost += gap;
                    src.row.next_seq = start;
                    u.lines += 1;
                    stored_lines.push(Stored::Gap {
                        item: index,
                        lost: gap,
                        stream: stream as i32,
                        ts_us: ts,
                    });
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
                    let line = NewLine {
                        seq: (start + i as u64) as i64,
                        stream,
                        ts_us: e.timestamp_unix_us,
                        truncated: e.truncated,
                        dropped: 0,
                        data: &e.data,
                    };
                    open.push(tx, chunk, &line)?;
                    u.lines += 1;
                    u.bytes += e.data.len() as u64;
                }
                if !new.is_empty() {
                    stored_lines.push(Stored::Entries {
                        item: index,
                        skip: skip as usize,
                    });
                }
                src.row.next_seq = src.row.next_seq.max(b.first_seq + n);
                src.row.reported = src
                    .row
                    .reported
                    .saturating_add(b.dropped)
                    .min(i64::MAX as u64);
                acks.push((item.ack.clone(), src.row.next_seq));
                touched.insert(item.instance, src);
            }
            open.finish(tx)?;
            for s in touched.values() {
                tx.update_source(&s.row)?;
            }
            for (app, d) in &usage_delta {
                tx.add_usage(app, *d)?;
            }
            Ok(())
        })?;
        let mut stored = Vec::with_capacity(usage_delta.len());
        for (app, d) in usage_delta {
            let u = self.usage.entry(app.to_string()).or_default();
            u.lines += d.lines;
            u.bytes += d.bytes;
            stored.push((app.to_string(), d.lines));
        }
        self.sources.extend(touched);
        let max_id = if ids.is_empty() { 0 } else { ids.end - 1 };
        self.next_id = ids.end;
        Ok(Committed {
            acks,
            max_id,
            stored,
            reported: reported
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(app, n)| (app.to_string(), n))
                .collect(),
            stored_lines,
        })
    }

    /// Reads the sources of the batches' instances again, in the transaction (so under the
    /// writers' lock): another replica may have stored lines of an instance since this writer
    /// cached its source (the instance moved there, and maybe back), and a stale H would turn
    /// its resends into false losses and move H back.
    fn refresh_sources(&mut self, tx: &mut store::logs::LogTx<'_>, items: &[Item]) -> Result<()> {
        let mut ids: Vec<InstanceId> = items.iter().map(|i| i.instance).collect();
        ids.sort_unstable();
        ids.dedup();
        let hexes: Vec<String> = ids.iter().map(|id| util::hex(id)).collect();
        let mut fresh = tx.sources(&hexes)?;
        for (id, hex) in ids.iter().zip(&hexes) {
            match fresh.remove(hex) {
                Some(row) => match self.sources.get_mut(id) {
                    Some(s) => s.row = row,
                    None => {
                        if self.sources.len() >= SOURCE_CACHE {
                            self.sources.clear();
                        }
                        self.sources.insert(
                            *id,
                            Source {
                                row,
                                refusing: false,
                            },
                        );
                    }
                },
                None => {
                    self.sources.remove(id);
                }
            }
        }
        Ok(())
    }

    /// Deletes the oldest lines of every app over its limits, up to [`PRUNE_CHUNKS`] chunks per
    /// transaction, down to [`PRUNE_TO`] of the limits (exactly: the oldest chunk left is
    /// trimmed to the line).
    fn prune(&mut self, db: &Db) -> Result<()> {
        if store::logs::shared(db) {
            // Other replicas add to the same apps: their counts are in the table only.
            self.usage = store::logs::usage(db)?;
        }
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
            // Exactly as if lines were deleted one by one, oldest first, while over: whole
            // chunks while the app stays over without them, then the first lines of the next.
            let over = |del_lines: u64, del_bytes: u64| {
                u.lines.saturating_sub(del_lines) > want_lines
                    || u.bytes.saturating_sub(del_bytes) > want_bytes
            };
            let (mut del_lines, mut del_bytes, mut cutoff) = (0u64, 0u64, None);
            let (mut boundary, mut any) = (None, false);
            store::logs::oldest_chunks(db, &app, PRUNE_CHUNKS, |c| {
                any = true;
                if !over(del_lines, del_bytes) {
                    return false;
                }
                if over(del_lines + c.lines, del_bytes + c.bytes) {
                    cutoff = Some(c.last_id);
                    del_lines += c.lines;
                    del_bytes += c.bytes;
                    true
                } else {
                    boundary = Some(c.first_id);
                    false
                }
            })?;
            let mut trim = None;
            if let Some(first_id) = boundary {
                let mut k = 0u64;
                store::logs::chunk_lines(db, first_id, |_, l| {
                    if over(del_lines, del_bytes) {
                        k += 1;
                        del_lines += 1;
                        del_bytes += l.data.len() as u64;
                    }
                })?;
                trim = Some((first_id, k));
            }
            let left = if any {
                // The usage as stored after: what was deleted is taken off it there.
                store::logs::prune(db, &app, cutoff, trim)?
            } else {
                // Counters out of step with the table (nothing left to delete): recounted.
                store::logs::recount_usage(db, &app)?
            };
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

/// Raises the published highest committed line id to `id`, never lowers it: this replica's
/// writer and the listener for the others' both publish, in no set order.
fn publish(committed: &watch::Sender<i64>, id: i64) {
    committed.send_if_modified(|v| {
        let higher = id > *v;
        if higher {
            *v = id;
        }
        higher
    });
}

/// How long the listener for other replicas' commits waits for a notification before it reads
/// the highest line id itself (covering any it missed while reconnecting), and so how soon it
/// sees that the service is gone.
const FOLLOW_WAIT: Duration = Duration::from_millis(500);
/// Pause before the listener reconnects after its connection failed.
const FOLLOW_RECONNECT: Duration = Duration::from_secs(1);

/// PostgreSQL: publishes the line ids other replicas commit (their notifications on
/// [`store::logs::LOGS_CHANNEL`]), so this replica's readers see their lines, until nobody
/// watches the committed id any more. Runs on a thread of its own (the client blocks).
fn follow_other_writers(location: &Location, committed: &watch::Sender<i64>) {
    let mut failing = false;
    while !committed.is_closed() {
        let r = store::connect(location).and_then(|db| {
            store::logs::listen(&db)?;
            if failing {
                tracing::info!("log listener: connected again");
                failing = false;
            }
            while !committed.is_closed() {
                // Nothing heard: read the highest id (cheap; an announcement may have been
                // missed while not listening, or lost with a connection).
                let ids = store::wait_notifications(&db, FOLLOW_WAIT)?;
                let heard = ids.iter().filter_map(|p| p.parse::<i64>().ok()).max();
                let id = match heard {
                    Some(id) => id,
                    None => store::logs::max_line_id(&db)?,
                };
                publish(committed, id);
            }
            Ok(())
        });
        if let Err(e) = r {
            if !failing {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "log listener: cannot reach the database; retrying (other replicas' lines \
                     show here once it is back)"
                );
                failing = true;
            }
            std::thread::sleep(FOLLOW_RECONNECT);
        }
    }
}

/// After a failure: a new connection for the writer if the database closed its one (PostgreSQL
/// restarted, a network cut), so the retries can succeed once it is back. A failed attempt
/// leaves the closed one, for the next retry to try again.
fn reconnect(db: &mut Db, location: &Location) {
    if !db.is_closed() {
        return;
    }
    match store::logs::connect_writer(location) {
        Ok(new) => {
            *db = new;
            tracing::info!("the log writer reconnected to the database");
        }
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "the log writer cannot reconnect to the database yet"
        ),
    }
}

/// Queues a LogAck without blocking the writer; a full queue gets a task (acks are cumulative,
/// so one arriving late or out of order is harmless).
fn send_ack(rt: &tokio::runtime::Handle, weak: mpsc::WeakSender<Queued>, up_to: u64) {
    let Some(tx) = weak.upgrade() else { return };
    let frame: Frame = Kind::LogAck(proto::LogAck { up_to_seq: up_to }).into();
    if let Err(mpsc::error::TrySendError::Full(frame)) = tx.try_send(Box::new(frame)) {
        rt.spawn(async move {
            let _ = tokio::time::timeout(ACK_TIMEOUT, tx.send(frame)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::logs::LogFilter;

    fn db() -> (tempfile::TempDir, Location) {
        let dir = tempfile::tempdir().unwrap();
        let location = Location::Sqlite(dir.path().join("t.db"));
        let st = store::Store::open(&location).unwrap();
        st.with(|db| store::create_app(db, "web", 0)).unwrap();
        (dir, location)
    }

    fn open(location: &Location) -> Result<Db> {
        store::connect(location)
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
            received_ns: 0,
            ack: tx.downgrade(),
            _credits: credits.clone().try_acquire_owned().unwrap(),
        }
    }

    /// Every stored row of app web: `{"seq", "text"}`, or `{"seq", "dropped"}` for a marker.
    fn all(c: &Db) -> Vec<serde_json::Value> {
        let f = LogFilter {
            app: "web".into(),
            src: None,
            stream: None,
            since_us: None,
        };
        let mut rows = Vec::new();
        store::logs::lines(c, &f, 0, i64::MAX, 1000, |l| {
            rows.push(if l.dropped > 0 {
                serde_json::json!({ "seq": l.seq, "dropped": l.dropped })
            } else {
                serde_json::json!({ "seq": l.seq, "text": String::from_utf8_lossy(&l.data) })
            });
            Ok(())
        })
        .unwrap();
        rows
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
        let (_d, loc) = db();
        let conn = open(&loc).unwrap();
        let mut w = Writer::new(&conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        let a = [3u8; 16];
        w.commit(&conn, &[item(a, 0, &["l0", "l1", "l2"], &credits)])
            .unwrap();
        // Two refused batches in a row: no ack, one notice, H unchanged.
        let huge = 1u64 << 40;
        let Committed { acks, .. } = w
            .commit(
                &conn,
                &[
                    item(a, huge, &["forged"], &credits),
                    item(a, huge + 1, &["forged2"], &credits),
                ],
            )
            .unwrap();
        assert!(acks.is_empty(), "a refused batch is not acknowledged");
        let h = |c: &Db| -> i64 {
            store::raw(c, |c| {
                c.query_row("SELECT next_seq FROM log_sources", [], |r| r.get(0))
            })
        };
        assert_eq!(h(&conn), 3);
        // The instance's real next lines are still stored.
        let Committed { acks, .. } = w.commit(&conn, &[item(a, 3, &["l3"], &credits)]).unwrap();
        assert_eq!(acks[0].1, 4);
        // A later refusal is noticed again (a new run of them); the writer's cache and the
        // database agree after a restart of the writer.
        drop(w);
        let mut w = Writer::new(&conn).unwrap();
        let Committed { acks, .. } = w
            .commit(&conn, &[item(a, huge, &["forged3"], &credits)])
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
        let Committed { acks, .. } = w.commit(&conn, &[ok]).unwrap();
        assert_eq!(acks[0].1, 4 + UNREPORTED_GAP + 6);
    }

    #[test]
    fn another_apps_batch_is_never_stored_under_an_instance() {
        let (_d, loc) = db();
        let conn = open(&loc).unwrap();
        let mut w = Writer::new(&conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        let b = [4u8; 16];
        w.commit(&conn, &[item(b, 0, &["b0"], &credits)]).unwrap();
        let mut from_a = item(b, 1, &["from a"], &credits);
        from_a.app = "other".into();
        let Committed { acks, .. } = w.commit(&conn, &[from_a]).unwrap();
        assert!(acks.is_empty());
        let n: i64 = store::raw(&conn, |c| {
            c.query_row("SELECT COALESCE(SUM(lines), 0) FROM log_chunks", [], |r| {
                r.get(0)
            })
        });
        assert_eq!(n, 1);
        // Also when the writer starts cold (the source comes from the database).
        drop(w);
        let mut w = Writer::new(&conn).unwrap();
        let mut from_a = item(b, 1, &["from a"], &credits);
        from_a.app = "other".into();
        assert!(w.commit(&conn, &[from_a]).unwrap().acks.is_empty());
        let Committed { acks, .. } = w.commit(&conn, &[item(b, 1, &["b1"], &credits)]).unwrap();
        assert_eq!(acks[0].1, 2);
    }

    #[test]
    fn the_exporter_gets_each_stored_line_once_in_order() {
        let (_d, loc) = db();
        let conn = open(&loc).unwrap();
        let mut w = Writer::new(&conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        let a = [4u8; 16];
        let origin = Arc::new(export::Origin {
            app: "web".into(),
            deployment: String::new(),
            instance: util::hex(&a),
            host: String::new(),
        });
        let mut exported = |items: Vec<Item>| -> Vec<String> {
            let mut items = items;
            let done = w.commit(&conn, &items).unwrap();
            export_lines(&mut items, done.stored_lines, |_| origin.clone())
                .iter()
                .map(|l| match l.lost {
                    0 => String::from_utf8_lossy(&l.data).into_owned(),
                    n => format!("[{n} lost]"),
                })
                .collect()
        };
        assert_eq!(
            exported(vec![item(a, 0, &["l0", "l1"], &credits)]),
            ["l0", "l1"]
        );
        // A resend overlapping what is stored, then a gap, in one commit.
        assert_eq!(
            exported(vec![
                item(a, 1, &["l1", "l2"], &credits),
                item(a, 5, &["l5"], &credits),
            ]),
            ["l2", "[2 lost]", "l5"]
        );
        // A pure duplicate: nothing; a refused jump: the server's notice only.
        assert!(exported(vec![item(a, 0, &["l0"], &credits)]).is_empty());
        let refused = exported(vec![item(a, 1 << 40, &["forged"], &credits)]);
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].starts_with("waypost server: refused"),
            "{refused:?}"
        );
    }

    #[test]
    fn dedup_gaps_and_acks() {
        let (_d, loc) = db();
        let conn = open(&loc).unwrap();
        let mut w = Writer::new(&conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        let a = [1u8; 16];
        let Committed { acks, .. } = w
            .commit(&conn, &[item(a, 0, &["l0", "l1", "l2"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 3);
        // Resent overlap + new: only l3 is new.
        let Committed { acks, .. } = w
            .commit(&conn, &[item(a, 1, &["l1", "l2", "l3"], &credits)])
            .unwrap();
        assert_eq!(acks[0].1, 4);
        // A gap: 4..7 lost.
        let Committed { acks, .. } = w.commit(&conn, &[item(a, 7, &["l7"], &credits)]).unwrap();
        assert_eq!(acks[0].1, 8);
        // A pure duplicate: acked, nothing stored.
        let Committed { acks, .. } = w.commit(&conn, &[item(a, 0, &["l0"], &credits)]).unwrap();
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
        let mut w = Writer::new(&conn).unwrap();
        let Committed { acks, .. } = w.commit(&conn, &[item(a, 8, &["l8"], &credits)]).unwrap();
        assert_eq!(acks[0].1, 9);
        let c2 = open(&loc).unwrap();
        assert_eq!(
            store::raw(&c2, |c| c.query_row(
                "SELECT next_seq, lost FROM log_sources",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            )),
            (9, 3)
        );
        assert_eq!(w.usage["web"].lines, 7);
        assert_eq!(w.usage["web"].bytes, 12);
    }

    #[test]
    fn chunks_split_keep_ids_in_order_and_prune_exactly() {
        let (_d, loc) = db();
        let conn = open(&loc).unwrap();
        let mut w = Writer::new(&conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        let (a, b) = ([5u8; 16], [6u8; 16]);
        // One commit of two instances, one of them past a chunk's line cap.
        let many: Vec<String> = (0..CHUNK_LINES + 10).map(|i| format!("a{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let Committed { max_id, .. } = w
            .commit(
                &conn,
                &[
                    item(a, 0, &refs[..5], &credits),
                    item(b, 0, &["b0", "b1"], &credits),
                    item(a, 5, &refs[5..], &credits),
                ],
            )
            .unwrap();
        let total = CHUNK_LINES + 12;
        assert_eq!(max_id, total);
        let chunks: i64 = store::raw(&conn, |c| {
            c.query_row("SELECT COUNT(*) FROM log_chunks", [], |r| r.get(0))
        });
        assert_eq!(chunks, 3, "a's lines in two chunks (the cap), b's in one");
        // Every id once, ascending; each instance's lines in order.
        let f = LogFilter {
            app: "web".into(),
            src: None,
            stream: None,
            since_us: None,
        };
        let mut ids = Vec::new();
        let mut a_texts = Vec::new();
        store::logs::lines(&conn, &f, 0, i64::MAX, i64::MAX, |l| {
            ids.push(l.id);
            if l.instance == util::hex(&a) {
                a_texts.push(String::from_utf8(l.data).unwrap());
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(ids, (1..=total).collect::<Vec<_>>());
        assert_eq!(a_texts, many);
        // A page ending inside a chunk continues from there.
        let (max, n) = store::logs::lines(&conn, &f, 0, i64::MAX, 100, |_| Ok(())).unwrap();
        assert_eq!((max, n), (100, 100));
        let (max, n) = store::logs::lines(&conn, &f, 100, 150, 1000, |_| Ok(())).unwrap();
        assert_eq!((max, n), (150, 50));
        // The next commit's ids follow; a restarted writer continues after them.
        let Committed { max_id, .. } = w.commit(&conn, &[item(b, 2, &["b2"], &credits)]).unwrap();
        assert_eq!(max_id, total + 1);
        drop(w);
        let mut w = Writer::new(&conn).unwrap();
        let Committed { max_id, .. } = w.commit(&conn, &[item(b, 3, &["b3"], &credits)]).unwrap();
        assert_eq!(max_id, total + 2);
        // Pruning to 90% of 1,000 lines: whole chunks go, the oldest one left is trimmed to the
        // line, and the lines left keep their ids.
        w.limits.insert("web".into(), (1000, 1 << 30));
        w.prune(&conn).unwrap();
        let mut left = Vec::new();
        store::logs::lines(&conn, &f, 0, i64::MAX, i64::MAX, |l| {
            left.push((l.id, String::from_utf8(l.data).unwrap()));
            Ok(())
        })
        .unwrap();
        assert_eq!(left.len(), 900);
        assert_eq!(w.usage["web"].lines, 900);
        assert_eq!(left[0].0, total + 2 - 899);
        // b's lines of the first commit were stored after a's (one chunk per instance and
        // commit), so the last four are b0..b3.
        assert_eq!(left[0].1, format!("a{}", CHUNK_LINES + 10 - 896));
        assert_eq!(left[899], (total + 2, "b3".to_string()));
        let stored: (i64, i64) = store::raw(&conn, |c| {
            c.query_row("SELECT SUM(lines), SUM(bytes) FROM log_chunks", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        });
        assert_eq!(stored.0, 900);
        assert_eq!(stored.1 as u64, w.usage["web"].bytes);
        // The tail of what is left.
        let start = store::logs::tail_start(&conn, &f, 0, i64::MAX, 3).unwrap();
        assert_eq!(start, total - 1);
    }

    #[test]
    fn retention_prunes_oldest() {
        let (_d, loc) = db();
        let conn = open(&loc).unwrap();
        let mut w = Writer::new(&conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        w.limits.insert("web".into(), (100, 1 << 30));
        let texts: Vec<String> = (0..150).map(|i| format!("{i}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        w.commit(&conn, &[item([2u8; 16], 0, &refs, &credits)])
            .unwrap();
        w.prune(&conn).unwrap();
        let rows = all(&conn);
        assert_eq!(rows.len(), 90);
        assert_eq!(rows[0]["text"], "60");
        assert_eq!(w.usage["web"].lines, 90);
        // By bytes too.
        w.limits.insert("web".into(), (1000, 100));
        w.prune(&conn).unwrap();
        let rows = all(&conn);
        let bytes: usize = rows.iter().map(|r| r["text"].as_str().unwrap().len()).sum();
        assert!(bytes <= 90, "{bytes}");
        assert_eq!(rows.last().unwrap()["text"], "149");
    }

    /// Two replicas' writers on one PostgreSQL (`WAYPOST_TEST_DATABASE`, else skipped): an
    /// instance moving from one to the other and back keeps its sequence (no false loss, no
    /// duplicate), and pruning counts the other writer's lines.
    #[test]
    fn replicas_share_sources_and_usage_on_postgres() {
        let Ok(base) = std::env::var("WAYPOST_TEST_DATABASE") else {
            println!("skipped: WAYPOST_TEST_DATABASE unset");
            return;
        };
        struct Dropped(String);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = waypost_testkit::pg::drop_database_at(&self.0);
            }
        }
        let url = Dropped(waypost_testkit::pg::create_database_at(&base));
        let loc = Location::Postgres(url.0.clone());
        let st = store::Store::open(&loc).unwrap();
        st.with(|db| store::create_app(db, "web", 0)).unwrap();
        let (c1, c2) = (open(&loc).unwrap(), open(&loc).unwrap());
        let (mut w1, mut w2) = (Writer::new(&c1).unwrap(), Writer::new(&c2).unwrap());
        let credits = Arc::new(Semaphore::new(100));
        let a = [7u8; 16];
        let Committed {
            acks, max_id: max, ..
        } = w1
            .commit(&c1, &[item(a, 0, &["l0", "l1"], &credits)])
            .unwrap();
        assert_eq!((acks[0].1, max), (2, 2));
        let Committed {
            acks, max_id: max, ..
        } = w2.commit(&c2, &[item(a, 2, &["l2"], &credits)]).unwrap();
        assert_eq!((acks[0].1, max), (3, 3));
        // Back on the first: its cached H (2) is stale.
        let Committed {
            acks, max_id: max, ..
        } = w1.commit(&c1, &[item(a, 3, &["l3"], &credits)]).unwrap();
        assert_eq!((acks[0].1, max), (4, 4));
        // A late resend through the second (its old connection): duplicates there too.
        let Committed {
            acks, max_id: max, ..
        } = w2
            .commit(&c2, &[item(a, 1, &["l1", "l2"], &credits)])
            .unwrap();
        assert_eq!((acks[0].1, max), (4, 0));
        let texts: Vec<String> = all(&c1).iter().map(|r| r.to_string()).collect();
        assert_eq!(
            texts,
            (0..4)
                .map(|i| format!(r#"{{"seq":{i},"text":"l{i}"}}"#))
                .collect::<Vec<_>>()
        );
        let stats = store::logs::stats(&c1, "web").unwrap();
        assert_eq!(stats.instances, [(util::hex(&a), 4, 0, 0)]);
        assert_eq!(stats.usage, (4, 8));
        // The second writer counted one line itself; the table knows all four.
        w2.limits.insert("web".into(), (2, 1 << 30));
        w2.prune(&c2).unwrap();
        assert_eq!(w2.usage["web"].lines, 1);
        assert_eq!(all(&c1).len(), 1);
        w1.limits.insert("web".into(), (2, 1 << 30));
        w1.prune(&c1).unwrap();
        assert_eq!(w1.usage["web"], Usage { lines: 1, bytes: 2 });
        assert_eq!(store::logs::stats(&c1, "web").unwrap().usage, (1, 2));
    }

    #[test]
    fn the_published_committed_id_never_goes_back() {
        let (tx, rx) = watch::channel(0i64);
        publish(&tx, 5);
        publish(&tx, 3);
        assert_eq!(*rx.borrow(), 5);
        publish(&tx, 0);
        publish(&tx, 6);
        assert_eq!(*rx.borrow(), 6);
    }

    /// Another replica's commits reach this one's committed id (`WAYPOST_TEST_DATABASE`, else
    /// skipped), and the listener ends once nobody watches.
    #[test]
    fn other_replicas_commits_are_published_on_postgres() {
        let Ok(base) = std::env::var("WAYPOST_TEST_DATABASE") else {
            println!("skipped: WAYPOST_TEST_DATABASE unset");
            return;
        };
        struct Dropped(String);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = waypost_testkit::pg::drop_database_at(&self.0);
            }
        }
        let url = Dropped(waypost_testkit::pg::create_database_at(&base));
        let loc = Location::Postgres(url.0.clone());
        let st = store::Store::open(&loc).unwrap();
        st.with(|db| store::create_app(db, "web", 0)).unwrap();
        let (tx, rx) = watch::channel(0i64);
        let listener = {
            let loc = loc.clone();
            std::thread::spawn(move || follow_other_writers(&loc, &tx))
        };
        let conn = open(&loc).unwrap();
        let mut w = Writer::new(&conn).unwrap();
        let credits = Arc::new(Semaphore::new(100));
        for (seq, want) in [(0, 2), (2, 4)] {
            let Committed { max_id: max, .. } = w
                .commit(&conn, &[item([9u8; 16], seq, &["x", "y"], &credits)])
                .unwrap();
            assert_eq!(max, want);
            let t = Instant::now();
            while *rx.borrow() != want {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{} != {want}",
                    *rx.borrow()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        drop(rx);
        listener.join().unwrap();
    }
}
