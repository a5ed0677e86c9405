use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use slab::Slab;
use tracing::trace;

use super::DataRequest;
use crate::{ConnectionId, Filter};

pub struct Scheduler {
    /// Subscriptions and matching topics maintained per connection
    pub trackers: Slab<Tracker>,
    /// Connections with more pending requests and ready to make progress
    pub readyqueue: VecDeque<ConnectionId>,
}

impl Scheduler {
    pub fn with_capacity(capacity: usize) -> Scheduler {
        Scheduler {
            trackers: Slab::with_capacity(capacity),
            readyqueue: VecDeque::with_capacity(capacity),
        }
    }

    pub fn add(&mut self, tracker: Tracker) -> ConnectionId {
        self.trackers.insert(tracker)
    }

    pub fn remove(&mut self, id: ConnectionId) -> Tracker {
        self.trackers.remove(id)
    }

    /// Next connection which is ready to make progress
    pub fn poll(&mut self) -> Option<(ConnectionId, VecDeque<DataRequest>)> {
        let id = self.readyqueue.pop_front()?;
        let tracker = self.trackers.get_mut(id)?;

        // echo-server patch: the tracker's queue itself is taken, leaving an
        // empty one that holds no memory (was `drain(..).collect()`: a new
        // queue per poll, while the tracker kept the capacity it had grown
        // to). Requests caught up are parked in their logs' waiters, so an
        // idle client's tracker is empty; it held room for two requests
        // (~190 bytes) for as long as the client stayed connected.
        let data_requests = std::mem::take(&mut tracker.data_requests);

        // Implicitly reschedule the connection. Router will take care of explicitly pausing if
        // required (it has the state necessary to determine if pausing is required)
        self.readyqueue.push_back(id);
        Some((id, data_requests))
    }

    pub fn track(&mut self, id: ConnectionId, request: DataRequest) {
        let tracker = self.trackers.get_mut(id).unwrap();
        tracker.register_data_request(request);
    }

    /// echo-server patch: takes connection `id`'s request on `filter` out
    /// of its tracker, if there.
    pub fn take_request(&mut self, id: ConnectionId, filter: &str) -> Option<DataRequest> {
        let requests = &mut self.trackers.get_mut(id)?.data_requests;
        let at = requests.iter().position(|r| r.filter == filter)?;
        requests.remove(at)
    }

    pub fn untrack(&mut self, id: ConnectionId, filter: &Filter) {
        let tracker = self.trackers.get_mut(id).unwrap();
        tracker.unregister_data_request(filter.clone());
    }

    /// echo-server patch: an empty `requests` is dropped, so a queue that
    /// `poll` took comes back only with requests in it (and its memory then
    /// serves the tracker again instead of a copy).
    pub fn trackv(&mut self, id: ConnectionId, requests: VecDeque<DataRequest>) {
        if requests.is_empty() {
            return;
        }
        let tracker = self.trackers.get_mut(id).unwrap();
        if tracker.data_requests.is_empty() {
            tracker.data_requests = requests;
        } else {
            tracker.data_requests.extend(requests);
        }
    }

    pub fn reschedule(&mut self, id: ConnectionId, reason: ScheduleReason) {
        let tracker = self.trackers.get_mut(id).unwrap();
        if let Some(v) = tracker.try_ready(reason) {
            trace!(tracker_id = tracker.id, "reschedule {:?} -> Ready", v);
            self.readyqueue.push_back(id);
        }
    }

    pub fn pause(&mut self, id: ConnectionId, reason: PauseReason) {
        assert_eq!(self.readyqueue.pop_back(), Some(id));
        let tracker = self.trackers.get_mut(id).unwrap();

        trace!(
            tracker_id = tracker.id,
            "pause {:?} -> {:?}",
            tracker.status,
            reason
        );
        tracker.pause(reason);
    }
}

/// Used to register a new connection with the router
/// Connection messages encompasses a handle for router to
/// communicate with this connection
/// TODO: Don't expose tracker to the outside world
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tracker {
    pub id: String,
    /// Data requests of all the subscriptions of this connection
    pub data_requests: VecDeque<DataRequest>,
    /// State machine
    pub status: Status,
}

#[derive(Debug, Copy, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Ready,
    Paused(PauseReason),
}

#[derive(Debug, Copy, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleReason {
    Init,
    NewFilter,
    FreshData,
    IncomingAck,
    Ready,
}

#[derive(Debug, Copy, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PauseReason {
    Caughtup,
    InflightFull,
    Busy,
}

impl Tracker {
    pub fn new(client_id: String) -> Tracker {
        // echo-server patch: grows on demand (was room for two requests, kept
        // by every idle client, whose requests wait in their logs' waiters)
        let requests = VecDeque::new();
        Tracker {
            id: client_id,
            data_requests: requests,
            status: Status::Paused(PauseReason::Busy),
        }
    }

    pub fn _reset(&mut self) {
        self.data_requests.clear();
        self.status = Status::Paused(PauseReason::Busy);
    }

