//! The connection to the server, mechanically: the addresses of an attempt (resolved off the
//! loop), TCP, the optional proxy and TLS (`crate::tls::Conn`), and the buffers between TLS and
//! frames. The agent decides when to connect, to which entry of the server list, and what to
//! send; this only moves bytes.

use crate::agent::{Agent, IoEvent};
use crate::error::Error;
use crate::session::Target;
use crate::settings::{HostPort, Settings};
use crate::sys::net::{self, Resolved};
use crate::tls::{Conn, Received};
use crate::wire::{RecvBuf, SendBuf};
use crate::{debug, trace, warn};
use mio::{Interest, Registry, Token, Waker};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;
use waypost_proto::{Frame, Kind};

/// One entry of `WAYPOST_SERVER`.
struct Entry {
    server: HostPort,
    /// The HTTP proxy to go through, unless NO_PROXY exempts this server.
    proxy: Option<HostPort>,
}

pub struct Link {
    tls: Arc<rustls::ClientConfig>,
    /// The server list, in the order given (at most `settings::MAX_SERVERS`).
    entries: Vec<Entry>,
    /// The entry of the current attempt.
    current: usize,
    /// The current attempt's turn: which resolved address goes first.
    turn: u32,
    conn: Option<Conn>,
    token: Token,
    /// What `conn`'s socket is registered for.
    interest: Option<Interest>,
    /// Addresses of the current attempt, tried in order.
    addrs: Vec<SocketAddr>,
    /// An answer from the DNS thread, while one is outstanding.
    dns: Option<Receiver<Resolved>>,
    waker: Arc<Waker>,
    rbuf: RecvBuf,
    wbuf: SendBuf,
}

impl Link {
    /// `token` is the socket's, `waker` wakes the loop when a DNS answer is in.
    pub fn new(
        settings: &Settings,
        servers: &[HostPort],
        token: Token,
        waker: Waker,
    ) -> Result<Link, Error> {
        if settings.token.is_none() {
            return Err(Error::Env {
                name: "WAYPOST_TOKEN",
                why: "is not set, but WAYPOST_SERVER is".into(),
            });
        }
        if settings.tls_skip_verify {
            warn!(
                "WAYPOST_TLS_SKIP_VERIFY=1: the server's certificate is not checked (development only)"
            );
        }
        let tls = crate::tls::client_config(&settings.ca, settings.tls_skip_verify)?;
        let entries = servers
            .iter()
            .map(|server| Entry {
                server: server.clone(),
                proxy: settings
                    .https_proxy
                    .clone()
                    .filter(|_| !settings.bypasses_proxy(&server.host)),
            })
            .collect();
        let (conn, interest, addrs, dns, waker) = (None, None, Vec::new(), None, Arc::new(waker));
        Ok(Link {
            tls,
            entries,
            current: 0,
            turn: 0,
            conn,
            token,
            interest,
            addrs,
            dns,
            waker,
            rbuf: RecvBuf::new(),
            wbuf: SendBuf::default(),
        })
    }

    /// The entry of the current attempt.
    fn entry(&self) -> &Entry {
        &self.entries[self.current]
    }

    /// Starts an attempt at `to.entry`: resolves (off the loop unless the host needs no DNS),
    /// then connects.
    pub fn connect(&mut self, registry: &Registry, agent: &mut Agent, to: Target, now: Instant) {
        self.current = to.entry.min(self.entries.len().saturating_sub(1));
        self.turn = to.turn;
        let entry = self.entry();
        let target = entry.proxy.as_ref().unwrap_or(&entry.server).clone();
        if self.entries.len() > 1 {
            debug!("connecting to {}", net::format_host_port(&entry.server));
        }
        self.addrs.clear();
        // An answer still on its way is for an abandoned attempt.
        self.dns = None;
        if let Some(addrs) = net::literal_addrs(&target) {
            self.addrs = addrs;
            return self.connect_next(registry, agent, now);
        }
        match net::resolve(target, Arc::clone(&self.waker)) {
            Ok(rx) => self.dns = Some(rx),
            Err(e) => agent.handle_io(
                IoEvent::Closed(&format!("cannot start the DNS thread: {e}")),
                now,
            ),
        }
    }

    /// The DNS thread woke us.
    pub fn resolved(&mut self, registry: &Registry, agent: &mut Agent, now: Instant) {
        let Some(answer) = self.dns.as_ref().and_then(|rx| rx.try_recv().ok()) else {
            return;
        };
        self.dns = None;
        if !agent.has_connection() || self.conn.is_some() {
            return; // the attempt was abandoned meanwhile
        }
        match answer {
            Ok(mut addrs) if !addrs.is_empty() => {
                // Several addresses for one name count like a list: each attempt starts at
                // another one (the session's turn), the rest follow on refusal.
                let first = self.turn as usize % addrs.len();
                addrs.rotate_left(first);
                self.addrs = addrs;
                self.connect_next(registry, agent, now);
            }
            Ok(_) => agent.handle_io(IoEvent::Closed("the name has no addresses"), now),
            Err(why) => agent.handle_io(IoEvent::Closed(&why), now),
        }
    }

