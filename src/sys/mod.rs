//! Everything that needs `unsafe` or raw system calls: raw signal handling (signalfd, the signal
//! mask), the child's pre-exec steps, PTY setup, scrubbing our own environment, and config files
//! written by directory fd. Each block states why it is sound in a `SAFETY:` comment, and
//! every fd leaves here as an `OwnedFd`.
#![allow(unsafe_code)]

pub mod signals;
pub mod spawn;
pub mod random;
pub mod simd;
pub mod environ;
pub mod files;
