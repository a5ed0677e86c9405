//! The periodic `info` summary: one line per `stats_interval`, whatever the
//! number of clients (there is no per-connection line at `info`).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tracing::info;

use crate::listener::ConnectionLimit;
use crate::metrics::Metrics;
use crate::process::ProcessStats;
use crate::shutdown::Shutdown;

/// Counter values at one moment, for computing rates.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    mqtt_in: u64,
    mqtt_out: u64,
    cpu_seconds: f64,
}

impl Snapshot {
    fn take(metrics: &Metrics, process: Option<&ProcessStats>) -> Snapshot {
        let ws = &metrics.websocket;
        Snapshot {
            messages_in: ws.text_received.get() + ws.binary_received.get(),
            messages_out: ws.messages_echoed(),
            bytes_in: ws.bytes_received.get(),
            bytes_out: ws.bytes_sent.get(),
            mqtt_in: metrics.mqtt.publishes_received.get(),
            mqtt_out: metrics.mqtt.publishes_sent.get(),
            cpu_seconds: process.map(|p| p.cpu_seconds).unwrap_or(0.0),
        }
    }
}

pub async fn run(
    interval: Duration,
    metrics: Arc<Metrics>,
    websocket: Rc<ConnectionLimit>,
    mqtt: Rc<ConnectionLimit>,
    shutdown: Rc<Shutdown>,
) {
    if interval.is_zero() {
        return;
    }
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = Snapshot::take(&metrics, ProcessStats::read().as_ref());
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = ticker.tick() => {}
        }
        let process = ProcessStats::read();
        let now = Snapshot::take(&metrics, process.as_ref());
        let secs = last_at.elapsed().as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / secs;
        info!(
            websocket_connections = websocket.open(),
            messages_in_per_s = format_args!("{:.1}", rate(now.messages_in, last.messages_in)),
            messages_out_per_s = format_args!("{:.1}", rate(now.messages_out, last.messages_out)),
            bytes_in_per_s = format_args!("{:.0}", rate(now.bytes_in, last.bytes_in)),
            bytes_out_per_s = format_args!("{:.0}", rate(now.bytes_out, last.bytes_out)),
            mqtt_connections = mqtt.open(),
            mqtt_publishes_in_per_s = format_args!("{:.1}", rate(now.mqtt_in, last.mqtt_in)),
            mqtt_publishes_out_per_s = format_args!("{:.1}", rate(now.mqtt_out, last.mqtt_out)),
            rss_mib = format_args!("{:.1}", process.map(|p| p.rss_bytes as f64 / 1048576.0).unwrap_or(0.0)),
            cpu_percent = format_args!("{:.1}", (now.cpu_seconds - last.cpu_seconds) / secs * 100.0),
            loop_lag_max_ms = format_args!("{:.1}", metrics.loop_lag.take_max().as_secs_f64() * 1000.0),
            "stats"
        );
        last = now;
        last_at = Instant::now();
    }
}
