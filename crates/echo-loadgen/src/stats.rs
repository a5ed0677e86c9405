//! What a worker counts: per-step accumulators and the live counters.
//!
//! Every connection task records into one of a few mutex-guarded shards
//! (chosen by connection id), so recording never contends with more than a
//! handful of other tasks and a whole step can be taken out atomically
//! per shard. A histogram per connection would cost ~10s of KiB each; a
//! shard per few thousand connections costs nothing measurable.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::histogram::Hist;

/// Why a connection or a message failed. The names are the keys of the
/// `errors` maps in the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Nothing listens at the address (TCP RST on connect).
    ConnectRefused,
    /// TCP connect did not complete within the connect timeout.
    ConnectTimeout,
    /// No local port/address left (EADDRNOTAVAIL): add `--source` addresses.
    AddressUnavailable,
    /// This process ran out of file descriptors (EMFILE).
    LocalFdLimit,
    /// Any other error while connecting.
    ConnectFailed,
    /// The server answered the upgrade with this HTTP status instead of 101.
    HandshakeStatus(u16),
    /// The upgrade did not finish within the timeout.
    HandshakeTimeout,
    /// The upgrade failed otherwise (bad response, reset).
    HandshakeFailed,
    /// The broker refused CONNECT with this CONNACK code.
    MqttConnackRefused(u8),
    /// The broker refused SUBSCRIBE.
    MqttSubscribeRefused,
    /// The server sent a close frame (WebSocket) or DISCONNECT (MQTT).
    ClosedByServer,
    /// The TCP connection ended without a closing handshake.
    ConnectionEof,
    /// The TCP connection was reset or failed while running.
    ConnectionReset,
    /// The peer violated the protocol (bad frame, unexpected packet).
    ProtocolError,
    /// An echo arrived with different content than was sent.
    EchoMismatch,
    /// A well-formed echo arrived out of order (or duplicated).
    EchoOutOfOrder,
    /// A message was never echoed: a later one arrived first.
    EchoLost,
    /// No echo within the message timeout; the connection is given up.
    EchoTimeout,
    /// A write did not complete within the timeout of the oldest message in
    /// it (the server stopped reading; the socket buffers are full); the
    /// connection is given up.
    WriteStall,
    /// A message that this tool did not send (e.g. text for binary).
    UnexpectedMessage,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::ConnectRefused => f.write_str("connect_refused"),
            ErrorKind::ConnectTimeout => f.write_str("connect_timeout"),
            ErrorKind::AddressUnavailable => f.write_str("address_unavailable"),
            ErrorKind::LocalFdLimit => f.write_str("local_fd_limit"),
            ErrorKind::ConnectFailed => f.write_str("connect_failed"),
            ErrorKind::HandshakeStatus(code) => write!(f, "handshake_http_{code}"),
            ErrorKind::HandshakeTimeout => f.write_str("handshake_timeout"),
            ErrorKind::HandshakeFailed => f.write_str("handshake_failed"),
            ErrorKind::MqttConnackRefused(code) => write!(f, "mqtt_connack_{code}"),
            ErrorKind::MqttSubscribeRefused => f.write_str("mqtt_subscribe_refused"),
            ErrorKind::ClosedByServer => f.write_str("closed_by_server"),
            ErrorKind::ConnectionEof => f.write_str("connection_eof"),
            ErrorKind::ConnectionReset => f.write_str("connection_reset"),
            ErrorKind::ProtocolError => f.write_str("protocol_error"),
            ErrorKind::EchoMismatch => f.write_str("echo_mismatch"),
            ErrorKind::EchoOutOfOrder => f.write_str("echo_out_of_order"),
            ErrorKind::EchoLost => f.write_str("echo_lost"),
            ErrorKind::EchoTimeout => f.write_str("echo_timeout"),
            ErrorKind::WriteStall => f.write_str("write_stall"),
            ErrorKind::UnexpectedMessage => f.write_str("unexpected_message"),
        }
    }
}

impl ErrorKind {
    /// Errors that happen before a connection is ready count against
    /// connections; the others against messages.
    pub fn is_connect_error(&self) -> bool {
        matches!(
            self,
            ErrorKind::ConnectRefused
                | ErrorKind::ConnectTimeout
                | ErrorKind::AddressUnavailable
                | ErrorKind::LocalFdLimit
                | ErrorKind::ConnectFailed
                | ErrorKind::HandshakeStatus(_)
                | ErrorKind::HandshakeTimeout
                | ErrorKind::HandshakeFailed
                | ErrorKind::MqttConnackRefused(_)
                | ErrorKind::MqttSubscribeRefused
        )
    }
}

/// Everything counted over one interval (a ramp or a hold) by one or more
/// workers. Merging two is exact: sums of counters and of histograms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Connection attempts started.
    pub attempted: u64,
    /// Connections that became ready (handshake done, subscribed).
    pub connected: u64,
    /// Time from starting the TCP connect to ready.
    pub connect_time: Hist,
    /// Messages written to the socket.
    pub sent: u64,
    /// Echoes (MQTT: deliveries) received and verified.
    pub received: u64,
    /// Latency from the scheduled send time to the verified echo.
    pub latency: Hist,
    /// Errors by kind (see [`ErrorKind`]).
    pub errors: BTreeMap<String, u64>,
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        self.attempted += other.attempted;
        self.connected += other.connected;
        self.connect_time.merge(&other.connect_time);
        self.sent += other.sent;
        self.received += other.received;
        self.latency.merge(&other.latency);
        for (kind, n) in &other.errors {
            *self.errors.entry(kind.clone()).or_default() += n;
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Errors that happened to connections before they were ready.
    pub fn connect_errors(&self) -> u64 {
        self.errors.iter().filter(|(k, _)| is_connect_error_name(k)).map(|(_, n)| n).sum()
    }

    fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }
}

