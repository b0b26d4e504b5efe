//! The server's Prometheus metrics: every family, declared once (docs/architecture.md, "Metrics").
//!
//! One process-wide set ([`metrics()`]), so any layer records with one line and nothing has to be
//! threaded through constructors; it sits in `model`, the lowest layer, because the store times
//! its own statements. The handles are prometheus-client's (atomics behind `Arc`s): recording is
//! a lock-free add once a label set exists. Exposed by the metrics listener
//! (transport/metrics.rs) in the OpenMetrics text format.
//!
//! Labels are bounded: `app` (apps are created by an admin), a direction, a kind or a status
//! class from a fixed set — never an instance id, a path or a user-supplied string.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;

/// Labels `{app}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    pub app: String,
}

impl AppLabel {
    pub fn new(app: &str) -> Self {
        Self {
            app: app.to_string(),
        }
    }
}

/// Labels `{app, stream}`: a log stream (`stdout`, `stderr`, `entrypoint`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppStream {
    pub app: String,
    pub stream: &'static str,
}

/// Labels `{direction}`: `in` (received by the server) or `out` (sent).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

/// Labels `{direction, kind}`: a control frame's kind (the variant's name, e.g. `LogBatch`;
/// `none` for a frame of a kind this version does not know).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabel {
    pub direction: &'static str,
    pub kind: &'static str,
}

/// Labels `{result}` from a fixed set (e.g. `ok`, `bad_token`, `tls_error`, `timeout`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Labels `{app, kind}`: a tunnel stream's kind (`ingress`, `port_forward`, `hop`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppKind {
    pub app: String,
    pub kind: &'static str,
}

/// Labels `{app, status}`: an ingress response's status code (`200`, `404`, `502`, ...; `""`
/// app for a host that names no app).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppStatus {
    pub app: String,
    pub status: u16,
}

/// Labels `{op}`: the part of the server that made a database call: the caller's module below
/// `server::` (e.g. `transport::api`, `service::live`), taken from the call's closure type
/// (store/mod.rs, `op_of`), so a fixed set known at compile time.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~26 s, ×2 per bucket: covers a cached read and a request to a slow app.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Every metric of the server. Field names are the metric names without the `waypost_` prefix
/// (and without `_total`, which the encoder adds to counters).
pub struct Metrics {
    // ---- instances and the control listener --------------------------------------------
    /// Live instances per app: set at scrape time from the live registry (never drifts).
    pub instances_live: Family<AppLabel, Gauge>,
    /// TCP connections accepted on the control listener.
    pub control_connections: Counter,
    /// Control connections open now.
    pub control_connections_open: Gauge,
    /// Handshakes by outcome: `ok`, `tls_error`, `timeout` (TLS or Hello not done in time),
    /// `bad_token`, `rejected` (any other Reject: version, instance id of another owner, ...),
    /// `closed` (the peer closed or sent garbage before its Hello), `refused` (over the pre-auth
    /// caps, closed before any TLS work).
    pub control_handshakes: Family<ResultLabel, Counter>,
    /// A Hello from an instance id this server already knew (the entrypoint came back).
    pub control_reconnects: Family<AppLabel, Counter>,
    /// Control frames by direction and kind.
    pub control_frames: Family<FrameLabel, Counter>,
    /// Control frame bytes (length prefix included) by direction.
    pub control_frame_bytes: Family<Direction, Counter>,

    // ---- logs ---------------------------------------------------------------------------
    /// Log lines received from entrypoints.
    pub log_lines_received: Family<AppStream, Counter>,
    /// Log bytes received from entrypoints.
    pub log_bytes_received: Family<AppLabel, Counter>,
    /// Log lines the entrypoints reported dropping (their buffer was full).
    pub log_lines_dropped: Family<AppLabel, Counter>,
    /// Log lines written to the database.
    pub log_lines_stored: Family<AppLabel, Counter>,
    /// Log lines handed to the OTLP collector (accepted by it).
    pub log_export_lines: Counter,
    /// Log lines the exporter dropped: its queue was full, or the collector refused them (4xx,
    /// records rejected in a partial success).
    pub log_export_dropped: Counter,
    /// Export requests that failed (each retried with backoff).
    pub log_export_failures: Counter,
    /// Log lines waiting in the exporter's queue.
    pub log_export_queue: Gauge,

