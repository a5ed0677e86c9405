//! Hostile and broken MQTT clients: each one affects itself only. After
//! every case, an MQTT 3.1.1 client, an MQTT 5 client and a WebSocket
//! client (the bystanders) still round-trip, and the server is alive.
//! Also: graceful shutdown of MQTT sessions.

mod common;

use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt, RawPacket, packet};
use common::raw::RawClient;

/// Clients that must keep working whatever the others do.
struct Bystanders {
    v4: RawMqtt,
    v5: RawMqtt,
    ws: RawClient,
    round: u32,
}

impl Bystanders {
    fn new(server: &TestServer) -> Bystanders {
        let mut v4 = RawMqtt::session(server.mqtt_addr(), 4, "bystander-4", 0);
        v4.send(&mqtt_raw::subscribe(4, 1, "bystander/4"));
        assert_eq!(v4.read_packet().unwrap().packet_type(), 9);
        let mut v5 = RawMqtt::session(server.mqtt_addr(), 5, "bystander-5", 0);
        v5.send(&mqtt_raw::subscribe(5, 1, "bystander/5"));
        assert_eq!(v5.read_packet().unwrap().packet_type(), 9);
        Bystanders { v4, v5, ws: RawClient::connect(server.ws_addr()), round: 0 }
    }

    fn still_fine(&mut self, case: &str) {
        self.round += 1;
        let payload = format!("{case} {}", self.round);
        for (raw, level) in [(&mut self.v4, 4u8), (&mut self.v5, 5)] {
            raw.send(&mqtt_raw::publish(level, &format!("bystander/{level}"), payload.as_bytes()));
            let echo = raw.read_packet().unwrap_or_else(|| panic!("{case}: bystander {level} lost"));
            assert_eq!(echo.packet_type(), 3, "{case}");
            assert!(echo.body.ends_with(payload.as_bytes()), "{case}: {echo:?}");
        }
        self.ws.send_frame(true, 1, payload.as_bytes());
        assert_eq!(self.ws.read_frame().unwrap().payload, payload.as_bytes(), "{case}: WebSocket bystander");
    }
}

#[test]
fn garbage_http_and_non_connect_first_packets_close_only_that_client() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", (0..=255u8).rev().cycle().take(4096).collect()),
        ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("tls hello", vec![0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00]),
        ("publish first", mqtt_raw::publish(4, "a", b"b")),
        ("pingreq first", mqtt_raw::PINGREQ.to_vec()),
        ("connect with a bad name", packet(0x10, b"\x00\x04MQTX\x04\x02\x00\x1e\x00\x01c")),
        ("connect cut short", packet(0x10, b"\x00\x04MQTT\x04\x02\x00")),
        ("remaining length of five bytes", vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]),
    ];
    for (case, bytes) in cases {
        let mut raw = RawMqtt::connect(server.mqtt_addr());
        raw.try_send(&bytes);
        assert!(raw.closed_within(Duration::from_secs(5)), "{case}: closed");
        bystanders.still_fine(case);
    }
    // MQTT 3.1 (level 3): refused with 3.1.1's "unacceptable protocol version".
    let mut old = RawMqtt::connect(server.mqtt_addr());
    old.send(&packet(0x10, b"\x00\x06MQIsdp\x03\x02\x00\x1e\x00\x01c"));
    assert_eq!(old.read_packet().unwrap().connack_code(), 1);
    bystanders.still_fine("mqtt 3.1");
}

#[test]
fn a_connect_that_never_comes_times_out() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_CONNECT_TIMEOUT", "1s")]);
    let mut bystanders = Bystanders::new(&server);
    let started = std::time::Instant::now();
    let mut silent = RawMqtt::connect(server.mqtt_addr());
    let mut half = RawMqtt::connect(server.mqtt_addr());
    half.send(&mqtt_raw::connect(4, "half", 30)[..6]);
    assert!(silent.closed_within(Duration::from_secs(5)));
    assert!(half.closed_within(Duration::from_secs(5)));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
    bystanders.still_fine("connect timeout");
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"connect_timeout\"}"), 2.0);
}

#[test]
fn oversized_and_malformed_packets_close_only_the_sender() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_MAX_PAYLOAD_SIZE", "1024")]);
    let mut bystanders = Bystanders::new(&server);
    // Over max_payload_size: refused from the fixed header, before the body.
    for level in [4u8, 5] {
        let mut big = RawMqtt::session(server.mqtt_addr(), level, &format!("big-{level}"), 30);
        big.send(&[0x30, 0x80, 0x80, 0x04]); // PUBLISH, remaining length 65,536
        if level == 5 {
            assert_eq!(big.read_packet().unwrap().disconnect_reason(), 0x95, "packet too large");
        }
        assert!(big.closed_within(Duration::from_secs(5)));
        bystanders.still_fine("too large");
    }
    // Exactly at the limit is fine.
    let mut at_limit = RawMqtt::session(server.mqtt_addr(), 4, "at-limit", 30);
    at_limit.send(&mqtt_raw::subscribe(4, 1, "limit"));
    at_limit.read_packet().unwrap();
    let payload = vec![b'x'; 1024 - 2 - 5];
    at_limit.send(&mqtt_raw::publish(4, "limit", &payload));
    assert!(at_limit.read_packet().unwrap().body.ends_with(&payload));
    // A CONNECT over the limit: MQTT 5 says why.
    let mut big_connect = RawMqtt::connect(server.mqtt_addr());
    big_connect.send(&mqtt_raw::connect(5, &"c".repeat(2000), 30));
    assert_eq!(big_connect.read_packet().unwrap().connack_code(), 0x95);
    let malformed: Vec<(&str, u8, Vec<u8>)> = vec![
        ("publish at qos 3", 4, packet(0x36, b"\x00\x01a\x00\x01hi")),
        ("subscribe with reserved flags", 4, packet(0x80, b"\x00\x01\x00\x01a\x00")),
        ("subscribe without filters", 5, packet(0x82, b"\x00\x01\x00")),
        ("string longer than its packet", 4, packet(0x30, b"\x00\xffab")),
        ("invalid utf-8 topic", 4, packet(0x30, b"\x00\x02\xc3\x28hi")),
        ("second connect", 4, mqtt_raw::connect(4, "again", 30)),
        ("connack from a client", 4, packet(0x20, b"\x00\x00")),
        ("wildcard in a publish topic", 5, mqtt_raw::publish(5, "a/+", b"x")),
        ("reserved packet type 0", 4, vec![0x00, 0x00]),
        ("auth packet on 3.1.1", 4, vec![0xf0, 0x00]),
        ("subscription identifier in a publish", 5, packet(0x30, b"\x00\x01a\x02\x0b\x07hi")),
        ("puback for nothing", 4, packet(0x40, b"\x00\x07")),
    ];
    for (case, level, bytes) in malformed {
        let mut bad = RawMqtt::session(server.mqtt_addr(), level, "malformed", 30);
        bad.send(&bytes);
        assert!(bad.closed_within(Duration::from_secs(5)), "{case}: closed");
        bystanders.still_fine(case);
    }
    assert!(server.metric("echo_mqtt_closed_total{reason=\"malformed\"}") >= 4.0);
}

