//! One worker's bridge between its broker and NATS (see [`super`]).
//!
//! Three tasks on the event loop, sharing the NATS client:
//! - [`outbound`]: the router's copies of publishes, take-over
//!   announcements, and this node's retained messages offered when it
//!   connects, to NATS; drops what cannot go (NATS down, a subject NATS
//!   would refuse) and counts it;
//! - `Interest::run`: NATS subscriptions following the filters local
//!   sessions hold; each subscription's messages go to one channel;
//! - `Inbound::run`: that channel into the local router, through the
//!   bridge's own link (acknowledging to the router what it asks for),
//!   and the answers to other nodes asking for the retained messages
//!   ([`RetainedCopy`]).
//!
//! None of them can hold the event loop or the router up: the router never
//! waits for the bridge (its copies go on a bounded channel, see
//! `Router::tap`), the NATS client runs its own task, and each of ours only
//! awaits its own input.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use rumqttd::protocol::{Packet, PubRel, PubRelReason, Publish, PublishProperties};
use rumqttd::{FilterEvent, Notification, TapMessage};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::envelope::{self, Seen};
use super::subject::{self, Kind};
use crate::config::ClusterConfig;
use crate::metrics::{ClusterMetrics, DirectionLabel};
use crate::mqtt::broker::{self, Broker, ClientLimits, Feeds, SessionExpiry};
use crate::shutdown::Shutdown;

/// The client id of the bridge's router link: NUL-prefixed, as the other
/// internal links (no client can take it); the router's tap leaves out
/// what it publishes.
pub const BRIDGE_CLIENT_ID: &str = "\u{0}echo-server-cluster";

/// The longest subject sent. NATS servers refuse a protocol line over
/// `max_control_line` (4 KiB by default) by closing the connection; a
/// subject, its reply and size fields must fit in it.
const MAX_SUBJECT: usize = 3800;

/// Messages from NATS waiting for the local router. Past it, the NATS
/// client's own buffer per subscription fills, and it drops (a "slow
/// consumer", logged by it).
const INBOUND_QUEUE: usize = 1024;

/// Publishes waiting in the bridge link's queue to the router; past it,
/// nothing more is taken from NATS until the router has taken them.
const LINK_QUEUE: usize = 512;

/// The NATS client's reconnect delay: doubling from 50 ms to 2 s.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX).min(6);
    Duration::from_millis(50 * 2u64.pow(exp)).min(Duration::from_secs(2))
}

/// Which local sessions are connected, by client id, for take-overs
/// announced by other nodes. Only a hash of each id is kept (a false match
/// costs one take-over attempt that finds nobody).
#[derive(Debug, Default)]
pub(crate) struct Presence {
    connected: RefCell<HashMap<u64, u32>>,
    announce: RefCell<Option<mpsc::Sender<String>>>,
}

fn id_hash(client_id: &str) -> u64 {
    use std::hash::Hasher;
    // Fixed keys: the same id gives the same hash for the process's life.
    let mut fixed = std::hash::DefaultHasher::new();
    fixed.write(client_id.as_bytes());
    fixed.finish()
}

impl Presence {
    /// A local session with this id is connected (after its CONNACK).
    pub(crate) fn connected(&self, client_id: &str) {
        *self.connected.borrow_mut().entry(id_hash(client_id)).or_insert(0) += 1;
        if let Some(announce) = &*self.announce.borrow() {
            // A full channel (a connect storm while NATS is slow) drops the
            // announcement: the other session, if any, stays connected.
            let _ = announce.try_send(client_id.to_owned());
        }
    }

    /// That session ended.
    pub(crate) fn left(&self, client_id: &str) {
        let mut connected = self.connected.borrow_mut();
        let hash = id_hash(client_id);
        if let Some(count) = connected.get_mut(&hash) {
            *count -= 1;
            if *count == 0 {
                connected.remove(&hash);
            }
        }
    }

    fn is_connected(&self, client_id: &str) -> bool {
        self.connected.borrow().contains_key(&id_hash(client_id))
    }
}

/// The retained messages this node holds, as the bridge saw them go by
/// (published here, or arrived from NATS), for another node that asks for
/// them when it starts or reconnects to NATS. The payloads and topics are
/// shared with the router's copies.
#[derive(Debug, Default)]
pub(crate) struct RetainedCopy {
    messages: RefCell<HashMap<Bytes, Kept>>,
}

