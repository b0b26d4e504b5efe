//! Readers of /proc and /sys: the child's memory and CPU for Status frames, the processes we
//! adopted (for the cleanup at exit), and the cgroup's OOM-kill counter. Each answers "unknown"
//! (0, empty, None) when the files are not there, as in a scratch container without /proc.

use crate::supervisor::{oom_counter_paths, parse_oom_kills};
use waypost_proto::{Kind, Status};

/// Resident set size of `pid` in bytes (0 if unknown).
pub fn rss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// User + system CPU time of `pid` in milliseconds (0 if unknown).
pub fn cpu_ms(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    // After "pid (comm)": state is field 3, utime field 14, stime field 15.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|x| x.parse::<u64>().ok()).sum());
    let hz = rustix::param::clock_ticks_per_second().max(1);
    ticks * 1000 / hz
}

/// Adds the memory and CPU figures to a Status (or a Hello's) about to be sent: ours, and the
/// child's while it runs (`child_pid` set).
pub fn fill_status(kind: &mut Kind, own_pid: i32) {
    let st: &mut Status = match kind {
        Kind::Status(st) => st,
        Kind::Hello(h) => match &mut h.status {
            Some(st) => st,
            None => return,
        },
        _ => return,
    };
    st.entrypoint_rss_bytes = rss(own_pid);
    if st.child_pid != 0 {
        st.child_rss_bytes = rss(st.child_pid as i32);
        st.child_cpu_ms = cpu_ms(st.child_pid as i32);
    }
}

/// Pids whose parent is `ppid` (empty if /proc is not mounted).
pub fn children_of(ppid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parse_ppid(&stat))
                == Some(ppid)
        })
        .collect()
}

/// The parent pid from a /proc/PID/stat line: `pid (comm) state ppid ...`; comm may contain
/// spaces and parentheses, so parse after the last `)`.
fn parse_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The first of our cgroup's OOM-kill counter files that can be read (None: no cgroup memory
/// controller, or no /proc or /sys — then OOM kills are simply not reported).
pub fn find_oom_counter() -> Option<String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = oom_counter_paths(&cgroups)
        .into_iter()
        .find(|p| oom_kills(p).is_some());
    match &path {
        Some(p) => crate::debug!("counting OOM kills in {p}"),
        None => crate::debug!("no cgroup OOM-kill counter found; OOM kills will not be told apart"),
    }
    path
}

/// The OOM-kill count in the counter file `path` now.
pub fn oom_kills(path: &str) -> Option<u64> {
    parse_oom_kills(&std::fs::read_to_string(path).ok()?)
}

/// Whether a child of ours (the app, an exec session, an adopted orphan) is still there, running
/// or exited, without reaping it.
pub fn has_children() -> bool {
    use rustix::process::{WaitId, WaitIdOptions, waitid};
    let opts = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    !matches!(waitid(WaitId::All, opts), Err(rustix::io::Errno::CHILD))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppid_from_stat() {
        assert_eq!(parse_ppid("42 (sleep) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_ppid("42 (we ird) (x) Z 1 0"), Some(1));
        assert_eq!(parse_ppid("garbage"), None);
    }
}
