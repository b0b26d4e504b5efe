//! `waypost restart` and `waypost signal`: an operator restarts an app's instances or signals
//! their children (transport/api/child.rs). `restart` waits until each instance reports a new
//! start (its `starts` count grew), so a script knows the restart happened.

use crate::util;
use anyhow::{Result, bail};
use clap::Args;
use hyper::Method;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct RestartArgs {
    /// The app (default: $WAYPOST_APP).
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: String,
    /// Only this instance (a unique prefix of its id); default: every live instance.
    #[arg(long)]
    instance: Option<String>,
    /// How long to wait for the instances to report their new start (0: do not wait).
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    timeout: String,
}

#[derive(Args)]
pub struct SignalArgs {
    /// The app (default: $WAYPOST_APP).
    #[arg(short = 'a', long, env = "WAYPOST_APP")]
    app: String,
    /// Only this instance (a unique prefix of its id); default: every live instance.
    #[arg(long)]
    instance: Option<String>,
    /// HUP, SIGUSR1, TERM, 15, …; a terminating signal ends the app (and its entrypoint) unless
    /// the app handles it, with SIGKILL after the entrypoint's stop timeout.
    signal: String,
}

fn check(app: &str) -> Result<()> {
    if !util::valid_app_name(app) {
        bail!("invalid app name {app:?}");
    }
    Ok(())
}

/// Every live instance's `starts`, by id.
async fn starts(c: &crate::client::ApiClient, app: &str) -> Result<HashMap<String, u64>> {
    let v: Value = c.get(&format!("/v1/instances?app={app}")).await?;
    Ok(v["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i["id"].as_str()?.to_string(), i["starts"].as_u64()?)))
        .collect())
}

fn elsewhere_note(v: &Value) {
    let others: Vec<&str> = v["elsewhere"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !others.is_empty() {
        eprintln!(
            "note: {} instance(s) are held by other server replicas and were not reached ({}): their replica has no --peer-addr or cannot be reached; \
             run the command against their replica",
            others.len(),
            others
                .iter()
                .map(|i| &i[..8.min(i.len())])
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

pub async fn restart(a: RestartArgs) -> Result<()> {
    check(&a.app)?;
    let timeout =
        util::parse_duration(&a.timeout).map_err(|e| anyhow::anyhow!("invalid --timeout: {e}"))?;
    let c = super::client()?;
    let before = starts(&c, &a.app).await?;
    let v: Value = c
        .call(
            Method::POST,
            &format!("/v1/apps/{}/restart", a.app),
            Some(&json!({ "instance": a.instance })),
        )
        .await?;
    let sent: Vec<String> = v["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str().map(str::to_string))
        .collect();
    elsewhere_note(&v);
    if timeout.is_zero() || sent.is_empty() {
        println!("restart requested for {} instance(s)", sent.len());
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<String> = sent.clone();
    while !pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = starts(&c, &a.app).await?;
        pending.retain(|id| {
            let done = match (before.get(id), now.get(id)) {
                (Some(b), Some(n)) => n > b,
                _ => false,
            };
            if done {
                println!("instance {}: restarted", &id[..8.min(id.len())]);
            }
            !done
        });
    }
    if !pending.is_empty() {
        bail!(
            "{} instance(s) did not report a restart within {}: {} (an entrypoint older than \
             this server ignores restart requests; a child that does not stop is killed after its \
             stop timeout)",
            pending.len(),
            a.timeout,
            pending
                .iter()
                .map(|i| &i[..8.min(i.len())])
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

pub async fn signal(a: SignalArgs) -> Result<()> {
    check(&a.app)?;
    crate::server::config::normalize_signal(&a.signal).map_err(anyhow::Error::msg)?;
    let c = super::client()?;
    let v: Value = c
        .call(
            Method::POST,
            &format!("/v1/apps/{}/signal", a.app),
            Some(&json!({ "instance": a.instance, "signal": a.signal })),
        )
        .await?;
    let n = v["instances"].as_array().map_or(0, Vec::len);
    println!("sent {} to {n} instance(s) of {}", a.signal, a.app);
    elsewhere_note(&v);
    Ok(())
}
