//! The receive side of a frame stream, sans-IO: bytes in, whole frames out, in one bounded
//! buffer. The entrypoint feeds it from its non-blocking TLS reads, and an async reader can drive
//! it the same way (see [`RecvBuf`]).

use crate::{Error, Frame, HEADER_LEN, MAX_FRAME, Message as _, frame_len};
use alloc::vec;
use alloc::vec::Vec;

/// Collects received bytes and hands out whole frames.
///
/// Memory: the buffer holds `want` bytes (the caller's read size) while frames are small, grows
/// only as far as a length prefix that [`next_frame`](Self::next_frame) accepted says (never past
/// its `cap`, itself never past [`MAX_FRAME`]), and goes back to `want` once a big frame has
/// gone through. A prefix announcing more than the cap is an error found from the prefix alone,
/// before any room is made for its body.
///
/// Driving it (any reader: a non-blocking socket, TLS plaintext, an async stream):
///
/// ```
/// use waypost_proto::{encode, Frame, Kind, Ping, RecvBuf, MAX_FRAME};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut wire = Vec::new();
/// for nonce in 0..3 {
///     encode(&Frame::from(Kind::Ping(Ping { nonce })), &mut wire)?;
/// }
/// let mut input: &[u8] = &wire; // stands for the socket
/// let mut rb = RecvBuf::new();
/// let mut frames = Vec::new();
/// loop {
///     // 1. Take every complete frame out (`cap`: the largest body accepted now).
///     while let Some(frame) = rb.next_frame(MAX_FRAME) {
///         frames.push(frame?); // an error: the stream is corrupt, close it
///     }
///     // 2. Read into the spare room (`rd.read(rb.spare(4096)).await` in async code).
///     let room = rb.spare(4096);
///     let n = std::io::Read::read(&mut input, room)?;
///     if n == 0 {
///         // End of stream: clean only between frames.
///         assert_eq!(rb.pending(), 0, "closed in the middle of a frame");
///         break;
///     }
///     rb.filled(n);
/// }
/// assert_eq!(frames.len(), 3);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RecvBuf {
    buf: Vec<u8>,
    // INVARIANT: start <= end <= buf.len(); buf[start..end] is received and not yet decoded.
    start: usize,
    end: usize,
    /// Largest frame (prefix + body) `spare` makes room for: the cap last given to `next_frame`.
    limit: usize,
}

impl Default for RecvBuf {
    fn default() -> Self {
        RecvBuf::new()
    }
}

impl RecvBuf {
    /// An empty buffer; nothing is allocated until the first [`spare`](Self::spare).
    pub const fn new() -> RecvBuf {
        RecvBuf {
            buf: Vec::new(),
            start: 0,
            end: 0,
            limit: HEADER_LEN + MAX_FRAME,
        }
    }

