//! The config service: every app's configuration cached in memory, changes written through the
//! store and pushed to every connected instance as a full, versioned snapshot (`Config` frame) the
//! moment they change. The model and its rules are in model/config.rs.
//!
//! - Snapshot of an instance = the app's variables overridden by its deployment's, the app's
//!   files, the policy. One version counter per app, bumped by every change that changes
//!   something (a no-op change keeps the version and pushes nothing).
//! - Welcome carries the snapshot when the app's version is newer than the one in the Hello.
//! - Ordering: the Welcome of a connection and every push go through one async lock, and pushes
//!   only reach connections whose Welcome is already queued, so an instance never receives a
//!   Config before its Welcome (the entrypoint would ignore it) nor misses a change made while it
//!   was connecting.
//! - Every input is checked before anything is written; a change that would make any
//!   deployment's snapshot too big for one frame is refused as a whole.

use crate::server::model::InstanceId;
use crate::server::model::config::{AppConfig, Change};
use crate::server::service::live::Registry;
use crate::server::service::mux::Queued;
use crate::server::store::{self, Store};
use crate::util;
use anyhow::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use waypost_proto::{self as proto, Frame, Kind};

/// How long a push may wait for a full outgoing queue before giving up on that connection (the
/// instance gets the newest snapshot at its next Welcome anyway).
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// A push yields to the runtime after queueing the snapshot for this many connections.
const PUSH_BATCH: usize = 64;

/// Why a change was not applied.
#[derive(Debug)]
pub enum ChangeError {
    /// There is no app of that name.
    NoApp,
    /// The change breaks a rule (the message says which); nothing was written.
    Refused(String),
    /// Storing it failed.
    Failed(anyhow::Error),
}

// ---- the service: cache, welcome, push -------------------------------------------------------

/// A connection that has been welcomed with config enabled.
struct Member {
    session: i64,
    app: String,
    deployment: String,
    /// Weak: a connection's writer ends when its last strong sender is dropped; this map must not
    /// keep it open.
    tx: mpsc::WeakSender<Queued>,
    /// What its ConfigApplied said last: (version, error).
    applied: u64,
    error: String,
}

