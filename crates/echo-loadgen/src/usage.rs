//! Resource use of processes: this generator's own and the server's.
//!
//! The server side is read either from `/proc/<pid>` (same machine, any
//! server) or from a Prometheus text endpoint (any machine, any server that
//! exports the standard `process_*` metrics). Both are sampled around every
//! hold so the report can divide memory by connections and CPU by messages.

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

fn sample_pid(pid: u32) -> Result<ServerSample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| {
        format!(
            "cannot read /proc/{pid}/stat ({e}): is --server-pid {pid} a running process on this machine?"
        )
    })?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = match (
        fields.get(11).and_then(|v| v.parse::<f64>().ok()),
        fields.get(12).and_then(|v| v.parse::<f64>().ok()),
    ) {
        (Some(u), Some(s)) => Some((u + s) / ticks),
        _ => None,
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok().map(|d| d.count() as u64);
    Ok(ServerSample {
        rss_bytes: proc_rss(&pid.to_string()),
        cpu_seconds: cpu,
        open_fds: fds,
        connections: None,
    })
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
    fn own_process_is_sampled() {
        assert!(own_rss_bytes() > 0);
        let s = ServerProbe::Pid(std::process::id()).sample().unwrap();
        assert!(s.rss_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() > 0);
        assert!(s.cpu_seconds.is_some());
        assert!(ServerProbe::Pid(u32::MAX - 1).sample().is_err());
    }
}
