//! The HTTPS JSON API under `/v1/`, for the CLI, curl and browsers. Every request needs
//! `Authorization: Bearer <admin token>` (401 without a valid token, 403 for an entrypoint
//! token). Errors are `{"error": "..."}` with the matching status: one type, [`ApiError`], for
//! every route.
//!
//! Served by hyper's HTTP/1.1 connection builder over tokio-rustls (same server certificate as
//! the control listener), with axum's Router as the service. Routes: apps, tokens, instances and
//! the server here; `config`, `logs` and `exec` in their modules.

pub mod apps;
pub mod child;
pub mod config;
pub mod console;
pub mod domains;
pub mod exec;
pub mod forward;
pub mod logs;
pub mod urlauth;

use crate::server::model::{self, TokenScope};
use crate::server::service::{self, auth};
use crate::server::store;
use crate::server::transport::{Shared, accept, control, serve_http};
use crate::util;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

type AppState = Arc<Shared>;

/// An API error: status + message, rendered as `{"error": message}` (and `WWW-Authenticate:
/// Bearer` with a 401).
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError(status, msg.into())
    }
    pub fn bad(msg: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        if store::is_unavailable(&e) {
            // Not this request's fault, and over once the database is back: 503, said plainly.
            tracing::warn!(
                error = format!("{e:#}"),
                "API request failed: database unavailable"
            );
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable; try again shortly",
            );
        }
        tracing::error!(error = format!("{e:#}"), "API request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        // A body that parses but does not fit the schema (axum's 422) is a bad request like any
        // other: 400 on every route. Other rejections keep their status (415 without a JSON
        // content type, 413 too large, 400 unparseable).
        let status = match e.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        ApiError::new(status, e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::new(e.status(), e.body_text())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn router(shared: AppState) -> Router {
    let v1 = Router::new()
        .route("/server", get(get_server))
        .route("/server/members", get(get_members))
        .route("/apps", get(list_apps).post(create_app))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/ca.pem", get(get_ca))
        .route("/instances", get(list_instances))
        .merge(apps::routes())
        .merge(exec::routes())
        .merge(forward::routes())
        .merge(config::routes())
        .merge(domains::routes())
        .merge(urlauth::routes())
        .merge(child::routes())
        .merge(logs::routes());
    Router::new()
        .nest("/v1", v1)
        .route(HEALTHZ_PATH, get(healthz))
        .route(READYZ_PATH, get(readyz))
        .merge(console::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        // Outermost: authentication runs before routing, so unknown paths also need a token.
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_admin,
        ))
        // Outside the authentication layer, which reads the console's sessions from it.
        .layer(axum::Extension(Arc::new(console::Sessions::default())))
        .with_state(shared)
}

/// The one route served without a token: the CA certificate (PEM), public by nature. `waypost
/// login` fetches it over an unverified connection to show its fingerprint for the user to
/// confirm (like ssh's host keys), since the server's TLS chain holds only its own certificate.
pub const CA_PATH: &str = "/v1/ca.pem";

async fn get_ca(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        s.ca_pem.clone(),
    )
        .into_response()
}

/// Health checks for load balancers and service managers, served without a token: `/healthz`
/// answers 200 while the process serves requests; `/readyz` answers 200 when it can also reach
/// its database (a trivial query within [`READY_TIMEOUT`]), else 503 with the reason.
pub const HEALTHZ_PATH: &str = "/healthz";
pub const READYZ_PATH: &str = "/readyz";
/// How long `/readyz` waits for the database.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Shared with the metrics listener (transport/metrics.rs), which serves the same two checks.
pub(crate) async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], "ok\n").into_response()
}

pub(crate) async fn readyz(State(s): State<AppState>) -> Response {
    let probe = s.store.call(|db| store::ping(db));
    let why = match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(())) => {
            return ([(header::CONTENT_TYPE, "text/plain")], "ready\n").into_response();
        }
        Ok(Err(e)) => format!("the database cannot be reached: {e:#}"),
        Err(_) => format!("the database did not answer within {READY_TIMEOUT:?}"),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "text/plain")],
        format!("not ready: {why}\n"),
    )
        .into_response()
}

