//! A scenario: every setting of a run, from a TOML file and the command line.
//!
//! One struct is both the clap arguments and the file format, so a setting
//! cannot exist in one place and not the other, and its name is the same in
//! both (`--connect-rate 500` on the command line is `connect-rate = 500` in
//! `loadtest/scenarios/*.toml`). The command line wins over the file; what
//! neither sets takes the defaults documented in `--help`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Deserializer, Serialize};

use crate::schedule::{Rate, parse_steps};
use crate::start::StartAt;

/// Connection counts to hold, ascending (`--steps`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Steps(pub Vec<u64>);

impl FromStr for Steps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_steps(s).map(Steps)
    }
}

impl<'de> Deserialize<'de> for Steps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            List(Vec<u64>),
            One(u64),
        }
        let text = match Repr::deserialize(d)? {
            Repr::Text(s) => s,
            Repr::List(v) => v.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            Repr::One(n) => n.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Local source addresses (`--source 127.0.0.2-127.0.0.9,127.0.1.1`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sources(pub Vec<IpAddr>);

impl FromStr for Sources {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad =
                || format!("invalid source address {part:?}: write 127.0.0.2 or a range 127.0.0.2-127.0.0.9");
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = match (a.trim().parse::<IpAddr>(), b.trim().parse::<IpAddr>()) {
                        (Ok(IpAddr::V4(a)), Ok(IpAddr::V4(b))) if u32::from(a) <= u32::from(b) => (a, b),
                        _ => return Err(bad()),
                    };
                    if u32::from(b) - u32::from(a) >= 4096 {
                        return Err(format!("source range {part:?} is larger than 4096 addresses"));
                    }
                    out.extend((u32::from(a)..=u32::from(b)).map(|n| IpAddr::V4(n.into())));
                }
                None => out.push(part.parse().map_err(|_| bad())?),
            }
        }
        if out.is_empty() {
            return Err("no source address given".into());
        }
        Ok(Sources(out))
    }
}

impl<'de> Deserialize<'de> for Sources {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            List(Vec<String>),
        }
        let text = match Repr::deserialize(d)? {
            Repr::Text(s) => s,
            Repr::List(v) => v.join(","),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum MqttVersion {
    #[value(name = "3.1.1", alias = "3", alias = "4")]
    #[serde(rename = "3.1.1", alias = "3", alias = "4")]
    V311,
    #[value(name = "5")]
    #[serde(rename = "5")]
    V5,
}

impl MqttVersion {
    /// The protocol level CONNECT carries, as the codec takes it.
    pub fn level(self) -> u8 {
        match self {
            MqttVersion::V311 => 4,
            MqttVersion::V5 => echo_mqtt_wire::V5,
        }
    }
}

impl std::fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        })
    }
}

/// How MQTT clients are arranged (WebSocket always echoes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Each client subscribes to its own topic and publishes to it.
    Echo,
    /// Groups of one publisher and `--fanout` subscribers share a topic.
    Fanout,
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pattern::Echo => "echo",
            Pattern::Fanout => "fanout",
        })
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map(Some).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
    number_or_text(d)?.parse().map(Some).map_err(serde::de::Error::custom)
}

/// A scenario value written either as a TOML number or as a string (`rate
/// = 10` or `rate = "max"`), as the text its command-line flag would take.
pub(crate) fn number_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Text(String),
    }
    Ok(match Repr::deserialize(d)? {
        Repr::Num(n) => n.to_string(),
        Repr::Text(s) => s,
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 10s, 2m)"))
}

