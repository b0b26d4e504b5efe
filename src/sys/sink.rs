//! Our own stdout and stderr, written without ever blocking the loop. A pipe or terminal gets a
//! private non-blocking open file description (reopened through /proc/self/fd), so the shared
//! one that others may use stays blocking; a socket gets `send(MSG_DONTWAIT)`; without /proc a
//! pipe's shared description is switched to non-blocking and restored at exit; a regular file
//! or device gets plain writes.

use rustix::fs::{FileType, Mode, OFlags};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Our fd 1 or 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Stdout = 0,
    Stderr = 1,
}

/// How bytes get written without blocking the loop.
enum How {
    /// A private non-blocking open file description of the same pipe/FIFO/terminal.
    Reopened(OwnedFd),
    /// A socket: `send(MSG_DONTWAIT)` is non-blocking per call.
    Socket,
    /// A pipe we had to switch to non-blocking itself (no /proc); restored at exit.
    SharedNonBlocking(OFlags),
    /// A regular file or device: writes complete without waiting for a reader.
    Blocking,
}

pub struct Sink {
    pub out: Out,
    mode: How,
    /// Whether the last write did not hit `WouldBlock` (edge-triggered readiness).
    pub writable: bool,
    /// The reader went away (EPIPE): output is discarded from now on.
    pub broken: bool,
}

pub fn std_fd(out: Out) -> BorrowedFd<'static> {
    match out {
        Out::Stdout => rustix::stdio::stdout(),
        Out::Stderr => rustix::stdio::stderr(),
    }
}

impl Sink {
    /// Sets up writing to our fd 1 or 2.
    pub fn new(out: Out) -> Sink {
        let fd = std_fd(out);
        let mode = match rustix::fs::fstat(fd).map(|st| FileType::from_raw_mode(st.st_mode)) {
            Ok(FileType::Socket) => How::Socket,
            Ok(FileType::Fifo) => reopen(fd).unwrap_or_else(|| {
                // No /proc: switch the shared description itself, and restore it at exit.
                match rustix::fs::fcntl_getfl(fd) {
                    Ok(orig) if rustix::fs::fcntl_setfl(fd, orig | OFlags::NONBLOCK).is_ok() => {
                        How::SharedNonBlocking(orig)
                    }
                    _ => How::Blocking,
                }
            }),
            // A terminal we cannot reopen gets plain writes (only ^S stalls those).
            Ok(FileType::CharacterDevice) if rustix::termios::isatty(fd) => {
                reopen(fd).unwrap_or(How::Blocking)
            }
            _ => How::Blocking,
        };
        Sink {
            out,
            mode,
            writable: true,
            broken: false,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.mode {
            How::Reopened(own) => own.as_fd(),
            _ => std_fd(self.out),
        }
    }

    /// Whether writes can return `WouldBlock` (and so need WRITABLE interest).
    pub fn can_block(&self) -> bool {
        !matches!(self.mode, How::Blocking)
    }

    pub fn write(&self, buf: &[u8]) -> rustix::io::Result<usize> {
        match self.mode {
            How::Socket => rustix::net::send(
                self.fd(),
                buf,
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            ),
            _ => rustix::io::write(self.fd(), buf),
        }
    }

    /// Undoes what [`Sink::new`] changed on the shared description.
    pub fn restore(&self) {
        if let How::SharedNonBlocking(orig) = self.mode {
            let _ = rustix::fs::fcntl_setfl(std_fd(self.out), orig);
        }
    }
}

/// A new open file description of `fd`'s pipe or terminal, non-blocking for us alone.
fn reopen(fd: BorrowedFd<'_>) -> Option<How> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    rustix::fs::open(path.as_str(), flags, Mode::empty())
        .ok()
        .map(How::Reopened)
}
