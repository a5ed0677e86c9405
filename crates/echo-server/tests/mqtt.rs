//! End-to-end MQTT tests: the real server binary, real sockets, rumqttc
//! (3.1.1 and 5) in-process, plus a raw client for exact bytes.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use common::mqtt_raw::{self, RawMqtt};
use rumqttc::v5::mqttbytes::v5::{LastWill as LastWill5, Packet as Packet5, PublishProperties};
use rumqttc::{Event, LastWill, Packet, QoS};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// A 3.1.1 client whose event loop runs on its own task.
struct V4 {
    client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    /// The event loop; dropping the client aborts it, which drops the TCP
    /// connection without a DISCONNECT (as a crashed client would).
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V4 {
    /// A client whose event loop runs in a task of its own, its events
    /// (connection errors included) queued for `expect`.
    fn start(options: rumqttc::MqttOptions, cap: usize) -> V4 {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, cap);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await.map_err(|e| e.to_string());
                let failed = event.is_err();
                if tx.send(event).is_err() || failed {
                    return;
                }
            }
        });
        V4 { client, events, task }
    }

    async fn connect(server: &TestServer, id: &str) -> V4 {
        V4::with(server, id, |_| {}).await
    }

    async fn with(server: &TestServer, id: &str, tweak: impl FnOnce(&mut rumqttc::MqttOptions)) -> V4 {
        let addr = server.mqtt_addr();
        let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        tweak(&mut options);
        let mut v4 = V4::start(options, 64);
        v4.expect(|e| matches!(e, Event::Incoming(Packet::ConnAck(ack)) if ack.code == rumqttc::ConnectReturnCode::Success))
            .await;
        v4
    }

    /// Waits for an event matching `pred`, skipping others.
    async fn expect(&mut self, pred: impl Fn(&Event) -> bool) -> Event {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Ok(Some(Ok(event))) if pred(&event) => return event,
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.expect(|e| matches!(e, Event::Incoming(Packet::SubAck(_)))).await;
    }

    async fn next_publish(&mut self) -> rumqttc::Publish {
        match self.expect(|e| matches!(e, Event::Incoming(Packet::Publish(_)))).await {
            Event::Incoming(Packet::Publish(p)) => p,
            _ => unreachable!(),
        }
    }

    /// No publish arrives within `wait`.
    async fn no_publish(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(event) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if let Some(Ok(Event::Incoming(Packet::Publish(p)))) = event {
                panic!("unexpected publish {p:?}");
            }
        }
    }
}

/// An MQTT 5 client whose event loop runs on its own task.
struct V5 {
    client: rumqttc::v5::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Event5 = rumqttc::v5::Event;

impl V5 {
    async fn connect(server: &TestServer, id: &str) -> V5 {
        V5::with(server, id, |_| {}).await
    }

    async fn with(server: &TestServer, id: &str, tweak: impl FnOnce(&mut rumqttc::v5::MqttOptions)) -> V5 {
        let addr = server.mqtt_addr();
        let mut options = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        tweak(&mut options);
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await.map_err(|e| e.to_string());
                let failed = event.is_err();
                if tx.send(event).is_err() || failed {
                    return;
                }
            }
        });
        let mut v5 = V5 { client, events, task };
        v5.expect(|e| matches!(e, Event5::Incoming(Packet5::ConnAck(_)))).await;
        v5
    }

    async fn expect(&mut self, pred: impl Fn(&Event5) -> bool) -> Event5 {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Ok(Some(Ok(event))) if pred(&event) => return event,
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: rumqttc::v5::mqttbytes::QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.expect(|e| matches!(e, Event5::Incoming(Packet5::SubAck(_)))).await;
    }

    async fn next_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        match self.expect(|e| matches!(e, Event5::Incoming(Packet5::Publish(_)))).await {
            Event5::Incoming(Packet5::Publish(p)) => p,
            _ => unreachable!(),
        }
    }
}

