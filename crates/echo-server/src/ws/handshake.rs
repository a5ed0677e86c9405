//! The HTTP side of the WebSocket port: the opening handshake (RFC 6455 §4),
//! the browser page, and a proper status for every other request.
//!
//! We read and answer the request head ourselves, with `httparse` doing the
//! parsing, instead of handing the socket to tungstenite's handshake:
//! tungstenite answers only upgrades, while this port must also serve the
//! page and turn away everything else with the right status (400, 404, 405,
//! 426, 431) and a one-line reason, never a reset or a hang. The request
//! buffer lives only as long as the handshake, so it costs an idle
//! connection nothing.

use std::borrow::Cow;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The page served at `GET /`: a self-contained echo client for browsers.
pub const PAGE: &str = include_str!("page.html");

/// What the handshake ended with.
#[derive(Debug)]
pub enum Outcome {
    /// The client is now a WebSocket peer.
    Upgraded(Upgrade),
    /// The client got an HTTP response (page or error) and the socket is
    /// done. `failure` says why, when the client wanted an upgrade.
    Answered { status: u16, failure: Option<&'static str> },
    /// The client left, stalled or broke the connection before any answer.
    Abandoned(&'static str),
}

/// A completed upgrade.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Bytes the client sent after the request head (its first frames).
    pub leftover: Vec<u8>,
    /// The subprotocol we selected: the first one the client offered.
    pub subprotocol: Option<String>,
    pub path: String,
}

/// An HTTP response that ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub content_type: &'static str,
    pub body: Cow<'static, str>,
    /// HEAD: send the headers (with the body's length) but not the body.
    pub head_only: bool,
}

