//! Test harness: the real `echo-loadgen` binary, the real `echo-server` of
//! this workspace (run by the workspace's shared harness, `echo-testkit`),
//! and a way to read the generator's JSON result.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

#[allow(unused_imports)] // as dead_code: each test file uses a different part
pub use echo_testkit::{Server, tools_required};
use serde_json::Value;

pub const LOADGEN: &str = env!("CARGO_BIN_EXE_echo-loadgen");

/// The `echo-server` binary of this workspace, built with the same profile
/// into the same target directory as this test.
///
/// Cargo only gives `CARGO_BIN_EXE_*` for binaries of the crate under test,
/// and a binary cannot be a dev-dependency. So the test asks Cargo itself:
/// `cargo build -p echo-server` with the profile and target directory this
/// test binary came from. When the whole workspace is tested the server is
/// already built and this is a no-op taking a fraction of a second; Cargo
/// releases its build lock before running tests, so this cannot deadlock.
/// `LOADGEN_ECHO_SERVER_BIN` overrides it (e.g. to test another build).
pub fn echo_server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("LOADGEN_ECHO_SERVER_BIN") {
            return PathBuf::from(path);
        }
        let exe_dir = Path::new(LOADGEN).parent().expect("binary has a directory");
        let target_dir = exe_dir.parent().expect("profile directory has a parent");
        let profile = exe_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "-p", "echo-server", "--bin", "echo-server"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile {
            "debug" => {}
            "release" => {
                cargo.arg("--release");
            }
            other => {
                cargo.args(["--profile", other]);
            }
        }
        let status = cargo.status().expect("cargo runs");
        assert!(status.success(), "cargo build -p echo-server failed");
        let bin = exe_dir.join("echo-server");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// This workspace's echo-server, every listener on loopback port 0, plus
/// `args`; killed when dropped.
pub fn echo_server(args: &[&str]) -> Server {
    Server::start(echo_server_bin(), args, &[], None)
}

/// Result of one `echo-loadgen` invocation.
pub struct Run {
    pub output: Output,
    pub json: Option<Value>,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn json(&self) -> &Value {
        self.json.as_ref().unwrap_or_else(|| panic!("no JSON result; stderr:\n{}", self.stderr()))
    }

    pub fn step(&self, i: usize) -> &Value {
        &self.json()["steps"][i]
    }
}

/// A fresh scratch directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("elg-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `echo-loadgen run ARGS --json <tmp> --quiet` and reads the result.
pub fn loadgen(name: &str, args: &[&str]) -> Run {
    let dir = scratch(name);
    let json = dir.join("result.json");
    let mut cmd = Command::new(LOADGEN);
    cmd.arg("run").args(args).arg("--json").arg(&json).arg("--quiet").stdin(Stdio::null());
    let output = run_bounded(cmd, Duration::from_secs(120));
    let json = std::fs::read_to_string(&json).ok().map(|t| serde_json::from_str(&t).expect("valid JSON"));
    Run { output, json }
}

/// Runs a command with a time limit (a hung generator fails the test).
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            // SAFETY: killing our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("echo-loadgen did not finish within {limit:?}");
        }
    }
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// Sum of the errors of one kind over ramp and hold of a step.
pub fn errors(step: &Value, kind: &str) -> u64 {
    ["ramp", "hold"].iter().map(|p| step[p]["errors"][kind].as_u64().unwrap_or(0)).sum()
}

/// A run against a server that stops reading after its first message: at
/// 256 KiB × 50 msg/s the socket buffers fill at once and every write
/// blocks. Each of the 5 connections must be given up as an error within
/// `--timeout` of its oldest message (not go quiet with fewer messages
/// sent), and the run must end on time: a 3 s hold, a short ramp and the
/// stop, well under the 5 s that workers give connections to close.
pub fn assert_write_stalls_are_errors(name: &str, url: &str) {
    let started = std::time::Instant::now();
    let args = [url, "--steps", "5", "--hold", "3s", "--rate", "50", "--size", "262144", "--timeout", "1s"];
    let run = loadgen(name, &args);
    let took = started.elapsed();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let s = run.step(0);
    let stalls = errors(s, "write_stall");
    assert_eq!(stalls + errors(s, "echo_timeout"), 5, "{s}");
    assert!(stalls >= 1, "the blocked writes are reported as such: {s}");
    assert_eq!(u(&s["derived"]["errors"]), 5, "{s}");
    assert_eq!(u(&s["open_connections"]), 0);
    assert!(took < Duration::from_secs(9), "the run took {took:?}");
}
