//! `GET /v1/apps/{app}/logs` (NDJSON, optionally followed), `GET …/logs/stats` and
//! `PATCH …/logs/retention`. Rows are read through the store with a connection per request;
//! a follower wakes on the log service's commits (see service/logs.rs).

use super::{ApiError, ApiResult, require_app};
use crate::server::model::logs::{
    InstanceMatch, IntakeStall, LogFilter, LogLine, LogStats, Retention, parse_stream, stream_name,
};
use crate::server::service::logs::{DEFAULT_MAX_BYTES, DEFAULT_MAX_LINES};
use crate::server::store::{self, Db};
use crate::server::transport::{Shared, wait_shutdown};
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
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Rows per read query when serving logs.
const PAGE: i64 = 2000;
/// A follower waits at least this long between queries (it batches commits).
const FOLLOW_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// A follower sends an empty line after this much silence (keeps proxies and dead-peer
/// detection working).
const FOLLOW_KEEPALIVE: Duration = Duration::from_secs(15);

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

fn row_json(row: &LogLine) -> RowJson<'_> {
    {
        let marker = row.dropped > 0;
        RowJson {
            ts: fmt_us(row.ts_us),
            instance: &row.instance,
            stream: (!marker).then(|| stream_name(row.stream)),
            text: (!marker).then(|| String::from_utf8_lossy(&row.data)),
            dropped: marker.then_some(row.dropped),
            truncated: (!marker).then_some(row.truncated),
            data_b64: (!marker).then(|| util::base64_encode(&row.data)),
            seq: row.seq,
            ts_us: row.ts_us,
            id: row.id,
        }
    }
}

/// RFC 3339 UTC with microseconds.
pub fn fmt_us(ts_us: i64) -> String {
    let ms = util::fmt_rfc3339(ts_us.div_euclid(1000));
    // "....sss" + "uuu" before the Z.
    format!("{}{:03}Z", &ms[..ms.len() - 1], ts_us.rem_euclid(1000))
}

/// Matching rows with `after < id <= upto`, ascending, at most `limit`, as NDJSON text; the
/// highest id returned (or `after`), and the number of rows.
fn query(
    db: &Db,
    f: &LogFilter,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<(Vec<u8>, i64, usize)> {
    let mut out = Vec::new();
    let (max, n) = store::logs::lines(db, f, after, upto, limit, |row| {
        serde_json::to_writer(&mut out, &row_json(&row))?;
        out.push(b'\n');
        Ok(())
    })?;
    Ok((out, max, n))
}

/// Resolves an instance id prefix among the app's log sources and instances.
fn resolve_instance(db: &Db, app: &str, prefix: &str) -> Result<Result<(i64, String), ApiError>> {
    let p = prefix.to_ascii_lowercase();
    if p.is_empty() || p.len() > 32 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Err(ApiError::bad(format!(
            "invalid instance id {prefix:?}: give its hex id or a unique prefix of it"
        ))));
    }
    Ok(match store::logs::find_instance(db, app, &p)? {
        InstanceMatch::None => Err(ApiError::not_found(format!(
            "no instance of app {app} has an id starting with {p}"
        ))),
        InstanceMatch::One(src, hex) => Ok((src, hex)),
        InstanceMatch::Many(many) => Err(ApiError::bad(format!(
            "instance id prefix {p} is ambiguous in app {app}: {}",
            many.iter()
                .map(|s| s[..12.min(s.len())].to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    })
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

fn parse_since(s: &str) -> Result<i64, ApiError> {
    if let Some(ms) = util::parse_rfc3339(s) {
        return Ok(ms * 1000);
    }
    let d = util::parse_duration(s).map_err(|_| {
        ApiError::bad(format!(
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
) -> ApiResult<Response> {
    let Query(q) = q?;
    require_app(&s, &app).await?;
    let stream = match q.stream.as_deref().filter(|v| !v.is_empty()) {
        Some(v) => Some(parse_stream(v).ok_or_else(|| {
            ApiError::bad(format!(
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
    let conn = Arc::new(Mutex::new(s.logs.reader()?));
    let mut filter = LogFilter {
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
    let mut committed = s.logs.committed();
    // Subscribed before the header is made, so a change after it reaches a follower.
    let mut intake = s.logs.watch_intake();
    let stall = intake.borrow().clone();
    let follow = q.follow;
    let mut shutdown = s.shutdown.clone();
    tokio::spawn(async move {
        // A follower ends with the server (the client sees the end of the stream).
        let res = tokio::select! {
            r = stream_rows(conn, filter, instance_hex, tail, follow, &tx, &mut committed, &mut intake) => r,
            _ = wait_shutdown(&mut shutdown) => Ok(()),
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
    conn: &Arc<Mutex<Db>>,
    filter: &LogFilter,
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
    conn: Arc<Mutex<Db>>,
    mut filter: LogFilter,
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
            let start = store::logs::start_id(&c, &f)?.min(upto);
            match tail {
                Some(n) => store::logs::tail_start(&c, &f, start, upto, n),
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
                    store::logs::source_id(&c.lock().unwrap_or_else(|e| e.into_inner()), &hex)
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

/// `logs stats` of an app, read on a connection of its own.
async fn stats(s: &Arc<Shared>, app: String) -> Result<serde_json::Value> {
    let s = s.clone();
    blocking(move || -> Result<_> {
        let db = s.logs.reader()?;
        Ok(stats_json(&app, &store::logs::stats(&db, &app)?))
    })
    .await?
}

fn stats_json(app: &str, st: &LogStats) -> serde_json::Value {
    let r = st.retention;
    let instances: Vec<serde_json::Value> = st
        .instances
        .iter()
        .map(|(instance, next_seq, lost, reported)| {
            json!({
                "instance": instance,
                "next_seq": next_seq,
                "lost": lost,
                "reported_dropped": reported,
            })
        })
        .collect();
    json!({
        "app": app,
        "retention": {
            "max_lines": r.max_lines.unwrap_or(DEFAULT_MAX_LINES),
            "max_bytes": r.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
            "default_lines": r.max_lines.is_none(),
            "default_bytes": r.max_bytes.is_none(),
        },
        "usage": { "lines": st.usage.0, "bytes": st.usage.1 },
        "instances": instances,
    })
}

async fn get_stats(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    require_app(&s, &app).await?;
    Ok(Json(stats(&s, app).await?))
}

async fn patch_retention(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<RetentionBody>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Json(body) = body?;
    require_app(&s, &app).await?;
    if body.max_lines.is_none() && body.max_bytes.is_none() {
        return Err(ApiError::bad(
            "nothing to change: give max_lines and/or max_bytes",
        ));
    }
    let a = app.clone();
    let r = s
        .store
        .call(move |db| {
            let mut r = store::logs::retention(db, &a)?;
            if let Some(v) = body.max_lines {
                r.max_lines = (v > 0).then_some(v);
            }
            if let Some(v) = body.max_bytes {
                r.max_bytes = (v > 0).then_some(v);
            }
            store::logs::set_retention(db, &a, r)?;
            Ok(r)
        })
        .await?;
    s.logs.retention_changed(&app, r);
    let Retention {
        max_lines: l,
        max_bytes: b,
    } = r;
    tracing::info!(app, max_lines = l, max_bytes = b, "log retention changed");
    Ok(Json(stats(&s, app).await?))
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

    #[test]
    fn timestamps_with_micros() {
        assert_eq!(fmt_us(1_500_000_000_123_456), "2017-07-14T02:40:00.123456Z");
        assert_eq!(fmt_us(0), "1970-01-01T00:00:00.000000Z");
    }
}
