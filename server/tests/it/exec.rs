//! `waypost exec` end to end: the real server, the REAL entrypoint with a real app
//! (tests/apps/testapp.py), the real CLI; `-t` driven through a local pseudo-terminal.
//!
//! Needs the entrypoint binary (`cargo build -p waypost-entrypoint`, or WAYPOST_ENTRYPOINT_BIN)
//! and python3; without them each test prints SKIPPED and passes.

use crate::apps::{self, start_app};
use crate::common::{Run, Server, wait_for};
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn exec(server: &Server, args: &[&str]) -> Run {
    let mut a = vec!["exec", "--app", "web"];
    a.extend_from_slice(args);
    server.cli(&a)
}

/// `waypost exec` with stdin from `input`.
fn exec_stdin(server: &Server, args: &[&str], input: Vec<u8>) -> Run {
    let mut cmd = server.env.command();
    cmd.args(["exec", "--app", "web"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    Run::from_output(out)
}

#[test]
fn stdout_stderr_and_the_exit_code_come_back_separately() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let r = exec(
        &server,
        &["--", "sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    assert_eq!(r.code, Some(3), "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    // Killed by a signal: 128+N, as a shell reports it.
    let r = exec(&server, &["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(r.code, Some(143), "stderr: {}", r.stderr);
    // Not found: 127 with the instance's message.
    let r = exec(&server, &["--", "no-such-command-here"]);
    assert_eq!(r.code, Some(127));
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
}

#[test]
fn stdin_is_forwarded_and_ten_mib_round_trip_byte_identical() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let r = exec_stdin(&server, &["-i", "--", "cat"], b"a\nb\n".to_vec());
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "a\nb\n");

    let data: Vec<u8> = (0..160).flat_map(|i| apps::pattern(i, 65536, 9)).collect();
    assert_eq!(data.len(), 10 * 1024 * 1024);
    let t0 = std::time::Instant::now();
    let mut cmd = server.env.command();
    cmd.args(["exec", "--app", "web", "-i", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.clone();
    let feeder = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == data,
        "10 MiB through `exec -i -- cat` came back different ({} bytes)",
        out.stdout.len()
    );
    eprintln!("10 MiB through exec -i cat and back in {secs:.2}s");

    // Without -i the remote stdin is empty (cat ends at once).
    let r = exec_stdin(&server, &["--", "cat"], b"ignored\n".to_vec());
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), ""));
}

/// A pseudo-terminal pair: (master, terminal side), with an initial size.
fn openpty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let mut master = -1;
    let mut slave = -1;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into our ints; the other pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fds we own.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: zeroed termios is a valid out-parameter; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on a live fd.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

/// Everything the master side has read so far.
struct Screen(Arc<Mutex<Vec<u8>>>);

impl Screen {
    fn start(master: &OwnedFd) -> Screen {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut f = std::fs::File::from(master.try_clone().unwrap());
        let b = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = f.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Screen(buf)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn wait(&self, what: &str, f: impl Fn(&str) -> bool) {
        wait_for(&format!("{what} on the terminal"), || {
            f(&self.text()).then_some(())
        })
    }
}

#[test]
fn tty_sessions_get_a_terminal_of_our_size_follow_resizes_and_restore_the_terminal() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let (master, slave) = openpty(33, 101);
    let before = termios(&slave);
    let mut cmd = server.env.command();
    cmd.args(["exec", "--app", "web", "-t", "-i", "--", "sh"])
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    let mut child = cmd.spawn().unwrap();
    let screen = Screen::start(&master);
    let mut keys = std::fs::File::from(master.try_clone().unwrap());
    // Raw mode while the session runs: no local echo, no line editing.
    wait_for("the CLI to put the terminal in raw mode", || {
        (termios(&slave).c_lflag & (libc::ECHO | libc::ICANON) == 0).then_some(())
    });
    // Quotes split the markers, so the remote echo of what we type never matches them.
    keys.write_all(b"tty; stty size; echo TERM=$TERM; echo do''ne1\n")
        .unwrap();
    screen.wait("tty and stty size", |t| {
        t.contains("done1\r\n") && t.contains("TERM=xterm-256color")
    });
    let text = screen.text();
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("33 101"), "{text}");

    // Resize the local terminal and tell the CLI as the kernel would.
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the live struct; kill(2) on our own child.
    unsafe {
        assert_eq!(libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws), 0);
        libc::kill(child.id() as i32, libc::SIGWINCH);
    }
    // The resize message and the next keystrokes travel separately: poll until it is seen.
    let mut n = 0;
    wait_for("the new size on the remote terminal", || {
        n += 1;
        keys.write_all(format!("stty size; echo mark{n}\n").as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        screen.text().contains("40 120").then_some(())
    });
    // ^C goes to the remote shell (raw mode), not to the CLI.
    keys.write_all(b"sleep 30\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    keys.write_all(&[3]).unwrap();
    keys.write_all(b"echo after-''ctrl-c\n").unwrap();
    screen.wait("the shell after ^C", |t| t.contains("after-ctrl-c\r\n"));
    assert!(
        child.try_wait().unwrap().is_none(),
        "^C must not end the CLI"
    );

    keys.write_all(b"exit 5\n").unwrap();
    let status = wait_for("the CLI to exit", || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(5), "{}", screen.text());
    let after = termios(&slave);
    assert_eq!(after.c_lflag, before.c_lflag, "terminal flags restored");
    assert_eq!(after.c_iflag, before.c_iflag);
    assert_eq!(after.c_oflag, before.c_oflag);
}

#[test]
fn a_signalled_tty_session_still_restores_the_terminal() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let (master, slave) = openpty(24, 80);
    let before = termios(&slave);
    let mut cmd = server.env.command();
    cmd.args(["exec", "--app", "web", "-t", "-i", "--", "sh"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    let mut child = cmd.spawn().unwrap();
    let screen = Screen::start(&master);
    let mut keys = std::fs::File::from(master.try_clone().unwrap());
    wait_for("the CLI to put the terminal in raw mode", || {
        (termios(&slave).c_lflag & (libc::ECHO | libc::ICANON) == 0).then_some(())
    });
    // (Quotes split the marker, so the echo of what we type never matches it.)
    keys.write_all(b"echo rea''dy\n").unwrap();
    screen.wait("the remote shell", |t| t.contains("ready\r\n"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_for("the CLI to exit after SIGTERM", || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(143), "{status:?}\n{}", screen.text());
    let after = termios(&slave);
    assert_eq!(
        after.c_lflag, before.c_lflag,
        "terminal flags restored after SIGTERM"
    );
}

#[test]
fn the_command_sees_the_app_config_but_not_the_token() {
    let server = Server::start(&[]);
    server.create_app("web");
    let has_config = server
        .cli(&["config", "set", "--app", "web", "GREETING=from-config"])
        .code
        == Some(0);
    if !has_config {
        eprintln!("NOTE: `waypost config set` is not available; the config assertion is skipped");
    }
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let r = exec(
        &server,
        &[
            "--",
            "sh",
            "-c",
            "echo G=$GREETING; echo T=${WAYPOST_TOKEN:-none}; env | grep -c '^WAYPOST_TOKEN=' || true",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    if has_config {
        assert!(r.stdout.contains("G=from-config\n"), "{}", r.stdout);
    }
    assert!(r.stdout.contains("T=none\n"), "{}", r.stdout);
    assert!(r.stdout.ends_with("0\n"), "{}", r.stdout);
}

#[test]
fn the_allow_list_and_the_off_switch_are_enforced_with_clear_messages() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[("WAYPOST_EXEC_ALLOW", "echo,sh")]) else {
        return;
    };
    let r = exec(&server, &["--", "echo", "allowed"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "allowed\n"),
        "{}",
        r.stderr
    );
    let r = exec(&server, &["--", "cat", "/etc/hostname"]).fails();
    assert_eq!(r.code, Some(126));
    assert!(
        r.stderr.contains("\"cat\" is not allowed") && r.stderr.contains("WAYPOST_EXEC_ALLOW"),
        "{}",
        r.stderr
    );

    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[("WAYPOST_DISABLE_EXEC", "1")]) else {
        return;
    };
    let r = exec(&server, &["--", "true"]).fails();
    assert!(
        r.stderr.contains("exec is disabled") && r.stderr.contains("WAYPOST_DISABLE_EXEC"),
        "{}",
        r.stderr
    );
}

#[test]
fn instances_are_picked_by_prefix_or_fewest_sessions_never_exec_disabled() {
    let server = Server::start(&[]);
    let Some(a) = start_app(&server, "web", &[("TAG", "a")]) else {
        return;
    };
    let Some(off) = start_app(
        &server,
        "web",
        &[("TAG", "off"), ("WAYPOST_DISABLE_EXEC", "1")],
    ) else {
        return;
    };
    for _ in 0..4 {
        let r = exec(&server, &["--", "sh", "-c", "echo $TAG"]);
        assert_eq!(r.stdout, "a\n", "{}", r.stderr);
    }
    let r = exec(&server, &["--instance", &off.id[..10], "--", "true"]).fails();
    assert!(r.stderr.contains("disabled on instance"), "{}", r.stderr);
    let r = exec(&server, &["--instance", "ffffffffffff", "--", "true"]).fails();
    assert!(r.stderr.contains("no live instance"), "{}", r.stderr);

    // With a second enabled instance, a long session on one sends the next to the other.
    let Some(b) = start_app(&server, "web", &[("TAG", "b")]) else {
        return;
    };
    let mut long = server.env.command();
    // $D is the entrypoint's own directory (in the app's environment, so in the session's).
    long.args([
        "exec",
        "--app",
        "web",
        "--instance",
        &a.id[..10],
        "--",
        "sh",
        "-c",
        "echo > \"$D/long\"; exec sleep 30",
    ]);
    let mut long = long.spawn().unwrap();
    wait_for("the long session to start", || a.ep.file("long"));
    for _ in 0..3 {
        let r = exec(&server, &["--", "sh", "-c", "echo $TAG"]);
        assert_eq!(r.stdout, "b\n", "fewest sessions first: {}", r.stderr);
    }
    let _ = long.kill();
    let _ = long.wait();
    drop(b);
}

#[test]
fn exec_works_again_after_a_server_restart_with_fresh_session_ids() {
    let server = Server::start(&[]);
    let Some(app) = start_app(&server, "web", &[]) else {
        return;
    };
    for _ in 0..3 {
        exec(&server, &["--", "true"]).ok();
    }
    // A session running while the server goes away is cut off (the instance hangs it up).
    let mut running = server.env.command();
    running
        .args(["exec", "--app", "web", "--", "sleep", "60"])
        .stderr(Stdio::piped());
    let mut running = running.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let control = server.control_addr.clone();
    let logs_before = server.logs();
    let env = server.kill();
    let status = wait_for("the cut-off exec to end", || running.try_wait().unwrap());
    assert_eq!(status.code(), Some(255));

    let server = Server::start_in(env, &["--control-addr", &control]);
    // Held by the new server (on PostgreSQL the old row still looks live until its lease ends).
    let replica = server.replica_id();
    wait_for("the instance to reconnect", || {
        server
            .instances(false)
            .into_iter()
            .find(|i| i["id"] == app.id.as_str() && i["replica"] == replica.as_str())
    });
    let r = exec(&server, &["--", "sh", "-c", "echo again"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (Some(0), "again\n"),
        "{}",
        r.stderr
    );
    // Session ids never repeat across the restart.
    let ids = |logs: &str| -> Vec<u64> {
        logs.lines()
            .filter(|l| l.contains("exec session opening"))
            .filter_map(|l| {
                l.split("session=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let old = ids(&logs_before);
    let new = ids(&server.logs());
    assert!(!old.is_empty() && !new.is_empty(), "{old:?} {new:?}");
    assert!(
        new.iter().all(|n| old.iter().all(|o| n > o)),
        "old {old:?} new {new:?}"
    );
}

#[test]
fn an_entrypoint_token_cannot_start_an_exec() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let token = server.entrypoint_token("web", None);
    let out = server
        .env
        .command()
        .env("WAYPOST_ADMIN_TOKEN", &token)
        .args(["exec", "--app", "web", "--", "true"])
        .output()
        .unwrap();
    let r = Run::from_output(out).fails();
    assert!(
        r.stderr.contains("403") && r.stderr.contains("entrypoint token"),
        "{}",
        r.stderr
    );
    // Nor can a missing or wrong token.
    let out = server
        .env
        .command()
        .env("WAYPOST_ADMIN_TOKEN", "wpa_0000")
        .args(["exec", "--app", "web", "--", "true"])
        .output()
        .unwrap();
    let r = Run::from_output(out).fails();
    assert!(r.stderr.contains("401"), "{}", r.stderr);
}

#[test]
fn signals_are_forwarded_without_a_tty_and_an_unknown_app_is_an_error() {
    let server = Server::start(&[]);
    let Some(_app) = start_app(&server, "web", &[]) else {
        return;
    };
    let mut cmd = server.env.command();
    cmd.args([
        "exec",
        "--app",
        "web",
        "--",
        "sh",
        "-c",
        "echo started; exec sleep 30",
    ])
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut first = [0u8; 8];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"started\n");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_for("the remote sleep to die of SIGINT", || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(130));

    let r = server.cli(&["exec", "--app", "nope", "--", "true"]).fails();
    assert!(r.stderr.contains("no app named nope"), "{}", r.stderr);
}

#[test]
fn a_client_that_goes_away_hangs_up_its_session() {
    let server = Server::start(&[]);
    let Some(app) = start_app(&server, "web", &[]) else {
        return;
    };
    let mut cmd = server.env.command();
    cmd.args([
        "exec",
        "--app",
        "web",
        "--",
        "sh",
        "-c",
        "echo $$ > \"$D/session.pid\"; exec sleep 60",
    ]);
    let mut cli = cmd.spawn().unwrap();
    let pid: i32 = wait_for("the session's pid", || app.ep.file("session.pid"))
        .trim()
        .parse()
        .unwrap();
    cli.kill().unwrap(); // SIGKILL: no goodbye at all
    cli.wait().unwrap();
    // The server notices the closed WebSocket and hangs the session up (SIGHUP).
    wait_for("the remote process to be hung up", || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")))
        .then_some(())
    });
}

#[test]
fn a_reader_that_stops_holds_back_the_remote_process_not_memory() {
    let server = Server::start(&[]);
    let Some(app) = start_app(&server, "web", &[]) else {
        return;
    };
    exec(&server, &["--", "true"]).ok();
    let ep_before = app.entrypoint_rss();
    let server_before = apps::rss(server.pid());
    // Endless output, and nobody reads our stdout pipe.
    let mut cmd = server.env.command();
    cmd.args(["exec", "--app", "web", "--", "cat", "/dev/zero"])
        .stdout(Stdio::piped());
    let mut cli = cmd.spawn().unwrap();
    let cli_pid = cli.id();
    std::thread::sleep(Duration::from_secs(3));
    let (ep_after, server_after, cli_rss) = (
        app.entrypoint_rss(),
        apps::rss(server.pid()),
        apps::rss(cli_pid),
    );
    eprintln!(
        "unread exec output: entrypoint RSS {} -> {} KiB, server {} -> {} KiB, CLI {} KiB",
        ep_before / 1024,
        ep_after / 1024,
        server_before / 1024,
        server_after / 1024,
        cli_rss / 1024
    );
    assert!(
        ep_after < ep_before + 4 * 1024 * 1024,
        "entrypoint RSS grew from {ep_before} to {ep_after}"
    );
    assert!(
        server_after < server_before + 32 * 1024 * 1024,
        "server RSS grew from {server_before} to {server_after}"
    );
    assert!(cli_rss < 64 * 1024 * 1024, "CLI RSS {cli_rss}");
    // Reading resumes the flow.
    let mut out = cli.stdout.take().unwrap();
    let mut buf = vec![0u8; 4 * 1024 * 1024];
    out.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(out);
    let _ = cli.kill();
    let _ = cli.wait();
}
