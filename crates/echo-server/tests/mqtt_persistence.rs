//! MQTT persistence across restarts (`mqtt.persistence`): retained
//! messages and persistent sessions (subscriptions with their QoS and MQTT 5
//! Subscription Identifiers, and the QoS 1 messages published while their
//! client was away) written at graceful shutdown and loaded at the next
//! start, with the router on its thread and on the event loop, over MQTT
//! 3.1.1 and 5; a kill -9 at any moment of the periodic writes leaves a
//! whole snapshot; a corrupt or truncated file is reported and either
//! refused (non-zero exit, nothing bound) or moved aside.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TestServer;
use common::mqtt_raw::{self, RawMqtt, packet};
use echo_server::mqtt::persist;

/// A directory of its own per test, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("echo-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("state.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The environment for a server persisting to `file`.
fn settings(file: &Path, router: &str, interval: &str, corrupt: &str) -> Vec<(String, String)> {
    vec![
        ("ECHO_MQTT_PERSISTENCE".into(), "true".into()),
        ("ECHO_MQTT_PERSISTENCE_FILE".into(), file.display().to_string()),
        ("ECHO_MQTT_PERSISTENCE_INTERVAL".into(), interval.into()),
        ("ECHO_MQTT_PERSISTENCE_CORRUPT".into(), corrupt.into()),
        ("ECHO_MQTT_ROUTER".into(), router.into()),
    ]
}

fn start(env: &[(String, String)]) -> TestServer {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestServer::start_with_env(&[], &env)
}

/// Connects with `clean` (MQTT 5: and a session expiry of an hour);
/// returns the client and the CONNACK's session present flag.
fn open(server: &TestServer, level: u8, id: &str, clean: bool) -> (RawMqtt, bool) {
    let mut raw = RawMqtt::connect(server.mqtt_addr());
    raw.send(&mqtt_raw::connect_session(level, id, clean, Some(3600)));
    let ack = raw.read_packet().expect("a CONNACK");
    assert_eq!(ack.connack_code(), 0, "CONNACK for {id}");
    let present = ack.session_present();
    (raw, present)
}

fn leave(mut raw: RawMqtt) {
    raw.send(&mqtt_raw::DISCONNECT);
    assert!(raw.closed_within(Duration::from_secs(5)), "the server closes after DISCONNECT");
}

/// A QoS 1 publish, retained or not, acknowledged.
fn publish_qos1(raw: &mut RawMqtt, level: u8, topic: &str, payload: &[u8], retain: bool) {
    let mut bytes = mqtt_raw::publish_qos(level, topic, 1, 9, payload);
    if retain {
        bytes[0] |= 1;
    }
    raw.send(&bytes);
    let ack = raw.read_packet().expect("a PUBACK");
    assert_eq!(ack.packet_type(), 4, "{ack:?}");
}

/// A retained QoS 0 publish (no answer).
fn retain_qos0(raw: &mut RawMqtt, level: u8, topic: &str, payload: &[u8]) {
    let mut bytes = mqtt_raw::publish(level, topic, payload);
    bytes[0] |= 1;
    raw.send(&bytes);
}

/// The log line with this message, once it is there.
fn log_line(server: &TestServer, message: &str) -> serde_json::Value {
    server.wait_for_log(Duration::from_secs(10), |v| v["message"] == message)
}

fn field(line: &serde_json::Value, name: &str) -> u64 {
    line[name].as_u64().unwrap_or_else(|| panic!("{name} in {line}"))
}

/// Stops the server gracefully; it must write its last snapshot and exit 0.
fn stop(mut server: TestServer) -> serde_json::Value {
    let (status, _) = server.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit {status:?}; logs:\n{}", server.log_text());
    log_line(&server, "MQTT persistence: snapshot written at shutdown")
}

