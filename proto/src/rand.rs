//! The pseudo-random numbers both ends use for jitter: xorshift64*.
//!
//! Not for secrets (tokens and instance ids come from the OS). Cheap, allocation-free and
//! deterministic for a given seed, so tests of jittered timers are repeatable. Seeds come from
//! the OS (the entrypoint's `sys::random::u64`, the server's instance ids).

/// Advances the xorshift64* `state` and returns the next value.
///
/// `state` must not be 0 (xorshift stays at 0 forever): make seeds odd with `seed | 1`.
///
/// ```
/// let mut state = 42 | 1;
/// let a = waypost_proto::rand::next(&mut state);
/// let b = waypost_proto::rand::next(&mut state);
/// assert_ne!(a, b);
/// ```
#[inline]
pub fn next(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sequence_and_spread() {
        // The values the entrypoint and the fleet simulator produced before they shared this.
        let mut s = 1u64;
        let first = [next(&mut s), next(&mut s), next(&mut s)];
        assert_eq!(
            first,
            [
                0x47e4_ce4b_896c_dd1d,
                0xabcf_a6a8_e079_651d,
                0xb9d1_0d8f_eb73_1f57
            ]
        );
        // Different seeds diverge at once.
        let (mut a, mut b) = (3u64, 5u64);
        assert_ne!(next(&mut a), next(&mut b));
        // Roughly uniform low bits (what `% n` uses): each of 8 buckets gets 8..17 % of 80,000.
        let mut buckets = [0u32; 8];
        let mut s = 0x9e37_79b9_7f4a_7c15u64 | 1;
        for _ in 0..80_000 {
            buckets[(next(&mut s) % 8) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (6_400..13_600).contains(&n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn zero_state_is_a_fixed_point() {
        // Why seeds are made odd.
        let mut s = 0u64;
        assert_eq!(next(&mut s), 0);
        assert_eq!(s, 0);
    }
}
