//! URL-service streams, sans-IO: one per visitor connection the server's ingress accepted, each
//! carried to a TCP connection to the app (127.0.0.1, then ::1, on `PORT` or another port that
//! `WAYPOST_URL_PORTS` allows), with credit-based flow control both ways and TCP-like half-close.
//!
//! Each stream owns its state; the agent (`crate::agent`) keeps them in a table whose slots the
//! reactor's socket table shares.

use crate::flow::{Inbound, Outbound, Overrun};
use crate::settings::UrlPorts;
use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Concurrent streams per instance; more are refused cleanly.
pub const MAX_STREAMS: usize = 1024;
/// Bytes per StreamData frame.
pub const CHUNK: usize = 16 * 1024;
/// While a held stream waits for the (re)starting app to listen, connects are retried this often.
pub const RETRY: Duration = Duration::from_millis(50);

pub fn admit(disabled: bool, active: usize) -> Result<(), String> {
    if disabled {
        return Err("the URL service is disabled on this instance (WAYPOST_DISABLE_URL=1)".into());
    }
    if active >= MAX_STREAMS {
        return Err(format!(
            "too many streams on this instance (at most {MAX_STREAMS})"
        ));
    }
    Ok(())
}

/// The port a StreamOpen's `target_port` names (0 = the app's `PORT`), if `allowed` lets a stream
/// reach it; else the refusal the server gets (and shows the visitor).
pub fn target_port(target_port: u32, app_port: u16, allowed: &UrlPorts) -> Result<u16, String> {
    let port = match u16::try_from(target_port) {
        Ok(0) => return Ok(app_port),
        Ok(p) if allowed.allows(app_port, p) => return Ok(p),
        Ok(p) => p,
        // Never truncate: 70000 as u16 would be some other port, maybe an allowed one.
        Err(_) => return Err(format!("port {target_port} is not a TCP port (1-65535)")),
    };
    let mut why = format!("port {port} is not in WAYPOST_URL_PORTS (allowed: ");
    // (With `*` every port was allowed above.)
    let list: &[u16] = match allowed {
        UrlPorts::Only(list) => list,
        UrlPorts::Any => &[],
    };
    // The app's PORT in its place among the listed ports.
    let mut app = Some(app_port).filter(|p| list.binary_search(p).is_err());
    for &p in list {
        if let Some(a) = app.filter(|&a| a < p) {
            let _ = write!(why, "{a}, ");
            app = None;
        }
        let _ = write!(why, "{p}, ");
    }
    if let Some(a) = app {
        let _ = write!(why, "{a}, ");
    }
    why.truncate(why.len() - 2);
    why.push(')');
    Err(why)
}

#[derive(Debug)]
pub struct Stream {
    id: u64,
    /// The port on 127.0.0.1 (then ::1) this stream connects to, checked against
    /// `WAYPOST_URL_PORTS`; every connect of the stream, held or retried, goes here.
    port: u16,
    /// App → server.
    output: Outbound,
    /// Server → app.
    input: Inbound,
    /// The reactor holds a socket for it (connecting or connected).
    has_sock: bool,
    connected: bool,
    /// The address to try next if this connect is refused (::1 after 127.0.0.1).
    fallback: Option<SocketAddr>,
    /// The app closed its side (we read EOF); a half-close was or will be sent.
    app_eof: bool,
    fin_sent: bool,
    /// The server's end arrived and everything before it was written: the socket's write side
    /// is shut down.
    shut_down: bool,
    /// Connects that are refused are retried until then (the app is restarting).
    retry_until: Option<Instant>,
    /// Next connect attempt, while waiting to retry.
    retry_at: Option<Instant>,
}

