//! Shared test harness: runs the real `echo-server` binary on ports the OS
//! picks, finds those ports in its JSON logs, and offers small clients.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod mqtt_raw;
pub mod nats;
pub mod raw;
pub mod tls;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The threads of the process, by name (sorted), as the README's
/// architecture section lists them: the event loop and rumqttd's router
/// (`mqtt.router = "thread"`, the default).
pub const THREADS: [&str; 2] = ["echo-server", "router-0"];

/// The environment that puts rumqttd's router on the event loop.
pub const ROUTER_ON_THE_LOOP: [(&str, &str); 1] = [("ECHO_MQTT_ROUTER", "event-loop")];

/// The threads of the process with [`ROUTER_ON_THE_LOOP`]: the event loop
/// alone.
pub const THREADS_WITH_ROUTER_ON_THE_LOOP: [&str; 1] = ["echo-server"];

/// Path of the server binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_echo-server");

/// A running server process; killed when dropped.
pub struct TestServer {
    child: Option<Child>,
    /// Listen addresses by protocol ("websocket", "admin", ...), in log order.
    pub addrs: HashMap<String, Vec<SocketAddr>>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl TestServer {
    /// Starts the server on loopback port 0 for every listener, plus `args`.
    pub fn start(args: &[&str]) -> TestServer {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> TestServer {
        Self::start_with_limit(args, env, None)
    }

    /// Like `start_with_env`, with the child's open-file limit (soft and
    /// hard) lowered to `nofile`.
    pub fn start_with_limit(args: &[&str], env: &[(&str, &str)], nofile: Option<u64>) -> TestServer {
        let mut all: Vec<&str> = vec!["--log-format", "json"];
        if !args.contains(&"--log-level") {
            all.extend(["--log-level", "info"]);
        }
        if !args.contains(&"--ws-listen") {
            all.extend(["--ws-listen", "127.0.0.1:0"]);
        }
        if !args.iter().any(|a| *a == "--mqtt-listen" || *a == "--no-mqtt") {
            all.extend(["--mqtt-listen", "127.0.0.1:0"]);
        }
        if !args.iter().any(|a| *a == "--admin-listen" || *a == "--no-admin") {
            all.extend(["--admin-listen", "127.0.0.1:0"]);
        }
        all.extend(args);
        let mut command = Command::new(BIN);
        command.args(&all).stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
        // Tests must not pick up a developer's environment.
        for (key, _) in std::env::vars() {
            if key.starts_with("ECHO_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
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
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let value = serde_json::from_str::<serde_json::Value>(&line)
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
        let mut server = TestServer { child: Some(child), addrs: HashMap::new(), logs };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            panic!("server did not become ready; logs:\n{}", server.log_text());
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

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// All log entries so far.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.logs().iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
    }

    /// Waits until a log entry satisfies `pred`.
    pub fn wait_for_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
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

    /// Names of the process's OS threads.
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

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the binary to completion with these arguments: (status, stdout, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut command = Command::new(BIN);
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("ECHO_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("echo-server runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
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

/// One HTTP response, as [`HttpConn`] read it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Fields in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first field named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One HTTP connection that may carry several requests (keep-alive): sends
/// raw bytes, and reads responses one at a time by their `Content-Length`
/// (the server always sends one).
pub struct HttpConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> HttpConn {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        HttpConn { stream, buf: Vec::new() }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads the next response; `head_only` for the answer to a HEAD.
    pub fn read_response(&mut self, head_only: bool) -> HttpResponse {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill();
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.to_owned(), v.trim().to_owned()))
            .collect();
        self.buf.drain(..head_end);
        let mut response = HttpResponse { status, headers, body: Vec::new() };
        let len: usize = response.header("content-length").map_or(0, |v| v.parse().unwrap());
        if head_only || status < 200 {
            return response;
        }
        while self.buf.len() < len {
            self.fill();
        }
        response.body = self.buf.drain(..len).collect();
        response
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk).expect("the server answers");
        assert!(n > 0, "the server closed the connection; had {:?}", String::from_utf8_lossy(&self.buf));
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Whether the server closes the connection (EOF or reset) within
    /// `limit`, with nothing more sent.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut byte = [0u8; 1];
        let closed = match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => panic!("unexpected byte {:?} after {:?}", byte[0], String::from_utf8_lossy(&self.buf)),
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        };
        self.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        closed
    }
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
pub fn external_tools_required() -> bool {
    std::env::var("REQUIRE_TEST_TOOLS").is_ok_and(|v| v == "1")
}

/// Skips (returns false, loudly) or fails when an outside tool is missing.
pub fn tool_available(name: &str, probe: &mut Command) -> bool {
    let ok = probe.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok {
        if external_tools_required() {
            panic!("{name} is required (REQUIRE_TEST_TOOLS=1) but missing");
        }
        eprintln!(
            "\n*** SKIPPED: {name} is not installed; this test did not run. \
             `bash .ci/run` installs it (or set REQUIRE_TEST_TOOLS=1 to make this a failure). ***\n"
        );
    }
    ok
}
