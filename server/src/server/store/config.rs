//! The app-configuration tables (`config_apps`, `config_vars`, `config_files`): the model of
//! model/config.rs, loaded and saved row by row.

use super::Db;
use crate::server::model::config::{AppConfig, FileEntry, Policy};
use anyhow::Result;
use rusqlite::{Connection, OptionalExtension as _, params};
use std::collections::BTreeMap;
use waypost_proto::on_change::Action;

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
/// transaction: read, decide, write only the rows that differ.
pub fn update<E>(
    db: &mut Db,
    app: &str,
    change: impl FnOnce(&AppConfig) -> Result<AppConfig, E>,
) -> Result<Update<E>> {
    if !super::app_exists(db, app)? {
        return Ok(Update::NoApp);
    }
    // IMMEDIATE: read then write; deferred, a commit by another connection (the log writer) in
    // between fails the write at once ("database is locked").
    let tx = db
        .conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let cur = load_conn(&tx, app)?;
    let new = match change(&cur) {
        Ok(new) => new,
        Err(e) => return Ok(Update::Refused(e)),
    };
    if new == cur {
        return Ok(Update::Unchanged(cur));
    }
    save(&tx, app, &cur, &new)?;
    tx.commit()?;
    Ok(Update::Changed(new))
}

/// The config of `app` (the default one if nothing was ever set).
pub fn load(db: &Db, app: &str) -> Result<AppConfig> {
    load_conn(&db.conn, app)
}

fn load_conn(conn: &Connection, app: &str) -> Result<AppConfig> {
    let mut cfg = AppConfig::default();
    let row: Option<(i64, String, String, Option<i64>, i64)> = conn
        .query_row(
            "SELECT version, on_change, signal, splay_ms, stop_grace_ms FROM config_apps WHERE app = ?1",
            [app],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    if let Some((version, on_change, signal, splay, grace)) = row {
        cfg.version = version as u64;
        cfg.policy = Policy {
            action: match on_change.as_str() {
                "signal" => Action::Signal,
                "none" => Action::None,
                _ => Action::Restart,
            },
            signal,
            splay_ms: splay.map(|s| s as u32),
            stop_grace_ms: grace as u32,
        };
    }
    let mut stmt = conn.prepare("SELECT deployment, key, value FROM config_vars WHERE app = ?1")?;
    let rows = stmt.query_map([app], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (d, k, v) = row?;
        cfg.vars.entry(d).or_default().insert(k, v);
    }
    let mut stmt = conn.prepare("SELECT path, mode, contents FROM config_files WHERE app = ?1")?;
    let rows = stmt.query_map([app], |r| {
        Ok(FileEntry {
            path: r.get(0)?,
            mode: r.get(1)?,
            contents: r.get(2)?,
        })
    })?;
    for f in rows {
        let f = f?;
        cfg.files.insert(f.path.clone(), f);
    }
    Ok(cfg)
}

/// Writes `new` over `old` (only the rows that differ) with its version.
fn save(conn: &Connection, app: &str, old: &AppConfig, new: &AppConfig) -> Result<()> {
    let p = &new.policy;
    conn.execute(
        "INSERT INTO config_apps (app, version, on_change, signal, splay_ms, stop_grace_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (app) DO UPDATE SET version = excluded.version,
             on_change = excluded.on_change, signal = excluded.signal,
             splay_ms = excluded.splay_ms, stop_grace_ms = excluded.stop_grace_ms",
        params![
            app,
            new.version as i64,
            match p.action {
                Action::Restart => "restart",
                Action::Signal => "signal",
                Action::None => "none",
            },
            p.signal,
            p.splay_ms,
            p.stop_grace_ms
        ],
    )?;
    let empty = BTreeMap::new();
    for (d, vars) in &old.vars {
        let now = new.vars.get(d).unwrap_or(&empty);
        for k in vars.keys().filter(|k| !now.contains_key(*k)) {
            conn.execute(
                "DELETE FROM config_vars WHERE app = ?1 AND deployment = ?2 AND key = ?3",
                params![app, d, k],
            )?;
        }
    }
    for (d, vars) in &new.vars {
        let before = old.vars.get(d).unwrap_or(&empty);
        for (k, v) in vars.iter().filter(|(k, v)| before.get(*k) != Some(*v)) {
            conn.execute(
                "INSERT INTO config_vars (app, deployment, key, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (app, deployment, key) DO UPDATE SET value = excluded.value",
                params![app, d, k, v],
            )?;
        }
    }
    for path in old.files.keys().filter(|p| !new.files.contains_key(*p)) {
        conn.execute(
            "DELETE FROM config_files WHERE app = ?1 AND path = ?2",
            params![app, path],
        )?;
    }
    for f in new
        .files
        .values()
        .filter(|f| old.files.get(&f.path) != Some(*f))
    {
        conn.execute(
            "INSERT INTO config_files (app, path, mode, contents) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (app, path) DO UPDATE SET mode = excluded.mode, contents = excluded.contents",
            params![app, f.path, f.mode, f.contents],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::config::tests::set;
    use crate::server::model::config::{Change, DEFAULT_SPLAY, FileSet, ModeJson, PolicyChange};
    use crate::util;

    fn mem() -> Db {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::server::store::migrate(&mut conn).unwrap();
        let db = Db { conn };
        crate::server::store::create_app(&db, "web", 0).unwrap();
        db
    }

    #[test]
    fn changes_version_and_persist() {
        let c = mem();
        let cur = load(&c, "web").unwrap();
        assert_eq!(cur.version, 0);
        let new = set(&[("A", "1"), ("B", "2")])
            .apply_to(&cur, "web")
            .unwrap();
        assert_eq!(new.version, 1);
        save(&c.conn, "web", &cur, &new).unwrap();
        assert_eq!(load(&c, "web").unwrap(), new);

        // The same values again: no change, same version.
        let same = set(&[("A", "1")]).apply_to(&new, "web").unwrap();
        assert_eq!(same, new);

        // Deployment override, a file, a policy.
        let mut ch = set(&[("A", "blue")]);
        ch.deployment = Some("blue".into());
        let d = ch.apply_to(&new, "web").unwrap();
        save(&c.conn, "web", &new, &d).unwrap();
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
        let f = ch.apply_to(&d, "web").unwrap();
        assert_eq!(f.version, 3);
        save(&c.conn, "web", &d, &f).unwrap();
        let loaded = load(&c, "web").unwrap();
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
        assert_eq!(
            load(&c, "nope").unwrap().policy.splay_ms(),
            DEFAULT_SPLAY.as_millis() as u32
        );
    }
}
