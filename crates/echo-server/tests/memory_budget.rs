//! The server-wide memory budget (`server.memory_limit`, `budget.rs`): a
//! crowd of clients, each within its own caps, fills it; then the server
//! refuses whatever would take more (with each protocol's answer), keeps
//! serving what it already holds, stays under the limit, and takes new
//! work again once the crowd lets go.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt};
use common::raw::RawClient;

const LIMIT: u64 = 96 << 20;

fn refused(server: &TestServer, what: &str) -> f64 {
    server.metric(&format!("echo_memory_refusals_total{{what=\"{what}\"}}"))
}

/// A client that keeps QoS 2 publishes unreleased: each holds Receive
/// Maximum (32) × the payload in the router, allowed by every per-client
/// cap. Returns the reason codes of its PUBRECs, up to the first publish
/// that was not answered within a second (`None` then: it was not read).
fn hoard(c: &mut RawMqtt, payload: &[u8]) -> (Vec<u8>, Option<u16>) {
    c.stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut codes = Vec::new();
    for pkid in 1..=32u16 {
        c.send(&mqtt_raw::publish_qos(5, "hoard", 2, pkid, payload));
        let Some(pubrec) = c.read_packet() else {
            return (codes, Some(pkid));
        };
        assert_eq!((pubrec.packet_type(), pubrec.pkid()), (5, pkid), "{pubrec:?}");
        // MQTT 5 §3.5.2.1: no reason code means success.
        codes.push(pubrec.body.get(2).copied().unwrap_or(0));
    }
    c.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (codes, None)
}

