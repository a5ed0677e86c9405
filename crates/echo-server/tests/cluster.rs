//! The MQTT cluster over NATS (`cluster.nats_url`, docs/mqtt.md "Cluster"):
//! two echo-server processes, or one with two workers, pointed at a real
//! `nats-server` on a port the OS picks. Skipped loudly when nats-server is
//! missing (a failure with `REQUIRE_TEST_TOOLS=1`, as `.ci/run` sets).

mod common;

use std::time::{Duration, Instant};

use common::mqtt_raw::{self, RawMqtt, RawPacket};
use common::nats::{self, Nats};
use common::{TestServer, run_to_exit};

/// A server of the cluster at `nats` (its own ports; `--no-admin` not
/// used: the tests read /readyz and /metrics).
fn node(nats: &Nats, args: &[&str]) -> TestServer {
    node_with(nats, args, &[])
}

fn node_with(nats: &Nats, args: &[&str], env: &[(&str, &str)]) -> TestServer {
    let url = nats.url();
    let mut all = vec![("ECHO_CLUSTER_NATS_URL", url.as_str())];
    all.extend_from_slice(env);
    let server = TestServer::start_with_env(args, &all);
    server.wait_for_metric("echo_cluster_nats_connected", Duration::from_secs(10), |v| v == 1.0);
    server
}

/// A clean MQTT session of `level` (4: 3.1.1, 5).
fn client(server: &TestServer, level: u8, id: &str) -> RawMqtt {
    RawMqtt::session(server.mqtt_addr(), level, id, 60)
}

/// SUBSCRIBE to `filter` at `qos`; asserts it is granted.
fn subscribe(raw: &mut RawMqtt, level: u8, filter: &str, qos: u8) {
    raw.send(&mqtt_raw::subscribe_qos(level, 1, filter, qos));
    let ack = raw.read_packet().expect("a SUBACK");
    assert_eq!(ack.suback_codes(level), [qos], "SUBACK for {filter}");
}

/// PUBLISH and, at QoS 1, wait for the PUBACK.
fn publish(raw: &mut RawMqtt, level: u8, topic: &str, qos: u8, payload: &[u8]) {
    publish_flags(raw, level, topic, qos, false, payload);
}

fn publish_flags(raw: &mut RawMqtt, level: u8, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
    let mut bytes = mqtt_raw::publish_qos(level, topic, qos, 9, payload);
    bytes[0] |= u8::from(retain);
    raw.send(&bytes);
    if qos == 1 {
        let ack = raw.read_packet().expect("a PUBACK");
        assert_eq!(ack.packet_type(), 4, "{ack:?}");
    }
}

/// A PUBLISH as a client received it.
#[derive(Debug, PartialEq, Eq)]
struct Received {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
}

fn parse_publish(p: &RawPacket, level: u8) -> Received {
    assert_eq!(p.packet_type(), 3, "not a PUBLISH: {p:?}");
    let qos = (p.first >> 1) & 3;
    let len = usize::from(u16::from_be_bytes([p.body[0], p.body[1]]));
    let topic = String::from_utf8(p.body[2..2 + len].to_vec()).unwrap();
    let mut at = 2 + len + if qos > 0 { 2 } else { 0 };
    if level == 5 {
        // The property length (one byte here: small properties).
        at += 1 + usize::from(p.body[at]);
    }
    Received { topic, payload: p.body[at..].to_vec(), qos, retain: p.first & 1 == 1 }
}

/// The next PUBLISH (acknowledged at QoS 1), within `limit`; `None` if
/// none came.
fn next_publish(raw: &mut RawMqtt, level: u8, limit: Duration) -> Option<Received> {
    raw.stream.set_read_timeout(Some(limit)).unwrap();
    let packet = raw.read_packet();
    raw.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let packet = packet?;
    let received = parse_publish(&packet, level);
    if received.qos == 1 {
        let pkid = u16::from_be_bytes([
            packet.body[2 + received.topic.len()],
            packet.body[3 + received.topic.len()],
        ]);
        raw.send(&mqtt_raw::ack(0x40, pkid));
    }
    Some(received)
}

