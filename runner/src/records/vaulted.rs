//! What a record entry says about the person its run is about, and its encryption.
//!
//! In a run about a subject (a Session with `spec.subject`), every entry is marked with that
//! subject and the fields that carry what the run saw and said — the model's responses, tool
//! arguments and results, errors, checkpoints, the final output, what memory gave it — hold
//! envelopes encrypted under the run's key (see `crate::vault`). What governs and explains the
//! run stays readable: which tool, its risk, the policy decision and rule, approvals, hashes.
//! The chain hashes the envelopes, so it verifies whether or not the key still exists; once
//! the subject is erased, the fields read as [`ERASED`].

use serde_json::Value;

use super::entry::EntryBody;
use crate::vault::{
    SecretKey, VaultError,
    cipher::{self, ENVELOPE_PREFIX},
};

/// What an encrypted field reads as once its subject is erased.
pub const ERASED: &str = "[erased]";

/// A field that holds what a run learned: its place and its type.
enum Field<'a> {
    Value(&'a mut Value),
    Text(&'a mut String),
    MaybeText(&'a mut Option<String>),
}

/// The fields of `body` that are encrypted in a run about a subject, each with its label (the
/// entry type and field name: an envelope opens only in the field it was made for).
fn fields(body: &mut EntryBody) -> Vec<(&'static str, Field<'_>)> {
    use Field::{MaybeText, Text, Value};
    match body {
        EntryBody::ModelTurn { response, .. } => model_turn_fields(response),
        EntryBody::ToolCallRequested(call) => {
            vec![("tool_call_requested.arguments", Value(&mut call.arguments))]
        }
        EntryBody::ToolResult(result) => vec![
            ("tool_result.output", Value(&mut result.output)),
            ("tool_result.error", MaybeText(&mut result.error)),
        ],
        EntryBody::CallResolved { note, .. } => vec![("call_resolved.note", MaybeText(note))],
        EntryBody::RemoteInputRequired { question, .. } => {
            vec![("remote_input_required.question", Text(question))]
        }
        EntryBody::DeadLettered { error, .. } => vec![("dead_lettered.error", Text(error))],
        EntryBody::Checkpoint { state, .. } => vec![("checkpoint.state", Value(state))],
        EntryBody::Completed { output, .. } => vec![("completed.output", Text(output))],
        EntryBody::Failed { message, .. } => vec![("failed.message", Text(message))],
        // Its reason may quote what a validator found in the answer.
        EntryBody::CriticVerdict {
            reason,
            functional_state,
            ..
        } => vec![
            ("critic_verdict.reason", Text(reason)),
            ("critic_verdict.functional_state", Value(functional_state)),
        ],
        // A schema refusal quotes the argument that failed it.
        EntryBody::PolicyDecision(decision) => {
            vec![("policy_decision.reason", Text(&mut decision.reason))]
        }
        EntryBody::ApprovalRefused { reason, .. } => vec![("approval_refused.reason", Text(reason))],
        EntryBody::ApprovalGranted { reason, .. } => vec![("approval_granted.reason", MaybeText(reason))],
        // Why a request was refused may quote what the request said.
        EntryBody::AccessRefused { reason, .. } => vec![("access_refused.reason", Text(reason))],
        EntryBody::ContextCompiled { sources, .. } => sources
            .iter_mut()
            .map(|note| ("context_compiled.sources.cut", MaybeText(&mut note.cut)))
            .collect(),
        // A ContextPack source's query is the pack's (and a replay matches recalls by it); a
        // `recall` call's is the model's, and may say anything.
        EntryBody::MemoryRecalled(recall) => {
            let from_pack = recall.source.is_some();
            let mut fields = vec![
                ("memory_recalled.content", Text(&mut recall.content)),
                // Why nothing was read may quote the query.
                ("memory_recalled.note", MaybeText(&mut recall.note)),
            ];
            if !from_pack {
                fields.push(("memory_recalled.query", Text(&mut recall.query)));
            }
            fields
        }
        EntryBody::RunStarted { .. }
        | EntryBody::ApprovalRequested { .. }
        | EntryBody::MemoryCandidate(_)
        // Tool names and scores only (checked by `check_readable_fields`).
        | EntryBody::ToolsOffered { .. }
        // A model's name and counts, written by the gateway.
        | EntryBody::ModelSpend { .. }
        // A blob's body is encrypted before it is moved to the blob.
        | EntryBody::Blob { .. } => Vec::new(),
    }
}

/// A model turn's text and its calls' arguments; the calls' ids and tools stay readable, so a
/// replay of an erased run still makes the same calls (with erased arguments). A response that
/// is not a turn's object is encrypted whole.
fn model_turn_fields(response: &mut Value) -> Vec<(&'static str, Field<'_>)> {
    let Value::Object(turn) = response else {
        return vec![("model_turn.response", Field::Value(response))];
    };
    let mut out = Vec::new();
    for (name, value) in turn.iter_mut() {
        match (name.as_str(), value) {
            ("content", content) => out.push(("model_turn.response.content", Field::Value(content))),
            ("tool_calls", Value::Array(calls)) => {
                for call in calls {
                    match call {
                        Value::Object(call) => {
                            if let Some(arguments) = call.get_mut("arguments") {
                                out.push((
                                    "model_turn.response.tool_calls.arguments",
                                    Field::Value(arguments),
                                ));
                            }
                        }
                        other => out.push(("model_turn.response.tool_calls", Field::Value(other))),
                    }
                }
            }
            ("tool_calls", other) => out.push(("model_turn.response.tool_calls", Field::Value(other))),
            _ => {}
        }
    }
    out
}

/// Encrypts the fields of `body` that say what the run learned, under the run's `key`.
pub fn lock(body: &mut EntryBody, key: &SecretKey) -> Result<(), VaultError> {
    for (label, field) in fields(body) {
        match field {
            Field::Value(value) => {
                let plain = super::canonical::to_canonical_bytes(value);
                *value = Value::String(key.lock(label, &plain)?);
            }
            Field::Text(text) => *text = key.lock(label, text.as_bytes())?,
            Field::MaybeText(Some(text)) => *text = key.lock(label, text.as_bytes())?,
            Field::MaybeText(None) => {}
        }
    }
    Ok(())
}

/// Decrypts what [`lock`] encrypted; with no key (the subject is erased) the fields read as
/// [`ERASED`]. A field that is not an envelope, or does not open, is an error: the entry was
/// not written by a recorder holding this run's key.
pub fn unlock(body: &mut EntryBody, key: Option<&SecretKey>) -> Result<(), VaultError> {
    for (label, field) in fields(body) {
        match field {
            Field::Value(value) => {
                let Value::String(envelope) = &*value else {
                    return Err(not_locked(label));
                };
                *value = match key {
                    None if cipher::is_envelope(envelope) => Value::String(ERASED.into()),
                    None => return Err(not_locked(label)),
                    Some(key) => {
                        let plain = open(key, label, envelope)?;
                        serde_json::from_slice(&plain).map_err(|e| {
                            VaultError::Cipher(format!("{label}: opened to no JSON value: {e}"))
                        })?
                    }
                };
            }
            Field::Text(text) => *text = open_text(key, label, text)?,
            Field::MaybeText(Some(text)) => *text = open_text(key, label, text)?,
            Field::MaybeText(None) => {}
        }
    }
    Ok(())
}

/// Checks that every field [`lock`] encrypts holds an envelope that opens with `key`: a
/// runner's entries for a run about a subject are taken only so.
pub fn check_locked(body: &EntryBody, key: &SecretKey) -> Result<(), VaultError> {
    unlock(&mut body.clone(), Some(key))
}

/// Checks that what stays readable in an entry a runner sends for a run about a subject is
/// what it claims to be — a digest, a name, a reason code — and no place for free text: the
/// runner is not trusted to keep the subject's data out of it.
pub fn check_readable_fields(body: &EntryBody) -> Result<(), String> {
    let name = |what: &str, text: &str| {
        let ok = !text.is_empty()
            && text.len() <= 253
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'/' | b':'));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what} {:?} is not a name",
                text.chars().take(32).collect::<String>()
            ))
        }
    };
    match body {
        EntryBody::ContextCompiled { digest, sources, .. } => {
            let hex = digest.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("context_compiled.digest is not a sha256: digest".into());
            }
            if sources.len() > 256 {
                return Err("context_compiled names more than 256 sources".into());
            }
            sources
                .iter()
                .try_for_each(|note| name("a context source", &note.source))
        }
        EntryBody::Failed { reason, .. } => {
            let code = reason.len() <= 64
                && reason.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
                && reason.bytes().all(|b| b.is_ascii_alphanumeric());
            if code {
                Ok(())
            } else {
                Err("failed.reason is not a reason code (CamelCase, at most 64 letters)".into())
            }
        }
        EntryBody::Completed { validators, .. } => {
            if validators.len() > 64 {
                return Err("completed names more than 64 validators".into());
            }
            validators.iter().try_for_each(|v| name("a validator", v))
        }
        EntryBody::ToolsOffered {
            scoring, selection, ..
        } => {
            if let crate::discovery::Scoring::Embeddings { model } = scoring {
                name("an embedding model", model)?;
            }
            let tools = selection
                .offered
                .iter()
                .map(|o| &o.tool)
                .chain(&selection.denied)
                .chain(&selection.over_budget);
            let mut count = 0;
            for tool in tools {
                count += 1;
                if count > 256 {
                    return Err("tools_offered names more than 256 tools".into());
                }
                name("a tool", tool)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn open_text(key: Option<&SecretKey>, label: &str, text: &str) -> Result<String, VaultError> {
    match key {
        None if cipher::is_envelope(text) => Ok(ERASED.into()),
        None => Err(not_locked(label)),
        Some(key) => String::from_utf8(open(key, label, text)?)
            .map_err(|_| VaultError::Cipher(format!("{label}: opened to text that is not UTF-8"))),
    }
}

fn open(key: &SecretKey, label: &str, envelope: &str) -> Result<Vec<u8>, VaultError> {
    if !cipher::is_envelope(envelope) {
        return Err(not_locked(label));
    }
    key.unlock(label, envelope)
}

fn not_locked(label: &str) -> VaultError {
    VaultError::Cipher(format!(
        "{label}: an entry of a run about a subject holds this field in the clear (it must be a {ENVELOPE_PREFIX}… envelope)"
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::records::entry::ToolResultRecord;

    fn result() -> EntryBody {
        EntryBody::ToolResult(ToolResultRecord {
            call_id: "c1".into(),
            ok: false,
            output: json!({"customer": "ann@example.com", "n": 2}),
            error: Some("ann@example.com bounced".into()),
            attempts: 1,
            truncated: false,
            cost: None,
            cached: None,
        })
    }

    #[test]
    fn locked_fields_hide_their_text_and_open_again() {
        let key = SecretKey::generate().expect("random");
        let mut body = result();
        lock(&mut body, &key).expect("locks");
        let encoded = String::from_utf8(body.encode()).expect("utf-8");
        assert!(!encoded.contains("ann@"), "{encoded}");
        assert!(
            encoded.contains("\"call_id\":\"c1\""),
            "what governs stays readable"
        );
        check_locked(&body, &key).expect("every field locked");
        let mut opened = body.clone();
        unlock(&mut opened, Some(&key)).expect("opens");
        assert_eq!(opened, result());
        let mut erased = body;
        unlock(&mut erased, None).expect("reads as erased");
        let EntryBody::ToolResult(r) = erased else {
            unreachable!()
        };
        assert_eq!(r.output, json!(ERASED));
        assert_eq!(r.error.as_deref(), Some(ERASED));
    }

    #[test]
    fn a_field_in_the_clear_or_under_another_key_is_refused() {
        let key = SecretKey::generate().expect("random");
        assert!(check_locked(&result(), &key).is_err(), "in the clear");
        let mut other = result();
        lock(&mut other, &SecretKey::generate().expect("random")).expect("locks");
        assert!(check_locked(&other, &key).is_err(), "another run's key");
        // An envelope moved into another field does not open there.
        let mut body = result();
        lock(&mut body, &key).expect("locks");
        let EntryBody::ToolResult(r) = &body else {
            unreachable!()
        };
        let moved = EntryBody::Completed {
            output: r.error.clone().expect("error"),
            validators: Vec::new(),
        };
        assert!(check_locked(&moved, &key).is_err());
    }
}
