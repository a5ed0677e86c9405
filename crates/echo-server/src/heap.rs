//! How many bytes of heap the process holds, counted as they are allocated.
//!
//! The memory budget ([`crate::budget`]) must know, before it lets a client
//! add a publish or a subscription, how much the server already holds. RSS
//! from `/proc` costs a system call and lags behind; glibc's `mallinfo2`
//! walks its free lists. So the global allocator counts: every allocation
//! and free adds its size to a per-thread tally, which is folded into one
//! shared total once it has moved by [`FOLD`] bytes. The hot path touches
//! only its own thread's cell; the shared total is exact to within
//! [`FOLD`] bytes per thread.
//!
//! What is counted is what was asked for (the layouts), not what malloc
//! keeps around it, nor code, stacks and kernel buffers: the budget leaves
//! room for those.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

/// Bytes a thread's tally may drift before it is folded into the total.
const FOLD: isize = 64 * 1024;

static TOTAL: AtomicIsize = AtomicIsize::new(0);

/// The highest [`TOTAL`] since [`take_high_water`] last looked: memory
/// freed within a second of being taken shows here, not in [`in_use`]
/// sampled once a second.
static HIGH: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    // `const`, and no destructor: reading it never allocates and never
    // fails, even while the thread is being torn down.
    static TALLY: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: isize) {
    TALLY.with(|tally| {
        let moved = tally.get() + bytes;
        if moved.abs() >= FOLD {
            let total = TOTAL.fetch_add(moved, Ordering::Relaxed) + moved;
            if moved > 0 {
                HIGH.fetch_max(total, Ordering::Relaxed);
            }
            tally.set(0);
        } else {
            tally.set(moved);
        }
    });
}

/// Heap bytes in use by the whole process, as counted by [`Counting`]
/// (zero in a program that does not use it as its global allocator).
pub fn in_use() -> usize {
    TOTAL.load(Ordering::Relaxed).max(0) as usize
}

/// The most heap in use since the last call (or since start), to within
/// [`FOLD`] bytes per thread; starts the next period at what is in use now.
pub fn take_high_water() -> usize {
    let now = TOTAL.load(Ordering::Relaxed);
    HIGH.swap(now, Ordering::Relaxed).max(now).max(0) as usize
}

/// The system allocator, counting what it hands out.
pub struct Counting;

// SAFETY: every call goes to the system allocator unchanged; the counting
// on the side neither allocates nor touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            add(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            add(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library installs the counter as every binary's allocator (see
    /// lib.rs), unit tests included: a large allocation shows in the total
    /// and leaves it when freed.
    #[test]
    fn allocations_are_counted_and_frees_subtracted() {
        let before = in_use();
        let block = std::hint::black_box(vec![1u8; 32 << 20]);
        let during = in_use();
        assert!(during >= before + (30 << 20), "before {before}, during {during}");
        drop(block);
        // Other tests' threads allocate too; 8 MiB of slack for them.
        assert!(in_use() < during - (24 << 20), "during {during}, after {}", in_use());
    }

    /// A block taken and freed between two looks still shows as the high
    /// water mark of the period, and not in the next one.
    #[test]
    fn the_high_water_mark_remembers_what_was_freed_since() {
        take_high_water();
        let before = in_use();
        drop(std::hint::black_box(vec![1u8; 32 << 20]));
        let high = take_high_water();
        assert!(high >= before + (30 << 20), "before {before}, high {high}");
        assert!(take_high_water() < high - (24 << 20));
    }
}
