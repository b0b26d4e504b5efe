//! The app-configuration tables: `config_scopes` (each scope's definitions as one document, with
//! its version and epoch), `config_history` (every version, for `config history`/`rollback`) and
//! `config_sources`; on either backend. The model is model/config.rs.
//!
//! Every change is announced with [`notify_changed`] in the transaction that makes it, so on
//! PostgreSQL the other replicas sharing the database learn of it when it commits.

use super::{Backend, Begin, Db, args};
use crate::server::model::config::{
    FileData, FileEntry, GLOBAL, HISTORY_KEPT, Policy, ScopeConfig, Target, Var, VarValue, summary,
};
use crate::server::model::sources::{Auth, SourceKind, SourceSpec};
use anyhow::{Context as _, Result, anyhow};
use std::time::Duration;
use waypost_proto::on_change::Action;

/// The PostgreSQL notification channel of config changes; the payload is the scope's name (''
/// for the global scope; an app name is at most 63 bytes, far below PostgreSQL's 8000-byte
/// payload limit) or [`SOURCES_CHANGED`]. Replicas `LISTEN` on it to reload that scope and push
/// it to their own connections.
pub const CONFIG_CHANNEL: &str = "waypost_config";
/// The payload announcing that the config sources changed (not an app name: those have no '@').
pub const SOURCES_CHANGED: &str = "@sources";
/// Payload on [`CONFIG_CHANNEL`]: tokens were deleted (revoked, or their app deleted). Every
/// replica then closes the connections it holds whose token no longer exists.
pub const TOKENS_CHANGED: &str = "@tokens";

/// What [`update`] did.
#[derive(Debug)]
pub enum Update<E> {
    /// No app of that name.
    NoApp,
    /// The change was refused (nothing written).
    Refused(E),
    /// The change changes nothing: the current config, version unchanged.
    Unchanged(ScopeConfig),
    /// Written: the new config.
    Changed(ScopeConfig),
}

/// Applies `change` (current config → new config, or why not) to `scope` in one transaction:
/// read, decide, write the new document and its history row, and [`notify_changed`]. `change`
/// also gets what it is checked against: the global scope (for an app) or every app's config
/// (for the global scope).
pub fn update<E>(
    db: &mut Db,
    scope: &str,
    change: impl FnOnce(
        &ScopeConfig,
        &ScopeConfig,
        &[(String, std::sync::Arc<ScopeConfig>)],
    ) -> Result<ScopeConfig, E>,
) -> Result<Update<E>> {
    if scope != GLOBAL && !super::app_exists(db, scope)? {
        return Ok(Update::NoApp);
    }
    // IMMEDIATE: read then write. Deferred, on SQLite a commit by another connection (the log
    // writer) in between fails the write at once ("database is locked"); on PostgreSQL two
    // replicas changing the same scope at once would both build on the same version.
    db.transaction(Begin::Immediate, |db| {
        let cur = load(db, scope)?;
        let (global, apps) = if scope == GLOBAL {
            (ScopeConfig::default(), load_apps(db)?)
        } else {
            (load(db, GLOBAL)?, Vec::new())
        };
        let new = match change(&cur, &global, &apps) {
            Ok(new) => new,
            Err(e) => return Ok(Update::Refused(e)),
        };
        if new.same_definitions(&cur) {
            return Ok(Update::Unchanged(cur));
        }
        save(db, scope, &cur, &new)?;
        Ok(Update::Changed(new))
    })
}

/// Announces that `scope`'s config (or, with [`SOURCES_CHANGED`], the sources) changed: on
/// PostgreSQL a notification on [`CONFIG_CHANNEL`]; nothing on SQLite (one server per database,
/// nobody else to tell). Call it inside the transaction that makes the change: PostgreSQL
/// delivers the notification when that transaction commits, and drops it if it rolls back, so
/// a listener never reloads before the change is visible nor for a change that did not happen.
pub fn notify_changed(db: &Db, scope: &str) -> Result<()> {
    match db.backend() {
        Backend::Sqlite => Ok(()),
        Backend::Postgres => {
            db.execute("SELECT pg_notify(?1, ?2)", args![CONFIG_CHANNEL, scope])?;
            Ok(())
        }
    }
}

