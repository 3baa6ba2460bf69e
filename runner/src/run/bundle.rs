//! The run bundle: every spec one Session runs under, pinned — the Session, its Agent, the
//! ContextPack revision (its spec and its ConfigMap sources' contents), the Policies in order,
//! and the model script. The operator writes it (immutable) for a runner pod; `contextos run`
//! builds it from local YAML.
//! It is stored with the record, so a replay can re-run a session under exactly these versions.
//!
//! Secret values are never part of a bundle: they are resolved separately and never recorded.

use std::collections::BTreeMap;

use contextos_crds::{AgentSpec, ContextPackSpec, OntologySpec, SessionSpec};
use serde::{Deserialize, Serialize};

use crate::{
    context::ResolvedSource,
    gateway::bundle::{GatewayBundle, NamedPolicy},
    records::{PinnedDigests, canonical::digest_of},
};

/// One Session's pinned specs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunBundle {
    /// The namespace: the tenant every record and call belongs to.
    pub tenant: String,
    /// Session name; also the session id records and checkpoints are keyed by.
    pub session: String,
    pub session_spec: SessionSpec,
    pub agent: String,
    pub agent_spec: AgentSpec,
    /// The pack at the revision the run pinned, its ConfigMap sources' contents included.
    pub context_pack: NamedPack,
    /// Contents of the pack's ConfigMap-backed sources, by source name, in a bundle written
    /// before they were part of the pack's revision (`context_pack.contents`); read through
    /// [`RunBundle::pack_contents`]. Kept so recorded bundles read and hash as they were written.
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
    /// The agent's policies in `policyRefs` order.
    pub policies: Vec<NamedPolicy>,
    /// Digest of the SandboxProfile spec the run is confined by (none for local runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_profile_digest: Option<String>,
    /// The scripted model's script, when the agent uses `provider: scripted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_script: Option<String>,
    /// The Session's labels (replay gates select recorded sessions by them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub session_labels: BTreeMap<String, String>,
    /// The Agent's labels when the run started (SpendQuotas select runs by them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub agent_labels: BTreeMap<String, String>,
    /// The tenant's entity types (its Ontology) the run finds entities with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ontology: Option<OntologySpec>,
    /// The model's price when the run started (none: no PriceList, or a scripted model none
    /// prices): each model turn's cost is recorded at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_price: Option<crate::pricing::PinnedPrice>,
    /// The scripts of the scripted models `spec.routing` names, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routed_scripts: BTreeMap<String, String>,
    /// The prices of the models `spec.routing` names when the run started, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routed_prices: BTreeMap<String, crate::pricing::PinnedPrice>,
    /// The per-call prices of the Agent's paid tools when the run started, by tool name (a tool
    /// not here costs nothing in money).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tool_prices: BTreeMap<String, crate::pricing::PinnedToolPrice>,
    /// The skills the Agent uses, at the revisions the run pinned: their tools are in
    /// `agent_spec.tools`, their prompt fragments join the pack's sources when the context is
    /// compiled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<crate::skills::SkillUse>,
}

/// A ContextPack revision and its name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedPack {
    pub name: String,
    pub spec: ContextPackSpec,
    /// What its ConfigMap sources held at this revision, by source name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub contents: BTreeMap<String, String>,
}

impl NamedPack {
    /// The pack `name` at `spec`, with no ConfigMap contents (yet).
    pub fn new(name: impl Into<String>, spec: ContextPackSpec) -> Self {
        Self {
            name: name.into(),
            spec,
            contents: BTreeMap::new(),
        }
    }

    /// Its revision identity: the digest of its [`PackRevision`].
    pub fn digest(&self) -> String {
        revision_digest(&self.spec, &self.contents)
    }

    /// The same pack with `contents` for the ConfigMap sources `spec` names that `contents`
    /// lacks (a candidate read from a file has none: it is replayed with what the run read).
    pub fn with_contents_from(mut self, contents: &BTreeMap<String, String>) -> Self {
        for source in &self.spec.sources {
            if source.config_map_ref.is_some()
                && !self.contents.contains_key(&source.name)
                && let Some(content) = contents.get(&source.name)
            {
                self.contents.insert(source.name.clone(), content.clone());
            }
        }
        self
    }
}

