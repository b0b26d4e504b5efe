//! etcd backend: one key per follower, read with a range request and then watched, over etcd's
//! v3 JSON gateway (etcd 3.4+: `POST /v3/kv/range`, `POST /v3/watch`; keys and values base64
//! in the JSON), so no gRPC/protobuf stack is needed.
//!
//! The watch starts at the revision after the read, so no change between the two is missed. Its
//! answer is one endless HTTP body of concatenated JSON objects; [`JsonSplitter`] cuts it into
//! objects whatever the chunk boundaries. Any failure (unreachable, watch ended, canceled…) is
//! reported once per failure episode; then, after a backoff, the key is read again and watched
//! again.
//!
//! Credentials (`--token USER:PASSWORD`) are exchanged for an etcd auth token once per source,
//! shared by every key followed on it, and exchanged again when etcd says the token is no longer
//! valid. Values are never logged.

use super::http::{Endpoint, MAX_BODY, REQUEST_TIMEOUT};
use super::{Auth, Fetched, Out, SourceSpec};
use crate::util::{base64_decode, base64_encode};
use http_body_util::BodyExt as _;
use hyper::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First wait after a failure; doubled after each further failure up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A watch that says nothing for this long is taken for a dead connection. The watch asks for
/// progress notifications, which etcd sends on an idle watch every 10 minutes by default
/// (`--experimental-watch-progress-notify-interval`), so a live watch is never this quiet.
///
/// Why not re-read the key every `spec.refresh` as well, as a safety net: the watch already
/// delivers every change at once, and a connection that died silently is caught by this idle
/// limit; polling would add a request per key and refresh interval to etcd for nothing.
const WATCH_IDLE: Duration = Duration::from_secs(15 * 60);

/// gRPC status code etcd answers with when a token is missing, expired or invalid.
const UNAUTHENTICATED: i64 = 16;

/// What [`Auth`] means for etcd.
enum Creds {
    /// No authentication.
    None,
    /// A user and password, exchanged for a token.
    User { name: String, password: String },
    /// Credentials etcd cannot use: the message says why.
    Unusable(String),
}

/// A connected etcd source (see the module doc).
pub struct EtcdSource {
    spec: Arc<SourceSpec>,
    ep: Endpoint,
    creds: Creds,
    /// The auth token of `creds`, shared by all followers: None until authenticated (again),
    /// Some("") when etcd said authentication is not enabled (nothing to send).
    token: tokio::sync::Mutex<Option<String>>,
}

/// How a watch ended.
enum Watched {
    /// The start revision was compacted away: read again and watch from the new revision.
    Compacted,
    /// Failed (the message says why) after having been established for `lasted`.
    Failed { msg: String, lasted: Duration },
    /// The receiver is gone.
    Closed,
}

impl EtcdSource {
    /// Parses the source's address, CA and credentials; no I/O.
    pub fn new(spec: Arc<SourceSpec>) -> anyhow::Result<Arc<EtcdSource>> {
        let ep = Endpoint::new(&spec.addr, spec.ca_pem.as_deref())?;
        let creds = match &spec.auth {
            Auth::None => Creds::None,
            Auth::Token(t) => match t.split_once(':') {
                Some((name, password)) if !name.is_empty() => Creds::User {
                    name: name.to_string(),
                    password: password.to_string(),
                },
                _ => Creds::Unusable(
                    "an etcd source's token must be USER:PASSWORD (the etcd user and its password)"
                        .to_string(),
                ),
            },
            Auth::Approle { .. } => {
                Creds::Unusable("AppRole is for OpenBao/Vault sources, not etcd".to_string())
            }
        };
        Ok(Arc::new(EtcdSource {
            spec,
            ep,
            creds,
            token: tokio::sync::Mutex::new(None),
        }))
    }

