//! Server-Sent Events at `/.sse` (`websocket.sse`), as jmalloc/echo-server
//! serves them: a `text/event-stream` that opens with who answered and what
//! was asked, then carries a numbered, timestamped event every
//! `websocket.sse_interval` until the client leaves or the server shuts
//! down.
//!
//! The stream, exactly (every line ends with `\n`, every event with a blank
//! line):
//!
//! ```text
//! event: server                          (with send_server_hostname)
//! data: web-1
//!
//! event: request                         (the text echo of the request,
//! data: Request from 127.0.0.1:53412      one data line per line)
//! data:
//! data: GET /.sse HTTP/1.1
//! ...
//!
//! event: time                            (every sse_interval)
//! data: 2025-01-01T12:00:00.250Z
//! id: 1
//! ```
//!
//! The `id` of the `time` events is the stream's counter: 1, 2, 3... with
//! no gap; a client that comes back with `Last-Event-ID: N` (an
//! `EventSource` does so by itself) continues at N+1. One that is not a
//! number is ignored (the counter starts at 1): it came from some other
//! server, and refusing it would stop an `EventSource` for good. The first
//! two events have no `id`, so they leave the client's last id alone.
//!
//! HTTP/1.1 streams are chunked, one chunk per event: the final empty
//! chunk at shutdown tells the client the stream ended on purpose, where a
//! close alone could be a broken network. An HTTP/1.0 client cannot read
//! chunks; its stream ends at the close.
//!
//! What a stream costs: no buffer while it waits. Every stream waits on one
//! [`Ticker`] (one timer for all of them) and on its socket being readable
//! (which is how it learns the client left). An event is formatted on the
//! stack and handed to the kernel in one non-blocking write: if the
//! socket's send buffer is full (a client that does not read), the event
//! is skipped, not queued, and a client that has taken nothing for
//! `write_timeout` is closed. Only an event the kernel took part of is kept
//! (its rest, at most [`EVENT_MAX`] bytes) until it is out. Over TLS the
//! event goes to rustls instead, which sends what the socket takes and
//! keeps the rest (up to its 64 KiB limit on unsent data, past which events
//! are skipped as above).

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::debug;

use super::WsServer;
use super::handshake::{PlainRequest, Response, linger_close};
use super::stream::Stream;
use super::{http_echo, replica};
use crate::shutdown::Shutdown;

/// Where the events are served, as on jmalloc/echo-server.
pub(crate) const PATH: &str = "/.sse";

/// Room for the largest `time` event with its chunk framing (about 80
/// bytes: the timestamp is 24, the id at most 20 digits).
const EVENT_MAX: usize = 128;

/// Whether a request target (path, maybe a query) names [`PATH`].
pub(crate) fn is_path(target: &str) -> bool {
    target.split(['?', '#']).next() == Some(PATH)
}

/// The one timer every stream waits on: a task that, while any stream is
/// open, counts ticks every `sse_interval` and wakes all the waiting
/// streams at once. Streams share its instant, so their timestamps agree,
/// and a stream costs no timer of its own.
#[derive(Debug)]
pub(crate) struct Ticker {
    interval: Duration,
    shutdown: Rc<Shutdown>,
    ticks: Cell<u64>,
    /// When the last tick was.
    at: Cell<SystemTime>,
    streams: Cell<usize>,
    /// Whether the task runs (it stops at a tick that finds no stream).
    running: Cell<bool>,
    notify: Notify,
}

impl Ticker {
    pub(crate) fn new(interval: Duration, shutdown: Rc<Shutdown>) -> Rc<Ticker> {
        Rc::new(Ticker {
            interval,
            shutdown,
            ticks: Cell::new(0),
            at: Cell::new(SystemTime::now()),
            streams: Cell::new(0),
            running: Cell::new(false),
            notify: Notify::new(),
        })
    }

    /// Counts a stream in, starting the task if it is not running.
    fn join(self: &Rc<Self>) {
        self.streams.set(self.streams.get() + 1);
        if !self.running.replace(true) {
            tokio::task::spawn_local(tick(self.clone()));
        }
    }

    fn leave(&self) {
        self.streams.set(self.streams.get() - 1);
    }
}

