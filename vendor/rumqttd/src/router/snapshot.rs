//! echo-server patch: what the router holds that should outlive a restart
//! (retained messages, persistent sessions and the messages queued for
//! them), as plain data the embedding server can write to a file and hand
//! back at the next start (`Router::snapshot`, `Router::restore`).
//!
//! Nothing here refers to the running router: log indexes and cursors are
//! replaced by positions in the snapshot's own lists, and every `Instant`
//! by a duration relative to the moment the snapshot was taken, which is
//! recorded as wall-clock time. Restoring takes the time the server was
//! down off every remaining expiry, so a session or message that expired
//! meanwhile is not brought back.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::logs::{Origin, PublishData};
use crate::protocol::{qos, Publish, PublishProperties, QoS};

/// Everything the router persists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterSnapshot {
    /// When it was taken: milliseconds since the Unix epoch.
    pub taken_at_ms: u64,
    /// Retained messages, one per topic.
    pub retained: Vec<SavedMessage>,
    /// The messages persistent sessions still have to read, per log (a
    /// subscription filter, `$share/group/` stripped), oldest first, from
    /// the oldest position any of these sessions is at.
    pub logs: Vec<SavedLog>,
    /// Persistent sessions, connected ones recorded as if they had just
    /// disconnected.
    pub sessions: Vec<SavedSession>,
}

impl RouterSnapshot {
    /// How many messages the sessions still have to read, all together
    /// (a message queued for two sessions counts twice).
    pub fn queued_messages(&self) -> usize {
        self.sessions
            .iter()
            .flat_map(|s| &s.subscriptions)
            .filter_map(|s| s.request.as_ref())
            .map(|r| r.queued)
            .sum()
    }
}

/// A message as published, with its MQTT 5 properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMessage {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Option<SavedProperties>,
    /// Time since publication when the snapshot was taken, in
    /// milliseconds (its expiry interval counts from publication).
    pub age_ms: u64,
    /// The session that published it (No Local).
    pub origin: Origin,
}

/// `PublishProperties`, field for field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub subscription_identifiers: Vec<usize>,
    pub content_type: Option<String>,
}

/// The tail of one log that persistent sessions still have to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLog {
    pub filter: String,
    pub messages: Vec<SavedMessage>,
}

/// A persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSession {
    pub client_id: String,
    pub subscriptions: Vec<SavedSubscription>,
    /// QoS 2 packet ids whose PUBREL the client has not completed.
    pub unacked_pubrels: Vec<u16>,
    /// Milliseconds left before the session expires, counted from the
    /// snapshot; `None`: never.
    pub expires_in_ms: Option<u64>,
    /// The session's mark on what it publishes (No Local).
    pub origin: Origin,
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSubscription {
    /// As subscribed.
    pub filter: String,
    /// MQTT 5 Subscription Identifier.
    pub subscription_id: Option<usize>,
    /// Where the session reads the filter's log, and how; `None` if the
    /// router held no read for it.
    pub request: Option<SavedRequest>,
}

/// A session's read of one log: its options and position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRequest {
    pub qos: u8,
    pub forward_retained: bool,
    pub nolocal: bool,
    pub preserve_retain: bool,
    /// How many of the last messages of the log's `SavedLog` this session
    /// has yet to read (0: it had read them all).
    pub queued: usize,
}

/// What a restore brought back, for the embedding server's log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreCounts {
    pub sessions: usize,
    /// Sessions left out because they expired while the server was down.
    pub expired_sessions: usize,
    pub retained: usize,
    /// Messages queued for the restored sessions, all together.
    pub queued: usize,
}

/// Milliseconds since the Unix epoch now.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn save_message(data: &PublishData, now: Instant) -> SavedMessage {
    let publish = &data.publish;
    SavedMessage {
        topic: publish.topic.clone(),
        payload: publish.payload.clone(),
        qos: publish.qos as u8,
        retain: publish.retain,
        properties: data.properties.as_ref().map(|p| SavedProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            topic_alias: p.topic_alias,
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            subscription_identifiers: p.subscription_identifiers.clone(),
            content_type: p.content_type.clone(),
        }),
        age_ms: now.saturating_duration_since(data.timestamp).as_millis() as u64,
        origin: data.origin,
    }
}

