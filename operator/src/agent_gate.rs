//! Which promotion gate a change to what an Agent runs must pass (pure).
//!
//! An Agent's composition — its spec, its pack and its policies at their promoted revisions —
//! is promoted as one revision. A Policy's own gate covers edits of that Policy, but not
//! pointing the Agent at another Policy, dropping one, re-creating one (its first revision has
//! no gate history), or changing the Agent's tools and their risk. Those are candidates of the
//! Agent, gated by the Agent's `spec.promotion` or, without one, by the gates of the objects
//! it uses now or used in its promoted composition: a gate cannot be shed by moving away from
//! the object that carries it.

use contextos_crds::{
    agent::{AgentGateStatus, MemberGate},
    common::{Approvers, PromotedBy, PromotionMode, PromotionSpec, ReplaySelector},
};
use contextos_runner::run::{bundle::Composition, bundle::spec_digest, gate::GatedKind};

/// One object the candidate composition uses, as its status shows it now.
#[derive(Clone, Debug)]
pub struct Member<'a> {
    pub kind: GatedKind,
    pub name: &'a str,
    /// Its promoted revision (what the candidate composition holds).
    pub digest: &'a str,
    /// Its own promotion gate, if it has one.
    pub promotion: Option<&'a PromotionSpec>,
    /// How its promoted revision came to be in force.
    pub promoted_by: Option<PromotedBy>,
}

impl Member<'_> {
    fn label(&self) -> String {
        format!("{}/{}", self.kind.api_kind(), self.name)
    }
}

/// What the candidate composition needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Need {
    /// In force without a replay; the reason is shown in the `Promoted` condition.
    Direct(PromotedBy, &'static str),
    /// Replayed against the Agent's recorded sessions under this gate.
    Replay(PromotionSpec),
}

