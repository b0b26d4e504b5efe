//! The `waypost` command line. Everything except `server run` goes through the HTTPS API.
//!
//! The API is found through `WAYPOST_ADDR`, `WAYPOST_ADMIN_TOKEN`, `WAYPOST_CA` (each one
//! overriding the matching field of the current context: see context.rs; `waypost server run`
//! writes the context `default`, `waypost login` others).

mod apps;
mod backup;
mod child;
mod config;
mod domain;
pub mod dotenv;
mod exec;
mod forward;
mod inject;
mod login;
mod logs;
mod shell;
mod up;
mod url;
mod watch;

use crate::client::{ApiClient, ApiError};
use crate::server::model::{Labels, labels};
use crate::{context, util};
use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "waypost",
    version,
    about = "waypost: run apps behind a tiny entrypoint and manage them from one server",
    propagate_version = true,
    after_help = "The CLI finds the server through WAYPOST_ADDR, WAYPOST_ADMIN_TOKEN and WAYPOST_CA, \
                  else the current context of the context file written by `waypost server run` \
                  and `waypost login` ($WAYPOST_CONTEXT, default ~/.config/waypost/context.json)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the waypost server.
    #[command(subcommand)]
    Server(ServerCmd),
    /// Create and list apps.
    #[command(subcommand)]
    App(AppCmd),
    /// Create, list and revoke entrypoint and admin tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Log in to a waypost server (e.g. from another machine): check its CA and an admin token,
    /// and save them as a named context, made current.
    Login(login::LoginArgs),
    /// The servers this CLI knows (contexts): list them, choose the current one, remove one.
    #[command(subcommand)]
    Context(login::ContextCmd),
    /// List instances (live ones; with --all also recently gone ones).
    Instances(InstancesArgs),
    /// An app's configuration: variables, files, and how instances react to a change.
    #[command(subcommand)]
    Config(config::ConfigCmd),
    /// Print (and with -f follow) the logs of an app's instances.
    Logs(logs::LogsArgs),
    /// One-command quickstart: start a server if none answers, create the app and a token, and
    /// run CMD under the entrypoint in the foreground.
    Up(up::UpArgs),
    /// Run a command next to a live instance of an app (exit code = the command's).
    Exec(exec::ExecArgs),
    /// Print an app's public URL (served by the server's ingress).
    Url(url::UrlArgs),
    /// Restart an app's instances (each child stopped with SIGTERM, its stop grace, SIGKILL,
    /// and started again, as a config change would); waits until each reports its new start.
    Restart(child::RestartArgs),
    /// Send a signal to the children of an app's instances (a terminating one is followed by
    /// SIGKILL after the entrypoint's stop timeout).
    Signal(child::SignalArgs),
    /// Apps' custom domains, served by the HTTPS ingress with their own certificates.
    #[command(subcommand)]
    Domain(domain::DomainCmd),
    /// Forward a local port to a port inside a live instance of an app (like kubectl
    /// port-forward): `[LOCAL:]REMOTE`; Ctrl-C stops it.
    PortForward(forward::ForwardArgs),
    /// Put the static entrypoint into a container image (OCI layout, oci-archive or
    /// docker-archive), without a container daemon.
    Inject(inject::InjectArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    Completion(shell::CompletionArgs),
    /// Internal (used by `make man`): write a man page per command into DIR.
    #[command(name = "__man", hide = true)]
    Man { dir: PathBuf },
    /// Internal (used by `up`): start `waypost ARGS...` detached, print its pid, exit.
    #[command(name = "__detach", hide = true)]
    Detach {
        #[arg(long)]
        log: PathBuf,
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ServerCmd {
    /// Run the server in the foreground (SIGTERM or Ctrl-C stops it).
    Run(Box<RunArgs>),
    /// List the server replicas: id, peer address, version, instances held, started, last seen,
    /// and state (up, or stale: no heartbeat for 3 intervals).
    Members {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = TableOrJson::Table)]
        output: TableOrJson,
    },
    /// Copy the server's SQLite database to FILE, consistently, while it runs (reads the data
    /// dir; no API). On PostgreSQL: prints the pg_dump command to use instead.
    Backup(backup::BackupArgs),
}

/// Every duration flag (`--splay 10s`, `--heartbeat-interval 300ms`, `--ingress-timeout 1.5m`):
/// the syntax of the entrypoint's variables too, documented at [`waypost_proto::parse_duration`].
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    waypost_proto::parse_duration(s)
}