/// The config of `scope` (empty, version 0, if nothing was ever set).
pub fn load(db: &Db, scope: &str) -> Result<ScopeConfig> {
    let row = db.query_opt(
        "SELECT version, epoch, doc FROM config_scopes WHERE scope = ?1",
        args![scope],
    )?;
    match row {
        None => Ok(ScopeConfig::default()),
        Some(r) => {
            let doc: String = r.get(2)?;
            ScopeConfig::from_doc(r.get::<i64>(0)? as u64, r.get::<i64>(1)? as u64, &doc)
                .map_err(|e| anyhow!("config of {}: {e}", scope_name(scope)))
        }
    }
}

/// Every app's config that has one (not the global scope), by name.
pub fn load_apps(db: &Db) -> Result<Vec<(String, std::sync::Arc<ScopeConfig>)>> {
    let mut out = Vec::new();
    for r in db.query(
        "SELECT scope, version, epoch, doc FROM config_scopes WHERE scope <> ?1 ORDER BY scope",
        args![GLOBAL],
    )? {
        let scope: String = r.get(0)?;
        let doc: String = r.get(3)?;
        let cfg = ScopeConfig::from_doc(r.get::<i64>(1)? as u64, r.get::<i64>(2)? as u64, &doc)
            .map_err(|e| anyhow!("config of {}: {e}", scope_name(&scope)))?;
        out.push((scope, std::sync::Arc::new(cfg)));
    }
    Ok(out)
}

fn scope_name(scope: &str) -> String {
    if scope == GLOBAL {
        "the global scope".into()
    } else {
        format!("app {scope}")
    }
}

/// Writes `new` (version already bumped) over `old`, with its history row (pruning the oldest),
/// and [`notify_changed`]: call it inside the transaction that read `old`.
fn save(db: &Db, scope: &str, old: &ScopeConfig, new: &ScopeConfig) -> Result<()> {
    let doc = new.to_doc();
    db.execute(
        "INSERT INTO config_scopes (scope, version, epoch, doc) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (scope) DO UPDATE SET version = excluded.version, epoch = excluded.epoch,
             doc = excluded.doc",
        args![scope, new.version as i64, new.epoch as i64, doc],
    )?;
    // The version before history was kept (a database from before migration 8): recorded once,
    // so it can be rolled back to.
    if old.version > 0 {
        db.execute(
            "INSERT INTO config_history (scope, version, at_ms, summary, doc)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (scope, version) DO NOTHING",
            args![
                scope,
                old.version as i64,
                crate::util::now_ms(),
                "(before history was kept)",
                old.to_doc()
            ],
        )?;
    }
    db.execute(
        "INSERT INTO config_history (scope, version, at_ms, summary, doc) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (scope, version) DO UPDATE SET at_ms = excluded.at_ms,
             summary = excluded.summary, doc = excluded.doc",
        args![
            scope,
            new.version as i64,
            crate::util::now_ms(),
            summary(old, new),
            doc
        ],
    )?;
    db.execute(
        "DELETE FROM config_history WHERE scope = ?1 AND version <= ?2",
        args![scope, new.version as i64 - HISTORY_KEPT as i64],
    )?;
    notify_changed(db, scope)
}

/// One row of `config history`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryRow {
    pub version: u64,
    pub at_ms: i64,
    pub summary: String,
}

/// The versions of `scope` kept, newest first.
pub fn history(db: &Db, scope: &str) -> Result<Vec<HistoryRow>> {
    db.query(
        "SELECT version, at_ms, summary FROM config_history WHERE scope = ?1 ORDER BY version DESC",
        args![scope],
    )?
    .into_iter()
    .map(|r| {
        Ok(HistoryRow {
            version: r.get::<i64>(0)? as u64,
            at_ms: r.get(1)?,
            summary: r.get(2)?,
        })
    })
    .collect()
}

