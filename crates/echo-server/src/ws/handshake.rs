//! The HTTP side of the WebSocket port: the opening handshake (RFC 6455 §4),
//! the browser page, and a proper status for every other request.
//!
//! We read and answer request heads ourselves, with `httparse` doing the
//! parsing, instead of handing the socket to tungstenite's handshake:
//! tungstenite answers only upgrades, while this port must also serve the
//! page, echo plain requests (`http_echo`) and turn away everything else
//! with the right status (400, 404, 405, 426, 431) and a one-line reason,
//! never a reset or a hang. This module decides what a complete head asks
//! for; [`super::http`] reads the heads and bodies of a connection's
//! requests and writes the answers.

use std::borrow::Cow;

use super::stream::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::chunked::Field;

/// The page: a self-contained echo client for browsers.
pub const PAGE: &str = include_str!("page.html");

/// Where the page always is (as on jmalloc/echo-server). `GET /` serves it
/// too, to browsers (see [`route`]).
pub const PAGE_PATH: &str = "/.ws";

/// What the server does with plain requests, from the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy<'a> {
    /// Selected when the client offers it among its subprotocols (`mqtt`),
    /// even if it is not the first one offered.
    pub preferred: Option<&'a str>,
    /// `websocket.http_echo`: plain requests are echoed, on keep-alive
    /// connections; otherwise they get the page, 404 or 405, and a close.
    pub http_echo: bool,
    /// `websocket.sse`: a GET or HEAD at [`super::sse::PATH`] is handed on
    /// as a plain request even with the echo off.
    pub sse: bool,
}

/// An HTTP response. Unless `keep_alive`, the connection ends after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub content_type: &'static str,
    pub body: Cow<'static, [u8]>,
    /// HEAD: send the headers (with the body's length) but not the body.
    pub head_only: bool,
    /// Say `Connection: keep-alive` and wait for the next request.
    pub keep_alive: bool,
    /// `Cache-Control`: `no-store` (every answer here is live or an echo)
    /// but for the page's vendored script.
    pub cache_control: &'static str,
}

impl Response {
    /// A plain-text error with a one-line explanation.
    pub fn error(status: u16, explanation: impl Into<Cow<'static, str>>) -> Response {
        let mut body = explanation.into().into_owned();
        body.push('\n');
        Response::new(status, "text/plain; charset=utf-8", body.into_bytes().into())
    }

    pub fn new(status: u16, content_type: &'static str, body: Cow<'static, [u8]>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            content_type,
            body,
            head_only: false,
            keep_alive: false,
            cache_control: "no-store",
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The status line and headers, through the blank line.
    pub fn head(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: echo-server/{}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\nCache-Control: {}\r\n",
            self.status,
            reason_phrase(self.status),
            env!("CARGO_PKG_VERSION"),
            self.content_type,
            self.body.len(),
            if self.keep_alive { "keep-alive" } else { "close" },
            self.cache_control,
        );
        for (name, value) in &self.headers {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    /// What goes on the wire: the head, and the body unless `head_only`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// How a request's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A complete plain (not upgrade) request head, owned, for the echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainRequest {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Every field, in the order and case received.
    pub headers: Vec<Field>,
    pub framing: Framing,
    /// The client wants the connection kept open after the answer.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead to send its body.
    pub expects_continue: bool,
}

impl PlainRequest {
    /// The values of every field named `name`, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    /// The target's path, without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(path, _)| path)
    }

    /// The query, without the `?` ("" when there is none).
    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, query)| query)
    }
}

/// What to do with a complete request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Switch protocols with this `101` response.
    Upgrade { response: Vec<u8>, subprotocol: Option<String>, path: String },
    /// Answer a plain request (page, 404, 405, or a bad request) and close.
    Respond(Response),
    /// Refuse a WebSocket upgrade with this error and close.
    Refuse(Response),
    /// A plain request to read the body of and answer (`http_echo`).
    Plain(PlainRequest),
}

/// Why reading a request head stopped short.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeadError {
    TooLarge,
    Malformed,
    Closed,
}

