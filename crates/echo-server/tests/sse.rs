//! Server-Sent Events at `/.sse` (`ws::sse`) against the real server: the
//! format, the interval, the counter and `Last-Event-ID`, HEAD, HTTP/1.0,
//! clients leaving, the connection limit, the switch, and shutdown.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use common::{HttpConn, TestServer};

const FAST: [(&str, &str); 1] = [("ECHO_WEBSOCKET_SSE_INTERVAL", "50ms")];

/// One event as a client parses it (the fields it has).
#[derive(Debug, Default)]
struct Event {
    event: String,
    data: Vec<String>,
    id: Option<String>,
}

/// A client reading an event stream over raw TCP: the head, then events,
/// unframing chunks when the response is chunked.
struct SseClient {
    stream: TcpStream,
    raw: Vec<u8>,
    /// The decoded body not yet parsed into events.
    body: Vec<u8>,
    chunked: bool,
    head: String,
    /// The final empty chunk arrived.
    ended: bool,
}

impl SseClient {
    fn open(addr: SocketAddr, request: &str) -> SseClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut client = SseClient {
            stream,
            raw: Vec::new(),
            body: Vec::new(),
            chunked: false,
            head: String::new(),
            ended: false,
        };
        client.stream.write_all(request.as_bytes()).unwrap();
        let end = loop {
            if let Some(i) = client.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(client.fill(), "closed before the head: {:?}", String::from_utf8_lossy(&client.raw));
        };
        client.head = String::from_utf8(client.raw.drain(..end).collect()).unwrap();
        client.chunked = client.head.contains("Transfer-Encoding: chunked\r\n");
        client
    }

    fn get(addr: SocketAddr, extra: &str) -> SseClient {
        SseClient::open(addr, &format!("GET /.sse HTTP/1.1\r\nHost: test\r\n{extra}\r\n"))
    }

    fn status(&self) -> u16 {
        self.head.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Reads more bytes; false at the end of the stream.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).expect("the stream goes on");
        self.raw.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Moves whole chunks (or everything, unchunked) from `raw` to `body`.
    fn unframe(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        while let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.raw[..line_end]).unwrap(), 16).unwrap();
            if self.raw.len() < line_end + 2 + size + 2 {
                return;
            }
            assert_eq!(&self.raw[line_end + 2 + size..line_end + 4 + size], b"\r\n", "chunk ends with CRLF");
            self.body.extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
            self.raw.drain(..line_end + 4 + size);
            if size == 0 {
                self.ended = true;
            }
        }
    }

    /// The next event; `None` when the stream ends first.
    fn next(&mut self) -> Option<Event> {
        loop {
            self.unframe();
            if let Some(i) = self.body.windows(2).position(|w| w == b"\n\n") {
                let text = String::from_utf8(self.body.drain(..i + 2).collect()).unwrap();
                let mut event = Event::default();
                for line in text.lines().filter(|l| !l.is_empty()) {
                    let (field, value) = line.split_once(": ").unwrap_or((line.trim_end_matches(':'), ""));
                    match field {
                        "event" => event.event = value.to_owned(),
                        "data" => event.data.push(value.to_owned()),
                        "id" => event.id = Some(value.to_owned()),
                        other => panic!("unknown field {other:?} in {text:?}"),
                    }
                }
                return Some(event);
            }
            if self.ended || !self.fill() {
                return None;
            }
        }
    }

    /// The next `time` event: its id and timestamp.
    fn next_time(&mut self) -> (u64, SystemTime) {
        let event = self.next().expect("a time event");
        assert_eq!(event.event, "time", "{event:?}");
        let id = event.id.as_deref().expect("an id").parse().unwrap();
        let at = humantime::parse_rfc3339(&event.data[0]).unwrap_or_else(|e| panic!("{event:?}: {e}"));
        (id, at)
    }
}

