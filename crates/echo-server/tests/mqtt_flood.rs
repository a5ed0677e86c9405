//! One MQTT client sending publishes as fast as it can, over TCP, TLS and
//! WebSocket, beside a WebSocket client echoing every few milliseconds and
//! the admin port's health check: the flood must not hold the event loop.
//!
//! Before sessions took bounded turns, a plain TCP flood held the loop for
//! as long as it lasted (its socket was always readable, and a readiness
//! wait followed by `try_read` never spends tokio's cooperative budget):
//! the bystander's echoes and `/healthz` waited seconds. The figure the
//! issue asks for (bystander p99 within 10 ms) is a benchmark's, measured by
//! `loadtest/hostile.sh` on a release build; this test holds the line that
//! separates "served in between" from "frozen", with room for a debug build
//! on a busy machine.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::mqtt_raw;
use common::tls::{self, self_signed};
use common::{TestServer, http_get};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// How long each flood lasts.
const FLOOD: Duration = Duration::from_secs(2);
/// The longest a bystander's echo or a health check may take during a
/// flood: far above what a served-in-between loop gives even in a debug
/// build, far below the whole flood that a frozen loop gives.
const FROZEN: Duration = Duration::from_millis(400);

/// 5,000 QoS 0 publishes of 8 bytes to topic `t` (3.1.1), written at once.
fn flood_chunk() -> Vec<u8> {
    mqtt_raw::publish(4, "t", b"xxxxxxxx").repeat(5000)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Tls,
    WebSocket,
}

/// Connects, sends CONNECT, waits for the CONNACK, then writes publishes
/// until the flood is over; on a thread and runtime of its own, so that the
/// bystander's measurements are not the flooder's. Returns the publishes
/// written.
fn flood(transport: Transport, server: &TestServer, cert: Option<String>) -> std::thread::JoinHandle<u64> {
    let (mqtt, ws) = (server.mqtt_addr(), server.ws_url("/mqtt"));
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let connect = mqtt_raw::connect(4, &format!("flood-{transport:?}"), 60);
            let chunk = flood_chunk();
            let deadline = tokio::time::Instant::now() + FLOOD;
            let mut written = 0;
            match transport {
                Transport::Tcp | Transport::Tls => {
                    let mut stream: Box<dyn Io> = match transport {
                        Transport::Tcp => Box::new(TcpStream::connect(mqtt).await.unwrap()),
                        _ => Box::new(tls::connect(mqtt, cert.as_deref().unwrap()).await),
                    };
                    stream.write_all(&connect).await.unwrap();
                    let mut connack = [0; 4];
                    stream.read_exact(&mut connack).await.unwrap();
                    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK");
                    while let Ok(Ok(())) = tokio::time::timeout_at(deadline, stream.write_all(&chunk)).await {
                        written += 5000;
                    }
                }
                Transport::WebSocket => {
                    let mut request = ws.into_client_request().unwrap();
                    request.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
                    let (mut stream, _) = tokio_tungstenite::connect_async(request).await.unwrap();
                    stream.send(Message::binary(connect)).await.unwrap();
                    let connack = stream.next().await.unwrap().unwrap();
                    assert_eq!(connack.into_data().as_ref(), [0x20, 2, 0, 0], "CONNACK");
                    let message = Message::binary(chunk);
                    while let Ok(Ok(())) =
                        tokio::time::timeout_at(deadline, stream.send(message.clone())).await
                    {
                        written += 5000;
                    }
                }
            }
            written
        })
    })
}

/// Echoes a small message every 5 ms until `until`; returns every round
/// trip, in order.
async fn bystander(url: String, until: Instant) -> Vec<Duration> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut round_trips = Vec::new();
    while Instant::now() < until {
        let sent = Instant::now();
        ws.send(Message::text("still here?")).await.unwrap();
        let echo =
            tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("an echo within 30 s");
        assert_eq!(echo.unwrap().unwrap(), Message::text("still here?"));
        round_trips.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    round_trips
}

/// Health checks one after another until `until`; returns the slowest.
fn health_checks(admin: SocketAddr, until: Instant) -> Duration {
    let mut slowest = Duration::ZERO;
    while Instant::now() < until {
        let asked = Instant::now();
        assert_eq!(http_get(admin, "/healthz").0, 200);
        slowest = slowest.max(asked.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    slowest
}

async fn floods_beside_a_bystander(server: &TestServer, transport: Transport, cert: Option<String>) {
    let received = |s: &TestServer| s.metric("echo_mqtt_publishes_received_total");
    let before = received(server);
    let until = Instant::now() + FLOOD;
    let flooder = flood(transport, server, cert);
    let admin = server.admin_addr();
    let checks = std::thread::spawn(move || health_checks(admin, until));
    let round_trips = bystander(server.ws_url("/"), until).await;
    let written = flooder.join().expect("the flooder");
    let slowest_check = checks.join().unwrap();
    let mut sorted = round_trips.clone();
    sorted.sort();
    let p99 = sorted[sorted.len() * 99 / 100];
    let max = *sorted.last().unwrap();
    let routed = received(server) - before;
    eprintln!(
        "{transport:?} flood: {written} publishes written, {routed} read by the server; bystander: {} echoes, \
         p99 {p99:?}, max {max:?}; slowest health check {slowest_check:?}",
        round_trips.len()
    );
    assert!(routed >= 20_000.0, "{transport:?}: the flood did not reach the server ({routed} publishes)");
    assert!(max < FROZEN, "{transport:?}: a bystander's echo waited {max:?} behind the flood");
    assert!(slowest_check < FROZEN, "{transport:?}: a health check waited {slowest_check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_over_tcp_or_websocket_does_not_hold_the_event_loop() {
    let server = TestServer::start(&[]);
    floods_beside_a_bystander(&server, Transport::Tcp, None).await;
    floods_beside_a_bystander(&server, Transport::WebSocket, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_over_tls_does_not_hold_the_event_loop() {
    let dir = std::env::temp_dir().join(format!("echo-mqtt-flood-tls-{}", std::process::id()));
    let Some((cert, key)) = self_signed(&dir) else { return };
    let server =
        TestServer::start_with_env(&[], &[("ECHO_MQTT_TLS_CERT", &cert), ("ECHO_MQTT_TLS_KEY", &key)]);
    floods_beside_a_bystander(&server, Transport::Tls, Some(cert)).await;
}