/// Reads until `buf` holds a complete request head; returns its length.
/// `buf` may already hold bytes: the next request, sent before the answer
/// to the previous one. A buffer without capacity is allocated only once
/// the socket is readable, so a keep-alive connection waiting for its next
/// request holds none.
pub(crate) async fn read_head(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    max: usize,
    max_headers: usize,
) -> Result<usize, HeadError> {
    loop {
        if !buf.is_empty() {
            match parse_head_len(buf, max_headers)? {
                Some(len) if len > max => return Err(HeadError::TooLarge),
                Some(len) => return Ok(len),
                None => {}
            }
        }
        if buf.len() >= max {
            return Err(HeadError::TooLarge);
        }
        if buf.capacity() == 0 {
            stream.readable().await.map_err(|_| HeadError::Closed)?;
        }
        if buf.capacity() == buf.len() {
            buf.reserve((buf.len()).min(max - buf.len()).max(1024.min(max)));
        }
        let n = stream.read_buf(buf).await.map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
    }
}

/// `Some(len)` when the head is complete, `None` when more bytes are needed.
/// Parsing the partial head after every read lets garbage (a TLS hello, an
/// MQTT packet) be answered with 400 at once instead of after a timeout.
/// More than `max_headers` header lines is too large (431), whatever their
/// size: `websocket.max_request_headers`.
fn parse_head_len(buf: &[u8], max_headers: usize) -> Result<Option<usize>, HeadError> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed),
    }
}

/// Half-closes the socket (over TLS, after a close_notify) and drains it
/// until the peer closes or `limit` passes.
pub async fn linger_close(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    limit: std::time::Duration,
) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 1024];
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    };
    let _ = tokio::time::timeout(limit, drain).await;
}

/// Decides the answer to a complete request head, with the HTTP echo off.
/// Pure, so every branch is unit-tested without sockets.
pub fn decide(head: &[u8]) -> Decision {
    decide_with(head, Policy::default())
}

