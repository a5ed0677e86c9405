//! MQTT persistence across restarts (`mqtt.persistence`), in the spirit of
//! Mosquitto's `persistence true`: retained messages and persistent
//! sessions (their subscriptions and the QoS 1/2 messages queued for them)
//! are written to one file at graceful shutdown and every
//! `mqtt.persistence_interval`, and loaded at start.
//!
//! # Where the work happens
//!
//! The router assembles the snapshot itself, between two of its events
//! (`Router::snapshot`, asked for through a `SnapshotHandle`), so that it
//! is consistent and works wherever the router runs. It only copies: the
//! messages' bodies are shared `Bytes`. Encoding, checksumming and the file
//! I/O run on a blocking thread (`spawn_blocking`), so a write never stalls
//! the event loop, which may be the router's thread too
//! (`mqtt.router = "event-loop"`).
//!
//! # The file
//!
//! `MAGIC` (8 bytes), the format version (u16 LE), the body's length (u64
//! LE), its CRC-32 (u32 LE), then the body: a [`Snapshot`] in postcard's
//! compact serde encoding. It is written whole to a temporary file in the
//! same directory, synced, renamed over the old one and the directory
//! synced: a crash (kill -9, power loss) leaves the old file or the new
//! one, never half of one. Each check of [`decode`] names what is wrong,
//! so that a damaged file is reported, never trusted, never a panic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::SnapshotHandle;
use rumqttd::snapshot::{RouterSnapshot, unix_ms};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::{CorruptSnapshot, MqttConfig};
use crate::metrics::MqttMetrics;
use crate::shutdown::Shutdown;

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"ECHOMQTT";
/// The format this server writes and reads. A change of [`Snapshot`] (or of
/// the router's snapshot types) that old files cannot decode into needs a
/// new version.
pub const VERSION: u16 = 1;
/// Magic, version, body length, checksum.
const HEADER_LEN: usize = 8 + 2 + 8 + 4;

/// What the file holds: the router's state, and what the server keeps
/// beside it per session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub router: RouterSnapshot,
    /// The username each kept session was last connected with (with the
    /// ACL on, only that user may resume it: `caps::Kept::owner`).
    pub owners: Vec<(String, Option<String>)>,
}

/// What is wrong with a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    #[error("{0} bytes, shorter than the {HEADER_LEN}-byte header (truncated)")]
    TooShort(usize),
    #[error("not an echo-server MQTT snapshot (its first bytes are not {MAGIC:?})")]
    Magic,
    #[error("format version {0}; this server reads version {VERSION}")]
    Version(u16),
    #[error("truncated: the header announces {expected} bytes of data, the file has {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("{0} bytes after the announced end of the data")]
    Trailing(u64),
    #[error("checksum mismatch (CRC-32 {found:08x}, expected {expected:08x}): the data is damaged")]
    Checksum { expected: u32, found: u32 },
    #[error("the data does not decode: {0}")]
    Decode(String),
}

/// Why the snapshot could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "MQTT persistence file {path} is corrupt: {problem}; not starting \
         (move the file away, or set mqtt.persistence_corrupt = \"start-empty\")"
    )]
    Corrupt { path: String, problem: Corrupt },
    #[error("cannot read the MQTT persistence file {path}: {source}")]
    Unreadable { path: String, source: std::io::Error },
}

/// The file's bytes for a snapshot.
pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let body = postcard::to_stdvec(snapshot).expect("a snapshot always serializes");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A snapshot back from the file's bytes, every part checked.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, Corrupt> {
    if bytes.len() < HEADER_LEN {
        // A file cut inside the magic is still recognisably ours or not.
        let n = bytes.len().min(MAGIC.len());
        if bytes[..n] != MAGIC[..n] {
            return Err(Corrupt::Magic);
        }
        return Err(Corrupt::TooShort(bytes.len()));
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    if &header[..8] != MAGIC {
        return Err(Corrupt::Magic);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != VERSION {
        return Err(Corrupt::Version(version));
    }
    let expected = u64::from_le_bytes(header[10..18].try_into().expect("8 bytes"));
    let found = body.len() as u64;
    if found < expected {
        return Err(Corrupt::Truncated { expected, found });
    }
    if found > expected {
        return Err(Corrupt::Trailing(found - expected));
    }
    let expected_crc = u32::from_le_bytes(header[18..22].try_into().expect("4 bytes"));
    let crc = crc32fast::hash(body);
    if crc != expected_crc {
        return Err(Corrupt::Checksum { expected: expected_crc, found: crc });
    }
    postcard::from_bytes(body).map_err(|e| Corrupt::Decode(e.to_string()))
}

/// Writes `bytes` to `path` so that a crash at any moment leaves either
/// the old file or the new one: a temporary file in the same directory,
/// synced, renamed over `path`, and the directory synced (the rename
/// itself durable).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = directory(path);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The directory the snapshot file goes in (where its temporary file is
/// made too).
fn directory(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks, at start, that the snapshot file's directory is there: a typo
/// in `mqtt.persistence_file` is a configuration error, not a server that
/// runs for hours and then fails to save.
pub fn check_directory(config: &MqttConfig) -> Result<(), String> {
    let dir = directory(Path::new(&config.persistence_file));
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!("mqtt.persistence_file: {} is not a directory", dir.display())),
        Err(e) => Err(format!("mqtt.persistence_file: directory {}: {e}", dir.display())),
    }
}

