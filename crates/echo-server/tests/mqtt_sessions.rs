//! Sessions and subscriptions over their life, seen from a raw client:
//! sessions that outlive their connection (MQTT 3.1.1's clean session flag,
//! MQTT 5's clean start and session expiry interval, 3.1.2.11.2 and
//! 3.14.2.2.2) through the CONNACK's session present flag and what a resumed
//! session still receives; UNSUBSCRIBE's answer; filters freed when
//! their last subscriber goes, whose log slots new filters then reuse; MQTT
//! 5's assigned client identifiers and will delay.

mod common;

use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt, RawPacket};

fn server() -> TestServer {
    TestServer::start(&["--no-admin"])
}

/// Connects with `clean` and `expiry` (see `mqtt_raw::connect_session`);
/// returns the client and whether the server had a session for it.
fn open(server: &TestServer, level: u8, id: &str, clean: bool, expiry: Option<u32>) -> (RawMqtt, bool) {
    let mut raw = RawMqtt::connect(server.mqtt_addr());
    raw.send(&mqtt_raw::connect_session(level, id, clean, expiry));
    let ack = raw.read_packet().expect("a CONNACK");
    assert_eq!(ack.connack_code(), 0, "CONNACK for {id}");
    let present = ack.session_present();
    (raw, present)
}

/// Disconnects properly and waits until the server has closed, so that the
/// session is ended (or kept) before the test goes on.
fn leave(mut raw: RawMqtt, disconnect: &[u8]) {
    raw.send(disconnect);
    assert!(raw.closed_within(Duration::from_secs(5)), "the server closes after DISCONNECT");
}

/// SUBSCRIBE to one filter at QoS 1; returns the SUBACK's reason code.
fn subscribe_qos1(raw: &mut RawMqtt, level: u8, filter: &str) -> u8 {
    raw.send(&mqtt_raw::subscribe_qos(level, 7, filter, 1));
    let ack = raw.read_packet().expect("a SUBACK");
    assert_eq!(ack.packet_type(), 9, "{ack:?}");
    *ack.body.last().unwrap()
}

/// PUBLISH at QoS 1 and wait for its PUBACK.
fn publish_qos1(raw: &mut RawMqtt, level: u8, topic: &str, payload: &[u8]) {
    raw.send(&mqtt_raw::publish_qos(level, topic, 1, 9, payload));
    let ack = raw.read_packet().expect("a PUBACK");
    assert_eq!(ack.packet_type(), 4, "{ack:?}");
}

/// Nothing is on its way to this client: after a moment for deliveries in
/// flight, the next packet is the answer to a ping.
fn nothing_more(raw: &mut RawMqtt, why: &str) {
    std::thread::sleep(Duration::from_millis(200));
    raw.send(&mqtt_raw::PINGREQ);
    let next = raw.read_packet().expect("a PINGRESP");
    assert_eq!(next.packet_type(), 13, "{why}: {next:?}");
}

fn expect_publish(raw: &mut RawMqtt, payload: &[u8]) -> RawPacket {
    let p = raw.read_packet().expect("a PUBLISH");
    assert_eq!(p.packet_type(), 3, "{p:?}");
    assert!(p.body.ends_with(payload), "{p:?}");
    p
}

#[test]
fn a_3_1_1_session_without_clean_session_keeps_its_subscriptions_and_messages() {
    let server = server();
    let (mut keeper, present) = open(&server, 4, "keeper", false, None);
    assert!(!present, "a new client id has no session");
    assert_eq!(subscribe_qos1(&mut keeper, 4, "keep/t"), 1);
    leave(keeper, &mqtt_raw::DISCONNECT);

    let (mut publisher, _) = open(&server, 4, "keeper-pub", true, None);
    publish_qos1(&mut publisher, 4, "keep/t", b"while you were away");

    let (mut keeper, present) = open(&server, 4, "keeper", false, None);
    assert!(present, "the session was kept");
    expect_publish(&mut keeper, b"while you were away");
    leave(keeper, &mqtt_raw::DISCONNECT);

    // A clean session discards it, and ends with its connection.
    let (clean, present) = open(&server, 4, "keeper", true, None);
    assert!(!present);
    leave(clean, &mqtt_raw::DISCONNECT);
    let (again, present) = open(&server, 4, "keeper", false, None);
    assert!(!present, "the clean session discarded the kept one and kept nothing");
    leave(again, &mqtt_raw::DISCONNECT);
}

