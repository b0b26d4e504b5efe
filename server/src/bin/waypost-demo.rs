//! `waypost-demo`: a tiny demo app for `make run` and tests. Standard library only.
//!
//! An HTTP/1.1 server on 127.0.0.1:$PORT (default 5000) that answers every request with a small
//! HTML page showing `$GREETING` (default "hello from waypost-demo") and the host name. One log
//! line per request on stdout (`METHOD PATH STATUS`); start-up and errors on stderr.
//!
//! Signals: std has no signal API and this binary has no dependencies, so SIGTERM/SIGINT keep
//! their default action: the process dies of the signal (exit status 143 / 130 as a shell or the
//! entrypoint reports it). That is deliberate and harmless: there is no state to save.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Longest request head read; anything longer gets 431.
const MAX_HEAD: usize = 16 * 1024;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn handle(mut stream: TcpStream, greeting: &str, host: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(()); // connected and closed: a health probe
    }
    // Read (and ignore) the headers, bounded.
    let mut head = request_line.len();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        head += n;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if head > MAX_HEAD {
            println!("- - 431");
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "too large\n",
            );
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("-"), parts.next().unwrap_or("-"));
    let (status, body) = if method == "GET" || method == "HEAD" {
        let page = format!(
            "<!doctype html>\n<html><head><title>waypost-demo</title></head>\n<body>\n\
             <h1>{}</h1>\n<p>served by <b>{}</b> (pid {}) for <code>{} {}</code></p>\n</body></html>\n",
            escape(greeting),
            escape(host),
            std::process::id(),
            escape(method),
            escape(path)
        );
        (
            "200 OK",
            if method == "HEAD" {
                String::new()
            } else {
                page
            },
        )
    } else {
        ("405 Method Not Allowed", "only GET and HEAD\n".to_string())
    };
    println!("{method} {path} {}", &status[..3]);
    respond(&mut stream, status, "text/html; charset=utf-8", &body)
}

fn main() {
    let port = std::env::var("PORT").unwrap_or_else(|_| "5000".into());
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello from waypost-demo".into());
    let addr = format!("127.0.0.1:{port}");
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("waypost-demo: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let host = hostname();
    eprintln!(
        "waypost-demo: listening on http://{} (GREETING={greeting:?})",
        listener.local_addr().map(|a| a.to_string()).unwrap_or(addr)
    );
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let (greeting, host) = (greeting.clone(), host.clone());
                std::thread::spawn(move || {
                    if let Err(e) = handle(stream, &greeting, &host) {
                        eprintln!("waypost-demo: request failed: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("waypost-demo: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
