//! `waypost url --app NAME`: prints the app's public URL (`http://NAME.DOMAIN[:PORT]/`, from the
//! server's `--url-domain` and ingress address) and who may reach it; `waypost url auth`
//! changes that (transport/api/urlauth.rs).

use crate::util;
use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Value, json};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UrlArgs {
    /// The app (default: $WAYPOST_APP).
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: Option<String>,
    #[command(subcommand)]
    cmd: Option<UrlCmd>,
}

#[derive(Subcommand)]
pub enum UrlCmd {
    /// Who may reach the app's URL: basic-auth users, bearer tokens, client networks. Without
    /// any, anyone who can reach the ingress can (the default for a new app).
    Auth(AuthArgs),
}

#[derive(Args)]
pub struct AuthArgs {
    /// The app (default: $WAYPOST_APP).
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: String,
    /// A basic-auth user (repeatable); a user given again gets the new password. PASSWORD
    /// of @FILE reads a file.
    #[arg(long, value_name = "USER:PASSWORD")]
    basic: Vec<String>,
    /// Create a bearer token (printed once; send it as `Authorization: Bearer TOKEN`).
    #[arg(long)]
    bearer: bool,
    /// Serve only visitors from this network (repeatable), e.g. 10.0.0.0/8; others get 403.
    #[arg(long, value_name = "CIDR")]
    allow_cidr: Vec<String>,
    /// Remove every user, token and network first (alone: the URL is open again).
    #[arg(long)]
    clear: bool,
}

/// The lines `url` prints about access control.
fn auth_text(v: &Value) -> String {
    if v["open"] == json!(true) {
        return "access: open to anyone who can reach the ingress (see `waypost url auth`)".into();
    }
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect()
    };
    let mut lines = vec!["access:".to_string()];
    let users = list("basic_users");
    if !users.is_empty() {
        lines.push(format!("  basic auth users: {}", users.join(", ")));
    }
    let tokens = list("bearer_tokens");
    if !tokens.is_empty() {
        lines.push(format!("  bearer tokens: {}", tokens.join(", ")));
    }
    let nets = list("allow_cidrs");
    if !nets.is_empty() {
        lines.push(format!("  only from: {}", nets.join(", ")));
    }
    lines.join("\n")
}

async fn auth(a: AuthArgs) -> Result<()> {
    if !util::valid_app_name(&a.app) {
        bail!("invalid app name {:?}", a.app);
    }
    if a.basic.is_empty() && !a.bearer && a.allow_cidr.is_empty() && !a.clear {
        bail!(
            "nothing to change: give --basic USER:PASSWORD, --bearer, --allow-cidr CIDR or --clear"
        );
    }
    let mut basic = Vec::new();
    for b in &a.basic {
        let (user, pass) = b
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--basic takes USER:PASSWORD"))?;
        let pass = match pass.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("--basic: reading {path}"))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            None => pass.to_string(),
        };
        crate::server::model::urlauth::parse_basic(&format!("{user}:{pass}"))
            .map_err(anyhow::Error::msg)?;
        basic.push(format!("{user}:{pass}"));
    }
    for c in &a.allow_cidr {
        crate::server::model::urlauth::Cidr::parse(c).map_err(anyhow::Error::msg)?;
    }
    let c = super::client()?;
    let v: Value = c
        .call(
            Method::PATCH,
            &format!("/v1/apps/{}/url/auth", a.app),
            Some(&json!({
                "basic": basic,
                "bearer": a.bearer,
                "allow_cidr": a.allow_cidr,
                "clear": a.clear,
            })),
        )
        .await?;
    if let Some(t) = v["new_bearer_token"].as_str() {
        println!("bearer token (shown once): {t}");
    }
    println!("app {}: {}", a.app, auth_text(&v));
    Ok(())
}

pub async fn run(a: UrlArgs) -> Result<()> {
    if let Some(UrlCmd::Auth(x)) = a.cmd {
        return auth(x).await;
    }
    let Some(app) = a.app else {
        bail!("which app? give -a APP");
    };
    let a = Shown { app };
    if !util::valid_app_name(&a.app) {
        bail!("invalid app name {:?}", a.app);
    }
    let c = super::client()?;
    let server: serde_json::Value = c.get("/v1/server").await?;
    // Also checks that the app exists (404 otherwise).
    let instances: serde_json::Value = c.get(&format!("/v1/instances?app={}", a.app)).await?;
    let domain = server["url_domain"]
        .as_str()
        .context("the server did not report its URL domain")?;
    let ingress = server["ingress_addr"]
        .as_str()
        .context("the server did not report an ingress address (is it older than this CLI?)")?;
    println!(
        "{}",
        crate::server::ingress::app_url(&a.app, domain, ingress)
    );
    // With the HTTPS ingress on (--ingress-tls-addr), its URL on the next line.
    if let Some(tls) = server["ingress_tls_addr"].as_str() {
        println!(
            "{}",
            crate::server::transport::ingress_tls::app_url(&a.app, domain, tls)
        );
    }
    // On stderr: stdout stays the URL alone, for `curl $(waypost url -a web)`.
    let access: Value = c.get(&format!("/v1/apps/{}/url/auth", a.app)).await?;
    eprintln!("{}", auth_text(&access));
    let live = instances["instances"].as_array().map_or(0, Vec::len);
    if live == 0 {
        eprintln!(
            "note: app {} has no live instance yet; the URL answers 502 until one connects",
            a.app
        );
    }
    Ok(())
}

/// The app `url` shows.
struct Shown {
    app: String,
}
