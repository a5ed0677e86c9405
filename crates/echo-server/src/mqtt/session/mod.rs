//! One MQTT connection, from its first byte to its close, in three phases:
//!
//! 1. **Connect** ([`connect`]): the CONNECT is read within
//!    `connect_timeout`; the protocol level picks the codec; credentials,
//!    client id and will are checked, so a refusal is a CONNACK with the
//!    right code (rumqttd's router would drop the client without one),
//!    except for a malformed 3.1.1 CONNECT, which 3.1.1 answers by closing.
//!    Then the client is registered with the router, awaiting its answer
//!    without blocking the event loop (see [`broker`](super::broker)), and
//!    the router's CONNACK (session present or not) goes to the client.
//! 2. **Exchange** ([`exchange`]): one task waits on the client, the router,
//!    and its alarm (the keep-alive deadline and shutdown, from one timer
//!    for all sessions: [`alarms`]), and passes packets between the client
//!    and the router in batches.
//! 3. **Close** ([`close`]): the will, MQTT 5's DISCONNECT with its reason,
//!    a polite close, telling the router.
//!
//! Connecting and closing run on a few turns at a time, so that a storm of
//! either does not hold up everyone else ([`turns`]).
//!
//! Whatever ends the session — the client, a protocol error, a write
//! timeout, shutdown, or a panic — dropping [`RouterLink`] tells the router
//! the client is gone, so no session is ever left registered.

mod alarms;
mod close;
mod connect;
mod exchange;
mod turns;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::gauge::Gauge;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectProperties, DisconnectReasonCode, LastWill, LastWillProperties, Packet,
};
use tokio::time::Sleep;
use tracing::debug;

use super::MqttServer;
use super::acl::SessionAcl;
use super::broker::SessionExpiry;
use super::caps::Held;
use super::codec::{Codec, Version};
use super::transport::Transport;
use crate::metrics::MqttMetrics;
pub(crate) use alarms::Alarms;
pub use connect::{refusing_connack, write_connack};
pub(crate) use turns::ConnectTurns;

/// The link to the router for one session. Dropping it while the router
/// still knows the client sends the router a DISCONNECT for it, so that a
/// session that ends in any way — including a panic — is removed.
struct RouterLink {
    tx: LinkTx,
    rx: LinkRx,
    /// False once the router has dropped this client (take-over, a publish
    /// it refused) or been told it is gone.
    registered: bool,
}

impl RouterLink {
    /// Tells the router the client is gone, with the session expiry its
    /// DISCONNECT asked for.
    fn leave(&mut self, expiry: SessionExpiry) {
        if std::mem::take(&mut self.registered) {
            let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
            let properties = DisconnectProperties {
                session_expiry_interval: Some(expiry.0),
                reason_string: None,
                user_properties: Vec::new(),
                server_reference: None,
            };
            let _ = super::broker::hand_over(&mut self.tx, Packet::Disconnect(bye, Some(properties)));
        }
    }
}

impl Drop for RouterLink {
    fn drop(&mut self) {
        if self.registered {
            let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
            let _ = super::broker::hand_over(&mut self.tx, Packet::Disconnect(bye, None));
        }
    }
}

/// A CONNECT that passed every check.
struct Accepted {
    codec: Codec,
    client_id: String,
    assigned_id: bool,
    /// Clean session (3.1.1) or clean start (5): the session starts anew.
    clean_session: bool,
    /// How long the session outlives the connection; an MQTT 5 client may
    /// change it in its DISCONNECT.
    session_expiry: SessionExpiry,
    /// The client's DISCONNECT changed `session_expiry`: the router is told.
    expiry_changed: bool,
    keep_alive: u16,
    /// Boxed: most clients have none, and this struct lives as long as
    /// the connection.
    will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
    will_delay: Duration,
    /// What the client holds in the server, against the caps.
    held: Held,
    /// What the client may publish and subscribe to, when `mqtt.acl_file`
    /// is set. Boxed: it lives as long as the connection.
    acl: Option<Box<SessionAcl>>,
}

