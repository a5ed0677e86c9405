//! A deliberately low-level MQTT client over a blocking `TcpStream`, for
//! what client libraries will not send: keep-alive tricks, garbage, packets
//! out of order, malformed and oversized packets, exact byte checks.
//!
//! Well-formed packets are `echo-mqtt-wire`'s, the load generator's
//! encoder; what is here is the shorthand the tests write them with, and
//! the bytes no encoder should write (raw topics, raw properties).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use echo_mqtt_wire::{self as wire, Connect, Will};
#[allow(unused_imports)] // as dead_code: each test file uses a different part
pub use echo_mqtt_wire::{DISCONNECT, PINGREQ};

pub struct RawMqtt {
    pub stream: TcpStream,
}

/// A packet as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPacket {
    pub first: u8,
    pub body: Vec<u8>,
}

impl RawPacket {
    /// The one whole packet in `bytes` (as an MQTT-over-WebSocket message
    /// carries it).
    pub fn parse(bytes: &[u8]) -> RawPacket {
        let (len, n) = wire::read_varint(&bytes[1..]).unwrap().expect("a whole remaining length");
        let pos = 1 + n;
        assert_eq!(bytes.len(), pos + len, "one whole packet: {bytes:?}");
        RawPacket { first: bytes[0], body: bytes[pos..].to_vec() }
    }

    pub fn packet_type(&self) -> u8 {
        self.first >> 4
    }

    /// Its size on the wire: fixed header and body.
    pub fn wire_len(&self) -> usize {
        1 + wire::varint_len(self.body.len()) + self.body.len()
    }

    /// The CONNACK return code (3.1.1) or reason code (5).
    pub fn connack_code(&self) -> u8 {
        assert_eq!(self.packet_type(), 2, "not a CONNACK: {self:?}");
        self.body[1]
    }

    /// The CONNACK's session present flag.
    pub fn session_present(&self) -> bool {
        assert_eq!(self.packet_type(), 2, "not a CONNACK: {self:?}");
        self.body[0] & 1 == 1
    }

    /// The reason code of an MQTT 5 DISCONNECT (0 when absent). The
    /// packet must be well formed: a reason, then a property length that
    /// covers the rest.
    pub fn disconnect_reason(&self) -> u8 {
        assert_eq!(self.packet_type(), 14, "not a DISCONNECT: {self:?}");
        if self.body.len() > 1 {
            assert_eq!(usize::from(self.body[1]), self.body.len() - 2, "malformed DISCONNECT {self:?}");
        }
        self.body.first().copied().unwrap_or(0)
    }
}

/// The bytes an `echo-mqtt-wire` encoder writes.
fn encoded(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = Vec::new();
    encode(&mut buf);
    buf
}

/// A whole packet from its first byte and body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    encoded(|buf| wire::packet(buf, first, body))
}

/// CONNECT with a clean session; `level` 4 (3.1.1) or 5.
pub fn connect(level: u8, client_id: &str, keep_alive: u16) -> Vec<u8> {
    connect_with(level, client_id, keep_alive, None)
}

/// CONNECT, optionally with a username and password.
pub fn connect_with(level: u8, client_id: &str, keep_alive: u16, login: Option<(&str, &str)>) -> Vec<u8> {
    encoded(|buf| Connect { login, ..Connect::new(level, client_id, keep_alive) }.encode(buf))
}

/// CONNECT with a clean session and a will: `topic` as raw bytes (it may
/// be anything a client can send), at `qos`, not retained.
pub fn connect_with_will(level: u8, client_id: &str, topic: &[u8], message: &[u8], qos: u8) -> Vec<u8> {
    connect_with_will_properties(level, client_id, topic, message, qos, &[], &[])
}

