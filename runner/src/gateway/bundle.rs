//! A gateway bundle: everything needed to govern one agent's calls — its tools, its policies in
//! order, and the secret values its adapters use — loaded from one YAML or JSON document.

use std::collections::BTreeMap;

use contextos_crds::{AgentSpec, OntologySpec, PolicySpec, common::KeyRef};
use serde::{Deserialize, Serialize};

use super::{CatalogTool, ToolGateway};
use crate::{
    keys::PublicKey,
    memory::desk::MemoryDesk,
    ontology::Ontology,
    policy::{PolicySet, compile_policy},
};

/// One agent's gateway configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayBundle {
    pub tenant: String,
    pub agent: String,
    pub spec: AgentSpec,
    /// The agent's policies, in `policyRefs` order (the promoted revisions).
    pub policies: Vec<NamedPolicy>,
    /// Secret values by `<secret name>/<key>`, for bearer tokens and webhook signing keys.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// The tenant's entity types (its Ontology), as the run pinned them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ontology: Option<OntologySpec>,
    /// The per-call prices of its paid tools, as the run pinned them, by tool name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tool_prices: BTreeMap<String, crate::pricing::PinnedToolPrice>,
    /// Digest of the ContextPack revision the run pinned (part of what cached results are
    /// kept under, see [`GatewayBundle::revisions_digest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_pack_digest: Option<String>,
    /// The run acts for a caller from outside the namespace (an A2A task): what it would keep
    /// in the Agent's or the tenant's memory, which other callers' runs recall, waits for a
    /// person's review.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outside_caller: bool,
}

/// A policy spec and the name its rules are reported under.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedPolicy {
    pub name: String,
    pub spec: PolicySpec,
}

impl GatewayBundle {
    /// Digest of the promoted revisions calls are governed by — the Agent with its skills'
    /// tools, its Policies, the ContextPack, the Ontology and prices — and of the credentials
    /// tools are reached with: a cached result is reused only under the same digest, so a
    /// promotion or a rotated secret starts afresh. (The digest is a cache key, never shown.)
    pub fn revisions_digest(&self) -> String {
        #[derive(Serialize)]
        struct Revisions<'a> {
            tenant: &'a str,
            agent: &'a str,
            spec: &'a AgentSpec,
            policies: &'a [NamedPolicy],
            ontology: &'a Option<OntologySpec>,
            tool_prices: &'a BTreeMap<String, crate::pricing::PinnedToolPrice>,
            context_pack: &'a Option<String>,
            secrets: &'a BTreeMap<String, String>,
        }
        crate::run::bundle::spec_digest(&Revisions {
            tenant: &self.tenant,
            agent: &self.agent,
            spec: &self.spec,
            policies: &self.policies,
            ontology: &self.ontology,
            tool_prices: &self.tool_prices,
            context_pack: &self.context_pack_digest,
            secrets: &self.secrets,
        })
    }

    /// Builds the gateway, reporting the first policy or tool that cannot be compiled.
    pub fn build(&self, trusted_key: PublicKey) -> Result<ToolGateway, String> {
        self.assemble(trusted_key, true)
    }

    /// Builds an offline gateway for replays: nothing is sent to a tool, so adapters need no
    /// secrets (and a replay never sees them).
    pub fn build_offline(&self, trusted_key: PublicKey) -> Result<ToolGateway, String> {
        Ok(self.assemble(trusted_key, false)?.offline())
    }

    fn assemble(&self, trusted_key: PublicKey, with_secrets: bool) -> Result<ToolGateway, String> {
        let policies = self
            .policies
            .iter()
            .map(|p| compile_policy(&p.name, &p.spec).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tools = Vec::with_capacity(self.spec.tools.len());
        for spec in &self.spec.tools {
            let mut tool = CatalogTool::new(spec.clone())?;
            tool.price = self.tool_prices.get(&spec.name).cloned();
            if !with_secrets {
                tools.push(tool);
                continue;
            }
            let adapter = &spec.adapter;
            if let Some((secret, _)) = adapter.bearer_secret() {
                tool.bearer_token = Some(self.secret(&spec.name, secret)?);
            }
            if let Some(hook) = &adapter.webhook {
                tool.hmac_key = Some(self.secret(&spec.name, &hook.secret_ref)?.into_bytes());
            }
            tools.push(tool);
        }
        // Consent heads are signed with the key that issues runs here (a local run's own key);
        // the gateway service says whose they are with `with_consent_key`.
        let ontology = std::sync::Arc::new(match &self.ontology {
            Some(spec) => Ontology::compile(spec).map_err(|e| format!("Ontology default: {e}"))?,
            None => Ontology::default(),
        });
        let memory = MemoryDesk::new(&self.agent, self.spec.memory.as_ref(), trusted_key)?
            .with_ontology(ontology.clone())
            .for_outside_caller(self.outside_caller);
        Ok(ToolGateway::new(
            &self.tenant,
            &self.agent,
            trusted_key,
            tools,
            PolicySet { policies },
            self.spec.approvers.clone().unwrap_or_default(),
        )
        .with_memory(memory)
        .with_ontology(ontology)
        .with_revisions(self.revisions_digest()))
    }

    fn secret(&self, tool: &str, key: &KeyRef) -> Result<String, String> {
        let id = format!("{}/{}", key.name, key.key);
        self.secrets.get(&id).cloned().ok_or_else(|| {
            format!("tool {tool} needs secret {id}, which the bundle does not provide (add it under secrets)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> GatewayBundle {
        let agent =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/agent.yaml");
        let text = std::fs::read_to_string(agent).expect("the quickstart agent");
        let agent: contextos_crds::Agent = serde_yaml::from_str(&text).expect("parses");
        let mut spec = agent.spec;
        spec.tools = vec![
            serde_json::from_value(serde_json::json!({
                "name": "status", "risk": "read_only", "kind": "observe", "cache": {"ttlSeconds": 60},
                "adapter": {"http": {"url": "http://tools.example/status"}},
            }))
            .expect("tool"),
        ];
        GatewayBundle {
            tenant: "shop".into(),
            agent: "oncall".into(),
            spec,
            policies: Vec::new(),
            secrets: BTreeMap::new(),
            ontology: None,
            tool_prices: BTreeMap::new(),
            context_pack_digest: Some("sha256:pack-1".into()),
            outside_caller: false,
        }
    }

    #[test]
    fn any_promoted_revision_or_rotated_secret_changes_what_cached_results_are_kept_under() {
        let base = bundle();
        let digest = base.revisions_digest();
        let mut secret = bundle();
        secret.secrets.insert("tokens/status".into(), "s3cret".into());
        let mut pack = bundle();
        pack.context_pack_digest = Some("sha256:pack-2".into());
        let mut tool = bundle();
        tool.spec.tools[0].description = "Live status.".into();
        let mut policy = bundle();
        policy.policies.push(NamedPolicy {
            name: "guard".into(),
            spec: serde_json::from_value(serde_json::json!({"rules": []})).expect("policy"),
        });
        let mut tenant = bundle();
        tenant.tenant = "other".into();
        for changed in [secret, pack, tool, policy, tenant] {
            assert_ne!(changed.revisions_digest(), digest);
        }
    }
}