/// The whole round: a persistent session subscribes (QoS 1, MQTT 5 with
/// Subscription Identifier 42) and leaves; a retained message and two QoS 1
/// messages for the session are published; the server stops and starts
/// again; the client resumes without subscribing and gets the two queued
/// messages, then a live one; a new subscriber gets the retained message.
fn restart_keeps_state(level: u8, router: &str) {
    let dir = TempDir::new(&format!("restart-{level}-{router}"));
    let env = settings(&dir.file(), router, "0s", "refuse");
    let server = start(&env);
    let (mut keeper, present) = open(&server, level, "keeper", false);
    assert!(!present);
    let subscribe = match level {
        5 => mqtt_raw::subscribe_with_id(1, "away/#", 1, 42),
        _ => mqtt_raw::subscribe_qos(level, 1, "away/#", 1),
    };
    keeper.send(&subscribe);
    let suback = keeper.read_packet().expect("a SUBACK");
    assert_eq!(suback.suback_codes(level), vec![1]);
    leave(keeper);

    let mut publisher = RawMqtt::session(server.mqtt_addr(), level, "publisher", 30);
    publish_qos1(&mut publisher, level, "status/door", b"open", true);
    publish_qos1(&mut publisher, level, "away/1", b"first while away", false);
    publish_qos1(&mut publisher, level, "away/2", b"second while away", false);
    leave(publisher);

    let written = stop(server);
    assert_eq!(field(&written, "sessions"), 1, "{written}");
    assert_eq!(field(&written, "retained_messages"), 1, "{written}");
    assert_eq!(field(&written, "queued_messages"), 2, "{written}");
    let on_disk = persist::decode(&std::fs::read(dir.file()).unwrap()).expect("a whole snapshot");
    assert_eq!(on_disk.router.sessions[0].client_id, "keeper");

    let server = start(&env);
    let restored = log_line(&server, "MQTT persistence: state restored");
    assert_eq!(field(&restored, "sessions"), 1, "{restored}");
    assert_eq!(field(&restored, "retained_messages"), 1, "{restored}");
    assert_eq!(field(&restored, "queued_messages"), 2, "{restored}");

    let (mut keeper, present) = open(&server, level, "keeper", false);
    assert!(present, "the session outlived the restart");
    let ids = if level == 5 { vec![42] } else { Vec::new() };
    for (topic, payload) in [("away/1", &b"first while away"[..]), ("away/2", b"second while away")] {
        let delivery = keeper.read_packet().expect("a queued PUBLISH").delivery(level);
        assert_eq!((delivery.topic.as_str(), &delivery.payload[..]), (topic, payload));
        assert_eq!(delivery.qos, 1);
        assert_eq!(delivery.subscription_ids, ids);
        keeper.send(&mqtt_raw::ack(0x40, delivery.pkid));
    }

    // The subscription is live, without a new SUBSCRIBE.
    let mut publisher = RawMqtt::session(server.mqtt_addr(), level, "publisher", 30);
    publish_qos1(&mut publisher, level, "away/3", b"after the restart", false);
    let delivery = keeper.read_packet().expect("a live PUBLISH").delivery(level);
    assert_eq!((delivery.topic.as_str(), &delivery.payload[..]), ("away/3", &b"after the restart"[..]));
    assert_eq!(delivery.subscription_ids, ids);
    keeper.send(&mqtt_raw::ack(0x40, delivery.pkid));

    // The retained message, for a subscriber that never was there.
    let mut reader = RawMqtt::session(server.mqtt_addr(), level, "reader", 30);
    reader.send(&mqtt_raw::subscribe(level, 1, "status/#"));
    assert_eq!(reader.read_packet().expect("a SUBACK").packet_type(), 9);
    let retained = reader.read_packet().expect("the retained PUBLISH");
    assert_eq!(retained.first & 1, 1, "the RETAIN flag: {retained:?}");
    let delivery = retained.delivery(level);
    assert_eq!((delivery.topic.as_str(), &delivery.payload[..]), ("status/door", &b"open"[..]));
    stop(server);
}

#[test]
fn restart_keeps_state_v311_router_thread() {
    restart_keeps_state(4, "thread");
}

#[test]
fn restart_keeps_state_v5_router_thread() {
    restart_keeps_state(5, "thread");
}

#[test]
fn restart_keeps_state_v311_router_on_the_event_loop() {
    restart_keeps_state(4, "event-loop");
}

#[test]
fn restart_keeps_state_v5_router_on_the_event_loop() {
    restart_keeps_state(5, "event-loop");
}