/// Reads the snapshot file at start, before anything is bound: `None`
/// when there is none yet, or when it is corrupt and
/// `mqtt.persistence_corrupt` is `start-empty` (the file then moved aside
/// to `FILE.corrupt`, and the problem logged).
pub fn load(config: &MqttConfig) -> Result<Option<Snapshot>, LoadError> {
    let path = Path::new(&config.persistence_file);
    let shown = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!(file = %shown, "MQTT persistence: no snapshot file yet; starting empty");
            return Ok(None);
        }
        Err(source) => return Err(LoadError::Unreadable { path: shown, source }),
    };
    match decode(&bytes) {
        Ok(snapshot) => Ok(Some(snapshot)),
        Err(problem) => match config.persistence_corrupt {
            CorruptSnapshot::Refuse => Err(LoadError::Corrupt { path: shown, problem }),
            CorruptSnapshot::StartEmpty => {
                let aside = PathBuf::from(format!("{}.corrupt", path.display()));
                let moved = std::fs::rename(path, &aside);
                error!(
                    file = %shown,
                    problem = %problem,
                    moved_to = %aside.display(),
                    moved = moved.is_ok(),
                    "MQTT persistence file is corrupt; starting without it (mqtt.persistence_corrupt = \"start-empty\")"
                );
                Ok(None)
            }
        },
    }
}

/// A restored session as the server's own bookkeeping needs it
/// (`caps::Kept`): its client id, filters, time left and owner.
pub(crate) struct KeptSession {
    pub(crate) client_id: String,
    pub(crate) filters: Vec<String>,
    pub(crate) expires_in: Option<Duration>,
    pub(crate) owner: Option<String>,
}

/// The sessions of a snapshot that are still alive now, for `caps::Kept`
/// (the router restores its own part: `Router::restore`).
pub(crate) fn kept_sessions(snapshot: &Snapshot) -> Vec<KeptSession> {
    let down = Duration::from_millis(unix_ms().saturating_sub(snapshot.router.taken_at_ms));
    let owners: std::collections::HashMap<&str, &Option<String>> =
        snapshot.owners.iter().map(|(id, owner)| (id.as_str(), owner)).collect();
    snapshot
        .router
        .sessions
        .iter()
        .filter_map(|s| {
            let expires_in = match s.expires_in_ms {
                Some(ms) => Some(Duration::from_millis(ms).checked_sub(down).filter(|d| !d.is_zero())?),
                None => None,
            };
            Some(KeptSession {
                client_id: s.client_id.clone(),
                filters: s.subscriptions.iter().map(|f| f.filter.clone()).collect(),
                expires_in,
                owner: owners.get(s.client_id.as_str()).and_then(|o| (*o).clone()),
            })
        })
        .collect()
}

/// Writes snapshots: one at a time (the periodic one and the last one at
/// shutdown never overlap on the temporary file).
pub(crate) struct Persister {
    handle: SnapshotHandle,
    path: PathBuf,
    metrics: Arc<MqttMetrics>,
    writing: tokio::sync::Mutex<()>,
}

impl Persister {
    pub(crate) fn new(handle: SnapshotHandle, config: &MqttConfig, metrics: Arc<MqttMetrics>) -> Rc<Self> {
        Rc::new(Persister {
            handle,
            path: PathBuf::from(&config.persistence_file),
            metrics,
            writing: tokio::sync::Mutex::new(()),
        })
    }

