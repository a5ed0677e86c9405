//! The result of a run: what the JSON file holds, and how results merge.
//!
//! Raw figures (counters, whole histograms, resource readings) are stored,
//! and the derived ones (rates, per-connection memory, percentiles) are
//! recomputed from them whenever results are built or merged, so a merged
//! file is exactly what one bigger run would have written.

use serde::{Deserialize, Serialize};

use crate::scenario::Settings;
use crate::stats::Tally;
use crate::target::Protocol;
use crate::usage::ServerSample;

pub const SCHEMA: &str = "echo-loadgen/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Always "echo-loadgen/1" for this layout.
    pub schema: String,
    pub tool_version: String,
    pub label: Option<String>,
    pub url: String,
    pub protocol: Protocol,
    /// Unix time the run started (its first step, after any `--start-at` wait).
    pub started_unix: u64,
    /// The same to the millisecond: agents given one `--start-at` show how
    /// close together they began (0 in results of older versions; merged:
    /// the earliest).
    #[serde(default)]
    pub started_unix_ms: u64,
    pub machine: Machine,
    pub settings: Settings,
    /// Server readings before the first connection was opened.
    pub server_baseline: Option<ServerSample>,
    pub steps: Vec<StepResult>,
    /// Threshold violations; empty when the run passed.
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub hostname: String,
    pub cpus: usize,
    /// Worker processes that generated the load (summed over merged runs).
    pub workers: usize,
    /// Runs merged into this one (1 for a plain run).
    pub runs: usize,
    /// Runtime threads, summed over workers (and merged runs): the most CPU
    /// the generator could use, in cores.
    #[serde(default)]
    pub threads: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Connections asked for at this step.
    pub target_connections: u64,
    /// Connections open when the hold ended.
    pub open_connections: u64,
    pub ramp_secs: f64,
    pub hold_secs: f64,
    /// Counted while ramping up to this step: connection attempts, connect
    /// times, connect errors (and messages of the already open connections).
    pub ramp: Tally,
    /// Counted during the hold: messages, latency, errors.
    pub hold: Tally,
    /// Server readings at the end of the hold; `cpu_seconds` is the CPU used
    /// during the hold. `None` without --server-pid/--server-metrics.
    pub server: Option<ServerSample>,
    /// CPU seconds all generator processes used during the hold.
    pub generator_cpu_seconds: f64,
    /// Resident memory of all worker processes at the end of the hold.
    pub generator_rss_bytes: u64,
    /// The server process (--server-pid) had exited by the end of this
    /// step: the run stops after it, and the step's errors say how its
    /// clients saw that.
    #[serde(default)]
    pub server_exited: bool,
    /// `thread_spawn_failed` lines the server's log gained during this
    /// step, ramp and hold (`--server-log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_thread_spawn_failures: Option<u64>,
    /// Figures derived from the above (recomputed on merge).
    pub derived: Derived,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Derived {
    pub sent_per_sec: f64,
    pub received_per_sec: f64,
    /// Errors of the ramp and hold together.
    pub errors: u64,
    /// errors / (connection attempts + messages sent).
    pub error_rate: f64,
    pub server_rss_per_connection: Option<f64>,
    /// Growth of server RSS since the previous step (or the baseline before
    /// the first) divided by the connections added: the marginal cost of a
    /// connection, without the server's fixed memory.
    pub server_rss_per_added_connection: Option<f64>,
    /// Percent of one core.
    pub server_cpu_percent: Option<f64>,
    /// Server CPU microseconds per message echoed (MQTT: per delivery).
    pub server_cpu_us_per_message: Option<f64>,
    /// Server context switches (all threads) per message echoed.
    #[serde(default)]
    pub server_ctxt_switches_per_message: Option<f64>,
    /// Server context switches (all threads) per second of hold: what an
    /// idle step costs in wake-ups.
    #[serde(default)]
    pub server_ctxt_switches_per_sec: Option<f64>,
    /// Percent of one core, summed over worker processes.
    pub generator_cpu_percent: f64,
    pub generator_rss_per_connection: Option<f64>,
}

