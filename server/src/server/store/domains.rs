//! Custom domains (`domains`, migration 11), on either backend. A change is announced on
//! [`DOMAINS_CHANNEL`] (PostgreSQL) in its transaction, so every replica's HTTPS ingress reloads
//! its table (transport/ingress_tls.rs).

use super::{Backend, Begin, Db, args};
use crate::server::model::domains::DomainRow;
use anyhow::Result;

/// The PostgreSQL channel domain changes are announced on (payload: the domain).
pub const DOMAINS_CHANNEL: &str = "waypost_domains";

/// What [`add`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// A new domain.
    New,
    /// The domain was the app's already: its certificate and key were replaced.
    Replaced,
    /// No app of that name.
    NoApp,
    /// The domain belongs to this other app (nothing written).
    TakenBy(String),
}

/// Adds `row.domain` to `row.app`, or replaces its certificate if it is that app's already.
pub fn add(db: &mut Db, row: &DomainRow) -> Result<Added> {
    db.transaction(Begin::Immediate, |db| {
        if !super::app_exists(db, &row.app)? {
            return Ok(Added::NoApp);
        }
        let owner: Option<String> = db
            .query_opt(
                "SELECT app FROM domains WHERE domain = ?1",
                args![row.domain],
            )?
            .map(|r| r.get(0))
            .transpose()?;
        match owner {
            Some(other) if other != row.app => return Ok(Added::TakenBy(other)),
            _ => {}
        }
        // The WHERE keeps another app's row even if one appeared since the read (PostgreSQL's
        // read committed): then nothing is written and the owner is reported.
        let n = db.execute(
            "INSERT INTO domains (domain, app, cert_pem, key_pem, subject, not_after, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (domain) DO UPDATE SET cert_pem = excluded.cert_pem,
                 key_pem = excluded.key_pem, subject = excluded.subject,
                 not_after = excluded.not_after, created_at = excluded.created_at
             WHERE domains.app = excluded.app",
            args![
                row.domain,
                row.app,
                row.cert_pem,
                row.key_pem,
                row.subject,
                row.not_after,
                row.created_at
            ],
        )?;
        if n == 0 {
            let owner: String = db
                .query_opt(
                    "SELECT app FROM domains WHERE domain = ?1",
                    args![row.domain],
                )?
                .map(|r| r.get(0))
                .transpose()?
                .unwrap_or_default();
            return Ok(Added::TakenBy(owner));
        }
        notify_changed(db, &row.domain)?;
        Ok(if owner.is_some() {
            Added::Replaced
        } else {
            Added::New
        })
    })
}

/// Every custom domain (of `app`, if given), by domain.
pub fn list(db: &Db, app: Option<&str>) -> Result<Vec<DomainRow>> {
    db.query(
        "SELECT domain, app, cert_pem, key_pem, subject, not_after, created_at FROM domains
         WHERE CAST(?1 AS TEXT) IS NULL OR app = ?1 ORDER BY domain",
        args![app],
    )?
    .iter()
    .map(|r| {
        Ok(DomainRow {
            domain: r.get(0)?,
            app: r.get(1)?,
            cert_pem: r.get(2)?,
            key_pem: r.get(3)?,
            subject: r.get(4)?,
            not_after: r.get(5)?,
            created_at: r.get(6)?,
        })
    })
    .collect()
}

/// Removes a custom domain; returns the app it belonged to (None: there was no such domain).
pub fn remove(db: &mut Db, domain: &str) -> Result<Option<String>> {
    db.transaction(Begin::Immediate, |db| {
        let app: Option<String> = db
            .query_opt("SELECT app FROM domains WHERE domain = ?1", args![domain])?
            .map(|r| r.get(0))
            .transpose()?;
        if app.is_some() {
            db.execute("DELETE FROM domains WHERE domain = ?1", args![domain])?;
            notify_changed(db, domain)?;
        }
        Ok(app)
    })
}

/// On PostgreSQL a notification on [`DOMAINS_CHANNEL`], delivered when the calling transaction
/// commits; nothing on SQLite (one server per database).
fn notify_changed(db: &Db, domain: &str) -> Result<()> {
    if db.backend() == Backend::Postgres {
        db.execute("SELECT pg_notify(?1, ?2)", args![DOMAINS_CHANNEL, domain])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::{create_app, memory};

    fn row(domain: &str, app: &str, cert: &str) -> DomainRow {
        DomainRow {
            domain: domain.into(),
            app: app.into(),
            cert_pem: cert.into(),
            key_pem: "key".into(),
            subject: "CN=x".into(),
            not_after: 99,
            created_at: 1,
        }
    }

    #[test]
    fn domains_are_added_replaced_refused_for_another_app_and_removed() {
        let mut c = memory();
        create_app(&c, "web", 1).unwrap();
        create_app(&c, "api", 1).unwrap();
        assert_eq!(
            add(&mut c, &row("www.example.test", "nope", "c1")).unwrap(),
            Added::NoApp
        );
        assert_eq!(
            add(&mut c, &row("www.example.test", "web", "c1")).unwrap(),
            Added::New
        );
        assert_eq!(
            add(&mut c, &row("www.example.test", "web", "c2")).unwrap(),
            Added::Replaced
        );
        assert_eq!(
            add(&mut c, &row("www.example.test", "api", "c3")).unwrap(),
            Added::TakenBy("web".into())
        );
        add(&mut c, &row("api.example.test", "api", "c4")).unwrap();
        let all = list(&c, None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].cert_pem, "c2", "replaced, and not by the other app");
        assert_eq!(list(&c, Some("api")).unwrap()[0].domain, "api.example.test");
        assert_eq!(
            remove(&mut c, "www.example.test").unwrap().as_deref(),
            Some("web")
        );
        assert_eq!(remove(&mut c, "www.example.test").unwrap(), None);
        assert_eq!(list(&c, None).unwrap().len(), 1);
    }
}
