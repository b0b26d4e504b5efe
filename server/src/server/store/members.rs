//! Replica membership rows (`replicas`, migration 6), on either backend.

use super::{Db, args};
use crate::server::model::members::{RemoteInstance, ReplicaRow};
use anyhow::Result;

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
    db.execute(
        "INSERT INTO replicas (id, peer_addr, version, started_at, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET peer_addr = excluded.peer_addr,
             version = excluded.version, last_seen = excluded.last_seen",
        args![id, peer_addr, version, started_at, now],
    )?;
    Ok(())
}

/// A clean shutdown: the replica is gone, not stale.
pub fn remove_replica(db: &Db, id: &str) -> Result<()> {
    db.execute("DELETE FROM replicas WHERE id = ?1", args![id])?;
    Ok(())
}

/// Deletes the rows of replicas last seen before `before` (unix ms); returns how many.
pub fn prune_replicas(db: &Db, before: i64) -> Result<usize> {
    db.execute("DELETE FROM replicas WHERE last_seen < ?1", args![before])
}

/// Every replica, oldest start first, with the number of live instances it holds.
pub fn list_replicas(db: &Db) -> Result<Vec<ReplicaRow>> {
    db.query(
        "SELECT r.id, r.peer_addr, r.version, r.started_at, r.last_seen,
             (SELECT COUNT(*) FROM instances i WHERE i.replica = r.id AND i.disconnected_at IS NULL)
         FROM replicas r ORDER BY r.started_at, r.id",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(ReplicaRow {
            id: r.get(0)?,
            peer_addr: r.get(1)?,
            version: r.get(2)?,
            started_at: r.get(3)?,
            last_seen: r.get(4)?,
            instances: r.get::<i64>(5)? as u64,
        })
    })
    .collect()
}

/// Most [`remote_instances`] returns.
const REMOTE_LIMIT: i64 = 16;

/// The LIKE pattern for instance ids starting with `prefix` (Some(None): any id). Ids are hex: a
/// prefix with anything else matches nothing (None), and LIKE wildcards never get in.
fn id_pattern(prefix: Option<&str>) -> Option<Option<String>> {
    match prefix {
        Some(p) if !p.bytes().all(|b| b.is_ascii_hexdigit()) => None,
        Some(p) => Some(Some(format!("{}%", p.to_ascii_lowercase()))),
        None => Some(None),
    }
}

/// Live instances of `app` (hex id starting with `prefix`, if given: hex digits only) whose
/// connection is held by a replica other than `me` that was seen at or after `fresh_after` (unix
/// ms) and has a peer address; the most recently connected first.
pub fn remote_instances(
    db: &Db,
    app: &str,
    prefix: Option<&str>,
    me: &str,
    fresh_after: i64,
) -> Result<Vec<RemoteInstance>> {
    let Some(pattern) = id_pattern(prefix) else {
        return Ok(Vec::new());
    };
    db.query(
        "SELECT i.id, r.id, r.peer_addr FROM instances i JOIN replicas r ON r.id = i.replica
         WHERE i.app = ?1 AND i.disconnected_at IS NULL AND r.id <> ?2 AND r.last_seen >= ?3
           AND r.peer_addr IS NOT NULL AND (CAST(?4 AS TEXT) IS NULL OR i.id LIKE ?4)
         ORDER BY i.connected_at DESC, i.id LIMIT ?5",
        args![app, me, fresh_after, pattern, REMOTE_LIMIT],
    )?
    .iter()
    .map(|r| {
        Ok(RemoteInstance {
            id: r.get(0)?,
            replica: r.get(1)?,
            peer_addr: r.get(2)?,
        })
    })
    .collect()
}