    /// Sets the state to ready if correct event to bring out of paused state
    /// is received.
    ///
    /// Doesn't change the state to ready if counter event is not received or
    /// if already in ready state
    ///
    /// Returns Some(previous state) if status is changed to ready.
    /// None return implies either the connection is already ready of the
    /// state cannot be changed to ready
    pub fn try_ready(&mut self, reason: ScheduleReason) -> Option<PauseReason> {
        let previous = match self.status {
            Status::Ready => return None,
            Status::Paused(p) => p,
        };

        match reason {
            ScheduleReason::Init => {
                debug_assert!(self.status == Status::Paused(PauseReason::Busy));
                self.status = Status::Ready;
                Some(previous)
            }
            ScheduleReason::NewFilter if previous == PauseReason::Caughtup => {
                self.status = Status::Ready;
                Some(previous)
            }
            ScheduleReason::FreshData if previous == PauseReason::Caughtup => {
                self.status = Status::Ready;
                Some(previous)
            }
            // There might be a case where we got IncomingAck but our inflight wasn't full
            // In case of QoS2, we need to send back PubRel ASAP,
            // So we set status to Ready in case of IncomingAck unless reason in Busy
            ScheduleReason::IncomingAck if previous != PauseReason::Busy => {
                self.status = Status::Ready;
                Some(previous)
            }
            ScheduleReason::Ready => {
                debug_assert!(self.status == Status::Paused(PauseReason::Busy));
                self.status = Status::Ready;
                Some(previous)
            }
            _ => None,
        }
    }

    pub fn pause(&mut self, reason: PauseReason) {
        self.status = Status::Paused(reason);
    }

    pub fn _is_empty(&self) -> bool {
        self.data_requests.is_empty()
    }

    pub fn get_data_requests(&self) -> &VecDeque<DataRequest> {
        &self.data_requests
    }

    pub fn register_data_request(&mut self, request: DataRequest) {
        self.data_requests.push_back(request);
    }

    pub fn unregister_data_request(&mut self, filter: Filter) {
        self.data_requests
            .retain(|data_req| data_req.filter != filter);
    }
}

// Methods to check duplicates in trackers and schedulers
impl Scheduler {
    // Return a `Some` if duplicate were found, otherwise `None`
    pub fn check_readyqueue_duplicates(&self) -> Option<&VecDeque<ConnectionId>> {
        let readyqueue = &self.readyqueue;
        // In _worst_ case where all elements are unique, the size of uniq will be same as len of readyqueue
        let mut uniq = HashSet::with_capacity(readyqueue.len());

        let all_uniq = readyqueue.iter().all(|x| uniq.insert(x));

        if !all_uniq {
            Some(readyqueue)
        } else {
            None
        }
    }

    // Return a `Some` if duplicate were found, otherwise `None`
    pub fn check_tracker_duplicates(&self, id: ConnectionId) -> Option<&VecDeque<DataRequest>> {
        let tracker = self.trackers.get(id).unwrap();
        let tracker_data_req = tracker.get_data_requests();
        let mut uniq = HashSet::with_capacity(tracker_data_req.len());

        let all_uniq = tracker_data_req.iter().all(|x| uniq.insert(x.filter_idx));

        if !all_uniq {
            Some(&tracker.data_requests)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod echo_server_patch {
    use super::*;

    fn request(filter: &str) -> DataRequest {
        DataRequest {
            filter: filter.to_owned(),
            filter_idx: 0,
            qos: 0,
            cursor: (0, 0),
            read_count: 0,
            max_count: 100,
            forward_retained: false,
            group: None,
            nolocal: false,
            preserve_retain: false,
            pending_retained: None,
        }
    }

    /// An idle client's requests wait in their logs' waiters, not in its
    /// tracker: once the router has polled them, the tracker holds no queue
    /// (it kept room for two, then for as many as it had ever held).
    #[test]
    fn a_polled_tracker_holds_no_queue() {
        let mut scheduler = Scheduler::with_capacity(4);
        let id = scheduler.add(Tracker::new("idle".to_owned()));
        assert_eq!(scheduler.trackers[id].data_requests.capacity(), 0);
        scheduler.track(id, request("a"));
        scheduler.track(id, request("b"));
        scheduler.reschedule(id, ScheduleReason::Init);

        // The router read both and parked them: nothing comes back.
        let (polled, requests) = scheduler.poll().unwrap();
        assert_eq!((polled, requests.len()), (id, 2));
        assert_eq!(scheduler.trackers[id].data_requests.capacity(), 0);
        scheduler.trackv(id, VecDeque::new());
        assert_eq!(scheduler.trackers[id].data_requests.capacity(), 0);

        // A request left over comes back, in the same queue.
        scheduler.track(id, request("c"));
        let (_, mut requests) = scheduler.poll().unwrap();
        requests.push_back(request("d"));
        scheduler.trackv(id, requests);
        let filters: Vec<&str> = scheduler.trackers[id]
            .data_requests
            .iter()
            .map(|r| r.filter.as_str())
            .collect();
        assert_eq!(filters, ["c", "d"]);
    }
}
