//! Several worker processes on the same ports (`server.workers` > 1).
//!
//! One server process is one event loop on one core, and its open-file
//! limit caps its clients. With `server.workers = N` the first process
//! becomes a supervisor that serves no client: it resolves every
//! WebSocket and MQTT listen address to a concrete port (port 0 included)
//! by binding it with `SO_REUSEPORT` without listening, then runs N copies
//! of itself ([`std::env::current_exe`]), each today's server — one
//! single-threaded event loop, its own open-file limit — listening on
//! those same ports with `SO_REUSEPORT`, so that the kernel spreads new
//! connections over them. A worker gets its configuration as TOML on its
//! standard input (not its command line or environment: passwords stay out
//! of `/proc`), with its admin listener on `127.0.0.1:0`; once it is ready
//! it writes one JSON line ([`crate::server::Ready`]) on its standard
//! output. Its log lines reach the supervisor's standard error with a
//! `worker` field (JSON) or a `[worker N]` prefix (text).
//!
//! The supervisor
//! - restarts a worker that dies, after a backoff that doubles from
//!   [`FIRST_BACKOFF`] to [`MAX_BACKOFF`] and starts over once a worker has
//!   lived [`STABLE_AFTER`], and logs it;
//! - passes SIGTERM and SIGINT on, waits `server.shutdown_grace` plus
//!   [`STOP_MARGIN`] for the workers to drain, and exits 0 if they all
//!   stopped cleanly (1 otherwise); a second signal is passed on too (the
//!   workers then exit at once) and ends the supervisor at once;
//! - serves the admin port: `/healthz`, `/readyz` (ready while every worker
//!   is), and `/metrics`, every worker's samples labelled `worker="N"`.
//!
//! Workers run in their own process group (a terminal's Ctrl-C reaches the
//! supervisor only, which passes it on once) and are sent SIGTERM by the
//! kernel if the supervisor dies (`PR_SET_PDEATHSIG`).
//!
//! Each worker has its own MQTT broker: unless they are bridged over NATS
//! (`cluster.nats_url`, `crate::cluster`), a publish reaches only the
//! subscribers connected to the same worker.

mod scrape;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::rc::Rc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, Answer, Answers};
use crate::config::{Config, LogFormat};
use crate::limits::FileLimit;
use crate::listener;
use crate::metrics::Count;
use crate::server::{BindError, Ready};

/// The first wait before a dead worker is started again.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait before a dead worker is started again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A worker that lived this long before dying is restarted after
/// [`FIRST_BACKOFF`] again.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How much longer than `server.shutdown_grace` the supervisor waits for
/// its workers to exit (their last log lines, their broker's threads).
pub const STOP_MARGIN: Duration = Duration::from_secs(2);
/// How long the workers have to become ready at start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The hidden flag that makes a process a worker (see `crate::cli`).
pub const WORKER_FLAG: &str = "--worker-of-supervisor";

/// The label every worker's figures carry on the supervisor's `/metrics`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

/// One worker as the supervisor sees it.
#[derive(Debug, Default)]
struct Slot {
    pid: Option<u32>,
    /// What it reported once ready, until it exits.
    ready: Option<Ready>,
}

/// The workers, their state and the supervisor's own figures.
struct Fleet {
    slots: RefCell<Vec<Slot>>,
    /// SIGTERM or SIGINT came: no more restarts, `/readyz` says 503.
    stopping: Cell<bool>,
    /// Every worker was ready once: from then on a dead worker is
    /// restarted; before, it fails the start.
    started: Cell<bool>,
    /// Why the start failed, if it did.
    failed: RefCell<Option<String>>,
    /// A worker became ready or exited.
    changed: Notify,
    registry: Registry,
    up: Family<WorkerLabel, Gauge>,
    restarts: Family<WorkerLabel, Count>,
    admin_refused: Count,
    admin_evictions: Count,
}

impl Fleet {
    fn new(workers: u16) -> Rc<Fleet> {
        let mut registry = Registry::default();
        let count = Gauge::<i64>::default();
        count.set(i64::from(workers));
        registry.register("echo_workers", "Worker processes configured (server.workers)", count);
        let up = Family::<WorkerLabel, Gauge>::default();
        registry.register(
            "echo_worker_up",
            "Whether the worker is running and ready (1) or not (0)",
            up.clone(),
        );
        let restarts = Family::<WorkerLabel, Count>::default();
        registry.register(
            "echo_worker_restarts",
            "Times the worker died and was started again",
            restarts.clone(),
        );
        let (admin_refused, admin_evictions) = (Count::default(), Count::default());
        registry.register(
            "echo_admin_refused",
            "Supervisor admin connections refused: every slot was writing a response",
            admin_refused.clone(),
        );
        registry.register(
            "echo_admin_evictions",
            "Supervisor admin connections closed to make room for a new one",
            admin_evictions.clone(),
        );
        for worker in 0..workers {
            let label = WorkerLabel { worker: worker.to_string() };
            up.get_or_create(&label).set(0);
            restarts.get_or_create(&label).inc_by(0);
        }
        Rc::new(Fleet {
            slots: RefCell::new((0..workers).map(|_| Slot::default()).collect()),
            stopping: Cell::new(false),
            started: Cell::new(false),
            failed: RefCell::new(None),
            changed: Notify::new(),
            registry,
            up,
            restarts,
            admin_refused,
            admin_evictions,
        })
    }