/// A retained message, its properties, and when it went by.
type Kept = (Publish, Option<PublishProperties>, tokio::time::Instant);

impl RetainedCopy {
    /// A retained publish (or its deletion, an empty one) went by.
    fn note(&self, publish: &Publish, properties: &Option<PublishProperties>) {
        if !publish.retain {
            return;
        }
        let mut messages = self.messages.borrow_mut();
        if publish.payload.is_empty() {
            messages.remove(&publish.topic);
        } else {
            let entry = (publish.clone(), properties.clone(), tokio::time::Instant::now());
            messages.insert(publish.topic.clone(), entry);
        }
    }

    fn has(&self, topic: &[u8]) -> bool {
        self.messages.borrow().contains_key(topic)
    }

    /// The messages not expired, each with the expiry interval it has
    /// left; the expired ones are forgotten.
    fn snapshot(&self) -> Vec<(Publish, Option<PublishProperties>)> {
        let now = tokio::time::Instant::now();
        let mut messages = self.messages.borrow_mut();
        messages.retain(|_, (_, properties, at)| {
            let expiry = properties.as_ref().and_then(|p| p.message_expiry_interval);
            expiry.is_none_or(|secs| now.duration_since(*at) < Duration::from_secs(u64::from(secs)))
        });
        messages
            .values()
            .map(|(publish, properties, at)| {
                let mut properties = properties.clone();
                if let Some(p) = properties.as_mut()
                    && let Some(secs) = p.message_expiry_interval
                {
                    let left = u64::from(secs).saturating_sub(now.duration_since(*at).as_secs());
                    p.message_expiry_interval = Some(u32::try_from(left).unwrap_or(u32::MAX).max(1));
                }
                (publish.clone(), properties)
            })
            .collect()
    }
}

/// Starts the bridge: connects to NATS in the background (the server
/// starts whether or not NATS is up) and spawns its tasks. Must run on the
/// event loop.
pub(crate) async fn start(
    config: &ClusterConfig,
    max_packet: usize,
    broker: Rc<Broker>,
    feeds: Feeds,
    metrics: Arc<ClusterMetrics>,
    shutdown: Rc<Shutdown>,
) -> Result<(), async_nats::ConnectError> {
    let node = {
        let mut bytes = [0u8; 8];
        let _ = getrandom::fill(&mut bytes);
        u64::from_be_bytes(bytes)
    };
    let urls = super::parse_urls(&config.nats_url).expect("checked with the configuration");
    metrics.enabled.store(true, Ordering::Relaxed);
    let events = metrics.clone();
    let was_connected = Arc::new(AtomicBool::new(false));
    let (state_tx, state_rx) = watch::channel(false);
    let state_tx = Arc::new(state_tx);
    let client = async_nats::ConnectOptions::new()
        .name(format!("echo-server node {node:016x} pid {}", std::process::id()))
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .subscription_capacity(8192)
        .event_callback(move |event| {
            let metrics = events.clone();
            let was_connected = was_connected.clone();
            let state = state_tx.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics.connected.set(1);
                        state.send_replace(true);
                        if was_connected.swap(true, Ordering::Relaxed) {
                            metrics.reconnects.inc();
                            info!("cluster: connected to NATS again");
                        } else {
                            info!("cluster: connected to NATS");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        metrics.connected.set(0);
                        state.send_replace(false);
                        warn!(
                            "cluster: NATS connection lost; local clients are still served, \
                             publishes do not reach other workers and nodes until it is back \
                             (reconnecting with backoff)"
                        );
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        metrics.drop_one("slow_consumer");
                        debug!(
                            sid,
                            "cluster: NATS dropped messages for a subscription the bridge read too slowly"
                        );
                    }
                    async_nats::Event::ServerError(e) => {
                        warn!(error = %e, "cluster: the NATS server reports an error")
                    }
                    // Every failed reconnect attempt is one: the lost
                    // connection was logged once already.
                    other => debug!(event = %other, "cluster: NATS event"),
                }
            }
        })
        .connect(urls)
        .await?;
    info!(node = format!("{node:016x}"), nats_url = %config.nats_url, prefix = %config.subject_prefix, "cluster bridge started");
    let prefix: Rc<str> = config.subject_prefix.as_str().into();
    let (announce_tx, announce_rx) = mpsc::channel(1024);
    *broker.presence().announce.borrow_mut() = Some(announce_tx);
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let Feeds { tap, tap_drops, filters } = feeds;
    let drops = metrics.dropped.get_or_create_owned(&crate::metrics::ReasonLabel { reason: "buffer_full" });
    tokio::task::spawn_local(copy_drops(tap_drops, drops, shutdown.clone()));
    let retained = Rc::new(RetainedCopy::default());
    let out = Outbound {
        client: client.clone(),
        prefix: prefix.clone(),
        node,
        seq: 0,
        metrics: metrics.clone(),
        retained: retained.clone(),
    };
    tokio::task::spawn_local(outbound(out, tap, announce_rx, state_rx, shutdown.clone()));
    let mut interest = Interest {
        client: client.clone(),
        prefix: prefix.clone(),
        subjects: HashMap::new(),
        inbound: inbound_tx,
        metrics: metrics.clone(),
    };
    // Every node stores every retained message, and hears every take-over.
    interest.hold(format!("{prefix}.r.>")).await;
    interest.hold(format!("{prefix}.c.connect")).await;
    // Retained messages asked for by a node that starts or reconnects, and
    // the answers to this node's own asking.
    interest.hold(format!("{prefix}.s.req")).await;
    interest.hold(format!("{prefix}.s.all")).await;
    interest.hold(sync_subject(&prefix, node)).await;
    tokio::task::spawn_local(interest.run(filters, shutdown.clone()));
    let inbound = Inbound {
        broker,
        client,
        node,
        retained,
        prefix,
        max_packet,
        seen: Seen::default(),
        metrics,
        next_pkid: 0,
    };
    tokio::task::spawn_local(inbound.run(inbound_rx, shutdown));
    Ok(())
}

