//! The end-to-end test harness both crates share: runs a real `echo-server`
//! binary on loopback ports the OS picks, finds those ports in its JSON log,
//! keeps the log for assertions, and stops it (SIGTERM when a test asks,
//! SIGKILL when the handle is dropped).
//!
//! Which binary is each crate's business: the server's tests have Cargo's
//! `CARGO_BIN_EXE_echo-server`, the load generator's build it (see their
//! `tests/common`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server process; killed when dropped.
pub struct Server {
    child: Option<Child>,
    /// Listen addresses by protocol ("websocket", "admin", ...), in log order.
    pub addrs: HashMap<String, Vec<SocketAddr>>,
    logs: Arc<Mutex<Vec<Value>>>,
}

/// `bin` with none of the developer's `ECHO_*` or `RUST_LOG` variables,
/// which the server would read as configuration.
pub fn command(bin: impl AsRef<Path>) -> Command {
    let mut command = Command::new(bin.as_ref());
    for (key, _) in std::env::vars() {
        if key.starts_with("ECHO_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    command
}

impl Server {
    /// Starts `bin` with JSON logs at level info and every listener on
    /// loopback port 0, unless `args` say otherwise (`--ws-listen`,
    /// `--mqtt-listen` or `--no-mqtt`, ...), then `args`; with `env` added
    /// and, when given, the open-file limit (soft and hard) lowered to
    /// `nofile`. Returns once the server logs "ready".
    pub fn start(bin: impl AsRef<Path>, args: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> Server {
        let mut all: Vec<&str> = vec!["--log-format", "json"];
        if !args.contains(&"--log-level") {
            all.extend(["--log-level", "info"]);
        }
        if !args.contains(&"--ws-listen") {
            all.extend(["--ws-listen", "127.0.0.1:0"]);
        }
        // Never MQTT's default 0.0.0.0:1883 in a test.
        if !args.iter().any(|a| *a == "--mqtt-listen" || *a == "--no-mqtt") {
            all.extend(["--mqtt-listen", "127.0.0.1:0"]);
        }
        if !args.iter().any(|a| *a == "--admin-listen" || *a == "--no-admin") {
            all.extend(["--admin-listen", "127.0.0.1:0"]);
        }
        all.extend(args);
        let mut command = command(bin);
        command
            .args(&all)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        if let Some(limit) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("echo-server starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        {
            // Reads to the end, so the server never blocks on a full pipe.
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let value = serde_json::from_str::<Value>(&line)
                        .unwrap_or_else(|_| serde_json::json!({ "message": line, "raw": true }));
                    // With several workers, the supervisor's line (not a
                    // worker's, which carries a `worker` field) says ready.
                    let is_ready = value["message"] == "ready" && value["worker"].is_null();
                    logs.lock().unwrap().push(value);
                    if is_ready {
                        let _ = ready_tx.send(());
                    }
                }
            });
        }
        let mut server = Server { child: Some(child), addrs: HashMap::new(), logs };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!("server did not become ready: {command:?}; logs:\n{}", server.log_text());
        }
        for entry in server.logs.lock().unwrap().iter() {
            // The supervisor's addresses, not its workers' own admin ports.
            if entry["message"] == "listening" && entry["worker"].is_null() {
                let protocol = entry["protocol"].as_str().unwrap().to_owned();
                let addr: SocketAddr = entry["addr"].as_str().unwrap().parse().unwrap();
                server.addrs.entry(protocol).or_default().push(addr);
            }
        }
        server
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.addrs["websocket"][0]
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.ws_addr(), path)
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.addrs["mqtt"][0]
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs["admin"][0]
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr(), path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// All log entries so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.logs().iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
    }

    /// Waits until a log entry satisfies `pred`.
    pub fn wait_for_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.logs().into_iter().find(|v| pred(v)) {
                return found;
            }
            if Instant::now() > deadline {
                panic!("log entry not found within {timeout:?}; logs:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_addr(), path)
    }

    /// The `/metrics` exposition, parsed into "name{labels}" → value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200);
        parse_metrics(&body)
    }

    /// One metric's value, 0 when absent (a counter not yet created).
    pub fn metric(&self, key: &str) -> f64 {
        self.metrics().get(key).copied().unwrap_or(0.0)
    }

    /// Polls a metric until `pred` holds.
    pub fn wait_for_metric(&self, key: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(key);
            if pred(value) {
                return value;
            }
            if Instant::now() > deadline {
                panic!("metric {key} = {value} did not reach the expected value within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the server process, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// Names of the process's OS threads, sorted.
    pub fn thread_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{}/task", self.pid())).unwrap() {
            let path = entry.unwrap().path().join("comm");
            if let Ok(name) = std::fs::read_to_string(path) {
                names.push(name.trim().to_owned());
            }
        }
        names.sort();
        names
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Sends SIGTERM and waits for the exit: (status, time it took).
    pub fn terminate(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        self.signal(libc::SIGTERM);
        let status = self.wait(timeout);
        (status, start.elapsed())
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Let the log reader take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                panic!("server did not exit within {timeout:?}; logs:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"))
}

/// Sends raw request bytes and reads the whole response: (status, body).
pub fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = http_exchange(addr, request.as_bytes());
    (status, body)
}

/// Sends raw bytes, reads until the server closes: (status, head, body).
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("the server closes cleanly, without a reset");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// Parses Prometheus/OpenMetrics text into "name{labels}" → value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Whether tests that need outside tools must fail instead of skipping
/// (set by `.ci/run`, which installs the tools).
pub fn tools_required() -> bool {
    std::env::var("REQUIRE_TEST_TOOLS").is_ok_and(|v| v == "1")
}

/// Skips (returns false, loudly) or fails when an outside tool is missing.
pub fn tool_available(name: &str, probe: &mut Command) -> bool {
    let ok = probe.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        if tools_required() {
            panic!("{name} is required (REQUIRE_TEST_TOOLS=1) but missing");
        }
        eprintln!(
            "\n*** SKIPPED: {name} is not installed; this test did not run. \
             `bash .ci/run` installs it (or set REQUIRE_TEST_TOOLS=1 to make this a failure). ***\n"
        );
    }
    ok
}
