//! The server's control-connection path on arbitrary bytes from an "entrypoint": the connection's
//! frame reader (reads split at an input-chosen size), the Hello admission checks, the live
//! registry, the instance rows in SQLite, and LogBatch frames through the real log service (its
//! writer thread stores, de-duplicates and acknowledges them), as `server/src/server/control.rs`
//! runs them. ConfigApplied, exec and tunnel frames need the whole server state and only touch
//! the registry here. The harness itself is `waypost_fleet::wirecheck::control_frames`
//! (bench/fleet/src/wirecheck.rs, unit-tested there); it asserts its own invariants (labels cut
//! to 255 bytes, values survive the database, the registry is empty after the disconnect, a
//! stuck writer ends a Ping flood, every SQLite write succeeds while the log writer commits
//! concurrently).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = waypost_fleet::wirecheck::control_frames(data);
});
