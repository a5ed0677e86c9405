//! `echo-loadgen mixed`: WebSocket and MQTT clients on one server in one
//! run, measured in phases.
//!
//! What it answers: what do MQTT clients arriving, staying and leaving
//! cost the WebSocket clients of the same server? WebSocket clients echo
//! on schedule throughout; MQTT clients connect (by default all at once: a
//! connect storm), subscribe to a topic of their own, stay (idle, or
//! publishing with `--mqtt-rate`), and disconnect together. The WebSocket
//! latency is reported per phase — before, while the MQTT clients connect,
//! while they stay, while they leave — next to the MQTT connects per
//! second, the server's CPU and memory, the CPU time and the time waiting
//! for a CPU of each server thread, and the server's event-loop lag.
//!
//! Both kinds of client are ordinary fleets of worker processes (the same
//! connections, flows, checks and histograms as `run`); the MQTT fleet can
//! run at a lower priority (`--mqtt-nice 19`) so that the work of making
//! the storm does not take the CPU of the clients that measure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::coordinator::{self, Fleet, Plan};
use crate::report::{bytes, count, micros};
use crate::scenario::{MqttVersion, Pattern, Settings, Sources};
use crate::schedule::Rate;
use crate::stats::Tally;
use crate::target::{Protocol, Target};
use crate::usage::{self, ServerProbe, ServerSample, ThreadTimes};

pub const SCHEMA: &str = "echo-loadgen-mixed/1";

/// The server's event-loop lag histogram (echo-server's; other servers
/// simply do not have it, and the lag line is left out).
const LOOP_LAG_METRIC: &str = "echo_event_loop_lag_seconds";

/// "All at once": a connect rate no ramp reaches, so that every MQTT
/// client starts connecting in the same instant.
const ALL_AT_ONCE: f64 = 1e9;

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 10s, 2m)"))
}

fn parse_connect_rate(s: &str) -> Result<f64, String> {
    if s.trim() == "all" {
        return Ok(ALL_AT_ONCE);
    }
    match s.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("{s:?}: give connections per second, or \"all\" for all at once")),
    }
}

/// Settings of `echo-loadgen mixed`.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MixedArgs {
    /// WebSocket echo server: ws://HOST:PORT/PATH.
    #[arg(value_name = "WS_URL")]
    pub ws_url: String,

    /// MQTT broker: mqtt://HOST:PORT (the same server's MQTT listener, usually).
    #[arg(value_name = "MQTT_URL")]
    pub mqtt_url: String,

    /// WebSocket clients, echoing throughout.
    #[arg(long, default_value_t = 5000, value_name = "N")]
    pub ws_clients: u64,

    /// MQTT clients that connect, stay and leave.
    #[arg(long, default_value_t = 5000, value_name = "N")]
    pub mqtt_clients: u64,

    /// Messages per second per WebSocket client.
    #[arg(short, long, default_value = "1", value_name = "PER_SEC")]
    pub rate: Rate,

    /// Payload bytes of every message, WebSocket and MQTT (at least 24).
    #[arg(short, long, default_value_t = 64, value_name = "BYTES")]
    pub size: usize,

    /// New WebSocket connections per second before the measurement.
    #[arg(long, default_value_t = 1000.0, value_name = "PER_SEC")]
    pub connect_rate: f64,

    /// How long the WebSocket clients are measured before the MQTT clients come.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(with = "crate::result::secs")]
    pub before: Duration,

    /// New MQTT connections per second; "all" starts every one at once (a connect storm).
    #[arg(long, default_value = "all", value_parser = parse_connect_rate, value_name = "PER_SEC|all")]
    pub mqtt_connect_rate: f64,

    /// How long the MQTT clients stay once all are connected.
    #[arg(long, default_value = "3s", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(with = "crate::result::secs")]
    pub mqtt_hold: Duration,

    /// Messages per second per MQTT client, each to its own topic and back
    /// (0: the clients only stay connected).
    #[arg(long, default_value = "0", value_name = "PER_SEC")]
    pub mqtt_rate: Rate,

    /// MQTT quality of service for subscribe and publish.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2), value_name = "0|1|2")]
    pub qos: u8,

    /// MQTT protocol version.
    #[arg(long, default_value = "3.1.1", value_name = "VERSION")]
    pub mqtt_version: MqttVersion,

    /// MQTT clients write SUBSCRIBE right behind CONNECT, without waiting
    /// for CONNACK (one read per client for the broker instead of two).
    #[arg(long)]
    pub pipeline_subscribe: bool,

    /// How long the WebSocket clients are measured from the moment the MQTT
    /// clients disconnect (at least until the MQTT workers are gone).
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(with = "crate::result::secs")]
    pub disconnect_window: Duration,

    /// Nice level of the MQTT clients' processes: 19 gives them only the CPU
    /// that the server and the measuring WebSocket clients leave.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19), value_name = "0-19")]
    pub mqtt_nice: i32,

    /// A message not echoed within this time is an error (echo_timeout).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(with = "crate::result::secs")]
    pub timeout: Duration,

    /// Limit for TCP connect plus handshake (MQTT: CONNACK and SUBACK).
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(with = "crate::result::secs")]
    pub connect_timeout: Duration,

    /// Local addresses to connect from, e.g. 127.0.0.2-127.0.0.9.
    #[arg(long, value_name = "ADDRS")]
    #[serde(skip)]
    pub source: Option<Sources>,

    /// PID of the server on this machine: RSS and CPU per phase (with its
    /// child processes', e.g. a supervisor's workers), and each thread's
    /// CPU and CPU-wait time while the MQTT clients are there.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// The server's Prometheus endpoint (http://HOST:PORT/metrics): its
    /// event-loop lag histogram (echo_event_loop_lag_seconds) over the same
    /// time; without --server-pid, also its RSS and CPU.
    #[arg(long, value_name = "URL")]
    pub server_metrics: Option<String>,

    /// A name for this run, shown in the report.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,

    /// Write the result as JSON (histograms included).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub json: Option<PathBuf>,

    /// No live view; only the report.
    #[arg(short, long)]
    #[serde(skip)]
    pub quiet: bool,
}