fn qos5(qos: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

#[tokio::test]
async fn v311_and_v5_share_one_port_and_reach_each_other() {
    let server = TestServer::start(&[]);
    let mut old = V4::connect(&server, "old").await;
    let mut new = V5::connect(&server, "new").await;
    old.subscribe("chat/#", QoS::AtMostOnce).await;
    new.subscribe("chat/#", qos5(QoS::AtMostOnce)).await;
    old.client.publish("chat/from-v4", QoS::AtMostOnce, false, "hello from 3.1.1").await.unwrap();
    assert_eq!(old.next_publish().await.payload, "hello from 3.1.1");
    assert_eq!(new.next_publish().await.payload, "hello from 3.1.1");
    new.client.publish("chat/from-v5", qos5(QoS::AtMostOnce), false, "hello from 5").await.unwrap();
    assert_eq!(old.next_publish().await.payload, "hello from 5");
    assert_eq!(new.next_publish().await.payload, "hello from 5");
    server.wait_for_metric("echo_mqtt_connections{version=\"3.1.1\"}", WAIT, |v| v == 1.0);
    server.wait_for_metric("echo_mqtt_connections{version=\"5\"}", WAIT, |v| v == 1.0);
}

#[tokio::test]
async fn own_topic_round_trips_at_qos_0_1_and_2() {
    own_topic_round_trips(TestServer::start(&[])).await;
}

async fn own_topic_round_trips(server: TestServer) {
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let id = format!("v4-{}", qos as u8);
        let mut c = V4::connect(&server, &id).await;
        c.subscribe(&id, qos).await;
        for i in 0..5u8 {
            let payload = vec![i; 100 + i as usize];
            c.client.publish(&id, qos, false, payload.clone()).await.unwrap();
            let got = c.next_publish().await;
            assert_eq!((got.qos, got.payload.as_ref(), got.topic.as_str()), (qos, &payload[..], id.as_str()));
            // rumqttc acknowledges on its own (PUBACK, or PUBREC then PUBCOMP).
        }
        // Exactly once each: nothing more arrives.
        c.no_publish(Duration::from_millis(300)).await;

        let id = format!("v5-{}", qos as u8);
        let mut c = V5::connect(&server, &id).await;
        c.subscribe(&id, qos5(qos)).await;
        for i in 0..5u8 {
            let payload = vec![i; 100 + i as usize];
            c.client.publish(id.clone(), qos5(qos), false, payload.clone()).await.unwrap();
            let got = c.next_publish().await;
            assert_eq!((got.qos, got.payload.as_ref()), (qos5(qos), &payload[..]));
        }
        // The event loop finishes the last acknowledgements before the drop.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The server's side of each QoS flow, both versions: 10 publishes each.
    let sent = |packet: &str| server.metric(&format!("echo_mqtt_packets_sent_total{{packet=\"{packet}\"}}"));
    let received =
        |packet: &str| server.metric(&format!("echo_mqtt_packets_received_total{{packet=\"{packet}\"}}"));
    server.wait_for_metric("echo_mqtt_packets_received_total{packet=\"pubcomp\"}", WAIT, |v| v == 10.0);
    assert_eq!(sent("publish"), 30.0);
    assert_eq!(received("publish"), 30.0);
    assert_eq!(sent("puback"), 10.0, "for the QoS 1 publishes");
    assert_eq!(received("puback"), 10.0, "for the QoS 1 deliveries");
    assert_eq!((sent("pubrec"), received("pubrel"), sent("pubcomp")), (10.0, 10.0, 10.0));
    assert_eq!((received("pubrec"), sent("pubrel"), received("pubcomp")), (10.0, 10.0, 10.0));
}

#[tokio::test]
async fn delivery_is_at_the_lower_of_publish_and_subscription_qos() {
    let server = TestServer::start(&[]);
    let mut sub2 = V4::connect(&server, "sub-qos2").await;
    sub2.subscribe("grade/#", QoS::ExactlyOnce).await;
    let mut sub1 = V5::connect(&server, "sub-qos1").await;
    sub1.subscribe("grade/#", qos5(QoS::AtLeastOnce)).await;
    let publisher = V4::connect(&server, "grader").await;
    for (round, qos) in
        [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce, QoS::AtMostOnce].into_iter().enumerate()
    {
        publisher.client.publish(format!("grade/{round}"), qos, false, format!("{round}")).await.unwrap();
        let got = sub2.next_publish().await;
        assert_eq!((got.payload, got.qos), (Bytes::from(format!("{round}")), qos), "QoS 2 subscription");
        let got = sub1.next_publish().await;
        let want = if qos == QoS::ExactlyOnce { QoS::AtLeastOnce } else { qos };
        assert_eq!(
            (got.payload, got.qos),
            (Bytes::from(format!("{round}")), qos5(want)),
            "QoS 1 subscription"
        );
    }
    // Many QoS 0 messages on a QoS 1 subscription take no in-flight slots:
    // far more than the 100 rumqttd allows in flight all arrive.
    for i in 0..300u32 {
        publisher
            .client
            .publish("grade/burst", QoS::AtMostOnce, false, i.to_be_bytes().to_vec())
            .await
            .unwrap();
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for i in 0..300u32 {
        let got = sub1.next_publish().await;
        assert_eq!(
            (got.payload.as_ref(), got.qos),
            (&i.to_be_bytes()[..], qos5(QoS::AtMostOnce)),
            "message {i}"
        );
    }
}

#[tokio::test]
async fn wildcards_match_as_mqtt_says() {
    wildcards_match(TestServer::start(&[])).await;
}

async fn wildcards_match(server: TestServer) {
    let mut plus = V4::connect(&server, "plus").await;
    let mut hash = V4::connect(&server, "hash").await;
    let publisher = V4::connect(&server, "publisher").await;
    plus.subscribe("w/+/x", QoS::AtMostOnce).await;
    hash.subscribe("w/#", QoS::AtMostOnce).await;
    for topic in ["w/a/x", "w/b/c", "w/a/x/y", "w", "other/a/x"] {
        publisher.client.publish(topic, QoS::AtMostOnce, false, topic).await.unwrap();
    }
    assert_eq!(plus.next_publish().await.topic, "w/a/x");
    plus.no_publish(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(hash.next_publish().await.topic);
    }
    // "w/#" also matches "w" itself (MQTT 3.1.1 §4.7.1.2).
    got.sort();
    assert_eq!(got, vec!["w", "w/a/x", "w/a/x/y", "w/b/c"]);
}

/// rumqttd's `protocol::matches` slices a topic's first byte to look for
/// `$`, which panics when the first character takes more bytes: its
/// router thread died on a publish to `é/x` that met a wildcard filter
/// (or its own exact filter). The router's maps no longer call it.
#[tokio::test]
async fn topics_starting_with_a_multibyte_character_are_matched() {
    let server = TestServer::start(&[]);
    let mut plus = V4::connect(&server, "plus").await;
    let mut exact = V4::connect(&server, "exact").await;
    let publisher = V4::connect(&server, "publisher").await;
    plus.subscribe("+/x", QoS::AtMostOnce).await;
    exact.subscribe("é/x", QoS::AtMostOnce).await;
    publisher.client.publish("é/x", QoS::AtMostOnce, false, "1").await.unwrap();
    assert_eq!(plus.next_publish().await.topic, "é/x");
    assert_eq!(exact.next_publish().await.topic, "é/x");
    // A wildcard filter created once the topic is cached joins it.
    let mut late = V4::connect(&server, "late").await;
    late.subscribe("é/+", QoS::AtMostOnce).await;
    publisher.client.publish("é/x", QoS::AtMostOnce, false, "2").await.unwrap();
    assert_eq!(late.next_publish().await.topic, "é/x");
    assert_eq!(plus.next_publish().await.payload, "2");
}

#[tokio::test]
async fn retained_message_reaches_a_later_subscriber() {
    retained_reaches_a_later_subscriber(TestServer::start(&[])).await;
}

async fn retained_reaches_a_later_subscriber(server: TestServer) {
    let publisher = V4::connect(&server, "retainer").await;
    publisher.client.publish("status/door", QoS::AtLeastOnce, true, "open").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut late = V4::connect(&server, "late").await;
    late.subscribe("status/#", QoS::AtMostOnce).await;
    let got = late.next_publish().await;
    assert_eq!((got.topic.as_str(), got.payload.as_ref(), got.retain), ("status/door", &b"open"[..], true));
    let mut late5 = V5::connect(&server, "late5").await;
    late5.subscribe("status/door", qos5(QoS::AtMostOnce)).await;
    assert_eq!(late5.next_publish().await.payload, "open");
}

/// MQTT 5: a retained message's expiry interval counts from its
/// publication, however many subscribers have read it (rumqttd 0.20 took the
/// elapsed time off the stored interval at every read; our patch).
#[tokio::test]
async fn retained_expiry_counts_from_publication_for_every_reader() {
    let server = TestServer::start(&[]);
    let publisher = V5::connect(&server, "expiring").await;
    let expiry = PublishProperties { message_expiry_interval: Some(20), ..Default::default() };
    publisher
        .client
        .publish_with_properties("status/lamp", qos5(QoS::AtLeastOnce), true, "on", expiry)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for reader in 0..4 {
        let mut late = V5::connect(&server, &format!("reader-{reader}")).await;
        late.subscribe("status/lamp", qos5(QoS::AtMostOnce)).await;
        let got = late.next_publish().await;
        assert_eq!(got.payload, "on");
        let left = got.properties.and_then(|p| p.message_expiry_interval).expect("an expiry interval");
        // 2 s have passed (3 at most on a slow machine): 17-18 s left, for
        // the fourth reader as for the first.
        assert!((17..=18).contains(&left), "reader {reader}: {left} s left");
    }
}

/// MQTT 5: expired retained messages are freed even if no subscription
/// ever reads them (rumqttd 0.20 kept them until one did, or until their
/// topic was retained again: a client could fill the server with retained
/// messages of a second's expiry on distinct topics). Two thousand expire
/// unread; the one without expiry stays, and is all a wildcard subscriber
/// gets.
fn expired_retained_messages_are_freed_unread(server: TestServer) {
    const N: usize = 2000;
    let mut publisher = RawMqtt::session(server.mqtt_addr(), 5, "ephemeral", 30);
    // Message expiry interval (0x02): 1 s.
    let expiry = [0x02, 0, 0, 0, 1];
    for i in 0..N {
        let mut packet = mqtt_raw::publish_raw(5, format!("exp/{i}").as_bytes(), 0, &expiry, b"x");
        packet[0] |= 0x01;
        publisher.send(&packet);
    }
    let mut kept = mqtt_raw::publish(5, "exp/kept", b"k");
    kept[0] |= 0x01;
    publisher.send(&kept);
    let key = "echo_mqtt_retained_messages";
    // Counted once a second: all of them, or already fewer as they expire.
    server.wait_for_metric(key, WAIT, |n| n > 0.0);
    let published = std::time::Instant::now();
    // 1 s of expiry, then the sweep at once, then the next reading of the
    // count, at most a second later.
    server.wait_for_metric(key, Duration::from_secs(5), |n| n == 1.0);
    let freed_after = published.elapsed();

    let mut sub = RawMqtt::session(server.mqtt_addr(), 5, "late", 30);
    sub.send(&mqtt_raw::subscribe(5, 1, "exp/#"));
    assert_eq!(sub.read_packet().unwrap().suback_codes(5), vec![0]);
    let got = sub.read_packet().expect("the kept message").delivery(5);
    assert_eq!((got.topic.as_str(), got.payload.as_slice()), ("exp/kept", &b"k"[..]));
    assert!(sub.silent_for(Duration::from_millis(500)), "nothing expired is delivered");
    eprintln!("{N} expired retained messages freed within {freed_after:?}");
}

#[test]
fn expired_retained_messages_are_freed_unread_router_on_its_thread() {
    expired_retained_messages_are_freed_unread(TestServer::start_with_env(&[], &[NO_SYS]));
}

#[test]
fn expired_retained_messages_are_freed_unread_router_on_the_loop() {
    let env = [common::ROUTER_ON_THE_LOOP[0], NO_SYS];
    expired_retained_messages_are_freed_unread(TestServer::start_with_env(&[], &env));
}

/// The server's own `$SYS` figures are retained messages too: off where
/// the count of retained messages is checked exactly.
const NO_SYS: (&str, &str) = ("ECHO_MQTT_SYS_INTERVAL", "0s");

#[tokio::test]
async fn last_will_is_delivered_when_a_client_drops() {
    last_will_is_delivered(TestServer::start(&[])).await;
}

async fn last_will_is_delivered(server: TestServer) {
    let mut watcher = V4::connect(&server, "watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    for (level, qos) in [(4u8, QoS::AtMostOnce), (4, QoS::AtLeastOnce), (5, QoS::ExactlyOnce)] {
        let id = format!("mortal-{level}-{}", qos as u8);
        if level == 4 {
            let c = V4::with(&server, &id, |o| {
                o.set_last_will(LastWill::new(format!("wills/{id}"), "gone", qos, false));
            })
            .await;
            drop(c); // the TCP connection is dropped without DISCONNECT
        } else {
            let c = V5::with(&server, &id, |o| {
                o.set_last_will(LastWill5::new(format!("wills/{id}"), "gone", qos5(qos), false, None));
            })
            .await;
            drop(c);
        }
        let got = watcher.next_publish().await;
        assert_eq!((got.topic, got.payload), (format!("wills/{id}"), Bytes::from_static(b"gone")));
    }
    // A clean DISCONNECT discards the will.
    let polite = V4::with(&server, "polite", |o| {
        o.set_last_will(LastWill::new("wills/polite", "gone", QoS::AtMostOnce, false));
    })
    .await;
    polite.client.disconnect().await.unwrap();
    watcher.no_publish(Duration::from_millis(500)).await;
    assert_eq!(server.metric("echo_mqtt_wills_published_total"), 3.0);
}

#[test]
fn keep_alive_zero_is_accepted_and_others_are_enforced() {
    let server = TestServer::start(&[]);
    // Keep-alive 0: no deadline at all.
    let mut forever = RawMqtt::session(server.mqtt_addr(), 4, "forever", 0);
    // Keep-alive 1 s: closed after 1.5 s of silence (MQTT 5: DISCONNECT 0x8D first).
    let mut v4 = RawMqtt::session(server.mqtt_addr(), 4, "ka-v4", 1);
    let mut v5 = RawMqtt::session(server.mqtt_addr(), 5, "ka-v5", 1);
    let started = std::time::Instant::now();
    let disconnect = v5.read_packet().expect("a DISCONNECT");
    assert_eq!(disconnect.disconnect_reason(), 0x8d);
    assert!(v4.closed_within(Duration::from_secs(5)));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(3), "closed after {took:?}");
    std::thread::sleep(Duration::from_secs(1));
    forever.send(&mqtt_raw::PINGREQ);
    assert_eq!(forever.read_packet().unwrap().packet_type(), 13, "PINGRESP after 2.5 s of silence");
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"keepalive_timeout\"}"), 2.0);
}

