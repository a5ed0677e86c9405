//! Making router output safe for MQTT 3.1.1 clients.
//!
//! The router is version-blind: a publish from an MQTT 5 client keeps its
//! properties (user properties, content type, correlation data, message
//! expiry, response topic, payload format, subscription identifiers) all the
//! way to every subscriber, and every CONNACK carries a topic alias maximum.
//! rumqttd 0.20's own 3.1.1 writer then hits `unreachable!()` and the
//! subscriber's connection dies (in rumqttd's server, the reconnect then
//! poisons a shared mutex and every later 3.1.1 client fails). Here each
//! packet bound for a 3.1.1 client is rebuilt without properties, and
//! with 3.1.1 codes only, *before* it reaches the writer: the payload and
//! topic are delivered, MQTT 5 metadata is dropped, as 3.1.1 has no place
//! for it.

use rumqttd::protocol::{ConnAck, ConnectReturnCode, Packet, SubAck, SubscribeReasonCode};

/// The packet as a 3.1.1 client may receive it, or `None` when 3.1.1 has no
/// such packet (a server-sent DISCONNECT: a 3.1.1 server just closes).
pub fn for_v311(packet: Packet) -> Option<Packet> {
    Some(match packet {
        Packet::Publish(publish, _) => Packet::Publish(publish, None),
        Packet::ConnAck(ack, _) => Packet::ConnAck(connack(ack), None),
        Packet::PubAck(ack, _) => Packet::PubAck(ack, None),
        Packet::PubRec(ack, _) => Packet::PubRec(ack, None),
        Packet::PubRel(ack, _) => Packet::PubRel(ack, None),
        Packet::PubComp(ack, _) => Packet::PubComp(ack, None),
        Packet::SubAck(ack, _) => Packet::SubAck(suback(ack), None),
        Packet::UnsubAck(ack, _) => Packet::UnsubAck(ack, None),
        Packet::PingResp(p) => Packet::PingResp(p),
        Packet::Disconnect(..) => return None,
        // Client-to-server packets never go to a client.
        Packet::Connect(..) | Packet::Subscribe(..) | Packet::Unsubscribe(..) | Packet::PingReq(_) => {
            return None;
        }
    })
}

/// 3.1.1 has six CONNACK codes; every MQTT 5 reason maps onto one of them.
pub fn connect_code(code: ConnectReturnCode) -> ConnectReturnCode {
    use ConnectReturnCode::*;
    match code {
        Success => Success,
        RefusedProtocolVersion | UnsupportedProtocolVersion => RefusedProtocolVersion,
        ClientIdentifierNotValid => ClientIdentifierNotValid,
        BadUserNamePassword | BadAuthenticationMethod => BadUserNamePassword,
        NotAuthorized | Banned => NotAuthorized,
        _ => ServiceUnavailable,
    }
}

fn connack(ack: ConnAck) -> ConnAck {
    ConnAck { session_present: ack.session_present, code: connect_code(ack.code) }
}

/// 3.1.1 SUBACK codes: granted QoS 0, 1, 2, or 0x80 failure.
fn suback(ack: SubAck) -> SubAck {
    let return_codes = ack
        .return_codes
        .into_iter()
        .map(|code| match code {
            SubscribeReasonCode::QoS0
            | SubscribeReasonCode::QoS1
            | SubscribeReasonCode::QoS2
            | SubscribeReasonCode::Success(_) => code,
            _ => SubscribeReasonCode::Failure,
        })
        .collect();
    SubAck { pkid: ack.pkid, return_codes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use rumqttd::protocol::v4::V4;
    use rumqttd::protocol::{
        ConnAckProperties, Disconnect, DisconnectReasonCode, Protocol, Publish, PublishProperties,
    };

    /// Every kind of MQTT 5 publish property at once.
    fn all_properties() -> PublishProperties {
        PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            topic_alias: Some(3),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "v2".into())],
            subscription_identifiers: vec![7, 268_435_455],
            content_type: Some("text/plain".into()),
        }
    }

    #[test]
    fn v5_publish_reaches_a_v311_client_as_topic_and_payload() {
        let publish = Publish::new("a/b", "hello", false);
        let packet = for_v311(Packet::Publish(publish.clone(), Some(all_properties()))).unwrap();
        let mut out = BytesMut::new();
        V4.write(packet, &mut out).expect("writes without panicking");
        let mut back = out.clone();
        match V4.read_mut(&mut back, 1 << 20).unwrap() {
            Packet::Publish(p, None) => {
                assert_eq!(p.topic, publish.topic);
                assert_eq!(p.payload, publish.payload);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_router_packet_writes_as_v311() {
        let packets = vec![
            Packet::ConnAck(
                ConnAck { session_present: true, code: ConnectReturnCode::QuotaExceeded },
                Some(ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: Some(10),
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: None,
                    assigned_client_identifier: Some("x".into()),
                    topic_alias_max: Some(4096),
                    reason_string: None,
                    user_properties: vec![],
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                }),
            ),
            Packet::SubAck(
                SubAck {
                    pkid: 1,
                    return_codes: vec![
                        SubscribeReasonCode::QoS1,
                        SubscribeReasonCode::TopicFilterInvalid,
                        SubscribeReasonCode::SharedSubscriptionsNotSupported,
                    ],
                },
                None,
            ),
        ];
        for packet in packets {
            let mut out = BytesMut::new();
            V4.write(for_v311(packet).unwrap(), &mut out).unwrap();
        }
        assert_eq!(out_code(ConnectReturnCode::QuotaExceeded), ConnectReturnCode::ServiceUnavailable);
        assert!(
            for_v311(Packet::Disconnect(
                Disconnect { reason_code: DisconnectReasonCode::ServerShuttingDown },
                None
            ))
            .is_none()
        );
    }

    fn out_code(code: ConnectReturnCode) -> ConnectReturnCode {
        connect_code(code)
    }
}