/// The ticker's task. At shutdown it wakes every stream one last time.
async fn tick(ticker: Rc<Ticker>) {
    let period = ticker.interval;
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    // A late tick is one tick, not a burst to catch up.
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            _ = ticker.shutdown.wait() => {
                ticker.notify.notify_waiters();
                break;
            }
            _ = interval.tick() => {}
        }
        if ticker.streams.get() == 0 {
            break;
        }
        ticker.ticks.set(ticker.ticks.get() + 1);
        ticker.at.set(SystemTime::now());
        ticker.notify.notify_waiters();
    }
    ticker.running.set(false);
}

/// A stream about to start: its framing and its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Events {
    chunked: bool,
    next_id: u64,
}

/// The answer to a GET or HEAD at [`PATH`].
#[derive(Debug)]
pub(crate) enum Opening {
    /// An error, after which the connection closes.
    Refuse(Response),
    /// HEAD: the head a GET would get, then the next request.
    Head(Vec<u8>),
    /// GET: send these bytes (head and first events), then the stream.
    Stream(Events, Vec<u8>),
}

/// Decides the answer to `request` (a GET or HEAD at [`PATH`]).
pub(crate) fn open(request: &PlainRequest, peer: SocketAddr, server: &WsServer) -> Opening {
    if !server.config.sse {
        let off = "Server-Sent Events are off on this server (websocket.sse)";
        return Opening::Refuse(Response::error(404, off));
    }
    if request.framing != super::handshake::Framing::Empty {
        return Opening::Refuse(Response::error(400, format!("a {} request has no body", request.method)));
    }
    if server.shutdown.is_triggered() {
        return Opening::Refuse(Response::error(503, "the server is shutting down"));
    }
    if request.method == "HEAD" {
        return Opening::Head(head(request, server, request.keep_alive).into_bytes());
    }
    if !server.budget.allows("sse") {
        let full = Response::error(503, "the server is at its memory limit; try again later");
        return Opening::Refuse(full.with_header("Retry-After", "1"));
    }
    let events = Events { chunked: request.version == 1, next_id: next_id(request) };
    let mut bytes = head(request, server, false).into_bytes();
    bytes.extend_from_slice(&frame(events.chunked, &first_events(request, peer, server)));
    Opening::Stream(events, bytes)
}

/// The counter's first value: after the client's `Last-Event-ID`, if it
/// is one of ours.
fn next_id(request: &PlainRequest) -> u64 {
    let last = request.values("last-event-id").next().and_then(|v| std::str::from_utf8(v).ok());
    last.and_then(|v| v.trim().parse::<u64>().ok()).and_then(|n| n.checked_add(1)).unwrap_or(1)
}

/// The response head: chunked for HTTP/1.1, close-delimited for 1.0. A
/// stream's connection closes when the stream ends (it never carries
/// another request); a HEAD's may stay open.
fn head(request: &PlainRequest, server: &WsServer, keep_alive: bool) -> String {
    let mut head = format!(
        "HTTP/1.1 200 OK\r\nServer: echo-server/{}\r\nContent-Type: text/event-stream\r\n\
         Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: {}\r\n",
        env!("CARGO_PKG_VERSION"),
        if keep_alive { "keep-alive" } else { "close" },
    );
    if request.version == 1 {
        head.push_str("Transfer-Encoding: chunked\r\n");
    }
    if let Some(host) = &server.hostname {
        head.push_str(&format!("{}: {host}\r\n", replica::HEADER));
    }
    head.push_str("\r\n");
    head
}

/// The events that open a stream: who answered (when the host is named)
/// and the text echo of the request.
fn first_events(request: &PlainRequest, peer: SocketAddr, server: &WsServer) -> String {
    let mut out = String::new();
    if let Some(host) = &server.hostname {
        push_event(&mut out, "server", host);
    }
    let received = http_echo::Received { request, body: &[], trailers: &[], client: peer, served_by: None };
    push_event(&mut out, "request", &String::from_utf8_lossy(&http_echo::text(&received)));
    out
}

