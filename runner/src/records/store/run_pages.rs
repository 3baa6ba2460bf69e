//! A tenant's runs listed a page at a time. The gateway service answers a bounded number of
//! runs per request, so a reader that wants more (`contextos records verify --all`, a cost
//! report, a replay gate examining thousands of runs) asks again for the runs that started no
//! later than the last one it was given — the same millisecond again, since runs that started
//! together may straddle the page's end, skipping those it already has. A millisecond holding
//! a whole page of runs is asked for again in larger pages, up to the most one answer holds.
//! Pure: the requests to send and what each answer adds, so the listing matches what the
//! store itself would list.

use std::collections::HashSet;

use super::{RunFilter, RunSummary};

/// The listing of one [`RunFilter`], built from pages of at most `page` runs each.
#[derive(Debug)]
pub struct RunPages {
    filter: RunFilter,
    /// Most runs the listing holds (the filter's limit).
    wanted: usize,
    /// Runs asked for a page, and the most one answer may hold.
    page: usize,
    most: usize,
    runs: Vec<RunSummary>,
    /// The millisecond the listing has reached (the start of its oldest run), and the runs of
    /// that millisecond it holds: the next page starts with them again.
    boundary: Option<(i64, HashSet<String>)>,
    /// How many runs the next request asks for (kept to tell a short page from a full one).
    asked: usize,
    whole: bool,
}

impl RunPages {
    pub fn new(filter: &RunFilter, page: usize, most: usize) -> Self {
        let wanted = filter.limit.unwrap_or(usize::MAX);
        Self {
            filter: filter.clone(),
            wanted,
            page: page.max(1),
            most: most.max(page.max(1)),
            runs: Vec::new(),
            boundary: None,
            asked: 0,
            whole: wanted == 0,
        }
    }

    /// What to ask for next, or `None` once the listing is whole.
    pub fn next_request(&mut self) -> Option<RunFilter> {
        if self.whole {
            return None;
        }
        let repeated = self.boundary.as_ref().map_or(0, |(_, ids)| ids.len());
        let remaining = self.wanted - self.runs.len();
        self.asked = self.page.min(remaining.saturating_add(repeated));
        Some(RunFilter {
            until_ms: self.until(),
            limit: Some(self.asked),
            ..self.filter.clone()
        })
    }

    /// Where the next page ends: the boundary millisecond again (`until_ms` is exclusive), or
    /// where the filter's window does.
    fn until(&self) -> Option<i64> {
        self.boundary
            .as_ref()
            .map(|(ms, _)| ms.saturating_add(1))
            .or(self.filter.until_ms)
    }

    /// Takes the answer to the last [`RunPages::next_request`]. An answer that cannot be the
    /// store's (out of order, outside the window asked) is an error, as is a millisecond in
    /// which more runs started than a page holds: paging by time cannot get past it.
    pub fn take(&mut self, page: Vec<RunSummary>) -> Result<(), String> {
        let short = page.len() < self.asked;
        let until = self.until().unwrap_or(i64::MAX);
        let since = self.filter.since_ms.unwrap_or(i64::MIN);
        let mut previous: Option<i64> = None;
        let mut added = 0;
        for run in page {
            let started = run.started_at_ms;
            let expected = started < until
                && started >= since
                && previous.is_none_or(|p| started <= p)
                && self.filter.matches(&run);
            if !expected {
                return Err(format!(
                    "the gateway listed run {} (started at {started} ms) out of order or outside what was asked for",
                    run.run_id
                ));
            }
            previous = Some(started);
            if self.runs.len() >= self.wanted {
                break;
            }
            if self.boundary.as_ref().is_some_and(|(ms, _)| *ms != started) {
                self.boundary = None;
            }
            let (_, at_boundary) = self.boundary.get_or_insert_with(|| (started, HashSet::new()));
            if at_boundary.insert(run.run_id.clone()) {
                self.runs.push(run);
                added += 1;
            }
        }
        if self.runs.len() >= self.wanted || short {
            self.whole = true;
        } else if added == 0 {
            // A whole page of runs that started in the boundary millisecond: only a larger
            // page gets past them.
            if self.page >= self.most {
                let ms = self.boundary.as_ref().map_or(0, |(ms, _)| *ms);
                return Err(format!(
                    "at least {} runs started in the same millisecond ({ms} ms since the epoch), as many as one of the gateway's answers holds: this listing cannot be read through it",
                    self.most
                ));
            }
            self.page = self.page.saturating_mul(2).min(self.most);
        }
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
        most: usize,
    ) -> Result<(Vec<RunSummary>, usize), String> {
        let mut pages = RunPages::new(filter, page, most);
        let mut requests = 0;
        while let Some(request) = pages.next_request() {
            requests += 1;
            assert!(requests < 1_000, "the listing never ended");
            pages.take(store_lists(all, &request, usize::MAX))?;
        }
        Ok((pages.into_runs(), requests))
    }

