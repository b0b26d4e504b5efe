extern crate std;

use super::*;
use alloc::collections::BTreeMap;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

/// One frame of every kind, each with every field set to a non-default value, so a field that
/// failed to round-trip would show.
pub(crate) fn every_kind() -> Vec<Frame> {
    let status = Status {
        state: status::State::Running as i32,
        child_pid: 42,
        exit_code: 3,
        exit_signal: 9,
        oom_killed: true,
        child_rss_bytes: 1 << 20,
        child_cpu_ms: 1234,
        starts: 2,
        config_version: 7,
        entrypoint_rss_bytes: 900_000,
    };
    let config = Config {
        version: 9,
        env: BTreeMap::from([("A".to_string(), "1".to_string()), ("B".to_string(), "".to_string())]),
        files: vec![ConfigFile { path: "/etc/app.conf".to_string(), mode: 0o640, contents: vec![0, 1, 255] }],
        on_change: Some(OnChange { action: on_change::Action::Signal as i32, signal: "HUP".to_string() }),
        stop_grace_ms: 10_000,
        restart_splay_ms: 5_000,
    };
    let kinds = vec![
        Kind::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            token: "tok".to_string(),
            instance_id: vec![0xab; 16],
            entrypoint_version: "0.1.0".to_string(),
            hostname: "box".to_string(),
            pid: 1,
            disabled: Some(Features { config: true, logs: false, exec: true, url: true }),
            config_version: 4,
            next_log_seq: 100,
            status: Some(status.clone()),
        }),
        Kind::Welcome(Welcome {
            protocol_version: 1,
            heartbeat_interval_ms: 15_000,
            app: "web".to_string(),
            deployment: "d1".to_string(),
            server_version: "0.1.0".to_string(),
            config: Some(config.clone()),
            log_acked_seq: 99,
        }),
        Kind::Reject(Reject {
            reason: reject::Reason::BadToken as i32,
            message: "no such token".to_string(),
            retry_after_ms: 5000,
        }),
        Kind::Config(config),
        Kind::ConfigApplied(ConfigApplied { version: 9, error: "disk full".to_string() }),
        Kind::LogBatch(LogBatch {
            first_seq: 5,
            entries: vec![
                LogEntry { stream: LogStream::Stderr as i32, timestamp_unix_us: 1_700_000_000_000_000, data: b"x\xff".to_vec(), truncated: true },
                LogEntry { stream: LogStream::Entrypoint as i32, timestamp_unix_us: -1, data: vec![], truncated: false },
            ],
            dropped: 3,
        }),
        Kind::LogAck(LogAck { up_to_seq: 7 }),
        Kind::ExecStart(ExecStart {
            session: 1 << 40,
            argv: vec!["sh".to_string(), "-c".to_string(), "echo hi".to_string()],
            pty: Some(Pty { rows: 24, cols: 80, term: "xterm".to_string() }),
            env: BTreeMap::from([("K".to_string(), "V".to_string())]),
            stdin: true,
        }),
        Kind::ExecInput(ExecInput { session: 1, data: b"ls\n".to_vec() }),
        Kind::ExecResize(ExecResize { session: 1, rows: 50, cols: 132 }),
        Kind::ExecSignal(ExecSignal { session: 1, signal: 2 }),
        Kind::ExecStdinClose(ExecStdinClose { session: 1 }),
        Kind::ExecStarted(ExecStarted { session: 1, pid: 77 }),
        Kind::ExecOutput(ExecOutput { session: 1, stream: OutputStream::Err as i32, data: b"err".to_vec() }),
        Kind::ExecExit(ExecExit { session: 1, code: 3, signal: 15, error: "not allowed".to_string() }),
        Kind::StreamOpen(StreamOpen { stream: 8, target_port: 5000, client_addr: "127.0.0.1:5555".to_string() }),
        Kind::StreamData(StreamData { stream: 8, data: vec![7; 300] }),
        Kind::StreamClose(StreamClose { stream: 8, half: true, error: "reset".to_string() }),
        Kind::WindowUpdate(WindowUpdate { target: Some(window_update::Target::Stream(8)), credits: 4096 }),
        Kind::WindowUpdate(WindowUpdate { target: Some(window_update::Target::ExecSession(1)), credits: 1 }),
        Kind::Ping(Ping { nonce: 11 }),
        Kind::Pong(Pong { nonce: 11 }),
        Kind::Status(status),
    ];
    kinds.into_iter().map(Frame::from).collect()
}

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
    assert_eq!(tags, (1..=22).collect::<Vec<_>>());

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
            assert!(input.is_empty(), "a frame ends exactly where its prefix says");
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
        &[0xff; 10],                // invalid wire type / varint overflow
        &[0x0a, 0x05, 0x08],        // hello field announces 5 bytes, 1 present
        &[0x12, 0xff, 0xff, 0xff, 0x7f], // welcome length far beyond the body
        &[0x0a],                    // tag without a length
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
    let frame = Frame::from(Kind::StreamData(StreamData { stream: 1, data: vec![0; MAX_FRAME] }));
    let mut out = vec![1, 2, 3];
    assert!(matches!(encode(&frame, &mut out), Err(Error::TooLarge(n)) if n > MAX_FRAME));
    assert_eq!(out, [1, 2, 3]);

    // A frame whose body is exactly MAX_FRAME is fine: find the payload size that gets there.
    let data_len = (MAX_FRAME - 16..MAX_FRAME)
        .find(|&n| Frame::from(Kind::StreamData(StreamData { stream: 1, data: vec![0; n] })).encoded_len() == MAX_FRAME)
        .unwrap();
    let exact = Frame::from(Kind::StreamData(StreamData { stream: 1, data: vec![0; data_len] }));
    let mut out = Vec::new();
    encode(&exact, &mut out).unwrap();
    assert_eq!(decode(&mut &out[..]), Some(Ok(exact)));
}

#[test]
fn encode_into_a_fixed_buffer_checks_room() {
    let frame = Frame::from(Kind::Ping(Ping { nonce: 1 }));
    let mut small = [0u8; 3];
    let mut out = &mut small[..];
    assert_eq!(encode(&frame, &mut out), Err(Error::NoSpace { needed: encoded_len(&frame) }));
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
