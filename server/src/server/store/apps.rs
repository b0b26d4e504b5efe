//! Deleting an app (`waypost app delete`, `DELETE /v1/apps/{name}`): the app and everything of
//! it, in one transaction, on either backend. A table that gains an `app` column (or an app
//! `scope`) must be added to [`delete_app`]; the test `nothing_of_a_deleted_app_is_left` lists
//! every such table of the schema and fails on any it does not clear.

use super::{Backend, Begin, Db, args};
use crate::server::model::config::ScopeConfig;
use anyhow::Result;

/// What [`delete_app`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteApp {
    /// No app of that name.
    NoApp,
    /// Refused (nothing written): this many of its instances are live, on any replica, and the
    /// delete was not forced.
    Live(u64),
    /// Deleted; what went with it.
    Deleted(Deleted),
}

/// Counts of what a delete removed, for the API's answer and the server's log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Deleted {
    pub tokens: u64,
    /// Instance rows, live (forced) and gone.
    pub instances: u64,
    /// Of those, live when deleted (forced).
    pub live_instances: u64,
    /// Log lines, markers included (the app's usage counter before the delete).
    pub log_lines: u64,
    pub config_versions: u64,
    pub config_sources: u64,
    /// The app's custom domains (their certificates with them).
    pub domains: Vec<String>,
    pub url_auth: bool,
}

/// Live instances of `app` on any replica (rows not yet disconnected).
pub fn live_instances(db: &Db, app: &str) -> Result<u64> {
    let n: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM instances WHERE app = ?1 AND disconnected_at IS NULL",
            args![app],
        )?
        .get(0)?;
    Ok(n as u64)
}

