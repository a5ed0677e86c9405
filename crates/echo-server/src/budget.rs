//! The server's memory budget (`server.memory_limit`): past it, the server
//! takes on nothing new, so that no crowd of clients can make it grow
//! without end.
//!
//! Per-client caps (`mqtt::caps`) bound what one client can make the server
//! hold, but not what a hundred can: each may keep unreleased QoS 2
//! publishes, subscriptions, retained messages, a session that outlives
//! it. Like Mosquitto's `memory_limit`, the budget is checked where a
//! client asks the server to hold more, and refused there:
//!
//! | what | refused with |
//! |---|---|
//! | a new WebSocket connection | HTTP 503 |
//! | a CONNECT | CONNACK 0x97 quota exceeded (3.1.1: 3 server unavailable) |
//! | a PUBLISH at QoS 1 or 2 | PUBACK / PUBREC 0x97 (3.1.1: the client is closed) |
//! | a PUBLISH at QoS 0 | dropped (at most once allows it) |
//! | a SUBSCRIBE's filters | SUBACK 0x97 (3.1.1: 0x80) |
//! | more of an MQTT packet or WebSocket message larger than [`PAUSE_PARTIAL`] | not read until there is room, for at most [`PAUSE_LIMIT`] (then MQTT 5 DISCONNECT 0x97, WebSocket close 1013) |
//! | more of an HTTP request body larger than [`PAUSE_PARTIAL`] (the HTTP echo) | HTTP 503 |
//!
//! Everything already held keeps working: acknowledgements, unsubscribes,
//! disconnects and WebSocket echoes, which free memory rather than take it.
//!
//! The heap is what is counted ([`crate::heap`]): it is known exactly and
//! at once, where RSS lags behind. What the router thread will allocate for
//! work it has been handed but not done yet is not in the heap yet: a
//! SUBSCRIBE is charged what its filters will cost ([`subscription_cost`])
//! from the moment it is let through until its SUBACK comes back
//! ([`Charges`]); without that, a hundred clients' SUBSCRIBEs, let through
//! in the instant before the router had taken any, grew the server to three
//! times its limit. RSS is the heap plus code, thread stacks
//! and what malloc has freed but not yet given back ([`crate::trim`]), so
//! the heap is refused more at [`MemoryBudget::threshold`]: the limit less
//! what the process held besides its heap at start, and less an eighth for
//! malloc's slack.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::episode::Episodes;
use crate::heap;
use crate::metrics::Count;
use crate::process::ProcessStats;

/// While the budget is spent, a client in the middle of a packet larger
/// than this is not read further (its sends wait in the kernel's buffers):
/// a hundred clients each half-way through a 1 MiB publish would otherwise
/// add a hundred MiB that nothing checked.
pub const PAUSE_PARTIAL: usize = 64 * 1024;

/// How long a client may stay paused that way before it is closed (MQTT 5:
/// DISCONNECT 0x97), so that the memory its session holds comes back.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(10);

/// The smallest `server.memory_limit` accepted: the server itself, idle,
/// is about 10 MiB.
pub const MIN_LIMIT: u64 = 32 << 20;

/// Which request the budget refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    pub what: &'static str,
}

/// The budget and its refusals.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    threshold: usize,
    refusals: Family<RefusalLabel, Count>,
    /// Whether an episode of refusals may be in progress (so that an
    /// unspent budget costs one load and one flag per check).
    refusing: Cell<bool>,
    /// Bytes charged for work handed to the router and not yet answered.
    charged: Cell<usize>,
    episodes: RefCell<Episodes>,
}

impl MemoryBudget {
    /// A budget of `limit` bytes (0: three quarters of what the process may
    /// use, see [`available_memory`]), measured against the process as it
    /// is now.
    pub fn new(limit: u64, refusals: Family<RefusalLabel, Count>) -> MemoryBudget {
        let limit = if limit == 0 { available_memory().map_or(u64::MAX, |m| m / 4 * 3) } else { limit };
        let besides_heap =
            ProcessStats::read().map_or(0, |stats| stats.rss_bytes.saturating_sub(heap::in_use() as u64));
        let threshold = limit.saturating_sub(besides_heap).saturating_sub(limit / 8);
        MemoryBudget {
            limit,
            threshold: usize::try_from(threshold).unwrap_or(usize::MAX),
            refusals,
            refusing: Cell::new(false),
            charged: Cell::new(0),
            episodes: RefCell::default(),
        }
    }

