//! Opening TCP connections from chosen local addresses.
//!
//! The kernel's ephemeral port range (~28k ports by default) limits the
//! connections from one source address to one server address. Binding each
//! socket to one of several loopback addresses (all of 127.0.0.0/8 is local)
//! multiplies that. `IP_BIND_ADDRESS_NO_PORT` defers the port choice to
//! `connect()`, so the port only has to be unique per destination rather than
//! per source address.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use crate::stats::ErrorKind;

/// Connects to `addr`, from `source` if given, within `timeout`.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ErrorKind> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(classify)?;
    if let Some(ip) = source {
        set_bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(ip, 0)).map_err(classify)?;
    }
    let stream = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(classify(e)),
        Err(_) => return Err(ErrorKind::ConnectTimeout),
    };
    // Small messages must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn set_bind_address_no_port(socket: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Maps a connect error to the kind the report counts.
pub fn classify(e: io::Error) -> ErrorKind {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::ConnectionRefused, _) => ErrorKind::ConnectRefused,
        (io::ErrorKind::TimedOut, _) => ErrorKind::ConnectTimeout,
        (io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse, _) => ErrorKind::AddressUnavailable,
        (_, Some(libc::EMFILE | libc::ENFILE)) => ErrorKind::LocalFdLimit,
        _ => ErrorKind::ConnectFailed,
    }
}

/// The number of ephemeral ports per (source, destination) pair.
pub fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u64>());
            let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
            Some(hi.saturating_sub(lo) + 1)
        })
        .unwrap_or(28_232)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_from_a_chosen_loopback_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: IpAddr = "127.0.0.3".parse().unwrap();
        let (client, accepted) =
            tokio::join!(connect(addr, Some(source), Duration::from_secs(5)), listener.accept());
        let client = client.unwrap();
        assert_eq!(client.local_addr().unwrap().ip(), source);
        assert_eq!(accepted.unwrap().1.ip(), source);
    }

    #[tokio::test]
    async fn refused_is_classified() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert_eq!(connect(addr, None, Duration::from_secs(5)).await.unwrap_err(), ErrorKind::ConnectRefused);
    }

    #[test]
    fn port_range_is_read() {
        assert!(ephemeral_ports() > 1000);
    }
}
