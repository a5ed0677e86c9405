//! The server's configuration: schema, defaults, layering and validation.
//!
//! Layers, lowest to highest precedence: the built-in defaults (this file's
//! `Default` impls, documented line by line in `config/server.toml`, which a
//! test keeps identical), then `--config FILE`, then `ECHO_<SECTION>_<KEY>`
//! environment variables, then command-line flags.
//!
//! Everything is checked before a single socket is bound: an unknown key, a
//! value of the wrong type or an impossible value is reported with the key's
//! full name, and the process exits with status 2.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "ECHO_";

/// The whole configuration, one struct per `[section]` of the TOML file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub websocket: WebSocketConfig,
    pub mqtt: MqttConfig,
    pub cluster: ClusterConfig,
    pub admin: AdminConfig,
}

/// Process-wide behaviour: shutdown and the periodic summary line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// How long a graceful shutdown waits for clients to finish closing.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Period of the `info` summary line; zero turns it off.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Bytes of memory the server may use before it refuses new
    /// connections, publishes and subscriptions (see `budget`); 0 means
    /// three quarters of what the process may use.
    pub memory_limit: u64,
    /// How many worker processes, each one event loop, share the ports
    /// (`crate::supervisor`); 1 is a single process, no supervisor.
    pub workers: Workers,
}

/// `server.workers`: a count, or `"auto"` for one per CPU the process may
/// use (its affinity mask and cgroup CPU quota count, see
/// [`Workers::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Count(u16),
    Auto,
}

/// The most workers accepted: far past any CPU count this server is run on,
/// low enough that a typo does not fork the machine to death.
pub const MAX_WORKERS: u16 = 1024;

impl Workers {
    /// The number of worker processes to run.
    pub fn resolve(self) -> u16 {
        match self {
            Workers::Count(n) => n,
            // Rust's std reads sched_getaffinity and the cgroup (v1 and v2)
            // CPU quota on Linux, rounding a fractional quota up.
            Workers::Auto => std::thread::available_parallelism()
                .map_or(1, |n| u16::try_from(n.get()).unwrap_or(MAX_WORKERS).min(MAX_WORKERS)),
        }
    }
}

impl Serialize for Workers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Count(n) => serializer.serialize_u16(*n),
            Workers::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Workers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a number of worker processes (1 to {MAX_WORKERS}) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Workers, E> {
                match u16::try_from(n) {
                    Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(Workers::Count(n)),
                    _ => {
                        Err(E::custom(format!("{n} is outside 1..={MAX_WORKERS} (or \"auto\": one per CPU)")))
                    }
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Workers, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => {
                        Err(E::custom(format!("{n} is outside 1..={MAX_WORKERS} (or \"auto\": one per CPU)")))
                    }
                }
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Workers, E> {
                // The command line gives every value as text.
                match text.trim() {
                    "auto" => Ok(Workers::Auto),
                    other => match other.parse::<u64>() {
                        Ok(n) => self.visit_u64(n),
                        Err(_) => Err(E::custom(format!(
                            "{text:?} is neither a number of worker processes nor \"auto\""
                        ))),
                    },
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(5),
            stats_interval: Duration::from_secs(10),
            memory_limit: 0,
            workers: Workers::Count(1),
        }
    }
}

/// Output format of the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging: what is written and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A filter in `RUST_LOG` syntax. The `RUST_LOG` variable sets it too,
    /// as part of the environment layer (over the file, under the flags).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".to_owned(), format: LogFormat::Text }
    }
}

/// The WebSocket echo listener and the limits of each WebSocket connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Zero means "as many as the open-file limit allows".
    pub max_connections: u32,
    pub backlog: u32,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    pub max_request_header_size: u32,
    pub max_request_headers: u32,
    pub max_message_size: u32,
    pub max_frame_size: u32,
    pub read_buffer_size: u32,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Answer plain HTTP requests (not upgrades, not the page or what it
    /// loads) with what the server received (`ws::http_echo`); off: 404 /
    /// 405 as before.
    pub http_echo: bool,
    /// Largest HTTP request body accepted, in bytes: it is held whole while
    /// it is echoed.
    pub max_request_body_size: u32,
    /// Name the host in an `X-Served-By` header on every HTTP answer and
    /// in a first text message on echo sessions (`ws::replica`).
    pub send_server_hostname: bool,
    /// Serve Server-Sent Events at `/.sse` (`ws::sse`); off: 404 there.
    pub sse: bool,
    /// Time between two events of every Server-Sent Events stream.
    #[serde(with = "humantime_serde")]
    pub sse_interval: Duration,
    /// PEM files; both empty means plain TCP (`ws://`, `http://`), both
    /// set means TLS on every listener of the port (`wss://`, `https://`).
    pub tls_cert: String,
    pub tls_key: String,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 8080))],
            max_connections: 0,
            backlog: 4096,
            handshake_timeout: Duration::from_secs(10),
            max_request_header_size: 8192,
            max_request_headers: 100,
            max_message_size: 16 << 20,
            max_frame_size: 16 << 20,
            read_buffer_size: 8192,
            write_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            http_echo: true,
            max_request_body_size: 1 << 20,
            send_server_hostname: false,
            sse: true,
            sse_interval: Duration::from_secs(1),
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

