use super::Ack;
use slab::Slab;
use tracing::{debug, trace};

use crate::protocol::{
    ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubCompReason, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::tables::Shrink;
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
    /// echo-server patch: the session that published it (`Origin`), for
    /// MQTT 5's No Local (3.8.3.1); 0: none (a will, a test).
    pub origin: Origin,
}

/// echo-server patch: which session published a message: a number the
/// router gives each session when it starts, kept when a session resumes
/// (so that No Local holds across a reconnection, and a connection id that
/// a slab reuses never stands for another client). 0 is no session's.
pub type Origin = u64;

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
            origin: 0,
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    // TODO: calculate size of publish properties as well!
    fn size(&self) -> usize {
        publish_size(&self.publish)
    }
}

/// The size a log counts for a message: its topic and payload, and 4.
pub(crate) fn publish_size(publish: &Publish) -> usize {
    4 + publish.topic.len() + publish.payload.len()
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    /// echo-server patch: keyed by the log's own name (`Data::filter`),
    /// shared, not a copy.
    filter_indexes: HashMap<Arc<str>, FilterIdx>,
    /// echo-server patch: also a tree of the retained topics, which a
    /// wildcard filter walks (was: a scan of every retained message).
    retained_publishes: TopicMap<PublishData>,
    /// echo-server patch: the retained messages that expire (MQTT 5 message
    /// expiry interval), soonest first, as (deadline, topic); the topic is
    /// a share of `retained_publishes`' key. Kept in step with it: a
    /// message's entry leaves when it is overwritten, cleared or dropped,
    /// so each retained message has at most one entry and none is stale.
    /// `expire_retained` frees the expired ones, a bounded number per
    /// router turn, whether or not anyone subscribes to them (0.20.0 freed
    /// an expired message only when a subscription read it).
    retained_expiries: BTreeSet<(Instant, Arc<str>)>,
    /// echo-server patch: how many retained messages are held, for the
    /// embedding server's metrics (`Router::retained_messages`).
    retained_count: Arc<AtomicU64>,
    /// List of filters associated with a topic
    /// echo-server patch: keyed by a shared topic name, which
    /// `wildcard_topics` points back to; also a tree of these topics, which
    /// a new wildcard filter walks (was: a scan of every cached topic).
    publish_filters: TopicMap<Vec<FilterIdx>>,
    /// echo-server patch: the filters with a wildcard ('+' or '#') as a tree
    /// of topic levels, which a new topic walks level by level; a filter
    /// without wildcards matches exactly one topic, found by a map lookup.
    /// (Was a list of the wildcard filters, each matched against every new
    /// topic.)
    wildcard_filters: FilterTree,
    /// echo-server patch: for each wildcard filter, the cached topics
    /// (`publish_filters`) it is listed under, so that freeing it visits
    /// those topics only (was: every cached topic, for every filter freed).
    wildcard_topics: HashMap<FilterIdx, Vec<Arc<str>>>,
    /// echo-server patch: how many messages all the logs hold, for the
    /// embedding server's metrics (`Router::log_messages`).
    pub(crate) held_messages: Arc<AtomicU64>,
    /// echo-server patch: bytes (`Storage::size`) appended to the logs so
    /// far, which pace the router's sweeps for sessions over their queue
    /// caps (`queues`).
    pub(crate) appended_bytes: u64,
}

/// echo-server patch: subscription filters as a tree keyed by topic level,
/// as Mosquitto keeps them: matching a topic walks its levels, following at
/// each node the child named like the level and the `+` child, and takes
/// the filters that end there or continue with `#`. The cost is that of the
/// nodes visited, not of the filters held.
///
/// Semantics are `protocol::matches`' for a topic not starting with `$`
/// (the caller handles those): only a whole level `+` or `#` is a
/// wildcard; `#` also matches the parent level (`a/#` matches `a`) and
/// ends the filter (anything after it is ignored, as `matches` does); a
/// topic level `#` matches nothing but a `#` before it; a filter is in the
/// tree once, under the one path its levels give, so no filter is found
/// twice.
#[derive(Default)]
struct FilterTree {
    root: FilterNode,
}

#[derive(Default)]
struct FilterNode {
    /// Children by level name, for levels other than `+` and `#`.
    literal: HashMap<Box<str>, FilterNode>,
    /// The child for a `+` level.
    plus: Option<Box<FilterNode>>,
    /// Filters whose last level is this node.
    end: Vec<FilterIdx>,
    /// Filters whose next level is `#`.
    hash: Vec<FilterIdx>,
}

/// A child of a node, as named by a filter level.
#[derive(Clone, Copy)]
enum Level<'a> {
    Plus,
    Literal(&'a str),
}

impl FilterNode {
    fn is_empty(&self) -> bool {
        self.end.is_empty()
            && self.hash.is_empty()
            && self.plus.is_none()
            && self.literal.is_empty()
    }

    fn child(&self, level: Level) -> Option<&FilterNode> {
        match level {
            Level::Plus => self.plus.as_deref(),
            Level::Literal(name) => self.literal.get(name),
        }
    }

    fn child_mut(&mut self, level: Level) -> Option<&mut FilterNode> {
        match level {
            Level::Plus => self.plus.as_deref_mut(),
            Level::Literal(name) => self.literal.get_mut(name),
        }
    }

    fn remove_child(&mut self, level: Level) {
        match level {
            Level::Plus => self.plus = None,
            Level::Literal(name) => {
                self.literal.remove(name);
            }
        }
    }
}

impl FilterTree {
    /// The path of a filter: its levels up to the node that holds it, and
    /// whether it ends with `#` there.
    fn path(filter: &str) -> (Vec<Level<'_>>, bool) {
        let mut path = Vec::new();
        for level in filter.split('/') {
            match level {
                "#" => return (path, true),
                "+" => path.push(Level::Plus),
                name => path.push(Level::Literal(name)),
            }
        }
        (path, false)
    }

    fn insert(&mut self, filter: &str, idx: FilterIdx) {
        let (path, hash) = Self::path(filter);
        let mut node = &mut self.root;
        for level in path {
            node = match level {
                Level::Plus => node.plus.get_or_insert_with(Default::default),
                Level::Literal(name) => node.literal.entry(name.into()).or_default(),
            };
        }
        if hash {
            node.hash.push(idx);
        } else {
            node.end.push(idx);
        }
    }

