//! Start-up, configuration, admin endpoints and shutdown of the real binary.

mod common;

use std::time::Duration;

use common::mqtt_raw::{self, RawMqtt};
use common::raw::RawClient;
use common::{TestServer, run_to_exit};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[test]
fn bad_config_exits_2_naming_the_key_before_binding() {
    // The port is taken: had the server bound anything before validating,
    // it would fail with a bind error (status 1) instead.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = std::env::temp_dir().join(format!("echo-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], vec![("ECHO_WEBSOCKET_MAX_MESSAGE_SIZE", "0")], "websocket.max_message_size"),
        (vec![], vec![("ECHO_WEBSOCKET_PING_TIMEOUT", "soon")], "websocket.ping_timeout"),
        (vec![], vec![("ECHO_ADMIN_LISTEN", "nowhere")], "admin.listen"),
        (vec![], vec![("ECHO_WEBSOCKETS_LISTEN", "1")], "websockets"),
        (vec!["--config".into(), dir.join("missing.toml").display().to_string()], vec![], "missing.toml"),
        (
            {
                let file = dir.join("typo.toml");
                std::fs::write(&file, "[websocket]\nmax_conections = 5\n").unwrap();
                vec!["--config".into(), file.display().to_string()]
            },
            vec![],
            "websocket.max_conections",
        ),
        (vec!["--log-level".into(), "info,=[".into()], vec![], "log.level"),
    ];
    for (mut args, env, key) in cases {
        args.extend(["--ws-listen".into(), port.clone()]);
        if !env.iter().any(|(k, _)| k.starts_with("ECHO_ADMIN")) {
            args.push("--no-admin".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, _, stderr) = run_to_exit(&args, &env);
        assert_eq!(status.code(), Some(2), "{key}: {stderr}");
        assert!(stderr.contains(key), "the message names {key}: {stderr}");
        assert!(stderr.starts_with("echo-server: invalid configuration:"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    }
}

#[test]
fn a_taken_port_is_reported_with_its_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let (status, _, stderr) = run_to_exit(&["--ws-listen", &port, "--no-admin"], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains(&format!("cannot listen on {port} (websocket.listen)")), "{stderr}");
}

#[test]
fn print_config_shows_the_effective_configuration() {
    let (status, stdout, _) = run_to_exit(&["--print-config"], &[]);
    assert!(status.success());
    let documented =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/server.toml")).unwrap();
    let printed: toml::Table = toml::from_str(&stdout).unwrap();
    let documented: toml::Table = toml::from_str(&documented).unwrap();
    assert_eq!(printed, documented, "the built-in defaults are the documented ones");
    let (_, stdout, _) = run_to_exit(
        &["--print-config", "--max-connections", "9"],
        &[("ECHO_WEBSOCKET_PING_INTERVAL", "1m"), ("ECHO_WEBSOCKET_MAX_CONNECTIONS", "5")],
    );
    assert!(stdout.contains("max_connections = 9"), "{stdout}");
    assert!(stdout.contains("ping_interval = \"1m\""), "{stdout}");
}

#[test]
fn startup_reports_the_file_limit_and_capacity() {
    let server = TestServer::start(&[]);
    let entry = server.wait_for_log(Duration::from_secs(5), |v| v["open_file_limit"].is_number());
    let limit = entry["open_file_limit"].as_u64().unwrap();
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    assert_eq!(limit, hard, "soft limit raised to the hard limit");
    assert_eq!(entry["connection_capacity"].as_u64().unwrap(), limit - 64);
    assert_eq!(server.metric("process_max_fds"), limit as f64);
}

#[test]
fn admin_health_readiness_and_metrics() {
    let server = TestServer::start(&[]);
    assert_eq!(server.admin_get("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(server.admin_get("/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(server.admin_get("/nope").0, 404);
    let (status, body) = server.admin_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "echo_websocket_connections",
        "echo_websocket_accepted_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "echo_runtime_workers",
        "echo_event_loop_lag_seconds_bucket",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    // The lag probe runs every 10 ms from the start.
    server.wait_for_metric("echo_event_loop_lag_seconds_count", Duration::from_secs(5), |v| v >= 5.0);
    // MQTT's byte counters, exactly, against an exchange whose every byte
    // the client counts: CONNECT, SUBSCRIBE, a QoS 0 and a QoS 1 PUBLISH to
    // its own topic, PINGREQ, DISCONNECT; back come CONNACK, SUBACK, the two
    // echoes, PUBACK, PINGRESP.
    let (mut client_sent, mut client_received) = (0, 0);
    for level in [4u8, 5] {
        let topic = format!("bytes/{level}");
        let mut raw = RawMqtt::connect(server.mqtt_addr());
        let mut exchange = |raw: &mut RawMqtt, bytes: Vec<u8>, answers: usize| {
            raw.send(&bytes);
            client_sent += bytes.len();
            for _ in 0..answers {
                client_received += raw.read_packet().expect("an answer").wire_len();
            }
        };
        exchange(&mut raw, mqtt_raw::connect(level, &format!("bytes-{level}"), 30), 1);
        exchange(&mut raw, mqtt_raw::subscribe(level, 1, &topic), 1);
        exchange(&mut raw, mqtt_raw::publish(level, &topic, b"hello"), 1);
        exchange(&mut raw, mqtt_raw::publish_raw(level, topic.as_bytes(), 1, &[], b"again"), 2);
        exchange(&mut raw, mqtt_raw::PINGREQ.to_vec(), 1);
        exchange(&mut raw, mqtt_raw::DISCONNECT.to_vec(), 0);
        assert_eq!(raw.read_packet(), None, "nothing more, then the close");
    }
    assert_eq!(server.metric("echo_mqtt_received_bytes_total"), client_sent as f64);
    assert_eq!(server.metric("echo_mqtt_sent_bytes_total"), client_received as f64);
    // 3.1.1: 21 + 14 + 16 + 18 + 2 + 2 bytes out, 4 + 5 + 16 + 4 + 16 + 2
    // in. MQTT 5 adds a property length to CONNECT, SUBSCRIBE and each
    // PUBLISH, and its CONNACK carries the server's properties (22 bytes:
    // receive maximum, maximum packet size, topic alias maximum, and what
    // is available).
    assert_eq!((client_sent, client_received), (73 + 77, 47 + 68));
    // The healthcheck subcommand reaches the same endpoint.
    let addr = server.admin_addr().to_string();
    let (status, _, stderr) = run_to_exit(&["healthcheck", "--addr", &addr], &[]);
    assert!(status.success(), "{stderr}");
    drop(server);
    let (status, _, stderr) = run_to_exit(&["healthcheck", "--addr", &addr, "--timeout", "1s"], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

/// Sockets that connect to the admin port and never send a byte must not
/// lock probes out: 16 of them used to fill every admin slot for 10 s. Here
/// 1,000 are opened and held; each newcomer takes the place of the
/// connection that has waited longest for a request, so the real
/// `healthcheck` subcommand and a plain GET are answered every time, within
/// the check's own timeout.
#[test]
fn idle_admin_sockets_cannot_starve_the_health_check() {
    let server = TestServer::start(&[]);
    let addr = server.admin_addr();
    let idle: Vec<std::net::TcpStream> =
        (0..1000).map(|_| std::net::TcpStream::connect(addr).expect("the admin port accepts")).collect();
    // All accepted; all but the last 16 evicted (each /metrics read here
    // evicts one more).
    server.wait_for_metric("echo_admin_evictions_total", Duration::from_secs(20), |v| v >= 984.0);
    let target = addr.to_string();
    for round in 0..10 {
        let started = std::time::Instant::now();
        let (status, _, stderr) = run_to_exit(&["healthcheck", "--addr", &target, "--timeout", "2s"], &[]);
        assert!(status.success(), "round {round}: {stderr}");
        let checked = started.elapsed();
        let started = std::time::Instant::now();
        assert_eq!(common::http_get(addr, "/healthz"), (200, "ok\n".to_owned()), "round {round}");
        eprintln!("round {round}: healthcheck {checked:?}, GET /healthz {:?}", started.elapsed());
    }
    assert_eq!(server.metric("echo_admin_refused_total"), 0.0, "idle sockets are evicted, never probes");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let mut server = TestServer::start(&[]);
    let mut clients = Vec::new();
    for i in 0..200 {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/")).await.unwrap();
        ws.send(Message::Text(format!("{i}").into())).await.unwrap();
        let _ = ws.next().await;
        clients.push(ws);
    }
    // Each client reads (and its library answers the close) on its own task.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Close(Some(frame))))) => u16::from(frame.code),
                    other => panic!("expected close 1001, got {other:?}"),
                }
            })
        })
        .collect();
    let started = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    for reader in readers {
        assert_eq!(reader.await.unwrap(), 1001);
    }
    let status = tokio::task::block_in_place(|| server.wait(Duration::from_secs(10)));
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let summary = server.wait_for_log(Duration::from_secs(2), |v| v["message"] == "shutdown complete");
    assert_eq!(summary["connections_served"], 200);
    assert_eq!(summary["messages_echoed"], 200);
}

