//! What the kernel says about this process: memory, CPU, file descriptors and
//! threads, read from `/proc/self`. Used by `/metrics`, the summary line and
//! the page's live view.
//!
//! Reading `/proc` is a few system calls; nothing here runs per message.

use std::fs;

/// One reading of the process's resource use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// Resident set size: memory actually in RAM.
    pub rss_bytes: u64,
    /// User plus system CPU time since start.
    pub cpu_seconds: f64,
    /// Open file descriptors (every socket is one).
    pub open_fds: u64,
    /// OS threads of the process.
    pub threads: u64,
}

impl ProcessStats {
    /// Reads the current figures; `None` where `/proc` is not available.
    pub fn read() -> Option<ProcessStats> {
        let (usage, threads) = read_stat()?;
        Some(ProcessStats {
            rss_bytes: usage.rss_bytes,
            cpu_seconds: usage.cpu_seconds,
            open_fds: count_open_fds(),
            threads,
        })
    }
}

/// Memory and CPU only: what the stats line and the page's live view take
/// every few seconds. Without [`ProcessStats::open_fds`], whose listing of
/// `/proc/self/fd` has an entry per socket: with 100,000 clients, a read
/// long enough to delay every echo on the event loop.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Usage {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
}

impl Usage {
    /// Two small reads (`statm`, `stat`); `None` where `/proc` is not available.
    pub(crate) fn read() -> Option<Usage> {
        read_stat().map(|(usage, _)| usage)
    }
}

/// RSS and CPU time, and the number of threads.
fn read_stat() -> Option<(Usage, u64)> {
    let statm = fs::read_to_string("/proc/self/statm").ok()?;
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let (cpu_ticks, threads) = parse_stat(&stat)?;
    let usage = Usage {
        rss_bytes: parse_statm_rss_pages(&statm)? * page_size(),
        cpu_seconds: cpu_ticks as f64 / clock_ticks_per_second(),
    };
    Some((usage, threads))
}

/// The resident pages: the second field of `/proc/<pid>/statm`.
fn parse_statm_rss_pages(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// `(utime + stime, num_threads)` from `/proc/<pid>/stat`. The command name
/// (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_ascii_whitespace().collect();
    // after_name starts at field 3 (state); utime is field 14, stime 15,
    // num_threads 20.
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some((field(14)? + field(15)?, field(20)?))
}

fn count_open_fds() -> u64 {
    fs::read_dir("/proc/self/fd")
        .map(|dir| dir.count().saturating_sub(1) as u64) // minus the directory handle itself
        .unwrap_or(0)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_strange_command_name() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 7 0 12345 1000000 300 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((300, 7)));
    }

    #[test]
    fn parses_statm() {
        assert_eq!(parse_statm_rss_pages("5000 1200 300 10 0 900 0\n"), Some(1200));
        assert_eq!(parse_statm_rss_pages(""), None);
    }

    #[test]
    fn reads_this_process() {
        let stats = ProcessStats::read().expect("/proc is mounted on Linux");
        assert!(stats.rss_bytes > 1 << 20, "a test binary uses more than 1 MiB");
        assert!(stats.threads >= 1);
        let file = std::fs::File::open("/proc/self/statm").unwrap();
        let with_file = ProcessStats::read().unwrap();
        assert!(with_file.open_fds >= 1);
        drop(file);
    }
}