/// The shortest heartbeat interval: the entrypoint's own floor (`MIN_HEARTBEAT` in
/// src/session.rs). Below it an entrypoint would beat more slowly than the server expects and be
/// dropped as silent.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_HEARTBEAT || d > Duration::from_secs(3600) {
        return Err("must be between 100ms and 1h".into());
    }
    Ok(d)
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Data directory (database, CA, server.json).
    #[arg(long, env = "WAYPOST_DATA_DIR", default_value = "./waypost-data")]
    data_dir: PathBuf,
    /// Address of the control listener (entrypoints connect here). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9701")]
    control_addr: String,
    /// Address of the HTTPS API listener (the CLI connects here). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9702")]
    api_addr: String,
    /// Domain under which apps get URLs (NAME.DOMAIN).
    #[arg(long, default_value = "localhost")]
    url_domain: String,
    /// Extra subject alternative name for the server certificate (DNS name or IP); repeatable.
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_san: Vec<String>,
    /// How often entrypoints send heartbeats; 3 missed intervals mark an instance lost.
    #[arg(long, default_value = "15s", value_parser = parse_heartbeat)]
    heartbeat_interval: Duration,
    /// Address given to entrypoints with their tokens (default: the control listener's address;
    /// the host name when it listens on 0.0.0.0 or ::).
    #[arg(long, value_name = "HOST:PORT")]
    advertise_addr: Option<String>,
    /// Address of the URL-service ingress (plain HTTP; apps at http://NAME.DOMAIN:PORT/).
    /// Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9080")]
    ingress_addr: String,
    /// The ingress answers 504 when an app sends nothing back for this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ingress_timeout: Duration,
    /// Address of the HTTPS ingress (TLS 1.3, HTTP/2 and HTTP/1.1; apps at
    /// https://NAME.DOMAIN:PORT/ with a certificate signed by the server CA, custom domains with
    /// their own: `waypost domain add`). Default: off. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    ingress_tls_addr: Option<String>,
    /// The plain ingress answers requests for apps with a redirect (308) to the HTTPS ingress
    /// (needs --ingress-tls-addr).
    #[arg(long)]
    ingress_redirect_https: bool,
    /// Address other server replicas reach this one at (shown by `server members`). Default:
    /// none, this replica is not reachable by its peers.
    #[arg(long, value_name = "HOST:PORT", value_parser = crate::server::model::members::parse_peer_addr)]
    peer_addr: Option<String>,
    /// The database shared by replicas: a PostgreSQL URL (postgres://USER[:PASSWORD]@HOST:PORT/DB;
    /// `?sslmode=require`, `connect_timeout=5` etc. as libpq takes them; with TLS the database's
    /// certificate is verified against WAYPOST_DATABASE_CA, a PEM file or text, else the system
    /// bundle). Default: SQLite in the data dir.
    #[arg(long, env = "WAYPOST_DATABASE_URL", value_name = "URL", value_parser = parse_database, hide_env_values = true)]
    database: Option<crate::server::store::Location>,
    /// Address of the metrics listener (plain HTTP: Prometheus text at /metrics, and /healthz,
    /// /readyz). `off` disables it. Port 0 picks a free port.
    #[arg(
        long,
        value_name = "ADDR|off",
        default_value = "127.0.0.1:9703",
        env = "WAYPOST_METRICS_ADDR"
    )]
    metrics_addr: String,
    /// Forward every stored log line to an OpenTelemetry collector over OTLP/HTTP (protobuf,
    /// POST /v1/logs): otlp+http://HOST[:PORT][/PATH] or otlp+https://… (port 4318 by default).
    /// https trusts WAYPOST_LOG_EXPORT_CA (a PEM file or text), else the system bundle; extra
    /// headers from WAYPOST_LOG_EXPORT_HEADERS (k=v,k2=v2). Batched, retried with backoff, a
    /// bounded queue whose overflow drops the oldest lines (counted). Default (or empty): off.
    #[arg(long, value_name = "URL", env = "WAYPOST_LOG_EXPORT", value_parser = parse_log_export)]
    log_export: Option<String>,
    /// Worker threads of the server's async runtime (connections, the API, the ingress). Default:
    /// half the CPUs, at least 1 — moving bytes is mostly waking tasks, and idle workers woken to
    /// find nothing cost more than they bring; give more to a machine serving many busy instances.
    #[arg(long, value_name = "N", env = "WAYPOST_SERVER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

/// `--log-export`: checked here, with its `WAYPOST_LOG_EXPORT_*` settings, so a mistake stops
/// the start before anything else (exit 2); the server builds the exporter from them again.
fn parse_log_export(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(String::new()); // off, e.g. `Environment=WAYPOST_LOG_EXPORT=` in a unit file
    }
    crate::server::service::export::Settings::new(s, |k| std::env::var(k).ok())
        .map(|_| s.to_string())
        .map_err(|e| format!("{e:#}"))
}

fn parse_database(s: &str) -> Result<crate::server::store::Location, String> {
    crate::server::store::Location::parse_url(s).map_err(|e| format!("{e:#}"))
}

