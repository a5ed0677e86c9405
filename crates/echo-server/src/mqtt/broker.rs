//! rumqttd's router, started in our process, and how sessions attach to it.
//!
//! # Where the router runs (`mqtt.router`)
//!
//! The router is rumqttd's routing core: topic matching, per-topic commit
//! logs, retained messages, QoS state. Sessions talk to it through
//! `rumqttd::local` links: `LinkTx` pushes decoded packets into a shared
//! queue and sends the router one event; `LinkRx` wakes when the router has
//! notifications.
//!
//! - `"thread"` (the default): rumqttd's own `Router::spawn()` runs the
//!   router on a thread of its own, `router-0`; every message crosses to it
//!   and back (a wake-up of the other thread each way).
//! - `"event-loop"`: the router is a task on the event loop, beside the
//!   sessions (`Router::into_task`, our rumqttd patch). It awaits its
//!   events (flume's async receive) and works in small turns (`TurnBudget`:
//!   connections served, then events taken), yielding after each, so that
//!   no turn holds the WebSocket and MQTT sessions up for longer than a
//!   bounded amount of routing. The process has one thread, and a message
//!   goes from session to router and back without crossing threads. It
//!   costs less CPU per message, but its latency tail was longer at light
//!   load and under CPU contention, hence not the default (docs/mqtt.md).
//!
//! Either way, nothing on the event loop blocks on the router:
//!
//! - Registering a client (`LinkBuilder`) means sending the router a
//!   connect event and waiting until it has answered. rumqttd 0.20's
//!   `build()` waits by blocking the calling thread, which on the event
//!   loop would stall every WebSocket and MQTT client once per connecting
//!   client (measured: WebSocket p99 61-75 ms during a 5,000-client MQTT
//!   connect storm), and with the router on the loop would never return.
//!   Our patched rumqttd adds `build_async()`, which awaits the answer, so
//!   registration is just another task on the event loop.
//! - rumqttd's `LinkTx::send` blocks while the router's event channel is
//!   full; sessions and this module hand packets over with [`hand_over`]
//!   instead, or await room (`inflow`).
//!
//! # What the router is not trusted with
//!
//! - **Refusals.** When the router is full, or dislikes a client id, it
//!   drops the client without a word (no CONNACK). Sessions check capacity
//!   and client ids themselves first and send the proper CONNACK.
//! - **Last wills.** A will must go out when a connection dies, but the
//!   events that fire it in rumqttd are private to its own server. Sessions
//!   keep their will and publish it through an internal link of this module
//!   ([`Broker::publish_will`]), after the will delay of MQTT 5. The
//!   server's own `$SYS` statistics go through the same link
//!   ([`Broker::publish_own`], from `sys`).
//! - **What it refuses.** The router drops a link, without a word, when it
//!   refuses something the link sent: a publish it cannot append (a topic
//!   that is not UTF-8, a bad topic alias), an acknowledgement it did not
//!   expect. Sessions check what they forward (`topics::check_topic`), and
//!   so does [`Broker::publish_will`] for the wills link, which every
//!   client's will goes through. Should the router drop the wills link all
//!   the same, [`watch_router`] registers it again: one client's bad will
//!   must cost nothing but that will (it once shut the whole server down).
//! - **Its own death.** If the router ever stops (a panic on its thread,
//!   or in its task on the event loop, which tokio catches: the loop runs
//!   on, the router is dropped), every link's receiver fails. A second
//!   internal link, the sentinel, sends nothing ever, so the router has no
//!   reason to drop it but its own end: when the sentinel fails (or the
//!   router's task ends), [`watch_router`] shuts the server down with a
//!   clear error and exit status 70, instead of running on as a broker that
//!   silently drops everything.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::FutureExt;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, LastWill, LastWillProperties, Packet, PubRel, PubRelReason, Publish,
    PublishProperties,
};
use rumqttd::{Notification, QueueCaps, Router, RouterConfig, RouterError, TurnBudget};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, error, info, warn};

use super::topics;
use crate::config::{MqttConfig, RouterPlacement};
use crate::episode::Episodes;
use crate::metrics::{MqttMetrics, ReasonLabel};
use crate::shutdown::Shutdown;

/// The client id of the server's own link, used to publish wills and the
/// `$SYS` statistics (`sys`). It starts
/// with a NUL character, which MQTT forbids in client ids (sessions refuse
/// such ids), so no client can take it over.
pub const INTERNAL_CLIENT_ID: &str = "\u{0}echo-server-wills";

/// The client id of the link that only watches the router (see
/// [`RouterWatch`]); NUL-prefixed for the same reason.
pub const SENTINEL_CLIENT_ID: &str = "\u{0}echo-server-sentinel";

/// Wills kept while the wills link is registered again (see
/// [`watch_router`]); beyond that the oldest are dropped.
const MAX_PENDING_WILLS: usize = 1024;

/// When the wills link fails, how long the sentinel has to fail too for it
/// to be the router's death. Both fail together then (the router frees all
/// its links in one go, the sentinel's first); this only keeps the log
/// from blaming a will for a death.
const DEATH_GRACE: Duration = Duration::from_millis(100);

/// Between attempts to register the wills link again.
const RELINK_RETRY: Duration = Duration::from_millis(500);

/// Connections the router can hold beyond `mqtt.max_connections`: the
/// internal links, and sessions that have ended on our side whose disconnect
/// the router has not processed yet.
const ROUTER_SLACK: usize = 1024;

