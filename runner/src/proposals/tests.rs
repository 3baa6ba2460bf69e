//! The Strategy Compiler over recorded fixtures: runs written entry by entry as the gateway
//! records them, people's corrections of some of their calls, the insights synthesized from
//! them, and the proposal each compiles to — which must apply to the target it names.

use contextos_crds::{
    AgentSpec, ContextPackSpec, PolicySpec,
    common::{ToolKind, ToolRisk},
    policy::{PolicyEffect, PolicyMode},
    proposal::{ProposalPatch, TargetKind},
};
use serde_json::{Value, json};

use super::{Compiled, World, compile, patch};
use crate::{
    feedback::{AboutEntry, FeedbackLabel, FeedbackRecord},
    insights::{
        InsightKind, Thresholds,
        signals::{RunEntries, Signals},
        synthesize,
    },
    records::{
        EntryBody,
        entry::{PolicyDecisionRecord, ToolCallRecord},
    },
    run::bundle::spec_digest,
};

fn quickstart<T: serde::de::DeserializeOwned>(text: &str) -> T {
    let value: Value = serde_yaml::from_str(text).expect("yaml");
    serde_json::from_value(value["spec"].clone()).expect("spec")
}

/// The quickstart's policy with restarts allowed: what people then correct.
fn policy() -> PolicySpec {
    let mut spec: PolicySpec = quickstart(include_str!("../../../examples/quickstart/policy.yaml"));
    let rule = spec
        .rules
        .iter_mut()
        .find(|r| r.name == "destructive-needs-oncall")
        .expect("rule");
    rule.name = "allow-restarts".into();
    rule.effect = PolicyEffect::Allow;
    rule.approvers = None;
    spec
}

/// The quickstart agent with its skills' tools, as a run has them.
fn agent() -> AgentSpec {
    crate::manifests::ManifestSet::load(&[
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
    ])
    .and_then(|set| set.agent_with_skills("oncall-assistant"))
    .expect("the quickstart agent with its skills")
}

fn pack() -> ContextPackSpec {
    quickstart(include_str!("../../../examples/quickstart/contextpack.yaml"))
}

/// One call: asked for with `args`, decided by `rule`.
fn call(id: &str, tool: &str, args: Value, rule: &str, effect: PolicyEffect) -> Vec<EntryBody> {
    vec![
        EntryBody::ToolCallRequested(ToolCallRecord {
            call_id: id.into(),
            tool: tool.into(),
            risk: ToolRisk::Destructive,
            kind: ToolKind::Act,
            arguments: args,
            idempotency_key: format!("k-{id}"),
            call_hash: format!("h-{id}"),
        }),
        EntryBody::PolicyDecision(PolicyDecisionRecord {
            call_id: id.into(),
            effect,
            enforced: effect,
            rule: rule.into(),
            reason: "r".into(),
            dry_run: false,
        }),
    ]
}

fn run(id: &str, at: i64, bodies: Vec<EntryBody>) -> RunEntries {
    crate::insights::tests::run_of("oncall-assistant", id, at, bodies)
}

/// A correction of the call at entry `seq` of `run`.
fn correction(run: &RunEntries, seq: u64, label: FeedbackLabel) -> FeedbackRecord {
    let (hash, entry) = &run.entries[seq as usize];
    FeedbackRecord {
        run_id: run.run_id.clone(),
        agent: run.agent.clone(),
        session_id: run.run_id.clone(),
        entry: Some(AboutEntry {
            seq,
            hash: *hash,
            call_id: entry.body.call_id().map(str::to_owned),
            tool: Some("restart_deployment".into()),
        }),
        label,
        correction: "ask on-call before restarting in prod".into(),
        by: "lee".into(),
        at_ms: 0,
        request_id: None,
    }
}

