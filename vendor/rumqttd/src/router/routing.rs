use crate::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill,
    LastWillProperties, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, QoS, RetainForwardRule,
    SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use crate::router::alertlog::alert;
use crate::router::scheduler::{PauseReason, Tracker};
use crate::router::{ConnectionEvents, Forward};
use crate::segments::Position;
use crate::*;
use flume::{bounded, Receiver, RecvError, RecvTimeoutError, Sender, TryRecvError};
use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};
use std::str::Utf8Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;
use thiserror::Error;
use tracing::{debug, error, trace};

use super::alertlog::{Alert, AlertLog};
use super::graveyard::Graveyard;
use super::iobufs::{Incoming, Outgoing};
use super::logs::{publish_size, AckLog, DataLog, Origin, PublishData};
use super::queues::{cap_session, QueueCaps, Readers, Sweeps};
use super::snapshot;
use super::scheduler::{ScheduleReason, Scheduler};
use super::tables::Shrink;
use super::shared_subs::SharedGroup;
use super::{
    packetid, Connection, DataRequest, Event, FilterIdx, Meter, Notification, Print, RouterMeter,
    ShadowRequest, MAX_CHANNEL_CAPACITY, MAX_SCHEDULE_ITERATIONS,
};

#[derive(Error, Debug)]
pub enum RouterError {
    #[error("Receive error = {0}")]
    Recv(#[from] RecvError),
    #[error("Try Receive error = {0}")]
    TryRecv(#[from] TryRecvError),
    #[error("Disconnection")]
    Disconnected,
    #[error("Topic not utf-8")]
    NonUtf8Topic(#[from] Utf8Error),
    #[cfg(feature = "validate-tenant-prefix")]
    #[error("Bad Tenant")]
    BadTenant(String, String),
    #[error("No matching filters to topic {0}")]
    NoMatchingFilters(String),
    #[error("Invalid filter prefix {0}")]
    InvalidFilterPrefix(Filter),
    #[error("Invalid client_id {0}")]
    InvalidClientId(String),
    #[error("Disconnection (Reason: {0:?})")]
    Disconnect(DisconnectReasonCode),
}

// TODO: set this to some appropriate value
const TOPIC_ALIAS_MAX: u16 = 4096;

/// echo-server patch: expired retained messages freed per turn of the
/// router, at most (`DataLog::expire_retained`): a client that retained
/// thousands of messages expiring together costs the others a few more
/// turns, not one long one.
const RETAINED_EXPIRIES_PER_TURN: usize = 64;

/// echo-server patch: how much one turn of the router does when it runs as
/// a task (`Router::into_task`) before it yields to the other tasks of its
/// thread. Smaller turns let those tasks in more often; larger ones batch
/// more events per read of a subscriber's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnBudget {
    /// Events taken from the router's channel per turn, at most.
    pub events: usize,
    /// Connections served (`consume`, each bounded by
    /// `MAX_SCHEDULE_ITERATIONS` requests) per turn.
    pub consumes: usize,
}

impl Default for TurnBudget {
    /// Small turns: the router then comes round often, between few sessions
    /// each time, and messages flow through it steadily. Larger turns (as
    /// large as a turn of the router's own thread) made the sessions wait
    /// for the router in bursts: measured in echo-server, higher latency
    /// under load, and a loop left idle while messages waited (PATCHED.md).
    fn default() -> Self {
        TurnBudget {
            events: 16,
            consumes: 16,
        }
    }
}

pub struct Router {
    id: RouterId,
    /// Id of this router. Used to index native commitlog to store data from
    /// local connections
    config: RouterConfig,
    /// Saved state of dead persistent connections
    graveyard: Graveyard,
    /// echo-server patch: the last `Origin` given to a session (No Local).
    last_origin: Origin,
    /// List of MetersLink's senders
    meters: Slab<Sender<Vec<Meter>>>,
    /// List of AlertsLink's senders with their respective subscription Filter
    alerts: Slab<Sender<Vec<Alert>>>,
    /// List of connections
    connections: Slab<Connection>,
    /// Connection map from device id to connection id
    /// echo-server patch: keyed by the client id `Incoming` and `Outgoing`
    /// share (was a copy of its own).
    connection_map: HashMap<Arc<str>, ConnectionId>,
    /// Subscription map to interested connection ids
    /// echo-server patch: keyed by the log's own name where the filter is
    /// the log's (not a shared subscription's), shared, not a copy.
    subscription_map: HashMap<Arc<str>, HashSet<ConnectionId>>,
    /// echo-server patch: sessions, connected or kept, subscribed to each
    /// log filter (`$share/group/` stripped); a filter's log is freed when
    /// its count drops to zero.
    filter_refs: HashMap<Arc<str>, usize>,
    /// Incoming data grouped by connection
    ibufs: Slab<Incoming>,
    /// Outgoing data grouped by connection
    obufs: Slab<Outgoing>,
    /// Data log of all the subscriptions
    datalog: DataLog,
    /// Data log of all the alert subscriptions
    alertlog: AlertLog,
    /// Acks log per connection
    ackslog: Slab<AckLog>,
    /// Scheduler to schedule connections
    scheduler: Scheduler,
    /// Parked requests that are ready because of new data on the subscription
    notifications: VecDeque<(ConnectionId, DataRequest)>,
    /// Channel receiver to receive data from all the active connections and
    /// replicators. Each connection will have a tx handle which they use
    /// to send data and requests to router
    router_rx: Receiver<(ConnectionId, Event)>,
    /// Channel sender to send data to this router. This is given to active
    /// network connections, local connections and replicators to communicate
    /// with this router
    router_tx: Sender<(ConnectionId, Event)>,
    /// Router metrics
    router_meters: RouterMeter,
    /// Shared subscriptions map <group-name, group>
    shared_subscriptions: HashMap<String, SharedGroup>,
    /// Will messages per client_id
    last_wills: HashMap<String, (LastWill, Option<LastWillProperties>)>,
    /// echo-server patch: reads that found a subscriber's next messages
    /// already gone from the in-memory log (it read too slowly), so that it
    /// skipped to the oldest one kept. Logged at `debug` only, since a slow
    /// client causes one per read; see [`Router::cursor_jumps`].
    cursor_jumps: Arc<AtomicU64>,
    /// echo-server patch: publishes not sent to a client because they would
    /// have made a packet larger than its Maximum Packet Size; see
    /// [`Router::oversize_drops`].
    oversize_drops: Arc<AtomicU64>,
    /// echo-server patch: subscriptions held by sessions, connected or
    /// kept (the sum of `filter_refs`); see [`Router::subscriptions`].
    subscriptions: Arc<AtomicU64>,
    /// echo-server patch: a copy of every publish appended to the logs,
    /// for a bridge to other brokers; see [`Router::tap`].
    tap: Option<Tap>,
    /// echo-server patch: filters that sessions start or stop holding;
    /// see [`Router::filter_events`].
    filter_events: Option<Sender<FilterEvent>>,
    /// echo-server patch: the logs a request caught up with during this
    /// `consume`, whose read messages `trim_read_logs` may then forget.
    /// Kept between calls for its capacity.
    caught_up: Vec<FilterIdx>,
    /// echo-server patch: the most a session may leave unread in the logs
    /// (`queue_caps`), when the next sweep for those over it is due, and
    /// how many messages they lost to it; see `queues`.
    queue_caps: QueueCaps,
    sweeps: Sweeps,
    queue_drops: Arc<AtomicU64>,
}

/// echo-server patch: a publish as the router appended it to its logs
/// (topic alias resolved, QoS 2 once released), for [`Router::tap`].
#[derive(Debug, Clone)]
pub struct TapMessage {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
}

/// echo-server patch: a filter that sessions (connected or kept) started to
/// hold (the first one) or stopped holding (the last one), as the log
/// filter (`$share/group/` stripped); see [`Router::filter_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterEvent {
    Held(String),
    Freed(String),
}

/// echo-server patch: where [`Router::tap`] sends, and what it skips.
struct Tap {
    tx: Sender<TapMessage>,
    /// Publishes from this client are not copied (the bridge's own link,
    /// which injects what came from the other brokers).
    exclude: String,
    /// Copies not sent because the channel was full.
    drops: Arc<AtomicU64>,
}

impl Router {
    pub fn new(router_id: RouterId, config: RouterConfig) -> Router {
        let (router_tx, router_rx) = bounded(1000);

        let meters = Slab::with_capacity(10);
        let alerts = Slab::with_capacity(10);
        let connections = Slab::with_capacity(config.max_connections);
        let ibufs = Slab::with_capacity(config.max_connections);
        let obufs = Slab::with_capacity(config.max_connections);
        let ackslog = Slab::with_capacity(config.max_connections);

        let router_metrics = RouterMeter {
            router_id,
            ..RouterMeter::default()
        };

        let max_connections = config.max_connections;
        Router {
            id: router_id,
            config: config.clone(),
            graveyard: Graveyard::new(),
            last_origin: 0,
            meters,
            alerts,
            connections,
            connection_map: Default::default(),
            subscription_map: Default::default(),
            filter_refs: Default::default(),
            ibufs,
            obufs,
            datalog: DataLog::new(config.clone()).unwrap(),
            alertlog: AlertLog::new(config),
            ackslog,
            scheduler: Scheduler::with_capacity(max_connections),
            notifications: VecDeque::with_capacity(1024),
            router_rx,
            router_tx,
            router_meters: router_metrics,
            shared_subscriptions: HashMap::new(),
            last_wills: HashMap::new(),
            cursor_jumps: Arc::default(),
            oversize_drops: Arc::default(),
            subscriptions: Arc::default(),
            tap: None,
            filter_events: None,
            caught_up: Vec::new(),
            queue_caps: QueueCaps::NONE,
            sweeps: Sweeps::default(),
            queue_drops: Arc::default(),
        }
    }

    /// echo-server patch: from now on, every publish the router appends to
    /// its logs (from any link but the one with client id `exclude`; topic
    /// alias resolved; a QoS 2 publish when it is released) is also sent,
    /// without waiting, on a channel of `capacity` messages; one that finds
    /// the channel full is dropped and counted in the returned counter. So
    /// a slow reader never holds the router up. Call before the router
    /// runs.
    pub fn tap(&mut self, capacity: usize, exclude: &str) -> (Receiver<TapMessage>, Arc<AtomicU64>) {
        let (tx, rx) = bounded(capacity);
        let drops = Arc::<AtomicU64>::default();
        self.tap = Some(Tap {
            tx,
            exclude: exclude.to_owned(),
            drops: drops.clone(),
        });
        (rx, drops)
    }

    /// echo-server patch: from now on, the router says on this channel
    /// when sessions start holding a filter (its count of subscribers goes
    /// from 0 to 1) and stop (back to 0). Unbounded: one event per such
    /// change, which the reader must keep up with. Call before the router
    /// runs.
    pub fn filter_events(&mut self) -> Receiver<FilterEvent> {
        let (tx, rx) = flume::unbounded();
        self.filter_events = Some(tx);
        rx
    }

    /// echo-server patch: from now on, no session, connected or kept, is
    /// more than `caps` behind over all its filters: past that it loses its
    /// oldest unread messages (see `queues`), which the returned counter
    /// counts. 0.20.0 had no such cap: only each topic's log was bounded.
    /// Call before the router runs.
    pub fn queue_caps(&mut self, caps: QueueCaps) -> Arc<AtomicU64> {
        self.queue_caps = caps;
        self.queue_drops.clone()
    }

    /// echo-server patch: the count of subscriptions sessions hold, those
    /// of kept sessions (clean session 0, session expiry) included, kept up
    /// to date by the router, for the embedding server's `$SYS` topics.
    pub fn subscriptions(&self) -> Arc<AtomicU64> {
        self.subscriptions.clone()
    }

    /// echo-server patch: the count of sessions the router keeps for
    /// clients that are not connected (expired ones included until the
    /// next connection or disconnection frees them).
    pub fn kept_sessions(&self) -> Arc<AtomicU64> {
        self.graveyard.kept()
    }

    /// echo-server patch: the count of publishes dropped for a client
    /// because they exceeded its Maximum Packet Size (MQTT 5 §3.1.2.11.4;
    /// `LinkBuilder::max_packet_size`), as `cursor_jumps` is kept.
    pub fn oversize_drops(&self) -> Arc<AtomicU64> {
        self.oversize_drops.clone()
    }

    /// echo-server patch: the count of slow subscribers' skips (cursor
    /// jumps) so far, kept up to date by the router thread once it runs, so
    /// that the embedding server can count and summarise what the router
    /// only logs at `debug`.
    pub fn cursor_jumps(&self) -> Arc<AtomicU64> {
        self.cursor_jumps.clone()
    }

    /// Gets handle to the router. This is not a public method to ensure that link
    /// is created only after the router starts
    fn link(&self) -> Sender<(ConnectionId, Event)> {
        self.router_tx.clone()
    }

    // pub(crate) fn get_replica_handle(&mut self, _replica_id: NodeId) -> (LinkTx, LinkRx) {
    //     unimplemented!()
    // }

    /// Starts the router in a background thread and returns link to it. Link
    /// to communicate with router should only be returned only after it starts.
    /// For that reason, all the public methods should start the router in the
    /// background
    #[tracing::instrument(skip_all)]
    pub fn spawn(mut self) -> Sender<(ConnectionId, Event)> {
        let router = thread::Builder::new().name(format!("router-{}", self.id));
        let link = self.link();
        router
            .spawn(move || {
                let e = self.run(0);
                error!(reason=?e, "Router done!");
            })
            .unwrap();
        link
    }

    /// echo-server patch: the router as a future, to run as a task of the
    /// caller's async runtime instead of on a thread of its own (`spawn`).
    /// Returns the link to the router, as `spawn` does, and the future,
    /// which runs until the router fails and resolves to the error.
    ///
    /// The future shares its thread with the runtime's other tasks, so it
    /// never blocks: it awaits events (flume's async receive) when it has
    /// nothing to do, and otherwise works in turns of bounded size
    /// (`budget`), yielding to the runtime after each. Dropping the future
    /// drops the router, and with it every link's notifications channel:
    /// links see the router gone exactly as when its thread stops.
    pub fn into_task(
        mut self,
        budget: TurnBudget,
    ) -> (
        Sender<(ConnectionId, Event)>,
        impl std::future::Future<Output = RouterError>,
    ) {
        let link = self.link();
        let task = async move {
            loop {
                if let Err(e) = self.turn_async(budget).await {
                    error!(reason = ?e, "Router done!");
                    return e;
                }
                // Whatever is left waits for the next turn; the sessions
                // sharing the thread run in between.
                tokio::task::yield_now().await;
            }
        };
        (link, task)
    }

