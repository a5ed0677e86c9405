//! A small, bounded MQTT (and mixed WebSocket) load generator used to
//! measure the broker for docs/mqtt.md; the project's full load generator
//! is `echo-loadgen`. Every run stops by itself.
//!
//! ```sh
//! # N clients, each subscribed to its own topic, publishing QoS 0 at 1/s:
//! cargo run --release --example mqtt_load -- mqtt --addr 127.0.0.1:1883 \
//!     --clients 10000 --concurrency 256 --seconds 30 --pid <server pid>
//! # Memory kept per client that came and went: rounds of N clients with
//! # fresh ids that connect (and subscribe to a topic of their own) and leave:
//! cargo run --release --example mqtt_load -- churn --addr 127.0.0.1:1883 \
//!     --clients 20000 --rounds 3 --own-topic --pid <server pid>
//! # WebSocket echo latency while MQTT clients connect as fast as they can:
//! cargo run --release --example mqtt_load -- mixed --ws ws://127.0.0.1:8080/ \
//!     --addr 127.0.0.1:1883 --ws-clients 5000 --clients 5000 --pid <server pid>
//! ```
//!
//! Clients speak MQTT 3.1.1 with hand-written packets (no client library
//! between the socket and the clock). Each publish carries its send time;
//! the round-trip time is measured when the broker delivers it back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// MQTT clients on their own topics, publishing at 1/s.
    Mqtt {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 10_000)]
        clients: u32,
        /// Clients connecting at the same time during the ramp.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Length of the publishing phase.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Messages per second per client.
        #[arg(long, default_value_t = 1)]
        rate: u32,
        /// Server process to read the memory of.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value = "bench")]
        label: String,
    },
    /// MQTT clients that connect (and subscribe) as fast as they can, hold
    /// their connections for `hold` seconds, and leave. Run by `mixed` as a
    /// process of its own, so that its work does not delay the WebSocket
    /// clients being measured.
    Storm {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 5000)]
        clients: u32,
        #[arg(long, default_value_t = 5000)]
        concurrency: usize,
        #[arg(long, default_value_t = 3)]
        hold: u64,
    },
    /// Rounds of clients with fresh ids that connect (clean session, and
    /// with `--own-topic` subscribe to a topic of their own), DISCONNECT and
    /// close; the server's RSS after each round shows what it keeps of
    /// clients that are gone.
    Churn {
        #[arg(long)]
        addr: String,
        /// Clients per round.
        #[arg(long, default_value_t = 20_000)]
        clients: u32,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        own_topic: bool,
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value = "bench")]
        label: String,
    },
    /// WebSocket clients echoing at 1/s while MQTT clients connect at once.
    Mixed(Mixed),
}

#[derive(clap::Args, Debug)]
struct Mixed {
    #[arg(long)]
    ws: String,
    #[arg(long)]
    addr: String,
    #[arg(long, default_value_t = 5000)]
    ws_clients: u32,
    #[arg(long, default_value_t = 5000)]
    clients: u32,
    #[arg(long, default_value_t = 5000)]
    concurrency: usize,
    #[arg(long)]
    pid: Option<u32>,
    /// The server's admin address (HOST:PORT): its event-loop lag
    /// histogram is read before and after the storm.
    #[arg(long)]
    admin: Option<String>,
    /// Run the storm process at this nice level (19: it only gets the CPU
    /// the server and the measuring clients leave).
    #[arg(long, default_value_t = 0)]
    storm_nice: i32,
}

fn rss(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// CPU seconds used so far by each thread of a process, by thread name.
/// The server's `echo_event_loop_lag_seconds` buckets (cumulative counts
/// by upper bound), read from its admin port.
fn loop_lag(admin: Option<&str>) -> Option<std::collections::BTreeMap<String, u64>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin?).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let buckets = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("echo_event_loop_lag_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.to_owned(), count.parse::<f64>().ok()? as u64))
        })
        .collect();
    Some(buckets)
}