/// Log lines that say the router was handed something it refused, or
/// that the server thinks the router is gone. The router says the former at
/// `debug` (a client can cause it per packet), so servers whose complaints
/// are read log rumqttd at `debug`: [`ROUTER_DEBUG`].
fn router_complaints(server: &TestServer) -> Vec<String> {
    server
        .logs()
        .iter()
        .filter(|v| {
            let message = v["message"].as_str().unwrap_or("");
            message.contains("Failed to append") || message.contains("MQTT router has stopped")
        })
        .map(|v| v.to_string())
        .collect()
}

/// The audit's blocker: a client whose will topic was not UTF-8 (`c3 28`)
/// got CONNACK 0 and dropped its socket; the router refused the will
/// (`NonUtf8Topic`), dropped the server's own wills link for it, and the
/// server took that for the router's death and shut down. Now such a will
/// is refused with the CONNECT (MQTT 5: 0x81 malformed, 0x90 for a topic
/// that is well formed but not a topic name; 3.1.1: closed without a
/// CONNACK), at every QoS, and nothing reaches the router.
/// Logging for tests that read [`router_complaints`].
const ROUTER_DEBUG: [&str; 2] = ["--log-level", "info,rumqttd=debug"];

#[test]
fn a_will_topic_the_router_cannot_take_is_refused_with_the_connect() {
    let server = TestServer::start(&ROUTER_DEBUG);
    let mut bystanders = Bystanders::new(&server);
    let cases: [(&str, &[u8], u8); 7] = [
        ("the audit's c3 28", b"\xc3\x28", 0x81),
        ("a lone continuation byte", b"status/\x80", 0x81),
        ("an encoded surrogate", b"\xed\xa0\x80", 0x81),
        ("a NUL", b"status\0x", 0x81),
        ("a wildcard", b"status/+", 0x90),
        ("a multi-level wildcard", b"#", 0x90),
        ("an empty topic", b"", 0x90),
    ];
    for (case, topic, v5_code) in cases {
        for level in [4u8, 5] {
            for qos in 0..=2u8 {
                let case = format!("will topic with {case}, level {level}, QoS {qos}");
                let mut evil = RawMqtt::connect(server.mqtt_addr());
                evil.send(&mqtt_raw::connect_with_will(level, "evil", topic, b"bye", qos));
                if level == 5 {
                    let ack = evil.read_packet().unwrap_or_else(|| panic!("{case}: a CONNACK"));
                    assert_eq!(ack.connack_code(), v5_code, "{case}");
                    assert!(evil.closed_within(Duration::from_secs(5)), "{case}: closed");
                } else {
                    assert_eq!(evil.read_packet(), None, "{case}: closed without a CONNACK");
                }
                // Dropped without DISCONNECT, as in the audit.
                drop(evil);
            }
        }
        bystanders.still_fine(case);
    }
    // The wills link still works: a good will is delivered.
    let mut watcher = RawMqtt::session(server.mqtt_addr(), 4, "will-watcher", 30);
    watcher.send(&mqtt_raw::subscribe(4, 1, "status/#"));
    assert_eq!(watcher.read_packet().unwrap().packet_type(), 9);
    let mut good = RawMqtt::connect(server.mqtt_addr());
    good.send(&mqtt_raw::connect_with_will(5, "good", b"status/good", b"gone", 1));
    assert_eq!(good.read_packet().unwrap().connack_code(), 0);
    drop(good);
    let will = watcher.read_packet().expect("the good will");
    assert_eq!(will.packet_type(), 3);
    assert!(will.body.ends_with(b"gone"), "{will:?}");
    bystanders.still_fine("a good will after the bad ones");
    assert_eq!(server.metric("echo_mqtt_wills_published_total"), 1.0);
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"malformed\"}"), 4.0 * 6.0);
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"invalid_topic\"}"), 3.0 * 6.0);
    assert_eq!(router_complaints(&server), Vec::<String>::new());
}

