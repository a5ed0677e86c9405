//! Starting, running and stopping the whole server.
//!
//! Sockets are bound before the event loop starts, so a port that is taken
//! fails the start with a clear message instead of a half-running server.
//! Then one current-thread runtime drives every listener and connection;
//! see the README's architecture section for the threads of the process.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::limits::{FileLimit, effective_max_connections};
use crate::listener::{self, ConnectionLimit};
use crate::metrics::{ListenerLabel, Metrics};
use crate::shutdown::Shutdown;
use crate::stats;
use crate::ws::WsServer;

/// Listening sockets, bound and ready for the runtime.
#[derive(Debug)]
pub struct Bound {
    pub websocket: Vec<std::net::TcpListener>,
    pub admin: Vec<std::net::TcpListener>,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}")]
pub struct BindError {
    pub key: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds every configured listener, or fails naming the one that could not be.
pub fn bind_all(config: &Config) -> Result<Bound, BindError> {
    let bind = |key: &'static str, addrs: &[SocketAddr], backlog: u32| {
        addrs
            .iter()
            .map(|&addr| listener::bind(addr, backlog).map_err(|source| BindError { key, addr, source }))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Bound {
        websocket: bind("websocket.listen", &config.websocket.listen, config.websocket.backlog)?,
        admin: bind("admin.listen", &config.admin.listen, 128)?,
    })
}

/// What the server did, for the last log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub connections_served: u64,
    pub messages_echoed: u64,
    /// Connections still open when the grace period ended.
    pub left_open: u64,
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully. Must be called
/// inside a `LocalRuntime` (tasks are spawned with `spawn_local`).
pub async fn run(config: Config, bound: Bound, files: FileLimit) -> Summary {
    let shutdown = Rc::new(Shutdown::new());
    let metrics = Arc::new(Metrics::new(files.soft, Some(tokio::runtime::Handle::current())));

    let max_ws = effective_max_connections(config.websocket.max_connections, &files);
    report_file_limit(&files, max_ws, config.websocket.max_connections);
    let ws_limit = ConnectionLimit::new(max_ws, metrics.websocket.connections.clone());
    let ws = WsServer::new(
        config.websocket.clone(),
        config.tungstenite(),
        metrics.websocket.clone(),
        shutdown.clone(),
        ws_limit.clone(),
    );

    for std_listener in bound.websocket {
        let listener =
            TcpListener::from_std(std_listener).expect("a bound socket registers with the runtime");
        let addr = listener.local_addr().expect("a bound socket has an address");
        info!(protocol = "websocket", %addr, "listening");
        let ws = ws.clone();
        let fd_exhausted =
            metrics.accept_fd_exhausted.get_or_create_owned(&ListenerLabel { listener: "websocket" });
        tokio::task::spawn_local(listener::accept_loop(
            listener,
            "websocket",
            shutdown.clone(),
            fd_exhausted,
            move |stream, peer| ws.on_accept(stream, peer),
        ));
    }
    let admin_state = AdminState::new(metrics.clone(), shutdown.clone());
    for std_listener in bound.admin {
        let listener =
            TcpListener::from_std(std_listener).expect("a bound socket registers with the runtime");
        let addr = listener.local_addr().expect("a bound socket has an address");
        info!(protocol = "admin", %addr, "listening");
        tokio::task::spawn_local(admin::serve(listener, admin_state.clone()));
    }
    tokio::task::spawn_local(stats::run(
        config.server.stats_interval,
        metrics.clone(),
        ws_limit.clone(),
        shutdown.clone(),
    ));
    info!(max_websocket_connections = max_ws, event_loop_threads = 1, "ready");

    wait_for_signal(&shutdown, config.server.shutdown_grace).await;
    let deadline = shutdown.deadline().expect("the shutdown was triggered");
    info!(
        open_connections = ws_limit.open(),
        grace_ms = config.server.shutdown_grace.as_millis() as u64,
        "shutting down: no new connections; closing every client with 1001"
    );
    tokio::select! {
        _ = ws_limit.all_closed() => {}
        _ = tokio::time::sleep_until(deadline) => {}
    }
    let summary = Summary {
        connections_served: metrics.websocket.upgrades.get(),
        messages_echoed: metrics.websocket.messages_echoed(),
        left_open: ws_limit.open(),
    };
    if summary.left_open > 0 {
        warn!(
            left_open = summary.left_open,
            "grace period over; dropping connections that did not finish closing"
        );
    }
    info!(
        connections_served = summary.connections_served,
        messages_echoed = summary.messages_echoed,
        "shutdown complete"
    );
    summary
}

/// Waits for SIGTERM or SIGINT and starts the shutdown; a second signal ends
/// the process at once.
async fn wait_for_signal(shutdown: &Rc<Shutdown>, grace: std::time::Duration) {
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "cannot install signal handlers; stop the server with SIGKILL");
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "received signal");
    shutdown.trigger(grace);
    tokio::task::spawn_local(async move {
        let (name, code) = tokio::select! {
            _ = term.recv() => ("SIGTERM", 128 + libc::SIGTERM),
            _ = int.recv() => ("SIGINT", 128 + libc::SIGINT),
        };
        warn!(signal = name, "second signal: exiting at once");
        std::process::exit(code);
    });
}

/// Says, once at start, what the open-file limit allows.
fn report_file_limit(files: &FileLimit, max_ws: u64, configured: u32) {
    info!(
        open_file_limit = files.soft,
        hard_limit = files.hard,
        raised_from = files.initial_soft,
        connection_capacity = files.connection_capacity(),
        "open-file limit: every client socket takes one file descriptor"
    );
    if configured != 0 && max_ws > files.connection_capacity() {
        warn!(
            configured_max_connections = configured,
            connection_capacity = files.connection_capacity(),
            "websocket.max_connections is above what the open-file limit allows; \
             the limit will stop new connections first (raise it with `ulimit -n` \
             or `docker run --ulimit nofile=N:N`)"
        );
    }
    if files.soft < 4096 {
        warn!(
            open_file_limit = files.soft,
            "the open-file limit is low; this server is made for thousands of clients"
        );
    }
}
