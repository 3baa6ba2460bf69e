//! Read-only results by alias (an Agent's `spec.aliases`): what a read-only tool answered
//! enters the model's context once, as `@status.checkout-api#2 = {…}`, and from then on by
//! its alias — a repeat of a result the context already shows, or (with `fullForSteps`) a
//! result read long enough ago. The model reads an alias again with the built-in read-only
//! tool [`DEREF_TOOL`], which the run answers from its own conversation: nothing is reached.
//!
//! Everything here is a pure function of the run's conversation (which checkpoints record):
//! a resumed run or a replay renders the same requests and answers the same dereferences.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{
    model::{Message, Role, ToolSpec},
    records::canonical::to_canonical_bytes,
};

/// The built-in tool that reads an alias again.
pub const DEREF_TOOL: &str = "contextos_deref";

/// The longest label an alias takes from a call's arguments.
const MAX_LABEL: usize = 40;

/// A result shorter than this is shown as it is, every time: a reference to it would save
/// little or nothing (an alias line is some 60 bytes).
const MIN_ALIASED_BYTES: usize = 200;

/// A result shorter than this stays in full however old: the line saying how to read it again
/// is some 180 bytes.
const MIN_COLLAPSED_BYTES: usize = 400;

/// Aliases a dereference refusal lists at most.
const LISTED: usize = 16;

/// What a tool message read, when its tool is read-only and the Agent shows results by alias.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadAlias {
    /// `@<tool>.<label>#<n>`: one name per distinct result of the run.
    pub name: String,
    /// The step whose call (or dereference) put it in the conversation.
    pub step: u32,
    /// Digest of the tool and canonical arguments: which question it answers.
    pub question: String,
    /// Tokens of the result (what an alias line says it would cost to read again).
    #[serde(default)]
    pub tokens: u64,
    /// Whether it was read again with [`DEREF_TOOL`] rather than from a tool.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dereferenced: bool,
}

/// The built-in tool as the model is offered it.
pub fn deref_tool() -> ToolSpec {
    ToolSpec {
        name: DEREF_TOOL.to_owned(),
        description: "Reads again, in full, a result of this run that the conversation shows only by its alias (such as @status.checkout-api#2). Read-only: it calls no tool.".to_owned(),
        parameters: json!({
            "type": "object",
            "properties": {"alias": {"type": "string", "description": "the alias, with its @"}},
            "required": ["alias"],
            "additionalProperties": false,
        }),
    }
}

/// The alias of a result `content` that `tool` gave for `arguments` at `step`: the name an
/// earlier identical result of the same question has, else the next free one. `None` for a
/// result too short to be worth one.
pub fn name_result(
    messages: &[Message],
    tool: &str,
    arguments: &Value,
    content: &str,
    step: u32,
) -> Option<ReadAlias> {
    if content.len() < MIN_ALIASED_BYTES {
        return None;
    }
    let question = question_of(tool, arguments);
    let tokens = crate::context::tokenizer().count(content) as u64;
    let reads = messages.iter().filter_map(|m| m.read.as_ref().map(|r| (r, m)));
    let mut prefix = format!("@{tool}.{}#", label_of(arguments, &question));
    if let Some((same, _)) = reads
        .clone()
        .find(|(r, m)| r.question == question && m.content == content)
    {
        return Some(ReadAlias {
            name: same.name.clone(),
            step,
            question,
            tokens,
            dereferenced: false,
        });
    }
    let taken = reads
        .map(|(r, _)| r.name.as_str())
        .filter(|name| name.starts_with(&prefix))
        .collect::<HashSet<_>>()
        .len();
    prefix.push_str(&(taken + 1).to_string());
    Some(ReadAlias {
        name: prefix,
        step,
        question,
        tokens,
        dereferenced: false,
    })
}

/// The answer to a dereference (`{"alias": …}`): the result the alias names, with its alias,
/// or why there is none.
pub fn dereference(messages: &[Message], arguments: &Value) -> Result<(ReadAlias, String), String> {
    let Some(alias) = arguments.get("alias").and_then(Value::as_str) else {
        return Err(format!("{DEREF_TOOL} takes {{\"alias\": \"@…\"}}"));
    };
    let alias = alias.trim();
    let mut known = Vec::new();
    for message in messages {
        let Some(read) = &message.read else { continue };
        if read.name == alias {
            return Ok((read.clone(), message.content.clone()));
        }
        if !known.contains(&read.name.as_str()) {
            known.push(read.name.as_str());
        }
    }
    let shown: String = alias.chars().take(80).collect();
    let listed = known.iter().take(LISTED).copied().collect::<Vec<_>>().join(", ");
    Err(if known.is_empty() {
        format!("this run has read no result called {shown}: it has no aliases yet")
    } else {
        format!("this run has read no result called {shown}; its aliases: {listed}")
    })
}

