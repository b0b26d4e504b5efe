//! `waypost config set|unset|list|policy`: the app's configuration, through
//! `GET/PATCH /v1/apps/{app}/config`. Input is checked here first (same rules as the server,
//! which checks again) so mistakes are reported before anything is sent.

use crate::server::config as rules;
use crate::util;
use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Set variables (KEY=VALUE; a VALUE of @FILE reads a local file, @@ starts a literal @)
    /// and/or files (--file /path/in/app=@localfile). Instances get the new config at once.
    Set(SetArgs),
    /// Remove variables (KEY...) and/or files (--file /path/in/app).
    Unset(UnsetArgs),
    /// Show the app's variables (app-wide and per deployment), files, policy and version.
    List(ListArgs),
    /// How instances react to a change of files: restart (default), signal:NAME, or none.
    /// A change of variables always restarts the child (except with none).
    Policy(PolicyArgs),
}

#[derive(Args)]
pub struct SetArgs {
    #[arg(long)]
    app: String,
    /// Set the variables for this deployment only (overriding the app-wide values).
    #[arg(long)]
    deployment: Option<String>,
    /// A file in the app's environment: /path/in/app=@localfile (or =literal contents).
    /// Repeatable.
    #[arg(long = "file", value_name = "PATH=@LOCALFILE")]
    files: Vec<String>,
    /// Permission bits (octal) of the files given with --file.
    #[arg(long, default_value = "0644")]
    mode: String,
    #[arg(value_name = "KEY=VALUE")]
    pairs: Vec<String>,
}

#[derive(Args)]
pub struct UnsetArgs {
    #[arg(long)]
    app: String,
    /// Remove the deployment's own value (the app-wide one applies again).
    #[arg(long)]
    deployment: Option<String>,
    /// A config file to remove (its path in the app); repeatable.
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<String>,
    #[arg(value_name = "KEY")]
    keys: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TextOrJson {
    Table,
    Json,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    app: String,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TextOrJson::Table)]
    output: TextOrJson,
}

#[derive(Args)]
pub struct PolicyArgs {
    #[arg(long)]
    app: String,
    /// restart | signal:NAME (e.g. signal:SIGHUP) | none
    #[arg(long, value_name = "POLICY")]
    on_change: Option<String>,
    /// Each instance waits a random delay up to this before restarting or signalling (e.g.
    /// 10s; 0 = at once). Default 5s.
    #[arg(long, value_name = "DURATION")]
    splay: Option<String>,
    /// How long a restart waits for the child after SIGTERM before SIGKILL (0 = the
    /// entrypoint's WAYPOST_STOP_TIMEOUT).
    #[arg(long, value_name = "DURATION")]
    stop_grace: Option<String>,
}

pub async fn run(cmd: ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Set(a) => set(a).await,
        ConfigCmd::Unset(a) => unset(a).await,
        ConfigCmd::List(a) => list(a).await,
        ConfigCmd::Policy(a) => policy(a).await,
    }
}

fn check_app(app: &str) -> Result<()> {
    if !util::valid_app_name(app) {
        bail!("invalid app name {app:?}");
    }
    Ok(())
}

