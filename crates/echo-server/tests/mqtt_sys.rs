//! `$SYS`: the broker's statistics under `$SYS/broker/...` every
//! `mqtt.sys_interval` (retained, each only when it changed), `#` and
//! `+/...` not matching them (MQTT §4.7.2), and clients refused when they
//! publish there. With the router on its thread and on the event loop.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::mqtt_raw::{self, RawMqtt};
use common::{TestServer, run_to_exit};

/// Short, so that the tests see several intervals.
const INTERVAL: &str = "200ms";

/// How long "nothing comes" is watched for: several intervals.
const QUIET: Duration = Duration::from_millis(1000);

const WAIT: Duration = Duration::from_secs(10);

fn start(interval: &str, on_the_loop: bool) -> TestServer {
    let mut env = vec![("ECHO_MQTT_SYS_INTERVAL", interval)];
    if on_the_loop {
        env.extend(common::ROUTER_ON_THE_LOOP);
    }
    TestServer::start_with_env(&[], &env)
}

fn each_router_placement(interval: &str, test: impl Fn(&TestServer)) {
    for on_the_loop in [false, true] {
        test(&start(interval, on_the_loop));
    }
}

/// An MQTT 5 client subscribed to `filter` at QoS 0.
fn subscriber(server: &TestServer, id: &str, filter: &str) -> RawMqtt {
    let mut c = RawMqtt::session(server.mqtt_addr(), 5, id, 30);
    c.send(&mqtt_raw::subscribe(5, 1, filter));
    let ack = c.read_packet().expect("a SUBACK");
    assert_eq!(ack.suback_codes(5), vec![0], "{filter} granted");
    c
}

/// The latest payload per topic, read until `done` holds for them.
fn until(
    c: &mut RawMqtt,
    seen: &mut HashMap<String, String>,
    done: impl Fn(&HashMap<String, String>) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !done(seen) {
        assert!(Instant::now() < deadline, "not seen in time; so far: {seen:?}");
        let delivery = c.read_packet().expect("a publish").delivery(5);
        seen.insert(delivery.topic, String::from_utf8(delivery.payload).unwrap());
    }
}

fn has(seen: &HashMap<String, String>, topic: &str, value: &str) -> bool {
    seen.get(topic).is_some_and(|v| v == value)
}

#[test]
fn sys_topics_report_the_broker_and_follow_its_clients() {
    each_router_placement(INTERVAL, |server| {
        let mut sys = subscriber(server, "sys-reader", "$SYS/broker/#");
        let mut seen = HashMap::new();
        let counts = [
            "$SYS/broker/clients/total",
            "$SYS/broker/clients/maximum",
            "$SYS/broker/messages/received",
            "$SYS/broker/messages/sent",
            "$SYS/broker/publish/messages/received",
            "$SYS/broker/publish/messages/sent",
            "$SYS/broker/bytes/received",
            "$SYS/broker/bytes/sent",
            "$SYS/broker/retained messages/count",
        ];
        // Its own connection and subscription (a figure retained from
        // between the two may come first), and every figure once: the
        // first ones may come live, one at a time, after the subscription.
        until(&mut sys, &mut seen, |s| {
            has(s, "$SYS/broker/clients/connected", "1")
                && has(s, "$SYS/broker/subscriptions/count", "1")
                && ["$SYS/broker/version", "$SYS/broker/uptime"]
                    .iter()
                    .chain(&counts)
                    .all(|topic| s.contains_key(*topic))
        });
        let version = &seen["$SYS/broker/version"];
        assert_eq!(*version, format!("echo-server version {}", env!("CARGO_PKG_VERSION")));
        let uptime = seen["$SYS/broker/uptime"].strip_suffix(" seconds").expect("N seconds");
        uptime.parse::<u64>().expect("a number of seconds");
        for topic in counts {
            let value = seen.get(topic).unwrap_or_else(|| panic!("{topic} in {seen:?}"));
            value.parse::<u64>().unwrap_or_else(|_| panic!("{topic}: {value:?} is a count"));
        }

        // Another client, with a session kept after it leaves.
        let mut other = RawMqtt::connect(server.mqtt_addr());
        other.send(&mqtt_raw::connect_session(5, "kept", true, Some(3600)));
        assert_eq!(other.read_packet().unwrap().connack_code(), 0);
        until(&mut sys, &mut seen, |s| {
            has(s, "$SYS/broker/clients/connected", "2") && has(s, "$SYS/broker/clients/maximum", "2")
        });
        other.send(&mqtt_raw::DISCONNECT);
        until(&mut sys, &mut seen, |s| {
            has(s, "$SYS/broker/clients/connected", "1")
                && has(s, "$SYS/broker/clients/disconnected", "1")
                && has(s, "$SYS/broker/clients/total", "2")
        });
        assert!(has(&seen, "$SYS/broker/clients/maximum", "2"), "{seen:?}");

        // A retained message counts.
        let before: u64 = seen["$SYS/broker/retained messages/count"].parse().unwrap();
        let mut retained = mqtt_raw::publish(5, "status/x", b"on");
        retained[0] |= 1;
        sys.send(&retained);
        let want = (before + 1).to_string();
        until(&mut sys, &mut seen, |s| has(s, "$SYS/broker/retained messages/count", &want));
    });
}

