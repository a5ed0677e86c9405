//! One worker's life: started as a copy of this executable with its
//! configuration on standard input, its log lines forwarded, its `ready`
//! line read, and started again after a backoff when it dies, until the
//! shutdown.

use std::process::{ExitStatus, Stdio};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::WORKER_FLAG;
use super::fleet::{Fleet, Slot};
use crate::config::LogFormat;
use crate::server::Ready;

/// The first wait before a dead worker is started again.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait before a dead worker is started again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A worker that lived this long before dying is restarted after
/// [`FIRST_BACKOFF`] again.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Everything a worker is started with.
pub(super) struct Plan {
    pub(super) exe: std::path::PathBuf,
    /// The workers' configuration, as TOML.
    pub(super) config: String,
    pub(super) format: LogFormat,
    pub(super) grace: Duration,
}

/// A worker's exit during the shutdown is clean when it exited 0, or when
/// the SIGTERM came before it had set up its handlers.
pub(super) fn stopped_cleanly(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.success() || status.signal() == Some(libc::SIGTERM)
}

/// Runs worker `index` until the shutdown, restarting it when it dies.
/// Returns how its last run ended (`None`: it was not running).
pub(super) async fn worker_loop(index: u16, fleet: Rc<Fleet>, plan: Rc<Plan>) -> Option<ExitStatus> {
    let label = Fleet::label(index);
    let mut backoff = FIRST_BACKOFF;
    loop {
        if fleet.stopping.get() {
            return None;
        }
        let started = Instant::now();
        let mut child = match spawn(index, &fleet, &plan) {
            Ok(child) => child,
            Err(err) => {
                error!(worker = index, error = %err, "cannot start a worker process");
                if !fleet.started.get() {
                    *fleet.failed.borrow_mut() = Some(format!("worker {index}: {err}"));
                    fleet.changed.notify_waiters();
                    return None;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let status = child.wait().await;
        {
            let mut slots = fleet.slots.borrow_mut();
            slots[usize::from(index)] = Slot::default();
        }
        fleet.up.get_or_create(&label).set(0);
        fleet.changed.notify_waiters();
        let status = match status {
            Ok(status) => status,
            Err(err) => {
                error!(worker = index, error = %err, "cannot wait for a worker process");
                return None;
            }
        };
        if fleet.stopping.get() {
            info!(worker = index, %status, "worker stopped");
            return Some(status);
        }
        if !fleet.started.get() {
            *fleet.failed.borrow_mut() = Some(format!("worker {index} exited during the start ({status})"));
            fleet.changed.notify_waiters();
            return Some(status);
        }
        let lived = started.elapsed();
        if lived >= STABLE_AFTER {
            backoff = FIRST_BACKOFF;
        }
        fleet.restarts.get_or_create(&label).inc();
        warn!(
            worker = index,
            %status,
            lived_ms = lived.as_millis() as u64,
            restart_in_ms = backoff.as_millis() as u64,
            "worker died: its clients were dropped; restarting it"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = async { while !fleet.stopping.get() { fleet.changed.notified().await } } => return None,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Starts worker `index`: its configuration on standard input, its log
/// lines forwarded, its `Ready` line read from standard output.
fn spawn(index: u16, fleet: &Rc<Fleet>, plan: &Rc<Plan>) -> std::io::Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new(&plan.exe);
    command
        .arg(WORKER_FLAG)
        .arg(index.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: setpgid and prctl are async-signal-safe; nothing else runs
    // between fork and exec here.
    unsafe {
        command.pre_exec(|| {
            // Its own process group: a terminal's Ctrl-C goes to the
            // supervisor only, which passes it on once.
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Drain and exit if the supervisor dies (even by SIGKILL).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = child.id();
    fleet.slots.borrow_mut()[usize::from(index)].pid = pid;
    if let Some(mut stdin) = child.stdin.take() {
        let config = plan.config.clone();
        tokio::task::spawn_local(async move {
            // A worker that died at once is reported by its exit.
            let _ = stdin.write_all(config.as_bytes()).await;
        });
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::task::spawn_local(forward_logs(index, stderr, plan.format));
    }
    if let Some(stdout) = child.stdout.take() {
        let fleet = fleet.clone();
        tokio::task::spawn_local(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(ready) = serde_json::from_str::<Ready>(&line) else { continue };
                info!(
                    worker = index,
                    pid,
                    admin = ?ready.admin,
                    connection_capacity = ready.connection_capacity,
                    "worker ready"
                );
                let mut slots = fleet.slots.borrow_mut();
                let slot = &mut slots[usize::from(index)];
                if slot.pid == pid {
                    slot.ready = Some(ready);
                    fleet.up.get_or_create(&Fleet::label(index)).set(1);
                }
                drop(slots);
                fleet.changed.notify_waiters();
            }
        });
    }
    info!(worker = index, pid, "worker started");
    Ok(child)
}

/// Copies a worker's log lines to the supervisor's standard error, each
/// marked with the worker's index.
async fn forward_logs(index: u16, stderr: tokio::process::ChildStderr, format: LogFormat) {
    use std::io::Write;
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    let prefix = match format {
        LogFormat::Json => format!("{{\"worker\":{index},"),
        LogFormat::Text => format!("[worker {index}] "),
    };
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let marked = match (format, line.strip_prefix(b"{")) {
            (LogFormat::Json, Some(rest)) if rest.first() != Some(&b'}') => {
                [prefix.as_bytes(), rest].concat()
            }
            (LogFormat::Json, _) => line.clone(),
            (LogFormat::Text, _) => [prefix.as_bytes(), &line].concat(),
        };
        // One write per line, so that lines from several workers do not mix.
        let _ = std::io::stderr().lock().write_all(&marked);
    }
}
