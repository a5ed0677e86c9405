//! The HTTP echo (`websocket.http_echo`): a plain request gets back what
//! the server received — method, target (path and query), version, every
//! header field in the order and case it came, the body, the client's
//! address — so a client can see what reached the server through whatever
//! proxies stand in between.
//!
//! Two layouts, chosen by the `Accept` header:
//!
//! - plain text, jmalloc/echo-server's layout (the request line, a blank
//!   line, the fields, a blank line and the body), opened by who asked and,
//!   with `send_server_hostname`, who answered;
//! - JSON, when the client prefers `application/json` to `text/plain`, for
//!   tests and scripts (`jq`): fields as `[name, value]` pairs, so that
//!   order and repeats survive; a body that is not UTF-8 as base64.

use std::borrow::Cow;
use std::net::SocketAddr;

use base64::Engine;
use serde::Serialize;

use super::chunked::Field;
use super::handshake::{PlainRequest, Response};
use super::replica;

/// What the server received, as the echo shows it.
#[derive(Debug)]
pub(crate) struct Received<'a> {
    pub request: &'a PlainRequest,
    pub body: &'a [u8],
    pub trailers: &'a [Field],
    pub client: SocketAddr,
    /// This host's name, when `send_server_hostname` is on.
    pub served_by: Option<&'a str>,
}

/// The answer to an echoed request: 200, text or JSON, `Vary: Accept`
/// (the same URL answers in either layout).
pub(crate) fn response(received: &Received<'_>) -> Response {
    let (content_type, body) = if prefers_json(received.request) {
        ("application/json", json(received))
    } else {
        ("text/plain; charset=utf-8", text(received))
    };
    let mut response = Response::new(200, content_type, Cow::Owned(body)).with_header("Vary", "Accept");
    response.head_only = received.request.method == "HEAD";
    response
}

/// Whether the client asks for `media` (such as `text/html`) by name in
/// `Accept`, with a weight above zero. Wildcards do not count: `*/*` is
/// what a client sends when it has no preference.
pub(crate) fn accepts(request: &PlainRequest, media: &str) -> bool {
    weight(request, |m| m == media) > 0.0
}

/// JSON when some JSON type (`application/json`, or a `+json` type) is
/// named with a weight above zero and at least that of `text/plain`.
fn prefers_json(request: &PlainRequest) -> bool {
    let json = weight(request, |m| m == "application/json" || m.ends_with("+json"));
    let text = weight(request, |m| m == "text/plain" || m == "text/*");
    json > 0.0 && json >= text
}

/// The highest weight (`q`, 1 when absent) that `Accept` gives a media
/// range matching `wanted`; 0 when none does.
fn weight(request: &PlainRequest, wanted: impl Fn(&str) -> bool) -> f32 {
    let mut best: f32 = 0.0;
    for value in request.values("accept") {
        for range in String::from_utf8_lossy(value).split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if !wanted(&media) {
                continue;
            }
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            best = best.max(q);
        }
    }
    best
}

fn version(request: &PlainRequest) -> &'static str {
    if request.version == 0 { "HTTP/1.0" } else { "HTTP/1.1" }
}

/// The text layout:
///
/// ```text
/// Request served by web-1        (with send_server_hostname)
/// Request from 10.0.0.7:53412
///
/// POST /path?q=1 HTTP/1.1
///
/// Host: example
/// Content-Length: 5
///
/// hello
/// ```
pub(crate) fn text(received: &Received<'_>) -> Vec<u8> {
    let request = received.request;
    let mut out = Vec::with_capacity(256 + received.body.len());
    if let Some(host) = received.served_by {
        out.extend_from_slice(replica::served_by(host).as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(format!("Request from {}\n\n", received.client).as_bytes());
    out.extend_from_slice(
        format!("{} {} {}\n\n", request.method, request.target, version(request)).as_bytes(),
    );
    for (name, value) in &request.headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    if !received.body.is_empty() {
        out.push(b'\n');
        out.extend_from_slice(received.body);
    }
    out
}

#[derive(Serialize)]
struct Json<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    served_by: Option<&'a str>,
    client: String,
    method: &'a str,
    target: &'a str,
    path: &'a str,
    query: &'a str,
    version: &'static str,
    headers: Vec<(&'a str, Cow<'a, str>)>,
    body: Cow<'a, str>,
    /// "utf-8", or "base64" for a body that is not UTF-8.
    body_encoding: &'static str,
    /// Fields sent after a chunked body.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    trailers: Vec<(&'a str, Cow<'a, str>)>,
}

fn fields(fields: &[Field]) -> Vec<(&str, Cow<'_, str>)> {
    fields.iter().map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value))).collect()
}

