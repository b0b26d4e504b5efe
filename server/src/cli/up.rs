//! `waypost up -- CMD`: the one-command quickstart. Starts a server in the background if none
//! answers, creates the app if missing, issues a token, and runs CMD under the entrypoint in the
//! foreground, exiting with its exit code.
//!
//! The last step is an `exec` of the entrypoint, not a child process: the entrypoint then *is*
//! the foreground process, so every signal (a terminal's Ctrl-C to the process group, a
//! `kill PID`, `timeout`'s group-wide SIGTERM) reaches it exactly once, and its exit code is
//! ours, with no forwarding layer that could double-deliver or drop a signal. For the same
//! reason the background server is started through a short-lived intermediate process
//! (`waypost __detach`), so it is not our child: the entrypoint treats leftover children as the
//! app's descendants and would stop it on exit.

use super::{Target, api_status, block_on, client_for, create_token, resolve_target};
use crate::client::{ApiClient, Unreachable};
use crate::{context, util};
use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for a server we started to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const ENTRYPOINT: &str = "waypost-entrypoint";
/// Where `make build` puts the static entrypoint, relative to the repository root.
const MUSL_BUILD: &str = "target/x86_64-unknown-linux-musl/min/waypost-entrypoint";

#[derive(Args)]
pub struct UpArgs {
    /// App name (default: the current directory's name, made a valid DNS label).
    #[arg(short = 'a', long)]
    app: Option<String>,
    /// The entrypoint binary (default: waypost-entrypoint next to this waypost, then
    /// ./target/x86_64-unknown-linux-musl/min/waypost-entrypoint, then PATH).
    #[arg(long, value_name = "PATH")]
    entrypoint_binary: Option<PathBuf>,
    /// Data directory for the server started when none answers.
    #[arg(long, env = "WAYPOST_DATA_DIR", default_value = "./waypost-data")]
    data_dir: PathBuf,
    /// Control address for the server started when none answers.
    #[arg(long, default_value = "127.0.0.1:9701")]
    control_addr: String,
    /// API address for the server started when none answers (default: WAYPOST_ADDR, else
    /// 127.0.0.1:9702).
    #[arg(long)]
    api_addr: Option<String>,
    /// Ingress (URL service) address for the server started when none answers.
    #[arg(long, default_value = "127.0.0.1:9080")]
    ingress_addr: String,
    /// Metrics listener address (or `off`) for the server started when none answers (default:
    /// the server's own, WAYPOST_METRICS_ADDR, else 127.0.0.1:9703).
    #[arg(long, value_name = "ADDR|off")]
    metrics_addr: Option<String>,
    /// The command to run under the entrypoint.
    #[arg(required = true, last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

pub fn run(a: UpArgs) -> Result<i32> {
    // Fail fast, before any server is started.
    let entrypoint = find_entrypoint(a.entrypoint_binary.as_deref())?;
    let app = match &a.app {
        Some(name) => {
            if !util::valid_app_name(name) {
                bail!("invalid app name {name:?}: use 1-63 lowercase letters, digits and '-'");
            }
            name.clone()
        }
        None => {
            let cwd = std::env::current_dir().context("reading the current directory")?;
            let base = cwd
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            util::sanitize_label(&base).unwrap_or_else(|| "app".to_string())
        }
    };
    // The runtime is dropped before the exec.
    let cmd = block_on(up(a, app, &entrypoint))??;
    exec(cmd, &entrypoint)
}

/// Everything before the exec: a server, the app, a token; returns the entrypoint command.
async fn up(a: UpArgs, app: String, entrypoint: &Path) -> Result<std::process::Command> {
    let client = match reachable_server().await? {
        Some(c) => c,
        None => start_server(&a).await?,
    };

    match client
        .post::<serde_json::Value>("/v1/apps", &json!({ "name": app }))
        .await
    {
        Ok(_) => eprintln!("waypost: created app {app}"),
        Err(e) if api_status(&e) == Some(409) => {}
        Err(e) => return Err(e.context(format!("creating app {app}"))),
    }
    let token = create_token(&client, &app, None).await?;

    eprintln!(
        "waypost: running {:?} as app {app} under {}",
        a.cmd.join(" "),
        entrypoint.display()
    );
    eprintln!("waypost: in another terminal, try:");
    eprintln!("waypost:   waypost instances --app {app}           # the live instance");
    eprintln!(
        "waypost:   waypost url --app {app}                 # its URL, through the server's ingress"
    );
    eprintln!("waypost:   waypost logs --app {app} -f             # its output, live");
    eprintln!(
        "waypost:   waypost config set --app {app} KEY=VALUE   # restarts it with the new env"
    );
    eprintln!("waypost:   waypost exec --app {app} -t -i -- sh    # a shell next to it");
    // The web console is served by the API listener (transport/api/console.rs).
    let token_file = a.data_dir.join(crate::server::ADMIN_TOKEN_FILE);
    let ctx_path = context::path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "the CLI context file".to_string());
    eprintln!("waypost: the web console: https://{}/", client.addr());
    eprintln!(
        "waypost:   sign in with the admin token ({}{ctx_path}); the browser warns about the \
         certificate at first: the server's own CA signed it",
        if token_file.exists() {
            format!("in {} or `admin_token` in ", token_file.display())
        } else {
            "`admin_token` in ".to_string()
        },
    );

