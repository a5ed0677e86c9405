//! echo-server patch: a cap on what the topic logs keep unread for one
//! session, as Mosquitto's `max_queued_messages` / `max_queued_bytes`.
//!
//! A message stays in its topic's log until every reader of the log has
//! read it, so a subscriber that falls behind makes the log keep what it
//! has not read, up to the log's own bound (`max_segment_size` ×
//! `max_segment_count`). That bound is per log, not per session: one client
//! that holds many filters on busy topics and never reads made every one of
//! those logs fill, ~0.5 MB each with the default 4 × 32 KiB, ~0.5 GB for a
//! client at `max_subscriptions`. Here a session, connected or kept, is
//! never more than a set number of messages and bytes behind over all its
//! filters together: past that, it loses its oldest unread messages (its
//! cursors move on, as when a log rotates under it), the loss is counted,
//! and the logs forget what no reader needs any more.
//!
//! Finding who is behind costs a walk over the sessions' pending requests,
//! so the router does it in sweeps, only as the logs grow: when the
//! messages they hold rose by `SWEEP_MESSAGES` above their lowest count
//! since the last sweep, or `SWEEP_BYTES` more were appended. Between two
//! sweeps a session may go that much over its cap; while every reader keeps
//! up the logs do not grow and there is no sweep but the one per
//! `SWEEP_BYTES`. A sweep that had many requests to look at puts the next
//! one further off (a quarter of a message's growth per request looked
//! at), so that however many sessions wait, sweeping costs a bounded
//! amount per message, and the overshoot grows with that count instead.

use std::collections::{HashMap, VecDeque};

use super::logs::DataLog;
use super::{DataRequest, FilterIdx};
use crate::Cursor;

/// Messages the logs may gain, above their lowest count since the last
/// sweep, before the next sweep.
const SWEEP_MESSAGES: u64 = 256;

/// Bytes (topic and payload) appended to the logs between two sweeps at
/// most: large messages reach the byte cap in few appends.
const SWEEP_BYTES: u64 = 1 << 20;

/// The most a session may have unread in the logs; `u64::MAX`: no cap.
#[derive(Debug, Clone, Copy)]
pub struct QueueCaps {
    pub messages: u64,
    pub bytes: u64,
}

impl QueueCaps {
    pub const NONE: QueueCaps = QueueCaps {
        messages: u64::MAX,
        bytes: u64::MAX,
    };

    pub fn is_none(&self) -> bool {
        self.messages == u64::MAX && self.bytes == u64::MAX
    }
}

/// When the next sweep is due.
#[derive(Debug)]
pub(crate) struct Sweeps {
    /// The fewest messages the logs held since the last sweep.
    held_low: u64,
    /// `DataLog::appended_bytes` at the last sweep.
    bytes_at: u64,
    /// The growth above `held_low` that makes the next sweep due.
    step: u64,
}

impl Default for Sweeps {
    fn default() -> Sweeps {
        Sweeps {
            held_low: 0,
            bytes_at: 0,
            step: SWEEP_MESSAGES,
        }
    }
}

impl Sweeps {
    /// Whether to sweep now, the logs holding `held` messages and
    /// `appended` bytes having been appended so far.
    pub fn due(&mut self, held: u64, appended: u64) -> bool {
        self.held_low = self.held_low.min(held);
        held >= self.held_low + self.step || appended >= self.bytes_at + SWEEP_BYTES
    }

    /// A sweep that looked at `looked_at` sessions and requests is done,
    /// after which the logs hold `held` messages.
    pub fn done(&mut self, held: u64, appended: u64, looked_at: u64) {
        self.held_low = held;
        self.bytes_at = appended;
        self.step = SWEEP_MESSAGES.max(looked_at / 4);
    }
}

