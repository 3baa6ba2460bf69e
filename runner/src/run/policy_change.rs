//! What a candidate that changes only Policies can change in a run, and which runs a replay
//! gate judges it on.
//!
//! A Policy decides each call from the rules that match the call's tool (by name, risk and
//! kind), the policy's default effect, its mode and its budget. If none of these changed for
//! any tool a run called, the run is decided exactly as recorded: it says nothing of the
//! change, and in a gate's sample it would only take the place of a run that does, and dilute
//! the divergence the change shows. Whoever can start Sessions could otherwise fill the sample
//! with runs that call harmless tools just before a loosened Policy is gated, and it would
//! pass. So a Policy gate judges the runs that call a tool the change decides, and fails when a
//! tool the change may open more widely is called by none of them: replay has then seen nothing
//! of what matters most.
//!
//! Everything here is pure: the replay reads the runs and their pinned policies, this module
//! says what the change reaches ([`PolicyChange`]) and which runs make the sample
//! ([`choose`]).

use std::collections::{BTreeMap, BTreeSet};

use contextos_crds::{
    common::{ToolKind, ToolRisk},
    policy::{PolicyEffect, PolicyMode, PolicyRule, PolicySpec, ToolCallBudget},
};

use crate::{
    gateway::bundle::NamedPolicy,
    policy::{compile::compile_policy, decide::BUDGET_LIMITS},
};

/// How a change reaches the calls of one tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    /// Calls are decided at least as strictly as before: only deny rules were added, rules or a
    /// default made to deny, a budget lowered, a dryRun policy changed, or a policy that asks
    /// for no approval added or made to enforce.
    Tightens,
    /// Some call may be decided more leniently (or the change cannot be read as tightening).
    MayLoosen,
}

/// A tool as policies match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolShape {
    pub name: String,
    pub risk: ToolRisk,
    pub kind: ToolKind,
}

/// What a Policy-only candidate changes against the policies one run pinned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyChange {
    /// The Agent's tools whose decisions the change reaches. (A call of a tool the Agent does
    /// not declare is refused before any Policy is read.)
    tools: BTreeMap<String, Reach>,
    /// A budget changed: it counts every call, so every call is reached.
    budget: Option<Reach>,
    /// The budget limits raised or removed, as a refusal by them is recorded
    /// (`<policy>/budget.<limit>`): only a run one of them refused shows the change.
    loosened_limits: BTreeSet<String>,
}

