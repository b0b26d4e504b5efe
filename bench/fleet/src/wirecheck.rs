//! The server's control-frame path on arbitrary bytes, synchronously, for the `server_frames`
//! fuzz target (fuzz/fuzz_targets/server_frames.rs) and its regression tests.
//!
//! The protocol decisions are the server's own: every frame goes to the shipped sans-IO
//! `control::session::ControlSession` (Hello admission — version, token scope, a 16-byte instance
//! id, labels cut to `MAX_LABEL` — the claim on the id, frame dispatch, the silence deadline),
//! and this harness carries out the actions it asks for the way the connection task in
//! server/src/server/transport/control/mod.rs does, minus the socket and the real clock:
//!
//! - bytes in: the connection's `control::FrameReader` (fed by an in-memory reader that hands out
//!   the bytes in reads of a size the input chooses), with the session's `frame_cap`;
//! - `LookupToken`: `store::lookup_token`; `Claim`: what `claim` in mod.rs does (the live
//!   registry's owner check, `store::upsert_connected`, `Registry::register`, `set_status`);
//! - `Admitted`: the Welcome with the log service's `acked_seq`, sent through the config
//!   service's `send_welcome`, then `Mux::attach`;
//! - `Touch`/`Reply`/`Status`/`ConfigApplied`/`LogBatch`/`Deliver`: the live registry, the
//!   outgoing queue (a full one ends the connection), the ingress pool's `note_state`, the config
//!   service, the log service (`on_batch` to its writer thread, which stores and acknowledges)
//!   and the mux;
//! - the disconnect: `store::flush_live` (the flusher), `mark_disconnected`, `Registry::remove`,
//!   `Mux::detach`, `Pool::forget`;
//!
//! on a database file of this process. The time is a fake clock that advances 1 ms per frame.
//! Where the server would log a store failure and answer UNAVAILABLE, the harness panics: its
//! database never fails, so a failure is a bug (see bench/FUZZ.md). It also panics on an action
//! the session must not ask for in its state, on a label longer than `MAX_LABEL`, on values that
//! do not survive the database, and on a registry or mux left non-empty after the disconnect.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{Notify, mpsc};
use waypost::server::config::ConfigService;
use waypost::server::control::FrameReader;
use waypost::server::control::session::{
    Action, Admitted, Claim, ClaimError, ControlSession, End, MAX_LABEL,
};
use waypost::server::ingress::Pool;
use waypost::server::live::Registry;
use waypost::server::logs::LogService;
use waypost::server::tunnel::{self as mux, Mux};
use waypost::server::{auth, store};
#[cfg(test)]
use waypost_proto::Frame;
use waypost_proto::{self as proto, Kind};

/// The entrypoint token the fuzz store knows (the seed corpus carries it, so the fuzzer gets past
/// admission).
pub const FUZZ_TOKEN: &str = "wpe_fuzz";
/// The app that token belongs to.
pub const FUZZ_APP: &str = "fuzz";
/// An admin token the fuzz store knows (one byte from [`FUZZ_TOKEN`]): a Hello with it is
/// FORBIDDEN.
pub const ADMIN_TOKEN: &str = "wpa_fuzz";
/// An instance id recorded for another app (one byte from the seeds' id `00 01 … 0f`): a Hello
/// of the fuzz app claiming it is FORBIDDEN and leaves the other app's row alone.
pub const TAKEN_ID: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0x10];
/// The app [`TAKEN_ID`] belongs to.
pub const OTHER_APP: &str = "fuzz-other";
/// Mirrors `control::OUT_QUEUE`.
const OUT_QUEUE: usize = 64;
/// The heartbeat interval the Welcome announces (the server's default).
const HEARTBEAT: Duration = Duration::from_secs(15);

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