fn thread_cpu(pid: Option<u32>) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Some(pid) = pid else { return out };
    let ticks = 100.0; // USER_HZ
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let name =
                std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_owned();
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else { continue };
            let fields: Vec<&str> = after.split_whitespace().collect();
            let cpu = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
                + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
            *out.entry(name.clone()).or_insert(0.0) += cpu / ticks;
            // schedstat: time on the CPU, time waiting for one (ns), timeslices.
            let sched = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            if let Some(wait) = sched.split_whitespace().nth(1).and_then(|w| w.parse::<f64>().ok()) {
                *out.entry(format!("{name}:waiting_for_cpu")).or_insert(0.0) += wait / 1e9;
            }
        }
    }
    out
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

fn connect_packet(id: &str) -> Vec<u8> {
    let mut body = b"\x00\x04MQTT\x04\x02\x00\x3c".to_vec();
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut out = vec![0x10];
    remaining_length(body.len(), &mut out);
    out.extend(body);
    out
}

fn subscribe_packet(topic: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.push(0);
    let mut out = vec![0x82];
    remaining_length(body.len(), &mut out);
    out.extend(body);
    out
}

fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut out = vec![0x30];
    remaining_length(body.len(), &mut out);
    out.extend(body);
    out
}

/// Splits complete packets off the front of `buf`: (first byte, body).
fn next_packet(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut pos = 1;
    loop {
        let b = *buf.get(pos)?;
        len |= ((b & 0x7f) as usize) << shift;
        pos += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if buf.len() < pos + len {
        return None;
    }
    let first = buf[0];
    let body = buf[pos..pos + len].to_vec();
    buf.drain(..pos + len);
    Some((first, body))
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    connect_failed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
}

/// Reads until `wanted` acknowledgements (a successful CONNACK, SUBACKs)
/// have come, within 10 s; returns what was read past them.
async fn await_acks(s: &mut TcpStream, wanted: u32) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(64);
    let mut acks = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 256];
    while acks < wanted {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .map_err(|_| "no CONNACK/SUBACK within 10 s".to_owned())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before CONNACK/SUBACK".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some((first, body)) = next_packet(&mut buf) {
            match first >> 4 {
                2 if body.get(1) == Some(&0) => acks += 1,
                2 => return Err(format!("CONNACK refused: {body:?}")),
                9 => acks += 1,
                _ => {}
            }
        }
    }
    Ok(buf)
}

/// Connects, waits for CONNACK and SUBACK (10 s each).
async fn mqtt_session(addr: &str, id: &str, topic: &str) -> Result<(TcpStream, Vec<u8>), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).ok();
    s.write_all(&connect_packet(id)).await.map_err(|e| e.to_string())?;
    s.write_all(&subscribe_packet(topic)).await.map_err(|e| e.to_string())?;
    let buf = await_acks(&mut s, 2).await?;
    Ok((s, buf))
}

/// Publishes once a second to its own topic until `until`, recording the
/// round-trip time of each message that comes back.
#[allow(clippy::too_many_arguments)] // a measurement script, not an API
async fn publish_loop(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    topic: String,
    offset: Duration,
    until: tokio::time::Instant,
    origin: Instant,
    counters: Arc<Counters>,
    rate: u32,
) -> Vec<(u64, u64)> {
    let mut rtts = Vec::new();
    let period = Duration::from_secs(1) / rate.max(1);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset / rate.max(1), period);
    let grace = until + Duration::from_secs(3);
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut chunk = vec![0u8; 1024];
    loop {
        tokio::select! {
            _ = ticker.tick(), if tokio::time::Instant::now() < until => {
                let now = origin.elapsed().as_nanos() as u64;
                let mut payload = now.to_be_bytes().to_vec();
                payload.extend_from_slice(&[0x5a; 24]);
                if s.write_all(&publish_packet(&topic, &payload)).await.is_err() {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                sent += 1;
            }
            read = s.read(&mut chunk) => {
                let n = match read { Ok(0) | Err(_) => { counters.dropped.fetch_add(1, Ordering::Relaxed); break } Ok(n) => n };
                buf.extend_from_slice(&chunk[..n]);
                while let Some((first, body)) = next_packet(&mut buf) {
                    if first >> 4 == 3 {
                        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                        let payload = &body[2 + topic_len..];
                        let stamp = u64::from_be_bytes(payload[..8].try_into().unwrap());
                        let now = origin.elapsed().as_nanos() as u64;
                        rtts.push((stamp / 1000, (now - stamp) / 1000));
                        received += 1;
                    }
                }
            }
            _ = tokio::time::sleep_until(grace) => break,
        }
        if tokio::time::Instant::now() >= until && received >= sent {
            break;
        }
    }
    counters.sent.fetch_add(sent, Ordering::Relaxed);
    counters.received.fetch_add(received, Ordering::Relaxed);
    let _ = s.write_all(&[0xe0, 0x00]).await;
    rtts
}