/// Copies the router's count of copies it could not hand over (the
/// bridge's buffer was full) into the metric, once a second.
async fn copy_drops(
    router: Arc<std::sync::atomic::AtomicU64>,
    metric: crate::metrics::Count,
    shutdown: Rc<Shutdown>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            _ = ticks.tick() => {}
        }
        let total = router.load(Ordering::Relaxed);
        metric.inc_by(total.saturating_sub(metric.get()));
    }
}

/// Sends the retained messages `retained` holds to `subject`, by a task of
/// their own (there may be many).
fn send_retained(client: &async_nats::Client, subject: String, own: u64, retained: &RetainedCopy) {
    let messages = retained.snapshot();
    if messages.is_empty() {
        return;
    }
    debug!(count = messages.len(), %subject, "cluster: sending the retained messages");
    let client = client.clone();
    tokio::task::spawn_local(async move {
        for (publish, properties) in messages {
            let payload = envelope::seal(own, 0, publish, properties);
            if client.publish(subject.clone(), payload).await.is_err() {
                return;
            }
        }
    });
}

/// Where node `node` receives the retained messages it asked for.
fn sync_subject(prefix: &str, node: u64) -> String {
    format!("{prefix}.s.{node:016x}")
}

struct Outbound {
    client: async_nats::Client,
    prefix: Rc<str>,
    node: u64,
    seq: u64,
    metrics: Arc<ClusterMetrics>,
    retained: Rc<RetainedCopy>,
}

impl Outbound {
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn forward(&mut self, message: TapMessage) {
        let TapMessage { publish, properties } = message;
        // The server's own topics (`$SYS`) stay on their node.
        if publish.topic.first() == Some(&b'$') {
            return;
        }
        self.retained.note(&publish, &properties);
        if !self.connected() {
            self.metrics.drop_one("nats_down");
            return;
        }
        let kind = if publish.retain { Kind::Retained } else { Kind::Message };
        let subject = subject::subject(&self.prefix, kind, &publish.topic);
        if subject.len() > MAX_SUBJECT {
            self.metrics.drop_one("too_long");
            return;
        }
        self.seq += 1;
        let payload = envelope::seal(self.node, self.seq, publish, properties);
        let size = payload.len() as u64;
        match self.client.publish(subject, payload).await {
            Ok(()) => {
                self.metrics.messages.get_or_create(&DirectionLabel { direction: "out" }).inc();
                self.metrics.bytes.get_or_create(&DirectionLabel { direction: "out" }).inc_by(size);
            }
            Err(e) => {
                let reason = match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => "too_long",
                    _ => "nats_down",
                };
                debug!(error = %e, "cluster: publish to NATS failed");
                self.metrics.drop_one(reason);
            }
        }
    }

    /// Connected (again): asks the other nodes for their retained
    /// messages, to fill what this node missed, and offers its own, to
    /// fill what they missed of this node's (retained publishes made here
    /// while NATS was unreachable).
    async fn exchange_retained(&mut self) {
        let subject = format!("{}.s.req", self.prefix);
        if let Err(e) = self.client.publish(subject, envelope::announce(self.node, "")).await {
            debug!(error = %e, "cluster: asking for retained messages failed");
        }
        send_retained(&self.client, format!("{}.s.all", self.prefix), self.node, &self.retained);
    }

    async fn announce(&mut self, client_id: String) {
        if !self.connected() {
            return;
        }
        let subject = format!("{}.c.connect", self.prefix);
        if let Err(e) = self.client.publish(subject, envelope::announce(self.node, &client_id)).await {
            debug!(error = %e, "cluster: take-over announcement failed");
        }
    }
}

