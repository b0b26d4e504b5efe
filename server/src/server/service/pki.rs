//! The server's own small PKI: a CA minted on first start (ECDSA P-256, long-lived) and a server
//! certificate signed by it for the control and API listeners. Stored in the `meta` table; the
//! CA certificate is also written to `DATA_DIR/ca.pem` for curl and friends.
//!
//! The CA is never regenerated (every token handed out embeds trust in it). The server
//! certificate is re-issued on start when its SAN set changed or it is close to expiry. Replicas
//! sharing a PostgreSQL share the CA (see [`load_or_create`]); each also signs itself a client
//! certificate for the replica-to-replica hop (transport/peer.rs), which the peer listeners
//! require.

use crate::server::service::auth;
use crate::server::store::{self, Db};
use crate::util;
use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// CA lifetime: long enough never to be a chore (entrypoints embed it).
const CA_YEARS: i64 = 20;
/// Server certificate lifetime; it is re-issued on start within [`RENEW_BEFORE_DAYS`] of expiry.
const SERVER_DAYS: i64 = 825;
const RENEW_BEFORE_DAYS: i64 = 30;

pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// This replica's client certificate for the replica-to-replica hop (transport/peer.rs),
    /// signed by the CA at every start and never stored: only a process that can read the CA key
    /// from the database — a replica — can make one.
    pub peer_cert_pem: String,
    pub peer_key_pem: String,
}

/// The date `days` after the epoch, in rcgen's type (from the `time` crate, which rcgen does not
/// re-export; hence a macro rather than a function whose signature would name it).
macro_rules! date {
    ($days:expr) => {{
        let (y, m, d) = util::civil_from_days($days);
        rcgen::date_time_ymd(y as i32, m as u8, d as u8)
    }};
}

fn ca_params(cn: &str, not_before_days: i64) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "waypost");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = date!(not_before_days);
    p.not_after = date!(not_before_days + CA_YEARS * 365);
    Ok(p)
}

/// Loads the PKI from the database, creating what is missing. `sans` is the full wanted SAN
/// list of the server certificate (order does not matter).
///
/// The CA is the cluster's: replicas sharing a database share it (the first to start mints it,
/// in a transaction that serialises the others, which then load it), so one `WAYPOST_CA` and one
/// CLI context trust every replica. The server certificate is stored on SQLite (one server);
/// on PostgreSQL each replica signs its own at start (replicas on other hosts have other names,
/// and a shared one would be re-issued back and forth).
pub fn load_or_create(db: &Db, sans: &[String]) -> Result<Pki> {
    db.transaction(store::Begin::Immediate, |db| load_or_create_in(db, sans))
}

