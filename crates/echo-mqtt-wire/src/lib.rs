//! The MQTT 3.1.1 and 5 packets this workspace writes by hand, encoded and
//! decoded in one place: the load generator's codec, and the encoder the
//! server's end-to-end tests build their packets with.
//!
//! A general client (rumqttc) keeps an event loop, request channels and
//! in-flight tables per connection; a generator that holds 19,000 clients in
//! one process wants a socket, a read buffer and this crate. Tests want the
//! opposite of a client library: exact bytes, and packets a library would
//! refuse to send. So the encoders check nothing: topics and client ids go
//! out as given (a topic is bytes, so a test can send invalid UTF-8), and
//! MQTT 5 properties are passed already encoded (without their length).
//! What is well formed lives here; the tests add the broken variants on top.
//!
//! Every function takes the protocol level as it stands in CONNECT: 4 for
//! MQTT 3.1.1, 5 for MQTT 5, which differ here only by property blocks and
//! reason codes. Encoders append to a caller's buffer, so the generator's
//! hot path reuses one write buffer per connection.

use bytes::{Buf, Bytes, BytesMut};

/// MQTT 5's protocol level; any other level is written and read as 3.1.1.
pub const V5: u8 = 5;

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

pub const PINGREQ: [u8; 2] = [0xC0, 0];
/// DISCONNECT with no reason code: "normal" in MQTT 5.
pub const DISCONNECT: [u8; 2] = [0xE0, 0];

/// A Variable Byte Integer (the Remaining Length, a property length).
pub fn varint(buf: &mut Vec<u8>, mut n: usize) {
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

/// How many bytes [`varint`] writes for `n`.
#[inline]
pub fn varint_len(n: usize) -> usize {
    match n {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    }
}

/// Reads a Variable Byte Integer off the front of `bytes`: its value and
/// how many bytes it took, `None` while it is cut short, an error past the
/// four bytes MQTT allows.
pub fn read_varint(bytes: &[u8]) -> Result<Option<(usize, usize)>, Malformed> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
        if i == 3 {
            return Err(Malformed);
        }
    }
    Ok(None)
}

/// A length-prefixed string or binary data.
pub fn string(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s);
}

/// A whole packet from its first byte and body.
pub fn packet(buf: &mut Vec<u8>, first: u8, body: &[u8]) {
    buf.push(first);
    varint(buf, body.len());
    buf.extend_from_slice(body);
}

/// An MQTT 5 property block: its length, then the properties.
fn properties(buf: &mut Vec<u8>, properties: &[u8]) {
    varint(buf, properties.len());
    buf.extend_from_slice(properties);
}

/// A CONNECT. [`Connect::new`] is the plain one (clean, no will, no login,
/// no properties); the rest is set with struct update syntax.
#[derive(Debug, Clone, Copy)]
pub struct Connect<'a> {
    pub level: u8,
    pub client_id: &'a str,
    pub keep_alive: u16,
    /// Clean session (3.1.1) or clean start (5).
    pub clean: bool,
    /// MQTT 5 CONNECT properties.
    pub properties: &'a [u8],
    pub will: Option<Will<'a>>,
    /// User name and password.
    pub login: Option<(&'a str, &'a str)>,
}

/// A CONNECT's will message (not retained).
#[derive(Debug, Clone, Copy)]
pub struct Will<'a> {
    pub topic: &'a [u8],
    pub message: &'a [u8],
    pub qos: u8,
    /// MQTT 5 will properties.
    pub properties: &'a [u8],
}

impl<'a> Connect<'a> {
    pub fn new(level: u8, client_id: &'a str, keep_alive: u16) -> Connect<'a> {
        Connect { level, client_id, keep_alive, clean: true, properties: &[], will: None, login: None }
    }

    pub fn encode(&self, buf: &mut Vec<u8>) {
        let mut body = Vec::with_capacity(16 + self.client_id.len());
        string(&mut body, b"MQTT");
        body.push(self.level);
        let mut flags = if self.clean { 0x02 } else { 0x00 };
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3);
        }
        if self.login.is_some() {
            flags |= 0xc0;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.level == V5 {
            properties(&mut body, self.properties);
        }
        string(&mut body, self.client_id.as_bytes());
        if let Some(will) = &self.will {
            if self.level == V5 {
                properties(&mut body, will.properties);
            }
            string(&mut body, will.topic);
            string(&mut body, will.message);
        }
        if let Some((user, password)) = self.login {
            string(&mut body, user.as_bytes());
            string(&mut body, password.as_bytes());
        }
        packet(buf, 0x10, &body);
    }
}

