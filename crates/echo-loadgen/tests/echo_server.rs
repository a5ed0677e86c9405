//! End to end against the real echo-server of this workspace: counts add
//! up, workers and source addresses merge exactly, the server's resources
//! are read, thresholds and bad input end the run with the right status.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn counts_add_up_over_steps_and_the_server_agrees() {
    let server = echo_server(&[]);
    let metrics = server.admin_url("/metrics");
    let run = loadgen(
        "counts",
        &[
            &server.ws_url("/"),
            "--steps",
            "20,60",
            "--hold",
            "2s",
            "--rate",
            "20",
            "--server-metrics",
            &metrics,
        ],
    );
    assert_eq!(run.code(), 0, "{}", run.stderr());
    for (i, want) in [(0, 20), (1, 60)] {
        let s = run.step(i);
        assert_eq!(u(&s["target_connections"]), want);
        assert_eq!(u(&s["open_connections"]), want, "step {i}");
        // Connections are attempted during the ramp to their step only.
        assert_eq!(u(&s["ramp"]["attempted"]), if i == 0 { 20 } else { 40 });
        assert_eq!(u(&s["ramp"]["connected"]), u(&s["ramp"]["attempted"]));
        assert_eq!(u(&s["ramp"]["connect_time"]["count"]), u(&s["ramp"]["connected"]));
        let sent = u(&s["hold"]["sent"]);
        let received = u(&s["hold"]["received"]);
        // 20 msg/s × connections × ~2 s, give or take the edges.
        let expected = 20 * want * 2;
        assert!(
            sent > expected * 8 / 10 && sent < expected * 12 / 10,
            "step {i}: sent {sent}, expected ~{expected}"
        );
        // Every echo is counted once; only messages in flight at the edges differ.
        assert!(sent.abs_diff(received) <= want * 2, "sent {sent} received {received}");
        assert_eq!(u(&s["hold"]["latency"]["count"]), received);
        assert_eq!(u(&s["derived"]["errors"]), 0, "{s}");
        let server_side = &s["server"];
        assert_eq!(u(&server_side["connections"]), want, "the server counts the same connections");
        assert!(u(&server_side["rss_bytes"]) > 1_000_000);
        assert!(s["derived"]["server_cpu_percent"].as_f64().is_some());
        assert!(s["derived"]["generator_cpu_percent"].as_f64().unwrap() > 0.0);
    }
    let table = run.stdout();
    assert!(table.contains("p99.9") && table.lines().count() >= 4, "{table}");
}

#[test]
fn workers_and_source_addresses_merge_exactly() {
    let server = echo_server(&[]);
    let pid = server.pid().to_string();
    let run = loadgen(
        "workers",
        &[
            &server.ws_url("/"),
            "--steps",
            "30",
            "--hold",
            "2s",
            "--rate",
            "10",
            "--workers",
            "3",
            "--source",
            "127.0.0.2-127.0.0.4",
            "--server-pid",
            &pid,
        ],
    );
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    assert_eq!(u(&run.json()["machine"]["workers"]), 3);
    assert_eq!(u(&s["open_connections"]), 30);
    let received = u(&s["hold"]["received"]);
    assert!(received > 400, "{received}");
    // The merged histogram holds every sample of every worker.
    assert_eq!(u(&s["hold"]["latency"]["count"]), received);
    // /proc sampling: the server holds at least one descriptor per connection.
    assert!(u(&s["server"]["open_fds"]) >= 30);
    assert!(s["derived"]["server_rss_per_connection"].as_f64().unwrap() > 0.0);
}