/// The MQTT broker: its listener, the limits of each MQTT connection, the
/// router's memory bounds, and optional authentication and TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// An empty list turns the MQTT port off (MQTT over WebSocket stays).
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Serve MQTT over WebSocket on the WebSocket port (subprotocol `mqtt`).
    pub websocket: bool,
    /// Zero means "what the open-file limit leaves" (see `limits`).
    pub max_connections: u32,
    pub backlog: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// CONNECTs being processed at once (the rest wait their turn).
    pub connect_concurrency: u32,
    pub max_payload_size: u32,
    /// Largest CONNECT accepted, in bytes: what a client that has not yet
    /// connected (or authenticated) can make the server buffer.
    pub max_connect_size: u32,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Where rumqttd's router runs: a task on the event loop, or a thread
    /// of its own.
    pub router: RouterPlacement,
    /// Router: publishes handed to one subscriber per sweep.
    pub max_outgoing_packet_count: u32,
    /// Router: bytes per segment of each subscribed topic's log.
    pub segment_size: u32,
    /// Router: segments kept in memory per subscribed topic's log.
    pub segment_count: u32,
    /// Most messages one session may have waiting in the topic logs,
    /// over all its filters (Mosquitto's `max_queued_messages`); 0: no cap.
    pub max_queued_messages: u32,
    /// The same in bytes of topic and payload (Mosquitto's
    /// `max_queued_bytes`); 0: no cap.
    pub max_queued_bytes: u64,
    /// Longest client id accepted, in bytes (the router copies it into
    /// several of its maps).
    pub max_client_id_length: u32,
    /// Most distinct filters one session may hold.
    pub max_subscriptions: u32,
    /// Longest topic name or filter accepted, in bytes.
    pub max_topic_length: u32,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: u32,
    /// MQTT 5 topic aliases a client may set (CONNACK's Topic Alias
    /// Maximum); 0: none.
    pub topic_alias_maximum: u16,
    /// QoS 1 and 2 publishes a client may have in flight towards the
    /// server (CONNACK's Receive Maximum).
    pub receive_maximum: u16,
    /// QoS 1 and 2 publishes the server sends a client before it waits
    /// for acknowledgements (Mosquitto's `max_inflight_messages`); an MQTT
    /// 5 client's lower Receive Maximum wins.
    pub max_inflight_messages: u16,
    /// Empty means "no authentication".
    pub username: String,
    pub password: String,
    /// Users and hashed passwords, Mosquitto's format; "" is off.
    pub password_file: String,
    /// Who may publish and subscribe where, Mosquitto's `acl_file`
    /// format; "" is off (everything allowed).
    pub acl_file: String,
    /// PEM files; both empty means plain TCP.
    pub tls_cert: String,
    pub tls_key: String,
    /// How often the broker's statistics go out under `$SYS/broker/...`
    /// (`mqtt::sys`); `0s` turns them off.
    #[serde(with = "humantime_serde")]
    pub sys_interval: Duration,
    /// Keep retained messages and persistent sessions across restarts
    /// (`mqtt::persist`), as Mosquitto's `persistence true`.
    pub persistence: bool,
    /// The snapshot file (Mosquitto's `persistence_location` +
    /// `persistence_file`).
    pub persistence_file: String,
    /// How often the snapshot is written besides at shutdown (Mosquitto's
    /// `autosave_interval`); `0s`: only at shutdown.
    #[serde(with = "humantime_serde")]
    pub persistence_interval: Duration,
    /// What a corrupt or truncated snapshot file at start leads to.
    pub persistence_corrupt: CorruptSnapshot,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 1883))],
            websocket: true,
            max_connections: 0,
            backlog: 4096,
            connect_timeout: Duration::from_secs(10),
            connect_concurrency: 32,
            max_payload_size: 1 << 20,
            max_connect_size: 1 << 16,
            write_timeout: Duration::from_secs(30),
            router: RouterPlacement::Thread,
            max_outgoing_packet_count: 200,
            segment_size: 32 * 1024,
            segment_count: 4,
            max_queued_messages: 1000,
            max_queued_bytes: 8 * 1024 * 1024,
            max_client_id_length: 256,
            max_subscriptions: 1000,
            max_topic_length: 1024,
            max_topic_levels: 32,
            topic_alias_maximum: 10,
            receive_maximum: 32,
            max_inflight_messages: 100,
            username: String::new(),
            password: String::new(),
            password_file: String::new(),
            acl_file: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            sys_interval: Duration::from_secs(10),
            persistence: false,
            persistence_file: "mqtt-persistence.db".to_owned(),
            persistence_interval: Duration::from_secs(300),
            persistence_corrupt: CorruptSnapshot::Refuse,
        }
    }
}

/// What a corrupt or truncated snapshot file at start leads to
/// (`mqtt.persistence_corrupt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CorruptSnapshot {
    /// Start without the persisted state; the file is kept aside as
    /// `FILE.corrupt` for inspection.
    StartEmpty,
    /// Exit with an error before binding any port.
    Refuse,
}

/// Where rumqttd's router runs (`mqtt.router`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterPlacement {
    /// A task on the event loop, beside the sessions: no thread crossing
    /// per message.
    EventLoop,
    /// A thread of its own (`router-0`).
    Thread,
}

/// The MQTT cluster: brokers of several workers and nodes bridged over
/// NATS (`crate::cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The NATS server(s), `nats://host:port` (a comma-separated list for
    /// several); "" is off: each broker serves only its own clients.
    pub nats_url: String,
    /// The first tokens of every subject the bridge uses, so that several
    /// clusters can share one NATS server.
    pub subject_prefix: String,
    /// Publishes waiting to go to NATS; past it they are dropped, and
    /// counted.
    pub buffer: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { nats_url: String::new(), subject_prefix: "echo.mqtt".to_owned(), buffer: 8192 }
    }
}

/// The admin listener: health, readiness and Prometheus metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// An empty list turns the admin listener off.
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: vec![SocketAddr::from(([0, 0, 0, 0], 9090))] }
    }
}

/// Accepts `"127.0.0.1:8080"` as well as `["127.0.0.1:8080", "[::1]:8080"]`.
/// An address that does not parse is quoted back in the error: the key
/// alone does not tell which entry of a list was wrong.
fn one_or_many<'de, D>(deserializer: D) -> Result<Vec<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a socket address such as \"0.0.0.0:8080\" or a list of them")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let texts = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => vec![text],
        OneOrMany::Many(texts) => texts,
    };
    texts
        .iter()
        .map(|text| {
            text.parse().map_err(|_| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a socket address: expected IP:PORT, such as \"0.0.0.0:8080\" or \"[::]:8080\" \
                     (host names are not resolved)"
                ))
            })
        })
        .collect()
}

/// Values given on the command line; each one that is set overrides its key.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub websocket_listen: Vec<SocketAddr>,
    pub mqtt_listen: Vec<SocketAddr>,
    pub no_mqtt: bool,
    pub admin_listen: Vec<SocketAddr>,
    pub no_admin: bool,
    pub max_connections: Option<u32>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    /// A duration as written in the file, such as "2s".
    pub shutdown_grace: Option<String>,
    /// `server.workers` as given: a count or "auto".
    pub workers: Option<String>,
}

