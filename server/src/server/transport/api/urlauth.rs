//! `GET/PATCH /v1/apps/{app}/url/auth`: who may reach the app's URL (model/urlauth.rs). Never
//! returns a password or a hash; a new bearer token is returned once, when it is created.

use super::{ApiError, ApiResult, require_app};
use crate::server::model::urlauth::{Cidr, UrlAuth, parse_basic};
use crate::server::service::auth;
use crate::server::transport::Shared;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new().route("/apps/{app}/url/auth", get(get_auth).patch(patch_auth))
}

/// What is in force, for `waypost url`.
pub fn view(a: &UrlAuth) -> Value {
    json!({
        "open": a.is_open(),
        "basic_users": a.basic.iter().map(|u| &u.user).collect::<Vec<_>>(),
        "bearer_tokens": a.bearer.iter().map(|t| &t.id).collect::<Vec<_>>(),
        "allow_cidrs": a.cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    })
}

async fn get_auth(State(s): State<Arc<Shared>>, Path(app): Path<String>) -> ApiResult<Json<Value>> {
    require_app(&s, &app).await?;
    let a = s.urlauth.rules(&app).await?;
    Ok(Json(view(&a)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    /// `USER:PASSWORD` each (a user given again gets the new password).
    #[serde(default)]
    basic: Vec<String>,
    /// Create a bearer token (returned once).
    #[serde(default)]
    bearer: bool,
    #[serde(default)]
    allow_cidr: Vec<String>,
    /// Remove everything first (the URL is open again unless this change adds something).
    #[serde(default)]
    clear: bool,
}

async fn patch_auth(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    body: Result<Json<Change>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(ch) = body?;
    require_app(&s, &app).await?;
    if !ch.clear && ch.basic.is_empty() && !ch.bearer && ch.allow_cidr.is_empty() {
        return Err(ApiError::bad(
            "nothing to change: give --basic USER:PASS, --bearer, --allow-cidr CIDR or --clear",
        ));
    }
    // Checked (and salts and the token made) before the transaction.
    let mut users = Vec::new();
    for b in &ch.basic {
        let (u, p) = parse_basic(b).map_err(ApiError::bad)?;
        users.push((u, p, auth::random_bytes::<16>()));
    }
    let mut cidrs = Vec::new();
    for c in &ch.allow_cidr {
        cidrs.push(Cidr::parse(c).map_err(ApiError::bad)?);
    }
    let token = ch.bearer.then(|| auth::new_token("wpu_"));
    let tok = token.clone();
    // The password hash is slow on purpose: off the async workers.
    let outcome = s
        .urlauth
        .update(&app, move |a| {
            if ch.clear {
                *a = UrlAuth::default();
            }
            for (u, p, salt) in &users {
                a.add_basic(u, p, *salt)?;
            }
            for c in cidrs {
                a.add_cidr(c)?;
            }
            match &tok {
                Some(t) => a.add_bearer(t).map(Some),
                None => Ok(None),
            }
        })
        .await?;
    let (a, id) = outcome.map_err(ApiError::bad)?;
    tracing::info!(
        app,
        open = a.is_open(),
        users = a.basic.len(),
        tokens = a.bearer.len(),
        networks = a.cidrs.len(),
        "URL access control changed"
    );
    let mut v = view(&a);
    if let (Some(t), Some(id)) = (token, id) {
        v["new_bearer_token"] = json!(t);
        v["new_bearer_id"] = json!(id);
    }
    Ok(Json(v))
}