/// Serves one connection until it closes. The caller holds the permit.
///
/// The CONNECT phase and the closing phase run boxed: their state (the
/// CONNECT's fields, refusal and CONNACK writes, timers, the turns) is
/// allocated only while they run, so the future that lives as long as the
/// connection holds little more than the exchange loop. Written as a
/// function returning an `async move` block rather than as an `async fn`,
/// which would keep its arguments and the locals they are moved into side
/// by side (72 bytes per client).
#[allow(clippy::manual_async_fn)] // deliberate, see above
pub fn run(mut transport: Transport, peer: SocketAddr, server: Rc<MqttServer>) -> impl Future<Output = ()> {
    async move {
        let mut rbuf = BytesMut::new();
        let Some((mut session, mut router)) =
            Box::pin(connect::open(&mut transport, &mut rbuf, peer, &server)).await
        else {
            return;
        };
        let counted = Counted::open(&server.metrics, session.codec.version);
        let end = exchange::exchange(&mut transport, &mut rbuf, &mut router, &mut session, &server).await;
        server.kept.disconnected(&session.client_id, &session.held.filters, session.session_expiry);
        server.broker.client_left(&session.client_id);
        counted.close(end.reason);
        debug!(%peer, client_id = %session.client_id, reason = end.reason, "session ended");
        Box::pin(close::close(transport, &session, router, end, &server)).await;
    }
}

/// An open session in `/metrics`: one in the connections gauge of its
/// version while it runs, one in `closed_total` with its reason when it
/// ends. A drop guard, so that the figures stay true however the session
/// ends: a task that unwinds from a panic (tokio catches it: the other
/// sessions run on) is counted closed with reason `panic`.
struct Counted<'a> {
    metrics: &'a MqttMetrics,
    gauge: Gauge,
    reason: Option<&'static str>,
}

impl<'a> Counted<'a> {
    fn open(metrics: &'a MqttMetrics, version: Version) -> Counted<'a> {
        let gauge = match version {
            Version::V311 => metrics.v311.clone(),
            Version::V5 => metrics.v5.clone(),
        };
        gauge.inc();
        Counted { metrics, gauge, reason: None }
    }

    fn close(mut self, reason: &'static str) {
        self.reason = Some(reason);
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
        let reason = match self.reason {
            Some(reason) => reason,
            None if std::thread::panicking() => "panic",
            // The task was dropped without finishing (the runtime going away).
            None => "aborted",
        };
        self.metrics.closed(reason);
    }
}

/// Encodes packets and writes them in one go, within `write_timeout`.
async fn send(
    transport: &mut Transport,
    codec: &Codec,
    packets: Vec<Packet>,
    out: &mut BytesMut,
    server: &MqttServer,
) -> Result<(), &'static str> {
    let metrics = &server.metrics;
    for packet in packets {
        match codec.encode(packet, out) {
            Ok(Some(packet_type)) => {
                metrics.packet_sent(packet_type);
                if packet_type == 3 {
                    metrics.publishes_sent.inc();
                }
            }
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "a packet could not be encoded; dropped");
            }
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    let written = within(server.config.write_timeout, std::pin::pin!(transport.write_all(out))).await;
    let len = out.len() as u64;
    // Nothing stays allocated between bursts.
    *out = BytesMut::new();
    match written {
        Ok(Ok(())) => {
            metrics.bytes_sent.inc_by(len);
            Ok(())
        }
        Ok(Err(_)) => Err("reset"),
        Err(()) => Err("write_timeout"),
    }
}

/// `write`, given `limit` to complete. Its timer is allocated only if the
/// write does not complete at once (most do: the kernel takes it all), and
/// starts then, a poll after the write did. A timer inline, as
/// `tokio::time::timeout` has it, would be room (112 bytes) in every
/// session's future, idle or not: the write is the exchange's largest
/// await. Not an `async fn`, which would keep its arguments and the
/// closure's references to them side by side.
fn within<F: Future + Unpin>(limit: Duration, mut write: F) -> impl Future<Output = Result<F::Output, ()>> {
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    poll_fn(move |cx| {
        if let Poll::Ready(written) = Pin::new(&mut write).poll(cx) {
            return Poll::Ready(Ok(written));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).map(Err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, ReasonLabel};

    /// The gauge comes back down and the session is counted closed, also
    /// when its task unwinds from a panic.
    #[test]
    fn a_session_is_counted_closed_however_it_ends() {
        let metrics = Metrics::new(1024, None);
        let mqtt = &metrics.mqtt;
        let closed = |reason| mqtt.closed.get_or_create(&ReasonLabel { reason }).get();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _counted = Counted::open(mqtt, Version::V5);
            assert_eq!(mqtt.v5.get(), 1);
            panic!("a bug in a session (this panic is the test)");
        }));
        assert!(unwound.is_err());
        assert_eq!((mqtt.v5.get(), closed("panic")), (0, 1));
        let counted = Counted::open(mqtt, Version::V311);
        assert_eq!(mqtt.v311.get(), 1);
        counted.close("client_closed");
        assert_eq!((mqtt.v311.get(), closed("client_closed"), closed("panic")), (0, 1, 1));
        drop(Counted::open(mqtt, Version::V311));
        assert_eq!((mqtt.v311.get(), closed("aborted")), (0, 1));
    }
}