/// How the run answers a dereference made at `step`: the result again (with its alias, read
/// at `step`), unless the next request shows it in full anyway (nothing is copied then), the
/// run has read `most` aliases again already, or the alias names nothing.
pub fn answer_dereference(
    messages: &[Message],
    arguments: &Value,
    full_for_steps: Option<u32>,
    step: u32,
    most: u32,
) -> (Option<ReadAlias>, String) {
    let (read, content) = match dereference(messages, arguments) {
        Ok(found) => found,
        Err(problem) => return (None, format!("error: {problem}")),
    };
    let next = render(messages, full_for_steps, step.saturating_add(1));
    let shown = messages.iter().zip(&next).any(|(m, sent)| {
        m.read.as_ref().is_some_and(|r| r.name == read.name)
            && sent.content.starts_with(&format!("{} = ", read.name))
    });
    if shown {
        return (
            None,
            format!(
                "{} is shown in full above; there is nothing to read again",
                read.name
            ),
        );
    }
    let made = messages
        .iter()
        .filter(|m| m.role == Role::Tool && m.read.as_ref().is_some_and(|r| r.dereferenced))
        .count();
    if made >= most as usize {
        return (
            None,
            format!(
                "error: this run has read aliases again {made} times, as many as its budget's maxToolCalls allows"
            ),
        );
    }
    (
        Some(ReadAlias {
            step,
            dereferenced: true,
            ..read
        }),
        content,
    )
}

/// The conversation as the model is sent it at `step`: every read-only result in full the
/// first time the request shows it, by alias after that, and by alias alone once it is older
/// than `full_for_steps` steps (see `spec.aliases`).
pub fn render(messages: &[Message], full_for_steps: Option<u32>, step: u32) -> Vec<Message> {
    let mut shown: HashSet<&str> = HashSet::new();
    messages
        .iter()
        .map(|message| {
            let Some(read) = &message.read else {
                return message.clone();
            };
            let content = if shown.contains(read.name.as_str()) {
                format!("{}: unchanged, as shown above", read.name)
                        } else if is_collapsed(read, message, full_for_steps, step) {
                format!(
                    "{name}: read at step {at} ({tokens} tokens), no longer shown; to read it again call {DEREF_TOOL} with {{\"alias\": \"{name}\"}}",
                    name = read.name,
                    at = read.step,
                    tokens = read.tokens,
                )
            } else {
                shown.insert(read.name.as_str());
                format!("{} = {}", read.name, message.content)
            };
            let mut rendered = message.clone();
            rendered.content = content;
            rendered
        })
        .collect()
}

fn is_collapsed(read: &ReadAlias, message: &Message, full_for_steps: Option<u32>, step: u32) -> bool {
    full_for_steps.is_some_and(|keep| step > read.step.saturating_add(keep))
        && message.role == Role::Tool
        && message.content.len() >= MIN_COLLAPSED_BYTES
}

fn question_of(tool: &str, arguments: &Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(tool.as_bytes());
    hasher.update([0]);
    hasher.update(to_canonical_bytes(arguments));
    hex::encode(&hasher.finalize()[..8])
}

