//! The WebSocket echo server: listener, handshake, sessions.
//!
//! Every connection is a task on the one event-loop thread. A connection's
//! task serves its HTTP requests ([`http`]: the handshake, the page, the
//! HTTP echo) until one upgrades, then runs the echo session ([`session`]).
//! The accept loop only accepts, counts, and spawns. With TLS on
//! (`websocket.tls_cert`), the connection's task first runs the TLS
//! handshake, under `handshake_timeout`, and everything after it reads and
//! writes through the same [`stream::Stream`] as a plain connection does.
//!
//! Because all tasks share one thread, the state they share — the
//! connection count, the shutdown flag — lives in `Rc` and `Cell`: no locks,
//! no atomics, nothing contended. Tasks are `!Send`, spawned with
//! `spawn_local`.

pub(crate) mod chunked;
pub mod handshake;
pub(crate) mod http;
pub(crate) mod http_echo;
pub mod io;
pub(crate) mod live;
pub(crate) mod replica;
pub mod session;
pub(crate) mod sse;
pub mod stream;

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Duration;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::budget::MemoryBudget;
use crate::config::WebSocketConfig;
use crate::listener::{ConnectionLimit, Permit};
use crate::metrics::WebSocketMetrics;
use crate::mqtt::MqttServer;
use crate::shutdown::Shutdown;
use crate::stats::Live;
use handshake::Response;
use stream::Stream;

/// At most this many clients are being sent a 503 at once; beyond that, a
/// client over the limit is disconnected without a response, so that a flood
/// cannot take the file descriptors kept in reserve.
const MAX_CONCURRENT_REFUSALS: u32 = 32;

/// Everything the WebSocket tasks share.
pub struct WsServer {
    pub config: WebSocketConfig,
    /// tungstenite's settings, derived once from `config`.
    pub codec: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    pub metrics: Arc<WebSocketMetrics>,
    pub shutdown: Rc<Shutdown>,
    pub limit: Rc<ConnectionLimit>,
    /// Where upgrades that select the `mqtt` subprotocol go, when MQTT over
    /// WebSocket is on.
    pub mqtt: Option<Rc<MqttServer>>,
    /// The server's memory budget: no new connection once it is spent.
    pub budget: Rc<MemoryBudget>,
    /// This host's name, looked up once, when `send_server_hostname` is on.
    pub hostname: Option<String>,
    /// The one timer of every Server-Sent Events stream.
    pub(crate) ticker: Rc<sse::Ticker>,
    /// The server's figures, for the page (`/.stats`).
    pub(crate) live: Rc<Live>,
    /// TLS on this port (`websocket.tls_cert`, `websocket.tls_key`).
    pub tls: Option<TlsAcceptor>,
    refusing: Cell<u32>,
}

impl WsServer {
    pub fn new(
        config: WebSocketConfig,
        codec: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
        metrics: Arc<WebSocketMetrics>,
        shutdown: Rc<Shutdown>,
        limit: Rc<ConnectionLimit>,
    ) -> Rc<Self> {
        let budget = Rc::new(MemoryBudget::unlimited());
        Self::with_mqtt(config, codec, metrics, shutdown, limit, None, budget, Live::new(false))
    }

