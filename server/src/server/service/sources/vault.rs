//! The OpenBao/Vault backend: reads a path over the HTTP API (`X-Vault-Token`) and keeps the
//! value current — KV paths read again every `refresh`, certificates read anew before they
//! expire, leases renewed while they can be and read anew (new credentials) when they cannot.
//!
//! One [`VaultSource`] per configured source, shared by all its followed paths: it owns the
//! source's own token (a fixed token, renewed with `renew-self` while renewable, or an AppRole
//! login, renewed and logged in again when it can no longer be renewed). Each followed path runs
//! [`VaultSource::follow`], whose timing is decided by the sans-IO [`Schedule`].
//!
//! Nothing here logs a secret value or a token: tracing fields are the source's name, the path
//! (without its query) and lease TTLs.

use super::http::Endpoint;
use super::{Auth, Fetched, Out, SourceSpec};
use hyper::{Method, StatusCode};
use serde_json::{Map, Value, json};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The first retry after a failure; it doubles up to [`MAX_BACKOFF`] (or the source's refresh,
/// when that is shorter).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between retries after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The shortest wait before reading or renewing again: a lease or certificate that is about to
/// expire (or a clock that disagrees with the source's) must not turn into a busy loop.
const MIN_DELAY: Duration = Duration::from_secs(1);

/// A connected OpenBao/Vault source: its address and its login, shared by every followed path.
pub struct VaultSource {
    spec: Arc<SourceSpec>,
    ep: Endpoint,
    session: tokio::sync::Mutex<Session>,
}

/// The source's own token, obtained lazily on first use.
#[derive(Default)]
struct Session {
    /// None: not logged in yet, or the AppRole token has to be replaced.
    token: Option<String>,
    /// Counts logins, so a reader that saw a 403 invalidates only the token it used.
    generation: u64,
    /// The task renewing the current token (aborted when replaced and on drop).
    keeper: Option<tokio::task::AbortHandle>,
}

impl Drop for VaultSource {
    fn drop(&mut self) {
        if let Some(keeper) = self.session.get_mut().keeper.take() {
            keeper.abort();
        }
    }
}

/// Why a call to the source failed.
#[derive(Debug)]
enum CallError {
    /// 404.
    NotFound,
    /// 403.
    Denied,
    /// 405: the path wants POST (e.g. `auth/token/create`).
    MethodNotAllowed,
    /// Any other non-2xx answer, with the server's `errors` joined.
    Status(StatusCode, String),
    /// No answer (connection refused, timeout, TLS…) or an answer that is not JSON.
    Io(String),
    /// Logging in (AppRole) failed; the message is a whole sentence.
    Login(String),
}

impl CallError {
    /// A sentence about a failed call to `what` (a path without its query).
    fn describe(&self, what: &str) -> String {
        match self {
            CallError::NotFound => format!("{what} not found"),
            CallError::Denied => format!("permission denied reading {what}"),
            CallError::MethodNotAllowed => {
                format!("reading {what} failed: the source does not support this operation")
            }
            CallError::Status(code, errors) if errors.is_empty() => {
                format!("reading {what} failed: HTTP {}", code.as_u16())
            }
            CallError::Status(code, errors) => {
                format!("reading {what} failed: HTTP {}: {errors}", code.as_u16())
            }
            CallError::Io(e) => format!("reading {what} failed: {e}"),
            CallError::Login(e) => e.clone(),
        }
    }
}

/// What is renewed to keep a value valid.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Renewal {
    /// A secret's lease: `sys/leases/renew`.
    Lease(String),
    /// A token the read created: `auth/token/renew`.
    Token(String),
}

impl VaultSource {
    /// Parses the source's address and CA; no I/O (the login happens on first use).
    pub fn new(spec: Arc<SourceSpec>) -> anyhow::Result<Arc<VaultSource>> {
        let ep = Endpoint::new(&spec.addr, spec.ca_pem.as_deref())?;
        Ok(Arc::new(VaultSource {
            spec,
            ep,
            session: tokio::sync::Mutex::new(Session::default()),
        }))
    }

    /// Follows `path` (`secret/data/web`, or with a query — `pki/issue/web?common_name=…` — to
    /// POST its pairs) until the task is aborted or `out`'s receiver is dropped: reports every
    /// value read ([`Fetched::Value`]) and every failure ([`Fetched::Failed`], then retried
    /// with backoff, forever). A lease renewed reports nothing: the value did not change.
    pub async fn follow(self: Arc<Self>, path: String, out: Out) {
        let mut req = match ReadReq::parse(&path) {
            Ok(r) => r,
            Err(e) => {
                // Retrying cannot fix the path: say why once, then wait for the end.
                if out.send(Fetched::Failed(e)).is_ok() {
                    out.closed().await;
                }
                return;
            }
        };
        let source = self.spec.name.as_str();
        let mut schedule = Schedule::new(self.spec.refresh, Instant::now());
        let mut renewal: Option<Renewal> = None;
        loop {
            let Some((action, at)) = schedule.next() else {
                // The value never expires and is not refreshed: nothing more to do.
                out.closed().await;
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = out.closed() => return,
            }
            match action {
                Action::Read => match self.read(&mut req).await {
                    Ok(resp) => {
                        let (value, lifetime, renew) = inspect(&resp, unix_now());
                        tracing::debug!(source, path = %req.path, ?lifetime, "read");
                        renewal = renew;
                        if out.send(Fetched::Value(value)).is_err() {
                            return;
                        }
                        schedule.read_ok(Instant::now(), lifetime);
                    }
                    Err(e) => {
                        tracing::warn!(source, path = %req.path, error = %e, "reading failed");
                        if out.send(Fetched::Failed(e)).is_err() {
                            return;
                        }
                        schedule.read_failed(Instant::now());
                    }
                },
                Action::Renew => {
                    let renewed = match &renewal {
                        Some(r) => self.renew(r, schedule.asked).await,
                        None => Err("there is no lease to renew".to_string()),
                    };
                    match &renewed {
                        Ok(ttl) => {
                            tracing::debug!(source, path = %req.path, ttl = ttl.as_secs(), "lease renewed")
                        }
                        Err(e) => {
                            tracing::warn!(source, path = %req.path, error = %e, "renewing the lease failed; reading anew")
                        }
                    }
                    schedule.renewed(Instant::now(), renewed.ok());
                }
            }
        }
    }

