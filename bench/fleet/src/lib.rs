//! Load generators and server harnesses for the benchmark report and the fuzzer, outside the
//! shipped `waypost` binary.
//!
//! - [`fleet`] (the `waypost-fleet` binary): N protocol-level entrypoint sessions (tokio tasks,
//!   not processes) against one server or replicas sharing PostgreSQL — heartbeats, a trickle of
//!   logs, config changes, a server restart or a replica's failover — and the servers' cost per
//!   instance.
//! - [`wirecheck`]: the server's control-frame path driven synchronously, for the `server_frames`
//!   fuzz target.

pub mod fleet;
pub mod wirecheck;