    /// Takes a filter out, and the nodes it leaves empty. O(its levels);
    /// no recursion, whatever the number of levels.
    fn remove(&mut self, filter: &str, idx: FilterIdx) {
        let (path, hash) = Self::path(filter);
        let mut node = &mut self.root;
        for &level in &path {
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let slot = if hash { &mut node.hash } else { &mut node.end };
        slot.retain(|i| *i != idx);
        if !node.is_empty() || path.is_empty() {
            return;
        }
        // The nodes below the last one holding something else than the
        // path are left empty: cut there.
        let mut keep = 0;
        let mut node = &self.root;
        for (depth, &level) in path.iter().enumerate() {
            let others = node.literal.len() + usize::from(node.plus.is_some()) > 1;
            if depth == 0 || others || !node.end.is_empty() || !node.hash.is_empty() {
                keep = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let mut node = &mut self.root;
        for &level in &path[..keep] {
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        node.remove_child(path[keep]);
    }

    /// Appends the filters matching `topic`. A topic starting with `$` is
    /// matched by no filter whose first level is a wildcard (§4.7.2).
    fn matches(&self, topic: &str, out: &mut Vec<FilterIdx>) {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut pending = Vec::new();
        let root = &self.root;
        if topic.starts_with('$') {
            if let Some(child) = root.literal.get(levels[0]) {
                pending.push((child, 1));
            }
        } else {
            pending.push((root, 0));
        }
        while let Some((node, depth)) = pending.pop() {
            out.extend_from_slice(&node.hash);
            let Some(&level) = levels.get(depth) else {
                out.extend_from_slice(&node.end);
                continue;
            };
            // A topic level `#` is matched by a `#` filter level only.
            if level == "#" {
                continue;
            }
            if let Some(child) = node.literal.get(level) {
                pending.push((child, depth + 1));
            }
            if let Some(child) = node.plus.as_deref() {
                pending.push((child, depth + 1));
            }
        }
    }
}

/// echo-server patch: topics by name, as a map, and by level, as a tree
/// (`TopicTree`) that holds the map's own shared names: a wildcard filter
/// finds the topics it matches by walking the levels it can match, where a
/// scan of the map would test every topic. The two are changed together
/// only, so the tree holds exactly the map's topics.
struct TopicMap<V> {
    map: HashMap<Arc<str>, V>,
    tree: TopicTree,
}

impl<V> Default for TopicMap<V> {
    fn default() -> Self {
        TopicMap {
            map: HashMap::new(),
            tree: TopicTree::default(),
        }
    }
}

/// The map is what grows with the topics; the tree frees its nodes as
/// topics leave (pruning the empty ones).
impl<V> Shrink for TopicMap<V> {
    fn shrink_when_idle(&mut self) {
        self.map.shrink_when_idle();
    }
}

impl<V> TopicMap<V> {
    fn get(&self, topic: &str) -> Option<&V> {
        self.map.get(topic)
    }

    fn get_mut(&mut self, topic: &str) -> Option<&mut V> {
        self.map.get_mut(topic)
    }

    #[cfg(test)]
    fn contains_key(&self, topic: &str) -> bool {
        self.map.contains_key(topic)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A topic already there keeps its name (`HashMap::insert` keeps the
    /// key), which the tree holds too.
    /// Returns the topic's name as held, and the value it replaced.
    fn insert(&mut self, topic: Arc<str>, value: V) -> (Arc<str>, Option<V>) {
        match self.map.entry(topic) {
            Entry::Vacant(entry) => {
                self.tree.insert(entry.key());
                let key = entry.key().clone();
                entry.insert(value);
                (key, None)
            }
            Entry::Occupied(mut entry) => (entry.key().clone(), Some(entry.insert(value))),
        }
    }

    fn remove(&mut self, topic: &str) -> Option<V> {
        self.remove_entry(topic).map(|(_, value)| value)
    }

    /// `remove`, with the topic's name as it was held.
    fn remove_entry(&mut self, topic: &str) -> Option<(Arc<str>, V)> {
        let entry = self.map.remove_entry(topic)?;
        self.tree.remove(topic);
        Some(entry)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// Calls `f` with each topic `filter` matches (as `topic_matches`
    /// decides) and its value.
    fn for_each_match(&self, filter: &str, mut f: impl FnMut(&Arc<str>, &V)) {
        self.tree.for_each_match(filter, |topic| {
            if let Some(value) = self.map.get(topic) {
                f(topic, value);
            }
        });
    }

    fn for_each_match_mut(&mut self, filter: &str, mut f: impl FnMut(&Arc<str>, &mut V)) {
        let map = &mut self.map;
        self.tree.for_each_match(filter, |topic| {
            if let Some(value) = map.get_mut(topic) {
                f(topic, value);
            }
        });
    }
}

/// echo-server patch: topics as a tree keyed by topic level, as Mosquitto
/// keeps its retained messages: a wildcard filter walks it level by level,
/// following at each node the child its level names, or every child for a
/// `+`, or the whole subtree for a `#`. The cost is that of the nodes the
/// filter can reach (`a/+/c` visits the children of `a` and their `c`
/// children), not of the topics held; `#` reaches all of them.
///
/// Semantics are `topic_matches`': no topic starting with `$` is matched
/// (the walk leaves out the first-level names starting with `$`); a topic
/// level `#` is matched by nothing but a `#` before it; `#` also matches the
/// parent level (`a/#` matches `a`); empty levels are levels like any other.
///
/// Lean, as every cached topic has a node per level: a node's children map
/// is allocated only when it has children, and a node holds its topic's
/// name only as a share of the map's key.
#[derive(Default)]
struct TopicTree {
    root: TopicNode,
}

#[derive(Default)]
struct TopicNode {
    /// Children by level name; `None` for a leaf. Boxed: most nodes are
    /// leaves, and a `HashMap` in place would take 48 bytes in each.
    #[allow(clippy::box_collection)]
    children: Option<Box<HashMap<Box<str>, TopicNode>>>,
    /// The topic whose last level this is, if it is held.
    topic: Option<Arc<str>>,
}

impl TopicNode {
    fn child(&self, level: &str) -> Option<&TopicNode> {
        self.children.as_ref()?.get(level)
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut TopicNode> {
        self.children.as_mut()?.get_mut(level)
    }

    fn child_count(&self) -> usize {
        self.children.as_ref().map_or(0, |c| c.len())
    }

    fn children(&self) -> impl Iterator<Item = (&str, &TopicNode)> {
        self.children
            .iter()
            .flat_map(|c| c.iter())
            .map(|(name, child)| (&**name, child))
    }

    /// The child for a level, created if need be (allocating its name only
    /// then).
    fn child_or_insert(&mut self, level: &str) -> &mut TopicNode {
        let children = self.children.get_or_insert_with(Default::default);
        if !children.contains_key(level) {
            children.insert(level.into(), TopicNode::default());
        }
        children.get_mut(level).expect("inserted above")
    }

    fn remove_child(&mut self, level: &str) {
        if let Some(children) = self.children.as_mut() {
            children.remove(level);
            if children.is_empty() {
                self.children = None;
            }
        }
    }
}

impl TopicTree {
    fn insert(&mut self, topic: &Arc<str>) {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.child_or_insert(level);
        }
        node.topic = Some(topic.clone());
    }

    /// Takes a topic out, and the nodes it leaves empty. O(its levels); no
    /// recursion, whatever the number of levels.
    fn remove(&mut self, topic: &str) {
        // Find the topic's node and the deepest node above it that stays
        // (the root, or one holding a topic or another child): the path
        // below that one holds nothing else.
        let mut cut = 0;
        let mut node = &self.root;
        for (depth, level) in topic.split('/').enumerate() {
            if node.topic.is_some() || node.child_count() > 1 {
                cut = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let leaf = node.child_count() == 0;
        let mut node = &mut self.root;
        for (depth, level) in topic.split('/').enumerate() {
            if leaf && depth == cut {
                node.remove_child(level);
                return;
            }
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        node.topic = None;
    }

    /// Calls `f` with each topic `filter` matches, visiting only the nodes
    /// its levels can reach.
    fn for_each_match(&self, filter: &str, mut f: impl FnMut(&Arc<str>)) {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut pending = vec![(&self.root, 0)];
        // Nodes below a `#`: their whole subtrees match.
        let mut below_hash = Vec::new();
        while let Some((node, depth)) = pending.pop() {
            let Some(&level) = levels.get(depth) else {
                node.topic.iter().for_each(&mut f);
                continue;
            };
            // No topic starting with `$` is matched by a wildcard level
            // (§4.7.2); a literal `$SYS` level matches it.
            let visible = |name: &str| depth > 0 || !name.starts_with('$');
            match level {
                "#" => {
                    node.topic.iter().for_each(&mut f);
                    below_hash.extend(node.children().filter(|(n, _)| visible(n)));
                }
                // A topic level `#` is matched by a `#` filter level only.
                "+" => pending.extend(
                    node.children()
                        .filter(|&(n, _)| n != "#" && visible(n))
                        .map(|(_, child)| (child, depth + 1)),
                ),
                name => {
                    if let Some(child) = node.child(name) {
                        pending.push((child, depth + 1));
                    }
                }
            }
        }
        while let Some((_, node)) = below_hash.pop() {
            node.topic.iter().for_each(&mut f);
            below_hash.extend(node.children());
        }
    }
}

/// echo-server patch: `protocol::matches`, for the filters and topics of the
/// router's own maps. Same answer, except that a topic whose first character
/// takes more than one byte is matched instead of panicking
/// (`protocol::matches` slices the topic's first byte to look for `$`).
fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topics = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topics.next() {
            Some("#") | None => return false,
            Some(t) if f != "+" && f != t => return false,
            Some(_) => {}
        }
    }
    topics.next().is_none()
}

/// echo-server patch: whether a filter has a wildcard level.
fn has_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// echo-server patch: seconds before a retained message expires (MQTT 5
/// message expiry interval, counted from its publication); `None`: never.
fn retained_expiry_left(data: &PublishData, now: Instant) -> Option<u32> {
    let interval = data.properties.as_ref()?.message_expiry_interval?;
    let spent = now.saturating_duration_since(data.timestamp).as_secs();
    Some(u64::from(interval).saturating_sub(spent) as u32)
}

/// echo-server patch: when a retained message expires: its publication
/// plus its expiry interval, the instant from which `retained_expiry_left`
/// gives 0; `None`: never.
fn retained_deadline(data: &PublishData) -> Option<Instant> {
    let interval = data.properties.as_ref()?.message_expiry_interval?;
    data.timestamp
        .checked_add(Duration::from_secs(interval.into()))
}

/// echo-server patch: a retained message as delivered now, its expiry
/// interval set to the time it has left (MQTT 5, 3.3.2.3.3); `None` once
/// expired.
fn retained_delivery(data: &PublishData, now: Instant) -> Option<PubWithProp> {
    let mut properties = data.properties.clone();
    if let Some(left) = retained_expiry_left(data, now) {
        if left == 0 {
            return None;
        }
        if let Some(p) = properties.as_mut() {
            p.message_expiry_interval = Some(left);
        }
    }
    Some((data.publish.clone(), properties))
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = Slab::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = TopicMap::default();
        let publish_filters = TopicMap::default();

        let mut wildcard_filters = FilterTree::default();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let filter: Arc<str> = filter.into();
                let data = Data::new(filter.clone(), &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                if has_wildcard(&filter) {
                    wildcard_filters.insert(&filter, idx);
                }
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            publish_filters,
            filter_indexes,
            retained_publishes,
            retained_expiries: BTreeSet::new(),
            retained_count: Arc::default(),
            wildcard_filters,
            wildcard_topics: HashMap::new(),
            held_messages: Arc::default(),
            appended_bytes: 0,
        })
    }

    /// echo-server patch: the index of a filter's log, if it has one.
    pub fn index(&self, filter: &str) -> Option<FilterIdx> {
        self.filter_indexes.get(filter).copied()
    }

    /// echo-server patch: frees a filter's log once no session subscribes
    /// to it (0.20.0 kept every filter ever subscribed until restart, ~1.3 KB
    /// each). Its index leaves every map first, so a later filter that gets
    /// the same slab slot is never mistaken for it.
    pub fn remove_filter(&mut self, filter: &str) {
        self.remove_filters([filter]);
    }

    /// echo-server patch: `remove_filter` for many filters at once, as when a
    /// client holding them leaves. The cost is that of these filters only:
    /// a wildcard filter leaves the tree by its own levels and the cached
    /// topics it was listed under, each topic visited once for all of them
    /// (was: a scan of every wildcard filter and every cached topic per
    /// filter freed, seconds of router time for 50,000 filters).
    pub fn remove_filters<S: AsRef<str>>(&mut self, filters: impl IntoIterator<Item = S>) {
        let mut freed = HashSet::new();
        let mut topics: HashSet<Arc<str>> = HashSet::new();
        for filter in filters {
            let filter = filter.as_ref();
            let Some(idx) = self.filter_indexes.remove(filter) else {
                continue;
            };
            if has_wildcard(filter) {
                self.wildcard_filters.remove(filter, idx);
                topics.extend(self.wildcard_topics.remove(&idx).unwrap_or_default());
                freed.insert(idx);
            } else if let Some(filters) = self.publish_filters.get_mut(filter) {
                filters.retain(|i| *i != idx);
                if filters.is_empty() {
                    self.publish_filters.remove(filter);
                }
            }
            let data = self.native.remove(idx);
            self.held_messages.fetch_sub(data.log.held(), Ordering::Relaxed);
        }
        for topic in topics {
            if let Some(filters) = self.publish_filters.get_mut(&topic) {
                filters.retain(|i| !freed.contains(i));
                if filters.is_empty() {
                    self.publish_filters.remove(&topic);
                }
            }
        }
    }

    /// echo-server patch: how many filters have a log.
    pub fn filter_count(&self) -> usize {
        self.native.len()
    }

    /// echo-server patch: the filter and topic tables give back the
    /// capacity that filters and topics freed left unused (`tables`).
    pub fn shrink_tables(&mut self) {
        self.native.shrink_when_idle();
        self.filter_indexes.shrink_when_idle();
        self.publish_filters.shrink_when_idle();
        self.wildcard_topics.shrink_when_idle();
        self.retained_publishes.shrink_when_idle();
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter.as_str())?)
            .map(|data| &data.waiters)
    }

    /// echo-server patch: takes connection `id`'s request on `filter`
    /// (which reads log `log`) out of that log's waiters, if parked there.
    pub fn take_waiter(&mut self, id: ConnectionId, log: &str, filter: &str) -> Option<DataRequest> {
        let data = self.native.get_mut(*self.filter_indexes.get(log)?)?;
        let waiters = data.waiters.get_mut();
        let at = waiters
            .iter()
            .position(|(conn, request)| *conn == id && request.filter == filter)?;
        waiters.remove(at).map(|(_, request)| request)
    }

    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(filter.as_str())?)
            .unwrap();
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|&(conn_id, _)| conn_id == id)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                // echo-server patch: was a scan of every filter, which made
                // the first publish to each new topic cost O(all filters)
                // (2 ms per topic with 10,000 subscribed clients), then of
                // every wildcard filter (4 ms per topic with 100,000). Same
                // result: the exact filter equal to the topic, plus the
                // wildcard filters that match it, from the filter tree.
                // Topics starting with '$' match no filter whose first
                // level is a wildcard, as `matches` says (the tree's walk).
                // A topic with '+' or '#' in it is no exact filter's: the
                // filter equal to it is in the tree (0.20.0's scan would
                // list it once; the list of wildcards, twice).
                let mut v: Vec<usize> = Vec::new();
                if !has_wildcard(topic) {
                    if let Some(&idx) = self.filter_indexes.get(topic) {
                        v.push(idx);
                    }
                }
                let exact = v.len();
                self.wildcard_filters.matches(topic, &mut v);
                if !v.is_empty() {
                    let topic: Arc<str> = topic.into();
                    for idx in &v[exact..] {
                        self.wildcard_topics
                            .entry(*idx)
                            .or_default()
                            .push(topic.clone());
                    }
                    self.publish_filters.insert(topic, v.clone());
                }

                Some(v)
            }
        }
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let name: Arc<str> = filter.into();
                let data = Data::new(name.clone(), &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(name, idx);
                if has_wildcard(filter) {
                    self.wildcard_filters.insert(filter, idx);
                }

                // Match new filter to existing topics and add to publish_filters if it matches
                // echo-server patch: was a scan of every cached topic for every
                // new filter, O(topics) per subscription (O(clients²) while
                // clients subscribe to topics of their own: 70% of the router's
                // CPU during a 2,000 connects/s ramp). A filter without
                // wildcards matches exactly the topic equal to it; a
                // wildcard filter walks the tree of cached topics, visiting
                // only those its levels can match (a scan was still
                // O(topics) per wildcard filter). A wildcard filter
                // remembers the topics it joined, to leave them when it is
                // freed.
                if has_wildcard(filter) {
                    let mut joined = Vec::new();
                    publish_filters.for_each_match_mut(filter, |topic, filters| {
                        filters.push(idx);
                        joined.push(topic.clone());
                    });
                    if !joined.is_empty() {
                        self.wildcard_topics.insert(idx, joined);
                    }
                } else if let Some(filters) = publish_filters.get_mut(filter) {
                    filters.push(idx);
                }

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
        skip_origin: Option<Origin>,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // unwrap to get index of `self.native` is fine here, because when a new subscribe packet
        // arrives in `Router::handle_device_payload`, it first calls the function
        // `next_native_offset` which creates a new commitlog if one doesn't exist. So any new
        // reads will definitely happen on a valid filter.
        let data = self.native.get(filter_idx).unwrap();
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            // echo-server patch: No Local (MQTT 5, 3.8.3.1): what the
            // subscriber's own session published is read past, not sent.
            if skip_origin == Some(pubdata.origin) {
                return false;
            }

            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        let data = self.native.get_mut(request.filter_idx).unwrap();
        data.waiters.register(id, request);
    }

