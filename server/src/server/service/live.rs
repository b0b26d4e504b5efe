//! The in-memory registry of live instances: one entry per connected instance id, holding what
//! later features need to reach it (the sender of its connection's outgoing-frame queue) and its
//! latest heartbeat data, which is flushed to the store every few seconds instead of on every frame.

pub use crate::server::model::{ChildStatus, Conflict, FlushRow, InstanceId, Owner, parse_id};
use crate::server::service::mux::Queued;
use crate::server::store::{self, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use waypost_proto::Frame;

/// One live connection.
pub struct LiveInstance {
    /// Random per connection; also stored in the instance row, so a stale connection's late
    /// database write can never touch a newer connection's row.
    pub session: i64,
    pub app: String,
    pub deployment: String,
    /// Hash of the token the connection authenticated with (`token revoke` closes it).
    token_hash: String,
    /// Why the connection was told to close, when it was not superseded (see [`Registry::close_token`]).
    closing: Option<&'static str>,
    /// Outgoing frames for this connection; its writer task drains the queue.
    pub tx: mpsc::Sender<Queued>,
    /// Notified to make the connection close itself (superseded by a reconnect).
    kick: Arc<Notify>,
    pub last_seen_ms: i64,
    pub status: ChildStatus,
    /// Heartbeat data changed since the last flush.
    dirty: bool,
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<HashMap<InstanceId, LiveInstance>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, LiveInstance>> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why `who` may not use `id` while it is live: held by a connection of another owner.
    pub fn conflict(&self, id: &InstanceId, who: &Owner) -> Option<Conflict> {
        let map = self.lock();
        let e = map.get(id)?;
        who.conflict(&e.app, &e.deployment, Some(&e.token_hash))
    }

    /// Registers a connection for `id`. If another connection of the same instance (same owner)
    /// is still registered, the new one wins and the old one is told to close; if the id is held
    /// by another owner, nothing changes and the conflict is returned. Returns the notifier the
    /// new connection must watch.
    pub fn register(
        &self,
        id: InstanceId,
        session: i64,
        who: Owner,
        tx: mpsc::Sender<Queued>,
        now_ms: i64,
    ) -> Result<Arc<Notify>, Conflict> {
        let mut map = self.lock();
        if let Some(e) = map.get(&id) {
            if let Some(c) = who.conflict(&e.app, &e.deployment, Some(&e.token_hash)) {
                return Err(c);
            }
        }
        let Owner {
            app,
            deployment,
            token_hash,
        } = who;
        let kick = Arc::new(Notify::new());
        let entry = LiveInstance {
            session,
            app,
            deployment,
            token_hash,
            closing: None,
            tx,
            kick: kick.clone(),
            last_seen_ms: now_ms,
            status: ChildStatus::default(),
            dirty: false,
        };
        if let Some(old) = map.insert(id, entry) {
            tracing::info!(
                instance = crate::util::hex(&id),
                "instance reconnected; closing its previous connection"
            );
            // notify_one stores a permit if the old task is not waiting right now.
            old.kick.notify_one();
        }
        Ok(kick)
    }

    /// Closes every live connection that authenticated with the token `hash` (it was revoked):
    /// queues `goodbye` (a Reject) on each, then tells each to close. Returns how many.
    pub fn close_token(
        &self,
        hash: &str,
        reason: &'static str,
        goodbye: impl Fn() -> Frame,
    ) -> usize {
        self.close_where(|e| e.token_hash == hash, reason, goodbye)
    }

    /// Closes every live connection of `app` (it is being deleted), as [`Registry::close_token`]
    /// does for a token. Returns how many.
    pub fn close_app(&self, app: &str, reason: &'static str, goodbye: impl Fn() -> Frame) -> usize {
        self.close_where(|e| e.app == app, reason, goodbye)
    }

    /// Tells every live connection matching `which` to close with `reason`, queueing `goodbye`.
    fn close_where(
        &self,
        which: impl Fn(&LiveInstance) -> bool,
        reason: &'static str,
        goodbye: impl Fn() -> Frame,
    ) -> usize {
        let mut n = 0;
        for e in self.lock().values_mut().filter(|e| which(e)) {
            e.closing = Some(reason);
            let _ = e.tx.try_send(Box::new(goodbye()));
            e.kick.notify_one();
            n += 1;
        }
        n
    }

    /// Live connections of `app` held here.
    pub fn count_app(&self, app: &str) -> usize {
        self.lock().values().filter(|e| e.app == app).count()
    }

    /// Why `session` was told to close: set by [`Registry::close_token`]; otherwise (the entry
    /// is gone or belongs to a newer connection) it was superseded.
    pub fn close_reason(&self, id: &InstanceId, session: i64) -> &'static str {
        self.with_own(id, session, |e| e.closing)
            .flatten()
            .unwrap_or("superseded by a new connection of the same instance")
    }

    /// Live connections per token hash, in one pass (a listing of N tokens must not walk the
    /// whole fleet N times under the lock).
    pub fn token_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for e in self.lock().values() {
            *counts.entry(e.token_hash.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Live connections per app, in one pass (the metrics listener's `instances_live`).
    pub fn app_counts(&self) -> HashMap<String, usize> {
        let map = self.lock();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for e in map.values() {
            *counts.entry(&e.app).or_insert(0) += 1;
        }
        counts
            .into_iter()
            .map(|(a, n)| (a.to_string(), n))
            .collect()
    }

    /// Runs `f` on the entry if it still belongs to `session`.
    fn with_own<R>(
        &self,
        id: &InstanceId,
        session: i64,
        f: impl FnOnce(&mut LiveInstance) -> R,
    ) -> Option<R> {
        let mut map = self.lock();
        map.get_mut(id).filter(|e| e.session == session).map(f)
    }

    /// The connection received a frame.
    pub fn touch(&self, id: &InstanceId, session: i64, now_ms: i64) {
        self.with_own(id, session, |e| {
            e.last_seen_ms = now_ms;
            e.dirty = true;
        });
    }

    /// Replaces the child status (e.g. with what the database row had at connect).
    pub fn set_status(&self, id: &InstanceId, session: i64, status: ChildStatus) {
        self.with_own(id, session, |e| {
            e.status = status;
            e.dirty = true;
        });
    }

    /// Folds a Status frame in.
    pub fn apply_status(
        &self,
        id: &InstanceId,
        session: i64,
        s: &waypost_proto::Status,
        now_ms: i64,
    ) {
        self.with_own(id, session, |e| {
            e.status.apply(s);
            e.last_seen_ms = now_ms;
            e.dirty = true;
        });
    }

    /// Latest data of the entry if it still belongs to `session`: (last seen, status).
    pub fn snapshot_own(&self, id: &InstanceId, session: i64) -> Option<(i64, ChildStatus)> {
        self.with_own(id, session, |e| (e.last_seen_ms, e.status.clone()))
    }

    /// Removes the entry if it still belongs to `session` (not superseded by a reconnect).
    pub fn remove(&self, id: &InstanceId, session: i64) -> Option<LiveInstance> {
        let mut map = self.lock();
        if map.get(id).is_some_and(|e| e.session == session) {
            map.remove(id)
        } else {
            None
        }
    }

    /// Entries changed since the last call, marked clean.
    pub fn take_dirty(&self) -> Vec<FlushRow> {
        let mut map = self.lock();
        map.iter_mut()
            .filter(|(_, e)| e.dirty)
            .map(|(id, e)| {
                e.dirty = false;
                (
                    crate::util::hex(id),
                    e.session,
                    e.last_seen_ms,
                    e.status.clone(),
                )
            })
            .collect()
    }

    /// Latest in-memory data of a live instance (fresher than its row): (last seen, status).
    pub fn snapshot(&self, id: &InstanceId) -> Option<(i64, ChildStatus)> {
        self.lock()
            .get(id)
            .map(|e| (e.last_seen_ms, e.status.clone()))
    }

    /// The outgoing-frame queue of a live instance, for features that push frames
    /// (config, exec, tunnel streams).
    #[allow(dead_code)] // used by later features
    pub fn sender(&self, id: &InstanceId) -> Option<mpsc::Sender<Queued>> {
        self.lock().get(id).map(|e| e.tx.clone())
    }

    /// Live instances of an app (and deployment, if given): (id, sender).
    #[allow(dead_code)] // used by later features
    pub fn of_app(
        &self,
        app: &str,
        deployment: Option<&str>,
    ) -> Vec<(InstanceId, mpsc::Sender<Queued>)> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.app == app && deployment.is_none_or(|d| e.deployment == d))
            .map(|(id, e)| (*id, e.tx.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Writes every dirty live instance's heartbeat data to the store, every `every`, until
/// `shutdown` turns true (then once more).
pub async fn flush_loop(
    live: &Registry,
    store: &Store,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let down = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.wait_for(|&down| down) => true,
        };
        let rows = live.take_dirty();
        if !rows.is_empty() {
            let n = rows.len();
            if let Err(e) = store.call(move |db| store::flush_live(db, &rows)).await {
                tracing::error!(
                    error = format!("{e:#}"),
                    rows = n,
                    "flushing instance heartbeats failed"
                );
            }
        }
        if down {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            app: "a".into(),
            deployment: String::new(),
            token_hash: "t".into(),
        }
    }

    #[tokio::test]
    async fn closing_a_token_closes_only_its_connections_and_says_why() {
        let reg = Registry::default();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        let k1 = reg.register([1; 16], 1, owner(), tx1, 0).unwrap();
        let other = Owner {
            token_hash: "u".into(),
            ..owner()
        };
        let k2 = reg.register([2; 16], 2, other, tx2, 0).unwrap();
        assert_eq!(reg.token_counts().get("t"), Some(&1));
        assert_eq!(reg.close_token("t", "revoked", || Frame { kind: None }), 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), k1.notified())
            .await
            .unwrap();
        assert_eq!(reg.close_reason(&[1; 16], 1), "revoked");
        assert!(rx1.try_recv().is_ok(), "the goodbye frame is queued");
        // The other token's connection is untouched.
        assert!(rx2.try_recv().is_err());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), k2.notified())
                .await
                .is_err()
        );
        assert!(reg.close_reason(&[2; 16], 2).contains("superseded"));
    }

    #[tokio::test]
    async fn closing_an_app_closes_only_its_connections() {
        let reg = Registry::default();
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        let k1 = reg.register([1; 16], 1, owner(), tx1, 0).unwrap();
        let other = Owner {
            app: "b".into(),
            ..owner()
        };
        let k2 = reg.register([2; 16], 2, other, tx2, 0).unwrap();
        assert_eq!(reg.count_app("a"), 1);
        assert_eq!(
            reg.close_app("a", "app deleted", || Frame { kind: None }),
            1
        );
        tokio::time::timeout(std::time::Duration::from_secs(1), k1.notified())
            .await
            .unwrap();
        assert_eq!(reg.close_reason(&[1; 16], 1), "app deleted");
        assert!(rx1.try_recv().is_ok(), "the goodbye frame is queued");
        assert!(rx2.try_recv().is_err());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), k2.notified())
                .await
                .is_err()
        );
        assert!(reg.remove(&[1; 16], 1).is_some());
        assert_eq!(reg.count_app("a"), 0);
        assert_eq!(reg.count_app("b"), 1);
    }

    #[tokio::test]
    async fn reconnect_supersedes_and_old_session_cannot_touch() {
        let reg = Registry::default();
        let id = [7u8; 16];
        let (tx1, _rx1) = mpsc::channel(1);
        let kick1 = reg.register(id, 1, owner(), tx1, 0).unwrap();
        let (tx2, _rx2) = mpsc::channel(1);
        let _kick2 = reg.register(id, 2, owner(), tx2, 0).unwrap();
        // The old connection was told to close (the permit is stored).
        tokio::time::timeout(std::time::Duration::from_secs(1), kick1.notified())
            .await
            .unwrap();
        reg.touch(&id, 1, 99);
        assert_eq!(reg.snapshot(&id).unwrap().0, 0, "stale session ignored");
        assert!(reg.remove(&id, 1).is_none());
        reg.touch(&id, 2, 5);
        assert_eq!(reg.take_dirty().len(), 1);
        assert!(reg.take_dirty().is_empty());
        assert!(reg.remove(&id, 2).is_some());
        assert_eq!(reg.len(), 0);
    }

    #[tokio::test]
    async fn another_owner_cannot_take_a_live_id() {
        let reg = Registry::default();
        let id = [9u8; 16];
        let (tx1, _rx1) = mpsc::channel(1);
        let kick1 = reg.register(id, 1, owner(), tx1, 0).unwrap();
        let cases = [
            (
                Owner {
                    app: "b".into(),
                    ..owner()
                },
                Conflict::App,
            ),
            (
                Owner {
                    deployment: "d".into(),
                    ..owner()
                },
                Conflict::Deployment,
            ),
            (
                Owner {
                    token_hash: "u".into(),
                    ..owner()
                },
                Conflict::Token,
            ),
        ];
        for (n, (who, want)) in cases.into_iter().enumerate() {
            assert_eq!(reg.conflict(&id, &who), Some(want));
            let (tx, _rx) = mpsc::channel(1);
            assert_eq!(
                reg.register(id, 10 + n as i64, who, tx, 0).err(),
                Some(want)
            );
        }
        // The holder was neither replaced nor told to close.
        assert_eq!(reg.snapshot_own(&id, 1).map(|s| s.0), Some(0));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), kick1.notified())
                .await
                .is_err()
        );
        // The same owner may (a reconnect), and an unknown id is free.
        assert_eq!(reg.conflict(&id, &owner()), None);
        assert_eq!(
            reg.conflict(
                &[1; 16],
                &Owner {
                    app: "b".into(),
                    ..owner()
                }
            ),
            None
        );
    }
}
