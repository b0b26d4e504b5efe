//! The URL service end to end: the real server's ingress, the REAL entrypoint, a real
//! HTTP app (tests/apps/testapp.py), real sockets; every port 0 (the app's PORT is a port found
//! free just before).
//!
//! Needs the entrypoint binary (`cargo build -p waypost-entrypoint`, or WAYPOST_ENTRYPOINT_BIN)
//! and python3; without them each test prints SKIPPED and passes.

use crate::apps::{self, Http, empty, rt, start_app, stream_body, stream_sha256, within};
use crate::common::{Server, wait_for};
use http_body_util::BodyExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

fn host(app: &str, addr: &str) -> String {
    format!("{app}.localhost:{}", addr.rsplit_once(':').unwrap().1)
}

#[test]
fn requests_reach_the_app_with_forwarded_headers_over_keep_alive() {
    let server = Server::start(&[]);
    let Some(app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);

    // `waypost url` prints where the app is.
    let url = server.cli(&["url", "--app", "web"]).ok().stdout;
    assert_eq!(url.trim(), format!("http://{h}/"));

    // curl, as a person would type it (curl resolves *.localhost to loopback itself).
    if let Ok(out) = std::process::Command::new("curl")
        .args(["-s", "-m", "20", url.trim()])
        .output()
    {
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.starts_with("hello hi pid="), "curl got {body:?}");
    }

    rt().block_on(async {
        // Several requests on ONE visitor connection (keep-alive).
        let mut c = Http::connect(&ingress, &h).await.unwrap();
        for _ in 0..5 {
            let (status, body) = c.get("/").await.unwrap();
            assert_eq!(status, 200);
            assert!(body.starts_with("hello hi pid="), "{body}");
        }
        let resp = c
            .send(
                "GET",
                "/headers",
                &[("x-forwarded-for", "10.9.8.7")],
                empty(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["x-forwarded-for"], "10.9.8.7, 127.0.0.1", "{seen}");
        assert_eq!(seen["x-forwarded-proto"], "http", "{seen}");
        assert_eq!(seen["x-forwarded-host"], h.as_str(), "{seen}");
        assert_eq!(seen["host"], h.as_str(), "{seen}");
        // Upstream connections are kept alive and pooled: no `Connection: close` is added...
        assert_eq!(seen["connection"], serde_json::Value::Null, "{seen}");
        // ...and sequential requests mostly reuse one connection to the app (the negative
        // control for the pool: without it every request would come from a new port).
        let mut ports = std::collections::HashSet::new();
        for _ in 0..20 {
            let (status, body) = c.get("/conn").await.unwrap();
            assert_eq!(status, 200);
            ports.insert(body.trim().to_string());
        }
        assert!(
            ports.len() <= 10,
            "20 requests used {} upstream connections",
            ports.len()
        );

        // NAME--ID routes to that instance.
        let pinned = format!(
            "web--{}.localhost:{}",
            &app.id[..8],
            ingress.rsplit_once(':').unwrap().1
        );
        let (status, body, _) = apps::get_once(&ingress, &pinned, "/").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let (status, _, err) = apps::get_once(&ingress, "web--ffffffff.localhost", "/")
            .await
            .unwrap();
        assert_eq!((status, err.as_str()), (502, "no-instance"));
    });
}

#[test]
fn hundred_concurrent_requests_all_succeed() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);
    rt().block_on(async {
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (ingress, h) = (ingress.clone(), h.clone());
                tokio::spawn(async move { apps::get_once(&ingress, &h, "/").await })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            let (status, body, _) = within("a concurrent request", 20, t)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(status, 200, "{body}");
            assert!(body.starts_with("hello"), "{body}");
            ok += 1;
        }
        assert_eq!(ok, 100);
        eprintln!(
            "100 concurrent requests through the tunnel in {:?}",
            t0.elapsed()
        );
    });
}