/// What a ContextPack's gate promotes and its snapshot keeps: its spec and the contents its
/// ConfigMap sources held. An edit to such a ConfigMap is a candidate like an edit to the spec,
/// and a Session reads the promoted contents, never the ConfigMap as it is now. A pack without
/// ConfigMap sources serializes, and so digests, as its spec alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackRevision {
    #[serde(flatten)]
    pub spec: ContextPackSpec,
    /// By source name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_contents: BTreeMap<String, String>,
}

impl PackRevision {
    /// Its revision identity.
    pub fn digest(&self) -> String {
        revision_digest(&self.spec, &self.source_contents)
    }

    /// The pack `name` at this revision.
    pub fn named(self, name: impl Into<String>) -> NamedPack {
        NamedPack {
            name: name.into(),
            spec: self.spec,
            contents: self.source_contents,
        }
    }
}

/// The digest of a [`PackRevision`] of `spec` and `contents`, without copying them.
fn revision_digest(spec: &ContextPackSpec, contents: &BTreeMap<String, String>) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Revision<'a> {
        #[serde(flatten)]
        spec: &'a ContextPackSpec,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        source_contents: &'a BTreeMap<String, String>,
    }
    spec_digest(&Revision {
        spec,
        source_contents: contents,
    })
}

/// An Agent spec and its name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedAgent {
    pub name: String,
    pub spec: AgentSpec,
}

/// What an Agent runs, as one revision: its spec (its own tools and its skills', see
/// [`crate::skills::compose`]) and the promoted revisions of the pack, policies and skills it
/// uses. The operator promotes compositions through the Agent's replay gate, and a
/// Session pins the promoted one, so pointing an Agent at another Policy, dropping one, or
/// re-creating one is a candidate like any Policy change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Composition {
    /// The Agent's spec without its `promotion` (the gate is not part of what runs).
    pub agent_spec: AgentSpec,
    pub context_pack: NamedPack,
    /// In `policyRefs` order.
    pub policies: Vec<NamedPolicy>,
    /// The namespace's Ontology, when it has one: what a run finds entities with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ontology: Option<OntologySpec>,
    /// The skills it uses, at their promoted revisions (their tools are in
    /// `agent_spec.tools`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<crate::skills::SkillUse>,
    /// The script of the Agent's own model when `model.scriptRef` names one, as its ConfigMap
    /// held it: an edit to it is a candidate, and Sessions run the promoted script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_script: Option<String>,
    /// The scripts of the models `spec.routing` names by `scriptRef`, by routing name, likewise.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routed_scripts: BTreeMap<String, String>,
}

impl Composition {
    /// The composition of `agent_spec` with these revisions.
    pub fn new(agent_spec: &AgentSpec, context_pack: NamedPack, policies: Vec<NamedPolicy>) -> Self {
        Self {
            agent_spec: AgentSpec {
                promotion: None,
                ..agent_spec.clone()
            },
            context_pack,
            policies,
            ontology: None,
            skills: Vec::new(),
            model_script: None,
            routed_scripts: BTreeMap::new(),
        }
    }

    /// The same composition running these model scripts (its own model's, its routed models').
    pub fn with_scripts(
        mut self,
        model_script: Option<String>,
        routed_scripts: BTreeMap<String, String>,
    ) -> Self {
        self.model_script = model_script;
        self.routed_scripts = routed_scripts;
        self
    }

    /// The same composition with these skills (their tools already in the spec's).
    pub fn with_skills(mut self, skills: Vec<crate::skills::SkillUse>) -> Self {
        self.skills = skills;
        self
    }

    /// The same composition under the namespace's Ontology.
    pub fn with_ontology(mut self, ontology: Option<OntologySpec>) -> Self {
        self.ontology = ontology;
        self
    }

    /// Its revision identity.
    pub fn digest(&self) -> String {
        spec_digest(self)
    }
}