/// The authentication layer: a bearer admin token, or (for the web console) its session cookie
/// with the cross-site checks of console.rs; the public routes (CA, health, the console's
/// sign-in page and static files) need neither.
async fn require_admin(State(shared): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == axum::http::Method::GET
        && matches!(req.uri().path(), CA_PATH | HEALTHZ_PATH | READYZ_PATH)
    {
        return next.run(req).await;
    }
    if console::is_public(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        // No bearer token: the web console's session cookie, if any (console.rs); without one,
        // 401 (the console's page redirects to its sign-in page instead).
        return console::authenticate(&shared, req, next).await;
    };
    let hash = auth::hash_token(&token);
    // Looked up on every request (no cache): a revoked or expired token is refused at once.
    let now = util::now_ms();
    match shared
        .store
        .call(move |c| store::lookup_token_at(c, &hash, now))
        .await
    {
        Ok(store::Lookup::Valid(TokenScope::Admin)) => next.run(req).await,
        Ok(store::Lookup::Valid(TokenScope::Entrypoint { .. })) => ApiError::new(
            StatusCode::FORBIDDEN,
            "an entrypoint token cannot use the API; use an admin token",
        )
        .into_response(),
        Ok(store::Lookup::Expired { expires_at }) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "this admin token expired at {}; create a new one with `waypost token create \
                 --admin` using another admin token",
                util::fmt_rfc3339(expires_at)
            ),
        )
        .into_response(),
        Ok(store::Lookup::Unknown) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "invalid token").into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

// ---- /v1/server ----------------------------------------------------------------------------

async fn get_server(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "version": crate::VERSION,
        "control_addr": s.control_addr,
        "api_addr": s.api_addr,
        "ca_pem": s.ca_pem,
        "url_domain": s.url_domain,
        "ingress_addr": s.ingress_addr,
        "ingress_tls_addr": s.https.addr,
        "live_instances": s.live.len(),
        "log_intake": logs::intake_json(s.logs.intake_stall().as_ref()),
        // `--log-export`'s counters {queued, sent, dropped, failed}; null when off.
        "log_export": s.logs.export_stats(),
    }))
}

/// The replicas sharing this server's database (service/members.rs); `self` marks the one
/// answering.
async fn get_members(State(s): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let now = util::now_ms();
    let members = service::members::list(&s.store, now).await?;
    let members: Vec<_> = members
        .iter()
        .map(|m| {
            json!({
                "id": m.row.id,
                "peer_addr": m.row.peer_addr,
                "version": m.row.version,
                "instances": m.row.instances,
                "started_at": util::fmt_rfc3339(m.row.started_at),
                "last_seen": util::fmt_rfc3339(m.row.last_seen),
                "last_seen_ms_ago": now.saturating_sub(m.row.last_seen).max(0),
                "state": m.state.as_str(),
                "self": m.row.id == s.replica,
            })
        })
        .collect();
    Ok(Json(json!({ "members": members })))
}

// ---- /v1/apps ------------------------------------------------------------------------------

#[derive(Deserialize)]
struct CreateApp {
    name: String,
}

#[derive(Serialize)]
struct AppJson {
    name: String,
    created_at: String,
}

impl From<model::App> for AppJson {
    fn from(a: model::App) -> Self {
        AppJson {
            name: a.name,
            created_at: util::fmt_rfc3339(a.created_at),
        }
    }
}

async fn create_app(
    State(s): State<AppState>,
    body: Result<Json<CreateApp>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<AppJson>)> {
    let Json(body) = body?;
    if !util::valid_app_name(&body.name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid app name {:?}: use 1-63 lowercase letters, digits and '-', \
                 starting and ending with a letter or digit (it becomes a host name)",
                body.name
            ),
        ));
    }
    let now = util::now_ms();
    let name = body.name.clone();
    if !s
        .store
        .call(move |c| store::create_app(c, &name, now))
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("app {} already exists", body.name),
        ));
    }
    tracing::info!(app = body.name, "app created");
    Ok((
        StatusCode::CREATED,
        Json(AppJson {
            name: body.name,
            created_at: util::fmt_rfc3339(now),
        }),
    ))
}

async fn list_apps(State(s): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    let apps = s.store.call(|c| store::list_apps(c)).await?;
    let apps: Vec<AppJson> = apps.into_iter().map(AppJson::from).collect();
    Ok(Json(json!({ "apps": apps })))
}

