//! Calls that were decided and started but have no recorded result: the gateway makes a call's
//! decision (and the approval it used) durable *before* the tool acts, so after a crash the
//! record says which calls may have acted. Such a call is never decided again; what happens to
//! it depends on the tool: one that is read-only or idempotent is sent again with the same
//! idempotency key, any other is not re-executed — its outcome is unknown and a human decides.
//! In the gateway service another replica may still be carrying the call, so a recent one is
//! reported as in progress.

use std::{collections::HashMap, sync::Mutex};

use contextos_crds::{agent::Tool, common::ToolRisk, policy::PolicyEffect};

use crate::records::{EntryBody, RecordEntry};

/// Extra time, beyond the tool's own timeout, an execution is assumed to be alive.
const GRACE_MS: i64 = 5_000;

/// A call that started without a recorded result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    pub call_id: String,
    /// The recorded call's hash (run, call, tool, arguments): a call presented later under the
    /// same idempotency key must be this very call.
    pub call_hash: String,
    /// When its go-ahead was recorded (ms since the epoch).
    pub at_ms: i64,
    /// Questions its remote agent (A2A) asked so far.
    pub asked: u32,
    /// The question its remote agent waits on a person to answer, if it does.
    pub waiting: Option<Question>,
    /// The question a person answered last, and the answer, once the answer is on record: it
    /// may or may not have reached the remote agent.
    pub answered: Option<Answer>,
}

/// A remote agent's question, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// `<call id>.q<n>-<hash>`: what a person's resolution names.
    pub id: String,
    pub asked: crate::gateway::adapters::a2a::RemoteQuestion,
}

/// A person's answer to a question, on record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub question: Question,
    pub text: String,
    pub resolver: String,
}

/// The id of the `n`-th question (from 1) of call `call_id` whose hash is `call_hash`: a
/// person's answer names it, and answers nothing else — not another run's call, nor a call
/// sent later under the same call id.
pub fn question_id(call_id: &str, call_hash: &str, n: u32) -> String {
    let short: String = call_hash.chars().take(8).collect();
    format!("{call_id}.q{n}-{short}")
}

/// What to do with a call that started before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resumption {
    /// Send it again with the same idempotency key (the tool dedupes, or the call reads only).
    Retry,
    /// Another executor may still be carrying it: answer later.
    InProgress,
    /// Do not execute it again; why, for the human who resolves it.
    Unknown(String),
    /// Its remote agent asked a question and waits for a person's answer: nothing ran since,
    /// wherever the call was carried.
    AwaitingInput(Question),
    /// A person's answer is on record and may have reached the remote agent: follow its task,
    /// and send the answer only if the task still waits on that question.
    FollowAnswer(Answer),
}

/// Decides what to do with `started`, a call of `tool` (pure).
pub fn resumption(tool: &Tool, started: &Started, now_ms: i64, others_may_run: bool) -> Resumption {
    let deadline = started
        .at_ms
        .saturating_add(i64::from(tool.timeout_seconds).saturating_mul(1000))
        .saturating_add(GRACE_MS);
    if let Some(question) = &started.waiting {
        return Resumption::AwaitingInput(question.clone());
    }
    if let Some(answer) = &started.answered {
        // `at_ms` is when the answer went on record: the executor sending it may be at work.
        if others_may_run && now_ms < deadline {
            return Resumption::InProgress;
        }
        return Resumption::FollowAnswer(answer.clone());
    }
    if others_may_run && now_ms < deadline {
        return Resumption::InProgress;
    }
    if tool.idempotent || tool.risk == ToolRisk::ReadOnly {
        return Resumption::Retry;
    }
    Resumption::Unknown(format!(
        "call {} of {} was started before an interruption and has no recorded result; {} is neither idempotent nor read-only, so it is not sent again — check whether it acted, then resolve the Session",
        started.call_id, tool.name, tool.name
    ))
}

/// The started calls of the runs a gateway serves, by idempotency key.
#[derive(Debug, Default)]
pub struct Intents {
    started: Mutex<HashMap<String, Started>>,
    /// Idempotency keys by (run, call id): a decision or result may be read in a later slice
    /// of a record than its request.
    keys: Mutex<HashMap<(String, String), (String, String)>>,
    /// Questions remote agents asked, by run.
    questions: Mutex<HashMap<String, u32>>,
}