impl StepResult {
    pub fn derive(&mut self) {
        let hold = self.hold_secs.max(1e-9);
        let errors = self.ramp.error_count() + self.hold.error_count();
        let attempts = self.ramp.attempted + self.hold.attempted + self.hold.sent;
        let open = self.open_connections as f64;
        let per_conn = |bytes: u64| (self.open_connections > 0).then(|| bytes as f64 / open);
        let server = self.server.as_ref();
        self.derived = Derived {
            sent_per_sec: self.hold.sent as f64 / hold,
            received_per_sec: self.hold.received as f64 / hold,
            errors,
            error_rate: if attempts == 0 { 0.0 } else { errors as f64 / attempts as f64 },
            server_rss_per_connection: server.and_then(|s| s.rss_bytes).and_then(per_conn),
            server_rss_per_added_connection: self.derived.server_rss_per_added_connection,
            server_cpu_percent: server.and_then(|s| s.cpu_seconds).map(|c| c / hold * 100.0),
            server_cpu_us_per_message: server
                .and_then(|s| s.cpu_seconds)
                .filter(|_| self.hold.received > 0)
                .map(|c| c * 1e6 / self.hold.received as f64),
            server_ctxt_switches_per_message: server
                .and_then(|s| s.ctxt_switches)
                .filter(|_| self.hold.received > 0)
                .map(|c| c.total() as f64 / self.hold.received as f64),
            server_ctxt_switches_per_sec: server
                .and_then(|s| s.ctxt_switches)
                .map(|c| c.total() as f64 / hold),
            generator_cpu_percent: self.generator_cpu_seconds / hold * 100.0,
            generator_rss_per_connection: per_conn(self.generator_rss_bytes),
        };
    }

    /// Adds the same step of another run (another set of workers or another
    /// machine loading the same server at the same time).
    pub fn merge(&mut self, other: &StepResult) {
        self.target_connections += other.target_connections;
        self.open_connections += other.open_connections;
        self.ramp_secs = self.ramp_secs.max(other.ramp_secs);
        // Rates are per second of hold: parallel runs hold for the same time.
        self.hold_secs = self.hold_secs.max(other.hold_secs);
        self.ramp.merge(&other.ramp);
        self.hold.merge(&other.hold);
        // One server, seen by several generators: any reading describes it.
        if self.server.is_none() {
            self.server = other.server.clone();
        }
        self.generator_cpu_seconds += other.generator_cpu_seconds;
        self.generator_rss_bytes += other.generator_rss_bytes;
        self.server_exited |= other.server_exited;
        // One server's log, seen by several generators: any count describes it.
        self.server_thread_spawn_failures =
            self.server_thread_spawn_failures.or(other.server_thread_spawn_failures);
        self.derive();
    }
}

impl RunResult {
    /// Recomputes every derived figure, including those across steps.
    pub fn derive(&mut self) {
        let mut prev = (0u64, self.server_baseline.as_ref().and_then(|b| b.rss_bytes));
        for s in &mut self.steps {
            s.derive();
            let rss = s.server.as_ref().and_then(|x| x.rss_bytes);
            s.derived.server_rss_per_added_connection = match (prev.1, rss) {
                (Some(before), Some(after)) if s.open_connections > prev.0 => {
                    Some((after as f64 - before as f64) / (s.open_connections - prev.0) as f64)
                }
                _ => None,
            };
            prev = (s.open_connections, rss);
        }
    }

    /// Merges runs that loaded the same server at the same time (from
    /// several machines): step `i` of every run is added up. Runs are
    /// named "file 1", "file 2", ... in errors.
    pub fn merge(runs: Vec<RunResult>) -> Result<RunResult, String> {
        Self::merge_named(runs.into_iter().enumerate().map(|(i, r)| (format!("file {}", i + 1), r)).collect())
    }