/// SUBSCRIBE to each filter with its subscription options byte (the QoS,
/// and in MQTT 5 the options of §3.8.3.1), with these MQTT 5 properties.
pub fn subscribe(buf: &mut Vec<u8>, level: u8, pkid: u16, props: &[u8], filters: &[(&str, u8)]) {
    let mut body = Vec::with_capacity(8 + filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>());
    body.extend_from_slice(&pkid.to_be_bytes());
    if level == V5 {
        properties(&mut body, props);
    }
    for (filter, options) in filters {
        string(&mut body, filter.as_bytes());
        body.push(*options);
    }
    packet(buf, 0x82, &body);
}

/// UNSUBSCRIBE from these filters.
pub fn unsubscribe(buf: &mut Vec<u8>, level: u8, pkid: u16, filters: &[&str]) {
    let mut body = pkid.to_be_bytes().to_vec();
    if level == V5 {
        body.push(0); // no properties
    }
    for filter in filters {
        string(&mut body, filter.as_bytes());
    }
    packet(buf, 0xa2, &body);
}

/// PUBLISH, not retained, without properties; `pkid` is written at QoS 1
/// and 2 only. Per message in the generator: no intermediate buffer.
#[inline]
pub fn publish(buf: &mut Vec<u8>, level: u8, topic: &[u8], qos: u8, pkid: u16, payload: &[u8]) {
    publish_with_properties(buf, level, topic, qos, pkid, &[], payload);
}

