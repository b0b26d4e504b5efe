//! Exec sessions' processes: on a new pseudo-terminal (openpt/grantpt/unlockpt, the terminal
//! side as the new session's controlling terminal) or on pipes.

use super::spawn::{self, Placement, Spawned, Spec, Stdio};
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;

/// A new pseudo-terminal of `rows`×`cols`: (master, terminal side).
pub fn open(rows: u32, cols: u32) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, ioctl_tiocgptpeer, openpt, unlockpt};
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = openpt(flags)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave = ioctl_tiocgptpeer(&master, flags)?;
    resize(
        &master,
        rows.clamp(1, 4096) as u16,
        cols.clamp(1, 4096) as u16,
    )?;
    Ok((master, slave))
}

/// Sets a terminal's size (the kernel sends SIGWINCH to its foreground group).
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(master, size)?)
}

/// Starts an exec session's process in a new session: on a PTY of `pty` = (rows, cols), whose
/// master comes back as `stdin` (it carries both directions), or on pipes (`stdin`: a pipe,
/// else /dev/null). `Err`: the exit code and message for the server.
pub fn spawn_session(
    argv: &[OsString],
    env: &[(OsString, OsString)],
    pty: Option<(u32, u32)>,
    stdin: bool,
) -> Result<Spawned, (i32, String)> {
    let (spawned, master) = match pty {
        Some((rows, cols)) => {
            let (master, slave) =
                open(rows, cols).map_err(|e| (126, format!("cannot open a terminal: {e}")))?;
            let (Ok(a), Ok(b)) = (slave.try_clone(), slave.try_clone()) else {
                return Err((126, "cannot duplicate the terminal".into()));
            };
            let spec = Spec {
                argv,
                env,
                stdin: Stdio::Fd(a),
                stdout: Stdio::Fd(b),
                stderr: Stdio::Fd(slave),
                placement: Placement::Terminal,
            };
            (spawn::spawn(spec), Some(master))
        }
        None => {
            let stdin = if stdin { Stdio::Pipe } else { Stdio::Null };
            let spec = Spec {
                argv,
                env,
                stdin,
                stdout: Stdio::Pipe,
                stderr: Stdio::Pipe,
                placement: Placement::Session,
            };
            (spawn::spawn(spec), None)
        }
    };
    match spawned {
        Ok(child) => Ok(Spawned {
            stdin: master.or(child.stdin),
            ..child
        }),
        Err(e) => {
            crate::info!(
                "exec {:?} failed: {e}",
                argv.first()
                    .map(|a| a.to_string_lossy())
                    .unwrap_or_default()
            );
            Err((e.exit_code(), e.to_string()))
        }
    }
}