    /// A WebSocket server that hands `mqtt` upgrades to the MQTT broker,
    /// and shows `live` on its page.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn with_mqtt(
        config: WebSocketConfig,
        codec: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
        metrics: Arc<WebSocketMetrics>,
        shutdown: Rc<Shutdown>,
        limit: Rc<ConnectionLimit>,
        mqtt: Option<Rc<MqttServer>>,
        budget: Rc<MemoryBudget>,
        live: Rc<Live>,
    ) -> Rc<Self> {
        let hostname = config.send_server_hostname.then(replica::hostname);
        let ticker = sse::Ticker::new(config.sse_interval, shutdown.clone());
        Rc::new(WsServer {
            config,
            codec,
            metrics,
            shutdown,
            limit,
            mqtt,
            budget,
            hostname,
            ticker,
            live,
            tls: None,
            refusing: Cell::new(0),
        })
    }

    /// This server, serving `wss://` and `https://` with `tls` when it is
    /// `Some`. Called once, right after construction.
    pub fn with_tls(mut self: Rc<Self>, tls: Option<TlsAcceptor>) -> Rc<Self> {
        Rc::get_mut(&mut self).expect("with_tls is called before the server is shared").tls = tls;
        self
    }

    /// Called by the accept loop for every new TCP connection.
    pub fn on_accept(self: &Rc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.metrics.accepted.inc();
        let why = if !self.budget.allows("websocket") {
            Full::Memory
        } else {
            match self.limit.try_acquire() {
                Some(permit) => {
                    tokio::task::spawn_local(serve_connection(stream, peer, permit, self.clone()));
                    return;
                }
                None => Full::Connections,
            }
        };
        self.metrics.reject(why.label());
        if self.refusing.get() < MAX_CONCURRENT_REFUSALS {
            self.refusing.set(self.refusing.get() + 1);
            tokio::task::spawn_local(refuse(stream, why, self.clone()));
        }
    }
}

impl std::fmt::Debug for WsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsServer")
            .field("config", &self.config)
            .field("mqtt", &self.mqtt.is_some())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a new connection is turned away.
#[derive(Debug, Clone, Copy)]
enum Full {
    /// `websocket.max_connections`, or the open-file limit.
    Connections,
    /// `server.memory_limit` (see `budget`).
    Memory,
}

impl Full {
    fn label(self) -> &'static str {
        match self {
            Full::Connections => "capacity",
            Full::Memory => "memory_limit",
        }
    }
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, permit: Permit, server: Rc<WsServer>) {
    let _permit = permit;
    // Boxed: the handshake's buffers and state are freed when it ends, and
    // do not enlarge the session future, which lives as long as the client.
    let Some(then) = Box::pin(handshake_phase(tcp, peer, &server)).await else {
        return;
    };
    then.run(&server).await;
    debug!(%peer, "connection ended");
}

/// What a connection's HTTP requests led to: a WebSocket echo session, or
/// a Server-Sent Events stream. Either lives as long as the client.
enum Then {
    Session(io::SessionIo, Option<Vec<u8>>),
    Events(Stream, sse::Events),
}

impl Then {
    /// The future that serves the client from here on. Not `async`: the
    /// connection's future then holds only this one, not `self` beside it.
    fn run(self, server: &WsServer) -> impl Future<Output = ()> + '_ {
        use futures_util::future::Either;
        match self {
            Then::Session(io, prefix) => Either::Left(session::run(io, prefix, server)),
            Then::Events(stream, events) => Either::Right(sse::run(stream, events, server)),
        }
    }
}

/// An upgrade that selected the `mqtt` subprotocol: an MQTT session over
/// binary WebSocket messages, run from inside the (boxed) handshake phase
/// so that it does not enlarge every echo session's future.
async fn serve_mqtt(stream: Stream, leftover: Vec<u8>, peer: SocketAddr, server: &WsServer) {
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(mqtt) = server.mqtt.clone() else {
        return;
    };
    let ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(server.codec)).await;
    mqtt.serve_websocket(ws, peer).await;
    debug!(%peer, "MQTT over WebSocket session ended");
}

