//! Resource use of processes: this generator's own and the server's.
//!
//! The server side is read either from `/proc/<pid>` (same machine, any
//! server) or from a Prometheus text endpoint (any machine, any server that
//! exports the standard `process_*` metrics). Both are sampled around every
//! hold so the report can divide memory by connections and CPU by messages.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::target::Protocol;

/// CPU seconds (user + system) this process has used.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Resident memory of this process in bytes.
pub fn own_rss_bytes() -> u64 {
    proc_rss("self").unwrap_or(0)
}

fn proc_rss(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One reading of the server's resources. Fields a source cannot provide
/// are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerSample {
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    /// The server's own count of open connections.
    pub connections: Option<u64>,
    /// Threads of the server process (`/proc/PID/status`'s `Threads:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u64>,
    /// Context switches of all the server's threads: a thread that waits
    /// (for a socket, a lock) switches voluntarily, one whose time slice
    /// ran out or that a waking thread pushed off the CPU involuntarily.
    /// Cumulative in a reading; in a step's reading, those of the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctxt_switches: Option<ContextSwitches>,
}

/// Context switches, voluntary and involuntary, summed over threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextSwitches {
    pub voluntary: u64,
    pub involuntary: u64,
}

impl ContextSwitches {
    pub fn total(&self) -> u64 {
        self.voluntary + self.involuntary
    }

    /// Those between `before` and `self`. Threads that ended in between
    /// take their counts with them (the kernel keeps them only for
    /// getrusage of the process itself), so a difference is floored at 0.
    pub fn since(&self, before: &ContextSwitches) -> ContextSwitches {
        ContextSwitches {
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }
}

/// The two context-switch counters of one task's `/proc/.../status`.
fn parse_ctxt_switches(status: &str) -> Option<ContextSwitches> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
    Some(ContextSwitches {
        voluntary: field("voluntary_ctxt_switches:")?,
        involuntary: field("nonvoluntary_ctxt_switches:")?,
    })
}

/// Context switches of every thread of `pid`, summed. `/proc/PID/status`
/// alone counts only the main thread (the counters are per task), which
/// for a thread-per-connection server is the one that only accepts.
fn process_ctxt_switches(pid: u32) -> Option<ContextSwitches> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = ContextSwitches::default();
    for task in tasks.flatten() {
        // A thread that ended between the listing and the read is skipped.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        if let Some(c) = parse_ctxt_switches(&status) {
            sum.voluntary += c.voluntary;
            sum.involuntary += c.involuntary;
        }
    }
    Some(sum)
}

/// What loadtest/peers write to their log when a connection's thread
/// cannot be created.
pub const THREAD_SPAWN_FAILED: &str = "thread_spawn_failed";

/// Lines of the file at `path` that contain `needle`; `None` when it
/// cannot be read. Read whole at every step: server logs of a benchmark
/// are small, and a server that appends while this reads is only counted
/// at the next step.
pub fn count_log_lines(path: &std::path::Path, needle: &str) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let needle = needle.as_bytes();
    Some(bytes.split(|&b| b == b'\n').filter(|line| line.windows(needle.len()).any(|w| w == needle)).count()
        as u64)
}

/// Whether process `pid` still runs: not gone, and not a zombie waiting
/// for its parent (a server that died while run.sh's shell was busy).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(String::from))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Where server readings come from.
#[derive(Debug, Clone)]
pub enum ServerProbe {
    Pid(u32),
    Metrics { url: String, protocol: Protocol },
}

impl ServerProbe {
    pub fn sample(&self) -> Result<ServerSample, String> {
        match self {
            ServerProbe::Pid(pid) => sample_pid(*pid),
            ServerProbe::Metrics { url, protocol } => {
                let text = http_get(url)?;
                Ok(parse_prometheus(&text, *protocol))
            }
        }
    }
}