async fn run_mqtt(
    addr: String,
    clients: u32,
    concurrency: usize,
    seconds: u64,
    rate: u32,
    pid: Option<u32>,
    label: String,
) {
    let origin = Instant::now();
    let counters = Arc::new(Counters::default());
    let gate = Arc::new(Semaphore::new(concurrency));
    let (go_tx, go_rx) = watch::channel(None::<tokio::time::Instant>);
    let rss_before = rss(pid);
    let ramp_start = Instant::now();
    let mut tasks = Vec::new();
    let ramp_done = Arc::new(AtomicU64::new(0));
    for i in 0..clients {
        let (addr, gate, counters, mut go_rx, ramp_done) =
            (addr.clone(), gate.clone(), counters.clone(), go_rx.clone(), ramp_done.clone());
        tasks.push(tokio::spawn(async move {
            let topic = format!("load/{i}");
            let permit = gate.acquire_owned().await.unwrap();
            let session = mqtt_session(&addr, &format!("load-{i}"), &topic).await;
            drop(permit);
            ramp_done.store(ramp_start.elapsed().as_micros() as u64, Ordering::Relaxed);
            let (s, buf) = match session {
                Ok(ok) => {
                    counters.connected.fetch_add(1, Ordering::Relaxed);
                    ok
                }
                Err(e) => {
                    if counters.connect_failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("client {i}: {e}");
                    }
                    return Vec::new();
                }
            };
            let until = loop {
                if let Some(until) = *go_rx.borrow() {
                    break until;
                }
                if go_rx.changed().await.is_err() {
                    return Vec::new();
                }
            };
            let offset = Duration::from_millis(u64::from(i) * 1000 / u64::from(clients.max(1)));
            publish_loop(s, buf, topic, offset, until, origin, counters, rate).await
        }));
    }
    // Wait for the ramp to end.
    loop {
        let done =
            counters.connected.load(Ordering::Relaxed) + counters.connect_failed.load(Ordering::Relaxed);
        if done >= u64::from(clients) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp = Duration::from_micros(ramp_done.load(Ordering::Relaxed));
    let connected = counters.connected.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_idle = rss(pid);
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    go_tx.send(Some(until)).unwrap();
    let publish_start = origin.elapsed().as_micros() as u64;
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    let rss_end = rss(pid);
    let mut rtts: Vec<u64> = samples.iter().map(|&(_, rtt)| rtt).collect();
    rtts.sort_unstable();
    // The first seconds include the router's one-time work per new topic;
    // the steady state is the rest.
    if std::env::var_os("MQTT_LOAD_SLOW").is_some() {
        // When the slow round trips (over 50 ms) were sent, by 100 ms slot.
        let mut slots = std::collections::BTreeMap::new();
        for &(at, rtt) in &samples {
            if rtt > 50_000 {
                *slots.entry((at - publish_start) / 100_000).or_insert(0u32) += 1;
            }
        }
        eprintln!("slow messages by 100 ms slot of the publish phase: {slots:?}");
    }
    let mut steady: Vec<u64> =
        samples.iter().filter(|&&(at, _)| at >= publish_start + 10_000_000).map(|&(_, rtt)| rtt).collect();
    steady.sort_unstable();
    let c = &counters;
    println!(
        "{label}: clients={clients} connected={connected} connect_failed={} ramp={:.2}s connects_per_s={:.0} \
         sent={} received={} lost={} dropped_connections={} rtt_p50_ms={:.2} rtt_p99_ms={:.2} rtt_max_ms={:.2} \
         steady_after_10s_p50_ms={:.2} steady_p99_ms={:.2} steady_max_ms={:.2} rss_before_mib={:.1} rss_idle_mib={:.1} rss_end_mib={:.1} bytes_per_idle_connection={:.0}",
        c.connect_failed.load(Ordering::Relaxed),
        ramp.as_secs_f64(),
        connected as f64 / ramp.as_secs_f64(),
        c.sent.load(Ordering::Relaxed),
        c.received.load(Ordering::Relaxed),
        c.sent.load(Ordering::Relaxed).saturating_sub(c.received.load(Ordering::Relaxed)),
        c.dropped.load(Ordering::Relaxed),
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99),
        percentile(&rtts, 1.0),
        percentile(&steady, 0.5),
        percentile(&steady, 0.99),
        percentile(&steady, 1.0),
        rss_before as f64 / 1048576.0,
        rss_idle as f64 / 1048576.0,
        rss_end as f64 / 1048576.0,
        (rss_idle.saturating_sub(rss_before)) as f64 / connected.max(1) as f64,
    );
}