#[test]
fn events_come_at_the_interval_numbered_and_timestamped_until_the_client_leaves() {
    let server = TestServer::start_with_env(&[], &FAST);
    let mut client = SseClient::get(server.ws_addr(), "Accept: text/event-stream\r\n");
    assert_eq!(client.status(), 200, "{}", client.head);
    for line in
        ["Content-Type: text/event-stream\r\n", "Cache-Control: no-cache\r\n", "Connection: close\r\n"]
    {
        assert!(client.head.contains(line), "{}", client.head);
    }
    assert!(client.chunked && !client.head.contains("Content-Length"), "{}", client.head);
    let request = client.next().unwrap();
    assert_eq!((request.event.as_str(), request.id.as_deref()), ("request", None));
    let local = client.stream.local_addr().unwrap();
    assert_eq!(
        request.data[..3],
        [format!("Request from {local}"), String::new(), "GET /.sse HTTP/1.1".into()]
    );
    assert!(request.data.contains(&"Accept: text/event-stream".to_owned()), "{request:?}");

    let (first, first_at) = client.next_time();
    let started = Instant::now();
    assert_eq!(first, 1);
    let mut last_at = first_at;
    for n in 2..=10 {
        let (id, at) = client.next_time();
        assert_eq!(id, n, "the counter goes up by one");
        assert!(at > last_at, "timestamps go forward");
        last_at = at;
    }
    let took = started.elapsed();
    println!("9 intervals of 50 ms took {took:?}");
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "{took:?}");
    let span = last_at.duration_since(first_at).unwrap();
    assert!(span >= Duration::from_millis(400), "timestamps 9 intervals apart: {span:?}");
    assert_eq!(server.metric("echo_sse_streams"), 1.0);
    assert!(server.metric("echo_sse_events_total") >= 10.0);
    assert_eq!(server.metric("echo_websocket_connections"), 1.0, "a stream is a connection on the port");
    assert_eq!(server.metric("echo_websocket_http_responses_total{status=\"200\"}"), 1.0);

    drop(client);
    server.wait_for_metric("echo_sse_streams", Duration::from_secs(5), |n| n == 0.0);
    server.wait_for_metric("echo_websocket_connections", Duration::from_secs(5), |n| n == 0.0);
    assert_eq!(server.metric("echo_sse_closed_total{reason=\"client_left\"}"), 1.0);
    assert_eq!(server.metric("echo_sse_opened_total"), 1.0);
}

#[test]
fn head_keeps_the_connection_and_last_event_id_continues_the_counter() {
    let server = TestServer::start_with_env(&["--log-level", "info"], &FAST);
    let mut conn = HttpConn::connect(server.ws_addr());
    conn.send(b"HEAD /.sse HTTP/1.1\r\nHost: test\r\n\r\n");
    let head = conn.read_response(true);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("connection"), Some("keep-alive"));
    // The same connection goes on to the next request: an echo.
    conn.send(b"GET /after HTTP/1.1\r\nHost: test\r\n\r\n");
    assert!(conn.read_response(false).text().contains("GET /after HTTP/1.1"));
    assert_eq!(server.metric("echo_sse_opened_total"), 0.0, "HEAD opens no stream");

    let mut client = SseClient::get(server.ws_addr(), "Last-Event-ID: 41\r\n");
    assert_eq!(client.next().unwrap().event, "request");
    assert_eq!(client.next_time().0, 42);
    assert_eq!(client.next_time().0, 43);
    let mut stranger = SseClient::get(server.ws_addr(), "Last-Event-ID: not-ours\r\n");
    assert_eq!(stranger.next().unwrap().event, "request");
    assert_eq!(stranger.next_time().0, 1, "someone else's id starts the counter afresh");
}

