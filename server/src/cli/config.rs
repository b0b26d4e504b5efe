//! `waypost config …`: the configuration of an app or of every app (`--global`), through the
//! API's config endpoints (transport/api/config.rs): variables (plain, templates, internal,
//! secret, dynamic from a config source, per deployment or label selector), files, the on-change
//! policy, history and rollback, dotenv import, and the config sources. Input is checked here
//! first (same rules as the server, which checks again) so mistakes are reported before
//! anything is sent.

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
    /// and/or files (--file /path/in/app=@localfile). Values are templates: ${OTHER},
    /// ${internal.KEY}, ${default(X, "d")}, ${base64(X)}, ${json(X)}, ${trim(X)}; $${ is a
    /// literal ${. Instances get the new config at once.
    Set(SetArgs),
    /// Remove variables (KEY...) and/or files (--file /path/in/app).
    Unset(UnsetArgs),
    /// Show the variables (with their scope and, for dynamic ones, whether they are current),
    /// files, policy and version.
    List(ListArgs),
    /// Print the value one variable has for the app's instances (secrets masked unless --reveal).
    Get(GetArgs),
    /// How instances react to a change of files: restart (default), signal:NAME, or none.
    /// A change of variables always restarts the child (except with none).
    Policy(PolicyArgs),
    /// Set the variables of a dotenv file (KEY=VALUE lines, quotes, comments, `export`).
    Import(ImportArgs),
    /// The versions of the config (newest first): when, and which names changed.
    History(HistoryArgs),
    /// Make an earlier version the current config again (as a new version).
    Rollback(RollbackArgs),
    /// Config sources: where dynamic values are read from (OpenBao/Vault, etcd).
    #[command(subcommand)]
    Source(SourceCmd),
}

/// Which scope: an app, or every app.
#[derive(Args, Clone)]
pub struct Scope {
    /// The app (default: $WAYPOST_APP).
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: Option<String>,
    /// The global scope: applies to every app (an app's own definitions win).
    #[arg(long, conflicts_with = "app")]
    global: bool,
}

impl Scope {
    /// The app's name, or None for --global.
    fn resolve(&self) -> Result<Option<&str>> {
        match (&self.app, self.global) {
            (_, true) => Ok(None),
            (Some(a), false) => {
                check_app(a)?;
                Ok(Some(a))
            }
            (None, false) => bail!("which app? give -a APP (or --global for every app)"),
        }
    }
}

/// The API path of a scope's config (`/v1/apps/APP/config` or `/v1/config`), plus `rest`.
fn scope_path(app: Option<&str>, rest: &str) -> String {
    match app {
        Some(a) => format!("/v1/apps/{a}/config{rest}"),
        None => format!("/v1/config{rest}"),
    }
}

fn scope_text(app: Option<&str>) -> String {
    match app {
        Some(a) => format!("app {a}"),
        None => "global config".into(),
    }
}

#[derive(Args)]
pub struct SetArgs {
    #[command(flatten)]
    scope: Scope,
    /// Set the variables for this deployment only (overriding the app-wide values).
    #[arg(long)]
    deployment: Option<String>,
    /// Set the variables only for instances with these labels (k=v, repeatable or k=v,k2=v2);
    /// narrower than app-wide, wider than --deployment.
    #[arg(long = "where", value_name = "LABEL=VALUE")]
    selector: Vec<String>,
    /// The values are SOURCE:PATH#FIELD references read by the server from a config source
    /// (e.g. DB_PASS=bao:secret/data/web#password); with --file, the file's contents.
    #[arg(long)]
    dynamic: bool,
    /// Template-only variables: usable as ${internal.KEY}, never given to the app.
    #[arg(long)]
    internal: bool,
    /// Mask the values in listings (`config get --reveal` shows them).
    #[arg(long)]
    secret: bool,
    /// A file in the app's environment: /path/in/app=@localfile (or =literal contents, or with
    /// --dynamic =SOURCE:PATH#FIELD). Repeatable.
    #[arg(long = "file", value_name = "PATH=@LOCALFILE")]
    files: Vec<String>,
    /// Permission bits (octal) of the files given with --file (default 0644; 0600 for secret
    /// and dynamic files).
    #[arg(long)]
    mode: Option<String>,
    /// Render the files given with --file as templates over the variables.
    #[arg(long)]
    template: bool,
    #[arg(value_name = "KEY=VALUE")]
    pairs: Vec<String>,
}

