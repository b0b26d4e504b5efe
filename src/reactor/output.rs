//! The child's output on its way out: each captured pipe is read into a [`Relay`], written to our
//! own stdout/stderr without blocking ([`Sink`]) and offered to the log shipper (the agent); our
//! own log lines go to stderr after the child's pending stderr bytes.

use crate::agent::Agent;
use crate::logger;
use crate::relay::Relay;
use crate::sys::sink::{Out, Sink};
use crate::sys::spawn::Stdio;
use crate::{debug, error, warn};
use mio::unix::SourceFd;
use mio::{Interest, Registry};
use rustix::fs::OFlags;
use rustix::io::Errno;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use waypost_proto::LogStream;

/// Own log lines waiting for stderr: a handful of lines; beyond this they are dropped (counted
/// by the logger queue before they get here).
const OWN_LOG_CAP: usize = 16 * 1024;

/// One captured output stream of the child: its pipe, and the relay to our fd and the shipper.
struct Pipe {
    /// Our read end; `None` when not captured or at EOF.
    fd: Option<OwnedFd>,
    /// Readiness seen and not yet drained to `WouldBlock`.
    readable: bool,
    /// The pipe reached EOF; the log shipper is told once it has every byte before it.
    eof: bool,
    relay: Relay,
}

pub struct Output {
    /// Whether the child's stdout/stderr go through us (else it inherits ours).
    capture: [bool; 2],
    pipes: [Pipe; 2],
    sinks: [Sink; 2],
    /// Formatted own log lines not yet written to stderr.
    own_log: Vec<u8>,
}