    /// Cleanup a connection from all the waiters
    /// echo-server patch: `clean` for the filters a connection subscribed
    /// to, instead of every filter the router has (that made each
    /// disconnection O(all filters): 10,000 clients leaving together took
    /// the router seconds). A connection's requests wait only on the filters
    /// it subscribed to.
    pub fn clean_filters(&mut self, id: ConnectionId, filters: impl Iterator<Item = String>) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for filter in filters {
            if let Some(&idx) = self.filter_indexes.get(filter.as_str()) {
                if let Some(data) = self.native.get_mut(idx) {
                    inflight.append(&mut data.waiters.remove(id));
                }
            }
        }
        inflight
    }

    #[allow(dead_code)]
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for (_, data) in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
        }

        inflight
    }

    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
    ) {
        self.insert_retained(publish, publish_properties, topic, Instant::now());
    }

    /// echo-server patch: `insert_to_retained_publishes` for a message
    /// published at `now`. The message it replaces leaves the expiry queue
    /// with it, and the new one joins it if it expires: O(log n).
    fn insert_retained(
        &mut self,
        publish: Publish,
        properties: Option<PublishProperties>,
        topic: Topic,
        now: Instant,
    ) {
        let data = PublishData {
            publish,
            properties,
            timestamp: now,
            origin: 0,
        };
        let deadline = retained_deadline(&data);
        let (topic, old) = self.retained_publishes.insert(topic.into(), data);
        if let Some(old_deadline) = old.as_ref().and_then(retained_deadline) {
            self.retained_expiries
                .remove(&(old_deadline, topic.clone()));
        }
        if let Some(deadline) = deadline {
            self.retained_expiries.insert((deadline, topic));
        }
        self.count_retained();
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.remove_retained(&topic);
    }

    /// echo-server patch: drops a topic's retained message, and its entry
    /// in the expiry queue.
    fn remove_retained(&mut self, topic: &str) {
        let Some((topic, data)) = self.retained_publishes.remove_entry(topic) else {
            return;
        };
        if let Some(deadline) = retained_deadline(&data) {
            self.retained_expiries.remove(&(deadline, topic));
        }
        self.count_retained();
    }

    fn count_retained(&self) {
        let count = self.retained_publishes.len() as u64;
        self.retained_count.store(count, Ordering::Relaxed);
    }

    /// echo-server patch: the count of retained messages held, kept up to
    /// date as they come and go.
    pub fn retained_count(&self) -> Arc<AtomicU64> {
        self.retained_count.clone()
    }

    /// echo-server patch: when the next retained message expires, for the
    /// router to wake then if nothing else wakes it.
    pub fn next_retained_expiry(&self) -> Option<Instant> {
        self.retained_expiries
            .first()
            .map(|(deadline, _)| *deadline)
    }

    /// echo-server patch: frees the retained messages expired by `now`, at
    /// most `max` of them (the router's turns stay bounded; what is left
    /// goes at the next turns, which come at once: the next deadline has
    /// passed). Returns how many went. O(log n) each.
    pub fn expire_retained(&mut self, now: Instant, max: usize) -> usize {
        let mut freed = 0;
        while freed < max {
            match self.retained_expiries.first() {
                Some((deadline, _)) if *deadline <= now => {}
                _ => break,
            }
            let (deadline, topic) = self.retained_expiries.pop_first().expect("peeked");
            // The queue is kept in step with the messages; should an entry
            // ever outlive its message, it must not take a newer one.
            let current = self.retained_publishes.get(&topic);
            if current.and_then(retained_deadline) == Some(deadline) {
                self.retained_publishes.remove(&topic);
            }
            freed += 1;
        }
        if freed > 0 {
            self.count_retained();
            self.retained_publishes.shrink_when_idle();
        }
        freed
    }

    // echo-server patch: was, for every subscription, a pass over every
    // retained message to drop the expired ones, then a scan of all of them
    // against the filter: O(retained messages) per subscription. A filter
    // without wildcards now looks up its one topic, a wildcard filter walks
    // the tree of retained topics, and each drops the expired messages it
    // finds (the others go when the router's sweep comes to them:
    // `expire_retained`; 0.20.0 dropped every expired one at every
    // subscription, at the cost of that scan, and never otherwise). The pass
    // also took the time since publication off each message's stored expiry
    // interval at every read, so a retained message read twice expired
    // early; the stored interval is now left alone and the remaining time
    // computed per read.
    pub fn read_retained_messages(&mut self, filter: &str) -> Vec<PubWithProp> {
        self.read_retained_at(filter, Instant::now())
    }

    /// echo-server patch: `read_retained_messages` at `now`.
    fn read_retained_at(&mut self, filter: &str, now: Instant) -> Vec<PubWithProp> {
        trace!(info = "reading retain msg", filter = &filter);
        if !has_wildcard(filter) {
            return match self.retained_publishes.get(filter) {
                Some(data) if retained_expiry_left(data, now) == Some(0) => {
                    self.remove_retained(filter);
                    Vec::new()
                }
                Some(data) if topic_matches(filter, filter) => {
                    retained_delivery(data, now).into_iter().collect()
                }
                _ => Vec::new(),
            };
        }

        let mut delivered = Vec::new();
        let mut expired = Vec::new();
        self.retained_publishes
            .for_each_match(filter, |topic, data| match retained_delivery(data, now) {
                Some(publish) => delivered.push(publish),
                None => expired.push(topic.clone()),
            });
        for topic in expired {
            self.remove_retained(&topic);
        }
        delivered
    }
}

