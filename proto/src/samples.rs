//! Sample frames with every field set, for tests, fuzz seeds and compatibility checks of
//! both sides (not used by the protocol itself).

use crate::*;
use alloc::collections::BTreeMap;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

/// One frame of every kind, each with every field set to a non-default value, so a field that
/// failed to round-trip would show.
pub fn every_kind() -> Vec<Frame> {
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
        env: BTreeMap::from([
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "".to_string()),
        ]),
        files: vec![ConfigFile {
            path: "/etc/app.conf".to_string(),
            mode: 0o640,
            contents: vec![0, 1, 255],
        }],
        on_change: Some(OnChange {
            action: on_change::Action::Signal as i32,
            signal: "HUP".to_string(),
        }),
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
            disabled: Some(Features {
                config: true,
                logs: false,
                exec: true,
                url: true,
            }),
            config_version: 4,
            next_log_seq: 100,
            status: Some(status.clone()),
            // One entry: with more, prost-reflect's re-encoding (hash order) would not be
            // byte-identical, and the compat test compares Hello byte for byte.
            labels: BTreeMap::from([("env".to_string(), "prod".to_string())]),
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
        Kind::ConfigApplied(ConfigApplied {
            version: 9,
            error: "disk full".to_string(),
        }),
        Kind::LogBatch(LogBatch {
            first_seq: 5,
            entries: vec![
                LogEntry {
                    stream: LogStream::Stderr as i32,
                    timestamp_unix_us: 1_700_000_000_000_000,
                    data: b"x\xff".to_vec(),
                    truncated: true,
                },
                LogEntry {
                    stream: LogStream::Entrypoint as i32,
                    timestamp_unix_us: -1,
                    data: vec![],
                    truncated: false,
                },
            ],
            dropped: 3,
        }),
        Kind::LogAck(LogAck { up_to_seq: 7 }),
        Kind::ExecStart(ExecStart {
            session: 1 << 40,
            argv: vec!["sh".to_string(), "-c".to_string(), "echo hi".to_string()],
            pty: Some(Pty {
                rows: 24,
                cols: 80,
                term: "xterm".to_string(),
            }),
            env: BTreeMap::from([("K".to_string(), "V".to_string())]),
            stdin: true,
        }),
        Kind::ExecInput(ExecInput {
            session: 1,
            data: b"ls\n".to_vec(),
        }),
        Kind::ExecResize(ExecResize {
            session: 1,
            rows: 50,
            cols: 132,
        }),
        Kind::ExecSignal(ExecSignal {
            session: 1,
            signal: 2,
        }),
        Kind::ExecStdinClose(ExecStdinClose { session: 1 }),
        Kind::ExecStarted(ExecStarted {
            session: 1,
            pid: 77,
        }),
        Kind::ExecOutput(ExecOutput {
            session: 1,
            stream: OutputStream::Err as i32,
            data: b"err".to_vec(),
        }),
        Kind::ExecExit(ExecExit {
            session: 1,
            code: 3,
            signal: 15,
            error: "not allowed".to_string(),
        }),
        Kind::StreamOpen(StreamOpen {
            stream: 8,
            target_port: 5000,
            client_addr: "127.0.0.1:5555".to_string(),
        }),
        Kind::StreamData(StreamData {
            stream: 8,
            data: vec![7; 300],
        }),
        Kind::StreamClose(StreamClose {
            stream: 8,
            half: true,
            error: "reset".to_string(),
        }),
        Kind::WindowUpdate(WindowUpdate {
            target: Some(window_update::Target::Stream(8)),
            credits: 4096,
        }),
        Kind::WindowUpdate(WindowUpdate {
            target: Some(window_update::Target::ExecSession(1)),
            credits: 1,
        }),
        Kind::Ping(Ping { nonce: 11 }),
        Kind::Pong(Pong { nonce: 11 }),
        Kind::Status(status),
        Kind::ChildControl(ChildControl {
            restart: true,
            signal: 1,
        }),
    ];
    kinds.into_iter().map(Frame::from).collect()
}
