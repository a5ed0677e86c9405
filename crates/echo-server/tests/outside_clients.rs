//! The server with clients we did not write: Python `websockets`, a
//! browser (headless Chromium loading the page and echoing through it,
//! watching its live figures under load, using its MQTT tab, which runs
//! MQTT.js, and reading Server-Sent Events with `EventSource`), and curl
//! against the HTTP echo and the event stream; the same over TLS (`wss://`,
//! `https://`) with a self-signed certificate made by `openssl`.
//! These skip loudly when the tool is missing, unless
//! `REQUIRE_TEST_TOOLS=1` (set by `.ci/run`, which installs them).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TestServer, tool_available};

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");

fn python_with_websockets() -> bool {
    tool_available(
        "Python 3 with the `websockets` package",
        Command::new("python3").args(["-c", "import websockets"]),
    )
}

#[test]
fn python_websockets_client_round_trip() {
    if !python_with_websockets() {
        return;
    }
    let server = TestServer::start(&[]);
    let output = Command::new("python3")
        .arg(format!("{CLIENTS}/ws_client.py"))
        .arg(server.ws_url("/"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python client failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(server.metric("echo_websocket_close_codes_received_total{code=\"4xxx\"}"), 1.0);
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|bin| Command::new(bin).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// Chromium and the Python `websockets` that drives it, when both are
/// there (otherwise a test skips, or fails under REQUIRE_TEST_TOOLS=1).
fn browser() -> Option<&'static str> {
    let found = chromium();
    let usable = tool_available(
        "Chromium (Debian package `chromium`)",
        Command::new(found.unwrap_or("chromium")).arg("--version"),
    ) && python_with_websockets();
    if usable { found } else { None }
}

/// Runs `clients/browser_echo.py` (headless Chromium driven over its
/// DevTools protocol) at `url`; what it printed, as JSON.
fn browser_echo(chromium: &str, url: &str, extra: &[&str]) -> serde_json::Value {
    let output = Command::new("python3")
        .arg(format!("{CLIENTS}/browser_echo.py"))
        .arg(chromium)
        .arg(url)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "browser_echo.py {url} {extra:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn chromium_loads_the_page_and_echoes_through_it() {
    let Some(found) = browser() else { return };
    let server = TestServer::start(&[]);
    // The page's own path, and the root, where a browser's Accept header
    // (it names text/html) gets the page rather than the echo.
    for path in ["/.ws", "/"] {
        let url = format!("http://{}{path}", server.ws_addr());
        let result = browser_echo(found, &url, &[]);
        assert!(result["echoed"].as_str().unwrap().starts_with("browser says hi"));
        assert!(result["rtt_ms"].as_f64().unwrap() >= 0.0);
    }
    assert!(server.metric("echo_websocket_upgrades_total") >= 2.0, "the page's socket reached the server");
    assert!(server.metric("echo_websocket_messages_sent_total{kind=\"text\"}") >= 2.0);
}

/// The page's live panel (fed by `/.stats`) under load from 20 clients the
/// driver opens, with the admin port off: the page must not need it.
#[test]
fn chromium_page_shows_the_server_live_under_load() {
    let Some(found) = browser() else { return };
    let server = TestServer::start(&["--no-admin"]);
    let url = format!("http://{}/.ws", server.ws_addr());
    let result = browser_echo(found, &url, &["--live", "20"]);
    assert!(result["echoed"].as_str().unwrap().starts_with("browser says hi"), "{result}");
    let live = &result["live"];
    let figure = |when: &str, name: &str| live[when][name].as_f64().unwrap();
    // The page's own echo socket is one of the connections.
    assert!(figure("before", "ws") >= 1.0, "{live}");
    assert!(figure("loaded", "ws") >= figure("before", "ws") + 20.0, "{live}");
    assert!(figure("loaded", "rate") >= 100.0, "{live}");
    assert!(figure("after", "ws") <= figure("before", "ws"), "{live}");
    assert!(figure("loaded", "rss_mib") > 1.0, "{live}");
    assert!(live["chart_pixels"].as_u64().unwrap() > 100, "the chart was drawn: {live}");
}

/// The page's MQTT tab: MQTT.js, served by the server, over WebSocket to
/// the broker; subscribe, publish, and the message comes back.
#[test]
fn chromium_mqtt_tab_subscribes_publishes_and_receives() {
    let Some(found) = browser() else { return };
    let server = TestServer::start(&[]);
    let url = format!("http://{}/.ws", server.ws_addr());
    let result = browser_echo(found, &url, &["--mqtt"]);
    assert_eq!(result["received"], result["sent"], "{result}");
    let script = format!("http://{}/.ws/mqtt.min.js?v=5.16.0", server.ws_addr());
    assert_eq!(result["scripts"], serde_json::json!([script]), "from this server, no CDN");
    assert!(server.metric("echo_mqtt_publishes_received_total") >= 1.0);
    assert!(server.metric("echo_mqtt_publishes_sent_total") >= 1.0);
}

/// Runs curl with `args`, `stdin` on its standard input: its standard output.
fn curl(args: &[&str], stdin: &[u8]) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn curl_gets_the_http_echo_with_keep_alive_chunked_uploads_and_limits() {
    if !tool_available("curl", Command::new("curl").arg("--version")) {
        return;
    }
    let server = TestServer::start(&[]);
    let base = format!("http://{}", server.ws_addr());
    // An upload of unknown length (standard input) goes chunked.
    let out = curl(&["-H", "Accept: application/json", "-T", "-", &format!("{base}/up?x=1")], b"from stdin");
    let echo: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((echo["method"].as_str(), echo["path"].as_str()), (Some("PUT"), Some("/up")));
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["body"], "from stdin");
    let headers = echo["headers"].as_array().unwrap();
    assert!(headers.contains(&serde_json::json!(["Transfer-Encoding", "chunked"])), "{headers:?}");
    // Two URLs in one run: the second reuses the first one's connection.
    let out =
        curl(&["-w", "connects=%{num_connects}\n", &format!("{base}/one"), &format!("{base}/two")], b"");
    assert!(out.contains("GET /one HTTP/1.1") && out.contains("GET /two HTTP/1.1"), "{out}");
    assert_eq!(out.matches("connects=1").count(), 1, "{out}");
    assert_eq!(out.matches("connects=0").count(), 1, "{out}");
    assert_eq!(server.metric("echo_http_keepalive_requests_total"), 1.0);
    // HEAD: headers only.
    let out = curl(&["-I", &format!("{base}/head")], b"");
    assert!(out.starts_with("HTTP/1.1 200 OK") && out.contains("Content-Length: "), "{out}");
    // Over the 1 MiB body limit: 413 (curl asks 100-continue first, and
    // the server refuses before the body is sent).
    let big = vec![b'x'; 1_500_000];
    let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@-", &base], &big);
    assert_eq!(out, "413");
}

#[test]
fn chromium_event_source_reads_the_event_stream() {
    let Some(found) = browser() else { return };
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_SSE_INTERVAL", "100ms")]);
    let url = format!("http://{}/.ws", server.ws_addr());
    let result = browser_echo(found, &url, &["--sse"]);
    let ids: Vec<&str> =
        result["times"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["1", "2", "3"], "{result}");
    for time in result["times"].as_array().unwrap() {
        humantime::parse_rfc3339(time["data"].as_str().unwrap()).unwrap();
    }
    assert!(result["request"].as_str().unwrap().contains("GET /.sse HTTP/1.1"), "{result}");
    assert_eq!(result["errors"], 0, "{result}");
    server.wait_for_metric("echo_sse_closed_total{reason=\"client_left\"}", Duration::from_secs(5), |n| {
        n == 1.0
    });
}

#[test]
fn curl_reads_the_event_stream_as_it_comes() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    if !tool_available("curl", Command::new("curl").arg("--version")) {
        return;
    }
    let server = TestServer::start_with_env(&[], &[("ECHO_WEBSOCKET_SSE_INTERVAL", "50ms")]);
    // -N: no output buffering, each event is printed as it arrives.
    let mut curl = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "20", &format!("http://{}/.sse", server.ws_addr())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
    let mut ids = Vec::new();
    let mut request_seen = false;
    while ids.len() < 3 {
        let line = lines.next().expect("curl prints the stream").unwrap();
        request_seen |= line == "data: GET /.sse HTTP/1.1";
        if let Some(id) = line.strip_prefix("id: ") {
            ids.push(id.to_owned());
        }
    }
    curl.kill().unwrap();
    curl.wait().unwrap();
    assert!(request_seen, "the request event came first");
    assert_eq!(ids, ["1", "2", "3"]);
    server.wait_for_metric("echo_sse_streams", Duration::from_secs(5), |n| n == 0.0);
}