    /// Follows the key `path` until aborted or `out` closed: reports its value, every change,
    /// and every failure (once per episode, then retried with backoff).
    pub async fn follow(self: Arc<Self>, path: String, out: Out) {
        tokio::select! {
            _ = self.run(&path, &out) => {}
            _ = out.closed() => {}
        }
    }

    /// Returns only when `out`'s receiver is gone.
    async fn run(&self, key: &str, out: &Out) {
        if let Creds::Unusable(msg) = &self.creds {
            let _ = out.send(Fetched::Failed(msg.clone()));
            // Nothing to retry until the source is configured again (which makes a new one).
            return out.closed().await;
        }
        let mut backoff = BACKOFF_START;
        // In a failure episode: its Failed was reported, later failures are not.
        let mut failing = false;
        // The previous watch ended compacted: a second time in a row is a failure (a correct
        // etcd never compacts past the revision it just answered, so this guards a loop).
        let mut compacted = false;
        loop {
            let msg = match self.read(key).await {
                Err(msg) => msg,
                Ok((revision, fetched)) => {
                    failing = false;
                    tracing::debug!(source = %self.spec.name, key, revision, "etcd: read");
                    if out.send(fetched).is_err() {
                        return;
                    }
                    match self.watch(key, revision + 1, out).await {
                        Watched::Closed => return,
                        Watched::Compacted if !compacted => {
                            tracing::debug!(source = %self.spec.name, key, revision, "etcd: watch compacted, reading again");
                            compacted = true;
                            continue;
                        }
                        Watched::Compacted => {
                            format!(
                                "etcd keeps answering that the watch on key {key:?} starts at a compacted revision"
                            )
                        }
                        Watched::Failed { msg, lasted } => {
                            // A watch that held a while ends the episode's backoff: the next
                            // failure is a new problem, retried quickly.
                            if lasted >= BACKOFF_MAX {
                                backoff = BACKOFF_START;
                            }
                            msg
                        }
                    }
                }
            };
            compacted = false;
            if !failing {
                failing = true;
                tracing::warn!(source = %self.spec.name, key, error = %msg, "etcd: following a key failed; retrying");
                if out.send(Fetched::Failed(msg)).is_err() {
                    return;
                }
            } else {
                tracing::debug!(source = %self.spec.name, key, error = %msg, "etcd: still failing");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Reads `key`: the store's revision and what to report (the value, or not found).
    async fn read(&self, key: &str) -> Result<(i64, Fetched), String> {
        let body = json!({ "key": base64_encode(key.as_bytes()) });
        let what = format!("reading key {key:?}");
        let v = self.call("/v3/kv/range", &body, &what).await?;
        let revision = int(&v["header"]["revision"])
            .ok_or_else(|| format!("etcd's answer to {what} has no revision"))?;
        let fetched = match v["kvs"].get(0) {
            None => Fetched::Failed(format!("key {key:?} not found in etcd")),
            Some(kv) => value_of(key, kv),
        };
        Ok((revision, fetched))
    }

    /// One unary gateway call (POST `url` with `body`), authenticated; on an auth error the
    /// token is renewed and the call made once more. `what` names the call for messages.
    async fn call(&self, url: &str, body: &Value, what: &str) -> Result<Value, String> {
        let mut retried = false;
        loop {
            let token = self.token().await?;
            let headers = auth_header(&token);
            let resp = self
                .ep
                .request(Method::POST, url, &headers, Some(body))
                .await
                .map_err(|e| self.unreachable(e))?;
            if resp.status.is_success() {
                return resp
                    .json()
                    .map_err(|e| format!("etcd's answer to {what}: {e}"));
            }
            let err = EtcdError::parse(&resp.body);
            if err.is_auth() {
                if !retried && matches!(self.creds, Creds::User { .. }) {
                    retried = true;
                    self.invalidate(&token).await;
                    continue;
                }
                return Err(self.auth_failure(what, &err.message));
            }
            return Err(format!(
                "etcd at {} refused {what} ({}): {}",
                self.spec.addr, resp.status, err.message
            ));
        }
    }

    /// Watches `key` from revision `start`, reporting each change, until it ends.
    async fn watch(&self, key: &str, start: i64, out: &Out) -> Watched {
        let failed = |msg: String, created: Option<Instant>| Watched::Failed {
            msg,
            lasted: created.map_or(Duration::ZERO, |t| t.elapsed()),
        };
        let what = format!("watching key {key:?}");
        let body = json!({ "create_request": {
            "key": base64_encode(key.as_bytes()),
            "start_revision": start.to_string(),
            // Keeps an idle watch talking, so WATCH_IDLE can tell a dead connection.
            "progress_notify": true,
        }});
        let mut retried = false;
        'attempt: loop {
            let token = match self.token().await {
                Ok(t) => t,
                Err(msg) => return failed(msg, None),
            };
            let resp = match self
                .ep
                .send(Method::POST, "/v3/watch", &auth_header(&token), Some(&body))
                .await
            {
                Ok(r) => r,
                Err(e) => return failed(self.unreachable(e), None),
            };
            let status = resp.status();
            if !status.is_success() {
                let body = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    http_body_util::Limited::new(resp.into_body(), MAX_BODY).collect(),
                )
                .await;
                let bytes = match body {
                    Ok(Ok(b)) => b.to_bytes(),
                    _ => Default::default(),
                };
                let err = EtcdError::parse(&bytes);
                if err.is_auth() {
                    if !retried && matches!(self.creds, Creds::User { .. }) {
                        retried = true;
                        self.invalidate(&token).await;
                        continue 'attempt;
                    }
                    return failed(self.auth_failure(&what, &err.message), None);
                }
                let msg = format!(
                    "etcd at {} refused {what} ({status}): {}",
                    self.spec.addr, err.message
                );
                return failed(msg, None);
            }
            let mut body = resp.into_body();
            let mut split = JsonSplitter::default();
            let mut created = None;
            loop {
                let frame = match tokio::time::timeout(WATCH_IDLE, body.frame()).await {
                    Err(_) => {
                        let msg = format!(
                            "no word from etcd on the watch of key {key:?} in {WATCH_IDLE:?} (connection lost?)"
                        );
                        return failed(msg, created);
                    }
                    Ok(None) => {
                        let msg =
                            format!("etcd at {} ended the watch on key {key:?}", self.spec.addr);
                        return failed(msg, created);
                    }
                    Ok(Some(Err(e))) => {
                        return failed(format!("the watch on key {key:?} broke: {e}"), created);
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                split.push(&data);
                loop {
                    let object = match split.next_object() {
                        Ok(Some(o)) => o,
                        Ok(None) => break,
                        Err(e) => {
                            return failed(format!("etcd's watch stream: {e}"), created);
                        }
                    };
                    let v: Value = match serde_json::from_slice(&object) {
                        Ok(v) => v,
                        Err(e) => {
                            return failed(
                                format!("etcd's watch stream is not JSON: {e}"),
                                created,
                            );
                        }
                    };
                    // A gateway error on the stream: {"error": {"grpc_code": N, "message": …}}.
                    if let Some(e) = v.get("error") {
                        let err = EtcdError::of(e);
                        if err.is_auth() {
                            if !retried
                                && created.is_none()
                                && matches!(self.creds, Creds::User { .. })
                            {
                                retried = true;
                                self.invalidate(&token).await;
                                continue 'attempt;
                            }
                            return failed(self.auth_failure(&what, &err.message), created);
                        }
                        return failed(format!("etcd failed {what}: {}", err.message), created);
                    }
                    let r = &v["result"];
                    let revision = int(&r["header"]["revision"]).unwrap_or(0);
                    if int(&r["compact_revision"]).is_some_and(|c| c > 0) {
                        return Watched::Compacted;
                    }
                    if r["canceled"].as_bool() == Some(true) {
                        let reason = r["cancel_reason"].as_str().unwrap_or("no reason given");
                        if EtcdError::message_is_auth(reason) {
                            if !retried
                                && created.is_none()
                                && matches!(self.creds, Creds::User { .. })
                            {
                                retried = true;
                                self.invalidate(&token).await;
                                continue 'attempt;
                            }
                            return failed(self.auth_failure(&what, reason), created);
                        }
                        return failed(
                            format!("etcd canceled the watch on key {key:?}: {reason}"),
                            created,
                        );
                    }
                    if r["created"].as_bool() == Some(true) {
                        tracing::debug!(source = %self.spec.name, key, revision, "etcd: watching");
                        created = Some(Instant::now());
                    }
                    for ev in r["events"].as_array().into_iter().flatten() {
                        let revision = int(&ev["kv"]["mod_revision"]).unwrap_or(revision);
                        let fetched = if matches!(ev["type"].as_str(), Some("DELETE"))
                            || ev["type"].as_i64() == Some(1)
                        {
                            tracing::debug!(source = %self.spec.name, key, revision, "etcd: key deleted");
                            Fetched::Failed(format!("key {key:?} was deleted from etcd"))
                        } else {
                            // PUT is the default, so usually no "type" at all.
                            tracing::debug!(source = %self.spec.name, key, revision, "etcd: key changed");
                            value_of(key, &ev["kv"])
                        };
                        if out.send(fetched).is_err() {
                            return Watched::Closed;
                        }
                    }
                }
            }
        }
    }

    /// The token to send (None: none), authenticating first if there is none yet. Holding the
    /// lock while authenticating makes concurrent followers wait for one exchange.
    async fn token(&self) -> Result<Option<String>, String> {
        let Creds::User { name, password } = &self.creds else {
            return Ok(None);
        };
        let mut slot = self.token.lock().await;
        if let Some(t) = &*slot {
            return Ok(Some(t.clone()));
        }
        let body = json!({ "name": name, "password": password });
        let resp = self
            .ep
            .request(Method::POST, "/v3/auth/authenticate", &[], Some(&body))
            .await
            .map_err(|e| self.unreachable(e))?;
        let token = if resp.status.is_success() {
            let v = resp
                .json()
                .map_err(|e| format!("etcd's answer to authenticating: {e}"))?;
            v["token"]
                .as_str()
                .ok_or("etcd's answer to authenticating has no token")?
                .to_string()
        } else {
            let err = EtcdError::parse(&resp.body);
            // As etcd's own client does: credentials for an etcd without auth are not an error.
            if err.message.contains("authentication is not enabled") {
                String::new()
            } else {
                return Err(format!(
                    "etcd authentication as user {name:?} failed: {}",
                    err.message
                ));
            }
        };
        tracing::debug!(source = %self.spec.name, "etcd: authenticated");
        *slot = Some(token.clone());
        Ok(Some(token))
    }

    /// Forgets `used` (etcd refused it), unless another follower already replaced it.
    async fn invalidate(&self, used: &Option<String>) {
        let mut slot = self.token.lock().await;
        if *slot == *used {
            *slot = None;
        }
    }

    fn unreachable(&self, e: anyhow::Error) -> String {
        format!("cannot reach etcd at {}: {e:#}", self.spec.addr)
    }

    /// The message for an authentication error etcd answered `what` with.
    fn auth_failure(&self, what: &str, message: &str) -> String {
        match self.creds {
            Creds::User { .. } => {
                format!("etcd refused authentication for {what}: {message}")
            }
            _ => format!(
                "etcd requires authentication for {what} (give the source --token USER:PASSWORD): {message}"
            ),
        }
    }
}

/// The `Authorization` header for `token` (etcd wants the bare token, no scheme).
fn auth_header(token: &Option<String>) -> Vec<(&'static str, &str)> {
    match token.as_deref() {
        Some(t) if !t.is_empty() => vec![("authorization", t)],
        _ => Vec::new(),
    }
}

/// A key-value of the gateway (`{"key", "value", "mod_revision", …}`) as a report.
fn value_of(key: &str, kv: &Value) -> Fetched {
    // proto3 JSON leaves out empty fields: no "value" is the empty value.
    let b64 = kv["value"].as_str().unwrap_or("");
    let Some(bytes) = base64_decode(b64) else {
        return Fetched::Failed(format!(
            "etcd sent the value of key {key:?} in a form that is not base64"
        ));
    };
    match String::from_utf8(bytes) {
        Ok(text) => Fetched::Value(Value::String(text)),
        Err(_) => Fetched::Failed(format!(
            "the value of key {key:?} in etcd is not UTF-8 text"
        )),
    }
}

/// An int64 of the gateway: a JSON string (proto3 JSON writes 64-bit integers as strings), or
/// a number.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        v => v.as_i64(),
    }
}

/// An error answer of the gateway.
struct EtcdError {
    /// The gRPC status code, if given.
    code: Option<i64>,
    message: String,
}

impl EtcdError {
    /// A unary error body `{"error": "…", "message": "…", "code": N}` (or anything else: its
    /// text).
    fn parse(body: &[u8]) -> EtcdError {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) if v.is_object() => EtcdError::of(&v),
            _ => EtcdError {
                code: None,
                message: String::from_utf8_lossy(body)
                    .trim()
                    .chars()
                    .take(300)
                    .collect(),
            },
        }
    }

    /// An error object: unary `{"message", "code"}` or stream `{"message", "grpc_code"}`.
    fn of(v: &Value) -> EtcdError {
        let message = v["message"]
            .as_str()
            .or(v["error"].as_str())
            .unwrap_or("no message");
        EtcdError {
            code: v["code"].as_i64().or(v["grpc_code"].as_i64()),
            message: message
                .strip_prefix("etcdserver: ")
                .unwrap_or(message)
                .to_string(),
        }
    }

    fn is_auth(&self) -> bool {
        self.code == Some(UNAUTHENTICATED) || EtcdError::message_is_auth(&self.message)
    }

    /// Whether etcd's message means "authenticate (again)": no token ("user name is empty"),
    /// an expired or unknown one, or one older than a change of users or roles.
    fn message_is_auth(message: &str) -> bool {
        [
            "user name is empty",
            "invalid auth token",
            "Unauthenticated",
            "revision of auth store is old",
        ]
        .iter()
        .any(|m| message.contains(m))
    }
}

