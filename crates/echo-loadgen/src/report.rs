//! Turning a [`RunResult`] into things people read: the per-step table,
//! CSV, and the threshold verdict.

use std::fmt::Write as _;
use std::time::Duration;

use crate::result::{RunResult, StepResult};
use crate::scenario::Pattern;

/// Microseconds as the shortest readable duration.
pub fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..10_000 => format!("{:.2}ms", us as f64 / 1e3),
        10_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

pub fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let sign = if b < 0.0 { "-" } else { "" };
    let mut v = b.abs();
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{sign}{v:.0} B") } else { format!("{sign}{v:.1} {}", UNITS[unit]) }
}

/// Counts and rates with a k/M suffix.
pub fn count(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else if n >= 100.0 || n == n.trunc() {
        format!("{n:.0}")
    } else {
        format!("{n:.1}")
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// The table's columns; [`CPU_PER_MESSAGE`] goes after `srv CPU` when
/// messages flowed.
const HEADERS: [&str; 19] = [
    "conns",
    "open",
    "conn p50",
    "conn p99",
    "conn err",
    "sent/s",
    "recv/s",
    "p50",
    "p90",
    "p99",
    "p99.9",
    "max",
    "errors",
    "srv RSS",
    "RSS/conn",
    "ΔRSS/conn",
    "srv CPU",
    "srv thr",
    "gen CPU",
];

/// Server CPU microseconds per message echoed (MQTT: per delivery), and
/// the server's context switches per message, after `srv CPU`.
const CPU_PER_MESSAGE: &str = "srv µs/msg";
const SWITCHES_PER_MESSAGE: &str = "cs/msg";
const CPU_PER_MESSAGE_AT: usize = 17;

/// Microseconds of CPU, to two or three significant figures.
fn cpu_micros(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

fn row(s: &StepResult, cpu_per_message: bool) -> Vec<String> {
    let d = &s.derived;
    let lat = &s.hold.latency;
    let ct = &s.ramp.connect_time;
    let server = s.server.as_ref();
    let has_lat = !lat.is_empty();
    let l = |p: f64| if has_lat { micros(lat.percentile(p)) } else { "-".into() };
    let mut row = vec![
        count(s.target_connections as f64),
        count(s.open_connections as f64),
        if ct.is_empty() { "-".into() } else { micros(ct.percentile(50.0)) },
        if ct.is_empty() { "-".into() } else { micros(ct.percentile(99.0)) },
        count((s.ramp.connect_errors() + s.hold.connect_errors()) as f64),
        count(d.sent_per_sec),
        count(d.received_per_sec),
        l(50.0),
        l(90.0),
        l(99.0),
        l(99.9),
        if has_lat { micros(lat.max()) } else { "-".into() },
        count(d.errors as f64),
        opt(server.and_then(|s| s.rss_bytes), |b| bytes(b as f64)),
        opt(d.server_rss_per_connection, bytes),
        opt(d.server_rss_per_added_connection, bytes),
        opt(d.server_cpu_percent, |p| format!("{p:.0}%")),
        opt(server.and_then(|s| s.threads), |t| count(t as f64)),
        format!("{:.0}%", d.generator_cpu_percent),
    ];
    if cpu_per_message {
        row.insert(CPU_PER_MESSAGE_AT, opt(d.server_cpu_us_per_message, cpu_micros));
        row.insert(CPU_PER_MESSAGE_AT + 1, opt(d.server_ctxt_switches_per_message, switches));
    }
    row
}

/// Context switches per message, to two significant figures or so.
fn switches(n: f64) -> String {
    // An event loop under load switches far less than once per message:
    // three decimals keep 0.001 from reading as 0.
    if n < 0.1 {
        format!("{n:.3}")
    } else if n < 10.0 {
        format!("{n:.2}")
    } else {
        format!("{n:.0}")
    }
}

/// The first step where the server did not serve every connection and
/// message: its connections and the commonest errors, `-` when none.
fn first_failure(r: &RunResult) -> String {
    let Some(s) = r.steps.iter().find(|s| {
        s.server_exited
            || s.open_connections < s.target_connections
            || s.derived.errors > 0
            || s.server_thread_spawn_failures.unwrap_or(0) > 0
    }) else {
        return "-".into();
    };
    let mut kinds: Vec<(String, u64)> = s.ramp.errors.clone().into_iter().collect();
    for (k, n) in &s.hold.errors {
        match kinds.iter_mut().find(|(name, _)| name == k) {
            Some((_, m)) => *m += n,
            None => kinds.push((k.clone(), *n)),
        }
    }
    kinds.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut how: Vec<String> = kinds.iter().take(3).map(|(k, n)| format!("{k} {n}")).collect();
    if let Some(n) = s.server_thread_spawn_failures.filter(|&n| n > 0) {
        how.insert(0, format!("{n} thread_spawn_failed"));
    }
    if s.server_exited {
        how.insert(0, "server exited".into());
    }
    if how.is_empty() {
        how.push(format!("{} of {} open", s.open_connections, s.target_connections));
    }
    format!("{}: {}", s.target_connections, how.join(", "))
}

/// The per-step table and, below it, the errors of each step by kind.
pub fn table(r: &RunResult) -> String {
    // CPU per message only means something when messages flowed; an idle
    // run's table stays as narrow as before.
    let cpu_per_message = r.steps.iter().any(|s| s.hold.received > 0);
    let mut headers = HEADERS.to_vec();
    if cpu_per_message {
        headers.insert(CPU_PER_MESSAGE_AT, CPU_PER_MESSAGE);
        headers.insert(CPU_PER_MESSAGE_AT + 1, SWITCHES_PER_MESSAGE);
    }
    let rows: Vec<Vec<String>> = r.steps.iter().map(|s| row(s, cpu_per_message)).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let title = r.label.as_deref().map(|l| format!("{l} — ")).unwrap_or_default();
    let _ = writeln!(
        out,
        "{title}{} ({}), rate {} msg/s/conn, {} B, hold {}s, {} worker(s) on {} CPUs",
        r.url,
        r.protocol,
        r.settings.rate,
        r.settings.size,
        r.settings.hold_secs,
        r.machine.workers,
        r.machine.cpus
    );
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            let sep = if i == 0 { "" } else { "  " };
            let pad = w - cell.chars().count();
            let _ = write!(s, "{sep}{}{cell}", " ".repeat(pad));
        }
        s
    };
    let _ = writeln!(out, "{}", line(&mut headers.iter().copied()));
    for row in &rows {
        let _ = writeln!(out, "{}", line(&mut row.iter().map(String::as_str)));
    }
    for s in &r.steps {
        if s.server_exited {
            let _ = writeln!(
                out,
                "the server process exited during the step at {} connections",
                s.target_connections
            );
        }
        if let Some(n) = s.server_thread_spawn_failures.filter(|&n| n > 0) {
            let _ = writeln!(
                out,
                "the server's log reports {n} thread(s) it could not create during the step at {} connections",
                s.target_connections
            );
        }
        let mut kinds = s.ramp.errors.clone();
        for (k, n) in &s.hold.errors {
            *kinds.entry(k.clone()).or_default() += n;
        }
        if !kinds.is_empty() {
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(out, "errors at {} connections: {}", s.target_connections, list.join(", "));
        }
    }
    for w in generator_warnings(r) {
        let _ = writeln!(out, "note: {w}");
    }
    out
}

/// Steps where the generator used most of the CPU it had: their figures
/// may describe the generator rather than the server.
pub fn generator_warnings(r: &RunResult) -> Vec<String> {
    let threads = r.machine.threads.min(r.machine.cpus.max(1) * r.machine.runs.max(1));
    if threads == 0 {
        return Vec::new();
    }
    r.steps
        .iter()
        .filter(|s| s.derived.generator_cpu_percent > 80.0 * threads as f64)
        .map(|s| {
            format!(
                "at {} connections the generator used {:.0}% CPU of the {threads} thread(s) it had: \
                 latency and throughput may be the generator's (add --threads/--workers or another machine)",
                s.target_connections, s.derived.generator_cpu_percent
            )
        })
        .collect()
}

const CSV_HEADERS: [&str; 38] = [
    "target_connections",
    "open_connections",
    "ramp_secs",
    "hold_secs",
    "connect_attempts",
    "connect_p50_us",
    "connect_p99_us",
    "connect_errors",
    "errors",
    "error_rate",
    "sent",
    "received",
    "sent_per_sec",
    "received_per_sec",
    "latency_p50_us",
    "latency_p90_us",
    "latency_p99_us",
    "latency_p999_us",
    "latency_max_us",
    "latency_mean_us",
    "server_rss_bytes",
    "server_rss_per_connection",
    "server_rss_per_added_connection",
    "server_cpu_percent",
    "server_cpu_us_per_message",
    "server_open_fds",
    "server_connections",
    "server_threads",
    "server_voluntary_ctxt_switches",
    "server_involuntary_ctxt_switches",
    "server_ctxt_switches_per_message",
    "server_ctxt_switches_per_sec",
    "server_exited",
    "server_thread_spawn_failures",
    "generator_cpu_percent",
    "generator_rss_bytes",
    "generator_rss_per_connection",
    "errors_by_kind",
];

/// One CSV row per step, raw numbers (microseconds, bytes), empty when unknown.
pub fn csv(r: &RunResult) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(CSV_HEADERS)?;
    let o = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
    let ou = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for s in &r.steps {
        let d = &s.derived;
        let l = s.hold.latency.summary();
        let ct = s.ramp.connect_time.summary();
        let server = s.server.clone().unwrap_or_default();
        let mut kinds = s.ramp.errors.clone();
        for (k, n) in &s.hold.errors {
            *kinds.entry(k.clone()).or_default() += n;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}={n}")).collect();
        w.write_record([
            s.target_connections.to_string(),
            s.open_connections.to_string(),
            format!("{:.3}", s.ramp_secs),
            format!("{:.3}", s.hold_secs),
            s.ramp.attempted.to_string(),
            ou(ct.p50_us),
            ou(ct.p99_us),
            (s.ramp.connect_errors() + s.hold.connect_errors()).to_string(),
            d.errors.to_string(),
            format!("{:.6}", d.error_rate),
            s.hold.sent.to_string(),
            s.hold.received.to_string(),
            format!("{:.3}", d.sent_per_sec),
            format!("{:.3}", d.received_per_sec),
            ou(l.p50_us),
            ou(l.p90_us),
            ou(l.p99_us),
            ou(l.p999_us),
            ou(l.max_us),
            l.mean_us.map(|m| format!("{m:.1}")).unwrap_or_default(),
            ou(server.rss_bytes),
            o(d.server_rss_per_connection),
            o(d.server_rss_per_added_connection),
            o(d.server_cpu_percent),
            o(d.server_cpu_us_per_message),
            ou(server.open_fds),
            ou(server.connections),
            ou(server.threads),
            ou(server.ctxt_switches.map(|c| c.voluntary)),
            ou(server.ctxt_switches.map(|c| c.involuntary)),
            o(d.server_ctxt_switches_per_message),
            o(d.server_ctxt_switches_per_sec),
            s.server_exited.to_string(),
            ou(s.server_thread_spawn_failures),
            format!("{:.3}", d.generator_cpu_percent),
            s.generator_rss_bytes.to_string(),
            o(d.generator_rss_per_connection),
            kinds.join(";"),
        ])?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

/// Server memory per connection over the whole run: growth of RSS from
/// before the first connection to the last step, divided by the connections
/// open then. Steadier than a single step's growth.
pub fn rss_per_connection_over_run(r: &RunResult) -> Option<f64> {
    let last = r.steps.last()?;
    let before = r.server_baseline.as_ref()?.rss_bytes?;
    let after = last.server.as_ref()?.rss_bytes?;
    (last.open_connections > 0).then(|| (after as f64 - before as f64) / last.open_connections as f64)
}

/// A Markdown table comparing runs of the same scenario against different
/// servers, at each run's last step, with ratios to the first run.
pub fn comparison(runs: &[RunResult]) -> String {
    let mut out = String::new();
    // Runs sampled from /proc (--server-pid) also show the server's CPU and
    // context switches per message, its threads, and where it first failed.
    let threads =
        runs.iter().any(|r| r.steps.iter().any(|s| s.server.as_ref().is_some_and(|x| x.threads.is_some())));
    let (extra_head, extra_rule) = if threads {
        (" µs/msg | cs/msg | threads | first failure |", "---:|---:|---:|---|")
    } else {
        ("", "")
    };
    // Fan-out subscribers receive other clients' messages, 1 publish to
    // `fanout` deliveries: "echoed" would misname them.
    let fanout = !runs.is_empty() && runs.iter().all(|r| r.settings.pattern == Pattern::Fanout);
    let what = if fanout { "delivered/s" } else { "echoed/s" };
    let _ = writeln!(
        out,
        "| server | open | {what} | p50 | p99 | p99.9 | max | errors | RSS/conn | srv CPU | gen CPU |{extra_head} {what} ratio | p99 ratio | RSS/conn ratio |"
    );
    let _ =
        writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{extra_rule}---:|---:|---:|");
    let base = runs.first();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".into(),
    };
    let figures = |r: &RunResult| {
        let s = r.steps.last();
        let lat = s.map(|s| &s.hold.latency).filter(|l| !l.is_empty());
        (
            s.map(|s| s.derived.received_per_sec).filter(|v| *v > 0.0),
            lat.map(|l| l.percentile(99.0) as f64),
            rss_per_connection_over_run(r),
        )
    };
    let (b_rate, b_p99, b_rss) = base.map(figures).unwrap_or((None, None, None));
    for (i, r) in runs.iter().enumerate() {
        let Some(s) = r.steps.last() else { continue };
        let lat = &s.hold.latency;
        let has = !lat.is_empty();
        let l = |p: f64| if has { micros(lat.percentile(p)) } else { "-".into() };
        let (rate, p99, rss) = figures(r);
        let extra = if threads {
            format!(
                " {} | {} | {} | {} |",
                opt(s.derived.server_cpu_us_per_message, cpu_micros),
                opt(s.derived.server_ctxt_switches_per_message, switches),
                opt(s.server.as_ref().and_then(|x| x.threads), |t| t.to_string()),
                first_failure(r)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}% |{extra} {} | {} | {} |",
            r.label.clone().unwrap_or_else(|| format!("run {}", i + 1)),
            s.open_connections,
            count(s.derived.received_per_sec),
            l(50.0),
            l(99.0),
            l(99.9),
            if has { micros(lat.max()) } else { "-".into() },
            s.derived.errors,
            opt(rss, bytes),
            opt(s.derived.server_cpu_percent, |p| format!("{p:.0}%")),
            s.derived.generator_cpu_percent,
            ratio(rate, b_rate),
            ratio(p99, b_p99),
            ratio(rss, b_rss),
        );
    }
    out
}

/// CI thresholds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Thresholds {
    pub max_error_rate: Option<f64>,
    pub max_p99: Option<Duration>,
}

