//! Which promotion gate a change to what an Agent runs must pass (pure).
//!
//! An Agent's composition — its spec, its pack and its policies at their promoted revisions —
//! is promoted as one revision. A Policy's own gate covers edits of that Policy, but not
//! pointing the Agent at another Policy, dropping one, re-creating one (its first revision has
//! no gate history), or changing the Agent's tools and their risk. Those are candidates of the
//! Agent, gated by the strictest combination of the Agent's own `spec.promotion` and the gates
//! of every object its promoted compositions used (`status.promotedGates`, which only grows
//! unless an approver promotes past it): a gate cannot be shed by moving away from the object
//! that carries it, nor out-voted by a laxer gate of one's own.
//!
//! A member's new revision needs no second replay only if its own gate (or an accepted
//! Proposal's replay) replayed it against the very revision the Agent runs, and that gate is at
//! least as strict as the Agent's and covers this Agent's sessions. Approvers come only from
//! gates in force, never from the candidate.

use contextos_crds::{
    agent::{AgentGateStatus, MemberGate},
    common::{Approvers, PromotedBy, PromotionMode, PromotionSpec, ReexecuteSpec, ReplaySelector},
};
use contextos_runner::run::{
    bundle::Composition,
    bundle::spec_digest,
    gate::{GatedKind, reexecution_of},
};

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
    /// The revision that was in force before it (what its gate compared against).
    pub promoted_from: Option<&'a str>,
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

/// The promoted composition, if its snapshot could be read, and the gates in force.
#[derive(Clone, Copy, Debug, Default)]
pub struct InForce<'a> {
    /// `None` for a first composition, or when the promoted snapshot cannot be read.
    pub composition: Option<&'a Composition>,
    pub gates: &'a [MemberGate],
}

