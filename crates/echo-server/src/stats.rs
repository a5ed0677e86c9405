//! The server's figures over time, for people: the periodic `info` summary
//! line (one per `stats_interval`, whatever the number of clients: there is
//! no per-connection line at `info`), and the live view the page reads at
//! `/.stats` (a sample every [`SAMPLE_INTERVAL`], the last [`HISTORY`]
//! kept; see `ws::live`).
//!
//! Both take the same [`Snapshot`]s of the counters and compute rates and
//! CPU with the one [`Rates::between`], so the page and the log line can
//! never disagree on what "messages per second" means.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::info;

use crate::listener::ConnectionLimit;
use crate::metrics::Metrics;
use crate::process::Usage;
use crate::shutdown::Shutdown;

/// How often the live view takes a sample: two small `/proc` reads and a
/// few counter loads, whether or not a page is looking.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples the live view keeps: five minutes, for the page's chart.
pub(crate) const HISTORY: usize = 300;

/// Counter values at one moment, for computing rates.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    at: Instant,
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    mqtt_in: u64,
    mqtt_out: u64,
    cpu_seconds: f64,
    rss_bytes: u64,
}

impl Snapshot {
    fn take(metrics: &Metrics) -> Snapshot {
        let ws = &metrics.websocket;
        let usage = Usage::read().unwrap_or_default();
        Snapshot {
            at: Instant::now(),
            messages_in: ws.text_received.get() + ws.binary_received.get(),
            messages_out: ws.messages_echoed(),
            bytes_in: ws.bytes_received.get(),
            bytes_out: ws.bytes_sent.get(),
            mqtt_in: metrics.mqtt.publishes_received.get(),
            mqtt_out: metrics.mqtt.publishes_sent.get(),
            cpu_seconds: usage.cpu_seconds,
            rss_bytes: usage.rss_bytes,
        }
    }
}

/// What happened per second between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Rates {
    pub messages_in_per_s: f64,
    pub messages_out_per_s: f64,
    pub bytes_in_per_s: f64,
    pub bytes_out_per_s: f64,
    pub mqtt_publishes_in_per_s: f64,
    pub mqtt_publishes_out_per_s: f64,
    /// CPU time used over wall time, in percent of one core.
    pub cpu_percent: f64,
}

impl Rates {
    fn between(earlier: &Snapshot, later: &Snapshot) -> Rates {
        let secs = later.at.duration_since(earlier.at).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        Rates {
            messages_in_per_s: rate(later.messages_in, earlier.messages_in),
            messages_out_per_s: rate(later.messages_out, earlier.messages_out),
            bytes_in_per_s: rate(later.bytes_in, earlier.bytes_in),
            bytes_out_per_s: rate(later.bytes_out, earlier.bytes_out),
            mqtt_publishes_in_per_s: rate(later.mqtt_in, earlier.mqtt_in),
            mqtt_publishes_out_per_s: rate(later.mqtt_out, earlier.mqtt_out),
            cpu_percent: ((later.cpu_seconds - earlier.cpu_seconds) / secs * 100.0).max(0.0),
        }
    }

    /// Rounded to a tenth, for JSON a person reads (the log line formats
    /// its own).
    fn rounded(self) -> Rates {
        let r = |x: f64| (x * 10.0).round() / 10.0;
        Rates {
            messages_in_per_s: r(self.messages_in_per_s),
            messages_out_per_s: r(self.messages_out_per_s),
            bytes_in_per_s: self.bytes_in_per_s.round(),
            bytes_out_per_s: self.bytes_out_per_s.round(),
            mqtt_publishes_in_per_s: r(self.mqtt_publishes_in_per_s),
            mqtt_publishes_out_per_s: r(self.mqtt_publishes_out_per_s),
            cpu_percent: r(self.cpu_percent),
        }
    }
}

/// The connections open now: the same two counts the log line reports.
#[derive(Debug, Clone)]
pub(crate) struct Connections {
    /// Every connection on the WebSocket port (echo sessions, MQTT over
    /// WebSocket, SSE streams, HTTP keep-alive).
    pub websocket: Rc<ConnectionLimit>,
    /// Every MQTT connection, over TCP or WebSocket.
    pub mqtt: Rc<ConnectionLimit>,
}

