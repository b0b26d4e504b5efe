//! OTLP/HTTP log export (`--log-export otlp+http://HOST:4318`): every log line the writer
//! stores (service/logs.rs) is forwarded to an OpenTelemetry collector, as protobuf
//! (`Content-Type: application/x-protobuf`) POSTed to `/v1/logs`. See docs/architecture.md,
//! "Logs", and the README's "Exporting logs (OpenTelemetry)".
//!
//! The writer thread never waits for the collector: after each commit it hands the stored lines
//! to [`Exporter::push`], which appends them to a bounded queue under a short lock and wakes the
//! export task. A full queue drops its OLDEST lines (counted): the newest lines are the ones an
//! operator looks for after an outage, and the lines are stored anyway (`waypost logs` has
//! them). The task takes a batch when [`BATCH_LINES`] are queued or the oldest has waited
//! [`BATCH_WAIT`], sends it, and retries that same batch (so order is kept) on connection
//! errors, timeouts, 429 and 5xx with exponential backoff and jitter (`waypost_proto::backoff`,
//! 100 ms doubling up to 30 s), or after the collector's `Retry-After`. Any other answer
//! (a 4xx: the collector will never take this request) drops the batch, counted.
//!
//! Policy is sans-IO ([`Core`]: lines, outcomes and `now` in, batches and deadlines out), tested
//! below with a fake clock; [`run`] is the I/O around it (hyper's HTTP/1.1 client over tokio,
//! tokio-rustls for `otlp+https`).

use crate::server::model::metrics::metrics;
use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use prost::Message as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use waypost_proto::LogStream;

/// Lines the queue holds by default (`WAYPOST_LOG_EXPORT_QUEUE` changes it, for tests and
/// tuning): a minute of a busy fleet's logs (about 1,000 lines/s), so a collector restart loses
/// nothing; 64 Ki lines of 100 bytes are about 12 MiB with their bookkeeping.
pub const QUEUE_LINES: usize = 65_536;
/// Bytes the queue holds at most (data plus [`LINE_COST`] a line), whatever its line cap: lines
/// may be up to 64 KiB each, and 64 Ki of those would be 4 GiB.
pub const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// A queued line's cost beyond its data (the struct, its place in the queue).
const LINE_COST: usize = 96;
/// Lines per export request, at most: the OpenTelemetry SDKs' default batch (512).
pub const BATCH_LINES: usize = 512;
/// Bytes of line data per export request, at most: far below collectors' request limits (the
/// OpenTelemetry Collector's default is 20 MiB); at least one line goes whatever its size.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// A line waits at most this long for more to fill its batch.
pub const BATCH_WAIT: Duration = Duration::from_secs(1);
/// One export request (connect, TLS, send, answer) may take this long, then counts as failed
/// and is retried (`WAYPOST_LOG_EXPORT_TIMEOUT` changes it, for tests and tuning).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured; a longer one is cut to this.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);
/// At most one warning about failing exports per this long (each says how many failed since).
pub const WARN_EVERY: Duration = Duration::from_secs(30);
/// Largest answer body read (an ExportLogsServiceResponse is a few bytes).
const RESPONSE_CAP: usize = 64 * 1024;

/// The queue's line cap (a positive number).
pub const QUEUE_ENV: &str = "WAYPOST_LOG_EXPORT_QUEUE";
/// The request timeout (the duration syntax of every setting).
pub const TIMEOUT_ENV: &str = "WAYPOST_LOG_EXPORT_TIMEOUT";
/// The CA trusted for `otlp+https` (a PEM file, or the PEM text itself); default: the system's.
pub const CA_ENV: &str = "WAYPOST_LOG_EXPORT_CA";
/// Extra request headers, `key=value,key2=value2` (values %-decoded), as
/// `OTEL_EXPORTER_OTLP_HEADERS` takes them: e.g. a collector's `authorization`.
pub const HEADERS_ENV: &str = "WAYPOST_LOG_EXPORT_HEADERS";
/// Where the system's trusted CAs are, in order (Debian/Alpine, Fedora/RHEL, BSD-style).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The OTLP messages the exporter sends and reads, with the field numbers and types of the
/// official definitions (github.com/open-telemetry/opentelemetry-proto: `collector/logs/v1/
/// logs_service.proto`, `logs/v1/logs.proto`, `common/v1/common.proto`,
/// `resource/v1/resource.proto`). Fields waypost never sets are left out where proto3 would not
/// write them anyway (a receiver sees the same bytes); unknown fields of an answer are skipped.
pub mod otlp {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_logs: Vec<ResourceLogs>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsServiceResponse {
        #[prost(message, optional, tag = "1")]
        pub partial_success: Option<ExportLogsPartialSuccess>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportLogsPartialSuccess {
        #[prost(int64, tag = "1")]
        pub rejected_log_records: i64,
        #[prost(string, tag = "2")]
        pub error_message: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceLogs {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_logs: Vec<ScopeLogs>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeLogs {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub log_records: Vec<LogRecord>,
        #[prost(string, tag = "3")]
        pub schema_url: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "2")]
        pub dropped_attributes_count: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(message, repeated, tag = "3")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "4")]
        pub dropped_attributes_count: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(oneof = "any_value::Value", tags = "1, 2, 3, 4, 7")]
        pub value: Option<any_value::Value>,
    }

    pub mod any_value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(string, tag = "1")]
            StringValue(String),
            #[prost(bool, tag = "2")]
            BoolValue(bool),
            #[prost(int64, tag = "3")]
            IntValue(i64),
            #[prost(double, tag = "4")]
            DoubleValue(f64),
            #[prost(bytes = "vec", tag = "7")]
            BytesValue(Vec<u8>),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LogRecord {
        #[prost(fixed64, tag = "1")]
        pub time_unix_nano: u64,
        #[prost(fixed64, tag = "11")]
        pub observed_time_unix_nano: u64,
        /// `SeverityNumber` (an enum: a varint on the wire, as int32); see the `SEVERITY_*`
        /// constants.
        #[prost(int32, tag = "2")]
        pub severity_number: i32,
        #[prost(string, tag = "3")]
        pub severity_text: String,
        #[prost(message, optional, tag = "5")]
        pub body: Option<AnyValue>,
        #[prost(message, repeated, tag = "6")]
        pub attributes: Vec<KeyValue>,
        #[prost(uint32, tag = "7")]
        pub dropped_attributes_count: u32,
        #[prost(fixed32, tag = "8")]
        pub flags: u32,
        #[prost(bytes = "vec", tag = "9")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "10")]
        pub span_id: Vec<u8>,
        #[prost(string, tag = "12")]
        pub event_name: String,
    }

    /// `SeverityNumber` values used here (the first of each range).
    pub const SEVERITY_UNSPECIFIED: i32 = 0;
    pub const SEVERITY_TRACE: i32 = 1;
    pub const SEVERITY_DEBUG: i32 = 5;
    pub const SEVERITY_INFO: i32 = 9;
    pub const SEVERITY_WARN: i32 = 13;
    pub const SEVERITY_ERROR: i32 = 17;

    impl KeyValue {
        pub fn string(key: &str, v: impl Into<String>) -> KeyValue {
            KeyValue {
                key: key.to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(v.into())),
                }),
            }
        }

        pub fn int(key: &str, v: i64) -> KeyValue {
            KeyValue {
                key: key.to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(v)),
                }),
            }
        }

        pub fn bool(key: &str, v: bool) -> KeyValue {
            KeyValue {
                key: key.to_string(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::BoolValue(v)),
                }),
            }
        }
    }
}

