//! The log tables (`log_sources`, `log_lines`, `log_settings`, `log_usage`): what the log writer
//! (service/logs.rs) stores and what the logs endpoint reads. The writer's decisions (duplicates,
//! gaps, refusals, when to prune) are made above; here is only how they are written and read.

use super::Db;
use crate::server::model::logs::{
    InstanceMatch, LogFilter, LogLine, LogStats, NewLine, Retention, SourceRow, Usage,
};
use anyhow::Result;
use rusqlite::{Connection, OptionalExtension as _, Statement, params};
use std::collections::HashMap;
use std::path::Path;

/// The log writer's own connection (see [`super::connect`]), with a bigger page cache: the three
/// indexes of log_lines are updated on every insert.
pub fn connect_writer(path: &Path) -> Result<Db> {
    let db = super::connect(path)?;
    db.conn.pragma_update(None, "cache_size", -32_000)?;
    Ok(db)
}

/// Highest row id of `log_lines` (0 when empty).
pub fn max_line_id(db: &Db) -> Result<i64> {
    Ok(db
        .conn
        .query_row("SELECT COALESCE(MAX(id), 0) FROM log_lines", [], |r| {
            r.get(0)
        })?)
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
    /// Prepared once per transaction: a commit inserts thousands of rows.
    insert: Option<Statement<'a>>,
    update_source: Option<Statement<'a>>,
    add_usage: Option<Statement<'a>>,
}

/// Runs `f` in one transaction, committed if it returns Ok (rolled back otherwise).
pub fn write<R>(db: &mut Db, f: impl FnOnce(&mut LogTx<'_>) -> Result<R>) -> Result<R> {
    let tx = db.conn.transaction()?;
    let r = {
        let mut ltx = LogTx {
            conn: &tx,
            insert: None,
            update_source: None,
            add_usage: None,
        };
        f(&mut ltx)?
    };
    tx.commit()?;
    Ok(r)
}

impl<'a> LogTx<'a> {
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

    /// Stores a line; returns its row id.
    pub fn insert_line(&mut self, l: &NewLine<'_>) -> Result<i64> {
        let conn = self.conn;
        let stmt = match &mut self.insert {
            Some(s) => s,
            slot => slot.insert(conn.prepare(
                "INSERT INTO log_lines (app, src, seq, stream, ts_us, truncated, dropped, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?),
        };
        stmt.execute(params![
            l.app,
            l.src,
            l.seq,
            l.stream,
            l.ts_us,
            l.truncated,
            l.dropped,
            l.data
        ])?;
        Ok(conn.last_insert_rowid())
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

/// Walks an app's oldest lines (at most `limit`), oldest first, as (row id, data length), while
/// `take` says so.
pub fn oldest_lines(
    db: &Db,
    app: &str,
    limit: usize,
    mut take: impl FnMut(i64, u64) -> bool,
) -> Result<()> {
    let mut stmt = db
        .conn
        .prepare("SELECT id, length(data) FROM log_lines WHERE app = ?1 ORDER BY id LIMIT ?2")?;
    let mut rows = stmt.query(params![app, limit as i64])?;
    while let Some(r) = rows.next()? {
        if !take(r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64) {
            break;
        }
    }
    Ok(())
}

/// Deletes an app's lines up to row id `cutoff` (if any) and sets its usage to `left`, in one
/// transaction.
pub fn prune(db: &mut Db, app: &str, cutoff: Option<i64>, left: Usage) -> Result<()> {
    let tx = db.conn.transaction()?;
    if let Some(cut) = cutoff {
        tx.execute(
            "DELETE FROM log_lines WHERE app = ?1 AND id <= ?2",
            params![app, cut],
        )?;
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

fn where_clause(f: &LogFilter) -> String {
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

/// Matching rows with `after < id <= upto`, ascending, at most `limit`, each handed to `each`.
/// Returns the highest id seen (or `after`) and the number of rows.
pub fn lines(
    db: &Db,
    f: &LogFilter,
    after: i64,
    upto: i64,
    limit: i64,
    mut each: impl FnMut(LogLine) -> Result<()>,
) -> Result<(i64, usize)> {
    let sql = format!(
        "SELECT l.id, s.instance, l.seq, l.stream, l.ts_us, l.truncated, l.dropped, l.data
         FROM log_lines l JOIN log_sources s ON s.id = l.src
         WHERE {} ORDER BY l.id LIMIT ?7",
        where_clause(f)
    );
    let mut stmt = db.conn.prepare(&sql)?;
    let mut rows = stmt.query(params![
        f.app, f.src, after, upto, f.stream, f.since_us, limit
    ])?;
    let (mut max, mut n) = (after, 0);
    while let Some(r) = rows.next()? {
        let line = LogLine {
            id: r.get(0)?,
            instance: r.get(1)?,
            seq: r.get(2)?,
            stream: r.get(3)?,
            ts_us: r.get(4)?,
            truncated: r.get(5)?,
            dropped: r.get(6)?,
            data: r.get(7)?,
        };
        max = max.max(line.id);
        n += 1;
        each(line)?;
    }
    Ok((max, n))
}

/// Where reading must start (exclusive) to show only the last `n` matching rows up to `upto`.
pub fn tail_start(db: &Db, f: &LogFilter, after: i64, upto: i64, n: i64) -> Result<i64> {
    if n <= 0 {
        return Ok(upto);
    }
    let sql = format!(
        "SELECT l.id FROM log_lines l WHERE {} ORDER BY l.id DESC LIMIT 1 OFFSET ?7",
        where_clause(f)
    );
    let id: Option<i64> = db
        .conn
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
pub fn start_id(db: &Db, f: &LogFilter) -> Result<i64> {
    let Some(since) = f.since_us else {
        return Ok(0);
    };
    Ok(db.conn.query_row(
        "SELECT COALESCE((SELECT MIN(id) FROM log_lines WHERE app = ?1 AND ts_us >= ?2) - 1,
                         (SELECT COALESCE(MAX(id), 0) FROM log_lines))",
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