#[test]
fn mqtt5_sessions_last_as_long_as_their_expiry_interval() {
    let server = server();
    // Absent means 0: the session ends with the connection, even without
    // clean start (rumqttd 0.20 kept it for ever).
    let (c, _) = open(&server, 5, "zero", false, None);
    leave(c, &mqtt_raw::DISCONNECT);
    let (c, present) = open(&server, 5, "zero", false, None);
    assert!(!present, "expiry 0: nothing kept");
    leave(c, &mqtt_raw::DISCONNECT);

    // Two seconds: there at once, gone after.
    let (mut c, _) = open(&server, 5, "short", false, Some(2));
    assert_eq!(subscribe_qos1(&mut c, 5, "short/t"), 1);
    leave(c, &mqtt_raw::DISCONNECT);
    let (mut publisher, _) = open(&server, 5, "short-pub", true, None);
    publish_qos1(&mut publisher, 5, "short/t", b"kept for you");
    let (mut c, present) = open(&server, 5, "short", false, Some(2));
    assert!(present, "within the expiry interval");
    expect_publish(&mut c, b"kept for you");
    leave(c, &mqtt_raw::DISCONNECT);
    std::thread::sleep(Duration::from_millis(2_500));
    let (c, present) = open(&server, 5, "short", false, Some(2));
    assert!(!present, "expired");
    leave(c, &mqtt_raw::DISCONNECT);

    // Clean start with an expiry: a new session, kept after the connection
    // (rumqttd 0.20 dropped every session that started clean).
    let (c, present) = open(&server, 5, "fresh", true, Some(3600));
    assert!(!present);
    leave(c, &mqtt_raw::DISCONNECT);
    let (c, present) = open(&server, 5, "fresh", false, Some(3600));
    assert!(present, "a clean start still keeps the new session for its interval");

    // A DISCONNECT may shorten it to nothing...
    leave(c, &mqtt_raw::disconnect_with_expiry(0));
    let (c, present) = open(&server, 5, "fresh", false, Some(3600));
    assert!(!present, "the DISCONNECT's expiry 0 ended the session");
    // ...or lengthen it, here to never.
    leave(c, &mqtt_raw::disconnect_with_expiry(u32::MAX));
    let (c, present) = open(&server, 5, "fresh", false, None);
    assert!(present, "0xFFFFFFFF: never expires");
    leave(c, &mqtt_raw::DISCONNECT);
}

#[test]
fn a_disconnect_cannot_keep_a_session_that_ends_with_its_connection() {
    let server = server();
    let (mut c, _) = open(&server, 5, "sneaky", false, Some(0));
    c.send(&mqtt_raw::disconnect_with_expiry(60));
    let answer = c.read_packet().expect("a DISCONNECT from the server");
    assert_eq!(answer.disconnect_reason(), 0x82, "protocol error (MQTT 5 §3.14.2.2.2)");
    assert!(c.closed_within(Duration::from_secs(5)));
    let (c, present) = open(&server, 5, "sneaky", false, None);
    assert!(!present);
    leave(c, &mqtt_raw::DISCONNECT);
}

/// Shared subscriptions are refused to sessions the router would keep
/// (see `topics::check_filter`), whatever the flag that makes them kept.
#[test]
fn shared_subscriptions_need_a_session_that_ends_with_its_connection() {
    let server = server();
    for (level, clean, expiry, allowed) in [
        (4, true, None, true),
        (4, false, None, false),
        (5, false, Some(0), true),
        (5, true, Some(60), false),
    ] {
        let id = format!("share-{level}-{clean}-{expiry:?}");
        let (mut c, _) = open(&server, level, &id, clean, expiry);
        let code = subscribe_qos1(&mut c, level, "$share/g/jobs");
        let refused = if level == 5 { 0x9e } else { 0x80 };
        assert_eq!(code, if allowed { 1 } else { refused }, "{id}");
        leave(c, &mqtt_raw::DISCONNECT);
    }
}