/// Every session's keep-alive deadline is kept by one timer for the event
/// loop (`session::alarms`): sessions with different keep-alives are each
/// closed at their own deadline (1.5 times the keep-alive), never before
/// it, while one that pings within its keep-alive stays, across several of
/// its deadlines, and one with keep-alive 0 is never closed.
#[test]
fn keep_alive_deadlines_are_each_sessions_own_with_one_timer() {
    let server = TestServer::start(&[]);
    let addr = server.mqtt_addr();
    let mut pinger = RawMqtt::session(addr, 4, "pinger", 1);
    let mut forever = RawMqtt::session(addr, 4, "forever-too", 0);
    let silent: Vec<_> = [(1u16, 4u8), (2, 5), (1, 5), (2, 4)]
        .into_iter()
        .enumerate()
        .map(|(i, (keep_alive, level))| {
            let mut client = RawMqtt::session(addr, level, &format!("silent-{i}"), keep_alive);
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                if level == 5 {
                    assert_eq!(client.read_packet().expect("a DISCONNECT").disconnect_reason(), 0x8d);
                }
                assert!(client.closed_within(Duration::from_secs(10)));
                (keep_alive, started.elapsed())
            })
        })
        .collect();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        pinger.send(&mqtt_raw::PINGREQ);
        assert_eq!(pinger.read_packet().unwrap().packet_type(), 13, "the pinging client stays");
    }
    for closing in silent {
        let (keep_alive, took) = closing.join().unwrap();
        let limit = Duration::from_millis(1500) * u32::from(keep_alive);
        assert!(
            took >= limit - Duration::from_millis(100),
            "keep-alive {keep_alive} s: closed after {took:?}"
        );
        assert!(took < limit + Duration::from_secs(2), "keep-alive {keep_alive} s: closed after {took:?}");
    }
    forever.send(&mqtt_raw::PINGREQ);
    assert_eq!(forever.read_packet().unwrap().packet_type(), 13, "keep-alive 0: there after 5 s of silence");
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"keepalive_timeout\"}"), 4.0);
}

