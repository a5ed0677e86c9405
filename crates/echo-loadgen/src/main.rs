use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use echo_loadgen::cli::{Cli, Cmd};
use echo_loadgen::coordinator::{self, Plan};
use echo_loadgen::result::RunResult;
use echo_loadgen::scenario::{Scenario, Settings};
use echo_loadgen::target::Target;
use echo_loadgen::usage::ServerProbe;
use echo_loadgen::{chart, net, preflight, report, worker};

/// Bad settings or no usable server: nothing was measured.
const EXIT_BAD_INPUT: u8 = 2;
/// The run finished but crossed a threshold.
const EXIT_THRESHOLD: u8 = 3;
/// Ctrl-C: the completed steps were reported.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse_from(echo_loadgen::cli::with_default_command(std::env::args_os()));
    match cli.command {
        Cmd::Worker => match worker::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("echo-loadgen worker: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run { scenario, quiet, settings } => run(scenario, quiet, *settings),
        Cmd::Mixed { args } => mixed(*args),
        Cmd::Churn { args } => churn(*args),
        Cmd::Merge { files, json, csv, chart } => match merge(&files, json, csv, chart) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_BAD_INPUT, &format!("{e:#}")),
        },
        Cmd::Compare { files, chart, markdown } => {
            match compare(&files, chart.as_deref(), markdown.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_BAD_INPUT, &format!("{e:#}")),
            }
        }
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("echo-loadgen: {msg}");
    ExitCode::from(code)
}

fn run(file: Option<PathBuf>, quiet: bool, cli: Scenario) -> ExitCode {
    let scenario = match file {
        Some(path) => match Scenario::load(&path) {
            Ok(base) => cli.over(base),
            Err(e) => return fail(EXIT_BAD_INPUT, &e),
        },
        None => cli,
    };
    let settings = match Settings::resolve(&scenario) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_BAD_INPUT, &e),
    };
    let target = match Target::parse(&settings.url) {
        Ok(t) => t,
        Err(e) => return fail(EXIT_BAD_INPUT, &e),
    };
    let fd_limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(_, hard)| hard).unwrap_or(1024);
    let workers = match preflight::workers_needed(&settings, scenario.workers, fd_limit) {
        Ok(w) => w,
        Err(e) => return fail(EXIT_BAD_INPUT, &e),
    };
    if let Err(e) = preflight::sources_suffice(&settings, target.addr.ip(), net::ephemeral_ports()) {
        return fail(EXIT_BAD_INPUT, &e);
    }
    let threads = scenario.threads.unwrap_or_else(|| (coordinator::cpus() / workers).max(1));
    let server = match (scenario.server_pid, scenario.server_metrics.clone()) {
        (Some(_), Some(_)) => return fail(EXIT_BAD_INPUT, "give --server-pid or --server-metrics, not both"),
        (Some(pid), None) => Some(ServerProbe::Pid(pid)),
        (None, Some(url)) => Some(ServerProbe::Metrics { url, protocol: target.protocol }),
        (None, None) => None,
    };
    if let Some(probe) = &server
        && let Err(e) = probe.sample()
    {
        return fail(EXIT_BAD_INPUT, &e);
    }
    let checked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(preflight::probe(&target, &settings)));
    if let Err(e) = checked {
        return fail(EXIT_BAD_INPUT, &e);
    }
    let thresholds =
        report::Thresholds { max_error_rate: scenario.max_error_rate, max_p99: scenario.max_p99 };
    let server_log = scenario.server_log.clone();
    let plan = Plan { settings, target, workers, threads, server, server_log, live: !quiet, nice: 0 };
    coordinator::catch_interrupts();
    let mut result = match coordinator::run(plan) {
        Ok(r) => r,
        // Before the first step (waiting for --start-at): nothing to report.
        Err(e) if coordinator::interrupted() => return fail(EXIT_INTERRUPTED, &format!("{e:#}")),
        Err(e) => return fail(1, &format!("{e:#}")),
    };
    let crossed = report::check(&result, &thresholds);
    result.failures.extend(crossed);
    if let Err(e) =
        write_outputs(&result, scenario.json.as_deref(), scenario.csv.as_deref(), scenario.chart.as_deref())
    {
        eprintln!("echo-loadgen: {e:#}");
        print!("{}", report::table(&result));
        return ExitCode::FAILURE;
    }
    print!("{}", report::table(&result));
    if result.failures.iter().any(|f| f.starts_with("interrupted")) {
        eprintln!("echo-loadgen: {}", result.failures.join("; "));
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    if result.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &result.failures {
            eprintln!("echo-loadgen: threshold crossed {f}");
        }
        ExitCode::from(EXIT_THRESHOLD)
    }
}