#[test]
fn a_crowd_fills_the_budget_then_is_refused_and_the_server_stays_under_it() {
    let server = TestServer::start_with_env(&[], &[("ECHO_SERVER_MEMORY_LIMIT", &LIMIT.to_string())]);
    assert_eq!(server.metric("echo_memory_limit_bytes"), LIMIT as f64);
    let mut bystander = RawMqtt::session(server.mqtt_addr(), 5, "bystander", 0);
    bystander.send(&mqtt_raw::subscribe(5, 1, "news"));
    assert_eq!(bystander.read_packet().unwrap().suback_codes(5), vec![0]);
    let mut old = RawMqtt::session(server.mqtt_addr(), 4, "bystander-3.1.1", 0);
    // Connected before the budget is spent: it asks for an event stream after.
    let mut http = common::HttpConn::connect(server.ws_addr());
    // A QoS 2 publish the router holds until its PUBREL.
    bystander.send(&mqtt_raw::publish_qos(5, "news", 2, 20, b"held"));
    let pubrec = bystander.read_packet().unwrap();
    assert_eq!((pubrec.packet_type(), pubrec.pkid(), pubrec.body.get(2)), (5, 20, None));

    let hoarders = spend(&server);
    assert!(hoarders.len() >= 2, "one hoarder alone fits the budget");
    let peak = server.rss_bytes();
    println!(
        "budget spent at hoarder {}; RSS {} MiB of {} MiB (heap {} MiB)",
        hoarders.len(),
        peak >> 20,
        LIMIT >> 20,
        server.metric("echo_memory_heap_bytes") as u64 >> 20
    );
    assert!(peak < LIMIT, "RSS {} MiB over the {} MiB limit", peak >> 20, LIMIT >> 20);

    // Spent: new sessions, subscriptions and WebSocket connections are
    // refused, each the way its protocol says.
    let mut late = RawMqtt::connect(server.mqtt_addr());
    late.send(&mqtt_raw::connect(5, "late-5", 0));
    assert_eq!(late.read_packet().unwrap().connack_code(), 0x97, "MQTT 5: quota exceeded");
    let mut late = RawMqtt::connect(server.mqtt_addr());
    late.send(&mqtt_raw::connect(4, "late-4", 0));
    assert_eq!(late.read_packet().unwrap().connack_code(), 3, "3.1.1: server unavailable");
    assert!(refused(&server, "connect") >= 2.0);
    let (status, body) = common::http_get(server.ws_addr(), "/");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("memory limit"), "{body}");
    assert!(refused(&server, "websocket") >= 1.0);
    http.send(b"GET /.sse HTTP/1.1\r\nHost: test\r\n\r\n");
    let events = http.read_response(false);
    assert_eq!((events.status, events.header("retry-after")), (503, Some("1")), "{}", events.text());
    assert_eq!(refused(&server, "sse"), 1.0);
    bystander.send(&mqtt_raw::subscribe(5, 2, "more"));
    assert_eq!(bystander.read_packet().unwrap().suback_codes(5), vec![0x97]);
    // A QoS 2 publish: PUBREC 0x97, which ends that exchange (§4.3.3). A
    // PUBREL for it all the same names no exchange (PUBCOMP 0x92) and
    // releases nothing: publish 20 is still held, until its own PUBREL.
    bystander.send(&mqtt_raw::publish_qos(5, "news", 2, 21, b"refused"));
    let pubrec = bystander.read_packet().unwrap();
    assert_eq!((pubrec.packet_type(), pubrec.pkid(), pubrec.body.get(2)), (5, 21, Some(&0x97)));
    bystander.send(&mqtt_raw::ack(0x62, 21));
    let pubcomp = bystander.read_packet().unwrap();
    assert_eq!((pubcomp.packet_type(), pubcomp.pkid(), pubcomp.body.get(2)), (7, 21, Some(&0x92)));
    assert!(bystander.silent_for(Duration::from_millis(300)), "publish 20 is not released");
    bystander.send(&mqtt_raw::ack(0x62, 20));
    let mut released: Vec<(u8, u16)> = (0..2)
        .map(|_| bystander.read_packet().unwrap())
        .map(|p| (p.packet_type(), if p.packet_type() == 7 { p.pkid() } else { 0 }))
        .collect();
    released.sort_unstable();
    assert_eq!(released, [(3, 0), (7, 20)], "its PUBCOMP, and its delivery to the subscriber");
    // What is held keeps working: a ping, and an unsubscribe.
    bystander.send(&[0xc0, 0]);
    assert_eq!(bystander.read_packet().unwrap().packet_type(), 13);
    bystander.send(&mqtt_raw::unsubscribe_all(5, 3, &["news"]));
    assert_eq!(bystander.read_packet().unwrap().packet_type(), 11);
    // A publish at QoS 1: MQTT 5 gets PUBACK 0x97; 3.1.1 cannot be told
    // no but by closing.
    bystander.send(&mqtt_raw::publish_qos(5, "news", 1, 9, b"x"));
    let puback = bystander.read_packet().unwrap();
    assert_eq!((puback.packet_type(), puback.pkid(), puback.body.get(2)), (4, 9, Some(&0x97)));
    // Whole packets are taken however many are buffered (here 100 KB of
    // them in one write): only a packet half-way through waits.
    let burst: Vec<u8> =
        (10..60).flat_map(|pkid| mqtt_raw::publish_qos(5, "news", 1, pkid, &[b'b'; 2000])).collect();
    bystander.send(&burst);
    for pkid in 10..60 {
        let puback = bystander.read_packet().expect("a PUBACK for every publish of the burst");
        assert_eq!((puback.packet_type(), puback.pkid(), puback.body.get(2)), (4, pkid, Some(&0x97)));
    }
    old.send(&mqtt_raw::publish_qos(4, "news", 1, 9, b"x"));
    assert!(old.closed_within(Duration::from_secs(5)), "the 3.1.1 publisher is closed");
    server.wait_for_log(Duration::from_secs(5), |line| line.to_string().contains("memory budget spent"));
    let warnings = server.log_text().matches("memory budget spent").count();
    assert_eq!(warnings, 1, "one warning for the episode");

    // The crowd leaves: its sessions end, and the room comes back.
    drop(hoarders);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = RawMqtt::connect(server.mqtt_addr());
        again.send(&mqtt_raw::connect(5, "again", 0));
        if again.read_packet().unwrap().connack_code() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the budget never had room again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(common::http_get(server.ws_addr(), "/").0, 200);
}

/// Spends the budget with clients each holding 32 unreleased QoS 2
/// publishes of 60 KB (each read whole, under `budget::PAUSE_PARTIAL`),
/// until one is refused; returns them (dropping them gives it all back).
fn spend(server: &TestServer) -> Vec<RawMqtt> {
    let payload = vec![b'h'; 60_000];
    let mut hoarders = Vec::new();
    for n in 0..100 {
        let mut c = RawMqtt::connect(server.mqtt_addr());
        c.send(&mqtt_raw::connect(5, &format!("hoarder-{n}"), 0));
        if c.read_packet().expect("a CONNACK").connack_code() == 0x97 {
            return hoarders;
        }
        let (codes, _) = hoard(&mut c, &payload);
        hoarders.push(c);
        if codes.contains(&0x97) {
            return hoarders;
        }
    }
    panic!("a hundred hoarders of 2 MB each spend a 96 MiB budget");
}

/// Sends the first half of a 900 KB QoS 1 publish; returns the whole.
fn half_a_publish(c: &mut RawMqtt) -> Vec<u8> {
    use std::io::Write;
    let publish = mqtt_raw::publish_qos(5, "big", 1, 7, &vec![b'b'; 900 * 1000]);
    c.stream.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    c.stream.write_all(&publish[..publish.len() / 2]).expect("the kernel buffers take half");
    publish
}

