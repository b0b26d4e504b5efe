//! Starting processes: std's `Command` (fork + execvp with the child's PATH, exec errors reported
//! back through a close-on-exec pipe) plus our own pre-exec steps, which need `unsafe`.

use crate::error::Error;
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// What one of the child's standard streams is connected to.
pub enum Stdio {
    /// Ours, shared.
    Inherit,
    /// A new pipe; our end comes back in [`Spawned`].
    Pipe,
    /// `/dev/null`.
    Null,
    /// This fd (e.g. a PTY's terminal side).
    Fd(OwnedFd),
}

impl Stdio {
    fn into_std(self) -> std::process::Stdio {
        match self {
            Stdio::Inherit => std::process::Stdio::inherit(),
            Stdio::Pipe => std::process::Stdio::piped(),
            Stdio::Null => std::process::Stdio::null(),
            Stdio::Fd(fd) => std::process::Stdio::from(fd),
        }
    }
}

/// How the new process is placed among sessions and process groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Its own process group (the main child), so it and its descendants can be signalled as a
    /// group. `foreground`: when stdin is a terminal, make the group the terminal's foreground
    /// group, so ^C and job control reach the app as they would without us.
    Group { foreground: bool },
    /// A new session whose controlling terminal is its stdin (an exec session on a PTY).
    Terminal,
    /// A new session without a terminal (an exec session on pipes), signalled as a group.
    Session,
}

/// What to start.
pub struct Spec<'a> {
    pub argv: &'a [OsString],
    /// The complete environment of the new process.
    pub env: &'a [(OsString, OsString)],
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
    pub placement: Placement,
}

/// A started process and our ends of its pipes.
pub struct Spawned {
    pub pid: i32,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Starts `spec`. The process is reaped by the reactor's one reaper, never through std's `Child`.
pub fn spawn(spec: Spec<'_>) -> Result<Spawned, Error> {
    let program = spec.argv.first().ok_or_else(|| Error::Usage("no command given".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(spec.stdin.into_std())
        .stdout(spec.stdout.into_std())
        .stderr(spec.stderr.into_std());
    let placement = spec.placement;
    // SAFETY: the closure runs in the forked child before exec and makes only async-signal-safe
    // calls (setpgid, setsid, ioctl, tcsetpgrp, getpid, isatty, sigprocmask, signal); it touches
    // no locks and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            match placement {
                Placement::Group { foreground } => {
                    if libc::setpgid(0, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // SIGTTOU is still ignored here (inherited from us), so a background caller
                    // may take the terminal. Errors (no terminal, not our session) are fine.
                    if foreground && libc::isatty(0) == 1 {
                        libc::tcsetpgrp(0, libc::getpid());
                    }
                }
                Placement::Terminal => {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Placement::Session => {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            super::signals::reset_for_exec()
        });
    }
    let mut child = cmd.spawn().map_err(|e| classify(program, e))?;
    let spawned = Spawned {
        pid: child.id() as i32,
        stdin: child.stdin.take().map(OwnedFd::from),
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
    };
    // Dropping `Child` neither waits nor kills; the reaper owns the pid from here.
    drop(child);
    Ok(spawned)
}

/// Maps an exec failure to the shell's convention: 127 not found, 126 found but not runnable.
fn classify(program: &OsString, e: io::Error) -> Error {
    let name = program.to_string_lossy().into_owned();
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => Error::NotFound(name),
        _ => Error::NotExecutable(name, e),
    }
}
