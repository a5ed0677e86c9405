//! Framing MQTT packets with rumqttd's public codecs, for either version.
//!
//! One port speaks 3.1.1 and 5: the protocol level in the CONNECT packet
//! decides which of `rumqttd::protocol::v4::V4` and `v5::V5` reads and
//! writes the rest of the connection. [`peek_version`] reads that level
//! from the raw bytes before anything is decoded.
//!
//! Reading checks what rumqttd's decoders do not, or get wrong
//! ([`Codec::decode`]): packet types a client must not send (the V5 decoder
//! panics on some), fixed-header flags, and packets whose fields run past
//! their end (which the V5 decoder would take for a packet still arriving),
//! and MQTT 5 properties given twice (which the V5 decoder takes, keeping
//! the last).
//!
//! Writing goes through [`downgrade`](super::downgrade) for 3.1.1 clients:
//! rumqttd's V4 writer *panics* (`unreachable!`) on any packet that carries
//! MQTT 5 properties, and the router attaches them freely (a v5 publisher's
//! user properties, CONNACK's topic alias maximum). Stripping them first is
//! what keeps a v5 publisher from killing v4 subscribers.

use bytes::{Buf, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{DisconnectReasonCode, Error as ProtocolError, Packet, Protocol};

use super::downgrade;

/// The MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn label(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }
}

/// What the first bytes of a connection say about its CONNECT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet.
    Incomplete,
    /// A CONNECT at protocol level 4 (3.1.1) or 5.
    Connect(Version),
    /// A CONNECT at a level we do not speak (3 is MQTT 3.1, "MQIsdp").
    UnsupportedLevel(u8),
    /// The first packet is not a CONNECT, or not MQTT at all (an HTTP
    /// request, TLS hello, garbage).
    NotConnect,
}

/// Reads the packet type and protocol level of the first packet, without
/// consuming anything.
pub fn peek_version(buf: &[u8]) -> Peek {
    let Some(&first) = buf.first() else {
        return Peek::Incomplete;
    };
    // CONNECT is type 1 with flags 0.
    if first != 0x10 {
        return Peek::NotConnect;
    }
    let mut pos = match fixed_header(buf) {
        Ok(Some((header_len, _))) => header_len,
        Ok(None) => return Peek::Incomplete,
        Err(_) => return Peek::NotConnect,
    };
    // Protocol name: a 2-byte length, then "MQTT" (or "MQIsdp" for 3.1).
    let Some(name_len) = buf.get(pos..pos + 2) else {
        return Peek::Incomplete;
    };
    let name_len = usize::from(u16::from_be_bytes([name_len[0], name_len[1]]));
    pos += 2;
    if name_len > 6 {
        return Peek::NotConnect;
    }
    let Some(name) = buf.get(pos..pos + name_len) else {
        return Peek::Incomplete;
    };
    pos += name_len;
    let Some(&level) = buf.get(pos) else {
        return Peek::Incomplete;
    };
    match (name, level) {
        (b"MQTT", 4) => Peek::Connect(Version::V311),
        (b"MQTT", 5) => Peek::Connect(Version::V5),
        (b"MQTT" | b"MQIsdp", level) => Peek::UnsupportedLevel(level),
        _ => Peek::NotConnect,
    }
}

/// Reads and writes the packets of one connection.
#[derive(Debug, Clone)]
pub struct Codec {
    pub version: Version,
    max_packet: usize,
}

/// Why a packet from a client is not taken. Each ends the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The remaining length is over the limit, known from the fixed header
    /// (MQTT 5: DISCONNECT 0x95).
    #[error("a packet of {0} bytes, over the limit")]
    TooLarge(usize),
    /// Not a well-formed packet (MQTT 5: 0x81).
    #[error("malformed packet: {0}")]
    Malformed(ProtocolError),
    /// A packet type that clients must not send (MQTT 5: 0x82, protocol
    /// error): CONNACK, SUBACK, UNSUBACK and PINGRESP, which only servers
    /// send, and in MQTT 5 AUTH, which needs an authentication method this
    /// server never agrees to (§4.12).
    #[error("packet type {0} is not sent by clients")]
    NotFromClients(u8),
    /// MQTT 5: a property given twice where it may appear once (0x82,
    /// protocol error, §2.2.2.2); see [`repeated_property`].
    #[error("property {0:#04x} given twice")]
    RepeatedProperty(u8),
}