/// What every run shares, as the server's connections share `transport::Shared`: a runtime for
/// the async pieces, the database (a file: the log service opens its own connections to it), the
/// real log service with its writer thread, and the config service (its cache of the app's
/// config lives as long as the server).
struct Env {
    rt: tokio::runtime::Runtime,
    store: store::Store,
    /// A connection of this harness's own, for the reset between runs (the store has no
    /// "forget every instance", and the server never needs one).
    raw: rusqlite::Connection,
    logs: LogService,
    config: ConfigService,
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
        let location = store::Location::Sqlite(path.clone());
        let st = store::Store::open(&location).expect("the fuzz database");
        st.with(|c| {
            store::create_app(c, FUZZ_APP, 0)?;
            let scope = store::TokenScope::Entrypoint {
                app: FUZZ_APP.into(),
                deployment: None,
            };
            store::insert_token(c, &auth::hash_token(FUZZ_TOKEN), &scope, 0)?;
            store::insert_token(
                c,
                &auth::hash_token(ADMIN_TOKEN),
                &store::TokenScope::Admin,
                0,
            )?;
            let retention = waypost::server::model::logs::Retention {
                max_lines: Some(FUZZ_MAX_LINES),
                max_bytes: Some(FUZZ_MAX_BYTES),
            };
            store::logs::set_retention(c, FUZZ_APP, retention)?;
            // Another app's instance (its token is not in the store: no run can connect as it).
            store::create_app(c, OTHER_APP, 0)?;
            let other = store::Connected {
                id: waypost::util::hex(&TAKEN_ID),
                app: OTHER_APP.into(),
                deployment: String::new(),
                hostname: "other".into(),
                entrypoint_pid: 1,
                entrypoint_version: "0".into(),
                session: 1,
                token_hash: auth::hash_token("wpe_other"),
            };
            store::upsert_connected(c, &other, None, 0)?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            Ok(())
        })
        .expect("seeding the fuzz database");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let logs = rt
            .block_on(async { LogService::start(&location) })
            .expect("starting the log service");
        let raw = rusqlite::Connection::open(&path).expect("the fuzz database");
        raw.busy_timeout(std::time::Duration::from_secs(10))
            .expect("setting a busy timeout");
        Mutex::new(Env {
            rt,
            config: ConfigService::new(st.clone()),
            store: st,
            raw,
            logs,
            path,
        })
    })
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

/// The per-connection state the server keeps in `Shared` (live registry, mux, ingress pool):
/// fresh for every run, like the database's instances, so an input reproduces on its own.
#[derive(Default)]
struct Live {
    registry: Registry,
    mux: Mux,
    pool: Pool,
}

/// Carries out a [`Claim`] as `claim` in server/src/server/transport/control/mod.rs does: the
/// live registry first (no write), then the store (owner check and insert in one transaction),
/// then the registration (which checks the owner again). A store error panics (see the module
/// docs) where the server answers UNAVAILABLE.
fn claim(
    st: &store::Store,
    live: &Live,
    c: Claim,
    tx: &mpsc::Sender<mux::Queued>,
    now_ms: i64,
) -> Result<Arc<Notify>, ClaimError> {
    let Claim {
        id,
        owner,
        connected,
        hello_status,
    } = c;
    if let Some(c) = live.registry.conflict(&id, &owner) {
        return Err(ClaimError::Conflict(c));
    }
    let session = connected.session;
    let status = st
        .with(|c| store::upsert_connected(c, &connected, hello_status.as_ref(), now_ms))
        .unwrap_or_else(|e| panic!("recording a connected instance failed: {e:#}"))
        .map_err(ClaimError::Conflict)?;
    let kick = live
        .registry
        .register(id, session, owner, tx.clone(), now_ms)
        .map_err(ClaimError::Conflict)?;
    live.registry.set_status(&id, session, status);
    Ok(kick)
}

/// The connection's writer task: encodes what is queued, control frames first.
fn drain(rx: &mut mpsc::Receiver<mux::Queued>, lanes: &mut mux::Lanes) {
    let mut buf = Vec::new();
    while let Some(f) = lanes.try_next(rx) {
        buf.clear();
        proto::encode(&f, &mut buf).expect("an outgoing frame encodes");
    }
}

