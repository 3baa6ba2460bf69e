//! The signed RunContext: the one execution vocabulary (run, trace, session, tenant, user
//! delegation, agent identity, safety mode, budget, pinned revisions, allowed tools) that travels
//! with every call, and its verification.
//!
//! The operator (or `contextos run` locally) signs it; the Tool Gateway refuses any call whose
//! context is forged, tampered with, expired, issued for another tenant or agent, or that asks
//! for a tool the context does not list.

use contextos_crds::common::{RunBudget, SafetyMode};
use serde::{Deserialize, Serialize};

use crate::{
    keys::{KeyPair, PublicKey},
    records::{PinnedDigests, canonical::canonical_bytes_of},
};

/// The delegating user.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDelegation {
    pub subject: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// The agent's workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// Agent object name.
    pub name: String,
    /// SPIFFE-style id: `spiffe://contextos.dev/ns/<tenant>/agent/<name>`.
    pub spiffe_id: String,
}

impl AgentIdentity {
    pub fn new(tenant: &str, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            spiffe_id: format!("spiffe://contextos.dev/ns/{tenant}/agent/{name}"),
        }
    }
}

/// Everything a run is allowed to be, fixed when it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunContext {
    pub run_id: String,
    /// W3C trace id (32 hex characters) shared by every span of the run.
    pub trace_id: String,
    pub session_id: String,
    pub tenant_id: String,
    #[serde(default)]
    pub user: Option<UserDelegation>,
    pub agent: AgentIdentity,
    pub safety_mode: SafetyMode,
    pub budget: RunBudget,
    pub pinned: PinnedDigests,
    /// Tool names this run may call.
    pub allowed_tools: Vec<String>,
    pub issued_at_ms: i64,
    pub expires_at_ms: i64,
    /// The runner pod this context was issued to (in a cluster): the gateway serves it only to a
    /// caller whose verified workload identity is that pod in `tenant_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The uid of the Session whose runner pod [`RunContext::pod`] is (in a cluster): the gateway
    /// serves the context only to a pod that Session controls. A Session deleted and made again
    /// under its name is another object, and its pods — named as the earlier one's were — act
    /// for none of the earlier one's runs. Absent in contexts issued before it was carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_uid: Option<String>,
    /// Content hash (hex SHA-256 of its canonical JSON) of the run bundle the issuer pinned: the
    /// gateway governs the run by that bundle and no other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_digest: Option<String>,
    /// The person the run is about (the Session's `spec.subject`), by pseudonymous handle: the
    /// only subject whose memory the run may recall or keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<crate::consent::SubjectHandle>,
    /// Whether the Session's trace is exported, decided once by the issuer's sampler (see
    /// `telemetry::session_sampled`) so that every process serving the run — runner, gateway,
    /// the relay of the runner's spans — agrees; absent in contexts issued before it was
    /// carried: each process then applies its own sampler to the trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_sampled: Option<bool>,
}

/// A RunContext with the signature over its canonical JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRunContext {
    pub context: RunContext,
    pub key_id: String,
    pub signature: String,
}

/// How far the issuer's clock may run ahead of the verifier's: a context (or grant) issued
/// later than now by more than this is refused, not trusted for its whole lifetime.
pub const CLOCK_SKEW_MS: i64 = 60_000;

/// Why a RunContext was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunContextError {
    #[error(
        "RunContext of run {run_id} is signed by key {found}, which this gateway does not trust (expected {expected})"
    )]
    UntrustedKey {
        run_id: String,
        found: String,
        expected: String,
    },
    #[error("RunContext of run {run_id} has an invalid signature: it was forged or altered after signing")]
    BadSignature { run_id: String },
    #[error("RunContext of run {run_id} expired at {expired_at_ms} (now {now_ms}); start a new attempt")]
    Expired {
        run_id: String,
        expired_at_ms: i64,
        now_ms: i64,
    },
    #[error(
        "RunContext of run {run_id} was issued at {issued_at_ms}, later than now ({now_ms}) by more than the {CLOCK_SKEW_MS} ms of clock skew tolerated; check the operator's and this node's clocks"
    )]
    NotYetValid {
        run_id: String,
        issued_at_ms: i64,
        now_ms: i64,
    },
    #[error("RunContext of run {run_id} was issued for tenant {found}, not {expected}")]
    WrongTenant {
        run_id: String,
        expected: String,
        found: String,
    },
    #[error("RunContext of run {run_id} was issued for agent {found}, not {expected}")]
    WrongAgent {
        run_id: String,
        expected: String,
        found: String,
    },
    #[error("tool {tool} is not among the tools RunContext of run {run_id} allows")]
    ToolNotAllowed { run_id: String, tool: String },
}

