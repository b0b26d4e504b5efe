//! The log tables (`log_sources`, `log_chunks`, `log_settings`, `log_usage`): what the log writer
//! (service/logs.rs) stores and what the logs endpoint reads. The writer's decisions (duplicates,
//! gaps, refusals, when to prune) are made above; here is only how they are written and read.
//!
//! Lines are stored in chunks: one row holds consecutive lines (ids first_id..last_id) of one
//! instance, encoded by [`ChunkBuilder`] (model/logs.rs). Reads select the chunks that can hold
//! matching lines (by app, instance, id range, stream bits, newest timestamp) and filter their
//! decoded lines. The same statements run on SQLite and PostgreSQL (see [`super::sql`]).
//!
//! Several writers: with SQLite there is one log writer per data dir; with PostgreSQL every
//! server replica has one, all writing the same tables. Their write transactions take turns
//! ([`LOG_WRITE_LOCK`]) and each starts its line ids after the highest stored, so ids never
//! collide and grow in commit order (what `logs -f` relies on), and each commit is announced
//! ([`LOGS_CHANNEL`]) for every replica's readers; a source is created by whichever writer gets
//! there first; pruning takes off the usage counters only what it deleted itself.
//! `log_lines` (one row per line, before chunks) is only read once: [`convert_line_rows`].

use super::sql::{ToValue, Value};
use super::{Backend, Begin, Db, Location, Row, args};
use crate::server::model::logs::{
    ChunkBuilder, InstanceMatch, LogFilter, LogLine, LogStats, NewLine, Retention, STREAMS_MARKER,
    SourceRow, Usage, decode_chunk,
};
use anyhow::{Result, anyhow, bail};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::OnceLock;

/// The transaction-scoped advisory lock every transaction that writes log lines or usage takes
/// on PostgreSQL ("wp" + 2; distinct from the store's own locks): the writers of all replicas
/// take turns, so each reads the highest line id with no other writer between that read and its
/// commit. On SQLite the write lock does the same ([`Begin::Immediate`]).
const LOG_WRITE_LOCK: i64 = 0x7770_0002;

/// The PostgreSQL notification channel of stored log lines; the payload is the highest line id
/// a write transaction stored, sent when it commits. Every replica listens ([`listen`]), so its
/// readers (`logs`, `logs -f`) see the lines the others store.
pub const LOGS_CHANNEL: &str = "waypost_logs";

/// Subscribes this connection to [`LOGS_CHANNEL`] (see [`super::wait_notifications`]); false on
/// SQLite, where this server's writer is the only one.
pub fn listen(db: &Db) -> Result<bool> {
    super::listen(db, LOGS_CHANNEL)
}

/// The log writer's own connection (see [`super::connect`]). SQLite: with a bigger page cache,
/// since the indexes of log_chunks are updated on every insert (PostgreSQL caches in its server).
pub fn connect_writer(location: &Location) -> Result<Db> {
    let db = super::connect(location)?;
    db.with_sqlite(|c| c.pragma_update(None, "cache_size", -32_000))
        .transpose()?;
    Ok(db)
}

/// Whether other writers (server replicas) write the same log tables: the caches a writer keeps
/// of them (sources, usage) are then only hints, to be read again.
pub fn shared(db: &Db) -> bool {
    db.backend() == Backend::Postgres
}

/// Runs `f` in a transaction that writes log tables, its turn among the writers taken first:
/// SQLite's write lock (also: a read before the first write cannot turn into SQLITE_BUSY when
/// another connection commits in between), PostgreSQL's [`LOG_WRITE_LOCK`].
fn write_tx<R>(db: &Db, f: impl FnOnce(&Db) -> Result<R>) -> Result<R> {
    match db.backend() {
        Backend::Sqlite => db.transaction(Begin::Immediate, f),
        Backend::Postgres => db.transaction(Begin::Deferred, |db| {
            db.query("SELECT pg_advisory_xact_lock(?1)", args![LOG_WRITE_LOCK])?;
            f(db)
        }),
    }
}

/// Highest line id stored (0 when none): ids are never reused. Both are index lookups: chunks
/// hold disjoint id ranges, so the one with the highest first_id has the highest last_id.
pub fn max_line_id(db: &Db) -> Result<i64> {
    db.query_one(
        "SELECT CASE WHEN c > l THEN c ELSE l END FROM (SELECT
             COALESCE((SELECT last_id FROM log_chunks ORDER BY first_id DESC LIMIT 1), 0) AS c,
             COALESCE((SELECT MAX(id) FROM log_lines), 0) AS l) AS t",
        &[],
    )?
    .get(0)
}

/// Rows of `log_lines` converted per transaction by [`convert_line_rows`].
const CONVERT_ROWS: i64 = 50_000;
/// Rows of `log_lines` read per query by [`convert_line_rows`]: a query's rows are held in
/// memory, and a row can hold a whole line (up to 64 KiB).
const CONVERT_PAGE: i64 = 1_000;

