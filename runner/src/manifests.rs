//! Local manifests: the YAML a GitOps repository holds (Agents, ContextPacks, Policies,
//! SandboxProfiles, Sessions, ConfigMaps, Secrets), read from files and directories and resolved
//! into a run bundle the way the operator resolves them in a cluster. Every error names the
//! file, the object and the field.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use contextos_crds::{AgentSpec, ContextPackSpec, PolicySpec, SessionSpec, agent::ModelProvider};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{
    gateway::bundle::NamedPolicy,
    run::bundle::{NamedPack, RunBundle, spec_digest},
};

/// One object read from a file.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub file: PathBuf,
    pub kind: String,
    pub name: String,
    pub value: Value,
}

impl Manifest {
    fn location(&self) -> String {
        format!("{}: {} {}", self.file.display(), self.kind, self.name)
    }

    /// The typed `spec`, or an error naming the offending field — one the kind does not have
    /// too: the API server would drop it, so a misspelt setting would govern nothing.
    fn spec<T: DeserializeOwned>(&self) -> Result<T, ManifestError> {
        if let Some(field) = crate::known_fields::unknown_fields(&self.kind, &self.value).first() {
            return Err(self.error(
                field.to_string(),
                format!(
                    "is not a field of {}: spell it as `kubectl explain {}` shows, or remove it",
                    self.kind,
                    field_in_explain(&self.kind, field)
                ),
            ));
        }
        let spec = self.value.get("spec").cloned().unwrap_or(Value::Null);
        let decoded = serde_path_to_error::deserialize(spec).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "spec".to_owned()
            } else {
                format!("spec.{path}")
            };
            self.error(field, e.into_inner().to_string())
        })?;
        // Free-form fields nested past the bound read as a marker (see
        // contextos_crds::free_form): refused here as the operator refuses them.
        if let Some(problem) = self.nested_too_deep() {
            let (field, problem) = problem.split_once(": ").unwrap_or(("spec", &problem));
            return Err(self.error(field, problem));
        }
        Ok(decoded)
    }

    /// The first free-form field of a Session, Agent or Skill nested too deep, as a problem.
    fn nested_too_deep(&self) -> Option<String> {
        use contextos_crds::free_form;
        let spec = self.value.get("spec").cloned().unwrap_or(Value::Null);
        match self.kind.as_str() {
            "Session" => serde_json::from_value(spec)
                .ok()
                .and_then(|s| free_form::session_problem(&s)),
            "Agent" => serde_json::from_value(spec)
                .ok()
                .and_then(|s| free_form::agent_problem(&s)),
            "Skill" => serde_json::from_value(spec)
                .ok()
                .and_then(|s| free_form::skill_problem(&s)),
            _ => None,
        }
    }

    fn error(&self, field: impl Into<String>, problem: impl Into<String>) -> ManifestError {
        ManifestError {
            location: self.location(),
            field: Some(field.into()),
            problem: problem.into(),
        }
    }
}

/// Most bytes of one manifest file (as the audit reads them).
const MAX_FILE_BYTES: u64 = 16 << 20;

/// The text of `file`, read no further than [`MAX_FILE_BYTES`].
fn read_bounded(file: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("is larger than {} MiB", MAX_FILE_BYTES >> 20));
    }
    String::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_owned())
}

/// Why an object of the files is neither read nor left to others.
#[derive(Debug, PartialEq, Eq)]
struct NotRead {
    field: &'static str,
    problem: String,
}

/// Whether a local run reads an object of `kind` written as `api_version`: ContextOS's kinds
/// and core ConfigMaps and Secrets (what ContextPacks and tools name) are; what belongs to
/// another API (a Deployment, another project's `Policy`) is left to kubectl. A ContextOS
/// version this release does not serve, or a kind of its group it does not have, is refused:
/// a typo would otherwise leave the object out silently (an Agent's Policy unread governs
/// nothing).
fn read_as_ours(api_version: Option<&str>, kind: &str) -> Result<bool, NotRead> {
    let served = <contextos_crds::Agent as contextos_crds::kube::Resource>::api_version(&());
    match api_version {
        None => Err(NotRead {
            field: "apiVersion",
            problem: format!("is missing: ContextOS kinds are {served}, ConfigMaps and Secrets v1"),
        }),
        Some(version) if version == served && crate::known_fields::is_contextos_kind(kind) => Ok(true),
        Some(version) if version == served => Err(NotRead {
            field: "kind",
            problem: format!(
                "{kind:?} is not a ContextOS kind (see `kubectl api-resources --api-group=contextos.dev`)"
            ),
        }),
        // Spelt otherwise (a version this release does not serve, the group in capitals or
        // with spaces), it is still meant for ContextOS: read as another API's, it would be
        // left out without a word.
        Some(version) if version.trim().to_ascii_lowercase().starts_with("contextos.") => Err(NotRead {
            field: "apiVersion",
            problem: format!("{version:?} is not served; this release serves {served}"),
        }),
        Some("v1") if crate::known_fields::is_contextos_kind(kind) => Err(NotRead {
            field: "apiVersion",
            problem: format!("v1 has no kind {kind}; ContextOS's are {served}"),
        }),
        Some("v1") => Ok(matches!(kind, "ConfigMap" | "Secret")),
        Some(_) => Ok(false),
    }
}

