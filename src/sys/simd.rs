//! The one hot loop that wants SIMD: finding the next newline in the app's output.

/// Position of the first `\n` in `s`.
pub fn find_newline(s: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        // SSE2 is part of the x86_64 baseline: no runtime detection needed.
        find_newline_sse2(s)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        find_newline_swar(s)
    }
}

/// Sixteen bytes per step with SSE2.
#[cfg(target_arch = "x86_64")]
fn find_newline_sse2(s: &[u8]) -> Option<usize> {
    use core::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
    };
    let mut i = 0;
    // SAFETY: SSE2 is always available on x86_64; every load reads 16 bytes at `i` with
    // i + 16 <= s.len() (unaligned loads are allowed by _mm_loadu_si128).
    unsafe {
        let nl = _mm_set1_epi8(b'\n' as i8);
        while i + 16 <= s.len() {
            let chunk = _mm_loadu_si128(s.as_ptr().add(i).cast::<__m128i>());
            let mask = _mm_movemask_epi8(_mm_cmpeq_epi8(chunk, nl)) as u32;
            if mask != 0 {
                return Some(i + mask.trailing_zeros() as usize);
            }
            i += 16;
        }
    }
    s[i..].iter().position(|&b| b == b'\n').map(|p| i + p)
}

/// Eight bytes per step in a u64 (for other architectures, and as the reference in tests).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn find_newline_swar(s: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const NL: u64 = LO * b'\n' as u64;
    let mut chunks = s.chunks_exact(8);
    let mut i = 0;
    for c in &mut chunks {
        let x = u64::from_le_bytes(c.try_into().expect("8 bytes")) ^ NL;
        // The lowest set bit marks the first zero byte exactly (borrows only run upward).
        let found = x.wrapping_sub(LO) & !x & HI;
        if found != 0 {
            return Some(i + (found.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| i + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_position_and_no_false_positives() {
        for len in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 100] {
            let mut s = vec![b'x'; len];
            assert_eq!(find_newline(&s), None);
            assert_eq!(find_newline_swar(&s), None);
            for at in 0..len {
                s[at] = b'\n';
                assert_eq!(find_newline(&s), Some(at), "len {len} at {at}");
                assert_eq!(find_newline_swar(&s), Some(at), "len {len} at {at}");
                // High bit set with the low bits of '\n', and '\n'+1: neither matches.
                for other in [0x8a, 0x0b, 0x00, 0xff] {
                    s[at] = other;
                    assert_eq!(find_newline(&s), None);
                    assert_eq!(find_newline_swar(&s), None);
                }
                s[at] = b'x';
            }
        }
        // The first of several.
        let s = b"ab\ncd\nef\n".repeat(10);
        assert_eq!(find_newline(&s), Some(2));
        assert_eq!(find_newline(&s[3..]), Some(2));
    }
}
