//! The open-file limit, and the connection capacity that follows from it.
//!
//! Every client socket is a file descriptor, so `RLIMIT_NOFILE` — not memory,
//! not CPU — is what usually caps how many clients one process serves. At
//! start the server raises its soft limit to the hard limit (the most an
//! unprivileged process may do) and derives its default connection capacity
//! from the result, so that when the limit is what stops new clients, the
//! logs and metrics say so instead of the server appearing to fail.

use rlimit::Resource;

/// File descriptors kept out of the connection capacity: standard streams,
/// the epoll instance and its wake-up pipe, listeners, admin connections,
/// `/proc` reads, and the brief sockets used to send a 503 when full.
pub const RESERVED_FDS: u64 = 64;

/// The descriptor table is presized up to this many descriptors (2 MiB of
/// kernel memory): enough for any limit this server is tested at, and not a
/// waste where the limit is a million (containers' default) and most of it
/// is never used.
pub const PRESIZE_MAX: u64 = 1 << 18;

/// The open-file limit as found at start and as raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    /// The soft limit the process was started with.
    pub initial_soft: u64,
    /// The soft limit in effect now.
    pub soft: u64,
    /// The hard limit: the most the soft limit can be raised to.
    pub hard: u64,
}

impl FileLimit {
    /// Raises the soft limit to the hard limit and reports both. Never fails:
    /// if the limit cannot be read or raised, the server runs with what it has.
    pub fn raise() -> FileLimit {
        let (initial_soft, hard) = Resource::NOFILE.get().unwrap_or((1024, 1024));
        let soft = if initial_soft < hard {
            match Resource::NOFILE.set(hard, hard) {
                Ok(()) => hard,
                Err(_) => initial_soft,
            }
        } else {
            initial_soft
        };
        FileLimit { initial_soft, soft, hard }
    }

    /// Grows the kernel's file-descriptor table to hold `soft` descriptors
    /// (at most [`PRESIZE_MAX`]) now, while the process has one thread.
    ///
    /// The table doubles as descriptors are opened (64, 128, …, 16384, …),
    /// and in a process with more than one thread each doubling waits for an
    /// RCU grace period (`expand_files` → `synchronize_rcu`) inside the
    /// `accept()` that needed it: measured here, 12–50 ms during which the
    /// event loop — every client — stood still, once per doubling (at 8,192
    /// open files in a connect storm, say). Grown before the MQTT router's
    /// thread exists, no grace period is needed and it never happens again
    /// below the presized size. The cost is the table itself: 8 bytes and 2
    /// bits per descriptor of kernel memory (160 KiB for 20,000).
    ///
    /// Returns the number of descriptors the table was presized for, or
    /// `None` if the kernel refused (the server runs on; only the stalls
    /// remain).
    pub fn presize_descriptor_table(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let size = self.soft.min(PRESIZE_MAX);
        let highest = libc::c_int::try_from(size.checked_sub(1)?).ok()?;
        let file = std::fs::File::open("/dev/null").ok()?;
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own onto the
        // lowest free number >= `highest`; the copy is closed at once.
        let copy = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest) };
        if copy < 0 {
            return None;
        }
        // SAFETY: `copy` was just returned by fcntl and is used nowhere else.
        unsafe { libc::close(copy) };
        Some(size)
    }

    /// How many client connections fit under the limit, all protocols together.
    pub fn connection_capacity(&self) -> u64 {
        self.soft.saturating_sub(RESERVED_FDS).max(1)
    }
}

/// Picks the connection limit: the configured one, or the capacity when the
/// configuration says 0 ("automatic").
pub fn effective_max_connections(configured: u32, limit: &FileLimit) -> u64 {
    if configured == 0 { limit.connection_capacity() } else { u64::from(configured) }
}

/// The limit of one protocol when the open-file capacity is shared with
/// another: the configured value, or, when it is 0 ("automatic"), the
/// capacity less what the other protocol was explicitly given. Two automatic
/// limits both get the whole capacity and share the descriptors first come,
/// first served; the open-file limit then stops new clients of either kind
/// (the accept loops back off, clients wait in the backlog).
pub fn shared_max_connections(configured: u32, other_configured: u32, limit: &FileLimit) -> u64 {
    if configured != 0 {
        return u64::from(configured);
    }
    limit.connection_capacity().saturating_sub(u64::from(other_configured)).max(1)
}

/// Whether an `accept` error means the process or the system ran out of file
/// descriptors, which retrying at once cannot fix.
pub fn is_fd_exhaustion(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_table_is_presized_to_the_limit() {
        let limit = FileLimit { initial_soft: 20_000, soft: 20_000, hard: 20_000 };
        let size = limit.presize_descriptor_table().expect("the kernel grows the table");
        assert_eq!(size, 20_000.min(Resource::NOFILE.get().unwrap().0));
        let huge = FileLimit { initial_soft: 1 << 20, soft: 1 << 20, hard: 1 << 20 };
        // Asks for no more than PRESIZE_MAX (here the real limit is lower,
        // so the kernel refuses and nothing changes).
        assert!(huge.presize_descriptor_table().is_none_or(|n| n == PRESIZE_MAX));
    }

    #[test]
    fn raise_reaches_the_hard_limit() {
        let limit = FileLimit::raise();
        assert!(limit.soft >= limit.initial_soft);
        assert_eq!(limit.soft, limit.hard, "an unprivileged process may raise soft to hard");
        assert_eq!(Resource::NOFILE.get().unwrap().0, limit.soft);
    }

    #[test]
    fn capacity_keeps_a_reserve() {
        let limit = FileLimit { initial_soft: 1024, soft: 20_000, hard: 20_000 };
        assert_eq!(limit.connection_capacity(), 20_000 - RESERVED_FDS);
        assert_eq!(effective_max_connections(0, &limit), 19_936);
        assert_eq!(effective_max_connections(500, &limit), 500);
        let tiny = FileLimit { initial_soft: 10, soft: 10, hard: 10 };
        assert_eq!(tiny.connection_capacity(), 1);
    }

    #[test]
    fn capacity_is_shared_between_protocols() {
        let limit = FileLimit { initial_soft: 1024, soft: 20_000, hard: 20_000 };
        assert_eq!(shared_max_connections(0, 0, &limit), 19_936, "both automatic: both may use it all");
        assert_eq!(shared_max_connections(0, 5_000, &limit), 14_936, "the rest of what the other took");
        assert_eq!(shared_max_connections(300, 5_000, &limit), 300);
        assert_eq!(shared_max_connections(0, 50_000, &limit), 1);
    }

    #[test]
    fn fd_exhaustion_is_recognised() {
        assert!(is_fd_exhaustion(&std::io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_fd_exhaustion(&std::io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_fd_exhaustion(&std::io::Error::from_raw_os_error(libc::ECONNABORTED)));
    }
}