/// A candidate revision to replay a bundle under.
#[derive(Clone, Debug, Default)]
pub struct Candidate {
    pub policies: Vec<NamedPolicy>,
    pub context_pack: Option<NamedPack>,
    /// A whole Agent composition: replaces the agent spec, the pack and every policy.
    pub composition: Option<Composition>,
    /// The Agent's spec as it would be; each run keeps the pack and policies it ran with.
    pub agent: Option<NamedAgent>,
    /// The namespace's Ontology as it would be.
    pub ontology: Option<OntologySpec>,
    /// The prices of the candidate Agent's models, by routing name (`primary` for its own), as
    /// the candidate's files price them; a model not here is priced as its runs pinned it.
    pub prices: BTreeMap<String, crate::pricing::PinnedPrice>,
    /// A Skill's candidate (its gate evaluates it; it replaces nothing in a recorded run).
    pub skill: Option<crate::skills::SkillCandidate>,
}

impl Candidate {
    /// Whether all the candidate changes is Policies: what it can change in a run is only how
    /// its calls are decided.
    pub fn changes_policies_only(&self) -> bool {
        !self.policies.is_empty()
            && self.context_pack.is_none()
            && self.composition.is_none()
            && self.agent.is_none()
            && self.ontology.is_none()
            && self.skill.is_none()
    }
}

/// A candidate that does not fit the bundle.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CandidateError {
    #[error("candidate Agent {name} is not the agent of this run ({agent}); replay {name}'s sessions")]
    AgentNotReplayed { name: String, agent: String },
    #[error(
        "candidate Policy {name} is not used by agent {agent} (its spec.policyRefs: {refs}); rename the candidate or replay another agent's sessions"
    )]
    PolicyNotReferenced {
        name: String,
        agent: String,
        refs: String,
    },
    #[error(
        "candidate ContextPack {name} is not the pack of agent {agent} (spec.contextPackRef is {expected})"
    )]
    PackNotReferenced {
        name: String,
        agent: String,
        expected: String,
    },
    /// What the agent runs names an entity type the candidate's Ontology does not declare (or
    /// the Ontology does not compile): such a revision would not become Ready.
    #[error("under the candidate Ontology, agent {agent}: {problem}")]
    Ontology { agent: String, problem: String },
    /// A candidate Agent lists a skill the recorded run did not use: its tools are unknown here.
    #[error(
        "candidate Agent {agent} uses Skill {skill}, which the recorded run did not (it used: {used}); replay with a candidate that uses the run's skills"
    )]
    SkillNotRecorded {
        agent: String,
        skill: String,
        used: String,
    },
    /// A candidate Agent declares a tool one of its skills declares too (a cluster would not
    /// make it Ready).
    #[error("candidate Agent {agent} declares tool {tool}, which one of its skills declares too")]
    ToolTwice { agent: String, tool: String },
}

/// `sha256:` digest of a spec (canonical JSON): the revision identity of packs and policies.
pub fn spec_digest<T: Serialize>(spec: &T) -> String {
    // Plain data with string keys: serialization cannot fail.
    digest_of(spec).unwrap_or_default()
}

/// The bundle a run recorded in its `run_started` entry (`first`, as read), read back from its
/// blob — its input opened with the run's key when the run is about a subject, or reading as
/// erased once they are. `Ok(None)`: the entry names no bundle.
pub async fn recorded_bundle<S: crate::records::RecordStore>(
    store: &S,
    tenant: &crate::records::TenantId,
    run_id: &str,
    first: &crate::records::RecordEntry,
) -> Result<Option<RunBundle>, String> {
    let crate::records::EntryBody::RunStarted { bundle, .. } = &first.body else {
        return Err("its first entry is not run_started".into());
    };
    let Some(hash) = bundle else { return Ok(None) };
    let bytes = store
        .get_blob(tenant, hash)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("its bundle blob {hash} is missing"))?;
    let key = match &first.vaulted {
        Some(subject) => store
            .run_key(tenant, run_id, subject, crate::vault::KeyUse::Read)
            .await
            .map_err(|e| e.to_string())?,
        None => None,
    };
    RunBundle::from_stored(&bytes, key.as_ref()).map(Some)
}

/// What a part of an erased subject's bundle reads as.
fn erased_part(label: &str) -> serde_json::Value {
    let erased = crate::records::vaulted::ERASED;
    match label {
        INPUT_LABEL => serde_json::json!({ "prompt": erased }),
        "run_bundle.model_script" => serde_json::Value::String(erased.into()),
        // Approvals and resolutions: none that can be read.
        _ => serde_json::json!([]),
    }
}

/// What a stored bundle's encrypted input is bound to.
const INPUT_LABEL: &str = "run_bundle.session_spec.input";

