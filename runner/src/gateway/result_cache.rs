//! Results of read-only tools kept for reuse (a tool's `cache.ttlSeconds`): a call made again
//! while its result is fresh is answered from here, and the tool is not reached.
//!
//! A result is reused only for the very same question: the key is the promoted revisions the
//! call was governed by and the credentials it was sent with (the gateway's scope), the
//! tenant, the user the run acts for, the tool and its canonical arguments. So a newly
//! promoted revision or a rotated secret never sees a result fetched under an older one, and
//! one user's answer never reaches another's run. Runs about a person (a Session's `subject`)
//! are never cached: what the record keeps of them is encrypted and erasable, this is not.
//!
//! A result is stale as soon as anything may have changed what it read: every call of the
//! tenant's agent that is not read-only, sent from this process, moves the agent's generation
//! on, and only results of the current generation are reused. Writes made elsewhere (another
//! agent, another replica, the world) are bounded by the TTL alone.
//!
//! The cache only saves a trip: it is bounded per tenant and as a whole (see
//! [`super::shelves`]: a busy tenant evicts its own once it keeps the most), and a miss is
//! always safe.

use std::{collections::HashMap, sync::Mutex};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::shelves::{Bounds, Shelves};
use crate::records::{canonical::to_canonical_bytes, entry::CachedRead};

/// Results one tenant keeps at most.
const TENANT_ENTRIES: usize = 1024;
/// Bytes of results (canonical JSON) one tenant keeps at most.
const TENANT_BYTES: usize = 8 * 1024 * 1024;
/// Bytes of results kept at most in all; past it the least recently used results of the tenant
/// keeping the most go first (one busy tenant never empties the others' shelves).
const MAX_BYTES: usize = 64 * 1024 * 1024;
const BOUNDS: Bounds = Bounds {
    tenant_entries: TENANT_ENTRIES,
    tenant_weight: TENANT_BYTES,
    total_weight: MAX_BYTES,
};
/// A result larger than this is never kept: it would push out many small ones.
const MAX_ENTRY_BYTES: usize = 256 * 1024;

/// Identifies one question to one tool under one set of promoted revisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

/// Who a cached answer is for, apart from the tool and its arguments.
#[derive(Clone, Copy, Debug)]
pub struct CacheScope<'a> {
    /// Digest of the promoted revisions and credentials the gateway governs by.
    pub revisions: &'a str,
    pub tenant: &'a str,
    /// The user the run acts for, if it acts for one.
    pub user: Option<&'a str>,
}

impl CacheKey {
    pub fn of(scope: CacheScope<'_>, tool: &str, arguments: &Value) -> Self {
        let mut hasher = Sha256::new();
        for part in [scope.revisions, scope.tenant, scope.user.unwrap_or(""), tool] {
            // Length-prefixed, so no two different scopes hash the same bytes.
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        hasher.update([u8::from(scope.user.is_some())]);
        hasher.update(to_canonical_bytes(arguments));
        Self(hasher.finalize().into())
    }
}

/// Whose writes make results stale: a tenant's agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Writer {
    pub tenant: String,
    pub agent: String,
}

/// A result taken from the cache.
#[derive(Clone, Debug, PartialEq)]
pub struct Reused {
    pub output: Value,
    pub truncated: bool,
    pub origin: CachedRead,
}

#[derive(Debug)]
struct Kept {
    reused: Reused,
    /// The writer's generation when the call that fetched it was sent.
    generation: u64,
}

#[derive(Debug)]
struct Inner {
    /// Results by tenant, weighed in bytes of canonical JSON.
    shelves: Shelves<CacheKey, Kept>,
    generations: HashMap<Writer, u64>,
}

/// The cache of one gateway process, shared by the runs it serves.
#[derive(Debug)]
pub struct ResultCache {
    inner: Mutex<Inner>,
}

impl Default for ResultCache {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                shelves: Shelves::new(BOUNDS),
                generations: HashMap::new(),
            }),
        }
    }
}

/// Whether a result fetched at `fetched_at_ms` may still be reused at `now_ms`. A clock that
/// went backwards makes every result stale rather than fresh for longer.
pub fn is_fresh(fetched_at_ms: i64, ttl_seconds: u32, now_ms: i64) -> bool {
    let age = now_ms - fetched_at_ms;
    (0..i64::from(ttl_seconds) * 1000).contains(&age)
}