impl SignedRunContext {
    /// Signs `context` with `key`.
    pub fn sign(context: RunContext, key: &KeyPair) -> Self {
        let signature = key.sign_hex(&signing_bytes(&context));
        Self {
            context,
            key_id: key.key_id(),
            signature,
        }
    }

    /// Checks signature, expiry and tenant; returns the context when all hold.
    pub fn verify(&self, key: &PublicKey, tenant: &str, now_ms: i64) -> Result<&RunContext, RunContextError> {
        self.check_signer(key)?;
        if !key.verify_hex(&signing_bytes(&self.context), &self.signature) {
            return Err(RunContextError::BadSignature {
                run_id: self.context.run_id.clone(),
            });
        }
        self.check_validity(tenant, now_ms)
    }

    /// [`SignedRunContext::verify`] for a context whose signature was verified before (the
    /// caller compared it with that exact context): signer, expiry and tenant only.
    pub fn verify_known(
        &self,
        key: &PublicKey,
        tenant: &str,
        now_ms: i64,
    ) -> Result<&RunContext, RunContextError> {
        self.check_signer(key)?;
        self.check_validity(tenant, now_ms)
    }

    fn check_signer(&self, key: &PublicKey) -> Result<(), RunContextError> {
        if self.key_id != key.key_id() {
            return Err(RunContextError::UntrustedKey {
                run_id: self.context.run_id.clone(),
                found: self.key_id.clone(),
                expected: key.key_id(),
            });
        }
        Ok(())
    }

    fn check_validity(&self, tenant: &str, now_ms: i64) -> Result<&RunContext, RunContextError> {
        let run_id = self.context.run_id.clone();
        if self.context.issued_at_ms > now_ms.saturating_add(CLOCK_SKEW_MS) {
            return Err(RunContextError::NotYetValid {
                run_id,
                issued_at_ms: self.context.issued_at_ms,
                now_ms,
            });
        }
        if now_ms >= self.context.expires_at_ms {
            return Err(RunContextError::Expired {
                run_id,
                expired_at_ms: self.context.expires_at_ms,
                now_ms,
            });
        }
        if self.context.tenant_id != tenant {
            return Err(RunContextError::WrongTenant {
                run_id,
                expected: tenant.into(),
                found: self.context.tenant_id.clone(),
            });
        }
        Ok(&self.context)
    }
}

impl RunContext {
    /// The Session's trace and whether it is exported, if the context names a valid trace id.
    pub fn trace(&self) -> Option<crate::telemetry::SessionTrace> {
        let trace = crate::telemetry::trace_id_of(&self.trace_id)?;
        Some(crate::telemetry::SessionTrace {
            trace,
            tenant: self.tenant_id.clone(),
            session: self.session_id.clone(),
            sampled: self
                .trace_sampled
                .unwrap_or_else(|| crate::telemetry::session_sampled(trace)),
        })
    }

    /// Refuses tools the context does not list.
    pub fn check_tool(&self, tool: &str) -> Result<(), RunContextError> {
        if self.allowed_tools.iter().any(|t| t == tool) {
            Ok(())
        } else {
            Err(RunContextError::ToolNotAllowed {
                run_id: self.run_id.clone(),
                tool: tool.into(),
            })
        }
    }

    /// Refuses a context issued for another agent.
    pub fn check_agent(&self, agent: &str) -> Result<(), RunContextError> {
        if self.agent.name == agent {
            Ok(())
        } else {
            Err(RunContextError::WrongAgent {
                run_id: self.run_id.clone(),
                expected: agent.into(),
                found: self.agent.name.clone(),
            })
        }
    }
}