/// A PUBLISH topic the router would refuse closes only its sender, with the
/// reason MQTT 5 gives it, and never reaches the router (which dropped the
/// sender without a reason, and the session reported it as taken over).
#[test]
fn a_publish_topic_the_router_cannot_take_closes_the_sender_with_a_reason() {
    let server = TestServer::start(&ROUTER_DEBUG);
    let mut bystanders = Bystanders::new(&server);
    let cases: [(&str, &[u8], u8); 6] = [
        ("invalid utf-8", b"\xc3\x28", 0x81),
        ("a truncated sequence", b"a/\xe2\x82", 0x81),
        ("an overlong slash", b"a\xc0\xafb", 0x81),
        ("a NUL", b"a\0b", 0x81),
        ("a wildcard", b"a/#", 0x90),
        ("an empty topic and no alias", b"", 0x82),
    ];
    for (case, topic, v5_code) in cases {
        for level in [4u8, 5] {
            for qos in 0..=2u8 {
                let case = format!("publish topic with {case}, level {level}, QoS {qos}");
                let mut bad = RawMqtt::session(server.mqtt_addr(), level, "bad-publisher", 30);
                bad.send(&mqtt_raw::publish_raw(level, topic, qos, &[], b"x"));
                if level == 5 {
                    let bye = bad.read_packet().unwrap_or_else(|| panic!("{case}: a DISCONNECT"));
                    assert_eq!(bye.disconnect_reason(), v5_code, "{case}");
                } else {
                    assert_eq!(bad.read_packet(), None, "{case}: closed, nothing acknowledged");
                }
                assert!(bad.closed_within(Duration::from_secs(5)), "{case}: closed");
            }
        }
        bystanders.still_fine(case);
    }
    assert_eq!(router_complaints(&server), Vec::<String>::new(), "nothing reached the router");
    // Bad topic aliases end the sender's session alone, with a reason: 0
    // and one over `mqtt.topic_alias_maximum` refused by the session (see
    // tests/mqtt_caps.rs), an unknown one by the router.
    let alias_cases: [(&str, &[u8], &[u8], u8); 3] = [
        ("alias 0", b"a", b"\x23\x00\x00", 0x94),
        ("alias over the maximum", b"a", b"\x23\x10\x01", 0x94),
        ("an empty topic with an unknown alias", b"", b"\x23\x00\x07", 0x82),
    ];
    for (case, topic, properties, code) in alias_cases {
        let mut bad = RawMqtt::session(server.mqtt_addr(), 5, "bad-alias", 30);
        bad.send(&mqtt_raw::publish_raw(5, topic, 0, properties, b"x"));
        assert_eq!(bad.read_packet().unwrap().disconnect_reason(), code, "{case}");
        assert!(bad.closed_within(Duration::from_secs(5)), "{case}: closed");
        bystanders.still_fine(case);
    }
    // The router's refusal of the unknown alias is seen (so the check above
    // that none came earlier means something); its log line may come in
    // after the client saw its DISCONNECT.
    server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"].as_str().is_some_and(|m| m.contains("Failed to append"))
    });
    let complaints = router_complaints(&server);
    assert!(complaints.iter().all(|line| !line.contains("MQTT router has stopped")));
    assert_eq!(
        complaints.iter().filter(|line| line.contains("Failed to append")).count(),
        1,
        "{complaints:?}"
    );
}

/// Packets only servers send (CONNACK, SUBACK, UNSUBACK, PINGRESP), with
/// and without a body, at both levels: a protocol error (MQTT 5: DISCONNECT
/// 0x82; 3.1.1: closed). rumqttd's V5 decoder used to reach
/// `unreachable!()` on CONNACK and UNSUBACK with a body: the session's task
/// died in a panic, without a DISCONNECT, and
/// `echo_mqtt_connections{version="5"}` never came back down. Also the
/// other packet types a client cannot send, and packets whose properties
/// run past their end (which were dropped as if never sent).
#[test]
fn packets_clients_must_not_send_end_only_that_session_and_panic_nothing() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let protocol_errors: Vec<(&str, Vec<u8>)> = vec![
        ("connack", vec![0x20, 0x02, 0x00, 0x00]),
        ("empty connack", vec![0x20, 0x00]),
        ("connack with properties", vec![0x20, 0x03, 0x00, 0x00, 0x00]),
        ("suback", vec![0x90, 0x03, 0x00, 0x01, 0x00]),
        ("empty suback", vec![0x90, 0x00]),
        ("unsuback", vec![0xb0, 0x02, 0x00, 0x01]),
        ("empty unsuback", vec![0xb0, 0x00]),
        ("unsuback with a reason", vec![0xb0, 0x04, 0x00, 0x01, 0x00, 0x00]),
        ("pingresp", vec![0xd0, 0x00]),
        ("pingresp with a body", vec![0xd0, 0x02, 0x00, 0x00]),
    ];
    let mut expected_protocol_errors = 0.0;
    for (case, bytes) in &protocol_errors {
        for level in [4u8, 5] {
            let case = format!("{case} from a client, level {level}");
            let mut bad = RawMqtt::session(server.mqtt_addr(), level, "server-impostor", 30);
            bad.send(bytes);
            if level == 5 {
                let bye = bad.read_packet().unwrap_or_else(|| panic!("{case}: a DISCONNECT"));
                assert_eq!(bye.disconnect_reason(), 0x82, "{case}: protocol error");
            } else {
                assert_eq!(bad.read_packet(), None, "{case}: closed");
            }
            assert!(bad.closed_within(Duration::from_secs(5)), "{case}");
            expected_protocol_errors += 1.0;
        }
        bystanders.still_fine(case);
    }
    // Type 15 is AUTH in MQTT 5 (a protocol error without an authentication
    // method), reserved in 3.1.1; type 0 is reserved in both; and MQTT 5
    // packets whose property length is cut short or missing are malformed.
    let others: Vec<(&str, u8, Vec<u8>, Option<u8>)> = vec![
        ("auth", 5, vec![0xf0, 0x00], Some(0x82)),
        ("auth with a reason", 5, vec![0xf0, 0x02, 0x18, 0x00], Some(0x82)),
        ("type 15", 4, vec![0xf0, 0x02, 0x00, 0x00], None),
        ("type 0", 5, vec![0x00, 0x02, 0x00, 0x00], Some(0x81)),
        ("type 0", 4, vec![0x00, 0x00], None),
        ("publish without its property length", 5, vec![0x30, 0x03, 0x00, 0x01, b'a'], Some(0x81)),
        ("puback with a cut property length", 5, vec![0x40, 0x05, 0x00, 0x01, 0x00, 0xa2, 0xb8], Some(0x81)),
        ("unsubscribe without properties", 5, vec![0xa2, 0x02, 0x00, 0x01], Some(0x81)),
        ("unsubscribe without filters", 5, vec![0xa2, 0x03, 0x00, 0x01, 0x00], Some(0x82)),
    ];
    for (case, level, bytes, reason) in others {
        let mut bad = RawMqtt::session(server.mqtt_addr(), level, "odd-packets", 30);
        bad.send(&bytes);
        match reason {
            Some(reason) => assert_eq!(bad.read_packet().unwrap().disconnect_reason(), reason, "{case}"),
            None => assert_eq!(bad.read_packet(), None, "{case}: closed"),
        }
        assert!(bad.closed_within(Duration::from_secs(5)), "{case}");
        if reason == Some(0x82) {
            expected_protocol_errors += 1.0;
        }
        bystanders.still_fine(case);
    }
    let panics: Vec<_> = server.logs().into_iter().filter(|v| v["message"] == "panic").collect();
    assert!(panics.is_empty(), "{panics:?}");
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"protocol_error\"}"), expected_protocol_errors);
    assert_eq!(server.metric("echo_mqtt_connections{version=\"5\"}"), 1.0, "the bystander only");
    assert_eq!(server.metric("echo_mqtt_connections{version=\"3.1.1\"}"), 1.0, "the bystander only");
    drop(bystanders);
    server.wait_for_metric("echo_mqtt_connections{version=\"5\"}", Duration::from_secs(5), |v| v == 0.0);
    server.wait_for_metric("echo_mqtt_connections{version=\"3.1.1\"}", Duration::from_secs(5), |v| v == 0.0);
}

