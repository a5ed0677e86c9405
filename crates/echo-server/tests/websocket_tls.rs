//! TLS on the WebSocket/HTTP port (`websocket.tls_cert`, `websocket.tls_key`)
//! against the real server: everything the plain port serves, over `wss://`
//! and `https://` (the echo, the HTTP echo, the page, Server-Sent Events,
//! MQTT over WebSocket); clients that stall in the TLS handshake dropped at
//! `handshake_timeout` while others are served; plain clients refused
//! without harm to anyone else; unusable files stopping the start. The
//! certificate is self-signed, made with `openssl` (skips loudly when it is
//! missing, unless `REQUIRE_TEST_TOOLS=1`).

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use common::tls::{self, self_signed};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A server with TLS on the WebSocket port (and `env`), and its
/// certificate's path; `None` (skipping) without `openssl`.
fn start(name: &str, env: &[(&str, &str)]) -> Option<(TestServer, String)> {
    let dir = std::env::temp_dir().join(format!("echo-ws-tls-{name}-{}", std::process::id()));
    let (cert, key) = self_signed(&dir)?;
    let mut all = vec![("ECHO_WEBSOCKET_TLS_CERT", cert.as_str()), ("ECHO_WEBSOCKET_TLS_KEY", key.as_str())];
    all.extend_from_slice(env);
    Some((TestServer::start_with_env(&[], &all), cert))
}

/// A `wss://` connection trusting only `cert`, offering `subprotocol`.
async fn wss(server: &TestServer, cert: &str, subprotocol: Option<&str>) -> Wss {
    let tls = tls::connect(server.ws_addr(), cert).await;
    let mut request = format!("wss://{}/", server.ws_addr()).into_client_request().unwrap();
    if let Some(name) = subprotocol {
        request.headers_mut().insert("Sec-WebSocket-Protocol", name.parse().unwrap());
    }
    tokio_tungstenite::client_async(request, tls).await.expect("wss:// handshake").0
}

async fn echoes(ws: &mut Wss, message: Message) {
    ws.send(message.clone()).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo, message);
}

/// One `https://` request (it should ask to close): the whole answer.
async fn https(server: &TestServer, cert: &str, request: &str) -> String {
    let mut tls = tls::connect(server.ws_addr(), cert).await;
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // The server ends with close_notify, so the end of the answer is clean.
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await.unwrap().unwrap();
    String::from_utf8(answer).unwrap()
}

#[tokio::test]
async fn everything_the_port_serves_works_over_tls() {
    let Some((server, cert)) = start("all", &[("ECHO_WEBSOCKET_SSE_INTERVAL", "50ms")]) else { return };
    let listening = server.wait_for_log(Duration::from_secs(5), |v| v["protocol"] == "websocket");
    assert_eq!(listening["tls"], true, "{listening}");

    // The echo, small and large (a large echo is written past tungstenite,
    // and more than a TLS record, and the socket's buffer, can take).
    let mut ws = wss(&server, &cert, None).await;
    echoes(&mut ws, Message::text("sealed hello")).await;
    echoes(&mut ws, Message::binary(vec![7u8; 300_000])).await;

    // The HTTP echo, the page, and the root for a browser.
    let answer = https(
        &server,
        &cert,
        "POST /over/tls?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/json\r\n\
         Content-Length: 4\r\nConnection: close\r\n\r\nbody",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!((echo["path"].as_str(), echo["query"].as_str()), (Some("/over/tls"), Some("x=1")));
    assert_eq!(echo["body"], "body");
    for target in ["/.ws", "/"] {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: a\r\nAccept: text/html\r\nConnection: close\r\n\r\n");
        let answer = https(&server, &cert, &request).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.contains("text/html"), "{target}: {answer}");
        assert!(
            answer.contains("location.protocol === \"https:\" ? \"wss:\""),
            "the page picks wss:// itself"
        );
    }

    // Server-Sent Events, event after event through rustls.
    let mut events = tls::connect(server.ws_addr(), &cert).await;
    events.write_all(b"GET /.sse HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("id: 3\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), events.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&chunk[..n]);
    }
    let seen = String::from_utf8(seen).unwrap();
    assert!(
        seen.contains("text/event-stream") && seen.contains("id: 1\n") && seen.contains("id: 2\n"),
        "{seen}"
    );
    drop(events);
    server.wait_for_metric("echo_sse_closed_total{reason=\"client_left\"}", Duration::from_secs(5), |n| {
        n == 1.0
    });

    // MQTT over WebSocket over TLS: CONNECT, CONNACK.
    let mut mqtt = wss(&server, &cert, Some("mqtt")).await;
    mqtt.send(Message::binary(common::mqtt_raw::connect(4, "over-wss", 30))).await.unwrap();
    let connack = tokio::time::timeout(Duration::from_secs(5), mqtt.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(&connack.into_data()[..], &[0x20, 2, 0, 0], "CONNACK, accepted");

    // The echo session that went quiet in between still answers.
    echoes(&mut ws, Message::text("still here")).await;
    assert_eq!(server.metric("echo_websocket_upgrades_total"), 2.0);
}