fn signing_bytes(context: &RunContext) -> Vec<u8> {
    let mut out = b"contextos-run-context/v1\n".to_vec();
    // Plain data: serialization cannot fail.
    out.extend(canonical_bytes_of(context).unwrap_or_default());
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn context(tenant: &str) -> RunContext {
        RunContext {
            run_id: "run-1".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            session_id: "sess-1".into(),
            tenant_id: tenant.into(),
            user: Some(UserDelegation {
                subject: "dana@example.com".into(),
                groups: vec!["sre".into()],
                scopes: vec![],
            }),
            agent: AgentIdentity::new(tenant, "oncall"),
            safety_mode: SafetyMode::Autonomous,
            budget: RunBudget {
                max_steps: 10,
                max_tokens: 1000,
                max_tool_calls: 5,
                max_wall_seconds: 60,
                max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
            },
            pinned: PinnedDigests::default(),
            allowed_tools: vec!["search".into(), "restart".into()],
            issued_at_ms: 1_000,
            expires_at_ms: 61_000,
            pod: None,
            session_uid: None,
            bundle_digest: None,
            subject: None,
            trace_sampled: None,
        }
    }

    #[test]
    fn a_signed_context_verifies_for_its_tenant_until_it_expires() {
        let key = KeyPair::from_seed([5; 32]);
        let signed = SignedRunContext::sign(context("shop"), &key);
        assert!(signed.verify(&key.public(), "shop", 2_000).is_ok());
        assert!(matches!(
            signed.verify(&key.public(), "shop", 61_000),
            Err(RunContextError::Expired { .. })
        ));
        assert!(matches!(
            signed.verify(&key.public(), "bank", 2_000),
            Err(RunContextError::WrongTenant { .. })
        ));
        // Issued (by the issuer's clock) more than the tolerated skew after now.
        assert!(
            signed
                .verify(&key.public(), "shop", 1_000 - CLOCK_SKEW_MS)
                .is_ok()
        );
        assert!(matches!(
            signed.verify(&key.public(), "shop", 999 - CLOCK_SKEW_MS),
            Err(RunContextError::NotYetValid { .. })
        ));
    }

    #[test]
    fn tampered_forged_and_foreign_contexts_are_refused() {
        let key = KeyPair::from_seed([5; 32]);
        let mut tampered = SignedRunContext::sign(context("shop"), &key);
        tampered.context.allowed_tools.push("delete_namespace".into());
        assert!(matches!(
            tampered.verify(&key.public(), "shop", 2_000),
            Err(RunContextError::BadSignature { .. })
        ));

        let attacker = KeyPair::from_seed([6; 32]);
        let mut forged = SignedRunContext::sign(context("shop"), &attacker);
        assert!(matches!(
            forged.verify(&key.public(), "shop", 2_000),
            Err(RunContextError::UntrustedKey { .. })
        ));
        forged.key_id = key.key_id();
        assert!(matches!(
            forged.verify(&key.public(), "shop", 2_000),
            Err(RunContextError::BadSignature { .. })
        ));
    }

    #[test]
    fn only_listed_tools_and_the_issued_agent_pass() {
        let ctx = context("shop");
        assert!(ctx.check_tool("search").is_ok());
        assert!(matches!(
            ctx.check_tool("delete_namespace"),
            Err(RunContextError::ToolNotAllowed { .. })
        ));
        assert!(ctx.check_agent("oncall").is_ok());
        assert!(ctx.check_agent("other").is_err());
    }
}

/// A Session override that would loosen the Agent's limits.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{field} ({requested}) would loosen the Agent's {limit} ({allowed}); a Session may only tighten it: use a value at most as permissive, or remove the override"
)]
pub struct OverrideError {
    /// Path of the offending Session field, e.g. `spec.overrides.budget.maxSteps`.
    pub field: &'static str,
    pub limit: &'static str,
    pub requested: String,
    pub allowed: String,
}