/// echo-server patch: what persistence needs of the logs
/// (`snapshot`): the retained messages and a log's messages from a cursor
/// on, read without changing anything, and the way back.
impl DataLog {
    /// The retained messages not expired by `now`.
    pub(crate) fn saved_retained(&self, now: Instant) -> Vec<super::snapshot::SavedMessage> {
        self.retained_publishes
            .map
            .values()
            .filter(|data| retained_expiry_left(data, now) != Some(0))
            .map(|data| super::snapshot::save_message(data, now))
            .collect()
    }

    /// The filter whose log has index `idx`.
    pub(crate) fn log_filter(&self, idx: FilterIdx) -> Option<&Arc<str>> {
        self.native.get(idx).map(|data| &data.filter)
    }

    /// echo-server patch: log `idx` forgets every message before `cursor`,
    /// which all its readers have read (`Router::trim_read_logs`,
    /// `Router::trim_logs_read_by_all`), and the count held follows.
    pub(crate) fn forget_before(&mut self, idx: FilterIdx, cursor: Offset) {
        let Some(data) = self.native.get_mut(idx) else {
            return;
        };
        if data.log.first_offset() < cursor {
            let trimmed = data.log.trim_before(cursor);
            self.held_messages.fetch_sub(trimmed, Ordering::Relaxed);
        }
    }

    /// echo-server patch: `filter` as a shared name for the router's maps
    /// by filter: the log's own (`Data::filter`) when the filter has a log,
    /// else a new one (a shared subscription's `$share/...` name, or a log
    /// not made yet).
    pub(crate) fn shared_name(&self, filter: &str) -> Arc<str> {
        match self.filter_indexes.get_key_value(filter) {
            Some((name, _)) => name.clone(),
            None => filter.into(),
        }
    }

    /// Every message of log `idx` from `cursor` on, with its offset, as
    /// stored (No Local and expiry are the reader's business).
    pub(crate) fn read_from(&self, idx: FilterIdx, cursor: Offset) -> Vec<(PublishData, Offset)> {
        let mut out = Vec::new();
        if let Some(data) = self.native.get(idx) {
            // Bounded so that `Segment::readv`'s index arithmetic cannot
            // overflow; far more than a log can hold.
            let _ = data.log.readv(cursor, 1 << 40, &mut out);
        }
        out
    }

    /// Every parked request, by connection: one walk of the logs'
    /// waiters, whatever the number of connections asking.
    pub(crate) fn parked_requests(&self) -> HashMap<ConnectionId, Vec<&DataRequest>> {
        let mut parked: HashMap<ConnectionId, Vec<&DataRequest>> = HashMap::new();
        for (_, data) in self.native.iter() {
            for (id, request) in data.waiters.waiters() {
                parked.entry(*id).or_default().push(request);
            }
        }
        parked
    }