    let mut cmd = std::process::Command::new(entrypoint);
    cmd.arg("--")
        .args(&a.cmd)
        .env("WAYPOST_SERVER", &token.control_addr)
        .env("WAYPOST_TOKEN", &token.token)
        .env("WAYPOST_CA", util::base64_encode(token.ca_pem.as_bytes()))
        // In a terminal too, the app's output goes through the entrypoint, so `waypost logs`
        // has it (the app then writes to pipes rather than the terminal).
        .env("WAYPOST_CAPTURE", "1");
    // The app must never see admin credentials, and the CLI-only variables mean nothing to
    // the entrypoint (it would warn about them).
    for var in [
        "WAYPOST_ADMIN_TOKEN",
        "WAYPOST_ADDR",
        "WAYPOST_CONTEXT",
        "WAYPOST_DATA_DIR",
    ] {
        cmd.env_remove(var);
    }
    Ok(cmd)
}

/// Replaces this process with the entrypoint; returns only on failure.
fn exec(mut cmd: std::process::Command, entrypoint: &Path) -> Result<i32> {
    use std::os::unix::process::CommandExt as _;
    let err = cmd.exec();
    Err(err).with_context(|| format!("starting {}", entrypoint.display()))
}

/// A client for an already running server, `None` if nothing answers (or nothing is
/// configured). A server that answers but refuses us is an error: starting a second one would
/// not help.
async fn reachable_server() -> Result<Option<ApiClient>> {
    // Nothing configured (no context file, no WAYPOST_ADDR...): nothing to reach.
    let Ok(target) = resolve_target() else {
        return Ok(None);
    };
    let client = client_for(&target)?;
    match client.get::<serde_json::Value>("/v1/server").await {
        Ok(_) => Ok(Some(client)),
        Err(e) if e.downcast_ref::<Unreachable>().is_some() => Ok(None),
        Err(e) => Err(e.context(format!(
            "a server answers at {} but cannot be used",
            target.addr
        ))),
    }
}