/// One interval of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// before, connect, held, disconnect.
    pub name: String,
    pub secs: f64,
    /// The WebSocket clients: messages, latency, errors.
    pub ws: Tally,
    /// WebSocket connections open at the end of the phase.
    pub ws_open: u64,
    /// The MQTT clients: in `connect` their connects (and any messages), in
    /// `held` their messages; `None` where they are not measured.
    pub mqtt: Option<Tally>,
    /// MQTT connections open at the end of the phase, where known.
    pub mqtt_open: Option<u64>,
    /// Server readings at the end of the phase; `cpu_seconds` is the CPU
    /// used during it.
    pub server: Option<ServerSample>,
    /// CPU the WebSocket workers used during the phase.
    pub generator_cpu_seconds: f64,
}

/// Event-loop lag ticks of the server over an interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopLag {
    /// Ticks measured (the histogram's count).
    pub ticks: u64,
    /// Ticks later than each bucket bound, by bound in seconds as the
    /// server writes it ("0.002"), smallest bound first.
    pub over: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedResult {
    /// Always "echo-loadgen-mixed/1" for this layout.
    pub schema: String,
    pub tool_version: String,
    pub label: Option<String>,
    pub started_unix: u64,
    pub settings: MixedArgs,
    /// The settings each fleet ran with (as `run` records them).
    pub ws_settings: Settings,
    pub mqtt_settings: Settings,
    pub server_baseline: Option<ServerSample>,
    /// Connecting the WebSocket clients, before any measurement.
    pub ws_ramp: Tally,
    pub ws_ramp_secs: f64,
    /// From the MQTT clients' first connect to the last ready or failed.
    pub mqtt_connect_secs: f64,
    pub phases: Vec<Phase>,
    /// Per server thread name, what it used from the MQTT clients' first
    /// connect to the end of the disconnect phase; empty without --server-pid.
    pub server_threads: BTreeMap<String, ThreadTimes>,
    /// The server's event-loop lag over the same time (with --server-metrics).
    pub loop_lag: Option<LoopLag>,
    /// Problems met on the way (readings that could not be taken).
    pub notes: Vec<String>,
}

impl MixedResult {
    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// MQTT connects per second over the connect phase: clients that became
    /// ready divided by the time from the first attempt to the last settled.
    pub fn mqtt_connects_per_sec(&self) -> Option<f64> {
        let connected = self.phase("connect")?.mqtt.as_ref()?.connected;
        (self.mqtt_connect_secs > 0.0).then(|| connected as f64 / self.mqtt_connect_secs)
    }
}