/// A packet read from a client, with its type number for the metrics.
#[derive(Debug)]
pub struct Decoded {
    pub packet: Packet,
    pub packet_type: u8,
    /// The fixed header's flags (a publish's QoS is in bits 1–2: rumqttd
    /// keeps its own field private).
    pub flags: u8,
    pub size: usize,
}

impl Codec {
    pub fn new(version: Version, max_packet: usize) -> Codec {
        Codec { version, max_packet }
    }

    /// Takes the next complete packet out of `buf`; `Ok(None)` when more
    /// bytes are needed. A packet whose remaining length is over the limit
    /// is refused from its fixed header alone, before its body arrives; a
    /// packet type clients must not send, from its first byte.
    ///
    /// rumqttd's decoders are called only with a whole packet in `buf`:
    /// they take the packet out before parsing it, so a field that runs
    /// past its end — a property length cut short, a missing property
    /// section, both of which they report as "more bytes needed" — is
    /// malformed here, not a packet to wait for (it used to be dropped
    /// silently, and the connection went on as if it had never come).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Decoded>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let packet_type = first >> 4;
        match (packet_type, self.version) {
            // Reserved (MQTT 5 names 15 AUTH).
            (0, _) | (15, Version::V311) => {
                return Err(DecodeError::Malformed(ProtocolError::InvalidPacketType(packet_type)));
            }
            // rumqttd's V5 decoder hits `unreachable!()` on CONNACK and
            // UNSUBACK with a body; V4 decodes them, for a session to refuse.
            (2 | 9 | 11 | 13, _) | (15, Version::V5) => return Err(DecodeError::NotFromClients(packet_type)),
            _ => {}
        }
        if !fixed_header_flags_valid(first) {
            return Err(DecodeError::Malformed(ProtocolError::MalformedPacket));
        }
        let Some((header_len, remaining)) = fixed_header(buf)? else {
            return Ok(None);
        };
        if remaining > self.max_packet {
            return Err(DecodeError::TooLarge(remaining));
        }
        if buf.len() < header_len + remaining {
            return Ok(None);
        }
        let before = buf.len();
        // Looked for before decoding (the decoder consumes the bytes), and
        // reported only if the packet is otherwise well formed, so that a
        // malformed packet is still called malformed.
        let repeated = match self.version {
            Version::V5 => repeated_property(&buf[..header_len + remaining]),
            Version::V311 => None,
        };
        let result = if self.version == Version::V5 && packet_type == 14 && remaining == 1 {
            // MQTT 5 §3.14.2.2.1: a DISCONNECT of remaining length 1 is a
            // reason code and no properties. rumqttd wants the property
            // length there (it swallowed the packet: a client leaving with
            // "normal disconnection" had its will published); it gets one.
            let reason = buf[2];
            buf.advance(3);
            V5.read_mut(&mut BytesMut::from(&[0xe0, 0x02, reason, 0x00][..]), self.max_packet)
        } else {
            match self.version {
                Version::V311 => V4.read_mut(buf, self.max_packet),
                Version::V5 => V5.read_mut(buf, self.max_packet),
            }
        };
        match result {
            Ok(_) if let Some(id) = repeated => Err(DecodeError::RepeatedProperty(id)),
            Ok(packet) => {
                Ok(Some(Decoded { packet, packet_type, flags: first & 0x0f, size: before - buf.len() }))
            }
            Err(ProtocolError::PayloadSizeLimitExceeded(size)) => Err(DecodeError::TooLarge(size)),
            Err(ProtocolError::InsufficientBytes(_)) => {
                Err(DecodeError::Malformed(ProtocolError::MalformedPacket))
            }
            Err(e) => Err(DecodeError::Malformed(e)),
        }
    }

    /// Appends `packet` to `out`, as this connection's version needs it.
    /// Returns the packet type written, or `None` when the packet has no
    /// form in this version (a server DISCONNECT for 3.1.1) and was dropped.
    pub fn encode(&self, packet: Packet, out: &mut BytesMut) -> Result<Option<u8>, ProtocolError> {
        let start = out.len();
        match self.version {
            Version::V311 => {
                let Some(packet) = downgrade::for_v311(packet) else {
                    return Ok(None);
                };
                V4.write(packet, out)?;
            }
            Version::V5 => match packet {
                Packet::Disconnect(disconnect, _) => write_v5_disconnect(disconnect.reason_code, out),
                packet => {
                    V5.write(packet, out)?;
                }
            },
        }
        Ok(out.get(start).map(|b| b >> 4))
    }
}

