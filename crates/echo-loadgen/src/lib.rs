//! echo-loadgen: a load generator for WebSocket echo servers and MQTT
//! brokers. See README.md for usage and the JSON schema.
//!
//! The modules, from the wire up:
//! - [`payload`]: the bytes each message carries and the check of each echo;
//! - [`flow`]: one connection's schedule, outstanding messages and verdicts;
//! - [`ws`], [`mqtt`] (+ the `echo-mqtt-wire` codec), [`net`]: the two
//!   transports;
//! - [`stats`], [`histogram`]: what is counted, mergeable exactly;
//! - [`worker`], [`ipc`], [`coordinator`]: processes and phases;
//! - [`usage`]: the server's and the generator's own resources;
//! - [`result`], [`report`], [`chart`], [`live`]: what people read;
//! - [`scenario`], [`target`], [`preflight`], [`cli`]: what people write;
//! - [`start`]: agents on several machines starting at one moment;
//! - [`mixed`], [`churn`]: the two measurements that are not steps of
//!   one kind of client (WebSocket and MQTT clients in phases; rounds of
//!   MQTT clients that come and go).

pub mod chart;
pub mod churn;
pub mod cli;
pub mod coordinator;
pub mod flow;
pub mod histogram;
pub mod ipc;
pub mod live;
pub mod mixed;
pub mod mqtt;
pub mod net;
pub mod payload;
pub mod preflight;
pub mod report;
pub mod result;
pub mod scenario;
pub mod schedule;
pub mod start;
pub mod stats;
pub mod target;
pub mod usage;
pub mod worker;
pub mod ws;