impl PolicyChange {
    /// What replacing `pinned` by `candidate` (policies matched by name; one absent from
    /// either side was added or removed) changes for the Agent's `tools`.
    pub fn between(pinned: &[NamedPolicy], candidate: &[NamedPolicy], tools: &[ToolShape]) -> Self {
        let mut change = Self::default();
        // What every decision's variables are built from, over the policies that changed (the
        // others are the same on both sides; one of them may read the same, so a difference
        // here may be none over all, which only errs towards judging more).
        let (mut reads_before, mut reads_after) = ((0u8, false), (0u8, false));
        let names: BTreeSet<&str> = pinned.iter().chain(candidate).map(|p| p.name.as_str()).collect();
        let find = |list: &'_ [NamedPolicy], name: &str| {
            list.iter().find(|p| p.name == name).map(|p| p.spec.clone())
        };
        for name in names {
            let (old, new) = (find(pinned, name), find(candidate, name));
            if old == new {
                continue;
            }
            let (old, new) = (Shape::of(name, old.as_ref()), Shape::of(name, new.as_ref()));
            let (changed, loosened) = budget_change(&old, &new);
            if changed {
                let reach = if loosened.is_empty() {
                    Reach::Tightens
                } else {
                    Reach::MayLoosen
                };
                change.budget = change.budget.max(Some(reach));
            }
            change
                .loosened_limits
                .extend(loosened.into_iter().map(|limit| format!("{name}/budget.{limit}")));
            for (reads, shape) in [(&mut reads_before, &old), (&mut reads_after, &new)] {
                let (variables, loops) = shape.reads();
                *reads = (reads.0 | variables, reads.1 || loops);
            }
            for tool in tools {
                if let Some(reach) = old.reach_to(&new, &tool.name, tool.risk, tool.kind) {
                    change.reach(&tool.name, reach);
                }
            }
        }
        // Conditions of every policy share what a decision reads: which variables are built
        // (whether a call's entities are found at all) and whether their size is measured for
        // a looping condition's bound. A change to that, even by a rule no call reaches, may
        // decide any call differently.
        if reads_before != reads_after {
            for tool in tools {
                change.reach(&tool.name, Reach::MayLoosen);
            }
        }
        change
    }

    fn reach(&mut self, tool: &str, reach: Reach) {
        let entry = self.tools.entry(tool.to_owned()).or_insert(reach);
        *entry = (*entry).max(reach);
    }

    /// Whether the change can decide a call of the Agent's tool `tool` differently.
    pub fn reaches(&self, tool: &str) -> bool {
        self.budget.is_some() || self.tools.contains_key(tool)
    }

    /// Whether the change decides no call differently (it changed only what decides nothing,
    /// such as a rule's reason or the promotion settings).
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty() && self.budget.is_none()
    }

    /// Whether the change may decide some call of the Agent's tool `tool` more leniently.
    pub fn loosens(&self, tool: &str) -> bool {
        self.tools.get(tool) == Some(&Reach::MayLoosen)
    }

    /// The Agent's tools some call of which the change may decide more leniently.
    pub fn may_loosen(&self) -> BTreeSet<&str> {
        self.tools
            .iter()
            .filter(|(_, reach)| **reach == Reach::MayLoosen)
            .map(|(tool, _)| tool.as_str())
            .collect()
    }

    /// Whether a budget limit was raised or removed (every call may then be allowed more often).
    pub fn loosens_a_budget(&self) -> bool {
        !self.loosened_limits.is_empty()
    }

    /// Whether `rule`, as a recorded decision names it, is a budget limit the change raised
    /// or removed.
    pub fn loosens_limit(&self, rule: &str) -> bool {
        self.loosened_limits.contains(rule)
    }
}

/// One policy as it decides: what a change to it is compared by. `None` for a side where the
/// policy is absent.
struct Shape {
    policy: Option<Decides>,
}

struct Decides {
    mode: PolicyMode,
    default_effect: PolicyEffect,
    budget: Option<ToolCallBudget>,
    rules: Vec<Matching>,
    /// The variables its conditions read, and whether one loops (all, and yes, if it does not
    /// compile).
    reads: (u8, bool),
}

/// A rule as it decides a call it matches: its name, condition, effect and approvers (its
/// reason decides nothing; its match is `matcher`, which says whether it applies to a tool —
/// `None` when the policy does not compile: it is then taken to apply to every tool).
struct Matching {
    rule: PolicyRule,
    matcher: Option<crate::policy::compile::CompiledRule>,
}