/// The definitions of `scope` at `version` (None: not kept).
pub fn at_version(db: &Db, scope: &str, version: u64) -> Result<Option<ScopeConfig>> {
    let Some(r) = db.query_opt(
        "SELECT doc FROM config_history WHERE scope = ?1 AND version = ?2",
        args![scope, version as i64],
    )?
    else {
        return Ok(None);
    };
    let doc: String = r.get(0)?;
    ScopeConfig::from_doc(version, 0, &doc)
        .map(Some)
        .map_err(|e| anyhow!("version {version} of {}: {e}", scope_name(scope)))
}

/// Bumps the epoch of each of `scopes` that has a config (a dynamic value it uses changed), and
/// announces it. Returns the scopes' new (version, epoch).
pub fn bump_epochs(db: &mut Db, scopes: &[String]) -> Result<()> {
    db.transaction(Begin::Deferred, |db| {
        for s in scopes {
            let n = db.execute(
                "UPDATE config_scopes SET epoch = epoch + 1 WHERE scope = ?1",
                args![s],
            )?;
            if n > 0 {
                notify_changed(db, s)?;
            }
        }
        Ok(())
    })
}

// ---- sources ---------------------------------------------------------------------------------

/// Every configured source.
pub fn sources(db: &Db) -> Result<Vec<SourceSpec>> {
    db.query(
        "SELECT scope, name, kind, addr, ca, auth, refresh_ms FROM config_sources ORDER BY scope, name",
        &[],
    )?
    .into_iter()
    .map(|r| {
        let kind: String = r.get(2)?;
        let auth: String = r.get(5)?;
        Ok(SourceSpec {
            scope: r.get(0)?,
            name: r.get(1)?,
            kind: SourceKind::parse(&kind).ok_or_else(|| anyhow!("unknown source kind {kind:?}"))?,
            addr: r.get(3)?,
            ca_pem: r.get(4)?,
            auth: serde_json::from_str::<Auth>(&auth).context("a stored source's credentials")?,
            refresh: Duration::from_millis(r.get::<i64>(6)? as u64),
        })
    })
    .collect()
}

/// Adds or replaces a source, and announces it.
pub fn put_source(db: &mut Db, s: &SourceSpec) -> Result<()> {
    if s.scope != GLOBAL && !super::app_exists(db, &s.scope)? {
        anyhow::bail!("no app named {}", s.scope);
    }
    db.transaction(Begin::Immediate, |db| {
        db.execute(
            "INSERT INTO config_sources (scope, name, kind, addr, ca, auth, refresh_ms, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (scope, name) DO UPDATE SET kind = excluded.kind, addr = excluded.addr,
                 ca = excluded.ca, auth = excluded.auth, refresh_ms = excluded.refresh_ms",
            args![
                s.scope,
                s.name,
                s.kind.as_str(),
                s.addr,
                s.ca_pem,
                serde_json::to_string(&s.auth)?,
                s.refresh.as_millis() as i64,
                crate::util::now_ms()
            ],
        )?;
        notify_changed(db, SOURCES_CHANGED)
    })
}

/// Removes a source (false: there was none), and announces it.
pub fn delete_source(db: &mut Db, scope: &str, name: &str) -> Result<bool> {
    db.transaction(Begin::Immediate, |db| {
        let n = db.execute(
            "DELETE FROM config_sources WHERE scope = ?1 AND name = ?2",
            args![scope, name],
        )?;
        if n > 0 {
            notify_changed(db, SOURCES_CHANGED)?;
        }
        Ok(n > 0)
    })
}

// ---- the tables of migration 2 -----------------------------------------------------------------

