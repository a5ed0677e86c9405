use std::process::ExitCode;

use clap::Parser;
use tokio::runtime::{Builder, LocalOptions};
use tracing::error;

use echo_server::cli::{Cli, Command};
use echo_server::config::Config;
use echo_server::limits::FileLimit;
use echo_server::{healthcheck, logging, server};

/// Exit status for a configuration that was refused (before anything ran).
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), std::env::vars(), &cli.overrides()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("echo-server: invalid configuration: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };

    if let Some(Command::Healthcheck { addr, timeout }) = &cli.command {
        let target = match addr {
            Some(addr) => addr.clone(),
            None => match healthcheck::target(&config.admin.listen) {
                Some(addr) => addr.to_string(),
                None => {
                    eprintln!("echo-server healthcheck: the admin listener is off (admin.listen is empty)");
                    return ExitCode::FAILURE;
                }
            },
        };
        return match healthcheck::check(&target, *timeout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(reason) => {
                eprintln!("echo-server healthcheck: {reason}");
                ExitCode::FAILURE
            }
        };
    }

    if cli.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }

    logging::init(&config.log);
    logging::log_panics();
    let files = FileLimit::raise();
    // Before any other thread starts (see the function's docs).
    match files.presize_descriptor_table() {
        Some(size) => tracing::debug!(descriptors = size, "descriptor table presized"),
        None => tracing::warn!(
            "could not presize the descriptor table: the event loop may stall for a moment each time it grows"
        ),
    }
    let bound = match server::bind_all(&config) {
        Ok(bound) => bound,
        Err(err) => {
            error!("{err}");
            eprintln!("echo-server: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The one event loop: every client socket is served by this thread.
    let runtime = match Builder::new_current_thread().enable_all().build_local(LocalOptions::default()) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("echo-server: cannot start the event loop: {err}");
            return ExitCode::FAILURE;
        }
    };
    let summary = runtime.block_on(server::run(config, bound, files));
    if summary.router_failed {
        return ExitCode::from(server::EXIT_ROUTER_FAILED);
    }
    ExitCode::SUCCESS
}
