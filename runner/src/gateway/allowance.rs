//! Token buckets: how many of something costly (a review the API server is asked for) may be
//! in the making or have gone badly at once, refilled at a steady rate. A review takes one
//! before it is asked, so a burst of requests at once cannot all pass, and gives it back when
//! it went well.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug)]
pub struct Allowance {
    left: f64,
    burst: f64,
    per_second: f64,
    at: Option<Instant>,
}

impl Allowance {
    pub const fn full(burst: f64, per_second: f64) -> Self {
        Self {
            left: burst,
            burst,
            per_second,
            at: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let grown = now.saturating_duration_since(at).as_secs_f64() * self.per_second;
            self.left = (self.left + grown).min(self.burst);
        }
        self.at = Some(now);
    }

    /// Takes one, or says how long until there is one.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.left < 1.0 {
            return Some(Duration::from_secs_f64((1.0 - self.left) / self.per_second));
        }
        self.left -= 1.0;
        None
    }

    pub fn give_back(&mut self) {
        self.left = (self.left + 1.0).min(self.burst);
    }

    pub fn is_full(&self, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(now);
        copy.left >= copy.burst
    }

    #[cfg(test)]
    pub fn burst(&self) -> f64 {
        self.burst
    }
}

/// How a review that took from [`Allowances`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Went {
    /// Accepted, allowed: what it took is given back.
    Well,
    /// Refused, denied: what it took is kept, and its key counts as one that went badly lately.
    Badly,
    /// No answer: what it took is kept (asking cost all the same).
    Unanswered,
}

/// What a review took from [`Allowances`]: whose allowance (`None`: the one keys past the most
/// tracked share), and whether the shared one too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken<K> {
    key: Option<K>,
    shared: bool,
}

/// An allowance per key (a caller's address, a person) of reviews in the making or gone badly,
/// and one shared by the keys that had a review go badly lately — so many keys together cost no
/// more than it, while keys with nothing gone badly are not held to it.
#[derive(Debug)]
pub struct Allowances<K> {
    keys: Mutex<HashMap<Option<K>, Kept>>,
    shared: Mutex<Allowance>,
    per_key: Allowance,
    /// How long a key counts as one that had a review go badly.
    lately: Duration,
    /// Keys tracked at most; past that, new keys share the `None` key's allowance.
    max_keys: usize,
}

/// One key's allowance, and when a review of its last went badly.
#[derive(Clone, Copy, Debug)]
struct Kept {
    allowance: Allowance,
    bad_at: Option<Instant>,
}

impl Kept {
    fn bad_lately(&self, now: Instant, lately: Duration) -> bool {
        self.bad_at
            .is_some_and(|at| now.saturating_duration_since(at) < lately)
    }
}

impl<K: Clone + Eq + Hash> Allowances<K> {
    pub fn new(per_key: Allowance, shared: Allowance, lately: Duration, max_keys: usize) -> Self {
        Self {
            keys: Mutex::default(),
            shared: Mutex::new(shared),
            per_key,
            lately,
            max_keys,
        }
    }

    /// Takes one of `key`'s (and of the shared one, if a review of its went badly lately), or
    /// says how long until there is one.
    pub fn take(&self, key: Option<K>, now: Instant) -> Result<Taken<K>, Duration> {
        let Ok(mut keys) = self.keys.lock() else {
            return Ok(Taken { key, shared: false });
        };
        let key = self.tracked(&mut keys, key, now);
        let kept = keys.entry(key.clone()).or_insert(Kept {
            allowance: self.per_key,
            bad_at: None,
        });
        if let Some(wait) = kept.allowance.take(now) {
            return Err(wait);
        }
        if !kept.bad_lately(now, self.lately) {
            return Ok(Taken { key, shared: false });
        }
        match self.shared.lock().map(|mut shared| shared.take(now)) {
            Ok(Some(wait)) => {
                kept.allowance.give_back();
                Err(wait)
            }
            _ => Ok(Taken { key, shared: true }),
        }
    }

    /// After the review `taken` went as `went`.
    pub fn after(&self, taken: &Taken<K>, went: Went, now: Instant) {
        let Ok(mut keys) = self.keys.lock() else {
            return;
        };
        let Some(kept) = keys.get_mut(&taken.key) else {
            return;
        };
        match went {
            Went::Well => {
                kept.allowance.give_back();
                if taken.shared
                    && let Ok(mut shared) = self.shared.lock()
                {
                    shared.give_back();
                }
            }
            Went::Badly => kept.bad_at = Some(now),
            Went::Unanswered => {}
        }
    }

    /// The key `key` is tracked under: itself, or past [`Allowances::max_keys`] the shared
    /// `None` (keys whose allowance has refilled and with nothing gone badly lately are dropped
    /// first: they are no different from new ones).
    fn tracked(&self, keys: &mut HashMap<Option<K>, Kept>, key: Option<K>, now: Instant) -> Option<K> {
        if keys.len() < self.max_keys || keys.contains_key(&key) {
            return key;
        }
        keys.retain(|_, k| !k.allowance.is_full(now) || k.bad_lately(now, self.lately));
        if keys.len() < self.max_keys { key } else { None }
    }
}
