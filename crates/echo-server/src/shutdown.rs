//! The shutdown signal every task of the server listens to.
//!
//! All tasks run on one thread, so the flag is a plain `Cell`: no atomics and
//! no locks are needed to read it. `Notify::notify_waiters` wakes every task
//! that is waiting at that moment; a task that checks the flag first and then
//! waits cannot miss the signal, because nothing else runs in between.

use std::cell::Cell;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Broadcasts "stop now" with a deadline for finishing the closing handshakes.
#[derive(Debug, Default)]
pub struct Shutdown {
    deadline: Cell<Option<Instant>>,
    notify: Notify,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown; tasks have `grace` to finish. Calling it again
    /// does nothing.
    pub fn trigger(&self, grace: Duration) {
        if self.deadline.get().is_none() {
            self.deadline.set(Some(Instant::now() + grace));
            self.notify.notify_waiters();
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.deadline.get().is_some()
    }

    /// When the grace period ends, once the shutdown has started.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.get()
    }

    /// Completes once the shutdown has started.
    pub async fn wait(&self) {
        if self.is_triggered() {
            return;
        }
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_and_late_callers_return_at_once() {
        let shutdown = std::rc::Rc::new(Shutdown::new());
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let s = shutdown.clone();
                let waiter = tokio::task::spawn_local(async move { s.wait().await });
                tokio::task::yield_now().await;
                assert!(!shutdown.is_triggered());
                shutdown.trigger(Duration::from_secs(1));
                waiter.await.unwrap();
                shutdown.wait().await;
                let first = shutdown.deadline().unwrap();
                shutdown.trigger(Duration::from_secs(60));
                assert_eq!(shutdown.deadline().unwrap(), first, "second trigger keeps the deadline");
            })
            .await;
    }
}
