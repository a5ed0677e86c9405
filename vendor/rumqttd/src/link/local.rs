use crate::protocol::{
    Filter, LastWill, LastWillProperties, Packet, Publish, QoS, RetainForwardRule, Subscribe,
    Unsubscribe,
};
use crate::link::outbox::{Outbox, WaitError};
use crate::router::Ack;
use crate::router::{
    iobufs::{Incoming, Outgoing},
    Connection, Event, Notification, ShadowRequest,
};
use crate::ConnectionId;
use bytes::Bytes;
use flume::{RecvError, RecvTimeoutError, SendError, Sender, TrySendError};
use parking_lot::lock_api::MutexGuard;
use parking_lot::{Mutex, RawMutex};

use std::collections::VecDeque;
use std::mem;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Channel timeout recv error")]
    RecvTimeout(#[from] RecvTimeoutError),
    #[error("Timeout = {0}")]
    Elapsed(#[from] tokio::time::error::Elapsed),
}

// used to build LinkTx and LinkRx
pub struct LinkBuilder<'a> {
    tenant_id: Option<String>,
    client_id: &'a str,
    router_tx: Sender<(ConnectionId, Event)>,
    // true by default
    clean_session: bool,
    last_will: Option<LastWill>,
    last_will_properties: Option<LastWillProperties>,
    // false by default
    dynamic_filters: bool,
    // default to 0, indicating to not use topic alias
    topic_alias_max: u16,
    // echo-server patch: unset, the session's expiry follows `clean_session`
    session_expiry: Option<Option<std::time::Duration>>,
    // echo-server patch: the client's MQTT 5 Receive Maximum and Maximum
    // Packet Size, unset when it announced none
    receive_maximum: Option<u16>,
    max_packet_size: Option<u32>,
}

impl<'a> LinkBuilder<'a> {
    pub fn new(client_id: &'a str, router_tx: Sender<(ConnectionId, Event)>) -> Self {
        LinkBuilder {
            client_id,
            router_tx,
            tenant_id: None,
            clean_session: true,
            last_will: None,
            last_will_properties: None,
            dynamic_filters: false,
            topic_alias_max: 0,
            session_expiry: None,
            receive_maximum: None,
            max_packet_size: None,
        }
    }

    /// echo-server patch: the client's Receive Maximum (MQTT 5
    /// §3.1.2.11.3): the router sends it at most this many QoS 1 and 2
    /// publishes unacknowledged (and never more than its own limit, 100).
    /// Without this call, 100.
    pub fn receive_maximum(mut self, max: Option<u16>) -> Self {
        self.receive_maximum = max;
        self
    }

    /// echo-server patch: the client's Maximum Packet Size (MQTT 5
    /// §3.1.2.11.4): the router does not send it a publish whose MQTT 5
    /// packet would be larger (it counts it in `Router::oversize_drops`).
    /// Without this call, no limit.
    pub fn max_packet_size(mut self, max: Option<u32>) -> Self {
        self.max_packet_size = max;
        self
    }

    /// echo-server patch: the router's outgoing state for this client, with
    /// its limits (shared by `build` and `build_async`).
    fn outgoing(
        client_id: Arc<str>,
        receive_maximum: Option<u16>,
        max_packet_size: Option<u32>,
    ) -> (Outgoing, Arc<Outbox>) {
        let (mut outgoing, link_rx) = Outgoing::new(client_id);
        if let Some(max) = receive_maximum {
            outgoing.limit_inflight(max);
        }
        if let Some(max) = max_packet_size {
            outgoing.limit_packet_size(max);
        }
        (outgoing, link_rx)
    }

    /// echo-server patch: how long the router keeps the session after the
    /// client disconnects (MQTT 5's session expiry interval): `Some(ZERO)`
    /// not at all, `None` for ever. Without this call, a clean session ends
    /// at disconnection and any other lasts for ever, as in MQTT 3.1.1.
    /// Whether the session *starts* clean is `clean_session`'s business.
    pub fn session_expiry(mut self, expiry: Option<std::time::Duration>) -> Self {
        self.session_expiry = Some(expiry);
        self
    }

    pub fn tenant_id(mut self, tenant_id: Option<String>) -> Self {
        self.tenant_id = tenant_id;
        self
    }

    pub fn last_will(mut self, last_will: Option<LastWill>) -> Self {
        self.last_will = last_will;
        self
    }

    pub fn last_will_properties(
        mut self,
        last_will_properties: Option<LastWillProperties>,
    ) -> Self {
        self.last_will_properties = last_will_properties;
        self
    }

