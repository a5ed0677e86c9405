//! The exchange: one task waits on three things at once — bytes from the
//! client, notifications from the router, and its [`Alarm`] (the
//! keep-alive deadline, and shutdown). Packets read are checked, counted and pushed to the router
//! as one batch with one wake-up ([`incoming`]); notifications are encoded
//! for the client's version and written as one batch ([`collect`]).
//! Between bursts the task holds no read or write buffer.

mod incoming;

use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{DisconnectReasonCode, Packet};
use tokio::time::{Instant, Sleep};

use super::alarms::{Alarm, Rung};
use super::{Accepted, MqttServer, RouterLink, send};
use crate::budget::{Charges, PAUSE_LIMIT, PAUSE_PARTIAL};
use crate::mqtt::ackorder::AckOrder;
use crate::mqtt::caps::InFlight;
use crate::mqtt::codec::{Codec, Version};
use crate::mqtt::inflow::{Flow, Inflow, RECHECK, Turn};
use crate::mqtt::topics::Refusals;
use crate::mqtt::transport::Transport;
use incoming::{Handling, Taken};

/// How soon a session paused by the memory budget looks again.
const BUDGET_RECHECK: Duration = Duration::from_millis(10);

/// How the exchange ended.
pub(super) struct End {
    pub(super) reason: &'static str,
    /// Publish the will (the connection ended without a normal DISCONNECT).
    pub(super) will: bool,
    /// The DISCONNECT reason to send an MQTT 5 client, if any.
    pub(super) disconnect: Option<DisconnectReasonCode>,
    /// Close with FIN and drain (false when the socket is already dead).
    pub(super) polite_close: bool,
}

impl End {
    fn lost(reason: &'static str) -> End {
        End { reason, will: true, disconnect: None, polite_close: false }
    }

    fn violation(reason: &'static str, code: DisconnectReasonCode) -> End {
        End { reason, will: true, disconnect: Some(code), polite_close: true }
    }

    fn shutdown() -> End {
        End {
            reason: "shutdown",
            will: false,
            disconnect: Some(DisconnectReasonCode::ServerShuttingDown),
            polite_close: true,
        }
    }
}

/// What woke the exchange loop.
enum Wake {
    Shutdown,
    /// `Err`: the router dropped this client: another connection took its
    /// client id over (or the router is gone, which the broker reports on
    /// its own).
    Router(Result<RouterBatch, ()>),
    /// This many bytes were read (0: packets left in the read buffer by a
    /// spent turn are to be decoded).
    Client(usize),
    /// The client closed the connection (or reset it).
    Lost(&'static str),
    /// The alarm rang: the keep-alive deadline set may have passed.
    KeepAlive,
    /// The recheck set by [`State::gate`] is due.
    Recheck,
}

/// The exchange between the client and the router, until one side ends it.
pub(super) async fn exchange(
    transport: &mut Transport,
    rbuf: &mut BytesMut,
    router: &mut RouterLink,
    session: &mut Accepted,
    server: &MqttServer,
) -> End {
    let mut state = State::new(session, rbuf, server);
    let v5 = state.codec.version == Version::V5;
    loop {
        state.turn.end_if_spent().await;
        let (open, starved) = state.gate(&router.tx, rbuf, server);
        let wake = tokio::select! {
            biased;
            rung = state.alarm.rung() => match rung {
                Rung::Shutdown => Wake::Shutdown,
                Rung::Due => Wake::KeepAlive,
            },
            next = router.rx.next() => {
                Wake::Router(next.map(|first| collect(first, &mut router.rx, &mut state.awaiting, &mut session.held.in_flight, v5)).map_err(drop))
            }
            _ = std::future::ready(()), if open && state.buffered => Wake::Client(0),
            read = transport.read(rbuf), if open && !state.buffered && !starved => match read {
                Ok(0) => Wake::Lost("client_closed"),
                Ok(read) => Wake::Client(read),
                Err(_) => Wake::Lost("reset"),
            },
            _ = recheck(&mut state.recheck) => Wake::Recheck,
        };
        match wake {
            Wake::Shutdown => return End::shutdown(),
            Wake::KeepAlive => match state.keep_alive.due(open && !starved, transport) {
                Ok(next) => state.alarm.set(next),
                Err(end) => return end,
            },
            Wake::Recheck => {
                if let Err(end) = state.keep_alive.due(open && !starved, transport) {
                    return end;
                }
            }
            Wake::Lost(reason) => return End::lost(reason),
            Wake::Client(read) => {
                let taken = state.take(read, rbuf, session, server);
                if !taken.batch.is_empty() {
                    state.inflow.push(&mut router.tx, taken.batch, taken.bytes).await;
                }
                if !taken.replies.is_empty()
                    && let Err(reason) =
                        send(transport, &state.codec, taken.replies, &mut state.out, server).await
                {
                    return End::lost(reason);
                }
                if let Some(end) = taken.end {
                    return end;
                }
            }
            Wake::Router(Err(_)) => {
                router.registered = false;
                return End::violation("taken_over", DisconnectReasonCode::SessionTakenOver);
            }
            Wake::Router(Ok(batch)) => {
                if let Err(reason) =
                    send(transport, &state.codec, batch.packets, &mut state.out, server).await
                {
                    return End::lost(reason);
                }
                if let Some(end) = dropped(batch.router_disconnect, batch.gone, router) {
                    return end;
                }
                if batch.unscheduled {
                    // The router paused this client while its queue was full;
                    // now that it has been written, ask for more. Boxed: the
                    // send holds a router event (864 bytes), which would
                    // otherwise be room in every idle session's future.
                    let _ = Box::pin(router.rx.wake()).await;
                }
            }
        }
    }
}

/// What the exchange loop keeps from one wake-up to the next.
struct State<'a> {
    codec: Codec,
    keep_alive: KeepAlive,
    /// Rings at the keep-alive deadline, and at shutdown.
    alarm: Alarm<'a>,
    /// Set by [`State::gate`] while the session must look again soon
    /// without anything else to wake it; boxed and dropped after, as it is
    /// seldom there.
    recheck: Option<Pin<Box<Sleep>>>,
    awaiting: Awaiting<'a>,
    /// The write buffer (empty between bursts).
    out: BytesMut,
    turn: Turn,
    inflow: Inflow,
    /// The read buffer may hold whole packets that a spent turn left
    /// undecoded; at first, bytes read with the CONNECT, handled first.
    buffered: bool,
}