#[derive(Args)]
pub struct UnsetArgs {
    #[command(flatten)]
    scope: Scope,
    /// Remove the deployment's own value (the app-wide one applies again).
    #[arg(long)]
    deployment: Option<String>,
    /// Remove the value set for this label selector (as given to `set --where`).
    #[arg(long = "where", value_name = "LABEL=VALUE")]
    selector: Vec<String>,
    /// The names are internal variables.
    #[arg(long)]
    internal: bool,
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
    #[command(flatten)]
    scope: Scope,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TextOrJson::Table)]
    output: TextOrJson,
}

#[derive(Args)]
pub struct GetArgs {
    /// The app (default: $WAYPOST_APP).
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: String,
    /// KEY, or internal.KEY
    key: String,
    /// Show a secret (or dynamic) value instead of masking it.
    #[arg(long)]
    reveal: bool,
    /// The value an instance of this deployment gets.
    #[arg(long)]
    deployment: Option<String>,
    /// The value an instance with these labels gets (k=v,k2=v2).
    #[arg(long)]
    labels: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TextOrJson::Table)]
    output: TextOrJson,
}

#[derive(Args)]
pub struct PolicyArgs {
    /// The app (default: $WAYPOST_APP).
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
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

#[derive(Args)]
pub struct ImportArgs {
    #[command(flatten)]
    scope: Scope,
    /// Mask the imported values in listings.
    #[arg(long)]
    secret: bool,
    /// The dotenv file (- for standard input).
    file: String,
}

#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    scope: Scope,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TextOrJson::Table)]
    output: TextOrJson,
}

#[derive(Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    scope: Scope,
    /// The version to restore (see `config history`).
    #[arg(value_name = "VERSION")]
    to: u64,
}

#[derive(Subcommand)]
pub enum SourceCmd {
    /// Add or change a source. A value of @FILE (token, AppRole, CA) reads a local file.
    Set(SourceSetArgs),
    /// The sources, global and per app.
    List(SourceListArgs),
    /// Remove a source (refused while a variable reads from it).
    Unset(SourceUnsetArgs),
}

#[derive(Args)]
pub struct SourceSetArgs {
    /// The name dynamic values refer to (SOURCE in SOURCE:PATH#FIELD).
    name: String,
    /// openbao | vault | etcd
    #[arg(long)]
    kind: String,
    /// Base URL, e.g. https://bao.internal:8200 or http://127.0.0.1:2379
    #[arg(long)]
    addr: String,
    /// CA certificate(s) (PEM file) trusted for https (default: the system's).
    #[arg(long, value_name = "FILE")]
    ca: Option<String>,
    /// OpenBao/Vault token (renewed by the server while renewable); etcd: USER:PASSWORD.
    #[arg(long, conflicts_with = "approle")]
    token: Option<String>,
    /// OpenBao/Vault AppRole login: ROLE_ID:SECRET_ID.
    #[arg(long, value_name = "ROLE_ID:SECRET_ID")]
    approle: Option<String>,
    /// How often values without a lease (KV) are read again, e.g. 30s (default). Leases are
    /// renewed at 2/3 of their TTL; etcd is watched.
    #[arg(long, value_name = "DURATION")]
    refresh: Option<String>,
    /// The app that owns the source (default: a global source every app can use).
    #[arg(short = 'a', long)]
    app: Option<String>,
}

#[derive(Args)]
pub struct SourceListArgs {
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TextOrJson::Table)]
    output: TextOrJson,
}

#[derive(Args)]
pub struct SourceUnsetArgs {
    name: String,
    /// The app that owns the source (default: the global source).
    #[arg(short = 'a', long)]
    app: Option<String>,
}