/// The gate for `candidate`, given the promoted composition (and the gates its objects had when
/// it was promoted), the Agent's own gate and the objects the candidate uses.
pub fn decide(
    agent: &str,
    own: Option<&PromotionSpec>,
    promoted: Option<(&Composition, &[MemberGate])>,
    candidate: &Composition,
    members: &[Member<'_>],
) -> Need {
    let Some(gate) = effective_gate(agent, own, promoted.map(|(_, g)| g).unwrap_or_default(), members) else {
        return Need::Direct(
            PromotedBy::Ungated,
            "no promotion gate on the Agent or anything it uses",
        );
    };
    let Some((promoted, _)) = promoted else {
        // A first composition may be an Agent deleted and created again: its recorded sessions
        // decide (no history promotes it).
        return Need::Replay(gate);
    };
    if changed_beyond_gated_members(promoted, candidate, members) {
        Need::Replay(gate)
    } else {
        Need::Direct(
            PromotedBy::Members,
            "every change was promoted through the changed object's own gate",
        )
    }
}

/// Whether anything changed other than members whose new revision passed their own gate.
fn changed_beyond_gated_members(
    promoted: &Composition,
    candidate: &Composition,
    members: &[Member<'_>],
) -> bool {
    if spec_digest(&promoted.agent_spec) != spec_digest(&candidate.agent_spec) {
        return true;
    }
    let names = |c: &Composition| {
        std::iter::once((GatedKind::ContextPack, c.context_pack.name.clone()))
            .chain(c.policies.iter().map(|p| (GatedKind::Policy, p.name.clone())))
            .collect::<Vec<_>>()
    };
    if names(promoted) != names(candidate) {
        return true;
    }
    let before = std::iter::once(spec_digest(&promoted.context_pack.spec))
        .chain(promoted.policies.iter().map(|p| spec_digest(&p.spec)));
    let after = std::iter::once(spec_digest(&candidate.context_pack.spec))
        .chain(candidate.policies.iter().map(|p| spec_digest(&p.spec)));
    before
        .zip(after)
        .zip(names(candidate))
        .any(|((old, new), (kind, name))| {
            old != new
                && !members.iter().any(|m| {
                    m.kind == kind
                        && m.name == name
                        && m.digest == new
                        && m.promoted_by.is_some_and(PromotedBy::gated)
                })
        })
}

/// The gates that apply: the Agent's own, else the strictest combination of those it inherits.
pub fn effective_gate(
    agent: &str,
    own: Option<&PromotionSpec>,
    promoted_gates: &[MemberGate],
    members: &[Member<'_>],
) -> Option<PromotionSpec> {
    let mut gate = match own {
        Some(own) => own.clone(),
        None => {
            let inherited = inherited(promoted_gates, members);
            let (first, rest) = inherited.split_first()?;
            let mut gate = first.1.clone();
            gate.replay.selector.match_labels.clear();
            for (_, other) in rest {
                gate.replay.max_divergence_percent = gate
                    .replay
                    .max_divergence_percent
                    .min(other.replay.max_divergence_percent);
                gate.replay.sample_size = gate.replay.sample_size.max(other.replay.sample_size);
                gate.replay.window_hours = gate.replay.window_hours.max(other.replay.window_hours);
                if other.mode == PromotionMode::Manual {
                    gate.mode = PromotionMode::Manual;
                }
                gate.approvers = union(gate.approvers.as_ref(), other.approvers.as_ref());
            }
            gate
        }
    };
    // The Agent's gate replays the Agent's sessions, whatever the inherited gate selected.
    gate.replay.selector = ReplaySelector {
        agents: vec![agent.to_owned()],
        match_labels: gate.replay.selector.match_labels,
    };
    Some(gate)
}

/// The gated objects of the candidate and of the promoted composition, labelled.
fn inherited(promoted_gates: &[MemberGate], members: &[Member<'_>]) -> Vec<(String, PromotionSpec)> {
    let mut out: Vec<(String, PromotionSpec)> = Vec::new();
    let now = members
        .iter()
        .filter_map(|m| m.promotion.map(|p| (m.label(), p.clone())));
    let before = promoted_gates
        .iter()
        .map(|g| (format!("{}/{}", g.kind, g.name), g.promotion.clone()));
    for (label, gate) in now.chain(before) {
        if !out.iter().any(|(l, g)| *l == label && *g == gate) {
            out.push((label, gate));
        }
    }
    out
}

/// What the Agent's status shows of its gate (admission reads `approvers`).
pub fn gate_status(
    own: Option<&PromotionSpec>,
    promoted_gates: &[MemberGate],
    members: &[Member<'_>],
) -> AgentGateStatus {
    match own {
        Some(own) => AgentGateStatus {
            from: vec!["Agent".into()],
            approvers: own.approvers.clone().filter(|a| !a.is_empty()),
        },
        None => {
            let inherited = inherited(promoted_gates, members);
            let mut from: Vec<String> = inherited.iter().map(|(l, _)| l.clone()).collect();
            from.dedup();
            let approvers = inherited
                .iter()
                .fold(None, |acc, (_, g)| union(acc.as_ref(), g.approvers.as_ref()));
            AgentGateStatus {
                from,
                approvers: approvers.filter(|a| !a.is_empty()),
            }
        }
    }
}

/// The gates of the candidate's objects, as the status keeps them once it is promoted.
pub fn member_gates(members: &[Member<'_>]) -> Vec<MemberGate> {
    members
        .iter()
        .filter_map(|m| {
            m.promotion.map(|p| MemberGate {
                kind: m.kind.api_kind().to_owned(),
                name: m.name.to_owned(),
                promotion: p.clone(),
            })
        })
        .collect()
}

fn union(a: Option<&Approvers>, b: Option<&Approvers>) -> Option<Approvers> {
    match (a, b) {
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => Some(x.clone()),
        (Some(a), Some(b)) => {
            let mut out = a.clone();
            for u in &b.users {
                if !out.users.contains(u) {
                    out.users.push(u.clone());
                }
            }
            for g in &b.groups {
                if !out.groups.contains(g) {
                    out.groups.push(g.clone());
                }
            }
            Some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use contextos_crds::{AgentSpec, ContextPackSpec, PolicySpec};
    use contextos_runner::{gateway::bundle::NamedPolicy, run::bundle::NamedPack};

    use super::*;

    fn agent_spec() -> AgentSpec {
        serde_json::from_value(serde_json::json!({
            "model": {"provider": "scripted", "model": "m"},
            "contextPackRef": {"name": "ops"},
            "policyRefs": [{"name": "guardrails"}],
            "sandboxProfileRef": {"name": "default"},
            "budget": {"maxSteps": 4, "maxToolCalls": 4, "maxTokens": 1000, "maxWallSeconds": 60},
        }))
        .expect("agent spec")
    }

    fn policy(name: &str, default: &str) -> NamedPolicy {
        NamedPolicy {
            name: name.into(),
            spec: serde_json::from_value::<PolicySpec>(serde_json::json!({"defaultEffect": default}))
                .expect("policy"),
        }
    }

    fn composition(policies: Vec<NamedPolicy>) -> Composition {
        let pack = NamedPack {
            name: "ops".into(),
            spec: serde_json::from_value::<ContextPackSpec>(
                serde_json::json!({"instructions": "help", "tokenBudget": 1000}),
            )
            .expect("pack"),
        };
        Composition::new(&agent_spec(), pack, policies)
    }

    fn gate(max: u32) -> PromotionSpec {
        let mut gate = PromotionSpec::default();
        gate.replay.max_divergence_percent = max;
        gate
    }

    fn member<'a>(
        name: &'a str,
        digest: &'a str,
        promotion: Option<&'a PromotionSpec>,
        by: PromotedBy,
    ) -> Member<'a> {
        Member {
            kind: GatedKind::Policy,
            name,
            digest,
            promotion,
            promoted_by: Some(by),
        }
    }

    fn guardrails_gate() -> Vec<MemberGate> {
        vec![MemberGate {
            kind: "Policy".into(),
            name: "guardrails".into(),
            promotion: gate(5),
        }]
    }

    #[test]
    fn nothing_gated_anywhere_is_promoted_directly() {
        let c = composition(vec![policy("guardrails", "deny")]);
        let d = spec_digest(&c.policies[0].spec);
        let members = [member("guardrails", &d, None, PromotedBy::Ungated)];
        assert_eq!(
            decide("ops", None, None, &c, &members),
            Need::Direct(
                PromotedBy::Ungated,
                "no promotion gate on the Agent or anything it uses"
            )
        );
    }

    #[test]
    fn pointing_at_an_ungated_policy_is_gated_by_the_one_it_replaces() {
        let before = composition(vec![policy("guardrails", "deny")]);
        let after = composition(vec![policy("guardrails-v2", "allow")]);
        let d = spec_digest(&after.policies[0].spec);
        let members = [member("guardrails-v2", &d, None, PromotedBy::FirstRevision)];
        let need = decide("ops", None, Some((&before, &guardrails_gate())), &after, &members);
        let Need::Replay(gate) = need else {
            panic!("expected a replay, got {need:?}");
        };
        assert_eq!(gate.replay.max_divergence_percent, 5);
        assert_eq!(gate.replay.selector.agents, vec!["ops".to_owned()]);
    }

    #[test]
    fn a_re_created_policy_is_gated_but_one_that_passed_its_own_gate_is_not() {
        let g = gate(0);
        let before = composition(vec![policy("guardrails", "deny")]);
        let after = composition(vec![policy("guardrails", "allow")]);
        let d = spec_digest(&after.policies[0].spec);
        let recreated = [member("guardrails", &d, Some(&g), PromotedBy::FirstRevision)];
        assert!(matches!(
            decide(
                "ops",
                None,
                Some((&before, &guardrails_gate())),
                &after,
                &recreated
            ),
            Need::Replay(_)
        ));
        let replayed = [member("guardrails", &d, Some(&g), PromotedBy::Replay)];
        assert_eq!(
            decide(
                "ops",
                None,
                Some((&before, &guardrails_gate())),
                &after,
                &replayed
            ),
            Need::Direct(
                PromotedBy::Members,
                "every change was promoted through the changed object's own gate"
            )
        );
    }

    #[test]
    fn an_agent_spec_change_or_a_first_composition_is_replayed_under_a_gate() {
        let g = gate(0);
        let before = composition(vec![policy("guardrails", "deny")]);
        let mut after = before.clone();
        after.agent_spec.budget.max_steps = 40;
        let d = spec_digest(&after.policies[0].spec);
        let members = [member("guardrails", &d, Some(&g), PromotedBy::Replay)];
        assert!(matches!(
            decide("ops", None, Some((&before, &guardrails_gate())), &after, &members),
            Need::Replay(_)
        ));
        assert!(matches!(
            decide("ops", None, None, &after, &members),
            Need::Replay(_)
        ));
    }

    #[test]
    fn inherited_gates_combine_to_the_strictest_and_every_approver() {
        let mut manual = gate(10);
        manual.mode = PromotionMode::Manual;
        manual.approvers = Some(Approvers {
            users: vec!["alice".into()],
            groups: vec![],
        });
        let mut other = gate(2);
        other.approvers = Some(Approvers {
            users: vec![],
            groups: vec!["sre".into()],
        });
        let members = [
            member("a", "sha256:a", Some(&manual), PromotedBy::Replay),
            member("b", "sha256:b", Some(&other), PromotedBy::Replay),
        ];
        let gate = effective_gate("ops", None, &[], &members).expect("a gate");
        assert_eq!(gate.mode, PromotionMode::Manual);
        assert_eq!(gate.replay.max_divergence_percent, 2);
        let status = gate_status(None, &[], &members);
        assert_eq!(status.from, vec!["Policy/a".to_owned(), "Policy/b".to_owned()]);
        let approvers = status.approvers.expect("approvers");
        assert_eq!(approvers.users, vec!["alice".to_owned()]);
        assert_eq!(approvers.groups, vec!["sre".to_owned()]);
    }

    #[test]
    fn the_agents_own_gate_wins_and_is_not_part_of_what_runs() {
        let own = gate(1);
        let mut spec = agent_spec();
        spec.promotion = Some(own.clone());
        let c = Composition::new(&spec, composition(vec![]).context_pack, vec![]);
        assert!(c.agent_spec.promotion.is_none());
        assert_eq!(c.digest(), composition(vec![]).digest());
        let gate = effective_gate("ops", Some(&own), &guardrails_gate(), &[]).expect("a gate");
        assert_eq!(gate.replay.max_divergence_percent, 1);
        assert_eq!(
            gate_status(Some(&own), &guardrails_gate(), &[]).from,
            vec!["Agent".to_owned()]
        );
    }
}
