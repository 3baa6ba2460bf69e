//! A token bucket: how many of something costly (a review the API server is asked for) may be
//! in the making or have gone badly at once, refilled at a steady rate. A review takes one
//! before it is asked, so a burst of requests at once cannot all pass, and gives it back when
//! it went well.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Allowance {
    left: f64,
    burst: f64,
    per_second: f64,
    at: Option<Instant>,
}

impl Allowance {
    pub(crate) const fn full(burst: f64, per_second: f64) -> Self {
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
    pub(crate) fn take(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.left < 1.0 {
            return Some(Duration::from_secs_f64((1.0 - self.left) / self.per_second));
        }
        self.left -= 1.0;
        None
    }

    pub(crate) fn give_back(&mut self) {
        self.left = (self.left + 1.0).min(self.burst);
    }

    pub(crate) fn is_full(&self, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(now);
        copy.left >= copy.burst
    }

    #[cfg(test)]
    pub(crate) fn burst(&self) -> f64 {
        self.burst
    }
}
