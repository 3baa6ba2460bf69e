//! Signals and insights over recorded fixtures: three runs of one agent, written entry by entry
//! as the gateway and the runner record them.

use contextos_crds::{
    common::{ToolKind, ToolRisk},
    policy::PolicyEffect,
};
use serde_json::json;

use super::{
    signals::{RunEntries, Signals},
    synthesize::{InsightKind, Thresholds, synthesize},
};
use crate::records::{
    EntryBody, Hash, RecordEntry,
    entry::{PolicyDecisionRecord, SourceNote, ToolCallRecord, Verdict},
};

fn call(id: &str, tool: &str, risk: ToolRisk) -> EntryBody {
    EntryBody::ToolCallRequested(ToolCallRecord {
        call_id: id.into(),
        tool: tool.into(),
        risk,
        kind: ToolKind::Act,
        arguments: json!({}),
        idempotency_key: format!("k-{id}"),
        call_hash: format!("h-{id}"),
    })
}

fn decided(id: &str, rule: &str, effect: PolicyEffect, enforced: PolicyEffect, dry_run: bool) -> EntryBody {
    EntryBody::PolicyDecision(PolicyDecisionRecord {
        call_id: id.into(),
        effect,
        enforced,
        rule: rule.into(),
        reason: "r".into(),
        dry_run,
    })
}

fn granted(id: &str) -> EntryBody {
    EntryBody::ApprovalGranted {
        call_id: id.into(),
        call_hash: format!("h-{id}"),
        approver: "lee".into(),
        reason: None,
    }
}

fn critic(verdict: Verdict, looping: f64) -> EntryBody {
    EntryBody::CriticVerdict {
        step: 1,
        verdict,
        reason: "r".into(),
        functional_state: json!({"budget": 0.1, "loop": looping, "evidence": 0.0, "gate": 0.0, "conflict": 0.0}),
    }
}

fn failed(reason: &str) -> EntryBody {
    EntryBody::Failed {
        reason: reason.into(),
        message: "m".into(),
    }
}

fn run(id: &str, at: i64, bodies: Vec<EntryBody>) -> RunEntries {
    run_of("sre", id, at, bodies)
}

/// A run of `agent` as read from the store: `bodies` at positions 0, 1, …, each with a hash of
/// its own.
pub(crate) fn run_of(agent: &str, id: &str, at: i64, bodies: Vec<EntryBody>) -> RunEntries {
    let entries = bodies
        .into_iter()
        .enumerate()
        .map(|(seq, body)| {
            let entry = RecordEntry {
                run_id: id.into(),
                seq: seq as u64,
                prev: None,
                at_ms: at,
                body,
                vaulted: None,
            };
            (Hash::of(format!("{id}/{seq}").as_bytes()), entry)
        })
        .collect();
    RunEntries {
        run_id: id.into(),
        agent: agent.into(),
        started_at_ms: at,
        entries,
    }
}

fn requested(id: &str) -> EntryBody {
    EntryBody::ApprovalRequested {
        call_id: id.into(),
        call_hash: format!("h-{id}"),
        approvers: vec!["group:sre-oncall".into()],
    }
}

fn result(id: &str) -> EntryBody {
    EntryBody::ToolResult(crate::records::entry::ToolResultRecord {
        call_id: id.into(),
        ok: true,
        output: json!({}),
        error: None,
        attempts: 1,
        truncated: false,
        cost: None,
        cached: None,
    })
}

/// A destructive restart as the gateway and the runner record it: asked for, held for
/// approval (the step pauses: an escalation to the approvers, the gate signal up), then sent
/// again when the run resumes, decided again, approved and carried out.
fn approved_restart(id: &str) -> Vec<EntryBody> {
    use PolicyEffect::RequireApproval;
    let paused = EntryBody::CriticVerdict {
        step: 1,
        verdict: Verdict::Escalate,
        reason: "call of restart_deployment waits for a human's approval".into(),
        functional_state: json!({"budget": 0.1, "loop": 0.0, "evidence": 0.0, "gate": 1.0, "conflict": 0.0}),
    };
    vec![
        call(id, "restart_deployment", ToolRisk::Destructive),
        decided(id, "g/destructive", RequireApproval, RequireApproval, false),
        requested(id),
        paused,
        call(id, "restart_deployment", ToolRisk::Destructive),
        decided(id, "g/destructive", RequireApproval, RequireApproval, false),
        granted(id),
        result(id),
    ]
}