/// The server as `--server-pid` sees it: the process and every process
/// under it, summed. A server that runs workers as child processes
/// (echo-server's `--workers N` supervisor) serves every client from them,
/// so the supervisor's own `/proc` entry alone would show a few MiB and no
/// CPU however many connections its workers hold.
fn sample_pid(pid: u32) -> Result<ServerSample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| {
        format!(
            "cannot read /proc/{pid}/stat ({e}): is --server-pid {pid} a running process on this machine?"
        )
    })?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut sum = sample_one(pid, &stat, ticks);
    for child in descendants(pid) {
        // A child that exited between the listing and the read is skipped.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let one = sample_one(child, &stat, ticks);
        let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        sum.rss_bytes = add(sum.rss_bytes, one.rss_bytes);
        sum.open_fds = add(sum.open_fds, one.open_fds);
        sum.threads = add(sum.threads, one.threads);
        sum.cpu_seconds = match (sum.cpu_seconds, one.cpu_seconds) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        sum.ctxt_switches = match (sum.ctxt_switches, one.ctxt_switches) {
            (Some(a), Some(b)) => Some(ContextSwitches {
                voluntary: a.voluntary + b.voluntary,
                involuntary: a.involuntary + b.involuntary,
            }),
            (a, b) => a.or(b),
        };
    }
    Ok(sum)
}

/// One process's readings, its `/proc/PID/stat` already read.
fn sample_one(pid: u32, stat: &str, ticks: f64) -> ServerSample {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok().map(|d| d.count() as u64);
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse::<u64>().ok()));
    ServerSample {
        rss_bytes: proc_rss(&pid.to_string()),
        cpu_seconds: stat_cpu_seconds(stat, ticks),
        open_fds: fds,
        connections: None,
        threads,
        ctxt_switches: process_ctxt_switches(pid),
    }
}

/// Every process below `pid` (children, their children, ...), from the
/// parent pid in each `/proc/*/stat`: `/proc/PID/task/*/children` needs a
/// kernel option and misses children of threads that ended.
fn descendants(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(u32, u32)> = dir
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            Some((child, stat_ppid(&stat)?))
        })
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, _) in parents.iter().filter(|&&(child, ppid)| ppid == parent && child != pid) {
            if !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// The parent pid of a `/proc/.../stat` line (the 4th field).
fn stat_ppid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// What the threads of one name (`/proc/PID/task/*/comm`) have used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadTimes {
    /// CPU time, user + system.
    pub cpu_seconds: f64,
    /// Time spent runnable but waiting for a CPU (`schedstat`'s second
    /// field): how long the thread was ready to serve and could not.
    /// `None` on kernels without scheduler statistics.
    pub wait_seconds: Option<f64>,
}

impl ThreadTimes {
    /// What was used between `before` and `self`.
    pub fn since(&self, before: &ThreadTimes) -> ThreadTimes {
        ThreadTimes {
            cpu_seconds: self.cpu_seconds - before.cpu_seconds,
            wait_seconds: match (self.wait_seconds, before.wait_seconds) {
                (Some(a), Some(b)) => Some(a - b),
                _ => None,
            },
        }
    }
}

/// CPU and CPU-wait time of each thread of process `pid`, by thread name
/// (threads of one name add up: a server's thread pool is one line).
pub fn thread_times(pid: u32) -> Result<BTreeMap<String, ThreadTimes>, String> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| format!("cannot read {dir}: {e}"))?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out: BTreeMap<String, ThreadTimes> = BTreeMap::new();
    for task in tasks.flatten() {
        let path = task.path();
        // A thread that ended between the listing and the reads is skipped.
        let (Ok(comm), Ok(stat)) =
            (std::fs::read_to_string(path.join("comm")), std::fs::read_to_string(path.join("stat")))
        else {
            continue;
        };
        let Some(cpu) = stat_cpu_seconds(&stat, ticks) else { continue };
        let wait = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|ns| ns / 1e9);
        // The wait is known for a name only when every thread of it has one.
        let entry = out
            .entry(comm.trim().to_string())
            .or_insert(ThreadTimes { cpu_seconds: 0.0, wait_seconds: Some(0.0) });
        entry.cpu_seconds += cpu;
        entry.wait_seconds = entry.wait_seconds.zip(wait).map(|(a, b)| a + b);
    }
    Ok(out)
}