/// How long the router keeps a client's session after its connection
/// ends, as MQTT 5's session expiry interval has it (seconds; `0xFFFF_FFFF`
/// is never). MQTT 3.1.1 knows two values: a clean session ends with its
/// connection, any other lasts for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionExpiry(pub u32);

impl SessionExpiry {
    pub const AT_DISCONNECT: SessionExpiry = SessionExpiry(0);
    pub const NEVER: SessionExpiry = SessionExpiry(u32::MAX);

    /// The session outlives its connection.
    pub fn persistent(self) -> bool {
        self != Self::AT_DISCONNECT
    }

    /// As rumqttd takes it (`None`: never).
    pub fn duration(self) -> Option<Duration> {
        (self != Self::NEVER).then(|| Duration::from_secs(u64::from(self.0)))
    }
}

/// What an MQTT 5 client announced in its CONNECT about what it can take
/// (§3.1.2.11.3-4); the router keeps to it when it sends to the client
/// (see vendor/rumqttd/PATCHED.md). `None`: not announced, no limit but
/// the router's own (100 unacknowledged publishes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientLimits {
    /// Receive Maximum: QoS 1 and 2 publishes unacknowledged at most.
    pub receive_maximum: Option<u16>,
    /// Maximum Packet Size: larger publishes are not sent to the client.
    pub max_packet_size: Option<u32>,
}

/// A link to the router for one session.
pub struct Link {
    pub tx: LinkTx,
    pub rx: LinkRx,
    /// The router's CONNACK for this client (session present or not).
    pub connack: Notification,
}

/// Why a link could not be built. (rumqttd's `LinkError` is over 800
/// bytes, as it carries the event that could not be sent; only its message
/// is kept.)
#[derive(Debug, thiserror::Error)]
pub enum LinkFailure {
    #[error("the router refused the client: {0}")]
    Refused(String),
    #[error("the router is not running")]
    RouterGone,
}

impl From<LinkError> for LinkFailure {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Send(_) | LinkError::TrySend(_) => LinkFailure::RouterGone,
            other => LinkFailure::Refused(other.to_string()),
        }
    }
}

/// Registers a client with the router: `(client id, clean start, session
/// expiry, limits)` to the router's answer. (A closure, because the router's sender names a
/// private rumqttd type.)
type LinkFn = dyn Fn(
    String,
    bool,
    SessionExpiry,
    ClientLimits,
) -> Pin<Box<dyn Future<Output = Result<Link, LinkFailure>>>>;

/// The router and the server's handle on it. Lives on the event loop.
pub struct Broker {
    build_link: Box<LinkFn>,
    /// The internal link wills are published through; `None` while it is
    /// registered again after the router dropped it.
    wills: RefCell<Option<LinkTx>>,
    /// Wills handed over while `wills` is `None`, sent once it is back.
    pending_wills: RefCell<VecDeque<Packet>>,
    next_will_pkid: Cell<u16>,
    /// Wills waiting for their delay to pass, by client id; a client that
    /// comes back in time cancels its own.
    delayed_wills: RefCell<HashMap<String, (AbortHandle, Rc<Notify>)>>,
    /// Set once [`watch_router`] has seen the router stop. A registration
    /// that raced with the router's death may never be answered: its
    /// request can sit in the router's queue, which outlives the router
    /// while we hold senders to it, so no one drops the request's reply
    /// channel. Registrations wait on this as well as on the answer.
    router_gone: watch::Sender<bool>,
    metrics: std::sync::Arc<MqttMetrics>,
    /// The router's count of slow subscribers' skips (our rumqttd patch),
    /// read by [`report_client_events`].
    cursor_jumps: std::sync::Arc<AtomicU64>,
    /// The router's count of publishes too large for their subscriber
    /// (our rumqttd patch), read by [`report_client_events`].
    oversize_drops: std::sync::Arc<AtomicU64>,
    /// The router's count of messages sessions lost to their queue caps
    /// (`mqtt.max_queued_messages`, `max_queued_bytes`; our rumqttd
    /// patch), read by [`report_client_events`].
    queue_drops: std::sync::Arc<AtomicU64>,
    /// The router's count of retained messages (our rumqttd patch), read by
    /// [`report_client_events`] and `sys`.
    retained_messages: std::sync::Arc<AtomicU64>,
    log_messages: std::sync::Arc<AtomicU64>,
    /// The router's count of subscriptions and of sessions kept for
    /// clients not connected (our rumqttd patch), read by `sys`.
    subscriptions: std::sync::Arc<AtomicU64>,
    kept_sessions: std::sync::Arc<AtomicU64>,
    /// Asks the router for persistence snapshots (`persist`).
    snapshots: rumqttd::SnapshotHandle,
    /// The local sessions connected, by client id, for the cluster's
    /// take-overs (`cluster::bridge`); counted only with the cluster on.
    presence: Option<crate::cluster::bridge::Presence>,
}

/// What the router feeds the cluster bridge with (`crate::cluster`): a
/// copy of every publish it appends, the count of copies dropped because
/// the bridge's buffer was full, and the filters local sessions start and
/// stop holding.
pub(crate) struct Feeds {
    pub(crate) tap: flume::Receiver<rumqttd::TapMessage>,
    pub(crate) tap_drops: std::sync::Arc<AtomicU64>,
    pub(crate) filters: flume::Receiver<rumqttd::FilterEvent>,
}

impl std::fmt::Debug for Feeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feeds").finish_non_exhaustive()
    }
}

/// What the router counts, for the `$SYS` topics (`sys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RouterCounts {
    pub(crate) retained_messages: u64,
    pub(crate) subscriptions: u64,
    pub(crate) kept_sessions: u64,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// The router settings that follow from our configuration.