/// MQTT 5 §3.14.2.2.1: a DISCONNECT of remaining length 1 is a reason code
/// and no properties. rumqttd's decoder swallowed it, so a client leaving
/// normally that way had its will published when it closed.
#[test]
fn a_v5_disconnect_without_properties_is_a_disconnect() {
    let server = TestServer::start(&[]);
    let mut watcher = RawMqtt::session(server.mqtt_addr(), 4, "will-watcher", 30);
    watcher.send(&mqtt_raw::subscribe(4, 1, "wills/#"));
    assert_eq!(watcher.read_packet().unwrap().packet_type(), 9);
    for (reason, will_expected) in [(0x00u8, false), (0x04, true)] {
        let mut c = RawMqtt::connect(server.mqtt_addr());
        let topic = format!("wills/{reason}");
        c.send(&mqtt_raw::connect_with_will(5, "short-bye", topic.as_bytes(), b"gone", 0));
        assert_eq!(c.read_packet().unwrap().connack_code(), 0);
        c.send(&[0xe0, 0x01, reason]);
        assert!(c.closed_within(Duration::from_secs(5)), "the server ends the session");
        if will_expected {
            let will = watcher.read_packet().expect("the will, asked for by reason 0x04");
            assert!(will.body.starts_with(b"\x00\x07wills/4") && will.body.ends_with(b"gone"), "{will:?}");
        }
    }
    // Only the one will: reason 0x00 discarded the first.
    assert_eq!(server.metric("echo_mqtt_wills_published_total"), 1.0);
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"client_disconnect\"}"), 2.0);
}

/// Acknowledging what was never sent is a protocol error (MQTT 5:
/// DISCONNECT 0x82; 3.1.1: closed), not a session take-over: the router
/// drops such a client, and used to do it without a reason, which the
/// session told an MQTT 5 client as 0x8E "session taken over". A PUBREL
/// for no publish is not one of them: MQTT answers every PUBREL with a
/// PUBCOMP (§4.3.3; MQTT 5: 0x92, packet identifier not found), since a
/// client resends its PUBRELs on a resumed session whose PUBCOMPs it
/// missed; the router used to drop it too.
#[test]
fn acknowledgements_for_nothing_are_a_protocol_error_not_a_take_over() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    for level in [4u8, 5] {
        let mut c = RawMqtt::session(server.mqtt_addr(), level, "releaser", 30);
        c.send(&packet(0x62, b"\x00\x07"));
        let pubcomp = c.read_packet().expect("a PUBCOMP");
        let reason = if level == 5 { Some(&0x92) } else { None };
        assert_eq!((pubcomp.packet_type(), pubcomp.pkid(), pubcomp.body.get(2)), (7, 7, reason));
        c.send(&mqtt_raw::PINGREQ);
        assert_eq!(c.read_packet().unwrap().packet_type(), 13, "level {level}: still connected");
    }
    let cases = [
        ("puback", packet(0x40, b"\x00\x07")),
        ("pubrec", packet(0x50, b"\x00\x07")),
        ("pubcomp", packet(0x70, b"\x00\x07")),
    ];
    for (case, bytes) in &cases {
        for level in [4u8, 5] {
            let mut bad = RawMqtt::session(server.mqtt_addr(), level, "acker", 30);
            bad.send(bytes);
            if level == 5 {
                let bye = bad.read_packet().unwrap_or_else(|| panic!("{case}: a DISCONNECT"));
                assert_eq!(bye.disconnect_reason(), 0x82, "{case} for nothing, level 5");
            } else {
                assert_eq!(bad.read_packet(), None, "{case} for nothing, level 4: closed");
            }
            assert!(bad.closed_within(Duration::from_secs(5)), "{case}");
        }
        bystanders.still_fine(case);
    }
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"taken_over\"}"), 0.0);
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"router_disconnect\"}"), 6.0);
}

/// MQTT 5 enhanced authentication is not offered (AUTH is refused), so a
/// CONNECT asking for it is refused with 0x8C "bad authentication method"
/// and closed (§4.12), and authentication data without a method is a
/// protocol error (0x82); it used to get CONNACK 0.
#[test]
fn a_connect_asking_for_enhanced_authentication_is_refused() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    for (case, properties, code) in [
        ("an authentication method", &b"\x15\x00\x0bSCRAM-SHA-1"[..], 0x8c),
        ("a method and data", b"\x15\x00\x0bSCRAM-SHA-1\x16\x00\x02\x01\x02", 0x8c),
        ("data without a method", b"\x16\x00\x02\x01\x02", 0x82),
    ] {
        let mut c = RawMqtt::connect(server.mqtt_addr());
        c.send(&mqtt_raw::connect_with_properties("auth", properties));
        assert_eq!(c.read_packet().expect("a CONNACK").connack_code(), code, "{case}");
        assert!(c.closed_within(Duration::from_secs(5)), "{case}: closed");
        bystanders.still_fine(case);
    }
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"bad_auth_method\"}"), 2.0);
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"protocol_error\"}"), 1.0);
}

