//! One MQTT connection, from its first byte to its close.
//!
//! 1. **CONNECT** ([`handshake`]): read within `connect_timeout`; the
//!    protocol level picks the codec; credentials, client id and will are
//!    checked here, so a refusal is a CONNACK with the right code (rumqttd's
//!    router would drop the client without one), except for a malformed
//!    3.1.1 CONNECT, which 3.1.1 answers by closing.
//! 2. **Link**: the client is registered with the router, awaiting its
//!    answer without blocking the event loop (see [`broker`](super::broker));
//!    the router's CONNACK (session present or not) goes to the client.
//! 3. **Exchange** ([`exchange`]): one task waits on three things at once —
//!    bytes from the client, notifications from the router, the keep-alive
//!    deadline (and shutdown). Packets read are checked, counted and pushed
//!    to the router as one batch with one wake-up; notifications are
//!    encoded for the client's version and written as one batch.
//!    Between bursts the task holds no read or write buffer.
//!
//! Whatever ends the session — the client, a protocol error, a write
//! timeout, shutdown, or a panic — dropping [`RouterLink`] tells the router
//! the client is gone, so no session is ever left registered.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use prometheus_client::metrics::gauge::Gauge;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties, DisconnectReasonCode,
    LastWill, LastWillProperties, Packet, PingResp, PubAckReason, PubCompReason, PubRecReason, SubAck,
};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::MqttServer;
use super::ackorder::{AckOrder, Answer};
use super::acl::SessionAcl;
use super::auth;
use super::broker::{ClientLimits, LinkFailure, SessionExpiry};
use super::caps::{self, Held, InFlight, Quota};
use super::codec::{Codec, DecodeError, Decoded, Peek, Version, peek_version};
use super::inflow::{Flow, Inflow, RECHECK, Turn};
use super::topics::{self, FilterRefusal, Refusals, TopicRefusal};
use super::transport::{Goodbye, Transport};
use crate::budget::{Charges, PAUSE_LIMIT, PAUSE_PARTIAL, subscription_cost};
use crate::metrics::MqttMetrics;

/// How soon a session paused by the memory budget looks again.
const BUDGET_RECHECK: Duration = Duration::from_millis(10);

/// The link to the router for one session. Dropping it while the router
/// still knows the client sends the router a DISCONNECT for it, so that a
/// session that ends in any way — including a panic — is removed.
struct RouterLink {
    tx: LinkTx,
    rx: LinkRx,
    /// False once the router has dropped this client (take-over, a publish
    /// it refused) or been told it is gone.
    registered: bool,
}

impl RouterLink {
    /// Tells the router the client is gone, with the session expiry its
    /// DISCONNECT asked for.
    fn leave(&mut self, expiry: SessionExpiry) {
        if std::mem::take(&mut self.registered) {
            let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
            let properties = DisconnectProperties {
                session_expiry_interval: Some(expiry.0),
                reason_string: None,
                user_properties: Vec::new(),
                server_reference: None,
            };
            let _ = super::broker::hand_over(&mut self.tx, Packet::Disconnect(bye, Some(properties)));
        }
    }
}

impl Drop for RouterLink {
    fn drop(&mut self) {
        if self.registered {
            let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
            let _ = super::broker::hand_over(&mut self.tx, Packet::Disconnect(bye, None));
        }
    }
}

/// A CONNECT that passed every check.
struct Accepted {
    codec: Codec,
    client_id: String,
    assigned_id: bool,
    /// Clean session (3.1.1) or clean start (5): the session starts anew.
    clean_session: bool,
    /// How long the session outlives the connection; an MQTT 5 client may
    /// change it in its DISCONNECT.
    session_expiry: SessionExpiry,
    /// The client's DISCONNECT changed `session_expiry`: the router is told.
    expiry_changed: bool,
    keep_alive: u16,
    /// Boxed: most clients have none, and this struct lives as long as
    /// the connection.
    will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
    will_delay: Duration,
    /// What the client holds in the server, against the caps.
    held: Held,
    /// What the client may publish and subscribe to, when `mqtt.acl_file`
    /// is set. Boxed: it lives as long as the connection.
    acl: Option<Box<SessionAcl>>,
}