/// [`connect_with_will`] with these raw MQTT 5 CONNECT properties and will
/// properties (each without its length), e.g. the Session Expiry Interval
/// (`0x11`) and the Will Delay Interval (`0x18`), four bytes each.
pub fn connect_with_will_properties(
    level: u8,
    client_id: &str,
    topic: &[u8],
    message: &[u8],
    qos: u8,
    properties: &[u8],
    will_properties: &[u8],
) -> Vec<u8> {
    let will = Some(Will { topic, message, qos, properties: will_properties });
    encoded(|buf| Connect { properties, will, ..Connect::new(level, client_id, 30) }.encode(buf))
}

/// PUBLISH with a topic of raw bytes at `qos` (packet id 1 when above 0),
/// and for MQTT 5 these raw `properties` (without their length).
pub fn publish_raw(level: u8, topic: &[u8], qos: u8, properties: &[u8], payload: &[u8]) -> Vec<u8> {
    encoded(|buf| wire::publish_with_properties(buf, level, topic, qos, 1, properties, payload))
}

/// CONNECT that may resume a session: `clean` is 3.1.1's clean session
/// or 5's clean start; `expiry` is MQTT 5's session expiry interval
/// property (absent when `None`).
pub fn connect_session(level: u8, client_id: &str, clean: bool, expiry: Option<u32>) -> Vec<u8> {
    let properties = expiry.map(|seconds| [&[0x11][..], &seconds.to_be_bytes()].concat()).unwrap_or_default();
    encoded(|buf| {
        Connect { clean, properties: &properties, ..Connect::new(level, client_id, 30) }.encode(buf)
    })
}

/// MQTT 5 DISCONNECT (normal) that sets the session expiry interval.
pub fn disconnect_with_expiry(expiry: u32) -> Vec<u8> {
    let mut body = vec![0x00, 5, 0x11];
    body.extend_from_slice(&expiry.to_be_bytes());
    packet(0xe0, &body)
}

/// PUBLISH at QoS 0.
pub fn publish(level: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    publish_qos(level, topic, 0, 0, payload)
}

/// SUBSCRIBE to one filter at QoS 0.
pub fn subscribe(level: u8, pkid: u16, filter: &str) -> Vec<u8> {
    subscribe_qos(level, pkid, filter, 0)
}

impl RawMqtt {
    pub fn connect(addr: SocketAddr) -> RawMqtt {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.set_nodelay(true).unwrap();
        RawMqtt { stream }
    }

    /// Connects and completes CONNECT/CONNACK (code 0 expected).
    pub fn session(addr: SocketAddr, level: u8, client_id: &str, keep_alive: u16) -> RawMqtt {
        let mut raw = RawMqtt::connect(addr);
        raw.send(&connect(level, client_id, keep_alive));
        let ack = raw.read_packet().expect("a CONNACK");
        assert_eq!(ack.connack_code(), 0, "CONNACK for {client_id}");
        raw
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends, ignoring a reset (the server may already have closed).
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// The next packet, or `None` when the server closed the connection.
    pub fn read_packet(&mut self) -> Option<RawPacket> {
        let mut first = [0u8; 1];
        match self.stream.read(&mut first) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let mut header = Vec::with_capacity(4);
        let len = loop {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b).ok()?;
            header.push(b[0]);
            if let Some((len, _)) = wire::read_varint(&header).expect("a valid remaining length") {
                break len;
            }
        };
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).ok()?;
        Some(RawPacket { first: first[0], body })
    }

    /// Reads and discards whatever the server sends until it has sent
    /// nothing for `quiet`; returns the bytes read.
    pub fn drain(&mut self, quiet: Duration) -> usize {
        self.stream.set_read_timeout(Some(quiet)).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while let Ok(n @ 1..) = self.stream.read(&mut buf) {
            total += n;
        }
        self.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        total
    }

    /// Whether the server closes the connection (EOF or reset) within
    /// `limit`, skipping any packets it sends first.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {
                    if start.elapsed() > limit {
                        return false;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }
}

/// PUBLISH at `qos` with packet id `pkid` (for QoS 1 and 2), no properties.
pub fn publish_qos(level: u8, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
    encoded(|buf| wire::publish(buf, level, topic.as_bytes(), qos, pkid, payload))
}