    /// Room for the next read, never empty: the buffer is sized to hold `want` bytes, or the
    /// whole frame being received once [`next_frame`](Self::next_frame) accepted its length
    /// prefix, whichever is more. Call `next_frame` until it returns `None` before each read, so
    /// an oversized prefix is refused before its body is read.
    pub fn spare(&mut self, want: usize) -> &mut [u8] {
        let pending = self.end - self.start;
        let need = match frame_len(&self.buf[self.start..self.end]) {
            Some(Ok(total)) if total <= self.limit => total,
            // Over the cap: next_frame() reports it; meanwhile take no more.
            Some(_) => pending.max(HEADER_LEN),
            None => HEADER_LEN,
        };
        let want = need.max(want);
        if self.start > 0
            && (self.buf.len() - self.end < want.saturating_sub(pending) || pending == 0)
        {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
        }
        if self.buf.len() < want {
            // INVARIANT: want <= max(caller's want, limit), limit <= MAX_FRAME + HEADER_LEN.
            self.buf.resize(want, 0);
        } else if pending == 0 && self.buf.len() > 4 * want {
            // A big frame went through; give the memory back.
            self.buf = vec![0; want];
        }
        if self.end == self.buf.len() {
            // Full of a frame over the cap: next_frame() fails on it; offer a byte anyway so
            // callers never pass an empty buffer (a zero-length read means end of stream).
            self.buf.push(0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into the slice [`spare`](Self::spare) returned.
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// The next complete frame, if any, with a body of at most `cap` bytes (capped at
    /// [`MAX_FRAME`]; e.g. less before the peer has authenticated). `None`: more bytes needed.
    /// An error ([`Error::TooLarge`] past MAX_FRAME, [`Error::OverCap`] past `cap`,
    /// [`Error::Malformed`]) means the stream is corrupt: close it.
    pub fn next_frame(&mut self, cap: usize) -> Option<Result<Frame, Error>> {
        let cap = cap.min(MAX_FRAME);
        self.limit = HEADER_LEN + cap;
        let input = &self.buf[self.start..self.end];
        let total = match frame_len(input)? {
            Ok(total) if total > self.limit => {
                return Some(Err(Error::OverCap {
                    len: total - HEADER_LEN,
                    cap,
                }));
            }
            Ok(total) => total,
            Err(e) => return Some(Err(e)),
        };
        // As `decode` does, without checking the prefix a second time.
        let frame = match Frame::decode(input.get(HEADER_LEN..total)?) {
            Ok(frame) => frame,
            Err(e) => return Some(Err(Error::Malformed(e))),
        };
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Some(Ok(frame))
    }

    /// Bytes received and not yet taken out as frames (non-zero at end of stream: the peer
    /// closed in the middle of a frame).
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Bytes of memory held.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Forgets everything received (a new connection); gives the memory back if it holds more
    /// than `keep` bytes.
    pub fn clear(&mut self, keep: usize) {
        self.start = 0;
        self.end = 0;
        if self.buf.len() > keep {
            self.buf = Vec::new();
        }
    }
}

// A frame can never need more than this; RecvBuf relies on frame_len's check.
const _: () = assert!(MAX_FRAME + HEADER_LEN < u32::MAX as usize);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Kind, Ping, StreamData, encode};
    use alloc::vec::Vec;

    /// Read size of the entrypoint (16 KiB) and of a small-footprint server reader (4 KiB).
    const WANTS: [usize; 2] = [16 * 1024, 4 * 1024];

    fn wire(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            encode(f, &mut out).unwrap();
        }
        out
    }

    fn ping(nonce: u64) -> Frame {
        Frame::from(Kind::Ping(Ping { nonce }))
    }

    fn data(stream: u64, len: usize) -> Frame {
        Frame::from(Kind::StreamData(StreamData {
            stream,
            data: alloc::vec![stream as u8; len],
        }))
    }

    /// Feeds `bytes` in reads of the sizes `chunks` gives (cycled), as the driving loop in the
    /// type's doc does; returns the frames and the peak memory.
    fn feed(bytes: &[u8], want: usize, chunks: &[usize]) -> (Vec<Frame>, usize) {
        let mut rb = RecvBuf::new();
        let mut got = Vec::new();
        let mut peak = 0;
        let mut rest = bytes;
        let mut sizes = chunks.iter().cycle();
        loop {
            while let Some(f) = rb.next_frame(MAX_FRAME) {
                got.push(f.unwrap());
            }
            if rest.is_empty() {
                break;
            }
            let space = rb.spare(want);
            assert!(!space.is_empty());
            let n = space.len().min(*sizes.next().unwrap()).min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            rb.filled(n);
            rest = &rest[n..];
            peak = peak.max(rb.capacity());
        }
        assert_eq!(rb.pending(), 0);
        (got, peak)
    }