/// How the CONNECT phase ended when it did not end in a session.
enum Refused {
    /// Nothing to answer (the client left, timed out, or is not MQTT).
    Silently(&'static str),
    /// Answer with this CONNACK code, then close.
    With(Version, ConnectReturnCode, &'static str),
}

/// Serves one connection until it closes. The caller holds the permit.
///
/// The CONNECT phase and the closing phase run boxed: their state (the
/// CONNECT's fields, refusal and CONNACK writes, timers) is allocated only
/// while they run, so the future that lives as long as the connection holds
/// little more than the exchange loop.
pub async fn run(mut transport: Transport, peer: SocketAddr, server: Rc<MqttServer>) {
    let mut rbuf = BytesMut::new();
    let Some((mut session, mut router)) = Box::pin(open(&mut transport, &mut rbuf, peer, &server)).await
    else {
        return;
    };
    let counted = Counted::open(&server.metrics, session.codec.version);
    let end = exchange(&mut transport, &mut rbuf, &mut router, &mut session, &server).await;
    server.kept.disconnected(&session.client_id, &session.held.filters, session.session_expiry);
    server.broker.client_left(&session.client_id);
    counted.close(end.reason);
    debug!(%peer, client_id = %session.client_id, reason = end.reason, "session ended");
    // The closing phase runs on a turn too (the same ones as CONNECTs): when
    // thousands of clients leave at once (a network blip, a load test's
    // end), their sessions all wake together, and the closes — a FIN, the
    // will, telling the router — would otherwise run back to back while
    // every other client waited: measured, 5,000 MQTT clients disconnecting
    // together held the event loop for 60–100 ms in one go (WebSocket echo
    // p99 70 ms); on turns, the work is the same but the others are served
    // in between (p99 2–3 ms). The turn is held across one yield, or every
    // session would take a free turn, close and give it back within one
    // poll, and the turns would pace nothing; and for at most
    // `TURN_PATIENCE`, so that clients that are slow to close (a polite
    // close waits for the client's FIN) cannot hold the turns.
    let mut turn = server.connecting.acquire().await.ok();
    tokio::task::yield_now().await;
    {
        let mut finishing = Box::pin(finish(&mut transport, &session, end, &server));
        tokio::select! {
            biased;
            _ = &mut finishing => {}
            _ = tokio::time::sleep(TURN_PATIENCE) => {
                turn = None;
                finishing.await;
            }
        }
    }
    if session.expiry_changed {
        router.leave(session.session_expiry);
    }
    drop(router);
    drop(transport);
    drop(turn);
}

/// An open session in `/metrics`: one in the connections gauge of its
/// version while it runs, one in `closed_total` with its reason when it
/// ends. A drop guard, so that the figures stay true however the session
/// ends: a task that unwinds from a panic (tokio catches it: the other
/// sessions run on) is counted closed with reason `panic`.
struct Counted<'a> {
    metrics: &'a MqttMetrics,
    gauge: Gauge,
    reason: Option<&'static str>,
}

impl<'a> Counted<'a> {
    fn open(metrics: &'a MqttMetrics, version: Version) -> Counted<'a> {
        let gauge = match version {
            Version::V311 => metrics.v311.clone(),
            Version::V5 => metrics.v5.clone(),
        };
        gauge.inc();
        Counted { metrics, gauge, reason: None }
    }

    fn close(mut self, reason: &'static str) {
        self.reason = Some(reason);
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
        let reason = match self.reason {
            Some(reason) => reason,
            None if std::thread::panicking() => "panic",
            // The task was dropped without finishing (the runtime going away).
            None => "aborted",
        };
        self.metrics.closed(reason);
    }
}

/// How long a new connection may hold a CONNECT turn before its CONNECT
/// has arrived (see [`open`]).
const TURN_PATIENCE: Duration = Duration::from_millis(50);

/// The CONNECT phase: checks, the link to the router, the CONNACK.
async fn open(
    transport: &mut Transport,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    server: &MqttServer,
) -> Option<(Accepted, RouterLink)> {
    let metrics = &server.metrics;
    let deadline = Instant::now() + server.config.connect_timeout;
    // Once the client has sent its first bytes, the CONNECT phase — reading
    // and checking the CONNECT, router registration, CONNACK — runs on a
    // turn (`mqtt.connect_concurrency`). In a connect storm thousands of
    // sessions are ready at once; if all of them did that work at once,
    // every WebSocket echo and MQTT message of the clients already
    // connected would queue behind them on the one event loop. With a few
    // turns, the storm's work is spread out and everyone else is served in
    // between (a session waiting for a turn costs one poll). A client that
    // has not sent its whole CONNECT within `TURN_PATIENCE` gives its turn
    // back and waits for a new one once its CONNECT is in, so slow or
    // silent clients cannot hold the turns.
    let arrived = tokio::select! {
        biased;
        _ = server.shutdown.wait() => Err(Refused::Silently("shutdown")),
        arrived = timeout_at(deadline, transport.readable()) => {
            arrived.map_err(|_| Refused::Silently("connect_timeout"))
        }
    };
    if let Err(refused) = arrived {
        refuse(transport, refused, server).await;
        return None;
    }
    let mut turn = tokio::select! {
        biased;
        _ = server.shutdown.wait() => None,
        turn = server.connecting.acquire() => turn.ok(),
    };
    if turn.is_none() {
        refuse(transport, Refused::Silently("shutdown"), server).await;
        return None;
    }
    let accepted = {
        let handshake = handshake(transport, rbuf, server);
        tokio::pin!(handshake);
        let patience = deadline.min(Instant::now() + TURN_PATIENCE);
        let first = tokio::select! {
            biased;
            _ = server.shutdown.wait() => Some(Err(Refused::Silently("shutdown"))),
            result = timeout_at(patience, &mut handshake) => result.ok(),
        };
        match first {
            Some(result) => result,
            None => {
                turn = None;
                tokio::select! {
                    biased;
                    _ = server.shutdown.wait() => Err(Refused::Silently("shutdown")),
                    result = timeout_at(deadline, &mut handshake) => {
                        result.unwrap_or(Err(Refused::Silently("connect_timeout")))
                    }
                }
            }
        }
    };
    let (mut accepted, limits) = match accepted {
        Ok(accepted) => accepted,
        Err(refused) => {
            drop(turn);
            refuse(transport, refused, server).await;
            return None;
        }
    };
    let _turn = match turn {
        Some(turn) => turn,
        None => tokio::select! {
            biased;
            _ = server.shutdown.wait() => return None,
            turn = server.connecting.acquire() => turn.ok()?,
        },
    };
    let version = accepted.codec.version;
    server.broker.client_returned(&accepted.client_id, accepted.clean_session);
    let link = tokio::select! {
        biased;
        _ = server.shutdown.wait() => Err(LinkFailure::RouterGone),
        link = server.broker.link(&accepted.client_id, accepted.clean_session, accepted.session_expiry, limits) => link,
    };
    let link = match link {
        Ok(link) => link,
        Err(e) => {
            debug!(%peer, error = %e, "router did not take the client");
            let reason = if server.shutdown.is_triggered() { "shutdown" } else { "router" };
            let code = if version == Version::V5 {
                ConnectReturnCode::ServerBusy
            } else {
                ConnectReturnCode::ServiceUnavailable
            };
            write_connack(transport, version, code, server).await;
            metrics.refuse(reason);
            transport.close(Goodbye::for_refusal(reason, false)).await;
            return None;
        }
    };
    let router = RouterLink { tx: link.tx, rx: link.rx, registered: true };
    let session_present = match Option::<Packet>::from(link.connack) {
        Some(Packet::ConnAck(ack, _)) => ack.session_present,
        _ => false,
    };
    let mut connack = ConnAckProperties {
        // The router forwards nothing bigger than this to its subscribers.
        max_packet_size: Some(server.config.max_payload_size),
        retain_available: Some(1),
        wildcard_subscription_available: Some(1),
        shared_subscription_available: Some(1),
        // The caps a client can see, so that a conforming MQTT 5 client
        // never crosses them (see `caps`).
        receive_max: Some(server.config.receive_maximum),
        topic_alias_max: Some(server.config.topic_alias_maximum),
        ..ConnAckProperties::default()
    };
    if accepted.assigned_id {
        connack.assigned_client_identifier = Some(accepted.client_id.clone());
    }
    let ack = ConnAck { session_present, code: ConnectReturnCode::Success };
    let mut out = BytesMut::new();
    let packets = vec![Packet::ConnAck(ack, Some(connack))];
    if send(transport, &accepted.codec, packets, &mut out, server).await.is_err() {
        metrics.closed("reset");
        publish_will(server, &accepted);
        return None;
    }
    metrics.connected(version.label());
    server.broker.client_connected(&accepted.client_id);
    accepted.held.filters =
        server.kept.connected(&accepted.client_id, session_present, accepted.session_expiry);
    if let Some(acl) = &accepted.acl {
        server.kept.set_owner(&accepted.client_id, acl.username());
    }
    debug!(
        %peer,
        client_id = %accepted.client_id,
        version = version.label(),
        transport = transport.name(),
        "connected"
    );
    Some((accepted, router))
}

/// The closing phase: the will, MQTT 5's DISCONNECT with its reason, and a
/// polite close, all within the shutdown grace when shutting down.
async fn finish(transport: &mut Transport, session: &Accepted, end: End, server: &MqttServer) {
    if end.will {
        publish_will(server, session);
    }
    let grace = server.shutdown.deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
    if let Some(code) = end.disconnect
        && session.codec.version == Version::V5
    {
        let bye = Packet::Disconnect(Disconnect { reason_code: code }, None);
        let mut out = BytesMut::new();
        let _ = tokio::time::timeout_at(grace, send(transport, &session.codec, vec![bye], &mut out, server))
            .await;
    }
    if end.polite_close {
        let _ = tokio::time::timeout_at(grace, async {
            transport.close(Goodbye::after_session(end.disconnect, server.shutdown.is_triggered())).await;
            transport.drain().await;
        })
        .await;
    }
}

/// Publishes the session's will, if it has one.
fn publish_will(server: &MqttServer, accepted: &Accepted) {
    if let Some(will) = accepted.will.clone() {
        let (will, properties) = *will;
        server.broker.publish_will(&accepted.client_id, will, properties, accepted.will_delay);
    }
}

/// Reads and checks the CONNECT. What the client announced it can take
/// goes to the router with its link and is not kept in the session.
async fn handshake(
    transport: &mut Transport,
    rbuf: &mut BytesMut,
    server: &MqttServer,
) -> Result<(Accepted, ClientLimits), Refused> {
    let max = server.config.max_payload_size as usize;
    let version = loop {
        match peek_version(rbuf) {
            Peek::Connect(version) => break version,
            Peek::NotConnect => return Err(Refused::Silently("not_connect")),
            // 3.1.1 §3.1.2.2: answer an unsupported level with code 1.
            Peek::UnsupportedLevel(level) if level < 5 => {
                return Err(Refused::With(
                    Version::V311,
                    ConnectReturnCode::RefusedProtocolVersion,
                    "protocol_version",
                ));
            }
            Peek::UnsupportedLevel(_) => {
                return Err(Refused::With(
                    Version::V5,
                    ConnectReturnCode::UnsupportedProtocolVersion,
                    "protocol_version",
                ));
            }
            Peek::Incomplete => read_more(transport, rbuf).await?,
        }
    };
    let codec = Codec::new(version, max);
    // Until it is connected (and authenticated), a client may make the
    // server buffer only a small CONNECT.
    let connecting = Codec::new(version, max.min(server.config.max_connect_size as usize));
    let decoded = loop {
        match connecting.decode(rbuf) {
            Ok(Some(decoded)) => break decoded,
            Ok(None) => read_more(transport, rbuf).await?,
            Err(DecodeError::TooLarge(_)) => {
                return Err(Refused::With(version, ConnectReturnCode::PacketTooLarge, "too_large"));
            }
            // Well formed, but against MQTT 5 (§2.2.2.2): 0x82, not 0x81.
            Err(DecodeError::RepeatedProperty(_)) => {
                return Err(Refused::With(version, ConnectReturnCode::ProtocolError, "protocol_error"));
            }
            Err(e) => {
                debug!(error = %e, "malformed CONNECT");
                return Err(malformed_connect(version));
            }
        }
    };
    server.metrics.packet_received(decoded.packet_type);
    server.metrics.bytes_received.inc_by(decoded.size as u64);
    let Packet::Connect(connect, properties, will, will_properties, login) = decoded.packet else {
        return Err(Refused::Silently("not_connect"));
    };
    // MQTT 5 §4.12: this server offers no enhanced authentication (it
    // refuses every AUTH packet), so a client asking for it is refused and
    // closed (0x8C); authentication data without a method is a protocol
    // error (§3.1.2.11.10).
    if let Some(p) = &properties {
        if p.authentication_method.is_some() {
            return Err(Refused::With(
                version,
                ConnectReturnCode::BadAuthenticationMethod,
                "bad_auth_method",
            ));
        }
        if p.authentication_data.is_some() {
            return Err(Refused::With(version, ConnectReturnCode::ProtocolError, "protocol_error"));
        }
        // §3.1.2.11.3-4: a Receive Maximum or Maximum Packet Size of 0 is a
        // protocol error.
        if p.receive_maximum == Some(0) || p.max_packet_size == Some(0) {
            return Err(Refused::With(version, ConnectReturnCode::ProtocolError, "protocol_error"));
        }
    }
    let limits = properties.as_ref().map_or_else(ClientLimits::default, |p| ClientLimits {
        receive_maximum: p.receive_maximum,
        max_packet_size: p.max_packet_size,
    });
    // A password file's check runs on a blocking thread (see `auth`).
    let passwords = server.access.passwords.as_ref();
    if !auth::authenticate(server.credentials.as_ref(), passwords, login.as_ref()).await {
        return Err(Refused::With(version, ConnectReturnCode::BadUserNamePassword, "bad_credentials"));
    }
    // A session is more memory: none while the budget is spent (3.1.1
    // gets code 3, server unavailable, from the downgrade).
    if !server.budget.allows("connect") {
        return Err(Refused::With(version, ConnectReturnCode::QuotaExceeded, "memory_limit"));
    }
    let mut client_id = connect.client_id;
    let mut assigned_id = false;
    if client_id.is_empty() {
        // 3.1.1 §3.1.3.1: an empty id needs a clean session.
        if !connect.clean_session && version == Version::V311 {
            return Err(Refused::With(version, ConnectReturnCode::ClientIdentifierNotValid, "client_id"));
        }
        client_id = server.assign_client_id();
        assigned_id = true;
    } else if client_id.contains(['\0', '+', '#', '/', '$']) {
        // The router refuses these characters (silently); NUL is not
        // allowed in MQTT strings and marks the server's own link.
        return Err(Refused::With(version, ConnectReturnCode::ClientIdentifierNotValid, "client_id"));
    } else if let Err(cap) = caps::client_id(&client_id, &server.config) {
        // 3.1.1 §3.1.3.1 lets a server refuse any id with code 2.
        server.metrics.cap_refused(cap.label());
        return Err(Refused::With(version, ConnectReturnCode::ClientIdentifierNotValid, "client_id"));
    }
    // 3.1.1 §3.1.2.4, 5 §3.1.2.11.2 (absent is 0).
    let session_expiry = match version {
        Version::V311 if connect.clean_session => SessionExpiry::AT_DISCONNECT,
        Version::V311 => SessionExpiry::NEVER,
        Version::V5 => {
            SessionExpiry(properties.as_ref().and_then(|p| p.session_expiry_interval).unwrap_or(0))
        }
    };
    // The ACL's rules for this client, by the username it logged in with
    // (none, or an empty one: the anonymous section) and its client id.
    let username = login.as_ref().map(|l| l.username.as_str()).filter(|u| !u.is_empty());
    let mut acl = server
        .access
        .acl
        .as_ref()
        .map(|acl| Box::new(SessionAcl::new(acl.for_client(username, &client_id), username)));
    let delay = will_properties.as_ref().and_then(|p| p.delay_interval).unwrap_or(0);
    // The will goes to the router later, through the server's own link, as
    // it is: a topic the router refuses would end that link (see
    // `broker`), so it is checked here, with the CONNECT.
    if let Some(w) = &will {
        let checked = topics::check_topic(&w.topic, false).and_then(|()| {
            caps::topic(&w.topic, &server.config).map_err(|cap| {
                server.metrics.cap_refused(cap.label());
                TopicRefusal::Wildcard
            })
        });
        match checked {
            Ok(()) => {}
            Err(TopicRefusal::Malformed) => return Err(malformed_connect(version)),
            // MQTT 5 §3.2.2.2: 0x90, "the Will Topic Name is not malformed,
            // but is not accepted by this Server" (also one over the length
            // or level caps). 3.1.1 has no code for it:
            // the CONNECT does not conform, so no CONNACK (§3.1.4).
            Err(TopicRefusal::Wildcard | TopicRefusal::Empty) => {
                return Err(match version {
                    Version::V5 => {
                        Refused::With(version, ConnectReturnCode::TopicNameInvalid, "invalid_topic")
                    }
                    Version::V311 => Refused::Silently("invalid_topic"),
                });
            }
        }
        // A will is a publish, checked now (Mosquitto does the same): it
        // could not be refused when it is due. `$` topics are the server's.
        if topics::server_only(&w.topic) || acl.as_mut().is_some_and(|acl| !acl.may_publish(&w.topic, None)) {
            server.metrics.acl_denied("publish");
            return Err(Refused::With(version, ConnectReturnCode::NotAuthorized, "not_authorized"));
        }
    }
    // A kept session that another user (or no user) connected with holds
    // subscriptions checked against that user's rules: this one starts
    // anew instead of resuming it.
    let mut clean_session = connect.clean_session;
    if acl.is_some()
        && !clean_session
        && server.kept.owner(&client_id).is_some_and(|owner| owner.as_deref() != username)
    {
        clean_session = true;
    }
    let accepted = Accepted {
        codec,
        client_id,
        assigned_id,
        clean_session,
        session_expiry,
        expiry_changed: false,
        keep_alive: connect.keep_alive,
        will: will.map(|w| Box::new((w, will_properties))),
        will_delay: Duration::from_secs(u64::from(delay.min(session_expiry.0))),
        held: Held::default(),
        acl,
    };
    Ok((accepted, limits))
}

/// A CONNECT that is not well formed. MQTT 5 may say so with CONNACK 0x81
/// before closing (§3.1.4, §4.13); MQTT 3.1.1 closes without a CONNACK
/// (§3.1.4: "close the Network Connection without sending a CONNACK").
fn malformed_connect(version: Version) -> Refused {
    match version {
        Version::V5 => Refused::With(version, ConnectReturnCode::MalformedPacket, "malformed"),
        Version::V311 => Refused::Silently("malformed"),
    }
}

async fn read_more(transport: &mut Transport, rbuf: &mut BytesMut) -> Result<(), Refused> {
    match transport.read(rbuf).await {
        Ok(0) | Err(_) => Err(Refused::Silently("disconnected")),
        Ok(_) => Ok(()),
    }
}

/// Answers a CONNECT that will not become a session, and closes.
async fn refuse(transport: &mut Transport, refused: Refused, server: &MqttServer) {
    match refused {
        Refused::Silently(reason) => {
            server.metrics.refuse(reason);
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                transport.close(Goodbye::for_refusal(reason, false)),
            )
            .await;
        }
        Refused::With(version, code, reason) => {
            server.metrics.refuse(reason);
            write_connack(transport, version, code, server).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                transport.close(Goodbye::for_refusal(reason, false)).await;
                transport.drain().await;
            })
            .await;
        }
    }
}