/// One WebSocket client: an echo per second, with its send time in the
/// text; records (send time, rtt) in microseconds.
async fn ws_client(
    url: String,
    until: Instant,
    origin: Instant,
    offset: Duration,
) -> Result<Vec<(u64, u64)>, String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(offset).await;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut out = Vec::new();
    while Instant::now() < until {
        ticker.tick().await;
        let sent = origin.elapsed().as_micros() as u64;
        ws.send(Message::Text(format!("{sent:020}").into())).await.map_err(|e| e.to_string())?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let stamp: u64 = t.as_str().parse().map_err(|_| "bad echo")?;
                    out.push((stamp, origin.elapsed().as_micros() as u64 - stamp));
                    break;
                }
                Some(Ok(_)) => continue,
                other => return Err(format!("{other:?}")),
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(out)
}

async fn run_storm(addr: String, clients: u32, concurrency: usize, hold: u64) {
    let start = Instant::now();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (addr, gate) = (addr.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let result = mqtt_session(&addr, &format!("storm-{i}"), &format!("storm/{i}")).await;
            (result.map(|(s, _)| s), start.elapsed())
        }));
    }
    let mut ramp = Duration::ZERO;
    let mut failed = 0u32;
    let mut held = Vec::new();
    for task in tasks {
        let (result, at) = task.await.unwrap();
        ramp = ramp.max(at);
        match result {
            Ok(s) => held.push(s),
            Err(e) => {
                if failed < 5 {
                    eprintln!("mqtt: {e}");
                }
                failed += 1;
            }
        }
    }
    println!("storm: clients={clients} failed={failed} ramp={:.3}", ramp.as_secs_f64());
    tokio::time::sleep(Duration::from_secs(hold)).await;
}

/// One client of a churn round: CONNECT (and SUBSCRIBE), wait for the
/// acknowledgements, DISCONNECT, wait for the server to close.
async fn churn_client(addr: &str, id: &str, topic: Option<&str>) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).ok();
    let mut out = connect_packet(id);
    if let Some(topic) = topic {
        out.extend(subscribe_packet(topic));
    }
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    await_acks(&mut s, if topic.is_some() { 2 } else { 1 }).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 256];
    s.write_all(&[0xe0, 0x00]).await.map_err(|e| e.to_string())?;
    // The server closes after a DISCONNECT; waiting for it means the
    // session has ended on the server's side before the round is over.
    let _ =
        tokio::time::timeout_at(deadline, async { while s.read(&mut chunk).await.is_ok_and(|n| n > 0) {} })
            .await;
    Ok(())
}

