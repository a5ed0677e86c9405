//! Listening sockets, the accept loop, and the connection limit.
//!
//! The accept loop does nothing but accept: every handshake happens in the
//! connection's own task, so one slow or hostile client can never hold up the
//! next one. When the process runs out of file descriptors, `accept` fails
//! with `EMFILE` until a socket closes; the loop then backs off instead of
//! spinning, logs the episode once when it starts and once when it ends
//! (`crate::episode`), and
//! counts every failed attempt in `/metrics`.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::episode::Episodes;
use crate::limits::is_fd_exhaustion;
use crate::metrics::Count;
use crate::shutdown::Shutdown;

/// Binds a listening socket. IPv6 sockets are IPv6-only, so `0.0.0.0:8080`
/// and `[::]:8080` can be listed side by side.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = socket(addr, false)?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Binds a listening socket that shares its port with the other workers'
/// (`SO_REUSEPORT`): the kernel spreads new connections over every worker
/// listening on it, by a hash of the client's address and port.
pub fn bind_shared(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = socket(addr, true)?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Binds `addr` with `SO_REUSEPORT` without listening: it holds the port
/// (port 0 becomes a concrete one, a taken port fails here) so that workers
/// can bind the same address. A socket that does not listen is never given
/// a connection, so the supervisor that holds it serves no client.
pub fn reserve(addr: SocketAddr) -> io::Result<Socket> {
    socket(addr, true)
}

fn socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Restarting the server must not wait for old connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Counts open connections of one protocol against its limit. Single-threaded
/// by design: the count is a `Cell`, and a [`Permit`] gives its slot back
/// when the connection's task ends, however it ends.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: u64,
    open: Cell<u64>,
    gauge: Gauge,
    all_closed: Notify,
}

impl ConnectionLimit {
    pub fn new(max: u64, gauge: Gauge) -> Rc<Self> {
        Rc::new(ConnectionLimit { max, open: Cell::new(0), gauge, all_closed: Notify::new() })
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn open(&self) -> u64 {
        self.open.get()
    }

    /// Takes a slot, or `None` when the limit is reached.
    pub fn try_acquire(self: &Rc<Self>) -> Option<Permit> {
        let open = self.open.get();
        if open >= self.max {
            return None;
        }
        self.open.set(open + 1);
        self.gauge.inc();
        Some(Permit(self.clone()))
    }

    /// Completes when no connection is open.
    pub async fn all_closed(&self) {
        while self.open.get() > 0 {
            self.all_closed.notified().await;
        }
    }
}

/// One open connection's slot in a [`ConnectionLimit`].
#[derive(Debug)]
pub struct Permit(Rc<ConnectionLimit>);

impl Drop for Permit {
    fn drop(&mut self) {
        let limit = &self.0;
        let open = limit.open.get() - 1;
        limit.open.set(open);
        limit.gauge.dec();
        if open == 0 {
            limit.all_closed.notify_waiters();
        }
    }
}

/// Accepts connections until shutdown and hands each one to `on_accept`.
pub async fn accept_loop<F>(
    listener: TcpListener,
    name: &'static str,
    shutdown: Rc<Shutdown>,
    fd_exhausted: Count,
    mut on_accept: F,
) where
    F: FnMut(TcpStream, SocketAddr),
{
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    const MAX_BACKOFF: Duration = Duration::from_millis(500);
    let mut backoff = FIRST_BACKOFF;
    let mut exhaustion = Episodes::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some(episode) = exhaustion.meanwhile(Instant::now()) {
                    info!(
                        listener = name,
                        failed_accepts = episode.hits,
                        accepted_meanwhile = episode.meanwhile,
                        lasted_ms = episode.lasted.as_millis() as u64,
                        "the open-file limit has not stopped a connection for {}s: accepting normally again",
                        Episodes::QUIET.as_secs()
                    );
                }
                backoff = FIRST_BACKOFF;
                on_accept(stream, peer);
            }
            Err(err) if is_fd_exhaustion(&err) => {
                fd_exhausted.inc();
                if exhaustion.hit(Instant::now(), 1) {
                    let limit = rlimit::Resource::NOFILE.get().map(|l| l.0).unwrap_or(0);
                    warn!(
                        listener = name,
                        open_file_limit = limit,
                        error = %err,
                        "the open-file limit, not the server, is stopping new connections; \
                         each waits in the backlog until a socket closes (logged once until the \
                         limit has not been hit for {}s; echo_accept_fd_exhausted_total counts every time)",
                        Episodes::QUIET.as_secs()
                    );
                }
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(err) => {
                // ECONNABORTED and friends concern one client that already
                // left; anything else is unexpected but must not end the loop.
                debug!(listener = name, error = %err, "accept failed");
                if !matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) {
                    warn!(listener = name, error = %err, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    debug!(listener = name, "stopped accepting");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_and_free_their_slot() {
        let limit = ConnectionLimit::new(2, Gauge::default());
        let a = limit.try_acquire().unwrap();
        let b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none(), "full at max");
        assert_eq!(limit.open(), 2);
        drop(a);
        assert_eq!(limit.open(), 1);
        let _c = limit.try_acquire().expect("a freed slot is reusable");
        drop(b);
        assert_eq!(limit.gauge.get(), 1);
    }

    #[test]
    fn workers_share_a_reserved_port() {
        let reserved = reserve("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = reserved.local_addr().unwrap().as_socket().unwrap();
        assert_ne!(addr.port(), 0);
        let a = bind_shared(addr, 16).unwrap();
        let b = bind_shared(addr, 16).expect("a second worker binds the same port");
        assert_eq!(a.local_addr().unwrap(), b.local_addr().unwrap());
        let err = bind(addr, 16).expect_err("a socket without SO_REUSEPORT cannot join");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn ipv6_and_ipv4_listeners_coexist_on_one_port() {
        let v4 = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let port = v4.local_addr().unwrap().port();
        match bind(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port)), 16) {
            Ok(v6) => assert_eq!(v6.local_addr().unwrap().port(), port),
            // A machine without IPv6 cannot show this; the v4 bind stands.
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {}
            Err(e) => panic!("binding [::1]:{port} failed: {e}"),
        }
    }
}
