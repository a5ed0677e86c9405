//! What one client may make the server hold.
//!
//! Without these caps a single unauthenticated client could make the
//! server (mostly rumqttd's router) hold as much memory as it liked, all
//! measured: QoS 2 publishes never released (the router keeps each one
//! until its PUBREL), 2,000 × 500 KB on one connection, +991 MB; 500,000
//! subscription filters, +677 MiB; 4,500 filters of 65 KB, 2 GB; 2,000
//! connections with 64 KiB client ids (copied into several of the router's
//! maps), +761 MiB; 4,096 topic aliases × 60 KB topics on 4 connections,
//! +1.79 GiB. Each cap bounds one of those per client (the connection limit
//! bounds the number of clients); each is a key of `[mqtt]`, and each
//! refusal is counted in `echo_mqtt_cap_refusals_total{cap}`.
//!
//! The checks are here; the session ([`session`](super::session)) applies
//! them where it sees the packets, and answers with the code MQTT gives
//! (3.1.1 has none for most: it closes the connection, or gives 0x80 for a
//! filter).

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::rc::Rc;
use std::time::Instant;

use rumqttd::protocol::{Packet, PubCompReason};

use super::broker::SessionExpiry;
use crate::config::MqttConfig;

/// Which cap was enforced: the `cap` label of
/// `echo_mqtt_cap_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cap {
    ClientId,
    Subscriptions,
    FilterLength,
    FilterLevels,
    TopicLength,
    TopicLevels,
    TopicAlias,
    ReceiveMaximum,
}

impl Cap {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Cap::ClientId => "client_id",
            Cap::Subscriptions => "subscriptions",
            Cap::FilterLength => "filter_length",
            Cap::FilterLevels => "filter_levels",
            Cap::TopicLength => "topic_length",
            Cap::TopicLevels => "topic_levels",
            Cap::TopicAlias => "topic_alias",
            Cap::ReceiveMaximum => "receive_maximum",
        }
    }
}

/// Whether a client id is within `max_client_id_length` bytes. The router
/// copies the id into several of its maps, and keeps it with a session
/// that outlives its connection.
pub(crate) fn client_id(id: &str, config: &MqttConfig) -> Result<(), Cap> {
    if id.len() > config.max_client_id_length as usize { Err(Cap::ClientId) } else { Ok(()) }
}

/// Whether a topic name (of a publish, a will, or one set for an alias) is
/// within `max_topic_length` bytes and `max_topic_levels` levels. The
/// router keeps a log per topic, and one copy per alias: their size
/// follows from this.
pub(crate) fn topic(topic: &[u8], config: &MqttConfig) -> Result<(), Cap> {
    if topic.len() > config.max_topic_length as usize {
        return Err(Cap::TopicLength);
    }
    if levels(topic) > config.max_topic_levels as usize {
        return Err(Cap::TopicLevels);
    }
    Ok(())
}

/// Whether a subscription filter is within the same bounds as a topic
/// name (a filter longer or deeper than any topic name allowed matches
/// nothing more than one that is not). The length is the whole filter's,
/// a shared subscription's `$share/group/` included; the levels are those
/// of the part that is matched against topic names.
pub(crate) fn filter(filter: &str, config: &MqttConfig) -> Result<(), Cap> {
    if filter.len() > config.max_topic_length as usize {
        return Err(Cap::FilterLength);
    }
    let path =
        filter.strip_prefix("$share/").and_then(|rest| rest.split_once('/')).map_or(filter, |(_, p)| p);
    if levels(path.as_bytes()) > config.max_topic_levels as usize {
        return Err(Cap::FilterLevels);
    }
    Ok(())
}

fn levels(name: &[u8]) -> usize {
    name.iter().filter(|&&b| b == b'/').count() + 1
}

/// Whether a topic alias from a client is one CONNACK allowed: 1 to
/// `topic_alias_maximum` (MQTT 5 §3.3.2.3.4: anything else is 0x94). The
/// router would accept up to 4,096 per connection, each holding a copy of
/// its topic.
pub(crate) fn topic_alias(alias: u16, config: &MqttConfig) -> Result<(), Cap> {
    if alias == 0 || alias > config.topic_alias_maximum { Err(Cap::TopicAlias) } else { Ok(()) }
}

