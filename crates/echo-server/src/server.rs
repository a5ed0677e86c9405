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
use crate::budget::MemoryBudget;
use crate::config::Config;
use crate::limits::{FileLimit, shared_max_connections};
use crate::listener::{self, ConnectionLimit};
use crate::metrics::{ListenerLabel, Metrics};
use crate::mqtt::{self, MqttServer, broker::Broker, persist};
use crate::shutdown::Shutdown;
use crate::stats;
use crate::tls;
use crate::ws::WsServer;

/// Listening sockets, bound and ready for the runtime.
pub struct Bound {
    pub websocket: Vec<std::net::TcpListener>,
    /// TLS for the WebSocket/HTTP port, when configured (files read
    /// before binding).
    pub websocket_tls: Option<tokio_rustls::TlsAcceptor>,
    pub mqtt: Vec<std::net::TcpListener>,
    /// TLS for the MQTT port, when configured (files read before binding).
    pub mqtt_tls: Option<tokio_rustls::TlsAcceptor>,
    /// The MQTT password and ACL files, read before binding (by the
    /// caller: a bad one is a configuration error, exit status 2).
    pub mqtt_access: mqtt::auth::Access,
    pub admin: Vec<std::net::TcpListener>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("websocket", &self.websocket)
            .field("websocket_tls", &self.websocket_tls.is_some())
            .field("mqtt", &self.mqtt)
            .field("mqtt_tls", &self.mqtt_tls.is_some())
            .field("admin", &self.admin)
            .finish()
    }
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}")]
pub struct BindError {
    pub key: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Why the server could not start: a port, or the TLS files.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The TLS acceptors of the MQTT and WebSocket ports, from the files the
/// configuration names (`None`: plain TCP).
#[allow(clippy::type_complexity)]
pub fn tls_acceptors(
    config: &Config,
) -> Result<(Option<tokio_rustls::TlsAcceptor>, Option<tokio_rustls::TlsAcceptor>), tls::TlsError> {
    let acceptor =
        |section, cert: &str, key: &str| tls::Files::of(section, cert, key).map(tls::acceptor).transpose();
    let mqtt_tls = acceptor("mqtt", &config.mqtt.tls_cert, &config.mqtt.tls_key)?;
    let websocket_tls = acceptor("websocket", &config.websocket.tls_cert, &config.websocket.tls_key)?;
    Ok((mqtt_tls, websocket_tls))
}

/// Binds every configured listener, or fails naming the one that could not be.
/// `mqtt_access`: the MQTT password and ACL files, already read. `shared`:
/// this process is one of several workers, whose WebSocket and MQTT
/// listeners share their ports (`SO_REUSEPORT`, see `crate::supervisor`).
pub fn bind_all(config: &Config, mqtt_access: mqtt::auth::Access, shared: bool) -> Result<Bound, StartError> {
    let (mqtt_tls, websocket_tls) = tls_acceptors(config)?;
    let bind = |key: &'static str, addrs: &[SocketAddr], backlog: u32, shared: bool| {
        let bind = if shared { listener::bind_shared } else { listener::bind };
        addrs
            .iter()
            .map(|&addr| bind(addr, backlog).map_err(|source| BindError { key, addr, source }))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Bound {
        websocket: bind("websocket.listen", &config.websocket.listen, config.websocket.backlog, shared)?,
        mqtt: bind("mqtt.listen", &config.mqtt.listen, config.mqtt.backlog, shared)?,
        mqtt_tls,
        websocket_tls,
        mqtt_access,
        admin: bind("admin.listen", &config.admin.listen, 128, false)?,
    })
}

/// What a started server reports once it is ready (a worker tells its
/// supervisor, `crate::supervisor`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    /// Where the admin listener listens (empty when it is off).
    pub admin: Vec<SocketAddr>,
    pub open_file_limit: u64,
    pub connection_capacity: u64,
    pub max_websocket_connections: u64,
    pub max_mqtt_connections: u64,
}

/// What the server did, for the last log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub connections_served: u64,
    pub messages_echoed: u64,
    /// Connections still open when the grace period ended.
    pub left_open: u64,
    pub mqtt_sessions_served: u64,
    pub mqtt_publishes_received: u64,
    pub mqtt_publishes_sent: u64,
    /// The MQTT router stopped: the process should exit with an error.
    pub router_failed: bool,
}

/// Exit status when the MQTT router died (EX_SOFTWARE).
pub const EXIT_ROUTER_FAILED: u8 = 70;

