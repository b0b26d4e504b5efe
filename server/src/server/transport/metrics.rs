//! The metrics listener (`--metrics-addr`, default `127.0.0.1:9703`, `off` to disable): plain
//! HTTP, no token, for Prometheus and health checks next to it. See docs/architecture.md
//! ("Metrics").
//!
//! - `GET /metrics`: every family of model/metrics.rs, encoded by prometheus-client. A client
//!   that asks for OpenMetrics (`Accept: application/openmetrics-text`, as Prometheus does) gets
//!   OpenMetrics 1.0; any other gets the classic text format 0.0.4 (what `promtool check
//!   metrics` and older tools parse), the same samples without the OpenMetrics-only lines.
//! - `GET /healthz`, `GET /readyz`: the API listener's checks (transport/api/mod.rs), shared.
//! - Anything else: 404; another method on these paths: 405.
//!
//! What is a state rather than a count is read at scrape time: `instances_live` from the live
//! registry (every app in the database gets a series, 0 without a live instance here, so
//! `== 0` can be alerted on; a deleted app's series goes away), and the `process_*` figures from
//! `/proc/self`.

use crate::server::model::metrics::{AppLabel, metrics};
use crate::server::store;
use crate::server::transport::{Shared, accept, api, serve_http};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub const METRICS_PATH: &str = "/metrics";
/// The content type of OpenMetrics 1.0 text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long a scrape waits for the app list (a database outage must not stall the scrape: then
/// only apps with a live instance here get a series).
const APPS_TIMEOUT: Duration = Duration::from_secs(1);

/// The two registries over the process-wide metrics, built once.
static REGISTRIES: LazyLock<(Registry, Registry)> =
    LazyLock::new(|| (metrics().registry(), metrics().process_registry()));

/// Scrapes one at a time: the scrape-time figures are written, then encoded, and two scrapes
/// interleaving would show a half-written `instances_live`.
static SCRAPE: Mutex<()> = Mutex::new(());

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(METRICS_PATH, get(scrape))
        .route(api::HEALTHZ_PATH, get(api::healthz))
        .route(api::READYZ_PATH, get(api::readyz))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "no such endpoint (try /metrics)\n") })
        .method_not_allowed_fallback(|| async {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        })
        .with_state(shared)
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn scrape(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let apps = match tokio::time::timeout(APPS_TIMEOUT, s.store.call(|c| store::list_apps(c))).await
    {
        Ok(Ok(apps)) => Some(apps.into_iter().map(|a| a.name).collect::<Vec<_>>()),
        _ => None,
    };
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = {
        let _one = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
        set_instances_live(&s, apps.as_deref());
        set_process();
        match encode(openmetrics) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "encoding the metrics failed");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
            }
        }
    };
    let ctype = if openmetrics {
        OPENMETRICS
    } else {
        PROMETHEUS_TEXT
    };
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
}

/// Both registries as OpenMetrics text, or (`openmetrics` false) as the classic text format.
pub fn encode(openmetrics: bool) -> Result<String, std::fmt::Error> {
    use prometheus_client::encoding::text;
    let (waypost, process) = &*REGISTRIES;
    let mut out = String::with_capacity(16 * 1024);
    text::encode_registry(&mut out, waypost)?;
    text::encode_registry(&mut out, process)?;
    if openmetrics {
        text::encode_eof(&mut out)?;
        return Ok(out);
    }
    Ok(classic(&out))
}