    // ---- config, the child --------------------------------------------------------------
    /// Config snapshots pushed to instances (Welcome snapshots not counted).
    pub config_pushes: Family<AppLabel, Counter>,
    /// Child restarts reported by the instances (config change, `waypost restart`): the growth
    /// of a connection's Status `starts` counter.
    pub child_restarts: Family<AppLabel, Counter>,

    // ---- exec, tunnels, ingress ---------------------------------------------------------
    /// Exec sessions started.
    pub exec_sessions: Family<AppLabel, Counter>,
    /// Exec sessions open now.
    pub exec_sessions_open: Gauge,
    /// Tunnel streams opened (kind `ingress`: the URL service; `port_forward`), and requests and
    /// sessions sent on to the replica holding the instance (kind `hop`; no stream here).
    pub tunnel_streams: Family<AppKind, Counter>,
    /// Tunnel streams open now over this replica's control connections (hops not counted).
    pub tunnel_streams_open: Gauge,
    /// Ingress requests by app and response status, counted by the replica the visitor reached
    /// (a request hopped to another replica is not counted again there).
    pub ingress_requests: Family<AppStatus, Counter>,
    /// Ingress request latency (until the response head), by app.
    pub ingress_request_duration_seconds: Family<AppLabel, Histogram, fn() -> Histogram>,

    // ---- the database -------------------------------------------------------------------
    /// Time a database call took (queueing for the connection included).
    pub db_statement_duration_seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    /// Database calls that failed.
    pub db_errors: Family<OpLabel, Counter>,

    // ---- the process (set at scrape time from /proc/self) --------------------------------
    pub process_resident_memory_bytes: Gauge,
    pub process_virtual_memory_bytes: Gauge,
    pub process_cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub process_open_fds: Gauge,
    pub process_max_fds: Gauge,
    pub process_threads: Gauge,
    pub process_start_time_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    fn new() -> Self {
        Self {
            instances_live: Family::default(),
            control_connections: Counter::default(),
            control_connections_open: Gauge::default(),
            control_handshakes: Family::default(),
            control_reconnects: Family::default(),
            control_frames: Family::default(),
            control_frame_bytes: Family::default(),
            log_lines_received: Family::default(),
            log_bytes_received: Family::default(),
            log_lines_dropped: Family::default(),
            log_lines_stored: Family::default(),
            log_export_lines: Counter::default(),
            log_export_dropped: Counter::default(),
            log_export_failures: Counter::default(),
            log_export_queue: Gauge::default(),
            config_pushes: Family::default(),
            child_restarts: Family::default(),
            exec_sessions: Family::default(),
            exec_sessions_open: Gauge::default(),
            tunnel_streams: Family::default(),
            tunnel_streams_open: Gauge::default(),
            ingress_requests: Family::default(),
            ingress_request_duration_seconds: Family::new_with_constructor(latency_histogram),
            db_statement_duration_seconds: Family::new_with_constructor(latency_histogram),
            db_errors: Family::default(),
            process_resident_memory_bytes: Gauge::default(),
            process_virtual_memory_bytes: Gauge::default(),
            process_cpu_seconds: Counter::default(),
            process_open_fds: Gauge::default(),
            process_max_fds: Gauge::default(),
            process_threads: Gauge::default(),
            process_start_time_seconds: Gauge::default(),
        }
    }

    /// A request or port-forward session of `app` sent on to the replica holding the instance.
    pub fn count_hop(&self, app: &str) {
        self.tunnel_streams
            .get_or_create(&AppKind {
                app: app.to_string(),
                kind: "hop",
            })
            .inc();
    }

