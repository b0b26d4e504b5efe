//! waypost: the control server and the CLI (`waypost`), plus the pieces the integration tests
//! and the fleet simulator (bench/fleet) reuse (the API client, the context file, the CLI's CA
//! reader).
//!
//! Layout: `server/` is everything `waypost server run` does (listeners, store, PKI, live
//! registry); `cli/` the other commands, which all go through the HTTPS API with `client`.
//!
//! No `unsafe` outside `sys` (the one module that allows it, each block with a `SAFETY:` line).

#![deny(unsafe_code)]

pub mod cli;
pub mod client;
pub mod context;
pub mod oci;
pub mod server;
mod sys;
pub mod util;

/// This build's version, reported in Welcome, `/v1/server` and `server.json`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