/// A subscriber that stops reading is closed once a write to it has not
/// completed within `mqtt.write_timeout` (its timer is set only when a
/// write does not complete at once: `session::within`); the publisher and
/// a subscriber that reads are not held up.
#[test]
fn a_subscriber_that_stops_reading_is_closed_after_the_write_timeout() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_WRITE_TIMEOUT", "1s")]);
    let addr = server.mqtt_addr();
    let mut stuck = RawMqtt::session(addr, 4, "stuck", 0);
    stuck.send(&mqtt_raw::subscribe(4, 1, "flood"));
    assert_eq!(stuck.read_packet().unwrap().packet_type(), 9);
    let mut publisher = RawMqtt::session(addr, 4, "flooder", 0);
    // Far more than the socket buffers between the server and `stuck` hold.
    let payload = vec![b'x'; 512 * 1024];
    for _ in 0..64 {
        publisher.send(&mqtt_raw::publish(4, "flood", &payload));
    }
    let key = "echo_mqtt_closed_total{reason=\"write_timeout\"}";
    assert_eq!(server.wait_for_metric(key, Duration::from_secs(20), |n| n >= 1.0), 1.0);
    publisher.send(&mqtt_raw::PINGREQ);
    assert_eq!(publisher.read_packet().unwrap().packet_type(), 13, "the publisher goes on");
    let mut reader = RawMqtt::session(addr, 4, "reader", 0);
    reader.send(&mqtt_raw::subscribe(4, 1, "flood"));
    assert_eq!(reader.read_packet().unwrap().packet_type(), 9);
    publisher.send(&mqtt_raw::publish(4, "flood", &payload));
    assert!(reader.read_packet().unwrap().body.ends_with(&payload[..64]));
}

