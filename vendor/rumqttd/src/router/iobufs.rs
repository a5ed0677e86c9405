use std::{
    collections::{HashMap, VecDeque},
    num::NonZeroU32,
    sync::Arc,
};

use parking_lot::Mutex;
use tracing::debug;

use crate::{
    link::outbox::{Outbox, OutboxTx},
    protocol::Packet,
    router::FilterIdx,
    Cursor, Notification,
};

use super::{Forward, IncomingMeter, OutgoingMeter};

/// The in-flight window of a client that asked for none (see
/// `limit_inflight`).
const MAX_INFLIGHT: usize = 100;
/// echo-server patch: packet ids go round at the largest one MQTT has
/// (was: at `MAX_INFLIGHT`, which tied the window to 100 at most). With
/// acknowledgements in order and at most the window in flight, an id comes
/// back only once its last use was acknowledged, whatever the window.
const MAX_PKID: u16 = u16::MAX;

#[derive(Debug)]
pub struct Incoming {
    /// Identifier associated with connected client. echo-server patch: one
    /// copy shared with `Outgoing` and the router's connection map (were
    /// three `String`s per connected client).
    pub(crate) client_id: Arc<str>,
    /// Recv buffer
    pub(crate) buffer: Arc<Mutex<VecDeque<Packet>>>,
    /// incoming metrics
    pub(crate) meter: IncomingMeter,
}

impl Incoming {
    #[inline]
    pub(crate) fn new(client_id: impl Into<Arc<str>>) -> Self {
        let client_id = client_id.into();
        Self {
            // echo-server patch: grows on demand (was 200 packets up front)
            buffer: Arc::new(Mutex::new(VecDeque::new())),
            meter: Default::default(),
            client_id,
        }
    }

    #[inline]
    pub(crate) fn buffer(&self) -> Arc<Mutex<VecDeque<Packet>>> {
        self.buffer.clone()
    }

    #[inline]
    pub(crate) fn exchange(&mut self, mut v: VecDeque<Packet>) -> VecDeque<Packet> {
        std::mem::swap(&mut v, &mut self.buffer.lock());
        v
    }
}

#[derive(Debug)]
pub struct Outgoing {
    /// Identifier associated with connected client (echo-server patch:
    /// shared, see `Incoming::client_id`)
    pub(crate) client_id: Arc<str>,
    /// Send buffer, and the wake-up of the link that reads it
    /// (echo-server patch: one shared record, was a buffer and a flume
    /// channel, see `link::outbox`)
    pub(crate) handle: OutboxTx,
    /// The buffer to keep track of inflight packets.
    inflight_buffer: VecDeque<(u16, FilterIdx, Option<Cursor>)>,
    /// PubRels waiting for PubComp
    pub(crate) unacked_pubrels: VecDeque<u16>,
    /// Last packet id
    last_pkid: u16,
    /// Metrics of outgoing messages of this connection
    pub(crate) meter: OutgoingMeter,
    /// echo-server patch: the most QoS 1 and 2 publishes this client may
    /// have unacknowledged: the lower of its MQTT 5 Receive Maximum and
    /// the server's limit (see `limit_inflight`). This and the next are small
    /// types so that they fit in `Outgoing`'s padding: an `Outgoing` travels
    /// in `Event::Connect`, so every `Event` is as large, and every future
    /// that sends an event to the router holds one.
    inflight_limit: u16,
    /// echo-server patch: the largest packet the client accepts, its MQTT 5
    /// Maximum Packet Size (see `limit_packet_size`).
    max_packet_size: Option<NonZeroU32>,
}

impl Outgoing {
    #[inline]
    pub(crate) fn new(client_id: impl Into<Arc<str>>) -> (Self, Arc<Outbox>) {
        let client_id = client_id.into();
        let handle = OutboxTx::new();
        let rx = handle.outbox();
        // echo-server patch: these grow on demand (they were allocated at
        // their maximum up front, ~50 KB per connection, idle or not).
        let inflight_buffer = VecDeque::new();
        let unacked_pubrels = VecDeque::new();

        let outgoing = Self {
            client_id,
            inflight_buffer,
            unacked_pubrels,
            handle,
            last_pkid: 0,
            meter: Default::default(),
            inflight_limit: MAX_INFLIGHT as u16,
            max_packet_size: None,
        };

        (outgoing, rx)
    }

