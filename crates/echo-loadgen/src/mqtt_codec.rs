//! The few MQTT 3.1.1 and 5 packets a load generator needs, encoded and
//! decoded by hand.
//!
//! A general client (rumqttc) keeps an event loop, request channels and
//! in-flight tables per connection; a generator that holds 19,000 clients in
//! one process wants a socket, a read buffer and this module. MQTT 5 differs
//! from 3.1.1 here only by property lengths (always empty when we write)
//! and reason codes.

use bytes::{Buf, Bytes, BytesMut};

use crate::scenario::MqttVersion;

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

fn varint(buf: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if n == 0 {
            break;
        }
    }
}

fn string(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s);
}

fn packet(buf: &mut Vec<u8>, first: u8, body: &[u8]) {
    buf.push(first);
    varint(buf, body.len());
    buf.extend_from_slice(body);
}

/// CONNECT with a clean session and no credentials.
pub fn connect(buf: &mut Vec<u8>, v: MqttVersion, client_id: &str, keep_alive_secs: u16) {
    let mut body = Vec::with_capacity(16 + client_id.len());
    string(&mut body, b"MQTT");
    body.push(if v == MqttVersion::V5 { 5 } else { 4 });
    body.push(0x02); // clean session / clean start
    body.extend_from_slice(&keep_alive_secs.to_be_bytes());
    if v == MqttVersion::V5 {
        body.push(0); // no properties
    }
    string(&mut body, client_id.as_bytes());
    packet(buf, 0x10, &body);
}

pub fn subscribe(buf: &mut Vec<u8>, v: MqttVersion, pkid: u16, topic: &str, qos: u8) {
    let mut body = Vec::with_capacity(8 + topic.len());
    body.extend_from_slice(&pkid.to_be_bytes());
    if v == MqttVersion::V5 {
        body.push(0);
    }
    string(&mut body, topic.as_bytes());
    body.push(qos);
    packet(buf, 0x82, &body);
}

pub fn publish(buf: &mut Vec<u8>, v: MqttVersion, topic: &str, qos: u8, pkid: u16, payload: &[u8]) {
    let len =
        2 + topic.len() + if qos > 0 { 2 } else { 0 } + usize::from(v == MqttVersion::V5) + payload.len();
    buf.push(0x30 | (qos << 1));
    varint(buf, len);
    string(buf, topic.as_bytes());
    if qos > 0 {
        buf.extend_from_slice(&pkid.to_be_bytes());
    }
    if v == MqttVersion::V5 {
        buf.push(0);
    }
    buf.extend_from_slice(payload);
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP with success (the short form is valid
/// in both versions).
pub fn ack(buf: &mut Vec<u8>, kind: u8, pkid: u16) {
    buf.push(kind);
    buf.push(2);
    buf.extend_from_slice(&pkid.to_be_bytes());
}

pub fn pingreq(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[0xC0, 0]);
}

pub fn disconnect(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[0xE0, 0]);
}

#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    ConnAck {
        code: u8,
    },
    SubAck {
        code: u8,
    },
    Publish {
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    PubAck,
    PubRec {
        pkid: u16,
    },
    PubRel {
        pkid: u16,
    },
    PubComp,
    PingResp,
    Disconnect,
    /// A packet a client never receives from a broker.
    Other(u8),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// Takes one whole packet off the front of `buf`, if one is there.
pub fn decode(buf: &mut BytesMut, v: MqttVersion) -> Result<Option<Packet>, Malformed> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(Malformed);
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let first = buf[0];
    let mut whole = buf.split_to(i + len);
    whole.advance(i);
    let mut body = whole.freeze();
    let u16_at = |b: &Bytes, at: usize| -> Result<u16, Malformed> {
        b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]])).ok_or(Malformed)
    };
    let packet = match first >> 4 {
        2 => Packet::ConnAck { code: *body.get(1).ok_or(Malformed)? },
        9 => {
            let mut at = 2;
            if v == MqttVersion::V5 {
                at += skip_properties(&body, at)?;
            }
            Packet::SubAck { code: *body.get(at).ok_or(Malformed)? }
        }
        3 => {
            let qos = (first >> 1) & 3;
            let topic_len = u16_at(&body, 0)? as usize;
            let mut at = 2 + topic_len;
            let pkid = if qos > 0 {
                at += 2;
                u16_at(&body, at - 2)?
            } else {
                0
            };
            if v == MqttVersion::V5 {
                at += skip_properties(&body, at)?;
            }
            if at > body.len() || qos == 3 {
                return Err(Malformed);
            }
            body.advance(at);
            Packet::Publish { qos, pkid, payload: body }
        }
        4 => Packet::PubAck,
        5 => Packet::PubRec { pkid: u16_at(&body, 0)? },
        6 => Packet::PubRel { pkid: u16_at(&body, 0)? },
        7 => Packet::PubComp,
        13 => Packet::PingResp,
        14 => Packet::Disconnect,
        other => Packet::Other(other),
    };
    Ok(Some(packet))
}