fn fleet_settings(args: &MixedArgs, url: &str, clients: u64, protocol: Protocol) -> Settings {
    let (connect_rate, rate) = match protocol {
        Protocol::WebSocket => (args.connect_rate, args.rate),
        Protocol::Mqtt => (args.mqtt_connect_rate, args.mqtt_rate),
    };
    Settings {
        url: url.to_string(),
        steps: vec![clients],
        hold_secs: args.before.as_secs_f64().max(0.001),
        connect_rate,
        connect_concurrency: None,
        rate,
        in_flight: 1,
        size: args.size,
        timeout_secs: args.timeout.as_secs_f64(),
        connect_timeout_secs: args.connect_timeout.as_secs_f64(),
        qos: args.qos,
        mqtt_version: args.mqtt_version,
        pattern: Pattern::Echo,
        fanout: 10,
        pipeline_subscribe: protocol == Protocol::Mqtt && args.pipeline_subscribe,
        topic_prefix: "echo-loadgen".into(),
        sources: args.source.clone().map(|s| s.0).unwrap_or_default(),
        start_at: None,
        label: args.label.clone(),
    }
}

/// Everything checked before anything runs: the two URLs and their kinds,
/// the settings, the open-file limit and the local ports, the probes.
pub struct Checked {
    args: MixedArgs,
    ws: Plan,
    mqtt: Plan,
    pid: Option<u32>,
    metrics: Option<String>,
}

/// Refuses settings that cannot work, saying what to write instead.
pub fn check(args: MixedArgs) -> Result<Checked, String> {
    let ws_target = Target::parse(&args.ws_url)?;
    let mqtt_target = Target::parse(&args.mqtt_url)?;
    if ws_target.protocol != Protocol::WebSocket {
        return Err(format!("{} is not a WebSocket URL: the first URL is ws://HOST:PORT/PATH", args.ws_url));
    }
    if mqtt_target.protocol != Protocol::Mqtt {
        return Err(format!("{} is not an MQTT URL: the second URL is mqtt://HOST:PORT", args.mqtt_url));
    }
    if args.ws_clients == 0 || args.mqtt_clients == 0 {
        return Err("--ws-clients and --mqtt-clients must be at least 1: the run measures one while the other comes and goes".into());
    }
    if args.rate == Rate::Max || args.mqtt_rate == Rate::Max {
        return Err("--rate max and --mqtt-rate max are not for this measurement: give messages per second (the latency of an open-model schedule is what a phase compares)".into());
    }
    if args.rate == Rate::Idle {
        return Err("--rate 0 leaves the WebSocket clients nothing to measure: give messages per second, e.g. --rate 1".into());
    }
    for (flag, d) in [
        ("--before", args.before),
        ("--mqtt-hold", args.mqtt_hold),
        ("--disconnect-window", args.disconnect_window),
    ] {
        if d.is_zero() {
            return Err(format!("{flag} must be longer than 0s"));
        }
    }
    let ws_settings = fleet_settings(&args, &args.ws_url, args.ws_clients, Protocol::WebSocket);
    let mqtt_settings = fleet_settings(&args, &args.mqtt_url, args.mqtt_clients, Protocol::Mqtt);
    ws_settings.check()?;
    mqtt_settings.check()?;
    let fd_limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(_, hard)| hard).unwrap_or(1024);
    let ws_workers = crate::preflight::workers_needed(&ws_settings, None, fd_limit)?;
    let mqtt_workers = crate::preflight::workers_needed(&mqtt_settings, None, fd_limit)?;
    // Both fleets take ports towards their own listener; each is checked.
    crate::preflight::sources_suffice(&ws_settings, ws_target.addr.ip(), crate::net::ephemeral_ports())?;
    crate::preflight::sources_suffice(&mqtt_settings, mqtt_target.addr.ip(), crate::net::ephemeral_ports())?;
    let probe = match (args.server_pid, &args.server_metrics) {
        (Some(pid), _) => Some(ServerProbe::Pid(pid)),
        (None, Some(url)) => Some(ServerProbe::Metrics { url: url.clone(), protocol: Protocol::WebSocket }),
        (None, None) => None,
    };
    if let Some(p) = &probe {
        p.sample()?;
    }
    if let Some(url) = &args.server_metrics {
        usage::http_get(url)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        crate::preflight::probe(&ws_target, &ws_settings).await?;
        crate::preflight::probe(&mqtt_target, &mqtt_settings).await
    })?;
    let threads = |workers: usize| (coordinator::cpus() / workers).max(1);
    let ws = Plan {
        settings: ws_settings,
        target: ws_target,
        workers: ws_workers,
        threads: threads(ws_workers),
        server: probe,
        server_log: None,
        live: !args.quiet,
        nice: 0,
    };
    let mqtt = Plan {
        settings: mqtt_settings,
        target: mqtt_target,
        workers: mqtt_workers,
        threads: threads(mqtt_workers),
        server: None,
        server_log: None,
        live: false,
        nice: args.mqtt_nice,
    };
    Ok(Checked { pid: args.server_pid, metrics: args.server_metrics.clone(), args, ws, mqtt })
}

