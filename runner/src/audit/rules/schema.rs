//! Rules about objects that do not say what their authors meant: a spec that does not read as its
//! kind, and fields the kind does not have (the API server drops them without a word, so a
//! misspelt `when:` for `condition:` silently removes a policy's condition).

use std::collections::BTreeMap;

use super::{Check, Sink};
use crate::audit::{
    field::FieldPath,
    finding::{Rule, RuleId, Severity},
    harness::Harness,
};

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("schema/unreadable-spec"),
            severity: Severity::High,
            title: "a ContextOS object whose spec does not read as its kind",
            why: "the API server refuses it, or the operator reports it Ready=False: nothing it declares takes effect",
            fix: "correct the field the finding names (its type, or a required field that is missing)",
        },
        unreadable_spec,
    ),
    (
        Rule {
            id: RuleId("schema/unknown-field"),
            severity: Severity::High,
            title: "a field the object's kind does not have",
            why: "kubectl refuses it, but clients that do not ask for strict field validation (many GitOps tools) only get a warning and the API server drops it: a misspelt setting (`when:` for `condition:`) silently stops governing anything",
            fix: "spell the field as `kubectl explain <kind>.spec` shows it, or remove it",
        },
        unknown_fields,
    ),
    (
        Rule {
            id: RuleId("schema/duplicate-object"),
            severity: Severity::Medium,
            title: "two documents declaring the same object",
            why: "applied together, the later one silently replaces the earlier; reviewers may read the one that loses",
            fix: "keep one document per object (move candidates for replay out of the applied tree)",
        },
        duplicate_objects,
    ),
];

fn duplicate_objects(harness: &Harness, sink: &mut Sink<'_>) {
    let mut first: BTreeMap<&crate::audit::harness::ObjectRef, &crate::audit::source::Document> =
        BTreeMap::new();
    let mut all: Vec<_> = harness
        .all_objects()
        .filter(|(id, _)| !id.name.is_empty())
        .collect();
    // In the order the files were read, so "the later one" is the later file.
    all.sort_by(|a, b| (&a.1.file, a.1.line).cmp(&(&b.1.file, b.1.line)));
    for (id, doc) in all {
        match first.get(id) {
            None => {
                first.insert(id, doc);
            }
            Some(earlier) => {
                let place = match earlier.line_of(&FieldPath::root()) {
                    Some(line) => format!("{}:{line}", earlier.file.display()),
                    None => "the cluster".to_owned(),
                };
                sink.report_at(
                    id,
                    doc,
                    FieldPath::root(),
                    format!("{id} is also declared at {place}"),
                );
            }
        }
    }
}

fn unreadable_spec(harness: &Harness, sink: &mut Sink<'_>) {
    for object in &harness.unreadable {
        sink.report_at(
            &object.id,
            &object.doc,
            object.field.clone(),
            object.problem.clone(),
        );
    }
}

fn unknown_fields(harness: &Harness, sink: &mut Sink<'_>) {
    let docs = harness
        .agents
        .iter()
        .map(|o| (&o.id, &o.doc))
        .chain(harness.policies.iter().map(|o| (&o.id, &o.doc)))
        .chain(harness.context_packs.iter().map(|o| (&o.id, &o.doc)))
        .chain(harness.sandbox_profiles.iter().map(|o| (&o.id, &o.doc)))
        .chain(harness.sessions.iter().map(|o| (&o.id, &o.doc)))
        .chain(harness.ontologies.iter().map(|o| (&o.id, &o.doc)))
        .chain(harness.consents.iter().map(|o| (&o.id, &o.doc)));
    for (id, doc) in docs {
        for field in crate::known_fields::unknown_fields(&id.kind, &doc.value) {
            let message = format!("{field} is not a field of {}", id.kind);
            sink.report_at(id, doc, field, message);
        }
    }
}
