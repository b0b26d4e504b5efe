//! The services: the server's state and behaviour between the store and the transports. Each
//! is usable from any transport and knows nothing of HTTP or of the control connection's I/O.
//!
//! | module | what |
//! |---|---|
//! | `live` | the registry of live instances (in memory), flushed to the store |
//! | `config` | app configuration: cache, changes, Welcome snapshots, pushes |
//! | `logs` | log ingest (the writer thread), retention |
//! | `mux` | per-connection exec sessions and tunnel streams, the outgoing lanes |
//! | `pki` | the CA and server certificate, rustls configs |
//! | `auth` | tokens: generation and hashing |

pub mod auth;
pub mod config;
pub mod export;
pub mod fanout;
pub mod live;
pub mod logs;
pub mod members;
pub mod mux;
pub mod pki;
pub mod resolve;
pub mod sources;
pub mod urlauth;
