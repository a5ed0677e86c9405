//! MQTT 5 flow control toward clients: the server sends a client no more
//! unacknowledged QoS 1 and 2 publishes than its Receive Maximum allows
//! (§3.1.2.11.3, §4.9), and no packet larger than its Maximum Packet Size
//! (§3.1.2.11.4: such a publish is dropped for that client alone, as if
//! sent). Each with the router on its thread and on the event loop.

mod common;

use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, Delivery, RawMqtt};

/// How long "nothing more comes" is watched for.
const QUIET: Duration = Duration::from_millis(300);

fn server(on_the_loop: bool) -> TestServer {
    if on_the_loop {
        TestServer::start_with_env(&[], &common::ROUTER_ON_THE_LOOP)
    } else {
        TestServer::start(&[])
    }
}

/// An MQTT 5 client connected with these CONNECT properties, subscribed to
/// `filter` at `qos`.
fn subscriber(server: &TestServer, id: &str, properties: &[u8], filter: &str, qos: u8) -> RawMqtt {
    let mut c = RawMqtt::connect(server.mqtt_addr());
    c.send(&mqtt_raw::connect_with_properties(id, properties));
    assert_eq!(c.read_packet().unwrap().connack_code(), 0, "CONNACK for {id}");
    c.send(&mqtt_raw::subscribe_qos(5, 1, filter, qos));
    assert_eq!(c.read_packet().unwrap().suback_codes(5), vec![qos]);
    c
}

/// Publishes each payload at its QoS (1: PUBACK awaited; 2: released and
/// completed) from a client of its own, so that all are in the router's log
/// before the test looks at what a subscriber gets.
fn publish_all(server: &TestServer, topic: &str, messages: &[(u8, Vec<u8>)]) {
    let mut publisher =
        RawMqtt::session(server.mqtt_addr(), 5, &format!("{}-publisher", topic.replace('/', "-")), 30);
    for (pkid, (qos, payload)) in (1u16..).zip(messages) {
        publisher.send(&mqtt_raw::publish_qos(5, topic, *qos, pkid, payload));
        match qos {
            0 => {}
            1 => assert_eq!(publisher.read_packet().unwrap().packet_type(), 4, "PUBACK"),
            _ => {
                assert_eq!(publisher.read_packet().unwrap().packet_type(), 5, "PUBREC");
                publisher.send(&mqtt_raw::ack(0x62, pkid));
                assert_eq!(publisher.read_packet().unwrap().packet_type(), 7, "PUBCOMP");
            }
        }
    }
    // A PINGRESP after the last publish: the router has taken them all.
    publisher.send(&mqtt_raw::PINGREQ);
    assert_eq!(publisher.read_packet().unwrap().packet_type(), 13);
}

fn next_delivery(c: &mut RawMqtt) -> Delivery {
    c.read_packet().expect("a PUBLISH").delivery(5)
}

/// Receive Maximum 2 at QoS 1: ten messages waiting, the subscriber gets
/// two, then one more per PUBACK, all ten in order.
fn receive_maximum_holds_qos1_deliveries(on_the_loop: bool) {
    let server = server(on_the_loop);
    let mut sub = subscriber(&server, "rm-1", &[0x21, 0, 2], "flow/rm1", 1);
    let messages: Vec<(u8, Vec<u8>)> = (0..10u8).map(|i| (1, vec![i])).collect();
    publish_all(&server, "flow/rm1", &messages);
    let mut unacked = std::collections::VecDeque::new();
    let mut payloads = Vec::new();
    for _ in 0..2 {
        let d = next_delivery(&mut sub);
        assert_eq!(d.qos, 1);
        payloads.push(d.payload[0]);
        unacked.push_back(d.pkid);
    }
    while let Some(pkid) = unacked.pop_front() {
        assert!(sub.silent_for(QUIET), "more than 2 unacknowledged (got {payloads:?})");
        sub.send(&mqtt_raw::ack(0x40, pkid));
        if payloads.len() < 10 {
            let d = next_delivery(&mut sub);
            payloads.push(d.payload[0]);
            unacked.push_back(d.pkid);
        }
    }
    assert_eq!(payloads, (0..10).collect::<Vec<u8>>());
    assert!(sub.silent_for(QUIET));
}

