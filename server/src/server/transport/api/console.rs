//! The web console at `/`: a sign-in page, then one page (`console/index.html` +
//! `console/console.js`) that reads the JSON API under `/v1/` with the browser's session cookie.
//! Plain HTML, CSS and JavaScript embedded in the binary (no build step, nothing fetched from
//! elsewhere). See docs/architecture.md, "Web console".
//!
//! Sessions: `POST /console/sign-in` with an admin token creates a random session id, sent as
//! the cookie [`COOKIE`] (`HttpOnly; Secure; SameSite=Strict; Path=/`). The server keeps, in
//! memory, the SHA-256 of the id → the hash of the admin token and an expiry ([`SESSION_TTL`]):
//! the token itself is never in the cookie nor kept. Every request made with the cookie looks the
//! token up again, so revoking (or the expiry of) the token ends its sessions at once. Sessions
//! live in this process only: a restart, or another replica, asks to sign in again.
//!
//! Cross-site requests: the cookie is `SameSite=Strict`; besides, a cookie-authenticated request
//! other than a GET/HEAD (or any WebSocket upgrade) must carry [`CSRF_HEADER`]`: 1`, which a form
//! or a WebSocket of another site cannot set (and a cross-origin `fetch` cannot either without a
//! CORS preflight that this server never grants), and an `Origin` equal to this server's own;
//! any cookie-authenticated request whose `Origin` or `Sec-Fetch-Site` says another site is
//! refused (403).

use super::{ApiError, AppState, require_app};
use crate::server::model::TokenScope;
use crate::server::service::auth;
use crate::server::store;
use crate::server::transport::{Shared, ingress, ingress_tls};
use crate::util;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The console's one page (the views are `#/...` fragments handled by console.js).
pub const PAGE_PATH: &str = "/";
pub const SIGN_IN_PATH: &str = "/console/sign-in";
pub const SIGN_OUT_PATH: &str = "/console/sign-out";
/// The session cookie. `__Host-`: browsers keep it only when Secure, `Path=/` and without
/// `Domain`, so no other host (an app's URL under a shared parent domain) can set or shadow it.
pub const COOKIE: &str = "__Host-waypost-console";
/// The header the console's own requests carry; required on cookie-authenticated requests that
/// change something (see the module doc).
pub const CSRF_HEADER: &str = "x-waypost-console";
/// How long a session lasts after sign-in (and at most as long as its token).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; past it the one expiring first is dropped. Bounds memory whatever
/// the number of sign-ins (about 200 bytes each).
const MAX_SESSIONS: usize = 4096;
/// Largest sign-in form accepted (a token is 44 characters).
const MAX_FORM: usize = 4096;

const CSP: &str = "default-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'; object-src 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
    /// FNV-1a of `body`, computed at compile time: the ETag.
    tag: u64,
}

const fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < b.len() {
        h ^= b[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

macro_rules! asset {
    ($path:literal, $file:literal, $ct:literal) => {
        Asset {
            path: $path,
            content_type: $ct,
            body: include_str!($file),
            tag: fnv1a(include_str!($file).as_bytes()),
        }
    };
}

/// The static files, served to anyone (they hold nothing secret; the sign-in page needs the
/// stylesheet). Revalidated on each use (`no-cache` + ETag), so a new server version is picked up
/// at once.
const ASSETS: [Asset; 3] = [
    asset!(
        "/console/console.js",
        "console/console.js",
        "text/javascript; charset=utf-8"
    ),
    asset!(
        "/console/console.css",
        "console/console.css",
        "text/css; charset=utf-8"
    ),
    asset!("/console/icon.svg", "console/icon.svg", "image/svg+xml"),
];
const INDEX_HTML: &str = include_str!("console/index.html");
const SIGN_IN_HTML: &str = include_str!("console/sign-in.html");

pub fn routes() -> Router<AppState> {
    let mut r = Router::new()
        .route(PAGE_PATH, get(index))
        .route(SIGN_IN_PATH, get(sign_in_page).post(sign_in))
        .route(SIGN_OUT_PATH, post(sign_out))
        .route("/console/apps/{app}/urls", get(urls));
    for a in &ASSETS {
        r = r.route(
            a.path,
            get(move |h: HeaderMap| async move { serve_asset(a, &h) }),
        );
    }
    r
}

/// Routes served without any authentication: the sign-in page and form, sign-out (it needs no
/// more than the cookie it clears), and the static files.
pub fn is_public(method: &Method, path: &str) -> bool {
    let read = method == Method::GET || method == Method::HEAD;
    (read && (path == SIGN_IN_PATH || ASSETS.iter().any(|a| a.path == path)))
        || (method == Method::POST && (path == SIGN_IN_PATH || path == SIGN_OUT_PATH))
}

// ---- sessions ----------------------------------------------------------------------------------

/// The console's sessions, in memory (see the module doc). One per API router.
#[derive(Default)]
pub struct Sessions {
    /// SHA-256 (hex) of the session id → its session.
    map: Mutex<HashMap<String, Session>>,
}

struct Session {
    token_hash: String,
    expires: Instant,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for the admin token with this hash; returns its id (the cookie's value).
    pub fn create(&self, token_hash: &str, now: Instant) -> String {
        let id = util::hex(&auth::random_bytes::<32>());
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            let first = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone());
            if let Some(k) = first {
                map.remove(&k);
            }
        }
        map.insert(
            auth::hash_token(&id),
            Session {
                token_hash: token_hash.to_string(),
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    /// The token hash of a session that has not expired.
    pub fn token_hash(&self, id: &str, now: Instant) -> Option<String> {
        let key = auth::hash_token(id);
        let mut map = self.lock();
        match map.get(&key) {
            Some(s) if s.expires > now => Some(s.token_hash.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(&auth::hash_token(id));
    }
}

/// The session id in the request's cookies, if any.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// Whether the admin token of the session with this id is still valid (ends the session if not).
async fn session_valid(s: &Shared, sessions: &Sessions, id: &str) -> Result<bool, ApiError> {
    let Some(hash) = sessions.token_hash(id, Instant::now()) else {
        return Ok(false);
    };
    let now = util::now_ms();
    let lookup = s
        .store
        .call(move |c| store::lookup_token_at(c, &hash, now))
        .await?;
    let ok = matches!(lookup, store::Lookup::Valid(TokenScope::Admin));
    if !ok {
        sessions.end(id);
    }
    Ok(ok)
}

/// The authentication layer's answer to a request without a bearer token: the console's cookie,
/// checked against cross-site use; without a valid one, the console page redirects to the
/// sign-in page and everything else gets 401.
pub async fn authenticate(s: &Shared, req: Request, next: Next) -> Response {
    let page = req.uri().path() == PAGE_PATH;
    let sessions = req.extensions().get::<Arc<Sessions>>().cloned();
    let (Some(sessions), Some(id)) = (sessions, cookie(req.headers())) else {
        if page {
            return redirect(SIGN_IN_PATH);
        }
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <admin token>)",
        )
        .into_response();
    };
    if let Err(why) = cross_site_check(&req, page) {
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    match session_valid(s, &sessions, &id).await {
        Ok(true) => next.run(req).await,
        Ok(false) if page => redirect(SIGN_IN_PATH),
        Ok(false) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the console session has ended (signed out, expired, or its admin token was revoked); \
             sign in again",
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Refuses a cookie-authenticated request that another site could have made (module doc).
/// `page`: a top-level navigation to the console page, which changes nothing and may come from
/// anywhere (a link).
fn cross_site_check(req: &Request, page: bool) -> Result<(), &'static str> {
    let h = req.headers();
    if !same_origin(h) {
        return Err("cross-origin request refused (the console's cookie is for its own pages)");
    }
    if !page
        && h.get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"same-origin" && v.as_bytes() != b"none")
    {
        return Err("cross-site request refused (the console's cookie is for its own pages)");
    }
    let reads = req.method() == Method::GET || req.method() == Method::HEAD;
    if reads && !h.contains_key(header::UPGRADE) {
        return Ok(());
    }
    if h.get(CSRF_HEADER).is_none_or(|v| v.as_bytes() != b"1") || !h.contains_key(header::ORIGIN) {
        return Err(
            "a request with the console's cookie that changes something needs the header \
             X-Waypost-Console: 1 and this server's Origin (or use Authorization: Bearer)",
        );
    }
    Ok(())
}

/// False when an `Origin` header is present and is not `https://` + this request's `Host`.
fn same_origin(h: &HeaderMap) -> bool {
    let Some(origin) = h.get(header::ORIGIN) else {
        return true;
    };
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin.to_str().ok(), host) {
        (Some(o), Some(host)) => o
            .strip_prefix("https://")
            .is_some_and(|o| o.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// Whether a form post comes from this server's own pages. Under `Referrer-Policy: no-referrer`
/// a browser sends `Origin: null` with a form post, so `null` is taken here, and
/// `Sec-Fetch-Site` (which that policy does not touch) must then not name another site.
fn form_from_here(h: &HeaderMap) -> bool {
    let site_ok = h
        .get("sec-fetch-site")
        .is_none_or(|v| v.as_bytes() == b"same-origin" || v.as_bytes() == b"none");
    let origin_ok = h
        .get(header::ORIGIN)
        .is_some_and(|o| o.as_bytes() == b"null")
        || same_origin(h);
    site_ok && origin_ok
}

// ---- pages -------------------------------------------------------------------------------------

/// The headers of every console page: no framing, no referrer, no sniffing, scripts and styles
/// from this server only (console.js is a file: no inline script is allowed).
fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    resp
}

fn html(status: StatusCode, body: String) -> Response {
    harden(
        (
            status,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
    )
}

fn redirect(to: &'static str) -> Response {
    harden(
        (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, to), (header::CACHE_CONTROL, "no-store")],
        )
            .into_response(),
    )
}

fn serve_asset(a: &Asset, h: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", a.tag);
    let fresh = h
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let headers = [
        (header::CONTENT_TYPE, a.content_type.to_string()),
        (header::CACHE_CONTROL, "no-cache".to_string()),
        (header::ETAG, etag),
    ];
    let resp = if fresh {
        (StatusCode::NOT_MODIFIED, headers).into_response()
    } else {
        (StatusCode::OK, headers, a.body).into_response()
    };
    harden(resp)
}

async fn index() -> Response {
    html(StatusCode::OK, INDEX_HTML.to_string())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn sign_in_html(status: StatusCode, error: Option<&str>) -> Response {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    html(
        status,
        SIGN_IN_HTML
            .replace("{{error}}", &error)
            .replace("{{version}}", crate::VERSION),
    )
}

async fn sign_in_page(
    State(s): State<AppState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    h: HeaderMap,
) -> Response {
    // Signed in already: straight to the console.
    if let Some(id) = cookie(&h) {
        if let Ok(true) = session_valid(&s, &sessions, &id).await {
            return redirect(PAGE_PATH);
        }
    }
    sign_in_html(StatusCode::OK, None)
}

/// The value of `name` in an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let decode = |s: &[u8]| -> Vec<u8> {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                    (Some(a), Some(b)) => {
                        out.push(a << 4 | b);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                },
                c => out.push(c),
            }
            i += 1;
        }
        out
    };
    body.split(|&b| b == b'&').find_map(|kv| {
        let (k, v) = match kv.iter().position(|&b| b == b'=') {
            Some(i) => (&kv[..i], &kv[i + 1..]),
            None => (kv, &[][..]),
        };
        (decode(k) == name.as_bytes()).then(|| String::from_utf8_lossy(&decode(v)).into_owned())
    })
}

/// `POST /console/sign-in` (form field `token`): a valid admin token starts a session (303 to
/// the console with the cookie); anything else shows the form again with the reason (401; 403
/// for an entrypoint token), without a cookie.
async fn sign_in(
    State(s): State<AppState>,
    Extension(sessions): Extension<Arc<Sessions>>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if !form_from_here(&h) {
        return sign_in_html(
            StatusCode::FORBIDDEN,
            Some("cross-origin sign-in refused: use the form on this page"),
        );
    }
    if body.len() > MAX_FORM {
        return sign_in_html(StatusCode::PAYLOAD_TOO_LARGE, Some("the form is too large"));
    }
    let token = form_value(&body, "token").unwrap_or_default();
    let token = token.trim();
    if token.is_empty() {
        return sign_in_html(StatusCode::UNAUTHORIZED, Some("paste an admin token"));
    }
    let hash = auth::hash_token(token);
    let now = util::now_ms();
    let h2 = hash.clone();
    let lookup = match s
        .store
        .call(move |c| store::lookup_token_at(c, &h2, now))
        .await
    {
        Ok(l) => l,
        Err(e) => {
            let e = ApiError::from(e);
            return sign_in_html(e.0, Some(&e.1));
        }
    };
    let refused = match lookup {
        store::Lookup::Valid(TokenScope::Admin) => None,
        store::Lookup::Valid(TokenScope::Entrypoint { .. }) => Some((
            StatusCode::FORBIDDEN,
            "that is an entrypoint token; sign in with an admin token".to_string(),
        )),
        store::Lookup::Expired { expires_at } => Some((
            StatusCode::UNAUTHORIZED,
            format!(
                "that admin token expired at {}",
                util::fmt_rfc3339(expires_at)
            ),
        )),
        store::Lookup::Unknown => Some((
            StatusCode::UNAUTHORIZED,
            "invalid token (unknown or revoked)".to_string(),
        )),
    };
    if let Some((status, why)) = refused {
        tracing::info!(status = status.as_u16(), "console sign-in refused");
        return sign_in_html(status, Some(&why));
    }
    let id = sessions.create(&hash, Instant::now());
    // The token's id only, as everywhere in the log.
    tracing::info!(token = super::token_id(&hash), "console sign-in");
    let mut resp = redirect(PAGE_PATH);
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `POST /console/sign-out`: ends the session and clears the cookie; back to the sign-in page.
async fn sign_out(Extension(sessions): Extension<Arc<Sessions>>, h: HeaderMap) -> Response {
    if !form_from_here(&h) {
        return ApiError::new(StatusCode::FORBIDDEN, "cross-origin sign-out refused")
            .into_response();
    }
    if let Some(id) = cookie(&h) {
        sessions.end(&id);
    }
    let mut resp = redirect(SIGN_IN_PATH);
    let clear = format!("{COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `GET /console/apps/{app}/urls`: the app's URLs as `waypost url` prints them (plain ingress,
/// and the HTTPS ingress when on). Custom domains and access rules come from `/v1/domains` and
/// `/v1/apps/{app}/url/auth`.
async fn urls(State(s): State<AppState>, Path(app): Path<String>) -> Result<Json<Value>, ApiError> {
    require_app(&s, &app).await?;
    let mut urls = vec![ingress::app_url(&app, &s.url_domain, &s.ingress_addr)];
    if let Some(tls) = &s.https.addr {
        urls.push(ingress_tls::app_url(&app, &s.url_domain, tls));
    }
    Ok(Json(json!({ "app": app, "urls": urls })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let id = s.create("h", t0);
        assert_eq!(id.len(), 64);
        assert_eq!(s.token_hash(&id, t0).as_deref(), Some("h"));
        assert_eq!(s.token_hash("nope", t0), None);
        assert_eq!(s.token_hash(&id, t0 + SESSION_TTL), None, "expired");
        assert_eq!(s.token_hash(&id, t0), None, "an expired session is gone");
        let id = s.create("h", t0);
        s.end(&id);
        assert_eq!(s.token_hash(&id, t0), None);
    }

    #[test]
    fn sessions_are_capped() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let first = s.create("h", t0);
        for i in 1..=MAX_SESSIONS {
            s.create("h", t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(s.lock().len(), MAX_SESSIONS);
        assert_eq!(s.token_hash(&first, t0), None, "the oldest made room");
    }

    #[test]
    fn cookies_and_forms_parse() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; __Host-waypost-console=abc ; c=d"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("abc"));
        assert_eq!(
            form_value(b"x=1&token=wpa_1%2B2+3", "token").as_deref(),
            Some("wpa_1+2 3")
        );
        assert_eq!(form_value(b"token=%", "token").as_deref(), Some("%"));
        assert_eq!(form_value(b"token=%4", "token").as_deref(), Some("%4"));
        assert_eq!(form_value(b"token=a%41", "token").as_deref(), Some("aA"));
        assert_eq!(form_value(b"tokens=x", "token"), None);
    }

    #[test]
    fn origins_compare_with_the_host() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h), "no Origin: not a cross-origin request");
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9702"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:9702"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9702"),
        );
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
        // A form post under no-referrer: `null`, unless Sec-Fetch-Site names another site.
        assert!(form_from_here(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(form_from_here(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!form_from_here(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:9702"),
        );
        assert!(!form_from_here(&h));
        h.remove("sec-fetch-site");
        assert!(form_from_here(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!form_from_here(&h));
    }
}
