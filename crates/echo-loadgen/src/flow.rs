//! The message state of one connection: what is due, what is outstanding,
//! and whether each echo is the right one. Transport-independent, so the
//! WebSocket and MQTT drivers share exactly the same checks.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::payload;
use crate::schedule::{Rate, Schedule, phase};
use crate::stats::{ErrorKind, Recorder};

/// How early a connection wakes for a due message. Tokio's timer rounds
/// every deadline up to the next millisecond; waking early by that much and
/// stamping the message with `min(due, now)` keeps the timer's granularity
/// out of the latency (a message is never stamped earlier than it left),
/// while anything that delays a send past its due time — a full socket, a
/// stalled server — still counts from the due time.
pub const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Nanoseconds since the worker's epoch: what travels in the payload.
#[derive(Clone, Copy, Default)]
pub struct Clock {
    epoch: Epoch,
}

/// The instant a clock was made (its `Default` is "now").
#[derive(Clone, Copy)]
struct Epoch(Instant);

impl Default for Epoch {
    fn default() -> Self {
        Epoch(Instant::now())
    }
}

impl Clock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch.0).as_nanos() as u64
    }

    pub fn at(&self, ns: u64) -> Instant {
        self.epoch.0 + Duration::from_nanos(ns)
    }
}

enum Sending {
    Idle,
    Open(Schedule),
    Closed { in_flight: u32 },
}

enum Receiving {
    /// Echoes of this connection's own messages, in order.
    Echo,
    /// Nothing comes back (a fan-out publisher).
    Nothing,
    /// Deliveries of another connection's messages (a fan-out subscriber):
    /// the order is checked from the first message seen.
    From { publisher: u32, next: Option<u64> },
}

/// One connection's messages.
pub struct Flow {
    id: u32,
    size: usize,
    timeout: Duration,
    clock: Clock,
    sending: Sending,
    receiving: Receiving,
    next_seq: u64,
    /// Sent and not yet echoed: (sequence number, scheduled ns).
    outstanding: VecDeque<(u64, u64)>,
}

/// What became of one received payload.
#[derive(Debug, PartialEq, Eq)]
pub enum Echo {
    /// Verified; latency in microseconds from the scheduled send time.
    Ok(u64),
    /// Counted as an error (already recorded); the connection goes on.
    Bad,
}

impl Flow {
    /// A connection that sends at `rate` and expects its own echoes.
    pub fn echo(id: u32, size: usize, rate: Rate, in_flight: u32, timeout: Duration, clock: Clock) -> Flow {
        Flow::new(id, size, rate, in_flight, timeout, clock, Receiving::Echo)
    }

    /// A fan-out publisher: sends at `rate`, expects nothing back.
    pub fn publisher(id: u32, size: usize, rate: Rate, timeout: Duration, clock: Clock) -> Flow {
        let rate = if rate == Rate::Max { Rate::PerSecond(1000.0) } else { rate };
        Flow::new(id, size, rate, 1, timeout, clock, Receiving::Nothing)
    }

    /// A fan-out subscriber of `publisher`'s messages.
    pub fn subscriber(id: u32, publisher: u32, size: usize, timeout: Duration, clock: Clock) -> Flow {
        Flow::new(id, size, Rate::Idle, 1, timeout, clock, Receiving::From { publisher, next: None })
    }

    fn new(
        id: u32,
        size: usize,
        rate: Rate,
        in_flight: u32,
        timeout: Duration,
        clock: Clock,
        receiving: Receiving,
    ) -> Flow {
        let sending = match rate {
            Rate::Idle => Sending::Idle,
            Rate::PerSecond(r) => Sending::Open(Schedule::new(Instant::now(), r, phase(id))),
            Rate::Max => Sending::Closed { in_flight },
        };
        Flow { id, size, timeout, clock, sending, receiving, next_seq: 0, outstanding: VecDeque::new() }
    }

