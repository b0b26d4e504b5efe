//! The server's control-connection path on arbitrary bytes from an "entrypoint": the connection's
//! frame reader (reads split at an input-chosen size) feeding the server's own sans-IO
//! `ControlSession` (server/src/server/transport/control/session.rs: Hello admission — version,
//! token scope, instance id, labels, the claim on the id — and frame dispatch), whose actions are
//! carried out as the connection task in control/mod.rs carries them out: token lookups and
//! instance rows in SQLite, the live registry, the Welcome through the config service, LogBatch
//! frames through the real log service (its writer thread stores, de-duplicates and
//! acknowledges them), ConfigApplied to the config service, exec and tunnel frames to the mux.
//! The harness is `waypost_fleet::wirecheck::control_frames` (bench/fleet/src/wirecheck.rs,
//! unit-tested there); it asserts its own invariants (no store error while the log writer
//! commits concurrently, labels cut to 255 bytes, only the actions the session's state allows,
//! values survive the database, registry and mux empty after the disconnect, a stuck writer
//! ends a Ping flood).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = waypost_fleet::wirecheck::control_frames(data);
});