/// Restarts in prod (corrected) and in staging (not), all let through by `allow-restarts`.
fn restarts(label: FeedbackLabel, prod_namespace: &str) -> Signals {
    let allow = "oncall-guardrails/allow-restarts";
    let restart = |id: &str, ns: &str| {
        call(
            id,
            "restart_deployment",
            json!({"deployment": "checkout", "namespace": ns, "reason": {"nested": true}}),
            allow,
            PolicyEffect::Allow,
        )
    };
    let runs = [
        run("r-1", 1_000, restart("1.0", prod_namespace)),
        run("r-2", 2_000, restart("1.0", prod_namespace)),
        run("r-3", 3_000, restart("1.0", "staging")),
    ];
    let mut signals = Signals::default();
    for r in &runs {
        signals.add(r);
    }
    for r in &runs[..2] {
        signals.add_corrections(r, &[correction(r, 0, label)]);
    }
    signals
}

fn compiled(signals: &Signals, kind: InsightKind, policy: &PolicySpec) -> Compiled {
    let (agent, pack) = (agent(), pack());
    let world = World {
        agent: "oncall-assistant",
        agent_spec: &agent,
        pack: ("oncall-pack", &pack),
        policies: vec![("oncall-guardrails", policy)],
        skill_tools: Vec::new(),
    };
    let insight = synthesize(signals, Thresholds::default())
        .into_iter()
        .find(|i| i.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} insight"));
    let samples = signals.agents["oncall-assistant"]
        .tools
        .get(&insight.about)
        .map(|t| t.samples.clone())
        .unwrap_or_default();
    compile(&insight, &world, &samples)
}

/// The patched policy of a draft that must be a Policy patch.
fn patched_policy(result: &Compiled, base: &PolicySpec) -> (PolicySpec, Vec<String>) {
    let Compiled::Draft(draft) = result else {
        panic!("expected a draft, got {result:?}")
    };
    assert_eq!(draft.target.kind, TargetKind::Policy);
    assert_eq!(
        draft.base_digest,
        spec_digest(base),
        "drafted against the current spec"
    );
    let patched =
        patch::apply_policy(base, draft.patch.policy.as_ref().expect("policy patch")).expect("applies");
    crate::policy::compile_policy("oncall-guardrails", &patched.spec).expect("compiles");
    (patched.spec, patched.changes)
}

