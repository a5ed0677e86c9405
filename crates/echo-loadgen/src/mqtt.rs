//! One MQTT client: connect, subscribe, publish on schedule, verify deliveries.
//!
//! Echo pattern: each client subscribes to its own topic and publishes to it,
//! so the broker's delivery is the echo. Fan-out pattern: in each group of
//! `fanout + 1` consecutive clients the last publishes and the others
//! subscribe to the group's topic.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::flow::{Feed, Flow, Settle};
use crate::net;
use crate::scenario::{MqttVersion, Pattern};
use crate::stats::ErrorKind;
use crate::worker::Ctx;
use echo_mqtt_wire::{self as codec, Packet};

const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// What one client does.
enum Role {
    Echo { topic: String },
    Subscriber { topic: String, publisher: u32, feed: Arc<Feed> },
    Publisher { topic: String, feed: Arc<Feed> },
}

fn role(ctx: &Ctx, id: u32) -> Role {
    let s = &ctx.settings;
    match s.pattern {
        Pattern::Echo => {
            Role::Echo { topic: format!("{}/{}/{}/{id}", s.topic_prefix, ctx.run_id, ctx.worker) }
        }
        Pattern::Fanout => {
            let group_size = s.fanout + 1;
            let group = id / group_size;
            let topic = format!("{}/{}/{}/g{group}", s.topic_prefix, ctx.run_id, ctx.worker);
            let publisher = group * group_size + s.fanout;
            let feed = ctx.feed(group);
            if id == publisher {
                Role::Publisher { topic, feed }
            } else {
                Role::Subscriber { topic, publisher, feed }
            }
        }
    }
}

/// A connected client: the socket and its buffers.
pub struct Client {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    version: MqttVersion,
    /// Free space to offer each read: one message and its header, at least
    /// 512 bytes. Small on purpose: memory a burst allocated stays in the
    /// process even after it is freed, so 19,000 clients should not each
    /// start with a 4 KiB buffer for a 4-byte CONNACK.
    read_size: usize,
}

