//! The configuration endpoints. Per app: `GET/PATCH /v1/apps/{app}/config`, `GET
//! …/config/value`, `GET …/config/history`, `POST …/config/rollback`. The global scope: the same
//! under `/v1/config`. Sources: `GET /v1/config/sources`, `PUT/DELETE
//! /v1/config/sources/{name}[?app=APP]`. The rules and the service are in model/config.rs and
//! service/config.rs; secrets (variables set with `secret`, dynamic values, source credentials)
//! never leave here unless asked for with `reveal`.

use super::{ApiError, ApiResult, require_app};
use crate::server::model::Labels;
use crate::server::model::config::{
    self as rules, Change, FileData, GLOBAL, ScopeConfig, Target, VarValue, View, on_change_text,
};
use crate::server::model::sources::{Auth, DEFAULT_REFRESH, SourceKind, SourceSpec};
use crate::server::service::config::ChangeError;
use crate::server::store;
use crate::server::transport::Shared;
use crate::util;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Shown instead of a secret value.
pub const MASK: &str = "(secret)";
/// Longest source address, CA or credential accepted.
const MAX_SOURCE_FIELD: usize = 64 * 1024;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/apps/{app}/config", get(get_app).patch(patch_app))
        .route("/apps/{app}/config/value", get(value_app))
        .route("/apps/{app}/config/history", get(history_app))
        .route("/apps/{app}/config/rollback", post(rollback_app))
        .route("/config", get(get_global).patch(patch_global))
        .route("/config/history", get(history_global))
        .route("/config/rollback", post(rollback_global))
        .route("/config/sources", get(list_sources))
        .route(
            "/config/sources/{name}",
            put(put_source).delete(delete_source),
        )
}

#[derive(Deserialize)]
struct GetQuery {
    /// Include each static file's contents (base64; secret files masked).
    #[serde(default)]
    contents: bool,
}

#[derive(Serialize)]
struct FileJson {
    path: String,
    /// Octal, e.g. "0644".
    mode: String,
    scope: &'static str,
    size: Option<usize>,
    secret: bool,
    template: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    dynamic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contents_b64: Option<String>,
}

fn scope_label(scope: &str) -> &'static str {
    if scope == GLOBAL { "global" } else { "app" }
}

/// Every definition of `cfg` (in `scope`) as listed: values masked when secret, dynamic ones
/// with their reference and how the resolver stands on them.
fn entries(s: &Shared, scope: &str, cfg: &ScopeConfig) -> Vec<Value> {
    cfg.vars
        .values()
        .map(|v| {
            let (value, dynamic, status, error) = match &v.value {
                VarValue::Text(t) => (
                    Some(if v.secret {
                        MASK.to_string()
                    } else {
                        t.clone()
                    }),
                    None,
                    None,
                    None,
                ),
                VarValue::Dynamic(r) => {
                    let st = s.config.resolver.status(scope, r);
                    (None, Some(r.to_string()), Some(st.state), st.error)
                }
            };
            json!({
                "key": v.key,
                "scope": scope_label(scope),
                "internal": v.internal,
                "secret": v.secret,
                "deployment": match &v.target { Target::Deployment(d) => Some(d), _ => None },
                "where": match &v.target {
                    Target::Labels(l) => Some(crate::server::model::labels::format(l)),
                    _ => None,
                },
                "value": value,
                "dynamic": dynamic,
                "status": status,
                "error": error,
            })
        })
        .collect()
}

fn files(s: &Shared, scope: &str, cfg: &ScopeConfig, contents: bool) -> Vec<FileJson> {
    cfg.files
        .values()
        .map(|f| {
            let (size, dynamic, status, error, template) = match &f.data {
                FileData::Bytes(b) => (Some(b.len()), None, None, None, false),
                FileData::Template(t) => (Some(t.len()), None, None, None, true),
                FileData::Dynamic(r) => {
                    let st = s.config.resolver.status(scope, r);
                    (None, Some(r.to_string()), Some(st.state), st.error, false)
                }
            };
            let contents_b64 = match &f.data {
                _ if !contents || f.secret => None,
                FileData::Bytes(b) => Some(util::base64_encode(b)),
                FileData::Template(t) => Some(util::base64_encode(t.as_bytes())),
                FileData::Dynamic(_) => None,
            };
            FileJson {
                path: f.path.clone(),
                mode: format!("{:04o}", f.mode),
                scope: scope_label(scope),
                size,
                secret: f.secret,
                template,
                dynamic,
                status,
                error,
                contents_b64,
            }
        })
        .collect()
}

