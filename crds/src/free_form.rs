//! Free-form JSON in a spec — a Session's input data, a tool's input schema, a validator's
//! JSON Schema, a skill scenario's script, data and canned results — read with a bound on how
//! deep it nests.
//!
//! The API server stores such values nested as deep as a tenant writes them, while a JSON
//! decoder stops at a depth limit (serde_json's is 128) and fails the whole document. Were one
//! object of a kind nested past it, every list of that kind would fail to decode: the operator
//! could not list, say, Sessions again after a restart, and every tenant's Sessions would stop.
//! So these fields are read [`MAX_DEPTH`] levels deep and no deeper: what lies below is skipped
//! without being decoded (serde_json skips a value without recursing), and the whole field reads
//! as [`TOO_DEEP`], which the operator and the CLI refuse, naming the field.

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_json::{Map, Value};

/// How many levels of arrays and objects a free-form field may nest (its own braces counting as
/// the first): far beyond any schema or input people write, and well inside a decoder's limit
/// with the object's own nesting above it.
pub const MAX_DEPTH: usize = 32;

/// What a field nested deeper than [`MAX_DEPTH`] reads as.
pub const TOO_DEEP: &str = "contextos.dev: this value nests more than 32 levels deep and was not read";

/// Whether `value` is what a field nested too deep reads as.
pub fn is_too_deep(value: &Value) -> bool {
    value.as_str() == Some(TOO_DEEP)
}

/// The problem with a field at `field` that nests too deep, if it does.
pub fn problem(field: &str, value: Option<&Value>) -> Option<String> {
    value
        .filter(|v| is_too_deep(v))
        .map(|_| format!("{field}: nests more than {MAX_DEPTH} levels of arrays and objects; flatten it"))
}

/// The first free-form field of an Agent's spec that nests too deep (its tools' input schemas,
/// its validators' JSON Schemas), as a problem naming it.
pub fn agent_problem(spec: &crate::AgentSpec) -> Option<String> {
    tools_problem("spec.tools", &spec.tools)
        .or_else(|| validators_problem("spec.validators", &spec.validators))
}

/// The first free-form field of a Skill's spec that nests too deep.
pub fn skill_problem(spec: &crate::skill::SkillSpec) -> Option<String> {
    tools_problem("spec.tools", &spec.tools).or_else(|| {
        spec.evals.scenarios.iter().enumerate().find_map(|(i, s)| {
            let at = |field: &str| format!("spec.evals.scenarios[{i}].{field}");
            problem(&at("data"), s.data.as_ref())
                .or_else(|| validators_problem(&at("expect.output"), &s.expect.output))
                .or_else(|| problem(&at("script"), Some(&s.script)))
                .or_else(|| {
                    s.tool_results.iter().enumerate().find_map(|(j, r)| {
                        problem(&at(&format!("toolResults[{j}].arguments")), r.arguments.as_ref())
                            .or_else(|| problem(&at(&format!("toolResults[{j}].output")), r.output.as_ref()))
                    })
                })
        })
    })
}

/// The Session's input data, if it nests too deep.
pub fn session_problem(spec: &crate::SessionSpec) -> Option<String> {
    problem("spec.input.data", spec.input.data.as_ref())
}

fn tools_problem(field: &str, tools: &[crate::agent::Tool]) -> Option<String> {
    tools
        .iter()
        .enumerate()
        .find_map(|(i, t)| problem(&format!("{field}[{i}].inputSchema"), t.input_schema.as_ref()))
}

fn validators_problem(field: &str, validators: &[crate::agent::OutputValidator]) -> Option<String> {
    validators
        .iter()
        .enumerate()
        .find_map(|(i, v)| problem(&format!("{field}[{i}].jsonSchema"), v.json_schema.as_ref()))
}

/// Reads an optional free-form field (`#[serde(default, deserialize_with = …)]`).
pub fn bounded<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Option::<BoundedValue>::deserialize(deserializer).map(|v| v.map(|v| v.0))
}

/// Reads a required free-form field.
pub fn bounded_required<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
    BoundedValue::deserialize(deserializer).map(|v| v.0)
}

/// A value read at most [`MAX_DEPTH`] levels deep.
struct BoundedValue(Value);

impl<'de> Deserialize<'de> for BoundedValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = deserializer.deserialize_any(Level { left: MAX_DEPTH })?;
        Ok(BoundedValue(
            value.unwrap_or_else(|| Value::String(TOO_DEEP.into())),
        ))
    }
}

