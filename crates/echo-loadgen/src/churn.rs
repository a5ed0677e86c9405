//! `echo-loadgen churn`: what a broker keeps of clients that are gone.
//!
//! Rounds of MQTT clients with fresh client ids (as `mosquitto_sub` and
//! MQTT.js pick by default) connect with a clean session, optionally
//! subscribe to a topic of their own, send DISCONNECT and wait for the
//! broker to close. After each round, and a moment to settle, the server's
//! RSS is read: a broker that frees what a client leaves behind stays flat
//! from round to round, and the growth divided by the clients gone is what
//! it keeps of each.
//!
//! Few clients are in flight at a time (`--concurrency`), so one process is
//! enough; the clients are the same `mqtt::Client` (and codec) as `run`'s.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};

use crate::mqtt::Client;
use crate::report::{bytes, count, micros};
use crate::scenario::{MqttVersion, Sources};
use crate::stats::{ErrorKind, Tally};
use crate::target::{Protocol, Target};
use crate::usage::{ServerProbe, ServerSample};
use echo_mqtt_wire as codec;

pub const SCHEMA: &str = "echo-loadgen-churn/1";

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 10s, 2m)"))
}

/// Settings of `echo-loadgen churn`.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChurnArgs {
    /// MQTT broker: mqtt://HOST:PORT.
    #[arg(value_name = "MQTT_URL")]
    pub url: String,

    /// Clients per round, each with a client id never used before.
    #[arg(long, default_value_t = 20_000, value_name = "N")]
    pub clients: u64,

    /// Rounds.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub rounds: u32,

    /// Clients connecting (or leaving) at the same time.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub concurrency: usize,

    /// Each client subscribes to a topic of its own before it leaves (the
    /// broker then has a topic and a subscription to forget too).
    #[arg(long)]
    pub own_topic: bool,

    /// With --own-topic: write SUBSCRIBE right behind CONNECT, without
    /// waiting for CONNACK (one read per client for the broker instead of two).
    #[arg(long, requires = "own_topic")]
    pub pipeline_subscribe: bool,

    /// Pause after each round before the server's memory is read.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(with = "crate::result::secs")]
    pub settle: Duration,

    /// MQTT protocol version.
    #[arg(long, default_value = "3.1.1", value_name = "VERSION")]
    pub mqtt_version: MqttVersion,

    /// Limit for TCP connect plus CONNACK (and SUBACK), and for the broker
    /// to close the connection after DISCONNECT.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(with = "crate::result::secs")]
    pub connect_timeout: Duration,

    /// MQTT topic prefix of --own-topic: PREFIX/RUN/ROUND/N.
    #[arg(long, default_value = "echo-loadgen", value_name = "TOPIC")]
    pub topic_prefix: String,

    /// Local addresses to connect from, e.g. 127.0.0.2-127.0.0.9.
    #[arg(long, value_name = "ADDRS")]
    #[serde(skip)]
    pub source: Option<Sources>,

    /// PID of the server on this machine: its RSS after every round.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// A name for this run (the server's name, say), shown in the report.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,

    /// Write the result as JSON (histograms included).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub json: Option<PathBuf>,

    /// No line per round while running; only the report.
    #[arg(short, long)]
    #[serde(skip)]
    pub quiet: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// From the first client's connect to the last one gone.
    pub secs: f64,
    /// attempted, connected (CONNACK, and SUBACK with --own-topic),
    /// connect_time and errors; no messages.
    pub tally: Tally,
    /// Clients whose connection the broker had not closed within the
    /// connect timeout after DISCONNECT (they were closed by us).
    pub not_closed: u64,
    /// Server readings after the round and the settle pause.
    pub server: Option<ServerSample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChurnResult {
    /// Always "echo-loadgen-churn/1" for this layout.
    pub schema: String,
    pub tool_version: String,
    pub label: Option<String>,
    pub started_unix: u64,
    pub settings: ChurnArgs,
    /// Server readings before the first round (after one settle pause).
    pub server_baseline: Option<ServerSample>,
    pub rounds: Vec<Round>,
}

impl ChurnResult {
    fn rss(s: &Option<ServerSample>) -> Option<f64> {
        s.as_ref().and_then(|s| s.rss_bytes).map(|b| b as f64)
    }

    /// Server RSS growth from before the first round to after the last,
    /// per client gone.
    pub fn bytes_kept_per_client(&self) -> Option<f64> {
        let before = Self::rss(&self.server_baseline)?;
        let after = Self::rss(&self.rounds.last()?.server)?;
        let clients: u64 = self.rounds.iter().map(|r| r.tally.attempted).sum();
        (clients > 0).then(|| (after - before) / clients as f64)
    }

