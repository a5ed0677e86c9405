//! Latency histograms that can be merged exactly.
//!
//! Percentiles cannot be averaged: the p99 of two workers is not the mean of
//! their p99s. So every figure this tool publishes comes from an HDR histogram,
//! and every histogram travels with its full contents (HdrHistogram's V2
//! deflate encoding, base64) so that workers, processes and whole runs from
//! different machines merge into the histogram a single process would have
//! recorded.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer as HdrDeserializer, Serializer as _, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

/// Three significant figures: 0.1% resolution at every magnitude.
const SIGNIFICANT_FIGURES: u8 = 3;

/// A histogram of durations in microseconds.
#[derive(Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

impl fmt::Debug for Hist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hist(n={}, p50={}us, max={}us)", self.count(), self.percentile(50.0), self.max())
    }
}

impl PartialEq for Hist {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Hist {
    /// An empty histogram that grows to whatever range it is given.
    pub fn new() -> Self {
        let mut h = Histogram::new(SIGNIFICANT_FIGURES).expect("3 significant figures is valid");
        h.auto(true);
        Hist(h)
    }

    /// Records one duration in microseconds (0 is recorded as 0).
    pub fn record(&mut self, micros: u64) {
        // Auto-resizing histograms accept any u64; this cannot fail.
        let _ = self.0.record(micros);
    }

    /// Adds every sample of `other` (exact: bucket counts are summed).
    pub fn merge(&mut self, other: &Hist) {
        // Both sides share the same precision, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value at percentile `p` (0-100), in microseconds; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.0.is_empty() { 0 } else { self.0.value_at_quantile(p / 100.0) }
    }

    pub fn max(&self) -> u64 {
        if self.0.is_empty() { 0 } else { self.0.max() }
    }

    pub fn min(&self) -> u64 {
        if self.0.is_empty() { 0 } else { self.0.min() }
    }

    pub fn mean(&self) -> f64 {
        if self.0.is_empty() { 0.0 } else { self.0.mean() }
    }

    pub fn clear(&mut self) {
        self.0.reset();
    }

    /// Base64 of the V2 deflate encoding: HdrHistogram's own interchange format.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        V2DeflateSerializer::new().serialize(&self.0, &mut bytes).expect("serializing to memory cannot fail");
        STANDARD.encode(bytes)
    }

    pub fn decode(text: &str) -> anyhow::Result<Hist> {
        let bytes = STANDARD.decode(text.trim())?;
        let mut h: Histogram<u64> = HdrDeserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("not an HdrHistogram V2 encoding: {e:?}"))?;
        h.auto(true);
        // Normalise precision so that merging with our own histograms is exact.
        let mut out = Hist::new();
        out.0.add(&h).map_err(|e| anyhow::anyhow!("cannot merge decoded histogram: {e:?}"))?;
        Ok(out)
    }

    /// The readable figures; all but `count` are `None` (JSON `null`) for
    /// an empty histogram, where there is no minimum or percentile to give.
    pub fn summary(&self) -> HistSummary {
        let some = |v| (!self.is_empty()).then_some(v);
        HistSummary {
            count: self.count(),
            min_us: some(self.min()),
            mean_us: (!self.is_empty()).then(|| (self.mean() * 10.0).round() / 10.0),
            p50_us: some(self.percentile(50.0)),
            p90_us: some(self.percentile(90.0)),
            p99_us: some(self.percentile(99.0)),
            p999_us: some(self.percentile(99.9)),
            max_us: some(self.max()),
        }
    }
}

/// The readable part of a histogram in JSON; `hdr` carries the full contents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistSummary {
    pub count: u64,
    pub min_us: Option<u64>,
    pub mean_us: Option<f64>,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    pub max_us: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct HistRepr {
    #[serde(flatten)]
    summary: HistSummary,
    hdr: String,
}

impl Serialize for Hist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        HistRepr { summary: self.summary(), hdr: self.encode() }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Hist {
    /// Only `hdr` is read back: the summary is recomputed, so a hand-edited
    /// summary cannot disagree with the data.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Only {
            hdr: String,
        }
        let only = Only::deserialize(d)?;
        Hist::decode(&only.hdr).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_is_exact_not_an_average_of_percentiles() {
        // Worker A: 990 fast samples; worker B: 10 slow ones.
        let mut a = Hist::new();
        for _ in 0..990 {
            a.record(100);
        }
        let mut b = Hist::new();
        for _ in 0..10 {
            b.record(50_000);
        }
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged.count(), 1000);
        // p99 of the union is the 990th sample: still fast.
        assert_eq!(merged.percentile(99.0), 100);
        // p99.9 is in the slow group; averaging percentiles would give ~25 ms.
        assert!(merged.percentile(99.9) >= 49_950, "{}", merged.percentile(99.9));
        assert_eq!(merged.max(), b.max());
        let averaged = (a.percentile(99.0) + b.percentile(99.0)) / 2;
        assert_ne!(averaged, merged.percentile(99.0));
    }

    #[test]
    fn encoding_round_trips_exactly() {
        let mut h = Hist::new();
        for v in [1, 7, 250, 999, 12_345, 3_600_000_000] {
            h.record(v);
        }
        let back = Hist::decode(&h.encode()).unwrap();
        assert_eq!(back, h);
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains("\"p99_us\""));
        let from_json: Hist = serde_json::from_str(&json).unwrap();
        assert_eq!(from_json, h);
    }

    #[test]
    fn empty_histogram_has_no_figures_rather_than_zeros() {
        let h = Hist::new();
        assert_eq!(h.summary(), HistSummary::default());
        let json: serde_json::Value = serde_json::to_value(&h).unwrap();
        assert_eq!(json["count"], 0);
        for key in ["min_us", "mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert!(json[key].is_null(), "{key}: {json}");
        }
        let back: Hist = serde_json::from_value(json).unwrap();
        assert!(back.is_empty());
        let mut one = Hist::new();
        one.record(0);
        assert_eq!(one.summary().p99_us, Some(0), "a real 0 µs stays 0");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Hist::decode("not base64!").is_err());
        assert!(Hist::decode(&STANDARD.encode(b"HISTFAAAA")).is_err());
    }
}