    /// One turn of the router as a task: `run_inner` without blocking the
    /// thread, with its work bounded by `budget`, and delivery first.
    ///
    /// On a thread of its own the router gets its share of the CPU from the
    /// kernel; as a task it gets one turn per round of the runtime's ready
    /// tasks, however many sessions feed it in that round. So a turn
    /// delivers before it takes more in, and takes new events only while
    /// the next turn can deliver what they make ready: otherwise appends
    /// outrun deliveries, the topic logs rotate under the subscribers and
    /// messages are skipped. Events left in the channel fill it, and the
    /// sessions waiting for room stop reading their clients (backpressure,
    /// as with the thread).
    async fn turn_async(&mut self, budget: TurnBudget) -> Result<(), RouterError> {
        let expired = self.expire_retained();
        let mut consumed = 0;
        while consumed < budget.consumes && self.consume().is_some() {
            consumed += 1;
        }

        let mut taken = 0;
        while taken < budget.events && self.scheduler.readyqueue.len() < budget.consumes {
            match self.router_rx.try_recv() {
                Ok((id, data)) => self.events(id, data),
                Err(TryRecvError::Disconnected) => return Err(RouterError::Disconnected),
                Err(TryRecvError::Empty) => break,
            }
            taken += 1;
        }

        if consumed == 0 && taken == 0 && expired == 0 {
            // Nothing ready and nothing sent: wait without holding the
            // thread, until an event comes or a retained message expires.
            let event = self.router_rx.recv_async();
            let (id, data) = match self.datalog.next_retained_expiry() {
                None => event.await?,
                Some(deadline) => {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    match tokio::time::timeout_at(deadline, event).await {
                        Ok(event) => event?,
                        Err(_) => return Ok(()),
                    }
                }
            };
            self.events(id, data);
        }
        Ok(())
    }

    /// echo-server patch: frees retained messages that have expired, a
    /// bounded number (`RETAINED_EXPIRIES_PER_TURN`); returns how many.
    /// Costs nothing when no retained message expires.
    fn expire_retained(&mut self) -> usize {
        if self.datalog.next_retained_expiry().is_none() {
            return 0;
        }
        self.datalog
            .expire_retained(Instant::now(), RETAINED_EXPIRIES_PER_TURN)
    }

    /// echo-server patch: the count of retained messages the router holds,
    /// kept up to date by the router as they come and go (expired ones
    /// included, which it frees on its own: `DataLog::expire_retained`).
    pub fn retained_messages(&self) -> Arc<AtomicU64> {
        self.datalog.retained_count()
    }

    /// echo-server patch: the count of messages the topic logs hold (what
    /// subscribers have not all read, and, on logs where some reader is
    /// not caught up, what the log has not yet rotated out; see
    /// `trim_read_logs`).
    pub fn log_messages(&self) -> Arc<AtomicU64> {
        self.datalog.held_messages.clone()
    }

    /// Waits on incoming events when ready queue is empty.
    /// After pulling 1 event, tries to pull 500 more events
    /// before polling ready queue 100 times (connections)
    #[tracing::instrument(skip_all)]
    fn run(&mut self, count: usize) -> Result<(), RouterError> {
        match count {
            0 => loop {
                self.run_inner()?;
            },
            n => {
                for _ in 0..n {
                    self.run_inner()?;
                }
            }
        };

        Ok(())
    }

    fn run_inner(&mut self) -> Result<(), RouterError> {
        self.expire_retained();
        // Block on incoming events if there are no ready connections for consumption
        if self.consume().is_none() {
            // trace!("{}:: {:20} {:20} {:?}", self.id, "", "done-await", self.readyqueue);
            // echo-server patch: or until the next retained message expires.
            let (id, data) = match self.datalog.next_retained_expiry() {
                None => self.router_rx.recv()?,
                Some(deadline) => match self.router_rx.recv_deadline(deadline) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => return Ok(()),
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(RouterError::Recv(RecvError::Disconnected))
                    }
                },
            };
            self.events(id, data);
        }

        // Try reading more from connections in a non-blocking
        // fashion to accumulate data and handle subscriptions.
        // Accumulating more data lets requests retrieve bigger
        // bulks which in turn increases efficiency
        for _ in 0..500 {
            // All these methods will handle state and errors
            match self.router_rx.try_recv() {
                Ok((id, data)) => self.events(id, data),
                Err(TryRecvError::Disconnected) => return Err(RouterError::Disconnected),
                Err(TryRecvError::Empty) => break,
            }
        }

        // A connection should not be scheduled multiple times
        // echo-server patch: debug, not warn: clients taking each other's
        // client id over in a loop cause this (debug builds only) at any rate
        #[cfg(debug_assertions)]
        if let Some(readyqueue) = self.scheduler.check_readyqueue_duplicates() {
            debug!(
                "Connection was scheduled multiple times in readyqueue: {:?}",
                readyqueue
            );
        }

        // Poll 100 connections which are ready in ready queue
        for _ in 0..100 {
            self.consume();
        }

