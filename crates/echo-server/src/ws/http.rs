//! The HTTP requests of one connection on the WebSocket port, one after
//! the other, until one upgrades, the connection must close, or the client
//! leaves.
//!
//! With `http_echo` on, a plain request's body is read (by its
//! `Content-Length`, or chunked), the request is answered with the page or
//! its echo, and the connection stays open for the next one (keep-alive),
//! unless the client or the server's state says otherwise. With it off, as
//! before the echo existed, every plain request gets one answer and a close.
//!
//! What one connection can cost is bounded on every path:
//!
//! - time: each request head must arrive within `handshake_timeout` of
//!   the previous answer (or of the accept), and a body may not stall for
//!   longer (HTTP 408); an idle keep-alive connection closes at shutdown;
//! - memory: a head is at most `max_request_header_size`, a body at most
//!   `max_request_body_size` (HTTP 413, checked on the declared length
//!   before anything is read), and past [`budget::PAUSE_PARTIAL`] bytes a
//!   body grows only while the memory budget has room (HTTP 503). Between
//!   requests the connection holds no buffer at all;
//! - the event loop: a connection moves at most [`TURN_BYTES`] of a body
//!   (read or written) before it yields, and yields after each answer, so
//!   that a client pipelining requests or streaming large bodies takes its
//!   turn like everyone else. Without that, tokio's budget of 128 reads
//!   lets one turn take a whole 1 MiB body and write its echo: a WebSocket
//!   client's echo then waited behind it (measured: p50 doubled).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::ops::ControlFlow;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use super::WsServer;
use super::chunked::{ChunkError, ChunkedDecoder, Field};
use super::handshake::{
    Decision, Framing, HeadError, PAGE, PAGE_PATH, PlainRequest, Policy, Response, decide_with, linger_close,
    read_head,
};
use super::stream::Stream;
use super::{http_echo, live, replica, sse};
use crate::budget;

/// Most bytes of a body one connection reads or writes per turn of the
/// event loop (one read of a `Content-Length` body takes at most this).
const TURN_BYTES: usize = 64 * 1024;

/// Where a connection's requests led, when it was not to their end.
#[derive(Debug)]
pub(crate) enum Next {
    Upgrade(Upgrade),
    /// A Server-Sent Events stream, its head and first events sent.
    Events(sse::Events),
}

/// A completed upgrade.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Bytes the client sent after the request head (its first frames).
    pub leftover: Vec<u8>,
    /// The subprotocol we selected.
    pub subprotocol: Option<String>,
    pub path: String,
}

/// Serves the connection's requests; returns the upgrade, with its `101`
/// sent, when one of them is an upgrade, and the stream, with its head
/// sent, when one asks for Server-Sent Events. Every answer, failure and
/// request is counted in the metrics here.
pub(crate) async fn serve(stream: &mut Stream, peer: SocketAddr, server: &WsServer) -> Option<Next> {
    let config = &server.config;
    let policy = Policy {
        preferred: server.mqtt.as_ref().map(|_| "mqtt"),
        http_echo: config.http_echo,
        sse: config.sse,
    };
    let mut buf = Vec::new();
    let mut answered = 0u64;
    loop {
        let head_len = next_head(stream, &mut buf, answered == 0, server).await?;
        if answered > 0 {
            server.metrics.http_keepalive_requests.inc();
        }
        match decide_with(&buf[..head_len], policy) {
            Decision::Upgrade { response, subprotocol, path } => {
                let response = upgrade_response(response, subprotocol.as_deref(), server);
                if !write(stream, &response, deadline(server)).await {
                    server.metrics.handshake_failed("disconnected");
                    return None;
                }
                buf.drain(..head_len);
                return Some(Next::Upgrade(Upgrade { leftover: buf, subprotocol, path }));
            }
            Decision::Refuse(response) => return finish(stream, response, Some("refused"), server).await,
            Decision::Respond(response) => return finish(stream, response, None, server).await,
            Decision::Plain(request) if asks_for_events(&request) => {
                buf.drain(..head_len);
                // Boxed, as an exchange is.
                if let ControlFlow::Break(next) = Box::pin(events(stream, &request, peer, server)).await {
                    return next;
                }
            }
            Decision::Plain(request) => {
                buf.drain(..head_len);
                // Boxed: a request's body, answer and their futures exist
                // only while it is served, not while the connection waits
                // for the next one.
                if !Box::pin(exchange(stream, &mut buf, &request, peer, server)).await {
                    return None;
                }
            }
        }
        answered += 1;
        if buf.is_empty() {
            // Nothing of the next request yet: hold no buffer while waiting.
            buf = Vec::new();
        }
        tokio::task::yield_now().await;
    }
}

