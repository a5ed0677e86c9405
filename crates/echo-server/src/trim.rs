//! Giving freed memory back to the operating system.
//!
//! glibc's malloc returns memory to the OS on `free` only from the top of
//! its heaps. What thousands of clients (or one attacker) held and then let
//! go stays resident while anything allocated later sits above it: after
//! 2,000 connections with 64 KiB client ids had been refused and gone, the
//! server still had 158 MiB resident, against 6 MiB before them; glibc's
//! `malloc_trim` (which also releases whole free pages inside the heaps)
//! brought it to 10 MiB. So every [`PERIOD`] the server looks at how much
//! glibc holds free, and trims when that is over [`THRESHOLD`]: a quiet or
//! steady server never trims, one that has just shed a crowd does once.
//!
//! Trimming walks glibc's free chunks on the event loop; it is timed into
//! `echo_memory_trim_seconds`, so what it costs every client is on
//! `/metrics`. Other C libraries (musl) and other systems: nothing is done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How often glibc's free memory is looked at.
const PERIOD: Duration = Duration::from_secs(10);

/// Free bytes held by malloc above which they are given back.
const THRESHOLD: usize = 16 << 20;

/// Looks every [`PERIOD`] and trims when glibc holds more than
/// [`THRESHOLD`] free, until shutdown.
pub async fn run(metrics: Arc<Metrics>, shutdown: std::rc::Rc<Shutdown>) {
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = ticks.tick() => {}
        }
        if let Some(free) = free_bytes()
            && free > THRESHOLD
        {
            let started = Instant::now();
            let released = trim();
            let took = started.elapsed();
            metrics.memory_trim_seconds.observe(took.as_secs_f64());
            debug!(free_bytes = free, released, took_us = took.as_micros() as u64, "gave freed memory back");
        }
    }
}

/// Bytes malloc holds free in its heaps, where that can be asked.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_bytes() -> Option<usize> {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    Some(info.fordblks)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_bytes() -> Option<usize> {
    None
}

/// Releases free memory to the OS; whether any was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim is thread-safe and only returns free pages.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}