        // self.send_all_alerts();
        Ok(())
    }

    fn events(&mut self, id: ConnectionId, data: Event) {
        let span = tracing::error_span!("[>] incoming", connection_id = id);
        let _guard = span.enter();

        match data {
            Event::Connect {
                connection,
                incoming,
                outgoing,
            } => self.handle_new_connection(connection, incoming, outgoing),
            Event::NewMeter(tx) => self.handle_new_meter(tx),
            Event::NewAlert(tx) => self.handle_new_alert(tx),
            Event::DeviceData => self.handle_device_payload(id),
            Event::Disconnect => self.handle_disconnection(id, None),
            Event::Ready => self.scheduler.reschedule(id, ScheduleReason::Ready),
            Event::Shadow(request) => {
                retrieve_shadow(&mut self.datalog, &mut self.obufs[id], request)
            }
            Event::SendAlerts => {
                self.send_alerts();
            }
            Event::SendMeters => {
                self.send_meters();
            }
            Event::PrintStatus(metrics) => print_status(self, metrics),
            Event::Snapshot(reply) => {
                // The asker may have given up; nothing to do then.
                let _ = reply.send(self.snapshot());
            }
            Event::PublishWill((client_id, _tenant_id)) => self.handle_last_will(
                client_id,
                #[cfg(feature = "validate-tenant-prefix")]
                _tenant_id,
            ),
        }
    }

    fn handle_new_connection(
        &mut self,
        mut connection: Connection,
        incoming: Incoming,
        mut outgoing: Outgoing,
    ) {
        let client_id = outgoing.client_id.clone();
        if let Err(err) = validate_clientid(&client_id) {
            // echo-server patch: debug, not error (here and below, for
            // everything one client can cause per packet or per connection:
            // a client in a loop flooded the log; see PATCHED.md)
            debug!("Invalid client_id: {}", err);
            return;
        };

        let span = tracing::info_span!("incoming_connect", client_id = &*client_id);
        let _guard = span.enter();

        if cfg!(not(feature = "allow-duplicate-clientid")) {
            // Check if same client_id already exists and if so, replace it with this new connection
            // ref: https://docs.oasis-open.org/mqtt/mqtt/v3.1.1/os/mqtt-v3.1.1-os.html#_Toc398718032

            let connection_id = self.connection_map.get(&client_id);
            if let Some(connection_id) = connection_id {
                debug!(
                    "Duplicate client_id, dropping previous connection with connection_id: {}",
                    connection_id
                );
                self.handle_disconnection(*connection_id, None);
            }
        }

        if self.connections.len() >= self.config.max_connections {
            debug!("no space for new connection");
            // let ack = ConnectionAck::Failure("No space for new connection".to_owned());
            // let message = Notification::ConnectionAck(ack);
            return;
        }

        // Retrieve previous connection state from graveyard
        let saved = self.graveyard.retrieve(&client_id);
        self.release_expired_sessions();
        let clean_session = connection.clean;
        let previous_session = saved.as_ref().is_some_and(|s| s.session_state.is_some());
        // for qos2 pending pubrels
        let mut pending_acks = VecDeque::new();

        let tracker = if !clean_session {
            // if there was some saved state, restore the metrics
            // and get the session's state if present
            let saved_state = saved.and_then(|saved| {
                connection.events = saved.metrics;
                saved.session_state
            });

            // if session's state is present, restore that session
            // otherwise, just start new one
            saved_state.map_or_else(
                || Tracker::new(client_id.to_string()),
                |session_state| {
                    connection.subscriptions = session_state.subscriptions;
                    connection.subscription_ids = session_state.subscription_ids;
                    connection.origin = session_state.origin;
                    // for using in acklog
                    pending_acks.clone_from(&session_state.unacked_pubrels);
                    outgoing.unacked_pubrels = session_state.unacked_pubrels;
                    session_state.tracker
                },
            )
        } else {
            // echo-server patch: the kept session is discarded, and with it
            // its hold on its filters.
            if let Some(state) = saved.as_ref().and_then(|s| s.session_state.as_ref()) {
                self.filters_unref(&state.subscriptions);
            }
            // Only retrieve metrics in clean session
            connection.events = saved.map_or_else(ConnectionEvents::default, |s| s.metrics);
            Tracker::new(client_id.to_string())
        };

        // echo-server patch: a session that did not resume gets a mark of
        // its own for what it publishes (No Local).
        if connection.origin == 0 {
            self.last_origin += 1;
            connection.origin = self.last_origin;
        }

        let ackslog = AckLog::new();

        // echo-server patch: no "connection at ..." line in
        // `connection.events` (nor "disconnection at ..." below). Those
        // lines were read only by rumqttd's console (`Print::Connection`),
        // which the server does not run, and cost every connected client a
        // string and a queue (155 bytes).

        if let Some(will) = connection.last_will.take() {
            self.last_wills.insert(client_id.to_string(), *will);
        }

        // echo-server patch: a resumed session's subscriptions are its own
        // again (0.20.0 left them out of the subscription map, so such a
        // client could never unsubscribe).
        let resumed: Vec<Filter> = connection.subscriptions.iter().cloned().collect();
        let connection_id = self.connections.insert(connection);
        for filter in resumed {
            let name = self.datalog.shared_name(&filter);
            self.subscription_map.entry(name).or_default().insert(connection_id);
        }
        assert_eq!(self.ibufs.insert(incoming), connection_id);
        assert_eq!(self.obufs.insert(outgoing), connection_id);

        self.connection_map.insert(client_id.clone(), connection_id);
        debug!(connection_id, "Client connection registered");

        assert_eq!(self.ackslog.insert(ackslog), connection_id);
        assert_eq!(self.scheduler.add(tracker), connection_id);

        // Check if there are multiple data requests on same filter.
        debug_assert!(self
            .scheduler
            .check_tracker_duplicates(connection_id)
            .is_none());

        let ack = ConnAck {
            session_present: !clean_session && previous_session,
            code: ConnectReturnCode::Success,
        };

        let properties = ConnAckProperties {
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            ..Default::default()
        };

        let ackslog = self.ackslog.get_mut(connection_id).unwrap();
        ackslog.connack(connection_id, ack, Some(properties));

        pending_acks.into_iter().for_each(|pkid| {
            // NOTE: will it be better if we store the whole PubRel
            // instead of pkid in pending acks
            let pubrel = PubRel {
                pkid,
                reason: PubRelReason::Success,
            };
            ackslog.pubrel(pubrel)
        });

        self.scheduler
            .reschedule(connection_id, ScheduleReason::Init);

        self.router_meters.total_connections += 1;
    }

    fn handle_new_meter(&mut self, tx: Sender<Vec<Meter>>) {
        let _meter_id = self.meters.insert(tx);
    }

    fn handle_new_alert(&mut self, tx: Sender<Vec<Alert>>) {
        let _alert_id = self.alerts.insert(tx);
    }

    fn handle_disconnection(&mut self, id: ConnectionId, reason: Option<DisconnectReasonCode>) {
        // Some clients can choose to send Disconnect packet before network disconnection.
        // This will lead to double Disconnect packets in router `events`
        let client_id = match &self.obufs.get(id) {
            Some(v) => v.client_id.clone(),
            None => {
                debug!("no-connection id {} is already gone", id);
                return;
            }
        };

        let span = tracing::info_span!("incoming_disconnect", client_id = &*client_id);
        let _guard = span.enter();

        // must handle last will before sending disconnect packet
        // as the disconnecting client might have subscribed to will topic.
        // if execute_last_will {
        //     self.handle_last_will(id);
        // }

        debug!("Disconnecting connection");

        if let Some(reason_code) = reason {
            let outgoing = match self.obufs.get_mut(id) {
                Some(v) => v,
                None => {
                    debug!("no-connection id {} is already gone", id);
                    return;
                }
            };

            let disconnect = Disconnect { reason_code };

            let disconnect_notification = Notification::Disconnect(disconnect, None);

            outgoing.handle.lock().push_back(disconnect_notification);

            outgoing.handle.wake();
        }

        // Remove connection from router
        let connection = self.connections.remove(id);
        let _incoming = self.ibufs.remove(id);
        let outgoing = self.obufs.remove(id);
        let mut tracker = self.scheduler.remove(id);
        self.connection_map.remove(&client_id);
        self.ackslog.remove(id);

        // Don't remove connection id from readyqueue with index. This will
        // remove wrong connection from readyqueue. Instead just leave disconnected
        // connection in readyqueue and allow 'consume()' method to deal with this
        // self.readyqueue.remove(id);

        // echo-server patch: only the filters this connection subscribed
        // to (a shared subscription waits on the filter after its group).
        let subscribed = connection
            .subscriptions
            .iter()
            .map(|f| extract_group(f).map_or_else(|| f.clone(), |(_, path)| path));
        let inflight_data_requests = self.datalog.clean_filters(id, subscribed);
        let retransmissions = outgoing.retransmission_map();

        // Remove connections from all groups and
        // discard empty group ( group with no client )
        // note: can we do this in better way?
        self.shared_subscriptions.retain(|_, group| {
            group.remove_client(&client_id);
            !group.is_empty()
        });

        // Remove this connection from subscriptions
        for filter in connection.subscriptions.iter() {
            if let Some(connections) = self.subscription_map.get_mut(filter.as_str()) {
                connections.remove(&id);
                // echo-server patch: and the filter, once nobody is left
                if connections.is_empty() {
                    self.subscription_map.remove(filter.as_str());
                }
            }
        }

        // Save state for persistent sessions
        // echo-server patch: a session is kept unless its expiry is zero
        // (was: unless it started clean), and for no longer than its expiry.
        // Nothing at all is kept of a session that ends here: 0.20.0 kept a
        // record of every client id ever seen (its last ten connection
        // events, ~600 bytes measured), so a broker whose clients use fresh
        // ids (mosquitto_sub's and MQTT.js's defaults) grew for ever.
        if connection.session_expiry != Some(std::time::Duration::ZERO) {
            // Add inflight data requests back to tracker
            inflight_data_requests
                .into_iter()
                .for_each(|r| tracker.register_data_request(r));

            for request in tracker.data_requests.iter_mut() {
                if let Some(cursor) = retransmissions.get(&request.filter_idx) {
                    request.cursor = *cursor;
                    // reset the group cursor
                    if let Some(group_name) = &request.group {
                        // TODO: Test this more
                        self.shared_subscriptions
                            .get_mut(group_name)
                            .expect("group must exists")
                            .cursor = *cursor;
                    }
                }
            }

            self.graveyard.save_state(
                tracker,
                connection.subscriptions,
                connection.subscription_ids,
                connection.events,
                outgoing.unacked_pubrels,
                connection.session_expiry,
                connection.origin,
            );
            self.release_expired_sessions();
        } else {
            // echo-server patch: nothing kept, so no hold on its filters.
            self.filters_unref(&connection.subscriptions);
        }
        self.connection_map.shrink_when_idle();
        self.router_meters.total_connections -= 1;
    }

    /// Handles new incoming data on a topic
    fn handle_device_payload(&mut self, id: ConnectionId) {
        // TODO: Retun errors and move error handling to the caller
        let incoming = match self.ibufs.get_mut(id) {
            Some(v) => v,
            None => {
                debug!("no-connection id {} is already gone", id);
                return;
            }
        };

        let client_id = incoming.client_id.clone();
        let span = tracing::error_span!("incoming_payload", client_id = &*client_id);
        let _guard = span.enter();

        // echo-server patch: was an exchange with the router's cache, the
        // drained queue of the previous connection that sent (the first one a
        // 200-packet queue), so every connection ended up holding a drained
        // queue (1.5 KB idle). The connection gets an empty queue, which
        // allocates nothing, and the drained one is freed below.
        let mut packets = incoming.exchange(VecDeque::new());

        // echo-server patch: a link whose queue grew to QUEUE_DRAINED_WAKE
        // packets or more may have stopped reading its client until the
        // router has taken them (backpressure): tell it through the
        // wake-up it already waits on (its outbox). Links that send a few
        // packets per sweep never get this extra wake-up.
        if packets.len() >= crate::local::QUEUE_DRAINED_WAKE {
            if let Some(outgoing) = self.obufs.get(id) {
                outgoing.handle.wake();
            }
        }

        let mut force_ack = false;
        let mut new_data = false;
        let mut disconnect = false;
        let mut disconnect_reason: Option<DisconnectReasonCode> = None;

        // info!("{:15.15}[I] {:20} count = {}", client_id, "packets", packets.len());

        for packet in packets.drain(0..) {
            match packet {
                Packet::Publish(publish, properties) => {
                    let span = tracing::error_span!("publish", topic = ?publish.topic, pkid = publish.pkid);
                    let _guard = span.enter();

                    let qos = publish.qos;
                    let pkid = publish.pkid;

                    // Prepare acks for the above publish
                    // If any of the publish in the batch results in force flush,
                    // set global force flush flag. Force flush is triggered when the
                    // router is in instant ack more or connection data is from a replica
                    //
                    // TODO: handle multiple offsets
                    //
                    // The problem with multiple offsets is that when using replication with the current
                    // architecture, a single publish might get appended to multiple commit logs, resulting in
                    // multiple offsets (see `append_to_commitlog` function), meaning replicas will need to
                    // coordinate using multiple offsets, and we don't have any idea how to do so right now.
                    // Currently as we don't have replication, we just use a single offset, even when appending to
                    // multiple commit logs.

                    match qos {
                        QoS::AtLeastOnce => {
                            let puback = PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            };

                            let ackslog = self.ackslog.get_mut(id).unwrap();
                            ackslog.puback(puback);
                            force_ack = true;
                        }
                        QoS::ExactlyOnce => {
                            let pubrec = PubRec {
                                pkid,
                                reason: PubRecReason::Success,
                            };

                            let ackslog = self.ackslog.get_mut(id).unwrap();
                            ackslog.pubrec(publish, properties, pubrec);
                            force_ack = true;
                            continue;
                        }
                        QoS::AtMostOnce => {
                            // Do nothing
                        }
                    };

                    self.router_meters.total_publishes += 1;

                    // Try to append publish to commitlog
                    match append_to_commitlog(
                        id,
                        publish.clone(),
                        properties,
                        &mut self.datalog,
                        &mut self.notifications,
                        &mut self.connections,
                        self.tap.as_ref(),
                    ) {
                        Ok(_offset) => {
                            // Even if one of the data in the batch is appended to commitlog,
                            // set new data. This triggers notifications to wake waiters.
                            // Don't overwrite this flag to false if it is already true.
                            new_data = true;
                        }
                        Err(e) => {
                            // Disconnect on bad publishes
                            debug!(
                                reason = ?e, "Failed to append to commitlog"
                            );
                            self.router_meters.failed_publishes += 1;
                            disconnect = true;

                            if let RouterError::Disconnect(code) = e {
                                disconnect_reason = Some(code)
                            }

                            break;
                        }
                    };

                    let meter = &mut self.ibufs.get_mut(id).unwrap().meter;
                    if let Err(e) = meter.register_publish(&publish) {
                        debug!(
                            reason = ?e, "Failed to write to incoming meter"
                        );
                    };
                }
                Packet::Subscribe(mut subscribe, props) => {
                    let mut return_codes = Vec::new();
                    let pkid = subscribe.pkid;
                    // let len = s.len();

                    for f in &mut subscribe.filters {
                        let span =
                            tracing::info_span!("subscribe", topic = f.path, pkid = subscribe.pkid);
                        let _guard = span.enter();

                        debug!("Adding subscription on topic {}", f.path);
                        let connection = self.connections.get_mut(id).unwrap();

                        if let Err(e) = validate_subscription(connection, f) {
                            debug!(reason = ?e,"Subscription cannot be validated: {}", e);

                            disconnect = true;
                            break;
                        }

                        let mut filter = f.path.clone();
                        let mut group = None;

                        if let Some((grp, filter_path)) = extract_group(&f.path) {
                            group = Some(grp);
                            filter = filter_path;
                        };

                        let subscription_id = props.as_ref().and_then(|p| p.id);

                        if subscription_id == Some(0) {
                            debug!("Subscription identifier can't be 0");
                            disconnect = true;
                            disconnect_reason = Some(DisconnectReasonCode::ProtocolError);
                            break;
                        }

                        let (idx, cursor) = self.datalog.next_native_offset(&filter);

                        // in case of shared sub original_filter will be $share/group/topic
                        // this is because we do want to treat is as diffrent subscription
                        // and create DataRequest, while using the same datalog of "topic"
                        // NOTE: topic & $share/group/topic will have same filteridx!
                        self.prepare_filter(id, cursor, idx, f, group, subscription_id);

                        let code = match f.qos {
                            QoS::AtMostOnce => SubscribeReasonCode::QoS0,
                            QoS::AtLeastOnce => SubscribeReasonCode::QoS1,
                            QoS::ExactlyOnce => SubscribeReasonCode::QoS2,
                        };

                        return_codes.push(code);
                    }

                    // let meter = &mut self.ibufs.get_mut(id).unwrap().meter;
                    // meter.total_size += len;

                    let suback = SubAck { pkid, return_codes };
                    let ackslog = self.ackslog.get_mut(id).unwrap();
                    ackslog.suback(suback);
                    force_ack = true;
                }
                Packet::Unsubscribe(unsubscribe, _) => {
                    // echo-server patch: one UNSUBACK per UNSUBSCRIBE with a
                    // reason per filter, also for filters that were not
                    // subscribed (0.20.0 sent one UNSUBACK per filter removed
                    // and none at all otherwise, so such a client waited for
                    // ever; MQTT 3.1.1 3.10.4, 5 3.11.3).
                    let pkid = unsubscribe.pkid;
                    let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
                    for filter in &unsubscribe.filters {
                        let span = tracing::info_span!("unsubscribe", topic = filter, pkid);
                        let _guard = span.enter();

                        debug!("Removing subscription on filter {}", filter);
                        if let Some(connection_ids) = self.subscription_map.get_mut(filter.as_str()) {
                            connection_ids.remove(&id);
                            if connection_ids.is_empty() {
                                self.subscription_map.remove(filter.as_str());
                            }
                        }
                        let connection = self.connections.get_mut(id).unwrap();
                        if !connection.subscriptions.remove(filter) {
                            reasons.push(UnsubAckReason::NoSubscriptionExisted);
                            continue;
                        }
                        if let Some(broker_aliases) = connection.broker_topic_aliases.as_mut() {
                            broker_aliases.remove_alias(filter);
                        }
                        // remove the subscription id
                        connection.subscription_ids.remove(filter);

                        // Leave the share group this filter names (was: every
                        // group, whatever the filter), discarding it if empty.
                        if let Some((group, _)) = extract_group(filter) {
                            if let Some(shared) = self.shared_subscriptions.get_mut(&group) {
                                shared.remove_client(&client_id);
                                if shared.is_empty() {
                                    self.shared_subscriptions.remove(&group);
                                }
                            }
                        }

                        self.scheduler.untrack(id, filter);
                        // Parked and ready requests wait on the filter's log
                        // (was: looked up with `$share/group/`, which has none).
                        let path = log_filter(filter);
                        self.datalog.remove_waiters_for_id(id, &path);
                        self.notifications
                            .retain(|(conn, request)| !(*conn == id && request.filter == *filter));
                        if let Some(idx) = self.datalog.index(&path) {
                            self.obufs.get_mut(id).unwrap().forget_cursors(idx);
                        }
                        self.filter_unref(filter);
                        reasons.push(UnsubAckReason::Success);
                    }
                    let unsuback = UnsubAck { pkid, reasons };
                    let ackslog = self.ackslog.get_mut(id).unwrap();
                    ackslog.unsuback(unsuback);
                    force_ack = true;
                }
                Packet::PubAck(puback, _) => {
                    let span = tracing::info_span!("puback", pkid = puback.pkid);
                    let _guard = span.enter();

                    let outgoing = self.obufs.get_mut(id).unwrap();
                    let pkid = puback.pkid;
                    let Some(filter_idx) = outgoing.register_ack(pkid) else {
                        debug!(pkid, "Unsolicited/ooo ack received for pkid {}", pkid);
                        disconnect = true;
                        // echo-server patch: say why (was no reason, which a
                        // client cannot tell from a session take-over)
                        disconnect_reason = Some(DisconnectReasonCode::ProtocolError);
                        break;
                    };
                    self.acknowledged(filter_idx);

                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PubRec(pubrec, _) => {
                    let span = tracing::info_span!("pubrec", pkid = pubrec.pkid);
                    let _guard = span.enter();

                    let outgoing = self.obufs.get_mut(id).unwrap();
                    let pkid = pubrec.pkid;
                    let Some(filter_idx) = outgoing.register_ack(pkid) else {
                        debug!(pkid, "Unsolicited/ooo ack received for pkid {}", pkid);
                        disconnect = true;
                        // echo-server patch: say why
                        disconnect_reason = Some(DisconnectReasonCode::ProtocolError);
                        break;
                    };

                    // echo-server patch: a PUBREC with an error reason (0x80
                    // or more) ends the exchange: no PUBREL, no PUBCOMP to
                    // await, and the in-flight slot is free (MQTT 5 §4.3.3,
                    // §4.9). 0.20.0 sent a PUBREL and waited for a PUBCOMP.
                    if !pubrec_failed(&pubrec.reason) {
                        let ackslog = self.ackslog.get_mut(id).unwrap();
                        let pubrel = PubRel {
                            pkid: pubrec.pkid,
                            reason: PubRelReason::Success,
                        };

                        outgoing.register_pubrec(pubrel.pkid);
                        ackslog.pubrel(pubrel);
                    }
                    self.acknowledged(filter_idx);
                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PubRel(pubrel, None) => {
                    let span = tracing::info_span!("pubrel", pkid = pubrel.pkid);
                    let _guard = span.enter();

                    let ackslog = self.ackslog.get_mut(id).unwrap();
                    let pubcomp = PubComp {
                        pkid: pubrel.pkid,
                        reason: PubCompReason::Success,
                    };

                    // NOTE: client can try to resend previously unacked pubrels
                    // on reconnection ( with clean session false )
                    // we try to retrive publish assuming broker saved the previous state
                    // successfully in graveyard.
                    // echo-server patch: a PUBREL for a packet id with no
                    // recorded publish is answered PUBCOMP 0x92 (MQTT 5; a
                    // plain PUBCOMP in 3.1.1), as MQTT says (§4.3.3), not by
                    // dropping the client: a client resending its PUBRELs on
                    // a resumed session (the publish is not kept with the
                    // session) was dropped at each reconnection.
                    let (publish, props) = match ackslog.pubcomp(pubcomp) {
                        Some(v) => v,
                        None => {
                            self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                            continue;
                        }
                    };

                    // Try to append publish to commitlog
                    match append_to_commitlog(
                        id,
                        publish,
                        props,
                        &mut self.datalog,
                        &mut self.notifications,
                        &mut self.connections,
                        self.tap.as_ref(),
                    ) {
                        Ok(_offset) => {
                            // Even if one of the data in the batch is appended to commitlog,
                            // set new data. This triggers notifications to wake waiters.
                            // Don't overwrite this flag to false if it is already true.
                            new_data = true;
                        }
                        Err(e) => {
                            // Disconnect on bad publishes
                            debug!(
                                reason = ?e, "Failed to append to commitlog"
                            );
                            self.router_meters.failed_publishes += 1;
                            disconnect = true;
                            break;
                        }
                    };
                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PubComp(pubcomp, _) => {
                    let span = tracing::info_span!("pubcomp", pkid = pubcomp.pkid);
                    let _guard = span.enter();

                    let outgoing = self.obufs.get_mut(id).unwrap();
                    let pkid = pubcomp.pkid;
                    if outgoing.register_pubcomp(pkid).is_none() {
                        debug!(
                            pkid,
                            "ack received for pkid {}, but the pkid didn't exists!", pkid
                        );
                        disconnect = true;
                        // echo-server patch: say why
                        disconnect_reason = Some(DisconnectReasonCode::ProtocolError);
                        break;
                    }
                    // echo-server patch: a QoS 2 delivery holds its in-flight
                    // slot until its PUBCOMP (`Outgoing::free_slots`), so a
                    // client paused with a full window is scheduled again.
                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PingReq(_) => {
                    let ackslog = self.ackslog.get_mut(id).unwrap();
                    ackslog.pingresp(PingResp);

                    force_ack = true;
                }
                Packet::Disconnect(_, properties) => {
                    let span = tracing::info_span!("disconnect");
                    let _guard = span.enter();
                    disconnect = true;
                    // echo-server patch: MQTT 5 lets a DISCONNECT change the
                    // session expiry interval (3.14.2.2.2); 0xFFFFFFFF is never.
                    if let Some(interval) = properties.and_then(|p| p.session_expiry_interval) {
                        if let Some(connection) = self.connections.get_mut(id) {
                            connection.session_expiry = (interval != u32::MAX)
                                .then(|| std::time::Duration::from_secs(u64::from(interval)));
                        }
                    }
                    // delete the last will message
                    self.last_wills.remove(&*client_id);
                    break;
                }
                incoming => {
                    debug!(packet=?incoming, "Unexpected packet received, ignoring the packet." );
                }
            }
        }


        // Prepare AcksRequest in tracker if router is operating in a
        // single node mode or force ack request for subscriptions
        if force_ack {
            self.scheduler.reschedule(id, ScheduleReason::FreshData);
        }

        // Notify waiting consumers only if there is publish data. During
        // subscription, data request is added to data waiter. With out this
        // if condition, connection will be woken up even during subscription
        if new_data {
            // Prepare all the consumers which are waiting for new data
            while let Some((id, request)) = self.notifications.pop_front() {
                self.scheduler.track(id, request);
                self.scheduler.reschedule(id, ScheduleReason::FreshData);
            }
        }

        // Incase BytesMut represents 10 packets, publish error/diconnect event
        // on say 5th packet should not block new data notifications for packets
        // 1 - 4. Hence we use a flag instead of diconnecting immediately
        if disconnect {
            self.handle_disconnection(id, disconnect_reason);
        }
        self.trim_read_logs();
        self.cap_queues_when_due();
    }

    /// echo-server patch: a QoS 1 or 2 delivery from the log `filter_idx`
    /// was acknowledged (PUBACK, PUBREC), so the log may forget it if every
    /// reader has caught up: otherwise the last window of a burst stayed
    /// until the next message on the topic. Once per log and batch.
    fn acknowledged(&mut self, filter_idx: FilterIdx) {
        if self.caught_up.last() != Some(&filter_idx) {
            self.caught_up.push(filter_idx);
        }
    }

    /// Apply filter and prepare this connection to receive subscription data
    /// Handle retained messages as per subscription options!
    fn prepare_filter(
        &mut self,
        id: ConnectionId,
        cursor: Offset,
        filter_idx: FilterIdx,
        filter: &protocol::Filter,
        group: Option<String>,
        subscription_id: Option<usize>,
    ) {
        let filter_path = &filter.path;

        // Add connection id to subscription list
        match self.subscription_map.get_mut(filter_path.as_str()) {
            Some(connections) => {
                connections.insert(id);
            }
            None => {
                let mut connections = HashSet::new();
                connections.insert(id);
                self.subscription_map
                    .insert(self.datalog.shared_name(filter_path), connections);
            }
        }

        // Prepare consumer to pull data in case of subscription
        let connection = self.connections.get_mut(id).unwrap();

        // Add/Create shared group
        if let Some(group_name) = &group {
            let client_id = connection.client_id.clone();

            let shared_group = self
                .shared_subscriptions
                .entry(group_name.to_string())
                .or_insert(SharedGroup::new(
                    cursor,
                    self.config.shared_subscriptions_strategy.clone(),
                ));

            shared_group.add_client(client_id);
        };

        // echo-server patch: a SUBSCRIBE without an identifier to a filter
        // held takes the old identifier away (it replaces the
        // subscription, 3.8.4); 0.20.0 kept it.
        match subscription_id {
            Some(subscription_id) => {
                connection
                    .subscription_ids
                    .insert(filter_path.clone(), subscription_id);
            }
            None => {
                connection.subscription_ids.remove(filter_path);
            }
        }

        // call to `insert(_)` returns `true` if it didn't contain the filter_path already
        // i.e. its a new subscription
        let new_subscription = connection.subscriptions.insert(filter_path.clone());

        // check is group is None because retained messages aren't sent
        // for shared subscriptions
        // echo-server patch: and as Retain Handling says (MQTT 5, 3.8.3.1;
        // 3.1.1 subscriptions parse as 0): 0 at every SUBSCRIBE, 1 only
        // when the subscription is new, 2 never (was: new ones only).
        let forward_retained = group.is_none()
            && match filter.retain_forward_rule {
                RetainForwardRule::OnEverySubscribe => true,
                RetainForwardRule::OnNewSubscribe => new_subscription,
                RetainForwardRule::Never => false,
            };
        // echo-server patch: No Local on a shared subscription is a
        // protocol error (3.8.3.1); it is ignored there, as the group's
        // shared cursor cannot skip for one member.
        let nolocal = filter.nolocal && group.is_none();
        let preserve_retain = filter.preserve_retain;

        if new_subscription {
            let request = DataRequest {
                filter: filter_path.clone(),
                filter_idx,
                qos: filter.qos as u8,
                cursor,
                read_count: 0,
                max_count: 100,
                // set true for new subscriptions
                forward_retained,
                group,
                nolocal,
                preserve_retain,
                pending_retained: None,
            };

            self.scheduler.track(id, request);
            self.scheduler.reschedule(id, ScheduleReason::NewFilter);
            debug_assert!(self.scheduler.check_tracker_duplicates(id).is_none())
        } else if let Some(mut request) = self.take_request(id, filter_path) {
            // echo-server patch: a SUBSCRIBE to a filter the session holds
            // replaces the subscription's options (MQTT 5 and 3.1.1,
            // 3.8.4), its place in the log kept; 0.20.0 left the request
            // as it was, so a re-subscription got no retained messages.
            request.qos = filter.qos as u8;
            request.nolocal = nolocal;
            request.preserve_retain = preserve_retain;
            request.forward_retained |= forward_retained;
            self.scheduler.track(id, request);
            self.scheduler.reschedule(id, ScheduleReason::NewFilter);
            debug_assert!(self.scheduler.check_tracker_duplicates(id).is_none())
        }

        // echo-server patch: no copy of the filter in the connection's
        // `IncomingMeter` any more (see there).
        if new_subscription {
            self.filter_ref(filter_path);
        }
    }

    /// echo-server patch: takes the data request of connection `id`'s
    /// subscription to `filter` from wherever it waits: the tracker, the
    /// log's waiters (parked, caught up) or the notifications of this turn.
    fn take_request(&mut self, id: ConnectionId, filter: &str) -> Option<DataRequest> {
        if let Some(request) = self.scheduler.take_request(id, filter) {
            return Some(request);
        }
        if let Some(request) = self.datalog.take_waiter(id, &log_filter(filter), filter) {
            return Some(request);
        }
        let at = self
            .notifications
            .iter()
            .position(|(conn, request)| *conn == id && request.filter == filter)?;
        self.notifications.remove(at).map(|(_, request)| request)
    }

    /// echo-server patch: one more session holds this subscription's log.
    fn filter_ref(&mut self, filter: &str) {
        let path = log_filter(filter);
        let count = self.filter_refs.entry(self.datalog.shared_name(&path)).or_insert(0);
        *count += 1;
        if *count == 1 {
            if let Some(events) = &self.filter_events {
                let _ = events.send(FilterEvent::Held(path));
            }
        }
        self.subscriptions.fetch_add(1, Ordering::Relaxed);
    }

    /// echo-server patch: one session fewer holds this subscription's log;
    /// the log is freed when none does.
    fn filter_unref(&mut self, filter: &Filter) {
        self.filters_unref([filter]);
    }

    /// echo-server patch: `filter_unref` for each of these filters, the logs
    /// that nobody holds any more freed together (`DataLog::remove_filters`:
    /// a client leaving with many wildcard filters costs those filters only).
    fn filters_unref<'a>(&mut self, filters: impl IntoIterator<Item = &'a Filter>) {
        let mut freed = Vec::new();
        for filter in filters {
            let path = log_filter(filter);
            if let Some(count) = self.filter_refs.get_mut(path.as_str()) {
                *count -= 1;
                self.subscriptions.fetch_sub(1, Ordering::Relaxed);
                if *count == 0 {
                    self.filter_refs.remove(path.as_str());
                    if let Some(events) = &self.filter_events {
                        let _ = events.send(FilterEvent::Freed(path.clone()));
                    }
                    freed.push(path);
                }
            }
        }
        self.datalog.remove_filters(freed);
        self.shrink_tables();
    }

    /// echo-server patch: what a client grew and left empty goes back
    /// (`tables`): the filter and topic tables, and the maps by filter and
    /// by client id.
    fn shrink_tables(&mut self) {
        self.datalog.shrink_tables();
        self.filter_refs.shrink_when_idle();
        self.subscription_map.shrink_when_idle();
        self.connection_map.shrink_when_idle();
    }

    /// echo-server patch: kept sessions that have expired let go of their
    /// filters.
    fn release_expired_sessions(&mut self) {
        for state in self.graveyard.take_expired() {
            self.filters_unref(&state.subscriptions);
        }
    }

    /// When a connection is ready, it should sweep native data from 'datalog',
    /// send data and notifications to consumer.
    /// To activate a connection, first connection's tracker is fetched and
    /// all the requests are handled.
    fn consume(&mut self) -> Option<()> {
        let (id, mut requests) = self.scheduler.poll()?;

        let span = tracing::info_span!("[<] outgoing", connection_id = id);
        let _guard = span.enter();

        let outgoing = match self.obufs.get_mut(id) {
            Some(v) => v,
            None => {
                debug!("Connection is already disconnected");
                return Some(());
            }
        };

        let ackslog = self.ackslog.get_mut(id).unwrap();
        let datalog = &mut self.datalog;
        let alertlog = &mut self.alertlog;

        trace!("Consuming requests");

        // We always try to ack when ever a connection is scheduled
        ack_device_data(ackslog, outgoing);

        let connection = &mut self.connections[id];

        // Keep track of temporarily skipped DataRequest
        // NOTE: VecDeque::new() doesn't allocate memory until elements are pushed
        let mut skipped_requests: VecDeque<DataRequest> = VecDeque::new();

        // A new connection's tracker is always initialized with acks request.
        // A subscribe will register data request.
        // So a new connection is always scheduled with at least one request
        for _ in 0..MAX_SCHEDULE_ITERATIONS {
            let mut request = match requests.pop_front() {
                // Handle next data or acks request
                Some(request) => request,
                // No requests in the queue. This implies that consumer data and
                // acks are completely caught up. Pending requests are registered
                // in waiters and awaiting new notifications (device or replica data)
                None => {
                    if skipped_requests.is_empty() {
                        // if no requests is in skip list, that means
                        // we have nothing left to process, i.e. we caughtup
                        self.scheduler.pause(id, PauseReason::Caughtup);
                    }
                    // add back the skipped requests!
                    self.scheduler.trackv(id, skipped_requests);
                    self.trim_read_logs();
                    return Some(());
                }
            };

            let shared_group = request
                .group
                .as_ref()
                .and_then(|name| self.shared_subscriptions.get_mut(name));

            match forward_device_data(
                &mut request,
                datalog,
                outgoing,
                alertlog,
                connection,
                shared_group,
                &self.cursor_jumps,
                &self.oversize_drops,
            ) {
                ConsumeStatus::BufferFull => {
                    requests.push_back(request);
                    self.scheduler.pause(id, PauseReason::Busy);
                    break;
                }
                ConsumeStatus::InflightFull => {
                    requests.push_back(request);
                    self.scheduler.pause(id, PauseReason::InflightFull);
                    break;
                }
                ConsumeStatus::FilterCaughtup => {
                    let filter = &request.filter;
                    trace!(filter, "Filter caughtup {filter}, parking connection");
                    self.caught_up.push(request.filter_idx);

                    // When all the data in the log is caught up, current request is
                    // registered in waiters and not added back to the tracker. This
                    // ensures that tracker.next() stops when all the requests are done
                    datalog.park(id, request);
                }
                ConsumeStatus::PartialRead => {
                    requests.push_back(request);
                }
                ConsumeStatus::SkipRequest => {
                    skipped_requests.push_back(request);
                }
            }
        }

        // Add requests back to the tracker if there are any
        requests.extend(skipped_requests);
        self.scheduler.trackv(id, requests);
        self.trim_read_logs();
        Some(())
    }

    /// echo-server patch: the logs that requests caught up with forget what
    /// all their readers have read. A log is read by the sessions holding
    /// its filter (`filter_refs`, kept sessions included); when each has
    /// its request parked at the log's end, no one will read what is before
    /// the oldest of their cursors, except a session's publishes still
    /// awaiting acknowledgement, which it reads again if it resumes
    /// (`Outgoing::oldest_inflight`). A session whose request is anywhere
    /// else (not caught up, paused on a full window or buffer, or kept
    /// while disconnected), or a shared subscription, leaves the log as
    /// it is, to rotate as before. So a QoS 0 message that every
    /// subscriber has been handed leaves the log at once (issue: 22 KiB per
    /// client at 10,000 clients publishing 1 message/s, nearly all of it
    /// read messages), and a slow reader still finds what it has not read.
    fn trim_read_logs(&mut self) {
        while let Some(idx) = self.caught_up.pop() {
            let Some(data) = self.datalog.native.get(idx) else {
                continue;
            };
            let waiters = data.waiters.waiters();
            let Some((_, first)) = waiters.front() else {
                continue;
            };
            let held = self.filter_refs.get(first.filter.as_str()).copied();
            if held != Some(waiters.len()) || waiters.iter().any(|(_, r)| r.group.is_some()) {
                continue;
            }
            let mut oldest_needed = data.log.next_offset();
            for (conn, request) in waiters {
                oldest_needed = oldest_needed.min(request.cursor);
                if request.qos > 0 {
                    let inflight = self.obufs.get(*conn).and_then(|o| o.oldest_inflight(idx));
                    oldest_needed = inflight.map_or(oldest_needed, |c| oldest_needed.min(c));
                }
            }
            self.datalog.forget_before(idx, oldest_needed);
        }
    }

    /// echo-server patch: a sweep for sessions over their queue caps, if
    /// the logs grew enough since the last one (`queues::Sweeps`).
    fn cap_queues_when_due(&mut self) {
        if self.queue_caps.is_none() {
            return;
        }
        let held = self.datalog.held_messages.load(Ordering::Relaxed);
        let appended = self.datalog.appended_bytes;
        if self.sweeps.due(held, appended) {
            let looked_at = self.cap_queues();
            let held = self.datalog.held_messages.load(Ordering::Relaxed);
            self.sweeps.done(held, appended, looked_at);
        }
    }

    /// echo-server patch: every session, connected or kept, that has more
    /// unread than `queue_caps` allows loses its oldest unread messages
    /// (`queues::cap_session`); then the logs it skipped in forget what no
    /// reader needs any more. A connected session's requests that wait at
    /// their logs' ends (parked) have nothing unread, so only those in its
    /// tracker count. Returns how many sessions and requests it looked at.
    fn cap_queues(&mut self) -> u64 {
        let caps = self.queue_caps;
        let mut skipped_in = Vec::new();
        let mut skipped = 0;
        let mut looked_at = 0;
        let datalog = &self.datalog;
        for (_, tracker) in self.scheduler.trackers.iter_mut() {
            looked_at += 1 + tracker.data_requests.len() as u64;
            let lost = cap_session(&mut tracker.data_requests, datalog, caps, &mut skipped_in);
            if lost > 0 {
                debug!(client_id = tracker.id, lost, "over its queue cap: oldest messages skipped");
            }
            skipped += lost;
        }
        for tracker in self.graveyard.trackers_mut() {
            looked_at += 1 + tracker.data_requests.len() as u64;
            skipped += cap_session(&mut tracker.data_requests, datalog, caps, &mut skipped_in);
        }
        if skipped > 0 {
            self.queue_drops.fetch_add(skipped, Ordering::Relaxed);
            skipped_in.sort_unstable();
            skipped_in.dedup();
            self.trim_logs_read_by_all(&skipped_in);
        }
        looked_at
    }

    /// echo-server patch: `logs` forget what all their readers have read,
    /// wherever their requests are: parked in the log, in a connected
    /// session's tracker, or kept with a session that is away. Only when
    /// every reader is found (`filter_refs`) and none is a shared
    /// subscription; otherwise the log is left to rotate as before. This is
    /// `trim_read_logs` for logs whose readers are not all caught up: it
    /// walks every session's requests, so it runs only after a sweep made
    /// some skip.
    fn trim_logs_read_by_all(&mut self, logs: &[FilterIdx]) {
        let mut readers = Readers::of(logs);
        let inflight = |conn: ConnectionId, request: &DataRequest| {
            (request.qos > 0)
                .then(|| self.obufs.get(conn)?.oldest_inflight(request.filter_idx))
                .flatten()
        };
        for (conn, tracker) in self.scheduler.trackers.iter() {
            for request in &tracker.data_requests {
                readers.add(request, inflight(conn, request));
            }
        }
        for tracker in self.graveyard.trackers_mut() {
            for request in &tracker.data_requests {
                readers.add(request, None);
            }
        }
        for &idx in logs {
            let Some(data) = self.datalog.native.get(idx) else {
                continue;
            };
            for (conn, request) in data.waiters.waiters() {
                readers.add(request, inflight(*conn, request));
            }
            let Some(reading) = readers.get(idx) else {
                continue;
            };
            let filter = self.datalog.log_filter(idx).map(|f| &**f);
            let held = filter.and_then(|f| self.filter_refs.get(f)).copied();
            if reading.shared || held != Some(reading.count) {
                continue;
            }
            self.datalog.forget_before(idx, reading.oldest);
        }
    }

    pub fn handle_last_will(
        &mut self,
        client_id: String,
        #[cfg(feature = "validate-tenant-prefix")] tenant_id: Option<String>,
    ) {
        #[cfg(feature = "validate-tenant-prefix")]
        let tenant_prefix = tenant_id.map(|id| format!("/tenants/{id}/"));

        let Some((will, will_props)) = self.last_wills.remove(&client_id) else {
            return;
        };

        let publish = Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: will.topic,
            pkid: 0,
            payload: will.message,
        };

        let properties = will_props.map(|props| PublishProperties {
            payload_format_indicator: props.payload_format_indicator,
            message_expiry_interval: props.message_expiry_interval,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            user_properties: props.user_properties,
            content_type: props.content_type,
            ..Default::default()
        });

        match append_will_message(
            publish,
            properties,
            &mut self.datalog,
            &mut self.notifications,
            #[cfg(feature = "validate-tenant-prefix")]
            tenant_prefix,
        ) {
            Ok(_offset) => {
                // Prepare all the consumers which are waiting for new data
                while let Some((id, request)) = self.notifications.pop_front() {
                    self.scheduler.track(id, request);
                    self.scheduler.reschedule(id, ScheduleReason::FreshData);
                }
                self.cap_queues_when_due();
            }
            Err(e) => {
                // Disconnect on bad publishes
                debug!(
                    reason = ?e, "Failed to append to commitlog"
                );
                self.router_meters.failed_publishes += 1;
                // Removed disconnect = true from here because we disconnect anyways
            }
        };
    }

    fn send_meters(&mut self) {
        let mut meters = Vec::with_capacity(10);
        if let Some(router_meter) = self.router_meters.get() {
            meters.push(Meter::Router(self.id, router_meter));
        }
        for f in self.subscription_map.keys() {
            let filter = f.to_string();
            if let Some(subscription_meter) = self.datalog.meter(f).and_then(|meter| meter.get()) {
                meters.push(Meter::Subscription(filter, subscription_meter));
            }
        }

        if !meters.is_empty() {
            for (meter_id, link) in self.meters.iter() {
                if let Err(e) = link.try_send(meters.clone()) {
                    error!(meter_id, "Failed to send meter. Error = {:?}", e);
                }
            }
        }
    }

    fn send_alerts(&mut self) {
        let alerts = self.alertlog.take();

        if !alerts.is_empty() {
            let alerts: Vec<Alert> = alerts.into();
            for (meter_id, link) in self.alerts.iter() {
                if let Err(e) = link.try_send(alerts.clone()) {
                    error!(meter_id, "Failed to send alert. Error = {:?}", e);
                }
            }
        }
    }
}