/// Writes an MQTT 5 DISCONNECT. rumqttd 0.20's writer gets it wrong both
/// ways: with a reason and no properties it declares a remaining length of
/// 1 but writes 2 bytes; with an empty property set its length comes out as
/// 2, which it takes for "normal disconnection" and writes no reason at all.
/// The server only ever sends a reason code, so the packet is written here:
/// reason, then an empty property length.
fn write_v5_disconnect(reason: DisconnectReasonCode, out: &mut BytesMut) {
    out.extend_from_slice(&[0xe0, 0x02, disconnect_code(reason), 0x00]);
}

/// MQTT 5 §3.14.2.1: the reason codes of DISCONNECT.
pub fn disconnect_code(reason: DisconnectReasonCode) -> u8 {
    use DisconnectReasonCode::*;
    match reason {
        NormalDisconnection => 0x00,
        DisconnectWithWillMessage => 0x04,
        UnspecifiedError => 0x80,
        MalformedPacket => 0x81,
        ProtocolError => 0x82,
        ImplementationSpecificError => 0x83,
        NotAuthorized => 0x87,
        ServerBusy => 0x89,
        ServerShuttingDown => 0x8b,
        KeepAliveTimeout => 0x8d,
        SessionTakenOver => 0x8e,
        TopicFilterInvalid => 0x8f,
        TopicNameInvalid => 0x90,
        ReceiveMaximumExceeded => 0x93,
        TopicAliasInvalid => 0x94,
        PacketTooLarge => 0x95,
        MessageRateTooHigh => 0x96,
        QuotaExceeded => 0x97,
        AdministrativeAction => 0x98,
        PayloadFormatInvalid => 0x99,
        RetainNotSupported => 0x9a,
        QoSNotSupported => 0x9b,
        UseAnotherServer => 0x9c,
        ServerMoved => 0x9d,
        SharedSubscriptionNotSupported => 0x9e,
        ConnectionRateExceeded => 0x9f,
        MaximumConnectTime => 0xa0,
        SubscriptionIdentifiersNotSupported => 0xa1,
        WildcardSubscriptionsNotSupported => 0xa2,
    }
}

/// The fixed header's length and the packet's remaining length, once the
/// whole fixed header is in (`None` before).
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut remaining = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    // A remaining length of more than four bytes.
    Err(DecodeError::Malformed(ProtocolError::MalformedRemainingLength))
}

/// Why [`repeated_property`] stopped before the end of a packet.
enum Stop {
    Repeated(u8),
    /// A field it cannot follow: the decoder will say what is wrong.
    Unreadable,
}

/// Reads the fields that lead to a packet's property sections.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        if n > self.bytes.len() {
            return Err(Stop::Unreadable);
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, Stop> {
        Ok(self.take(1)?[0])
    }

    /// A string or binary data: a two-byte length, then that many bytes.
    fn string(&mut self) -> Result<(), Stop> {
        let len = self.take(2)?;
        self.take(usize::from(u16::from_be_bytes([len[0], len[1]]))).map(drop)
    }

    /// A variable byte integer (§1.5.5).
    fn varint(&mut self) -> Result<usize, Stop> {
        let mut value = 0;
        for i in 0..4 {
            let byte = self.byte()?;
            value |= usize::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Stop::Unreadable)
    }

    /// A property section: its length, then properties, each at most once
    /// but User Property (0x26). Subscription Identifier (0x0B) may repeat
    /// only in a PUBLISH from a server (§3.3.2.3.8); clients never send one
    /// that may.
    fn properties(&mut self) -> Result<(), Stop> {
        let len = self.varint()?;
        let mut section = Fields { bytes: self.take(len)? };
        let mut seen = 0u64;
        while !section.bytes.is_empty() {
            let id = section.byte()?;
            match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => section.take(1).map(drop)?,
                0x13 | 0x21 | 0x22 | 0x23 => section.take(2).map(drop)?,
                0x02 | 0x11 | 0x18 | 0x27 => section.take(4).map(drop)?,
                0x0b => section.varint().map(drop)?,
                0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => section.string()?,
                0x26 => {
                    section.string()?;
                    section.string()?;
                    continue;
                }
                _ => return Err(Stop::Unreadable),
            }
            if seen & (1 << id) != 0 {
                return Err(Stop::Repeated(id));
            }
            seen |= 1 << id;
        }
        Ok(())
    }
}

