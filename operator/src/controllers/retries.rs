//! How soon a reconcile that failed is tried again. The first retry comes after 5 s, and each
//! consecutive failure of the same object doubles the wait, up to a minute; a pass that
//! succeeds starts the count again. So an object that cannot be reconciled for a while — a
//! pod of an earlier Session holding a name, a child someone else planted that the operator
//! will not adopt, an API server refusing — costs the workers every tenant shares one pass a
//! minute, not one every 5 s, however many of them a tenant makes.

use std::{collections::HashMap, sync::Mutex, time::Duration};

/// The first wait after a failure.
const FIRST: Duration = Duration::from_secs(5);
/// The longest wait.
const LONGEST: Duration = Duration::from_secs(60);
/// Objects whose failures are counted at most; past it one count is forgotten for each new
/// object (objects that failed and were then deleted are not otherwise forgotten).
const MAX_COUNTED: usize = 65_536;

/// An object: its kind, namespace and name.
pub type ObjectKey = (String, String, String);

/// The key of `object`.
pub fn key<K: kube::Resource<DynamicType = ()>>(object: &K) -> ObjectKey {
    let meta = object.meta();
    (
        K::kind(&()).into_owned(),
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Consecutive failures per object.
#[derive(Debug, Default)]
pub struct Retries(Mutex<HashMap<ObjectKey, u32>>);

/// The wait after the `failures`th consecutive failure (from 1) (pure).
pub fn wait_after(failures: u32) -> Duration {
    FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(LONGEST)
}

impl Retries {
    /// Counts a failure of `object`; how long to wait before trying it again.
    pub fn failed(&self, object: ObjectKey) -> Duration {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= MAX_COUNTED
            && !counts.contains_key(&object)
            && let Some(forgotten) = counts.keys().next().cloned()
        {
            counts.remove(&forgotten);
        }
        let failures = counts.entry(object).or_default();
        *failures = failures.saturating_add(1);
        wait_after(*failures)
    }

    /// `object` was reconciled: its next failure is its first.
    pub fn succeeded(&self, object: &ObjectKey) {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.remove(object);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ("Session".into(), "shop".into(), name.into())
    }

    #[test]
    fn each_consecutive_failure_doubles_the_wait_up_to_a_minute() {
        let s = Duration::from_secs;
        let waits: Vec<Duration> = (1..=9).map(wait_after).collect();
        assert_eq!(
            waits,
            [s(5), s(10), s(20), s(40), s(60), s(60), s(60), s(60), s(60)]
        );
        assert_eq!(wait_after(u32::MAX), s(60));
    }

    #[test]
    fn a_success_starts_the_count_again_and_objects_are_counted_apart() {
        let retries = Retries::default();
        assert_eq!(retries.failed(key("a")), Duration::from_secs(5));
        assert_eq!(retries.failed(key("a")), Duration::from_secs(10));
        assert_eq!(retries.failed(key("b")), Duration::from_secs(5), "another object");
        retries.succeeded(&key("a"));
        assert_eq!(retries.failed(key("a")), Duration::from_secs(5));
    }
}