#[test]
fn large_bodies_both_ways_arrive_byte_identical() {
    let server = Server::start(&[]);
    let Some(app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);
    let direct = format!("127.0.0.1:{}", app.port);
    let n = 50 * MIB;
    rt().block_on(async {
        // Download: Content-Length, then chunked; compared with the app's own bytes.
        for path in [format!("/bytes/{n}"), format!("/chunked/{n}")] {
            let mut d = Http::connect(&direct, "x").await.unwrap();
            let resp = d.send("GET", &path, &[], empty()).await.unwrap();
            let want = apps::sha256_body(resp.into_body()).await.unwrap();
            let mut c = Http::connect(&ingress, &h).await.unwrap();
            let t0 = Instant::now();
            let resp = c.send("GET", &path, &[], empty()).await.unwrap();
            assert_eq!(resp.status(), 200);
            let got = within("a 50 MiB download", 60, apps::sha256_body(resp.into_body()))
                .await
                .unwrap();
            let secs = t0.elapsed().as_secs_f64();
            assert_eq!(got, want, "download of {path}");
            eprintln!(
                "download {path}: {} MiB in {secs:.2}s = {:.0} MiB/s",
                n / MIB,
                n as f64 / MIB as f64 / secs
            );
        }
        // Upload: with a length, then chunked (unknown length).
        let want = stream_sha256(n, 1);
        for chunked in [false, true] {
            let mut c = Http::connect(&ingress, &h).await.unwrap();
            let mut body = stream_body(n, 1);
            if chunked {
                // Hide the length: hyper then sends it chunked.
                body =
                    http_body_util::StreamBody::new(http_body_util::BodyStream::new(body)).boxed();
            }
            let t0 = Instant::now();
            let resp = within("a 50 MiB upload", 60, c.send("POST", "/upload", &[], body))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let v: serde_json::Value =
                serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            let secs = t0.elapsed().as_secs_f64();
            assert_eq!(v["len"], n, "{v}");
            assert_eq!(v["sha256"], want.as_str(), "chunked={chunked}: {v}");
            eprintln!(
                "upload (chunked={chunked}): {} MiB in {secs:.2}s = {:.0} MiB/s",
                n / MIB,
                n as f64 / MIB as f64 / secs
            );
        }
    });
}

#[test]
fn expect_100_continue_is_answered_and_the_body_forwarded() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);
    rt().block_on(async {
        let mut s = tokio::net::TcpStream::connect(&ingress).await.unwrap();
        let n = 3 * MIB;
        let head = format!("POST /upload HTTP/1.1\r\nHost: {h}\r\nContent-Length: {n}\r\nExpect: 100-continue\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        // The body is not sent before the 100 (a client that waits for it must not hang).
        let mut got = Vec::new();
        within("100 Continue", 20, async {
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut b = [0u8; 256];
                let k = s.read(&mut b).await.unwrap();
                assert!(k > 0, "closed before 100 Continue");
                got.extend_from_slice(&b[..k]);
            }
        })
        .await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 100 Continue"), "{text}");
        for i in 0..n.div_ceil(65536) {
            s.write_all(&apps::pattern(i, 65536.min(n - i * 65536), 2))
                .await
                .unwrap();
        }
        let mut resp = Vec::new();
        within("the upload's answer", 20, async {
            while !String::from_utf8_lossy(&resp).contains("sha256") {
                let mut b = [0u8; 4096];
                let k = s.read(&mut b).await.unwrap();
                assert!(k > 0, "closed before the answer");
                resp.extend_from_slice(&b[..k]);
            }
        })
        .await;
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains(&stream_sha256(n, 2)), "{text}");
    });
}

#[test]
fn websocket_echo_round_trips_through_the_tunnel() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);
    rt().block_on(async {
        let tcp = tokio::net::TcpStream::connect(&ingress).await.unwrap();
        let (mut ws, resp) = within(
            "the WebSocket handshake",
            20,
            tokio_tungstenite::client_async(format!("ws://{h}/ws"), tcp),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 101);
        for i in 0..20 {
            let text = format!("hello {i}");
            ws.send(Message::text(text.clone())).await.unwrap();
            let back = within("an echo", 20, ws.next()).await.unwrap().unwrap();
            assert_eq!(back, Message::text(text));
        }
        // Bigger than one tunnel frame and than the window: the bytes still round-trip.
        let big: Vec<u8> = apps::pattern(0, 600 * 1024, 3);
        ws.send(Message::binary(big.clone())).await.unwrap();
        let back = within("a big echo", 20, ws.next()).await.unwrap().unwrap();
        assert_eq!(back.into_data().as_ref(), &big[..]);
        ws.close(None).await.unwrap();
    });
}

