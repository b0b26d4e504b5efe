//! The server's secrets stay on disk, owner-only, and out of its output; a full disk is visible.
//!
//! - Under umask 022 (the usual default), the data dir is 0700 and every file in it 0600: the
//!   database and its -wal/-shm hold the CA and server private keys. The CLI context file (the
//!   admin token) is 0600 in a 0700 directory. (On PostgreSQL the database is not in the data
//!   dir: the same checks cover what is, and the full-disk test, about the data dir's disk, is
//!   skipped.)
//! - The admin token is not in the server's stdout or stderr when they are not a terminal; it is
//!   in `DATA_DIR/admin-token` (0600) instead.
//! - An existing data dir with a looser mode gets a warning naming it; the server's own files in
//!   it are tightened to 0600; a file of the user's is only named.
//! - When the disk is full, `waypost instances` and `waypost logs` say that the server cannot
//!   store logs (stdout stays parseable), and stop saying it once it can again.
//!
//! Each test sets its own process's umask to 022 before starting the server (nextest runs each
//! test in its own process; under `cargo test` the other tests are not affected by 022 either):
//! the server inherits it, so what is checked is the server's own doing, not the test runner's.

use crate::common::{self, Fake, Server, wait_for};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokio::io::AsyncWriteExt as _;
use waypost_proto::{self as proto, Kind};

fn set_umask_022() {
    // SAFETY: umask(2) only sets the process's file creation mask; no memory is involved.
    unsafe { libc::umask(0o022) };
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every entry under `dir` (recursively) with its mode.
fn walk(dir: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let is_dir = std::fs::symlink_metadata(&p).unwrap().is_dir();
        out.push((p.clone(), mode(&p), is_dir));
        if is_dir {
            out.extend(walk(&p));
        }
    }
    out
}

/// A Fake instance of `app` that sent `lines` log lines (so the database and its WAL are written).
fn log_some_lines(server: &Server, app: &str, lines: usize) {
    let token = server.entrypoint_token(app, None);
    let id = common::new_id();
    rt().block_on(async {
        let (mut f, _) = Fake::welcomed(server, &token, &id).await;
        f.send(Kind::LogBatch(batch(0, lines, 100, "line")).into())
            .await;
        loop {
            match f.recv().await.and_then(|fr| fr.kind) {
                Some(Kind::LogAck(a)) if a.up_to_seq >= lines as u64 => break,
                Some(_) => continue,
                None => panic!("connection closed before the LogAck"),
            }
        }
    });
}

