//! Access control of an app's URL: who may reach it through the ingress (`waypost url auth`).
//!
//! - `cidrs`: when any is set, a visitor whose real address (the TCP peer, never a header) is in
//!   none of them is refused with 403, whatever credentials it brings.
//! - `basic` users and `bearer` tokens: when any is set, a request must carry `Authorization:
//!   Basic …` of one of the users or `Authorization: Bearer …` of one of the tokens, else 401
//!   with a `WWW-Authenticate` challenge. These credentials are the ingress's: the header is
//!   removed before the request reaches the app.
//! - Nothing set (the default for a new app): open to whoever can reach the ingress.
//!
//! Passwords are stored as salted PBKDF2-HMAC-SHA256 hashes ([`PBKDF2_ROUNDS`]); bearer tokens
//! are 160-bit random strings stored as their SHA-256 (unguessable, so a fast hash is enough).
//! Pure: the ingress asks [`UrlAuth::decide`] and keeps its own cache of verified headers.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::num::NonZeroU32;

/// PBKDF2 rounds for basic-auth passwords: ~10 ms on a small machine, paid once per distinct
/// credential (the service caches what it verified), so a keep-alive client pays nothing.
pub const PBKDF2_ROUNDS: u32 = 100_000;
/// Most users, tokens or networks per app.
pub const MAX_ENTRIES: usize = 64;
/// Longest user name or password accepted.
const MAX_CREDENTIAL: usize = 256;

/// One basic-auth user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasicUser {
    pub user: String,
    /// Hex salt (16 bytes).
    pub salt: String,
    /// Hex PBKDF2-HMAC-SHA256 of the password (32 bytes).
    pub hash: String,
}

/// One bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BearerToken {
    /// The first 12 hex digits of its hash: how `url --app` lists it.
    pub id: String,
    /// Hex SHA-256 of the token text.
    pub hash: String,
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `2001:db8::/32`, or a single address (`/32` or `/128`).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || {
            format!(
                "invalid network {s:?}: use an address or CIDR like 10.0.0.0/8 or 2001:db8::/32"
            )
        };
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What is in force for one app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlAuth {
    #[serde(default)]
    pub basic: Vec<BasicUser>,
    #[serde(default)]
    pub bearer: Vec<BearerToken>,
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
}

/// What the ingress does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve it; `strip`: remove the `Authorization` header first (it held our credentials).
    Allow { strip: bool },
    /// 401 with this `WWW-Authenticate` value.
    Unauthorized(String),
    /// 403: the visitor's address is not allowed.
    Forbidden,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn pbkdf2(salt: &[u8], password: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(PBKDF2_ROUNDS).expect("non-zero"),
        salt,
        password.as_bytes(),
        &mut out,
    );
    out
}

