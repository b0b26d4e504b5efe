//! Starting processes: fork + execve, with PATH looked up in the child's own environment (as
//! execvp would), the exec error sent back through a close-on-exec pipe, and our pre-exec steps
//! (process group or session, terminal, signal state). Hand-written rather than std's `Command`:
//! it is what the entrypoint needs and no more, which keeps the static binary smaller.

use crate::error::Error;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

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

/// execvp's search path when PATH is unset (musl's and POSIX's default).
const DEFAULT_PATH: &[u8] = b"/usr/local/bin:/bin:/usr/bin";

fn cstr(bytes: &[u8]) -> Result<CString, Error> {
    CString::new(bytes).map_err(|_| {
        Error::Usage(format!(
            "{:?} contains a NUL byte",
            String::from_utf8_lossy(bytes)
        ))
    })
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(io::Error::from)
}

/// The fd the child gets for one stream, and the end we keep.
fn child_side(stdio: Stdio, ours_reads: bool) -> io::Result<(Option<OwnedFd>, Option<OwnedFd>)> {
    Ok(match stdio {
        Stdio::Inherit => (None, None),
        Stdio::Fd(fd) => (Some(fd), None),
        Stdio::Null => {
            let flags = if ours_reads {
                rustix::fs::OFlags::WRONLY
            } else {
                rustix::fs::OFlags::RDONLY
            };
            let null = rustix::fs::open(
                "/dev/null",
                flags | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?;
            (Some(null), None)
        }
        Stdio::Pipe => {
            let (r, w) = pipe()?;
            if ours_reads {
                (Some(w), Some(r))
            } else {
                (Some(r), Some(w))
            }
        }
    })
}

/// Starts `spec`. The process is reaped by the reactor's one reaper.
pub fn spawn(spec: Spec<'_>) -> Result<Spawned, Error> {
    let name = spec
        .argv
        .first()
        .ok_or_else(|| Error::Usage("no command given".into()))?;
    let display = name.to_string_lossy().into_owned();
    // Everything that allocates happens before fork: the child may only make async-signal-safe
    // calls (another thread could hold the allocator's lock at the moment of fork).
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<Result<_, _>>()?;
    let name = name.as_bytes();
    let candidates: Vec<CString> = if name.contains(&b'/') {
        vec![cstr(name)?]
    } else {
        let path = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_bytes());
        path.split(|&b| b == b':')
            .map(|dir| if dir.is_empty() { b".".as_slice() } else { dir })
            .map(|dir| cstr(&[dir, b"/", name].concat()))
            .collect::<Result<_, _>>()?
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let cand_ptrs: Vec<*const libc::c_char> = candidates.iter().map(|c| c.as_ptr()).collect();

    let (child_in, our_in) =
        child_side(spec.stdin, false).map_err(Error::io("starting the command"))?;
    let (child_out, our_out) =
        child_side(spec.stdout, true).map_err(Error::io("starting the command"))?;
    let (child_err, our_err) =
        child_side(spec.stderr, true).map_err(Error::io("starting the command"))?;
    let (err_r, err_w) = pipe().map_err(Error::io("starting the command"))?;
    let fds = [
        child_in.as_ref().map(|f| f.as_raw_fd()),
        child_out.as_ref().map(|f| f.as_raw_fd()),
        child_err.as_ref().map(|f| f.as_raw_fd()),
    ];

    // SAFETY: fork has no preconditions; the child branch only makes async-signal-safe calls on
    // memory prepared above, then execs or _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::Io {
            context: "starting the command (fork)",
            source: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // SAFETY: we are the forked child; see in_child.
        unsafe {
            in_child(
                fds,
                spec.placement,
                &cand_ptrs,
                &argv_ptrs,
                &envp_ptrs,
                err_w.as_raw_fd(),
            )
        }
    }
    drop((child_in, child_out, child_err, err_w));
    // The child writes errno here if it could not exec; EOF (close-on-exec) means it did.
    let mut errno = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match rustix::io::read(&err_r, &mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
    }
    if got == 4 {
        // It exits with 127 right after writing: collect it here, it never ran anything.
        // SAFETY: waitpid on our own child pid with a valid status pointer.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let e = io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Error::NotFound(display),
            _ => Error::NotExecutable(display, e),
        });
    }
    Ok(Spawned {
        pid,
        stdin: our_in,
        stdout: our_out,
        stderr: our_err,
    })
}

/// The forked child: wire up stdio, place it, reset signals, exec the first candidate that works.
///
/// # Safety
/// Must only run in a freshly forked child; every pointer array is null-terminated (argv, envp)
/// and points at live CStrings owned by the parent's (copied) memory.
unsafe fn in_child(
    fds: [Option<RawFd>; 3],
    placement: Placement,
    candidates: &[*const libc::c_char],
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    err_fd: RawFd,
) -> ! {
    let fail = |e: i32| -> ! {
        // SAFETY: write and _exit are async-signal-safe; the buffer is on our stack.
        unsafe {
            libc::write(err_fd, (&e as *const i32).cast(), 4);
            libc::_exit(127)
        }
    };
    // SAFETY (whole block): only async-signal-safe calls on fds and pointers prepared before fork.
    unsafe {
        for (target, fd) in fds.iter().enumerate() {
            if let Some(fd) = *fd {
                // dup2 clears close-on-exec on the new fd; if fd == target it is already ours.
                if fd != target as RawFd && libc::dup2(fd, target as RawFd) < 0 {
                    fail(*libc::__errno_location());
                }
                if fd == target as RawFd {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
            }
        }
        match placement {
            Placement::Group { foreground } => {
                if libc::setpgid(0, 0) != 0 {
                    fail(*libc::__errno_location());
                }
                // SIGTTOU is still ignored here (inherited from us), so a background caller may
                // take the terminal. Errors (no terminal, not our session) are fine.
                if foreground && libc::isatty(0) == 1 {
                    libc::tcsetpgrp(0, libc::getpid());
                }
            }
            Placement::Terminal => {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                    fail(*libc::__errno_location());
                }
            }
            Placement::Session => {
                if libc::setsid() < 0 {
                    fail(*libc::__errno_location());
                }
            }
        }
        if let Err(e) = super::signals::reset_for_exec() {
            fail(e.raw_os_error().unwrap_or(libc::EINVAL));
        }
        // execvp's rule: EACCES from any candidate wins over "not found" from the others.
        let mut result = libc::ENOENT;
        for &path in candidates {
            libc::execve(path, argv.as_ptr(), envp.as_ptr());
            match *libc::__errno_location() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => result = libc::EACCES,
                other => {
                    result = other;
                    break;
                }
            }
        }
        fail(result)
    }
}
