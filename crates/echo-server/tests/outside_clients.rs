//! The server with clients we did not write: Python `websockets` and a
//! browser (headless Chromium loading the page and echoing through it).
//! These skip loudly when the tool is missing, unless
//! `REQUIRE_TEST_TOOLS=1` (set by `.ci/run`, which installs them).

mod common;

use std::process::Command;

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

#[test]
fn chromium_loads_the_page_and_echoes_through_it() {
    let found = chromium();
    if !tool_available(
        "Chromium (Debian package `chromium`)",
        Command::new(found.unwrap_or("chromium")).arg("--version"),
    ) || !python_with_websockets()
    {
        return;
    }
    let server = TestServer::start(&[]);
    let url = format!("http://{}/", server.ws_addr());
    let output = Command::new("python3")
        .arg(format!("{CLIENTS}/browser_echo.py"))
        .arg(found.unwrap())
        .arg(&url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "browser test failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(result["echoed"].as_str().unwrap().starts_with("browser says hi"));
    assert!(result["rtt_ms"].as_f64().unwrap() >= 0.0);
    assert!(server.metric("echo_websocket_upgrades_total") >= 1.0, "the page's socket reached the server");
    assert!(server.metric("echo_websocket_messages_sent_total{kind=\"text\"}") >= 1.0);
}