    pub fn topic_alias_max(mut self, max: u16) -> Self {
        self.topic_alias_max = max;
        self
    }

    pub fn clean_session(mut self, clean: bool) -> Self {
        self.clean_session = clean;
        self
    }

    pub fn dynamic_filters(mut self, dynamic_filters: bool) -> Self {
        self.dynamic_filters = dynamic_filters;
        self
    }

    pub fn build(self) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        // Connect to router
        // Local connections to the router shall have access to all subscriptions
        let mut connection = Connection::new(
            self.tenant_id,
            self.client_id.to_owned(),
            self.clean_session,
            self.dynamic_filters,
        );

        connection
            .last_will(self.last_will, self.last_will_properties)
            .topic_alias_max(self.topic_alias_max);
        if let Some(expiry) = self.session_expiry {
            connection.session_expiry = expiry;
        }
        // echo-server patch: one copy of the client id for both (see
        // `Incoming::client_id`)
        let client_id: Arc<str> = Arc::from(connection.client_id.as_str());
        let incoming = Incoming::new(client_id.clone());
        let (outgoing, link_rx) = Self::outgoing(
            client_id,
            self.receive_maximum,
            self.max_packet_size,
        );
        let incoming_data_buffer = incoming.buffer();

        let event = Event::Connect {
            connection,
            incoming,
            outgoing,
        };

        self.router_tx.send((0, event))?;

        link_rx.wait(None).map_err(|_| RecvError::Disconnected)?;
        Self::finish(self.router_tx, link_rx, incoming_data_buffer)
    }

    /// echo-server patch: `build` without blocking the calling thread. The
    /// router's answer is awaited as a future (flume's async receive), so a
    /// single-threaded event loop can register clients while it keeps
    /// serving the others. (The answer was awaited through flume; now
    /// through the link's outbox, see `link::outbox`.)
    pub async fn build_async(self) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        let mut connection = Connection::new(
            self.tenant_id,
            self.client_id.to_owned(),
            self.clean_session,
            self.dynamic_filters,
        );
        connection
            .last_will(self.last_will, self.last_will_properties)
            .topic_alias_max(self.topic_alias_max);
        if let Some(expiry) = self.session_expiry {
            connection.session_expiry = expiry;
        }
        // echo-server patch: one copy of the client id for both (see
        // `Incoming::client_id`)
        let client_id: Arc<str> = Arc::from(connection.client_id.as_str());
        let incoming = Incoming::new(client_id.clone());
        let (outgoing, link_rx) = Self::outgoing(
            client_id,
            self.receive_maximum,
            self.max_packet_size,
        );
        let incoming_data_buffer = incoming.buffer();
        let event = Event::Connect { connection, incoming, outgoing };
        self.router_tx.send_async((0, event)).await?;
        link_rx.wait_async().await.map_err(|_| RecvError::Disconnected)?;
        Self::finish(self.router_tx, link_rx, incoming_data_buffer)
    }

    /// The part of `build` after the router answered (echo-server patch:
    /// shared by `build` and `build_async`).
    fn finish(
        router_tx: Sender<(ConnectionId, Event)>,
        link_rx: Arc<Outbox>,
        incoming_data_buffer: Arc<Mutex<VecDeque<Packet>>>,
    ) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        // echo-server patch: the whole queue is taken, not just the
        // CONNACK: wake-ups coalesce (`link::outbox`), so what the router
        // queued with it (a resumed session's publishes) would get no
        // wake-up of its own. The rest is the link's first batch.
        let mut queue = link_rx.take();
        let notification = queue.pop_front().unwrap();

        // Right now link identifies failure with dropped rx in router,
        // which is probably ok. We need this here to get id assigned by router
        let id = match notification {
            Notification::DeviceAck(Ack::ConnAck(id, ..)) => id,
            _message => return Err(LinkError::NotConnectionAck),
        };

        let tx = LinkTx::new(id, router_tx.clone(), incoming_data_buffer);
        let mut rx = LinkRx::new(id, router_tx, link_rx);
        if !queue.is_empty() {
            rx.cache = queue;
        }
        Ok((tx, rx, notification))
    }
}

/// echo-server patch: when the router takes a link's queue of incoming
/// packets and finds at least this many, it wakes the link's `LinkRx` (an
/// empty notification: `next` returns `Ok(None)`). A session that stops
/// reading its client while the queue is this long or longer learns so when
/// to read again, without polling.
pub const QUEUE_DRAINED_WAKE: usize = 64;

pub struct LinkTx {
    pub(crate) connection_id: ConnectionId,
    router_tx: Sender<(ConnectionId, Event)>,
    recv_buffer: Arc<Mutex<VecDeque<Packet>>>,
}

