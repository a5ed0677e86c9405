//! The CONNECT phase: the CONNECT read and checked on a turn
//! ([`ConnectTurns`](super::ConnectTurns)), a refusal answered with the
//! right CONNACK, the link to the router, the CONNACK that accepts.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{ConnAck, ConnAckProperties, ConnectProperties, ConnectReturnCode, LastWill, Packet};
use tokio::time::Instant;
use tracing::debug;

use super::close::publish_will;
use super::turns::Paced;
use super::{Accepted, MqttServer, RouterLink, send};
use crate::mqtt::acl::SessionAcl;
use crate::mqtt::auth;
use crate::mqtt::broker::{ClientLimits, LinkFailure, SessionExpiry};
use crate::mqtt::caps::{self, Held};
use crate::mqtt::codec::{Codec, DecodeError, Decoded, Peek, Version, peek_version};
use crate::mqtt::topics::{self, TopicRefusal};
use crate::mqtt::transport::{Goodbye, Transport};

/// How the CONNECT phase ended when it did not end in a session.
pub(super) enum Refused {
    /// Nothing to answer (the client left, timed out, or is not MQTT).
    Silently(&'static str),
    /// Answer with this CONNACK code, then close.
    With(Version, ConnectReturnCode, &'static str),
}

/// The CONNECT phase: checks, the link to the router, the CONNACK.
pub(super) async fn open(
    transport: &mut Transport,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    server: &MqttServer,
) -> Option<(Accepted, RouterLink)> {
    let deadline = Instant::now() + server.config.connect_timeout;
    let check = async |transport: &mut Transport| handshake(transport, rbuf, server).await;
    let paced = server.connecting.connect(transport, deadline, &server.shutdown, check).await;
    let ((mut accepted, limits), _turn) = match paced {
        Paced::Checked(checked, turn) => (checked, turn),
        Paced::Refused(refused) => {
            refuse(transport, refused, server).await;
            return None;
        }
        Paced::ShutDown => return None,
    };
    let (router, session_present) = link(transport, &accepted, limits, peer, server).await?;
    let mut out = BytesMut::new();
    let packets = vec![connack(&accepted, session_present, server)];
    if send(transport, &accepted.codec, packets, &mut out, server).await.is_err() {
        server.metrics.closed("reset");
        publish_will(server, &accepted);
        return None;
    }
    let version = accepted.codec.version;
    server.metrics.connected(version.label());
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

/// Registers the client with the router, awaiting its answer without
/// blocking the event loop (see [`broker`](crate::mqtt::broker)); a client
/// the router does not take is answered and closed. The link, and whether
/// the router kept a session for the client.
async fn link(
    transport: &mut Transport,
    accepted: &Accepted,
    limits: ClientLimits,
    peer: SocketAddr,
    server: &MqttServer,
) -> Option<(RouterLink, bool)> {
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
            server.metrics.refuse(reason);
            transport.close(Goodbye::for_refusal(reason, false)).await;
            return None;
        }
    };
    let router = RouterLink { tx: link.tx, rx: link.rx, registered: true };
    let session_present = match Option::<Packet>::from(link.connack) {
        Some(Packet::ConnAck(ack, _)) => ack.session_present,
        _ => false,
    };
    Some((router, session_present))
}

/// The CONNACK that accepts the client, with what the server offers.
fn connack(accepted: &Accepted, session_present: bool, server: &MqttServer) -> Packet {
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
    Packet::ConnAck(ack, Some(connack))
}

/// Reads and checks the CONNECT. What the client announced it can take
/// goes to the router with its link and is not kept in the session.
async fn handshake(
    transport: &mut Transport,
    rbuf: &mut BytesMut,
    server: &MqttServer,
) -> Result<(Accepted, ClientLimits), Refused> {
    let (version, decoded) = read_connect(transport, rbuf, server).await?;
    let codec = Codec::new(version, server.config.max_payload_size as usize);
    server.metrics.packet_received(decoded.packet_type);
    server.metrics.bytes_received.inc_by(decoded.size as u64);
    let Packet::Connect(connect, properties, will, will_properties, login) = decoded.packet else {
        return Err(Refused::Silently("not_connect"));
    };
    let limits = client_limits(properties.as_ref(), version)?;
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
    let (client_id, assigned_id) = client_id(connect.client_id, connect.clean_session, version, server)?;
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
    if let Some(will) = &will {
        check_will(will, version, acl.as_deref_mut(), server)?;
    }
    // A kept session that another user (or no user) connected with holds
    // subscriptions checked against that user's rules: this one starts
    // anew instead of resuming it.
    let clean_session = connect.clean_session
        || (acl.is_some() && server.kept.owner(&client_id).is_some_and(|owner| owner.as_deref() != username));
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

/// Reads the CONNECT: its protocol level picks the version; until the
/// client is connected (and authenticated), it may make the server buffer
/// only a small CONNECT.
async fn read_connect(
    transport: &mut Transport,
    rbuf: &mut BytesMut,
    server: &MqttServer,
) -> Result<(Version, Decoded), Refused> {
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
    let max = server.config.max_payload_size as usize;
    let connecting = Codec::new(version, max.min(server.config.max_connect_size as usize));
    loop {
        match connecting.decode(rbuf) {
            Ok(Some(decoded)) => return Ok((version, decoded)),
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
    }
}

/// What an MQTT 5 client announced it can take (nothing for 3.1.1).
fn client_limits(properties: Option<&ConnectProperties>, version: Version) -> Result<ClientLimits, Refused> {
    let Some(p) = properties else {
        return Ok(ClientLimits::default());
    };
    // MQTT 5 §4.12: this server offers no enhanced authentication (it
    // refuses every AUTH packet), so a client asking for it is refused and
    // closed (0x8C); authentication data without a method is a protocol
    // error (§3.1.2.11.10).
    if p.authentication_method.is_some() {
        return Err(Refused::With(version, ConnectReturnCode::BadAuthenticationMethod, "bad_auth_method"));
    }
    if p.authentication_data.is_some() {
        return Err(Refused::With(version, ConnectReturnCode::ProtocolError, "protocol_error"));
    }
    // §3.1.2.11.3-4: a Receive Maximum or Maximum Packet Size of 0 is a
    // protocol error.
    if p.receive_maximum == Some(0) || p.max_packet_size == Some(0) {
        return Err(Refused::With(version, ConnectReturnCode::ProtocolError, "protocol_error"));
    }
    Ok(ClientLimits { receive_maximum: p.receive_maximum, max_packet_size: p.max_packet_size })
}

/// The client's id, or one assigned to a client that sent none, and
/// whether it was assigned.
fn client_id(
    client_id: String,
    clean_session: bool,
    version: Version,
    server: &MqttServer,
) -> Result<(String, bool), Refused> {
    let invalid = || Refused::With(version, ConnectReturnCode::ClientIdentifierNotValid, "client_id");
    if client_id.is_empty() {
        // 3.1.1 §3.1.3.1: an empty id needs a clean session.
        if !clean_session && version == Version::V311 {
            return Err(invalid());
        }
        return Ok((server.assign_client_id(), true));
    }
    if client_id.contains(['\0', '+', '#', '/', '$']) {
        // The router refuses these characters (silently); NUL is not
        // allowed in MQTT strings and marks the server's own link.
        return Err(invalid());
    }
    if let Err(cap) = caps::client_id(&client_id, &server.config) {
        // 3.1.1 §3.1.3.1 lets a server refuse any id with code 2.
        server.metrics.cap_refused(cap.label());
        return Err(invalid());
    }
    Ok((client_id, false))
}

/// Checks the will. It goes to the router later, through the server's own
/// link, as it is: a topic the router refuses would end that link (see
/// `broker`), so it is checked here, with the CONNECT.
fn check_will(
    will: &LastWill,
    version: Version,
    acl: Option<&mut SessionAcl>,
    server: &MqttServer,
) -> Result<(), Refused> {
    let checked = topics::check_topic(&will.topic, false).and_then(|()| {
        caps::topic(&will.topic, &server.config).map_err(|cap| {
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
                Version::V5 => Refused::With(version, ConnectReturnCode::TopicNameInvalid, "invalid_topic"),
                Version::V311 => Refused::Silently("invalid_topic"),
            });
        }
    }
    // A will is a publish, checked now (Mosquitto does the same): it
    // could not be refused when it is due. `$` topics are the server's.
    if topics::server_only(&will.topic) || acl.is_some_and(|acl| !acl.may_publish(&will.topic, None)) {
        server.metrics.acl_denied("publish");
        return Err(Refused::With(version, ConnectReturnCode::NotAuthorized, "not_authorized"));
    }
    Ok(())
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
