//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, Overrides};

/// A WebSocket echo server and MQTT broker for thousands of clients on one
/// event-loop thread.
///
/// Configuration layers, lowest to highest: built-in defaults (documented in
/// config/server.toml), --config FILE, ECHO_<SECTION>_<KEY> environment
/// variables (e.g. ECHO_WEBSOCKET_MAX_CONNECTIONS=5000), then these flags.
#[derive(Debug, Parser)]
#[command(name = "echo-server", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML, see config/server.toml).
    #[arg(short, long, env = "ECHO_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// WebSocket listen address; repeat for several (sets websocket.listen).
    #[arg(long = "ws-listen", value_name = "ADDR")]
    pub ws_listen: Vec<SocketAddr>,

    /// MQTT listen address; repeat for several (sets mqtt.listen).
    #[arg(long = "mqtt-listen", value_name = "ADDR", conflicts_with = "no_mqtt")]
    pub mqtt_listen: Vec<SocketAddr>,

    /// Run without the MQTT port (MQTT over WebSocket stays; see mqtt.websocket).
    #[arg(long)]
    pub no_mqtt: bool,

    /// Admin listen address for /healthz, /readyz, /metrics (sets admin.listen).
    #[arg(long, value_name = "ADDR", conflicts_with = "no_admin")]
    pub admin_listen: Vec<SocketAddr>,

    /// Run without the admin listener.
    #[arg(long)]
    pub no_admin: bool,

    /// Most WebSocket connections at once; 0 derives it from the open-file limit.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u32>,

    /// Log filter in RUST_LOG syntax (sets log.level).
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log line format (sets log.format).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// How long shutdown waits for clients, e.g. "5s" (sets server.shutdown_grace).
    #[arg(long, value_name = "DURATION")]
    pub shutdown_grace: Option<String>,

    /// Worker processes sharing the ports: a number, or "auto" for one per
    /// CPU (sets server.workers).
    #[arg(long, value_name = "N|auto")]
    pub workers: Option<String>,

    /// Internal: run as worker INDEX of a supervisor, reading the
    /// configuration as TOML from standard input.
    #[arg(long = "worker-of-supervisor", value_name = "INDEX", hide = true)]
    pub worker: Option<u16>,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exit 0 if the server's /healthz answers 200 (for container HEALTHCHECKs).
    Healthcheck {
        /// host:port of the admin listener; default: from the configuration.
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// Give up after this long, e.g. "3s".
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Set USER's password in FILE, a password file for mqtt.password_file
    /// (Mosquitto's format: mosquitto_passwd reads it, and this reads
    /// mosquitto_passwd's). The file is created if missing; the user's line
    /// is replaced if there is one. The password is read from the first
    /// line of standard input unless --password is given.
    Passwd {
        /// The password file.
        file: PathBuf,
        /// The username (no ':').
        user: String,
        /// The password (visible to other users in the process list: prefer
        /// standard input).
        #[arg(long)]
        password: Option<String>,
        /// PBKDF2-SHA512 iterations (mosquitto_passwd uses 101).
        #[arg(long, default_value_t = crate::mqtt::passwd::DEFAULT_ITERATIONS)]
        iterations: u32,
    },
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            websocket_listen: self.ws_listen.clone(),
            mqtt_listen: self.mqtt_listen.clone(),
            no_mqtt: self.no_mqtt,
            admin_listen: self.admin_listen.clone(),
            no_admin: self.no_admin,
            max_connections: self.max_connections,
            log_level: self.log_level.clone(),
            log_format: self.log_format,
            shutdown_grace: self.shutdown_grace.clone(),
            workers: self.workers.clone(),
        }
    }
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
    fn flags_become_overrides() {
        let cli = Cli::parse_from([
            "echo-server",
            "--ws-listen",
            "127.0.0.1:0",
            "--ws-listen",
            "[::1]:0",
            "--max-connections",
            "7",
            "--log-format",
            "json",
        ]);
        let o = cli.overrides();
        assert_eq!(o.websocket_listen.len(), 2);
        assert_eq!(o.max_connections, Some(7));
        assert_eq!(o.log_format, Some(LogFormat::Json));
    }

    #[test]
    fn passwd_takes_a_file_and_a_user() {
        let cli = Cli::parse_from(["echo-server", "passwd", "/tmp/p", "alice", "--iterations", "5"]);
        match cli.command {
            Some(Command::Passwd { file, user, password, iterations }) => {
                assert_eq!(
                    (file.to_str(), user.as_str(), password, iterations),
                    (Some("/tmp/p"), "alice", None, 5)
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