/// A manifest problem: where, which field, what to do.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// `file: Kind name`, or the file alone.
    pub location: String,
    pub field: Option<String>,
    pub problem: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {field}: {}", self.location, self.problem),
            None => write!(f, "{}: {}", self.location, self.problem),
        }
    }
}

/// Every object of the given files.
#[derive(Clone, Debug, Default)]
pub struct ManifestSet {
    pub objects: Vec<Manifest>,
}

impl ManifestSet {
    /// Reads `.yaml`, `.yml` and `.json` files, and such files directly inside directories
    /// (kustomization files are skipped: they hold no objects).
    pub fn load(paths: &[PathBuf]) -> Result<Self, ManifestError> {
        let mut set = Self::default();
        let mut expansion = crate::yaml_bounds::Expansion::default();
        for path in paths {
            for file in files_of(path)? {
                set.read_file(&file, &mut expansion)?;
            }
        }
        Ok(set)
    }

    fn read_file(
        &mut self,
        file: &Path,
        expansion: &mut crate::yaml_bounds::Expansion,
    ) -> Result<(), ManifestError> {
        let at_file = |problem: String| ManifestError {
            location: file.display().to_string(),
            field: None,
            problem,
        };
        let text = read_bounded(file).map_err(at_file)?;
        expansion.check(&text).map_err(at_file)?;
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let yaml = serde_yaml::Value::deserialize(document)
                .map_err(|e| at_file(format!("document {} is not valid YAML: {e}", index + 1)))?;
            if yaml.is_null() {
                continue;
            }
            let value: Value = serde_json::to_value(&yaml)
                .map_err(|e| at_file(format!("document {} cannot be read as JSON: {e}", index + 1)))?;
            let text_of = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
            let kind =
                text_of("kind").ok_or_else(|| at_file(format!("document {} has no kind", index + 1)))?;
            let named = value.pointer("/metadata/name").and_then(Value::as_str);
            match read_as_ours(text_of("apiVersion").as_deref(), &kind) {
                Ok(true) => {}
                // Another API's (a `List`, an object named by `generateName`): kubectl's.
                Ok(false) => continue,
                Err(problem) => {
                    return Err(ManifestError {
                        location: format!("{}: {kind} {}", file.display(), named.unwrap_or("(no name)")),
                        field: Some(problem.field.to_owned()),
                        problem: problem.problem,
                    });
                }
            }
            let name = named
                .map(str::to_owned)
                .ok_or_else(|| at_file(format!("document {} ({kind}) has no metadata.name", index + 1)))?;
            self.objects.push(Manifest {
                file: file.to_owned(),
                kind,
                name,
                value,
            });
        }
        Ok(())
    }

    /// The object of `kind` named `name`; `referrer` explains who asked, for the error.
    pub fn find(&self, kind: &str, name: &str) -> Option<&Manifest> {
        self.objects.iter().find(|m| m.kind == kind && m.name == name)
    }

    /// Names of every object of `kind`.
    pub fn names(&self, kind: &str) -> Vec<&str> {
        self.objects
            .iter()
            .filter(|m| m.kind == kind)
            .map(|m| m.name.as_str())
            .collect()
    }

    /// Every Policy, typed (for candidate files).
    pub fn policies(&self) -> Result<Vec<NamedPolicy>, ManifestError> {
        self.objects
            .iter()
            .filter(|m| m.kind == "Policy")
            .map(|m| {
                Ok(NamedPolicy {
                    name: m.name.clone(),
                    spec: m.spec()?,
                })
            })
            .collect()
    }

    /// Every Skill among the files (or the one named `only`) as its gate evaluates it: its
    /// spec, the Policies its suite names (from the files), and what is wrong with the suite.
    pub fn skill_candidates(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, crate::skills::SkillCandidate)>, ManifestError> {
        let skills: Vec<&Manifest> = self
            .objects
            .iter()
            .filter(|m| m.kind == "Skill" && only.is_none_or(|name| m.name == name))
            .collect();
        if let (Some(name), true) = (only, skills.is_empty()) {
            return Err(ManifestError {
                location: "the files given".into(),
                field: None,
                problem: format!(
                    "hold no Skill {name} (Skills in them: {})",
                    self.names("Skill").join(", ")
                ),
            });
        }
        let mut out = Vec::new();
        for skill in skills {
            let spec: contextos_crds::SkillSpec = skill.spec()?;
            let mut policies = Vec::new();
            for (i, reference) in spec.evals.policy_refs.iter().enumerate() {
                let field = format!("spec.evals.policyRefs[{i}].name");
                let policy = self.referenced(skill, &field, "Policy", &reference.name)?;
                policies.push(NamedPolicy {
                    name: policy.name.clone(),
                    spec: policy.spec::<PolicySpec>()?,
                });
            }
            let candidate = crate::skills::SkillCandidate {
                skill: spec,
                policies,
            };
            if let Some(problem) = crate::skills::eval::suite_problem(&candidate) {
                let (field, problem) = problem.split_once(": ").unwrap_or(("spec.evals", &problem));
                return Err(skill.error(field, problem));
            }
            out.push((skill.name.clone(), candidate));
        }
        Ok(out)
    }

    /// Every ContextPack, typed (for candidate files).
    pub fn context_packs(&self) -> Result<Vec<NamedPack>, ManifestError> {
        self.objects
            .iter()
            .filter(|m| m.kind == "ContextPack")
            .map(|m| Ok(NamedPack::new(m.name.clone(), m.spec()?)))
            .collect()
    }

    /// Every Agent, typed (for candidate files).
    pub fn agents(&self) -> Result<Vec<crate::run::bundle::NamedAgent>, ManifestError> {
        self.objects
            .iter()
            .filter(|m| m.kind == "Agent")
            .map(|m| {
                Ok(crate::run::bundle::NamedAgent {
                    name: m.name.clone(),
                    spec: m.spec()?,
                })
            })
            .collect()
    }

    /// Secret values by `<secret>/<key>` from the Secrets among the files (`stringData` and
    /// base64 `data`).
    pub fn secrets(&self) -> Result<BTreeMap<String, String>, ManifestError> {
        let mut out = BTreeMap::new();
        for secret in self.objects.iter().filter(|m| m.kind == "Secret") {
            if let Some(data) = secret.value.get("stringData").and_then(Value::as_object) {
                for (key, value) in data {
                    let text = value.as_str().unwrap_or_default().to_owned();
                    out.insert(format!("{}/{key}", secret.name), text);
                }
            }
            if let Some(data) = secret.value.get("data").and_then(Value::as_object) {
                for (key, value) in data {
                    let field = format!("data.{key}");
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(value.as_str().unwrap_or_default())
                        .map_err(|e| secret.error(&field, format!("is not base64: {e}")))?;
                    let text =
                        String::from_utf8(bytes).map_err(|_| secret.error(&field, "is not UTF-8 text"))?;
                    out.insert(format!("{}/{key}", secret.name), text);
                }
            }
        }
        Ok(out)
    }

    /// A Consent among the files, as a refusal saying how to record it instead: a local run
    /// records no consent from files — consent is a person's decision, not something a run
    /// brings along (in a cluster the gateway chains the object its `recordedBy` applied).
    pub fn consent_in_files(&self) -> Option<ManifestError> {
        let consent = self.objects.iter().find(|m| m.kind == "Consent")?;
        let spec = &consent.value["spec"];
        let text = |key: &str| spec[key].as_str().unwrap_or("…").to_owned();
        let categories = spec["categories"]
            .as_array()
            .map(|c| c.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        let (verb, categories) = match spec["action"].as_str() {
            Some("revoke") if categories.is_empty() => ("revoke", String::new()),
            Some("revoke") => ("revoke", format!(" --categories {categories}")),
            _ => ("grant", format!(" --categories {categories}")),
        };
        Some(ManifestError {
            location: consent.location(),
            field: None,
            problem: format!(
                "a local run records no consent from the files it is given (consent is a person's decision, not a run's): record it with `contextos consent {verb} --subject {} --purpose {}{categories} --evidence {:?}` and leave this file out of -f (in a cluster, the person named in recordedBy applies it)",
                text("subject"),
                text("purpose"),
                text("evidence"),
            ),
        })
    }

    /// Resolves Session `session` (or the only Session in the files) into a run bundle, as the
    /// operator would in namespace `tenant`.
    pub fn bundle(&self, tenant: &str, session: Option<&str>) -> Result<RunBundle, ManifestError> {
        let session = self.session(session)?;
        let session_spec: SessionSpec = session.spec()?;
        if let Some((field, problem)) = local_session_problem(&session_spec) {
            return Err(session.error(field, problem));
        }
        let agent_name = &session_spec.agent_ref.name;
        let agent = self.referenced(session, "spec.agentRef.name", "Agent", agent_name)?;
        let mut agent_spec: AgentSpec = agent.spec()?;
        let pack_name = &agent_spec.context_pack_ref.name;
        let pack = self.referenced(agent, "spec.contextPackRef.name", "ContextPack", pack_name)?;
        let pack_spec: ContextPackSpec = pack.spec()?;
        if let Some(problem) = crate::memory::desk::source_problem(&pack_spec) {
            return Err(pack.error("spec.sources", problem));
        }
        let mut contents = BTreeMap::new();
        for (i, source) in pack_spec.sources.iter().enumerate() {
            if let Some(key) = &source.config_map_ref {
                let field = format!("spec.sources[{i}].configMapRef");
                contents.insert(source.name.clone(), self.config_map_key(pack, &field, key)?);
            }
        }
        let mut policies = Vec::new();
        for (i, reference) in agent_spec.policy_refs.iter().enumerate() {
            let field = format!("spec.policyRefs[{i}].name");
            let policy = self.referenced(agent, &field, "Policy", &reference.name)?;
            policies.push(NamedPolicy {
                name: policy.name.clone(),
                spec: policy.spec::<PolicySpec>()?,
            });
        }
        let sandbox_name = &agent_spec.sandbox_profile_ref.name;
        let sandbox = self.referenced(
            agent,
            "spec.sandboxProfileRef.name",
            "SandboxProfile",
            sandbox_name,
        )?;
        let sandbox_spec: contextos_crds::SandboxProfileSpec = sandbox.spec()?;
        let ceiling = crate::skills::ToolCeiling {
            profile: sandbox_name,
            max_risk: sandbox_spec.max_tool_risk,
        };
        let (tools, skills) = self.compose_skills(agent, &agent_spec, ceiling)?;
        agent_spec.tools = tools;
        if let Some(clash) = crate::skills::fragment_clash(&pack.name, &pack_spec, &skills) {
            return Err(agent.error(clash.field.clone(), clash.message.clone()));
        }
        if let Some(problem) = crate::gateway::adapters::adapter_problem(&agent_spec.tools) {
            return Err(agent.error("spec.tools", problem));
        }
        if let Some(problem) = crate::memory::desk::memory_problem(&agent_spec) {
            return Err(agent.error("spec.memory", problem));
        }
        if let Some(problem) =
            crate::run::execution::execution_refused(&agent_spec.tools, &sandbox_spec.execution, sandbox_name)
        {
            return Err(agent.error("spec.tools", problem));
        }
        let ontology = self.ontology()?;
        let compiled = match &ontology {
            Some((manifest, spec)) => crate::ontology::Ontology::compile(spec)
                .map_err(|e| manifest.error(e.field.clone(), e.problem.clone()))?,
            None => crate::ontology::Ontology::default(),
        };
        if let Some(problem) = compiled.touches_problem(&agent_spec.tools) {
            return Err(agent.error("spec.tools", problem));
        }
        if let Some(problem) = compiled.sources_problem(&pack_spec) {
            return Err(pack.error("spec.sources", problem));
        }
        let model_price = crate::pricing::price_for(&self.price_lists()?, &agent_spec.model)
            .map_err(|e| agent.error("spec.model", e.to_string()))?;
        let tool_prices = crate::pricing::tool_prices(&self.price_lists()?, &agent_spec.tools)
            .map_err(|e| agent.error("spec.tools", e.to_string()))?;
        let model_script = match (&agent_spec.model.provider, &agent_spec.model.script_ref) {
            (ModelProvider::Scripted, Some(key)) => {
                Some(self.config_map_key(agent, "spec.model.scriptRef", key)?)
            }
            _ => None,
        };
        let (mut routed_scripts, mut routed_prices) = (BTreeMap::new(), BTreeMap::new());
        for (i, routed) in agent_spec
            .routing
            .iter()
            .flat_map(|r| r.models.iter().enumerate())
        {
            let field = format!("spec.routing.models[{i}].model");
            if let Some(price) = crate::pricing::price_for(&self.price_lists()?, &routed.model)
                .map_err(|e| agent.error(field.clone(), e.to_string()))?
            {
                routed_prices.insert(routed.name.clone(), price);
            }
            if let (ModelProvider::Scripted, Some(key)) = (&routed.model.provider, &routed.model.script_ref) {
                let script = self.config_map_key(agent, &format!("{field}.scriptRef"), key)?;
                routed_scripts.insert(routed.name.clone(), script);
            }
        }
        Ok(RunBundle {
            tenant: tenant.to_owned(),
            session: session.name.clone(),
            session_spec,
            agent: agent.name.clone(),
            agent_spec,
            context_pack: NamedPack {
                name: pack.name.clone(),
                spec: pack_spec,
                contents,
            },
            sources: BTreeMap::new(),
            policies,
            sandbox_profile_digest: Some(spec_digest(&sandbox_spec)),
            model_script,
            session_labels: session
                .value
                .pointer("/metadata/labels")
                .and_then(|l| serde_json::from_value(l.clone()).ok())
                .unwrap_or_default(),
            agent_labels: agent
                .value
                .pointer("/metadata/labels")
                .and_then(|l| serde_json::from_value(l.clone()).ok())
                .unwrap_or_default(),
            ontology: ontology.map(|(_, spec)| spec),
            model_price,
            routed_scripts,
            routed_prices,
            tool_prices,
            skills,
        })
    }

    /// Agent `name`'s spec with its skills' tools after its own, as a run has them (the
    /// Skills, and its SandboxProfile when the files hold it, from the files).
    pub fn agent_with_skills(&self, name: &str) -> Result<AgentSpec, ManifestError> {
        let agent = self.find("Agent", name).ok_or_else(|| ManifestError {
            location: "the files given".into(),
            field: None,
            problem: format!(
                "hold no Agent {name} (Agents in them: {})",
                self.names("Agent").join(", ")
            ),
        })?;
        let mut spec: AgentSpec = agent.spec()?;
        let profile = spec.sandbox_profile_ref.name.clone();
        let max_risk = match self.find("SandboxProfile", &profile) {
            Some(sandbox) => {
                sandbox
                    .spec::<contextos_crds::SandboxProfileSpec>()?
                    .max_tool_risk
            }
            None => None,
        };
        let ceiling = crate::skills::ToolCeiling {
            profile: &profile,
            max_risk,
        };
        spec.tools = self.compose_skills(agent, &spec, ceiling)?.0;
        Ok(spec)
    }

    /// Skills as the files hold them: on one machine there is no promotion gate (a cluster
    /// runs a skill's promoted revision only; `contextos skill eval` runs its suite).
    fn compose_skills(
        &self,
        agent: &Manifest,
        spec: &AgentSpec,
        ceiling: crate::skills::ToolCeiling<'_>,
    ) -> Result<(Vec<contextos_crds::agent::Tool>, Vec<crate::skills::SkillUse>), ManifestError> {
        let mut skills = Vec::new();
        for (i, reference) in spec.skill_refs.iter().enumerate() {
            let field = format!("spec.skillRefs[{i}].name");
            let skill = self.referenced(agent, &field, "Skill", &reference.name)?;
            let spec: contextos_crds::SkillSpec = skill.spec()?;
            // What a run pins, here as in a cluster: the digest of the skill's spec.
            skills.push(crate::skills::NamedSkill {
                name: skill.name.clone(),
                digest: spec_digest(&spec),
                spec,
            });
        }
        crate::skills::compose(spec, &skills, ceiling)
            .map_err(|c| agent.error(c.field.clone(), c.message.clone()))
    }

    /// The PriceLists among the files, by name (cluster-scoped: every file's count).
    pub fn price_lists(&self) -> Result<Vec<(String, contextos_crds::PriceListSpec)>, ManifestError> {
        self.objects
            .iter()
            .filter(|m| m.kind == "PriceList")
            .map(|m| Ok((m.name.clone(), m.spec()?)))
            .collect()
    }

    /// The tenant's Ontology among the files: the one named `default`, as in a namespace.
    pub fn ontology(&self) -> Result<Option<(&Manifest, contextos_crds::OntologySpec)>, ManifestError> {
        if let Some(other) = self
            .objects
            .iter()
            .find(|m| m.kind == "Ontology" && m.name != crate::ontology::ONTOLOGY_NAME)
        {
            return Err(other.error(
                "metadata.name",
                "a namespace has one Ontology, named default: rename it",
            ));
        }
        match self.find("Ontology", crate::ontology::ONTOLOGY_NAME) {
            Some(manifest) => Ok(Some((manifest, manifest.spec()?))),
            None => Ok(None),
        }
    }

    /// The SpendQuotas in the files that select the run of Session `session` (by its Agent's
    /// labels and its own), by location. They are enforced by the gateway service in a
    /// cluster; a local run is not held to them.
    pub fn quotas_selecting(&self, session: Option<&str>) -> Result<Vec<String>, ManifestError> {
        let session = self.session(session)?;
        let spec: SessionSpec = session.spec()?;
        let agent = self.referenced(session, "spec.agentRef.name", "Agent", &spec.agent_ref.name)?;
        let labels = |m: &Manifest| -> BTreeMap<String, String> {
            serde_json::from_value(m.value["metadata"]["labels"].clone()).unwrap_or_default()
        };
        let mut selecting = Vec::new();
        for quota in self.objects.iter().filter(|m| m.kind == "SpendQuota") {
            let object = contextos_crds::SpendQuota::new(&quota.name, quota.spec()?);
            let active = crate::quota::ActiveQuota::compile(&object).map_err(|e| quota.error("spec", e))?;
            if active.selects(&labels(agent), &labels(session)) {
                selecting.push(quota.location());
            }
        }
        Ok(selecting)
    }

    fn session(&self, name: Option<&str>) -> Result<&Manifest, ManifestError> {
        let sessions: Vec<&Manifest> = self.objects.iter().filter(|m| m.kind == "Session").collect();
        let nowhere = |problem: String| ManifestError {
            location: "the given files".into(),
            field: None,
            problem,
        };
        match (name, sessions.as_slice()) {
            (Some(name), _) => sessions.iter().copied().find(|m| m.name == name).ok_or_else(|| {
                nowhere(format!(
                    "have no Session named {name} (Sessions found: {})",
                    self.names("Session").join(", ")
                ))
            }),
            (None, [only]) => Ok(only),
            (None, []) => Err(nowhere(
                "have no Session; add one (see examples/quickstart/session.yaml)".into(),
            )),
            (None, _) => Err(nowhere(format!(
                "have several Sessions ({}); choose one with --session",
                self.names("Session").join(", ")
            ))),
        }
    }

    fn referenced(
        &self,
        from: &Manifest,
        field: &str,
        kind: &str,
        name: &str,
    ) -> Result<&Manifest, ManifestError> {
        self.find(kind, name).ok_or_else(|| {
            from.error(
                field,
                format!("{kind} {name} is not among the given files; add it or fix the reference"),
            )
        })
    }

    fn config_map_key(
        &self,
        from: &Manifest,
        field: &str,
        key: &contextos_crds::common::KeyRef,
    ) -> Result<String, ManifestError> {
        let config_map = self.referenced(from, &format!("{field}.name"), "ConfigMap", &key.name)?;
        config_map
            .value
            .pointer(&format!(
                "/data/{}",
                key.key.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                from.error(
                    format!("{field}.key"),
                    format!("ConfigMap {} has no key {}", key.name, key.key),
                )
            })
    }
}