    /// The next message due at `now`, as (sequence, scheduled ns), if any.
    /// Call repeatedly: a sender that fell behind gets every overdue one.
    pub fn next_due(&mut self, now: Instant) -> Option<(u64, u64)> {
        let scheduled = match &self.sending {
            Sending::Idle => return None,
            Sending::Open(s) => {
                let due = s.due(self.next_seq);
                if due > now + TIMER_SLACK {
                    return None;
                }
                due.min(now)
            }
            Sending::Closed { in_flight } => {
                if self.outstanding.len() >= *in_flight as usize {
                    return None;
                }
                now
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let ns = self.clock.ns(scheduled);
        if matches!(self.receiving, Receiving::Echo) {
            self.outstanding.push_back((seq, ns));
        }
        Some((seq, ns))
    }

    /// Builds the payload of a due message.
    pub fn payload(&self, seq: u64, scheduled_ns: u64) -> Vec<u8> {
        payload::message(self.id, seq, scheduled_ns, self.size)
    }

    /// When the connection next has something to do: a message falls due
    /// or the oldest outstanding one times out.
    pub fn next_wake(&self) -> Option<Instant> {
        let due = match &self.sending {
            Sending::Open(s) => {
                Some(s.due(self.next_seq).checked_sub(TIMER_SLACK).unwrap_or(s.due(self.next_seq)))
            }
            _ => None,
        };
        match (due, self.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True when the oldest outstanding message waited longer than the timeout.
    pub fn timed_out(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// When the oldest outstanding message times out.
    fn deadline(&self) -> Option<Instant> {
        self.outstanding.front().map(|&(_, ns)| self.clock.at(ns) + self.timeout)
    }

    /// By when a write must have completed: the oldest outstanding
    /// message's deadline, or that of the oldest message in the write
    /// (scheduled at `first_ns`; `None`: only acknowledgements and the like,
    /// due `now`), whichever comes first. A server that stops reading fills
    /// the socket buffers and blocks the write; past this deadline that is
    /// an error (`write_stall`), not a quiet gap in the messages sent.
    pub fn write_deadline(&self, first_ns: Option<u64>, now: Instant) -> Instant {
        let own = first_ns.map_or(now, |ns| self.clock.at(ns)) + self.timeout;
        self.deadline().map_or(own, |d| d.min(own))
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Checks a received payload, recording the outcome.
    pub fn on_payload(&mut self, bytes: &[u8], now: Instant, rec: &Recorder) -> Echo {
        let now_ns = self.clock.ns(now);
        let header = payload::decode(bytes, self.size);
        match &mut self.receiving {
            Receiving::Nothing => {
                rec.error(self.id, ErrorKind::UnexpectedMessage);
                Echo::Bad
            }
            Receiving::From { publisher, next } => {
                let Some(h) = header.filter(|h| h.conn == *publisher) else {
                    rec.error(self.id, ErrorKind::EchoMismatch);
                    return Echo::Bad;
                };
                let expected = next.unwrap_or(h.seq);
                if h.seq < expected {
                    rec.error(self.id, ErrorKind::EchoOutOfOrder);
                    return Echo::Bad;
                }
                for _ in expected..h.seq {
                    rec.error(self.id, ErrorKind::EchoLost);
                }
                *next = Some(h.seq + 1);
                let latency = now_ns.saturating_sub(h.scheduled_ns) / 1000;
                rec.received(self.id, latency);
                Echo::Ok(latency)
            }
            Receiving::Echo => {
                let Some(h) = header.filter(|h| h.conn == self.id) else {
                    // Corrupted: it stands for the oldest outstanding message.
                    self.outstanding.pop_front();
                    rec.error(self.id, ErrorKind::EchoMismatch);
                    return Echo::Bad;
                };
                let Some(pos) = self.outstanding.iter().position(|&(seq, _)| seq == h.seq) else {
                    // Not outstanding: a duplicate, or sent long ago.
                    let kind = if self.outstanding.is_empty() && h.seq >= self.next_seq {
                        ErrorKind::UnexpectedMessage
                    } else {
                        ErrorKind::EchoOutOfOrder
                    };
                    rec.error(self.id, kind);
                    return Echo::Bad;
                };
                // Older messages that were skipped will not come anymore.
                for _ in 0..pos {
                    self.outstanding.pop_front();
                    rec.error(self.id, ErrorKind::EchoLost);
                }
                let (_, scheduled_ns) = self.outstanding.pop_front().expect("position was found");
                if scheduled_ns != h.scheduled_ns {
                    rec.error(self.id, ErrorKind::EchoMismatch);
                    return Echo::Bad;
                }
                let latency = now_ns.saturating_sub(scheduled_ns) / 1000;
                rec.received(self.id, latency);
                Echo::Ok(latency)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(rate: Rate) -> (Flow, Recorder) {
        (Flow::echo(1, 32, rate, 2, Duration::from_secs(1), Clock::new()), Recorder::new(1))
    }

    #[tokio::test(start_paused = true)]
    async fn open_model_sends_overdue_messages_and_counts_latency_from_schedule() {
        let (mut f, rec) = flow(Rate::PerSecond(10.0));
        // 1 s passes without the sender getting a chance: ~10 overdue messages.
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(m) = f.next_due(now) {
            due.push(m);
        }
        assert!((9..=11).contains(&due.len()), "{}", due.len());
        let first = f.payload(due[0].0, due[0].1);
        // The echo of the first message arrives now: its latency includes the
        // time it waited to be sent, not only the round trip.
        let echo = f.on_payload(&first, now, &rec);
        assert!(matches!(echo, Echo::Ok(l) if l >= 900_000), "{echo:?}");
        assert_eq!(f.outstanding(), due.len() - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_keeps_in_flight() {
        let (mut f, rec) = flow(Rate::Max);
        let now = Instant::now();
        let a = f.next_due(now).unwrap();
        let _b = f.next_due(now).unwrap();
        assert_eq!(f.next_due(now), None);
        assert_eq!(f.on_payload(&f.payload(a.0, a.1), now, &rec), Echo::Ok(0));
        assert!(f.next_due(now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn faults_are_errors_of_the_right_kind_not_samples() {
        let (mut f, rec) = flow(Rate::Max);
        let now = Instant::now();
        let a = f.next_due(now).unwrap();
        let b = f.next_due(now).unwrap();
        let mut bad = f.payload(a.0, a.1);
        bad[30] ^= 0xff;
        assert_eq!(f.on_payload(&bad, now, &rec), Echo::Bad);
        // Duplicate of a message already consumed.
        assert_eq!(f.on_payload(&f.payload(a.0, a.1), now, &rec), Echo::Bad);
        let c = f.next_due(now).unwrap();
        // b is skipped: c arrives first.
        assert!(matches!(f.on_payload(&f.payload(c.0, c.1), now, &rec), Echo::Ok(_)));
        let _ = b;
        let t = rec.take();
        assert_eq!(t.errors.get("echo_mismatch"), Some(&1));
        assert_eq!(t.errors.get("echo_out_of_order"), Some(&1));
        assert_eq!(t.errors.get("echo_lost"), Some(&1));
        assert_eq!(t.received, 1);
        assert_eq!(t.latency.count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn outstanding_messages_time_out() {
        let (mut f, _rec) = flow(Rate::Max);
        let now = Instant::now();
        f.next_due(now).unwrap();
        assert!(!f.timed_out(now));
        assert_eq!(f.next_wake(), Some(now + Duration::from_secs(1)));
        assert!(f.timed_out(now + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_must_complete_within_the_oldest_messages_timeout() {
        let clock = Clock::new();
        let mut f = Flow::echo(1, 32, Rate::Max, 2, Duration::from_secs(1), clock);
        let t0 = Instant::now();
        // Only acknowledgements to write: the timeout from now.
        assert_eq!(f.write_deadline(None, t0), t0 + Duration::from_secs(1));
        let (_, ns) = f.next_due(t0).unwrap();
        tokio::time::advance(Duration::from_millis(300)).await;
        let t1 = Instant::now();
        let (_, ns1) = f.next_due(t1).unwrap();
        // The oldest outstanding message (sent at t0) sets the deadline of a
        // write of the newer one.
        assert_eq!(f.write_deadline(Some(ns1), t1), clock.at(ns) + Duration::from_secs(1));
        // A fan-out publisher keeps nothing outstanding: its own message does.
        let mut p = Flow::publisher(2, 32, Rate::PerSecond(10.0), Duration::from_secs(1), clock);
        tokio::time::advance(Duration::from_millis(500)).await;
        let now = Instant::now();
        let (_, first) = p.next_due(now).unwrap();
        assert_eq!(p.write_deadline(Some(first), now), clock.at(first) + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn subscriber_checks_order_from_first_message() {
        let rec = Recorder::new(1);
        let clock = Clock::new();
        let mut publisher = Flow::publisher(9, 32, Rate::PerSecond(1000.0), Duration::from_secs(1), clock);
        let mut sub = Flow::subscriber(2, 9, 32, Duration::from_secs(1), clock);
        tokio::time::advance(Duration::from_millis(10)).await;
        let now = Instant::now();
        let mut msgs = Vec::new();
        while let Some((seq, ns)) = publisher.next_due(now) {
            msgs.push(publisher.payload(seq, ns));
        }
        assert!(msgs.len() >= 5);
        assert!(matches!(sub.on_payload(&msgs[1], now, &rec), Echo::Ok(_)));
        assert!(matches!(sub.on_payload(&msgs[3], now, &rec), Echo::Ok(_)));
        assert_eq!(sub.on_payload(&msgs[2], now, &rec), Echo::Bad);
        let t = rec.take();
        assert_eq!((t.received, t.errors["echo_lost"], t.errors["echo_out_of_order"]), (2, 1, 1));
    }
}
