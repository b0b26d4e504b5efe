//! The resolver: the current value of every dynamic reference (`SOURCE:PATH#FIELD`) any scope
//! uses, read by the server once per source and path — never by the entrypoints — and held in
//! memory only (docs/architecture.md, "Config sources").
//!
//! - One follower task per (source, path) in use (service/sources/: KV refreshed, leases renewed
//!   or re-read, etcd watched). Every field of a path comes from the same read.
//! - Each outcome updates the path's slot: a new value replaces the old one; a failure keeps the
//!   last good value and marks it stale with the error (a variable never turns empty because
//!   its source is down).
//! - The config service is told ([`Event`]) when a path's value changed, or when its first
//!   outcome arrived (instances waiting for it can be welcomed); it bumps the epoch of the scopes
//!   using it and pushes new snapshots. Writing the same value again changes nothing.
//! - A reference in an app's definitions uses the app's source of that name if it has one, else
//!   the global one; a reference in the global scope uses a global source.

use crate::server::model::config::{DynRef, GLOBAL};
use crate::server::model::sources::SourceSpec;
use crate::server::service::sources::{Client, Fetched};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A path followed on a source: (the source's scope, the source's name, the path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RefKey {
    pub source_scope: String,
    pub source: String,
    pub path: String,
}

/// Where a path's value stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not read yet.
    Pending,
    /// The last read worked.
    Ok,
    /// The last read failed: the value (if any) is the last good one, stale.
    Failed,
}

#[derive(Debug)]
struct Slot {
    value: Option<Value>,
    state: State,
    error: Option<String>,
}

/// Told to the config service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub key: RefKey,
    /// The value changed (a new one, or the first one).
    pub changed: bool,
}

/// How a reference stands, for `config list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// "pending" (not read yet), "ok", "stale" (failing, last good value kept), "failed"
    /// (failing, never read), "no source" (the source was removed).
    pub state: &'static str,
    pub error: Option<String>,
}

struct Inner {
    sources: HashMap<(String, String), (SourceSpec, Arc<Client>)>,
    slots: HashMap<RefKey, Slot>,
    tasks: HashMap<RefKey, JoinHandle<()>>,
}

pub struct Resolver {
    inner: Mutex<Inner>,
    events: mpsc::UnboundedSender<Event>,
    me: Weak<Resolver>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for (_, t) in lock(&self.inner).tasks.drain() {
            t.abort();
        }
    }
}

impl Resolver {
    /// A resolver with no sources; its events arrive on the returned receiver.
    pub fn new() -> (Arc<Resolver>, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let r = Arc::new_cyclic(|me| Resolver {
            inner: Mutex::new(Inner {
                sources: HashMap::new(),
                slots: HashMap::new(),
                tasks: HashMap::new(),
            }),
            events: tx,
            me: me.clone(),
        });
        (r, rx)
    }

    /// The path `r` of a definition in `scope` reads, if its source exists.
    pub fn key_of(&self, scope: &str, r: &DynRef) -> Option<RefKey> {
        let inner = lock(&self.inner);
        Self::key_in(&inner, scope, r)
    }

    fn key_in(inner: &Inner, scope: &str, r: &DynRef) -> Option<RefKey> {
        let own = (scope.to_string(), r.source.clone());
        let global = (GLOBAL.to_string(), r.source.clone());
        let (source_scope, _) = if scope != GLOBAL && inner.sources.contains_key(&own) {
            own
        } else if inner.sources.contains_key(&global) {
            global
        } else {
            return None;
        };
        Some(RefKey {
            source_scope,
            source: r.source.clone(),
            path: r.path.clone(),
        })
    }

    /// Whether a source named `name` is visible from `scope`.
    pub fn has_source(&self, scope: &str, name: &str) -> bool {
        let inner = lock(&self.inner);
        (scope != GLOBAL
            && inner
                .sources
                .contains_key(&(scope.to_string(), name.to_string())))
            || inner
                .sources
                .contains_key(&(GLOBAL.to_string(), name.to_string()))
    }