impl<'a> State<'a> {
    fn new(session: &Accepted, rbuf: &BytesMut, server: &'a MqttServer) -> State<'a> {
        let keep_alive = KeepAlive::new(session.keep_alive);
        let mut alarm = Alarm::new(&server.alarms);
        alarm.set(keep_alive.deadline());
        State {
            codec: session.codec.clone(),
            keep_alive,
            alarm,
            recheck: None,
            awaiting: Awaiting::new(server),
            out: BytesMut::new(),
            turn: Turn::default(),
            inflow: Inflow::default(),
            buffered: !rbuf.is_empty(),
        }
    }

    /// Before each wait: whether the client is to be read (`open`), and
    /// whether the memory budget keeps it from being read (`starved`).
    /// A recheck is set to look again soon if nothing else would wake the
    /// loop when that changes: a queue full by bytes gets no wake-up from
    /// the router (see `inflow`), nor a paused client from the budget.
    fn gate(&mut self, router: &LinkTx, rbuf: &BytesMut, server: &MqttServer) -> (bool, bool) {
        let flow = self.inflow.flow(router);
        // Half-way through a large packet (what is buffered is not a
        // whole packet) while the memory budget is spent: the rest waits in
        // the kernel (see `budget`). Whole packets are still taken.
        let starved = self.keep_alive.starved(!self.buffered && rbuf.len() >= PAUSE_PARTIAL, server);
        // Not while too many answers wait for the router's (see `ackorder`).
        let open = flow == Flow::Open && !self.awaiting.acks.is_full();
        let after = match (flow, starved) {
            (Flow::FullUnannounced, _) => Some(RECHECK),
            (_, true) => Some(BUDGET_RECHECK),
            _ => None,
        };
        match (after, &mut self.recheck) {
            (None, recheck) => *recheck = None,
            (Some(after), Some(recheck)) => recheck.as_mut().reset(Instant::now() + after),
            (Some(after), recheck) => *recheck = Some(Box::pin(tokio::time::sleep(after))),
        }
        (open, starved)
    }

    /// Takes what the client sent (`read` bytes were just read), as much
    /// as the turn allows.
    fn take(
        &mut self,
        read: usize,
        rbuf: &mut BytesMut,
        session: &mut Accepted,
        server: &'a MqttServer,
    ) -> Taken {
        self.keep_alive.heard = Instant::now();
        let handling = Handling::new(session, &mut self.awaiting, server);
        let taken = incoming::take(read, rbuf, &self.codec, &mut self.turn, handling);
        self.buffered = taken.left;
        taken
    }
}

/// When the client was last heard from, for the keep-alive, and since when
/// the memory budget has kept it from being read.
struct KeepAlive {
    /// 1.5 times the client's keep-alive (MQTT 3.1.1 §3.1.2.10); none for
    /// a keep-alive of 0.
    limit: Option<Duration>,
    heard: Instant,
    starved_since: Option<Instant>,
}

impl KeepAlive {
    fn new(keep_alive: u16) -> KeepAlive {
        let limit = match keep_alive {
            0 => None,
            seconds => Some(Duration::from_millis(u64::from(seconds) * 1500)),
        };
        KeepAlive { limit, heard: Instant::now(), starved_since: None }
    }

    /// When the client is silent for too long, if it keeps on being so.
    fn deadline(&self) -> Option<Instant> {
        self.limit.map(|limit| self.heard + limit)
    }

