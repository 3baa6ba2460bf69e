//! Rules about what a GitOps repository should never carry: Sessions that arrive with approvals,
//! Sessions that loosen their Agent's limits or name no Agent, and promotion annotations that
//! skip a replay gate.

use contextos_crds::annotations;

use super::{Check, Sink, spec};
use crate::{
    audit::{
        field::FieldPath,
        finding::{Rule, RuleId, Severity},
        harness::Harness,
    },
    run_context::effective_limits,
};

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("session/approvals-committed"),
            severity: Severity::High,
            title: "a Session that arrives with approvals or resolutions",
            why: "approvals are given by the approver, in their own name, for the call waiting on them; the admission policy refuses a new Session that carries any",
            fix: "remove `spec.approvals` and `spec.resolutions`; approve with `contextos approve` or `kubectl patch` when the Session asks",
        },
        approvals_committed,
    ),
    (
        Rule {
            id: RuleId("session/override-loosens"),
            severity: Severity::High,
            title: "a Session override that loosens its Agent's limits",
            why: "a Session may only tighten its Agent's budget and safety mode; this one is Ready=False and never runs",
            fix: "lower the override to at most the Agent's value, or remove it",
        },
        override_loosens,
    ),
    (
        Rule {
            id: RuleId("session/missing-agent"),
            severity: Severity::Medium,
            title: "a Session naming an Agent that is not there",
            why: "the Session waits (Pending) until an Agent of that name exists in its namespace",
            fix: "correct `spec.agentRef.name`, or add the Agent",
        },
        missing_agent,
    ),
    (
        Rule {
            id: RuleId("promotion/bypass-annotation"),
            severity: Severity::High,
            title: "a promotion annotation committed with the object",
            why: "`promote-without-replay` and `approve-promotion` are an approver's decision about one revision; committed, they pass every future revision's gate unexamined",
            fix: "remove the annotation from the repository; approvers set it on the live object when needed",
        },
        bypass_annotations,
    ),
];

fn approvals_committed(harness: &Harness, sink: &mut Sink<'_>) {
    for session in &harness.sessions {
        if !session.spec.approvals.is_empty() {
            sink.report(
                session,
                spec(&["approvals"]),
                format!("{} approvals", session.spec.approvals.len()),
            );
        }
        if !session.spec.resolutions.is_empty() {
            sink.report(
                session,
                spec(&["resolutions"]),
                format!("{} resolutions", session.spec.resolutions.len()),
            );
        }
    }
}

fn override_loosens(harness: &Harness, sink: &mut Sink<'_>) {
    for session in &harness.sessions {
        let Some(agent) = harness.find(&harness.agents, session, &session.spec.agent_ref.name) else {
            continue;
        };
        if let Err(error) = effective_limits(
            &agent.spec.budget,
            agent.spec.safety_mode,
            session.spec.overrides.as_ref(),
        ) {
            let field = error
                .field
                .split('.')
                .fold(FieldPath::root(), |path, key| path.key(key));
            sink.report(
                session,
                field,
                format!(
                    "{} asks for {} where Agent {} allows {}",
                    error.limit, error.requested, agent.id.name, error.allowed
                ),
            );
        }
    }
}

fn missing_agent(harness: &Harness, sink: &mut Sink<'_>) {
    for session in &harness.sessions {
        let name = &session.spec.agent_ref.name;
        if harness.find(&harness.agents, session, name).is_none() {
            sink.report(
                session,
                spec(&["agentRef", "name"]),
                format!("Agent {name} is not in the audited objects"),
            );
        }
    }
}

fn bypass_annotations(harness: &Harness, sink: &mut Sink<'_>) {
    let promoted = harness
        .agents
        .iter()
        .map(|o| (&o.id, &o.doc))
        .chain(harness.policies.iter().map(|o| (&o.id, &o.doc)))
        .chain(harness.context_packs.iter().map(|o| (&o.id, &o.doc)));
    for (id, doc) in promoted {
        let annotations = doc.value["metadata"]["annotations"]
            .as_object()
            .into_iter()
            .flatten();
        for (key, _) in annotations {
            if key == annotations::PROMOTE_WITHOUT_REPLAY || key == annotations::APPROVE_PROMOTION {
                let field = FieldPath::of(&["metadata", "annotations"]).key(key);
                sink.report_at(id, doc, field, format!("{key} is committed"));
            }
        }
    }
}