/// Reads the next request head into `buf`; `None` when the connection is
/// over (answered with 400 or 431 if the head was bad). The first request
/// is a handshake: its failures are counted as such. Between keep-alive
/// requests, a client that leaves or stays silent is no failure, and
/// shutdown closes the connection at once.
async fn next_head(stream: &mut Stream, buf: &mut Vec<u8>, first: bool, server: &WsServer) -> Option<usize> {
    let config = &server.config;
    let (max, max_headers) = (config.max_request_header_size as usize, config.max_request_headers as usize);
    let read = tokio::time::timeout(config.handshake_timeout, read_head(stream, buf, max, max_headers));
    let result = if first {
        read.await
    } else {
        tokio::select! {
            biased;
            _ = server.shutdown.wait() => return None,
            result = read => result,
        }
    };
    let failed = |reason| {
        if first {
            server.metrics.handshake_failed(reason);
        }
        None
    };
    match result {
        Ok(Ok(len)) => Some(len),
        Err(_) => failed("timeout"),
        Ok(Err(HeadError::Closed)) => failed("disconnected"),
        Ok(Err(HeadError::TooLarge)) => {
            let response = Response::error(
                431,
                format!("request head larger than {max} bytes or with more than {max_headers} headers"),
            );
            finish(stream, response, Some("too_large"), server).await
        }
        Ok(Err(HeadError::Malformed)) => {
            finish(stream, Response::error(400, "malformed HTTP request"), Some("malformed"), server).await
        }
    }
}

/// A GET or HEAD at the events' path (the only methods it serves: others
/// are echoed there, as at the page's path).
fn asks_for_events(request: &PlainRequest) -> bool {
    matches!(request.method.as_str(), "GET" | "HEAD") && sse::is_path(&request.target)
}

/// Answers a GET or HEAD at the events' path: `Break` with the stream
/// when it starts (or `None` when the connection is over), `Continue` for
/// the next request after a HEAD.
async fn events(
    stream: &mut Stream,
    request: &PlainRequest,
    peer: SocketAddr,
    server: &WsServer,
) -> ControlFlow<Option<Next>> {
    server.metrics.http_request(&request.method);
    match sse::open(request, peer, server) {
        sse::Opening::Refuse(response) => ControlFlow::Break(finish(stream, response, None, server).await),
        sse::Opening::Stream(events, bytes) => {
            ControlFlow::Break(start_events(stream, &bytes, server).await.then_some(Next::Events(events)))
        }
        sse::Opening::Head(bytes) if start_events(stream, &bytes, server).await && request.keep_alive => {
            ControlFlow::Continue(())
        }
        sse::Opening::Head(_) => ControlFlow::Break(None),
    }
}

/// Sends the head (and first events) of an SSE answer, and counts it.
async fn start_events(stream: &mut Stream, bytes: &[u8], server: &WsServer) -> bool {
    server.metrics.http_response(200);
    let sent = write(stream, bytes, deadline(server)).await;
    if sent {
        server.metrics.sse_bytes_sent.inc_by(bytes.len() as u64);
    }
    sent
}