/// Why a configuration was refused. The message always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Unreadable { path: String, source: std::io::Error },
    #[error("{path}:{line}:{column}: not valid TOML: {message}")]
    Syntax { path: String, line: usize, column: usize, message: String },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

const MIN_SSE_INTERVAL: Duration = Duration::from_millis(10);
/// `mqtt.sys_interval`, when not 0: each interval costs a few counter
/// reads and up to a dozen small publishes on the event loop.
const MIN_SYS_INTERVAL: Duration = Duration::from_millis(100);
const MAX_SYS_INTERVAL: Duration = Duration::from_secs(86_400);
/// `mqtt.persistence_interval`, when not 0: each write copies the whole
/// persisted state.
const MIN_PERSISTENCE_INTERVAL: Duration = Duration::from_millis(100);
const MAX_SSE_INTERVAL: Duration = Duration::from_secs(86_400);

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

impl Config {
    /// Builds the effective configuration from every layer and validates it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // Figment silently skips a missing file; a typo in `--config`
            // must not fall back to the defaults, so read it ourselves.
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Unreadable { path: path.display().to_string(), source })?;
            // A syntax error, as one line with its position: figment would
            // pass on the TOML parser's multi-line drawing of it.
            if let Err(e) = text.parse::<toml::Table>() {
                return Err(syntax_error(path, &text, &e));
            }
            figment = figment.merge(Toml::string(&text));
        }
        figment = figment.merge(EnvLayer::new(env));
        figment = apply_overrides(figment, overrides);
        let config: Config = figment.extract().map_err(|e| {
            let mut msgs = Vec::new();
            for err in e {
                msgs.push(describe(&err, file));
            }
            ConfigError::Parse(msgs.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as TOML, as `--print-config` shows it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration always serializes")
    }

    /// Checks what types alone cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let limit = self.server.memory_limit;
        if limit != 0 && limit < crate::budget::MIN_LIMIT {
            return Err(invalid(
                "server.memory_limit",
                format!(
                    "{limit} is under {} bytes (32 MiB), which the server itself needs",
                    crate::budget::MIN_LIMIT
                ),
            ));
        }
        let ws = &self.websocket;
        if ws.listen.is_empty() {
            return Err(invalid("websocket.listen", "needs at least one address"));
        }
        positive("websocket.backlog", ws.backlog)?;
        positive_duration("websocket.handshake_timeout", ws.handshake_timeout)?;
        positive_duration("websocket.write_timeout", ws.write_timeout)?;
        positive_duration("websocket.close_timeout", ws.close_timeout)?;
        if !(1024..=1 << 20).contains(&ws.max_request_header_size) {
            return Err(invalid(
                "websocket.max_request_header_size",
                format!("{} is outside 1024..=1048576 bytes", ws.max_request_header_size),
            ));
        }
        // An upgrade needs five headers; the request head is parsed against
        // an array of this many, allocated for the handshake only.
        if !(8..=1024).contains(&ws.max_request_headers) {
            return Err(invalid(
                "websocket.max_request_headers",
                format!("{} is outside 8..=1024", ws.max_request_headers),
            ));
        }
        positive("websocket.max_message_size", ws.max_message_size)?;
        positive("websocket.max_frame_size", ws.max_frame_size)?;
        if ws.max_frame_size > ws.max_message_size {
            return Err(invalid(
                "websocket.max_frame_size",
                format!(
                    "{} is larger than websocket.max_message_size ({})",
                    ws.max_frame_size, ws.max_message_size
                ),
            ));
        }
        if !(256..=1 << 20).contains(&ws.read_buffer_size) {
            return Err(invalid(
                "websocket.read_buffer_size",
                format!("{} is outside 256..=1048576 bytes", ws.read_buffer_size),
            ));
        }
        if !ws.ping_interval.is_zero() {
            positive_duration("websocket.ping_timeout", ws.ping_timeout)?;
        }
        // A body is held whole while it is echoed: past this, a few clients
        // could hold the memory budget on their own.
        if ws.max_request_body_size > 1 << 30 {
            return Err(invalid(
                "websocket.max_request_body_size",
                format!("{} is over 1073741824 bytes (1 GiB)", ws.max_request_body_size),
            ));
        }
        // Every stream wakes at each tick: below 10 ms, a crowd of streams
        // would keep the event loop busy with nothing else; above a day,
        // the timer's arithmetic gains nothing and a typo is likelier.
        if !(MIN_SSE_INTERVAL..=MAX_SSE_INTERVAL).contains(&ws.sse_interval) {
            return Err(invalid(
                "websocket.sse_interval",
                format!("{} is outside 10ms..=1day", humantime::format_duration(ws.sse_interval)),
            ));
        }
        tls_files(("websocket.tls_cert", &ws.tls_cert), ("websocket.tls_key", &ws.tls_key))?;
        tracing_subscriber::EnvFilter::builder()
            .parse(&self.log.level)
            .map_err(|e| invalid("log.level", format!("{:?} is not a valid filter: {e}", self.log.level)))?;
        for addr in &self.admin.listen {
            if addr.port() != 0 && ws.listen.contains(addr) {
                return Err(invalid("admin.listen", format!("{addr} is also in websocket.listen")));
            }
        }
        self.validate_mqtt()?;
        self.validate_cluster()
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let cluster = &self.cluster;
        if !crate::cluster::subject::valid_prefix(&cluster.subject_prefix) {
            return Err(invalid(
                "cluster.subject_prefix",
                format!(
                    "{:?} is not a NATS subject prefix: tokens of letters, digits, '-' and '_', \
                     separated by '.'",
                    cluster.subject_prefix
                ),
            ));
        }
        if !(16..=1 << 20).contains(&cluster.buffer) {
            return Err(invalid("cluster.buffer", format!("{} is outside 16..=1048576", cluster.buffer)));
        }
        if !cluster.nats_url.is_empty() {
            crate::cluster::parse_urls(&cluster.nats_url)
                .map_err(|reason| invalid("cluster.nats_url", reason))?;
        }
        Ok(())
    }

    fn validate_mqtt(&self) -> Result<(), ConfigError> {
        let mqtt = &self.mqtt;
        for addr in &mqtt.listen {
            if addr.port() == 0 {
                continue;
            }
            if self.websocket.listen.contains(addr) {
                return Err(invalid("mqtt.listen", format!("{addr} is also in websocket.listen")));
            }
            if self.admin.listen.contains(addr) {
                return Err(invalid("mqtt.listen", format!("{addr} is also in admin.listen")));
            }
        }
        positive("mqtt.backlog", mqtt.backlog)?;
        positive_duration("mqtt.connect_timeout", mqtt.connect_timeout)?;
        positive("mqtt.connect_concurrency", mqtt.connect_concurrency)?;
        positive_duration("mqtt.write_timeout", mqtt.write_timeout)?;
        if !mqtt.sys_interval.is_zero() && !(MIN_SYS_INTERVAL..=MAX_SYS_INTERVAL).contains(&mqtt.sys_interval)
        {
            return Err(invalid(
                "mqtt.sys_interval",
                format!(
                    "{} is outside 100ms..=1day (0s turns $SYS off)",
                    humantime::format_duration(mqtt.sys_interval)
                ),
            ));
        }
        if mqtt.persistence && mqtt.persistence_file.is_empty() {
            return Err(invalid("mqtt.persistence_file", "is empty while mqtt.persistence is on"));
        }
        if !mqtt.persistence_interval.is_zero() && mqtt.persistence_interval < MIN_PERSISTENCE_INTERVAL {
            return Err(invalid(
                "mqtt.persistence_interval",
                format!(
                    "{} is below 100ms (0s: write only at shutdown)",
                    humantime::format_duration(mqtt.persistence_interval)
                ),
            ));
        }
        // MQTT's remaining length is at most 268,435,455 bytes.
        if !(64..=268_435_455).contains(&mqtt.max_payload_size) {
            return Err(invalid(
                "mqtt.max_payload_size",
                format!("{} is outside 64..=268435455 bytes", mqtt.max_payload_size),
            ));
        }
        // A CONNECT with a 23-byte client id, credentials and a small will
        // fits in 128 bytes.
        if !(128..=268_435_455).contains(&mqtt.max_connect_size) {
            return Err(invalid(
                "mqtt.max_connect_size",
                format!("{} is outside 128..=268435455 bytes", mqtt.max_connect_size),
            ));
        }
        // rumqttd's router panics below these bounds; refuse them here.
        if !(1..=100_000).contains(&mqtt.max_outgoing_packet_count) {
            return Err(invalid(
                "mqtt.max_outgoing_packet_count",
                format!("{} is outside 1..=100000", mqtt.max_outgoing_packet_count),
            ));
        }
        if mqtt.segment_size < 1024 {
            return Err(invalid("mqtt.segment_size", format!("{} is below 1024 bytes", mqtt.segment_size)));
        }
        if !(1..=1024).contains(&mqtt.segment_count) {
            return Err(invalid("mqtt.segment_count", format!("{} is outside 1..=1024", mqtt.segment_count)));
        }
        // MQTT 5 §3.1.3.1: a server must accept client ids of 1 to 23 bytes.
        if !(23..=65_535).contains(&mqtt.max_client_id_length) {
            return Err(invalid(
                "mqtt.max_client_id_length",
                format!("{} is outside 23..=65535 bytes", mqtt.max_client_id_length),
            ));
        }
        positive("mqtt.max_subscriptions", mqtt.max_subscriptions)?;
        if !(1..=65_535).contains(&mqtt.max_topic_length) {
            return Err(invalid(
                "mqtt.max_topic_length",
                format!("{} is outside 1..=65535 bytes", mqtt.max_topic_length),
            ));
        }
        positive("mqtt.max_topic_levels", mqtt.max_topic_levels)?;
        // rumqttd's router refuses aliases above 4,096 itself.
        if mqtt.topic_alias_maximum > 4096 {
            return Err(invalid(
                "mqtt.topic_alias_maximum",
                format!("{} is above 4096 (rumqttd's own bound)", mqtt.topic_alias_maximum),
            ));
        }
        // MQTT 5 §3.2.2.3.3: 0 is a protocol error.
        positive("mqtt.receive_maximum", u32::from(mqtt.receive_maximum))?;
        positive("mqtt.max_inflight_messages", u32::from(mqtt.max_inflight_messages))?;
        if mqtt.username.is_empty() != mqtt.password.is_empty() {
            let key = if mqtt.username.is_empty() { "mqtt.username" } else { "mqtt.password" };
            return Err(invalid(key, "mqtt.username and mqtt.password are set together or not at all"));
        }
        tls_files(("mqtt.tls_cert", &mqtt.tls_cert), ("mqtt.tls_key", &mqtt.tls_key))
    }

    /// The tungstenite settings that follow from this configuration.
    pub fn tungstenite(&self) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
        let ws = &self.websocket;
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(ws.read_buffer_size as usize)
            // Replies to messages that arrived together are written
            // together; the session flushes as soon as there is nothing
            // more to read, so a lone message is not delayed.
            .write_buffer_size(ws.read_buffer_size as usize)
            // One echoed message plus a control frame is all a session ever
            // queues; anything more is a bug, not a slow client.
            .max_write_buffer_size(ws.max_message_size as usize + (1 << 16))
            .max_message_size(Some(ws.max_message_size as usize))
            .max_frame_size(Some(ws.max_frame_size as usize))
    }
}

