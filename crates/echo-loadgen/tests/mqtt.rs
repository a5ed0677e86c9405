//! End to end for MQTT: against Mosquitto (Debian's `mosquitto`, which
//! `.ci/run` installs) for QoS 0/1/2, MQTT 5 and fan-out, and against a tiny
//! faulty broker built here for injected faults.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use echo_mqtt_wire as codec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;

/// A Mosquitto on a free loopback port; killed on drop.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
}

impl Mosquitto {
    /// `None` when mosquitto is not installed and not required.
    fn start() -> Option<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(!tools_required(), "mosquitto is required (REQUIRE_TEST_TOOLS=1) but missing");
            eprintln!("*** SKIPPED: mosquitto is not installed (apt-get install mosquitto) ***");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = scratch(&format!("mosquitto-{port}"));
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nlog_dest stderr\nlog_type error\n"),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Mosquitto { child, addr })
    }

    fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn echo_pattern_counts_at_every_qos_and_version() {
    let Some(broker) = Mosquitto::start() else { return };
    let pid = broker.child.id().to_string();
    for (qos, version) in [("0", "3.1.1"), ("1", "3.1.1"), ("2", "5")] {
        let run = loadgen(
            "mqtt-echo",
            &[
                &broker.url(),
                "--steps",
                "10,30",
                "--hold",
                "2s",
                "--rate",
                "10",
                "--qos",
                qos,
                "--mqtt-version",
                version,
                "--server-pid",
                &pid,
            ],
        );
        assert_eq!(run.code(), 0, "qos {qos}: {}", run.stderr());
        for (i, want) in [(0, 10), (1, 30)] {
            let s = run.step(i);
            assert_eq!(u(&s["open_connections"]), want, "qos {qos}");
            let (sent, received) = (u(&s["hold"]["sent"]), u(&s["hold"]["received"]));
            assert!(sent >= want * 10 * 2 * 8 / 10, "qos {qos}: sent {sent}");
            assert!(sent.abs_diff(received) <= want * 2, "qos {qos}: sent {sent} received {received}");
            assert_eq!(u(&s["derived"]["errors"]), 0, "qos {qos}: {s}");
            assert!(u(&s["server"]["rss_bytes"]) > 0);
        }
    }
}

#[test]
fn fanout_delivers_each_message_to_every_subscriber() {
    let Some(broker) = Mosquitto::start() else { return };
    // Two groups of 1 publisher + 5 subscribers.
    let run = loadgen(
        "mqtt-fanout",
        &[
            &broker.url(),
            "--steps",
            "12",
            "--hold",
            "2s",
            "--rate",
            "20",
            "--pattern",
            "fanout",
            "--fanout",
            "5",
        ],
    );
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    let (sent, received) = (u(&s["hold"]["sent"]), u(&s["hold"]["received"]));
    assert!(sent >= 2 * 20 * 2 * 8 / 10, "{sent}");
    assert!(received.abs_diff(sent * 5) <= 20, "sent {sent}, received {received}");
    assert_eq!(u(&s["derived"]["errors"]), 0, "{s}");
}

#[test]
fn echo_pattern_against_echo_server_mqtt() {
    let server = echo_server(&[]);
    let url = format!("mqtt://{}", server.mqtt_addr());
    let metrics = server.admin_url("/metrics");
    for (qos, version) in [("0", "3.1.1"), ("1", "5"), ("2", "3.1.1")] {
        let run = loadgen(
            "echo-server-mqtt",
            &[
                &url,
                "--steps",
                "10,40",
                "--hold",
                "2s",
                "--rate",
                "10",
                "--qos",
                qos,
                "--mqtt-version",
                version,
                "--server-metrics",
                &metrics,
            ],
        );
        assert_eq!(run.code(), 0, "qos {qos}: {}", run.stderr());
        for (i, want) in [(0, 10), (1, 40)] {
            let s = run.step(i);
            assert_eq!(u(&s["open_connections"]), want, "qos {qos}");
            let (sent, received) = (u(&s["hold"]["sent"]), u(&s["hold"]["received"]));
            assert!(sent >= want * 10 * 2 * 8 / 10, "qos {qos}: sent {sent}");
            assert!(sent.abs_diff(received) <= want * 2, "qos {qos}: sent {sent} received {received}");
            assert_eq!(u(&s["derived"]["errors"]), 0, "qos {qos}: {s}");
            assert_eq!(u(&s["server"]["connections"]), want, "the server counts the same clients");
        }
    }
}