/// A new subscriber gets every figure at once (they are retained); `#`
/// and `+/broker/#` get none of them, while `a/b` still reaches `#`.
#[test]
fn wildcards_at_the_first_level_do_not_match_sys_topics() {
    each_router_placement(INTERVAL, |server| {
        let mut all = subscriber(server, "all", "#");
        let mut plus = subscriber(server, "plus", "+/broker/#");
        let mut plus_only = subscriber(server, "plus-only", "+/broker/uptime");
        std::thread::sleep(Duration::from_millis(500));
        let mut sys = subscriber(server, "sys", "$SYS/#");
        let mut seen = HashMap::new();
        until(&mut sys, &mut seen, |s| s.len() >= 10);
        assert!(seen.keys().all(|t| t.starts_with("$SYS/broker/")), "{seen:?}");
        for c in [&mut all, &mut plus, &mut plus_only] {
            assert!(c.silent_for(QUIET), "a $SYS topic reached a leading wildcard");
        }
        let mut publisher = RawMqtt::session(server.mqtt_addr(), 5, "pub", 30);
        publisher.send(&mqtt_raw::publish(5, "a/b", b"hello"));
        let got = all.read_packet().expect("a/b").delivery(5);
        assert_eq!((got.topic.as_str(), got.payload.as_slice()), ("a/b", &b"hello"[..]));
        // `$SYS/broker/+` names the first level: it matches.
        let mut named = subscriber(server, "named", "$SYS/broker/+");
        let mut named_seen = HashMap::new();
        until(&mut named, &mut named_seen, |s| s.contains_key("$SYS/broker/version"));
    });
}

/// Publishes to `$` topics are the server's: refused as the ACL refuses
/// (MQTT 5: PUBACK 0x87; 3.1.1: acknowledged and dropped), counted in
/// `echo_mqtt_acl_denied_total{action="publish"}`, and never delivered; a
/// will there is refused at CONNECT (0x87).
#[test]
fn clients_may_not_publish_to_sys_topics() {
    each_router_placement(INTERVAL, |server| {
        let mut sys = subscriber(server, "sys", "$SYS/#");
        let mut v5 = RawMqtt::session(server.mqtt_addr(), 5, "v5", 30);
        v5.send(&mqtt_raw::publish_qos(5, "$SYS/x", 1, 7, b"fake"));
        let ack = v5.read_packet().expect("a PUBACK");
        assert_eq!((ack.packet_type(), ack.pkid(), ack.body[2]), (4, 7, 0x87));
        let mut fake_version = mqtt_raw::publish(5, "$SYS/broker/version", b"fake");
        fake_version[0] |= 1;
        v5.send(&fake_version);
        let mut v311 = RawMqtt::session(server.mqtt_addr(), 4, "v311", 30);
        v311.send(&mqtt_raw::publish_qos(4, "$SYS/y", 1, 8, b"fake"));
        let ack = v311.read_packet().expect("a PUBACK");
        assert_eq!((ack.packet_type(), ack.pkid()), (4, 8));
        server.wait_for_metric("echo_mqtt_acl_denied_total{action=\"publish\"}", WAIT, |n| n == 3.0);

        let mut will = RawMqtt::connect(server.mqtt_addr());
        will.send(&mqtt_raw::connect_with_will(5, "willing", b"$SYS/broker/version", b"fake", 0));
        assert_eq!(will.read_packet().expect("a CONNACK").connack_code(), 0x87);
        server.wait_for_metric("echo_mqtt_acl_denied_total{action=\"publish\"}", WAIT, |n| n == 4.0);

        // Several intervals of the server's own figures; none of the above.
        let deadline = Instant::now() + QUIET;
        let mut seen = HashMap::new();
        while Instant::now() < deadline {
            if sys.silent_for(Duration::from_millis(50)) {
                continue;
            }
            let d = sys.read_packet().unwrap().delivery(5);
            assert_ne!(d.payload, b"fake", "a client's publish reached {}", d.topic);
            seen.insert(d.topic, d.payload);
        }
        assert!(seen.contains_key("$SYS/broker/uptime"), "{seen:?}");
        assert!(!seen.contains_key("$SYS/x") && !seen.contains_key("$SYS/y"), "{seen:?}");
    });
}

#[test]
fn a_sys_interval_of_0s_publishes_nothing() {
    let server = start("0s", false);
    let mut sys = subscriber(&server, "sys", "$SYS/#");
    assert!(sys.silent_for(QUIET), "$SYS is off");
}

#[test]
fn a_bad_sys_interval_is_refused_at_start() {
    for bad in ["10ms", "often"] {
        let (status, _, stderr) =
            run_to_exit(&["--ws-listen", "127.0.0.1:0"], &[("ECHO_MQTT_SYS_INTERVAL", bad)]);
        assert!(!status.success(), "{bad}: {stderr}");
        assert!(stderr.contains("mqtt.sys_interval"), "{bad}: {stderr}");
        assert!(!stderr.contains("listening"), "refused before binding: {stderr}");
    }
}