fn sha256_hex(s: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

/// `USER:PASS` as given to `--basic`, checked.
pub fn parse_basic(s: &str) -> Result<(String, String), String> {
    let (user, pass) = s
        .split_once(':')
        .ok_or_else(|| "--basic takes USER:PASSWORD".to_string())?;
    if user.is_empty() || user.len() > MAX_CREDENTIAL || user.chars().any(|c| c.is_control()) {
        return Err(format!(
            "invalid user name {user:?}: 1-{MAX_CREDENTIAL} characters, no control characters"
        ));
    }
    if pass.len() < 8 || pass.len() > MAX_CREDENTIAL || pass.chars().any(|c| c.is_control()) {
        return Err(format!(
            "the password of {user} must have 8-{MAX_CREDENTIAL} characters (no control characters)"
        ));
    }
    Ok((user.to_string(), pass.to_string()))
}

impl UrlAuth {
    pub fn is_open(&self) -> bool {
        self.basic.is_empty() && self.bearer.is_empty() && self.cidrs.is_empty()
    }

    /// Adds (or replaces the password of) a basic-auth user; `salt` is 16 random bytes.
    pub fn add_basic(&mut self, user: &str, password: &str, salt: [u8; 16]) -> Result<(), String> {
        self.basic.retain(|u| u.user != user);
        if self.basic.len() >= MAX_ENTRIES {
            return Err(format!("at most {MAX_ENTRIES} users per app"));
        }
        self.basic.push(BasicUser {
            user: user.to_string(),
            salt: hex(&salt),
            hash: hex(&pbkdf2(&salt, password)),
        });
        Ok(())
    }

    /// Adds a bearer token (its text: `wpu_` and 160 random bits as hex); returns its id.
    pub fn add_bearer(&mut self, token: &str) -> Result<String, String> {
        if self.bearer.len() >= MAX_ENTRIES {
            return Err(format!("at most {MAX_ENTRIES} bearer tokens per app"));
        }
        let hash = sha256_hex(token);
        let id = hash[..12].to_string();
        self.bearer.push(BearerToken {
            id: id.clone(),
            hash,
        });
        Ok(id)
    }

    pub fn add_cidr(&mut self, c: Cidr) -> Result<(), String> {
        if !self.cidrs.contains(&c) {
            if self.cidrs.len() >= MAX_ENTRIES {
                return Err(format!("at most {MAX_ENTRIES} networks per app"));
            }
            self.cidrs.push(c);
        }
        Ok(())
    }

    /// The decision for a visitor at `peer` with this `Authorization` header (if any).
    /// `verified(header)`: whether the service already verified exactly this header for this
    /// app (skips the slow password hash); the caller remembers a header when this returns
    /// Allow for it with `strip`.
    pub fn decide(
        &self,
        peer: IpAddr,
        authorization: Option<&str>,
        verified: &dyn Fn(&str) -> bool,
    ) -> Decision {
        if !self.cidrs.is_empty() && !self.cidrs.iter().any(|c| c.contains(peer)) {
            return Decision::Forbidden;
        }
        if self.basic.is_empty() && self.bearer.is_empty() {
            return Decision::Allow { strip: false };
        }
        if let Some(h) = authorization {
            if verified(h) || self.credentials_ok(h) {
                return Decision::Allow { strip: true };
            }
        }
        let mut challenges = Vec::new();
        if !self.basic.is_empty() {
            challenges.push("Basic realm=\"waypost\", charset=\"UTF-8\"");
        }
        if !self.bearer.is_empty() {
            challenges.push("Bearer realm=\"waypost\"");
        }
        Decision::Unauthorized(challenges.join(", "))
    }

    fn credentials_ok(&self, h: &str) -> bool {
        let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let Some(raw) = crate::util::base64_decode(rest) else {
                return false;
            };
            let Ok(text) = String::from_utf8(raw) else {
                return false;
            };
            let Some((user, pass)) = text.split_once(':') else {
                return false;
            };
            self.basic.iter().any(|u| {
                u.user == user
                    && match (unhex(&u.salt), unhex(&u.hash)) {
                        (Some(salt), Some(want)) => ring::pbkdf2::verify(
                            ring::pbkdf2::PBKDF2_HMAC_SHA256,
                            NonZeroU32::new(PBKDF2_ROUNDS).expect("non-zero"),
                            &salt,
                            pass.as_bytes(),
                            &want,
                        )
                        .is_ok(),
                        _ => false,
                    }
            })
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let got = sha256_hex(rest);
            // Compared as hashes of a 160-bit secret: timing reveals nothing usable.
            self.bearer.iter().any(|t| t.hash == got)
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks() {
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.2.3")) && !n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.9.9")), "IPv4-mapped");
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("8.8.8.8")) && !all.contains(ip("::1")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decisions() {
        let never = |_: &str| false;
        let open = UrlAuth::default();
        assert!(open.is_open());
        assert_eq!(
            open.decide(ip("1.2.3.4"), Some("Basic x"), &never),
            Decision::Allow { strip: false },
            "an app's own Authorization passes through untouched when we have none"
        );
        let mut a = UrlAuth::default();
        a.add_basic("alice", "correct horse", [7; 16]).unwrap();
        let good = format!(
            "Basic {}",
            crate::util::base64_encode(b"alice:correct horse")
        );
        let wrong = format!("Basic {}", crate::util::base64_encode(b"alice:wrong"));
        let who = format!("Basic {}", crate::util::base64_encode(b"bob:correct horse"));
        assert_eq!(
            a.decide(ip("1.2.3.4"), Some(&good), &never),
            Decision::Allow { strip: true }
        );
        for bad in [
            None,
            Some(wrong.as_str()),
            Some(who.as_str()),
            Some("Basic !!"),
            Some("Digest x"),
        ] {
            match a.decide(ip("1.2.3.4"), bad, &never) {
                Decision::Unauthorized(c) => assert!(c.starts_with("Basic realm="), "{c}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // A verified header skips the hash.
        let cached = |h: &str| h == "Basic cached";
        assert_eq!(
            a.decide(ip("1.2.3.4"), Some("Basic cached"), &cached),
            Decision::Allow { strip: true }
        );

        let id = a.add_bearer("t0ken-text-0123456789").unwrap();
        assert_eq!(id.len(), 12);
        assert_eq!(
            a.decide(ip("1.2.3.4"), Some("Bearer t0ken-text-0123456789"), &never),
            Decision::Allow { strip: true }
        );
        match a.decide(ip("1.2.3.4"), Some("Bearer nope"), &never) {
            Decision::Unauthorized(c) => {
                assert!(c.contains("Basic") && c.contains("Bearer"), "{c}")
            }
            other => panic!("{other:?}"),
        }
        // A network that excludes the visitor: 403 even with good credentials.
        a.add_cidr(Cidr::parse("10.0.0.0/8").unwrap()).unwrap();
        assert_eq!(
            a.decide(ip("1.2.3.4"), Some(&good), &never),
            Decision::Forbidden
        );
        assert_eq!(
            a.decide(ip("10.9.9.9"), Some(&good), &never),
            Decision::Allow { strip: true }
        );
        // Replacing a user's password.
        a.add_basic("alice", "another pass", [8; 16]).unwrap();
        assert_eq!(a.basic.len(), 1);
        assert!(matches!(
            a.decide(ip("10.0.0.1"), Some(&good), &never),
            Decision::Unauthorized(_)
        ));
        // Round trip through the stored form.
        let back: UrlAuth = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn basic_arguments() {
        assert_eq!(
            parse_basic("a:12345678").unwrap(),
            ("a".into(), "12345678".into())
        );
        assert_eq!(
            parse_basic("a:pass:with:colons").unwrap().1,
            "pass:with:colons"
        );
        for bad in ["nocolon", ":12345678", "a:short", "a\n:12345678"] {
            assert!(parse_basic(bad).is_err(), "{bad}");
        }
    }
}