/// echo-server patch: asks a running router for a snapshot
/// (`Router::snapshot`), from any thread or task, in either placement.
#[derive(Clone)]
pub struct SnapshotHandle {
    router_tx: Sender<(ConnectionId, Event)>,
}

impl SnapshotHandle {
    /// The router's snapshot, taken between two of its events; `None` if
    /// the router is gone. Awaits room in the router's event channel and
    /// the answer without blocking the thread.
    pub async fn take(&self) -> Option<snapshot::RouterSnapshot> {
        let (tx, rx) = flume::bounded(1);
        // The connection id is not read for this event.
        self.router_tx
            .send_async((0, Event::Snapshot(tx)))
            .await
            .ok()?;
        rx.recv_async().await.ok()
    }
}

/// A session's state as persistence records it (`Router::snapshot`).
struct SessionView<'a> {
    client_id: &'a str,
    subscriptions: &'a HashSet<Filter>,
    subscription_ids: &'a HashMap<Filter, usize>,
    /// Its reads, each with the position it would resume from.
    requests: Vec<(&'a DataRequest, Offset)>,
    unacked_pubrels: Vec<u16>,
    expires_in: Option<std::time::Duration>,
    origin: Origin,
}

/// echo-server patch: persistence across restarts.
impl Router {
    /// A handle to ask this router for snapshots once it runs; take it
    /// before `spawn` or `into_task`.
    pub fn snapshot_handle(&self) -> SnapshotHandle {
        SnapshotHandle {
            router_tx: self.link(),
        }
    }

