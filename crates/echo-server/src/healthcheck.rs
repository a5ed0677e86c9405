//! `echo-server healthcheck`: asks the admin listener's `/healthz` and exits
//! 0 when it answers 200. Container images have no curl; the binary is enough.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where to ask: an unspecified listen address (0.0.0.0, [::]) is reached
/// through loopback.
pub fn target(admin_listen: &[SocketAddr]) -> Option<SocketAddr> {
    let addr = *admin_listen.first()?;
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(SocketAddr::new(ip, addr.port()))
}

/// Performs the check; `Err` carries the reason to print.
pub fn check(addr: &str, timeout: Duration) -> Result<(), String> {
    let addr = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let mut response = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut response);
    let status_line = String::from_utf8_lossy(&response).lines().next().unwrap_or("").to_owned();
    if status_line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else if status_line.is_empty() {
        Err(format!("no answer from {addr}"))
    } else {
        Err(format!("{addr} answered {status_line:?}"))
    }
}