/// The parts of a bundle that are about the person a run is about, encrypted in its stored
/// copy: the Session's input (their request), the reasons and notes people gave on its calls,
/// and a scripted model's script (it stands in for the model's answers, which a run records
/// encrypted).
const PERSONAL_PARTS: [(&str, &str); 4] = [
    ("/sessionSpec/input", INPUT_LABEL),
    ("/sessionSpec/approvals", "run_bundle.session_spec.approvals"),
    ("/sessionSpec/resolutions", "run_bundle.session_spec.resolutions"),
    ("/modelScript", "run_bundle.model_script"),
];

impl RunBundle {
    /// What `turn` cost at the pinned price of the model that answered it.
    pub fn turn_cost(&self, turn: &crate::model::ModelTurn) -> Option<crate::pricing::TurnCost> {
        let answered_by = turn
            .route
            .as_ref()
            .map_or(contextos_crds::model_routing::PRIMARY, |r| r.answered_by.as_str());
        self.price_of_route(answered_by).map(|p| {
            p.cost(
                turn.prompt_tokens,
                turn.cached_prompt_tokens,
                turn.completion_tokens,
            )
        })
    }

    /// The pinned price of the model routing names `name` (`primary`: the Agent's own model).
    pub fn price_of_route(&self, name: &str) -> Option<&crate::pricing::PinnedPrice> {
        if name == contextos_crds::model_routing::PRIMARY {
            self.model_price.as_ref()
        } else {
            self.routed_prices.get(name)
        }
    }

    /// The currencies the Agent's models (its own and those its routing names) are priced in.
    pub fn model_currencies(&self) -> std::collections::BTreeSet<&str> {
        self.model_price
            .iter()
            .chain(self.routed_prices.values())
            .map(|p| p.currency.as_str())
            .collect()
    }

    /// The price of the Agent's dearest model (its own, or one its routing names) for a turn of
    /// `prompt` and `completion` tokens: what a turn may cost at most, whichever answers.
    pub fn dearest_price(&self, prompt: u64, completion: u64) -> Option<&crate::pricing::PinnedPrice> {
        self.model_price
            .iter()
            .chain(self.routed_prices.values())
            .max_by_key(|p| p.cost(prompt, 0, completion).nanos)
    }

    /// The name at its endpoint of the model that answered `turn`.
    pub fn model_of(&self, turn: &crate::model::ModelTurn) -> String {
        match &turn.route {
            Some(route) => self.model_routed_as(&route.answered_by),
            None => self.agent_spec.model.model.clone(),
        }
    }

    /// The name at its endpoint of the model routing names `name` (`primary`, or a name routing
    /// does not know: the Agent's own model).
    pub fn model_routed_as(&self, name: &str) -> String {
        self.model_spec_routed_as(name).model.clone()
    }

    /// The model routing names `name` (`primary`, or a name routing does not know: the
    /// Agent's own model).
    pub fn model_spec_routed_as(&self, name: &str) -> &contextos_crds::agent::ModelSpec {
        let primary = &self.agent_spec.model;
        self.agent_spec
            .routing
            .as_ref()
            .and_then(|routing| routing.model(primary, name))
            .unwrap_or(primary)
    }