    /// What persistence keeps, now: the retained messages, and every
    /// persistent session (kept or connected) with its subscriptions and
    /// the messages it has yet to read. A connected session is recorded as
    /// `handle_disconnection` would keep it if it disconnected now (its
    /// reads rewound to its first unacknowledged publish, its expiry
    /// counted from now), without disturbing it. Copies only: message
    /// bodies are shared `Bytes`, so the cost is a walk of the sessions,
    /// their logs' tails and the retained messages.
    pub fn snapshot(&mut self) -> snapshot::RouterSnapshot {
        use snapshot::{SavedLog, SavedRequest, SavedSession, SavedSubscription};
        let now = Instant::now();
        let taken_at_ms = snapshot::unix_ms();
        let parked = self.datalog.parked_requests();
        let mut views = Vec::new();
        for saved in self.graveyard.saved() {
            let Some(state) = &saved.session_state else {
                continue;
            };
            let expires_in = saved.expires_at.map(|at| at.saturating_duration_since(now));
            if expires_in.is_some_and(|left| left.is_zero()) {
                continue;
            }
            views.push(SessionView {
                client_id: &state.tracker.id,
                subscriptions: &state.subscriptions,
                subscription_ids: &state.subscription_ids,
                requests: state
                    .tracker
                    .data_requests
                    .iter()
                    .map(|r| (r, r.cursor))
                    .collect(),
                unacked_pubrels: state.unacked_pubrels.iter().copied().collect(),
                expires_in,
                origin: state.origin,
            });
        }
        for (id, connection) in self.connections.iter() {
            if connection.session_expiry == Some(std::time::Duration::ZERO) {
                continue;
            }
            let Some(outgoing) = self.obufs.get(id) else {
                continue;
            };
            let tracked = self
                .scheduler
                .trackers
                .get(id)
                .into_iter()
                .flat_map(|t| &t.data_requests);
            let waiting = parked.get(&id).into_iter().flatten().copied();
            let retransmissions = outgoing.retransmission_map();
            let requests = tracked
                .chain(waiting)
                .map(|r| {
                    (
                        r,
                        retransmissions
                            .get(&r.filter_idx)
                            .copied()
                            .unwrap_or(r.cursor),
                    )
                })
                .collect();
            views.push(SessionView {
                client_id: &connection.client_id,
                subscriptions: &connection.subscriptions,
                subscription_ids: &connection.subscription_ids,
                requests,
                unacked_pubrels: outgoing.unacked_pubrels.iter().copied().collect(),
                expires_in: connection.session_expiry,
                origin: connection.origin,
            });
        }

        // Shared subscriptions are not persisted: their read position is
        // the group's, not the session's (see PATCHED.md).
        let persisted = |(r, _): &&(&DataRequest, Offset)| r.group.is_none();
        // Each log, read once from the oldest position a session is at.
        let mut oldest: HashMap<FilterIdx, Offset> = HashMap::new();
        for (request, cursor) in views.iter().flat_map(|v| &v.requests).filter(persisted) {
            let at = oldest.entry(request.filter_idx).or_insert(*cursor);
            *at = (*at).min(*cursor);
        }
        let mut logs = Vec::new();
        // Per log: its index in `logs` and the offsets of its messages.
        let mut read: HashMap<FilterIdx, (usize, Vec<u64>)> = HashMap::new();
        for (idx, cursor) in oldest {
            let Some(filter) = self.datalog.log_filter(idx).map(|f| f.to_string()) else {
                continue;
            };
            let (messages, offsets): (Vec<_>, Vec<_>) = self
                .datalog
                .read_from(idx, cursor)
                .into_iter()
                .map(|(data, offset)| (snapshot::save_message(&data, now), offset.1))
                .unzip();
            read.insert(idx, (logs.len(), offsets));
            logs.push(SavedLog { filter, messages });
        }

        let sessions = views
            .into_iter()
            .map(|view| {
                let mut subscriptions: Vec<SavedSubscription> = view
                    .subscriptions
                    .iter()
                    .filter(|f| extract_group(f).is_none())
                    .map(|filter| SavedSubscription {
                        filter: filter.clone(),
                        subscription_id: view.subscription_ids.get(filter).copied(),
                        request: None,
                    })
                    .collect();
                // Most sessions hold a few subscriptions: a scan finds a
                // read's; a map only for many.
                let at: Option<HashMap<&str, usize>> = (subscriptions.len() > 8).then(|| {
                    subscriptions
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (s.filter.as_str(), i))
                        .collect()
                });
                let find = |filter: &str| match &at {
                    Some(at) => at.get(filter).copied(),
                    None => subscriptions.iter().position(|s| s.filter == filter),
                };
                let mut reads = Vec::new();
                for (request, cursor) in view.requests.iter().filter(persisted) {
                    let Some(i) = find(request.filter.as_str()) else {
                        continue;
                    };
                    // Messages at or after the session's position; a
                    // position before the log's oldest message reads
                    // from that message, as `CommitLog::readv` does.
                    let queued = read.get(&request.filter_idx).map_or(0, |(_, offsets)| {
                        offsets.len() - offsets.partition_point(|o| *o < cursor.1)
                    });
                    reads.push((
                        i,
                        SavedRequest {
                            qos: request.qos,
                            forward_retained: request.forward_retained,
                            nolocal: request.nolocal,
                            preserve_retain: request.preserve_retain,
                            queued,
                        },
                    ));
                }
                for (i, read) in reads {
                    subscriptions[i].request = Some(read);
                }
                SavedSession {
                    client_id: view.client_id.to_owned(),
                    subscriptions,
                    unacked_pubrels: view.unacked_pubrels,
                    expires_in_ms: view
                        .expires_in
                        .map(|d| d.as_millis().min(u64::MAX.into()) as u64),
                    origin: view.origin,
                }
            })
            .collect();

        snapshot::RouterSnapshot {
            taken_at_ms,
            retained: self.datalog.saved_retained(now),
            logs,
            sessions,
        }
    }

    /// Brings a snapshot back, `now_ms` (milliseconds since the Unix
    /// epoch) being the time now: the time since the snapshot is taken off
    /// every expiry. Call before the router runs (`spawn`, `into_task`):
    /// the sessions are kept as if their clients had just disconnected, and
    /// resume when these reconnect without a clean start.
    pub fn restore(
        &mut self,
        snapshot: snapshot::RouterSnapshot,
        now_ms: u64,
    ) -> snapshot::RestoreCounts {
        let now = Instant::now();
        let down = std::time::Duration::from_millis(now_ms.saturating_sub(snapshot.taken_at_ms));
        let mut counts = snapshot::RestoreCounts::default();
        // New sessions get marks (No Local) that no restored message or
        // session carries.
        let marks = snapshot
            .logs
            .iter()
            .flat_map(|l| &l.messages)
            .map(|m| m.origin);
        let marks = marks.chain(snapshot.sessions.iter().map(|s| s.origin));
        self.last_origin = marks.fold(self.last_origin, Origin::max);
        for saved in snapshot.retained {
            if let Some(data) = snapshot::revive_message(saved, down, now) {
                self.datalog.restore_retained(data);
                counts.retained += 1;
            }
        }

        let mut sessions = Vec::new();
        let mut held: HashSet<&str> = HashSet::new();
        for session in &snapshot.sessions {
            let expires_in = match session.expires_in_ms {
                Some(ms) => match std::time::Duration::from_millis(ms).checked_sub(down) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => {
                        counts.expired_sessions += 1;
                        continue;
                    }
                },
                None => None,
            };
            held.extend(session.subscriptions.iter().map(|s| s.filter.as_str()));
            sessions.push((session, expires_in));
        }

        // The logs the restored sessions read; the others are not needed.
        let mut restored: HashMap<String, (FilterIdx, Vec<Offset>)> = HashMap::new();
        for log in snapshot.logs {
            if !held.contains(log.filter.as_str()) {
                continue;
            }
            let messages = log
                .messages
                .into_iter()
                .map(|m| snapshot::revive_message(m, down, now));
            let (idx, cursors) = self.datalog.restore_log(&log.filter, messages);
            restored.insert(log.filter, (idx, cursors));
        }

        for (session, expires_in) in sessions {
            let mut tracker = Tracker::new(session.client_id.clone());
            let mut subscriptions = HashSet::new();
            let mut subscription_ids = HashMap::new();
            for subscription in &session.subscriptions {
                let filter = subscription.filter.clone();
                if !subscriptions.insert(filter.clone()) {
                    continue;
                }
                self.filter_ref(&filter);
                if let Some(id) = subscription.subscription_id {
                    subscription_ids.insert(filter.clone(), id);
                }
                let Some(saved) = &subscription.request else {
                    continue;
                };
                let (filter_idx, cursor) = match restored.get(&filter) {
                    Some((idx, cursors)) => {
                        let slots = cursors.len() - 1;
                        (*idx, cursors[slots - saved.queued.min(slots)])
                    }
                    None => self.datalog.next_native_offset(&filter),
                };
                counts.queued += saved.queued;
                tracker.register_data_request(DataRequest {
                    filter,
                    filter_idx,
                    qos: saved.qos,
                    cursor,
                    read_count: 0,
                    max_count: 100,
                    forward_retained: saved.forward_retained,
                    group: None,
                    nolocal: saved.nolocal,
                    preserve_retain: saved.preserve_retain,
                    pending_retained: None,
                });
            }
            self.graveyard.save_state(
                tracker,
                subscriptions,
                subscription_ids,
                ConnectionEvents::default(),
                session.unacked_pubrels.iter().copied().collect(),
                expires_in,
                session.origin,
            );
            counts.sessions += 1;
        }
        counts
    }
}