/// QoS 1 and 2 publishes from the client that the server has not yet
/// fully acknowledged: the in-flight window CONNACK's Receive Maximum
/// announces (MQTT 5 §3.2.2.3.3; over it, DISCONNECT 0x93).
///
/// The router holds a QoS 2 publish until the client's PUBREL, so these
/// are what a client that never releases makes the server keep. They are
/// counted here, from the packets going by: a publish when it is read, its
/// PUBACK or PUBCOMP when the router's answer is written. The router sends
/// exactly one of those per publish it takes (a successful PUBCOMP per
/// PUBREL that releases a kept publish; one for a packet id it holds
/// nothing for, 0x92, releases nothing), so the counts follow what it
/// holds.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    qos1: u16,
    qos2: u16,
}

impl InFlight {
    /// Counts a publish from the client at `qos` (0, 1 or 2); `Err` when it is one over
    /// `receive_maximum`. MQTT 3.1.1 has no Receive Maximum, so its
    /// clients cannot know the window: only QoS 2 publishes count there,
    /// the ones the router holds (a QoS 1 publish is in its topic's log,
    /// bounded by the segments, as soon as the router has it).
    pub(crate) fn received(&mut self, qos: u8, v5: bool, config: &MqttConfig) -> Result<(), Cap> {
        match qos {
            1 => self.qos1 = self.qos1.saturating_add(1),
            2 => self.qos2 = self.qos2.saturating_add(1),
            _ => return Ok(()),
        }
        let held = if v5 { u32::from(self.qos1) + u32::from(self.qos2) } else { u32::from(self.qos2) };
        if held > u32::from(config.receive_maximum) { Err(Cap::ReceiveMaximum) } else { Ok(()) }
    }

    /// Takes note of a packet going to the client.
    pub(crate) fn sent(&mut self, packet: &Packet) {
        match packet {
            Packet::PubAck(..) => self.qos1 = self.qos1.saturating_sub(1),
            Packet::PubComp(comp, _) if comp.reason == PubCompReason::Success => {
                self.qos2 = self.qos2.saturating_sub(1);
            }
            _ => {}
        }
    }
}

/// The distinct filters a session holds, for `max_subscriptions`: hashes
/// only (8 bytes a filter; the router has the filters themselves). Shared
/// by the connections of one client id whose session is resumed (see
/// [`Kept`]).
pub(crate) type Filters = Rc<RefCell<HashSet<u64>>>;

/// The username a kept session was connected with (see [`Kept::owner`]).
pub(crate) type Owner = Option<Rc<str>>;

/// A kept session: its filters, until when it is kept (`None` while it is
/// connected, or when it never expires), and its owner.
type KeptSession = (Filters, Option<Instant>, Owner);

/// What a session can hold besides the router's state: its in-flight
/// window and its filters.
#[derive(Debug, Default)]
pub(crate) struct Held {
    pub(crate) in_flight: InFlight,
    pub(crate) filters: Filters,
}

/// How a subscription to a filter that passed every other check fares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Quota {
    /// New, and within `max_subscriptions`: counted.
    Counted,
    /// Already held (a new subscription replaces it): nothing to count.
    Held,
    /// New, and over `max_subscriptions`.
    Exceeded,
}

/// Filters of sessions that outlive their connection, by client id.
///
/// Counting a session's filters per connection would not bound them: a
/// client resuming its session (3.1.1 without clean session, MQTT 5 with a
/// session expiry) gets its filters back from the router, and could add
/// `max_subscriptions` more on every connection. So the count goes with
/// the session: a persistent session's [`Filters`] are registered here
/// while it is connected and kept after, until the session would have
/// expired; the next connection of the same client id that resumes the
/// session (the router says "session present") takes them over.
#[derive(Debug)]
pub(crate) struct Kept {
    hasher: RandomState,
    sessions: RefCell<HashMap<String, KeptSession>>,
    /// Sessions kept when expired ones were last swept: the next sweep
    /// waits until there are twice as many, so sweeping is amortized O(1).
    swept_at: std::cell::Cell<usize>,
}

impl Default for Kept {
    fn default() -> Self {
        Kept { hasher: RandomState::new(), sessions: RefCell::default(), swept_at: std::cell::Cell::new(64) }
    }
}