/// Wall-clock milliseconds since the Unix epoch (for log timestamps).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Output {
    /// `capture`: whether stdout/stderr are captured; `token(out)`: the sink's token.
    pub fn new(
        capture: [bool; 2],
        registry: &Registry,
        token: impl Fn(Out) -> mio::Token,
    ) -> Output {
        let sinks = [Sink::new(Out::Stdout), Sink::new(Out::Stderr)];
        for sink in &sinks {
            // Only the streams we write to need readiness; stderr always carries our own lines.
            if sink.can_block() && (sink.out == Out::Stderr || capture[sink.out as usize]) {
                let fd = sink.fd().as_raw_fd();
                if registry
                    .register(&mut SourceFd(&fd), token(sink.out), Interest::WRITABLE)
                    .is_err()
                {
                    debug!(
                        "own {:?} cannot be polled; writing to it directly",
                        sink.out
                    );
                }
            }
        }
        let pipes = std::array::from_fn(|_| Pipe {
            fd: None,
            readable: false,
            eof: false,
            relay: Relay::new(),
        });
        Output {
            capture,
            pipes,
            sinks,
            own_log: Vec::new(),
        }
    }

    /// What the child's `out` is connected to.
    pub fn stdio(&self, out: Out) -> Stdio {
        if self.capture[out as usize] {
            Stdio::Pipe
        } else {
            Stdio::Inherit
        }
    }

    /// The new child's pipe for `out`.
    pub fn add_pipe(&mut self, out: Out, pipe: OwnedFd, registry: &Registry, token: mio::Token) {
        let ok = rustix::fs::fcntl_getfl(&pipe)
            .and_then(|f| rustix::fs::fcntl_setfl(&pipe, f | OFlags::NONBLOCK));
        let reg = registry.register(&mut SourceFd(&pipe.as_raw_fd()), token, Interest::READABLE);
        if let Err(e) = ok.map_err(std::io::Error::from).and(reg) {
            // Cannot happen for a fresh pipe; if it did, reading it blocking would stall the loop.
            return error!("cannot watch the child's {out:?}: {e}; its output is lost");
        }
        let p = &mut self.pipes[out as usize];
        (p.fd, p.readable) = (Some(pipe), true);
    }

    pub fn readable(&mut self, out: Out) {
        self.pipes[out as usize].readable = true;
    }

    pub fn writable(&mut self, out: Out) {
        self.sinks[out as usize].writable = true;
    }

    /// Moves bytes from the child's pipe to our fd and to the log shipper until no side can make
    /// progress. A relay byte is freed once both have it, so a log buffer that refuses bytes
    /// (block mode, server behind) stops the reading like a slow stdout does: the pipe fills and
    /// the app's writes wait.
    pub fn pump(&mut self, out: Out, agent: &mut Agent, registry: &Registry, now: Instant) {
        let i = out as usize;
        let stream = if out == Out::Stdout {
            LogStream::Stdout
        } else {
            LogStream::Stderr
        };
        let (p, sink) = (&mut self.pipes[i], &mut self.sinks[i]);
        loop {
            let mut progress = false;
            let fresh = p.relay.unlogged();
            if !fresh.is_empty() {
                let took = agent.handle_output(stream, fresh, wall_us(), now);
                p.relay.logged(took);
                progress |= took > 0;
            }
            if p.eof && p.relay.unlogged().is_empty() {
                p.eof = false;
                agent.handle_output_eof(stream, now);
            }
            // (A new child's pipe waits until the old one's end was told: its first line must
            // not be glued to the old child's last partial one.)
            if let Some(fd) =
                p.fd.as_ref()
                    .filter(|_| p.readable && !p.relay.is_full() && !p.eof)
            {
                match rustix::io::read(fd, p.relay.space()) {
                    Ok(0) => progress = p.close(registry),
                    Ok(n) => {
                        p.relay.filled(n);
                        progress = true;
                    }
                    Err(Errno::AGAIN) => p.readable = false,
                    Err(Errno::INTR) => progress = true,
                    Err(e) => {
                        warn!("reading the child's {out:?}: {e}");
                        p.close(registry);
                    }
                }
            }
            if !p.relay.is_empty() && sink.writable {
                if sink.broken {
                    p.relay.clear();
                    progress = true;
                } else {
                    match sink.write(p.relay.pending()) {
                        Ok(n) => {
                            p.relay.consume(n);
                            progress = true;
                        }
                        Err(Errno::AGAIN) => sink.writable = false,
                        Err(Errno::INTR) => progress = true,
                        Err(e) => {
                            // Our reader is gone. Mirror it to the app: closing its pipe makes
                            // its next write fail (EPIPE/SIGPIPE) as if it wrote to ours.
                            warn!("writing {out:?}: {e}; closing the app's {out:?} too");
                            sink.broken = true;
                            p.relay.clear();
                            progress = p.close(registry);
                        }
                    }
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// Writes queued own log lines to stderr, after the child's pending stderr bytes so lines do
    /// not interleave mid-buffer; with a server they also go to the log shipper.
    pub fn flush_own_log(&mut self, agent: &mut Agent) {
        if logger::pending() {
            let (ms, now) = (wall_ms(), Instant::now());
            let own = &mut self.own_log;
            logger::drain(|rec| {
                agent.handle_own_log(&rec, ms as i64 * 1000, now);
                if own.len() < OWN_LOG_CAP {
                    logger::format_line(&rec, ms, own);
                }
            });
        }
        let sink = &mut self.sinks[Out::Stderr as usize];
        while !self.own_log.is_empty()
            && self.pipes[Out::Stderr as usize].relay.is_empty()
            && sink.writable
            && !sink.broken
        {
            match sink.write(&self.own_log) {
                Ok(n) => drop(self.own_log.drain(..n)),
                Err(Errno::AGAIN) => sink.writable = false,
                Err(Errno::INTR) => {}
                Err(_) => sink.broken = true,
            }
        }
        if sink.broken {
            self.own_log.clear();
        }
    }

    /// While finishing: (a pipe is open or has bytes for our fds, output waits for the log
    /// shipper). Bytes the shipper has not taken yet (block mode: the server is behind), and a
    /// pipe we stopped reading for them, are last words for the server: they get the flush
    /// timeout, not the local cleanup's grace.
    pub fn leftovers(&self) -> (bool, bool) {
        let for_logs = |p: &Pipe| !p.relay.unlogged().is_empty() || p.eof;
        let mut both = self.pipes.iter().zip(&self.sinks);
        let output = both.any(|(p, sink)| {
            (p.fd.is_some() && !for_logs(p)) || (!p.relay.is_empty() && !sink.broken)
        });
        (output, self.pipes.iter().any(for_logs))
    }

    /// At exit: what the log shipper could not take in time (block mode, a server that never
    /// caught up) still goes to our own stdout/stderr, as far as they take it without blocking —
    /// the local copy stays whole; then our fds are restored.
    pub fn finish(&mut self, agent: &mut Agent, registry: &Registry, now: Instant) {
        agent.stop_logs();
        for out in [Out::Stdout, Out::Stderr] {
            let p = &mut self.pipes[out as usize];
            p.readable = p.fd.is_some();
            self.pump(out, agent, registry, now);
        }
        self.flush_own_log(agent);
        self.sinks.iter().for_each(Sink::restore);
    }
}

impl Pipe {
    /// Closes the pipe after its end (or after our reader went away).
    fn close(&mut self, registry: &Registry) -> bool {
        if let Some(fd) = self.fd.take() {
            let _ = registry.deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        self.readable = false;
        self.eof = true;
        true
    }
}

/// Wall-clock microseconds since the Unix epoch (for log entries).
fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Reports an error that ends the entrypoint before the loop runs, and gives its exit code.
pub fn fail_early(e: &crate::error::Error) -> i32 {
    let mut line = Vec::new();
    logger::format_line(
        &logger::Record {
            level: logger::Level::Error,
            msg: e.to_string(),
        },
        wall_ms(),
        &mut line,
    );
    let _ = rustix::io::write(rustix::stdio::stderr(), &line);
    e.exit_code()
}
