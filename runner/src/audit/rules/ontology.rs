//! Rules about the namespace's entity types (its Ontology) and what uses them: an Ontology its
//! Agents cannot use, tools and memory sources naming types it does not declare, and Agents that
//! keep what runs about people learn outside those people's memory.

use contextos_crds::{AgentSpec, OntologySpec, agent::FromSubjectRuns, common::MemoryScope};

use super::{Check, Sink, spec};
use crate::{
    audit::{
        field::FieldPath,
        finding::{Rule, RuleId, Severity},
        harness::{Harness, Object},
    },
    ontology::{ONTOLOGY_NAME as NAME, Ontology},
};

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("ontology/unusable"),
            severity: Severity::High,
            title: "an Ontology its namespace's Agents cannot use",
            why: "an id pattern that does not compile (or matches the empty text) makes every Agent of the namespace Ready=False; one not named default is refused at admission and declares nothing",
            fix: "name it default and correct the pattern the finding names (RE2 syntax, matching a whole id)",
        },
        unusable,
    ),
    (
        Rule {
            id: RuleId("agent/unknown-entity-type"),
            severity: Severity::High,
            title: "a tool or memory source naming an entity type its namespace does not declare",
            why: "the Agent is Ready=False and none of its Sessions start; a policy condition on that type would never see it",
            fix: "declare the type in the namespace's Ontology (named default), or correct the name",
        },
        unknown_entity_types,
    ),
    (
        Rule {
            id: RuleId("agent/subject-learnings-outlive-erasure"),
            severity: Severity::Medium,
            title: "an Agent that keeps what runs about a person learn outside that person's memory",
            why: "with `spec.memory.fromSubjectRuns: allScopes` such a run's learnings may be kept in the agent's or namespace's memory, in the clear, and are not erased with the person",
            fix: "leave `fromSubjectRuns` at `subjectOnly` unless the agent's general learnings cannot be about the people it serves",
        },
        learnings_outlive_erasure,
    ),
];

fn unusable(harness: &Harness, sink: &mut Sink<'_>) {
    for ontology in &harness.ontologies {
        if ontology.id.name != NAME {
            sink.report(
                ontology,
                FieldPath::of(&["metadata", "name"]),
                format!(
                    "Ontology {} is not named {NAME}: admission refuses it, and Agents read only the one named {NAME}",
                    ontology.id.name
                ),
            );
            continue;
        }
        if let Err(e) = Ontology::compile(&ontology.spec) {
            sink.report(ontology, field_of(&e.field), e.problem);
        }
    }
}

/// The path of `spec.entityTypes[i].<key>` as the compiler names it.
fn field_of(named: &str) -> FieldPath {
    let mut path = spec(&["entityTypes"]);
    let rest = named.strip_prefix("spec.entityTypes[").unwrap_or_default();
    if let Some((index, key)) = rest.split_once(']')
        && let Ok(index) = index.parse()
    {
        path = path.index(index);
        if let Some(key) = key.strip_prefix('.') {
            path = path.key(key);
        }
    }
    path
}

/// The namespace's Ontology as `agent` would read it: `None` when the audited objects hold no
/// Ontology named default for its namespace, an empty one when it does not compile (reported
/// by `ontology/unusable`).
fn ontology_of<'h>(harness: &'h Harness, agent: &Object<AgentSpec>) -> Option<&'h Object<OntologySpec>> {
    harness
        .ontologies
        .iter()
        .find(|o| o.id.name == NAME && o.same_namespace(agent))
}

fn unknown_entity_types(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        let declared = ontology_of(harness, agent);
        let Ok(compiled) = declared.map_or_else(|| Ok(Ontology::default()), |o| Ontology::compile(&o.spec))
        else {
            continue;
        };
        let missing = |name: &str| -> Option<String> {
            compiled.entity_type(name).err().map(|why| match declared {
                None => {
                    format!("{name:?}: the audited objects hold no Ontology named {NAME} in this namespace")
                }
                Some(_) => why,
            })
        };
        for (i, tool) in agent.spec.tools.iter().enumerate() {
            for (j, touched) in tool.touches.iter().enumerate() {
                if let Some(why) = missing(&touched.entity_type) {
                    sink.report(
                        agent,
                        spec(&["tools"]).index(i).key("touches").index(j).key("type"),
                        format!("{} touches {why}", tool.name),
                    );
                }
            }
        }
        let Some(pack) = harness.find(&harness.context_packs, agent, &agent.spec.context_pack_ref.name)
        else {
            continue;
        };
        for (i, source) in pack.spec.sources.iter().enumerate() {
            let Some(wanted) = source.memory.as_ref().and_then(|m| m.entity_type.as_deref()) else {
                continue;
            };
            if let Some(why) = missing(wanted) {
                sink.report(
                    pack,
                    spec(&["sources"]).index(i).key("memory").key("entityType"),
                    format!(
                        "memory source {} of Agent {}'s pack recalls {why}",
                        source.name, agent.id.name
                    ),
                );
            }
        }
    }
}

fn learnings_outlive_erasure(harness: &Harness, sink: &mut Sink<'_>) {
    for agent in &harness.agents {
        let Some(memory) = &agent.spec.memory else {
            continue;
        };
        if memory.from_subject_runs != FromSubjectRuns::AllScopes {
            continue;
        }
        let beyond: Vec<String> = memory
            .keep
            .iter()
            .filter(|k| k.scope != MemoryScope::Subject)
            .map(|k| format!("{:?} in {:?} scope", k.memory_type, k.scope).to_lowercase())
            .collect();
        if !beyond.is_empty() {
            sink.report(
                agent,
                spec(&["memory", "fromSubjectRuns"]),
                format!(
                    "runs about a person may keep {} outside their memory, not erased with them",
                    beyond.join(", ")
                ),
            );
        }
    }
}
