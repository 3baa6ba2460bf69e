//! ContextOS API types for the `contextos.dev/v1alpha1` group.
//!
//! This crate holds data only: the twelve custom resources (one module per kind), the shared value
//! types they are built from, and the names of conditions, reasons and finalizers. It performs no
//! IO. `operator/` and `runner/` depend on it; it depends on neither.
//!
//! `kube` and `k8s_openapi` are re-exported from here so that every crate in the workspace uses
//! exactly one version and one Kubernetes API feature.

// `#[kube(printcolumn(...), printcolumn(...))]` repeats `type_ = "string"` by design; clippy's
// duplicated_attributes lint mistakes the repetition for a copy-paste error.
#![allow(clippy::duplicated_attributes)]

pub use k8s_openapi;
pub use kube;

pub mod agent;
pub mod common;
pub mod conditions;
pub mod consent;
pub mod context_pack;
pub mod feedback;
pub mod free_form;
pub mod model_routing;
pub mod ontology;
pub mod policy;
pub mod price_list;
pub mod proposal;
pub mod sandbox_profile;
pub mod session;
pub mod skill;
pub mod spend_quota;

pub use agent::{Agent, AgentSpec, AgentStatus};
pub use consent::{Consent, ConsentSpec, ConsentStatus};
pub use context_pack::{ContextPack, ContextPackSpec, ContextPackStatus};
pub use feedback::{Feedback, FeedbackSpec, FeedbackStatus};
pub use ontology::{Ontology, OntologySpec, OntologyStatus};
pub use policy::{Policy, PolicySpec, PolicyStatus};
pub use price_list::{PriceList, PriceListSpec};
pub use proposal::{Proposal, ProposalSpec, ProposalStatus};
pub use sandbox_profile::{SandboxProfile, SandboxProfileSpec, SandboxProfileStatus};
pub use session::{Session, SessionSpec, SessionStatus};
pub use skill::{Skill, SkillSpec, SkillStatus};
pub use spend_quota::{SpendQuota, SpendQuotaSpec, SpendQuotaStatus};

/// API group of every ContextOS resource.
pub const GROUP: &str = "contextos.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `kubectl get contextos` lists every ContextOS object in a namespace.
pub const CATEGORY: &str = "contextos";
/// The field manager used for every server-side apply the project makes.
pub const FIELD_MANAGER: &str = "contextos.dev/operator";

/// Labels the operator puts on what it creates.
pub mod labels {
    /// The Session a runner pod, bundle or NetworkPolicy belongs to.
    pub const SESSION: &str = "contextos.dev/session";
    /// The runner attempt number of a pod.
    pub const ATTEMPT: &str = "contextos.dev/attempt";
    /// `runner` on runner pods (NetworkPolicies select on it).
    pub const ROLE: &str = "contextos.dev/role";
    /// The kind and name a ControllerRevision snapshots, e.g. `policy.oncall-guardrails`.
    pub const REVISION_OF: &str = "contextos.dev/revision-of";
}

/// Annotations the operator puts on what it creates, and those approvers set on the objects it
/// promotes.
pub mod annotations {
    /// On a runner pod started because a decision was added to `spec.approvals` (the call hash)
    /// or `spec.resolutions` (`resolution/<call id>`): what it was started for (an attempt that
    /// ends waiting for the same decision again is not retried).
    pub const RESUMED_FOR: &str = "contextos.dev/resumed-for";
    /// On a child the operator made from content it must be able to trust later (a Session's
    /// run bundle): the operator's signature over the owner's uid and that content.
    pub const SEAL: &str = "contextos.dev/seal";
    /// Set by an approver to a candidate's digest to promote it without a replay (no recorded
    /// history yet); the promotion is announced with a Warning Event.
    pub const PROMOTE_WITHOUT_REPLAY: &str = "contextos.dev/promote-without-replay";
    /// Set by an approver to a candidate's digest to promote it after its replay passed
    /// (promotion mode `manual`).
    pub const APPROVE_PROMOTION: &str = "contextos.dev/approve-promotion";
}

/// Every CustomResourceDefinition of the API, in a stable order (used by `crdgen` and tests).
pub fn all_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![
        Agent::crd(),
        Consent::crd(),
        ContextPack::crd(),
        Feedback::crd(),
        Ontology::crd(),
        Policy::crd(),
        PriceList::crd(),
        Proposal::crd(),
        SandboxProfile::crd(),
        Session::crd(),
        Skill::crd(),
        SpendQuota::crd(),
    ]
    .into_iter()
    .map(tidy)
    .collect()
}

/// What the API server expects of a schema that the derive does not give: no integer formats
/// it does not know (it warns about `uint32` & co. on every apply; the `minimum: 0` the derive
/// writes already keeps values unsigned), and descriptions as flowing text (`///` comments are
/// wrapped in the source; `kubectl explain` would print each source line break).
fn tidy(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if map.get("format").and_then(|f| f.as_str()).is_some_and(|f| {
                    matches!(
                        f,
                        "uint" | "uint8" | "uint16" | "uint32" | "uint64" | "int8" | "int16"
                    )
                }) {
                    map.remove("format");
                }
                if let Some(serde_json::Value::String(text)) = map.get_mut("description") {
                    *text = flowing(text);
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    walk(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

/// Joins wrapped lines into one; blank lines stay paragraph breaks.
fn flowing(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| paragraph.split('\n').map(str::trim).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The kustomization crdgen writes beside the CRD files, listing them in a stable order.
pub fn crds_kustomization() -> String {
    let mut out = String::from(
        "# Generated by crdgen (`make crds`); never edit by hand.\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n",
    );
    for crd in all_crds() {
        out.push_str(&format!("  - {}\n", crd_file_name(&crd)));
    }
    out
}

/// File name of a CRD in `manifests/crds/`: `<plural>.<group>.yaml`.
pub fn crd_file_name(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// The YAML committed for a CRD, with a header saying it is generated. Keys are written in
/// sorted order so the output does not depend on whether another crate in the build enabled
/// serde_json's `preserve_order` feature.
pub fn crd_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, serde_yaml::Error> {
    let json = serde_json::to_value(crd).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    Ok(format!(
        "# Generated by `cargo run -p contextos-crds --bin crdgen` from crds/src. Do not edit.\n{}",
        serde_yaml::to_string(&sorted_yaml(json))?
    ))
}

fn sorted_yaml(value: serde_json::Value) -> serde_yaml::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_yaml::Value::Mapping(
                entries
                    .into_iter()
                    .map(|(k, v)| (serde_yaml::Value::String(k), sorted_yaml(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_yaml::Value::Sequence(items.into_iter().map(sorted_yaml).collect())
        }
        other => serde_yaml::to_value(other).unwrap_or(serde_yaml::Value::Null),
    }
}
