//! Membership: this server process as one replica among those sharing the database. At start it
//! registers itself under a random id ([`Membership::join`]), a heartbeat keeps its `last_seen`
//! fresh ([`Membership::heartbeat_loop`]), and a clean shutdown deletes its row
//! ([`Membership::leave`]). `server members` lists them ([`list`]). See "Replicas" in
//! docs/architecture.md.

use crate::server::model::members::{
    LEASE, PRUNE_AFTER, REPLICA_HEARTBEAT, ReplicaRow, ReplicaState, lease_expiry_allowed,
};
use crate::server::service::auth;
use crate::server::store::{self, Store};
use crate::util;
use anyhow::Result;
use tokio::sync::watch;

/// This replica.
pub struct Membership {
    store: Store,
    id: String,
    peer_addr: Option<String>,
    started_at: i64,
}

/// A replica as `server members` shows it.
#[derive(Debug, Clone)]
pub struct Member {
    pub row: ReplicaRow,
    pub state: ReplicaState,
}

impl Membership {
    /// Registers this process as a new replica (a fresh random id), after deleting the rows of
    /// replicas not seen for [`PRUNE_AFTER`].
    pub fn join(store: &Store, peer_addr: Option<String>) -> Result<Membership> {
        let id = util::hex(&auth::random_bytes::<8>());
        let now = util::now_ms();
        let prune_before = now.saturating_sub(PRUNE_AFTER.as_millis() as i64);
        let pruned = store.with(|c| store::members::prune_replicas(c, prune_before))?;
        if pruned > 0 {
            tracing::info!(count = pruned, "deleted the rows of long-gone replicas");
        }
        let m = Membership {
            store: store.clone(),
            id,
            peer_addr,
            started_at: now,
        };
        store.with(|c| m.beat(c, now))?;
        tracing::info!(replica = %m.id, peer_addr = m.peer_addr.as_deref().unwrap_or("-"), "registered as a replica");
        Ok(m)
    }

    /// This replica's id (recorded on the instances whose connection it holds).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn beat(&self, c: &store::Db, now: i64) -> Result<()> {
        store::members::upsert_replica(
            c,
            &self.id,
            self.peer_addr.as_deref(),
            crate::VERSION,
            self.started_at,
            now,
        )
    }

    /// At start: instances the database still shows live whose server is gone turn `lost`.
    /// SQLite: one server per data dir (the lock), so every such row is a previous run's.
    /// PostgreSQL: other replicas may be alive; their leases are left to the heartbeat
    /// ([`Membership::heartbeat_loop`]), which expires them once this replica has been healthy
    /// for a whole lease. Returns how many rows turned lost.
    pub fn expire_on_start(&self, location: &store::Location) -> Result<usize> {
        match location {
            store::Location::Sqlite(_) => {
                self.store.with(|c| store::mark_all_lost(c, util::now_ms()))
            }
            store::Location::Postgres(_) => Ok(0),
        }
    }

    /// Refreshes `last_seen` every [`REPLICA_HEARTBEAT`] until shutdown, and expires the leases
    /// of replicas that stopped beating (their live instances turn `lost`; see
    /// [`lease_expiry_allowed`]). A failed write is logged and retried on the next beat (the row
    /// goes `stale` if that keeps up, which is what it should show).
    pub async fn heartbeat_loop(self: std::sync::Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(REPLICA_HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // Since when every beat of this replica has succeeded (None: the last one failed).
        let mut healthy_since = Some(tokio::time::Instant::now());
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|&down| down) => return,
            }
            let me = self.clone();
            let expire = lease_expiry_allowed(healthy_since.map(|t| t.elapsed()));
            let r = self
                .store
                .call(move |c| {
                    let now = util::now_ms();
                    me.beat(c, now)?;
                    if !expire {
                        return Ok(0);
                    }
                    let before = now.saturating_sub(LEASE.as_millis() as i64);
                    store::expire_leases(c, &me.id, before, now)
                })
                .await;
            match r {
                Ok(lost) => {
                    healthy_since.get_or_insert_with(tokio::time::Instant::now);
                    if lost > 0 {
                        tracing::info!(
                            count = lost,
                            "marked the instances of replicas that stopped beating as lost"
                        );
                    }
                }
                Err(e) => {
                    healthy_since = None;
                    tracing::warn!(error = format!("{e:#}"), "replica heartbeat failed");
                }
            }
        }
    }

    /// A clean shutdown: deletes this replica's row.
    pub async fn leave(&self) -> Result<()> {
        let id = self.id.clone();
        self.store
            .call(move |c| store::members::remove_replica(c, &id))
            .await
    }
}

/// Every replica with its state at `now` (unix ms).
pub async fn list(store: &Store, now: i64) -> Result<Vec<Member>> {
    let rows = store.call(|c| store::members::list_replicas(c)).await?;
    Ok(rows
        .into_iter()
        .map(|row| Member {
            state: ReplicaState::at(row.last_seen, now, REPLICA_HEARTBEAT),
            row,
        })
        .collect())
}
