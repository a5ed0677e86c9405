//! The MQTT broker: rumqttd's router as the core, everything on the
//! network side ours.
//!
//! rumqttd's own servers (`Broker::start`, `Server::start`) own their accept
//! loops and threads, refuse a full server or a keep-alive of 0 by dropping
//! the client, speak one protocol version per port, and die on a 3.1.1
//! subscriber receiving an MQTT 5 publish (see [`downgrade`]). So this
//! module runs only rumqttd's `Router` (on its own thread, see [`broker`])
//! and serves the sockets itself, on the same event loop as WebSocket:
//!
//! - [`mod@self`]: the accept side — connection limit, CONNACK refusals when
//!   full, TLS, and the entry for MQTT over WebSocket;
//! - [`session`]: one connection: its CONNECT phase, exchange loop and
//!   closing, and the turns that pace connects and closes;
//! - [`codec`]: framing with rumqttd's public v4/v5 codecs;
//! - [`inflow`]: how much of one client's input is taken at a time
//!   (turns, backpressure towards the router);
//! - [`ackorder`]: the session's own acknowledgements kept in order with
//!   the router's;
//! - [`downgrade`]: router output made safe for 3.1.1 clients;
//! - [`topics`]: topic and filter checks the router does not do;
//! - [`caps`]: what one client may make the server hold;
//! - [`transport`]: TCP, TLS or WebSocket underneath;
//! - [`auth`], [`passwd`], [`acl`]: who may connect (a username and
//!   password, a password file), and who may publish and subscribe where;
//! - [`sys`]: the broker's statistics under `$SYS/broker/...`.
//!
//! Optional TLS on the MQTT port comes from [`crate::tls`].

pub(crate) mod ackorder;
pub(crate) mod acl;
pub mod auth;
pub mod broker;
pub(crate) mod caps;
pub mod codec;
pub mod downgrade;
mod inflow;
pub mod passwd;
pub mod persist;
pub mod session;
pub(crate) mod sys;
pub mod topics;
pub mod transport;

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::ConnectReturnCode;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::budget::MemoryBudget;
use crate::config::MqttConfig;
use crate::listener::{ConnectionLimit, Permit};
use crate::metrics::MqttMetrics;
use crate::shutdown::Shutdown;
use broker::Broker;
use codec::{Peek, Version, peek_version};
use transport::{Goodbye, Transport};

/// At most this many clients over the limit are being refused at once,
/// each holding its socket (a file descriptor from the reserve kept beyond
/// the connection limit) while it waits: for its CONNECT, then for the
/// client to close after the CONNACK, up to [`REFUSAL_TIMEOUT`] each. Past
/// that, a client is answered only if its CONNECT is already in when it is
/// accepted ([`MqttServer::refuse_at_once`]), and otherwise closed without
/// a CONNACK, so that a flood cannot take the reserve.
const MAX_CONCURRENT_REFUSALS: u32 = 32;

/// How long a client over the limit has to send its CONNECT, and then to
/// close after the refusing CONNACK.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// How much a refusal past the bound reads of what the client already sent
/// (its CONNECT; the rest is read too, so that closing sends a FIN, not a
/// reset that could destroy the CONNACK).
const REFUSE_AT_ONCE_READ: usize = 16 * 1024;

/// Everything the MQTT tasks share.
pub struct MqttServer {
    pub config: MqttConfig,
    pub metrics: Arc<MqttMetrics>,
    pub shutdown: Rc<Shutdown>,
    pub limit: Rc<ConnectionLimit>,
    pub broker: Rc<Broker>,
    pub tls: Option<TlsAcceptor>,
    pub credentials: Option<auth::Credentials>,
    /// The password and ACL files (`mqtt.password_file`, `mqtt.acl_file`).
    pub access: auth::Access,
    /// The server's memory budget, checked before a client is given more.
    pub budget: Rc<MemoryBudget>,
    /// Turns for processing a CONNECT, and for closing a session (see
    /// `mqtt.connect_concurrency`).
    pub(crate) connecting: session::ConnectTurns,
    /// The filters of sessions that outlive their connections, counted
    /// against `mqtt.max_subscriptions` across connections.
    pub(crate) kept: caps::Kept,
    /// The one timer of every session's keep-alive, which also brings
    /// them the shutdown.
    pub(crate) alarms: Rc<session::Alarms>,
    refusing: Cell<u32>,
    next_client: Cell<u64>,
    /// Makes assigned client ids unique across restarts too.
    boot: u64,
}

