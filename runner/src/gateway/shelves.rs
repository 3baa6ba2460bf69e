//! What a gateway replica keeps for its tenants under one bound (its caches): one shelf per
//! tenant, each bounded on its own, and all of them together. When the whole is full, the
//! tenant keeping the most gives up its least recently used — so a tenant filling the replica
//! evicts its own once it holds the most, and a tenant keeping no more than an equal share
//! keeps it however busy the others are (one keeping more may be pushed down to that share).
//! Within a shelf, what was used least recently goes first.
//!
//! The decisions are plain data structure work; callers hold it behind their own lock.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
};

/// How much may be kept: per tenant (entries and weight) and in all (weight). A weight is the
/// caller's measure of an entry's cost — bytes, or 1 for entries of one size.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub tenant_entries: usize,
    pub tenant_weight: usize,
    pub total_weight: usize,
}

/// Entries kept per tenant, by key.
#[derive(Debug)]
pub struct Shelves<K, V> {
    bounds: Bounds,
    shelves: HashMap<String, Shelf<K, V>>,
    weight: usize,
    next_use: u64,
}

#[derive(Debug)]
struct Shelf<K, V> {
    entries: HashMap<K, Held<V>>,
    /// Keys by their last use, least recent first, with the use they were queued at: a key
    /// used again is queued again, and its earlier place is skipped when it reaches the front.
    uses: VecDeque<(K, u64)>,
    weight: usize,
}

#[derive(Debug)]
struct Held<V> {
    value: V,
    weight: usize,
    last_use: u64,
}

impl<K, V> Default for Shelf<K, V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            uses: VecDeque::new(),
            weight: 0,
        }
    }
}

impl<K: Clone + Eq + Hash, V> Shelves<K, V> {
    pub fn new(bounds: Bounds) -> Self {
        Self {
            bounds,
            shelves: HashMap::new(),
            weight: 0,
            next_use: 0,
        }
    }

    /// What `tenant` keeps under `key`, leaving its place in the eviction order as it is.
    pub fn peek(&self, tenant: &str, key: &K) -> Option<&V> {
        self.shelves.get(tenant)?.entries.get(key).map(|h| &h.value)
    }

    /// What `tenant` keeps under `key`, which counts as using it: it goes last in its shelf's
    /// eviction order.
    pub fn get(&mut self, tenant: &str, key: &K) -> Option<&V> {
        let use_ = self.next_use;
        let shelf = self.shelves.get_mut(tenant)?;
        shelf.entries.get_mut(key)?.last_use = use_;
        self.next_use += 1;
        shelf.uses.push_back((key.clone(), use_));
        shelf.compact();
        shelf.entries.get(key).map(|h| &h.value)
    }

    /// Keeps `value` for `tenant` under `key` (replacing what was there), making room as the
    /// bounds require. False, and nothing kept, when its weight alone passes a bound.
    pub fn insert(&mut self, tenant: &str, key: K, value: V, weight: usize) -> bool {
        if weight > self.bounds.tenant_weight || weight > self.bounds.total_weight {
            return false;
        }
        self.remove(tenant, &key);
        while self.weight + weight > self.bounds.total_weight && self.evict_from_the_largest() {}
        let use_ = self.next_use;
        self.next_use += 1;
        let shelf = self.shelves.entry(tenant.to_owned()).or_default();
        shelf.weight += weight;
        shelf.uses.push_back((key.clone(), use_));
        shelf.entries.insert(
            key,
            Held {
                value,
                weight,
                last_use: use_,
            },
        );
        self.weight += weight;
        let mut freed = 0;
        while shelf.entries.len() > self.bounds.tenant_entries || shelf.weight > self.bounds.tenant_weight {
            match shelf.evict_least_recent() {
                Some(weight) => freed += weight,
                None => break,
            }
        }
        self.weight -= freed;
        true
    }

    /// Forgets what `tenant` keeps under `key`.
    pub fn remove(&mut self, tenant: &str, key: &K) -> Option<V> {
        let shelf = self.shelves.get_mut(tenant)?;
        let held = shelf.entries.remove(key)?;
        shelf.weight -= held.weight;
        self.weight -= held.weight;
        if shelf.entries.is_empty() {
            self.shelves.remove(tenant);
        } else {
            shelf.compact();
        }
        Some(held.value)
    }

    /// Entries `tenant` keeps.
    pub fn len(&self, tenant: &str) -> usize {
        self.shelves.get(tenant).map_or(0, |s| s.entries.len())
    }

    /// The weight of everything kept.
    #[cfg(test)]
    pub fn weight(&self) -> usize {
        self.weight
    }