fn expect(raw: &mut RawMqtt, level: u8, topic: &str, payload: &[u8]) -> Received {
    let received =
        next_publish(raw, level, Duration::from_secs(5)).unwrap_or_else(|| panic!("{topic} not received"));
    assert_eq!((received.topic.as_str(), &received.payload[..]), (topic, payload), "{received:?}");
    received
}

/// Nothing more comes within a moment.
fn nothing_more(raw: &mut RawMqtt, level: u8, why: &str) {
    if let Some(received) = next_publish(raw, level, Duration::from_millis(500)) {
        panic!("{why}: got {received:?}");
    }
}

/// Publishes probes to `topic` on `publisher` until each of `subscribers`
/// has received one: the subscriptions have reached NATS (they do so just
/// after their SUBACK, see docs/mqtt.md). Then drains the probes.
fn bridged(publisher: &mut RawMqtt, level: u8, subscribers: &mut [&mut RawMqtt], topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = vec![false; subscribers.len()];
    while seen.contains(&false) {
        assert!(Instant::now() < deadline, "the subscriptions did not reach the other broker");
        publisher.send(&mqtt_raw::publish_qos(level, topic, 0, 0, b"probe"));
        for (i, subscriber) in subscribers.iter_mut().enumerate() {
            if !seen[i] {
                subscriber.stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                if let Some(p) = subscriber.read_packet() {
                    assert_eq!(p.packet_type(), 3, "{p:?}");
                    seen[i] = true;
                }
            }
        }
    }
    for subscriber in subscribers.iter_mut() {
        subscriber.drain(Duration::from_millis(300));
    }
}

#[test]
fn publishes_reach_the_other_server_at_qos_0_and_1_with_wildcards() {
    if !nats::available() {
        return;
    }
    let nats = Nats::start();
    let (a, b) = (node(&nats, &[]), node(&nats, &[]));
    let mut publisher = client(&a, 5, "publisher");
    let mut local = client(&a, 4, "local");
    subscribe(&mut local, 4, "x/+/z", 1);
    let mut v5 = client(&b, 5, "remote-5");
    subscribe(&mut v5, 5, "x/+/z", 1);
    subscribe(&mut v5, 5, "q/#", 0);
    let mut v311 = client(&b, 4, "remote-311");
    subscribe(&mut v311, 4, "x/+/z", 0);
    bridged(&mut publisher, 5, &mut [&mut v5, &mut v311, &mut local], "x/probe/z");

    // QoS 1 to a QoS 1 subscriber on the other server: delivered at QoS 1;
    // to a QoS 0 one, at QoS 0; the local subscriber gets it once.
    publish(&mut publisher, 5, "x/y/z", 1, b"one");
    assert_eq!(expect(&mut v5, 5, "x/y/z", b"one").qos, 1);
    assert_eq!(expect(&mut v311, 4, "x/y/z", b"one").qos, 0);
    assert_eq!(expect(&mut local, 4, "x/y/z", b"one").qos, 1);
    // QoS 0 publishes; `q/#` matches `q` itself, and topics NATS cannot
    // carry as they are (spaces, dots, NATS wildcards, non-ASCII, empty
    // levels) come back unchanged.
    let topics = ["q", "q/a b.c", "q/*/>/~", "q/é/🦀", "q//", "q/$x"];
    for topic in topics {
        publish(&mut publisher, 5, topic, 0, topic.as_bytes());
    }
    for topic in topics {
        let received = expect(&mut v5, 5, topic, topic.as_bytes());
        assert_eq!(received.qos, 0);
    }
    // What no filter matches does not come; nothing comes twice.
    publish(&mut publisher, 5, "x/y/w", 0, b"no");
    publish(&mut publisher, 5, "qq", 0, b"no");
    nothing_more(&mut v5, 5, "unmatched or twice");
    nothing_more(&mut v311, 4, "unmatched or twice");
    nothing_more(&mut local, 4, "the local subscriber got its copy once");

    // Published on B, received on A: the bridge works both ways, at QoS 1.
    let mut back = client(&b, 4, "back");
    bridged(&mut back, 4, &mut [&mut local], "x/back/z");
    publish(&mut back, 4, "x/back/z", 1, b"from b");
    assert_eq!(expect(&mut local, 4, "x/back/z", b"from b").qos, 1);

    let out = a.metric("echo_cluster_messages_total{direction=\"out\"}");
    let came = b.metric("echo_cluster_messages_total{direction=\"in\"}");
    assert!(out >= 8.0 && came >= 8.0, "out {out}, in {came}");
}