impl Intents {
    /// Folds recorded entries in, in order: a call starts when its allow decision (or the
    /// approval it used) is recorded, and ends with its result.
    pub fn fold<'e>(&self, entries: impl IntoIterator<Item = &'e RecordEntry>) {
        let (Ok(mut started), Ok(mut keys)) = (self.started.lock(), self.keys.lock()) else {
            return;
        };
        for entry in entries {
            let key_of = |call_id: &str| keys.get(&(entry.run_id.clone(), call_id.to_owned())).cloned();
            let go = |call_id: &str, (key, hash): (String, String)| {
                (
                    key,
                    Started {
                        call_id: call_id.to_owned(),
                        call_hash: hash,
                        at_ms: entry.at_ms,
                        asked: 0,
                        waiting: None,
                        answered: None,
                    },
                )
            };
            match &entry.body {
                EntryBody::ToolCallRequested(call) => {
                    keys.insert(
                        (entry.run_id.clone(), call.call_id.clone()),
                        (call.idempotency_key.clone(), call.call_hash.clone()),
                    );
                }
                EntryBody::PolicyDecision(decision)
                    if !decision.dry_run && decision.enforced == PolicyEffect::Allow =>
                {
                    if let Some(known) = key_of(&decision.call_id) {
                        let (key, call) = go(&decision.call_id, known);
                        started.insert(key, call);
                    }
                }
                EntryBody::ApprovalGranted { call_id, .. } => {
                    if let Some(known) = key_of(call_id) {
                        let (key, call) = go(call_id, known);
                        started.insert(key, call);
                    }
                }
                EntryBody::ToolResult(result) => {
                    if let Some((key, _)) = key_of(&result.call_id) {
                        started.remove(&key);
                    }
                }
                EntryBody::RemoteInputRequired {
                    call_id,
                    question_id,
                    task,
                    question,
                    message_id,
                    ..
                } => {
                    if let Ok(mut questions) = self.questions.lock() {
                        *questions.entry(entry.run_id.clone()).or_default() += 1;
                    }
                    if let Some(call) = key_of(call_id).and_then(|(key, _)| started.get_mut(&key)) {
                        call.asked += 1;
                        call.waiting = Some(Question {
                            id: question_id.clone(),
                            asked: crate::gateway::adapters::a2a::RemoteQuestion {
                                task: task.clone(),
                                text: question.clone(),
                                message_id: message_id.clone(),
                            },
                        });
                    }
                }
                // Answered: the answer is on its way, from when it went on record (written again
                // before it is sent again after an interruption). Declined: the call's result
                // comes in the same write.
                EntryBody::CallResolved {
                    call_id,
                    outcome,
                    note,
                    resolver,
                } => {
                    let Some(call) = key_of(call_id).and_then(|(key, _)| started.get_mut(&key)) else {
                        continue;
                    };
                    let question = call
                        .waiting
                        .take()
                        .or_else(|| call.answered.take().map(|a| a.question));
                    if let Some(question) = question
                        && *outcome == contextos_crds::session::ResolvedOutcome::Answered
                    {
                        call.answered = Some(Answer {
                            question,
                            text: note.clone().unwrap_or_default(),
                            resolver: resolver.clone(),
                        });
                        call.at_ms = entry.at_ms;
                    }
                }
                _ => {}
            }
        }
    }

    /// How many questions remote agents asked in run `run_id`.
    pub fn questions_in(&self, run_id: &str) -> u32 {
        self.questions
            .lock()
            .ok()
            .and_then(|q| q.get(run_id).copied())
            .unwrap_or(0)
    }

    /// The started call with this idempotency key, if it has no result yet.
    pub fn started(&self, idempotency_key: &str) -> Option<Started> {
        self.started.lock().ok()?.get(idempotency_key).cloned()
    }

    /// Forgets everything (before folding a whole record in again).
    pub fn clear(&self) {
        if let Ok(mut started) = self.started.lock() {
            started.clear();
        }
        if let Ok(mut keys) = self.keys.lock() {
            keys.clear();
        }
        if let Ok(mut questions) = self.questions.lock() {
            questions.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(risk: &str, idempotent: bool) -> Tool {
        serde_json::from_value(serde_json::json!({
            "name": "restart", "description": "d", "risk": risk, "kind": "act",
            "idempotent": idempotent, "timeoutSeconds": 10,
            "adapter": {"http": {"url": "http://tools/restart"}},
        }))
        .expect("tool")
    }

    #[test]
    fn a_started_call_is_retried_only_if_it_cannot_act_twice() {
        let started = Started {
            call_id: "4.0".into(),
            call_hash: "h".into(),
            at_ms: 1_000,
            asked: 0,
            waiting: None,
            answered: None,
        };
        let late = 1_000 + 10_000 + GRACE_MS;
        assert_eq!(
            resumption(&tool("read_only", false), &started, late, false),
            Resumption::Retry
        );
        assert_eq!(
            resumption(&tool("destructive", true), &started, late, false),
            Resumption::Retry
        );
        assert!(matches!(
            resumption(&tool("destructive", false), &started, late, false),
            Resumption::Unknown(why) if why.contains("not sent again")
        ));
        // Another replica may still be carrying a recent call; a single process knows it is not.
        assert_eq!(
            resumption(&tool("destructive", false), &started, 2_000, true),
            Resumption::InProgress
        );
        assert!(matches!(
            resumption(&tool("destructive", false), &started, 2_000, false),
            Resumption::Unknown(_)
        ));
    }

    #[test]
    fn a_call_waiting_on_a_question_waits_wherever_it_is() {
        use crate::records::RecordEntry;
        let task = crate::gateway::adapters::a2a::RemoteTask {
            task_id: "t".into(),
            context_id: "c".into(),
        };
        let entry = |seq: u64, body: EntryBody| RecordEntry {
            run_id: "r".into(),
            seq,
            prev: None,
            at_ms: 1_000,
            body,
            vaulted: None,
        };
        let intents = Intents::default();
        intents.fold(&[
            entry(
                0,
                EntryBody::ToolCallRequested(crate::records::entry::ToolCallRecord {
                    call_id: "4.0".into(),
                    tool: "ask_billing".into(),
                    risk: ToolRisk::Delegated,
                    kind: contextos_crds::common::ToolKind::Act,
                    arguments: serde_json::json!({}),
                    idempotency_key: "k".into(),
                    call_hash: "h".into(),
                }),
            ),
            entry(
                1,
                EntryBody::PolicyDecision(crate::records::entry::PolicyDecisionRecord {
                    call_id: "4.0".into(),
                    effect: PolicyEffect::Allow,
                    enforced: PolicyEffect::Allow,
                    rule: "allow".into(),
                    reason: String::new(),
                    dry_run: false,
                }),
            ),
            entry(
                2,
                EntryBody::RemoteInputRequired {
                    call_id: "4.0".into(),
                    question_id: question_id("4.0", "h", 1),
                    task,
                    question: "Which region?".into(),
                    message_id: None,
                    cost: None,
                },
            ),
        ]);
        let started = intents.started("k").expect("started");
        assert_eq!(started.asked, 1);
        let tool = tool("delegated", true);
        // Even a retryable call, even where a replica may be carrying it: it waits on a person.
        for others in [false, true] {
            assert!(matches!(
                resumption(&tool, &started, 1_500, others),
                Resumption::AwaitingInput(q) if q.id == "4.0.q1-h" && q.asked.text == "Which region?"
            ));
        }
        // Once answered, the answer may have been sent: its task is followed (never the first
        // message sent again), after the executor sending it had its time.
        let mut answered = entry(
            3,
            EntryBody::CallResolved {
                call_id: "4.0".into(),
                outcome: contextos_crds::session::ResolvedOutcome::Answered,
                resolver: "alice".into(),
                note: Some("EU".into()),
            },
        );
        answered.at_ms = 50_000;
        intents.fold(&[answered]);
        let started = intents.started("k").expect("started");
        assert_eq!(
            (started.asked, started.waiting.clone(), started.at_ms),
            (1, None, 50_000)
        );
        assert_eq!(resumption(&tool, &started, 51_000, true), Resumption::InProgress);
        for others in [false, true] {
            assert!(matches!(
                resumption(&tool, &started, 100_000, others),
                Resumption::FollowAnswer(a) if a.question.id == "4.0.q1-h" && a.text == "EU" && a.resolver == "alice"
            ));
        }
    }
}
