use std::process::ExitCode;

use clap::Parser;
use tokio::runtime::{Builder, LocalOptions};
use tracing::error;

use echo_server::cli::{Cli, Command};
use echo_server::config::Config;
use echo_server::limits::FileLimit;
use echo_server::mqtt::auth::Access;
use echo_server::mqtt::{passwd, persist};
use echo_server::{healthcheck, logging, server};

/// Exit status for a configuration that was refused (before anything ran).
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Needs no configuration (it writes a file the configuration names).
    if let Some(Command::Passwd { file, user, password, iterations }) = &cli.command {
        return passwd(file, user, password.as_deref(), *iterations);
    }
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

    // Read once, now: a bad line is a configuration error, reported before
    // anything is bound.
    let mqtt_access = match Access::load(&config.mqtt) {
        Ok(access) => access,
        Err(err) => {
            eprintln!("echo-server: invalid configuration: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };

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
    // The MQTT persistence snapshot, before anything is bound: a corrupt
    // file with mqtt.persistence_corrupt = "refuse" stops the server here.
    let restored = if config.mqtt.persistence {
        if let Err(err) = persist::check_directory(&config.mqtt) {
            eprintln!("echo-server: invalid configuration: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        match persist::load(&config.mqtt) {
            Ok(snapshot) => snapshot,
            Err(err) => {
                error!("{err}");
                eprintln!("echo-server: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let bound = match server::bind_all(&config, mqtt_access) {
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
    let summary = runtime.block_on(server::run(config, bound, files, restored));
    if summary.router_failed {
        return ExitCode::from(server::EXIT_ROUTER_FAILED);
    }
    ExitCode::SUCCESS
}

/// `echo-server passwd FILE USER`: the password from `--password`, or else
/// the first line of standard input (so that it stays out of the process
/// list and the shell's history: `echo-server passwd FILE USER < secret`).
fn passwd(file: &std::path::Path, user: &str, password: Option<&str>, iterations: u32) -> ExitCode {
    let password = match password {
        Some(password) => password.to_owned(),
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("Password for {user} (one line, shown as typed):");
            }
            let mut line = String::new();
            if let Err(err) = std::io::stdin().read_line(&mut line) {
                eprintln!("echo-server passwd: cannot read the password: {err}");
                return ExitCode::FAILURE;
            }
            line.trim_end_matches(['\n', '\r']).to_owned()
        }
    };
    match passwd::set_password(file, user, &password, iterations) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("echo-server passwd: {err}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}