impl Client {
    /// A TCP connection with CONNECT written into its buffer, not yet sent:
    /// what `open` and `open_subscribed` start from.
    async fn dial(
        addr: SocketAddr,
        source: Option<IpAddr>,
        version: MqttVersion,
        client_id: &str,
        deadline: Instant,
    ) -> Result<Client, ErrorKind> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let stream = net::connect(addr, source, timeout).await?;
        let mut c = Client { stream, rbuf: BytesMut::new(), wbuf: Vec::new(), version, read_size: 512 };
        codec::Connect::new(version.level(), client_id, KEEP_ALIVE.as_secs() as u16).encode(&mut c.wbuf);
        Ok(c)
    }

    /// Connects and waits for a successful CONNACK.
    pub async fn open(
        addr: SocketAddr,
        source: Option<IpAddr>,
        version: MqttVersion,
        client_id: &str,
        deadline: Instant,
    ) -> Result<Client, ErrorKind> {
        let mut c = Client::dial(addr, source, version, client_id, deadline).await?;
        c.flush_by(deadline).await?;
        match timeout_at(deadline, c.next()).await {
            Err(_) => Err(ErrorKind::HandshakeTimeout),
            Ok(Ok(Packet::ConnAck { code: 0 })) => Ok(c),
            Ok(Ok(Packet::ConnAck { code })) => Err(ErrorKind::MqttConnackRefused(code)),
            Ok(_) => Err(ErrorKind::HandshakeFailed),
        }
    }

    /// Connects and subscribes with SUBSCRIBE written right behind CONNECT,
    /// in one write, then waits for a successful CONNACK and a granted
    /// SUBACK. MQTT allows a client to send before CONNACK; some clients do,
    /// and it costs the broker one read per client instead of two.
    pub async fn open_subscribed(
        addr: SocketAddr,
        source: Option<IpAddr>,
        version: MqttVersion,
        client_id: &str,
        topic: &str,
        qos: u8,
        deadline: Instant,
    ) -> Result<Client, ErrorKind> {
        let mut c = Client::dial(addr, source, version, client_id, deadline).await?;
        codec::subscribe(&mut c.wbuf, version.level(), 1, &[], &[(topic, qos)]);
        c.flush_by(deadline).await?;
        match timeout_at(deadline, c.next()).await {
            Err(_) => return Err(ErrorKind::HandshakeTimeout),
            Ok(Ok(Packet::ConnAck { code: 0 })) => {}
            Ok(Ok(Packet::ConnAck { code })) => return Err(ErrorKind::MqttConnackRefused(code)),
            Ok(_) => return Err(ErrorKind::HandshakeFailed),
        }
        match timeout_at(deadline, c.next()).await {
            Err(_) => Err(ErrorKind::HandshakeTimeout),
            Ok(Ok(Packet::SubAck { code })) if code < 0x80 => Ok(c),
            Ok(Ok(Packet::SubAck { .. })) => Err(ErrorKind::MqttSubscribeRefused),
            Ok(_) => Err(ErrorKind::HandshakeFailed),
        }
    }

    /// Subscribes and waits for a granted SUBACK.
    pub async fn subscribe(&mut self, topic: &str, qos: u8, deadline: Instant) -> Result<(), ErrorKind> {
        codec::subscribe(&mut self.wbuf, self.version.level(), 1, &[], &[(topic, qos)]);
        self.flush_by(deadline).await?;
        match timeout_at(deadline, self.next()).await {
            Err(_) => Err(ErrorKind::HandshakeTimeout),
            Ok(Ok(Packet::SubAck { code })) if code < 0x80 => Ok(()),
            Ok(Ok(Packet::SubAck { .. })) => Err(ErrorKind::MqttSubscribeRefused),
            Ok(_) => Err(ErrorKind::HandshakeFailed),
        }
    }

    /// Writes the handshake's packets out within the connect deadline.
    async fn flush_by(&mut self, deadline: Instant) -> Result<(), ErrorKind> {
        match timeout_at(deadline, self.flush()).await {
            Err(_) => Err(ErrorKind::HandshakeTimeout),
            Ok(Err(_)) => Err(ErrorKind::HandshakeFailed),
            Ok(Ok(())) => Ok(()),
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Encodes packets with `f` and writes them out.
    pub async fn send(&mut self, f: impl FnOnce(&mut Vec<u8>, MqttVersion)) -> Result<(), ErrorKind> {
        f(&mut self.wbuf, self.version);
        self.flush().await.map_err(|_| ErrorKind::ConnectionReset)
    }

    /// Reads until one whole packet is buffered.
    pub async fn recv(&mut self) -> Result<Packet, ErrorKind> {
        self.next().await
    }

    async fn next(&mut self) -> Result<Packet, ErrorKind> {
        loop {
            if let Some(p) = self.decoded()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    fn decoded(&mut self) -> Result<Option<Packet>, ErrorKind> {
        codec::decode(&mut self.rbuf, self.version.level()).map_err(|_| ErrorKind::ProtocolError)
    }

    /// Sizes reads for messages of `payload` bytes.
    pub fn expect_payloads(&mut self, payload: usize) {
        self.read_size = (payload + 64).max(512);
    }

    async fn fill(&mut self) -> Result<(), ErrorKind> {
        self.rbuf.reserve(self.read_size);
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(ErrorKind::ConnectionEof),
            Ok(_) => Ok(()),
            Err(_) => Err(ErrorKind::ConnectionReset),
        }
    }
}

/// Runs client `id` until `stop` turns true or it fails.
pub async fn run(ctx: Arc<Ctx>, id: u32, source: Option<IpAddr>, mut stop: watch::Receiver<bool>) {
    let rec = &ctx.rec;
    let s = &ctx.settings;
    rec.attempt(id);
    let started = Instant::now();
    let deadline = started + s.connect_timeout();
    let client_id = format!("elg-{}-{}-{id}", ctx.run_id, ctx.worker);
    let role = role(&ctx, id);
    // A fan-out subscriber lets its publisher start once it is subscribed,
    // or has failed (the guard is dropped on every way out).
    let settle = Settle::new(match &role {
        Role::Subscriber { feed, .. } => Some(feed.clone()),
        _ => None,
    });
    let topic = match &role {
        Role::Echo { topic } | Role::Subscriber { topic, .. } | Role::Publisher { topic, .. } => {
            topic.clone()
        }
    };
    let pipelined = s.pipeline_subscribe && !matches!(role, Role::Publisher { .. });
    let opened = if pipelined {
        Client::open_subscribed(ctx.target.addr, source, s.mqtt_version, &client_id, &topic, s.qos, deadline)
            .await
    } else {
        Client::open(ctx.target.addr, source, s.mqtt_version, &client_id, deadline).await
    };
    let mut client = match opened {
        Ok(c) => c,
        Err(kind) => return rec.error(id, kind),
    };
    if !pipelined
        && !matches!(role, Role::Publisher { .. })
        && let Err(kind) = client.subscribe(&topic, s.qos, deadline).await
    {
        return rec.error(id, kind);
    }
    rec.connected(id, started.elapsed().as_micros() as u64);
    let mut flow = match role {
        Role::Echo { .. } => Flow::echo(id, s.size, s.rate, s.in_flight, s.timeout(), ctx.clock),
        Role::Subscriber { publisher, feed, .. } => {
            Flow::subscriber(id, publisher, s.size, s.timeout(), ctx.clock, feed)
        }
        Role::Publisher { feed, .. } => {
            // Every subscriber of the group is owed every message from the
            // first: start once they are all subscribed (or have failed).
            if !feed.wait_for_subscribers(&mut stop).await {
                rec.closed();
                return;
            }
            Flow::publisher(id, s.size, s.rate, s.timeout(), ctx.clock, feed)
        }
    };
    drop(settle);
    if let Some(kind) = session(&mut client, &mut flow, &topic, &ctx, &mut stop).await {
        rec.error(id, kind);
    }
    rec.closed();
}

async fn session(
    c: &mut Client,
    flow: &mut Flow,
    topic: &str,
    ctx: &Ctx,
    stop: &mut watch::Receiver<bool>,
) -> Option<ErrorKind> {
    let rec = &ctx.rec;
    let (qos, version) = (ctx.settings.qos, c.version);
    c.expect_payloads(ctx.settings.size);
    let mut pkid: u16 = 1;
    let mut last_write = Instant::now();
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let sleep = sleep_until(far);
    tokio::pin!(sleep);
    loop {
        if *stop.borrow() {
            // A broker that stopped reading must not hold up the end of the run.
            c.wbuf.extend_from_slice(&codec::DISCONNECT);
            let _ = tokio::time::timeout(Duration::from_secs(2), c.flush()).await;
            return None;
        }
        let now = Instant::now();
        if flow.timed_out(now) {
            return Some(ErrorKind::EchoTimeout);
        }
        let mut sent = 0;
        let mut first_ns = None;
        while let Some((seq, ns)) = flow.next_due(now) {
            first_ns.get_or_insert(ns);
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            codec::publish(&mut c.wbuf, version.level(), topic.as_bytes(), qos, pkid, &flow.payload(seq, ns));
            sent += 1;
        }
        if now >= last_write + KEEP_ALIVE / 2 {
            c.wbuf.extend_from_slice(&codec::PINGREQ);
        }
        if !c.wbuf.is_empty() {
            // A broker that stops reading blocks the write once the socket
            // buffers are full: an error within the timeout, not a quiet gap.
            let deadline = flow.write_deadline(first_ns, now);
            tokio::select! {
                biased;
                r = c.flush() => if r.is_err() {
                    return Some(ErrorKind::ConnectionReset);
                },
                _ = stop.changed() => return None,
                _ = sleep_until(deadline) => return Some(ErrorKind::WriteStall),
            }
            last_write = now;
        }
        if sent > 0 {
            rec.sent(flow.id(), sent);
            flow.written(sent);
        }
        let wake =
            flow.next_wake(now).map_or(last_write + KEEP_ALIVE / 2, |w| w.min(last_write + KEEP_ALIVE / 2));
        sleep.as_mut().reset(wake);
        tokio::select! {
            biased;
            _ = stop.changed() => continue,
            _ = flow.feed_changed() => continue,
            r = { c.rbuf.reserve(c.read_size); c.stream.read_buf(&mut c.rbuf) } => match r {
                Ok(0) => return Some(ErrorKind::ConnectionEof),
                Err(_) => return Some(ErrorKind::ConnectionReset),
                Ok(_) => {}
            },
            _ = &mut sleep => continue,
        }
        let now = Instant::now();
        loop {
            match c.decoded() {
                Err(kind) => return Some(kind),
                Ok(None) => break,
                Ok(Some(Packet::Publish { qos, pkid, payload })) => {
                    flow.on_payload(&payload, now, rec);
                    match qos {
                        1 => codec::ack(&mut c.wbuf, codec::PUBACK, pkid),
                        2 => codec::ack(&mut c.wbuf, codec::PUBREC, pkid),
                        _ => {}
                    }
                }
                Ok(Some(Packet::PubRec { pkid })) => codec::ack(&mut c.wbuf, codec::PUBREL, pkid),
                Ok(Some(Packet::PubRel { pkid })) => codec::ack(&mut c.wbuf, codec::PUBCOMP, pkid),
                Ok(Some(Packet::PubAck | Packet::PubComp | Packet::PingResp | Packet::SubAck { .. })) => {}
                Ok(Some(Packet::Disconnect)) => return Some(ErrorKind::ClosedByServer),
                Ok(Some(Packet::ConnAck { .. } | Packet::Other(_))) => return Some(ErrorKind::ProtocolError),
            }
        }
        // An idle client gives its read buffer back (4 KiB × 19,000 clients
        // is most of the generator's memory); a busy one keeps it unless a
        // burst made it large.
        if c.rbuf.is_empty() && (flow.next_wake(now).is_none() || c.rbuf.capacity() > 64 * 1024) {
            c.rbuf = BytesMut::new();
        }
    }
}
