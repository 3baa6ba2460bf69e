//! Retries with exponential backoff and jitter, and a circuit breaker per endpoint.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Delay before retry `attempt` (1-based): `initial × 2^(attempt-1)`, capped at 30 s, with up to
/// 50 % random jitter so that many callers do not retry in lockstep.
pub fn backoff(initial: Duration, attempt: u32) -> Duration {
    let base = initial
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(Duration::from_secs(30));
    let mut bytes = [0u8; 4];
    let random = getrandom::fill(&mut bytes)
        .map(|()| u32::from_le_bytes(bytes))
        .unwrap_or(0);
    let jitter = base.mul_f64(f64::from(random % 1000) / 2000.0);
    base - jitter / 2 + jitter
}

/// State of one endpoint's breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe call is in flight; others fail fast until it reports.
    HalfOpen,
}

/// Circuit breakers keyed by endpoint (`scheme://host:port`).
#[derive(Debug)]
pub struct CircuitBreakers {
    threshold: u32,
    cooldown: Duration,
    states: Mutex<HashMap<String, BreakerState>>,
}

impl CircuitBreakers {
    /// Opens after `threshold` consecutive failures; probes again after `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a call to `endpoint` may go out now (moving Open → HalfOpen after the cooldown).
    pub fn allow(&self, endpoint: &str, now: Instant) -> bool {
        let Ok(mut states) = self.states.lock() else {
            return true;
        };
        let state = states
            .entry(endpoint.to_owned())
            .or_insert(BreakerState::Closed { failures: 0 });
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                *state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => false,
        }
    }

    /// Reports the outcome of a call that `allow` let through; whether it opened the circuit
    /// (decided under the lock: of concurrent failures at the threshold, one opens it).
    pub fn report(&self, endpoint: &str, success: bool, now: Instant) -> bool {
        let Ok(mut states) = self.states.lock() else {
            return false;
        };
        let state = states
            .entry(endpoint.to_owned())
            .or_insert(BreakerState::Closed { failures: 0 });
        let was_open = matches!(*state, BreakerState::Open { .. });
        *state = match (*state, success) {
            (_, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false) if failures + 1 < self.threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => BreakerState::Open {
                until: now + self.cooldown,
            },
        };
        !was_open && matches!(*state, BreakerState::Open { .. })
    }

    pub fn state(&self, endpoint: &str) -> BreakerState {
        self.states
            .lock()
            .ok()
            .and_then(|s| s.get(endpoint).copied())
            .unwrap_or(BreakerState::Closed { failures: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_n_failures_and_probes_once_after_the_cooldown() {
        let breakers = CircuitBreakers::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(breakers.allow("e", t0));
            breakers.report("e", false, t0);
        }
        assert!(
            !breakers.allow("e", t0 + Duration::from_secs(1)),
            "open: fail fast"
        );
        let later = t0 + Duration::from_secs(11);
        assert!(breakers.allow("e", later), "half-open probe");
        assert!(!breakers.allow("e", later), "only one probe at a time");
        breakers.report("e", true, later);
        assert_eq!(breakers.state("e"), BreakerState::Closed { failures: 0 });
        assert!(breakers.allow("other", t0), "breakers are per endpoint");
    }

    #[test]
    fn a_failed_probe_reopens() {
        let breakers = CircuitBreakers::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        breakers.report("e", false, t0);
        let later = t0 + Duration::from_secs(6);
        assert!(breakers.allow("e", later));
        breakers.report("e", false, later);
        assert!(matches!(breakers.state("e"), BreakerState::Open { .. }));
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let first = backoff(Duration::from_millis(100), 1);
        let third = backoff(Duration::from_millis(100), 3);
        assert!(
            first >= Duration::from_millis(75) && first <= Duration::from_millis(125),
            "{first:?}"
        );
        assert!(
            third >= Duration::from_millis(300) && third <= Duration::from_millis(500),
            "{third:?}"
        );
        assert!(backoff(Duration::from_secs(10), 30) <= Duration::from_secs(38));
    }
}