/// Writes a refusing CONNACK in the client's version (3.1.1 codes are
/// mapped from the MQTT 5 reason).
pub async fn write_connack(
    transport: &mut Transport,
    version: Version,
    code: ConnectReturnCode,
    server: &MqttServer,
) {
    let codec = Codec::new(version, server.config.max_payload_size as usize);
    let mut out = BytesMut::new();
    let _ = send(transport, &codec, vec![refusing_connack(version, code)], &mut out, server).await;
}

/// A CONNACK that refuses the client with `code` (3.1.1 codes are mapped
/// from the MQTT 5 reason when it is encoded).
pub fn refusing_connack(version: Version, code: ConnectReturnCode) -> Packet {
    let ack = ConnAck { session_present: false, code };
    match version {
        Version::V311 => Packet::ConnAck(ack, None),
        Version::V5 => Packet::ConnAck(ack, Some(ConnAckProperties::default())),
    }
}

/// Encodes packets and writes them in one go, within `write_timeout`.
async fn send(
    transport: &mut Transport,
    codec: &Codec,
    packets: Vec<Packet>,
    out: &mut BytesMut,
    server: &MqttServer,
) -> Result<(), &'static str> {
    let metrics = &server.metrics;
    for packet in packets {
        match codec.encode(packet, out) {
            Ok(Some(packet_type)) => {
                metrics.packet_sent(packet_type);
                if packet_type == 3 {
                    metrics.publishes_sent.inc();
                }
            }
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "a packet could not be encoded; dropped");
            }
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    let written = tokio::time::timeout(server.config.write_timeout, transport.write_all(out)).await;
    let len = out.len() as u64;
    // Nothing stays allocated between bursts.
    *out = BytesMut::new();
    match written {
        Ok(Ok(())) => {
            metrics.bytes_sent.inc_by(len);
            Ok(())
        }
        Ok(Err(_)) => Err("reset"),
        Err(_) => Err("write_timeout"),
    }
}