#[test]
fn receive_maximum_holds_qos1_deliveries_router_on_its_thread() {
    receive_maximum_holds_qos1_deliveries(false);
}

#[test]
fn receive_maximum_holds_qos1_deliveries_router_on_the_loop() {
    receive_maximum_holds_qos1_deliveries(true);
}

/// At QoS 2 a delivery counts until its PUBCOMP (§4.9), not its PUBREC; a
/// PUBREC with an error code (0x80 or more) ends the exchange: no PUBREL,
/// and the slot is free.
fn receive_maximum_counts_qos2_until_pubcomp(on_the_loop: bool) {
    let server = server(on_the_loop);
    let mut sub = subscriber(&server, "rm-2", &[0x21, 0, 2], "flow/rm2", 2);
    let messages: Vec<(u8, Vec<u8>)> = (0..5u8).map(|i| (2, vec![i])).collect();
    publish_all(&server, "flow/rm2", &messages);
    let (first, second) = (next_delivery(&mut sub), next_delivery(&mut sub));
    assert_eq!((first.qos, first.payload[0], second.payload[0]), (2, 0, 1));
    assert!(sub.silent_for(QUIET), "a third before any acknowledgement");
    sub.send(&mqtt_raw::ack(0x50, first.pkid));
    let pubrel = sub.read_packet().unwrap();
    assert_eq!((pubrel.packet_type(), pubrel.pkid()), (6, first.pkid), "PUBREL");
    assert!(sub.silent_for(QUIET), "a third before the first's PUBCOMP");
    sub.send(&mqtt_raw::ack(0x70, first.pkid));
    let third = next_delivery(&mut sub);
    assert_eq!(third.payload[0], 2);
    // PUBREC 0x80 (unspecified error) for the second: done with it.
    sub.send(&mqtt_raw::packet(0x50, &[(second.pkid >> 8) as u8, second.pkid as u8, 0x80, 0]));
    let fourth = next_delivery(&mut sub);
    assert_eq!(fourth.payload[0], 3, "the refused one's slot is free, and no PUBREL for it");
    assert!(sub.silent_for(QUIET));
    // The third's PUBCOMP frees a slot, and the fifth comes. One exchange
    // at a time: acknowledgements sent back to back may reach the router in
    // one read or in two, which orders the fifth before or after the next
    // PUBREL.
    sub.send(&mqtt_raw::ack(0x50, third.pkid));
    assert_eq!(sub.read_packet().unwrap().packet_type(), 6, "PUBREL for the third");
    sub.send(&mqtt_raw::ack(0x70, third.pkid));
    let fifth = next_delivery(&mut sub);
    assert_eq!(fifth.payload[0], 4);
    for d in [fourth, fifth] {
        sub.send(&mqtt_raw::ack(0x50, d.pkid));
        assert_eq!(sub.read_packet().unwrap().packet_type(), 6, "PUBREL");
        sub.send(&mqtt_raw::ack(0x70, d.pkid));
    }
    assert!(sub.silent_for(QUIET));
}

#[test]
fn receive_maximum_counts_qos2_until_pubcomp_router_on_its_thread() {
    receive_maximum_counts_qos2_until_pubcomp(false);
}

#[test]
fn receive_maximum_counts_qos2_until_pubcomp_router_on_the_loop() {
    receive_maximum_counts_qos2_until_pubcomp(true);
}

