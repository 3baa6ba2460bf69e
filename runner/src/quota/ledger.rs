//! One SpendQuota's ledger, as a value: what its runs spent, bucketed per window, and what the
//! calls in flight hold. Pure — [`super::book`] reads and writes it in the store, one
//! transaction per change, so replicas agree on it.
//!
//! **Rolling windows, counted in buckets.** Each window keeps 30 buckets (an hour in 2-minute
//! buckets, a day in 48-minute ones, a month in days). A bucket counts until all of it has
//! left the window, so usage is never under-counted: a window may hold back a little longer
//! than its length (at most one bucket), never let more through.
//!
//! **Calls in flight hold their most.** A call is admitted against what was spent *and* what
//! the calls in flight hold, then holds what it may cost at most (a model turn: its prompt
//! estimate and its output limit, priced); when it ends its hold becomes what it actually
//! cost. Holds are keyed by the call, so a call asked again (a retried request, another
//! replica) holds once, and ending it twice charges once. A hold whose replica died is charged
//! in full once its time is up: spend is never lost, only at worst over-counted for that call.
//!
//! **How far a limit can be passed.** A counted limit (tool calls) is exact: a call is admitted
//! only if it fits. So is any limit for a call whose cost is known before it is made (a tool
//! call: one call, at its tool's price). A metered limit (tokens, money) admits a call whose
//! cost is only bounded (a model turn) while spent plus held is below it, so the last turn
//! admitted may end past it by at most its own cost; the calls after it are refused. With calls in flight on several replicas the same holds: each admission
//! sees the holds of the others.

use contextos_crds::spend_quota::QuotaWindow;
use serde::{Deserialize, Serialize};

/// Buckets per window.
const BUCKETS: i64 = 30;
/// Thresholds announced (Events) as a limit's usage crosses them, in percent.
pub const THRESHOLDS: [u32; 2] = [80, 100];

/// What a call takes or took: tokens, money (nano-units of the quota's currency), tool calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    #[serde(rename = "t", default, skip_serializing_if = "is_zero")]
    pub tokens: u64,
    #[serde(rename = "n", default, skip_serializing_if = "is_zero")]
    pub nanos: u64,
    #[serde(rename = "c", default, skip_serializing_if = "is_zero")]
    pub calls: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Amounts {
    fn add(&mut self, other: &Self) {
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.nanos = self.nanos.saturating_add(other.nanos);
        self.calls = self.calls.saturating_add(other.calls);
    }

    pub fn get(&self, resource: Resource) -> u64 {
        match resource {
            Resource::Tokens => self.tokens,
            Resource::Spend => self.nanos,
            Resource::ToolCalls => self.calls,
        }
    }
}

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Resource {
    #[serde(rename = "spend")]
    Spend,
    #[serde(rename = "tokens")]
    Tokens,
    #[serde(rename = "toolCalls")]
    ToolCalls,
}

impl Resource {
    pub const ALL: [Self; 3] = [Self::Spend, Self::Tokens, Self::ToolCalls];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Spend => "spend",
            Self::Tokens => "tokens",
            Self::ToolCalls => "toolCalls",
        }
    }

    /// Whether a call's cost is known only after it (it may end past the limit, see the
    /// module's notes) rather than counted exactly before.
    const fn metered(self) -> bool {
        !matches!(self, Self::ToolCalls)
    }
}

/// One limit: at most `max` of `resource` within `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub window: QuotaWindow,
    pub resource: Resource,
    pub max: u64,
}

/// One bucket of a window's series: its start (ms) and what was spent in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Bucket {
    #[serde(rename = "s")]
    start: i64,
    #[serde(rename = "a")]
    spent: Amounts,
}

/// A window's buckets, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Series {
    #[serde(rename = "w")]
    window: QuotaWindow,
    #[serde(rename = "b", default)]
    buckets: Vec<Bucket>,
}

/// What a call in flight holds, until `until` (ms), for the requests carrying it (a runner may
/// send one call to two replicas at once: each is an owner).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Hold {
    #[serde(rename = "k")]
    call: String,
    #[serde(rename = "a")]
    amounts: Amounts,
    #[serde(rename = "u")]
    until: i64,
    #[serde(rename = "o", default, skip_serializing_if = "Vec::is_empty")]
    owners: Vec<String>,
}