/// Length of an MQTT 5 property block (its varint length plus contents).
fn skip_properties(b: &Bytes, at: usize) -> Result<usize, Malformed> {
    let mut len = 0usize;
    let mut i = 0;
    loop {
        let byte = *b.get(at + i).ok_or(Malformed)?;
        len |= ((byte & 0x7f) as usize) << (7 * i);
        i += 1;
        if byte & 0x80 == 0 {
            return Ok(i + len);
        }
        if i >= 4 {
            return Err(Malformed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8], v: MqttVersion) -> Packet {
        let mut b = BytesMut::from(bytes);
        let p = decode(&mut b, v).unwrap().unwrap();
        assert!(b.is_empty());
        p
    }

    #[test]
    fn connect_matches_the_spec_example() {
        let mut buf = Vec::new();
        connect(&mut buf, MqttVersion::V311, "c1", 60);
        assert_eq!(buf, [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'c', b'1']);
        buf.clear();
        connect(&mut buf, MqttVersion::V5, "c1", 60);
        assert_eq!(buf[1], 15);
        assert_eq!(buf[8], 5);
    }

    #[test]
    fn publish_round_trips_in_both_versions() {
        for v in [MqttVersion::V311, MqttVersion::V5] {
            for qos in 0..=2 {
                let mut buf = Vec::new();
                publish(&mut buf, v, "a/b", qos, 7, &[1u8; 200]);
                match one(&buf, v) {
                    Packet::Publish { qos: q, pkid, payload } => {
                        assert_eq!(q, qos);
                        assert_eq!(pkid, if qos > 0 { 7 } else { 0 });
                        assert_eq!(&payload[..], &[1u8; 200]);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn partial_packets_wait_for_more() {
        let mut buf = Vec::new();
        publish(&mut buf, MqttVersion::V311, "t", 0, 0, &[0u8; 300]);
        let mut b = BytesMut::from(&buf[..100]);
        assert_eq!(decode(&mut b, MqttVersion::V311), Ok(None));
        b.extend_from_slice(&buf[100..]);
        assert!(matches!(decode(&mut b, MqttVersion::V311), Ok(Some(Packet::Publish { .. }))));
    }

    #[test]
    fn acks_and_v5_properties() {
        assert_eq!(one(&[0x20, 2, 0, 5], MqttVersion::V311), Packet::ConnAck { code: 5 });
        assert_eq!(one(&[0x20, 3, 0, 0, 0], MqttVersion::V5), Packet::ConnAck { code: 0 });
        assert_eq!(one(&[0x90, 3, 0, 1, 1], MqttVersion::V311), Packet::SubAck { code: 1 });
        // MQTT 5 SUBACK with a 3-byte property block before the reason code.
        assert_eq!(
            one(&[0x90, 7, 0, 1, 3, 0x1f, 0, 0, 0x80], MqttVersion::V5),
            Packet::SubAck { code: 0x80 }
        );
        assert_eq!(one(&[0x50, 2, 0, 9], MqttVersion::V311), Packet::PubRec { pkid: 9 });
        assert_eq!(one(&[0xD0, 0], MqttVersion::V311), Packet::PingResp);
        let mut b = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert_eq!(decode(&mut b, MqttVersion::V311), Err(Malformed));
    }
}
