//! The config service: every scope's configuration (the global scope and each app) cached in
//! memory, changes written through the store, and each connected instance sent a full,
//! versioned snapshot (`Config` frame) the moment its view changes — an operator's change, or a
//! dynamic value the resolver (service/resolve.rs) read anew. The model and its rules are in
//! model/config.rs.
//!
//! - Snapshot of an instance = the global scope under the app's, each name's narrowest
//!   definition that matches the instance's deployment and labels, templates rendered, dynamic
//!   values from the resolver (memory only), the app's files and policy.
//! - Version = the sum of both scopes' versions and epochs: it grows with every change of either
//!   (an operator's change bumps the version, a changed dynamic value the epoch — both stored, so
//!   versions keep growing across restarts and replicas). A no-op change keeps it and pushes
//!   nothing; the entrypoint also ignores a snapshot equal to the one it has.
//! - A dynamic value not read yet: a new instance's Welcome waits for its first read (at most
//!   [`FIRST_READ_WAIT`]; the entrypoint starts its child when welcomed). A value never read
//!   successfully is left out — but an instance that already has a config is
//!   never sent a snapshot missing a value it may have: it keeps what it has until the value is
//!   read (a restarted server, a source down, never empties a variable).
//! - Welcome carries the snapshot when its version is newer than the one in the Hello.
//! - Ordering: the Welcome of a connection and every push go through one async lock, and pushes
//!   only reach connections whose Welcome is already queued, so an instance never receives a
//!   Config before its Welcome (the entrypoint would ignore it) nor misses a change made while it
//!   was connecting.
//! - Every input is checked before anything is written; a change that would break any app's
//!   templates or make a snapshot too big for one frame is refused as a whole.

use crate::server::model::config::{
    self as rules, Change, Context, GLOBAL, ScopeConfig, Snapshot, View,
};
use crate::server::model::metrics::{AppLabel, metrics};
use crate::server::model::sources::SourceSpec;
use crate::server::model::{InstanceId, Labels};
use crate::server::service::live::Registry;
use crate::server::service::mux::Queued;
use crate::server::service::resolve::{self, Resolver};
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
/// How long a new instance's Welcome may wait for the first read of its app's dynamic values:
/// well inside the entrypoint's 10 s Welcome timeout, and about its default startup timeout (5 s).
/// A source slower than this: the child starts without those values and restarts once they
/// arrive.
pub const FIRST_READ_WAIT: Duration = Duration::from_secs(4);
/// How often that wait looks again.
const FIRST_READ_POLL: Duration = Duration::from_millis(25);

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
    labels: Labels,
    /// Weak: a connection's writer ends when its last strong sender is dropped; this map must not
    /// keep it open.
    tx: mpsc::WeakSender<Queued>,
    /// The newest version it has or has been sent (from its Hello, then each snapshot sent).
    sent: u64,
    /// What its ConfigApplied said last: (version, error).
    applied: u64,
    error: String,
}

