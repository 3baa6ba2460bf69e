//! A tenant's runs listed a page at a time. The gateway service answers a bounded number of
//! runs per request, so a reader that wants more (`contextos records verify --all`, a cost
//! report, a replay gate examining thousands of runs) asks again for the runs after the last
//! one it was given ([`RunFilter::after`]: the listing's own order, newest first and ties by
//! run id, so runs that started in the same millisecond are neither lost nor repeated at a
//! page's end). Pure: the requests to send and what each answer adds, so the listing is what
//! the store itself would list.

use super::{RunCursor, RunFilter, RunSummary};

/// The listing of one [`RunFilter`], built from pages of at most `page` runs each.
#[derive(Debug)]
pub struct RunPages {
    filter: RunFilter,
    /// Most runs the listing holds (the filter's limit).
    wanted: usize,
    page: usize,
    runs: Vec<RunSummary>,
    /// How many runs the last request asked for (to tell a short page from a full one).
    asked: usize,
    whole: bool,
}

impl RunPages {
    pub fn new(filter: &RunFilter, page: usize) -> Self {
        let wanted = filter.limit.unwrap_or(usize::MAX);
        Self {
            filter: filter.clone(),
            wanted,
            page: page.max(1),
            runs: Vec::new(),
            asked: 0,
            whole: wanted == 0,
        }
    }

    /// What to ask for next, or `None` once the listing is whole.
    pub fn next_request(&mut self) -> Option<RunFilter> {
        if self.whole {
            return None;
        }
        self.asked = self.page.min(self.wanted - self.runs.len());
        Some(RunFilter {
            limit: Some(self.asked),
            after: self.after(),
            ..self.filter.clone()
        })
    }

    /// Where the next page starts: after the last run taken, or where the filter says.
    fn after(&self) -> Option<RunCursor> {
        self.runs
            .last()
            .map(RunCursor::of)
            .or_else(|| self.filter.after.clone())
    }

    /// Takes the answer to the last [`RunPages::next_request`]. An answer the store cannot
    /// have given — a run out of the listing's order, repeated, outside the window or the
    /// filter asked for, under an id no run can have, more runs than asked — is an error,
    /// never part of the listing.
    pub fn take(&mut self, page: Vec<RunSummary>) -> Result<(), String> {
        if page.len() > self.asked {
            return Err(format!(
                "the gateway listed {} runs where {} were asked for",
                page.len(),
                self.asked
            ));
        }
        let short = page.len() < self.asked;
        let since = self.filter.since_ms.unwrap_or(i64::MIN);
        let until = self.filter.until_ms.unwrap_or(i64::MAX);
        for run in page {
            let expected = super::validate_id("run", &run.run_id).is_ok()
                && run.started_at_ms >= since
                && run.started_at_ms < until
                && self.after().is_none_or(|after| after.precedes(&run))
                && self.filter.matches(&run);
            if !expected {
                return Err(format!(
                    "the gateway listed run {} (started at {} ms) out of order, again, or outside what was asked for",
                    run.run_id, run.started_at_ms
                ));
            }
            self.runs.push(run);
        }
        self.whole = short || self.runs.len() >= self.wanted;
        Ok(())
    }