/// QoS 2 end to end across the servers, MQTT 5 properties kept: the
/// publisher's exchange completes on A, the bridge releases what it hands
/// B's router, and B's subscriber gets each message at QoS 2, once.
#[test]
fn qos_2_crosses_with_its_properties() {
    if !nats::available() {
        return;
    }
    let nats = Nats::start();
    let (a, b) = (node(&nats, &[]), node(&nats, &[]));
    let mut publisher = client(&a, 5, "publisher");
    let mut subscriber = client(&b, 5, "subscriber");
    subscribe(&mut subscriber, 5, "e/#", 2);
    bridged(&mut publisher, 5, &mut [&mut subscriber], "e/probe");
    // A user property ("k" = "v") and a content type.
    let properties = [0x26, 0, 1, b'k', 0, 1, b'v', 0x03, 0, 4, b't', b'e', b'x', b't'];
    for n in 0..3u8 {
        publisher.send(&mqtt_raw::publish_raw(5, b"e/x", 2, &properties, &[b'0' + n]));
        let pubrec = publisher.read_packet().expect("a PUBREC");
        assert_eq!(pubrec.packet_type(), 5, "{pubrec:?}");
        publisher.send(&mqtt_raw::ack(0x62, 1));
        let pubcomp = publisher.read_packet().expect("a PUBCOMP");
        assert_eq!(pubcomp.packet_type(), 7, "{pubcomp:?}");

        let delivery = subscriber.read_packet().expect("the publish on B");
        assert_eq!(delivery.packet_type(), 3, "{delivery:?}");
        assert_eq!((delivery.first >> 1) & 3, 2, "QoS 2: {delivery:?}");
        let body = &delivery.body;
        let pkid = u16::from_be_bytes([body[5], body[6]]);
        assert_eq!(&body[..5], b"\x00\x03e/x");
        assert_eq!(&body[7..8], &[properties.len() as u8][..], "{delivery:?}");
        assert_eq!(&body[8..8 + properties.len()], &properties[..], "the properties as published");
        assert_eq!(&body[8 + properties.len()..], &[b'0' + n][..]);
        subscriber.send(&mqtt_raw::ack(0x50, pkid));
        let pubrel = subscriber.read_packet().expect("a PUBREL");
        assert_eq!(pubrel.packet_type(), 6, "{pubrel:?}");
        subscriber.send(&mqtt_raw::ack(0x70, pkid));
    }
    nothing_more(&mut subscriber, 5, "each once");
}

