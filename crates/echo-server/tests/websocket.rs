//! End-to-end WebSocket tests: the real server binary, real sockets, a real
//! client (tokio-tungstenite) plus a raw client for malformed traffic.

mod common;

use std::time::Duration;

use common::TestServer;
use common::raw::RawClient;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer) -> Client {
    tokio_tungstenite::connect_async(server.ws_url("/")).await.expect("connects").0
}

/// Reads the next data message, skipping control frames.
async fn next_data(ws: &mut Client) -> Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(m @ (Message::Text(_) | Message::Binary(_) | Message::Close(_))))) => return m,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn echoes_text_binary_and_large_messages_byte_for_byte() {
    let server = TestServer::start(&[]);
    let mut ws = connect(&server).await;
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(256 * 40).collect();
    let large: Vec<u8> = (0..4 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let messages = vec![
        Message::Text("hello, echo".into()),
        Message::Text("ünïcödé ✓ 🚀".into()),
        Message::Text("".into()),
        Message::Binary(Bytes::from(every_byte)),
        Message::Binary(Bytes::new()),
        Message::Binary(Bytes::from(large)),
        Message::Text("x".repeat(70_000).into()),
    ];
    for message in &messages {
        ws.send(message.clone()).await.unwrap();
        assert_eq!(&next_data(&mut ws).await, message);
    }
    // Pipelined: many messages in flight, echoed in order.
    for i in 0..500 {
        ws.send(Message::Text(format!("msg {i}").into())).await.unwrap();
    }
    for i in 0..500 {
        assert_eq!(next_data(&mut ws).await, Message::Text(format!("msg {i}").into()));
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn fragmented_message_comes_back_as_one() {
    let server = TestServer::start(&[]);
    let mut raw = RawClient::connect(server.ws_addr());
    raw.send_frame(false, 1, b"frag");
    raw.send_frame(false, 0, "men".as_bytes());
    raw.send_frame(true, 9, b"ping inside"); // control frame between fragments
    raw.send_frame(true, 0, "ted ✓".as_bytes());
    let pong = raw.read_frame().unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (10, &b"ping inside"[..]));
    let echo = raw.read_frame().unwrap();
    assert!(echo.fin);
    assert_eq!(echo.opcode, 1);
    assert_eq!(echo.payload, "fragmented ✓".as_bytes());
    // A binary message split into 300 fragments, some empty.
    let payload: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<&[u8]> = payload.chunks(100).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 { 2 } else { 0 };
        raw.send_frame(false, opcode, chunk);
        if i % 50 == 0 {
            raw.send_frame(false, 0, b"");
        }
    }
    raw.send_frame(true, 0, b"");
    let echo = raw.read_frame().unwrap();
    assert_eq!((echo.fin, echo.opcode), (true, 2));
    assert_eq!(echo.payload, payload);
}

#[tokio::test]
async fn pings_are_answered_with_pongs() {
    let server = TestServer::start(&[]);
    let mut raw = RawClient::connect(server.ws_addr());
    for payload in [&b""[..], b"1", &[0xffu8; 125]] {
        raw.send_frame(true, 9, payload);
        let pong = raw.read_frame().unwrap();
        assert_eq!(pong.opcode, 10);
        assert_eq!(pong.payload, payload);
    }
}

#[tokio::test]
async fn client_close_is_answered_with_the_same_code() {
    let server = TestServer::start(&[]);
    for code in [1000u16, 1001, 3000, 4999] {
        let mut raw = RawClient::connect(server.ws_addr());
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        raw.send_frame(true, 8, &payload);
        let answer = raw.read_frame().expect("a close frame");
        assert_eq!(answer.close_code(), Some(code));
        assert!(raw.closed_within(Duration::from_secs(5)), "server closes TCP after the handshake");
    }
    // With the client library: a clean closing handshake.
    let mut ws = connect(&server).await;
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "done".into() })).await.unwrap();
    match next_data(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected close, got {other:?}"),
    }
    server.wait_for_metric(
        "echo_websocket_close_codes_received_total{code=\"1000\"}",
        Duration::from_secs(5),
        |v| v >= 2.0,
    );
}