#[test]
fn no_instance_502_unknown_app_404_and_disabled_instances_are_skipped() {
    let server = Server::start(&[]);
    server.create_app("idle");
    let ingress = apps::ingress_addr(&server);
    rt().block_on(async {
        let (status, body, err) = apps::get_once(&ingress, &host("idle", &ingress), "/")
            .await
            .unwrap();
        assert_eq!((status, err.as_str()), (502, "no-instance"), "{body}");
        assert!(body.contains("has no running instance"), "{body}");
        let (status, _, err) = apps::get_once(&ingress, &host("nope", &ingress), "/")
            .await
            .unwrap();
        assert_eq!((status, err.as_str()), (404, "unknown-app"));
        let (status, _, _) = apps::get_once(&ingress, &ingress, "/").await.unwrap();
        assert_eq!(status, 404, "the bare ingress address is no app");
    });

    // An instance with the URL service off is never routed to...
    let Some(off) = start_app(&server, "web", &[("WAYPOST_DISABLE_URL", "1")]) else {
        return;
    };
    rt().block_on(async {
        let (status, body, err) = apps::get_once(&ingress, &host("web", &ingress), "/")
            .await
            .unwrap();
        assert_eq!((status, err.as_str()), (502, "no-instance"), "{body}");
        assert!(body.contains("WAYPOST_DISABLE_URL"), "{body}");
    });
    // ...nor is one with exec off skipped for the URL (the features are independent), and with
    // both kinds live every request goes to a URL-enabled one.
    let Some(on) = start_app(&server, "web", &[("WAYPOST_DISABLE_EXEC", "1")]) else {
        return;
    };
    let on_pid = on.ep.pid();
    rt().block_on(async {
        for _ in 0..10 {
            let (status, body, _) = apps::get_once(&ingress, &host("web", &ingress), "/")
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
            let pid: u32 = body.trim().rsplit('=').next().unwrap().parse().unwrap();
            // The app's pid is the entrypoint's child: its parent is the enabled entrypoint.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let ppid: u32 = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(ppid, on_pid, "routed to the URL-disabled instance");
        }
        let pinned = format!("web--{}.localhost", &off.id[..12]);
        let (status, body, _) = apps::get_once(&ingress, &pinned, "/").await.unwrap();
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("disabled"), "{body}");
    });
}