/// The NATS subscriptions follow the filters the local sessions hold: one
/// per subject, shared by the filters that map to it, let go of when the
/// last one goes (UNSUBSCRIBE, disconnection).
#[test]
fn nats_subscriptions_follow_the_local_filters() {
    if !nats::available() {
        return;
    }
    let nats = Nats::start();
    let (a, b) = (node(&nats, &[]), node(&nats, &[]));
    let held = |n: f64| {
        b.wait_for_metric("echo_cluster_subscriptions", Duration::from_secs(5), |v| v == n);
    };
    // Retained messages, take-overs, retained messages asked for and
    // offered (three subjects).
    held(5.0);
    let mut wide = client(&b, 4, "wide");
    subscribe(&mut wide, 4, "a/#", 0);
    held(7.0); // a.> and a
    let mut narrow = client(&b, 4, "narrow");
    subscribe(&mut narrow, 4, "a", 0);
    subscribe(&mut narrow, 4, "$SYS/#", 0);
    let mut same = client(&b, 4, "same");
    subscribe(&mut same, 4, "a/#", 0);
    held(7.0); // the same subjects; `$SYS` stays local
    wide.send(&mqtt_raw::unsubscribe_all(4, 2, &["a/#"]));
    assert_eq!(wide.read_packet().expect("an UNSUBACK").packet_type(), 11);
    held(7.0); // `same` still holds a/#
    same.send(&mqtt_raw::DISCONNECT);
    assert!(same.closed_within(Duration::from_secs(5)));
    // (The server lets go of the session once this end has closed too.)
    drop(same);
    held(6.0); // a, for `narrow`
    let mut publisher = client(&a, 4, "publisher");
    bridged(&mut publisher, 4, &mut [&mut narrow], "a");
    publish(&mut publisher, 4, "a/b", 0, b"no one");
    publish(&mut publisher, 4, "a", 0, b"narrow");
    expect(&mut narrow, 4, "a", b"narrow");
    nothing_more(&mut narrow, 4, "a/b matches no filter left");
    drop(narrow);
    held(5.0);
}

/// `a/+` and `+/b` are two NATS subscriptions that both match `a/b`: the
/// message reaches the other server twice, and is handed on once.
#[test]
fn overlapping_filters_get_one_copy_each() {
    if !nats::available() {
        return;
    }
    let nats = Nats::start();
    let (a, b) = (node(&nats, &[]), node(&nats, &[]));
    let mut publisher = client(&a, 4, "publisher");
    let mut first = client(&b, 4, "first");
    subscribe(&mut first, 4, "a/+", 0);
    let mut second = client(&b, 4, "second");
    subscribe(&mut second, 4, "+/b", 0);
    bridged(&mut publisher, 4, &mut [&mut first, &mut second], "a/b");
    let before = b.metrics().get("echo_cluster_dropped_total{reason=\"duplicate\"}").copied().unwrap_or(0.0);
    for n in 0..20 {
        publish(&mut publisher, 4, "a/b", 0, format!("m{n}").as_bytes());
    }
    for n in 0..20 {
        expect(&mut first, 4, "a/b", format!("m{n}").as_bytes());
        expect(&mut second, 4, "a/b", format!("m{n}").as_bytes());
    }
    nothing_more(&mut first, 4, "a copy came twice");
    nothing_more(&mut second, 4, "a copy came twice");
    let duplicates =
        b.wait_for_metric("echo_cluster_dropped_total{reason=\"duplicate\"}", Duration::from_secs(5), |v| {
            v >= before + 20.0
        });
    assert_eq!(duplicates, before + 20.0);
}

/// Retained messages reach every server, whether or not anyone there
/// subscribes, and so do their deletions; wills cross like any publish.
#[test]
fn retained_messages_and_wills_cross() {
    if !nats::available() {
        return;
    }
    let nats = Nats::start();
    let (a, b) = (node(&nats, &[]), node(&nats, &[]));
    let mut publisher = client(&a, 5, "publisher");
    publish_flags(&mut publisher, 5, "status/r1", 1, true, b"kept");
    publish_flags(&mut publisher, 5, "status/r2", 0, true, b"kept too");
    // No subscriber on B until now: the retained messages are stored there.
    b.wait_for_metric("echo_cluster_messages_total{direction=\"in\"}", Duration::from_secs(5), |v| v >= 2.0);
    let mut late = client(&b, 5, "late");
    subscribe(&mut late, 5, "status/#", 1);
    let mut got = [
        next_publish(&mut late, 5, Duration::from_secs(5)),
        next_publish(&mut late, 5, Duration::from_secs(5)),
    ]
    .map(|r| r.expect("a retained message"));
    got.sort_by(|x, y| x.topic.cmp(&y.topic));
    assert_eq!(
        (got[0].topic.as_str(), &got[0].payload[..], got[0].retain),
        ("status/r1", &b"kept"[..], true)
    );
    assert_eq!(
        (got[1].topic.as_str(), &got[1].payload[..], got[1].retain),
        ("status/r2", &b"kept too"[..], true)
    );
    // A deletion (empty retained publish) reaches B too.
    publish_flags(&mut publisher, 5, "status/r1", 1, true, b"");
    let deleted = expect(&mut late, 5, "status/r1", b"");
    assert!(!deleted.retain, "a live delivery without Retain As Published");
    let mut later = client(&b, 4, "later");
    subscribe(&mut later, 4, "status/#", 0);
    let only = expect(&mut later, 4, "status/r2", b"kept too");
    assert!(only.retain);
    nothing_more(&mut later, 4, "status/r1 was deleted");

    // A client on A with a will, its connection dropped: B's subscriber
    // gets the will.
    let mut watcher = client(&b, 4, "watcher");
    subscribe(&mut watcher, 4, "wills/#", 1);
    bridged(&mut publisher, 5, &mut [&mut watcher], "wills/probe");
    let mut doomed = RawMqtt::connect(a.mqtt_addr());
    doomed.send(&mqtt_raw::connect_with_will(4, "doomed", b"wills/doomed", b"gone", 1));
    assert_eq!(doomed.read_packet().expect("a CONNACK").connack_code(), 0);
    drop(doomed);
    let will = expect(&mut watcher, 4, "wills/doomed", b"gone");
    assert_eq!(will.qos, 1);
}