    /// echo-server patch: the in-flight window the router keeps to for
    /// this client: no more than this many QoS 1 and 2 publishes are sent
    /// unacknowledged (0.20.0 sent up to `MAX_INFLIGHT` whatever the client
    /// said). The caller passes the lower of the client's MQTT 5 Receive
    /// Maximum (§3.1.2.11.3) and the server's own limit. The rest stay in
    /// their topics' logs until acknowledgements make room, as for any
    /// client whose window is full. Never less than 1 (0 is a protocol
    /// error, refused before a link is built). Without this call,
    /// `MAX_INFLIGHT`.
    pub fn limit_inflight(&mut self, receive_maximum: u16) {
        self.inflight_limit = receive_maximum.max(1);
    }

    /// echo-server patch: the client's Maximum Packet Size (MQTT 5
    /// §3.1.2.11.4). A publish that would make a larger packet is not sent
    /// to this client: `push_forwards` drops it before it takes a packet id
    /// or an in-flight slot, so nothing waits for an acknowledgement that
    /// cannot come (the spec: discard it and act as if it had been sent).
    pub fn limit_packet_size(&mut self, max: u32) {
        self.max_packet_size = NonZeroU32::new(max);
    }

    /// How many more QoS 1 and 2 publishes may be sent now. echo-server
    /// patch: a QoS 2 delivery counts until its PUBCOMP (MQTT 5 §4.9), so
    /// the PUBRELs awaiting one count too, against the client's own limit
    /// (was: `MAX_INFLIGHT` less those awaiting a PUBACK or PUBREC only).
    pub fn free_slots(&self) -> usize {
        usize::from(self.inflight_limit)
            .saturating_sub(self.inflight_buffer.len() + self.unacked_pubrels.len())
    }

    pub fn push_notification(&mut self, notification: Notification) -> usize {
        let mut buffer = self.handle.lock();
        buffer.push_back(notification);
        buffer.len()
    }

    /// Push packets to the outgoing buffer. echo-server patch: returns
    /// the counts of notifications buffered, of publishes in flight, and
    /// of publishes dropped as too large for the client (`fits`).
    pub fn push_forwards(
        &mut self,
        publishes: impl Iterator<Item = Forward>,
        qos: u8,
        filter_idx: usize,
    ) -> (usize, usize, usize) {
        let (max, mut dropped) = (self.max_packet_size, 0);
        let publishes = publishes.filter(|p| {
            let fits = fits(max, p);
            dropped += usize::from(!fits);
            fits
        });
        let mut buffer = self.handle.lock();

        if qos == 0 {
            for p in publishes {
                self.meter.publish_count += 1;
                buffer.push_back(Notification::Forward(p));
                // self.meter.total_size += p.len();
            }

            // self.meter.update_data_rate(total_size);
            let buffer_count = buffer.len();
            let inflight_count = self.inflight_buffer.len();
            return (buffer_count, inflight_count, dropped);
        }

        for mut p in publishes {
            // echo-server patch: a message delivered at QoS 0 on a QoS 1/2
            // subscription (its publish was QoS 0) takes no packet id and
            // no in-flight slot: nothing will acknowledge it.
            if p.publish.qos == crate::protocol::QoS::AtMostOnce {
                p.publish.pkid = 0;
                self.meter.publish_count += 1;
                buffer.push_back(Notification::Forward(p));
                continue;
            }
            // Index and pkid of current outgoing packet
            self.last_pkid += 1;
            p.publish.pkid = self.last_pkid;

            self.inflight_buffer
                .push_back((self.last_pkid, filter_idx, p.cursor));

            // Place max pkid packet at index 0
            if self.last_pkid == MAX_PKID {
                self.last_pkid = 0;
            }

            self.meter.publish_count += 1;
            self.meter.total_size += p.publish.topic.len() + p.publish.payload.len();
            buffer.push_back(Notification::Forward(p));
        }

        let buffer_count = buffer.len();
        let inflight_count = self.inflight_buffer.len();

        if inflight_count > usize::from(self.inflight_limit) {
            // echo-server patch: debug, as everything a client causes per
            // packet (see PATCHED.md)
            debug!(
                "More inflight publishes than max allowed, inflight count = {}, max allowed = {}",
                inflight_count, self.inflight_limit
            );
        }

        (buffer_count, inflight_count, dropped)
    }

