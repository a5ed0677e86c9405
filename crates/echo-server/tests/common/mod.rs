//! Test harness: this crate's `echo-server` binary, run by the workspace's
//! shared harness (`echo-testkit`: ports the OS picks, read from its JSON
//! log), and small clients.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod mqtt_raw;
pub mod nats;
pub mod raw;
pub mod tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::process::ExitStatus;
use std::time::Duration;

#[allow(unused_imports)] // as dead_code: each test file uses a different part
pub use echo_testkit::{http_exchange, http_get, http_request, tool_available};

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

/// [`BIN`] running under the shared harness, whose handle it derefs to;
/// killed when dropped.
pub struct TestServer(echo_testkit::Server);

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
        TestServer(echo_testkit::Server::start(BIN, args, env, nofile))
    }
}

impl Deref for TestServer {
    type Target = echo_testkit::Server;

    fn deref(&self) -> &echo_testkit::Server {
        &self.0
    }
}

impl DerefMut for TestServer {
    fn deref_mut(&mut self) -> &mut echo_testkit::Server {
        &mut self.0
    }
}

/// Runs the binary to completion with these arguments: (status, stdout, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let output =
        echo_testkit::command(BIN).args(args).envs(env.iter().copied()).output().expect("echo-server runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
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
