//! `waypost login ADDR` and `waypost context list|use|remove`: the CLI on another machine than
//! the server (see context.rs for the file).
//!
//! Login trusts the server's CA either from `--ca FILE` or like ssh trusts a host key: it fetches
//! the CA over a connection it does not verify (`GET /v1/ca.pem`, the one route without a
//! token), checks that the server's certificate is signed by it for the address given, shows its
//! SHA-256 fingerprint and asks the user to confirm (`--yes`: without asking, for scripts). Only
//! then is the admin token sent, over a connection that trusts exactly that CA; a token the
//! server refuses saves nothing.

use super::{TableOrJson, print_table, read_ca};
use crate::client::{ApiClient, ApiError, host_of};
use crate::context::{self, Context};
use crate::server::transport::api::CA_PATH;
use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, Subcommand};
use std::io::{BufRead as _, IsTerminal as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The API port of `waypost server run --api-addr` by default, for an ADDR without one.
const DEFAULT_API_PORT: u16 = 9702;
/// How long fetching the CA may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest CA answer read (a PEM certificate is about 1 KiB).
const MAX_CA_BYTES: usize = 64 * 1024;

#[derive(Args)]
pub struct LoginArgs {
    /// The server's API: HOST:PORT (`https://` allowed; the port defaults to 9702). HOST must be
    /// in the server's certificate: `server run --tls-san HOST`.
    addr: String,
    /// An admin token (`waypost token create --admin` where one works). Default: asked on the
    /// terminal without echo, or one line read from stdin when it is not a terminal.
    #[arg(long)]
    token: Option<String>,
    /// Trust this CA certificate (PEM: the server's DATA_DIR/ca.pem). Default: fetch it from the
    /// server and ask to confirm its SHA-256 fingerprint.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The new context's name (replaces one of that name). Default: the server's host name.
    #[arg(long)]
    name: Option<String>,
    /// Trust the fetched CA without asking (for scripts: compare the fingerprint shown with the
    /// server's another way, or use --ca).
    #[arg(short = 'y', long)]
    yes: bool,
}

#[derive(Subcommand)]
pub enum ContextCmd {
    /// List the contexts: NAME, ADDR (the API), the current one marked with *.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = TableOrJson::Table)]
        output: TableOrJson,
    },
    /// Make NAME the current context (what the CLI uses unless WAYPOST_ADDR etc. say otherwise).
    Use { name: String },
    /// Forget context NAME here (its admin token is not revoked: `waypost token revoke` does
    /// that).
    Remove { name: String },
}

