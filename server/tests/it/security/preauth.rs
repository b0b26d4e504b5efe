//! Before authentication a client costs the server a bounded, small amount: its first frame is
//! capped at a few KiB (checked from the length prefix), connections that have not sent an
//! accepted Hello are limited per source address and in total, and each has one deadline for the
//! TLS handshake and the Hello together.

use crate::common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use waypost_proto::{self as proto, Kind};

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// A length prefix announcing a frame of `len` bytes.
fn prefix(len: usize) -> [u8; 4] {
    (len as u32).to_be_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_frames_before_hello_do_not_grow_the_server() {
    const N: usize = 150;
    let server = Server::start(&[]);
    let pid = server.pid();
    // Warm up: one full session, so the baseline includes what every server has after its
    // first connection (TLS, the database, the runtime's threads).
    let token = server.entrypoint_token("web", None);
    let (mut warm, _) = Fake::welcomed(&server, &token, &new_id()).await;
    warm.ping(1).await;
    let before = rss(pid);

    // Each connection finishes TLS, announces the largest legal frame and sends half of it.
    let half = vec![0x5au8; proto::MAX_FRAME / 2];
    let mut conns = Vec::new();
    for _ in 0..N {
        let mut c = Fake::connect(&server).await;
        let _ = c.stream.write_all(&prefix(proto::MAX_FRAME)).await;
        conns.push(c);
    }
    let sends = conns.into_iter().map(|mut c| {
        let half = half.clone();
        tokio::spawn(async move {
            // The server may close the connection at any point: a write error is the expected
            // outcome, not a test failure.
            let _ = tokio::time::timeout(WAIT, async {
                let _ = c.stream.write_all(&half).await;
                let _ = c.stream.flush().await;
            })
            .await;
            c
        })
    });
    let mut conns = Vec::new();
    for s in sends {
        conns.push(s.await.unwrap());
    }
    // The server reads at its own pace: sample its RSS for a while and keep the peak.
    let mut peak = rss(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss(pid));
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "FIGURE: server RSS {} KiB before, {} KiB peak with {N} half-frame pre-auth connections (+{} KiB)",
        before / 1024,
        peak / 1024,
        growth / 1024
    );
    // 150 × 512 KiB read into buffers would be 75 MiB; the bound is a fraction of that.
    assert!(
        growth < 40 * 1024 * 1024,
        "server RSS grew by {} KiB with {N} half frames before Hello",
        growth / 1024
    );
    drop(conns);
    // The server still serves.
    warm.ping(2).await;
}

/// The server's caps (asserted against the real ones, not copies).
use waypost::server::control::{FIRST_FRAME_CAP, FrameReader, PREAUTH_PER_ADDR, PREAUTH_TOTAL};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the control listener from the loopback address `src` (127.0.0.0/8 is all
/// loopback on Linux, so each 127.x.y.z is a distinct source address for the server).
async fn tls_from(src: &str, addr: &str, ca_pem: &str) -> std::io::Result<Tls> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("{src}:0").parse().unwrap())?;
    let tcp = sock.connect(addr.parse().unwrap()).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tls_connector(ca_pem, Some(proto::ALPN))
        .connect(name, tcp)
        .await
}