/// [`decide`], under `policy`: selecting `policy.preferred` when the client
/// offers it (MQTT.js offers `mqtt`; a client offering `mqttv3.1, mqtt` gets
/// `mqtt`), and handing plain requests on when the echo is on.
pub fn decide_with(head: &[u8], policy: Policy<'_>) -> Decision {
    // Room for every line of the head: the header count was limited when
    // the head was read.
    let lines = head.iter().filter(|&&b| b == b'\n').count();
    let mut headers = vec![httparse::EMPTY_HEADER; lines];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return Decision::Refuse(Response::error(400, "malformed HTTP request"));
    }
    let method = request.method.unwrap_or("");
    let path = request.path.unwrap_or("/").to_owned();
    let version = request.version.unwrap_or(0);
    let all_headers: &[httparse::Header<'_>] = request.headers;
    let header = |name: &'static str| all_headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
    let has_token = |name: &'static str, token: &str| {
        header(name).any(|h| {
            std::str::from_utf8(h.value)
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };

    if !has_token("upgrade", "websocket") {
        let events = policy.sse && matches!(method, "GET" | "HEAD") && super::sse::is_path(&path);
        // What the page reads is served as the page is, echo or not.
        let for_page = matches!(method, "GET" | "HEAD") && super::live::resource(&path).is_some();
        if policy.http_echo || events || for_page {
            return plain(&request);
        }
        return Decision::Respond(plain_request(method, &path));
    }
    let preferred = policy.preferred;
    if method != "GET" {
        return Decision::Refuse(
            Response::error(405, format!("a WebSocket upgrade must use GET, not {method}"))
                .with_header("Allow", "GET"),
        );
    }
    if version != 1 {
        return Decision::Refuse(Response::error(400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    if header("host").next().is_none() {
        return Decision::Refuse(Response::error(400, "the upgrade request has no Host header"));
    }
    if !has_token("connection", "upgrade") {
        return Decision::Refuse(Response::error(
            400,
            "the upgrade request's Connection header does not include \"Upgrade\"",
        ));
    }
    let versions: Vec<&[u8]> = header("sec-websocket-version").map(|h| h.value).collect();
    if versions.len() != 1 || versions[0].trim_ascii() != b"13" {
        return Decision::Refuse(
            Response::error(426, "this server speaks WebSocket version 13 (RFC 6455)")
                .with_header("Sec-WebSocket-Version", "13"),
        );
    }
    let keys: Vec<&[u8]> = header("sec-websocket-key").map(|h| h.value).collect();
    let key = match keys.as_slice() {
        [key] if is_valid_key(key.trim_ascii()) => key.trim_ascii(),
        [] => return Decision::Refuse(Response::error(400, "missing Sec-WebSocket-Key header")),
        _ => return Decision::Refuse(Response::error(400, "invalid Sec-WebSocket-Key header")),
    };
    let offered = || {
        header("sec-websocket-protocol")
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
    };
    let subprotocol = preferred
        .and_then(|wanted| offered().find(|p| *p == wanted))
        .or_else(|| offered().next())
        .map(str::to_owned);

    // No Sec-WebSocket-Extensions in the answer: tungstenite has no
    // permessage-deflate, and leaving an offered extension out of the
    // response is how RFC 6455 §9.1 declines it.
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key)
    );
    if let Some(protocol) = &subprotocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(protocol);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    Decision::Upgrade { response: response.into_bytes(), subprotocol, path }
}

/// A request head that must be a plain request (echoed, or an event
/// stream), for the tests of the modules that answer one.
#[cfg(test)]
pub(crate) fn echoed_request(head: &str) -> PlainRequest {
    match decide_with(head.as_bytes(), Policy { http_echo: true, sse: true, ..Policy::default() }) {
        Decision::Plain(request) => request,
        other => panic!("not a plain request: {other:?}"),
    }
}

/// A request that does not ask for an upgrade, with the HTTP echo off.
fn plain_request(method: &str, target: &str) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let is_page = matches!(path, "/" | "/index.html" | PAGE_PATH);
    match method {
        "GET" | "HEAD" if is_page => Response {
            head_only: method == "HEAD",
            ..Response::new(200, "text/html; charset=utf-8", Cow::Borrowed(PAGE.as_bytes()))
        },
        "GET" | "HEAD" => {
            let mut response = Response::error(
                404,
                format!(
                    "{path} not found: the page is at {PAGE_PATH}, and WebSocket clients may connect to any path"
                ),
            );
            response.head_only = method == "HEAD";
            response
        }
        // Also at the page's JSON and script, which GET and HEAD reach
        // through `plain` (they need the server's state).
        _ => Response::error(405, format!("{method} is not supported here: use GET"))
            .with_header("Allow", "GET, HEAD"),
    }
}

/// A plain request, with the HTTP echo on: its head, owned, and how its
/// body is delimited; or a 400 / 417 / 501 when that cannot be told safely.
fn plain(request: &httparse::Request<'_, '_>) -> Decision {
    let version = request.version.unwrap_or(1);
    let head = PlainRequest {
        method: request.method.unwrap_or("").to_owned(),
        target: request.path.unwrap_or("/").to_owned(),
        version,
        headers: request.headers.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect(),
        framing: Framing::Empty,
        keep_alive: false,
        expects_continue: false,
    };
    let tokens = |name: &'static str| -> Vec<String> {
        head.values(name)
            .flat_map(|v| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .filter(|t| !t.is_empty())
            .collect()
    };
    if version == 1 && head.values("host").next().is_none() {
        return Decision::Respond(Response::error(400, "an HTTP/1.1 request needs a Host header"));
    }
    let framing = match framing(&tokens("transfer-encoding"), &tokens("content-length"), version) {
        Ok(framing) => framing,
        Err(response) => return Decision::Respond(response),
    };
    let expect = tokens("expect");
    if expect.iter().any(|e| e != "100-continue") {
        return Decision::Respond(Response::error(417, "the only expectation supported is 100-continue"));
    }
    let connection = tokens("connection");
    let keep_alive = match version {
        1 => !connection.iter().any(|t| t == "close"),
        _ => connection.iter().any(|t| t == "keep-alive"),
    };
    let expects_continue = !expect.is_empty() && version == 1 && framing != Framing::Empty;
    Decision::Plain(PlainRequest { framing, keep_alive, expects_continue, ..head })
}

/// How the body is delimited (RFC 9112 §6.3), from the lowercased tokens
/// of `Transfer-Encoding` and `Content-Length`. Anything a proxy in front
/// could read differently is refused: both headers, differing lengths.
fn framing(transfer: &[String], lengths: &[String], version: u8) -> Result<Framing, Response> {
    if !transfer.is_empty() {
        if version == 0 {
            return Err(Response::error(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !lengths.is_empty() {
            return Err(Response::error(400, "both Transfer-Encoding and Content-Length"));
        }
        if transfer.last().map(String::as_str) != Some("chunked") {
            return Err(Response::error(400, "a request's last transfer coding must be chunked"));
        }
        if transfer.len() > 1 {
            return Err(Response::error(501, "only the chunked transfer coding is supported"));
        }
        return Ok(Framing::Chunked);
    }
    let Some(first) = lengths.first() else {
        return Ok(Framing::Empty);
    };
    let valid = !first.is_empty() && first.len() <= 19 && first.bytes().all(|b| b.is_ascii_digit());
    if !valid || lengths.iter().any(|l| l != first) {
        return Err(Response::error(400, "invalid Content-Length"));
    }
    match first.parse::<u64>() {
        Ok(0) => Ok(Framing::Empty),
        Ok(n) => Ok(Framing::Length(n)),
        Err(_) => Err(Response::error(400, "invalid Content-Length")),
    }
}

/// A key is the base64 encoding of 16 bytes: 22 characters and `==`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22].iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn upgrade_request(extra: &str) -> String {
        format!(
            "GET /chat HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn status(decision: Decision) -> u16 {
        match decision {
            Decision::Upgrade { .. } => 101,
            Decision::Respond(r) | Decision::Refuse(r) => r.status,
            Decision::Plain(_) => 200,
        }
    }

    #[test]
    fn rfc_6455_sample_handshake() {
        let Decision::Upgrade { response, subprotocol, path } = decide(upgrade_request("").as_bytes()) else {
            panic!("expected an upgrade");
        };
        let text = String::from_utf8(response).unwrap();
        // The example from RFC 6455 §1.3.
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{text}");
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(!text.contains("Sec-WebSocket-Extensions"));
        assert_eq!(subprotocol, None);
        assert_eq!(path, "/chat");
    }

    #[test]
    fn first_offered_subprotocol_is_selected() {
        let req =
            upgrade_request("Sec-WebSocket-Protocol: chat.v2, chat.v1\r\nSec-WebSocket-Protocol: other\r\n");
        let Decision::Upgrade { response, subprotocol, .. } = decide(req.as_bytes()) else {
            panic!("expected an upgrade");
        };
        assert_eq!(subprotocol.as_deref(), Some("chat.v2"));
        assert!(String::from_utf8(response).unwrap().contains("Sec-WebSocket-Protocol: chat.v2\r\n"));
    }

    #[test]
    fn preferred_subprotocol_wins_when_offered() {
        let req = upgrade_request("Sec-WebSocket-Protocol: mqttv3.1, mqtt\r\n");
        let Decision::Upgrade { subprotocol, .. } =
            decide_with(req.as_bytes(), Policy { preferred: Some("mqtt"), ..Policy::default() })
        else {
            panic!("expected an upgrade");
        };
        assert_eq!(subprotocol.as_deref(), Some("mqtt"));
        let req = upgrade_request("Sec-WebSocket-Protocol: chat\r\n");
        let Decision::Upgrade { subprotocol, .. } =
            decide_with(req.as_bytes(), Policy { preferred: Some("mqtt"), ..Policy::default() })
        else {
            panic!("expected an upgrade");
        };
        assert_eq!(subprotocol.as_deref(), Some("chat"));
    }

    #[test]
    fn compression_offer_is_declined_by_omission() {
        let req = upgrade_request("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n");
        let Decision::Upgrade { response, .. } = decide(req.as_bytes()) else {
            panic!("expected an upgrade");
        };
        assert!(!String::from_utf8(response).unwrap().contains("Extensions"));
    }

    #[test]
    fn bad_upgrades_get_their_status() {
        let cases = [
            (upgrade_request("").replace("GET", "POST"), 405),
            (upgrade_request("").replace("HTTP/1.1", "HTTP/1.0"), 400),
            (upgrade_request("").replace("Host: example\r\n", ""), 400),
            (upgrade_request("").replace("keep-alive, Upgrade", "keep-alive"), 400),
            (upgrade_request("").replace("Version: 13", "Version: 8"), 426),
            (upgrade_request("").replace(KEY, "short"), 400),
            (upgrade_request("").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""), 400),
        ];
        for (request, expected) in cases {
            assert_eq!(status(decide(request.as_bytes())), expected, "{request}");
        }
        let Decision::Refuse(r) = decide(upgrade_request("").replace("Version: 13", "Version: 8").as_bytes())
        else {
            unreachable!()
        };
        assert!(r.headers.contains(&("Sec-WebSocket-Version", "13".to_owned())));
    }

    #[test]
    fn plain_requests_get_page_or_status() {
        let get = |req: &str| decide(req.as_bytes());
        let Decision::Respond(page) = get("GET / HTTP/1.1\r\nHost: x\r\n\r\n") else { panic!() };
        assert_eq!(page.status, 200);
        assert!(String::from_utf8_lossy(&page.body).contains("<html"));
        assert_eq!(status(get("GET /.ws HTTP/1.1\r\nHost: x\r\n\r\n")), 200);
        assert_eq!(status(get("GET /index.html?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")), 200);
        assert_eq!(status(get("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")), 404);
        assert_eq!(status(get("DELETE / HTTP/1.1\r\nHost: x\r\n\r\n")), 405);
        assert_eq!(status(get("GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")), 200);
        let Decision::Respond(head) = get("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n") else { panic!() };
        let bytes = String::from_utf8(head.to_bytes()).unwrap();
        assert!(bytes.ends_with("\r\n\r\n"), "HEAD has no body");
        assert!(bytes.contains(&format!("Content-Length: {}\r\n", PAGE.len())));
    }

    fn echoed(head: &str) -> Decision {
        decide_with(head.as_bytes(), Policy { http_echo: true, ..Policy::default() })
    }

    #[test]
    fn with_the_echo_on_any_plain_request_is_handed_on_with_its_framing() {
        let Decision::Plain(request) =
            echoed("POST /a?b=c HTTP/1.1\r\nHost: x\r\nX-Y: 1\r\nx-y: 2\r\nContent-Length: 5\r\n\r\n")
        else {
            panic!("a plain request");
        };
        assert_eq!((request.method.as_str(), request.path(), request.query()), ("POST", "/a", "b=c"));
        assert_eq!(request.framing, Framing::Length(5));
        assert!(request.keep_alive && !request.expects_continue);
        assert_eq!(request.values("X-y").collect::<Vec<_>>(), vec![b"1", b"2"]);
        let plain = |head: &str| match echoed(head) {
            Decision::Plain(request) => request,
            other => panic!("{head}: {other:?}"),
        };
        let chunked =
            plain("PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nExpect: 100-continue\r\n\r\n");
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(chunked.expects_continue);
        assert_eq!(plain("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").framing, Framing::Empty);
        assert_eq!(
            plain("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 7, 7\r\n\r\n").framing,
            Framing::Length(7)
        );
        assert!(!plain("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!plain("GET / HTTP/1.0\r\n\r\n").keep_alive, "HTTP/1.0 closes by default");
        assert!(plain("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        // Any method, any path: it is an echo.
        assert_eq!(plain("BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n").method, "BREW");
    }

    #[test]
    fn bodies_that_cannot_be_delimited_safely_are_refused() {
        for (head, expected) in [
            ("POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 417),
        ] {
            let Decision::Respond(response) = echoed(head) else { panic!("{head}: not refused") };
            assert_eq!(response.status, expected, "{head}");
            assert!(!response.keep_alive, "{head}: the connection closes");
        }
    }

    #[test]
    fn partial_heads_and_garbage() {
        assert_eq!(parse_head_len(b"GET / HTTP/1.1\r\nHost: x\r\n", 8), Ok(None));
        assert_eq!(parse_head_len(b"GET / HTTP/1.1\r\n\r\nrest", 8), Ok(Some(18)));
        assert_eq!(parse_head_len(&[0x16, 0x03, 0x01, 0x02, 0x00], 8), Err(HeadError::Malformed));
        assert_eq!(parse_head_len(&[0x10, 0x0c, 0x00, 0x04, b'M', b'Q'], 8), Err(HeadError::Malformed));
        let head = |n: usize| {
            let many: String = (0..n).map(|i| format!("X-{i}: y\r\n")).collect();
            format!("GET / HTTP/1.1\r\n{many}\r\n")
        };
        assert_eq!(parse_head_len(head(64).as_bytes(), 64), Ok(Some(head(64).len())));
        assert_eq!(parse_head_len(head(65).as_bytes(), 64), Err(HeadError::TooLarge));
        // Still partial, but already over the count.
        assert_eq!(parse_head_len(&head(65).as_bytes()[..head(65).len() - 2], 64), Err(HeadError::TooLarge));
    }

    #[test]
    fn key_validation() {
        assert!(is_valid_key(KEY.as_bytes()));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=!"));
        assert!(!is_valid_key(b""));
    }
}