pub async fn run(cmd: ConfigCmd) -> Result<()> {
    match cmd {
        ConfigCmd::Set(a) => set(a).await,
        ConfigCmd::Unset(a) => unset(a).await,
        ConfigCmd::List(a) => list(a).await,
        ConfigCmd::Get(a) => get(a).await,
        ConfigCmd::Policy(a) => policy(a).await,
        ConfigCmd::Import(a) => import(a).await,
        ConfigCmd::History(a) => history(a).await,
        ConfigCmd::Rollback(a) => rollback(a).await,
        ConfigCmd::Source(SourceCmd::Set(a)) => source_set(a).await,
        ConfigCmd::Source(SourceCmd::List(a)) => source_list(a).await,
        ConfigCmd::Source(SourceCmd::Unset(a)) => source_unset(a).await,
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

/// `--where` values (each `k=v` or `k=v,k2=v2`) as one selector.
fn selector(values: &[String]) -> Result<Option<BTreeMap<String, String>>> {
    if values.is_empty() {
        return Ok(None);
    }
    let mut all = BTreeMap::new();
    for v in values {
        let labels = crate::server::model::labels::parse(v)
            .map_err(|e| anyhow::anyhow!("invalid --where {v:?}: {e}"))?;
        all.extend(labels);
    }
    Ok(Some(all))
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

async fn patch(app: Option<&str>, body: Value) -> Result<Value> {
    let c = super::client_for(&super::resolve_target()?)?;
    c.call(Method::PATCH, &scope_path(app, ""), Some(&body))
        .await
}

fn report(app: Option<&str>, v: &Value, what: &str) {
    let version = v["version"].as_u64().unwrap_or(0);
    let scope = scope_text(app);
    if v["changed"] == json!(true) {
        match v["instances"].as_array() {
            Some(list) => {
                let n = list.len();
                println!(
                    "{scope}: {what}; config version {version}, sent to {n} live instance{}",
                    if n == 1 { "" } else { "s" }
                );
            }
            None => println!("{scope}: {what}; version {version}, sent to every app's instances"),
        }
    } else {
        println!("{scope}: nothing changed (config version {version})");
    }
}

/// A KEY=VALUE argument: the key checked, the value read (@file) as UTF-8 text.
fn pair(p: &str) -> Result<(String, String)> {
    let Some((k, v)) = p.split_once('=') else {
        bail!("expected KEY=VALUE, got {p:?}");
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
    Ok((k.to_string(), text))
}

async fn set(a: SetArgs) -> Result<()> {
    let app = a.scope.resolve()?;
    check_deployment(&a.deployment)?;
    let sel = selector(&a.selector)?;
    if a.pairs.is_empty() && a.files.is_empty() {
        bail!("nothing to set: give KEY=VALUE pairs and/or --file /path/in/app=@localfile");
    }
    if (a.deployment.is_some() || sel.is_some()) && !a.files.is_empty() {
        bail!("config files belong to the whole app; set them without --deployment or --where");
    }
    let mut vars = BTreeMap::new();
    let mut dynamic = BTreeMap::new();
    for p in &a.pairs {
        let (k, v) = pair(p)?;
        if a.dynamic {
            rules::DynRef::parse(&v).map_err(anyhow::Error::msg)?;
            dynamic.insert(k, v);
        } else {
            crate::server::model::template::parse(&v)
                .map_err(|e| anyhow::anyhow!("the value of {k}: {e}"))?;
            vars.insert(k, v);
        }
    }
    let mode = match &a.mode {
        Some(m) => {
            let bits = u32::from_str_radix(m.trim(), 8)
                .map_err(|_| anyhow::anyhow!("invalid --mode {m:?}: use octal like 0640"))?;
            rules::check_mode(bits).map_err(anyhow::Error::msg)?;
            Some(bits)
        }
        None => None,
    };
    let mut files = Vec::new();
    for f in &a.files {
        let Some((path, v)) = f.split_once('=') else {
            bail!("expected --file /path/in/app=@localfile, got {f:?}");
        };
        rules::check_path(path).map_err(anyhow::Error::msg)?;
        let mut file =
            json!({ "path": path, "mode": mode, "template": a.template, "secret": a.secret });
        if a.dynamic {
            rules::DynRef::parse(v).map_err(anyhow::Error::msg)?;
            file["dynamic"] = json!(v);
        } else {
            let contents = value_bytes(v)?;
            if a.template {
                let text = std::str::from_utf8(&contents)
                    .map_err(|_| anyhow::anyhow!("{path}: a template must be UTF-8 text"))?;
                crate::server::model::template::parse(text)
                    .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            }
            file["contents_b64"] = json!(util::base64_encode(&contents));
        }
        files.push(file);
    }
    let mut what: Vec<String> = vars.keys().chain(dynamic.keys()).cloned().collect();
    what.extend(
        a.files
            .iter()
            .map(|f| f.split('=').next().unwrap_or("").to_string()),
    );
    let body = json!({
        "deployment": a.deployment,
        "where": sel,
        "set": vars,
        "dynamic": dynamic,
        "internal": a.internal,
        "secret": a.secret,
        "files": files,
    });
    let v = patch(app, body).await?;
    let mut target = a
        .deployment
        .as_deref()
        .map(|d| format!(" for deployment {d}"))
        .unwrap_or_default();
    if !a.selector.is_empty() {
        target = format!(" where {}", a.selector.join(","));
    }
    let kind = if a.internal { "internal " } else { "" };
    report(app, &v, &format!("set {kind}{}{target}", what.join(", ")));
    Ok(())
}

async fn unset(a: UnsetArgs) -> Result<()> {
    let app = a.scope.resolve()?;
    check_deployment(&a.deployment)?;
    let sel = selector(&a.selector)?;
    if a.keys.is_empty() && a.files.is_empty() {
        bail!("nothing to unset: give KEY names and/or --file /path/in/app");
    }
    if (a.deployment.is_some() || sel.is_some()) && !a.files.is_empty() {
        bail!("config files belong to the whole app; unset them without --deployment or --where");
    }
    for k in &a.keys {
        rules::check_key(k).map_err(anyhow::Error::msg)?;
    }
    for p in &a.files {
        rules::check_path(p).map_err(anyhow::Error::msg)?;
    }
    let body = json!({
        "deployment": a.deployment,
        "where": sel,
        "internal": a.internal,
        "unset": a.keys,
        "unset_files": a.files,
    });
    let v = patch(app, body).await?;
    let mut what = a.keys.clone();
    what.extend(a.files.iter().cloned());
    report(app, &v, &format!("unset {}", what.join(", ")));
    Ok(())
}

async fn import(a: ImportArgs) -> Result<()> {
    let app = a.scope.resolve()?;
    let text = if a.file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file))?
    };
    let pairs = super::dotenv::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.file))?;
    if pairs.is_empty() {
        bail!("{} sets no variables", a.file);
    }
    let mut vars = BTreeMap::new();
    for (k, v) in pairs {
        rules::check_key(&k).map_err(|e| anyhow::anyhow!("{}: {e}", a.file))?;
        rules::check_value(&k, &v).map_err(|e| anyhow::anyhow!("{}: {e}", a.file))?;
        vars.insert(k, v);
    }
    let n = vars.len();
    let v = patch(app, json!({ "set": vars, "secret": a.secret })).await?;
    report(
        app,
        &v,
        &format!(
            "imported {n} variable{} from {}",
            if n == 1 { "" } else { "s" },
            a.file
        ),
    );
    Ok(())
}