/// 404 unless the app exists. The one check every app-scoped route makes.
pub(crate) async fn require_app(s: &Shared, app: &str) -> ApiResult<()> {
    let name = app.to_string();
    if s.store.call(move |c| store::app_exists(c, &name)).await? {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no app named {app}")))
    }
}

// ---- /v1/tokens ----------------------------------------------------------------------------

/// `POST /v1/tokens`: an entrypoint token (`app`, optional `deployment` and `labels`) or, with
/// `"admin": true`, an admin token (optional `name` and `ttl`, e.g. `"30d"`).
#[derive(Deserialize)]
struct CreateToken {
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    deployment: Option<String>,
    /// Given to every instance that connects with the token, over the instance's own labels.
    #[serde(default)]
    labels: model::Labels,
    #[serde(default)]
    admin: bool,
    /// An admin token's name, unique among admin tokens; default `admin-` and the start of its id.
    #[serde(default)]
    name: Option<String>,
    /// How long an admin token is valid (the duration syntax of every flag: `30d`, `12h`,
    /// `90s`); default: it never expires.
    #[serde(default)]
    ttl: Option<String>,
}

/// Whether `name` is a valid admin token name: 1-64 letters, digits and `.`, `_`, `-`, `@`
/// (e.g. `alice`, `ci-deploy`, `bob@example.com`).
pub fn valid_admin_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
}

async fn create_token(
    State(s): State<AppState>,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let Json(body) = body?;
    if body.admin {
        return create_admin_token(&s, body).await;
    }
    if body.name.is_some() || body.ttl.is_some() {
        return Err(ApiError::bad(
            "name and ttl are for admin tokens (\"admin\": true; `waypost token create --admin`)",
        ));
    }
    let Some(app) = body.app else {
        return Err(ApiError::bad(
            "give the app of an entrypoint token (\"app\"), or \"admin\": true for an admin token",
        ));
    };
    let deployment = body.deployment.filter(|d| !d.is_empty());
    if let Some(d) = &deployment {
        if d.len() > 128 || d.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid deployment id: at most 128 characters, no whitespace",
            ));
        }
    }
    model::labels::check_all(&body.labels)
        .map_err(|e| ApiError::bad(format!("invalid token labels: {e}")))?;
    require_app(&s, &app).await?;
    let token = auth::new_token(auth::ENTRYPOINT_PREFIX);
    let hash = auth::hash_token(&token);
    let scope = TokenScope::Entrypoint {
        app: app.clone(),
        deployment: deployment.clone(),
    };
    let now = util::now_ms();
    let labels = body.labels.clone();
    s.store
        .call(move |c| store::insert_token_with_labels(c, &hash, &scope, &labels, now))
        .await?;
    tracing::info!(
        app,
        deployment,
        labels = model::labels::format(&body.labels),
        "entrypoint token created"
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token,
            "id": token_id(&auth::hash_token(&token)),
            "app": app,
            "deployment": deployment,
            "labels": body.labels,
            "control_addr": s.control_addr,
            "ca_pem": s.ca_pem,
        })),
    ))
}

/// The admin half of [`create_token`]: the token is shown in this answer only.
async fn create_admin_token(
    s: &Shared,
    body: CreateToken,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if body.app.is_some() || body.deployment.is_some() || !body.labels.is_empty() {
        return Err(ApiError::bad(
            "an admin token has no app, deployment or labels (they are for entrypoint tokens)",
        ));
    }
    let now = util::now_ms();
    let expires_at = match &body.ttl {
        None => None,
        Some(ttl) => {
            let d = waypost_proto::parse_duration(ttl)
                .map_err(|e| ApiError::bad(format!("invalid ttl: {e}")))?;
            if d.is_zero() {
                return Err(ApiError::bad("invalid ttl: it must be longer than 0"));
            }
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            Some(now.saturating_add(ms))
        }
    };
    let token = auth::new_token(auth::ADMIN_PREFIX);
    let hash = auth::hash_token(&token);
    let id = token_id(&hash);
    let name = match body.name {
        Some(n) if valid_admin_name(&n) => n,
        Some(n) => {
            return Err(ApiError::bad(format!(
                "invalid admin token name {n:?}: use 1-64 letters, digits, '.', '_', '-' or '@'"
            )));
        }
        None => format!("admin-{}", &id[..8]),
    };
    let stored_name = name.clone();
    match s
        .store
        .call(move |c| store::insert_admin_token(c, &hash, &stored_name, expires_at, now))
        .await?
    {
        store::NewAdmin::Created => {}
        store::NewAdmin::NameTaken(other) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "an admin token named {name} already exists (id {}); choose another name, or \
                     revoke that one first with `waypost token revoke {}`",
                    token_id(&other.hash),
                    token_id(&other.hash)
                ),
            ));
        }
    }
    // The name and id only: the token text never goes to the log.
    tracing::info!(
        id,
        name,
        expires_at = expires_at.map(util::fmt_rfc3339),
        "admin token created"
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": token,
            "id": id,
            "kind": "admin",
            "name": name,
            "expires_at": expires_at.map(util::fmt_rfc3339),
            "ca_pem": s.ca_pem,
        })),
    ))
}