    /// The bundle's canonical JSON: what is stored (as a blob) with the record.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        crate::records::canonical::canonical_bytes_of(self).unwrap_or_default()
    }

    /// What the record stores of the bundle: its canonical JSON — for a run about a subject
    /// (`key` given: the run's), with [`PERSONAL_PARTS`] encrypted, as the person's request is
    /// theirs. A RunContext pins [`Self::content_digest`], of the bundle in the clear.
    pub fn stored_bytes(
        &self,
        key: Option<&crate::vault::SecretKey>,
    ) -> Result<Vec<u8>, crate::vault::VaultError> {
        let Some(key) = key else {
            return Ok(self.canonical_bytes());
        };
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        for (pointer, label) in PERSONAL_PARTS {
            if let Some(slot) = value.pointer_mut(pointer) {
                let plain = crate::records::canonical::to_canonical_bytes(slot);
                *slot = serde_json::Value::String(key.lock(label, &plain)?);
            }
        }
        Ok(crate::records::canonical::to_canonical_bytes(&value))
    }

    /// A bundle as [`Self::stored_bytes`] stored it: the input opened with the run's `key`, or
    /// — once the subject is erased (`key` none) — reading [`crate::records::vaulted::ERASED`].
    pub fn from_stored(bytes: &[u8], key: Option<&crate::vault::SecretKey>) -> Result<Self, String> {
        let mut value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("the bundle is not JSON: {e}"))?;
        for (pointer, label) in PERSONAL_PARTS {
            let Some(slot) = value.pointer_mut(pointer) else {
                continue;
            };
            let envelope = match &*slot {
                serde_json::Value::String(text) if crate::vault::cipher::is_envelope(text) => text.clone(),
                // In the clear: refused where it must have been encrypted (a key is given: the
                // run is about someone); as it is otherwise.
                _ if key.is_some() => return Err(format!("{label} is stored in the clear")),
                _ => continue,
            };
            *slot = match key {
                Some(key) => {
                    let plain = key.unlock(label, &envelope).map_err(|e| e.to_string())?;
                    serde_json::from_slice(&plain).map_err(|e| format!("{label} is not JSON: {e}"))?
                }
                None => erased_part(label),
            };
        }
        let bundle: Self =
            serde_json::from_value(value.clone()).map_err(|e| format!("the bundle cannot be read: {e}"))?;
        // A run's bundle as its runner stored it holds a bundle and nothing more: a field no
        // bundle has would stay in the clear, unread by anyone, for ever.
        if key.is_some() && serde_json::to_value(&bundle).ok().as_ref() != Some(&value) {
            return Err("it holds more than a bundle does".into());
        }
        Ok(bundle)
    }

    /// Content hash of [`RunBundle::canonical_bytes`]: the blob id the record stores the bundle
    /// under, and what a RunContext pins (`bundle_digest`).
    pub fn content_digest(&self) -> crate::records::Hash {
        crate::records::Hash::of(&self.canonical_bytes())
    }

    /// The digests this run is pinned to.
    pub fn pinned(&self) -> PinnedDigests {
        PinnedDigests {
            context_pack: self.context_pack.digest(),
            policies: self.policies.iter().map(|p| spec_digest(&p.spec)).collect(),
            sandbox_profile: self.sandbox_profile_digest.clone(),
        }
    }

    /// `sha256:` digest of the whole bundle.
    pub fn digest(&self) -> String {
        spec_digest(self)
    }

    /// What the pack's ConfigMap sources held when the run was pinned, by source name.
    pub fn pack_contents(&self) -> &BTreeMap<String, String> {
        if self.context_pack.contents.is_empty() {
            &self.sources
        } else {
            &self.context_pack.contents
        }
    }

    /// [`RunBundle::pack_contents`], moved out (the bundle is given another pack's revision).
    fn take_pack_contents(&mut self) -> BTreeMap<String, String> {
        let legacy = std::mem::take(&mut self.sources);
        let contents = std::mem::take(&mut self.context_pack.contents);
        if contents.is_empty() { legacy } else { contents }
    }

    /// The pack's ConfigMap sources as the context compiler takes them.
    pub fn resolved_sources(&self) -> Vec<ResolvedSource> {
        ResolvedSource::all(self.pack_contents())
    }

    /// The gateway's view: tools, policies, and the secret values adapters need.
    pub fn gateway_bundle(&self, secrets: BTreeMap<String, String>) -> GatewayBundle {
        GatewayBundle {
            tenant: self.tenant.clone(),
            agent: self.agent.clone(),
            spec: self.agent_spec.clone(),
            policies: self.policies.clone(),
            secrets,
            ontology: self.ontology.clone(),
            tool_prices: self.tool_prices.clone(),
            context_pack_digest: Some(self.context_pack.digest()),
            // The label only the gateway service gives a Session it starts for an A2A caller
            // (admission policy contextos-a2a-sessions), pinned with the run.
            outside_caller: self
                .session_labels
                .contains_key(crate::gateway::a2a_server::wire::A2A_LABEL),
        }
    }

    /// This bundle with candidate revisions swapped in (same names; a candidate must replace
    /// something the agent uses).
    pub fn with_candidate(mut self, candidate: &Candidate) -> Result<Self, CandidateError> {
        if let Some(composition) = &candidate.composition {
            let ran_with = self.take_pack_contents();
            self.agent_spec = composition.agent_spec.clone();
            self.context_pack = composition.context_pack.clone().with_contents_from(&ran_with);
            self.policies = composition.policies.clone();
            self.ontology = composition.ontology.clone();
            self.skills = composition.skills.clone();
            if composition.model_script.is_some() {
                self.model_script = composition.model_script.clone();
            }
            self.routed_scripts.extend(composition.routed_scripts.clone());
        }
        if let Some(agent) = &candidate.agent {
            if agent.name != self.agent {
                return Err(CandidateError::AgentNotReplayed {
                    name: agent.name.clone(),
                    agent: self.agent.clone(),
                });
            }
            // Its skills' tools as the run had them (a replay has no other source for them).
            let mut tools = agent.spec.tools.clone();
            for reference in &agent.spec.skill_refs {
                let Some(used) = self.skills.iter().find(|s| s.name == reference.name) else {
                    return Err(CandidateError::SkillNotRecorded {
                        agent: agent.name.clone(),
                        skill: reference.name.clone(),
                        used: self
                            .skills
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                };
                tools.extend(
                    self.agent_spec
                        .tools
                        .iter()
                        .filter(|t| used.tools.contains(&t.name))
                        .cloned(),
                );
            }
            if let Some(tool) = tools
                .iter()
                .enumerate()
                .find(|(i, t)| tools[..*i].iter().any(|u| u.name == t.name))
                .map(|(_, t)| t.name.clone())
            {
                return Err(CandidateError::ToolTwice {
                    agent: agent.name.clone(),
                    tool,
                });
            }
            let skills = self
                .skills
                .iter()
                .filter(|s| agent.spec.skill_refs.iter().any(|r| r.name == s.name))
                .cloned()
                .collect();
            self.agent_spec = AgentSpec {
                tools,
                ..agent.spec.clone()
            };
            self.skills = skills;
        }
        self.policies = self.policies_under(candidate)?;
        if let Some(pack) = &candidate.context_pack {
            if pack.name != self.context_pack.name {
                return Err(CandidateError::PackNotReferenced {
                    name: pack.name.clone(),
                    agent: self.agent.clone(),
                    expected: self.context_pack.name.clone(),
                });
            }
            let ran_with = self.take_pack_contents();
            self.context_pack = pack.clone().with_contents_from(&ran_with);
        }
        if let Some(ontology) = &candidate.ontology {
            self.ontology = Some(ontology.clone());
        }
        if candidate.ontology.is_some() || candidate.composition.is_some() || candidate.context_pack.is_some()
        {
            self.check_entity_types()?;
        }
        Ok(self)
    }

    /// The bundle's policies with the candidate's in place of those of the same name (each
    /// must be one the bundle has: a run is decided only by the policies its Agent names).
    pub fn policies_under(&self, candidate: &Candidate) -> Result<Vec<NamedPolicy>, CandidateError> {
        let mut policies = self.policies.clone();
        for policy in &candidate.policies {
            let Some(slot) = policies.iter_mut().find(|p| p.name == policy.name) else {
                return Err(CandidateError::PolicyNotReferenced {
                    name: policy.name.clone(),
                    agent: self.agent.clone(),
                    refs: self
                        .policies
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            slot.spec = policy.spec.clone();
        }
        Ok(policies)
    }

    /// Whether the tools and memory sources name only types of the bundle's Ontology.
    fn check_entity_types(&self) -> Result<(), CandidateError> {
        let problem = |problem: String| CandidateError::Ontology {
            agent: self.agent.clone(),
            problem,
        };
        let ontology = match &self.ontology {
            Some(spec) => crate::ontology::Ontology::compile(spec).map_err(|e| problem(e.to_string()))?,
            None => crate::ontology::Ontology::default(),
        };
        if let Some(found) = ontology.touches_problem(&self.agent_spec.tools) {
            return Err(problem(found));
        }
        if let Some(found) = ontology.sources_problem(&self.context_pack.spec) {
            return Err(problem(format!(
                "ContextPack {}: {found}",
                self.context_pack.name
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quickstart() -> RunBundle {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        crate::manifests::ManifestSet::load(&[dir])
            .and_then(|set| set.bundle("shop", None))
            .expect("the quickstart resolves")
    }

    /// A run of a Session the gateway started for an A2A caller (the label only it may give)
    /// governs its memory as one acting for a caller from outside; any other run does not.
    #[test]
    fn a_run_for_an_a2a_caller_governs_its_memory_as_one_for_an_outside_caller() {
        let mut bundle = quickstart();
        assert!(!bundle.gateway_bundle(BTreeMap::new()).outside_caller);
        bundle
            .session_labels
            .insert(crate::gateway::a2a_server::wire::A2A_LABEL.into(), "true".into());
        assert!(bundle.gateway_bundle(BTreeMap::new()).outside_caller);
    }

    #[test]
    fn a_pack_revision_is_its_spec_and_its_configmap_contents() {
        let bundle = quickstart();
        let pack = &bundle.context_pack;
        assert!(pack.contents.contains_key("checkout-runbook"));
        // A snapshot written before contents were part of a revision reads as one without them,
        // and a pack without ConfigMap sources digests as its spec alone, as it always did.
        let old: PackRevision =
            serde_json::from_value(serde_json::to_value(&pack.spec).expect("spec")).expect("reads");
        assert!(old.source_contents.is_empty());
        assert_eq!(old.digest(), spec_digest(&pack.spec));
        assert_ne!(pack.digest(), spec_digest(&pack.spec));
        // The same revision, as snapshotted and read back.
        let revision = PackRevision {
            spec: pack.spec.clone(),
            source_contents: pack.contents.clone(),
        };
        let read: PackRevision =
            serde_json::from_value(serde_json::to_value(&revision).expect("revision")).expect("reads");
        assert_eq!(read, revision);
        assert_eq!(read.digest(), pack.digest());
        // An edit to the ConfigMap is another revision, pinned as such.
        let mut edited = bundle.clone();
        edited
            .context_pack
            .contents
            .insert("checkout-runbook".into(), "scale everything to zero".into());
        assert_ne!(edited.pinned().context_pack, bundle.pinned().context_pack);
        assert_ne!(
            edited.gateway_bundle(BTreeMap::new()).context_pack_digest,
            bundle.gateway_bundle(BTreeMap::new()).context_pack_digest
        );
    }

    #[test]
    fn a_candidate_pack_brings_its_contents_or_is_replayed_with_the_runs() {
        let bundle = quickstart();
        let ran = bundle.pack_contents()["checkout-runbook"].clone();
        // From a file: the spec alone, replayed with what the run read.
        let from_file = NamedPack::new(bundle.context_pack.name.clone(), bundle.context_pack.spec.clone());
        let candidate = Candidate {
            context_pack: Some(from_file),
            ..Candidate::default()
        };
        let replayed = bundle.clone().with_candidate(&candidate).expect("fits");
        assert_eq!(replayed.pack_contents()["checkout-runbook"], ran);
        // From a gate: the candidate revision's own contents.
        let mut gated = bundle.context_pack.clone();
        gated.contents.insert("checkout-runbook".into(), "edited".into());
        let candidate = Candidate {
            context_pack: Some(gated.clone()),
            ..Candidate::default()
        };
        let replayed = bundle.clone().with_candidate(&candidate).expect("fits");
        assert_eq!(replayed.pack_contents()["checkout-runbook"], "edited");
        assert_eq!(replayed.pinned().context_pack, gated.digest());
        // A bundle recorded before contents were the pack's keeps them in `sources`.
        let mut legacy = bundle.clone();
        legacy.sources = std::mem::take(&mut legacy.context_pack.contents);
        assert_eq!(legacy.pack_contents()["checkout-runbook"], ran);
        assert_eq!(
            legacy.pinned().context_pack,
            spec_digest(&legacy.context_pack.spec)
        );
        let mut composition = Composition::new(&bundle.agent_spec, gated, bundle.policies.clone());
        composition.model_script = Some("{\"turns\": []}".into());
        let candidate = Candidate {
            composition: Some(composition),
            ..Candidate::default()
        };
        let replayed = legacy.with_candidate(&candidate).expect("fits");
        assert_eq!(replayed.pack_contents()["checkout-runbook"], "edited");
        assert!(replayed.sources.is_empty(), "one place holds them");
        assert_eq!(replayed.model_script.as_deref(), Some("{\"turns\": []}"));
    }
}
