//! The blob bytes each run uploaded through this replica, charged against its store quota
//! beside its record's own bytes — and each replay Job's (under `job/<uid>`, against the Job's
//! own bound), counted and forgotten as a run's are. A run's count is kept while the run
//! uploads: only the runs that uploaded least recently are forgotten, and only once
//! [`CAPACITY`] runs are counted, so a run gets its quota again only after that many other runs
//! uploaded here since its own last upload — each of which had a quota of its own to fill
//! anyway. (Before, every count was
//! dropped once 1,024 runs had been counted: a run could keep uploading its quota again.)

use std::collections::HashMap;

/// Runs counted before the least recently charged are forgotten.
const CAPACITY: usize = 65_536;

/// Blob bytes by (tenant, run).
#[derive(Debug, Default)]
pub(super) struct BlobCharges {
    runs: HashMap<(String, String), Charge>,
    /// Counts charges: a run's `touched` says how recently it uploaded.
    clock: u64,
}

#[derive(Clone, Copy, Debug)]
struct Charge {
    bytes: u64,
    touched: u64,
}

/// A charge that would pass the quota: the run's bytes so far (record and blobs).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct OverQuota {
    pub used: u64,
}

impl BlobCharges {
    /// Charges `bytes` to the run if they fit beside its blobs counted before and the `recorded`
    /// bytes of its chain under `max`; its blob bytes after.
    pub fn charge(
        &mut self,
        tenant: &str,
        run: &str,
        recorded: u64,
        bytes: u64,
        max: u64,
    ) -> Result<u64, OverQuota> {
        let key = (tenant.to_owned(), run.to_owned());
        if !self.runs.contains_key(&key) && self.runs.len() >= CAPACITY {
            self.make_room();
        }
        self.clock += 1;
        let charge = self.runs.entry(key).or_insert(Charge {
            bytes: 0,
            touched: self.clock,
        });
        charge.touched = self.clock;
        let after = charge.bytes.saturating_add(bytes);
        if after.saturating_add(recorded) > max {
            return Err(OverQuota {
                used: charge.bytes.saturating_add(recorded),
            });
        }
        charge.bytes = after;
        Ok(after)
    }

    /// The run's blob bytes so far.
    pub fn of(&self, tenant: &str, run: &str) -> u64 {
        self.runs
            .get(&(tenant.to_owned(), run.to_owned()))
            .map_or(0, |c| c.bytes)
    }

    /// Forgets the sixteenth of runs that uploaded least recently (at once, so that the scan is
    /// made once per that many new runs).
    fn make_room(&mut self) {
        let mut touched: Vec<u64> = self.runs.values().map(|c| c.touched).collect();
        let cut = touched.len() / 16;
        let (_, oldest_kept, _) = touched.select_nth_unstable(cut);
        let oldest_kept = *oldest_kept;
        self.runs.retain(|_, c| c.touched >= oldest_kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1_000;

    #[test]
    fn a_run_cannot_pass_its_quota_in_blobs() {
        let mut charges = BlobCharges::default();
        assert_eq!(charges.charge("shop", "r1", 100, 600, MAX), Ok(600));
        assert_eq!(
            charges.charge("shop", "r1", 100, 400, MAX),
            Err(OverQuota { used: 700 }),
            "record and blobs together"
        );
        assert_eq!(charges.charge("shop", "r1", 100, 300, MAX), Ok(900));
        assert_eq!(charges.of("shop", "r1"), 900);
        // Another tenant's run of the same name has a count of its own.
        assert_eq!(charges.charge("bank", "r1", 0, 1_000, MAX), Ok(1_000));
    }

    #[test]
    fn a_run_that_goes_on_uploading_keeps_its_count_however_many_runs_come_and_go() {
        let mut charges = BlobCharges::default();
        charges.charge("shop", "hostile", 0, MAX, MAX).expect("its quota");
        // Many other runs upload a byte each through this replica, the hostile run trying again
        // between them.
        for n in 0..(2 * CAPACITY) {
            charges
                .charge("shop", &format!("other-{n}"), 0, 1, MAX)
                .expect("a byte");
            if n % 1_000 == 0 {
                assert!(
                    charges.charge("shop", "hostile", 0, 1, MAX).is_err(),
                    "quota given again after {n} other runs"
                );
            }
        }
        assert!(charges.runs.len() <= CAPACITY, "bounded: {}", charges.runs.len());
        assert_eq!(charges.of("shop", "hostile"), MAX);
    }

    #[test]
    fn the_runs_that_uploaded_least_recently_are_forgotten_first() {
        let mut charges = BlobCharges::default();
        for n in 0..CAPACITY {
            charges
                .charge("shop", &format!("run-{n}"), 0, 1, MAX)
                .expect("a byte");
        }
        charges
            .charge("shop", "run-0", 0, 1, MAX)
            .expect("the oldest uploads again");
        charges.charge("shop", "new", 0, 1, MAX).expect("one more run");
        assert_eq!(charges.of("shop", "run-0"), 2, "kept: it uploaded lately");
        assert_eq!(
            charges.of("shop", "run-1"),
            0,
            "forgotten: it uploaded least recently"
        );
        assert_eq!(charges.of("shop", &format!("run-{}", CAPACITY - 1)), 1);
    }
}
