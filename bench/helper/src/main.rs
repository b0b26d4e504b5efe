//! Measuring tools for bench/bench.sh (`wpbench SUBCOMMAND ...`):
//!
//! - `lines BYTES [LEN] [--report FILE]`: write BYTES of LEN-byte lines (default 100: 99 bytes + `\n`)
//!   to stdout in 64 KiB writes; with --report, write "BYTES SECONDS" (the time the writes took)
//!   to FILE at the end. `--rate LINES_PER_S` paces the output instead (for the soak), and
//!   BYTES = 0 means forever.
//! - `stamp`: print CLOCK_REALTIME in nanoseconds (the child of the startup measurement).
//! - `startup RUNS -- CMD...`: run CMD RUNS times; CMD must end up running `wpbench stamp`;
//!   print the start latencies (exec of CMD → the stamp), µs: `median p90 min max`.
//! - `measure [--hwm-of-self] -- CMD...`: run CMD (stdin /dev/null, stdout /dev/null) and print
//!   `wall_s user_s sys_s hwm_kib exit` of CMD's process itself (not its children): CPU from
//!   /proc/PID/stat read after it exits but before it is reaped, peak RSS (VmHWM) polled.
//! - `pty-rtt COUNT -- CMD...`: run CMD on a new PTY, wait for "READY", then COUNT times send one
//!   byte and time until it comes back; print µs: `p50 p99 mean min max`.
//! - `http PORT`: a tiny HTTP/1.1 server (keep-alive, `Connection: close` honoured) answering
//!   every GET with 12 bytes, a thread per connection (the tunnel benchmark's app).
//! - `freeport`: print a free TCP port on 127.0.0.1.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn die(msg: &str) -> ! {
    eprintln!("wpbench: {msg}");
    std::process::exit(2)
}

fn parse_size(s: &str) -> u64 {
    let (num, mul) = match s {
        _ if s.ends_with("GiB") => (&s[..s.len() - 3], 1u64 << 30),
        _ if s.ends_with("MiB") => (&s[..s.len() - 3], 1 << 20),
        _ if s.ends_with("KiB") => (&s[..s.len() - 3], 1 << 10),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| die(&format!("bad size {s}")))
        * mul
}

fn realtime_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        die("usage: wpbench lines|stamp|startup|measure|pty-rtt|http|freeport ...")
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "lines" => lines(rest),
        "stamp" => println!("{}", realtime_ns()),
        "startup" => startup(rest),
        "measure" => measure(rest),
        "pty-rtt" => pty_rtt(rest),
        "http" => http(rest),
        "freeport" => {
            let l =
                std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| die(&e.to_string()));
            println!("{}", l.local_addr().expect("bound").port());
        }
        other => die(&format!("unknown subcommand {other}")),
    }
}

fn after_dashes(rest: &[String]) -> &[String] {
    match rest.iter().position(|a| a == "--") {
        Some(i) if i + 1 < rest.len() => &rest[i + 1..],
        _ => die("missing -- CMD..."),
    }
}

// ---- lines ------------------------------------------------------------------------------------

