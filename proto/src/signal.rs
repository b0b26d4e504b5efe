//! Signal names ↔ numbers, for log lines ("killed by SIGTERM"), the config's on-change policy
//! (`signal:SIGHUP`) and the CLI.
//!
//! The numbers are Linux's generic ones (x86, x86-64, arm, arm64, riscv, …), fixed here so the
//! server and the CLI can name a signal the entrypoint reported from another machine. The
//! entrypoint checks in its tests that its libc agrees (`src/sys/signals.rs`).

/// Names of signals 1..=31 back to back; signal N is `NAMES[END[N - 1]..END[N]]`. One string
/// and a byte table rather than 31 `&str`s: no pointer per name for the static entrypoint to
/// carry and relocate.
const NAMES: &str = "SIGHUPSIGINTSIGQUITSIGILLSIGTRAPSIGABRTSIGBUSSIGFPESIGKILLSIGUSR1SIGSEGVSIGUSR2SIGPIPESIGALRMSIGTERMSIGSTKFLTSIGCHLDSIGCONTSIGSTOPSIGTSTPSIGTTINSIGTTOUSIGURGSIGXCPUSIGXFSZSIGVTALRMSIGPROFSIGWINCHSIGIOSIGPWRSIGSYS";
const END: [u8; 32] = [
    0, 6, 12, 19, 25, 32, 39, 45, 51, 58, 65, 72, 79, 86, 93, 100, 109, 116, 123, 130, 137, 144,
    151, 157, 164, 171, 180, 187, 195, 200, 206, 212,
];

/// Highest signal number (the last real-time signal); real-time signals have no fixed names.
pub const MAX: i32 = 64;

/// `SIGTERM` for 15; `None` for 0, real-time signals (32..=64) and anything else.
#[inline]
pub fn name(sig: i32) -> Option<&'static str> {
    let i = usize::try_from(sig).ok()?.checked_sub(1)?;
    NAMES.get(usize::from(*END.get(i)?)..usize::from(*END.get(i + 1)?))
}

/// The number of `HUP`, `SIGHUP`, `sighup`, `SigHup` or a number `1`..=[`MAX`] (surrounding
/// whitespace ignored); `None` otherwise.
#[inline]
pub fn from_name(s: &str) -> Option<i32> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return (1..=MAX).contains(&n).then_some(n);
    }
    // Upper-cased on the stack: no allocation, and the longest name ("SIGVTALRM") fits.
    let mut up = [0u8; 9];
    let b = t.as_bytes();
    up.get_mut(..b.len())?.copy_from_slice(b);
    up.make_ascii_uppercase();
    let up = &up[..b.len()];
    let want = up.strip_prefix(b"SIG").unwrap_or(up);
    (1..32).find(|&n| name(n).is_some_and(|n| &n.as_bytes()[3..] == want))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn names_round_trip() {
        for sig in 1..=31 {
            let n = name(sig).unwrap();
            assert!(n.starts_with("SIG"), "{n}");
            assert_eq!(from_name(n), Some(sig), "{n}");
            assert_eq!(from_name(&n[3..].to_lowercase()), Some(sig), "{n}");
            assert_eq!(from_name(&n.to_lowercase()), Some(sig), "{n}");
            assert_eq!(from_name(&sig.to_string()), Some(sig));
        }
        for sig in [i32::MIN, -1, 0, 32, 64, 65] {
            assert_eq!(name(sig), None, "{sig}");
        }
    }

    #[test]
    fn the_numbers_people_know() {
        assert_eq!(from_name("HUP"), Some(1));
        assert_eq!(from_name(" SIGINT "), Some(2));
        assert_eq!(from_name("kill"), Some(9));
        assert_eq!(from_name("SigUsr1"), Some(10));
        assert_eq!(from_name("USR2"), Some(12));
        assert_eq!(from_name("TERM"), Some(15));
        assert_eq!(from_name("CHLD"), Some(17));
        assert_eq!(from_name("WINCH"), Some(28));
        assert_eq!(name(15), Some("SIGTERM"));
        assert_eq!(name(28), Some("SIGWINCH"));
    }

    #[test]
    fn real_time_signals_by_number_only() {
        assert_eq!(from_name("34"), Some(34));
        assert_eq!(from_name("64"), Some(64));
        assert_eq!(from_name("SIGRTMIN"), None);
    }

    #[test]
    fn not_signals() {
        for s in [
            "",
            "SIG",
            "0",
            "65",
            "-1",
            "SIGNOPE",
            "SIGSIGHUP",
            "HUPX",
            "signal:HUP",
            "1.0",
        ] {
            assert_eq!(from_name(s), None, "{s:?}");
        }
    }
}
