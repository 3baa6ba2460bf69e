//! Client-side admission: every row of the shared case table is checked against the generated
//! CRD schemas (OpenAPI constraints, list-map keys) and their CEL rules, evaluated with the
//! Kubernetes CEL library. The same table runs against a real API server in kind-tests.

mod support;

use std::collections::BTreeMap;

use contextos_crds::{all_crds, kube::core::cel::Validator};
use serde_json::Value;
use support::cases::{Expect, build, load_cases};

/// Why admission refused an object.
#[derive(Debug)]
enum Refusal {
    Schema { pointer: String, message: String },
    Cel { field: String, message: String },
}

impl Refusal {
    fn describe(&self) -> String {
        match self {
            Self::Schema { pointer, message } => format!("schema {pointer}: {message}"),
            Self::Cel { field, message } => format!("cel {field}: {message}"),
        }
    }
}

/// Emulates what the API server checks for a custom resource: structural schema, list-map
/// uniqueness, and CEL rules (with `oldSelf` on update).
fn admit(object: &Value, old: Option<&Value>) -> Vec<Refusal> {
    let kind = object["kind"].as_str().expect("object has a kind");
    let crd = all_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("known kind");
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("schema serializes");

    let mut refusals = Vec::new();
    let validator = jsonschema::validator_for(&schema).expect("CRD schema is a valid JSON schema");
    for error in validator.iter_errors(object) {
        // The API server reports a missing field at the field itself, not at its parent.
        let mut pointer = error.instance_path().to_string();
        if let jsonschema::error::ValidationErrorKind::Required { property } = error.kind() {
            pointer = format!("{pointer}/{}", property.as_str().unwrap_or_default());
        }
        refusals.push(Refusal::Schema {
            pointer,
            message: error.to_string(),
        });
    }
    list_map_duplicates(&schema, object, String::new(), &mut refusals);
    if refusals.is_empty()
        && let Err(errors) = Validator::new().validate(&schema, object, old)
    {
        for error in errors.iter() {
            refusals.push(Refusal::Cel {
                field: error.field_path.clone(),
                message: error.message.clone(),
            });
        }
    }
    refusals
}