/// The gate for `candidate`.
pub fn decide(
    agent: &str,
    own: Option<&PromotionSpec>,
    in_force: InForce<'_>,
    candidate: &Composition,
    members: &[Member<'_>],
) -> Need {
    let gate = effective_gate(agent, own, in_force.gates, members);
    let Some(promoted) = in_force.composition else {
        // A first composition may be an Agent deleted and created again — its status, and the
        // gates in force there, gone with it: its recorded sessions decide, under the strictest
        // default, tightened by any gate it has now but never loosened by one (a gate of its
        // own written with the new spec would otherwise be all that judged it). No history
        // promotes it. So does one whose promoted snapshot is gone: there is nothing to compare
        // it with.
        return Need::Replay(at_least_default(agent, gate));
    };
    let Some(gate) = gate else {
        return Need::Direct(
            PromotedBy::Ungated,
            "no promotion gate on the Agent or anything it uses or used",
        );
    };
    if changed_beyond_gated_members(agent, &gate, promoted, candidate, members) {
        Need::Replay(gate)
    } else {
        Need::Direct(
            PromotedBy::Members,
            "every change was replayed by the changed object's own gate against the revision this Agent ran",
        )
    }
}

/// The entity types an Ontology declares and how their ids look: all of it a run reads.
fn what_it_finds(ontology: Option<&contextos_crds::OntologySpec>) -> Vec<(&str, Option<&str>)> {
    ontology
        .map(|o| {
            o.entity_types
                .iter()
                .map(|t| (t.name.as_str(), t.id_pattern.as_deref()))
                .collect()
        })
        .unwrap_or_default()
}

/// The replay a change of the Agent's own spec passes (a Proposal's, say): its effective gate,
/// or the strictest default where no gate applies.
pub fn replay_gate(
    agent: &str,
    own: Option<&PromotionSpec>,
    gates_in_force: &[MemberGate],
    members: &[Member<'_>],
) -> PromotionSpec {
    let gate = effective_gate(agent, own, gates_in_force, members);
    if gates_in_force.is_empty() {
        // Nothing in force: the Agent may be new, or deleted and made again with a gate of
        // its own written for the occasion (see `decide`).
        return at_least_default(agent, gate);
    }
    gate.unwrap_or_else(|| strict_default(agent))
}

/// The strict default, tightened by `gate` if there is one, never loosened.
fn at_least_default(agent: &str, gate: Option<PromotionSpec>) -> PromotionSpec {
    let mut strictest = strict_default(agent);
    if let Some(gate) = &gate {
        tighten(&mut strictest, gate);
        strictest.replay.selector = gate.replay.selector.clone();
    }
    strictest
}

/// Zero divergence over the Agent's recent sessions, automatic.
fn strict_default(agent: &str) -> PromotionSpec {
    let mut gate = PromotionSpec::default();
    gate.replay.selector.agents = vec![agent.to_owned()];
    gate
}

/// Whether anything changed other than members whose new revision their own gate replayed
/// against the revision this Agent ran, under a gate at least as strict as the Agent's.
fn changed_beyond_gated_members(
    agent: &str,
    gate: &PromotionSpec,
    promoted: &Composition,
    candidate: &Composition,
    members: &[Member<'_>],
) -> bool {
    // The Ontology has no gate of its own: a change to what it finds is replayed by the
    // Agent's (a reworded description finds nothing new). A skill's suite is no replay of this
    // Agent's sessions: a new revision of one (its tools, or only its prompt fragments) is
    // replayed by the Agent's gate, and so is an edit to a model's script.
    if spec_digest(&promoted.agent_spec) != spec_digest(&candidate.agent_spec)
        || what_it_finds(promoted.ontology.as_ref()) != what_it_finds(candidate.ontology.as_ref())
        || promoted.skills != candidate.skills
        || promoted.model_script != candidate.model_script
        || promoted.routed_scripts != candidate.routed_scripts
    {
        return true;
    }
    let revisions = |c: &Composition| {
        std::iter::once((
            GatedKind::ContextPack,
            c.context_pack.name.clone(),
            c.context_pack.digest(),
        ))
        .chain(
            c.policies
                .iter()
                .map(|p| (GatedKind::Policy, p.name.clone(), spec_digest(&p.spec))),
        )
        .collect::<Vec<_>>()
    };
    let (before, after) = (revisions(promoted), revisions(candidate));
    if before.len() != after.len() {
        return true;
    }
    before
        .iter()
        .zip(&after)
        .any(|((kind, name, old), (new_kind, new_name, new))| {
            if (kind, name) != (new_kind, new_name) {
                return true;
            }
            old != new
                && !members.iter().any(|m| {
                    m.kind == *kind
                        && m.name == name
                        && m.digest == new
                        // A proposal's promotion was its own replay of this revision (its
                        // evidence's intended change excused), accepted by the gate's approvers.
                        && matches!(m.promoted_by, Some(PromotedBy::Replay | PromotedBy::Proposal))
                        && m.promoted_from == Some(old.as_str())
                        && m.promotion.is_some_and(|own| {
                            let proposal = m.promoted_by == Some(PromotedBy::Proposal);
                            covers(m.kind, own, proposal, gate, agent)
                        })
                })
        })
}

/// Whether a member's gate (of a `kind` object, run for a Proposal when `proposal`) replays at
/// least what the Agent's gate would: this Agent's sessions, as many and from as far back, no
/// laxer threshold, an approver
/// when the Agent's gate needs one, and for a ContextPack — what the model is told — as many
/// re-executions (a pack whose own gate turned them off does not shed the Agent's).
fn covers(
    kind: GatedKind,
    member: &PromotionSpec,
    proposal: bool,
    agent_gate: &PromotionSpec,
    agent: &str,
) -> bool {
    let selects = member.replay.selector.match_labels.is_empty()
        && (member.replay.selector.agents.is_empty()
            || member.replay.selector.agents.iter().any(|a| a == agent));
    let samples = |kind, replay, proposal| reexecution_of(kind, replay, proposal).map_or(0, |r| r.samples);
    selects
        && member.replay.max_divergence_percent <= agent_gate.replay.max_divergence_percent
        && member.replay.sample_size >= agent_gate.replay.sample_size
        && member.replay.window_hours >= agent_gate.replay.window_hours
        && (kind != GatedKind::ContextPack
            || samples(kind, &member.replay, proposal)
                >= samples(GatedKind::Agent, &agent_gate.replay, false))
        && (agent_gate.mode == PromotionMode::Automatic || member.mode == PromotionMode::Manual)
}

/// The strictest combination of the Agent's own gate, the gates in force and the gates of the
/// objects the candidate uses; `None` when there is none.
pub fn effective_gate(
    agent: &str,
    own: Option<&PromotionSpec>,
    gates_in_force: &[MemberGate],
    members: &[Member<'_>],
) -> Option<PromotionSpec> {
    let all = every_gate(own, gates_in_force, members);
    let ((_, first), rest) = all.split_first()?;
    let mut gate = first.clone();
    gate.replay.selector.match_labels.clear();
    for (_, other) in rest {
        tighten(&mut gate, other);
    }
    // The Agent's gate replays the Agent's sessions, whatever the others selected.
    gate.replay.selector = ReplaySelector {
        agents: vec![agent.to_owned()],
        match_labels: Default::default(),
    };
    Some(gate)
}

/// Makes `gate` at least as strict as `other`: the lower divergence, the larger sample and
/// window, re-execution that samples more, manual if either is, both gates' approvers.
fn tighten(gate: &mut PromotionSpec, other: &PromotionSpec) {
    gate.replay.max_divergence_percent = gate
        .replay
        .max_divergence_percent
        .min(other.replay.max_divergence_percent);
    gate.replay.sample_size = gate.replay.sample_size.max(other.replay.sample_size);
    gate.replay.window_hours = gate.replay.window_hours.max(other.replay.window_hours);
    gate.replay.reexecute = more_samples(gate.replay.reexecute.take(), other.replay.reexecute.clone());
    if other.mode == PromotionMode::Manual {
        gate.mode = PromotionMode::Manual;
    }
    gate.approvers = union(gate.approvers.as_ref(), other.approvers.as_ref());
}

/// The re-execution that samples more, of two gates' (unset is what an Agent's gate does
/// unset: the default samples, no token limit), within the lower token limit either sets.
fn more_samples(a: Option<ReexecuteSpec>, b: Option<ReexecuteSpec>) -> Option<ReexecuteSpec> {
    let or_default = |r: Option<ReexecuteSpec>| {
        r.unwrap_or(ReexecuteSpec {
            samples: ReexecuteSpec::DEFAULT_SAMPLES,
            max_tokens: None,
        })
    };
    let (a, b) = (or_default(a), or_default(b));
    Some(ReexecuteSpec {
        samples: a.samples.max(b.samples),
        max_tokens: match (a.max_tokens, b.max_tokens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    })
}

/// Every gate that applies, labelled, without repeats.
fn every_gate(
    own: Option<&PromotionSpec>,
    gates_in_force: &[MemberGate],
    members: &[Member<'_>],
) -> Vec<(String, PromotionSpec)> {
    let mut out: Vec<(String, PromotionSpec)> = Vec::new();
    let own = own.map(|p| ("Agent".to_owned(), p.clone()));
    let now = members
        .iter()
        .filter_map(|m| m.promotion.map(|p| (m.label(), p.clone())));
    let before = gates_in_force.iter().map(|g| (label_of(g), g.promotion.clone()));
    for (label, gate) in own.into_iter().chain(now).chain(before) {
        if !out.iter().any(|(l, g)| *l == label && *g == gate) {
            out.push((label, gate));
        }
    }
    out
}

fn label_of(gate: &MemberGate) -> String {
    if gate.kind == "Agent" {
        "Agent".to_owned()
    } else {
        format!("{}/{}", gate.kind, gate.name)
    }
}

/// What the Agent's status shows of its gate. Admission reads `approvers`: only those of gates
/// in force (a candidate cannot bring its own approvers).
pub fn gate_status(
    own: Option<&PromotionSpec>,
    gates_in_force: &[MemberGate],
    members: &[Member<'_>],
) -> AgentGateStatus {
    let mut from: Vec<String> = every_gate(own, gates_in_force, members)
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    from.dedup();
    let approvers = gates_in_force
        .iter()
        .fold(None, |acc, g| union(acc.as_ref(), g.promotion.approvers.as_ref()));
    // Bounded like the status field; fewer approvers only narrows who may decide.
    let approvers = approvers.map(|mut a| {
        a.users.truncate(32);
        a.groups.truncate(32);
        a
    });
    from.truncate(MAX_GATES_IN_FORCE + 32);
    AgentGateStatus {
        from,
        approvers: approvers.filter(|a| !a.is_empty()),
    }
}

/// The gates in force once the candidate is promoted: every gate that was (a gate is shed only
/// by an approver's bypass), the Agent's own and those of the objects it now uses.
pub fn gates_after_promotion(
    agent: &str,
    by: PromotedBy,
    own: Option<&PromotionSpec>,
    gates_in_force: &[MemberGate],
    members: &[Member<'_>],
) -> Vec<MemberGate> {
    let mut out: Vec<MemberGate> = if by == PromotedBy::Bypass {
        Vec::new()
    } else {
        gates_in_force.to_vec()
    };
    let own = own.map(|p| MemberGate {
        kind: "Agent".into(),
        name: agent.to_owned(),
        promotion: p.clone(),
    });
    let now = members.iter().filter_map(|m| {
        m.promotion.map(|p| MemberGate {
            kind: m.kind.api_kind().to_owned(),
            name: m.name.to_owned(),
            promotion: p.clone(),
        })
    });
    for gate in own.into_iter().chain(now) {
        if let Some(slot) = out
            .iter_mut()
            .find(|g| g.kind == gate.kind && g.name == gate.name)
        {
            // The same object's gate, changed by its approvers: the current one.
            *slot = gate;
        } else {
            out.push(gate);
        }
    }
    // Bounded like the status field: keep the first, which are the longest in force.
    out.truncate(MAX_GATES_IN_FORCE);
    out
}

/// Gates kept in force at most (the status field's bound).
pub const MAX_GATES_IN_FORCE: usize = 64;

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
        let pack = NamedPack::new(
            "ops",
            serde_json::from_value::<ContextPackSpec>(
                serde_json::json!({"instructions": "help", "tokenBudget": 1000}),
            )
            .expect("pack"),
        );
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
        from: Option<&'a str>,
    ) -> Member<'a> {
        Member {
            kind: GatedKind::Policy,
            name,
            digest,
            promotion,
            promoted_by: Some(by),
            promoted_from: from,
        }
    }

    fn guardrails_gate(max: u32) -> Vec<MemberGate> {
        vec![MemberGate {
            kind: "Policy".into(),
            name: "guardrails".into(),
            promotion: gate(max),
        }]
    }

    fn in_force<'a>(c: &'a Composition, gates: &'a [MemberGate]) -> InForce<'a> {
        InForce {
            composition: Some(c),
            gates,
        }
    }

    #[test]
    fn nothing_gated_anywhere_is_promoted_directly_once_a_composition_is_in_force() {
        let c = composition(vec![policy("guardrails", "deny")]);
        let d = spec_digest(&c.policies[0].spec);
        let members = [member("guardrails", &d, None, PromotedBy::Ungated, None)];
        let mut changed = c.clone();
        changed.agent_spec.budget.max_steps = 40;
        assert!(matches!(
            decide("ops", None, in_force(&c, &[]), &changed, &members),
            Need::Direct(PromotedBy::Ungated, _)
        ));
    }

    #[test]
    fn a_first_composition_is_replayed_even_without_a_gate() {
        // An Agent deleted and created again keeps its recorded sessions, not its status.
        let c = composition(vec![policy("guardrails", "deny")]);
        let d = spec_digest(&c.policies[0].spec);
        let members = [member("guardrails", &d, None, PromotedBy::Ungated, None)];
        let Need::Replay(gate) = decide("ops", None, InForce::default(), &c, &members) else {
            panic!("a first composition must be replayed");
        };
        assert_eq!(gate.replay.max_divergence_percent, 0);
        assert_eq!(gate.replay.selector.agents, vec!["ops".to_owned()]);
    }

    #[test]
    fn a_first_composition_with_a_lax_gate_of_its_own_is_replayed_at_least_as_strictly_as_the_default() {
        // An Agent deleted (its gates in force gone with its status) and created again with a
        // gate that lets anything through: the default still judges it.
        let c = composition(vec![policy("guardrails", "deny")]);
        let d = spec_digest(&c.policies[0].spec);
        let members = [member("guardrails", &d, None, PromotedBy::Ungated, None)];
        let mut lax = gate(100);
        lax.replay.sample_size = 1;
        lax.replay.window_hours = 1;
        let Need::Replay(judged) = decide("ops", Some(&lax), InForce::default(), &c, &members) else {
            panic!("a first composition must be replayed");
        };
        let default = PromotionSpec::default();
        // A Proposal's replay of an Agent with no gate in force is judged alike.
        let proposed = replay_gate("ops", Some(&lax), &[], &members);
        assert_eq!(proposed.replay.max_divergence_percent, 0);
        assert_eq!(proposed.replay.sample_size, default.replay.sample_size);
        assert_eq!(judged.replay.max_divergence_percent, 0);
        assert_eq!(judged.replay.sample_size, default.replay.sample_size);
        assert_eq!(judged.replay.window_hours, default.replay.window_hours);
        assert_eq!(judged.replay.selector.agents, vec!["ops".to_owned()]);
        // A stricter gate of its own still tightens it.
        let mut manual = gate(0);
        manual.mode = PromotionMode::Manual;
        manual.replay.sample_size = default.replay.sample_size + 10;
        let Need::Replay(judged) = decide("ops", Some(&manual), InForce::default(), &c, &members) else {
            panic!("a first composition must be replayed");
        };
        assert_eq!(judged.mode, PromotionMode::Manual);
        assert_eq!(judged.replay.sample_size, default.replay.sample_size + 10);
    }

    #[test]
    fn pointing_at_an_ungated_policy_is_gated_by_the_one_it_replaces() {
        let before = composition(vec![policy("guardrails", "deny")]);
        let after = composition(vec![policy("guardrails-v2", "allow")]);
        let d = spec_digest(&after.policies[0].spec);
        let members = [member("guardrails-v2", &d, None, PromotedBy::FirstRevision, None)];
        let gates = guardrails_gate(5);
        let Need::Replay(gate) = decide("ops", None, in_force(&before, &gates), &after, &members) else {
            panic!("expected a replay");
        };
        assert_eq!(gate.replay.max_divergence_percent, 5);
    }

    #[test]
    fn a_member_is_exempt_only_if_its_gate_replayed_it_against_what_the_agent_ran() {
        let g = gate(0);
        let gates = guardrails_gate(0);
        let before = composition(vec![policy("guardrails", "deny")]);
        let old = spec_digest(&before.policies[0].spec);
        let after = composition(vec![policy("guardrails", "allow")]);
        let new = spec_digest(&after.policies[0].spec);
        // Re-created: a first revision.
        let recreated = [member(
            "guardrails",
            &new,
            Some(&g),
            PromotedBy::FirstRevision,
            None,
        )];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &recreated),
            Need::Replay(_)
        ));
        // Re-created laxer, then edited trivially: its replay compared against the lax revision.
        let laundered = [member(
            "guardrails",
            &new,
            Some(&g),
            PromotedBy::Replay,
            Some("sha256:lax"),
        )];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &laundered),
            Need::Replay(_)
        ));
        // Bypassed by the Policy's approver: the Agent's gate still replays it.
        let bypassed = [member(
            "guardrails",
            &new,
            Some(&g),
            PromotedBy::Bypass,
            Some(&old),
        )];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &bypassed),
            Need::Replay(_)
        ));
        // A laxer member gate does not stand in for the Agent's.
        let lax = gate(100);
        let lax_replay = [member(
            "guardrails",
            &new,
            Some(&lax),
            PromotedBy::Replay,
            Some(&old),
        )];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &lax_replay),
            Need::Replay(_)
        ));
        // Nor does one that replays only the last hour's sessions where the Agent's replays a
        // week's (a quiet hour would hold none).
        let mut recent = gate(0);
        recent.replay.window_hours = 1;
        let recent_replay = [member(
            "guardrails",
            &new,
            Some(&recent),
            PromotedBy::Replay,
            Some(&old),
        )];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &recent_replay),
            Need::Replay(_)
        ));
        // Replayed against the revision the Agent ran, under a gate as strict: no second replay.
        let replayed = [member(
            "guardrails",
            &new,
            Some(&g),
            PromotedBy::Replay,
            Some(&old),
        )];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &replayed),
            Need::Direct(PromotedBy::Members, _)
        ));
        // So is one promoted through an accepted Proposal, whose own replay judged it.
        let proposed = [member(
            "guardrails",
            &new,
            Some(&g),
            PromotedBy::Proposal,
            Some(&old),
        )];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &proposed),
            Need::Direct(PromotedBy::Members, _)
        ));
    }

    #[test]
    fn an_agent_spec_change_is_replayed_under_a_gate() {
        let g = gate(0);
        let gates = guardrails_gate(0);
        let before = composition(vec![policy("guardrails", "deny")]);
        let mut after = before.clone();
        after.agent_spec.budget.max_steps = 40;
        let d = spec_digest(&after.policies[0].spec);
        let members = [member("guardrails", &d, Some(&g), PromotedBy::Replay, None)];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &members),
            Need::Replay(_)
        ));
    }

    /// A model script has no gate of its own: an edit to its ConfigMap is replayed by the
    /// Agent's gate even when every member was replayed by its own.
    #[test]
    fn a_model_script_edit_is_replayed_under_the_agents_gate() {
        let g = gate(0);
        let gates = guardrails_gate(0);
        let mut before = composition(vec![policy("guardrails", "deny")]);
        before.model_script = Some("{\"turns\": []}".into());
        let d = spec_digest(&before.policies[0].spec);
        let members = [member("guardrails", &d, Some(&g), PromotedBy::Replay, None)];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &before.clone(), &members),
            Need::Direct(..)
        ));
        let mut edited = before.clone();
        edited.model_script = Some("{\"turns\": [{\"content\": \"delete it all\"}]}".into());
        assert_ne!(edited.digest(), before.digest());
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &edited, &members),
            Need::Replay(_)
        ));
        let mut routed = before.clone();
        routed
            .routed_scripts
            .insert("cheap".into(), "{\"turns\": []}".into());
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &routed, &members),
            Need::Replay(_)
        ));
    }

    /// The Ontology has no gate of its own: removing the id pattern a deny rule depends on is a
    /// change the Agent's gate replays, even when every policy was replayed by its own.
    #[test]
    fn an_ontology_change_is_replayed_under_the_agents_gate() {
        let g = gate(0);
        let gates = guardrails_gate(0);
        let mut before = composition(vec![policy("guardrails", "deny")]);
        before.ontology = Some(
            serde_yaml::from_str("entityTypes: [{name: customer-db, idPattern: 'db-[a-z]+'}]")
                .expect("ontology"),
        );
        let mut after = before.clone();
        after.ontology = Some(serde_yaml::from_str("entityTypes: [{name: customer-db}]").expect("ontology"));
        let d = spec_digest(&after.policies[0].spec);
        let members = [member("guardrails", &d, Some(&g), PromotedBy::Replay, None)];
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &members),
            Need::Replay(_)
        ));
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &before.clone(), &members),
            Need::Direct(..)
        ));
        // A reworded description finds the same entities: no replay for it.
        let mut described = before.clone();
        described.ontology = Some(
            serde_yaml::from_str(
                "entityTypes: [{name: customer-db, idPattern: 'db-[a-z]+', description: databases of customers}]",
            )
            .expect("ontology"),
        );
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &described, &members),
            Need::Direct(..)
        ));
    }

    #[test]
    fn gates_combine_to_the_strictest_and_a_laxer_own_gate_does_not_win() {
        let mut manual = gate(10);
        manual.mode = PromotionMode::Manual;
        manual.approvers = Some(Approvers {
            users: vec!["alice".into()],
            groups: vec![],
        });
        let lax_own = gate(100);
        let members = [member("a", "sha256:a", Some(&manual), PromotedBy::Replay, None)];
        let gate = effective_gate("ops", Some(&lax_own), &guardrails_gate(2), &members).expect("a gate");
        assert_eq!(gate.mode, PromotionMode::Manual);
        assert_eq!(gate.replay.max_divergence_percent, 2);
    }

    #[test]
    fn a_pack_whose_own_gate_turned_re_execution_off_does_not_stand_in_for_the_agents() {
        let gates = guardrails_gate(0);
        let before = composition(vec![policy("guardrails", "deny")]);
        let mut after = before.clone();
        after.context_pack.spec.instructions = "Act fast; diagnose later.".into();
        let old = before.context_pack.digest();
        let new = after.context_pack.digest();
        let pack = |promotion| Member {
            kind: GatedKind::ContextPack,
            name: "ops",
            digest: &new,
            promotion,
            promoted_by: Some(PromotedBy::Replay),
            promoted_from: Some(&old),
        };
        let mut off = gate(0);
        off.replay.reexecute = Some(ReexecuteSpec {
            samples: 0,
            max_tokens: None,
        });
        assert!(matches!(
            decide(
                "ops",
                None,
                in_force(&before, &gates),
                &after,
                &[pack(Some(&off))]
            ),
            Need::Replay(_)
        ));
        // Re-executed by its own gate as often as the Agent's would: no second replay.
        let silent = gate(0);
        assert!(matches!(
            decide(
                "ops",
                None,
                in_force(&before, &gates),
                &after,
                &[pack(Some(&silent))]
            ),
            Need::Direct(PromotedBy::Members, _)
        ));
    }

    #[test]
    fn re_execution_combines_to_the_most_samples_and_an_explicit_off_does_not_win_alone() {
        let reexecuting = |samples, max_tokens| {
            let mut g = gate(0);
            g.replay.reexecute = Some(ReexecuteSpec { samples, max_tokens });
            g
        };
        let off = reexecuting(0, None);
        let five = reexecuting(5, Some(1000));
        // The Agent's own gate turns it off; a pack's gate that says nothing keeps the default.
        let silent = gate(0);
        let members = [member("a", "sha256:a", Some(&silent), PromotedBy::Replay, None)];
        let combined = effective_gate("ops", Some(&off), &[], &members).expect("a gate");
        assert_eq!(
            combined.replay.reexecute.map(|r| r.samples),
            Some(ReexecuteSpec::DEFAULT_SAMPLES)
        );
        let members = [member("a", "sha256:a", Some(&five), PromotedBy::Replay, None)];
        let combined = effective_gate("ops", Some(&off), &[], &members).expect("a gate");
        assert_eq!(
            combined.replay.reexecute,
            Some(ReexecuteSpec {
                samples: 5,
                max_tokens: Some(1000)
            }),
            "the most samples, within the token limit one of them set"
        );
        // Alone, the Agent's own choice stands.
        let alone = effective_gate("ops", Some(&off), &[], &[]).expect("a gate");
        assert_eq!(alone.replay.reexecute.map(|r| r.samples), Some(0));
    }

    #[test]
    fn approvers_come_only_from_gates_in_force() {
        let mut mine = gate(0);
        mine.approvers = Some(Approvers {
            users: vec!["mallory".into()],
            groups: vec![],
        });
        let mut theirs = gate(0);
        theirs.approvers = Some(Approvers {
            users: vec!["alice".into()],
            groups: vec![],
        });
        let in_force = vec![MemberGate {
            kind: "Policy".into(),
            name: "guardrails".into(),
            promotion: theirs,
        }];
        // A new Policy listing its author, or the Agent's own new gate, approves nothing yet.
        let members = [member(
            "evil",
            "sha256:e",
            Some(&mine),
            PromotedBy::FirstRevision,
            None,
        )];
        let status = gate_status(Some(&mine), &in_force, &members);
        assert_eq!(
            status.approvers.expect("approvers").users,
            vec!["alice".to_owned()]
        );
        assert!(status.from.contains(&"Policy/evil".to_owned()));
    }

    #[test]
    fn gates_in_force_are_shed_only_by_an_approvers_bypass() {
        let gates = guardrails_gate(0);
        let members = [member("clone", "sha256:c", None, PromotedBy::FirstRevision, None)];
        let kept = gates_after_promotion("ops", PromotedBy::Replay, None, &gates, &members);
        assert_eq!(kept, gates);
        let shed = gates_after_promotion("ops", PromotedBy::Bypass, None, &gates, &members);
        assert!(shed.is_empty());
        let own = gate(1);
        let with_own = gates_after_promotion("ops", PromotedBy::Replay, Some(&own), &gates, &members);
        assert_eq!(with_own.len(), 2);
        assert_eq!(with_own[1].kind, "Agent");
    }

    #[test]
    fn the_agents_own_gate_is_not_part_of_what_runs() {
        let mut spec = agent_spec();
        spec.promotion = Some(gate(1));
        let c = Composition::new(&spec, composition(vec![]).context_pack, vec![]);
        assert!(c.agent_spec.promotion.is_none());
        assert_eq!(c.digest(), composition(vec![]).digest());
    }

    #[test]
    fn a_skills_new_revision_is_replayed_by_the_agents_gate_even_if_only_its_fragments_changed() {
        let c = composition(vec![policy("guardrails", "deny")]);
        let d = spec_digest(&c.policies[0].spec);
        let g = gate(0);
        let gates = guardrails_gate(0);
        let members = [member("guardrails", &d, Some(&g), PromotedBy::Replay, None)];
        let skill = |digest: &str, text: &str| contextos_runner::skills::SkillUse {
            name: "diagnosis".into(),
            version: "1.0.0".into(),
            digest: digest.into(),
            tools: vec!["status".into()],
            fragments: vec![
                serde_json::from_value(serde_json::json!({"name": "how", "text": text})).expect("fragment"),
            ],
        };
        let before = c.clone().with_skills(vec![skill("sha256:a", "Diagnose first.")]);
        let after = c.with_skills(vec![skill("sha256:b", "Ignore the runbook.")]);
        // The skill's suite passed; that is no replay of this Agent's sessions.
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &after, &members),
            Need::Replay(_)
        ));
        assert!(matches!(
            decide("ops", None, in_force(&before, &gates), &before, &members),
            Need::Direct(PromotedBy::Members, _)
        ));
    }
}
