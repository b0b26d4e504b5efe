//! Reconnect delays: exponential backoff with "equal jitter".
//!
//! The entrypoint waits this long between connection attempts (docs/protocol.md, "Reconnect
//! backoff"); the fleet simulator uses the same function so the server is load-tested with the
//! reconnect storm real entrypoints make.

use core::time::Duration;

/// First delay (after one failure the base is twice this).
pub const MIN: Duration = Duration::from_millis(100);
/// Largest base delay: a server that is down for long is still tried twice a minute.
pub const MAX: Duration = Duration::from_secs(30);

/// The delay before the next attempt after `attempts` failures in a row: base =
/// [`MIN`] × 2^`attempts`, capped at [`MAX`]; half of it fixed and half random, so a fleet that
/// lost its server at the same moment does not come back at the same moment. `rng` is an
/// xorshift state ([`crate::rand::next`]), never 0.
///
/// ```
/// use core::time::Duration;
/// use waypost_proto::backoff;
/// let mut rng = 7;
/// let d = backoff::delay(3, &mut rng); // base 800 ms
/// assert!(d >= Duration::from_millis(400) && d <= Duration::from_millis(800));
/// ```
#[inline]
pub fn delay(attempts: u32, rng: &mut u64) -> Duration {
    let base = MIN.saturating_mul(1u32 << attempts.min(16)).min(MAX);
    let half = base / 2;
    let jitter = crate::rand::next(rng) % (half.as_micros() as u64 + 1);
    half + Duration::from_micros(jitter)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_from_min_to_max_with_half_jitter() {
        for seed in [1u64, 2, 3, 0xdead_beef | 1] {
            let mut rng = seed;
            for n in 0..40u32 {
                let base = if n >= 9 { MAX } else { MIN * (1 << n) };
                let d = delay(n, &mut rng);
                assert!(
                    d >= base / 2 && d <= base,
                    "seed {seed} attempt {n}: {d:?} outside [{:?}, {base:?}]",
                    base / 2
                );
            }
        }
        // The first delays and the cap, as the contract states them.
        let mut rng = 1;
        assert!(delay(0, &mut rng) <= ms(100));
        assert!(
            delay(u32::MAX, &mut rng) >= ms(15_000),
            "capped at 30 s, at least half of it"
        );
    }

    #[test]
    fn a_fleet_does_not_come_back_in_lockstep() {
        // 1,000 instances lost their server at the same instant, each with its own seed: their
        // 5th delay (base 1.6 s) spreads over the whole [0.8 s, 1.6 s] range.
        let mut fifth: Vec<Duration> = (1..=1000u64)
            .map(|i| {
                let mut rng = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                (0..5).map(|n| delay(n, &mut rng)).last().unwrap()
            })
            .collect();
        fifth.sort();
        fifth.dedup();
        assert!(fifth.len() > 990, "only {} distinct delays", fifth.len());
        let spread = *fifth.last().unwrap() - fifth[0];
        assert!(spread > ms(780), "spread {spread:?}");
    }

    #[test]
    fn same_seed_same_delays() {
        let (mut a, mut b, mut c) = (1u64, 1u64, 2u64);
        let da: Vec<_> = (0..8).map(|n| delay(n, &mut a)).collect();
        let db: Vec<_> = (0..8).map(|n| delay(n, &mut b)).collect();
        let dc: Vec<_> = (0..8).map(|n| delay(n, &mut c)).collect();
        assert_eq!(da, db);
        assert_ne!(da, dc);
    }
}