    /// Runs in clusters that started in the same millisecond, straddling every page end.
    fn clustered(count: usize) -> Vec<RunSummary> {
        (0..count)
            .map(|i| {
                let agent = if i % 3 == 0 { "triage" } else { "billing" };
                run(&format!("r{i:05}"), 1_000 + (i / 7) as i64, agent)
            })
            .collect()
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
                since_ms: Some(1_003),
                until_ms: Some(1_030),
                ..RunFilter::default()
            },
            RunFilter {
                limit: Some(0),
                ..RunFilter::default()
            },
        ];
        for filter in &filters {
            // Clusters of seven a millisecond: pages of fewer than eight grow past them.
            for page in [1, 5, 7, 8, 10, 64, 1_000] {
                let (listed, _) = paged(&all, filter, page, 1_000).expect("listed");
                assert_eq!(
                    listed,
                    store_lists(&all, filter, usize::MAX),
                    "{filter:?} in pages of {page}"
                );
            }
        }
    }

    #[test]
    fn a_listing_within_one_page_is_one_request() {
        let all = clustered(250);
        let (_, requests) = paged(&all, &RunFilter::default(), 1_000, 10_000).expect("listed");
        assert_eq!(requests, 1);
        let limited = RunFilter {
            limit: Some(20),
            ..RunFilter::default()
        };
        let mut pages = RunPages::new(&limited, 1_000, 10_000);
        assert_eq!(
            pages.next_request().and_then(|r| r.limit),
            Some(20),
            "asks only for what it wants"
        );
        let (listed, _) = paged(&all, &limited, 10, 10_000).expect("listed");
        assert_eq!(listed, store_lists(&all, &limited, usize::MAX));
    }

    #[test]
    fn a_millisecond_holding_a_page_is_read_in_larger_pages_and_one_holding_an_answer_is_an_error() {
        let mut all: Vec<RunSummary> = (0..12).map(|i| run(&format!("same{i:02}"), 5_000, "a")).collect();
        all.push(run("older", 4_000, "a"));
        // Pages of 4 grow to 8, then 16, which gets past the twelve.
        let (listed, _) = paged(&all, &RunFilter::default(), 4, 16).expect("listed");
        assert_eq!(listed, store_lists(&all, &RunFilter::default(), usize::MAX));
        // Answers of at most 12 never get past them: an error, not a shorter listing.
        let error = paged(&all, &RunFilter::default(), 4, 12).expect_err("cannot page past it");
        assert!(
            error.contains("at least 12 runs started in the same millisecond"),
            "{error}"
        );
    }

    #[test]
    fn an_answer_the_store_cannot_have_given_is_refused() {
        let filter = RunFilter {
            since_ms: Some(100),
            ..RunFilter::default()
        };
        let out_of_order = vec![run("a", 200, "x"), run("b", 300, "x")];
        let too_old = vec![run("a", 50, "x")];
        for page in [out_of_order, too_old] {
            let mut pages = RunPages::new(&filter, 10, 10);
            pages.next_request();
            assert!(pages.take(page).is_err());
        }
        // Past the last page's millisecond.
        let mut pages = RunPages::new(&RunFilter::default(), 2, 2);
        pages.next_request();
        pages
            .take(vec![run("a", 300, "x"), run("b", 200, "x")])
            .expect("first page");
        pages.next_request();
        assert!(pages.take(vec![run("c", 250, "x")]).is_err());
        // Another agent's run where one agent was asked for.
        let mut pages = RunPages::new(
            &RunFilter {
                agent: Some("x".into()),
                ..RunFilter::default()
            },
            10,
            10,
        );
        pages.next_request();
        assert!(pages.take(vec![run("a", 1, "y")]).is_err());
    }
}