/// NATS killed: both servers go on serving their own clients, say 503 on
/// /readyz with the reason and 0 in `echo_cluster_nats_connected`;
/// publishes meanwhile stay local (at most once between servers: they are
/// not sent later). NATS back on its port: both reconnect by themselves,
/// and publishes cross again.
#[test]
fn nats_killed_and_restarted() {
    if !nats::available() {
        return;
    }
    let mut nats = Nats::start();
    let (a, b) = (node(&nats, &[]), node(&nats, &[]));
    let mut publisher = client(&a, 4, "publisher");
    let mut local = client(&a, 4, "local");
    subscribe(&mut local, 4, "t/#", 1);
    let mut remote = client(&b, 4, "remote");
    subscribe(&mut remote, 4, "t/#", 1);
    bridged(&mut publisher, 4, &mut [&mut remote, &mut local], "t/probe");
    assert_eq!(a.admin_get("/readyz").0, 200);

    nats.kill();
    for server in [&a, &b] {
        server.wait_for_metric("echo_cluster_nats_connected", Duration::from_secs(10), |v| v == 0.0);
        let (status, body) = server.admin_get("/readyz");
        assert_eq!((status, body.as_str()), (503, "cluster: NATS unreachable (cluster.nats_url)\n"));
        assert_eq!(server.admin_get("/healthz").0, 200);
    }
    // A subscription made during the outage reaches NATS once it is back.
    let mut meanwhile = client(&b, 4, "meanwhile");
    subscribe(&mut meanwhile, 4, "u/+", 0);
    publish(&mut publisher, 4, "t/during", 1, b"local only");
    assert_eq!(expect(&mut local, 4, "t/during", b"local only").qos, 1);
    let dropped =
        a.wait_for_metric("echo_cluster_dropped_total{reason=\"nats_down\"}", Duration::from_secs(5), |v| {
            v >= 1.0
        });
    assert!(dropped >= 1.0);

    let _nats = Nats::start_on(Some(nats.port));
    for server in [&a, &b] {
        server.wait_for_metric("echo_cluster_nats_connected", Duration::from_secs(15), |v| v == 1.0);
        assert_eq!(server.admin_get("/readyz").0, 200);
        assert!(server.metric("echo_cluster_nats_reconnects_total") >= 1.0);
    }
    // B's subscription is made again on the new server.
    bridged(&mut publisher, 4, &mut [&mut remote, &mut local], "t/probe");
    publish(&mut publisher, 4, "t/after", 1, b"again");
    assert_eq!(expect(&mut remote, 4, "t/after", b"again").qos, 1);
    expect(&mut local, 4, "t/after", b"again");
    nothing_more(&mut remote, 4, "what was published during the outage is not sent later");
    bridged(&mut publisher, 4, &mut [&mut meanwhile], "u/probe");
}

