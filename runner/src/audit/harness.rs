//! The harness under audit: the ContextOS objects (typed), and the Kubernetes objects the trust
//! model depends on (namespaces, admission policies, the ContextOS Deployments), each with the
//! document it came from. Objects whose spec cannot be read are kept aside with the reason, so
//! the audit reports them instead of silently skipping them.

use std::fmt;

use contextos_crds::{AgentSpec, ContextPackSpec, PolicySpec, SandboxProfileSpec, SessionSpec};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{field::FieldPath, source::Document};

/// The ContextOS API group/version the audit reads.
pub const API_VERSION: &str = "contextos.dev/v1alpha1";

/// Which object a finding is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// One object: where it is and what it says.
#[derive(Clone, Debug)]
pub struct Object<T> {
    pub id: ObjectRef,
    pub doc: Document,
    pub spec: T,
}

impl<T> Object<T> {
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        meta_map(&self.doc.value, "labels")
    }

    pub fn annotations(&self) -> impl Iterator<Item = (&str, &str)> {
        meta_map(&self.doc.value, "annotations")
    }

    /// Whether `other` lives in the same namespace (objects read from files without a namespace
    /// are taken to share the one they will be applied to).
    pub fn same_namespace<U>(&self, other: &Object<U>) -> bool {
        self.id.namespace == other.id.namespace
    }
}

fn meta_map<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = (&'a str, &'a str)> {
    value["metadata"][key]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
}

/// An object of a ContextOS kind whose spec does not read as that kind.
#[derive(Clone, Debug)]
pub struct Unreadable {
    pub id: ObjectRef,
    pub doc: Document,
    pub field: FieldPath,
    pub problem: String,
}

/// Everything the audit looks at.
#[derive(Clone, Debug, Default)]
pub struct Harness {
    pub agents: Vec<Object<AgentSpec>>,
    pub policies: Vec<Object<PolicySpec>>,
    pub context_packs: Vec<Object<ContextPackSpec>>,
    pub sandbox_profiles: Vec<Object<SandboxProfileSpec>>,
    pub sessions: Vec<Object<SessionSpec>>,
    /// Every other object (Namespaces, admission policies, Deployments, ConfigMaps, …), whole.
    pub others: Vec<Object<Value>>,
    pub unreadable: Vec<Unreadable>,
    /// Read from a live cluster (so objects missing from it are missing, not just elsewhere).
    pub from_cluster: bool,
}

impl Harness {
    /// Sorts documents into the harness.
    pub fn from_documents(documents: Vec<Document>, from_cluster: bool) -> Self {
        let mut harness = Self {
            from_cluster,
            ..Self::default()
        };
        for doc in documents {
            harness.add(doc);
        }
        harness
    }

    fn add(&mut self, doc: Document) {
        let value = &doc.value;
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let id = ObjectRef {
            kind: kind.clone(),
            namespace: value["metadata"]["namespace"].as_str().map(str::to_owned),
            name: value["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
        };
        if value["apiVersion"].as_str() != Some(API_VERSION) {
            self.others.push(Object {
                id,
                spec: doc.value.clone(),
                doc,
            });
            return;
        }
        match kind.as_str() {
            "Agent" => typed(id, doc, &mut self.agents, &mut self.unreadable),
            "Policy" => typed(id, doc, &mut self.policies, &mut self.unreadable),
            "ContextPack" => typed(id, doc, &mut self.context_packs, &mut self.unreadable),
            "SandboxProfile" => typed(id, doc, &mut self.sandbox_profiles, &mut self.unreadable),
            "Session" => typed(id, doc, &mut self.sessions, &mut self.unreadable),
            _ => self.others.push(Object {
                id,
                spec: doc.value.clone(),
                doc,
            }),
        }
    }

    /// Every object of the harness (readable or not), with its document.
    pub fn all_objects(&self) -> impl Iterator<Item = (&ObjectRef, &Document)> {
        self.agents
            .iter()
            .map(|o| (&o.id, &o.doc))
            .chain(self.policies.iter().map(|o| (&o.id, &o.doc)))
            .chain(self.context_packs.iter().map(|o| (&o.id, &o.doc)))
            .chain(self.sandbox_profiles.iter().map(|o| (&o.id, &o.doc)))
            .chain(self.sessions.iter().map(|o| (&o.id, &o.doc)))
            .chain(self.others.iter().map(|o| (&o.id, &o.doc)))
            .chain(self.unreadable.iter().map(|o| (&o.id, &o.doc)))
    }

    /// Other objects of `kind` (any API group).
    pub fn others_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Object<Value>> {
        self.others.iter().filter(move |o| o.id.kind == kind)
    }

    /// The object `name` in `from`'s namespace.
    pub fn find<'a, T, U>(
        &self,
        list: &'a [Object<T>],
        from: &Object<U>,
        name: &str,
    ) -> Option<&'a Object<T>> {
        list.iter().find(|o| o.id.name == name && o.same_namespace(from))
    }

    /// The policies an Agent names that are in the harness, in `policyRefs` order.
    pub fn policies_of<'a>(&'a self, agent: &Object<AgentSpec>) -> Vec<&'a Object<PolicySpec>> {
        agent
            .spec
            .policy_refs
            .iter()
            .filter_map(|r| self.find(&self.policies, agent, &r.name))
            .collect()
    }

    /// The Agents that name `policy`.
    pub fn agents_using_policy<'a>(
        &'a self,
        policy: &'a Object<PolicySpec>,
    ) -> impl Iterator<Item = &'a Object<AgentSpec>> {
        self.agents.iter().filter(move |a| {
            a.same_namespace(policy) && a.spec.policy_refs.iter().any(|r| r.name == policy.id.name)
        })
    }

    /// The SandboxProfile an Agent names, if it is in the harness.
    pub fn sandbox_of(&self, agent: &Object<AgentSpec>) -> Option<&Object<SandboxProfileSpec>> {
        self.find(
            &self.sandbox_profiles,
            agent,
            &agent.spec.sandbox_profile_ref.name,
        )
    }

    /// Whether the harness holds the ContextOS installation itself (its CRDs or Deployments), so
    /// that install-level rules apply.
    pub fn has_installation(&self) -> bool {
        self.from_cluster
            || self.others.iter().any(|o| {
                (o.id.kind == "CustomResourceDefinition" && o.id.name.ends_with(".contextos.dev"))
                    || (o.id.kind == "Deployment" && o.id.name.starts_with("contextos-"))
            })
    }
}

fn typed<T: DeserializeOwned>(
    id: ObjectRef,
    doc: Document,
    list: &mut Vec<Object<T>>,
    unreadable: &mut Vec<Unreadable>,
) {
    let spec = doc.value.get("spec").cloned().unwrap_or(Value::Null);
    match serde_path_to_error::deserialize::<_, T>(spec) {
        Ok(spec) => list.push(Object { id, doc, spec }),
        Err(error) => {
            let field = field_of(error.path());
            unreadable.push(Unreadable {
                id,
                doc,
                field,
                problem: error.inner().to_string(),
            });
        }
    }
}

/// `spec.tools[1].risk` from serde_path_to_error's path of the spec.
fn field_of(path: &serde_path_to_error::Path) -> FieldPath {
    use serde_path_to_error::Segment;
    path.iter()
        .fold(FieldPath::of(&["spec"]), |field, segment| match segment {
            Segment::Seq { index } => field.index(*index),
            Segment::Map { key } => field.key(key),
            Segment::Enum { variant } => field.key(variant),
            Segment::Unknown => field,
        })
}