/// utime + stime of a `/proc/.../stat` line, in seconds.
fn stat_cpu_seconds(stat: &str, ticks: f64) -> Option<f64> {
    // Fields after the parenthesised command name (which may hold spaces);
    // utime and stime are the 14th and 15th fields of the whole line.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime = fields.get(11)?.parse::<f64>().ok()?;
    let stime = fields.get(12)?.parse::<f64>().ok()?;
    Some((utime + stime) / ticks)
}

/// The cumulative buckets of Prometheus histogram `name` in `text`, as
/// (upper bound `le`, count) in the order given; empty when absent. Series
/// of one bound with other labels add up (echo-server's supervisor serves
/// each worker's histogram with a `worker="N"` label): the histogram of
/// all of them.
pub fn histogram_buckets(text: &str, name: &str) -> Vec<(String, u64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(String, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix(&prefix) else { continue };
        let Some((labels, value)) = rest.rsplit_once('}') else { continue };
        let Some(le) = labels.split(',').find_map(|l| l.trim().strip_prefix("le=\"")?.strip_suffix('"'))
        else {
            continue;
        };
        let Some(count) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        match out.iter_mut().find(|(bound, _)| bound == le) {
            Some((_, n)) => *n += count as u64,
            None => out.push((le.to_string(), count as u64)),
        }
    }
    out
}

/// A minimal HTTP/1.0 GET over plain TCP: enough for a `/metrics` page
/// without pulling an HTTP client into the generator.
pub fn http_get(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--server-metrics {url:?}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let hostport = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport} resolves to nothing"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| format!("{url}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: text/plain\r\n\r\n")
        .map_err(|e| format!("{url}: {e}"))?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| format!("{url}: {e}"))?;
    let (head, body) = body.split_once("\r\n\r\n").ok_or_else(|| format!("{url}: not an HTTP response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("{url}: HTTP status {status}, expected 200"));
    }
    Ok(body.to_string())
}