/// Cuts a byte stream of concatenated JSON objects (whitespace or newlines between them, as
/// etcd's watch answers) into one object at a time, wherever the chunks it is fed end. Sans-IO:
/// [`JsonSplitter::push`] bytes, then take [`JsonSplitter::next_object`] until None. It finds
/// the end of each object by counting braces outside strings; the objects' JSON itself is
/// checked by whoever parses them.
#[derive(Default)]
struct JsonSplitter {
    buf: Vec<u8>,
    /// How far `buf` has been scanned for the end of the object at its start.
    scanned: usize,
    /// Nesting depth at `scanned` (0: between objects).
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonSplitter {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete object, None if more bytes are needed, or an error when the stream
    /// is not a sequence of objects (or one is larger than [`MAX_BODY`]).
    fn next_object(&mut self) -> Result<Option<Vec<u8>>, String> {
        if self.depth == 0 {
            let ws = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buf.drain(..ws);
            self.scanned = 0;
            match self.buf.first() {
                None => return Ok(None),
                Some(b'{') => {}
                Some(&b) => {
                    return Err(format!("expected a JSON object, found {:?}", char::from(b)));
                }
            }
        }
        while self.scanned < self.buf.len() {
            let b = self.buf[self.scanned];
            self.scanned += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        let object: Vec<u8> = self.buf.drain(..self.scanned).collect();
                        self.scanned = 0;
                        return Ok(Some(object));
                    }
                }
                _ => {}
            }
        }
        if self.buf.len() > MAX_BODY {
            return Err(format!("an object longer than {MAX_BODY} bytes"));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use waypost_testkit::etcd::Etcd;

    // ---- the stream splitter ----

    /// All objects of `chunks` fed in order, or the first error.
    fn split_all(chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, String> {
        let mut s = JsonSplitter::default();
        let mut objects = Vec::new();
        for c in chunks {
            s.push(c);
            while let Some(o) = s.next_object()? {
                objects.push(o);
            }
        }
        Ok(objects)
    }

    const STREAM: &str = concat!(
        r#"{"result":{"header":{"revision":"2"},"created":true}}"#,
        "\n",
        r#"{"result":{"events":[{"kv":{"key":"Zm9v","value":"e30="}}],"s":"a \"}{ \\\" ]["}}"#,
        "\r\n  ",
        r#"{"result":{"events":[{"type":"DELETE","kv":{"key":"Zm9v"}}]}}"#,
        r#"{"error":{"grpc_code":14,"message":"x"}}"#,
        "\n"
    );

    fn expected() -> Vec<Value> {
        STREAM
            .split(['\n'])
            .flat_map(|l| {
                serde_json::Deserializer::from_str(l)
                    .into_iter::<Value>()
                    .map(Result::unwrap)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn parsed(objects: Vec<Vec<u8>>) -> Vec<Value> {
        objects
            .iter()
            .map(|o| serde_json::from_slice(o).unwrap())
            .collect()
    }

    #[test]
    fn splitter_whole_stream() {
        let want = expected();
        assert_eq!(want.len(), 4);
        assert_eq!(parsed(split_all(&[STREAM.as_bytes()]).unwrap()), want);
    }

    #[test]
    fn splitter_split_at_every_position() {
        let bytes = STREAM.as_bytes();
        let want = expected();
        for i in 0..=bytes.len() {
            let got = split_all(&[&bytes[..i], &bytes[i..]]).unwrap();
            assert_eq!(parsed(got), want, "split at {i}");
        }
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let got = split_all(&[&bytes[..i], &bytes[i..j], &bytes[j..]]).unwrap();
                assert_eq!(parsed(got), want, "split at {i} and {j}");
            }
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parsed(split_all(&singles).unwrap()), want, "byte by byte");
    }

    #[test]
    fn splitter_waits_for_the_rest_and_refuses_non_objects() {
        let mut s = JsonSplitter::default();
        s.push(br#"{"a":"}"#);
        assert_eq!(
            s.next_object().unwrap(),
            None,
            "the brace is inside a string"
        );
        s.push(b"\"}");
        assert_eq!(s.next_object().unwrap().unwrap(), br#"{"a":"}"}"#);
        assert_eq!(s.next_object().unwrap(), None);

        assert!(split_all(&[b"  [1]"]).is_err());
        assert!(split_all(&[b"{}\nnull"]).is_err());
        assert_eq!(split_all(&[b" \n "]).unwrap(), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn values_and_errors_of_the_gateway() {
        let kv = json!({"key": "Zm9v", "value": base64_encode("héllo".as_bytes())});
        assert_eq!(value_of("foo", &kv), Fetched::Value(json!("héllo")));
        assert_eq!(
            value_of("foo", &json!({"key": "Zm9v"})),
            Fetched::Value(json!(""))
        );
        let bad = json!({"value": base64_encode(&[0xff, 0xfe])});
        match value_of("foo", &bad) {
            Fetched::Failed(m) => assert!(m.contains("not UTF-8"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(int(&json!("42")), Some(42));
        assert_eq!(int(&json!(7)), Some(7));
        assert_eq!(int(&Value::Null), None);

        let e = EtcdError::parse(br#"{"error":"etcdserver: invalid auth token","message":"etcdserver: invalid auth token","code":16}"#);
        assert!(e.is_auth());
        assert_eq!(e.message, "invalid auth token");
        let e = EtcdError::parse(br#"{"error":"etcdserver: user name is empty","message":"etcdserver: user name is empty","code":3}"#);
        assert!(e.is_auth());
        let e = EtcdError::parse(br#"{"error":"etcdserver: permission denied","code":7}"#);
        assert!(!e.is_auth());
        assert_eq!(e.message, "permission denied");
        let e = EtcdError::parse(b"404 page not found\n");
        assert_eq!((e.code, e.message.as_str()), (None, "404 page not found"));
    }

    // ---- against a real etcd (Debian: etcd-server, etcd-client) ----

    fn spec(addr: &str, auth: Auth) -> SourceSpec {
        SourceSpec {
            scope: String::new(),
            name: "kv".to_string(),
            kind: crate::server::model::sources::SourceKind::Etcd,
            addr: addr.to_string(),
            ca_pem: None,
            auth,
            refresh: crate::server::model::sources::DEFAULT_REFRESH,
        }
    }

    /// Follows `key` on `spec` in a task; the task is aborted on drop.
    struct Following {
        rx: mpsc::UnboundedReceiver<Fetched>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Following {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn follow(spec: SourceSpec, key: &str) -> Following {
        let source = EtcdSource::new(Arc::new(spec)).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(source.follow(key.to_string(), tx));
        Following { rx, task }
    }

    impl Following {
        /// The next report, within the testkit's generous WAIT.
        async fn next(&mut self) -> Fetched {
            tokio::time::timeout(waypost_testkit::WAIT, self.rx.recv())
                .await
                .expect("a report in time")
                .expect("the follower keeps running")
        }

        async fn value(&mut self) -> String {
            match self.next().await {
                Fetched::Value(Value::String(s)) => s,
                other => panic!("expected a value, got {other:?}"),
            }
        }

        async fn failed(&mut self) -> String {
            match self.next().await {
                Fetched::Failed(m) => m,
                other => panic!("expected a failure, got {other:?}"),
            }
        }

        /// Skips reports until `want` arrives (after a restart the follower may report the old
        /// value first).
        async fn value_eventually(&mut self, want: &str) {
            loop {
                if let Fetched::Value(Value::String(s)) = self.next().await
                    && s == want
                {
                    return;
                }
            }
        }

        fn nothing_pending(&mut self) {
            if let Ok(f) = self.rx.try_recv() {
                panic!("unexpected report {f:?}");
            }
        }
    }

    /// Within this, a change made while a watch is up arrives (typically milliseconds; generous
    /// for a loaded CI machine).
    const PROMPT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn reads_then_a_put_arrives_through_the_watch() {
        let etcd = Etcd::start();
        etcd.put("app/db", "one");
        let mut f = follow(spec(&etcd.addr, Auth::None), "app/db");
        assert_eq!(f.value().await, "one");
        // Let the watch be created, then change the key.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        etcd.put("app/db", "two");
        assert_eq!(f.value().await, "two");
        assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());
        etcd.put("app/other", "x");
        etcd.put("app/db", "three");
        assert_eq!(
            f.value().await,
            "three",
            "only the followed key is reported"
        );
        f.nothing_pending();

        // Credentials for an etcd without auth are not an error (as with etcd's own client).
        let mut g = follow(spec(&etcd.addr, Auth::Token("root:pw".into())), "app/db");
        assert_eq!(g.value().await, "three");
    }

    #[tokio::test]
    async fn delete_fails_and_a_new_put_recovers() {
        let etcd = Etcd::start();
        etcd.put("k", "v1");
        let mut f = follow(spec(&etcd.addr, Auth::None), "k");
        assert_eq!(f.value().await, "v1");
        tokio::time::sleep(Duration::from_millis(200)).await;
        etcd.delete("k");
        let m = f.failed().await;
        assert!(m.contains("\"k\"") && m.contains("deleted"), "{m}");
        etcd.put("k", "v2");
        assert_eq!(f.value().await, "v2");
    }

    #[tokio::test]
    async fn a_missing_key_fails_then_its_creation_arrives() {
        let etcd = Etcd::start();
        let mut f = follow(spec(&etcd.addr, Auth::None), "later");
        let m = f.failed().await;
        assert_eq!(m, "key \"later\" not found in etcd");
        tokio::time::sleep(Duration::from_millis(200)).await;
        etcd.put("later", "");
        assert_eq!(f.value().await, "", "an empty value is a value");
        etcd.put("later", "now");
        assert_eq!(f.value().await, "now");
    }

    #[tokio::test]
    async fn survives_etcd_restarting() {
        let mut etcd = Etcd::start();
        etcd.put("k", "v1");
        let mut f = follow(spec(&etcd.addr, Auth::None), "k");
        assert_eq!(f.value().await, "v1");
        tokio::time::sleep(Duration::from_millis(200)).await;

        etcd.stop();
        let m = f.failed().await;
        assert!(m.contains("etcd"), "{m}");
        // Retries while etcd is down are not reported again: one Failed per episode.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f.nothing_pending();

        etcd.start_again();
        assert_eq!(f.value().await, "v1", "read again after the restart");
        // Give the new watch a moment, then a change made after the restart arrives.
        tokio::time::sleep(Duration::from_millis(300)).await;
        etcd.put("k", "v2");
        f.value_eventually("v2").await;
    }

    #[tokio::test]
    async fn a_watch_from_a_compacted_revision_says_so() {
        let etcd = Etcd::start();
        etcd.put("k", "v1");
        let source = EtcdSource::new(Arc::new(spec(&etcd.addr, Auth::None))).unwrap();
        let (revision, _) = source.read("k").await.unwrap();
        for i in 0..3 {
            etcd.put("k", &format!("x{i}"));
        }
        let (now, _) = source.read("k").await.unwrap();
        etcd.etcdctl(&["compaction", &now.to_string()]);
        // A watch from before the compaction point is answered "compacted"; `run` then reads
        // again (x2) and watches from there.
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert!(matches!(
            source.watch("k", revision + 1, &tx).await,
            Watched::Compacted
        ));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn authentication() {
        let mut etcd = Etcd::start();
        etcd.enable_auth("pw");
        etcd.put("secret", "s1");

        let mut f = follow(spec(&etcd.addr, Auth::Token("root:pw".into())), "secret");
        assert_eq!(f.value().await, "s1");
        tokio::time::sleep(Duration::from_millis(200)).await;
        etcd.put("secret", "s2");
        assert_eq!(f.value().await, "s2", "the watch is authenticated too");

        let mut wrong = follow(spec(&etcd.addr, Auth::Token("root:nope".into())), "secret");
        let m = wrong.failed().await;
        assert!(m.contains("authentication"), "{m}");

        let mut none = follow(spec(&etcd.addr, Auth::None), "secret");
        let m = none.failed().await;
        assert!(m.contains("requires authentication"), "{m}");

        let mut approle = follow(
            spec(
                &etcd.addr,
                Auth::Approle {
                    role_id: "r".into(),
                    secret_id: "s".into(),
                },
            ),
            "secret",
        );
        assert!(
            approle
                .failed()
                .await
                .contains("AppRole is for OpenBao/Vault")
        );

        // A token etcd no longer knows (as after it expired) is replaced without a failure.
        let source =
            EtcdSource::new(Arc::new(spec(&etcd.addr, Auth::Token("root:pw".into())))).unwrap();
        *source.token.lock().await = Some("stale.1".into());
        let (_, fetched) = source.read("secret").await.unwrap();
        assert_eq!(fetched, Fetched::Value(json!("s2")));
    }
}