/// The budget and safety mode a Session runs under: the Agent's, tightened by the Session's
/// overrides. Pure; the operator uses it to report `Ready=False` (OverrideLoosens) and the
/// runner to issue the RunContext.
pub fn effective_limits(
    agent_budget: &RunBudget,
    agent_safety: SafetyMode,
    overrides: Option<&contextos_crds::session::SessionOverrides>,
) -> Result<(RunBudget, SafetyMode), OverrideError> {
    let mut budget = agent_budget.clone();
    let mut safety = agent_safety;
    let Some(overrides) = overrides else {
        return Ok((budget, safety));
    };
    if let Some(b) = &overrides.budget {
        tighten(
            &mut budget.max_steps,
            b.max_steps,
            "spec.overrides.budget.maxSteps",
            "maxSteps",
        )?;
        tighten(
            &mut budget.max_tokens,
            b.max_tokens,
            "spec.overrides.budget.maxTokens",
            "maxTokens",
        )?;
        tighten(
            &mut budget.max_tool_calls,
            b.max_tool_calls,
            "spec.overrides.budget.maxToolCalls",
            "maxToolCalls",
        )?;
        tighten(
            &mut budget.max_wall_seconds,
            b.max_wall_seconds,
            "spec.overrides.budget.maxWallSeconds",
            "maxWallSeconds",
        )?;
    }
    if let Some(requested) = overrides.safety_mode {
        // Modes are ordered strictest first.
        if requested > agent_safety {
            return Err(OverrideError {
                field: "spec.overrides.safetyMode",
                limit: "safetyMode",
                requested: requested.as_str().into(),
                allowed: agent_safety.as_str().into(),
            });
        }
        safety = requested;
    }
    Ok((budget, safety))
}

fn tighten<T: PartialOrd + Copy + std::fmt::Display>(
    current: &mut T,
    requested: Option<T>,
    field: &'static str,
    limit: &'static str,
) -> Result<(), OverrideError> {
    match requested {
        Some(value) if value > *current => Err(OverrideError {
            field,
            limit,
            requested: value.to_string(),
            allowed: current.to_string(),
        }),
        Some(value) => {
            *current = value;
            Ok(())
        }
        None => Ok(()),
    }
}

/// A random id of `bytes` random bytes, as hex (run ids, W3C trace ids).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source does not fail on supported platforms; a zeroed id would still be
    // unique enough to surface in tests rather than silently collide in production.
    let _ = getrandom::fill(&mut buf);
    hex::encode(buf)
}

#[cfg(test)]
mod override_tests {
    use contextos_crds::{common::BudgetOverride, session::SessionOverrides};

    use super::*;

    fn agent_budget() -> RunBudget {
        RunBudget {
            max_steps: 12,
            max_tokens: 60_000,
            max_tool_calls: 10,
            max_wall_seconds: 900,
            max_tool_calls_per_turn: contextos_crds::common::DEFAULT_MAX_TOOL_CALLS_PER_TURN,
        }
    }

    #[test]
    fn overrides_may_tighten() {
        let overrides = SessionOverrides {
            budget: Some(BudgetOverride {
                max_steps: Some(5),
                ..Default::default()
            }),
            safety_mode: Some(SafetyMode::ReadOnly),
        };
        let (budget, safety) =
            effective_limits(&agent_budget(), SafetyMode::Supervised, Some(&overrides)).expect("tighter");
        assert_eq!(
            (budget.max_steps, budget.max_tokens, safety),
            (5, 60_000, SafetyMode::ReadOnly)
        );
        assert_eq!(
            effective_limits(&agent_budget(), SafetyMode::Supervised, None)
                .expect("none")
                .0,
            agent_budget()
        );
    }

    #[test]
    fn loosening_is_refused_naming_the_field() {
        let overrides = SessionOverrides {
            budget: Some(BudgetOverride {
                max_tool_calls: Some(50),
                ..Default::default()
            }),
            safety_mode: None,
        };
        let err =
            effective_limits(&agent_budget(), SafetyMode::Supervised, Some(&overrides)).expect_err("looser");
        assert_eq!(err.field, "spec.overrides.budget.maxToolCalls");
        assert!(
            err.to_string().starts_with(
                "spec.overrides.budget.maxToolCalls (50) would loosen the Agent's maxToolCalls (10)"
            ),
            "{err}"
        );
        let overrides = SessionOverrides {
            budget: None,
            safety_mode: Some(SafetyMode::Autonomous),
        };
        let err =
            effective_limits(&agent_budget(), SafetyMode::Supervised, Some(&overrides)).expect_err("looser");
        assert_eq!(err.field, "spec.overrides.safetyMode");
    }

    #[test]
    fn random_ids_have_the_requested_size() {
        assert_eq!(random_hex(16).len(), 32);
        assert_ne!(random_hex(16), random_hex(16));
    }
}