    /// Whether `scope` (an app) has a source of its own named `name` (shadowing a global one).
    pub fn has_own_source(&self, scope: &str, name: &str) -> bool {
        scope != GLOBAL
            && lock(&self.inner)
                .sources
                .contains_key(&(scope.to_string(), name.to_string()))
    }

    /// Replaces the set of sources. Paths on a source whose settings changed are read again
    /// with the new ones (their last values stay until then); paths on a removed source stop.
    pub fn set_sources(&self, specs: Vec<SourceSpec>) {
        let mut inner = lock(&self.inner);
        let mut next = HashMap::new();
        let mut restart = HashSet::new();
        for spec in specs {
            let id = (spec.scope.clone(), spec.name.clone());
            match inner.sources.remove(&id) {
                Some((old, client)) if old == spec => {
                    next.insert(id, (old, client));
                }
                _ => {
                    let client = match Client::new(spec.clone()) {
                        Ok(c) => Arc::new(c),
                        Err(e) => {
                            tracing::error!(
                                source = spec.name,
                                scope = spec.scope,
                                error = format!("{e:#}"),
                                "a config source cannot be used"
                            );
                            continue;
                        }
                    };
                    restart.insert(id.clone());
                    next.insert(id, (spec, client));
                }
            }
        }
        // Removed sources: their followers stop (sync drops their slots when unused).
        restart.extend(inner.sources.keys().cloned());
        inner.sources = next;
        let keys: Vec<RefKey> = inner.tasks.keys().cloned().collect();
        for k in keys {
            if restart.contains(&(k.source_scope.clone(), k.source.clone())) {
                if let Some(t) = inner.tasks.remove(&k) {
                    t.abort();
                }
                self.spawn(&mut inner, k);
            }
        }
    }