// ---- settings ----------------------------------------------------------------------------------

/// Where to send: the parsed `--log-export` URL.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub https: bool,
    /// The host (an IPv6 address without its brackets), for TLS's server name.
    pub host: String,
    /// `host:port` to dial and to send as `Host` (IPv6 in brackets).
    pub authority: String,
    /// The request path: the URL's path with `/v1/logs` appended (unless it ends with it).
    pub path: String,
}

/// OTLP/HTTP's default port.
const DEFAULT_PORT: u16 = 4318;
const LOGS_PATH: &str = "/v1/logs";

impl Target {
    /// `otlp+http://HOST[:PORT][/PATH]` or `otlp+https://…`; the port defaults to 4318 and the
    /// path to `/v1/logs` (a base path gets `/v1/logs` appended, as OTLP exporters do with
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn parse(url: &str) -> Result<Target> {
        let form = "expected otlp+http://HOST[:PORT][/PATH] or otlp+https://…";
        let (https, rest) = if let Some(r) = url.strip_prefix("otlp+http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("otlp+https://") {
            (true, r)
        } else if url.starts_with("http://") || url.starts_with("https://") {
            bail!("{url:?}: write otlp+{url} (the otlp+ prefix names the protocol); {form}")
        } else if let Some((scheme, _)) = url.split_once("://") {
            bail!("{url:?}: unsupported scheme {scheme:?}; {form}")
        } else {
            bail!("{url:?} is not a URL; {form}")
        };
        if rest.contains(['?', '#']) {
            bail!("{url:?}: a query or fragment is not supported; {form}");
        }
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if hostport.contains('@') {
            bail!(
                "{url:?}: credentials in the URL are not supported; send them as a header \
                 ({HEADERS_ENV}=authorization=…)"
            );
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .with_context(|| format!("{url:?}: unclosed [ in the host"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| anyhow!("{url:?}: {h:?} is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .with_context(|| format!("{url:?}: expected :PORT after ]"))?,
                ),
            };
            (h, port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            bail!("{url:?} has no host; {form}");
        }
        if !hostport.starts_with('[')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            bail!("{url:?}: {host:?} is not a host name or IP address");
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => bail!("{url:?}: {p:?} is not a port (1-65535)"),
            },
        };
        let path = path.trim_end_matches('/');
        let path = if path.ends_with(LOGS_PATH) {
            path.to_string()
        } else {
            format!("{path}{LOGS_PATH}")
        };
        let authority = if hostport.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Target {
            https,
            host: host.to_string(),
            authority,
            path,
        })
    }

    /// The URL as the operator would recognise it (for log lines).
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.path)
    }
}

/// Everything the exporter needs, read once at start ([`Settings::new`]) so a mistake is a
/// start-up error.
pub struct Settings {
    pub target: Target,
    pub queue_lines: usize,
    pub timeout: Duration,
    pub headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Settings {
    /// The exporter for `url` (`--log-export`), with the `WAYPOST_LOG_EXPORT_*` settings read
    /// through `env` (the process's environment outside tests).
    pub fn new(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Settings> {
        let target = Target::parse(url)?;
        let var = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let queue_lines = match var(QUEUE_ENV) {
            None => QUEUE_LINES,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => bail!("{QUEUE_ENV}={v:?}: expected a positive number of lines"),
            },
        };
        let timeout = match var(TIMEOUT_ENV) {
            None => REQUEST_TIMEOUT,
            Some(v) => match crate::util::parse_duration(v.trim()) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => bail!("{TIMEOUT_ENV}={v:?}: must be more than 0"),
                Err(e) => bail!("{TIMEOUT_ENV}={v:?}: {e}"),
            },
        };
        let headers = match var(HEADERS_ENV) {
            None => Vec::new(),
            Some(v) => parse_headers(&v)?,
        };
        let tls = if target.https {
            let pem = match var(CA_ENV) {
                Some(v) if v.trim_start().starts_with("-----BEGIN") => v,
                Some(path) => std::fs::read_to_string(path.trim())
                    .with_context(|| format!("{CA_ENV}: reading {}", path.trim()))?,
                None => system_bundle().with_context(|| {
                    format!("otlp+https: no system CA bundle found; set {CA_ENV}")
                })?,
            };
            let cfg = tls_config(&pem, var(CA_ENV).is_some())?;
            let name = ServerName::try_from(target.host.clone())
                .with_context(|| format!("{:?} is not a valid TLS server name", target.host))?;
            Some((TlsConnector::from(cfg), name))
        } else {
            None
        };
        Ok(Settings {
            target,
            queue_lines,
            timeout,
            headers,
            tls,
        })
    }
}

/// The first readable system bundle.
fn system_bundle() -> Option<String> {
    let from_env = std::env::var("SSL_CERT_FILE")
        .ok()
        .filter(|p| !p.is_empty());
    from_env
        .iter()
        .map(String::as_str)
        .chain(SYSTEM_BUNDLES)
        .find_map(|p| std::fs::read_to_string(p).ok())
}

/// rustls with the CAs of `pem` (TLS 1.3, ring, ALPN http/1.1). `explicit`: the operator named
/// the CA, so one that holds no usable certificate is an error; a system bundle may hold some
/// webpki cannot use, which are skipped as browsers do.
fn tls_config(pem: &str, explicit: bool) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.context("the log-export CA is not valid PEM")?;
        let added = roots.add(cert);
        if explicit {
            added.context("the log-export CA")?;
        }
    }
    if roots.is_empty() {
        bail!("the log-export CA holds no usable certificate");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    // TLS 1.3 only, as everywhere in the server; collectors (Go's crypto/tls) speak it.
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// `key=value,key2=value2`; values %-decoded (the `OTEL_EXPORTER_OTLP_HEADERS` format).
fn parse_headers(s: &str) -> Result<Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("{HEADERS_ENV}: {:?} is not key=value", redact(part)))?;
        let name = hyper::header::HeaderName::from_bytes(k.trim().as_bytes())
            .with_context(|| format!("{HEADERS_ENV}: {:?} is not a header name", k.trim()))?;
        let value = hyper::header::HeaderValue::from_bytes(&percent_decode(v.trim()))
            .with_context(|| format!("{HEADERS_ENV}: the value of {name} is not valid"))?;
        out.push((name, value));
    }
    Ok(out)
}