#[test]
fn a_duplicate_client_id_takes_the_session_over() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let mut first5 = RawMqtt::session(server.mqtt_addr(), 5, "twin5", 30);
    let mut first4 = RawMqtt::session(server.mqtt_addr(), 4, "twin4", 30);
    let mut second5 = RawMqtt::session(server.mqtt_addr(), 5, "twin5", 30);
    let mut second4 = RawMqtt::session(server.mqtt_addr(), 4, "twin4", 30);
    assert_eq!(first5.read_packet().unwrap().disconnect_reason(), 0x8e, "session taken over");
    assert!(first5.closed_within(Duration::from_secs(5)));
    assert!(first4.closed_within(Duration::from_secs(5)));
    for (raw, level) in [(&mut second5, 5u8), (&mut second4, 4)] {
        raw.send(&mqtt_raw::subscribe(level, 1, "twin"));
        assert_eq!(raw.read_packet().unwrap().packet_type(), 9);
    }
    for (raw, level) in [(&mut second5, 5u8), (&mut second4, 4)] {
        raw.send(&mqtt_raw::publish(level, "twin", b"mine now"));
    }
    for raw in [&mut second5, &mut second4] {
        for _ in 0..2 {
            assert!(raw.read_packet().unwrap().body.ends_with(b"mine now"));
        }
    }
    bystanders.still_fine("takeover");
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"taken_over\"}"), 2.0);
}

/// Log lines at `warn` or `error`, and all lines after the first `skip`.
fn loud_lines(server: &TestServer, skip: usize) -> Vec<String> {
    server
        .logs()
        .iter()
        .skip(skip)
        .filter(|v| matches!(v["level"].as_str(), Some("WARN" | "ERROR")))
        .map(|v| v.to_string())
        .collect()
}

/// Four clients sharing one client id, each connecting again as soon as
/// it has been taken over: rumqttd logged an ERROR line for every
/// take-over (68,561 lines in 20 s from 4 such clients), and in debug
/// builds a WARN line for many. Now the episode is one warning, and the
/// metric counts every take-over.
#[test]
fn clients_taking_each_other_over_in_a_loop_do_not_flood_the_log() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let before = server.logs().len();
    const CLIENTS: usize = 4;
    const CONNECTS: usize = 400;
    let addr = server.mqtt_addr();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let connacks: usize = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    let mut connacks = 0;
                    while let i @ 0..CONNECTS = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                        let level = if i % 2 == 0 { 4 } else { 5 };
                        let mut raw = RawMqtt::connect(addr);
                        raw.send(&mqtt_raw::connect(level, "shared-id", 30));
                        // A CONNACK, unless the next one took it over first.
                        if raw.read_packet().is_some_and(|p| p.packet_type() == 2 && p.connack_code() == 0) {
                            connacks += 1;
                        }
                        // Until the next one takes it over (the last one
                        // waits this out).
                        raw.closed_within(Duration::from_secs(2));
                    }
                    connacks
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    bystanders.still_fine("take-overs");
    // Every session was taken over but the last one (and some before
    // their CONNACK).
    let taken_over = server.metric("echo_mqtt_closed_total{reason=\"taken_over\"}");
    assert!(connacks >= 100, "{connacks} sessions");
    assert!(taken_over >= (connacks - 1) as f64, "{connacks} sessions, {taken_over} take-overs");
    let episode = server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"].as_str().is_some_and(|m| m.starts_with("MQTT sessions are being taken over"))
    });
    assert!(episode["count"].as_u64().unwrap() >= 1, "{episode}");
    let loud = loud_lines(&server, before);
    assert_eq!(loud.len(), 1, "one line for {taken_over} take-overs, not one each:\n{}", loud.join("\n"));
}

/// A subscriber that stops reading while its topic gets far more than the
/// router keeps in memory per topic (mqtt.segment_size x segment_count, 128
/// KiB by default) skips the messages that left the log when it reads
/// again. rumqttd warned twice for every such read (~40,000 lines/s with
/// one slow subscriber); now an episode is one warning, and
/// `echo_mqtt_slow_subscriber_skips_total` counts the skips.
#[test]
fn a_slow_subscriber_skips_messages_without_flooding_the_log() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let before = server.logs().len();
    let mut slow = RawMqtt::session(server.mqtt_addr(), 4, "slow-sub", 0);
    slow.send(&mqtt_raw::subscribe(4, 1, "firehose"));
    assert_eq!(slow.read_packet().unwrap().packet_type(), 9);
    let mut publisher = RawMqtt::session(server.mqtt_addr(), 4, "firehose-pub", 0);
    let message = mqtt_raw::publish(4, "firehose", &[b'x'; 1000]);
    // Enough to fill the subscriber's socket buffers, so that the server
    // stops writing to it, and then the router's log for the topic many
    // times over; then the subscriber reads, three times.
    const PER_ROUND: usize = 5_000;
    for round in 0..3 {
        for _ in 0..PER_ROUND {
            publisher.send(&message);
        }
        publisher.send(&mqtt_raw::PINGREQ);
        assert_eq!(publisher.read_packet().unwrap().packet_type(), 13, "every publish read");
        let received = slow.drain(Duration::from_millis(500));
        assert!(received < PER_ROUND * message.len(), "round {round}: {received} bytes, nothing skipped");
        bystanders.still_fine("a slow subscriber");
    }
    let skips =
        server.wait_for_metric("echo_mqtt_slow_subscriber_skips_total", Duration::from_secs(5), |v| v >= 3.0);
    let episode = server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"].as_str().is_some_and(|m| m.starts_with("MQTT subscribers too slow"))
    });
    assert!(episode["count"].as_u64().unwrap() >= 1, "{episode}");
    let loud = loud_lines(&server, before);
    assert_eq!(loud.len(), 1, "one line for {skips} skips:\n{}", loud.join("\n"));
    // The subscriber is still served: a message after the flood arrives.
    publisher.send(&mqtt_raw::publish(4, "firehose", b"last"));
    let last = slow.read_packet().expect("the last message");
    assert!(last.body.ends_with(b"last"), "{last:?}");
}

