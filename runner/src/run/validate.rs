//! Output validators: the checks an answer must pass before a run may complete — JSON Schema
//! over the parsed output and CEL over `output` (text) and `json` (parsed output). Compiled once
//! per run; a validator that does not compile is an error naming its field.

use contextos_crds::agent::OutputValidator;
use serde_json::Value;

/// A compiled validator.
pub struct CompiledValidator {
    name: String,
    check: Check,
    message: Option<String>,
}

enum Check {
    Schema(Box<jsonschema::Validator>),
    Cel(cel::Program, crate::policy::cost::CostShape),
}

impl std::fmt::Debug for CompiledValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledValidator")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A validator that cannot be compiled.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("agent {agent}: spec.validators[{index}] ({name}): {problem}")]
pub struct ValidatorError {
    pub agent: String,
    pub index: usize,
    pub name: String,
    pub problem: String,
}

/// Compiles an agent's validators in order.
pub fn compile(
    agent: &str,
    validators: &[OutputValidator],
) -> Result<Vec<CompiledValidator>, ValidatorError> {
    validators
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let error = |problem: String| ValidatorError {
                agent: agent.to_owned(),
                index,
                name: v.name.clone(),
                problem,
            };
            let check = match (&v.json_schema, &v.cel) {
                (Some(schema), None) => Check::Schema(Box::new(
                    crate::json_schema::compile(schema)
                        .map_err(|e| error(format!("jsonSchema is not a valid JSON Schema: {e}")))?,
                )),
                (None, Some(source)) => {
                    let (program, cost) = crate::policy::cost::compile_bounded(source)
                        .map_err(|e| error(format!("cel {e}")))?;
                    let free = crate::policy::cel_vars::free_variables(&program);
                    let unknown: Vec<&str> = free
                        .iter()
                        .map(String::as_str)
                        .filter(|name| !matches!(*name, "output" | "json"))
                        .collect();
                    if !unknown.is_empty() {
                        return Err(error(format!(
                            "cel uses unknown variable(s) {}; available: output (the answer text), json (the answer parsed as JSON)",
                            unknown.join(", ")
                        )));
                    }
                    Check::Cel(program, cost)
                }
                _ => return Err(error("set exactly one of jsonSchema or cel".into())),
            };
            Ok(CompiledValidator {
                name: v.name.clone(),
                check,
                message: v.message.clone(),
            })
        })
        .collect()
}

/// The outcome of checking one answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Validation {
    /// Names of the validators that passed.
    pub passed: Vec<String>,
    /// `name: why` for each that failed.
    pub failures: Vec<String>,
}

/// Runs every validator over `output`.
pub fn check(validators: &[CompiledValidator], output: &str) -> Validation {
    let parsed: Option<Value> = serde_json::from_str(output).ok();
    let mut result = Validation::default();
    for validator in validators {
        let problem = match &validator.check {
            Check::Schema(schema) => match &parsed {
                None => Some("the answer is not JSON".to_owned()),
                Some(json) => schema.iter_errors(json).next().map(|e| {
                    let at = e.instance_path().to_string();
                    if at.is_empty() {
                        e.to_string()
                    } else {
                        format!("{at}: {e}")
                    }
                }),
            },
            Check::Cel(program, cost) => match cost.check(output.len()) {
                // The answer and its JSON form are both about this size.
                Err(e) => Some(e),
                Ok(()) => cel_problem(program, output, parsed.as_ref()),
            },
        };
        match problem {
            None => result.passed.push(validator.name.clone()),
            Some(problem) => {
                let why = validator.message.clone().unwrap_or(problem);
                result.failures.push(format!("{}: {why}", validator.name));
            }
        }
    }
    result
}

fn cel_problem(program: &cel::Program, output: &str, json: Option<&Value>) -> Option<String> {
    let mut context = cel::Context::default();
    context.add_variable_from_value("output", cel::Value::from(output.to_owned()));
    let json = json.cloned().unwrap_or(Value::Null);
    if let Ok(value) = cel::to_value(json) {
        context.add_variable_from_value("json", value);
    }
    match program.execute(&context) {
        Ok(cel::Value::Bool(true)) => None,
        Ok(cel::Value::Bool(false)) => Some("the condition is false".into()),
        Ok(other) => Some(format!("the condition returned {other:?}, not a boolean")),
        Err(e) => Some(format!("the condition could not be evaluated: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn validators() -> Vec<OutputValidator> {
        vec![
            OutputValidator {
                name: "shape".into(),
                json_schema: Some(json!({"type": "object", "required": ["summary"]})),
                cel: None,
                message: None,
            },
            OutputValidator {
                name: "long-enough".into(),
                json_schema: None,
                cel: Some("json.summary.size() > 5".into()),
                message: Some("The summary must explain what happened.".into()),
            },
        ]
    }

    #[test]
    fn an_answer_passes_or_fails_each_validator_by_name() {
        let compiled = compile("a", &validators()).expect("compiles");
        let good = check(&compiled, r#"{"summary": "restarted the api"}"#);
        assert_eq!(good.passed, ["shape", "long-enough"]);
        assert!(good.failures.is_empty());
        let short = check(&compiled, r#"{"summary": "ok"}"#);
        assert_eq!(
            short.failures,
            ["long-enough: The summary must explain what happened."]
        );
        let prose = check(&compiled, "all fine");
        assert_eq!(prose.failures.len(), 2, "{prose:?}");
        assert!(prose.failures[0].contains("not JSON"));
    }

    #[test]
    fn a_broken_validator_names_its_index() {
        let mut bad = validators();
        bad[1].cel = Some("jsn.summary".into());
        let err = compile("oncall", &bad).expect_err("unknown variable");
        assert!(
            err.to_string()
                .starts_with("agent oncall: spec.validators[1] (long-enough)"),
            "{err}"
        );
    }
}