/// A header pair for an error message, without its value (it may be a credential).
fn redact(part: &str) -> String {
    part.split_once('=').map_or_else(
        || format!("{}…", &part[..part.len().min(8)]),
        |(k, _)| format!("{k}=…"),
    )
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

// ---- lines and their encoding ------------------------------------------------------------------

/// Who logged a line: its OTLP resource. One per instance, shared by its lines.
#[derive(Debug, PartialEq)]
pub struct Origin {
    pub app: String,
    /// "" when the token names none.
    pub deployment: String,
    /// The instance id in hex (as `waypost instances` shows it).
    pub instance: String,
    /// The instance's host name as its Hello said ("" if unknown).
    pub host: String,
}

/// One stored line, as the writer hands it over.
#[derive(Debug)]
pub struct Line {
    pub origin: Arc<Origin>,
    /// A `LogStream` value.
    pub stream: i32,
    /// The entrypoint's timestamp (µs since the Unix epoch; 0 or less: unknown).
    pub time_us: i64,
    /// When the server received it (ns since the Unix epoch).
    pub observed_ns: u64,
    pub data: Vec<u8>,
    /// A piece of a longer line (cut at 64 KiB, or shipped without its newline).
    pub truncated: bool,
    /// A marker, not a line: this many lines were lost here (the entrypoint's buffer overflowed).
    pub lost: u64,
}

impl Line {
    fn cost(&self) -> usize {
        self.data.len() + LINE_COST
    }
}

/// Nanoseconds since the Unix epoch now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The stream's `log.iostream` (semantic conventions: stdout or stderr; the entrypoint writes
/// its own lines to stderr) and waypost's own name of it (`waypost.stream`, as `logs --stream`
/// takes it).
fn stream_names(stream: i32) -> (&'static str, &'static str) {
    match LogStream::try_from(stream) {
        Ok(LogStream::Stdout) => ("stdout", "stdout"),
        Ok(LogStream::Stderr) => ("stderr", "stderr"),
        Ok(LogStream::Entrypoint) => ("stderr", "entrypoint"),
        // Stored as 0 (stdout) when unknown, see service/logs.rs.
        Err(_) => ("stdout", "stdout"),
    }
}

/// The severity of a line: the entrypoint's own lines start with their level (`INFO child
/// started (pid 12)`); an app's are left unspecified — stderr is not
/// "error" (many runtimes log everything there) and the server cannot know an app's format. A
/// marker of lost lines is a warning.
fn severity(line: &Line) -> (i32, &'static str) {
    if line.lost > 0 {
        return (otlp::SEVERITY_WARN, "WARN");
    }
    if line.stream != LogStream::Entrypoint as i32 {
        return (otlp::SEVERITY_UNSPECIFIED, "");
    }
    match line.data.split(|&b| b == b' ').next() {
        Some(b"TRACE") => (otlp::SEVERITY_TRACE, "TRACE"),
        Some(b"DEBUG") => (otlp::SEVERITY_DEBUG, "DEBUG"),
        Some(b"INFO") => (otlp::SEVERITY_INFO, "INFO"),
        Some(b"WARN") => (otlp::SEVERITY_WARN, "WARN"),
        Some(b"ERROR") => (otlp::SEVERITY_ERROR, "ERROR"),
        _ => (otlp::SEVERITY_UNSPECIFIED, ""),
    }
}

fn resource(o: &Origin) -> otlp::Resource {
    let mut attributes = vec![
        otlp::KeyValue::string("service.name", &o.app),
        otlp::KeyValue::string("service.instance.id", &o.instance),
    ];
    if !o.deployment.is_empty() {
        attributes.push(otlp::KeyValue::string("waypost.deployment", &o.deployment));
    }
    if !o.host.is_empty() {
        attributes.push(otlp::KeyValue::string("host.name", &o.host));
    }
    otlp::Resource {
        attributes,
        dropped_attributes_count: 0,
    }
}

fn record(line: &Line) -> otlp::LogRecord {
    let (iostream, stream) = stream_names(line.stream);
    let mut attributes = vec![
        otlp::KeyValue::string("log.iostream", iostream),
        otlp::KeyValue::string("waypost.stream", stream),
    ];
    if line.truncated {
        attributes.push(otlp::KeyValue::bool("waypost.truncated", true));
    }
    // Not UTF-8: replaced (U+FFFD), so every backend can index and show it; the exact bytes
    // stay in waypost (`waypost logs -o json`).
    let body = if line.lost > 0 {
        attributes.push(otlp::KeyValue::int(
            "waypost.lines_dropped",
            line.lost.min(i64::MAX as u64) as i64,
        ));
        format!("[{} lines dropped]", line.lost)
    } else {
        String::from_utf8_lossy(&line.data).into_owned()
    };
    let (severity_number, severity_text) = severity(line);
    otlp::LogRecord {
        time_unix_nano: u64::try_from(line.time_us)
            .unwrap_or(0)
            .saturating_mul(1000),
        observed_time_unix_nano: line.observed_ns,
        severity_number,
        severity_text: severity_text.to_string(),
        body: Some(otlp::AnyValue {
            value: Some(otlp::any_value::Value::StringValue(body)),
        }),
        attributes,
        ..Default::default()
    }
}

/// One export request for `lines`: a ResourceLogs per instance (in the order each first
/// appears), its lines in their order, under one InstrumentationScope `waypost`.
pub fn encode(lines: &[Line]) -> Vec<u8> {
    let mut index: HashMap<*const Origin, usize> = HashMap::new();
    let mut out: Vec<otlp::ResourceLogs> = Vec::new();
    for line in lines {
        let i = *index.entry(Arc::as_ptr(&line.origin)).or_insert_with(|| {
            out.push(otlp::ResourceLogs {
                resource: Some(resource(&line.origin)),
                scope_logs: vec![otlp::ScopeLogs {
                    scope: Some(otlp::InstrumentationScope {
                        name: "waypost".into(),
                        version: crate::VERSION.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            });
            out.len() - 1
        });
        out[i].scope_logs[0].log_records.push(record(line));
    }
    otlp::ExportLogsServiceRequest { resource_logs: out }.encode_to_vec()
}

// ---- the policy (sans-IO) ----------------------------------------------------------------------

/// What came of one export request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx; `rejected`: lines the collector said it refused (partial success).
    Accepted { rejected: u64 },
    /// Worth another try: no connection, a timeout, 429, 5xx. `retry_after`: the collector's.
    Retry {
        why: String,
        retry_after: Option<Duration>,
    },
    /// Never worth another try (a 4xx other than 429, or another unexpected status).
    Refused { why: String },
}

/// What the task does next with the batch in flight.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Done with it (sent, or dropped and counted).
    Done,
    /// Send it again at this time.
    RetryAt(Instant),
}

/// Something worth a line in the server's log after an outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Failing (at most one per [`WARN_EVERY`]): `why` the latest failed, `failures` since the
    /// last notice.
    Failing { why: String, failures: u64 },
    /// The first success after failures.
    Recovered { failures: u64 },
}

/// The counters of `GET /v1/server`'s `log_export` (and the metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ExportStats {
    /// Lines waiting: queued, plus the batch in flight.
    pub queued: u64,
    /// Lines the collector accepted.
    pub sent: u64,
    /// Lines dropped: the queue was full, the collector refused their request (4xx) or them
    /// (partial success).
    pub dropped: u64,
    /// Export requests that failed (each retried, or its batch dropped).
    pub failed: u64,
}

/// The exporter's policy: the bounded queue, batching, retries with backoff, warning
/// throttling. Time comes in as `now`.
pub struct Core {
    queue: VecDeque<(Instant, Line)>,
    /// Cost of the queued lines (data + [`LINE_COST`] each).
    bytes: usize,
    cap_lines: usize,
    cap_bytes: usize,
    /// Lines of the batch in flight (0: none).
    inflight: usize,
    /// Failures of the batch in flight in a row (the backoff exponent).
    attempts: u32,
    rng: u64,
    /// Failures since the last notice, and when that was (None: not failing).
    unreported: u64,
    warned_at: Option<Instant>,
    failing: bool,
    stats: ExportStats,
}

impl Core {
    /// `cap_lines`: [`QUEUE_LINES`] or the operator's; `seed`: for the jitter (non-zero).
    pub fn new(cap_lines: usize, cap_bytes: usize, seed: u64) -> Core {
        Core {
            queue: VecDeque::new(),
            bytes: 0,
            cap_lines: cap_lines.max(1),
            cap_bytes,
            inflight: 0,
            attempts: 0,
            rng: seed | 1,
            unreported: 0,
            warned_at: None,
            failing: false,
            stats: ExportStats::default(),
        }
    }

    /// Queues stored lines; returns how many (oldest first) were dropped to make room.
    pub fn handle_lines(&mut self, lines: impl IntoIterator<Item = Line>, now: Instant) -> u64 {
        let mut dropped = 0;
        for line in lines {
            let cost = line.cost();
            while !self.queue.is_empty()
                && (self.queue.len() >= self.cap_lines || self.bytes + cost > self.cap_bytes)
            {
                let (_, old) = self.queue.pop_front().expect("not empty");
                self.bytes -= old.cost();
                dropped += 1;
            }
            self.bytes += cost;
            self.queue.push_back((now, line));
        }
        self.stats.dropped += dropped;
        dropped
    }

    /// Whether a batch is due: one is full, or the oldest line has waited [`BATCH_WAIT`].
    fn due(&self, now: Instant) -> bool {
        match self.queue.front() {
            None => false,
            Some((at, _)) => {
                self.queue.len() >= BATCH_LINES
                    || self.bytes >= BATCH_BYTES + LINE_COST * BATCH_LINES
                    || now >= *at + BATCH_WAIT
            }
        }
    }

    /// The next batch to send, if one is due and none is in flight (the caller sends it and
    /// reports with [`Core::handle_outcome`]).
    pub fn poll_batch(&mut self, now: Instant) -> Option<Vec<Line>> {
        if self.inflight > 0 || !self.due(now) {
            return None;
        }
        let mut batch = Vec::new();
        let mut data = 0;
        while let Some((_, l)) = self.queue.front() {
            if batch.len() >= BATCH_LINES
                || (!batch.is_empty() && data + l.data.len() > BATCH_BYTES)
            {
                break;
            }
            let (_, l) = self.queue.pop_front().expect("not empty");
            self.bytes -= l.cost();
            data += l.data.len();
            batch.push(l);
        }
        self.inflight = batch.len();
        self.attempts = 0;
        Some(batch)
    }

    /// When a batch will be due (None: nothing queued, or one in flight: the caller waits for
    /// its outcome, or for new lines).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.inflight > 0 {
            return None;
        }
        self.queue.front().map(|(at, _)| *at + BATCH_WAIT)
    }

    /// The batch in flight came back with `outcome`.
    pub fn handle_outcome(&mut self, outcome: &Outcome, now: Instant) -> (Step, Option<Notice>) {
        let n = self.inflight as u64;
        let (step, why) = match outcome {
            Outcome::Accepted { rejected } => {
                let rejected = (*rejected).min(n);
                self.stats.sent += n - rejected;
                self.stats.dropped += rejected;
                self.inflight = 0;
                let notice = if rejected > 0 {
                    self.failure(
                        format!("the collector refused {rejected} of {n} lines"),
                        now,
                    )
                } else if std::mem::take(&mut self.failing) {
                    self.warned_at = None;
                    Some(Notice::Recovered {
                        failures: std::mem::take(&mut self.unreported),
                    })
                } else {
                    None
                };
                return (Step::Done, notice);
            }
            Outcome::Retry { why, retry_after } => {
                let delay = match retry_after {
                    Some(d) => (*d).min(RETRY_AFTER_MAX),
                    None => waypost_proto::backoff::delay(self.attempts, &mut self.rng),
                };
                self.attempts = self.attempts.saturating_add(1);
                (Step::RetryAt(now + delay), why.clone())
            }
            Outcome::Refused { why } => {
                self.stats.dropped += n;
                self.inflight = 0;
                (Step::Done, format!("{why}; dropped {n} lines"))
            }
        };
        self.stats.failed += 1;
        let notice = self.failure(why, now);
        (step, notice)
    }

    /// Counts a failure; a notice if none was given for [`WARN_EVERY`].
    fn failure(&mut self, why: String, now: Instant) -> Option<Notice> {
        self.failing = true;
        self.unreported += 1;
        if self.warned_at.is_some_and(|at| now < at + WARN_EVERY) {
            return None;
        }
        self.warned_at = Some(now);
        Some(Notice::Failing {
            why,
            failures: std::mem::take(&mut self.unreported),
        })
    }

    pub fn stats(&self) -> ExportStats {
        ExportStats {
            queued: (self.queue.len() + self.inflight) as u64,
            ..self.stats
        }
    }
}

