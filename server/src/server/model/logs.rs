//! The log model: stored lines, what a reader asks for, per-instance sequence accounting and
//! per-app usage (see "Logs" in docs/architecture.md for how they are kept).

/// Log intake has stalled: storing logs fails (a full disk, an I/O error) and the writer keeps
/// retrying. Set by the writer on the first failure, cleared by the next successful commit;
/// shown by `GET /v1/instances` and the logs endpoint so `instances` and `logs` can say so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntakeStall {
    pub since_ms: i64,
    pub error: String,
}

/// The stored number of a stream back to its name (0 stdout, 1 stderr, 2 entrypoint).
pub fn stream_name(s: i64) -> &'static str {
    match s {
        1 => "stderr",
        2 => "entrypoint",
        _ => "stdout",
    }
}

/// A stream name as `logs --stream` takes it, to its stored number.
pub fn parse_stream(s: &str) -> Option<i64> {
    match s.to_ascii_lowercase().as_str() {
        "stdout" | "out" => Some(0),
        "stderr" | "err" => Some(1),
        "entrypoint" | "ep" => Some(2),
        _ => None,
    }
}

/// Which rows a `logs` request wants.
#[derive(Debug, Clone)]
pub struct LogFilter {
    pub app: String,
    /// The source (instance) row id; -1 matches nothing (an instance with no logs yet).
    pub src: Option<i64>,
    pub stream: Option<i64>,
    pub since_us: Option<i64>,
}

/// One stored line. A marker (lost entries) has `dropped` > 0 and no data.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Arrival order: the order `logs` shows.
    pub id: i64,
    pub instance: String,
    pub seq: i64,
    pub stream: i64,
    pub ts_us: i64,
    pub truncated: bool,
    pub dropped: i64,
    pub data: Vec<u8>,
}

/// A line to store (the writer's side of [`LogLine`]).
#[derive(Debug, Clone, Copy)]
pub struct NewLine<'a> {
    pub seq: i64,
    pub stream: i64,
    pub ts_us: i64,
    pub truncated: bool,
    pub dropped: i64,
    pub data: &'a [u8],
}

/// Chunk codec 0: the lines one after another, each `flags` (bits 0-1 stream, bit 2 truncated,
/// bit 3 marker), varint seq - previous seq (the first: - the chunk's first_seq), zigzag varint
/// ts_us - previous ts_us (the first: - 0), for a marker varint dropped, varint data length,
/// data. Varints are LEB128. Plain integers and bytes, so any backend stores the same blob (see
/// [`ChunkBuilder::encoded`] for when it is compressed).
pub const CODEC_PLAIN: i64 = 0;
/// Chunk codec 1: the plain encoding compressed with raw deflate (level 1).
pub const CODEC_DEFLATE: i64 = 1;
/// Chunks smaller than this are stored plain: compressing them saves too little.
const COMPRESS_MIN: usize = 1024;
/// Most bytes a chunk decompresses to: a chunk holds at most about a megabyte (the writer's cap)
/// plus its line headers, so anything bigger is damage, not data.
const DECOMPRESSED_MAX: u64 = 64 * 1024 * 1024;
/// `streams` bit of a chunk that holds a marker.
pub const STREAMS_MARKER: i64 = 8;

/// The lines of one chunk being encoded (one source; the lines in id order).
#[derive(Debug, Default, Clone)]
pub struct ChunkBuilder {
    pub data: Vec<u8>,
    pub first_seq: i64,
    pub last_seq: i64,
    pub min_ts_us: i64,
    pub max_ts_us: i64,
    pub lines: i64,
    pub bytes: i64,
    pub streams: i64,
    prev_ts: i64,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

impl ChunkBuilder {
    pub fn is_empty(&self) -> bool {
        self.lines == 0
    }

