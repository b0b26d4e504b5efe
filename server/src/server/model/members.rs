//! Replicas of the server (membership): the rows `server members` shows, whether a replica is
//! up, and what a peer address may look like. See "Replicas" in docs/architecture.md.

use std::time::Duration;

/// How often a replica refreshes its `last_seen`. A few seconds: often enough that a dead
/// replica shows `stale` within [`STALE_AFTER_BEATS`] of these, rarely enough that the write
/// (one row per replica) costs nothing next to the instances' own flushes.
pub const REPLICA_HEARTBEAT: Duration = Duration::from_secs(3);

/// A replica whose `last_seen` is older than this many heartbeats is `stale`: one or two missed
/// beats are a slow disk or a busy database, three are a replica that is gone.
pub const STALE_AFTER_BEATS: u32 = 3;

/// The lease on a live instance: the replica holding its connection must have beaten within
/// this long, or another replica marks the instance `lost` (its connection died with its
/// replica; the entrypoint reconnects to another and revives the row).
pub const LEASE: Duration =
    Duration::from_secs(REPLICA_HEARTBEAT.as_secs() * STALE_AFTER_BEATS as u64);

/// Whether a replica may expire other replicas' leases, given how long its own beats have all
/// succeeded (None: its last one failed). Only after a whole [`LEASE`] of its own health: when
/// the database comes back after an outage every replica's `last_seen` is old, and the first to
/// beat again must not declare the others dead before they have had a beat of their own.
pub fn lease_expiry_allowed(healthy_for: Option<Duration>) -> bool {
    healthy_for.is_some_and(|d| d >= LEASE)
}

/// Rows of replicas not seen for this long are deleted when a replica starts. A replica that
/// crashed leaves its row behind (a clean shutdown deletes it); it stays visible as `stale` for
/// a while so an operator can see that one died, and then is dropped so the list does not grow
/// with every crash.
pub const PRUNE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// One replica as stored, with the number of live instances whose connection it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    pub id: String,
    pub peer_addr: Option<String>,
    pub version: String,
    pub started_at: i64,
    pub last_seen: i64,
    pub instances: u64,
}

/// A live instance whose connection another replica holds, and where that replica is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteInstance {
    /// Hex instance id.
    pub id: String,
    pub replica: String,
    pub peer_addr: String,
}

/// `up`: heartbeats arrive; `stale`: none for [`STALE_AFTER_BEATS`] intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    Up,
    Stale,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Up => "up",
            ReplicaState::Stale => "stale",
        }
    }

    /// The state at `now` (unix ms) of a replica last seen at `last_seen`.
    pub fn at(last_seen: i64, now: i64, heartbeat: Duration) -> ReplicaState {
        let limit = heartbeat.saturating_mul(STALE_AFTER_BEATS).as_millis();
        let age = now.saturating_sub(last_seen).max(0) as u128;
        if age > limit {
            ReplicaState::Stale
        } else {
            ReplicaState::Up
        }
    }
}

/// Checks a `--peer-addr`: `HOST:PORT`, HOST a DNS name, an IPv4 address or a bracketed IPv6
/// address, PORT 1-65535. Returns it as given.
pub fn parse_peer_addr(s: &str) -> Result<String, String> {
    let bad = |why: &str| {
        Err(format!(
            "{why}; expected HOST:PORT, e.g. 10.0.0.5:9703 or [::1]:9703"
        ))
    };
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad("no port");
    };
    match port.parse::<u16>() {
        // 0: the peer listener takes a free port, and that port is what other replicas are told.
        Ok(_) if !port.starts_with('+') => {}
        _ => return bad(&format!("invalid port {port:?}")),
    }
    if let Some(v6) = host.strip_prefix('[') {
        return match v6.strip_suffix(']').map(str::parse::<std::net::Ipv6Addr>) {
            Some(Ok(_)) => Ok(s.to_string()),
            _ => bad(&format!("invalid IPv6 address {host:?}")),
        };
    }
    if host.is_empty() {
        return bad("no host");
    }
    if host.contains(':') {
        return bad("an IPv6 address needs brackets");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        return bad(&format!("invalid host {host:?}"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_only_after_a_whole_lease_of_own_health() {
        assert_eq!(LEASE, Duration::from_secs(9));
        assert!(!lease_expiry_allowed(None), "own beat failing");
        assert!(
            !lease_expiry_allowed(Some(Duration::ZERO)),
            "just recovered"
        );
        assert!(!lease_expiry_allowed(Some(
            LEASE - Duration::from_millis(1)
        )));
        assert!(lease_expiry_allowed(Some(LEASE)));
    }

    #[test]
    fn stale_after_three_missed_heartbeats() {
        let hb = Duration::from_secs(3);
        assert_eq!(ReplicaState::at(1_000, 1_000, hb), ReplicaState::Up);
        assert_eq!(
            ReplicaState::at(1_000, 10_000, hb),
            ReplicaState::Up,
            "exactly 3 beats"
        );
        assert_eq!(ReplicaState::at(1_000, 10_001, hb), ReplicaState::Stale);
        // A clock that went backwards (another host's last_seen ahead of ours) is not stale.
        assert_eq!(ReplicaState::at(5_000, 1_000, hb), ReplicaState::Up);
        assert_eq!(ReplicaState::Stale.as_str(), "stale");
    }

    #[test]
    fn peer_addrs() {
        for ok in [
            "127.0.0.1:9703",
            "[::1]:1",
            "replica-2.internal:65535",
            "host:80",
            "127.0.0.1:0",
        ] {
            assert_eq!(parse_peer_addr(ok).as_deref(), Ok(ok), "{ok}");
        }
        for (bad, why) in [
            ("127.0.0.1", "no port"),
            ("h:", "invalid port"),
            ("nohost", "no port"),
            (":9703", "no host"),
            ("h:70000", "invalid port"),
            ("h:+80", "invalid port"),
            ("::1:80", "brackets"),
            ("[zz]:80", "invalid IPv6"),
            ("bad_host:80", "invalid host"),
            ("a..b:80", "invalid host"),
            ("-a:80", "invalid host"),
        ] {
            let err = parse_peer_addr(bad).unwrap_err();
            assert!(
                err.contains(why) && err.contains("HOST:PORT"),
                "{bad}: {err}"
            );
        }
    }
}
