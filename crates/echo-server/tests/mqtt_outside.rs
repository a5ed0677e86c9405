//! The broker with MQTT clients we did not write: Mosquitto's command-line
//! clients (Debian `mosquitto-clients`) and Eclipse paho-mqtt for Python,
//! each doing a round trip on MQTT 3.1.1 and 5 (paho also over WebSocket,
//! the way browser clients connect). These skip loudly when the tool is
//! missing, unless `REQUIRE_TEST_TOOLS=1` (set by `.ci/run`).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestServer, tool_available};

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");

fn mosquitto_clients() -> bool {
    tool_available(
        "mosquitto_pub and mosquitto_sub (Debian package `mosquitto-clients`)",
        Command::new("sh").args(["-c", "command -v mosquitto_pub && command -v mosquitto_sub"]),
    )
}

#[test]
fn mosquitto_clients_round_trip_on_3_1_1_and_5() {
    if !mosquitto_clients() {
        return;
    }
    let server = TestServer::start(&[]);
    let port = server.mqtt_addr().port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let topic = format!("mosquitto/{version}");
        // The subscriber prints "<topic> <payload>" and exits after one message.
        let subscriber = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-i", &format!("sub-{version}")])
            .args(["-t", &topic, "-C", "1", "-W", "10", "-v", "-q", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Publish until the subscriber is surely subscribed.
        server.wait_for_metric(
            "echo_mqtt_packets_received_total{packet=\"subscribe\"}",
            Duration::from_secs(10),
            |v| v >= if version == "mqttv311" { 1.0 } else { 2.0 },
        );
        std::thread::sleep(Duration::from_millis(100));
        let mut publish = Command::new("mosquitto_pub");
        publish.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            version,
            "-t",
            &topic,
            "-m",
            "hello mosquitto",
            "-q",
            "1",
        ]);
        if version == "mqttv5" {
            publish.args(["-D", "publish", "user-property", "k", "v"]);
        }
        let status = publish.status().unwrap();
        assert!(status.success(), "mosquitto_pub {version}: {status}");
        let output = subscriber.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "mosquitto_sub {version}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), format!("{topic} hello mosquitto"));
    }
}

/// Mosquitto's own way of reading a broker's statistics: the version is
/// retained under `$SYS`, there from the start.
#[test]
fn mosquitto_sub_reads_the_sys_version() {
    if !mosquitto_clients() {
        return;
    }
    let server = TestServer::start(&[]);
    let port = server.mqtt_addr().port().to_string();
    let output = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-t", "$SYS/broker/version", "-C", "1", "-W", "10", "-v"])
        .output()
        .unwrap();
    assert!(output.status.success(), "mosquitto_sub: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("$SYS/broker/version echo-server version {}", env!("CARGO_PKG_VERSION"))
    );
}

/// The reproduction, word for word with Mosquitto's clients: a 3.1.1
/// subscriber, an MQTT 5 publish with a user property, then the subscriber
/// again, then any other 3.1.1 client.
#[test]
fn mosquitto_reproduction_of_the_rumqttd_poisoning_bug() {
    if !mosquitto_clients() {
        return;
    }
    let server = TestServer::start(&[]);
    let port = server.mqtt_addr().port().to_string();
    for round in 0..2 {
        let sub = Command::new("mosquitto_sub")
            .args([
                "-p", &port, "-V", "mqttv311", "-i", "v4sub", "-k", "30", "-t", "repro/#", "-C", "1", "-W",
                "10",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        server.wait_for_metric(
            "echo_mqtt_packets_received_total{packet=\"subscribe\"}",
            Duration::from_secs(10),
            |v| v >= f64::from(round + 1),
        );
        std::thread::sleep(Duration::from_millis(100));
        let status = Command::new("mosquitto_pub")
            .args(["-p", &port, "-V", "mqttv5", "-k", "30", "-t", "repro/t", "-m", "hi"])
            .args(["-D", "publish", "user-property", "k", "v"])
            .status()
            .unwrap();
        assert!(status.success());
        let out = sub.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "round {round}: the 3.1.1 subscriber got the message and ended cleanly"
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi");
    }
    let status = Command::new("mosquitto_pub")
        .args(["-p", &port, "-V", "mqttv311", "-i", "other", "-t", "x", "-m", "y"])
        .status()
        .unwrap();
    assert!(status.success(), "any other 3.1.1 client still connects");
}

#[test]
fn paho_python_round_trips_on_3_1_1_and_5_over_tcp_and_websocket() {
    if !tool_available(
        "Python 3 with the `paho-mqtt` package (2.x)",
        Command::new("python3").args(["-c", "import paho.mqtt.client as m; m.CallbackAPIVersion"]),
    ) {
        return;
    }
    let server = TestServer::start(&[]);
    for version in ["3.1.1", "5"] {
        for (transport, port) in [("tcp", server.mqtt_addr().port()), ("websockets", server.ws_addr().port())]
        {
            let output = Command::new("python3")
                .arg(format!("{CLIENTS}/paho_round_trip.py"))
                .args(["127.0.0.1", &port.to_string(), version, transport])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "paho {version} over {transport} failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    assert_eq!(server.metric("echo_mqtt_connects_total{version=\"3.1.1\"}"), 2.0);
    assert_eq!(server.metric("echo_mqtt_connects_total{version=\"5\"}"), 2.0);
}
