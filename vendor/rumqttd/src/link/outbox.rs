//! echo-server patch: the notifications the router has for one link and the
//! link's wake-up, in one shared record. Was a bounded flume channel of `()`
//! used only to wake the link (its shared state ~250 bytes per client, and
//! the hook its async receive allocated while the link waited) beside an
//! `Arc<Mutex<VecDeque>>` for the queue: three allocations per idle client
//! where this is one.
//!
//! Wake-ups coalesce: however many the router sends before the link looks,
//! the link wakes once and takes the whole queue (as it did with the
//! channel, whose later wake-ups then found the queue empty).

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::Notification;

/// The shared record: the router's end is `OutboxTx` (in `Outgoing`), the
/// link's is `LinkRx`.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// A lock of its own: the router wakes the link while it holds the
    /// queue (as it sent on the channel while it held the buffer).
    queue: Mutex<VecDeque<Notification>>,
    state: Mutex<State>,
    /// Wakes a thread blocked in `wait` (rumqttd's blocking `LinkRx::recv`
    /// and `LinkBuilder::build`).
    ready: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The router woke the link since it last looked.
    woken: bool,
    /// The router dropped its end: no more wake-ups will come.
    closed: bool,
    /// The task awaiting `wait_async`, if any.
    waker: Option<Waker>,
}

/// The router dropped its end of the link (what a disconnected flume
/// channel meant).
#[derive(Debug)]
pub(crate) struct Closed;

/// Why `wait` returned without a wake-up.
#[derive(Debug)]
pub(crate) enum WaitError {
    Closed,
    Timeout,
}

impl Outbox {
    /// The queue of notifications for the link.
    pub(crate) fn lock(&self) -> MutexGuard<'_, VecDeque<Notification>> {
        self.queue.lock()
    }

    /// The queue's contents, leaving it empty and unallocated.
    pub(crate) fn take(&self) -> VecDeque<Notification> {
        std::mem::take(&mut *self.queue.lock())
    }

    fn signal(&self, close: bool) {
        let waker = {
            let mut state = self.state.lock();
            if close {
                state.closed = true;
            } else {
                state.woken = true;
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        self.ready.notify_all();
    }

    /// Blocks the thread until the router wakes the link (or `deadline`).
    pub(crate) fn wait(&self, deadline: Option<Instant>) -> Result<(), WaitError> {
        let mut state = self.state.lock();
        loop {
            if state.woken {
                state.woken = false;
                return Ok(());
            }
            if state.closed {
                return Err(WaitError::Closed);
            }
            match deadline {
                None => self.ready.wait(&mut state),
                Some(deadline) => {
                    if self.ready.wait_until(&mut state, deadline).timed_out() && !state.woken {
                        return Err(if state.closed { WaitError::Closed } else { WaitError::Timeout });
                    }
                }
            }
        }
    }

    /// Waits for the router to wake the link. The future holds only a
    /// reference: no allocation while it waits.
    pub(crate) async fn wait_async(&self) -> Result<(), Closed> {
        std::future::poll_fn(|cx| {
            let mut state = self.state.lock();
            if state.woken {
                state.woken = false;
                return Poll::Ready(Ok(()));
            }
            if state.closed {
                return Poll::Ready(Err(Closed));
            }
            match &state.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => state.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Forgets the waiting task: the link is going away, and the stored
    /// waker would keep its task's allocation alive as long as the router
    /// keeps its end.
    pub(crate) fn forget_waiter(&self) {
        self.state.lock().waker = None;
    }
}

/// The router's end of a link's outbox: queues notifications and wakes the
/// link; dropping it tells the link the router let it go.
#[derive(Debug)]
pub(crate) struct OutboxTx(Arc<Outbox>);

impl OutboxTx {
    pub(crate) fn new() -> Self {
        OutboxTx(Arc::default())
    }

    /// The link's end.
    pub(crate) fn outbox(&self) -> Arc<Outbox> {
        self.0.clone()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, VecDeque<Notification>> {
        self.0.lock()
    }

    /// Wakes the link (was `handle.try_send(())`).
    pub(crate) fn wake(&self) {
        self.0.signal(false);
    }
}

impl Drop for OutboxTx {
    fn drop(&mut self) {
        self.0.signal(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wakeups_coalesce_and_close_comes_after_them() {
        let tx = OutboxTx::new();
        let outbox = tx.outbox();
        {
            // the router wakes the link while it holds the queue
            let mut queue = tx.lock();
            queue.push_back(Notification::Unschedule);
            tx.wake();
        }
        tx.wake();
        outbox.wait(None).expect("woken");
        assert_eq!(outbox.take().len(), 1);
        assert!(matches!(
            outbox.wait(Some(Instant::now() + Duration::from_millis(1))),
            Err(WaitError::Timeout)
        ));
        tx.wake();
        drop(tx);
        outbox.wait(None).expect("the wake-up sent before closing");
        assert!(matches!(outbox.wait(None), Err(WaitError::Closed)));
    }

    #[test]
    fn a_blocked_thread_wakes() {
        let tx = OutboxTx::new();
        let outbox = tx.outbox();
        let waiter = std::thread::spawn(move || outbox.wait(None).is_ok());
        tx.wake();
        assert!(waiter.join().unwrap());
    }

    #[tokio::test]
    async fn a_task_wakes_and_learns_of_the_close() {
        let tx = OutboxTx::new();
        let outbox = tx.outbox();
        let waiter = tokio::spawn(async move {
            let first = outbox.wait_async().await.is_ok();
            let second = outbox.wait_async().await.is_err();
            first && second
        });
        tokio::task::yield_now().await;
        tx.wake();
        tokio::task::yield_now().await;
        drop(tx);
        assert!(waiter.await.unwrap());
    }
}