/// Sends the router's copies and the take-over announcements to NATS.
async fn outbound(
    mut out: Outbound,
    tap: flume::Receiver<TapMessage>,
    mut announcements: mpsc::Receiver<String>,
    mut state: watch::Receiver<bool>,
    shutdown: Rc<Shutdown>,
) {
    loop {
        tokio::select! {
            biased;
            () = shutdown.wait() => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                if *state.borrow_and_update() {
                    out.exchange_retained().await;
                }
            }
            Some(client_id) = announcements.recv() => out.announce(client_id).await,
            message = tap.recv_async() => match message {
                Ok(message) => out.forward(message).await,
                Err(_) => break,
            },
        }
    }
    // What was sent reaches the NATS server before the process exits.
    let _ = tokio::time::timeout(Duration::from_secs(1), out.client.flush()).await;
}

/// NATS subscriptions, one per subject, counted by the local filters that
/// need it.
struct Interest {
    client: async_nats::Client,
    prefix: Rc<str>,
    subjects: HashMap<String, (u32, AbortHandle)>,
    inbound: mpsc::Sender<async_nats::Message>,
    metrics: Arc<ClusterMetrics>,
}

impl Interest {
    async fn hold(&mut self, subject: String) {
        if let Some((count, _)) = self.subjects.get_mut(&subject) {
            *count += 1;
            return;
        }
        let mut subscriber = match self.client.subscribe(subject.clone()).await {
            Ok(subscriber) => subscriber,
            Err(e) => {
                warn!(error = %e, %subject, "cluster: NATS subscription failed");
                return;
            }
        };
        let inbound = self.inbound.clone();
        let task = tokio::task::spawn_local(async move {
            while let Some(message) = subscriber.next().await {
                if inbound.send(message).await.is_err() {
                    break;
                }
            }
            // Dropping the subscriber unsubscribes.
        });
        self.subjects.insert(subject, (1, task.abort_handle()));
        self.metrics.subscriptions.set(self.subjects.len() as i64);
    }

    fn release(&mut self, subject: &str) {
        let Some((count, task)) = self.subjects.get_mut(subject) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            task.abort();
            self.subjects.remove(subject);
            self.metrics.subscriptions.set(self.subjects.len() as i64);
        }
    }

    async fn run(mut self, filters: flume::Receiver<FilterEvent>, shutdown: Rc<Shutdown>) {
        loop {
            let event = tokio::select! {
                biased;
                () = shutdown.wait() => return,
                event = filters.recv_async() => match event {
                    Ok(event) => event,
                    Err(_) => return,
                },
            };
            match event {
                FilterEvent::Held(filter) => {
                    for subject in subject::filter_subjects(&self.prefix, &filter) {
                        self.hold(subject).await;
                    }
                }
                FilterEvent::Freed(filter) => {
                    for subject in subject::filter_subjects(&self.prefix, &filter) {
                        self.release(&subject);
                    }
                }
            }
        }
    }
}

/// Hands what comes from NATS to the local router.
struct Inbound {
    broker: Rc<Broker>,
    client: async_nats::Client,
    node: u64,
    retained: Rc<RetainedCopy>,
    prefix: Rc<str>,
    max_packet: usize,
    seen: Seen,
    metrics: Arc<ClusterMetrics>,
    next_pkid: u16,
}