fn append_to_commitlog(
    id: ConnectionId,
    mut publish: Publish,
    mut properties: Option<PublishProperties>,
    datalog: &mut DataLog,
    notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    connections: &mut Slab<Connection>,
    tap: Option<&Tap>,
) -> Result<Offset, RouterError> {
    let connection = connections.get_mut(id).unwrap();

    let topic_alias = properties.as_mut().and_then(|p| {
        // clear the received value as it is irrelevant while forwarding publishes
        p.topic_alias.take()
    });

    // TODO: broker should properly send the disconnect packet!
    if properties
        .as_ref()
        .is_some_and(|p| !p.subscription_identifiers.is_empty())
    {
        debug!("A PUBLISH packet sent from a Client to a Server MUST NOT contain a Subscription Identifier");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::MalformedPacket,
        ));
    }

    if let Some(alias) = topic_alias {
        validate_and_set_topic_alias(&mut publish, connection, alias)?;
    };

    let topic = std::str::from_utf8(&publish.topic)?;

    // Ensure that only clients associated with a tenant can publish to tenant's topic
    #[cfg(feature = "validate-tenant-prefix")]
    if let Some(tenant_prefix) = &connection.tenant_prefix {
        if !topic.starts_with(tenant_prefix) {
            return Err(RouterError::BadTenant(
                tenant_prefix.to_owned(),
                topic.to_owned(),
            ));
        }
    }

    // echo-server patch: the copy for a bridge (`Router::tap`).
    if let Some(tap) = tap {
        if connection.client_id != tap.exclude {
            let copy = TapMessage {
                publish: publish.clone(),
                properties: properties.clone(),
            };
            if tap.tx.try_send(copy).is_err() {
                tap.drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    if publish.payload.is_empty() {
        datalog.remove_from_retained_publishes(topic.to_owned());
    } else if publish.retain {
        datalog.insert_to_retained_publishes(publish.clone(), properties.clone(), topic.to_owned());
    }

    // echo-server patch: the log keeps the RETAIN flag as published (was:
    // cleared here), for subscriptions with Retain As Published (MQTT 5,
    // 3.8.3.1); `forward_device_data` clears it for the others.
    let pkid = publish.pkid;

    let filter_idxs = datalog.matches(topic);

    // Create a dynamic filter if dynamic_filters are enabled for this connection
    let filter_idxs = match filter_idxs {
        Some(v) => v,
        None if connection.dynamic_filters => {
            let (idx, _cursor) = datalog.next_native_offset(topic);
            vec![idx]
        }
        None => return Err(RouterError::NoMatchingFilters(topic.to_owned())),
    };

    let mut o = (0, 0);
    let origin = connection.origin;
    for filter_idx in filter_idxs {
        datalog.appended_bytes += publish_size(&publish) as u64;
        let held = &datalog.held_messages;
        let datalog = datalog.native.get_mut(filter_idx).unwrap();
        let publish_data = PublishData {
            publish: publish.clone(),
            properties: properties.clone(),
            timestamp: Instant::now(),
            origin,
        };
        let (offset, filter) = datalog.append(publish_data, notifications, held);
        debug!(
            pkid,
            "Appended to commitlog: {}[{}, {})", filter, offset.0, offset.1,
        );

        o = offset;
    }

    // error!("{:15.15}[E] {:20} topic = {}", connections[id].client_id, "no-filter", topic);
    Ok(o)
}

fn append_will_message(
    publish: Publish,
    properties: Option<PublishProperties>,
    datalog: &mut DataLog,
    notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    #[cfg(feature = "validate-tenant-prefix")] tenant_prefix: Option<String>,
) -> Result<Offset, RouterError> {
    // TODO: broker should properly send the disconnect packet!
    if properties
        .as_ref()
        .is_some_and(|p| !p.subscription_identifiers.is_empty())
    {
        debug!("A PUBLISH packet sent from a Client to a Server MUST NOT contain a Subscription Identifier");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::MalformedPacket,
        ));
    }

    let topic = std::str::from_utf8(&publish.topic)?;

    // Ensure that only clients associated with a tenant can publish to tenant's topic
    #[cfg(feature = "validate-tenant-prefix")]
    if let Some(tenant_prefix) = tenant_prefix {
        if !topic.starts_with(&tenant_prefix) {
            return Err(RouterError::BadTenant(
                tenant_prefix.to_owned(),
                topic.to_owned(),
            ));
        }
    }

    if publish.payload.is_empty() {
        datalog.remove_from_retained_publishes(topic.to_owned());
    } else if publish.retain {
        datalog.insert_to_retained_publishes(publish.clone(), properties.clone(), topic.to_owned());
    }

    // echo-server patch: the log keeps the RETAIN flag as published (was:
    // cleared here), for subscriptions with Retain As Published (MQTT 5,
    // 3.8.3.1); `forward_device_data` clears it for the others.
    let pkid = publish.pkid;

    let filter_idxs = datalog.matches(topic);

    let filter_idxs = match filter_idxs {
        Some(v) => v,
        None => return Err(RouterError::NoMatchingFilters(topic.to_owned())),
    };

    let mut o = (0, 0);
    for filter_idx in filter_idxs {
        datalog.appended_bytes += publish_size(&publish) as u64;
        let held = &datalog.held_messages;
        let datalog = datalog.native.get_mut(filter_idx).unwrap();
        let publish_data = (publish.clone(), properties.clone());
        let (offset, filter) = datalog.append(publish_data.into(), notifications, held);
        debug!(
            pkid,
            "Appended to commitlog: {}[{}, {})", filter, offset.0, offset.1,
        );

        o = offset;
    }

    Ok(o)
}

fn validate_and_set_topic_alias(
    publish: &mut Publish,
    connection: &mut Connection,
    alias: u16,
) -> Result<(), RouterError> {
    if alias == 0 || alias > TOPIC_ALIAS_MAX {
        debug!("Alias must be greater than 0 and <={TOPIC_ALIAS_MAX}");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::TopicAliasInvalid,
        ));
    }

    if publish.topic.is_empty() {
        // if publish topic is empty, publisher must have set a valid alias
        let Some(alias_topic) = connection.topic_aliases.as_ref().and_then(|a| a.get(&alias)) else {
            debug!("Empty topic name with invalid alias");
            return Err(RouterError::Disconnect(DisconnectReasonCode::ProtocolError));
        };
        // set the publish topic before further processing
        publish.topic = alias_topic.to_owned().into();
    } else {
        // if publish topic isn't empty, that means
        // publisher wants to establish new mapping for topic & alias
        let topic = std::str::from_utf8(&publish.topic)?;
        connection.topic_aliases.get_or_insert_default().insert(alias, topic.to_owned());
        trace!("set alias {alias} for topic {topic}");
    };

    Ok(())
}

/// Sweep ackslog for all the pending acks.
/// We write everything to outgoing buf with out worrying about buffer size
/// because acks most certainly won't cause memory bloat
fn ack_device_data(ackslog: &mut AckLog, outgoing: &mut Outgoing) -> bool {
    let span = tracing::info_span!("outgoing_ack", client_id = &*outgoing.client_id);
    let _guard = span.enter();

    let acks = ackslog.readv();
    if acks.is_empty() {
        debug!("No acks pending");
        return false;
    }

    let mut count = 0;
    let mut buffer = outgoing.handle.lock();

    // Unlike forwards, we are reading all the pending acks for a given connection.
    // At any given point of time, there can be a max of connection's buffer size
    // echo-server patch: was `acks.drain(..)`, which kept the drained
    // log's memory for as long as the client stays connected (0.9 KB
    // per idle client).
    for ack in std::mem::take(acks) {
        let pkid = packetid(&ack);
        trace!(pkid, "Ack added for pkid {}", pkid);
        let message = Notification::DeviceAck(ack);
        buffer.push_back(message);
        count += 1;
    }

    debug!(acks_count = count, "Acks sent to device");
    outgoing.handle.wake();
    true
}

/// echo-server patch: whether a PUBREC refuses the publish (a reason code of
/// 0x80 or more; 0x10, no matching subscribers, is a success).
fn pubrec_failed(reason: &PubRecReason) -> bool {
    !matches!(
        reason,
        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
    )
}

enum ConsumeStatus {
    /// Limit for publishes on outgoing channel reached
    BufferFull,
    /// Limit for inflight publishes on outgoing channel reached
    InflightFull,
    /// All publishes on topic forwarded
    FilterCaughtup,
    /// Some publishes on topic have been forwarded
    PartialRead,
    /// Use to indicate we want to skip the datareqest
    /// for shared subscriptions
    SkipRequest,
}

/// Sweep datalog from offset in DataRequest and updates DataRequest
/// for next sweep. Returns (busy, caughtup) status
/// Returned arguments:
/// 1. `busy`: whether the data request was completed or not.
/// 2. `done`: whether the connection was busy or not.
/// 3. `inflight_full`: whether the inflight requests were completely filled
#[allow(clippy::too_many_arguments)]
fn forward_device_data(
    request: &mut DataRequest,
    datalog: &mut DataLog,
    outgoing: &mut Outgoing,
    alertlog: &mut AlertLog,
    connection: &mut Connection,
    shared_group: Option<&mut SharedGroup>,
    cursor_jumps: &AtomicU64,
    oversize_drops: &AtomicU64,
) -> ConsumeStatus {
    let span = tracing::info_span!("outgoing_publish", client_id = &*outgoing.client_id);
    let _guard = span.enter();

    if let Some(ref shared_group) = shared_group {
        // update the request cursor to use shared cursor
        request.cursor = shared_group.cursor;
    }

    trace!(
        "Reading from datalog: {}[{}, {}]",
        request.filter,
        request.cursor.0,
        request.cursor.1
    );

    let mut inflight_slots = if request.qos != 0 {
        // for qos 1 & 2
        let len = outgoing.free_slots();
        if len == 0 {
            trace!("Aborting read from datalog: inflight capacity reached");
            return ConsumeStatus::InflightFull;
        }

        len as u64
    } else {
        datalog.config.max_outgoing_packet_count
    };

    if shared_group
        .as_ref()
        .is_some_and(|g| g.strategy == Strategy::RoundRobin)
    {
        // only read one message in case of round robin
        // so that messages get equally distributed!
        inflight_slots = 1;
    }

    let mut publishes = Vec::new();

    if request.forward_retained {
        // we only want to forward retained messages once
        request.forward_retained = false;
        // echo-server patch: those that do not fit now wait in the request
        // (was: dropped)
        let retained = datalog.read_retained_messages(&request.filter);
        if !retained.is_empty() {
            request.pending_retained = Some(Box::new(retained.into()));
        }
    }
    if let Some(pending) = request.pending_retained.as_mut() {
        let count = pending.len().min(inflight_slots as usize);
        publishes.extend(pending.drain(..count).map(|p| (p, None)));
        inflight_slots -= count as u64;
    }

    // echo-server patch: while retained messages wait, nothing is read
    // from the log (they go first), and the request is not caught up.
    let read = match request.pending_retained.as_ref() {
        Some(pending) if !pending.is_empty() => {
            let at = request.cursor;
            Ok((Position::Next { start: at, end: at }, Vec::new()))
        }
        _ => {
            request.pending_retained = None;
            let skip_origin = request.nolocal.then_some(connection.origin);
            datalog.native_readv(request.filter_idx, request.cursor, inflight_slots, skip_origin)
        }
    };
    let (next, publishes_from_datalog) = match read {
        Ok(v) => v,
        Err(e) => {
            error!(error = ?e, "Failed to read from commitlog {}", e);
            return ConsumeStatus::FilterCaughtup;
        }
    };

    publishes.extend(
        publishes_from_datalog
            .into_iter()
            .map(|(p, offset)| (p, Some(offset))),
    );

    let (start, next, caughtup) = match next {
        Position::Next { start, end } => (start, end, false),
        Position::Done { start, end } => (start, end, true),
    };

    if let Some(ref shared_group) = shared_group {
        let skip_current_client = Some(&*outgoing.client_id) != shared_group.current_client().map(String::as_str);

        if skip_current_client {
            return if caughtup {
                ConsumeStatus::FilterCaughtup
            } else {
                ConsumeStatus::SkipRequest
            };
        }
    }

    if start != request.cursor {
        let error = format!(
            "Read cursor start jumped from {:?} to {:?} on {}",
            request.cursor, start, request.filter
        );

        debug!(
            request_cursor = ?request.cursor,
            start_cursor = ?start,
            error
        );
        cursor_jumps.fetch_add(1, Ordering::Relaxed);

        let alert = alert::cursorjump(&outgoing.client_id, &request.filter, 0);
        alertlog.log(alert);
    }

    trace!(
        "Read from commitlog, cursor = {}[{}, {}), read count = {}",
        request.filter,
        next.0,
        next.1,
        publishes.len()
    );

    let qos = request.qos;
    let filter_idx = request.filter_idx;
    request.read_count += publishes.len();
    request.cursor = next;
    // println!("{:?} {:?} {}", start, next, request.read_count);

    if publishes.is_empty() {
        // echo-server patch: a read that No Local emptied is not the end
        // of the log.
        return if caughtup {
            ConsumeStatus::FilterCaughtup
        } else {
            ConsumeStatus::PartialRead
        };
    }

    let broker_topic_aliases = &mut connection.broker_topic_aliases;
    let mut topic_alias = broker_topic_aliases
        .as_ref()
        .and_then(|aliases| aliases.get_alias(&request.filter));

    let topic_alias_already_exists = topic_alias.is_some();

    // if topic alias doesn't exists, try creating new one!
    if !topic_alias_already_exists {
        topic_alias = broker_topic_aliases
            .as_mut()
            .and_then(|broker_aliases| broker_aliases.set_new_alias(&request.filter))
    }

    let subscription_id = connection.subscription_ids.get(&request.filter);
    let preserve_retain = request.preserve_retain;

    // Fill and notify device data
    let forwards = publishes
        .into_iter()
        .map(|((mut publish, mut properties), offset)| {
            // echo-server patch: MQTT delivers at the lower of the publish's
            // and the subscription's QoS (3.1.1 §3.8.4, 5.0 §3.8.4); 0.20.0
            // delivered everything at the subscription's QoS.
            let subscription_qos = protocol::qos(qos).unwrap();
            if publish.qos > subscription_qos {
                publish.qos = subscription_qos;
            }

            // echo-server patch: from the log (not a retained message sent
            // at subscription, which keeps RETAIN 1), RETAIN is 0 unless
            // the subscription has Retain As Published (3.3.1.3, 3.8.3.1).
            if offset.is_some() && !preserve_retain {
                publish.retain = false;
            }

            // if there is some topic alias to use, set it in publish properties
            if topic_alias.is_some() {
                let mut props = properties.unwrap_or_default();
                props.topic_alias = topic_alias;
                properties = Some(props);
            }

            // We want to clear topic if we are using an existing alias
            if topic_alias_already_exists {
                publish.topic.clear()
            }

            if let Some(&subscription_id) = subscription_id {
                // create new props if not already exists
                let mut props = properties.unwrap_or_default();
                props.subscription_identifiers.push(subscription_id);
                properties = Some(props);
            }

            Forward {
                cursor: offset,
                size: 0,
                publish,
                properties,
            }
        });

    let (len, inflight, dropped) = outgoing.push_forwards(forwards, qos, filter_idx);
    if dropped > 0 {
        oversize_drops.fetch_add(dropped as u64, Ordering::Relaxed);
    }

    debug!(
        inflight_count = inflight,
        forward_count = len,
        "Forwarding publishes, cursor = {}[{}, {}) forward count = {}",
        request.filter,
        request.cursor.0,
        request.cursor.1,
        len
    );

    if len >= MAX_CHANNEL_CAPACITY - 1 {
        debug!("Outgoing channel reached its capacity");
        outgoing.push_notification(Notification::Unschedule);
        outgoing.handle.wake();
        return ConsumeStatus::BufferFull;
    }

    outgoing.handle.wake();

    // update the state of shared subscription
    if let Some(share) = shared_group {
        share.update_next_client();
        // update the shared cursor
        share.cursor = request.cursor;
    }

    if caughtup {
        ConsumeStatus::FilterCaughtup
    } else {
        ConsumeStatus::PartialRead
    }
}

