//! The log tables (`log_sources`, `log_chunks`, `log_settings`, `log_usage`): what the log writer
//! (service/logs.rs) stores and what the logs endpoint reads. The writer's decisions (duplicates,
//! gaps, refusals, when to prune) are made above; here is only how they are written and read.
//!
//! Lines are stored in chunks: one row holds consecutive lines (ids first_id..last_id) of one
//! instance, encoded by [`ChunkBuilder`] (model/logs.rs). Reads select the chunks that can hold
//! matching lines (by app, instance, id range, stream bits, newest timestamp) and filter their
//! decoded lines. The SQL is plain (no SQLite-only constructs beyond INTEGER PRIMARY KEY), so
//! another backend can run the same statements.
//! `log_lines` (one row per line, before chunks) is only read once: [`convert_line_rows`].

use super::Db;
use crate::server::model::logs::{
    ChunkBuilder, InstanceMatch, LogFilter, LogLine, LogStats, NewLine, Retention, STREAMS_MARKER,
    SourceRow, Usage, decode_chunk,
};
use anyhow::Result;
use rusqlite::{Connection, OptionalExtension as _, Statement, params};
use std::collections::HashMap;
use std::path::Path;

/// The log writer's own connection (see [`super::connect`]), with a bigger page cache: the
/// indexes of log_chunks are updated on every insert.
pub fn connect_writer(path: &Path) -> Result<Db> {
    let db = super::connect(path)?;
    db.conn.pragma_update(None, "cache_size", -32_000)?;
    Ok(db)
}

/// Highest line id stored (0 when none): ids are never reused.
pub fn max_line_id(db: &Db) -> Result<i64> {
    Ok(db.conn.query_row(
        "SELECT MAX((SELECT COALESCE(MAX(last_id), 0) FROM log_chunks),
                    (SELECT COALESCE(MAX(id), 0) FROM log_lines))",
        [],
        |r| r.get(0),
    )?)
}

/// Rows of `log_lines` converted per transaction by [`convert_line_rows`].
const CONVERT_ROWS: i64 = 50_000;

/// Moves the rows a build before chunks stored in `log_lines` into chunks (each run of rows of
/// one instance with consecutive ids becomes one chunk, so every line keeps its id, sequence
/// number, stream, time, flags and data), a transaction per [`CONVERT_ROWS`]. Returns the number
/// of rows moved; 0 at once when there are none (every start after the first).
pub fn convert_line_rows(db: &mut Db) -> Result<u64> {
    let mut moved = 0u64;
    loop {
        let tx = db.conn.transaction()?;
        let n = {
            let mut sel = tx.prepare(
                "SELECT id, app, src, seq, stream, ts_us, truncated, dropped, data
                 FROM log_lines ORDER BY id LIMIT ?1",
            )?;
            let mut rows = sel.query([CONVERT_ROWS])?;
            let mut run: Option<(i64, i64, String, i64, ChunkBuilder)> = None;
            let (mut n, mut last) = (0i64, 0i64);
            let mut ltx = LogTx::new(&tx);
            while let Some(r) = rows.next()? {
                let (id, app, src): (i64, String, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
                let data: Vec<u8> = r.get(8)?;
                let line = NewLine {
                    seq: r.get(3)?,
                    stream: r.get(4)?,
                    ts_us: r.get(5)?,
                    truncated: r.get(6)?,
                    dropped: r.get(7)?,
                    data: &data,
                };
                let continues = matches!(&run, Some((first, s, a, next, _))
                    if *s == src && *a == app && *next == id && id - first < 8192);
                if !continues && let Some((first, s, a, _, c)) = run.take() {
                    ltx.insert_chunk(&a, s, first, &c)?;
                }
                let (_, _, _, next, c) =
                    run.get_or_insert_with(|| (id, src, app, id, ChunkBuilder::default()));
                c.push(&line);
                *next = id + 1;
                n += 1;
                last = id;
            }
            if let Some((first, s, a, _, c)) = run.take() {
                ltx.insert_chunk(&a, s, first, &c)?;
            }
            drop(ltx);
            if n > 0 {
                tx.execute("DELETE FROM log_lines WHERE id <= ?1", [last])?;
            }
            n
        };
        tx.commit()?;
        moved += n as u64;
        if n < CONVERT_ROWS {
            return Ok(moved);
        }
    }
}

/// Usage per app, as counted.
pub fn usage(db: &Db) -> Result<HashMap<String, Usage>> {
    let mut out = HashMap::new();
    let mut stmt = db.conn.prepare("SELECT app, lines, bytes FROM log_usage")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (app, lines, bytes) = row?;
        out.insert(
            app,
            Usage {
                lines: lines.max(0) as u64,
                bytes: bytes.max(0) as u64,
            },
        );
    }
    Ok(out)
}

