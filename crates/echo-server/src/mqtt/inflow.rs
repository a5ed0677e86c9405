//! How much of one client's input a session takes at a time.
//!
//! Every client shares the one event loop, and the router behind it (on the
//! loop too, or on a thread of its own: `mqtt.router`), so a client that
//! sends faster than the broker can route must not get more than its share
//! of either. Two bounds do it:
//!
//! - **A turn** ([`Turn`]): a session decodes at most [`TURN_PACKETS`]
//!   packets or reads [`TURN_BYTES`] bytes before it yields to the other
//!   tasks. tokio's cooperative budget does not cover this: a read that
//!   waits for readiness and then calls `try_read` never spends it, so a
//!   client whose socket is always readable (a flood of small publishes)
//!   held the event loop for as long as it kept sending (8–20 s of lag,
//!   measured with one client sending ~1.1 million publishes/s).
//! - **Backpressure** ([`Inflow`]): packets go to the router through the
//!   link's queue, which the router empties as one batch. While that queue
//!   holds [`QUEUED_PACKETS`] packets or [`QUEUED_BYTES`] bytes the session
//!   stops reading its client, whose sends then fill the socket buffers and
//!   block in the client's own kernel, as TCP intends. Unbounded, the queue
//!   grew by whatever the client sent faster than the router could take.
//!
//! The router tells a link that emptied a long queue through the link's
//! wake-up (an empty notification; vendor/rumqttd's
//! `QUEUE_DRAINED_WAKE`), so a waiting session reads again as soon as there
//! is room. A queue that is full by bytes with fewer packets than that gets
//! no such wake-up, and is looked at again after [`RECHECK`] (on the
//! session's keep-alive timer, which is not otherwise due while the client
//! is not being read).

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::FutureExt;
use rumqttd::local::{LinkTx, QUEUE_DRAINED_WAKE};
use rumqttd::protocol::Packet;

/// Packets decoded in one turn of the event loop, at most.
pub(crate) const TURN_PACKETS: usize = 256;
/// Bytes read or decoded in one turn of the event loop, at most (a packet
/// larger than this is still taken whole).
pub(crate) const TURN_BYTES: usize = 64 * 1024;
/// Packets the router may be owed by one client before it is not read.
const QUEUED_PACKETS: usize = 256;
/// Bytes of packets (as sent) the router may be owed by one client before
/// it is not read; one packet of any allowed size always fits.
const QUEUED_BYTES: usize = 1024 * 1024;
/// How soon a session whose queue is full by bytes looks again.
pub(crate) const RECHECK: Duration = Duration::from_millis(1);

const _: () = assert!(QUEUED_PACKETS >= QUEUE_DRAINED_WAKE, "a full queue must be one the router wakes for");

/// The work one session did since it last let the others run.
#[derive(Debug, Default)]
pub(crate) struct Turn {
    packets: usize,
    bytes: usize,
}

impl Turn {
    pub(crate) fn read(&mut self, bytes: usize) {
        self.bytes += bytes;
    }

    pub(crate) fn decoded(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes;
    }

    pub(crate) fn is_spent(&self) -> bool {
        self.packets >= TURN_PACKETS || self.bytes >= TURN_BYTES
    }

    /// Lets every other task run once if this turn is spent.
    pub(crate) async fn end_if_spent(&mut self) {
        if self.is_spent() {
            *self = Turn::default();
            tokio::task::yield_now().await;
        }
    }
}

/// Whether a session may read its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Open,
    /// The router is owed enough; it wakes the link when it has taken it.
    Full,
    /// Full by bytes with too few packets for the router's wake-up: look
    /// again after [`RECHECK`].
    FullUnannounced,
}

/// What one client's session has queued for the router and not seen taken.
#[derive(Debug, Default)]
pub(crate) struct Inflow {
    /// Bytes pushed since the queue was last seen empty.
    queued_bytes: usize,
}

impl Inflow {
    /// Whether the client may be read now.
    pub(crate) fn flow(&mut self, tx: &LinkTx) -> Flow {
        let queued = tx.buffer().len();
        if queued == 0 {
            self.queued_bytes = 0;
            Flow::Open
        } else if queued >= QUEUED_PACKETS {
            Flow::Full
        } else if self.queued_bytes >= QUEUED_BYTES {
            if queued >= QUEUE_DRAINED_WAKE { Flow::Full } else { Flow::FullUnannounced }
        } else {
            Flow::Open
        }
    }

    /// Hands a batch of packets (`bytes` as sent) to the router with at
    /// most one wake-up event.
    ///
    /// The router drains a link's whole queue on any event for it, so while
    /// the queue still holds packets an event is already on its way: adding
    /// to the queue is enough. (The check and the push happen under the
    /// queue's lock; the router takes the queue under the same lock after
    /// receiving the event.) This keeps at most one event per link in the
    /// router's bounded channel. When that channel is full the session waits
    /// for room (and so stops reading its client too); the wait is boxed, so
    /// that the session's future, which lives as long as the connection,
    /// does not carry it.
    pub(crate) async fn push(&mut self, tx: &mut LinkTx, batch: Vec<Packet>, bytes: usize) {
        {
            let mut queue = tx.buffer();
            let was_empty = queue.is_empty();
            if was_empty {
                self.queued_bytes = 0;
            }
            self.queued_bytes += bytes;
            if was_empty {
                // The batch becomes the queue, its block and all: no copy
                // into a block of the queue's own.
                *queue = VecDeque::from(batch);
            } else {
                queue.extend(batch);
            }
            if !was_empty {
                return;
            }
        }
        if tx.notify().now_or_never().is_none() {
            let _ = Box::pin(tx.notify()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_ends_after_enough_packets_or_bytes() {
        let mut turn = Turn::default();
        for _ in 0..TURN_PACKETS - 1 {
            turn.decoded(10);
        }
        assert!(!turn.is_spent());
        turn.decoded(10);
        assert!(turn.is_spent());
        let mut turn = Turn::default();
        turn.read(TURN_BYTES - 1);
        assert!(!turn.is_spent());
        turn.decoded(1);
        assert!(turn.is_spent());
    }
}
