//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::scenario::Scenario;

/// Load generator for WebSocket echo servers and MQTT brokers.
///
/// Holds growing numbers of connections (--steps), sends at a constant rate
/// on each (--rate), checks every echo, and reports latency (from the
/// scheduled send time), throughput, errors by kind and the server's memory
/// and CPU per step.
#[derive(Debug, Parser)]
#[command(name = "echo-loadgen", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Measure a server.
    ///
    /// Settings come from --scenario FILE (TOML, same names as these flags)
    /// and are overridden by the flags given here.
    ///
    /// Exit status: 0 done, 1 the run failed, 2 bad settings or no usable
    /// server at the URL (nothing was measured), 3 a threshold was crossed,
    /// 130 interrupted (Ctrl-C; the completed steps are reported).
    Run {
        /// Scenario file (see loadtest/scenarios/).
        #[arg(long, value_name = "FILE")]
        scenario: Option<PathBuf>,
        /// No live view; only the final table.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        settings: Box<Scenario>,
    },
    /// Merge result files of runs that loaded one server at the same time
    /// (e.g. from several machines): step by step, histograms added exactly.
    Merge {
        /// Result files written by `run --json`.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Write the merged result as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Write the merged per-step table as CSV.
        #[arg(long, value_name = "FILE")]
        csv: Option<PathBuf>,
        /// Draw the merged result (SVG).
        #[arg(long, value_name = "FILE")]
        chart: Option<PathBuf>,
    },
    /// Draw several results into one comparison chart (SVG), each run in its
    /// own colour, and print their tables.
    Compare {
        /// Result files written by `run --json`.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Where to write the chart.
        #[arg(long, value_name = "FILE")]
        chart: Option<PathBuf>,
        /// Write a Markdown table of the runs' last steps with ratios to the first run.
        #[arg(long, value_name = "FILE")]
        markdown: Option<PathBuf>,
    },
    /// (internal) A worker process, driven by `run` over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_url_and_settings() {
        let cli =
            Cli::parse_from(["echo-loadgen", "run", "ws://127.0.0.1:8080/", "--steps", "10,20", "-r", "max"]);
        let Cmd::Run { settings, .. } = cli.command else { panic!() };
        assert_eq!(settings.url.as_deref(), Some("ws://127.0.0.1:8080/"));
        assert_eq!(settings.steps.unwrap().0, vec![10, 20]);
    }
}
