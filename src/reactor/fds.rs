//! The fds of exec sessions and URL-service streams, in the agent's slots: starting and closing
//! them, and the reads and writes the agent asks for. Which bytes go where, and when a session or
//! stream ends, is the agent's business.

use super::Tok;
use crate::agent::{Agent, IoEvent, Pull, Read, Source};
use crate::exec::MAX_SESSIONS;
use crate::sys::{net, pty};
use crate::{debug, error};
use mio::unix::SourceFd;
use mio::{Interest, Registry};
use rustix::fs::OFlags;
use rustix::io::Errno;
use std::ffi::OsString;
use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

/// An exec session's fds: `fds[0]` is stdin (or the PTY master, which carries both directions),
/// `fds[1]`/`fds[2]` stdout/stderr pipes.
#[derive(Default)]
struct ExecFds {
    fds: [Option<OwnedFd>; 3],
    /// Readiness seen and not yet drained: readable for 0 (PTY), 1, 2; writable for 0.
    readable: [bool; 3],
    writable: bool,
}

/// A stream's socket to the app.
struct TunnelSock {
    sock: mio::net::TcpStream,
    readable: bool,
    writable: bool,
    /// The app shut its side (or the socket failed): reads go on until they return 0, a read
    /// shorter than asked no longer means drained.
    read_closed: bool,
}

/// A new exec session, as [`crate::agent::IoAction::StartExec`] describes it.
pub struct ExecSpec<'a> {
    pub slot: usize,
    pub id: u64,
    pub argv: &'a [OsString],
    pub env: &'a [(OsString, OsString)],
    pub pty: Option<(u32, u32)>,
    pub stdin: bool,
}

#[derive(Default)]
pub struct Fds {
    exec: [ExecFds; MAX_SESSIONS],
    /// Stream sockets by slot (grows up to `tunnel::MAX_STREAMS`).
    tunnels: Vec<Option<TunnelSock>>,
}

impl Fds {
    pub fn exec_ready(&mut self, slot: usize, which: usize, readable: bool, writable: bool) {
        let e = &mut self.exec[slot];
        e.readable[which] |= readable;
        e.writable |= writable && which == 0;
    }

    pub fn tunnel_ready(&mut self, slot: usize, readable: bool, writable: bool, closed: bool) {
        if let Some(Some(t)) = self.tunnels.get_mut(slot) {
            t.readable |= readable;
            t.writable |= writable;
            t.read_closed |= closed;
        }
    }

    /// Starts the process on a PTY or pipes, registers its fds, tells the agent.
    pub fn start_exec(
        &mut self,
        s: ExecSpec<'_>,
        registry: &Registry,
        agent: &mut Agent,
        now: Instant,
    ) {
        let child = match pty::spawn_session(s.argv, s.env, s.pty, s.stdin) {
            Ok(child) => child,
            Err((code, error)) => {
                return agent.handle_io(
                    IoEvent::ExecFailed {
                        slot: s.slot,
                        code,
                        error,
                    },
                    now,
                );
            }
        };
        let fds = [child.stdin, child.stdout, child.stderr];
        for (which, fd) in fds.iter().enumerate() {
            let Some(fd) = fd else { continue };
            let interest = match (which, s.pty.is_some()) {
                (0, true) => Interest::READABLE | Interest::WRITABLE,
                (0, false) => Interest::WRITABLE,
                _ => Interest::READABLE,
            };
            let nonblocking = rustix::fs::fcntl_getfl(fd)
                .and_then(|f| rustix::fs::fcntl_setfl(fd, f | OFlags::NONBLOCK));
            if nonblocking.is_err()
                || registry
                    .register(
                        &mut SourceFd(&fd.as_raw_fd()),
                        Tok::Exec(s.slot as u8, which as u8).token(),
                        interest,
                    )
                    .is_err()
            {
                error!("cannot watch exec session {}'s fds", s.id);
            }
        }
        let on_pty = if s.pty.is_some() {
            ", on a terminal"
        } else {
            ""
        };
        debug!(
            "exec session {} started {:?} (pid {}{on_pty})",
            s.id, s.argv[0], child.pid
        );
        self.exec[s.slot] = ExecFds {
            fds,
            readable: [true; 3],
            writable: true,
        };
        agent.handle_io(
            IoEvent::ExecStarted {
                slot: s.slot,
                pid: child.pid,
            },
            now,
        );
    }

    pub fn resize_exec(&self, slot: usize, rows: u32, cols: u32) {
        if let Some(master) = &self.exec[slot].fds[0] {
            let _ = pty::resize(master, rows as u16, cols as u16);
        }
    }

