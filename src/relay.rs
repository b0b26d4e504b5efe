//! A fixed-capacity byte buffer between one of the child's output pipes and our own stdout or
//! stderr. It never grows: when it is full the reactor stops reading the pipe, the pipe fills,
//! and the child blocks on write exactly as it would if it wrote to our stdout directly.
//!
//! Two consumers read the same bytes, each at its own pace: our own fd ([`Relay::pending`] /
//! [`Relay::consume`]) and the log shipper ([`Relay::unlogged`] / [`Relay::logged`]). A byte's
//! space is reused only once both have it, so a log buffer that refuses bytes (blocking log
//! mode) holds the pipe back just like a slow stdout does — and the stdout copy stays byte for
//! byte, only later.

/// Bytes held per stream: a default pipe's worth, so one read drains a full pipe (fewer system
/// calls on a busy stream). Allocated on first use; an idle stream costs nothing.
pub const RELAY_CAP: usize = 64 * 1024;

pub struct Relay {
    buf: Box<[u8]>,
    // INVARIANT: start <= end, log <= end, end <= buf.len()
    /// Next byte for our own fd.
    start: usize,
    /// Next byte for the log shipper.
    log: usize,
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
        Relay {
            buf: Box::default(),
            start: 0,
            log: 0,
            end: 0,
        }
    }

    /// Where the bytes still needed by either consumer begin.
    fn base(&self) -> usize {
        self.start.min(self.log)
    }

    /// Bytes waiting to be written out.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Bytes not yet taken by the log shipper.
    pub fn unlogged(&self) -> &[u8] {
        &self.buf[self.log..self.end]
    }

    /// Nothing waits to be written out (bytes may still wait for the log shipper).
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn is_full(&self) -> bool {
        self.base() == 0 && self.end == RELAY_CAP
    }

    /// Free space to read into (moves held bytes to the front first if that makes room).
    pub fn space(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0; RELAY_CAP].into_boxed_slice();
        }
        // Compact when the consumed front is larger than the free tail: each byte moves at most
        // once per buffer-full, and a read always gets at least half the free space.
        let base = self.base();
        if base > 0 && self.buf.len() - self.end < base {
            self.buf.copy_within(base..self.end, 0);
            self.end -= base;
            self.start -= base;
            self.log -= base;
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
        self.reset_if_drained();
    }

    /// `n` bytes of [`Relay::unlogged`] were taken by the log shipper.
    pub fn logged(&mut self, n: usize) {
        self.log += n;
        debug_assert!(self.log <= self.end);
        self.reset_if_drained();
    }

    fn reset_if_drained(&mut self) {
        if self.start == self.end && self.log == self.end {
            self.start = 0;
            self.log = 0;
            self.end = 0;
        }
    }

    /// Drops what is pending for our own fd (its reader is gone); the log shipper still gets
    /// every byte.
    pub fn clear(&mut self) {
        self.start = self.end;
        self.reset_if_drained();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `bytes` in as the log shipper would see them, taking them at once (it keeps up).
    fn fill_logged(r: &mut Relay, n: usize) {
        r.filled(n);
        let u = r.unlogged().len();
        r.logged(u);
    }

    #[test]
    fn fills_drains_and_compacts() {
        let mut r = Relay::new();
        assert!(r.is_empty());
        let s = r.space();
        assert_eq!(s.len(), RELAY_CAP);
        s[..10].copy_from_slice(b"0123456789");
        fill_logged(&mut r, 10);
        assert_eq!(r.pending(), b"0123456789");
        r.consume(4);
        assert_eq!(r.pending(), b"456789");
        // Fill to the end, then consuming some makes room at the front after compaction.
        let n = r.space().len();
        assert_eq!(
            n,
            RELAY_CAP - 10,
            "4 consumed bytes are not worth moving 6 for"
        );
        fill_logged(&mut r, n);
        assert_eq!(
            r.space().len(),
            4,
            "at the end, compaction reclaims the consumed front"
        );
        assert_eq!(&r.pending()[..6], b"456789");
        r.consume(100);
        assert_eq!(
            r.space().len(),
            104,
            "front reclaimed again, plus the 4 left at the end"
        );
        r.consume(r.pending().len());
        assert!(r.is_empty());
        assert_eq!(r.space().len(), RELAY_CAP);
    }

    #[test]
    fn full_means_full() {
        let mut r = Relay::new();
        let n = r.space().len();
        fill_logged(&mut r, n);
        assert!(r.is_full());
        r.consume(1);
        assert!(!r.is_full());
    }

    #[test]
    fn a_byte_is_freed_only_once_both_consumers_have_it() {
        let mut r = Relay::new();
        r.space()[..6].copy_from_slice(b"abcdef");
        r.filled(6);
        assert_eq!(r.unlogged(), b"abcdef");
        // Written out, not yet logged: nothing freed, the log shipper still sees every byte.
        r.consume(6);
        assert!(r.is_empty());
        assert_eq!(r.unlogged(), b"abcdef");
        r.logged(2);
        assert_eq!(r.unlogged(), b"cdef");
        // Fill to the top while the shipper lags: full, no read possible.
        let n = r.space().len();
        r.filled(n);
        r.consume(r.pending().len());
        assert!(!r.is_full(), "2 logged bytes at the front can be reclaimed");
        assert_eq!(r.space().len(), 2);
        r.filled(2);
        assert!(r.is_full(), "the shipper holds everything else");
        assert_eq!(
            &r.unlogged()[..4],
            b"cdef",
            "compaction kept the unlogged bytes"
        );
        // Both catch up: everything is free again.
        let u = r.unlogged().len();
        r.logged(u);
        assert_eq!(
            r.space().len(),
            RELAY_CAP - 2,
            "the last 2 bytes still wait for our fd"
        );
        r.consume(2);
        assert_eq!(r.space().len(), RELAY_CAP);
    }

    #[test]
    fn a_gone_reader_still_leaves_the_bytes_to_the_log_shipper() {
        let mut r = Relay::new();
        r.space()[..3].copy_from_slice(b"xyz");
        r.filled(3);
        r.clear();
        assert!(r.is_empty());
        assert_eq!(r.unlogged(), b"xyz");
        r.logged(3);
        assert_eq!(r.space().len(), RELAY_CAP);
    }
}