/// A session that expired while the server was down (MQTT 5 expiry of 1
/// s, down for longer) is not restored; one kept for an hour is.
#[test]
fn a_session_that_expired_while_down_is_not_restored() {
    let dir = TempDir::new("expired");
    let env = settings(&dir.file(), "thread", "0s", "refuse");
    let server = start(&env);
    let mut short = RawMqtt::connect(server.mqtt_addr());
    short.send(&mqtt_raw::connect_session(5, "short", false, Some(1)));
    assert_eq!(short.read_packet().expect("a CONNACK").connack_code(), 0);
    short.send(&mqtt_raw::subscribe(5, 1, "a"));
    assert_eq!(short.read_packet().expect("a SUBACK").packet_type(), 9);
    let (mut long, _) = open(&server, 5, "long", false);
    long.send(&mqtt_raw::subscribe(5, 1, "a"));
    assert_eq!(long.read_packet().expect("a SUBACK").packet_type(), 9);
    // Both still connected at shutdown: recorded as if they had just left.
    let written = stop(server);
    assert_eq!(field(&written, "sessions"), 2, "{written}");
    // Down for longer than the short session's expiry.
    std::thread::sleep(Duration::from_millis(1500));
    let server = start(&env);
    let restored = log_line(&server, "MQTT persistence: state restored");
    assert_eq!(field(&restored, "sessions"), 1, "{restored}");
    assert_eq!(field(&restored, "sessions_expired_while_down"), 1, "{restored}");
    let (_, present) = open(&server, 5, "long", false);
    assert!(present);
    let mut short = RawMqtt::connect(server.mqtt_addr());
    short.send(&mqtt_raw::connect_session(5, "short", false, Some(1)));
    assert!(!short.read_packet().expect("a CONNACK").session_present());
}

/// kill -9 at many moments while snapshots of up to about a megabyte are
/// written every 100 ms, some of them inside a write (between the
/// temporary file's creation and its rename): the file is always a whole
/// snapshot (it decodes, checksum and all), and the next start, which
/// refuses a damaged file, loads it.
fn kill_9_leaves_a_whole_snapshot(router: &str) {
    let dir = TempDir::new(&format!("kill-{router}"));
    let env = settings(&dir.file(), router, "100ms", "refuse");
    let payload = vec![b'x'; 400];
    let mut retained = 0;
    let mut interrupted = 0;
    for round in 0..6u64 {
        let mut server = start(&env);
        if round > 0 {
            let restored = log_line(&server, "MQTT persistence: state restored");
            assert!(field(&restored, "retained_messages") > 0, "{restored}");
        }
        // More state each round: 500 retained messages more, and a
        // persistent session with messages queued.
        let mut publisher = RawMqtt::session(server.mqtt_addr(), 4, "publisher", 30);
        for i in 0..500 {
            retain_qos0(&mut publisher, 4, &format!("bulk/{round}/{i}"), &payload);
        }
        retained += 500;
        let (mut keeper, _) = open(&server, 4, &format!("keeper-{round}"), false);
        keeper.send(&mqtt_raw::subscribe_qos(4, 1, "queue/#", 1));
        assert_eq!(keeper.read_packet().expect("a SUBACK").packet_type(), 9);
        leave(keeper);
        publish_qos1(&mut publisher, 4, "queue/1", b"queued", false);
        // Every message in, and written at least twice.
        publisher.send(&mqtt_raw::PINGREQ);
        assert_eq!(publisher.read_packet().expect("a PINGRESP").packet_type(), 13);
        let written = server.metric("echo_mqtt_persistence_snapshots_written_total");
        server.wait_for_metric(
            "echo_mqtt_persistence_snapshots_written_total",
            Duration::from_secs(20),
            |n| n >= written + 2.0,
        );
        // Then, every other round, as soon as a write has begun (its
        // temporary file is there), else at a different moment of the
        // write cycle each round.
        if round % 2 == 0 {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !dir.0.join(".state.db.tmp").exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
            }
        } else {
            std::thread::sleep(Duration::from_millis(round * 17));
        }
        server.signal(libc::SIGKILL);
        server.wait(Duration::from_secs(10));
        drop(server);

        // A temporary file left behind: this kill interrupted a write.
        if dir.0.join(".state.db.tmp").exists() {
            interrupted += 1;
        }
        let bytes = std::fs::read(dir.file()).expect("a snapshot file");
        let snapshot = persist::decode(&bytes).unwrap_or_else(|e| {
            panic!("round {round}: a half-written snapshot ({} bytes): {e}", bytes.len())
        });
        assert_eq!(snapshot.router.retained.len(), retained, "round {round}");
        assert!(bytes.len() > 200_000 * (round as usize + 1), "sizable: {} bytes", bytes.len());
    }
    eprintln!("{router}: {interrupted} of 6 kills interrupted a write (a temporary file was left)");
    assert!(interrupted >= 1, "no kill landed inside a write: the test proved nothing");
    let server = start(&env);
    let restored = log_line(&server, "MQTT persistence: state restored");
    assert_eq!(field(&restored, "retained_messages"), retained as u64, "{restored}");
    assert_eq!(field(&restored, "sessions"), 6, "{restored}");
}

#[test]
fn kill_9_leaves_a_whole_snapshot_router_thread() {
    kill_9_leaves_a_whole_snapshot("thread");
}