/// The manifest files a path stands for, in name order.
fn files_of(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let error = |problem: String| ManifestError {
        location: path.display().to_string(),
        field: None,
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| error(format!("cannot be read: {e}")))?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| error(format!("cannot be listed: {e}")))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Where `kubectl explain` shows the parent of `field` in `kind` (`policy.spec.rules` for
/// `spec.rules[0].when`): it names fields, not list items or map keys.
fn field_in_explain(kind: &str, field: &crate::field_path::FieldPath) -> String {
    let mut parent = field.parent().unwrap_or_default();
    while parent.as_str().ends_with(']') {
        parent = parent.parent().unwrap_or_default();
    }
    match parent.is_root() {
        true => kind.to_ascii_lowercase(),
        false => format!("{}.{}", kind.to_ascii_lowercase(), parent.as_str()),
    }
}

fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let kustomization = matches!(name, "kustomization.yaml" | "kustomization.yml" | "Kustomization");
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    !kustomization && matches!(extension, "yaml" | "yml" | "json")
}

/// A Session field the cluster acts on that a local run would not: people decide on a local
/// run with `contextos approve`, `contextos resolve` and Ctrl-C, not by editing the file.
fn local_session_problem(spec: &SessionSpec) -> Option<(&'static str, &'static str)> {
    if spec.cancel {
        Some((
            "spec.cancel",
            "a local run is not started cancelled: remove spec.cancel (stop a local run with Ctrl-C)",
        ))
    } else if !spec.approvals.is_empty() {
        Some((
            "spec.approvals",
            "a local run takes approvals from `contextos approve <session> --call <id> --as <you>`, not from the file: remove spec.approvals",
        ))
    } else if !spec.resolutions.is_empty() {
        Some((
            "spec.resolutions",
            "a local run takes findings from `contextos resolve <session> --call <id> --as <you>`, not from the file: remove spec.resolutions",
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quickstart() -> ManifestSet {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        ManifestSet::load(&[dir]).expect("quickstart loads")
    }

    #[test]
    fn the_quickstart_resolves_into_a_bundle() {
        let bundle = quickstart().bundle("shop", None).expect("resolves");
        assert_eq!(bundle.session, "checkout-5xx");
        assert_eq!(bundle.agent, "oncall-assistant");
        assert_eq!(bundle.policies.len(), 1);
        assert!(bundle.pack_contents()["checkout-runbook"].contains("elevated 5xx"));
        assert!(
            bundle
                .model_script
                .as_deref()
                .is_some_and(|s| s.contains("turns"))
        );
        assert!(bundle.pinned().context_pack.starts_with("sha256:"));
    }

    #[test]
    fn input_nested_too_deep_is_refused_naming_the_field() {
        let mut set = quickstart();
        let mut data = serde_json::json!(1);
        for _ in 0..=contextos_crds::free_form::MAX_DEPTH {
            data = serde_json::json!([data]);
        }
        for m in &mut set.objects {
            if m.kind == "Session" {
                m.value["spec"]["input"]["data"] = data.clone();
            }
        }
        let err = set.bundle("shop", None).expect_err("refused");
        assert_eq!(err.field.as_deref(), Some("spec.input.data"), "{err}");
        assert!(err.problem.contains("flatten"), "{err}");
    }

    /// A SpendQuota in the files is found when it selects the run, by the Agent's labels and the
    /// Session's, and not otherwise.
    #[test]
    fn the_spend_quotas_that_select_a_run_are_found() {
        let quota = |name: &str, selector: serde_json::Value| Manifest {
            file: PathBuf::from("quota.yaml"),
            kind: "SpendQuota".into(),
            name: name.into(),
            value: serde_json::json!({
                "apiVersion": "contextos.dev/v1alpha1", "kind": "SpendQuota",
                "metadata": {"name": name},
                "spec": {
                    "agentSelector": selector,
                    "limits": [{"window": "day", "toolCalls": 100}],
                },
            }),
        };
        let mut set = quickstart();
        assert!(set.quotas_selecting(None).expect("read").is_empty());
        let agent_labels = set
            .objects
            .iter()
            .find(|m| m.kind == "Agent")
            .map(|m| m.value["metadata"]["labels"].clone())
            .expect("the quickstart agent");
        set.objects.push(quota(
            "elsewhere",
            serde_json::json!({"matchLabels": {"team": "nobody"}}),
        ));
        assert!(set.quotas_selecting(None).expect("read").is_empty());
        set.objects.push(quota("everyone", serde_json::Value::Null));
        assert_eq!(
            set.quotas_selecting(None).expect("read"),
            vec!["quota.yaml: SpendQuota everyone".to_owned()],
            "a quota without selectors selects every run (the agent's labels: {agent_labels})"
        );
    }

    /// What the cluster acts on in a Session (cancel, approvals, findings) is refused in a
    /// local run, which would otherwise ignore it, naming the field and the command to use.
    #[test]
    fn a_sessions_cluster_decisions_are_refused_in_a_local_run_naming_the_field() {
        for (field, value, command) in [
            ("cancel", serde_json::json!(true), "Ctrl-C"),
            (
                "approvals",
                serde_json::json!([{"callHash": "ab", "decision": "approve", "approver": "dana@example.com"}]),
                "contextos approve",
            ),
            (
                "resolutions",
                serde_json::json!([{"callId": "4.0", "outcome": "acted", "resolver": "dana@example.com"}]),
                "contextos resolve",
            ),
        ] {
            let mut set = quickstart();
            for m in &mut set.objects {
                if m.kind == "Session" {
                    m.value["spec"][field] = value.clone();
                }
            }
            let err = set.bundle("shop", None).expect_err("refused");
            assert_eq!(
                err.field.as_deref(),
                Some(format!("spec.{field}").as_str()),
                "{err}"
            );
            assert!(err.problem.contains(command), "{err}");
        }
    }

    #[test]
    fn a_dangling_reference_names_file_object_and_field() {
        let mut set = quickstart();
        set.objects.retain(|m| m.kind != "Policy");
        let err = set.bundle("shop", None).expect_err("policy missing");
        assert!(
            err.location.ends_with("agent.yaml: Agent oncall-assistant"),
            "{err}"
        );
        assert_eq!(err.field.as_deref(), Some("spec.policyRefs[0].name"));
        assert!(err.problem.contains("Policy oncall-guardrails"), "{err}");
    }

    #[test]
    fn a_bad_field_value_is_named_with_its_path() {
        let mut set = quickstart();
        for m in &mut set.objects {
            if m.kind == "Skill" && m.name == "diagnosis" {
                m.value["spec"]["tools"][1]["risk"] = Value::String("harmless".into());
            }
        }
        let err = set.bundle("shop", None).expect_err("bad risk");
        assert_eq!(err.field.as_deref(), Some("spec.tools[1].risk"), "{err}");
        assert!(
            err.problem.contains("harmless") && err.location.contains("Skill diagnosis"),
            "{err}"
        );
    }

    #[test]
    fn a_consent_among_the_files_is_refused_saying_how_to_record_it() {
        let mut set = quickstart();
        assert!(set.consent_in_files().is_none());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/memory/consent");
        set.objects
            .extend(ManifestSet::load(&[dir]).expect("the example's consent").objects);
        let err = set.consent_in_files().expect("refused");
        assert!(
            err.location
                .ends_with("grant.yaml: Consent cust-7f3a9c-support-history-grant"),
            "{err}"
        );
        assert!(
            err.problem.contains(
                "`contextos consent grant --subject cust-7f3a9c --purpose support-history --categories email --evidence \"signed form SUP-88\"`"
            ),
            "{err}"
        );
    }

    /// A directory of a GitOps checkout holds other APIs' objects too — another project's
    /// `Policy` or `Consent` among them: they are left to kubectl, not read as ContextOS's; a
    /// ContextOS object whose version or kind is misspelt is refused, naming it.
    #[test]
    fn only_contextos_objects_are_read_and_a_misspelt_one_is_refused() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        for entry in std::fs::read_dir(&quickstart).expect("the quickstart") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                continue;
            }
            std::fs::copy(&path, dir.path().join(path.file_name().expect("a name"))).expect("copied");
        }
        let others = "apiVersion: kyverno.io/v1\nkind: Policy\nmetadata: {name: require-labels}\n\
                      spec: {validationFailureAction: Enforce, rules: []}\n---\n\
                      apiVersion: example.com/v1\nkind: Consent\nmetadata: {name: cookies}\nspec: {}\n---\n\
                      apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n---\n\
                      apiVersion: v1\nkind: List\nitems: []\n---\n\
                      apiVersion: batch/v1\nkind: Job\nmetadata: {generateName: migrate-}\nspec: {}\n";
        std::fs::write(dir.path().join("others.yaml"), others).expect("written");
        let set = ManifestSet::load(&[dir.path().to_owned()]).expect("others are left out");
        assert!(
            set.consent_in_files().is_none(),
            "another API's Consent is not ContextOS's"
        );
        let bundle = set
            .bundle("shop", None)
            .expect("resolves without kyverno's Policy");
        assert_eq!(bundle.policies.len(), 1);

        for (text, field, says) in [
            (
                "apiVersion: contextos.dev/v1beta1\nkind: Policy\nmetadata: {name: p}\nspec: {}\n",
                "apiVersion",
                "\"contextos.dev/v1beta1\" is not served; this release serves contextos.dev/v1alpha1",
            ),
            (
                "apiVersion: ' ContextOS.dev/v1alpha1'\nkind: Policy\nmetadata: {name: p}\nspec: {}\n",
                "apiVersion",
                "\" ContextOS.dev/v1alpha1\" is not served",
            ),
            (
                "apiVersion: v1\nkind: Policy\nmetadata: {name: p}\nspec: {}\n",
                "apiVersion",
                "v1 has no kind Policy",
            ),
            (
                "apiVersion: contextos.dev/v1alpha1\nkind: Polcy\nmetadata: {name: p}\nspec: {}\n",
                "kind",
                "\"Polcy\" is not a ContextOS kind",
            ),
            (
                "kind: Policy\nmetadata: {name: p}\nspec: {}\n",
                "apiVersion",
                "is missing",
            ),
        ] {
            std::fs::write(dir.path().join("typo.yaml"), text).expect("written");
            let err = ManifestSet::load(&[dir.path().to_owned()]).expect_err(text);
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
            assert!(
                err.location.ends_with("typo.yaml: Policy p") || err.location.ends_with("typo.yaml: Polcy p"),
                "{err}"
            );
            assert!(err.problem.contains(says), "{err}");
        }
    }

    /// A few kilobytes of YAML aliases standing for millions of values are refused, naming the
    /// file, before they are built.
    #[test]
    fn a_file_whose_aliases_expand_without_end_is_refused() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let values = vec!["0"; 3_000].join(", ");
        let aliases = vec!["*a"; 3_000].join(", ");
        let file = dir.path().join("bomb.yaml");
        std::fs::write(
            &file,
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\ndata:\n  a: &a [{values}]\n  b: [{aliases}]\n"),
        )
        .expect("written");
        let err = ManifestSet::load(&[file]).expect_err("refused");
        assert!(err.location.ends_with("bomb.yaml"), "{err}");
        assert!(
            err.problem.contains("once its YAML aliases are expanded"),
            "{err}"
        );
    }

    /// A misspelt field would be dropped by the API server, and a local run would silently
    /// go without what it says: refused, naming it.
    #[test]
    fn a_field_the_kind_does_not_have_is_refused_naming_it() {
        let mut set = quickstart();
        for m in &mut set.objects {
            if m.kind == "Policy" {
                m.value["spec"]["rules"][0]["when"] = Value::String("call.tool == 'x'".into());
            }
        }
        let err = set.bundle("shop", None).expect_err("a misspelt condition");
        assert_eq!(err.field.as_deref(), Some("spec.rules[0].when"), "{err}");
        assert!(err.location.contains("Policy oncall-guardrails"), "{err}");
        assert!(
            err.problem
                .contains("is not a field of Policy: spell it as `kubectl explain policy.spec.rules` shows"),
            "{err}"
        );
    }
}
