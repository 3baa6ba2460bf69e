//! How many tokens the API server may be asked to review for callers whose tokens it refuses.
//!
//! Every token the gateway has not seen costs a TokenReview (two for a person's), made with the
//! gateway's own identity. A caller sending made-up tokens in a loop would otherwise have the
//! gateway load the API server for it — and the API server's fairness would then hold back the
//! gateway's other requests (its access reviews, the Secrets it reads), for every tenant. So:
//!
//! - the outcome of each review is remembered briefly: a refused token sent again is refused
//!   without asking again;
//! - each caller's address has an allowance of reviews in the making and refused: a review
//!   takes one before it is asked (so a burst of requests at once cannot all pass), and gives it
//!   back if the token is accepted. Past its allowance, a token this replica has not accepted
//!   lately is refused without a review until the allowance refills; one accepted lately still
//!   passes;
//! - addresses that had a token refused lately also share one allowance, which bounds what many
//!   of them together cost. An address with no refusal lately is not held to it, so callers
//!   refusing tokens cannot shut out new runner pods or people elsewhere.
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

use super::allowance::{Allowance, Allowances, Taken as TakenFrom, Went};

/// How long an outcome is remembered (as long as the reviews themselves are cached), and how
/// long an address counts as one that had a token refused.
const REMEMBERED: Duration = Duration::from_secs(30);
/// Outcomes remembered at most (then the expired go; if none has, the refusals go: they are
/// only a saving).
const MAX_REMEMBERED: usize = 8192;
/// Reviews one address may have in the making or refused at once, and how fast its allowance
/// refills.
const PER_SOURCE: Allowance = Allowance::full(20.0, 1.0);
/// The same for all addresses that had a token refused lately, together.
const REFUSING: Allowance = Allowance::full(200.0, 20.0);
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

/// What the API server answered for a token, as far as the allowances care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted: what the review took is given back.
    Accepted,
    /// Refused, and why (said again to whoever sends the token again).
    Refused(String),
    /// No answer (the API server unreachable or overloaded): what the review took is kept,
    /// since asking cost the API server all the same, and nothing is remembered.
    Unanswered,
}

/// What a review took from the allowances (`None`: nothing, the token was accepted lately),
/// given back if its token is accepted.
pub type Taken = Option<TakenFrom<IpAddr>>;

/// Whether a token may be reviewed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Accepted lately (nothing taken: the reviewer's own cache answers), or new and within the
    /// allowances: review it, then [`RefusedTokens::record`] the outcome with what was taken.
    Review(Taken),
    /// Refused lately: the same answer, without asking again.
    Refused(String),
    /// New, and its address (or the refusing addresses together) has had too many tokens
    /// refused or in review lately.
    Throttled { retry_after: Duration },
}

/// The outcomes remembered and the allowances left, shared by the gateway's requests.
#[derive(Debug)]
pub struct RefusedTokens {
    outcomes: Mutex<HashMap<[u8; 32], (Outcome, Instant)>>,
    /// Each address's allowance, and the refusing addresses' shared one.
    sources: Allowances<IpAddr>,
}

