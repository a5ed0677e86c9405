//! The command line.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::scenario::Scenario;

/// Load generator for WebSocket echo servers and MQTT brokers.
///
/// Holds growing numbers of connections (--steps), sends at a constant rate
/// on each (--rate), checks every echo, and reports latency (from the
/// scheduled send time), throughput, errors by kind and the server's memory
/// and CPU per step.
#[derive(Debug, Parser)]
#[command(
    name = "echo-loadgen",
    version,
    about,
    long_about = None,
    arg_required_else_help = true,
    override_usage = "echo-loadgen [run] [OPTIONS] [URL]\n       echo-loadgen <COMMAND>",
    after_help = "`run` is the default: `echo-loadgen ws://HOST:PORT/ --steps 1000` is \
                  `echo-loadgen run ws://HOST:PORT/ --steps 1000` (see `echo-loadgen run --help`)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Measure a server (the default: `echo-loadgen URL ...` is `echo-loadgen run URL ...`).
    ///
    /// Settings come from --scenario FILE (TOML, same names as these flags)
    /// and are overridden by the flags given here.
    ///
    /// Exit status: 0 done, 1 the run failed, 2 bad settings or no usable
    /// server at the URL (nothing was measured), 3 a threshold was crossed,
    /// 130 interrupted (Ctrl-C; the completed steps are reported).
    // No flag of `run` looks like a number, so `--rate -1` reaches the rate's
    // own check ("cannot be negative") instead of clap's "unexpected argument".
    #[command(allow_negative_numbers = true)]
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
    /// WebSocket and MQTT clients in one run, in phases (by default an MQTT connect storm).
    ///
    /// The WebSocket clients' latency before, while the MQTT clients connect
    /// (by default all at once), while they stay, and while they leave; MQTT
    /// connects per second; the server's CPU and memory per phase, its
    /// threads' CPU and CPU-wait time, and its event-loop lag.
    #[command(visible_alias = "storm")]
    Mixed {
        #[command(flatten)]
        args: Box<crate::mixed::MixedArgs>,
    },
    /// Rounds of fresh MQTT clients that come and go: the server memory kept per client gone.
    ///
    /// Each client has a client id never used before, connects with a clean
    /// session, optionally subscribes to a topic of its own, sends
    /// DISCONNECT and waits for the broker to close; the server's RSS is read
    /// after every round.
    Churn {
        #[command(flatten)]
        args: Box<crate::churn::ChurnArgs>,
    },
    /// (internal) A worker process, driven by `run` over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

/// Makes `run` the default subcommand: when the first argument is neither a
/// subcommand nor help/version but looks like an argument of `run` (a
/// `--flag`, or an address such as `ws://host:8080/`), `run` is put in front
/// of it. A bare word (`merg`) is left alone, so that clap reports the
/// unknown subcommand and suggests the one meant.
pub fn with_default_command(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    let Some(first) = args.get(1).map(|a| a.to_string_lossy().into_owned()) else { return args };
    let cmd = Cli::command();
    let is_command = first == "help"
        || cmd.get_subcommands().any(|c| c.get_name() == first || c.get_all_aliases().any(|a| a == first));
    let is_own_flag = ["-h", "--help", "-V", "--version"].contains(&first.as_str());
    let for_run = first.starts_with('-') || first.contains([':', '/']);
    if !is_command && !is_own_flag && for_run {
        args.insert(1, "run".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn rewrite(args: &[&str]) -> Vec<String> {
        with_default_command(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn run_is_the_default_subcommand() {
        // A URL or a flag of `run` first: `run` is implied.
        assert_eq!(rewrite(&["elg", "ws://h:8080/", "-c", "5"]), ["elg", "run", "ws://h:8080/", "-c", "5"]);
        assert_eq!(rewrite(&["elg", "--steps", "5", "mqtt://h"]), ["elg", "run", "--steps", "5", "mqtt://h"]);
        assert_eq!(rewrite(&["elg", "-q", "ws://h/"]), ["elg", "run", "-q", "ws://h/"]);
        assert_eq!(rewrite(&["elg", "localhost:8080"]), ["elg", "run", "localhost:8080"]);
        // Subcommands, help and version stay as they are.
        for args in [
            &["elg", "run", "ws://h/"][..],
            &["elg", "merge", "a.json"],
            &["elg", "compare", "a.json"],
            &["elg", "mixed", "ws://h/", "mqtt://h"],
            &["elg", "storm", "ws://h/", "mqtt://h"],
            &["elg", "churn", "mqtt://h"],
            &["elg", "worker"],
            &["elg", "help", "run"],
            &["elg", "--help"],
            &["elg", "-h"],
            &["elg", "-V"],
            &["elg", "--version"],
            &["elg"],
            // A misspelt subcommand is clap's to report ("did you mean merge?").
            &["elg", "merg", "a.json"],
        ] {
            assert_eq!(rewrite(args), args, "{args:?}");
        }
        let cli = Cli::parse_from(with_default_command(
            ["elg", "ws://127.0.0.1:8080/", "--rate", "max"].map(OsString::from),
        ));
        let Cmd::Run { settings, .. } = cli.command else { panic!("not run") };
        assert_eq!(settings.url.as_deref(), Some("ws://127.0.0.1:8080/"));
    }

    #[test]
    fn help_lists_the_subcommands_and_names_the_default() {
        let help = Cli::command().render_help().to_string();
        for word in ["run", "merge", "compare", "mixed", "storm", "churn", "`run` is the default"] {
            assert!(help.contains(word), "{word:?} missing from\n{help}");
        }
        assert!(!help.contains("worker"), "the internal subcommand is hidden:\n{help}");
    }
}
