//! Every row of `crds/tests/admission_cases.yaml` against the real API server: the same table the
//! client-side tests in `crds/` use, so the two cannot drift apart.

use anyhow::{Result, bail};
use contextos_kind_tests::{TestEnv, TestNamespace};
use kube::{
    Client,
    api::{DynamicObject, PostParams},
};
use serde_json::Value;

use crate::{
    cases::{Expect, Op, build, load_cases},
    objects::api_for,
};

/// What the API server answered.
enum Answer {
    Accepted,
    Refused {
        code: u16,
        message: String,
    },
    /// The `old` object of an update case was refused.
    SetupFailed(String),
}

#[tokio::test]
async fn every_admission_case_gets_the_expected_answer() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "admission").await?;
    let client = env.client();
    let cases = load_cases();
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let (old, new) = build(case);
        // An Ontology is one per namespace and its name is what admission judges: the case's;
        // so it is for a case that sets a name.
        let names_itself = case
            .ops
            .iter()
            .any(|op| matches!(op, Op::Set { set, .. } if set == "/metadata/name"));
        let name = match (new["kind"].as_str(), new["metadata"]["name"].as_str()) {
            (Some("Ontology"), Some(name)) => name.to_owned(),
            (_, Some(name)) if names_itself => name.to_owned(),
            _ => format!("case-{index:03}"),
        };
        let answer = admit(&client, ns.name(), &name, old, new).await?;
        if let Some(problem) = judge(&case.expect, &answer) {
            failures.push(format!("{:?} ({}, {name}): {problem}", case.name, case.base));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} admission cases got the wrong answer from the API server:\n  {}",
            failures.len(),
            cases.len(),
            failures.join("\n  ")
        );
    }
    ns.pass();
    Ok(())
}

async fn admit(
    client: &Client,
    namespace: &str,
    name: &str,
    old: Option<Value>,
    new: Value,
) -> Result<Answer> {
    let api = api_for(client, namespace, &new).await?;
    let prepare = |mut object: Value| -> Result<DynamicObject> {
        object["metadata"]["name"] = Value::String(name.to_owned());
        object["metadata"]["namespace"] = Value::String(namespace.to_owned());
        Ok(serde_json::from_value(object)?)
    };
    let params = PostParams::default();
    let result = match old {
        Some(old) => {
            let created = match api.create(&params, &prepare(old)?).await {
                Ok(created) => created,
                Err(err) => return Ok(Answer::SetupFailed(err.to_string())),
            };
            let mut updated = prepare(new)?;
            updated.metadata.resource_version = created.metadata.resource_version;
            let mut result = api.replace(name, &params, &updated).await;
            // The operator may write the object's status in between (a new resourceVersion):
            // the update is sent again on the latest version, as any client would.
            for _ in 0..5 {
                match &result {
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        let latest = api.get(name).await?;
                        updated.metadata.resource_version = latest.metadata.resource_version;
                        result = api.replace(name, &params, &updated).await;
                    }
                    _ => break,
                }
            }
            result
        }
        None => api.create(&params, &prepare(new)?).await,
    };
    Ok(match result {
        Ok(_) => Answer::Accepted,
        Err(kube::Error::Api(status)) => Answer::Refused {
            code: status.code,
            message: status.message,
        },
        Err(err) => bail!("{name}: request failed: {err}"),
    })
}

/// `None` when the answer is what the case expects, otherwise what went wrong.
fn judge(expect: &Expect, answer: &Answer) -> Option<String> {
    let (code, message) = match answer {
        Answer::SetupFailed(err) => return Some(format!("creating the old object failed: {err}")),
        Answer::Accepted => {
            return match expect {
                Expect::Accept(_) => None,
                other => Some(format!("accepted, expected a refusal ({other:?})")),
            };
        }
        Answer::Refused { code, message } => (*code, message),
    };
    match expect {
        Expect::Accept(_) => Some(format!("refused with {code}: {message}")),
        Expect::Cel { cel } if code == 422 && message.contains(cel.as_str()) => None,
        Expect::Cel { cel } => Some(format!("expected 422 mentioning {cel:?}, got {code}: {message}")),
        Expect::Schema { schema } => {
            let field = field_path(schema);
            if code == 422 && message.contains(&field) {
                None
            } else {
                Some(format!(
                    "expected 422 naming field {field}, got {code}: {message}"
                ))
            }
        }
    }
}

/// `/spec/tools/0/risk` → `spec.tools[0].risk`, the way the API server names fields.
fn field_path(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').filter(|s| !s.is_empty()) {
        if segment.chars().all(|c| c.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
        }
    }
    path
}

#[test]
fn pointers_become_field_paths() {
    assert_eq!(field_path("/spec/tools/0/risk"), "spec.tools[0].risk");
    assert_eq!(field_path("/spec/tools/1"), "spec.tools[1]");
    assert_eq!(field_path("/spec/budget/maxSteps"), "spec.budget.maxSteps");
}