#[test]
fn shutdown_waits_for_the_grace_then_exits_and_readyz_says_so() {
    let mut server = TestServer::start(&["--shutdown-grace", "2s"]);
    // A raw client never answers the close frame: the server must give up
    // on it after the grace period, not hang.
    let mut raw = RawClient::connect(server.ws_addr());
    let started = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    assert_eq!(raw.read_close_code(), Some(1001));
    let (status, body) = server.admin_get("/readyz");
    assert_eq!((status, body.as_str()), (503, "shutting down\n"));
    assert_eq!(server.admin_get("/healthz").0, 200, "alive while draining");
    let status = server.wait(Duration::from_secs(10));
    assert!(status.success());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(4), "took {took:?}");
    server.wait_for_log(Duration::from_secs(1), |v| v["left_open"] == 1);
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut server = TestServer::start(&["--shutdown-grace", "30s"]);
    let _raw = RawClient::connect(server.ws_addr());
    server.signal(libc::SIGINT);
    server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"].as_str().unwrap_or("").starts_with("shutting down")
    });
    let started = std::time::Instant::now();
    server.signal(libc::SIGINT);
    let status = server.wait(Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
}

/// How many times the log said the open-file limit stopped connections.
fn fd_warnings(server: &TestServer) -> usize {
    server
        .logs()
        .iter()
        .filter(|v| {
            v["message"].as_str().is_some_and(|m| m.starts_with("the open-file limit, not the server"))
        })
        .count()
}

