//! Renders record entries for people: one line per entry saying who did what and why.

use serde_json::Value;

use super::entry::{EntryBody, RecordEntry};

/// Longest argument/output excerpt shown on a timeline line.
const EXCERPT: usize = 160;

fn recalled_for(recall: &crate::memory::desk::RecallRecord) -> String {
    match (&recall.source, &recall.call_id) {
        (Some(source), _) => format!("source {source}"),
        (None, Some(call)) => format!("call {call}"),
        (None, None) => "the run".into(),
    }
}

/// `(actor, what happened)` for one entry.
pub fn describe(body: &EntryBody) -> (&'static str, String) {
    match body {
        EntryBody::RunStarted {
            session_id,
            agent,
            pinned,
            ..
        } => (
            "operator",
            format!(
                "run started for session {session_id}, agent {agent}; pinned pack {} and {} polic{}",
                short(&pinned.context_pack),
                pinned.policies.len(),
                if pinned.policies.len() == 1 { "y" } else { "ies" }
            ),
        ),
        EntryBody::ContextCompiled {
            digest,
            tokens,
            budget,
            sources,
        } => {
            let cut: Vec<String> = sources
                .iter()
                .filter_map(|s| s.cut.as_ref().map(|why| format!("{} ({why})", s.source)))
                .collect();
            let cut = if cut.is_empty() {
                "nothing cut".to_owned()
            } else {
                format!("cut: {}", cut.join(", "))
            };
            (
                "compiler",
                format!(
                    "context {} compiled: {tokens}/{budget} tokens, {cut}",
                    short(digest)
                ),
            )
        }
        EntryBody::ModelTurn {
            step,
            model,
            response,
            prompt_tokens,
            completion_tokens,
            cost,
            ..
        } => (
            "model",
            format!(
                "step {step}: {model} answered ({prompt_tokens}+{completion_tokens} tokens{}): {}",
                cost.as_ref()
                    .map_or_else(String::new, |c| format!(", {} {}", c.nanos, c.currency)),
                excerpt(response)
            ),
        ),
        EntryBody::ModelSpend {
            step,
            model,
            tokens,
            reason,
            cost,
        } => (
            "gateway",
            format!(
                "step {step}: {model} paid for {tokens} tokens no turn holds ({reason}{})",
                cost.as_ref()
                    .map_or_else(String::new, |c| format!("; {} {}", c.nanos, c.currency)),
            ),
        ),
        EntryBody::ToolsOffered {
            step,
            scoring,
            selection,
        } => {
            let by = match scoring {
                crate::discovery::Scoring::Embeddings { model } => format!("embeddings ({model})"),
                crate::discovery::Scoring::Bm25 { fallback: None } => "BM25".into(),
                crate::discovery::Scoring::Bm25 { fallback: Some(why) } => {
                    format!("BM25 ({why})")
                }
            };
            let offered: Vec<String> = selection
                .offered
                .iter()
                .map(|o| format!("{} {:.2}", o.tool, o.score))
                .collect();
            let mut line = format!("step {step}: offered by {by}: {}", offered.join(", "));
            if !selection.denied.is_empty() {
                line.push_str(&format!(
                    "; never offered (denied): {}",
                    selection.denied.join(", ")
                ));
            }
            if !selection.over_budget.is_empty() {
                line.push_str(&format!(
                    "; over the schema budget: {}",
                    selection.over_budget.join(", ")
                ));
            }
            ("runner", line)
        }
        EntryBody::MemoryRecalled(recall) => (
            "gateway",
            match (&recall.scope, &recall.note) {
                (_, Some(note)) => format!("recalled nothing for {}: {note}", recalled_for(recall)),
                (scope, None) => format!(
                    "recalled {} item(s) of {}{} for {}{}",
                    recall.offered.len(),
                    scope.as_ref().map_or_else(String::new, ToString::to_string),
                    recall
                        .entity_type
                        .as_ref()
                        .map_or_else(String::new, |t| format!(" about an entity of type {t}")),
                    recalled_for(recall),
                    if recall.excluded_total == 0 {
                        String::new()
                    } else {
                        format!("; held back {} (consent or expiry)", recall.excluded_total)
                    }
                ),
            },
        ),
        EntryBody::MemoryCandidate(candidate) => {
            let (outcome, reason) = match &candidate.decision {
                crate::consent::Promotion::Promote { reason } => ("kept", reason),
                crate::consent::Promotion::Hold { reason } => ("held", reason),
                crate::consent::Promotion::Drop { reason } => ("dropped", reason),
            };
            (
                "gateway",
                format!(
                    "memory candidate of call {} {outcome}: {reason}",
                    candidate.call_id
                ),
            )
        }
        EntryBody::ToolCallRequested(call) => (
            "model",
            format!(
                "asked to call {} [{}/{}] with {}",
                call.tool,
                call.risk.as_str(),
                call.kind.as_str(),
                excerpt(&call.arguments)
            ),
        ),
        EntryBody::PolicyDecision(d) => {
            let mode = if d.dry_run { " (dry run: not enforced)" } else { "" };
            (
                "gateway",
                format!("{} by {}{mode}: {}", d.effect.as_str(), d.rule, d.reason),
            )
        }
        EntryBody::ApprovalRequested {
            approvers, call_hash, ..
        } => (
            "gateway",
            format!(
                "approval requested from {} for call {}",
                approvers.join(", "),
                short(call_hash)
            ),
        ),
        EntryBody::CallResolved {
            call_id,
            outcome,
            resolver,
            note,
        } => (
            approver_actor(),
            format!(
                "{resolver} {}{}",
                match outcome {
                    contextos_crds::session::ResolvedOutcome::Acted =>
                        format!("found that call {call_id} acted"),
                    contextos_crds::session::ResolvedOutcome::DidNotAct =>
                        format!("found that call {call_id} did not act"),
                    contextos_crds::session::ResolvedOutcome::Answered =>
                        format!("answered the remote agent of call {call_id}"),
                },
                note.as_deref().map(|n| format!(": {n}")).unwrap_or_default()
            ),
        ),
        EntryBody::RemoteInputRequired {
            call_id,
            question_id,
            task,
            question,
            ..
        } => (
            "gateway",
            format!(
                "the remote agent of call {call_id} asks a person ({question_id}, task {}): {question}",
                task.task_id
            ),
        ),
        EntryBody::ApprovalGranted {
            approver,
            call_hash,
            reason,
            ..
        } => (
            approver_actor(),
            match reason {
                Some(reason) => format!(
                    "{approver} approved call {}: {}",
                    short(call_hash),
                    cut_text(reason)
                ),
                None => format!("{approver} approved call {}", short(call_hash)),
            },
        ),
        EntryBody::ApprovalRefused {
            approver,
            reason,
            call_hash,
            ..
        } => (
            approver_actor(),
            format!(
                "approval of call {} refused ({approver}): {reason}",
                short(call_hash)
            ),
        ),
        EntryBody::ToolResult(r) if r.cached.is_some() => {
            let from = r.cached.as_ref().map_or_else(String::new, |c| {
                format!("call {} of run {}", c.call_id, short(&c.run_id))
            });
            let cut = if r.truncated { " [response truncated]" } else { "" };
            (
                "tool",
                format!("ok from the cache ({from}){cut}: {}", excerpt(&r.output)),
            )
        }
        EntryBody::ToolResult(r) => {
            let status = if r.ok { "ok" } else { "failed" };
            let error = r.error.as_deref().map(|e| format!(" — {e}")).unwrap_or_default();
            let cut = if r.truncated { " [response truncated]" } else { "" };
            let cost = r
                .cost
                .as_ref()
                .map_or_else(String::new, |c| format!(", {} {}", c.nanos, c.currency));
            (
                "tool",
                format!(
                    "{status} after {} attempt(s){cost}{cut}: {}{error}",
                    r.attempts,
                    excerpt(&r.output)
                ),
            )
        }
        EntryBody::DeadLettered {
            tool,
            attempts,
            error,
            idempotency_key,
            ..
        } => (
            "gateway",
            format!(
                "dead-lettered {tool} after {attempts} attempt(s) (idempotency key {idempotency_key}): {error}"
            ),
        ),
        EntryBody::CriticVerdict {
            step,
            verdict,
            reason,
            ..
        } => (
            "critic",
            format!("step {step}: {verdict:?} — {reason}").to_lowercase(),
        ),
        EntryBody::Checkpoint { step, .. } => ("runner", format!("checkpoint after step {step}")),
        EntryBody::Completed { output, validators } => (
            "runner",
            format!(
                "completed; validators passed: [{}]; output: {}",
                validators.join(", "),
                cut_text(output)
            ),
        ),
        EntryBody::Failed { reason, message } => ("runner", format!("failed ({reason}): {message}")),
        EntryBody::AccessRefused { caller, reason } => ("gateway", format!("refused {caller}: {reason}")),
        EntryBody::Blob {
            blob,
            size,
            body_type,
        } => (
            "store",
            format!(
                "{body_type} stored out of line ({size} bytes, blob {})",
                short(&blob.to_hex())
            ),
        ),
    }
}