/// Retained messages are not lost to a node that was not there: one that
/// starts later asks the others for theirs, and one that published
/// retained messages while NATS was unreachable offers them when it is
/// back. What a node holds is not overwritten by what it is sent then.
#[test]
fn retained_messages_reach_a_node_that_starts_later_or_was_cut_off() {
    if !nats::available() {
        return;
    }
    let mut nats = Nats::start();
    let a = node(&nats, &[]);
    let mut publisher = client(&a, 5, "publisher");
    publish_flags(&mut publisher, 5, "late/a", 1, true, b"one");
    publish_flags(&mut publisher, 5, "late/b", 1, true, b"two");
    publish_flags(&mut publisher, 5, "late/b", 1, true, b"");
    publish_flags(&mut publisher, 5, "late/c", 1, true, b"three");

    let b = node(&nats, &[]);
    b.wait_for_metric("echo_cluster_messages_total{direction=\"in\"}", Duration::from_secs(5), |v| v >= 2.0);
    let mut late = client(&b, 4, "late");
    subscribe(&mut late, 4, "late/#", 0);
    let mut got: Vec<(String, Vec<u8>)> = (0..2)
        .map(|_| next_publish(&mut late, 4, Duration::from_secs(5)).expect("a retained message"))
        .map(|r| {
            assert!(r.retain);
            (r.topic, r.payload)
        })
        .collect();
    got.sort();
    assert_eq!(got, [("late/a".to_owned(), b"one".to_vec()), ("late/c".to_owned(), b"three".to_vec())]);
    nothing_more(&mut late, 4, "late/b was deleted");

    // Cut off: A keeps a retained message to itself while NATS is down,
    // and B one of its own on late/a; once NATS is back, A offers its
    // messages: B takes late/d, and keeps its own late/a.
    nats.kill();
    a.wait_for_metric("echo_cluster_nats_connected", Duration::from_secs(10), |v| v == 0.0);
    b.wait_for_metric("echo_cluster_nats_connected", Duration::from_secs(10), |v| v == 0.0);
    publish_flags(&mut publisher, 5, "late/d", 1, true, b"four");
    let mut other = client(&b, 4, "other");
    publish_flags(&mut other, 4, "late/a", 1, true, b"b's own");
    expect(&mut late, 4, "late/a", b"b's own");
    let _nats = Nats::start_on(Some(nats.port));
    expect(&mut late, 4, "late/d", b"four");
    nothing_more(&mut late, 4, "what B holds is not overwritten");
    let mut check = client(&b, 4, "check");
    subscribe(&mut check, 4, "late/a", 0);
    expect(&mut check, 4, "late/a", b"b's own");
}

/// A NATS server that stops reading (frozen with SIGSTOP: the connection
/// stays up, nothing it is sent is taken) holds nothing up: the bridge's
/// buffer fills, what does not fit is dropped and counted, and the server
/// serves its clients meanwhile. Once NATS runs again, messages cross
/// again.
#[test]
fn a_frozen_nats_server_holds_nothing_up() {
    if !nats::available() {
        return;
    }
    let nats = Nats::start();
    let a = node_with(&nats, &[], &[("ECHO_CLUSTER_BUFFER", "16")]);
    let b = node(&nats, &[]);
    let mut publisher = client(&a, 4, "publisher");
    let mut local = client(&a, 4, "local");
    subscribe(&mut local, 4, "f/#", 1);
    let mut remote = client(&b, 4, "remote");
    subscribe(&mut remote, 4, "f/#", 0);
    bridged(&mut publisher, 4, &mut [&mut remote, &mut local], "f/probe");

    nats.pause();
    // 20 MB of publishes: more than the socket buffers and the NATS
    // client's own queue hold.
    let payload = vec![b'x'; 1024];
    for _ in 0..20_000 {
        publisher.send(&mqtt_raw::publish_qos(4, "f/flood", 0, 0, &payload));
    }
    let dropped = a.wait_for_metric(
        "echo_cluster_dropped_total{reason=\"buffer_full\"}",
        Duration::from_secs(20),
        |v| v > 0.0,
    );
    assert!(dropped > 0.0);
    // Served all along: a QoS 1 publish is acknowledged and delivered
    // locally, the admin port answers.
    local.drain(Duration::from_millis(300));
    publish(&mut publisher, 4, "f/marker", 1, b"still here");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received = next_publish(&mut local, 4, Duration::from_secs(5)).expect("the local delivery");
        if received.topic == "f/marker" {
            break;
        }
        assert!(Instant::now() < deadline, "the marker did not come");
    }
    assert_eq!(a.admin_get("/healthz").0, 200);

    nats.resume();
    remote.drain(Duration::from_millis(500));
    local.drain(Duration::from_millis(100));
    bridged(&mut publisher, 4, &mut [&mut remote], "f/probe");
}