impl std::fmt::Debug for MqttServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttServer").field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}

impl MqttServer {
    // Each part is built by the server's start-up; a struct of them would
    // only repeat this list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: MqttConfig,
        metrics: Arc<MqttMetrics>,
        shutdown: Rc<Shutdown>,
        limit: Rc<ConnectionLimit>,
        broker: Rc<Broker>,
        tls: Option<TlsAcceptor>,
        access: auth::Access,
        budget: Rc<MemoryBudget>,
    ) -> Rc<Self> {
        let credentials = auth::Credentials::new(&config.username, &config.password);
        let connecting = session::ConnectTurns::new(config.connect_concurrency as usize);
        let alarms = session::Alarms::new(shutdown.clone());
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rc::new(MqttServer {
            config,
            metrics,
            shutdown,
            limit,
            broker,
            tls,
            credentials,
            access,
            budget,
            connecting,
            kept: caps::Kept::default(),
            alarms,
            refusing: Cell::new(0),
            next_client: Cell::new(0),
            boot,
        })
    }

    /// A client id for a client that sent none (MQTT 5 returns it in the
    /// CONNACK). Only characters the router accepts.
    pub fn assign_client_id(&self) -> String {
        let n = self.next_client.get() + 1;
        self.next_client.set(n);
        format!("auto-{:x}-{n}", self.boot)
    }

    /// Called by the accept loop for every TCP connection on the MQTT port.
    pub fn on_accept(self: &Rc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.metrics.accepted.inc();
        let _ = stream.set_nodelay(true);
        match self.limit.try_acquire() {
            Some(permit) => {
                tokio::task::spawn_local(serve_tcp(stream, peer, permit, self.clone()));
            }
            None => self.refuse_when_full(stream, peer),
        }
    }

    fn refuse_when_full(self: &Rc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.metrics.refuse("capacity");
        let Some(slot) = RefusalSlot::take(self) else {
            // TLS needs a handshake first: no answer without waiting.
            if self.tls.is_none() && self.refuse_at_once(stream) {
                debug!(%peer, "refused at once: at the MQTT connection limit");
            } else {
                debug!(%peer, "closed without a CONNACK: at the MQTT connection and refusal limits");
            }
            return;
        };
        let server = self.clone();
        tokio::task::spawn_local(async move {
            let _slot = slot;
            let transport = match &server.tls {
                Some(acceptor) => {
                    match tokio::time::timeout(REFUSAL_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => Some(Transport::Tls(Box::new(tls))),
                        _ => None,
                    }
                }
                None => Some(Transport::Tcp(stream)),
            };
            if let Some(transport) = transport {
                refuse_full(transport, &server).await;
            }
            debug!(%peer, "refused: at the MQTT connection limit");
        });
    }

    /// Refuses a client over the limit without waiting for anything, when
    /// every refusal slot is taken: if its CONNECT is already in the socket
    /// (as it mostly is by the time a server that busy accepts it), the
    /// CONNACK is written at once (a few bytes into an empty send buffer)
    /// and the socket closed. One read and one write, no task, no
    /// descriptor kept. Whether a CONNACK was sent.
    fn refuse_at_once(&self, stream: TcpStream) -> bool {
        use std::io::{Read, Write};
        // Out of the event loop's hands, still non-blocking: tokio's own
        // `try_read` would not even try before the loop has seen the socket
        // readable, and a socket just accepted has not been looked at yet.
        let Ok(mut stream) = stream.into_std() else {
            return false;
        };
        let mut head = [0u8; 16];
        let mut got = 0;
        let mut chunk = [0u8; 1024];
        let mut read = 0;
        while read < REFUSE_AT_ONCE_READ {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let take = n.min(head.len() - got);
                    head[got..got + take].copy_from_slice(&chunk[..take]);
                    got += take;
                    read += n;
                }
            }
        }
        let Peek::Connect(version) = peek_version(&head[..got]) else {
            return false;
        };
        let codec = codec::Codec::new(version, self.config.max_payload_size as usize);
        let mut out = BytesMut::new();
        let Ok(Some(packet_type)) =
            codec.encode(session::refusing_connack(version, full_code(version)), &mut out)
        else {
            return false;
        };
        if stream.write(&out).ok() != Some(out.len()) {
            return false;
        }
        self.metrics.packet_sent(packet_type);
        self.metrics.bytes_sent.inc_by(out.len() as u64);
        true
    }

    /// Takes over a WebSocket connection whose upgrade selected the `mqtt`
    /// subprotocol. Its WebSocket permit stays held by the caller; the MQTT
    /// limit applies as well.
    pub async fn serve_websocket(
        self: Rc<Self>,
        ws: WebSocketStream<crate::ws::stream::Stream>,
        peer: SocketAddr,
    ) {
        let transport = Transport::Ws(Box::new(ws));
        match self.limit.try_acquire() {
            Some(_permit) => session::run(transport, peer, self.clone()).await,
            None => {
                self.metrics.refuse("capacity");
                refuse_full(transport, &self).await;
            }
        }
    }
}