impl Stream {
    pub fn new(id: u64, port: u16, retry_until: Option<Instant>) -> Stream {
        Stream {
            id,
            port,
            output: Outbound::default(),
            input: Inbound::default(),
            has_sock: false,
            connected: false,
            fallback: None,
            app_eof: false,
            fin_sent: false,
            shut_down: false,
            retry_until,
            retry_at: None,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The port this stream connects to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Held for a restart: the first connect waits for the new child, until `until` at most.
    pub fn hold(&mut self, now: Instant, until: Instant) {
        self.retry_at = Some(now + RETRY);
        self.retry_until = Some(until);
    }

    /// A connect was started; `fallback`: the address to try if it is refused.
    pub fn connecting(&mut self, fallback: Option<SocketAddr>) {
        self.has_sock = true;
        if fallback.is_some() {
            self.fallback = fallback;
        }
    }

    /// The address to try after a refusal, once.
    pub fn take_fallback(&mut self) -> Option<SocketAddr> {
        self.fallback.take()
    }

    pub fn handle_connected(&mut self) {
        self.connected = true;
    }

    /// The socket is gone (the connect failed, or could not be started).
    pub fn handle_no_socket(&mut self) {
        self.has_sock = false;
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Connected to the app, or about to be: a restart waits for it.
    pub fn is_busy(&self) -> bool {
        self.connected || self.has_sock
    }

    /// When the next connect attempt is due, while waiting to retry.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Whether a connect should be retried now (true once per retry).
    pub fn retry_due(&mut self, now: Instant) -> bool {
        let due = !self.has_sock && self.retry_at.is_some_and(|t| now >= t);
        if due {
            self.retry_at = None;
        }
        due
    }

    /// The hold after a restart: not yet connected streams retry refused connects until then.
    pub fn extend_hold(&mut self, until: Instant) {
        if !self.connected {
            self.retry_until = Some(until);
        }
    }

    /// How many bytes to read from the app now.
    pub fn budget(&self) -> usize {
        if !self.connected || self.app_eof {
            0
        } else {
            self.output.budget(CHUNK)
        }
    }

    /// `n` bytes from the app were sent.
    pub fn sent(&mut self, n: usize) {
        self.output.sent(n);
    }

    /// The server granted more credits.
    pub fn handle_window(&mut self, credits: u32) {
        self.output.grant(credits);
    }

    /// The app closed its side: the half-close goes out now.
    pub fn handle_app_eof(&mut self) {
        self.app_eof = true;
        self.fin_sent = true;
    }

    /// Data from the server; `Err` beyond the window we granted.
    pub fn handle_data(&mut self, data: &[u8]) -> Result<(), Overrun> {
        self.input.push(data)
    }

    /// The server's half-close.
    pub fn handle_close(&mut self) {
        self.input.close();
    }

    /// What waits to be written to the app.
    pub fn pending(&self) -> &[u8] {
        self.input.pending()
    }

    /// `n` bytes were written to the app; returns credits to grant back, if due.
    pub fn wrote(&mut self, n: usize) -> Option<u32> {
        self.input.took(n)
    }

    /// The server's end is in and written: shut the app socket's write side now.
    pub fn should_shut_down(&self) -> bool {
        self.connected && !self.shut_down && self.input.finished()
    }

    pub fn mark_shut_down(&mut self) {
        self.shut_down = true;
    }

    /// Both directions are over: the stream can go.
    pub fn finished(&self) -> bool {
        self.fin_sent && self.shut_down
    }

    /// A connect was refused at `now`: retry later, or give up (false).
    pub fn refused(&mut self, now: Instant) -> bool {
        match self.retry_until {
            Some(until) if now + RETRY < until => {
                self.retry_at = Some(now + RETRY);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission() {
        assert!(admit(false, 0).is_ok());
        assert!(admit(true, 0).unwrap_err().contains("disabled"));
        assert!(admit(false, MAX_STREAMS).unwrap_err().contains("1024"));
    }

    #[test]
    fn target_ports_are_checked_against_the_allow_list() {
        let only = |ports: &[u16]| UrlPorts::Only(heapless::Vec::from_slice(ports).unwrap());
        let none = only(&[]);
        // 0 and the app's own number both mean the app.
        assert_eq!(target_port(0, 5000, &none), Ok(5000));
        assert_eq!(target_port(5000, 5000, &none), Ok(5000));
        assert_eq!(
            target_port(22, 5000, &none),
            Err("port 22 is not in WAYPOST_URL_PORTS (allowed: 5000)".into())
        );
        let some = only(&[80, 8080]);
        assert_eq!(target_port(8080, 5000, &some), Ok(8080));
        assert_eq!(target_port(0, 5000, &some), Ok(5000));
        // The app's port takes its place in the sorted list: first, between, last, or once.
        for (app, allowed) in [
            (22, "22, 80, 8080"),
            (5000, "80, 5000, 8080"),
            (9000, "80, 8080, 9000"),
            (80, "80, 8080"),
        ] {
            assert_eq!(
                target_port(443, app, &some),
                Err(format!(
                    "port 443 is not in WAYPOST_URL_PORTS (allowed: {allowed})"
                )),
                "PORT={app}"
            );
        }
        assert_eq!(target_port(65535, 5000, &UrlPorts::Any), Ok(65535));
        assert_eq!(target_port(1, 5000, &UrlPorts::Any), Ok(1));
        // Beyond u16: refused, never truncated (70000 as u16 is 4464; 65536 + 8080 is 73616).
        for big in [70_000, 65_536 + 8080, u32::MAX] {
            for allowed in [&some, &UrlPorts::Any] {
                assert_eq!(
                    target_port(big, 5000, allowed),
                    Err(format!("port {big} is not a TCP port (1-65535)"))
                );
            }
        }
    }

    #[test]
    fn half_close_both_ways() {
        let mut s = Stream::new(1, 5000, None);
        assert_eq!(s.budget(), 0, "nothing to read before connecting");
        s.connecting(None);
        s.handle_connected();
        assert_eq!(s.budget(), CHUNK);
        s.handle_data(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        s.handle_close();
        assert!(!s.should_shut_down(), "request not written yet");
        let n = s.pending().len();
        s.wrote(n);
        assert!(s.should_shut_down());
        s.mark_shut_down();
        assert!(!s.finished(), "the response is still coming");
        s.handle_app_eof();
        assert_eq!(s.budget(), 0);
        assert!(s.finished());
    }

    #[test]
    fn refused_connects_retry_only_while_held() {
        let t0 = Instant::now();
        let mut s = Stream::new(1, 5000, None);
        assert!(!s.refused(t0));
        let mut s = Stream::new(1, 5000, Some(t0 + Duration::from_secs(1)));
        assert!(s.refused(t0));
        assert_eq!(s.retry_at(), Some(t0 + RETRY));
        assert!(!s.retry_due(t0), "not yet");
        assert!(s.retry_due(t0 + RETRY));
        assert!(!s.retry_due(t0 + RETRY), "once");
        assert!(!s.refused(t0 + Duration::from_secs(1)), "the hold is over");
    }
}
