//! The MQTT cluster: every worker's and every node's broker bridged over
//! NATS (`cluster.nats_url`), so that a publish on any of them reaches the
//! matching subscribers on all.
//!
//! Each worker process runs one bridge ([`bridge`]) on its event loop,
//! with its own NATS connection (`no_echo`: it never receives what it
//! published itself) and its own internal router link:
//!
//! - **Out.** The router copies every publish it appends to its logs to
//!   the bridge (our rumqttd patch, `Router::tap`): clients' publishes
//!   (topic alias resolved; QoS 2 once released), wills; not the bridge's
//!   own injections, and `$` topics are left out here. The copy goes on a
//!   bounded channel (`cluster.buffer`) that the router never waits on:
//!   when NATS is slow or down, what does not fit is dropped and counted.
//!   Each becomes one NATS message ([`envelope`]) on the subject of its
//!   topic ([`subject`]): under `PREFIX.r.` when retained, else `PREFIX.m.`.
//! - **Interest.** The router says when local sessions start and stop
//!   holding a filter (our patch, `Router::filter_events`); the bridge
//!   holds one NATS subscription per subject those filters map to. NATS
//!   then forwards a node's publish only to the nodes where someone
//!   subscribes (the publish itself always goes to the NATS server).
//! - **In.** What arrives is decoded and handed to the local router on the
//!   bridge's link, at its own QoS and RETAIN flag, with its MQTT 5
//!   properties, to be delivered as any local publish is. A message that
//!   reached the bridge through two overlapping subscriptions (`a/+` and
//!   `+/b`) is handed over once.
//! - **Retained messages** go to every node (each subscribes to
//!   `PREFIX.r.>`), so each stores every retained message, and their
//!   deletions (an empty retained publish). A node that connects to NATS
//!   (at start, after an outage) asks the others for theirs and offers its
//!   own (`PREFIX.s.`); a receiver takes only topics it holds nothing for.
//! - **Take-over.** A session that connects is announced on
//!   `PREFIX.c.connect`; a bridge that has a connected session with that
//!   client id takes it over through its router, as a second local
//!   connection would (DISCONNECT 0x8E, the will).
//!
//! Between nodes a message goes at most once (core NATS): see
//! docs/mqtt.md, "Cluster", for what each QoS promises.

pub(crate) mod bridge;
pub(crate) mod envelope;
pub mod subject;

use std::str::FromStr;

/// Checks `cluster.nats_url`: one or more comma-separated NATS URLs
/// (`nats://`, `tls://`, `ws://` schemes, or `host:port`).
pub fn parse_urls(urls: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            if url.is_empty() {
                return Err(format!("{urls:?}: an empty URL in the list"));
            }
            async_nats::ServerAddr::from_str(url).map_err(|e| format!("{url:?} is not a NATS URL: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_urls("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert_eq!(parse_urls("nats://a:4222, nats://b:4222").unwrap().len(), 2);
        assert!(parse_urls("nats://a:4222,").is_err());
        assert!(parse_urls("http://a:4222").is_err());
        assert!(parse_urls("nats://a:notaport").is_err());
    }
}
