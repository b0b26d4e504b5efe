//! `waypost url --app NAME`: prints the app's public URL (`http://NAME.DOMAIN[:PORT]/`, from the
//! server's `--url-domain` and ingress address).

use crate::util;
use anyhow::{Context as _, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct UrlArgs {
    /// The app.
    #[arg(long)]
    app: String,
}

pub async fn run(a: UrlArgs) -> Result<()> {
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
    let live = instances["instances"].as_array().map_or(0, Vec::len);
    if live == 0 {
        eprintln!(
            "note: app {} has no live instance yet; the URL answers 502 until one connects",
            a.app
        );
    }
    Ok(())
}
