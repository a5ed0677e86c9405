use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    logs::Origin,
    scheduler::{PauseReason, Tracker},
    ConnectionEvents,
};

pub struct Graveyard {
    connections: HashMap<String, SavedState>,
    /// echo-server patch: saved sessions that expire (MQTT 5 session expiry
    /// interval), soonest first. An entry whose session was taken back or
    /// saved again with another deadline is skipped when it comes up.
    expiries: BinaryHeap<Reverse<(Instant, String)>>,
    /// echo-server patch: sessions forgotten since the router last asked
    /// (`take_expired`), so that it can release what they held.
    expired: Vec<SessionState>,
    /// echo-server patch: `connections.len()`, for the embedding server
    /// (`Router::kept_sessions`).
    kept: Arc<AtomicU64>,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
            expiries: BinaryHeap::new(),
            expired: Vec::new(),
            kept: Arc::default(),
        }
    }

    /// echo-server patch: the count of saved sessions, kept up to date.
    pub fn kept(&self) -> Arc<AtomicU64> {
        self.kept.clone()
    }

    /// echo-server patch: `kept` follows `connections`.
    fn counted(&self) {
        self.kept.store(self.connections.len() as u64, Ordering::Relaxed);
    }

    /// Add a new connection.
    /// Return tracker of previous connection if connection id already exists
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        self.purge(Instant::now());
        let saved = self.connections.remove(id);
        self.counted();
        saved
    }

    /// echo-server patch: forgets the sessions whose expiry has passed.
    /// Called whenever a session is saved or taken back, which is when the
    /// answer matters; memory of sessions that expire while nobody connects
    /// or disconnects is freed at the next of those.
    fn purge(&mut self, now: Instant) {
        while let Some(Reverse((deadline, _))) = self.expiries.peek() {
            if *deadline > now {
                break;
            }
            let Reverse((deadline, id)) = self.expiries.pop().unwrap();
            if self.connections.get(&id).is_some_and(|s| s.expires_at == Some(deadline)) {
                if let Some(state) = self.connections.remove(&id).and_then(|s| s.session_state) {
                    self.expired.push(state);
                }
            }
        }
    }

    /// echo-server patch: the sessions forgotten since the last call.
    pub fn take_expired(&mut self) -> Vec<SessionState> {
        std::mem::take(&mut self.expired)
    }

    /// echo-server patch: the saved sessions, for a snapshot.
    pub fn saved(&self) -> impl Iterator<Item = &SavedState> {
        self.connections.values()
    }

    /// echo-server patch: the trackers of the saved sessions: their
    /// requests, whose cursors hold the logs (`queues`).
    pub fn trackers_mut(&mut self) -> impl Iterator<Item = &mut Tracker> {
        self.connections
            .values_mut()
            .filter_map(|s| s.session_state.as_mut())
            .map(|s| &mut s.tracker)
    }

    /// echo-server patch: how many sessions are saved.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    /// Save connection tracker
    #[allow(clippy::too_many_arguments)]
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        subscription_ids: HashMap<String, usize>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
        expiry: Option<Duration>,
        origin: Origin,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();
        let now = Instant::now();
        self.purge(now);
        // A deadline too far to represent is no deadline.
        let expires_at = expiry.and_then(|e| now.checked_add(e));
        if let Some(deadline) = expires_at {
            self.expiries.push(Reverse((deadline, id.clone())));
        }

        let session_state = SessionState {
            tracker,
            subscriptions,
            subscription_ids,
            unacked_pubrels,
            origin,
        };

        self.connections.insert(
            id,
            SavedState {
                session_state: Some(session_state),
                metrics,
                expires_at,
            },
        );
        self.counted();
    }

    /// Save only metrics for connection
    pub fn save_metrics(&mut self, id: String, metrics: ConnectionEvents) {
        self.connections.insert(
            id,
            SavedState {
                session_state: None,
                metrics,
                expires_at: None,
            },
        );
        self.counted();
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
    /// echo-server patch: when the session expires (`None`: never).
    pub expires_at: Option<Instant>,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    /// echo-server patch: the subscriptions' MQTT 5 Subscription
    /// Identifiers, which a resumed session's deliveries keep carrying
    /// (0.20.0 lost them with the connection).
    pub subscription_ids: HashMap<String, usize>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
    /// echo-server patch: the session's mark on what it publishes (No
    /// Local), which it keeps when it resumes.
    pub origin: Origin,
}

#[cfg(test)]
mod echo_server_patch {
    use super::*;
    use std::thread::sleep;

    fn save(graveyard: &mut Graveyard, id: &str, expiry: Option<Duration>) {
        let tracker = Tracker::new(id.to_owned());
        let metrics = ConnectionEvents::default();
        graveyard.save_state(tracker, HashSet::new(), HashMap::new(), metrics, VecDeque::new(), expiry, 1);
    }

    /// A session is there until its expiry, then gone, and its memory is
    /// freed when any other session is saved or taken back.
    #[test]
    fn sessions_expire_and_are_forgotten() {
        let mut graveyard = Graveyard::new();
        save(&mut graveyard, "short", Some(Duration::from_millis(50)));
        save(&mut graveyard, "forever", None);
        save(&mut graveyard, "long", Some(Duration::from_secs(3600)));
        assert!(graveyard.retrieve("short").is_some());
        save(&mut graveyard, "short", Some(Duration::from_millis(50)));
        sleep(Duration::from_millis(80));
        assert_eq!(graveyard.len(), 3, "nothing purged before the next call");
        assert!(graveyard.retrieve("short").is_none(), "expired");
        assert_eq!(graveyard.len(), 2);
        assert!(graveyard.retrieve("forever").is_some());
        assert!(graveyard.retrieve("long").is_some());
        assert!(graveyard.expiries.len() <= 1, "stale deadlines are dropped as they come up");
    }

    /// A deadline left over from an earlier save does not end the session
    /// saved again since with a longer expiry, and an expiry too long for
    /// the clock is none.
    #[test]
    fn a_stale_deadline_does_not_end_a_newer_session() {
        let mut graveyard = Graveyard::new();
        save(&mut graveyard, "c", Some(Duration::from_millis(30)));
        assert!(graveyard.retrieve("c").is_some());
        save(&mut graveyard, "c", Some(Duration::from_secs(3600)));
        save(&mut graveyard, "huge", Some(Duration::from_secs(u64::MAX)));
        sleep(Duration::from_millis(50));
        assert!(graveyard.retrieve("c").is_some(), "the first deadline was for the old session");
        assert!(graveyard.retrieve("huge").is_some());
    }
}
