//! End to end for MQTT: against Mosquitto (Debian's `mosquitto`, which
//! `.ci/run` installs) for QoS 0/1/2, MQTT 5 and fan-out, and against a tiny
//! faulty broker built here for injected faults.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use echo_loadgen::mqtt_codec::{self as codec, Packet};
use echo_loadgen::scenario::MqttVersion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    if !echo_server_has_mqtt() {
        eprintln!("*** SKIPPED: this echo-server has no MQTT listener yet (no --mqtt-listen) ***");
        return;
    }
    let server = EchoServer::start_with(&["--mqtt-listen", "127.0.0.1:0"]);
    let url = format!("mqtt://{}", server.mqtt.expect("mqtt address logged"));
    let metrics = server.metrics_url();
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

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Flip a byte of every third delivery.
    CorruptEveryThird,
    /// After this many deliveries, send DISCONNECT (as MQTT 5 brokers may).
    DisconnectAfter(u64),
}

/// A broker that only knows the echo pattern: every PUBLISH goes back to
/// the client that sent it (QoS 0), with a fault after the first message.
fn faulty_broker(fault: Fault) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    let mut n = 0u64;
                    loop {
                        // CONNECT and SUBSCRIBE are not decoded by the client codec
                        // (a client never receives them): answer by packet type.
                        while buf.len() >= 2 {
                            let first = buf[0];
                            let Some(len) = remaining(&buf) else { break };
                            if first >> 4 != 3 {
                                let packet = buf.split_to(len);
                                let mut out = Vec::new();
                                match first >> 4 {
                                    1 => out.extend_from_slice(&[0x20, 2, 0, 0]),
                                    8 => out.extend_from_slice(&[0x90, 3, packet[2], packet[3], 0]),
                                    12 => out.extend_from_slice(&[0xD0, 0]),
                                    14 => return,
                                    _ => {}
                                }
                                if tcp.write_all(&out).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            let Ok(Some(Packet::Publish { payload, .. })) =
                                codec::decode(&mut buf, MqttVersion::V311)
                            else {
                                return;
                            };
                            let mut payload = payload.to_vec();
                            match fault {
                                Fault::CorruptEveryThird if n % 3 == 2 => payload[30] ^= 1,
                                Fault::DisconnectAfter(k) if n == k => {
                                    let _ = tcp.write_all(&[0xE0, 0]).await;
                                    return;
                                }
                                _ => {}
                            }
                            n += 1;
                            // The echo pattern's topic is the client's own; the
                            // loadgen checks content, not the topic name.
                            let mut out = Vec::new();
                            codec::publish(&mut out, MqttVersion::V311, "t", 0, 0, &payload);
                            if tcp.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                        buf.reserve(4096);
                        match tcp.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
    });
    addr
}

/// Length of the whole packet at the front of `buf`, if it is all there.
fn remaining(buf: &BytesMut) -> Option<usize> {
    let mut len = 0usize;
    for i in 1..5 {
        let b = *buf.get(i)?;
        len |= ((b & 0x7f) as usize) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return (buf.len() >= i + 1 + len).then_some(i + 1 + len);
        }
    }
    None
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