/// Serves one TCP connection on the MQTT port: its TLS handshake, if any,
/// then the session. A function returning an `async move` block, as
/// [`session::run`] is, and the TLS handshake boxed (1.3 KB of state that
/// only a TLS client's first moments need): this future is the task that
/// lives as long as the connection.
#[allow(clippy::manual_async_fn)] // deliberate, see above
fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    server: Rc<MqttServer>,
) -> impl Future<Output = ()> {
    async move {
        let _permit = permit;
        let transport = match &server.tls {
            None => Transport::Tcp(stream),
            Some(acceptor) => {
                // The handshake counts against the CONNECT deadline.
                let handshake = tokio::time::timeout(server.config.connect_timeout, acceptor.accept(stream));
                match Box::pin(handshake).await {
                    Ok(Ok(tls)) => Transport::Tls(Box::new(tls)),
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        server.metrics.refuse("tls");
                        return;
                    }
                    Err(_) => {
                        server.metrics.refuse("connect_timeout");
                        return;
                    }
                }
            }
        };
        session::run(transport, peer, server).await;
    }
}

/// A refusal slot ([`MAX_CONCURRENT_REFUSALS`]), given back when dropped,
/// however the refusal ends.
struct RefusalSlot(Rc<MqttServer>);

impl RefusalSlot {
    fn take(server: &Rc<MqttServer>) -> Option<RefusalSlot> {
        let taken = server.refusing.get();
        (taken < MAX_CONCURRENT_REFUSALS).then(|| {
            server.refusing.set(taken + 1);
            RefusalSlot(server.clone())
        })
    }
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.0.refusing.set(self.0.refusing.get() - 1);
    }
}

/// The CONNACK code for a server at its limit: 3.1.1's "server
/// unavailable", MQTT 5's "quota exceeded".
fn full_code(version: Version) -> ConnectReturnCode {
    match version {
        Version::V311 => ConnectReturnCode::ServiceUnavailable,
        Version::V5 => ConnectReturnCode::QuotaExceeded,
    }
}

