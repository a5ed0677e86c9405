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

mod fleet;
mod scrape;
mod worker;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::limits::FileLimit;
use crate::listener;
use crate::server::{BindError, Ready};
use fleet::Fleet;
pub use worker::{FIRST_BACKOFF, MAX_BACKOFF, STABLE_AFTER};
use worker::{Plan, stopped_cleanly, worker_loop};

/// How much longer than `server.shutdown_grace` the supervisor waits for
/// its workers to exit (their last log lines, their broker's threads).
pub const STOP_MARGIN: Duration = Duration::from_secs(2);
/// How long the workers have to become ready at start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The hidden flag that makes a process a worker (see `crate::cli`).
pub const WORKER_FLAG: &str = "--worker-of-supervisor";

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
