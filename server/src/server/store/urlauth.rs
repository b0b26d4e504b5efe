//! The `url_auth` table: each app's URL access control as one document (model/urlauth.rs).
//! Changes are announced on the config channel (payload [`CHANGED_PREFIX`] + app) so every
//! replica's ingress drops its cached copy.

use super::{Begin, Db, args};
use crate::server::model::urlauth::UrlAuth;
use anyhow::{Context as _, Result};

/// Notification payload prefix on [`super::CONFIG_CHANNEL`]: `@urlauth:APP`.
pub const CHANGED_PREFIX: &str = "@urlauth:";

/// The app's access control (open when nothing is stored).
pub fn get(db: &Db, app: &str) -> Result<UrlAuth> {
    match db.query_opt("SELECT doc FROM url_auth WHERE app = ?1", args![app])? {
        None => Ok(UrlAuth::default()),
        Some(r) => {
            let doc: String = r.get(0)?;
            serde_json::from_str(&doc).context("a stored URL access control is unreadable")
        }
    }
}

/// Changes the app's access control with `f` (in one transaction), stores it (an open one as
/// no row) and announces it. Returns what `f` returned.
pub fn update<R>(
    db: &mut Db,
    app: &str,
    f: impl FnOnce(&mut UrlAuth) -> Result<R, String>,
) -> Result<Result<(UrlAuth, R), String>> {
    db.transaction(Begin::Immediate, |db| {
        let mut auth = get(db, app)?;
        let r = match f(&mut auth) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        if auth.is_open() {
            db.execute("DELETE FROM url_auth WHERE app = ?1", args![app])?;
        } else {
            db.execute(
                "INSERT INTO url_auth (app, doc) VALUES (?1, ?2)
                 ON CONFLICT (app) DO UPDATE SET doc = excluded.doc",
                args![app, serde_json::to_string(&auth)?],
            )?;
        }
        super::config::notify_changed(db, &format!("{CHANGED_PREFIX}{app}"))?;
        Ok(Ok((auth, r)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::urlauth::Cidr;
    use crate::server::store;

    #[test]
    fn round_trip_and_open_means_no_row() {
        let mut db = store::memory();
        assert!(get(&db, "web").unwrap().is_open());
        let (a, ()) = update(&mut db, "web", |a| a.add_cidr(Cidr::parse("10.0.0.0/8")?))
            .unwrap()
            .unwrap();
        assert_eq!(get(&db, "web").unwrap(), a);
        let refused = update(&mut db, "web", |_| Err::<(), _>("no".to_string())).unwrap();
        assert_eq!(refused.unwrap_err(), "no");
        assert_eq!(
            get(&db, "web").unwrap(),
            a,
            "a refused change writes nothing"
        );
        update(&mut db, "web", |a| {
            *a = UrlAuth::default();
            Ok(())
        })
        .unwrap()
        .unwrap();
        let rows = db.query_opt("SELECT app FROM url_auth", &[]).unwrap();
        assert!(rows.is_none());
    }
}