/// The `101`, naming the host when asked to, followed by the first message
/// of an echo session (not of an MQTT one) in the same write.
fn upgrade_response(mut response: Vec<u8>, subprotocol: Option<&str>, server: &WsServer) -> Vec<u8> {
    let Some(host) = server.hostname.as_deref() else {
        return response;
    };
    // Before the blank line that ends the head.
    response.truncate(response.len() - 2);
    response.extend_from_slice(format!("{}: {host}\r\n\r\n", replica::HEADER).as_bytes());
    let mqtt = server.mqtt.is_some() && subprotocol == Some("mqtt");
    if !mqtt {
        let greeting = replica::greeting_frame(host);
        server.metrics.bytes_sent.inc_by(greeting.len() as u64);
        response.extend_from_slice(&greeting);
    }
    response
}

/// Reads a plain request's body and answers it; true when the connection
/// stays open for the next request.
async fn exchange(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    request: &PlainRequest,
    peer: SocketAddr,
    server: &WsServer,
) -> bool {
    let metrics = &server.metrics;
    metrics.http_request(&request.method);
    let (body, trailers) = match read_body(stream, buf, request, server).await {
        Ok(body) => body,
        Err(Some(response)) => return finish::<()>(stream, response, None, server).await.is_some(),
        Err(None) => return false,
    };
    metrics.http_body_bytes.inc_by(body.len() as u64);
    let mut response = match route(request) {
        Route::Page { vary } => page(request, vary),
        Route::Resource(resource) => live::response(resource, request.method == "HEAD", &server.live),
        Route::Echo => {
            let received = http_echo::Received {
                request,
                body: &body,
                trailers: &trailers,
                client: peer,
                served_by: server.hostname.as_deref(),
            };
            http_echo::response(&received)
        }
    };
    drop(body);
    // With the echo off, one request per connection, as for the page.
    response.keep_alive = request.keep_alive && !server.shutdown.is_triggered() && server.config.http_echo;
    if !response.keep_alive {
        return finish::<()>(stream, response, None, server).await.is_some();
    }
    write_response(stream, &response, server).await
}

/// Where a plain request goes when the echo is on.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// The page; `vary` when it depends on `Accept` (at `/`).
    Page {
        vary: bool,
    },
    /// What the page loads: its live figures, MQTT.js.
    Resource(live::Resource),
    Echo,
}

/// The page at [`PAGE_PATH`], and at `/` for a browser (a client naming
/// `text/html` in `Accept`), and what it loads (GET and HEAD, any
/// `Accept`); everything else is echoed.
fn route(request: &PlainRequest) -> Route {
    if !matches!(request.method.as_str(), "GET" | "HEAD") {
        return Route::Echo;
    }
    if let Some(resource) = live::resource(request.path()) {
        return Route::Resource(resource);
    }
    match request.path() {
        PAGE_PATH => Route::Page { vary: false },
        "/" | "/index.html" if http_echo::accepts(request, "text/html") => Route::Page { vary: true },
        _ => Route::Echo,
    }
}

fn page(request: &PlainRequest, vary: bool) -> Response {
    let mut response = Response::new(200, "text/html; charset=utf-8", Cow::Borrowed(PAGE.as_bytes()));
    response.head_only = request.method == "HEAD";
    if vary { response.with_header("Vary", "Accept") } else { response }
}

/// A body and its trailers, or why there is none: the response that says
/// so, or `None` when the client left.
type BodyResult = Result<(Vec<u8>, Vec<Field>), Option<Response>>;

/// Reads the body `request` announces, starting with what `buf` already
/// holds; bytes after the body stay in `buf` for the next request.
async fn read_body(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    request: &PlainRequest,
    server: &WsServer,
) -> BodyResult {
    let max = u64::from(server.config.max_request_body_size);
    if let Framing::Length(n) = request.framing
        && n > max
    {
        return Err(Some(too_large(max)));
    }
    if request.expects_continue
        && buf.is_empty()
        && !write(stream, b"HTTP/1.1 100 Continue\r\n\r\n", deadline(server)).await
    {
        return Err(None);
    }
    match request.framing {
        Framing::Empty => Ok((Vec::new(), Vec::new())),
        Framing::Length(n) => read_length(stream, buf, n as usize, server).await,
        Framing::Chunked => read_chunked(stream, buf, max, server).await,
    }
}