fn check_deployment(d: &Option<String>) -> Result<()> {
    if let Some(d) = d {
        rules::check_deployment(d).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// A single value or file this big can never fit the snapshot frame; refused before sending.
const MAX_VALUE: u64 = waypost_proto::MAX_FRAME as u64;

/// `@file` → the file's bytes; `@@x` → literal `@x`; anything else → itself.
fn value_bytes(v: &str) -> Result<Vec<u8>> {
    if let Some(rest) = v.strip_prefix("@@") {
        return Ok(format!("@{rest}").into_bytes());
    }
    let Some(path) = v.strip_prefix('@') else {
        return Ok(v.as_bytes().to_vec());
    };
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {path}"))?
        .len();
    if size > MAX_VALUE {
        bail!(
            "{path} is {} bytes, over the limit of one 1 MiB config frame; nothing was changed",
            size
        );
    }
    std::fs::read(path).with_context(|| format!("reading {path}"))
}

async fn patch(app: &str, body: Value) -> Result<Value> {
    let c = super::client_for(&super::resolve_target()?)?;
    c.call(
        Method::PATCH,
        &format!("/v1/apps/{app}/config"),
        Some(&body),
    )
    .await
}

fn report(app: &str, v: &Value, what: &str) {
    let version = v["version"].as_u64().unwrap_or(0);
    if v["changed"] == json!(true) {
        let n = v["instances"].as_array().map_or(0, Vec::len);
        println!(
            "app {app}: {what}; config version {version}, sent to {n} live instance{}",
            if n == 1 { "" } else { "s" }
        );
    } else {
        println!("app {app}: nothing changed (config version {version})");
    }
}

async fn set(a: SetArgs) -> Result<()> {
    check_app(&a.app)?;
    check_deployment(&a.deployment)?;
    if a.pairs.is_empty() && a.files.is_empty() {
        bail!("nothing to set: give KEY=VALUE pairs and/or --file /path/in/app=@localfile");
    }
    if a.deployment.is_some() && !a.files.is_empty() {
        bail!("config files belong to the whole app; set them without --deployment");
    }
    let mut vars = BTreeMap::new();
    for pair in &a.pairs {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("expected KEY=VALUE, got {pair:?}");
        };
        rules::check_key(k).map_err(anyhow::Error::msg)?;
        let bytes = value_bytes(v)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "the value of {k} is not UTF-8 text; variables hold text (put binary data in a \
                 file with --file)"
            )
        })?;
        rules::check_value(k, &text).map_err(anyhow::Error::msg)?;
        vars.insert(k.to_string(), text);
    }
    let mode = u32::from_str_radix(a.mode.trim(), 8)
        .map_err(|_| anyhow::anyhow!("invalid --mode {:?}: use octal like 0640", a.mode))?;
    rules::check_mode(mode).map_err(anyhow::Error::msg)?;
    let mut files = Vec::new();
    for f in &a.files {
        let Some((path, v)) = f.split_once('=') else {
            bail!("expected --file /path/in/app=@localfile, got {f:?}");
        };
        rules::check_path(path).map_err(anyhow::Error::msg)?;
        let contents = value_bytes(v)?;
        files.push(json!({
            "path": path,
            "mode": mode,
            "contents_b64": util::base64_encode(&contents),
        }));
    }
    let mut what: Vec<String> = vars.keys().cloned().collect();
    what.extend(
        a.files
            .iter()
            .map(|f| f.split('=').next().unwrap_or("").to_string()),
    );
    let body = json!({ "deployment": a.deployment, "set": vars, "files": files });
    let v = patch(&a.app, body).await?;
    let scope = a
        .deployment
        .as_deref()
        .map(|d| format!(" for deployment {d}"))
        .unwrap_or_default();
    report(&a.app, &v, &format!("set {}{scope}", what.join(", ")));
    Ok(())
}

async fn unset(a: UnsetArgs) -> Result<()> {
    check_app(&a.app)?;
    check_deployment(&a.deployment)?;
    if a.keys.is_empty() && a.files.is_empty() {
        bail!("nothing to unset: give KEY names and/or --file /path/in/app");
    }
    if a.deployment.is_some() && !a.files.is_empty() {
        bail!("config files belong to the whole app; unset them without --deployment");
    }
    for k in &a.keys {
        rules::check_key(k).map_err(anyhow::Error::msg)?;
    }
    for p in &a.files {
        rules::check_path(p).map_err(anyhow::Error::msg)?;
    }
    let body = json!({ "deployment": a.deployment, "unset": a.keys, "unset_files": a.files });
    let v = patch(&a.app, body).await?;
    let mut what = a.keys.clone();
    what.extend(a.files.iter().cloned());
    report(&a.app, &v, &format!("unset {}", what.join(", ")));
    Ok(())
}

fn duration_ms(flag: &str, s: &str) -> Result<u64> {
    let d = util::parse_duration(s).map_err(|e| anyhow::anyhow!("invalid {flag}: {e}"))?;
    Ok(d.as_millis().min(u64::MAX as u128) as u64)
}

