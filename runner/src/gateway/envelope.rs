//! The one envelope every tool call travels in, and the hash approvals bind to.

use contextos_crds::{
    common::{ToolKind, ToolRisk},
    session::ApprovalDecision,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::{
    records::canonical::canonical_bytes_of,
    run_context::{AgentIdentity, SignedRunContext, UserDelegation},
};

/// A tool call as the runner hands it to the gateway.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallEnvelope {
    /// Unique per call within the run (stable across resubmissions of the same call).
    pub call_id: String,
    pub tool: String,
    pub arguments: Value,
    /// What the caller believes the tool's risk and kind are; must equal the catalog's.
    pub risk: ToolRisk,
    pub kind: ToolKind,
    /// Sent to the tool server; a resubmitted call keeps its key, so it runs once.
    pub idempotency_key: String,
    /// W3C `traceparent` of the calling span.
    pub traceparent: String,
    pub run_context: SignedRunContext,
    /// A human decision on this exact call, when it needed approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalGrant>,
    /// A human's finding on this call, when its outcome was unknown (started before an
    /// interruption, never answered); the gateway records it as the call's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<contextos_crds::session::Resolution>,
}

/// A decision from `Session.spec.approvals`, bound to a call hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalGrant {
    pub call_hash: String,
    pub decision: ApprovalDecision,
    pub approver: String,
    #[serde(default)]
    pub reason: Option<String>,
}

impl CallEnvelope {
    /// The user and agent the call acts for.
    pub fn principals(&self) -> (Option<&UserDelegation>, &AgentIdentity) {
        (
            self.run_context.context.user.as_ref(),
            &self.run_context.context.agent,
        )
    }

    /// SHA-256 (hex) over the exact call — run, tool, arguments, idempotency key — and the
    /// digests of the policies deciding it. An approval for one call can never apply to another,
    /// nor to the same call under a different policy revision.
    pub fn call_hash(&self, policy_digests: &[String]) -> String {
        #[derive(Serialize)]
        struct Bound<'a> {
            run_id: &'a str,
            tool: &'a str,
            arguments: &'a Value,
            idempotency_key: &'a str,
            policies: &'a [String],
        }
        let bound = Bound {
            run_id: &self.run_context.context.run_id,
            tool: &self.tool,
            arguments: &self.arguments,
            idempotency_key: &self.idempotency_key,
            policies: policy_digests,
        };
        hex::encode(Sha256::digest(canonical_bytes_of(&bound).unwrap_or_default()))
    }
}

/// A `traceparent` for a child span of `trace_id`, with a span id derived from `call_id`
/// (deterministic, so a replayed call carries the same trace context).
pub fn traceparent(trace_id: &str, run_id: &str, call_id: &str) -> String {
    // The run's id too: Sessions may share a trace (one caller's), and their calls' ids repeat.
    let mut hash = Sha256::new();
    hash.update(run_id.as_bytes());
    hash.update([0]);
    hash.update(call_id.as_bytes());
    let span = hex::encode(&hash.finalize()[..8]);
    format!("00-{trace_id}-{span}-01")
}