/// A token's public id: the start of its hash (the token text itself is never stored). Long
/// enough to be unique in practice; `token revoke` also takes any unique prefix.
pub fn token_id(hash: &str) -> String {
    hash.chars().take(TOKEN_ID_LEN).collect()
}
const TOKEN_ID_LEN: usize = 12;

#[derive(Deserialize)]
struct TokensQuery {
    app: Option<String>,
}

async fn list_tokens(
    State(s): State<AppState>,
    q: Result<Query<TokensQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = q?;
    if let Some(app) = &q.app {
        require_app(&s, app).await?;
    }
    let app = q.app.clone();
    let rows = s
        .store
        .call(move |c| store::list_tokens(c, app.as_deref()))
        .await?;
    let live = s.live.token_counts();
    let now = util::now_ms();
    let tokens: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|t| {
            json!({
                "id": token_id(&t.hash),
                "kind": t.kind,
                "name": t.name,
                "app": t.app,
                "deployment": t.deployment,
                "created_at": util::fmt_rfc3339(t.created_at),
                "expires_at": t.expires_at.map(util::fmt_rfc3339),
                "expired": t.expired(now),
                "labels": t.labels,
                "live_instances": live.get(&t.hash).copied().unwrap_or(0),
            })
        })
        .collect();
    Ok(Json(json!({ "tokens": tokens })))
}

/// Deletes a token. An entrypoint token can no longer connect, and the live connections that
/// used it are closed with a Reject (their apps keep running; the entrypoints retry with backoff
/// and stay refused until they get a new token). An admin token is refused by the very next API
/// request (every request looks its token up); the last admin token that has not expired is
/// never deleted, so the server always keeps an operator.
async fn revoke_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    if id.len() < 6 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid token id {id:?}: use the ID column of `waypost token list` (at least 6 hex digits)"
            ),
        ));
    }
    let prefix = id.clone();
    let now = util::now_ms();
    let row = match s
        .store
        .call(move |c| store::revoke_token(c, &prefix, now))
        .await?
    {
        model::Revoke::Done(row) => row,
        model::Revoke::NotFound => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no token with id {id}"),
            ));
        }
        model::Revoke::Ambiguous => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("token id {id} matches more than one token; give more of it"),
            ));
        }
        model::Revoke::LastAdmin(row) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "admin token {} ({}) is the last admin token that has not expired; revoking \
                     it would lock every operator out: create another with `waypost token create \
                     --admin` first",
                    token_id(&row.hash),
                    row.name.as_deref().unwrap_or("unnamed")
                ),
            ));
        }
    };
    if row.kind == "admin" {
        tracing::info!(
            id = token_id(&row.hash),
            name = row.name,
            "admin token revoked"
        );
        return Ok(Json(json!({
            "id": token_id(&row.hash),
            "kind": "admin",
            "name": row.name,
            "app": null,
            "deployment": null,
            "disconnected_instances": 0,
        })));
    }
    let closed = s
        .live
        .close_token(&row.hash, "its token was revoked", control::revoked_goodbye);
    tracing::info!(
        app = row.app,
        id = token_id(&row.hash),
        closed,
        "entrypoint token revoked"
    );
    Ok(Json(json!({
        "id": token_id(&row.hash),
        "kind": row.kind,
        "app": row.app,
        "deployment": row.deployment,
        "disconnected_instances": closed,
    })))
}