impl Shape {
    fn of(name: &str, spec: Option<&PolicySpec>) -> Self {
        let policy = spec.map(|spec| {
            let compiled = compile_policy(name, spec).ok();
            let reads = compiled
                .as_ref()
                .map_or((u8::MAX, true), |c| (c.condition_variables, c.condition_loops));
            let mut matchers = compiled.map(|c| c.rules.into_iter().map(Some).collect::<Vec<_>>());
            let rules = spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, rule)| Matching {
                    rule: PolicyRule {
                        reason: String::new(),
                        match_: Default::default(),
                        ..rule.clone()
                    },
                    matcher: matchers
                        .as_mut()
                        .and_then(|m| m.get_mut(i).and_then(Option::take)),
                })
                .collect();
            Decides {
                mode: spec.mode,
                default_effect: spec.default_effect,
                budget: spec.budget.clone(),
                rules,
                reads,
            }
        });
        Self { policy }
    }

    /// What its conditions read (see [`Decides::reads`]); nothing if it is absent.
    fn reads(&self) -> (u8, bool) {
        self.policy.as_ref().map_or((0, false), |p| p.reads)
    }

    /// How replacing this policy by `new` reaches calls of a tool (`None`: not at all; its
    /// budget is compared by [`budget_reach`]).
    fn reach_to(&self, new: &Shape, tool: &str, risk: ToolRisk, kind: ToolKind) -> Option<Reach> {
        match (&self.policy, &new.policy) {
            (None, None) => None,
            (Some(old), None) => Some(match old.mode {
                PolicyMode::DryRun => Reach::Tightens,
                PolicyMode::Enforce => Reach::MayLoosen,
            }),
            (None, Some(new)) => Some(enforcing_another(new.mode, &new.path(tool, risk, kind))),
            (Some(old), Some(new)) => {
                let (before, after) = (old.path(tool, risk, kind), new.path(tool, risk, kind));
                if old.mode == new.mode && before == after {
                    return None;
                }
                Some(match (old.mode, new.mode) {
                    // A dryRun policy decides nothing that is applied.
                    (PolicyMode::DryRun, PolicyMode::DryRun) => Reach::Tightens,
                    (PolicyMode::DryRun, PolicyMode::Enforce) => enforcing_another(new.mode, &after),
                    (PolicyMode::Enforce, PolicyMode::DryRun) => Reach::MayLoosen,
                    (PolicyMode::Enforce, PolicyMode::Enforce) => {
                        if only_tightened(&before, &after) {
                            Reach::Tightens
                        } else {
                            Reach::MayLoosen
                        }
                    }
                })
            }
        }
    }
}

/// How a policy that begins to decide a tool's calls (added, or made to enforce) reaches them.
/// The strictest enforcing verdict applies, so its denials and allowances cannot loosen; but
/// of two policies that ask for approval the first in the Agent's order names the approvers,
/// so one that asks may hand the approval to others.
fn enforcing_another(mode: PolicyMode, path: &Path<'_>) -> Reach {
    let asks = path
        .rules
        .iter()
        .any(|r| r.effect == PolicyEffect::RequireApproval)
        || path.default == Some(PolicyEffect::RequireApproval);
    if mode == PolicyMode::Enforce && asks {
        Reach::MayLoosen
    } else {
        Reach::Tightens
    }
}

/// How one policy decides calls of one tool: the rules that can decide them, in order, up to
/// the first that matches without a condition (the rules after it are never read), and the
/// default effect if no rule does.
#[derive(Debug, PartialEq)]
struct Path<'a> {
    rules: Vec<&'a PolicyRule>,
    default: Option<PolicyEffect>,
}

impl Decides {
    /// The [`Path`] of a tool's calls (every rule taken to match if the policy does not
    /// compile).
    fn path(&self, tool: &str, risk: ToolRisk, kind: ToolKind) -> Path<'_> {
        let mut rules = Vec::new();
        for matching in &self.rules {
            if matching
                .matcher
                .as_ref()
                .is_none_or(|c| c.matches(tool, risk, kind))
            {
                rules.push(&matching.rule);
                if matching.rule.condition.is_none() {
                    return Path { rules, default: None };
                }
            }
        }
        Path {
            rules,
            default: Some(self.default_effect),
        }
    }
}

/// Whether `after` decides every call at least as strictly as `before`, read as `before` with
/// deny rules inserted and rules made to deny in place: a call an added deny matches first is
/// denied, and any other is decided by the same rule as before (the rules ahead of it match
/// the same calls) or the same default, now at least as strictly. Anything else — a rule made
/// to ask where it allowed included, since the approvers may then be others — may loosen.
fn only_tightened(before: &Path<'_>, after: &Path<'_>) -> bool {
    let mut kept = before.rules.iter().peekable();
    for rule in &after.rules {
        if kept.peek().is_some_and(|old| at_least_as_strict(old, rule)) {
            kept.next();
        } else if rule.effect != PolicyEffect::Deny {
            return false;
        } else if rule.condition.is_none() {
            // An added deny every call reaching it matches: what follows is never read.
            return true;
        }
    }
    kept.next().is_none()
        && match (before.default, after.default) {
            (Some(old), Some(new)) => old == new || new == PolicyEffect::Deny,
            // Both end at the same rule without a condition.
            (None, None) => true,
            _ => false,
        }
}