/// The fixture: a restart approved in every run, a namespace deletion the model asks for in
/// every run and a rule denies, two runs failing on a loop (one escalated), one dead letter, a
/// dryRun rule that would deny what was allowed and one that would allow what was denied, a
/// source cut once.
fn runs() -> Vec<RunEntries> {
    use PolicyEffect::{Allow, Deny};
    let denied_delete = |id: &str| {
        vec![
            call(id, "delete_namespace", ToolRisk::Destructive),
            decided(id, "g/no-delete", Deny, Deny, false),
        ]
    };
    let mut r1 = approved_restart("1.0");
    r1.extend(denied_delete("1.1"));
    r1.push(EntryBody::Completed {
        output: "{}".into(),
        validators: Vec::new(),
    });
    let mut r2 = approved_restart("1.0");
    r2.extend(denied_delete("1.1"));
    r2.extend([critic(Verdict::Halt, 0.6), failed("Looping")]);
    let mut r3 = vec![EntryBody::ContextCompiled {
        digest: "sha256:x".into(),
        tokens: 10,
        budget: 100,
        sources: vec![SourceNote {
            source: "runbooks".into(),
            tokens: 5,
            cut: Some("over its cap".into()),
        }],
    }];
    r3.extend(approved_restart("1.0"));
    r3.extend([
        call("2.0", "delete_namespace", ToolRisk::Destructive),
        // A dryRun policy that would allow: enforcing it changes nothing (the strictest wins).
        decided("2.0", "shadow/lax", Allow, Allow, true),
        decided("2.0", "g/no-delete", Deny, Deny, false),
        call("2.1", "fetch_logs", ToolRisk::ReadOnly),
        // As the gateway records them: a dryRun policy's decision (enforcing nothing) first.
        decided("2.1", "shadow/strict", Deny, Allow, true),
        decided("2.1", "g/reads", Allow, Allow, false),
        EntryBody::DeadLettered {
            call_id: "2.1".into(),
            tool: "fetch_logs".into(),
            idempotency_key: "k".into(),
            attempts: 3,
            error: "timeout".into(),
        },
        critic(Verdict::Escalate, 0.7),
        failed("Looping"),
    ]);
    vec![run("r1", 1_000, r1), run("r2", 2_000, r2), run("r3", 3_000, r3)]
}

fn fixture() -> Signals {
    let mut signals = Signals::default();
    for r in runs() {
        signals.add(&r);
    }
    signals
}

#[test]
fn signals_count_each_call_once_however_often_it_was_recorded() {
    let signals = fixture();
    let sre = &signals.agents["sre"];
    assert_eq!((sre.runs, sre.completed), (3, 1));
    assert_eq!(sre.failed["Looping"].runs, 2);
    let restart = &sre.tools["restart_deployment"];
    assert_eq!(
        restart.calls, 3,
        "a call sent again after its approval counts once"
    );
    assert_eq!(restart.approvals_granted.runs, 3);
    let destructive = &sre.rules["g/destructive"];
    assert_eq!(destructive.decided["require_approval"], 3);
    assert_eq!(destructive.approvals_granted.count, 3);
    let delete = &sre.tools["delete_namespace"];
    assert_eq!((delete.calls, delete.denied["g/no-delete"].count), (3, 3));
    let evidence: Vec<(&str, u64)> = delete.denied["g/no-delete"]
        .evidence
        .iter()
        .map(|e| (e.run_id.as_str(), e.seq))
        .collect();
    assert_eq!(
        evidence,
        [("r3", 11), ("r2", 9), ("r1", 9)],
        "each points at the decision entry, newest run first"
    );
    assert_eq!(sre.rules["shadow/strict"].would_change.count, 1);
    assert_eq!(
        sre.rules.get("shadow/lax").map_or(0, |r| r.would_change.count),
        0,
        "a dryRun rule less strict than what applied would change nothing"
    );
    assert!(
        !sre.rules["shadow/strict"].decided.contains_key("deny"),
        "a dryRun decision is not counted as applied"
    );
    assert_eq!(sre.tools["fetch_logs"].dead_lettered.count, 1);
    assert_eq!(sre.pressure["loop"].runs, 2);
    assert!(
        !sre.pressure.contains_key("gate"),
        "waiting for an approval is no pressure: {:?}",
        sre.pressure
    );
    assert_eq!(
        sre.critic["escalate"].count, 1,
        "the pauses for approval are not escalations"
    );
    assert_eq!(sre.critic["halt"].count, 1);
    assert_eq!(sre.sources_cut["runbooks"].runs, 1);
}

