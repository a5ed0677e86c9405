//! What one MQTT client may make the server hold (`mqtt::caps`): each cap
//! enforced end to end, with the code each MQTT version gives, counted in
//! `echo_mqtt_cap_refusals_total{cap}`; and the never-released QoS 2
//! publishes that used to grow the server by a gigabyte, cut off at the
//! Receive Maximum.

mod common;

use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt};

fn refusals(server: &TestServer, cap: &str) -> f64 {
    server.metric(&format!("echo_mqtt_cap_refusals_total{{cap=\"{cap}\"}}"))
}

/// An MQTT 5 CONNACK tells the client the caps it can respect: Receive
/// Maximum and Topic Alias Maximum, as configured.
#[test]
fn connack_advertises_receive_maximum_and_topic_alias_maximum() {
    let server = TestServer::start(&[]);
    let mut c = RawMqtt::connect(server.mqtt_addr());
    c.send(&mqtt_raw::connect(5, "caps", 30));
    let properties = c.read_packet().unwrap().connack_properties();
    assert_eq!((properties.get(&0x21), properties.get(&0x22)), (Some(&32), Some(&10)), "defaults");
    let server = TestServer::start_with_env(
        &[],
        &[("ECHO_MQTT_RECEIVE_MAXIMUM", "5"), ("ECHO_MQTT_TOPIC_ALIAS_MAXIMUM", "0")],
    );
    let mut c = RawMqtt::connect(server.mqtt_addr());
    c.send(&mqtt_raw::connect(5, "caps", 30));
    let properties = c.read_packet().unwrap().connack_properties();
    assert_eq!((properties.get(&0x21), properties.get(&0x22)), (Some(&5), Some(&0)));
}

/// A client id over `max_client_id_length` bytes: CONNACK "client
/// identifier not valid" (3.1.1: 2, 5: 0x85); at the cap, accepted.
#[test]
fn a_client_id_over_the_cap_is_refused() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_MAX_CLIENT_ID_LENGTH", "32")]);
    for (level, code) in [(4u8, 2u8), (5, 0x85)] {
        RawMqtt::session(server.mqtt_addr(), level, &"i".repeat(32), 30);
        let mut long = RawMqtt::connect(server.mqtt_addr());
        long.send(&mqtt_raw::connect(level, &"i".repeat(33), 30));
        assert_eq!(long.read_packet().unwrap().connack_code(), code, "level {level}");
        assert!(long.closed_within(Duration::from_secs(5)));
    }
    assert_eq!(refusals(&server, "client_id"), 2.0);
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"client_id\"}"), 2.0);
}

/// A CONNECT over `max_connect_size` is refused as soon as its fixed
/// header is in, before its body is buffered (3.1.1: CONNACK 3, 5: 0x95);
/// at the cap, accepted. A client that has not connected cannot make the
/// server hold a packet of `max_payload_size`.
#[test]
fn a_connect_over_its_cap_is_refused_before_it_is_buffered() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_MAX_CONNECT_SIZE", "200")]);
    for (level, code) in [(4u8, 3u8), (5, 0x95)] {
        // A will message fills the CONNECT to the byte.
        let fits = |size: usize| {
            let empty = mqtt_raw::connect_with_will(level, "big", b"w", b"", 0).len();
            mqtt_raw::connect_with_will(level, "big", b"w", &vec![b'x'; size + 2 - empty], 0)
        };
        let mut at_cap = RawMqtt::connect(server.mqtt_addr());
        at_cap.send(&fits(200));
        assert_eq!(at_cap.read_packet().unwrap().connack_code(), 0, "level {level}: at the cap");
        // Only the fixed header of a 1 MB CONNECT and its protocol name and
        // level: refused at once.
        let big = fits(1_000_000);
        let mut over = RawMqtt::connect(server.mqtt_addr());
        over.send(&big[..4 + 7]);
        assert_eq!(over.read_packet().unwrap().connack_code(), code, "level {level}: over the cap");
        assert!(over.closed_within(Duration::from_secs(5)));
    }
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"too_large\"}"), 2.0);
}