/// A short readable label: the argument values that are short words (`checkout-api`, `5`),
/// in key order; else the start of the question's digest.
fn label_of(arguments: &Value, question: &str) -> String {
    let mut label = String::new();
    if let Some(object) = arguments.as_object() {
        let mut keys: Vec<&String> = object.keys().collect();
        keys.sort();
        for key in keys {
            let word = match &object[key] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            // Anything but letters, digits, `-` and `_` becomes one `-`.
            let word = word
                .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
                .filter(|part| !part.is_empty())
                .collect::<Vec<_>>()
                .join("-");
            if word.is_empty() || label.len() + word.len() + 1 > MAX_LABEL {
                continue;
            }
            if !label.is_empty() {
                label.push('.');
            }
            label.push_str(&word);
        }
    }
    if label.is_empty() {
        question[..6].to_owned()
    } else {
        label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adds a result (padded to be worth an alias) and returns its alias.
    fn result(messages: &mut Vec<Message>, tool: &str, args: Value, content: &str, step: u32) -> String {
        let content = format!("{content:<MIN_ALIASED_BYTES$}");
        let read = name_result(messages, tool, &args, &content, step).expect("long enough");
        let name = read.name.clone();
        let mut message = Message::new(Role::Tool, content);
        message.read = Some(read);
        messages.push(message);
        name
    }

    fn long(text: &str) -> String {
        format!("{text} {}", "x".repeat(MIN_COLLAPSED_BYTES))
    }

    #[test]
    fn a_result_is_named_by_tool_arguments_and_version() {
        let mut messages = Vec::new();
        let args = json!({"service": "checkout-api"});
        let mut named =
            |tool: &str, args: &Value, content: &str| result(&mut messages, tool, args.clone(), content, 1);
        assert_eq!(named("status", &args, "{\"up\":false}"), "@status.checkout-api#1");
        assert_eq!(named("status", &args, "{\"up\":false}"), "@status.checkout-api#1");
        assert_eq!(named("status", &args, "{\"up\":true}"), "@status.checkout-api#2");
        assert_eq!(named("status", &json!({}), "{}").len(), "@status.".len() + 6 + 2);
        // Labels that read alike stay distinct aliases.
        assert_eq!(
            named("status", &json!({"service": "checkout api"}), "{}"),
            "@status.checkout-api#3"
        );
        assert_eq!(
            named("status", &json!({"service": "checkout_api!"}), "{}"),
            "@status.checkout_api#1"
        );
        assert_eq!(
            named("status", &json!({"service": "checkout_api"}), "{}"),
            "@status.checkout_api#2"
        );
        assert!(
            name_result(&messages, "status", &json!({}), "short", 5).is_none(),
            "too short to alias"
        );
    }

    #[test]
    fn a_repeat_is_shown_by_alias_and_the_first_in_full() {
        let mut messages = vec![Message::new(Role::User, "why is checkout slow?")];
        let args = json!({"service": "checkout-api"});
        result(&mut messages, "status", args.clone(), "{\"p99\":900}", 1);
        result(&mut messages, "status", args, "{\"p99\":900}", 2);
        let sent = render(&messages, None, 3);
        assert_eq!(sent[0].content, "why is checkout slow?");
        assert_eq!(
            sent[1].content,
            format!("@status.checkout-api#1 = {}", messages[1].content)
        );
        assert_eq!(
            sent[2].content,
            "@status.checkout-api#1: unchanged, as shown above"
        );
    }

    #[test]
    fn an_old_result_collapses_and_a_dereference_shows_it_again() {
        let mut messages = Vec::new();
        let content = long("{\"p99\":900}");
        result(&mut messages, "status", json!({"service": "a"}), &content, 1);
        result(
            &mut messages,
            "status",
            json!({"service": "b"}),
            "{\"ok\":true}",
            1,
        );
        let short = format!("@status.b#1 = {}", messages[1].content);
        assert!(
            render(&messages, Some(2), 3)[0]
                .content
                .starts_with("@status.a#1 = ")
        );
        let collapsed = render(&messages, Some(2), 4);
        assert!(
            collapsed[0].content.starts_with("@status.a#1: read at step 1 ("),
            "{}",
            collapsed[0].content
        );
        assert!(collapsed[0].content.contains(DEREF_TOOL));
        assert_eq!(collapsed[1].content, short, "short results stay");
        let alias = json!({"alias": "@status.a#1"});
        let (shown, answer) = answer_dereference(&messages, &alias, Some(2), 2, 8);
        assert_eq!(
            (shown, answer.as_str()),
            (
                None,
                "@status.a#1 is shown in full above; there is nothing to read again"
            )
        );
        let (read, again) = answer_dereference(&messages, &alias, Some(2), 4, 8);
        assert_eq!(again, content);
        let mut message = Message::new(Role::Tool, again);
        message.read = read;
        messages.push(message);
        let (_, spent) = answer_dereference(&messages, &alias, Some(2), 9, 1);
        assert!(
            spent.starts_with("error: this run has read aliases again 1 times"),
            "{spent}"
        );
        let sent = render(&messages, Some(2), 5);
        assert!(sent[0].content.starts_with("@status.a#1: read at step 1"));
        assert_eq!(sent[2].content, format!("@status.a#1 = {content}"));
    }

    #[test]
    fn an_unknown_alias_is_refused_naming_the_known_ones() {
        let mut messages = Vec::new();
        let none = dereference(&messages, &json!({"alias": "@x#1"}));
        assert!(none.is_err_and(|e| e.contains("no aliases yet")));
        result(&mut messages, "status", json!({"service": "a"}), "{}", 1);
        let refused = dereference(&messages, &json!({"alias": "@status.b#1"}));
        assert!(refused.is_err_and(|e| e.contains("@status.a#1")));
        assert!(dereference(&messages, &json!({"name": "@status.a#1"})).is_err());
    }
}
