//! Several worker processes on shared ports (`server.workers`): the
//! supervisor, restarts, signals, the admin port that speaks for all.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::mqtt_raw::{self, RawMqtt};
use common::raw::RawClient;
use common::{TestServer, run_to_exit};

/// A WebSocket client that has echoed one message.
fn echo_client(server: &TestServer, text: &str) -> RawClient {
    let mut client = RawClient::connect(server.ws_addr());
    assert!(echoes(&mut client, text), "a new client is echoed");
    client
}

/// Whether `client` gets `text` back (false: its connection is gone).
fn echoes(client: &mut RawClient, text: &str) -> bool {
    use std::io::Write;
    let frame = RawClient::frame(true, 1, text.as_bytes(), true);
    if client.stream.write_all(&frame).is_err() {
        return false;
    }
    match client.read_frame() {
        Some(frame) => {
            assert_eq!((frame.opcode, frame.payload.as_slice()), (1, text.as_bytes()));
            true
        }
        None => false,
    }
}

/// Each worker's pid, as the supervisor logged it when the worker was ready
/// (the latest, for a worker that was restarted).
fn worker_pids(server: &TestServer) -> HashMap<u64, u64> {
    server
        .logs()
        .iter()
        .filter(|v| v["message"] == "worker ready")
        .map(|v| (v["worker"].as_u64().unwrap(), v["pid"].as_u64().unwrap()))
        .collect()
}

/// Open WebSocket connections of each worker, from the supervisor's `/metrics`.
fn connections_by_worker(server: &TestServer) -> [f64; 2] {
    let metrics = server.metrics();
    let get = |w: u8| metrics.get(&format!("echo_websocket_connections{{worker=\"{w}\"}}")).copied();
    [get(0).expect("worker 0's figures"), get(1).expect("worker 1's figures")]
}

fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_workers_share_the_ports_and_the_admin_port_speaks_for_both() {
    let server = TestServer::start(&["--workers", "2"]);
    let ready =
        server.wait_for_log(Duration::from_secs(1), |v| v["message"] == "ready" && v["worker"].is_null());
    assert_eq!(ready["workers"], 2);
    let per_worker = ready["connection_capacity_per_worker"].as_str().unwrap().to_owned();
    let limit = ready["open_file_limit"].as_u64().unwrap();
    assert_eq!(per_worker, format!("[{}, {}]", limit - 64, limit - 64));
    assert_eq!(ready["connection_capacity"].as_u64().unwrap(), 2 * (limit - 64), "the total");
    // Each worker reports its own open-file limit, through the supervisor's log.
    for worker in [0, 1] {
        server.wait_for_log(Duration::from_secs(1), |v| {
            v["worker"] == worker && v["open_file_limit"] == limit && v["connection_capacity"] == limit - 64
        });
    }
    server.wait_for_log(Duration::from_secs(1), |v| {
        v["level"] == "WARN" && v["message"].as_str().unwrap_or("").contains("its own MQTT broker")
    });

    // Connections from many source ports spread over both workers.
    let mut clients: Vec<RawClient> = (0..40).map(|i| echo_client(&server, &format!("hello {i}"))).collect();
    let [w0, w1] = connections_by_worker(&server);
    assert_eq!(w0 + w1, 40.0);
    assert!(w0 > 0.0 && w1 > 0.0, "both workers serve clients: {w0} and {w1}");
    for (i, client) in clients.iter_mut().enumerate() {
        assert!(echoes(client, &format!("again {i}")));
    }

    // MQTT on the shared port: a client is echoed by its own worker's broker.
    let mut mqtt = RawMqtt::session(server.mqtt_addr(), 5, "workers-mqtt", 30);
    mqtt.send(&mqtt_raw::subscribe(5, 1, "workers/echo"));
    assert_eq!(mqtt.read_packet().unwrap().packet_type(), 9, "SUBACK");
    mqtt.send(&mqtt_raw::publish(5, "workers/echo", b"over MQTT"));
    let echoed = mqtt.read_packet().unwrap();
    assert_eq!(echoed.packet_type(), 3, "PUBLISH");
    assert!(echoed.body.ends_with(b"over MQTT"));

    assert_eq!(server.admin_get("/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(server.admin_get("/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(server.admin_get("/nope").0, 404);
    let metrics = server.metrics();
    assert_eq!(metrics["echo_workers"], 2.0);
    for worker in ["0", "1"] {
        assert_eq!(metrics[&format!("echo_worker_up{{worker=\"{worker}\"}}")], 1.0);
        assert_eq!(metrics[&format!("echo_worker_restarts_total{{worker=\"{worker}\"}}")], 0.0);
        assert_eq!(metrics[&format!("process_max_fds{{worker=\"{worker}\"}}")], limit as f64);
    }
    let mqtt_sessions: f64 =
        metrics.iter().filter(|(k, _)| k.starts_with("echo_mqtt_connections{")).map(|(_, v)| v).sum();
    assert_eq!(mqtt_sessions, 1.0, "one MQTT session, on one of the workers");
    // One exposition: each family's samples together, one # EOF at the end.
    let (_, body) = server.admin_get("/metrics");
    assert!(body.ends_with("# EOF\n") && body.matches("# EOF").count() == 1);
    assert_eq!(body.matches("# TYPE echo_websocket_connections ").count(), 1);
}

#[test]
fn a_killed_worker_drops_only_its_clients_and_is_restarted() {
    let server = TestServer::start(&["--workers", "2"]);
    let mut clients: Vec<RawClient> = (0..30).map(|i| echo_client(&server, &format!("{i}"))).collect();
    let [on_worker_0, _] = connections_by_worker(&server);
    let old_pid = worker_pids(&server)[&0];
    // SAFETY: a signal to a process this test's server started.
    assert_eq!(unsafe { libc::kill(old_pid as libc::pid_t, libc::SIGKILL) }, 0);

    let died = server.wait_for_log(Duration::from_secs(5), |v| {
        v["worker"] == 0 && v["message"].as_str().unwrap_or("").starts_with("worker died")
    });
    assert_eq!(died["level"], "WARN");
    assert!(died["status"].as_str().unwrap().contains("SIGKILL"), "{died}");
    // The other worker's clients are still echoed; worker 0's are gone.
    let mut dropped = 0;
    for (i, client) in clients.iter_mut().enumerate() {
        if !echoes(client, &format!("after {i}")) {
            dropped += 1;
        }
    }
    assert_eq!(dropped as f64, on_worker_0, "exactly the dead worker's clients dropped");
    assert!(dropped < clients.len(), "the other worker kept its clients");

    wait_until(Duration::from_secs(10), "worker 0 restarted", || {
        worker_pids(&server).get(&0).is_some_and(|&pid| pid != old_pid)
    });
    server.wait_for_log(Duration::from_secs(1), |v| v["message"] == "worker started" && v["worker"] == 0);
    assert_eq!(server.metric("echo_worker_restarts_total{worker=\"0\"}"), 1.0);
    assert_eq!(server.metric("echo_worker_up{worker=\"0\"}"), 1.0);
    assert_eq!(server.admin_get("/readyz").0, 200);
    // New connections land on both workers again, the new one included.
    let fresh: Vec<RawClient> = (0..30).map(|i| echo_client(&server, &format!("new {i}"))).collect();
    let [w0, w1] = connections_by_worker(&server);
    assert!(w0 > 0.0 && w1 > 0.0, "the restarted worker takes new clients: {w0} and {w1}");
    drop(fresh);
}

#[test]
fn sigterm_drains_every_worker_and_exits_0() {
    let mut server = TestServer::start(&["--workers", "2", "--shutdown-grace", "3s"]);
    let mut clients: Vec<RawClient> = (0..20).map(|i| echo_client(&server, &format!("{i}"))).collect();
    let mut mqtt: Vec<RawMqtt> =
        (0..8).map(|i| RawMqtt::session(server.mqtt_addr(), 5, &format!("drain-{i}"), 30)).collect();
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    for client in &mut clients {
        assert_eq!(client.read_close_code(), Some(1001));
    }
    for session in &mut mqtt {
        assert_eq!(session.read_packet().unwrap().disconnect_reason(), 0x8b, "server shutting down");
    }
    // The raw WebSocket clients never answer the close: the workers give up
    // on them when the grace ends, and the supervisor exits 0 after them.
    let status = server.wait(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(3) + Duration::from_millis(1500), "took {took:?}");
    server
        .wait_for_log(Duration::from_secs(1), |v| v["message"] == "shutdown complete: every worker stopped");
    for worker in [0, 1] {
        server.wait_for_log(Duration::from_secs(1), |v| {
            v["worker"] == worker && v["message"] == "shutdown complete"
        });
    }
}

#[test]
fn readyz_turns_503_while_the_workers_drain() {
    let mut server = TestServer::start(&["--workers", "2", "--shutdown-grace", "2s"]);
    let mut raw = RawClient::connect(server.ws_addr());
    server.signal(libc::SIGINT);
    assert_eq!(raw.read_close_code(), Some(1001));
    assert_eq!(server.admin_get("/readyz"), (503, "shutting down\n".to_owned()));
    assert_eq!(server.admin_get("/healthz").0, 200, "alive while draining");
    assert!(server.wait(Duration::from_secs(10)).success());
}

#[test]
fn auto_is_one_worker_per_cpu() {
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let server = TestServer::start_with_env(&[], &[("ECHO_SERVER_WORKERS", "auto")]);
    if cpus == 1 {
        // One CPU: one worker is a single process, as without the setting.
        assert!(server.logs().iter().all(|v| v["worker"].is_null()));
        return;
    }
    let ready =
        server.wait_for_log(Duration::from_secs(1), |v| v["message"] == "ready" && v["worker"].is_null());
    assert_eq!(ready["workers"].as_u64(), Some(cpus));
    assert_eq!(worker_pids(&server).len() as u64, cpus);
}

#[test]
fn one_worker_is_one_process_without_a_supervisor() {
    let server = TestServer::start(&[]);
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", server.pid())).unwrap_or_default();
    assert_eq!(children.trim(), "", "no worker processes");
    assert!(server.logs().iter().all(|v| v["worker"].is_null() && v["workers"].is_null()));
    assert_eq!(server.admin_get("/readyz").0, 200);
}

#[test]
fn a_bad_workers_value_names_the_key_and_exits_2_before_binding() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    for (args, env) in [
        (vec!["--workers", "0"], vec![]),
        (vec!["--workers", "lots"], vec![]),
        (vec![], vec![("ECHO_SERVER_WORKERS", "-2")]),
        (vec![], vec![("ECHO_SERVER_WORKERS", "100000")]),
    ] {
        let mut all = args.clone();
        all.extend(["--ws-listen", &port, "--no-admin"]);
        let (status, _, stderr) = run_to_exit(&all, &env);
        assert_eq!(status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.starts_with("echo-server: invalid configuration: server.workers: "), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
    }
    let (status, stdout, _) = run_to_exit(&["--print-config", "--workers", "auto"], &[]);
    assert!(status.success());
    assert!(stdout.contains("workers = \"auto\""), "{stdout}");
}

#[test]
fn mqtt_persistence_with_several_workers_is_refused_before_binding() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = std::env::temp_dir();
    let file = dir.join(format!("echo-workers-persist-{}.db", std::process::id()));
    let (status, _, stderr) = run_to_exit(
        &["--workers", "2", "--ws-listen", &port, "--no-admin"],
        &[("ECHO_MQTT_PERSISTENCE", "true"), ("ECHO_MQTT_PERSISTENCE_FILE", file.to_str().unwrap())],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("echo-server: invalid configuration: mqtt.persistence: "), "{stderr}");
    assert!(!file.exists(), "nothing written");
}

#[test]
fn a_taken_port_fails_the_start_naming_its_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let (status, _, stderr) = run_to_exit(
        &["--workers", "2", "--ws-listen", "127.0.0.1:0", "--mqtt-listen", &port, "--no-admin"],
        &[],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {port} (mqtt.listen)")), "{stderr}");
}

/// Whether a process with this pid exists (and is not a zombie).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[test]
fn a_second_signal_ends_the_supervisor_and_its_workers_at_once() {
    let mut server = TestServer::start(&["--workers", "2", "--shutdown-grace", "30s"]);
    let _raw = RawClient::connect(server.ws_addr());
    let pids: Vec<u64> = worker_pids(&server).into_values().collect();
    server.signal(libc::SIGINT);
    server.wait_for_log(Duration::from_secs(5), |v| {
        v["message"].as_str().unwrap_or("").starts_with("shutting down") && !v["worker"].is_null()
    });
    let started = Instant::now();
    server.signal(libc::SIGINT);
    let status = server.wait(Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
    wait_until(Duration::from_secs(3), "the workers exit too", || pids.iter().all(|&pid| !alive(pid)));
}

#[test]
fn workers_drain_and_exit_when_the_supervisor_is_killed() {
    let server = TestServer::start(&["--workers", "2", "--shutdown-grace", "2s"]);
    let pids: Vec<u64> = worker_pids(&server).into_values().collect();
    assert_eq!(pids.len(), 2);
    let mut raw = RawClient::connect(server.ws_addr());
    server.signal(libc::SIGKILL);
    // PR_SET_PDEATHSIG: the kernel sends each worker SIGTERM.
    assert_eq!(raw.read_close_code(), Some(1001));
    wait_until(Duration::from_secs(5), "the orphaned workers exit", || pids.iter().all(|&pid| !alive(pid)));
}