    /// The blob to store and its codec: deflated when that saves at least a tenth.
    pub fn encoded(&self) -> (i64, std::borrow::Cow<'_, [u8]>) {
        use std::io::Write as _;
        if self.data.len() >= COMPRESS_MIN {
            let mut z = flate2::write::DeflateEncoder::new(
                Vec::with_capacity(self.data.len() / 2),
                flate2::Compression::fast(),
            );
            if z.write_all(&self.data).is_ok()
                && let Ok(out) = z.finish()
                && out.len() < self.data.len() - self.data.len() / 10
            {
                return (CODEC_DEFLATE, out.into());
            }
        }
        (CODEC_PLAIN, (&self.data[..]).into())
    }

    pub fn push(&mut self, l: &NewLine<'_>) {
        let marker = l.dropped > 0;
        if self.lines == 0 {
            self.first_seq = l.seq;
            self.last_seq = l.seq;
            self.min_ts_us = l.ts_us;
            self.max_ts_us = l.ts_us;
        }
        let stream = l.stream.clamp(0, 2);
        let flags = stream as u8 | (u8::from(l.truncated) << 2) | (u8::from(marker) << 3);
        self.data.push(flags);
        put_varint(&mut self.data, l.seq.wrapping_sub(self.last_seq) as u64);
        let d = l.ts_us.wrapping_sub(self.prev_ts);
        put_varint(&mut self.data, ((d << 1) ^ (d >> 63)) as u64);
        if marker {
            put_varint(&mut self.data, l.dropped as u64);
        }
        put_varint(&mut self.data, l.data.len() as u64);
        self.data.extend_from_slice(l.data);
        self.prev_ts = l.ts_us;
        self.last_seq = l.seq;
        self.min_ts_us = self.min_ts_us.min(l.ts_us);
        self.max_ts_us = self.max_ts_us.max(l.ts_us);
        self.lines += 1;
        self.bytes += l.data.len() as i64;
        self.streams |= if marker { STREAMS_MARKER } else { 1 << stream };
    }
}

/// Decodes a chunk's lines: (seq, stream, ts_us, truncated, dropped, data) in id order. Errors
/// on a codec it does not know or a damaged blob.
pub fn decode_chunk(
    codec: i64,
    first_seq: i64,
    buf: &[u8],
    mut each: impl FnMut(NewLine<'_>) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let inflated;
    let buf = match codec {
        CODEC_PLAIN => buf,
        CODEC_DEFLATE => {
            use std::io::Read as _;
            let mut out = Vec::with_capacity(buf.len() * 4);
            flate2::read::DeflateDecoder::new(buf)
                .take(DECOMPRESSED_MAX)
                .read_to_end(&mut out)
                .map_err(|e| anyhow::anyhow!("damaged log chunk: {e}"))?;
            inflated = out;
            &inflated[..]
        }
        _ => anyhow::bail!("unknown log chunk codec {codec}"),
    };
    let bad = || anyhow::anyhow!("damaged log chunk");
    let (mut pos, mut seq, mut ts) = (0usize, first_seq, 0i64);
    while pos < buf.len() {
        let flags = buf[pos];
        pos += 1;
        seq = seq.wrapping_add(get_varint(buf, &mut pos).ok_or_else(bad)? as i64);
        let z = get_varint(buf, &mut pos).ok_or_else(bad)?;
        ts = ts.wrapping_add(((z >> 1) as i64) ^ -((z & 1) as i64));
        let dropped = if flags & 8 != 0 {
            get_varint(buf, &mut pos).ok_or_else(bad)? as i64
        } else {
            0
        };
        let len = get_varint(buf, &mut pos).ok_or_else(bad)? as usize;
        let data = buf
            .get(pos..pos.checked_add(len).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        pos += len;
        let line = NewLine {
            seq,
            stream: i64::from(flags & 3),
            ts_us: ts,
            truncated: flags & 4 != 0,
            dropped,
            data,
        };
        if !each(line)? {
            break;
        }
    }
    Ok(())
}

/// One instance's sequence accounting ("source"): H = `next_seq`, every entry below it is
/// stored or known lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRow {
    pub rowid: i64,
    /// The app the instance's logs belong to: a batch of any other app is never stored here.
    pub app: String,
    pub next_seq: u64,
    pub lost: u64,
    pub reported: u64,
}

/// Lines and bytes stored for an app.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Usage {
    pub lines: u64,
    pub bytes: u64,
}

/// An app's retention as set (None: the default).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Retention {
    pub max_lines: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// What `logs stats` shows of an app.
#[derive(Clone, Debug)]
pub struct LogStats {
    pub retention: Retention,
    /// (lines, bytes) as counted in the usage table.
    pub usage: (i64, i64),
    /// The newest 1,000 sources: (instance hex, next_seq, lost, reported_dropped).
    pub instances: Vec<(String, i64, i64, i64)>,
}

/// How an instance id prefix given to `logs --instance` resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceMatch {
    /// (source row id, or -1 while it has no logs; the full hex id).
    One(i64, String),
    None,
    /// Some of the matching ids.
    Many(Vec<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip() {
        let lines = [
            (5, 0, 1_000, false, 0, &b"a"[..]),
            (5, 2, 900, false, 3, &b""[..]),
            (8, 1, i64::MAX, true, 0, &[0xff; 300][..]),
            (8, 2, -7, false, 0, &b"notice"[..]),
            (9, 0, 0, false, 0, &b""[..]),
        ];
        let mut b = ChunkBuilder::default();
        for &(seq, stream, ts_us, truncated, dropped, data) in &lines {
            b.push(&NewLine {
                seq,
                stream,
                ts_us,
                truncated,
                dropped,
                data,
            });
        }
        assert_eq!((b.first_seq, b.last_seq, b.lines, b.bytes), (5, 9, 5, 307));
        assert_eq!((b.min_ts_us, b.max_ts_us), (-7, i64::MAX));
        assert_eq!(b.streams, 1 | 2 | 4 | STREAMS_MARKER);
        let mut got = Vec::new();
        decode_chunk(CODEC_PLAIN, b.first_seq, &b.data, |l| {
            got.push((
                l.seq,
                l.stream,
                l.ts_us,
                l.truncated,
                l.dropped,
                l.data.to_vec(),
            ));
            Ok(true)
        })
        .unwrap();
        let want: Vec<_> = lines
            .iter()
            .map(|&(a, b, c, d, e, f)| (a, b, c, d, e, f.to_vec()))
            .collect();
        assert_eq!(got, want);
        // Damage and unknown codecs are errors, never a panic.
        for cut in 0..b.data.len() {
            let _ = decode_chunk(CODEC_PLAIN, 5, &b.data[..cut], |_| Ok(true));
        }
        assert!(decode_chunk(CODEC_PLAIN, 5, &b.data[..b.data.len() - 1], |_| Ok(true)).is_err());
        assert!(decode_chunk(7, 5, &b.data, |_| Ok(true)).is_err());
        // Small chunks are stored plain; big ones that compress are deflated, and read back the
        // same.
        assert_eq!(b.encoded().0, CODEC_PLAIN);
        let mut big = ChunkBuilder::default();
        let texts: Vec<String> = (0..500).map(|i| format!("GET /items/{i} 200")).collect();
        for (i, t) in texts.iter().enumerate() {
            big.push(&NewLine {
                seq: i as i64,
                stream: 0,
                ts_us: 1_000 + i as i64,
                truncated: false,
                dropped: 0,
                data: t.as_bytes(),
            });
        }
        let (codec, blob) = big.encoded();
        assert_eq!(codec, CODEC_DEFLATE);
        assert!(blob.len() < big.data.len() / 2);
        let mut back = Vec::new();
        decode_chunk(codec, 0, &blob, |l| {
            back.push(String::from_utf8(l.data.to_vec()).unwrap());
            Ok(true)
        })
        .unwrap();
        assert_eq!(back, texts);
        assert!(decode_chunk(CODEC_DEFLATE, 0, &blob[..blob.len() / 2], |_| Ok(true)).is_err());
    }
}