/// Keep-alive 0 with a client library in process: rumqttc (its 3.1.1
/// client; the MQTT 5 one refuses keep-alives under 5 s) connects with
/// `Duration::ZERO`, so it never pings; it stays connected, with nothing
/// happening, well past the 1.5 s after which a keep-alive of 1 s is
/// closed (above), then completes a round trip.
#[tokio::test]
async fn keep_alive_zero_with_rumqttc_stays_connected_and_round_trips() {
    let server = TestServer::start(&[]);
    let mut c = V4::with(&server, "ka0-rumqttc", |options| {
        options.set_keep_alive(Duration::ZERO);
    })
    .await;
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(2500);
    if let Ok(event) = tokio::time::timeout_at(quiet_until, c.events.recv()).await {
        panic!("nothing happens while the client is quiet, got {event:?}");
    }
    c.subscribe("ka0/echo", QoS::AtLeastOnce).await;
    c.client.publish("ka0/echo", QoS::AtLeastOnce, false, "still here").await.unwrap();
    assert_eq!(c.next_publish().await.payload, "still here");
    assert_eq!(server.metric("echo_mqtt_connections{version=\"3.1.1\"}"), 1.0);
    assert_eq!(server.metric("echo_mqtt_packets_received_total{packet=\"pingreq\"}"), 0.0, "it never pinged");
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"keepalive_timeout\"}"), 0.0);
}

