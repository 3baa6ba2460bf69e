//! The harness under audit: the ContextOS objects (typed), and the Kubernetes objects the trust
//! model depends on (namespaces, admission policies, the ContextOS Deployments), each with the
//! document it came from. Objects whose spec cannot be read are kept aside with the reason, so
//! the audit reports them instead of silently skipping them.

use std::fmt;

use contextos_crds::{
    AgentSpec, ConsentSpec, ContextPackSpec, OntologySpec, PolicySpec, SandboxProfileSpec, SessionSpec,
    SkillSpec,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::{
    evidence::Evidence, field::FieldPath, live::ServerListing, openapi::ApiDocument, source::Document,
};

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
    /// An Agent's tools that come from its skills (they follow its own in `spec.tools`, as a
    /// run has them): a finding about one points at the Skill that declares it.
    pub borrowed: Vec<BorrowedTools>,
}

/// `spec.tools[from..from + count]` of an Agent as audited: `spec.tools[0..count]` of a Skill.
#[derive(Clone, Debug)]
pub struct BorrowedTools {
    pub from: usize,
    pub count: usize,
    pub skill: ObjectRef,
    pub doc: Document,
}

impl<T> Object<T> {
    /// Where `field` of this object is declared: a borrowed tool's field is its Skill's.
    pub fn declared_at(&self, field: FieldPath) -> (&ObjectRef, &Document, FieldPath) {
        let tools = FieldPath::of(&["spec", "tools"]);
        if let Some((i, rest)) = field.under_item(&tools)
            && let Some(lent) = self
                .borrowed
                .iter()
                .find(|b| (b.from..b.from + b.count).contains(&i))
        {
            return (
                &lent.skill,
                &lent.doc,
                FieldPath::with_item(&tools, i - lent.from, rest),
            );
        }
        (&self.id, &self.doc, field)
    }

    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        meta_map(&self.doc.value, "labels")
    }

    pub fn annotations(&self) -> impl Iterator<Item = (&str, &str)> {
        meta_map(&self.doc.value, "annotations")
    }

    /// Whether `other` lives in the same namespace. An object read from a file without a
    /// namespace goes wherever it is applied (`kubectl apply -n`, kustomize's `namespace:`), so it
    /// is taken to share any namespace.
    pub fn same_namespace<U>(&self, other: &Object<U>) -> bool {
        match (&self.id.namespace, &other.id.namespace) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
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
    /// Each with its skills' tools after its own (see [`Object::borrowed`]).
    pub agents: Vec<Object<AgentSpec>>,
    pub skills: Vec<Object<SkillSpec>>,
    pub policies: Vec<Object<PolicySpec>>,
    pub context_packs: Vec<Object<ContextPackSpec>>,
    pub sandbox_profiles: Vec<Object<SandboxProfileSpec>>,
    pub sessions: Vec<Object<SessionSpec>>,
    pub ontologies: Vec<Object<OntologySpec>>,
    pub consents: Vec<Object<ConsentSpec>>,
    /// Every other object (Namespaces, admission policies, Deployments, ConfigMaps, …), whole.
    pub others: Vec<Object<Value>>,
    pub unreadable: Vec<Unreadable>,
    /// Read from a live cluster (so objects missing from it are missing, not just elsewhere).
    pub from_cluster: bool,
    /// What the records of the audited window show (`--records`), for the records rules.
    pub evidence: Option<Evidence>,
    /// What live MCP servers list (`--mcp`, `--mcp-command`), for the live rules.
    pub live: Vec<ServerListing>,
    /// The OpenAPI documents of the APIs tools call (`--openapi`), for the openapi rules.
    pub apis: Vec<ApiDocument>,
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
        harness.lend_skill_tools();
        harness
    }

    /// Gives each Agent the tools of the skills it lists that the harness holds, as a run has
    /// them: a destructive tool is audited whether the Agent or a Skill declares it.
    fn lend_skill_tools(&mut self) {
        for agent in &mut self.agents {
            for reference in agent.spec.skill_refs.clone() {
                let Some(skill) = self
                    .skills
                    .iter()
                    .find(|s| s.id.name == reference.name && s.same_namespace(agent))
                else {
                    continue;
                };
                agent.borrowed.push(BorrowedTools {
                    from: agent.spec.tools.len(),
                    count: skill.spec.tools.len(),
                    skill: skill.id.clone(),
                    doc: skill.doc.clone(),
                });
                agent.spec.tools.extend(skill.spec.tools.iter().cloned());
            }
        }
    }

    /// The harness with what the records show.
    pub fn with_evidence(mut self, evidence: Evidence) -> Self {
        self.evidence = Some(evidence);
        self
    }

    fn add(&mut self, doc: Document) {
        let value = &doc.value;
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let id = ObjectRef {
            kind: kind.clone(),
            namespace: value["metadata"]["namespace"].as_str().map(str::to_owned),
            name: value["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
        };
        let api_version = value["apiVersion"].as_str().unwrap_or_default();
        let ours = matches!(
            kind.as_str(),
            "Agent"
                | "Policy"
                | "ContextPack"
                | "SandboxProfile"
                | "Session"
                | "Ontology"
                | "Consent"
                | "Skill"
        );
        // Kinds the audit reads as others: what people say of runs, prices and quotas.
        let kept = matches!(
            kind.as_str(),
            "Feedback" | "Proposal" | "PriceList" | "SpendQuota"
        );
        if api_version.starts_with("contextos.dev/") && (api_version != API_VERSION || !(ours || kept)) {
            // A typo in the group's version or kind would otherwise pass as "not ours".
            let (field, problem) = if api_version == API_VERSION {
                (
                    "kind",
                    format!(
                        "{kind:?} is not a ContextOS kind (Agent, Policy, ContextPack, SandboxProfile, Session, Ontology, Consent, Skill, Feedback, Proposal, PriceList, SpendQuota)"
                    ),
                )
            } else {
                (
                    "apiVersion",
                    format!("{api_version} is not served; this release serves {API_VERSION}"),
                )
            };
            self.unreadable.push(Unreadable {
                id,
                doc,
                field: FieldPath::of(&[field]),
                problem,
            });
            return;
        }
        if api_version != API_VERSION || kept {
            self.others.push(Object {
                id,
                spec: doc.value.clone(),
                doc,
                borrowed: Vec::new(),
            });
            return;
        }
        match kind.as_str() {
            "Agent" => typed(id, doc, &mut self.agents, &mut self.unreadable),
            "Policy" => typed(id, doc, &mut self.policies, &mut self.unreadable),
            "ContextPack" => typed(id, doc, &mut self.context_packs, &mut self.unreadable),
            "SandboxProfile" => typed(id, doc, &mut self.sandbox_profiles, &mut self.unreadable),
            "Ontology" => typed(id, doc, &mut self.ontologies, &mut self.unreadable),
            "Consent" => typed(id, doc, &mut self.consents, &mut self.unreadable),
            "Skill" => typed(id, doc, &mut self.skills, &mut self.unreadable),
            // Session, the only kind left (`ours` above).
            _ => typed(id, doc, &mut self.sessions, &mut self.unreadable),
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
            .chain(self.ontologies.iter().map(|o| (&o.id, &o.doc)))
            .chain(self.consents.iter().map(|o| (&o.id, &o.doc)))
            .chain(self.skills.iter().map(|o| (&o.id, &o.doc)))
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

    /// Whether any ContextOS object was read (readable or not).
    pub fn has_contextos_objects(&self) -> bool {
        !(self.agents.is_empty()
            && self.policies.is_empty()
            && self.context_packs.is_empty()
            && self.sandbox_profiles.is_empty()
            && self.sessions.is_empty()
            && self.ontologies.is_empty()
            && self.consents.is_empty()
            && self.unreadable.is_empty())
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
        Ok(spec) => list.push(Object {
            id,
            doc,
            spec,
            borrowed: Vec::new(),
        }),
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::audit::source;

    fn harness(text: &str) -> Harness {
        Harness::from_documents(source::parse(Path::new("h.yaml"), text).expect("parsed"), false)
    }

    #[test]
    fn an_object_without_a_namespace_resolves_in_any_namespace() {
        let h = harness(
            "apiVersion: contextos.dev/v1alpha1\nkind: Agent\nmetadata: {name: a}\nspec: {}\n---\n\
             apiVersion: contextos.dev/v1alpha1\nkind: Policy\nmetadata: {name: p, namespace: shop}\nspec: {}\n---\n\
             apiVersion: contextos.dev/v1alpha1\nkind: Policy\nmetadata: {name: q, namespace: other}\nspec: {}\n",
        );
        let (p, q) = (&h.policies[0], &h.policies[1]);
        assert!(!p.same_namespace(q) && h.find(&h.policies, p, "p").is_some());
        assert!(
            h.find(&h.policies, q, "p").is_none(),
            "namespaced objects stay apart"
        );
    }

    #[test]
    fn a_contextos_object_of_an_unknown_version_or_kind_is_reported_not_ignored() {
        let h = harness(
            "apiVersion: contextos.dev/v1beta1\nkind: Policy\nmetadata: {name: p}\nspec: {}\n---\n\
             apiVersion: contextos.dev/v1alpha1\nkind: Polcy\nmetadata: {name: q}\nspec: {}\n",
        );
        let problems: Vec<(&str, &str)> = h
            .unreadable
            .iter()
            .map(|u| (u.field.as_str(), u.problem.as_str()))
            .collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].0 == "apiVersion" && problems[0].1.contains("not served"));
        assert!(problems[1].0 == "kind" && problems[1].1.contains("not a ContextOS kind"));
        assert!(h.others.is_empty());
    }
}