pub fn router_config(config: &MqttConfig, max_connections: u64) -> RouterConfig {
    RouterConfig {
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX / 2) + ROUTER_SLACK,
        max_outgoing_packet_count: u64::from(config.max_outgoing_packet_count),
        max_segment_size: config.segment_size as usize,
        max_segment_count: config.segment_count as usize,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// The router's caps on what one session may leave unread in the topic
/// logs (0 in the configuration: none).
fn queue_caps(config: &MqttConfig) -> QueueCaps {
    let none_if_zero = |cap: u64| if cap == 0 { u64::MAX } else { cap };
    QueueCaps {
        messages: none_if_zero(u64::from(config.max_queued_messages)),
        bytes: none_if_zero(config.max_queued_bytes),
    }
}

impl Broker {
    /// Starts the router, where `config.router` says (a task on this event
    /// loop, or a thread of its own), and attaches the server's two
    /// internal links, the sentinel and the wills link. Must run on the
    /// event loop (a `LocalSet` or `LocalRuntime`). Returns the broker and
    /// the internal links' receivers, to be watched with [`watch_router`].
    ///
    /// `restored`, the router's part of a persistence snapshot
    /// (`persist::load`), is brought back before the router runs, so
    /// before any client can connect.
    pub async fn start(
        config: &MqttConfig,
        max_connections: u64,
        metrics: std::sync::Arc<MqttMetrics>,
        restored: Option<rumqttd::snapshot::RouterSnapshot>,
    ) -> std::io::Result<(Rc<Broker>, RouterWatch)> {
        Self::start_with(config, max_connections, metrics, restored, None)
            .await
            .map(|(broker, watch, _)| (broker, watch))
    }

    /// [`Broker::start`], with the feeds of a cluster bridge when
    /// `bridge_buffer` is given (the room for publishes on their way to
    /// it, `cluster.buffer`).
    pub(crate) async fn start_with(
        config: &MqttConfig,
        max_connections: u64,
        metrics: std::sync::Arc<MqttMetrics>,
        restored: Option<rumqttd::snapshot::RouterSnapshot>,
        bridge_buffer: Option<usize>,
    ) -> std::io::Result<(Rc<Broker>, RouterWatch, Option<Feeds>)> {
        let mut router = Router::new(0, router_config(config, max_connections));
        if let Some(snapshot) = restored {
            let age_s = rumqttd::snapshot::unix_ms().saturating_sub(snapshot.taken_at_ms) / 1000;
            let counts = router.restore(snapshot, rumqttd::snapshot::unix_ms());
            info!(
                file = %config.persistence_file,
                sessions = counts.sessions,
                retained_messages = counts.retained,
                queued_messages = counts.queued,
                sessions_expired_while_down = counts.expired_sessions,
                snapshot_age_s = age_s,
                "MQTT persistence: state restored"
            );
        }
        let snapshots = router.snapshot_handle();
        let feeds = bridge_buffer.map(|capacity| {
            let (tap, tap_drops) = router.tap(capacity, crate::cluster::bridge::BRIDGE_CLIENT_ID);
            Feeds { tap, tap_drops, filters: router.filter_events() }
        });
        let queue_drops = router.queue_caps(queue_caps(config));
        let cursor_jumps = router.cursor_jumps();
        let oversize_drops = router.oversize_drops();
        let retained_messages = router.retained_messages();
        let log_messages = router.log_messages();
        let subscriptions = router.subscriptions();
        let kept_sessions = router.kept_sessions();
        // The sender's type names a private rumqttd type; it is only ever
        // captured by this closure.
        let (router_tx, task) = match config.router {
            RouterPlacement::Thread => (router.spawn(), None),
            RouterPlacement::EventLoop => {
                let (router_tx, task) = router.into_task(TurnBudget::default());
                (router_tx, Some(tokio::task::spawn_local(task)))
            }
        };
        // Publishes to topics nobody subscribes to are dropped by the router
        // either way; dynamic filters would create a log for every such topic.
        //
        // The sentinel first: the router frees its links in the order they
        // came, so when it stops, the sentinel fails first.
        let internal = |client_id: &'static str| {
            let router_tx = router_tx.clone();
            async move {
                LinkBuilder::new(client_id, router_tx)
                    .clean_session(true)
                    .dynamic_filters(false)
                    .build_async()
                    .await
                    .map_err(|e| std::io::Error::other(LinkFailure::from(e).to_string()))
            }
        };
        // The sentinel's sender is never used (nothing is ever sent on it).
        let (_, sentinel, _connack) = internal(SENTINEL_CLIENT_ID).await?;
        let (wills_tx, wills_rx, _connack) = internal(INTERNAL_CLIENT_ID).await?;
        let histogram = metrics.link_build_seconds.clone();
        let max_inflight = config.max_inflight_messages;
        let build_link = Box::new(
            move |client_id: String, clean_start: bool, expiry: SessionExpiry, limits: ClientLimits| {
                let router_tx = router_tx.clone();
                let histogram = histogram.clone();
                // The server's window, or the client's if it asked for less.
                let window = limits.receive_maximum.map_or(max_inflight, |asked| asked.min(max_inflight));
                Box::pin(async move {
                    let started = Instant::now();
                    let result = LinkBuilder::new(&client_id, router_tx)
                        .clean_session(clean_start)
                        .session_expiry(expiry.duration())
                        .receive_maximum(Some(window))
                        .max_packet_size(limits.max_packet_size)
                        .dynamic_filters(false)
                        .build_async()
                        .await;
                    histogram.observe(started.elapsed().as_secs_f64());
                    result.map(|(tx, rx, connack)| Link { tx, rx, connack }).map_err(LinkFailure::from)
                }) as Pin<Box<dyn Future<Output = Result<Link, LinkFailure>>>>
            },
        );
        let broker = Rc::new(Broker {
            build_link,
            wills: RefCell::new(Some(wills_tx)),
            pending_wills: RefCell::new(VecDeque::new()),
            next_will_pkid: Cell::new(0),
            delayed_wills: RefCell::new(HashMap::new()),
            router_gone: watch::Sender::new(false),
            metrics,
            cursor_jumps,
            oversize_drops,
            queue_drops,
            retained_messages,
            log_messages,
            subscriptions,
            kept_sessions,
            snapshots,
            presence: feeds.as_ref().map(|_| crate::cluster::bridge::Presence::default()),
        });
        let death = RouterDeath { sentinel, task };
        Ok((broker, RouterWatch { death, wills: wills_rx }, feeds))
    }

    /// Registers a client with the router, without blocking the event loop.
    ///
    /// The registration runs as a task of its own: once the router has been
    /// asked, it will register the client whatever happens to the session,
    /// so if the session is gone by the time the router answers (the client
    /// left, or timed out), the task unregisters it again instead of leaving
    /// a phantom connection in the router.
    pub async fn link(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry: SessionExpiry,
        limits: ClientLimits,
    ) -> Result<Link, LinkFailure> {
        let (reply, answer) = oneshot::channel();
        let registration = (self.build_link)(client_id.to_owned(), clean_start, expiry, limits);
        tokio::task::spawn_local(async move {
            let result = registration.await;
            match reply.send(result) {
                Ok(()) => {}
                Err(Ok(mut link)) => {
                    let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
                    let _ = hand_over(&mut link.tx, Packet::Disconnect(bye, None));
                }
                Err(Err(e)) => debug!(error = %e, "link failed for a client that is gone"),
            }
        });
        let mut gone = self.router_gone.subscribe();
        tokio::select! {
            answer = answer => answer.unwrap_or(Err(LinkFailure::RouterGone)),
            // `wait_for` looks at the current value first: a router that died
            // before this call is seen at once.
            _ = gone.wait_for(|gone| *gone) => Err(LinkFailure::RouterGone),
        }
    }

    /// A session with this client id is connected (its CONNACK sent):
    /// with the cluster on, a session with the same id on another worker
    /// or node is taken over.
    pub fn client_connected(&self, client_id: &str) {
        if let Some(presence) = &self.presence {
            presence.connected(client_id);
        }
    }

    /// That session ended.
    pub fn client_left(&self, client_id: &str) {
        if let Some(presence) = &self.presence {
            presence.left(client_id);
        }
    }

    /// The sessions connected, for the cluster bridge (which exists only
    /// when the broker was started with its feeds).
    pub(crate) fn presence(&self) -> &crate::cluster::bridge::Presence {
        self.presence.as_ref().expect("the broker was started for a cluster bridge")
    }

    /// A client with this id connected: a will still waiting for its delay
    /// is cancelled when the client resumes its session (MQTT 5 §3.1.2.5),
    /// or published at once when it starts a clean one (the old session has
    /// ended, and with it the delay).
    pub fn client_returned(&self, client_id: &str, clean_start: bool) {
        let Some((task, fire)) = self.delayed_wills.borrow_mut().remove(client_id) else {
            return;
        };
        if clean_start {
            fire.notify_one();
        } else {
            task.abort();
        }
    }

    /// Publishes a will now, or after `delay` (MQTT 5's will delay interval,
    /// already capped by the session expiry).
    pub fn publish_will(
        self: &Rc<Self>,
        client_id: &str,
        will: LastWill,
        properties: Option<LastWillProperties>,
        delay: Duration,
    ) {
        if delay.is_zero() {
            self.send_will(will, properties);
            return;
        }
        let broker = self.clone();
        let id = client_id.to_owned();
        let fire = Rc::new(Notify::new());
        let fired = fire.clone();
        let task = tokio::task::spawn_local(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {
                    broker.delayed_wills.borrow_mut().remove(&id);
                }
                _ = fired.notified() => {}
            }
            broker.send_will(will, properties);
        });
        let previous =
            self.delayed_wills.borrow_mut().insert(client_id.to_owned(), (task.abort_handle(), fire));
        if let Some((previous, _)) = previous {
            previous.abort();
        }
    }

    fn send_will(&self, will: LastWill, properties: Option<LastWillProperties>) {
        // Sessions refuse such wills with the CONNECT; this is the last line
        // before the router, which would drop the wills link for one.
        if let Err(refusal) = topics::check_topic(&will.topic, false) {
            warn!(?refusal, "a will with a topic the router refuses was not published");
            return;
        }
        let qos = will.qos as u8;
        let pkid = if qos == 0 {
            0
        } else {
            let next = self.next_will_pkid.get().checked_add(1).unwrap_or(1).max(1);
            self.next_will_pkid.set(next);
            next
        };
        let publish = will_publish(&will, pkid);
        let properties = properties.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        });
        self.metrics.wills_published.inc();
        let packet = Packet::Publish(publish, properties);
        let mut link = self.wills.borrow_mut();
        let Some(tx) = link.as_mut() else {
            let mut pending = self.pending_wills.borrow_mut();
            if pending.len() >= MAX_PENDING_WILLS {
                pending.pop_front();
                warn!("too many wills waiting for the wills link; the oldest was dropped");
            }
            pending.push_back(packet);
            return;
        };
        if let Err(e) = hand_over(tx, packet) {
            warn!(error = %e, "could not hand a will message to the router");
        }
    }

    /// A handle to ask the router for persistence snapshots.
    pub(crate) fn snapshot_handle(&self) -> rumqttd::SnapshotHandle {
        self.snapshots.clone()
    }

    /// The router's counts now.
    pub(crate) fn router_counts(&self) -> RouterCounts {
        RouterCounts {
            retained_messages: self.retained_messages.load(Ordering::Relaxed),
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            kept_sessions: self.kept_sessions.load(Ordering::Relaxed),
        }
    }

    /// Publishes the server's own messages (`$SYS` topics, see `sys`), each
    /// retained at QoS 0, through the wills link, with one router event for
    /// them all. `false` when they could not be handed over (the link is
    /// being registered again, or the router is gone): the caller tries
    /// again later. Only for topics that pass `topics::check_topic`.
    pub(crate) fn publish_own(&self, messages: impl IntoIterator<Item = (&'static str, String)>) -> bool {
        let mut link = self.wills.borrow_mut();
        let Some(tx) = link.as_mut() else {
            return false;
        };
        let mut packets: Vec<Packet> = messages
            .into_iter()
            .map(|(topic, payload)| {
                Packet::Publish(publish(topic.as_bytes(), payload.as_bytes(), 0, true, 0), None)
            })
            .collect();
        let Some(last) = packets.pop() else {
            return true;
        };
        tx.buffer().extend(packets);
        hand_over(tx, last).is_ok()
    }

    /// The router asked the wills link to release a QoS 2 will. Only ever
    /// for the link now registered: a PUBREL the router did not ask for
    /// would make it drop the link.
    fn release(&self, pkid: u16) {
        let pubrel = PubRel { pkid, reason: PubRelReason::Success };
        if let Some(tx) = self.wills.borrow_mut().as_mut() {
            let _ = hand_over(tx, Packet::PubRel(pubrel, None));
        }
    }

    /// The router dropped the wills link: wills wait until it is back.
    fn wills_link_lost(&self) {
        self.wills.borrow_mut().take();
    }

    /// The wills link is registered again: what waited goes out, with one
    /// router event.
    fn wills_link_back(&self, mut tx: LinkTx) {
        let mut pending = std::mem::take(&mut *self.pending_wills.borrow_mut());
        if let Some(last) = pending.pop_back() {
            tx.buffer().extend(pending);
            if let Err(e) = hand_over(&mut tx, last) {
                warn!(error = %e, "could not hand the waiting wills to the router");
            }
        }
        *self.wills.borrow_mut() = Some(tx);
    }
}