async fn get(a: GetArgs) -> Result<()> {
    check_app(&a.app)?;
    let c = super::client_for(&super::resolve_target()?)?;
    let mut q = format!("key={}", util::percent_encode(&a.key));
    if a.reveal {
        q.push_str("&reveal=true");
    }
    if let Some(d) = &a.deployment {
        q.push_str(&format!("&deployment={}", util::percent_encode(d)));
    }
    if let Some(l) = &a.labels {
        q.push_str(&format!("&labels={}", util::percent_encode(l)));
    }
    let v: Value = c
        .get(&format!("/v1/apps/{}/config/value?{q}", a.app))
        .await?;
    if a.output == TextOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match v["value"].as_str() {
        Some(val) => {
            println!("{val}");
            if v["status"] == json!("stale") {
                eprintln!(
                    "warning: stale — reading {} fails: {}",
                    v["dynamic"].as_str().unwrap_or("?"),
                    v["error"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
        None => bail!(
            "{} has no value yet{}",
            a.key,
            match v["error"].as_str() {
                Some(e) => format!(": {e}"),
                None => match v["status"].as_str() {
                    Some(s) => format!(" ({s})"),
                    None => String::new(),
                },
            }
        ),
    }
}

async fn history(a: HistoryArgs) -> Result<()> {
    let app = a.scope.resolve()?;
    let c = super::client_for(&super::resolve_target()?)?;
    let v: Value = c.get(&scope_path(app, "/history")).await?;
    if a.output == TextOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let versions = v["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        println!("{}: no versions yet", scope_text(app));
        return Ok(());
    }
    let current = v["current"].as_u64().unwrap_or(0);
    let mut rows = vec![vec!["VERSION".to_string(), "WHEN".into(), "CHANGES".into()]];
    for h in versions {
        let ver = h["version"].as_u64().unwrap_or(0);
        rows.push(vec![
            if ver == current {
                format!("{ver} (current)")
            } else {
                ver.to_string()
            },
            h["at"].as_str().unwrap_or("").to_string(),
            h["summary"].as_str().unwrap_or("").to_string(),
        ]);
    }
    super::print_table(&rows);
    Ok(())
}

async fn rollback(a: RollbackArgs) -> Result<()> {
    let app = a.scope.resolve()?;
    let c = super::client_for(&super::resolve_target()?)?;
    let v: Value = c
        .call(
            Method::POST,
            &scope_path(app, "/rollback"),
            Some(&json!({ "version": a.to })),
        )
        .await?;
    report(app, &v, &format!("rolled back to version {}", a.to));
    Ok(())
}

/// `@FILE` → the file's text (trimmed of a final newline); anything else → itself.
fn text_or_file(flag: &str, v: &str) -> Result<String> {
    match v.strip_prefix('@') {
        Some(path) => {
            let t =
                std::fs::read_to_string(path).with_context(|| format!("{flag}: reading {path}"))?;
            Ok(t.trim_end_matches(['\n', '\r']).to_string())
        }
        None => Ok(v.to_string()),
    }
}

async fn source_set(a: SourceSetArgs) -> Result<()> {
    rules::check_source_name(&a.name).map_err(anyhow::Error::msg)?;
    if let Some(app) = &a.app {
        check_app(app)?;
    }
    let ca = match &a.ca {
        Some(f) => {
            let path = f.strip_prefix('@').unwrap_or(f);
            Some(std::fs::read_to_string(path).with_context(|| format!("--ca: reading {path}"))?)
        }
        None => None,
    };
    let token = a
        .token
        .as_deref()
        .map(|t| text_or_file("--token", t))
        .transpose()?;
    let approle = a
        .approle
        .as_deref()
        .map(|t| text_or_file("--approle", t))
        .transpose()?;
    let refresh_ms = a
        .refresh
        .as_deref()
        .map(|r| duration_ms("--refresh", r))
        .transpose()?;
    let body = json!({
        "kind": a.kind,
        "addr": a.addr,
        "ca": ca,
        "token": token,
        "approle": approle,
        "refresh_ms": refresh_ms,
    });
    let c = super::client_for(&super::resolve_target()?)?;
    let q = a
        .app
        .as_deref()
        .map(|app| format!("?app={app}"))
        .unwrap_or_default();
    let v: Value = c
        .call(
            Method::PUT,
            &format!("/v1/config/sources/{}{q}", a.name),
            Some(&body),
        )
        .await?;
    println!(
        "config source {} ({}, {}) set{}",
        a.name,
        v["kind"].as_str().unwrap_or("?"),
        v["addr"].as_str().unwrap_or("?"),
        a.app
            .as_deref()
            .map(|x| format!(" for app {x}"))
            .unwrap_or_default()
    );
    Ok(())
}

async fn source_list(a: SourceListArgs) -> Result<()> {
    let c = super::client_for(&super::resolve_target()?)?;
    let v: Value = c.get("/v1/config/sources").await?;
    if a.output == TextOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let list = v["sources"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no config sources");
        return Ok(());
    }
    let mut rows = vec![vec![
        "NAME".to_string(),
        "SCOPE".into(),
        "KIND".into(),
        "ADDRESS".into(),
        "AUTH".into(),
        "REFRESH".into(),
        "PATHS".into(),
    ]];
    for s in list {
        rows.push(vec![
            s["name"].as_str().unwrap_or("").to_string(),
            match s["app"].as_str() {
                Some(app) => format!("app {app}"),
                None => "global".into(),
            },
            s["kind"].as_str().unwrap_or("").to_string(),
            s["addr"].as_str().unwrap_or("").to_string(),
            s["auth"].as_str().unwrap_or("").to_string(),
            ms_text(s["refresh_ms"].as_u64().unwrap_or(0)),
            s["paths"].to_string(),
        ]);
    }
    super::print_table(&rows);
    Ok(())
}

async fn source_unset(a: SourceUnsetArgs) -> Result<()> {
    let c = super::client_for(&super::resolve_target()?)?;
    let q = a
        .app
        .as_deref()
        .map(|app| format!("?app={app}"))
        .unwrap_or_default();
    let _: Value = c
        .call(
            Method::DELETE,
            &format!("/v1/config/sources/{}{q}", a.name),
            None,
        )
        .await?;
    println!("config source {} removed", a.name);
    Ok(())
}

fn duration_ms(flag: &str, s: &str) -> Result<u64> {
    let d = util::parse_duration(s).map_err(|e| anyhow::anyhow!("invalid {flag}: {e}"))?;
    Ok(d.as_millis().min(u64::MAX as u128) as u64)
}

async fn policy(a: PolicyArgs) -> Result<()> {
    check_app(&a.app)?;
    let app = Some(a.app.as_str());
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
    let v = patch(app, json!({ "policy": policy })).await?;
    report(app, &v, &format!("policy {}", policy_text(&v["policy"])));
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
    let app = a.scope.resolve()?;
    let c = super::client_for(&super::resolve_target()?)?;
    let v: Value = c.get(&scope_path(app, "")).await?;
    if a.output == TextOrJson::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}, config version {}", scope_text(app), v["version"]);
    if app.is_some() {
        println!("policy: {}", policy_text(&v["policy"]));
    }
    let mut rows = vec![vec![
        "VARIABLE".to_string(),
        "SCOPE".into(),
        "VALUE".into(),
        "STATUS".into(),
    ]];
    let mut stale = 0;
    for e in v["entries"].as_array().into_iter().flatten() {
        let mut name = e["key"].as_str().unwrap_or("").to_string();
        if e["internal"] == json!(true) {
            name = format!("internal.{name}");
        }
        let mut scope = e["scope"].as_str().unwrap_or("").to_string();
        if let Some(d) = e["deployment"].as_str() {
            scope = format!("{scope}, deployment {d}");
        }
        if let Some(w) = e["where"].as_str() {
            scope = format!("{scope}, where {w}");
        }
        let value = match (e["value"].as_str(), e["dynamic"].as_str()) {
            (Some(val), _) => one_line(val),
            (None, Some(r)) => format!("<{r}>"),
            _ => String::new(),
        };
        let status = match (e["status"].as_str(), e["error"].as_str()) {
            (Some(s), Some(err)) => {
                if s == "stale" || s == "failed" {
                    stale += 1;
                }
                format!("{s}: {}", one_line(err))
            }
            (Some(s), None) => s.to_string(),
            _ => String::new(),
        };
        let mut flags = Vec::new();
        if e["secret"] == json!(true) {
            flags.push("secret");
        }
        let value = if flags.is_empty() {
            value
        } else {
            format!("{value} [{}]", flags.join(","))
        };
        rows.push(vec![name, scope, value, status]);
    }
    println!();
    if rows.len() == 1 {
        println!("no variables");
    } else {
        super::print_table(&rows);
    }
    let mut rows = vec![vec![
        "FILE".to_string(),
        "SCOPE".into(),
        "MODE".into(),
        "CONTENTS".into(),
        "STATUS".into(),
    ]];
    for f in v["files"].as_array().into_iter().flatten() {
        let contents = match (f["dynamic"].as_str(), f["size"].as_u64()) {
            (Some(r), _) => format!("<{r}>"),
            (None, Some(n)) => {
                let mut s = util::fmt_bytes(n);
                if f["template"] == json!(true) {
                    s.push_str(" template");
                }
                s
            }
            _ => String::new(),
        };
        let status = match (f["status"].as_str(), f["error"].as_str()) {
            (Some(s), Some(err)) => format!("{s}: {}", one_line(err)),
            (Some(s), None) => s.to_string(),
            _ => String::new(),
        };
        rows.push(vec![
            f["path"].as_str().unwrap_or("").to_string(),
            f["scope"].as_str().unwrap_or("").to_string(),
            f["mode"].as_str().unwrap_or("").to_string(),
            contents,
            status,
        ]);
    }
    println!();
    if rows.len() == 1 {
        println!("no files");
    } else {
        super::print_table(&rows);
    }
    if stale > 0 {
        println!();
        println!(
            "{stale} dynamic value(s) cannot be read now: instances keep their last good values"
        );
    }
    let instances = v["instances"].as_array().cloned().unwrap_or_default();
    if !instances.is_empty() {
        println!();
        let mut rows = vec![vec![
            "INSTANCE".to_string(),
            "DEPLOYMENT".into(),
            "LABELS".into(),
            "APPLIED".into(),
        ]];
        for i in instances {
            let mut applied = format!("version {}", i["applied_version"]);
            if let Some(e) = i["error"].as_str() {
                applied.push_str(&format!(" (failed: {e})"));
            }
            let labels: Vec<String> = i["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            rows.push(vec![
                i["id"].as_str().unwrap_or("").chars().take(8).collect(),
                match i["deployment"].as_str() {
                    Some("") | None => "-".into(),
                    Some(d) => d.to_string(),
                },
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
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
