//! The message state of one connection: what is due, what is outstanding,
//! and whether each echo is the right one. Transport-independent, so the
//! WebSocket and MQTT drivers share exactly the same checks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
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

/// How soon a fan-out subscriber looks again when a message is past its
/// deadline but its publisher has not even written it yet (the publisher
/// is behind; it fails with `write_stall` itself if it stays so).
const FEED_POLL: Duration = Duration::from_millis(10);

/// What a fan-out group's publisher has sent, shared with the group's
/// subscribers, so that each of them knows which messages it is owed and
/// since when. A group lives in one worker (groups are dealt out whole).
///
/// The publisher starts sending only once every subscriber of its group is
/// subscribed (or has failed), so every subscriber is owed every message,
/// from the first: a message missing at the head, in the middle or at the
/// tail is counted, not just gaps after the first message seen.
pub struct Feed {
    state: watch::Sender<FeedState>,
    /// Messages the publisher has written to the broker so far.
    published: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
struct FeedState {
    /// Subscribers of the group not yet subscribed or failed.
    unsettled: u32,
    /// The publisher's schedule, once it sends: message `k` is due at `due(k)`.
    schedule: Option<Schedule>,
    /// The publisher is gone: no message after `published` will come.
    ended: bool,
}

impl Feed {
    /// The feed of a group of `subscribers` subscribers.
    pub fn new(subscribers: u32) -> Feed {
        let state = FeedState { unsettled: subscribers, ..FeedState::default() };
        Feed { state: watch::Sender::new(state), published: AtomicU64::new(0) }
    }

    /// A subscriber is subscribed, or has failed: either way the publisher
    /// need not wait for it.
    pub fn settled(&self) {
        self.state.send_modify(|s| s.unsettled = s.unsettled.saturating_sub(1));
    }

