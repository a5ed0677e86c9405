//! Counters for `/metrics` (Prometheus text format) and the summary line.
//!
//! The hot counters (messages, bytes) are resolved once at start, so counting
//! is one uncontended relaxed atomic add: the exposition crate requires its
//! metrics to be `Send + Sync`, and on a single thread an atomic add costs
//! about what a plain add does. Label sets are small and closed (reasons,
//! close codes by class), so a misbehaving client cannot grow the registry.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::process::ProcessStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: &'static str,
}

/// An HTTP method, from a closed list ("other" for the rest).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapLabel {
    pub cap: &'static str,
}

/// What an MQTT client was refused by the ACL: "publish" or "subscribe".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PacketLabel {
    pub packet: &'static str,
}

/// Counter type used everywhere: a u64 behind an `Arc<AtomicU64>`.
pub type Count = Counter<u64, AtomicU64>;

/// Every metric of the WebSocket side.
#[derive(Debug, Default)]
pub struct WebSocketMetrics {
    pub connections: Gauge,
    pub accepted: Count,
    pub upgrades: Count,
    pub rejected: Family<ReasonLabel, Count>,
    pub handshake_failures: Family<ReasonLabel, Count>,
    pub http_responses: Family<StatusLabel, Count>,
    pub messages_received: Family<KindLabel, Count>,
    pub messages_sent: Family<KindLabel, Count>,
    pub bytes_received: Count,
    pub bytes_sent: Count,
    pub close_codes_received: Family<CodeLabel, Count>,
    pub close_codes_sent: Family<CodeLabel, Count>,
    pub closed: Family<ReasonLabel, Count>,
    /// Plain HTTP requests with the echo on (page or echo), by method.
    pub http_requests: Family<MethodLabel, Count>,
    /// Bytes of request bodies read (decoded, for chunked ones).
    pub http_body_bytes: Count,
    /// Requests after the first on their connection (keep-alive at work).
    pub http_keepalive_requests: Count,
    /// Server-Sent Events streams open now (`ws::sse`).
    pub sse_streams: Gauge,
    /// Server-Sent Events streams started.
    pub sse_opened: Count,
    /// Timed events written to SSE streams.
    pub sse_events: Count,
    /// Timed events not sent because the client's socket buffer was full.
    pub sse_skipped: Count,
    /// Bytes written to SSE streams, head and framing included.
    pub sse_bytes_sent: Count,
    /// SSE streams ended, by reason.
    pub sse_closed: Family<ReasonLabel, Count>,
    /// Cached handles of the hottest label sets.
    pub text_received: Count,
    pub binary_received: Count,
    pub text_sent: Count,
    pub binary_sent: Count,
}