    /// Follows exactly the paths the definitions use: `refs` are (scope of the definition,
    /// reference). New paths start being read; paths no longer used stop and forget their value.
    pub fn sync<'a>(&self, refs: impl IntoIterator<Item = (&'a str, &'a DynRef)>) {
        let mut inner = lock(&self.inner);
        let wanted: HashSet<RefKey> = refs
            .into_iter()
            .filter_map(|(scope, r)| Self::key_in(&inner, scope, r))
            .collect();
        inner.slots.retain(|k, _| wanted.contains(k));
        let gone: Vec<RefKey> = inner
            .tasks
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(t) = inner.tasks.remove(&k) {
                t.abort();
            }
        }
        for k in wanted {
            if !inner.tasks.contains_key(&k) {
                self.spawn(&mut inner, k);
            }
        }
    }

    /// Starts (or restarts) the follower of `key` (its source must exist).
    fn spawn(&self, inner: &mut Inner, key: RefKey) {
        let Some((_, client)) = inner
            .sources
            .get(&(key.source_scope.clone(), key.source.clone()))
        else {
            inner.slots.remove(&key);
            return;
        };
        let client = client.clone();
        inner.slots.entry(key.clone()).or_insert(Slot {
            value: None,
            state: State::Pending,
            error: None,
        });
        let me = self.me.clone();
        let k = key.clone();
        let task = tokio::spawn(async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let follow = client.follow(k.path.clone(), tx);
            let receive = async {
                while let Some(f) = rx.recv().await {
                    let Some(me) = me.upgrade() else { return };
                    me.on_fetched(&k, f);
                }
            };
            tokio::select! {
                _ = follow => {}
                _ = receive => {}
            }
        });
        inner.tasks.insert(key, task);
    }

    fn on_fetched(&self, key: &RefKey, f: Fetched) {
        let event = {
            let mut inner = lock(&self.inner);
            let Some(slot) = inner.slots.get_mut(key) else {
                return; // no longer followed
            };
            let first = slot.state == State::Pending;
            match f {
                Fetched::Value(v) => {
                    let changed = slot.value.as_ref() != Some(&v);
                    if slot.state == State::Failed {
                        tracing::info!(
                            source = key.source,
                            path = key.path,
                            "config source readable again"
                        );
                    }
                    slot.value = Some(v);
                    slot.state = State::Ok;
                    slot.error = None;
                    (changed || first).then_some(Event {
                        key: key.clone(),
                        changed,
                    })
                }
                Fetched::Failed(e) => {
                    if slot.state != State::Failed || slot.error.as_deref() != Some(&e) {
                        tracing::warn!(
                            source = key.source,
                            path = key.path,
                            error = e,
                            stale = slot.value.is_some(),
                            "reading a config source failed; the last good value stays in force"
                        );
                    }
                    slot.state = State::Failed;
                    slot.error = Some(e);
                    first.then_some(Event {
                        key: key.clone(),
                        changed: false,
                    })
                }
            }
        };
        if let Some(e) = event {
            let _ = self.events.send(e);
        }
    }

    /// The current value of reference `r` of a definition in `scope`: the field's text (a JSON
    /// string as is; numbers and booleans as written; objects and arrays as JSON), as bytes.
    /// None: not read yet, never read successfully, no such source, or no such field.
    pub fn value(&self, scope: &str, r: &DynRef) -> Option<Vec<u8>> {
        let inner = lock(&self.inner);
        let key = Self::key_in(&inner, scope, r)?;
        let v = inner.slots.get(&key)?.value.as_ref()?;
        field(v, r.field.as_deref()).map(String::into_bytes)
    }

    /// Whether the path of `r` has not been read yet (an instance should wait for it).
    pub fn pending(&self, scope: &str, r: &DynRef) -> bool {
        let inner = lock(&self.inner);
        Self::key_in(&inner, scope, r)
            .and_then(|k| inner.slots.get(&k))
            .is_some_and(|s| s.state == State::Pending)
    }

    /// How reference `r` of a definition in `scope` stands.
    pub fn status(&self, scope: &str, r: &DynRef) -> Status {
        let inner = lock(&self.inner);
        let Some(key) = Self::key_in(&inner, scope, r) else {
            return Status {
                state: "no source",
                error: Some(format!("there is no config source named {:?}", r.source)),
            };
        };
        let Some(slot) = inner.slots.get(&key) else {
            return Status {
                state: "pending",
                error: None,
            };
        };
        let missing_field = slot
            .value
            .as_ref()
            .is_some_and(|v| field(v, r.field.as_deref()).is_none());
        match slot.state {
            State::Pending => Status {
                state: "pending",
                error: None,
            },
            State::Ok if missing_field => Status {
                state: "failed",
                error: Some(format!(
                    "{r}: no field {:?} at that path",
                    r.field.as_deref().unwrap_or("")
                )),
            },
            State::Ok => Status {
                state: "ok",
                error: None,
            },
            State::Failed => Status {
                state: if slot.value.is_some() && !missing_field {
                    "stale"
                } else {
                    "failed"
                },
                error: slot.error.clone(),
            },
        }
    }

    /// The paths followed now (for tests and `config source list`).
    pub fn followed(&self) -> Vec<RefKey> {
        let mut v: Vec<RefKey> = lock(&self.inner).tasks.keys().cloned().collect();
        v.sort();
        v
    }
}

