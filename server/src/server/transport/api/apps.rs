//! `DELETE /v1/apps/{name}[?force=true]` (`waypost app delete`): the app and everything of it
//! (store/apps.rs). Admin only, like every route.
//!
//! - 200 `{app, disconnected_instances, deleted: {tokens, instances, live_instances, log_lines,
//!   config_versions, config_sources, domains, url_auth}}`;
//! - 409 while instances of the app are live (on any replica) and `force` is not given: the
//!   message says how many and how to force it. With `force` the connections this replica holds
//!   are closed first (a Reject, as for a revoked token: the entrypoints retry and are refused,
//!   their tokens are gone with the app), and the rows of the rest are deleted with the app;
//! - 404 no such app; 400 an invalid name.

use super::{ApiError, ApiResult, AppState};
use crate::server::model::logs::Retention;
use crate::server::store::{self, apps::DeleteApp};
use crate::server::transport::control;
use crate::util;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::delete;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// How long a forced delete waits for the connections it closed to end before it deletes the
/// rows, so they stop writing (status, logs) before their app is gone.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// The reason a connection closed by a delete is logged with.
const CLOSE_REASON: &str = "its app was deleted";

pub fn routes() -> Router<AppState> {
    Router::new().route("/apps/{app}", delete(delete_app))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete_app(
    State(s): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    if !util::valid_app_name(&name) {
        return Err(ApiError::bad(format!("invalid app name {name:?}")));
    }
    super::require_app(&s, &name).await?;
    let mut closed = 0;
    if q.force {
        closed = s
            .live
            .close_app(&name, CLOSE_REASON, control::revoked_goodbye);
        let deadline = Instant::now() + CLOSE_WAIT;
        while s.live.count_app(&name) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let app = name.clone();
    let force = q.force;
    let d = match s
        .store
        .call(move |c| store::apps::delete_app(c, &app, force))
        .await?
    {
        DeleteApp::NoApp => return Err(ApiError::not_found(format!("no app named {name}"))),
        DeleteApp::Live(n) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "app {name} has {n} live instance{}; stop {} first, or delete it anyway with \
                     --force (`waypost app delete {name} --force` closes their connections)",
                    if n == 1 { "" } else { "s" },
                    if n == 1 { "it" } else { "them" },
                ),
            ));
        }
        DeleteApp::Deleted(d) => d,
    };
    // Any that connected while the rows were going (their tokens are gone now: they cannot again).
    if force {
        closed += s
            .live
            .close_app(&name, CLOSE_REASON, control::revoked_goodbye);
    }
    // This replica's caches; the others hear of it from the database (store/apps.rs). The delete
    // is committed: a cache that fails to reload is logged, not reported as a failed delete.
    let mut reloads = vec![s.config.reload(&name).await];
    if d.config_sources > 0 {
        reloads.push(s.config.reload(store::config::SOURCES_CHANGED).await);
    }
    if !d.domains.is_empty() {
        reloads.push(s.https.domains.reload(&s.store).await);
    }
    for e in reloads.into_iter().filter_map(Result::err) {
        tracing::warn!(
            app = name,
            error = format!("{e:#}"),
            "after deleting an app: reloading a cache failed"
        );
    }
    s.urlauth.invalidate(&name);
    // The log writer forgets the app's retention (an app created under the name starts with the
    // defaults).
    s.logs.retention_changed(&name, Retention::default());
    tracing::info!(
        app = name,
        disconnected = closed,
        tokens = d.tokens,
        instances = d.instances,
        log_lines = d.log_lines,
        domains = d.domains.len(),
        "app deleted"
    );
    Ok(Json(json!({
        "app": name,
        "disconnected_instances": closed,
        "deleted": d,
    })))
}
