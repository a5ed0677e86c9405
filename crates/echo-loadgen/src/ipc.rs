//! What the coordinating process and its workers say to each other: one
//! JSON object per line, commands on the worker's stdin, events on its
//! stdout. Histograms travel whole, so merging in the parent is exact.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::histogram::Hist;
use crate::scenario::Settings;
use crate::stats::Tally;
use crate::target::Target;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// The first line: what to run.
    Init {
        worker: u32,
        run_id: String,
        settings: Box<Settings>,
        target: Target,
        sources: Vec<IpAddr>,
        threads: usize,
        /// Nice level to run at (0: the parent's).
        #[serde(default)]
        nice: i32,
    },
    /// Open connections until this worker holds `connections` (its share of
    /// the step), `connect_rate` per second, and with `max_pending` at most
    /// that many attempts not yet ready or failed at a time.
    Ramp {
        connections: u64,
        connect_rate: f64,
        #[serde(default)]
        max_pending: Option<u64>,
    },
    /// Start the measured interval (discard what was counted since the ramp ended).
    Hold,
    /// End the measured interval and report it.
    EndHold,
    /// Close every connection and exit.
    Stop,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Ready,
    /// About once a second: running totals and the latency since the last tick.
    Tick {
        open: u64,
        attempted: u64,
        sent: u64,
        received: u64,
        errors: u64,
        latency: Hist,
    },
    /// The ramp is done: everything counted since the previous hold ended.
    Ramped {
        tally: Tally,
    },
    /// The hold is done: what was counted during it and what it cost.
    Held {
        tally: Tally,
        open: u64,
        cpu_seconds: f64,
        rss_bytes: u64,
    },
    Stopped {
        cpu_seconds: f64,
    },
    Failed {
        reason: String,
    },
}
