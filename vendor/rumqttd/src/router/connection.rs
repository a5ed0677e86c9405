use slab::Slab;

use crate::protocol::LastWillProperties;
use crate::Filter;
use crate::{protocol::LastWill, Topic};
use std::collections::{HashMap, HashSet};

use super::ConnectionEvents;

/// Used to register a new connection with the router
/// Connection messages encompasses a handle for router to
/// communicate with this connection
#[derive(Debug)]
pub struct Connection {
    pub client_id: String,
    /// Id of client's organisation/tenant and the prefix associated with tenant's MQTT topic
    pub tenant_prefix: Option<String>,
    /// Dynamically create subscription filters incase they didn't exist during a publish
    pub dynamic_filters: bool,
    /// Clean session
    pub clean: bool,
    /// echo-server patch: how long the session is kept after the client
    /// disconnects: `Some(ZERO)` not at all, `None` for ever. 0.20.0 kept
    /// every session that did not start clean for ever, and ended every
    /// one that did at disconnection, whatever MQTT 5's session expiry
    /// interval said (3.1.2.11.2). `Connection::new` derives it from
    /// `clean` as 3.1.1 has it; `LinkBuilder::session_expiry` sets it.
    pub session_expiry: Option<std::time::Duration>,
    /// Subscriptions
    pub subscriptions: HashSet<Filter>,
    /// Last will of this connection, and its properties. echo-server
    /// patch: boxed, and one field (were two, 200 bytes in every
    /// connection's slot of the router's table, which the router fills as
    /// clients arrive): the router moves a will to its own map as the
    /// connection is set up, so a slot holds one for no longer than that.
    pub last_will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
    /// Connection events
    pub events: ConnectionEvents,
    /// Topic aliases set by clients. echo-server patch: made when the
    /// client sets its first (`validate_and_set_topic_alias`); an empty
    /// map took 48 bytes of every slot, and most clients never set one.
    pub(crate) topic_aliases: Option<Box<HashMap<u16, Topic>>>,
    /// Topic aliases used by broker. echo-server patch: boxed (96 bytes
    /// of every slot inline; only clients that allow aliases have one).
    pub(crate) broker_topic_aliases: Option<Box<BrokerAliases>>,
    /// subscription IDs for a connection
    pub(crate) subscription_ids: HashMap<Filter, usize>,
    /// echo-server patch: this session's mark on what it publishes, for No
    /// Local (`logs::Origin`); the router sets it.
    pub(crate) origin: super::logs::Origin,
}

impl Connection {
    /// Create connection state to hold identifying information of connecting device
    pub fn new(
        tenant_id: Option<String>,
        client_id: String,
        clean: bool,
        dynamic_filters: bool,
    ) -> Connection {
        // Change client id to -> tenant_id.client_id and derive topic path prefix
        // to validate topics
        let (client_id, tenant_prefix) = match tenant_id {
            Some(tenant_id) => {
                let tenant_prefix = Some("/tenants/".to_owned() + &tenant_id + "/");
                let client_id = tenant_id + "." + &client_id;
                (client_id, tenant_prefix)
            }
            None => (client_id, None),
        };

        Connection {
            client_id,
            tenant_prefix,
            dynamic_filters,
            clean,
            session_expiry: if clean { Some(std::time::Duration::ZERO) } else { None },
            subscriptions: HashSet::default(),
            last_will: None,
            events: ConnectionEvents::default(),
            topic_aliases: None,
            broker_topic_aliases: None,
            subscription_ids: HashMap::new(),
            origin: 0,
        }
    }

    pub fn topic_alias_max(&mut self, max: u16) -> &mut Connection {
        // if topic_alias_max is 0, that means client doesn't want to use / support topic alias
        if max > 0 {
            self.broker_topic_aliases = Some(Box::new(BrokerAliases::new(max)));
        }
        self
    }

    pub fn last_will(
        &mut self,
        will: Option<LastWill>,
        props: Option<LastWillProperties>,
    ) -> &mut Connection {
        self.last_will = will.map(|will| Box::new((will, props)));
        self
    }
}

#[derive(Debug)]
pub(crate) struct BrokerAliases {
    pub(crate) broker_topic_aliases: HashMap<Filter, u16>,
    pub(crate) used_aliases: Slab<()>,
    pub(crate) topic_alias_max: u16,
}

impl BrokerAliases {
    fn new(topic_alias_max: u16) -> BrokerAliases {
        let mut used_aliases = Slab::new();
        // occupy 0th index as 0 is invalid topic alias
        assert_eq!(0, used_aliases.insert(()));

        let broker_topic_aliases = HashMap::new();

        BrokerAliases {
            broker_topic_aliases,
            used_aliases,
            topic_alias_max,
        }
    }

    // unset / remove the alias for topic
    pub fn remove_alias(&mut self, topic: &str) {
        if let Some(alias) = self.broker_topic_aliases.remove(topic) {
            self.used_aliases.remove(alias as usize);
        }
    }

    // Get alias used for the topic, if it exists
    pub fn get_alias(&self, topic: &str) -> Option<u16> {
        self.broker_topic_aliases.get(topic).copied()
    }

    // Set new alias for a topic and return the alias
    // returns None if can't set new alias
    pub fn set_new_alias(&mut self, topic: &str) -> Option<u16> {
        let alias_to_use = self.used_aliases.insert(());

        // NOTE: maybe we can use self.used_aliases.len()
        // to check for availability of alias
        if alias_to_use > self.topic_alias_max as usize {
            self.used_aliases.remove(alias_to_use);
            return None;
        }

        let alias_to_use = alias_to_use as u16;
        self.broker_topic_aliases
            .insert(topic.to_owned(), alias_to_use);
        Some(alias_to_use)
    }
}

#[cfg(test)]
mod echo_server_patch {
    /// echo-server patch: every connection the router may hold has a slot
    /// of this size in its table, filled as clients arrive (RSS per idle
    /// client); the will, the client's topic aliases and the broker's
    /// aliases toward it are boxed out of it (552 bytes, then 320, before).
    #[test]
    fn a_connection_slot_stays_small() {
        let size = std::mem::size_of::<super::Connection>();
        assert!(size <= 232, "Connection is {size} bytes");
    }

    /// The other slots the router fills per connection: its incoming and
    /// outgoing buffers (144 and 128 bytes before their meter's unused
    /// maps and their own copies of the client id went).
    #[test]
    fn the_buffer_slots_stay_small() {
        use crate::router::iobufs::{Incoming, Outgoing};
        let sizes = (std::mem::size_of::<Incoming>(), std::mem::size_of::<Outgoing>());
        assert!(sizes.0 <= 40 && sizes.1 <= 120, "Incoming, Outgoing: {sizes:?}");
    }
}