    /// Appends restored messages to the log of `filter` (created if
    /// needed). Returns its index and the cursor of each message slot:
    /// `cursors[k]` reads from the k-th message on, `cursors[len]` reads
    /// what comes next. A message left out (`None`: it expired) reads as
    /// the one after it.
    pub(crate) fn restore_log(
        &mut self,
        filter: &str,
        messages: impl IntoIterator<Item = Option<PublishData>>,
    ) -> (FilterIdx, Vec<Offset>) {
        let (idx, _) = self.next_native_offset(filter);
        let data = self.native.get_mut(idx).expect("just made");
        let mut cursors = Vec::new();
        let before = data.log.held();
        for message in messages {
            cursors.push(data.log.next_offset());
            if let Some(message) = message {
                data.log.append(message);
            }
        }
        count_held(&self.held_messages, before, data.log.held());
        cursors.push(data.log.next_offset());
        (idx, cursors)
    }

    /// A retained message back, as published at its `timestamp`.
    pub(crate) fn restore_retained(&mut self, data: PublishData) {
        let topic = String::from_utf8_lossy(&data.publish.topic).into_owned();
        let (publish, properties, published) = (data.publish, data.properties, data.timestamp);
        self.insert_retained(publish, properties, topic, published);
    }
}

pub struct Data<T> {
    /// echo-server patch: shared with `DataLog::filter_indexes` and the
    /// router's maps by filter (were copies).
    filter: Arc<str>,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: Arc<str>, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if topic_matches(&filter, f) {
                    // echo-server patch: debug, once per filter a client creates
                    debug!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        // echo-server patch: grows on demand (was 10 requests up front per topic)
        let waiters = Waiters::with_capacity(0);
        let metrics = SubscriptionMeter::default();
        Data {
            filter,
            log,
            waiters,
            meter: metrics,
        }
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
        held_messages: &AtomicU64,
    ) -> (Offset, &str) {
        let size = item.size();
        let before = self.log.held();
        let offset = self.log.append(item);
        count_held(held_messages, before, self.log.held());
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &*self.filter)
    }
}