/// One event without an id: a `data:` line per line of `data` (a CR or LF
/// inside a line would end it early, so each starts a new one).
fn push_event(out: &mut String, name: &str, data: &str) {
    out.push_str("event: ");
    out.push_str(name);
    out.push('\n');
    for line in data.trim_end_matches(['\r', '\n']).split(['\r', '\n']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
}

/// `text` as one chunk, or as is on a close-delimited stream.
fn frame(chunked: bool, text: &str) -> Vec<u8> {
    if !chunked {
        return text.as_bytes().to_vec();
    }
    format!("{:x}\r\n{text}\r\n", text.len()).into_bytes()
}

/// What woke a waiting stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Tick,
    Left,
    Shutdown,
}

/// Serves a stream, its head and first events sent, until it ends.
///
/// A function returning an `async move` block, as `session::run` is: the
/// future lives as long as the client, and this keeps it to the state a
/// waiting stream needs.
#[allow(clippy::manual_async_fn)] // deliberate, see above
pub(crate) fn run(mut stream: Stream, events: Events, server: &WsServer) -> impl Future<Output = ()> + '_ {
    async move {
        let Events { chunked, mut next_id } = events;
        let _open = Open::new(server);
        let mut seen = server.ticker.ticks.get();
        let mut skipped = 0u32;
        loop {
            match wait(&mut stream, &server.ticker, &server.shutdown, seen).await {
                Wake::Left => return server.metrics.sse_closed("client_left"),
                Wake::Shutdown => return Box::pin(end(stream, chunked, server)).await,
                Wake::Tick => seen = server.ticker.ticks.get(),
            }
            match send_event(&mut stream, chunked, next_id, server.ticker.at.get()) {
                Sent::Whole(n) => {
                    server.metrics.sse_bytes_sent.inc_by(n as u64);
                }
                Sent::Skipped => {
                    skipped += 1;
                    if too_slow(skipped, server) {
                        return server.metrics.sse_closed("write_timeout");
                    }
                    continue;
                }
                Sent::Part { sent, rest } => {
                    server.metrics.sse_bytes_sent.inc_by(sent as u64);
                    if !Box::pin(send_rest(&mut stream, rest, server)).await {
                        return server.metrics.sse_closed("write_timeout");
                    }
                }
                Sent::Failed => return server.metrics.sse_closed("reset"),
            }
            server.metrics.sse_events.inc();
            next_id = next_id.wrapping_add(1);
            skipped = 0;
        }
    }
}

/// Counts a skipped event: true once the client has taken nothing for
/// `write_timeout` (that many ticks in a row skipped).
fn too_slow(skipped: u32, server: &WsServer) -> bool {
    server.metrics.sse_skipped.inc();
    let slow = server.ticker.interval.saturating_mul(skipped) >= server.config.write_timeout;
    if slow {
        debug!("SSE client did not read for write_timeout; closing");
    }
    slow
}

/// A stream's place in the gauge and the ticker, for as long as it runs.
struct Open<'a>(&'a WsServer);

impl<'a> Open<'a> {
    fn new(server: &'a WsServer) -> Self {
        server.ticker.join();
        server.metrics.sse_streams.inc();
        server.metrics.sse_opened.inc();
        Open(server)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.ticker.leave();
        self.0.metrics.sse_streams.dec();
    }
}

/// Waits for a tick after `seen`, the shutdown, or the client to leave.
/// Bytes the client sends meanwhile are read and dropped.
async fn wait(stream: &mut Stream, ticker: &Ticker, shutdown: &Shutdown, seen: u64) -> Wake {
    loop {
        if shutdown.is_triggered() {
            return Wake::Shutdown;
        }
        if ticker.ticks.get() != seen {
            return Wake::Tick;
        }
        let notified = ticker.notify.notified();
        tokio::pin!(notified);
        let readable = poll_fn(|cx| {
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            stream.poll_read_ready(cx).map(|_| true)
        })
        .await;
        if readable && client_left(stream) {
            return Wake::Left;
        }
    }
}

/// Reads what the client sent: true at its end of stream or an error.
fn client_left(stream: &mut Stream) -> bool {
    let mut sink = [0u8; 512];
    match stream.try_read(&mut sink) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// What became of one event.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Whole(usize),
    /// The socket's buffer was full: nothing was written.
    Skipped,
    /// The kernel took `sent` bytes; `rest` must follow.
    Part {
        sent: usize,
        rest: Vec<u8>,
    },
    Failed,
}