    /// Starts a TCP connect to the next address of the attempt.
    fn connect_next(&mut self, registry: &Registry, agent: &mut Agent, now: Instant) {
        let mut last_err = String::from("no address to connect to");
        while !self.addrs.is_empty() {
            let addr = self.addrs.remove(0);
            let entry = &self.entries[self.current];
            let target = entry
                .proxy
                .is_some()
                .then(|| net::format_host_port(&entry.server));
            let conn = net::connect(addr)
                .map_err(Error::io("connecting"))
                .and_then(|sock| {
                    Conn::new(
                        sock,
                        Arc::clone(&self.tls),
                        &entry.server.host,
                        target.as_deref(),
                    )
                });
            match conn {
                Ok(mut conn) => {
                    let interest = conn.interest();
                    if let Err(e) = registry.register(conn.socket(), self.token, interest) {
                        last_err = format!("registering the connection: {e}");
                        continue;
                    }
                    trace!("connecting to {addr}");
                    (self.conn, self.interest) = (Some(conn), Some(interest));
                    return;
                }
                Err(e) => last_err = format!("{addr}: {e}"),
            }
        }
        agent.handle_io(IoEvent::Closed(&last_err), now);
    }

    /// Closes the connection (`polite`: TLS close_notify first) and forgets its buffers.
    pub fn drop_conn(&mut self, registry: &Registry, polite: bool) {
        if let Some(mut conn) = self.conn.take() {
            if polite {
                conn.close();
            }
            let _ = registry.deregister(conn.socket());
        }
        self.interest = None;
        self.rbuf.clear();
        self.wbuf.clear();
    }

    /// The socket is ready: advances connect → proxy → TLS until the connection is open.
    pub fn drive(&mut self, registry: &Registry, agent: &mut Agent, now: Instant) {
        let Some(conn) = self.conn.as_mut().filter(|c| !c.is_open()) else {
            return;
        };
        match conn.drive() {
            Ok(true) => agent.handle_io(IoEvent::Connected, now),
            Ok(false) => {}
            Err(e) => {
                // A refused connection may have other addresses to try.
                let more = !self.addrs.is_empty()
                    && matches!(
                        e,
                        Error::Io {
                            context: "connecting",
                            ..
                        }
                    );
                self.drop_conn(registry, false);
                if more {
                    self.connect_next(registry, agent, now);
                } else {
                    agent.handle_io(IoEvent::Closed(&e.to_string()), now);
                }
            }
        }
    }

    /// The next frame from the server, reading from the socket as needed; `None`: nothing more
    /// for now. `Err`: the connection is over (closed, failed, or a bad frame) and dropped.
    pub fn next_frame(&mut self, registry: &Registry) -> Option<Result<Kind, String>> {
        let why = loop {
            match self.rbuf.next_frame() {
                Some(Ok(Frame { kind: Some(kind) })) => return Some(Ok(kind)),
                Some(Ok(Frame { kind: None })) => {
                    trace!("ignoring a frame of an unknown kind");
                    continue;
                }
                Some(Err(e)) => break format!("the server sent a bad frame: {e}"),
                None => {}
            }
            let conn = self.conn.as_mut().filter(|c| c.is_open())?;
            match conn.read(self.rbuf.space()) {
                Ok(Received::Data(n)) => self.rbuf.filled(n),
                Ok(Received::Blocked) => return None,
                Ok(Received::Closed) => break "closed by the server".into(),
                Err(e) => break e.to_string(),
            }
        };
        self.drop_conn(registry, false);
        Some(Err(why))
    }

    /// Moves frames into TLS and TLS into the socket until either side is full; `fill` encodes
    /// the next frames into the send buffer (while it wants more). Then keeps the socket's
    /// registration in step.
    pub fn write(&mut self, registry: &Registry, mut fill: impl FnMut(&mut SendBuf)) {
        let Some(conn) = &mut self.conn else { return };
        while conn.is_open() {
            fill(&mut self.wbuf);
            // The buffer filled before every source was drained: after this write, pull again
            // (the sources were not read to WouldBlock, so no new edge will come).
            let more = !self.wbuf.wants_more();
            let n = if self.wbuf.is_empty() {
                0
            } else {
                conn.write(self.wbuf.pending())
            };
            self.wbuf.consume(n);
            let drained = match conn.flush() {
                Ok(d) => d,
                Err(e) => {
                    // The read side will see the connection close; leave it to that path.
                    debug!("write failed: {e}");
                    break;
                }
            };
            if (self.wbuf.is_empty() && !more) || (n == 0 && !drained) {
                break;
            }
        }
        let want = conn.interest();
        if self.interest != Some(want)
            && registry.reregister(conn.socket(), self.token, want).is_ok()
        {
            self.interest = Some(want);
        }
    }

    /// At exit: TLS close_notify, as far as the socket takes it.
    pub fn close(&mut self) {
        if let Some(conn) = &mut self.conn {
            conn.close();
        }
    }
}
