//! Custom domains of apps' URLs (`waypost domain add`): the rules a domain and its certificate
//! must meet before they are stored, and the certificate parsing both the check and the HTTPS
//! ingress (transport/ingress_tls.rs) use.
//!
//! A domain is a plain DNS name (lowercase ASCII labels, at least two, no wildcard, not under the
//! server's URL domain: names there are apps' labels). Its certificate is a PEM chain, leaf first;
//! its key a PEM private key (PKCS#8, SEC1 or PKCS#1; what rustls' ring provider loads). They
//! are accepted when both parse, the key is the leaf's, the leaf's SANs cover the domain (the
//! same matching a TLS client does, wildcards included) and the leaf is valid now.
//!
//! The dates and the subject are read here from the leaf's DER with a few lines of parsing
//! (X.509's TBSCertificate starts with fixed fields): a full X.509 crate would be a compile-time
//! cost for two fields.

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use std::sync::Arc;

/// A custom domain as stored: the domain, its app, its certificate chain and key (PEM), and what
/// `domain list` shows of the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRow {
    pub domain: String,
    pub app: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The leaf's subject, e.g. `CN=www.example.com, O=Example`.
    pub subject: String,
    /// The leaf's notAfter, unix ms.
    pub not_after: i64,
    pub created_at: i64,
}

/// What [`check`] learnt from an accepted certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The leaf's subject (RFC 4514-like, in the certificate's order; empty if it has none).
    pub subject: String,
    /// The leaf's notBefore and notAfter, unix ms.
    pub not_before: i64,
    pub not_after: i64,
}

/// `DOMAIN` normalised (lowercase, no trailing dot), or why it is not a domain we serve.
pub fn normalize(domain: &str, url_domain: &str) -> Result<String, String> {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if d.is_empty() {
        return Err("the domain is empty".into());
    }
    if !d.is_ascii() {
        return Err(format!(
            "{domain:?} is not ASCII: give an internationalised domain in its xn-- (punycode) form"
        ));
    }
    if d.starts_with("*.") {
        return Err(format!(
            "{domain:?} is a wildcard: add each host name of the app as its own domain"
        ));
    }
    if d.len() > 253 {
        return Err(format!("{domain:?} is longer than 253 characters"));
    }
    let labels: Vec<&str> = d.split('.').collect();
    if labels.len() < 2 {
        return Err(format!(
            "{domain:?} is not a full domain name (it needs at least two labels, like www.example.com)"
        ));
    }
    for l in &labels {
        let ok = !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-');
        if !ok {
            return Err(format!(
                "{domain:?} is not a valid domain name: each dot-separated label is 1-63 letters, \
                 digits and '-', not starting or ending with '-'"
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "{domain:?} looks like an IP address; a custom domain is a DNS name"
        ));
    }
    let url_domain = url_domain.trim_end_matches('.').to_ascii_lowercase();
    if d == url_domain || d.ends_with(&format!(".{url_domain}")) {
        return Err(format!(
            "{d} is under the server's URL domain {url_domain}, where names are apps' own \
             (NAME.{url_domain}); a custom domain must be outside it"
        ));
    }
    Ok(d)
}

/// Parses a PEM chain and key into what rustls serves, checking that the key is the leaf's.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate file is not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err(
            "the certificate file holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)"
                .into(),
        );
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        format!(
            "the key file holds no private key (expected PEM: -----BEGIN PRIVATE KEY-----, \
             EC PRIVATE KEY or RSA PRIVATE KEY): {e}"
        )
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        format!("the private key cannot be used (RSA, ECDSA P-256/P-384 or Ed25519): {e}")
    })?;
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            "the private key does not match the certificate (it is another certificate's key)"
                .into(),
        ),
        Err(e) => Err(format!(
            "could not check that the key matches the certificate: {e}"
        )),
    }
}

