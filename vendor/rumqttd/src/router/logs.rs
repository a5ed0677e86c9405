use super::Ack;
use slab::Slab;
use tracing::{debug, trace};

use crate::protocol::{
    matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    // TODO: calculate size of publish properties as well!
    fn size(&self) -> usize {
        let publish = &self.publish;
        4 + publish.topic.len() + publish.payload.len()
    }
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
    filter_indexes: HashMap<Filter, FilterIdx>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
    /// echo-server patch: the filters with a wildcard ('+' or '#'), the
    /// only ones a new topic must be matched against one by one; a filter
    /// without wildcards matches exactly one topic, found by a map lookup.
    wildcard_filters: Vec<(Filter, FilterIdx)>,
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
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();

        let mut wildcard_filters = Vec::new();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                if has_wildcard(&filter) {
                    wildcard_filters.push((filter.clone(), idx));
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
            wildcard_filters,
        })
    }

    /// echo-server patch: the index of a filter's log, if it has one.
    pub fn index(&self, filter: &str) -> Option<FilterIdx> {
        self.filter_indexes.get(filter).copied()
    }

    /// echo-server patch: frees a filter's log once no session subscribes
    /// to it (0.20.0 kept every filter ever subscribed until restart, ~1.3 KB
    /// each). Its index leaves every map first, so a later filter that gets
    /// the same slab slot is never mistaken for it. Removing a wildcard
    /// filter walks the topic cache, O(cached topics).
    pub fn remove_filter(&mut self, filter: &str) {
        let Some(idx) = self.filter_indexes.remove(filter) else {
            return;
        };
        if has_wildcard(filter) {
            self.wildcard_filters.retain(|(_, i)| *i != idx);
            self.publish_filters.retain(|_, filters| {
                filters.retain(|i| *i != idx);
                !filters.is_empty()
            });
        } else if let Some(filters) = self.publish_filters.get_mut(filter) {
            filters.retain(|i| *i != idx);
            if filters.is_empty() {
                self.publish_filters.remove(filter);
            }
        }
        self.native.remove(idx);
    }

    /// echo-server patch: how many filters have a log.
    pub fn filter_count(&self) -> usize {
        self.native.len()
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(filter)?)
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
                // (2 ms per topic with 10,000 subscribed clients). Same
                // result: the exact filter equal to the topic, plus the
                // wildcard filters that match it. Topics starting with '$'
                // match nothing, as `matches` says.
                let mut v: Vec<usize> = Vec::new();
                if !topic.starts_with('$') {
                    if let Some(&idx) = self.filter_indexes.get(topic) {
                        if matches(topic, topic) {
                            v.push(idx);
                        }
                    }
                    v.extend(
                        self.wildcard_filters
                            .iter()
                            .filter(|(filter, _)| matches(topic, filter))
                            .map(|(_, filter_idx)| *filter_idx),
                    );
                }

                if !v.is_empty() {
                    self.publish_filters.insert(topic.to_owned(), v.clone());
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
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);
                if has_wildcard(filter) {
                    self.wildcard_filters.push((filter.to_owned(), idx));
                }

                // Match new filter to existing topics and add to publish_filters if it matches
                // echo-server patch: was a scan of every cached topic for every
                // new filter, O(topics) per subscription (O(clients²) while
                // clients subscribe to topics of their own: 70% of the router's
                // CPU during a 2,000 connects/s ramp). A filter without
                // wildcards matches exactly the topic equal to it.
                if has_wildcard(filter) {
                    for (topic, filters) in publish_filters.iter_mut() {
                        if matches(topic, filter) {
                            filters.push(idx);
                        }
                    }
                } else if let Some(filters) = publish_filters.get_mut(filter) {
                    if matches(filter, filter) {
                        filters.push(idx);
                    }
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
            if let Some(&idx) = self.filter_indexes.get(&filter) {
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
        let pub_with_props = (publish, publish_properties);
        self.retained_publishes.insert(topic, pub_with_props.into());
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(&topic);
    }

    // echo-server patch: was, for every subscription, a pass over every
    // retained message to drop the expired ones, then a scan of all of them
    // against the filter: O(retained messages) per subscription. A filter
    // without wildcards now looks up its one topic. The pass also took the
    // time since publication off each message's stored expiry interval at
    // every read, so a retained message read twice expired early; the stored
    // interval is now left alone and the remaining time computed per read.
    pub fn read_retained_messages(&mut self, filter: &str) -> Vec<PubWithProp> {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();

        if !has_wildcard(filter) {
            return match self.retained_publishes.get(filter) {
                Some(data) if retained_expiry_left(data, now) == Some(0) => {
                    self.retained_publishes.remove(filter);
                    Vec::new()
                }
                Some(data) if matches(filter, filter) => {
                    retained_delivery(data, now).into_iter().collect()
                }
                _ => Vec::new(),
            };
        }

        // discard expired retained messages
        self.retained_publishes
            .retain(|_, data| retained_expiry_left(data, now) != Some(0));
        self.retained_publishes
            .iter()
            .filter(|(topic, _)| matches(topic, filter))
            .filter_map(|(_, data)| retained_delivery(data, now))
            .collect()
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
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
            filter: filter.to_owned(),
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
    ) -> (Offset, &Filter) {
        let size = item.size();
        let offset = self.log.append(item);
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
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

    pub fn pubcomp(&mut self, ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        let ack = Ack::PubComp(ack);
        self.committed.push_back(ack);
        self.recorded.pop_front()
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
    use super::{matches, DataLog};
    use crate::protocol::{Publish, PublishProperties};
    use crate::RouterConfig;
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
        let properties = expiry.map(|e| PublishProperties {
            message_expiry_interval: Some(e),
            ..Default::default()
        });
        let publish = Publish::new(topic.to_owned(), format!("{topic}!"), true);
        data.insert_to_retained_publishes(publish, properties, topic.to_owned());
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
        retain(&mut data, "live", Some(10));
        retain(&mut data, "dead", Some(10));
        retain(&mut data, "wild/dead", Some(10));
        let now = Instant::now();
        for (topic, age) in [("live", 3), ("dead", 11), ("wild/dead", 11)] {
            data.retained_publishes.get_mut(topic).unwrap().timestamp = now - Duration::from_secs(age);
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
}
