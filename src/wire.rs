//! Byte buffers between the TLS connection and frames, sans-IO.
//!
//! [`RecvBuf`] collects decrypted bytes and hands out whole frames; it is small while frames are
//! small and grows only as far as a checked length prefix says (never past MAX_FRAME), shrinking
//! back afterwards. It is the receive buffer both ends share ([`waypost_proto::RecvBuf`]) with the
//! entrypoint's read size and cap. [`SendBuf`] holds encoded frames until TLS takes them.

use waypost_proto::{Frame, MAX_FRAME};

/// Receive buffer size for ordinary traffic (control frames, exec keystrokes, tunnel chunks).
pub const RECV_INITIAL: usize = 16 * 1024;
/// Encoded frames we prepare ahead of TLS: one refill's worth. Priority is decided when a frame
/// is encoded, so a short queue here keeps a log flood from delaying a keystroke.
pub const SEND_LOW_WATER: usize = 16 * 1024;

/// Whole frames out of decrypted bytes: [`RECV_INITIAL`] bytes while frames are small, one
/// [`MAX_FRAME`] at most.
#[derive(Default)]
pub struct RecvBuf(waypost_proto::RecvBuf);

impl RecvBuf {
    pub fn new() -> RecvBuf {
        RecvBuf(waypost_proto::RecvBuf::new())
    }

    /// Room for the next read (never empty): enough for the frame being received, whose size the
    /// length prefix announces once it is here.
    pub fn space(&mut self) -> &mut [u8] {
        self.0.spare(RECV_INITIAL)
    }

    pub fn filled(&mut self, n: usize) {
        self.0.filled(n);
    }

    /// The next complete frame, if any. An error means the stream is corrupt: close it.
    pub fn next_frame(&mut self) -> Option<Result<Frame, waypost_proto::Error>> {
        // Every frame the protocol allows: the server is authenticated by TLS.
        self.0.next_frame(MAX_FRAME)
    }

    /// Bytes held (for memory accounting in tests).
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    pub fn clear(&mut self) {
        self.0.clear(RECV_INITIAL);
    }
}

/// Encoded frames waiting for TLS to take them.
#[derive(Default)]
pub struct SendBuf {
    buf: Vec<u8>,
    start: usize,
}

impl SendBuf {
    /// Whether another frame should be encoded now.
    pub fn wants_more(&self) -> bool {
        self.buf.len() - self.start < SEND_LOW_WATER
    }

    pub fn push(&mut self, frame: &Frame) -> Result<(), waypost_proto::Error> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        waypost_proto::encode(frame, &mut self.buf)
    }

    /// Lets `f` append encoded frames itself (the log shipper writes batches straight from its
    /// ring); returns what `f` returned.
    pub fn append<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        f(&mut self.buf)
    }

    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > 4 * SEND_LOW_WATER {
                self.buf.shrink_to(SEND_LOW_WATER);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypost_proto::{HEADER_LEN, Kind, Ping, StreamData};

    fn wire(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            waypost_proto::encode(f, &mut out).unwrap();
        }
        out
    }

    /// Feeds `bytes` through `RecvBuf` in reads of at most `chunk` bytes.
    fn feed(bytes: &[u8], chunk: usize) -> (Vec<Frame>, usize) {
        let mut rb = RecvBuf::new();
        let mut got = Vec::new();
        let mut peak = 0;
        let mut rest = bytes;
        while !rest.is_empty() {
            let space = rb.space();
            assert!(!space.is_empty());
            let n = space.len().min(chunk).min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            rb.filled(n);
            rest = &rest[n..];
            peak = peak.max(rb.capacity());
            while let Some(f) = rb.next_frame() {
                got.push(f.unwrap());
            }
        }
        (got, peak)
    }

    #[test]
    fn frames_come_out_whole_whatever_the_read_sizes() {
        let frames: Vec<Frame> = (0..50u64)
            .map(|i| {
                if i % 7 == 0 {
                    Frame::from(Kind::StreamData(StreamData {
                        stream: i,
                        data: vec![i as u8; 40_000],
                    }))
                } else {
                    Frame::from(Kind::Ping(Ping { nonce: i }))
                }
            })
            .collect();
        let bytes = wire(&frames);
        for chunk in [1, 2, 3, 7, 100, 4096, 16 * 1024, 1 << 20] {
            let (got, _) = feed(&bytes, chunk);
            assert_eq!(got, frames, "chunk {chunk}");
        }
    }

    #[test]
    fn grows_for_a_big_frame_then_shrinks_back() {
        let big = Frame::from(Kind::StreamData(StreamData {
            stream: 1,
            data: vec![1; 900_000],
        }));
        let small = Frame::from(Kind::Ping(Ping { nonce: 1 }));
        let bytes = wire(&[small.clone(), big.clone(), small.clone()]);
        let mut rb = RecvBuf::new();
        let mut rest = &bytes[..];
        let mut got = Vec::new();
        let mut peak = 0;
        while !rest.is_empty() {
            let space = rb.space();
            let n = space.len().min(rest.len());
            space[..n].copy_from_slice(&rest[..n]);
            rb.filled(n);
            rest = &rest[n..];
            peak = peak.max(rb.capacity());
            while let Some(f) = rb.next_frame() {
                got.push(f.unwrap());
            }
        }
        assert_eq!(got, [small.clone(), big, small]);
        assert!(
            peak <= MAX_FRAME + HEADER_LEN + 1,
            "never past one max frame: {peak}"
        );
        let _ = rb.space();
        assert!(
            rb.capacity() <= RECV_INITIAL,
            "shrunk back: {}",
            rb.capacity()
        );
    }

    #[test]
    fn small_traffic_stays_small() {
        let frames: Vec<Frame> = (0..1000)
            .map(|i| Frame::from(Kind::Ping(Ping { nonce: i })))
            .collect();
        let (got, peak) = feed(&wire(&frames), 333);
        assert_eq!(got.len(), 1000);
        assert_eq!(peak, RECV_INITIAL);
    }

    #[test]
    fn an_oversized_prefix_is_an_error_without_growing() {
        let mut rb = RecvBuf::new();
        let space = rb.space();
        space[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        rb.filled(4);
        assert!(matches!(
            rb.next_frame(),
            Some(Err(waypost_proto::Error::TooLarge(_)))
        ));
        assert!(!rb.space().is_empty());
        assert!(rb.capacity() <= RECV_INITIAL + 1);
    }

    #[test]
    fn send_buffer_asks_for_frames_until_the_low_water_mark() {
        let mut sb = SendBuf::default();
        let mut n = 0;
        while sb.wants_more() {
            sb.push(&Frame::from(Kind::StreamData(StreamData {
                stream: 1,
                data: vec![0; 1000],
            })))
            .unwrap();
            n += 1;
        }
        assert!((16..=17).contains(&n), "{n}");
        let len = sb.pending().len();
        sb.consume(len - 10);
        assert!(sb.wants_more());
        sb.consume(10);
        assert!(sb.is_empty());
    }
}
