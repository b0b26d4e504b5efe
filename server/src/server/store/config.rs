//! The app-configuration tables (`config_apps`, `config_vars`, `config_files`): the model of
//! model/config.rs, loaded and saved row by row, on either backend.
//!
//! Every change is announced with [`notify_changed`] in the transaction that makes it, so on
//! PostgreSQL the other replicas sharing the database learn of it when it commits.

use super::{Backend, Begin, Db, args};
use crate::server::model::config::{AppConfig, FileEntry, Policy};
use anyhow::Result;
use std::collections::BTreeMap;
use waypost_proto::on_change::Action;

/// The PostgreSQL notification channel of config changes; the payload is the app's name (at
/// most 63 bytes, see `util::valid_app_name`, far below PostgreSQL's 8000-byte payload limit).
/// Replicas `LISTEN` on it to reload that app's config and push it to their own connections.
pub const CONFIG_CHANNEL: &str = "waypost_config";

/// What [`update`] did.
#[derive(Debug)]
pub enum Update<E> {
    /// No app of that name.
    NoApp,
    /// The change was refused (nothing written).
    Refused(E),
    /// The change changes nothing: the current config, version unchanged.
    Unchanged(AppConfig),
    /// Written: the new config.
    Changed(AppConfig),
}

/// Applies `change` (current config → new config, or why not) to `app`'s config in one
/// transaction: read, decide, write only the rows that differ, and [`notify_changed`].
pub fn update<E>(
    db: &mut Db,
    app: &str,
    change: impl FnOnce(&AppConfig) -> Result<AppConfig, E>,
) -> Result<Update<E>> {
    if !super::app_exists(db, app)? {
        return Ok(Update::NoApp);
    }
    // IMMEDIATE: read then write. Deferred, on SQLite a commit by another connection (the log
    // writer) in between fails the write at once ("database is locked"); on PostgreSQL two
    // replicas changing the same app at once would both build on the same version.
    db.transaction(Begin::Immediate, |db| {
        let cur = load(db, app)?;
        let new = match change(&cur) {
            Ok(new) => new,
            Err(e) => return Ok(Update::Refused(e)),
        };
        if new == cur {
            return Ok(Update::Unchanged(cur));
        }
        save(db, app, &cur, &new)?;
        Ok(Update::Changed(new))
    })
}

/// Announces that `app`'s config changed: on PostgreSQL a notification on [`CONFIG_CHANNEL`]
/// with the app's name; nothing on SQLite (one server per database, nobody else to tell).
/// Call it inside the transaction that makes the change: PostgreSQL delivers the notification
/// when that transaction commits, and drops it if it rolls back, so a listener never reloads
/// before the change is visible nor for a change that did not happen.
pub fn notify_changed(db: &Db, app: &str) -> Result<()> {
    match db.backend() {
        Backend::Sqlite => Ok(()),
        Backend::Postgres => {
            db.execute("SELECT pg_notify(?1, ?2)", args![CONFIG_CHANNEL, app])?;
            Ok(())
        }
    }
}

/// The config of `app` (the default one if nothing was ever set).
pub fn load(db: &Db, app: &str) -> Result<AppConfig> {
    let mut cfg = AppConfig::default();
    let row = db.query_opt(
        "SELECT version, on_change, signal, splay_ms, stop_grace_ms FROM config_apps WHERE app = ?1",
        args![app],
    )?;
    if let Some(r) = row {
        cfg.version = r.get::<i64>(0)? as u64;
        cfg.policy = Policy {
            action: match r.get::<String>(1)?.as_str() {
                "signal" => Action::Signal,
                "none" => Action::None,
                _ => Action::Restart,
            },
            signal: r.get(2)?,
            splay_ms: r.get(3)?,
            stop_grace_ms: r.get(4)?,
        };
    }
    for r in db.query(
        "SELECT deployment, key, value FROM config_vars WHERE app = ?1",
        args![app],
    )? {
        cfg.vars
            .entry(r.get(0)?)
            .or_default()
            .insert(r.get(1)?, r.get(2)?);
    }
    for r in db.query(
        "SELECT path, mode, contents FROM config_files WHERE app = ?1",
        args![app],
    )? {
        let f = FileEntry {
            path: r.get(0)?,
            mode: r.get(1)?,
            contents: r.get(2)?,
        };
        cfg.files.insert(f.path.clone(), f);
    }
    Ok(cfg)
}

