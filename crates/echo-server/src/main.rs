use std::process::ExitCode;

use clap::Parser;
use tokio::runtime::{Builder, LocalOptions};
use tracing::error;

use echo_server::cli::{Cli, Command};
use echo_server::config::Config;
use echo_server::limits::FileLimit;
use echo_server::mqtt::auth::Access;
use echo_server::mqtt::{passwd, persist};
use echo_server::{healthcheck, logging, server, supervisor};

/// Exit status for a configuration that was refused (before anything ran).
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Needs no configuration (it writes a file the configuration names).
    if let Some(Command::Passwd { file, user, password, iterations }) = &cli.command {
        return passwd(file, user, password.as_deref(), *iterations);
    }
    if let Some(index) = cli.worker {
        return worker(index);
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

    let workers = config.server.workers.resolve();
    if workers > 1 && config.mqtt.persistence {
        // Each worker has its own broker, and a client's next connection may
        // land on any worker: one file per worker would bring sessions back
        // where their clients are not.
        eprintln!(
            "echo-server: invalid configuration: mqtt.persistence: not available with {workers} workers \
             (server.workers): each worker has its own broker; run one worker to persist MQTT state"
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    if workers > 1 {
        return supervisor::main(config, workers);
    }
    serve(config, mqtt_access, false, |_| {})
}

/// Runs worker `index` of a supervisor (`echo_server::supervisor`): the
/// configuration comes as TOML on standard input, already checked by the
/// supervisor; the `Ready` report goes out as one JSON line on standard
/// output.
fn worker(index: u16) -> ExitCode {
    let mut text = String::new();
    if let Err(err) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
        eprintln!("echo-server worker {index}: cannot read the configuration: {err}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let config = match toml::from_str::<Config>(&text).map_err(|e| e.to_string()).and_then(|config| {
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("echo-server worker {index}: invalid configuration: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let mqtt_access = match Access::load(&config.mqtt) {
        Ok(access) => access,
        Err(err) => {
            eprintln!("echo-server worker {index}: invalid configuration: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    serve(config, mqtt_access, true, |ready| {
        use std::io::Write;
        let line = serde_json::to_string(ready).expect("the report serializes");
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    })
}

/// Runs one server process: the single server, or one worker (`shared`:
/// its listeners share their ports with the other workers').
fn serve(
    config: Config,
    mqtt_access: Access,
    shared: bool,
    on_ready: impl FnOnce(&server::Ready),
) -> ExitCode {
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
    let bound = match server::bind_all(&config, mqtt_access, shared) {
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
    let summary = runtime.block_on(server::run(config, bound, files, restored, on_ready));
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