pub async fn login(a: LoginArgs) -> Result<()> {
    let addr = normalize_addr(&a.addr)?;
    let name = match a.name {
        Some(n) => n,
        None => default_name(&addr)?,
    };
    if !context::valid_name(&name) {
        bail!(
            "invalid --name {name:?}: use 1-63 letters, digits, '.', '_' or '-', not starting with \
             '-' or '.'"
        );
    }
    let ca_pem = match &a.ca {
        Some(file) => read_ca(&file.to_string_lossy())?,
        None => {
            let ca_pem = fetch_ca_unverified(&addr).await?;
            let fp = fingerprint(&ca_pem)?;
            check_signed_by(&addr, &ca_pem).await?;
            confirm(&addr, &fp, a.yes)?;
            ca_pem
        }
    };
    let token = match a.token {
        Some(t) => t.trim().to_string(),
        None => read_token(&addr)?,
    };
    if token.is_empty() {
        bail!("no admin token given; nothing was saved");
    }
    // The one API call: the token works, and the answer says where entrypoints connect.
    let client = ApiClient::new(&addr, Some(token.clone()), &ca_pem)?;
    let server: serde_json::Value = match client.get("/v1/server").await {
        Ok(v) => v,
        Err(e) => {
            if let Some(api) = e.downcast_ref::<ApiError>() {
                bail!(
                    "the server at {addr} refused the token: {}; nothing was saved",
                    api.message
                );
            }
            return Err(e.context(format!("logging in to {addr}; nothing was saved")));
        }
    };
    let ctx = Context {
        api_addr: addr.clone(),
        ca_pem,
        admin_token: token,
        control_addr: server["control_addr"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    };
    let path = context::save_named(&name, &ctx, true)?;
    println!(
        "logged in to {addr} (waypost {}): context {name}, now current, in {}",
        server["version"].as_str().unwrap_or("?"),
        path.display()
    );
    Ok(())
}

pub fn context(cmd: ContextCmd) -> Result<()> {
    let all = context::load_all()?;
    let unknown =
        |name: &str| anyhow!("no context named {name:?} (`waypost context list` shows them)");
    match cmd {
        ContextCmd::List { output } => {
            let current = all.current().map(|(n, _)| n.to_string());
            if output == TableOrJson::Json {
                let list: Vec<_> = all
                    .contexts
                    .iter()
                    .map(|(n, c)| {
                        serde_json::json!({
                            "name": n,
                            "api_addr": c.api_addr,
                            "control_addr": c.control_addr,
                            "current": current.as_deref() == Some(n.as_str()),
                        })
                    })
                    .collect();
                let doc = serde_json::json!({ "current": current, "contexts": list });
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            let mut rows = vec![["CURRENT", "NAME", "ADDR"].map(String::from).to_vec()];
            for (n, c) in &all.contexts {
                let mark = if current.as_deref() == Some(n.as_str()) {
                    "*"
                } else {
                    ""
                };
                rows.push(vec![mark.to_string(), n.clone(), c.api_addr.clone()]);
            }
            print_table(&rows);
        }
        ContextCmd::Use { name } => {
            let (addr, _) = context::update(|all| {
                let addr = all
                    .contexts
                    .get(&name)
                    .ok_or_else(|| unknown(&name))?
                    .api_addr
                    .clone();
                all.current = Some(name.clone());
                Ok(addr)
            })?;
            println!("now using context {name} ({addr})");
        }
        ContextCmd::Remove { name } => {
            let (was_current, _) = context::update(|all| {
                all.contexts.remove(&name).ok_or_else(|| unknown(&name))?;
                let was_current = all.current.as_deref() == Some(name.as_str());
                if was_current {
                    all.current = None;
                }
                Ok(was_current)
            })?;
            if was_current {
                println!(
                    "removed context {name}, the current one: choose another with `waypost \
                     context use NAME`"
                );
            } else {
                println!("removed context {name}");
            }
        }
    }
    Ok(())
}

/// `host:port` from what a user types: `https://` and a trailing `/` dropped, the default API
/// port added when there is none, a bare IPv6 address bracketed.
fn normalize_addr(s: &str) -> Result<String> {
    let t = s.trim();
    if let Some(rest) = t.strip_prefix("http://") {
        bail!("the waypost API is HTTPS only: give {rest:?}");
    }
    let t = t
        .strip_prefix("https://")
        .unwrap_or(t)
        .trim_end_matches('/');
    let addr = match t.matches(':').count() {
        0 => format!("{t}:{DEFAULT_API_PORT}"),
        1 => t.to_string(),
        // More than one colon: IPv6, bracketed with a port, bracketed alone, or bare.
        _ if t.starts_with('[') && t.ends_with(']') => format!("{t}:{DEFAULT_API_PORT}"),
        _ if t.starts_with('[') => t.to_string(),
        _ => format!("[{t}]:{DEFAULT_API_PORT}"),
    };
    host_of(&addr).with_context(|| format!("invalid server address {s:?}"))?;
    Ok(addr)
}

/// A context name from the server's host: the host with what a name cannot hold made `-`.
fn default_name(addr: &str) -> Result<String> {
    let host = host_of(addr)?;
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_start_matches(['-', '.']).to_string();
    if !context::valid_name(&name) {
        bail!("cannot make a context name of host {host:?}: give one with --name");
    }
    Ok(name)
}

/// The server's CA (PEM), from a TLS connection that accepts any certificate: whatever comes
/// back is only trusted once the user confirmed its fingerprint.
async fn fetch_ca_unverified(addr: &str) -> Result<String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_ca_inner(addr))
        .await
        .map_err(|_| anyhow!("the server at {addr} did not answer within {FETCH_TIMEOUT:?}"))?
}

