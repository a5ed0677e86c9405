//! Measures MQTT persistence (`mqtt.persistence`) at a given size: the
//! router's snapshot (the time the router is busy with it, between two of
//! its events), encoding, the atomic write, and the way back at start
//! (read, decode, restore).
//!
//! ```sh
//! cargo run --release -p echo-server --example persistence_snapshot -- 10000 5000 3
//! ```
//! Arguments: retained messages, persistent sessions, messages queued for
//! each session (defaults 10000 5000 3). Retained payloads are 100 bytes,
//! queued ones 50; each session subscribes at QoS 1 to a topic of its own
//! and is disconnected (kept) when the messages are published.

use std::time::Instant;

use echo_server::config::MqttConfig;
use echo_server::mqtt::broker::router_config;
use echo_server::mqtt::persist::{self, Snapshot};
use rumqttd::Router;
use rumqttd::local::LinkBuilder;
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe,
};
use rumqttd::snapshot::unix_ms;

fn arg(n: usize, default: usize) -> usize {
    std::env::args().nth(n).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() {
    let (retained, sessions, queued) = (arg(1, 10_000), arg(2, 5_000), arg(3, 3));
    let config = router_config(&MqttConfig::default(), (sessions + 10) as u64);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let router = Router::new(0, config.clone());
    let snapshots = router.snapshot_handle();
    let router_tx = router.spawn();

    let (mut publisher, _publisher_rx, _) =
        LinkBuilder::new("publisher", router_tx.clone()).clean_session(true).build().unwrap();
    for i in 0..retained {
        let publish = Publish::new(format!("retained/{}/{i}", i % 100), "r".repeat(100), true);
        rt.block_on(publisher.send(Packet::Publish(publish, None))).unwrap();
    }
    let mut links = Vec::new();
    for i in 0..sessions {
        let (mut tx, rx, _) = LinkBuilder::new(&format!("session-{i}"), router_tx.clone())
            .clean_session(false)
            .build()
            .unwrap();
        let filter = Filter {
            path: format!("queue/{i}"),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        rt.block_on(tx.send(Packet::Subscribe(Subscribe { pkid: 1, filters: vec![filter] }, None))).unwrap();
        let disconnect = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
        rt.block_on(tx.send(Packet::Disconnect(disconnect, None))).unwrap();
        links.push((tx, rx));
    }
    for i in 0..sessions {
        for q in 0..queued {
            publisher.publish(format!("queue/{i}"), format!("{q:0>50}")).unwrap();
        }
    }
    // The first snapshot waits for everything above to be routed.
    rt.block_on(snapshots.take()).unwrap();

    let mut pauses = Vec::new();
    let mut router_snapshot = None;
    for _ in 0..5 {
        let started = Instant::now();
        router_snapshot = rt.block_on(snapshots.take());
        pauses.push(started.elapsed());
    }
    let router_snapshot = router_snapshot.unwrap();
    let counted =
        (router_snapshot.retained.len(), router_snapshot.sessions.len(), router_snapshot.queued_messages());
    let snapshot = Snapshot { router: router_snapshot, owners: Vec::new() };

    let started = Instant::now();
    let bytes = persist::encode(&snapshot);
    let encode = started.elapsed();
    let dir = std::env::temp_dir().join(format!("persistence-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mqtt-persistence.db");
    let started = Instant::now();
    persist::write_atomic(&path, &bytes).unwrap();
    let write = started.elapsed();

    let started = Instant::now();
    let read = std::fs::read(&path).unwrap();
    let decoded = persist::decode(&read).unwrap();
    let decode = started.elapsed();
    let mut fresh = Router::new(0, config);
    let started = Instant::now();
    let counts = fresh.restore(decoded.router, unix_ms());
    let restore = started.elapsed();
    std::fs::remove_dir_all(&dir).unwrap();

    pauses.sort();
    println!(
        "state: {} retained, {} sessions, {} queued messages (restored: {counts:?})",
        counted.0, counted.1, counted.2
    );
    println!("file: {} bytes", bytes.len());
    println!(
        "router snapshot (asked from another thread, answered; the router does nothing else meanwhile): \
         min {:.1} ms, median {:.1} ms, max {:.1} ms of 5",
        pauses[0].as_secs_f64() * 1e3,
        pauses[2].as_secs_f64() * 1e3,
        pauses[4].as_secs_f64() * 1e3
    );
    println!(
        "encode {:.1} ms, atomic write (with fsyncs) {:.1} ms; at start: read + decode {:.1} ms, restore {:.1} ms",
        encode.as_secs_f64() * 1e3,
        write.as_secs_f64() * 1e3,
        decode.as_secs_f64() * 1e3,
        restore.as_secs_f64() * 1e3
    );
    drop(links);
}