/// Readings of the server taken at a phase boundary.
struct Mark {
    at: Instant,
    server: Option<ServerSample>,
}

/// Runs the phases and returns what they measured.
pub fn run(c: Checked) -> anyhow::Result<MixedResult> {
    let Checked { args, ws: ws_plan, mqtt: mqtt_plan, pid, metrics } = c;
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let run_id = format!("{:x}{:x}", std::process::id(), started_unix & 0xffff);
    let mut notes = Vec::new();
    let mut ws = Fleet::start(&ws_plan, &run_id)?;
    let mut mqtt = Fleet::start(&mqtt_plan, &run_id)?;
    let mut warned = false;
    let server_baseline = coordinator::sample(&ws_plan.server, &mut warned, &ws.live);

    ws.live.phase(format!("connecting {} WebSocket clients", args.ws_clients));
    let (ws_ramp, ws_ramp_secs) = ws.ramp(&ws_plan, args.ws_clients)?;

    let mut phases = Vec::new();
    let mark = |ws: &Fleet, warned: &mut bool| Mark {
        at: Instant::now(),
        server: coordinator::sample(&ws_plan.server, warned, &ws.live),
    };
    let phase = |name: &str,
                 start: &Mark,
                 end: &Mark,
                 held: coordinator::Held,
                 mqtt: Option<Tally>,
                 mqtt_open: Option<u64>| {
        let server = end.server.clone().map(|mut after| {
            after.cpu_seconds =
                after.cpu_seconds.zip(start.server.as_ref().and_then(|b| b.cpu_seconds)).map(|(a, b)| a - b);
            after
        });
        Phase {
            name: name.into(),
            secs: end.at.duration_since(start.at).as_secs_f64(),
            ws: held.tally,
            ws_open: held.open,
            mqtt,
            mqtt_open,
            server,
            generator_cpu_seconds: held.cpu_seconds,
        }
    };

    // Before: the WebSocket clients alone.
    ws.live.phase(format!("before: {} WebSocket clients for {:?}", args.ws_clients, args.before));
    let start = mark(&ws, &mut warned);
    ws.hold()?;
    ws.wait_until(start.at + args.before)?;
    // The server's threads and lag are read from here to the end of the
    // disconnect phase: read before the phase ends, so that reading them
    // does not count as connect time.
    let threads_before = pid.map(usage::thread_times).transpose().unwrap_or_else(|e| {
        notes.push(format!("server threads not read: {e}"));
        None
    });
    let lag_before = metrics.as_deref().map(usage::http_get);
    let held = ws.end_hold(true)?;
    let end = mark(&ws, &mut warned);
    phases.push(phase("before", &start, &end, held, None, None));

    // Connect: every MQTT client connects and subscribes.
    ws.live.phase(format!("connect: {} MQTT clients", args.mqtt_clients));
    let start = end;
    let (mqtt_ramp, mqtt_connect_secs) = mqtt.ramp(&mqtt_plan, args.mqtt_clients)?;
    let held = ws.end_hold(true)?;
    let end = mark(&ws, &mut warned);
    let mqtt_open = Some(mqtt_ramp.connected);
    phases.push(phase("connect", &start, &end, held, Some(mqtt_ramp), mqtt_open));

    // Held: every MQTT client connected (publishing with --mqtt-rate).
    ws.live.phase(format!("held: {} MQTT clients for {:?}", args.mqtt_clients, args.mqtt_hold));
    let start = end;
    mqtt.hold()?;
    ws.wait_until(start.at + args.mqtt_hold)?;
    let mqtt_held = mqtt.end_hold(false)?;
    let held = ws.end_hold(true)?;
    let end = mark(&ws, &mut warned);
    let mqtt_tally = (args.mqtt_rate != Rate::Idle).then_some(mqtt_held.tally);
    phases.push(phase("held", &start, &end, held, mqtt_tally, Some(mqtt_held.open)));

    // Disconnect: the MQTT clients leave together (DISCONNECT, close).
    ws.live.phase(format!("disconnect: {} MQTT clients", args.mqtt_clients));
    let start = end;
    mqtt.stop();
    ws.wait_until(start.at + args.disconnect_window)?;
    let threads_after = pid.map(usage::thread_times);
    let lag_after = metrics.as_deref().map(usage::http_get);
    let held = ws.end_hold(false)?;
    let end = mark(&ws, &mut warned);
    phases.push(phase("disconnect", &start, &end, held, None, Some(0)));

    let server_threads = match (threads_before, threads_after) {
        (Some(before), Some(Ok(after))) => after
            .iter()
            .map(|(name, t)| (name.clone(), t.since(before.get(name).unwrap_or(&ThreadTimes::default()))))
            .collect(),
        (Some(_), Some(Err(e))) => {
            notes.push(format!("server threads not read: {e}"));
            BTreeMap::new()
        }
        _ => BTreeMap::new(),
    };
    let loop_lag = match (lag_before, lag_after) {
        (Some(Ok(before)), Some(Ok(after))) => {
            let lag = loop_lag(&before, &after);
            if lag.is_none() {
                notes
                    .push(format!("{} has no {LOOP_LAG_METRIC} histogram", metrics.as_deref().unwrap_or("")));
            }
            lag
        }
        (Some(Err(e)), _) | (_, Some(Err(e))) => {
            notes.push(format!("event-loop lag not read: {e}"));
            None
        }
        _ => None,
    };
    ws.live.phase("closing connections".into());
    ws.stop();
    Ok(MixedResult {
        schema: SCHEMA.into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        label: args.label.clone(),
        started_unix,
        ws_settings: ws_plan.settings.clone(),
        mqtt_settings: mqtt_plan.settings.clone(),
        settings: args,
        server_baseline,
        ws_ramp,
        ws_ramp_secs,
        mqtt_connect_secs,
        phases,
        server_threads,
        loop_lag,
        notes,
    })
}