    /// The runs listed, newest first.
    pub fn into_runs(self) -> Vec<RunSummary> {
        self.runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Hash;

    fn run(id: &str, started_at_ms: i64, agent: &str) -> RunSummary {
        RunSummary {
            run_id: id.into(),
            session_id: format!("s-{id}"),
            agent: agent.into(),
            started_at_ms,
            outcome: "completed".into(),
            entries: 1,
            head: Hash::of(id.as_bytes()),
            bytes: 0,
        }
    }

    /// What a store lists for `filter`: newest first, ties by run id descending, at most
    /// `cap` runs an answer (the gateway's bound).
    fn store_lists(all: &[RunSummary], filter: &RunFilter, cap: usize) -> Vec<RunSummary> {
        let mut runs: Vec<RunSummary> = all
            .iter()
            .filter(|r| {
                filter.since_ms.is_none_or(|s| r.started_at_ms >= s)
                    && filter.until_ms.is_none_or(|u| r.started_at_ms < u)
                    && filter.after.as_ref().is_none_or(|after| after.precedes(r))
                    && filter.matches(r)
            })
            .cloned()
            .collect();
        runs.sort_by(|a, b| {
            b.started_at_ms
                .cmp(&a.started_at_ms)
                .then_with(|| b.run_id.cmp(&a.run_id))
        });
        runs.truncate(filter.limit.unwrap_or(usize::MAX).min(cap));
        runs
    }

    /// The listing paged through `store_lists`, and how many requests it took.
    fn paged(
        all: &[RunSummary],
        filter: &RunFilter,
        page: usize,
    ) -> Result<(Vec<RunSummary>, usize), String> {
        let mut pages = RunPages::new(filter, page);
        let mut requests = 0;
        while let Some(request) = pages.next_request() {
            requests += 1;
            assert!(requests < 1_000, "the listing never ended");
            pages.take(store_lists(all, &request, usize::MAX))?;
        }
        Ok((pages.into_runs(), requests))
    }

    /// Runs in clusters of seven that started in the same millisecond, straddling page ends,
    /// and one millisecond in which more runs started than any page holds.
    fn clustered(count: usize) -> Vec<RunSummary> {
        let mut runs: Vec<RunSummary> = (0..count)
            .map(|i| {
                let agent = if i % 3 == 0 { "triage" } else { "billing" };
                run(&format!("r{i:05}"), 1_000 + (i / 7) as i64, agent)
            })
            .collect();
        runs.extend((0..40).map(|i| run(&format!("same{i:02}"), 990, "triage")));
        runs
    }

    #[test]
    fn a_paged_listing_is_the_stores_own_listing() {
        let all = clustered(250);
        let filters = [
            RunFilter::default(),
            RunFilter {
                limit: Some(101),
                ..RunFilter::default()
            },
            RunFilter {
                agent: Some("triage".into()),
                ..RunFilter::default()
            },
            RunFilter {
                since_ms: Some(990),
                until_ms: Some(1_030),
                ..RunFilter::default()
            },
            RunFilter {
                after: Some(RunCursor {
                    started_at_ms: 1_010,
                    run_id: "r00073".into(),
                }),
                ..RunFilter::default()
            },
            RunFilter {
                limit: Some(0),
                ..RunFilter::default()
            },
        ];
        for filter in &filters {
            for page in [1, 5, 7, 8, 10, 64, 1_000] {
                let (listed, _) = paged(&all, filter, page).expect("listed");
                assert_eq!(
                    listed,
                    store_lists(&all, filter, usize::MAX),
                    "{filter:?} in pages of {page}"
                );
            }
        }
    }

    #[test]
    fn a_listing_asks_only_for_what_it_wants() {
        let all = clustered(250);
        let (_, requests) = paged(&all, &RunFilter::default(), 1_000).expect("listed");
        assert_eq!(requests, 1);
        let limited = RunFilter {
            limit: Some(20),
            ..RunFilter::default()
        };
        let mut pages = RunPages::new(&limited, 1_000);
        assert_eq!(pages.next_request().and_then(|r| r.limit), Some(20));
        let (listed, requests) = paged(&all, &limited, 10).expect("listed");
        assert_eq!((listed.len(), requests), (20, 2));
    }

    #[test]
    fn an_answer_the_store_cannot_have_given_is_refused() {
        let filter = RunFilter {
            since_ms: Some(100),
            ..RunFilter::default()
        };
        let refused = |filter: &RunFilter, first: Vec<RunSummary>, second: Vec<RunSummary>| {
            let mut pages = RunPages::new(filter, 2);
            pages.next_request();
            match pages.take(first) {
                Err(_) => true,
                Ok(()) => {
                    pages.next_request();
                    pages.take(second).is_err()
                }
            }
        };
        // Out of order; tied runs out of order; one run twice; before the window; more than
        // asked; a page going back past where the last one ended; another agent's run.
        assert!(refused(
            &filter,
            vec![run("a", 200, "x"), run("b", 300, "x")],
            vec![]
        ));
        assert!(refused(
            &filter,
            vec![run("a", 200, "x"), run("b", 200, "x")],
            vec![]
        ));
        assert!(refused(
            &filter,
            vec![run("a", 200, "x"), run("a", 200, "x")],
            vec![]
        ));
        assert!(refused(&filter, vec![run("a", 50, "x")], vec![]));
        assert!(refused(
            &filter,
            vec![run("c", 300, "x"), run("b", 300, "x"), run("a", 300, "x")],
            vec![]
        ));
        assert!(refused(
            &filter,
            vec![run("c", 300, "x"), run("b", 300, "x")],
            vec![run("d", 300, "x")]
        ));
        let one_agent = RunFilter {
            agent: Some("x".into()),
            ..RunFilter::default()
        };
        assert!(refused(&one_agent, vec![run("a", 1, "y")], vec![]));
        // The same pages, in order, are taken.
        assert!(!refused(
            &filter,
            vec![run("c", 300, "x"), run("b", 300, "x")],
            vec![run("a", 300, "x")]
        ));
    }
}
