//! The server's control-frame path on arbitrary bytes, synchronously, for the `server_frames`
//! fuzz target (fuzz/fuzz_targets/server_frames.rs) and its regression tests.
//!
//! It uses the server's real pieces wherever they are reachable without a socket: the
//! connection's `control::FrameReader` (fed by an in-memory reader that hands out the bytes in
//! reads of a size the input chooses), the live registry (`live::Registry`: register, touch,
//! apply_status, take_dirty, snapshot_own, remove), the token lookup and the SQLite writes a
//! connection makes (`store::upsert_connected`, `flush_live`, `mark_disconnected`,
//! `list_instances`) and the log service (`logs::LogService`: the Welcome's `log_acked_seq`, and
//! every LogBatch through `on_batch` to its writer thread, which stores and acknowledges it), on
//! a database file of this process. The Hello admission checks are mirrored here (`admit`),
//! kept in step by hand with the server's control session
//! (server/src/server/transport/control/session.rs): protocol version, token scope, a 16-byte
//! instance id, labels cut to `MAX_LABEL` bytes on a character boundary.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use waypost::server::control::FrameReader;
// The server's own cut for host names and versions (`truncate` below mirrors how it cuts).
use waypost::server::control::session::MAX_LABEL;
use waypost::server::live::Registry;
use waypost::server::logs::LogService;
use waypost::server::{auth, store};
use waypost_proto::{self as proto, Frame, Kind};

/// The entrypoint token the fuzz store knows (the seed corpus carries it, so the fuzzer gets past
/// admission).
pub const FUZZ_TOKEN: &str = "wpe_fuzz";
/// The app that token belongs to.
pub const FUZZ_APP: &str = "fuzz";
/// Mirrors `control::OUT_QUEUE`.
const OUT_QUEUE: usize = 64;

/// Hands out `data` in reads of at most `chunk` bytes; never pending.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Polls a future whose I/O never pends to completion on this thread.
fn run_ready<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    // The reader is never pending; a pending future here would be a bug in this harness.
    for _ in 0..4 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
    }
    None
}

/// What every run shares: a runtime for the async pieces, the database (a file: the log
/// service opens its own connections to it), and the real log service with its writer thread.
struct Env {
    rt: tokio::runtime::Runtime,
    store: store::Store,
    /// A connection of this harness's own, for the reset between runs (the store has no
    /// "forget every instance", and the server never needs one).
    raw: rusqlite::Connection,
    logs: LogService,
    /// The database file (the unit tests open it to check what was written).
    #[cfg_attr(not(test), allow(dead_code))]
    path: std::path::PathBuf,
}

/// Log retention of the fuzz app, so a long fuzzing run keeps a small database.
const FUZZ_MAX_LINES: u64 = 20_000;
const FUZZ_MAX_BYTES: u64 = 4 << 20;

fn env() -> &'static Mutex<Env> {
    static ENV: OnceLock<Mutex<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        // Databases of earlier runs whose process is gone.
        let tmp = std::env::temp_dir();
        if let Ok(dir) = std::fs::read_dir(&tmp) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("waypost-wirecheck-") {
                    if !std::path::Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let dir = tmp.join(format!("waypost-wirecheck-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("waypost.db");
        let st = store::Store::open(&path).expect("the fuzz database");
        st.with(|c| {
            store::create_app(c, FUZZ_APP, 0)?;
            let scope = store::TokenScope::Entrypoint {
                app: FUZZ_APP.into(),
                deployment: None,
            };
            store::insert_token(c, &auth::hash_token(FUZZ_TOKEN), &scope, 0)?;
            let retention = waypost::server::model::logs::Retention {
                max_lines: Some(FUZZ_MAX_LINES),
                max_bytes: Some(FUZZ_MAX_BYTES),
            };
            store::logs::set_retention(c, FUZZ_APP, retention)?;
            Ok(())
        })
        .expect("seeding the fuzz database");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let logs = rt
            .block_on(async { LogService::start(&path) })
            .expect("starting the log service");
        let raw = rusqlite::Connection::open(&path).expect("the fuzz database");
        raw.busy_timeout(std::time::Duration::from_secs(10))
            .expect("setting a busy timeout");
        Mutex::new(Env {
            rt,
            store: st,
            raw,
            logs,
            path,
        })
    })
}