async fn run_churn(
    addr: String,
    clients: u32,
    rounds: u32,
    concurrency: usize,
    own_topic: bool,
    pid: Option<u32>,
    label: String,
) {
    // Fresh ids on every run too, so that a second run against the same
    // server does not meet the first one's.
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let settle = Duration::from_secs(1);
    tokio::time::sleep(settle).await;
    let rss_start = rss(pid);
    let started = Instant::now();
    let mut failed = 0u32;
    let mut rss_end = rss_start;
    for round in 0..rounds {
        let round_started = Instant::now();
        let gate = Arc::new(Semaphore::new(concurrency));
        let mut tasks = Vec::with_capacity(clients as usize);
        for i in 0..clients {
            let (addr, gate) = (addr.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                let id = format!("churn-{run}-{round}-{i}");
                let topic = own_topic.then(|| format!("churn/{run}/{round}/{i}"));
                churn_client(&addr, &id, topic.as_deref()).await
            }));
        }
        for task in tasks {
            if let Err(e) = task.await.unwrap() {
                if failed < 5 {
                    eprintln!("churn: {e}");
                }
                failed += 1;
            }
        }
        let took = round_started.elapsed().as_secs_f64();
        tokio::time::sleep(settle).await;
        rss_end = rss(pid);
        println!(
            "churn {label}: round {}/{rounds}: {clients} clients in {took:.1} s ({:.0}/s), server RSS {:.1} MiB",
            round + 1,
            f64::from(clients) / took,
            rss_end as f64 / 1048576.0
        );
    }
    let total = u64::from(clients) * u64::from(rounds);
    println!(
        "churn {label}: clients={total} own_topic={own_topic} failed={failed} seconds={:.1} \
         rss_growth_mib={:.1} bytes_kept_per_client={:.0}",
        started.elapsed().as_secs_f64() - settle.as_secs_f64() * f64::from(rounds),
        (rss_end as f64 - rss_start as f64) / 1048576.0,
        (rss_end as f64 - rss_start as f64) / total as f64,
    );
}