#[test]
fn an_http_1_0_stream_is_close_delimited_and_the_host_is_named_when_asked() {
    let env = [FAST[0], ("ECHO_WEBSOCKET_SEND_SERVER_HOSTNAME", "true")];
    let server = TestServer::start_with_env(&[], &env);
    let mut client = SseClient::open(server.ws_addr(), "GET /.sse?x=1 HTTP/1.0\r\n\r\n");
    assert_eq!(client.status(), 200);
    assert!(!client.chunked && client.head.contains("X-Served-By: "), "{}", client.head);
    let served = client.next().unwrap();
    assert_eq!(served.event, "server");
    assert!(client.head.contains(&format!("X-Served-By: {}\r\n", served.data[0])), "{served:?}");
    assert!(client.next().unwrap().data.contains(&"GET /.sse?x=1 HTTP/1.0".to_owned()));
    assert_eq!(client.next_time().0, 1);
}

#[test]
fn the_switch_turns_it_off_and_the_echo_switch_leaves_it_on() {
    let off = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_SSE", "false")]);
    let (status, body) = common::http_get(off.ws_addr(), "/.sse");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("websocket.sse"), "{body}");
    drop(off);
    let no_echo = TestServer::start_with_env(&[], &[FAST[0], ("ECHO_WEBSOCKET_HTTP_ECHO", "false")]);
    let mut client = SseClient::get(no_echo.ws_addr(), "");
    assert_eq!(client.status(), 200);
    assert_eq!(client.next().unwrap().event, "request");
    assert_eq!(client.next_time().0, 1);
    let (status, _) = common::http_request(no_echo.ws_addr(), "POST /.sse HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, 405, "with the echo off, other methods are refused as elsewhere");
}

#[test]
fn bad_requests_get_a_status_and_only_that_client_is_affected() {
    let server = TestServer::start_with_env(&[], &FAST);
    let mut bystander = SseClient::get(server.ws_addr(), "");
    assert_eq!(bystander.next().unwrap().event, "request");
    let (status, body) = common::http_request(
        server.ws_addr(),
        "GET /.sse HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    );
    assert_eq!(status, 400, "{body}");
    // A client that sends bytes after its request is read and ignored.
    bystander.stream.write_all(b"garbage after the request").unwrap();
    let (a, _) = bystander.next_time();
    assert_eq!(bystander.next_time().0, a + 1);
}

#[test]
fn streams_count_toward_the_connection_limit() {
    let server = TestServer::start_with_env(&["--max-connections", "2"], &FAST);
    let mut streams: Vec<SseClient> = (0..2).map(|_| SseClient::get(server.ws_addr(), "")).collect();
    for stream in &mut streams {
        assert_eq!(stream.next().unwrap().event, "request");
    }
    let (status, body) = common::http_get(server.ws_addr(), "/.sse");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connection limit"), "{body}");
    streams.pop();
    server.wait_for_metric("echo_sse_streams", Duration::from_secs(5), |n| n == 1.0);
    let again = SseClient::get(server.ws_addr(), "");
    assert_eq!(again.status(), 200, "the slot came back");
}

#[test]
fn shutdown_ends_every_stream_with_the_last_chunk_then_a_close() {
    let mut server = TestServer::start_with_env(&["--shutdown-grace", "5s"], &FAST);
    let mut clients: Vec<SseClient> = (0..20).map(|_| SseClient::get(server.ws_addr(), "")).collect();
    for client in &mut clients {
        assert_eq!(client.next().unwrap().event, "request");
        client.next_time();
    }
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    for mut client in clients {
        while client.next().is_some() {}
        assert!(client.ended, "the stream ended with the final chunk");
        assert!(!client.fill(), "then the server closed");
        // The server lingers until the client closes too (so that its
        // last bytes are not lost to a reset), or the grace ends.
    }
    let status = server.wait(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(3), "streams ended well within the grace: {took:?}");
    let summary = server.wait_for_log(Duration::from_secs(2), |v| v["message"] == "shutdown complete");
    assert!(!server.log_text().contains("left_open"), "{summary}");
}