/// The replicas (id, peer address) other than `me` that hold live instances of `app` (hex id
/// starting with `prefix`, if given) and can be reached: beating since `fresh_after`, with a peer
/// address. For an operation on every such instance (restart, signal), unlike
/// [`remote_instances`] (one to pick), so no limit but the number of replicas.
pub fn replicas_holding(
    db: &Db,
    app: &str,
    prefix: Option<&str>,
    me: &str,
    fresh_after: i64,
) -> Result<Vec<(String, String)>> {
    let Some(pattern) = id_pattern(prefix) else {
        return Ok(Vec::new());
    };
    db.query(
        "SELECT DISTINCT r.id, r.peer_addr FROM instances i JOIN replicas r ON r.id = i.replica
         WHERE i.app = ?1 AND i.disconnected_at IS NULL AND r.id <> ?2 AND r.last_seen >= ?3
           AND r.peer_addr IS NOT NULL AND (CAST(?4 AS TEXT) IS NULL OR i.id LIKE ?4)
         ORDER BY r.id",
        args![app, me, fresh_after, pattern],
    )?
    .iter()
    .map(|r| Ok((r.get(0)?, r.get(1)?)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::model::ChildStatus;
    use crate::server::store::{Connected, create_app, mark_disconnected, upsert_connected_on};

    #[test]
    fn replicas_register_count_their_instances_and_leave() {
        let mut c = crate::server::store::memory();
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
        // Where r2 finds web's instances: r1's live one ("b" is gone); r2 has no peer address,
        // so r1 finds none; a stale r1 (seen before 301) is not offered; prefixes filter.
        let ids = |v: Vec<RemoteInstance>| -> Vec<(String, String)> {
            v.into_iter().map(|r| (r.id, r.peer_addr)).collect()
        };
        let want = vec![("a".to_string(), "10.0.0.1:9703".to_string())];
        assert_eq!(
            ids(remote_instances(&c, "web", None, "r2", 300).unwrap()),
            want
        );
        assert_eq!(
            ids(remote_instances(&c, "web", Some("A"), "r2", 300).unwrap()),
            want
        );
        assert!(
            remote_instances(&c, "web", Some("b"), "r2", 300)
                .unwrap()
                .is_empty()
        );
        assert!(
            remote_instances(&c, "web", Some("%"), "r2", 300)
                .unwrap()
                .is_empty()
        );
        assert!(
            remote_instances(&c, "web", None, "r1", 0)
                .unwrap()
                .is_empty()
        );
        assert!(
            remote_instances(&c, "web", None, "r2", 301)
                .unwrap()
                .is_empty()
        );
        assert!(
            remote_instances(&c, "other", None, "r2", 0)
                .unwrap()
                .is_empty()
        );
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
        // Leases: r2 stopped beating at 200; r1 (at 300) expires what r2 held, never its own.
        use crate::server::store::{expire_leases, list_instances};
        assert_eq!(expire_leases(&c, "r1", 250, 400).unwrap(), 1);
        let live: Vec<_> = list_instances(&c, None, false)
            .unwrap()
            .into_iter()
            .map(|i| (i.id, i.replica))
            .collect();
        assert_eq!(live, [("a".to_string(), Some("r1".to_string()))]);
        let gone = list_instances(&c, None, true).unwrap();
        let c_row = gone.iter().find(|i| i.id == "c").unwrap();
        assert_eq!(
            (c_row.ended.as_deref(), c_row.disconnected_at),
            (Some("lost"), Some(400))
        );
        assert_eq!(expire_leases(&c, "r1", 250, 500).unwrap(), 0, "once");
        // A replica that is gone from the table altogether loses its instances too.
        assert_eq!(
            expire_leases(&c, "r2", 0, 600).unwrap(),
            0,
            "r1 is fresh at 300 >= 0"
        );
        remove_replica(&c, "r1").unwrap();
        assert_eq!(
            expire_leases(&c, "r2", 0, 700).unwrap(),
            1,
            "r1's row is gone"
        );
        upsert_replica(&c, "r1", Some("10.0.0.1:9703"), "1.0", 100, 300).unwrap();
        assert_eq!(prune_replicas(&c, 250).unwrap(), 1);
        remove_replica(&c, "r1").unwrap();
        assert!(list_replicas(&c).unwrap().is_empty());
    }
}
