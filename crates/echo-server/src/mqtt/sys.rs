//! The broker's statistics under `$SYS/broker/...`, as Mosquitto publishes
//! them (its `sys_interval`): every `mqtt.sys_interval`, each figure that
//! changed since it last went out is published, retained at QoS 0, through
//! the server's internal link (`broker::Broker::publish_own`). Retained, so
//! that a new subscriber to `$SYS/#` has every figure at once; only when
//! changed, so that an idle broker publishes its uptime and little else.
//!
//! The figures are the ones the server already counts: `MqttMetrics` (the
//! same as `/metrics`) and the router's own counts (our rumqttd patch). One
//! interval costs a dozen counter reads and at most [`TOPICS`] small
//! publishes, handed to the router with one event: bounded, whatever the
//! number of clients, as it must be on the one event loop.
//!
//! `#` and `+/...` do not match these topics (MQTT §4.7.2; the router's
//! matching, see vendor/rumqttd/PATCHED.md), and clients may not publish to
//! `$` topics (`topics::server_only`).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::broker::Broker;
use crate::metrics::{MqttMetrics, ReasonLabel};
use crate::shutdown::Shutdown;

/// How many figures there are.
const FIGURES: usize = 15;

/// Every topic published, in the order of [`figures`].
pub(crate) const TOPICS: [&str; FIGURES] = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/clients/disconnected",
    "$SYS/broker/clients/total",
    "$SYS/broker/clients/maximum",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/publish/messages/received",
    "$SYS/broker/publish/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
    "$SYS/broker/subscriptions/count",
    "$SYS/broker/retained messages/count",
    "$SYS/broker/publish/messages/dropped",
];

/// The figures at one moment, as the payloads of [`TOPICS`], in order.
/// `maximum`: the most clients connected at any sample so far.
fn figures(broker: &Broker, metrics: &MqttMetrics, uptime: Duration, maximum: u64) -> [String; FIGURES] {
    let router = broker.router_counts();
    let connected = metrics.open();
    let dropped = ["max_packet_size", "max_queued"]
        .into_iter()
        .map(|reason| metrics.dropped.get_or_create(&ReasonLabel { reason }).get())
        .sum::<u64>();
    [
        format!("echo-server version {}", env!("CARGO_PKG_VERSION")),
        format!("{} seconds", uptime.as_secs()),
        connected.to_string(),
        router.kept_sessions.to_string(),
        (connected + router.kept_sessions).to_string(),
        maximum.to_string(),
        metrics.packets_received_total().to_string(),
        metrics.packets_sent_total().to_string(),
        metrics.publishes_received.get().to_string(),
        metrics.publishes_sent.get().to_string(),
        metrics.bytes_received.get().to_string(),
        metrics.bytes_sent.get().to_string(),
        router.subscriptions.to_string(),
        router.retained_messages.to_string(),
        dropped.to_string(),
    ]
}

/// What went out last, per topic, so that only changes are published.
#[derive(Debug, Default)]
struct Published {
    last: [Option<String>; FIGURES],
    maximum: u64,
}

impl Published {
    /// The figures that changed since they last went out; taken as
    /// published (if they could not be handed over, they all go out again
    /// at the next interval).
    fn changes(&mut self, figures: [String; FIGURES]) -> Vec<(&'static str, String)> {
        let mut changed = Vec::new();
        for ((topic, last), now) in TOPICS.into_iter().zip(&mut self.last).zip(figures) {
            if last.as_ref() != Some(&now) {
                *last = Some(now.clone());
                changed.push((topic, now));
            }
        }
        changed
    }
}

/// Publishes the figures every `interval` (the first at once) until
/// shutdown. Not started when the interval is zero.
pub(crate) async fn run(
    broker: Rc<Broker>,
    metrics: Arc<MqttMetrics>,
    interval: Duration,
    shutdown: Rc<Shutdown>,
) {
    let started = Instant::now();
    let mut published = Published::default();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.wait() => return,
            _ = ticks.tick() => {}
        }
        published.maximum = published.maximum.max(metrics.open());
        let now = figures(&broker, &metrics, started.elapsed(), published.maximum);
        let changes = published.changes(now);
        if !broker.publish_own(changes) {
            // The link is being registered again: everything goes out next time.
            published.last = Default::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures_with(uptime: &str, connected: &str) -> [String; FIGURES] {
        let mut all: [String; FIGURES] = Default::default();
        for (i, figure) in all.iter_mut().enumerate() {
            *figure = format!("f{i}");
        }
        all[1] = uptime.to_owned();
        all[2] = connected.to_owned();
        all
    }

    /// Everything goes out the first time; after that, only what changed.
    #[test]
    fn only_changed_figures_go_out() {
        let mut published = Published::default();
        assert_eq!(published.changes(figures_with("0 seconds", "0")).len(), TOPICS.len());
        let changed = published.changes(figures_with("10 seconds", "0"));
        assert_eq!(changed, vec![("$SYS/broker/uptime", "10 seconds".to_owned())]);
        let changed = published.changes(figures_with("20 seconds", "3"));
        let topics: Vec<&str> = changed.iter().map(|(topic, _)| *topic).collect();
        assert_eq!(topics, ["$SYS/broker/uptime", "$SYS/broker/clients/connected"]);
        assert!(published.changes(figures_with("20 seconds", "3")).is_empty());
    }

    /// Every topic is one a client may subscribe to and the router takes.
    #[test]
    fn topics_are_server_only_and_valid() {
        for topic in TOPICS {
            assert!(super::super::topics::server_only(topic.as_bytes()), "{topic}");
            assert_eq!(super::super::topics::check_topic(topic.as_bytes(), false), Ok(()), "{topic}");
        }
    }
}