    /// Closes fd `which` of a session (or all of them).
    pub fn close_exec(&mut self, registry: &Registry, slot: usize, which: Option<usize>) {
        for fd in self.exec[slot]
            .fds
            .iter_mut()
            .enumerate()
            .filter(|(w, _)| which.is_none_or(|x| x == *w))
            .filter_map(|(_, fd)| fd.take())
        {
            let _ = registry.deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
    }

    /// Writes what the agent has for each session's stdin (or PTY) until it would block.
    pub fn exec_input(&mut self, agent: &mut Agent, now: Instant) {
        for (slot, e) in self.exec.iter_mut().enumerate() {
            while let Some(fd) = e.fds[0].as_ref().filter(|_| e.writable) {
                let data = agent.exec_pending(slot);
                if data.is_empty() {
                    break;
                }
                match rustix::io::write(fd, data) {
                    Ok(n) => agent.exec_wrote(slot, n, now),
                    Err(Errno::AGAIN) => e.writable = false,
                    Err(Errno::INTR) => {}
                    Err(_) => {
                        agent.exec_write_failed(slot);
                        break;
                    }
                }
            }
        }
    }

    /// Starts a connect to the app for stream `id` in `slot`.
    pub fn connect_tunnel(
        &mut self,
        slot: usize,
        id: u64,
        addr: SocketAddr,
        registry: &Registry,
        agent: &mut Agent,
        now: Instant,
    ) {
        match net::connect(addr) {
            Ok(mut sock) => {
                if registry
                    .register(
                        &mut sock,
                        Tok::Tunnel(slot as u16).token(),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_ok()
                {
                    if self.tunnels.len() <= slot {
                        self.tunnels.resize_with(slot + 1, || None);
                    }
                    self.tunnels[slot] = Some(TunnelSock {
                        sock,
                        readable: false,
                        writable: false,
                        read_closed: false,
                    });
                    return;
                }
            }
            Err(e) => debug!("stream {id}: connecting to {addr}: {e}"),
        }
        agent.handle_io(IoEvent::TunnelNoSocket(slot), now);
    }

    pub fn shutdown_tunnel(&self, slot: usize) {
        if let Some(Some(t)) = self.tunnels.get(slot) {
            let _ = t.sock.shutdown(std::net::Shutdown::Write);
        }
    }

    pub fn close_tunnel(&mut self, registry: &Registry, slot: usize) {
        if let Some(Some(mut t)) = self.tunnels.get_mut(slot).map(Option::take) {
            let _ = registry.deregister(&mut t.sock);
        }
        while self.tunnels.last().is_some_and(Option::is_none) {
            self.tunnels.pop();
        }
    }

    /// Finishes connects and writes what the agent has for each app socket until it would block.
    pub fn tunnel_io(&mut self, registry: &Registry, agent: &mut Agent, now: Instant) {
        for slot in 0..self.tunnels.len() {
            let Some(t) = &mut self.tunnels[slot] else {
                continue;
            };
            if !agent.tunnel_connected(slot) && (t.writable || t.readable) {
                match t
                    .sock
                    .take_error()
                    .ok()
                    .flatten()
                    .map(Err)
                    .unwrap_or_else(|| t.sock.peer_addr().map(|_| ()))
                {
                    Ok(()) => agent.handle_io(IoEvent::TunnelConnected(slot), now),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(error) => {
                        let _ = registry.deregister(&mut t.sock);
                        self.tunnels[slot] = None;
                        agent.handle_io(
                            IoEvent::TunnelRefused {
                                slot,
                                error: &error,
                            },
                            now,
                        );
                        continue;
                    }
                }
            }
            while t.writable {
                let data = agent.tunnel_pending(slot);
                if data.is_empty() {
                    break;
                }
                match t.sock.write(data) {
                    Ok(n) => agent.tunnel_wrote(slot, n, now),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => t.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        agent.tunnel_write_failed(slot, &e, now);
                        break;
                    }
                }
            }
        }
    }
}

impl Pull for Fds {
    fn read(&mut self, src: Source, buf: &mut [u8]) -> Read {
        match src {
            Source::Exec(slot, which) => {
                let e = &mut self.exec[slot];
                let Some(fd) = e.fds[which].as_ref().filter(|_| e.readable[which]) else {
                    return Read::Blocked;
                };
                match rustix::io::read(fd, buf) {
                    Ok(n) if n > 0 => Read::Data(n),
                    // 0: EOF; a PTY master says EIO once the terminal side is closed everywhere.
                    r => {
                        e.readable[which] = false;
                        if matches!(r, Ok(_) | Err(Errno::IO)) {
                            Read::Eof
                        } else {
                            Read::Blocked
                        }
                    }
                }
            }
            Source::Tunnel(slot) => {
                let Some(Some(t)) = self
                    .tunnels
                    .get_mut(slot)
                    .filter(|t| t.as_ref().is_some_and(|t| t.readable))
                else {
                    return Read::Blocked;
                };
                match t.sock.read(buf) {
                    Ok(0) => Read::Eof,
                    Ok(n) => {
                        // Edge-triggered: a short read emptied the socket, and new bytes (or the
                        // app's FIN, which sets read_closed) bring a new event. Saves the read
                        // that would only say EAGAIN: half of all reads under keep-alive load.
                        if n < buf.len() && !t.read_closed {
                            t.readable = false;
                        }
                        Read::Data(n)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        t.readable = false;
                        Read::Blocked
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => Read::Blocked,
                    Err(e) => Read::Failed(e),
                }
            }
        }
    }
}