/// Filters over the length or level cap get 0x8F (3.1.1: 0x80) each, the
/// others of the same SUBSCRIBE are granted; new filters past
/// `max_subscriptions` get 0x97 (3.1.1: 0x80); a filter already held and
/// a filter freed by UNSUBSCRIBE do not count against it.
#[test]
fn filters_over_the_caps_are_refused_one_by_one_in_the_suback() {
    let server = TestServer::start_with_env(
        &[],
        &[
            ("ECHO_MQTT_MAX_SUBSCRIPTIONS", "3"),
            ("ECHO_MQTT_MAX_TOPIC_LENGTH", "16"),
            ("ECHO_MQTT_MAX_TOPIC_LEVELS", "3"),
        ],
    );
    for (level, invalid, quota) in [(4u8, 0x80u8, 0x80u8), (5, 0x8f, 0x97)] {
        let mut c = RawMqtt::session(server.mqtt_addr(), level, &format!("filters-{level}"), 30);
        let filters = ["a/+/c", "a/b/c/d", "sixteen-bytes/ab", "seventeen-bytes/a", "$share/g/x/+/#"];
        c.send(&mqtt_raw::subscribe_all(level, 1, &filters));
        let codes = c.read_packet().unwrap().suback_codes(level);
        assert_eq!(codes, [0, invalid, 0, invalid, 0], "level {level}: length and levels");
        // Three held: one more is over the quota, one already held is not.
        c.send(&mqtt_raw::subscribe_all(level, 2, &["d", "a/+/c"]));
        assert_eq!(c.read_packet().unwrap().suback_codes(level), [quota, 0], "level {level}: quota");
        c.send(&mqtt_raw::unsubscribe_all(level, 3, &["a/+/c"]));
        assert_eq!(c.read_packet().unwrap().packet_type(), 11);
        c.send(&mqtt_raw::subscribe_all(level, 4, &["d", "e"]));
        assert_eq!(c.read_packet().unwrap().suback_codes(level), [0, quota], "level {level}: freed");
        // The granted filters work.
        c.send(&mqtt_raw::publish(level, "d", b"delivered"));
        assert!(c.read_packet().unwrap().body.ends_with(b"delivered"));
    }
    assert_eq!(refusals(&server, "filter_levels"), 2.0);
    assert_eq!(refusals(&server, "filter_length"), 2.0);
    assert_eq!(refusals(&server, "subscriptions"), 4.0);
}

/// A session that outlives its connection keeps its filters in the router,
/// so it keeps its count too: reconnecting does not make room for more.
/// A clean session starts from none.
#[test]
fn a_resumed_session_keeps_its_subscription_count() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_MAX_SUBSCRIPTIONS", "2")]);
    for (level, expiry, quota) in [(4u8, None, 0x80u8), (5, Some(300), 0x97)] {
        let id = format!("kept-{level}");
        let resume = |clean: bool| {
            let mut c = RawMqtt::connect(server.mqtt_addr());
            c.send(&mqtt_raw::connect_session(level, &id, clean, expiry));
            let ack = c.read_packet().unwrap();
            assert_eq!(ack.connack_code(), 0);
            (c, ack.session_present())
        };
        let (mut c, present) = resume(false);
        assert!(!present, "level {level}: a new session");
        c.send(&mqtt_raw::subscribe_all(level, 1, &["a", "b"]));
        assert_eq!(c.read_packet().unwrap().suback_codes(level), [0, 0]);
        c.send(&mqtt_raw::DISCONNECT);
        assert!(c.closed_within(Duration::from_secs(5)));
        let (mut c, present) = resume(false);
        assert!(present, "level {level}: resumed");
        c.send(&mqtt_raw::subscribe_all(level, 2, &["c", "a"]));
        assert_eq!(c.read_packet().unwrap().suback_codes(level), [quota, 0], "level {level}: still two");
        c.send(&mqtt_raw::DISCONNECT);
        assert!(c.closed_within(Duration::from_secs(5)));
        let (mut c, present) = resume(true);
        assert!(!present);
        c.send(&mqtt_raw::subscribe_all(level, 3, &["c", "d"]));
        assert_eq!(c.read_packet().unwrap().suback_codes(level), [0, 0], "level {level}: a clean start");
    }
}

