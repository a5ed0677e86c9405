//! `--start-at`: agents on several machines begin their steps at one
//! wall-clock moment.
//!
//! Each agent checks the server and starts its worker processes first, then
//! waits for the moment, so that what is left to do after it (the first
//! ramp) is the same on every machine. The moment is given as an RFC 3339
//! time or as unix seconds; the clocks of the machines are assumed to agree
//! (NTP keeps them within milliseconds), which is why a moment already past
//! by more than [`LATE_MARGIN`] is refused rather than started late: an
//! agent that begins seconds after the others would measure another load.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer};

/// How far in the past `--start-at` may be and still start (at once): the
/// time an agent launched by hand or by ssh may lose on the way.
pub const LATE_MARGIN: Duration = Duration::from_secs(5);

/// How far ahead `--start-at` may be: more is taken for a mistake (a wrong
/// date or time zone) rather than left waiting for hours.
pub const MAX_AHEAD: Duration = Duration::from_secs(3600);

/// A wall-clock moment to start at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartAt(pub SystemTime);

impl FromStr for StartAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!(
                "invalid start time {s:?}: write an RFC 3339 time such as 2026-12-07T18:00:00Z \
                 (or with an offset, +01:00) or unix seconds such as 1796666400"
            )
        };
        if let Ok(secs) = s.parse::<f64>() {
            if !secs.is_finite() || secs < 0.0 {
                return Err(bad());
            }
            return Duration::try_from_secs_f64(secs).map(|d| StartAt(UNIX_EPOCH + d)).map_err(|_| bad());
        }
        parse_rfc3339(s).map(StartAt).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for StartAt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::scenario::number_or_text(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// RFC 3339 with any offset: humantime reads only UTC (`Z`), so an offset
/// is taken off and applied here.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    if let Some(utc) = s.strip_suffix(['Z', 'z']) {
        return humantime::parse_rfc3339_weak(utc).ok();
    }
    // The offset is the last 6 characters: +HH:MM or -HH:MM.
    let split = s.len().checked_sub(6)?;
    let (local, offset) = (s.get(..split)?, s.get(split..)?);
    let sign = match offset.as_bytes()[0] {
        b'+' => 1i64,
        b'-' => -1,
        _ => return None,
    };
    let (h, m) = offset[1..].split_once(':')?;
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    if h > 23 || m > 59 {
        return None;
    }
    let local = humantime::parse_rfc3339_weak(local).ok()?;
    let offset = Duration::from_secs(h * 3600 + m * 60);
    // 18:00+01:00 is 17:00Z.
    if sign > 0 { local.checked_sub(offset) } else { local.checked_add(offset) }
}

impl StartAt {
    /// How long to wait from `now`: refuses a moment past by more than
    /// [`LATE_MARGIN`] or ahead by more than [`MAX_AHEAD`]; a moment past
    /// by less waits for nothing.
    pub fn wait_from(&self, now: SystemTime) -> Result<Duration, String> {
        match self.0.duration_since(now) {
            Ok(ahead) if ahead > MAX_AHEAD => Err(format!(
                "--start-at {} is {} ahead, more than the {} allowed: check the date and time zone",
                self.rfc3339(),
                humantime::format_duration(round(ahead)),
                humantime::format_duration(MAX_AHEAD)
            )),
            Ok(ahead) => Ok(ahead),
            Err(e) if e.duration() > LATE_MARGIN => Err(format!(
                "--start-at {} was {} ago (more than {} late): agents that start late do not \
                 load the server together; pick a moment a little ahead (and check the clocks agree)",
                self.rfc3339(),
                humantime::format_duration(round(e.duration())),
                humantime::format_duration(LATE_MARGIN)
            )),
            Err(_) => Ok(Duration::ZERO),
        }
    }

    /// The moment in UTC, to the millisecond (as the JSON result records it).
    pub fn rfc3339(&self) -> String {
        humantime::format_rfc3339_millis(self.0).to_string()
    }
}

/// To the tenth of a second, for messages.
fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64 / 100 * 100)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        s.parse::<StartAt>().unwrap_or_else(|e| panic!("{s}: {e}")).0
    }

    #[test]
    fn rfc3339_and_unix_seconds_name_the_same_moment() {
        let want = UNIX_EPOCH + Duration::from_secs(1_796_666_400);
        assert_eq!(at("1796666400"), want);
        assert_eq!(at("2026-12-07T18:00:00Z"), at("1796666400"));
        assert_eq!(at("2026-12-07T19:00:00+01:00"), at("2026-12-07T18:00:00Z"));
        assert_eq!(at("2026-12-07T13:30:00-04:30"), at("2026-12-07T18:00:00Z"));
        assert_eq!(at("2026-12-07 18:00:00z"), at("2026-12-07T18:00:00Z"));
        assert_eq!(at("1796666400.25"), want + Duration::from_millis(250));
        assert_eq!(at("2026-12-07T18:00:00.250Z"), want + Duration::from_millis(250));
        assert_eq!(StartAt(want + Duration::from_millis(250)).rfc3339(), "2026-12-07T18:00:00.250Z");
    }

    #[test]
    fn unreadable_times_say_what_to_write() {
        for bad in [
            "",
            "tomorrow",
            "18:00",
            "2026-12-07",
            "2026-12-07T18:00:00",
            "-5",
            "NaN",
            "1e400",
            "2026-12-07T18:00:00+25:00",
            "2026-12-07T18:00:00+0100",
        ] {
            let e = bad.parse::<StartAt>().expect_err(bad);
            assert!(e.contains("RFC 3339") && e.contains("unix seconds"), "{bad}: {e}");
        }
    }

    #[test]
    fn too_late_or_too_far_ahead_is_refused() {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_666_400);
        let s = |d: i64| {
            StartAt(if d >= 0 {
                now + Duration::from_secs(d as u64)
            } else {
                now - Duration::from_secs((-d) as u64)
            })
        };
        assert_eq!(s(30).wait_from(now), Ok(Duration::from_secs(30)));
        assert_eq!(s(3600).wait_from(now), Ok(Duration::from_secs(3600)));
        assert_eq!(s(0).wait_from(now), Ok(Duration::ZERO));
        // A little late: start at once.
        assert_eq!(s(-5).wait_from(now), Ok(Duration::ZERO));
        let late = s(-6).wait_from(now).unwrap_err();
        assert!(late.contains("6s ago") && late.contains("2026-12-07T17:59:54.000Z"), "{late}");
        let ahead = s(3601).wait_from(now).unwrap_err();
        assert!(ahead.contains("1h 1s ahead") && ahead.contains("time zone"), "{ahead}");
    }
}