/// Hands one packet to the router without ever blocking the thread.
///
/// rumqttd's `LinkTx::send` blocks the calling thread while the router's
/// event channel is full. With the router on a thread of its own that
/// stalls the event loop; with the router a task of the event loop it
/// would wait for ever, the router being unable to run. So the packet is
/// queued on the link and the router's event is sent now if there is room,
/// else by a task of its own, for callers that cannot wait (destructors).
pub(crate) fn hand_over(tx: &mut LinkTx, packet: Packet) -> Result<(), LinkFailure> {
    tx.buffer().push_back(packet);
    match tx.notify().now_or_never() {
        Some(sent) => sent.map_err(LinkFailure::from),
        None => {
            let wake = tx.notify_owned();
            tokio::task::spawn_local(async move {
                let _ = wake.await;
            });
            Ok(())
        }
    }
}

/// A PUBLISH for a will, with its QoS and packet id. rumqttd keeps a
/// publish's QoS and packet id private to the crate; its documented
/// serialization is the public way to build one with both set.
fn will_publish(will: &LastWill, pkid: u16) -> Publish {
    publish(&will.topic, &will.message, will.qos as u8, will.retain, pkid)
}

/// A PUBLISH with its QoS, RETAIN flag and packet id (see [`will_publish`]).
pub(crate) fn publish(topic: &[u8], payload: &[u8], qos: u8, retain: bool, pkid: u16) -> Publish {
    let mut raw = BytesMut::with_capacity(5 + topic.len() + payload.len());
    raw.put_u8(0b0011_0000 | u8::from(retain) | (qos << 1));
    raw.put_u16(pkid);
    raw.put_u16(topic.len() as u16);
    raw.extend_from_slice(topic);
    raw.extend_from_slice(payload);
    Publish::deserialize(raw.freeze())
}