/// A TLS certificate and key: set together or not at all, and files that
/// exist (whether they hold usable PEM is checked when they are read,
/// before anything is bound: `crate::tls`).
fn tls_files(cert: (&'static str, &str), key: (&'static str, &str)) -> Result<(), ConfigError> {
    if cert.1.is_empty() != key.1.is_empty() {
        let missing = if cert.1.is_empty() { cert.0 } else { key.0 };
        return Err(invalid(missing, format!("{} and {} are set together or not at all", cert.0, key.0)));
    }
    for (name, path) in [cert, key] {
        if !path.is_empty() && !Path::new(path).is_file() {
            return Err(invalid(name, format!("{path} is not a readable file")));
        }
    }
    Ok(())
}

fn positive(key: &'static str, value: u32) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(())
}

fn positive_duration(key: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be longer than 0s"));
    }
    Ok(())
}

/// The environment layer: `ECHO_WEBSOCKET_MAX_CONNECTIONS=10` sets
/// `websocket.max_connections`. The first word after the prefix is the
/// section, the rest is the key, so keys keep their underscores.
struct EnvLayer(figment::value::Dict);

impl EnvLayer {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        use figment::value::{Dict, Value};
        let mut root = Dict::new();
        let mut rust_log = None;
        for (name, value) in vars {
            // RUST_LOG, the usual way to make one run verbose, is the
            // environment's say on log.level; ECHO_LOG_LEVEL, more specific,
            // wins over it, and --log-level over both.
            if name == "RUST_LOG" && !value.trim().is_empty() {
                rust_log = Some(value);
                continue;
            }
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // ECHO_CONFIG names the file itself; the command line reads it.
            if rest == "CONFIG" {
                continue;
            }
            let rest = rest.to_ascii_lowercase();
            let (section, key) = rest.split_once('_').unwrap_or((rest.as_str(), ""));
            // "10" becomes an integer, "[..]" a list, "5s" stays a string.
            let parsed: Value = value.parse().unwrap_or_else(|_| value.clone().into());
            let entry = root.entry(section.to_owned()).or_insert_with(|| Dict::new().into());
            match (entry, key.is_empty()) {
                (Value::Dict(_, dict), false) => {
                    dict.insert(key.to_owned(), parsed);
                }
                (slot, _) => *slot = parsed,
            }
        }
        if let Some(filter) = rust_log
            && let Value::Dict(_, log) = root.entry("log".to_owned()).or_insert_with(|| Dict::new().into())
        {
            log.entry("level".to_owned()).or_insert_with(|| filter.into());
        }
        EnvLayer(root)
    }
}