/// A client half-way through a large publish while the budget is spent is
/// not read further: the rest of its packet waits in the kernel, so a
/// crowd of such clients adds nothing the budget did not allow. Once there
/// is room, it is read on and answered.
#[test]
fn a_large_packet_is_not_read_further_while_the_budget_is_spent() {
    let server = TestServer::start_with_env(&[], &[("ECHO_SERVER_MEMORY_LIMIT", &LIMIT.to_string())]);
    let mut big = RawMqtt::session(server.mqtt_addr(), 5, "big", 0);
    let hoarders = spend(&server);
    // The heap the server's allocator counts, not RSS: malloc grows its
    // arena in 128 KiB steps, which made RSS growth land either side of
    // any bound close to the half packet (439 KiB).
    let heap = server.metric("echo_memory_heap_bytes") as u64;
    let publish = half_a_publish(&mut big);
    server.wait_for_metric("echo_memory_refusals_total{what=\"read\"}", Duration::from_secs(5), |n| n >= 1.0);
    std::thread::sleep(Duration::from_millis(500));
    let grown = (server.metric("echo_memory_heap_bytes") as u64).saturating_sub(heap);
    println!("paused at {} MiB of heap; grew {} KiB", heap >> 20, grown >> 10);
    assert!(grown < 300 * 1024, "the server read on: {} KiB", grown >> 10);
    big.stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(big.read_packet().is_none(), "no answer while paused");
    // The crowd leaves: the rest is read, and the publish answered.
    drop(hoarders);
    use std::io::Write;
    big.stream.write_all(&publish[publish.len() / 2..]).unwrap();
    big.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let puback = big.read_packet().expect("the PUBACK once there is room");
    assert_eq!((puback.packet_type(), puback.pkid()), (4, 7), "{puback:?}");
}

/// A client kept paused longer than `budget::PAUSE_LIMIT` is closed (MQTT
/// 5: DISCONNECT 0x97): one that walked away with the rest of its packet
/// unsent never closes its end (its FIN waits behind that data), and what
/// its session held would count against the budget for ever.
#[test]
fn a_client_paused_too_long_is_closed() {
    let server = TestServer::start_with_env(&[], &[("ECHO_SERVER_MEMORY_LIMIT", &LIMIT.to_string())]);
    let mut big = RawMqtt::session(server.mqtt_addr(), 5, "big", 0);
    let _hoarders = spend(&server);
    half_a_publish(&mut big);
    big.stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = Instant::now();
    let disconnect = big.read_packet().expect("a DISCONNECT");
    println!("closed after {:?} paused", started.elapsed());
    assert_eq!(disconnect.disconnect_reason(), 0x97);
    assert!(big.closed_within(Duration::from_secs(5)));
    assert_eq!(server.metric("echo_mqtt_closed_total{reason=\"memory_limit\"}"), 1.0);
}

/// The same for a WebSocket echo client half-way through a large message:
/// not read further while the budget is spent, echoed once there is room;
/// kept paused too long, closed with 1013 (try again later).
#[test]
fn a_websocket_message_half_way_waits_for_room_then_is_echoed_or_closed() {
    let server = TestServer::start_with_env(&[], &[("ECHO_SERVER_MEMORY_LIMIT", &LIMIT.to_string())]);
    let mut waits = RawClient::connect(server.ws_addr());
    let mut gives_up = RawClient::connect(server.ws_addr());
    let message = vec![b'w'; 900 * 1000];
    let frame = RawClient::frame(true, 2, &message, true);
    let (head, rest) = frame.split_at(frame.len() / 2);
    let hoarders = spend(&server);
    waits.send_raw(head);
    server.wait_for_metric("echo_memory_refusals_total{what=\"read\"}", Duration::from_secs(5), |n| n >= 1.0);
    waits.stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(waits.stream.peek(&mut [0u8; 1]).is_err(), "no echo while paused");
    // The crowd leaves: the message is read on and echoed whole.
    drop(hoarders);
    waits.send_raw(rest);
    waits.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let echo = waits.read_frame().expect("the echo once there is room");
    assert_eq!((echo.opcode, echo.payload.len()), (2, message.len()));
    // Kept paused: closed with 1013 after budget::PAUSE_LIMIT.
    let _hoarders = spend(&server);
    gives_up.send_raw(head);
    gives_up.stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    assert_eq!(gives_up.read_close_code(), Some(1013));
    assert_eq!(server.metric("echo_websocket_closed_total{reason=\"memory_limit\"}"), 1.0);
}
