//! The Consent kind: one decision of a person (by pseudonymous handle) about their personal data
//! being kept for a purpose, applied as YAML (GitOps, `kubectl`). Its spec never changes — a
//! revocation is a new Consent — and the gateway appends each to the subject's chained consent
//! history in the record store, which is what memory decisions read.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// One consent decision.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "Consent",
    doc = "A person's consent to (or revocation of) categories of their personal data being kept for a purpose. Immutable: revoke with a new Consent. The gateway chains it into the subject's tamper-evident consent history.",
    namespaced,
    cel,
    status = "ConsentStatus",
    shortname = "cnst",
    category = "contextos",
    printcolumn(name = "Subject", type_ = "string", json_path = ".spec.subject"),
    printcolumn(name = "Purpose", type_ = "string", json_path = ".spec.purpose"),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Recorded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Recorded\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self == oldSelf").message("a Consent cannot change: it is a record of what the person decided then; apply a new Consent (action: revoke to withdraw it)").reason(Reason::FieldValueForbidden),
    validation = Rule::new("self.action == 'revoke' || (has(self.categories) && size(self.categories) > 0)").message("a grant names the categories it covers (spec.categories)"),
    validation = Rule::new("self.action == 'revoke' || (has(self.evidence) && size(self.evidence.trim()) > 0)").message("a grant names its evidence: where the person's decision is kept (spec.evidence: a ticket, a signed form)"),
    validation = Rule::new("self.action == 'grant' || !has(self.expiresAt)").message("a revocation does not expire: remove spec.expiresAt"),
    validation = Rule::new(r"!has(self.evidence) || !self.evidence.matches('[\x00-\x1f\x7f]')").message("spec.evidence holds a control character (a line break?): write it on one line"),
    validation = Rule::new(r"!self.recordedBy.matches('[\x00-\x1f\x7f]')").message("spec.recordedBy holds a control character")
)]
pub struct ConsentSpec {
    /// The person, by pseudonymous handle (never a name or an e-mail address), as Sessions name
    /// them in `spec.subject`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[a-z0-9][a-z0-9._:-]*$"))]
    pub subject: String,
    /// What the data is kept for, as Agents name it in `spec.memory.purpose`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub purpose: String,
    /// grant or revoke.
    pub action: ConsentAction,
    /// The categories granted or revoked: email, phone, payment-card, iban, ip-address,
    /// government-id or tenant:<pattern name>. A revocation naming none revokes every category
    /// of the purpose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub categories: Vec<ConsentCategory>,
    /// Where the person's decision is kept (a ticket, a signed form); required for a grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub evidence: Option<String>,
    /// A grant ends then, unless revoked sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Who records it: must be the user who creates the object (admission policy
    /// `contextos-consent-author` checks it), and is what the consent history names.
    #[schemars(length(min = 1, max = 128))]
    pub recorded_by: String,
}

/// A category name as a Consent spells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct ConsentCategory(
    #[schemars(regex(
        pattern = r"^(email|phone|payment-card|iban|ip-address|government-id|tenant:[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)$"
    ))]
    pub String,
);

/// What a Consent does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConsentAction {
    /// The person consents to the categories for the purpose.
    Grant,
    /// The person withdraws consent (for the categories named, or all of the purpose).
    Revoke,
}

/// Where a Consent stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsentStatus {
    /// `Recorded`: chained into the subject's consent history (or why not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Its position in the subject's consent chain, and the link's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<ConsentLinkRef>,
}

/// A link of a subject's consent chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsentLinkRef {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// The link's SHA-256 (hex).
    pub hash: String,
}