impl figment::Provider for EnvLayer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(ENV_LAYER)
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}

const ENV_LAYER: &str = "environment";
const FLAG_LAYER: &str = "command line";

/// The name of the environment variable that sets `key` ("websocket.listen").
pub fn env_var_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replacen('.', "_", 1).to_ascii_uppercase())
}

fn apply_overrides(figment: Figment, o: &Overrides) -> Figment {
    use figment::value::{Dict, Value};
    let mut root = Dict::new();
    let mut set = |key: &str, value: Value| {
        let (section, key) = key.split_once('.').expect("keys are section.key");
        if let Value::Dict(_, dict) = root.entry(section.to_owned()).or_insert_with(|| Dict::new().into()) {
            dict.insert(key.to_owned(), value);
        }
    };
    let addrs = |list: &[SocketAddr]| -> Value {
        list.iter().map(|a| Value::from(a.to_string())).collect::<Vec<_>>().into()
    };
    if !o.websocket_listen.is_empty() {
        set("websocket.listen", addrs(&o.websocket_listen));
    }
    if o.no_mqtt {
        set("mqtt.listen", addrs(&[]));
    } else if !o.mqtt_listen.is_empty() {
        set("mqtt.listen", addrs(&o.mqtt_listen));
    }
    if o.no_admin {
        set("admin.listen", addrs(&[]));
    } else if !o.admin_listen.is_empty() {
        set("admin.listen", addrs(&o.admin_listen));
    }
    if let Some(n) = o.max_connections {
        set("websocket.max_connections", n.into());
    }
    if let Some(level) = &o.log_level {
        set("log.level", level.clone().into());
    }
    if let Some(format) = o.log_format {
        let name = match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        set("log.format", name.into());
    }
    if let Some(grace) = &o.shutdown_grace {
        set("server.shutdown_grace", grace.clone().into());
    }
    if let Some(workers) = &o.workers {
        set("server.workers", workers.clone().into());
    }
    figment.merge(FlagLayer(root))
}

struct FlagLayer(figment::value::Dict);

impl figment::Provider for FlagLayer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(FLAG_LAYER)
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}

fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let offset = e.span().map_or(0, |span| span.start).min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    ConfigError::Syntax { path: path.display().to_string(), line, column, message }
}

