//! When messages are due, and how work is divided.
//!
//! Sending is open-model: message `k` of a connection is *due* at
//! `start + phase + k / rate`, whatever happened to message `k-1`. A sender
//! that fell behind (the server stalled, the socket was full) sends the
//! overdue messages at once, and each one's latency still counts from its due
//! time — the wait is the server's, not the generator's, to account for.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How each connection sends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rate {
    /// Connections only stay open (answering pings): memory scaling.
    Idle,
    /// Open model: this many messages per second per connection, on schedule.
    PerSecond(f64),
    /// Closed loop: keep `in_flight` messages outstanding, send the next as
    /// soon as an echo returns (throughput; latency counts from the send).
    Max,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "max" | "MAX" => Ok(Rate::Max),
            other => match other.parse::<f64>() {
                Ok(0.0) => Ok(Rate::Idle),
                Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSecond(r)),
                Ok(r) if r < 0.0 => Err(format!(
                    "a rate cannot be negative ({s}): give messages per second per connection (0 = idle) or \"max\""
                )),
                _ => Err(format!(
                    "invalid rate {s:?}: expected messages per second per connection (0 = idle) or \"max\""
                )),
            },
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Idle => f.write_str("0"),
            Rate::PerSecond(r) => write!(f, "{r}"),
            Rate::Max => f.write_str("max"),
        }
    }
}

/// The due times of one connection's messages.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    first: Instant,
    interval: Duration,
}

impl Schedule {
    /// `phase` in [0, 1) spreads connections over the interval so that
    /// 10,000 connections at 1 msg/s send 10 per millisecond, not 10,000
    /// in one burst every second.
    pub fn new(start: Instant, rate_per_sec: f64, phase: f64) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate_per_sec);
        Schedule { first: start + interval.mul_f64(phase.clamp(0.0, 1.0)), interval }
    }

    /// When message `seq` is due.
    pub fn due(&self, seq: u64) -> Instant {
        self.first + self.interval.mul_f64(seq as f64)
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// A well-spread phase in [0, 1) for connection `id` (golden-ratio sequence:
/// any number of consecutive ids covers the interval evenly).
pub fn phase(id: u32) -> f64 {
    (id as f64 * 0.618_033_988_749_894_9).fract()
}

/// Splits `total` into `parts` shares that differ by at most one.
pub fn split(total: u64, parts: usize) -> Vec<u64> {
    let parts = parts.max(1) as u64;
    (0..parts).map(|i| total / parts + u64::from(i < total % parts)).collect()
}

/// Parses `1000,2000,5000` or a ramp `1000..19000:2000` (start, end, step;
/// the end is always included) into ascending connection counts.
pub fn parse_steps(s: &str) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((range, step)) = part.split_once(':').and_then(|(r, st)| Some((r.split_once("..")?, st)))
        {
            let (a, b) = range;
            let (a, b, step): (u64, u64, u64) = (num(a)?, num(b)?, num(step)?);
            if step == 0 || a > b {
                return Err(format!(
                    "invalid ramp {part:?}: write START..END:STEP with START <= END and STEP > 0"
                ));
            }
            let mut v = a;
            while v < b {
                out.push(v);
                v += step;
            }
            out.push(b);
        } else {
            out.push(num(part)?);
        }
    }
    if out.is_empty() {
        return Err("no steps given: write e.g. 1000,2000,5000 or 1000..10000:1000".into());
    }
    if out.contains(&0) {
        return Err("a step of 0 connections measures nothing".into());
    }
    if out.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("steps must grow: {out:?} (connections are only ever added)"));
    }
    Ok(out)
}

fn num(s: &str) -> Result<u64, String> {
    let clean: String = s.trim().chars().filter(|c| *c != '_').collect();
    let (digits, mult) = match clean.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1000),
        None => (clean.as_str(), 1),
    };
    digits.parse::<u64>().map(|n| n * mult).map_err(|_| format!("not a connection count: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_open_model() {
        let start = Instant::now();
        let s = Schedule::new(start, 10.0, 0.5);
        assert_eq!(s.interval(), Duration::from_millis(100));
        assert_eq!(s.due(0), start + Duration::from_millis(50));
        // Message 10 is due one second after message 0, no matter when
        // message 9 went out.
        assert_eq!(s.due(10) - s.due(0), Duration::from_secs(1));
    }

    #[test]
    fn phases_spread_evenly() {
        let mut buckets = [0u32; 10];
        for id in 0..10_000 {
            let p = phase(id);
            assert!((0.0..1.0).contains(&p));
            buckets[(p * 10.0) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| (900..=1100).contains(&b)), "{buckets:?}");
    }

    #[test]
    fn split_is_fair_and_exact() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split(19_000, 1), vec![19_000]);
        assert_eq!(split(40_001, 3).iter().sum::<u64>(), 40_001);
    }

    #[test]
    fn steps_parse() {
        assert_eq!(parse_steps("1000,2000,5000").unwrap(), vec![1000, 2000, 5000]);
        assert_eq!(parse_steps("1k,19k").unwrap(), vec![1000, 19000]);
        assert_eq!(parse_steps("0..10:4").unwrap_err(), "a step of 0 connections measures nothing");
        assert_eq!(parse_steps("2..10:4").unwrap(), vec![2, 6, 10]);
        assert_eq!(parse_steps("100").unwrap(), vec![100]);
        assert!(parse_steps("5,3").is_err());
        assert!(parse_steps("").is_err());
        assert!(parse_steps("ten").is_err());
    }

    #[test]
    fn rates_parse() {
        assert_eq!("0".parse::<Rate>().unwrap(), Rate::Idle);
        assert_eq!("max".parse::<Rate>().unwrap(), Rate::Max);
        assert_eq!("2.5".parse::<Rate>().unwrap(), Rate::PerSecond(2.5));
        assert!("-1".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }
}
