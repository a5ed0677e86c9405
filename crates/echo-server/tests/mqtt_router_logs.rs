//! What the router's topic logs keep, seen through
//! `echo_mqtt_log_messages`: a message every subscriber has read leaves its
//! topic's log at once, and what some session may still read stays, a
//! resumed session's unacknowledged QoS 1 deliveries and what a kept
//! session has not read among it. Each with the router on its thread and
//! on the event loop.

mod common;

use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt};

const LOGGED: &str = "echo_mqtt_log_messages";

/// The metric is copied from the router once a second.
const COPIED: Duration = Duration::from_secs(5);

fn server(on_the_loop: bool) -> TestServer {
    if on_the_loop {
        TestServer::start_with_env(&[], &common::ROUTER_ON_THE_LOOP)
    } else {
        TestServer::start(&[])
    }
}

/// An MQTT 3.1.1 client (`clean` session or not) subscribed to `filter`
/// at `qos`; returns it and the CONNACK's session present flag.
fn subscriber(server: &TestServer, id: &str, clean: bool, filter: &str, qos: u8) -> RawMqtt {
    let mut c = RawMqtt::connect(server.mqtt_addr());
    c.send(&mqtt_raw::connect_session(4, id, clean, None));
    assert_eq!(c.read_packet().unwrap().connack_code(), 0, "CONNACK for {id}");
    c.send(&mqtt_raw::subscribe_qos(4, 1, filter, qos));
    assert_eq!(c.read_packet().unwrap().suback_codes(4), vec![qos]);
    c
}

/// Publishes `payloads` at `qos` (0 or 1, PUBACK awaited) and waits until
/// the router has them all (the PINGRESP after them).
fn publish_all(server: &TestServer, topic: &str, qos: u8, payloads: impl IntoIterator<Item = u8>) {
    let id = format!("{}-publisher", topic.replace('/', "-"));
    let mut publisher = RawMqtt::session(server.mqtt_addr(), 4, &id, 30);
    for (pkid, p) in (1u16..).zip(payloads) {
        publisher.send(&mqtt_raw::publish_qos(4, topic, qos, pkid, &[p]));
        if qos == 1 {
            assert_eq!(publisher.read_packet().unwrap().packet_type(), 4, "PUBACK");
        }
    }
    publisher.send(&mqtt_raw::PINGREQ);
    assert_eq!(publisher.read_packet().unwrap().packet_type(), 13);
}

/// The payloads of the next `n` publishes; QoS 1 ones are acknowledged if
/// `ack`.
fn receive(c: &mut RawMqtt, n: usize, ack: bool) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let d = c.read_packet().expect("a PUBLISH").delivery(4);
            if ack && d.qos == 1 {
                c.send(&mqtt_raw::ack(0x40, d.pkid));
            }
            d.payload[0]
        })
        .collect()
}

/// The metric holds `expected` now, and still after two more copies.
fn logged_stays(server: &TestServer, expected: f64) {
    server.wait_for_metric(LOGGED, COPIED, |v| v == expected);
    std::thread::sleep(Duration::from_millis(2_200));
    assert_eq!(server.metric(LOGGED), expected);
}

/// 200 QoS 0 messages read by both subscribers of their topic leave the
/// log (it would hold them all: under one 4 KiB segment); messages on a
/// topic nobody subscribes to are never logged.
fn read_messages_leave_the_log(on_the_loop: bool) {
    let server = server(on_the_loop);
    let mut one = subscriber(&server, "logs-one", true, "logs/read", 0);
    let mut two = subscriber(&server, "logs-two", true, "logs/+", 0);
    publish_all(&server, "logs/read", 0, 0..200);
    publish_all(&server, "nobody/reads", 0, 0..10);
    assert_eq!(receive(&mut one, 200, false), (0..200).collect::<Vec<u8>>());
    assert_eq!(receive(&mut two, 200, false), (0..200).collect::<Vec<u8>>());
    logged_stays(&server, 0.0);
    // And the topics go on: offsets are kept across the trim.
    publish_all(&server, "logs/read", 0, [7]);
    assert_eq!(receive(&mut one, 1, false), vec![7]);
    assert_eq!(receive(&mut two, 1, false), vec![7]);
    logged_stays(&server, 0.0);
}