impl ResultCache {
    /// The result kept for `key` of `writer`'s tenant, if it is younger than `ttl_seconds` and
    /// nothing was written by `writer` since it was fetched.
    pub fn fresh(&self, writer: &Writer, key: &CacheKey, ttl_seconds: u32, now_ms: i64) -> Option<Reused> {
        let mut inner = self.inner.lock().ok()?;
        let generation = inner.generations.get(writer).copied().unwrap_or(0);
        let kept = inner.shelves.get(&writer.tenant, key)?;
        if kept.generation == generation && is_fresh(kept.reused.origin.fetched_at_ms, ttl_seconds, now_ms) {
            return Some(kept.reused.clone());
        }
        inner.shelves.remove(&writer.tenant, key);
        None
    }

    /// `writer`'s generation now: a result fetched by a call sent now is kept under it.
    pub fn generation(&self, writer: &Writer) -> u64 {
        self.inner
            .lock()
            .map_or(0, |i| i.generations.get(writer).copied().unwrap_or(0))
    }

    /// `writer` sent a call that may change what its tools read: every result kept for it so
    /// far is stale.
    pub fn wrote(&self, writer: &Writer) {
        if let Ok(mut inner) = self.inner.lock() {
            *inner.generations.entry(writer.clone()).or_default() += 1;
        }
    }