/// A client that subscribes to hundreds of busy topics and never reads
/// made every one of those topics' logs keep all it had not read, up to
/// each log's own bound (~0.5 MB a topic by default: ~0.5 GB for one client
/// at `max_subscriptions`). Now what the logs keep for one session is
/// capped (`mqtt.max_queued_messages`, 1,000 by default): past it the
/// hoarder loses its oldest messages, counted, the logs let them go, a
/// reader of the same topics gets every message, and the hoarder, when it
/// reads at last, is still served.
#[test]
fn a_client_subscribed_widely_that_never_reads_is_held_to_its_queue_cap() {
    const TOPICS: usize = 500;
    const ROUNDS: usize = 20;
    const PER_TOPIC: usize = 10;
    const CAP: f64 = 1000.0;
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let before = server.logs().len();
    let topics: Vec<String> = (0..TOPICS).map(|t| format!("wide/{t}")).collect();
    let filters: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut hoarder = RawMqtt::session(server.mqtt_addr(), 4, "hoarder", 0);
    hoarder.send(&mqtt_raw::subscribe_all(4, 1, &filters));
    assert_eq!(hoarder.read_packet().unwrap().suback_codes(4), vec![0; TOPICS]);
    let mut reader = RawMqtt::session(server.mqtt_addr(), 4, "wide-reader", 0);
    reader.send(&mqtt_raw::subscribe(4, 1, "wide/0"));
    assert_eq!(reader.read_packet().unwrap().packet_type(), 9);
    let mut publisher = RawMqtt::session(server.mqtt_addr(), 4, "wide-publisher", 0);

    // ~21 MB in all: far more than the hoarder's socket buffers take, and
    // 200 messages per topic, which each topic's log would keep.
    for round in 0..ROUNDS {
        for n in 0..PER_TOPIC {
            for topic in &topics {
                let payload = format!("{round:04} {n:04} {:>190}", "");
                publisher.send(&mqtt_raw::publish(4, topic, payload.as_bytes()));
            }
        }
        publisher.send(&mqtt_raw::PINGREQ);
        assert_eq!(publisher.read_packet().unwrap().packet_type(), 13, "every publish read");
        for n in 0..PER_TOPIC {
            let delivery = reader.read_packet().expect("the reader's message").delivery(4);
            let expected = format!("{round:04} {n:04} ");
            assert!(delivery.payload.starts_with(expected.as_bytes()), "round {round}: {delivery:?}");
        }
        bystanders.still_fine("a client subscribed widely that never reads");
    }
    let dropped = server.wait_for_metric(
        "echo_mqtt_dropped_total{reason=\"max_queued\"}",
        Duration::from_secs(5),
        |v| v > 0.0,
    );
    // The cap, and what the logs may gain between two of the router's
    // sweeps (256), with room for the reader's last message or two.
    let held = server.wait_for_metric("echo_mqtt_log_messages", Duration::from_secs(5), |v| v <= CAP + 300.0);
    let episode = server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("MQTT sessions more than mqtt.max_queued_messages"))
    });
    assert!(episode["count"].as_u64().unwrap() >= 1, "{episode}");
    let loud = loud_lines(&server, before);
    assert_eq!(loud.len(), 1, "one line for {dropped} drops ({held} held):\n{}", loud.join("\n"));

    // The hoarder reads at last: what it was handed, its newest waiting
    // messages, and then what comes next.
    publisher.send(&mqtt_raw::publish(4, "wide/7", b"last"));
    let mut read = 0;
    loop {
        let delivery = hoarder.read_packet().expect("the hoarder is still served").delivery(4);
        read += 1;
        if delivery.payload == b"last" {
            break;
        }
    }
    assert!(read < ROUNDS * PER_TOPIC * TOPICS, "{read} messages: nothing was dropped");
}

#[test]
fn every_kind_of_v5_property_and_alias_reaches_v311_subscribers_safely() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let mut v4 = RawMqtt::session(server.mqtt_addr(), 4, "old-sub", 30);
    v4.send(&mqtt_raw::subscribe(4, 1, "props/#"));
    v4.read_packet().unwrap();
    let mut v5 = RawMqtt::session(server.mqtt_addr(), 5, "new-pub", 30);
    // Properties: payload format (0x01), message expiry (0x02), content
    // type (0x03), response topic (0x08), correlation data (0x09), two user
    // properties (0x26), and a topic alias (0x23).
    let mut props = vec![0x01, 0x01, 0x02, 0, 0, 0x0e, 0x10];
    props.extend_from_slice(b"\x03\x00\x0atext/plain");
    props.extend_from_slice(b"\x08\x00\x0bprops/reply");
    props.extend_from_slice(b"\x09\x00\x04\x00\x01\x02\x03");
    props.extend_from_slice(b"\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x02v2");
    props.extend_from_slice(b"\x23\x00\x05");
    let mut body = b"\x00\x07props/a".to_vec();
    body.push(props.len() as u8);
    body.extend_from_slice(&props);
    body.extend_from_slice(b"first");
    v5.send(&packet(0x30, &body));
    // Then the same topic by alias only (empty topic name).
    v5.send(&packet(0x30, b"\x00\x00\x03\x23\x00\x05second"));
    for expected in [&b"first"[..], b"second"] {
        let got = v4.read_packet().expect("the 3.1.1 subscriber is alive");
        assert_eq!(got.packet_type(), 3);
        assert_eq!(&got.body[..9], b"\x00\x07props/a", "topic restored from the alias");
        assert_eq!(&got.body[9..], expected, "no properties on the wire");
    }
    bystanders.still_fine("v5 properties");
}