/// How the exchange ended.
struct End {
    reason: &'static str,
    /// Publish the will (the connection ended without a normal DISCONNECT).
    will: bool,
    /// The DISCONNECT reason to send an MQTT 5 client, if any.
    disconnect: Option<DisconnectReasonCode>,
    /// Close with FIN and drain (false when the socket is already dead).
    polite_close: bool,
}

impl End {
    fn lost(reason: &'static str) -> End {
        End { reason, will: true, disconnect: None, polite_close: false }
    }

    fn violation(reason: &'static str, code: DisconnectReasonCode) -> End {
        End { reason, will: true, disconnect: Some(code), polite_close: true }
    }
}

/// What woke the exchange loop.
enum Wake {
    Shutdown,
    /// `Err`: the router dropped this client.
    Router(Result<RouterBatch, ()>),
    /// This many bytes were read (0: packets left in the read buffer by a
    /// spent turn are to be decoded).
    Client(std::io::Result<usize>),
    /// The client closed the connection.
    Closed,
    KeepAlive,
}

/// The exchange between the client and the router, until one side ends it.
async fn exchange(
    transport: &mut Transport,
    rbuf: &mut BytesMut,
    router: &mut RouterLink,
    session: &mut Accepted,
    server: &MqttServer,
) -> End {
    let codec = session.codec.clone();
    let v5 = codec.version == Version::V5;
    // 1.5 times the client's keep-alive (MQTT 3.1.1 §3.1.2.10); 0 means none.
    let keep_alive =
        (session.keep_alive > 0).then(|| Duration::from_millis(u64::from(session.keep_alive) * 1500));
    let mut heard = Instant::now();
    let far = Duration::from_secs(86_400 * 365);
    let timer = tokio::time::sleep(keep_alive.unwrap_or(far));
    tokio::pin!(timer);
    let mut awaiting = Awaiting {
        refusals: Refusals::default(),
        charges: Charges::new(&server.budget),
        acks: AckOrder::default(),
    };
    let mut out = BytesMut::new();
    let mut turn = Turn::default();
    let mut inflow = Inflow::default();
    // Bytes already read with the CONNECT are handled first; `buffered`
    // stays true while the read buffer may hold whole packets that a spent
    // turn left undecoded.
    let mut buffered = !rbuf.is_empty();
    // Since when the memory budget has kept this client from being read.
    let mut starved_since: Option<Instant> = None;
    loop {
        turn.end_if_spent().await;
        let flow = inflow.flow(&router.tx);
        // Half-way through a large packet (what is buffered is not a
        // whole packet) while the memory budget is spent: the rest waits in
        // the kernel (see `budget`). Whole packets are still taken.
        let starved = !buffered && rbuf.len() >= PAUSE_PARTIAL && server.budget.spent();
        match (starved, starved_since) {
            (true, None) => {
                // Counted (and logged) like a refusal, once per pause.
                server.budget.allows("read");
                starved_since = Some(Instant::now());
            }
            (false, Some(_)) => starved_since = None,
            _ => {}
        }
        // Not while too many answers wait for the router's (see `ackorder`).
        let open = flow == Flow::Open && !awaiting.acks.is_full();
        if flow == Flow::FullUnannounced {
            timer.as_mut().reset(Instant::now() + RECHECK);
        } else if starved {
            timer.as_mut().reset(Instant::now() + BUDGET_RECHECK);
        }
        let wake = tokio::select! {
            biased;
            _ = server.shutdown.wait() => Wake::Shutdown,
            next = router.rx.next() => {
                Wake::Router(next.map(|first| collect(first, &mut router.rx, &mut awaiting, &mut session.held.in_flight, v5)).map_err(drop))
            }
            _ = std::future::ready(()), if open && buffered => Wake::Client(Ok(0)),
            read = transport.read(rbuf), if open && !buffered && !starved => match read {
                Ok(0) => Wake::Closed,
                read => Wake::Client(read),
            },
            _ = &mut timer => Wake::KeepAlive,
        };
        match wake {
            Wake::Shutdown => {
                return End {
                    reason: "shutdown",
                    will: false,
                    disconnect: Some(DisconnectReasonCode::ServerShuttingDown),
                    polite_close: true,
                };
            }
            Wake::KeepAlive => {
                if let Some(since) = starved_since {
                    if transport.peer_gone() {
                        return End::lost("client_closed");
                    }
                    // A client that walked away with the rest of its packet
                    // unsent never closes (its FIN waits behind that data),
                    // and what its session holds counts against the budget
                    // that keeps it paused: a bounded pause breaks the knot.
                    if since.elapsed() >= PAUSE_LIMIT {
                        return End::violation("memory_limit", DisconnectReasonCode::QuotaExceeded);
                    }
                }
                let limit = keep_alive.unwrap_or(far);
                if !open || starved {
                    // The client is not silent: we are not reading it (this
                    // is also the recheck of a queue full by bytes).
                    heard = Instant::now();
                }
                if heard.elapsed() >= limit {
                    return End::violation("keepalive_timeout", DisconnectReasonCode::KeepAliveTimeout);
                }
                timer.as_mut().reset(heard + limit);
            }
            Wake::Closed => return End::lost("client_closed"),
            Wake::Client(Err(_)) => return End::lost("reset"),
            Wake::Client(Ok(read)) => {
                heard = Instant::now();
                turn.read(read);
                let mut batch = Vec::new();
                let mut batch_bytes = 0;
                let mut replies = Vec::new();
                let mut end = None;
                buffered = false;
                while end.is_none() {
                    if turn.is_spent() || awaiting.acks.is_full() {
                        buffered = true;
                        break;
                    }
                    let decoded = match codec.decode(rbuf) {
                        Ok(Some(decoded)) => decoded,
                        Ok(None) => break,
                        Err(DecodeError::TooLarge(_)) => {
                            end = Some(End::violation("too_large", DisconnectReasonCode::PacketTooLarge));
                            break;
                        }
                        Err(e @ (DecodeError::NotFromClients(_) | DecodeError::RepeatedProperty(_))) => {
                            debug!(error = %e, "protocol error");
                            end = Some(End::violation("protocol_error", DisconnectReasonCode::ProtocolError));
                            break;
                        }
                        Err(e @ DecodeError::Malformed(_)) => {
                            debug!(error = %e, "malformed packet");
                            end = Some(End::violation("malformed", DisconnectReasonCode::MalformedPacket));
                            break;
                        }
                    };
                    turn.decoded(decoded.size);
                    batch_bytes += decoded.size;
                    end = incoming(decoded, session, &mut batch, &mut replies, &mut awaiting, server);
                }
                if rbuf.is_empty() {
                    // Payloads already split off keep their own memory alive
                    // for as long as the router needs them.
                    *rbuf = BytesMut::new();
                }
                if !batch.is_empty() {
                    inflow.push(&mut router.tx, batch, batch_bytes).await;
                }
                if !replies.is_empty()
                    && let Err(reason) = send(transport, &codec, replies, &mut out, server).await
                {
                    return End::lost(reason);
                }
                if let Some(end) = end {
                    return end;
                }
            }
            Wake::Router(Err(_)) => {
                // The router dropped this client: another connection took its
                // client id over (or the router is gone, which the broker
                // reports on its own).
                router.registered = false;
                return End {
                    reason: "taken_over",
                    will: true,
                    disconnect: Some(DisconnectReasonCode::SessionTakenOver),
                    polite_close: true,
                };
            }
            Wake::Router(Ok(batch)) => {
                if let Err(reason) = send(transport, &codec, batch.packets, &mut out, server).await {
                    return End::lost(reason);
                }
                if let Some(code) = batch.router_disconnect {
                    // The router refused something this client sent and has
                    // already forgotten it.
                    router.registered = false;
                    return End::violation("router_disconnect", code);
                }
                if batch.gone {
                    router.registered = false;
                    return End::violation("taken_over", DisconnectReasonCode::SessionTakenOver);
                }
                if batch.unscheduled {
                    // The router paused this client while its queue was full;
                    // now that it has been written, ask for more. Boxed: the
                    // send holds a router event (864 bytes), which would
                    // otherwise be room in every idle session's future.
                    let _ = Box::pin(router.rx.wake()).await;
                }
            }
        }
    }
}