/// Calls a ledger holds for at most: past it, a new call waits (or is refused) until some end —
/// a bound on the row every change rewrites.
pub const MAX_HOLDS: usize = 2048;

/// Requests one hold remembers as its owners at most (more are not told apart: the hold then
/// ends only when spent or when its time is up).
const MAX_OWNERS: usize = 8;

/// A threshold announced for a limit; forgotten once usage falls below it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Announced {
    #[serde(rename = "w")]
    window: QuotaWindow,
    #[serde(rename = "r")]
    resource: Resource,
    #[serde(rename = "p")]
    percent: u32,
}

/// A quota's ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(rename = "s", default)]
    series: Vec<Series>,
    #[serde(rename = "h", default)]
    holds: Vec<Hold>,
    #[serde(rename = "x", default)]
    announced: Vec<Announced>,
}

/// A call the quota does not admit now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Full {
    pub limit: Limit,
    /// Spent and held in the window.
    pub used: u64,
    /// When the window will next have given something back (ms from now, at least 1 s).
    pub retry_after_ms: i64,
    /// The call asks more than the whole limit: no window will ever have room for it.
    pub never_fits: bool,
    /// It would fit what was spent: only other calls in flight hold the rest, and they may
    /// spend less than they hold (a model turn holds its whole output limit). Such a call
    /// waits for them rather than being refused.
    pub held_back: bool,
}

/// A limit whose usage crossed a threshold upwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub limit: Limit,
    pub percent: u32,
    pub used: u64,
}

fn bucket_width(window: QuotaWindow) -> i64 {
    window.millis() / BUCKETS
}

impl Ledger {
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Spent and held within `window` at `now`.
    pub fn used(&self, window: QuotaWindow, now: i64) -> Amounts {
        let mut used = self.spent(window, now);
        self.holds.iter().for_each(|h| used.add(&h.amounts));
        used
    }

    fn spent(&self, window: QuotaWindow, now: i64) -> Amounts {
        let mut spent = Amounts::default();
        let width = bucket_width(window);
        if let Some(series) = self.series.iter().find(|s| s.window == window) {
            series
                .buckets
                .iter()
                .filter(|b| b.start + width > now - window.millis())
                .for_each(|b| spent.add(&b.spent));
        }
        spent
    }

    /// Whether a call taking at most `demand` fits every limit at `now` (the first that it does
    /// not fit, if any). The call's own hold, if it holds already, does not count against it.
    /// `exact`: `demand` is what the call costs, known before it is made, so it must fit whole
    /// in metered limits too.
    pub fn admit(
        &self,
        limits: &[Limit],
        call: &str,
        demand: &Amounts,
        exact: bool,
        now: i64,
    ) -> Result<(), Full> {
        let own = self
            .holds
            .iter()
            .find(|h| h.call == call)
            .map(|h| h.amounts)
            .unwrap_or_default();
        for limit in limits {
            let asked = demand.get(limit.resource);
            if asked == 0 {
                continue;
            }
            let fits = |used: u64| {
                if limit.resource.metered() && !exact {
                    used < limit.max
                } else {
                    used.saturating_add(asked) <= limit.max
                }
            };
            let used = self
                .used(limit.window, now)
                .get(limit.resource)
                .saturating_sub(own.get(limit.resource));
            if !fits(used) {
                let spent = self.spent(limit.window, now).get(limit.resource);
                return Err(Full {
                    limit: *limit,
                    used,
                    retry_after_ms: self.next_release(limit.window, now),
                    never_fits: (exact || !limit.resource.metered()) && asked > limit.max,
                    held_back: fits(spent),
                });
            }
        }
        Ok(())
    }

    /// When `window` next gives something back: its oldest counted bucket leaving, or a call
    /// in flight ending — whichever is sooner, at least a second.
    fn next_release(&self, window: QuotaWindow, now: i64) -> i64 {
        let width = bucket_width(window);
        let leaving = self
            .series
            .iter()
            .find(|s| s.window == window)
            .and_then(|s| s.buckets.iter().find(|b| b.start + width > now - window.millis()))
            .map(|b| b.start + width + window.millis() - now);
        let ending = (!self.holds.is_empty()).then_some(1_000);
        [leaving, ending]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(width)
            .max(1_000)
    }

