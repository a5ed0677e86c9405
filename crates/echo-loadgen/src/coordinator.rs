//! The parent process of a run: starts the workers, drives every step
//! through ramp and hold in lock step, samples the server around each hold,
//! and merges what the workers measured.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::histogram::Hist;
use crate::ipc::{Command, Event};
use crate::live::{Live, Snapshot};
use crate::result::{Derived, Machine, RunResult, SCHEMA, StepResult};
use crate::scenario::{Pattern, Settings};
use crate::schedule::split;
use crate::start::{self, StartAt};
use crate::stats::Tally;
use crate::target::Target;
use crate::usage::{self, ServerProbe, ServerSample};

/// Set by Ctrl-C (SIGINT) or SIGTERM: finish with the steps completed so far.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // A second Ctrl-C: the user wants out now.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// Makes Ctrl-C end the run early but cleanly: workers ignore SIGINT and
/// are stopped by this process, and the completed steps are reported.
pub fn catch_interrupts() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: the handler only touches an atomic (and _exit).
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Whether Ctrl-C (or SIGTERM) has ended the run.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// The run was interrupted; the steps completed so far are valid.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

pub struct Plan {
    pub settings: Settings,
    pub target: Target,
    pub workers: usize,
    pub threads: usize,
    pub server: Option<ServerProbe>,
    /// The server's log, whose `thread_spawn_failed` lines are counted per
    /// step (`--server-log`).
    pub server_log: Option<std::path::PathBuf>,
    pub live: bool,
    /// Nice level of the worker processes (0: as this process). A fleet
    /// that only makes load (the MQTT clients of `mixed`) runs at 19 so
    /// that it gets only the CPU the server and the measuring fleet leave.
    pub nice: i32,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
}

/// The latest running totals of one worker, for the live view.
#[derive(Default, Clone)]
struct Totals {
    open: u64,
    attempted: u64,
    sent: u64,
    received: u64,
    errors: u64,
}

/// What the workers of a fleet measured over one hold, summed.
pub(crate) struct Held {
    pub(crate) tally: Tally,
    /// Connections open at the end of the hold.
    pub(crate) open: u64,
    /// CPU the workers used during the hold.
    pub(crate) cpu_seconds: f64,
    /// The workers' resident memory at the end of the hold.
    pub(crate) rss_bytes: u64,
}

/// The worker processes of one run (or of one kind of client of a `mixed`
/// run), driven in lock step.
pub(crate) struct Fleet {
    workers: Vec<Worker>,
    events: mpsc::Receiver<(usize, Option<Event>)>,
    totals: Vec<Totals>,
    tick_latency: Hist,
    shown: (Instant, u64, u64),
    pub(crate) live: Live,
}

