//! The workers as the supervisor sees them: whether each is running and
//! ready, the supervisor's own figures, and the admin port's answers,
//! which ask the ready workers and merge what they say.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use super::scrape;
use crate::admin::{self, Answer, Answers};
use crate::metrics::Count;
use crate::server::Ready;

/// The label every worker's figures carry on the supervisor's `/metrics`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct WorkerLabel {
    worker: String,
}

/// One worker as the supervisor sees it.
#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) pid: Option<u32>,
    /// What it reported once ready, until it exits.
    pub(super) ready: Option<Ready>,
}

/// The workers, their state and the supervisor's own figures.
pub(super) struct Fleet {
    pub(super) slots: RefCell<Vec<Slot>>,
    /// SIGTERM or SIGINT came: no more restarts, `/readyz` says 503.
    pub(super) stopping: Cell<bool>,
    /// Every worker was ready once: from then on a dead worker is
    /// restarted; before, it fails the start.
    pub(super) started: Cell<bool>,
    /// Why the start failed, if it did.
    pub(super) failed: RefCell<Option<String>>,
    /// A worker became ready or exited.
    pub(super) changed: Notify,
    pub(super) registry: Registry,
    pub(super) up: Family<WorkerLabel, Gauge>,
    pub(super) restarts: Family<WorkerLabel, Count>,
    pub(super) admin_refused: Count,
    pub(super) admin_evictions: Count,
}

impl Fleet {
    pub(super) fn new(workers: u16) -> Rc<Fleet> {
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

    pub(super) fn label(worker: u16) -> WorkerLabel {
        WorkerLabel { worker: worker.to_string() }
    }

    pub(super) fn all_ready(&self) -> bool {
        self.slots.borrow().iter().all(|slot| slot.ready.is_some())
    }

    /// Each worker's first admin address, for those that are ready.
    pub(super) fn admin_addrs(&self) -> Vec<(u16, SocketAddr)> {
        let slots = self.slots.borrow();
        (0u16..)
            .zip(slots.iter())
            .filter_map(|(worker, slot)| Some((worker, *slot.ready.as_ref()?.admin.first()?)))
            .collect()
    }

    pub(super) fn pids(&self) -> Vec<u32> {
        self.slots.borrow().iter().filter_map(|slot| slot.pid).collect()
    }

    /// Sends `signal` to every running worker.
    pub(super) fn signal_all(&self, signal: libc::c_int) {
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
