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