#[derive(Subcommand)]
enum AppCmd {
    /// Create an app (NAME: lowercase letters, digits, '-'; it becomes a host name).
    Create { name: String },
    /// List apps.
    List {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = TableOrJson::Table)]
        output: TableOrJson,
    },
    /// Change an app's settings (log retention).
    Set(logs::AppSetArgs),
    /// Delete an app and everything of it: tokens, instance history, config and its history,
    /// logs, URL access control, custom domains. Refused while instances are live, unless --force.
    Delete(apps::DeleteArgs),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an entrypoint token for an app (and optionally one deployment), or with --admin an
    /// admin token (for another operator's `waypost login`, or a script).
    ///
    /// The token is printed once: the server keeps only its hash.
    Create {
        /// The app of the entrypoint token.
        #[arg(
            short = 'a',
            long,
            env = "WAYPOST_APP",
            required_unless_present = "admin"
        )]
        app: Option<String>,
        #[arg(long)]
        deployment: Option<String>,
        /// Create an admin token: it can do everything through the API, until revoked or expired.
        #[arg(long)]
        admin: bool,
        /// The admin token's name, shown by `token list` (unique; letters, digits, '.', '_',
        /// '-', '@'). Default: admin-ID.
        #[arg(long, requires = "admin")]
        name: Option<String>,
        /// The admin token expires after this long (`30d`, `12h`, `90m`); after that the API
        /// refuses it, saying it expired. Default: never.
        #[arg(long, requires = "admin", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// A label for every instance that connects with this token: `k=v`, or several as
        /// `k=v,k2=v2`; repeatable. On a conflict they win over the instance's own
        /// (WAYPOST_LABELS).
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
        /// env: WAYPOST_SERVER/WAYPOST_TOKEN/WAYPOST_CA lines for `export` or `docker --env-file`
        /// (admin tokens: WAYPOST_ADDR/WAYPOST_ADMIN_TOKEN/WAYPOST_CA, the CLI's variables);
        /// json: the API's answer. Default: just the token.
        #[arg(short = 'o', long = "output", value_enum)]
        output: Option<TokenOutput>,
    },
    /// List tokens: ID, kind, name (admin tokens), app, deployment, labels, live instances
    /// using each, created, expires (and whether expired).
    ///
    /// The token text itself is never shown: the server keeps only its hash, whose first 12 hex
    /// digits are the ID.
    List {
        /// Only this app's tokens.
        #[arg(short = 'a', long)]
        app: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = TableOrJson::Table)]
        output: TableOrJson,
    },
    /// Revoke a token. An entrypoint token can no longer connect, and its live instances are
    /// disconnected; an admin token is refused by the API from its next request on.
    ///
    /// The apps of those instances keep running; their entrypoints retry and stay refused until
    /// they are given a new token. The last admin token that has not expired cannot be revoked
    /// (create another first).
    Revoke {
        /// The ID `token list` shows, or a unique prefix of it (at least 6 hex digits).
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TokenOutput {
    Env,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum TableOrJson {
    Table,
    Json,
}

#[derive(Args)]
struct InstancesArgs {
    /// Only this app's instances.
    #[arg(short = 'a', long)]
    app: Option<String>,
    /// Also show recently gone instances (the last 100 per app) and how they ended.
    #[arg(long)]
    all: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TableOrJson::Table)]
    output: TableOrJson,
    /// Watch: ask every second and show the table again when it changed (on a terminal,
    /// redrawn in place); Ctrl-C ends it.
    #[arg(short = 'w', long, conflicts_with = "output")]
    watch: bool,
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Server(ServerCmd::Run(a)) => crate::server::run(crate::server::Options {
            data_dir: a.data_dir,
            control_addr: a.control_addr,
            api_addr: a.api_addr,
            url_domain: a.url_domain,
            tls_san: a.tls_san,
            heartbeat: a.heartbeat_interval,
            advertise_addr: a.advertise_addr,
            ingress_addr: a.ingress_addr,
            ingress_timeout: a.ingress_timeout,
            ingress_tls_addr: a.ingress_tls_addr,
            ingress_redirect_https: a.ingress_redirect_https,
            peer_addr: a.peer_addr,
            database: a.database,
            metrics_addr: Some(a.metrics_addr).filter(|a| a != "off"),
            log_export: a.log_export.filter(|u| !u.is_empty()),
            threads: a.threads.map(usize::from),
        })
        .map(|()| 0),
        Cmd::Server(ServerCmd::Backup(a)) => backup::run(a).map(|()| 0),
        Cmd::Up(a) => up::run(a),
        Cmd::Exec(a) => exec::run(a),
        Cmd::PortForward(a) => forward::run(a),
        Cmd::Inject(a) => inject::run(a),
        Cmd::Detach { log, args } => up::detach(&log, &args),
        Cmd::Completion(a) => shell::completion(a).map(|()| 0),
        Cmd::Man { dir } => shell::man(&dir).map(|()| 0),
        cmd => block_on(async move {
            match cmd {
                Cmd::App(AppCmd::Create { name }) => app_create(&name).await,
                Cmd::App(AppCmd::List { output }) => app_list(output).await,
                Cmd::Token(TokenCmd::Create {
                    app,
                    deployment,
                    admin: true,
                    name,
                    ttl,
                    labels,
                    output,
                }) => admin_token_create(app, deployment, &labels, name, ttl, output).await,
                Cmd::Token(TokenCmd::Create {
                    app,
                    deployment,
                    labels,
                    output,
                    ..
                }) => {
                    // INVARIANT: clap requires --app (or WAYPOST_APP) without --admin.
                    let app = app.expect("--app is required without --admin");
                    token_create(&app, deployment, &labels, output).await
                }
                Cmd::Login(a) => login::login(a).await,
                Cmd::Context(c) => login::context(c),
                Cmd::Token(TokenCmd::List { app, output }) => token_list(app, output).await,
                Cmd::Token(TokenCmd::Revoke { id }) => token_revoke(&id).await,
                Cmd::Instances(a) => instances(a).await,
                Cmd::Server(ServerCmd::Members { output }) => server_members(output).await,
                Cmd::Config(c) => config::run(c).await,
                Cmd::Logs(a) => logs::run(a).await,
                Cmd::App(AppCmd::Set(a)) => logs::app_set(a).await,
                Cmd::App(AppCmd::Delete(a)) => apps::delete(a).await,
                Cmd::Url(a) => url::run(a).await,
                Cmd::Restart(a) => child::restart(a).await,
                Cmd::Signal(a) => child::signal(a).await,
                Cmd::Domain(d) => domain::run(d).await,
                Cmd::Server(ServerCmd::Run(_))
                | Cmd::Server(ServerCmd::Backup(_))
                | Cmd::Up(_)
                | Cmd::Inject(_)
                | Cmd::Exec(_)
                | Cmd::PortForward(_)
                | Cmd::Detach { .. }
                | Cmd::Completion(_)
                | Cmd::Man { .. } => {
                    unreachable!("handled above")
                }
            }
        })
        .and_then(|r| r)
        .map(|()| 0),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the error chain holds.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("waypost: error: {msg}");
            1
        }
    }
}

pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

// ---- finding the API ------------------------------------------------------------------------

/// Where the API is and how to talk to it.
pub(crate) struct Target {
    pub addr: String,
    pub token: String,
    pub ca_pem: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `WAYPOST_CA` forms: PEM text, base64 of PEM text (what `token create -o env` prints), or a
/// path to a PEM file.
pub fn read_ca(v: &str) -> Result<String> {
    let t = v.trim();
    if t.starts_with("-----BEGIN") {
        return Ok(t.to_string() + "\n");
    }
    if t.starts_with("LS0t") {
        if let Some(pem) = util::base64_decode(t).and_then(|b| String::from_utf8(b).ok()) {
            return Ok(pem);
        }
    }
    std::fs::read_to_string(t).with_context(|| {
        format!("WAYPOST_CA is neither PEM text, base64 PEM, nor a readable file ({t})")
    })
}

/// Resolves the target from the environment and the current context.
pub(crate) fn resolve_target() -> Result<Target> {
    let all = context::load_all();
    let ctx_ref = all.as_ref().ok().and_then(|a| a.current()).map(|(_, c)| c);
    let missing = || -> anyhow::Error {
        let path = context::path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "~/.config/waypost/context.json".into());
        match &all {
            Err(e) => anyhow::anyhow!("{e:#}"),
            Ok(a) if !a.contexts.is_empty() => anyhow::anyhow!(
                "no current waypost context in {path}: choose one with `waypost context use NAME` \
                 (`waypost context list` shows them)"
            ),
            Ok(_) => anyhow::anyhow!(
                "no waypost server configured: start one with `waypost server run` (it writes {path}), \
                 log in to one with `waypost login ADDR`, or set WAYPOST_ADDR, WAYPOST_ADMIN_TOKEN \
                 and WAYPOST_CA"
            ),
        }
    };
    let addr = match env("WAYPOST_ADDR") {
        Some(a) => api_addr(&a)?,
        None => ctx_ref.map(|c| c.api_addr.clone()).ok_or_else(missing)?,
    };
    let token = env("WAYPOST_ADMIN_TOKEN")
        .or_else(|| ctx_ref.map(|c| c.admin_token.clone()))
        .ok_or_else(missing)?;
    let ca_pem = match env("WAYPOST_CA") {
        Some(v) => read_ca(&v)?,
        None => ctx_ref.map(|c| c.ca_pem.clone()).ok_or_else(missing)?,
    };
    Ok(Target {
        addr,
        token,
        ca_pem,
    })
}

/// `WAYPOST_ADDR` as `host:port`: also taken as `https://host:port` (what a browser or curl
/// would be given; the API is always HTTPS) with an optional trailing `/`. `http://` is refused:
/// the API speaks only TLS, and a plain-HTTP address is most likely the ingress's.
fn api_addr(v: &str) -> Result<String> {
    let v = v.trim();
    let lower = v.to_ascii_lowercase();
    if lower.starts_with("http://") {
        bail!(
            "WAYPOST_ADDR={v}: the waypost API is HTTPS only; use https://HOST:PORT or HOST:PORT \
             (the API address, not the ingress's)"
        );
    }
    let rest = if lower.starts_with("https://") {
        &v["https://".len()..]
    } else {
        v
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') || rest.contains("://") {
        bail!("WAYPOST_ADDR={v}: give HOST:PORT or https://HOST:PORT (no path)");
    }
    crate::client::host_of(rest).with_context(|| format!("WAYPOST_ADDR={v}"))?;
    Ok(rest.to_string())
}