    // Returns (unsolicited, outoforder) flags
    // Return: Out of order or unsolicited acks
    /// echo-server patch: returns the log the acknowledged delivery came
    /// from (was `()`), which may now forget it (`Router::trim_read_logs`).
    pub fn register_ack(&mut self, pkid: u16) -> Option<FilterIdx> {
        let (head, filter_idx, _cursor) = self.inflight_buffer.pop_front()?;

        // We don't support out of order acks
        if pkid != head {
            debug!(pkid, head, "out of order ack.");
            return None;
        }

        Some(filter_idx)
    }

    pub fn register_pubrec(&mut self, pkid: u16) {
        // NOTE: we can return true of false
        // to indicate whether this is duplicate or not
        self.unacked_pubrels.push_back(pkid);
    }

    // OASIS standards don't specify anything about ordering of PubComp
    // https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901240
    // But we don't support out of order / unsolicited pubcomps
    // to be consistent with the behaviour with other acks
    pub fn register_pubcomp(&mut self, pkid: u16) -> Option<()> {
        let id = self.unacked_pubrels.pop_front()?;

        // out of order acks
        if pkid != id {
            debug!(pkid, id, "out of order ack.");
            return None;
        }

        Some(())
    }

    /// echo-server patch: the messages in flight from a filter the client
    /// has unsubscribed from keep their packet ids (they still need their
    /// acks) but no longer point into the filter's log, which may be freed
    /// and its index given to another filter.
    pub fn forget_cursors(&mut self, filter_idx: FilterIdx) {
        for (_, idx, cursor) in self.inflight_buffer.iter_mut() {
            if *idx == filter_idx {
                *cursor = None;
            }
        }
    }

    /// echo-server patch: the offset of the oldest publish from log
    /// `filter_idx` that awaits its acknowledgement: a resumed session
    /// reads the log again from there (`retransmission_map`), so the log
    /// keeps it (`Router::trim_read_logs`). The buffer is in sending order,
    /// so the first match is the oldest.
    pub fn oldest_inflight(&self, filter_idx: FilterIdx) -> Option<Cursor> {
        self.inflight_buffer
            .iter()
            .find(|(_, idx, cursor)| *idx == filter_idx && cursor.is_some())
            .and_then(|(_, _, cursor)| *cursor)
    }

    // Here we are assuming that the first unique filter_idx we find while iterating will have the
    // least corresponding cursor because of the way we insert into the inflight_buffer
    pub fn retransmission_map(&self) -> HashMap<FilterIdx, Cursor> {
        let mut o = HashMap::new();
        for (_, filter_idx, cursor) in self.inflight_buffer.iter() {
            // if cursor in None, it means it was a retained publish
            if !o.contains_key(filter_idx) && cursor.is_some() {
                o.insert(*filter_idx, cursor.unwrap());
            }
        }

        o
    }
}