/// The JSON of `GET /v1/apps/{app}/config`. `vars` and `deployments` keep their first-wave shape
/// (the app's own plain values, secrets masked); `entries` lists every definition, global ones
/// included.
fn app_view(
    s: &Shared,
    app: &str,
    global: &ScopeConfig,
    cfg: &ScopeConfig,
    contents: bool,
    changed: Option<bool>,
) -> Value {
    let p = &cfg.policy;
    let mut vars = serde_json::Map::new();
    let mut deployments: serde_json::Map<String, Value> = serde_json::Map::new();
    for v in cfg.vars.values().filter(|v| !v.internal) {
        let VarValue::Text(t) = &v.value else {
            continue;
        };
        let shown = if v.secret { MASK } else { t.as_str() };
        match &v.target {
            Target::All => {
                vars.insert(v.key.clone(), json!(shown));
            }
            Target::Deployment(d) => {
                deployments
                    .entry(d.clone())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .expect("an object")
                    .insert(v.key.clone(), json!(shown));
            }
            Target::Labels(_) => {}
        }
    }
    let mut all = entries(s, GLOBAL, global);
    all.extend(entries(s, app, cfg));
    let mut all_files = files(s, GLOBAL, global, contents);
    all_files.retain(|f| !cfg.files.contains_key(&f.path));
    all_files.extend(files(s, app, cfg, contents));
    let instances: Vec<Value> = s
        .config
        .instances_of(app)
        .into_iter()
        .map(|(id, deployment, labels, applied, error)| {
            json!({
                "id": id,
                "deployment": deployment,
                "labels": labels,
                "applied_version": applied,
                "error": (!error.is_empty()).then_some(error),
            })
        })
        .collect();
    let view = View {
        global,
        app_name: app,
        app: cfg,
    };
    let mut v = json!({
        "app": app,
        "version": view.version(),
        "scope_version": cfg.version,
        "vars": vars,
        "deployments": deployments,
        "entries": all,
        "files": all_files,
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

fn global_view(s: &Shared, cfg: &ScopeConfig, contents: bool, changed: Option<bool>) -> Value {
    let mut v = json!({
        "app": null,
        "version": cfg.version + cfg.epoch,
        "scope_version": cfg.version,
        "entries": entries(s, GLOBAL, cfg),
        "files": files(s, GLOBAL, cfg, contents),
        "instances": s.live.len(),
    });
    if let Some(changed) = changed {
        v["changed"] = json!(changed);
    }
    v
}

fn change_error(scope: &str, e: ChangeError) -> ApiError {
    match e {
        ChangeError::NoApp => ApiError::not_found(format!("no app named {scope}")),
        ChangeError::Refused(msg) => ApiError::bad(msg),
        ChangeError::Failed(e) => ApiError::from(e),
    }
}

async fn get_app(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    q: Result<Query<GetQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    require_app(&s, &app).await?;
    let (g, c) = s.config.view_parts(&app).await?;
    Ok(Json(app_view(&s, &app, &g, &c, q.contents, None)))
}

async fn patch_app(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<Change>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(change) = body?;
    let (cfg, changed) = s
        .config
        .change(&app, change)
        .await
        .map_err(|e| change_error(&app, e))?;
    let g = s.config.scope_config(GLOBAL).await?;
    Ok(Json(app_view(&s, &app, &g, &cfg, false, Some(changed))))
}

async fn get_global(
    State(s): State<Arc<Shared>>,
    q: Result<Query<GetQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let g = s.config.scope_config(GLOBAL).await?;
    Ok(Json(global_view(&s, &g, q.contents, None)))
}

async fn patch_global(
    State(s): State<Arc<Shared>>,
    body: Result<Json<Change>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(change) = body?;
    let (cfg, changed) = s
        .config
        .change(GLOBAL, change)
        .await
        .map_err(|e| change_error(GLOBAL, e))?;
    Ok(Json(global_view(&s, &cfg, false, Some(changed))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValueQuery {
    /// `KEY` or `internal.KEY`.
    key: String,
    #[serde(default)]
    reveal: bool,
    #[serde(default)]
    deployment: Option<String>,
    /// `k=v,k2=v2`: the labels of the instance asked about.
    #[serde(default)]
    labels: Option<String>,
}

/// The value an instance of the app (with that deployment and labels) gets for one name.
async fn value_app(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    q: Result<Query<ValueQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    require_app(&s, &app).await?;
    let name = match q.key.strip_prefix("internal.") {
        Some(k) => crate::server::model::template::Name {
            internal: true,
            key: k.to_string(),
        },
        None => crate::server::model::template::Name {
            internal: false,
            key: q.key.clone(),
        },
    };
    rules::check_key(&name.key).map_err(ApiError::bad)?;
    let labels: Labels = match &q.labels {
        Some(l) => crate::server::model::labels::parse(l).map_err(ApiError::bad)?,
        None => Labels::new(),
    };
    let deployment = q.deployment.clone().unwrap_or_default();
    let (g, c) = s.config.view_parts(&app).await?;
    let view = View {
        global: &g,
        app_name: &app,
        app: &c,
    };
    let winners = view.winners(&deployment, &labels);
    let Some((var, scope)) = winners.get(&name).copied() else {
        return Err(ApiError::not_found(format!(
            "{name} is not set for app {app}{}",
            if deployment.is_empty() && labels.is_empty() {
                String::new()
            } else {
                " (for that deployment and labels)".into()
            }
        )));
    };
    let value = view.value_of(&name, &deployment, &labels, &|sc, r| {
        s.config.resolver.value(sc, r)
    });
    let (dynamic, status, error) = match &var.value {
        VarValue::Dynamic(r) => {
            let st = s.config.resolver.status(scope, r);
            (Some(r.to_string()), Some(st.state), st.error)
        }
        VarValue::Text(_) => (None, None, None),
    };
    // A template that uses a secret (or dynamic) value is as secret as what it uses.
    let masked = view.is_secret(&name, &deployment, &labels);
    let shown = match value {
        Some(_) if masked && !q.reveal => Some(MASK.to_string()),
        other => other,
    };
    if q.reveal && masked {
        tracing::info!(app, key = %name, "a secret config value was revealed to an admin");
    }
    Ok(Json(json!({
        "app": app,
        "key": name.to_string(),
        "scope": scope_label(scope),
        "secret": masked,
        "value": shown,
        "dynamic": dynamic,
        "status": status,
        "error": error,
    })))
}

fn history_json(rows: Vec<store::config::HistoryRow>, current: u64) -> Value {
    json!({
        "current": current,
        "versions": rows.into_iter().map(|r| json!({
            "version": r.version,
            "at": util::fmt_rfc3339(r.at_ms),
            "at_ms": r.at_ms,
            "summary": r.summary,
        })).collect::<Vec<_>>(),
    })
}

async fn history_app(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
) -> ApiResult<Json<Value>> {
    require_app(&s, &app).await?;
    history(&s, &app).await
}

async fn history_global(State(s): State<Arc<Shared>>) -> ApiResult<Json<Value>> {
    history(&s, GLOBAL).await
}

async fn history(s: &Shared, scope: &str) -> ApiResult<Json<Value>> {
    let sc = scope.to_string();
    let rows = s
        .store
        .call(move |db| store::config::history(db, &sc))
        .await?;
    let cur = s.config.scope_config(scope).await?;
    Ok(Json(history_json(rows, cur.version)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u64,
}

async fn rollback_app(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<RollbackBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(b) = body?;
    require_app(&s, &app).await?;
    let (cfg, changed) = s
        .config
        .rollback(&app, b.version)
        .await
        .map_err(|e| change_error(&app, e))?;
    let g = s.config.scope_config(GLOBAL).await?;
    Ok(Json(app_view(&s, &app, &g, &cfg, false, Some(changed))))
}

async fn rollback_global(
    State(s): State<Arc<Shared>>,
    body: Result<Json<RollbackBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(b) = body?;
    let (cfg, changed) = s
        .config
        .rollback(GLOBAL, b.version)
        .await
        .map_err(|e| change_error(GLOBAL, e))?;
    Ok(Json(global_view(&s, &cfg, false, Some(changed))))
}

// ---- sources ---------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceQuery {
    #[serde(default)]
    app: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceBody {
    kind: String,
    addr: String,
    #[serde(default)]
    ca: Option<String>,
    #[serde(default)]
    token: Option<String>,
    /// `ROLE_ID:SECRET_ID`.
    #[serde(default)]
    approle: Option<String>,
    #[serde(default)]
    refresh_ms: Option<u64>,
}

fn source_json(s: &Shared, spec: &SourceSpec) -> Value {
    let auth = match &spec.auth {
        Auth::None => "none",
        Auth::Token(_) => "token",
        Auth::Approle { .. } => "approle",
    };
    let followed = s
        .config
        .resolver
        .followed()
        .into_iter()
        .filter(|k| k.source_scope == spec.scope && k.source == spec.name)
        .count();
    json!({
        "name": spec.name,
        "app": (spec.scope != GLOBAL).then_some(&spec.scope),
        "kind": spec.kind.as_str(),
        "addr": spec.addr,
        "ca": spec.ca_pem.is_some(),
        "auth": auth,
        "refresh_ms": spec.refresh.as_millis() as u64,
        "paths": followed,
    })
}

async fn list_sources(State(s): State<Arc<Shared>>) -> ApiResult<Json<Value>> {
    let list = s.config.sources().await?;
    Ok(Json(json!({
        "sources": list.iter().map(|spec| source_json(&s, spec)).collect::<Vec<_>>(),
    })))
}

fn too_long(what: &str, v: &str) -> ApiResult<()> {
    if v.len() > MAX_SOURCE_FIELD {
        return Err(ApiError::bad(format!(
            "the {what} is over {MAX_SOURCE_FIELD} bytes"
        )));
    }
    Ok(())
}

async fn put_source(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    q: Result<Query<SourceQuery>, QueryRejection>,
    body: Result<Json<SourceBody>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let Json(b) = body?;
    rules::check_source_name(&name).map_err(ApiError::bad)?;
    let scope = q.app.clone().unwrap_or_default();
    if !scope.is_empty() {
        require_app(&s, &scope).await?;
    }
    let kind = SourceKind::parse(&b.kind).ok_or_else(|| {
        ApiError::bad(format!(
            "unknown source kind {:?}: use openbao, vault or etcd",
            b.kind
        ))
    })?;
    too_long("address", &b.addr)?;
    let auth = match (&b.token, &b.approle) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad("give --token or --approle, not both"));
        }
        (Some(t), None) => {
            too_long("token", t)?;
            if t.is_empty() {
                return Err(ApiError::bad("the token is empty"));
            }
            Auth::Token(t.clone())
        }
        (None, Some(a)) => {
            too_long("AppRole credential", a)?;
            if !kind.is_vault() {
                return Err(ApiError::bad("AppRole is for OpenBao/Vault sources"));
            }
            let (role_id, secret_id) = a
                .split_once(':')
                .filter(|(r, s)| !r.is_empty() && !s.is_empty())
                .ok_or_else(|| ApiError::bad("--approle takes ROLE_ID:SECRET_ID"))?;
            Auth::Approle {
                role_id: role_id.into(),
                secret_id: secret_id.into(),
            }
        }
        (None, None) => Auth::None,
    };
    if let Some(ca) = &b.ca {
        too_long("CA", ca)?;
    }
    let refresh = Duration::from_millis(b.refresh_ms.unwrap_or(DEFAULT_REFRESH.as_millis() as u64));
    if refresh < Duration::from_millis(100) || refresh > Duration::from_secs(86_400) {
        return Err(ApiError::bad(
            "the refresh interval must be between 100ms and 24h",
        ));
    }
    let spec = SourceSpec {
        scope,
        name,
        kind,
        addr: b.addr.trim_end_matches('/').to_string(),
        ca_pem: b.ca.clone(),
        auth,
        refresh,
    };
    // The address and CA must make sense before anything is stored.
    crate::server::service::sources::http::Endpoint::new(&spec.addr, spec.ca_pem.as_deref())
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    s.config.put_source(spec.clone()).await?;
    Ok(Json(source_json(&s, &spec)))
}

async fn delete_source(
    State(s): State<Arc<Shared>>,
    Path(name): Path<String>,
    q: Result<Query<SourceQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let scope = q.app.unwrap_or_default();
    match s.config.delete_source(&scope, &name).await? {
        Err(msg) => Err(ApiError::new(axum::http::StatusCode::CONFLICT, msg)),
        Ok(false) => Err(ApiError::not_found(format!(
            "there is no config source named {name}{}",
            if scope.is_empty() {
                String::new()
            } else {
                format!(" for app {scope}")
            }
        ))),
        Ok(true) => Ok(Json(json!({ "removed": name }))),
    }
}