/// UNSUBSCRIBE for `filters`; returns the UNSUBACK's reason codes (MQTT 5)
/// or nothing (3.1.1), after checking it is the one answer.
fn unsubscribe(raw: &mut RawMqtt, level: u8, filters: &[&str]) -> Vec<u8> {
    raw.send(&mqtt_raw::unsubscribe_all(level, 5, filters));
    let ack = raw.read_packet().expect("an UNSUBACK");
    assert_eq!(ack.packet_type(), 11, "{ack:?}");
    assert_eq!(ack.body[..2], 5u16.to_be_bytes(), "the UNSUBSCRIBE's packet id");
    let reasons = if level == 5 { ack.body[3..].to_vec() } else { Vec::new() };
    assert_eq!(ack.body.len(), if level == 5 { 3 + filters.len() } else { 2 }, "{ack:?}");
    // Exactly one UNSUBACK: the next packet is the answer to a ping.
    raw.send(&mqtt_raw::PINGREQ);
    let next = raw.read_packet().expect("a PINGRESP");
    assert_eq!(next.packet_type(), 13, "one UNSUBACK per UNSUBSCRIBE, got also {next:?}");
    reasons
}

#[test]
fn every_unsubscribe_gets_one_answer_with_a_reason_per_filter() {
    let server = server();
    for level in [4u8, 5] {
        let (mut c, _) = open(&server, level, &format!("unsub-{level}"), true, None);
        // Never subscribed: still answered (rumqttd 0.20 sent nothing).
        let reasons = unsubscribe(&mut c, level, &["never/subscribed"]);
        if level == 5 {
            assert_eq!(reasons, vec![0x11], "no subscription existed");
        }
        assert_eq!(subscribe_qos1(&mut c, level, "x/1"), 1);
        assert_eq!(subscribe_qos1(&mut c, level, "x/+"), 1);
        // Three filters, one answer (rumqttd 0.20 sent one per filter removed).
        let reasons = unsubscribe(&mut c, level, &["x/1", "x/+", "x/3"]);
        if level == 5 {
            assert_eq!(reasons, vec![0x00, 0x00, 0x11]);
        }
        // Nothing subscribed any more: its own publish does not come back.
        publish_qos1(&mut c, level, "x/1", b"to nobody");
        nothing_more(&mut c, "no delivery after UNSUBSCRIBE");
        leave(c, &mqtt_raw::DISCONNECT);
    }
}

#[test]
fn a_resumed_session_can_unsubscribe() {
    let server = server();
    let (mut c, _) = open(&server, 4, "resumer", false, None);
    assert_eq!(subscribe_qos1(&mut c, 4, "resume/t"), 1);
    leave(c, &mqtt_raw::DISCONNECT);
    let (mut c, present) = open(&server, 4, "resumer", false, None);
    assert!(present);
    // rumqttd 0.20 did not know a resumed session's subscriptions were its
    // own: no UNSUBACK, and the subscription stayed.
    unsubscribe(&mut c, 4, &["resume/t"]);
    let (mut publisher, _) = open(&server, 4, "resumer-pub", true, None);
    publish_qos1(&mut publisher, 4, "resume/t", b"after unsubscribe");
    nothing_more(&mut c, "the subscription is gone");
    leave(c, &mqtt_raw::DISCONNECT);
}

/// A filter nobody subscribes to any more is freed, and its slot in the
/// router goes to the next new filter: no message for the old filter may
/// reach the new one, exact or wildcard, and the old filter works again
/// when subscribed anew.
#[test]
fn freed_filters_pass_nothing_to_the_filters_that_reuse_their_slots() {
    let server = server();
    let (mut a, _) = open(&server, 5, "first-owner", true, None);
    assert_eq!(subscribe_qos1(&mut a, 5, "old/exact"), 1);
    assert_eq!(subscribe_qos1(&mut a, 5, "old/+"), 1);
    publish_qos1(&mut a, 5, "old/exact", b"cached");
    expect_publish(&mut a, b"cached");
    expect_publish(&mut a, b"cached");
    unsubscribe(&mut a, 5, &["old/exact", "old/+"]);

    let (mut b, _) = open(&server, 5, "second-owner", true, None);
    assert_eq!(subscribe_qos1(&mut b, 5, "new/#"), 1);
    assert_eq!(subscribe_qos1(&mut b, 5, "new/exact"), 1);
    publish_qos1(&mut a, 5, "old/exact", b"stray");
    publish_qos1(&mut a, 5, "old/other", b"stray");
    publish_qos1(&mut a, 5, "new/exact", b"for b");
    // `new/exact` matches both of b's filters: two deliveries, then nothing.
    for _ in 0..2 {
        let got = expect_publish(&mut b, b"for b");
        assert!(got.body.starts_with(b"\x00\x09new/exact"), "{got:?}");
    }
    nothing_more(&mut b, "nothing else for b");

    // The old filter, subscribed again, gets a log of its own again.
    assert_eq!(subscribe_qos1(&mut a, 5, "old/exact"), 1);
    publish_qos1(&mut a, 5, "old/exact", b"again");
    expect_publish(&mut a, b"again");
    leave(a, &mqtt_raw::DISCONNECT);
    leave(b, &mqtt_raw::DISCONNECT);
}

