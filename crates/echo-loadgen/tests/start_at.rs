//! `--start-at` against the real echo-server: two agents launched apart
//! begin their steps together, say that they wait, record the moment, and
//! their results merge; a moment past or too far ahead is refused before
//! anything is started.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[test]
fn two_agents_launched_apart_begin_together_and_merge() {
    let server = echo_server(&[]);
    let url = server.ws_url("/");
    // Whole seconds, as a script would compute it with `date +%s`.
    let at = unix_ms(SystemTime::now()) / 1000 + 5;
    let at_arg = at.to_string();
    let agent = |name: &'static str| {
        let (url, at_arg) = (url.clone(), at_arg.clone());
        std::thread::spawn(move || {
            loadgen(name, &[&url, "--steps", "20", "--hold", "1s", "--rate", "10", "--start-at", &at_arg])
        })
    };
    let first = agent("start-a");
    // The second agent is launched well after the first.
    std::thread::sleep(Duration::from_millis(1500));
    let second = agent("start-b");
    let (a, b) = (first.join().unwrap(), second.join().unwrap());
    let mut begun = Vec::new();
    for run in [&a, &b] {
        assert_eq!(run.code(), 0, "{}", run.stderr());
        // Said even with --quiet, naming the moment in UTC.
        let want = format!("waiting until {} (in ", rfc3339(at));
        assert!(run.stderr().contains(&want), "no {want:?} in:\n{}", run.stderr());
        let json = run.json();
        assert_eq!(json["settings"]["start_at"], rfc3339(at).as_str(), "{json}");
        let started = u(&json["started_unix_ms"]);
        assert_eq!(u(&json["started_unix"]), started / 1000);
        assert_eq!(u(&run.step(0)["open_connections"]), 20);
        begun.push(started);
    }
    // Neither began before the moment, and both began on it: launched 1.5 s
    // apart, they started within a fraction of a second of each other.
    for &ms in &begun {
        assert!(ms >= at * 1000, "began at {ms}, before {}", at * 1000);
        assert!(ms < at * 1000 + 500, "began at {ms}, {} ms after the moment", ms - at * 1000);
    }
    assert!(begun[0].abs_diff(begun[1]) < 500, "began {begun:?}");

    // `merge` adds the two agents up, and keeps the earlier start.
    let dir = scratch("start-merged");
    let merged = dir.join("merged.json");
    let files = [&a, &b].map(|r| {
        let p = dir.join(format!("{}.json", u(&r.json()["started_unix_ms"])));
        std::fs::write(&p, r.json().to_string()).unwrap();
        p
    });
    let mut cmd = Command::new(LOADGEN);
    cmd.arg("merge").args(&files).arg("--json").arg(&merged).stdin(Stdio::null());
    let out = run_bounded(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let merged: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    assert_eq!(u(&merged["steps"][0]["open_connections"]), 40);
    assert_eq!(u(&merged["machine"]["runs"]), 2);
    assert_eq!(u(&merged["started_unix_ms"]), *begun.iter().min().unwrap());
}

#[test]
fn a_moment_past_or_far_ahead_is_refused_before_any_connection() {
    let server = echo_server(&[]);
    let now = unix_ms(SystemTime::now()) / 1000;
    for (at, says) in [
        ((now - 60).to_string(), "ago"),
        (rfc3339(now - 60), "ago"),
        ((now + 2 * 3600).to_string(), "ahead"),
        ("18:00".to_string(), "RFC 3339"),
    ] {
        let run = loadgen(
            "start-refused",
            &[&server.ws_url("/"), "--steps", "5", "--hold", "1s", "--start-at", &at],
        );
        assert_eq!(run.code(), 2, "--start-at {at}: {}", run.stderr());
        assert!(run.stderr().contains(says), "--start-at {at}: {}", run.stderr());
        assert!(run.json.is_none(), "--start-at {at}: nothing was measured");
    }
    // The server never saw a client.
    let accepted = server.metrics().get("echo_websocket_accepted_total").copied();
    assert_eq!(accepted, Some(0.0), "the server accepted a connection");
}

/// `at` (unix seconds) as the run prints and records it.
fn rfc3339(at: u64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{at}"), "+%Y-%m-%dT%H:%M:%S.000Z"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