impl Default for RefusedTokens {
    fn default() -> Self {
        Self {
            outcomes: Mutex::default(),
            sources: Allowances::new(PER_SOURCE, REFUSING, REMEMBERED, MAX_SOURCES),
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

    /// Remembers what the review of `key` answered, giving back what it took if it was accepted.
    pub fn record(&self, key: [u8; 32], outcome: Outcome, taken: Taken) {
        self.record_at(key, outcome, taken, Instant::now());
    }

    fn admit_at(&self, source: Option<IpAddr>, key: &[u8; 32], now: Instant) -> Admission {
        let remembered = self.outcomes.lock().ok().and_then(|outcomes| {
            outcomes
                .get(key)
                .filter(|(_, at)| now.duration_since(*at) < REMEMBERED)
                .map(|(outcome, _)| outcome.clone())
        });
        match remembered {
            Some(Outcome::Accepted) => Admission::Review(None),
            Some(Outcome::Refused(why)) => Admission::Refused(why),
            Some(Outcome::Unanswered) | None => match self.sources.take(source, now) {
                Ok(taken) => Admission::Review(Some(taken)),
                Err(retry_after) => Admission::Throttled { retry_after },
            },
        }
    }

    fn record_at(&self, key: [u8; 32], outcome: Outcome, taken: Taken, now: Instant) {
        let went = match outcome {
            Outcome::Accepted => Went::Well,
            Outcome::Refused(_) => Went::Badly,
            Outcome::Unanswered => Went::Unanswered,
        };
        if let Some(taken) = &taken {
            self.sources.after(taken, went, now);
        }
        if went == Went::Unanswered {
            return;
        }
        if let Ok(mut outcomes) = self.outcomes.lock() {
            if outcomes.len() >= MAX_REMEMBERED {
                outcomes.retain(|_, (_, at)| now.duration_since(*at) < REMEMBERED);
                if outcomes.len() >= MAX_REMEMBERED {
                    outcomes.retain(|_, (o, _)| *o == Outcome::Accepted);
                }
                if outcomes.len() >= MAX_REMEMBERED {
                    outcomes.clear();
                }
            }
            outcomes.insert(key, (outcome, now));
        }
    }
}

fn current_source() -> Option<IpAddr> {
    SOURCE.try_with(|source| *source).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(a: u8, b: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, a, b]))
    }

    fn token(n: usize) -> [u8; 32] {
        RefusedTokens::key("contextos-gateway", &format!("made-up-{n}"))
    }

    fn refused() -> Outcome {
        Outcome::Refused("no".into())
    }

    /// Asks for `n` new tokens from `source` at once (none answered yet); those admitted.
    fn at_once(
        tokens: &RefusedTokens,
        source: Option<IpAddr>,
        first: usize,
        n: usize,
        now: Instant,
    ) -> Vec<(usize, Taken)> {
        (first..first + n)
            .filter_map(|i| match tokens.admit_at(source, &token(i), now) {
                Admission::Review(taken) => Some((i, taken)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_address_has_at_most_its_allowance_of_reviews_in_the_making_and_refused() {
        let tokens = RefusedTokens::default();
        let start = Instant::now();
        let burst = PER_SOURCE.burst() as usize;
        // A hundred at once: only the allowance is admitted, though none was refused yet.
        let admitted = at_once(&tokens, address(0, 1), 0, 100, start);
        assert_eq!(admitted.len(), burst);
        for (i, taken) in admitted {
            tokens.record_at(token(i), refused(), taken, start);
        }
        let Admission::Throttled { retry_after } = tokens.admit_at(address(0, 1), &token(100), start) else {
            panic!("a refused token past the allowance is still reviewed");
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        // Another address is not held back by this one.
        assert!(matches!(
            tokens.admit_at(address(0, 2), &token(100), start),
            Admission::Review(_)
        ));
        // A second later the address has one more.
        let later = start + Duration::from_secs(1);
        assert!(matches!(
            tokens.admit_at(address(0, 1), &token(100), later),
            Admission::Review(_)
        ));
    }

    #[test]
    fn accepted_tokens_give_back_what_their_review_took() {
        let tokens = RefusedTokens::default();
        let now = Instant::now();
        for i in 0..100 {
            let Admission::Review(taken) = tokens.admit_at(address(0, 1), &token(i), now) else {
                panic!("token {i} of an address whose tokens are all accepted is held back");
            };
            tokens.record_at(token(i), Outcome::Accepted, taken, now);
        }
        // Unanswered reviews keep what they took.
        for i in 100..100 + PER_SOURCE.burst() as usize {
            let Admission::Review(taken) = tokens.admit_at(address(0, 1), &token(i), now) else {
                panic!("held back before the allowance was spent");
            };
            tokens.record_at(token(i), Outcome::Unanswered, taken, now);
        }
        assert!(matches!(
            tokens.admit_at(address(0, 1), &token(999), now),
            Admission::Throttled { .. }
        ));
    }

    #[test]
    fn a_refused_token_is_answered_from_memory_and_an_accepted_one_still_passes() {
        let tokens = RefusedTokens::default();
        let now = Instant::now();
        let good = RefusedTokens::key("contextos-gateway", "good");
        tokens.record_at(good, Outcome::Accepted, None, now);
        for (i, taken) in at_once(&tokens, address(0, 1), 0, 100, now) {
            tokens.record_at(token(i), Outcome::Refused(format!("expired {i}")), taken, now);
        }
        assert_eq!(
            tokens.admit_at(address(0, 1), &token(0), now),
            Admission::Refused("expired 0".into())
        );
        assert!(matches!(
            tokens.admit_at(address(0, 1), &token(999), now),
            Admission::Throttled { .. }
        ));
        assert_eq!(
            tokens.admit_at(address(0, 1), &good, now),
            Admission::Review(None)
        );
        // Remembered only briefly: then the token is reviewed again.
        let later = now + REMEMBERED + Duration::from_secs(PER_SOURCE.burst() as u64);
        assert!(matches!(
            tokens.admit_at(address(0, 1), &token(0), later),
            Admission::Review(_)
        ));
    }

    #[test]
    fn refusing_addresses_together_are_bounded_and_others_are_not_held_to_it() {
        let tokens = RefusedTokens::default();
        let start = Instant::now();
        // Forty addresses each have their tokens refused.
        for a in 0..40 {
            for (i, taken) in at_once(&tokens, address(1, a), usize::from(a) * 100, 100, start) {
                tokens.record_at(token(i), refused(), taken, start);
            }
        }
        // Twenty seconds on, each has refilled its own allowance, but together they have only
        // the refusing addresses' one.
        let later = start + Duration::from_secs(20);
        let admitted: usize = (0..40)
            .map(|a| at_once(&tokens, address(1, a), 10_000 + usize::from(a) * 100, 100, later).len())
            .sum();
        assert_eq!(admitted, REFUSING.burst() as usize);
        // An address that refused nothing is not held to it: a new pod's token is reviewed.
        assert_eq!(at_once(&tokens, address(2, 1), 50_000, 5, later).len(), 5);
    }

    #[test]
    fn tokens_are_remembered_per_kind_of_review() {
        assert_ne!(
            RefusedTokens::key("contextos-gateway", "t"),
            RefusedTokens::key("contextos-a2a", "t")
        );
    }
}