async fn start_server(a: &UpArgs) -> Result<ApiClient> {
    util::create_private_dir(&a.data_dir)?;
    let dir = a.data_dir.canonicalize()?;
    let log_path = dir.join("server.log");
    let api_addr = a
        .api_addr
        .clone()
        .or_else(|| super::env("WAYPOST_ADDR"))
        .unwrap_or_else(|| "127.0.0.1:9702".to_string());
    let exe = std::env::current_exe().context("locating the waypost executable")?;
    let out = std::process::Command::new(&exe)
        .arg("__detach")
        .arg("--log")
        .arg(&log_path)
        .args(["--", "server", "run", "--data-dir"])
        .arg(&dir)
        .args(["--control-addr", &a.control_addr, "--api-addr", &api_addr])
        .args(["--ingress-addr", &a.ingress_addr])
        .args(
            a.metrics_addr
                .iter()
                .flat_map(|m| ["--metrics-addr", m.as_str()]),
        )
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting `waypost server run`")?;
    if !out.status.success() {
        bail!("starting `waypost server run` failed ({})", out.status);
    }
    let pid: libc::pid_t = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("`waypost __detach` printed no pid")?;
    eprintln!(
        "waypost: started a server in the background (pid {pid}, data {}, log {})",
        dir.display(),
        log_path.display()
    );

    let deadline = Instant::now() + START_TIMEOUT;
    let server_json = dir.join("server.json");
    let mut last_err = String::from("no answer yet");
    loop {
        if !alive(pid) {
            bail!(
                "the server exited during start-up: {}; full log: {}",
                last_log_line(&log_path),
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the server did not answer within {START_TIMEOUT:?} ({last_err}); see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ours = std::fs::read_to_string(&server_json)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["pid"].as_i64() == Some(pid as i64));
        if !ours {
            continue;
        }
        // The server writes the context before server.json; use only the context (environment
        // overrides would point at some other server).
        let ctx = match context::load() {
            Ok(Some(ctx)) => ctx,
            Ok(None) => bail!(
                "the server started but wrote no CLI context file; see {}",
                log_path.display()
            ),
            Err(e) => return Err(e),
        };
        let client = client_for(&Target {
            addr: ctx.api_addr,
            token: ctx.admin_token,
            ca_pem: ctx.ca_pem,
        })?;
        match client.get::<serde_json::Value>("/v1/server").await {
            Ok(_) => {
                // The server's output is a file, so it wrote the admin token to an owner-only
                // file rather than into its log; say where, since nothing else will.
                let token_file = dir.join(crate::server::ADMIN_TOKEN_FILE);
                let ctx_path = context::path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                if token_file.exists() {
                    eprintln!(
                        "waypost: the admin token is in {} (and in the CLI context {ctx_path})",
                        token_file.display()
                    );
                } else {
                    eprintln!("waypost: the admin token is in the CLI context {ctx_path}");
                }
                eprintln!("waypost: stop the server with: kill {pid}");
                return Ok(client);
            }
            Err(e) => last_err = format!("{e:#}"),
        }
    }
}

/// Whether process `pid` exists. The server is not our child (see the module doc), so it never
/// lingers as our zombie: once it exits, its new parent reaps it and the pid is gone.
fn alive(pid: libc::pid_t) -> bool {
    // Signal 0 only checks that the process exists: EPERM means it does (as another user).
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    }
}

/// `waypost __detach --log FILE -- ARGS...`: starts `waypost ARGS...` in its own session with
/// stdin from /dev/null and stdout+stderr appended to FILE, prints its pid, and exits at once,
/// so the started process is re-parented away from our caller.
pub fn detach(log: &Path, args: &[String]) -> Result<i32> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // 0600 like everything else in the data dir (the server tightens an older, looser one).
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the waypost executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own session, away from the caller's terminal: a Ctrl-C there does not stop it.
    crate::sys::new_session_on_spawn(&mut cmd);
    let child = cmd.spawn().context("spawning")?;
    println!("{}", child.id());
    Ok(0)
}

fn last_log_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(empty log)".to_string())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// --entrypoint-binary, else next to this executable, else the musl build in the current
/// directory, else PATH.
fn find_entrypoint(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if is_executable(p) {
            return Ok(p.to_path_buf());
        }
        bail!(
            "--entrypoint-binary {}: not an executable file",
            p.display()
        );
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(ENTRYPOINT));
    }
    candidates.push(PathBuf::from(MUSL_BUILD));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(ENTRYPOINT)));
    }
    candidates.into_iter().find(|p| is_executable(p)).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot find {ENTRYPOINT}: pass --entrypoint-binary PATH, put it next to waypost or on \
             PATH, or build it with `make build`"
        )
    })
}