// ---- the exporter (I/O) ------------------------------------------------------------------------

struct Shared {
    core: Mutex<Core>,
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer's handle on the exporter (cheap to clone).
#[derive(Clone)]
pub struct Exporter {
    shared: Arc<Shared>,
}

impl Exporter {
    /// Starts the export task on the current runtime (call from inside it).
    pub fn start(settings: Settings) -> Exporter {
        let mut seed = [0u8; 8];
        // The jitter needs no secrecy; a failure leaves a fixed (still valid) seed.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::new(
                settings.queue_lines,
                QUEUE_BYTES,
                u64::from_le_bytes(seed),
            )),
            wake: Notify::new(),
        });
        tracing::info!(
            collector = settings.target.url(),
            queue = settings.queue_lines,
            "exporting stored log lines over OTLP/HTTP"
        );
        tokio::spawn(run(shared.clone(), Client::new(settings)));
        Exporter { shared }
    }

    /// Queues stored lines for export, never waiting for the collector (the lock is held only
    /// to append).
    pub fn push(&self, lines: Vec<Line>) {
        if lines.is_empty() {
            return;
        }
        let (dropped, queued) = {
            let mut core = self.shared.lock();
            let d = core.handle_lines(lines, Instant::now());
            (d, core.stats().queued)
        };
        let m = metrics();
        m.log_export_queue.set(queued as i64);
        if dropped > 0 {
            m.log_export_dropped.inc_by(dropped);
        }
        self.shared.wake.notify_one();
    }

    pub fn stats(&self) -> ExportStats {
        self.shared.lock().stats()
    }
}