/// SUBSCRIBE to several filters at QoS 0, in one packet.
pub fn subscribe_all(level: u8, pkid: u16, filters: &[&str]) -> Vec<u8> {
    let filters: Vec<(&str, u8)> = filters.iter().map(|filter| (*filter, 0)).collect();
    encoded(|buf| wire::subscribe(buf, level, pkid, &[], &filters))
}

/// UNSUBSCRIBE from several filters.
pub fn unsubscribe_all(level: u8, pkid: u16, filters: &[&str]) -> Vec<u8> {
    encoded(|buf| wire::unsubscribe(buf, level, pkid, filters))
}

/// An acknowledgement (PUBREL: `0x62`, PUBACK: `0x40`, ...) for `pkid`.
pub fn ack(first: u8, pkid: u16) -> Vec<u8> {
    encoded(|buf| wire::ack(buf, first, pkid))
}

impl RawPacket {
    /// A SUBACK's return codes (3.1.1) or reason codes (5).
    pub fn suback_codes(&self, level: u8) -> Vec<u8> {
        assert_eq!(self.packet_type(), 9, "not a SUBACK: {self:?}");
        let at = if level == 5 { 3 + usize::from(self.body[2]) } else { 2 };
        self.body[at..].to_vec()
    }

    /// The packet id of a PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK or UNSUBACK.
    pub fn pkid(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }

    /// An MQTT 5 CONNACK's Assigned Client Identifier (property 0x12).
    pub fn assigned_client_id(&self) -> Option<String> {
        self.connack_property_list().into_iter().find(|(id, _)| *id == 0x12).and_then(|(_, v)| v.err())
    }

    /// An MQTT 5 CONNACK's integer properties, by identifier (strings and
    /// binary data are skipped).
    pub fn connack_properties(&self) -> std::collections::HashMap<u8, u32> {
        self.connack_property_list().into_iter().filter_map(|(id, v)| Some((id, v.ok()?))).collect()
    }

    /// An MQTT 5 CONNACK's properties in order: integers as `Ok`, strings
    /// as `Err`.
    fn connack_property_list(&self) -> Vec<(u8, Result<u32, String>)> {
        assert_eq!(self.packet_type(), 2, "not a CONNACK: {self:?}");
        let mut properties = Vec::new();
        let (len, mut at) = (usize::from(self.body[2]), 3);
        assert!(len < 128, "a short property section");
        let end = at + len;
        while at < end {
            let id = self.body[at];
            at += 1;
            let size = match id {
                // Byte: maximum QoS, retain, wildcard, subscription ids, shared.
                0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
                // Two bytes: receive maximum, topic alias maximum, keep-alive.
                0x21 | 0x22 | 0x13 => 2,
                // Four bytes: session expiry, maximum packet size.
                0x11 | 0x27 => 4,
                // Strings: assigned client id, reason, response info, reference.
                0x12 | 0x1f | 0x1a | 0x1c => {
                    let n = usize::from(u16::from_be_bytes([self.body[at], self.body[at + 1]]));
                    let text = String::from_utf8_lossy(&self.body[at + 2..at + 2 + n]).into_owned();
                    properties.push((id, Err(text)));
                    at += 2 + n;
                    continue;
                }
                other => panic!("CONNACK property {other:#x} not expected: {self:?}"),
            };
            let value = self.body[at..at + size].iter().fold(0u32, |v, &b| (v << 8) | u32::from(b));
            properties.push((id, Ok(value)));
            at += size;
        }
        properties
    }
}

/// MQTT 5 CONNECT with a clean start and these raw CONNECT `properties`
/// (without their length), e.g. Receive Maximum (`0x21`) or Maximum Packet
/// Size (`0x27`).
pub fn connect_with_properties(client_id: &str, properties: &[u8]) -> Vec<u8> {
    encoded(|buf| Connect { properties, ..Connect::new(5, client_id, 30) }.encode(buf))
}

