//! `waypost server backup`: a consistent copy of the SQLite database while a server writes to it,
//! through SQLite's online backup API.
//!
//! The source is opened read-only (the server keeps writing through its own connections; in WAL
//! mode a reader never blocks it). The whole database is copied in one backup step, so the copy is
//! one snapshot: an incremental backup would restart every time the server commits between two
//! steps (its heartbeat flush commits every 2 s). The copy is written to a temporary file next to
//! the destination (0600: it holds the CA and server private keys and the token hashes), checked,
//! switched to a rollback journal (one self-contained file) and only then renamed into place, so
//! an interrupted backup never leaves a half-written FILE behind.

use anyhow::{Context as _, Result, bail};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the backup waits for a lock on the source (only a checkpoint or a schema migration
/// holds one long enough to matter).
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// What [`sqlite`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Size of the copy in bytes.
    pub bytes: u64,
    /// The copy's schema version (how many migrations it has; `PRAGMA user_version`).
    pub schema: i64,
}

/// Copies the SQLite database `src` into a new file `dst` (mode 0600), consistent however busy the
/// server is. An existing `dst` is refused unless `overwrite`; `dst` may never be `src` itself.
pub fn sqlite(src: &Path, dst: &Path, overwrite: bool) -> Result<Copied> {
    if !src.is_file() {
        bail!("there is no SQLite database at {}", src.display());
    }
    if dst.exists() {
        if !overwrite {
            bail!(
                "{} already exists; pass --force to replace it",
                dst.display()
            );
        }
        if same_file(src, dst) {
            bail!(
                "{} is the server's own database; back it up to another file",
                dst.display()
            );
        }
    }
    let dir = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // tempfile creates it 0600 (O_EXCL), in the destination's directory so the rename is atomic.
    let tmp = tempfile::Builder::new()
        .prefix(".waypost-backup-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;

    let source = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {} read-only", src.display()))?;
    source.busy_timeout(LOCK_WAIT)?;
    let mut copy = Connection::open(tmp.path())
        .with_context(|| format!("opening {}", tmp.path().display()))?;
    copy_all(&source, &mut copy).with_context(|| format!("copying {}", src.display()))?;
    drop(source);

    // The copy's header says WAL, as the source's does; a rollback journal makes it one file that
    // needs no -wal/-shm next to it (the server switches it back to WAL when it opens it).
    copy.pragma_update(None, "journal_mode", "DELETE")?;
    let check: String = copy.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        bail!(
            "the copy of {} failed SQLite's quick_check: {check}",
            src.display()
        );
    }
    let schema: i64 = copy.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    copy.close()
        .map_err(|(_, e)| e)
        .context("closing the copy")?;

    let file = tmp.as_file();
    file.sync_all()?;
    let bytes = file.metadata()?.len();
    let persisted = if overwrite {
        tmp.persist(dst).map_err(|e| e.error)
    } else {
        // Refuses (atomically) a file created by someone else since the check above.
        tmp.persist_noclobber(dst).map_err(|e| e.error)
    };
    persisted.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
            "{} already exists; pass --force to replace it",
            dst.display()
        ),
        _ => anyhow::Error::new(e).context(format!("writing {}", dst.display())),
    })?;
    // The rename itself durable too.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Copied { bytes, schema })
}