    /// Keeps a result the tool gave to a call sent at `generation`, replacing any older one
    /// for the same key. A result fetched while `writer` wrote is not kept.
    pub fn keep(&self, writer: &Writer, key: CacheKey, generation: u64, reused: Reused) {
        let bytes = to_canonical_bytes(&reused.output).len();
        if bytes > MAX_ENTRY_BYTES {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.generations.get(writer).copied().unwrap_or(0) != generation {
            return;
        }
        inner
            .shelves
            .insert(&writer.tenant, key, Kept { reused, generation }, bytes);
    }

    /// Results `tenant` keeps now.
    pub fn len(&self, tenant: &str) -> usize {
        self.inner.lock().map_or(0, |i| i.shelves.len(tenant))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn scope<'a>(revisions: &'a str, user: Option<&'a str>) -> CacheScope<'a> {
        CacheScope {
            revisions,
            tenant: "team-a",
            user,
        }
    }

    fn writer(tenant: &str) -> Writer {
        Writer {
            tenant: tenant.into(),
            agent: "oncall".into(),
        }
    }

    fn reused(output: Value, at: i64) -> Reused {
        Reused {
            output,
            truncated: false,
            origin: CachedRead {
                run_id: "run-1".into(),
                call_id: "1.0".into(),
                fetched_at_ms: at,
            },
        }
    }

    #[test]
    fn a_result_is_reused_only_while_fresh() {
        let (cache, team) = (ResultCache::default(), writer("team-a"));
        let key = CacheKey::of(scope("r1", None), "status", &json!({"service": "checkout"}));
        cache.keep(&team, key, 0, reused(json!({"up": true}), 1_000));
        assert!(cache.fresh(&team, &key, 60, 1_000).is_some());
        assert!(cache.fresh(&team, &key, 60, 60_999).is_some());
        assert_eq!(cache.fresh(&team, &key, 60, 61_000), None, "the TTL has passed");
        assert_eq!(cache.len("team-a"), 0, "a stale result is forgotten");
    }

    #[test]
    fn a_write_makes_every_result_of_the_agent_stale_even_one_in_flight() {
        let (cache, team) = (ResultCache::default(), writer("team-a"));
        let other = Writer {
            agent: "billing".into(),
            ..writer("team-a")
        };
        let key = CacheKey::of(scope("r1", None), "ticket", &json!({"id": 7}));
        let sent_at = cache.generation(&team);
        cache.keep(&team, key, sent_at, reused(json!({"state": "open"}), 0));
        cache.wrote(&other);
        assert!(cache.fresh(&team, &key, 60, 0).is_some(), "another agent's write");
        let in_flight = cache.generation(&team);
        cache.wrote(&team);
        assert_eq!(cache.fresh(&team, &key, 60, 0), None, "read before the write");
        cache.keep(&team, key, in_flight, reused(json!({"state": "open"}), 0));
        assert_eq!(
            cache.fresh(&team, &key, 60, 0),
            None,
            "fetched while the write was made"
        );
        cache.keep(
            &team,
            key,
            cache.generation(&team),
            reused(json!({"state": "closed"}), 0),
        );
        assert!(cache.fresh(&team, &key, 60, 0).is_some());
    }

    #[test]
    fn a_clock_that_went_back_makes_a_result_stale() {
        assert!(!is_fresh(10_000, 60, 9_999));
        assert!(is_fresh(10_000, 60, 10_000));
    }

    #[test]
    fn another_revision_user_or_argument_is_another_question() {
        let args = json!({"service": "checkout", "window": 5});
        let same_order = json!({"window": 5, "service": "checkout"});
        let base = CacheKey::of(scope("r1", None), "status", &args);
        assert_eq!(base, CacheKey::of(scope("r1", None), "status", &same_order));
        for other in [
            CacheKey::of(scope("r2", None), "status", &args),
            CacheKey::of(scope("r1", Some("alice")), "status", &args),
            CacheKey::of(scope("r1", Some("")), "status", &args),
            CacheKey::of(scope("r1", None), "health", &args),
            CacheKey::of(
                scope("r1", None),
                "status",
                &json!({"service": "checkout", "window": 6}),
            ),
        ] {
            assert_ne!(base, other);
        }
        // Parts cannot be shifted into one another.
        let shifted = CacheScope {
            revisions: "r1team-a",
            tenant: "",
            user: None,
        };
        assert_ne!(base, CacheKey::of(shifted, "status", &args));
    }

    #[test]
    fn a_tenant_is_bounded_on_its_own_and_forgets_its_oldest() {
        let cache = ResultCache::default();
        let (team, other) = (writer("team-a"), writer("team-b"));
        let theirs = CacheKey::of(scope("r1", None), "status", &json!("theirs"));
        cache.keep(&other, theirs, 0, reused(json!("x"), 0));
        let first = CacheKey::of(scope("r1", None), "status", &json!(0));
        cache.keep(&team, first, 0, reused(json!("x"), 0));
        for i in 1..=TENANT_ENTRIES {
            let key = CacheKey::of(scope("r1", None), "status", &json!(i));
            cache.keep(&team, key, 0, reused(json!("x"), 0));
        }
        assert_eq!(cache.len("team-a"), TENANT_ENTRIES);
        assert_eq!(cache.fresh(&team, &first, 60, 0), None);
        assert!(
            cache.fresh(&other, &theirs, 60, 0).is_some(),
            "a busy tenant evicts its own (it keeps the most)"
        );
        assert_eq!(
            cache.fresh(&team, &theirs, 60, 0),
            None,
            "and never reads another's"
        );
        let huge = json!("y".repeat(MAX_ENTRY_BYTES + 1));
        let key = CacheKey::of(scope("r1", None), "big", &json!({}));
        cache.keep(&team, key, 0, reused(huge, 0));
        assert_eq!(
            cache.fresh(&team, &key, 60, 0),
            None,
            "an oversized result is not kept"
        );
    }

    /// Past the bound of the whole cache, the tenant keeping the most gives up its oldest
    /// results; the others keep theirs.
    #[test]
    fn a_full_cache_forgets_the_largest_tenants_oldest_not_everyones() {
        let cache = ResultCache::default();
        let quiet = writer("team-quiet");
        let kept = CacheKey::of(scope("r1", None), "status", &json!("quiet"));
        cache.keep(&quiet, kept, 0, reused(json!("x"), 0));
        // Many tenants fill the cache to its bound with results of 200 KiB.
        let result = json!("y".repeat(200 * 1024));
        let busy: Vec<Writer> = (0..12).map(|i| writer(&format!("team-{i}"))).collect();
        for (t, team) in busy.iter().enumerate() {
            for i in 0..(TENANT_BYTES / (200 * 1024)) {
                let key = CacheKey::of(scope("r1", None), "status", &json!([t, i]));
                cache.keep(team, key, 0, reused(result.clone(), 0));
            }
        }
        let total: usize = cache.inner.lock().expect("lock").shelves.weight();
        assert!(total <= MAX_BYTES, "{total}");
        assert!(
            cache.fresh(&quiet, &kept, 60, 0).is_some(),
            "a tenant keeping little keeps it"
        );
        let last = CacheKey::of(
            scope("r1", None),
            "status",
            &json!([11, TENANT_BYTES / (200 * 1024) - 1]),
        );
        assert!(
            cache.fresh(&busy[11], &last, 60, 0).is_some(),
            "the newest are kept"
        );
    }

    #[test]
    fn keeping_a_key_again_replaces_it() {
        let (cache, team) = (ResultCache::default(), writer("team-a"));
        let key = CacheKey::of(scope("r1", None), "status", &json!({}));
        cache.keep(&team, key, 0, reused(json!(1), 0));
        cache.keep(&team, key, 0, reused(json!(2), 5));
        let found = cache.fresh(&team, &key, 60, 10).map(|r| r.output);
        assert_eq!(found, Some(json!(2)));
        assert_eq!(cache.len("team-a"), 1);
    }
}