/// An MQTT 5 client that connects with an empty client id gets one
/// assigned in its CONNACK (§3.2.2.3.7), its own, and it names the session:
/// a connection with it takes that session over.
#[test]
fn an_empty_client_id_gets_one_assigned() {
    let server = server();
    let assigned = |c: &mut RawMqtt| {
        c.send(&mqtt_raw::connect(5, "", 30));
        let ack = c.read_packet().expect("a CONNACK");
        assert_eq!(ack.connack_code(), 0);
        ack.assigned_client_id().expect("an Assigned Client Identifier")
    };
    let mut first = RawMqtt::connect(server.mqtt_addr());
    let id = assigned(&mut first);
    let mut second = RawMqtt::connect(server.mqtt_addr());
    assert_ne!(assigned(&mut second), id, "each client gets its own");
    assert!(!id.is_empty());
    let _taker = RawMqtt::session(server.mqtt_addr(), 5, &id, 30);
    let p = first.read_packet().expect("a DISCONNECT");
    assert_eq!((p.packet_type(), p.disconnect_reason()), (14, 0x8E), "session taken over");
}

/// The Will Delay Interval (§3.1.3.2.2): a will waits that long after its
/// connection is lost (here 2 s, within a session expiry of 60 s); a
/// client that resumes its session within it cancels it; one that comes
/// back with a clean start ends the old session, and the will goes at once.
#[test]
fn a_will_waits_for_its_delay_and_a_return_cancels_it() {
    let server = server();
    let mut watcher = RawMqtt::session(server.mqtt_addr(), 5, "will-watcher", 30);
    watcher.send(&mqtt_raw::subscribe_qos(5, 1, "wills/#", 0));
    assert_eq!(watcher.read_packet().unwrap().packet_type(), 9, "SUBACK");
    let expiry = [0x11, 0, 0, 0, 60];
    let delay = [0x18, 0, 0, 0, 2];
    let lose = |id: &str, topic: &[u8]| {
        let mut c = RawMqtt::connect(server.mqtt_addr());
        c.send(&mqtt_raw::connect_with_will_properties(5, id, topic, b"bye", 0, &expiry, &delay));
        assert_eq!(c.read_packet().unwrap().connack_code(), 0);
        drop(c);
        std::time::Instant::now()
    };

    let lost = lose("will-gone", b"wills/gone");
    assert!(watcher.silent_for(Duration::from_millis(1500)), "the will before its delay");
    let will = watcher.read_packet().expect("the will").delivery(5);
    assert_eq!((will.topic.as_str(), will.payload.as_slice()), ("wills/gone", &b"bye"[..]));
    assert!(lost.elapsed() >= Duration::from_millis(1900), "after {:?}", lost.elapsed());

    lose("will-back", b"wills/back");
    std::thread::sleep(Duration::from_millis(500));
    let (_back, present) = open(&server, 5, "will-back", false, Some(60));
    assert!(present, "the session was kept");
    assert!(watcher.silent_for(Duration::from_secs(3)), "a cancelled will was published");

    let lost = lose("will-fresh", b"wills/fresh");
    std::thread::sleep(Duration::from_millis(300));
    let _fresh = RawMqtt::session(server.mqtt_addr(), 5, "will-fresh", 30);
    let will = watcher.read_packet().expect("the will").delivery(5);
    assert_eq!(will.topic, "wills/fresh");
    assert!(lost.elapsed() < Duration::from_millis(1900), "after {:?}: not at once", lost.elapsed());
}
