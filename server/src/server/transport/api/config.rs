//! `GET/PATCH /v1/apps/{app}/config`: an app's configuration and the instances' view of it.
//! The rules and the service are in model/config.rs and service/config.rs.

use super::{ApiError, ApiResult, require_app};
use crate::server::model::config::{AppConfig, Change, on_change_text};
use crate::server::service::config::ChangeError;
use crate::server::transport::Shared;
use crate::util;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/apps/{app}/config", get(get_config).patch(patch_config))
}

#[derive(Deserialize)]
struct GetQuery {
    /// Include each file's contents (base64).
    #[serde(default)]
    contents: bool,
}

#[derive(Serialize)]
struct FileJson {
    path: String,
    /// Octal, e.g. "0644".
    mode: String,
    size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    contents_b64: Option<String>,
}

fn view(
    s: &Shared,
    app: &str,
    cfg: &AppConfig,
    contents: bool,
    changed: Option<bool>,
) -> serde_json::Value {
    let p = &cfg.policy;
    let mut deployments = cfg.vars.clone();
    let vars = deployments.remove("").unwrap_or_default();
    let files: Vec<FileJson> = cfg
        .files
        .values()
        .map(|f| FileJson {
            path: f.path.clone(),
            mode: format!("{:04o}", f.mode),
            size: f.contents.len(),
            contents_b64: contents.then(|| util::base64_encode(&f.contents)),
        })
        .collect();
    let instances: Vec<serde_json::Value> = s
        .config
        .instances_of(app)
        .into_iter()
        .map(|(id, deployment, applied, error)| {
            json!({
                "id": id,
                "deployment": deployment,
                "applied_version": applied,
                "error": (!error.is_empty()).then_some(error),
            })
        })
        .collect();
    let mut v = json!({
        "app": app,
        "version": cfg.version,
        "vars": vars,
        "deployments": deployments,
        "files": files,
        "policy": {
            "on_change": on_change_text(p.action, &p.signal),
            "splay_ms": p.splay_ms(),
            "splay_default": p.splay_ms.is_none(),
            "stop_grace_ms": p.stop_grace_ms,
        },
        "instances": instances,
    });
    if let Some(changed) = changed {
        v["changed"] = json!(changed);
    }
    v
}

async fn get_config(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    q: Result<Query<GetQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = q?;
    require_app(&s, &app).await?;
    let cfg = s.config.app_config(&app).await?;
    Ok(Json(view(&s, &app, &cfg, q.contents, None)))
}

async fn patch_config(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<Change>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Json(change) = body?;
    let (cfg, changed) = s.config.change(&app, change).await.map_err(|e| match e {
        ChangeError::NoApp => ApiError::not_found(format!("no app named {app}")),
        ChangeError::Refused(msg) => ApiError::bad(msg),
        ChangeError::Failed(e) => ApiError::from(e),
    })?;
    Ok(Json(view(&s, &app, &cfg, false, Some(changed))))
}
