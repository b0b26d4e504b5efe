//! The log model: stored lines, what a reader asks for, per-instance sequence accounting and
//! per-app usage (see "Logs" in docs/architecture.md for how they are kept).

/// Log intake has stalled: storing logs fails (a full disk, an I/O error) and the writer keeps
/// retrying. Set by the writer on the first failure, cleared by the next successful commit;
/// shown by `GET /v1/instances` and the logs endpoint so `instances` and `logs` can say so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntakeStall {
    pub since_ms: i64,
    pub error: String,
}

/// The stored number of a stream back to its name (0 stdout, 1 stderr, 2 entrypoint).
pub fn stream_name(s: i64) -> &'static str {
    match s {
        1 => "stderr",
        2 => "entrypoint",
        _ => "stdout",
    }
}

/// A stream name as `logs --stream` takes it, to its stored number.
pub fn parse_stream(s: &str) -> Option<i64> {
    match s.to_ascii_lowercase().as_str() {
        "stdout" | "out" => Some(0),
        "stderr" | "err" => Some(1),
        "entrypoint" | "ep" => Some(2),
        _ => None,
    }
}

/// Which rows a `logs` request wants.
#[derive(Debug, Clone)]
pub struct LogFilter {
    pub app: String,
    /// The source (instance) row id; -1 matches nothing (an instance with no logs yet).
    pub src: Option<i64>,
    pub stream: Option<i64>,
    pub since_us: Option<i64>,
}

/// One stored row. A marker (lost entries) has `dropped` > 0 and no data.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Arrival order: the order `logs` shows.
    pub id: i64,
    pub instance: String,
    pub seq: i64,
    pub stream: i64,
    pub ts_us: i64,
    pub truncated: bool,
    pub dropped: i64,
    pub data: Vec<u8>,
}

/// A line to store (the writer's side of [`LogLine`]).
#[derive(Debug, Clone, Copy)]
pub struct NewLine<'a> {
    pub app: &'a str,
    /// The source (instance) row id.
    pub src: i64,
    pub seq: i64,
    pub stream: i64,
    pub ts_us: i64,
    pub truncated: bool,
    pub dropped: i64,
    pub data: &'a [u8],
}

/// One instance's sequence accounting ("source"): H = `next_seq`, every entry below it is
/// stored or known lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRow {
    pub rowid: i64,
    /// The app the instance's logs belong to: a batch of any other app is never stored here.
    pub app: String,
    pub next_seq: u64,
    pub lost: u64,
    pub reported: u64,
}

/// Lines and bytes stored for an app.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Usage {
    pub lines: u64,
    pub bytes: u64,
}

/// An app's retention as set (None: the default).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_lines: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// What `logs stats` shows of an app.
#[derive(Clone, Debug)]
pub struct LogStats {
    pub retention: Retention,
    /// (lines, bytes) as counted in the usage table.
    pub usage: (i64, i64),
    /// The newest 1,000 sources: (instance hex, next_seq, lost, reported_dropped).
    pub instances: Vec<(String, i64, i64, i64)>,
}

/// How an instance id prefix given to `logs --instance` resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceMatch {
    /// (source row id, or -1 while it has no logs; the full hex id).
    One(i64, String),
    None,
    /// Some of the matching ids.
    Many(Vec<String>),
}
