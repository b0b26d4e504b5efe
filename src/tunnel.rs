//! URL-service streams, sans-IO: one per visitor connection the server's ingress accepted, each
//! carried to a TCP connection to the app (127.0.0.1, then ::1, on `PORT`), with credit-based
//! flow control both ways and TCP-like half-close.
//!
//! The reactor owns the sockets in a table parallel to this state.

use crate::flow::{Inbound, Outbound};
use std::time::{Duration, Instant};

/// Concurrent streams per instance (issue #7); more are refused cleanly.
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
        return Err(format!("too many streams on this instance (at most {MAX_STREAMS})"));
    }
    Ok(())
}

#[derive(Debug)]
pub struct Stream {
    pub id: u64,
    /// App → server.
    pub output: Outbound,
    /// Server → app.
    pub input: Inbound,
    pub connected: bool,
    /// The app closed its side (we read EOF); a half-close was or will be sent.
    pub app_eof: bool,
    pub fin_sent: bool,
    /// The server's end arrived and everything before it was written: the socket's write side
    /// is shut down.
    pub shut_down: bool,
    /// Connects that are refused are retried until then (the app is restarting).
    pub retry_until: Option<Instant>,
    /// Next connect attempt, while waiting to retry.
    pub retry_at: Option<Instant>,
}

impl Stream {
    pub fn new(id: u64, retry_until: Option<Instant>) -> Stream {
        Stream {
            id,
            output: Outbound::default(),
            input: Inbound::default(),
            connected: false,
            app_eof: false,
            fin_sent: false,
            shut_down: false,
            retry_until,
            retry_at: None,
        }
    }

    /// How many bytes to read from the app now.
    pub fn budget(&self) -> usize {
        if !self.connected || self.app_eof { 0 } else { self.output.budget(CHUNK) }
    }

    /// The server's end is in and written: shut the app socket's write side now.
    pub fn should_shut_down(&self) -> bool {
        self.connected && !self.shut_down && self.input.finished()
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
    fn half_close_both_ways() {
        let mut s = Stream::new(1, None);
        assert_eq!(s.budget(), 0, "nothing to read before connecting");
        s.connected = true;
        assert_eq!(s.budget(), CHUNK);
        s.input.push(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        s.input.close();
        assert!(!s.should_shut_down(), "request not written yet");
        let n = s.input.pending().len();
        s.input.took(n);
        assert!(s.should_shut_down());
        s.shut_down = true;
        assert!(!s.finished(), "the response is still coming");
        s.app_eof = true;
        assert_eq!(s.budget(), 0);
        s.fin_sent = true;
        assert!(s.finished());
    }

    #[test]
    fn refused_connects_retry_only_while_held() {
        let t0 = Instant::now();
        let mut s = Stream::new(1, None);
        assert!(!s.refused(t0));
        let mut s = Stream::new(1, Some(t0 + Duration::from_secs(1)));
        assert!(s.refused(t0));
        assert_eq!(s.retry_at, Some(t0 + RETRY));
        assert!(!s.refused(t0 + Duration::from_secs(1)), "the hold is over");
    }
}