#[test]
fn insights_are_the_recurring_patterns_strongest_first() {
    let insights = synthesize(&fixture(), Thresholds::default());
    let seen: Vec<(InsightKind, &str, u64)> = insights
        .iter()
        .map(|i| (i.kind, i.about.as_str(), i.strength.runs))
        .collect();
    assert_eq!(
        seen,
        [
            (InsightKind::RepeatedDenial, "delete_namespace", 3),
            (InsightKind::ApprovalsAlwaysGranted, "g/destructive", 3),
            (InsightKind::RecurringFailure, "Looping", 2),
            (InsightKind::Pressure, "loop", 2),
            (InsightKind::DryRunWouldChange, "shadow/strict", 1),
        ]
    );
    let denial = &insights[0];
    assert!(
        denial.summary.contains("g/no-delete denied it each time"),
        "{}",
        denial.summary
    );
    assert_eq!(denial.evidence.len(), 3);
    assert_eq!(denial.strength.newest_ms, 3_000);
    // Read in another order (the store lists newest first), the same insights and evidence.
    let mut reversed = Signals::default();
    for r in runs().iter().rev() {
        reversed.add(r);
    }
    assert_eq!(insights, synthesize(&reversed, Thresholds::default()));
}

#[test]
fn thresholds_decide_what_is_a_pattern() {
    let one = Thresholds {
        min_runs: 1,
        min_approvals: 3,
    };
    let kinds: Vec<InsightKind> = synthesize(&fixture(), one).iter().map(|i| i.kind).collect();
    for kind in [
        InsightKind::DeadLetters,
        InsightKind::Escalations,
        InsightKind::SourceCut,
    ] {
        assert!(kinds.contains(&kind), "{kind:?} missing at one run: {kinds:?}");
    }
    let strict = Thresholds {
        min_runs: 4,
        min_approvals: 4,
    };
    let kinds: Vec<InsightKind> = synthesize(&fixture(), strict).iter().map(|i| i.kind).collect();
    assert_eq!(
        kinds,
        [InsightKind::DryRunWouldChange],
        "only the would-be changes stay"
    );
}

#[test]
fn approvals_always_refused_suggest_a_deny() {
    use PolicyEffect::RequireApproval;
    let refused = |id: &str| EntryBody::ApprovalRefused {
        call_id: id.into(),
        call_hash: format!("h-{id}"),
        approver: "lee".into(),
        reason: "no".into(),
    };
    let mut signals = Signals::default();
    for (i, at) in [1_000, 2_000, 3_000].into_iter().enumerate() {
        signals.add(&run(
            &format!("r{i}"),
            at,
            vec![
                call("1.0", "scale_down", ToolRisk::Destructive),
                decided("1.0", "g/scale", RequireApproval, RequireApproval, false),
                refused("1.0"),
            ],
        ));
    }
    let insights = synthesize(&signals, Thresholds::default());
    assert_eq!(insights.len(), 1);
    assert_eq!(insights[0].kind, InsightKind::ApprovalsAlwaysRefused);
    assert!(insights[0].consider.contains("make g/scale deny"));
    assert!(
        insights[0]
            .summary
            .contains("or the approval did not match the call")
    );
}

/// People's corrections count against the tool of the call they name (or the agent), and two
/// runs corrected the same way are an insight pointing at the corrected entries.
#[test]
fn corrections_of_the_same_kind_are_an_insight() {
    use crate::feedback::{AboutEntry, FeedbackLabel, FeedbackRecord};
    let runs = runs();
    let mut signals = Signals::default();
    for run in &runs[..2] {
        signals.add(run);
        let (hash, entry) = &run.entries[0];
        let correction = |label, entry: Option<AboutEntry>| FeedbackRecord {
            run_id: run.run_id.clone(),
            agent: run.agent.clone(),
            session_id: "s".into(),
            entry,
            label,
            correction: "ask the service owner".into(),
            by: "lee".into(),
            at_ms: 5_000,
            request_id: None,
        };
        let about_restart = AboutEntry {
            seq: entry.seq,
            hash: *hash,
            call_id: Some("1.0".into()),
            tool: Some("restart_deployment".into()),
        };
        signals.add_corrections(
            run,
            &[
                correction(FeedbackLabel::ShouldHaveAsked, Some(about_restart)),
                correction(FeedbackLabel::WrongAnswer, None),
            ],
        );
    }
    let sre = &signals.agents["sre"];
    assert_eq!(
        sre.tools["restart_deployment"].corrections["should-have-asked"].runs,
        2
    );
    assert_eq!(sre.corrections["wrong-answer"].runs, 2);
    let insights = synthesize(&signals, Thresholds::default());
    let corrected: Vec<&str> = insights
        .iter()
        .filter(|i| i.kind == InsightKind::Corrections)
        .map(|i| i.about.as_str())
        .collect();
    assert_eq!(corrected, ["its runs", "restart_deployment"]);
    let restart = insights
        .iter()
        .find(|i| i.kind == InsightKind::Corrections && i.about == "restart_deployment")
        .expect("insight");
    assert!(
        restart.consider.contains("requires approval"),
        "{}",
        restart.consider
    );
    assert_eq!(restart.evidence[0].seq, 0);
}