impl LinkTx {
    pub fn new(
        connection_id: ConnectionId,
        router_tx: Sender<(ConnectionId, Event)>,
        recv_buffer: Arc<Mutex<VecDeque<Packet>>>,
    ) -> LinkTx {
        LinkTx {
            connection_id,
            router_tx,
            recv_buffer,
        }
    }

    pub fn buffer(&self) -> MutexGuard<RawMutex, VecDeque<Packet>> {
        self.recv_buffer.lock()
    }

    /// Send raw device data
    fn push(&mut self, data: Packet) -> Result<usize, LinkError> {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };

        self.router_tx
            .send((self.connection_id, Event::DeviceData))?;

        Ok(len)
    }

    /// Send raw device data
    pub async fn send(&mut self, data: Packet) -> Result<usize, LinkError> {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };

        self.router_tx
            .send((self.connection_id, Event::DeviceData))?;

        Ok(len)
    }

    fn try_push(&mut self, data: Packet) -> Result<usize, LinkError> {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };

        self.router_tx
            .try_send((self.connection_id, Event::DeviceData))?;
        Ok(len)
    }

    /// echo-server patch: public. Tells the router the link's queue has
    /// packets, awaiting room in its event channel; for a caller that fills
    /// the queue itself (`buffer()`) and must not block the thread while
    /// the channel is full, as `send` does.
    pub async fn notify(&mut self) -> Result<(), LinkError> {
        self.router_tx
            .send_async((self.connection_id, Event::DeviceData))
            .await?;

        Ok(())
    }

    /// echo-server patch: `notify` as a future that borrows nothing, for a
    /// caller that cannot wait itself (a destructor) and hands the wait to
    /// a task of its own. With the router running as a task on the same
    /// thread (`Router::into_task`), blocking on a full channel, as `send`
    /// does, would wait for ever.
    pub fn notify_owned(
        &self,
    ) -> impl std::future::Future<Output = Result<(), LinkError>> + Send + 'static {
        let wake = self
            .router_tx
            .clone()
            .into_send_async((self.connection_id, Event::DeviceData));
        async move {
            wake.await?;
            Ok(())
        }
    }

    /// Sends a MQTT Publish to the router
    pub fn publish<S, V>(&mut self, topic: S, payload: V) -> Result<usize, LinkError>
    where
        S: Into<Bytes>,
        V: Into<Bytes>,
    {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            pkid: 0,
            payload: payload.into(),
        };

        let len = self.push(Packet::Publish(publish, None))?;
        Ok(len)
    }

    /// Sends a MQTT Publish to the router
    pub fn try_publish<S, V>(&mut self, topic: S, payload: V) -> Result<usize, LinkError>
    where
        S: Into<Bytes>,
        V: Into<Bytes>,
    {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            pkid: 0,
            payload: payload.into(),
        };

        let len = self.try_push(Packet::Publish(publish, None))?;
        // TODO: Remote item in buffer after failure and write unittest
        Ok(len)
    }

    /// Sends a MQTT Subscribe to the eventloop
    pub fn subscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let filters = vec![Filter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        }];

        let subscribe = Subscribe { pkid: 0, filters };

        let len = self.push(Packet::Subscribe(subscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Subscribe to the eventloop
    pub fn try_subscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let filters = vec![Filter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        }];

        let subscribe = Subscribe { pkid: 0, filters };

        let len = self.try_push(Packet::Subscribe(subscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Unsubscribe to the eventloop
    pub fn unsubscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let unsubscribe = Unsubscribe {
            pkid: 0,
            filters: vec![filter.into()],
        };

        let len = self.push(Packet::Unsubscribe(unsubscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Unsubscribe to the eventloop
    pub fn try_unsubscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let unsubscribe = Unsubscribe {
            pkid: 0,
            filters: vec![filter.into()],
        };

        let len = self.try_push(Packet::Unsubscribe(unsubscribe, None))?;
        Ok(len)
    }

    /// Request to get device shadow
    pub fn shadow<S: Into<String>>(&mut self, filter: S) -> Result<(), LinkError> {
        let message = Event::Shadow(ShadowRequest {
            filter: filter.into(),
        });

        self.router_tx.try_send((self.connection_id, message))?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct LinkRx {
    connection_id: ConnectionId,
    router_tx: Sender<(ConnectionId, Event)>,
    /// echo-server patch: the router's notifications for this link and its
    /// wake-up in one record (were a flume channel of `()` and a shared
    /// buffer, see `link::outbox`).
    outbox: Arc<Outbox>,
    cache: VecDeque<Notification>,
}

impl Drop for LinkRx {
    fn drop(&mut self) {
        self.outbox.forget_waiter();
    }
}

impl LinkRx {
    pub(crate) fn new(
        connection_id: ConnectionId,
        router_tx: Sender<(ConnectionId, Event)>,
        outbox: Arc<Outbox>,
    ) -> LinkRx {
        LinkRx {
            connection_id,
            router_tx,
            outbox,
            // echo-server patch: grows on demand (was 100 notifications up front)
            cache: VecDeque::new(),
        }
    }

    pub fn id(&self) -> ConnectionId {
        self.connection_id
    }

    pub fn recv(&mut self) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        match self.cache.pop_front() {
            Some(v) => Ok(Some(v)),
            None => {
                // If cache is empty, check for router trigger and get fresh notifications
                self.outbox.wait(None).map_err(|_| RecvError::Disconnected)?;
                // Collect 'all' the data in the buffer after a notification.
                // Notification means fresh data which isn't previously collected
                mem::swap(&mut *self.outbox.lock(), &mut self.cache);
                Ok(self.cache.pop_front())
            }
        }
    }

    pub fn recv_deadline(&mut self, deadline: Instant) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        match self.cache.pop_front() {
            Some(v) => Ok(Some(v)),
            None => {
                // If cache is empty, check for router trigger and get fresh notifications
                self.outbox.wait(Some(deadline)).map_err(|e| match e {
                    WaitError::Closed => RecvTimeoutError::Disconnected,
                    WaitError::Timeout => RecvTimeoutError::Timeout,
                })?;
                mem::swap(&mut *self.outbox.lock(), &mut self.cache);
                Ok(self.cache.pop_front())
            }
        }
    }

    pub async fn next(&mut self) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        // echo-server patch: returned early rather than matched, so that
        // the popped `Option<Notification>` (248 bytes) is not kept in the
        // future across the wait below: this future is part of every idle
        // client's session.
        if let Some(v) = self.cache.pop_front() {
            return Ok(Some(v));
        }
        // echo-server patch: was a swap of the cache with the shared
        // buffer, so both drained queues stayed allocated while the
        // client waits (2 KB per idle client). The cache is freed
        // before waiting and the buffer taken, not swapped.
        self.cache = VecDeque::new();
        // If cache is empty, check for router trigger and get fresh notifications
        self.outbox.wait_async().await.map_err(|_| RecvError::Disconnected)?;
        // Collect 'all' the data in the buffer after a notification.
        // Notification means fresh data which isn't previously collected
        self.cache = self.outbox.take();
        Ok(self.cache.pop_front())
    }

    pub(crate) async fn exchange(
        &mut self,
        notifications: &mut VecDeque<Notification>,
    ) -> Result<(), LinkError> {
        self.outbox.wait_async().await.map_err(|_| RecvError::Disconnected)?;
        mem::swap(&mut *self.outbox.lock(), notifications);
        Ok(())
    }

    pub fn ready(&self) -> Result<(), LinkError> {
        self.router_tx.send((self.connection_id, Event::Ready))?;
        Ok(())
    }

    pub async fn wake(&self) -> Result<(), LinkError> {
        self.router_tx
            .send_async((self.connection_id, Event::Ready))
            .await?;

        Ok(())
    }
}

#[cfg(test)]
mod test {
    use super::LinkTx;
    use flume::bounded;
    use parking_lot::Mutex;
    use std::{collections::VecDeque, sync::Arc, thread};

    #[test]
    fn push_sends_all_data_and_notifications_to_router() {
        let (router_tx, router_rx) = bounded(10);
        let mut buffers = Vec::new();
        const CONNECTIONS: usize = 1000;
        const MESSAGES_PER_CONNECTION: usize = 100;

        for i in 0..CONNECTIONS {
            let buffer = Arc::new(Mutex::new(VecDeque::new()));
            let mut link_tx = LinkTx::new(i, router_tx.clone(), buffer.clone());
            buffers.push(buffer);
            thread::spawn(move || {
                for _ in 0..MESSAGES_PER_CONNECTION {
                    link_tx.publish("hello/world", vec![1, 2, 3]).unwrap();
                }
            });
        }

        // Router should receive notifications from all the connections
        for _ in 0..CONNECTIONS * MESSAGES_PER_CONNECTION {
            let _v = router_rx.recv().unwrap();
        }

        // Every connection has expected number of messages
        for item in buffers.iter().take(CONNECTIONS) {
            assert_eq!(item.lock().len(), MESSAGES_PER_CONNECTION);
        }

        // TODO: Write a similar test to benchmark buffer vs channels
    }
}
