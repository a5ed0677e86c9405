//! A real `nats-server` for the cluster tests, on a port the OS picks.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `nats-server`; killed when dropped.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
}

/// Whether `nats-server` is there (skips loudly, or fails with
/// `REQUIRE_TEST_TOOLS=1`: `.ci/run` installs it).
pub fn available() -> bool {
    super::tool_available("nats-server", Command::new(binary()).arg("--version"))
}

/// `nats-server` on the `PATH`, or where Debian's package puts it
/// (`/usr/sbin`, not on every user's `PATH`).
fn binary() -> &'static str {
    let on_path = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path { "nats-server" } else { "/usr/sbin/nats-server" }
}

impl Nats {
    /// Starts a nats-server on loopback, on a port the OS picks.
    pub fn start() -> Nats {
        Self::start_on(None)
    }

    /// Starts one on `port` (the port of one stopped before), or on a
    /// port the OS picks.
    pub fn start_on(port: Option<u16>) -> Nats {
        let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
        let mut child = Command::new(binary())
            .args(["-a", "127.0.0.1", "-p", &port_arg])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // "[1] ... [INF] Listening for client connections on 127.0.0.1:4222"
                if let Some((_, addr)) = line.split_once("Listening for client connections on ") {
                    let port = addr.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                    let _ = tx.send(port);
                }
            }
        });
        let port =
            rx.recv_timeout(Duration::from_secs(10)).ok().flatten().unwrap_or_else(|| {
                panic!("nats-server did not say where it listens (port {port_arg} taken?)")
            });
        Nats { child: Some(child), port }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): its clients' connections stay open,
    /// and what they send waits in the kernel's buffers, then in theirs.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits
    /// for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume();
        }
        self.kill();
    }
}
