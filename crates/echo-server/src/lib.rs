//! echo-server: a WebSocket echo server and MQTT broker that serves every
//! client socket from one single-threaded event loop.
//!
//! Module map: [`config`] (schema, layers, validation), [`cli`], [`limits`]
//! (open-file limit), [`listener`] (binding, accept loop, connection limit),
//! [`ws`] (handshake and echo sessions), [`mqtt`] (the broker: rumqttd's
//! router, our sockets and sessions), [`cluster`] (the brokers bridged over
//! NATS), [`admin`] (health and metrics),
//! [`metrics`], `episode` (log a recurring condition once per episode), [`lag`] (event-loop lag probe), [`process`] (`/proc`
//! readings), [`stats`] (summary line),
//! [`shutdown`], [`server`] (start and stop), [`logging`], [`healthcheck`],
//! [`heap`] (bytes allocated, counted), [`budget`] (`server.memory_limit`),
//! [`trim`] (freed memory back to the OS), [`tls`] (certificates and keys
//! for the listeners that offer TLS), [`supervisor`] (several worker
//! processes on the same ports).

pub mod admin;
pub mod budget;
pub mod cli;
pub mod cluster;
pub mod config;
pub(crate) mod episode;
pub mod healthcheck;
pub mod heap;
pub mod lag;
pub mod limits;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod process;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod supervisor;
pub mod tls;
pub mod trim;
pub mod ws;

/// Every program built with this library counts its heap ([`heap`]), so
/// that the memory budget ([`budget`]) sees what the server holds.
#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;
