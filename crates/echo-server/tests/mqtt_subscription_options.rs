//! MQTT 5 subscription options (§3.8.3.1): No Local, Retain As Published
//! and Retain Handling, at subscription and at re-subscription. Each with
//! the router on its thread and on the event loop.

mod common;

use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt, RawPacket};

/// How long "nothing more comes" is watched for.
const QUIET: Duration = Duration::from_millis(300);

const NO_LOCAL: u8 = 0b0000_0100;
const RETAIN_AS_PUBLISHED: u8 = 0b0000_1000;
const RETAIN_HANDLING_NEW_ONLY: u8 = 0b0001_0000;
const RETAIN_HANDLING_NEVER: u8 = 0b0010_0000;

fn each_router_placement(test: impl Fn(&TestServer)) {
    for on_the_loop in [false, true] {
        let server = if on_the_loop {
            TestServer::start_with_env(&[], &common::ROUTER_ON_THE_LOOP)
        } else {
            TestServer::start(&[])
        };
        test(&server);
    }
}

fn client(server: &TestServer, id: &str) -> RawMqtt {
    RawMqtt::session(server.mqtt_addr(), 5, id, 30)
}

/// Every packet the server sends until it is quiet.
fn until_quiet(c: &mut RawMqtt) -> Vec<RawPacket> {
    let mut packets = Vec::new();
    while !c.silent_for(QUIET) {
        packets.push(c.read_packet().expect("a packet"));
    }
    packets
}

/// SUBSCRIBEs with `options`; returns the publishes that follow, as
/// (payload, RETAIN flag), after the SUBACK granting the options' QoS.
fn subscribe(c: &mut RawMqtt, pkid: u16, filter: &str, options: u8) -> Vec<(Vec<u8>, bool)> {
    c.send(&mqtt_raw::subscribe_options(pkid, filter, options));
    let packets = until_quiet(c);
    let (acks, publishes): (Vec<_>, Vec<_>) = packets.into_iter().partition(|p| p.packet_type() == 9);
    assert_eq!(acks.len(), 1, "one SUBACK");
    assert_eq!(acks[0].suback_codes(5), vec![options & 3]);
    publishes.iter().map(received).collect()
}

fn received(p: &RawPacket) -> (Vec<u8>, bool) {
    (p.delivery(5).payload, p.first & 1 == 1)
}

/// Publishes at QoS 0, then waits for the PINGRESP that says the router
/// has taken it.
fn publish(c: &mut RawMqtt, topic: &str, payload: &[u8], retain: bool) {
    let mut packet = mqtt_raw::publish(5, topic, payload);
    if retain {
        packet[0] |= 1;
    }
    c.send(&packet);
    c.send(&mqtt_raw::PINGREQ);
    // What comes before the PINGRESP is the client's own delivery, if any.
    loop {
        let p = c.read_packet().expect("a PINGRESP");
        if p.packet_type() == 13 {
            return;
        }
    }
}

fn payloads(c: &mut RawMqtt) -> Vec<Vec<u8>> {
    until_quiet(c).iter().map(|p| p.delivery(5).payload).collect()
}

#[test]
fn no_local_keeps_a_clients_own_publishes_from_it() {
    each_router_placement(|server| {
        let mut local = client(server, "nl-local");
        let mut plain = client(server, "nl-plain");
        let mut other = client(server, "nl-other");
        assert!(subscribe(&mut local, 1, "nl/t", NO_LOCAL).is_empty());
        assert!(subscribe(&mut plain, 1, "nl/+", 0).is_empty());

        // Sent before the PINGRESP if at all: `until_quiet` sees it.
        local.send(&mqtt_raw::publish(5, "nl/t", b"own"));
        plain.send(&mqtt_raw::publish(5, "nl/t", b"plain's own"));
        assert_eq!(payloads(&mut local), vec![b"plain's own".to_vec()], "No Local: not its own");
        let mut got = payloads(&mut plain);
        got.sort();
        assert_eq!(got, vec![b"own".to_vec(), b"plain's own".to_vec()], "without: its own too");

        publish(&mut other, "nl/t", b"other's", false);
        assert_eq!(payloads(&mut local), vec![b"other's".to_vec()]);
        assert_eq!(payloads(&mut plain), vec![b"other's".to_vec()]);

        // Re-subscribing replaces the options: now without No Local.
        assert!(subscribe(&mut local, 2, "nl/t", 0).is_empty());
        local.send(&mqtt_raw::publish(5, "nl/t", b"own again"));
        assert_eq!(payloads(&mut local), vec![b"own again".to_vec()]);
        // And with it again.
        assert!(subscribe(&mut local, 3, "nl/t", NO_LOCAL).is_empty());
        local.send(&mqtt_raw::publish(5, "nl/t", b"own, skipped"));
        assert!(local.silent_for(QUIET));
    });
}