/// A publish to a topic over the length or level cap closes its sender
/// (5: DISCONNECT 0x90); a will with such a topic is refused with the
/// CONNECT (5: CONNACK 0x90; 3.1.1: closed without a CONNACK, as for any
/// will topic it cannot take).
#[test]
fn topics_over_the_caps_close_the_sender() {
    let server = TestServer::start_with_env(
        &[],
        &[("ECHO_MQTT_MAX_TOPIC_LENGTH", "16"), ("ECHO_MQTT_MAX_TOPIC_LEVELS", "3")],
    );
    let mut watcher = RawMqtt::session(server.mqtt_addr(), 5, "watcher", 30);
    watcher.send(&mqtt_raw::subscribe(5, 1, "#"));
    watcher.read_packet().unwrap();
    for (case, topic) in [("too long", "seventeen-bytes/a"), ("too deep", "a/b/c/d")] {
        for level in [4u8, 5] {
            let mut c = RawMqtt::session(server.mqtt_addr(), level, "publisher", 30);
            c.send(&mqtt_raw::publish(level, "sixteen-bytes/ab", b"at the cap"));
            c.send(&mqtt_raw::publish(level, topic, b"over"));
            if level == 5 {
                assert_eq!(c.read_packet().unwrap().disconnect_reason(), 0x90, "{case}");
            }
            assert!(c.closed_within(Duration::from_secs(5)), "{case}, level {level}");
            let mut will = RawMqtt::connect(server.mqtt_addr());
            will.send(&mqtt_raw::connect_with_will(level, "willing", topic.as_bytes(), b"bye", 0));
            if level == 5 {
                assert_eq!(will.read_packet().unwrap().connack_code(), 0x90, "{case}: will");
            } else {
                assert_eq!(will.read_packet(), None, "{case}: will, no CONNACK");
            }
            assert!(will.closed_within(Duration::from_secs(5)));
        }
    }
    for _ in 0..4 {
        assert!(watcher.read_packet().unwrap().body.ends_with(b"at the cap"));
    }
    watcher.send(&mqtt_raw::PINGREQ);
    assert_eq!(watcher.read_packet().unwrap().packet_type(), 13, "nothing over the cap was delivered");
    assert_eq!(refusals(&server, "topic_length"), 4.0);
    assert_eq!(refusals(&server, "topic_levels"), 4.0);
}

/// Topic aliases 1 to `topic_alias_maximum` work; one above it is
/// DISCONNECT 0x94, before the router sees it (it would take up to 4,096,
/// each with a copy of its topic). With a maximum of 0, any alias is.
#[test]
fn topic_aliases_over_the_maximum_close_the_client() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_TOPIC_ALIAS_MAXIMUM", "2")]);
    let mut sub = RawMqtt::session(server.mqtt_addr(), 5, "alias-sub", 30);
    sub.send(&mqtt_raw::subscribe(5, 1, "aliased/#"));
    sub.read_packet().unwrap();
    let mut c = RawMqtt::session(server.mqtt_addr(), 5, "alias-pub", 30);
    c.send(&mqtt_raw::publish_raw(5, b"aliased/1", 0, b"\x23\x00\x01", b"one"));
    c.send(&mqtt_raw::publish_raw(5, b"aliased/2", 0, b"\x23\x00\x02", b"two"));
    c.send(&mqtt_raw::publish_raw(5, b"", 0, b"\x23\x00\x01", b"one again"));
    for (topic, payload) in
        [(&b"aliased/1"[..], &b"one"[..]), (b"aliased/2", b"two"), (b"aliased/1", b"one again")]
    {
        let got = sub.read_packet().unwrap();
        assert_eq!(&got.body[2..2 + topic.len()], topic);
        assert!(got.body.ends_with(payload));
    }
    c.send(&mqtt_raw::publish_raw(5, b"aliased/3", 0, b"\x23\x00\x03", b"three"));
    assert_eq!(c.read_packet().unwrap().disconnect_reason(), 0x94);
    assert!(c.closed_within(Duration::from_secs(5)));
    assert_eq!(refusals(&server, "topic_alias"), 1.0);
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"topic_alias\"}"), 1.0);

    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_TOPIC_ALIAS_MAXIMUM", "0")]);
    let mut c = RawMqtt::session(server.mqtt_addr(), 5, "no-aliases", 30);
    c.send(&mqtt_raw::publish_raw(5, b"a", 0, b"\x23\x00\x01", b"x"));
    assert_eq!(c.read_packet().unwrap().disconnect_reason(), 0x94);
    assert!(c.closed_within(Duration::from_secs(5)));
}