    #[test]
    fn split_at_every_boundary() {
        // Three frames (one empty-bodied, one tiny, one a few KiB); every single cut point and
        // every pair of cut points yields the same frames.
        let frames = [Frame::default(), ping(7), data(3, 5000)];
        let bytes = wire(&frames);
        for want in WANTS {
            for cut in 0..=bytes.len() {
                let (got, _) = feed_parts(&bytes, want, &[cut]);
                assert_eq!(got, frames, "cut at {cut}");
            }
        }
        let small = wire(&[ping(1), Frame::default(), ping(300)]);
        for a in 0..=small.len() {
            for b in a..=small.len() {
                let (got, _) = feed_parts(&small, 16 * 1024, &[a, b]);
                assert_eq!(got, [ping(1), Frame::default(), ping(300)], "cuts {a}, {b}");
            }
        }
    }

    /// Feeds `bytes` cut at the given offsets (each part in as many reads as the room allows).
    fn feed_parts(bytes: &[u8], want: usize, cuts: &[usize]) -> (Vec<Frame>, usize) {
        let mut rb = RecvBuf::new();
        let mut got = Vec::new();
        let mut peak = 0;
        let mut bounds: Vec<usize> = cuts.to_vec();
        bounds.push(bytes.len());
        let mut at = 0;
        for end in bounds {
            while at < end {
                let space = rb.spare(want);
                let n = space.len().min(end - at);
                space[..n].copy_from_slice(&bytes[at..at + n]);
                rb.filled(n);
                at += n;
                peak = peak.max(rb.capacity());
                while let Some(f) = rb.next_frame(MAX_FRAME) {
                    got.push(f.unwrap());
                }
            }
        }
        (got, peak)
    }

    #[test]
    fn frames_come_out_whole_whatever_the_read_sizes() {
        let frames: Vec<Frame> = (0..50u64)
            .map(|i| if i % 7 == 0 { data(i, 40_000) } else { ping(i) })
            .collect();
        let bytes = wire(&frames);
        for want in WANTS {
            for chunk in [1, 2, 3, 7, 100, 4096, 16 * 1024, 1 << 20] {
                let (got, _) = feed(&bytes, want, &[chunk]);
                assert_eq!(got, frames, "want {want}, chunk {chunk}");
            }
            let (got, _) = feed(&bytes, want, &[1, 4095, 3, 65_536, 5, 2]);
            assert_eq!(got, frames, "want {want}, mixed chunks");
        }
    }

    #[test]
    fn grows_for_a_big_frame_then_shrinks_back() {
        for want in WANTS {
            let frames = [ping(1), data(1, 900_000), ping(2)];
            let bytes = wire(&frames);
            let (got, peak) = feed(&bytes, want, &[usize::MAX]);
            assert_eq!(got, frames);
            assert!(
                (900_000..=MAX_FRAME + HEADER_LEN + 1).contains(&peak),
                "never past one max frame: {peak}"
            );
            // The memory goes back at the next read after the big frame.
            let mut rb = RecvBuf::new();
            let (got, _) = drain_into(&mut rb, &wire(&frames[..2]), want);
            assert_eq!(got, frames[..2]);
            assert!(rb.capacity() >= 900_000);
            let _ = rb.spare(want);
            assert_eq!(rb.capacity(), want, "shrunk back");
        }
    }

    /// Reads `bytes` into `rb` in reads as large as the room it offers, taking frames out with
    /// the full cap.
    fn drain_into(rb: &mut RecvBuf, bytes: &[u8], want: usize) -> (Vec<Frame>, usize) {
        let mut got = Vec::new();
        let mut peak = 0;
        let mut rest = bytes;
        while !rest.is_empty() {
            let space = rb.spare(want);
            let n = space.len().min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            rb.filled(n);
            rest = &rest[n..];
            peak = peak.max(rb.capacity());
            while let Some(f) = rb.next_frame(MAX_FRAME) {
                got.push(f.unwrap());
            }
        }
        (got, peak)
    }

    #[test]
    fn small_traffic_stays_small() {
        let frames: Vec<Frame> = (0..1000).map(ping).collect();
        for want in WANTS {
            let (got, peak) = feed(&wire(&frames), want, &[333]);
            assert_eq!(got.len(), 1000);
            assert_eq!(peak, want);
        }
    }

