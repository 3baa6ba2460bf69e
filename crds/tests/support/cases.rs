//! Loads the shared admission case table (`crds/tests/admission_cases.yaml`) and builds the
//! objects each case sends. Used by the client-side tests here and by the real-apiserver tests
//! in kind-tests (included there with `#[path]`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// Root of the repository (this file lives in `crds/tests/support/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root exists")
}

/// One row of the table.
#[derive(Debug, Deserialize)]
pub struct AdmissionCase {
    pub name: String,
    pub base: String,
    #[serde(default)]
    pub update: bool,
    #[serde(default)]
    pub old: Vec<Op>,
    #[serde(default)]
    pub ops: Vec<Op>,
    pub expect: Expect,
}

/// A change to a JSON document, addressed by JSON pointer.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Op {
    Set { set: String, value: Value },
    Remove { remove: String },
}

/// What admission must answer.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Expect {
    /// `accept`
    Accept(AcceptWord),
    /// A CEL rule fails with a message containing this text.
    Cel { cel: String },
    /// Schema validation fails at this JSON pointer.
    Schema { schema: String },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptWord {
    Accept,
}

/// Every case in the table.
pub fn load_cases() -> Vec<AdmissionCase> {
    let path = repo_root().join("crds/tests/admission_cases.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    // The first document of the file.
    let first = serde_yaml::Deserializer::from_str(&text)
        .next()
        .unwrap_or_else(|| panic!("{} holds no document", path.display()));
    serde::Deserialize::deserialize(first).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// The single object in `examples/quickstart/<file>`, as JSON. The Agent comes as it would be
/// written without skills: the tools of its skills (`skills.yaml`) in its own `spec.tools`.
pub fn quickstart_object(file: &str) -> Value {
    let mut object = first_object(file);
    if file == "agent.yaml" {
        let skills = repo_root().join("examples/quickstart/skills.yaml");
        let text =
            std::fs::read_to_string(&skills).unwrap_or_else(|e| panic!("read {}: {e}", skills.display()));
        let mut tools = Vec::new();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let skill: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("parse {}: {e}", skills.display()));
            tools.extend(skill["spec"]["tools"].as_array().cloned().unwrap_or_default());
        }
        object["spec"]["tools"] = Value::Array(tools);
        if let Some(spec) = object["spec"].as_object_mut() {
            spec.remove("skillRefs");
        }
    }
    object
}

/// The first object in `examples/quickstart/<file>`, as JSON.
pub fn first_object(file: &str) -> Value {
    let path = repo_root().join("examples/quickstart").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    // The first document of the file.
    let first = serde_yaml::Deserializer::from_str(&text)
        .next()
        .unwrap_or_else(|| panic!("{} holds no document", path.display()));
    serde::Deserialize::deserialize(first).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// The objects a case sends: `(Some(old), new)` for updates, `(None, new)` for creates.
pub fn build(case: &AdmissionCase) -> (Option<Value>, Value) {
    let mut old = quickstart_object(&case.base);
    apply(&mut old, &case.old, &case.name);
    let mut new = old.clone();
    apply(&mut new, &case.ops, &case.name);
    if case.update {
        (Some(old), new)
    } else {
        (None, new)
    }
}

fn apply(doc: &mut Value, ops: &[Op], case: &str) {
    for op in ops {
        match op {
            Op::Set { set, value } => {
                let (parent, key) = split_pointer(set);
                let target = doc
                    .pointer_mut(parent)
                    .unwrap_or_else(|| panic!("case {case:?}: no parent {parent} for {set}"));
                let value = expand(value);
                match target {
                    Value::Object(map) => {
                        map.insert(key.to_owned(), value);
                    }
                    Value::Array(items) => {
                        let index: usize = key.parse().expect("array index");
                        items[index] = value;
                    }
                    _ => panic!("case {case:?}: {parent} is not a container"),
                }
            }
            Op::Remove { remove } => {
                let (parent, key) = split_pointer(remove);
                let removed = match doc.pointer_mut(parent) {
                    Some(Value::Object(map)) => map.remove(key).is_some(),
                    _ => false,
                };
                assert!(removed, "case {case:?}: nothing to remove at {remove}");
            }
        }
    }
}

fn split_pointer(pointer: &str) -> (&str, &str) {
    pointer.rsplit_once('/').expect("JSON pointer starts with /")
}

/// `"LONG:<n>"` stands for a string of n characters (keeps the table readable).
fn expand(value: &Value) -> Value {
    match value.as_str().and_then(|s| s.strip_prefix("LONG:")) {
        Some(n) => Value::String("x".repeat(n.parse().expect("LONG:<n>"))),
        None => value.clone(),
    }
}