/// One control connection's worth of bytes from an entrypoint, handled by the server's
/// [`ControlSession`] with its actions carried out as `control::connection` carries them out.
/// Input: byte 0 = bits 0-6: read size - 1 (1..=128 bytes per read), bit 7: the connection's
/// writer is stuck (never drains the outgoing queue); the rest = the bytes.
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
    // Held for the whole run: runs (parallel tests) never interleave on the shared database.
    let env = env().lock().unwrap_or_else(|e| e.into_inner());
    let st = env.store.clone();
    // Every run starts from the same database (one app with no instances, one token, another
    // app's instance), so a failing input reproduces on its own.
    env.raw
        .execute("DELETE FROM instances WHERE app = ?1", [FUZZ_APP])
        .expect("resetting the fuzz database");

    // The session number is random in the server; distinct per run here.
    static NONCE: AtomicI64 = AtomicI64::new(1);
    let t0 = Instant::now();
    let mut now_ms: i64 = 1;
    let at = |ms: i64| t0 + Duration::from_millis(ms as u64);
    let mut cs = ControlSession::new(at(now_ms), NONCE.fetch_add(1, Ordering::Relaxed), HEARTBEAT);
    reader.set_cap(cs.frame_cap());
    let live = Live::default();
    let (tx, mut rx) = mpsc::channel::<mux::Queued>(OUT_QUEUE);
    let (lane_tx, mut lanes) = mux::lanes();

    // ---- Hello and admission ----
    let mut kick = None;
    let admitted = 'hello: loop {
        while let Some(action) = cs.poll_action() {
            match action {
                Action::LookupToken { hash } => {
                    let scope = st
                        .with(|c| store::lookup_token(c, &hash))
                        .unwrap_or_else(|e| panic!("the token lookup failed: {e:#}"));
                    cs.handle_token(Ok(scope));
                }
                Action::Claim(c) => {
                    // The session cuts the Hello's labels.
                    assert!(
                        c.connected.hostname.len() <= MAX_LABEL
                            && c.connected.entrypoint_version.len() <= MAX_LABEL,
                        "labels longer than {MAX_LABEL} bytes: {:?}",
                        c.connected
                    );
                    let outcome = claim(&st, &live, c, &tx, now_ms).map(|k| kick = Some(k));
                    cs.handle_claim(outcome, at(now_ms));
                }
                Action::Admitted(a) => break 'hello a,
                Action::Reject { frame, why } => {
                    let Some(Kind::Reject(r)) = &frame.kind else {
                        panic!("a Reject action without a Reject frame ({why:?}): {frame:?}");
                    };
                    out.rejected = Some(
                        proto::reject::Reason::try_from(r.reason).expect("a known Reject reason"),
                    );
                    // The writer sends it (it must encode: its message is built from the
                    // Hello's fields), then the connection closes.
                    tx.try_send(Box::new(frame)).expect("room for the Reject");
                    drain(&mut rx, &mut lanes);
                    return out;
                }
                Action::Close(End::Quiet | End::Failed(_)) => return out,
                other => panic!("{other:?} before admission"),
            }
        }
        match run_ready(reader.next()) {
            Some(Ok(Some(frame))) => {
                out.frames += 1;
                now_ms += 1;
                cs.handle_frame(frame, at(now_ms));
            }
            Some(Ok(None)) => {
                cs.handle_eof();
                // An EOF closes the session: the reader would return None for ever.
                assert!(
                    matches!(cs.poll_action(), Some(Action::Close(End::Quiet))),
                    "the session did not close at EOF before admission"
                );
                return out;
            }
            Some(Err(_)) => {
                out.error = true;
                return out;
            }
            None => panic!("FrameReader pended on a reader that never pends"),
        }
        if at(now_ms) >= cs.poll_timeout() {
            cs.handle_timeout(at(now_ms));
        }
    };
    let kick = kick.expect("admitted without a claim");
    let Admitted {
        id,
        app,
        deployment,
        hello,
    } = admitted;
    let session = cs.nonce();
    out.admitted = true;

    // ---- welcome ----
    reader.set_cap(cs.frame_cap());
    let log_acked_seq = env.rt.block_on(env.logs.acked_seq(&id));
    out.welcome_acked = log_acked_seq;
    let welcome = Kind::Welcome(proto::Welcome {
        protocol_version: proto::PROTOCOL_VERSION,
        heartbeat_interval_ms: HEARTBEAT.as_millis() as u32,
        app: app.clone(),
        deployment: deployment.clone(),
        server_version: waypost::VERSION.into(),
        config: None,
        log_acked_seq,
    });
    env.rt.block_on(env.config.send_welcome(
        &live.registry,
        &tx,
        id,
        session,
        &app,
        &deployment,
        &hello,
        &Default::default(),
        welcome,
    ));
    live.mux
        .attach(id, session, &app, hello.disabled.as_ref(), lane_tx);

    // ---- session loop ----
    'run: loop {
        match run_ready(reader.next()) {
            Some(Ok(Some(frame))) => {
                out.frames += 1;
                now_ms += 1;
                cs.handle_frame(frame, at(now_ms));
            }
            Some(Ok(None)) => {
                cs.handle_eof();
                assert!(
                    matches!(cs.poll_action(), Some(Action::Close(End::Disconnected(_)))),
                    "the session did not close at EOF"
                );
                break;
            }
            Some(Err(_)) => {
                out.error = true;
                break;
            }
            None => panic!("FrameReader pended on a reader that never pends"),
        }
        if at(now_ms) >= cs.poll_timeout() {
            cs.handle_timeout(at(now_ms));
        }
        while let Some(action) = cs.poll_action() {
            match action {
                Action::Touch => live.registry.touch(&id, session, now_ms),
                Action::Reply(frame) => {
                    if tx.try_send(Box::new(frame)).is_err() {
                        break 'run; // "not reading its Pongs": the server drops the connection
                    }
                    out.pongs += 1;
                }
                Action::Status(s) => {
                    let restarting = s.state == proto::status::State::Restarting as i32;
                    live.pool.note_state(&id, restarting);
                    live.registry.apply_status(&id, session, &s, now_ms);
                    out.statuses += 1;
                }
                Action::ConfigApplied(a) => {
                    env.config.on_applied(&live.registry, &id, session, a);
                }
                Action::LogBatch(b) => {
                    // The real log service: checks, queues for its writer thread (which stores,
                    // de-duplicates by sequence and acknowledges on `tx`).
                    env.rt.block_on(env.logs.on_batch(&id, &app, b, &tx));
                    out.log_batches += 1;
                }
                Action::Deliver(kind) => {
                    // Exec and tunnel frames to their routes (none are open: dropped); any other
                    // kind comes back and is ignored, as the server does.
                    let _ = live.mux.deliver(&id, session, kind);
                }
                Action::Close(End::Disconnected(_)) => break 'run,
                other => panic!("{other:?} after admission"),
            }
        }
        // The writer task drains the queue now and then.
        if !writer_stuck && out.frames % 16 == 0 {
            drain(&mut rx, &mut lanes);
        }
        // The flusher runs every couple of seconds.
        if out.frames % 32 == 0 {
            let rows = live.registry.take_dirty();
            st.with(|c| store::flush_live(c, &rows))
                .expect("flushing heartbeats");
        }
    }

    // ---- disconnect ----
    let rows = live.registry.take_dirty();
    st.with(|c| store::flush_live(c, &rows))
        .expect("flushing heartbeats");
    let id_hex = waypost::util::hex(&id);
    let (last_seen, status) = live
        .registry
        .snapshot_own(&id, session)
        .expect("still registered");
    st.with(|c| store::mark_disconnected(c, &id_hex, session, last_seen, &status, now_ms))
        .expect("recording the disconnect");
    assert!(live.registry.remove(&id, session).is_some());
    live.mux.detach(&id, session);
    live.pool.forget(&id);
    drop((tx, kick));
    assert!(live.registry.is_empty());
    assert!(!live.mux.has_app(&app), "the mux still routes to {id_hex}");
    let listed = st
        .with(|c| store::list_instances(c, Some(&app), true))
        .expect("listing instances");
    let row = listed
        .iter()
        .find(|r| r.id == id_hex)
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
        let mut h = hello();
        if let Kind::Hello(h) = &mut h {
            h.protocol_version = proto::PROTOCOL_VERSION + 1;
        }
        assert_eq!(
            control_frames(&wire(&[h])).rejected,
            Some(proto::reject::Reason::UnsupportedVersion)
        );
        let mut h = hello();
        if let Kind::Hello(h) = &mut h {
            h.token = ADMIN_TOKEN.into();
        }
        assert_eq!(
            control_frames(&wire(&[h])).rejected,
            Some(proto::reject::Reason::Forbidden)
        );
        // Frames of a kind this server does not know are skipped before the Hello.
        let mut w = wire(&[]);
        proto::encode(&Frame { kind: None }, &mut w).unwrap();
        w.extend_from_slice(&wire(&[hello()])[1..]);
        let o = control_frames(&w);
        assert_eq!((o.frames, o.admitted), (2, true), "{o:?}");
        // Before the Hello, a frame may be FIRST_FRAME_CAP bytes at most (from its prefix).
        let mut w = wire(&[]);
        w.extend_from_slice(&(waypost::server::control::FIRST_FRAME_CAP as u32 + 1).to_be_bytes());
        assert!(control_frames(&w).error);
    }

    #[test]
    fn another_apps_instance_id_is_forbidden_and_left_alone() {
        let owner_of_taken = || {
            let env = env().lock().unwrap_or_else(|e| e.into_inner());
            env.raw
                .query_row(
                    "SELECT app, hostname FROM instances WHERE id = ?1",
                    [waypost::util::hex(&TAKEN_ID)],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .unwrap()
        };
        let taken = || {
            let mut h = hello();
            if let Kind::Hello(h) = &mut h {
                h.instance_id = TAKEN_ID.to_vec();
            }
            h
        };
        let o = control_frames(&wire(&[taken(), Kind::Ping(proto::Ping { nonce: 1 })]));
        assert_eq!(o.rejected, Some(proto::reject::Reason::Forbidden), "{o:?}");
        assert!(!o.admitted);
        assert_eq!(owner_of_taken(), (OTHER_APP.into(), "other".into()));
        // Negative control: the seeds' id (one byte away) is the fuzz app's to take.
        let mut h = taken();
        if let Kind::Hello(h) = &mut h {
            h.instance_id[15] = 15;
        }
        assert!(control_frames(&wire(&[h])).admitted);
    }

    #[test]
    fn every_frame_kind_after_admission() {
        // Exec, tunnel, config and second-Hello frames go where the server sends them (the mux,
        // the config service); none of them ends the session.
        let mut frames = vec![hello_as(0x54)];
        frames.extend(
            proto::samples::every_kind()
                .into_iter()
                .filter_map(|f| f.kind),
        );
        let n = frames.len();
        let o = control_frames(&wire(&frames));
        assert!(o.admitted && !o.error, "{o:?}");
        assert_eq!(o.frames, n);
        assert_eq!((o.pongs, o.statuses, o.log_batches), (1, 1, 1), "{o:?}");
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