#[test]
fn closed_loop_throughput_and_merge_of_two_runs() {
    let server = echo_server(&[]);
    let a = loadgen(
        "merge-a",
        &[&server.ws_url("/"), "--steps", "10", "--hold", "1s", "--rate", "max", "--in-flight", "2"],
    );
    let b = loadgen(
        "merge-b",
        &[&server.ws_url("/"), "--steps", "10", "--hold", "1s", "--rate", "max", "--in-flight", "2"],
    );
    assert_eq!((a.code(), b.code()), (0, 0), "{}{}", a.stderr(), b.stderr());
    let (ra, rb) = (u(&a.step(0)["hold"]["received"]), u(&b.step(0)["hold"]["received"]));
    assert!(ra > 100 && rb > 100, "closed loop echoes continuously: {ra} {rb}");
    let dir = scratch("merge-out");
    let (fa, fb, out) = (dir.join("a.json"), dir.join("b.json"), dir.join("m.json"));
    std::fs::write(&fa, a.json().to_string()).unwrap();
    std::fs::write(&fb, b.json().to_string()).unwrap();
    let mut cmd = Command::new(LOADGEN);
    cmd.arg("merge").arg(&fa).arg(&fb).arg("--json").arg(&out).arg("--csv").arg(dir.join("m.csv"));
    let o = run_bounded(cmd, Duration::from_secs(30));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let s = &m["steps"][0];
    assert_eq!(u(&s["target_connections"]), 20);
    assert_eq!(u(&s["hold"]["received"]), ra + rb);
    assert_eq!(u(&s["hold"]["latency"]["count"]), ra + rb);
    let max = u(&a.step(0)["hold"]["latency"]["max_us"]).max(u(&b.step(0)["hold"]["latency"]["max_us"]));
    let merged_max = u(&s["hold"]["latency"]["max_us"]);
    assert!(merged_max.abs_diff(max) <= max / 500 + 1, "{merged_max} vs {max}");
    let csv = std::fs::read_to_string(dir.join("m.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2);
    // A run of another scenario does not merge: here, "the same" run as an
    // MQTT QoS 1 run. The refusal names the file and the field.
    let mut other = a.json().clone();
    other["protocol"] = "mqtt".into();
    other["settings"]["qos"] = 1.into();
    let fc = dir.join("c.json");
    std::fs::write(&fc, other.to_string()).unwrap();
    let mut cmd = Command::new(LOADGEN);
    cmd.arg("merge").arg(&fa).arg(&fc).arg("--json").arg(dir.join("bad.json"));
    let o = run_bounded(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("c.json and") && stderr.contains("differ in protocol (mqtt vs websocket)"),
        "{stderr}"
    );
    assert!(!dir.join("bad.json").exists(), "nothing is written");
}

#[test]
fn thresholds_fail_the_run_with_the_reason() {
    let server = echo_server(&[]);
    let run = loadgen(
        "thresholds",
        &[&server.ws_url("/"), "--steps", "5", "--hold", "1s", "--rate", "20", "--max-p99", "1us"],
    );
    assert_eq!(run.code(), 3, "{}", run.stderr());
    assert!(run.stderr().contains("exceeds --max-p99 1µs"), "{}", run.stderr());
    // The result is still written, with the failure in it.
    assert_eq!(run.json()["failures"].as_array().unwrap().len(), 1);
    let ok = loadgen(
        "thresholds-ok",
        &[&server.ws_url("/"), "--steps", "5", "--hold", "1s", "--max-p99", "5s", "--max-error-rate", "0"],
    );
    assert_eq!(ok.code(), 0, "{}", ok.stderr());
}

#[test]
fn run_is_the_default_subcommand() {
    let server = echo_server(&[]);
    let dir = scratch("default-run");
    let json = dir.join("r.json");
    // As the issue writes it: the URL first, no subcommand.
    let mut cmd = Command::new(LOADGEN);
    cmd.args([&server.ws_url("/"), "--steps", "3", "--hold", "1s", "--rate", "5", "-q"])
        .arg("--json")
        .arg(&json);
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(u(&r["steps"][0]["open_connections"]), 3);
    assert!(String::from_utf8_lossy(&out.stdout).contains("p99.9"), "the table is printed");
    // Help still lists the subcommands, and says which one is the default.
    let mut cmd = Command::new(LOADGEN);
    cmd.arg("--help");
    let help = run_bounded(cmd, Duration::from_secs(10));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("merge") && help.contains("compare") && help.contains("`run` is the default"),
        "{help}"
    );
}

#[test]
fn bad_input_is_refused_before_the_run_with_what_to_change() {
    let server = echo_server(&[]);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let admin = server.admin_addr();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![format!("ws://{closed}/")], "connection refused"),
        (vec![format!("ws://{admin}/metrics")], "instead of 101"),
        (vec![format!("mqtt://{}", server.ws_addr())], "is it an MQTT broker"),
        (vec![format!("http://{}/", server.ws_addr())], "ws://"),
        (
            vec![server.ws_url("/"), "--steps".into(), "30000".into(), "--workers".into(), "1".into()],
            "--workers 2",
        ),
        (vec![server.ws_url("/"), "--steps".into(), "200000".into()], "--source"),
        (vec![server.ws_url("/"), "--size".into(), "10".into()], "header"),
        (vec![server.ws_url("/"), "--server-pid".into(), "4000000000".into()], "--server-pid"),
        (vec![server.ws_url("/"), "--qos".into(), "1".into()], "--qos applies to MQTT only"),
        (vec![server.ws_url("/"), "--rate".into(), "-1".into()], "cannot be negative"),
        (vec!["ws://no-such-host.invalid:8080/".into()], "cannot resolve the host \"no-such-host.invalid\""),
        // A remote server: no loopback addresses are suggested (nothing is
        // sent to it: the ports are counted before the server is probed).
        (
            vec!["ws://192.0.2.1:8080/".into(), "--steps".into(), "200000".into()],
            "addresses of this machine that reach",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = loadgen("bad-input", &args);
        assert_eq!(run.code(), 2, "{args:?}: {}", run.stderr());
        assert!(run.stderr().contains(needle), "{args:?}: expected {needle:?} in {}", run.stderr());
        assert!(run.json.is_none(), "nothing was measured");
    }
}

#[test]
fn ctrl_c_reports_the_completed_steps_and_stops_the_workers() {
    use std::os::unix::process::CommandExt;
    let server = echo_server(&[]);
    let dir = scratch("interrupt");
    let json = dir.join("r.json");
    let mut cmd = Command::new(LOADGEN);
    cmd.args([
        "run",
        &server.ws_url("/"),
        "--steps",
        "10,20,30",
        "--hold",
        "2s",
        "--rate",
        "5",
        "--workers",
        "2",
        "-q",
    ])
    .arg("--json")
    .arg(&json);
    // Its own process group, as a terminal's foreground job is.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    // Step 1 is measured after ~2 s; interrupt during step 2.
    std::thread::sleep(Duration::from_millis(3000));
    // SAFETY: signalling the process group we created.
    unsafe { libc::kill(-pid, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted during step 2 of 3"), "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["steps"].as_array().unwrap().len(), 1);
    assert_eq!(u(&r["steps"][0]["open_connections"]), 10);
    // The workers are gone: no process of the group is left.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signal 0 only checks for existence.
    assert_ne!(unsafe { libc::kill(-pid, 0) }, 0, "a worker outlived the run");
}