/// Retention of every app that has one set.
pub fn retentions(db: &Db) -> Result<HashMap<String, Retention>> {
    let mut out = HashMap::new();
    let mut stmt = db
        .conn
        .prepare("SELECT app, max_lines, max_bytes FROM log_settings")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?,
            r.get::<_, Option<i64>>(2)?,
        ))
    })?;
    for row in rows {
        let (app, l, b) = row?;
        out.insert(
            app,
            Retention {
                max_lines: l.map(|v| v as u64),
                max_bytes: b.map(|v| v as u64),
            },
        );
    }
    Ok(out)
}

/// Retention of one app (both None when never set).
pub fn retention(db: &Db, app: &str) -> Result<Retention> {
    Ok(db
        .conn
        .query_row(
            "SELECT max_lines, max_bytes FROM log_settings WHERE app = ?1",
            [app],
            |r| {
                Ok(Retention {
                    max_lines: r.get::<_, Option<i64>>(0)?.map(|v| v as u64),
                    max_bytes: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}

pub fn set_retention(db: &Db, app: &str, r: Retention) -> Result<()> {
    db.conn.execute(
        "INSERT INTO log_settings (app, max_lines, max_bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (app) DO UPDATE SET max_lines = excluded.max_lines,
             max_bytes = excluded.max_bytes",
        params![
            app,
            r.max_lines.map(|v| v as i64),
            r.max_bytes.map(|v| v as i64)
        ],
    )?;
    Ok(())
}

/// H of an instance (`next_seq` of its source), if it has logged.
pub fn next_seq(db: &Db, instance_hex: &str) -> Result<Option<u64>> {
    let v: Option<i64> = db
        .conn
        .query_row(
            "SELECT next_seq FROM log_sources WHERE instance = ?1",
            [instance_hex],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.map(|v| v as u64))
}

/// The source row id of an instance, if it has logged.
pub fn source_id(db: &Db, instance_hex: &str) -> Result<Option<i64>> {
    Ok(db
        .conn
        .query_row(
            "SELECT id FROM log_sources WHERE instance = ?1",
            [instance_hex],
            |r| r.get(0),
        )
        .optional()?)
}

// ---- writing -----------------------------------------------------------------------------------

/// One write transaction of the log writer (see [`write`]).
pub struct LogTx<'a> {
    conn: &'a Connection,
    /// Prepared once per transaction: a commit inserts many rows.
    insert: Option<Statement<'a>>,
    update_source: Option<Statement<'a>>,
    add_usage: Option<Statement<'a>>,
}

/// Runs `f` in one transaction, committed if it returns Ok (rolled back otherwise).
pub fn write<R>(db: &mut Db, f: impl FnOnce(&mut LogTx<'_>) -> Result<R>) -> Result<R> {
    let tx = db.conn.transaction()?;
    let r = f(&mut LogTx::new(&tx))?;
    tx.commit()?;
    Ok(r)
}

impl<'a> LogTx<'a> {
    fn new(conn: &'a Connection) -> LogTx<'a> {
        LogTx {
            conn,
            insert: None,
            update_source: None,
            add_usage: None,
        }
    }

    /// The source of an instance; created (for `app`) if it has none yet.
    pub fn source(&mut self, instance_hex: &str, app: &str) -> Result<SourceRow> {
        let row: Option<(i64, i64, i64, i64, String)> = self
            .conn
            .query_row(
                "SELECT id, next_seq, lost, reported_dropped, app FROM log_sources WHERE instance = ?1",
                [instance_hex],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        Ok(match row {
            Some((rowid, next, lost, reported, app)) => SourceRow {
                rowid,
                app,
                next_seq: next as u64,
                lost: lost as u64,
                reported: reported as u64,
            },
            None => {
                self.conn.execute(
                    "INSERT INTO log_sources (instance, app) VALUES (?1, ?2)",
                    params![instance_hex, app],
                )?;
                SourceRow {
                    rowid: self.conn.last_insert_rowid(),
                    app: app.to_string(),
                    next_seq: 0,
                    lost: 0,
                    reported: 0,
                }
            }
        })
    }

    /// Stores a chunk of `src`'s lines with the ids `first_id..first_id + c.lines`.
    pub fn insert_chunk(
        &mut self,
        app: &str,
        src: i64,
        first_id: i64,
        c: &ChunkBuilder,
    ) -> Result<()> {
        insert_chunk(self.conn, &mut self.insert, app, src, first_id, c)
    }

    /// Writes a source's accounting back.
    pub fn update_source(&mut self, s: &SourceRow) -> Result<()> {
        let conn = self.conn;
        let stmt = match &mut self.update_source {
            Some(s) => s,
            slot => slot.insert(
                conn.prepare("UPDATE log_sources SET next_seq = ?2, lost = ?3, reported_dropped = ?4 WHERE id = ?1")?,
            ),
        };
        stmt.execute(params![
            s.rowid,
            s.next_seq as i64,
            s.lost as i64,
            s.reported as i64
        ])?;
        Ok(())
    }

    /// Adds to an app's usage counters.
    pub fn add_usage(&mut self, app: &str, d: Usage) -> Result<()> {
        let conn = self.conn;
        let stmt = match &mut self.add_usage {
            Some(s) => s,
            slot => slot.insert(conn.prepare(
                "INSERT INTO log_usage (app, lines, bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (app) DO UPDATE SET lines = lines + excluded.lines,
                     bytes = bytes + excluded.bytes",
            )?),
        };
        stmt.execute(params![app, d.lines as i64, d.bytes as i64])?;
        Ok(())
    }
}

fn insert_chunk<'a>(
    conn: &'a Connection,
    slot: &mut Option<Statement<'a>>,
    app: &str,
    src: i64,
    first_id: i64,
    c: &ChunkBuilder,
) -> Result<()> {
    let stmt = match slot {
        Some(s) => s,
        slot => slot.insert(conn.prepare(
            "INSERT INTO log_chunks (first_id, last_id, app, src, first_seq, last_seq, min_ts_us,
                 max_ts_us, lines, bytes, streams, codec, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?),
    };
    let (codec, blob) = c.encoded();
    stmt.execute(params![
        first_id,
        first_id + c.lines - 1,
        app,
        src,
        c.first_seq,
        c.last_seq,
        c.min_ts_us,
        c.max_ts_us,
        c.lines,
        c.bytes,
        c.streams,
        codec,
        &blob[..]
    ])?;
    Ok(())
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
    let mut stmt = db.conn.prepare(
        "SELECT first_id, last_id, lines, bytes FROM log_chunks WHERE app = ?1
         ORDER BY last_id LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![app, limit as i64])?;
    while let Some(r) = rows.next()? {
        let m = ChunkMeta {
            first_id: r.get(0)?,
            last_id: r.get(1)?,
            lines: r.get::<_, i64>(2)?.max(0) as u64,
            bytes: r.get::<_, i64>(3)?.max(0) as u64,
        };
        if !take(m) {
            break;
        }
    }
    Ok(())
}

/// The lines of the chunk that starts at `first_id`, with their ids.
pub fn chunk_lines(db: &Db, first_id: i64, mut each: impl FnMut(i64, NewLine<'_>)) -> Result<()> {
    let (codec, first_seq, data): (i64, i64, Vec<u8>) = db.conn.query_row(
        "SELECT codec, first_seq, data FROM log_chunks WHERE first_id = ?1",
        [first_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let mut id = first_id;
    decode_chunk(codec, first_seq, &data, |l| {
        each(id, l);
        id += 1;
        Ok(true)
    })
}

/// Deletes an app's chunks up to `cutoff` (a last_id), drops the first `trim.1` lines of the
/// chunk starting at `trim.0` (the oldest one left), and sets the app's usage to `left`, in one
/// transaction.
pub fn prune(
    db: &mut Db,
    app: &str,
    cutoff: Option<i64>,
    trim: Option<(i64, u64)>,
    left: Usage,
) -> Result<()> {
    let tx = db.conn.transaction()?;
    if let Some(cut) = cutoff {
        tx.execute(
            "DELETE FROM log_chunks WHERE app = ?1 AND last_id <= ?2",
            params![app, cut],
        )?;
    }
    if let Some((first_id, k)) = trim {
        // Re-encoded without its first k lines; the rest keep their ids.
        let (src, codec, first_seq, data): (i64, i64, i64, Vec<u8>) = tx.query_row(
            "SELECT src, codec, first_seq, data FROM log_chunks WHERE first_id = ?1",
            [first_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        let mut c = ChunkBuilder::default();
        let mut i = 0u64;
        decode_chunk(codec, first_seq, &data, |l| {
            if i >= k {
                c.push(&l);
            }
            i += 1;
            Ok(true)
        })?;
        tx.execute("DELETE FROM log_chunks WHERE first_id = ?1", [first_id])?;
        if !c.is_empty() {
            insert_chunk(&tx, &mut None, app, src, first_id + k as i64, &c)?;
        }
    }
    tx.execute(
        "INSERT INTO log_usage (app, lines, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (app) DO UPDATE SET lines = excluded.lines, bytes = excluded.bytes",
        params![app, left.lines as i64, left.bytes as i64],
    )?;
    tx.commit()?;
    Ok(())
}

// ---- reading -------------------------------------------------------------------------------------

/// The chunks that can hold lines of `f` with `after < id <= upto` (by app, instance, id range,
/// the streams they hold, their newest line), as `?1`..`?6` = app, src, after, upto, stream,
/// since.
fn chunk_where(f: &LogFilter) -> String {
    let by_src = if f.src.is_some() {
        " AND c.src = ?2"
    } else {
        ""
    };
    format!(
        "c.app = ?1{by_src} AND c.last_id > ?3 AND c.first_id <= ?4
         AND (?5 IS NULL OR (c.streams & ((1 << ?5) | {STREAMS_MARKER})) <> 0)
         AND (?6 IS NULL OR c.max_ts_us >= ?6)"
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
        "SELECT c.first_id, s.instance, c.codec, c.first_seq, c.data
         FROM log_chunks c JOIN log_sources s ON s.id = c.src
         WHERE {} ORDER BY c.last_id",
        chunk_where(f)
    );
    let mut stmt = db.conn.prepare(&sql)?;
    let mut rows = stmt.query(params![f.app, f.src, after, upto, f.stream, f.since_us])?;
    let (mut max, mut n) = (after, 0usize);
    while (n as i64) < limit
        && let Some(r) = rows.next()?
    {
        let (first_id, instance): (i64, String) = (r.get(0)?, r.get(1)?);
        let (codec, first_seq) = (r.get::<_, i64>(2)?, r.get::<_, i64>(3)?);
        let data = r.get_ref(4)?.as_blob()?;
        let mut id = first_id;
        decode_chunk(codec, first_seq, data, |l| {
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
    Ok((max, n))
}

/// Where reading must start (exclusive) to show only the last `n` matching lines up to `upto`.
pub fn tail_start(db: &Db, f: &LogFilter, after: i64, upto: i64, n: i64) -> Result<i64> {
    if n <= 0 {
        return Ok(upto);
    }
    let sql = format!(
        "SELECT c.first_id, c.codec, c.first_seq, c.data FROM log_chunks c
         WHERE {} ORDER BY c.last_id DESC",
        chunk_where(f)
    );
    let mut stmt = db.conn.prepare(&sql)?;
    let mut rows = stmt.query(params![f.app, f.src, after, upto, f.stream, f.since_us])?;
    let mut left = n;
    let mut ids = Vec::new();
    while let Some(r) = rows.next()? {
        let (first_id, codec, first_seq) = (r.get(0)?, r.get(1)?, r.get(2)?);
        ids.clear();
        let mut id = first_id;
        decode_chunk(codec, first_seq, r.get_ref(3)?.as_blob()?, |l| {
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
    Ok(after)
}

/// Reading starts after this id: below the first chunk holding a line at or after `since`
/// (lines after it that are older — late arrivals — are still filtered by time), else after
/// everything stored.
pub fn start_id(db: &Db, f: &LogFilter) -> Result<i64> {
    let Some(since) = f.since_us else {
        return Ok(0);
    };
    Ok(db.conn.query_row(
        "SELECT COALESCE((SELECT MIN(first_id) FROM log_chunks WHERE app = ?1 AND max_ts_us >= ?2) - 1,
                         (SELECT COALESCE(MAX(last_id), 0) FROM log_chunks))",
        params![f.app, since],
        |r| r.get(0),
    )?)
}

/// The instances (rows or log sources) of `app` whose hex id starts with `prefix` (lowercase
/// hex, checked by the caller).
pub fn find_instance(db: &Db, app: &str, prefix: &str) -> Result<InstanceMatch> {
    let mut stmt = db.conn.prepare(
        "SELECT id FROM instances WHERE app = ?1 AND id LIKE ?2 || '%'
         UNION SELECT instance FROM log_sources WHERE app = ?1 AND instance LIKE ?2 || '%'
         LIMIT 10",
    )?;
    let ids: Vec<String> = stmt
        .query_map(params![app, prefix], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
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
    let usage: (i64, i64) = db
        .conn
        .query_row(
            "SELECT lines, bytes FROM log_usage WHERE app = ?1",
            [app],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, 0));
    let mut stmt = db.conn.prepare(
        "SELECT instance, next_seq, lost, reported_dropped FROM log_sources WHERE app = ?1
         ORDER BY id DESC LIMIT 1000",
    )?;
    let instances = stmt
        .query_map([app], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(LogStats {
        retention,
        usage,
        instances,
    })
}