/// Checks a certificate and key for `domain` (already [`normalize`]d) at `now_ms`: see the
/// module doc. The error is a sentence for the user.
pub fn check(domain: &str, cert_pem: &str, key_pem: &str, now_ms: i64) -> Result<CertInfo, String> {
    let ck = certified_key(cert_pem, key_pem)?;
    let leaf = &ck.cert[0];
    let info = cert_info(leaf)?;
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let name =
        ServerName::try_from(domain).map_err(|_| format!("{domain:?} is not a valid DNS name"))?;
    if ee.verify_is_valid_for_subject_name(&name).is_err() {
        let sans = dns_names(leaf).join(", ");
        return Err(format!(
            "the certificate does not cover {domain}: its names (subject alternative names) are {}",
            if sans.is_empty() {
                "none".to_string()
            } else {
                sans
            }
        ));
    }
    if now_ms > info.not_after {
        return Err(format!(
            "the certificate expired on {}",
            crate::util::fmt_rfc3339(info.not_after)
        ));
    }
    if now_ms < info.not_before {
        return Err(format!(
            "the certificate is not valid yet (from {})",
            crate::util::fmt_rfc3339(info.not_before)
        ));
    }
    Ok(info)
}

/// The rustls certificate of a stored row (checked again: a row written by hand is not trusted).
pub fn row_key(row: &DomainRow) -> Result<Arc<CertifiedKey>, String> {
    certified_key(&row.cert_pem, &row.key_pem).map(Arc::new)
}

// ---- DER --------------------------------------------------------------------------------------

/// One DER element: (tag, contents, what follows).
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;

/// The fields of a TBSCertificate up to the subject: (validity, subject), both as contents.
fn tbs_fields(cert: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (SEQUENCE, cert, _) = tlv(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] EXPLICIT version, absent for v1.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    let (0x02, _serial, rest) = tlv(rest)? else {
        return None;
    };
    let (SEQUENCE, _sig_alg, rest) = tlv(rest)? else {
        return None;
    };
    let (SEQUENCE, _issuer, rest) = tlv(rest)? else {
        return None;
    };
    let (SEQUENCE, validity, rest) = tlv(rest)? else {
        return None;
    };
    let (SEQUENCE, subject, rest) = tlv(rest)? else {
        return None;
    };
    Some((validity, subject, rest))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) → unix ms.
fn der_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            // RFC 5280 §4.1.2.5.1: 50-99 are 19xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    if !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |i: usize| rest[i..i + 2].parse::<u32>().ok();
    let (mo, d, h, mi, se) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = waypost_proto::date::days_from_civil(year, mo, d);
    Some(((days * 86_400) + (h as i64 * 3600) + (mi as i64 * 60) + se as i64) * 1000)
}

/// The short names of the attributes `domain list` shows, by OID contents (2.5.4.x).
fn attr_name(oid: &[u8]) -> Option<&'static str> {
    match oid {
        [0x55, 0x04, 0x03] => Some("CN"),
        [0x55, 0x04, 0x06] => Some("C"),
        [0x55, 0x04, 0x07] => Some("L"),
        [0x55, 0x04, 0x08] => Some("ST"),
        [0x55, 0x04, 0x0a] => Some("O"),
        [0x55, 0x04, 0x0b] => Some("OU"),
        _ => None,
    }
}

/// A Name's attributes as `CN=…, O=…` (the usual ones; others are left out).
fn name_text(mut name: &[u8]) -> String {
    let mut parts = Vec::new();
    while let Some((0x31, mut set, rest)) = tlv(name) {
        name = rest;
        while let Some((SEQUENCE, atv, more)) = tlv(set) {
            set = more;
            let Some((0x06, oid, value)) = tlv(atv) else {
                continue;
            };
            let (Some(short), Some((tag, v, _))) = (attr_name(oid), tlv(value)) else {
                continue;
            };
            let text = match tag {
                // UTF8String, PrintableString, IA5String, TeletexString (read as Latin-1-ish).
                0x0c | 0x13 | 0x16 | 0x14 => String::from_utf8_lossy(v).into_owned(),
                // BMPString: UTF-16BE.
                0x1e => String::from_utf16_lossy(
                    &v.chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect::<Vec<_>>(),
                ),
                _ => continue,
            };
            parts.push(format!("{short}={text}"));
        }
    }
    parts.join(", ")
}