#[test]
fn kill_9_leaves_a_whole_snapshot_router_on_the_event_loop() {
    kill_9_leaves_a_whole_snapshot("event-loop");
}

/// A valid snapshot file with one retained message, made by a server.
fn valid_snapshot(dir: &TempDir, router: &str) -> Vec<u8> {
    let server = start(&settings(&dir.file(), router, "0s", "refuse"));
    let mut publisher = RawMqtt::session(server.mqtt_addr(), 5, "publisher", 30);
    publish_qos1(&mut publisher, 5, "kept/topic", b"kept", true);
    leave(publisher);
    stop(server);
    std::fs::read(dir.file()).unwrap()
}

/// Runs the server with `env` until it exits by itself: (status, stderr).
fn run_refused(env: &[(String, String)]) -> (std::process::ExitStatus, String) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args =
        ["--ws-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let (status, _, stderr) = common::run_to_exit(&args, &env);
    (status, stderr)
}

/// `refuse`: a truncated, a damaged and a foreign file each stop the
/// server with status 1 before it binds anything, naming the file and
/// what is wrong; the file is left as it was.
fn corrupt_file_is_refused(router: &str) {
    let dir = TempDir::new(&format!("refuse-{router}"));
    let valid = valid_snapshot(&dir, router);
    let env = settings(&dir.file(), router, "0s", "refuse");
    let mut damaged = valid.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    let cases: [(&[u8], &str); 3] = [
        (&valid[..valid.len() / 2], "truncated"),
        (&damaged, "checksum mismatch"),
        (b"not a snapshot at all, but longer than a header", "not an echo-server MQTT snapshot"),
    ];
    for (bytes, problem) in cases {
        std::fs::write(dir.file(), bytes).unwrap();
        let (status, stderr) = run_refused(&env);
        assert_eq!(status.code(), Some(1), "{stderr}");
        let file = dir.file().display().to_string();
        assert!(stderr.contains(&file) && stderr.contains(problem), "{problem}: {stderr}");
        assert!(!stderr.contains("listening"), "nothing is bound first: {stderr}");
        assert_eq!(std::fs::read(dir.file()).unwrap(), bytes, "the file is left alone");
    }
}

#[test]
fn corrupt_file_is_refused_router_thread() {
    corrupt_file_is_refused("thread");
}

#[test]
fn corrupt_file_is_refused_router_on_the_event_loop() {
    corrupt_file_is_refused("event-loop");
}

/// `start-empty`: a truncated file is reported (file, problem), moved
/// aside to FILE.corrupt, and the server starts without its state; its
/// next snapshot is a fresh, whole one.
fn corrupt_file_starts_empty(router: &str) {
    let dir = TempDir::new(&format!("empty-{router}"));
    let valid = valid_snapshot(&dir, router);
    let truncated = &valid[..valid.len() - 3];
    std::fs::write(dir.file(), truncated).unwrap();
    let server = start(&settings(&dir.file(), router, "0s", "start-empty"));
    let report = server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"].as_str().is_some_and(|m| m.starts_with("MQTT persistence file is corrupt"))
    });
    assert_eq!(report["level"], "ERROR", "{report}");
    assert_eq!(report["file"], dir.file().display().to_string(), "{report}");
    assert!(report["problem"].as_str().unwrap().contains("truncated"), "{report}");
    let aside = PathBuf::from(format!("{}.corrupt", dir.file().display()));
    assert_eq!(std::fs::read(&aside).unwrap(), truncated, "kept for inspection");
    assert!(!server.logs().iter().any(|v| v["message"] == "MQTT persistence: state restored"));

    // Empty: the retained message is gone.
    let mut reader = RawMqtt::session(server.mqtt_addr(), 5, "reader", 30);
    reader.send(&mqtt_raw::subscribe(5, 1, "kept/#"));
    assert_eq!(reader.read_packet().expect("a SUBACK").packet_type(), 9);
    assert!(reader.silent_for(Duration::from_millis(300)), "no retained message");
    reader.send(&packet(0xe0, &[]));
    let written = stop(server);
    assert_eq!(field(&written, "retained_messages"), 0, "{written}");
    persist::decode(&std::fs::read(dir.file()).unwrap()).expect("a fresh, whole snapshot");
}

#[test]
fn corrupt_file_starts_empty_router_thread() {
    corrupt_file_starts_empty("thread");
}

#[test]
fn corrupt_file_starts_empty_router_on_the_event_loop() {
    corrupt_file_starts_empty("event-loop");
}