/// Maximum Packet Size 100 (and Receive Maximum 1): publishes that would
/// make a larger packet for this client are dropped for it alone, at QoS 0
/// and 1, counted; a dropped QoS 1 one does not hold the client's only
/// in-flight slot, so what follows still comes. A client without the limit
/// gets everything.
fn maximum_packet_size_drops_larger_publishes(on_the_loop: bool) {
    let server = server(on_the_loop);
    let limited = [0x21, 0, 1, 0x27, 0, 0, 0, 100];
    let mut sub = subscriber(&server, "mps", &limited, "flow/mps", 1);
    let mut everything = subscriber(&server, "mps-all", &[], "flow/mps", 1);
    // A QoS 1 delivery of "flow/mps" with no properties is 15 bytes and the
    // payload: 85 bytes make exactly 100.
    let messages = [
        (0, vec![b's'; 50]),
        (0, vec![b'B'; 500]),
        (1, vec![b'B'; 500]),
        (1, vec![b's'; 50]),
        (1, vec![b'B'; 86]),
        (1, vec![b'e'; 85]),
        (1, vec![b'B'; 500]),
        (1, vec![b's'; 51]),
    ];
    publish_all(&server, "flow/mps", &messages);
    let mut got = Vec::new();
    for expected in [&messages[0], &messages[3], &messages[5], &messages[7]] {
        let packet = sub.read_packet().expect("a PUBLISH");
        assert!(packet.wire_len() <= 100, "{} bytes", packet.wire_len());
        let d = packet.delivery(5);
        assert_eq!((d.qos, &d.payload), (expected.0, &expected.1));
        got.push(d.payload.len());
        if d.qos == 1 {
            sub.send(&mqtt_raw::ack(0x40, d.pkid));
        }
    }
    assert_eq!(got, [50, 50, 85, 51]);
    assert!(sub.silent_for(QUIET));
    for (qos, payload) in &messages {
        let d = next_delivery(&mut everything);
        assert_eq!((d.qos, &d.payload), (*qos, payload));
        if d.qos == 1 {
            everything.send(&mqtt_raw::ack(0x40, d.pkid));
        }
    }
    let dropped = "echo_mqtt_dropped_total{reason=\"max_packet_size\"}";
    assert_eq!(server.wait_for_metric(dropped, Duration::from_secs(5), |v| v >= 4.0), 4.0);
    // The connection is fine: it still talks.
    sub.send(&mqtt_raw::PINGREQ);
    assert_eq!(sub.read_packet().unwrap().packet_type(), 13);
}

#[test]
fn maximum_packet_size_drops_larger_publishes_router_on_its_thread() {
    maximum_packet_size_drops_larger_publishes(false);
}

#[test]
fn maximum_packet_size_drops_larger_publishes_router_on_the_loop() {
    maximum_packet_size_drops_larger_publishes(true);
}

/// Retained messages a new subscription matches are sent within the
/// window too, and none is lost to it: five retained, Receive Maximum 2,
/// all five come, two at a time (rumqttd sent a subscription as many
/// retained messages as it had free slots and dropped the rest).
fn retained_messages_wait_for_the_window(on_the_loop: bool) {
    let server = server(on_the_loop);
    let mut publisher = RawMqtt::session(server.mqtt_addr(), 5, "retainer", 30);
    for i in 0..5u8 {
        // Retained (flag 0x01), QoS 1.
        let mut packet = mqtt_raw::publish_qos(5, &format!("flow/ret/{i}"), 1, u16::from(i) + 1, &[i]);
        packet[0] |= 0x01;
        publisher.send(&packet);
        assert_eq!(publisher.read_packet().unwrap().packet_type(), 4);
    }
    let mut sub = subscriber(&server, "ret", &[0x21, 0, 2], "flow/ret/#", 1);
    let mut payloads = Vec::new();
    let mut unacked = std::collections::VecDeque::new();
    for _ in 0..2 {
        let d = next_delivery(&mut sub);
        payloads.push(d.payload[0]);
        unacked.push_back(d.pkid);
    }
    while let Some(pkid) = unacked.pop_front() {
        assert!(sub.silent_for(QUIET), "more than 2 unacknowledged (got {payloads:?})");
        sub.send(&mqtt_raw::ack(0x40, pkid));
        if payloads.len() < 5 {
            let d = next_delivery(&mut sub);
            payloads.push(d.payload[0]);
            unacked.push_back(d.pkid);
        }
    }
    payloads.sort_unstable();
    assert_eq!(payloads, [0, 1, 2, 3, 4]);
    // And what is published afterwards still comes.
    publisher.send(&mqtt_raw::publish_qos(5, "flow/ret/new", 1, 9, b"n"));
    assert_eq!(next_delivery(&mut sub).payload, b"n");
}

#[test]
fn retained_messages_wait_for_the_window_router_on_its_thread() {
    retained_messages_wait_for_the_window(false);
}

#[test]
fn retained_messages_wait_for_the_window_router_on_the_loop() {
    retained_messages_wait_for_the_window(true);
}