fn batch(first_seq: u64, n: usize, size: usize, tag: &str) -> proto::LogBatch {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    proto::LogBatch {
        first_seq,
        entries: (0..n)
            .map(|i| {
                let mut data = format!("{tag} {} ", first_seq + i as u64).into_bytes();
                // Letters that do not repeat (xorshift): the server deflates log chunks, and a
                // run of one byte would shrink to nothing instead of filling the disk.
                let mut x = first_seq + i as u64 + 1;
                while data.len() < size {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    data.push(b'a' + (x % 26) as u8);
                }
                proto::LogEntry {
                    stream: proto::LogStream::Stdout as i32,
                    timestamp_unix_us: now_us,
                    data,
                    truncated: false,
                }
            })
            .collect(),
        dropped: 0,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// The negative control of the mode checks is the behaviour before the fix: under umask 022,
// SQLite created waypost.db and its -wal/-shm 0644 and the data dir held ca.pem and server.json
// 0644 (written with that explicit mode); the admin token was printed on stdout whatever stdout
// was, so `server.logs()` contained it and no admin-token file existed. Every assertion below
// failed against that; each is an exact mode, so any group/other bit fails it.
#[test]
fn under_umask_022_the_data_dir_is_0700_its_files_0600_and_the_token_stays_out_of_the_output() {
    set_umask_022();
    let server = Server::start(&[]);
    server.create_app("web");
    log_some_lines(&server, "web", 200);
    let data = server.env.data_dir();

    assert_eq!(mode(&data), 0o700, "data dir");
    let entries = walk(&data);
    let names: Vec<String> = entries
        .iter()
        .map(|(p, _, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    // What must be there for the check to mean something: the database with its WAL written
    // (SQLite; on PostgreSQL the database is not in the data dir, and nothing of it may be).
    let sqlite = common::backend() == "sqlite";
    let database = ["waypost.db", "waypost.db-wal", "waypost.db-shm"];
    let others = ["server.json", "server.lock", "ca.pem", "admin-token"];
    for must in others.iter().chain(database.iter().filter(|_| sqlite)) {
        assert!(
            names.iter().any(|n| n == must),
            "{must} missing in {names:?}"
        );
    }
    if sqlite {
        let wal = std::fs::metadata(data.join("waypost.db-wal"))
            .unwrap()
            .len();
        assert!(wal > 0, "the WAL was written");
    } else {
        for f in database {
            assert!(
                !names.iter().any(|n| n == f),
                "{f} on PostgreSQL: {names:?}"
            );
        }
    }
    for (path, m, is_dir) in &entries {
        let want = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(*m, want, "{} has mode {m:04o}", path.display());
    }

    // The CLI context (admin token) is 0600.
    assert_eq!(mode(&server.env.context_path()), 0o600, "context file");

    // The token: in the context and in DATA_DIR/admin-token (0600), never in the output.
    let token = server.admin_token();
    assert!(token.starts_with("wpa_"), "{token}");
    let token_file = data.join("admin-token");
    assert_eq!(mode(&token_file), 0o600);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
    let logs = server.logs();
    assert!(
        !logs.contains(&token),
        "the admin token is in the server's output:\n{logs}"
    );
    // ...which says where it is instead.
    assert!(
        server
            .stdout()
            .contains(&format!("admin token written to {}", token_file.display())),
        "{logs}"
    );
    // A fresh data dir gets no mode warning (the negative control of the next test's warning).
    assert!(!logs.contains("has mode"), "{logs}");

    // A restart: nothing new is minted, the token still is not printed, the modes hold.
    let (code, env) = server.terminate();
    assert_eq!(code, Some(0));
    let server = Server::start_in(env, &[]);
    assert_eq!(server.admin_token(), token);
    assert!(!server.logs().contains(&token), "{}", server.logs());
    for (path, m, is_dir) in walk(&server.env.data_dir()) {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(
            m,
            want,
            "after a restart: {} has mode {m:04o}",
            path.display()
        );
    }
}

/// The default context location (`~/.config/waypost/context.json`): the directories the server
/// creates for it are 0700 and the file 0600 under umask 022 (0755/0644 would be what the umask
/// gives a plain create).
#[test]
fn the_default_context_file_is_0600_in_a_0700_directory() {
    set_umask_022();
    let env = common::Env::new();
    let out = env.root.path().join("server.out");
    let mut child = env
        .command()
        .env_remove("WAYPOST_CONTEXT")
        .args(["server", "run", "--data-dir"])
        .arg(env.data_dir())
        .args(["--control-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .args(["--ingress-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(env.database_args())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(env.root.path().join("server.err")).unwrap())
        .spawn()
        .unwrap();
    let ctx = env.home().join(".config/waypost/context.json");
    wait_for("the default context file", || {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("server exited: {st}");
        }
        (ctx.exists() && env.data_dir().join("server.json").exists()).then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode(&ctx), 0o600);
    assert_eq!(mode(ctx.parent().unwrap()), 0o700);
    assert_eq!(mode(&env.home().join(".config")), 0o700);
    let token: serde_json::Value = serde_json::from_slice(&std::fs::read(&ctx).unwrap()).unwrap();
    let token = token["admin_token"].as_str().unwrap();
    assert!(!std::fs::read_to_string(&out).unwrap().contains(token));
}

#[test]
fn a_loose_existing_data_dir_is_warned_about_and_the_servers_files_are_tightened() {
    set_umask_022();
    let server = Server::start(&[]);
    let (code, env) = server.terminate();
    assert_eq!(code, Some(0));
    let data = env.data_dir();
    // As an older version, a restore or a careless chmod would leave it.
    let chmod = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    // The server's own files to loosen: the database only on SQLite (on PostgreSQL it is not
    // in the data dir).
    let sqlite = common::backend() == "sqlite";
    let own: &[&str] = if sqlite {
        &["waypost.db", "ca.pem"]
    } else {
        &["ca.pem"]
    };
    chmod(&data, 0o755);
    for f in own {
        chmod(&data.join(f), 0o644);
    }
    let notes = data.join("notes.txt");
    std::fs::write(&notes, "the operator's own file\n").unwrap();
    chmod(&notes, 0o644);

    let server = Server::start_in(env, &[]);
    let logs = server.logs();
    let warned = |needle: &str| {
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains(needle) && l.contains("mode"))
    };
    // The directory: a warning naming it and its mode; left as it is.
    assert!(
        warned(&format!("data directory {} has mode 0755", data.display())),
        "{logs}"
    );
    assert_eq!(mode(&data), 0o755);
    // The server's own files: tightened, each named.
    for f in own {
        let p = data.join(f);
        assert!(
            warned(&format!("{} had mode 0644", p.display())),
            "{f}: {logs}"
        );
        assert_eq!(mode(&p), 0o600, "{f}");
    }
    // The user's file: named, not touched.
    assert!(warned(&notes.display().to_string()), "{logs}");
    assert_eq!(mode(&notes), 0o644);
    // Files the server creates now are 0600 even in the loose directory.
    let database: &[&str] = if sqlite {
        &["waypost.db-wal", "waypost.db-shm"]
    } else {
        &[]
    };
    for f in database.iter().chain(&["server.json", "server.lock"]) {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    server.cli(&["app", "list"]).ok();
}

// ---- a full disk -------------------------------------------------------------------------------

/// A tmpfs mounted on a directory of the test's temp dir; unmounted on drop (even on panic),
/// after which the temp dir (whose own clean-up failed on the busy mount point) is removed.
struct Tmpfs {
    at: PathBuf,
    root: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, root: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs {
            at: at.to_path_buf(),
            root: root.to_path_buf(),
        })
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The tmpfs holding the data dir. Big enough for the database with its CA (about 200 KiB) and a
/// few hundred KiB of logs, small enough that the flood below fills it at once.
const SMALL_DISK: &str = "2m";
/// Log data the flood sends: many times the small disk, but little enough that once the disk is
/// grown (and every queued batch is stored) it fits with room to spare.
const FLOOD_BYTES: usize = 8 * 1024 * 1024;
const FLOOD_ENTRY: usize = 4096;
const FLOOD_BATCH: usize = 64;

const WARNING: &str = "warning: the server cannot store logs since";

#[test]
fn a_full_disk_shows_in_instances_and_logs_and_clears_when_space_returns() {
    // SAFETY: geteuid(2) reads a process attribute; no memory is involved.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED a_full_disk_shows_in_instances_and_logs: needs root to mount a tmpfs");
        return;
    }
    if common::backend() == "postgres" {
        eprintln!(
            "skipped on postgres: the full disk is the data dir's, and the database (where logs \
             are stored) is not on it"
        );
        return;
    }
    set_umask_022();
    let env = common::Env::new();
    let root = env.root.path().to_path_buf();
    let disk = match Tmpfs::mount(&env.data_dir(), &root, SMALL_DISK) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED a_full_disk_shows_in_instances_and_logs: mount failed: {e}");
            return;
        }
    };
    let server = Server::start_in(env, &[]);
    let token = server.entrypoint_token("flood", None);

    // Before: intake works, no warning anywhere (the negative control of every check below).
    let before = server.cli(&["instances"]).ok();
    assert!(!before.stderr.contains(WARNING), "{}", before.stderr);
    let v = server.cli(&["instances", "-o", "json"]).ok().json();
    assert_eq!(v["log_intake"]["stalled"], false, "{v}");

    // A follower (`logs -f`) is told when intake stalls and when it resumes.
    let follow_err = root.join("follow.err");
    let mut follower = server
        .env
        .command()
        .args(["logs", "--app", "flood", "-f", "-o", "json"])
        .stdout(std::fs::File::create(root.join("follow.out")).unwrap())
        .stderr(std::fs::File::create(&follow_err).unwrap())
        .spawn()
        .unwrap();
    let follower_said = |what: &str| {
        std::fs::read_to_string(&follow_err)
            .unwrap_or_default()
            .contains(what)
    };

    // An instance floods logs until the disk is full (and then its connection stops being read:
    // the writer keeps the batches it could not store and pushes back).
    let rt = rt();
    let id = common::new_id();
    let (fake, _) = rt.block_on(Fake::welcomed(&server, &token, &id));
    let batches = FLOOD_BYTES / (FLOOD_ENTRY * FLOOD_BATCH);
    let flood = rt.spawn(async move {
        let mut fake = fake;
        let mut seq = 0u64;
        for _ in 0..batches {
            let b = batch(seq, FLOOD_BATCH, FLOOD_ENTRY, "flood");
            let mut bytes = Vec::new();
            proto::encode(&Kind::LogBatch(b).into(), &mut bytes).unwrap();
            if fake.stream.write_all(&bytes).await.is_err() {
                return (None, seq);
            }
            seq += FLOOD_BATCH as u64;
        }
        let _ = fake.stream.flush().await;
        (Some(fake), seq)
    });

    // `instances`: the table still prints, one warning line on stderr.
    let run = wait_for("`instances` to warn that logs cannot be stored", || {
        let r = server.cli(&["instances"]);
        r.stderr.contains(WARNING).then_some(r)
    });
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.starts_with("ID "), "{}", run.stdout);
    assert!(
        run.stderr.contains("database or disk is full"),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.lines().filter(|l| l.contains(WARNING)).count(),
        1
    );
    eprintln!(
        "`instances` while the disk is full:\n{}{}",
        run.stdout, run.stderr
    );
    // JSON stays JSON, with the state in it.
    let run = server.cli(&["instances", "-o", "json"]).ok();
    assert!(run.stderr.contains(WARNING), "{}", run.stderr);
    let v = run.json();
    assert_eq!(v["log_intake"]["stalled"], true, "{v}");
    assert!(v["log_intake"]["since"].as_str().is_some(), "{v}");
    // `logs`: the same warning; every stdout line is still a row.
    let run = server
        .cli(&["logs", "--app", "flood", "--tail", "5", "-o", "json"])
        .ok();
    assert!(run.stderr.contains(WARNING), "{}", run.stderr);
    assert!(
        run.stderr.contains("database or disk is full"),
        "{}",
        run.stderr
    );
    for line in run.stdout.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(row["seq"].is_u64(), "{line}");
    }
    let run = server.cli(&["logs", "--app", "flood", "--tail", "1"]).ok();
    assert!(run.stderr.contains(WARNING), "{}", run.stderr);
    wait_for("the follower's warning", || {
        follower_said(WARNING).then_some(())
    });

    // Space returns: the queued batches are stored, the warning goes away.
    disk.resize("512m");
    wait_for("`instances` to stop warning", || {
        let r = server.cli(&["instances"]);
        (r.code == Some(0) && !r.stderr.contains(WARNING)).then_some(())
    });
    let v = server.cli(&["instances", "-o", "json"]).ok().json();
    assert_eq!(v["log_intake"]["stalled"], false, "{v}");
    wait_for("the follower to hear that logs are stored again", || {
        follower_said("stores logs again").then_some(())
    });
    let (fake, sent) = rt
        .block_on(async { tokio::time::timeout(common::WAIT, flood).await })
        .expect("the flood to be taken once the disk has room")
        .unwrap();

    // Later lines are stored: one more batch, on the same connection (after the flood, in
    // order) or, had the server dropped it meanwhile, a new one.
    let all_flood_sent = fake.is_some();
    rt.block_on(async {
        let (mut f, next) = match fake {
            Some(f) => (f, sent),
            None => {
                let (f, w) = Fake::welcomed(&server, &token, &id).await;
                (f, w.log_acked_seq)
            }
        };
        f.send(Kind::LogBatch(batch(next, 1, 10, "after-the-disk-was-full")).into())
            .await;
        loop {
            match f.recv().await.and_then(|fr| fr.kind) {
                Some(Kind::LogAck(a)) if a.up_to_seq > next => break,
                Some(_) => continue,
                None => panic!("connection closed before the ack of the line after"),
            }
        }
    });
    let run = server.cli(&["logs", "--app", "flood", "--tail", "3"]).ok();
    assert!(!run.stderr.contains(WARNING), "{}", run.stderr);
    assert!(
        run.stdout.contains("after-the-disk-was-full"),
        "{}",
        run.stdout
    );
    // Nothing of the flood was lost: every entry up to the last is stored (no loss marker).
    let stats = server
        .cli(&["logs", "--app", "flood", "--stats", "-o", "json"])
        .ok()
        .json();
    eprintln!("after the disk was grown: {stats}");
    let inst = &stats["instances"][0];
    assert_eq!(inst["lost"], 0, "{stats}");
    if all_flood_sent {
        assert_eq!(inst["next_seq"].as_u64(), Some(sent + 1), "{stats}");
    }
    // The follower's stdout was rows only, through the stall and after it.
    let out = wait_for("the follower to show the line after", || {
        let out = std::fs::read_to_string(root.join("follow.out")).unwrap();
        out.contains("after-the-disk-was-full").then_some(out)
    });
    let _ = follower.kill();
    let _ = follower.wait();
    for line in out.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(row["seq"].is_u64(), "{line}");
    }
    drop(server);
    drop(disk);
}