/// Deletes `app` and everything of it in one transaction: its entrypoint tokens, instance rows
/// (history included), logs (chunks, old line rows, sources, usage, retention), URL access
/// control, custom domains, app-scoped config sources and config history. Refused while
/// instances are live unless `force` (the caller closes the connections it holds first).
///
/// The app's config scope row is not removed but emptied at the next version: every replica's
/// config cache takes a scope only at a higher version than it has (service/config.rs
/// `reload`), so an emptied one reaches them all through the usual announcement, where a
/// missing row (version 0) would leave the old definitions cached — and given to an app created
/// later under the same name. Versions of a scope keep growing, as they always do.
///
/// Every change is announced as the store's other writers announce theirs (PostgreSQL
/// notifications, delivered at commit), so other replicas drop their cached copies.
pub fn delete_app(db: &mut Db, app: &str, force: bool) -> Result<DeleteApp> {
    // IMMEDIATE: the live count and the delete are one step; an instance admitted in between
    // would otherwise be deleted unannounced by a delete that was not forced.
    db.transaction(Begin::Immediate, |db| {
        if !super::app_exists(db, app)? {
            return Ok(DeleteApp::NoApp);
        }
        let live = live_instances(db, app)?;
        if live > 0 && !force {
            return Ok(DeleteApp::Live(live));
        }
        let count = |sql: &str| -> Result<u64> { Ok(db.execute(sql, args![app])? as u64) };
        let log_lines: i64 = db
            .query_opt("SELECT lines FROM log_usage WHERE app = ?1", args![app])?
            .map(|r| r.get(0))
            .transpose()?
            .unwrap_or(0);
        let mut d = Deleted {
            live_instances: live,
            log_lines: log_lines.max(0) as u64,
            ..Deleted::default()
        };
        d.tokens = count("DELETE FROM tokens WHERE app = ?1 AND kind = 'entrypoint'")?;
        if d.tokens > 0 {
            // Other replicas close their connections with them (server/mod.rs).
            super::config::notify_changed(db, super::config::TOKENS_CHANGED)?;
        }
        d.instances = count("DELETE FROM instances WHERE app = ?1")?;
        // Logs: in the order the log writer touches them (chunks, sources, usage), so on
        // PostgreSQL a concurrent commit of the writer waits for this one rather than deadlocks.
        count("DELETE FROM log_chunks WHERE app = ?1")?;
        count("DELETE FROM log_lines WHERE app = ?1")?;
        count("DELETE FROM log_sources WHERE app = ?1")?;
        count("DELETE FROM log_usage WHERE app = ?1")?;
        count("DELETE FROM log_settings WHERE app = ?1")?;
        d.url_auth = count("DELETE FROM url_auth WHERE app = ?1")? > 0;
        // Explicitly, though the foreign key cascades: the notifications need the names.
        d.domains = db
            .query(
                "DELETE FROM domains WHERE app = ?1 RETURNING domain",
                args![app],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect::<Result<_>>()?;
        d.domains.sort();
        d.config_versions = count("DELETE FROM config_history WHERE scope = ?1")?;
        d.config_sources = count("DELETE FROM config_sources WHERE scope = ?1")?;
        let emptied = db.execute(
            "UPDATE config_scopes SET version = version + 1, epoch = 0, doc = ?2 WHERE scope = ?1",
            args![app, ScopeConfig::default().to_doc()],
        )?;
        db.execute("DELETE FROM apps WHERE name = ?1", args![app])?;
        // Announcements (PostgreSQL only; delivered when this commits).
        if emptied > 0 {
            super::config::notify_changed(db, app)?;
        }
        if d.config_sources > 0 {
            super::config::notify_changed(db, super::config::SOURCES_CHANGED)?;
        }
        if d.url_auth {
            super::config::notify_changed(db, &format!("{}{app}", super::urlauth::CHANGED_PREFIX))?;
        }
        if db.backend() == Backend::Postgres {
            for domain in &d.domains {
                db.execute(
                    "SELECT pg_notify(?1, ?2)",
                    args![super::domains::DOMAINS_CHANNEL, domain],
                )?;
            }
        }
        Ok(DeleteApp::Deleted(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::{Connected, TokenScope};
    use crate::server::store::{self, Location, Store};

    fn connected(id: &str, app: &str, token: &str) -> Connected {
        Connected {
            id: id.into(),
            app: app.into(),
            deployment: String::new(),
            hostname: "h".into(),
            entrypoint_pid: 1,
            entrypoint_version: "0.1.0".into(),
            session: 1,
            token_hash: token.into(),
        }
    }

    /// Two apps with a bit of everything; `web` gets deleted, `api` must stay whole.
    fn populate(db: &mut Db) {
        for app in ["web", "api"] {
            store::create_app(db, app, 1).unwrap();
            let scope = TokenScope::Entrypoint {
                app: app.into(),
                deployment: None,
            };
            store::insert_token(db, &format!("tok-{app}"), &scope, 1).unwrap();
            store::upsert_connected(
                db,
                &connected(&format!("1d-{app}"), app, &format!("tok-{app}")),
                None,
                2,
            )
            .unwrap()
            .unwrap();
            for sql in [
                "INSERT INTO log_sources (instance, app) VALUES ('1d-' || ?1, ?1)",
                "INSERT INTO log_chunks (first_id, last_id, app, src, first_seq, last_seq, \
                 min_ts_us, max_ts_us, lines, bytes, streams, data) \
                 SELECT COALESCE(MAX(first_id), 0) + 1, COALESCE(MAX(first_id), 0) + 1, ?1, \
                 (SELECT id FROM log_sources WHERE app = ?1), 0, 0, 1, 1, 1, 3, 1, 'abc' \
                 FROM log_chunks",
                "INSERT INTO log_usage (app, lines, bytes) VALUES (?1, 1, 3)",
                "INSERT INTO log_settings (app, max_lines, max_bytes) VALUES (?1, 10, 10)",
                "INSERT INTO url_auth (app, doc) VALUES (?1, '{}')",
                "INSERT INTO domains (domain, app, cert_pem, key_pem, subject, not_after, \
                 created_at) VALUES (?1 || '.example.com', ?1, 'c', 'k', 's', 1, 1)",
                "INSERT INTO log_lines (app, src, seq, stream, ts_us, data) \
                 VALUES (?1, 0, 0, 0, 1, 'old')",
                "INSERT INTO config_history (scope, version, at_ms, summary, doc) \
                 VALUES (?1, 3, 1, 's', '{}')",
                "INSERT INTO config_sources (scope, name, kind, addr, auth, refresh_ms, \
                 created_at) VALUES (?1, 'vault', 'openbao', 'http://x', '{}', 1, 1)",
            ] {
                db.execute(sql, args![app]).unwrap();
            }
            db.execute(
                "INSERT INTO config_scopes (scope, version, epoch, doc) VALUES (?1, 3, 2, ?2)",
                args![app, ScopeConfig::default().to_doc()],
            )
            .unwrap();
        }
    }

    /// Every table with an `app` or `scope` column, from the schema itself.
    fn app_tables(db: &Db) -> Vec<(String, String)> {
        let sql = match db.backend() {
            Backend::Sqlite => {
                "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p \
                 WHERE m.type = 'table' AND p.name IN ('app', 'scope') ORDER BY 1"
            }
            Backend::Postgres => {
                "SELECT table_name::text, column_name::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND column_name IN ('app', 'scope') \
                 ORDER BY 1"
            }
        };
        db.query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0).unwrap(), r.get(1).unwrap()))
            .collect()
    }

    fn rows_of(db: &Db, table: &str, col: &str, app: &str) -> i64 {
        db.query_one(
            &format!("SELECT COUNT(*) FROM {table} WHERE {col} = ?1"),
            args![app],
        )
        .unwrap()
        .get(0)
        .unwrap()
    }

    fn check(location: &Location) {
        let st = Store::open(location).unwrap();
        st.with(|db| {
            populate(db);
            let tables = app_tables(db);
            assert!(tables.len() >= 10, "{tables:?}");
            let api_before: Vec<i64> = tables
                .iter()
                .map(|(t, c)| rows_of(db, t, c, "api"))
                .collect();
            // A live instance refuses an unforced delete, and nothing is written.
            assert_eq!(delete_app(db, "web", false)?, DeleteApp::Live(1));
            assert!(store::app_exists(db, "web")?);
            assert_eq!(rows_of(db, "log_chunks", "app", "web"), 1);
            assert_eq!(delete_app(db, "nope", true)?, DeleteApp::NoApp);

            let DeleteApp::Deleted(d) = delete_app(db, "web", true)? else {
                panic!("not deleted");
            };
            assert_eq!(
                d,
                Deleted {
                    tokens: 1,
                    instances: 1,
                    live_instances: 1,
                    log_lines: 1,
                    config_versions: 1,
                    config_sources: 1,
                    domains: vec!["web.example.com".into()],
                    url_auth: true,
                }
            );
            assert!(!store::app_exists(db, "web")?);
            assert_eq!(store::lookup_token(db, "tok-web")?, None);
            for ((table, col), api_before) in tables.iter().zip(api_before) {
                let left = rows_of(db, table, col, "web");
                let api = rows_of(db, table, col, "api");
                assert_eq!(api, api_before, "{table}: the other app's rows changed");
                if table == "config_scopes" {
                    // Emptied at the next version, so caches take it (see delete_app).
                    let cfg = store::config::load(db, "web")?;
                    assert_eq!(cfg.version, 4);
                    assert!(cfg.same_definitions(&ScopeConfig::default()));
                    assert_eq!(left, 1);
                } else {
                    assert_eq!(left, 0, "{table}.{col} still has rows of the deleted app");
                }
            }
            // Created again: it starts empty.
            assert!(store::create_app(db, "web", 5)?);
            assert!(store::list_instances(db, Some("web"), true)?.is_empty());
            assert!(store::list_tokens(db, Some("web"))?.is_empty());
            assert!(store::config::history(db, "web")?.is_empty());
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn nothing_of_a_deleted_app_is_left() {
        let dir = tempfile::tempdir().unwrap();
        check(&Location::Sqlite(dir.path().join("t.db")));
    }

    /// The same on PostgreSQL when WAYPOST_TEST_DATABASE names a cluster (scripts/with-postgres.sh).
    #[test]
    fn nothing_of_a_deleted_app_is_left_on_postgres() {
        let Ok(base) = std::env::var("WAYPOST_TEST_DATABASE") else {
            println!("skipped: WAYPOST_TEST_DATABASE unset");
            return;
        };
        let url = waypost_testkit::pg::create_database_at(&base);
        check(&Location::Postgres(url.clone()));
        let _ = waypost_testkit::pg::drop_database_at(&url);
    }
}