pub(crate) fn client_for(t: &Target) -> Result<ApiClient> {
    ApiClient::new(&t.addr, Some(t.token.clone()), &t.ca_pem)
}

fn client() -> Result<ApiClient> {
    client_for(&resolve_target()?)
}

// ---- commands --------------------------------------------------------------------------------

#[derive(Deserialize)]
struct AppJson {
    name: String,
    created_at: String,
}

async fn app_create(name: &str) -> Result<()> {
    if !util::valid_app_name(name) {
        bail!(
            "invalid app name {name:?}: use 1-63 lowercase letters, digits and '-', starting and \
             ending with a letter or digit"
        );
    }
    let c = client()?;
    let app: AppJson = c.post("/v1/apps", &json!({ "name": name })).await?;
    println!("created app {}", app.name);
    Ok(())
}

async fn app_list(output: TableOrJson) -> Result<()> {
    let c = client()?;
    let v: serde_json::Value = c.get("/v1/apps").await?;
    if output == TableOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let apps: Vec<AppJson> =
        serde_json::from_value(v["apps"].clone()).context("unexpected response")?;
    let mut rows = vec![vec!["NAME".to_string(), "CREATED".to_string()]];
    for a in apps {
        rows.push(vec![a.name, a.created_at]);
    }
    print_table(&rows);
    Ok(())
}

#[derive(Deserialize, serde::Serialize)]
pub(crate) struct TokenJson {
    pub token: String,
    /// What `token list` shows and `token revoke` takes.
    #[serde(default)]
    pub id: String,
    pub app: String,
    pub deployment: Option<String>,
    /// Given to the instances that connect with it (a server before labels sends none).
    #[serde(default)]
    pub labels: Labels,
    pub control_addr: String,
    pub ca_pem: String,
}

pub(crate) async fn create_token(
    c: &ApiClient,
    app: &str,
    deployment: Option<String>,
) -> Result<TokenJson> {
    create_token_with_labels(c, app, deployment, &Labels::new()).await
}

/// [`create_token`] with labels for the instances that connect with it.
pub(crate) async fn create_token_with_labels(
    c: &ApiClient,
    app: &str,
    deployment: Option<String>,
    token_labels: &Labels,
) -> Result<TokenJson> {
    c.post(
        "/v1/tokens",
        &json!({ "app": app, "deployment": deployment, "labels": token_labels }),
    )
    .await
}

/// The `--label` arguments (each `k=v` or `k=v,k2=v2`) as one set of labels; an error names the
/// bad label.
fn label_args(args: &[String]) -> Result<Labels> {
    let mut all = Labels::new();
    for arg in args {
        let parsed = labels::parse(arg).map_err(|e| anyhow::anyhow!("invalid --label: {e}"))?;
        for (k, v) in parsed {
            if all.contains_key(&k) {
                bail!(
                    "invalid --label: label {:?} repeats the key of an earlier label",
                    format!("{k}={v}")
                );
            }
            all.insert(k, v);
        }
    }
    labels::check_all(&all).map_err(|e| anyhow::anyhow!("invalid --label: {e}"))?;
    Ok(all)
}

/// The `-o env` lines; every value is one line without spaces or quotes, so the output works
/// both with `export $(...)`/`source` and as a docker `--env-file`.
pub fn env_lines(control_addr: &str, token: &str, ca_pem: &str) -> String {
    format!(
        "WAYPOST_SERVER={control_addr}\nWAYPOST_TOKEN={token}\nWAYPOST_CA={}\n",
        util::base64_encode(ca_pem.as_bytes())
    )
}

async fn token_create(
    app: &str,
    deployment: Option<String>,
    label_flags: &[String],
    output: Option<TokenOutput>,
) -> Result<()> {
    // Checked here too, so a typo is reported before anything is sent.
    let token_labels = label_args(label_flags)?;
    let c = client()?;
    let t = create_token_with_labels(&c, app, deployment, &token_labels).await?;
    match output {
        Some(TokenOutput::Json) => println!("{}", serde_json::to_string_pretty(&t)?),
        Some(TokenOutput::Env) => print!("{}", env_lines(&t.control_addr, &t.token, &t.ca_pem)),
        None => {
            println!("{}", t.token);
            eprintln!(
                "Entrypoint token {} for app {}{}. Give it to the entrypoint as WAYPOST_TOKEN with \
                 WAYPOST_SERVER={}; `waypost token create --app {} -o env` prints all three variables.",
                t.id,
                t.app,
                t.deployment
                    .as_deref()
                    .map(|d| format!(" (deployment {d})"))
                    .unwrap_or_default(),
                t.control_addr,
                t.app
            );
        }
    }
    Ok(())
}