/// Writes `new` over `old` (only the rows that differ) with its version, and
/// [`notify_changed`]: call it inside the transaction that read `old`.
fn save(db: &Db, app: &str, old: &AppConfig, new: &AppConfig) -> Result<()> {
    let p = &new.policy;
    let action = match p.action {
        Action::Restart => "restart",
        Action::Signal => "signal",
        Action::None => "none",
    };
    db.execute(
        "INSERT INTO config_apps (app, version, on_change, signal, splay_ms, stop_grace_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (app) DO UPDATE SET version = excluded.version,
             on_change = excluded.on_change, signal = excluded.signal,
             splay_ms = excluded.splay_ms, stop_grace_ms = excluded.stop_grace_ms",
        args![
            app,
            new.version as i64,
            action,
            p.signal,
            p.splay_ms,
            p.stop_grace_ms
        ],
    )?;
    let empty = BTreeMap::new();
    for (d, vars) in &old.vars {
        let now = new.vars.get(d).unwrap_or(&empty);
        for k in vars.keys().filter(|k| !now.contains_key(*k)) {
            db.execute(
                "DELETE FROM config_vars WHERE app = ?1 AND deployment = ?2 AND key = ?3",
                args![app, d, k],
            )?;
        }
    }
    for (d, vars) in &new.vars {
        let before = old.vars.get(d).unwrap_or(&empty);
        for (k, v) in vars.iter().filter(|(k, v)| before.get(*k) != Some(*v)) {
            db.execute(
                "INSERT INTO config_vars (app, deployment, key, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (app, deployment, key) DO UPDATE SET value = excluded.value",
                args![app, d, k, v],
            )?;
        }
    }
    for path in old.files.keys().filter(|p| !new.files.contains_key(*p)) {
        db.execute(
            "DELETE FROM config_files WHERE app = ?1 AND path = ?2",
            args![app, path],
        )?;
    }
    for f in new
        .files
        .values()
        .filter(|f| old.files.get(&f.path) != Some(*f))
    {
        db.execute(
            "INSERT INTO config_files (app, path, mode, contents) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (app, path) DO UPDATE SET mode = excluded.mode, contents = excluded.contents",
            args![app, f.path, f.mode, f.contents],
        )?;
    }
    notify_changed(db, app)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::config::tests::set;
    use crate::server::model::config::{Change, DEFAULT_SPLAY, FileSet, ModeJson, PolicyChange};
    use crate::server::store;
    use crate::util;
    use std::time::Duration;

    /// How long the PostgreSQL test waits for a notification that should come.
    const NOTIFY_WAIT: Duration = Duration::from_secs(10);

    /// `update` of "web" with `ch`.
    fn change(db: &mut Db, ch: &Change) -> Update<String> {
        update(db, "web", |cur| ch.apply_to(cur, "web")).unwrap()
    }

    /// `update` of "web" with `ch`, which must change it: the new config.
    fn changed(db: &mut Db, ch: &Change) -> AppConfig {
        match change(db, ch) {
            Update::Changed(c) => c,
            other => panic!("expected a change: {other:?}"),
        }
    }

    /// Sets, overrides, unsets vars, files and the policy of the app "web" (which must exist
    /// with no config) through [`update`], checking what [`load`] and the snapshots return.
    /// Returns how many updates changed the config (each one notification on PostgreSQL).
    fn round_trip(db: &mut Db) -> usize {
        let cur = load(db, "web").unwrap();
        assert_eq!(cur, AppConfig::default());
        assert_eq!(cur.version, 0);
        let new = changed(db, &set(&[("A", "1"), ("B", "2")]));
        assert_eq!(new.version, 1);
        assert_eq!(load(db, "web").unwrap(), new);

        // The same values again: no change, same version.
        match change(db, &set(&[("A", "1")])) {
            Update::Unchanged(c) => assert_eq!(c, new),
            other => panic!("expected no change: {other:?}"),
        }
        // Refused: nothing written.
        let r = update(db, "web", |_| Err::<AppConfig, _>("no")).unwrap();
        assert!(matches!(r, Update::Refused("no")), "{r:?}");
        let r = update(db, "nope", |c| Ok::<_, String>(c.clone())).unwrap();
        assert!(matches!(r, Update::NoApp), "{r:?}");

        // Deployment override, a file, a policy.
        let mut ch = set(&[("A", "blue")]);
        ch.deployment = Some("blue".into());
        changed(db, &ch);
        let ch = Change {
            files: vec![FileSet {
                path: "/etc/x".into(),
                mode: Some(ModeJson::Octal("0640".into())),
                contents_b64: util::base64_encode(b"hi\xff"),
            }],
            unset: vec!["B".into()],
            policy: Some(PolicyChange {
                on_change: Some("signal:hup".into()),
                splay_ms: Some(0),
                stop_grace_ms: None,
            }),
            ..Default::default()
        };
        let f = changed(db, &ch);
        assert_eq!(f.version, 3);
        let loaded = load(db, "web").unwrap();
        assert_eq!(loaded, f);
        let snap = loaded.snapshot("blue");
        assert_eq!(snap.env.get("A").map(String::as_str), Some("blue"));
        assert!(!snap.env.contains_key("B"));
        assert_eq!(
            loaded.snapshot("green").env.get("A").map(String::as_str),
            Some("1")
        );
        assert_eq!(snap.files[0].mode, 0o640);
        assert_eq!(snap.files[0].contents, b"hi\xff");
        assert_eq!(snap.on_change.as_ref().unwrap().signal, "SIGHUP");
        assert_eq!(
            snap.on_change.as_ref().unwrap().action,
            Action::Signal as i32
        );
        assert_eq!(snap.restart_splay_ms, 0);
        assert_eq!(loaded.snapshot("").restart_splay_ms, 0);

        // Unset the file and the override: their rows go.
        let g = changed(
            db,
            &Change {
                unset_files: vec!["/etc/x".into()],
                ..Default::default()
            },
        );
        let mut ch = Change {
            unset: vec!["A".into()],
            ..Default::default()
        };
        ch.deployment = Some("blue".into());
        let h = changed(db, &ch);
        assert_eq!(h.version, 5);
        assert!(g.files.is_empty());
        let loaded = load(db, "web").unwrap();
        assert_eq!(loaded, h);
        assert!(loaded.snapshot("blue").files.is_empty());
        assert_eq!(
            loaded.snapshot("blue").env.get("A").map(String::as_str),
            Some("1")
        );
        assert_eq!(
            load(db, "nope").unwrap().policy.splay_ms(),
            DEFAULT_SPLAY.as_millis() as u32
        );
        5
    }

    #[test]
    fn changes_version_and_persist() {
        let mut db = store::memory();
        store::create_app(&db, "web", 0).unwrap();
        assert_eq!(round_trip(&mut db), 5);
        // Nothing to notify on SQLite, and no error for it.
        notify_changed(&db, "web").unwrap();
    }

    /// The same on PostgreSQL, with the notifications another connection receives: one per
    /// committed change, none for a change rolled back. Runs when WAYPOST_TEST_DATABASE is set
    /// (a base URL, e.g. by scripts/with-postgres.sh).
    #[test]
    fn changes_persist_and_notify_on_postgres() {
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
        assert_eq!(got, vec!["web"; changes]);

        drop((st, listener));
        waypost_testkit::pg::drop_database_at(&url).unwrap();
    }
}