#[tokio::test]
async fn mqtt_over_websocket_on_the_websocket_port() {
    let server = TestServer::start(&[]);
    let ws = server.ws_addr();
    let mut options = rumqttc::MqttOptions::new("browser-like", format!("ws://{ws}/mqtt"), ws.port());
    options
        .set_transport(rumqttc::Transport::Ws)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let mut c = V4::start(options, 16);
    c.expect(|e| matches!(e, Event::Incoming(Packet::ConnAck(_)))).await;
    // And a TCP client on the MQTT port reaches it.
    let tcp = V4::connect(&server, "tcp-side").await;
    c.subscribe("bridge/#", QoS::AtLeastOnce).await;
    tcp.client.publish("bridge/1", QoS::AtLeastOnce, false, "over tcp").await.unwrap();
    assert_eq!(c.next_publish().await.payload, "over tcp");
    c.client.publish("bridge/2", QoS::AtMostOnce, false, vec![7u8; 70_000]).await.unwrap();
    assert_eq!(c.next_publish().await.payload, vec![7u8; 70_000]);
    // A plain WebSocket client on the same port still gets the echo.
    let (mut echo, _) = tokio_tungstenite::connect_async(server.ws_url("/")).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    echo.send(tokio_tungstenite::tungstenite::Message::Text("still an echo".into())).await.unwrap();
    let back = echo.next().await.unwrap().unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), "still an echo");
}

#[test]
fn a_full_server_refuses_with_a_connack() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_MAX_CONNECTIONS", "2")]);
    let _a = RawMqtt::session(server.mqtt_addr(), 4, "a", 30);
    let _b = RawMqtt::session(server.mqtt_addr(), 5, "b", 30);
    for (level, code) in [(4u8, 3u8), (5, 0x97)] {
        let mut over = RawMqtt::connect(server.mqtt_addr());
        over.send(&mqtt_raw::connect(level, "c", 30));
        let ack = over.read_packet().expect("a CONNACK, not silence");
        assert_eq!(ack.connack_code(), code, "MQTT level {level}");
        assert!(over.closed_within(Duration::from_secs(5)));
    }
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"capacity\"}"), 2.0);
    // A slot frees when a client leaves.
    drop(_a);
    std::thread::sleep(Duration::from_millis(200));
    let _c = RawMqtt::session(server.mqtt_addr(), 4, "c", 30);
}

/// A refusal storm costs a bounded number of sockets. Each client over the
/// limit holds its socket while it is refused (for its CONNECT, then until
/// it closes: up to 2 s each); at most 32 at once. Past that, a client whose
/// CONNECT is already in is answered at once, and one whose CONNECT is not
/// is closed at once, without a CONNACK (docs/mqtt.md); once the storm
/// passes, refusals are CONNACKs again.
#[test]
fn a_refusal_storm_holds_at_most_32_sockets_and_answers_what_it_can() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_MAX_CONNECTIONS", "1")]);
    let addr = server.mqtt_addr();
    let _holder = RawMqtt::session(addr, 4, "holder", 30);
    let refused = "echo_mqtt_refused_total{reason=\"capacity\"}";
    // 32 clients over the limit that send nothing take every refusal slot.
    let mut silent: Vec<RawMqtt> = (0..32).map(|_| RawMqtt::connect(addr)).collect();
    server.wait_for_metric(refused, WAIT, |v| v == 32.0);
    // The next silent one is closed at once, not held for 2 s.
    let started = std::time::Instant::now();
    let mut late = RawMqtt::connect(addr);
    assert!(late.closed_within(Duration::from_secs(1)), "closed at once");
    assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
    // One that sends its CONNECT straight away gets a CONNACK if it was in
    // when the server looked, and is closed otherwise: never held.
    for (level, code) in [(4u8, 3u8), (5, 0x97)] {
        let mut eager = RawMqtt::connect(addr);
        eager.send(&mqtt_raw::connect(level, "eager", 30));
        if let Some(ack) = eager.read_packet() {
            assert_eq!(ack.connack_code(), code, "level {level}");
        }
        assert!(eager.closed_within(Duration::from_secs(1)), "level {level}: closed at once");
    }
    // The slots held: the first 32 are still open, waiting for a CONNECT.
    for raw in &mut silent {
        assert!(!raw.closed_within(Duration::from_millis(1)), "still held");
    }
    // The server gives up on them after 2 s and closes; each slot is free
    // once its client has closed too (or after 2 s more).
    for raw in &mut silent {
        assert!(raw.closed_within(Duration::from_secs(5)), "closed after the refusal timeout");
    }
    drop(silent);
    std::thread::sleep(Duration::from_millis(200));
    // A client over the limit gets its CONNACK again, whenever it sends its
    // CONNECT.
    for (level, code) in [(4u8, 3u8), (5, 0x97)] {
        let mut over = RawMqtt::connect(addr);
        std::thread::sleep(Duration::from_millis(50));
        over.send(&mqtt_raw::connect(level, "over", 30));
        assert_eq!(over.read_packet().expect("a CONNACK").connack_code(), code, "level {level}");
    }
    assert_eq!(server.metric(refused), 32.0 + 1.0 + 2.0 + 2.0);
}