/// Moves the rows a build before chunks stored in `log_lines` into chunks (each run of rows of
/// one instance with consecutive ids becomes one chunk, so every line keeps its id, sequence
/// number, stream, time, flags and data), a transaction per [`CONVERT_ROWS`]. Returns the number
/// of rows moved; 0 at once when there are none (every start after the first).
pub fn convert_line_rows(db: &Db) -> Result<u64> {
    /// A run of consecutive rows of one instance: (first id, src, app, next id, lines).
    type Run = (i64, i64, String, i64, ChunkBuilder);
    let mut moved = 0u64;
    loop {
        let n = write_tx(db, |db| {
            let mut run: Option<Run> = None;
            let (mut n, mut last) = (0i64, i64::MIN);
            loop {
                let rows = db.query(
                    "SELECT id, app, src, seq, stream, ts_us, truncated, dropped, data
                     FROM log_lines WHERE id > ?1 ORDER BY id LIMIT ?2",
                    args![last, CONVERT_PAGE],
                )?;
                for r in &rows {
                    let (id, app, src): (i64, String, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
                    let line = NewLine {
                        seq: r.get(3)?,
                        stream: r.get(4)?,
                        ts_us: r.get(5)?,
                        truncated: r.get(6)?,
                        dropped: r.get(7)?,
                        data: blob(r, 8)?,
                    };
                    let continues = matches!(&run, Some((first, s, a, next, _))
                        if *s == src && *a == app && *next == id && id - first < 8192);
                    if !continues && let Some((first, s, a, _, c)) = run.take() {
                        insert_chunk_at(db, &a, s, first, &c)?;
                    }
                    let (_, _, _, next, c) =
                        run.get_or_insert_with(|| (id, src, app, id, ChunkBuilder::default()));
                    c.push(&line);
                    *next = id + 1;
                    n += 1;
                    last = id;
                }
                if (rows.len() as i64) < CONVERT_PAGE || n >= CONVERT_ROWS {
                    break;
                }
            }
            if let Some((first, s, a, _, c)) = run.take() {
                insert_chunk_at(db, &a, s, first, &c)?;
            }
            if n > 0 {
                db.execute("DELETE FROM log_lines WHERE id <= ?1", args![last])?;
            }
            Ok(n)
        })?;
        moved += n as u64;
        if n < CONVERT_ROWS {
            return Ok(moved);
        }
    }
}

/// Usage per app, as counted.
pub fn usage(db: &Db) -> Result<HashMap<String, Usage>> {
    let mut out = HashMap::new();
    for r in db.query("SELECT app, lines, bytes FROM log_usage", &[])? {
        out.insert(r.get(0)?, usage_of(&r, 1)?);
    }
    Ok(out)
}

/// Columns `i` and `i + 1` as (lines, bytes).
fn usage_of(r: &Row, i: usize) -> Result<Usage> {
    Ok(Usage {
        lines: r.get::<i64>(i)?.max(0) as u64,
        bytes: r.get::<i64>(i + 1)?.max(0) as u64,
    })
}

/// Retention of every app that has one set.
pub fn retentions(db: &Db) -> Result<HashMap<String, Retention>> {
    let mut out = HashMap::new();
    for r in db.query("SELECT app, max_lines, max_bytes FROM log_settings", &[])? {
        out.insert(r.get(0)?, retention_of(&r, 1)?);
    }
    Ok(out)
}

/// Columns `i` and `i + 1` as a retention.
fn retention_of(r: &Row, i: usize) -> Result<Retention> {
    Ok(Retention {
        max_lines: r.get::<Option<i64>>(i)?.map(|v| v as u64),
        max_bytes: r.get::<Option<i64>>(i + 1)?.map(|v| v as u64),
    })
}

/// Retention of one app (both None when never set).
pub fn retention(db: &Db, app: &str) -> Result<Retention> {
    match db.query_opt(
        "SELECT max_lines, max_bytes FROM log_settings WHERE app = ?1",
        args![app],
    )? {
        Some(r) => retention_of(&r, 0),
        None => Ok(Retention::default()),
    }
}

pub fn set_retention(db: &Db, app: &str, r: Retention) -> Result<()> {
    db.execute(
        "INSERT INTO log_settings (app, max_lines, max_bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (app) DO UPDATE SET max_lines = excluded.max_lines,
             max_bytes = excluded.max_bytes",
        args![
            app,
            r.max_lines.map(|v| v as i64),
            r.max_bytes.map(|v| v as i64)
        ],
    )?;
    Ok(())
}

/// H of an instance (`next_seq` of its source), if it has logged.
pub fn next_seq(db: &Db, instance_hex: &str) -> Result<Option<u64>> {
    let r = db.query_opt(
        "SELECT next_seq FROM log_sources WHERE instance = ?1",
        args![instance_hex],
    )?;
    Ok(r.map(|r| r.get::<i64>(0)).transpose()?.map(|v| v as u64))
}

/// The source row id of an instance, if it has logged.
pub fn source_id(db: &Db, instance_hex: &str) -> Result<Option<i64>> {
    db.query_opt(
        "SELECT id FROM log_sources WHERE instance = ?1",
        args![instance_hex],
    )?
    .map(|r| r.get(0))
    .transpose()
}

/// The deployment and host name of an instance (from its row in `instances`), if it has one:
/// what the log exporter (service/export.rs) says about where a line came from.
pub fn instance_origin(db: &Db, instance_hex: &str) -> Result<Option<(String, String)>> {
    db.query_opt(
        "SELECT deployment, hostname FROM instances WHERE id = ?1",
        args![instance_hex],
    )?
    .map(|r| Ok((r.get(0)?, r.get(1)?)))
    .transpose()
}

/// Column `i` as bytes, without a copy.
fn blob(r: &Row, i: usize) -> Result<&[u8]> {
    match r.value(i) {
        Value::Blob(b) => Ok(b),
        // SQLite hands back text if text was stored in a BLOB column.
        Value::Text(t) => Ok(t.as_bytes()),
        other => bail!("column {i}: expected bytes, found {other:?}"),
    }
}

// ---- writing -----------------------------------------------------------------------------------

/// One write transaction of the log writer (see [`write`]). Chunks and source accounting are
/// written in statements of many rows ([`BATCH_ROWS`]): SQLite prepares every statement, and
/// PostgreSQL answers each over the network, so one per row would cost more than the rows.
pub struct LogTx<'a> {
    db: &'a Db,
    /// The id the next stored line gets.
    next_id: i64,
    /// Chunks not inserted yet: the values of [`INSERT_CHUNKS`], a row each.
    chunks: Vec<ChunkRow>,
    /// Their data bytes.
    chunk_bytes: usize,
    /// Source accounting not written back yet, by row id (in order: the same lock order for
    /// every writer).
    sources: BTreeMap<i64, SourceRow>,
}

