//! echo-server patch: the router's maps give their memory back once they
//! are mostly empty.
//!
//! A `HashMap` keeps the capacity it grew to, and so does a `Slab`. A
//! client that subscribes to many filters, or whose wildcard filters pull
//! thousands of topics into the topic cache, grows the router's maps to its
//! own size; when it leaves they are empty but as large as ever (after a
//! client with 1,000 wildcard filters and the 20,000 topics they matched
//! had gone, the topic cache alone kept a 1.3 MB table). Shrinking when a
//! table is at most a quarter full costs a rehash of what is left, which
//! the growth that made it that large has already paid for several times.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash};

use slab::Slab;

/// Below this capacity a table is not worth shrinking.
const FLOOR: usize = 64;

/// A table that can give back capacity it no longer needs.
pub(crate) trait Shrink {
    /// Shrinks the table to twice its length when at most a quarter of
    /// its capacity is in use, so that a table that grows and shrinks by a
    /// little around one size is never rehashed back and forth.
    fn shrink_when_idle(&mut self);
}

fn idle(len: usize, capacity: usize) -> bool {
    capacity > FLOOR && len <= capacity / 4
}

impl<K: Eq + Hash, V, S: BuildHasher> Shrink for HashMap<K, V, S> {
    fn shrink_when_idle(&mut self) {
        if idle(self.len(), self.capacity()) {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<K: Eq + Hash, S: BuildHasher> Shrink for HashSet<K, S> {
    fn shrink_when_idle(&mut self) {
        if idle(self.len(), self.capacity()) {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<T> Shrink for Slab<T> {
    /// A slab cannot move its entries, so it only loses the vacant ones
    /// after the last occupied one: those of the filters freed last.
    fn shrink_when_idle(&mut self) {
        if idle(self.len(), self.capacity()) {
            self.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod echo_server_patch {
    use super::*;

    #[test]
    fn a_map_emptied_gives_its_memory_back() {
        let mut map: HashMap<usize, usize> = (0..10_000).map(|i| (i, i)).collect();
        let grown = map.capacity();
        map.retain(|k, _| *k < 10);
        map.shrink_when_idle();
        assert!(map.capacity() < grown / 100, "{} of {grown}", map.capacity());
        assert_eq!(map.len(), 10);
        assert_eq!(map[&9], 9);
    }

    #[test]
    fn a_map_still_in_use_is_left_alone() {
        let mut set: HashSet<usize> = (0..1_000).collect();
        set.retain(|k| *k < 600);
        set.shrink_when_idle();
        // (Not the same capacity as before: removals leave tombstones that
        // hashbrown counts out of it.)
        assert!(set.capacity() >= 1_000, "{}", set.capacity());
    }

    #[test]
    fn a_slab_loses_its_vacant_tail_and_keeps_its_keys() {
        let mut slab = Slab::new();
        let keys: Vec<usize> = (0..10_000).map(|i| slab.insert(i)).collect();
        for key in &keys[5..] {
            slab.remove(*key);
        }
        slab.remove(keys[2]);
        slab.shrink_when_idle();
        assert!(slab.capacity() < 100, "{}", slab.capacity());
        assert_eq!(slab.get(keys[4]), Some(&4));
        assert_eq!(slab.get(keys[2]), None);
        // The freed slot in the middle is still reused.
        assert_eq!(slab.insert(42), keys[2]);
    }
}
