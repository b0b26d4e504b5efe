//! Small helpers shared by the server and the CLI: time formatting, durations, base64, names,
//! atomic file writes. Hand-written where a dependency would cost more compile time than the
//! few lines it saves. Dates, durations, base64 and signal names are the entrypoint's own
//! (`waypost_proto`), so both ends read and write them the same way.

use anyhow::{Context as _, Result};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (wall clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub use waypost_proto::date::{civil_from_days, days_from_civil, parse_rfc3339};

/// Unix milliseconds → RFC 3339 UTC with milliseconds, e.g. `2026-11-27T19:03:16.123Z`.
pub fn fmt_rfc3339(ms: i64) -> String {
    waypost_proto::date::Rfc3339(ms).to_string()
}

/// The duration syntax of every flag and setting (`500ms`, `15s`, `1.5h`, `1m30s`, `2d`; a bare
/// number is seconds): [`waypost_proto::parse_duration`], where the grammar is documented.
pub fn parse_duration(s: &str) -> Result<Duration> {
    waypost_proto::parse_duration(s).map_err(anyhow::Error::msg)
}

/// Short human duration for tables: `45s`, `12m`, `3h`, `5d`.
pub fn fmt_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Binary-prefixed bytes for tables: `812K`, `12.4M`, `1.2G`.
pub fn fmt_bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let f = n as f64;
    if f < K {
        format!("{n}B")
    } else if f < K * K {
        format!("{:.0}K", f / K)
    } else if f < K * K * K {
        format!("{:.1}M", f / (K * K))
    } else {
        format!("{:.1}G", f / (K * K * K))
    }
}

/// Standard base64: `base64_encode` pads and writes one line; `base64_decode` takes padding or
/// none and ignores ASCII whitespace (`None` if malformed).
pub use waypost_proto::base64::{decode as base64_decode, encode as base64_encode};

/// The machine's host name (Linux: the kernel's), or `localhost` if unknown.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_string())
}

/// App names become host names (`NAME.localhost`): one lowercase DNS label.
pub fn valid_app_name(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty() && b.len() <= 63 && edge(&b[0]) && edge(&b[b.len() - 1]) && b.iter().all(inner)
}

/// Turns any string (a directory name) into a valid app name, or `None` if nothing is left.
pub fn sanitize_label(s: &str) -> Option<String> {
    let mut out = String::new();
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-');
    let mut out: String = out.chars().take(63).collect();
    while out.ends_with('-') {
        out.pop();
    }
    (!out.is_empty()).then_some(out)
}

/// Writes `data` to `path` atomically (temp file in the same directory, fsync, rename) with
/// the given permission bits, so readers never see a half-written file.
/// Creates `dir` and its missing parents, owner-only (0700) where they are new.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // Exactly `mode`: open's is masked by the umask, and a stale temp file keeps its own.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Linux signal number → name, for "killed by SIGTERM" (`signal 40` for one without a name).
pub fn signal_name(sig: i32) -> String {
    match waypost_proto::signal::name(sig) {
        Some(name) => name.to_string(),
        None => format!("signal {sig}"),
    }
}

/// Hex encoding (lowercase).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        for ms in [
            0i64,
            1,
            999,
            1_764_270_196_123,
            951_782_400_000,
            4_102_444_800_000,
        ] {
            let s = fmt_rfc3339(ms);
            assert_eq!(parse_rfc3339(&s), Some(ms), "{s}");
        }
        assert_eq!(fmt_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt_rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(parse_rfc3339("2000-02-29T00:00:01Z"), Some(951_782_401_000));
        assert_eq!(parse_rfc3339("garbage"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn app_names() {
        for ok in ["a", "web", "my-app", "a1", "0", &"a".repeat(63)] {
            assert!(valid_app_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "my_app", "a.b", &"a".repeat(64), "é"] {
            assert!(!valid_app_name(bad), "{bad}");
        }
        assert_eq!(
            sanitize_label("My_Project.v2").as_deref(),
            Some("my-project-v2")
        );
        assert_eq!(sanitize_label("--x--").as_deref(), Some("x"));
        assert_eq!(sanitize_label("___"), None);
        let long = sanitize_label(&"ab-".repeat(40)).unwrap();
        assert!(valid_app_name(&long), "{long}");
    }

    #[test]
    fn sizes_and_ages() {
        assert_eq!(fmt_bytes(512), "512B");
        assert_eq!(fmt_bytes(2048), "2K");
        assert_eq!(fmt_bytes(13 * 1024 * 1024 + 400 * 1024), "13.4M");
        assert_eq!(fmt_age(Duration::from_secs(45)), "45s");
        assert_eq!(fmt_age(Duration::from_secs(3 * 3600)), "3h");
    }
}

/// `s` percent-encoded for a URL query value (everything but unreserved characters).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod percent_tests {
    #[test]
    fn percent_encodes_query_values() {
        assert_eq!(super::percent_encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(
            super::percent_encode("env=prod,x y&z"),
            "env%3Dprod%2Cx%20y%26z"
        );
        assert_eq!(super::percent_encode("é"), "%C3%A9");
    }
}