#[derive(Clone, Debug)]
enum Fault {
    /// Flip a byte of every third message a client publishes.
    CorruptEveryThird,
    /// After this many messages from a client, send it DISCONNECT (as MQTT 5 brokers may).
    DisconnectAfter(u64),
    /// After this many messages from a client, drop its TCP connection.
    DropAfter(u64),
    /// Before routing message `at` of a client, wait (everything behind it waits too).
    Stall { at: u64, millis: u64 },
    /// Route this many messages of a client, then read but never route again.
    SwallowAfter(u64),
    /// Route this many messages of a client, then never read from it again:
    /// the socket buffers fill and the client's writes block.
    StopReadingAfter(u64),
    /// Fan-out: drop these deliveries to these subscriptions.
    Withhold(Vec<Withhold>),
    /// Answer CONNECT and SUBSCRIBE, but stop reading at the first PUBLISH.
    NeverReadPublish,
}

/// Deliveries `from..to` (counted per subscription, from 0) to the
/// subscriptions chosen are dropped.
#[derive(Clone, Debug)]
struct Withhold {
    to_whom: Whom,
    from: u64,
    to: u64,
}

/// Subscriptions are numbered in the order they are made, leaving out the
/// generator's pre-run check (a topic with "/probe/"), which always gets
/// its message.
#[derive(Clone, Copy, Debug)]
enum Whom {
    Every,
    Nth(u64),
}

impl Fault {
    fn withholds(&self, subscription: Option<u64>, delivery: u64) -> bool {
        let (Fault::Withhold(list), Some(n)) = (self, subscription) else { return false };
        list.iter().any(|w| {
            matches!(w.to_whom, Whom::Every) || matches!(w.to_whom, Whom::Nth(k) if k == n)
        } && (w.from..w.to).contains(&delivery))
    }
}

/// A small broker: CONNECT, SUBSCRIBE (exact topics), PUBLISH at QoS 0
/// routed to every subscriber of its topic, PINGREQ, DISCONNECT; MQTT
/// 3.1.1. Faults apply to each client's messages from its second on (its
/// first may be the generator's pre-run check), and withheld deliveries
/// never touch the check's topic; `NeverReadPublish` is for the check
/// itself. Enough for the echo pattern (each client subscribes to its own
/// topic) and for fan-out.
fn faulty_broker(fault: Fault) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let broker = Broker::default();
            for conn in 0u64.. {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (broker, fault) = (broker.clone(), fault.clone());
                tokio::spawn(async move {
                    let (read, write) = tcp.into_split();
                    let out = Arc::new(tokio::sync::Mutex::new(write));
                    client(&broker, &fault, conn, read, out).await;
                    broker.subs.lock().unwrap().values_mut().for_each(|subs| subs.retain(|s| s.conn != conn));
                });
            }
        });
    });
    addr
}

type Out = Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>;

/// One subscription: the client that holds it, where its deliveries go,
/// its number (`None` for the pre-run check's) and its deliveries so far.
#[derive(Clone)]
struct Sub {
    conn: u64,
    out: Out,
    index: Option<u64>,
    delivered: Arc<AtomicU64>,
}

#[derive(Clone, Default)]
struct Broker {
    subs: Arc<Mutex<HashMap<String, Vec<Sub>>>>,
    subscriptions: Arc<AtomicU64>,
}

impl Broker {
    fn subscribe(&self, conn: u64, topic: String, out: Out) {
        let index = (!topic.contains("/probe/")).then(|| self.subscriptions.fetch_add(1, Ordering::SeqCst));
        let sub = Sub { conn, out, index, delivered: Arc::default() };
        self.subs.lock().unwrap().entry(topic).or_default().push(sub);
    }