/// The first property that a whole MQTT 5 packet from a client gives twice
/// in one property section, where MQTT 5 §2.2.2.2 allows it once ("It is a
/// Protocol Error to include [it] more than once"): rumqttd's decoder keeps
/// the last and carries on. Every property section a client sends is
/// looked at: CONNECT's and its will's, PUBLISH, PUBACK, PUBREC, PUBREL,
/// PUBCOMP, SUBSCRIBE, UNSUBSCRIBE and DISCONNECT. Nothing is validated
/// here: at a field it cannot follow it stops, and the decoder decides.
fn repeated_property(packet: &[u8]) -> Option<u8> {
    let Ok(Some((header_len, remaining))) = fixed_header(packet) else {
        return None;
    };
    let body = packet.get(header_len..header_len + remaining)?;
    match property_sections(packet[0], Fields { bytes: body }) {
        Err(Stop::Repeated(id)) => Some(id),
        Ok(()) | Err(Stop::Unreadable) => None,
    }
}

/// Walks the property sections of a packet with this first byte and body.
fn property_sections(first: u8, mut fields: Fields<'_>) -> Result<(), Stop> {
    let len = fields.bytes.len();
    match first >> 4 {
        // CONNECT: protocol name, level, flags, keep alive, properties;
        // client id, then the will's properties if there is a will.
        1 => {
            fields.string()?;
            fields.take(1)?;
            let flags = fields.byte()?;
            fields.take(2)?;
            fields.properties()?;
            fields.string()?;
            if flags & 0x04 != 0 {
                fields.properties()?;
            }
            Ok(())
        }
        // PUBLISH: topic, packet id above QoS 0, properties.
        3 => {
            fields.string()?;
            if first & 0b0110 != 0 {
                fields.take(2)?;
            }
            fields.properties()
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then a reason and
        // properties, each of which may be left out (§3.4.2.1).
        4..=7 if len > 3 => {
            fields.take(3)?;
            fields.properties()
        }
        // SUBSCRIBE, UNSUBSCRIBE: packet id, properties.
        8 | 10 => {
            fields.take(2)?;
            fields.properties()
        }
        // DISCONNECT: a reason, then properties, both optional.
        14 if len > 1 => {
            fields.take(1)?;
            fields.properties()
        }
        _ => Ok(()),
    }
}

/// The flag bits of a fixed header are fixed for every packet type but
/// PUBLISH (MQTT 3.1.1 §2.2.2, 5.0 §2.1.3): 0010 for PUBREL, SUBSCRIBE and
/// UNSUBSCRIBE, 0000 for the rest. rumqttd's codecs do not check them.
fn fixed_header_flags_valid(first: u8) -> bool {
    match (first >> 4, first & 0x0f) {
        (3, flags) => flags & 0b0110 != 0b0110, // PUBLISH: any flags but QoS 3
        (6 | 8 | 10, flags) => flags == 0b0010,
        (_, flags) => flags == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(name: &[u8], level: u8) -> Vec<u8> {
        let mut body = (name.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, 0x02, 0, 30, 0, 1, b'c']);
        let mut out = vec![0x10, body.len() as u8];
        out.extend(body);
        out
    }

    #[test]
    fn peeks_the_protocol_level() {
        assert_eq!(peek_version(&connect(b"MQTT", 4)), Peek::Connect(Version::V311));
        assert_eq!(peek_version(&connect(b"MQTT", 5)), Peek::Connect(Version::V5));
        assert_eq!(peek_version(&connect(b"MQIsdp", 3)), Peek::UnsupportedLevel(3));
        assert_eq!(peek_version(&connect(b"MQTT", 6)), Peek::UnsupportedLevel(6));
        assert_eq!(peek_version(&connect(b"HTTP", 4)), Peek::NotConnect);
        assert_eq!(peek_version(b"GET / HTTP/1.1\r\n"), Peek::NotConnect);
        assert_eq!(peek_version(&[0x16, 0x03, 0x01]), Peek::NotConnect, "a TLS hello");
        assert_eq!(peek_version(&[0x30, 0x00]), Peek::NotConnect, "a PUBLISH first");
        assert_eq!(peek_version(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]), Peek::NotConnect);
        let whole = connect(b"MQTT", 5);
        for len in 0..9 {
            assert_eq!(peek_version(&whole[..len]), Peek::Incomplete, "{len} bytes");
        }
    }

    #[test]
    fn oversized_packets_are_refused_from_the_header() {
        let codec = Codec::new(Version::V311, 100);
        // PUBLISH with a remaining length of 1000, body not sent.
        let mut buf = BytesMut::from(&[0x30u8, 0xe8, 0x07][..]);
        assert_eq!(codec.decode(&mut buf).unwrap_err(), DecodeError::TooLarge(1000));
    }

    #[test]
    fn reserved_flag_bits_are_malformed() {
        let codec = Codec::new(Version::V311, 1 << 20);
        for bytes in [&[0x80u8, 0x03, 0, 1, 0][..], &[0x60, 0x02, 0, 1], &[0xc1, 0x00], &[0x36, 0x02, 0, 0]] {
            let mut buf = BytesMut::from(bytes);
            assert!(matches!(codec.decode(&mut buf), Err(DecodeError::Malformed(_))), "{bytes:x?}");
        }
        let mut ping = BytesMut::from(&[0xc0u8, 0x00][..]);
        assert!(codec.decode(&mut ping).unwrap().is_some());
    }

    fn decode(version: Version, bytes: &[u8]) -> Result<Option<Decoded>, DecodeError> {
        Codec::new(version, 1 << 20).decode(&mut BytesMut::from(bytes))
    }

    /// Packets only servers send are refused from their first byte, at both
    /// levels, whatever follows (rumqttd's V5 decoder panicked on CONNACK
    /// and UNSUBACK with a body).
    #[test]
    fn packets_clients_must_not_send_are_refused_before_decoding() {
        for version in [Version::V311, Version::V5] {
            for first in [0x20u8, 0x90, 0xb0, 0xd0] {
                for bytes in
                    [&[first][..], &[first, 0x00], &[first, 0x02, 0x00, 0x00], &[first, 0x02, 0x00, 0x01]]
                {
                    assert_eq!(
                        decode(version, bytes).unwrap_err(),
                        DecodeError::NotFromClients(first >> 4),
                        "{version:?} {bytes:x?}"
                    );
                }
            }
            assert!(matches!(decode(version, &[0x00, 0x00]), Err(DecodeError::Malformed(_))), "type 0");
        }
        // Type 15: reserved in 3.1.1; AUTH in 5, which needs an authentication
        // method this server never agrees to.
        assert!(matches!(decode(Version::V311, &[0xf0, 0x00]), Err(DecodeError::Malformed(_))));
        assert_eq!(
            decode(Version::V5, &[0xf0, 0x02, 0x18, 0x00]).unwrap_err(),
            DecodeError::NotFromClients(15)
        );
    }

    /// A whole packet whose fields run past its end is malformed, not a
    /// packet still arriving: rumqttd's V5 decoder takes it out of the
    /// buffer and asks for more bytes, which used to drop it silently.
    #[test]
    fn fields_past_the_end_of_a_packet_are_malformed() {
        for bytes in [
            &[0x30u8, 0x03, 0x00, 0x01, b'a'][..], // PUBLISH without its property length
            &[0x40, 0x05, 0x00, 0x01, 0x00, 0xa2, 0xb8], // PUBACK, property length cut short
            &[0x62, 0x05, 0x00, 0x01, 0x00, 0x94, 0xa3], // PUBREL, same
            &[0xa2, 0x02, 0x8e, 0x00],             // UNSUBSCRIBE without properties
            &[0x82, 0x04, 0x00, 0x01, 0x02, 0x0b], // SUBSCRIBE, property cut short
        ] {
            let mut buf = BytesMut::from(bytes);
            let result = Codec::new(Version::V5, 1 << 20).decode(&mut buf);
            assert!(matches!(result, Err(DecodeError::Malformed(_))), "{bytes:x?}: {result:?}");
        }
        // Not yet whole: more bytes are needed, and nothing is taken.
        let mut buf = BytesMut::from(&[0x30u8, 0x05, 0x00, 0x01][..]);
        assert!(Codec::new(Version::V5, 1 << 20).decode(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), 4);
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(
            Codec::new(Version::V5, usize::MAX).decode(&mut buf),
            Err(DecodeError::Malformed(_))
        ));
    }

    /// MQTT 5 §3.14.2.2.1: a DISCONNECT may be its reason code alone.
    #[test]
    fn a_v5_disconnect_may_omit_its_property_length() {
        use rumqttd::protocol::Disconnect;
        for (reason, code) in [
            (0x00, DisconnectReasonCode::NormalDisconnection),
            (0x04, DisconnectReasonCode::DisconnectWithWillMessage),
        ] {
            let mut buf = BytesMut::from(&[0xe0u8, 0x01, reason, 0xc0, 0x00][..]);
            let codec = Codec::new(Version::V5, 1 << 20);
            let decoded = codec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(decoded.size, 3);
            assert!(
                matches!(decoded.packet, Packet::Disconnect(Disconnect { reason_code }, None) if reason_code == code)
            );
            assert_eq!(&buf[..], &[0xc0, 0x00], "the next packet is left alone");
        }
        assert!(
            matches!(decode(Version::V5, &[0xe0, 0x01, 0x03]), Err(DecodeError::Malformed(_))),
            "no such reason"
        );
    }

    /// A byte as client bytes tend to be: lengths and flags near zero.
    fn byte() -> impl proptest::strategy::Strategy<Value = u8> {
        use proptest::prelude::*;
        prop_oneof![Just(0u8), Just(1u8), 0u8..8, any::<u8>()]
    }

    /// A first byte: mostly a packet type with the flags it needs.
    fn first_byte() -> impl proptest::strategy::Strategy<Value = u8> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0u8..16).prop_map(|t| (t << 4) | if matches!(t, 6 | 8 | 10) { 2 } else { 0 }),
            1 => (0u8..4).prop_map(|qos| 0x30 | (qos << 1)),
            1 => any::<u8>(),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Whatever a client sends, at either level: the codec neither
        /// panics nor loses a packet (`None` takes nothing; a packet taken
        /// is as long as it says). Framed packets of every type with
        /// random bodies, and random bytes after them.
        #[test]
        fn any_bytes_decode_without_panic_or_loss(
            first in first_byte(),
            body in proptest::collection::vec(byte(), 0..48),
            framed in proptest::prelude::any::<bool>(),
            tail in proptest::collection::vec(byte(), 0..8),
        ) {
            let mut bytes = vec![first];
            if framed {
                bytes.push(body.len() as u8);
            }
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(&tail);
            for version in [Version::V311, Version::V5] {
                let codec = Codec::new(version, 1 << 20);
                let mut buf = BytesMut::from(&bytes[..]);
                loop {
                    let before = buf.len();
                    match codec.decode(&mut buf) {
                        Ok(Some(decoded)) => {
                            proptest::prop_assert!(decoded.size > 0);
                            proptest::prop_assert_eq!(before - buf.len(), decoded.size);
                        }
                        Ok(None) => {
                            proptest::prop_assert_eq!(buf.len(), before, "nothing taken while waiting");
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }

    #[test]
    fn v5_disconnect_with_a_reason_is_well_formed() {
        use rumqttd::protocol::Disconnect;
        let codec = Codec::new(Version::V5, 1 << 20);
        for reason in [
            DisconnectReasonCode::ServerShuttingDown,
            DisconnectReasonCode::SessionTakenOver,
            DisconnectReasonCode::NormalDisconnection,
        ] {
            let mut out = BytesMut::new();
            codec.encode(Packet::Disconnect(Disconnect { reason_code: reason }, None), &mut out).unwrap();
            assert_eq!(usize::from(out[1]), out.len() - 2, "remaining length matches: {out:x?}");
            let mut back = out.clone();
            let decoded = V5.read_mut(&mut back, 1 << 20).unwrap();
            assert!(matches!(decoded, Packet::Disconnect(d, _) if d.reason_code == reason), "{out:x?}");
            assert_eq!(out[2], disconnect_code(reason));
        }
    }

    /// A whole packet: `first`, then a body of `head`, a property section
    /// holding `properties`, and `tail`.
    fn with_properties(first: u8, head: &[u8], properties: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut body = head.to_vec();
        let mut len = properties.len();
        loop {
            body.push((len as u8 & 0x7f) | if len > 0x7f { 0x80 } else { 0 });
            len >>= 7;
            if len == 0 {
                break;
            }
        }
        body.extend_from_slice(properties);
        body.extend_from_slice(tail);
        let mut out = vec![first];
        let mut len = body.len();
        loop {
            out.push((len as u8 & 0x7f) | if len > 0x7f { 0x80 } else { 0 });
            len >>= 7;
            if len == 0 {
                break;
            }
        }
        out.extend(body);
        out
    }

    const USER: &[u8] = &[0x26, 0, 1, b'k', 0, 1, b'v'];

    /// MQTT 5 §2.2.2.2: a property given twice is a protocol error, in
    /// every property section a client sends; User Property may repeat.
    #[test]
    fn a_property_given_twice_is_a_protocol_error() {
        let expiry = [0x02, 0, 0, 0, 9];
        let reason = [0x1f, 0, 2, b'n', b'o'];
        let session = [0x11, 0, 0, 0, 60];
        let connect_head = b"\x00\x04MQTT\x05\x02\x00\x1e";
        let will_head = b"\x00\x04MQTT\x05\x06\x00\x1e";
        let cases: Vec<(&str, Vec<u8>, u8)> = vec![
            (
                "CONNECT",
                with_properties(0x10, connect_head, &[session, session].concat(), b"\x00\x01c"),
                0x11,
            ),
            (
                "CONNECT will",
                with_properties(
                    0x10,
                    &[&will_head[..], &[0x00, 0x00, 0x01, b'c']].concat(),
                    &[0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 2],
                    b"\x00\x01t\x00\x01m",
                ),
                0x18,
            ),
            ("PUBLISH", with_properties(0x30, b"\x00\x01t", &[expiry, expiry].concat(), b"payload"), 0x02),
            (
                "PUBLISH QoS 1",
                with_properties(0x32, b"\x00\x01t\x00\x07", &[&expiry[..], USER, &expiry].concat(), b""),
                0x02,
            ),
            ("PUBACK", with_properties(0x40, b"\x00\x01\x10", &[reason, reason].concat(), b""), 0x1f),
            ("PUBREC", with_properties(0x50, b"\x00\x01\x10", &[reason, reason].concat(), b""), 0x1f),
            ("PUBREL", with_properties(0x62, b"\x00\x01\x00", &[reason, reason].concat(), b""), 0x1f),
            ("PUBCOMP", with_properties(0x70, b"\x00\x01\x00", &[reason, reason].concat(), b""), 0x1f),
            ("SUBSCRIBE", with_properties(0x82, b"\x00\x01", &[0x0b, 1, 0x0b, 2], b"\x00\x01a\x00"), 0x0b),
            ("DISCONNECT", with_properties(0xe0, b"\x00", &[session, session].concat(), b""), 0x11),
        ];
        for (name, bytes, id) in cases {
            assert_eq!(repeated_property(&bytes), Some(id), "{name}");
            let result = decode(Version::V5, &bytes);
            assert!(
                matches!(result, Err(DecodeError::RepeatedProperty(got)) if got == id),
                "{name}: {result:?}"
            );
        }
        // User Property as often as the client likes.
        for bytes in [
            with_properties(0x30, b"\x00\x01t", &[USER, USER, USER].concat(), b"payload"),
            with_properties(0x10, connect_head, &[USER, USER].concat(), b"\x00\x01c"),
            with_properties(0xa2, b"\x00\x01", &[USER, USER].concat(), b"\x00\x01a"),
            with_properties(0xe0, b"\x00", &[&session[..], USER, USER].concat(), b""),
        ] {
            assert_eq!(repeated_property(&bytes), None, "{bytes:x?}");
            assert!(decode(Version::V5, &bytes).unwrap().is_some(), "{bytes:x?}");
        }
        // A malformed packet is still malformed, repetition or not: here
        // a property identifier that does not exist follows the two.
        let bad = with_properties(0x30, b"\x00\x01t", &[&expiry[..], &expiry, &[0x7f]].concat(), b"");
        assert_eq!(repeated_property(&bad), Some(0x02));
        assert!(matches!(decode(Version::V5, &bad), Err(DecodeError::Malformed(_))));
        // 3.1.1 has no properties: nothing is looked for.
        let v4 = with_properties(0x30, b"\x00\x01t", &[expiry, expiry].concat(), b"");
        assert!(decode(Version::V311, &v4).unwrap().is_some());
    }

    /// Every property identifier MQTT 5 defines, with a value of its type.
    const PROPERTIES: &[&[u8]] = &[
        &[0x01, 1],
        &[0x02, 0, 0, 0, 5],
        &[0x03, 0, 1, b'x'],
        &[0x08, 0, 2, b'r', b't'],
        &[0x09, 0, 0],
        &[0x0b, 0x80, 0x01],
        &[0x11, 0, 0, 0, 1],
        &[0x12, 0, 1, b'i'],
        &[0x13, 0, 9],
        &[0x15, 0, 1, b'm'],
        &[0x16, 0, 1, 0xff],
        &[0x17, 1],
        &[0x18, 0, 0, 0, 3],
        &[0x19, 0],
        &[0x1a, 0, 1, b'r'],
        &[0x1c, 0, 1, b's'],
        &[0x1f, 0, 3, b'w', b'h', b'y'],
        &[0x21, 0, 10],
        &[0x22, 0, 10],
        &[0x23, 0, 1],
        &[0x24, 1],
        &[0x25, 1],
        &[0x26, 0, 1, b'k', 0, 0],
        &[0x27, 0, 0, 1, 0],
        &[0x28, 1],
        &[0x29, 1],
        &[0x2a, 1],
    ];

    proptest::proptest! {
        /// Whatever properties come in whatever order, the scanner names
        /// the first one that comes a second time (User Property never),
        /// in a SUBSCRIBE's section and in a QoS 1 PUBLISH's.
        #[test]
        fn the_scanner_finds_the_first_repetition(
            picks in proptest::collection::vec(0..PROPERTIES.len(), 0..12),
        ) {
            let mut expected = None;
            let mut seen = Vec::new();
            for &i in &picks {
                let id = PROPERTIES[i][0];
                if expected.is_none() && id != 0x26 && seen.contains(&id) {
                    expected = Some(id);
                }
                seen.push(id);
            }
            let properties: Vec<u8> = picks.iter().flat_map(|&i| PROPERTIES[i].iter().copied()).collect();
            let subscribe = with_properties(0x82, b"\x00\x01", &properties, b"\x00\x01a\x00");
            proptest::prop_assert_eq!(repeated_property(&subscribe), expected);
            let publish = with_properties(0x32, b"\x00\x01t\x00\x01", &properties, b"payload");
            proptest::prop_assert_eq!(repeated_property(&publish), expected);
        }
    }

    #[test]
    fn decodes_in_pieces() {
        let codec = Codec::new(Version::V311, 1 << 20);
        let bytes = connect(b"MQTT", 4);
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let decoded = codec.decode(&mut buf).unwrap();
            assert_eq!(decoded.is_some(), i + 1 == bytes.len());
            if let Some(d) = decoded {
                assert_eq!(d.packet_type, 1);
                assert_eq!(d.size, bytes.len());
                assert!(matches!(d.packet, Packet::Connect(..)));
            }
        }
        assert!(buf.is_empty());
    }
}