/// Formats the `time` event `id` on the stack and offers it to the kernel
/// in one non-blocking write.
fn send_event(stream: &mut Stream, chunked: bool, id: u64, at: SystemTime) -> Sent {
    let mut buf = [0u8; EVENT_MAX];
    let len = format_event(&mut buf, chunked, id, at);
    match stream.try_write(&buf[..len]) {
        Ok(n) if n == len => Sent::Whole(n),
        Ok(n) => Sent::Part { sent: n, rest: buf[n..len].to_vec() },
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Sent::Skipped,
        Err(_) => Sent::Failed,
    }
}

/// Writes the `time` event into `buf`; returns its length.
fn format_event(buf: &mut [u8; EVENT_MAX], chunked: bool, id: u64, at: SystemTime) -> usize {
    let mut body = [0u8; EVENT_MAX];
    let mut cursor = std::io::Cursor::new(&mut body[..]);
    write!(cursor, "event: time\ndata: {}\nid: {id}\n\n", humantime::format_rfc3339_millis(at))
        .expect("an event fits in EVENT_MAX");
    let body_len = cursor.position() as usize;
    let mut out = std::io::Cursor::new(&mut buf[..]);
    if chunked {
        write!(out, "{body_len:x}\r\n").expect("fits");
    }
    std::io::Write::write_all(&mut out, &body[..body_len]).expect("fits");
    if chunked {
        std::io::Write::write_all(&mut out, b"\r\n").expect("fits");
    }
    out.position() as usize
}

/// The rest of an event the kernel took part of, within `write_timeout`;
/// ticks meanwhile are missed (the next event carries the next tick).
async fn send_rest(stream: &mut Stream, rest: Vec<u8>, server: &WsServer) -> bool {
    let write = async {
        stream.write_all(&rest).await?;
        stream.flush().await
    };
    let done = matches!(tokio::time::timeout(server.config.write_timeout, write).await, Ok(Ok(())));
    if done {
        server.metrics.sse_bytes_sent.inc_by(rest.len() as u64);
    }
    done
}