    /// Forgets the least recently used entry of the tenant keeping the most weight; false
    /// when nothing is kept.
    fn evict_from_the_largest(&mut self) -> bool {
        let Some((tenant, shelf)) = self
            .shelves
            .iter_mut()
            .filter(|(_, s)| s.weight > 0)
            .max_by_key(|(_, s)| s.weight)
        else {
            return false;
        };
        let Some(freed) = shelf.evict_least_recent() else {
            return false;
        };
        self.weight -= freed;
        if shelf.entries.is_empty() {
            let tenant = tenant.clone();
            self.shelves.remove(&tenant);
        }
        true
    }
}

impl<K: Clone + Eq + Hash, V> Shelf<K, V> {
    /// Forgets the entry used least recently, returning its weight.
    fn evict_least_recent(&mut self) -> Option<usize> {
        while let Some((key, use_)) = self.uses.pop_front() {
            if self.entries.get(&key).is_some_and(|h| h.last_use == use_) {
                let held = self.entries.remove(&key)?;
                self.weight -= held.weight;
                return Some(held.weight);
            }
        }
        None
    }

    /// Drops the places of keys used again or forgotten once they are most of the queue, so
    /// it stays within a few times the entries however often they are used.
    fn compact(&mut self) {
        if self.uses.len() > 2 * self.entries.len() + 16 {
            let entries = &self.entries;
            self.uses
                .retain(|(key, use_)| entries.get(key).is_some_and(|h| h.last_use == *use_));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shelves(tenant_entries: usize, total_weight: usize) -> Shelves<u32, &'static str> {
        Shelves::new(Bounds {
            tenant_entries,
            tenant_weight: total_weight,
            total_weight,
        })
    }

    #[test]
    fn a_shelf_forgets_what_it_used_least_recently() {
        let mut kept = shelves(3, 100);
        for key in 1..=3 {
            assert!(kept.insert("shop", key, "x", 1));
        }
        assert!(kept.get("shop", &1).is_some(), "1 used again");
        assert!(kept.peek("shop", &2).is_some(), "a peek is not a use");
        assert!(kept.insert("shop", 4, "x", 1));
        assert_eq!(kept.peek("shop", &2), None, "2 was used least recently");
        assert!(kept.peek("shop", &1).is_some() && kept.peek("shop", &3).is_some());
        assert_eq!(kept.len("shop"), 3);
    }

    #[test]
    fn a_tenant_filling_the_whole_evicts_only_its_own_once_it_keeps_the_most() {
        let mut kept = shelves(1_000, 10);
        assert!(kept.insert("quiet", 0, "q", 1));
        assert!(kept.insert("quiet", 1, "q", 1));
        for key in 0..100 {
            assert!(kept.insert("busy", key, "b", 1));
        }
        assert_eq!(kept.weight(), 10);
        assert_eq!(kept.len("quiet"), 2, "the quiet tenant keeps what it had");
        assert_eq!(kept.len("busy"), 8);
        assert!(kept.peek("busy", &99).is_some() && kept.peek("busy", &91).is_none());
        // When the quiet tenant is the largest, it is its turn to give up its oldest.
        let mut kept = shelves(1_000, 4);
        for key in 0..3 {
            assert!(kept.insert("quiet", key, "q", 1));
        }
        assert!(kept.insert("busy", 0, "b", 1));
        assert!(kept.insert("busy", 1, "b", 1));
        assert_eq!((kept.len("quiet"), kept.len("busy")), (2, 2));
        assert_eq!(kept.peek("quiet", &0), None);
    }

    #[test]
    fn weights_count_and_what_passes_a_bound_alone_is_not_kept() {
        let mut kept = shelves(10, 10);
        assert!(!kept.insert("shop", 0, "huge", 11));
        assert!(kept.insert("shop", 1, "a", 6));
        assert!(kept.insert("shop", 1, "b", 6), "replaced, not added");
        assert_eq!(kept.weight(), 6);
        assert!(kept.insert("shop", 2, "c", 6));
        assert_eq!((kept.peek("shop", &1), kept.weight()), (None, 6));
        assert_eq!(kept.remove("shop", &2), Some("c"));
        assert_eq!((kept.weight(), kept.len("shop")), (0, 0));
        assert!(kept.shelves.is_empty(), "an empty shelf is not kept either");
    }

    #[test]
    fn entries_used_over_and_over_keep_the_queue_bounded() {
        let mut kept = shelves(4, 100);
        for key in 0..4 {
            kept.insert("shop", key, "x", 1);
        }
        for round in 0..10_000u32 {
            kept.get("shop", &(round % 4));
        }
        let queued = kept.shelves["shop"].uses.len();
        assert!(queued <= 2 * 4 + 17, "{queued}");
        assert_eq!(kept.len("shop"), 4);
    }
}