/// Holds one session's `requests` to `caps`: if they leave more unread
/// than the caps allow, each request over a common level skips its oldest
/// unread messages down to that level (the highest that fits, so the
/// requests furthest behind lose the most and those within it nothing).
/// Requests of shared subscriptions, whose cursor is the group's, are left
/// alone. Returns how many messages were skipped; the logs skipped in go
/// to `skipped_in`.
pub(crate) fn cap_session(
    requests: &mut VecDeque<DataRequest>,
    datalog: &DataLog,
    caps: QueueCaps,
    skipped_in: &mut Vec<FilterIdx>,
) -> u64 {
    let unread = |r: &DataRequest| -> (u64, u64) {
        match datalog.native.get(r.filter_idx) {
            Some(data) if r.group.is_none() => (data.log.unread(r.cursor), data.log.mean_size()),
            _ => (0, 0),
        }
    };
    let within = |level: u64| {
        let (mut messages, mut bytes) = (0u64, 0u64);
        for r in requests.iter() {
            let (count, size) = unread(r);
            let kept = count.min(level);
            messages = messages.saturating_add(kept);
            bytes = bytes.saturating_add(kept.saturating_mul(size));
        }
        messages <= caps.messages && bytes <= caps.bytes
    };
    let most = requests.iter().map(|r| unread(r).0).max().unwrap_or(0);
    if within(most) {
        return 0;
    }
    // The highest level that fits: `within(0)` always holds.
    let (mut low, mut high) = (0, most);
    while low < high {
        let mid = low + (high - low).div_ceil(2);
        if within(mid) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    let mut skipped = 0;
    for r in requests.iter_mut() {
        let (count, _) = unread(r);
        if count > low {
            let log = &datalog.native[r.filter_idx].log;
            r.cursor = log.cursor_keeping(low);
            skipped += count - low;
            skipped_in.push(r.filter_idx);
        }
    }
    skipped
}

/// The readers of some logs that are not waiting at their ends: how many,
/// and the oldest offset any of them still needs.
#[derive(Debug, Default)]
pub(crate) struct Readers {
    logs: HashMap<FilterIdx, Reading>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    pub count: usize,
    pub oldest: Cursor,
    /// A shared subscription reads it: its cursor is the group's.
    pub shared: bool,
}

impl Readers {
    /// Counts the readers of `logs` only.
    pub fn of(logs: &[FilterIdx]) -> Readers {
        let reading = Reading {
            count: 0,
            oldest: (u64::MAX, u64::MAX),
            shared: false,
        };
        Readers {
            logs: logs.iter().map(|idx| (*idx, reading)).collect(),
        }
    }

    /// A reader of `request`'s log, which needs it from `request`'s cursor
    /// or `inflight` (a delivery awaiting its acknowledgement), whichever
    /// is older.
    pub fn add(&mut self, request: &DataRequest, inflight: Option<Cursor>) {
        if let Some(reading) = self.logs.get_mut(&request.filter_idx) {
            reading.count += 1;
            reading.oldest = reading.oldest.min(request.cursor);
            if let Some(cursor) = inflight {
                reading.oldest = reading.oldest.min(cursor);
            }
            reading.shared |= request.group.is_some();
        }
    }

    pub fn get(&self, idx: FilterIdx) -> Option<Reading> {
        self.logs.get(&idx).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Publish;
    use crate::router::logs::PublishData;
    use crate::RouterConfig;

    fn datalog() -> DataLog {
        DataLog::new(RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 100,
            max_outgoing_packet_count: 200,
            ..RouterConfig::default()
        })
        .unwrap()
    }

    /// Appends `count` messages of `payload` bytes to topic `topic`.
    fn publish(datalog: &mut DataLog, topic: &str, count: usize, payload: usize) {
        let (idx, _) = datalog.next_native_offset(topic);
        let held = datalog.held_messages.clone();
        let mut woken = VecDeque::new();
        for _ in 0..count {
            let publish = Publish::new(topic.as_bytes().to_vec(), vec![7; payload], false);
            let data = PublishData::from((publish, None));
            datalog.native[idx].append(data, &mut woken, &held);
        }
    }

    fn request(datalog: &mut DataLog, filter: &str) -> DataRequest {
        let (filter_idx, cursor) = datalog.next_native_offset(filter);
        DataRequest {
            filter: filter.to_owned(),
            filter_idx,
            qos: 0,
            cursor,
            read_count: 0,
            max_count: 100,
            forward_retained: false,
            group: None,
            nolocal: false,
            preserve_retain: false,
            pending_retained: None,
        }
    }

    fn unread(datalog: &DataLog, requests: &VecDeque<DataRequest>) -> Vec<u64> {
        requests
            .iter()
            .map(|r| datalog.native[r.filter_idx].log.unread(r.cursor))
            .collect()
    }

    /// Within both caps nothing moves; over the message cap, the requests
    /// furthest behind lose their oldest messages down to a common level,
    /// and a read then starts at the first message kept.
    #[test]
    fn a_session_over_its_cap_loses_its_oldest_messages() {
        let mut log = datalog();
        let mut requests: VecDeque<DataRequest> =
            ["a", "b", "c"].iter().map(|f| request(&mut log, f)).collect();
        publish(&mut log, "a", 10, 10);
        publish(&mut log, "b", 300, 10);
        publish(&mut log, "c", 500, 10);
        let caps = QueueCaps {
            messages: 810,
            bytes: u64::MAX,
        };
        let mut skipped_in = Vec::new();
        assert_eq!(cap_session(&mut requests, &log, caps, &mut skipped_in), 0);
        assert!(skipped_in.is_empty());

        let caps = QueueCaps { messages: 410, ..caps };
        assert_eq!(cap_session(&mut requests, &log, caps, &mut skipped_in), 400);
        assert_eq!(unread(&log, &requests), [10, 200, 200]);
        assert_eq!(skipped_in, [requests[1].filter_idx, requests[2].filter_idx]);

        // The cursor moved into the right segment: the next read is the
        // 301st message of "c", not the first of a later segment.
        let c = &requests[2];
        let mut out = Vec::new();
        log.native[c.filter_idx].log.readv(c.cursor, 1, &mut out).unwrap();
        assert_eq!(out[0].1, (c.cursor.0, 300));
        assert!(log.native[c.filter_idx].log.memory_segments_count() > 2);
    }

    /// The byte cap counts each log's messages at their mean size: large
    /// messages are capped by bytes long before the message cap.
    #[test]
    fn large_messages_are_capped_by_bytes() {
        let mut log = datalog();
        let mut requests: VecDeque<DataRequest> =
            ["small", "large"].iter().map(|f| request(&mut log, f)).collect();
        publish(&mut log, "small", 20, 10);
        publish(&mut log, "large", 20, 996);
        let caps = QueueCaps {
            messages: 1000,
            bytes: 10_000,
        };
        let mut skipped_in = Vec::new();
        let skipped = cap_session(&mut requests, &log, caps, &mut skipped_in);
        let left = unread(&log, &requests);
        assert_eq!(skipped, 40 - left.iter().sum::<u64>());
        assert_eq!(left[0], left[1], "one level for both");
        assert_eq!(left[1], 9, "9 of each: 9 x 1,005 + 9 x 19 bytes fit, 10 do not");
    }

    /// Sweeps follow the logs' growth above their low, and bytes appended;
    /// a sweep that looked at many requests puts the next one further off.
    #[test]
    fn sweeps_come_as_the_logs_grow() {
        let mut sweeps = Sweeps::default();
        assert!(!sweeps.due(SWEEP_MESSAGES - 1, 0));
        sweeps.done(100, 0, 10);
        assert!(!sweeps.due(50, 0), "the logs emptied: the low follows");
        assert!(sweeps.due(50 + SWEEP_MESSAGES, 0));
        sweeps.done(50, 0, 10);
        assert!(sweeps.due(50, SWEEP_BYTES));
        sweeps.done(50, SWEEP_BYTES, 40_000);
        assert!(!sweeps.due(50 + 9_999, SWEEP_BYTES));
        assert!(sweeps.due(50 + 10_000, SWEEP_BYTES));
    }
}