/// One timeline line: `#seq  HH:MM:SS.mmm  actor  type  text`. What a field says is shown with
/// its control and invisible characters escaped (`\n`, `\u{202e}`): whoever wrote it (an
/// approver's note, a tool's error, a model's output) cannot make one entry read as several,
/// nor turn text around.
pub fn line(entry: &RecordEntry) -> String {
    let (actor, text) = describe(&entry.body);
    let text = crate::text::for_terminal(&text);
    let time = jiff::Timestamp::from_millisecond(entry.at_ms)
        .map(|t| t.strftime("%H:%M:%S%.3f").to_string())
        .unwrap_or_else(|_| entry.at_ms.to_string());
    format!(
        "#{:<4} {time}  {actor:<8} {:<20} {text}",
        entry.seq,
        entry.body.type_name()
    )
}

fn approver_actor() -> &'static str {
    "approver"
}

fn short(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.chars().take(12).collect()
}

fn excerpt(value: &Value) -> String {
    cut_text(&value.to_string())
}

fn cut_text(text: &str) -> String {
    if text.chars().count() <= EXCERPT {
        return text.to_owned();
    }
    let head: String = text.chars().take(EXCERPT).collect();
    format!("{head}…")
}

#[cfg(test)]
mod tests {
    use contextos_crds::policy::PolicyEffect;