/// Every setting of a run. `None` means "not set here".
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Scenario {
    /// Server to measure: ws://HOST:PORT/PATH (WebSocket echo) or mqtt://HOST:PORT (MQTT broker).
    #[arg(value_name = "URL")]
    pub url: Option<String>,

    /// Connection levels to hold, e.g. 1000,2000,5000 or a ramp 1000..19000:2000 [default: 100].
    #[arg(short = 'c', long, value_name = "N,N,...")]
    pub steps: Option<Steps>,

    /// How long each level is held and measured (alias --duration) [default: 10s].
    #[arg(long, visible_alias = "duration", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(default, alias = "duration", deserialize_with = "duration")]
    pub hold: Option<Duration>,

    /// New connections per second while ramping up to the next level [default: 1000].
    #[arg(long, value_name = "PER_SEC")]
    pub connect_rate: Option<f64>,

    /// At most this many connection attempts in flight (not yet ready or failed) while ramping; with a high --connect-rate the server's pace sets the ramp's [default: no limit].
    #[arg(long, value_name = "N")]
    pub connect_concurrency: Option<u64>,

    /// Messages per second per connection; 0 = idle connections, max = closed loop as fast as echoes return [default: 1].
    #[arg(short, long, value_name = "PER_SEC|max")]
    #[serde(default, deserialize_with = "rate")]
    pub rate: Option<Rate>,

    /// With --rate max: messages each connection keeps in flight [default: 1].
    #[arg(long, value_name = "N")]
    pub in_flight: Option<u32>,

    /// Payload size in bytes, at least 24 (the header with sequence number and timestamp) [default: 64].
    #[arg(short, long, value_name = "BYTES")]
    pub size: Option<usize>,

    /// A message not echoed within this time is an error (echo_timeout) and its connection is given up [default: 10s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,

    /// Limit for TCP connect plus handshake (and MQTT CONNACK/SUBACK) [default: 10s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,

    /// MQTT quality of service for publish and subscribe [default: 0].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2), value_name = "0|1|2")]
    pub qos: Option<u8>,

    /// MQTT protocol version [default: 3.1.1].
    #[arg(long, value_name = "VERSION")]
    pub mqtt_version: Option<MqttVersion>,

    /// MQTT arrangement: echo (own topic) or fanout (1 publisher, N subscribers per topic) [default: echo].
    #[arg(long, value_name = "PATTERN")]
    pub pattern: Option<Pattern>,

    /// With --pattern fanout: subscribers per topic [default: 10].
    #[arg(long, value_name = "N")]
    pub fanout: Option<u32>,

    /// MQTT: write SUBSCRIBE right behind CONNECT, without waiting for CONNACK (one read per client for the broker instead of two).
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub pipeline_subscribe: Option<bool>,

    /// MQTT topic prefix; topics are PREFIX/RUN/WORKER/N [default: echo-loadgen].
    #[arg(long, value_name = "TOPIC")]
    pub topic_prefix: Option<String>,

    /// Worker processes [default: enough for the open-file limit].
    #[arg(short, long, value_name = "N")]
    pub workers: Option<usize>,

    /// Runtime threads per worker [default: CPUs / workers, at least 1].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Local addresses to connect from, e.g. 127.0.0.2-127.0.0.9 (more ports than one address has).
    #[arg(long, value_name = "ADDRS")]
    pub source: Option<Sources>,

    /// PID of the server on this machine: sample its RSS, CPU and open files from /proc at every step,
    /// summed with those of its child processes (a supervisor's workers).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Prometheus text endpoint of the server (http://HOST:PORT/metrics), sampled at every step;
    /// series of one name with different labels (a supervisor's worker="N") add up.
    #[arg(long, value_name = "URL")]
    pub server_metrics: Option<String>,

    /// The server's log file: the `thread_spawn_failed` lines it gains during each step are counted
    /// (what loadtest/peers write when a connection's thread cannot be created).
    #[arg(long, value_name = "FILE")]
    pub server_log: Option<PathBuf>,

    /// Fail (exit 3) when errors / (connection attempts + messages sent) exceeds this fraction in any step.
    #[arg(long, value_name = "FRACTION")]
    pub max_error_rate: Option<f64>,

    /// Fail (exit 3) when the latency p99 of any step exceeds this, e.g. 50ms.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    #[serde(default, deserialize_with = "duration")]
    pub max_p99: Option<Duration>,

    /// Begin the first step at this wall-clock moment, e.g. 2026-12-07T18:00:00Z or unix seconds: agents on several machines given the same moment load the server together (their results `merge`). The server is checked and the workers started first; a moment more than 5s past or 1h ahead is refused.
    #[arg(long, value_name = "TIME")]
    pub start_at: Option<StartAt>,

    /// A name for this run (the server's name, say), shown in reports and charts.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,

    /// Write the result as JSON (the format `merge` reads).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the per-step table as CSV.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,

    /// Draw latency percentiles and server memory against connections (SVG).
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
}

impl Scenario {
    /// Reads a scenario file; relative output paths stay relative to the
    /// working directory, like the same flags on the command line.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read scenario {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("invalid scenario {}: {e}", path.display()))
    }

    /// Settings from `self` where set, else from `base`.
    pub fn over(self, base: Scenario) -> Scenario {
        macro_rules! pick {
            ($($f:ident),*) => { Scenario { $($f: self.$f.or(base.$f)),* } };
        }
        pick!(
            url,
            steps,
            hold,
            connect_rate,
            connect_concurrency,
            rate,
            in_flight,
            size,
            timeout,
            connect_timeout,
            qos,
            mqtt_version,
            pattern,
            fanout,
            pipeline_subscribe,
            topic_prefix,
            workers,
            threads,
            source,
            server_pid,
            server_metrics,
            server_log,
            max_error_rate,
            max_p99,
            start_at,
            label,
            json,
            csv,
            chart
        )
    }
}