/// A saved message back as the router holds it, `down` after the
/// snapshot; `None` if its expiry interval passed meanwhile.
pub(crate) fn revive_message(saved: SavedMessage, down: Duration, now: Instant) -> Option<PublishData> {
    let age = Duration::from_millis(saved.age_ms).saturating_add(down);
    let mut properties = saved.properties.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: p.topic_alias,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: p.subscription_identifiers,
        content_type: p.content_type,
    });
    let expiry = properties.as_ref().and_then(|p| p.message_expiry_interval);
    if expiry.is_some_and(|e| age >= Duration::from_secs(e.into())) {
        return None;
    }
    // The publication instant, if the clock reaches back that far; if not
    // (a message older than this boot), the expiry interval is shortened
    // by the message's age instead, to the same deadline within a second.
    let timestamp = match now.checked_sub(age) {
        Some(published) => published,
        None => {
            if let Some(interval) = properties.as_mut().and_then(|p| p.message_expiry_interval.as_mut()) {
                *interval = interval.saturating_sub(age.as_secs() as u32).max(1);
            }
            now
        }
    };
    let publish = Publish {
        dup: false,
        qos: qos(saved.qos).unwrap_or(QoS::AtMostOnce),
        pkid: 0,
        retain: saved.retain,
        topic: saved.topic,
        payload: saved.payload,
    };
    Some(PublishData { publish, properties, timestamp, origin: saved.origin })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{LinkBuilder, LinkRx, LinkTx};
    use crate::protocol::{
        Disconnect, DisconnectReasonCode, Filter, Packet, RetainForwardRule, Subscribe, SubscribeProperties,
    };
    use crate::{Notification, Router, RouterConfig};

    fn config() -> RouterConfig {
        RouterConfig {
            max_connections: 10,
            max_outgoing_packet_count: 200,
            max_segment_size: 4096,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    fn link(
        router_tx: &flume::Sender<(crate::ConnectionId, crate::router::Event)>,
        id: &str,
        clean: bool,
    ) -> (LinkTx, LinkRx, bool) {
        let (tx, rx, ack) = LinkBuilder::new(id, router_tx.clone()).clean_session(clean).build().unwrap();
        let present = match ack {
            Notification::DeviceAck(crate::router::Ack::ConnAck(_, ack, _)) => ack.session_present,
            other => panic!("not a CONNACK: {other:?}"),
        };
        (tx, rx, present)
    }

    fn retained(topic: &str, payload: &str, expiry: Option<u32>) -> Packet {
        let mut publish = Publish::new(topic.to_owned(), payload.to_owned(), true);
        publish.qos = QoS::AtLeastOnce;
        publish.pkid = 1;
        let properties =
            expiry.map(|e| PublishProperties { message_expiry_interval: Some(e), ..Default::default() });
        Packet::Publish(publish, properties)
    }

    /// The publishes a link has received, until it has `count` of them.
    fn received(rx: &mut LinkRx, count: usize) -> Vec<(String, String, Vec<usize>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < count {
            match rx.recv_deadline(deadline).expect("the router answers in time") {
                Some(Notification::Forward(forward)) => got.push((
                    String::from_utf8_lossy(&forward.publish.topic).into_owned(),
                    String::from_utf8_lossy(&forward.publish.payload).into_owned(),
                    forward.properties.map(|p| p.subscription_identifiers).unwrap_or_default(),
                )),
                Some(_) | None => {}
            }
        }
        got
    }

    /// A kept session's subscription (QoS, Subscription Identifier) and the
    /// messages published while it was away, and the retained messages,
    /// go through a snapshot (and its serde encoding) into a new router;
    /// the client resumes there without subscribing again and gets the
    /// queued messages, then live ones.
    #[test]
    fn a_kept_session_and_retained_messages_survive_a_restore() {
        let rt = runtime();
        let router = Router::new(0, config());
        let snapshots = router.snapshot_handle();
        let router_tx = router.spawn();

        let (mut sub, _sub_rx, _) = link(&router_tx, "sub", false);
        let filter = Filter {
            path: "t/#".into(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        let subscribe = Subscribe { pkid: 1, filters: vec![filter] };
        let properties = SubscribeProperties { id: Some(42), user_properties: Vec::new() };
        rt.block_on(sub.send(Packet::Subscribe(subscribe, Some(properties)))).unwrap();
        let disconnect = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
        rt.block_on(sub.send(Packet::Disconnect(disconnect, None))).unwrap();

        let (mut publisher, _pub_rx, _) = link(&router_tx, "pub", true);
        rt.block_on(publisher.send(retained("r/kept", "forever", None))).unwrap();
        rt.block_on(publisher.send(retained("r/short", "soon gone", Some(2)))).unwrap();
        for i in 1..=3 {
            publisher.publish(format!("t/{i}"), format!("away {i}")).unwrap();
        }
        // Events are handled in order: the snapshot comes after them all.
        let snapshot = rt.block_on(snapshots.take()).expect("the router answers");
        assert_eq!(snapshot.retained.len(), 2);
        let session = snapshot.sessions.iter().find(|s| s.client_id == "sub").expect("kept");
        assert_eq!(session.subscriptions.len(), 1);
        assert_eq!(session.subscriptions[0].subscription_id, Some(42));
        let request = session.subscriptions[0].request.as_ref().expect("its read");
        assert_eq!((request.qos, request.queued), (1, 3));
        assert_eq!(snapshot.queued_messages(), 3);
        // The clean publisher's session is not persisted.
        assert_eq!(snapshot.sessions.len(), 1);

        let encoded = serde_json::to_vec(&snapshot).unwrap();
        let decoded: RouterSnapshot = serde_json::from_slice(&encoded).unwrap();
        assert_eq!(decoded, snapshot);

        // Restored one second later: everything is there.
        let mut router = Router::new(0, config());
        let counts = router.restore(decoded, snapshot.taken_at_ms + 1000);
        assert_eq!(counts, RestoreCounts { sessions: 1, expired_sessions: 0, retained: 2, queued: 3 });
        let router_tx = router.spawn();
        let (mut sub, mut sub_rx, present) = link(&router_tx, "sub", false);
        assert!(present, "the restored session is resumed");
        let got = received(&mut sub_rx, 3);
        let expected: Vec<_> = (1..=3).map(|i| (format!("t/{i}"), format!("away {i}"), vec![42])).collect();
        assert_eq!(got, expected);

        // Live messages flow on the restored subscription.
        let (mut publisher, _pub_rx, _) = link(&router_tx, "pub", true);
        publisher.publish("t/live", "now").unwrap();
        assert_eq!(received(&mut sub_rx, 1), vec![("t/live".into(), "now".into(), vec![42])]);

        // The retained messages are there for a new subscription.
        let _ = &mut sub;
        let (mut reader, mut reader_rx, _) = link(&router_tx, "reader", true);
        let filter = Filter {
            path: "r/#".into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        let subscribe = Subscribe { pkid: 1, filters: vec![filter] };
        rt.block_on(reader.send(Packet::Subscribe(subscribe, None))).unwrap();
        let mut got: Vec<_> = received(&mut reader_rx, 2).into_iter().map(|(t, p, _)| (t, p)).collect();
        got.sort();
        assert_eq!(got, vec![("r/kept".into(), "forever".into()), ("r/short".into(), "soon gone".into())]);
    }

    /// The time the server was down counts: a session or retained message
    /// that expired meanwhile is not brought back, and those still alive
    /// keep only what was left of their time.
    #[test]
    fn what_expired_while_down_is_not_restored() {
        let message = |topic: &str, expiry: Option<u32>, age_ms: u64| SavedMessage {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::from_static(b"x"),
            qos: 0,
            retain: true,
            properties: expiry
                .map(|e| SavedProperties { message_expiry_interval: Some(e), ..Default::default() }),
            age_ms,
            origin: 0,
        };
        let session = |id: &str, expires_in_ms: Option<u64>| SavedSession {
            client_id: id.into(),
            subscriptions: vec![SavedSubscription {
                filter: "a".into(),
                subscription_id: None,
                request: None,
            }],
            unacked_pubrels: Vec::new(),
            expires_in_ms,
            origin: 9,
        };
        let snapshot = RouterSnapshot {
            taken_at_ms: 1_000_000,
            retained: vec![
                message("forever", None, 0),
                message("gone", Some(10), 5_000),
                message("left", Some(10), 1_000),
            ],
            logs: Vec::new(),
            sessions: vec![
                session("never", None),
                session("gone", Some(5_000)),
                session("left", Some(60_000)),
            ],
        };
        // Down for 6 seconds.
        let mut router = Router::new(0, config());
        let counts = router.restore(snapshot, 1_006_000);
        assert_eq!(counts, RestoreCounts { sessions: 2, expired_sessions: 1, retained: 2, queued: 0 });

        // A message older than the clock's reach keeps its deadline as a
        // shortened interval.
        let now = Instant::now();
        let old = message("old", Some(100_000), u64::MAX / 4);
        assert!(revive_message(old, Duration::ZERO, now).is_none(), "long expired");
        let data = revive_message(message("m", Some(30), 10_000), Duration::from_secs(5), now).unwrap();
        let left = 30 - now.saturating_duration_since(data.timestamp).as_secs();
        assert_eq!(left, 15);
    }
}