/// Ends a stream at shutdown: the final chunk (HTTP/1.1), then the close,
/// within the shutdown's grace.
async fn end(mut stream: Stream, chunked: bool, server: &WsServer) {
    server.metrics.sse_closed("shutdown");
    let deadline = server.shutdown.deadline().unwrap_or_else(|| Instant::now() + server.config.close_timeout);
    if chunked {
        const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
        let write = async {
            stream.write_all(LAST_CHUNK).await?;
            stream.flush().await
        };
        if !matches!(tokio::time::timeout_at(deadline, write).await, Ok(Ok(()))) {
            return;
        }
        server.metrics.sse_bytes_sent.inc_by(LAST_CHUNK.len() as u64);
    }
    let limit = deadline.saturating_duration_since(Instant::now()).min(server.config.close_timeout);
    linger_close(&mut stream, limit).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::listener::ConnectionLimit;
    use crate::metrics::WebSocketMetrics;
    use std::sync::Arc;

    fn server(config: crate::config::WebSocketConfig) -> Rc<WsServer> {
        let tungstenite = Config::default().tungstenite();
        let metrics = Arc::new(WebSocketMetrics::default());
        let limit = ConnectionLimit::new(10, metrics.connections.clone());
        WsServer::new(config, tungstenite, metrics, Rc::new(Shutdown::new()), limit)
    }

    use crate::ws::handshake::echoed_request as request;

    fn peer() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (Stream::Plain(accepted), client)
    }

    /// An idle stream is this future and its socket: it must stay about
    /// what an idle WebSocket session costs.
    #[tokio::test]
    async fn a_stream_costs_a_small_future() {
        let server = server(Config::default().websocket);
        let (accepted, _client) = pair().await;
        let events = Events { chunked: true, next_id: 1 };
        let size = std::mem::size_of_val(&run(accepted, events, &server));
        println!("SSE stream future: {size} bytes");
        assert!(size <= 256, "the SSE stream's future grew to {size} bytes");
    }

    #[test]
    fn the_path_with_or_without_a_query() {
        assert!(is_path("/.sse") && is_path("/.sse?x=1"));
        assert!(!is_path("/.sse/more") && !is_path("/") && !is_path("/.ss"));
    }

    #[test]
    fn a_time_event_is_one_chunk_with_a_timestamp_and_the_id() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let mut buf = [0u8; EVENT_MAX];
        let len = format_event(&mut buf, true, 42, at);
        let body = "event: time\ndata: 2023-11-14T22:13:20.250Z\nid: 42\n\n";
        assert_eq!(std::str::from_utf8(&buf[..len]).unwrap(), format!("{:x}\r\n{body}\r\n", body.len()));
        let len = format_event(&mut buf, false, u64::MAX, at);
        assert!(std::str::from_utf8(&buf[..len]).unwrap().ends_with("id: 18446744073709551615\n\n"));
    }

    #[test]
    fn last_event_id_continues_the_counter_if_it_is_ours() {
        let with = |id: &str| next_id(&request(&format!("GET /.sse HTTP/1.1\r\nHost: x\r\n{id}\r\n")));
        assert_eq!(with(""), 1);
        assert_eq!(with("Last-Event-ID: 41\r\n"), 42);
        assert_eq!(with("last-event-id:  7 \r\n"), 8);
        assert_eq!(with("Last-Event-ID: abc\r\n"), 1, "someone else's id");
        assert_eq!(with("Last-Event-ID: 18446744073709551615\r\n"), 1, "no overflow");
    }

    #[test]
    fn a_stream_opens_with_the_request_echo_and_the_host_when_named() {
        let mut config = Config::default().websocket;
        config.send_server_hostname = true;
        let server = server(config);
        let get = request("GET /.sse?a=1 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
        let Opening::Stream(events, bytes) = open(&get, peer(), &server) else { panic!("a stream") };
        assert_eq!(events, Events { chunked: true, next_id: 1 });
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        for line in ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Cache-Control: no-cache"] {
            assert!(head.contains(line), "{head}");
        }
        assert!(head.contains("Transfer-Encoding: chunked") && head.contains("X-Served-By: "), "{head}");
        let host = server.hostname.clone().unwrap();
        let events = format!(
            "event: server\ndata: {host}\n\nevent: request\ndata: Request from 127.0.0.1:5000\ndata: \n\
             data: GET /.sse?a=1 HTTP/1.1\ndata: \ndata: Host: x\ndata: Accept: text/event-stream\n\n"
        );
        assert_eq!(body, format!("{:x}\r\n{events}\r\n", events.len()));

        let old = request("GET /.sse HTTP/1.0\r\n\r\n");
        let Opening::Stream(events, bytes) = open(&old, peer(), &server) else { panic!("a stream") };
        assert!(!events.chunked, "HTTP/1.0: close-delimited");
        let text = String::from_utf8(bytes).unwrap();
        assert!(!text.contains("chunked") && text.contains("\r\n\r\nevent: server\n"), "{text}");
    }

    #[test]
    fn head_bad_requests_and_the_switch() {
        let server = server(Config::default().websocket);
        let Opening::Head(head) = open(&request("HEAD /.sse HTTP/1.1\r\nHost: x\r\n\r\n"), peer(), &server)
        else {
            panic!("a head")
        };
        let head = String::from_utf8(head).unwrap();
        assert!(head.ends_with("\r\n\r\n") && head.contains("Connection: keep-alive"), "{head}");
        let body = request("GET /.sse HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n");
        assert!(matches!(open(&body, peer(), &server), Opening::Refuse(r) if r.status == 400));
        let off = self::server(crate::config::WebSocketConfig { sse: false, ..Config::default().websocket });
        let get = request("GET /.sse HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(matches!(open(&get, peer(), &off), Opening::Refuse(r) if r.status == 404));
        server.shutdown.trigger(Duration::from_secs(1));
        assert!(matches!(open(&get, peer(), &server), Opening::Refuse(r) if r.status == 503));
    }

    /// A client that does not read: once its socket's buffers are full, an
    /// event is skipped whole, and nothing of it is kept.
    #[tokio::test]
    async fn a_full_socket_skips_the_event_instead_of_queueing_it() {
        let (mut accepted, _client) = pair().await;
        socket2::SockRef::from(accepted.tcp()).set_send_buffer_size(4096).unwrap();
        let filler = vec![b'x'; 64 * 1024];
        while accepted.try_write(&filler).is_ok() {}
        assert_eq!(send_event(&mut accepted, true, 1, SystemTime::now()), Sent::Skipped);
    }
}