#[test]
fn corrections_compile_to_a_rule_before_the_one_that_let_the_calls_through() {
    struct Case {
        label: FeedbackLabel,
        prod: &'static str,
        effect: PolicyEffect,
        condition: Option<&'static str>,
    }
    let cases = [
        Case {
            label: FeedbackLabel::ShouldHaveAsked,
            prod: "prod",
            effect: PolicyEffect::RequireApproval,
            condition: Some(r#""namespace" in call.args && call.args["namespace"] == "prod""#),
        },
        Case {
            label: FeedbackLabel::ShouldNotHaveActed,
            prod: "prod",
            effect: PolicyEffect::Deny,
            condition: Some(r#""namespace" in call.args && call.args["namespace"] == "prod""#),
        },
        // Nothing sets the corrected calls apart from the others: the rule covers every call,
        // and the replay shows what that changes.
        Case {
            label: FeedbackLabel::ShouldHaveAsked,
            prod: "staging",
            effect: PolicyEffect::RequireApproval,
            condition: None,
        },
    ];
    for case in cases {
        let base = policy();
        let result = compiled(&restarts(case.label, case.prod), InsightKind::Corrections, &base);
        let (spec, changes) = patched_policy(&result, &base);
        let at = spec
            .rules
            .iter()
            .position(|r| r.match_.tools == ["restart_deployment"])
            .expect("added");
        let rule = &spec.rules[at];
        assert_eq!(
            spec.rules[at + 1].name,
            "allow-restarts",
            "goes right before the rule that allowed"
        );
        assert_eq!(rule.effect, case.effect);
        assert_eq!(rule.condition.as_deref(), case.condition, "{:?}", case.label);
        assert!(
            rule.reason.contains("2 correction(s) in 2 run(s)"),
            "{}",
            rule.reason
        );
        assert_eq!(changes.len(), 1);
        let Compiled::Draft(draft) = result else {
            unreachable!()
        };
        let calls: Vec<_> = draft
            .insight
            .evidence
            .iter()
            .map(|e| (e.run.as_str(), e.call.as_deref()))
            .collect();
        assert_eq!(
            calls,
            [("r-2", Some("1.0")), ("r-1", Some("1.0"))],
            "the corrected calls"
        );
    }
}

#[test]
fn a_value_that_is_personal_data_is_never_written_into_a_rule() {
    let allow = "oncall-guardrails/allow-restarts";
    let restart = |id: &str, contact: &str| {
        call(
            id,
            "restart_deployment",
            json!({"contact": contact}),
            allow,
            PolicyEffect::Allow,
        )
    };
    let runs = [
        run("r-1", 1, restart("1.0", "kim@example.com")),
        run("r-2", 2, restart("1.0", "kim@example.com")),
        run("r-3", 3, restart("1.0", "ops@example.org")),
    ];
    let mut signals = Signals::default();
    runs.iter().for_each(|r| signals.add(r));
    for r in &runs[..2] {
        signals.add_corrections(r, &[correction(r, 0, FeedbackLabel::ShouldHaveAsked)]);
    }
    let base = policy();
    let (spec, _) = patched_policy(&compiled(&signals, InsightKind::Corrections, &base), &base);
    let rule = spec
        .rules
        .iter()
        .find(|r| r.name.starts_with("restart_deployment"))
        .expect("added");
    assert_eq!(
        rule.condition, None,
        "the e-mail address sets the calls apart, but is not used"
    );
}

#[test]
fn approvals_and_dry_run_compile_to_changes_of_the_rule_that_decided() {
    let rule = "oncall-guardrails/destructive-needs-oncall";
    let approval_run = |id: &str, granted: bool| {
        let mut bodies = call(
            id,
            "restart_deployment",
            json!({}),
            rule,
            PolicyEffect::RequireApproval,
        );
        bodies.push(if granted {
            EntryBody::ApprovalGranted {
                call_id: id.into(),
                call_hash: format!("h-{id}"),
                approver: "lee".into(),
                reason: None,
            }
        } else {
            EntryBody::ApprovalRefused {
                call_id: id.into(),
                call_hash: format!("h-{id}"),
                approver: "lee".into(),
                reason: "no".into(),
            }
        });
        bodies
    };
    let base: PolicySpec = quickstart(include_str!("../../../examples/quickstart/policy.yaml"));
    for (granted, kind, effect) in [
        (false, InsightKind::ApprovalsAlwaysRefused, PolicyEffect::Deny),
        (true, InsightKind::ApprovalsAlwaysGranted, PolicyEffect::Allow),
    ] {
        let mut signals = Signals::default();
        for i in 0..3 {
            signals.add(&run(&format!("r-{i}"), i, approval_run("1.0", granted)));
        }
        let (spec, changes) = patched_policy(&compiled(&signals, kind, &base), &base);
        let changed = spec
            .rules
            .iter()
            .find(|r| r.name == "destructive-needs-oncall")
            .expect("rule");
        assert_eq!(changed.effect, effect);
        assert!(
            changed.approvers.is_none(),
            "approvers only stay on an approval rule"
        );
        assert_eq!(
            changes,
            [format!(
                "rule destructive-needs-oncall: require_approval → {}",
                effect.as_str()
            )]
        );
    }

    // A dryRun policy whose rule would have denied calls that were allowed.
    let mut dry = base.clone();
    dry.mode = PolicyMode::DryRun;
    let mut signals = Signals::default();
    for i in 0..2 {
        let mut bodies = call(
            "1.0",
            "restart_deployment",
            json!({}),
            "other/allow",
            PolicyEffect::Allow,
        );
        bodies.push(EntryBody::PolicyDecision(PolicyDecisionRecord {
            call_id: "1.0".into(),
            effect: PolicyEffect::Deny,
            enforced: PolicyEffect::Allow,
            rule: "oncall-guardrails/no-namespace-deletion".into(),
            reason: "r".into(),
            dry_run: true,
        }));
        signals.add(&run(&format!("d-{i}"), i, bodies));
    }
    let (spec, _) = patched_policy(&compiled(&signals, InsightKind::DryRunWouldChange, &dry), &dry);
    assert_eq!(spec.mode, PolicyMode::Enforce);
}

#[test]
fn denials_compile_to_instructions_and_budgets_are_left_to_autotune() {
    let denied = |id: &str| {
        call(
            id,
            "delete_namespace",
            json!({}),
            "oncall-guardrails/no-namespace-deletion",
            PolicyEffect::Deny,
        )
    };
    let mut signals = Signals::default();
    for i in 0..2 {
        signals.add(&run(&format!("r-{i}"), i, denied("1.0")));
    }
    let result = compiled(&signals, InsightKind::RepeatedDenial, &policy());
    let Compiled::Draft(draft) = &result else {
        panic!("{result:?}")
    };
    assert_eq!(draft.target.kind, TargetKind::ContextPack);
    let base = pack();
    let patched = patch::apply_context_pack(&base, draft.patch.context_pack.as_ref().expect("pack patch"))
        .expect("applies");
    assert!(
        patched
            .spec
            .instructions
            .starts_with(base.instructions.trim_end())
    );
    assert!(patched.spec.instructions.ends_with(
        "Do not call the tool delete_namespace: oncall-guardrails/no-namespace-deletion denies it, and asking again will not change that."
    ));

    let mut failing = Signals::default();
    for i in 0..2 {
        failing.add(&run(
            &format!("f-{i}"),
            i,
            vec![EntryBody::Failed {
                reason: "BudgetExhausted".into(),
                message: "m".into(),
            }],
        ));
    }
    assert!(matches!(
        compiled(&failing, InsightKind::RecurringFailure, &policy()),
        Compiled::Open(why) if why.contains("autotune")
    ));
}

#[test]
fn a_draft_has_one_name_for_one_content_and_its_manifest_reads_back() {
    let base = policy();
    let Compiled::Draft(draft) = compiled(
        &restarts(FeedbackLabel::ShouldHaveAsked, "prod"),
        InsightKind::Corrections,
        &base,
    ) else {
        panic!("a draft")
    };
    let again = compiled(
        &restarts(FeedbackLabel::ShouldHaveAsked, "prod"),
        InsightKind::Corrections,
        &base,
    );
    let Compiled::Draft(again) = again else {
        panic!("a draft")
    };
    assert_eq!(draft.name(), again.name());
    assert!(draft.name().starts_with("policy-oncall-guardrails-") && draft.name().len() <= 63);
    let manifest = draft.manifest("shop");
    let read: contextos_crds::Proposal = serde_json::from_value(manifest).expect("a Proposal");
    assert_eq!(read.spec.patch, draft.patch);
    assert_eq!(read.spec.base_digest, spec_digest(&base));
}

#[test]
fn patches_name_the_field_that_does_not_apply() {
    let base = policy();
    let patch: contextos_crds::proposal::PolicyPatch = serde_json::from_value(json!({"operations": [
        {"setMode": "enforce"},
        {"setEffect": {"rule": "no-such-rule", "effect": "deny"}},
    ]}))
    .expect("patch");
    let error = patch::apply_policy(&base, &patch).expect_err("no such rule");
    assert_eq!(error.field, "spec.patch.policy.operations[1].setEffect.rule");
    let duplicate: contextos_crds::proposal::PolicyPatch = serde_json::from_value(json!({"operations": [
        {"addRule": {"rule": {"name": "allow-reads", "effect": "allow", "reason": "r"}}},
    ]}))
    .expect("patch");
    assert_eq!(
        patch::apply_policy(&base, &duplicate)
            .expect_err("duplicate")
            .field,
        "spec.patch.policy.operations[0].addRule.rule.name"
    );
    let agent_patch: contextos_crds::proposal::AgentPatch = serde_json::from_value(json!({"operations": [
        {"setBudget": {"maxTokens": 1234}},
        {"setToolRisk": {"tool": "restart_deployment", "risk": "delegated"}},
    ]}))
    .expect("patch");
    let patched = patch::apply_agent(&agent(), &agent_patch).expect("applies");
    assert_eq!(patched.spec.budget.max_tokens, 1234);
    assert_eq!(patched.spec.budget.max_steps, agent().budget.max_steps);
    assert_eq!(patched.changes.len(), 2, "{:?}", patched.changes);
    assert!(patch::for_kind(&ProposalPatch::default(), TargetKind::Agent).is_err());
}