#[tokio::test]
async fn running_out_of_file_descriptors_is_reported_once_and_recovers() {
    // 128 files: about 110 are left for clients once the process has its
    // listeners, epoll and standard streams. Ask for more connections than
    // that, so the open-file limit is what stops them.
    let server = TestServer::start_with_limit(&["--max-connections", "1000"], &[], Some(128));
    server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"].as_str().is_some_and(|m| m.contains("websocket.max_connections is above"))
    });
    let mut clients = Vec::new();
    let mut stalled = 0;
    for _ in 0..150 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio_tungstenite::connect_async(server.ws_url("/")),
        )
        .await
        {
            Ok(Ok((ws, _))) => clients.push(ws),
            Ok(Err(e)) => panic!("a client over the file limit must wait, not fail: {e}"),
            Err(_) => {
                stalled += 1;
                if stalled >= 3 {
                    break;
                }
            }
        }
    }
    assert!(clients.len() > 80 && clients.len() < 128, "{} clients got in", clients.len());
    let warnings = fd_warnings(&server);
    assert_eq!(warnings, 1, "one warning per episode, not one per attempt");
    // Churn at the limit: free a few descriptors, let waiting and new clients
    // take them, hit the limit again. Still the same episode: no new warning
    // (it ends once the limit has not been hit for 10 s; unit-tested).
    for round in 0..3 {
        for mut ws in clients.drain(..5) {
            ws.close(None).await.unwrap();
            while let Some(Ok(_)) = ws.next().await {}
        }
        let mut got_in = 0;
        for _ in 0..10 {
            match tokio::time::timeout(
                Duration::from_millis(300),
                tokio_tungstenite::connect_async(server.ws_url("/")),
            )
            .await
            {
                Ok(Ok((ws, _))) => {
                    got_in += 1;
                    clients.push(ws);
                }
                Ok(Err(e)) => panic!("a client over the file limit must wait, not fail: {e}"),
                Err(_) => break,
            }
        }
        assert!(got_in >= 1, "round {round}: a freed descriptor lets a client in");
    }
    let warnings = fd_warnings(&server);
    assert_eq!(warnings, 1, "churn at the limit is one episode");
    // Free some descriptors: a new client is accepted and echoed.
    for mut ws in clients.drain(..20) {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let (mut ws, _) =
        tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(server.ws_url("/")))
            .await
            .expect("accepted once descriptors are free")
            .unwrap();
    ws.send(Message::Text("back".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("back".into()));
    // (The admin listener needed a descriptor too, so metrics are read now.)
    assert!(server.metric("echo_accept_fd_exhausted_total{listener=\"websocket\"}") >= 1.0);
}

/// Memory that clients held and let go is given back to the OS, also when
/// something allocated later sits above it in the heap (where glibc's
/// `free` alone keeps it resident): 500 connections each make the server
/// buffer most of a 60 KB CONNECT (30 MB), a client connects after them,
/// and they leave; within the trim period and a margin, resident memory is
/// back near where it was.
#[test]
fn memory_clients_let_go_goes_back_to_the_os() {
    let server = TestServer::start(&[]);
    let mut bystander = RawClient::connect(server.ws_addr());
    bystander.send_frame(true, 1, b"before");
    assert_eq!(bystander.read_frame().unwrap().payload, b"before");
    let before = server.rss_bytes();
    let mut connect = mqtt_raw::connect_with_will(4, "big", b"w", &vec![b'x'; 60_000], 0);
    connect.truncate(connect.len() - 1_000);
    let holders: Vec<RawMqtt> = (0..500)
        .map(|_| {
            let mut holder = RawMqtt::connect(server.mqtt_addr());
            holder.send(&connect);
            holder
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.rss_bytes() < before + (25 << 20) {
        assert!(std::time::Instant::now() < deadline, "the CONNECTs were not buffered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = server.rss_bytes();
    // Allocated after the buffers, so above them in the heap.
    let mut later = RawMqtt::session(server.mqtt_addr(), 5, "later", 60);
    drop(holders);
    server.wait_for_metric(
        "echo_mqtt_refused_total{reason=\"disconnected\"}",
        Duration::from_secs(10),
        |n| n >= 500.0,
    );
    server.wait_for_metric("echo_memory_trim_seconds_count", Duration::from_secs(15), |n| n >= 1.0);
    let after = server.rss_bytes();
    eprintln!("RSS before {before}, holding {held}, after {after}");
    assert!(after < before + (8 << 20), "RSS before {before}, holding {held}, after {after}");
    later.send(&mqtt_raw::PINGREQ);
    assert_eq!(later.read_packet().unwrap().packet_type(), 13);
    bystander.send_frame(true, 1, b"after");
    assert_eq!(bystander.read_frame().unwrap().payload, b"after");
}