// ---- /v1/instances -------------------------------------------------------------------------

#[derive(Deserialize)]
struct InstancesQuery {
    app: Option<String>,
    #[serde(default)]
    all: bool,
}

/// One instance as the API shows it.
#[derive(Serialize)]
struct InstanceJson {
    id: String,
    app: String,
    deployment: String,
    hostname: String,
    entrypoint_pid: u32,
    entrypoint_version: String,
    live: bool,
    /// "exited" | "lost" once disconnected, else null.
    ended: Option<String>,
    connected_at: String,
    last_seen_at: String,
    disconnected_at: Option<String>,
    /// starting | running | restarting | exited (null before the first Status).
    child_state: Option<&'static str>,
    child_pid: Option<u32>,
    exit_code: Option<i32>,
    exit_signal: Option<i32>,
    oom_killed: bool,
    child_rss_bytes: u64,
    child_cpu_ms: u64,
    starts: u32,
    config_version: u64,
    /// The entrypoint's own resident memory (bytes; 0: not reported yet).
    entrypoint_rss_bytes: u64,
    /// The replica holding its connection (`server members`); once gone, the last one that did.
    replica: Option<String>,
    /// Its own labels (WAYPOST_LABELS) merged with its token's, as of its latest Hello.
    labels: model::Labels,
}

async fn list_instances(
    State(s): State<AppState>,
    q: Result<Query<InstancesQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = q?;
    let app = q.app.filter(|a| !a.is_empty());
    if let Some(app) = &app {
        require_app(&s, app).await?;
    }
    let all = q.all;
    let rows = s
        .store
        .call(move |c| store::list_instances(c, app.as_deref(), all))
        .await?;
    let instances: Vec<InstanceJson> = rows
        .into_iter()
        .map(|mut r| {
            // The row says whether it is live (held here or by another replica); the heartbeat
            // data in memory of one held here is fresher than its row.
            let live = r.disconnected_at.is_none();
            let snap = model::parse_id(&r.id).and_then(|id| s.live.snapshot(&id));
            if let (true, Some((last_seen, status))) = (live, snap) {
                r.last_seen_at = last_seen;
                r.status = status;
            }
            InstanceJson {
                id: r.id,
                app: r.app,
                deployment: r.deployment,
                hostname: r.hostname,
                entrypoint_pid: r.entrypoint_pid,
                entrypoint_version: r.entrypoint_version,
                live,
                ended: r.ended,
                connected_at: util::fmt_rfc3339(r.connected_at),
                last_seen_at: util::fmt_rfc3339(r.last_seen_at),
                disconnected_at: r.disconnected_at.map(util::fmt_rfc3339),
                child_state: r.status.state,
                child_pid: r.status.child_pid,
                exit_code: r.status.exit_code,
                exit_signal: r.status.exit_signal,
                oom_killed: r.status.oom_killed,
                child_rss_bytes: r.status.child_rss_bytes,
                child_cpu_ms: r.status.child_cpu_ms,
                starts: r.status.starts,
                config_version: r.status.config_version,
                entrypoint_rss_bytes: r.status.entrypoint_rss_bytes,
                replica: r.replica,
                labels: r.labels,
            }
        })
        .collect();
    // Per server, not per instance: one writer stores every instance's logs. A stall is why
    // `logs` shows nothing new, so `instances` (the first thing one looks at) says so too.
    let log_intake = logs::intake_json(s.logs.intake_stall().as_ref());
    Ok(Json(
        json!({ "instances": instances, "log_intake": log_intake }),
    ))
}

// ---- serving -------------------------------------------------------------------------------

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts API connections until shutdown. `done`: see `control::serve`.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    done: mpsc::Sender<()>,
) {
    let app = router(shared.clone());
    let mut shutdown = shared.shutdown.clone();
    loop {
        let Some((tcp, peer)) = accept(&listener, &mut shutdown, "API").await else {
            break;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let done = done.clone();
        let shutdown = shared.shutdown.clone();
        tokio::spawn(async move {
            let _done = done;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "API TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "API TLS handshake timed out"),
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) = serve_http(io, service, shutdown).await {
                tracing::debug!(%peer, error = %e, "API connection error");
            }
        });
    }
}