    /// Reads the path once: the whole JSON answer, or a sentence saying why not.
    async fn read(self: &Arc<Self>, req: &mut ReadReq) -> Result<Value, String> {
        let url = format!("/v1/{}", req.path);
        let result = if req.post {
            let body = req.body.clone().unwrap_or_else(|| json!({}));
            self.authed(Method::POST, &url, Some(&body)).await
        } else {
            match self.authed(Method::GET, &url, None).await {
                Err(CallError::MethodNotAllowed) => {
                    // A path that creates something on read (auth/token/create): POST from now
                    // on.
                    req.post = true;
                    self.authed(Method::POST, &url, Some(&json!({}))).await
                }
                other => other,
            }
        };
        result.map_err(|e| e.describe(&req.path))
    }

    /// Renews what keeps the value valid, asking for `increment` again; the TTL granted.
    async fn renew(
        self: &Arc<Self>,
        what: &Renewal,
        increment: Duration,
    ) -> Result<Duration, String> {
        let increment = increment.as_secs();
        let (url, body) = match what {
            Renewal::Lease(id) => (
                "/v1/sys/leases/renew",
                json!({ "lease_id": id, "increment": increment }),
            ),
            Renewal::Token(token) => (
                "/v1/auth/token/renew",
                json!({ "token": token, "increment": increment }),
            ),
        };
        let method = match what {
            Renewal::Lease(_) => Method::PUT,
            Renewal::Token(_) => Method::POST,
        };
        let answer = self
            .authed(method, url, Some(&body))
            .await
            .map_err(|e| e.describe(url.trim_start_matches("/v1/")))?;
        Ok(match what {
            Renewal::Lease(_) => secs(&answer["lease_duration"]),
            Renewal::Token(_) => secs(&answer["auth"]["lease_duration"]),
        })
    }

    /// A call with the source's token; with AppRole, a 403 logs in again and retries once (the
    /// token may have expired or been revoked under us).
    async fn authed(
        self: &Arc<Self>,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let (token, generation) = self.token().await.map_err(CallError::Login)?;
        match self.call(method.clone(), url, body, token.as_deref()).await {
            Err(CallError::Denied) if matches!(self.spec.auth, Auth::Approle { .. }) => {
                self.invalidate(generation).await;
                let (token, _) = self.token().await.map_err(CallError::Login)?;
                self.call(method, url, body, token.as_deref()).await
            }
            other => other,
        }
    }

    /// One request; the answer's JSON when it is a 2xx.
    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<Value, CallError> {
        let headers: Vec<(&str, &str)> = token.map(|t| ("X-Vault-Token", t)).into_iter().collect();
        let resp = self
            .ep
            .request(method, url, &headers, body)
            .await
            .map_err(|e| CallError::Io(format!("{e:#}")))?;
        match resp.status {
            s if s.is_success() => resp.json().map_err(|e| CallError::Io(format!("{e:#}"))),
            StatusCode::NOT_FOUND => Err(CallError::NotFound),
            StatusCode::FORBIDDEN => Err(CallError::Denied),
            StatusCode::METHOD_NOT_ALLOWED => Err(CallError::MethodNotAllowed),
            s => Err(CallError::Status(
                s,
                errors_of(&resp.json().unwrap_or(Value::Null)),
            )),
        }
    }

    /// The token to send (None without auth) and its login generation; logs in first when
    /// needed. The error is a sentence about the failed login.
    async fn token(self: &Arc<Self>) -> Result<(Option<String>, u64), String> {
        let mut s = self.session.lock().await;
        if matches!(self.spec.auth, Auth::None) {
            return Ok((None, s.generation));
        }
        if let Some(t) = &s.token {
            return Ok((Some(t.clone()), s.generation));
        }
        let (token, lease) = match &self.spec.auth {
            Auth::None => unreachable!("handled above"),
            // Its TTL is learnt by the keeper (lookup-self), not in the readers' way.
            Auth::Token(t) => (t.clone(), None),
            Auth::Approle { role_id, secret_id } => {
                let (t, lease) = self.approle_login(role_id, secret_id).await?;
                (t, Some(lease))
            }
        };
        s.generation += 1;
        s.token = Some(token.clone());
        if let Some(old) = s.keeper.take() {
            old.abort();
        }
        let keeper = keep_token(Arc::downgrade(self), s.generation, token.clone(), lease);
        s.keeper = Some(tokio::spawn(keeper).abort_handle());
        Ok((Some(token), s.generation))
    }

    /// Forgets the AppRole token of login `generation` (if it is still the current one), so the
    /// next call logs in again. A fixed token cannot be replaced: nothing happens.
    async fn invalidate(&self, generation: u64) {
        if !matches!(self.spec.auth, Auth::Approle { .. }) {
            return;
        }
        let mut s = self.session.lock().await;
        if s.generation == generation {
            s.token = None;
        }
    }