#[test]
fn credentials_are_checked_when_configured() {
    let server = TestServer::start_with_env(
        &[],
        &[("ECHO_MQTT_USERNAME", "alice"), ("ECHO_MQTT_PASSWORD", "wonderland")],
    );
    for (level, login, code) in [
        (4u8, None, 4u8),
        (4, Some(("alice", "nope")), 4),
        (5, Some(("mallory", "wonderland")), 0x86),
        (4, Some(("alice", "wonderland")), 0),
        (5, Some(("alice", "wonderland")), 0),
    ] {
        let mut c = RawMqtt::connect(server.mqtt_addr());
        c.send(&mqtt_raw::connect_with(level, "who", 30, login));
        assert_eq!(c.read_packet().unwrap().connack_code(), code, "{login:?} at level {level}");
    }
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"bad_credentials\"}"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_round_trip_twenty_messages_each() {
    let server = TestServer::start(&[]);
    let addr = server.mqtt_addr();
    let mut tasks = Vec::new();
    for n in 0..2000u32 {
        tasks.push(tokio::spawn(async move {
            let id = format!("load-{n}");
            let mut options = rumqttc::MqttOptions::new(&id, addr.ip().to_string(), addr.port());
            options.set_keep_alive(Duration::from_secs(60));
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 32);
            // 2,000 debug-build clients on a shared 2-core machine: the last
            // ones may wait more than rumqttc's default 5 s for their CONNACK.
            let mut network = rumqttc::NetworkOptions::new();
            network.set_connection_timeout(60);
            eventloop.set_network_options(network);
            let topic = format!("load/{n}");
            client.subscribe(&topic, QoS::AtMostOnce).await.unwrap();
            let mut subscribed = false;
            let mut expected = 0u32;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while expected < 20 {
                let Ok(polled) = tokio::time::timeout_at(deadline, eventloop.poll()).await else {
                    panic!("client {n} timed out at message {expected}");
                };
                let event = polled.unwrap_or_else(|e| panic!("client {n}: {e}"));
                match event {
                    Event::Incoming(Packet::SubAck(_)) if !subscribed => {
                        subscribed = true;
                        client.publish(&topic, QoS::AtMostOnce, false, payload(n, 0)).await.unwrap();
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        assert_eq!(p.topic, topic);
                        assert_eq!(p.payload, payload(n, expected), "client {n} message {expected}");
                        expected += 1;
                        if expected < 20 {
                            client
                                .publish(&topic, QoS::AtMostOnce, false, payload(n, expected))
                                .await
                                .unwrap();
                        }
                    }
                    _ => {}
                }
            }
            (client, eventloop)
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    assert_eq!(server.metric("echo_mqtt_connections{version=\"3.1.1\"}"), 2000.0);
    assert_eq!(server.metric("echo_mqtt_publishes_received_total"), 40_000.0);
    assert_eq!(server.metric("echo_mqtt_publishes_sent_total"), 40_000.0);
    assert_eq!(server.metric("echo_mqtt_packets_received_total{packet=\"subscribe\"}"), 2000.0);
    assert_eq!(server.metric("echo_mqtt_packets_sent_total{packet=\"suback\"}"), 2000.0);
    assert_eq!(server.metric("echo_runtime_workers"), 1.0);
    assert_eq!(server.thread_names(), common::THREADS.map(String::from).to_vec());
    drop(clients);
    server.wait_for_metric("echo_mqtt_connections{version=\"3.1.1\"}", WAIT, |v| v == 0.0);
}

/// A payload that differs per client and message, with every byte value.
fn payload(client: u32, i: u32) -> Vec<u8> {
    let mut p = format!("{client}:{i}:").into_bytes();
    p.extend((0..=255u8).map(|b| b ^ (i as u8)));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_websocket_clients_at_the_same_time() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start(&[]);
    let mut tasks = Vec::new();
    for n in 0..200u32 {
        let url = server.ws_url("/");
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
            for i in 0..20u32 {
                let text = format!("ws {n} {i}");
                ws.send(Message::Text(text.clone().into())).await.unwrap();
                let back = ws.next().await.unwrap().unwrap();
                assert_eq!(back.into_text().unwrap().as_str(), text);
            }
        }));
    }
    let mut mqtt = Vec::new();
    for n in 0..50u32 {
        let mut c = V4::connect(&server, &format!("mixed-{n}")).await;
        c.subscribe(&format!("mixed/{n}"), QoS::AtLeastOnce).await;
        mqtt.push(c);
    }
    for round in 0..10u32 {
        for (n, c) in mqtt.iter().enumerate() {
            c.client
                .publish(format!("mixed/{n}"), QoS::AtLeastOnce, false, format!("{round}"))
                .await
                .unwrap();
        }
        for c in mqtt.iter_mut() {
            assert_eq!(c.next_publish().await.payload, format!("{round}"));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(server.metric("echo_websocket_messages_sent_total{kind=\"text\"}"), 4000.0);
    assert_eq!(server.metric("echo_mqtt_publishes_sent_total"), 500.0);
}

/// The rumqttd 0.20 reproduction from the issue: an MQTT 5 publish with a
/// user property, delivered to a 3.1.1 subscriber, killed that subscriber,
/// and the reconnect poisoned the broker for every later 3.1.1 client.
#[tokio::test]
async fn v5_properties_never_break_v311_subscribers() {
    let server = TestServer::start(&[]);
    let mut v4sub = V4::connect(&server, "v4sub").await;
    v4sub.subscribe("repro/#", QoS::AtLeastOnce).await;
    let mut v5sub = V5::connect(&server, "v5sub").await;
    v5sub.subscribe("repro/#", qos5(QoS::AtLeastOnce)).await;
    let v5pub = V5::connect(&server, "v5pub").await;
    let every_property = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        topic_alias: None,
        response_topic: Some("repro/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "v2".into())],
        subscription_identifiers: vec![],
        content_type: Some("text/plain".into()),
    };
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        v5pub
            .client
            .publish_with_properties("repro/t", qos5(qos), false, "hi", every_property.clone())
            .await
            .unwrap();
        let got = v4sub.next_publish().await;
        assert_eq!((got.topic.as_str(), got.payload.as_ref()), ("repro/t", &b"hi"[..]));
        // The MQTT 5 subscriber gets the properties.
        let got5 = v5sub.next_publish().await;
        let props = got5.properties.expect("properties reach v5 subscribers");
        assert_eq!(props.user_properties, every_property.user_properties);
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.correlation_data, every_property.correlation_data);
    }
    // Retained with properties, to a 3.1.1 client subscribing later.
    v5pub
        .client
        .publish_with_properties("repro/kept", qos5(QoS::AtMostOnce), true, "kept", every_property)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The subscriber is alive, reconnects work, and any other 3.1.1 client too.
    drop(v4sub);
    let mut again = V4::connect(&server, "v4sub").await;
    again.subscribe("repro/#", QoS::AtMostOnce).await;
    assert_eq!(again.next_publish().await.payload, "kept");
    let other = V4::connect(&server, "other").await;
    other.client.publish("repro/x", QoS::AtMostOnce, false, "y").await.unwrap();
    assert_eq!(again.next_publish().await.payload, "y");
}

/// The same traffic with rumqttd's router on the event loop
/// (`mqtt.router = "event-loop"`), the other placement than the default's.
mod router_on_the_loop {
    use super::*;

    fn server() -> TestServer {
        let server = TestServer::start_with_env(&[], &common::ROUTER_ON_THE_LOOP);
        assert_eq!(server.thread_names(), common::THREADS_WITH_ROUTER_ON_THE_LOOP.map(String::from).to_vec());
        server
    }

    #[tokio::test]
    async fn own_topic_round_trips_at_qos_0_1_and_2() {
        own_topic_round_trips(server()).await;
    }

    #[tokio::test]
    async fn wildcards_match_as_mqtt_says() {
        wildcards_match(server()).await;
    }

    #[tokio::test]
    async fn retained_message_reaches_a_later_subscriber() {
        retained_reaches_a_later_subscriber(server()).await;
    }

    #[tokio::test]
    async fn last_will_is_delivered_when_a_client_drops() {
        last_will_is_delivered(server()).await;
    }
}

/// An MQTT 5 PUBREL may carry a reason string or user properties; it is
/// completed like any other (rumqttd's router ignored a PUBREL with
/// properties: no PUBCOMP, and the publish stayed held).
#[test]
fn a_pubrel_with_properties_is_completed() {
    let server = TestServer::start(&[]);
    let mut c = RawMqtt::session(server.mqtt_addr(), 5, "releaser", 30);
    c.send(&mqtt_raw::publish_qos(5, "released", 2, 9, b"m"));
    let pubrec = c.read_packet().unwrap();
    assert_eq!((pubrec.packet_type(), pubrec.pkid()), (5, 9));
    // Packet id 9, reason 0, properties: a reason string "ok".
    c.send(&mqtt_raw::packet(0x62, &[0, 9, 0, 5, 0x1f, 0, 2, b'o', b'k']));
    let pubcomp = c.read_packet().unwrap();
    assert_eq!((pubcomp.packet_type(), pubcomp.pkid()), (7, 9));
}