/// The subject and validity of a certificate.
pub fn cert_info(cert: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let bad = || "the certificate cannot be parsed (not a DER X.509 certificate)".to_string();
    let (validity, subject, _) = tbs_fields(cert.as_ref()).ok_or_else(bad)?;
    let (t1, v1, rest) = tlv(validity).ok_or_else(bad)?;
    let (t2, v2, _) = tlv(rest).ok_or_else(bad)?;
    Ok(CertInfo {
        subject: name_text(subject),
        not_before: der_time(t1, v1).ok_or_else(bad)?,
        not_after: der_time(t2, v2).ok_or_else(bad)?,
    })
}

/// The DNS names and IP addresses in a certificate's subjectAltName, for error messages.
fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Some((_, _, mut rest)) = tbs_fields(cert.as_ref()) else {
        return Vec::new();
    };
    // After the subject: subjectPublicKeyInfo, optional [1] [2] unique ids, [3] extensions.
    while let Some((tag, v, more)) = tlv(rest) {
        rest = more;
        if tag != 0xa3 {
            continue;
        }
        let Some((SEQUENCE, mut exts, _)) = tlv(v) else {
            return Vec::new();
        };
        while let Some((SEQUENCE, ext, more)) = tlv(exts) {
            exts = more;
            let Some((0x06, oid, mut after)) = tlv(ext) else {
                continue;
            };
            if oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            // Optional `critical` BOOLEAN, then the OCTET STRING holding GeneralNames.
            if after.first() == Some(&0x01) {
                after = tlv(after).map_or(&[][..], |t| t.2);
            }
            let Some((0x04, octets, _)) = tlv(after) else {
                return Vec::new();
            };
            let Some((SEQUENCE, mut names, _)) = tlv(octets) else {
                return Vec::new();
            };
            let mut out = Vec::new();
            while let Some((tag, v, more)) = tlv(names) {
                names = more;
                match tag {
                    0x82 => out.push(String::from_utf8_lossy(v).into_owned()),
                    0x87 if v.len() == 4 => {
                        out.push(std::net::Ipv4Addr::new(v[0], v[1], v[2], v[3]).to_string())
                    }
                    0x87 if v.len() == 16 => {
                        let b: [u8; 16] = v.try_into().unwrap_or([0; 16]);
                        out.push(std::net::Ipv6Addr::from(b).to_string())
                    }
                    _ => {}
                }
            }
            return out;
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, Issuer, KeyPair};

    const DAY: i64 = 86_400_000;

    /// A CA-signed leaf for `sans`, valid from `nb` to `na` (days since the epoch), as (cert
    /// PEM with the CA appended, key PEM).
    fn leaf(sans: &[&str], nb: i64, na: i64) -> (String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Test CA");
        ca.distinguished_name = dn;
        let ca_cert = ca.clone().self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, sans.first().copied().unwrap_or("x"));
        dn.push(DnType::OrganizationName, "Example Ltd");
        p.distinguished_name = dn;
        let date = |days: i64| {
            let (y, m, d) = waypost_proto::date::civil_from_days(days);
            rcgen::date_time_ymd(y as i32, m as u8, d as u8)
        };
        p.not_before = date(nb);
        p.not_after = date(na);
        let cert = p.signed_by(&key, &issuer).unwrap();
        (
            format!("{}{}", cert.pem(), ca_cert.pem()),
            key.serialize_pem(),
        )
    }

    fn today() -> i64 {
        crate::util::now_ms() / DAY
    }

    #[test]
    fn a_good_certificate_is_accepted_with_its_subject_and_dates() {
        let t = today();
        let (cert, key) = leaf(&["www.example.test", "example.test"], t - 1, t + 90);
        let info = check("www.example.test", &cert, &key, crate::util::now_ms()).unwrap();
        assert_eq!(info.subject, "CN=www.example.test, O=Example Ltd");
        assert_eq!(info.not_after, (t + 90) * DAY);
        assert_eq!(info.not_before, (t - 1) * DAY);
        assert!(check("example.test", &cert, &key, crate::util::now_ms()).is_ok());
    }

    #[test]
    fn a_wildcard_san_covers_one_label() {
        let t = today();
        let (cert, key) = leaf(&["*.example.test"], t - 1, t + 90);
        let now = crate::util::now_ms();
        assert!(check("www.example.test", &cert, &key, now).is_ok());
        let e = check("a.b.example.test", &cert, &key, now).unwrap_err();
        assert!(e.contains("does not cover a.b.example.test"), "{e}");
        assert!(e.contains("*.example.test"), "{e}");
    }

    #[test]
    fn mismatched_expired_uncovering_and_garbage_are_refused() {
        let t = today();
        let now = crate::util::now_ms();
        let (cert, _) = leaf(&["www.example.test"], t - 1, t + 90);
        let (_, other_key) = leaf(&["www.example.test"], t - 1, t + 90);
        let e = check("www.example.test", &cert, &other_key, now).unwrap_err();
        assert!(e.contains("does not match"), "{e}");

        let (old, old_key) = leaf(&["www.example.test"], t - 400, t - 10);
        let e = check("www.example.test", &old, &old_key, now).unwrap_err();
        assert!(e.starts_with("the certificate expired on "), "{e}");

        let (future, fkey) = leaf(&["www.example.test"], t + 10, t + 400);
        let e = check("www.example.test", &future, &fkey, now).unwrap_err();
        assert!(e.contains("not valid yet"), "{e}");

        let (cert, key) = leaf(&["api.example.test"], t - 1, t + 90);
        let e = check("www.example.test", &cert, &key, now).unwrap_err();
        assert!(e.contains("does not cover www.example.test"), "{e}");
        assert!(e.contains("api.example.test"), "{e}");

        let e = check("www.example.test", "not pem", &key, now).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let e = check("www.example.test", &cert, "not pem", now).unwrap_err();
        assert!(e.contains("no private key"), "{e}");
        // The key where the certificate goes and the other way round.
        let e = check("www.example.test", &key, &cert, now).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
    }

    #[test]
    fn domains_are_normalised_and_bad_ones_refused() {
        assert_eq!(
            normalize("WWW.Example.COM.", "localhost").unwrap(),
            "www.example.com"
        );
        for (bad, why) in [
            ("", "empty"),
            ("localhost2", "at least two labels"),
            ("*.example.com", "wildcard"),
            ("a..example.com", "not a valid domain"),
            ("-a.example.com", "not a valid domain"),
            ("a_b.example.com", "not a valid domain"),
            ("10.0.0.1", "IP address"),
            ("bücher.example", "punycode"),
            ("web.localhost", "URL domain"),
            ("apps.example.com", "URL domain"),
        ] {
            let url_domain = if bad == "apps.example.com" {
                "apps.example.com"
            } else {
                "localhost"
            };
            let e = normalize(bad, url_domain).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(normalize("www.example.com", "example.com").is_err());
        assert!(normalize("notexample.com", "example.com").is_ok());
    }

    #[test]
    fn der_times_of_both_kinds() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(2524607999000));
        assert_eq!(der_time(0x18, b"20380119031408Z"), Some(2147483648000));
        assert_eq!(der_time(0x17, b"7001010000Z"), None);
        assert_eq!(der_time(0x18, b"20381319031408Z"), None);
    }
}