/// OpenMetrics text → the classic text format: the same samples, without `# EOF` and `# UNIT`,
/// and with a counter's `# HELP`/`# TYPE` naming its `_total` sample (the classic format has
/// no family name apart from the sample name; prometheus-client writes counters' samples with
/// the suffix).
fn classic(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut counter = None::<&str>;
    // A family's metadata lines come first, the TYPE line says whether it is a counter.
    let lines: Vec<&str> = om.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            // The TYPE line follows the HELP line of the same family.
            let is_counter = lines
                .get(i + 1)
                .is_some_and(|t| *t == format!("# TYPE {name} counter"));
            counter = is_counter.then_some(name);
            if is_counter && !name.ends_with("_total") {
                out.push_str(&format!("# HELP {name}_total{}\n", &rest[name.len()..]));
                continue;
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or("");
            if counter == Some(name) && !name.ends_with("_total") {
                out.push_str(&format!("# TYPE {name}_total counter\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `waypost_instances_live`: every app of the database at 0, then this replica's live
/// connections per app. Cleared first, so a deleted app's series ends.
fn set_instances_live(s: &Shared, apps: Option<&[String]>) {
    let family = &metrics().instances_live;
    let counts = s.live.app_counts();
    family.clear();
    for app in apps.unwrap_or_default() {
        family.get_or_create(&AppLabel::new(app)).set(0);
    }
    for (app, n) in counts {
        family
            .get_or_create(&AppLabel { app })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// Linux's USER_HZ: the unit of the times in /proc/PID/stat, fixed at 100 in the kernel's ABI
/// whatever the kernel's own tick rate.
const CLOCK_TICKS: f64 = 100.0;

/// The `process_*` figures, from /proc/self (what Prometheus client libraries export under the
/// same names). A figure that cannot be read keeps its last value.
fn set_process() {
    let m = metrics();
    if let Some(p) = ProcStat::read() {
        let cpu = (p.utime + p.stime) as f64 / CLOCK_TICKS;
        let had = m.process_cpu_seconds.get();
        if cpu > had {
            m.process_cpu_seconds.inc_by(cpu - had);
        }
        m.process_virtual_memory_bytes.set(clamp(p.vsize));
        if let Some(btime) = boot_time() {
            m.process_start_time_seconds
                .set(btime as f64 + p.starttime as f64 / CLOCK_TICKS);
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kb) = status_field(&status, "VmRSS:") {
            m.process_resident_memory_bytes
                .set(clamp(kb.saturating_mul(1024)));
        }
        if let Some(n) = status_field(&status, "Threads:") {
            m.process_threads.set(clamp(n));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // Less the one the listing itself holds open.
        let n = dir.count().saturating_sub(1);
        m.process_open_fds.set(clamp(n as u64));
    }
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    m.process_max_fds
        .set(clamp(lim.current.unwrap_or(u64::MAX)));
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The fields of /proc/self/stat used here.
struct ProcStat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        Self::parse(&std::fs::read_to_string("/proc/self/stat").ok()?)
    }

    /// proc(5): after `pid (comm)` (comm may hold spaces and parentheses: split at the last
    /// `)`), field 3 is the state; utime is 14, stime 15, starttime 22, vsize 23.
    fn parse(stat: &str) -> Option<ProcStat> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        Some(ProcStat {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
            vsize: field(23)?,
        })
    }
}

/// `Name:   value [kB]` of /proc/self/status.
fn status_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// When the machine booted (seconds since the epoch; `btime` in /proc/stat), read once.
fn boot_time() -> Option<u64> {
    static BTIME: LazyLock<Option<u64>> = LazyLock::new(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("btime "))?;
        line["btime ".len()..].trim().parse().ok()
    });
    *BTIME
}

/// Accepts metrics connections until shutdown. `done`: see `control::serve`.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, done: mpsc::Sender<()>) {
    let app = router(shared.clone());
    let mut shutdown = shared.shutdown.clone();
    loop {
        let Some((tcp, peer)) = accept(&listener, &mut shutdown, "metrics").await else {
            break;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let done = done.clone();
        let shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            let _done = done;
            let io = hyper_util::rt::TokioIo::new(tcp);
            if let Err(e) = serve_http(io, service, shutdown).await {
                tracing::debug!(%peer, error = %e, "metrics connection error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields() {
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 \
                    9 0 123456 987654321 2000 18446744073709551615";
        let p = ProcStat::parse(line).unwrap();
        assert_eq!((p.utime, p.stime), (250, 75));
        assert_eq!(p.starttime, 123456);
        assert_eq!(p.vsize, 987654321);
        assert!(ProcStat::parse("garbage").is_none());
        let p = ProcStat::read().expect("this process's own stat");
        assert!(p.vsize > 0);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\twaypost\nVmRSS:\t   12345 kB\nThreads:\t7\n";
        assert_eq!(status_field(s, "VmRSS:"), Some(12345));
        assert_eq!(status_field(s, "Threads:"), Some(7));
        assert_eq!(status_field(s, "VmSwap:"), None);
    }

    #[test]
    fn classic_text_names_counters_by_their_sample() {
        let om = "# HELP waypost_x Things.\n# TYPE waypost_x counter\nwaypost_x_total 3\n\
                  # HELP waypost_g A gauge.\n# TYPE waypost_g gauge\nwaypost_g 1\n\
                  # HELP t Seconds.\n# TYPE t counter\n# UNIT t seconds\nt_total 1.5\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP waypost_x_total Things.\n# TYPE waypost_x_total counter\nwaypost_x_total 3\n\
             # HELP waypost_g A gauge.\n# TYPE waypost_g gauge\nwaypost_g 1\n\
             # HELP t_total Seconds.\n# TYPE t_total counter\nt_total 1.5\n"
        );
    }
}
