//! How many tokens the API server may be asked to review for callers whose tokens it refuses.
//!
//! Every token the gateway has not seen costs a TokenReview (two for a person's), made with the
//! gateway's own identity. A caller sending made-up tokens in a loop would otherwise have the
//! gateway load the API server for it — and the API server's fairness would then hold back the
//! gateway's other requests (its access reviews, the Secrets it reads), for every tenant. So
//! the outcome of each review is remembered briefly (a refused token sent again is refused
//! without asking again), and each caller's address may have only so many tokens refused: past
//! its allowance, a token this replica has not accepted lately is refused without a review
//! until the allowance refills. A token accepted lately still passes. One allowance for all
//! addresses together bounds what many callers at once can cost.
//!
//! The address is the connection's peer. Behind a proxy every caller has the proxy's, and so
//! shares one allowance (runner pods reach the gateway directly, each from its own address).

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

/// How long an outcome is remembered (as long as the reviews themselves are cached).
const REMEMBERED: Duration = Duration::from_secs(30);
/// Outcomes remembered at most (then the expired go; if none has, the refusals go: they are
/// only a saving).
const MAX_REMEMBERED: usize = 8192;
/// Refusals one address may cause at once, and how fast its allowance refills.
const PER_SOURCE: Allowance = Allowance::full(20.0, 1.0);
/// Refusals all addresses together may cause at once, and how fast that refills.
const EVERYONE: Allowance = Allowance::full(200.0, 20.0);
/// Addresses tracked at most; past that, addresses new to the gateway share one allowance.
const MAX_SOURCES: usize = 4096;

tokio::task_local! {
    /// The address of the connection the current request came on, where the server knows it.
    static SOURCE: IpAddr;
}

/// Runs `work` (a request's handling) as coming from `source`.
pub async fn from<F: Future>(source: Option<IpAddr>, work: F) -> F::Output {
    match source {
        Some(source) => SOURCE.scope(source, work).await,
        None => work.await,
    }
}

/// What the API server answered for a token, as far as the allowance cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Refused, and why (said again to whoever sends the token again).
    Refused(String),
}

/// Whether a token may be reviewed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Accepted lately, or new and within the allowance: review it (the reviewer's own cache
    /// answers for one accepted lately).
    Review,
    /// Refused lately: the same answer, without asking again.
    Refused(String),
    /// New, and its address (or everyone) has had too many tokens refused lately.
    Throttled { retry_after: Duration },
}

/// The outcomes remembered and the allowances left, shared by the gateway's requests.
#[derive(Debug)]
pub struct RefusedTokens {
    outcomes: Mutex<HashMap<[u8; 32], (Outcome, Instant)>>,
    sources: Mutex<HashMap<Option<IpAddr>, Allowance>>,
    everyone: Mutex<Allowance>,
}

impl Default for RefusedTokens {
    fn default() -> Self {
        Self {
            outcomes: Mutex::default(),
            sources: Mutex::default(),
            everyone: Mutex::new(EVERYONE),
        }
    }
}

impl RefusedTokens {
    /// The key a token is remembered by: its digest, for one kind of review (`audience`).
    pub fn key(audience: &str, token: &str) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(audience.as_bytes());
        hash.update([0]);
        hash.update(token.as_bytes());
        hash.finalize().into()
    }

    /// Whether the token `key` may be reviewed now for the current request's address.
    pub fn admit(&self, key: &[u8; 32]) -> Admission {
        self.admit_at(current_source(), key, Instant::now())
    }

    /// Remembers what the review of `key` answered; a refusal spends the allowances.
    pub fn record(&self, key: [u8; 32], outcome: Outcome) {
        self.record_at(current_source(), key, outcome, Instant::now());
    }

    fn admit_at(&self, source: Option<IpAddr>, key: &[u8; 32], now: Instant) -> Admission {
        let remembered = self.outcomes.lock().ok().and_then(|outcomes| {
            outcomes
                .get(key)
                .filter(|(_, at)| now.duration_since(*at) < REMEMBERED)
                .map(|(outcome, _)| outcome.clone())
        });
        match remembered {
            Some(Outcome::Accepted) => return Admission::Review,
            Some(Outcome::Refused(why)) => return Admission::Refused(why),
            None => {}
        }
        let waits = [
            self.sources
                .lock()
                .ok()
                .and_then(|mut sources| source_allowance(&mut sources, source, now).wait(now)),
            self.everyone.lock().ok().and_then(|mut all| all.wait(now)),
        ];
        match waits.into_iter().flatten().max() {
            Some(retry_after) => Admission::Throttled { retry_after },
            None => Admission::Review,
        }
    }

    fn record_at(&self, source: Option<IpAddr>, key: [u8; 32], outcome: Outcome, now: Instant) {
        if matches!(outcome, Outcome::Refused(_)) {
            if let Ok(mut sources) = self.sources.lock() {
                source_allowance(&mut sources, source, now).spend(now);
            }
            if let Ok(mut all) = self.everyone.lock() {
                all.spend(now);
            }
        }
        if let Ok(mut outcomes) = self.outcomes.lock() {
            if outcomes.len() >= MAX_REMEMBERED {
                outcomes.retain(|_, (_, at)| now.duration_since(*at) < REMEMBERED);
                if outcomes.len() >= MAX_REMEMBERED {
                    outcomes.retain(|_, (o, _)| *o == Outcome::Accepted);
                }
            }
            outcomes.insert(key, (outcome, now));
        }
    }
}

