//! What one NATS message carries between bridges.
//!
//! A publish travels as the MQTT 5 PUBLISH packet itself (rumqttd's
//! codec, as sessions use it: QoS, RETAIN, topic, properties, payload),
//! after a fixed head: a version byte, the origin node's id and the
//! message's sequence number on that node (8 bytes each, big-endian). The
//! id and number let a receiver drop a message it got twice through
//! overlapping subscriptions ([`Seen`]). A take-over announcement is the
//! version byte, the node's id and the client id.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::{Packet, Publish, PublishProperties};

use crate::mqtt::codec::{Codec, Decoded, Version};

/// The envelope's version: a bridge drops messages of another.
const VERSION: u8 = 1;

/// The fixed head before the packet.
const HEAD: usize = 1 + 8 + 8;

/// A publish as it arrived from another node.
#[derive(Debug)]
pub(crate) struct Arrived {
    pub(crate) node: u64,
    pub(crate) seq: u64,
    pub(crate) publish: Publish,
    pub(crate) properties: Option<PublishProperties>,
    pub(crate) qos: u8,
}

/// Why a NATS message was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("too short")]
    Short,
    #[error("envelope version {0}")]
    Version(u8),
    #[error("not an MQTT 5 PUBLISH")]
    NotPublish,
}

/// The NATS payload for a publish.
pub(crate) fn seal(node: u64, seq: u64, publish: Publish, properties: Option<PublishProperties>) -> Bytes {
    let mut out = BytesMut::with_capacity(HEAD + 16 + publish.topic.len() + publish.payload.len());
    out.put_u8(VERSION);
    out.put_u64(node);
    out.put_u64(seq);
    // The codec takes any PUBLISH the router took; a failure would be a bug
    // in it, and the message is then sent without its packet (and dropped
    // by the receiver as malformed).
    let _ = Codec::new(Version::V5, usize::MAX).encode(Packet::Publish(publish, properties), &mut out);
    out.freeze()
}

/// A publish from a NATS payload.
pub(crate) fn open(payload: &[u8], max_packet: usize) -> Result<Arrived, Malformed> {
    let (node, rest) = head(payload)?;
    let (seq, packet) = rest.split_first_chunk::<8>().ok_or(Malformed::Short)?;
    let mut buf = BytesMut::from(packet);
    match Codec::new(Version::V5, max_packet).decode(&mut buf) {
        Ok(Some(Decoded { packet: Packet::Publish(publish, properties), flags, .. })) if buf.is_empty() => {
            Ok(Arrived { node, seq: u64::from_be_bytes(*seq), publish, properties, qos: (flags >> 1) & 3 })
        }
        _ => Err(Malformed::NotPublish),
    }
}

/// The version check and the node id; what follows the node id.
fn head(payload: &[u8]) -> Result<(u64, &[u8]), Malformed> {
    let (&version, rest) = payload.split_first().ok_or(Malformed::Short)?;
    if version != VERSION {
        return Err(Malformed::Version(version));
    }
    let (node, rest) = rest.split_first_chunk::<8>().ok_or(Malformed::Short)?;
    Ok((u64::from_be_bytes(*node), rest))
}

/// The NATS payload announcing that `client_id` connected on `node`.
pub(crate) fn announce(node: u64, client_id: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(9 + client_id.len());
    out.put_u8(VERSION);
    out.put_u64(node);
    out.extend_from_slice(client_id.as_bytes());
    out.freeze()
}

/// The client id of a take-over announcement.
pub(crate) fn announced(payload: &[u8]) -> Result<(u64, String), Malformed> {
    let (node, id) = head(payload)?;
    let id = std::str::from_utf8(id).map_err(|_| Malformed::NotPublish)?;
    Ok((node, id.to_owned()))
}

/// The sequence numbers seen lately from each node, to drop a message that
/// came twice (NATS delivers a message once per matching subscription, and
/// `a/+` and `+/b` both match `a/b`). A node's messages arrive in order on
/// each subscription, and their copies close together: a window of the
/// last [`WINDOW`] numbers per node is plenty. Older numbers count as seen.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    nodes: std::collections::HashMap<u64, Window>,
}

/// Sequence numbers per node remembered.
const WINDOW: u64 = 1024;