async fn fetch_ca_inner(addr: &str) -> Result<String> {
    use http_body_util::BodyExt as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = rustls::pki_types::ServerName::try_from(host_of(addr)?.to_string())
        .with_context(|| format!("{addr:?} has no valid host name or IP address"))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the waypost API at {addr}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(server_name, tcp)
        .await
        .with_context(|| format!("TLS with {addr} failed (is it the waypost API port?)"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(CA_PATH)
        .header(hyper::header::HOST, addr)
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!(
            "the server at {addr} did not give its CA certificate ({}); pass it with --ca FILE \
             (the server's DATA_DIR/ca.pem)",
            resp.status()
        );
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_CA_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the CA certificate from {addr}: {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).context("the server's CA certificate is not text")
}

/// The SHA-256 of the first certificate's DER, as `openssl x509 -fingerprint -sha256` prints
/// it (upper-case hex pairs joined by `:`), so the two can be compared by eye.
pub fn fingerprint(ca_pem: &str) -> Result<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .next()
        .context("the server's CA holds no PEM certificate")?
        .context("the server's CA certificate is not valid PEM")?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    Ok(digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// The server's certificate is signed by `ca_pem` and valid for the host of `addr`: otherwise
/// trusting this CA would not work (or it is not this server's).
async fn check_signed_by(addr: &str, ca_pem: &str) -> Result<()> {
    let client = ApiClient::new(addr, None, ca_pem)?;
    match client.request(hyper::Method::GET, CA_PATH, None).await {
        Ok((status, _)) if status.is_success() => Ok(()),
        Ok((status, _)) => bail!("the server at {addr} answered {status} for its CA certificate"),
        Err(e) => {
            let host = host_of(addr).unwrap_or(addr);
            bail!(
                "the server's certificate does not check out against the CA it serves ({e:#}); \
                 if {host} is not one of its names, restart it with `--tls-san {host}`"
            )
        }
    }
}

/// Asks the user to trust the CA with fingerprint `fp`; `yes`: trusted without asking.
fn confirm(addr: &str, fp: &str, yes: bool) -> Result<()> {
    let stdin = std::io::stdin();
    if !yes && !stdin.is_terminal() {
        // One line: the fingerprint is in the error, so it can still be checked and --yes given.
        bail!(
            "cannot ask whether to trust the CA of {addr} (SHA-256 {fp}): stdin is not a \
             terminal; pass --ca FILE (the server's DATA_DIR/ca.pem), or --yes to trust it"
        );
    }
    eprintln!("The CA certificate of the waypost server at {addr} has the SHA-256 fingerprint");
    eprintln!("  {fp}");
    eprintln!(
        "On the server: openssl x509 -in DATA_DIR/ca.pem -noout -fingerprint -sha256 shows it."
    );
    if yes {
        eprintln!("Trusting it (--yes).");
        return Ok(());
    }
    eprint!("Trust it and log in? [y/N] ");
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => bail!("not logged in: the CA was not trusted"),
    }
}

/// The admin token from the terminal (not echoed) or, when stdin is not one, its first line.
fn read_token(addr: &str) -> Result<String> {
    let stdin = std::io::stdin();
    let line = if stdin.is_terminal() {
        eprint!("Admin token for {addr}: ");
        read_line_quietly()?
    } else {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the admin token from stdin")?;
        line
    };
    Ok(line.trim().to_string())
}

/// One line from the terminal on stdin without echoing it.
fn read_line_quietly() -> Result<String> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin)
        .map_err(std::io::Error::from)
        .context("reading the terminal settings")?;
    let mut quiet = saved.clone();
    // No echo, but the Enter still shows. No signals either: Ctrl-C arrives as a byte, so the
    // settings below are always restored (a killed process would leave the terminal silent).
    quiet
        .local_modes
        .remove(LocalModes::ECHO | LocalModes::ISIG);
    quiet.local_modes.insert(LocalModes::ECHONL);
    tcsetattr(&stdin, OptionalActions::Flush, &quiet)
        .map_err(std::io::Error::from)
        .context("turning off the terminal's echo")?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, OptionalActions::Flush, &saved);
    read.context("reading the admin token")?;
    if line.contains(['\x03', '\x1c']) {
        bail!("cancelled; nothing was saved");
    }
    Ok(line)
}

/// Accepts any server certificate (only for fetching the CA whose fingerprint the user then
/// checks); the handshake's signatures are still verified, with the certificate presented.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalised() {
        assert_eq!(normalize_addr("example.com").unwrap(), "example.com:9702");
        assert_eq!(
            normalize_addr("https://example.com:1/").unwrap(),
            "example.com:1"
        );
        assert_eq!(normalize_addr("10.0.0.5:9702").unwrap(), "10.0.0.5:9702");
        assert_eq!(normalize_addr("[::1]:7").unwrap(), "[::1]:7");
        assert_eq!(normalize_addr("[::1]").unwrap(), "[::1]:9702");
        assert_eq!(normalize_addr("::1").unwrap(), "[::1]:9702");
        assert!(normalize_addr("http://example.com").is_err());
        assert!(normalize_addr("example.com:x").is_err());
    }

    #[test]
    fn default_names_come_from_the_host() {
        assert_eq!(
            default_name("prod.example.com:9702").unwrap(),
            "prod.example.com"
        );
        assert_eq!(default_name("10.0.0.5:1").unwrap(), "10.0.0.5");
        assert_eq!(default_name("[::1]:1").unwrap(), "1");
    }

    #[test]
    fn fingerprints_look_like_openssl_s() {
        let ca = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let fp = fingerprint(&ca.cert.pem()).unwrap();
        let want = ring::digest::digest(&ring::digest::SHA256, ca.cert.der());
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert_eq!(
            fp.replace(':', "").to_lowercase(),
            crate::util::hex(want.as_ref())
        );
        assert!(fingerprint("no PEM here").is_err());
    }
}