    /// Whether a new call may hold here (see [`MAX_HOLDS`]).
    pub fn has_room_for(&self, call: &str) -> bool {
        self.holds.len() < MAX_HOLDS || self.holds.iter().any(|h| h.call == call)
    }

    /// `call` holds `amounts` until `until` for request `owner` (a call held already keeps one
    /// hold, of the larger amounts, with one more owner).
    pub fn hold(&mut self, call: &str, owner: &str, amounts: Amounts, until: i64) {
        match self.holds.iter_mut().find(|h| h.call == call) {
            Some(held) => {
                held.amounts = Amounts {
                    tokens: held.amounts.tokens.max(amounts.tokens),
                    nanos: held.amounts.nanos.max(amounts.nanos),
                    calls: held.amounts.calls.max(amounts.calls),
                };
                held.until = held.until.max(until);
                if !held.owners.iter().any(|o| o == owner) && held.owners.len() < MAX_OWNERS {
                    held.owners.push(owner.to_owned());
                }
            }
            None => self.holds.push(Hold {
                call: call.to_owned(),
                amounts,
                until,
                owners: vec![owner.to_owned()],
            }),
        }
    }

    /// Ends request `owner`'s part in `call`'s hold. Spent (`cost` not nothing): the hold ends
    /// and `cost` is spent at `now`. Released (nothing spent): only `owner` lets go — the hold
    /// ends when no request carries the call any more, so a request that lost a race never
    /// ends the hold of the one that made the call. `false` if nothing changed (the hold ended
    /// before, or was charged when its time was up).
    pub fn settle(
        &mut self,
        windows: &[QuotaWindow],
        call: &str,
        owner: &str,
        cost: &Amounts,
        now: i64,
    ) -> bool {
        let Some(at) = self.holds.iter().position(|h| h.call == call) else {
            return false;
        };
        if *cost == Amounts::default() {
            let held = &mut self.holds[at];
            let Some(mine) = held.owners.iter().position(|o| o == owner) else {
                return false;
            };
            held.owners.remove(mine);
            if held.owners.is_empty() {
                self.holds.remove(at);
            }
            return true;
        }
        self.holds.remove(at);
        self.spend(windows, cost, now);
        true
    }

    fn spend(&mut self, windows: &[QuotaWindow], cost: &Amounts, now: i64) {
        if *cost == Amounts::default() {
            return;
        }
        for &window in windows {
            let width = bucket_width(window);
            let start = now - now.rem_euclid(width);
            let at = match self.series.iter().position(|s| s.window == window) {
                Some(at) => at,
                None => {
                    self.series.push(Series {
                        window,
                        buckets: Vec::new(),
                    });
                    self.series.len() - 1
                }
            };
            let buckets = &mut self.series[at].buckets;
            match buckets.last_mut() {
                Some(last) if last.start == start => last.spent.add(cost),
                _ => buckets.push(Bucket { start, spent: *cost }),
            }
        }
    }

    /// Charges holds whose time is up in full (their replica is gone: what they may have cost is
    /// spent), drops buckets that left their window and series no limit counts any more, and
    /// forgets thresholds usage fell below. Whether anything changed.
    pub fn expire(&mut self, limits: &[Limit], now: i64) -> bool {
        let mut windows: Vec<QuotaWindow> = limits.iter().map(|l| l.window).collect();
        windows.dedup();
        let windows = windows.as_slice();
        let before = self.clone();
        let (ended, held): (Vec<Hold>, Vec<Hold>) = std::mem::take(&mut self.holds)
            .into_iter()
            .partition(|h| h.until <= now);
        self.holds = held;
        for hold in ended {
            self.spend(windows, &hold.amounts, hold.until.min(now));
        }
        self.series.retain(|s| windows.contains(&s.window));
        for series in &mut self.series {
            let width = bucket_width(series.window);
            let window = series.window.millis();
            series.buckets.retain(|b| b.start + width > now - window);
        }
        self.series.retain(|s| !s.buckets.is_empty());
        let used = |a: &Announced| {
            limits
                .iter()
                .find(|l| l.window == a.window && l.resource == a.resource)
                .map(|l| percent(self.used(l.window, now).get(l.resource), l.max))
        };
        let keep: Vec<bool> = self
            .announced
            .iter()
            .map(|a| used(a).is_some_and(|p| p >= a.percent))
            .collect();
        let mut keep = keep.into_iter();
        self.announced.retain(|_| keep.next().unwrap_or(false));
        *self != before
    }