/// The server's internal links to the router, watched by [`watch_router`].
pub struct RouterWatch {
    death: RouterDeath,
    /// The wills link: PUBRECs for QoS 2 wills come back on it.
    wills: LinkRx,
}

/// What tells the router's death.
struct RouterDeath {
    /// Sends nothing, ever. The router drops a link only for what that link
    /// sent, for a new link with its client id (which no client can take:
    /// see [`INTERNAL_CLIENT_ID`]), or when the router stops (its thread
    /// ends, or its task on the event loop does). So this link failing is
    /// the router's death, and only that.
    sentinel: LinkRx,
    /// The router's task, when it runs on the event loop; `None` once it
    /// has ended (or with the router on a thread of its own). A panic in it
    /// ends the task and drops the router, and with it the sentinel's
    /// channel; the handle also says how it ended.
    task: Option<JoinHandle<RouterError>>,
}

impl RouterDeath {
    /// Completes when the router has stopped. Cancel-safe.
    async fn wait(&mut self) {
        let Some(task) = &mut self.task else {
            while self.sentinel.next().await.is_ok() {}
            return;
        };
        tokio::select! {
            biased;
            ended = task => {
                self.task = None;
                match ended {
                    Ok(e) => error!(error = %e, "the MQTT router's task ended"),
                    Err(e) if e.is_panic() => error!("the MQTT router's task panicked (see the panic above)"),
                    Err(e) => error!(error = %e, "the MQTT router's task was cancelled"),
                }
            }
            () = async { while self.sentinel.next().await.is_ok() {} } => {}
        }
    }
}