/// The resolved settings a run uses (and the JSON report records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub url: String,
    pub steps: Vec<u64>,
    pub hold_secs: f64,
    pub connect_rate: f64,
    /// Attempts in flight at most while ramping (`None`: no limit).
    #[serde(default)]
    pub connect_concurrency: Option<u64>,
    pub rate: Rate,
    pub in_flight: u32,
    pub size: usize,
    pub timeout_secs: f64,
    pub connect_timeout_secs: f64,
    pub qos: u8,
    pub mqtt_version: MqttVersion,
    pub pattern: Pattern,
    pub fanout: u32,
    /// SUBSCRIBE written with CONNECT, before CONNACK.
    #[serde(default)]
    pub pipeline_subscribe: bool,
    pub topic_prefix: String,
    pub sources: Vec<IpAddr>,
    /// `--start-at`, in UTC to the millisecond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<String>,
    pub label: Option<String>,
}

impl Settings {
    /// Applies defaults and refuses settings that cannot work.
    pub fn resolve(s: &Scenario) -> Result<Settings, String> {
        let url = s
            .url
            .clone()
            .ok_or("no URL: give ws://HOST:PORT/PATH or mqtt://HOST:PORT (or url = ... in the scenario)")?;
        let websocket =
            url.trim().split_once("://").is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("ws"));
        let mqtt_only: Vec<&str> = [
            ("--qos", s.qos.is_some()),
            ("--mqtt-version", s.mqtt_version.is_some()),
            ("--pattern", s.pattern.is_some()),
            ("--fanout", s.fanout.is_some()),
            ("--pipeline-subscribe", s.pipeline_subscribe.is_some()),
            ("--topic-prefix", s.topic_prefix.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        if websocket && !mqtt_only.is_empty() {
            let (verb, them) = if mqtt_only.len() == 1 { ("applies", "it") } else { ("apply", "them") };
            return Err(format!(
                "{} {verb} to MQTT only, but {url} is a WebSocket URL: leave {them} out (also from the scenario \
                 file), or give an mqtt://HOST:PORT URL",
                mqtt_only.join(", ")
            ));
        }
        if let Some(m) = s.max_error_rate
            && !(0.0..=1.0).contains(&m)
        {
            return Err(format!(
                "--max-error-rate {m} is not a fraction between 0 and 1 (0.01 allows 1% errors; 0 none)"
            ));
        }
        // Refused before anything is checked or started: a moment already
        // gone (or hours away) is a mistake in the command, not in the server.
        if let Some(at) = s.start_at {
            at.wait_from(std::time::SystemTime::now())?;
        }
        let settings = Settings {
            url,
            steps: s.steps.clone().map(|s| s.0).unwrap_or_else(|| vec![100]),
            hold_secs: s.hold.unwrap_or(Duration::from_secs(10)).as_secs_f64(),
            connect_rate: s.connect_rate.unwrap_or(1000.0),
            connect_concurrency: s.connect_concurrency,
            rate: s.rate.unwrap_or(Rate::PerSecond(1.0)),
            in_flight: s.in_flight.unwrap_or(1),
            size: s.size.unwrap_or(64),
            timeout_secs: s.timeout.unwrap_or(Duration::from_secs(10)).as_secs_f64(),
            connect_timeout_secs: s.connect_timeout.unwrap_or(Duration::from_secs(10)).as_secs_f64(),
            qos: s.qos.unwrap_or(0),
            mqtt_version: s.mqtt_version.unwrap_or(MqttVersion::V311),
            pattern: s.pattern.unwrap_or(Pattern::Echo),
            fanout: s.fanout.unwrap_or(10),
            pipeline_subscribe: s.pipeline_subscribe.unwrap_or(false),
            topic_prefix: s.topic_prefix.clone().unwrap_or_else(|| "echo-loadgen".into()),
            sources: s.source.clone().map(|s| s.0).unwrap_or_default(),
            start_at: s.start_at.map(|at| at.rfc3339()),
            label: s.label.clone(),
        };
        settings.check()?;
        Ok(settings)
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        use crate::payload::HEADER_LEN;
        if self.size < HEADER_LEN {
            return Err(format!(
                "--size {} is too small: each message carries a {HEADER_LEN}-byte header (sequence number, timestamp)",
                self.size
            ));
        }
        if self.size > 16 << 20 {
            return Err(format!("--size {} is larger than 16 MiB", self.size));
        }
        if !(self.connect_rate > 0.0 && self.connect_rate.is_finite()) {
            return Err("--connect-rate must be a positive number of connections per second".into());
        }
        if self.connect_concurrency == Some(0) {
            return Err("--connect-concurrency must be at least 1 attempt in flight".into());
        }
        if self.hold_secs.is_nan() || self.hold_secs <= 0.0 {
            return Err("--hold must be longer than 0s".into());
        }
        if self.in_flight == 0 {
            return Err("--in-flight must be at least 1".into());
        }
        if self.qos > 2 {
            return Err("--qos must be 0, 1 or 2".into());
        }
        if self.fanout == 0 {
            return Err("--fanout must be at least 1 subscriber per topic".into());
        }
        if self.pattern == Pattern::Fanout {
            self.check_fanout_groups()?;
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#']) {
            return Err("--topic-prefix must be a non-empty topic without wildcards".into());
        }
        Ok(())
    }

    /// Fan-out clients come in groups of 1 publisher + `fanout`
    /// subscribers: a step must be whole groups, or its last clients would
    /// be subscribers without a publisher (waiting for nothing, checking
    /// nothing).
    fn check_fanout_groups(&self) -> Result<(), String> {
        let group = u64::from(self.fanout) + 1;
        let what = format!(
            "--pattern fanout --fanout {} puts 1 publisher and {} subscribers on each topic, {group} connections",
            self.fanout, self.fanout
        );
        for &step in &self.steps {
            if step < group {
                let smaller =
                    if step >= 2 { format!(", or --fanout {} or less", step - 1) } else { String::new() };
                return Err(format!(
                    "a step of {step} connection(s) is less than one fan-out group: {what}: use --steps {group} \
                     (or a multiple of {group}){smaller}"
                ));
            }
            if step % group != 0 {
                let (down, up) = (step / group * group, step.div_ceil(group) * group);
                return Err(format!(
                    "a step of {step} connections is not a whole number of fan-out groups ({what}); the last {} \
                     would be subscribers without a publisher: use {down} or {up} instead (every step a multiple of {group})",
                    step % group
                ));
            }
        }
        Ok(())
    }

    pub fn hold(&self) -> Duration {
        Duration::from_secs_f64(self.hold_secs)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_secs)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }

    pub fn max_connections(&self) -> u64 {
        *self.steps.last().unwrap_or(&0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    #[command(allow_negative_numbers = true)]
    struct Cli {
        #[command(flatten)]
        s: Scenario,
    }

    #[test]
    fn file_and_command_line_use_the_same_names_and_the_command_line_wins() {
        let file: Scenario = toml::from_str(
            r#"
            url = "ws://127.0.0.1:8080/"
            steps = "1000,2000"
            hold = "30s"
            connect-rate = 500
            rate = "max"
            in-flight = 4
            source = "127.0.0.2-127.0.0.4"
            max-p99 = "50ms"
            "#,
        )
        .unwrap();
        let cli = Cli::parse_from(["x", "--hold", "5s", "--rate", "2"]).s;
        let s = Settings::resolve(&cli.over(file)).unwrap();
        assert_eq!(s.steps, vec![1000, 2000]);
        assert_eq!(s.hold_secs, 5.0);
        assert_eq!(s.rate, Rate::PerSecond(2.0));
        assert_eq!(s.connect_rate, 500.0);
        assert_eq!(s.in_flight, 4);
        assert_eq!(s.sources.len(), 3);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Scenario>("stepz = 1").is_err());
        assert!(toml::from_str::<Scenario>("hold = \"soon\"").is_err());
        assert!(toml::from_str::<Scenario>("steps = [3, 2]").is_err());
        let s = Scenario { url: Some("ws://x:1/".into()), size: Some(8), ..Default::default() };
        assert!(Settings::resolve(&s).unwrap_err().contains("header"));
        assert!(Settings::resolve(&Scenario::default()).unwrap_err().contains("no URL"));
    }

    #[test]
    fn mqtt_flags_with_a_websocket_url_are_refused() {
        let ws = |args: &[&str]| {
            let mut argv = vec!["x", "ws://127.0.0.1:8080/"];
            argv.extend(args);
            Settings::resolve(&Cli::parse_from(argv).s)
        };
        let e = ws(&["--qos", "1"]).unwrap_err();
        assert!(
            e.starts_with("--qos applies to MQTT only, but ws://127.0.0.1:8080/ is a WebSocket URL"),
            "{e}"
        );
        let e = ws(&["--pattern", "fanout", "--fanout", "5", "--mqtt-version", "5", "--topic-prefix", "t"])
            .unwrap_err();
        assert!(
            e.starts_with("--mqtt-version, --pattern, --fanout, --topic-prefix apply to MQTT only"),
            "{e}"
        );
        assert!(
            ws(&["--pipeline-subscribe"])
                .unwrap_err()
                .starts_with("--pipeline-subscribe applies to MQTT only")
        );
        assert!(ws(&["--rate", "5"]).is_ok());
        // The same flags with an MQTT URL are fine.
        let s =
            Cli::parse_from(["x", "mqtt://127.0.0.1", "--qos", "1", "--pattern", "fanout", "--steps", "11"])
                .s;
        assert!(Settings::resolve(&s).is_ok());
        let s = Cli::parse_from(["x", "mqtt://127.0.0.1", "--pipeline-subscribe"]).s;
        assert!(Settings::resolve(&s).unwrap().pipeline_subscribe);
        let s = Cli::parse_from(["x", "mqtt://127.0.0.1"]).s;
        assert!(!Settings::resolve(&s).unwrap().pipeline_subscribe, "off unless asked for");
        // From a scenario file, too.
        let file: Scenario = toml::from_str("pipeline-subscribe = true").unwrap();
        assert_eq!(file.pipeline_subscribe, Some(true));
        let file: Scenario = toml::from_str("qos = 2").unwrap();
        let cli = Cli::parse_from(["x", "WS://127.0.0.1:1/"]).s;
        assert!(Settings::resolve(&cli.over(file)).unwrap_err().contains("--qos applies to MQTT only"));
    }

    #[test]
    fn fanout_steps_must_be_whole_groups() {
        let fanout = |steps: &str, fanout: &str| {
            let argv = ["x", "mqtt://127.0.0.1", "--pattern", "fanout", "--steps", steps, "--fanout", fanout];
            Settings::resolve(&Cli::parse_from(argv).s)
        };
        let e = fanout("5", "10").unwrap_err();
        assert!(e.starts_with("a step of 5 connection(s) is less than one fan-out group"), "{e}");
        assert!(e.contains("use --steps 11 (or a multiple of 11), or --fanout 4 or less"), "{e}");
        let e = fanout("22,30", "10").unwrap_err();
        assert!(e.contains("a step of 30 connections is not a whole number of fan-out groups"), "{e}");
        assert!(
            e.contains("the last 8 would be subscribers without a publisher: use 22 or 33 instead"),
            "{e}"
        );
        assert!(fanout("11,22,5500", "10").is_ok());
        assert!(fanout("5100", "50").is_ok());
        // The echo pattern has no groups.
        let echo = Cli::parse_from(["x", "mqtt://127.0.0.1", "--steps", "5", "--fanout", "10"]).s;
        assert!(Settings::resolve(&echo).is_ok());
    }

    #[test]
    fn negative_numbers_get_a_clear_message() {
        let err = |args: &[&str]| match Cli::try_parse_from(args) {
            Ok(cli) => Settings::resolve(&cli.s).unwrap_err(),
            Err(e) => e.to_string(),
        };
        let e = err(&["x", "ws://h:1/", "--rate", "-1"]);
        assert!(e.contains("--rate") && e.contains("cannot be negative"), "{e}");
        assert!(!e.contains("unexpected argument"), "{e}");
        let e = err(&["x", "ws://h:1/", "--connect-rate", "-5"]);
        assert!(e.contains("--connect-rate must be a positive number"), "{e}");
        let e = err(&["x", "ws://h:1/", "--size", "-1"]);
        assert!(e.contains("invalid value '-1' for '--size"), "{e}");
        let e = err(&["x", "ws://h:1/", "--max-error-rate", "-1"]);
        assert!(e.contains("not a fraction between 0 and 1"), "{e}");
        let e = err(&["x", "ws://h:1/", "--steps", "-5"]);
        assert!(e.contains("invalid value '-5' for '--steps"), "{e}");
    }

    #[test]
    fn sources_expand_ranges() {
        let s: Sources = "127.0.0.2-127.0.0.9".parse().unwrap();
        assert_eq!(s.0.len(), 8);
        assert!("127.0.0.9-127.0.0.2".parse::<Sources>().is_err());
        assert!("nonsense".parse::<Sources>().is_err());
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../loadtest/scenarios");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                let s = Scenario::load(&e.path()).unwrap();
                let mqtt = e.file_name().to_string_lossy().starts_with("mqtt-");
                let url = if mqtt { "mqtt://127.0.0.1:1" } else { "ws://127.0.0.1:1/" };
                let s = Scenario { url: s.url.or(Some(url.into())), ..s };
                Settings::resolve(&s).unwrap_or_else(|e| panic!("{}: {e}", e));
            }
        }
    }
}