/// Runs `f` in one transaction, committed if it returns Ok (rolled back otherwise). Returns what
/// `f` returned and the line ids the transaction stored (empty if none).
///
/// `next_id` is the writer's own count (the id after the last one it stored). The transaction's
/// ids start there or after the highest id stored, whichever is higher, read once the writer's
/// turn is taken (see [`LOG_WRITE_LOCK`]): after another replica's lines, and never an id used
/// before, even when pruning has deleted every line. On PostgreSQL the commit announces the
/// highest id on [`LOGS_CHANNEL`].
pub fn write<R>(
    db: &Db,
    next_id: i64,
    f: impl FnOnce(&mut LogTx<'_>) -> Result<R>,
) -> Result<(R, Range<i64>)> {
    write_tx(db, |db| {
        let first = next_id.max(max_line_id(db)? + 1);
        let mut tx = LogTx {
            db,
            next_id: first,
            chunks: Vec::new(),
            chunk_bytes: 0,
            sources: BTreeMap::new(),
        };
        let r = f(&mut tx)?;
        tx.flush_chunks()?;
        tx.flush_sources()?;
        if tx.next_id > first && db.backend() == Backend::Postgres {
            let last = (tx.next_id - 1).to_string();
            db.execute("SELECT pg_notify(?1, ?2)", args![LOGS_CHANNEL, last])?;
        }
        Ok((r, first..tx.next_id))
    })
}

/// Rows a multi-row statement of the writer holds at most (a power of two). A remainder goes in
/// statements of half as many, a quarter… and one, so each statement has one of a few texts to
/// prepare (PostgreSQL keeps them prepared).
const BATCH_ROWS: usize = 32;
const _: () = assert!(BATCH_ROWS.is_power_of_two());
/// Chunk data held for a multi-row insert before it is written, whatever the number of rows.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The rows of a statement for `len` rows still to write: the largest power of two not above
/// `len` or [`BATCH_ROWS`].
fn batch_rows(len: usize) -> usize {
    let n = len.clamp(1, BATCH_ROWS);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// A statement written for many rows at once: `head`, then per row `columns` placeholders, each
/// wrapped by `wrap` (`{}`: the placeholder), then `tail`. Its texts (one per power of two up to
/// [`BATCH_ROWS`] rows) are built once.
struct MultiRow {
    head: &'static str,
    columns: usize,
    wrap: &'static str,
    tail: &'static str,
    texts: OnceLock<Vec<String>>,
}

impl MultiRow {
    /// The text for `rows` rows (a power of two, at most [`BATCH_ROWS`]).
    fn sql(&self, rows: usize) -> &str {
        let texts = self.texts.get_or_init(|| {
            (0..=BATCH_ROWS.trailing_zeros())
                .map(|k| self.build(1 << k))
                .collect()
        });
        &texts[rows.trailing_zeros() as usize]
    }

    fn build(&self, rows: usize) -> String {
        let mut sql = String::from(self.head);
        for r in 0..rows {
            sql.push_str(if r == 0 { " (" } else { ", (" });
            for c in 0..self.columns {
                if c > 0 {
                    sql.push_str(", ");
                }
                let p = format!("?{}", r * self.columns + c + 1);
                sql.push_str(&self.wrap.replace("{}", &p));
            }
            sql.push(')');
        }
        sql.push_str(self.tail);
        sql
    }

    /// Runs the statement for `rows`, in as few statements as [`batch_rows`] allows.
    fn execute<const N: usize>(&self, db: &Db, rows: &[[Value<'_>; N]]) -> Result<()> {
        debug_assert_eq!(N, self.columns);
        let mut rest = rows;
        while !rest.is_empty() {
            let (now, later) = rest.split_at(batch_rows(rest.len()));
            let params: Vec<&dyn ToValue> =
                now.iter().flatten().map(|v| v as &dyn ToValue).collect();
            db.execute(self.sql(now.len()), &params)?;
            rest = later;
        }
        Ok(())
    }
}

/// Inserts chunks: the values of a row are first_id, last_id, app, src, first_seq, last_seq,
/// min_ts_us, max_ts_us, lines, bytes, streams, codec, data.
static INSERT_CHUNKS: MultiRow = MultiRow {
    head: "INSERT INTO log_chunks (first_id, last_id, app, src, first_seq, last_seq, min_ts_us,
         max_ts_us, lines, bytes, streams, codec, data) VALUES",
    columns: 13,
    wrap: "{}",
    tail: "",
    texts: OnceLock::new(),
};

/// Writes source accounting back: the values of a row are id, next_seq, lost,
/// reported_dropped. The types are spelled out: PostgreSQL cannot infer them in a VALUES list.
static UPDATE_SOURCES: MultiRow = MultiRow {
    head: "UPDATE log_sources SET next_seq = v.column2, lost = v.column3,
         reported_dropped = v.column4 FROM (VALUES",
    columns: 4,
    wrap: "CAST({} AS BIGINT)",
    tail: ") AS v WHERE log_sources.id = v.column1",
    texts: OnceLock::new(),
};

/// The values of a row of [`INSERT_CHUNKS`].
type ChunkRow = [Value<'static>; 13];

/// `c` as a row of [`INSERT_CHUNKS`] for `src`'s lines with the ids `first_id..`.
fn chunk_row(app: &str, src: i64, first_id: i64, c: &ChunkBuilder) -> ChunkRow {
    let (codec, blob) = c.encoded();
    [
        Value::Int(first_id),
        Value::Int(first_id + c.lines - 1),
        Value::Text(Cow::Owned(app.to_string())),
        Value::Int(src),
        Value::Int(c.first_seq),
        Value::Int(c.last_seq),
        Value::Int(c.min_ts_us),
        Value::Int(c.max_ts_us),
        Value::Int(c.lines),
        Value::Int(c.bytes),
        Value::Int(c.streams),
        Value::Int(codec),
        Value::Blob(Cow::Owned(blob.into_owned())),
    ]
}

/// The source columns [`source_of`] reads, then the instance.
const SOURCE_COLUMNS: &str = "id, next_seq, lost, reported_dropped, app, instance";

/// A row of [`SOURCE_COLUMNS`].
fn source_of(r: &Row) -> Result<SourceRow> {
    Ok(SourceRow {
        rowid: r.get(0)?,
        next_seq: r.get::<i64>(1)? as u64,
        lost: r.get::<i64>(2)? as u64,
        reported: r.get::<i64>(3)? as u64,
        app: r.get(4)?,
    })
}

/// Creates the source of an instance unless another writer just did: its id, or no row.
const CREATE_SOURCE: &str = "INSERT INTO log_sources (instance, app) VALUES (?1, ?2)
     ON CONFLICT (instance) DO NOTHING RETURNING id";

/// Instances looked up per query by [`LogTx::sources`]. Always this many parameters (the last
/// ones repeat the first instance), so it is one statement to prepare.
const SOURCES_PER_QUERY: usize = 64;

impl LogTx<'_> {
    /// See [`shared`].
    pub fn shared(&self) -> bool {
        shared(self.db)
    }

    fn find_source(&mut self, instance_hex: &str) -> Result<Option<SourceRow>> {
        self.flush_sources()?;
        self.db
            .query_opt(
                &format!("SELECT {SOURCE_COLUMNS} FROM log_sources WHERE instance = ?1"),
                args![instance_hex],
            )?
            .map(|r| source_of(&r))
            .transpose()
    }

    /// The source of an instance; created (for `app`) if it has none yet. Two writers may want
    /// to create the same one (an instance moving to another replica while its old one still
    /// stores what it sent there). They take turns, and creating does not rely on that either:
    /// whichever comes second finds the row, or its insert does nothing and it reads the row.
    pub fn source(&mut self, instance_hex: &str, app: &str) -> Result<SourceRow> {
        if let Some(s) = self.find_source(instance_hex)? {
            return Ok(s);
        }
        let created = self.db.query_opt(CREATE_SOURCE, args![instance_hex, app])?;
        match created {
            Some(r) => Ok(SourceRow {
                rowid: r.get(0)?,
                app: app.to_string(),
                next_seq: 0,
                lost: 0,
                reported: 0,
            }),
            None => self
                .find_source(instance_hex)?
                .ok_or_else(|| anyhow!("the log source of {instance_hex} vanished")),
        }
    }

    /// The sources of these instances (hex) as stored now, for those that have one.
    pub fn sources(&mut self, instances: &[String]) -> Result<HashMap<String, SourceRow>> {
        self.flush_sources()?;
        let placeholders: Vec<String> = (1..=SOURCES_PER_QUERY).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "SELECT {SOURCE_COLUMNS} FROM log_sources WHERE instance IN ({})",
            placeholders.join(", ")
        );
        let mut out = HashMap::with_capacity(instances.len());
        for group in instances.chunks(SOURCES_PER_QUERY) {
            let params: Vec<&dyn ToValue> = (0..SOURCES_PER_QUERY)
                .map(|i| group.get(i).unwrap_or(&group[0]) as &dyn ToValue)
                .collect();
            for r in self.db.query(&sql, &params)? {
                out.insert(r.get(5)?, source_of(&r)?);
            }
        }
        Ok(out)
    }

    /// Stores a chunk of `src`'s lines with the next `c.lines` ids (in the transaction, with
    /// others: see [`LogTx`]).
    pub fn insert_chunk(&mut self, app: &str, src: i64, c: &ChunkBuilder) -> Result<()> {
        let row = chunk_row(app, src, self.next_id, c);
        self.next_id += c.lines;
        if let Value::Blob(b) = &row[12] {
            self.chunk_bytes += b.len();
        }
        self.chunks.push(row);
        if self.chunks.len() >= BATCH_ROWS || self.chunk_bytes >= BATCH_BYTES {
            self.flush_chunks()?;
        }
        Ok(())
    }

    fn flush_chunks(&mut self) -> Result<()> {
        INSERT_CHUNKS.execute(self.db, &self.chunks)?;
        self.chunks.clear();
        self.chunk_bytes = 0;
        Ok(())
    }

    /// Writes a source's accounting back (in the transaction, with others: see [`LogTx`]).
    pub fn update_source(&mut self, s: &SourceRow) -> Result<()> {
        self.sources.insert(s.rowid, s.clone());
        if self.sources.len() >= BATCH_ROWS {
            self.flush_sources()?;
        }
        Ok(())
    }

    fn flush_sources(&mut self) -> Result<()> {
        let rows: Vec<[Value<'_>; 4]> = self
            .sources
            .values()
            .map(|s| [s.rowid, s.next_seq as i64, s.lost as i64, s.reported as i64].map(Value::Int))
            .collect();
        UPDATE_SOURCES.execute(self.db, &rows)?;
        self.sources.clear();
        Ok(())
    }

    /// Adds to an app's usage counters.
    pub fn add_usage(&mut self, app: &str, d: Usage) -> Result<()> {
        self.db.execute(
            "INSERT INTO log_usage (app, lines, bytes) VALUES (?1, ?2, ?3)
             ON CONFLICT (app) DO UPDATE SET lines = log_usage.lines + excluded.lines,
                 bytes = log_usage.bytes + excluded.bytes",
            args![app, d.lines as i64, d.bytes as i64],
        )?;
        Ok(())
    }
}

/// Stores a chunk of `src`'s lines with the ids `first_id..first_id + c.lines`.
fn insert_chunk_at(db: &Db, app: &str, src: i64, first_id: i64, c: &ChunkBuilder) -> Result<()> {
    INSERT_CHUNKS.execute(db, &[chunk_row(app, src, first_id, c)])
}

/// A stored chunk, without its lines.
#[derive(Clone, Copy, Debug)]
pub struct ChunkMeta {
    pub first_id: i64,
    pub last_id: i64,
    pub lines: u64,
    pub bytes: u64,
}

/// Walks an app's oldest chunks (at most `limit`), oldest first, while `take` says so.
pub fn oldest_chunks(
    db: &Db,
    app: &str,
    limit: usize,
    mut take: impl FnMut(ChunkMeta) -> bool,
) -> Result<()> {
    let rows = db.query(
        "SELECT first_id, last_id, lines, bytes FROM log_chunks WHERE app = ?1
         ORDER BY last_id LIMIT ?2",
        args![app, limit as i64],
    )?;
    for r in &rows {
        let u = usage_of(r, 2)?;
        let m = ChunkMeta {
            first_id: r.get(0)?,
            last_id: r.get(1)?,
            lines: u.lines,
            bytes: u.bytes,
        };
        if !take(m) {
            break;
        }
    }
    Ok(())
}

/// The lines of the chunk that starts at `first_id`, with their ids.
pub fn chunk_lines(db: &Db, first_id: i64, mut each: impl FnMut(i64, NewLine<'_>)) -> Result<()> {
    let r = db.query_one(
        "SELECT codec, first_seq, data FROM log_chunks WHERE first_id = ?1",
        args![first_id],
    )?;
    let mut id = first_id;
    decode_chunk(r.get(0)?, r.get(1)?, blob(&r, 2)?, |l| {
        each(id, l);
        id += 1;
        Ok(true)
    })
}

/// Deletes an app's chunks up to `cutoff` (a last_id) and drops the first `trim.1` lines of the
/// chunk starting at `trim.0` (the oldest one left; the rest keep their ids), and takes what it
/// deleted off the app's usage, in one transaction. Only what this transaction deleted counts:
/// chunks another writer pruned in the meantime (a replica pruning the same app) are gone
/// already and not counted twice, and a chunk to trim that is gone is left alone. Returns the
/// app's usage after.
pub fn prune(db: &Db, app: &str, cutoff: Option<i64>, trim: Option<(i64, u64)>) -> Result<Usage> {
    write_tx(db, |db| {
        let mut deleted = Usage::default();
        if let Some(cut) = cutoff {
            for r in db.query(
                "DELETE FROM log_chunks WHERE app = ?1 AND last_id <= ?2 RETURNING lines, bytes",
                args![app, cut],
            )? {
                let u = usage_of(&r, 0)?;
                deleted.lines += u.lines;
                deleted.bytes += u.bytes;
            }
        }
        if let Some((first_id, k)) = trim
            && let Some(r) = db.query_opt(
                "SELECT src, codec, first_seq, data FROM log_chunks
                 WHERE first_id = ?1 AND app = ?2",
                args![first_id, app],
            )?
        {
            // Re-encoded without its first k lines.
            let mut c = ChunkBuilder::default();
            let mut i = 0u64;
            decode_chunk(r.get(1)?, r.get(2)?, blob(&r, 3)?, |l| {
                if i >= k {
                    c.push(&l);
                } else {
                    deleted.lines += 1;
                    deleted.bytes += l.data.len() as u64;
                }
                i += 1;
                Ok(true)
            })?;
            db.execute(
                "DELETE FROM log_chunks WHERE first_id = ?1",
                args![first_id],
            )?;
            if !c.is_empty() {
                insert_chunk_at(db, app, r.get(0)?, first_id + k as i64, &c)?;
            }
        }
        // Never below zero: the counters may be behind what is stored, never the reverse.
        db.execute(
            "UPDATE log_usage SET lines = CASE WHEN lines > ?2 THEN lines - ?2 ELSE 0 END,
                 bytes = CASE WHEN bytes > ?3 THEN bytes - ?3 ELSE 0 END
             WHERE app = ?1",
            args![
                app,
                deleted.lines.min(i64::MAX as u64) as i64,
                deleted.bytes.min(i64::MAX as u64) as i64
            ],
        )?;
        app_usage(db, app)
    })
}

/// Sets an app's usage counters to what its chunks hold (counters found out of step with the
/// table), and returns it.
pub fn recount_usage(db: &Db, app: &str) -> Result<Usage> {
    write_tx(db, |db| {
        let r = db.query_one(
            "SELECT COALESCE(SUM(lines), 0), COALESCE(SUM(bytes), 0) FROM log_chunks
             WHERE app = ?1",
            args![app],
        )?;
        let u = usage_of(&r, 0)?;
        db.execute(
            "INSERT INTO log_usage (app, lines, bytes) VALUES (?1, ?2, ?3)
             ON CONFLICT (app) DO UPDATE SET lines = excluded.lines, bytes = excluded.bytes",
            args![app, u.lines as i64, u.bytes as i64],
        )?;
        Ok(u)
    })
}

/// An app's usage counters (zero when it has none).
fn app_usage(db: &Db, app: &str) -> Result<Usage> {
    match db.query_opt(
        "SELECT lines, bytes FROM log_usage WHERE app = ?1",
        args![app],
    )? {
        Some(r) => usage_of(&r, 0),
        None => Ok(Usage::default()),
    }
}

// ---- reading -------------------------------------------------------------------------------------

/// Chunks the readers ask for per query: the first query few (a follower, a short tail need a
/// chunk or two), then as many as hold about [`READ_PAGE_BYTES`] by the size of the chunks seen,
/// within [`READ_PAGE_MIN`]..=[`READ_PAGE_MAX`]. A query's rows are held in memory.
const READ_PAGE_MIN: i64 = 4;
const READ_PAGE_MAX: i64 = 1024;
const READ_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// The size of the next page after one of `rows` chunks of `bytes` data.
fn next_page(rows: usize, bytes: usize) -> i64 {
    let avg = (bytes / rows.max(1)).max(1);
    ((READ_PAGE_BYTES / avg) as i64).clamp(READ_PAGE_MIN, READ_PAGE_MAX)
}

/// The chunks that can hold lines of `f` with `after < id <= upto` (by app, instance, id range,
/// the streams they hold, their newest line), as `?1`..`?6` = app, src, after, upto, stream,
/// since.
fn chunk_where(f: &LogFilter) -> String {
    // ?2 is bound either way (NULL for every instance), and the casts are there because
    // PostgreSQL must know every parameter's type.
    let by_src = if f.src.is_some() {
        "c.src = ?2"
    } else {
        "CAST(?2 AS BIGINT) IS NULL"
    };
    format!(
        "c.app = ?1 AND {by_src} AND c.last_id > ?3 AND c.first_id <= ?4
         AND (CAST(?5 AS INTEGER) IS NULL
             OR (c.streams & ((1 << CAST(?5 AS INTEGER)) | {STREAMS_MARKER})) <> 0)
         AND (CAST(?6 AS BIGINT) IS NULL OR c.max_ts_us >= ?6)"
    )
}

/// Whether a decoded line with id `id` is one `f` asks for.
fn line_matches(f: &LogFilter, after: i64, upto: i64, id: i64, l: &NewLine<'_>) -> bool {
    id > after
        && id <= upto
        && (f.stream.is_none_or(|s| s == l.stream) || l.dropped > 0)
        && f.since_us.is_none_or(|t| l.ts_us >= t)
}

/// Matching lines with `after < id <= upto`, ascending, at most `limit`, each handed to `each`.
/// Returns the highest id seen (or `after`) and the number of lines.
pub fn lines(
    db: &Db,
    f: &LogFilter,
    after: i64,
    upto: i64,
    limit: i64,
    mut each: impl FnMut(LogLine) -> Result<()>,
) -> Result<(i64, usize)> {
    let sql = format!(
        "SELECT c.first_id, s.instance, c.codec, c.first_seq, c.data, c.last_id
         FROM log_chunks c JOIN log_sources s ON s.id = c.src
         WHERE {} ORDER BY c.last_id LIMIT ?7",
        chunk_where(f)
    );
    let (mut max, mut n) = (after, 0usize);
    // Pages follow each other by last_id (chunks hold disjoint id ranges).
    let (mut cursor, mut page) = (after, READ_PAGE_MIN);
    while (n as i64) < limit {
        let rows = db.query(
            &sql,
            args![f.app, f.src, cursor, upto, f.stream, f.since_us, page],
        )?;
        let mut bytes = 0usize;
        for r in &rows {
            if (n as i64) >= limit {
                break;
            }
            let (first_id, instance): (i64, String) = (r.get(0)?, r.get(1)?);
            let data = blob(r, 4)?;
            bytes += data.len();
            cursor = r.get(5)?;
            let mut id = first_id;
            decode_chunk(r.get(2)?, r.get(3)?, data, |l| {
                let this = id;
                id += 1;
                if !line_matches(f, after, upto, this, &l) {
                    return Ok(this <= upto);
                }
                each(LogLine {
                    id: this,
                    instance: instance.clone(),
                    seq: l.seq,
                    stream: l.stream,
                    ts_us: l.ts_us,
                    truncated: l.truncated,
                    dropped: l.dropped,
                    data: l.data.to_vec(),
                })?;
                max = max.max(this);
                n += 1;
                Ok((n as i64) < limit)
            })?;
        }
        if (rows.len() as i64) < page {
            break;
        }
        page = next_page(rows.len(), bytes);
    }
    Ok((max, n))
}

/// Where reading must start (exclusive) to show only the last `n` matching lines up to `upto`.
pub fn tail_start(db: &Db, f: &LogFilter, after: i64, upto: i64, n: i64) -> Result<i64> {
    if n <= 0 {
        return Ok(upto);
    }
    let sql = format!(
        "SELECT c.first_id, c.codec, c.first_seq, c.data FROM log_chunks c
         WHERE {} ORDER BY c.last_id DESC LIMIT ?7",
        chunk_where(f)
    );
    let mut left = n;
    let mut ids = Vec::new();
    // Pages follow each other downwards by first_id (chunks hold disjoint id ranges).
    let (mut cursor, mut page) = (upto, READ_PAGE_MIN);
    loop {
        let rows = db.query(
            &sql,
            args![f.app, f.src, after, cursor, f.stream, f.since_us, page],
        )?;
        let mut bytes = 0usize;
        for r in &rows {
            let first_id: i64 = r.get(0)?;
            let data = blob(r, 3)?;
            bytes += data.len();
            cursor = first_id - 1;
            ids.clear();
            let mut id = first_id;
            decode_chunk(r.get(1)?, r.get(2)?, data, |l| {
                if line_matches(f, after, upto, id, &l) {
                    ids.push(id);
                }
                id += 1;
                Ok(true)
            })?;
            // This chunk's matching lines, newest first.
            for &id in ids.iter().rev() {
                left -= 1;
                if left == 0 {
                    return Ok(id - 1);
                }
            }
        }
        if (rows.len() as i64) < page {
            return Ok(after);
        }
        page = next_page(rows.len(), bytes);
    }
}

/// Reading starts after this id: below the first chunk holding a line at or after `since`
/// (lines after it that are older — late arrivals — are still filtered by time), else after
/// everything stored.
pub fn start_id(db: &Db, f: &LogFilter) -> Result<i64> {
    let Some(since) = f.since_us else {
        return Ok(0);
    };
    // `first_id + 0`: the time index, as SQLite does; PostgreSQL would otherwise walk the
    // primary key from the oldest chunk, through nearly all of them for a recent `since`.
    db.query_one(
        "SELECT COALESCE(
             (SELECT MIN(first_id + 0) FROM log_chunks WHERE app = ?1 AND max_ts_us >= ?2) - 1,
             (SELECT last_id FROM log_chunks ORDER BY first_id DESC LIMIT 1),
             0)",
        args![f.app, since],
    )?
    .get(0)
}

/// The instances (rows or log sources) of `app` whose hex id starts with `prefix` (lowercase
/// hex, checked by the caller).
pub fn find_instance(db: &Db, app: &str, prefix: &str) -> Result<InstanceMatch> {
    let ids: Vec<String> = db
        .query(
            "SELECT id FROM instances WHERE app = ?1 AND id LIKE ?2 || '%'
             UNION SELECT instance FROM log_sources WHERE app = ?1 AND instance LIKE ?2 || '%'
             LIMIT 10",
            args![app, prefix],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect::<Result<_>>()?;
    Ok(match ids.as_slice() {
        [] => InstanceMatch::None,
        [one] => {
            // An instance with no logs yet: -1 matches no row; a follower looks again.
            let src = source_id(db, one)?;
            InstanceMatch::One(src.unwrap_or(-1), one.clone())
        }
        _ => InstanceMatch::Many(ids),
    })
}

/// Retention, usage and the newest sources of an app.
pub fn stats(db: &Db, app: &str) -> Result<LogStats> {
    let retention = retention(db, app)?;
    let usage: (i64, i64) = match db.query_opt(
        "SELECT lines, bytes FROM log_usage WHERE app = ?1",
        args![app],
    )? {
        Some(r) => (r.get(0)?, r.get(1)?),
        None => (0, 0),
    };
    let instances = db
        .query(
            "SELECT instance, next_seq, lost, reported_dropped FROM log_sources WHERE app = ?1
             ORDER BY id DESC LIMIT 1000",
            args![app],
        )?
        .iter()
        .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .collect::<Result<_>>()?;
    Ok(LogStats {
        retention,
        usage,
        instances,
    })
}

#[cfg(test)]
mod tests {
    //! Every statement above, on SQLite and, when `WAYPOST_TEST_DATABASE` names a PostgreSQL
    //! cluster (`postgres://postgres@HOST:PORT`), on a fresh database of it.

    use super::*;
    use crate::server::store::{self, Store};

    /// A migrated database of its own: a SQLite file in a temp dir, or a PostgreSQL database
    /// dropped afterwards.
    struct TestDb {
        location: Location,
        _dir: Option<tempfile::TempDir>,
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            if let Location::Postgres(url) = &self.location
                && let Err(e) = waypost_testkit::pg::drop_database_at(url)
            {
                eprintln!("{e}");
            }
        }
    }

    impl TestDb {
        fn sqlite() -> TestDb {
            let dir = tempfile::tempdir().unwrap();
            let location = Location::Sqlite(dir.path().join("t.db"));
            TestDb::migrated(location, Some(dir))
        }

        /// None (and a note) without `WAYPOST_TEST_DATABASE`.
        fn postgres() -> Option<TestDb> {
            let Ok(base) = std::env::var("WAYPOST_TEST_DATABASE") else {
                println!("skipped: WAYPOST_TEST_DATABASE unset");
                return None;
            };
            let url = waypost_testkit::pg::create_database_at(&base);
            Some(TestDb::migrated(Location::Postgres(url), None))
        }

        fn migrated(location: Location, dir: Option<tempfile::TempDir>) -> TestDb {
            let st = Store::open(&location).unwrap();
            st.with(|db| {
                store::create_app(db, "web", 0)?;
                store::create_app(db, "api", 0)
            })
            .unwrap();
            TestDb {
                location,
                _dir: dir,
            }
        }

        fn connect(&self) -> Db {
            connect_writer(&self.location).unwrap()
        }
    }

    /// A chunk of lines `texts` from sequence `seq`, at `ts_us` each.
    fn chunk(seq: i64, stream: i64, ts_us: i64, texts: &[&str]) -> ChunkBuilder {
        let mut c = ChunkBuilder::default();
        for (i, t) in texts.iter().enumerate() {
            c.push(&NewLine {
                seq: seq + i as i64,
                stream,
                ts_us,
                truncated: false,
                dropped: 0,
                data: t.as_bytes(),
            });
        }
        c
    }

    fn filter(src: Option<i64>, stream: Option<i64>, since_us: Option<i64>) -> LogFilter {
        LogFilter {
            app: "web".into(),
            src,
            stream,
            since_us,
        }
    }

    /// (id, instance's first two hex digits, text) of every line `f` selects.
    fn read(db: &Db, f: &LogFilter, after: i64, limit: i64) -> Vec<(i64, String, String)> {
        let mut out = Vec::new();
        lines(db, f, after, i64::MAX, limit, |l| {
            let data = String::from_utf8(l.data).unwrap();
            out.push((l.id, l.instance[..2].to_string(), data));
            Ok(())
        })
        .unwrap();
        out
    }

    fn round_trip(t: &TestDb) {
        let db = t.connect();
        let (a, b) = ("aa".repeat(16), "bb".repeat(16));
        assert_eq!(max_line_id(&db).unwrap(), 0);

        // Retention.
        assert_eq!(retention(&db, "web").unwrap(), Retention::default());
        let r = Retention {
            max_lines: Some(100),
            max_bytes: None,
        };
        set_retention(&db, "web", r).unwrap();
        set_retention(&db, "web", r).unwrap();
        assert_eq!(retention(&db, "web").unwrap(), r);
        assert_eq!(retentions(&db).unwrap(), HashMap::from([("web".into(), r)]));

        // A write: two sources created, three chunks, accounting.
        let ((sa, sb), ids) = write(&db, 1, |tx| {
            let sa = tx.source(&a, "web")?;
            let sb = tx.source(&b, "web")?;
            assert_eq!(
                tx.source(&a, "other")?.rowid,
                sa.rowid,
                "found, not created"
            );
            assert_eq!(sa.next_seq, 0);
            tx.insert_chunk("web", sa.rowid, &chunk(0, 0, 1_000, &["a0", "a1", "a2"]))?;
            tx.insert_chunk("web", sb.rowid, &chunk(0, 1, 2_000, &["b0"]))?;
            tx.insert_chunk("web", sa.rowid, &chunk(3, 0, 3_000, &["a3"]))?;
            let mut s = sa.clone();
            (s.next_seq, s.lost, s.reported) = (4, 1, 2);
            tx.update_source(&s)?;
            tx.add_usage("web", Usage { lines: 3, bytes: 6 })?;
            tx.add_usage("web", Usage { lines: 2, bytes: 4 })?;
            Ok((sa, sb))
        })
        .unwrap();
        assert_eq!(ids, 1..6);
        assert_eq!(max_line_id(&db).unwrap(), 5);
        // The source exists: creating it again gives no row (another writer's turn).
        assert!(
            db.query_opt(CREATE_SOURCE, args![a, "web"])
                .unwrap()
                .is_none()
        );
        assert_eq!(next_seq(&db, &a).unwrap(), Some(4));
        assert_eq!(next_seq(&db, "cc").unwrap(), None);
        assert_eq!(source_id(&db, &b).unwrap(), Some(sb.rowid));
        assert_eq!(source_id(&db, "cc").unwrap(), None);
        assert_eq!(
            usage(&db).unwrap(),
            HashMap::from([(
                "web".into(),
                Usage {
                    lines: 5,
                    bytes: 10
                }
            )])
        );

        // A writer's own count behind the table (another writer stored since): after the table.
        let ((), ids) = write(&db, 1, |tx| {
            tx.insert_chunk("web", sb.rowid, &chunk(1, 1, 4_000, &["b1"]))
        })
        .unwrap();
        assert_eq!(ids, 6..7);
        // Ahead of it (everything pruned): its own count, ids are never reused.
        let ((), ids) = write(&db, 100, |_| Ok(())).unwrap();
        assert_eq!(ids, 100..100);
        // A failed write stores nothing.
        let failed: Result<((), _)> = write(&db, 1, |tx| {
            tx.insert_chunk("web", sb.rowid, &chunk(2, 1, 5_000, &["never"]))?;
            bail!("changed my mind")
        });
        assert!(failed.is_err());
        assert_eq!(max_line_id(&db).unwrap(), 6);

        // Sources in bulk: more than one query's worth, most of them unknown.
        let mut names: Vec<String> = (0..70).map(|i| format!("{i:032x}")).collect();
        names.insert(0, b.clone());
        names.push(a.clone());
        let (got, _) = write(&db, 0, |tx| tx.sources(&names)).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[&a].rowid, got[&a].next_seq, got[&a].lost),
            (sa.rowid, 4, 1)
        );
        assert_eq!((got[&a].reported, got[&a].app.as_str()), (2, "web"));
        assert_eq!(got[&b].rowid, sb.rowid);
        let (got, _) = write(&db, 0, |tx| tx.sources(&[])).unwrap();
        assert!(got.is_empty());
        // Accounting of many sources in one transaction (written many rows a statement), seen
        // by the reads of the same transaction and after it.
        write(&db, 0, |tx| {
            for (i, n) in names[1..71].iter().enumerate() {
                let mut s = tx.source(n, "api")?;
                (s.next_seq, s.lost, s.reported) = (i as u64, 2 * i as u64, 7);
                tx.update_source(&s)?;
            }
            assert_eq!(tx.source(&names[69], "api")?.next_seq, 68);
            assert_eq!(tx.sources(&names[70..71])?[&names[70]].lost, 138);
            Ok(())
        })
        .unwrap();
        let (got, _) = write(&db, 0, |tx| tx.sources(&names)).unwrap();
        assert_eq!(got.len(), 72);
        for (i, n) in names[1..71].iter().enumerate() {
            let s = &got[n];
            assert_eq!(
                (s.next_seq, s.lost, s.reported),
                (i as u64, 2 * i as u64, 7),
                "{n}"
            );
        }
        assert_eq!(
            (got[&a].next_seq, got[&b].next_seq),
            (4, 0),
            "others unchanged"
        );

        // Reading: everything, one instance, one stream, since a time, from an id, a limit.
        let all = |v: &[(i64, &str, &str)]| -> Vec<(i64, String, String)> {
            v.iter()
                .map(|(i, s, t)| (*i, s.to_string(), t.to_string()))
                .collect()
        };
        let f = filter(None, None, None);
        assert_eq!(
            read(&db, &f, 0, 100),
            all(&[
                (1, "aa", "a0"),
                (2, "aa", "a1"),
                (3, "aa", "a2"),
                (4, "bb", "b0"),
                (5, "aa", "a3"),
                (6, "bb", "b1")
            ])
        );
        let ids_of = |v: Vec<(i64, String, String)>| v.iter().map(|r| r.0).collect::<Vec<_>>();
        assert_eq!(
            ids_of(read(&db, &filter(Some(sb.rowid), None, None), 0, 100)),
            [4, 6]
        );
        assert_eq!(
            ids_of(read(&db, &filter(None, Some(1), None), 0, 100)),
            [4, 6]
        );
        assert_eq!(
            ids_of(read(&db, &filter(None, Some(2), None), 0, 100)),
            [0i64; 0]
        );
        assert_eq!(
            ids_of(read(&db, &filter(None, None, Some(3_000)), 0, 100)),
            [5, 6]
        );
        assert_eq!(ids_of(read(&db, &f, 2, 100)), [3, 4, 5, 6]);
        assert_eq!(lines(&db, &f, 0, 4, 2, |_| Ok(())).unwrap(), (2, 2));
        assert_eq!(lines(&db, &f, 0, 4, 100, |_| Ok(())).unwrap(), (4, 4));
        assert_eq!(lines(&db, &f, 6, 100, 100, |_| Ok(())).unwrap(), (6, 0));
        assert_eq!(tail_start(&db, &f, 0, i64::MAX, 2).unwrap(), 4);
        assert_eq!(tail_start(&db, &f, 0, 4, 2).unwrap(), 2);
        assert_eq!(tail_start(&db, &f, 0, i64::MAX, 100).unwrap(), 0);
        let f_b = filter(Some(sb.rowid), None, None);
        assert_eq!(tail_start(&db, &f_b, 0, i64::MAX, 1).unwrap(), 5);
        assert_eq!(start_id(&db, &f).unwrap(), 0, "no --since");
        assert_eq!(start_id(&db, &filter(None, None, Some(2_500))).unwrap(), 4);
        assert_eq!(start_id(&db, &filter(None, None, Some(9_999))).unwrap(), 6);

        // Instances by prefix (log sources; no instance rows here).
        assert_eq!(
            find_instance(&db, "web", "aa").unwrap(),
            InstanceMatch::One(sa.rowid, a.clone())
        );
        assert_eq!(find_instance(&db, "web", "c").unwrap(), InstanceMatch::None);
        assert_eq!(
            find_instance(&db, "api", "aa").unwrap(),
            InstanceMatch::None
        );
        let InstanceMatch::Many(mut both) = find_instance(&db, "web", "").unwrap() else {
            panic!("two match")
        };
        both.sort();
        assert_eq!(both, [a.clone(), b.clone()]);

        let st = stats(&db, "web").unwrap();
        assert_eq!((st.retention, st.usage), (r, (5, 10)));
        assert_eq!(st.instances, [(b.clone(), 0, 0, 0), (a.clone(), 4, 1, 2)]);
        assert_eq!(stats(&db, "api").unwrap().usage, (0, 0));

        // Pruning: the oldest chunk, and the first line of the next one (b0 alone: gone).
        let mut seen = Vec::new();
        oldest_chunks(&db, "web", 10, |c| {
            seen.push((c.first_id, c.last_id, c.lines, c.bytes));
            true
        })
        .unwrap();
        assert_eq!(
            seen,
            [(1, 3, 3, 6), (4, 4, 1, 2), (5, 5, 1, 2), (6, 6, 1, 2)]
        );
        let mut texts = Vec::new();
        chunk_lines(&db, 1, |id, l| texts.push((id, l.data.to_vec()))).unwrap();
        assert_eq!(
            texts,
            [
                (1, b"a0".to_vec()),
                (2, b"a1".to_vec()),
                (3, b"a2".to_vec())
            ]
        );
        // The first chunk trimmed by two lines: a2 keeps its id.
        let left = prune(&db, "web", None, Some((1, 2))).unwrap();
        assert_eq!(
            left,
            Usage { lines: 3, bytes: 6 },
            "10 bytes counted, 4 deleted"
        );
        assert_eq!(ids_of(read(&db, &f, 0, 100)), [3, 4, 5, 6]);
        // Then up to b0, and the same again (as a replica pruning the same app would): the
        // second deletes nothing and takes nothing off.
        let left = prune(&db, "web", Some(4), Some((5, 1))).unwrap();
        assert_eq!(left, Usage { lines: 0, bytes: 0 }, "never below zero");
        let again = prune(&db, "web", Some(4), Some((5, 1))).unwrap();
        assert_eq!(again, left);
        assert_eq!(ids_of(read(&db, &f, 0, 100)), [6]);
        assert_eq!(
            recount_usage(&db, "web").unwrap(),
            Usage { lines: 1, bytes: 2 }
        );
        assert_eq!(recount_usage(&db, "api").unwrap(), Usage::default());
        assert_eq!(usage(&db).unwrap()["web"], Usage { lines: 1, bytes: 2 });
        assert_eq!(max_line_id(&db).unwrap(), 6);

        // Reads that take several pages: 40 chunks of one line.
        let ((), ids) = write(&db, 0, |tx| {
            for i in 0..40 {
                let t = format!("p{i}");
                tx.insert_chunk("web", sa.rowid, &chunk(4 + i, 0, 10_000, &[&t]))?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(ids, 7..47);
        let got = read(&db, &f, 0, 1000);
        assert_eq!(ids_of(got.clone()), (6..47).collect::<Vec<_>>());
        assert_eq!(got[40].2, "p39");
        assert_eq!(
            lines(&db, &f, 0, i64::MAX, 25, |_| Ok(())).unwrap(),
            (30, 25)
        );
        assert_eq!(tail_start(&db, &f, 0, i64::MAX, 30).unwrap(), 16);
        assert_eq!(tail_start(&db, &f, 0, 40, 30).unwrap(), 10);
        assert_eq!(tail_start(&db, &f_b, 0, i64::MAX, 2).unwrap(), 0);

        // Rows of the build before chunks become chunks with their ids (and ids continue).
        for (id, src, seq) in [
            (60i64, sa.rowid, 50i64),
            (61, sa.rowid, 51),
            (62, sb.rowid, 9),
        ] {
            db.execute(
                "INSERT INTO log_lines (id, app, src, seq, stream, ts_us, truncated, dropped, data)
                 VALUES (?1, 'web', ?2, ?3, 0, 20000, 1, 0, ?4)",
                args![id, src, seq, format!("old{id}").into_bytes()],
            )
            .unwrap();
        }
        assert_eq!(max_line_id(&db).unwrap(), 62);
        assert_eq!(convert_line_rows(&db).unwrap(), 3);
        assert_eq!(convert_line_rows(&db).unwrap(), 0);
        assert_eq!(max_line_id(&db).unwrap(), 62);
        let mut old = Vec::new();
        lines(&db, &f, 46, i64::MAX, 100, |l| {
            old.push((l.id, l.seq, l.truncated, String::from_utf8(l.data).unwrap()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            old,
            [
                (60, 50, true, "old60".into()),
                (61, 51, true, "old61".into()),
                (62, 9, true, "old62".into())
            ]
        );
    }

    /// Writers on connections of their own, at once (replicas on PostgreSQL): every id once,
    /// each writer's ids growing, one source per instance whoever creates it.
    fn writers_take_turns(t: &TestDb) {
        const WRITERS: i64 = 3;
        const WRITES: i64 = 30;
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let location = t.location.clone();
                std::thread::spawn(move || {
                    let db = connect_writer(&location).unwrap();
                    let (own, shared) = (format!("{w:032x}"), "ee".repeat(16));
                    let mut next = 1; // behind the others' on purpose
                    let mut mine = Vec::new();
                    for i in 0..WRITES {
                        let (src, ids) = write(&db, next, |tx| {
                            let s = tx.source(if i % 2 == 0 { &own } else { &shared }, "web")?;
                            let text = format!("w{w} {i}");
                            tx.insert_chunk("web", s.rowid, &chunk(i, 0, 1, &[&text, &text]))?;
                            Ok(s.rowid)
                        })
                        .unwrap();
                        assert_eq!(ids.end - ids.start, 2);
                        mine.push((ids.start, src, i % 2 == 1));
                        next = ids.end;
                    }
                    mine
                })
            })
            .collect();
        let mut starts = Vec::new();
        let mut shared_src = Vec::new();
        for th in threads {
            let mine = th.join().unwrap();
            assert!(mine.windows(2).all(|p| p[0].0 < p[1].0), "{mine:?}");
            starts.extend(mine.iter().map(|m| m.0));
            shared_src.extend(mine.iter().filter(|m| m.2).map(|m| m.1));
        }
        starts.sort();
        assert_eq!(
            starts,
            (0..WRITERS * WRITES).map(|i| 1 + 2 * i).collect::<Vec<_>>()
        );
        shared_src.dedup();
        assert_eq!(shared_src.len(), 1, "one source for the shared instance");
        let db = t.connect();
        let got = read(&db, &filter(None, None, None), 0, i64::MAX);
        assert_eq!(got.len() as i64, 2 * WRITERS * WRITES);
        assert!(got.windows(2).all(|p| p[0].0 + 1 == p[1].0));
    }

    #[test]
    fn statements_round_trip_on_sqlite() {
        round_trip(&TestDb::sqlite());
    }

    #[test]
    fn statements_round_trip_on_postgres() {
        if let Some(t) = TestDb::postgres() {
            round_trip(&t);
        }
    }

    #[test]
    fn writers_take_turns_on_sqlite() {
        writers_take_turns(&TestDb::sqlite());
    }

    #[test]
    fn writers_take_turns_on_postgres() {
        if let Some(t) = TestDb::postgres() {
            writers_take_turns(&t);
        }
    }
}