    #[test]
    fn an_oversized_prefix_is_an_error_without_growing() {
        let mut rb = RecvBuf::new();
        let space = rb.spare(16 * 1024);
        space[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        rb.filled(4);
        assert!(matches!(
            rb.next_frame(MAX_FRAME),
            Some(Err(Error::TooLarge(_)))
        ));
        assert!(!rb.spare(16 * 1024).is_empty());
        assert!(rb.capacity() <= 16 * 1024 + 1);
    }

    #[test]
    fn a_frame_over_the_cap_is_refused_from_its_prefix() {
        // As before authentication: at most 8 KiB of body. A prefix announcing 8 KiB + 1 is an
        // error as soon as the prefix is in, and no room is made for its body.
        const CAP: usize = 8 * 1024;
        for want in [16, 4096] {
            let mut rb = RecvBuf::new();
            let prefix = ((CAP + 1) as u32).to_be_bytes();
            for (i, b) in prefix.iter().enumerate() {
                assert!(
                    rb.next_frame(CAP).is_none(),
                    "not before the whole prefix ({i} bytes)"
                );
                rb.spare(want)[0] = *b;
                rb.filled(1);
            }
            let e = rb.next_frame(CAP).unwrap().unwrap_err();
            assert_eq!(
                e,
                Error::OverCap {
                    len: CAP + 1,
                    cap: CAP
                }
            );
            assert_eq!(
                alloc::format!("{e}"),
                "a frame of 8193 bytes announced; at most 8192 accepted here"
            );
            let room = rb.spare(want).len();
            assert!(
                rb.capacity() <= want.max(HEADER_LEN) + 1,
                "want {want}: {} bytes held, {room} offered",
                rb.capacity()
            );
        }
        // Negative control: exactly the cap is fine, and the buffer grows for that body.
        let frame = data(1, CAP - 16);
        let mut bytes = wire(core::slice::from_ref(&frame));
        let body = bytes.len() - HEADER_LEN;
        assert!(body <= CAP);
        let mut rb = RecvBuf::new();
        rb.spare(16)[..HEADER_LEN].copy_from_slice(&bytes[..HEADER_LEN]);
        rb.filled(HEADER_LEN);
        assert!(rb.next_frame(body).is_none());
        let room = rb.spare(16);
        assert_eq!(room.len(), body, "room for exactly the announced body");
        room.copy_from_slice(&bytes.split_off(HEADER_LEN));
        rb.filled(body);
        assert_eq!(rb.next_frame(body), Some(Ok(frame)));
        // After the cap is raised (the peer authenticated), bigger frames pass.
        let big = data(2, 100_000);
        let mut rb = RecvBuf::new();
        assert!(rb.next_frame(CAP).is_none());
        let (got, _) = drain_into(&mut rb, &wire(core::slice::from_ref(&big)), 4096);
        assert_eq!(got, [big]);
    }

    #[test]
    fn a_malformed_body_is_an_error_and_consumes_nothing() {
        let mut rb = RecvBuf::new();
        let bad = [0, 0, 0, 2, 0xff, 0xff];
        rb.spare(64)[..bad.len()].copy_from_slice(&bad);
        rb.filled(bad.len());
        assert!(matches!(
            rb.next_frame(MAX_FRAME),
            Some(Err(Error::Malformed(_)))
        ));
        assert_eq!(rb.pending(), bad.len());
    }

    #[test]
    fn clear_forgets_and_frees_big_buffers() {
        let mut rb = RecvBuf::new();
        let bytes = wire(&[ping(1)]);
        rb.spare(16)[..3].copy_from_slice(&bytes[..3]);
        rb.filled(3);
        assert_eq!(rb.pending(), 3);
        rb.clear(1024);
        assert_eq!(rb.pending(), 0);
        assert_eq!(rb.capacity(), 16, "small buffers are kept");
        rb.clear(8);
        assert_eq!(rb.capacity(), 0);
        let (got, _) = feed(&bytes, 16, &[1]);
        assert_eq!(got, [ping(1)]);
    }
}