/// What the session awaits from the router: the answers to SUBSCRIBEs
/// handed to it — with the filters refused before (put back into the
/// SUBACK) and what the memory budget has been charged for them — and the
/// acknowledgements that the session's own must follow.
struct Awaiting<'a> {
    refusals: Refusals,
    charges: Charges<'a>,
    acks: AckOrder,
}

/// What the router had ready for a client, as packets to write.
struct RouterBatch {
    packets: Vec<Packet>,
    /// The router paused the client (its queue was full) and waits for a
    /// `wake` once this is written.
    unscheduled: bool,
    /// The router dropped the client with this reason.
    router_disconnect: Option<DisconnectReasonCode>,
    /// The router forgot the client (taken over).
    gone: bool,
}

/// Takes everything the router has ready, starting with `first`, without
/// waiting: it all goes out in one write. Synchronous, so that no
/// notification (248 bytes each) is held in the session's future.
/// The client's in-flight window ([`InFlight`]) learns of the PUBACKs and
/// PUBCOMPs going out; the session's own answers held back for them go out
/// right after them ([`AckOrder`]).
fn collect(
    first: Option<Notification>,
    rx: &mut LinkRx,
    awaiting: &mut Awaiting,
    in_flight: &mut InFlight,
    v5: bool,
) -> RouterBatch {
    let mut batch =
        RouterBatch { packets: Vec::new(), unscheduled: false, router_disconnect: None, gone: false };
    let mut next = Some(Ok(first));
    while let Some(Ok(notification)) = next.take() {
        if let Some(notification) = notification {
            match notification {
                Notification::Unschedule => batch.unscheduled = true,
                Notification::Disconnect(disconnect, _) => {
                    batch.router_disconnect = Some(disconnect.reason_code)
                }
                other => match Option::<Packet>::from(other) {
                    Some(Packet::SubAck(ack, props)) => {
                        awaiting.charges.settle(ack.pkid);
                        batch.packets.push(Packet::SubAck(awaiting.refusals.complete(ack, v5), props));
                    }
                    Some(packet) => {
                        in_flight.sent(&packet);
                        awaiting.acks.pass(packet, &mut batch.packets);
                    }
                    None => {}
                },
            }
        }
        next = rx.next().now_or_never();
    }
    batch.gone = matches!(next, Some(Err(_)));
    batch
}