/// Copies every page of `source` into `copy` in one step (one read transaction on the source: a
/// snapshot), waiting while the source is locked.
fn copy_all(source: &Connection, copy: &mut Connection) -> Result<()> {
    let backup = Backup::new(source, copy)?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            // More cannot follow a step of every page, but is harmless to continue from.
            StepResult::More => {}
            StepResult::Busy | StepResult::Locked => {
                if Instant::now() > deadline {
                    bail!("the database stayed locked for {LOCK_WAIT:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => bail!("unexpected result from SQLite's backup step"),
        }
    }
}

/// Whether two existing paths are one file (same device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A WAL database like the server's, with `rows` rows in `t`, kept open (its -wal live).
    fn wal_db(path: &Path, rows: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch("CREATE TABLE t (n INTEGER); PRAGMA user_version = 7;")
            .unwrap();
        for n in 0..rows {
            c.execute("INSERT INTO t VALUES (?1)", [n]).unwrap();
        }
        c
    }

    fn count(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn copies_committed_rows_from_a_live_wal_database_into_a_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("waypost.db");
        // Still open: the rows are in the -wal, not yet in the main file.
        let live = wal_db(&src, 100);
        assert!(dir.path().join("waypost.db-wal").exists());
        let dst = dir.path().join("copy.db");
        let copied = sqlite(&src, &dst, false).unwrap();
        assert_eq!(copied.schema, 7);
        assert_eq!(copied.bytes, std::fs::metadata(&dst).unwrap().len());
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // One self-contained file: readable with nothing next to it, rollback journal.
        assert!(!dir.path().join("copy.db-wal").exists());
        let c = Connection::open(&dst).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        drop(c);
        assert_eq!(count(&dst), 100);
        // No temporary file left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".waypost-backup")
            })
            .collect();
        assert!(left.is_empty(), "{left:?}");
        drop(live);
    }

    #[test]
    fn the_copy_is_one_snapshot_while_a_writer_commits() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("waypost.db");
        let writer = wal_db(&src, 0);
        // Transactions of 50 rows each: any consistent copy holds a multiple of 50.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut writer = writer;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let tx = writer.transaction().unwrap();
                    for n in 0..50 {
                        tx.execute("INSERT INTO t VALUES (?1)", [n]).unwrap();
                    }
                    tx.commit().unwrap();
                }
            })
        };
        let mut seen = Vec::new();
        for i in 0..5 {
            let dst = dir.path().join(format!("copy{i}.db"));
            sqlite(&src, &dst, false).unwrap();
            seen.push(count(&dst));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        assert!(seen.iter().all(|n| n % 50 == 0), "{seen:?}");
        assert!(
            seen.last() > seen.first(),
            "the writer kept writing: {seen:?}"
        );
    }

    #[test]
    fn refuses_an_existing_file_unless_forced_and_never_the_source_itself() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("waypost.db");
        let _live = wal_db(&src, 3);
        let dst = dir.path().join("copy.db");
        std::fs::write(&dst, "keep me").unwrap();
        let err = format!("{:#}", sqlite(&src, &dst, false).unwrap_err());
        assert!(err.contains("already exists; pass --force"), "{err}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");

        sqlite(&src, &dst, true).unwrap();
        assert_eq!(count(&dst), 3);

        let err = format!("{:#}", sqlite(&src, &src, true).unwrap_err());
        assert!(err.contains("the server's own database"), "{err}");
        assert_eq!(count(&src), 3);

        let err = format!(
            "{:#}",
            sqlite(&dir.path().join("none.db"), &dir.path().join("x.db"), false).unwrap_err()
        );
        assert!(err.contains("there is no SQLite database at"), "{err}");
        assert!(!dir.path().join("none.db").exists(), "nothing created");
    }

    #[test]
    fn a_stopped_servers_database_is_copied_and_left_usable_by_its_owner() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("waypost.db");
        // Closed: SQLite checkpoints and removes the -wal/-shm.
        drop(wal_db(&src, 5));
        assert!(!dir.path().join("waypost.db-wal").exists());
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Root backing up a service's database (DynamicUser's uid): the -wal/-shm a read-only
        // connection may leave (it cannot checkpoint them away) must stay the owner's, or the
        // server could no longer open its own database.
        let root = rustix::process::geteuid().is_root();
        let owner = 65534;
        if root {
            std::os::unix::fs::chown(&src, Some(owner), Some(owner)).unwrap();
        }
        let dst = dir.path().join("copy.db");
        sqlite(&src, &dst, false).unwrap();
        assert_eq!(count(&dst), 5);
        for side in ["waypost.db-wal", "waypost.db-shm"] {
            let Ok(meta) = std::fs::metadata(dir.path().join(side)) else {
                continue;
            };
            assert_eq!(meta.mode() & 0o777, 0o600, "{side}");
            if root {
                assert_eq!((meta.uid(), meta.gid()), (owner, owner), "{side}");
            }
        }
        if !root {
            eprintln!("not root: the ownership of the -wal/-shm was not checked");
        }
    }
}
