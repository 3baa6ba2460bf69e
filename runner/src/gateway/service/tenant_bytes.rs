//! The bound on what one tenant keeps in the record store every tenant shares: one namespace's
//! runs cannot fill the disk the others' records are on. Each run is bounded on its own
//! (`--max-run-bytes`), but records are kept, so a tenant starting run after run would grow
//! without end. A tenant's bound is the gateway's `--max-tenant-store-bytes`, or its
//! namespace's `contextos.dev/max-store-bytes` annotation, which only a cluster admin writes
//! (a namespace is cluster-scoped): a tenant cannot raise its own.
//!
//! What a tenant keeps is measured from the store — each run's count as its quota had it when
//! the gateway last wrote it (`RunSummary::bytes`), each blob a runner uploaded (its mark
//! holds the size), and its memory (items, consent and correction chains) — at most every
//! [`REMEASURE`] per replica; in between, this replica adds what it lets through. Memory is
//! written in runs (whose writes are checked first) and by the objects people apply. Replicas count apart, so a tenant may pass its bound by what the
//! others let through within one such interval.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

/// The namespace annotation that sets its tenant's bound (a size: `500Mi`, `20Gi`, bytes).
pub const STORE_BOUND_ANNOTATION: &str = "contextos.dev/max-store-bytes";
/// The gateway's bound when it is not given one (`--max-tenant-store-bytes`).
pub const DEFAULT_MAX_TENANT_STORE_BYTES: u64 = 16 << 30;
/// How long a measurement is used before the store is read again.
pub const REMEASURE: Duration = Duration::from_secs(30);
/// Tenants whose measurement a replica keeps; past that, the stalest is forgotten (and read
/// again when its tenant writes).
const MAX_TENANTS: usize = 65_536;

/// A tenant's bound, and where it comes from (the message a refused write gets names it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    /// No bound (`--max-tenant-store-bytes 0` and no annotation).
    Unbounded,
    /// The gateway's `--max-tenant-store-bytes`.
    Gateway(u64),
    /// The namespace's annotation.
    Namespace(u64),
    /// The namespace's annotation is not a size: nothing more is written until a cluster admin
    /// fixes it (a bound nobody can read is not silently replaced by another).
    Invalid(String),
}

impl Bound {
    /// The bound of a tenant whose namespace says `annotation` (if anything), where the
    /// gateway's own is `gateway` (0: none).
    pub fn of(annotation: Option<&str>, gateway: u64) -> Self {
        match annotation {
            Some(text) => match parse_size(text) {
                Ok(bytes) => Self::Namespace(bytes),
                Err(why) => Self::Invalid(format!("{STORE_BOUND_ANNOTATION}: {text:?} {why}")),
            },
            None if gateway == 0 => Self::Unbounded,
            None => Self::Gateway(gateway),
        }
    }
}

/// A write a tenant's bound does not leave room for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Over {
    /// What the tenant keeps, as far as this replica knows.
    pub kept: u64,
    pub incoming: u64,
    pub bound: Bound,
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (limit, from) = match &self.bound {
            Bound::Invalid(why) => {
                return write!(
                    f,
                    "the namespace's bound on what it keeps in the record store cannot be read ({why}); a cluster admin sets it to a size such as 20Gi, or removes it"
                );
            }
            Bound::Unbounded => return write!(f, "the tenant has no bound"),
            Bound::Gateway(limit) => (limit, "the gateway's --max-tenant-store-bytes"),
            Bound::Namespace(limit) => (limit, "the namespace's contextos.dev/max-store-bytes annotation"),
        };
        write!(
            f,
            "its runs keep {} bytes in the record store and this write adds {}; it may keep at most {limit} ({from}, which a cluster admin raises: records are never deleted)",
            self.kept, self.incoming
        )
    }
}

/// Whether `incoming` bytes fit beside `kept` under `bound` (pure).
pub fn room(kept: u64, incoming: u64, bound: &Bound) -> Result<(), Over> {
    let fits = match bound {
        Bound::Unbounded => true,
        Bound::Gateway(limit) | Bound::Namespace(limit) => kept.saturating_add(incoming) <= *limit,
        Bound::Invalid(_) => false,
    };
    if fits {
        Ok(())
    } else {
        Err(Over {
            kept,
            incoming,
            bound: bound.clone(),
        })
    }
}