#[test]
fn refused_subscription_filters_get_failure_codes_not_a_dropped_connection() {
    let server = TestServer::start(&[]);
    for (level, codes) in [(4u8, [0x00u8, 0x80, 0x80, 0x80]), (5, [0x00, 0x8f, 0x8f, 0x8f])] {
        let mut c = RawMqtt::session(server.mqtt_addr(), level, &format!("filters-{level}"), 30);
        // ok, a share group without a filter, a/#/b, +a ($SYS/# is served:
        // tests/mqtt_sys.rs)
        c.send(&mqtt_raw::subscribe_all(level, 9, &["ok/#", "$share", "a/#/b", "+a"]));
        let ack = c.read_packet().unwrap();
        assert_eq!(ack.packet_type(), 9);
        let codes_at = if level == 5 { 3 } else { 2 };
        assert_eq!(&ack.body[codes_at..], &codes, "level {level}");
        // Only refused filters: the SUBACK is the server's own.
        c.send(&mqtt_raw::subscribe(level, 10, "a/#/b"));
        let ack = c.read_packet().unwrap();
        assert_eq!(*ack.body.last().unwrap(), codes[1]);
        // And the session goes on.
        c.send(&mqtt_raw::publish(level, "ok/1", b"fine"));
        assert!(c.read_packet().unwrap().body.ends_with(b"fine"));
    }
}

#[test]
fn shutdown_sends_v5_clients_disconnect_0x8b_and_closes_v311_cleanly() {
    let mut server = TestServer::start(&["--shutdown-grace", "3s"]);
    let mut v4 = RawMqtt::session(server.mqtt_addr(), 4, "down-4", 30);
    let mut v5 = RawMqtt::session(server.mqtt_addr(), 5, "down-5", 30);
    // Keep-alive 0: no deadline, but the shutdown reaches it all the same.
    let mut v5_forever = RawMqtt::session(server.mqtt_addr(), 5, "down-5-ka0", 0);
    v4.send(&mqtt_raw::subscribe(4, 1, "down"));
    v4.read_packet().unwrap();
    v4.send(&mqtt_raw::publish(4, "down", b"x"));
    v4.read_packet().unwrap();
    let started = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    assert_eq!(v5.read_packet().unwrap().disconnect_reason(), 0x8b, "server shutting down");
    assert!(v5.closed_within(Duration::from_secs(3)));
    assert_eq!(v5_forever.read_packet().unwrap().disconnect_reason(), 0x8b, "keep-alive 0");
    assert!(v5_forever.closed_within(Duration::from_secs(3)));
    assert_eq!(v4.read_packet(), None, "3.1.1: a clean close, no packet");
    // The server waits (within the grace) for the clients to close too.
    drop((v4, v5, v5_forever));
    let status = server.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "the clients closed; no need to wait the grace out");
    let summary = server.wait_for_log(Duration::from_secs(2), |v| v["message"] == "shutdown complete");
    assert_eq!(summary["mqtt_sessions_served"], 3);
    assert_eq!(summary["mqtt_publishes_received"], 1);
}

#[test]
fn silent_clients_cannot_hold_the_connect_turns() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_CONNECT_CONCURRENCY", "4")]);
    // Many more silent connections than turns; they give their turns back.
    let silent: Vec<RawMqtt> = (0..40).map(|_| RawMqtt::connect(server.mqtt_addr())).collect();
    std::thread::sleep(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let _ok = RawMqtt::session(server.mqtt_addr(), 4, "not-blocked", 30);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    drop(silent);
}