fn too_large(max: u64) -> Response {
    Response::error(413, format!("request body larger than {max} bytes (websocket.max_request_body_size)"))
}

/// A `Content-Length` body of `len` bytes (already checked against the limit).
async fn read_length(stream: &mut Stream, buf: &mut Vec<u8>, len: usize, server: &WsServer) -> BodyResult {
    let from_buf = len.min(buf.len());
    let mut body: Vec<u8> = buf.drain(..from_buf).collect();
    while body.len() < len {
        let want = (len - body.len()).min(TURN_BYTES);
        body.reserve(want);
        let held = body.len();
        let mut limited = (&mut *stream).take(want as u64);
        read_more(limited.read_buf(&mut body), held, server).await?;
        tokio::task::yield_now().await;
    }
    Ok((body, Vec::new()))
}

/// A chunked body, decoded as it arrives.
async fn read_chunked(stream: &mut Stream, buf: &mut Vec<u8>, max: u64, server: &WsServer) -> BodyResult {
    let config = &server.config;
    let mut decoder = ChunkedDecoder::new(
        max,
        config.max_request_header_size as usize,
        config.max_request_headers as usize,
    );
    let (mut body, mut trailers) = (Vec::new(), Vec::new());
    let mut this_turn = 0;
    loop {
        let used = decoder.decode(buf, &mut body, &mut trailers).map_err(|e| Some(chunk_error(e, max)))?;
        buf.drain(..used);
        if decoder.is_done() {
            return Ok((body, trailers));
        }
        buf.reserve(config.read_buffer_size as usize);
        let held = body.len() + buf.len();
        this_turn += read_more(stream.read_buf(buf), held, server).await?;
        if this_turn >= TURN_BYTES {
            this_turn = 0;
            tokio::task::yield_now().await;
        }
    }
}

fn chunk_error(error: ChunkError, max: u64) -> Response {
    match error {
        ChunkError::Malformed => Response::error(400, "malformed chunked body"),
        ChunkError::BodyTooLarge => too_large(max),
        ChunkError::TrailersTooLarge => Response::error(431, "chunked body's trailer section too large"),
    }
}

/// One read of a body: it must bring bytes within `handshake_timeout`
/// (else 408), and a body past [`budget::PAUSE_PARTIAL`] bytes grows only
/// while the memory budget has room (else 503). Returns the bytes read.
async fn read_more(
    read: impl Future<Output = std::io::Result<usize>>,
    held: usize,
    server: &WsServer,
) -> Result<usize, Option<Response>> {
    if held > budget::PAUSE_PARTIAL && !server.budget.allows("http_body") {
        let response = Response::error(503, "the server is at its memory limit; try again later");
        return Err(Some(response.with_header("Retry-After", "1")));
    }
    let limit = server.config.handshake_timeout;
    match tokio::time::timeout(limit, read).await {
        Ok(Ok(0)) | Ok(Err(_)) => Err(None),
        Ok(Ok(n)) => Ok(n),
        Err(_) => Err(Some(Response::error(
            408,
            format!(
                "the request body stalled for {} (websocket.handshake_timeout)",
                humantime::format_duration(limit)
            ),
        ))),
    }
}

/// Writes a response (naming the host when asked to) and counts it; false
/// when the client did not take all of it within `write_timeout`.
async fn write_response(stream: &mut Stream, response: &Response, server: &WsServer) -> bool {
    let named;
    let response = match server.hostname.as_deref() {
        Some(host) => {
            named = response.clone().with_header(replica::HEADER, host);
            &named
        }
        None => response,
    };
    server.metrics.http_response(response.status);
    // A large body goes out from where it is, after the head, a turn's
    // worth at a time.
    let mut bytes = response.head();
    let separate = !response.head_only && response.body.len() > TURN_BYTES;
    if !response.head_only && !separate {
        bytes.extend_from_slice(&response.body);
    }
    let deadline = deadline(server);
    if !write(stream, &bytes, deadline).await {
        return false;
    }
    if separate {
        for piece in response.body.chunks(TURN_BYTES) {
            tokio::task::yield_now().await;
            if !write(stream, piece, deadline).await {
                return false;
            }
        }
    }
    true
}