/// A snapshot file in a directory that does not exist is a configuration
/// error at start (status 2, naming the key), not a failure hours later.
#[test]
fn a_missing_directory_is_a_configuration_error() {
    let dir = TempDir::new("missing");
    let file = dir.0.join("no/such/dir/state.db");
    let (status, stderr) = run_refused(&settings(&file, "thread", "0s", "refuse"));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("mqtt.persistence_file") && stderr.contains("no/such/dir"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

/// A periodic snapshot records a connected session as if it had just
/// disconnected: deliveries it has not acknowledged yet, and messages not
/// yet sent to it, are queued again. After a kill -9 and a restart, the
/// client resumes and gets them all.
fn connected_session_in_a_periodic_snapshot(level: u8, router: &str) {
    let dir = TempDir::new(&format!("connected-{level}-{router}"));
    let env = settings(&dir.file(), router, "100ms", "refuse");
    let mut server = start(&env);
    let (mut keeper, _) = open(&server, level, "keeper", false);
    keeper.send(&mqtt_raw::subscribe_qos(level, 1, "work/#", 1));
    assert_eq!(keeper.read_packet().expect("a SUBACK").packet_type(), 9);
    let mut publisher = RawMqtt::session(server.mqtt_addr(), level, "publisher", 30);
    for i in 1..=3 {
        publish_qos1(&mut publisher, level, &format!("work/{i}"), format!("job {i}").as_bytes(), false);
    }
    // Delivered, never acknowledged.
    for i in 1..=3 {
        let delivery = keeper.read_packet().expect("a PUBLISH").delivery(level);
        assert_eq!(delivery.payload, format!("job {i}").into_bytes());
    }
    let written = server.metric("echo_mqtt_persistence_snapshots_written_total");
    server.wait_for_metric("echo_mqtt_persistence_snapshots_written_total", Duration::from_secs(20), |n| {
        n >= written + 2.0
    });
    server.signal(libc::SIGKILL);
    server.wait(Duration::from_secs(10));
    drop(server);

    let server = start(&env);
    let restored = log_line(&server, "MQTT persistence: state restored");
    assert_eq!(field(&restored, "queued_messages"), 3, "{restored}");
    let (mut keeper, present) = open(&server, level, "keeper", false);
    assert!(present);
    for i in 1..=3 {
        let delivery = keeper.read_packet().expect("a PUBLISH again").delivery(level);
        assert_eq!(
            (delivery.topic, delivery.payload),
            (format!("work/{i}"), format!("job {i}").into_bytes())
        );
        keeper.send(&mqtt_raw::ack(0x40, delivery.pkid));
    }
}

#[test]
fn connected_session_in_a_periodic_snapshot_v311_router_thread() {
    connected_session_in_a_periodic_snapshot(4, "thread");
}

#[test]
fn connected_session_in_a_periodic_snapshot_v5_router_on_the_event_loop() {
    connected_session_in_a_periodic_snapshot(5, "event-loop");
}

/// A write that fails (here: the directory was removed under the running
/// server) is logged and counted, the server goes on, and the next write
/// after the directory is back succeeds; the figures of the last write
/// are exported.
#[test]
fn a_failed_write_is_counted_and_the_next_one_succeeds() {
    let dir = TempDir::new("failure");
    let sub = dir.0.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let file = sub.join("state.db");
    let server = start(&settings(&file, "thread", "100ms", "refuse"));
    server.wait_for_metric("echo_mqtt_persistence_snapshots_written_total", Duration::from_secs(10), |n| {
        n >= 1.0
    });
    assert!(server.metric("echo_mqtt_persistence_last_snapshot_bytes") > 0.0);
    assert!(server.metric("echo_mqtt_persistence_last_snapshot_seconds") > 0.0);
    std::fs::remove_dir_all(&sub).unwrap();
    server
        .wait_for_metric("echo_mqtt_persistence_write_failures_total", Duration::from_secs(10), |n| n >= 1.0);
    let report = server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"].as_str().is_some_and(|m| m.starts_with("MQTT persistence: cannot write the snapshot"))
    });
    assert_eq!(report["level"], "ERROR", "{report}");
    std::fs::create_dir_all(&sub).unwrap();
    let written = server.metric("echo_mqtt_persistence_snapshots_written_total");
    server.wait_for_metric("echo_mqtt_persistence_snapshots_written_total", Duration::from_secs(10), |n| {
        n > written
    });
    persist::decode(&std::fs::read(&file).unwrap()).expect("a whole snapshot");
    stop(server);
}