    /// Whether the client is not to be read now: half-way through a large
    /// packet (`partial`) while the memory budget is spent.
    fn starved(&mut self, partial: bool, server: &MqttServer) -> bool {
        let starved = partial && server.budget.spent();
        match (starved, self.starved_since) {
            (true, None) => {
                // Counted (and logged) like a refusal, once per pause.
                server.budget.allows("read");
                self.starved_since = Some(Instant::now());
            }
            (false, Some(_)) => self.starved_since = None,
            _ => {}
        }
        starved
    }

    /// The keep-alive deadline may have passed, or a recheck is due: the
    /// next deadline, or how the session ends. A client that is not being
    /// `read` is not silent.
    fn due(&mut self, read: bool, transport: &Transport) -> Result<Option<Instant>, End> {
        if let Some(since) = self.starved_since {
            if transport.peer_gone() {
                return Err(End::lost("client_closed"));
            }
            // A client that walked away with the rest of its packet
            // unsent never closes (its FIN waits behind that data),
            // and what its session holds counts against the budget
            // that keeps it paused: a bounded pause breaks the knot.
            if since.elapsed() >= PAUSE_LIMIT {
                return Err(End::violation("memory_limit", DisconnectReasonCode::QuotaExceeded));
            }
        }
        if !read {
            self.heard = Instant::now();
        }
        if self.limit.is_some_and(|limit| self.heard.elapsed() >= limit) {
            return Err(End::violation("keepalive_timeout", DisconnectReasonCode::KeepAliveTimeout));
        }
        Ok(self.deadline())
    }
}

/// Completes when the recheck set by [`State::gate`] is due; never
/// without one.
async fn recheck(recheck: &mut Option<Pin<Box<Sleep>>>) {
    match recheck {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// How the session ends if the router dropped the client in the batch
/// just written: with the reason it gave (it refused something this client
/// sent and has already forgotten it), or taken over.
fn dropped(reason: Option<DisconnectReasonCode>, gone: bool, router: &mut RouterLink) -> Option<End> {
    let end = match (reason, gone) {
        (Some(code), _) => End::violation("router_disconnect", code),
        (None, true) => End::violation("taken_over", DisconnectReasonCode::SessionTakenOver),
        (None, false) => return None,
    };
    router.registered = false;
    Some(end)
}

/// What the session awaits from the router: the answers to SUBSCRIBEs
/// handed to it — with the filters refused before (put back into the
/// SUBACK) and what the memory budget has been charged for them — and the
/// acknowledgements that the session's own must follow.
struct Awaiting<'a> {
    refusals: Refusals,
    charges: Charges<'a>,
    acks: AckOrder,
}

impl<'a> Awaiting<'a> {
    fn new(server: &'a MqttServer) -> Awaiting<'a> {
        Awaiting {
            refusals: Refusals::default(),
            charges: Charges::new(&server.budget),
            acks: AckOrder::default(),
        }
    }
}

/// What the router had ready for a client, as packets to write.
struct RouterBatch {
    packets: Vec<Packet>,
    /// The router paused the client (its queue was full) and waits for a
    /// `wake` once this is written.
    unscheduled: bool,
    /// The router dropped the client with this reason.
    router_disconnect: Option<DisconnectReasonCode>,
    /// The router forgot the client (taken over).
    gone: bool,
}

/// Takes everything the router has ready, starting with `first`, without
/// waiting: it all goes out in one write. Synchronous, so that no
/// notification (248 bytes each) is held in the session's future.
/// The client's in-flight window ([`InFlight`]) learns of the PUBACKs and
/// PUBCOMPs going out; the session's own answers held back for them go out
/// right after them ([`AckOrder`]).
fn collect(
    first: Option<Notification>,
    rx: &mut LinkRx,
    awaiting: &mut Awaiting,
    in_flight: &mut InFlight,
    v5: bool,
) -> RouterBatch {
    // Room for one packet, as most batches are: `Vec`'s first growth,
    // room for four, is a block too large for malloc's per-thread cache.
    let packets = Vec::with_capacity(1);
    let mut batch = RouterBatch { packets, unscheduled: false, router_disconnect: None, gone: false };
    let mut next = Some(Ok(first));
    while let Some(Ok(notification)) = next.take() {
        if let Some(notification) = notification {
            match notification {
                Notification::Unschedule => batch.unscheduled = true,
                Notification::Disconnect(disconnect, _) => {
                    batch.router_disconnect = Some(disconnect.reason_code)
                }
                other => match Option::<Packet>::from(other) {
                    Some(Packet::SubAck(ack, props)) => {
                        awaiting.charges.settle(ack.pkid);
                        batch.packets.push(Packet::SubAck(awaiting.refusals.complete(ack, v5), props));
                    }
                    Some(packet) => {
                        in_flight.sent(&packet);
                        awaiting.acks.pass(packet, &mut batch.packets);
                    }
                    None => {}
                },
            }
        }
        next = rx.next().now_or_never();
    }
    batch.gone = matches!(next, Some(Err(_)));
    batch
}