#[test]
fn an_app_that_does_not_answer_gets_504() {
    let server = Server::start(&["--ingress-timeout", "1500ms"]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    rt().block_on(async {
        let t0 = Instant::now();
        let (status, body, err) = within(
            "the 504",
            20,
            apps::get_once(&ingress, &host("web", &ingress), "/slow"),
        )
        .await
        .unwrap();
        assert_eq!((status, err.as_str()), (504, "timeout"), "{body}");
        assert!(
            t0.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            t0.elapsed()
        );
        // The instance is fine: the next request works.
        let (status, _, _) = apps::get_once(&ingress, &host("web", &ingress), "/")
            .await
            .unwrap();
        assert_eq!(status, 200);
    });
}

/// Loops on requests from `clients` tasks while `waypost config set` restarts the app; returns
/// (ok, failed, pids seen).
fn requests_across_a_restart(
    hold: bool,
) -> Option<(usize, usize, std::collections::BTreeSet<u32>)> {
    let server = Server::start(&[]);
    server.create_app("web");
    // Config before the first start, so the child runs with it and a change restarts it.
    server
        .cli(&["config", "set", "--app", "web", "GREETING=one"])
        .ok();
    let env: &[(&str, &str)] = if hold {
        &[("WAYPOST_LOG_LEVEL", "trace")]
    } else {
        &[("WAYPOST_URL_HOLD", "0")]
    };
    let app = start_app(&server, "web", env)?;
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pids = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let rt = rt();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (ingress, h) = (ingress.clone(), h.clone());
            let (ok, failed, stop, pids) = (ok.clone(), failed.clone(), stop.clone(), pids.clone());
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match apps::get_once(&ingress, &h, "/").await {
                        Ok((200, body, _)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            if let Some(pid) =
                                body.trim().rsplit('=').next().and_then(|p| p.parse().ok())
                            {
                                pids.lock().unwrap().insert(pid);
                            }
                        }
                        Ok((status, body, _)) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!(
                                    "request failed: {status} {}",
                                    body.lines().find(|l| l.starts_with("<p>")).unwrap_or("")
                                );
                            }
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("request failed: {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    wait_for("requests flowing", || {
        (ok.load(Ordering::Relaxed) > 20).then_some(())
    });
    server
        .cli(&["config", "set", "--app", "web", "GREETING=two"])
        .ok();
    // Until the new child answers, then a little longer.
    let h2 = h.clone();
    let ingress2 = ingress.clone();
    wait_for("the restarted app to answer", || {
        rt.block_on(apps::get_once(&ingress2, &h2, "/"))
            .ok()
            .filter(|(_, body, _)| body.starts_with("hello two"))
    });
    let after = ok.load(Ordering::Relaxed);
    wait_for("more requests after the restart", || {
        (ok.load(Ordering::Relaxed) > after + 20).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        rt.block_on(c).unwrap();
    }
    if hold && failed.load(Ordering::Relaxed) > 0 {
        eprintln!("--- entrypoint stderr ---\n{}", app.ep.stderr());
    }
    drop(app);
    let pids = pids.lock().unwrap().clone();
    Some((
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        pids,
    ))
}

#[test]
fn a_config_restart_loses_no_requests() {
    let Some((ok, failed, pids)) = requests_across_a_restart(true) else {
        return;
    };
    eprintln!("hold on: {ok} requests ok, {failed} failed, app pids {pids:?}");
    assert!(pids.len() >= 2, "the app was restarted: {pids:?}");
    assert_eq!(
        failed, 0,
        "no request may fail across a zero-downtime restart"
    );
}

#[test]
fn without_the_hold_a_config_restart_loses_requests() {
    // Negative control for the test above: the same traffic with WAYPOST_URL_HOLD=0.
    let Some((ok, failed, pids)) = requests_across_a_restart(false) else {
        return;
    };
    eprintln!("hold off: {ok} requests ok, {failed} failed, app pids {pids:?}");
    assert!(pids.len() >= 2, "the app was restarted: {pids:?}");
    assert!(
        failed > 0,
        "with the hold switched off some requests should fail"
    );
}

#[test]
fn an_app_that_stops_reading_an_upload_bounds_memory_and_other_streams_flow() {
    use tokio::io::AsyncWriteExt as _;
    let server = Server::start(&[]);
    let Some(app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);
    let rt = rt();
    // Warm up, then measure.
    rt.block_on(async {
        for _ in 0..3 {
            apps::get_once(&ingress, &h, "/").await.unwrap();
        }
    });
    let ep_before = app.entrypoint_rss();
    let server_before = apps::rss(server.pid());
    let pushed = Arc::new(AtomicUsize::new(0));
    let upload = {
        let (ingress, h, pushed) = (ingress.clone(), h.clone(), pushed.clone());
        rt.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&ingress).await.unwrap();
            let total = 512 * MIB;
            let head =
                format!("POST /stall HTTP/1.1\r\nHost: {h}\r\nContent-Length: {total}\r\n\r\n");
            s.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'x'; 64 * 1024];
            loop {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
                pushed.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        })
    };
    // The upload stalls: what got in is bounded by socket buffers and the credit windows.
    let mut last = 0;
    wait_for("the stalled upload to stop making progress", || {
        std::thread::sleep(Duration::from_millis(500));
        let now = pushed.load(Ordering::Relaxed);
        let steady = now > 0 && now == last;
        last = now;
        steady.then_some(())
    });
    // Other streams keep flowing meanwhile, including big ones.
    rt.block_on(async {
        for _ in 0..20 {
            let (status, body, _) = within(
                "a request beside the stalled upload",
                20,
                apps::get_once(&ingress, &h, "/"),
            )
            .await
            .unwrap();
            assert_eq!(status, 200, "{body}");
        }
        let mut c = Http::connect(&ingress, &h).await.unwrap();
        let resp = c
            .send("GET", &format!("/bytes/{}", 8 * MIB), &[], empty())
            .await
            .unwrap();
        let (n, _) = within(
            "a download beside the stalled upload",
            20,
            apps::sha256_body(resp.into_body()),
        )
        .await
        .unwrap();
        assert_eq!(n, 8 * MIB);
    });
    let ep_after = app.entrypoint_rss();
    let server_after = apps::rss(server.pid());
    let pushed = pushed.load(Ordering::Relaxed);
    eprintln!(
        "stalled upload: client pushed {} KiB before stalling; entrypoint RSS {} -> {} KiB; server RSS {} -> {} KiB",
        pushed / 1024,
        ep_before / 1024,
        ep_after / 1024,
        server_before / 1024,
        server_after / 1024
    );
    assert!(
        pushed < 64 * MIB,
        "the upload was not held back: {pushed} bytes accepted"
    );
    assert!(
        ep_after < ep_before + 4 * MIB as u64,
        "entrypoint RSS grew from {ep_before} to {ep_after}"
    );
    assert!(
        server_after < server_before + 32 * MIB as u64,
        "server RSS grew from {server_before} to {server_after}"
    );
    upload.abort();
}

