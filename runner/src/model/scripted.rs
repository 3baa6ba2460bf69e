//! The scripted model: answers from a fixed list of turns (a ConfigMap key or a file). The turn
//! served is the number of assistant messages already in the conversation, so a resumed run
//! gets the same answers as an uninterrupted one.

use serde::Deserialize;
use serde_json::Value;

use super::{ModelError, ModelRequest, ModelTurn, Role, ToolCallRequest};

/// A script, as `examples/quickstart/configmaps.yaml` holds it.
#[derive(Clone, Debug, Deserialize)]
pub struct Script {
    pub turns: Vec<ScriptTurn>,
    /// Other turns, played when the context the model is given says something: the first
    /// variant whose `whenContextContains` is in the system messages plays instead of `turns`.
    /// A deterministic stand-in for a model that reads its instructions (re-execution replay
    /// of a changed ContextPack is tested with it).
    #[serde(default)]
    pub variants: Vec<ScriptVariant>,
}

/// Turns played when the context holds a text.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScriptVariant {
    pub when_context_contains: String,
    pub turns: Vec<ScriptTurn>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScriptTurn {
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub tool_calls: Vec<ScriptCall>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ScriptCall {
    pub tool: String,
    #[serde(default)]
    pub arguments: Value,
}

/// A model that plays a script.
#[derive(Clone, Debug)]
pub struct ScriptedModel {
    name: String,
    script: Script,
}

impl ScriptedModel {
    /// Parses a script (JSON) named `name` (for error messages).
    pub fn parse(name: &str, text: &str) -> Result<Self, ModelError> {
        let script: Script = serde_json::from_str(text).map_err(|e| ModelError::BadScript {
            script: name.into(),
            detail: e.to_string(),
        })?;
        if script.turns.is_empty() {
            return Err(ModelError::BadScript {
                script: name.into(),
                detail: "it has no turns".into(),
            });
        }
        if let Some(i) = script
            .variants
            .iter()
            .position(|v| v.turns.is_empty() || v.when_context_contains.trim().is_empty())
        {
            return Err(ModelError::BadScript {
                script: name.into(),
                detail: format!("variants[{i}] needs whenContextContains and turns"),
            });
        }
        Ok(Self {
            name: name.into(),
            script,
        })
    }

    /// The next turn for `request`.
    pub fn complete(&self, request: &ModelRequest) -> Result<ModelTurn, ModelError> {
        let turn = request
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count();
        let context: String = request
            .messages
            .iter()
            .filter(|m| m.role == Role::System)
            .map(|m| m.content.as_str())
            .collect();
        let turns = self
            .script
            .variants
            .iter()
            .find(|v| context.contains(&v.when_context_contains))
            .map_or(&self.script.turns, |v| &v.turns);
        let scripted = turns.get(turn).ok_or_else(|| ModelError::ScriptExhausted {
            script: self.name.clone(),
            turn,
            available: turns.len(),
        })?;
        let tool_calls = scripted
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| ToolCallRequest {
                id: format!("call-{turn}-{i}"),
                tool: c.tool.clone(),
                arguments: if c.arguments.is_null() {
                    Value::Object(Default::default())
                } else {
                    c.arguments.clone()
                },
            })
            .collect();
        // Token usage is estimated from text length so budgets behave as with a real model.
        let prompt: usize = request.messages.iter().map(|m| m.content.len()).sum();
        Ok(ModelTurn {
            content: scripted.content.clone(),
            tool_calls,
            prompt_tokens: (prompt / 4) as u64,
            completion_tokens: (scripted.content.len() / 4) as u64 + 1,
            cached_prompt_tokens: 0,
            dropped_tool_calls: 0,
            route: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Message;

    fn quickstart_script() -> String {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/configmaps.yaml");
        let text = std::fs::read_to_string(root).expect("configmaps");
        let doc = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_yaml::Value::deserialize(d).expect("yaml"))
            .find(|v| v["metadata"]["name"] == "quickstart-script")
            .expect("script ConfigMap");
        doc["data"]["script.json"]
            .as_str()
            .expect("script key")
            .to_owned()
    }

    #[test]
    fn the_quickstart_script_plays_turn_by_turn_and_resumes_at_the_same_turn() {
        let model = ScriptedModel::parse("quickstart-script", &quickstart_script()).expect("parses");
        let mut request = ModelRequest {
            model: "quickstart".into(),
            messages: vec![Message::new(Role::User, "checkout 5xx")],
            tools: vec![],
            max_output_tokens: None,
        };
        let first = model.complete(&request).expect("turn 0");
        assert_eq!(first.tool_calls[0].tool, "search_runbooks");
        request
            .messages
            .push(Message::new(Role::Assistant, first.content.clone()));
        let second = model.complete(&request).expect("turn 1");
        assert_eq!(second.tool_calls[0].tool, "get_service_status");
        assert_eq!(
            model.complete(&request).expect("same turn again"),
            second,
            "deterministic on resume"
        );
        for _ in 0..10 {
            request.messages.push(Message::new(Role::Assistant, "x"));
        }
        assert!(matches!(
            model.complete(&request),
            Err(ModelError::ScriptExhausted { .. })
        ));
    }

    #[test]
    fn a_variant_plays_when_the_context_says_what_it_waits_for() {
        let model = ScriptedModel::parse(
            "s",
            r#"{"turns": [{"content": "careful"}],
                "variants": [{"whenContextContains": "Act fast", "turns": [{"content": "hasty"}]}]}"#,
        )
        .expect("parses");
        let request = |system: &str| ModelRequest {
            model: "m".into(),
            messages: vec![Message::new(Role::System, system), Message::new(Role::User, "go")],
            tools: vec![],
            max_output_tokens: None,
        };
        let said = |system: &str| model.complete(&request(system)).expect("a turn").content;
        assert_eq!(said("Diagnose before you act."), "careful");
        assert_eq!(said("Act fast; diagnose later."), "hasty");
        assert!(
            ScriptedModel::parse(
                "s",
                r#"{"turns": [{}], "variants": [{"whenContextContains": "x", "turns": []}]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn a_broken_script_names_itself() {
        let err = ScriptedModel::parse("my-script", "{\"turns\": 3}").expect_err("invalid");
        assert!(
            err.to_string()
                .starts_with("the model script my-script is not valid"),
            "{err}"
        );
    }
}