    /// `auth/approle/login`: the token and its (TTL, renewable).
    async fn approle_login(
        &self,
        role_id: &str,
        secret_id: &str,
    ) -> Result<(String, TokenLease), String> {
        let body = json!({ "role_id": role_id, "secret_id": secret_id });
        let fail = |why: String| {
            format!(
                "logging in to source {} with AppRole failed: {why}",
                self.spec.name
            )
        };
        let answer = self
            .call(Method::POST, "/v1/auth/approle/login", Some(&body), None)
            .await
            .map_err(|e| {
                fail(match e {
                    CallError::Denied => "permission denied (wrong role_id or secret_id?)".into(),
                    CallError::Status(_, errors) if !errors.is_empty() => errors,
                    e => e.describe("auth/approle/login"),
                })
            })?;
        let auth = &answer["auth"];
        let token = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("the answer carries no token".into()))?;
        let lease = TokenLease {
            ttl: secs(&auth["lease_duration"]),
            renewable: auth["renewable"].as_bool().unwrap_or(false),
        };
        tracing::info!(source = %self.spec.name, ttl = lease.ttl.as_secs(), "logged in with AppRole");
        Ok((token.to_string(), lease))
    }
}

/// The source's own token's lifetime.
#[derive(Debug, Clone, Copy)]
struct TokenLease {
    ttl: Duration,
    renewable: bool,
}

/// Keeps the source's token of login `generation` alive: `renew-self` at ⅔ of its TTL. An
/// AppRole token that cannot be renewed (failure, or a TTL shorter than asked: its max TTL is
/// near) is invalidated, so the next call logs in again. A fixed token (`lease` None: its TTL
/// is looked up first) is renewed while it can be, with a warning when it cannot.
async fn keep_token(
    src: Weak<VaultSource>,
    generation: u64,
    token: String,
    lease: Option<TokenLease>,
) {
    let Some(name) = src.upgrade().map(|s| s.spec.name.clone()) else {
        return;
    };
    let approle = lease.is_some();
    let mut backoff = Backoff::new(MAX_BACKOFF);
    let lease = match lease {
        Some(l) => l,
        None => loop {
            let Some(s) = src.upgrade() else { return };
            let looked = s
                .call(
                    Method::GET,
                    "/v1/auth/token/lookup-self",
                    None,
                    Some(&token),
                )
                .await;
            drop(s);
            match looked {
                Ok(v) => {
                    break TokenLease {
                        ttl: secs(&v["data"]["ttl"]),
                        renewable: v["data"]["renewable"].as_bool().unwrap_or(false),
                    };
                }
                Err(CallError::Io(e)) => {
                    tracing::debug!(source = %name, error = %e, "looking up the source's token failed; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) => {
                    tracing::warn!(source = %name, error = %e.describe("auth/token/lookup-self"), "cannot look up the source's token: it will not be renewed");
                    return;
                }
            }
        },
    };
    if !lease.renewable || lease.ttl.is_zero() {
        // Root tokens and periodic-less non-renewable tokens: nothing to do (an AppRole token
        // that expires is replaced when a read is denied).
        return;
    }
    let asked = lease.ttl;
    let mut ttl = lease.ttl;
    let mut expires = Instant::now() + ttl;
    let mut backoff = Backoff::new(MAX_BACKOFF);
    loop {
        tokio::time::sleep(two_thirds(ttl)).await;
        let Some(s) = src.upgrade() else { return };
        let body = json!({ "increment": asked.as_secs() });
        let renewed = s
            .call(
                Method::POST,
                "/v1/auth/token/renew-self",
                Some(&body),
                Some(&token),
            )
            .await;
        match renewed {
            Ok(v) => {
                let granted = secs(&v["auth"]["lease_duration"]);
                tracing::debug!(source = %name, ttl = granted.as_secs(), "renewed the source's token");
                if granted >= asked {
                    ttl = granted;
                    expires = Instant::now() + granted;
                    backoff = Backoff::new(MAX_BACKOFF);
                    continue;
                }
                if approle {
                    tracing::info!(source = %name, ttl = granted.as_secs(), "the AppRole token reaches its max TTL: logging in again");
                    s.invalidate(generation).await;
                } else {
                    tracing::warn!(source = %name, ttl = granted.as_secs(), "the source's token reaches its max TTL and cannot be renewed any more: give the source a new token");
                }
                return;
            }
            Err(e) if approle => {
                tracing::info!(source = %name, error = %e.describe("auth/token/renew-self"), "renewing the AppRole token failed: logging in again");
                s.invalidate(generation).await;
                return;
            }
            Err(e) => {
                // A fixed token cannot be replaced: keep trying while it is still valid.
                let left = expires.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    tracing::warn!(source = %name, error = %e.describe("auth/token/renew-self"), "the source's token could not be renewed and has expired");
                    return;
                }
                tracing::warn!(source = %name, error = %e.describe("auth/token/renew-self"), "renewing the source's token failed; retrying");
                // The next sleep is ⅔ of this: a retry well before the token expires.
                ttl = (backoff.next() * 3 / 2).min(left);
            }
        }
    }
}

// ---- the path --------------------------------------------------------------------------------

/// A followed path: `secret/data/web`, or `pki/issue/web?common_name=web.example.com&ttl=10s`.
#[derive(Debug, Clone, PartialEq)]
struct ReadReq {
    /// Without the query and without leading `/`.
    path: String,
    /// The query's pairs as a JSON object (values percent-decoded), to POST.
    body: Option<Value>,
    /// POST instead of GET: a query, or the source answered GET with 405.
    post: bool,
}