pub struct ConfigService {
    store: Store,
    /// Serialises changes, pushes and Welcomes (see the module comment).
    order: tokio::sync::Mutex<()>,
    /// Every scope's config as last loaded or written ([`GLOBAL`] included; only this module
    /// writes the tables).
    cache: Mutex<HashMap<String, Arc<ScopeConfig>>>,
    members: Mutex<HashMap<InstanceId, Member>>,
    /// The dynamic values.
    pub resolver: Arc<Resolver>,
    events: Mutex<Option<mpsc::UnboundedReceiver<resolve::Event>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConfigService {
    pub fn new(store: Store) -> ConfigService {
        let (resolver, events) = Resolver::new();
        ConfigService {
            store,
            order: Default::default(),
            cache: Default::default(),
            members: Default::default(),
            resolver,
            events: Mutex::new(Some(events)),
        }
    }

    /// Loads every scope and source and starts following the dynamic values they use; the
    /// returned receiver carries the resolver's events, to be handed to [`Self::on_resolved`]
    /// (once: None after the first call).
    pub async fn start(&self) -> Result<Option<mpsc::UnboundedReceiver<resolve::Event>>> {
        let (global, apps, sources) = self
            .store
            .call(|db| {
                Ok((
                    store::config::load(db, GLOBAL)?,
                    store::config::load_apps(db)?,
                    store::config::sources(db)?,
                ))
            })
            .await?;
        {
            let mut cache = lock(&self.cache);
            cache.insert(GLOBAL.to_string(), Arc::new(global));
            for (name, cfg) in apps {
                cache.insert(name, cfg);
            }
        }
        self.resolver.set_sources(sources);
        self.sync_refs();
        Ok(lock(&self.events).take())
    }

    /// Makes the resolver follow exactly the references the cached scopes use.
    fn sync_refs(&self) {
        let cache = lock(&self.cache);
        self.resolver.sync(
            cache
                .iter()
                .flat_map(|(scope, cfg)| cfg.dynamic_refs().map(move |r| (scope.as_str(), r))),
        );
    }

    /// A scope's config (cached).
    pub async fn scope_config(&self, scope: &str) -> Result<Arc<ScopeConfig>> {
        if let Some(c) = lock(&self.cache).get(scope) {
            return Ok(c.clone());
        }
        let name = scope.to_string();
        let cfg = Arc::new(
            self.store
                .call(move |db| store::config::load(db, &name))
                .await?,
        );
        lock(&self.cache).insert(scope.to_string(), cfg.clone());
        Ok(cfg)
    }

    /// The global scope and the app's, as its instances see them.
    pub async fn view_parts(&self, app: &str) -> Result<(Arc<ScopeConfig>, Arc<ScopeConfig>)> {
        Ok((
            self.scope_config(GLOBAL).await?,
            self.scope_config(app).await?,
        ))
    }

    /// The snapshot for one instance of `app`.
    pub fn snapshot(
        &self,
        global: &ScopeConfig,
        app: &str,
        cfg: &ScopeConfig,
        deployment: &str,
        labels: &Labels,
    ) -> Snapshot {
        let view = View {
            global,
            app_name: app,
            app: cfg,
        };
        let snap = view.snapshot(deployment, labels, &|scope, r| {
            self.resolver.value(scope, r)
        });
        for p in &snap.problems {
            tracing::debug!(app, problem = p, "config snapshot");
        }
        snap
    }

    /// Whether any dynamic value `app`'s instances may use has not been read yet.
    fn pending(&self, global: &ScopeConfig, app: &str, cfg: &ScopeConfig) -> bool {
        global
            .dynamic_refs()
            .any(|r| self.resolver.pending(GLOBAL, r))
            || cfg.dynamic_refs().any(|r| self.resolver.pending(app, r))
    }

    /// Waits (at most [`FIRST_READ_WAIT`]) until no dynamic value `app` uses is still waiting
    /// for its first read.
    async fn wait_first_reads(&self, app: &str) {
        let deadline = tokio::time::Instant::now() + FIRST_READ_WAIT;
        loop {
            let Ok((g, c)) = self.view_parts(app).await else {
                return;
            };
            if !self.pending(&g, app, &c) || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(FIRST_READ_POLL).await;
        }
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

    /// Sends each of `app`'s welcomed live connections (all apps' for [`GLOBAL`]) its snapshot
    /// if it is newer than what it has — and complete enough (see the module comment). Picked
    /// here, under the ordering lock (so each gets every change made after its Welcome); one
    /// snapshot is built per (deployment, labels), and the frames are queued by a task that
    /// yields every [`PUSH_BATCH`] connections, so a push to 10,000 instances neither holds a
    /// lock meanwhile nor builds every copy before the connections' writers start sending.
    /// Call with the ordering lock held.
    async fn push(&self, app: &str) -> usize {
        struct Target {
            id: InstanceId,
            tx: mpsc::Sender<Queued>,
            app: String,
            deployment: String,
            labels: Labels,
            had: u64,
        }
        let targets: Vec<Target> = {
            let mut members = lock(&self.members);
            let mut targets = Vec::new();
            members.retain(|id, m| {
                let Some(tx) = m.tx.upgrade() else {
                    return false; // the connection is gone
                };
                if app == GLOBAL || m.app == app {
                    targets.push(Target {
                        id: *id,
                        tx,
                        app: m.app.clone(),
                        deployment: m.deployment.clone(),
                        labels: m.labels.clone(),
                        had: m.sent,
                    });
                }
                true
            });
            targets
        };
        let mut views: HashMap<String, (Arc<ScopeConfig>, Arc<ScopeConfig>, bool)> = HashMap::new();
        // (app, deployment, labels) → (frame, version, missing a dynamic value); None: too big.
        type Built = Option<(Frame, u64, bool)>;
        let mut per_view: HashMap<(String, String, Labels), Built> = HashMap::new();
        let mut out = Vec::new();
        for t in targets {
            if !views.contains_key(&t.app) {
                match self.view_parts(&t.app).await {
                    Ok((g, c)) => {
                        let pending = self.pending(&g, &t.app, &c);
                        views.insert(t.app.clone(), (g, c, pending));
                    }
                    Err(e) => {
                        tracing::error!(
                            app = t.app,
                            error = format!("{e:#}"),
                            "loading the app's config failed; not pushed"
                        );
                        continue;
                    }
                }
            }
            let (g, c, pending) = &views[&t.app];
            let built = per_view
                .entry((t.app.clone(), t.deployment.clone(), t.labels.clone()))
                .or_insert_with(|| self.frame(g, &t.app, c, &t.deployment, &t.labels));
            let Some((frame, version, missing)) = built else {
                continue;
            };
            // Missing a dynamic value: only an instance with no config at all gets it, and not
            // while the value is still being read for the first time.
            if *version <= t.had || (*missing && (t.had > 0 || *pending)) {
                continue;
            }
            metrics()
                .config_pushes
                .get_or_create(&AppLabel::new(&t.app))
                .inc();
            out.push((t.id, t.tx, frame.clone(), *version));
        }
        {
            let mut members = lock(&self.members);
            for (id, _, _, v) in &out {
                if let Some(m) = members.get_mut(id) {
                    m.sent = m.sent.max(*v);
                }
            }
        }
        let n = out.len();
        tokio::spawn(async move {
            for (i, (_, tx, frame, _)) in out.into_iter().enumerate() {
                Self::deliver(&tx, frame);
                if i % PUSH_BATCH == PUSH_BATCH - 1 {
                    tokio::task::yield_now().await;
                }
            }
        });
        n
    }

    /// The Config frame of one instance's snapshot: (frame, version, missing a dynamic value);
    /// None when it is too big for a frame (logged).
    fn frame(
        &self,
        global: &ScopeConfig,
        app: &str,
        cfg: &ScopeConfig,
        deployment: &str,
        labels: &Labels,
    ) -> Option<(Frame, u64, bool)> {
        let snap = self.snapshot(global, app, cfg, deployment, labels);
        let size = rules::frame_size(&snap.config);
        if size > rules::frame_limit() {
            tracing::error!(
                app,
                deployment,
                size,
                "a config snapshot is too big for one frame (dynamic values or templates grew it); not sent"
            );
            return None;
        }
        let v = snap.config.version;
        Some((Kind::Config(snap.config).into(), v, snap.missing_dynamic))
    }

    /// Applies a change to `scope` ([`GLOBAL`] or an app): checks it, writes it, and pushes the
    /// new snapshots. Returns the new config and whether anything changed.
    pub async fn change(
        &self,
        scope: &str,
        change: Change,
    ) -> Result<(Arc<ScopeConfig>, bool), ChangeError> {
        self.write(scope, move |cur, ctx| change.apply_to(cur, ctx))
            .await
    }

    /// Makes `version` of `scope` (from its history) the current config, as a new version.
    pub async fn rollback(
        &self,
        scope: &str,
        version: u64,
    ) -> Result<(Arc<ScopeConfig>, bool), ChangeError> {
        let name = scope.to_string();
        let old = self
            .store
            .call(move |db| store::config::at_version(db, &name, version))
            .await
            .map_err(ChangeError::Failed)?;
        let Some(old) = old else {
            return Err(ChangeError::Refused(format!(
                "there is no version {version} in the history (see `waypost config history`; the newest {} versions are kept)",
                rules::HISTORY_KEPT
            )));
        };
        self.write(scope, move |cur, ctx| {
            let mut new = old.clone();
            new.version = cur.version;
            new.epoch = cur.epoch;
            if new.same_definitions(cur) {
                return Ok(cur.clone());
            }
            // The old definitions must still work with today's sources and the other scope.
            for r in new.dynamic_refs() {
                if !(ctx.has_source)(&r.source) {
                    return Err(format!(
                        "version {version} uses the config source {:?}, which no longer exists; add it again first",
                        r.source
                    ));
                }
            }
            rules::check_scope(&new, ctx)
                .map_err(|e| format!("version {version} cannot be restored: {e}"))?;
            new.version = cur.version + 1;
            Ok(new)
        })
        .await
    }

    async fn write(
        &self,
        scope: &str,
        f: impl FnOnce(&ScopeConfig, &Context) -> Result<ScopeConfig, String> + Send + 'static,
    ) -> Result<(Arc<ScopeConfig>, bool), ChangeError> {
        let _order = self.order.lock().await;
        let name = scope.to_string();
        // Which sources each scope sees is the resolver's (it has them all, loaded at start and
        // on every change); captured for the blocking store call.
        let resolver = self.resolver.clone();
        let outcome = self
            .store
            .call(move |db| {
                store::config::update(db, &name, |cur, global, apps| {
                    let has = |s: &str| resolver.has_source(&name, s);
                    let ctx = Context {
                        scope: &name,
                        global: (name != GLOBAL).then_some(global),
                        apps,
                        has_source: &has,
                    };
                    f(cur, &ctx)
                })
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
        lock(&self.cache).insert(scope.to_string(), cfg.clone());
        if changed {
            self.sync_refs();
            let n = self.push(scope).await;
            tracing::info!(
                scope = if scope == GLOBAL { "(global)" } else { scope },
                version = cfg.version,
                instances = n,
                "config changed; pushed"
            );
        }
        Ok((cfg, changed))
    }

    /// A scope changed on another replica or this one (service/fanout.rs), or the sources did
    /// ([`store::config::SOURCES_CHANGED`]): reloads it and, if its version or epoch moved past
    /// the cached one, pushes to this replica's instances.
    pub async fn reload(&self, scope: &str) -> Result<()> {
        if scope == store::config::SOURCES_CHANGED {
            let sources = self.store.call(|db| store::config::sources(db)).await?;
            self.resolver.set_sources(sources);
            self.sync_refs();
            return Ok(());
        }
        let _order = self.order.lock().await;
        let cached = lock(&self.cache).get(scope).cloned();
        let name = scope.to_string();
        let cfg = Arc::new(
            self.store
                .call(move |db| store::config::load(db, &name))
                .await?,
        );
        if cached
            .as_ref()
            .is_some_and(|c| (cfg.version, cfg.epoch) <= (c.version, c.epoch))
        {
            return Ok(());
        }
        lock(&self.cache).insert(scope.to_string(), cfg.clone());
        self.sync_refs();
        let n = self.push(scope).await;
        tracing::info!(
            scope = if scope == GLOBAL { "(global)" } else { scope },
            version = cfg.version,
            epoch = cfg.epoch,
            instances = n,
            "config changed on another replica (or a dynamic value changed); pushed"
        );
        Ok(())
    }

    /// [`ConfigService::reload`] for the sources and every cached scope (after notifications may
    /// have been missed).
    pub async fn reload_all(&self) -> Result<()> {
        self.reload(store::config::SOURCES_CHANGED).await?;
        let mut scopes: Vec<String> = lock(&self.cache).keys().cloned().collect();
        // Scopes created elsewhere meanwhile.
        let apps = self.store.call(|db| store::config::load_apps(db)).await?;
        scopes.extend(apps.into_iter().map(|(n, _)| n));
        scopes.sort();
        scopes.dedup();
        for s in scopes {
            self.reload(&s).await?;
        }
        Ok(())
    }

    /// A dynamic value was read (service/resolve.rs). Changed: the epoch of every scope using it
    /// is bumped (stored and announced, so versions keep growing everywhere) and the new
    /// snapshots pushed. First read finished without a change (it failed): the instances
    /// waiting for it are sent what there is.
    pub async fn on_resolved(&self, e: resolve::Event) -> Result<()> {
        let users: Vec<String> = {
            let cache = lock(&self.cache);
            cache
                .iter()
                .filter(|(scope, cfg)| {
                    cfg.dynamic_refs()
                        .any(|r| self.resolver.key_of(scope, r).as_ref() == Some(&e.key))
                })
                .map(|(s, _)| s.clone())
                .collect()
        };
        if users.is_empty() {
            return Ok(());
        }
        if e.changed {
            let scopes = users.clone();
            self.store
                .call(move |db| store::config::bump_epochs(db, &scopes))
                .await?;
            tracing::info!(
                source = e.key.source,
                path = e.key.path,
                scopes = users.len(),
                "a dynamic config value changed"
            );
            for s in &users {
                self.reload(s).await?;
            }
        } else {
            let _order = self.order.lock().await;
            for s in &users {
                self.push(s).await;
            }
        }
        Ok(())
    }

    /// The sources, for listings.
    pub async fn sources(&self) -> Result<Vec<SourceSpec>> {
        self.store.call(|db| store::config::sources(db)).await
    }

    /// Adds or replaces a source, and starts using it.
    pub async fn put_source(&self, spec: SourceSpec) -> Result<()> {
        let s = spec.clone();
        self.store
            .call(move |db| store::config::put_source(db, &s))
            .await?;
        self.reload(store::config::SOURCES_CHANGED).await
    }

    /// Removes a source. Refused while a definition uses it (the message names one).
    pub async fn delete_source(&self, scope: &str, name: &str) -> Result<Result<bool, String>> {
        {
            let cache = lock(&self.cache);
            for (s, cfg) in cache.iter() {
                // Definitions in `s` see this source if it is theirs or global (and not shadowed).
                let sees =
                    s == scope || (scope == GLOBAL && !self.resolver.has_own_source(s, name));
                if !sees {
                    continue;
                }
                if let Some(v) = cfg
                    .vars
                    .values()
                    .find(|v| matches!(&v.value, rules::VarValue::Dynamic(r) if r.source == name))
                {
                    let whose = if s.is_empty() {
                        "the global config".to_string()
                    } else {
                        format!("app {s}")
                    };
                    return Ok(Err(format!(
                        "refused: {} in {whose} reads from {name}; unset it (or point it elsewhere) first",
                        v.name()
                    )));
                }
                if let Some(f) = cfg
                    .files
                    .values()
                    .find(|f| matches!(&f.data, rules::FileData::Dynamic(r) if r.source == name))
                {
                    let whose = if s.is_empty() {
                        "the global config".to_string()
                    } else {
                        format!("app {s}")
                    };
                    return Ok(Err(format!(
                        "refused: the file {} in {whose} reads from {name}; unset it first",
                        f.path
                    )));
                }
            }
        }
        let (sc, n) = (scope.to_string(), name.to_string());
        let gone = self
            .store
            .call(move |db| store::config::delete_source(db, &sc, &n))
            .await?;
        self.reload(store::config::SOURCES_CHANGED).await?;
        Ok(Ok(gone))
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
        labels: &Labels,
        welcome: Kind,
    ) {
        let Kind::Welcome(mut welcome) = welcome else {
            Self::deliver(tx, welcome.into());
            return;
        };
        let disabled = hello.disabled.as_ref().is_some_and(|f| f.config);
        if !disabled && hello.config_version == 0 {
            // An entrypoint starts its child when welcomed, config or not: a new instance waits
            // here (not holding the ordering lock) for the first read of the dynamic values its
            // app uses, so its child starts with them instead of being restarted for them.
            self.wait_first_reads(app).await;
        }
        let _order = self.order.lock().await;
        if !disabled {
            let had = hello.config_version;
            let mut sent = had;
            match self.view_parts(app).await {
                Ok((g, c)) => {
                    let pending = self.pending(&g, app, &c);
                    if let Some((frame, version, missing)) =
                        self.frame(&g, app, &c, deployment, labels)
                    {
                        // As in `push`: never a snapshot missing a dynamic value to an instance
                        // that has a config, nor while the value is being read the first time.
                        if version > had && !(missing && (had > 0 || pending)) {
                            if let Frame {
                                kind: Some(Kind::Config(snap)),
                            } = frame
                            {
                                welcome.config = Some(snap);
                                sent = version;
                            }
                        }
                    }
                }
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
                    labels: labels.clone(),
                    tx: tx.downgrade(),
                    sent,
                    applied: had,
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

    /// Live welcomed connections of an app: (id hex, deployment, labels, applied version, error).
    pub fn instances_of(&self, app: &str) -> Vec<(String, String, Labels, u64, String)> {
        let mut v: Vec<_> = lock(&self.members)
            .iter()
            .filter(|(_, m)| m.app == app && m.tx.strong_count() > 0)
            .map(|(id, m)| {
                (
                    util::hex(id),
                    m.deployment.clone(),
                    m.labels.clone(),
                    m.applied,
                    m.error.clone(),
                )
            })
            .collect();
        v.sort();
        v
    }
}