impl Kept {
    /// The hash a filter is counted by (keyed per process, so that a client
    /// cannot make two of its filters count as one on purpose).
    pub(crate) fn hash(&self, filter: &str) -> u64 {
        self.hasher.hash_one(filter)
    }

    /// Counts a filter a session subscribes to.
    pub(crate) fn subscribe(&self, filters: &Filters, filter: &str, config: &MqttConfig) -> Quota {
        let hash = self.hash(filter);
        let mut filters = filters.borrow_mut();
        if filters.contains(&hash) {
            Quota::Held
        } else if filters.len() >= config.max_subscriptions as usize {
            Quota::Exceeded
        } else {
            filters.insert(hash);
            Quota::Counted
        }
    }

    /// Forgets filters a session unsubscribes from.
    pub(crate) fn unsubscribe<'a>(
        &self,
        filters: &Filters,
        unsubscribed: impl IntoIterator<Item = &'a String>,
    ) {
        let mut filters = filters.borrow_mut();
        for filter in unsubscribed {
            filters.remove(&self.hash(filter));
        }
    }

    /// The filters a new connection starts with: the kept ones when the
    /// router resumed the session, none otherwise.
    pub(crate) fn connected(&self, client_id: &str, session_present: bool, expiry: SessionExpiry) -> Filters {
        let mut sessions = self.sessions.borrow_mut();
        let kept = sessions.remove(client_id).filter(|_| session_present).map(|(filters, _, _)| filters);
        let filters = kept.unwrap_or_default();
        if expiry.persistent() {
            sessions.insert(client_id.to_owned(), (filters.clone(), None, None));
        }
        filters
    }

    /// Who a kept session belongs to, when the ACL is on: `None` when no
    /// session of `client_id` is kept, else the username (if any) it was
    /// last connected with. A session's subscriptions were checked against
    /// that user's rules, so another user must not resume it.
    pub(crate) fn owner(&self, client_id: &str) -> Option<Owner> {
        self.sessions.borrow().get(client_id).map(|(_, _, owner)| owner.clone())
    }

    /// Records the username of the connection that now holds `client_id`'s
    /// kept session (after [`Kept::connected`]).
    pub(crate) fn set_owner(&self, client_id: &str, username: Option<&str>) {
        if let Some((_, _, owner)) = self.sessions.borrow_mut().get_mut(client_id) {
            *owner = username.map(Rc::from);
        }
    }

    /// A connection ended: its session's filters are kept for as long as
    /// the session (unless another connection has taken the session over
    /// and registered its own since).
    pub(crate) fn disconnected(&self, client_id: &str, filters: &Filters, expiry: SessionExpiry) {
        self.disconnected_at(client_id, filters, expiry, Instant::now());
    }

    fn disconnected_at(&self, client_id: &str, filters: &Filters, expiry: SessionExpiry, now: Instant) {
        let mut sessions = self.sessions.borrow_mut();
        let Some((registered, until, _)) = sessions.get_mut(client_id) else {
            return;
        };
        if !Rc::ptr_eq(registered, filters) {
            return;
        }
        if expiry.persistent() {
            *until = expiry.duration().map(|d| now + d);
        } else {
            sessions.remove(client_id);
        }
        if sessions.len() >= 2 * self.swept_at.get() {
            sessions.retain(|_, (_, until, _)| until.is_none_or(|t| t > now));
            self.swept_at.set(sessions.len().max(64));
        }
    }

    /// The owners of the sessions that have one, for the persistence
    /// snapshot (`mqtt::persist`).
    pub(crate) fn owners(&self) -> Vec<(String, Option<String>)> {
        let sessions = self.sessions.borrow();
        sessions
            .iter()
            .filter_map(|(id, (_, _, owner))| Some((id.clone(), Some(owner.as_deref()?.to_owned()))))
            .collect()
    }

    /// A session restored from the persistence snapshot, as if its client
    /// had just disconnected: its filters count again, and it keeps its
    /// owner.
    pub(crate) fn restore(&self, session: &crate::mqtt::persist::KeptSession) {
        let filters: HashSet<u64> = session.filters.iter().map(|f| self.hash(f)).collect();
        let until = session.expires_in.map(|d| Instant::now() + d);
        let owner = session.owner.as_deref().map(Rc::from);
        self.sessions
            .borrow_mut()
            .insert(session.client_id.clone(), (Rc::new(RefCell::new(filters)), until, owner));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sessions.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_and_filter_bounds() {
        let config = MqttConfig { max_topic_length: 8, max_topic_levels: 3, ..MqttConfig::default() };
        assert_eq!(topic(b"a/b/c", &config), Ok(()));
        assert_eq!(topic(b"a/b/c/d", &config), Err(Cap::TopicLevels));
        assert_eq!(topic(b"abcdefghi", &config), Err(Cap::TopicLength));
        assert_eq!(filter("+/+/#", &config), Ok(()));
        assert_eq!(filter("+/+/+/#", &config), Err(Cap::FilterLevels));
        // A shared subscription's prefix is not a level of the topic names.
        let config = MqttConfig { max_topic_length: 64, ..config };
        assert_eq!(filter("$share/g/a/b/c", &config), Ok(()));
        assert_eq!(filter("$share/g/a/b/c/d", &config), Err(Cap::FilterLevels));
    }

    #[test]
    fn in_flight_follows_the_acknowledgements() {
        use rumqttd::protocol::{PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason};
        let config = MqttConfig { receive_maximum: 2, ..MqttConfig::default() };
        let puback = Packet::PubAck(PubAck { pkid: 1, reason: PubAckReason::Success }, None);
        let pubrec = Packet::PubRec(PubRec { pkid: 2, reason: PubRecReason::Success }, None);
        let pubcomp = Packet::PubComp(PubComp { pkid: 2, reason: PubCompReason::Success }, None);
        let mut v5 = InFlight::default();
        assert_eq!(v5.received(1, true, &config), Ok(()));
        assert_eq!(v5.received(2, true, &config), Ok(()));
        assert_eq!(v5.received(0, true, &config), Ok(()));
        v5.sent(&puback);
        v5.sent(&pubrec);
        assert_eq!(v5.received(1, true, &config), Ok(()));
        assert_eq!(v5.received(2, true, &config), Err(Cap::ReceiveMaximum));
        // A PUBREL for nothing the router holds releases nothing.
        let not_found = PubComp { pkid: 7, reason: PubCompReason::PacketIdentifierNotFound };
        v5.sent(&Packet::PubComp(not_found, None));
        assert_eq!(v5.received(2, true, &config), Err(Cap::ReceiveMaximum));
        v5.sent(&pubcomp);
        v5.sent(&pubcomp);
        v5.sent(&pubcomp);
        assert_eq!(v5.received(2, true, &config), Ok(()));
        // 3.1.1: QoS 2 only.
        let mut v4 = InFlight::default();
        for _ in 0..10 {
            assert_eq!(v4.received(1, false, &config), Ok(()));
        }
        assert_eq!(v4.received(2, false, &config), Ok(()));
        assert_eq!(v4.received(2, false, &config), Ok(()));
        assert_eq!(v4.received(2, false, &config), Err(Cap::ReceiveMaximum));
    }

    #[test]
    fn filters_are_counted_per_session_across_connections() {
        let config = MqttConfig { max_subscriptions: 2, ..MqttConfig::default() };
        let kept = Kept::default();
        let forever = SessionExpiry::NEVER;
        let first = kept.connected("c", false, forever);
        assert_eq!(kept.subscribe(&first, "a", &config), Quota::Counted);
        assert_eq!(kept.subscribe(&first, "a", &config), Quota::Held);
        assert_eq!(kept.subscribe(&first, "b", &config), Quota::Counted);
        assert_eq!(kept.subscribe(&first, "c", &config), Quota::Exceeded);
        kept.disconnected("c", &first, forever);
        // Resumed: the same two filters.
        let second = kept.connected("c", true, forever);
        assert_eq!(kept.subscribe(&second, "c", &config), Quota::Exceeded);
        kept.unsubscribe(&second, [&"a".to_owned()]);
        assert_eq!(kept.subscribe(&second, "c", &config), Quota::Counted);
        // Taken over by a clean session: the old connection's end does not
        // bring its filters back.
        let third = kept.connected("c", false, forever);
        kept.disconnected("c", &second, forever);
        assert!(third.borrow().is_empty());
        assert_eq!(kept.subscribe(&third, "a", &config), Quota::Counted);
        // A session that ends with its connection is not kept.
        kept.disconnected("c", &third, SessionExpiry::AT_DISCONNECT);
        assert_eq!(kept.len(), 0);
        let fourth = kept.connected("c", true, forever);
        assert!(fourth.borrow().is_empty());
    }

    #[test]
    fn expired_sessions_are_swept() {
        let kept = Kept::default();
        let short = SessionExpiry(0);
        for i in 0..200 {
            let id = format!("c{i}");
            let filters = kept.connected(&id, false, SessionExpiry::NEVER);
            // Persistent at connect, 0 at DISCONNECT (MQTT 5 allows that way).
            kept.disconnected(&id, &filters, short);
        }
        assert_eq!(kept.len(), 0);
        // 100 sessions expiring after 1 s, then 100 more 2 s later: the
        // first 100 are swept once there are twice as many as last time.
        let start = Instant::now();
        let later = start + std::time::Duration::from_secs(2);
        let mut kept_ids = Vec::new();
        for (i, now) in (0..200).map(|i| (i, if i < 100 { start } else { later })) {
            let id = format!("d{i}");
            let filters = kept.connected(&id, false, SessionExpiry(1));
            kept.disconnected_at(&id, &filters, SessionExpiry(1), now);
            kept_ids.push(kept.len());
        }
        assert_eq!(kept_ids[99], 100, "none expired yet");
        let sessions = kept.sessions.borrow();
        assert!((0..100).all(|i| !sessions.contains_key(&format!("d{i}"))), "the expired ones were swept");
        assert!((100..200).all(|i| sessions.contains_key(&format!("d{i}"))), "the others kept");
    }

    /// The owner of a kept session is whoever last connected it, and goes
    /// with the session.
    #[test]
    fn a_kept_session_knows_its_owner() {
        let kept = Kept::default();
        assert_eq!(kept.owner("c"), None, "nothing kept");
        let filters = kept.connected("c", false, SessionExpiry::NEVER);
        assert_eq!(kept.owner("c"), Some(None), "kept, not claimed yet: anonymous");
        kept.set_owner("c", Some("alice"));
        kept.disconnected("c", &filters, SessionExpiry::NEVER);
        assert_eq!(kept.owner("c").flatten().as_deref(), Some("alice"), "kept after the connection");
        let filters = kept.connected("c", true, SessionExpiry::NEVER);
        kept.set_owner("c", None);
        assert_eq!(kept.owner("c"), Some(None));
        kept.disconnected("c", &filters, SessionExpiry::AT_DISCONNECT);
        assert_eq!(kept.owner("c"), None, "a session that ends is not kept");
        kept.set_owner("c", Some("bob"));
        assert_eq!(kept.owner("c"), None, "no owner without a session");
    }

    /// What persistence keeps of the server's own bookkeeping: a kept
    /// session's owner (so that, with the ACL on, only that user resumes it
    /// after a restart) and its filters, which count again.
    #[test]
    fn owners_and_filters_survive_a_restore() {
        let config = MqttConfig { max_subscriptions: 2, ..MqttConfig::default() };
        let kept = Kept::default();
        let filters = kept.connected("c", false, SessionExpiry::NEVER);
        kept.set_owner("c", Some("alice"));
        kept.connected("anonymous", false, SessionExpiry::NEVER);
        assert_eq!(kept.subscribe(&filters, "a/b", &config), Quota::Counted);
        kept.disconnected("c", &filters, SessionExpiry::NEVER);
        assert_eq!(kept.owners(), vec![("c".to_owned(), Some("alice".to_owned()))]);

        let restored = Kept::default();
        restored.restore(&crate::mqtt::persist::KeptSession {
            client_id: "c".into(),
            filters: vec!["a/b".into(), "c/d".into()],
            expires_in: None,
            owner: Some("alice".into()),
        });
        assert_eq!(restored.owner("c"), Some(Some(Rc::from("alice"))));
        assert_eq!(restored.owner("d"), None);
        let filters = restored.connected("c", true, SessionExpiry::NEVER);
        assert_eq!(restored.subscribe(&filters, "a/b", &config), Quota::Held);
        assert_eq!(restored.subscribe(&filters, "e/f", &config), Quota::Exceeded);
    }
}