/// Handles one packet from the client. Returns how the session ends, if
/// this packet ends it.
fn incoming(
    decoded: Decoded,
    session: &mut Accepted,
    batch: &mut Vec<Packet>,
    replies: &mut Vec<Packet>,
    awaiting: &mut Awaiting,
    server: &MqttServer,
) -> Option<End> {
    let metrics = &server.metrics;
    metrics.packet_received(decoded.packet_type);
    metrics.bytes_received.inc_by(decoded.size as u64);
    let v5 = session.codec.version == Version::V5;
    match decoded.packet {
        Packet::Publish(mut publish, properties) => {
            metrics.publishes_received.inc();
            let alias = properties.as_ref().and_then(|p| p.topic_alias).filter(|_| v5);
            // Nothing the router would refuse goes to it: it drops the link
            // without a reason for a topic that is not UTF-8.
            match topics::check_topic(&publish.topic, alias.is_some()) {
                Ok(()) => {}
                Err(TopicRefusal::Malformed) => {
                    return Some(End::violation("malformed", DisconnectReasonCode::MalformedPacket));
                }
                Err(TopicRefusal::Wildcard) => {
                    return Some(End::violation("invalid_topic", DisconnectReasonCode::TopicNameInvalid));
                }
                // MQTT 5 §3.3.2.1: "a Protocol Error if the Topic Name is zero
                // length and there is no Topic Alias".
                Err(TopicRefusal::Empty) => {
                    return Some(End::violation("protocol_error", DisconnectReasonCode::ProtocolError));
                }
            }
            let config = &server.config;
            if let Some(alias) = alias
                && let Err(cap) = caps::topic_alias(alias, config)
            {
                // Alias 0 is a protocol violation, not a cap.
                if alias != 0 {
                    metrics.cap_refused(cap.label());
                }
                return Some(End::violation("topic_alias", DisconnectReasonCode::TopicAliasInvalid));
            }
            if let Err(cap) = caps::topic(&publish.topic, config) {
                metrics.cap_refused(cap.label());
                return Some(End::violation("invalid_topic", DisconnectReasonCode::TopicNameInvalid));
            }
            let qos = (decoded.flags >> 1) & 3;
            // `$` topics (`$SYS`) are the server's: refused as the ACL
            // refuses. (A topic alias set to one is not passed on either;
            // using it later finds the alias unknown to the router.)
            if topics::server_only(&publish.topic)
                || session.acl.as_mut().is_some_and(|acl| !acl.may_publish(&publish.topic, alias))
            {
                metrics.acl_denied("publish");
                refused_by_acl(publish.pkid(), qos, v5, &mut awaiting.acks, replies);
                return None;
            }
            if !server.budget.allows("publish") {
                let sets_alias = alias.is_some() && !publish.topic.is_empty();
                return over_budget(publish.pkid(), qos, sets_alias, v5, &mut awaiting.acks, replies);
            }
            if let Err(cap) = session.held.in_flight.received(qos, v5, config) {
                metrics.cap_refused(cap.label());
                return Some(End::violation("receive_maximum", DisconnectReasonCode::ReceiveMaximumExceeded));
            }
            detach(&mut publish);
            if qos > 0 {
                awaiting.acks.owed();
            }
            if qos == 2 {
                awaiting.acks.forwarded_qos2(publish.pkid());
            }
            batch.push(Packet::Publish(publish, properties));
        }
        Packet::Subscribe(mut subscribe, properties) => {
            let mut refused = Vec::new();
            let mut position = 0;
            let spent = !server.budget.allows("subscribe");
            subscribe.filters.retain(|filter| {
                let verdict = (if spent { Err(FilterRefusal::QuotaExceeded) } else { Ok(()) })
                    .and_then(|()| topics::check_filter(&filter.path, session.session_expiry.persistent()))
                    .and_then(|()| match &session.acl {
                        Some(acl) if !acl.may_subscribe(&filter.path) => {
                            metrics.acl_denied("subscribe");
                            Err(FilterRefusal::NotAuthorized)
                        }
                        _ => Ok(()),
                    })
                    .and_then(|()| {
                        caps::filter(&filter.path, &server.config).map_err(|cap| {
                            metrics.cap_refused(cap.label());
                            FilterRefusal::Invalid
                        })
                    })
                    .and_then(|()| {
                        match server.kept.subscribe(&session.held.filters, &filter.path, &server.config) {
                            Quota::Exceeded => {
                                metrics.cap_refused(caps::Cap::Subscriptions.label());
                                Err(FilterRefusal::QuotaExceeded)
                            }
                            Quota::Counted | Quota::Held => Ok(()),
                        }
                    });
                if let Err(reason) = verdict {
                    refused.push((position, reason));
                }
                position += 1;
                verdict.is_ok()
            });
            if subscribe.filters.is_empty() {
                // Nothing left for the router: the SUBACK is ours.
                let return_codes = refused.iter().map(|(_, reason)| reason.code(v5)).collect();
                replies.push(Packet::SubAck(SubAck { pkid: subscribe.pkid, return_codes }, None));
            } else {
                awaiting.refusals.remember(subscribe.pkid, refused);
                let cost = subscribe.filters.iter().map(|f| subscription_cost(f.path.len())).sum();
                awaiting.charges.charge(subscribe.pkid, cost);
                batch.push(Packet::Subscribe(subscribe, properties));
            }
        }
        Packet::PingReq(_) => replies.push(Packet::PingResp(PingResp)),
        Packet::Disconnect(disconnect, properties) => {
            // MQTT 5 §3.14.2.2.2: a DISCONNECT may change the session expiry
            // interval, but not make a session that ends now outlive its
            // connection (which is then not a valid DISCONNECT).
            if let Some(expiry) = properties.and_then(|p| p.session_expiry_interval) {
                if !session.session_expiry.persistent() && expiry != 0 {
                    return Some(End::violation("protocol_error", DisconnectReasonCode::ProtocolError));
                }
                session.session_expiry = SessionExpiry(expiry);
                session.expiry_changed = true;
            }
            // 3.1.1: a DISCONNECT discards the will. 5: unless its reason
            // asks for the will.
            if disconnect.reason_code != DisconnectReasonCode::DisconnectWithWillMessage {
                session.will = None;
            }
            return Some(End {
                reason: "client_disconnect",
                will: true,
                disconnect: None,
                polite_close: true,
            });
        }
        // MQTT 5 §3.10.3 (3.1.1's decoder refuses it already): at least one
        // filter.
        Packet::Unsubscribe(unsubscribe, _) if unsubscribe.filters.is_empty() => {
            return Some(End::violation("protocol_error", DisconnectReasonCode::ProtocolError));
        }
        Packet::Unsubscribe(unsubscribe, properties) => {
            server.kept.unsubscribe(&session.held.filters, &unsubscribe.filters);
            batch.push(Packet::Unsubscribe(unsubscribe, properties));
        }
        // The release of a QoS 2 publish the session refused: the router
        // never saw it. In 3.1.1 the refusal was a PUBREC as if delivered,
        // and this completes it; in MQTT 5 the PUBREC of 0x80 or more ended
        // the exchange (§4.3.3), so this names none.
        Packet::PubRel(pubrel, _) if awaiting.acks.releases_refused(pubrel.pkid) => {
            let reason = if v5 { PubCompReason::PacketIdentifierNotFound } else { PubCompReason::Success };
            awaiting.acks.answer(Answer::PubComp(pubrel.pkid, reason), replies);
        }
        // Without its properties (a reason string, user properties), which
        // mean nothing to the router: it ignores a PUBREL that has any, so
        // the publish would stay held and never be completed.
        Packet::PubRel(pubrel, _) => {
            awaiting.acks.owed();
            batch.push(Packet::PubRel(pubrel, None));
        }
        packet @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => batch.push(packet),
        // A second CONNECT, or a packet only servers send (which the codec
        // refuses before it is decoded).
        Packet::Connect(..)
        | Packet::ConnAck(..)
        | Packet::SubAck(..)
        | Packet::UnsubAck(..)
        | Packet::PingResp(_) => {
            return Some(End::violation("protocol_error", DisconnectReasonCode::ProtocolError));
        }
    }
    None
}