fn load_or_create_in(db: &Db, sans: &[String]) -> Result<Pki> {
    let persist_server_cert = db.backend() == store::Backend::Sqlite;
    let today = util::now_ms() / 86_400_000;
    // ---- CA ----
    let (ca_pem, ca_key_pem, ca_cn) = match (
        store::meta_get(db, "ca_cert_pem")?,
        store::meta_get(db, "ca_key_pem")?,
        store::meta_get(db, "ca_cn")?,
    ) {
        (Some(c), Some(k), Some(n)) => (c, k, n),
        _ => {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            // A per-install name, so two waypost CAs on one machine are told apart.
            let cn = format!("waypost CA {}", util::hex(&auth::random_bytes::<4>()));
            // Backdated a day for clocks that lag.
            let params = ca_params(&cn, today - 1)?;
            let cert = params.self_signed(&key)?;
            store::meta_set(db, "ca_cert_pem", &cert.pem())?;
            store::meta_set(db, "ca_key_pem", &key.serialize_pem())?;
            store::meta_set(db, "ca_cn", &cn)?;
            store::meta_set(db, "ca_not_before_days", &(today - 1).to_string())?;
            tracing::info!(cn, "created a new CA");
            (cert.pem(), key.serialize_pem(), cn)
        }
    };

    // ---- server certificate ----
    let mut wanted: Vec<String> = sans.to_vec();
    wanted.sort();
    wanted.dedup();
    let wanted_str = wanted.join(",");
    let not_after: i64 = store::meta_get(db, "server_not_after_days")?
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let existing = match (
        persist_server_cert,
        store::meta_get(db, "server_cert_pem")?,
        store::meta_get(db, "server_key_pem")?,
        store::meta_get(db, "server_sans")?,
    ) {
        (false, ..) => None,
        (true, Some(c), Some(k), Some(s))
            if s == wanted_str && not_after - today > RENEW_BEFORE_DAYS =>
        {
            Some((c, k))
        }
        (true, Some(_), _, Some(s)) => {
            tracing::info!(
                old = s,
                new = wanted_str,
                "re-issuing the server certificate"
            );
            None
        }
        _ => None,
    };
    let (server_cert_pem, server_key_pem) = match existing {
        Some(pair) => pair,
        None => {
            let ca_key = KeyPair::from_pem(&ca_key_pem).context("the stored CA key is invalid")?;
            let ca_nb: i64 = store::meta_get(db, "ca_not_before_days")?
                .and_then(|s| s.parse().ok())
                .unwrap_or(today - 1);
            // Rebuilt with the same subject and key, the issuer matches the stored CA cert.
            let issuer = Issuer::new(ca_params(&ca_cn, ca_nb)?, ca_key);
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(wanted.clone())
                .context("invalid --tls-san (must be a DNS name or an IP address)")?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "waypost");
            dn.push(DnType::CommonName, "waypost server");
            params.distinguished_name = dn;
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            params.not_before = date!(today - 1);
            params.not_after = date!(today + SERVER_DAYS);
            let cert = params.signed_by(&key, &issuer)?;
            if !persist_server_cert {
                let (peer_cert_pem, peer_key_pem) =
                    peer_client_cert(&ca_key_pem, &ca_cn, ca_nb, today)?;
                return Ok(Pki {
                    ca_pem,
                    server_cert_pem: cert.pem(),
                    server_key_pem: key.serialize_pem(),
                    peer_cert_pem,
                    peer_key_pem,
                });
            }
            store::meta_set(db, "server_cert_pem", &cert.pem())?;
            store::meta_set(db, "server_key_pem", &key.serialize_pem())?;
            store::meta_set(db, "server_sans", &wanted_str)?;
            store::meta_set(
                db,
                "server_not_after_days",
                &(today + SERVER_DAYS).to_string(),
            )?;
            (cert.pem(), key.serialize_pem())
        }
    };
    let ca_nb: i64 = store::meta_get(db, "ca_not_before_days")?
        .and_then(|s| s.parse().ok())
        .unwrap_or(today - 1);
    let (peer_cert_pem, peer_key_pem) = peer_client_cert(&ca_key_pem, &ca_cn, ca_nb, today)?;
    Ok(Pki {
        ca_pem,
        server_cert_pem,
        server_key_pem,
        peer_cert_pem,
        peer_key_pem,
    })
}

/// A client certificate (ClientAuth only) signed by the CA, for this replica's connections to
/// other replicas' peer listeners. Valid from yesterday for [`SERVER_DAYS`]; made anew at start.
fn peer_client_cert(
    ca_key_pem: &str,
    ca_cn: &str,
    ca_nb: i64,
    today: i64,
) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("the stored CA key is invalid")?;
    let issuer = Issuer::new(ca_params(ca_cn, ca_nb)?, ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "waypost");
    dn.push(DnType::CommonName, PEER_CLIENT_CN);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = date!(today - 1);
    params.not_after = date!(today + SERVER_DAYS);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The common name of replicas' client certificates.
pub const PEER_CLIENT_CN: &str = "waypost replica";