/// [`publish`] with these MQTT 5 properties.
#[inline]
pub fn publish_with_properties(
    buf: &mut Vec<u8>,
    level: u8,
    topic: &[u8],
    qos: u8,
    pkid: u16,
    props: &[u8],
    payload: &[u8],
) {
    let props_len = if level == V5 { varint_len(props.len()) + props.len() } else { 0 };
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + props_len + payload.len();
    buf.push(0x30 | (qos << 1));
    varint(buf, len);
    string(buf, topic);
    if qos > 0 {
        buf.extend_from_slice(&pkid.to_be_bytes());
    }
    if level == V5 {
        properties(buf, props);
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

/// A packet as a client reads it: only what the generator looks at.
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
pub fn decode(buf: &mut BytesMut, level: u8) -> Result<Option<Packet>, Malformed> {
    let Some((len, n)) = read_varint(buf.get(1..).unwrap_or_default())? else { return Ok(None) };
    if buf.len() < 1 + n + len {
        return Ok(None);
    }
    let first = buf[0];
    let mut whole = buf.split_to(1 + n + len);
    whole.advance(1 + n);
    let mut body = whole.freeze();
    let u16_at = |b: &Bytes, at: usize| -> Result<u16, Malformed> {
        b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]])).ok_or(Malformed)
    };
    let packet = match first >> 4 {
        2 => Packet::ConnAck { code: *body.get(1).ok_or(Malformed)? },
        9 => {
            let mut at = 2;
            if level == V5 {
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
            if level == V5 {
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
    let (len, n) = read_varint(b.get(at..).unwrap_or_default())?.ok_or(Malformed)?;
    Ok(n + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8], level: u8) -> Packet {
        let mut b = BytesMut::from(bytes);
        let p = decode(&mut b, level).unwrap().unwrap();
        assert!(b.is_empty());
        p
    }

    fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut buf = Vec::new();
        f(&mut buf);
        buf
    }

    #[test]
    fn connect_matches_the_spec_example() {
        let buf = encoded(|b| Connect::new(4, "c1", 60).encode(b));
        assert_eq!(buf, [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'c', b'1']);
        let buf = encoded(|b| Connect::new(5, "c1", 60).encode(b));
        assert_eq!(buf[1], 15);
        assert_eq!(buf[8], 5);
    }

    #[test]
    fn connect_with_everything_puts_each_part_in_the_order_of_the_spec() {
        let will = Will { topic: b"w", message: b"m", qos: 1, properties: &[0x18, 0, 0, 0, 9] };
        let connect = Connect {
            clean: false,
            properties: &[0x11, 0, 0, 0, 7],
            will: Some(will),
            login: Some(("u", "p")),
            ..Connect::new(5, "c", 30)
        };
        let buf = encoded(|b| connect.encode(b));
        #[rustfmt::skip]
        let body: &[u8] = &[
            0, 4, b'M', b'Q', b'T', b'T', 5,
            0xc0 | 0x08 | 0x04, // user name, password, will QoS 1, will; not clean
            0, 30,
            5, 0x11, 0, 0, 0, 7,
            0, 1, b'c',
            5, 0x18, 0, 0, 0, 9,
            0, 1, b'w', 0, 1, b'm',
            0, 1, b'u', 0, 1, b'p',
        ];
        assert_eq!(buf, [&[0x10, body.len() as u8][..], body].concat());
        // 3.1.1 has no property blocks: the same CONNECT without them.
        let buf = encoded(|b| Connect { level: 4, ..connect }.encode(b));
        assert_eq!(buf[9..13], [0xcc, 0, 30, 0]);
        assert_eq!(buf.len(), 2 + body.len() - 12);
    }

    #[test]
    fn subscribe_and_unsubscribe_carry_every_filter() {
        let buf = encoded(|b| subscribe(b, 4, 3, &[], &[("a", 1), ("b/#", 0)]));
        assert_eq!(buf, [0x82, 12, 0, 3, 0, 1, b'a', 1, 0, 3, b'b', b'/', b'#', 0]);
        let buf = encoded(|b| subscribe(b, 5, 3, &[0x0B, 7], &[("a", 0x24)]));
        assert_eq!(buf, [0x82, 9, 0, 3, 2, 0x0B, 7, 0, 1, b'a', 0x24]);
        let buf = encoded(|b| unsubscribe(b, 5, 4, &["a", "b"]));
        assert_eq!(buf, [0xa2, 9, 0, 4, 0, 0, 1, b'a', 0, 1, b'b']);
    }

    #[test]
    fn varints_at_each_length() {
        for n in [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455] {
            let buf = encoded(|b| varint(b, n));
            assert_eq!(buf.len(), varint_len(n), "{n}");
            assert_eq!(read_varint(&buf), Ok(Some((n, buf.len()))));
            assert_eq!(read_varint(&buf[..buf.len() - 1]), Ok(None));
        }
        assert_eq!(read_varint(&[0xff, 0xff, 0xff, 0xff]), Err(Malformed));
    }

    #[test]
    fn publish_round_trips_in_both_versions() {
        for level in [4, 5] {
            for qos in 0..=2 {
                let buf = encoded(|b| publish(b, level, b"a/b", qos, 7, &[1u8; 200]));
                match one(&buf, level) {
                    Packet::Publish { qos: q, pkid, payload } => {
                        assert_eq!(q, qos);
                        assert_eq!(pkid, if qos > 0 { 7 } else { 0 });
                        assert_eq!(&payload[..], &[1u8; 200]);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        // Properties, when given, stand between the packet id and the payload.
        let buf = encoded(|b| publish_with_properties(b, 5, b"t", 1, 2, &[0x01, 1], b"hi"));
        assert_eq!(buf, [0x32, 10, 0, 1, b't', 0, 2, 2, 0x01, 1, b'h', b'i']);
        assert!(
            matches!(one(&buf, 5), Packet::Publish { qos: 1, pkid: 2, payload } if &payload[..] == b"hi")
        );
    }

    #[test]
    fn partial_packets_wait_for_more() {
        let buf = encoded(|b| publish(b, 4, b"t", 0, 0, &[0u8; 300]));
        let mut b = BytesMut::from(&buf[..100]);
        assert_eq!(decode(&mut b, 4), Ok(None));
        b.extend_from_slice(&buf[100..]);
        assert!(matches!(decode(&mut b, 4), Ok(Some(Packet::Publish { .. }))));
        assert_eq!(decode(&mut BytesMut::new(), 4), Ok(None));
        assert_eq!(decode(&mut BytesMut::from(&[0x30u8][..]), 4), Ok(None));
    }

    #[test]
    fn acks_and_v5_properties() {
        assert_eq!(one(&[0x20, 2, 0, 5], 4), Packet::ConnAck { code: 5 });
        assert_eq!(one(&[0x20, 3, 0, 0, 0], 5), Packet::ConnAck { code: 0 });
        assert_eq!(one(&[0x90, 3, 0, 1, 1], 4), Packet::SubAck { code: 1 });
        // MQTT 5 SUBACK with a 3-byte property block before the reason code.
        assert_eq!(one(&[0x90, 7, 0, 1, 3, 0x1f, 0, 0, 0x80], 5), Packet::SubAck { code: 0x80 });
        assert_eq!(one(&[0x50, 2, 0, 9], 4), Packet::PubRec { pkid: 9 });
        assert_eq!(one(&[0xD0, 0], 4), Packet::PingResp);
        let mut b = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert_eq!(decode(&mut b, 4), Err(Malformed));
    }
}