impl WebSocketMetrics {
    fn new() -> Self {
        let m = WebSocketMetrics::default();
        let text = KindLabel { kind: "text" };
        let binary = KindLabel { kind: "binary" };
        WebSocketMetrics {
            text_received: m.messages_received.get_or_create_owned(&text),
            binary_received: m.messages_received.get_or_create_owned(&binary),
            text_sent: m.messages_sent.get_or_create_owned(&text),
            binary_sent: m.messages_sent.get_or_create_owned(&binary),
            ..m
        }
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn http_response(&self, status: u16) {
        self.http_responses.get_or_create(&StatusLabel { status }).inc();
    }

    pub fn http_request(&self, method: &str) {
        let method = match method {
            "GET" => "GET",
            "HEAD" => "HEAD",
            "POST" => "POST",
            "PUT" => "PUT",
            "DELETE" => "DELETE",
            "PATCH" => "PATCH",
            "OPTIONS" => "OPTIONS",
            _ => "other",
        };
        self.http_requests.get_or_create(&MethodLabel { method }).inc();
    }

    pub fn close_received(&self, code: Option<u16>) {
        self.close_codes_received.get_or_create(&CodeLabel { code: code_label(code) }).inc();
    }

    pub fn close_sent(&self, code: Option<u16>) {
        self.close_codes_sent.get_or_create(&CodeLabel { code: code_label(code) }).inc();
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn sse_closed(&self, reason: &'static str) {
        self.sse_closed.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Messages echoed so far (sent text + binary).
    pub fn messages_echoed(&self) -> u64 {
        self.text_sent.get() + self.binary_sent.get()
    }
}

/// The MQTT packet types, as labels, indexed by their type number (1..=15).
pub const MQTT_PACKET_TYPES: [&str; 16] = [
    "reserved",
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

/// Every metric of the MQTT side. Label sets are closed: two protocol
/// versions, sixteen packet types, and fixed lists of reasons.
#[derive(Debug)]
pub struct MqttMetrics {
    pub connections: Family<VersionLabel, Gauge>,
    pub accepted: Count,
    pub connects: Family<VersionLabel, Count>,
    pub refused: Family<ReasonLabel, Count>,
    pub closed: Family<ReasonLabel, Count>,
    pub packets_received: Family<PacketLabel, Count>,
    pub packets_sent: Family<PacketLabel, Count>,
    pub publishes_received: Count,
    pub publishes_sent: Count,
    pub bytes_received: Count,
    pub bytes_sent: Count,
    pub wills_published: Count,
    /// Times a subscriber too slow for its messages skipped those that had
    /// left the router's in-memory log (copied from the router's count).
    pub slow_subscriber_skips: Count,
    /// Publishes not sent to a subscriber, by reason: `max_packet_size`,
    /// larger than the client's MQTT 5 Maximum Packet Size (copied from
    /// the router's count).
    pub dropped: Family<ReasonLabel, Count>,
    /// Retained messages the router holds (copied from the router's count).
    pub retained_messages: Gauge,
    /// Messages the router's topic logs hold (copied from the router's count).
    pub log_messages: Gauge,
    /// Times the router dropped the server's internal wills link while it
    /// kept running, and the link was registered again.
    pub wills_link_restarts: Count,
    /// Times a per-client cap (`mqtt::caps`) refused something, by cap.
    pub cap_refusals: Family<CapLabel, Count>,
    /// Publishes (wills included) and subscription filters the ACL
    /// (`mqtt.acl_file`) refused, by action; publishes to `$` topics, which
    /// are the server's own (`mqtt::sys`), are refused and counted alike.
    pub acl_denied: Family<ActionLabel, Count>,
    /// How long `LinkBuilder::build_async()` waited for the router, per
    /// connect (awaited: the event loop serves others meanwhile).
    pub link_build_seconds: Histogram,
    /// Persistence (`mqtt::persist`): snapshot files written, writes that
    /// failed, and the last file's size and time (router to renamed file).
    pub persistence_snapshots_written: Count,
    pub persistence_write_failures: Count,
    pub persistence_last_bytes: Gauge,
    pub persistence_last_seconds: Gauge<f64, AtomicU64>,
    /// Cached handles, indexed by packet type.
    received_by_type: Vec<Count>,
    sent_by_type: Vec<Count>,
    pub v311: Gauge,
    pub v5: Gauge,
    connects_v311: Count,
    connects_v5: Count,
}

impl MqttMetrics {
    fn new() -> Self {
        let packets_received = Family::<PacketLabel, Count>::default();
        let packets_sent = Family::<PacketLabel, Count>::default();
        let connections = Family::<VersionLabel, Gauge>::default();
        let connects = Family::<VersionLabel, Count>::default();
        let by_type = |family: &Family<PacketLabel, Count>| {
            MQTT_PACKET_TYPES
                .iter()
                .map(|&packet| family.get_or_create_owned(&PacketLabel { packet }))
                .collect()
        };
        MqttMetrics {
            received_by_type: by_type(&packets_received),
            sent_by_type: by_type(&packets_sent),
            v311: connections.get_or_create_owned(&VersionLabel { version: "3.1.1" }),
            v5: connections.get_or_create_owned(&VersionLabel { version: "5" }),
            connections,
            accepted: Count::default(),
            connects_v311: connects.get_or_create_owned(&VersionLabel { version: "3.1.1" }),
            connects_v5: connects.get_or_create_owned(&VersionLabel { version: "5" }),
            connects,
            refused: Family::default(),
            closed: Family::default(),
            packets_received,
            packets_sent,
            publishes_received: Count::default(),
            publishes_sent: Count::default(),
            bytes_received: Count::default(),
            bytes_sent: Count::default(),
            wills_published: Count::default(),
            slow_subscriber_skips: Count::default(),
            dropped: Family::default(),
            retained_messages: Gauge::default(),
            log_messages: Gauge::default(),
            wills_link_restarts: Count::default(),
            cap_refusals: Family::default(),
            acl_denied: Family::default(),
            // 10 µs .. ~5 s
            link_build_seconds: Histogram::new(exponential_buckets(1e-5, 2.5, 15)),
            persistence_snapshots_written: Count::default(),
            persistence_write_failures: Count::default(),
            persistence_last_bytes: Gauge::default(),
            persistence_last_seconds: Gauge::default(),
        }
    }

    /// Counts one packet read from a client, by its type number.
    pub fn packet_received(&self, packet_type: u8) {
        self.received_by_type[usize::from(packet_type & 15)].inc();
    }

    pub fn packet_sent(&self, packet_type: u8) {
        self.sent_by_type[usize::from(packet_type & 15)].inc();
    }

    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn cap_refused(&self, cap: &'static str) {
        self.cap_refusals.get_or_create(&CapLabel { cap }).inc();
    }

    /// Counts one refusal by the ACL ("publish" or "subscribe").
    pub fn acl_denied(&self, action: &'static str) {
        self.acl_denied.get_or_create(&ActionLabel { action }).inc();
    }

    /// Counts a successful CONNECT ("3.1.1" or "5").
    pub fn connected(&self, version: &'static str) {
        match version {
            "5" => self.connects_v5.inc(),
            _ => self.connects_v311.inc(),
        };
    }

    /// Successful CONNECTs so far, both versions.
    pub fn sessions_served(&self) -> u64 {
        self.connects_v311.get() + self.connects_v5.get()
    }

    /// MQTT packets read from clients so far, every type.
    pub fn packets_received_total(&self) -> u64 {
        self.received_by_type.iter().map(Count::get).sum()
    }

    /// MQTT packets written to clients so far, every type.
    pub fn packets_sent_total(&self) -> u64 {
        self.sent_by_type.iter().map(Count::get).sum()
    }

    /// Sessions open now, both versions.
    pub fn open(&self) -> u64 {
        (self.v311.get() + self.v5.get()).max(0) as u64
    }
}

/// Close codes as labels: the registered ones by number, the ranges that
/// applications and libraries choose freely as one label each.
pub fn code_label(code: Option<u16>) -> &'static str {
    match code {
        None => "none",
        Some(1000) => "1000",
        Some(1001) => "1001",
        Some(1002) => "1002",
        Some(1003) => "1003",
        Some(1007) => "1007",
        Some(1008) => "1008",
        Some(1009) => "1009",
        Some(1010) => "1010",
        Some(1011) => "1011",
        Some(1012) => "1012",
        Some(1013) => "1013",
        Some(1014) => "1014",
        Some(3000..=3999) => "3xxx",
        Some(4000..=4999) => "4xxx",
        Some(_) => "other",
    }
}

/// The registry and every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub websocket: Arc<WebSocketMetrics>,
    pub mqtt: Arc<MqttMetrics>,
    /// Failed `accept` calls because no file descriptor was left, by listener.
    pub accept_fd_exhausted: Family<ListenerLabel, Count>,
    /// How late the event loop runs what is due ([`crate::lag`]).
    pub loop_lag: Arc<crate::lag::LoopLag>,
    /// How long each give-back of freed memory took ([`crate::trim`]).
    pub memory_trim_seconds: Histogram,
    /// Admin connections closed to make room for a new one ([`crate::admin`]).
    pub admin_evictions: Count,
    /// Admin connections closed at once because every slot was busy.
    pub admin_refused: Count,
    /// Requests the memory budget refused, by what ([`crate::budget`]).
    pub memory_refusals: Family<crate::budget::RefusalLabel, Count>,
    /// `server.memory_limit` in effect, in bytes.
    pub memory_limit: Gauge,
    /// The MQTT cluster bridge over NATS ([`crate::cluster`]).
    pub cluster: Arc<ClusterMetrics>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// The MQTT cluster bridge ([`crate::cluster`]). `Send + Sync` throughout:
/// the NATS client's connection events are seen on its own task.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// `cluster.nats_url` is set: `/readyz` follows `connected`.
    pub enabled: std::sync::atomic::AtomicBool,
    /// 1 while the bridge's NATS connection is up.
    pub connected: Gauge,
    /// Connections to NATS made again after one was lost.
    pub reconnects: Count,
    /// Messages and bytes (NATS payloads), by direction: `out` to NATS,
    /// `in` from NATS and handed to the local router.
    pub messages: Family<DirectionLabel, Count>,
    pub bytes: Family<DirectionLabel, Count>,
    /// Messages not forwarded, by reason.
    pub dropped: Family<ReasonLabel, Count>,
    /// NATS subscriptions held for the local sessions' filters.
    pub subscriptions: Gauge,
    /// Local sessions closed because their client id connected elsewhere.
    pub remote_takeovers: Count,
}

impl ClusterMetrics {
    pub fn drop_one(&self, reason: &'static str) {
        self.dropped.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Whether the cluster is configured and its NATS connection is down:
    /// then `/readyz` says 503.
    pub fn outage(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Relaxed) && self.connected.get() == 0
    }
}

impl Metrics {
    pub fn new(max_fds: u64, runtime: Option<tokio::runtime::Handle>) -> Metrics {
        let mut registry = Registry::default();
        let websocket = Arc::new(WebSocketMetrics::new());
        let accept_fd_exhausted = Family::<ListenerLabel, Count>::default();
        let ws = registry.sub_registry_with_prefix("echo_websocket");
        ws.register(
            "connections",
            "Open WebSocket connections (including handshakes)",
            websocket.connections.clone(),
        );
        ws.register("accepted", "TCP connections accepted on the WebSocket port", websocket.accepted.clone());
        ws.register(
            "upgrades",
            "WebSocket sessions started (successful handshakes)",
            websocket.upgrades.clone(),
        );
        ws.register(
            "rejected",
            "Connections turned away before the handshake, by reason",
            websocket.rejected.clone(),
        );
        ws.register(
            "handshake_failures",
            "Handshakes that failed, by reason: timeout, disconnected, too_large, malformed, refused; with TLS on, tls (a failed TLS handshake: not TLS, or refused by rustls) and tls_timeout (no TLS handshake within handshake_timeout)",
            websocket.handshake_failures.clone(),
        );
        ws.register(
            "http_responses",
            "Plain HTTP responses (not upgrades), by status",
            websocket.http_responses.clone(),
        );
        ws.register(
            "messages_received",
            "Data messages received, by kind",
            websocket.messages_received.clone(),
        );
        ws.register("messages_sent", "Data messages sent, by kind", websocket.messages_sent.clone());
        ws.register(
            "received_bytes",
            "Bytes read from WebSocket sockets after the handshake",
            websocket.bytes_received.clone(),
        );
        ws.register(
            "sent_bytes",
            "Bytes written to WebSocket sockets after the handshake",
            websocket.bytes_sent.clone(),
        );
        ws.register(
            "close_codes_received",
            "Close frames received, by code",
            websocket.close_codes_received.clone(),
        );
        ws.register("close_codes_sent", "Close frames sent, by code", websocket.close_codes_sent.clone());
        ws.register("closed", "Connections ended, by reason", websocket.closed.clone());
        let http = registry.sub_registry_with_prefix("echo_http");
        http.register(
            "requests",
            "Plain HTTP requests on the WebSocket port with websocket.http_echo on (echoed, or the page), by method",
            websocket.http_requests.clone(),
        );
        http.register(
            "request_body_bytes",
            "Bytes of HTTP request bodies read for the echo (chunked bodies decoded)",
            websocket.http_body_bytes.clone(),
        );
        http.register(
            "keepalive_requests",
            "HTTP requests that came on a connection already answered before (keep-alive)",
            websocket.http_keepalive_requests.clone(),
        );
        let sse = registry.sub_registry_with_prefix("echo_sse");
        sse.register(
            "streams",
            "Server-Sent Events streams open now (GET /.sse)",
            websocket.sse_streams.clone(),
        );
        sse.register("opened", "Server-Sent Events streams started", websocket.sse_opened.clone());
        sse.register(
            "events",
            "Timed events written to Server-Sent Events streams",
            websocket.sse_events.clone(),
        );
        sse.register(
            "skipped_events",
            "Timed events not sent to a stream because its client's socket buffer was full (a slow reader): skipped, never queued",
            websocket.sse_skipped.clone(),
        );
        sse.register(
            "sent_bytes",
            "Bytes written to Server-Sent Events streams (response head and chunk framing included)",
            websocket.sse_bytes_sent.clone(),
        );
        sse.register(
            "closed",
            "Server-Sent Events streams ended, by reason (client_left, shutdown, write_timeout, reset)",
            websocket.sse_closed.clone(),
        );
        let mqtt = Arc::new(MqttMetrics::new());
        let m = registry.sub_registry_with_prefix("echo_mqtt");
        m.register(
            "connections",
            "Open MQTT sessions (after CONNACK), by protocol version",
            mqtt.connections.clone(),
        );
        m.register("accepted", "TCP connections accepted on the MQTT port", mqtt.accepted.clone());
        m.register("connects", "Successful CONNECTs (CONNACK 0), by protocol version", mqtt.connects.clone());
        m.register("refused", "Connections refused before or at CONNECT, by reason", mqtt.refused.clone());
        m.register("closed", "MQTT sessions ended, by reason", mqtt.closed.clone());
        m.register(
            "packets_received",
            "MQTT packets read from clients, by type",
            mqtt.packets_received.clone(),
        );
        m.register("packets_sent", "MQTT packets written to clients, by type", mqtt.packets_sent.clone());
        m.register(
            "publishes_received",
            "PUBLISH packets read from clients",
            mqtt.publishes_received.clone(),
        );
        m.register("publishes_sent", "PUBLISH packets written to clients", mqtt.publishes_sent.clone());
        m.register("received_bytes", "Bytes of MQTT packets read from clients", mqtt.bytes_received.clone());
        m.register("sent_bytes", "Bytes of MQTT packets written to clients", mqtt.bytes_sent.clone());
        m.register(
            "wills_published",
            "Last-will messages handed to the router",
            mqtt.wills_published.clone(),
        );
        m.register(
            "slow_subscriber_skips",
            "Times an MQTT subscriber too slow for its messages skipped the ones that had left the router's in-memory log (mqtt.segment_size x mqtt.segment_count per topic); counted by the router, read once a second",
            mqtt.slow_subscriber_skips.clone(),
        );
        m.register(
            "dropped",
            "Publishes not sent to a subscriber, by reason (max_packet_size: larger than the Maximum Packet Size the MQTT 5 client announced; dropped for that client alone, as if sent; max_queued: the oldest waiting for a session more than mqtt.max_queued_messages or max_queued_bytes behind over its subscriptions); counted by the router, read once a second",
            mqtt.dropped.clone(),
        );
        m.register(
            "retained_messages",
            "Retained messages the router holds (expired ones are freed within a second of their expiry, whether or not anyone subscribes); counted by the router, read once a second",
            mqtt.retained_messages.clone(),
        );
        m.register(
            "log_messages",
            "Messages the router's topic logs hold: those some subscriber has not read, those a session may read again (QoS 1/2 awaiting acknowledgement, kept sessions), and, on a topic where a subscriber is behind, what has not yet rotated out (mqtt.segment_size x mqtt.segment_count); a message every subscriber has read leaves at once otherwise; counted by the router, read once a second",
            mqtt.log_messages.clone(),
        );
        m.register(
            "wills_link_restarts",
            "Times the router dropped the server's internal wills link (it refused a will) and the link was registered again; 0 unless a will the router refuses got past the checks",
            mqtt.wills_link_restarts.clone(),
        );
        m.register(
            "cap_refusals",
            "Times a per-client cap refused something (client id, filter or topic length or levels, subscriptions, topic alias, receive maximum), by cap",
            mqtt.cap_refusals.clone(),
        );
        m.register(
            "acl_denied",
            "Publishes (wills at CONNECT included) and subscription filters refused by mqtt.acl_file, by action; \
             publishes to $ topics (the server's own, such as $SYS) included",
            mqtt.acl_denied.clone(),
        );
        m.register(
            "link_build_seconds",
            "Time a connecting client waited for the router to register it (LinkBuilder::build_async, awaited on the event loop, not blocking it)",
            mqtt.link_build_seconds.clone(),
        );
        m.register(
            "persistence_snapshots_written",
            "Snapshot files written (mqtt.persistence: retained messages and persistent sessions), periodic and at shutdown",
            mqtt.persistence_snapshots_written.clone(),
        );
        m.register(
            "persistence_write_failures",
            "Snapshots that could not be written (the previous file is kept); the reason is logged",
            mqtt.persistence_write_failures.clone(),
        );
        m.register(
            "persistence_last_snapshot_bytes",
            "Size of the last snapshot file written, in bytes",
            mqtt.persistence_last_bytes.clone(),
        );
        m.register(
            "persistence_last_snapshot_seconds",
            "Time the last snapshot took, from asking the router to the renamed, synced file (the router itself only copies; encoding and I/O run on a blocking thread)",
            mqtt.persistence_last_seconds.clone(),
        );
        registry.register(
            "echo_accept_fd_exhausted",
            "Accept attempts that failed because the open-file limit was reached",
            accept_fd_exhausted.clone(),
        );
        let loop_lag = Arc::new(crate::lag::LoopLag::default());
        registry.register(
            "echo_event_loop_lag_seconds",
            "How much later than due the event loop ran a 10 ms timer: what every client's events waited behind other work",
            loop_lag.histogram.clone(),
        );
        let memory_trim_seconds = Histogram::new(exponential_buckets(1e-5, 2.5, 15));
        registry.register(
            "echo_memory_trim_seconds",
            "Time the event loop spent giving freed memory back to the OS (malloc_trim, when malloc held over 16 MiB free)",
            memory_trim_seconds.clone(),
        );
        let admin_evictions = Count::default();
        registry.register(
            "echo_admin_evictions",
            "Admin connections closed to make room for a new one: they had sent no request yet, or were idle between keep-alive requests",
            admin_evictions.clone(),
        );
        let admin_refused = Count::default();
        registry.register(
            "echo_admin_refused",
            "Admin connections closed at once because every admin slot was writing a response",
            admin_refused.clone(),
        );
        let memory_refusals = Family::<crate::budget::RefusalLabel, Count>::default();
        registry.register(
            "echo_memory_refusals",
            "Requests refused because the memory budget (server.memory_limit) was spent, by what: websocket (HTTP 503), sse (a Server-Sent Events stream, HTTP 503), connect, publish, subscribe, read (a client paused half-way through a large packet), http_body (an HTTP request body past 64 KiB, HTTP 503)",
            memory_refusals.clone(),
        );
        let memory_limit = Gauge::default();
        registry.register(
            "echo_memory_limit_bytes",
            "The memory budget in effect (server.memory_limit, or three quarters of what the process may use)",
            memory_limit.clone(),
        );
        let cluster = Arc::new(ClusterMetrics::default());
        let c = registry.sub_registry_with_prefix("echo_cluster");
        c.register(
            "nats_connected",
            "1 while the MQTT cluster bridge is connected to NATS (cluster.nats_url); 0 when it is not, or the cluster is off",
            cluster.connected.clone(),
        );
        c.register(
            "nats_reconnects",
            "Connections to NATS made again after one was lost",
            cluster.reconnects.clone(),
        );
        c.register(
            "messages",
            "MQTT publishes sent to NATS (direction=out) and received from NATS and handed to the local broker (direction=in)",
            cluster.messages.clone(),
        );
        c.register("bytes", "Bytes of NATS payloads, by direction", cluster.bytes.clone());
        c.register(
            "dropped",
            "Publishes not forwarded between brokers, by reason: buffer_full (NATS slow or down, cluster.buffer full), nats_down (not connected), too_long (subject or payload over what NATS takes), duplicate (the same message through two overlapping subscriptions), malformed (a NATS message that is not one of ours)",
            cluster.dropped.clone(),
        );
        c.register(
            "subscriptions",
            "NATS subscriptions the bridge holds: one per subject the local sessions' filters map to, plus five always (retained messages, take-overs, and three to ask for, answer and offer retained messages)",
            cluster.subscriptions.clone(),
        );
        c.register(
            "remote_takeovers",
            "Local MQTT sessions closed because a client with the same id connected to another worker or node",
            cluster.remote_takeovers.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector { max_fds }));
        if let Some(runtime) = runtime {
            registry.register_collector(Box::new(RuntimeCollector { runtime }));
        }
        Metrics {
            registry,
            websocket,
            mqtt,
            accept_fd_exhausted,
            loop_lag,
            memory_trim_seconds,
            admin_evictions,
            admin_refused,
            memory_refusals,
            memory_limit,
            cluster,
        }
    }

    /// The exposition text served at `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The standard `process_*` metrics, read from `/proc` at scrape time.
#[derive(Debug)]
struct ProcessCollector {
    max_fds: u64,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = ProcessStats::read() else {
            return Ok(());
        };
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, value: i64| {
            let metric = ConstGauge::new(value);
            let m = enc.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(m)
        };
        let cpu = ConstCounter::new(stats.cpu_seconds);
        let m = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?;
        cpu.encode(m)?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            stats.rss_bytes as i64,
        )?;
        gauge(&mut encoder, "process_open_fds", "Number of open file descriptors", stats.open_fds as i64)?;
        gauge(&mut encoder, "process_max_fds", "The open-file limit (soft)", self.max_fds as i64)?;
        gauge(&mut encoder, "process_threads", "Number of OS threads", stats.threads as i64)?;
        gauge(
            &mut encoder,
            "echo_memory_heap_bytes",
            "Heap bytes allocated and not freed, counted by the allocator: what the memory budget is checked against",
            crate::heap::in_use() as i64,
        )?;
        Ok(())
    }
}