/// Serves the client's HTTP requests (after the TLS handshake, with TLS
/// on); on an upgrade, returns the stream ready for the session; for
/// Server-Sent Events, ready for the stream of events.
async fn handshake_phase(tcp: TcpStream, peer: SocketAddr, server: &WsServer) -> Option<Then> {
    // Echo latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    let mut stream = match &server.tls {
        None => Stream::Plain(tcp),
        Some(acceptor) => Stream::Tls(Box::new(tls_handshake(acceptor, tcp, peer, server).await?)),
    };
    let upgrade = match http::serve(&mut stream, peer, server).await {
        Some(http::Next::Upgrade(upgrade)) => upgrade,
        Some(http::Next::Events(events)) => return Some(Then::Events(stream, events)),
        None => {
            debug!(%peer, "HTTP connection ended");
            return None;
        }
    };
    server.metrics.upgrades.inc();
    debug!(%peer, path = %upgrade.path, subprotocol = ?upgrade.subprotocol, "upgraded");
    if server.mqtt.is_some() && upgrade.subprotocol.as_deref() == Some("mqtt") {
        Box::pin(serve_mqtt(stream, upgrade.leftover, peer, server)).await;
        return None;
    }
    let (io, prefix) = session::session_io(stream, upgrade.leftover, server);
    Some(Then::Session(io, prefix))
}

/// The TLS handshake of one client, within `handshake_timeout`. rustls's
/// state is created only once the client has sent something: until then,
/// a client that connects and stays silent holds its socket and nothing
/// else. Failures are counted as handshake failures (`tls`, `tls_timeout`)
/// and logged at debug: they concern that client alone.
async fn tls_handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    server: &WsServer,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let handshake = async {
        tcp.readable().await?;
        acceptor.accept(tcp).await
    };
    match tokio::time::timeout(server.config.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(error)) => {
            debug!(%peer, %error, "TLS handshake failed");
            server.metrics.handshake_failed("tls");
            None
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            server.metrics.handshake_failed("tls_timeout");
            None
        }
    }
}

/// Tells a client the server cannot take it to come back later: over TLS,
/// after a handshake of at most a second (a client that cannot finish one
/// that fast is just closed).
async fn refuse(tcp: TcpStream, why: Full, server: Rc<WsServer>) {
    let limit = Duration::from_secs(1);
    let stream = match &server.tls {
        None => Some(Stream::Plain(tcp)),
        Some(acceptor) => match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Some(Stream::Tls(Box::new(tls))),
            _ => None,
        },
    };
    if let Some(stream) = stream {
        refuse_with_503(stream, why, &server, limit).await;
    }
    server.refusing.set(server.refusing.get() - 1);
}

async fn refuse_with_503(mut stream: Stream, why: Full, server: &WsServer, limit: Duration) {
    let body = match why {
        Full::Connections => {
            format!("the server is at its connection limit ({}); try again later", server.limit.max())
        }
        Full::Memory => "the server is at its memory limit; try again later".to_owned(),
    };
    let mut response = Response::error(503, body).with_header("Retry-After", "1");
    if let Some(host) = &server.hostname {
        response = response.with_header(replica::HEADER, host.clone());
    }
    use tokio::io::AsyncWriteExt;
    let write = async {
        stream.write_all(&response.to_bytes()).await?;
        stream.flush().await
    };
    if let Ok(Ok(())) = tokio::time::timeout(limit, write).await {
        server.metrics.http_response(503);
        handshake::linger_close(&mut stream, limit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Every connection's task holds its future for its whole life, so the
    /// future's size is a fixed cost per connection. Keep it small: large
    /// state (handshake buffers, the WebSocket stream) is boxed and lives
    /// only while needed.
    #[tokio::test]
    async fn a_connection_costs_a_small_future() {
        let config = Config::default();
        let metrics = Arc::new(WebSocketMetrics::default());
        let limit = ConnectionLimit::new(10, metrics.connections.clone());
        let server = WsServer::new(
            config.websocket.clone(),
            config.tungstenite(),
            metrics,
            Rc::new(Shutdown::new()),
            limit.clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let connection = serve_connection(accepted, peer, limit.try_acquire().unwrap(), server.clone());
        let size = std::mem::size_of_val(&connection);
        println!("connection future: {size} bytes");
        assert!(size <= 832, "the per-connection future grew to {size} bytes");
        drop(client);
    }
}
