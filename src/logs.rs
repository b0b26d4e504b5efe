//! Log shipping, sans-IO: the child's stdout and stderr (and our own lines) become numbered log
//! entries, kept in one bounded ring until the server acknowledges them, and go out in batches.
//!
//! - Lines are split per stream at `\n`; a line longer than [`LINE_CAP`] is cut into pieces
//!   flagged `truncated` (all but the last); a partial line is shipped (flagged) after
//!   [`LINE_IDLE`] without more bytes, so prompts and progress bars show.
//! - Entry `i` has sequence number `i`; batches say their first sequence number, so the server
//!   can de-duplicate a batch resent after a reconnect and see gaps.
//! - The ring holds at most `cap` bytes (`WAYPOST_LOG_BUFFER`). In [`LogMode::Drop`] (the
//!   default), when a new entry does not fit the oldest go (even if sent but unacknowledged) and
//!   are counted; the count travels with the next batch, and the child is never slowed down by
//!   the server. In [`LogMode::Block`], [`Logs::handle_output`] takes only what fits and the
//!   reactor keeps the rest (and stops reading the child's pipe), so the child's writes wait for
//!   the server's acknowledgements instead of anything being dropped.
//! - Batches are encoded straight from the ring into the connection's send buffer (no per-line
//!   allocation on the hot path), in exactly the bytes prost would produce for a `LogBatch`.

use crate::sys::simd::find_newline;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use waypost_proto::LogStream;

/// Longest log entry; longer lines are split (64 KiB, a user-visible limit).
pub const LINE_CAP: usize = 64 * 1024;
/// A partial line is shipped after this long without more output on its stream.
pub const LINE_IDLE: Duration = Duration::from_millis(250);
/// A batch goes out once its oldest entry is this old...
pub const BATCH_AGE: Duration = Duration::from_millis(50);
/// ...or once this many bytes are waiting, and never holds more than that.
pub const BATCH_BYTES: usize = 64 * 1024;
/// What an entry's metadata costs against the buffer cap (a [`Meta`] is 16 bytes in memory).
const HEADER: usize = 16;
/// In block mode, the part of the buffer the app's lines may not use: the entrypoint's own
/// lines (a stalled server makes it warn) still fit without pushing out an app line — a few
/// dozen of our lines, a sliver of the smallest buffer.
const OWN_RESERVE: usize = 8 * 1024;

/// What a full buffer does (`WAYPOST_LOG_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// The oldest entries go and are counted: the app never waits for the server.
    Drop,
    /// The app's output waits until the server's acknowledgements make room: nothing is dropped
    /// while the entrypoint runs (docker's `mode=blocking`).
    Block,
}

impl LogMode {
    /// `drop` or `block`, any case.
    pub fn parse(s: &str) -> Option<LogMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "drop" => Some(LogMode::Drop),
            "block" => Some(LogMode::Block),
            _ => None,
        }
    }
}

/// An entry's metadata; its bytes are in `Logs::data`, back to back with the others'.
#[derive(Debug, Clone, Copy)]
struct Meta {
    ts: i64,
    len: u32,
    stream: u8,
    truncated: bool,
}

/// One stream's line being assembled.
#[derive(Default)]
struct Partial {
    buf: Vec<u8>,
    /// Wall-clock time (Unix µs) of the line's first byte.
    ts: i64,
    /// When the last byte arrived (for the idle flush).
    last: Option<Instant>,
    /// The stream ended: ship the rest as soon as it fits.
    eof: bool,
    /// Block mode: the last bytes offered were not all taken, so the line goes on in bytes
    /// still waiting upstream; it is not idle and must not be cut.
    stalled: bool,
}

pub struct Logs {
    /// Entries `[front_seq, next_seq)`: metadata, and their bytes concatenated in `data`.
    meta: VecDeque<Meta>,
    data: ByteRing,
    /// Bound on `data.len() + meta.len() * HEADER`.
    cap: usize,
    mode: LogMode,
    front_seq: u64,
    next_seq: u64,
    /// Next entry to send and its byte offset in `data`.
    send_seq: u64,
    send_off: usize,
    /// When the oldest unsent entry was added (None: nothing unsent).
    unsent_since: Option<Instant>,
    /// Entries dropped since the last batch was encoded, never sent.
    dropped_unsent: u64,
    /// All entries ever dropped (for the entrypoint's own accounting).
    dropped_total: u64,
    partial: [Partial; 2],
}

impl Logs {
    /// `cap`: `WAYPOST_LOG_BUFFER`, bytes; `mode`: `WAYPOST_LOG_MODE`.
    pub fn new(cap: usize, mode: LogMode) -> Logs {
        Logs {
            meta: VecDeque::new(),
            data: ByteRing::default(),
            // The cap is for log data (as documented for users); entry headers get 0.1% on top, so exactly
            // `cap` bytes of lines fit (a 1 MiB line in sixteen 64 KiB pieces in the default
            // 1 MiB), while a flood of empty lines stays bounded by the same ring.
            cap: cap + cap / 1024 + HEADER,
            mode,
            front_seq: 0,
            next_seq: 0,
            send_seq: 0,
            send_off: 0,
            unsent_since: None,
            dropped_unsent: 0,
            dropped_total: 0,
            partial: Default::default(),
        }
    }