#[tokio::test]
async fn protocol_violations_close_with_1002_and_spare_other_clients() {
    let server = TestServer::start(&[]);
    let mut bystander = connect(&server).await;
    let violations: Vec<(&str, Vec<u8>)> = vec![
        ("reserved opcode", RawClient::frame(true, 3, b"x", true)),
        ("unmasked frame", RawClient::frame(true, 1, b"x", false)),
        ("fragmented control frame", RawClient::frame(false, 9, b"x", true)),
        ("continuation without start", RawClient::frame(true, 0, b"x", true)),
        ("RSV bits set", {
            let mut f = RawClient::frame(true, 1, b"x", true);
            f[0] |= 0x40;
            f
        }),
        ("control frame over 125 bytes", RawClient::frame(true, 9, &[0u8; 126], true)),
    ];
    for (name, bytes) in violations {
        let mut raw = RawClient::connect(server.ws_addr());
        raw.send_raw(&bytes);
        assert_eq!(raw.read_close_code(), Some(1002), "{name}");
        assert!(raw.closed_within(Duration::from_secs(10)), "{name}: TCP closed");
        bystander.send(Message::Text(name.into())).await.unwrap();
        assert_eq!(next_data(&mut bystander).await, Message::Text(name.into()));
    }
    assert_eq!(server.metric("echo_websocket_closed_total{reason=\"protocol_error\"}"), 6.0);
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let server = TestServer::start(&[]);
    let mut raw = RawClient::connect(server.ws_addr());
    raw.send_frame(true, 1, &[b'o', b'k', 0xc3, 0x28]);
    assert_eq!(raw.read_close_code(), Some(1007));
    // Split across fragments, invalid only as a whole.
    let mut raw = RawClient::connect(server.ws_addr());
    raw.send_frame(false, 1, &[0xe2, 0x82]);
    raw.send_frame(true, 0, &[0x28]);
    assert_eq!(raw.read_close_code(), Some(1007));
}

#[tokio::test]
async fn oversized_messages_and_frames_close_with_1009() {
    let server = TestServer::start_with_env(
        &[],
        &[("ECHO_WEBSOCKET_MAX_MESSAGE_SIZE", "4096"), ("ECHO_WEBSOCKET_MAX_FRAME_SIZE", "1024")],
    );
    // One frame over max_frame_size: refused from its header alone.
    let mut raw = RawClient::connect(server.ws_addr());
    raw.send_raw(&RawClient::frame(true, 2, &[7u8; 2000], true));
    assert_eq!(raw.read_close_code(), Some(1009));
    // Fragments each under max_frame_size, together over max_message_size.
    let mut raw = RawClient::connect(server.ws_addr());
    for i in 0..5 {
        raw.send_frame(i == 4, if i == 0 { 2 } else { 0 }, &[1u8; 1000]);
    }
    assert_eq!(raw.read_close_code(), Some(1009));
    // Exactly at the limits is fine.
    let mut ws = connect(&server).await;
    let at_limit = Message::Binary(Bytes::from(vec![9u8; 1024]));
    ws.send(at_limit.clone()).await.unwrap();
    assert_eq!(next_data(&mut ws).await, at_limit);
    // A declared length of 2^63 is rejected without allocating it.
    let mut raw = RawClient::connect(server.ws_addr());
    let mut huge = vec![0x82, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_raw(&huge);
    assert_eq!(raw.read_close_code(), Some(1009));
    assert_eq!(server.metric("echo_websocket_closed_total{reason=\"message_too_big\"}"), 3.0);
}

#[tokio::test]
async fn plain_http_requests_get_proper_statuses() {
    let server = TestServer::start(&[]);
    let addr = server.ws_addr();
    let (status, head, body) =
        common::http_exchange(addr, b"GET /.ws HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("Content-Type: text/html"));
    assert!(body.contains("new WebSocket(") && body.contains("performance.now()"));
    assert!(!body.contains("http://") && !body.contains("https://"), "the page is self-contained");
    // Other plain requests are echoed (tests/http_echo.rs); what is not
    // HTTP, or is a bad upgrade, gets its status and a close.
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(), 400),
        (
            "huge header",
            format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000)).into_bytes(),
            431,
        ),
        (
            "old version",
            b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
                .to_vec(),
            426,
        ),
        (
            "no key",
            b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n"
                .to_vec(),
            400,
        ),
    ];
    for (name, request, expected) in cases {
        let (status, _, body) = common::http_exchange(addr, &request);
        assert_eq!(status, expected, "{name}: {body}");
        assert!(!body.trim().is_empty() && body.trim().lines().count() == 1, "{name}: one-line reason");
    }
    assert!(server.metric("echo_websocket_http_responses_total{status=\"431\"}") >= 1.0);
    assert!(server.metric("echo_websocket_handshake_failures_total{reason=\"refused\"}") >= 2.0);
}