/// Sends a Hello with `token` on `tls`; returns the server's answer (None: closed without one)
/// and the connection, still open.
async fn hello_on(mut tls: Tls, token: &str) -> (Option<Kind>, FrameReader<Tls>) {
    let mut out = Vec::new();
    proto::encode(&Kind::Hello(hello(token, &new_id())).into(), &mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    tls.flush().await.unwrap();
    let mut r = FrameReader::new(tls);
    let answer = tokio::time::timeout(WAIT, r.next())
        .await
        .expect("an answer to the Hello in time")
        .ok()
        .flatten()
        .and_then(|f| f.kind);
    (answer, r)
}

/// Waits (bounded) until the peer closes `tls`; panics if it stays open for [`WAIT`].
async fn closed_by_server(tls: &mut Tls) {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closed the connection");
}

/// Lets this test process hold more sockets than the usual soft limit of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live, properly typed struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::test]
async fn an_oversized_first_frame_is_refused_from_its_prefix() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    // A Hello-sized prefix would be fine; this one announces a 1 MiB first frame, and nothing of
    // its body is sent: the server must decide from the prefix alone.
    let mut conn = Fake::connect(&server).await;
    conn.send_raw(&prefix(proto::MAX_FRAME)).await;
    conn.expect_closed().await;
    let why = format!(
        "before Hello: a frame of {} bytes announced; at most {FIRST_FRAME_CAP} accepted here",
        proto::MAX_FRAME
    );
    wait_for("the refusal in the server log", || {
        server.logs().contains(&why).then_some(())
    });
    // Not by the Hello deadline: that would say "no Hello within".
    assert!(
        !server.logs().contains("no Hello within"),
        "{}",
        server.logs()
    );

    // One byte over the cap is refused too; exactly the cap is not (it waits for the body).
    let mut over = Fake::connect(&server).await;
    over.send_raw(&prefix(FIRST_FRAME_CAP + 1)).await;
    over.expect_closed().await;
    let mut at_cap = Fake::connect(&server).await;
    at_cap.send_raw(&prefix(FIRST_FRAME_CAP)).await;
    at_cap.send_raw(&vec![0u8; FIRST_FRAME_CAP - 1]).await;
    let answer = tokio::time::timeout(Duration::from_millis(500), at_cap.recv()).await;
    assert!(
        answer.is_err(),
        "a first frame at the cap is read, not refused: {answer:?}"
    );

    // Negative control: once authenticated, big frames are fine (a 512 KiB log line).
    let (mut ok, _) = Fake::welcomed(&server, &token, &new_id()).await;
    ok.send(
        Kind::LogBatch(proto::LogBatch {
            first_seq: 0,
            entries: vec![proto::LogEntry {
                stream: proto::LogStream::Stdout as i32,
                timestamp_unix_us: 1,
                data: vec![b'x'; proto::MAX_FRAME / 2],
                truncated: false,
            }],
            dropped: 0,
        })
        .into(),
    )
    .await;
    // The LogAck for the line and the Pong may come in either order.
    ok.send(Kind::Ping(proto::Ping { nonce: 7 }).into()).await;
    loop {
        match ok.recv().await.and_then(|f| f.kind) {
            Some(Kind::Pong(p)) => break assert_eq!(p.nonce, 7),
            Some(Kind::LogAck(_)) => {}
            other => panic!("expected a LogAck or Pong 7 after a 512 KiB line, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_address_cap_are_closed_at_once() {
    raise_fd_limit();
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    let ca = server.ca_pem();
    let addr = server.control_addr.clone();

    // Fill 127.0.0.1's places with connections that finish TLS and then say nothing.
    let mut flood = Vec::new();
    for i in 0..PREAUTH_PER_ADDR {
        let c = tls_from("127.0.0.1", &addr, &ca)
            .await
            .unwrap_or_else(|e| panic!("flood connection {i} within the cap: {e}"));
        flood.push(c);
    }
    // One more from that address: closed before TLS, so the handshake fails.
    let refused = tls_from("127.0.0.1", &addr, &ca).await;
    assert!(
        refused.is_err(),
        "a connection beyond the per-address cap was served"
    );
    wait_for("the refusal in the server log", || {
        server
            .logs()
            .contains("too many unauthenticated connections from this address")
            .then_some(())
    });

    // Another address is not affected: a real token's Hello gets in right away.
    let other = tls_from("127.0.0.2", &addr, &ca).await.unwrap();
    let (answer, _other) = hello_on(other, &token).await;
    assert!(
        matches!(answer, Some(Kind::Welcome(_))),
        "127.0.0.2 while 127.0.0.1 is full: {answer:?}"
    );

    // The flood ends (here it closes; otherwise its deadline ends it): 127.0.0.1 gets in again.
    drop(flood);
    let (answer, _conn) = wait_for_async("127.0.0.1 to be served again", || {
        let (addr, ca, token) = (addr.clone(), ca.clone(), token.clone());
        async move {
            let tls = tls_from("127.0.0.1", &addr, &ca).await.ok()?;
            let (answer, conn) = hello_on(tls, &token).await;
            matches!(answer, Some(Kind::Welcome(_))).then_some((answer, conn))
        }
    })
    .await;
    assert!(matches!(answer, Some(Kind::Welcome(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unauthenticated_connections_together_are_bounded() {
    raise_fd_limit();
    let server = Server::start(&[]);
    let pid = server.pid();
    let token = server.entrypoint_token("web", None);
    let ca = server.ca_pem();
    let addr = server.control_addr.clone();
    let (warm, _) = Fake::welcomed(&server, &token, &new_id()).await;
    let before = rss(pid);

    // The worst an unauthenticated client can make the server hold: TLS done, and a first
    // frame of the largest allowed size announced with all but its last byte sent. As many
    // as the total cap allows, from enough addresses to stay under the per-address cap.
    let per = PREAUTH_PER_ADDR;
    let addrs = PREAUTH_TOTAL.div_ceil(per);
    let mut held = Vec::new();
    let mut body = prefix(FIRST_FRAME_CAP).to_vec();
    body.extend(vec![0x5a; FIRST_FRAME_CAP - 1]);
    for a in 0..addrs {
        let src = format!("127.0.1.{}", a + 1);
        for _ in 0..per.min(PREAUTH_TOTAL - held.len()) {
            let mut c = tls_from(&src, &addr, &ca).await.expect("within the caps");
            c.write_all(&body).await.unwrap();
            c.flush().await.unwrap();
            held.push(c);
        }
    }
    // The total cap: a fresh address is refused too.
    assert!(
        tls_from("127.0.2.1", &addr, &ca).await.is_err(),
        "beyond the total cap"
    );
    let mut peak = rss(pid);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss(pid));
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "FIGURE: {} unauthenticated connections, each holding a {FIRST_FRAME_CAP}-byte first frame but one byte: server RSS +{} KiB ({} bytes each)",
        held.len(),
        growth / 1024,
        growth / held.len() as u64
    );
    assert!(
        growth < 64 * 1024 * 1024,
        "server RSS grew by {} KiB",
        growth / 1024
    );
    drop(held);
    drop(warm);
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_dropped_by_its_deadline() {
    let server = Server::start(&[]);
    // The start of a TLS record (a ClientHello that never comes): the server's handshake waits
    // for the rest.
    let mut tcp = tokio::net::TcpStream::connect(&server.control_addr)
        .await
        .unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = [0u8; 256];
    tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server dropped the stalled handshake within its deadline");
    // The deadline, not something earlier, ended it.
    assert!(
        start.elapsed() >= Duration::from_secs(9),
        "closed after {:?}",
        start.elapsed()
    );
    wait_for("the deadline in the server log", || {
        server
            .logs()
            .contains("TLS handshake not done within 10s")
            .then_some(())
    });
}

#[tokio::test]
async fn the_deadline_covers_handshake_and_hello_together() {
    let server = Server::start(&[]);
    let token = server.entrypoint_token("web", None);
    // TLS done, then the Hello dribbled a byte every 500 ms: it would take longer than the
    // deadline, and bytes arriving do not extend it.
    let mut conn = Fake::connect(&server).await;
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    proto::encode(&Kind::Hello(hello(&token, &new_id())).into(), &mut out).unwrap();
    assert!(
        out.len() > 40,
        "the Hello outlasts the deadline at this pace"
    );
    let dribble = async {
        for b in out {
            if conn.stream.write_all(&[b]).await.is_err() || conn.stream.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let _ = tokio::time::timeout(WAIT, dribble).await;
    assert!(
        start.elapsed() < WAIT,
        "the server never closed the dribbling connection"
    );
    closed_by_server(&mut conn.stream).await;
    wait_for("the deadline in the server log", || {
        server
            .logs()
            .contains("no Hello within 10s of connecting")
            .then_some(())
    });
}
