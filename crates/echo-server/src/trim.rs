//! Giving freed memory back to the operating system.
//!
//! glibc's malloc returns memory to the OS on `free` only from the top of
//! its heaps. What thousands of clients (or one attacker) held and then let
//! go stays resident while anything allocated later sits above it: after
//! 2,000 connections with 64 KiB client ids had been refused and gone, the
//! server still had 158 MiB resident, against 6 MiB before them; glibc's
//! `malloc_trim` (which also releases whole free pages inside the heaps)
//! brought it to 10 MiB. So every [`PERIOD`] the server looks at how far
//! its heap (as [`heap`] counts it) has fallen since the last trim, and
//! trims when it has fallen far enough: a quiet or steady server never
//! trims, one that has just shed a crowd does once. Waiting for malloc's
//! free memory to pass a fixed mark instead left 11 MiB resident after a
//! client with 1,000 wildcard filters had gone, three times what the
//! server held before it came.
//!
//! Trimming walks glibc's free chunks on the event loop; it is timed into
//! `echo_memory_trim_seconds`, so what it costs every client is on
//! `/metrics`. Other C libraries (musl) and other systems: nothing is done.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::budget::MemoryBudget;
use crate::heap;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

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

/// How often the heap is looked at: two atomic operations ([`heap`]).
const PERIOD: Duration = Duration::from_millis(250);

/// Trims for a fallen heap are at least this far apart, so that a busy
/// server whose heap swings does not trim at every look.
const FALL_TRIMS_APART: Duration = Duration::from_secs(1);

/// Freed bytes (the heap's fall from its high-water mark since the last
/// trim) below which nothing is done.
const FREED_FLOOR: usize = 1 << 20;

/// Free bytes held by malloc above which they are given back while the
/// memory budget is pressed, whether or not the heap has just fallen:
/// what malloc holds free is resident and counts against the limit like
/// the rest (a crowd refused by the budget left RSS 74 MiB over the heap
/// for seconds, past its 256 MiB limit; looking once a second instead of
/// every [`PERIOD`] still let it pass the limit by 19 MiB for a second
/// when 36 of its clients left at once).
const PRESSED_FREE: usize = 16 << 20;

/// Every [`PERIOD`], trims when the heap has fallen by [`freed_enough`]
/// from its high-water mark since the last trim (a crowd or one large
/// client has just let go of memory), or when the budget is pressed and
/// malloc holds more than [`PRESSED_FREE`] free; until shutdown. A steady
/// server, whose heap moves by less, never trims.
pub async fn run(metrics: Arc<Metrics>, budget: Rc<MemoryBudget>, shutdown: Rc<Shutdown>) {
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut high = heap::in_use();
    let mut last = high;
    let mut waited = 0;
    let mut trimmed = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = ticks.tick() => {}
        }
        let now = heap::in_use();
        high = high.max(heap::take_high_water());
        // A client with many filters is freed over several router turns:
        // trimming half-way would leave the rest of its memory resident
        // until the heap falls far enough again. So wait (a little) until
        // the heap has stopped falling.
        let falling = still_falling(last, now) && waited < MAX_WAIT;
        last = now;
        let fell = freed_enough(high, now) && !falling && trimmed.elapsed() >= FALL_TRIMS_APART;
        waited = if falling { waited + 1 } else { 0 };
        if !fell && !budget.pressed() {
            continue;
        }
        let Some(free) = free_bytes() else { continue };
        if fell || free > PRESSED_FREE {
            high = now;
            let started = Instant::now();
            trimmed = started;
            let released = trim();
            let took = started.elapsed();
            metrics.memory_trim_seconds.observe(took.as_secs_f64());
            debug!(free_bytes = free, released, took_us = took.as_micros() as u64, "gave freed memory back");
        }
    }
}

/// Looks a trim waits for the heap to stop falling.
const MAX_WAIT: u32 = 8;

/// Whether the heap fell since the last look by more than a sixteenth of
/// [`FREED_FLOOR`]: memory is still being let go of.
fn still_falling(last: usize, now: usize) -> bool {
    last.saturating_sub(now) > FREED_FLOOR / 16
}

/// Whether the heap's fall from `high` to `now` is worth a trim: at least
/// [`FREED_FLOOR`], and at least 1/32 of the heap, so that a large server
/// whose heap swings by a few MiB does not trim every second.
fn freed_enough(high: usize, now: usize) -> bool {
    high - now >= FREED_FLOOR.max(now / 32)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_fall_of_a_mebibyte_or_a_thirty_second_of_the_heap() {
        assert!(!freed_enough(20 << 20, 20 << 20));
        assert!(!freed_enough((21 << 20) - 1, 20 << 20));
        assert!(freed_enough(21 << 20, 20 << 20));
        // A 1 GiB heap: a 16 MiB swing is not enough, 32 MiB is.
        assert!(!freed_enough((1 << 30) + (16 << 20), 1 << 30));
        assert!(freed_enough((1 << 30) + (32 << 20), 1 << 30));
    }
}