/// Answers a publish the memory budget has no room for (see `budget`); it
/// does not go to the router.
fn over_budget(
    pkid: u16,
    qos: u8,
    sets_alias: bool,
    v5: bool,
    acks: &mut AckOrder,
    replies: &mut Vec<Packet>,
) -> Option<End> {
    let full = || End::violation("memory_limit", DisconnectReasonCode::QuotaExceeded);
    match qos {
        // An alias the router never learnt would leave the client's next
        // publishes without a topic.
        _ if sets_alias => Some(full()),
        // At most once: the publish is simply not delivered.
        0 => None,
        // MQTT 3.1.1 cannot refuse a publish but by closing.
        _ if !v5 => Some(full()),
        1 => {
            acks.answer(Answer::PubAck(pkid, PubAckReason::QuotaExceeded), replies);
            None
        }
        // §4.3.3: a PUBREC of 0x80 or more ends the exchange (no PUBREL;
        // one sent all the same is answered here).
        _ => {
            acks.refused_qos2(pkid);
            acks.answer(Answer::PubRec(pkid, PubRecReason::QuotaExceeded), replies);
            None
        }
    }
}

/// Answers a publish the ACL refused; it does not go to the router.
/// MQTT 5 says so: PUBACK or PUBREC 0x87 (a PUBREC of 0x80 or more ends the
/// exchange, §4.3.3). MQTT 3.1.1 has no way to: the publish is
/// acknowledged as if delivered (as Mosquitto does), so that the client
/// does not send it again or stall its in-flight window. At QoS 0 it is
/// simply not delivered. A refused QoS 2 publish's PUBREL (3.1.1's, or a
/// stray one in MQTT 5) is the session's to answer.
fn refused_by_acl(pkid: u16, qos: u8, v5: bool, acks: &mut AckOrder, replies: &mut Vec<Packet>) {
    let (puback, pubrec) = if v5 {
        (PubAckReason::NotAuthorized, PubRecReason::NotAuthorized)
    } else {
        (PubAckReason::Success, PubRecReason::Success)
    };
    match qos {
        0 => {}
        1 => acks.answer(Answer::PubAck(pkid, puback), replies),
        _ => {
            acks.refused_qos2(pkid);
            acks.answer(Answer::PubRec(pkid, pubrec), replies);
        }
    }
}