/// A size as Kubernetes writes quantities of bytes: 1–18 digits, optionally followed by `Ki`,
/// `Mi`, `Gi`, `Ti`, `Pi` (powers of 1024) or `k`, `M`, `G`, `T`, `P` (powers of 1000); one
/// past what 64 bits hold is as good as unbounded, and taken as the most they hold (admission
/// policy contextos-store-bounds admits the same).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .ok()
        .filter(|_| digits.len() <= 18)
        .ok_or_else(|| {
            "is not a size: write 1 to 18 digits, alone or followed by Ki, Mi, Gi, Ti, Pi, k, M, G, T or P"
                .to_owned()
        })?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        other => {
            return Err(format!(
                "has unit {other:?}: use Ki, Mi, Gi, Ti, Pi, k, M, G, T or P"
            ));
        }
    };
    Ok(number.saturating_mul(factor))
}

/// What this replica knows of one tenant.
#[derive(Clone, Debug)]
struct Seen {
    /// Measured in the store.
    measured: u64,
    /// Let through here since.
    added: u64,
    bound: Bound,
    at: Instant,
    /// Since when a request has been measuring it again (the others use this measurement
    /// meanwhile: one scan at a time per tenant), and what had been let through then (what is
    /// let through after may not be in the store's figure: it is carried over).
    measuring: Option<(Instant, u64)>,
}

/// Whether a request measures its tenant before writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Never measured here (or forgotten): there is no figure to write against, so one
    /// request measures while the others wait for its figure (see [`TenantBytes::room`]).
    First,
    /// Measured within the interval: write against it.
    Fresh,
    /// This request measures (then [`TenantBytes::measured`], or [`TenantBytes::unclaim`] if
    /// it could not).
    Measure,
    /// Another request is measuring: write against the last measurement.
    Measuring,
}

/// Why a write was not let through.
#[derive(Debug)]
pub enum Refused<E> {
    /// The tenant's bound has no room for it.
    Over(Over),
    /// What the tenant keeps could not be measured.
    Unmeasured(E),
    /// The first measurement this request waited for failed (it is not tried again by every
    /// request that waited: while the store is away, each would wait for its own timeout).
    WaitedInVain,
    /// Forgotten since it was measured (many tenants): its next request measures.
    Forgotten,
}

/// Every tenant's measurement at this replica.
#[derive(Debug)]
pub struct TenantBytes {
    /// The gateway's bound (0: none).
    gateway: u64,
    remeasure: Duration,
    seen: Mutex<HashMap<String, Seen>>,
    /// Tenants being measured for the first time here, each with the lock its measuring
    /// request holds (a gateway just started would otherwise read a busy tenant's whole
    /// share of the store once per request waiting for a figure), holding when the last
    /// attempt failed. An entry goes when its tenant is measured; one that could not be
    /// refuses the requests that waited for it and is tried again by the next request.
    first: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Instant>>>>>,
}

impl TenantBytes {
    pub fn new(gateway: u64) -> Self {
        Self {
            gateway,
            remeasure: REMEASURE,
            seen: Mutex::default(),
            first: Mutex::default(),
        }
    }

    /// The measurements, whether or not a thread panicked holding them (each update leaves
    /// them whole).
    fn seen(&self) -> MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Measures again after `every` instead of [`REMEASURE`] (tests).
    pub fn remeasured_every(mut self, every: Duration) -> Self {
        self.remeasure = every;
        self
    }

    /// The gateway's bound (0: none).
    pub fn gateway_bound(&self) -> u64 {
        self.gateway
    }

    /// Lets `incoming` bytes of `tenant` through if its bound has room for them, measuring
    /// what it keeps first (`measure`: its size in the store and its bound) when this replica
    /// has no figure for it or the figure is stale. A tenant never measured here is measured
    /// by one request while the others wait for its figure; a stale one by one request while
    /// the others write against the last figure.
    pub async fn room<E, M, F>(&self, tenant: &str, incoming: u64, measure: M) -> Result<(), Refused<E>>
    where
        M: FnOnce() -> F,
        F: Future<Output = Result<(u64, Bound), E>>,
    {
        let mut due = self.due(tenant);
        let mut first = None;
        if due == Due::First {
            let gate = Arc::clone(
                self.first
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(tenant.to_owned())
                    .or_default(),
            );
            let asked = Instant::now();
            // Out of the request's turn: the request measuring needs one to read the store.
            let held = crate::gateway::fair::away(gate.lock_owned()).await;
            if held.is_some_and(|failed| failed >= asked) {
                return Err(Refused::WaitedInVain);
            }
            first = Some(held);
            due = self.due(tenant);
        }
        if matches!(due, Due::First | Due::Measure) {
            match measure().await {
                Ok((kept, bound)) => self.measured(tenant, kept, bound),
                Err(e) => {
                    self.unclaim(tenant);
                    if let Some(held) = first.as_mut() {
                        **held = Some(Instant::now());
                    }
                    return Err(Refused::Unmeasured(e));
                }
            }
        }
        drop(first);
        self.take(tenant, incoming).map_err(|over| match over {
            Some(over) => Refused::Over(over),
            None => Refused::Forgotten,
        })
    }