    /// Waits until every subscriber has settled; false if `stop` came first.
    pub async fn wait_for_subscribers(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let mut state = self.state.subscribe();
        tokio::select! {
            r = state.wait_for(|s| s.unsettled == 0) => r.is_ok(),
            _ = stop.wait_for(|stop| *stop) => false,
        }
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }
}

/// Marks a subscriber settled when dropped (subscribed, failed, or gone),
/// so that a failure cannot leave its publisher waiting.
pub struct Settle(Option<Arc<Feed>>);

impl Settle {
    pub fn new(feed: Option<Arc<Feed>>) -> Settle {
        Settle(feed)
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if let Some(feed) = self.0.take() {
            feed.settled();
        }
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
    /// Nothing comes back (a fan-out publisher, which tells its `Feed`
    /// what it sent).
    Nothing { feed: Arc<Feed> },
    /// Deliveries of another connection's messages (a fan-out subscriber):
    /// every message the publisher wrote, from its first, in order.
    From { publisher: u32, next: u64, feed: Arc<Feed>, state: watch::Receiver<FeedState> },
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

impl Drop for Flow {
    fn drop(&mut self) {
        if let Receiving::Nothing { feed } = &self.receiving {
            feed.state.send_modify(|s| s.ended = true);
        }
    }
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

    /// A fan-out publisher: sends at `rate`, expects nothing back, and
    /// tells its subscribers through `feed` what it sent. Its schedule
    /// starts now: make it once the subscribers are subscribed.
    pub fn publisher(
        id: u32,
        size: usize,
        rate: Rate,
        timeout: Duration,
        clock: Clock,
        feed: Arc<Feed>,
    ) -> Flow {
        let rate = if rate == Rate::Max { Rate::PerSecond(1000.0) } else { rate };
        let flow = Flow::new(id, size, rate, 1, timeout, clock, Receiving::Nothing { feed: feed.clone() });
        let schedule = match &flow.sending {
            Sending::Open(s) => Some(*s),
            _ => None,
        };
        feed.state.send_modify(|s| s.schedule = schedule);
        flow
    }

    /// A fan-out subscriber of `publisher`'s messages, as told by `feed`.
    pub fn subscriber(
        id: u32,
        publisher: u32,
        size: usize,
        timeout: Duration,
        clock: Clock,
        feed: Arc<Feed>,
    ) -> Flow {
        let state = feed.state.subscribe();
        Flow::new(
            id,
            size,
            Rate::Idle,
            1,
            timeout,
            clock,
            Receiving::From { publisher, next: 0, feed, state },
        )
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
    /// or the oldest outstanding one times out. (A subscriber also wakes
    /// when its feed changes: [`Flow::feed_changed`].)
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        let due = match &self.sending {
            Sending::Open(s) => {
                Some(s.due(self.next_seq).checked_sub(TIMER_SLACK).unwrap_or(s.due(self.next_seq)))
            }
            _ => None,
        };
        let deadline = match &self.receiving {
            Receiving::From { next, feed, state, .. } => {
                let st = *state.borrow();
                match st.schedule {
                    None => None,
                    Some(sch) if feed.published() > *next => Some(sch.due(*next) + self.timeout),
                    Some(_) if st.ended => None,
                    // Not written yet: look again at its deadline, or soon
                    // if that has passed (the publisher is behind).
                    Some(sch) => Some((sch.due(*next) + self.timeout).max(now + FEED_POLL)),
                }
            }
            _ => self.deadline(),
        };
        match (due, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Resolves when a subscriber's feed changes — its publisher starts or
    /// ends (or, while ramping, another subscriber of the group settles) —
    /// so its deadlines are looked at again; never for other connections.
    pub async fn feed_changed(&mut self) {
        match &mut self.receiving {
            Receiving::From { state, .. } => {
                if state.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ => std::future::pending().await,
        }
    }

    /// `n` messages were written to the server (a publisher tells its subscribers).
    pub fn written(&self, n: u64) {
        if let Receiving::Nothing { feed } = &self.receiving {
            feed.published.fetch_add(n, Ordering::Release);
        }
    }

    /// True when the oldest outstanding message waited longer than the timeout.
    pub fn timed_out(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// When the oldest outstanding message times out. For a subscriber:
    /// the next message it is owed, once the publisher has written it.
    fn deadline(&self) -> Option<Instant> {
        match &self.receiving {
            Receiving::From { next, feed, state, .. } => {
                let schedule = state.borrow().schedule?;
                (feed.published() > *next).then(|| schedule.due(*next) + self.timeout)
            }
            _ => self.outstanding.front().map(|&(_, ns)| self.clock.at(ns) + self.timeout),
        }
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
            Receiving::Nothing { .. } => {
                rec.error(self.id, ErrorKind::UnexpectedMessage);
                Echo::Bad
            }
            Receiving::From { publisher, next, .. } => {
                let Some(h) = header.filter(|h| h.conn == *publisher) else {
                    rec.error(self.id, ErrorKind::EchoMismatch);
                    return Echo::Bad;
                };
                if h.seq < *next {
                    rec.error(self.id, ErrorKind::EchoOutOfOrder);
                    return Echo::Bad;
                }
                // Owed from the publisher's first message: skipped ones,
                // also before the first one seen, will not come.
                for _ in *next..h.seq {
                    rec.error(self.id, ErrorKind::EchoLost);
                }
                *next = h.seq + 1;
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
        assert_eq!(f.next_wake(now), Some(now + Duration::from_secs(1)));
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
        let mut p = Flow::publisher(
            2,
            32,
            Rate::PerSecond(10.0),
            Duration::from_secs(1),
            clock,
            Arc::new(Feed::new(0)),
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        let now = Instant::now();
        let (_, first) = p.next_due(now).unwrap();
        assert_eq!(p.write_deadline(Some(first), now), clock.at(first) + Duration::from_secs(1));
    }

    /// A publisher and one subscriber of a group, and the payloads of the
    /// publisher's first `n` messages, written 10 ms into the run.
    async fn group(n: usize) -> (Flow, Flow, Vec<Vec<u8>>, Recorder) {
        let clock = Clock::new();
        let feed = Arc::new(Feed::new(1));
        let sub = Flow::subscriber(2, 9, 32, Duration::from_secs(1), clock, feed.clone());
        drop(Settle::new(Some(feed.clone())));
        let (_tx, mut stop) = watch::channel(false);
        assert!(feed.wait_for_subscribers(&mut stop).await, "the only subscriber settled");
        let mut publisher =
            Flow::publisher(9, 32, Rate::PerSecond(1000.0), Duration::from_secs(1), clock, feed.clone());
        tokio::time::advance(Duration::from_millis(10)).await;
        let now = Instant::now();
        let mut msgs = Vec::new();
        while msgs.len() < n
            && let Some((seq, ns)) = publisher.next_due(now)
        {
            msgs.push(publisher.payload(seq, ns));
        }
        assert_eq!(msgs.len(), n);
        publisher.written(n as u64);
        (publisher, sub, msgs, Recorder::new(1))
    }

    #[tokio::test(start_paused = true)]
    async fn subscriber_is_owed_every_message_from_the_publishers_first() {
        let (_publisher, mut sub, msgs, rec) = group(5).await;
        let now = Instant::now();
        // Messages 0 and 1 never come: lost, though no message was seen before.
        assert!(matches!(sub.on_payload(&msgs[2], now, &rec), Echo::Ok(_)));
        assert!(matches!(sub.on_payload(&msgs[4], now, &rec), Echo::Ok(_)));
        assert_eq!(sub.on_payload(&msgs[3], now, &rec), Echo::Bad);
        let t = rec.take();
        assert_eq!((t.received, t.errors["echo_lost"], t.errors["echo_out_of_order"]), (2, 3, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn subscriber_times_out_when_a_written_message_is_not_delivered() {
        let (publisher, mut sub, msgs, rec) = group(3).await;
        let now = Instant::now();
        assert!(matches!(sub.on_payload(&msgs[0], now, &rec), Echo::Ok(_)));
        assert!(!sub.timed_out(now));
        // Message 1 is owed from its due time; a second later it is late.
        let deadline = sub.next_wake(now).unwrap();
        assert!(
            deadline > now + Duration::from_millis(980) && deadline <= now + Duration::from_secs(1),
            "{deadline:?}"
        );
        assert!(!sub.timed_out(deadline - Duration::from_millis(1)));
        assert!(sub.timed_out(deadline));
        // Delivered in time instead: the deadline moves on to the next one.
        assert!(matches!(sub.on_payload(&msgs[1], now, &rec), Echo::Ok(_)));
        assert!(matches!(sub.on_payload(&msgs[2], now, &rec), Echo::Ok(_)));
        // Everything written was delivered: nothing is owed yet, but the
        // subscriber looks again when message 3 would be late.
        assert!(!sub.timed_out(now + Duration::from_secs(5)));
        let next = sub.next_wake(now).unwrap();
        assert!(next > deadline, "{next:?}");
        // A publisher gone: nothing more is owed, no more wakes.
        drop(publisher);
        sub.feed_changed().await;
        assert_eq!(sub.next_wake(now), None);
        assert!(!sub.timed_out(now + Duration::from_secs(60)));
        assert_eq!(rec.take().error_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_not_yet_written_is_not_owed_and_costs_no_busy_loop() {
        let (_publisher, mut sub, msgs, rec) = group(1).await;
        let now = Instant::now();
        assert!(matches!(sub.on_payload(&msgs[0], now, &rec), Echo::Ok(_)));
        // Message 1 is due ~1 ms later; 5 s on it is long past its deadline,
        // but the publisher has not written it: not a timeout, and the next
        // look is a poll interval away, not in the past.
        let later = now + Duration::from_secs(5);
        assert!(!sub.timed_out(later));
        assert_eq!(sub.next_wake(later), Some(later + FEED_POLL));
    }

    #[tokio::test(start_paused = true)]
    async fn publisher_waits_for_its_subscribers_and_a_failed_one_counts_as_settled() {
        let feed = Arc::new(Feed::new(2));
        let (tx, mut stop) = watch::channel(false);
        let first = Settle::new(Some(feed.clone()));
        let waiting = tokio::time::timeout(Duration::from_secs(1), feed.wait_for_subscribers(&mut stop));
        assert!(waiting.await.is_err(), "two subscribers outstanding");
        drop(first);
        // The second failed: its guard is dropped without subscribing.
        drop(Settle::new(Some(feed.clone())));
        assert!(feed.wait_for_subscribers(&mut stop).await);
        // Stopping ends the wait too.
        let feed = Feed::new(1);
        tx.send(true).unwrap();
        assert!(!feed.wait_for_subscribers(&mut stop).await);
    }
}