/// The export task: waits for a due batch, sends it until it is done, and so on.
async fn run(shared: Arc<Shared>, mut client: Client) {
    loop {
        let batch = loop {
            let (batch, deadline) = {
                let mut core = shared.lock();
                (core.poll_batch(Instant::now()), core.poll_timeout())
            };
            if let Some(b) = batch {
                break b;
            }
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = shared.wake.notified() => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => shared.wake.notified().await,
            }
        };
        let body = Bytes::from(encode(&batch));
        drop(batch);
        loop {
            let outcome = client.export(body.clone()).await;
            let (step, notice, stats) = {
                let mut core = shared.lock();
                let before = core.stats();
                let (step, notice) = core.handle_outcome(&outcome, Instant::now());
                (step, notice, (before, core.stats()))
            };
            record_metrics(stats.0, stats.1);
            match notice {
                Some(Notice::Failing { why, failures }) => tracing::warn!(
                    collector = client.target.url(),
                    error = why,
                    failures,
                    "log export failing"
                ),
                Some(Notice::Recovered { failures }) => tracing::info!(
                    collector = client.target.url(),
                    failures,
                    "log export works again"
                ),
                None => {}
            }
            match step {
                Step::Done => break,
                Step::RetryAt(at) => {
                    tracing::debug!(error = ?outcome, "log export: retrying");
                    tokio::time::sleep_until(at.into()).await
                }
            }
        }
    }
}

/// The metrics move as the stats did.
fn record_metrics(before: ExportStats, after: ExportStats) {
    let m = metrics();
    m.log_export_lines.inc_by(after.sent - before.sent);
    m.log_export_dropped.inc_by(after.dropped - before.dropped);
    m.log_export_failures.inc_by(after.failed - before.failed);
    m.log_export_queue.set(after.queued as i64);
}

/// The collector's HTTP client: one HTTP/1.1 connection, kept while the collector keeps it.
struct Client {
    target: Target,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Client {
    fn new(s: Settings) -> Client {
        Client {
            target: s.target,
            tls: s.tls,
            timeout: s.timeout,
            headers: s.headers,
            conn: None,
        }
    }

    /// One export request, within the timeout (after which the connection is dropped).
    async fn export(&mut self, body: Bytes) -> Outcome {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(body)).await {
            Ok(o) => o,
            Err(_) => {
                self.conn = None;
                Outcome::Retry {
                    why: format!("no answer within {timeout:?}"),
                    retry_after: None,
                }
            }
        }
    }

    async fn exchange(&mut self, body: Bytes) -> Outcome {
        let retry = |why: String| Outcome::Retry {
            why,
            retry_after: None,
        };
        // A kept connection the collector closed meanwhile fails at once: then once more on a
        // new one (OTLP delivery is at least once, so a repeat is allowed).
        for _ in 0..2 {
            let fresh = match &self.conn {
                Some(c) if !c.is_closed() => false,
                _ => {
                    match self.connect().await {
                        Ok(c) => self.conn = Some(c),
                        Err(e) => return retry(format!("{e:#}")),
                    }
                    true
                }
            };
            let sender = self.conn.as_mut().expect("connected above");
            let mut req = hyper::Request::post(&self.target.path)
                .header(hyper::header::HOST, &self.target.authority)
                .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
                .header(
                    hyper::header::USER_AGENT,
                    concat!("waypost/", env!("CARGO_PKG_VERSION")),
                );
            for (k, v) in &self.headers {
                req = req.header(k, v);
            }
            let req = match req.body(Full::new(body.clone())) {
                Ok(r) => r,
                Err(e) => return Outcome::Refused { why: e.to_string() },
            };
            let sent = match sender.ready().await {
                Ok(()) => sender.send_request(req).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(resp) => return self.answer(resp).await,
                Err(e) => {
                    self.conn = None;
                    if fresh {
                        return retry(format!("sending to {}: {e}", self.target.authority));
                    }
                }
            }
        }
        retry("the connection kept closing".into())
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let a = &self.target.authority;
        let tcp = TcpStream::connect(a)
            .await
            .with_context(|| format!("connecting to {a}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS with {a} (is {CA_ENV} right?)"))?;
                handshake(tls).await
            }
        }
    }

    /// Reads the answer: its status, `Retry-After`, and a partial success.
    async fn answer(&mut self, resp: hyper::Response<hyper::body::Incoming>) -> Outcome {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = http_body_util::Limited::new(resp.into_body(), RESPONSE_CAP)
            .collect()
            .await
            .map(|b| b.to_bytes());
        if body.is_err() {
            self.conn = None;
        }
        classify(status.as_u16(), retry_after, body.as_deref().unwrap_or(&[]))
    }
}

async fn handshake<S>(io: S) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// What an answer means: 2xx success, possibly partial; 429 and every 5xx worth another try (the
/// OTLP specification names 429, 502, 503 and 504; the other 5xx are retried too: a server error
/// may pass, a request refusal never does); every other status refused.
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
    match status {
        200..=299 => {
            let rejected = otlp::ExportLogsServiceResponse::decode(body)
                .ok()
                .and_then(|r| r.partial_success)
                .map_or(0, |p| p.rejected_log_records.max(0) as u64);
            Outcome::Accepted { rejected }
        }
        429 | 500..=599 => Outcome::Retry {
            why: format!("the collector answered {status}"),
            retry_after,
        },
        _ => Outcome::Refused {
            why: format!(
                "the collector answered {status}{}",
                match std::str::from_utf8(body).map(str::trim) {
                    Ok(t) if !t.is_empty() && t.len() <= 200 => format!(": {t}"),
                    _ => String::new(),
                }
            ),
        },
    }
}

