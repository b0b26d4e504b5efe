//! Credit-based flow control for data-carrying streams (exec sessions, tunnel streams), sans-IO.
//!
//! Each direction starts with [`waypost_proto::INITIAL_WINDOW`] credits. [`Outbound`]: we send only what the
//! peer has granted. [`Inbound`]: the peer may send only what we granted; we buffer it until the
//! local end (a process, a socket) takes it, and grant credits back as it does. The credit
//! arithmetic is the one both ends share ([`waypost_proto::credit`]); the buffer is ours.

use waypost_proto::credit::{RecvWindow, SendCredits};

/// Our side of sending: the credits the peer granted.
pub type Outbound = SendCredits;

/// The peer sent more than it was granted, or data after its end: a protocol violation.
pub use waypost_proto::credit::Overrun;

/// Credits go back once half the window is consumed (or when the buffer ran dry with the window
/// below half), so a sender never stalls and small writes do not each cost a WindowUpdate.
const GRANT_AT: u32 = waypost_proto::INITIAL_WINDOW / 2;

/// Our side of receiving: data the peer sent and the local end has not taken yet.
#[derive(Debug)]
pub struct Inbound {
    // INVARIANT: buf.len() <= INITIAL_WINDOW: the window refuses anything more.
    buf: Vec<u8>,
    window: RecvWindow,
    /// The peer will send no more.
    eof: bool,
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound {
            buf: Vec::new(),
            window: RecvWindow::new(GRANT_AT),
            eof: false,
        }
    }
}

impl Inbound {
    /// Data arrived from the peer.
    pub fn push(&mut self, data: &[u8]) -> Result<(), Overrun> {
        if self.eof {
            return Err(Overrun);
        }
        self.window.received(data.len())?;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The peer will send nothing more.
    pub fn close(&mut self) {
        self.eof = true;
    }

    pub fn is_closed(&self) -> bool {
        self.eof
    }

    /// What is waiting for the local end.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The local end took `n` bytes. Returns credits to grant the peer if it is time: once half
    /// the window is consumed, or when the buffer ran dry with the window below half, so a
    /// sender never stalls and small writes do not each cost a WindowUpdate.
    pub fn took(&mut self, n: usize) -> Option<u32> {
        self.buf.drain(..n);
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        }
        self.window.took(n, self.buf.is_empty())
    }

    /// Everything the peer sent has been taken and it sent its end.
    pub fn finished(&self) -> bool {
        self.eof && self.buf.is_empty()
    }

    /// Drops what is buffered (the local end is gone).
    pub fn discard(&mut self) {
        let n = self.buf.len();
        self.took(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypost_proto::INITIAL_WINDOW;

    #[test]
    fn outbound_never_exceeds_the_grant() {
        let mut o = Outbound::default();
        let mut total = 0;
        while o.budget(16 * 1024) > 0 {
            let n = o.budget(16 * 1024);
            o.sent(n);
            total += n;
        }
        assert_eq!(total, INITIAL_WINDOW as usize);
        o.grant(10);
        assert_eq!(o.budget(16 * 1024), 10);
    }

    #[test]
    fn inbound_is_bounded_and_credits_come_back() {
        let mut i = Inbound::default();
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..4 {
            i.push(&chunk).unwrap();
        }
        assert_eq!(i.push(&[0]), Err(Overrun));
        assert_eq!(i.took(100 * 1024), None);
        assert_eq!(i.took(28 * 1024), Some(128 * 1024));
        i.push(&chunk).unwrap();
        i.push(&chunk).unwrap();
        assert_eq!(i.push(&[0]), Err(Overrun));
    }

    #[test]
    fn a_trickle_gets_credits_back_before_the_window_closes() {
        let mut i = Inbound::default();
        let mut granted = 0u64;
        let mut sent = 0u64;
        for _ in 0..200_000 {
            i.push(b"keys").unwrap();
            sent += 4;
            if let Some(g) = i.took(4) {
                granted += u64::from(g);
            }
        }
        assert!(
            sent - granted < u64::from(INITIAL_WINDOW),
            "the window never ran out"
        );
    }

    #[test]
    fn end_of_data() {
        let mut i = Inbound::default();
        i.push(b"abc").unwrap();
        i.close();
        assert!(!i.finished());
        assert_eq!(i.push(b"x"), Err(Overrun), "nothing after the end");
        i.took(3);
        assert!(i.finished());
    }
}