    /// Sequence number the next entry will get (for Hello).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Entries dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped_total
    }

    /// Whether entries wait for the server's acknowledgement (so an exit should wait a little).
    pub fn unacked(&self) -> bool {
        self.front_seq < self.next_seq || self.partial.iter().any(|p| !p.buf.is_empty())
    }

    /// Bytes held, as counted against the cap (for tests of the memory bound).
    pub fn held(&self) -> usize {
        self.data.len() + self.meta.len() * HEADER
    }

    /// Whether an entry of `len` bytes of the app's output may be added now. Drop mode: always
    /// (the oldest make room). Block mode: if it fits beside everything unacknowledged, short of
    /// the own-line reserve — or if it could never fit and nothing is held (it is then dropped
    /// as in drop mode, rather than stall the app for good).
    fn admits(&self, len: usize) -> bool {
        match self.mode {
            LogMode::Drop => true,
            LogMode::Block => {
                let app_cap = self.cap.saturating_sub(OWN_RESERVE).max(self.cap / 2);
                self.held() + HEADER + len <= app_cap || self.meta.is_empty()
            }
        }
    }

    /// Bytes the child wrote on `stream` (Stdout or Stderr). `wall_us`: now, Unix µs. Returns
    /// how many were taken: all of them in drop mode; in block mode only whole entries that fit
    /// (the caller offers the rest again later, see [`Logs::blocked`]).
    pub fn handle_output(
        &mut self,
        stream: LogStream,
        offered: &[u8],
        wall_us: i64,
        now: Instant,
    ) -> usize {
        let i = if stream == LogStream::Stderr { 1 } else { 0 };
        let mut bytes = offered;
        while !bytes.is_empty() {
            if self.partial[i].buf.is_empty() {
                self.partial[i].ts = wall_us;
            }
            // A newline right after a full LINE_CAP still ends the line there: look one further.
            let room = LINE_CAP - self.partial[i].buf.len();
            match find_newline(&bytes[..bytes.len().min(room + 1)]) {
                Some(n) => {
                    if !self.admits(self.partial[i].buf.len() + n) {
                        break;
                    }
                    let p = &mut self.partial[i];
                    if p.buf.is_empty() {
                        // The common case: a whole line in one read, no copy into `partial`.
                        let ts = p.ts;
                        self.push(stream, ts, &bytes[..n], false, now);
                    } else {
                        p.buf.extend_from_slice(&bytes[..n]);
                        let line = std::mem::take(&mut p.buf);
                        let ts = p.ts;
                        self.push(stream, ts, &line, false, now);
                        self.partial[i].buf = line;
                        self.partial[i].buf.clear();
                    }
                    bytes = &bytes[n + 1..];
                }
                None if bytes.len() > room => {
                    // A full LINE_CAP without newline: ship this piece, flagged.
                    if !self.admits(LINE_CAP) {
                        break;
                    }
                    let p = &mut self.partial[i];
                    p.buf.extend_from_slice(&bytes[..room]);
                    let piece = std::mem::take(&mut p.buf);
                    let ts = p.ts;
                    self.push(stream, ts, &piece, true, now);
                    self.partial[i].buf = piece;
                    self.partial[i].buf.clear();
                    bytes = &bytes[room..];
                }
                None => {
                    self.partial[i].buf.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
        }
        let taken = offered.len() - bytes.len();
        let p = &mut self.partial[i];
        p.stalled = !bytes.is_empty();
        if taken > 0 {
            p.last = Some(now);
        }
        taken
    }

    /// The stream closed (every byte of it was taken): whatever partial line is left is
    /// shipped, at once or, in block mode, as soon as it fits.
    pub fn handle_eof(&mut self, stream: LogStream, now: Instant) {
        let i = if stream == LogStream::Stderr { 1 } else { 0 };
        self.partial[i].stalled = false;
        if !self.partial[i].buf.is_empty() {
            self.partial[i].eof = true;
            self.flush_partial(i, now);
        }
    }

    /// One of the entrypoint's own log lines.
    pub fn handle_own(&mut self, line: &[u8], wall_us: i64, now: Instant) {
        self.push(
            LogStream::Entrypoint,
            wall_us,
            &line[..line.len().min(LINE_CAP)],
            false,
            now,
        );
    }

    fn flush_partial(&mut self, i: usize, now: Instant) {
        if self.partial[i].buf.is_empty() || !self.admits(self.partial[i].buf.len()) {
            return;
        }
        let stream = if i == 1 {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        };
        let piece = std::mem::take(&mut self.partial[i].buf);
        let ts = self.partial[i].ts;
        self.push(stream, ts, &piece, true, now);
        self.partial[i].buf = piece;
        self.partial[i].buf.clear();
        self.partial[i].last = None;
        self.partial[i].eof = false;
    }

    fn push(&mut self, stream: LogStream, ts: i64, data: &[u8], truncated: bool, now: Instant) {
        let size = HEADER + data.len();
        // Make room: the oldest entries go first. Block mode never pushes out anything (the
        // app's entries arrive only when they fit).
        while self.mode == LogMode::Drop
            && self.held() + size > self.cap
            && self.front_seq < self.next_seq
        {
            self.drop_front();
        }
        if self.held() + size > self.cap {
            self.dropped_unsent += 1;
            self.dropped_total += 1;
            if self.meta.is_empty() {
                // Larger than the whole buffer by itself (a tiny WAYPOST_LOG_BUFFER): dropped,
                // its number skipped, so the server records the gap where it happened.
                self.next_seq += 1;
                self.front_seq = self.next_seq;
                self.send_seq = self.next_seq;
            }
            // Else (block mode: one of our own lines, the reserve full of them): it gets no
            // number, so the app's entries around it stay contiguous; the count still goes out.
            return;
        }
        self.meta.push_back(Meta {
            ts,
            len: data.len() as u32,
            stream: stream as u8,
            truncated,
        });
        self.data.push(data, self.cap);
        self.next_seq += 1;
        if self.unsent_since.is_none() {
            self.unsent_since = Some(now);
        }
    }

    /// Removes the oldest entry; returns its data length.
    fn pop_front(&mut self) -> usize {
        let len = self.meta.pop_front().map_or(0, |m| m.len as usize);
        self.data.drop_front(len);
        len
    }

    fn drop_front(&mut self) {
        let len = self.pop_front();
        if self.send_seq == self.front_seq {
            // Never sent.
            self.dropped_unsent += 1;
            self.send_seq += 1;
        } else {
            self.send_off -= len;
        }
        self.front_seq += 1;
        self.dropped_total += 1;
        if self.send_seq == self.next_seq {
            self.unsent_since = None;
        }
    }

    /// The server has every entry below `up_to_seq`.
    pub fn handle_ack(&mut self, up_to_seq: u64) {
        while self.front_seq < up_to_seq.min(self.next_seq) {
            let len = self.pop_front();
            if self.send_seq > self.front_seq {
                self.send_off -= len;
            } else {
                // Acknowledged without being sent on this connection (the server had it).
                self.send_seq += 1;
            }
            self.front_seq += 1;
        }
        if self.send_seq == self.next_seq {
            self.unsent_since = None;
        }
    }

    /// A new connection: the server has everything below `acked`; the rest is sent again.
    pub fn handle_reconnect(&mut self, acked: u64, now: Instant) {
        self.send_seq = self.front_seq;
        self.send_off = 0;
        self.handle_ack(acked);
        if self.send_seq < self.next_seq {
            self.unsent_since = Some(now);
        }
    }

    /// When to ship partial lines or (only when `connected`: no wake-ups while the server is
    /// away) a young batch. A batch already due is not a timer any more: it goes out when the
    /// connection can take it (its writability wakes the loop), so a blocked connection cannot
    /// make the loop spin.
    pub fn poll_timeout(&self, connected: bool, now: Instant) -> Option<Instant> {
        // A partial line that cannot go yet (block mode, buffer full) waits for an ack, not a
        // timer: a due timer that changes nothing would make the loop spin.
        let partial = self
            .partial
            .iter()
            .filter(|p| !p.buf.is_empty() && !p.stalled && self.admits(p.buf.len()))
            .filter_map(|p| {
                if p.eof {
                    Some(now)
                } else {
                    p.last.map(|t| t + LINE_IDLE)
                }
            })
            .min();
        let batch = self
            .unsent_since
            .filter(|_| connected)
            .map(|t| t + BATCH_AGE)
            .filter(|&t| t > now);
        match (partial, batch) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..2 {
            let p = &self.partial[i];
            if p.eof || (!p.stalled && p.last.is_some_and(|t| now >= t + LINE_IDLE)) {
                self.flush_partial(i, now);
            }
        }
    }

    /// Whether a batch is due: old enough, big enough, or `urgent` (we are exiting). Big enough
    /// is a quarter of the buffer when that is less than a full batch (a small buffer must not
    /// sit a batch age full), and anything at all when the app waits for room (block mode).
    pub fn batch_due(&self, now: Instant, urgent: bool) -> bool {
        self.send_seq < self.next_seq
            && (urgent
                || self.data.len() - self.send_off >= BATCH_BYTES.min(self.cap / 4)
                || self.partial.iter().any(|p| p.stalled)
                || self.unsent_since.is_some_and(|t| now >= t + BATCH_AGE))
    }

    /// Appends one `LogBatch` frame (length prefix included) of unsent entries to `out`.
    /// Returns whether one was written.
    pub fn encode_batch(&mut self, out: &mut Vec<u8>, now: Instant) -> bool {
        if self.send_seq >= self.next_seq {
            return false;
        }
        // Pick entries: at least one, then up to BATCH_BYTES of data.
        let first = (self.send_seq - self.front_seq) as usize;
        let (mut seq, mut off, mut entries_len, mut data) =
            (self.send_seq, self.send_off, 0usize, 0usize);
        for m in self.meta.range(first..) {
            let d = m.len as usize;
            if data > 0 && data + d > BATCH_BYTES {
                break;
            }
            let e = entry_body_len(m);
            entries_len += 1 + varint_len(e as u64) + e;
            data += d;
            off += d;
            seq += 1;
        }
        let mut batch_len = entries_len;
        if self.send_seq > 0 {
            batch_len += 1 + varint_len(self.send_seq);
        }
        if self.dropped_unsent > 0 {
            batch_len += 1 + varint_len(self.dropped_unsent);
        }
        // Frame { log_batch = 6 (LEN) { first_seq = 1, entries = 2*, dropped = 3 } }
        let body = 1 + varint_len(batch_len as u64) + batch_len;
        out.extend_from_slice(&(body as u32).to_be_bytes());
        out.push(6 << 3 | 2);
        put_varint(out, batch_len as u64);
        if self.send_seq > 0 {
            out.push(1 << 3);
            put_varint(out, self.send_seq);
        }
        let mut o = self.send_off;
        for m in self
            .meta
            .range(first..first + (seq - self.send_seq) as usize)
        {
            out.push(2 << 3 | 2);
            put_varint(out, entry_body_len(m) as u64);
            self.put_entry(m, o, out);
            o += m.len as usize;
        }
        if self.dropped_unsent > 0 {
            out.push(3 << 3);
            put_varint(out, self.dropped_unsent);
        }
        self.dropped_unsent = 0;
        self.send_seq = seq;
        self.send_off = off;
        self.unsent_since = (seq < self.next_seq).then_some(now);
        true
    }

    /// Appends the LogEntry message (proto3: defaults omitted) of `m`, whose bytes start at
    /// `off` in `data`.
    fn put_entry(&self, m: &Meta, off: usize, out: &mut Vec<u8>) {
        if m.stream != 0 {
            out.push(1 << 3);
            put_varint(out, u64::from(m.stream));
        }
        if m.ts != 0 {
            out.push(2 << 3);
            put_varint(out, m.ts as u64);
        }
        let len = m.len as usize;
        if len > 0 {
            out.push(3 << 3 | 2);
            put_varint(out, len as u64);
            let (a, b) = self.data.slices(off, len);
            out.extend_from_slice(a);
            out.extend_from_slice(b);
        }
        if m.truncated {
            out.push(4 << 3);
            out.push(1);
        }
    }
}

/// The entries' bytes, back to back in a circular buffer: it grows (doubling) only up to the
/// cap, dropping from the front costs nothing, and it gives its memory back once empty.
#[derive(Default)]
struct ByteRing {
    buf: Vec<u8>,
    // INVARIANT: head < buf.len() (or both 0); len <= buf.len().
    head: usize,
    len: usize,
}

impl ByteRing {
    fn len(&self) -> usize {
        self.len
    }

    /// Appends `src`; the caller keeps the total within `max`.
    fn push(&mut self, src: &[u8], max: usize) {
        if src.is_empty() {
            return;
        }
        let need = self.len + src.len();
        if need > self.buf.len() {
            self.grow(need.next_power_of_two().max(4096).min(max).max(need));
        }
        let cap = self.buf.len();
        let tail = wrap(self.head + self.len, cap);
        let first = (cap - tail).min(src.len());
        self.buf[tail..tail + first].copy_from_slice(&src[..first]);
        self.buf[..src.len() - first].copy_from_slice(&src[first..]);
        self.len = need;
    }

    fn grow(&mut self, cap: usize) {
        let mut buf = vec![0; cap];
        let (a, b) = self.slices(0, self.len);
        buf[..a.len()].copy_from_slice(a);
        buf[a.len()..a.len() + b.len()].copy_from_slice(b);
        self.buf = buf;
        self.head = 0;
    }

    fn drop_front(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
            if self.buf.len() > 64 * 1024 {
                // A burst went through: give the memory back.
                self.buf = Vec::new();
            }
        } else {
            self.head = wrap(self.head + n, self.buf.len());
        }
    }

    /// The `n` bytes starting `off` bytes in, as at most two slices.
    fn slices(&self, off: usize, n: usize) -> (&[u8], &[u8]) {
        if n == 0 {
            return (&[], &[]);
        }
        let cap = self.buf.len();
        let start = wrap(self.head + off, cap);
        if start + n <= cap {
            (&self.buf[start..start + n], &[])
        } else {
            (&self.buf[start..], &self.buf[..n - (cap - start)])
        }
    }
}