impl Fleet {
    pub(crate) fn start(plan: &Plan, run_id: &str) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        let (tx, events) = mpsc::channel();
        let mut workers = Vec::new();
        let n = plan.workers;
        for w in 0..n {
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("cannot start worker process {}", exe.display()))?;
            let stdout = child.stdout.take().expect("piped");
            let stdin = child.stdin.take().expect("piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            if tx.send((w, Some(ev))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let reason = format!("unreadable worker output {line:?}: {e}");
                            let _ = tx.send((w, Some(Event::Failed { reason })));
                        }
                    }
                }
                let _ = tx.send((w, None));
            });
            // Sources are dealt out so that workers don't share ports of one
            // address when there are enough addresses to go round.
            let s = &plan.settings.sources;
            let sources =
                if s.len() >= n { s.iter().skip(w).step_by(n).copied().collect() } else { s.clone() };
            let mut worker = Worker { child, stdin };
            send(
                &mut worker,
                &Command::Init {
                    worker: w as u32,
                    run_id: run_id.to_string(),
                    settings: Box::new(plan.settings.clone()),
                    target: plan.target.clone(),
                    sources,
                    threads: plan.threads,
                    nice: plan.nice,
                },
            )?;
            workers.push(worker);
        }
        let live = Live::new(plan.live, plan.settings.max_connections());
        let mut fleet = Fleet {
            workers,
            events,
            totals: vec![Totals::default(); n],
            tick_latency: Hist::new(),
            shown: (Instant::now(), 0, 0),
            live,
        };
        fleet.collect(None, |_, ev| matches!(ev, Event::Ready).then_some(()))?;
        Ok(fleet)
    }

    fn broadcast(&mut self, cmd: &Command) -> anyhow::Result<()> {
        for w in &mut self.workers {
            send(w, cmd)?;
        }
        Ok(())
    }

    /// Handles events until every worker has answered with what `pick`
    /// accepts, or until `until` passes (then `Ok(vec![])`).
    fn collect<T>(
        &mut self,
        until: Option<Instant>,
        mut pick: impl FnMut(usize, Event) -> Option<T>,
    ) -> anyhow::Result<Vec<T>> {
        let n = self.workers.len();
        let mut got: Vec<Option<T>> = (0..n).map(|_| None).collect();
        loop {
            if INTERRUPTED.load(Ordering::Relaxed) {
                return Err(Interrupted.into());
            }
            if until.is_none() && got.iter().all(Option::is_some) {
                return Ok(got.into_iter().map(|g| g.expect("all answered")).collect());
            }
            let wait = match until {
                Some(t) => {
                    let now = Instant::now();
                    if now >= t {
                        return Ok(Vec::new());
                    }
                    (t - now).min(Duration::from_millis(250))
                }
                None => Duration::from_millis(250),
            };
            match self.events.recv_timeout(wait) {
                Ok((w, Some(Event::Tick { open, attempted, sent, received, errors, latency }))) => {
                    self.totals[w] = Totals { open, attempted, sent, received, errors };
                    self.tick_latency.merge(&latency);
                    self.show();
                }
                Ok((w, Some(Event::Failed { reason }))) => bail!("worker {w} failed: {reason}"),
                Ok((w, None)) => bail!("worker {w} exited unexpectedly (its messages, if any, are above)"),
                Ok((w, Some(ev))) => {
                    if let Some(v) = pick(w, ev) {
                        got[w] = Some(v);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("all workers are gone"),
            }
        }
    }

    /// Opens connections until the fleet holds `target` (each worker its
    /// share) and waits until every attempt is ready or failed: what was
    /// counted meanwhile, and how long it took.
    pub(crate) fn ramp(&mut self, plan: &Plan, target: u64) -> anyhow::Result<(Tally, f64)> {
        let s = &plan.settings;
        let n = self.workers.len();
        let start = Instant::now();
        let shares = shares(target, n, s.pattern, s.fanout);
        // A limit on attempts in flight is shared out like the connections.
        let pending = s.connect_concurrency.map(|c| split(c, n));
        for (w, share) in shares.iter().enumerate() {
            let max_pending = pending.as_ref().map(|p| p[w].max(1));
            send(
                &mut self.workers[w],
                &Command::Ramp { connections: *share, connect_rate: s.connect_rate / n as f64, max_pending },
            )?;
        }
        let ramps = self.collect(None, |_, ev| match ev {
            Event::Ramped { tally } => Some(tally),
            _ => None,
        })?;
        let mut ramp = Tally::default();
        ramps.iter().for_each(|t| ramp.merge(t));
        Ok((ramp, start.elapsed().as_secs_f64()))
    }

    /// Starts a measured interval in every worker.
    pub(crate) fn hold(&mut self) -> anyhow::Result<()> {
        self.broadcast(&Command::Hold)
    }

    /// Keeps the live view going until `until`.
    pub(crate) fn wait_until(&mut self, until: Instant) -> anyhow::Result<()> {
        self.collect(Some(until), |_, _| Some(())).map(drop)
    }

    /// Ends the measured interval and returns what it counted; with `next`,
    /// the next interval starts right after it (the command follows in the
    /// same breath, so only what arrives between the two is not counted).
    pub(crate) fn end_hold(&mut self, next: bool) -> anyhow::Result<Held> {
        self.broadcast(&Command::EndHold)?;
        if next {
            self.broadcast(&Command::Hold)?;
        }
        let helds = self.collect(None, |_, ev| match ev {
            Event::Held { tally, open, cpu_seconds, rss_bytes } => {
                Some((tally, open, cpu_seconds, rss_bytes))
            }
            _ => None,
        })?;
        let mut held = Held { tally: Tally::default(), open: 0, cpu_seconds: 0.0, rss_bytes: 0 };
        for (tally, open, cpu, rss) in &helds {
            held.tally.merge(tally);
            held.open += open;
            held.cpu_seconds += cpu;
            held.rss_bytes += rss;
        }
        Ok(held)
    }

    /// Updates the live view about once a second.
    fn show(&mut self) {
        let elapsed = self.shown.0.elapsed();
        if elapsed < Duration::from_millis(900) {
            return;
        }
        let sum = |f: fn(&Totals) -> u64| self.totals.iter().map(f).sum::<u64>();
        let (sent, received) = (sum(|t| t.sent), sum(|t| t.received));
        let secs = elapsed.as_secs_f64();
        let lat = std::mem::take(&mut self.tick_latency);
        self.live.update(&Snapshot {
            open: sum(|t| t.open),
            attempted: sum(|t| t.attempted),
            sent_per_sec: sent.saturating_sub(self.shown.1) as f64 / secs,
            received_per_sec: received.saturating_sub(self.shown.2) as f64 / secs,
            p50_us: (!lat.is_empty()).then(|| lat.percentile(50.0)),
            p99_us: (!lat.is_empty()).then(|| lat.percentile(99.0)),
            errors: sum(|t| t.errors),
        });
        self.shown = (Instant::now(), sent, received);
    }

    pub(crate) fn stop(mut self) -> f64 {
        let _ = self.broadcast(&Command::Stop);
        let cpu = self
            .collect(None, |_, ev| match ev {
                Event::Stopped { cpu_seconds } => Some(cpu_seconds),
                _ => None,
            })
            .map(|v| v.iter().sum())
            .unwrap_or(0.0);
        self.live.finish();
        // Workers exit by themselves after Stop; Drop kills any that hang.
        for w in &mut self.workers {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(w.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cpu
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker left behind by an error must not keep its connections.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn send(w: &mut Worker, cmd: &Command) -> anyhow::Result<()> {
    let line = serde_json::to_string(cmd)?;
    writeln!(w.stdin, "{line}").context("a worker stopped listening")?;
    w.stdin.flush().context("a worker stopped listening")?;
    Ok(())
}

pub(crate) fn sample(probe: &Option<ServerProbe>, warned: &mut bool, live: &Live) -> Option<ServerSample> {
    let probe = probe.as_ref()?;
    match probe.sample() {
        Ok(s) => Some(s),
        Err(e) => {
            if !*warned {
                live.note(&format!("warning: cannot read the server's resources: {e}"));
                *warned = true;
            }
            None
        }
    }
}

/// Runs every step and returns the merged result.
pub fn run(plan: Plan) -> anyhow::Result<RunResult> {
    let launched = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let run_id = format!("{:x}{:x}", std::process::id(), launched & 0xffff);
    let mut fleet = Fleet::start(&plan, &run_id)?;
    if let Some(at) = &plan.settings.start_at {
        wait_for_start(&mut fleet, at)?;
    }
    let started = SystemTime::now();
    let started_unix = started.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut warned = false;
    let server_baseline = sample(&plan.server, &mut warned, &fleet.live);
    let mut spawn_failures =
        plan.server_log.as_deref().and_then(|p| usage::count_log_lines(p, usage::THREAD_SPAWN_FAILED));
    let s = &plan.settings;
    let n = plan.workers;
    let mut steps = Vec::new();
    let mut failures = Vec::new();
    let total = s.steps.len();
    let mut interrupted = None;
    for (i, &target) in s.steps.iter().enumerate() {
        match measure_step(&mut fleet, &plan, i, target, &mut warned) {
            Ok(mut step) => {
                let now = plan
                    .server_log
                    .as_deref()
                    .and_then(|p| usage::count_log_lines(p, usage::THREAD_SPAWN_FAILED));
                step.server_thread_spawn_failures = match (now, spawn_failures) {
                    (Some(n), Some(before)) => Some(n.saturating_sub(before)),
                    (n, _) => n,
                };
                spawn_failures = now.or(spawn_failures);
                let exited = step.server_exited;
                steps.push(step);
                if exited {
                    // Larger steps against no server would only count refusals.
                    failures.push(format!(
                        "the server process exited during step {} of {total} ({target} connections)",
                        i + 1
                    ));
                    break;
                }
            }
            Err(e) if e.is::<Interrupted>() => {
                interrupted = Some(i);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    fleet.live.phase("closing connections".into());
    fleet.stop();
    if let Some(i) = interrupted {
        failures.push(format!(
            "interrupted during step {} of {total}: only the {} completed step(s) are reported",
            i + 1,
            steps.len()
        ));
    }
    let mut result = RunResult {
        schema: SCHEMA.into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        label: s.label.clone(),
        url: s.url.clone(),
        protocol: plan.target.protocol,
        started_unix,
        started_unix_ms: start::unix_ms(started),
        machine: Machine {
            hostname: hostname(),
            cpus: cpus(),
            workers: n,
            runs: 1,
            threads: n * plan.threads,
        },
        settings: s.clone(),
        server_baseline,
        steps,
        failures,
    };
    result.derive();
    Ok(result)
}

/// Waits, workers started and idle, for the `--start-at` moment (checked
/// again: starting the workers may have used up the margin). Said on
/// stderr even with --quiet: a run that waits silently looks hung.
fn wait_for_start(fleet: &mut Fleet, at: &str) -> anyhow::Result<()> {
    let at: StartAt = at.parse().map_err(anyhow::Error::msg)?;
    let wait = at.wait_from(SystemTime::now()).map_err(anyhow::Error::msg)?;
    eprintln!("echo-loadgen: waiting until {} (in {:.1}s) to start", at.rfc3339(), wait.as_secs_f64());
    fleet.live.phase(format!("waiting until {} to start", at.rfc3339()));
    // The wall clock, not a monotonic deadline set now: the moment is the
    // same wall-clock time on every machine, so the wait ends on it even if
    // NTP steps this clock meanwhile.
    loop {
        let left = at.wait_from(SystemTime::now()).map_err(anyhow::Error::msg)?;
        if left.is_zero() {
            return Ok(());
        }
        fleet.wait_until(Instant::now() + left.min(Duration::from_secs(1)))?;
    }
}

/// Ramps to `target` connections, holds, and measures step `i`.
fn measure_step(
    fleet: &mut Fleet,
    plan: &Plan,
    i: usize,
    target: u64,
    warned: &mut bool,
) -> anyhow::Result<StepResult> {
    let s = &plan.settings;
    let total = s.steps.len();
    fleet.live.phase(format!("step {}/{total}: connecting to {target}", i + 1));
    let (ramp, ramp_secs) = fleet.ramp(plan, target)?;

    fleet.live.phase(format!("step {}/{total}: holding {target} for {}s", i + 1, s.hold_secs));
    let server_before = sample(&plan.server, warned, &fleet.live);
    let parent_cpu = usage::own_cpu_seconds();
    fleet.hold()?;
    let hold_start = Instant::now();
    fleet.wait_until(hold_start + s.hold())?;
    let held = fleet.end_hold(false)?;
    let hold_secs = hold_start.elapsed().as_secs_f64();
    let server_after = sample(&plan.server, warned, &fleet.live);
    let parent_cpu = usage::own_cpu_seconds() - parent_cpu;

    let server = server_after.map(|mut after| {
        let before = server_before.as_ref();
        after.cpu_seconds = match (after.cpu_seconds, before.and_then(|b| b.cpu_seconds)) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        after.ctxt_switches = match (after.ctxt_switches, before.and_then(|b| b.ctxt_switches)) {
            (Some(a), Some(b)) => Some(a.since(&b)),
            _ => None,
        };
        after
    });
    // A server that died (killed for memory, or aborted when a thread could
    // not be made) is worth a line of its own; its clients' errors follow.
    let server_exited = matches!(plan.server, Some(ServerProbe::Pid(pid)) if !usage::process_alive(pid));
    let mut step = StepResult {
        target_connections: target,
        open_connections: held.open,
        ramp_secs,
        hold_secs,
        ramp,
        hold: held.tally,
        server,
        generator_cpu_seconds: parent_cpu + held.cpu_seconds,
        generator_rss_bytes: held.rss_bytes,
        server_exited,
        server_thread_spawn_failures: None,
        derived: Derived::default(),
    };
    step.derive();
    let l = &step.hold.latency;
    let pct = |p: f64| if l.is_empty() { "-".to_string() } else { crate::report::micros(l.percentile(p)) };
    fleet.live.note(&format!(
        "step {}/{total}: {} of {target} connections open, {:.0} msg/s echoed, p50 {} p99 {}, {} errors",
        i + 1,
        step.open_connections,
        step.derived.received_per_sec,
        pct(50.0),
        pct(99.0),
        step.derived.errors
    ));
    Ok(step)
}

/// Each worker's share of a step. MQTT fan-out groups (a publisher and its
/// subscribers) must not be cut in two, so they are dealt out whole.
fn shares(target: u64, workers: usize, pattern: Pattern, fanout: u32) -> Vec<u64> {
    match pattern {
        Pattern::Echo => split(target, workers),
        Pattern::Fanout => {
            let group = u64::from(fanout) + 1;
            let mut out: Vec<u64> = split(target / group, workers).iter().map(|g| g * group).collect();
            out[0] += target % group;
            out
        }
    }
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_groups_are_not_split_between_workers() {
        assert_eq!(shares(10, 3, Pattern::Echo, 10), vec![4, 3, 3]);
        // Groups of 1 publisher + 4 subscribers: 5 groups over 2 workers.
        assert_eq!(shares(25, 2, Pattern::Fanout, 4), vec![15, 10]);
        assert_eq!(shares(27, 2, Pattern::Fanout, 4), vec![17, 10]);
        assert_eq!(shares(27, 2, Pattern::Fanout, 4).iter().sum::<u64>(), 27);
    }
}