/// Converts the rows of migration 2's tables (`config_apps`, `config_vars`, `config_files`) into
/// scope documents, keeping each app's version, then drops those tables. Runs once, in the
/// transaction of migration 8. Values written before templates existed are escaped (`${` →
/// `$${`) so they mean what they meant.
pub fn convert_legacy(db: &Db) -> Result<()> {
    let mut apps: std::collections::BTreeMap<String, ScopeConfig> = Default::default();
    for r in db.query(
        "SELECT app, version, on_change, signal, splay_ms, stop_grace_ms FROM config_apps",
        &[],
    )? {
        let cfg = apps.entry(r.get(0)?).or_default();
        cfg.version = r.get::<i64>(1)? as u64;
        cfg.policy = Policy {
            action: match r.get::<String>(2)?.as_str() {
                "signal" => Action::Signal,
                "none" => Action::None,
                _ => Action::Restart,
            },
            signal: r.get(3)?,
            splay_ms: r.get(4)?,
            stop_grace_ms: r.get(5)?,
        };
    }
    for r in db.query("SELECT app, deployment, key, value FROM config_vars", &[])? {
        let deployment: String = r.get(1)?;
        let value: String = r.get(3)?;
        let v = Var {
            key: r.get(2)?,
            internal: false,
            target: if deployment.is_empty() {
                Target::All
            } else {
                Target::Deployment(deployment)
            },
            secret: false,
            value: VarValue::Text(crate::server::model::template::escape(&value)),
        };
        apps.entry(r.get(0)?).or_default().vars.insert(v.id(), v);
    }
    for r in db.query("SELECT app, path, mode, contents FROM config_files", &[])? {
        let f = FileEntry {
            path: r.get(1)?,
            mode: r.get(2)?,
            secret: false,
            data: FileData::Bytes(r.get(3)?),
        };
        apps.entry(r.get(0)?)
            .or_default()
            .files
            .insert(f.path.clone(), f);
    }
    for (app, cfg) in &apps {
        // An app with rows but no config_apps row (never happens: every change wrote one)
        // still gets version 1, so its instances are sent the config.
        let version = cfg.version.max(1);
        db.execute(
            "INSERT INTO config_scopes (scope, version, epoch, doc) VALUES (?1, ?2, 0, ?3)",
            args![app, version as i64, cfg.to_doc()],
        )?;
    }
    db.batch("DROP TABLE config_files; DROP TABLE config_vars; DROP TABLE config_apps;")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::config::tests::set;
    use crate::server::model::config::{Change, Context};
    use crate::server::store;

    /// How long the PostgreSQL test waits for a notification that should come.
    const NOTIFY_WAIT: Duration = Duration::from_secs(10);

    /// `update` of `scope` with `ch` (every source exists).
    fn change(db: &mut Db, scope: &str, ch: &Change) -> Update<String> {
        update(db, scope, |cur, global, apps| {
            let has = |_: &str| true;
            ch.apply_to(
                cur,
                &Context {
                    scope,
                    global: (scope != GLOBAL).then_some(global),
                    apps,
                    has_source: &has,
                },
            )
        })
        .unwrap()
    }

    fn changed(db: &mut Db, scope: &str, ch: &Change) -> ScopeConfig {
        match change(db, scope, ch) {
            Update::Changed(c) => c,
            other => panic!("expected a change: {other:?}"),
        }
    }

    /// Changes, history, rollback material, epochs and sources of the app "web" (which must
    /// exist) and the global scope. Returns how many writes announced a change.
    fn round_trip(db: &mut Db) -> usize {
        assert_eq!(load(db, "web").unwrap(), ScopeConfig::default());
        let one = changed(db, "web", &set(&[("A", "1"), ("B", "2")]));
        assert_eq!(one.version, 1);
        assert_eq!(load(db, "web").unwrap(), one);
        match change(db, "web", &set(&[("A", "1")])) {
            Update::Unchanged(c) => assert_eq!(c, one),
            other => panic!("expected no change: {other:?}"),
        }
        let r = update(db, "web", |_, _, _| Err::<ScopeConfig, _>("no")).unwrap();
        assert!(matches!(r, Update::Refused("no")), "{r:?}");
        let r = update(db, "nope", |c, _, _| Ok::<_, String>(c.clone())).unwrap();
        assert!(matches!(r, Update::NoApp), "{r:?}");
        let two = changed(
            db,
            "web",
            &Change {
                unset: vec!["B".into()],
                ..Default::default()
            },
        );
        // The global scope needs no app; an app's template may use it.
        let g = changed(db, GLOBAL, &set(&[("DOMAIN", "example.com")]));
        assert_eq!(g.version, 1);
        let three = changed(db, "web", &set(&[("URL", "https://${DOMAIN}")]));
        // The global scope cannot lose what an app uses.
        let r = change(
            db,
            GLOBAL,
            &Change {
                unset: vec!["DOMAIN".into()],
                ..Default::default()
            },
        );
        assert!(
            matches!(&r, Update::Refused(e) if e.contains("app web")),
            "{r:?}"
        );

        let h = history(db, "web").unwrap();
        assert_eq!(
            h.iter().map(|r| r.version).collect::<Vec<_>>(),
            vec![3, 2, 1]
        );
        assert!(h[1].summary.contains("unset B"), "{:?}", h[1]);
        assert!(!h[0].summary.contains("example"), "never a value");
        let old = at_version(db, "web", 1).unwrap().unwrap();
        assert!(old.same_definitions(&one));
        assert!(at_version(db, "web", 9).unwrap().is_none());
        assert_eq!(history(db, GLOBAL).unwrap().len(), 1);

        bump_epochs(db, &["web".into(), "ghost".into()]).unwrap();
        let now = load(db, "web").unwrap();
        assert_eq!((now.version, now.epoch), (3, 1));
        assert!(now.same_definitions(&three));
        let _ = two;

        let spec = SourceSpec {
            scope: GLOBAL.into(),
            name: "bao".into(),
            kind: SourceKind::Openbao,
            addr: "http://127.0.0.1:8200".into(),
            ca_pem: None,
            auth: Auth::Approle {
                role_id: "r".into(),
                secret_id: "s".into(),
            },
            refresh: Duration::from_secs(30),
        };
        put_source(db, &spec).unwrap();
        let mut app_spec = spec.clone();
        app_spec.scope = "web".into();
        app_spec.kind = SourceKind::Etcd;
        app_spec.auth = Auth::None;
        app_spec.ca_pem = Some("PEM".into());
        put_source(db, &app_spec).unwrap();
        assert_eq!(sources(db).unwrap(), vec![spec.clone(), app_spec.clone()]);
        app_spec.refresh = Duration::from_millis(1500);
        put_source(db, &app_spec).unwrap();
        assert_eq!(sources(db).unwrap()[1].refresh, Duration::from_millis(1500));
        let mut ghost = spec.clone();
        ghost.scope = "ghost".into();
        assert!(put_source(db, &ghost).is_err());
        assert!(delete_source(db, "web", "bao").unwrap());
        assert!(!delete_source(db, "web", "bao").unwrap());
        assert_eq!(sources(db).unwrap(), vec![spec]);
        // Writes that announced: 4 changes, 1 epoch bump, 3 source puts, 1 delete.
        9
    }

    #[test]
    fn scopes_history_epochs_and_sources_persist() {
        let mut db = store::memory();
        store::create_app(&db, "web", 0).unwrap();
        round_trip(&mut db);
        notify_changed(&db, "web").unwrap();
    }

    #[test]
    fn history_keeps_the_newest_versions() {
        let mut db = store::memory();
        store::create_app(&db, "web", 0).unwrap();
        for i in 0..HISTORY_KEPT + 5 {
            changed(&mut db, "web", &set(&[("N", &i.to_string())]));
        }
        let h = history(&db, "web").unwrap();
        assert_eq!(h.len() as u64, HISTORY_KEPT);
        assert_eq!(h[0].version, HISTORY_KEPT + 5);
        assert_eq!(h.last().unwrap().version, 6);
    }

    /// A database with the config tables of migration 2 (rows written by the build before
    /// scopes) is converted: same values (a `${` in one stays literal), files, policy, version.
    #[test]
    fn config_rows_of_the_previous_build_are_converted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.pragma_update(None, "foreign_keys", "ON").unwrap();
            for (i, sql) in store::MIGRATIONS.iter().enumerate().take(7) {
                c.execute_batch(sql).unwrap();
                c.pragma_update(None, "user_version", (i + 1) as i64)
                    .unwrap();
            }
            c.execute_batch(
                "INSERT INTO apps VALUES ('web', 1);
                 INSERT INTO config_apps VALUES ('web', 4, 'signal', 'SIGHUP', 0, 1500);
                 INSERT INTO config_vars VALUES ('web', '', 'A', 'cost ${HOME}');
                 INSERT INTO config_vars VALUES ('web', 'blue', 'A', 'blue');
                 INSERT INTO config_files VALUES ('web', '/etc/x', 416, X'00ff');",
            )
            .unwrap();
        }
        let st = store::Store::open(&store::Location::Sqlite(path)).unwrap();
        let cfg = st.with(|db| load(db, "web")).unwrap();
        assert_eq!(cfg.version, 4);
        assert_eq!(cfg.policy.signal, "SIGHUP");
        assert_eq!(cfg.policy.stop_grace_ms, 1500);
        let g = ScopeConfig::default();
        let view = crate::server::model::config::View {
            global: &g,
            app_name: "web",
            app: &cfg,
        };
        let none = |_: &str, _: &crate::server::model::config::DynRef| None;
        let snap = view.snapshot("", &Default::default(), &none).config;
        assert_eq!(snap.env["A"], "cost ${HOME}");
        assert_eq!(snap.files[0].contents, b"\x00\xff");
        assert_eq!(snap.files[0].mode, 0o640);
        let blue = view.snapshot("blue", &Default::default(), &none).config;
        assert_eq!(blue.env["A"], "blue");
        // The old tables are gone.
        let gone = st
            .with(|db| {
                db.query_opt(
                    "SELECT name FROM sqlite_master WHERE name = 'config_vars'",
                    &[],
                )
            })
            .unwrap();
        assert!(gone.is_none());
    }

    /// The same on PostgreSQL, with the notifications another connection receives: one per
    /// committed change, none for a change rolled back. Runs when WAYPOST_TEST_DATABASE is set
    /// (a base URL, e.g. by scripts/with-postgres.sh).
    #[test]
    fn scopes_persist_and_notify_on_postgres() {
        let Ok(base) = std::env::var("WAYPOST_TEST_DATABASE") else {
            println!("skipped: WAYPOST_TEST_DATABASE unset");
            return;
        };
        let url = waypost_testkit::pg::create_database_at(&base);
        let location = store::Location::Postgres(url.clone());
        let st = store::Store::open(&location).unwrap();
        let listener = store::connect(&location).unwrap();
        assert!(
            store::listen(&listener, CONFIG_CHANNEL).unwrap(),
            "a PostgreSQL connection"
        );

        let changes = st
            .with(|db| {
                store::create_app(db, "web", 0)?;
                let n = round_trip(db);
                let r: Result<()> = db.transaction(Begin::Immediate, |db| {
                    notify_changed(db, "web")?;
                    anyhow::bail!("rolled back")
                });
                assert!(r.is_err());
                // Out of any transaction: delivered at once, after every earlier one.
                notify_changed(db, "end")?;
                Ok(n)
            })
            .unwrap();

        // One session's notifications arrive in commit order: everything before "end".
        let got = listener
            .with_postgres(|c| {
                let mut got = Vec::new();
                let mut notifications = c.notifications();
                let mut it = notifications.timeout_iter(NOTIFY_WAIT);
                while let Some(n) = postgres::fallible_iterator::FallibleIterator::next(&mut it)
                    .expect("reading notifications")
                {
                    assert_eq!(n.channel(), CONFIG_CHANNEL);
                    if n.payload() == "end" {
                        return got;
                    }
                    got.push(n.payload().to_string());
                }
                panic!("no \"end\" notification within {NOTIFY_WAIT:?}; got {got:?}")
            })
            .unwrap();
        assert_eq!(got.len(), changes, "{got:?}");
        assert_eq!(got.iter().filter(|p| *p == SOURCES_CHANGED).count(), 4);
        assert_eq!(
            got.iter().filter(|p| p.is_empty()).count(),
            1,
            "the global change"
        );

        drop((st, listener));
        waypost_testkit::pg::drop_database_at(&url).unwrap();
    }
}
