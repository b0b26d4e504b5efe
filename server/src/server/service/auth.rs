//! Tokens: random, printable with a kind prefix, stored only as SHA-256 hashes.

use crate::util;
use ring::rand::{SecureRandom as _, SystemRandom};

/// Prefix of admin tokens (the API).
pub const ADMIN_PREFIX: &str = "wpa_";
/// Prefix of entrypoint tokens (the control listener).
pub const ENTRYPOINT_PREFIX: &str = "wpe_";
/// Random bytes per token: 160 bits (≥ 128 required), 40 hex characters.
const TOKEN_BYTES: usize = 20;

/// `N` bytes from the system CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system random number generator failed");
    b
}

/// A new token text: `prefix` + 40 lowercase hex digits.
pub fn new_token(prefix: &str) -> String {
    format!("{prefix}{}", util::hex(&random_bytes::<TOKEN_BYTES>()))
}

/// The stored form of a token: hex SHA-256 of its text. Tokens are high-entropy, so a plain
/// (unsalted, fast) hash is enough: there is nothing to brute-force.
pub fn hash_token(token: &str) -> String {
    util::hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = new_token(ADMIN_PREFIX);
        let b = new_token(ADMIN_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with("wpa_") && a.len() == 4 + 40);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
