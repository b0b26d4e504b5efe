//! `POST /v1/apps/{app}/restart` and `POST /v1/apps/{app}/signal`: an operator restarts an app's
//! instances, or sends their children a signal (`waypost restart`, `waypost signal`). Each live
//! instance held by this replica gets a `ChildControl` frame (docs/protocol.md); the entrypoint
//! restarts the child as a config change would, or passes the signal on under its stop timeout.
//! Instances held by other replicas are reached over the hop (transport/peer.rs): the request,
//! with the caller's Authorization, goes to each replica holding some (at once), which sends the
//! frames to its own. Those on a replica that cannot be reached (no peer address, not beating,
//! failing) are listed as `elsewhere`.

use super::{ApiError, ApiResult, require_app};
use crate::server::model::members::LEASE;
use crate::server::store;
use crate::server::transport::Shared;
use crate::server::transport::peer::{self, Hopped};
use crate::util;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;
use waypost_proto::ChildControl;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/apps/{app}/restart", post(restart))
        .route("/apps/{app}/signal", post(signal))
}

#[derive(Deserialize, Serialize, Default)]
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

/// How the request arrived: from a client (reach every replica) or over the hop (this replica's
/// own instances only, never a second hop).
struct Caller {
    hopped: bool,
    authorization: Option<header::HeaderValue>,
}

impl Caller {
    fn new(hopped: Option<Extension<Hopped>>, headers: &HeaderMap) -> Caller {
        Caller {
            hopped: hopped.is_some(),
            authorization: headers.get(header::AUTHORIZATION).cloned(),
        }
    }
}

/// Passes the request on to every other replica holding a matching instance, at once. Returns
/// the ids they reached and the replicas that answered (a 409 — none there after all — counts
/// as answered); a replica that fails is logged and its instances end up `elsewhere`.
async fn over_the_hop(
    s: &Shared,
    app: &str,
    what: &str,
    b: &Body,
    caller: &Caller,
) -> ApiResult<(Vec<String>, Vec<String>)> {
    let fresh_after = util::now_ms().saturating_sub(LEASE.as_millis() as i64);
    let (name, prefix, me) = (app.to_string(), b.instance.clone(), s.replica.clone());
    let holders = s
        .store
        .call(move |db| {
            store::members::replicas_holding(db, &name, prefix.as_deref(), &me, fresh_after)
        })
        .await?;
    let body = serde_json::to_value(b).map_err(anyhow::Error::from)?;
    let path = format!("/v1/apps/{app}/{what}");
    let calls = holders.iter().map(|(replica, addr)| {
        let (path, body) = (&path, &body);
        async move {
            let r = peer::call(
                s,
                addr,
                Method::POST,
                path,
                caller.authorization.as_ref(),
                Some(body),
            )
            .await;
            (replica, addr, r)
        }
    });
    let (mut reached, mut answered) = (Vec::new(), Vec::new());
    for (replica, addr, r) in futures_util::future::join_all(calls).await {
        match r {
            Ok((status, body)) if status.is_success() || status == StatusCode::CONFLICT => {
                answered.push(replica.clone());
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                reached.extend(
                    v["instances"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.as_str().map(str::to_string)),
                );
            }
            Ok((status, body)) => tracing::warn!(
                app,
                replica = %replica,
                peer = %addr,
                %status,
                body = %String::from_utf8_lossy(&body),
                "{what} refused by the replica holding instances"
            ),
            Err(e) => tracing::warn!(
                app,
                replica = %replica,
                peer = %addr,
                error = format!("{e:#}"),
                "{what}: the replica holding instances cannot be reached"
            ),
        }
    }
    Ok((reached, answered))
}

async fn send(
    s: &Shared,
    app: &str,
    what: &str,
    b: &Body,
    control: ChildControl,
    caller: &Caller,
) -> ApiResult<Json<Value>> {
    check_prefix(&b.instance)?;
    require_app(s, app).await?;
    let sent = s.mux.control_children(app, b.instance.as_deref(), &control);
    let mut instances: Vec<String> = sent.iter().map(|id| util::hex(id)).collect();
    let mut elsewhere = Vec::new();
    if !caller.hopped {
        let (reached, answered) = over_the_hop(s, app, what, b, caller).await?;
        instances.extend(reached);
        let name = app.to_string();
        let rows = s
            .store
            .call(move |db| store::list_instances(db, Some(&name), false))
            .await?;
        let prefix = b.instance.as_deref().map(str::to_ascii_lowercase);
        elsewhere = rows
            .iter()
            .filter(|r| {
                r.replica
                    .as_deref()
                    .is_some_and(|rep| rep != s.replica && !answered.iter().any(|a| a == rep))
                    && prefix.as_deref().is_none_or(|p| r.id.starts_with(p))
            })
            .map(|r| r.id.clone())
            .collect();
    }
    if instances.is_empty() && elsewhere.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            match &b.instance {
                Some(p) => format!("app {app} has no live instance whose id starts with {p}"),
                None => format!("app {app} has no live instance"),
            },
        ));
    }
    Ok(Json(json!({
        "instances": instances,
        "elsewhere": elsewhere,
    })))
}

async fn restart(
    State(s): State<Arc<Shared>>,
    Path(app): Path<String>,
    hopped: Option<Extension<Hopped>>,
    headers: HeaderMap,
    body: Result<Json<Body>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let caller = Caller::new(hopped, &headers);
    let Json(b) = body?;
    if b.signal.is_some() {
        return Err(ApiError::bad("restart takes no signal (see /signal)"));
    }
    let r = send(
        &s,
        &app,
        "restart",
        &b,
        ChildControl {
            restart: true,
            signal: 0,
        },
        &caller,
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
    hopped: Option<Extension<Hopped>>,
    headers: HeaderMap,
    body: Result<Json<Body>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let caller = Caller::new(hopped, &headers);
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
        "signal",
        &b,
        ChildControl {
            restart: false,
            signal: number,
        },
        &caller,
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
