//! One timer for every session's keep-alive, which also brings each
//! session the shutdown.
//!
//! A tokio `Sleep` per session is a timer entry inside every session's
//! future, and waiting on the shutdown is a `Notified` beside it; an idle
//! connection is mostly that future. Instead every session sets an
//! [`Alarm`]: its task's waker filed under its deadline in one ordered map
//! ([`Alarms`]), which one task ([`run`]) sleeps on: it wakes the sessions
//! whose deadline has passed (each then decides for itself, as it did with
//! its own timer) and, at shutdown, all of them. The idea is that of the
//! `/.sse` streams' one `Ticker`, but a ticker wakes every stream at every
//! tick, where a session is woken only when its own deadline is due.
//!
//! Deadlines are rounded up to a [`TICK`], so that sessions due together
//! are woken by one pass: a silent client is ended up to a tick late, never
//! early. A session with keep-alive 0 sets no deadline and is woken only by
//! the shutdown.
//!
//! All of it runs on the one event-loop thread: a `RefCell` and `Cell`s, no
//! locks.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::shutdown::Shutdown;

/// Deadlines are rounded up to this. The keep-alive is in seconds; a
/// tenth of one late is nothing to a client, and a pass wakes every session
/// due within it.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// The tick of a deadline that never comes (keep-alive 0).
const NEVER: u64 = u64::MAX;

/// A waiting session: its deadline's tick, then a number unique to this
/// wait (sessions due in the same tick are apart).
type Key = (u64, u64);

/// The deadlines of all the sessions of one event loop.
#[derive(Debug)]
pub(crate) struct Alarms {
    shutdown: Rc<Shutdown>,
    /// Tick 0.
    origin: Instant,
    waiting: RefCell<BTreeMap<Key, Waker>>,
    /// The last number given to a wait (0: none yet).
    last_id: Cell<u64>,
    /// The tick the task sleeps until ([`NEVER`]: none).
    target: Cell<u64>,
    /// Whether the task has been started (it runs until the shutdown).
    running: Cell<bool>,
    /// Tells the task a deadline earlier than its `target` came in.
    rearm: Notify,
}

impl Alarms {
    pub(crate) fn new(shutdown: Rc<Shutdown>) -> Rc<Alarms> {
        Rc::new(Alarms {
            shutdown,
            origin: Instant::now(),
            waiting: RefCell::new(BTreeMap::new()),
            last_id: Cell::new(0),
            target: Cell::new(NEVER),
            running: Cell::new(false),
            rearm: Notify::new(),
        })
    }

    /// The first tick at or after `at`.
    fn tick_after(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin);
        let tick = TICK.as_nanos();
        since.as_nanos().div_ceil(tick).min(u128::from(NEVER - 1)) as u64
    }

    /// The last tick that has begun at `now`.
    fn tick_at(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / TICK.as_nanos()) as u64
    }

    /// When `tick` begins (thirty years on for [`NEVER`]).
    fn instant_of(&self, tick: u64) -> Instant {
        let far = || self.origin + Duration::from_secs(86_400 * 365 * 30);
        u32::try_from(tick).ok().and_then(|tick| self.origin.checked_add(TICK * tick)).unwrap_or_else(far)
    }

    /// Files `waker` under `key`, starting the task or bringing its
    /// wake-up forward if need be.
    fn file(self: &Rc<Self>, key: Key, waker: Waker) {
        self.waiting.borrow_mut().insert(key, waker);
        if !self.running.replace(true) {
            tokio::task::spawn_local(run(self.clone()));
        }
        if key.0 < self.target.get() {
            self.target.set(key.0);
            self.rearm.notify_one();
        }
    }

    fn next_id(&self) -> u64 {
        let id = self.last_id.get() + 1;
        self.last_id.set(id);
        id
    }

    /// How many sessions wait (for the tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.borrow().len()
    }
}

/// The task: sleeps until the earliest deadline, wakes the sessions whose
/// deadline has passed; at the shutdown wakes every session and ends.
async fn run(alarms: Rc<Alarms>) {
    let sleep = tokio::time::sleep_until(alarms.instant_of(NEVER));
    tokio::pin!(sleep);
    loop {
        let first = alarms.waiting.borrow().first_key_value().map_or(NEVER, |(key, _)| key.0);
        alarms.target.set(first);
        sleep.as_mut().reset(alarms.instant_of(first));
        let due = tokio::select! {
            biased;
            _ = alarms.shutdown.wait() => NEVER,
            _ = alarms.rearm.notified() => continue,
            _ = &mut sleep => alarms.tick_at(Instant::now()),
        };
        let woken: Vec<Waker> = {
            let mut waiting = alarms.waiting.borrow_mut();
            let later = match due {
                NEVER => BTreeMap::new(),
                due => waiting.split_off(&(due + 1, 0)),
            };
            std::mem::replace(&mut *waiting, later).into_values().collect()
        };
        woken.into_iter().for_each(Waker::wake);
        if due == NEVER {
            break;
        }
    }
    alarms.running.set(false);
}

/// What an [`Alarm`] woke its session for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rung {
    /// The deadline set has passed (up to a [`TICK`] ago).
    Due,
    Shutdown,
}

/// One session's place in [`Alarms`]: 24 bytes in the session's future
/// (and ~64 in the map: key, waker, its share of the B-tree's nodes) where
/// its own `Sleep` (96 bytes in a release build) and, while it waited, its
/// shutdown's `Notified` (80) were.
#[derive(Debug)]
pub(super) struct Alarm<'a> {
    alarms: &'a Rc<Alarms>,
    /// The tick set ([`NEVER`]: only the shutdown).
    tick: u64,
    /// The number of its entry in the map, 0 while it has none (not yet
    /// polled since set, or rung).
    id: u64,
}