    /// No budget: for tests that build servers by hand.
    pub fn unlimited() -> MemoryBudget {
        MemoryBudget::new(u64::MAX, Family::default())
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Heap bytes at which the server takes on nothing new.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Whether the budget is spent. One atomic load: cheap enough for
    /// every publish.
    pub fn spent(&self) -> bool {
        heap::in_use() + self.charged.get() >= self.threshold
    }

    /// Whether the heap is past three quarters of the threshold: time to
    /// give back what malloc holds free more often (see `trim`).
    pub fn pressed(&self) -> bool {
        heap::in_use() + self.charged.get() >= self.threshold / 4 * 3
    }

    /// Whether `what` may go ahead; if not, the refusal is counted (and the
    /// first of an episode logged).
    pub fn allows(&self, what: &'static str) -> bool {
        if !self.spent() {
            if self.refusing.get() {
                self.note_quiet();
            }
            return true;
        }
        self.refusing.set(true);
        self.refusals.get_or_create(&RefusalLabel { what }).inc();
        if self.episodes.borrow_mut().hit(Instant::now(), 1) {
            warn!(
                heap_bytes = heap::in_use(),
                limit_bytes = self.limit,
                first_refused = what,
                "memory budget spent (server.memory_limit): refusing new connections, publishes and subscriptions until clients let go"
            );
        }
        false
    }

    /// Ends the episode of refusals, with a line saying how many, once the
    /// budget has had room for a while.
    fn note_quiet(&self) {
        let Ok(mut episodes) = self.episodes.try_borrow_mut() else {
            return;
        };
        if let Some(ended) = episodes.end_if_quiet(Instant::now()) {
            self.refusing.set(false);
            info!(
                refused = ended.hits,
                lasted_ms = ended.lasted.as_millis() as u64,
                "memory budget has room again"
            );
        }
    }
}

/// The error a paused client's read fails with after [`PAUSE_LIMIT`].
#[derive(Debug, thiserror::Error)]
#[error("paused by the memory budget for too long")]
pub struct PausedTooLong;

/// Whether `error` is [`PausedTooLong`].
pub fn is_paused_too_long(error: &std::io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<PausedTooLong>())
}

/// Whether the client has closed its end (or the connection failed), asked
/// of the kernel without reading: for a client that is not being read
/// because of the budget, which would otherwise hold a departed client, and
/// what it holds, until the pause ends. One `poll` system call.
pub fn peer_gone(socket: &impl std::os::fd::AsRawFd) -> bool {
    let mut pollfd = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, owned by this stack frame; timeout 0.
    let ready = unsafe { libc::poll(&mut pollfd, 1, 0) };
    ready > 0 && pollfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// What the router will hold for one subscription filter of `len` bytes:
/// the filter is copied into several of its maps, each entry with its own
/// bookkeeping. Measured on the heap: 20,000 filters of 1,000 bytes took
/// 8.5 KB each, 500,000 of 8 bytes 1.4 KB each; this errs above both.
pub fn subscription_cost(len: usize) -> usize {
    1_500 + 8 * len
}

/// One session's charges against the budget, by the packet id of the
/// SUBSCRIBE they are for; whatever is still charged when the session ends
/// is given back.
#[derive(Debug)]
pub struct Charges<'a> {
    budget: &'a MemoryBudget,
    pending: Vec<(u16, usize)>,
}

impl<'a> Charges<'a> {
    pub fn new(budget: &'a MemoryBudget) -> Charges<'a> {
        Charges { budget, pending: Vec::new() }
    }

    /// Charges `bytes` until [`Charges::settle`] is called with `pkid`.
    pub fn charge(&mut self, pkid: u16, bytes: usize) {
        self.budget.charged.set(self.budget.charged.get() + bytes);
        self.pending.push((pkid, bytes));
    }

    /// The router has answered `pkid`: what it allocated is in the heap.
    pub fn settle(&mut self, pkid: u16) {
        if let Some(at) = self.pending.iter().position(|&(p, _)| p == pkid) {
            let (_, bytes) = self.pending.swap_remove(at);
            self.budget.charged.set(self.budget.charged.get() - bytes);
        }
    }
}

impl Drop for Charges<'_> {
    fn drop(&mut self) {
        let left: usize = self.pending.iter().map(|&(_, bytes)| bytes).sum();
        self.budget.charged.set(self.budget.charged.get() - left);
    }
}

/// What the process may use: its cgroup's memory limit when it has one
/// (a container started with `--memory`), else the machine's RAM.
pub fn available_memory() -> Option<u64> {
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok());
    let ram = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| parse_mem_total(&m));
    match (cgroup, ram) {
        (Some(c), Some(r)) => Some(c.min(r)),
        (c, r) => c.or(r),
    }
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total() {
        let meminfo = "MemTotal:       24604852 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24604852 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert!(available_memory().is_some_and(|m| m > 64 << 20), "this machine has RAM");
    }

    #[test]
    fn a_budget_leaves_room_for_what_is_not_heap() {
        let budget = MemoryBudget::new(1 << 30, Family::default());
        assert_eq!(budget.limit(), 1 << 30);
        assert!(budget.threshold() <= (1 << 30) - (1 << 27), "an eighth is kept for malloc");
        assert!(budget.allows("test"));
        let auto = MemoryBudget::new(0, Family::default());
        assert!(auto.limit() < available_memory().unwrap());
    }

    #[test]
    fn charges_count_until_settled_or_dropped() {
        let budget = MemoryBudget::new(1 << 30, Family::default());
        let room = budget.threshold() - heap::in_use();
        let mut charges = Charges::new(&budget);
        charges.charge(1, room / 2);
        assert!(!budget.spent());
        charges.charge(2, room);
        assert!(budget.spent(), "the heap and the charges together");
        charges.settle(2);
        assert!(!budget.spent());
        charges.charge(3, room);
        drop(charges);
        assert!(!budget.spent(), "a session's charges end with it");
        assert_eq!(budget.charged.get(), 0);
    }

    #[test]
    fn a_spent_budget_refuses_and_counts() {
        let refusals = Family::<RefusalLabel, Count>::default();
        // A limit the heap is already over once the share for the rest
        // of the process is taken off.
        let budget = MemoryBudget::new(MIN_LIMIT / 4, refusals.clone());
        let _held = vec![7u8; 8 << 20];
        assert!(budget.spent());
        assert!(!budget.allows("publish"));
        assert!(!budget.allows("publish"));
        assert_eq!(refusals.get_or_create(&RefusalLabel { what: "publish" }).get(), 2);
    }
}