/// Runs until SIGTERM or SIGINT, then shuts down gracefully. Must be called
/// inside a `LocalRuntime` (tasks are spawned with `spawn_local`).
///
/// `restored`: the MQTT persistence snapshot loaded at start
/// (`mqtt::persist::load`), if any. `on_ready` is called once every
/// listener is served.
pub async fn run(
    config: Config,
    bound: Bound,
    files: FileLimit,
    restored: Option<persist::Snapshot>,
    on_ready: impl FnOnce(&Ready),
) -> Summary {
    let shutdown = Rc::new(Shutdown::new());
    let metrics = Arc::new(Metrics::new(files.soft, Some(tokio::runtime::Handle::current())));

    let ws_conf = config.websocket.max_connections;
    let mqtt_conf = config.mqtt.max_connections;
    let max_ws = shared_max_connections(ws_conf, mqtt_conf, &files);
    let max_mqtt = shared_max_connections(mqtt_conf, ws_conf, &files);
    report_file_limit(&files, max_ws, ws_conf);
    let ws_limit = ConnectionLimit::new(max_ws, metrics.websocket.connections.clone());
    // MQTT's own gauge is by protocol version, set once CONNACK is sent;
    // the limit counts sockets from accept on.
    let mqtt_limit = ConnectionLimit::new(max_mqtt, prometheus_client::metrics::gauge::Gauge::default());
    let budget = Rc::new(MemoryBudget::new(config.server.memory_limit, metrics.memory_refusals.clone()));
    metrics.memory_limit.set(i64::try_from(budget.limit()).unwrap_or(i64::MAX));
    let router_failed = Rc::new(std::cell::Cell::new(false));
    let mqtt_wanted = !bound.mqtt.is_empty() || config.mqtt.websocket;
    // The router restores its part of the snapshot; the server, its own
    // bookkeeping of the same sessions.
    let (router_restored, kept_restored) = match restored {
        Some(snapshot) => {
            let kept = persist::kept_sessions(&snapshot);
            (Some(snapshot.router), kept)
        }
        None => (None, Vec::new()),
    };
    let mut persister = None;
    let mqtt = if mqtt_wanted {
        let cluster = &config.cluster;
        let bridge_buffer = (!cluster.nats_url.is_empty()).then_some(cluster.buffer as usize);
        match Broker::start_with(&config.mqtt, max_mqtt, metrics.mqtt.clone(), router_restored, bridge_buffer)
            .await
        {
            Ok((broker, watch, feeds)) => {
                if config.mqtt.persistence {
                    persister = Some(persist::Persister::new(
                        broker.snapshot_handle(),
                        &config.mqtt,
                        metrics.mqtt.clone(),
                    ));
                }
                mqtt::broker::report(&config.mqtt, max_mqtt);
                if let Some(feeds) = feeds {
                    let started = crate::cluster::bridge::start(
                        cluster,
                        config.mqtt.max_payload_size as usize + 64,
                        broker.clone(),
                        feeds,
                        metrics.cluster.clone(),
                        shutdown.clone(),
                    )
                    .await;
                    if let Err(e) = started {
                        error!(error = %e, "cannot start the cluster bridge; this broker serves its own clients only");
                    }
                }
                tokio::task::spawn_local(mqtt::broker::report_client_events(
                    broker.clone(),
                    shutdown.clone(),
                ));
                if !config.mqtt.sys_interval.is_zero() {
                    tokio::task::spawn_local(mqtt::sys::run(
                        broker.clone(),
                        metrics.mqtt.clone(),
                        config.mqtt.sys_interval,
                        shutdown.clone(),
                    ));
                }
                let (failed, stop, grace) =
                    (router_failed.clone(), shutdown.clone(), config.server.shutdown_grace);
                tokio::task::spawn_local(mqtt::broker::watch_router(broker.clone(), watch, move || {
                    failed.set(true);
                    stop.trigger(grace);
                }));
                let server = MqttServer::new(
                    config.mqtt.clone(),
                    metrics.mqtt.clone(),
                    shutdown.clone(),
                    mqtt_limit.clone(),
                    broker,
                    bound.mqtt_tls.clone(),
                    bound.mqtt_access,
                    budget.clone(),
                );
                for session in &kept_restored {
                    server.kept.restore(session);
                }
                if let Some(persister) = &persister
                    && !config.mqtt.persistence_interval.is_zero()
                {
                    tokio::task::spawn_local(persist::run(
                        persister.clone(),
                        server.clone(),
                        config.mqtt.persistence_interval,
                        shutdown.clone(),
                    ));
                }
                Some(server)
            }
            Err(e) => {
                error!(error = %e, "cannot start the MQTT router; serving WebSocket only");
                router_failed.set(true);
                None
            }
        }
    } else {
        None
    };
    let mqtt_over_websocket = mqtt.clone().filter(|_| config.mqtt.websocket);
    let live = stats::Live::new(mqtt_over_websocket.is_some());
    let ws = WsServer::with_mqtt(
        config.websocket.clone(),
        config.tungstenite(),
        metrics.websocket.clone(),
        shutdown.clone(),
        ws_limit.clone(),
        mqtt_over_websocket,
        budget.clone(),
        live.clone(),
    )
    .with_tls(bound.websocket_tls);

    let ws_accept = ws.clone();
    start_accepting(
        bound.websocket,
        "websocket",
        ws.tls.is_some(),
        &shutdown,
        &metrics,
        move |stream, peer| ws_accept.on_accept(stream, peer),
    );
    if let Some(mqtt) = &mqtt {
        let mqtt_accept = mqtt.clone();
        start_accepting(bound.mqtt, "mqtt", mqtt.tls.is_some(), &shutdown, &metrics, move |stream, peer| {
            mqtt_accept.on_accept(stream, peer)
        });
    }
    let admin_state = AdminState::new(metrics.clone(), shutdown.clone());
    let mut admin_addrs = Vec::new();
    for std_listener in bound.admin {
        let listener =
            TcpListener::from_std(std_listener).expect("a bound socket registers with the runtime");
        let addr = listener.local_addr().expect("a bound socket has an address");
        admin_addrs.push(addr);
        info!(protocol = "admin", %addr, "listening");
        tokio::task::spawn_local(admin::serve(listener, admin_state.clone()));
    }
    tokio::task::spawn_local(crate::lag::probe(metrics.loop_lag.clone(), shutdown.clone()));
    crate::trim::return_large_buffers_at_once();
    tokio::task::spawn_local(crate::trim::run(metrics.clone(), budget.clone(), shutdown.clone()));
    let connections = stats::Connections { websocket: ws_limit.clone(), mqtt: mqtt_limit.clone() };
    tokio::task::spawn_local(stats::run(
        config.server.stats_interval,
        metrics.clone(),
        connections.clone(),
        shutdown.clone(),
    ));
    tokio::task::spawn_local(stats::sample(live, metrics.clone(), connections, shutdown.clone()));
    info!(
        max_websocket_connections = max_ws,
        max_mqtt_connections = max_mqtt,
        event_loop_threads = 1,
        memory_limit_bytes = budget.limit(),
        "ready"
    );
    on_ready(&Ready {
        admin: admin_addrs,
        open_file_limit: files.soft,
        connection_capacity: files.connection_capacity(),
        max_websocket_connections: max_ws,
        max_mqtt_connections: max_mqtt,
    });

    tokio::select! {
        _ = wait_for_signal(&shutdown, config.server.shutdown_grace) => {}
        // The router's death starts the shutdown by itself.
        _ = shutdown.wait() => {}
    }
    let deadline = shutdown.deadline().expect("the shutdown was triggered");
    info!(
        open_connections = ws_limit.open(),
        open_mqtt_connections = mqtt_limit.open(),
        grace_ms = config.server.shutdown_grace.as_millis() as u64,
        "shutting down: no new connections; closing every WebSocket client with 1001, \
         MQTT 5 clients with DISCONNECT 0x8B"
    );
    // With persistence on, the last snapshot gets the end of the grace
    // period: a fifth of it, at most a second (a snapshot file of tens of
    // megabytes is written in well under that).
    let clients_until = match persister {
        Some(_) => deadline - (config.server.shutdown_grace / 5).min(std::time::Duration::from_secs(1)),
        None => deadline,
    };
    tokio::select! {
        _ = async { ws_limit.all_closed().await; mqtt_limit.all_closed().await } => {}
        _ = tokio::time::sleep_until(clients_until) => {}
    }
    // The sessions have ended (kept by the router as disconnected) or the
    // grace period is over (those left are recorded as if they had just
    // disconnected): the last snapshot.
    if let (Some(persister), Some(mqtt)) = (&persister, &mqtt) {
        persister.save_at_shutdown(mqtt.kept.owners()).await;
    }
    let m = &metrics.mqtt;
    let summary = Summary {
        connections_served: metrics.websocket.upgrades.get(),
        messages_echoed: metrics.websocket.messages_echoed(),
        left_open: ws_limit.open() + mqtt_limit.open(),
        mqtt_sessions_served: m
            .connects
            .get_or_create(&crate::metrics::VersionLabel { version: "3.1.1" })
            .get()
            + m.connects.get_or_create(&crate::metrics::VersionLabel { version: "5" }).get(),
        mqtt_publishes_received: m.publishes_received.get(),
        mqtt_publishes_sent: m.publishes_sent.get(),
        router_failed: router_failed.get(),
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
        mqtt_sessions_served = summary.mqtt_sessions_served,
        mqtt_publishes_received = summary.mqtt_publishes_received,
        mqtt_publishes_sent = summary.mqtt_publishes_sent,
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

/// Hands bound listeners to the runtime, logs where each listens (tests and
/// people read these lines to learn the ports), and runs an accept loop on
/// each.
fn start_accepting<F>(
    listeners: Vec<std::net::TcpListener>,
    protocol: &'static str,
    tls: bool,
    shutdown: &Rc<Shutdown>,
    metrics: &Metrics,
    on_accept: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr) + Clone + 'static,
{
    for std_listener in listeners {
        let listener =
            TcpListener::from_std(std_listener).expect("a bound socket registers with the runtime");
        let addr = listener.local_addr().expect("a bound socket has an address");
        info!(protocol, %addr, tls, "listening");
        let fd_exhausted =
            metrics.accept_fd_exhausted.get_or_create_owned(&ListenerLabel { listener: protocol });
        tokio::task::spawn_local(listener::accept_loop(
            listener,
            protocol,
            shutdown.clone(),
            fd_exhausted,
            on_accept.clone(),
        ));
    }
}
