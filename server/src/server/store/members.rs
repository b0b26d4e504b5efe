//! Replica membership rows (`replicas`, migration 6). Plain SQL: the statements are the same on
//! PostgreSQL.

use super::Db;
use crate::server::model::members::ReplicaRow;
use anyhow::Result;
use rusqlite::params;

/// Inserts this replica's row, or refreshes it (`last_seen`, and the rest as given): the
/// heartbeat calls it too, so a row deleted by another replica's pruning comes back.
pub fn upsert_replica(
    db: &Db,
    id: &str,
    peer_addr: Option<&str>,
    version: &str,
    started_at: i64,
    now: i64,
) -> Result<()> {
    db.conn.execute(
        "INSERT INTO replicas (id, peer_addr, version, started_at, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET peer_addr = excluded.peer_addr,
             version = excluded.version, last_seen = excluded.last_seen",
        params![id, peer_addr, version, started_at, now],
    )?;
    Ok(())
}

/// A clean shutdown: the replica is gone, not stale.
pub fn remove_replica(db: &Db, id: &str) -> Result<()> {
    db.conn
        .execute("DELETE FROM replicas WHERE id = ?1", [id])?;
    Ok(())
}

/// Deletes the rows of replicas last seen before `before` (unix ms); returns how many.
pub fn prune_replicas(db: &Db, before: i64) -> Result<usize> {
    Ok(db
        .conn
        .execute("DELETE FROM replicas WHERE last_seen < ?1", [before])?)
}

/// Every replica, oldest start first, with the number of live instances it holds.
pub fn list_replicas(db: &Db) -> Result<Vec<ReplicaRow>> {
    let mut st = db.conn.prepare(
        "SELECT r.id, r.peer_addr, r.version, r.started_at, r.last_seen,
             (SELECT COUNT(*) FROM instances i WHERE i.replica = r.id AND i.disconnected_at IS NULL)
         FROM replicas r ORDER BY r.started_at, r.id",
    )?;
    let rows = st.query_map([], |r| {
        Ok(ReplicaRow {
            id: r.get(0)?,
            peer_addr: r.get(1)?,
            version: r.get(2)?,
            started_at: r.get(3)?,
            last_seen: r.get(4)?,
            instances: r.get::<_, i64>(5)? as u64,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::ChildStatus;
    use crate::server::store::{Connected, create_app, mark_disconnected, upsert_connected_on};

    #[test]
    fn replicas_register_count_their_instances_and_leave() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::server::store::migrate(&mut conn).unwrap();
        let mut c = Db { conn };
        upsert_replica(&c, "r1", Some("10.0.0.1:9703"), "1.0", 100, 100).unwrap();
        upsert_replica(&c, "r2", None, "1.0", 200, 200).unwrap();
        upsert_replica(&c, "r1", Some("10.0.0.1:9703"), "1.0", 100, 300).unwrap();
        create_app(&c, "web", 1).unwrap();
        for (id, replica) in [("a", "r1"), ("b", "r1"), ("c", "r2")] {
            let conn = Connected {
                id: id.into(),
                app: "web".into(),
                deployment: String::new(),
                hostname: "h".into(),
                entrypoint_pid: 1,
                entrypoint_version: "0".into(),
                session: 1,
                token_hash: "t".into(),
            };
            upsert_connected_on(&mut c, &conn, None, Some(replica), 10)
                .unwrap()
                .unwrap();
        }
        mark_disconnected(&c, "b", 1, 20, &ChildStatus::default(), 20).unwrap();
        let rows = list_replicas(&c).unwrap();
        let got: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.id.as_str(),
                    r.peer_addr.as_deref(),
                    r.last_seen,
                    r.instances,
                )
            })
            .collect();
        assert_eq!(
            got,
            [("r1", Some("10.0.0.1:9703"), 300, 1), ("r2", None, 200, 1)],
            "gone instances are not counted"
        );
        assert_eq!(prune_replicas(&c, 250).unwrap(), 1);
        remove_replica(&c, "r1").unwrap();
        assert!(list_replicas(&c).unwrap().is_empty());
    }
}