/// Ticks every `period`, the first a period from now; a tick missed
/// while the loop was busy is not made up for.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// Waits for the next tick; `false` once the shutdown has started.
async fn tick(ticker: &mut tokio::time::Interval, shutdown: &Shutdown) -> bool {
    tokio::select! {
        _ = shutdown.wait() => false,
        _ = ticker.tick() => true,
    }
}

/// Logs the summary line every `interval` (never when it is zero).
pub(crate) async fn run(
    interval: Duration,
    metrics: Arc<Metrics>,
    connections: Connections,
    shutdown: Rc<Shutdown>,
) {
    if interval.is_zero() {
        return;
    }
    let mut ticker = ticker(interval);
    let mut last = Snapshot::take(&metrics);
    while tick(&mut ticker, &shutdown).await {
        let now = Snapshot::take(&metrics);
        let rates = Rates::between(&last, &now);
        info!(
            websocket_connections = connections.websocket.open(),
            messages_in_per_s = format_args!("{:.1}", rates.messages_in_per_s),
            messages_out_per_s = format_args!("{:.1}", rates.messages_out_per_s),
            bytes_in_per_s = format_args!("{:.0}", rates.bytes_in_per_s),
            bytes_out_per_s = format_args!("{:.0}", rates.bytes_out_per_s),
            mqtt_connections = connections.mqtt.open(),
            mqtt_publishes_in_per_s = format_args!("{:.1}", rates.mqtt_publishes_in_per_s),
            mqtt_publishes_out_per_s = format_args!("{:.1}", rates.mqtt_publishes_out_per_s),
            rss_mib = format_args!("{:.1}", now.rss_bytes as f64 / 1048576.0),
            cpu_percent = format_args!("{:.1}", rates.cpu_percent),
            loop_lag_max_ms = format_args!("{:.1}", metrics.loop_lag.take_max().as_secs_f64() * 1000.0),
            "stats"
        );
        last = now;
    }
}

/// One sample of the live view: the connections at its end, the rates over
/// the [`SAMPLE_INTERVAL`] before it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// When it was taken, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub websocket_connections: u64,
    pub mqtt_connections: u64,
    #[serde(flatten)]
    pub rates: Rates,
    pub rss_bytes: u64,
}

/// The live view: the last [`HISTORY`] samples, and their JSON once asked
/// for (built at most once per sample, however many pages poll).
#[derive(Debug)]
pub(crate) struct Live {
    /// Whether the page's MQTT tab can connect (`mqtt.websocket`, and the
    /// broker running).
    mqtt_over_websocket: bool,
    samples: RefCell<VecDeque<Sample>>,
    json: RefCell<Option<Rc<[u8]>>>,
}

/// What `/.stats` answers: the latest sample, and the history as columns
/// (one array per figure, oldest first, a sample every `interval_ms`, the
/// last one being `now`), which keeps five minutes of them to about 10 KB.
#[derive(Serialize)]
struct View<'a> {
    interval_ms: u64,
    mqtt_over_websocket: bool,
    /// `null` until the first sample (a second after the start).
    now: Option<&'a Sample>,
    history: History,
}

#[derive(Serialize, Default)]
struct History {
    websocket_connections: Vec<u64>,
    mqtt_connections: Vec<u64>,
    messages_in_per_s: Vec<f64>,
    mqtt_publishes_in_per_s: Vec<f64>,
    rss_bytes: Vec<u64>,
    cpu_percent: Vec<f64>,
}

impl Live {
    pub(crate) fn new(mqtt_over_websocket: bool) -> Rc<Live> {
        Rc::new(Live {
            mqtt_over_websocket,
            samples: RefCell::new(VecDeque::with_capacity(HISTORY)),
            json: RefCell::new(None),
        })
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.borrow_mut();
        if samples.len() == HISTORY {
            samples.pop_front();
        }
        samples.push_back(sample);
        self.json.take();
    }