/// What No Local skips is read past: it takes no place in the client's
/// in-flight window (Receive Maximum 1 here), and what follows comes.
#[test]
fn no_local_skips_do_not_hold_the_in_flight_window() {
    each_router_placement(|server| {
        let mut local = RawMqtt::connect(server.mqtt_addr());
        // Receive Maximum (0x21) 1.
        local.send(&mqtt_raw::connect_with_properties("nl-window", &[0x21, 0, 1]));
        assert_eq!(local.read_packet().unwrap().connack_code(), 0);
        assert!(subscribe(&mut local, 1, "nlw/t", NO_LOCAL | 1).is_empty());
        for pkid in 1..=5 {
            local.send(&mqtt_raw::publish_qos(5, "nlw/t", 1, pkid, b"own"));
            assert_eq!(local.read_packet().unwrap().packet_type(), 4, "PUBACK");
        }
        assert!(local.silent_for(QUIET));

        let mut other = client(server, "nlw-other");
        other.send(&mqtt_raw::publish_qos(5, "nlw/t", 1, 1, b"other's"));
        assert_eq!(other.read_packet().unwrap().packet_type(), 4, "PUBACK");
        let delivery = local.read_packet().unwrap().delivery(5);
        assert_eq!((delivery.payload.as_slice(), delivery.qos), (&b"other's"[..], 1));
        local.send(&mqtt_raw::ack(0x40, delivery.pkid));
        assert!(local.silent_for(QUIET));
    });
}

#[test]
fn retain_as_published_keeps_the_retain_flag_of_live_deliveries() {
    each_router_placement(|server| {
        let mut kept = client(server, "rap-kept");
        let mut plain = client(server, "rap-plain");
        let mut publisher = client(server, "rap-publisher");
        assert!(subscribe(&mut kept, 1, "rap/t", RETAIN_AS_PUBLISHED).is_empty());
        assert!(subscribe(&mut plain, 1, "rap/t", 0).is_empty());

        publish(&mut publisher, "rap/t", b"retained", true);
        publish(&mut publisher, "rap/t", b"live", false);
        let kept_got: Vec<_> = until_quiet(&mut kept).iter().map(received).collect();
        let plain_got: Vec<_> = until_quiet(&mut plain).iter().map(received).collect();
        assert_eq!(kept_got, vec![(b"retained".to_vec(), true), (b"live".to_vec(), false)]);
        assert_eq!(plain_got, vec![(b"retained".to_vec(), false), (b"live".to_vec(), false)]);

        // Retained messages sent at subscription have RETAIN 1 either way.
        let mut late = client(server, "rap-late");
        assert_eq!(subscribe(&mut late, 1, "rap/t", 0), vec![(b"retained".to_vec(), true)]);
    });
}

