//! The agent against a fake server, in memory, on a fake clock (quinn-proto's style): no
//! sockets, no processes. The "reactor" here is the test: it carries out the agent's actions by
//! hand and plays the fds through a fake [`Pull`].

use super::*;
use crate::settings::Settings;
use waypost_proto::{
    Config, ConfigFile, ExecInput, ExecStdinClose, Frame, INITIAL_WINDOW, LogAck, LogBatch, Ping,
    Pong, StreamClose, StreamData, StreamOpen, Welcome, WindowUpdate,
};

/// The fds as the test plays them: bytes waiting in a source, and sources at their end.
#[derive(Default)]
struct FakeFds {
    data: Vec<(Source, Vec<u8>)>,
    eof: Vec<Source>,
}

impl Pull for FakeFds {
    fn read(&mut self, src: Source, buf: &mut [u8]) -> Read {
        if let Some(i) = self.data.iter().position(|(s, _)| *s == src) {
            let data = &mut self.data[i].1;
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            data.drain(..n);
            if data.is_empty() {
                self.data.remove(i);
            }
            return Read::Data(n);
        }
        if self.eof.contains(&src) {
            Read::Eof
        } else {
            Read::Blocked
        }
    }
}

struct Pair {
    agent: Agent,
    now: Instant,
    fds: FakeFds,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl Pair {
    fn new(vars: &[(&str, &str)]) -> Pair {
        let settings = Settings::from_vars(vars.iter().copied()).expect("valid settings");
        let now = Instant::now();
        let env = [
            ("PATH", "/bin"),
            ("WAYPOST_TOKEN", "secret"),
            ("HOME", "/root"),
        ];
        // The process environment the child's is made from: a fixed one, plus the settings'
        // variables (as the real entrypoint's environment holds them).
        let id = Identity {
            instance_id: vec![7; 16],
            hostname: "box".into(),
            pid: 1,
            env: env
                .iter()
                .chain(vars)
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            seeds: [1, 2],
        };
        Pair {
            agent: Agent::new(&settings, id, now),
            now,
            fds: FakeFds::default(),
        }
    }

    /// What the agent wants done.
    fn io(&mut self) -> Vec<IoAction> {
        std::iter::from_fn(|| self.agent.poll_io()).collect()
    }

    /// Everything the agent writes to the server now, decoded as the server would.
    fn sent(&mut self) -> Vec<Kind> {
        let mut out = Vec::new();
        while let Some(t) = self.agent.poll_transmit(self.now, &mut self.fds) {
            match t {
                Transmit::Frame(kind) => out.push(kind),
                Transmit::LogBatch => {
                    let mut bytes = Vec::new();
                    assert!(self.agent.encode_logs(&mut bytes, self.now));
                    let frame: Frame = waypost_proto::decode(&mut &bytes[..])
                        .expect("a whole frame")
                        .expect("decodes");
                    out.push(frame.kind.expect("a kind"));
                }
            }
        }
        out
    }

    /// Frames sent now, without the Status and Ping/Pong chatter.
    fn sent_data(&mut self) -> Vec<Kind> {
        self.sent()
            .into_iter()
            .filter(|k| !matches!(k, Kind::Status(_) | Kind::Ping(_) | Kind::Pong(_)))
            .collect()
    }

    fn frame(&mut self, kind: Kind) {
        self.agent.handle_frame(kind, self.now);
    }

    fn event(&mut self, event: IoEvent<'_>) {
        self.agent.handle_io(event, self.now);
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.agent.handle_timeout(self.now);
    }

    /// Connects and says Hello; returns it.
    fn connect(&mut self) -> Hello {
        self.event(IoEvent::Connected);
        match &self.sent()[..] {
            [Kind::Hello(h)] => h.clone(),
            other => panic!("expected a Hello, got {other:?}"),
        }
    }

    fn log_batch(&mut self) -> LogBatch {
        self.advance(crate::logs::BATCH_AGE);
        let batches: Vec<LogBatch> = self
            .sent()
            .into_iter()
            .filter_map(|k| {
                if let Kind::LogBatch(b) = k {
                    Some(b)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(batches.len(), 1, "{batches:?}");
        batches.into_iter().next().unwrap()
    }
}

fn env_of(env: &[(OsString, OsString)], key: &str) -> Option<String> {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.to_string_lossy().into_owned())
}

#[test]
fn an_agent_and_a_fake_server_on_fake_time() {
    let mut p = Pair::new(&[
        ("WAYPOST_SERVER", "127.0.0.1:9701"),
        ("WAYPOST_TOKEN", "secret"),
    ]);

    // Connect and Hello; the child waits for the config.
    assert!(matches!(p.io()[..], [IoAction::Connect(_)]));
    let hello = p.connect();
    assert_eq!(
        (
            hello.token.as_str(),
            &hello.instance_id[..],
            hello.next_log_seq
        ),
        ("secret", &[7u8; 16][..], 0)
    );
    assert!(p.io().is_empty(), "no child before the Welcome");

    // Welcome with the first config: files first, then the child, with the config's env.
    let config = Config {
        version: 1,
        env: [("GREETING".to_string(), "hi".to_string())]
            .into_iter()
            .collect(),
        files: vec![ConfigFile {
            path: "/etc/app.conf".into(),
            mode: 0o644,
            contents: b"x".to_vec(),
        }],
        ..Default::default()
    };
    p.frame(Kind::Welcome(Welcome {
        heartbeat_interval_ms: 1000,
        config: Some(config),
        ..Default::default()
    }));
    let io = p.io();
    assert!(
        matches!(&io[..], [IoAction::WriteConfig { version: 1, write, remove }, IoAction::SpawnChild] if write.len() == 1 && remove.is_empty()),
        "{io:?}"
    );
    p.event(IoEvent::ConfigWritten {
        version: 1,
        wrote: 1,
        removed: 0,
        result: Ok(()),
    });
    let env = p.agent.child_env();
    assert_eq!(env_of(&env, "GREETING").as_deref(), Some("hi"));
    assert_eq!(
        env_of(&env, "PORT").as_deref(),
        Some("5000"),
        "PORT defaults for the child"
    );
    assert_eq!(
        env_of(&env, "WAYPOST_TOKEN"),
        None,
        "the token never reaches the child"
    );
    assert!(
        p.sent_data()
            .iter()
            .any(|k| matches!(k, Kind::ConfigApplied(a) if a.version == 1 && a.error.is_empty()))
    );

    // The child "spawned"; its output becomes a LogBatch, acknowledged.
    p.event(IoEvent::ChildSpawned {
        pid: 100,
        oom_kills: None,
    });
    let status = p
        .sent()
        .into_iter()
        .find_map(|k| {
            if let Kind::Status(s) = k {
                Some(s)
            } else {
                None
            }
        })
        .expect("a Status");
    assert_eq!(
        (status.state, status.child_pid),
        (status::State::Running as i32, 100)
    );
    assert_eq!(
        p.agent
            .handle_output(LogStream::Stdout, b"hello\nworld\n", 1, p.now),
        12
    );
    let batch = p.log_batch();
    assert_eq!(batch.first_seq, 0);
    assert_eq!(
        batch
            .entries
            .iter()
            .map(|e| &e.data[..])
            .collect::<Vec<_>>(),
        [&b"hello"[..], b"world"]
    );
    p.frame(Kind::LogAck(LogAck { up_to_seq: 2 }));

    // An exec session: start, input, output, exit.
    p.frame(Kind::ExecStart(ExecStart {
        session: 7,
        argv: vec!["sh".into()],
        stdin: true,
        ..Default::default()
    }));
    let io = p.io();
    let [
        IoAction::StartExec {
            slot,
            id: 7,
            env,
            pty: None,
            stdin: true,
            ..
        },
    ] = &io[..]
    else {
        panic!("{io:?}")
    };
    assert_eq!(
        env_of(env, "GREETING").as_deref(),
        Some("hi"),
        "exec gets the app's env"
    );
    let slot = *slot;
    p.event(IoEvent::ExecStarted { slot, pid: 200 });
    assert_eq!(
        p.sent_data(),
        [Kind::ExecStarted(ExecStarted {
            session: 7,
            pid: 200
        })]
    );
    p.frame(Kind::ExecInput(ExecInput {
        session: 7,
        data: b"echo hi\n".to_vec(),
    }));
    assert_eq!(p.agent.exec_pending(slot), b"echo hi\n");
    p.agent.exec_wrote(slot, 8, p.now);
    assert!(p.agent.exec_pending(slot).is_empty());
    p.frame(Kind::ExecStdinClose(ExecStdinClose { session: 7 }));
    assert_eq!(p.io(), [IoAction::CloseExecStdin(slot)]);
    p.fds.data.push((Source::Exec(slot, 1), b"hi\n".to_vec()));
    assert_eq!(
        p.sent_data(),
        [Kind::ExecOutput(ExecOutput {
            session: 7,
            stream: OutputStream::Out as i32,
            data: b"hi\n".to_vec()
        })]
    );
    p.event(IoEvent::Reaped {
        pid: 200,
        code: Some(0),
        signal: None,
        oom_kills: None,
    });
    assert!(
        p.sent_data().is_empty(),
        "no exit report while its output may still come"
    );
    p.fds
        .eof
        .extend([Source::Exec(slot, 1), Source::Exec(slot, 2)]);
    assert_eq!(
        p.sent_data(),
        [Kind::ExecExit(ExecExit {
            session: 7,
            code: 0,
            signal: 0,
            error: String::new()
        })]
    );
    let io = p.io();
    assert_eq!(
        io,
        [
            IoAction::CloseExecOutput { slot, which: 1 },
            IoAction::CloseExecOutput { slot, which: 2 },
            IoAction::CloseExec(slot)
        ]
    );
    p.fds.eof.clear();

    // A tunnel stream: open, data both ways within the credits, close.
    p.frame(Kind::StreamOpen(StreamOpen {
        stream: 9,
        target_port: 0,
        client_addr: "1.2.3.4:5".into(),
    }));
    let io = p.io();
    let [IoAction::ConnectTunnel { slot, id: 9, addr }] = &io[..] else {
        panic!("{io:?}")
    };
    assert_eq!(addr.to_string(), "127.0.0.1:5000");
    let slot = *slot;
    p.event(IoEvent::TunnelConnected(slot));
    let request = vec![b'r'; INITIAL_WINDOW as usize];
    p.frame(Kind::StreamData(StreamData {
        stream: 9,
        data: request,
    }));
    assert_eq!(p.agent.tunnel_pending(slot).len(), INITIAL_WINDOW as usize);
    p.agent.tunnel_wrote(slot, INITIAL_WINDOW as usize, p.now);
    assert!(
        p.sent_data()
            .iter()
            .any(|k| matches!(k, Kind::WindowUpdate(WindowUpdate { credits, .. }) if *credits == INITIAL_WINDOW)),
        "credits come back as the app takes the data"
    );
    // The app answers with more than the window: only the window goes out until credits come.
    p.fds.data.push((
        Source::Tunnel(slot),
        vec![b'a'; INITIAL_WINDOW as usize + 100],
    ));
    let out: usize = p
        .sent_data()
        .iter()
        .map(|k| {
            if let Kind::StreamData(d) = k {
                d.data.len()
            } else {
                0
            }
        })
        .sum();
    assert_eq!(out, INITIAL_WINDOW as usize);
    p.frame(Kind::WindowUpdate(WindowUpdate {
        target: Some(window_update::Target::Stream(9)),
        credits: 1000,
    }));
    assert_eq!(
        p.sent_data(),
        [Kind::StreamData(StreamData {
            stream: 9,
            data: vec![b'a'; 100]
        })]
    );
    p.frame(Kind::StreamClose(StreamClose {
        stream: 9,
        half: true,
        error: String::new(),
    }));
    assert_eq!(p.io(), [IoAction::ShutdownTunnel(slot)]);
    p.fds.eof.push(Source::Tunnel(slot));
    assert_eq!(
        p.sent_data(),
        [Kind::StreamClose(StreamClose {
            stream: 9,
            half: true,
            error: String::new()
        })]
    );
    assert_eq!(p.io(), [IoAction::CloseTunnel(slot)]);
    p.fds.eof.clear();

    // The connection is lost; output meanwhile waits, and is resent after the reconnect from
    // where the new Welcome says the server's copy ends.
    p.agent
        .handle_output(LogStream::Stderr, b"while away\n", 2, p.now);
    p.event(IoEvent::Closed("reset by peer"));
    assert_eq!(p.io(), [IoAction::Disconnect { polite: false }]);
    assert!(p.sent().is_empty(), "nothing is sent while away");
    let mut waited = Duration::ZERO;
    while !p.io().iter().any(|a| matches!(a, IoAction::Connect(_))) {
        assert!(
            waited < crate::session::BACKOFF_MIN * 2,
            "reconnects after the backoff"
        );
        p.advance(ms(10));
        waited += ms(10);
    }
    let hello = p.connect();
    assert_eq!(hello.next_log_seq, 3);
    assert_eq!(hello.config_version, 1);
    p.frame(Kind::Welcome(Welcome {
        heartbeat_interval_ms: 1000,
        log_acked_seq: 2,
        ..Default::default()
    }));
    assert!(p.io().is_empty(), "same config, same child");
    let batch = p.log_batch();
    assert_eq!((batch.first_seq, batch.entries.len()), (2, 1));
    assert_eq!(batch.entries[0].data, b"while away");

    // The child exits: its leftovers get SIGTERM, the last words go out with a Ping, and the
    // exit comes once the Pong confirms them.
    p.event(IoEvent::Reaped {
        pid: 100,
        code: Some(3),
        signal: None,
        oom_kills: None,
    });
    assert_eq!(
        p.io(),
        [IoAction::SignalDescendants {
            pgid: Some(100),
            sig: libc::SIGTERM
        }]
    );
    let sent = p.sent();
    let Some(Kind::Status(last)) = sent.iter().find(|k| matches!(k, Kind::Status(_))) else {
        panic!("{sent:?}")
    };
    assert_eq!(
        (last.state, last.exit_code),
        (status::State::Exited as i32, 3)
    );
    let Some(Kind::Ping(Ping { nonce })) =
        sent.iter().find(|k| matches!(k, Kind::Ping(_))).cloned()
    else {
        panic!("{sent:?}")
    };
    p.event(IoEvent::Leftovers(Local::default()));
    assert!(p.io().is_empty(), "the server has not confirmed yet");
    p.frame(Kind::LogAck(LogAck { up_to_seq: 3 }));
    p.frame(Kind::Pong(Pong { nonce }));
    p.event(IoEvent::Leftovers(Local::default()));
    assert_eq!(p.io(), [IoAction::Exit(3)]);
}

#[test]
fn without_a_server_the_child_starts_at_once_and_its_exit_is_ours() {
    let mut p = Pair::new(&[]);
    assert_eq!(p.io(), [IoAction::SpawnChild]);
    p.event(IoEvent::ChildSpawned {
        pid: 5,
        oom_kills: None,
    });
    assert_eq!(
        p.agent.handle_output(LogStream::Stdout, b"x\n", 1, p.now),
        2,
        "no shipper: everything is taken"
    );
    p.event(IoEvent::Signal(libc::SIGTERM));
    assert_eq!(
        p.io(),
        [IoAction::Kill {
            pid: 5,
            sig: libc::SIGTERM,
            report: true
        }]
    );
    p.event(IoEvent::Reaped {
        pid: 5,
        code: None,
        signal: Some(libc::SIGTERM),
        oom_kills: None,
    });
    assert_eq!(
        p.io(),
        [IoAction::SignalDescendants {
            pgid: Some(5),
            sig: libc::SIGTERM
        }]
    );
    p.event(IoEvent::Leftovers(Local::default()));
    assert_eq!(p.io(), [IoAction::Exit(128 + libc::SIGTERM)]);
    assert!(p.sent().is_empty());
}

#[test]
fn a_config_restart_waits_for_open_streams_and_holds_new_ones() {
    let mut p = Pair::new(&[("WAYPOST_SERVER", "127.0.0.1:9701"), ("WAYPOST_TOKEN", "t")]);
    p.io();
    p.connect();
    p.frame(Kind::Welcome(Welcome {
        heartbeat_interval_ms: 1000,
        ..Default::default()
    }));
    assert_eq!(p.io(), [IoAction::SpawnChild]);
    p.event(IoEvent::ChildSpawned {
        pid: 100,
        oom_kills: None,
    });
    p.frame(Kind::StreamOpen(StreamOpen {
        stream: 1,
        ..Default::default()
    }));
    assert!(matches!(
        p.io()[..],
        [IoAction::ConnectTunnel { slot: 0, .. }]
    ));
    p.event(IoEvent::TunnelConnected(0));
    let config = Config {
        version: 2,
        env: [("A".to_string(), "1".to_string())].into_iter().collect(),
        ..Default::default()
    };
    p.frame(Kind::Config(config));
    assert!(matches!(
        p.io()[..],
        [IoAction::WriteConfig { version: 2, .. }]
    ));
    p.event(IoEvent::ConfigWritten {
        version: 2,
        wrote: 0,
        removed: 0,
        result: Ok(()),
    });
    assert!(
        p.io().is_empty(),
        "the old child serves its open stream first"
    );
    // A new visitor meanwhile is held, not connected to the old child.
    p.frame(Kind::StreamOpen(StreamOpen {
        stream: 2,
        ..Default::default()
    }));
    assert!(p.io().is_empty());
    p.frame(Kind::StreamClose(StreamClose {
        stream: 1,
        half: false,
        error: String::new(),
    }));
    assert_eq!(
        p.io(),
        [
            IoAction::CloseTunnel(0),
            IoAction::Kill {
                pid: 100,
                sig: libc::SIGTERM,
                report: true
            }
        ]
    );
    p.event(IoEvent::Reaped {
        pid: 100,
        code: Some(0),
        signal: None,
        oom_kills: None,
    });
    assert_eq!(
        p.io(),
        [
            IoAction::Kill {
                pid: -100,
                sig: libc::SIGTERM,
                report: true
            },
            IoAction::SpawnChild
        ]
    );
    assert_eq!(env_of(&p.agent.child_env(), "A").as_deref(), Some("1"));
    p.event(IoEvent::ChildSpawned {
        pid: 101,
        oom_kills: None,
    });
    p.advance(tunnel::RETRY);
    assert!(
        matches!(p.io()[..], [IoAction::ConnectTunnel { id: 2, .. }]),
        "the held stream goes to the new child"
    );
}

#[test]
fn the_write_priority_is_control_then_exec_then_streams_then_logs() {
    let mut p = Pair::new(&[("WAYPOST_SERVER", "127.0.0.1:9701"), ("WAYPOST_TOKEN", "t")]);
    p.io();
    p.connect();
    p.frame(Kind::Welcome(Welcome {
        heartbeat_interval_ms: 1000,
        ..Default::default()
    }));
    p.io();
    p.event(IoEvent::ChildSpawned {
        pid: 100,
        oom_kills: None,
    });
    p.frame(Kind::ExecStart(ExecStart {
        session: 1,
        argv: vec!["sh".into()],
        ..Default::default()
    }));
    p.io();
    p.event(IoEvent::ExecStarted { slot: 0, pid: 200 });
    p.frame(Kind::StreamOpen(StreamOpen {
        stream: 2,
        ..Default::default()
    }));
    p.io();
    p.event(IoEvent::TunnelConnected(0));
    p.sent();
    // Everything is waiting at once: a log line (old enough), stream data, exec output, and a
    // control frame (the Pong to a Ping).
    p.agent.handle_output(LogStream::Stdout, b"log\n", 1, p.now);
    p.now += crate::logs::BATCH_AGE;
    p.fds.data.push((Source::Tunnel(0), b"web".to_vec()));
    p.fds.data.push((Source::Exec(0, 1), b"shell".to_vec()));
    p.frame(Kind::Ping(Ping { nonce: 5 }));
    let order: Vec<&str> = p.sent().iter().map(Kind::name).collect();
    assert_eq!(order, ["Pong", "ExecOutput", "StreamData", "LogBatch"]);
}

#[test]
fn labels_go_in_every_hello_and_never_to_the_child() {
    let mut p = Pair::new(&[
        ("WAYPOST_SERVER", "127.0.0.1:9701"),
        ("WAYPOST_TOKEN", "t"),
        ("WAYPOST_LABELS", "env=prod,tier=web"),
        ("WAYPOST_TEST_MARKER", "kept"),
    ]);
    let want: std::collections::BTreeMap<String, String> = [("env", "prod"), ("tier", "web")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(matches!(p.io()[..], [IoAction::Connect(_)]));
    assert_eq!(p.connect().labels, want);
    p.frame(Kind::Welcome(Welcome {
        heartbeat_interval_ms: 1000,
        ..Default::default()
    }));
    assert_eq!(p.io(), [IoAction::SpawnChild]);
    let env = p.agent.child_env();
    assert_eq!(
        env_of(&env, "WAYPOST_TEST_MARKER").as_deref(),
        Some("kept"),
        "premise: the settings' variables are in the environment the child's is made from"
    );
    assert_eq!(env_of(&env, "WAYPOST_LABELS"), None, "{env:?}");

    // After a reconnect, the new Hello carries them again.
    p.event(IoEvent::Closed("reset by peer"));
    while !p.io().iter().any(|a| matches!(a, IoAction::Connect(_))) {
        p.advance(ms(10));
    }
    assert_eq!(p.connect().labels, want);
}

#[test]
fn a_hello_without_labels_has_none() {
    let mut p = Pair::new(&[("WAYPOST_SERVER", "127.0.0.1:9701"), ("WAYPOST_TOKEN", "t")]);
    p.io();
    assert!(p.connect().labels.is_empty());
}

/// An agent with a server and a running child, the given settings added.
fn running(vars: &[(&str, &str)]) -> Pair {
    let all: Vec<(&str, &str)> = [("WAYPOST_SERVER", "127.0.0.1:9701"), ("WAYPOST_TOKEN", "t")]
        .into_iter()
        .chain(vars.iter().copied())
        .collect();
    let mut p = Pair::new(&all);
    p.io();
    p.connect();
    p.frame(Kind::Welcome(Welcome {
        heartbeat_interval_ms: 1000,
        ..Default::default()
    }));
    assert_eq!(p.io(), [IoAction::SpawnChild]);
    p.event(IoEvent::ChildSpawned {
        pid: 100,
        oom_kills: None,
    });
    p.sent();
    p
}

fn open(p: &mut Pair, stream: u64, target_port: u32) {
    p.frame(Kind::StreamOpen(StreamOpen {
        stream,
        target_port,
        client_addr: "203.0.113.9:4000".into(),
    }));
}

/// The address stream `id` is connected to now, and its slot; panics unless that is all the
/// agent asks for.
fn connects(p: &mut Pair, id: u64) -> (usize, String) {
    match &p.io()[..] {
        [IoAction::ConnectTunnel { slot, id: i, addr }] if *i == id => (*slot, addr.to_string()),
        other => panic!("expected a connect of stream {id}, got {other:?}"),
    }
}

/// Asserts that stream `id` was refused with `error`: no socket, no slot, one StreamClose.
fn refused(p: &mut Pair, id: u64, error: &str) {
    assert_eq!(p.io(), [], "a refused stream never connects");
    assert_eq!(
        p.sent_data(),
        [Kind::StreamClose(StreamClose {
            stream: id,
            half: false,
            error: error.into()
        })]
    );
    assert!(
        p.agent.tunnel_slot(id).is_none(),
        "a refused stream takes no slot"
    );
}

#[test]
fn by_default_streams_reach_the_apps_port_only() {
    let mut p = running(&[]);
    open(&mut p, 1, 0);
    assert_eq!(connects(&mut p, 1).1, "127.0.0.1:5000");
    // The app's port by its number is the same port.
    open(&mut p, 2, 5000);
    assert_eq!(connects(&mut p, 2).1, "127.0.0.1:5000");
    for (id, port) in [(3, 22), (4, 5001), (5, 1), (6, 65535)] {
        open(&mut p, id, port);
        refused(
            &mut p,
            id,
            &format!("port {port} is not in WAYPOST_URL_PORTS (allowed: 5000)"),
        );
    }
    // Beyond 16 bits: refused, not truncated to 5000 (70000 - 65536 = 4464; 65536 + 5000).
    open(&mut p, 7, 65_536 + 5000);
    refused(&mut p, 7, "port 70536 is not a TCP port (1-65535)");
    assert_eq!(p.agent.tunnels.iter().flatten().count(), 2);

    // PORT decides which port that is.
    let mut p = running(&[("PORT", "8080")]);
    open(&mut p, 1, 0);
    assert_eq!(connects(&mut p, 1).1, "127.0.0.1:8080");
    open(&mut p, 2, 5000);
    refused(
        &mut p,
        2,
        "port 5000 is not in WAYPOST_URL_PORTS (allowed: 8080)",
    );
}

#[test]
fn listed_ports_connect_and_others_are_refused() {
    let mut p = running(&[("WAYPOST_URL_PORTS", "9090, 8080")]);
    open(&mut p, 1, 9090);
    let (slot, addr) = connects(&mut p, 1);
    assert_eq!(addr, "127.0.0.1:9090");
    // Refused on 127.0.0.1: ::1 on the same port next; then the error names that port.
    let error = io::Error::from(io::ErrorKind::ConnectionRefused);
    p.event(IoEvent::TunnelRefused {
        slot,
        error: &error,
    });
    assert_eq!(connects(&mut p, 1).1, "[::1]:9090");
    p.event(IoEvent::TunnelRefused {
        slot,
        error: &error,
    });
    let sent = p.sent_data();
    assert!(
        matches!(&sent[..], [Kind::StreamClose(c)] if c.stream == 1
            && c.error.starts_with("cannot connect to the app on port 9090: ")),
        "{sent:?}"
    );
    assert_eq!(p.io(), [IoAction::CloseTunnel(slot)]);

    open(&mut p, 2, 8080);
    assert_eq!(connects(&mut p, 2).1, "127.0.0.1:8080");
    // The app's port stays allowed (as 0 or by number).
    open(&mut p, 3, 0);
    assert_eq!(connects(&mut p, 3).1, "127.0.0.1:5000");
    open(&mut p, 4, 5000);
    assert_eq!(connects(&mut p, 4).1, "127.0.0.1:5000");
    open(&mut p, 5, 22);
    refused(
        &mut p,
        5,
        "port 22 is not in WAYPOST_URL_PORTS (allowed: 5000, 8080, 9090)",
    );
    // A refusal leaves the others alone.
    assert_eq!(p.agent.tunnels.iter().flatten().count(), 3);
}

#[test]
fn a_star_allows_any_port() {
    let mut p = running(&[("WAYPOST_URL_PORTS", "*")]);
    for (id, port) in [(1, 22), (2, 1), (3, 65535), (4, 0)] {
        open(&mut p, id, port);
        let want = if port == 0 { 5000 } else { port };
        assert_eq!(connects(&mut p, id).1, format!("127.0.0.1:{want}"));
    }
    open(&mut p, 5, 65_536);
    refused(&mut p, 5, "port 65536 is not a TCP port (1-65535)");
}

#[test]
fn refusals_are_warned_about_at_most_every_ten_seconds() {
    let mut p = running(&[]);
    assert_eq!(p.agent.refusals, (None, 0));
    let t0 = p.now;
    open(&mut p, 1, 22);
    assert_eq!(
        p.agent.refusals,
        (Some(t0), 0),
        "the first one is warned about"
    );
    p.now += ms(1000);
    open(&mut p, 2, 23);
    p.now += REFUSAL_WARN_EVERY - ms(1001);
    open(&mut p, 3, 24);
    assert_eq!(p.agent.refusals, (Some(t0), 2), "counted, not warned about");
    p.now = t0 + REFUSAL_WARN_EVERY;
    open(&mut p, 4, 25);
    assert_eq!(
        p.agent.refusals,
        (Some(p.now), 0),
        "warned about again, with the count"
    );
    // Every one of them was refused all the same.
    let closes = p
        .sent_data()
        .iter()
        .filter(|k| matches!(k, Kind::StreamClose(c) if !c.error.is_empty()))
        .count();
    assert_eq!(closes, 4);
    assert!(p.agent.tunnels.is_empty());
}

#[test]
fn a_stream_held_over_a_restart_connects_to_its_own_port() {
    let mut p = running(&[("WAYPOST_URL_PORTS", "8080")]);
    // One open stream keeps the old child until it finishes.
    open(&mut p, 1, 0);
    let (slot, _) = connects(&mut p, 1);
    p.event(IoEvent::TunnelConnected(slot));
    p.frame(Kind::Config(Config {
        version: 2,
        env: [("A".to_string(), "1".to_string())].into_iter().collect(),
        ..Default::default()
    }));
    assert!(matches!(
        p.io()[..],
        [IoAction::WriteConfig { version: 2, .. }]
    ));
    p.event(IoEvent::ConfigWritten {
        version: 2,
        wrote: 0,
        removed: 0,
        result: Ok(()),
    });
    assert_eq!(p.io(), []);
    // Held: one stream to another allowed port, one to the app; and a refused one stays refused.
    open(&mut p, 2, 8080);
    open(&mut p, 3, 0);
    assert_eq!(p.io(), [], "held, not connected to the old child");
    open(&mut p, 4, 9090);
    p.sent();
    assert!(p.agent.tunnel_slot(4).is_none());
    p.frame(Kind::StreamClose(StreamClose {
        stream: 1,
        half: false,
        error: String::new(),
    }));
    p.io();
    p.event(IoEvent::Reaped {
        pid: 100,
        code: Some(0),
        signal: None,
        oom_kills: None,
    });
    assert_eq!(p.io().last(), Some(&IoAction::SpawnChild));
    p.event(IoEvent::ChildSpawned {
        pid: 101,
        oom_kills: None,
    });
    p.advance(tunnel::RETRY);
    let mut addrs: Vec<(u64, String)> = p
        .io()
        .into_iter()
        .map(|a| match a {
            IoAction::ConnectTunnel { id, addr, .. } => (id, addr.to_string()),
            other => panic!("{other:?}"),
        })
        .collect();
    addrs.sort();
    assert_eq!(
        addrs,
        [(2, "127.0.0.1:8080".into()), (3, "127.0.0.1:5000".into())],
        "each held stream goes to its own port on the new child"
    );
    // A refused retry of the held stream stays on its port too (::1, then later 127.0.0.1).
    let slot = p.agent.tunnel_slot(2).unwrap();
    let error = io::Error::from(io::ErrorKind::ConnectionRefused);
    p.event(IoEvent::TunnelRefused {
        slot,
        error: &error,
    });
    assert_eq!(connects(&mut p, 2).1, "[::1]:8080");
    p.event(IoEvent::TunnelRefused {
        slot,
        error: &error,
    });
    assert_eq!(p.io(), [], "held: retried later, not given up");
    p.advance(tunnel::RETRY);
    assert_eq!(connects(&mut p, 2).1, "127.0.0.1:8080");
}