    /// Takes a snapshot and writes it; `owners` is the server's part. Logs
    /// and counts a failure; returns what was written.
    pub(crate) async fn save(&self, owners: Vec<(String, Option<String>)>) -> Option<Written> {
        let _one_at_a_time = self.writing.lock().await;
        let started = Instant::now();
        let Some(mut router) = self.handle.take().await else {
            self.metrics.persistence_write_failures.inc();
            error!(file = %self.path.display(), "MQTT persistence: no snapshot written, the router is not running");
            return None;
        };
        let router_time = started.elapsed();
        // `$` topics are the server's own (`$SYS`, published afresh at
        // start), never a client's.
        router.retained.retain(|m| !m.topic.starts_with(b"$"));
        let counts = Written {
            bytes: 0,
            sessions: router.sessions.len(),
            retained: router.retained.len(),
            queued: router.queued_messages(),
            router_time,
            total_time: Duration::ZERO,
        };
        let snapshot = Snapshot { router, owners };
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let bytes = encode(&snapshot);
            write_atomic(&path, &bytes).map(|()| bytes.len())
        })
        .await;
        let total_time = started.elapsed();
        let failure = match written {
            Ok(Ok(bytes)) => {
                self.metrics.persistence_snapshots_written.inc();
                self.metrics.persistence_last_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
                self.metrics.persistence_last_seconds.set(total_time.as_secs_f64());
                let written = Written { bytes, total_time, ..counts };
                tracing::debug!(file = %self.path.display(), ?written, "MQTT persistence: snapshot written");
                return Some(written);
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("the writer thread failed: {e}"),
        };
        self.metrics.persistence_write_failures.inc();
        error!(
            file = %self.path.display(),
            error = %failure,
            "MQTT persistence: cannot write the snapshot; the previous file is kept"
        );
        None
    }

    /// The last snapshot, at graceful shutdown, with its figures logged.
    pub(crate) async fn save_at_shutdown(&self, owners: Vec<(String, Option<String>)>) {
        if let Some(w) = self.save(owners).await {
            info!(
                file = %self.path.display(),
                bytes = w.bytes,
                sessions = w.sessions,
                retained_messages = w.retained,
                queued_messages = w.queued,
                router_ms = w.router_time.as_secs_f64() * 1e3,
                total_ms = w.total_time.as_secs_f64() * 1e3,
                "MQTT persistence: snapshot written at shutdown"
            );
        }
    }
}

/// What one snapshot held and cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Written {
    pub(crate) bytes: usize,
    pub(crate) sessions: usize,
    pub(crate) retained: usize,
    pub(crate) queued: usize,
    /// Asking the router to having its snapshot (the router's own pause is
    /// part of it).
    pub(crate) router_time: Duration,
    /// Asking the router to the renamed, synced file.
    pub(crate) total_time: Duration,
}

/// Writes a snapshot every `interval` until the shutdown starts (the last
/// one is the shutdown's: `server::run`).
pub(crate) async fn run(
    persister: Rc<Persister>,
    server: Rc<super::MqttServer>,
    interval: Duration,
    shutdown: Rc<Shutdown>,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait() => return,
        }
        if persister.save(server.kept.owners()).await.is_none() {
            warn!("MQTT persistence: the next attempt is in mqtt.persistence_interval");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rumqttd::snapshot::{SavedMessage, SavedSession, SavedSubscription};

    fn sample() -> Snapshot {
        let message = SavedMessage {
            topic: Bytes::from_static(b"a/b"),
            payload: Bytes::from_static(b"hello"),
            qos: 1,
            retain: true,
            properties: None,
            age_ms: 5,
            origin: 3,
        };
        Snapshot {
            router: RouterSnapshot {
                taken_at_ms: 1_700_000_000_000,
                retained: vec![message],
                logs: Vec::new(),
                sessions: vec![SavedSession {
                    client_id: "c".into(),
                    subscriptions: vec![SavedSubscription {
                        filter: "a/#".into(),
                        subscription_id: Some(7),
                        request: None,
                    }],
                    unacked_pubrels: vec![4],
                    expires_in_ms: Some(60_000),
                    origin: 3,
                }],
            },
            owners: vec![("c".into(), Some("alice".into()))],
        }
    }

    #[test]
    fn a_snapshot_survives_the_round_trip() {
        let snapshot = sample();
        assert_eq!(decode(&encode(&snapshot)).unwrap(), snapshot);
    }

    /// Every way a file can be damaged is named, none panics: every
    /// truncation, every single flipped byte, bad magic and versions.
    #[test]
    fn damage_is_reported_never_trusted() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, Corrupt::TooShort(_) | Corrupt::Truncated { .. } | Corrupt::Magic),
                "cut at {len}: {err}"
            );
        }
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(decode(&damaged).is_err(), "flipped byte {at} went unnoticed");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer).unwrap_err(), Corrupt::Trailing(1));
        let mut version = bytes.clone();
        version[8] = 9;
        assert_eq!(decode(&version).unwrap_err(), Corrupt::Version(9));
        assert_eq!(decode(b"{\"json\": true} and more text").unwrap_err(), Corrupt::Magic);
    }

    #[test]
    fn the_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("echo-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.db")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