/// Gives a publish's topic and payload one allocation of their own.
///
/// Decoding splits them off the connection's read buffer without copying,
/// so they share that buffer's allocation (4 KiB or more). The router keeps
/// every publish in its topic's log until the log rotates: a 40-byte
/// message would pin the whole read buffer for that long (measured: 1 GB
/// after 30 s of 10,000 clients at 1 message/s). One copy into an exact-size
/// buffer is far cheaper than that.
fn detach(publish: &mut rumqttd::protocol::Publish) {
    let (topic_len, payload_len) = (publish.topic.len(), publish.payload.len());
    let mut own = BytesMut::with_capacity(topic_len + payload_len);
    own.extend_from_slice(&publish.topic);
    own.extend_from_slice(&publish.payload);
    publish.topic = own.split_to(topic_len).freeze();
    publish.payload = own.freeze();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, ReasonLabel};

    /// The gauge comes back down and the session is counted closed, also
    /// when its task unwinds from a panic.
    #[test]
    fn a_session_is_counted_closed_however_it_ends() {
        let metrics = Metrics::new(1024, None);
        let mqtt = &metrics.mqtt;
        let closed = |reason| mqtt.closed.get_or_create(&ReasonLabel { reason }).get();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _counted = Counted::open(mqtt, Version::V5);
            assert_eq!(mqtt.v5.get(), 1);
            panic!("a bug in a session (this panic is the test)");
        }));
        assert!(unwound.is_err());
        assert_eq!((mqtt.v5.get(), closed("panic")), (0, 1));
        let counted = Counted::open(mqtt, Version::V311);
        assert_eq!(mqtt.v311.get(), 1);
        counted.close("client_closed");
        assert_eq!((mqtt.v311.get(), closed("client_closed"), closed("panic")), (0, 1, 1));
        drop(Counted::open(mqtt, Version::V311));
        assert_eq!((mqtt.v311.get(), closed("aborted")), (0, 1));
    }
}
