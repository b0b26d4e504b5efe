//! The entrypoint's own log lines.
//!
//! Code anywhere calls `info!(...)` and friends; that only formats the message and queues it
//! (bounded). The reactor drains the queue, stamps each record with the time and writes it to
//! stderr without ever blocking (and, with the server, ships it as the `entrypoint` log stream).
//! Lines look like `[waypost] 2026-11-27T18:49:57.123Z INFO child started (pid 12)`.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Severity, ordered from chattiest to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    /// `TRACE` `DEBUG` `INFO` `WARN` (`WARNING`) `ERROR`, any case.
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.trim().to_ascii_uppercase().as_str() {
            "TRACE" => Level::Trace,
            "DEBUG" => Level::Debug,
            "INFO" => Level::Info,
            "WARN" | "WARNING" => Level::Warn,
            "ERROR" => Level::Error,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// One queued line, not yet stamped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub level: Level,
    pub msg: String,
}

/// Own lines are rare (start, reconnects, signals); 256 queued ones mean stderr is stuck, and
/// then dropping (and counting) beats growing.
const QUEUE_CAP: usize = 256;

struct State {
    level: Level,
    queue: VecDeque<Record>,
    dropped: u64,
}

static STATE: Mutex<State> = Mutex::new(State {
    level: Level::Debug,
    queue: VecDeque::new(),
    dropped: 0,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    // A poisoned lock cannot happen with panic=abort; recover anyway rather than lose logging.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn set_level(level: Level) {
    state().level = level;
}

pub fn level() -> Level {
    state().level
}

pub fn enabled(level: Level) -> bool {
    level >= state().level
}

/// Queues a line (use the macros, which skip formatting when the level is off).
pub fn push(level: Level, msg: String) {
    let mut s = state();
    if s.queue.len() >= QUEUE_CAP {
        s.dropped += 1;
        return;
    }
    s.queue.push_back(Record { level, msg });
}

/// Takes every queued record, oldest first. A record telling how many were dropped comes first
/// when the queue overflowed.
pub fn drain(mut f: impl FnMut(Record)) {
    let (records, dropped) = {
        let mut s = state();
        (std::mem::take(&mut s.queue), std::mem::take(&mut s.dropped))
    };
    if dropped > 0 {
        f(Record {
            level: Level::Warn,
            msg: format!("{dropped} entrypoint log lines dropped (stderr was not writable)"),
        });
    }
    records.into_iter().for_each(f);
}

/// Whether anything is queued (so the reactor knows to flush).
pub fn pending() -> bool {
    let s = state();
    !s.queue.is_empty() || s.dropped > 0
}

/// Appends the full stderr line for `rec`, stamped `unix_ms`, to `out`.
pub fn format_line(rec: &Record, unix_ms: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"[waypost] ");
    write_rfc3339(unix_ms, out);
    out.push(b' ');
    out.extend_from_slice(rec.level.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(rec.msg.as_bytes());
    out.push(b'\n');
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC) without a date library: the format of
/// [`waypost_proto::date::Rfc3339`], written here with one `format!` because the shared `Display`
/// costs the binary a few hundred bytes more.
pub fn write_rfc3339(unix_ms: u64, out: &mut Vec<u8>) {
    let secs = unix_ms / 1000;
    let (y, m, d) = waypost_proto::date::civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    let s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        unix_ms % 1000
    );
    out.extend_from_slice(s.as_bytes());
}

#[macro_export]
macro_rules! log_at {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::logger::enabled($lvl) {
            $crate::logger::push($lvl, format!($($arg)*));
        }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log_at!($crate::logger::Level::Error, $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!($crate::logger::Level::Warn, $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!($crate::logger::Level::Info, $($arg)*) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!($crate::logger::Level::Debug, $($arg)*) }; }
#[macro_export]
macro_rules! trace { ($($arg:tt)*) => { $crate::log_at!($crate::logger::Level::Trace, $($arg)*) }; }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let mut out = Vec::new();
        write_rfc3339(0, &mut out);
        assert_eq!(out, b"1970-01-01T00:00:00.000Z");
        out.clear();
        // 2026-11-27T18:49:57.123Z
        write_rfc3339(1_795_805_397_123, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "2026-11-27T18:49:57.123Z");
        let mut out = Vec::new();
        // 2000-02-29 (leap day) 23:59:59.999
        write_rfc3339(951_868_799_999, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "2000-02-29T23:59:59.999Z");
        // The same text as the shared formatter's.
        for ms in [0u64, 951_868_799_999, 1_764_270_196_123, 4_102_444_800_000] {
            let mut out = Vec::new();
            write_rfc3339(ms, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                waypost_proto::date::Rfc3339(ms as i64).to_string()
            );
        }
    }

    #[test]
    fn levels_parse_in_any_case() {
        assert_eq!(Level::parse("warn"), Some(Level::Warn));
        assert_eq!(Level::parse("Warning"), Some(Level::Warn));
        assert_eq!(Level::parse("TRACE"), Some(Level::Trace));
        assert_eq!(Level::parse("verbose"), None);
        assert!(Level::Error > Level::Info);
    }

    #[test]
    fn line_format() {
        let mut out = Vec::new();
        format_line(
            &Record {
                level: Level::Info,
                msg: "child started (pid 7)".into(),
            },
            1000,
            &mut out,
        );
        assert_eq!(
            out,
            b"[waypost] 1970-01-01T00:00:01.000Z INFO child started (pid 7)\n"
        );
    }
}