    /// Limits whose usage now crosses a threshold it had not (each announced once while it
    /// stays above); thresholds it fell below are forgotten, to be announced again.
    pub fn crossings(&mut self, limits: &[Limit], now: i64) -> Vec<Crossing> {
        let mut crossed = Vec::new();
        for limit in limits.iter().filter(|l| l.max > 0) {
            let used = self.used(limit.window, now).get(limit.resource);
            let percent = percent(used, limit.max);
            for threshold in THRESHOLDS {
                let known = |a: &Announced| {
                    a.window == limit.window && a.resource == limit.resource && a.percent == threshold
                };
                let was = self.announced.iter().any(known);
                if percent >= threshold && !was {
                    self.announced.push(Announced {
                        window: limit.window,
                        resource: limit.resource,
                        percent: threshold,
                    });
                    crossed.push(Crossing {
                        limit: *limit,
                        percent: threshold,
                        used,
                    });
                } else if percent < threshold && was {
                    self.announced.retain(|a| !known(a));
                }
            }
        }
        crossed
    }
}

/// `used` as a percentage of `max`, rounded down (a limit of 0 is always full).
pub fn percent(used: u64, max: u64) -> u32 {
    if max == 0 {
        return 100;
    }
    u32::try_from(u128::from(used) * 100 / u128::from(max)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const T0: i64 = 1_800_000_000_000;

    fn calls(n: u64) -> Amounts {
        Amounts {
            calls: n,
            ..Amounts::default()
        }
    }

    fn tokens(n: u64) -> Amounts {
        Amounts {
            tokens: n,
            ..Amounts::default()
        }
    }

    #[test]
    fn a_call_that_fits_what_was_spent_is_held_back_by_calls_in_flight_not_refused() {
        let limits = [limit(Resource::Tokens, 1_000)];
        let mut ledger = Ledger::default();
        // A model turn in flight holds far more than the whole limit (its output limit).
        ledger.hold("run-a/turn/1", "r1", tokens(1_000_000), T0 + HOUR);
        let full = ledger
            .admit(&limits, "run-b/call/1", &tokens(10), true, T0)
            .expect_err("the hold fills the limit");
        assert!(full.held_back, "only the hold stands in the way: {full:?}");
        // Once it settles at what it spent, the call fits.
        ledger.settle(&[QuotaWindow::Hour], "run-a/turn/1", "r1", &tokens(300), T0);
        assert!(
            ledger
                .admit(&limits, "run-b/call/1", &tokens(10), true, T0)
                .is_ok()
        );
        // Spent to the limit, a call is refused, not held back.
        ledger.hold("run-a/turn/2", "r1", tokens(700), T0 + HOUR);
        ledger.settle(&[QuotaWindow::Hour], "run-a/turn/2", "r1", &tokens(700), T0);
        let full = ledger
            .admit(&limits, "run-b/call/2", &tokens(10), true, T0)
            .expect_err("spent");
        assert!(!full.held_back, "{full:?}");
    }

    fn limit(resource: Resource, max: u64) -> Limit {
        Limit {
            window: QuotaWindow::Hour,
            resource,
            max,
        }
    }

    #[test]
    fn a_counted_limit_admits_exactly_up_to_it_counting_calls_in_flight() {
        let limits = [limit(Resource::ToolCalls, 3)];
        let mut ledger = Ledger::default();
        for i in 0..3 {
            let call = format!("c{i}");
            assert_eq!(
                ledger.admit(&limits, &call, &calls(1), false, T0),
                Ok(()),
                "call {i}"
            );
            ledger.hold(&call, "r", calls(1), T0 + 60_000);
        }
        // Three in flight: the fourth does not fit, though none has ended.
        let full = ledger
            .admit(&limits, "c3", &calls(1), false, T0)
            .expect_err("full");
        assert_eq!((full.used, full.limit.max), (3, 3));
        // One is denied after all (released): the fourth fits.
        assert!(ledger.settle(&[QuotaWindow::Hour], "c0", "r", &Amounts::default(), T0));
        assert_eq!(ledger.admit(&limits, "c3", &calls(1), false, T0), Ok(()));
    }

    #[test]
    fn a_call_asked_again_holds_once_and_is_charged_once() {
        let windows = [QuotaWindow::Hour];
        let limits = [limit(Resource::ToolCalls, 1)];
        let mut ledger = Ledger::default();
        ledger.hold("c", "r1", calls(1), T0 + 60_000);
        // The same call again (a retried request): its own hold does not count against it.
        assert_eq!(ledger.admit(&limits, "c", &calls(1), false, T0), Ok(()));
        ledger.hold("c", "r2", calls(1), T0 + 60_000);
        assert_eq!(ledger.used(QuotaWindow::Hour, T0), calls(1));
        // The request that lost the race lets go; the call stays held for the one carrying it.
        assert!(ledger.settle(&windows, "c", "r2", &Amounts::default(), T0));
        assert_eq!(ledger.used(QuotaWindow::Hour, T0), calls(1));
        assert!(ledger.settle(&windows, "c", "r1", &calls(1), T0));
        assert!(
            !ledger.settle(&windows, "c", "r1", &calls(1), T0),
            "settled twice"
        );
        assert!(
            !ledger.settle(&windows, "c", "r2", &Amounts::default(), T0),
            "released late"
        );
        assert_eq!(ledger.used(QuotaWindow::Hour, T0), calls(1));
    }

    #[test]
    fn a_metered_limit_lets_the_last_call_end_past_it_and_no_call_after() {
        let windows = [QuotaWindow::Hour];
        let limits = [limit(Resource::Tokens, 1_000)];
        let mut ledger = Ledger::default();
        ledger.hold("t1", "r", tokens(400), T0 + 60_000);
        ledger.settle(&windows, "t1", "r", &tokens(900), T0);
        // 900 of 1000: a turn that may take 500 is admitted (the limit is not reached yet) …
        assert_eq!(ledger.admit(&limits, "t2", &tokens(500), false, T0), Ok(()));
        ledger.hold("t2", "r", tokens(500), T0 + 60_000);
        // … and while it holds, nothing else is.
        assert!(ledger.admit(&limits, "t3", &tokens(1), false, T0).is_err());
        ledger.settle(&windows, "t2", "r", &tokens(300), T0);
        assert_eq!(ledger.used(QuotaWindow::Hour, T0).tokens, 1_200);
        assert!(ledger.admit(&limits, "t3", &tokens(1), false, T0).is_err());
    }

    #[test]
    fn a_call_whose_cost_is_known_before_must_fit_a_metered_limit_whole() {
        let windows = [QuotaWindow::Hour];
        let limits = [limit(Resource::Spend, 25)];
        let money = |nanos| Amounts {
            nanos,
            ..Amounts::default()
        };
        let mut ledger = Ledger::default();
        for call in ["a", "b"] {
            assert_eq!(ledger.admit(&limits, call, &money(10), true, T0), Ok(()));
            ledger.hold(call, "r", money(10), T0 + 60_000);
            ledger.settle(&windows, call, "r", &money(10), T0);
        }
        // 20 of 25: a priced call of 10 would pass the limit and is refused before it is made;
        // a model turn that may cost 10 is still admitted (it may cost less).
        let full = ledger
            .admit(&limits, "c", &money(10), true, T0)
            .expect_err("past the limit");
        assert_eq!(full.used, 20);
        assert!(!full.never_fits);
        assert_eq!(ledger.admit(&limits, "c", &money(5), true, T0), Ok(()));
        // A call dearer than the whole limit never fits, however long it waits.
        let never = ledger
            .admit(&limits, "d", &money(26), true, T0)
            .expect_err("too dear");
        assert!(never.never_fits);
        assert_eq!(ledger.admit(&limits, "c", &money(10), false, T0), Ok(()));
    }

    #[test]
    fn spend_leaves_a_rolling_window_only_once_its_whole_bucket_has() {
        let windows = [QuotaWindow::Hour];
        let limits = [limit(Resource::ToolCalls, 1)];
        let mut ledger = Ledger::default();
        ledger.hold("c", "r", calls(1), T0 + 60_000);
        ledger.settle(&windows, "c", "r", &calls(1), T0);
        let width = HOUR / BUCKETS;
        let bucket_end = T0 - T0.rem_euclid(width) + width;
        // Still counted an hour later, until its bucket is wholly out of the window.
        let full = ledger
            .admit(&limits, "d", &calls(1), false, bucket_end + HOUR - 1)
            .expect_err("counted");
        assert_eq!(full.retry_after_ms, 1_000, "at least a second");
        let full = ledger
            .admit(&limits, "d", &calls(1), false, T0 + 1)
            .expect_err("counted");
        assert_eq!(full.retry_after_ms, bucket_end + HOUR - (T0 + 1));
        assert_eq!(
            ledger.admit(&limits, "d", &calls(1), false, bucket_end + HOUR),
            Ok(())
        );
        // And dropped from the row once gone.
        assert!(ledger.expire(&limits, bucket_end + HOUR));
        assert_eq!(ledger, Ledger::default());
    }

    #[test]
    fn a_hold_whose_replica_died_is_charged_in_full_when_its_time_is_up() {
        let windows = [QuotaWindow::Hour, QuotaWindow::Day];
        let limits = [
            limit(Resource::Tokens, 1_000),
            Limit {
                window: QuotaWindow::Day,
                resource: Resource::Tokens,
                max: 5_000,
            },
        ];
        let mut ledger = Ledger::default();
        ledger.hold("gone", "r", tokens(700), T0 + 1_000);
        assert!(!ledger.expire(&limits, T0 + 999));
        assert!(ledger.expire(&limits, T0 + 1_000));
        assert_eq!(ledger.used(QuotaWindow::Day, T0 + 2_000), tokens(700));
        assert_eq!(ledger.used(QuotaWindow::Hour, T0 + 2_000), tokens(700));
        // Its call ending late charges nothing more.
        assert!(!ledger.settle(&windows, "gone", "r", &tokens(10), T0 + 3_000));
        assert_eq!(ledger.used(QuotaWindow::Day, T0 + 3_000), tokens(700));
    }

    #[test]
    fn thresholds_are_announced_once_while_usage_stays_above_them() {
        let windows = [QuotaWindow::Hour];
        let limits = [limit(Resource::ToolCalls, 10)];
        let mut ledger = Ledger::default();
        let charge = |ledger: &mut Ledger, n: u64, at: i64| {
            ledger.hold("c", "r", calls(n), at + 1);
            ledger.settle(&windows, "c", "r", &calls(n), at);
            ledger
                .crossings(&limits, at)
                .into_iter()
                .map(|c| c.percent)
                .collect::<Vec<_>>()
        };
        assert_eq!(charge(&mut ledger, 7, T0), Vec::<u32>::new());
        assert_eq!(charge(&mut ledger, 1, T0), vec![80]);
        assert_eq!(charge(&mut ledger, 1, T0), Vec::<u32>::new());
        assert_eq!(charge(&mut ledger, 1, T0), vec![100]);
        // The window moves on: usage falls, and the thresholds may be announced again.
        let later = T0 + 2 * HOUR;
        ledger.expire(&limits, later);
        assert_eq!(charge(&mut ledger, 8, later), vec![80]);
    }

    #[test]
    fn a_ledger_survives_its_encoding() {
        let mut ledger = Ledger::default();
        ledger.hold("c", "r", calls(1), T0 + 5);
        ledger.settle(&[QuotaWindow::Month], "c", "r", &tokens(3), T0);
        ledger.hold("d", "r", tokens(9), T0 + 5);
        assert_eq!(Ledger::decode(&ledger.encode()), Ok(ledger));
        assert!(Ledger::decode(b"{\"s\": 3}").is_err());
    }
}