/// Receive Maximum publishes may be unacknowledged at once; one more is
/// DISCONNECT 0x93 (3.1.1: closed). MQTT 5 counts QoS 1 and 2; 3.1.1
/// (which has no such window for clients to know) only QoS 2 publishes
/// not yet released. A client that releases its publishes never meets
/// the cap.
#[test]
fn publishes_past_the_receive_maximum_close_the_client() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_RECEIVE_MAXIMUM", "4")]);
    for level in [4u8, 5] {
        // Released as they go: any number.
        let mut polite = RawMqtt::session(server.mqtt_addr(), level, &format!("polite-{level}"), 30);
        for round in 0..3u16 {
            for i in 1..=4 {
                polite.send(&mqtt_raw::publish_qos(level, "rm/polite", 2, round * 4 + i, b"x"));
            }
            for i in 1..=4 {
                let rec = polite.read_packet().unwrap();
                assert_eq!((rec.packet_type(), rec.pkid()), (5, round * 4 + i), "PUBREC");
            }
            for i in 1..=4 {
                polite.send(&mqtt_raw::ack(0x62, round * 4 + i));
            }
            for i in 1..=4 {
                let comp = polite.read_packet().unwrap();
                assert_eq!((comp.packet_type(), comp.pkid()), (7, round * 4 + i), "PUBCOMP");
            }
        }
        // Never released: the fifth is one too many.
        let mut holder = RawMqtt::session(server.mqtt_addr(), level, &format!("holder-{level}"), 30);
        for pkid in 1..=4 {
            holder.send(&mqtt_raw::publish_qos(level, "rm/held", 2, pkid, b"x"));
            assert_eq!(holder.read_packet().unwrap().packet_type(), 5);
        }
        holder.send(&mqtt_raw::publish_qos(level, "rm/held", 2, 5, b"x"));
        if level == 5 {
            assert_eq!(holder.read_packet().unwrap().disconnect_reason(), 0x93);
        }
        assert!(holder.closed_within(Duration::from_secs(5)), "level {level}");
    }
    // MQTT 5: QoS 1 counts until its PUBACK is out. Twenty sent in one
    // write are read together, before the router can acknowledge any.
    let mut burst = RawMqtt::session(server.mqtt_addr(), 5, "burst-5", 30);
    let twenty: Vec<u8> =
        (1..=20).flat_map(|pkid| mqtt_raw::publish_qos(5, "rm/q1", 1, pkid, b"x")).collect();
    burst.send(&twenty);
    let mut last = burst.read_packet().unwrap();
    while last.packet_type() == 4 {
        last = burst.read_packet().unwrap();
    }
    assert_eq!(last.disconnect_reason(), 0x93);
    // 3.1.1: QoS 1 does not count; a burst of 100 is all acknowledged.
    let mut burst = RawMqtt::session(server.mqtt_addr(), 4, "burst-4", 30);
    let hundred: Vec<u8> =
        (1..=100).flat_map(|pkid| mqtt_raw::publish_qos(4, "rm/q1", 1, pkid, b"x")).collect();
    burst.send(&hundred);
    for pkid in 1..=100 {
        let ack = burst.read_packet().unwrap();
        assert_eq!((ack.packet_type(), ack.pkid()), (4, pkid));
    }
    assert_eq!(refusals(&server, "receive_maximum"), 3.0);
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"receive_maximum\"}"), 3.0);
}