/// The peer listener's TLS config: the server certificate, and a client certificate signed by
/// the CA required of every connection (a replica's; see [`Pki::peer_cert_pem`]).
pub fn peer_server_config(pki: &Pki, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&pki.ca_pem)?),
        provider.clone(),
    )
    .build()
    .context("building the replica certificate verifier")?;
    let certs = CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes())
        .context("parsing the server key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The client side of the hop: trusts the CA, presents this replica's client certificate.
pub fn peer_client_config(pki: &Pki, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
    let certs = CertificateDer::pem_slice_iter(pki.peer_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the replica certificate")?;
    let key = PrivateKeyDer::from_pem_slice(pki.peer_key_pem.as_bytes())
        .context("parsing the replica key")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots(&pki.ca_pem)?)
    .with_client_auth_cert(certs, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("parsing the CA certificate")?)
            .context("adding the CA certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "the CA contains no PEM certificate");
    Ok(roots)
}

/// The SANs every server certificate has, plus the host name and `extra` (`--tls-san`).
pub fn wanted_sans(extra: &[String]) -> Vec<String> {
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let host = util::hostname();
    // The host name goes in only if it is a plausible DNS name (rcgen refuses non-IA5 text).
    if host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        sans.push(host.to_ascii_lowercase());
    }
    sans.extend(extra.iter().cloned());
    sans
}

/// A rustls server config with our certificate: TLS 1.3 only, ring, the given ALPN ids.
pub fn server_config(pki: &Pki, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(pki.server_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parsing the server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes())
        .context("parsing the server key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A rustls client config that trusts exactly the CA(s) in `ca_pem`.
pub fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("parsing the CA certificate")?)
            .context("adding the CA certificate")?;
        n += 1;
    }
    anyhow::ensure!(n > 0, "the CA contains no PEM certificate");
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Signs the HTTPS ingress's own certificates (transport/ingress_tls.rs) with the CA: the
/// default one for `*.URL_DOMAIN` and `URL_DOMAIN`, and, where clients refuse a wildcard (see
/// [`IngressSigner::for_host`]), one per app host name. Made at every start from the CA in the
/// database and never stored — like the server certificate on PostgreSQL, each replica mints its
/// own. All its certificates share one key, made at start, so one for a new host name costs a
/// signature, not a key generation.
pub struct IngressSigner {
    issuer: Issuer<'static, KeyPair>,
    key: KeyPair,
    ca_der: CertificateDer<'static>,
    today: i64,
}

impl std::fmt::Debug for IngressSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressSigner").finish_non_exhaustive()
    }
}

impl IngressSigner {
    /// Loads the CA (made by [`load_or_create`], which runs first) from the database.
    pub fn load(db: &Db) -> Result<IngressSigner> {
        let today = util::now_ms() / 86_400_000;
        let (Some(ca_pem), Some(ca_key_pem), Some(ca_cn)) = (
            store::meta_get(db, "ca_cert_pem")?,
            store::meta_get(db, "ca_key_pem")?,
            store::meta_get(db, "ca_cn")?,
        ) else {
            anyhow::bail!("the CA is not in the database yet");
        };
        let ca_nb: i64 = store::meta_get(db, "ca_not_before_days")?
            .and_then(|s| s.parse().ok())
            .unwrap_or(today - 1);
        let ca_key = KeyPair::from_pem(&ca_key_pem).context("the stored CA key is invalid")?;
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .context("parsing the CA certificate")?;
        Ok(IngressSigner {
            // Rebuilt with the same subject and key, the issuer matches the stored CA cert.
            issuer: Issuer::new(ca_params(&ca_cn, ca_nb)?, ca_key),
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
            ca_der,
            today,
        })
    }

    /// A certificate for `names` (DNS names), valid from yesterday for the server certificate's
    /// lifetime ([`SERVER_DAYS`]): the chain (leaf, CA) and its key, for rustls.
    pub fn sign(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let mut params = CertificateParams::new(names.to_vec())
            .context("invalid --url-domain (it must be a DNS name)")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "waypost");
        dn.push(DnType::CommonName, "waypost ingress");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = date!(self.today - 1);
        params.not_after = date!(self.today + SERVER_DAYS);
        let cert = params.signed_by(&self.key, &self.issuer)?;
        let key = PrivateKeyDer::try_from(self.key.serialize_der())
            .map_err(|e| anyhow::anyhow!("the ingress key: {e}"))?;
        Ok((vec![cert.der().clone(), self.ca_der.clone()], key))
    }

    /// The default certificate: `*.DOMAIN` and `DOMAIN` (`--url-domain`, trailing dot removed).
    pub fn wildcard(
        &self,
        domain: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        self.sign(&[format!("*.{d}"), d])
    }

    /// Whether a host under `domain` needs a certificate of its own: clients (OpenSSL, browsers,
    /// rustls) refuse a wildcard directly under a single-label name, so `*.localhost` (the
    /// default URL domain) covers nothing and `web.localhost` gets one made for it.
    pub fn for_host(domain: &str) -> bool {
        !domain.trim_end_matches('.').contains('.')
    }
}