impl Inbound {
    async fn run(mut self, mut messages: mpsc::Receiver<async_nats::Message>, shutdown: Rc<Shutdown>) {
        let takeovers = format!("{}.c.connect", self.prefix);
        let retained = format!("{}.r.", self.prefix);
        let sync_request = format!("{}.s.req", self.prefix);
        let sync_answer = sync_subject(&self.prefix, self.node);
        let sync_offer = format!("{}.s.all", self.prefix);
        'link: loop {
            let link = tokio::select! {
                biased;
                () = shutdown.wait() => return,
                link = self.broker.link(BRIDGE_CLIENT_ID, true, SessionExpiry::AT_DISCONNECT, ClientLimits::default()) => link,
            };
            let mut link = match link {
                Ok(link) => link,
                Err(broker::LinkFailure::RouterGone) => return,
                Err(e) => {
                    warn!(error = %e, "cluster: could not register the bridge's router link; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'link;
                }
            };
            loop {
                // The router has not taken what waits yet: wait for it
                // (it wakes the link when it takes a long queue) before
                // taking more from NATS.
                let full = link.tx.buffer().len() >= LINK_QUEUE;
                tokio::select! {
                    biased;
                    () = shutdown.wait() => return,
                    next = link.rx.next() => match next {
                        Ok(Some(Notification::Unschedule)) => {
                            let _ = link.rx.wake().await;
                        }
                        Ok(Some(notification)) => {
                            if let Some(Packet::PubRec(pubrec, _)) = Option::<Packet>::from(notification) {
                                let pubrel = PubRel { pkid: pubrec.pkid, reason: PubRelReason::Success };
                                let _ = broker::hand_over(&mut link.tx, Packet::PubRel(pubrel, None));
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!(error = %e, "cluster: the router dropped the bridge's link; registering it again");
                            continue 'link;
                        }
                    },
                    _ = tokio::time::sleep(Duration::from_millis(10)), if full => {}
                    message = messages.recv(), if !full => {
                        let Some(message) = message else { return };
                        let mut batch = 0;
                        let mut next = Some(message);
                        while let Some(message) = next.take() {
                            let subject = message.subject.as_str();
                            if subject == takeovers {
                                self.take_over(&message.payload).await;
                            } else if subject == sync_request {
                                self.answer_retained(&message.payload);
                            } else if subject == sync_answer || subject == sync_offer {
                                batch += usize::from(self.inject(&message, Source::Sync, &mut link.tx));
                            } else {
                                let source = if subject.starts_with(&retained) { Source::Retained } else { Source::Live };
                                batch += usize::from(self.inject(&message, source, &mut link.tx));
                            }
                            if batch < 64 {
                                next = messages.try_recv().ok();
                            }
                        }
                        if batch > 0 && link.tx.notify().await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Another node asked for the retained messages: this node's go to it.
    fn answer_retained(&self, payload: &[u8]) {
        let Ok((node, _)) = envelope::announced(payload) else {
            self.metrics.drop_one("malformed");
            return;
        };
        if node != self.node {
            send_retained(&self.client, sync_subject(&self.prefix, node), self.node, &self.retained);
        }
    }

    /// Queues one message from NATS on the link; whether it was.
    fn inject(
        &mut self,
        message: &async_nats::Message,
        source: Source,
        tx: &mut rumqttd::local::LinkTx,
    ) -> bool {
        let arrived = match envelope::open(&message.payload, self.max_packet) {
            Ok(arrived) => arrived,
            Err(e) => {
                debug!(error = %e, subject = %message.subject, "cluster: a NATS message that is not a publish");
                self.metrics.drop_one("malformed");
                return false;
            }
        };
        // Retained messages come on one subscription; live ones may come
        // on several that overlap.
        if source == Source::Live && !self.seen.first(arrived.node, arrived.seq) {
            self.metrics.drop_one("duplicate");
            return false;
        }
        let publish = arrived.publish;
        // The subject is the topic's, and the topic one the router takes
        // (it would drop the link for one that is not UTF-8).
        let topic_ok = match source {
            Source::Live => subject::topic_of(&self.prefix, Kind::Message, message.subject.as_str()),
            Source::Retained => subject::topic_of(&self.prefix, Kind::Retained, message.subject.as_str()),
            Source::Sync => Ok(publish.topic.to_vec()),
        }
        .is_ok_and(|topic| topic == publish.topic[..]);
        if !topic_ok
            || (source == Source::Sync && !publish.retain)
            || crate::mqtt::topics::check_topic(&publish.topic, false).is_err()
        {
            self.metrics.drop_one("malformed");
            return false;
        }
        // Asked-for retained messages fill what this node missed; what it
        // holds is as new or newer.
        if source == Source::Sync && self.retained.has(&publish.topic) {
            return false;
        }
        self.retained.note(&publish, &arrived.properties);
        self.metrics.messages.get_or_create(&DirectionLabel { direction: "in" }).inc();
        self.metrics
            .bytes
            .get_or_create(&DirectionLabel { direction: "in" })
            .inc_by(message.payload.len() as u64);
        let pkid = if arrived.qos == 0 {
            0
        } else {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1).max(1);
            self.next_pkid
        };
        let publish = broker::publish(&publish.topic, &publish.payload, arrived.qos, publish.retain, pkid);
        tx.buffer().push_back(Packet::Publish(publish, arrived.properties));
        true
    }

    /// Another worker or node announced a client id: a session with that
    /// id here is taken over, through the router as a second connection
    /// would (a link with that id, at once disconnected).
    async fn take_over(&mut self, payload: &[u8]) {
        let Ok((_node, client_id)) = envelope::announced(payload) else {
            self.metrics.drop_one("malformed");
            return;
        };
        if !self.broker.presence().is_connected(&client_id) {
            return;
        }
        debug!(%client_id, "cluster: the client connected elsewhere; taking its session here over");
        self.metrics.remote_takeovers.inc();
        let broker = self.broker.clone();
        tokio::task::spawn_local(async move {
            if let Ok(mut link) =
                broker.link(&client_id, true, SessionExpiry::AT_DISCONNECT, ClientLimits::default()).await
            {
                let bye = rumqttd::protocol::Disconnect {
                    reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
                };
                let _ = broker::hand_over(&mut link.tx, Packet::Disconnect(bye, None));
            }
        });
    }
}

/// Where a message from NATS came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A live publish, through a subscription of the local filters.
    Live,
    /// A retained publish (or deletion), which every node gets.
    Retained,
    /// A retained message this node asked for after (re)connecting, or one
    /// another node offered after its own.
    Sync,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reconnect_delay_doubles_up_to_two_seconds() {
        let delays: Vec<u64> = (1..=8).map(|n| reconnect_delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(reconnect_delay(0), Duration::from_millis(50));
        assert_eq!(reconnect_delay(usize::MAX), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn the_retained_copy_follows_retained_publishes_and_deletions() {
        let copy = RetainedCopy::default();
        let publish = |topic: &'static [u8], payload: &'static [u8], retain: bool| {
            broker::publish(topic, payload, 1, retain, 1)
        };
        let expiring = Some(PublishProperties { message_expiry_interval: Some(3600), ..Default::default() });
        copy.note(&publish(b"a", b"1", true), &None);
        copy.note(&publish(b"b", b"2", true), &expiring);
        copy.note(&publish(b"c", b"live", false), &None);
        assert!(copy.has(b"a") && copy.has(b"b") && !copy.has(b"c"), "only retained publishes");
        copy.note(&publish(b"a", b"1 again", true), &None);
        copy.note(&publish(b"b", b"", true), &None);
        assert!(!copy.has(b"b"), "an empty retained publish deletes");
        copy.note(&publish(b"b", b"2 again", true), &expiring);
        let mut snapshot = copy.snapshot();
        snapshot.sort_by(|x, y| x.0.topic.cmp(&y.0.topic));
        let seen: Vec<(&[u8], &[u8], Option<u32>)> = snapshot
            .iter()
            .map(|(p, props)| {
                (&p.topic[..], &p.payload[..], props.as_ref().and_then(|p| p.message_expiry_interval))
            })
            .collect();
        // The interval left: an hour, less the moment this test took.
        assert!(matches!(seen[1].2, Some(3599..=3600)), "{seen:?}");
        assert_eq!(seen, [(&b"a"[..], &b"1 again"[..], None), (&b"b"[..], &b"2 again"[..], seen[1].2)]);
    }

    #[test]
    fn presence_counts_connections_by_id() {
        let presence = Presence::default();
        presence.connected("a");
        presence.connected("a");
        assert!(presence.is_connected("a") && !presence.is_connected("b"));
        presence.left("a");
        assert!(presence.is_connected("a"));
        presence.left("a");
        presence.left("b");
        assert!(!presence.is_connected("a"));
    }
}