/// `token create --admin`: prints the new admin token once (stdout), what it is on stderr.
async fn admin_token_create(
    app: Option<String>,
    deployment: Option<String>,
    label_flags: &[String],
    name: Option<String>,
    ttl: Option<Duration>,
    output: Option<TokenOutput>,
) -> Result<()> {
    // WAYPOST_APP is a default for --app, not a request for an app: only a given --app clashes.
    let app_given = app.is_some() && app != env("WAYPOST_APP");
    if app_given || deployment.is_some() || !label_flags.is_empty() {
        bail!(
            "an admin token has no app, deployment or labels: drop --app/--deployment/--label or --admin"
        );
    }
    if let Some(n) = &name
        && !crate::server::transport::api::valid_admin_name(n)
    {
        bail!("invalid --name {n:?}: use 1-64 letters, digits, '.', '_', '-' or '@'");
    }
    let c = client()?;
    // Milliseconds: exact, and in the duration syntax the API parses.
    let ttl = ttl.map(|d| format!("{}ms", d.as_millis()));
    let v: serde_json::Value = c
        .post(
            "/v1/tokens",
            &json!({ "admin": true, "name": name, "ttl": ttl }),
        )
        .await?;
    let token = v["token"].as_str().context("unexpected response")?;
    match output {
        Some(TokenOutput::Json) => println!("{}", serde_json::to_string_pretty(&v)?),
        Some(TokenOutput::Env) => print!(
            "WAYPOST_ADDR={}\nWAYPOST_ADMIN_TOKEN={token}\nWAYPOST_CA={}\n",
            c.addr(),
            util::base64_encode(v["ca_pem"].as_str().unwrap_or_default().as_bytes())
        ),
        None => {
            println!("{token}");
            eprintln!(
                "Admin token {} named {}{}; it is shown only now. On another machine: \
                 `waypost login {}` and paste it (the API must listen on an address that machine \
                 reaches: `server run --api-addr`).",
                v["id"].as_str().unwrap_or("?"),
                v["name"].as_str().unwrap_or("?"),
                v["expires_at"]
                    .as_str()
                    .map(|t| format!(", expires {t}"))
                    .unwrap_or_default(),
                c.addr()
            );
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct TokenRowJson {
    id: String,
    kind: String,
    /// Admin tokens' (a server before named admin tokens sends none).
    #[serde(default)]
    name: Option<String>,
    app: Option<String>,
    deployment: Option<String>,
    created_at: String,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    expired: bool,
    #[serde(default)]
    labels: Labels,
    live_instances: u64,
}

async fn token_list(app: Option<String>, output: TableOrJson) -> Result<()> {
    let c = client()?;
    let path = match &app {
        Some(a) if !util::valid_app_name(a) => bail!("invalid app name {a:?}"),
        Some(a) => format!("/v1/tokens?app={a}"),
        None => "/v1/tokens".to_string(),
    };
    let v: serde_json::Value = c.get(&path).await?;
    if output == TableOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let tokens: Vec<TokenRowJson> =
        serde_json::from_value(v["tokens"].clone()).context("unexpected response")?;
    let mut rows = vec![
        [
            "ID",
            "KIND",
            "NAME",
            "APP",
            "DEPLOYMENT",
            "LABELS",
            "LIVE",
            "CREATED",
            "EXPIRES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for t in tokens {
        let expires = match (t.expires_at, t.expired) {
            (Some(at), true) => format!("{at} (expired)"),
            (Some(at), false) => at,
            (None, _) => "never".into(),
        };
        rows.push(vec![
            t.id,
            t.kind,
            t.name.unwrap_or_else(|| "-".into()),
            t.app.unwrap_or_else(|| "-".into()),
            t.deployment.unwrap_or_else(|| "-".into()),
            labels_text(&t.labels),
            t.live_instances.to_string(),
            t.created_at,
            expires,
        ]);
    }
    print_table(&rows);
    Ok(())
}

async fn token_revoke(id: &str) -> Result<()> {
    if id.len() < 6 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "invalid token id {id:?}: use the ID column of `waypost token list` (at least 6 hex digits)"
        );
    }
    let c = client()?;
    let v: serde_json::Value = c
        .call(hyper::Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await?;
    if v["kind"] == "admin" {
        println!(
            "revoked admin token {} ({}); the API refuses it from now on",
            v["id"].as_str().unwrap_or(id),
            v["name"].as_str().unwrap_or("unnamed")
        );
        return Ok(());
    }
    println!(
        "revoked token {} of app {}; disconnected {} live instance(s)",
        v["id"].as_str().unwrap_or(id),
        v["app"].as_str().unwrap_or("?"),
        v["disconnected_instances"].as_u64().unwrap_or(0)
    );
    Ok(())
}

#[derive(Deserialize)]
struct InstanceJson {
    id: String,
    app: String,
    deployment: String,
    hostname: String,
    live: bool,
    ended: Option<String>,
    connected_at: String,
    disconnected_at: Option<String>,
    child_state: Option<String>,
    child_pid: Option<u32>,
    exit_code: Option<i32>,
    exit_signal: Option<i32>,
    oom_killed: bool,
    child_rss_bytes: u64,
    child_cpu_ms: u64,
    #[serde(default)]
    config_version: u64,
    #[serde(default)]
    replica: Option<String>,
    #[serde(default)]
    entrypoint_rss_bytes: u64,
    #[serde(default)]
    labels: Labels,
}

/// Labels for a table cell: `k=v,k2=v2`, or `-` for none.
fn labels_text(l: &Labels) -> String {
    if l.is_empty() {
        "-".into()
    } else {
        labels::format(l)
    }
}

fn exit_text(code: Option<i32>, signal: Option<i32>, oom: bool) -> String {
    let base = match (code, signal) {
        (_, Some(sig)) => format!("killed by {}", util::signal_name(sig)),
        (Some(code), None) => format!("exited {code}"),
        (None, None) => "exited".to_string(),
    };
    // The kernel's OOM killer sends SIGKILL: say why, not just how.
    if oom { "OOM-killed".to_string() } else { base }
}

fn state_text(i: &InstanceJson) -> String {
    if !i.live {
        return match i.ended.as_deref() {
            Some("exited") => exit_text(i.exit_code, i.exit_signal, i.oom_killed),
            Some(other) => other.to_string(),
            None => "disconnected".to_string(),
        };
    }
    match i.child_state.as_deref() {
        Some("exited") => exit_text(i.exit_code, i.exit_signal, i.oom_killed),
        Some(s) => s.to_string(),
        None => "connected".to_string(),
    }
}

fn cpu_text(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        util::fmt_age(Duration::from_millis(ms))
    }
}

async fn instances(a: InstancesArgs) -> Result<()> {
    let c = client()?;
    let mut path = format!("/v1/instances?all={}", a.all);
    if let Some(app) = &a.app {
        if !util::valid_app_name(app) {
            bail!("invalid app name {app:?}");
        }
        path.push_str(&format!("&app={app}"));
    }
    if a.watch {
        return watch::instances(&c, &path, &a).await;
    }
    let v: serde_json::Value = c.get(&path).await?;
    logs::warn_if_intake_stalled(&v["log_intake"]);
    if a.output == TableOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match instances_view(&v, &a)? {
        InstancesView::Table(rows) => print_table(&rows),
        InstancesView::Empty(msg) => eprintln!("{msg}"),
    }
    Ok(())
}

/// What `instances` shows of an answer of `/v1/instances`: the table (header first), or why
/// there is none.
enum InstancesView {
    Table(Vec<Vec<String>>),
    Empty(String),
}

/// The column of [`InstancesView::Table`] that changes with the clock alone (ages).
const INSTANCES_AGE_COLUMN: &str = "UP/SINCE";

fn instances_view(v: &serde_json::Value, a: &InstancesArgs) -> Result<InstancesView> {
    let list: Vec<InstanceJson> =
        serde_json::from_value(v["instances"].clone()).context("unexpected response")?;
    if list.is_empty() {
        return Ok(InstancesView::Empty(format!(
            "no {}instances{}",
            if a.all { "" } else { "live " },
            a.app
                .as_deref()
                .map(|a| format!(" of app {a}"))
                .unwrap_or_default()
        )));
    }
    let now = util::now_ms();
    let age = |t: &str| {
        util::parse_rfc3339(t)
            .map(|ms| util::fmt_age(Duration::from_millis((now - ms).max(0) as u64)))
            .unwrap_or_else(|| "?".into())
    };
    // Which replica holds each instance, only when there is more than one to tell apart.
    let replicas: std::collections::HashSet<&str> =
        list.iter().filter_map(|i| i.replica.as_deref()).collect();
    let show_replica = replicas.len() > 1;
    // Labels only when some instance has any: most fleets use none, and the table is wide.
    let show_labels = list.iter().any(|i| !i.labels.is_empty());
    let mut header = [
        "ID",
        "APP",
        "DEPLOYMENT",
        "HOST",
        "STATE",
        "CHILD PID",
        "RSS",
        "EP RSS",
        "CPU",
        "CONFIG",
        INSTANCES_AGE_COLUMN,
    ]
    .map(String::from)
    .to_vec();
    if show_replica {
        header.push("REPLICA".into());
    }
    if show_labels {
        header.push("LABELS".into());
    }
    let mut rows = vec![header];
    for i in &list {
        let since = match (&i.disconnected_at, i.live) {
            (Some(t), false) => format!("{} ago", age(t)),
            _ => age(&i.connected_at),
        };
        let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
        rows.push(vec![
            i.id.chars().take(8).collect(),
            i.app.clone(),
            dash(i.deployment.clone()),
            dash(i.hostname.clone()),
            state_text(i),
            i.child_pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            if i.child_rss_bytes > 0 {
                util::fmt_bytes(i.child_rss_bytes)
            } else {
                "-".into()
            },
            // What the entrypoint itself costs, next to the app.
            if i.entrypoint_rss_bytes > 0 {
                util::fmt_bytes(i.entrypoint_rss_bytes)
            } else {
                "-".into()
            },
            cpu_text(i.child_cpu_ms),
            if i.config_version > 0 {
                format!("v{}", i.config_version)
            } else {
                "-".into()
            },
            since,
        ]);
        if show_replica {
            let r = i.replica.as_deref().unwrap_or("-");
            rows.last_mut()
                .expect("just pushed")
                .push(r.chars().take(8).collect());
        }
        if show_labels {
            rows.last_mut()
                .expect("just pushed")
                .push(labels_text(&i.labels));
        }
    }
    Ok(InstancesView::Table(rows))
}

#[derive(Deserialize)]
struct MemberJson {
    id: String,
    peer_addr: Option<String>,
    version: String,
    instances: u64,
    started_at: String,
    last_seen: String,
    state: String,
    #[serde(rename = "self")]
    this: bool,
}

async fn server_members(output: TableOrJson) -> Result<()> {
    let c = client()?;
    let v: serde_json::Value = c.get("/v1/server/members").await?;
    if output == TableOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let list: Vec<MemberJson> =
        serde_json::from_value(v["members"].clone()).context("unexpected response")?;
    let now = util::now_ms();
    let age = |t: &str| {
        util::parse_rfc3339(t)
            .map(|ms| util::fmt_age(Duration::from_millis((now - ms).max(0) as u64)))
            .unwrap_or_else(|| "?".into())
    };
    let mut rows = vec![
        [
            "ID",
            "PEER ADDRESS",
            "VERSION",
            "INSTANCES",
            "STARTED",
            "LAST SEEN",
            "STATE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for m in &list {
        rows.push(vec![
            if m.this {
                format!("{} (this)", m.id)
            } else {
                m.id.clone()
            },
            m.peer_addr.clone().unwrap_or_else(|| "-".into()),
            m.version.clone(),
            m.instances.to_string(),
            format!("{} ago", age(&m.started_at)),
            format!("{} ago", age(&m.last_seen)),
            m.state.clone(),
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// Left-aligned columns separated by three spaces (kubectl style).
fn print_table(rows: &[Vec<String>]) {
    print!("{}", table_text(rows));
}

/// [`print_table`]'s text.
fn table_text(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Is this error "the API answered with status X"?
pub(crate) fn api_status(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<ApiError>().map(|a| a.status.as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn the_heartbeat_interval_is_no_shorter_than_the_entrypoints_floor() {
        assert_eq!(parse_heartbeat("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_heartbeat("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["99ms", "50ms", "0s", "61m", "abc"] {
            assert!(parse_heartbeat(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_lines_are_single_line_values() {
        let out = env_lines(
            "127.0.0.1:9701",
            "wpe_x",
            "-----BEGIN CERTIFICATE-----\nAB\n-----END CERTIFICATE-----\n",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[2].starts_with("WAYPOST_CA=LS0tLS1CRUdJTi"));
        assert!(out.lines().all(|l| !l.contains(' ') && !l.contains('"')));
        let ca = read_ca(lines[2].strip_prefix("WAYPOST_CA=").unwrap()).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn label_flags_combine_and_errors_name_the_label() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let l = label_args(&args(&["tier=api", "env=prod,team=x"])).unwrap();
        assert_eq!(labels::format(&l), "env=prod,team=x,tier=api");
        assert!(label_args(&[]).unwrap().is_empty());
        for (bad, why) in [
            (&["tier"][..], "label \"tier\" is not key=value"),
            (
                &["a=1", "a=2"][..],
                "label \"a=2\" repeats the key of an earlier",
            ),
            (
                &["a=1,a=2"][..],
                "label \"a=2\" repeats the key of an earlier",
            ),
            (&["a=b c"][..], "\"a=b c\""),
        ] {
            let e = label_args(&args(bad)).unwrap_err().to_string();
            assert!(
                e.starts_with("invalid --label: ") && e.contains(why),
                "{bad:?}: {e}"
            );
        }
        // The cap counts every flag together.
        let many: Vec<String> = (0..=labels::MAX_LABELS)
            .map(|i| format!("k{i}=v"))
            .collect();
        let e = label_args(&many).unwrap_err().to_string();
        assert!(e.contains("at most 16"), "{e}");
    }

    #[test]
    fn waypost_addr_takes_https_urls_and_refuses_http() {
        for (given, want) in [
            ("10.0.0.5:9702", "10.0.0.5:9702"),
            ("https://10.0.0.5:9702", "10.0.0.5:9702"),
            ("https://ops.example.com:9702/", "ops.example.com:9702"),
            ("HTTPS://[::1]:9702", "[::1]:9702"),
            (" https://h:1 ", "h:1"),
        ] {
            assert_eq!(api_addr(given).unwrap(), want, "{given}");
        }
        let e = api_addr("http://10.0.0.5:9702").unwrap_err().to_string();
        assert!(
            e.contains("HTTPS only") && e.contains("https://HOST:PORT"),
            "{e}"
        );
        for bad in [
            "https://h:1/v1",
            "https://",
            "https://h",
            "ftp://h:1",
            "h:x",
        ] {
            assert!(api_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_texts() {
        assert_eq!(exit_text(Some(3), None, false), "exited 3");
        assert_eq!(exit_text(None, Some(15), false), "killed by SIGTERM");
        assert_eq!(exit_text(None, Some(9), true), "OOM-killed");
        assert_eq!(exit_text(None, Some(9), false), "killed by SIGKILL");
    }
}
