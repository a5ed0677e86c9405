//! A worker process: holds its share of the connections and follows the
//! coordinator's phases (ramp, hold, end hold, stop).
//!
//! Workers exist because one process may hold at most ~20,000 sockets; the
//! parent starts as many as the connection count needs (`current_exe()
//! worker`) and drives them in lock step, so that every step is measured over
//! the same interval in every process.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::flow::{Clock, Feed};
use crate::ipc::{Command, Event};
use crate::scenario::Settings;
use crate::stats::{Recorder, Tally};
use crate::target::{Protocol, Target};
use crate::usage;

/// What every connection task of a worker shares.
pub struct Ctx {
    pub target: Target,
    pub settings: Settings,
    pub rec: Recorder,
    pub clock: Clock,
    pub worker: u32,
    pub run_id: String,
    /// MQTT fan-out: what each group's publisher sent, by group.
    pub feeds: Mutex<HashMap<u32, Arc<Feed>>>,
}

impl Ctx {
    /// The feed of fan-out group `group` (made by whichever of its clients asks first).
    pub fn feed(&self, group: u32) -> Arc<Feed> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds.entry(group).or_insert_with(|| Arc::new(Feed::new(self.settings.fanout))).clone()
    }
}

fn emit(event: &Event) {
    let line = serde_json::to_string(event).expect("events serialize");
    let mut out = std::io::stdout().lock();
    // The parent gone means the run is over; nothing useful to do about it.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Entry point of `echo-loadgen worker`.
pub fn main() -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Command>(&line) {
                Ok(cmd) => {
                    if tx.send(cmd).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    emit(&Event::Failed { reason: format!("bad command {line:?}: {e}") });
                    break;
                }
            }
        }
        // stdin closed: the parent is gone; Stop is implied by the dropped sender.
    });
    let Some(Command::Init { worker, run_id, settings, target, sources, threads, nice }) = rx.blocking_recv()
    else {
        anyhow::bail!("worker: expected an init command first");
    };
    raise_fd_limit();
    if nice != 0 {
        // On Linux the nice level is per thread and inherited by threads
        // created later: set before the runtime starts, it covers them all.
        // SAFETY: setpriority on the calling thread, no pointers involved.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            anyhow::bail!("worker: cannot set nice level {nice}: {e}");
        }
    }
    // Ctrl-C reaches the whole process group; the parent decides when the
    // workers stop (and reports what was measured until then).
    // SAFETY: setting a signal's disposition to "ignore".
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the worker runtime")?;
    let ctx = Arc::new(Ctx {
        target,
        settings: *settings,
        rec: Recorder::new(threads.max(1) * 8),
        clock: Clock::new(),
        worker,
        run_id,
        feeds: Mutex::default(),
    });
    runtime.block_on(serve(ctx, sources, rx));
    // Connections still closing are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Raises the soft open-file limit to the hard one.
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

async fn serve(ctx: Arc<Ctx>, sources: Vec<IpAddr>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let ticker = tokio::spawn(tick(ctx.clone()));
    let mut opened: u64 = 0;
    let mut cpu_at_hold = usage::own_cpu_seconds();
    let mut carry = Tally::default();
    emit(&Event::Ready);
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Init { .. } => emit(&Event::Failed { reason: "init sent twice".into() }),
            Command::Ramp { connections, connect_rate, max_pending } => {
                let interval = Duration::from_secs_f64(1.0 / connect_rate.max(0.001));
                let start = Instant::now();
                let first = opened;
                let mut stopping = false;
                while opened < connections {
                    if let Ok(Command::Stop) | Err(mpsc::error::TryRecvError::Disconnected) = rx.try_recv() {
                        stopping = true;
                        break;
                    }
                    let at = start + interval.mul_f64((opened - first) as f64);
                    tokio::time::sleep_until(at).await;
                    // With a limit on attempts in flight, the server's pace
                    // (how fast it answers) sets the ramp's, not the clock.
                    if let Some(max) = max_pending {
                        while opened - ctx.rec.live.settled.load(Ordering::Relaxed) >= max {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    let id = opened as u32;
                    let source = (!sources.is_empty()).then(|| sources[opened as usize % sources.len()]);
                    let (ctx, stop) = (ctx.clone(), stop_rx.clone());
                    match ctx.target.protocol {
                        Protocol::WebSocket => tasks.spawn(crate::ws::run(ctx, id, source, stop)),
                        Protocol::Mqtt => tasks.spawn(crate::mqtt::run(ctx, id, source, stop)),
                    };
                    opened += 1;
                    // Reap finished tasks so their results don't pile up.
                    while tasks.try_join_next().is_some() {}
                }
                // Wait until every attempt is settled: ready or failed.
                while !stopping && ctx.rec.live.settled.load(Ordering::Relaxed) < opened {
                    if let Ok(Command::Stop) | Err(mpsc::error::TryRecvError::Disconnected) = rx.try_recv() {
                        stopping = true;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if stopping {
                    break;
                }
                emit(&Event::Ramped { tally: ctx.rec.take() });
            }
            Command::Hold => {
                // Messages between the ramp's end and now fall outside the
                // measured window; errors and connections never go uncounted.
                let gap = ctx.rec.take();
                carry = Tally {
                    attempted: gap.attempted,
                    connected: gap.connected,
                    connect_time: gap.connect_time,
                    errors: gap.errors,
                    ..Tally::default()
                };
                cpu_at_hold = usage::own_cpu_seconds();
            }
            Command::EndHold => {
                let mut tally = std::mem::take(&mut carry);
                tally.merge(&ctx.rec.take());
                emit(&Event::Held {
                    tally,
                    open: ctx.rec.live.open.load(Ordering::Relaxed),
                    cpu_seconds: usage::own_cpu_seconds() - cpu_at_hold,
                    rss_bytes: usage::own_rss_bytes(),
                });
            }
            Command::Stop => break,
        }
    }
    let _ = stop_tx.send(true);
    let _ =
        tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} })
            .await;
    ticker.abort();
    emit(&Event::Stopped { cpu_seconds: usage::own_cpu_seconds() });
}

async fn tick(ctx: Arc<Ctx>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let live = &ctx.rec.live;
        emit(&Event::Tick {
            open: live.open.load(Ordering::Relaxed),
            attempted: live.attempted.load(Ordering::Relaxed),
            sent: live.sent.load(Ordering::Relaxed),
            received: live.received.load(Ordering::Relaxed),
            errors: live.errors.load(Ordering::Relaxed),
            latency: ctx.rec.take_tick(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection futures are most of the generator's memory per
    /// connection; keep an eye on their size.
    #[test]
    fn connection_futures_stay_small() {
        let settings = crate::result::tests::run(vec![]).settings;
        let ctx = Arc::new(Ctx {
            target: Target::parse("ws://127.0.0.1:1/").unwrap(),
            settings,
            rec: Recorder::new(1),
            clock: Clock::new(),
            worker: 0,
            run_id: "t".into(),
            feeds: Mutex::default(),
        });
        let (_tx, rx) = watch::channel(false);
        let ws = std::mem::size_of_val(&crate::ws::run(ctx.clone(), 0, None, rx.clone()));
        let mqtt = std::mem::size_of_val(&crate::mqtt::run(ctx, 0, None, rx));
        eprintln!("connection future sizes: websocket {ws} B, mqtt {mqtt} B");
        assert!(ws < 4096 && mqtt < 4096, "websocket {ws} B, mqtt {mqtt} B");
    }
}
