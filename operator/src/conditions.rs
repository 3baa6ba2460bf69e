//! Status conditions the kstatus way: one entry per type, `lastTransitionTime` kept unless the
//! status changes (so a reconcile that finds nothing new writes nothing new), and the
//! generation they describe.

use contextos_crds::conditions;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// A condition to set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Wanted {
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The kstatus conditions that go with a `Ready` condition: `Reconciling` while the object is on
/// its way, `Stalled` when it cannot get there without someone acting, both False once Ready.
pub fn kstatus_of(ready: &Wanted) -> [Wanted; 2] {
    let stalled = !ready.status && conditions::is_stalled(ready.reason);
    let reconciling = !ready.status && !stalled;
    [
        Wanted::new(
            conditions::RECONCILING,
            reconciling,
            ready.reason,
            ready.message.clone(),
        ),
        Wanted::new(conditions::STALLED, stalled, ready.reason, ready.message.clone()),
    ]
}

/// `previous` with every `wanted` condition set, for `generation`, at `now` where a status
/// changes. Conditions of other types are kept as they were. A `Ready` condition brings its
/// kstatus companions (`Reconciling`, `Stalled`) along.
pub fn merge(
    previous: &[Condition],
    wanted: &[Wanted],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut wanted = wanted.to_vec();
    if let Some(ready) = wanted.iter().find(|w| w.type_ == conditions::READY).cloned() {
        wanted.extend(kstatus_of(&ready));
    }
    let wanted = wanted.as_slice();
    let mut out: Vec<Condition> = previous
        .iter()
        .filter(|c| !wanted.iter().any(|w| w.type_ == c.type_))
        .cloned()
        .collect();
    for w in wanted {
        let status = if w.status { "True" } else { "False" };
        let last = previous.iter().find(|c| c.type_ == w.type_);
        let since = match last {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(now),
        };
        out.push(Condition {
            type_: w.type_.to_owned(),
            status: status.to_owned(),
            reason: w.reason.to_owned(),
            message: w.message.clone(),
            observed_generation: generation,
            last_transition_time: since,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let t1: Timestamp = "2026-01-02T00:00:00Z".parse().expect("time");
        let ready = |ok| vec![Wanted::new("Ready", ok, "R", "m")];
        let first = merge(&[], &ready(false), Some(1), t0);
        let same = merge(&first, &ready(false), Some(2), t1);
        assert_eq!(same[0].last_transition_time, Time(t0));
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(&same, &ready(true), Some(2), t1);
        assert_eq!(flipped[0].last_transition_time, Time(t1));
    }

    fn status_of(conditions: &[Condition], type_: &str) -> String {
        conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.clone())
            .unwrap_or_default()
    }

    #[test]
    fn ready_brings_reconciling_and_stalled_the_way_health_tools_read_them() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let cases = [
            (true, "Resolved", "False", "False"),
            (false, "ReferenceNotReady", "True", "False"),
            (false, "Running", "True", "False"),
            (false, "AwaitingApproval", "True", "False"),
            (false, "InvalidExpression", "False", "True"),
            (false, "RunFailed", "False", "True"),
        ];
        for (ready, reason, reconciling, stalled) in cases {
            let merged = merge(&[], &[Wanted::new("Ready", ready, reason, "m")], Some(1), t0);
            assert_eq!(status_of(&merged, "Reconciling"), reconciling, "{reason}");
            assert_eq!(status_of(&merged, "Stalled"), stalled, "{reason}");
        }
    }
}