    /// [`RunResult::merge`], with each run's name (its file) for errors.
    ///
    /// Only runs of one scenario against one server add up to something
    /// meaningful, so they must agree on everything that shapes the load
    /// or its verdicts (see [`RunResult::same_scenario`]); what may differ
    /// between machines (workers, threads, source addresses, connect rate,
    /// label, topic prefix, probes) is not compared.
    pub fn merge_named(runs: Vec<(String, RunResult)>) -> Result<RunResult, String> {
        let (first_name, first) = runs.first().ok_or("nothing to merge")?;
        // Every run is checked against the first before anything is added
        // up (adding changes the first's step counts).
        for (name, run) in &runs {
            if run.schema != SCHEMA {
                return Err(format!("{name} has schema {:?}, expected {SCHEMA:?}", run.schema));
            }
            if let Err((field, a, b)) = first.same_scenario(run) {
                return Err(format!(
                    "{name} and {first_name} differ in {field} ({b} vs {a}): only runs of the same \
                     scenario against the same server, made at the same time, merge"
                ));
            }
        }
        let mut iter = runs.into_iter().map(|(_, run)| run);
        let mut out = iter.next().expect("checked above");
        for other in iter {
            for (a, b) in out.steps.iter_mut().zip(&other.steps) {
                a.merge(b);
            }
            out.machine.workers += other.machine.workers;
            out.machine.runs += other.machine.runs;
            out.machine.threads += other.machine.threads;
            if out.machine.hostname != other.machine.hostname {
                out.machine.hostname = format!("{}+{}", out.machine.hostname, other.machine.hostname);
            }
            out.failures.extend(other.failures);
            out.started_unix = out.started_unix.min(other.started_unix);
            out.started_unix_ms = out.started_unix_ms.min(other.started_unix_ms);
            if out.server_baseline.is_none() {
                out.server_baseline = other.server_baseline;
            }
        }
        out.derive();
        out.settings.steps = out.steps.iter().map(|s| s.target_connections).collect();
        Ok(out)
    }