async fn run_mixed(settings: Mixed) {
    let Mixed { ws, addr, ws_clients, clients, concurrency, pid, admin, storm_nice } = settings;
    let origin = Instant::now();
    // 10 s to connect the WebSocket clients, 10 s of baseline, the storm, then 10 s more.
    let storm_at = origin + Duration::from_secs(20);
    let until = origin + Duration::from_secs(40);
    let mut ws_tasks = Vec::new();
    for i in 0..ws_clients {
        let url = ws.clone();
        let offset = Duration::from_millis(u64::from(i) * 1000 / u64::from(ws_clients.max(1)));
        ws_tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(u64::from(i) * 8000 / u64::from(ws_clients.max(1))))
                .await;
            ws_client(url, until, origin, offset).await
        }));
    }
    tokio::time::sleep_until(storm_at.into()).await;
    let cpu_before = thread_cpu(pid);
    let lag_before = loop_lag(admin.as_deref());
    let storm_start = Instant::now();
    // The storm runs in a process of its own (see `Storm`).
    let storm_args = vec![
        "-n".to_owned(),
        storm_nice.to_string(),
        std::env::current_exe().unwrap().display().to_string(),
        "storm".to_owned(),
        "--addr".to_owned(),
        addr.clone(),
        "--clients".to_owned(),
        clients.to_string(),
        "--concurrency".to_owned(),
        concurrency.to_string(),
        "--hold".to_owned(),
        "3".to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("nice").args(storm_args).output().unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    let field = |name: &str| -> f64 {
        report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let storm_end = Duration::from_secs_f64(field("ramp"));
    // The storm process ends right after its clients disconnect (together).
    let storm_done_us = origin.elapsed().as_micros() as u64;
    // Includes the storm's 3 s hold (idle) and the disconnections.
    let cpu_after = thread_cpu(pid);
    let cpu: Vec<String> = cpu_after
        .iter()
        .map(|(name, after)| format!("{name}={:.2}s", after - cpu_before.get(name).copied().unwrap_or(0.0)))
        .collect();
    eprintln!("server CPU while the storm process ran: {}", cpu.join(" "));
    if let (Some(before), Some(after)) = (lag_before, loop_lag(admin.as_deref())) {
        let ticks = |le: &str| after.get(le).unwrap_or(&0) - before.get(le).unwrap_or(&0);
        let total = ticks("+Inf");
        let over: Vec<String> = ["0.002", "0.005", "0.01", "0.02"]
            .iter()
            .map(|le| {
                format!("over_{}ms={}", (le.parse::<f64>().unwrap() * 1000.0) as u32, total - ticks(le))
            })
            .collect();
        eprintln!("server event loop lag while the storm process ran: ticks={total} {}", over.join(" "));
    }
    let failed = field("failed") as u64;
    let held = vec![(); (clients as u64 - failed) as usize];
    let storm_start_us = storm_start.duration_since(origin).as_micros() as u64;
    let storm_end_us = storm_start_us + storm_end.as_micros() as u64;
    let mut baseline = Vec::new();
    let mut during = Vec::new();
    let mut leaving = Vec::new();
    let mut timeline = Vec::new();
    let mut ws_failed = 0;
    for task in ws_tasks {
        match task.await.unwrap() {
            Ok(samples) => {
                for (at, rtt) in samples {
                    if at + 1_000_000 >= storm_done_us && at <= storm_done_us {
                        leaving.push(rtt);
                    }
                    if at >= storm_start_us && at <= storm_end_us {
                        during.push(rtt);
                        timeline.push((at - storm_start_us, rtt));
                    } else if at >= storm_start_us.saturating_sub(10_000_000) && at < storm_start_us {
                        baseline.push(rtt);
                    }
                }
            }
            Err(e) => {
                if ws_failed < 5 {
                    eprintln!("ws: {e}");
                }
                ws_failed += 1;
            }
        }
    }
    baseline.sort_unstable();
    during.sort_unstable();
    leaving.sort_unstable();
    if std::env::var_os("MIXED_TIMELINE").is_some() {
        // Worst echo per 50 ms of the storm: where the delays come from.
        let mut worst = std::collections::BTreeMap::new();
        for (at, rtt) in timeline {
            let slot = worst.entry(at / 50_000).or_insert((0u64, 0u64));
            slot.0 = slot.0.max(rtt);
            slot.1 += 1;
        }
        for (slot, (max, n)) in worst {
            eprintln!("  storm +{:4} ms: {n:4} echoes, worst {:.1} ms", slot * 50, max as f64 / 1000.0);
        }
    }
    println!(
        "mixed: ws_clients={ws_clients} ws_failed={ws_failed} mqtt_clients={clients} mqtt_failed={failed} \
         storm={:.2}s mqtt_connects_per_s={:.0} \
         ws_baseline n={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} | ws_during_storm n={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} \
         | ws_while_they_disconnect n={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        storm_end.as_secs_f64(),
        held.len() as f64 / storm_end.as_secs_f64(),
        baseline.len(),
        percentile(&baseline, 0.5),
        percentile(&baseline, 0.99),
        percentile(&baseline, 1.0),
        during.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        percentile(&during, 1.0),
        leaving.len(),
        percentile(&leaving, 0.5),
        percentile(&leaving, 0.99),
        percentile(&leaving, 1.0),
    );
}

fn main() {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        match args.mode {
            Mode::Mqtt { addr, clients, concurrency, seconds, rate, pid, label } => {
                run_mqtt(addr, clients, concurrency, seconds, rate, pid, label).await
            }
            Mode::Storm { addr, clients, concurrency, hold } => {
                run_storm(addr, clients, concurrency, hold).await
            }
            Mode::Churn { addr, clients, rounds, concurrency, own_topic, pid, label } => {
                run_churn(addr, clients, rounds, concurrency, own_topic, pid, label).await
            }
            Mode::Mixed(settings) => run_mixed(settings).await,
        }
    });
}