/// A server starts whether NATS is up or not: it serves its own clients,
/// says 503 on /readyz, and joins the cluster when NATS comes.
#[test]
fn a_server_starts_without_nats_and_joins_when_it_comes() {
    if !nats::available() {
        return;
    }
    let mut gone = Nats::start();
    let (port, url) = (gone.port, gone.url());
    gone.kill();
    let a = TestServer::start_with_env(&[], &[("ECHO_CLUSTER_NATS_URL", &url)]);
    assert_eq!(a.metric("echo_cluster_nats_connected"), 0.0);
    assert_eq!(a.admin_get("/readyz").0, 503);
    let mut publisher = client(&a, 4, "publisher");
    let mut local = client(&a, 4, "local");
    subscribe(&mut local, 4, "s/#", 0);
    publish(&mut publisher, 4, "s/x", 0, b"served");
    expect(&mut local, 4, "s/x", b"served");

    let nats = Nats::start_on(Some(port));
    a.wait_for_metric("echo_cluster_nats_connected", Duration::from_secs(15), |v| v == 1.0);
    assert_eq!(a.admin_get("/readyz").0, 200);
    let b = node(&nats, &[]);
    let mut remote = client(&b, 4, "remote");
    subscribe(&mut remote, 4, "s/#", 0);
    bridged(&mut publisher, 4, &mut [&mut remote], "s/probe");
    // A's subscription, made before NATS was there, reaches it too.
    let mut back = client(&b, 4, "back");
    bridged(&mut back, 4, &mut [&mut local], "s/back");
}

/// The same client id connecting to the other server takes the session
/// over: the first connection gets DISCONNECT 0x8E (MQTT 5) and is closed.
#[test]
fn a_client_id_connecting_on_the_other_server_takes_the_session_over() {
    if !nats::available() {
        return;
    }
    let nats = Nats::start();
    let (a, b) = (node(&nats, &[]), node(&nats, &[]));
    let mut first = client(&a, 5, "same-id");
    let mut bystander = client(&a, 5, "other-id");
    let _second = client(&b, 5, "same-id");
    let disconnect = first.read_packet().expect("a DISCONNECT");
    assert_eq!((disconnect.packet_type(), disconnect.disconnect_reason()), (14, 0x8e), "{disconnect:?}");
    assert!(first.closed_within(Duration::from_secs(5)));
    a.wait_for_metric("echo_cluster_remote_takeovers_total", Duration::from_secs(5), |v| v == 1.0);
    assert_eq!(a.metric("echo_mqtt_closed_total{reason=\"taken_over\"}"), 1.0);
    // Another id is left alone.
    bystander.send(&mqtt_raw::PINGREQ);
    assert_eq!(bystander.read_packet().expect("a PINGRESP").packet_type(), 13);
    assert_eq!(b.metrics().get("echo_cluster_remote_takeovers_total").copied().unwrap_or(0.0), 0.0);
}

