//! The only `unsafe` of the `waypost` crate: what neither std nor rustix offers safely. Every
//! block says why it is sound.

#![allow(unsafe_code)]

use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Makes the process `cmd` spawns start a new session (`setsid` between fork and exec), so it has
/// no controlling terminal: a Ctrl-C in the caller's terminal never reaches it. (std's
/// `process_group` only makes a new process group, which stays in the caller's session.)
pub fn new_session_on_spawn(cmd: &mut Command) {
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe calls
    // are allowed: setsid(2) is one, and the closure allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            // Fails only if the child already leads a process group, which a fresh child never
            // does; nothing to do about it here anyway.
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
}