fn retrieve_shadow(datalog: &mut DataLog, outgoing: &mut Outgoing, shadow: ShadowRequest) {
    if let Some(reply) = datalog.shadow(&shadow.filter) {
        let publish = reply.0;
        let shadow_reply = router::ShadowReply {
            topic: publish.topic,
            payload: publish.payload,
        };

        // Fill notify shadow
        let message = Notification::Shadow(shadow_reply);
        let len = outgoing.push_notification(message);
        if len >= MAX_CHANNEL_CAPACITY - 1 {
            outgoing.push_notification(Notification::Unschedule);
        }
        outgoing.handle.wake();
    }
}

fn print_status(router: &mut Router, metrics: Print) {
    match metrics {
        Print::Config => {
            let config = router.config.clone();
            println!("{config:#?}");
        }
        Print::Router => {
            let metrics = router.router_meters.clone();
            println!("{metrics:#?}");
        }
        Print::Connection(id) => {
            let metrics = router.connection_map.get(id.as_str()).map(|v| {
                let c = router
                    .connections
                    .get(*v)
                    .map(|v| v.events.clone())
                    .unwrap();
                let t = router.scheduler.trackers.get(*v).cloned().unwrap();
                (c, t)
            });

            let metrics = match metrics {
                Some(v) => Some(v),
                None => router.graveyard.retrieve(&id).map(|v| {
                    (
                        v.metrics,
                        v.session_state
                            .map(|s| s.tracker)
                            .unwrap_or(Tracker::new(id)),
                    )
                }),
            };

            println!("{metrics:#?}");
        }
        Print::Subscriptions => {
            let metrics: HashMap<Filter, Vec<String>> = router
                .subscription_map
                .iter()
                .map(|(filter, connections)| {
                    let connections = connections
                        .iter()
                        .map(|id| router.obufs[*id].client_id.to_string())
                        .collect();

                    (filter.to_string(), connections)
                })
                .collect();

            println!("{metrics:#?}");
        }
        Print::Subscription(filter) => {
            let metrics = router.datalog.meter(&filter);
            println!("{metrics:#?}");
        }
        Print::Waiters(filter) => {
            if let Some(waiters) = router.datalog.waiters(&filter) {
                let v: Vec<(String, DataRequest)> = waiters
                    .waiters()
                    .iter()
                    .map(|(id, request)| (router.obufs[*id].client_id.to_string(), request.clone()))
                    .collect();

                println!("{v:#?}");
            }
        }
        Print::ReadyQueue => {
            let metrics = router.scheduler.readyqueue.clone();
            println!("{metrics:#?}");
        }
    };
}

fn validate_subscription(
    connection: &mut Connection,
    filter: &protocol::Filter,
) -> Result<(), RouterError> {
    trace!(
        "validate subscription = {}, tenant = {:?}",
        filter.path,
        connection.tenant_prefix
    );
    // Ensure that only client devices of the tenant can
    #[cfg(feature = "validate-tenant-prefix")]
    if let Some(tenant_prefix) = &connection.tenant_prefix {
        if !filter.path.starts_with(tenant_prefix) {
            return Err(RouterError::InvalidFilterPrefix(filter.path.to_owned()));
        }
    }

    // echo-server patch: `$` filters (`$SYS/#`) are allowed: the server
    // publishes its statistics under `$SYS` (was: the link was dropped).
    // `#` and `+` do not match `$` topics (`protocol::matches`), and the
    // server refuses clients' publishes to `$` topics.

    Ok(())
}

fn validate_clientid(client_id: &str) -> Result<(), RouterError> {
    trace!("Validating Client ID = {}", client_id,);
    // Ensure that only client devices of the tenant can
    if "+$#/".chars().any(|c| client_id.contains(c)) {
        return Err(RouterError::InvalidClientId(client_id.to_string()));
    }

    Ok(())
}

/// echo-server patch: the filter whose log a subscription reads (a shared
/// subscription reads its path's).
fn log_filter(filter: &str) -> String {
    extract_group(filter).map_or_else(|| filter.to_owned(), |(_, path)| path)
}

fn extract_group(filter: &str) -> Option<(String, String)> {
    filter.strip_prefix("$share/").and_then(|s| {
        s.split_once('/')
            .map(|(group, path)| (group.to_string(), path.to_string()))
    })
}
// #[cfg(test)]
// #[allow(non_snake_case)]
// mod test {
//     use std::{
//         thread,
//         time::{Duration, Instant},
//     };

//     use bytes::BytesMut;

//     use super::*;
//     use crate::{
//         link::local::*,
//         protocol::v4::{self, subscribe::SubscribeFilter, QoS},
//         router::ConnectionMeter,
//     };

//     /// Create a router and n connections
//     fn new_router(count: usize, clean: bool) -> (Router, VecDeque<(LinkTx, LinkRx)>) {
//         let config = RouterConfig {
//             instant_ack: true,
//             max_segment_size: 1024 * 10, // 10 KB
//             max_mem_segments: 10,
//             max_disk_segments: 0,
//             max_read_len: 128,
//             log_dir: None,
//             max_connections: 128,
//             dynamic_log: false,
//         };

//         let mut router = Router::new(0, config);
//         let link = router.link();
//         let handle = thread::spawn(move || {
//             (0..count)
//                 .map(|i| Link::new(&format!("link-{}", i), link.clone(), clean))
//                 .collect::<VecDeque<Result<_, _>>>()
//         });

//         router.run_exact(count).unwrap();
//         let links = handle
//             .join()
//             .unwrap()
//             .into_iter()
//             .map(|x| x.unwrap())
//             .collect();
//         (router, links)
//     }

//     fn reconnect(router: &mut Router, link_id: usize, clean: bool) -> (LinkTx, LinkRx) {
//         let link = router.link();
//         let handle =
//             thread::spawn(move || Link::new(&format!("link-{}", link_id), link, clean).unwrap());
//         router.run(1).unwrap();
//         handle.join().unwrap()
//     }

//     #[test]
//     fn test_graveyard_retreive_metrics_always() {
//         let (mut router, mut links) = new_router(1, false);
//         let (tx, _) = links.pop_front().unwrap();
//         let id = tx.connection_id;
//         let conn = router.connections.get_mut(id).unwrap();
//         conn.meter = ConnectionMeter {
//             publish_size: 1000,
//             publish_count: 1000,
//             subscriptions: HashSet::new(),
//             events: conn.meter.events.clone(),
//         };
//         conn.meter.push_event("graveyard-testing".to_string());
//         router.handle_disconnection(id);

//         let (tx, _) = reconnect(&mut router, 0, false);
//         let id = tx.connection_id;
//         let conn = router.connections.get_mut(id).unwrap();
//         assert_eq!(conn.meter.publish_size, 1000);
//         assert_eq!(conn.meter.publish_count, 1000);
//         assert_eq!(conn.meter.events.len(), 4);

//         let (mut router, mut links) = new_router(1, true);
//         let (tx, _) = links.pop_front().unwrap();
//         let id = tx.connection_id;
//         let conn = router.connections.get_mut(id).unwrap();
//         conn.meter = ConnectionMeter {
//             publish_size: 1000,
//             publish_count: 1000,
//             subscriptions: HashSet::new(),
//             events: conn.meter.events.clone(),
//         };
//         conn.meter.push_event("graveyard-testing".to_string());
//         router.handle_disconnection(id);

//         let (tx, _) = reconnect(&mut router, 0, true);
//         let id = tx.connection_id;
//         let conn = router.connections.get_mut(id).unwrap();
//         assert_eq!(conn.meter.publish_size, 1000);
//         assert_eq!(conn.meter.publish_count, 1000);
//         assert_eq!(conn.meter.events.len(), 4);
//     }

//     #[test]
//     #[should_panic]
//     fn test_blocking_too_many_connections() {
//         new_router(512, true);
//     }

//     #[test]
//     fn test_not_clean_sessions() {
//         // called once per data push (subscribe to 2 topics in our case)
//         // called once per each sub topic
//         // if prepare_data_request called, then Tracker::register_data_request is also called so
//         // no need to check separately for that

//         let (mut router, mut links) = new_router(2, false);
//         let (tx1, mut rx1) = links.pop_front().unwrap();
//         let id1 = tx1.connection_id;
//         let (tx2, mut rx2) = links.pop_front().unwrap();
//         let id2 = tx2.connection_id;

//         // manually subscribing to avoid calling Router::run(), so that we can see and test changes
//         // in Router::readyqueue.
//         let mut buf = BytesMut::new();
//         v4::subscribe::write(
//             vec![
//                 SubscribeFilter::new("hello/1/world".to_string(), QoS::AtMostOnce),
//                 SubscribeFilter::new("hello/2/world".to_string(), QoS::AtMostOnce),
//             ],
//             0,
//             &mut buf,
//         )
//         .unwrap();
//         let buf = buf.freeze();
//         {
//             let incoming = router.ibufs.get_mut(id1).unwrap();
//             let mut recv_buf = incoming.buffer.lock();
//             recv_buf.push_back(buf.clone());
//             assert_eq!(router.subscription_map.len(), 0);
//         }
//         {
//             let incoming = router.ibufs.get_mut(id2).unwrap();
//             let mut recv_buf = incoming.buffer.lock();
//             recv_buf.push_back(buf.clone());
//             assert_eq!(router.subscription_map.len(), 0);
//         }

//         router.handle_device_payload(id1);
//         assert_eq!(router.subscription_map.len(), 2);
//         assert_eq!(router.readyqueue.len(), 1);
//         router.consume(id1);
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             1
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             1
//         );

//         router.handle_device_payload(id2);
//         assert_eq!(router.subscription_map.len(), 2);
//         assert_eq!(router.readyqueue.len(), 2);
//         router.consume(id2);
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );

//         assert!(matches!(rx1.recv().unwrap(), Some(Notification::DeviceAck(_))));
//         assert!(matches!(rx2.recv().unwrap(), Some(Notification::DeviceAck(_))));

//         router.handle_disconnection(id1);
//         router.handle_disconnection(id2);
//         router.run(1).unwrap();

//         let (_, _) = reconnect(&mut router, 0, false);
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             1
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             1
//         );

//         let (_, _) = reconnect(&mut router, 1, false);
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//     }

//     #[test]
//     fn test_publish_appended_to_commitlog() {
//         let (mut router, mut links) = new_router(2, true);
//         let (mut sub_tx, _) = links.pop_front().unwrap();
//         let (mut pub_tx, _) = links.pop_front().unwrap();

//         sub_tx.subscribe("hello/1/world").unwrap();
//         router.run(1).unwrap();

//         // Each LinkTx::publish creates a single new event
//         for _ in 0..10 {
//             pub_tx.publish("hello/1/world", b"hello".to_vec()).unwrap();
//         }
//         router.run(1).unwrap();
//         assert_eq!(router.datalog.next_native_offset("hello/1/world").1, (0, 10));
//     }

//     #[test]
//     fn test_adding_caughtups_to_waiters() {
//         // number of times forward_device_data hit
//         //     = router.run times * topics * subscribers per topic
//         //     = 2 * 2 * 2 = 8
//         //
//         // we also call consume 2 times per subsriber, and one time it will call
//         // forward_device_data again, but no data will actually be forwarded.
//         // as 256 publishes at once, and router's config only reads 128 at a time, data needs to be
//         // read from same log twice, and thus half of the times the data reading is not done

//         let (mut router, mut links) = new_router(4, true);
//         let (mut sub1_tx, _) = links.pop_front().unwrap();
//         let (mut pub1_tx, _) = links.pop_front().unwrap();
//         let (mut sub2_tx, _) = links.pop_front().unwrap();
//         let (mut pub2_tx, _) = links.pop_front().unwrap();
//         sub1_tx.subscribe("hello/1/world").unwrap();
//         sub1_tx.subscribe("hello/2/world").unwrap();
//         sub2_tx.subscribe("hello/1/world").unwrap();
//         sub2_tx.subscribe("hello/2/world").unwrap();
//         router.run(1).unwrap();

//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );

//         for _ in 0..256 {
//             pub1_tx.publish("hello/1/world", b"hello".to_vec()).unwrap();
//             pub2_tx.publish("hello/2/world", b"hello".to_vec()).unwrap();
//         }
//         router.run(1).unwrap();

//         let tracker = router.trackers.get(sub1_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 2);
//         let tracker = router.trackers.get(sub2_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 2);

//         router.run(1).unwrap();

//         let tracker = router.trackers.get(sub1_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 2);
//         let tracker = router.trackers.get(sub2_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 2);

//         router.consume(sub1_tx.connection_id);
//         router.consume(sub2_tx.connection_id);

//         let tracker = router.trackers.get(sub1_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 1);
//         let tracker = router.trackers.get(sub2_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 1);

//         router.consume(sub1_tx.connection_id);
//         router.consume(sub2_tx.connection_id);

//         let tracker = router.trackers.get(sub1_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 0);
//         let tracker = router.trackers.get(sub2_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 0);

//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//     }

//     #[test]
//     fn test_disconnect_invalid_sub() {
//         let (mut router, mut links) = new_router(3, true);

//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         tx.subscribe("$hello/world").unwrap();
//         router.run(1).unwrap();
//         assert!(matches!(rx.recv(), Err(LinkError::Recv(flume::RecvError::Disconnected))));