/// When a write starting now must be done: `write_timeout` from now.
fn deadline(server: &WsServer) -> Instant {
    Instant::now() + server.config.write_timeout
}

/// Writes `bytes` and flushes them: over TLS, what rustls could not hand
/// to the socket yet must go out before the connection waits for the
/// client (a no-op over plain TCP).
async fn write(stream: &mut Stream, bytes: &[u8], deadline: Instant) -> bool {
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    matches!(tokio::time::timeout_at(deadline, write).await, Ok(Ok(())))
}

/// Sends a last response and closes politely: FIN first, then discard what
/// the client still sends until it closes too, so the response is not lost
/// to a reset caused by unread input. Always `None`: the connection is over.
///
/// Boxed: it runs once, at the end, and inlined it would enlarge the
/// future every waiting keep-alive connection holds (the drain's buffer).
async fn finish<T>(
    stream: &mut Stream,
    response: Response,
    failure: Option<&'static str>,
    server: &WsServer,
) -> Option<T> {
    Box::pin(answer_and_close(stream, response, failure, server)).await;
    None
}

async fn answer_and_close(
    stream: &mut Stream,
    response: Response,
    failure: Option<&'static str>,
    server: &WsServer,
) {
    let response = Response { keep_alive: false, ..response };
    if let Some(reason) = failure {
        server.metrics.handshake_failed(reason);
    }
    if write_response(stream, &response, server).await {
        debug!(status = response.status, "answered and closing");
        linger_close(stream, server.config.close_timeout).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::handshake::echoed_request;

    /// An idle keep-alive connection waits inside [`serve`]: its future is
    /// what such a connection costs, besides its socket.
    #[tokio::test]
    async fn a_waiting_keep_alive_connection_costs_a_small_future() {
        use crate::config::Config;
        use crate::listener::ConnectionLimit;
        use crate::metrics::WebSocketMetrics;
        use std::rc::Rc;
        use std::sync::Arc;
        let config = Config::default();
        let metrics = Arc::new(WebSocketMetrics::default());
        let limit = ConnectionLimit::new(10, metrics.connections.clone());
        let shutdown = Rc::new(crate::shutdown::Shutdown::new());
        let server = WsServer::new(config.websocket.clone(), config.tungstenite(), metrics, shutdown, limit);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let mut accepted = Stream::Plain(accepted);
        let size = std::mem::size_of_val(&serve(&mut accepted, peer, &server));
        println!("serve future: {size} bytes");
        assert!(size <= 832, "the keep-alive connection's future grew to {size} bytes");
    }

    #[test]
    fn the_page_is_at_its_path_and_at_the_root_for_browsers() {
        let get = |target: &str, accept: &str| {
            route(&echoed_request(&format!("GET {target} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n")))
        };
        assert_eq!(get("/.ws", "*/*"), Route::Page { vary: false });
        assert_eq!(get("/.ws?x=1", "application/json"), Route::Page { vary: false });
        assert_eq!(get("/", "text/html,*/*;q=0.8"), Route::Page { vary: true });
        assert_eq!(get("/index.html", "text/html"), Route::Page { vary: true });
        assert_eq!(get("/", "*/*"), Route::Echo);
        assert_eq!(get("/other", "text/html"), Route::Echo);
        let post = echoed_request("POST /.ws HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n");
        assert_eq!(route(&post), Route::Echo);
        assert_eq!(get("/.stats", "text/html"), Route::Resource(live::Resource::Stats));
        assert_eq!(get("/.ws/mqtt.min.js?v=1", "*/*"), Route::Resource(live::Resource::MqttJs));
        let post = echoed_request("POST /.stats HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(route(&post), Route::Echo, "as at the page's path");
    }
}