    /// Whether a request writing for `tenant` measures it first: a stale figure is measured
    /// again by one request at a time — a claim older than two intervals (its request was
    /// dropped) is taken over.
    pub fn due(&self, tenant: &str) -> Due {
        let mut seen = self.seen();
        let Some(known) = seen.get_mut(tenant) else {
            return Due::First;
        };
        if known.at.elapsed() < self.remeasure {
            return Due::Fresh;
        }
        match known.measuring {
            Some((since, _)) if since.elapsed() < 2 * self.remeasure.max(Duration::from_secs(1)) => {
                Due::Measuring
            }
            _ => {
                known.measuring = Some((Instant::now(), known.added));
                Due::Measure
            }
        }
    }

    /// Gives up a claim to measure `tenant` (the store or the API server could not be read).
    pub fn unclaim(&self, tenant: &str) {
        if let Some(known) = self.seen().get_mut(tenant) {
            known.measuring = None;
        }
    }

    /// The bound last read for `tenant`, if any (kept when its namespace cannot be read).
    pub fn last_bound(&self, tenant: &str) -> Option<Bound> {
        self.seen().get(tenant).map(|s| s.bound.clone())
    }

    /// Keeps what was just measured of `tenant`: what this replica let through before the
    /// measurement began is in it (or being written), what it let through since is carried
    /// over.
    pub fn measured(&self, tenant: &str, bytes: u64, bound: Bound) {
        let mut seen = self.seen();
        let since = seen
            .get(tenant)
            .and_then(|known| known.measuring.map(|(_, then)| known.added.saturating_sub(then)))
            .unwrap_or(0);
        if !seen.contains_key(tenant) && seen.len() >= MAX_TENANTS {
            let stalest = seen.iter().min_by_key(|(_, s)| s.at).map(|(t, _)| t.clone());
            if let Some(stalest) = stalest {
                seen.remove(&stalest);
            }
        }
        seen.insert(
            tenant.to_owned(),
            Seen {
                measured: bytes,
                added: since,
                bound,
                at: Instant::now(),
                measuring: None,
            },
        );
        drop(seen);
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(tenant);
    }