/// Whether `new` is `old` (both matching the tool) deciding its calls at least as strictly: the
/// same name and condition, and the same effect and approvers, or a deny.
fn at_least_as_strict(old: &PolicyRule, new: &PolicyRule) -> bool {
    old.name == new.name && old.condition == new.condition && (old == new || new.effect == PolicyEffect::Deny)
}

/// Whether a policy's enforced budget changed, and which of its limits were raised or removed
/// (no limit is the loosest; a budget that is not enforced limits nothing).
fn budget_change(old: &Shape, new: &Shape) -> (bool, Vec<&'static str>) {
    let limits = |shape: &Shape| -> [Option<u32>; 3] {
        match shape.policy.as_ref() {
            Some(p) if p.mode == PolicyMode::Enforce => {
                let b = p.budget.clone().unwrap_or_default();
                [b.max_calls, b.max_calls_per_tool, b.max_destructive_calls]
            }
            _ => [None; 3],
        }
    };
    let (before, after) = (limits(old), limits(new));
    let loosened = BUDGET_LIMITS
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (old, new))| match (old, new) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(o), Some(n)) => n > o,
        })
        .map(|(name, _)| *name)
        .collect();
    (before != after, loosened)
}

/// A run a Policy gate could judge: the tools it called, and what the change reaches in it.
#[derive(Clone, Debug)]
pub struct Exercise<R> {
    pub run: R,
    /// The Agent's tools its recorded calls named.
    pub called: BTreeSet<String>,
    /// Whether a budget limit the change raises or removed refused one of its calls (only
    /// such a run shows it).
    pub hit_budget: bool,
    pub change: std::sync::Arc<PolicyChange>,
}

impl<R> Exercise<R> {
    /// Whether the change can decide one of its calls differently.
    pub fn exercises(&self) -> bool {
        self.called.iter().any(|tool| self.change.reaches(tool))
    }

    fn calls_loosened(&self, tool: &str) -> bool {
        self.called.contains(tool) && self.change.loosens(tool)
    }
}

/// The runs a Policy gate judges, and what it could not see.
#[derive(Debug)]
pub struct Choice<R> {
    /// At most `wanted` runs, newest first.
    pub judged: Vec<R>,
    /// Runs that call no tool the change reaches (and made some call).
    pub unexercised: usize,
    /// Tools the change may loosen that no judged run calls, and whether some run read did.
    pub unseen: Vec<(String, bool)>,
    /// A budget limit was raised and no judged run ran into one it raises; `Some(true)` if a
    /// run read did.
    pub budget_unseen: Option<bool>,
    /// The change decides no call of any run read differently: the newest runs were taken.
    pub decides_nothing: bool,
}

