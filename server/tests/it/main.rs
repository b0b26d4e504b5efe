//! The server crate's integration tests, as one test binary (one link step instead of one per
//! file): each module is one area, run against a real `waypost server run` process — and, where
//! the area needs it, the real entrypoint binary, real children and real containers.
//!
//! `common` is the harness (a server per test, the CLI with a private environment, the real
//! entrypoint); `apps` the test app for `exec` and `url`. The protocol-level fake entrypoint is
//! `waypost_testkit::Fake`, shared with the fleet simulator.

mod apps;
mod common;

mod api;
mod child_control;
mod cli_fit;
mod config;
mod config_replicas;
mod config_sources;
mod config_templates;
mod console;
mod containers;
mod control;
mod database_tls;
mod exec;
mod failover;
mod health;
mod ingress_fastpath;
mod ingress_tls;
mod labels;
mod log_export;
mod login;
mod logs;
mod members;
mod metrics;
mod port_forward;
mod replicas;
mod security;
mod service;
mod session;
mod up;
mod url;
mod url_auth;