/// echo-server patch: a log's count of messages went from `before` to
/// `after` (up by an append, down by a rotation or a trim).
pub(crate) fn count_held(held: &AtomicU64, before: u64, after: u64) {
    if after >= before {
        held.fetch_add(after - before, Ordering::Relaxed);
    } else {
        held.fetch_sub(before - after, Ordering::Relaxed);
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes
    recorded: VecDeque<(Publish, Option<PublishProperties>)>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            // echo-server patch: grow on demand (were 100 entries each up front)
            committed: VecDeque::new(),
            recorded: VecDeque::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        let ack = Ack::PubRec(ack);
        self.recorded.push_back((publish, props));
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    /// echo-server patch: releases the recorded QoS 2 publish with the
    /// PUBREL's packet id, and answers PUBCOMP 0x92 (packet identifier not
    /// found) when there is none (was: released the oldest recorded
    /// publish, whatever its packet id, so a stray PUBREL delivered another
    /// publish before its own release; and with none recorded the router
    /// dropped the client, where MQTT answers every PUBREL with a PUBCOMP,
    /// §4.3.3). O(recorded), which the client's in-flight window bounds.
    pub fn pubcomp(&mut self, mut ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        let at = self
            .recorded
            .iter()
            .position(|(publish, _)| publish.pkid == ack.pkid);
        let released = at.and_then(|at| self.recorded.remove(at));
        if released.is_none() {
            ack.reason = PubCompReason::PacketIdentifierNotFound;
        }
        self.committed.push_back(Ack::PubComp(ack));
        released
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}

#[cfg(test)]
mod echo_server_patch {
    use super::{AckLog, DataLog, TopicMap};
    use crate::protocol::matches;
    use crate::protocol::{PubComp, PubCompReason, Publish, PublishProperties, QoS};
    use crate::router::Ack;
    use crate::RouterConfig;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn datalog() -> DataLog {
        DataLog::new(RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        })
        .unwrap()
    }

    fn retain(data: &mut DataLog, topic: &str, expiry: Option<u32>) {
        retain_at(data, topic, expiry, Instant::now());
    }

    /// Retains a message as if published at `published`.
    fn retain_at(data: &mut DataLog, topic: &str, expiry: Option<u32>, published: Instant) {
        let properties = expiry.map(|e| PublishProperties {
            message_expiry_interval: Some(e),
            ..Default::default()
        });
        let publish = Publish::new(topic.to_owned(), format!("{topic}!"), true);
        data.insert_retained(publish, properties, topic.to_owned(), published);
    }

    fn topics(got: Vec<(Publish, Option<PublishProperties>)>) -> Vec<String> {
        let mut t: Vec<String> = got
            .iter()
            .map(|(p, _)| String::from_utf8(p.topic.to_vec()).unwrap())
            .collect();
        t.sort();
        t
    }

    /// Exact filters find their retained message by lookup; the result is
    /// what a scan of every retained message against the filter gives.
    #[test]
    fn retained_messages_as_a_full_scan_would() {
        let mut data = datalog();
        let all = ["a/b", "a/c", "x", "a", "a/b/c", "$SYS/x"];
        for t in all {
            retain(&mut data, t, None);
        }
        for filter in ["a/b", "x", "a", "a/b/c", "nothing", "$SYS/x", "a/+", "#", "+/b", "a/#"] {
            let want: Vec<String> = {
                let mut w: Vec<String> = all
                    .iter()
                    .filter(|t| matches(t, filter))
                    .map(|t| t.to_string())
                    .collect();
                w.sort();
                w
            };
            assert_eq!(topics(data.read_retained_messages(filter)), want, "{filter}");
        }
    }

    /// A retained message's expiry interval counts from its publication,
    /// however often it is read; an expired one is neither delivered nor
    /// kept.
    #[test]
    fn retained_expiry_counts_from_publication() {
        let mut data = datalog();
        let now = Instant::now();
        for (topic, age) in [("live", 3), ("dead", 11), ("wild/dead", 11)] {
            retain_at(&mut data, topic, Some(10), now - Duration::from_secs(age));
        }
        for _ in 0..3 {
            let got = data.read_retained_messages("live");
            assert_eq!(got.len(), 1);
            let left = got[0].1.as_ref().unwrap().message_expiry_interval.unwrap();
            assert!((6..=7).contains(&left), "{left} s left");
        }
        assert!(data.read_retained_messages("dead").is_empty());
        assert!(!data.retained_publishes.contains_key("dead"));
        assert_eq!(topics(data.read_retained_messages("#")), ["live"]);
        assert!(!data.retained_publishes.contains_key("wild/dead"));
        assert_eq!(
            data.retained_expiries.len(),
            1,
            "the dropped ones left the queue"
        );
    }

    /// Expired retained messages go without any subscription reading them,
    /// soonest first and at most `max` per call; the others stay, a message
    /// overwritten with a later expiry (or none) keeps the newer one's, a
    /// cleared one leaves the queue, and the count follows.
    #[test]
    fn expired_retained_messages_are_swept() {
        let mut data = datalog();
        let t0 = Instant::now();
        let count = data.retained_count();
        for i in 0..200 {
            retain_at(&mut data, &format!("short/{i}"), Some(1), t0);
        }
        retain_at(&mut data, "forever", None, t0);
        retain_at(&mut data, "long", Some(3600), t0);
        retain_at(&mut data, "later", Some(1), t0);
        retain_at(&mut data, "later", Some(5), t0);
        retain_at(&mut data, "kept", Some(1), t0);
        retain_at(&mut data, "kept", None, t0);
        retain_at(&mut data, "cleared", Some(1), t0);
        data.remove_from_retained_publishes("cleared".to_owned());
        assert_eq!(count.load(Ordering::Relaxed), 204);
        assert_eq!(
            data.retained_expiries.len(),
            202,
            "one entry per expiring message"
        );

        let nearly = t0 + Duration::from_millis(999);
        assert_eq!(data.expire_retained(nearly, 64), 0, "not yet");
        assert_eq!(
            data.next_retained_expiry(),
            Some(t0 + Duration::from_secs(1))
        );

        let due = t0 + Duration::from_secs(2);
        let mut calls = Vec::new();
        loop {
            match data.expire_retained(due, 64) {
                0 => break,
                n => calls.push(n),
            }
        }
        assert_eq!(calls, [64, 64, 64, 8], "bounded per call");
        assert_eq!(count.load(Ordering::Relaxed), 4);
        let mut left: Vec<&str> = data.retained_publishes.map.keys().map(|t| &**t).collect();
        left.sort();
        assert_eq!(left, ["forever", "kept", "later", "long"]);
        assert_eq!(
            data.next_retained_expiry(),
            Some(t0 + Duration::from_secs(5))
        );

        assert_eq!(data.expire_retained(t0 + Duration::from_secs(5), 64), 1);
        assert!(!data.retained_publishes.contains_key("later"));
        assert_eq!(data.retained_expiries.len(), 1, "\"long\" only");
    }

    /// A PUBREL releases the recorded QoS 2 publish with its packet id,
    /// whatever the order they came in; one for a packet id with nothing
    /// recorded releases nothing and is answered PUBCOMP 0x92.
    #[test]
    fn a_pubrel_releases_the_publish_with_its_packet_id() {
        let mut acks = AckLog::new();
        for pkid in [1, 2, 3] {
            let mut publish = Publish::new("t", "m", false);
            (publish.qos, publish.pkid) = (QoS::ExactlyOnce, pkid);
            let pubrec = crate::protocol::PubRec {
                pkid,
                reason: crate::protocol::PubRecReason::Success,
            };
            acks.pubrec(publish, None, pubrec);
        }
        let comp = |pkid| PubComp {
            pkid,
            reason: PubCompReason::Success,
        };
        let released = |p: Option<(Publish, _)>| p.map(|(publish, _)| publish.pkid);
        assert_eq!(released(acks.pubcomp(comp(2))), Some(2));
        assert_eq!(released(acks.pubcomp(comp(9))), None);
        assert_eq!(released(acks.pubcomp(comp(2))), None, "released already");
        assert_eq!(released(acks.pubcomp(comp(1))), Some(1));
        assert_eq!(released(acks.pubcomp(comp(3))), Some(3));
        let answers: Vec<(u16, PubCompReason)> = acks
            .readv()
            .drain(..)
            .filter_map(|ack| match ack {
                Ack::PubComp(c) => Some((c.pkid, c.reason)),
                _ => None,
            })
            .collect();
        let not_found = PubCompReason::PacketIdentifierNotFound;
        assert_eq!(
            answers,
            [
                (2, PubCompReason::Success),
                (9, not_found),
                (2, not_found),
                (1, PubCompReason::Success),
                (3, PubCompReason::Success)
            ]
        );
    }

    /// The patched lookup gives what a scan of every filter gives.
    #[test]
    fn matches_as_a_full_scan_would() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: Some(vec!["init/+".to_owned()]),
            shared_subscriptions_strategy: Default::default(),
        };
        let mut data = DataLog::new(config).unwrap();
        let filters = ["a/b", "a/+", "#", "+/b", "x", "a/#", "$SYS/x", "init/+"];
        for f in filters {
            data.next_native_offset(f);
        }
        for topic in ["a/b", "a/c", "x", "$SYS/x", "y/b", "init/1", "a", "a/b/c"] {
            let mut got = data.matches(topic).unwrap();
            got.sort();
            let mut want: Vec<usize> = filters
                .iter()
                .filter(|f| matches(topic, f))
                .map(|f| *data.filter_indexes.get(*f).unwrap())
                .collect();
            want.sort();
            want.dedup();
            assert_eq!(got, want, "{topic}");
        }
    }

    /// A freed filter leaves every map: its slab slot, given to the next new
    /// filter, is never matched for the freed filter's topics, and topics
    /// cached with it are matched afresh.
    #[test]
    fn a_freed_filter_is_forgotten_and_its_index_is_safe_to_reuse() {
        let mut data = datalog();
        let (exact, _) = data.next_native_offset("t/1");
        let (wild, _) = data.next_native_offset("w/+");
        let (other, _) = data.next_native_offset("w/#");
        assert_eq!(data.matches("t/1").unwrap(), vec![exact]);
        let mut both = data.matches("w/x").unwrap();
        both.sort();
        assert_eq!(both, vec![wild, other]);

        data.remove_filter("t/1");
        data.remove_filter("w/+");
        data.remove_filter("never/created");
        assert_eq!(data.filter_count(), 1);
        assert_eq!(data.index("t/1"), None);
        assert_eq!(data.matches("t/1").unwrap(), Vec::<usize>::new());
        assert_eq!(data.matches("w/x").unwrap(), vec![other]);

        // New filters take the freed slots.
        let (reused_a, _) = data.next_native_offset("z/#");
        let (reused_b, _) = data.next_native_offset("t/2");
        let mut reused = vec![reused_a, reused_b];
        reused.sort();
        let mut freed = vec![exact, wild];
        freed.sort();
        assert_eq!(reused, freed, "slab slots are reused");
        assert_eq!(data.matches("t/1").unwrap(), Vec::<usize>::new());
        assert_eq!(data.matches("w/x").unwrap(), vec![other]);
        assert_eq!(data.matches("z/q").unwrap(), vec![reused_a]);
        assert_eq!(data.matches("t/2").unwrap(), vec![reused_b]);
    }

    /// A filter created after topics were cached joins the cached topics it
    /// matches, and only those, as a scan of every topic would find.
    #[test]
    fn new_filters_join_cached_topics_as_a_full_scan_would() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let mut data = DataLog::new(config).unwrap();
        let topics = ["a/b", "a/c", "x", "y/b", "a", "a/b/c", "$SYS/x"];
        // Cache every topic: each needs a filter to be cached at all.
        data.next_native_offset("#");
        data.next_native_offset("$SYS/x");
        for topic in topics {
            data.matches(topic);
        }
        let filters = ["#", "$SYS/x", "a/b", "a/+", "+/b", "x", "a/#", "a/b/c", "nothing/here"];
        for f in &filters[2..] {
            data.next_native_offset(f);
        }
        for topic in topics {
            let mut got = data.publish_filters.get(topic).cloned().unwrap_or_default();
            got.sort();
            let mut want: Vec<usize> = filters
                .iter()
                .filter(|f| matches(topic, f))
                .map(|f| *data.filter_indexes.get(*f).unwrap())
                .collect();
            want.sort();
            assert_eq!(got, want, "{topic}");
        }
    }

    /// Random filters and topics of a few levels, drawn from names that
    /// collide often, wildcards in every position (malformed ones too, such
    /// as `a/#/b` and `a+`), empty levels and `$` topics. ASCII only:
    /// `protocol::matches` panics on a topic whose first character takes
    /// more than one byte.
    fn random_name(rng: &mut impl rand::Rng, filter: bool) -> String {
        const FILTER_LEVELS: [&str; 8] = ["a", "b", "c", "", "+", "#", "a+", "b#"];
        const TOPIC_LEVELS: [&str; 7] = ["a", "b", "c", "", "+", "#", "$a"];
        let levels = if filter {
            &FILTER_LEVELS[..]
        } else {
            &TOPIC_LEVELS[..]
        };
        let n = rng.gen_range(1..=4);
        let mut name: Vec<&str> = (0..n)
            .map(|_| levels[rng.gen_range(0..levels.len())])
            .collect();
        if !filter && rng.gen_bool(0.1) {
            name[0] = "$SYS";
        }
        name.join("/")
    }

    /// What 0.20.0's scan of every filter gives for a topic.
    fn full_scan(
        data: &DataLog,
        live: &std::collections::HashSet<String>,
        topic: &str,
    ) -> Vec<usize> {
        let mut want: Vec<usize> = live
            .iter()
            .filter(|f| matches(topic, f))
            .map(|f| data.index(f).unwrap())
            .collect();
        want.sort();
        want
    }

    /// The topics a walk of `topics`' tree finds for `filter`, each once,
    /// are those a scan of its map with `protocol::matches` finds.
    fn assert_walk_is_a_scan<V>(topics: &TopicMap<V>, filter: &str, context: &str) {
        let mut got: Vec<Arc<str>> = Vec::new();
        topics.for_each_match(filter, |topic, _| got.push(topic.clone()));
        got.sort();
        let mut want: Vec<Arc<str>> = topics
            .map
            .keys()
            .filter(|t| matches(t, filter))
            .cloned()
            .collect();
        want.sort();
        assert_eq!(got, want, "{context}, filter {filter:?}");
    }

    /// The tree holds exactly the map's topics, each under its own levels
    /// and sharing the map's name, and no node that holds nothing.
    fn assert_tree_is_the_maps<V>(topics: &TopicMap<V>, context: &str) {
        let mut held: Vec<&str> = Vec::new();
        let mut pending = vec![(&topics.tree.root, None::<String>)];
        while let Some((node, path)) = pending.pop() {
            if let Some(path) = &path {
                assert!(
                    node.topic.is_some() || node.children.is_some(),
                    "{context}: empty node {path:?}"
                );
            }
            assert!(node.children.as_ref().map_or(true, |c| !c.is_empty()));
            if let Some(topic) = &node.topic {
                assert_eq!(Some(&**topic), path.as_deref(), "{context}");
                let (key, _) = topics.map.get_key_value(&**topic).unwrap();
                assert!(Arc::ptr_eq(key, topic), "{context}: {topic:?} shared");
                held.push(topic);
            }
            for (name, child) in node.children() {
                let path = path
                    .as_ref()
                    .map_or(name.to_owned(), |p| format!("{p}/{name}"));
                pending.push((child, Some(path)));
            }
        }
        held.sort();
        let mut keys: Vec<&str> = topics.map.keys().map(|t| &**t).collect();
        keys.sort();
        assert_eq!(held, keys, "{context}");
    }

    /// Retained topics of the model, with when their message expires.
    type Retained = std::collections::HashMap<String, Option<Instant>>;

    /// Retains a message on each topic at `now`: half of them expiring,
    /// within 0 to 4 s (some at once, as an interval of 0 has it).
    fn retain_batch(
        data: &mut DataLog,
        retained: &mut Retained,
        topics: Vec<String>,
        now: Instant,
        rng: &mut impl rand::Rng,
    ) {
        for topic in topics {
            let expiry = rng.gen_bool(0.5).then(|| rng.gen_range(0..5));
            retain_at(data, &topic, expiry, now);
            let deadline = expiry.map(|e| now + Duration::from_secs(e.into()));
            retained.insert(topic, deadline);
        }
    }

    /// Reads at `now` the retained messages `filter` matches, as a
    /// subscription does, and checks them against the model: the live ones
    /// matching it are delivered, the expired ones matching it are dropped.
    fn read_retained_as_a_scan(
        data: &mut DataLog,
        retained: &mut Retained,
        filter: &str,
        now: Instant,
        context: &str,
    ) {
        let got = topics(data.read_retained_at(filter, now));
        let mut want: Vec<String> = Vec::new();
        retained.retain(|topic, deadline| {
            if !matches(topic, filter) {
                return true;
            }
            let live = deadline.map_or(true, |d| d > now);
            if live {
                want.push(topic.clone());
            }
            live
        });
        want.sort();
        assert_eq!(got, want, "{context}, filter {filter:?}");
    }

    /// Sweeps at `now`, at most `max`, and checks against the model: the
    /// expired messages go, soonest first (ties by topic), `max` at most.
    fn sweep_as_the_model(
        data: &mut DataLog,
        retained: &mut Retained,
        now: Instant,
        max: usize,
        context: &str,
    ) {
        let mut due: Vec<(Instant, String)> = retained
            .iter()
            .filter_map(|(t, d)| d.filter(|d| *d <= now).map(|d| (d, t.clone())))
            .collect();
        due.sort();
        due.truncate(max);
        for (_, topic) in &due {
            retained.remove(topic);
        }
        assert_eq!(data.expire_retained(now, max), due.len(), "{context}");
        assert_retained_is_the_model(data, retained, context);
    }

    /// The retained messages, their expiry queue and their count are the
    /// model's, nothing more.
    fn assert_retained_is_the_model(data: &DataLog, retained: &Retained, context: &str) {
        let mut held: Vec<&str> = data.retained_publishes.map.keys().map(|t| &**t).collect();
        held.sort();
        let mut want: Vec<&str> = retained.keys().map(|t| t.as_str()).collect();
        want.sort();
        assert_eq!(held, want, "{context}: retained topics");
        let mut queued: Vec<(Instant, &str)> = data
            .retained_expiries
            .iter()
            .map(|(d, t)| (*d, &**t))
            .collect();
        queued.sort();
        let mut deadlines: Vec<(Instant, &str)> = retained
            .iter()
            .filter_map(|(t, d)| d.map(|d| (d, t.as_str())))
            .collect();
        deadlines.sort();
        assert_eq!(queued, deadlines, "{context}: expiry queue");
        let count = data.retained_count.load(Ordering::Relaxed);
        assert_eq!(count, retained.len() as u64, "{context}: count");
    }

    /// Property: whatever filters come and go, the tree (and the topic
    /// cache kept up to date as filters are created and freed) gives for
    /// every topic, new or cached, exactly the filters `protocol::matches`
    /// accepts, each once; and `topic_matches` agrees with it. The trees of
    /// cached and retained topics, as topics come and go (cached with their
    /// filters; retained, cleared, overwritten and expired), give every
    /// filter what a scan of their topics with `protocol::matches` gives,
    /// and hold nothing else. Expired retained messages go when read or
    /// swept, and only then, as a model of their deadlines has it; their
    /// expiry queue holds the model's deadlines, no stale one.
    #[test]
    fn filter_tree_matches_as_protocol_matches_would() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        use std::collections::HashSet;

        for seed in 0..200 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut data = datalog();
            let mut live: HashSet<String> = HashSet::new();
            let mut seen_topics: Vec<String> = Vec::new();
            let mut retained = Retained::new();
            // The time the retained messages are published, read and swept
            // at, a few seconds later each round.
            let mut now = Instant::now();
            for round in 0..6 {
                let context = format!("seed {seed}, round {round}");
                now += Duration::from_millis(rng.gen_range(0..3000));
                for _ in 0..rng.gen_range(0..25) {
                    let filter = random_name(&mut rng, true);
                    data.next_native_offset(&filter);
                    live.insert(filter);
                }
                let batch = (0..rng.gen_range(0..25))
                    .map(|_| random_name(&mut rng, false))
                    .collect();
                retain_batch(&mut data, &mut retained, batch, now, &mut rng);
                // Cleared by an empty payload.
                let cleared: Vec<String> = (0..rng.gen_range(0..10))
                    .map(|_| random_name(&mut rng, false))
                    .collect();
                for topic in cleared {
                    data.remove_from_retained_publishes(topic.clone());
                    retained.remove(&topic);
                }
                for _ in 0..rng.gen_range(0..10) {
                    let filter = random_name(&mut rng, true);
                    read_retained_as_a_scan(&mut data, &mut retained, &filter, now, &context);
                    assert_walk_is_a_scan(&data.retained_publishes, &filter, &context);
                    assert_walk_is_a_scan(&data.publish_filters, &filter, &context);
                }
                let max = rng.gen_range(1..8);
                sweep_as_the_model(&mut data, &mut retained, now, max, &context);
                assert_tree_is_the_maps(&data.retained_publishes, &context);
                for _ in 0..rng.gen_range(0..25) {
                    seen_topics.push(random_name(&mut rng, false));
                }
                // New topics, and cached ones: both must agree with a scan.
                for topic in &seen_topics {
                    let mut got = data.matches(topic).unwrap();
                    got.sort();
                    assert_eq!(
                        got,
                        full_scan(&data, &live, topic),
                        "seed {seed}, topic {topic:?}"
                    );
                    for f in &live {
                        assert_eq!(
                            super::topic_matches(topic, f),
                            matches(topic, f),
                            "{topic:?} {f:?}"
                        );
                    }
                }
                // Free some filters together, as a client leaving does.
                let gone: Vec<String> =
                    live.iter().filter(|_| rng.gen_bool(0.4)).cloned().collect();
                for f in &gone {
                    live.remove(f);
                }
                data.remove_filters(&gone);
                for topic in &seen_topics {
                    let mut cached = data
                        .publish_filters
                        .get(topic.as_str())
                        .cloned()
                        .unwrap_or_default();
                    cached.sort();
                    let want = full_scan(&data, &live, topic);
                    // A topic is cached while some filter matches it.
                    if !cached.is_empty() || data.publish_filters.contains_key(topic.as_str()) {
                        assert_eq!(cached, want, "seed {seed}, cached {topic:?}");
                    }
                }
                for filter in &live {
                    assert_walk_is_a_scan(&data.publish_filters, filter, &context);
                }
                assert_tree_is_the_maps(&data.publish_filters, &context);
            }
            data.remove_filters(live.iter());
            assert_eq!(data.filter_count(), 0);
            assert!(
                data.wildcard_filters.root.is_empty(),
                "seed {seed}: the tree is pruned"
            );
            assert!(data.publish_filters.is_empty(), "seed {seed}");
            assert!(data.wildcard_topics.is_empty(), "seed {seed}");
            assert!(data.publish_filters.tree.root.children.is_none());
            for topic in retained.into_keys() {
                data.remove_from_retained_publishes(topic);
            }
            assert!(data.retained_publishes.is_empty(), "seed {seed}");
            assert!(data.retained_publishes.tree.root.children.is_none());
            assert!(data.retained_expiries.is_empty(), "seed {seed}");
        }
    }

    /// The trees of topics match as `topic_matches` does: `#` matches its
    /// parent level, a topic starting with `$` is matched only by a filter
    /// that names its first level (§4.7.2), empty levels are levels, a topic level `+` is
    /// matched as any other and a topic level `#` only by a `#` before it;
    /// a topic leaves the tree with the nodes only it needed.
    #[test]
    fn topic_tree_semantics() {
        let mut tree: TopicMap<()> = TopicMap::default();
        let all = [
            "a", "a/b", "a/", "/a", "", "a//b", "a/b/c", "$SYS", "$SYS/x", "a/$x", "a/+", "a/#",
            "#", "+",
        ];
        for topic in all {
            tree.insert(topic.into(), ());
        }
        let found = |tree: &TopicMap<()>, filter: &str| {
            let mut got: Vec<String> = Vec::new();
            tree.for_each_match(filter, |topic, _| got.push(topic.to_string()));
            got.sort();
            got
        };
        let cases: [(&str, &[&str]); 15] = [
            (
                "a/#",
                &["a", "a/", "a/#", "a/$x", "a/+", "a//b", "a/b", "a/b/c"],
            ),
            (
                "#",
                &[
                    "", "#", "+", "/a", "a", "a/", "a/#", "a/$x", "a/+", "a//b", "a/b", "a/b/c",
                ],
            ),
            ("+", &["", "+", "a"]),
            ("a/+", &["a/", "a/$x", "a/+", "a/b"]),
            ("a/+/b", &["a//b"]),
            ("+/a", &["/a"]),
            ("/+", &["/a"]),
            ("+/+/+", &["a//b", "a/b/c"]),
            ("a//#", &["a/", "a//b"]),
            ("$SYS/#", &["$SYS", "$SYS/x"]),
            ("$SYS/+", &["$SYS/x"]),
            ("$SYS/x", &["$SYS/x"]),
            ("+/+", &["/a", "a/", "a/$x", "a/+", "a/b"]),
            ("+/x", &[]),
            ("a/b/c/#", &["a/b/c"]),
        ];
        for (filter, want) in cases {
            assert_eq!(found(&tree, filter), want, "{filter}");
            assert_walk_is_a_scan(&tree, filter, "semantics");
        }
        assert_tree_is_the_maps(&tree, "all in");
        // A leaf's removal prunes its path up to the node that holds
        // another topic; an inner topic's keeps the nodes below it.
        tree.remove("a/b/c");
        let a = tree.tree.root.child("a").unwrap();
        assert!(a.child("b").unwrap().children.is_none());
        tree.remove("a");
        assert!(tree.tree.root.child("a").unwrap().topic.is_none());
        for topic in all {
            tree.remove(topic);
            assert_tree_is_the_maps(&tree, topic);
        }
        assert!(tree.tree.root.children.is_none());
    }

    /// `#` matches its parent level and below, `+` exactly one level (an
    /// empty one too), a leading wildcard no `$` topic (a leading `$SYS`
    /// level does), and a shared
    /// subscription's log is its filter's (the router strips
    /// `$share/group/` before it asks for the log).
    #[test]
    fn filter_tree_semantics() {
        let mut data = datalog();
        let (hash, _) = data.next_native_offset("a/#");
        let (plus, _) = data.next_native_offset("a/+");
        let (root, _) = data.next_native_offset("#");
        let (sys, _) = data.next_native_offset("$SYS/#");
        let sorted = |mut v: Vec<usize>| {
            v.sort();
            v
        };
        let mut want = vec![hash, root];
        want.sort();
        assert_eq!(sorted(data.matches("a").unwrap()), want);
        let mut want = vec![hash, plus, root];
        want.sort();
        assert_eq!(sorted(data.matches("a/").unwrap()), want);
        assert_eq!(sorted(data.matches("a/b").unwrap()), want);
        let mut want = vec![hash, root];
        want.sort();
        assert_eq!(sorted(data.matches("a/b/c").unwrap()), want);
        assert_eq!(data.matches("b").unwrap(), vec![root]);
        // As `protocol::matches` (§4.7.2): a `$` topic is matched by a
        // filter naming its first level, not by a leading wildcard.
        assert_eq!(data.matches("$SYS/x").unwrap(), vec![sys]);
        assert_eq!(data.matches("$SYS").unwrap(), vec![sys]);
        assert!(data.matches("$other/x").unwrap().is_empty());
        let (exact, _) = data.next_native_offset("$SYS/y");
        assert_eq!(sorted(data.matches("$SYS/y").unwrap()), sorted(vec![sys, exact]));
        assert!(data.index("$SYS/#") == Some(sys));
        // `$share/group/s/+`: the router asks for the log of `s/+`.
        let (shared, _) = data.next_native_offset("s/+");
        let mut want = vec![shared, root];
        want.sort();
        assert_eq!(sorted(data.matches("s/1").unwrap()), want);
    }

    /// A topic whose first character takes more than one byte is matched
    /// like any other (`protocol::matches` panics on it, and with it the
    /// router thread, for a publish that meets a wildcard filter or its
    /// own exact filter, or for a wildcard subscription once it is cached).
    #[test]
    fn topics_starting_with_a_multibyte_character() {
        let mut data = datalog();
        let (exact, _) = data.next_native_offset("é/x");
        let (plus, _) = data.next_native_offset("+/x");
        let mut got = data.matches("é/x").unwrap();
        got.sort();
        let mut want = vec![exact, plus];
        want.sort();
        assert_eq!(got, want);
        let (late, _) = data.next_native_offset("é/+");
        let mut cached = data.publish_filters.get("é/x").cloned().unwrap();
        cached.sort();
        let mut want = vec![exact, plus, late];
        want.sort();
        assert_eq!(cached, want);
        retain(&mut data, "ü/x", None);
        assert_eq!(topics(data.read_retained_messages("+/x")), ["ü/x"]);
        assert_eq!(topics(data.read_retained_messages("ü/x")), ["ü/x"]);
    }

    /// Freeing many wildcard filters together leaves the topics they were
    /// cached under to the filters that remain, and the tree without their
    /// nodes; freeing one of them alone does the same.
    #[test]
    fn many_wildcard_filters_freed_together() {
        let mut data = datalog();
        let (other, _) = data.next_native_offset("w/#");
        let filters: Vec<String> = (0..1000).map(|i| format!("w/{i}/+")).collect();
        for f in &filters {
            data.next_native_offset(f);
        }
        for i in 0..1000 {
            assert_eq!(data.matches(&format!("w/{i}/x")).unwrap().len(), 2);
        }
        data.remove_filter(&filters[0]);
        assert_eq!(data.publish_filters.get("w/0/x").unwrap(), &vec![other]);
        data.remove_filters(&filters[1..]);
        assert_eq!(data.filter_count(), 1);
        for i in 0..1000 {
            assert_eq!(
                data.publish_filters
                    .get(format!("w/{i}/x").as_str())
                    .unwrap(),
                &vec![other]
            );
        }
        // Only `w/#`'s node is left: one path of one level.
        let root = &data.wildcard_filters.root;
        assert_eq!(root.literal.len(), 1);
        let w = root.literal.get("w").unwrap();
        assert!(w.literal.is_empty() && w.plus.is_none() && w.end.is_empty());
        assert_eq!(w.hash, vec![other]);
        data.remove_filter("w/#");
        assert!(data.wildcard_filters.root.is_empty());
        assert!(data.publish_filters.is_empty());
        assert!(data.wildcard_topics.is_empty());
    }
}