/// The lag ticks between two readings of the server's metrics.
fn loop_lag(before: &str, after: &str) -> Option<LoopLag> {
    let before: BTreeMap<String, u64> =
        usage::histogram_buckets(before, LOOP_LAG_METRIC).into_iter().collect();
    let after = usage::histogram_buckets(after, LOOP_LAG_METRIC);
    let ticks_in = |le: &str, count: u64| count.saturating_sub(before.get(le).copied().unwrap_or(0));
    let total = after.iter().find(|(le, _)| le == "+Inf").map(|(le, n)| ticks_in(le, *n))?;
    let over = after
        .iter()
        .filter(|(le, _)| le != "+Inf")
        .map(|(le, n)| (le.clone(), total.saturating_sub(ticks_in(le, *n))))
        .collect();
    Some(LoopLag { ticks: total, over })
}

/// The report: a row per phase (and per phase in which the MQTT clients
/// sent messages), the MQTT connects, the server's threads and lag.
pub fn report(r: &MixedResult) -> String {
    let a = &r.settings;
    let mut out = String::new();
    let title = r.label.as_deref().map(|l| format!("{l} — ")).unwrap_or_default();
    let subscribed = if a.pipeline_subscribe { "subscribed with CONNECT" } else { "subscribed" };
    let mqtt_what = if a.mqtt_rate == Rate::Idle {
        format!("{subscribed}, idle")
    } else {
        format!("{subscribed}, {} msg/s each, QoS {}", a.mqtt_rate, a.qos)
    };
    let how = if a.mqtt_connect_rate >= ALL_AT_ONCE {
        "all at once".to_string()
    } else {
        format!("{}/s", count(a.mqtt_connect_rate))
    };
    let _ = writeln!(
        out,
        "{title}{} WebSocket clients ({}, {} msg/s, {} B) and {} MQTT {} clients ({}, connecting {how}, {mqtt_what}, staying {:?})",
        a.ws_clients, a.ws_url, a.rate, a.size, a.mqtt_clients, a.mqtt_version, a.mqtt_url, a.mqtt_hold
    );
    let headers = [
        "phase", "clients", "secs", "open", "sent/s", "recv/s", "p50", "p90", "p99", "p99.9", "max",
        "errors", "srv CPU", "srv RSS",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for p in &r.phases {
        let srv = p.server.as_ref();
        let cpu = srv
            .and_then(|s| s.cpu_seconds)
            .filter(|_| p.secs > 0.0)
            .map(|c| format!("{:.0}%", c / p.secs * 100.0));
        let rss = srv.and_then(|s| s.rss_bytes).map(|b| bytes(b as f64));
        rows.push(tally_row(&p.name, "ws", p.secs, p.ws_open, &p.ws, cpu, rss));
        if let Some(m) = p.mqtt.as_ref().filter(|m| m.sent > 0 || m.received > 0) {
            rows.push(tally_row(&p.name, "mqtt", p.secs, p.mqtt_open.unwrap_or(0), m, None, None));
        }
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(w - cell.chars().count());
            // The phase name reads better on the left; figures on the right.
            if i == 0 {
                let _ = write!(s, "{cell}{pad}");
            } else {
                let _ = write!(s, "  {pad}{cell}");
            }
        }
        s
    };
    let _ = writeln!(out, "{}", line(headers.to_vec()));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    for p in &r.phases {
        let mut kinds = p.ws.errors.clone();
        if let Some(m) = &p.mqtt {
            for (k, n) in &m.errors {
                *kinds.entry(format!("mqtt {k}")).or_default() += n;
            }
        }
        if !kinds.is_empty() {
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(out, "errors in {}: {}", p.name, list.join(", "));
        }
    }
    if let Some(p) = r.phase("connect")
        && let Some(m) = &p.mqtt
    {
        let ct = &m.connect_time;
        let pct = |q: f64| if ct.is_empty() { "-".into() } else { micros(ct.percentile(q)) };
        let _ = writeln!(
            out,
            "MQTT connect: {} of {} ready (CONNACK and SUBACK) in {:.3} s: {} connects/s; connect p50 {}, p99 {}, max {}; {} failed",
            m.connected,
            a.mqtt_clients,
            r.mqtt_connect_secs,
            r.mqtt_connects_per_sec().map_or("-".into(), |c| format!("{c:.0}")),
            pct(50.0),
            pct(99.0),
            if ct.is_empty() { "-".into() } else { micros(ct.max()) },
            m.connect_errors()
        );
    }
    let window: f64 = r.phases.iter().filter(|p| p.name != "before").map(|p| p.secs).sum();
    if !r.server_threads.is_empty() {
        let list: Vec<String> = r
            .server_threads
            .iter()
            .map(|(name, t)| {
                let wait = t.wait_seconds.map_or("-".into(), |w| format!("{w:.3} s"));
                format!("{name} CPU {:.2} s, waiting for a CPU {wait}", t.cpu_seconds)
            })
            .collect();
        let _ = writeln!(
            out,
            "server threads while the MQTT clients connected, stayed and left ({window:.1} s): {}",
            list.join("; ")
        );
    }
    if let Some(lag) = &r.loop_lag {
        let over: Vec<String> = lag
            .over
            .iter()
            .filter_map(|(le, n)| {
                let ms = le.parse::<f64>().ok()? * 1000.0;
                // The bounds that tell a stall from noise, as before: 2-20 ms.
                (2.0..=20.0).contains(&ms).then(|| format!("over {ms}ms: {n}"))
            })
            .collect();
        let _ = writeln!(
            out,
            "server event loop lag over the same time: {} ticks; {}",
            lag.ticks,
            over.join(", ")
        );
    }
    for n in &r.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

fn tally_row(
    phase: &str,
    who: &str,
    secs: f64,
    open: u64,
    t: &Tally,
    cpu: Option<String>,
    rss: Option<String>,
) -> Vec<String> {
    let l = &t.latency;
    let pct = |p: f64| if l.is_empty() { "-".into() } else { micros(l.percentile(p)) };
    let secs_div = secs.max(1e-9);
    vec![
        phase.to_string(),
        who.to_string(),
        format!("{secs:.2}"),
        count(open as f64),
        count(t.sent as f64 / secs_div),
        count(t.received as f64 / secs_div),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        if l.is_empty() { "-".into() } else { micros(l.max()) },
        count(t.error_count() as f64),
        cpu.unwrap_or_else(|| "-".into()),
        rss.unwrap_or_else(|| "-".into()),
    ]
}

/// Writes the JSON result.
pub fn write_json(r: &MixedResult, path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