/// `--workers 2` with a NATS URL: each worker's broker is bridged to the
/// other's, so a publish reaches subscribers whichever worker the kernel
/// gave them.
#[test]
fn two_workers_share_their_subscribers() {
    if !nats::available() {
        return;
    }
    let mut nats = Nats::start();
    let server = TestServer::start_with_env(&["--workers", "2"], &[("ECHO_CLUSTER_NATS_URL", &nats.url())]);
    let connected = |server: &TestServer| {
        let metrics = server.metrics();
        ["0", "1"].map(|w| metrics.get(&format!("echo_cluster_nats_connected{{worker=\"{w}\"}}")).copied())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while connected(&server) != [Some(1.0), Some(1.0)] {
        assert!(Instant::now() < deadline, "the workers did not connect to NATS");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut publisher = client(&server, 4, "publisher");
    // Subscribers until both workers have some (the kernel spreads
    // connections by their addresses).
    let mut subscribers = Vec::new();
    loop {
        let mut s = client(&server, 4, &format!("s{}", subscribers.len()));
        subscribe(&mut s, 4, "w/#", 0);
        subscribers.push(s);
        let metrics = server.metrics();
        let sessions = |w: &str| {
            metrics
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("echo_mqtt_connections{") && k.contains(&format!("worker=\"{w}\""))
                })
                .map(|(_, v)| v)
                .sum::<f64>()
        };
        if subscribers.len() >= 4 && sessions("0") >= 1.0 && sessions("1") >= 1.0 {
            break;
        }
        assert!(subscribers.len() < 40, "the kernel put every connection on one worker");
    }
    let mut all: Vec<&mut RawMqtt> = subscribers.iter_mut().collect();
    bridged(&mut publisher, 4, &mut all, "w/probe");
    publish(&mut publisher, 4, "w/x", 0, b"to all");
    for s in &mut subscribers {
        expect(s, 4, "w/x", b"to all");
        nothing_more(s, 4, "once");
    }
    let crossed: f64 = server
        .metrics()
        .iter()
        .filter(|(k, _)| k.starts_with("echo_cluster_messages_total{") && k.contains("direction=\"in\""))
        .map(|(_, v)| v)
        .sum();
    assert!(crossed >= 1.0, "no message crossed between the workers");

    // NATS gone: the supervisor's /readyz says which workers are not
    // ready, and why.
    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = server.admin_get("/readyz");
        // (One worker may notice before the other: "1 of 2" for a moment.)
        if (status, body.as_str())
            == (503, "0 of 2 workers ready\ncluster: NATS unreachable (cluster.nats_url)\n")
        {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still {status} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two clusters with their own subject prefix on one NATS server do not
/// see each other's messages.
#[test]
fn clusters_with_their_own_prefix_share_a_nats_server() {
    if !nats::available() {
        return;
    }
    let nats = Nats::start();
    let a = node(&nats, &[]);
    let other = node_with(&nats, &[], &[("ECHO_CLUSTER_SUBJECT_PREFIX", "other.cluster")]);
    let b = node(&nats, &[]);
    let mut publisher = client(&a, 4, "publisher");
    let mut same = client(&b, 4, "same");
    subscribe(&mut same, 4, "p/#", 0);
    let mut apart = client(&other, 4, "apart");
    subscribe(&mut apart, 4, "p/#", 0);
    bridged(&mut publisher, 4, &mut [&mut same], "p/probe");
    publish(&mut publisher, 4, "p/x", 0, b"ours");
    expect(&mut same, 4, "p/x", b"ours");
    nothing_more(&mut apart, 4, "another cluster's message");
}

#[test]
fn a_bad_nats_url_names_the_key_and_exits_2_before_binding() {
    for (key, value) in
        [("ECHO_CLUSTER_NATS_URL", "http://127.0.0.1:4222"), ("ECHO_CLUSTER_SUBJECT_PREFIX", "a..b")]
    {
        let (status, _, stderr) =
            run_to_exit(&["--ws-listen", "127.0.0.1:0", "--no-mqtt", "--no-admin"], &[(key, value)]);
        assert_eq!(status.code(), Some(2), "{stderr}");
        let name = key.trim_start_matches("ECHO_CLUSTER_").to_ascii_lowercase();
        assert!(stderr.contains(&format!("cluster.{name}")), "{stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");
    }
}