#[test]
fn retain_handling_says_when_retained_messages_are_sent() {
    each_router_placement(|server| {
        let mut publisher = client(server, "rh-publisher");
        publish(&mut publisher, "rh/t", b"kept", true);
        let retained = vec![(b"kept".to_vec(), true)];

        // 0: at every SUBSCRIBE, re-subscriptions included.
        let mut every = client(server, "rh-every");
        assert_eq!(subscribe(&mut every, 1, "rh/t", 0), retained);
        assert_eq!(subscribe(&mut every, 2, "rh/t", 0), retained);

        // 1: only when the subscription is new.
        let mut new_only = client(server, "rh-new");
        assert_eq!(subscribe(&mut new_only, 1, "rh/+", RETAIN_HANDLING_NEW_ONLY), retained);
        assert!(subscribe(&mut new_only, 2, "rh/+", RETAIN_HANDLING_NEW_ONLY).is_empty());
        // The subscription is there all the same.
        publish(&mut publisher, "rh/t", b"live", false);
        assert_eq!(payloads(&mut new_only), vec![b"live".to_vec()]);

        // 2: never.
        let mut never = client(server, "rh-never");
        assert!(subscribe(&mut never, 1, "rh/t", RETAIN_HANDLING_NEVER).is_empty());
        assert!(subscribe(&mut never, 2, "rh/t", RETAIN_HANDLING_NEVER).is_empty());
        // ...and a re-subscription with 0 sends them.
        assert_eq!(subscribe(&mut never, 3, "rh/t", 0), retained);
    });
}

/// No Local is the session's, not the connection's: a resumed session's
/// subscription still leaves out what the client publishes, and still
/// delivers what others published while it was away.
#[test]
fn no_local_holds_across_a_resumed_session() {
    each_router_placement(|server| {
        let mut away = RawMqtt::connect(server.mqtt_addr());
        away.send(&mqtt_raw::connect_session(5, "nl-kept", true, Some(300)));
        assert_eq!(away.read_packet().unwrap().connack_code(), 0);
        assert!(subscribe(&mut away, 1, "nlk/t", NO_LOCAL).is_empty());
        away.send(&mqtt_raw::DISCONNECT);
        // The server has read the DISCONNECT and closed before the other
        // client connects (a round trip through the router): else a
        // publish could reach the leaving connection, and be lost with it
        // at QoS 0.
        assert!(away.closed_within(Duration::from_secs(5)));
        drop(away);

        // While the session waits: another client's publish, kept for it.
        let mut other = client(server, "nlk-other");
        publish(&mut other, "nlk/t", b"other's, kept", false);

        let mut back = RawMqtt::connect(server.mqtt_addr());
        back.send(&mqtt_raw::connect_session(5, "nl-kept", false, Some(300)));
        let ack = back.read_packet().unwrap();
        assert_eq!((ack.connack_code(), ack.session_present()), (0, true));
        assert_eq!(payloads(&mut back), vec![b"other's, kept".to_vec()]);
        back.send(&mqtt_raw::publish(5, "nlk/t", b"own"));
        assert!(back.silent_for(QUIET), "its own, after resuming");
        publish(&mut other, "nlk/t", b"other's", false);
        assert_eq!(payloads(&mut back), vec![b"other's".to_vec()]);
    });
}

/// The SUBACK and the deliveries that follow a SUBSCRIBE, as (payload,
/// Subscription Identifiers).
fn subscribed_with_id(c: &mut RawMqtt, packet: &[u8]) -> Vec<(Vec<u8>, Vec<usize>)> {
    c.send(packet);
    let packets = until_quiet(c);
    assert_eq!(packets.iter().filter(|p| p.packet_type() == 9).count(), 1, "one SUBACK: {packets:?}");
    packets.iter().filter(|p| p.packet_type() == 3).map(identified).collect()
}

fn identified(p: &RawPacket) -> (Vec<u8>, Vec<usize>) {
    let delivery = p.delivery(5);
    (delivery.payload, delivery.subscription_ids)
}

fn identified_until_quiet(c: &mut RawMqtt) -> Vec<(Vec<u8>, Vec<usize>)> {
    let mut got: Vec<_> = until_quiet(c).iter().map(identified).collect();
    got.sort();
    got
}