/// SUBSCRIBE to one filter at `qos`.
pub fn subscribe_qos(level: u8, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    encoded(|buf| wire::subscribe(buf, level, pkid, &[], &[(filter, qos)]))
}

/// MQTT 5 SUBSCRIBE to one filter with this subscription options byte
/// (§3.8.3.1: bits 0-1 QoS, 2 No Local, 3 Retain As Published, 4-5
/// Retain Handling).
pub fn subscribe_options(pkid: u16, filter: &str, options: u8) -> Vec<u8> {
    subscribe_qos(5, pkid, filter, options)
}

/// MQTT 5 SUBSCRIBE to one filter with these options and a Subscription
/// Identifier (§3.8.2.1.2, property 0x0B, a variable byte integer).
pub fn subscribe_with_id(pkid: u16, filter: &str, options: u8, id: usize) -> Vec<u8> {
    let mut property = vec![0x0B];
    wire::varint(&mut property, id);
    encoded(|buf| wire::subscribe(buf, 5, pkid, &property, &[(filter, options)]))
}

/// A PUBLISH as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub qos: u8,
    pub topic: String,
    /// 0 at QoS 0.
    pub pkid: u16,
    pub payload: Vec<u8>,
    /// MQTT 5: its Subscription Identifiers (property 0x0B), in order.
    pub subscription_ids: Vec<usize>,
}

/// A variable byte integer at `at`; moves `at` past it.
fn read_varint(bytes: &[u8], at: &mut usize) -> usize {
    let (value, n) = wire::read_varint(&bytes[*at..]).unwrap().expect("a whole variable byte integer");
    *at += n;
    value
}

/// The Subscription Identifiers among a PUBLISH's properties; the other
/// properties a server may send with one are skipped (§3.3.2.3).
fn subscription_ids(properties: &[u8]) -> Vec<usize> {
    let mut ids = Vec::new();
    let mut at = 0;
    let u16_at = |at: usize| usize::from(u16::from_be_bytes([properties[at], properties[at + 1]]));
    while at < properties.len() {
        let id = properties[at];
        at += 1;
        match id {
            0x0B => ids.push(read_varint(properties, &mut at)),
            0x01 => at += 1,
            0x23 => at += 2,
            0x02 => at += 4,
            0x03 | 0x08 | 0x09 => at += 2 + u16_at(at),
            0x26 => {
                at += 2 + u16_at(at);
                at += 2 + u16_at(at);
            }
            other => panic!("unexpected PUBLISH property {other:#x}"),
        }
    }
    ids
}

impl RawPacket {
    /// The fields of a PUBLISH (of its MQTT 5 properties, the Subscription
    /// Identifiers).
    pub fn delivery(&self, level: u8) -> Delivery {
        assert_eq!(self.packet_type(), 3, "not a PUBLISH: {self:?}");
        let qos = (self.first >> 1) & 3;
        let topic_len = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        let topic = String::from_utf8(self.body[2..2 + topic_len].to_vec()).unwrap();
        let mut at = 2 + topic_len;
        let mut pkid = 0;
        if qos > 0 {
            pkid = u16::from_be_bytes([self.body[at], self.body[at + 1]]);
            at += 2;
        }
        let mut ids = Vec::new();
        if level == 5 {
            let len = read_varint(&self.body, &mut at);
            ids = subscription_ids(&self.body[at..at + len]);
            at += len;
        }
        Delivery { qos, topic, pkid, payload: self.body[at..].to_vec(), subscription_ids: ids }
    }
}

impl RawMqtt {
    /// Whether the server sends nothing for `quiet` (the connection stays
    /// open; nothing is consumed).
    pub fn silent_for(&mut self, quiet: Duration) -> bool {
        self.stream.set_read_timeout(Some(quiet)).unwrap();
        let mut one = [0u8; 1];
        let silent = match self.stream.peek(&mut one) {
            Ok(0) => panic!("the server closed the connection"),
            Ok(_) => false,
            Err(e) => matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        };
        self.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        silent
    }
}