/// Every step that crosses a threshold, as a sentence.
pub fn check(r: &RunResult, t: &Thresholds) -> Vec<String> {
    let mut out = Vec::new();
    for s in &r.steps {
        let at = format!("at {} connections", s.target_connections);
        if let Some(max) = t.max_error_rate
            && s.derived.error_rate > max
        {
            out.push(format!(
                "{at}: error rate {:.3}% ({} errors) exceeds --max-error-rate {:.3}%",
                s.derived.error_rate * 100.0,
                s.derived.errors,
                max * 100.0
            ));
        }
        if let Some(max) = t.max_p99 {
            let p99 = s.hold.latency.percentile(99.0);
            if p99 as u128 > max.as_micros() {
                out.push(format!(
                    "{at}: latency p99 {} exceeds --max-p99 {}",
                    micros(p99),
                    micros(max.as_micros() as u64)
                ));
            }
            if s.hold.latency.is_empty() && s.hold.sent > 0 {
                out.push(format!("{at}: {} messages sent and none echoed, so no p99 to check", s.hold.sent));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::tests::{run, step};

    #[test]
    fn formats() {
        assert_eq!(micros(850), "850µs");
        assert_eq!(micros(1_234), "1.23ms");
        assert_eq!(micros(62_100), "62.1ms");
        assert_eq!(micros(2_500_000), "2.50s");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(6.5 * 1024.0), "6.5 KiB");
        assert_eq!(bytes(-4375.0), "-4.3 KiB");
        assert_eq!(count(19_000.0), "19.0k");
        assert_eq!(count(999.5), "1000");
        assert_eq!(count(12.25), "12.2");
    }

    #[test]
    fn table_and_csv_have_a_row_per_step() {
        let mut r = run(vec![step(100, 1000, &[100; 1000]), step(200, 2000, &[200; 2000])]);
        r.steps[1].hold.errors.insert("echo_mismatch".into(), 3);
        r.steps[1].derive();
        let t = table(&r);
        assert_eq!(t.lines().count(), 1 + 1 + 2 + 1, "{t}");
        assert!(t.contains("errors at 200 connections: echo_mismatch 3"));
        let c = csv(&r).unwrap();
        let mut rd = csv::Reader::from_reader(c.as_bytes());
        let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(&rows[1][0], "200");
        assert_eq!(&rows[1][CSV_HEADERS.len() - 1], "echo_mismatch=3");
        assert_eq!(rd.headers().unwrap().len(), CSV_HEADERS.len());
    }

    #[test]
    fn csv_leaves_unknown_figures_empty_not_zero() {
        // An idle step: connections, but no messages and no server probe.
        let mut r = run(vec![step(100, 0, &[])]);
        r.steps[0].ramp.connect_time.record(250);
        r.steps[0].server = None;
        r.derive();
        let c = csv(&r).unwrap();
        let mut rd = csv::Reader::from_reader(c.as_bytes());
        let headers = rd.headers().unwrap().clone();
        let row = rd.records().next().unwrap().unwrap();
        let cell = |name: &str| &row[headers.iter().position(|h| h == name).unwrap()];
        for name in [
            "latency_p50_us",
            "latency_p90_us",
            "latency_p99_us",
            "latency_p999_us",
            "latency_max_us",
            "latency_mean_us",
            "server_rss_bytes",
            "server_cpu_percent",
            "server_cpu_us_per_message",
        ] {
            assert_eq!(cell(name), "", "{name} is unknown in an idle step");
        }
        // Known figures, including real zeros, are written.
        assert_eq!(cell("connect_p50_us"), "250");
        assert_eq!(cell("sent"), "0");
        assert_eq!(cell("errors"), "0");
    }

    #[test]
    fn table_shows_server_cpu_per_message_when_messages_flowed() {
        // step(): 2 s of server CPU over the hold; 1000 and 4000 echoes.
        let r = run(vec![step(100, 1000, &[100; 1000]), step(200, 4000, &[100; 4000])]);
        let t = table(&r);
        let lines: Vec<&str> = t.lines().collect();
        let header: Vec<&str> = lines[1].split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
        let at = header.iter().position(|h| *h == "srv µs/msg").expect("column present");
        assert_eq!(header[at - 1], "srv CPU");
        let cells = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        // "srv RSS" etc. hold a space ("1.0 MiB"): count the CPU column from the end.
        let from_end = header.len() - at;
        let row0 = cells(lines[2]);
        let row1 = cells(lines[3]);
        assert_eq!(row0[row0.len() - from_end], "2000", "2 s / 1000 messages = 2000 µs: {t}");
        assert_eq!(row1[row1.len() - from_end], "500", "{t}");
        // Every line stays within a terminal of reasonable width.
        assert!(lines[1..].iter().all(|l| l.chars().count() <= 200), "{t}");
        // Without a server probe: a dash, not a number.
        let mut r = r;
        r.steps[0].server = None;
        r.derive();
        let row0 = cells(table(&r).lines().nth(2).unwrap());
        assert_eq!(row0[row0.len() - from_end], "-");
        // An idle run has no such column.
        let idle = run(vec![step(100, 0, &[])]);
        assert!(!table(&idle).contains("µs/msg"), "{}", table(&idle));
        assert_eq!(cpu_micros(4.123), "4.12");
        assert_eq!(cpu_micros(41.23), "41.2");
        assert_eq!(cpu_micros(412.3), "412");
    }

    #[test]
    fn a_busy_generator_is_pointed_out() {
        let mut r = run(vec![step(100, 1000, &[100; 1000]), step(200, 1000, &[100; 1000])]);
        r.steps[1].generator_cpu_seconds = 9.0; // 90% of the 10 s hold, one thread
        r.derive();
        let w = generator_warnings(&r);
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("at 200 connections the generator used 90% CPU"), "{}", w[0]);
        assert!(table(&r).contains("note: at 200 connections"));
    }

    #[test]
    fn comparison_has_ratios_to_the_first_run() {
        let a = run(vec![step(100, 1000, &[100; 1000])]);
        let mut b = run(vec![step(100, 1000, &[300; 500])]);
        b.label = Some("peer".into());
        b.steps[0].server.as_mut().unwrap().rss_bytes = Some(2_500_000);
        let md = comparison(&[a, b]);
        let rows: Vec<&str> = md.lines().collect();
        assert_eq!(rows.len(), 4, "{md}");
        // a: 100 echoed/s, p99 100µs, (1 MB - 0.5 MB)/100 = 5 kB per connection.
        assert!(rows[2].ends_with("| 1.00× | 1.00× | 1.00× |"), "{}", rows[2]);
        // b: half the echoes, three times the p99, four times the memory.
        assert!(
            rows[3].starts_with("| peer |") && rows[3].ends_with("| 0.50× | 3.00× | 4.00× |"),
            "{}",
            rows[3]
        );
        // Sampled from /proc: CPU and context switches per message (step():
        // 2 s and 1000 switches over 1000 echoes), threads, no failure.
        assert!(rows[0].contains("| µs/msg | cs/msg | threads | first failure |"), "{}", rows[0]);
        assert!(rows[2].contains("| 2000 | 1.00 | 1 | - |"), "{}", rows[2]);
        // b echoed 500 of 1000: no error was counted, so it is not a failure
        // in this sense; a connection short, or a dead server, is.
        assert!(rows[3].contains("| 4000 | 2.00 | 1 | - |"), "{}", rows[3]);
    }

    #[test]
    fn fan_out_comparisons_count_deliveries() {
        let mut a = run(vec![step(100, 1000, &[100; 1000])]);
        a.settings.pattern = Pattern::Fanout;
        let md = comparison(&[a.clone(), a.clone()]);
        assert!(md.starts_with("| server | open | delivered/s |"), "{md}");
        assert!(md.lines().next().unwrap().contains("| delivered/s ratio |"), "{md}");
        // Fan-out beside echo: not the same count, the usual header.
        let mut b = a.clone();
        b.settings.pattern = Pattern::Echo;
        assert!(comparison(&[a, b]).starts_with("| server | open | echoed/s |"));
    }

    #[test]
    fn switches_keep_small_figures_readable() {
        assert_eq!(switches(0.0014), "0.001");
        assert_eq!(switches(0.054), "0.054");
        assert_eq!(switches(1.138), "1.14");
        assert_eq!(switches(10594.2), "10594");
    }

    #[test]
    fn the_first_failure_says_where_and_how() {
        let mut r =
            run(vec![step(100, 100, &[100; 100]), step(1000, 1000, &[100; 1000]), step(2000, 0, &[])]);
        assert_eq!(first_failure(&r), "-");
        r.steps[1].open_connections = 990;
        r.steps[1].ramp.errors.insert("connection_reset".into(), 4);
        r.steps[1].ramp.errors.insert("connect_refused".into(), 6);
        r.steps[1].hold.errors.insert("connection_reset".into(), 3);
        r.steps[2].server_exited = true;
        r.steps[2].server_thread_spawn_failures = Some(35);
        r.derive();
        assert_eq!(first_failure(&r), "1000: connection_reset 7, connect_refused 6");
        r.steps[1] = step(1000, 1000, &[100; 1000]);
        r.derive();
        assert_eq!(first_failure(&r), "2000: server exited, 35 thread_spawn_failed");
        assert!(table(&r).contains("the server process exited during the step at 2000 connections"));
        assert!(
            table(&r).contains(
                "the server's log reports 35 thread(s) it could not create during the step at 2000"
            )
        );
        let c = csv(&r).unwrap();
        let mut rd = csv::Reader::from_reader(c.as_bytes());
        let headers = rd.headers().unwrap().clone();
        let rows: Vec<csv::StringRecord> = rd.records().map(Result::unwrap).collect();
        let cell =
            |row: usize, name: &str| rows[row][headers.iter().position(|h| h == name).unwrap()].to_string();
        assert_eq!(cell(2, "server_exited"), "true");
        assert_eq!(cell(2, "server_thread_spawn_failures"), "35");
        assert_eq!(cell(0, "server_thread_spawn_failures"), "", "no log given");
        assert_eq!(cell(0, "server_exited"), "false");
        assert_eq!(cell(0, "server_threads"), "1");
        assert_eq!(cell(0, "server_voluntary_ctxt_switches"), "900");
        assert_eq!(cell(0, "server_involuntary_ctxt_switches"), "100");
        assert_eq!(cell(0, "server_ctxt_switches_per_message"), "10.000");
        assert_eq!(cell(2, "server_ctxt_switches_per_message"), "", "no messages, no figure");
        assert_eq!(cell(2, "server_ctxt_switches_per_sec"), "100.000");
    }

    #[test]
    fn thresholds_name_the_step_and_the_reason() {
        let mut r = run(vec![step(100, 1000, &[100; 1000]), step(200, 1000, &[90_000; 1000])]);
        r.steps[0].hold.errors.insert("echo_timeout".into(), 50);
        r.steps[0].derive();
        let t = Thresholds { max_error_rate: Some(0.01), max_p99: Some(Duration::from_millis(50)) };
        let f = check(&r, &t);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("at 100 connections: error rate"));
        assert!(f[1].contains("at 200 connections: latency p99 90.0ms exceeds --max-p99 50.0ms"));
        assert!(check(&r, &Thresholds::default()).is_empty());
    }
}