/// The number of request headers is a limit of its own
/// (`websocket.max_request_headers`, 100 by default), checked well under
/// `max_request_header_size`: at the limit the upgrade succeeds, one more
/// header gets 431.
#[tokio::test]
async fn request_header_count_is_limited_by_configuration() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

    // The client library sends five headers of its own (Host, Connection,
    // Upgrade, Sec-WebSocket-Version, Sec-WebSocket-Key).
    async fn upgrade_with(server: &TestServer, total: usize) -> Result<Client, u16> {
        let mut request = server.ws_url("/").into_client_request().unwrap();
        for i in 0..total - 5 {
            let name = HeaderName::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap();
            request.headers_mut().insert(name, HeaderValue::from_static("y"));
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
            Err(other) => panic!("upgrade with {total} headers: {other}"),
        }
    }
    for (limit, env) in [(100, None), (12, Some("12"))] {
        let env: Vec<(&str, &str)> =
            env.map(|n| ("ECHO_WEBSOCKET_MAX_REQUEST_HEADERS", n)).into_iter().collect();
        let server = TestServer::start_with_env(&[], &env);
        let mut ws = upgrade_with(&server, limit).await.expect("at the limit the upgrade succeeds");
        ws.send(Message::Text("in".into())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::Text("in".into()));
        // One more: about 20 bytes more, far under the 8 KiB head size limit.
        assert_eq!(upgrade_with(&server, limit + 1).await.err(), Some(431), "limit {limit}");
        assert_eq!(server.metric("echo_websocket_http_responses_total{status=\"431\"}"), 1.0);
    }
}

