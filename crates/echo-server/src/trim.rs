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

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::budget::MemoryBudget;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How often glibc's free memory is looked at.
const PERIOD: Duration = Duration::from_secs(10);

/// Free bytes held by malloc above which they are given back.
const THRESHOLD: usize = 16 << 20;

/// Allocations at least this large get pages of their own from the OS,
/// which go back the moment they are freed.
const MMAP_THRESHOLD: usize = 128 * 1024;

/// Large buffers (a 1 MB publish, a WebSocket message) go back to the OS
/// as soon as they are freed. glibc starts with the same 128 KiB
/// threshold but raises it to the size of each such block freed, up to
/// 32 MiB; from then on large buffers come from the heaps and stay
/// resident when freed until the next trim. A crowd sending 1 MB publishes
/// that the memory budget refused left RSS 35 MiB above the heap, at the
/// budget's edge (`loadtest/hostile.sh --only crowd`). Fixing the threshold
/// costs an `mmap` and a `munmap` per large buffer.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn return_large_buffers_at_once() {
    // SAFETY: mallopt only changes the allocator's settings.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn return_large_buffers_at_once() {}

/// How often glibc's free memory is looked at while the memory budget is
/// pressed: what malloc holds free is resident, and counts against the
/// limit like the rest (a crowd refused by the budget left RSS 74 MiB over
/// the heap for seconds, past its 256 MiB limit).
const PRESSED_PERIOD: Duration = Duration::from_secs(1);

/// Looks every [`PERIOD`] (every [`PRESSED_PERIOD`] while the memory
/// budget is pressed) and trims when glibc holds more than [`THRESHOLD`]
/// free, until shutdown.
pub async fn run(metrics: Arc<Metrics>, budget: Rc<MemoryBudget>, shutdown: Rc<Shutdown>) {
    let mut ticks = tokio::time::interval(PRESSED_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = ticks.tick() => {}
        }
        if last.elapsed() < PERIOD && !budget.pressed() {
            continue;
        }
        last = Instant::now();
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
