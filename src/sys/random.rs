//! Randomness from the kernel (getrandom), for instance ids, TLS, and backoff jitter seeds.

use std::io;

/// Fills `buf` with random bytes; blocks only until the kernel's pool is initialised at boot.
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A random u64 (for seeds).
pub fn u64() -> u64 {
    let mut b = [0u8; 8];
    // No entropy at all is not worth failing over for a jitter seed: fall back to the pid.
    if fill(&mut b).is_err() {
        return u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    u64::from_ne_bytes(b)
}