/// Closing sessions take turns too (so that thousands leaving at once do
/// not hold the event loop), but clients that are slow to close cannot hold
/// those turns: here every closing session waits for its client's FIN, which
/// never comes, yet a new client connects at once.
#[test]
fn clients_slow_to_close_cannot_hold_the_turns() {
    let server = TestServer::start_with_env(&[], &[("ECHO_MQTT_CONNECT_CONCURRENCY", "2")]);
    let mut lingering = Vec::new();
    for i in 0..10 {
        let mut client = RawMqtt::session(server.mqtt_addr(), 5, &format!("lingering-{i}"), 30);
        // A wildcard in a publish topic: DISCONNECT 0x90, then a polite
        // close that waits (up to 5 s) for this client's FIN.
        client.send(&mqtt_raw::publish(5, "not/+/allowed", b"x"));
        lingering.push(client);
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let _ok = RawMqtt::session(server.mqtt_addr(), 4, "not-blocked-by-closers", 30);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    for client in &mut lingering {
        assert_eq!(client.read_packet().expect("a DISCONNECT").disconnect_reason(), 0x90);
    }
}

/// MQTT over WebSocket ends with a close code that says why (RFC 6455
/// §7.4.1): 1002 for bytes that are not MQTT or break it, 1003 for a text
/// message, 1009 for a packet over the limit, 1000 after a DISCONNECT; and
/// a client's close frame is answered with a close frame of the same code
/// (§5.5.1), before a CONNECT and during a session.
#[test]
fn mqtt_over_websocket_says_why_it_closes_and_answers_a_close() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let ws = server.ws_addr();
    // Answers the server's close as a polite client does; the TCP
    // connection then ends at once.
    let closes_with = |client: &mut RawClient, case: &str| -> u16 {
        let code = client.read_close_code().unwrap_or_else(|| panic!("{case}: a close frame"));
        client.send_frame(true, 8, &code.to_be_bytes());
        assert!(client.closed_within(Duration::from_secs(3)), "{case}: TCP closed after the handshake");
        code
    };
    let before_connect: [(&str, u8, Vec<u8>, u16); 4] = [
        ("garbage", 2, (0..=255u8).rev().cycle().take(300).collect()),
        ("http request", 2, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("publish first", 2, mqtt_raw::publish(4, "a", b"b")),
        ("connect in a text message", 1, mqtt_raw::connect(4, "text", 30)),
    ]
    .map(|(case, opcode, bytes)| (case, opcode, bytes, if opcode == 1 { 1003 } else { 1002 }));
    for (case, opcode, bytes, code) in before_connect {
        let mut client = RawClient::connect_mqtt(ws);
        client.send_frame(true, opcode, &bytes);
        assert_eq!(closes_with(&mut client, case), code, "{case}");
        bystanders.still_fine(case);
    }
    // In a session (MQTT 5): the DISCONNECT says why in MQTT, the close
    // code in WebSocket terms.
    let in_session: [(&str, Vec<u8>, Option<u8>, u16); 5] = [
        ("publish at QoS 3", packet(0x36, b"\x00\x01a\x00\x01"), Some(0x81), 1002),
        ("second connect", mqtt_raw::connect(5, "again", 30), Some(0x82), 1002),
        (
            "alias over the maximum",
            mqtt_raw::publish_raw(5, b"a", 0, b"\x23\x10\x01", b"x"),
            Some(0x94),
            1002,
        ),
        ("over max_payload_size", vec![0x30, 0xff, 0xff, 0xff, 0x7f], Some(0x95), 1009),
        ("disconnect", mqtt_raw::DISCONNECT.to_vec(), None, 1000),
    ];
    for (case, bytes, reason, code) in in_session {
        let mut client = RawClient::connect_mqtt(ws);
        client.send_frame(true, 2, &mqtt_raw::connect(5, "ws-session", 30));
        let ack = RawPacket::parse(&client.read_frame().expect("CONNACK").payload);
        assert_eq!(ack.connack_code(), 0, "{case}");
        client.send_frame(true, 2, &bytes);
        if let Some(reason) = reason {
            let bye = client.read_frame().expect("DISCONNECT");
            assert_eq!(bye.opcode, 2, "{case}");
            assert_eq!(RawPacket::parse(&bye.payload).disconnect_reason(), reason, "{case}");
        }
        assert_eq!(closes_with(&mut client, case), code, "{case}");
        bystanders.still_fine(case);
    }
    // The client closes first: its close frame comes back with its code.
    for (case, connected, code) in [("before connect", false, 1000u16), ("in a session", true, 4000)] {
        let mut client = RawClient::connect_mqtt(ws);
        if connected {
            client.send_frame(true, 2, &mqtt_raw::connect(4, "ws-closer", 30));
            assert_eq!(RawPacket::parse(&client.read_frame().expect("CONNACK").payload).connack_code(), 0);
        }
        let mut close = code.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        client.send_frame(true, 8, &close);
        let answer = client.read_frame().expect("a close frame in answer");
        assert_eq!((answer.opcode, answer.close_code()), (8, Some(code)), "{case}");
        assert!(client.closed_within(Duration::from_secs(3)), "{case}: TCP closed");
        bystanders.still_fine(case);
    }
}

/// MQTT 5 §2.2.2.2: a property given twice where it may appear once is a
/// protocol error (0x82), not the last value winning: a CONNECT with one
/// (in its own properties or its will's) is refused with CONNACK 0x82, a
/// packet in a session ends it with DISCONNECT 0x82. User Property may
/// repeat, and such a publish is delivered.
#[test]
fn a_property_given_twice_is_a_protocol_error() {
    let server = TestServer::start(&[]);
    let mut bystanders = Bystanders::new(&server);
    let addr = server.mqtt_addr();
    let session = [0x11, 0, 0, 0, 60];
    let connects: [(&str, Vec<u8>); 2] = [
        (
            "session expiry twice in CONNECT",
            packet(
                0x10,
                &[&b"\x00\x04MQTT\x05\x02\x00\x1e\x0a"[..], &session, &session, b"\x00\x01c"].concat(),
            ),
        ),
        (
            "will delay twice in the will's properties",
            packet(
                0x10,
                &[
                    &b"\x00\x04MQTT\x05\x06\x00\x1e\x00\x00\x01c\x0a"[..],
                    &[0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 2],
                    b"\x00\x01t\x00\x01m",
                ]
                .concat(),
            ),
        ),
    ];
    for (case, bytes) in connects {
        let mut client = RawMqtt::connect(addr);
        client.send(&bytes);
        assert_eq!(client.read_packet().expect("a CONNACK").connack_code(), 0x82, "{case}");
        assert!(client.closed_within(Duration::from_secs(5)), "{case}");
        bystanders.still_fine(case);
    }
    let expiry = [0x02, 0, 0, 0, 9];
    let reason = [0x1f, 0, 1, b'r'];
    let in_session: [(&str, Vec<u8>); 3] = [
        (
            "message expiry twice in PUBLISH",
            mqtt_raw::publish_raw(5, b"dup/t", 1, &[expiry, expiry].concat(), b"x"),
        ),
        (
            "subscription identifier twice in SUBSCRIBE",
            packet(0x82, &[0, 1, 4, 0x0b, 1, 0x0b, 2, 0, 1, b'a', 0]),
        ),
        ("reason string twice in DISCONNECT", packet(0xe0, &[&[0x00, 8][..], &reason, &reason].concat())),
    ];
    for (case, bytes) in in_session {
        let mut client = RawMqtt::session(addr, 5, "dup", 30);
        client.send(&bytes);
        assert_eq!(client.read_packet().expect("a DISCONNECT").disconnect_reason(), 0x82, "{case}");
        assert!(client.closed_within(Duration::from_secs(5)), "{case}");
        bystanders.still_fine(case);
    }
    assert_eq!(server.metric("echo_mqtt_refused_total{reason=\"protocol_error\"}"), 2.0);
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"protocol_error\"}"), 3.0);
    // User Property three times: taken, and delivered.
    let mut client = RawMqtt::session(addr, 5, "users", 30);
    client.send(&mqtt_raw::subscribe(5, 1, "dup/users"));
    assert_eq!(client.read_packet().unwrap().packet_type(), 9);
    let user = [0x26, 0, 1, b'k', 0, 1, b'v'];
    client.send(&mqtt_raw::publish_raw(5, b"dup/users", 0, &[user, user, user].concat(), b"three"));
    let delivered = client.read_packet().expect("the publish");
    assert_eq!(delivered.packet_type(), 3);
    assert!(delivered.body.ends_with(b"three"), "{delivered:?}");
    bystanders.still_fine("user properties");
}
