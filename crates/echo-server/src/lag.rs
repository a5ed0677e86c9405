//! How late the event loop is: the one figure that tells whether the single
//! thread is keeping up.
//!
//! Every client shares one thread, so anything that holds it — a burst of
//! connects, a large message, a slow system call, the kernel taking the CPU
//! away — delays every other client by as much. The probe asks to be woken
//! every [`PERIOD`] and records how much later than asked it ran: that delay
//! is what any client's event waited on top of its own work. It is the
//! server-side view of a latency spike, so a spike seen by a client can be
//! told apart from one in the client itself or the network.
//!
//! Exported as the histogram `echo_event_loop_lag_seconds` and, per
//! `stats_interval`, as `loop_lag_max_ms` on the stats line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use tracing::debug;

use crate::shutdown::Shutdown;

/// A lag worth a `debug` line (`--log-level info,echo_server::lag=debug`),
/// to find out when the loop was held up.
const NOTABLE: Duration = Duration::from_millis(10);

/// How often the probe runs: short enough that a stall of a few
/// milliseconds is seen, long enough to cost nothing (100 wake-ups a second).
pub const PERIOD: Duration = Duration::from_millis(10);

/// Upper bounds of the histogram's buckets, in seconds. tokio's timers have
/// a resolution of one millisecond, so the first bucket holds "on time".
pub const BUCKETS: [f64; 11] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The probe's figures, shared with the metrics registry and the stats line.
#[derive(Debug)]
pub struct LoopLag {
    pub histogram: Histogram,
    /// Largest lag since the stats line last took it, in microseconds.
    max_us: AtomicU64,
}

impl Default for LoopLag {
    fn default() -> Self {
        LoopLag { histogram: Histogram::new(BUCKETS), max_us: AtomicU64::new(0) }
    }
}

impl LoopLag {
    pub fn record(&self, lag: Duration) {
        self.histogram.observe(lag.as_secs_f64());
        self.max_us.fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
    }

    /// The largest lag since the last call, and starts over.
    pub fn take_max(&self) -> Duration {
        Duration::from_micros(self.max_us.swap(0, Ordering::Relaxed))
    }
}

/// Runs on the event loop until shutdown.
pub async fn probe(lag: Arc<LoopLag>, shutdown: std::rc::Rc<Shutdown>) {
    let mut due = Instant::now() + PERIOD;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        let now = Instant::now();
        let late = now.saturating_duration_since(due);
        lag.record(late);
        if late >= NOTABLE {
            debug!(lag_ms = late.as_millis() as u64, "the event loop ran late");
        }
        // From now, not from `due`: one long stall is one late sample, not
        // a burst of catch-up samples.
        due = now + PERIOD;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_lag_is_taken_once() {
        let lag = LoopLag::default();
        lag.record(Duration::from_millis(3));
        lag.record(Duration::from_millis(12));
        lag.record(Duration::from_millis(1));
        assert_eq!(lag.take_max(), Duration::from_millis(12));
        assert_eq!(lag.take_max(), Duration::ZERO);
    }

    /// A stall on the event loop shows up as the probe's lag, about as long
    /// as the stall.
    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_loop_is_seen_as_lag() {
        let lag = Arc::new(LoopLag::default());
        let shutdown = std::rc::Rc::new(Shutdown::new());
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                tokio::task::spawn_local(probe(lag.clone(), shutdown.clone()));
                tokio::time::sleep(PERIOD * 3).await;
                lag.take_max();
                // Hold the thread for 60 ms, as a long piece of work would.
                std::thread::sleep(Duration::from_millis(60));
                tokio::time::sleep(PERIOD * 2).await;
                let max = lag.take_max();
                assert!(max >= Duration::from_millis(45), "lag {max:?} after a 60 ms stall");
                shutdown.trigger(Duration::ZERO);
            })
            .await;
    }
}