/// `i mod cap` for `i < 2 * cap` (no division on the hot path).
fn wrap(i: usize, cap: usize) -> usize {
    if i >= cap { i - cap } else { i }
}

/// Encoded length of the LogEntry message of `m` (proto3: defaults omitted).
fn entry_body_len(m: &Meta) -> usize {
    let len = m.len as usize;
    let mut n = 0;
    if m.stream != 0 {
        n += 1 + varint_len(u64::from(m.stream));
    }
    if m.ts != 0 {
        n += 1 + varint_len(m.ts as u64);
    }
    if len > 0 {
        n += 1 + varint_len(len as u64) + len;
    }
    if m.truncated {
        n += 2;
    }
    n
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use waypost_proto::{Kind, LogBatch, LogEntry};

    fn t(ms: u64, t0: Instant) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// Encodes every due batch and decodes them with prost (so the hand encoder is checked
    /// against the schema on every test).
    fn ship(l: &mut Logs, now: Instant) -> Vec<LogBatch> {
        let mut out = Vec::new();
        let mut batches = Vec::new();
        while l.encode_batch(&mut out, now) {
            let mut input = &out[..];
            let frame = waypost_proto::decode(&mut input)
                .expect("whole")
                .expect("valid");
            assert!(input.is_empty());
            // The bytes are exactly what prost produces for the same message.
            let mut again = Vec::new();
            waypost_proto::encode(&frame, &mut again).unwrap();
            assert_eq!(again, out);
            let Some(Kind::LogBatch(b)) = frame.kind else {
                panic!("not a LogBatch")
            };
            batches.push(b);
            out.clear();
        }
        batches
    }

    fn lines(batches: &[LogBatch]) -> Vec<(LogStream, String, bool)> {
        batches
            .iter()
            .flat_map(|b| b.entries.iter())
            .map(|e| {
                (
                    LogStream::try_from(e.stream).unwrap(),
                    String::from_utf8_lossy(&e.data).into_owned(),
                    e.truncated,
                )
            })
            .collect()
    }

    #[test]
    fn lines_per_stream_split_at_every_byte_boundary() {
        let t0 = Instant::now();
        let text = b"alpha\nbeta gamma\n\ndelta\n";
        for split in 0..=text.len() {
            let mut l = Logs::new(1 << 20, LogMode::Drop);
            l.handle_output(LogStream::Stdout, &text[..split], 1, t0);
            l.handle_output(LogStream::Stderr, b"err 1\n", 2, t0);
            l.handle_output(LogStream::Stdout, &text[split..], 3, t0);
            let got = lines(&ship(&mut l, t0));
            let out: Vec<_> = got
                .iter()
                .filter(|x| x.0 == LogStream::Stdout)
                .map(|x| x.1.as_str())
                .collect();
            assert_eq!(
                out,
                ["alpha", "beta gamma", "", "delta"],
                "split at {split}"
            );
            assert!(got.contains(&(LogStream::Stderr, "err 1".into(), false)));
            assert!(got.iter().all(|x| !x.2));
        }
    }

    #[test]
    fn timestamps_are_of_the_first_byte() {
        let t0 = Instant::now();
        let mut l = Logs::new(1 << 20, LogMode::Drop);
        l.handle_output(LogStream::Stdout, b"sl", 100, t0);
        l.handle_output(LogStream::Stdout, b"ow\n", 200, t0);
        let b = ship(&mut l, t0);
        assert_eq!(b[0].entries[0].timestamp_unix_us, 100);
    }

    #[test]
    fn long_lines_are_split_and_flagged() {
        let t0 = Instant::now();
        let mut l = Logs::new(4 << 20, LogMode::Drop);
        let line: Vec<u8> = (0..(1 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
        for chunk in line.chunks(10_000) {
            l.handle_output(LogStream::Stdout, chunk, 1, t0);
        }
        l.handle_output(LogStream::Stdout, b"\n", 1, t0);
        let batches = ship(&mut l, t0);
        let entries: Vec<&LogEntry> = batches.iter().flat_map(|b| b.entries.iter()).collect();
        assert_eq!(entries.len(), 16);
        assert!(
            entries[..15]
                .iter()
                .all(|e| e.truncated && e.data.len() == LINE_CAP)
        );
        assert!(!entries[15].truncated);
        let joined: Vec<u8> = entries
            .iter()
            .flat_map(|e| e.data.iter().copied())
            .collect();
        assert_eq!(joined, line);
    }

    #[test]
    fn a_partial_line_ships_after_idle_and_at_eof() {
        let t0 = Instant::now();
        let mut l = Logs::new(1 << 20, LogMode::Drop);
        l.handle_output(LogStream::Stdout, b"Password: ", 1, t0);
        assert!(!l.batch_due(t0, false));
        assert_eq!(l.poll_timeout(true, t0), Some(t0 + LINE_IDLE));
        l.handle_timeout(t(100, t0));
        assert!(ship(&mut l, t(100, t0)).is_empty(), "not idle yet");
        l.handle_timeout(t0 + LINE_IDLE);
        assert_eq!(
            lines(&ship(&mut l, t0 + LINE_IDLE)),
            [(LogStream::Stdout, "Password: ".into(), true)]
        );
        l.handle_output(LogStream::Stderr, b"bye", 1, t0);
        l.handle_eof(LogStream::Stderr, t0);
        assert_eq!(
            lines(&ship(&mut l, t0)),
            [(LogStream::Stderr, "bye".into(), true)]
        );
    }

    #[test]
    fn batches_wait_for_age_or_size() {
        let t0 = Instant::now();
        let mut l = Logs::new(4 << 20, LogMode::Drop);
        l.handle_output(LogStream::Stdout, b"one\n", 1, t0);
        assert!(!l.batch_due(t0, false));
        assert!(l.batch_due(t0, true), "urgent (exiting) sends at once");
        assert_eq!(l.poll_timeout(true, t0), Some(t0 + BATCH_AGE));
        assert_eq!(
            l.poll_timeout(false, t0),
            None,
            "no wake-ups while disconnected"
        );
        assert_eq!(
            l.poll_timeout(true, t0 + BATCH_AGE),
            None,
            "due: waits for the connection, not a timer"
        );
        assert!(l.batch_due(t0 + BATCH_AGE, false));
        let line = vec![b'x'; 1000];
        let mut l = Logs::new(4 << 20, LogMode::Drop);
        while !l.batch_due(t0, false) {
            l.handle_output(LogStream::Stdout, &line, 1, t0);
            l.handle_output(LogStream::Stdout, b"\n", 1, t0);
        }
        let b = ship(&mut l, t0);
        assert!(
            b.iter()
                .all(|b| b.entries.iter().map(|e| e.data.len()).sum::<usize>() <= BATCH_BYTES)
        );
    }

    #[test]
    fn sequence_numbers_acks_and_resend_after_reconnect() {
        let t0 = Instant::now();
        let mut l = Logs::new(1 << 20, LogMode::Drop);
        for i in 0..10 {
            l.handle_output(LogStream::Stdout, format!("line {i}\n").as_bytes(), 1, t0);
        }
        let b = ship(&mut l, t0);
        assert_eq!(b[0].first_seq, 0);
        assert_eq!(b[0].entries.len(), 10);
        l.handle_ack(4);
        assert!(l.unacked());
        for i in 10..12 {
            l.handle_output(LogStream::Stdout, format!("line {i}\n").as_bytes(), 1, t0);
        }
        let b = ship(&mut l, t0);
        assert_eq!((b[0].first_seq, b[0].entries.len()), (10, 2));
        // Connection lost before more acks: everything unacknowledged goes again.
        l.handle_reconnect(6, t0);
        let b = ship(&mut l, t0);
        assert_eq!(b[0].first_seq, 6);
        assert_eq!(
            lines(&b).iter().map(|x| x.1.clone()).collect::<Vec<_>>(),
            (6..12).map(|i| format!("line {i}")).collect::<Vec<_>>()
        );
        l.handle_ack(12);
        assert!(!l.unacked());
        assert_eq!(l.held(), 0);
        assert_eq!(l.next_seq(), 12);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts_exactly() {
        let t0 = Instant::now();
        // Room for 10 entries of 10 data bytes (the cap's header allowance is tiny here).
        let mut l = Logs::new(10 * (HEADER + 10) - HEADER, LogMode::Drop);
        for i in 0..25 {
            l.handle_output(
                LogStream::Stdout,
                format!("line {i:04}\n").as_bytes(),
                1,
                t0,
            );
        }
        assert!(l.held() <= 10 * (HEADER + 10));
        let b = ship(&mut l, t0);
        assert_eq!(b[0].first_seq, 15);
        assert_eq!(b[0].dropped, 15, "dropped before ever being sent");
        assert_eq!(lines(&b).len(), 10);
        assert_eq!(l.dropped(), 15);
        // Sent but unacknowledged entries are dropped too when space is needed; the next batch
        // starts after the gap, and the counter only counts the never-sent.
        for i in 25..30 {
            l.handle_output(
                LogStream::Stdout,
                format!("line {i:04}\n").as_bytes(),
                1,
                t0,
            );
        }
        l.handle_reconnect(0, t0);
        let b = ship(&mut l, t0);
        assert_eq!(
            b[0].first_seq, 20,
            "entries 15..20 were dropped to make room"
        );
        assert_eq!(b[0].dropped, 0);
        assert_eq!(l.dropped(), 20);
    }

    #[test]
    fn a_one_mib_line_fits_the_default_buffer_whole() {
        let t0 = Instant::now();
        let mut l = Logs::new(1 << 20, LogMode::Drop);
        let line = vec![b'q'; 1 << 20];
        l.handle_output(LogStream::Stdout, &line, 1, t0);
        l.handle_output(LogStream::Stdout, b"\n", 1, t0);
        assert_eq!(l.dropped(), 0);
        let joined: Vec<u8> = ship(&mut l, t0)
            .iter()
            .flat_map(|b| b.entries.iter())
            .flat_map(|e| e.data.iter().copied())
            .collect();
        assert_eq!(joined, line);
    }

    #[test]
    fn empty_lines_are_bounded_too() {
        let t0 = Instant::now();
        let mut l = Logs::new(64 * 1024, LogMode::Drop);
        for _ in 0..100_000 {
            l.handle_output(LogStream::Stdout, b"\n", 1, t0);
        }
        assert!(l.held() <= 64 * 1024 + 64 + HEADER, "{}", l.held());
        assert!(l.dropped() > 0);
    }

    #[test]
    fn own_lines_are_a_third_stream() {
        let t0 = Instant::now();
        let mut l = Logs::new(1 << 20, LogMode::Drop);
        l.handle_own(b"[waypost] connected", 5, t0);
        let b = ship(&mut l, t0);
        assert_eq!(
            lines(&b),
            [(LogStream::Entrypoint, "[waypost] connected".into(), false)]
        );
    }

    #[test]
    fn bytes_survive_exactly() {
        let t0 = Instant::now();
        let mut l = Logs::new(1 << 20, LogMode::Drop);
        let raw: Vec<u8> = (0..=255u8).filter(|&b| b != b'\n').collect();
        l.handle_output(LogStream::Stdout, &raw, -5, t0);
        l.handle_output(LogStream::Stdout, b"\n", 0, t0);
        let b = ship(&mut l, t0);
        assert_eq!(b[0].entries[0].data, raw);
        assert_eq!(b[0].entries[0].timestamp_unix_us, -5);
    }

    #[test]
    fn ring_wraparound_keeps_entries_intact() {
        let t0 = Instant::now();
        let mut l = Logs::new(2000, LogMode::Drop);
        let mut expect: Vec<String> = Vec::new();
        for i in 0..500 {
            let line = format!("entry number {i} {}", "z".repeat(i % 37));
            l.handle_output(LogStream::Stderr, line.as_bytes(), 1, t0);
            l.handle_output(LogStream::Stderr, b"\n", 1, t0);
            expect.push(line);
            if i % 7 == 0 {
                let b = ship(&mut l, t0);
                for batch in &b {
                    let n = batch.entries.len() as u64;
                    l.handle_ack(batch.first_seq + n);
                    for (k, e) in batch.entries.iter().enumerate() {
                        assert_eq!(e.data, expect[(batch.first_seq as usize) + k].as_bytes());
                    }
                }
            }
        }
    }

    /// Offers `text` the way the reactor does: whatever is not taken is offered again later.
    fn offer(l: &mut Logs, stream: LogStream, text: &[u8], t: Instant) -> usize {
        l.handle_output(stream, text, 1, t)
    }

    /// Ships and acknowledges everything sendable.
    fn ship_and_ack(l: &mut Logs, t: Instant) -> Vec<(LogStream, String, bool)> {
        let b = ship(l, t);
        if let Some(last) = b.last() {
            l.handle_ack(last.first_seq + last.entries.len() as u64);
        }
        lines(&b)
    }

    #[test]
    fn drop_mode_always_takes_everything() {
        let t0 = Instant::now();
        let mut l = Logs::new(2000, LogMode::Drop);
        let text: Vec<u8> = (0..500)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        assert_eq!(offer(&mut l, LogStream::Stdout, &text, t0), text.len());
        assert!(l.dropped() > 0);
    }

    #[test]
    fn block_mode_takes_whole_lines_that_fit_and_the_rest_after_acks() {
        let t0 = Instant::now();
        let cap = 32 * 1024;
        let mut l = Logs::new(cap, LogMode::Block);
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("line {i:05}\n").into_bytes())
            .collect();
        let mut at = 0;
        let mut got = Vec::new();
        let mut rounds = 0;
        while at < text.len() {
            let took = offer(&mut l, LogStream::Stdout, &text[at..], t0);
            if at + took < text.len() {
                assert_eq!(text[at + took - 1], b'\n', "stops at a line boundary");
                assert!(l.held() <= l.cap, "never over the cap");
                assert!(
                    l.held() + HEADER + 11 > l.cap - OWN_RESERVE,
                    "stops only when full"
                );
                // Nothing more fits until the server acknowledges.
                assert_eq!(offer(&mut l, LogStream::Stdout, &text[at + took..], t0), 0);
            }
            at += took;
            got.extend(ship_and_ack(&mut l, t0));
            rounds += 1;
        }
        assert!(
            rounds > 5,
            "the buffer filled several times ({rounds} rounds)"
        );
        assert_eq!(l.dropped(), 0, "nothing dropped");
        let want: Vec<String> = (0..20_000).map(|i| format!("line {i:05}")).collect();
        assert_eq!(got.iter().map(|x| x.1.clone()).collect::<Vec<_>>(), want);
        assert!(got.iter().all(|x| !x.2), "no line cut");
    }

    #[test]
    fn block_mode_does_not_cut_a_stalled_line_when_it_looks_idle() {
        let t0 = Instant::now();
        let mut l = Logs::new(16 * 1024, LogMode::Block);
        // Fill the buffer with whole lines...
        let filler: Vec<u8> = (0..2000)
            .flat_map(|i| format!("fill {i:05}\n").into_bytes())
            .collect();
        assert!(offer(&mut l, LogStream::Stdout, &filler, t0) < filler.len());
        // ...then the start of a line is held aside (it is not an entry yet)...
        assert_eq!(offer(&mut l, LogStream::Stdout, b"the start ", t0), 10);
        // ...and its end does not fit: stalled.
        let rest = b"and the end\n";
        assert_eq!(offer(&mut l, LogStream::Stdout, rest, t0), 0);
        // Long after the idle time the line is not shipped in pieces, and no timer is due (the
        // loop would spin on it).
        let late = t0 + LINE_IDLE * 10;
        assert_eq!(
            l.poll_timeout(true, late).filter(|&t| t <= late),
            None,
            "no due timer while stalled"
        );
        l.handle_timeout(late);
        let first = ship_and_ack(&mut l, late);
        assert!(
            first.iter().all(|x| x.1.starts_with("fill")),
            "only the filler went: {:?}",
            first.last()
        );
        // Room again: the line goes whole.
        assert_eq!(offer(&mut l, LogStream::Stdout, rest, late), rest.len());
        assert_eq!(
            ship_and_ack(&mut l, late),
            [(LogStream::Stdout, "the start and the end".into(), false)]
        );
        assert_eq!(l.dropped(), 0);
    }

    #[test]
    fn block_mode_keeps_room_for_our_own_lines_and_never_pushes_out_the_apps() {
        let t0 = Instant::now();
        let mut l = Logs::new(32 * 1024, LogMode::Block);
        let text: Vec<u8> = (0..10_000)
            .flat_map(|i| format!("app {i:05}\n").into_bytes())
            .collect();
        let took = offer(&mut l, LogStream::Stdout, &text, t0);
        assert!(took < text.len());
        let apps = took / 10;
        // A warning while the app is blocked still fits (the reserve).
        l.handle_own(b"WARN the server went silent", 1, t0);
        assert_eq!(l.dropped(), 0);
        // A flood of our own lines: the reserve fills and further own lines are dropped and
        // counted, never an app line, and the numbering stays contiguous.
        for i in 0..1000 {
            l.handle_own(format!("WARN own line {i}").as_bytes(), 1, t0);
        }
        assert!(l.dropped() > 0);
        assert!(l.held() <= l.cap);
        let b = ship(&mut l, t0);
        let all = lines(&b);
        assert_eq!(
            all.iter().filter(|x| x.0 == LogStream::Stdout).count(),
            apps,
            "every app line kept"
        );
        let mut next = b[0].first_seq;
        for batch in &b {
            assert_eq!(batch.first_seq, next, "no gap in the numbers");
            next += batch.entries.len() as u64;
        }
        assert!(
            b.iter().map(|x| x.dropped).sum::<u64>() > 0,
            "the count is reported"
        );
    }

    #[test]
    fn block_mode_ships_the_last_partial_line_at_eof_once_it_fits() {
        let t0 = Instant::now();
        let mut l = Logs::new(16 * 1024, LogMode::Block);
        let filler: Vec<u8> = (0..2000)
            .flat_map(|i| format!("fill {i:05}\n").into_bytes())
            .collect();
        let took = offer(&mut l, LogStream::Stderr, &filler, t0);
        // Back up to a buffer just short of full, then a last unterminated line and EOF.
        let mut l = Logs::new(16 * 1024, LogMode::Block);
        let almost = filler[..took].iter().rposition(|&b| b == b'\n').unwrap() + 1;
        offer(&mut l, LogStream::Stderr, &filler[..almost], t0);
        let tail = vec![b'z'; 4000];
        assert_eq!(offer(&mut l, LogStream::Stderr, &tail, t0), tail.len());
        l.handle_eof(LogStream::Stderr, t0);
        assert!(l.unacked());
        let first = ship_and_ack(&mut l, t0);
        assert!(
            first.iter().all(|x| x.1.starts_with("fill")),
            "the tail waited for room"
        );
        assert_eq!(l.poll_timeout(true, t0), Some(t0), "and goes at once now");
        l.handle_timeout(t0);
        assert_eq!(
            ship_and_ack(&mut l, t0),
            [(LogStream::Stderr, "z".repeat(4000), true)]
        );
        assert!(!l.unacked());
        assert_eq!(l.dropped(), 0);
    }

    #[test]
    fn block_mode_still_drops_a_line_that_could_never_fit() {
        let t0 = Instant::now();
        let mut l = Logs::new(1000, LogMode::Block);
        let big = vec![b'b'; 5000];
        assert_eq!(offer(&mut l, LogStream::Stdout, &big, t0), big.len());
        assert_eq!(offer(&mut l, LogStream::Stdout, b"\n", t0), 1);
        assert_eq!(l.dropped(), 1, "rather than stall the app for good");
        assert_eq!(offer(&mut l, LogStream::Stdout, b"ok\n", t0), 3);
        let b = ship(&mut l, t0);
        assert_eq!(lines(&b), [(LogStream::Stdout, "ok".into(), false)]);
        assert_eq!(b[0].first_seq, 1, "the lost entry's number is skipped");
    }

    #[test]
    fn log_modes_parse() {
        assert_eq!(LogMode::parse("drop"), Some(LogMode::Drop));
        assert_eq!(LogMode::parse(" Block "), Some(LogMode::Block));
        for bad in ["", "blocking", "non-blocking", "1", "dropp"] {
            assert_eq!(LogMode::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_small_buffer_or_a_waiting_app_does_not_wait_out_the_batch_age() {
        let t0 = Instant::now();
        // A quarter of a 64 KiB buffer goes at once (a full batch could never wait in it).
        let mut l = Logs::new(64 * 1024, LogMode::Drop);
        let line = [b'q'; 99];
        while !l.batch_due(t0, false) {
            offer(&mut l, LogStream::Stdout, &line, t0);
            offer(&mut l, LogStream::Stdout, b"\n", t0);
            assert!(l.held() < 20 * 1024, "due by a quarter of the buffer");
        }
        // Block mode, buffer full, the app waiting: whatever is unsent goes now.
        let mut l = Logs::new(64 * 1024, LogMode::Block);
        let text: Vec<u8> = (0..10_000)
            .flat_map(|i| format!("line {i:05}\n").into_bytes())
            .collect();
        let took = offer(&mut l, LogStream::Stdout, &text, t0);
        ship(&mut l, t0);
        l.handle_ack(100);
        let more = offer(&mut l, LogStream::Stdout, &text[took..], t0);
        assert!(
            more > 0 && took + more < text.len(),
            "a little room, then stalled again"
        );
        assert!(l.batch_due(t0, false), "the app waits: no batch age");
        // Negative control: the same few entries without a waiting app wait for the age.
        let mut l = Logs::new(64 * 1024, LogMode::Block);
        offer(&mut l, LogStream::Stdout, &text[..more], t0);
        assert!(!l.batch_due(t0, false));
    }
}