/// A Receive Maximum or Maximum Packet Size of 0 is a protocol error
/// (§3.1.2.11.3-4): CONNACK 0x82.
#[test]
fn a_zero_receive_maximum_or_maximum_packet_size_is_refused() {
    let server = TestServer::start(&[]);
    for properties in [&[0x21, 0, 0][..], &[0x27, 0, 0, 0, 0]] {
        let mut c = RawMqtt::connect(server.mqtt_addr());
        c.send(&mqtt_raw::connect_with_properties("zero", properties));
        assert_eq!(c.read_packet().unwrap().connack_code(), 0x82, "{properties:?}");
        assert!(c.closed_within(Duration::from_secs(5)));
    }
}

/// A server started with this in-flight window (`mqtt.max_inflight_messages`).
fn server_with_window(on_the_loop: bool, window: &str) -> TestServer {
    let mut env = vec![("ECHO_MQTT_MAX_INFLIGHT_MESSAGES", window)];
    if on_the_loop {
        env.extend(common::ROUTER_ON_THE_LOOP);
    }
    TestServer::start_with_env(&[], &env)
}

/// `mqtt.max_inflight_messages` is the window for every client: an MQTT
/// 3.1.1 client gets 2 of 5 waiting QoS 1 messages, then one per PUBACK;
/// an MQTT 5 client asking for 10 gets 2 as well (the lower wins).
fn the_servers_window_holds_every_client(on_the_loop: bool) {
    let server = server_with_window(on_the_loop, "2");
    let mut old = RawMqtt::session(server.mqtt_addr(), 4, "window-311", 30);
    old.send(&mqtt_raw::subscribe_qos(4, 1, "flow/window", 1));
    assert_eq!(old.read_packet().unwrap().suback_codes(4), vec![1]);
    let mut new = subscriber(&server, "window-5", &[0x21, 0, 10], "flow/window", 1);
    let messages: Vec<(u8, Vec<u8>)> = (0..5u8).map(|i| (1, vec![i])).collect();
    publish_all(&server, "flow/window", &messages);
    for (c, level) in [(&mut old, 4), (&mut new, 5)] {
        let got: Vec<Delivery> =
            (0..2).map(|_| c.read_packet().expect("a PUBLISH").delivery(level)).collect();
        assert_eq!(got.iter().map(|d| d.payload[0]).collect::<Vec<_>>(), vec![0, 1]);
        assert!(c.silent_for(QUIET), "a third before any PUBACK (MQTT level {level})");
        c.send(&mqtt_raw::ack(0x40, got[0].pkid));
        assert_eq!(c.read_packet().expect("the third").delivery(level).payload, vec![2]);
        assert!(c.silent_for(QUIET), "a fourth with two unacknowledged (MQTT level {level})");
    }
}

#[test]
fn the_servers_window_holds_every_client_router_on_its_thread() {
    the_servers_window_holds_every_client(false);
}

#[test]
fn the_servers_window_holds_every_client_router_on_the_loop() {
    the_servers_window_holds_every_client(true);
}

/// A window over 100 (rumqttd's fixed one before it was configurable):
/// 150 QoS 1 messages arrive unacknowledged, each with a packet id of its
/// own.
#[test]
fn a_window_over_a_hundred_is_kept() {
    let server = server_with_window(false, "150");
    let mut c = RawMqtt::session(server.mqtt_addr(), 4, "window-wide", 30);
    c.send(&mqtt_raw::subscribe_qos(4, 1, "flow/wide", 1));
    assert_eq!(c.read_packet().unwrap().suback_codes(4), vec![1]);
    let messages: Vec<(u8, Vec<u8>)> = (0..160u8).map(|i| (1, vec![i])).collect();
    publish_all(&server, "flow/wide", &messages);
    let got: Vec<Delivery> = (0..150).map(|_| c.read_packet().expect("a PUBLISH").delivery(4)).collect();
    assert!(c.silent_for(QUIET), "more than 150 unacknowledged");
    assert_eq!(got.iter().map(|d| d.payload[0]).collect::<Vec<_>>(), (0..150).collect::<Vec<u8>>());
    let mut ids: Vec<u16> = got.iter().map(|d| d.pkid).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 150, "packet ids in flight twice");
}
