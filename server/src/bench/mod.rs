//! `waypost bench`: load generators for the benchmark report (bench/ and `make bench`).
//!
//! - `waypost bench fleet`: N protocol-level entrypoint sessions (tokio tasks, not processes)
//!   against one server — heartbeats, a trickle of logs, config changes, a server restart — and
//!   the server's cost per instance. See [`fleet`].
//! - [`wirecheck`]: the server's control-frame path driven synchronously, for the fuzzer.

pub mod fleet;
pub mod wirecheck;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Simulate a fleet of entrypoints against one server and report what it costs the server:
    /// RSS per instance, CPU at idle, config propagation, log ingest, reconnect after a restart.
    Fleet(fleet::FleetArgs),
}

/// Runs a `waypost bench` subcommand; returns the exit code.
pub fn run(cmd: BenchCmd) -> anyhow::Result<i32> {
    match cmd {
        BenchCmd::Fleet(a) => fleet::run(a),
    }
}