/// Reads one value with `left` more levels of nesting allowed; `None`: it nests deeper.
#[derive(Clone, Copy)]
struct Level {
    left: usize,
}

impl<'de> DeserializeSeed<'de> for Level {
    type Value = Option<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Some(
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Value::String(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Some(Value::Null))
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Some(Value::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let Some(left) = self.left.checked_sub(1) else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(None);
        };
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Level { left })? {
            match item {
                Some(item) => items.push(item),
                None => {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    return Ok(None);
                }
            }
        }
        Ok(Some(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some(left) = self.left.checked_sub(1) else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(None);
        };
        let mut entries = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            match map.next_value_seed(Level { left })? {
                Some(value) => {
                    entries.insert(key, value);
                }
                None => {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    return Ok(None);
                }
            }
        }
        Ok(Some(Value::Object(entries)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct Holder {
        #[serde(default, deserialize_with = "bounded")]
        data: Option<Value>,
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn values_within_the_bound_read_as_they_are_written() {
        for text in [
            r#"{"data": {"a": [1, -2, 2.5, "x", true, null, {"b": {}}]}}"#,
            &format!(r#"{{"data": {}}}"#, nested(MAX_DEPTH)),
        ] {
            let holder: Holder = serde_json::from_str(text).expect("reads");
            let plain: Value = serde_json::from_str(text).expect("reads");
            assert_eq!(holder.data.as_ref(), plain.get("data"), "{text}");
        }
        let holder: Holder = serde_json::from_str("{}").expect("reads");
        assert_eq!(holder.data, None);
        // Read from a value too (objects the code builds, the CLI's YAML).
        let holder: Holder = serde_json::from_value(json!({"data": {"k": [1, {"v": "w"}]}})).expect("reads");
        assert_eq!(holder.data, Some(json!({"k": [1, {"v": "w"}]})));
    }

    /// Past the bound the field reads as TOO_DEEP, and the document around it still reads —
    /// even nested thousands deep, where serde_json alone stops at 128.
    #[test]
    fn a_field_nested_too_deep_reads_as_too_deep_and_the_rest_still_reads() {
        for depth in [MAX_DEPTH + 1, 200, 10_000] {
            let text = format!(
                r#"{{"items": [{{"data": {}}}, {{"data": {{"ok": 1}}}}]}}"#,
                nested(depth)
            );
            #[derive(Deserialize)]
            struct List {
                items: Vec<Holder>,
            }
            let list: List = serde_json::from_str(&text).expect("the list reads");
            assert!(
                list.items[0].data.as_ref().is_some_and(is_too_deep),
                "depth {depth}"
            );
            assert_eq!(list.items[1].data, Some(json!({"ok": 1})));
            assert!(
                problem("spec.input.data", list.items[0].data.as_ref())
                    .is_some_and(|p| p.contains("flatten"))
            );
        }
        assert!(
            serde_json::from_str::<Value>(&nested(200)).is_err(),
            "serde_json's own limit"
        );
    }

    /// What an operator's list of Sessions reads: one Session nested too deep does not fail the
    /// list (as a plain value, `input.data` would fail it), and reads as refused.
    #[test]
    fn a_list_with_one_session_nested_too_deep_still_reads() {
        let session = |name: &str, data: &str| {
            format!(
                r#"{{"apiVersion": "contextos.dev/v1alpha1", "kind": "Session", "metadata": {{"name": "{name}"}},
                "spec": {{"agentRef": {{"name": "a"}}, "input": {{"prompt": "p", "data": {data}}}}}}}"#
            )
        };
        let text = format!(
            r#"{{"apiVersion": "contextos.dev/v1alpha1", "kind": "SessionList", "metadata": {{}}, "items": [{}, {}]}}"#,
            session("deep", &format!(r#"{{"a": {}}}"#, nested(300))),
            session("plain", r#"{"a": 1}"#),
        );
        let list: kube::core::ObjectList<crate::Session> =
            serde_json::from_str(&text).expect("the list reads");
        assert!(
            session_problem(&list.items[0].spec).is_some_and(|p| p.starts_with("spec.input.data: nests"))
        );
        assert_eq!(session_problem(&list.items[1].spec), None);
        assert!(serde_json::from_str::<kube::core::ObjectList<kube::core::DynamicObject>>(&text).is_err());
    }
}