    /// A registry over these metrics (prefix `waypost_`), for the encoder. The process's figures
    /// are in [`Metrics::process_registry`]: a prefix given here would apply to them too, and
    /// they keep the standard names (`process_*`) every Prometheus client library exports.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("waypost");
        macro_rules! reg {
            ($r:expr, $name:literal, $help:literal, $field:ident) => {
                $r.register($name, $help, self.$field.clone())
            };
        }
        reg!(
            r,
            "instances_live",
            "Live instances (connected entrypoints) per app",
            instances_live
        );
        reg!(
            r,
            "control_connections",
            "TCP connections accepted on the control listener",
            control_connections
        );
        reg!(
            r,
            "control_connections_open",
            "Control connections open now",
            control_connections_open
        );
        reg!(
            r,
            "control_handshakes",
            "Control handshakes by outcome",
            control_handshakes
        );
        reg!(
            r,
            "control_reconnects",
            "Hellos from an instance id the server already knew",
            control_reconnects
        );
        reg!(
            r,
            "control_frames",
            "Control frames by direction and kind",
            control_frames
        );
        reg!(
            r,
            "control_frame_bytes",
            "Control frame bytes by direction",
            control_frame_bytes
        );
        reg!(
            r,
            "log_lines_received",
            "Log lines received from entrypoints",
            log_lines_received
        );
        reg!(
            r,
            "log_bytes_received",
            "Log bytes received from entrypoints",
            log_bytes_received
        );
        reg!(
            r,
            "log_lines_dropped",
            "Log lines the entrypoints reported dropping",
            log_lines_dropped
        );
        reg!(
            r,
            "log_lines_stored",
            "Log lines written to the database",
            log_lines_stored
        );
        reg!(
            r,
            "log_export_lines",
            "Log lines accepted by the OTLP collector",
            log_export_lines
        );
        reg!(
            r,
            "log_export_dropped",
            "Log lines the exporter dropped: queue full, or refused by the collector (4xx, rejected records)",
            log_export_dropped
        );
        reg!(
            r,
            "log_export_failures",
            "OTLP export requests that failed",
            log_export_failures
        );
        reg!(
            r,
            "log_export_queue",
            "Log lines waiting in the exporter's queue",
            log_export_queue
        );
        reg!(
            r,
            "config_pushes",
            "Config snapshots pushed to instances",
            config_pushes
        );
        reg!(
            r,
            "child_restarts",
            "Child restarts reported by instances",
            child_restarts
        );
        reg!(r, "exec_sessions", "Exec sessions started", exec_sessions);
        reg!(
            r,
            "exec_sessions_open",
            "Exec sessions open now",
            exec_sessions_open
        );
        reg!(r, "tunnel_streams", "Tunnel streams opened", tunnel_streams);
        reg!(
            r,
            "tunnel_streams_open",
            "Tunnel streams open now",
            tunnel_streams_open
        );
        reg!(
            r,
            "ingress_requests",
            "Ingress requests by app and status",
            ingress_requests
        );
        reg!(
            r,
            "ingress_request_duration_seconds",
            "Ingress request latency until the response head",
            ingress_request_duration_seconds
        );
        reg!(
            r,
            "db_statement_duration_seconds",
            "Database call latency",
            db_statement_duration_seconds
        );
        reg!(r, "db_errors", "Database calls that failed", db_errors);
        r
    }

    /// The process's standard figures, unprefixed (`process_resident_memory_bytes`, ...).
    pub fn process_registry(&self) -> Registry {
        let mut r = Registry::with_prefix("process");
        r.register(
            "resident_memory_bytes",
            "Resident memory size in bytes",
            self.process_resident_memory_bytes.clone(),
        );
        r.register(
            "virtual_memory_bytes",
            "Virtual memory size in bytes",
            self.process_virtual_memory_bytes.clone(),
        );
        r.register(
            "cpu_seconds",
            "Total user and system CPU time spent in seconds",
            self.process_cpu_seconds.clone(),
        );
        r.register(
            "open_fds",
            "Number of open file descriptors",
            self.process_open_fds.clone(),
        );
        r.register(
            "max_fds",
            "Maximum number of open file descriptors",
            self.process_max_fds.clone(),
        );
        r.register(
            "threads",
            "Number of OS threads in the process",
            self.process_threads.clone(),
        );
        r.register(
            "start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            self.process_start_time_seconds.clone(),
        );
        r
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// One unit of an "open now" gauge, taken at creation and given back on drop, however its owner
/// ends (an early return, a panic, a cancelled task).
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