/// `x-kubernetes-list-type: map` lists must not repeat a key (the API server reports the
/// duplicate entry's path).
fn list_map_duplicates(schema: &Value, value: &Value, pointer: String, out: &mut Vec<Refusal>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if let Some(child_schema) = schema.get("properties").and_then(|p| p.get(key)) {
                    list_map_duplicates(child_schema, child, format!("{pointer}/{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|keys| keys.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = BTreeMap::new();
            for (index, item) in items.iter().enumerate() {
                if !keys.is_empty() {
                    let key: Vec<String> = keys.iter().map(|k| item[*k].to_string()).collect();
                    if seen.insert(key, index).is_some() {
                        out.push(Refusal::Schema {
                            pointer: format!("{pointer}/{index}"),
                            message: "Duplicate value".into(),
                        });
                    }
                }
                if let Some(item_schema) = schema.get("items") {
                    list_map_duplicates(item_schema, item, format!("{pointer}/{index}"), out);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn every_admission_case_gets_the_expected_answer() {
    let cases = load_cases();
    assert!(cases.len() >= 40, "the table lost cases: {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let (old, new) = build(case);
        if let Some(old) = &old {
            let refusals = admit(old, None);
            if !refusals.is_empty() {
                failures.push(format!(
                    "{}: the object before the update is refused: {refusals:?}",
                    case.name
                ));
                continue;
            }
        }
        let refusals = admit(&new, old.as_ref());
        let ok = match &case.expect {
            Expect::Accept(_) => refusals.is_empty(),
            Expect::Cel { cel } => refusals
                .iter()
                .any(|r| matches!(r, Refusal::Cel { message, .. } if message.contains(cel.as_str()))),
            Expect::Schema { schema } => refusals
                .iter()
                .any(|r| matches!(r, Refusal::Schema { pointer, .. } if pointer == schema)),
        };
        if !ok {
            let got: Vec<String> = refusals.iter().map(Refusal::describe).collect();
            failures.push(format!("{}: expected {:?}, got {got:?}", case.name, case.expect));
        }
    }
    assert!(
        failures.is_empty(),
        "{} admission cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_quickstart_object_is_admitted_unchanged() {
    for file in [
        "sandboxprofile.yaml",
        "contextpack.yaml",
        "policy.yaml",
        "agent.yaml",
        "session.yaml",
    ] {
        let object = support::cases::quickstart_object(file);
        let refusals = admit(&object, None);
        assert!(refusals.is_empty(), "{file} is refused: {refusals:?}");
        // An unchanged update passes every transition rule.
        let refusals = admit(&object, Some(&object));
        assert!(
            refusals.is_empty(),
            "{file} refused on a no-op update: {refusals:?}"
        );
    }
    // The Agent as written (its tools in its skills), and each Skill.
    let agent = support::cases::first_object("agent.yaml");
    assert!(admit(&agent, None).is_empty(), "agent.yaml as written is refused");
    let path = support::cases::repo_root().join("examples/quickstart/skills.yaml");
    let text = std::fs::read_to_string(&path).expect("skills.yaml");
    for document in serde_yaml::Deserializer::from_str(&text) {
        let skill: Value = serde::Deserialize::deserialize(document).expect("skill");
        let refusals = admit(&skill, None);
        assert!(
            refusals.is_empty(),
            "{} is refused: {refusals:?}",
            skill["metadata"]["name"]
        );
    }
}

#[test]
fn a_refused_cel_rule_names_the_field() {
    let mut agent = support::cases::quickstart_object("agent.yaml");
    agent["spec"]["tools"][4]["idempotent"] = serde_json::json!(false);
    agent["spec"]["tools"][4]["retry"] = serde_json::json!({"maxAttempts": 3});
    let refusals = admit(&agent, None);
    let field = refusals.iter().find_map(|r| match r {
        Refusal::Cel { field, .. } => Some(field.clone()),
        Refusal::Schema { .. } => None,
    });
    assert_eq!(field.as_deref(), Some("spec.tools[4]"), "{refusals:?}");
}

#[test]
fn a_price_list_takes_decimal_rates_in_one_iso_currency() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pricing/pricelist.yaml"),
    )
    .expect("the PriceList example");
    let list: Value = serde_yaml::from_str(&text).expect("YAML");
    assert!(admit(&list, None).is_empty(), "{:?}", admit(&list, None));
    let refused_at = |pointer: &str, value: Value| {
        let mut bad = list.clone();
        *bad.pointer_mut(pointer).expect("the field") = value;
        let refusals = admit(&bad, None);
        assert!(
            refusals
                .iter()
                .any(|r| matches!(r, Refusal::Schema { pointer: p, .. } if p == pointer)),
            "{pointer}: {refusals:?}"
        );
    };
    refused_at("/spec/currency", serde_json::json!("usd"));
    refused_at("/spec/models/0/inputPerMillion", serde_json::json!("0.15 USD"));
    refused_at("/spec/models/0/outputPerMillion", serde_json::json!("-1"));
    refused_at("/spec/models/0/cachedInputPerMillion", serde_json::json!("1e-3"));
    refused_at("/spec/tools/0/perCall", serde_json::json!("free"));
    refused_at("/spec/tools/0/urlPrefix", serde_json::json!("ops-tools/runbooks"));
    // A prefix no client could parse would price nothing (and refuse every Agent's prices).
    refused_at(
        "/spec/tools/0/urlPrefix",
        serde_json::json!("https://api.example:99999/v1"),
    );
    refused_at("/spec/tools/0/urlPrefix", serde_json::json!("https://[x/v1"));
    refused_at(
        "/spec/tools/0/urlPrefix",
        serde_json::json!("https://user@api.example/v1"),
    );
    // An endpoint a price can never match (a scripted model has none), or one no client would
    // be configured with, is refused rather than left to price nothing.
    let cel_refused = |index: usize, field: &str, value: Value, message: &str| {
        let mut bad = list.clone();
        bad["spec"]["models"][index][field] = value;
        let refusals = admit(&bad, None);
        assert!(
            refusals
                .iter()
                .any(|r| matches!(r, Refusal::Cel { message: m, .. } if m.contains(message))),
            "{field}: {refusals:?}"
        );
    };
    cel_refused(
        2,
        "endpoint",
        serde_json::json!("https://scripts.example/v1"),
        "a scripted model has no endpoint",
    );
    cel_refused(
        0,
        "endpoint",
        serde_json::json!("https://api.openai.com/v1?key=x"),
        "no query, fragment or credentials",
    );
    // A tool price by a URL no tool could be compared with, or a list that prices nothing.
    let refused_with = |bad: Value, message: &str| {
        let refusals = admit(&bad, None);
        assert!(
            refusals
                .iter()
                .any(|r| matches!(r, Refusal::Cel { message: m, .. } if m.contains(message))),
            "{message}: {refusals:?}"
        );
    };
    let mut bad = list.clone();
    bad["spec"]["tools"][0]["urlPrefix"] = serde_json::json!("https://api.search.example/v1?key=x");
    refused_with(bad, "urlPrefix is a scheme, host and path");
    let mut empty = list.clone();
    empty["spec"]["models"] = serde_json::json!([]);
    empty["spec"]["tools"] = serde_json::json!([]);
    refused_with(empty, "a PriceList prices nothing");
    // Tools alone are a price list.
    let mut tools_only = list.clone();
    tools_only["spec"].as_object_mut().expect("spec").remove("models");
    assert!(
        admit(&tools_only, None).is_empty(),
        "{:?}",
        admit(&tools_only, None)
    );
}