#[test]
fn read_messages_leave_the_log_router_on_its_thread() {
    read_messages_leave_the_log(false);
}

#[test]
fn read_messages_leave_the_log_router_on_the_loop() {
    read_messages_leave_the_log(true);
}

/// A persistent QoS 1 subscriber takes 5 QoS 1 messages without
/// acknowledging them and drops its connection, beside a QoS 0 subscriber
/// that read them: the log keeps them, the resumed session gets them
/// again, and what is published while it is away waits for it too; the
/// last acknowledgement empties the log.
fn what_a_session_may_read_again_stays(on_the_loop: bool) {
    let server = server(on_the_loop);
    let mut kept = subscriber(&server, "logs-kept", false, "logs/kept", 1);
    let mut other = subscriber(&server, "logs-other", true, "logs/kept", 0);
    publish_all(&server, "logs/kept", 1, 0..5);
    assert_eq!(receive(&mut kept, 5, false), vec![0, 1, 2, 3, 4]);
    assert_eq!(receive(&mut other, 5, false), vec![0, 1, 2, 3, 4]);
    logged_stays(&server, 5.0);

    // Gone without a DISCONNECT; more comes while it is away.
    drop(kept);
    server.wait_for_metric("echo_mqtt_connections{version=\"3.1.1\"}", COPIED, |v| v == 1.0);
    publish_all(&server, "logs/kept", 1, 5..8);
    assert_eq!(receive(&mut other, 3, false), vec![5, 6, 7]);
    logged_stays(&server, 8.0);

    let mut kept = RawMqtt::connect(server.mqtt_addr());
    kept.send(&mqtt_raw::connect_session(4, "logs-kept", false, None));
    let ack = kept.read_packet().unwrap();
    assert!(ack.session_present());
    assert_eq!(receive(&mut kept, 8, true), (0..8).collect::<Vec<u8>>());

    // All acknowledged: the next message read by both leaves the rest
    // behind; it stays until acknowledged.
    publish_all(&server, "logs/kept", 1, [8]);
    let d = kept.read_packet().unwrap().delivery(4);
    assert_eq!((d.qos, d.payload[0]), (1, 8));
    assert_eq!(receive(&mut other, 1, false), vec![8]);
    logged_stays(&server, 1.0);
    // Its acknowledgement lets the log forget it.
    kept.send(&mqtt_raw::ack(0x40, d.pkid));
    logged_stays(&server, 0.0);
}

#[test]
fn what_a_session_may_read_again_stays_router_on_its_thread() {
    what_a_session_may_read_again_stays(false);
}

#[test]
fn what_a_session_may_read_again_stays_router_on_the_loop() {
    what_a_session_may_read_again_stays(true);
}

/// A QoS 1 subscriber that acknowledges nothing while 1,000 messages of
/// 64 bytes are published (about 80 KiB of topic and payload, ten times
/// its in-flight window) falls that far behind and, once it acknowledges,
/// still gets every one in order: the default log (`segment_size` x
/// `segment_count`) holds them; with the former 2 x 4 KiB it skipped all
/// but the last ~100.
fn a_subscriber_far_behind_loses_nothing(on_the_loop: bool) {
    const MESSAGES: u16 = 1_000;
    let server = server(on_the_loop);
    let mut slow = subscriber(&server, "logs-slow", true, "logs/slow", 1);
    let mut publisher = RawMqtt::session(server.mqtt_addr(), 4, "logs-slow-publisher", 30);
    for n in 0..MESSAGES {
        let mut payload = [0u8; 64];
        payload[..2].copy_from_slice(&n.to_be_bytes());
        publisher.send(&mqtt_raw::publish_qos(4, "logs/slow", 1, n + 1, &payload));
        assert_eq!(publisher.read_packet().unwrap().packet_type(), 4, "PUBACK");
    }
    for n in 0..MESSAGES {
        let d = slow.read_packet().expect("a PUBLISH").delivery(4);
        assert_eq!((d.qos, d.payload.len()), (1, 64));
        assert_eq!(u16::from_be_bytes([d.payload[0], d.payload[1]]), n, "delivered in order, none skipped");
        slow.send(&mqtt_raw::ack(0x40, d.pkid));
    }
    assert_eq!(server.metric("echo_mqtt_slow_subscriber_skips_total"), 0.0);
    // Read and acknowledged, they leave the log: the last window with its
    // acknowledgements, not with the next message on the topic.
    logged_stays(&server, 0.0);
}

