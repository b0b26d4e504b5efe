//! The entrypoint's one error type (docs/architecture.md): hand-written Display, context as `&'static str`.

use std::fmt;
use std::io;

/// Everything that can stop the entrypoint before the child runs, or end a connection after.
#[derive(Debug)]
pub enum Error {
    /// Bad command line (exit 2).
    Usage(String),
    /// A known environment variable has a malformed value (exit 2).
    Env {
        /// The variable as the user wrote it.
        name: &'static str,
        /// What is wrong, quoting the value.
        why: String,
    },
    /// The command could not be found on PATH (exit 127).
    NotFound(String),
    /// The command was found but could not be executed (exit 126).
    NotExecutable(String, io::Error),
    /// TLS failed (handshake, certificate, or a corrupt record); `context` says where.
    Tls(&'static str, rustls::Error),
    /// The HTTP proxy refused or garbled the tunnel.
    Proxy(String),
    /// The server broke the protocol (corrupt or oversized frame).
    Protocol(waypost_proto::Error),
    /// A system call failed; `context` says what we were doing.
    Io {
        /// What the entrypoint was doing.
        context: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// Attaches `context` to an I/O error.
    pub fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }

    /// Exit code when this error ends the entrypoint before the child ever ran.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Env { .. } => 2,
            Error::NotFound(_) => 127,
            Error::NotExecutable(..) => 126,
            // Could not set up (signalfd, epoll, TLS, ...): treat like a command that cannot run.
            Error::Io { .. } | Error::Tls(..) | Error::Proxy(_) | Error::Protocol(_) => 126,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => f.write_str(m),
            Error::Env { name, why } => write!(f, "{name}: {why}"),
            Error::NotFound(cmd) => write!(f, "{cmd}: command not found"),
            Error::NotExecutable(cmd, e) => write!(f, "{cmd}: cannot execute: {e}"),
            Error::Tls(context, e) => write!(f, "{context}: {e}"),
            Error::Proxy(m) => f.write_str(m),
            Error::Protocol(e) => write!(f, "protocol error: {e}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {}