fn json(received: &Received<'_>) -> Vec<u8> {
    let request = received.request;
    let (body, body_encoding) = match std::str::from_utf8(received.body) {
        Ok(text) => (Cow::Borrowed(text), "utf-8"),
        Err(_) => (Cow::Owned(base64::engine::general_purpose::STANDARD.encode(received.body)), "base64"),
    };
    let json = Json {
        served_by: received.served_by,
        client: received.client.to_string(),
        method: &request.method,
        target: &request.target,
        path: request.path(),
        query: request.query(),
        version: version(request),
        headers: fields(&request.headers),
        body,
        body_encoding,
        trailers: fields(received.trailers),
    };
    let mut out = serde_json::to_vec(&json).expect("serializing strings cannot fail");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::handshake::echoed_request;

    fn with_accept(accept: &str) -> PlainRequest {
        echoed_request(&format!("GET / HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"))
    }

    #[test]
    fn json_only_when_preferred() {
        for (accept, json) in [
            ("application/json", true),
            ("application/problem+json", true),
            ("text/plain, application/json", true),
            ("application/json;q=0.5, text/plain", false),
            ("application/json; q=0", false),
            ("*/*", false),
            ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", false),
            ("APPLICATION/JSON", true),
        ] {
            assert_eq!(prefers_json(&with_accept(accept)), json, "{accept}");
        }
        assert!(!prefers_json(&echoed_request("GET / HTTP/1.1\r\nHost: x\r\n\r\n")), "no Accept: text");
    }

    #[test]
    fn browsers_are_told_by_naming_html() {
        let chromium = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8";
        assert!(accepts(&with_accept(chromium), "text/html"));
        assert!(!accepts(&with_accept("*/*"), "text/html"), "curl");
        assert!(!accepts(&with_accept("text/html;q=0"), "text/html"));
    }

    fn received<'a>(request: &'a PlainRequest, body: &'a [u8], served_by: Option<&'a str>) -> Received<'a> {
        Received { request, body, trailers: &[], client: "10.0.0.7:53412".parse().unwrap(), served_by }
    }

    #[test]
    fn text_layout_is_jmallocs_with_the_fields_in_order() {
        let req = echoed_request(
            "POST /p?a=1&a=2 HTTP/1.1\r\nHost: x\r\nX-B: 1\r\nx-a: 2\r\nX-B: 3\r\nContent-Length: 5\r\n\r\n",
        );
        let text = String::from_utf8(super::text(&received(&req, b"hello", Some("web-1")))).unwrap();
        assert_eq!(
            text,
            "Request served by web-1\nRequest from 10.0.0.7:53412\n\nPOST /p?a=1&a=2 HTTP/1.1\n\n\
             Host: x\nX-B: 1\nx-a: 2\nX-B: 3\nContent-Length: 5\n\nhello"
        );
        let text = String::from_utf8(super::text(&received(&req, b"", None))).unwrap();
        assert!(text.starts_with("Request from 10.0.0.7:53412\n\nPOST"), "{text}");
        assert!(text.ends_with("Content-Length: 5\n"), "no body, no blank line: {text}");
    }

    #[test]
    fn json_keeps_order_repeats_and_binary_bodies() {
        let req =
            echoed_request("PUT /p?q=1 HTTP/1.0\r\nX-B: 1\r\nX-B: 2\r\nAccept: application/json\r\n\r\n");
        let value: serde_json::Value =
            serde_json::from_slice(&json(&received(&req, &[0xff, 0x00, 0x41], None))).unwrap();
        assert_eq!(value["method"], "PUT");
        assert_eq!(value["target"], "/p?q=1");
        assert_eq!(value["path"], "/p");
        assert_eq!(value["query"], "q=1");
        assert_eq!(value["version"], "HTTP/1.0");
        assert_eq!(value["client"], "10.0.0.7:53412");
        assert_eq!(
            value["headers"],
            serde_json::json!([["X-B", "1"], ["X-B", "2"], ["Accept", "application/json"]])
        );
        assert_eq!(value["body"], "/wBB");
        assert_eq!(value["body_encoding"], "base64");
        assert!(value.get("served_by").is_none() && value.get("trailers").is_none());
        let response = response(&received(&req, b"{\"a\":1}", Some("web-1")));
        assert_eq!(response.content_type, "application/json");
        let value: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(
            (value["body"].as_str(), value["body_encoding"].as_str()),
            (Some("{\"a\":1}"), Some("utf-8"))
        );
        assert_eq!(value["served_by"], "web-1");
    }

    #[test]
    fn head_gets_the_length_of_what_get_would_get() {
        let req = echoed_request("HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n");
        let response = response(&received(&req, b"", None));
        let wire = String::from_utf8(response.to_bytes()).unwrap();
        assert!(wire.ends_with("\r\n\r\n"), "no body: {wire}");
        assert!(wire.contains(&format!("Content-Length: {}\r\n", response.body.len())));
        assert!(response.body.len() > 20);
    }
}
