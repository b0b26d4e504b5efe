//! Name resolution off the loop, and TCP connects without Nagle.

use crate::settings::HostPort;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};

/// Stack for the DNS helper thread: getaddrinfo needs a few KiB (musl) to tens of KiB (glibc NSS).
const DNS_STACK: usize = 256 * 1024;

/// A DNS answer from the helper thread.
pub type Resolved = Result<Vec<SocketAddr>, String>;

/// Addresses for a host that needs no DNS: an IP literal, or `localhost` (musl resolves it only
/// through /etc/hosts, which a scratch image may lack).
pub fn literal_addrs(target: &HostPort) -> Option<Vec<SocketAddr>> {
    let ips = if let Ok(ip) = target.host.parse::<IpAddr>() {
        vec![ip]
    } else if target.host.eq_ignore_ascii_case("localhost") {
        vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]
    } else {
        return None;
    };
    Some(
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, target.port))
            .collect(),
    )
}

/// Resolves `target` on a short-lived thread (a blocking getaddrinfo on a dead nameserver could
/// stall the loop for seconds); the answer waits in the receiver and `waker` wakes the loop.
pub fn resolve(target: HostPort, waker: Arc<mio::Waker>) -> io::Result<Receiver<Resolved>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("dns".into())
        .stack_size(DNS_STACK)
        .spawn(move || {
            let answer = (target.host.as_str(), target.port)
                .to_socket_addrs()
                .map(|a| a.collect())
                .map_err(|e| format!("cannot resolve {}: {e}", target.host));
            let _ = tx.send(answer);
            let _ = waker.wake();
        })?;
    Ok(rx)
}

/// A non-blocking TCP connect to `addr`, without Nagle's delay: frames and app replies are small
/// and often alone (a keystroke, a Pong).
pub fn connect(addr: SocketAddr) -> io::Result<mio::net::TcpStream> {
    let sock = mio::net::TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    Ok(sock)
}

/// `host:port`, with brackets around an IPv6 literal (for the proxy's CONNECT line).
pub fn format_host_port(hp: &HostPort) -> String {
    if hp.host.contains(':') {
        format!("[{}]:{}", hp.host, hp.port)
    } else {
        format!("{}:{}", hp.host, hp.port)
    }
}