    /// Lets `incoming` bytes of `tenant` through if its bound has room for them (and counts
    /// them). `Err(None)`: the tenant is not measured here (forgotten since: ask again).
    pub fn take(&self, tenant: &str, incoming: u64) -> Result<(), Option<Over>> {
        let mut seen = self.seen();
        let known = seen.get_mut(tenant).ok_or(None)?;
        room(known.measured.saturating_add(known.added), incoming, &known.bound).map_err(Some)?;
        known.added = known.added.saturating_add(incoming);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_as_kubernetes_writes_them() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("500Mi"), Ok(500 << 20));
        assert_eq!(parse_size(" 20Gi "), Ok(20 << 30));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("3k"), Ok(3_000));
        assert_eq!(
            parse_size("99999999999Pi"),
            Ok(u64::MAX),
            "past 64 bits: the most they hold"
        );
        for wrong in [
            "",
            "Gi",
            "20 Gi",
            "20GB",
            "1.5Gi",
            "-1",
            "20gi",
            "1234567890123456789",
        ] {
            assert!(parse_size(wrong).is_err(), "{wrong:?} was read as a size");
        }
    }

    #[test]
    fn a_namespace_annotation_wins_over_the_gateway_and_one_nobody_can_read_admits_nothing() {
        assert_eq!(Bound::of(None, 0), Bound::Unbounded);
        assert_eq!(Bound::of(None, 100), Bound::Gateway(100));
        assert_eq!(Bound::of(Some("1Ki"), 100), Bound::Namespace(1024));
        let invalid = Bound::of(Some("lots"), 100);
        assert!(
            matches!(&invalid, Bound::Invalid(why) if why.contains("lots")),
            "{invalid:?}"
        );
        assert!(room(0, 1, &invalid).is_err());
        assert!(room(u64::MAX, 1, &Bound::Unbounded).is_ok());
        assert!(room(90, 10, &Bound::Gateway(100)).is_ok());
        let over = room(90, 11, &Bound::Namespace(100)).expect_err("over");
        assert!(
            over.to_string().contains("contextos.dev/max-store-bytes"),
            "{over}"
        );
        assert!(over.to_string().contains("keep 90 bytes"), "{over}");
    }

    #[test]
    fn what_a_replica_lets_through_counts_until_the_store_is_measured_again() {
        let bytes = TenantBytes::new(100);
        assert_eq!(bytes.due("shop"), Due::First);
        assert_eq!(
            bytes.take("shop", 1),
            Err(None),
            "a tenant not measured: ask again"
        );
        bytes.measured("shop", 60, Bound::Gateway(100));
        assert_eq!(bytes.due("shop"), Due::Fresh);
        bytes.take("shop", 30).expect("room for 30");
        let over = bytes
            .take("shop", 20)
            .expect_err("60 + 30 + 20 > 100")
            .expect("measured");
        assert_eq!(over.kept, 90);
        // Another tenant's writes are its own.
        bytes.measured("bank", 0, Bound::Gateway(100));
        bytes.take("bank", 100).expect("bank's own room");
        // Measured again (what was let through is now in the store).
        bytes.measured("shop", 90, Bound::Gateway(100));
        bytes.take("shop", 10).expect("room for 10");
        assert!(bytes.take("shop", 1).is_err());
        let stale = TenantBytes::new(100).remeasured_every(Duration::ZERO);
        stale.measured("shop", 0, Bound::Gateway(100));
        // One request measures again; the others write against the last figure meanwhile.
        assert_eq!(stale.due("shop"), Due::Measure);
        assert_eq!(stale.due("shop"), Due::Measuring);
        stale.take("shop", 100).expect("the last figure");
        // A measurement that failed lets the next request try.
        stale.unclaim("shop");
        assert_eq!(stale.due("shop"), Due::Measure);
        stale.measured("shop", 50, Bound::Gateway(100));
        assert_eq!(stale.due("shop"), Due::Measure, "measured again at once");
        // What is let through while the store is read may be missing from its figure: carried
        // over; what was let through before is in it.
        let carried = TenantBytes::new(100).remeasured_every(Duration::ZERO);
        carried.measured("shop", 10, Bound::Gateway(100));
        carried.take("shop", 20).expect("before the measurement");
        assert_eq!(carried.due("shop"), Due::Measure);
        carried.take("shop", 30).expect("while it is measured");
        carried.measured("shop", 30, Bound::Gateway(100));
        carried
            .take("shop", 40)
            .expect("30 measured, 30 carried, 40 more");
        assert!(carried.take("shop", 1).is_err());
    }

    /// Eight requests of a tenant a replica has no figure for, each measuring it as `fails`
    /// says (by turn): how many times it was measured, and how many requests were let through.
    async fn first_requests(fails: &[bool]) -> (usize, usize) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let bytes = TenantBytes::new(100);
        let measures = AtomicUsize::new(0);
        let requests = (0..8).map(|_| {
            bytes.room("shop", 10, || async {
                let turn = measures.fetch_add(1, Ordering::SeqCst);
                // The store takes a while: every other request arrives meanwhile.
                for _ in 0..16 {
                    tokio::task::yield_now().await;
                }
                if fails.get(turn).copied().unwrap_or(false) {
                    Err("the store is away")
                } else {
                    Ok((0, Bound::Gateway(100)))
                }
            })
        });
        let done = futures::future::join_all(requests).await;
        (
            measures.load(Ordering::SeqCst),
            done.iter().filter(|r| r.is_ok()).count(),
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_tenant_new_to_a_replica_is_measured_once_while_its_requests_wait() {
        assert_eq!(first_requests(&[]).await, (1, 8));
        // A measurement that fails refuses its own request and those that waited for it: with
        // the store away, each would otherwise wait for a timeout of its own, one after another.
        assert_eq!(first_requests(&[true]).await, (1, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_after_a_failed_first_measurement_measures_again() {
        let bytes = TenantBytes::new(100);
        let failed = bytes
            .room("shop", 10, || async {
                Err::<(u64, Bound), _>("the store is away")
            })
            .await;
        assert!(matches!(failed, Err(Refused::Unmeasured(_))));
        let measured = bytes
            .room("shop", 10, || async { Ok::<_, &str>((0, Bound::Gateway(100))) })
            .await;
        assert!(measured.is_ok(), "{measured:?}");
    }
}
