//! What each model turn is offered, for an Agent with `spec.discovery`: live, the tools scored
//! against the turn's intent and selected under the Agent's limits (recorded as
//! `tools_offered` before the turn is asked for); in a replay, what the original turn was
//! offered, read from its record.

use std::{
    collections::BTreeSet,
    sync::{Arc, OnceLock},
};

use contextos_crds::agent::{DiscoveryResolver, ToolDiscovery};
use sha2::{Digest as _, Sha256};

use crate::{
    discovery::{
        self, Discoverable, IndexCache, Scoring, ToolIndex,
        embedding::Embedder,
        select::{Limits, Selection, select},
    },
    model::{Message, Role, ToolSpec},
};

/// Tool indexes of every run in this process, by tool catalog: a catalog is embedded once per
/// bundle, not once per run.
fn cache() -> &'static IndexCache {
    static CACHE: OnceLock<IndexCache> = OnceLock::new();
    CACHE.get_or_init(IndexCache::default)
}

/// A run's tools, ready to be chosen from turn after turn.
#[derive(Debug)]
pub(super) struct Offering {
    limits: Limits,
    wants_embeddings: bool,
    always: BTreeSet<String>,
    denied: BTreeSet<String>,
    index: Arc<ToolIndex>,
    embedder: Option<Embedder>,
}

impl Offering {
    /// Indexes `tools` (or finds them indexed) for `spec`; `denied` are never offered.
    pub(super) async fn prepare(
        spec: &ToolDiscovery,
        tools: &[Discoverable],
        denied: BTreeSet<String>,
        embedder: Option<&Embedder>,
    ) -> Self {
        let wants_embeddings = spec.resolver == DiscoveryResolver::Embeddings;
        let embedder = embedder.filter(|_| wants_embeddings).cloned();
        let (index, problem) = cache()
            .get(&catalog_digest(tools), tools, embedder.as_ref())
            .await;
        if let Some(error) = problem {
            tracing::warn!(%error, "tool discovery: the tools could not be embedded; scoring by BM25");
        }
        Self {
            limits: Limits {
                top_k: spec.top_k,
                schema_tokens: spec.tool_schema_tokens,
            },
            wants_embeddings,
            always: spec.always_offer.iter().cloned().collect(),
            denied,
            index,
            embedder,
        }
    }

    /// Scores the tools for `intent` and chooses this turn's.
    pub(super) async fn choose(&self, intent: &str) -> (Scoring, Selection) {
        let (scoring, scores) =
            discovery::score(&self.index, self.embedder.as_ref(), self.wants_embeddings, intent).await;
        let selection = select(
            &self.index.candidates(&scores),
            &self.always,
            &self.denied,
            self.limits,
        );
        (scoring, selection)
    }
}

/// Identifies a tool catalog: the digest of the tools as the model sees them, and their
/// examples.
fn catalog_digest(tools: &[Discoverable]) -> String {
    let mut hash = Sha256::new();
    for tool in tools {
        hash.update(serde_json::to_vec(&(&tool.spec, &tool.examples)).unwrap_or_default());
    }
    format!("sha256:{}", hex::encode(hash.finalize()))
}

/// The Agent's tools as discovery reads them: `specs` (as the model sees them, in the Agent's
/// order) with the examples the Agent gives.
pub(super) fn discoverable(specs: &[ToolSpec], tools: &[contextos_crds::agent::Tool]) -> Vec<Discoverable> {
    specs
        .iter()
        .map(|spec| Discoverable {
            spec: spec.clone(),
            examples: tools
                .iter()
                .find(|t| t.name == spec.name)
                .map(|t| t.examples.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// The tools of `all` that `selection` offers, in its order.
pub(super) fn offered_tools(all: &[ToolSpec], selection: &Selection) -> Vec<ToolSpec> {
    selection
        .offered
        .iter()
        .filter_map(|offer| all.iter().find(|t| t.name == offer.tool).cloned())
        .collect()
}

/// The intent of the next turn: the request, the model's last words, and the tools it called
/// last with the start of what they returned.
pub(super) fn intent_of(request: &str, messages: &[Message]) -> String {
    let last = messages.iter().rposition(|m| m.role == Role::Assistant);
    let Some(last) = last else {
        return discovery::intent(request, None, &[]);
    };
    let plan = &messages[last];
    let results: Vec<(&str, &str)> = messages[last + 1..]
        .iter()
        .filter(|m| m.role == Role::Tool)
        .filter_map(|m| {
            let id = m.tool_call_id.as_deref()?;
            let call = plan.tool_calls.iter().find(|c| c.id == id)?;
            Some((call.tool.as_str(), m.content.as_str()))
        })
        .collect();
    discovery::intent(request, Some(&plan.content), &results)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::ToolCallRequest;

    fn tool(name: &str, description: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: description.into(),
            parameters: json!({"type": "object"}),
        }
    }

    #[test]
    fn the_intent_follows_the_last_turn_and_its_results() {
        let mut plan = Message::new(Role::Assistant, "I will read the logs.");
        plan.tool_calls = vec![ToolCallRequest {
            id: "1.0".into(),
            tool: "get-pod-logs".into(),
            arguments: json!({}),
        }];
        let mut result = Message::new(Role::Tool, "OOMKilled at 14:05");
        result.tool_call_id = Some("1.0".into());
        let messages = vec![Message::new(Role::User, "earlier"), plan, result];
        let intent = intent_of("checkout 5xx", &messages);
        assert_eq!(
            intent,
            "checkout 5xx\nI will read the logs.\nget pod logs: OOMKilled at 14:05"
        );
        assert_eq!(intent_of("checkout 5xx", &[]), "checkout 5xx");
    }

    #[tokio::test]
    async fn a_turn_is_offered_the_relevant_allowed_tools_in_the_selection_order() {
        let tools = vec![
            tool("get-pod-logs", "Read the logs of a pod."),
            tool("list-invoices", "List a customer's invoices."),
            tool("delete-namespace", "Delete a namespace and the logs of its pods."),
            tool("escalate", "Hand the incident to a person."),
        ];
        let spec: ToolDiscovery =
            serde_json::from_value(json!({"topK": 1, "alwaysOffer": ["escalate"], "resolver": "bm25"}))
                .expect("spec");
        let denied = BTreeSet::from(["delete-namespace".to_owned()]);
        let discoverable: Vec<Discoverable> = tools
            .iter()
            .map(|spec| Discoverable {
                spec: spec.clone(),
                examples: Vec::new(),
            })
            .collect();
        let offering = Offering::prepare(&spec, &discoverable, denied, None).await;
        let (scoring, selection) = offering.choose("read the pod logs of checkout").await;
        assert_eq!(scoring, Scoring::Bm25 { fallback: None });
        let names: Vec<String> = offered_tools(&tools, &selection)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["escalate", "get-pod-logs"]);
        assert_eq!(selection.denied, ["delete-namespace"]);
    }
}