impl<'a> Alarm<'a> {
    /// An alarm for the shutdown only, until [`Alarm::set`].
    pub(super) fn new(alarms: &'a Rc<Alarms>) -> Alarm<'a> {
        Alarm { alarms, tick: NEVER, id: 0 }
    }

    /// Rings once `at` has passed (`None`: never, only at the shutdown).
    pub(super) fn set(&mut self, at: Option<Instant>) {
        let tick = at.map_or(NEVER, |at| self.alarms.tick_after(at));
        if tick == self.tick {
            return;
        }
        let waker = self.unfile();
        self.tick = tick;
        if let Some(waker) = waker {
            self.id = self.alarms.next_id();
            self.alarms.file((self.tick, self.id), waker);
        }
    }

    /// Takes this alarm's entry out of the map, if it has one there.
    fn unfile(&mut self) -> Option<Waker> {
        match std::mem::take(&mut self.id) {
            0 => None,
            id => self.alarms.waiting.borrow_mut().remove(&(self.tick, id)),
        }
    }

    /// Completes at the shutdown, or once the deadline set has passed;
    /// after `Due` it rings no more until set again. Holds nothing across
    /// its wait but a reference: the entry is in the map.
    pub(super) fn rung(&mut self) -> impl Future<Output = Rung> + '_ {
        // `move`: the closure holds `self`, not a reference to each field.
        poll_fn(move |cx| {
            if self.alarms.shutdown.is_triggered() {
                return Poll::Ready(Rung::Shutdown);
            }
            if self.id == 0 {
                if self.tick != NEVER && self.tick <= self.alarms.tick_at(Instant::now()) {
                    self.tick = NEVER;
                    return Poll::Ready(Rung::Due);
                }
                self.id = self.alarms.next_id();
                self.alarms.file((self.tick, self.id), cx.waker().clone());
                return Poll::Pending;
            }
            let mut waiting = self.alarms.waiting.borrow_mut();
            match waiting.get_mut(&(self.tick, self.id)) {
                Some(waker) => {
                    if !waker.will_wake(cx.waker()) {
                        waker.clone_from(cx.waker());
                    }
                    Poll::Pending
                }
                // The task took it out: the deadline has passed (the
                // shutdown is looked at first, above).
                None => {
                    self.id = 0;
                    self.tick = NEVER;
                    Poll::Ready(Rung::Due)
                }
            }
        })
    }
}

impl Drop for Alarm<'_> {
    fn drop(&mut self) {
        self.unfile();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deadlines round up to a tick, never down: a session is never woken
    /// before its deadline.
    #[test]
    fn deadlines_round_up_to_a_tick() {
        let alarms = Alarms::new(Rc::new(Shutdown::new()));
        let origin = alarms.origin;
        assert_eq!(alarms.tick_after(origin), 0);
        assert_eq!(alarms.tick_after(origin + Duration::from_millis(1)), 1);
        assert_eq!(alarms.tick_after(origin + TICK), 1);
        assert_eq!(alarms.tick_at(origin + TICK - Duration::from_nanos(1)), 0);
        assert_eq!(alarms.tick_at(origin + TICK), 1);
        for ms in [1, 99, 100, 101, 1500, 98_302_500] {
            let at = origin + Duration::from_millis(ms);
            assert!(alarms.instant_of(alarms.tick_after(at)) >= at, "{ms} ms");
        }
        assert!(alarms.instant_of(NEVER) > origin + Duration::from_secs(86_400 * 365));
    }

    /// Alarms ring in the order of their deadlines, not before them; one
    /// set to never rings only at the shutdown; a dropped one leaves the
    /// map; at the shutdown every waiting session is woken.
    #[tokio::test(start_paused = true)]
    async fn alarms_ring_when_due_and_all_at_the_shutdown() {
        let shutdown = Rc::new(Shutdown::new());
        let alarms = Alarms::new(shutdown.clone());
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let start = Instant::now();
                let rung = Rc::new(RefCell::new(Vec::new()));
                let wait = |name: &'static str, after: Option<Duration>| {
                    let (alarms, rung) = (alarms.clone(), rung.clone());
                    tokio::task::spawn_local(async move {
                        let mut alarm = Alarm::new(&alarms);
                        alarm.set(after.map(|after| start + after));
                        let why = alarm.rung().await;
                        assert!(why == Rung::Shutdown || Instant::now() >= start + after.unwrap(), "{name}");
                        rung.borrow_mut().push((name, why));
                    })
                };
                let late = wait("1.5 s", Some(Duration::from_millis(1500)));
                let early = wait("0.25 s", Some(Duration::from_millis(250)));
                let never = wait("never", None);
                let dropped = wait("dropped", Some(Duration::from_secs(1)));
                tokio::task::yield_now().await;
                assert_eq!(alarms.len(), 4);
                dropped.abort();
                let _ = dropped.await;
                assert_eq!(alarms.len(), 3, "an alarm dropped leaves the map");
                early.await.unwrap();
                late.await.unwrap();
                assert_eq!(*rung.borrow(), [("0.25 s", Rung::Due), ("1.5 s", Rung::Due)]);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                assert!(!never.is_finished(), "keep-alive 0: never rung for a deadline");
                shutdown.trigger(Duration::from_secs(1));
                never.await.unwrap();
                assert_eq!(rung.borrow().last(), Some(&("never", Rung::Shutdown)));
                assert_eq!(alarms.len(), 0);
                let mut after = Alarm::new(&alarms);
                after.set(Some(Instant::now() + Duration::from_secs(60)));
                assert_eq!(after.rung().await, Rung::Shutdown, "at once, once the shutdown has begun");
            })
            .await;
    }
}