    use super::*;
    use crate::records::entry::PolicyDecisionRecord;

    #[test]
    fn a_policy_decision_says_which_rule_decided_and_why() {
        let body = EntryBody::PolicyDecision(PolicyDecisionRecord {
            call_id: "c1".into(),
            effect: PolicyEffect::Deny,
            enforced: PolicyEffect::Deny,
            rule: "oncall-guardrails/no-namespace-deletion".into(),
            reason: "never delete namespaces".into(),
            dry_run: false,
        });
        let (actor, text) = describe(&body);
        assert_eq!(actor, "gateway");
        assert_eq!(
            text,
            "deny by oncall-guardrails/no-namespace-deletion: never delete namespaces"
        );
    }

    #[test]
    fn long_outputs_are_cut() {
        let body = EntryBody::Completed {
            output: "y".repeat(1000),
            validators: vec![],
        };
        assert!(describe(&body).1.chars().count() < 300);
    }

    /// An approver's note (or any field) cannot forge timeline lines or turn text around.
    #[test]
    fn a_note_with_line_breaks_and_direction_marks_stays_on_its_own_line() {
        let entry = RecordEntry {
            run_id: "r".into(),
            seq: 7,
            at_ms: 0,
            prev: None,
            vaulted: None,
            body: EntryBody::ApprovalGranted {
                call_id: "4.0".into(),
                call_hash: "ab".repeat(32),
                approver: "dana@example.com".into(),
                reason: Some(
                    "ok\n#8    00:00:00.000  approver approval_granted  mallory approved\u{202e}".into(),
                ),
            },
        };
        let shown = line(&entry);
        assert_eq!(shown.lines().count(), 1, "{shown}");
        assert!(shown.contains("ok\\n#8"), "{shown}");
        assert!(shown.contains("\\u{202e}"), "{shown}");
        assert!(!shown.contains('\u{202e}'), "{shown}");
    }
}