    /// The same from the end of the first round on: what is left once the
    /// first round's warm-up (allocator pools, tables at their high-water
    /// size) is out of the figure.
    pub fn bytes_kept_per_client_after_first(&self) -> Option<f64> {
        let first = Self::rss(&self.rounds.first()?.server)?;
        let last = Self::rss(&self.rounds.last()?.server)?;
        let clients: u64 = self.rounds.iter().skip(1).map(|r| r.tally.attempted).sum();
        (clients > 0).then(|| (last - first) / clients as f64)
    }
}

/// Checks the settings and the broker before the first round.
pub fn check(args: &ChurnArgs) -> Result<(Target, Option<ServerProbe>), String> {
    let target = Target::parse(&args.url)?;
    if target.protocol != Protocol::Mqtt {
        return Err(format!("{} is not an MQTT URL: churn measures a broker, mqtt://HOST:PORT", args.url));
    }
    if args.clients == 0 || args.rounds == 0 || args.concurrency == 0 {
        return Err("--clients, --rounds and --concurrency must be at least 1".into());
    }
    if args.topic_prefix.is_empty() || args.topic_prefix.contains(['+', '#']) {
        return Err("--topic-prefix must be a non-empty topic without wildcards".into());
    }
    if let Some(bad) = args.source.iter().flat_map(|s| &s.0).find(|a| a.is_ipv4() != target.addr.is_ipv4()) {
        return Err(format!(
            "--source {bad} is not of the address family of the broker's address {}",
            target.addr
        ));
    }
    let probe = args.server_pid.map(ServerProbe::Pid);
    if let Some(p) = &probe {
        p.sample()?;
    }
    Ok((target, probe))
}

/// Runs every round.
pub fn run(args: ChurnArgs, target: Target, probe: Option<ServerProbe>) -> anyhow::Result<ChurnResult> {
    crate::worker::raise_fd_limit();
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Fresh ids on every run too, so that a second run against the same
    // server does not meet the first one's.
    let run_id = format!("{:x}{:x}", std::process::id(), started_unix & 0xffff);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::coordinator::cpus())
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let sample = |probe: &Option<ServerProbe>| probe.as_ref().and_then(|p| p.sample().ok());
    std::thread::sleep(args.settle);
    let server_baseline = sample(&probe);
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let started = Instant::now();
        let (tally, not_closed) = runtime.block_on(one_round(&args, &target, &run_id, round));
        let secs = started.elapsed().as_secs_f64();
        std::thread::sleep(args.settle);
        let r = Round { secs, tally, not_closed, server: sample(&probe) };
        if !args.quiet {
            eprintln!(
                "{}",
                round_line(&args, round, &r, rounds.last().map_or(&server_baseline, |p: &Round| &p.server))
            );
        }
        rounds.push(r);
    }
    Ok(ChurnResult {
        schema: SCHEMA.into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        label: args.label.clone(),
        started_unix,
        settings: args,
        server_baseline,
        rounds,
    })
}