impl Response {
    /// A plain-text error with a one-line explanation.
    pub fn error(status: u16, explanation: impl Into<Cow<'static, str>>) -> Response {
        let mut body = explanation.into().into_owned();
        body.push('\n');
        Response {
            status,
            headers: Vec::new(),
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: echo-server/{}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            self.status,
            reason_phrase(self.status),
            env!("CARGO_PKG_VERSION"),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// What to do with a complete request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Switch protocols with this `101` response.
    Upgrade { response: Vec<u8>, subprotocol: Option<String>, path: String },
    /// Answer a plain request (page, 404, 405) and close.
    Respond(Response),
    /// Refuse a WebSocket upgrade with this error and close.
    Refuse(Response),
}

/// Why reading the request head stopped short.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    TooLarge,
    Malformed,
    Closed,
}

/// Reads the request head: returns the buffer and where the head ends.
async fn read_head(
    stream: &mut TcpStream,
    max: usize,
    max_headers: usize,
) -> Result<(Vec<u8>, usize), HeadError> {
    let mut buf = Vec::with_capacity(1024.min(max));
    loop {
        if buf.len() >= max {
            return Err(HeadError::TooLarge);
        }
        if buf.capacity() == buf.len() {
            buf.reserve((buf.len()).min(max - buf.len()).max(512));
        }
        let n = stream.read_buf(&mut buf).await.map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        match parse_head_len(&buf, max_headers) {
            Ok(Some(len)) => return Ok((buf, len)),
            Ok(None) => continue,
            Err(e) => return Err(e),
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

/// Reads one request and answers it. On `Upgraded`, the `101` has been sent.
/// `preferred`, when the client offers it among its subprotocols, is
/// selected even if it is not the first one offered (`mqtt`).
pub async fn accept(
    stream: &mut TcpStream,
    preferred: Option<&str>,
    max_head: usize,
    max_headers: usize,
    handshake_timeout: Duration,
    write_timeout: Duration,
    close_timeout: Duration,
) -> Outcome {
    let head = tokio::time::timeout(handshake_timeout, read_head(stream, max_head, max_headers)).await;
    let (buf, head_len) = match head {
        Err(_) => return Outcome::Abandoned("timeout"),
        Ok(Err(HeadError::Closed)) => return Outcome::Abandoned("disconnected"),
        Ok(Err(HeadError::TooLarge)) => {
            let response = Response::error(
                431,
                format!("request head larger than {max_head} bytes or with more than {max_headers} headers"),
            );
            return answer(stream, &response, Some("too_large"), write_timeout, close_timeout).await;
        }
        Ok(Err(HeadError::Malformed)) => {
            let response = Response::error(400, "malformed HTTP request");
            return answer(stream, &response, Some("malformed"), write_timeout, close_timeout).await;
        }
        Ok(Ok(head)) => head,
    };
    match decide_with(&buf[..head_len], preferred) {
        Decision::Respond(response) => answer(stream, &response, None, write_timeout, close_timeout).await,
        Decision::Refuse(response) => {
            answer(stream, &response, Some("refused"), write_timeout, close_timeout).await
        }
        Decision::Upgrade { response, subprotocol, path } => {
            match tokio::time::timeout(write_timeout, stream.write_all(&response)).await {
                Ok(Ok(())) => {
                    Outcome::Upgraded(Upgrade { leftover: buf[head_len..].to_vec(), subprotocol, path })
                }
                _ => Outcome::Abandoned("disconnected"),
            }
        }
    }
}

/// Sends a response and closes politely: FIN first, then discard what the
/// client still sends until it closes too, so the response is not lost to a
/// reset caused by unread input.
async fn answer(
    stream: &mut TcpStream,
    response: &Response,
    failure: Option<&'static str>,
    write_timeout: Duration,
    close_timeout: Duration,
) -> Outcome {
    let bytes = response.to_bytes();
    if !matches!(tokio::time::timeout(write_timeout, stream.write_all(&bytes)).await, Ok(Ok(()))) {
        return Outcome::Abandoned("disconnected");
    }
    linger_close(stream, close_timeout).await;
    Outcome::Answered { status: response.status, failure }
}

/// Half-closes the socket and drains it until the peer closes or `limit` passes.
pub async fn linger_close(stream: &mut TcpStream, limit: Duration) {
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

/// Decides the answer to a complete request head. Pure, so every branch is
/// unit-tested without sockets.
pub fn decide(head: &[u8]) -> Decision {
    decide_with(head, None)
}

/// [`decide`], selecting `preferred` when the client offers it (MQTT.js
/// offers `mqtt`; a client offering `mqttv3.1, mqtt` gets `mqtt`).
pub fn decide_with(head: &[u8], preferred: Option<&str>) -> Decision {
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
        return Decision::Respond(plain_request(method, &path));
    }
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

/// A request that does not ask for an upgrade.
fn plain_request(method: &str, target: &str) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let is_page = path == "/" || path == "/index.html";
    match method {
        "GET" | "HEAD" if is_page => Response {
            status: 200,
            headers: Vec::new(),
            content_type: "text/html; charset=utf-8",
            body: Cow::Borrowed(PAGE),
            head_only: method == "HEAD",
        },
        "GET" | "HEAD" => {
            let mut response = Response::error(
                404,
                format!("{path} not found: the page is at /, and WebSocket clients may connect to any path"),
            );
            response.head_only = method == "HEAD";
            response
        }
        _ => Response::error(405, format!("{method} is not supported here: use GET"))
            .with_header("Allow", "GET, HEAD"),
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
        let Decision::Upgrade { subprotocol, .. } = decide_with(req.as_bytes(), Some("mqtt")) else {
            panic!("expected an upgrade");
        };
        assert_eq!(subprotocol.as_deref(), Some("mqtt"));
        let req = upgrade_request("Sec-WebSocket-Protocol: chat\r\n");
        let Decision::Upgrade { subprotocol, .. } = decide_with(req.as_bytes(), Some("mqtt")) else {
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
        assert!(page.body.contains("<html"));
        assert_eq!(status(get("GET /index.html?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")), 200);
        assert_eq!(status(get("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")), 404);
        assert_eq!(status(get("DELETE / HTTP/1.1\r\nHost: x\r\n\r\n")), 405);
        assert_eq!(status(get("GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")), 200);
        let Decision::Respond(head) = get("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n") else { panic!() };
        let bytes = String::from_utf8(head.to_bytes()).unwrap();
        assert!(bytes.ends_with("\r\n\r\n"), "HEAD has no body");
        assert!(bytes.contains(&format!("Content-Length: {}\r\n", PAGE.len())));
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