#[tokio::test]
async fn subprotocol_first_offered_is_selected_and_compression_declined() {
    let server = TestServer::start(&[]);
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        server.ws_url("/any/path?x=1"),
    )
    .unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "chat.v2, chat.v1".parse().unwrap());
    request.headers_mut().insert("Sec-WebSocket-Extensions", "permessage-deflate".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat.v2");
    assert!(response.headers().get("sec-websocket-extensions").is_none());
    ws.send(Message::Text("uncompressed".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("uncompressed".into()));
}

#[tokio::test]
async fn full_server_answers_503() {
    let server = TestServer::start(&["--max-connections", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&server).await);
    }
    let (status, head, body) = common::http_exchange(
        server.ws_addr(),
        b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("Retry-After"));
    assert!(body.contains("connection limit (3)"));
    match tokio_tungstenite::connect_async(server.ws_url("/")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    // The held clients are unaffected, and a slot frees when one leaves.
    for ws in &mut held {
        ws.send(Message::Text("still here".into())).await.unwrap();
        assert_eq!(next_data(ws).await, Message::Text("still here".into()));
    }
    let mut first = held.remove(0);
    first.close(None).await.unwrap();
    let _ = next_data(&mut first).await;
    drop(first);
    server.wait_for_metric("echo_websocket_connections", Duration::from_secs(5), |v| v == 2.0);
    let mut again = connect(&server).await;
    again.send(Message::Text("in".into())).await.unwrap();
    assert_eq!(next_data(&mut again).await, Message::Text("in".into()));
    assert_eq!(server.metric("echo_websocket_rejected_total{reason=\"capacity\"}"), 2.0);
}

#[tokio::test]
async fn slow_handshakes_time_out_without_blocking_others() {
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_HANDSHAKE_TIMEOUT", "3s")]);
    // 1,500 clients that connect and never finish their request.
    let mut stalled = Vec::new();
    for _ in 0..1500 {
        let mut s = tokio::net::TcpStream::connect(server.ws_addr()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: slow").await.unwrap();
        stalled.push(s);
    }
    // A normal client is served meanwhile, while all of them still hang.
    let mut ws = connect(&server).await;
    ws.send(Message::Text("not blocked".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("not blocked".into()));
    assert_eq!(
        server.metric("echo_websocket_handshake_failures_total{reason=\"timeout\"}"),
        0.0,
        "served before the stalled clients timed out"
    );
    // Every stalled client is dropped after the timeout.
    for s in &mut stalled {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(s, &mut buf))
            .await
            .expect("dropped within the timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "no response, just closed");
    }
    server.wait_for_metric(
        "echo_websocket_handshake_failures_total{reason=\"timeout\"}",
        Duration::from_secs(5),
        |v| v == 1500.0,
    );
    ws.send(Message::Text("still fine".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("still fine".into()));
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_without_growing_memory() {
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_WRITE_TIMEOUT", "2s")]);
    let mut ws = connect(&server).await;
    // Warm up so the allocator's pools exist before measuring.
    let chunk = Message::Binary(Bytes::from(vec![0x5a; 1 << 20]));
    ws.send(chunk.clone()).await.unwrap();
    let _ = next_data(&mut ws).await;
    let before = server.rss_bytes();
    // Send 200 MiB without reading a byte. The server echoes until the
    // socket buffers are full, then stops reading, so this client's sends
    // stall too: the send loop ends when it is closed or stuck.
    let mut sent = 0u64;
    let send_all = async {
        for _ in 0..200 {
            if ws.send(chunk.clone()).await.is_err() {
                break;
            }
            sent += 1;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(8), send_all).await;
    let during = server.rss_bytes();
    assert!(sent < 200, "the server must push back instead of buffering 200 MiB (sent {sent} MiB)");
    assert!(
        during < before + (24 << 20),
        "server memory grew from {before} to {during} bytes for one stuck client"
    );
    server.wait_for_metric(
        "echo_websocket_closed_total{reason=\"write_timeout\"}",
        Duration::from_secs(10),
        |v| v == 1.0,
    );
    server.wait_for_metric("echo_websocket_connections", Duration::from_secs(5), |v| v == 0.0);
}

/// The README's bound for a client that sends but never reads is
/// `read_buffer_size` plus one message. With 16 MiB messages (the default
/// limit), the server must hold the unwritten echo of one message and stop
/// reading there, not read the next 16 MiB message in behind it.
#[test]
fn a_client_that_never_reads_costs_one_message_not_two() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const SIZE: usize = 16 << 20;
    // Room enough that the server does not give up on this client while the
    // test waits for its writes to stall.
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_WRITE_TIMEOUT", "120s")]);
    let mut client = RawClient::connect(server.ws_addr());
    client.send_frame(true, 2, b"warm up");
    assert_eq!(client.read_frame().unwrap().payload, b"warm up");
    let before = server.rss_bytes();
    // Three whole messages, each a different byte, written by a thread that
    // counts how far it got: it blocks once the server stops reading.
    let written = Arc::new(AtomicU64::new(0));
    let mut stream = client.stream.try_clone().unwrap();
    let writer = {
        let written = written.clone();
        std::thread::spawn(move || {
            for fill in 1..=3u8 {
                let frame = RawClient::frame(true, 2, &vec![fill; SIZE], true);
                for chunk in frame.chunks(64 << 10) {
                    stream.write_all(chunk).unwrap();
                    written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        })
    };
    // Stalled: no progress for a second, with the server holding the echo
    // of the first message (the measurement sees it; on a busy machine a
    // second without progress may come before that).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    let grown = loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = written.load(Ordering::Relaxed);
        let grown = server.rss_bytes().saturating_sub(before);
        if now == last && grown > (SIZE / 2) as u64 {
            break grown;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client's writes never stalled with the echo held ({now} bytes written, {grown} bytes more held)"
        );
        last = now;
    };
    let total = written.load(Ordering::Relaxed);
    assert!(total < 3 * SIZE as u64, "the server kept reading: the client wrote all {total} bytes");
    // Nothing like a second message beside the echo.
    assert!(
        grown < (SIZE + SIZE / 2) as u64,
        "a client that never reads made the server hold {grown} bytes more (one message is {SIZE})"
    );
    // Once the client reads, every message comes back whole and in order.
    client.stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    for fill in 1..=3u8 {
        let echo = client.read_frame().expect("an echo");
        assert_eq!((echo.opcode, echo.payload.len()), (2, SIZE));
        assert!(echo.payload.iter().all(|&b| b == fill), "echo {fill} is intact");
    }
    writer.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_echo_fifty_messages_each() {
    let server = TestServer::start(&[]);
    let url = server.ws_url("/");
    let mut tasks = Vec::new();
    for client in 0..2000u32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
            for i in 0..50u32 {
                let payload: Vec<u8> =
                    format!("{client}:{i}:").bytes().chain((0..64).map(|b| b ^ i as u8)).collect();
                let message = if i % 2 == 0 {
                    Message::Binary(Bytes::from(payload))
                } else {
                    Message::Text(String::from_utf8_lossy(&payload).into_owned().into())
                };
                ws.send(message.clone()).await.unwrap();
                assert_eq!(next_data(&mut ws).await, message, "client {client} message {i}");
            }
            ws
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    assert_eq!(server.metric("echo_websocket_connections"), 2000.0);
    assert_eq!(server.metric("echo_websocket_messages_sent_total{kind=\"text\"}"), 50_000.0);
    assert_eq!(server.metric("echo_websocket_messages_sent_total{kind=\"binary\"}"), 50_000.0);
    // One event loop served all of them: one runtime worker, and the only
    // other thread of the process is the MQTT router's (see common::THREADS).
    assert_eq!(server.metric("echo_runtime_workers"), 1.0);
    assert_eq!(server.thread_names(), common::THREADS.map(String::from).to_vec());
    drop(clients);
}

#[tokio::test]
async fn idle_sessions_release_their_buffers() {
    let server = TestServer::start(&[]);
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(connect(&server).await);
    }
    let baseline = server.rss_bytes();
    // Each of 1,000 clients echoes one 64 KiB message, then goes quiet.
    let big = Message::Binary(Bytes::from(vec![3u8; 64 << 10]));
    for _ in 0..1000 {
        let mut ws = connect(&server).await;
        ws.send(big.clone()).await.unwrap();
        assert_eq!(next_data(&mut ws).await, big);
        clients.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let grown = server.rss_bytes().saturating_sub(baseline);
    // Had each quiet session kept its 64 KiB read and write buffers, this
    // would be over 128 MB; what remains is the sessions themselves.
    assert!(grown < 16 << 20, "1,000 quiet sessions hold {grown} bytes ({} per session)", grown / 1000);
}

#[tokio::test]
async fn listens_on_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("*** SKIPPED: this machine has no IPv6 loopback ***");
        return;
    }
    let server = TestServer::start(&["--ws-listen", "[::1]:0", "--ws-listen", "127.0.0.1:0"]);
    assert_eq!(server.addrs["websocket"].len(), 2);
    for addr in &server.addrs["websocket"] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/")).await.unwrap();
        ws.send(Message::Text(addr.to_string().into())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::Text(addr.to_string().into()));
    }
}

#[tokio::test]
async fn keepalive_pings_and_drops_silent_clients() {
    let server = TestServer::start_with_env(
        &[],
        &[
            ("ECHO_WEBSOCKET_PING_INTERVAL", "300ms"),
            ("ECHO_WEBSOCKET_PING_TIMEOUT", "300ms"),
            ("ECHO_WEBSOCKET_CLOSE_TIMEOUT", "500ms"),
        ],
    );
    // A raw client does not answer pings by itself.
    let mut raw = RawClient::connect(server.ws_addr());
    let ping = raw.read_frame().expect("a ping");
    assert_eq!(ping.opcode, 9);
    assert_eq!(raw.read_close_code(), Some(1001), "no pong: closed as gone away");
    assert!(raw.closed_within(Duration::from_secs(10)));
    // A client library answers pings: it stays connected.
    let mut ws = connect(&server).await;
    let quiet = async {
        loop {
            if let Some(Ok(m)) = ws.next().await {
                assert!(matches!(m, Message::Ping(_)), "{m:?}");
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), quiet).await;
    ws.send(Message::Text("alive".into())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::Text("alive".into()));
    assert_eq!(server.metric("echo_websocket_closed_total{reason=\"ping_timeout\"}"), 1.0);
}

#[tokio::test]
async fn idle_timeout_closes_quiet_connections() {
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_IDLE_TIMEOUT", "500ms")]);
    let mut ws = connect(&server).await;
    let started = std::time::Instant::now();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ws.send(Message::Text("busy".into())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::Text("busy".into()));
    }
    match next_data(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected an idle close, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(1200));
}