/// Mirrors `control::truncate`.
pub fn truncate(mut s: String) -> String {
    if s.len() > MAX_LABEL {
        let mut cut = MAX_LABEL;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Mirrors `control::admit`: Ok((instance id, app, deployment)) or the Reject reason.
pub fn admit(
    st: &store::Store,
    hello: &proto::Hello,
) -> Result<([u8; 16], String, String), proto::reject::Reason> {
    use proto::reject::Reason;
    if hello.protocol_version != proto::PROTOCOL_VERSION {
        return Err(Reason::UnsupportedVersion);
    }
    let hash = auth::hash_token(&hello.token);
    let (app, deployment) = match st.with(|c| store::lookup_token(c, &hash)) {
        Err(_) => return Err(Reason::Unavailable),
        Ok(None) => return Err(Reason::BadToken),
        Ok(Some(store::TokenScope::Admin)) => return Err(Reason::Forbidden),
        Ok(Some(store::TokenScope::Entrypoint { app, deployment })) => {
            (app, deployment.unwrap_or_default())
        }
    };
    let id = <[u8; 16]>::try_from(hello.instance_id.as_slice()).map_err(|_| Reason::Unspecified)?;
    Ok((id, app, deployment))
}

/// What one run saw (for tests).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub frames: usize,
    pub admitted: bool,
    pub rejected: Option<proto::reject::Reason>,
    pub pongs: usize,
    pub statuses: usize,
    pub log_batches: usize,
    /// The Welcome's log_acked_seq (what the log service has of this instance).
    pub welcome_acked: u64,
    /// The stream ended in a decode/read error (the server closes the connection).
    pub error: bool,
}

/// One control connection's worth of bytes from an entrypoint, handled the way
/// `control::connection` handles them. Input: byte 0 = bits 0-6: read size - 1 (1..=128 bytes per
/// read), bit 7: the connection's writer is stuck (never drains the outgoing queue); the rest =
/// the bytes.
pub fn control_frames(data: &[u8]) -> Outcome {
    let Some((&first, wire)) = data.split_first() else {
        return Outcome::default();
    };
    let writer_stuck = first & 0x80 != 0;
    let mut out = Outcome::default();
    let mut reader = FrameReader::new(Chunked {
        data: wire,
        chunk: usize::from(first & 0x7f) + 1,
    });
    // As in `control::connection`: a small first frame until the Hello is admitted.
    reader.set_cap(waypost::server::control::FIRST_FRAME_CAP);
    // Held for the whole run: runs (parallel tests) never interleave on the shared database.
    let env = env().lock().unwrap_or_else(|e| e.into_inner());
    let st = env.store.clone();
    // Every run starts from the same database (one app, one token, no instances), so a failing
    // input reproduces on its own.
    env.raw
        .execute("DELETE FROM instances", [])
        .expect("resetting the fuzz database");

    // ---- Hello ----
    let hello = loop {
        match run_ready(reader.next()) {
            Some(Ok(Some(Frame { kind: None }))) => out.frames += 1,
            Some(Ok(Some(Frame {
                kind: Some(Kind::Hello(h)),
            }))) => {
                out.frames += 1;
                break h;
            }
            Some(Ok(Some(Frame { kind: Some(_) }))) => {
                out.frames += 1;
                out.rejected = Some(proto::reject::Reason::Unspecified);
                return out;
            }
            Some(Ok(None)) => return out,
            Some(Err(_)) => {
                out.error = true;
                return out;
            }
            None => panic!("FrameReader pended on a reader that never pends"),
        }
    };
    let (id, app, deployment) = match admit(&st, &hello) {
        Ok(x) => x,
        Err(reason) => {
            // The Reject must encode (its message is built from the Hello's fields).
            let reject = Kind::Reject(proto::Reject {
                reason: reason as i32,
                message: format!("version {}", hello.protocol_version),
                retry_after_ms: 0,
            });
            proto::encode(&Frame::from(reject), &mut Vec::new()).expect("a Reject encodes");
            out.rejected = Some(reason);
            return out;
        }
    };
    out.admitted = true;
    reader.set_cap(proto::MAX_FRAME);

    // ---- register, record, welcome ----
    let registry = Registry::default();
    let session = i64::from_le_bytes(id[..8].try_into().expect("8 bytes"));
    let (tx, mut rx) = mpsc::channel::<Frame>(OUT_QUEUE);
    let _kick = registry
        .register(
            id,
            session,
            waypost::server::live::Owner {
                app: app.clone(),
                deployment: deployment.clone(),
                token_hash: String::new(),
            },
            tx.clone(),
            0,
        )
        .expect("a fresh registry holds no other owner");
    let connected = store::Connected {
        id: waypost::util::hex(&id),
        app: app.clone(),
        deployment: deployment.clone(),
        hostname: truncate(hello.hostname.clone()),
        entrypoint_pid: hello.pid,
        entrypoint_version: truncate(hello.entrypoint_version.clone()),
        session,
        token_hash: String::new(),
    };
    assert!(
        connected.hostname.len() <= MAX_LABEL && connected.entrypoint_version.len() <= MAX_LABEL
    );
    let status = st
        .with(|c| store::upsert_connected(c, &connected, hello.status.as_ref(), 1))
        .expect("recording a connected instance")
        .expect("every run starts with no instances, so the id is free");
    registry.set_status(&id, session, status);
    let welcome = Kind::Welcome(proto::Welcome {
        protocol_version: proto::PROTOCOL_VERSION,
        heartbeat_interval_ms: 15_000,
        app: app.clone(),
        deployment,
        server_version: waypost::VERSION.into(),
        config: None,
        log_acked_seq: env.rt.block_on(env.logs.acked_seq(&id)),
    });
    if let Kind::Welcome(w) = &welcome {
        out.welcome_acked = w.log_acked_seq;
    }
    tx.try_send(welcome.into()).expect("room for the Welcome");

    // ---- session loop ----
    let mut now_ms = 2;
    loop {
        let frame = match run_ready(reader.next()) {
            Some(Ok(Some(f))) => f,
            Some(Ok(None)) => break,
            Some(Err(_)) => {
                out.error = true;
                break;
            }
            None => panic!("FrameReader pended on a reader that never pends"),
        };
        out.frames += 1;
        now_ms += 1;
        match frame.kind {
            Some(Kind::Ping(p)) => {
                registry.touch(&id, session, now_ms);
                if tx
                    .try_send(Kind::Pong(proto::Pong { nonce: p.nonce }).into())
                    .is_err()
                {
                    break; // "not reading its Pongs": the server drops the connection
                }
                out.pongs += 1;
            }
            Some(Kind::Status(s)) => {
                registry.apply_status(&id, session, &s, now_ms);
                out.statuses += 1;
            }
            Some(Kind::LogBatch(b)) => {
                registry.touch(&id, session, now_ms);
                // The real log service: checks, queues for its writer thread (which stores,
                // de-duplicates by sequence and acknowledges on `tx`).
                env.rt.block_on(env.logs.on_batch(&id, &app, b, &tx));
                out.log_batches += 1;
            }
            _ => registry.touch(&id, session, now_ms),
        }
        // The writer task drains the queue now and then.
        if !writer_stuck && out.frames % 16 == 0 {
            while let Ok(f) = rx.try_recv() {
                proto::encode(&f, &mut Vec::new()).expect("an outgoing frame encodes");
            }
        }
        // The flusher runs every couple of seconds.
        if out.frames % 32 == 0 {
            let rows = registry.take_dirty();
            st.with(|c| store::flush_live(c, &rows))
                .expect("flushing heartbeats");
        }
    }

    // ---- disconnect ----
    let rows = registry.take_dirty();
    st.with(|c| store::flush_live(c, &rows))
        .expect("flushing heartbeats");
    let (last_seen, status) = registry
        .snapshot_own(&id, session)
        .expect("still registered");
    st.with(|c| store::mark_disconnected(c, &connected.id, session, last_seen, &status, now_ms))
        .expect("recording the disconnect");
    assert!(registry.remove(&id, session).is_some());
    assert!(registry.is_empty());
    let listed = st
        .with(|c| store::list_instances(c, Some(&app), true))
        .expect("listing instances");
    let row = listed
        .iter()
        .find(|r| r.id == connected.id)
        .expect("the instance is listed");
    assert_eq!(
        row.status.child_rss_bytes, status.child_rss_bytes,
        "u64 values survive the database"
    );
    assert_eq!(row.status.config_version, status.config_version);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(frames: &[Kind]) -> Vec<u8> {
        wire_with(7, frames) // reads of 8 bytes
    }

    fn wire_with(first: u8, frames: &[Kind]) -> Vec<u8> {
        let mut v = vec![first];
        for k in frames {
            proto::encode(&Frame::from(k.clone()), &mut v).unwrap();
        }
        v
    }

    fn hello() -> Kind {
        Kind::Hello(proto::Hello {
            protocol_version: 1,
            token: FUZZ_TOKEN.into(),
            instance_id: vec![9; 16],
            hostname: "é".repeat(200),
            ..Default::default()
        })
    }

    #[test]
    fn a_normal_session() {
        let status = proto::Status {
            state: 2,
            child_pid: 7,
            child_rss_bytes: u64::MAX,
            config_version: u64::MAX,
            ..Default::default()
        };
        let o = control_frames(&wire(&[
            hello(),
            Kind::Ping(proto::Ping { nonce: 1 }),
            Kind::Status(status),
        ]));
        assert_eq!(
            o,
            Outcome {
                frames: 3,
                admitted: true,
                rejected: None,
                pongs: 1,
                statuses: 1,
                log_batches: 0,
                welcome_acked: 0,
                error: false
            }
        );
    }

    fn hello_as(id: u8) -> Kind {
        let mut h = hello();
        if let Kind::Hello(h) = &mut h {
            h.instance_id = vec![id; 16];
        }
        h
    }

    fn batch(first_seq: u64, n: usize) -> Kind {
        Kind::LogBatch(proto::LogBatch {
            first_seq,
            entries: (0..n)
                .map(|i| proto::LogEntry {
                    data: format!("line {i}").into_bytes(),
                    ..Default::default()
                })
                .collect(),
            dropped: 0,
        })
    }

    #[test]
    fn log_batches_are_stored_and_a_reconnect_resumes_after_them() {
        let o = control_frames(&wire(&[hello_as(0x51), batch(0, 3), batch(3, 2)]));
        assert_eq!((o.log_batches, o.welcome_acked), (2, 0));
        // The writer thread commits asynchronously; the next connection of the same instance
        // is told what is stored.
        let t0 = std::time::Instant::now();
        loop {
            let o = control_frames(&wire(&[hello_as(0x51)]));
            if o.welcome_acked == 5 {
                break;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{o:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn connecting_while_another_connection_commits_never_fails() {
        // Regression (fuzz target `server_frames`, with the log writer committing on its own
        // connection): `upsert_connected` read and then wrote in a deferred transaction, so a
        // commit in between made its write fail at once with SQLITE_BUSY_SNAPSHOT ("database is
        // locked", code 517; the busy timeout does not apply) and the instance was rejected.
        let path = env().lock().unwrap_or_else(|e| e.into_inner()).path.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let c = rusqlite::Connection::open(&path).unwrap();
                c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.execute(
                        "INSERT INTO log_usage (app, lines) VALUES ('busy', 1)
                         ON CONFLICT (app) DO UPDATE SET lines = lines + 1",
                        [],
                    )
                    .unwrap();
                    n += 1;
                    // Like the log writer: short transactions with gaps (a tight loop would
                    // starve every other connection's busy handler, deferred or not).
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
                n
            })
        };
        for i in 0..300u32 {
            let status = proto::Status {
                state: 2,
                child_pid: i,
                ..Default::default()
            };
            let o = control_frames(&wire(&[hello_as(0x53), Kind::Status(status)]));
            assert!(o.admitted);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(writer.join().unwrap() > 0);
    }

    #[test]
    fn impossible_sequence_numbers_are_ignored() {
        let o = control_frames(&wire(&[
            hello_as(0x52),
            batch(u64::MAX - 1, 3),
            batch(i64::MAX as u64, 1),
            Kind::LogBatch(proto::LogBatch {
                first_seq: 0,
                entries: vec![],
                dropped: u64::MAX,
            }),
        ]));
        assert_eq!(o.log_batches, 3);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(control_frames(&wire(&[hello_as(0x52)])).welcome_acked, 0);
    }

    #[test]
    fn admission() {
        let o = control_frames(&wire(&[Kind::Ping(proto::Ping { nonce: 1 })]));
        assert_eq!(o.rejected, Some(proto::reject::Reason::Unspecified));
        let mut h = hello();
        if let Kind::Hello(h) = &mut h {
            h.token = "wpe_nope".into();
        }
        assert_eq!(
            control_frames(&wire(&[h])).rejected,
            Some(proto::reject::Reason::BadToken)
        );
        let mut h = hello();
        if let Kind::Hello(h) = &mut h {
            h.instance_id = vec![1; 3];
        }
        assert_eq!(
            control_frames(&wire(&[h])).rejected,
            Some(proto::reject::Reason::Unspecified)
        );
    }

    #[test]
    fn ping_flood_without_reading_ends_the_session() {
        let pings: Vec<Kind> = std::iter::once(hello())
            .chain((0..200).map(|n| Kind::Ping(proto::Ping { nonce: n })))
            .collect();
        let o = control_frames(&wire_with(0x80 | 100, &pings));
        assert_eq!(o.pongs, OUT_QUEUE - 1, "the Welcome takes one slot: {o:?}");
        // A writer that keeps up answers every one.
        assert_eq!(control_frames(&wire(&pings)).pongs, 200);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut w = wire(&[hello()]);
        w.extend_from_slice(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(control_frames(&w).error);
        assert!(control_frames(&[0, 0xff, 0xff, 0xff, 0xff]).error);
    }
}