/// echo-server patch: whether a publish makes a packet of at most `max`
/// bytes (no limit: `None`).
fn fits(max: Option<NonZeroU32>, forward: &Forward) -> bool {
    match max {
        Some(max) => {
            let size =
                crate::protocol::v5::publish_packet_size(&forward.publish, &forward.properties);
            u32::try_from(size).is_ok_and(|size| size <= max.get())
        }
        None => true,
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn retransmission_map_is_calculated_accurately() {
        let (mut outgoing, _) = Outgoing::new("retransmission-test".to_string());
        let mut result = HashMap::new();

        result.insert(0, (0, 8));
        result.insert(1, (0, 1));
        result.insert(2, (1, 1));
        result.insert(3, (1, 0));

        let buf = vec![
            (1, 0, Some((0, 8))),
            (1, 0, Some((0, 10))),
            (1, 1, Some((0, 1))),
            (3, 1, Some((0, 4))),
            (2, 2, Some((1, 1))),
            (1, 2, Some((2, 6))),
            (1, 2, Some((2, 1))),
            (1, 3, Some((1, 0))),
            (1, 3, Some((1, 1))),
            (1, 3, Some((1, 3))),
            (1, 3, Some((1, 3))),
        ];

        outgoing.inflight_buffer.extend(buf);
        assert_eq!(outgoing.retransmission_map(), result);
    }

    // use super::{Outgoing, MAX_INFLIGHT};
    // use crate::protocol::{Publish, QoS};
    // use crate::router::Forward;
    // use crate::Notification;
    //
    // fn publishes(count: usize) -> impl Iterator<Item = Forward> {
    //     (1..=count).map(|v| {
    //         let publish = Publish {
    //             dup: false,
    //             retain: false,
    //             pkid: 0,
    //             qos: QoS::AtLeastOnce,
    //             topic: "hello/world".into(),
    //             payload: vec![1, 2, 3].into(),
    //         };
    //
    //         Forward {
    //             cursor: (0, v as u64),
    //             publish,
    //             size: 0,
    //         }
    //     })
    // }
    //
    // #[test]
    // fn inflight_ring_buffer_pushes_correctly() {
    //     let count = MAX_INFLIGHT as usize;
    //     let (mut outgoing, _rx) = Outgoing::new("hello".to_owned());
    //     outgoing.push_forwards(publishes(count), 1, 3);
    //
    //     // Index 1 = (0, 1), Index 99 = (0, 99), Index 0 = (0, 100)
    //     assert_eq!(outgoing.inflight_buffer[0].unwrap().1, (0, count as u64));
    //     for i in 1..count {
    //         assert_eq!(outgoing.inflight_buffer[i].unwrap().1, (0, i as u64));
    //     }
    //
    //     // Outgoing publish pkids are as expected
    //     for (i, o) in outgoing.handle.lock().iter().enumerate() {
    //         let pkid = match &o {
    //             Notification::Forward(f) => f.publish.pkid,
    //             _ => unreachable!(),
    //         };
    //
    //         assert_eq!(pkid, i as u16 + 1);
    //     }
    // }
    //
    // #[test]
    // fn inflight_ring_buffer_pops_correctly() {
    //     let (mut outgoing, _rx) = Outgoing::new("hello".to_owned());
    //     outgoing.push_forwards(publishes(MAX_INFLIGHT as usize), 1, 3);
    //
    //     for pkid in 1..=MAX_INFLIGHT {
    //         let (unsolicited, outoforder) = outgoing.register_ack(pkid);
    //         assert_eq!(unsolicited, false);
    //         assert_eq!(outoforder, false);
    //     }
    // }
}

#[cfg(test)]
mod echo_server_patch {
    use super::*;
    use crate::protocol::{v5::V5, Protocol, Publish, PublishProperties, QoS};
    use bytes::BytesMut;

    fn forward(qos: QoS, payload: usize, properties: Option<PublishProperties>) -> Forward {
        let publish = Publish {
            qos,
            topic: "a/b".into(),
            payload: vec![b'x'; payload].into(),
            ..Default::default()
        };
        Forward { cursor: Some((0, 0)), size: 0, publish, properties }
    }

    fn pkids(outgoing: &Outgoing) -> Vec<u16> {
        let buffer = outgoing.handle.lock();
        buffer
            .iter()
            .map(|n| match n {
                Notification::Forward(f) => f.publish.pkid,
                other => panic!("not a forward: {other:?}"),
            })
            .collect()
    }

    /// `publish_packet_size` is what the MQTT 5 writer writes, packet id
    /// included above QoS 0 (assigned or not), across the sizes where the
    /// remaining length takes one more byte.
    #[test]
    fn publish_packet_size_is_the_written_size() {
        let properties = PublishProperties {
            user_properties: vec![("k".into(), "v".repeat(40))],
            subscription_identifiers: vec![7],
            ..Default::default()
        };
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for props in [None, Some(properties.clone())] {
                for payload in [0, 100, 112, 113, 114, 200, 16_370, 16_400] {
                    let f = forward(qos, payload, props.clone());
                    let size = crate::protocol::v5::publish_packet_size(&f.publish, &f.properties);
                    let mut sent = f.publish.clone();
                    if qos != QoS::AtMostOnce {
                        sent.pkid = 9;
                    }
                    let mut buffer = BytesMut::new();
                    V5.write(Packet::Publish(sent, f.properties), &mut buffer).unwrap();
                    assert_eq!(size, buffer.len(), "{qos:?} {payload} bytes");
                }
            }
        }
    }

    /// The window is what the caller says (`MAX_INFLIGHT` by default), and
    /// a QoS 2 delivery holds its slot until its PUBCOMP.
    #[test]
    fn the_inflight_window_is_the_clients() {
        let (mut outgoing, _rx) = Outgoing::new("window".to_owned());
        assert_eq!(outgoing.free_slots(), MAX_INFLIGHT);
        outgoing.limit_inflight(500);
        assert_eq!(outgoing.free_slots(), 500);
        outgoing.limit_inflight(3);
        let two = (0..2).map(|_| forward(QoS::ExactlyOnce, 1, None));
        outgoing.push_forwards(two, 2, 0);
        assert_eq!(outgoing.free_slots(), 1);
        outgoing.register_ack(1).unwrap();
        outgoing.register_pubrec(1);
        assert_eq!(outgoing.free_slots(), 1, "PUBREC'd, awaiting PUBCOMP");
        outgoing.register_pubcomp(1).unwrap();
        assert_eq!(outgoing.free_slots(), 2);
        outgoing.limit_inflight(1);
        assert_eq!(outgoing.free_slots(), 0);
    }

    /// A window wider than 100 (the old packet-id cycle): packet ids keep
    /// counting past 100, none in flight twice.
    #[test]
    fn packet_ids_go_past_a_hundred() {
        let (mut outgoing, _rx) = Outgoing::new("wide".to_owned());
        outgoing.limit_inflight(300);
        let many = (0..250).map(|_| forward(QoS::AtLeastOnce, 1, None));
        outgoing.push_forwards(many, 1, 0);
        assert_eq!(outgoing.free_slots(), 50);
        let ids: Vec<u16> = outgoing.inflight_buffer.iter().map(|(pkid, ..)| *pkid).collect();
        assert_eq!(ids, (1..=250).collect::<Vec<u16>>());
    }

    /// Publishes too large for the client are dropped before they take a
    /// packet id or a slot; the others go out as before, exactly at the
    /// limit included.
    #[test]
    fn publishes_over_the_clients_maximum_packet_size_are_dropped() {
        let (mut outgoing, _rx) = Outgoing::new("small".to_owned());
        // QoS 1 "a/b" without properties: 10 bytes and the payload.
        outgoing.limit_packet_size(100);
        let forwards = [90, 91, 500, 1].map(|payload| forward(QoS::AtLeastOnce, payload, None));
        let (buffered, inflight, dropped) = outgoing.push_forwards(forwards.into_iter(), 1, 0);
        assert_eq!((buffered, inflight, dropped), (2, 2, 2));
        assert_eq!(pkids(&outgoing), [1, 2]);
        // QoS 0: 8 bytes and the payload.
        let qos0 = [92, 93].map(|payload| forward(QoS::AtMostOnce, payload, None));
        let (buffered, inflight, dropped) = outgoing.push_forwards(qos0.into_iter(), 0, 0);
        assert_eq!((buffered, inflight, dropped), (3, 2, 1));
    }
}