impl ReadReq {
    fn parse(path: &str) -> Result<ReadReq, String> {
        let (p, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let p = p.trim_start_matches('/');
        if p.is_empty() {
            return Err(format!("the path {path:?} is empty"));
        }
        let body = match query {
            None => None,
            Some(q) => {
                let mut obj = Map::new();
                for pair in q.split('&').filter(|s| !s.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let k = percent_decode(k)
                        .ok_or_else(|| format!("the path {path:?} has a badly encoded query"))?;
                    let v = percent_decode(v)
                        .ok_or_else(|| format!("the path {path:?} has a badly encoded query"))?;
                    if obj.insert(k.clone(), Value::String(v)).is_some() {
                        return Err(format!("the path {path:?} gives {k:?} twice"));
                    }
                }
                Some(Value::Object(obj))
            }
        };
        Ok(ReadReq {
            path: p.to_string(),
            post: body.is_some(),
            body,
        })
    }
}

/// `%XX` escapes decoded (`+` stays a plus: values like base64 keep theirs); None when an
/// escape is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---- what an answer means ---------------------------------------------------------------------

/// How long a value read stays valid, as far as the schedule is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifetime {
    /// No lease (KV): read again every `refresh`.
    Refresh,
    /// Valid for this long and then useless (a certificate's `data.expiration`); not renewable.
    Expires(Duration),
    /// A lease (a secret's `lease_id`, or a token the read created) of `ttl`.
    Lease { ttl: Duration, renewable: bool },
    /// A token that never expires (an `auth` block with no TTL): reading again would only
    /// create another one.
    Forever,
}

/// The value to report, its lifetime and what to renew, from a read's answer; `unix_now` is the
/// wall clock in seconds (certificates' expirations are absolute).
fn inspect(resp: &Value, unix_now: u64) -> (Value, Lifetime, Option<Renewal>) {
    let data = &resp["data"];
    let auth = &resp["auth"];
    let value = if data["data"].is_object() && data["metadata"].is_object() {
        data["data"].clone()
    } else if auth.is_object() {
        auth.clone()
    } else {
        data.clone()
    };
    let lease_id = resp["lease_id"].as_str().unwrap_or("");
    let ttl = secs(&resp["lease_duration"]);
    if !lease_id.is_empty() && !ttl.is_zero() {
        let renewable = resp["renewable"].as_bool().unwrap_or(false);
        let lifetime = Lifetime::Lease { ttl, renewable };
        return (value, lifetime, Some(Renewal::Lease(lease_id.to_string())));
    }
    if auth.is_object() {
        let ttl = secs(&auth["lease_duration"]);
        if ttl.is_zero() {
            return (value, Lifetime::Forever, None);
        }
        let token = auth["client_token"].as_str().filter(|t| !t.is_empty());
        let renewable = auth["renewable"].as_bool().unwrap_or(false) && token.is_some();
        let lifetime = Lifetime::Lease { ttl, renewable };
        return (
            value,
            lifetime,
            token.map(|t| Renewal::Token(t.to_string())),
        );
    }
    if let Some(expiration) = unsigned(&data["expiration"]) {
        let left = expiration.saturating_sub(unix_now);
        // An expired certificate (a clock disagreeing with the source's): the usual refresh
        // rather than reading again every MIN_DELAY.
        if left > 0 {
            return (value, Lifetime::Expires(Duration::from_secs(left)), None);
        }
    }
    (value, Lifetime::Refresh, None)
}

/// A JSON number or numeric string as seconds (0 for anything else).
fn secs(v: &Value) -> Duration {
    Duration::from_secs(unsigned(v).unwrap_or(0))
}