/// Answers a client over the limit: reads its CONNECT (for the version),
/// then CONNACK "server unavailable" (3.1.1) or 0x97 "quota exceeded" (5).
async fn refuse_full(mut transport: Transport, server: &MqttServer) {
    let mut buf = BytesMut::new();
    let version = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        loop {
            match peek_version(&buf) {
                Peek::Connect(version) => return Some(version),
                Peek::UnsupportedLevel(_) | Peek::NotConnect => return None,
                Peek::Incomplete => match transport.read(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
            }
        }
    })
    .await;
    if let Ok(Some(version)) = version {
        session::write_connack(&mut transport, version, full_code(version), server).await;
    }
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        transport.close(Goodbye::Normal).await;
        transport.drain().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    /// An MQTT server with its router, for 10 connections, without TLS.
    async fn test_server(config: &Config, metrics: &Metrics) -> (Rc<MqttServer>, Rc<ConnectionLimit>) {
        let (broker, _watch) = Broker::start(&config.mqtt, 10, metrics.mqtt.clone(), None).await.unwrap();
        let limit = ConnectionLimit::new(10, Default::default());
        let server = MqttServer::new(
            config.mqtt.clone(),
            metrics.mqtt.clone(),
            Rc::new(Shutdown::new()),
            limit.clone(),
            broker,
            None,
            auth::Access::default(),
            Rc::new(MemoryBudget::unlimited()),
        );
        (server, limit)
    }

    /// Past the refusal bound, a client whose CONNECT is already in is
    /// refused at once with the CONNACK of its version; one whose CONNECT
    /// is not is closed without one.
    #[tokio::test]
    async fn past_the_refusal_bound_a_connect_already_in_is_answered_at_once() {
        use std::io::{Read, Write};
        let config = Config::default();
        let metrics = Arc::new(Metrics::new(1024, None));
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let (server, _limit) = test_server(&config, &metrics).await;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let connect = |level: u8| {
                    let mut body = b"\x00\x04MQTT".to_vec();
                    body.extend_from_slice(&[level, 0x02, 0, 30]);
                    if level == 5 {
                        body.push(0);
                    }
                    body.extend_from_slice(b"\x00\x01c");
                    let mut packet = vec![0x10, body.len() as u8];
                    packet.extend(body);
                    packet
                };
                for (level, connack) in
                    [(4u8, &[0x20u8, 0x02, 0x00, 0x03][..]), (5, &[0x20, 0x03, 0x00, 0x97, 0x00])]
                {
                    let mut client = std::net::TcpStream::connect(addr).unwrap();
                    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    client.write_all(&connect(level)).unwrap();
                    // Pipelined after the CONNECT, as some clients do.
                    client.write_all(&[0xc0, 0x00]).unwrap();
                    let (accepted, _) = listener.accept().await.unwrap();
                    // Let the bytes arrive before the server looks.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    assert!(server.refuse_at_once(accepted), "level {level}");
                    let mut answer = Vec::new();
                    client.read_to_end(&mut answer).expect("a CONNACK, then a clean close (no reset)");
                    assert_eq!(answer, connack, "level {level}");
                }
                let mut silent = std::net::TcpStream::connect(addr).unwrap();
                silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let (accepted, _) = listener.accept().await.unwrap();
                assert!(!server.refuse_at_once(accepted));
                let mut answer = Vec::new();
                silent.read_to_end(&mut answer).unwrap();
                assert!(answer.is_empty(), "closed without a CONNACK");
                assert_eq!(metrics.mqtt.bytes_sent.get(), 4 + 5);
            })
            .await;
    }

    /// What one idle MQTT connection costs, and where it goes. Our side is
    /// the session task (its future, allocated once per connection); the
    /// queues rumqttd allocates per link are listed for docs/mqtt.md.
    #[tokio::test]
    async fn a_session_costs_a_small_future() {
        let config = Config::default();
        let metrics = Arc::new(Metrics::new(1024, None));
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let (server, limit) = test_server(&config, &metrics).await;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
                let (accepted, peer) = listener.accept().await.unwrap();
                let session = serve_tcp(accepted, peer, limit.try_acquire().unwrap(), server);
                let size = std::mem::size_of_val(&session);
                let packet = std::mem::size_of::<rumqttd::protocol::Packet>();
                let notification = std::mem::size_of::<rumqttd::Notification>();
                println!("MQTT session future: {size} bytes");
                println!(
                    "rumqttd per link: LinkRx cache 100 x {notification} B = {} B; router: incoming 200 x {packet} B = {} B, \
                     outgoing 200 x {notification} B = {} B",
                    100 * notification,
                    200 * packet,
                    200 * notification
                );
                // 2,040 bytes before Transport::read, LinkRx::next and the wake
                // kept less across their waits (1,480 after), 1,336 once
                // `serve_tcp` and `session::run` stopped keeping their
                // arguments twice and the TLS handshake was boxed (release:
                // a 1,408-byte task instead of 1,536); tokio rounds a task
                // up to a multiple of 128 bytes. 1,168 once the keep-alive,
                // shutdown and write timers left the future (`session::alarms`,
                // `session::within`; release: a 1,280-byte task, the bound).
                assert!(size <= 1280, "the per-connection MQTT future grew to {size} bytes");
            })
            .await;
    }
}
