//! JSON Schemas written by tenants — tools' input schemas, output validators, the schemas of an
//! OpenAPI document — compiled so that checking a value takes time linear in the value.
//!
//! jsonschema matches `pattern` and `patternProperties` with fancy-regex by default, which
//! backtracks for lookarounds and backreferences, up to a million steps for each string it
//! checks. A schema with such a pattern and an answer holding thousands of strings (a model's,
//! a tool's) would keep a gateway thread, shared by every tenant, busy for minutes. Here
//! patterns are matched by the `regex` engine, which never backtracks; a pattern it cannot
//! match (a lookaround such as `(?=…)`, a backreference such as `\1`) makes the schema invalid,
//! with a message that says so.

use jsonschema::{PatternOptions, Validator, error::ValidationErrorKind};
use serde_json::Value;

/// What to tell the writer of a schema whose pattern needs backtracking.
const LINEAR_PATTERNS: &str = "patterns are matched in linear time, so lookarounds such as (?=…) or (?<!…) and \
     backreferences such as \\1 are not supported; rewrite the pattern without them";

/// Compiles `schema`, its patterns for the linear-time engine. The error is jsonschema's
/// (where in the schema, and what), with a hint when it is a pattern that needs backtracking.
pub fn compile(schema: &Value) -> Result<Validator, String> {
    jsonschema::options()
        .with_pattern_options(PatternOptions::regex())
        .build(schema)
        .map_err(|error| match error.kind() {
            ValidationErrorKind::Format { format } if format == "regex" => {
                format!("{error} (at {}): {LINEAR_PATTERNS}", error.schema_path().as_str())
            }
            _ => error.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn patterns_that_need_backtracking_are_refused_naming_where_and_why() {
        for (schema, at) in [
            (json!({"type": "string", "pattern": "^(?=.*x)a+$"}), "/pattern"),
            (
                json!({"type": "object", "properties": {"q": {"type": "string", "pattern": "(a)\\1"}}}),
                "/properties/q/pattern",
            ),
            (
                json!({"type": "object", "patternProperties": {"^(?!id)": {}}}),
                "/patternProperties",
            ),
        ] {
            let error = compile(&schema).expect_err("needs backtracking");
            assert!(error.contains(at) && error.contains("linear time"), "{error}");
        }
    }

    #[test]
    fn ordinary_patterns_still_check() {
        let validator = compile(&json!({
            "type": "object",
            "properties": {"id": {"type": "string", "pattern": "^INC-\\d{4,}$"}},
            "patternProperties": {"^x-": {"type": "string"}},
        }))
        .expect("a linear schema");
        assert!(validator.is_valid(&json!({"id": "INC-1234", "x-team": "a"})));
        assert!(!validator.is_valid(&json!({"id": "inc-1"})));
        assert!(!validator.is_valid(&json!({"x-team": 7})));
        assert!(compile(&json!({"type": "nothing"})).is_err(), "not a schema");
    }
}