fn unsigned(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The server's `errors` array as one line.
fn errors_of(body: &Value) -> String {
    let Some(errors) = body["errors"].as_array() else {
        return String::new();
    };
    errors
        .iter()
        .filter_map(Value::as_str)
        // "1 error occurred:\n\t* unsupported operation\n\n" → one line.
        .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|e| !e.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---- when to do what (sans-IO) ------------------------------------------------------------------

/// What a follower does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Read the path (again, or anew for new credentials).
    Read,
    /// Renew the current lease, asking for [`Schedule::asked`] again.
    Renew,
}

/// When a followed path is read or renewed: fed with what happened and when, it says what to do
/// next and when. No I/O and no clock of its own, so it is tested with made-up instants.
#[derive(Debug, Clone)]
struct Schedule {
    refresh: Duration,
    /// The longest wait between retries: min(refresh, 30 s).
    max_backoff: Duration,
    backoff: Backoff,
    /// The current lease's original TTL: the increment renewals ask for.
    asked: Duration,
    /// None: nothing to do any more (a value that never expires).
    next: Option<(Action, Instant)>,
}

impl Schedule {
    /// Read right away.
    fn new(refresh: Duration, now: Instant) -> Schedule {
        let refresh = refresh.max(MIN_DELAY);
        let max_backoff = refresh.min(MAX_BACKOFF);
        Schedule {
            refresh,
            max_backoff,
            backoff: Backoff::new(max_backoff),
            asked: Duration::ZERO,
            next: Some((Action::Read, now)),
        }
    }

    fn next(&self) -> Option<(Action, Instant)> {
        self.next
    }

    /// A read succeeded at `now` with a value living `lifetime`.
    fn read_ok(&mut self, now: Instant, lifetime: Lifetime) {
        self.backoff = Backoff::new(self.max_backoff);
        self.next = match lifetime {
            Lifetime::Refresh => Some((Action::Read, now + self.refresh)),
            Lifetime::Forever => None,
            Lifetime::Expires(left) => {
                Some((Action::Read, now + self.refresh.min(two_thirds(left))))
            }
            Lifetime::Lease { ttl, renewable } => {
                self.asked = ttl;
                let action = if renewable {
                    Action::Renew
                } else {
                    Action::Read
                };
                Some((action, now + two_thirds(ttl)))
            }
        };
    }

    /// A read failed at `now`: retry after the backoff.
    fn read_failed(&mut self, now: Instant) {
        self.next = Some((Action::Read, now + self.backoff.next()));
    }

    /// A renewal ended at `now`: granted this TTL, or failed (None).
    fn renewed(&mut self, now: Instant, granted: Option<Duration>) {
        self.next = match granted {
            // Extended well enough: renew again at ⅔ of the new TTL.
            Some(ttl) if !ttl.is_zero() && ttl * 3 >= self.asked * 2 => {
                Some((Action::Renew, now + two_thirds(ttl)))
            }
            // The max TTL is near: use the credentials while they last, then read anew
            // before they expire.
            Some(ttl) => Some((Action::Read, now + two_thirds(ttl))),
            // The lease may be gone (revoked, the source restarted): new credentials now.
            None => Some((Action::Read, now)),
        };
    }
}

/// ⅔ of `d`, at least [`MIN_DELAY`].
fn two_thirds(d: Duration) -> Duration {
    (d * 2 / 3).max(MIN_DELAY)
}

/// Waits between retries: [`FIRST_BACKOFF`] doubling up to a cap.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: FIRST_BACKOFF.min(max),
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::service::sources::SourceKind;
    use tokio::sync::mpsc;
    use waypost_testkit::bao::Bao;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    // ---- the path and the answers ----

    #[test]
    fn paths_with_and_without_a_query() {
        let r = ReadReq::parse("secret/data/web").unwrap();
        assert_eq!(
            (r.path.as_str(), r.post, r.body),
            ("secret/data/web", false, None)
        );
        let r = ReadReq::parse("/pki/issue/web?common_name=web.example.com&ttl=10s").unwrap();
        assert_eq!(r.path, "pki/issue/web");
        assert!(r.post);
        assert_eq!(
            r.body,
            Some(json!({"common_name": "web.example.com", "ttl": "10s"}))
        );
        let r = ReadReq::parse("a/b?alt_names=x%2Cy%20z&sig=ab+c%3D&flag").unwrap();
        assert_eq!(
            r.body,
            Some(json!({"alt_names": "x,y z", "sig": "ab+c=", "flag": ""}))
        );
        for bad in ["", "/", "a?x=%zz", "a?x=%4", "a?x=%ff", "a?x=1&x=2"] {
            assert!(ReadReq::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ReadReq::parse("a?x=1&x=2").unwrap_err().contains("twice"));
    }

    #[test]
    fn the_value_and_lifetime_of_answers() {
        let kv2 = json!({"lease_id": "", "lease_duration": 0, "renewable": false,
            "data": {"data": {"password": "one"}, "metadata": {"version": 1}}, "auth": null});
        assert_eq!(
            inspect(&kv2, 0),
            (json!({"password": "one"}), Lifetime::Refresh, None)
        );

        // KV v1 with a `ttl` field: a lease_duration but no lease, a refresh hint only.
        let kv1 = json!({"lease_id": "", "lease_duration": 600, "data": {"password": "one"}});
        assert_eq!(
            inspect(&kv1, 0),
            (json!({"password": "one"}), Lifetime::Refresh, None)
        );

        let token = json!({"lease_id": "", "lease_duration": 0, "data": null,
            "auth": {"client_token": "s.x", "lease_duration": 4, "renewable": true}});
        let (v, lifetime, renewal) = inspect(&token, 0);
        assert_eq!(v["client_token"], "s.x");
        assert_eq!(
            lifetime,
            Lifetime::Lease {
                ttl: S(4),
                renewable: true
            }
        );
        assert_eq!(renewal, Some(Renewal::Token("s.x".into())));

        let forever = json!({"auth": {"client_token": "s.x", "lease_duration": 0}});
        assert_eq!(inspect(&forever, 0).1, Lifetime::Forever);

        let leased = json!({"lease_id": "database/creds/web/abc", "lease_duration": 3600,
            "renewable": false, "data": {"username": "u", "password": "p"}});
        let (v, lifetime, renewal) = inspect(&leased, 0);
        assert_eq!(v, json!({"username": "u", "password": "p"}));
        assert_eq!(
            lifetime,
            Lifetime::Lease {
                ttl: S(3600),
                renewable: false
            }
        );
        assert_eq!(
            renewal,
            Some(Renewal::Lease("database/creds/web/abc".into()))
        );

        let cert = json!({"lease_id": "", "lease_duration": 0,
            "data": {"certificate": "C", "private_key": "K", "expiration": 1_000_060}});
        assert_eq!(inspect(&cert, 1_000_000).1, Lifetime::Expires(S(60)));
        assert_eq!(inspect(&cert, 1_000_000).0["certificate"], "C");
        // Already expired by our clock: the usual refresh, not a busy loop.
        assert_eq!(inspect(&cert, 1_000_060).1, Lifetime::Refresh);
        let as_string = json!({"data": {"expiration": "1000030"}});
        assert_eq!(inspect(&as_string, 1_000_000).1, Lifetime::Expires(S(30)));
    }

    #[test]
    fn server_errors_become_one_line() {
        let body = json!({"errors": ["1 error occurred:\n\t* unsupported operation\n\n", "two"]});
        assert_eq!(
            errors_of(&body),
            "1 error occurred: * unsupported operation; two"
        );
        assert_eq!(errors_of(&json!({"errors": []})), "");
        assert_eq!(errors_of(&Value::Null), "");
    }

    // ---- the schedule, on a made-up clock ----

    #[test]
    fn kv_is_read_again_every_refresh_and_certificates_before_they_expire() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S(30), t0);
        assert_eq!(s.next(), Some((Action::Read, t0)));
        s.read_ok(t0, Lifetime::Refresh);
        assert_eq!(s.next(), Some((Action::Read, t0 + S(30))));
        // A certificate valid 6 s: read anew at 4 s, sooner than the refresh.
        s.read_ok(t0, Lifetime::Expires(S(6)));
        assert_eq!(s.next(), Some((Action::Read, t0 + S(4))));
        // Valid for a day: the refresh comes first.
        s.read_ok(t0, Lifetime::Expires(S(86_400)));
        assert_eq!(s.next(), Some((Action::Read, t0 + S(30))));
        // Nearly expired: not sooner than MIN_DELAY.
        s.read_ok(t0, Lifetime::Expires(MS(300)));
        assert_eq!(s.next(), Some((Action::Read, t0 + MIN_DELAY)));
        s.read_ok(t0, Lifetime::Forever);
        assert_eq!(s.next(), None);
    }

    #[test]
    fn a_renewable_lease_is_renewed_until_its_max_ttl_is_near_then_read_anew() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S(30), t0);
        s.read_ok(
            t0,
            Lifetime::Lease {
                ttl: S(60),
                renewable: true,
            },
        );
        assert_eq!(s.next(), Some((Action::Renew, t0 + S(40))));
        assert_eq!(s.asked, S(60));
        let t1 = t0 + S(40);
        s.renewed(t1, Some(S(60)));
        assert_eq!(s.next(), Some((Action::Renew, t1 + S(40))));
        // Granted 45 s of the 60 asked: still ≥ ⅔, renew again at ⅔ of 45.
        s.renewed(t1, Some(S(45)));
        assert_eq!(s.next(), Some((Action::Renew, t1 + S(30))));
        // Granted 30 s (< 40): the max TTL is near; new credentials at ⅔ of what is left.
        s.renewed(t1, Some(S(30)));
        assert_eq!(s.next(), Some((Action::Read, t1 + S(20))));
        // A failed renewal: new credentials right away.
        s.renewed(t1, None);
        assert_eq!(s.next(), Some((Action::Read, t1)));
        // A zero TTL is no extension at all.
        s.renewed(t1, Some(Duration::ZERO));
        assert_eq!(s.next().unwrap().0, Action::Read);
    }

    #[test]
    fn a_lease_that_is_not_renewable_is_read_anew_at_two_thirds() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S(30), t0);
        s.read_ok(
            t0,
            Lifetime::Lease {
                ttl: S(90),
                renewable: false,
            },
        );
        assert_eq!(s.next(), Some((Action::Read, t0 + S(60))));
    }

    #[test]
    fn failures_back_off_from_one_second_doubling_to_the_refresh_or_30_s() {
        let t0 = Instant::now();
        let waits = |refresh: Duration| {
            let mut s = Schedule::new(refresh, t0);
            (0..7)
                .map(|_| {
                    s.read_failed(t0);
                    s.next().unwrap().1 - t0
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(waits(S(10)), [S(1), S(2), S(4), S(8), S(10), S(10), S(10)]);
        assert_eq!(waits(S(300)), [S(1), S(2), S(4), S(8), S(16), S(30), S(30)]);
        assert_eq!(waits(S(1)), [S(1); 7]);
        // A success starts over.
        let mut s = Schedule::new(S(300), t0);
        for _ in 0..4 {
            s.read_failed(t0);
        }
        s.read_ok(t0, Lifetime::Refresh);
        s.read_failed(t0);
        assert_eq!(s.next(), Some((Action::Read, t0 + S(1))));
    }

    /// The whole life of `auth/token/create?ttl=4s&explicit_max_ttl=10s` against a simulated
    /// server that grants min(asked, what is left of the max TTL): renewed twice with nothing
    /// reported, then a new token read before the first one's max TTL.
    #[test]
    fn a_token_with_a_max_ttl_is_replaced_before_it_expires() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S(30), t0);
        let (mut created, mut reads, mut renewals) = (t0, 0, 0);
        let mut now = t0;
        while now < t0 + S(25) {
            let (action, at) = s.next().unwrap();
            assert!(at >= now, "the schedule does not go back in time");
            now = at;
            match action {
                Action::Read => {
                    if reads > 0 {
                        assert!(now < created + S(10), "replaced before the max TTL");
                        assert!(now >= created + S(8), "not replaced needlessly early");
                    }
                    reads += 1;
                    created = now;
                    s.read_ok(
                        now,
                        Lifetime::Lease {
                            ttl: S(4),
                            renewable: true,
                        },
                    );
                }
                Action::Renew => {
                    renewals += 1;
                    let left = (created + S(10)).saturating_duration_since(now);
                    assert!(!left.is_zero(), "renewed an expired token");
                    s.renewed(now, Some(S(s.asked.as_secs().min(left.as_secs()))));
                }
            }
        }
        assert_eq!(reads, 3, "a new token every ~9.3 s over 25 s");
        // At 2.7, 5.3 and 8 s of each token's life (the last one grants only 2 s).
        assert_eq!(renewals, 9, "three renewals per token");
    }

    // ---- against a real OpenBao ----

    fn spec(bao: &Bao, auth: Auth, refresh: Duration) -> Arc<SourceSpec> {
        Arc::new(SourceSpec {
            scope: String::new(),
            name: "bao".into(),
            kind: SourceKind::Openbao,
            addr: bao.addr.clone(),
            ca_pem: None,
            auth,
            refresh,
        })
    }

    fn root(bao: &Bao) -> Auth {
        Auth::Token(bao.token.clone())
    }

    /// A followed path; the follower is aborted on drop.
    struct Following {
        rx: mpsc::UnboundedReceiver<Fetched>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Following {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn follow(src: &Arc<VaultSource>, path: &str) -> Following {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(src.clone().follow(path.to_string(), tx));
        Following { rx, task }
    }

    impl Following {
        /// The next report, within `limit`.
        async fn within(&mut self, limit: Duration) -> Option<Fetched> {
            tokio::time::timeout(limit, self.rx.recv())
                .await
                .ok()
                .map(|f| f.expect("the follower stopped"))
        }

        async fn next(&mut self) -> Fetched {
            self.within(waypost_testkit::WAIT)
                .await
                .expect("a report within WAIT")
        }

        async fn value(&mut self) -> Value {
            match self.next().await {
                Fetched::Value(v) => v,
                Fetched::Failed(e) => panic!("expected a value, got a failure: {e}"),
            }
        }

        async fn failure(&mut self) -> String {
            match self.next().await {
                Fetched::Failed(e) => e,
                Fetched::Value(v) => panic!("expected a failure, got {v}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kv_v2_is_read_and_changes_are_seen() {
        let bao = Bao::start();
        bao.cli(&["kv", "put", "secret/web", "password=one"]);
        let src = VaultSource::new(spec(&bao, root(&bao), S(1))).unwrap();
        let mut f = follow(&src, "secret/data/web");
        assert_eq!(f.value().await, json!({"password": "one"}));
        bao.cli(&["kv", "put", "secret/web", "password=two"]);
        let start = Instant::now();
        loop {
            let v = f.value().await;
            if v == json!({"password": "two"}) {
                break;
            }
            assert_eq!(
                v,
                json!({"password": "one"}),
                "only the old or the new value"
            );
            assert!(
                start.elapsed() < S(5),
                "the change is seen within a few seconds"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn approle_logs_in_renews_and_logs_in_again_at_the_max_ttl() {
        let bao = Bao::start();
        bao.cli(&["auth", "enable", "approle"]);
        bao.cli(&[
            "write",
            "sys/policy/read-secrets",
            r#"policy=path "secret/*" { capabilities = ["read"] }"#,
        ]);
        bao.cli(&[
            "write",
            "auth/approle/role/web",
            "token_ttl=4s",
            "token_max_ttl=10s",
            "token_policies=read-secrets",
        ]);
        let role_id = bao.cli(&["read", "-field=role_id", "auth/approle/role/web/role-id"]);
        let secret_id = bao.cli(&[
            "write",
            "-f",
            "-field=secret_id",
            "auth/approle/role/web/secret-id",
        ]);
        bao.cli(&["kv", "put", "secret/web", "password=one"]);
        let auth = Auth::Approle {
            role_id: role_id.trim().into(),
            secret_id: secret_id.trim().into(),
        };
        let src = VaultSource::new(spec(&bao, auth, S(1))).unwrap();
        let generation = || async { src.session.lock().await.generation };

        let start = Instant::now();
        let mut f = follow(&src, "secret/data/web");
        let mut checked_renewal = false;
        let mut values_after_max_ttl = 0;
        while start.elapsed() < S(13) {
            // Every report is the value: no failure across the renewals and the new login.
            assert_eq!(f.value().await, json!({"password": "one"}));
            if !checked_renewal && start.elapsed() > MS(6500) {
                // Past the token's 4 s TTL with the first login: it was renewed (an expired
                // token would have been denied, and a new login made).
                assert_eq!(
                    generation().await,
                    1,
                    "renewed, not replaced, before the max TTL"
                );
                checked_renewal = true;
            }
            if start.elapsed() > S(10) {
                values_after_max_ttl += 1;
            }
        }
        assert!(checked_renewal);
        assert!(
            values_after_max_ttl >= 2,
            "reading works past the 10 s max TTL"
        );
        assert!(generation().await >= 2, "logged in again for the max TTL");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_created_token_is_renewed_then_replaced_before_its_max_ttl() {
        let bao = Bao::start();
        let src = VaultSource::new(spec(&bao, root(&bao), S(30))).unwrap();
        let start = Instant::now();
        let mut f = follow(
            &src,
            "auth/token/create?ttl=4s&explicit_max_ttl=10s&policies=default",
        );
        let first = f.value().await;
        let token = |v: &Value| {
            v["client_token"]
                .as_str()
                .expect("a client_token")
                .to_string()
        };
        let t1 = token(&first);
        assert_eq!(first["lease_duration"], 4);
        bao.cli(&["token", "lookup", &t1]);

        // Renewals at ~2.7 s and ~5.3 s report nothing: the value did not change.
        let quiet_until = start + MS(6500);
        let early = f.within(quiet_until - Instant::now()).await;
        // (Not printing the report: it holds a token.)
        assert!(early.is_none(), "nothing reported while renewing");
        // Past its 4 s TTL, so valid only because it was renewed.
        bao.cli(&["token", "lookup", &t1]);

        let second = f.value().await;
        let t2 = token(&second);
        assert!(
            start.elapsed() < S(10),
            "the new token came before the first one's max TTL"
        );
        assert_ne!(t1, t2, "a new token");
        bao.cli(&["token", "lookup", &t2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_is_issued_again_before_it_expires() {
        let bao = Bao::start();
        bao.cli(&["secrets", "enable", "pki"]);
        bao.cli(&["secrets", "tune", "-max-lease-ttl=8760h", "pki"]);
        bao.cli(&[
            "write",
            "-field=certificate",
            "pki/root/generate/internal",
            "common_name=example.com",
            "ttl=8760h",
        ]);
        bao.cli(&[
            "write",
            "pki/roles/web",
            "allowed_domains=example.com",
            "allow_subdomains=true",
            "max_ttl=1h",
        ]);
        let src = VaultSource::new(spec(&bao, root(&bao), S(30))).unwrap();
        let mut f = follow(&src, "pki/issue/web?common_name=web.example.com&ttl=6s");
        let first = f.value().await;
        for field in ["certificate", "private_key"] {
            let pem = first[field]
                .as_str()
                .unwrap_or_else(|| panic!("no {field}"));
            assert!(pem.starts_with("-----BEGIN"), "{field} is PEM");
        }
        let expires = unsigned(&first["expiration"]).expect("an expiration");
        let second = f.value().await;
        assert!(
            unix_now() < expires,
            "the new certificate came before the first expired"
        );
        assert_ne!(first["certificate"], second["certificate"]);
        assert_ne!(first["serial_number"], second["serial_number"]);
    }

    /// One request a [`fake_vault`] received: method, path, JSON body, token.
    type Seen = (String, String, Value, String);

    /// A stand-in for a secrets engine with real leases (the dev server has none without an
    /// outside database): `GET /v1/database/creds/web` hands out credentials number N on a
    /// renewable 3 s lease; `PUT /v1/sys/leases/renew` grants 3 s the first time and 1 s after
    /// (the max TTL is near). Every request is recorded.
    async fn fake_vault() -> (String, Arc<std::sync::Mutex<Vec<Seen>>>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::<Seen>::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let (mut reads, mut renewals) = (0, 0);
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = conn.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "a whole request");
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() >= end + 4 + len {
                        break (head, buf[end + 4..end + 4 + len].to_vec());
                    }
                };
                let mut words = head.split_whitespace();
                let method = words.next().unwrap().to_uppercase();
                let path = words.next().unwrap().to_string();
                let token = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-vault-token:"))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let answer = match (method.as_str(), path.as_str()) {
                    ("GET", "/v1/database/creds/web") => {
                        reads += 1;
                        json!({"lease_id": format!("database/creds/web/{reads}"),
                            "lease_duration": 3, "renewable": true,
                            "data": {"username": format!("u{reads}")}})
                    }
                    ("PUT", "/v1/sys/leases/renew") => {
                        renewals += 1;
                        let ttl = if renewals == 1 { 3 } else { 1 };
                        json!({"lease_id": body["lease_id"], "lease_duration": ttl,
                            "renewable": true})
                    }
                    // The source token's lookup: a token that never expires.
                    _ => json!({"data": {"ttl": 0, "renewable": false}}),
                };
                log.lock().unwrap().push((method, path, body, token));
                let answer = answer.to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                conn.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        (addr, seen)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_secret_lease_is_renewed_then_read_anew_when_it_cannot_be_extended() {
        let (addr, seen) = fake_vault().await;
        let spec = Arc::new(SourceSpec {
            scope: String::new(),
            name: "fake".into(),
            kind: SourceKind::Vault,
            addr,
            ca_pem: None,
            auth: Auth::Token("t0k".into()),
            refresh: S(30),
        });
        let src = VaultSource::new(spec).unwrap();
        let start = Instant::now();
        let mut f = follow(&src, "database/creds/web");
        assert_eq!(f.value().await, json!({"username": "u1"}));
        // Renewed at 2 s (granted 3 s), at 4 s (granted 1 s: the max TTL is near), new
        // credentials at ⅔ of that second (the 1 s floor): ~5 s.
        assert_eq!(f.value().await, json!({"username": "u2"}));
        let took = start.elapsed();
        assert!(took > S(4) && took < S(7), "new credentials after {took:?}");

        let seen = seen.lock().unwrap().clone();
        let calls: Vec<(&str, &str, &Value)> = seen
            .iter()
            .filter(|(_, p, _, _)| p != "/v1/auth/token/lookup-self")
            .map(|(m, p, b, _)| (m.as_str(), p.as_str(), b))
            .collect();
        let renew = json!({"lease_id": "database/creds/web/1", "increment": 3});
        assert_eq!(
            calls,
            [
                ("GET", "/v1/database/creds/web", &Value::Null),
                ("PUT", "/v1/sys/leases/renew", &renew),
                ("PUT", "/v1/sys/leases/renew", &renew),
                ("GET", "/v1/database/creds/web", &Value::Null),
            ]
        );
        assert!(
            seen.iter().all(|(_, _, _, t)| t == "t0k"),
            "every call carries the token"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_are_reported_and_recovered_from() {
        let mut bao = Bao::start();
        bao.cli(&["kv", "put", "secret/web", "password=one"]);

        let wrong = VaultSource::new(spec(&bao, Auth::Token("wrong".into()), S(1))).unwrap();
        let e = follow(&wrong, "secret/data/web").failure().await;
        assert!(e.contains("permission denied"), "{e}");

        let src = VaultSource::new(spec(&bao, root(&bao), S(1))).unwrap();
        let e = follow(&src, "secret/data/missing").failure().await;
        assert!(e.contains("secret/data/missing not found"), "{e}");

        let mut f = follow(&src, "secret/data/web");
        assert_eq!(f.value().await, json!({"password": "one"}));
        bao.stop();
        let e = loop {
            if let Fetched::Failed(e) = f.next().await {
                break e;
            }
        };
        assert!(e.contains("reading secret/data/web failed"), "{e}");
        assert!(e.contains("connecting"), "{e}");
        // Still down: it keeps trying and keeps saying so.
        assert!(matches!(f.next().await, Fetched::Failed(_)));

        bao.start_again();
        bao.cli(&["kv", "put", "secret/web", "password=two"]);
        let start = Instant::now();
        loop {
            match f.next().await {
                Fetched::Value(v) => {
                    // Between the restart and the put, the path did not exist yet.
                    assert_eq!(v, json!({"password": "two"}));
                    break;
                }
                Fetched::Failed(_) => assert!(start.elapsed() < S(5), "back within a few seconds"),
            }
        }
    }
}