/// A client that opens TCP and sends nothing, and one that sends half a
/// ClientHello, are dropped at `handshake_timeout`; meanwhile another
/// client connects over TLS and is echoed as if they were not there.
#[tokio::test]
async fn clients_stalling_in_the_tls_handshake_are_dropped_at_the_timeout() {
    let timeout = Duration::from_secs(1);
    let Some((server, cert)) = start("stall", &[("ECHO_WEBSOCKET_HANDSHAKE_TIMEOUT", "1s")]) else { return };
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.ws_addr()).await.unwrap();
    let mut half = TcpStream::connect(server.ws_addr()).await.unwrap();
    // A handshake record announcing 512 bytes, of which only the
    // ClientHello's first few come.
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).await.unwrap();

    let mut ws = wss(&server, &cert, None).await;
    echoes(&mut ws, Message::text("not held up")).await;
    assert!(started.elapsed() < timeout, "served while the others stall: {:?}", started.elapsed());

    for stalled in [&mut silent, &mut half] {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "dropped, not answered: {closed:?}");
    }
    let after = started.elapsed();
    assert!(after >= timeout - Duration::from_millis(100), "dropped at the timeout, not before: {after:?}");
    assert_eq!(server.metric("echo_websocket_handshake_failures_total{reason=\"tls_timeout\"}"), 2.0);
    echoes(&mut ws, Message::text("and after")).await;
}

/// `ws://` and `http://` to a TLS port fail at once, for that client alone.
#[tokio::test]
async fn plain_clients_on_a_tls_port_fail_cleanly_without_affecting_others() {
    let Some((server, cert)) = start("plain", &[]) else { return };
    let mut ws = wss(&server, &cert, None).await;
    echoes(&mut ws, Message::text("before")).await;

    let started = Instant::now();
    let tcp = TcpStream::connect(server.ws_addr()).await.unwrap();
    let plain = tokio_tungstenite::client_async(format!("ws://{}/", server.ws_addr()), tcp).await;
    assert!(plain.is_err(), "a plain upgrade is not served on a TLS port");
    let mut http = TcpStream::connect(server.ws_addr()).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), http.read_to_end(&mut answer)).await.unwrap();
    assert!(!answer.starts_with(b"HTTP/"), "no plain HTTP answer on a TLS port");
    assert!(started.elapsed() < Duration::from_secs(5), "refused at once, not at a timeout");

    assert_eq!(server.metric("echo_websocket_handshake_failures_total{reason=\"tls\"}"), 2.0);
    echoes(&mut ws, Message::text("after")).await;
}

/// Shutdown over TLS: an echo session gets its close 1001, an event
/// stream its last chunk, each then a clean TLS close.
#[tokio::test]
async fn shutdown_closes_tls_sessions_and_streams_cleanly() {
    let Some((mut server, cert)) = start("shutdown", &[]) else { return };
    let mut ws = wss(&server, &cert, None).await;
    echoes(&mut ws, Message::text("before shutdown")).await;
    let mut events = tls::connect(server.ws_addr(), &cert).await;
    events.write_all(b"GET /.sse HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut head = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), events.read(&mut head)).await.unwrap().unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200 OK"));

    server.signal(libc::SIGTERM);
    let close = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    let Message::Close(Some(frame)) = close else { panic!("a close frame, got {close:?}") };
    assert_eq!(u16::from(frame.code), 1001);
    // Reading on sends the answer to the close; the stream then ends.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), events.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(
        rest.ends_with(b"0\r\n\r\n"),
        "the last chunk, then close_notify: {:?}",
        String::from_utf8_lossy(&rest)
    );
    drop((ws, events));
    assert!(server.wait(Duration::from_secs(10)).success());
}

#[test]
fn unusable_tls_files_stop_the_start_naming_the_key() {
    tls::unusable_files_stop_the_start("websocket");
}