async fn policy(a: PolicyArgs) -> Result<()> {
    check_app(&a.app)?;
    if a.on_change.is_none() && a.splay.is_none() && a.stop_grace.is_none() {
        bail!("nothing to change: give --on-change, --splay and/or --stop-grace");
    }
    if let Some(p) = &a.on_change {
        rules::parse_on_change(p).map_err(anyhow::Error::msg)?;
    }
    let mut policy = serde_json::Map::new();
    if let Some(p) = &a.on_change {
        policy.insert("on_change".into(), json!(p));
    }
    if let Some(s) = &a.splay {
        policy.insert("splay_ms".into(), json!(duration_ms("--splay", s)?));
    }
    if let Some(g) = &a.stop_grace {
        policy.insert(
            "stop_grace_ms".into(),
            json!(duration_ms("--stop-grace", g)?),
        );
    }
    let v = patch(&a.app, json!({ "policy": policy })).await?;
    report(&a.app, &v, &format!("policy {}", policy_text(&v["policy"])));
    Ok(())
}

fn ms_text(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn policy_text(p: &Value) -> String {
    let splay = p["splay_ms"].as_u64().unwrap_or(0);
    let grace = p["stop_grace_ms"].as_u64().unwrap_or(0);
    format!(
        "on change {}, splay {}{}, stop grace {}",
        p["on_change"].as_str().unwrap_or("?"),
        ms_text(splay),
        if p["splay_default"] == json!(true) {
            " (default)"
        } else {
            ""
        },
        if grace == 0 {
            "the entrypoint's (WAYPOST_STOP_TIMEOUT)".to_string()
        } else {
            ms_text(grace)
        }
    )
}

/// A value on one line: control characters escaped, long values cut.
fn one_line(v: &str) -> String {
    let mut s: String = v.escape_debug().collect();
    if s.chars().count() > 80 {
        s = s.chars().take(77).collect::<String>() + "...";
    }
    s
}

async fn list(a: ListArgs) -> Result<()> {
    check_app(&a.app)?;
    let c = super::client_for(&super::resolve_target()?)?;
    let v: Value = c.get(&format!("/v1/apps/{}/config", a.app)).await?;
    if a.output == TextOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("app {}, config version {}", a.app, v["version"]);
    println!("policy: {}", policy_text(&v["policy"]));
    let mut rows = vec![vec!["VARIABLE".to_string(), "SCOPE".into(), "VALUE".into()]];
    if let Some(vars) = v["vars"].as_object() {
        for (k, val) in vars {
            rows.push(vec![
                k.clone(),
                "app".into(),
                one_line(val.as_str().unwrap_or("")),
            ]);
        }
    }
    if let Some(deps) = v["deployments"].as_object() {
        for (d, vars) in deps {
            for (k, val) in vars.as_object().into_iter().flatten() {
                rows.push(vec![
                    k.clone(),
                    format!("deployment {d}"),
                    one_line(val.as_str().unwrap_or("")),
                ]);
            }
        }
    }
    println!();
    if rows.len() == 1 {
        println!("no variables");
    } else {
        super::print_table(&rows);
    }
    let mut rows = vec![vec!["FILE".to_string(), "MODE".into(), "SIZE".into()]];
    for f in v["files"].as_array().into_iter().flatten() {
        rows.push(vec![
            f["path"].as_str().unwrap_or("").to_string(),
            f["mode"].as_str().unwrap_or("").to_string(),
            util::fmt_bytes(f["size"].as_u64().unwrap_or(0)),
        ]);
    }
    println!();
    if rows.len() == 1 {
        println!("no files");
    } else {
        super::print_table(&rows);
    }
    let instances = v["instances"].as_array().cloned().unwrap_or_default();
    if !instances.is_empty() {
        println!();
        let mut rows = vec![vec![
            "INSTANCE".to_string(),
            "DEPLOYMENT".into(),
            "APPLIED".into(),
        ]];
        for i in instances {
            let mut applied = format!("version {}", i["applied_version"]);
            if let Some(e) = i["error"].as_str() {
                applied.push_str(&format!(" (failed: {e})"));
            }
            rows.push(vec![
                i["id"].as_str().unwrap_or("").chars().take(8).collect(),
                match i["deployment"].as_str() {
                    Some("") | None => "-".into(),
                    Some(d) => d.to_string(),
                },
                applied,
            ]);
        }
        super::print_table(&rows);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_values() {
        assert_eq!(value_bytes("plain").unwrap(), b"plain");
        assert_eq!(value_bytes("@@lit").unwrap(), b"@lit");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        std::fs::write(&p, b"from file\n").unwrap();
        assert_eq!(
            value_bytes(&format!("@{}", p.display())).unwrap(),
            b"from file\n"
        );
        assert!(value_bytes("@/nonexistent/x").is_err());
    }
}