pub struct ConfigService {
    store: Store,
    /// Serialises changes, pushes and Welcomes (see the module comment).
    order: tokio::sync::Mutex<()>,
    /// Every app's config as last loaded or written (only this module writes the tables).
    cache: Mutex<HashMap<String, Arc<AppConfig>>>,
    members: Mutex<HashMap<InstanceId, Member>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConfigService {
    pub fn new(store: Store) -> ConfigService {
        ConfigService {
            store,
            order: Default::default(),
            cache: Default::default(),
            members: Default::default(),
        }
    }

    /// The app's config (cached).
    pub async fn app_config(&self, app: &str) -> Result<Arc<AppConfig>> {
        if let Some(c) = lock(&self.cache).get(app) {
            return Ok(c.clone());
        }
        let name = app.to_string();
        let cfg = Arc::new(
            self.store
                .call(move |db| store::config::load(db, &name))
                .await?,
        );
        lock(&self.cache).insert(app.to_string(), cfg.clone());
        Ok(cfg)
    }

    /// Queues `frame` for a connection without ever waiting with the lock held: when its queue
    /// is full, a task delivers it (a later snapshot overtaking it is harmless: versions only
    /// grow and the entrypoint ignores older ones).
    fn deliver(tx: &mpsc::Sender<Queued>, frame: Frame) {
        if let Err(mpsc::error::TrySendError::Full(frame)) = tx.try_send(Box::new(frame)) {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(PUSH_TIMEOUT, tx.send(frame)).await;
            });
        }
    }

    /// Pushes the app's new snapshot to each of its welcomed live connections. They are picked
    /// here, under the ordering lock (so each gets every change made after its Welcome); the
    /// frames are queued by a task that yields every [`PUSH_BATCH`] connections, so a push to
    /// 10,000 instances neither holds a lock meanwhile nor builds every copy of the frame before
    /// the connections' writers start sending them.
    fn push(&self, app: &str, cfg: Arc<AppConfig>) -> usize {
        let targets: Vec<(mpsc::Sender<Queued>, String)> = {
            let mut members = lock(&self.members);
            let mut targets = Vec::new();
            members.retain(|_, m| {
                let Some(tx) = m.tx.upgrade() else {
                    return false; // the connection is gone
                };
                if m.app == app {
                    targets.push((tx, m.deployment.clone()));
                }
                true
            });
            targets
        };
        let n = targets.len();
        tokio::spawn(async move {
            let mut per_dep: HashMap<String, Frame> = HashMap::new();
            for (i, (tx, dep)) in targets.into_iter().enumerate() {
                let frame = per_dep
                    .entry(dep)
                    .or_insert_with_key(|d| Kind::Config(cfg.snapshot(d)).into())
                    .clone();
                Self::deliver(&tx, frame);
                if i % PUSH_BATCH == PUSH_BATCH - 1 {
                    tokio::task::yield_now().await;
                }
            }
        });
        n
    }

    /// Applies a change: checks it, writes it, and pushes the new snapshot. Returns the new
    /// config and whether anything changed.
    pub async fn change(
        &self,
        app: &str,
        change: Change,
    ) -> Result<(Arc<AppConfig>, bool), ChangeError> {
        let _order = self.order.lock().await;
        let name = app.to_string();
        let outcome = self
            .store
            .call(move |db| {
                store::config::update(db, &name, |cur: &AppConfig| change.apply_to(cur, &name))
            })
            .await
            .map_err(ChangeError::Failed)?;
        let (cfg, changed) = match outcome {
            store::config::Update::NoApp => return Err(ChangeError::NoApp),
            store::config::Update::Refused(msg) => return Err(ChangeError::Refused(msg)),
            store::config::Update::Unchanged(cfg) => (cfg, false),
            store::config::Update::Changed(cfg) => (cfg, true),
        };
        let cfg = Arc::new(cfg);
        lock(&self.cache).insert(app.to_string(), cfg.clone());
        if changed {
            let n = self.push(app, cfg.clone());
            tracing::info!(
                app,
                version = cfg.version,
                instances = n,
                "config changed; pushed"
            );
        }
        Ok((cfg, changed))
    }

    /// Another replica (or this one) changed `app`'s config (service/fanout.rs): reloads it and,
    /// if its version moved past the cached one, pushes it to this replica's instances of it.
    /// Apps not cached here are only dropped from the cache (nothing here uses them yet).
    pub async fn reload(&self, app: &str) -> Result<()> {
        let _order = self.order.lock().await;
        let Some(cached) = lock(&self.cache).get(app).cloned() else {
            return Ok(());
        };
        let name = app.to_string();
        let cfg = Arc::new(
            self.store
                .call(move |db| store::config::load(db, &name))
                .await?,
        );
        if cfg.version <= cached.version {
            return Ok(());
        }
        lock(&self.cache).insert(app.to_string(), cfg.clone());
        let n = self.push(app, cfg.clone());
        tracing::info!(
            app,
            version = cfg.version,
            instances = n,
            "config changed on another replica; pushed"
        );
        Ok(())
    }

    /// [`ConfigService::reload`] for every cached app (after notifications may have been missed).
    pub async fn reload_all(&self) -> Result<()> {
        let apps: Vec<String> = lock(&self.cache).keys().cloned().collect();
        for app in apps {
            self.reload(&app).await?;
        }
        Ok(())
    }

    /// Sends the Welcome of a new connection (filling in the snapshot if the app has a newer
    /// one than the entrypoint's) and, unless the entrypoint disabled config, subscribes the
    /// connection to pushes — in one step under the ordering lock.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_welcome(
        &self,
        live: &Registry,
        tx: &mpsc::Sender<Queued>,
        id: InstanceId,
        session: i64,
        app: &str,
        deployment: &str,
        hello: &proto::Hello,
        welcome: Kind,
    ) {
        let Kind::Welcome(mut welcome) = welcome else {
            Self::deliver(tx, welcome.into());
            return;
        };
        let disabled = hello.disabled.as_ref().is_some_and(|f| f.config);
        let _order = self.order.lock().await;
        if !disabled {
            match self.app_config(app).await {
                Ok(cfg) if cfg.version > hello.config_version => {
                    welcome.config = Some(cfg.snapshot(deployment));
                }
                Ok(_) => {}
                Err(e) => tracing::error!(
                    app,
                    error = format!("{e:#}"),
                    "loading the app's config failed; welcoming without it"
                ),
            }
            let mut members = lock(&self.members);
            members.insert(
                id,
                Member {
                    session,
                    app: app.to_string(),
                    deployment: deployment.to_string(),
                    tx: tx.downgrade(),
                    applied: hello.config_version,
                    error: String::new(),
                },
            );
            // Forget connections that are gone (amortised: only when the map has grown).
            if members.len() > 2 * live.len() + 64 {
                members.retain(|_, m| m.tx.strong_count() > 0);
            }
        }
        Self::deliver(tx, Kind::Welcome(welcome).into());
    }

    /// The entrypoint reports a snapshot applied (or failed).
    pub fn on_applied(
        &self,
        live: &Registry,
        id: &InstanceId,
        session: i64,
        a: proto::ConfigApplied,
    ) {
        {
            let mut members = lock(&self.members);
            let Some(m) = members.get_mut(id).filter(|m| m.session == session) else {
                return;
            };
            if a.error.is_empty() {
                m.applied = m.applied.max(a.version);
                m.error.clear();
            } else {
                m.error = format!("version {}: {}", a.version, a.error);
            }
        }
        if !a.error.is_empty() {
            tracing::warn!(
                instance = util::hex(id),
                version = a.version,
                error = a.error,
                "an instance could not apply its config"
            );
            return;
        }
        tracing::debug!(
            instance = util::hex(id),
            version = a.version,
            "config applied"
        );
        // Shown by `instances` right away (Status frames confirm it at the next heartbeat).
        if let Some((_, mut status)) = live.snapshot_own(id, session) {
            if a.version > status.config_version {
                status.config_version = a.version;
                live.set_status(id, session, status);
            }
        }
    }

    /// Live welcomed connections of an app: (id hex, deployment, applied version, error).
    pub fn instances_of(&self, app: &str) -> Vec<(String, String, u64, String)> {
        let mut v: Vec<_> = lock(&self.members)
            .iter()
            .filter(|(_, m)| m.app == app && m.tx.strong_count() > 0)
            .map(|(id, m)| {
                (
                    util::hex(id),
                    m.deployment.clone(),
                    m.applied,
                    m.error.clone(),
                )
            })
            .collect();
        v.sort();
        v
    }
}