/// `Retry-After`: seconds, or an HTTP date (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let mut it = v.split_once(", ")?.1.split(' ');
    let day: u32 = it.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = it.next()?;
    let month = MONTHS.iter().position(|m| *m == month)? as u32 + 1;
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|x| x.parse::<i64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" {
        return None;
    }
    let at = crate::util::days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(Duration::from_secs(at.saturating_sub(now).max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(n: u8) -> Arc<Origin> {
        Arc::new(Origin {
            app: "web".into(),
            deployment: if n == 0 {
                String::new()
            } else {
                "canary".into()
            },
            instance: format!("{n:032x}"),
            host: "box".into(),
        })
    }

    fn line(o: &Arc<Origin>, stream: LogStream, text: &str) -> Line {
        Line {
            origin: o.clone(),
            stream: stream as i32,
            time_us: 1_700_000_000_000_000,
            observed_ns: 1_700_000_000_500_000_000,
            data: text.as_bytes().to_vec(),
            truncated: false,
            lost: 0,
        }
    }

    fn lines(o: &Arc<Origin>, n: usize, from: usize) -> Vec<Line> {
        (from..from + n)
            .map(|i| line(o, LogStream::Stdout, &format!("line {i}")))
            .collect()
    }

    fn texts(batch: &[Line]) -> Vec<String> {
        batch
            .iter()
            .map(|l| String::from_utf8_lossy(&l.data).into_owned())
            .collect()
    }

    fn retry() -> Outcome {
        Outcome::Retry {
            why: "connection refused".into(),
            retry_after: None,
        }
    }

    #[test]
    fn parses_targets() {
        let t = Target::parse("otlp+http://collector:4318").unwrap();
        assert_eq!(
            (
                t.https,
                t.host.as_str(),
                t.authority.as_str(),
                t.path.as_str()
            ),
            (false, "collector", "collector:4318", "/v1/logs")
        );
        let t = Target::parse("otlp+https://otel.example.com").unwrap();
        assert_eq!(
            (t.https, t.authority.as_str()),
            (true, "otel.example.com:4318")
        );
        let t = Target::parse("otlp+http://[::1]:9999/base/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.authority.as_str(), t.path.as_str()),
            ("::1", "[::1]:9999", "/base/v1/logs")
        );
        let t = Target::parse("otlp+http://127.0.0.1:1/otlp/v1/logs").unwrap();
        assert_eq!(t.path, "/otlp/v1/logs");
        assert_eq!(t.url(), "http://127.0.0.1:1/otlp/v1/logs");
        for (bad, says) in [
            ("http://x", "otlp+http://x"),
            ("https://x:4318", "otlp+"),
            ("otlp+http://", "no host"),
            ("otlp+http:///v1/logs", "no host"),
            ("otlp+ftp://h", "unsupported scheme \"otlp+ftp\""),
            ("collector:4318", "not a URL"),
            ("otlp+http://h:0", "not a port"),
            ("otlp+http://h:99999", "not a port"),
            ("otlp+http://h:x", "not a port"),
            ("otlp+http://u:p@h", "credentials"),
            ("otlp+http://h/?q=1", "query"),
            ("otlp+http://[::1", "unclosed"),
            ("otlp+http://[nope]:1", "IPv6"),
            ("otlp+http://a b", "host name"),
        ] {
            let e = format!("{:#}", Target::parse(bad).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn settings_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let s = Settings::new("otlp+http://h", env(&[])).unwrap();
        assert_eq!((s.queue_lines, s.timeout), (QUEUE_LINES, REQUEST_TIMEOUT));
        let s = Settings::new(
            "otlp+http://h",
            env(&[
                (QUEUE_ENV, "10"),
                (TIMEOUT_ENV, "500ms"),
                (HEADERS_ENV, "authorization=Bearer%20abc, x-tenant = t1"),
            ]),
        )
        .unwrap();
        assert_eq!((s.queue_lines, s.timeout), (10, Duration::from_millis(500)));
        assert_eq!(s.headers.len(), 2);
        assert_eq!(s.headers[0].1, "Bearer abc");
        assert_eq!(
            (s.headers[1].0.as_str(), s.headers[1].1.to_str().unwrap()),
            ("x-tenant", "t1")
        );
        for (k, v, says) in [
            (QUEUE_ENV, "0", "positive"),
            (QUEUE_ENV, "many", "positive"),
            (TIMEOUT_ENV, "0s", "more than 0"),
            (TIMEOUT_ENV, "soon", TIMEOUT_ENV),
            (HEADERS_ENV, "secret", "key=value"),
            (HEADERS_ENV, "bad name=1", "header name"),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = Box::leak(Box::new([(k, v)]));
            let e = format!(
                "{:#}",
                Settings::new("otlp+http://h", env(pairs)).err().unwrap()
            );
            assert!(e.contains(says), "{k}={v}: {e}");
            assert!(
                !e.contains("secret\""),
                "a header value is never shown: {e}"
            );
        }
        let e = Settings::new(
            "otlp+https://h",
            env(&[(
                CA_ENV,
                "-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n",
            )]),
        )
        .err()
        .unwrap();
        assert!(format!("{e:#}").contains("CA"), "{e:#}");
        let e = Settings::new("otlp+https://h", env(&[(CA_ENV, "/nonexistent/ca.pem")]))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
    }

    #[test]
    fn a_batch_waits_for_512_lines_or_one_second() {
        let t0 = Instant::now();
        let o = origin(1);
        let mut c = Core::new(QUEUE_LINES, QUEUE_BYTES, 1);
        assert!(c.poll_batch(t0).is_none());
        assert_eq!(c.poll_timeout(), None);
        c.handle_lines(lines(&o, 3, 0), t0);
        assert!(c.poll_batch(t0).is_none(), "3 lines: not due yet");
        assert_eq!(c.poll_timeout(), Some(t0 + BATCH_WAIT));
        c.handle_lines(lines(&o, 1, 3), t0 + Duration::from_millis(700));
        assert!(c.poll_batch(t0 + Duration::from_millis(999)).is_none());
        let b = c
            .poll_batch(t0 + BATCH_WAIT)
            .expect("the oldest waited 1 s");
        assert_eq!(texts(&b), ["line 0", "line 1", "line 2", "line 3"]);
        assert_eq!(c.stats().queued, 4, "in flight counts as queued");
        // While one is in flight, no other goes, however full the queue.
        c.handle_lines(lines(&o, 2000, 4), t0 + BATCH_WAIT);
        assert!(c.poll_batch(t0 + BATCH_WAIT).is_none());
        assert_eq!(c.poll_timeout(), None);
        let (step, _) = c.handle_outcome(&Outcome::Accepted { rejected: 0 }, t0 + BATCH_WAIT);
        assert_eq!(step, Step::Done);
        // Full batches go at once, in order.
        for k in 0..3 {
            let b = c
                .poll_batch(t0 + BATCH_WAIT)
                .expect("a full batch is due at once");
            assert_eq!(b.len(), BATCH_LINES);
            assert_eq!(texts(&b[..1]), [format!("line {}", 4 + k * BATCH_LINES)]);
            c.handle_outcome(&Outcome::Accepted { rejected: 0 }, t0 + BATCH_WAIT);
        }
        assert!(
            c.poll_batch(t0 + BATCH_WAIT).is_none(),
            "464 left: not a full batch"
        );
        assert_eq!(
            c.stats(),
            ExportStats {
                queued: 464,
                sent: 4 + 3 * 512,
                dropped: 0,
                failed: 0
            }
        );
    }

    #[test]
    fn a_batch_is_cut_at_its_byte_cap() {
        let t0 = Instant::now();
        let o = origin(1);
        let mut c = Core::new(QUEUE_LINES, QUEUE_BYTES, 1);
        let big = "x".repeat(60 * 1024);
        let n = BATCH_BYTES / big.len() + 5;
        c.handle_lines((0..n).map(|_| line(&o, LogStream::Stdout, &big)), t0);
        let b = c.poll_batch(t0).expect("over the byte cap: due at once");
        assert_eq!(b.len(), BATCH_BYTES / big.len());
        assert!(b.iter().map(|l| l.data.len()).sum::<usize>() <= BATCH_BYTES);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let t0 = Instant::now();
        let o = origin(1);
        let mut c = Core::new(10, QUEUE_BYTES, 1);
        assert_eq!(c.handle_lines(lines(&o, 8, 0), t0), 0);
        assert_eq!(c.handle_lines(lines(&o, 5, 8), t0), 3);
        let b = c.poll_batch(t0 + BATCH_WAIT).unwrap();
        assert_eq!(texts(&b)[0], "line 3", "the 3 oldest went");
        assert_eq!(texts(&b).last().unwrap(), "line 12");
        // The batch in flight is out of the queue: 10 more fit while it is retried.
        assert_eq!(c.handle_lines(lines(&o, 10, 13), t0), 0);
        assert_eq!(c.handle_lines(lines(&o, 1, 23), t0), 1);
        assert_eq!(
            c.stats(),
            ExportStats {
                queued: 20,
                sent: 0,
                dropped: 4,
                failed: 0
            }
        );
        // The byte cap binds too.
        let mut c = Core::new(1000, 3 * (LINE_COST + 6), 1);
        assert_eq!(c.handle_lines(lines(&o, 5, 0), t0), 2);
    }

    #[test]
    fn failures_back_off_exponentially_with_jitter_up_to_the_cap() {
        let t0 = Instant::now();
        let o = origin(1);
        let mut c = Core::new(QUEUE_LINES, QUEUE_BYTES, 7);
        c.handle_lines(lines(&o, 1, 0), t0);
        let _b = c.poll_batch(t0 + BATCH_WAIT).unwrap();
        let mut now = t0 + BATCH_WAIT;
        let mut delays = Vec::new();
        for _ in 0..20 {
            let (step, _) = c.handle_outcome(&retry(), now);
            let Step::RetryAt(at) = step else {
                panic!("a connection error is retried")
            };
            delays.push(at - now);
            now = at;
            assert!(
                c.poll_batch(now).is_none(),
                "the same batch is retried, no new one"
            );
        }
        for (n, d) in delays.iter().enumerate() {
            let base =
                (waypost_proto::backoff::MIN * (1 << n.min(16))).min(waypost_proto::backoff::MAX);
            assert!(
                *d >= base / 2 && *d <= base,
                "attempt {n}: {d:?} (base {base:?})"
            );
        }
        assert!(delays.windows(2).take(5).all(|w| w[1] > w[0] / 2), "grows");
        // Success: counted, and the backoff starts over with the next batch.
        let (step, notice) = c.handle_outcome(&Outcome::Accepted { rejected: 0 }, now);
        assert_eq!(step, Step::Done);
        assert!(
            matches!(notice, Some(Notice::Recovered { .. })),
            "{notice:?}"
        );
        assert_eq!(
            c.stats(),
            ExportStats {
                queued: 0,
                sent: 1,
                dropped: 0,
                failed: 20
            }
        );
        c.handle_lines(lines(&o, 1, 1), now);
        c.poll_batch(now + BATCH_WAIT).unwrap();
        let (Step::RetryAt(at), _) = c.handle_outcome(&retry(), now + BATCH_WAIT) else {
            panic!()
        };
        assert!(at - (now + BATCH_WAIT) <= waypost_proto::backoff::MIN);
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let t0 = Instant::now();
        let o = origin(1);
        let mut c = Core::new(QUEUE_LINES, QUEUE_BYTES, 7);
        c.handle_lines(lines(&o, 1, 0), t0);
        c.poll_batch(t0 + BATCH_WAIT).unwrap();
        let out = classify(429, Some(Duration::from_secs(7)), b"");
        assert_eq!(
            c.handle_outcome(&out, t0).0,
            Step::RetryAt(t0 + Duration::from_secs(7))
        );
        let out = classify(503, Some(Duration::from_secs(86_400)), b"");
        assert_eq!(
            c.handle_outcome(&out, t0).0,
            Step::RetryAt(t0 + RETRY_AFTER_MAX)
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_770);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(
            parse_retry_after("Sun, 06 Foo 1994 08:49:37 GMT", now),
            None
        );
    }

    #[test]
    fn a_refused_batch_is_dropped_and_warnings_are_throttled() {
        let t0 = Instant::now();
        let o = origin(1);
        let mut c = Core::new(QUEUE_LINES, QUEUE_BYTES, 7);
        let mut now = t0;
        let mut notices = 0;
        for i in 0..10 {
            c.handle_lines(lines(&o, 3, i * 3), now);
            now += BATCH_WAIT;
            c.poll_batch(now).unwrap();
            let out = classify(400, None, b"bad request: no");
            assert!(matches!(&out, Outcome::Refused { why } if why.contains("400: bad request")));
            let (step, notice) = c.handle_outcome(&out, now);
            assert_eq!(step, Step::Done, "a 400 is never retried");
            if let Some(Notice::Failing { failures, .. }) = notice {
                notices += 1;
                assert_eq!(failures, if notices == 1 { 1 } else { 5 });
            }
            now += Duration::from_secs(5);
        }
        // 60 s of failures: the first, then one per WARN_EVERY (each counting those since).
        assert_eq!(notices, 2);
        assert_eq!(
            c.stats(),
            ExportStats {
                queued: 0,
                sent: 0,
                dropped: 30,
                failed: 10
            }
        );
        // Other statuses: 404/413 refused; 408 too (not in OTLP's retryable list); 500s retried.
        for s in [301, 404, 408, 413] {
            assert!(
                matches!(classify(s, None, b""), Outcome::Refused { .. }),
                "{s}"
            );
        }
        for s in [429, 500, 502, 503, 504] {
            assert!(
                matches!(classify(s, None, b""), Outcome::Retry { .. }),
                "{s}"
            );
        }
        // A partial success: the refused lines are dropped and counted, the rest sent.
        let resp = otlp::ExportLogsServiceResponse {
            partial_success: Some(otlp::ExportLogsPartialSuccess {
                rejected_log_records: 2,
                error_message: "too old".into(),
            }),
        }
        .encode_to_vec();
        assert_eq!(
            classify(200, None, &resp),
            Outcome::Accepted { rejected: 2 }
        );
        assert_eq!(
            classify(200, None, b"{}"),
            Outcome::Accepted { rejected: 0 }
        );
        c.handle_lines(lines(&o, 5, 0), now);
        c.poll_batch(now + BATCH_WAIT).unwrap();
        c.handle_outcome(&Outcome::Accepted { rejected: 2 }, now + BATCH_WAIT);
        assert_eq!(
            c.stats(),
            ExportStats {
                queued: 0,
                sent: 3,
                dropped: 32,
                failed: 10
            }
        );
    }

    #[test]
    fn encodes_the_official_messages() {
        let (a, b) = (origin(1), origin(0));
        let mut batch = vec![
            line(&a, LogStream::Stdout, "hello"),
            line(&b, LogStream::Stderr, "other instance"),
            line(&a, LogStream::Entrypoint, "WARN child exited"),
            line(&a, LogStream::Stderr, "oops \u{e9}"),
        ];
        batch[3].data.push(0xff);
        batch[3].truncated = true;
        batch.push(Line {
            lost: 42,
            data: vec![],
            ..line(&a, LogStream::Stdout, "")
        });
        batch[1].time_us = 0;
        let req = otlp::ExportLogsServiceRequest::decode(&encode(&batch)[..]).unwrap();
        assert_eq!(req.resource_logs.len(), 2, "one per instance");
        let attrs = |kv: &[otlp::KeyValue]| -> Vec<(String, String)> {
            kv.iter()
                .map(|k| {
                    let v = match k.value.as_ref().and_then(|v| v.value.clone()) {
                        Some(otlp::any_value::Value::StringValue(s)) => s,
                        Some(otlp::any_value::Value::IntValue(i)) => i.to_string(),
                        Some(otlp::any_value::Value::BoolValue(b)) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (k.key.clone(), v)
                })
                .collect()
        };
        let r0 = &req.resource_logs[0];
        assert_eq!(
            attrs(&r0.resource.as_ref().unwrap().attributes),
            [
                ("service.name".into(), "web".into()),
                ("service.instance.id".into(), format!("{:032x}", 1)),
                ("waypost.deployment".into(), "canary".into()),
                ("host.name".into(), "box".into()),
            ]
        );
        let scope = r0.scope_logs[0].scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("waypost", crate::VERSION)
        );
        let recs = &r0.scope_logs[0].log_records;
        let bodies: Vec<_> = recs
            .iter()
            .map(|r| match r.body.as_ref().and_then(|b| b.value.clone()) {
                Some(otlp::any_value::Value::StringValue(s)) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            bodies,
            [
                "hello",
                "WARN child exited",
                "oops \u{e9}\u{fffd}",
                "[42 lines dropped]",
            ]
        );
        assert_eq!(recs[0].time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(recs[0].observed_time_unix_nano, 1_700_000_000_500_000_000);
        assert_eq!(
            attrs(&recs[0].attributes),
            [
                ("log.iostream".into(), "stdout".into()),
                ("waypost.stream".into(), "stdout".into())
            ]
        );
        assert_eq!(
            (recs[0].severity_number, recs[0].severity_text.as_str()),
            (0, "")
        );
        assert_eq!(
            attrs(&recs[1].attributes),
            [
                ("log.iostream".into(), "stderr".into()),
                ("waypost.stream".into(), "entrypoint".into())
            ]
        );
        assert_eq!(
            (recs[1].severity_number, recs[1].severity_text.as_str()),
            (13, "WARN")
        );
        assert_eq!(
            attrs(&recs[2].attributes),
            [
                ("log.iostream".into(), "stderr".into()),
                ("waypost.stream".into(), "stderr".into()),
                ("waypost.truncated".into(), "true".into())
            ]
        );
        assert_eq!(
            attrs(&recs[3].attributes)[2],
            ("waypost.lines_dropped".into(), "42".into())
        );
        assert_eq!(recs[3].severity_number, otlp::SEVERITY_WARN);
        let r1 = &req.resource_logs[1];
        assert_eq!(
            attrs(&r1.resource.as_ref().unwrap().attributes).len(),
            3,
            "no deployment"
        );
        assert_eq!(
            r1.scope_logs[0].log_records[0].time_unix_nano, 0,
            "unknown time: unset"
        );
    }

    /// The field numbers against the official schema's wire format, byte for byte: a record
    /// with one field set each, written by hand from logs.proto / common.proto.
    #[test]
    fn field_numbers_match_the_official_schema() {
        let r = otlp::LogRecord {
            time_unix_nano: 1,
            observed_time_unix_nano: 2,
            severity_number: 9,
            severity_text: "I".into(),
            body: Some(otlp::AnyValue {
                value: Some(otlp::any_value::Value::StringValue("b".into())),
            }),
            attributes: vec![otlp::KeyValue::int("k", 3)],
            ..Default::default()
        };
        let mut want = vec![0x09, 1, 0, 0, 0, 0, 0, 0, 0]; // 1: fixed64
        want.extend([0x10, 9]); // 2: severity_number (varint)
        want.extend([0x1a, 1, b'I']); // 3: severity_text
        want.extend([0x2a, 3, 0x0a, 1, b'b']); // 5: body { 1: string_value }
        want.extend([0x32, 7, 0x0a, 1, b'k', 0x12, 2, 0x18, 3]); // 6: { 1: key, 2: { 3: int } }
        want.extend([0x59, 2, 0, 0, 0, 0, 0, 0, 0]); // 11: fixed64
        assert_eq!(r.encode_to_vec(), want);
        let req = otlp::ExportLogsServiceRequest {
            resource_logs: vec![otlp::ResourceLogs {
                resource: Some(otlp::Resource::default()),
                scope_logs: vec![otlp::ScopeLogs {
                    scope: Some(otlp::InstrumentationScope {
                        name: "n".into(),
                        version: "v".into(),
                        ..Default::default()
                    }),
                    log_records: vec![otlp::LogRecord::default()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        // 1: resource_logs { 1: resource {}, 2: scope_logs { 1: scope { 1: n, 2: v }, 2: {} } }
        let want = [
            0x0a, 14, 0x0a, 0, 0x12, 10, 0x0a, 6, 0x0a, 1, b'n', 0x12, 1, b'v', 0x12, 0,
        ];
        assert_eq!(req.encode_to_vec(), want);
    }
}