/// The event loop's own figures: how many worker threads drive the sockets
/// (always 1: that is the design) and how many tasks are alive.
#[derive(Debug)]
struct RuntimeCollector {
    runtime: tokio::runtime::Handle,
}

impl Collector for RuntimeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = self.runtime.metrics();
        for (name, help, value) in [
            (
                "echo_runtime_workers",
                "Threads of the event loop that serves every client socket",
                metrics.num_workers(),
            ),
            ("echo_runtime_alive_tasks", "Tasks alive on the event loop", metrics.num_alive_tasks()),
        ] {
            let metric = ConstGauge::new(value as i64);
            let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_names() {
        let metrics = Metrics::new(20_000, None);
        metrics.websocket.text_received.inc();
        metrics.websocket.close_sent(Some(1001));
        metrics.websocket.close_received(Some(4321));
        metrics.websocket.reject("capacity");
        metrics.websocket.http_request("BREW");
        metrics.loop_lag.record(std::time::Duration::from_millis(3));
        let text = metrics.encode();
        for needle in [
            "echo_websocket_connections ",
            "echo_websocket_accepted_total ",
            "echo_websocket_upgrades_total ",
            "echo_websocket_messages_received_total{kind=\"text\"} 1",
            "echo_websocket_close_codes_sent_total{code=\"1001\"} 1",
            "echo_websocket_close_codes_received_total{code=\"4xxx\"} 1",
            "echo_websocket_rejected_total{reason=\"capacity\"} 1",
            "echo_http_requests_total{method=\"other\"} 1",
            "echo_http_request_body_bytes_total 0",
            "echo_http_keepalive_requests_total 0",
            "echo_sse_streams 0",
            "echo_sse_opened_total 0",
            "echo_sse_events_total 0",
            "echo_sse_skipped_events_total 0",
            "echo_sse_sent_bytes_total 0",
            "process_resident_memory_bytes ",
            "process_max_fds 20000",
            "echo_event_loop_lag_seconds_bucket{le=\"0.005\"} 1",
            "echo_event_loop_lag_seconds_count 1",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn close_code_labels_are_bounded() {
        assert_eq!(code_label(Some(1000)), "1000");
        assert_eq!(code_label(Some(3001)), "3xxx");
        assert_eq!(code_label(Some(4999)), "4xxx");
        assert_eq!(code_label(Some(2000)), "other");
        assert_eq!(code_label(None), "none");
    }
}