/// Tells a connect error from its JSON name (used after merging files).
pub fn is_connect_error_name(name: &str) -> bool {
    name.starts_with("connect_")
        || name.starts_with("handshake_")
        || name.starts_with("mqtt_")
        || name == "address_unavailable"
        || name == "local_fd_limit"
}

struct Shard {
    tally: Tally,
    /// Latency since the last live tick.
    tick: Hist,
}

/// Totals for the live view, read without locks.
#[derive(Default)]
pub struct Live {
    pub open: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub errors: AtomicU64,
    pub attempted: AtomicU64,
    /// Attempts that ended: ready, or failed before ready.
    pub settled: AtomicU64,
}

/// The recording side shared by every connection task of a worker.
pub struct Recorder {
    shards: Vec<Mutex<Shard>>,
    pub live: Live,
}

impl Recorder {
    pub fn new(shards: usize) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| Mutex::new(Shard { tally: Tally::default(), tick: Hist::new() }))
            .collect();
        Recorder { shards, live: Live::default() }
    }

    fn with<R>(&self, conn: u32, f: impl FnOnce(&mut Shard) -> R) -> R {
        let shard = &self.shards[conn as usize % self.shards.len()];
        let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn attempt(&self, conn: u32) {
        self.live.attempted.fetch_add(1, Ordering::Relaxed);
        self.with(conn, |s| s.tally.attempted += 1);
    }

    pub fn connected(&self, conn: u32, micros: u64) {
        self.live.open.fetch_add(1, Ordering::Relaxed);
        self.live.settled.fetch_add(1, Ordering::Relaxed);
        self.with(conn, |s| {
            s.tally.connected += 1;
            s.tally.connect_time.record(micros);
        });
    }

    /// A ready connection went away (error or stop).
    pub fn closed(&self) {
        self.live.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn sent(&self, conn: u32, n: u64) {
        self.live.sent.fetch_add(n, Ordering::Relaxed);
        self.with(conn, |s| s.tally.sent += n);
    }

    pub fn received(&self, conn: u32, latency_micros: u64) {
        self.live.received.fetch_add(1, Ordering::Relaxed);
        self.with(conn, |s| {
            s.tally.received += 1;
            s.tally.latency.record(latency_micros);
            s.tick.record(latency_micros);
        });
    }

    pub fn error(&self, conn: u32, kind: ErrorKind) {
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        if kind.is_connect_error() {
            self.live.settled.fetch_add(1, Ordering::Relaxed);
        }
        self.with(conn, |s| s.tally.error(kind));
    }

    /// Takes everything recorded since the last call, leaving zeros.
    pub fn take(&self) -> Tally {
        let mut out = Tally::default();
        for shard in &self.shards {
            let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.merge(&std::mem::take(&mut guard.tally));
        }
        out
    }

    /// Latency since the previous tick, for the live view.
    pub fn take_tick(&self) -> Hist {
        let mut out = Hist::new();
        for shard in &self.shards {
            let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.merge(&guard.tick);
            guard.tick.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_takes_and_resets() {
        let r = Recorder::new(4);
        for conn in 0..10 {
            r.attempt(conn);
            r.connected(conn, 1_000 + conn as u64);
            r.sent(conn, 2);
            r.received(conn, 500);
        }
        r.error(3, ErrorKind::EchoMismatch);
        r.error(4, ErrorKind::HandshakeStatus(503));
        let t = r.take();
        assert_eq!((t.attempted, t.connected, t.sent, t.received), (10, 10, 20, 10));
        assert_eq!(t.latency.count(), 10);
        assert_eq!(t.errors["echo_mismatch"], 1);
        assert_eq!(t.errors["handshake_http_503"], 1);
        assert_eq!(t.connect_errors(), 1);
        assert_eq!(r.take(), Tally::default());
        assert_eq!(r.take_tick().count(), 10);
        assert_eq!(r.live.open.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn tallies_merge_by_summing() {
        let mut a = Tally { sent: 5, received: 4, ..Default::default() };
        a.errors.insert("echo_timeout".into(), 1);
        a.latency.record(10);
        let mut b = Tally { sent: 1, received: 1, ..Default::default() };
        b.errors.insert("echo_timeout".into(), 2);
        b.latency.record(20);
        a.merge(&b);
        assert_eq!((a.sent, a.received, a.errors["echo_timeout"], a.latency.count()), (6, 5, 3, 2));
    }

    #[test]
    fn error_names_classify() {
        for k in
            [ErrorKind::ConnectRefused, ErrorKind::HandshakeStatus(404), ErrorKind::MqttConnackRefused(5)]
        {
            assert!(k.is_connect_error());
            assert!(is_connect_error_name(&k.to_string()));
        }
        for k in [
            ErrorKind::EchoMismatch,
            ErrorKind::ClosedByServer,
            ErrorKind::EchoTimeout,
            ErrorKind::WriteStall,
        ] {
            assert!(!k.is_connect_error());
            assert!(!is_connect_error_name(&k.to_string()));
        }
    }
}