/// A server with TLS on its WebSocket/HTTP port, under a fresh self-signed
/// certificate: the server and the certificate's path, or `None` (skipping)
/// without `openssl`.
fn tls_server(name: &str) -> Option<(TestServer, String)> {
    let dir = std::env::temp_dir().join(format!("echo-outside-tls-{name}-{}", std::process::id()));
    let (cert, key) = common::tls::self_signed(&dir)?;
    let env = [("ECHO_WEBSOCKET_TLS_CERT", cert.as_str()), ("ECHO_WEBSOCKET_TLS_KEY", key.as_str())];
    Some((TestServer::start_with_env(&[], &env), cert))
}

#[test]
fn python_websockets_over_tls_trusting_the_certificate() {
    if !python_with_websockets() {
        return;
    }
    let Some((server, cert)) = tls_server("python") else { return };
    let output = Command::new("python3")
        .arg(format!("{CLIENTS}/ws_client.py"))
        .arg(format!("wss://{}/", server.ws_addr()))
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python client over TLS failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(server.metric("echo_websocket_close_codes_received_total{code=\"4xxx\"}"), 1.0);
}

#[test]
fn curl_gets_the_http_echo_and_the_page_over_https() {
    if !tool_available("curl", Command::new("curl").arg("--version")) {
        return;
    }
    let Some((server, cert)) = tls_server("curl") else { return };
    let base = format!("https://{}", server.ws_addr());
    let out = curl(
        &["--cacert", &cert, "-H", "Accept: application/json", "-d", "sealed", &format!("{base}/tls?x=1")],
        b"",
    );
    let echo: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((echo["method"].as_str(), echo["path"].as_str()), (Some("POST"), Some("/tls")));
    assert_eq!((echo["query"].as_str(), echo["body"].as_str()), (Some("x=1"), Some("sealed")));
    let page = curl(&["--cacert", &cert, &format!("{base}/.ws")], b"");
    assert!(page.contains("<html") || page.contains("<!doctype") || page.contains("<!DOCTYPE"), "{page}");
    // Keep-alive over TLS: two URLs, one connection.
    let out = curl(
        &[
            "--cacert",
            &cert,
            "-w",
            "connects=%{num_connects}\n",
            &format!("{base}/one"),
            &format!("{base}/two"),
        ],
        b"",
    );
    assert_eq!(out.matches("connects=1").count(), 1, "{out}");
    assert_eq!(server.metric("echo_http_keepalive_requests_total"), 1.0);
}

#[test]
fn chromium_loads_the_https_page_and_echoes_over_wss() {
    let Some(found) = browser() else { return };
    let Some((server, _cert)) = tls_server("chromium") else { return };
    let url = format!("https://{}/.ws", server.ws_addr());
    let result = browser_echo(found, &url, &["--ignore-certificate-errors"]);
    assert!(result["echoed"].as_str().unwrap().starts_with("browser says hi"));
    assert!(
        server.metric("echo_websocket_upgrades_total") >= 1.0,
        "the page's wss:// socket reached the server"
    );
}