    async fn route(&self, fault: &Fault, topic: &str, payload: &[u8]) {
        let subs = self.subs.lock().unwrap().get(topic).cloned().unwrap_or_default();
        let mut packet = Vec::new();
        codec::publish(&mut packet, 4, topic.as_bytes(), 0, 0, payload);
        for sub in subs {
            if fault.withholds(sub.index, sub.delivered.fetch_add(1, Ordering::SeqCst)) {
                continue;
            }
            // A subscriber that went away is no concern of the others.
            let _ = sub.out.lock().await.write_all(&packet).await;
        }
    }
}

async fn client(broker: &Broker, fault: &Fault, conn: u64, mut read: OwnedReadHalf, out: Out) {
    let mut buf = BytesMut::new();
    let mut n = 0u64;
    loop {
        while let Some((head, len)) = whole_packet(&buf) {
            let packet = buf.split_to(head + len);
            let body = &packet[head..];
            let reply: &[u8] = match packet[0] >> 4 {
                1 => &[0x20, 2, 0, 0],
                8 => {
                    // Packet id, then one filter: length, topic, options.
                    let topic_len = u16::from_be_bytes([body[2], body[3]]) as usize;
                    let topic = String::from_utf8_lossy(&body[4..4 + topic_len]).into_owned();
                    broker.subscribe(conn, topic, out.clone());
                    let _ = out.lock().await.write_all(&[0x90, 3, body[0], body[1], 0]).await;
                    continue;
                }
                12 => &[0xD0, 0],
                14 => return,
                3 => {
                    assert_eq!(packet[0] & 0x06, 0, "this broker knows QoS 0 only");
                    let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                    let topic = String::from_utf8_lossy(&body[2..2 + topic_len]).into_owned();
                    let mut payload = body[2 + topic_len..].to_vec();
                    match fault {
                        Fault::CorruptEveryThird if n % 3 == 2 => payload[30] ^= 1,
                        &Fault::DisconnectAfter(k) if n == k => {
                            let _ = out.lock().await.write_all(&[0xE0, 0]).await;
                            return;
                        }
                        &Fault::DropAfter(k) if n == k => return,
                        &Fault::StopReadingAfter(k) if n == k => std::future::pending().await,
                        &Fault::Stall { at, millis } if n == at => {
                            tokio::time::sleep(Duration::from_millis(millis)).await;
                        }
                        _ => {}
                    }
                    n += 1;
                    if !matches!(*fault, Fault::SwallowAfter(k) if n > k) {
                        broker.route(fault, &topic, &payload).await;
                    }
                    continue;
                }
                _ => &[],
            };
            if out.lock().await.write_all(reply).await.is_err() {
                return;
            }
        }
        if matches!(fault, Fault::NeverReadPublish) && buf.first().is_some_and(|b| b >> 4 == 3) {
            std::future::pending::<()>().await;
        }
        buf.reserve(4096);
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The header and body lengths of the whole packet at the front of `buf`,
/// once it is all there.
fn whole_packet(buf: &BytesMut) -> Option<(usize, usize)> {
    let (len, n) = codec::read_varint(buf.get(1..)?).ok()??;
    (buf.len() >= 1 + n + len).then_some((1 + n, len))
}

#[test]
fn a_changed_byte_in_a_delivery_is_an_echo_mismatch() {
    let url = format!("mqtt://{}", faulty_broker(Fault::CorruptEveryThird));
    let run = loadgen("mqtt-corrupt", &[&url, "--steps", "5", "--hold", "2s", "--rate", "20"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    let (mismatches, received) = (errors(s, "echo_mismatch"), u(&s["hold"]["received"]));
    assert!(mismatches >= 20, "{s}");
    assert!(received.abs_diff(mismatches * 2) <= 15, "received {received}, mismatches {mismatches}");
    assert_eq!(u(&s["hold"]["latency"]["count"]), received);
}

#[test]
fn a_broker_disconnect_is_closed_by_server() {
    let url = format!("mqtt://{}", faulty_broker(Fault::DisconnectAfter(3)));
    let run = loadgen("mqtt-disconnect", &[&url, "--steps", "5", "--hold", "2s", "--rate", "20"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    assert_eq!(errors(s, "closed_by_server"), 5, "{s}");
    assert_eq!(u(&s["open_connections"]), 0);
}

#[test]
fn a_stalled_delivery_shows_as_latency_of_every_message_behind_it() {
    // Message 30 of each client (~1.5 s in) waits 400 ms in the broker; the
    // messages scheduled behind it during the stall wait too.
    let url = format!("mqtt://{}", faulty_broker(Fault::Stall { at: 30, millis: 400 }));
    let run = loadgen("mqtt-stall", &[&url, "--steps", "5", "--hold", "3s", "--rate", "20"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    assert_eq!(u(&s["derived"]["errors"]), 0, "a stall shorter than the timeout is not an error: {s}");
    let lat = &s["hold"]["latency"];
    assert!(u(&lat["max_us"]) >= 390_000, "{lat}");
    // 20 msg/s: ~8 messages per client fall due during the stall, all
    // delayed: > 1% of ~300 samples, so p99 shows the stall.
    assert!(u(&lat["p99_us"]) >= 100_000, "{lat}");
    assert!(u(&lat["p50_us"]) < 50_000, "{lat}");
}

#[test]
fn a_dropped_tcp_connection_is_a_connection_error() {
    let url = format!("mqtt://{}", faulty_broker(Fault::DropAfter(5)));
    let run = loadgen("mqtt-drop", &[&url, "--steps", "5", "--hold", "2s", "--rate", "20"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    let dropped = errors(s, "connection_eof") + errors(s, "connection_reset");
    assert_eq!(dropped, 5, "{s}");
    assert_eq!(u(&s["derived"]["errors"]), 5, "{s}");
    assert_eq!(u(&s["open_connections"]), 0);
}

#[test]
fn a_delivery_that_never_comes_is_an_echo_timeout() {
    let url = format!("mqtt://{}", faulty_broker(Fault::SwallowAfter(5)));
    let run =
        loadgen("mqtt-swallow", &[&url, "--steps", "5", "--hold", "3s", "--rate", "20", "--timeout", "1s"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    assert_eq!(errors(s, "echo_timeout"), 5, "{s}");
    assert_eq!(u(&s["derived"]["errors"]), 5, "{s}");
    assert_eq!(u(&s["open_connections"]), 0);
}

#[test]
fn a_broker_that_stops_reading_is_a_write_stall_within_the_timeout() {
    // As for WebSocket (tests/faults.rs).
    let url = format!("mqtt://{}", faulty_broker(Fault::StopReadingAfter(1)));
    assert_write_stalls_are_errors("mqtt-stop-reading", &url);
}

/// Runs a fan-out of 2 groups (1 publisher + 5 subscribers each) against
/// `url` at 20 msg/s for 3 s, with a 1 s timeout.
fn fanout_run(name: &str, url: &str, extra: &[&str]) -> Run {
    let mut args = vec![url, "--steps", "12", "--hold", "3s", "--rate", "20", "--pattern", "fanout"];
    args.extend(["--fanout", "5", "--timeout", "1s"]);
    args.extend(extra);
    loadgen(name, &args)
}

#[test]
fn fanout_against_echo_server_mqtt_delivers_every_message_to_every_subscriber() {
    let server = echo_server(&[]);
    let url = format!("mqtt://{}", server.mqtt_addr());
    // Two steps, two workers: groups are dealt to workers whole, and the
    // second step's groups start while the first step's keep publishing.
    for (qos, version) in [("0", "3.1.1"), ("1", "5")] {
        let run = loadgen(
            "echo-server-fanout",
            &[
                &url,
                "--steps",
                "12,24",
                "--hold",
                "2s",
                "--rate",
                "20",
                "--pattern",
                "fanout",
                "--fanout",
                "5",
                "--workers",
                "2",
                "--qos",
                qos,
                "--mqtt-version",
                version,
            ],
        );
        assert_eq!(run.code(), 0, "qos {qos}: {}", run.stderr());
        for (i, groups) in [(0, 2), (1, 4)] {
            let s = run.step(i);
            assert_eq!(u(&s["open_connections"]), groups * 6, "qos {qos}");
            let (sent, received) = (u(&s["hold"]["sent"]), u(&s["hold"]["received"]));
            assert!(sent >= groups * 20 * 2 * 8 / 10, "qos {qos}: sent {sent}");
            // Every subscriber gets every message (a loss would be an
            // error); only those in flight at the edges of the hold differ,
            // at most a couple per group and edge.
            assert!(
                received.abs_diff(sent * 5) <= groups * 5 * 4,
                "qos {qos}: sent {sent}, received {received}"
            );
            assert_eq!(u(&s["derived"]["errors"]), 0, "qos {qos}: {s}");
        }
    }
}

#[test]
fn a_broker_that_never_delivers_to_subscribers_is_an_echo_timeout_for_each() {
    // It accepts SUBSCRIBE (and the pre-run check's message is delivered),
    // but no subscriber ever gets a message: 10 subscribers, 10 timeouts.
    let fault = Fault::Withhold(vec![Withhold { to_whom: Whom::Every, from: 0, to: u64::MAX }]);
    let url = format!("mqtt://{}", faulty_broker(fault));
    let run = fanout_run("fanout-never", &url, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    assert_eq!(errors(s, "echo_timeout"), 10, "{s}");
    assert_eq!(u(&s["derived"]["errors"]), 10, "{s}");
    assert_eq!(u(&s["hold"]["received"]), 0, "{s}");
    // The publishers go on; the subscribers are given up.
    assert_eq!(u(&s["open_connections"]), 2, "{s}");
}

#[test]
fn fanout_losses_at_the_head_and_the_tail_of_one_subscriber_are_counted() {
    // Subscription 0 misses the first 3 messages (before any message it
    // sees); subscription 7 gets 5 and then nothing more.
    let fault = Fault::Withhold(vec![
        Withhold { to_whom: Whom::Nth(0), from: 0, to: 3 },
        Withhold { to_whom: Whom::Nth(7), from: 5, to: u64::MAX },
    ]);
    let url = format!("mqtt://{}", faulty_broker(fault));
    let run = fanout_run("fanout-head-tail", &url, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    assert_eq!(errors(s, "echo_lost"), 3, "{s}");
    assert_eq!(errors(s, "echo_timeout"), 1, "{s}");
    assert_eq!(u(&s["derived"]["errors"]), 4, "{s}");
    assert_eq!(u(&s["open_connections"]), 11, "{s}");
    // The other nine subscribers get everything.
    let (sent, received) = (u(&s["hold"]["sent"]), u(&s["hold"]["received"]));
    assert!(received.abs_diff(sent * 5) <= sent / 2 + 20, "sent {sent}, received {received}");
}

#[test]
fn fanout_with_no_whole_group_is_refused_before_the_run() {
    let url = format!("mqtt://{}", faulty_broker(Fault::SwallowAfter(u64::MAX)));
    let too_few = loadgen("fanout-too-few", &[&url, "--steps", "5", "--pattern", "fanout", "--fanout", "10"]);
    assert_eq!(too_few.code(), 2, "{}", too_few.stderr());
    assert!(too_few.stderr().contains("less than one fan-out group"), "{}", too_few.stderr());
    assert!(too_few.stderr().contains("use --steps 11"), "{}", too_few.stderr());
    assert!(too_few.json.is_none(), "nothing was measured");
    let partial = loadgen("fanout-partial", &[&url, "--steps", "14", "--pattern", "fanout", "--fanout", "5"]);
    assert_eq!(partial.code(), 2, "{}", partial.stderr());
    assert!(
        partial.stderr().contains("subscribers without a publisher: use 12 or 18"),
        "{}",
        partial.stderr()
    );
}

#[test]
fn a_broker_that_never_reads_is_refused_before_the_run_not_waited_for() {
    // The pre-run check's message (16 MiB, more than the socket buffers
    // hold) cannot be written: a refusal within the connect timeout.
    let url = format!("mqtt://{}", faulty_broker(Fault::NeverReadPublish));
    let started = Instant::now();
    let run =
        loadgen("mqtt-never-reads", &[&url, "--steps", "1", "--size", "16777216", "--connect-timeout", "2s"]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("did not take a 16777216-byte message within"), "{}", run.stderr());
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}