fn lines(rest: &[String]) {
    let mut total = None;
    let mut len = 100usize;
    let mut report = None;
    let mut rate = None;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--report" => report = it.next().cloned(),
            "--rate" => rate = it.next().and_then(|r| r.parse::<u64>().ok()),
            _ if total.is_none() => total = Some(parse_size(a)),
            _ => len = a.parse().unwrap_or_else(|_| die("bad line length")),
        }
    }
    let total = total.unwrap_or_else(|| die("lines BYTES [LEN]"));
    let len = len.max(2);
    let mut out = std::io::stdout().lock();
    let t0 = Instant::now();
    let mut written = 0u64;
    if let Some(rate) = rate {
        // Paced: one line at a time, `rate` per second, each with a counter (for the soak).
        let mut n = 0u64;
        let tick = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let mut next = Instant::now();
        while total == 0 || written < total {
            let mut line = format!("soak line {n:012} ");
            while line.len() < len - 1 {
                line.push('x');
            }
            line.truncate(len - 1);
            line.push('\n');
            if out
                .write_all(line.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                break;
            }
            written += line.len() as u64;
            n += 1;
            next += tick;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }
    } else {
        // 64 KiB of whole lines, written again and again.
        let per = (65536 / len).max(1);
        let mut block = Vec::with_capacity(per * len);
        for i in 0..per {
            let start = block.len();
            block.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, len - 1));
            block.push(b'\n');
            debug_assert_eq!(block.len() - start, len);
        }
        while written < total {
            let n = ((total - written) as usize).min(block.len());
            if out.write_all(&block[..n]).is_err() {
                break;
            }
            written += n as u64;
        }
        let _ = out.flush();
    }
    let secs = t0.elapsed().as_secs_f64();
    if let Some(path) = report {
        let _ = std::fs::write(path, format!("{written} {secs:.6}\n"));
    }
}

// ---- startup ----------------------------------------------------------------------------------

fn startup(rest: &[String]) {
    let runs: usize = rest
        .first()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| die("startup RUNS -- CMD..."));
    let cmd = after_dashes(rest);
    let mut lat = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = realtime_ns();
        let out = std::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| die(&format!("running {}: {e}", cmd[0])));
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(stamp) = text
            .split_whitespace()
            .filter_map(|w| w.parse::<u128>().ok())
            .next_back()
        else {
            die(&format!(
                "{} printed no stamp (exit {:?}): {text:?}",
                cmd[0],
                out.status.code()
            ))
        };
        lat.push((stamp.saturating_sub(t0) / 1000) as u64);
    }
    lat.sort_unstable();
    let q = |p: f64| lat[(((lat.len() - 1) as f64) * p).round() as usize];
    println!("{} {} {} {}", q(0.5), q(0.9), lat[0], lat[lat.len() - 1]);
}

// ---- measure ----------------------------------------------------------------------------------

fn proc_field_kb(pid: i32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Own user and system CPU seconds from /proc/PID/stat (fields 14 and 15).
fn proc_cpu(pid: i32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((
        f.get(11)?.parse::<f64>().ok()? / hz,
        f.get(12)?.parse::<f64>().ok()? / hz,
    ))
}

fn measure(rest: &[String]) {
    let cmd = after_dashes(rest);
    let t0 = Instant::now();
    let child = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| die(&format!("running {}: {e}", cmd[0])));
    let pid = child.id() as i32;
    let mut hwm = 0;
    loop {
        if let Some(v) = proc_field_kb(pid, "VmHWM") {
            hwm = hwm.max(v);
        }
        // Exited? (WNOWAIT: leave it a zombie, so its own CPU times are still readable.)
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid siginfo pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read after a successful waitid (0 if nothing exited).
        if r == 0 && unsafe { info.si_pid() } == pid {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let wall = t0.elapsed().as_secs_f64();
    let (user, sys) = proc_cpu(pid).unwrap_or((f64::NAN, f64::NAN));
    let mut child = child;
    let status = child
        .wait()
        .map(|s| {
            s.code()
                .unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0))
        })
        .unwrap_or(-1);
    println!("{wall:.3} {user:.3} {sys:.3} {hwm} {status}");
}

// ---- pty-rtt ----------------------------------------------------------------------------------