    /// Whether `other` loaded the same server with the same scenario; if
    /// not, the first field that differs (its JSON name) and both values.
    ///
    /// Must match: protocol, URL (as written: every machine addresses the
    /// one server the same way), the completed steps and each step's
    /// connection count, hold, rate, in-flight (with `--rate max`), size,
    /// timeout, and for MQTT the QoS, version, pattern and fan-out.
    pub fn same_scenario(&self, other: &RunResult) -> Result<(), (&'static str, String, String)> {
        fn same<T: PartialEq + std::fmt::Display>(
            field: &'static str,
            a: T,
            b: T,
        ) -> Result<(), (&'static str, String, String)> {
            if a == b { Ok(()) } else { Err((field, a.to_string(), b.to_string())) }
        }
        let (a, b) = (&self.settings, &other.settings);
        same("protocol", self.protocol, other.protocol)?;
        same("url", &self.url, &other.url)?;
        same("steps (completed)", self.steps.len(), other.steps.len())?;
        for (x, y) in self.steps.iter().zip(&other.steps) {
            same("steps[].target_connections", x.target_connections, y.target_connections)?;
        }
        same("settings.hold_secs", a.hold_secs, b.hold_secs)?;
        same("settings.rate", a.rate, b.rate)?;
        if a.rate == crate::schedule::Rate::Max {
            same("settings.in_flight", a.in_flight, b.in_flight)?;
        }
        same("settings.size", a.size, b.size)?;
        same("settings.timeout_secs", a.timeout_secs, b.timeout_secs)?;
        if self.protocol == Protocol::Mqtt {
            same("settings.qos", a.qos, b.qos)?;
            same("settings.mqtt_version", a.mqtt_version, b.mqtt_version)?;
            same("settings.pattern", a.pattern, b.pattern)?;
            if a.pattern == crate::scenario::Pattern::Fanout {
                same("settings.fanout", a.fanout, b.fanout)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::scenario::{MqttVersion, Pattern};
    use crate::schedule::Rate;

    pub fn step(target: u64, sent: u64, latencies: &[u64]) -> StepResult {
        let mut hold = Tally { sent, received: latencies.len() as u64, ..Default::default() };
        for &l in latencies {
            hold.latency.record(l);
        }
        let mut s = StepResult {
            target_connections: target,
            open_connections: target,
            ramp_secs: 1.0,
            hold_secs: 10.0,
            ramp: Tally { attempted: target, connected: target, ..Default::default() },
            hold,
            server: Some(ServerSample {
                rss_bytes: Some(target * 10_000),
                cpu_seconds: Some(2.0),
                open_fds: None,
                connections: Some(target),
                threads: Some(1),
                ctxt_switches: Some(crate::usage::ContextSwitches { voluntary: 900, involuntary: 100 }),
            }),
            generator_cpu_seconds: 1.0,
            generator_rss_bytes: target * 5_000,
            server_exited: false,
            server_thread_spawn_failures: None,
            derived: Derived::default(),
        };
        s.derive();
        s
    }

    pub fn run(steps: Vec<StepResult>) -> RunResult {
        RunResult {
            schema: SCHEMA.into(),
            tool_version: "test".into(),
            label: Some("test".into()),
            url: "ws://127.0.0.1:1/".into(),
            protocol: Protocol::WebSocket,
            started_unix: 0,
            started_unix_ms: 0,
            machine: Machine { hostname: "h".into(), cpus: 2, workers: 1, runs: 1, threads: 1 },
            settings: Settings {
                url: "ws://127.0.0.1:1/".into(),
                steps: steps.iter().map(|s| s.target_connections).collect(),
                hold_secs: 10.0,
                connect_rate: 100.0,
                connect_concurrency: None,
                rate: Rate::PerSecond(1.0),
                in_flight: 1,
                size: 64,
                timeout_secs: 10.0,
                connect_timeout_secs: 10.0,
                qos: 0,
                mqtt_version: MqttVersion::V311,
                pattern: Pattern::Echo,
                fanout: 10,
                pipeline_subscribe: false,
                topic_prefix: "t".into(),
                sources: vec![],
                start_at: None,
                label: None,
            },
            server_baseline: Some(ServerSample { rss_bytes: Some(500_000), ..Default::default() }),
            steps,
            failures: vec![],
        }
    }

    #[test]
    fn derived_figures() {
        let mut s = step(1000, 10_000, &[100; 9_990]);
        s.ramp.errors.insert("connect_refused".into(), 10);
        s.derive();
        let d = &s.derived;
        assert_eq!(d.sent_per_sec, 1000.0);
        assert_eq!(d.received_per_sec, 999.0);
        assert_eq!(d.errors, 10);
        assert!((d.error_rate - 10.0 / 11_000.0).abs() < 1e-12);
        assert_eq!(d.server_rss_per_connection, Some(10_000.0));
        assert_eq!(d.server_cpu_percent, Some(20.0));
        assert!((d.server_cpu_us_per_message.unwrap() - 2e6 / 9_990.0).abs() < 1e-6);
        assert_eq!(d.generator_cpu_percent, 10.0);
        assert_eq!(d.generator_rss_per_connection, Some(5_000.0));
        assert!((d.server_ctxt_switches_per_message.unwrap() - 1000.0 / 9_990.0).abs() < 1e-9);
        assert_eq!(d.server_ctxt_switches_per_sec, Some(100.0));
        // Idle: switches per second, none per message.
        let idle = step(1000, 0, &[]);
        assert_eq!(idle.derived.server_ctxt_switches_per_message, None);
        assert_eq!(idle.derived.server_ctxt_switches_per_sec, Some(100.0));
    }

    #[test]
    fn marginal_memory_per_connection_excludes_the_fixed_part() {
        let mut r = run(vec![step(100, 0, &[]), step(300, 0, &[])]);
        r.derive();
        // Baseline 500 kB; 100 connections → 1 MB; 300 → 3 MB.
        assert_eq!(r.steps[0].derived.server_rss_per_added_connection, Some(5_000.0));
        assert_eq!(r.steps[1].derived.server_rss_per_added_connection, Some(10_000.0));
    }

    #[test]
    fn runs_merge_step_by_step_exactly() {
        let a = run(vec![step(100, 1000, &[100; 1000]), step(200, 2000, &[200; 2000])]);
        let b = run(vec![step(100, 1000, &[10_000; 10]), step(200, 2000, &[300; 2000])]);
        let m = RunResult::merge(vec![a, b.clone()]).unwrap();
        assert_eq!(m.settings.steps, vec![200, 400]);
        assert_eq!(m.machine.runs, 2);
        let s0 = &m.steps[0];
        assert_eq!(s0.open_connections, 200);
        assert_eq!(s0.hold.latency.count(), 1010);
        assert_eq!(s0.hold.latency.percentile(99.0), 100);
        assert!(s0.hold.latency.max() >= 10_000);
        assert_eq!(s0.derived.sent_per_sec, 200.0);
        // Server readings are not doubled: both runs watched one server.
        assert_eq!(s0.server.as_ref().unwrap().rss_bytes, Some(1_000_000));
        assert_eq!(s0.derived.server_rss_per_connection, Some(5_000.0));
        assert_eq!(s0.generator_cpu_seconds, 2.0);
        let c = run(vec![step(1, 1, &[1])]);
        assert!(RunResult::merge(vec![b, c]).unwrap_err().contains("steps"));
    }

    #[test]
    fn merge_refuses_runs_of_different_scenarios_naming_the_field() {
        fn base() -> RunResult {
            run(vec![step(100, 1000, &[100; 1000]), step(200, 2000, &[200; 2000])])
        }
        fn mqtt() -> RunResult {
            let mut r = base();
            r.protocol = Protocol::Mqtt;
            r.url = "mqtt://127.0.0.1:1883".into();
            r.settings.url = r.url.clone();
            r
        }
        type Make = fn() -> RunResult;
        type Change = fn(&mut RunResult);
        let cases: Vec<(Make, Change, &str)> = vec![
            (base, |r| r.protocol = Protocol::Mqtt, "protocol"),
            (base, |r| r.url = "ws://127.0.0.1:2/".into(), "url"),
            (base, |r| r.steps[1].target_connections = 300, "steps[].target_connections"),
            (base, |r| drop(r.steps.pop()), "steps (completed)"),
            (base, |r| r.settings.hold_secs = 20.0, "settings.hold_secs"),
            (base, |r| r.settings.rate = Rate::Max, "settings.rate"),
            (base, |r| r.settings.size = 128, "settings.size"),
            (base, |r| r.settings.timeout_secs = 1.0, "settings.timeout_secs"),
            (mqtt, |r| r.settings.qos = 1, "settings.qos"),
            (mqtt, |r| r.settings.mqtt_version = MqttVersion::V5, "settings.mqtt_version (5 vs 3.1.1"),
            (mqtt, |r| r.settings.pattern = Pattern::Fanout, "settings.pattern"),
        ];
        for (make, change, field) in cases {
            let mut other = make();
            change(&mut other);
            let err = RunResult::merge(vec![make(), other]).unwrap_err();
            let field = if field.contains('(') { field.to_string() } else { format!("{field} (") };
            assert!(err.contains(&format!("differ in {field}")), "{field}: {err}");
            assert!(err.starts_with("file 2 and file 1"), "{err}");
        }
        // A WebSocket run and an MQTT QoS 1 run against "the same" address.
        let mut q1 = mqtt();
        q1.settings.qos = 1;
        assert!(
            RunResult::merge(vec![base(), q1])
                .unwrap_err()
                .contains("differ in protocol (mqtt vs websocket)")
        );
        // What may differ between machines does not stop a merge.
        let mut other = base();
        other.label = Some("machine b".into());
        other.machine.hostname = "b".into();
        other.settings.connect_rate = 5000.0;
        other.settings.sources = vec!["127.0.0.2".parse().unwrap()];
        other.settings.topic_prefix = "other".into();
        other.settings.in_flight = 4; // only matters with --rate max
        assert!(RunResult::merge(vec![base(), other]).is_ok());
        // In-flight does matter in a closed loop; fan-out with --pattern fanout.
        let closed = || {
            let mut r = base();
            r.settings.rate = Rate::Max;
            r
        };
        let mut more = closed();
        more.settings.in_flight = 4;
        assert!(RunResult::merge(vec![closed(), more]).unwrap_err().contains("settings.in_flight"));
        let fan = || {
            let mut r = mqtt();
            r.settings.pattern = Pattern::Fanout;
            r
        };
        let mut wider = fan();
        wider.settings.fanout = 50;
        assert!(RunResult::merge(vec![fan(), wider]).unwrap_err().contains("settings.fanout (50 vs 10)"));
        // The schema of the first file is checked too.
        let mut old = base();
        old.schema = "echo-loadgen/0".into();
        assert!(RunResult::merge(vec![old, base()]).unwrap_err().contains("file 1 has schema"));
    }

    #[test]
    fn json_round_trip_keeps_histograms() {
        let r = run(vec![step(10, 100, &[5, 50, 500])]);
        let json = serde_json::to_string_pretty(&r).unwrap();
        let back: RunResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}

/// Durations in JSON as seconds, like the rest of the result files
/// (`#[serde(with = "crate::result::secs")]`).
pub(crate) mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}