/// Chooses the sample of a Policy gate from `runs` (newest first): only runs that call a tool
/// the change reaches — first runs that show what the change may loosen (a loosened tool
/// called, a raised budget limit run into), each time the one showing most of what is not yet
/// shown — then the newest others, at most `wanted`. Each run is read against the policies it pinned, so what the change may
/// loosen is the union over them (runs of several Agents, or of several revisions). A change
/// that decides nothing differently for any run (a rule's reason edited) is judged on the
/// newest runs, as any other candidate is: there is nothing to prefer, and nothing to miss.
pub fn choose<R>(runs: Vec<Exercise<R>>, wanted: usize) -> Choice<R> {
    if runs.iter().all(|r| r.change.is_empty()) {
        let decides_nothing = !runs.is_empty();
        return Choice {
            judged: runs.into_iter().take(wanted).map(|r| r.run).collect(),
            unexercised: 0,
            unseen: Vec::new(),
            budget_unseen: None,
            decides_nothing,
        };
    }
    let loosened: BTreeSet<String> = runs
        .iter()
        .flat_map(|r| r.change.may_loosen())
        .map(str::to_owned)
        .collect();
    let budget_loosened = runs.iter().any(|r| r.change.loosens_a_budget());
    let total = runs.len();
    let exercising: Vec<Exercise<R>> = runs.into_iter().filter(Exercise::exercises).collect();
    let unexercised = total - exercising.len();
    let mut take = vec![false; exercising.len()];
    let mut places = wanted;
    // What the sample must show: each loosened tool called, a raised budget run into. Runs are
    // taken while places last, each time the one showing most of what no run taken shows yet
    // (the newest of those), so a run calling several loosened tools saves places.
    let mut wants: Vec<Option<&str>> = loosened.iter().map(|t| Some(t.as_str())).collect();
    // (`None`: a raised budget limit run into.)
    if budget_loosened {
        wants.push(None);
    }
    // Per run, which of `wants` it shows (read once: a gate may hold thousands of runs).
    let shown: Vec<Vec<usize>> = exercising
        .iter()
        .map(|run| {
            (0..wants.len())
                .filter(|w| match wants[*w] {
                    Some(tool) => run.calls_loosened(tool),
                    None => run.hit_budget,
                })
                .collect()
        })
        .collect();
    let mut covered = vec![false; wants.len()];
    while places > 0 {
        let best = shown
            .iter()
            .enumerate()
            .filter(|(i, _)| !take[*i])
            .map(|(i, shows)| (shows.iter().filter(|w| !covered[**w]).count(), i))
            .filter(|(count, _)| *count > 0)
            .max_by_key(|(count, i)| (*count, std::cmp::Reverse(*i)));
        let Some((_, i)) = best else {
            break;
        };
        take[i] = true;
        places -= 1;
        for w in &shown[i] {
            covered[*w] = true;
        }
    }
    for flag in take.iter_mut() {
        if places == 0 {
            break;
        }
        if !*flag {
            *flag = true;
            places -= 1;
        }
    }
    let judged: Vec<&Exercise<R>> = exercising
        .iter()
        .zip(&take)
        .filter(|(_, t)| **t)
        .map(|(r, _)| r)
        .collect();
    let unseen = loosened
        .iter()
        .filter(|tool| !judged.iter().any(|r| r.calls_loosened(tool)))
        .map(|tool| (tool.clone(), exercising.iter().any(|r| r.calls_loosened(tool))))
        .collect();
    let budget_unseen = (budget_loosened && !judged.iter().any(|r| r.hit_budget))
        .then(|| exercising.iter().any(|r| r.hit_budget));
    Choice {
        judged: exercising
            .into_iter()
            .zip(take)
            .filter_map(|(r, t)| t.then_some(r.run))
            .collect(),
        unexercised,
        unseen,
        budget_unseen,
        decides_nothing: false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use contextos_crds::policy::RuleMatch;

    use super::*;

    fn rule(name: &str, tools: &[&str], effect: PolicyEffect) -> PolicyRule {
        PolicyRule {
            name: name.into(),
            match_: RuleMatch {
                tools: tools.iter().map(|t| (*t).to_owned()).collect(),
                ..RuleMatch::default()
            },
            condition: None,
            effect,
            reason: format!("{name} exists"),
            approvers: None,
        }
    }

    fn policy(rules: Vec<PolicyRule>) -> NamedPolicy {
        NamedPolicy {
            name: "guardrails".into(),
            spec: PolicySpec {
                rules,
                default_effect: PolicyEffect::Deny,
                mode: PolicyMode::Enforce,
                budget: None,
                promotion: None,
            },
        }
    }

    fn tools() -> Vec<ToolShape> {
        [
            ("search", ToolRisk::ReadOnly, ToolKind::Observe),
            ("delete_namespace", ToolRisk::Destructive, ToolKind::Act),
            ("restart", ToolRisk::Destructive, ToolKind::Act),
            ("post_update", ToolRisk::Network, ToolKind::Act),
        ]
        .into_iter()
        .map(|(name, risk, kind)| ToolShape {
            name: name.into(),
            risk,
            kind,
        })
        .collect()
    }

    fn base() -> Vec<PolicyRule> {
        vec![
            rule("no-deletion", &["delete_*"], PolicyEffect::Deny),
            rule("reads", &["search"], PolicyEffect::Allow),
            rule("restarts", &["restart"], PolicyEffect::RequireApproval),
        ]
    }

    fn changed(after: Vec<PolicyRule>) -> PolicyChange {
        PolicyChange::between(&[policy(base())], &[policy(after)], &tools())
    }

    #[test]
    fn a_loosened_rule_reaches_only_the_tools_it_matches_and_may_loosen_them() {
        let mut after = base();
        after[0].effect = PolicyEffect::Allow;
        let change = changed(after);
        assert!(change.reaches("delete_namespace"));
        assert!(!change.reaches("search") && !change.reaches("restart"));
        assert_eq!(change.may_loosen(), BTreeSet::from(["delete_namespace"]));
    }

    #[test]
    fn added_denies_and_a_stricter_budget_only_tighten() {
        let mut after = base();
        after.insert(1, rule("no-restarts-on-friday", &["restart"], PolicyEffect::Deny));
        let change = changed(after);
        assert!(change.reaches("restart"));
        assert!(change.may_loosen().is_empty(), "{change:?}");

        // A rule made stricter in place tightens; made more lenient, it does not.
        let mut after = base();
        after[1].effect = PolicyEffect::Deny;
        after[2].effect = PolicyEffect::Deny;
        assert!(changed(after).may_loosen().is_empty());
        let mut after = base();
        after[2].effect = PolicyEffect::Allow;
        assert_eq!(changed(after).may_loosen(), BTreeSet::from(["restart"]));
        let mut after = base();
        after[1].match_.tools.push("restart".into());
        assert_eq!(changed(after).may_loosen(), BTreeSet::from(["restart"]));

        // An added rule that asks is not a tightening: it can come before a deny.
        let mut after = base();
        after.insert(0, rule("ask-first", &["delete_*"], PolicyEffect::RequireApproval));
        assert_eq!(changed(after).may_loosen(), BTreeSet::from(["delete_namespace"]));

        // A rule removed may loosen; so does a lenient default.
        let mut after = base();
        after.remove(2);
        assert_eq!(changed(after).may_loosen(), BTreeSet::from(["restart"]));
        let mut lenient = policy(base());
        lenient.spec.default_effect = PolicyEffect::Allow;
        let change = PolicyChange::between(&[policy(base())], &[lenient], &tools());
        assert_eq!(
            change.may_loosen(),
            BTreeSet::from(["post_update"]),
            "only it reaches the default"
        );

        let mut limited = policy(base());
        limited.spec.budget = Some(ToolCallBudget {
            max_calls: Some(10),
            ..ToolCallBudget::default()
        });
        let mut tighter = limited.clone();
        tighter.spec.budget = Some(ToolCallBudget {
            max_calls: Some(5),
            ..ToolCallBudget::default()
        });
        let change = PolicyChange::between(std::slice::from_ref(&limited), &[tighter], &tools());
        assert!(change.reaches("search") && !change.loosens_a_budget());
        let change = PolicyChange::between(&[limited], &[policy(base())], &tools());
        assert!(change.loosens_a_budget(), "a limit removed: {change:?}");
    }

    #[test]
    fn what_decides_nothing_reaches_nothing() {
        let mut after = base();
        after[1].reason = "reads are safe".into();
        assert!(changed(after).is_empty());
        let mut promoted = policy(base());
        promoted.spec.promotion = Some(Default::default());
        assert!(PolicyChange::between(&[policy(base())], &[promoted], &tools()).is_empty());
    }

    #[test]
    fn what_a_rule_without_condition_shadows_is_not_reached() {
        let destructive = |approvers: &str| PolicyRule {
            match_: RuleMatch {
                risks: vec![ToolRisk::Destructive],
                ..RuleMatch::default()
            },
            approvers: Some(contextos_crds::common::Approvers {
                groups: vec![approvers.into()],
                ..Default::default()
            }),
            ..rule("destructive", &[], PolicyEffect::RequireApproval)
        };
        let before = policy(vec![
            rule("no-deletion", &["delete_*"], PolicyEffect::Deny),
            destructive("sre"),
        ]);
        let after = policy(vec![
            rule("no-deletion", &["delete_*"], PolicyEffect::Deny),
            destructive("interns"),
        ]);
        let change = PolicyChange::between(&[before], &[after], &tools());
        assert_eq!(change.may_loosen(), BTreeSet::from(["restart"]), "{change:?}");
    }

    #[test]
    fn asking_where_it_allowed_may_hand_the_approval_to_others() {
        let mut after = base();
        after[1].effect = PolicyEffect::RequireApproval;
        assert_eq!(changed(after).may_loosen(), BTreeSet::from(["search"]));
        // Another enforcing policy that asks, too; one that only denies tightens.
        let mut asking = policy(vec![rule("ask", &["search"], PolicyEffect::RequireApproval)]);
        asking.name = "second".into();
        let change = PolicyChange::between(&[policy(base())], &[policy(base()), asking.clone()], &tools());
        assert!(change.may_loosen().contains("search"), "{change:?}");
        asking.spec.rules[0].effect = PolicyEffect::Deny;
        asking.spec.default_effect = PolicyEffect::Allow;
        let change = PolicyChange::between(&[policy(base())], &[policy(base()), asking], &tools());
        assert!(
            change.reaches("search") && change.may_loosen().is_empty(),
            "{change:?}"
        );
    }

    #[test]
    fn a_dry_run_policy_tightens_and_giving_up_enforcement_may_loosen() {
        let mut dry = policy(base());
        dry.spec.mode = PolicyMode::DryRun;
        let enforcing = PolicyChange::between(std::slice::from_ref(&dry), &[policy(base())], &tools());
        // Enforced, its denials and allowances cannot loosen; its approvals may name others.
        assert!(enforcing.reaches("search"));
        assert_eq!(enforcing.may_loosen(), BTreeSet::from(["restart"]));
        let dropped = PolicyChange::between(&[policy(base())], &[dry], &tools());
        assert_eq!(dropped.may_loosen().len(), 4);
    }

    fn exercise(id: &str, called: &[&str], change: &Arc<PolicyChange>) -> Exercise<String> {
        Exercise {
            run: id.into(),
            called: called.iter().map(|t| (*t).to_owned()).collect(),
            hit_budget: false,
            change: change.clone(),
        }
    }

    #[test]
    fn runs_that_call_harmless_tools_take_no_place_and_a_loosened_tool_is_judged() {
        let mut after = base();
        after[0].effect = PolicyEffect::Allow;
        after[2].effect = PolicyEffect::Allow;
        let change = Arc::new(changed(after));
        // Newest first: a crowd of reads, then restarts, then the one run that deleted.
        let mut runs: Vec<_> = (0..5)
            .map(|i| exercise(&format!("read-{i}"), &["search"], &change))
            .collect();
        runs.extend((0..3).map(|i| exercise(&format!("restart-{i}"), &["search", "restart"], &change)));
        runs.push(exercise("deleted", &["delete_namespace"], &change));
        let choice = choose(runs, 2);
        assert_eq!(choice.judged, ["restart-0", "deleted"]);
        assert_eq!(choice.unexercised, 5);
        assert!(choice.unseen.is_empty() && choice.budget_unseen.is_none());
    }

    #[test]
    fn what_runs_of_other_agents_pinned_counts_and_a_raised_budget_wants_a_run_it_refused() {
        let mut after = base();
        after[0].effect = PolicyEffect::Allow;
        let deleting = Arc::new(changed(after));
        let nothing = Arc::new(changed(base()));
        // The newest run is another Agent's, which the change does not reach.
        let runs = vec![
            exercise("other-agent", &["search"], &nothing),
            exercise("deleted", &["delete_namespace"], &deleting),
        ];
        let choice = choose(runs, 1);
        assert_eq!(choice.judged, ["deleted"]);

        let mut limited = policy(base());
        limited.spec.budget = Some(ToolCallBudget {
            max_destructive_calls: Some(1),
            ..ToolCallBudget::default()
        });
        let mut raised = limited.clone();
        raised.spec.budget = Some(ToolCallBudget {
            max_destructive_calls: Some(50),
            ..ToolCallBudget::default()
        });
        let change = Arc::new(PolicyChange::between(&[limited], &[raised], &tools()));
        assert!(change.loosens_limit("guardrails/budget.maxDestructiveCalls"));
        assert!(!change.loosens_limit("guardrails/budget.maxCalls"));
        let mut refused = exercise("refused", &["restart"], &change);
        refused.hit_budget = true;
        let runs = vec![
            exercise("read-0", &["search"], &change),
            exercise("read-1", &["search"], &change),
            refused,
        ];
        let choice = choose(runs, 2);
        assert_eq!(choice.judged, ["read-0", "refused"]);
        assert_eq!(choice.budget_unseen, None);
        let runs = vec![exercise("read-0", &["search"], &change)];
        assert_eq!(choose(runs, 2).budget_unseen, Some(false));
    }

    #[test]
    fn one_run_showing_several_loosened_tools_saves_places() {
        let mut after = base();
        after[0].effect = PolicyEffect::Allow;
        after[2].effect = PolicyEffect::Allow;
        let change = Arc::new(changed(after));
        let runs = vec![
            exercise("deleted", &["delete_namespace"], &change),
            exercise("both", &["delete_namespace", "restart"], &change),
        ];
        let choice = choose(runs, 1);
        assert_eq!(choice.judged, ["both"]);
        assert!(choice.unseen.is_empty(), "{:?}", choice.unseen);
    }

    #[test]
    fn a_rule_no_call_reaches_that_changes_what_decisions_read_reaches_every_tool() {
        let mut hidden = base();
        hidden.push(PolicyRule {
            condition: Some("run.toolCalls > 3".into()),
            ..rule("late", &["search"], PolicyEffect::Deny)
        });
        // `reads` decides every call of search first: `late` is never read, yet a policy that
        // reads `run` has every decision build it (and measure it for a looping condition).
        let change = PolicyChange::between(&[policy(hidden)], &[policy(base())], &tools());
        assert_eq!(change.may_loosen().len(), 4, "{change:?}");
    }

    #[test]
    fn a_change_that_decides_nothing_is_judged_on_the_newest_runs() {
        let mut after = base();
        after[0].reason = "never".into();
        let change = Arc::new(changed(after));
        let runs = vec![
            exercise("read-0", &["search"], &change),
            exercise("read-1", &["search"], &change),
            exercise("deleted", &["delete_namespace"], &change),
        ];
        let choice = choose(runs, 2);
        assert_eq!(choice.judged, ["read-0", "read-1"]);
        assert_eq!(choice.unexercised, 0);
    }

    #[test]
    fn a_loosened_tool_no_run_calls_is_reported_unseen() {
        let mut after = base();
        after[0].effect = PolicyEffect::Allow;
        after[2].effect = PolicyEffect::Allow;
        let change = Arc::new(changed(after));
        let runs = vec![
            exercise("restart-0", &["restart"], &change),
            exercise("restart-1", &["restart"], &change),
        ];
        let choice = choose(runs, 5);
        assert_eq!(choice.judged, ["restart-0", "restart-1"]);
        assert_eq!(choice.unseen, [("delete_namespace".to_owned(), false)]);

        // Seen in a run read, but the sample had no place left for it.
        let runs = vec![
            exercise("restart-0", &["restart"], &change),
            exercise("deleted", &["delete_namespace"], &change),
        ];
        let choice = choose(runs, 0);
        assert!(choice.judged.is_empty());
        assert_eq!(
            choice.unseen,
            [
                ("delete_namespace".to_owned(), true),
                ("restart".to_owned(), true)
            ]
        );
    }
}
