//! `mixed` and `churn` against this workspace's echo-server, over real
//! sockets on ports the OS picks: what the generator reports must agree
//! with what the server counted.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The sum of a metric's samples over all its label sets.
fn metric(server: &Server, name: &str) -> f64 {
    let of_name =
        |key: &str| key.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('{'));
    server.metrics().into_iter().filter(|(key, _)| of_name(key)).map(|(_, value)| value).sum()
}

/// Runs `echo-loadgen SUBCOMMAND ARGS --json <tmp>`, bounded in time.
fn loadgen_sub(name: &str, sub: &str, args: &[&str]) -> Run {
    let json = scratch(name).join("result.json");
    let mut cmd = Command::new(LOADGEN);
    cmd.arg(sub).args(args).arg("--json").arg(&json).arg("--quiet").stdin(Stdio::null());
    let output = run_bounded(cmd, Duration::from_secs(90));
    let json = std::fs::read_to_string(&json).ok().map(|t| serde_json::from_str(&t).expect("valid JSON"));
    Run { output, json }
}

fn phase<'a>(run: &'a Run, name: &str) -> &'a Value {
    run.json()["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no phase {name}: {}", run.json()))
}

#[test]
fn a_connect_storm_is_measured_phase_by_phase_and_the_server_agrees() {
    let server = echo_server(&[]);
    let (ws, mqtt) = (server.ws_url("/"), format!("mqtt://{}", server.mqtt_addr()));
    let pid = server.pid().to_string();
    let metrics = server.admin_url("/metrics");
    let connects_before = metric(&server, "echo_mqtt_connects_total");
    let args = [
        ws.as_str(),
        mqtt.as_str(),
        "--ws-clients",
        "40",
        "--rate",
        "20",
        "--mqtt-clients",
        "300",
        "--before",
        "1s",
        "--mqtt-hold",
        "1s",
        "--server-pid",
        &pid,
        "--server-metrics",
        &metrics,
        // As the storm script does: SUBSCRIBE in the same write as CONNECT.
        "--pipeline-subscribe",
    ];
    let run = loadgen_sub("storm", "mixed", &args);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let r = run.json();
    assert_eq!(r["schema"], "echo-loadgen-mixed/1");
    let names: Vec<&str> =
        r["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["before", "connect", "held", "disconnect"]);
    // The WebSocket clients: every one open throughout, every echo checked,
    // nothing lost; 40 × 20/s over the phases of a second or more.
    for p in r["phases"].as_array().unwrap() {
        assert_eq!(u(&p["ws_open"]), 40, "{p}");
        assert!(p["ws"]["errors"].as_object().unwrap().is_empty(), "{p}");
        let (sent, received) = (u(&p["ws"]["sent"]), u(&p["ws"]["received"]));
        // A phase counts an echo when it comes back: the echoes of the
        // last messages a phase sent land in the next one, so either count
        // may lead by what was in flight at the boundary (a message per
        // client, at this rate and latency).
        assert!(received <= sent + 40 && sent <= received + 40, "{p}");
        if p["secs"].as_f64().unwrap() >= 0.9 {
            assert!(received >= 500, "40 clients × 20/s for a second: {p}");
            assert_eq!(u(&p["ws"]["latency"]["count"]), received);
        }
        assert!(p["server"]["rss_bytes"].as_u64().unwrap() > 0, "{p}");
    }
    // The storm: all 300 ready (CONNACK and SUBACK), timed.
    let connect = phase(&run, "connect");
    let m = &connect["mqtt"];
    assert_eq!((u(&m["attempted"]), u(&m["connected"])), (300, 300), "{m}");
    assert_eq!(u(&m["connect_time"]["count"]), 300);
    assert!(m["errors"].as_object().unwrap().is_empty(), "{m}");
    assert_eq!(u(&phase(&run, "held")["mqtt_open"]), 300);
    assert_eq!(r["mqtt_settings"]["pipeline_subscribe"], true);
    assert_eq!(r["ws_settings"]["pipeline_subscribe"], false);
    let secs = r["mqtt_connect_secs"].as_f64().unwrap();
    assert!(secs > 0.0 && secs < 30.0, "{secs}");
    // The server counted the same connects (and the pre-run check's one),
    // and every storm client is gone again.
    assert_eq!(metric(&server, "echo_mqtt_connects_total") - connects_before, 301.0);
    assert_eq!(metric(&server, "echo_mqtt_connections"), 0.0);
    // Its threads and its event loop, over the storm.
    let threads = r["server_threads"].as_object().unwrap();
    let main = &threads["echo-server"];
    assert!(main["cpu_seconds"].as_f64().unwrap() > 0.0, "{threads:?}");
    assert!(threads.contains_key("router-0"), "{threads:?}");
    assert!(u(&r["loop_lag"]["ticks"]) > 0, "{}", r["loop_lag"]);
    let out = run.stdout();
    for line in
        ["MQTT connect: 300 of 300 ready", "server threads while the MQTT clients", "server event loop lag"]
    {
        assert!(out.contains(line), "{line:?} missing from\n{out}");
    }
    for name in names {
        assert!(out.lines().any(|l| l.starts_with(name) && l.contains(" ws ")), "no row for {name}:\n{out}");
    }
}

#[test]
fn mixed_load_measures_both_kinds_of_client_in_one_run() {
    let server = echo_server(&[]);
    let (ws, mqtt) = (server.ws_url("/"), format!("mqtt://{}", server.mqtt_addr()));
    let args = [
        ws.as_str(),
        mqtt.as_str(),
        "--ws-clients",
        "20",
        "--rate",
        "10",
        "--mqtt-clients",
        "30",
        "--mqtt-connect-rate",
        "300",
        "--mqtt-rate",
        "10",
        "--qos",
        "1",
        "--before",
        "500ms",
        "--mqtt-hold",
        "2s",
    ];
    let run = loadgen_sub("mixed-load", "mixed", &args);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let held = phase(&run, "held");
    // 30 MQTT clients × 10/s on their own topics at QoS 1 for 2 s: each
    // delivery checked like an echo, next to the WebSocket echoes.
    let m = &held["mqtt"];
    assert!(u(&m["received"]) >= 450, "{m}");
    assert!(m["errors"].as_object().unwrap().is_empty(), "{m}");
    assert_eq!(u(&m["latency"]["count"]), u(&m["received"]));
    assert!(u(&held["ws"]["received"]) >= 300, "{held}");
    // At 300/s the 30 clients took about 0.1 s to connect, not all at once.
    assert!(run.json()["mqtt_connect_secs"].as_f64().unwrap() >= 0.09);
    let out = run.stdout();
    assert!(out.lines().any(|l| l.starts_with("held") && l.contains(" mqtt ")), "{out}");
}

#[test]
fn mixed_refuses_urls_in_the_wrong_order_before_the_run() {
    let run = loadgen_sub("mixed-bad", "mixed", &["mqtt://127.0.0.1:1", "ws://127.0.0.1:1/"]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("is not a WebSocket URL: the first URL is ws://"), "{}", run.stderr());
    let run = loadgen_sub("churn-bad", "churn", &["ws://127.0.0.1:1/"]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("is not an MQTT URL"), "{}", run.stderr());
}

#[test]
fn churn_rounds_leave_nothing_connected_and_report_memory_per_round() {
    let server = echo_server(&[]);
    let mqtt = format!("mqtt://{}", server.mqtt_addr());
    let pid = server.pid().to_string();
    let connects_before = metric(&server, "echo_mqtt_connects_total");
    let args = [
        mqtt.as_str(),
        "--clients",
        "300",
        "--rounds",
        "2",
        "--own-topic",
        "--settle",
        "200ms",
        "--server-pid",
        &pid,
    ];
    let run = loadgen_sub("churn", "churn", &args);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let r = run.json();
    assert_eq!(r["schema"], "echo-loadgen-churn/1");
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for round in rounds {
        let t = &round["tally"];
        assert_eq!((u(&t["attempted"]), u(&t["connected"])), (300, 300), "{round}");
        assert!(t["errors"].as_object().unwrap().is_empty(), "{round}");
        assert_eq!(u(&round["not_closed"]), 0, "the server closes after DISCONNECT: {round}");
        assert!(round["server"]["rss_bytes"].as_u64().unwrap() > 0);
    }
    // Fresh ids every time: 600 connects, each with a DISCONNECT, none left.
    assert_eq!(metric(&server, "echo_mqtt_connects_total") - connects_before, 600.0);
    assert_eq!(metric(&server, "echo_mqtt_connections"), 0.0);
    let out = run.stdout();
    assert!(out.contains("round 2/2: 300 clients"), "{out}");
    assert!(out.contains("600 clients (each subscribed to a topic of its own), 0 failed"), "{out}");
    assert!(out.contains("kept per client gone"), "{out}");
}