/// One round: every client connects, (subscribes,) leaves; at most
/// `concurrency` at a time.
async fn one_round(args: &ChurnArgs, target: &Target, run_id: &str, round: u32) -> (Tally, u64) {
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let sources: Vec<_> = args.source.iter().flat_map(|s| s.0.iter().copied()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    let mut tally = Tally::default();
    let mut not_closed = 0;
    for i in 0..args.clients {
        let permit = gate.clone().acquire_owned().await.expect("the semaphore is never closed");
        let client_id = format!("elg-churn-{run_id}-{round}-{i}");
        let topic = args.own_topic.then(|| format!("{}/{run_id}/{round}/{i}", args.topic_prefix));
        let source = (!sources.is_empty()).then(|| sources[i as usize % sources.len()]);
        let (addr, version, limit, pipeline) =
            (target.addr, args.mqtt_version, args.connect_timeout, args.pipeline_subscribe);
        tasks.spawn(async move {
            let outcome =
                come_and_go(addr, source, version, &client_id, topic.as_deref(), pipeline, limit).await;
            drop(permit);
            outcome
        });
        // Reap finished clients as we go, so that 20,000 results do not wait in the set.
        while let Some(r) = tasks.try_join_next() {
            merge_outcome(r, &mut tally, &mut not_closed);
        }
    }
    while let Some(r) = tasks.join_next().await {
        merge_outcome(r, &mut tally, &mut not_closed);
    }
    (tally, not_closed)
}

/// What became of one client: connect time (µs) or the error, and whether
/// the broker closed the connection after DISCONNECT.
type Outcome = (Result<u64, ErrorKind>, bool);

fn merge_outcome(r: Result<Outcome, tokio::task::JoinError>, tally: &mut Tally, not_closed: &mut u64) {
    // A client task cannot panic short of a bug; one that did is not counted.
    let Ok((result, closed)) = r else { return };
    tally.attempted += 1;
    match result {
        Ok(micros) => {
            tally.connected += 1;
            tally.connect_time.record(micros);
            if !closed {
                *not_closed += 1;
            }
        }
        Err(kind) => *tally.errors.entry(kind.to_string()).or_default() += 1,
    }
}

async fn come_and_go(
    addr: std::net::SocketAddr,
    source: Option<std::net::IpAddr>,
    version: MqttVersion,
    client_id: &str,
    topic: Option<&str>,
    pipeline: bool,
    limit: Duration,
) -> Outcome {
    let started = Instant::now();
    let deadline = started + limit;
    let opened = match topic {
        Some(topic) if pipeline => {
            Client::open_subscribed(addr, source, version, client_id, topic, 0, deadline).await
        }
        _ => Client::open(addr, source, version, client_id, deadline).await,
    };
    let mut client = match opened {
        Ok(c) => c,
        Err(kind) => return (Err(kind), false),
    };
    if let Some(topic) = topic.filter(|_| !pipeline)
        && let Err(kind) = client.subscribe(topic, 0, deadline).await
    {
        return (Err(kind), false);
    }
    let ready = started.elapsed().as_micros() as u64;
    if client.send(|buf, _| buf.extend_from_slice(&codec::DISCONNECT)).await.is_err() {
        // The broker closed first: it is gone either way.
        return (Ok(ready), true);
    }
    // The broker closes after a DISCONNECT; waiting for it means the
    // session has ended on the server's side before the round is over.
    let closed = timeout_at(Instant::now() + limit, async {
        loop {
            if client.recv().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok();
    (Ok(ready), closed)
}

fn round_line(args: &ChurnArgs, round: u32, r: &Round, before: &Option<ServerSample>) -> String {
    let label = args.label.as_deref().map(|l| format!(" {l}")).unwrap_or_default();
    let rss = |s: &Option<ServerSample>| s.as_ref().and_then(|s| s.rss_bytes);
    let server = match (rss(&r.server), rss(before)) {
        (Some(a), Some(b)) => format!(", server RSS {} ({})", bytes(a as f64), signed(a as f64 - b as f64)),
        (Some(a), None) => format!(", server RSS {}", bytes(a as f64)),
        _ => String::new(),
    };
    let ct = &r.tally.connect_time;
    let pct = |p: f64| if ct.is_empty() { "-".into() } else { micros(ct.percentile(p)) };
    format!(
        "churn{label}: round {}/{}: {} clients in {:.1} s ({}/s), connect p50 {} p99 {}, {} failed{server}",
        round + 1,
        args.rounds,
        r.tally.attempted,
        r.secs,
        count(r.tally.attempted as f64 / r.secs.max(1e-9)),
        pct(50.0),
        pct(99.0),
        r.tally.error_count(),
    )
}

fn signed(b: f64) -> String {
    if b >= 0.0 { format!("+{}", bytes(b)) } else { bytes(b) }
}

/// The report: a line per round and the total.
pub fn report(r: &ChurnResult) -> String {
    let a = &r.settings;
    let mut out = String::new();
    let mut before = &r.server_baseline;
    for (i, round) in r.rounds.iter().enumerate() {
        let _ = writeln!(out, "{}", round_line(a, i as u32, round, before));
        before = &round.server;
    }
    let label = a.label.as_deref().map(|l| format!(" {l}")).unwrap_or_default();
    let clients: u64 = r.rounds.iter().map(|x| x.tally.attempted).sum();
    let failed: u64 = r.rounds.iter().map(|x| x.tally.error_count()).sum();
    let not_closed: u64 = r.rounds.iter().map(|x| x.not_closed).sum();
    let secs: f64 = r.rounds.iter().map(|x| x.secs).sum();
    let rss = |s: &Option<ServerSample>| s.as_ref().and_then(|s| s.rss_bytes);
    let memory = match (rss(&r.server_baseline), r.rounds.last().and_then(|x| rss(&x.server))) {
        (Some(b), Some(a)) => format!(
            "; server RSS {} → {} ({}): {} kept per client gone{}",
            bytes(b as f64),
            bytes(a as f64),
            signed(a as f64 - b as f64),
            r.bytes_kept_per_client().map_or("-".into(), |k| format!("{k:.0} B")),
            r.bytes_kept_per_client_after_first()
                .map_or(String::new(), |k| format!(" ({k:.0} B after round 1)")),
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "churn{label}: {clients} clients ({}), {failed} failed, {not_closed} not closed by the broker after DISCONNECT, {secs:.1} s{memory}",
        if a.own_topic { "each subscribed to a topic of its own" } else { "client ids only" },
    );
    for (i, round) in r.rounds.iter().enumerate() {
        if !round.tally.errors.is_empty() {
            let list: Vec<String> = round.tally.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(out, "errors in round {}: {}", i + 1, list.join(", "));
        }
    }
    out
}

/// Writes the JSON result.
pub fn write_json(r: &ChurnResult, path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