/// Nodes remembered; past it (nodes restarted many times: each start is a
/// new id) the memory starts over.
const MAX_NODES: usize = 4096;

#[derive(Debug)]
struct Window {
    /// The highest number seen.
    top: u64,
    /// Bit `i` of the ring: number `n` with `n % WINDOW == i` was seen.
    bits: [u64; (WINDOW / 64) as usize],
}

impl Seen {
    /// Whether this is the first time `(node, seq)` comes.
    pub(crate) fn first(&mut self, node: u64, seq: u64) -> bool {
        if self.nodes.len() >= MAX_NODES && !self.nodes.contains_key(&node) {
            self.nodes.clear();
        }
        let window = self.nodes.entry(node).or_insert(Window { top: 0, bits: [0; (WINDOW / 64) as usize] });
        let bit = |n: u64| ((n % WINDOW / 64) as usize, 1u64 << (n % 64));
        if seq > window.top {
            // Clear what slides out of the window.
            let cleared = (seq - window.top).min(WINDOW);
            for n in (seq - cleared + 1)..=seq {
                let (word, mask) = bit(n);
                window.bits[word] &= !mask;
            }
            window.top = seq;
        } else if window.top - seq >= WINDOW {
            return false;
        }
        let (word, mask) = bit(seq);
        let first = window.bits[word] & mask == 0;
        window.bits[word] |= mask;
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::QoS;

    fn publish(qos: u8, retain: bool) -> Publish {
        let mut raw = BytesMut::new();
        raw.put_u8(0x30 | u8::from(retain) | (qos << 1));
        raw.put_u16(qos.into());
        raw.put_u16(3);
        raw.extend_from_slice(b"a/b");
        raw.extend_from_slice(b"payload");
        Publish::deserialize(raw.freeze())
    }

    #[test]
    fn a_publish_round_trips_with_qos_retain_and_properties() {
        for (qos, retain) in [(0, false), (1, true), (2, false)] {
            let properties = PublishProperties {
                message_expiry_interval: Some(60),
                user_properties: vec![("k".into(), "v".into())],
                correlation_data: Some(Bytes::from_static(b"\x00\xff")),
                content_type: Some("text/plain".into()),
                ..Default::default()
            };
            let sealed = seal(7, 42, publish(qos, retain), Some(properties.clone()));
            let arrived = open(&sealed, 1 << 20).unwrap();
            assert_eq!((arrived.node, arrived.seq, arrived.qos), (7, 42, qos));
            assert_eq!(
                arrived.publish.qos(),
                [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][qos as usize]
            );
            assert_eq!(arrived.publish.retain, retain);
            assert_eq!(&arrived.publish.topic[..], b"a/b");
            assert_eq!(&arrived.publish.payload[..], b"payload");
            assert_eq!(arrived.properties, Some(properties));
        }
        let sealed = seal(7, 43, publish(0, false), None);
        assert_eq!(open(&sealed, 1 << 20).unwrap().properties, None);
        assert_eq!(open(&sealed[..5], 1 << 20).unwrap_err(), Malformed::Short);
        assert_eq!(open(&sealed[..sealed.len() - 1], 1 << 20).unwrap_err(), Malformed::NotPublish);
        let mut other = sealed.to_vec();
        other[0] = 9;
        assert_eq!(open(&other, 1 << 20).unwrap_err(), Malformed::Version(9));
        assert_eq!(announced(&announce(5, "client-1")).unwrap(), (5, "client-1".to_owned()));
    }

    #[test]
    fn each_message_is_taken_once() {
        let mut seen = Seen::default();
        assert!(seen.first(1, 1));
        assert!(!seen.first(1, 1));
        assert!(seen.first(2, 1), "another node");
        assert!(seen.first(1, 3));
        assert!(seen.first(1, 2), "late but new");
        assert!(!seen.first(1, 2));
        assert!(seen.first(1, 3 + WINDOW));
        assert!(!seen.first(1, 3), "out of the window");
        assert!(seen.first(1, 4 + WINDOW));
        assert!(!seen.first(1, 4 + WINDOW));
        assert!(seen.first(1, 10 * WINDOW), "a jump clears the window");
        assert!(seen.first(1, 10 * WINDOW - 1));
    }
}
