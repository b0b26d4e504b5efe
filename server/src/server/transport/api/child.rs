//! `POST /v1/apps/{app}/restart` and `POST /v1/apps/{app}/signal`: an operator restarts an app's
//! instances, or sends their children a signal (`waypost restart`, `waypost signal`). Each live
//! instance held by this replica gets a `ChildControl` frame (docs/protocol.md); the entrypoint
//! restarts the child as a config change would, or passes the signal on under its stop timeout.
//! Instances held by other replicas are counted, not reached (run the command against their
//! replica).

use super::{ApiError, ApiResult, require_app};
use crate::server::store;
use crate::server::transport::Shared;
use crate::util;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use waypost_proto::ChildControl;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/apps/{app}/restart", post(restart))
        .route("/apps/{app}/signal", post(signal))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Body {
    /// A hex prefix of one instance's id (default: every live instance).
    #[serde(default)]
    instance: Option<String>,
    /// `signal` only: a name (`HUP`, `SIGUSR1`) or a number.
    #[serde(default)]
    signal: Option<String>,
}

fn check_prefix(p: &Option<String>) -> ApiResult<()> {
    if let Some(p) = p {
        if p.is_empty() || p.len() > 32 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::bad(format!(
                "invalid instance id {p:?}: a hex prefix of an instance id"
            )));
        }
    }
    Ok(())
}

async fn send(s: &Shared, app: &str, b: &Body, control: ChildControl) -> ApiResult<Json<Value>> {
    check_prefix(&b.instance)?;
    require_app(s, app).await?;
    let sent = s.mux.control_children(app, b.instance.as_deref(), &control);
    let name = app.to_string();
    let rows = s
        .store
        .call(move |db| store::list_instances(db, Some(&name), false))
        .await?;
    let prefix = b.instance.as_deref().map(str::to_ascii_lowercase);
    let elsewhere: Vec<String> = rows
        .iter()
        .filter(|r| {
            r.replica.as_deref().is_some_and(|rep| rep != s.replica)
                && prefix.as_deref().is_none_or(|p| r.id.starts_with(p))
        })
        .map(|r| r.id.clone())
        .collect();
    if sent.is_empty() && elsewhere.is_empty() {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            match &b.instance {
                Some(p) => format!("app {app} has no live instance whose id starts with {p}"),
                None => format!("app {app} has no live instance"),
            },
        ));
    }
    Ok(Json(json!({
        "instances": sent.iter().map(|id| util::hex(id)).collect::<Vec<_>>(),
        "elsewhere": elsewhere,
    })))
}

async fn restart(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<Body>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(b) = body?;
    if b.signal.is_some() {
        return Err(ApiError::bad("restart takes no signal (see /signal)"));
    }
    let r = send(
        &s,
        &app,
        &b,
        ChildControl {
            restart: true,
            signal: 0,
        },
    )
    .await?;
    tracing::info!(
        app,
        instances = r["instances"].as_array().map_or(0, Vec::len),
        "restart requested"
    );
    Ok(r)
}

async fn signal(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<Body>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(b) = body?;
    let Some(name) = &b.signal else {
        return Err(ApiError::bad("which signal? e.g. {\"signal\": \"SIGHUP\"}"));
    };
    let canonical = crate::server::model::config::normalize_signal(name).map_err(ApiError::bad)?;
    let number = waypost_proto::signal::from_name(&canonical)
        .ok_or_else(|| ApiError::bad(format!("unknown signal {name:?}")))?;
    if number == libc::SIGCHLD {
        return Err(ApiError::bad("SIGCHLD cannot be sent to an app"));
    }
    let r = send(
        &s,
        &app,
        &b,
        ChildControl {
            restart: false,
            signal: number,
        },
    )
    .await?;
    tracing::info!(
        app,
        signal = canonical,
        instances = r["instances"].as_array().map_or(0, Vec::len),
        "signal requested"
    );
    Ok(r)
}
