//! `waypost app delete NAME [--force]`: `DELETE /v1/apps/{name}` (transport/api/apps.rs).

use crate::util;
use anyhow::{Result, bail};
use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub struct DeleteArgs {
    /// The app to delete.
    name: String,
    /// Delete it even while instances of it are live: their connections are closed (the apps
    /// under them keep running; their entrypoints are refused from then on).
    #[arg(long)]
    force: bool,
}

/// Deletes the app with its tokens, instance history, config (and config history and sources),
/// logs, URL access control and custom domains.
pub async fn delete(a: DeleteArgs) -> Result<()> {
    if !util::valid_app_name(&a.name) {
        bail!("invalid app name {:?}", a.name);
    }
    let c = super::client_for(&super::resolve_target()?)?;
    let v: Value = c
        .call(
            hyper::Method::DELETE,
            &format!("/v1/apps/{}?force={}", a.name, a.force),
            None,
        )
        .await?;
    let d = &v["deleted"];
    let n = |k: &str| d[k].as_u64().unwrap_or(0);
    let domains = d["domains"].as_array().map_or(0, Vec::len);
    println!(
        "deleted app {} with {} token(s), {} instance record(s), {} log line(s), {} config \
         version(s){}{}",
        a.name,
        n("tokens"),
        n("instances"),
        n("log_lines"),
        n("config_versions"),
        if domains > 0 {
            format!(", {domains} custom domain(s)")
        } else {
            String::new()
        },
        match v["disconnected_instances"].as_u64().unwrap_or(0) {
            0 => String::new(),
            k => format!("; disconnected {k} live instance(s)"),
        }
    );
    Ok(())
}