#[test]
fn the_url_domain_is_configurable() {
    let server = Server::start(&["--url-domain", "apps.example.test"]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let port = ingress.rsplit_once(':').unwrap().1;
    let url = server.cli(&["url", "--app", "web"]).ok().stdout;
    assert_eq!(url.trim(), format!("http://web.apps.example.test:{port}/"));
    rt().block_on(async {
        let (status, body, _) =
            apps::get_once(&ingress, &format!("web.apps.example.test:{port}"), "/")
                .await
                .unwrap();
        assert_eq!(status, 200, "{body}");
        // The default domain is not served any more.
        let (status, _, _) = apps::get_once(&ingress, &host("web", &ingress), "/")
            .await
            .unwrap();
        assert_eq!(status, 404);
    });
}

/// A request whose host is ambiguous is refused with 400 instead of being routed by one of its
/// hosts (RFC 9112 §3.2): two Host lines, or an absolute-form target that names another host
/// than Host. Raw TCP, since an HTTP client library never sends such requests. Negative control:
/// the same raw request with one Host line (and an agreeing absolute-form one) reaches the app.
#[test]
fn ambiguous_host_headers_get_400_and_a_normal_request_still_routes() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = Server::start(&[]);
    server.create_app("other");
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let ingress = apps::ingress_addr(&server);
    let h = host("web", &ingress);
    let other = host("other", &ingress);
    let raw = |head: String| {
        let ingress = ingress.clone();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(&ingress).await.unwrap();
            tcp.write_all(head.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            within("the ingress's answer", 20, tcp.read_to_end(&mut out))
                .await
                .unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let status = |resp: &str| resp.split(' ').nth(1).unwrap_or("").to_string();
    rt().block_on(async {
        // Two Host lines, the first naming the app: 400, whichever comes first.
        for (first, second) in [(&h, &other), (&other, &h)] {
            let resp = raw(format!(
                "GET / HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\nConnection: close\r\n\r\n"
            ))
            .await;
            assert_eq!(status(&resp), "400", "{resp}");
            assert!(
                resp.to_ascii_lowercase()
                    .contains("x-waypost-error: bad-host"),
                "{resp}"
            );
            assert!(resp.contains("more than one Host header"), "{resp}");
            assert!(!resp.contains("hello hi pid="), "{resp}");
        }
        // Absolute form naming another host than Host.
        let resp = raw(format!(
            "GET http://{other}/ HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert_eq!(status(&resp), "400", "{resp}");
        assert!(resp.contains("another host than its Host header"), "{resp}");

        // Negative controls: one Host line, and an absolute form that agrees, reach the app.
        let resp = raw(format!(
            "GET / HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert_eq!(status(&resp), "200", "{resp}");
        assert!(resp.contains("hello hi pid="), "{resp}");
        let resp = raw(format!(
            "GET http://{h}/ HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert_eq!(status(&resp), "200", "{resp}");
    });
}
