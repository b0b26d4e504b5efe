//! Everything that needs `unsafe`: raw signal handling (signalfd, the signal mask), the child's
//! pre-exec steps, and PTY setup. Each block states why it is sound in a `SAFETY:` comment, and
//! every fd leaves here as an `OwnedFd`.
#![allow(unsafe_code)]

pub mod signals;
pub mod spawn;
pub mod random;
pub mod simd;
