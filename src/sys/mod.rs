//! Everything that needs `unsafe` or raw system calls: raw signal handling (signalfd, the signal
//! mask), the child's pre-exec steps, PTY setup, scrubbing our own environment, config files
//! written by directory fd, our own stdout/stderr without blocking, DNS off the loop, and the
//! /proc readers. The reactor is the only caller of the I/O helpers here. Each `unsafe` block
//! states why it is sound in a `SAFETY:` comment, and every fd leaves here as an `OwnedFd`.
#![allow(unsafe_code)]

pub mod environ;
pub mod files;
pub mod net;
pub mod proc;
pub mod pty;
pub mod random;
pub mod signals;
pub mod simd;
pub mod sink;
pub mod spawn;