/// `field` of a fetched value (see [`Resolver::value`]). A field of a string value (etcd) reads
/// the string as JSON first.
pub fn field(v: &Value, field: Option<&str>) -> Option<String> {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    match field {
        None => text(v),
        Some(f) => match v {
            Value::Object(m) => m.get(f).and_then(text),
            Value::String(s) => serde_json::from_str::<Value>(s)
                .ok()
                .and_then(|j| j.get(f).and_then(text)),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_of_values() {
        let v = json!({"password": "p", "port": 5432, "on": true, "obj": {"a": 1}, "nil": null});
        assert_eq!(field(&v, Some("password")).as_deref(), Some("p"));
        assert_eq!(field(&v, Some("port")).as_deref(), Some("5432"));
        assert_eq!(field(&v, Some("on")).as_deref(), Some("true"));
        assert_eq!(field(&v, Some("obj")).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(field(&v, Some("nil")), None);
        assert_eq!(field(&v, Some("missing")), None);
        assert!(field(&v, None).unwrap().contains("\"password\""));
        let s = json!("plain");
        assert_eq!(field(&s, None).as_deref(), Some("plain"));
        assert_eq!(field(&s, Some("x")), None);
        let j = json!(r#"{"x": "from json"}"#);
        assert_eq!(field(&j, Some("x")).as_deref(), Some("from json"));
    }

    fn spec(scope: &str, name: &str) -> SourceSpec {
        SourceSpec {
            scope: scope.into(),
            name: name.into(),
            kind: crate::server::model::sources::SourceKind::Etcd,
            // Nothing listens there: followers fail, which is all these tests need.
            addr: "http://127.0.0.1:9".into(),
            ca_pem: None,
            auth: crate::server::model::sources::Auth::None,
            refresh: std::time::Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn references_use_the_nearest_source_and_follow_what_is_used() {
        let (r, _events) = Resolver::new();
        let dr = DynRef::parse("kv:a/b#f").unwrap();
        assert_eq!(r.key_of("web", &dr), None);
        assert_eq!(r.status("web", &dr).state, "no source");
        r.set_sources(vec![spec("", "kv")]);
        assert!(r.has_source("web", "kv") && r.has_source("", "kv"));
        assert_eq!(r.key_of("web", &dr).unwrap().source_scope, "");
        r.set_sources(vec![spec("", "kv"), spec("web", "kv")]);
        assert_eq!(r.key_of("web", &dr).unwrap().source_scope, "web");
        assert_eq!(r.key_of("api", &dr).unwrap().source_scope, "");
        assert_eq!(r.key_of("", &dr).unwrap().source_scope, "");

        r.sync([("web", &dr), ("api", &dr)]);
        assert_eq!(r.followed().len(), 2);
        assert!(r.pending("web", &dr));
        r.sync([("web", &dr)]);
        assert_eq!(r.followed().len(), 1);
        r.sync([]);
        assert!(r.followed().is_empty());
    }

    #[tokio::test]
    async fn values_changes_and_failures() {
        let (r, mut events) = Resolver::new();
        r.set_sources(vec![spec("", "kv")]);
        let dr = DynRef::parse("kv:p#f").unwrap();
        let key = r.key_of("", &dr).unwrap();
        // A slot without a follower, driven by hand.
        lock(&r.inner).slots.insert(
            key.clone(),
            Slot {
                value: None,
                state: State::Pending,
                error: None,
            },
        );
        r.on_fetched(&key, Fetched::Value(json!({"f": "1"})));
        assert_eq!(r.value("", &dr).unwrap(), b"1");
        assert_eq!(r.status("", &dr).state, "ok");
        r.on_fetched(&key, Fetched::Value(json!({"f": "1"})));
        r.on_fetched(&key, Fetched::Failed("down".into()));
        assert_eq!(r.value("", &dr).unwrap(), b"1", "the last good value stays");
        assert_eq!(r.status("", &dr).state, "stale");
        assert_eq!(r.status("", &dr).error.as_deref(), Some("down"));
        r.on_fetched(&key, Fetched::Value(json!({"f": "2"})));
        assert_eq!(r.value("", &dr).unwrap(), b"2");
        let mut changed = Vec::new();
        while let Ok(e) = events.try_recv() {
            if e.changed {
                changed.push(e);
            }
        }
        // The first value and the new one; not the repeat, not the failure.
        assert_eq!(changed.len(), 2, "{changed:?}");
        let other = DynRef::parse("kv:p#g").unwrap();
        assert_eq!(r.value("", &other), None);
        assert_eq!(r.status("", &other).state, "failed");
    }
}
