//! The specs a proposal is drafted against — the Agents, Policies and ContextPacks of the
//! tenant — read from files (a GitOps checkout) or from the live cluster.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context as _;
use contextos_crds::{Agent, AgentSpec, ContextPack, ContextPackSpec, Policy, PolicySpec};
use contextos_runner::{manifests::ManifestSet, proposals::World, records::TenantId};
use kube::{Api, api::ListParams};
use serde::de::DeserializeOwned;

/// The specs proposals are drafted against, by name.
#[derive(Default)]
pub struct Specs {
    pub agents: BTreeMap<String, AgentSpec>,
    pub policies: BTreeMap<String, PolicySpec>,
    pub packs: BTreeMap<String, ContextPackSpec>,
    /// The tools of each Skill, by skill name (an Agent's calls name its skills' tools too).
    pub skill_tools: BTreeMap<String, Vec<String>>,
}

impl Specs {
    /// From `paths`, or from the cluster of the current kubeconfig (the tenant's namespace)
    /// when none are named.
    pub async fn read(paths: &[PathBuf], tenant: &TenantId) -> anyhow::Result<Self> {
        if paths.is_empty() {
            Self::from_cluster(tenant.as_str()).await
        } else {
            Self::from_files(paths)
        }
    }

    fn from_files(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let set = ManifestSet::load(paths)?;
        let mut specs = Self::default();
        for object in &set.objects {
            let spec = || object.value.get("spec").cloned().unwrap_or_default();
            let at = || format!("{}: {} {}", object.file.display(), object.kind, object.name);
            match object.kind.as_str() {
                "Agent" => {
                    specs.agents.insert(
                        object.name.clone(),
                        serde_json::from_value(spec()).with_context(at)?,
                    );
                }
                "Policy" => {
                    specs.policies.insert(
                        object.name.clone(),
                        serde_json::from_value(spec()).with_context(at)?,
                    );
                }
                "ContextPack" => {
                    specs.packs.insert(
                        object.name.clone(),
                        serde_json::from_value(spec()).with_context(at)?,
                    );
                }
                "Skill" => {
                    let skill: contextos_crds::SkillSpec = serde_json::from_value(spec()).with_context(at)?;
                    specs.skill_tools.insert(
                        object.name.clone(),
                        skill.tools.into_iter().map(|t| t.name).collect(),
                    );
                }
                _ => {}
            }
        }
        Ok(specs)
    }

    async fn from_cluster(namespace: &str) -> anyhow::Result<Self> {
        let client = kube::Client::try_default()
            .await
            .context("cannot reach the cluster of the current kubeconfig (KUBECONFIG, ~/.kube/config); or name the manifest files")?;
        async fn specs<K, T>(
            client: &kube::Client,
            namespace: &str,
            spec: fn(K) -> T,
        ) -> anyhow::Result<BTreeMap<String, T>>
        where
            K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
                + Clone
                + DeserializeOwned
                + std::fmt::Debug,
        {
            let kind = K::kind(&()).into_owned();
            Ok(Api::<K>::namespaced(client.clone(), namespace)
                .list(&ListParams::default())
                .await
                .with_context(|| format!("cannot list {kind} objects in namespace {namespace}"))?
                .items
                .into_iter()
                .map(|o| (o.meta().name.clone().unwrap_or_default(), spec(o)))
                .collect())
        }
        Ok(Self {
            agents: specs(&client, namespace, |a: Agent| a.spec).await?,
            policies: specs(&client, namespace, |p: Policy| p.spec).await?,
            packs: specs(&client, namespace, |p: ContextPack| p.spec).await?,
            skill_tools: specs(&client, namespace, |s: contextos_crds::Skill| {
                s.spec.tools.into_iter().map(|t| t.name).collect()
            })
            .await?,
        })
    }

    /// What `agent` runs with, or why it cannot be said.
    pub fn world<'a>(&'a self, agent: &'a str) -> Result<World<'a>, String> {
        let spec = self
            .agents
            .get(agent)
            .ok_or_else(|| format!("Agent {agent} is not among the objects read"))?;
        let pack_name = &spec.context_pack_ref.name;
        let pack = self.packs.get(pack_name).ok_or_else(|| {
            format!("ContextPack {pack_name} of Agent {agent} is not among the objects read")
        })?;
        let policies = spec
            .policy_refs
            .iter()
            .map(|r| {
                self.policies
                    .get(&r.name)
                    .map(|p| (r.name.as_str(), p))
                    .ok_or_else(|| {
                        format!("Policy {} of Agent {agent} is not among the objects read", r.name)
                    })
            })
            .collect::<Result<_, _>>()?;
        let skill_tools = spec
            .skill_refs
            .iter()
            .filter_map(|r| self.skill_tools.get(&r.name))
            .flatten()
            .map(String::as_str)
            .collect();
        Ok(World {
            agent,
            agent_spec: spec,
            pack: (pack_name, pack),
            policies,
            skill_tools,
        })
    }
}
