//! The HTTP echo on the WebSocket port (`websocket.http_echo`), the page's
//! paths (the page, its live figures at `/.stats`, its MQTT.js), and naming
//! the replica (`websocket.send_server_hostname`), against the real server
//! over real sockets.

mod common;

use std::time::{Duration, Instant};

use common::raw::RawClient;
use common::{HttpConn, TestServer};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const JSON: &str = "Accept: application/json\r\n";

#[test]
fn a_get_is_echoed_as_text_and_as_json_with_its_fields_in_order() {
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    let client = conn.stream.local_addr().unwrap();
    let head = "GET /some/path?b=2&a=1&a=3 HTTP/1.1\r\nHost: echo.test\r\nX-Trace: one\r\n\
                user-agent: test/1\r\nX-Trace: two\r\n";
    conn.send(format!("{head}\r\n").as_bytes());
    let text = conn.read_response(false);
    assert_eq!(text.status, 200);
    assert_eq!(text.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(text.header("vary"), Some("Accept"));
    assert_eq!(text.header("connection"), Some("keep-alive"));
    assert_eq!(
        text.text(),
        format!(
            "Request from {client}\n\nGET /some/path?b=2&a=1&a=3 HTTP/1.1\n\n\
             Host: echo.test\nX-Trace: one\nuser-agent: test/1\nX-Trace: two\n"
        ),
        "jmalloc's layout, the fields in the order and case sent"
    );
    assert!(text.header("x-served-by").is_none(), "the host is not named by default");

    conn.send(format!("{head}{JSON}\r\n").as_bytes());
    let json = conn.read_response(false);
    assert_eq!(json.header("content-type"), Some("application/json"));
    let value = json.json();
    assert_eq!(value["method"], "GET");
    assert_eq!(value["target"], "/some/path?b=2&a=1&a=3");
    assert_eq!(value["path"], "/some/path");
    assert_eq!(value["query"], "b=2&a=1&a=3");
    assert_eq!(value["version"], "HTTP/1.1");
    assert_eq!(value["client"], client.to_string());
    assert_eq!(
        value["headers"],
        serde_json::json!([
            ["Host", "echo.test"],
            ["X-Trace", "one"],
            ["user-agent", "test/1"],
            ["X-Trace", "two"],
            ["Accept", "application/json"]
        ])
    );
    assert_eq!((value["body"].as_str(), value["body_encoding"].as_str()), (Some(""), Some("utf-8")));
    assert!(value.get("served_by").is_none());
    assert_eq!(server.metric("echo_http_requests_total{method=\"GET\"}"), 2.0);
    assert_eq!(server.metric("echo_http_keepalive_requests_total"), 1.0);
    assert_eq!(server.metric("echo_websocket_http_responses_total{status=\"200\"}"), 2.0);
    assert_eq!(server.metric("echo_websocket_upgrades_total"), 0.0);
}

#[test]
fn bodies_by_length_and_chunked_are_echoed() {
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world");
    let text = conn.read_response(false).text();
    assert!(text.ends_with("Content-Length: 11\n\nhello world"), "{text}");

    // Chunked, with extensions and trailers, arriving in pieces.
    conn.send(format!("PUT /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n{JSON}\r\n").as_bytes());
    for piece in [&b"5;ext=1\r\nhel"[..], b"lo\r\n", b"6\r\n worl", b"d\r\n0\r\nX-Sum: 42\r\n", b"\r\n"] {
        std::thread::sleep(Duration::from_millis(30));
        conn.send(piece);
    }
    let value = conn.read_response(false).json();
    assert_eq!(value["method"], "PUT");
    assert_eq!(value["body"], "hello world");
    assert_eq!(value["trailers"], serde_json::json!([["X-Sum", "42"]]));

    // A body that is not UTF-8 comes back as base64 in JSON, as bytes in text.
    let mut request = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n{JSON}\r\n").into_bytes();
    request.extend_from_slice(&[0xff, 0x00, 0x41]);
    conn.send(&request);
    let value = conn.read_response(false).json();
    assert_eq!((value["body"].as_str(), value["body_encoding"].as_str()), (Some("/wBB"), Some("base64")));
    let mut request = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\n".to_vec();
    request.extend_from_slice(&[0xff, 0x00, 0x41]);
    conn.send(&request);
    assert!(conn.read_response(false).body.ends_with(&[b'\n', 0xff, 0x00, 0x41]));
    assert_eq!(server.metric("echo_http_request_body_bytes_total"), 11.0 + 11.0 + 3.0 + 3.0);
}

#[test]
fn a_body_at_the_default_limit_comes_back_whole() {
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    let body: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut request =
        format!("POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    request.extend_from_slice(&body);
    conn.send(&request);
    assert!(conn.read_response(false).body.ends_with(&body), "1 MiB by Content-Length");
    conn.send(b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut chunked = Vec::new();
    for piece in body.chunks(10_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    conn.send(&chunked);
    assert!(conn.read_response(false).body.ends_with(&body), "1 MiB chunked");
    assert_eq!(server.metric("echo_http_request_body_bytes_total"), 2.0 * body.len() as f64);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(conn.read_response(false).status, 100, "the go-ahead comes before the body is sent");
    conn.send(b"body");
    assert!(conn.read_response(false).text().ends_with("\n\nbody"));
}

#[test]
fn head_gets_the_headers_without_the_body() {
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    let get = conn.read_response(false);
    conn.send(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n");
    let head = conn.read_response(true);
    assert_eq!(head.status, 200);
    // GET's echo says GET where HEAD's says HEAD: one byte more.
    let expected = get.body.len() + 1;
    assert_eq!(head.header("content-length"), Some(expected.to_string().as_str()));
    // Had a body followed the HEAD answer, it would be read as this
    // response's head.
    conn.send(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    let after = conn.read_response(false);
    assert_eq!(after.status, 200);
    assert!(after.text().contains("GET /after HTTP/1.1"), "{}", after.text());
    assert_eq!(server.metric("echo_http_requests_total{method=\"HEAD\"}"), 1.0);
}

#[test]
fn keep_alive_serves_pipelined_requests_and_closes_when_asked() {
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    // Three requests in one write: answered in order, on one connection.
    conn.send(
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nPOST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc\
          GET /3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    for (i, target) in ["/1", "/2", "/3"].iter().enumerate() {
        let response = conn.read_response(false);
        assert!(response.text().contains(&format!(" {target} HTTP/1.1")), "{}", response.text());
        let expected = if i < 2 { "keep-alive" } else { "close" };
        assert_eq!(response.header("connection"), Some(expected));
    }
    assert!(conn.closed_within(Duration::from_secs(5)), "Connection: close is honoured");
    // HTTP/1.0 closes unless asked to keep alive.
    let mut old = HttpConn::connect(server.ws_addr());
    old.send(b"GET /old HTTP/1.0\r\n\r\n");
    assert_eq!(old.read_response(false).header("connection"), Some("close"));
    assert!(old.closed_within(Duration::from_secs(5)));
    let mut old = HttpConn::connect(server.ws_addr());
    old.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(old.read_response(false).header("connection"), Some("keep-alive"));
    old.send(b"GET /b HTTP/1.0\r\n\r\n");
    assert!(old.read_response(false).text().contains("GET /b HTTP/1.0"));
    assert_eq!(server.metric("echo_http_keepalive_requests_total"), 3.0);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_head_timeout() {
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_HANDSHAKE_TIMEOUT", "1s")]);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(conn.read_response(false).status, 200);
    let start = Instant::now();
    assert!(conn.closed_within(Duration::from_secs(5)));
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(
        server.metric("echo_websocket_handshake_failures_total{reason=\"timeout\"}"),
        0.0,
        "an idle keep-alive connection is no failed handshake"
    );
}

#[test]
fn a_keep_alive_connection_may_upgrade() {
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(conn.read_response(false).status, 200);
    conn.send(
        b"GET /chat HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(conn.read_response(false).status, 101);
    let mut ws = RawClient::upgraded(conn.stream);
    ws.send_frame(true, 1, b"upgraded later");
    let echo = ws.read_frame().unwrap();
    assert_eq!((echo.opcode, echo.payload.as_slice()), (1, &b"upgraded later"[..]));
}

#[test]
fn limits_get_413_431_and_bad_input_400_without_affecting_others() {
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_MAX_REQUEST_BODY_SIZE", "1000")]);
    let addr = server.ws_addr();
    let mut bystander = HttpConn::connect(addr);
    bystander.send(b"GET /before HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(bystander.read_response(false).status, 200);

    // At the limit: echoed.
    let mut conn = HttpConn::connect(addr);
    let body = "b".repeat(1000);
    conn.send(format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{body}").as_bytes());
    assert!(conn.read_response(false).text().ends_with(&body));

    // Over it by its declared length: 413 at once, before any byte of it.
    let mut conn = HttpConn::connect(addr);
    conn.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n");
    let response = conn.read_response(false);
    assert_eq!(response.status, 413, "no 100 Continue for a body that will be refused");
    assert!(response.text().contains("max_request_body_size"), "{}", response.text());
    assert_eq!(response.header("connection"), Some("close"));
    assert!(conn.closed_within(Duration::from_secs(10)));

    // Over it chunk by chunk: 413 when the chunk that crosses it is announced.
    let mut conn = HttpConn::connect(addr);
    conn.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    let chunk = format!("200\r\n{}\r\n", "c".repeat(512));
    conn.send(chunk.as_bytes());
    conn.send(chunk.as_bytes());
    assert_eq!(conn.read_response(false).status, 413);

    // A head over max_request_header_size (8 KiB): 431.
    let (status, _, body) = common::http_exchange(
        addr,
        format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(9000)).as_bytes(),
    );
    assert_eq!((status, body.trim().lines().count()), (431, 1), "{body}");

    // Malformed chunked bodies and framings that cannot be trusted: 400.
    for request in [
        &b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3x\r\n\r\nabc",
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let (status, _, body) = common::http_exchange(addr, request);
        assert_eq!(status, 400, "{}: {body}", String::from_utf8_lossy(request));
        assert_eq!(body.trim().lines().count(), 1, "a one-line reason: {body}");
    }
    // The bystander's connection was never disturbed.
    bystander.send(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(bystander.read_response(false).text().contains("GET /after"));
    assert_eq!(server.metric("echo_websocket_http_responses_total{status=\"413\"}"), 2.0);
    assert_eq!(server.metric("echo_websocket_http_responses_total{status=\"431\"}"), 1.0);
    assert_eq!(server.metric("echo_websocket_http_responses_total{status=\"400\"}"), 5.0);
}

#[test]
fn a_body_that_stalls_gets_408() {
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_HANDSHAKE_TIMEOUT", "1s")]);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    let response = conn.read_response(false);
    assert_eq!(response.status, 408);
    assert!(response.text().contains("stalled"), "{}", response.text());
}

#[test]
fn the_page_is_at_dot_ws_and_at_the_root_for_browsers() {
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"GET /.ws HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n");
    let page = conn.read_response(false);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(page.text().contains("new WebSocket("));
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    conn.send(format!("GET / HTTP/1.1\r\nHost: t\r\nAccept: {browser}\r\n\r\n").as_bytes());
    let root = conn.read_response(false);
    assert_eq!(root.body, page.body, "a browser at / gets the page");
    assert_eq!(root.header("vary"), Some("Accept"));
    conn.send(b"GET / HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n");
    assert!(conn.read_response(false).text().contains("GET / HTTP/1.1"), "curl at / gets the echo");
}

#[test]
fn with_the_echo_off_plain_requests_get_404_and_405_as_before() {
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_HTTP_ECHO", "false")]);
    let addr = server.ws_addr();
    for (request, expected) in [
        (&b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"[..], 404),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", 200),
        (b"GET /.ws HTTP/1.1\r\nHost: t\r\n\r\n", 200),
    ] {
        // http_exchange reads until the server closes: every answer closes.
        let (status, head, body) = common::http_exchange(addr, request);
        assert_eq!(status, expected, "{}: {body}", String::from_utf8_lossy(request));
        assert!(head.contains("Connection: close"));
    }
    assert_eq!(server.metric("echo_http_requests_total{method=\"GET\"}"), 0.0);
}

/// GET `/.stats` on a fresh connection: the response and its JSON.
async fn live_figures(addr: std::net::SocketAddr) -> (common::HttpResponse, serde_json::Value) {
    tokio::task::spawn_blocking(move || {
        let mut conn = HttpConn::connect(addr);
        conn.send(b"GET /.stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let response = conn.read_response(false);
        let json = response.json();
        (response, json)
    })
    .await
    .unwrap()
}

/// Polls `/.stats` until its latest sample meets `pred`.
async fn wait_for_figures(
    addr: std::net::SocketAddr,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, view) = live_figures(addr).await;
        if !view["now"].is_null() && pred(&view["now"]) {
            return view;
        }
        assert!(Instant::now() < deadline, "{what}: the figures never showed it: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn keys(value: &serde_json::Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// The page's live figures: on the WebSocket port with the admin port off,
/// never cached, exactly the stats line's aggregate figures (no counter by
/// label, no address, no configuration), moving with the load.
#[tokio::test]
async fn the_live_figures_move_with_the_load_and_show_nothing_more() {
    let server = TestServer::start(&["--no-admin"]);
    let addr = server.ws_addr();
    let (response, view) = live_figures(addr).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("cache-control"), Some("no-store"));
    assert_eq!(keys(&view), ["history", "interval_ms", "mqtt_over_websocket", "now"]);
    assert_eq!(
        (view["interval_ms"].as_u64(), view["mqtt_over_websocket"].as_bool()),
        (Some(1000), Some(true))
    );

    let idle =
        wait_for_figures(addr, "a first sample", |now| now["rss_bytes"].as_u64() > Some(1 << 20)).await;
    assert_eq!(
        keys(&idle["now"]),
        [
            "bytes_in_per_s",
            "bytes_out_per_s",
            "cpu_percent",
            "messages_in_per_s",
            "messages_out_per_s",
            "mqtt_connections",
            "mqtt_publishes_in_per_s",
            "mqtt_publishes_out_per_s",
            "rss_bytes",
            "time_ms",
            "websocket_connections",
        ]
    );
    assert_eq!(
        keys(&idle["history"]),
        [
            "cpu_percent",
            "messages_in_per_s",
            "mqtt_connections",
            "mqtt_publishes_in_per_s",
            "rss_bytes",
            "websocket_connections"
        ]
    );
    assert!(idle["now"]["websocket_connections"].as_u64() <= Some(1), "at most a /.stats request: {idle}");
    assert_eq!(idle["now"]["messages_in_per_s"], 0.0);

    // Five clients echoing as fast as they can, and one MQTT client.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..5 {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/load")).await.unwrap();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ws.send(Message::Text("load".into())).await.unwrap();
                ws.next().await.unwrap().unwrap();
            }
        }));
    }
    let mut mqtt = RawClient::connect_mqtt(addr);
    mqtt.send_frame(true, 2, &common::mqtt_raw::connect(4, "live-figures", 30));
    assert_eq!(mqtt.read_frame().unwrap().payload.first(), Some(&0x20), "CONNACK");
    let loaded = wait_for_figures(addr, "five echoing clients and an MQTT one", |now| {
        now["websocket_connections"].as_u64() >= Some(6)
            && now["mqtt_connections"].as_u64() == Some(1)
            && now["messages_in_per_s"].as_f64() > Some(50.0)
            && now["messages_out_per_s"].as_f64() > Some(50.0)
            && now["bytes_in_per_s"].as_f64() > Some(0.0)
    })
    .await;
    assert!(loaded["history"]["websocket_connections"].as_array().unwrap().len() >= 2, "{loaded}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    drop(mqtt);
    wait_for_figures(addr, "the clients gone", |now| {
        now["websocket_connections"].as_u64() <= Some(1)
            && now["mqtt_connections"].as_u64() == Some(0)
            && now["messages_in_per_s"] == 0.0
    })
    .await;

    // The admin port's metrics are not on this port: /metrics is echoed.
    let (status, body) = common::http_get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("GET /metrics HTTP/1.1") && !body.contains("# TYPE"), "{body}");
}

/// `/.stats` and the vendored MQTT.js are served as the page is: GET and
/// HEAD with the echo on or off; other methods echoed with it on (as at
/// `/.ws`), 405 with `Allow` with it off.
#[test]
fn the_pages_figures_and_script_are_served_as_the_page_is() {
    const MQTT_JS: &[u8] = include_bytes!("../src/ws/vendor/mqtt.min.js");
    let server = TestServer::start(&[]);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"GET /.ws/mqtt.min.js?v=5.16.0 HTTP/1.1\r\nHost: t\r\n\r\n");
    let script = conn.read_response(false);
    assert_eq!(script.status, 200);
    assert_eq!(script.header("content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(script.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert!(script.body == MQTT_JS, "the vendored file, whole ({} bytes)", script.body.len());
    conn.send(b"HEAD /.stats HTTP/1.1\r\nHost: t\r\n\r\n");
    let head = conn.read_response(true);
    assert_eq!((head.status, head.header("connection")), (200, Some("keep-alive")));
    assert!(head.header("content-length").unwrap().parse::<usize>().unwrap() > 50);
    conn.send(b"POST /.stats HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi");
    let echoed = conn.read_response(false).text();
    assert!(echoed.starts_with("Request from ") && echoed.contains("POST /.stats HTTP/1.1"), "{echoed}");

    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_HTTP_ECHO", "false")]);
    let addr = server.ws_addr();
    let (status, head, body) = common::http_exchange(addr, b"GET /.stats?x HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("Connection: close") && head.contains("Cache-Control: no-store"), "{head}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap();
    let (status, head, _) = common::http_exchange(addr, b"GET /.ws/mqtt.min.js HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains(&format!("Content-Length: {}\r\n", MQTT_JS.len())), "{head}");
    for method in ["POST", "DELETE"] {
        let request = format!("{method} /.stats HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
        let (status, head, body) = common::http_exchange(addr, request.as_bytes());
        assert_eq!(status, 405, "{method}: {body}");
        assert!(head.contains("\r\nAllow: GET, HEAD"), "{head}");
    }
}

#[tokio::test]
async fn the_replica_is_named_only_when_asked() {
    // By default: no header on the upgrade, and the first message is the echo.
    let server = TestServer::start(&[]);
    let (mut ws, response) = tokio_tungstenite::connect_async(server.ws_url("/")).await.unwrap();
    assert!(response.headers().get("x-served-by").is_none());
    ws.send(Message::Text("first".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("first".into()));
    drop(server);

    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_SEND_SERVER_HOSTNAME", "true")]);
    let host = hostname();
    let (mut ws, response) = tokio_tungstenite::connect_async(server.ws_url("/")).await.unwrap();
    assert_eq!(response.headers()["x-served-by"], host.as_str());
    let greeting = format!("Request served by {host}");
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text(greeting.clone().into()));
    ws.send(Message::Text("then the echo".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("then the echo".into()));

    let addr = server.ws_addr();
    let text = tokio::task::spawn_blocking(move || {
        let mut conn = HttpConn::connect(addr);
        conn.send(b"GET /who HTTP/1.1\r\nHost: t\r\n\r\n");
        let text = conn.read_response(false);
        conn.send(format!("GET /who HTTP/1.1\r\nHost: t\r\n{JSON}\r\n").as_bytes());
        let json = conn.read_response(false);
        // Errors name the host too.
        let (_, head, _) = common::http_exchange(addr, b"BAD\r\n\r\n");
        (text, json, head)
    })
    .await
    .unwrap();
    let (text, json, error_head) = text;
    assert_eq!(text.header("x-served-by"), Some(host.as_str()));
    assert!(text.text().starts_with(&format!("{greeting}\nRequest from ")), "{}", text.text());
    assert_eq!(json.json()["served_by"], host.as_str());
    assert!(error_head.contains(&format!("X-Served-By: {host}")), "{error_head}");

    // MQTT over WebSocket gets no greeting: its first frame is the CONNACK.
    let mut mqtt = RawClient::connect_mqtt(server.ws_addr());
    mqtt.send_frame(true, 2, &common::mqtt_raw::connect(4, "replica-test", 30));
    let first = mqtt.read_frame().unwrap();
    assert_eq!((first.opcode, first.payload.first()), (2, Some(&0x20)), "a binary CONNACK");
}

/// The host's name as the server sees it.
fn hostname() -> String {
    let output = std::process::Command::new("hostname").output();
    match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned(),
    }
}

#[test]
fn shutdown_closes_idle_keep_alive_connections_at_once() {
    let mut server = TestServer::start(&[]);
    let mut conns: Vec<HttpConn> = (0..20).map(|_| HttpConn::connect(server.ws_addr())).collect();
    for conn in &mut conns {
        conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(conn.read_response(false).status, 200);
    }
    let (status, took) = server.terminate(Duration::from_secs(10));
    assert!(status.success());
    assert!(took < Duration::from_secs(2), "idle keep-alive connections held the shutdown for {took:?}");
    assert!(!server.log_text().contains("left_open"), "{}", server.log_text());
    for conn in &mut conns {
        assert!(conn.closed_within(Duration::from_secs(1)));
    }
}
