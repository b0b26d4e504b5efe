extern crate std;

use super::*;
use crate::samples::every_kind;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

#[test]
fn every_kind_round_trips() {
    let frames = every_kind();
    // Every oneof field number 1..=22 is covered.
    let mut tags: Vec<u32> = frames
        .iter()
        .map(|f| {
            let mut b = Vec::new();
            f.encode(&mut b).unwrap();
            u32::from(b[0] >> 3)
        })
        .collect();
    tags.dedup();
    assert_eq!(tags, (1..=23).collect::<Vec<_>>());

    for frame in &frames {
        let mut wire = Vec::new();
        encode(frame, &mut wire).unwrap();
        assert_eq!(wire.len(), encoded_len(frame));
        let mut input = &wire[..];
        assert_eq!(decode(&mut input), Some(Ok(frame.clone())));
        assert!(input.is_empty());
    }
}

#[test]
fn split_at_every_byte_boundary() {
    let frames = every_kind();
    let mut wire = Vec::new();
    for f in &frames {
        encode(f, &mut wire).unwrap();
    }
    // Feed the stream in two pieces split at every position, then one byte at a time: a decoder
    // that only ever sees a prefix must say "need more" and consume nothing.
    for split in 0..=wire.len() {
        let mut got = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for piece in [&wire[..split], &wire[split..]] {
            pending.extend_from_slice(piece);
            let mut input = &pending[..];
            while let Some(r) = decode(&mut input) {
                got.push(r.unwrap());
            }
            let used = pending.len() - input.len();
            pending.drain(..used);
        }
        assert_eq!(got, frames, "split at {split}");
        assert!(pending.is_empty());
    }
    let mut got = Vec::new();
    let mut pending = Vec::new();
    for &b in &wire {
        pending.push(b);
        let mut input = &pending[..];
        if let Some(r) = decode(&mut input) {
            got.push(r.unwrap());
            assert!(
                input.is_empty(),
                "a frame ends exactly where its prefix says"
            );
            pending.clear();
        }
    }
    assert_eq!(got, frames);
}

#[test]
fn oversized_prefix_is_an_error_from_the_prefix_alone() {
    for len in [MAX_FRAME as u32 + 1, u32::MAX] {
        let wire = len.to_be_bytes();
        let mut input = &wire[..];
        assert_eq!(decode(&mut input), Some(Err(Error::TooLarge(len as usize))));
        assert_eq!(input.len(), 4, "nothing consumed on error");
        assert_eq!(frame_len(&wire), Some(Err(Error::TooLarge(len as usize))));
    }
    // Exactly MAX_FRAME is allowed: with only the prefix present it needs more bytes.
    let wire = (MAX_FRAME as u32).to_be_bytes();
    assert_eq!(decode(&mut &wire[..]), None);
    assert_eq!(frame_len(&wire), Some(Ok(MAX_FRAME + HEADER_LEN)));
    assert_eq!(frame_len(&wire[..3]), None);
}

#[test]
fn undecodable_bodies_are_errors() {
    let bodies: [&[u8]; 4] = [
        &[0xff; 10],                     // invalid wire type / varint overflow
        &[0x0a, 0x05, 0x08],             // hello field announces 5 bytes, 1 present
        &[0x12, 0xff, 0xff, 0xff, 0x7f], // welcome length far beyond the body
        &[0x0a],                         // tag without a length
    ];
    for body in bodies {
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(body);
        let mut input = &wire[..];
        match decode(&mut input) {
            Some(Err(Error::Malformed(_))) => {}
            other => panic!("{body:?}: expected Malformed, got {other:?}"),
        }
        assert_eq!(input.len(), wire.len(), "nothing consumed on error");
    }
}

#[test]
fn empty_and_unknown_kinds_decode_as_no_kind() {
    // An empty body, and a body holding only a field number this version does not know (99,
    // varint 1): both are valid protobuf, so both decode and receivers ignore them.
    for body in [&[][..], &[0x98, 0x06, 0x01][..]] {
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(body);
        assert_eq!(decode(&mut &wire[..]), Some(Ok(Frame { kind: None })));
    }
}

#[test]
fn encode_refuses_oversized_and_leaves_output_untouched() {
    let frame = Frame::from(Kind::StreamData(StreamData {
        stream: 1,
        data: vec![0; MAX_FRAME],
    }));
    let mut out = vec![1, 2, 3];
    assert!(matches!(encode(&frame, &mut out), Err(Error::TooLarge(n)) if n > MAX_FRAME));
    assert_eq!(out, [1, 2, 3]);

    // A frame whose body is exactly MAX_FRAME is fine: find the payload size that gets there.
    let data_len = (MAX_FRAME - 16..MAX_FRAME)
        .find(|&n| {
            Frame::from(Kind::StreamData(StreamData {
                stream: 1,
                data: vec![0; n],
            }))
            .encoded_len()
                == MAX_FRAME
        })
        .unwrap();
    let exact = Frame::from(Kind::StreamData(StreamData {
        stream: 1,
        data: vec![0; data_len],
    }));
    let mut out = Vec::new();
    encode(&exact, &mut out).unwrap();
    assert_eq!(decode(&mut &out[..]), Some(Ok(exact)));
}

#[test]
fn encode_into_a_fixed_buffer_checks_room() {
    let frame = Frame::from(Kind::Ping(Ping { nonce: 1 }));
    let mut small = [0u8; 3];
    let mut out = &mut small[..];
    assert_eq!(
        encode(&frame, &mut out),
        Err(Error::NoSpace {
            needed: encoded_len(&frame)
        })
    );
    assert_eq!(small, [0; 3], "nothing written");

    let mut big = [0u8; 64];
    let mut out = &mut big[..];
    encode(&frame, &mut out).unwrap();
    let left = out.len();
    let n = 64 - left;
    assert_eq!(decode(&mut &big[..n]), Some(Ok(frame)));
}

#[test]
fn errors_display_clearly() {
    assert_eq!(
        Error::TooLarge(2_000_000).to_string(),
        "frame of 2000000 bytes exceeds the 1048576-byte limit"
    );
}

#[test]
fn sizes() {
    let ok = [
        ("4MiB", 4 << 20),
        ("1MiB", 1 << 20),
        ("512KiB", 512 << 10),
        ("64k", 64 << 10),
        ("1GiB", 1 << 30),
        ("1MB", 1_000_000),
        ("100kb", 100_000),
        ("65536", 65536),
        ("10b", 10),
    ];
    for (s, n) in ok {
        assert_eq!(parse_size(s), Ok(n), "{s}");
    }
    for s in [
        "",
        "MiB",
        "1.5MiB",
        "4 XB",
        "-1",
        "x",
        "99999999999999999999",
    ] {
        assert!(parse_size(s).is_err(), "{s:?} should be refused");
    }
}
