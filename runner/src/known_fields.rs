//! The fields each ContextOS kind has, as its published schema (the CRD's `openAPIV3Schema`)
//! says: what the audit reports and a local run refuses. The API server drops a field its
//! schema lacks — with only a warning to clients that do not ask for strict validation — so a
//! misspelt `when:` for `condition:` would silently stop governing anything.

use std::{collections::BTreeMap, sync::OnceLock};

use serde_json::Value;

use crate::field_path::FieldPath;

/// The fields of `object` (a whole object of kind `kind`) that its kind's schema does not
/// describe, in the order they appear; none for a kind that is not ContextOS's. `apiVersion`,
/// `kind` and `metadata` are Kubernetes' own, and `status` is the operator's.
pub fn unknown_fields(kind: &str, object: &Value) -> Vec<FieldPath> {
    let Some(schema) = schemas().get(kind) else {
        return Vec::new();
    };
    let mut unknown = Vec::new();
    for (key, value) in object.as_object().into_iter().flatten() {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "status") {
            continue;
        }
        match schema["properties"].get(key) {
            Some(child) => walk(value, child, FieldPath::root().key(key), &mut unknown),
            None => unknown.push(FieldPath::root().key(key)),
        }
    }
    unknown
}

/// Whether `kind` is one of ContextOS's kinds (one the CRDs define).
pub fn is_contextos_kind(kind: &str) -> bool {
    schemas().contains_key(kind)
}

/// Collects the paths under `path` that `schema` does not describe.
fn walk(value: &Value, schema: &Value, path: FieldPath, unknown: &mut Vec<FieldPath>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) {
        return;
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = &schema["additionalProperties"];
            for (key, child) in map {
                match properties.and_then(|p| p.get(key)) {
                    Some(child_schema) => walk(child, child_schema, path.key(key), unknown),
                    None if additional.is_object() => walk(child, additional, path.key(key), unknown),
                    None if additional == &Value::Bool(true) || properties.is_none() => {}
                    None => unknown.push(path.key(key)),
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (i, item) in items.iter().enumerate() {
                walk(item, &schema["items"], path.index(i), unknown);
            }
        }
        _ => {}
    }
}

/// Each ContextOS kind's published schema (`openAPIV3Schema`), as the CRDs carry it.
fn schemas() -> &'static BTreeMap<String, Value> {
    static SCHEMAS: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        contextos_crds::all_crds()
            .into_iter()
            .filter_map(|crd| {
                let schema = crd
                    .spec
                    .versions
                    .first()?
                    .schema
                    .as_ref()?
                    .open_api_v3_schema
                    .as_ref()?;
                Some((crd.spec.names.kind.clone(), serde_json::to_value(schema).ok()?))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_misspelt_field_is_found_where_it_is() {
        let policy = json!({
            "apiVersion": "contextos.dev/v1alpha1",
            "kind": "Policy",
            "metadata": {"name": "p", "labels": {"any": "thing"}},
            "spec": {"rules": [{"name": "r", "effect": "deny", "when": "true"}]},
            "status": {"anything": 1},
            "extra": 1,
        });
        let unknown: Vec<String> = unknown_fields("Policy", &policy)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(unknown, ["spec.rules[0].when", "extra"]);
        assert!(unknown_fields("ConfigMap", &json!({"data": {"a": "b"}})).is_empty());
    }
}
