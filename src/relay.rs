//! A fixed-capacity byte buffer between one of the child's output pipes and our own stdout or
//! stderr. It never grows: when it is full the reactor stops reading the pipe, the pipe fills,
//! and the child blocks on write exactly as it would if it wrote to our stdout directly.

/// Bytes held per stream: a default pipe's worth, so one read drains a full pipe (fewer system
/// calls on a busy stream). Allocated on first use; an idle stream costs nothing.
pub const RELAY_CAP: usize = 64 * 1024;

pub struct Relay {
    buf: Box<[u8]>,
    // INVARIANT: start <= end <= buf.len()
    start: usize,
    end: usize,
}

impl Default for Relay {
    fn default() -> Self {
        Relay::new()
    }
}

impl Relay {
    pub fn new() -> Relay {
        // Allocated lazily: an idle or uncaptured stream costs nothing.
        Relay { buf: Box::default(), start: 0, end: 0 }
    }

    /// Bytes waiting to be written out.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end == RELAY_CAP
    }

    /// Free space to read into (moves pending bytes to the front first if that makes room).
    pub fn space(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0; RELAY_CAP].into_boxed_slice();
        }
        // Compact when the consumed front is larger than the free tail: each byte moves at most
        // once per buffer-full, and a read always gets at least half the free space.
        if self.start > 0 && self.buf.len() - self.end < self.start {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`Relay::space`].
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// `n` bytes of [`Relay::pending`] were written out.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Drops whatever is pending (the consumer is gone).
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_drains_and_compacts() {
        let mut r = Relay::new();
        assert!(r.is_empty());
        let s = r.space();
        assert_eq!(s.len(), RELAY_CAP);
        s[..10].copy_from_slice(b"0123456789");
        r.filled(10);
        assert_eq!(r.pending(), b"0123456789");
        r.consume(4);
        assert_eq!(r.pending(), b"456789");
        // Fill to the end, then consuming some makes room at the front after compaction.
        let n = r.space().len();
        assert_eq!(n, RELAY_CAP - 10, "4 consumed bytes are not worth moving 6 for");
        r.filled(n);
        assert_eq!(r.space().len(), 4, "at the end, compaction reclaims the consumed front");
        assert_eq!(&r.pending()[..6], b"456789");
        r.consume(100);
        assert_eq!(r.space().len(), 104, "front reclaimed again, plus the 4 left at the end");
        r.consume(r.pending().len());
        assert!(r.is_empty());
        assert_eq!(r.space().len(), RELAY_CAP);
    }

    #[test]
    fn full_means_full() {
        let mut r = Relay::new();
        let n = r.space().len();
        r.filled(n);
        assert!(r.is_full());
        r.consume(1);
        assert!(!r.is_full());
    }
}