    fn label(worker: u16) -> WorkerLabel {
        WorkerLabel { worker: worker.to_string() }
    }

    fn all_ready(&self) -> bool {
        self.slots.borrow().iter().all(|slot| slot.ready.is_some())
    }

    /// Each worker's first admin address, for those that are ready.
    fn admin_addrs(&self) -> Vec<(u16, SocketAddr)> {
        let slots = self.slots.borrow();
        (0u16..)
            .zip(slots.iter())
            .filter_map(|(worker, slot)| Some((worker, *slot.ready.as_ref()?.admin.first()?)))
            .collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.slots.borrow().iter().filter_map(|slot| slot.pid).collect()
    }

    /// Sends `signal` to every running worker.
    fn signal_all(&self, signal: libc::c_int) {
        for pid in self.pids() {
            // SAFETY: kill(2) on our own child's pid; a worker that has just
            // exited (not yet reaped) ignores it.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }
}

impl Answers for Fleet {
    fn answer(&self, path: &str) -> Answer {
        use hyper::StatusCode;
        match path {
            "/healthz" => Box::pin(std::future::ready(admin::text(StatusCode::OK, "ok\n"))),
            "/readyz" if self.stopping.get() => {
                Box::pin(std::future::ready(admin::text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")))
            }
            "/readyz" => {
                let workers = self.slots.borrow().len();
                let addrs = self.admin_addrs();
                Box::pin(async move {
                    let asked = futures_util::future::join_all(
                        addrs.iter().map(|&(_, addr)| scrape::get(addr, "/readyz")),
                    )
                    .await;
                    let ready = asked.iter().filter(|answer| matches!(answer, Ok((200, _)))).count();
                    if ready == workers {
                        admin::text(StatusCode::OK, "ready\n")
                    } else {
                        // What the workers that answered said (the NATS
                        // outage of a cluster, say), once each.
                        let mut reasons: Vec<String> = asked
                            .iter()
                            .filter_map(|answer| match answer {
                                Ok((status, body)) if *status != 200 => {
                                    Some(String::from_utf8_lossy(body).trim().to_owned())
                                }
                                _ => None,
                            })
                            .collect();
                        reasons.sort();
                        reasons.dedup();
                        let mut text = format!("{ready} of {workers} workers ready\n");
                        for reason in reasons {
                            text.push_str(&reason);
                            text.push('\n');
                        }
                        admin::text(StatusCode::SERVICE_UNAVAILABLE, text)
                    }
                })
            }
            "/metrics" => {
                let addrs = self.admin_addrs();
                let mut own = String::new();
                prometheus_client::encoding::text::encode(&mut own, &self.registry)
                    .expect("writing to a String cannot fail");
                Box::pin(async move {
                    let asked = futures_util::future::join_all(
                        addrs.iter().map(|&(_, addr)| scrape::get(addr, "/metrics")),
                    )
                    .await;
                    let expositions: Vec<(u16, String)> = addrs
                        .iter()
                        .zip(asked)
                        .filter_map(|(&(worker, _), answer)| match answer {
                            Ok((200, body)) => Some((worker, String::from_utf8_lossy(&body).into_owned())),
                            _ => None,
                        })
                        .collect();
                    let own = own.trim_end().strip_suffix("# EOF").unwrap_or(&own).to_owned();
                    admin::metrics(format!("{own}{}# EOF\n", scrape::merge(&expositions)))
                })
            }
            _ => Box::pin(std::future::ready(admin::text(StatusCode::NOT_FOUND, admin::NOT_FOUND))),
        }
    }
}

/// Everything a worker is started with.
struct Plan {
    exe: std::path::PathBuf,
    /// The workers' configuration, as TOML.
    config: String,
    format: LogFormat,
    grace: Duration,
}

/// Runs the supervisor until it is told to stop; its exit status.
pub fn main(config: Config, workers: u16) -> ExitCode {
    // The TLS files are read now, so that a bad one is refused once, by
    // the supervisor, as a single server would.
    if let Err(err) = crate::server::tls_acceptors(&config) {
        eprintln!("echo-server: {err}");
        return ExitCode::FAILURE;
    }
    crate::logging::init(&config.log);
    crate::logging::log_panics();
    // Raised here, inherited (and raised again) by every worker.
    let files = FileLimit::raise();
    let resolved = match resolve(&config) {
        Ok(resolved) => resolved,
        Err(err) => {
            error!("{err}");
            eprintln!("echo-server: {err}");
            return ExitCode::FAILURE;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            eprintln!("echo-server: cannot find its own executable to start workers: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut worker_config = config.clone();
    worker_config.websocket.listen = resolved.websocket.clone();
    worker_config.mqtt.listen = resolved.mqtt.clone();
    worker_config.admin.listen = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    worker_config.server.memory_limit = share_memory(config.server.memory_limit, workers);
    let plan = Rc::new(Plan {
        exe,
        config: worker_config.to_toml(),
        format: config.log.format,
        grace: config.server.shutdown_grace,
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build_local(tokio::runtime::LocalOptions::default())
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("echo-server: cannot start the supervisor's event loop: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(supervise(config, workers, resolved, plan, files));
    ExitCode::from(code)
}

/// The addresses the workers listen on, and what holds them meanwhile.
struct Resolved {
    websocket: Vec<SocketAddr>,
    mqtt: Vec<SocketAddr>,
    /// The reserved (bound, not listening) sockets: kept open for the
    /// supervisor's life, so that a port 0 stays ours while workers restart.
    _held: Vec<socket2::Socket>,
    admin: Vec<std::net::TcpListener>,
}

fn resolve(config: &Config) -> Result<Resolved, BindError> {
    let mut held = Vec::new();
    let mut reserve = |key: &'static str, addrs: &[SocketAddr]| -> Result<Vec<SocketAddr>, BindError> {
        addrs
            .iter()
            .map(|&addr| {
                let socket = listener::reserve(addr).map_err(|source| BindError { key, addr, source })?;
                let local = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .expect("a bound socket has an address");
                held.push(socket);
                Ok(local)
            })
            .collect()
    };
    let websocket = reserve("websocket.listen", &config.websocket.listen)?;
    let mqtt = reserve("mqtt.listen", &config.mqtt.listen)?;
    let admin = config
        .admin
        .listen
        .iter()
        .map(|&addr| {
            listener::bind(addr, 128).map_err(|source| BindError { key: "admin.listen", addr, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Resolved { websocket, mqtt, _held: held, admin })
}

/// Each worker's `server.memory_limit`: an explicit limit is each
/// worker's; the automatic one (three quarters of what the container or
/// machine has) is shared out, so that the workers together stay under it.
fn share_memory(configured: u64, workers: u16) -> u64 {
    if configured != 0 {
        return configured;
    }
    match crate::budget::available_memory() {
        Some(available) => (available / 4 * 3 / u64::from(workers)).max(crate::budget::MIN_LIMIT),
        None => 0,
    }
}

async fn supervise(config: Config, workers: u16, resolved: Resolved, plan: Rc<Plan>, files: FileLimit) -> u8 {
    let fleet = Fleet::new(workers);
    let ws_tls = !config.websocket.tls_cert.is_empty();
    for addr in &resolved.websocket {
        info!(protocol = "websocket", %addr, tls = ws_tls, "listening");
    }
    let mqtt_tls = !config.mqtt.tls_cert.is_empty();
    for addr in &resolved.mqtt {
        info!(protocol = "mqtt", %addr, tls = mqtt_tls, "listening");
    }
    if (!resolved.mqtt.is_empty() || config.mqtt.websocket) && !config.cluster.nats_url.is_empty() {
        info!(
            workers,
            nats_url = %config.cluster.nats_url,
            "each worker runs its own MQTT broker, bridged to the others over NATS (cluster.nats_url): \
             a publish reaches the subscribers of every worker; a client's session lives on one worker"
        );
    } else if !resolved.mqtt.is_empty() || config.mqtt.websocket {
        warn!(
            workers,
            "each worker runs its own MQTT broker: a publish reaches only the subscribers connected to \
             the same worker, and a client's session (subscriptions, retained messages, queued QoS 1/2 \
             publishes) lives on one worker; run one worker (server.workers = 1) for one broker, \
             or bridge them over NATS (cluster.nats_url)"
        );
    }
    let admin_state =
        AdminState::with_answers(fleet.clone(), fleet.admin_refused.clone(), fleet.admin_evictions.clone());
    for std_listener in resolved.admin {
        let listener =
            TcpListener::from_std(std_listener).expect("a bound socket registers with the runtime");
        let addr = listener.local_addr().expect("a bound socket has an address");
        info!(protocol = "admin", %addr, "listening");
        tokio::task::spawn_local(admin::serve(listener, admin_state.clone()));
    }
    info!(
        workers,
        pid = std::process::id(),
        open_file_limit = files.soft,
        "supervisor: starting the workers"
    );
    let loops: Vec<_> =
        (0..workers).map(|i| tokio::task::spawn_local(worker_loop(i, fleet.clone(), plan.clone()))).collect();

    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "cannot install signal handlers");
            fleet.stopping.set(true);
            fleet.signal_all(libc::SIGKILL);
            return 1;
        }
    };

    // The start: every worker ready, a worker that dies, or a signal.
    let start_deadline = Instant::now() + START_TIMEOUT;
    let early_signal = loop {
        if let Some(reason) = fleet.failed.borrow().clone() {
            error!(reason, "a worker failed to start; stopping the others");
            fleet.stopping.set(true);
            fleet.signal_all(libc::SIGKILL);
            return 1;
        }
        if fleet.all_ready() {
            break None;
        }
        tokio::select! {
            _ = fleet.changed.notified() => {}
            _ = tokio::time::sleep_until(start_deadline) => {
                error!(timeout_s = START_TIMEOUT.as_secs(), "the workers did not all become ready; stopping them");
                fleet.stopping.set(true);
                fleet.signal_all(libc::SIGKILL);
                return 1;
            }
            _ = term.recv() => break Some("SIGTERM"),
            _ = int.recv() => break Some("SIGINT"),
        }
    };
    fleet.started.set(true);
    if early_signal.is_none() {
        report_ready(&fleet, workers);
    }
    let name = match early_signal {
        Some(name) => name,
        None => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
    };
    info!(signal = name, workers, "received signal: passing it on to every worker");
    fleet.stopping.set(true);
    fleet.changed.notify_waiters();
    fleet.signal_all(libc::SIGTERM);
    tokio::task::spawn_local({
        let fleet = fleet.clone();
        async move {
            let (name, sig) = tokio::select! {
                _ = term.recv() => ("SIGTERM", libc::SIGTERM),
                _ = int.recv() => ("SIGINT", libc::SIGINT),
            };
            warn!(
                signal = name,
                "second signal: passing it on (the workers exit at once) and exiting at once"
            );
            fleet.signal_all(sig);
            std::process::exit(128 + sig);
        }
    });

    let deadline = Instant::now() + plan.grace + STOP_MARGIN;
    let mut clean = true;
    for (worker, handle) in (0u16..).zip(loops) {
        let status = match tokio::time::timeout_at(deadline, handle).await {
            Ok(Ok(status)) => status,
            Ok(Err(_)) => None,
            Err(_) => {
                let pid = fleet.slots.borrow()[usize::from(worker)].pid;
                error!(worker, pid, "worker did not stop within the grace period; killing it");
                if let Some(pid) = pid {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
                clean = false;
                continue;
            }
        };
        if let Some(status) = status
            && !stopped_cleanly(status)
        {
            warn!(worker, %status, "worker did not stop cleanly");
            clean = false;
        }
    }
    if clean {
        info!(workers, "shutdown complete: every worker stopped");
        0
    } else {
        error!(workers, "shutdown complete, but not every worker stopped cleanly");
        1
    }
}

/// A worker's exit during the shutdown is clean when it exited 0, or when
/// the SIGTERM came before it had set up its handlers.
fn stopped_cleanly(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.success() || status.signal() == Some(libc::SIGTERM)
}

/// The supervisor's `ready` line: capacity per worker and in total.
fn report_ready(fleet: &Fleet, workers: u16) {
    let slots = fleet.slots.borrow();
    let ready: Vec<&Ready> = slots.iter().filter_map(|slot| slot.ready.as_ref()).collect();
    let per_worker: Vec<u64> = ready.iter().map(|r| r.connection_capacity).collect();
    let pids: Vec<u32> = slots.iter().filter_map(|slot| slot.pid).collect();
    info!(
        workers,
        event_loop_threads = workers,
        worker_pids = ?pids,
        open_file_limit = ready.first().map_or(0, |r| r.open_file_limit),
        connection_capacity_per_worker = ?per_worker,
        connection_capacity = per_worker.iter().sum::<u64>(),
        max_websocket_connections = ready.iter().map(|r| r.max_websocket_connections).sum::<u64>(),
        max_mqtt_connections = ready.iter().map(|r| r.max_mqtt_connections).sum::<u64>(),
        "ready"
    );
}

/// Runs worker `index` until the shutdown, restarting it when it dies.
/// Returns how its last run ended (`None`: it was not running).
async fn worker_loop(index: u16, fleet: Rc<Fleet>, plan: Rc<Plan>) -> Option<ExitStatus> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_automatic_memory_limit_is_shared_out() {
        assert_eq!(share_memory(1 << 30, 4), 1 << 30, "an explicit limit is each worker's");
        let whole = crate::budget::available_memory().unwrap() / 4 * 3;
        assert_eq!(share_memory(0, 2), (whole / 2).max(crate::budget::MIN_LIMIT));
    }
}