/// The measured attack: QoS 2 publishes of 500 KB never released (the
/// router keeps each until its PUBREL) grew the server by 991 MB over
/// 2,000 of them on one connection. Now the 33rd unreleased publish
/// (Receive Maximum + 1) ends the connection, and what the router kept
/// goes with its session: the server grows by about Receive Maximum × 500
/// KB while the client is connected, and over four such connections no
/// more.
#[test]
fn never_released_qos2_publishes_are_cut_off_at_the_receive_maximum() {
    let server = TestServer::start(&[]);
    let before = server.rss_bytes();
    let payload = vec![b'p'; 500 * 1024];
    let mut peak = 0;
    for connection in 0..4 {
        let mut c = RawMqtt::session(server.mqtt_addr(), 5, "hoarder", 30);
        let mut refused_at = None;
        for pkid in 1..=2000u16 {
            c.send(&mqtt_raw::publish_qos(5, "hoard", 2, pkid, &payload));
            let answer = c.read_packet().expect("an answer");
            if pkid == 32 {
                // As much as the server holds for this client.
                peak = peak.max(server.rss_bytes());
            }
            if answer.packet_type() != 5 {
                assert_eq!(answer.disconnect_reason(), 0x93, "connection {connection}");
                refused_at = Some(pkid);
                break;
            }
        }
        assert_eq!(refused_at, Some(33), "connection {connection}");
        assert!(c.closed_within(Duration::from_secs(5)));
    }
    assert_eq!(refusals(&server, "receive_maximum"), 4.0);
    let grown = peak.saturating_sub(before);
    let after = server.rss_bytes().saturating_sub(before);
    println!("server RSS grew {} MiB at most, {} MiB after", grown >> 20, after >> 20);
    assert!(grown < 64 << 20, "the server grew by {} MiB", grown >> 20);
}

/// Publishes to topics nobody subscribes to are dropped, and leave nothing
/// behind: rumqttd kept a copy of every distinct topic a connection
/// published to, for a per-topic count nothing read, until the connection
/// ended (10^6 QoS 0 publishes to distinct 1 KB topics: +1.1 GiB; see
/// vendor/rumqttd/PATCHED.md). 50,000 such topics (50 MB of topic names)
/// must not grow the server by more than a few MiB.
#[test]
fn publishes_to_distinct_topics_nobody_reads_leave_nothing_behind() {
    let server = TestServer::start(&[]);
    let mut c = RawMqtt::session(server.mqtt_addr(), 5, "sprayer", 0);
    c.send(&mqtt_raw::subscribe(5, 1, "sprayer/done"));
    c.read_packet().unwrap();
    let before = server.rss_bytes();
    let filler = "t".repeat(1016);
    for round in 0..50 {
        let burst: Vec<u8> = (0..1000)
            .flat_map(|i| mqtt_raw::publish(5, &format!("{:07}/{filler}", round * 1000 + i), b"x"))
            .collect();
        c.send(&burst);
        c.send(&mqtt_raw::PINGREQ);
        assert_eq!(c.read_packet().unwrap().packet_type(), 13);
    }
    // The router takes a client's publishes in order: once this one is
    // delivered, it has taken every one before.
    c.send(&mqtt_raw::publish(5, "sprayer/done", b"done"));
    assert!(c.read_packet().unwrap().body.ends_with(b"done"));
    let grown = server.rss_bytes().saturating_sub(before);
    println!("50,000 distinct 1 KB topics: server RSS grew {} MiB", grown >> 20);
    assert!(grown < 16 << 20, "the server grew by {} MiB", grown >> 20);
}