impl std::fmt::Debug for RouterWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterWatch").finish_non_exhaustive()
    }
}

/// Serves the internal links until the router goes away, then calls
/// `on_death`. QoS 2 wills need a PUBREL to be released; QoS 1 wills are
/// acknowledged and done. If the router drops the wills link while it runs
/// on, the link is registered again (wills wait in the meantime; those
/// already handed to the dropped link behind the one it refused are lost
/// with it, and the warning says so).
pub async fn watch_router(broker: Rc<Broker>, watch: RouterWatch, on_death: impl FnOnce()) {
    let RouterWatch { mut death, mut wills } = watch;
    'serve: loop {
        tokio::select! {
            biased;
            () = death.wait() => break 'serve,
            () = serve_wills(&broker, &mut wills) => {}
        }
        if tokio::time::timeout(DEATH_GRACE, death.wait()).await.is_ok() {
            break 'serve;
        }
        broker.wills_link_lost();
        broker.metrics.wills_link_restarts.inc();
        warn!(
            "the MQTT router dropped the server's wills link (it refused something sent on it; \
             wills handed over just before are lost); the router runs on, registering the link again"
        );
        loop {
            let link = tokio::select! {
                biased;
                () = death.wait() => break 'serve,
                link = broker.link(INTERNAL_CLIENT_ID, true, SessionExpiry::AT_DISCONNECT, ClientLimits::default()) => link,
            };
            match link {
                Ok(link) => {
                    wills = link.rx;
                    broker.wills_link_back(link.tx);
                    info!("the wills link is registered again");
                    continue 'serve;
                }
                Err(e) => {
                    warn!(error = %e, "could not register the wills link again; retrying");
                    tokio::select! {
                        biased;
                        () = death.wait() => break 'serve,
                        () = tokio::time::sleep(RELINK_RETRY) => {}
                    }
                }
            }
        }
    }
    error!(
        "the MQTT router has stopped (see the panic above); \
         the broker cannot route messages any more, shutting down"
    );
    broker.router_gone.send_replace(true);
    on_death();
}

/// Serves the wills link until the router drops it (or stops).
async fn serve_wills(broker: &Broker, rx: &mut LinkRx) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Unschedule)) => {
                let _ = rx.wake().await;
            }
            Ok(Some(Notification::Disconnect(disconnect, _))) => {
                warn!(reason = ?disconnect.reason_code, "the MQTT router is dropping the wills link");
            }
            Ok(Some(notification)) => {
                if let Some(Packet::PubRec(pubrec, _)) = Option::<Packet>::from(notification) {
                    broker.release(pubrec.pkid);
                }
            }
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "the wills link failed");
                return;
            }
        }
    }
}

/// How often [`report_client_events`] reads the counts.
const CLIENT_EVENTS_EVERY: Duration = Duration::from_secs(1);

/// Logs, once per episode (`crate::episode`), the two things clients can
/// make happen at any rate that the router now logs at `debug` only: one
/// line per occurrence was a flood (4 clients sharing one client id took
/// each other over 68,559 times in 20 s, an ERROR line each; a slow
/// subscriber caused ~40,000 WARN lines/s). Every occurrence is counted:
/// take-overs in `echo_mqtt_closed_total{reason="taken_over"}` (by the
/// session that was taken over), skips in
/// `echo_mqtt_slow_subscriber_skips_total` (copied from the router's count
/// here, so at most [`CLIENT_EVENTS_EVERY`] late). The router's count of
/// publishes too large for their subscriber is copied the same way into
/// `echo_mqtt_dropped_total{reason="max_packet_size"}`, and not logged:
/// each drop is what that client asked for. Messages lost to a session's
/// queue cap go to `echo_mqtt_dropped_total{reason="max_queued"}`, logged
/// once per episode like skips. So is its count of retained
/// messages, into `echo_mqtt_retained_messages`, and of messages in its
/// topic logs, into `echo_mqtt_log_messages`. Runs until shutdown.
pub async fn report_client_events(broker: Rc<Broker>, shutdown: Rc<Shutdown>) {
    let metrics = broker.metrics.clone();
    let taken_over = metrics.closed.get_or_create_owned(&ReasonLabel { reason: "taken_over" });
    let oversize = metrics.dropped.get_or_create_owned(&ReasonLabel { reason: "max_packet_size" });
    let mut takeovers = Recurring {
        started: "MQTT sessions are being taken over (a new connection with a client id in use \
                  closes the old one; clients sharing an id take each other over in a loop): \
                  logged once until there has been none for 10 s; \
                  echo_mqtt_closed_total{reason=\"taken_over\"} counts every one",
        ended: "no MQTT session take-over for 10 s",
        ..Recurring::default()
    };
    let mut skips = Recurring {
        started: "MQTT subscribers too slow for their messages are skipping the ones that left \
                  the router's in-memory log (mqtt.segment_size x mqtt.segment_count per topic): \
                  logged once until there has been none for 10 s; \
                  echo_mqtt_slow_subscriber_skips_total counts every skip",
        ended: "no slow MQTT subscriber skipped messages for 10 s",
        ..Recurring::default()
    };
    let queued = metrics.dropped.get_or_create_owned(&ReasonLabel { reason: "max_queued" });
    let mut queue_drops = Recurring {
        started: "MQTT sessions more than mqtt.max_queued_messages or max_queued_bytes behind over \
                  their subscriptions (a client that does not read, or a persistent session \
                  away) are losing their oldest waiting messages: logged once until there has \
                  been none for 10 s; echo_mqtt_dropped_total{reason=\"max_queued\"} counts \
                  every message",
        ended: "no MQTT session lost messages to its queue cap for 10 s",
        ..Recurring::default()
    };
    let mut ticks = tokio::time::interval(CLIENT_EVENTS_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.wait() => return,
            _ = ticks.tick() => {}
        }
        let now = tokio::time::Instant::now();
        takeovers.update(now, taken_over.get());
        let new_skips = skips.update(now, broker.cursor_jumps.load(Ordering::Relaxed));
        metrics.slow_subscriber_skips.inc_by(new_skips);
        let drops = broker.oversize_drops.load(Ordering::Relaxed);
        oversize.inc_by(drops.saturating_sub(oversize.get()));
        queued.inc_by(queue_drops.update(now, broker.queue_drops.load(Ordering::Relaxed)));
        let retained = broker.retained_messages.load(Ordering::Relaxed);
        metrics.retained_messages.set(i64::try_from(retained).unwrap_or(i64::MAX));
        let logged = broker.log_messages.load(Ordering::Relaxed);
        metrics.log_messages.set(i64::try_from(logged).unwrap_or(i64::MAX));
    }
}