fn current_source() -> Option<IpAddr> {
    SOURCE.try_with(|source| *source).ok()
}

/// `source`'s allowance; a new address past [`MAX_SOURCES`] shares the unknown address's.
fn source_allowance(
    sources: &mut HashMap<Option<IpAddr>, Allowance>,
    source: Option<IpAddr>,
    now: Instant,
) -> &mut Allowance {
    let source = if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
        // Addresses whose allowance has refilled are no different from new ones.
        sources.retain(|_, allowance| !allowance.is_full(now));
        if sources.len() >= MAX_SOURCES {
            None
        } else {
            source
        }
    } else {
        source
    };
    sources.entry(source).or_insert(PER_SOURCE)
}

/// A token bucket: refusals that may still be caused, refilled at a steady rate.
#[derive(Clone, Copy, Debug)]
struct Allowance {
    left: f64,
    burst: f64,
    per_second: f64,
    at: Option<Instant>,
}

impl Allowance {
    const fn full(burst: f64, per_second: f64) -> Self {
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

    /// How long until one more refusal is allowed (`None`: it is now).
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.left < 1.0).then(|| Duration::from_secs_f64((1.0 - self.left) / self.per_second))
    }

    fn spend(&mut self, now: Instant) {
        self.refill(now);
        self.left = (self.left - 1.0).max(0.0);
    }

    fn is_full(&self, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(now);
        copy.left >= copy.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    fn token(n: usize) -> [u8; 32] {
        RefusedTokens::key("contextos-gateway", &format!("made-up-{n}"))
    }

    #[test]
    fn an_address_that_keeps_sending_refused_tokens_is_throttled_and_refills() {
        let tokens = RefusedTokens::default();
        let start = Instant::now();
        let burst = PER_SOURCE.burst as usize;
        for n in 0..burst {
            assert_eq!(
                tokens.admit_at(address(1), &token(n), start),
                Admission::Review,
                "{n}"
            );
            tokens.record_at(address(1), token(n), Outcome::Refused("no".into()), start);
        }
        let Admission::Throttled { retry_after } = tokens.admit_at(address(1), &token(burst), start) else {
            panic!(
                "the {}th refused token from one address is still reviewed",
                burst + 1
            );
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        // Another address is not held back by this one.
        assert_eq!(
            tokens.admit_at(address(2), &token(burst), start),
            Admission::Review
        );
        // A second later the address has one more.
        let later = start + Duration::from_secs(1);
        assert_eq!(
            tokens.admit_at(address(1), &token(burst), later),
            Admission::Review
        );
    }

    #[test]
    fn a_refused_token_is_answered_from_memory_and_an_accepted_one_still_passes() {
        let tokens = RefusedTokens::default();
        let now = Instant::now();
        let good = RefusedTokens::key("contextos-gateway", "good");
        tokens.record_at(address(1), good, Outcome::Accepted, now);
        tokens.record_at(address(1), token(0), Outcome::Refused("expired".into()), now);
        assert_eq!(
            tokens.admit_at(address(1), &token(0), now),
            Admission::Refused("expired".into())
        );
        for n in 1..=PER_SOURCE.burst as usize {
            tokens.record_at(address(1), token(n), Outcome::Refused("no".into()), now);
        }
        assert!(matches!(
            tokens.admit_at(address(1), &token(999), now),
            Admission::Throttled { .. }
        ));
        assert_eq!(tokens.admit_at(address(1), &good, now), Admission::Review);
        // Remembered only briefly: then the token is reviewed again.
        let later = now + REMEMBERED + Duration::from_secs(PER_SOURCE.burst as u64);
        assert_eq!(tokens.admit_at(address(1), &token(0), later), Admission::Review);
    }

    #[test]
    fn many_addresses_together_are_bounded_by_one_allowance() {
        let tokens = RefusedTokens::default();
        let now = Instant::now();
        let mut reviewed = 0;
        for n in 0..1_000 {
            let source = Some(IpAddr::from([10, 1, (n / 250) as u8, (n % 250) as u8]));
            if tokens.admit_at(source, &token(n), now) == Admission::Review {
                reviewed += 1;
                tokens.record_at(source, token(n), Outcome::Refused("no".into()), now);
            }
        }
        assert_eq!(reviewed, EVERYONE.burst as usize);
    }

    #[test]
    fn tokens_are_remembered_per_kind_of_review() {
        assert_ne!(
            RefusedTokens::key("contextos-gateway", "t"),
            RefusedTokens::key("contextos-a2a", "t")
        );
    }
}