fn pty_rtt(rest: &[String]) {
    let count: usize = rest
        .first()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| die("pty-rtt COUNT -- CMD..."));
    let cmd = after_dashes(rest);
    let ws = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut m, mut s): (libc::c_int, libc::c_int) = (-1, -1);
    // SAFETY: openpty with valid out-pointers; no name buffer, default termios, a valid winsize.
    if unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) } != 0 {
        die("openpty failed");
    }
    let cargs: Vec<std::ffi::CString> = cmd
        .iter()
        .map(|a| std::ffi::CString::new(a.as_str()).expect("no NUL"))
        .collect();
    let mut argv: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: fork; the child only calls async-signal-safe functions before execvp.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        die("fork failed");
    }
    if pid == 0 {
        // SAFETY: in the child: new session, the PTY slave as controlling terminal and stdio.
        unsafe {
            libc::setsid();
            libc::ioctl(s, libc::TIOCSCTTY, 0);
            libc::dup2(s, 0);
            libc::dup2(s, 1);
            libc::dup2(s, 2);
            libc::close(m);
            if s > 2 {
                libc::close(s);
            }
            libc::execvp(argv[0], argv.as_ptr());
            libc::_exit(127);
        }
    }
    // SAFETY: the parent's copy of the slave is not needed.
    unsafe { libc::close(s) };
    // SAFETY: the master fd is ours from here on.
    let mut pty = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(m) };
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&seen).contains("READY") {
        if Instant::now() > deadline {
            die(&format!(
                "no READY from {:?} within 30 s; got {:?}",
                cmd,
                String::from_utf8_lossy(&seen)
            ));
        }
        match read_timeout(&mut pty, &mut buf, Duration::from_secs(1)) {
            Some(0) => die(&format!(
                "{:?} closed the terminal before READY: {:?}",
                cmd,
                String::from_utf8_lossy(&seen)
            )),
            Some(n) => seen.extend_from_slice(&buf[..n]),
            None => {}
        }
    }
    // Let the remote side settle (the READY line may still be in flight with trailing bytes).
    std::thread::sleep(Duration::from_millis(300));
    while let Some(n) = read_timeout(&mut pty, &mut buf, Duration::from_millis(50)) {
        if n == 0 {
            break;
        }
    }
    let mut lat = Vec::with_capacity(count);
    for i in 0..count {
        let b = b'a' + (i % 26) as u8;
        let t0 = Instant::now();
        pty.write_all(&[b])
            .unwrap_or_else(|e| die(&format!("write: {e}")));
        'wait: loop {
            match read_timeout(&mut pty, &mut buf, Duration::from_secs(10)) {
                Some(0) | None => die(&format!("keystroke {i} did not come back within 10 s")),
                Some(n) => {
                    if buf[..n].contains(&b) {
                        break 'wait;
                    }
                }
            }
        }
        lat.push(t0.elapsed().as_micros() as u64);
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: end the session: its whole process group (setsid made it the leader).
    unsafe {
        libc::kill(-pid, libc::SIGHUP);
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    lat.sort_unstable();
    let q = |p: f64| lat[(((lat.len() - 1) as f64) * p).round() as usize];
    let mean = lat.iter().sum::<u64>() / lat.len() as u64;
    println!(
        "{} {} {} {} {}",
        q(0.5),
        q(0.99),
        mean,
        lat[0],
        lat[lat.len() - 1]
    );
}

/// Reads with a timeout; None = nothing within it, Some(0) = closed (EIO on a PTY master).
fn read_timeout(f: &mut std::fs::File, buf: &mut [u8], t: Duration) -> Option<usize> {
    use std::os::fd::AsRawFd as _;
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, t.as_millis() as libc::c_int) };
    if r <= 0 {
        return None;
    }
    match f.read(buf) {
        Ok(n) => Some(n),
        Err(_) => Some(0),
    }
}

// ---- http -------------------------------------------------------------------------------------

fn http(rest: &[String]) {
    let port: u16 = rest
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| die("http PORT"));
    let l = std::net::TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| die(&format!("bind: {e}")));
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut buf = vec![0u8; 16384];
            let mut have = 0;
            loop {
                let end = loop {
                    if let Some(p) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    if have == buf.len() {
                        return;
                    }
                    match c.read(&mut buf[have..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let close = head.contains("\r\nconnection: close");
                let resp: &[u8] = if close {
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nhello world\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n"
                };
                if c.write_all(resp).is_err() || close {
                    return;
                }
                buf.copy_within(end..have, 0);
                have -= end;
            }
        });
    }
}