fn mixed(args: echo_loadgen::mixed::MixedArgs) -> ExitCode {
    use echo_loadgen::mixed;
    let json = args.json.clone();
    let checked = match mixed::check(args) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_BAD_INPUT, &e),
    };
    coordinator::catch_interrupts();
    let result = match mixed::run(checked) {
        Ok(r) => r,
        Err(e) if coordinator::interrupted() => return fail(EXIT_INTERRUPTED, &format!("interrupted ({e})")),
        Err(e) => return fail(1, &format!("{e:#}")),
    };
    print!("{}", mixed::report(&result));
    if let Some(path) = json
        && let Err(e) = mixed::write_json(&result, &path)
    {
        return fail(1, &format!("{e:#}"));
    }
    ExitCode::SUCCESS
}

fn churn(args: echo_loadgen::churn::ChurnArgs) -> ExitCode {
    use echo_loadgen::churn;
    let (target, probe) = match churn::check(&args) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_BAD_INPUT, &e),
    };
    let json = args.json.clone();
    let result = match churn::run(args, target, probe) {
        Ok(r) => r,
        Err(e) => return fail(1, &format!("{e:#}")),
    };
    print!("{}", churn::report(&result));
    if let Some(path) = json
        && let Err(e) = churn::write_json(&result, &path)
    {
        return fail(1, &format!("{e:#}"));
    }
    ExitCode::SUCCESS
}

fn write_outputs(
    r: &RunResult,
    json: Option<&Path>,
    csv: Option<&Path>,
    chart: Option<&Path>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(r)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = csv {
        std::fs::write(path, report::csv(r)?).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = chart {
        chart::draw(std::slice::from_ref(r), path)?;
    }
    Ok(())
}

fn load(files: &[PathBuf]) -> anyhow::Result<Vec<RunResult>> {
    load_named(files).map(|runs| runs.into_iter().map(|(_, r)| r).collect())
}

fn load_named(files: &[PathBuf]) -> anyhow::Result<Vec<(String, RunResult)>> {
    use anyhow::Context;
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let run = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an echo-loadgen result", f.display()))?;
            Ok((f.display().to_string(), run))
        })
        .collect()
}

fn merge(
    files: &[PathBuf],
    json: Option<PathBuf>,
    csv: Option<PathBuf>,
    chart: Option<PathBuf>,
) -> anyhow::Result<()> {
    let merged = RunResult::merge_named(load_named(files)?).map_err(anyhow::Error::msg)?;
    write_outputs(&merged, json.as_deref(), csv.as_deref(), chart.as_deref())?;
    print!("{}", report::table(&merged));
    Ok(())
}

fn compare(files: &[PathBuf], chart: Option<&Path>, markdown: Option<&Path>) -> anyhow::Result<()> {
    let runs = load(files)?;
    for r in &runs {
        println!("{}", report::table(r));
    }
    let md = report::comparison(&runs);
    print!("{md}");
    if let Some(path) = markdown {
        std::fs::write(path, &md)?;
    }
    if let Some(path) = chart {
        chart::draw(&runs, path)?;
    }
    Ok(())
}