/// One figment error as a line a person can act on: the key first, then what
/// was wrong, then where the value came from.
fn describe(err: &figment::Error, file: Option<&Path>) -> String {
    let mut key = err.path.join(".");
    let detail = match &err.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            // figment's path may already end with the unknown field (it
            // does for nested tables); name it once.
            if err.path.last() != Some(field) {
                key = if key.is_empty() { field.clone() } else { format!("{key}.{field}") };
            }
            format!("unknown key; expected one of {}", expected.join(", "))
        }
        other => other.to_string(),
    };
    let source = match err.metadata.as_ref().map(|m| m.name.as_ref()) {
        Some(ENV_LAYER) => format!(" (from the environment variable {})", env_var_name(&key)),
        Some(FLAG_LAYER) => " (from the command line)".to_owned(),
        Some(name) if name.contains("TOML") => match file {
            Some(path) => format!(" (in {})", path.display()),
            None => String::new(),
        },
        _ => String::new(),
    };
    if key.is_empty() { format!("{detail}{source}") } else { format!("{key}: {detail}{source}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("echo-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:x}.toml", fxhash(toml)));
        std::fs::write(&path, toml).unwrap();
        let result = Config::load(Some(&path), Vec::new(), &Overrides::default());
        std::fs::remove_file(&path).ok();
        result
    }

    fn fxhash(s: &str) -> u64 {
        s.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
    }

    fn documented() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/server.toml");
        std::fs::read_to_string(path).expect("config/server.toml exists")
    }

    #[test]
    fn documented_default_config_is_the_built_in_one() {
        let parsed: Config = toml::from_str(&documented()).expect("config/server.toml parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn every_documented_key_has_a_comment() {
        let text = documented();
        let lines: Vec<&str> = text.lines().collect();
        let mut keys = 0;
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('[') {
                continue;
            }
            keys += 1;
            let previous = i.checked_sub(1).map(|j| lines[j].trim()).unwrap_or("");
            assert!(previous.starts_with('#'), "key line {:?} has no comment line above it", trimmed);
        }
        // Every field of the schema appears in the file.
        let table: toml::Table = toml::from_str(&text).unwrap();
        let default: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        for (section, values) in &default {
            let documented = table[section].as_table().unwrap();
            for key in values.as_table().unwrap().keys() {
                assert!(documented.contains_key(key), "{section}.{key} is not documented");
            }
        }
        assert!(keys > 10);
    }

    #[test]
    fn print_config_round_trips() {
        let config = Config::default();
        let again: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_str("[websocket]\nmax_conections = 5\n").unwrap_err().to_string();
        assert!(err.starts_with("websocket.max_conections: unknown key; expected one of "), "{err}");
        assert!(err.contains("max_connections"), "{err}");
        let err = load_str("bogus = 1\n").unwrap_err().to_string();
        assert!(err.starts_with("bogus: unknown key; expected one of "), "{err}");
        let err = load_str("[mqtt]\nsegment_sise = 1\n").unwrap_err().to_string();
        assert!(err.starts_with("mqtt.segment_sise: unknown key;"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = load_str("[websocket]\nmax_connections = \"lots\"\n").unwrap_err().to_string();
        assert!(err.contains("websocket.max_connections"), "{err}");
    }

    #[test]
    fn bad_address_is_named() {
        let err = load_str("[websocket]\nlisten = \"localhost:http\"\n").unwrap_err().to_string();
        assert!(err.starts_with("websocket.listen: \"localhost:http\" is not a socket address"), "{err}");
        let err = load_str("[admin]\nlisten = [\"127.0.0.1:9\", \"::1:9\"]\n").unwrap_err().to_string();
        assert!(err.starts_with("admin.listen: \"::1:9\" is not a socket address"), "{err}");
        let err = load_str("[mqtt]\nlisten = 1883\n").unwrap_err().to_string();
        assert!(err.starts_with("mqtt.listen: "), "{err}");
    }

    #[test]
    fn zero_where_positive_is_needed_is_named() {
        let err = load_str("[websocket]\nmax_message_size = 0\n").unwrap_err().to_string();
        assert_eq!(err, "websocket.max_message_size: must be greater than 0");
        let err = load_str("[websocket]\nhandshake_timeout = \"0s\"\n").unwrap_err().to_string();
        assert_eq!(err, "websocket.handshake_timeout: must be longer than 0s");
    }

    #[test]
    fn a_syntax_error_is_one_line_with_its_position() {
        let err = load_str("# a comment\n[websocket\nlisten = 3\n").unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains(".toml:2:11: not valid TOML: "), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let err = load_str("[server]\nshutdown_grace = \"soon\"\n").unwrap_err().to_string();
        assert!(err.contains("server.shutdown_grace"), "{err}");
    }

    #[test]
    fn a_memory_limit_too_small_to_run_in_is_named() {
        let err = load_str("[server]\nmemory_limit = 1000000\n").unwrap_err().to_string();
        assert!(err.contains("server.memory_limit"), "{err}");
        assert!(load_str("[server]\nmemory_limit = 33554432\n").is_ok());
        assert!(load_str("[server]\nmemory_limit = 0\n").is_ok(), "0: derived from the machine");
    }

    #[test]
    fn missing_file_is_an_error_not_the_defaults() {
        let err = Config::load(Some(Path::new("/nonexistent/echo.toml")), Vec::new(), &Overrides::default())
            .unwrap_err();
        assert!(matches!(err, ConfigError::Unreadable { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/echo.toml"));
    }

    #[test]
    fn layers_apply_in_order() {
        let path = std::env::temp_dir().join(format!("echo-layers-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[websocket]\nmax_connections = 10\nping_interval = \"7s\"\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        let env = vec![
            ("ECHO_WEBSOCKET_MAX_CONNECTIONS".to_owned(), "20".to_owned()),
            ("ECHO_LOG_FORMAT".to_owned(), "json".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let overrides = Overrides { max_connections: Some(30), ..Overrides::default() };
        let config = Config::load(Some(&path), env.clone(), &overrides).unwrap();
        assert_eq!(config.websocket.max_connections, 30, "flag beats env");
        assert_eq!(config.websocket.ping_interval, Duration::from_secs(7), "file beats default");
        assert_eq!(config.log.level, "debug");
        assert_eq!(config.log.format, LogFormat::Json, "env beats default");
        let config = Config::load(Some(&path), env, &Overrides::default()).unwrap();
        assert_eq!(config.websocket.max_connections, 20, "env beats file");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let env = vec![("ECHO_WEBSOCKET_MAX_CONECTIONS".to_owned(), "20".to_owned())];
        let err = Config::load(None, env, &Overrides::default()).unwrap_err().to_string();
        assert!(err.starts_with("websocket.max_conections: unknown key;"), "{err}");
        assert!(err.ends_with(" (from the environment variable ECHO_WEBSOCKET_MAX_CONECTIONS)"), "{err}");
        let env = vec![("ECHO_WEBSOCKET_LISTEN".to_owned(), "[\"127.0.0.1:1\", \"[::1]:2\"]".to_owned())];
        let config = Config::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(config.websocket.listen.len(), 2);
    }

    #[test]
    fn rust_log_is_the_environment_layer_of_the_log_level() {
        let var = |name: &str, value: &str| (name.to_owned(), value.to_owned());
        let level = |env: Vec<(String, String)>, flag: Option<&str>| {
            let overrides = Overrides { log_level: flag.map(str::to_owned), ..Overrides::default() };
            Config::load(None, env, &overrides).unwrap().log.level
        };
        assert_eq!(level(vec![var("RUST_LOG", "debug")], None), "debug");
        assert_eq!(level(vec![var("RUST_LOG", "debug")], Some("warn")), "warn");
        assert_eq!(level(vec![var("RUST_LOG", "debug"), var("ECHO_LOG_LEVEL", "error")], None), "error");
        assert_eq!(level(vec![var("ECHO_LOG_LEVEL", "error"), var("RUST_LOG", "debug")], None), "error");
        assert_eq!(level(vec![var("RUST_LOG", " ")], None), "info");
        let err = Config::load(None, vec![var("RUST_LOG", "echo_server=loud")], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("log.level: \"echo_server=loud\" is not a valid filter"), "{err}");
    }

    #[test]
    fn listen_accepts_one_address_or_a_list() {
        let config = load_str("[websocket]\nlisten = \"127.0.0.1:9\"\n").unwrap();
        assert_eq!(config.websocket.listen, vec!["127.0.0.1:9".parse().unwrap()]);
        let config = load_str("[websocket]\nlisten = [\"127.0.0.1:9\", \"[::1]:9\"]\n").unwrap();
        assert_eq!(config.websocket.listen.len(), 2);
    }

    #[test]
    fn mqtt_settings_are_checked_naming_the_key() {
        for (toml, key) in [
            ("[mqtt]\nsegment_size = 100\n", "mqtt.segment_size"),
            ("[mqtt]\nsegment_count = 0\n", "mqtt.segment_count"),
            ("[mqtt]\nmax_payload_size = 10\n", "mqtt.max_payload_size"),
            ("[mqtt]\nconnect_concurrency = 0\n", "mqtt.connect_concurrency"),
            ("[mqtt]\nconnect_timeout = \"0s\"\n", "mqtt.connect_timeout"),
            ("[mqtt]\nmax_outgoing_packet_count = 0\n", "mqtt.max_outgoing_packet_count"),
            ("[mqtt]\nusername = \"alice\"\n", "mqtt.password"),
            ("[mqtt]\ntls_key = \"/nonexistent/key.pem\"\n", "mqtt.tls_cert"),
            (
                "[mqtt]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
                "mqtt.tls_cert",
            ),
            ("[mqtt]\nlisten = \"0.0.0.0:8080\"\n", "mqtt.listen"),
            ("[mqtt]\nmax_conections = 1\n", "mqtt.max_conections"),
            ("[mqtt]\nmax_client_id_length = 22\n", "mqtt.max_client_id_length"),
            ("[mqtt]\nmax_subscriptions = 0\n", "mqtt.max_subscriptions"),
            ("[mqtt]\nmax_topic_length = 65536\n", "mqtt.max_topic_length"),
            ("[mqtt]\nmax_topic_levels = 0\n", "mqtt.max_topic_levels"),
            ("[mqtt]\ntopic_alias_maximum = 4097\n", "mqtt.topic_alias_maximum"),
            ("[mqtt]\ntopic_alias_maximum = 70000\n", "mqtt.topic_alias_maximum"),
            ("[mqtt]\nreceive_maximum = 0\n", "mqtt.receive_maximum"),
            ("[mqtt]\nmax_inflight_messages = 0\n", "mqtt.max_inflight_messages"),
            ("[mqtt]\nrouter = \"loop\"\n", "mqtt.router"),
        ] {
            let err = load_str(toml).unwrap_err().to_string();
            assert!(err.starts_with(key), "{toml:?}: {err}");
        }
        let config = load_str("[mqtt]\nlisten = []\nusername = \"a\"\npassword = \"b\"\n").unwrap();
        assert!(config.mqtt.listen.is_empty());
    }

    #[test]
    fn the_router_placement_is_named_by_the_file_or_the_environment() {
        let env = vec![("ECHO_MQTT_ROUTER".to_owned(), "event-loop".to_owned())];
        let config = Config::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(config.mqtt.router, RouterPlacement::EventLoop);
        let config = load_str("[mqtt]\nrouter = \"event-loop\"\n").unwrap();
        assert_eq!(config.mqtt.router, RouterPlacement::EventLoop);
        let env = vec![("ECHO_MQTT_ROUTER".to_owned(), "threads".to_owned())];
        let err = Config::load(None, env, &Overrides::default()).unwrap_err().to_string();
        assert!(err.starts_with("mqtt.router: "), "{err}");
        assert!(err.contains("event-loop") && err.contains("ECHO_MQTT_ROUTER"), "{err}");
    }

    #[test]
    fn mqtt_flags_override_the_file() {
        let overrides =
            Overrides { mqtt_listen: vec!["127.0.0.1:1999".parse().unwrap()], ..Overrides::default() };
        let config = Config::load(None, Vec::new(), &overrides).unwrap();
        assert_eq!(config.mqtt.listen, vec!["127.0.0.1:1999".parse().unwrap()]);
        let config =
            Config::load(None, Vec::new(), &Overrides { no_mqtt: true, ..Overrides::default() }).unwrap();
        assert!(config.mqtt.listen.is_empty());
    }

    #[test]
    fn http_echo_settings_are_checked_naming_the_key() {
        for (toml, key) in [
            ("[websocket]\nmax_request_body_size = 2000000000\n", "websocket.max_request_body_size"),
            ("[websocket]\nhttp_echo = \"yes\"\n", "websocket.http_echo"),
        ] {
            let err = load_str(toml).unwrap_err().to_string();
            assert!(err.starts_with(key), "{toml:?}: {err}");
        }
        let env = vec![
            ("ECHO_WEBSOCKET_HTTP_ECHO".to_owned(), "false".to_owned()),
            ("ECHO_WEBSOCKET_SEND_SERVER_HOSTNAME".to_owned(), "true".to_owned()),
        ];
        let config = Config::load(None, env, &Overrides::default()).unwrap();
        assert!(!config.websocket.http_echo && config.websocket.send_server_hostname);
        let env = vec![("ECHO_WEBSOCKET_SEND_SERVER_HOSTNAME".to_owned(), "maybe".to_owned())];
        let err = Config::load(None, env, &Overrides::default()).unwrap_err().to_string();
        assert!(err.starts_with("websocket.send_server_hostname: "), "{err}");
        assert!(err.contains("ECHO_WEBSOCKET_SEND_SERVER_HOSTNAME"), "{err}");
    }

    #[test]
    fn websocket_tls_files_are_checked_naming_the_key() {
        for (toml, key) in [
            ("[websocket]\ntls_cert = \"/nonexistent/c.pem\"\n", "websocket.tls_key"),
            ("[websocket]\ntls_key = \"/nonexistent/k.pem\"\n", "websocket.tls_cert"),
            (
                "[websocket]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
                "websocket.tls_cert",
            ),
        ] {
            let err = load_str(toml).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{toml:?} gave {err}");
        }
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").to_owned();
        let env = vec![
            ("ECHO_WEBSOCKET_TLS_CERT".to_owned(), file.clone()),
            ("ECHO_WEBSOCKET_TLS_KEY".to_owned(), file.clone()),
        ];
        let config = Config::load(None, env, &Overrides::default()).unwrap();
        assert_eq!((config.websocket.tls_cert.as_str(), config.websocket.tls_key.as_str()), (&*file, &*file));
    }

    #[test]
    fn sse_settings_are_checked_naming_the_key() {
        for toml in ["[websocket]\nsse_interval = \"5ms\"\n", "[websocket]\nsse_interval = \"2days\"\n"] {
            let err = load_str(toml).unwrap_err().to_string();
            assert!(
                err.starts_with("websocket.sse_interval: ") && err.contains("outside 10ms..=1day"),
                "{err}"
            );
        }
        let err = load_str("[websocket]\nsse_interval = \"often\"\n").unwrap_err().to_string();
        assert!(err.starts_with("websocket.sse_interval: "), "{err}");
        let env = vec![
            ("ECHO_WEBSOCKET_SSE_INTERVAL".to_owned(), "250ms".to_owned()),
            ("ECHO_WEBSOCKET_SSE".to_owned(), "false".to_owned()),
        ];
        let config = Config::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(config.websocket.sse_interval, Duration::from_millis(250));
        assert!(!config.websocket.sse);
        let env = vec![("ECHO_WEBSOCKET_SSE_INTERVAL".to_owned(), "0s".to_owned())];
        let err = Config::load(None, env, &Overrides::default()).unwrap_err().to_string();
        assert!(err.starts_with("websocket.sse_interval: "), "{err}");
    }

    #[test]
    fn sys_interval_is_checked_naming_the_key() {
        assert_eq!(Config::default().mqtt.sys_interval, Duration::from_secs(10));
        for toml in ["[mqtt]\nsys_interval = \"10ms\"\n", "[mqtt]\nsys_interval = \"2days\"\n"] {
            let err = load_str(toml).unwrap_err().to_string();
            assert!(err.starts_with("mqtt.sys_interval: ") && err.contains("outside 100ms..=1day"), "{err}");
        }
        let err = load_str("[mqtt]\nsys_interval = \"often\"\n").unwrap_err().to_string();
        assert!(err.starts_with("mqtt.sys_interval: "), "{err}");
        assert_eq!(load_str("[mqtt]\nsys_interval = \"0s\"\n").unwrap().mqtt.sys_interval, Duration::ZERO);
        let env = vec![("ECHO_MQTT_SYS_INTERVAL".to_owned(), "250ms".to_owned())];
        let config = Config::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(config.mqtt.sys_interval, Duration::from_millis(250));
    }

    #[test]
    fn cluster_settings_are_checked_naming_the_key() {
        let defaults = Config::default().cluster;
        assert_eq!((defaults.nats_url.as_str(), defaults.subject_prefix.as_str()), ("", "echo.mqtt"));
        let env = vec![("ECHO_CLUSTER_NATS_URL".to_owned(), "nats://127.0.0.1:4222".to_owned())];
        let config = Config::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(config.cluster.nats_url, "nats://127.0.0.1:4222");
        let two = load_str("[cluster]\nnats_url = \"nats://a:4222,tls://b:4222\"\n").unwrap();
        assert_eq!(two.cluster.nats_url, "nats://a:4222,tls://b:4222");
        for (toml, key) in [
            ("[cluster]\nnats_url = \"http://a:4222\"\n", "cluster.nats_url: "),
            ("[cluster]\nnats_url = \"nats://a:port\"\n", "cluster.nats_url: "),
            ("[cluster]\nsubject_prefix = \"a..b\"\n", "cluster.subject_prefix: "),
            ("[cluster]\nsubject_prefix = \"a.*\"\n", "cluster.subject_prefix: "),
            ("[cluster]\nbuffer = 1\n", "cluster.buffer: "),
        ] {
            let err = load_str(toml).unwrap_err().to_string();
            assert!(err.starts_with(key), "{toml:?}: {err}");
        }
    }

    #[test]
    fn workers_is_a_count_or_auto() {
        assert_eq!(Config::default().server.workers, Workers::Count(1));
        assert_eq!(load_str("[server]\nworkers = 4\n").unwrap().server.workers, Workers::Count(4));
        assert_eq!(load_str("[server]\nworkers = \"auto\"\n").unwrap().server.workers, Workers::Auto);
        let env = vec![("ECHO_SERVER_WORKERS".to_owned(), "auto".to_owned())];
        assert_eq!(Config::load(None, env, &Overrides::default()).unwrap().server.workers, Workers::Auto);
        let flag = Overrides { workers: Some("3".to_owned()), ..Overrides::default() };
        assert_eq!(Config::load(None, Vec::new(), &flag).unwrap().server.workers, Workers::Count(3));
        for toml in
            ["[server]\nworkers = 0\n", "[server]\nworkers = \"many\"\n", "[server]\nworkers = 5000\n"]
        {
            let err = load_str(toml).unwrap_err().to_string();
            assert!(err.starts_with("server.workers: "), "{toml:?}: {err}");
        }
        let env = vec![("ECHO_SERVER_WORKERS".to_owned(), "-1".to_owned())];
        let err = Config::load(None, env, &Overrides::default()).unwrap_err().to_string();
        assert!(err.starts_with("server.workers: ") && err.contains("ECHO_SERVER_WORKERS"), "{err}");
        let auto = Workers::Auto.resolve();
        assert_eq!(usize::from(auto), std::thread::available_parallelism().unwrap().get());
        // The configuration a supervisor hands its workers reads back the same.
        let config = load_str("[server]\nworkers = \"auto\"\n").unwrap();
        assert_eq!(toml::from_str::<Config>(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn bad_log_filter_is_named() {
        let err = load_str("[log]\nlevel = \"info,=[\"\n").unwrap_err().to_string();
        assert!(err.starts_with("log.level:"), "{err}");
    }
}