/// Picks the standard process metrics and the server's connection gauge
/// out of Prometheus text; values of one name with several label sets add up.
pub fn parse_prometheus(text: &str, protocol: Protocol) -> ServerSample {
    let connections_metric = match protocol {
        Protocol::WebSocket => "echo_websocket_connections",
        Protocol::Mqtt => "echo_mqtt_connections",
    };
    let mut out = ServerSample::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let value_part = match line.rfind('}') {
            Some(i) => &line[i + 1..],
            None => &line[name_end..],
        };
        let Some(value) = value_part.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let add = |slot: &mut Option<u64>| *slot = Some(slot.unwrap_or(0) + value as u64);
        match name {
            "process_resident_memory_bytes" => add(&mut out.rss_bytes),
            "process_open_fds" => add(&mut out.open_fds),
            "process_cpu_seconds_total" => out.cpu_seconds = Some(out.cpu_seconds.unwrap_or(0.0) + value),
            n if n == connections_metric => add(&mut out.connections),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_read() {
        let text = "# HELP process_resident_memory_bytes Resident memory\n\
            # TYPE process_resident_memory_bytes gauge\n\
            process_resident_memory_bytes 1.2345e7\n\
            process_cpu_seconds_total 3.5\n\
            process_open_fds 107\n\
            echo_websocket_connections{listener=\"a\"} 60\n\
            echo_websocket_connections{listener=\"b\"} 40 1700000000\n\
            echo_websocket_connections_total 999\n";
        let s = parse_prometheus(text, Protocol::WebSocket);
        assert_eq!(s.rss_bytes, Some(12_345_000));
        assert_eq!(s.cpu_seconds, Some(3.5));
        assert_eq!(s.open_fds, Some(107));
        assert_eq!(s.connections, Some(100));
        assert_eq!(parse_prometheus(text, Protocol::Mqtt).connections, None);
    }

    #[test]
    fn histogram_buckets_are_read_in_order() {
        let text = "# TYPE echo_event_loop_lag_seconds histogram\n\
            echo_event_loop_lag_seconds_bucket{le=\"0.001\"} 90\n\
            echo_event_loop_lag_seconds_bucket{le=\"0.005\"} 99\n\
            echo_event_loop_lag_seconds_bucket{le=\"+Inf\"} 100\n\
            echo_event_loop_lag_seconds_sum 0.2\n\
            echo_event_loop_lag_seconds_count 100\n\
            other_bucket{le=\"1\"} 5\n";
        let b = histogram_buckets(text, "echo_event_loop_lag_seconds");
        assert_eq!(b, vec![("0.001".into(), 90), ("0.005".into(), 99), ("+Inf".into(), 100)]);
        assert!(histogram_buckets(text, "missing").is_empty());
    }

    #[test]
    fn a_supervisors_workers_add_up_on_its_metrics_page() {
        // echo-server --workers 2: the supervisor serves each worker's
        // samples with a worker label (and none of its own process).
        let text = "process_resident_memory_bytes{worker=\"0\"} 3000000\n\
            process_resident_memory_bytes{worker=\"1\"} 5000000\n\
            process_cpu_seconds_total{worker=\"0\"} 1.5\n\
            process_cpu_seconds_total{worker=\"1\"} 2.0\n\
            echo_mqtt_connections{listener=\"tcp\",worker=\"0\"} 7\n\
            echo_mqtt_connections{listener=\"tcp\",worker=\"1\"} 5\n\
            echo_event_loop_lag_seconds_bucket{le=\"0.001\",worker=\"0\"} 90\n\
            echo_event_loop_lag_seconds_bucket{le=\"+Inf\",worker=\"0\"} 100\n\
            echo_event_loop_lag_seconds_bucket{le=\"0.001\",worker=\"1\"} 40\n\
            echo_event_loop_lag_seconds_bucket{le=\"+Inf\",worker=\"1\"} 50\n";
        let s = parse_prometheus(text, Protocol::Mqtt);
        assert_eq!(s.rss_bytes, Some(8_000_000));
        assert_eq!(s.cpu_seconds, Some(3.5));
        assert_eq!(s.connections, Some(12));
        let b = histogram_buckets(text, "echo_event_loop_lag_seconds");
        assert_eq!(b, vec![("0.001".into(), 130), ("+Inf".into(), 150)]);
    }

    #[test]
    fn a_process_is_sampled_with_the_processes_under_it() {
        // A shell (the supervisor) with a child of its own (a worker).
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 60 & wait"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let root = shell.id();
        let mut below = descendants(root);
        for _ in 0..500 {
            if !below.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            below = descendants(root);
        }
        assert_eq!(below.len(), 1, "the shell's sleep: {below:?}");
        assert!(descendants(std::process::id()).contains(&root), "a child of this test process");
        assert!(!descendants(std::process::id()).contains(&std::process::id()));
        let sample = ServerProbe::Pid(root).sample().unwrap();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let parts: Vec<ServerSample> = [root, below[0]]
            .iter()
            .map(|&pid| {
                sample_one(pid, &std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap(), ticks)
            })
            .collect();
        // SAFETY: kill(2) on the sleep this test's shell started; the
        // shell's `wait` then returns and it exits.
        unsafe { libc::kill(below[0] as libc::pid_t, libc::SIGKILL) };
        shell.wait().unwrap();
        // Two sleeping single-threaded processes: nothing moves between reads.
        assert_eq!(sample.threads, Some(2), "{sample:?}");
        assert_eq!(sample.open_fds, Some(parts[0].open_fds.unwrap() + parts[1].open_fds.unwrap()));
        assert_eq!(sample.rss_bytes, Some(parts[0].rss_bytes.unwrap() + parts[1].rss_bytes.unwrap()));
        assert_eq!(stat_ppid("1 (a (b) c) S 42 1 1 0"), Some(42), "a command name with a paren and spaces");
    }

    #[test]
    fn threads_of_this_process_are_read_by_name() {
        // Burn some CPU on a named thread so it has something to show: until
        // the thread's own CPU clock says 0.3 s (wall time would not do: on a
        // loaded machine 300 ms of it gave the thread 0.09 s of CPU).
        let busy = std::thread::Builder::new()
            .name("elg-busy".into())
            .spawn(|| {
                let thread_cpu = || {
                    // SAFETY: clock_gettime fills the timespec we hand it.
                    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
                    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
                };
                let mut x = 0u64;
                while thread_cpu() < 0.3 {
                    x = x.wrapping_mul(31).wrapping_add(7);
                }
                std::hint::black_box(x);
                thread_times(std::process::id()).unwrap()
            })
            .unwrap();
        let times = busy.join().unwrap();
        let t = times.get("elg-busy").expect("the thread is listed by its name");
        assert!(t.cpu_seconds >= 0.1, "{t:?}");
        if let Some(w) = t.wait_seconds {
            assert!(w >= 0.0, "{t:?}");
        }
        let d = t.since(&ThreadTimes { cpu_seconds: 0.05, wait_seconds: t.wait_seconds });
        assert!((d.cpu_seconds - (t.cpu_seconds - 0.05)).abs() < 1e-9);
        assert!(thread_times(u32::MAX - 1).is_err());
    }

    #[test]
    fn context_switches_are_read_from_a_status_file() {
        let status = "Name:\techo-server\nState:\tS (sleeping)\nThreads:\t3\n\
            voluntary_ctxt_switches:\t1234\nnonvoluntary_ctxt_switches:\t56\n";
        assert_eq!(parse_ctxt_switches(status), Some(ContextSwitches { voluntary: 1234, involuntary: 56 }));
        // A kernel without the lines (or a truncated read) gives nothing,
        // not zeros that would pass for a quiet server.
        assert_eq!(parse_ctxt_switches("Name:\tx\nvoluntary_ctxt_switches:\t1\n"), None);
        let later = ContextSwitches { voluntary: 1300, involuntary: 50 };
        let d = later.since(&ContextSwitches { voluntary: 1234, involuntary: 56 });
        assert_eq!(d, ContextSwitches { voluntary: 66, involuntary: 0 }, "floored when threads ended");
        assert_eq!(d.total(), 66);
    }

    #[test]
    fn context_switches_of_every_thread_add_up() {
        let pid = std::process::id();
        let before = process_ctxt_switches(pid).unwrap();
        // Threads that sleep switch voluntarily each time; the main
        // thread's own counters (all /proc/PID/status shows) would miss them.
        let sleepers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..20 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let during = process_ctxt_switches(pid).unwrap();
        let s = ServerProbe::Pid(pid).sample().unwrap();
        for t in sleepers {
            t.join().unwrap();
        }
        assert!(during.since(&before).voluntary >= 4 * 20, "{before:?} {during:?}");
        assert!(s.threads.unwrap() >= 5, "{s:?}");
        assert!(s.ctxt_switches.unwrap().total() >= during.total());
        assert!(process_alive(pid));
        assert!(!process_alive(u32::MAX - 1));
    }

    #[test]
    fn log_lines_are_counted_by_what_they_contain() {
        let path = std::env::temp_dir().join(format!("elg-log-{}", std::process::id()));
        std::fs::write(
            &path,
            "listening on 127.0.0.1:1\nthread_spawn_failed error=\"x\" failed=1\n\
             accept_failed\nthread_spawn_failed error=\"x\" failed=2",
        )
        .unwrap();
        assert_eq!(count_log_lines(&path, THREAD_SPAWN_FAILED), Some(2), "the last line has no newline yet");
        assert_eq!(count_log_lines(&path, "accept_failed"), Some(1));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(count_log_lines(&path, THREAD_SPAWN_FAILED), None);
    }

    #[test]
    fn own_process_is_sampled() {
        assert!(own_rss_bytes() > 0);
        let s = ServerProbe::Pid(std::process::id()).sample().unwrap();
        assert!(s.rss_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() > 0);
        assert!(s.cpu_seconds.is_some());
        assert!(ServerProbe::Pid(u32::MAX - 1).sample().is_err());
    }
}
