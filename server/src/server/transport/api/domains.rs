//! `/v1/domains`: apps' custom domains (`waypost domain add|list|remove`), served by the HTTPS
//! ingress with their own certificate and routed to their app by both ingress listeners
//! (ingress_tls.rs).
//!
//! - `GET /v1/domains[?app=APP]` → `{"domains": [{domain, app, subject, not_after, created_at,
//!   url}]}` (never the key; `url`: the https URL, null while the HTTPS ingress is off);
//! - `POST /v1/domains` `{app, domain, cert_pem, key_pem}` → 201 (200 when the domain was the
//!   app's already and its certificate is replaced) with the domain as listed; 400 for a domain
//!   or certificate that does not pass model/domains.rs `check` (the message says why), 404 no
//!   such app, 409 the domain is another app's;
//! - `DELETE /v1/domains/{domain}` → `{domain, app}`; 404 when there is no such domain.

use super::{ApiError, ApiResult, AppState};
use crate::server::model::domains::{self, DomainRow};
use crate::server::store::domains::{self as db, Added};
use crate::util;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/domains", get(list).post(add))
        .route("/domains/{domain}", delete(remove))
}

fn row_json(s: &AppState, r: &DomainRow) -> Value {
    json!({
        "domain": r.domain,
        "app": r.app,
        "subject": r.subject,
        "not_after": util::fmt_rfc3339(r.not_after),
        "created_at": util::fmt_rfc3339(r.created_at),
        "url": s.https.port_suffix().map(|p| format!("https://{}{p}/", r.domain)),
    })
}

#[derive(Deserialize)]
struct ListQuery {
    app: Option<String>,
}

async fn list(
    State(s): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let app = q.app.clone();
    if let Some(app) = app.clone() {
        if !s
            .store
            .call(move |c| crate::server::store::app_exists(c, &app))
            .await?
        {
            return Err(ApiError::not_found(format!(
                "no app named {}",
                q.app.unwrap_or_default()
            )));
        }
    }
    let rows = s.store.call(move |c| db::list(c, app.as_deref())).await?;
    let list: Vec<Value> = rows.iter().map(|r| row_json(&s, r)).collect();
    Ok(Json(json!({ "domains": list })))
}

#[derive(Deserialize)]
struct AddBody {
    app: String,
    domain: String,
    cert_pem: String,
    key_pem: String,
}

async fn add(
    State(s): State<AppState>,
    body: Result<Json<AddBody>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(b) = body?;
    let domain = domains::normalize(&b.domain, &s.url_domain).map_err(ApiError::bad)?;
    let now = util::now_ms();
    let info = domains::check(&domain, &b.cert_pem, &b.key_pem, now)
        .map_err(|e| ApiError::bad(format!("{domain}: {e}")))?;
    let row = DomainRow {
        domain: domain.clone(),
        app: b.app.clone(),
        cert_pem: b.cert_pem,
        key_pem: b.key_pem,
        subject: info.subject,
        not_after: info.not_after,
        created_at: now,
    };
    let stored = row.clone();
    let status = match s.store.call(move |c| db::add(c, &stored)).await? {
        Added::New => StatusCode::CREATED,
        Added::Replaced => StatusCode::OK,
        Added::NoApp => return Err(ApiError::not_found(format!("no app named {}", b.app))),
        Added::TakenBy(other) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{domain} is already a domain of app {other}; remove it there first \
                     (waypost domain remove {domain})"
                ),
            ));
        }
    };
    // Served by this replica at once; the others hear of it from the database (ingress_tls.rs).
    s.https.domains.reload(&s.store).await?;
    tracing::info!(
        domain,
        app = row.app,
        replaced = status == StatusCode::OK,
        "custom domain added"
    );
    Ok((status, Json(row_json(&s, &row))))
}

async fn remove(State(s): State<AppState>, Path(domain): Path<String>) -> ApiResult<Json<Value>> {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let key = d.clone();
    let Some(app) = s.store.call(move |c| db::remove(c, &key)).await? else {
        return Err(ApiError::not_found(format!("no custom domain {d}")));
    };
    s.https.domains.reload(&s.store).await?;
    tracing::info!(domain = d, app, "custom domain removed");
    Ok(Json(json!({ "domain": d, "app": app })))
}