//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         tx.subscribe("test/hello").unwrap();
//         router.run(1).unwrap();
//         assert!(matches!(rx.recv(), Err(LinkError::Recv(flume::RecvError::Disconnected))));
//     }

//     #[test]
//     fn test_disconnect_invalid_pub() {
//         let (mut router, mut links) = new_router(1, true);
//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         tx.publish("invalid/topic", b"hello".to_vec()).unwrap();
//         router.run(1).unwrap();
//         assert!(matches!(rx.recv(), Err(LinkError::Recv(flume::RecvError::Disconnected))));
//     }

//     #[test]
//     fn test_pingreq() {
//         let (mut router, mut links) = new_router(1, true);
//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         let mut buf = BytesMut::new();
//         mqttbytes::v4::PingReq.write(&mut buf).unwrap();
//         let buf = buf.freeze();
//         for _ in 0..10 {
//             tx.push(buf.clone()).unwrap();
//         }
//         router.run(1).unwrap();
//         for _ in 0..10 {
//             let ret = rx.recv().unwrap().unwrap();
//             assert!(matches!(ret, Notification::DeviceAck(Ack::PingResp)));
//         }
//     }

//     #[test]
//     fn test_disconnect() {
//         let (mut router, mut links) = new_router(1, true);
//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         let mut buf = BytesMut::new();
//         mqttbytes::v4::Disconnect.write(&mut buf).unwrap();
//         let buf = buf.freeze();
//         tx.push(buf).unwrap();
//         router.run(1).unwrap();
//         assert!(matches!(rx.recv(), Err(LinkError::Recv(flume::RecvError::Disconnected))));
//     }

//     #[test]
//     fn test_connection_in_qos1() {
//         // connection as in crate::connection::Connection struct should get filled for all unacked,
//         // and refuse to add more packets than unacked.

//         let config = RouterConfig {
//             instant_ack: true,
//             max_segment_size: 1024 * 10, // 10 KB
//             max_mem_segments: 10,
//             max_disk_segments: 0,
//             max_read_len: 256,
//             log_dir: None,
//             max_connections: 128,
//             dynamic_log: false,
//         };

//         let mut router = Router::new(0, config);
//         let link = router.link();
//         let handle = thread::spawn(move || {
//             (0..2)
//                 .map(|i| Link::new(&format!("link-{}", i), link.clone(), true))
//                 .collect::<VecDeque<Result<_, _>>>()
//         });

//         router.run(2).unwrap();
//         let mut links: VecDeque<(LinkTx, LinkRx)> = handle
//             .join()
//             .unwrap()
//             .into_iter()
//             .map(|x| x.unwrap())
//             .collect();

//         let (mut sub_tx, _sub_rx) = links.pop_front().unwrap();
//         let (mut pub_tx, _) = links.pop_front().unwrap();

//         let mut buf = BytesMut::new();
//         mqttbytes::v4::Subscribe::new("hello/1/world", mqttbytes::QoS::AtLeastOnce)
//             .write(&mut buf)
//             .unwrap();
//         let buf = buf.freeze();
//         sub_tx.push(buf).unwrap();
//         router.run(1).unwrap();

//         for _ in 0..202 {
//             pub_tx.publish("hello/1/world", b"hello".to_vec()).unwrap();
//         }
//         router.run(1).unwrap();

//         let id = sub_tx.connection_id;
//         let tracker = router.trackers.get(id).unwrap();
//         assert_eq!(tracker.get_data_requests().front().unwrap().cursor, (0, 200));
//     }

//     #[test]
//     #[ignore]
//     fn test_resend_in_qos1() {
//         unimplemented!("we don't resend QoS1 packets yet")
//     }

//     #[test]
//     fn test_wildcard_subs() {
//         let (mut router, mut links) = new_router(3, true);

//         let (mut sub1_tx, mut sub1_rx) = links.pop_front().unwrap();
//         sub1_tx.subscribe("#").unwrap();

//         let (mut sub2_tx, mut sub2_rx) = links.pop_front().unwrap();
//         sub2_tx.subscribe("hello/+/world").unwrap();

//         let (mut pub_tx, mut _pub_rx) = links.pop_front().unwrap();
//         for _ in 0..10 {
//             for i in 0..10 {
//                 pub_tx
//                     .publish(format!("hello/{}/world", i), b"hello".to_vec())
//                     .unwrap();
//             }
//         }

//         for _ in 0..10 {
//             pub_tx.publish("hello/world", b"hello".to_vec()).unwrap();
//         }

//         router.run(1).unwrap();

//         let mut count = 0;
//         while let Ok(Some(notification)) =
//             sub1_rx.recv_deadline(Instant::now() + Duration::from_millis(1))
//         {
//             match notification {
//                 Notification::Forward { .. } => count += 1,
//                 _ => {}
//             }
//         }
//         assert_eq!(count, 110);

//         count = 0;
//         while let Ok(Some(notification)) =
//             sub2_rx.recv_deadline(Instant::now() + Duration::from_millis(1))
//         {
//             match notification {
//                 Notification::Forward { .. } => count += 1,
//                 _ => {}
//             }
//         }
//         assert_eq!(count, 100);
//     }
// }

// // #[cfg(test)]
// // mod test {
// //     use crate::connection::Connection;
// //     use crate::link::local::{Link, LinkRx, LinkTx};
// //     use crate::tracker::Tracker;
// //     use crate::{ConnectionId, Notification, Router, RouterConfig};
// //     use bytes::BytesMut;
// //     use flume::Receiver;
// //     use mqttbytes::v4::{Publish, Subscribe};
// //     use mqttbytes::QoS;
// //     use std::collections::VecDeque;
// //     use std::sync::atomic::AtomicBool;
// //     use std::sync::Arc;
// //     use std::thread;

// //     /// Create a router and n connections
// //     fn router(count: usize) -> (Router, VecDeque<(LinkTx, LinkRx)>) {
// //         let config = RouterConfig {
// //             data_filter: "hello/world".to_owned(),
// //             wildcard_filters: vec![],
// //             instant_ack: true,
// //             max_segment_size: 10 * 1024,
// //             max_segment_count: 10 * 1024,
// //             max_connections: 10,
// //         };

// //         let mut router = Router::new(0, config);
// //         let link = router.link();
// //         let handle = thread::spawn(move || {
// //             (0..count)
// //                 .map(|i| Link::new(&format!("link-{}", i), link.clone()).unwrap())
// //                 .collect()
// //         });

// //         router.run(count).unwrap();
// //         let links = handle.join().unwrap();
// //         (router, links)
// //     }

// //     /// Creates a connection
// //     fn connection(client_id: &str, clean: bool) -> (Connection, Receiver<Notification>) {
// //         let (tx, rx) = flume::bounded(10);
// //         let connection = Connection::new(client_id, clean, tx, Arc::new(AtomicBool::new(false)));
// //         (connection, rx)
// //     }

// //     /// Raw publish message
// //     fn publish(topic: &str) -> BytesMut {
// //         let mut publish = Publish::new(topic, QoS::AtLeastOnce, vec![1, 2, 3]);
// //         publish.pkid = 1;

// //         let mut o = BytesMut::new();
// //         publish.write(&mut o).unwrap();
// //         o
// //     }

// //     /// Raw publish message
// //     fn subscribe(topic: &str) -> BytesMut {
// //         let mut subscribe = Subscribe::new(topic, QoS::AtLeastOnce);
// //         subscribe.pkid = 1;

// //         let mut o = BytesMut::new();
// //         subscribe.write(&mut o).unwrap();
// //         o
// //     }

// //     /// When there is new data on a subscription's commitlog, it's
// //     /// consumer should start triggering data requests to pull data
// //     /// from commitlog
// //     #[test]
// //     fn new_connection_data_triggers_acks_of_self_and_data_of_consumer() {
// //         let (mut router, mut links) = router(2);
// //         let (mut l1tx, _l1rx) = links.pop_front().unwrap();
// //         let (mut l2tx, l2rx) = links.pop_front().unwrap();

// //         l2tx.subscribe("hello/world").unwrap();
// //         l1tx.publish("hello/world", vec![1, 2, 3]).unwrap();
// //         let _ = router.run(1);

// //         // Suback
// //         match l2rx.recv().unwrap() {
// //             Notification::DeviceAcks(_) => {}
// //             v => panic!("{:?}", v),
// //         }

// //         // Consumer data
// //         match l2rx.recv().unwrap() {
// //             Notification::DeviceData { cursor, .. } => assert_eq!(cursor, (0, 1)),
// //             v => panic!("{:?}", v),
// //         }

// //         // No acks for qos0 publish
// //     }

// //     #[test]
// //     fn half_open_connections_are_handled_correctly() {
// //         let config = RouterConfig {
// //             data_filter: "hello/world".to_owned(),
// //             wildcard_filters: vec![],
// //             instant_ack: true,
// //             max_segment_size: 10 * 1024,
// //             max_segment_count: 10 * 1024,
// //             max_connections: 10,
// //         };

// //         let mut router = Router::new(0, config);
// //         let (c, rx) = connection("test", true);
// //         router.handle_new_connection(c);

// //         let id = *router.connection_map.get("test").unwrap();
// //         router.handle_device_payload(id, subscribe("hello/data"));
// //         router.handle_device_payload(id, publish("hello/data"));

// //         let trackers = router.trackers.get(id).unwrap();
// //         assert!(trackers.get_data_requests().len() > 0);
// //         dbg!(trackers);

// //         // A new connection with same client id
// //         let (c, rx) = connection("test", true);
// //         router.handle_new_connection(c);

// //         let id = *router.connection_map.get("test").unwrap();
// //         let trackers = router.trackers.get(id).unwrap();
// //         dbg!(trackers);
// //     }
// // }

#[cfg(test)]
mod echo_server_patch {
    use super::{FilterEvent, Router};
    use crate::local::LinkBuilder;
    use crate::RouterConfig;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    fn router() -> Router {
        Router::new(
            0,
            RouterConfig {
                max_segment_size: 1024,
                max_connections: 10,
                max_segment_count: 10,
                max_outgoing_packet_count: 1024,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        )
    }

    /// The tap copies every publish the router appends, but the excluded
    /// link's, and drops (counting) what does not fit; filter events say
    /// when a filter gets its first subscriber and loses its last.
    #[test]
    fn the_tap_and_filter_events() {
        let mut router = router();
        let (tap, drops) = router.tap(2, "bridge");
        let filters = router.filter_events();
        let router_tx = router.spawn();
        let link = |id: &str| {
            LinkBuilder::new(id, router_tx.clone())
                .clean_session(true)
                .dynamic_filters(false)
                .build()
                .unwrap()
        };
        #[track_caller]
        fn recv(rx: &flume::Receiver<FilterEvent>) -> FilterEvent {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("a filter event")
        }
        let (mut one, _one_rx, _) = link("one");
        let (mut two, _two_rx, _) = link("two");
        let (mut bridge, _bridge_rx, _) = link("bridge");
        one.subscribe("a/+").unwrap();
        assert_eq!(recv(&filters), FilterEvent::Held("a/+".into()), "first");
        two.subscribe("a/+").unwrap();
        two.subscribe("$share/g/b").unwrap();
        assert_eq!(recv(&filters), FilterEvent::Held("b".into()), "one event per filter, the share stripped");
        one.publish("a/x", "from one").unwrap();
        bridge.publish("a/x", "from the bridge").unwrap();
        two.publish("nobody/here", "from two").unwrap();
        let first = tap.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(&first.publish.payload[..], b"from one");
        let second = tap.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(&second.publish.payload[..], b"from two", "the bridge's own is not copied");
        // Two places: the third copy waits, the fourth is dropped.
        for n in 0..4 {
            one.publish("a/x", format!("{n}")).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while drops.load(std::sync::atomic::Ordering::Relaxed) < 2 {
            assert!(std::time::Instant::now() < deadline, "drops not counted");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(tap.len(), 2);
        two.unsubscribe("a/+").unwrap();
        let bye = crate::protocol::Disconnect {
            reason_code: crate::protocol::DisconnectReasonCode::NormalDisconnection,
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime
            .block_on(one.send(crate::protocol::Packet::Disconnect(bye, None)))
            .unwrap();
        // `one` leaving frees `a/+` (two had let go of it first).
        assert_eq!(recv(&filters), FilterEvent::Freed("a/+".into()));
        assert!(filters.try_recv().is_err());
    }

    /// A session that never reads, connected or kept, holds the logs to
    /// its queue cap, not to each log's bound: what it would lose to the
    /// logs' rotation anyway it loses earlier, counted, and the logs forget
    /// it (no one else reads them).
    #[test]
    fn sessions_that_never_read_are_held_to_their_queue_caps() {
        // Logs of ~14,000 messages each: their own bound is far off.
        let mut router = Router::new(
            0,
            RouterConfig {
                max_segment_size: 64 * 1024,
                max_connections: 10,
                max_segment_count: 10,
                max_outgoing_packet_count: 200,
                ..RouterConfig::default()
            },
        );
        let cap = 300;
        let drops = router.queue_caps(crate::QueueCaps {
            messages: cap,
            bytes: u64::MAX,
        });
        let held = router.log_messages();
        let router_tx = router.spawn();
        let link = |id: &str, clean: bool| {
            LinkBuilder::new(id, router_tx.clone())
                .clean_session(clean)
                .dynamic_filters(false)
                .build()
                .unwrap()
        };
        let (mut kept, _kept_rx, _) = link("kept", false);
        let (mut connected, _connected_rx, _) = link("connected", true);
        for topic in 0..5 {
            kept.subscribe(format!("k/{topic}")).unwrap();
            connected.subscribe(format!("c/{topic}")).unwrap();
        }
        let bye = crate::protocol::Disconnect {
            reason_code: crate::protocol::DisconnectReasonCode::NormalDisconnection,
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime
            .block_on(kept.send(crate::protocol::Packet::Disconnect(bye, None)))
            .unwrap();

        let (mut publisher, _publisher_rx, _) = link("publisher", true);
        let published = 2_000 * 10;
        for n in 0..2_000 {
            for topic in 0..5 {
                publisher.publish(format!("k/{topic}"), format!("{n:040}")).unwrap();
                publisher.publish(format!("c/{topic}"), format!("{n:040}")).unwrap();
            }
        }
        // Each session keeps at most `cap` unread, and the connected one
        // has at most its outgoing buffer's worth handed over: all the rest
        // was dropped. Between two sweeps the logs may gain up to 256 more.
        let bound = 2 * cap + 256;
        let lowest_drops = published - bound - 2 * crate::router::MAX_CHANNEL_CAPACITY as u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while drops.load(Ordering::Relaxed) < lowest_drops {
            assert!(std::time::Instant::now() < deadline, "drops {drops:?}, held {held:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let now_held = held.load(Ordering::Relaxed);
        assert!(now_held <= bound, "the logs hold {now_held} messages");
        assert!(now_held >= cap, "the kept session's newest {cap} are still there: {now_held}");
    }
}