    /// The view as JSON (`/.stats`).
    pub(crate) fn json(&self) -> Rc<[u8]> {
        if let Some(json) = &*self.json.borrow() {
            return json.clone();
        }
        let samples = self.samples.borrow();
        let mut history = History::default();
        for s in samples.iter() {
            history.websocket_connections.push(s.websocket_connections);
            history.mqtt_connections.push(s.mqtt_connections);
            history.messages_in_per_s.push(s.rates.messages_in_per_s);
            history.mqtt_publishes_in_per_s.push(s.rates.mqtt_publishes_in_per_s);
            history.rss_bytes.push(s.rss_bytes);
            history.cpu_percent.push(s.rates.cpu_percent);
        }
        let view = View {
            interval_ms: SAMPLE_INTERVAL.as_millis() as u64,
            mqtt_over_websocket: self.mqtt_over_websocket,
            now: samples.back(),
            history,
        };
        let mut bytes = serde_json::to_vec(&view).expect("numbers and strings serialize");
        bytes.push(b'\n');
        let json: Rc<[u8]> = bytes.into();
        *self.json.borrow_mut() = Some(json.clone());
        json
    }
}

/// Takes a sample into `live` every [`SAMPLE_INTERVAL`] until shutdown.
pub(crate) async fn sample(
    live: Rc<Live>,
    metrics: Arc<Metrics>,
    connections: Connections,
    shutdown: Rc<Shutdown>,
) {
    let mut ticker = ticker(SAMPLE_INTERVAL);
    let mut last = Snapshot::take(&metrics);
    while tick(&mut ticker, &shutdown).await {
        let now = Snapshot::take(&metrics);
        live.push(Sample {
            time_ms: unix_ms(),
            websocket_connections: connections.websocket.open(),
            mqtt_connections: connections.mqtt.open(),
            rates: Rates::between(&last, &now).rounded(),
            rss_bytes: now.rss_bytes,
        });
        last = now;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(at: Instant, messages_in: u64, cpu_seconds: f64) -> Snapshot {
        Snapshot {
            at,
            messages_in,
            messages_out: messages_in,
            bytes_in: 0,
            bytes_out: 0,
            mqtt_in: 0,
            mqtt_out: 0,
            cpu_seconds,
            rss_bytes: 0,
        }
    }

    #[test]
    fn rates_are_per_second_of_wall_time() {
        let t = Instant::now();
        let rates = Rates::between(&snapshot(t, 100, 1.0), &snapshot(t + Duration::from_secs(2), 400, 1.5));
        assert_eq!(rates.messages_in_per_s, 150.0);
        assert_eq!(rates.messages_out_per_s, 150.0);
        assert_eq!(rates.cpu_percent, 25.0);
        // A counter never goes back; if a reading did, the rate is 0, not negative.
        let rates = Rates::between(&snapshot(t, 100, 2.0), &snapshot(t + Duration::from_secs(1), 50, 1.0));
        assert_eq!((rates.messages_in_per_s, rates.cpu_percent), (0.0, 0.0));
    }

    /// Figures as long as a busy server's.
    fn sample(n: u64) -> Sample {
        let rates = Rates {
            messages_in_per_s: 123456.25,
            mqtt_publishes_in_per_s: 12345.67,
            cpu_percent: 99.87,
            ..Rates::default()
        };
        Sample {
            time_ms: 1_800_000_000_000 + n,
            websocket_connections: 100_000 + n,
            mqtt_connections: 100_000,
            rates: rates.rounded(),
            rss_bytes: 1_500_000_000,
        }
    }

    #[test]
    fn the_view_keeps_the_last_five_minutes_as_columns() {
        let live = Live::new(true);
        let empty: serde_json::Value = serde_json::from_slice(&live.json()).unwrap();
        assert!(empty["now"].is_null() && empty["history"]["rss_bytes"] == serde_json::json!([]));
        for n in 0..HISTORY as u64 + 5 {
            live.push(sample(n));
        }
        let json = live.json();
        assert!(Rc::ptr_eq(&json, &live.json()), "built once per sample");
        let view: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(view["now"]["websocket_connections"], 100_000 + HISTORY as u64 + 4);
        assert_eq!(view["now"]["messages_in_per_s"], 123456.3);
        assert_eq!(view["now"]["cpu_percent"], 99.9);
        assert_eq!(view["mqtt_over_websocket"], true);
        let connections = view["history"]["websocket_connections"].as_array().unwrap();
        assert_eq!(
            (connections.len(), connections[0].as_u64()),
            (HISTORY, Some(100_005)),
            "oldest dropped first"
        );
        assert!(json.len() < 16 * 1024, "the page polls it every second: {} bytes", json.len());
        live.push(sample(1000));
        assert!(!Rc::ptr_eq(&json, &live.json()), "a new sample, a new view");
    }
}