#[test]
fn a_subscriber_far_behind_loses_nothing_router_on_its_thread() {
    a_subscriber_far_behind_loses_nothing(false);
}

#[test]
fn a_subscriber_far_behind_loses_nothing_router_on_the_loop() {
    a_subscriber_far_behind_loses_nothing(true);
}

/// A persistent QoS 1 session away while 2,000 QoS 1 messages come on its four
/// topics (500 each, which each topic's log would keep) is held to its
/// queue cap (`mqtt.max_queued_messages`, here 300): the logs let its
/// oldest go, counted, and when it comes back it gets the newest, each
/// topic's in order, the last one last.
fn a_kept_session_is_held_to_its_queue_cap(on_the_loop: bool) {
    const CAP: usize = 300;
    // What the logs may gain between two of the router's sweeps.
    const SWEEP: usize = 256;
    let mut env = vec![("ECHO_MQTT_MAX_QUEUED_MESSAGES", "300")];
    if on_the_loop {
        env.extend_from_slice(&common::ROUTER_ON_THE_LOOP);
    }
    let server = TestServer::start_with_env(&[], &env);
    let mut kept = subscriber(&server, "logs-away", false, "capped/+", 1);
    kept.send(&mqtt_raw::PINGREQ);
    assert_eq!(kept.read_packet().unwrap().packet_type(), 13);
    drop(kept);
    server.wait_for_metric("echo_mqtt_connections{version=\"3.1.1\"}", COPIED, |v| v == 0.0);

    let mut publisher = RawMqtt::session(server.mqtt_addr(), 4, "capped-publisher", 30);
    for n in 0..2_000u16 {
        let topic = format!("capped/{}", n % 4);
        publisher.send(&mqtt_raw::publish_qos(4, &topic, 1, n + 1, &n.to_be_bytes()));
        assert_eq!(publisher.read_packet().unwrap().packet_type(), 4, "PUBACK");
    }
    // Every message is either held or counted as dropped, once the router
    // has them all.
    let deadline = std::time::Instant::now() + COPIED;
    let (held, dropped) = loop {
        let metrics = server.metrics();
        let count = |key: &str| metrics.get(key).copied().unwrap_or(0.0);
        let (held, dropped) = (count(LOGGED), count("echo_mqtt_dropped_total{reason=\"max_queued\"}"));
        if held + dropped == 2_000.0 {
            break (held, dropped);
        }
        assert!(std::time::Instant::now() < deadline, "{dropped} dropped, {held} held");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(held <= (CAP + SWEEP) as f64, "{dropped} dropped, {held} held");

    let mut kept = RawMqtt::connect(server.mqtt_addr());
    kept.send(&mqtt_raw::connect_session(4, "logs-away", false, None));
    assert!(kept.read_packet().unwrap().session_present());
    let mut last = [None::<u16>; 4];
    for _ in 0..held as usize {
        let d = kept.read_packet().expect("a PUBLISH").delivery(4);
        assert_eq!(d.qos, 1);
        kept.send(&mqtt_raw::ack(0x40, d.pkid));
        let n = u16::from_be_bytes([d.payload[0], d.payload[1]]);
        let topic = usize::from(n % 4);
        assert_eq!(d.topic, format!("capped/{topic}"));
        assert!(last[topic].is_none_or(|before| before + 4 == n), "capped/{topic}: {n} after {last:?}");
        last[topic] = Some(n);
    }
    assert_eq!(last, [Some(1_996), Some(1_997), Some(1_998), Some(1_999)], "the newest, to the last");
    assert!(kept.silent_for(Duration::from_millis(300)), "nothing more");
    logged_stays(&server, 0.0);
}

#[test]
fn a_kept_session_is_held_to_its_queue_cap_router_on_its_thread() {
    a_kept_session_is_held_to_its_queue_cap(false);
}

#[test]
fn a_kept_session_is_held_to_its_queue_cap_router_on_the_loop() {
    a_kept_session_is_held_to_its_queue_cap(true);
}