/// One condition [`report_client_events`] watches: its episodes, the count
/// it has seen, and what to log.
#[derive(Debug, Default)]
struct Recurring {
    episodes: Episodes,
    seen: u64,
    started: &'static str,
    ended: &'static str,
}

impl Recurring {
    /// Takes the count so far; logs an episode's start or end; returns how
    /// many occurred since the last call.
    fn update(&mut self, now: tokio::time::Instant, total: u64) -> u64 {
        let new = total.saturating_sub(self.seen);
        self.seen = total;
        if new > 0 {
            if self.episodes.hit(now, new) {
                warn!(count = new, "{}", self.started);
            }
        } else if let Some(episode) = self.episodes.end_if_quiet(now) {
            info!(count = episode.hits, lasted_ms = episode.lasted.as_millis() as u64, "{}", self.ended);
        }
        new
    }
}

/// Logs how the router was set up, once at start.
pub fn report(config: &MqttConfig, max_connections: u64) {
    info!(
        max_mqtt_connections = max_connections,
        segment_size = config.segment_size,
        segment_count = config.segment_count,
        max_queued_messages = config.max_queued_messages,
        max_queued_bytes = config.max_queued_bytes,
        max_payload_size = config.max_payload_size,
        authentication = !config.username.is_empty(),
        tls = !config.tls_cert.is_empty(),
        router = match config.router {
            RouterPlacement::EventLoop => "event-loop",
            RouterPlacement::Thread => "thread router-0",
        },
        "MQTT router started"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rumqttd::protocol::{Filter, QoS, RetainForwardRule, Subscribe};

    /// A broker whose router is watched on the current `LocalSet`; the flag
    /// is set when the watcher sees the router die.
    async fn watched_broker(
        config: &crate::config::MqttConfig,
        metrics: &crate::metrics::Metrics,
    ) -> (Rc<Broker>, Rc<Cell<bool>>, tokio::task::JoinHandle<()>) {
        let (broker, watch) = Broker::start(config, 10, metrics.mqtt.clone(), None).await.unwrap();
        let died = Rc::new(Cell::new(false));
        let flag = died.clone();
        let watcher = tokio::task::spawn_local(watch_router(broker.clone(), watch, move || flag.set(true)));
        (broker, died, watcher)
    }

    /// The router's death is noticed. To kill it, this test does what
    /// sessions refuse to do (see `topics::check_filter`): a persistent
    /// session, alone in a share group, disconnects with a QoS 1 message
    /// in flight, and rumqttd 0.20's router panics ("group must exists").
    /// A registration after the death is refused at once (it used to hang
    /// now and then: see [`Broker::router_gone`]).
    #[tokio::test]
    async fn a_dead_router_thread_is_noticed() {
        a_dead_router_is_noticed(RouterPlacement::Thread).await;
    }

    /// The same panic in the router's task on the event loop: the task ends,
    /// the loop and the watcher run on, and the watcher sees the death.
    #[tokio::test]
    async fn a_dead_router_task_is_noticed() {
        a_dead_router_is_noticed(RouterPlacement::EventLoop).await;
    }

    async fn a_dead_router_is_noticed(router: RouterPlacement) {
        let config = crate::config::MqttConfig { router, ..Default::default() };
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new(1024, None));
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let (broker, died, watcher) = watched_broker(&config, &metrics).await;
                let mut member = broker
                    .link("member", false, SessionExpiry::NEVER, ClientLimits::default())
                    .await
                    .unwrap();
                let filter = Filter {
                    path: "$share/g/doomed".into(),
                    qos: QoS::AtLeastOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::Never,
                };
                let subscribe = Subscribe { pkid: 1, filters: vec![filter] };
                member.tx.send(Packet::Subscribe(subscribe, None)).await.unwrap();
                let mut publisher = broker
                    .link("publisher", true, SessionExpiry::AT_DISCONNECT, ClientLimits::default())
                    .await
                    .unwrap();
                let will = LastWill {
                    topic: Bytes::from_static(b"doomed"),
                    message: Bytes::from_static(b"x"),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                };
                publisher.tx.send(Packet::Publish(will_publish(&will, 1), None)).await.unwrap();
                // Wait until the message is in flight to the member.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                loop {
                    let next = tokio::time::timeout_at(deadline, member.rx.next()).await.unwrap().unwrap();
                    if let Some(Notification::Forward(_)) = next {
                        break;
                    }
                }
                let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
                member.tx.send(Packet::Disconnect(bye, None)).await.unwrap();
                tokio::time::timeout(Duration::from_secs(5), watcher).await.expect("noticed").unwrap();
                assert!(died.get());
                let late =
                    broker.link("late", true, SessionExpiry::AT_DISCONNECT, ClientLimits::default()).await;
                assert!(matches!(late, Err(LinkFailure::RouterGone)));
            })
            .await;
    }

    /// Waits for the next publish the router forwards on `link`.
    async fn forwarded(link: &mut Link) -> Publish {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let next = tokio::time::timeout_at(deadline, link.rx.next()).await.expect("a publish").unwrap();
            if let Some(Packet::Publish(publish, _)) = next.and_then(Option::<Packet>::from) {
                return publish;
            }
        }
    }

    fn will(topic: &'static [u8], message: &'static [u8], qos: QoS) -> LastWill {
        LastWill {
            topic: Bytes::from_static(topic),
            message: Bytes::from_static(message),
            qos,
            retain: false,
        }
    }

    /// The router drops the wills link when it refuses a will (a topic that
    /// is not UTF-8: `NonUtf8Topic`, the audit's blocker). That is not the
    /// router's death: the server runs on, the link is registered again,
    /// and wills handed over meanwhile wait for it. (Sessions and
    /// `send_will` refuse such topics, so only a test can send one.)
    #[tokio::test]
    async fn a_wills_link_the_router_drops_is_registered_again() {
        for router in [RouterPlacement::Thread, RouterPlacement::EventLoop] {
            wills_link_dropped_and_registered_again(router).await;
        }
    }

    async fn wills_link_dropped_and_registered_again(router: RouterPlacement) {
        let config = crate::config::MqttConfig { router, ..Default::default() };
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new(1024, None));
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let (broker, died, _watcher) = watched_broker(&config, &metrics).await;
                let mut subscriber = broker
                    .link("watcher", true, SessionExpiry::AT_DISCONNECT, ClientLimits::default())
                    .await
                    .unwrap();
                let filter = Filter {
                    path: "status/#".into(),
                    qos: QoS::ExactlyOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::Never,
                };
                let subscribe = Subscribe { pkid: 1, filters: vec![filter] };
                subscriber.tx.send(Packet::Subscribe(subscribe, None)).await.unwrap();
                // A will at each QoS goes through before.
                for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                    broker.publish_will("a", will(b"status/a", b"before", qos), None, Duration::ZERO);
                    assert_eq!(forwarded(&mut subscriber).await.payload, "before");
                }
                // `send_will` refuses what the router would.
                broker.publish_will("b", will(b"\xc3\x28", b"bad", QoS::AtMostOnce), None, Duration::ZERO);
                assert!(broker.wills.borrow().is_some(), "never sent");
                // Straight onto the link, past the checks: the router drops it.
                let bad = will_publish(&will(b"\xc3\x28", b"bad", QoS::AtMostOnce), 0);
                let sent = broker
                    .wills
                    .borrow_mut()
                    .as_mut()
                    .unwrap()
                    .send(Packet::Publish(bad, None))
                    .now_or_never();
                assert!(matches!(sent, Some(Ok(_))));
                // Noticed, and registered again.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while metrics.mqtt.wills_link_restarts.get() == 0 || broker.wills.borrow().is_none() {
                    assert!(tokio::time::Instant::now() < deadline, "the wills link did not come back");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                    broker.publish_will("d", will(b"status/d", b"after", qos), None, Duration::ZERO);
                    assert_eq!(forwarded(&mut subscriber).await.payload, "after");
                }
                // While the link is down, wills wait for it, then go out.
                let tx = broker.wills.borrow_mut().take().unwrap();
                for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                    broker.publish_will("e", will(b"status/e", b"meanwhile", qos), None, Duration::ZERO);
                }
                assert_eq!(broker.pending_wills.borrow().len(), 3);
                broker.wills_link_back(tx);
                for _ in 0..3 {
                    assert_eq!(forwarded(&mut subscriber).await.payload, "meanwhile");
                }
                assert!(broker.pending_wills.borrow().is_empty());
                assert!(!died.get(), "a dropped wills link is not the router's death");
                assert!(!*broker.router_gone.borrow());
                assert_eq!(metrics.mqtt.wills_link_restarts.get(), 1);
                // QoS 2 wills were released on the new link: nothing waits.
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(broker.wills.borrow().is_some());
                assert_eq!(metrics.mqtt.wills_link_restarts.get(), 1, "the new link was not dropped");
                broker
                    .link("later", true, SessionExpiry::AT_DISCONNECT, ClientLimits::default())
                    .await
                    .expect("the router serves on");
            })
            .await;
    }

    #[test]
    fn will_publish_keeps_qos_packet_id_and_retain() {
        let will = LastWill {
            topic: Bytes::from_static(b"status/c1"),
            message: Bytes::from_static(b"gone"),
            qos: QoS::ExactlyOnce,
            retain: true,
        };
        let publish = will_publish(&will, 513);
        let raw = publish.serialize();
        assert_eq!(raw[0], 0b0011_0101);
        assert_eq!(u16::from_be_bytes([raw[1], raw[2]]), 513);
        assert_eq!(publish.topic, will.topic);
        assert_eq!(publish.payload, will.message);
        assert!(publish.retain);
    }
}
