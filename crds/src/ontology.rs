//! The Ontology kind: the types of entity (service, incident, customer account, …) a tenant's
//! memory and tool calls refer to, and how an entity of each type is recognised. One per
//! namespace, named `default`. Agents pin it with the rest of what they run, so recall filters
//! and policy conditions (`call.entityTypes`) read the same types in a replay as in the run.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The entity types of a tenant.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "Ontology",
    doc = "The types of entity a tenant's memory and tool calls refer to (service, incident, …) and how an id of each looks. One per namespace, named default; Agents pin it like a Policy, so a change is a candidate their replay gate decides.",
    namespaced,
    cel,
    status = "OntologyStatus",
    shortname = "onto",
    category = "contextos",
    validation = Rule::new("self.metadata.name == 'default'").message("a namespace has one Ontology, named default: rename it (metadata.name: default)"),
    printcolumn(name = "Types", type_ = "integer", json_path = ".status.typeCount"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct OntologySpec {
    /// The entity types, each named once.
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u.name == t.name))").message("spec.entityTypes names the same type twice; remove the duplicate"))]
    #[schemars(length(min = 1, max = 64))]
    pub entity_types: Vec<EntityType>,
}

/// One type of entity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityType {
    /// The type's name, as recall filters (`entityType`), tools (`touches[].type`) and policy
    /// conditions (`call.entityTypes`) name it: lowercase letters, digits and `-`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// What an entity of this type is, for the people who read the records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub description: Option<String>,
    /// How an id of this type looks, as a regular expression (RE2 syntax, no look-around) that
    /// matches the whole id, e.g. `INC-[0-9]{4,8}`. Ids are found with it in the text of memory
    /// items and in every string of a call's arguments. Without it, entities of this type are
    /// only those tools declare (`spec.tools[].touches`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub id_pattern: Option<String>,
}

/// Where an Ontology stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OntologyStatus {
    /// `Ready`: every id pattern compiles (or which one does not, and why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many entity types it declares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_count: Option<u32>,
}