/// Subscription Identifiers (§3.8.2.1.2, §3.3.4): a delivery carries the
/// identifier of the subscription it matched, retained messages sent at
/// subscription too; a publish matching two of a client's subscriptions
/// comes once for each, with that subscription's identifier; a
/// re-SUBSCRIBE replaces the identifier, and one without an identifier
/// takes it away.
#[test]
fn deliveries_carry_the_identifier_of_the_subscription_they_matched() {
    each_router_placement(|server| {
        let mut publisher = client(server, "subid-publisher");
        publish(&mut publisher, "subid/kept", b"kept", true);
        let mut c = client(server, "subid-subscriber");
        let retained = subscribed_with_id(&mut c, &mqtt_raw::subscribe_with_id(1, "subid/+", 0, 7));
        assert_eq!(retained, vec![(b"kept".to_vec(), vec![7])]);
        // 300 takes two bytes as a variable byte integer.
        assert_eq!(subscribed_with_id(&mut c, &mqtt_raw::subscribe_with_id(2, "subid/x", 0, 300)), vec![]);

        publish(&mut publisher, "subid/x", b"both", false);
        assert_eq!(
            identified_until_quiet(&mut c),
            vec![(b"both".to_vec(), vec![7]), (b"both".to_vec(), vec![300])]
        );

        let again = mqtt_raw::subscribe_with_id(3, "subid/+", RETAIN_HANDLING_NEVER, 9);
        assert_eq!(subscribed_with_id(&mut c, &again), vec![]);
        publish(&mut publisher, "subid/y", b"replaced", false);
        assert_eq!(identified_until_quiet(&mut c), vec![(b"replaced".to_vec(), vec![9])]);

        let without = mqtt_raw::subscribe_options(4, "subid/+", RETAIN_HANDLING_NEVER);
        assert_eq!(subscribed_with_id(&mut c, &without), vec![]);
        publish(&mut publisher, "subid/y", b"none", false);
        assert_eq!(identified_until_quiet(&mut c), vec![(b"none".to_vec(), vec![])]);
    });
}

/// A Subscription Identifier of 0 is a Protocol Error (§3.8.2.1.2):
/// DISCONNECT 0x82, and the connection closes.
#[test]
fn a_subscription_identifier_of_zero_is_a_protocol_error() {
    each_router_placement(|server| {
        let mut c = client(server, "subid-zero");
        c.send(&mqtt_raw::subscribe_with_id(1, "subid/zero", 0, 0));
        let p = c.read_packet().expect("a DISCONNECT");
        assert_eq!(p.packet_type(), 14, "{p:?}");
        assert_eq!(p.disconnect_reason(), 0x82);
        assert!(c.closed_within(Duration::from_secs(5)));
    });
}

/// A resumed session's subscriptions keep their identifiers: what waited
/// for it, and what comes after, carries them.
#[test]
fn subscription_identifiers_hold_across_a_resumed_session() {
    each_router_placement(|server| {
        let mut away = RawMqtt::connect(server.mqtt_addr());
        away.send(&mqtt_raw::connect_session(5, "subid-kept", true, Some(300)));
        assert_eq!(away.read_packet().unwrap().connack_code(), 0);
        assert_eq!(subscribed_with_id(&mut away, &mqtt_raw::subscribe_with_id(1, "subidk/t", 0, 42)), vec![]);
        away.send(&mqtt_raw::DISCONNECT);
        // The server has read the DISCONNECT and closed before the other
        // client connects (a round trip through the router): else a
        // publish could reach the leaving connection, and be lost with it
        // at QoS 0.
        assert!(away.closed_within(Duration::from_secs(5)));
        drop(away);

        let mut other = client(server, "subidk-other");
        publish(&mut other, "subidk/t", b"kept", false);

        let mut back = RawMqtt::connect(server.mqtt_addr());
        back.send(&mqtt_raw::connect_session(5, "subid-kept", false, Some(300)));
        let ack = back.read_packet().unwrap();
        assert_eq!((ack.connack_code(), ack.session_present()), (0, true));
        assert_eq!(identified_until_quiet(&mut back), vec![(b"kept".to_vec(), vec![42])]);
        publish(&mut other, "subidk/t", b"live", false);
        assert_eq!(identified_until_quiet(&mut back), vec![(b"live".to_vec(), vec![42])]);
    });
}
