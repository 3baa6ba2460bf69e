//! The Feedback kind: one person's correction of a Session's run, applied as YAML (GitOps,
//! `kubectl`). Its spec never changes; the gateway appends it to the run's signed chain of
//! corrections in the record store, where insights read it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::LocalRef;

/// One correction.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "Feedback",
    plural = "feedbacks",
    doc = "A person's correction of a Session's run (or of one call in it), with a typed label. Immutable. The gateway chains it with the run's records; `contextos insights` and `contextos propose` read it.",
    namespaced,
    cel,
    status = "FeedbackStatus",
    shortname = "cfb",
    category = "contextos",
    printcolumn(name = "Session", type_ = "string", json_path = ".spec.sessionRef.name"),
    printcolumn(name = "Label", type_ = "string", json_path = ".spec.label"),
    printcolumn(name = "By", type_ = "string", json_path = ".spec.givenBy"),
    printcolumn(
        name = "Recorded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Recorded\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self == oldSelf").message("Feedback cannot change: it is what someone said then; give new Feedback").reason(Reason::FieldValueForbidden),
    validation = Rule::new(r"!self.givenBy.matches('[\x00-\x1f\x7f]')").message("spec.givenBy holds a control character")
)]
pub struct FeedbackSpec {
    /// The Session whose run it corrects: its latest run (`status.runId`), or `runId`.
    pub session_ref: LocalRef,
    /// The run it corrects, pinned (`status.runId` of the Session when it ran; `contextos
    /// records list` shows them): it must be a run of `sessionRef`, which may be gone or made
    /// again since. Unset: the Session's latest run when the gateway chains this, refused if
    /// the Session was made again after this Feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub run_id: Option<String>,
    /// The entry it is about, by position (`contextos records show <run>` prints them); its
    /// hash and call are taken from the verified record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1_000_000))]
    pub entry: Option<u64>,
    /// What was wrong.
    pub label: FeedbackLabel,
    /// What should have happened.
    #[schemars(length(min = 1, max = 2048))]
    pub correction: String,
    /// Who gives it: must be the user who creates the object (admission policy
    /// `contextos-feedback-author` checks it).
    #[schemars(length(min = 1, max = 253))]
    pub given_by: String,
}

/// What was wrong.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum FeedbackLabel {
    WrongTool,
    ShouldHaveAsked,
    ShouldNotHaveActed,
    MissingContext,
    WrongAnswer,
    TooSlowOrCostly,
}

impl FeedbackLabel {
    pub const ALL: [Self; 6] = [
        Self::WrongTool,
        Self::ShouldHaveAsked,
        Self::ShouldNotHaveActed,
        Self::MissingContext,
        Self::WrongAnswer,
        Self::TooSlowOrCostly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::WrongTool => "wrong-tool",
            Self::ShouldHaveAsked => "should-have-asked",
            Self::ShouldNotHaveActed => "should-not-have-acted",
            Self::MissingContext => "missing-context",
            Self::WrongAnswer => "wrong-answer",
            Self::TooSlowOrCostly => "too-slow-or-costly",
        }
    }
}

impl std::fmt::Display for FeedbackLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FeedbackLabel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|l| l.as_str() == text).ok_or_else(|| {
            let all: Vec<&str> = Self::ALL.iter().map(|l| l.as_str()).collect();
            format!("label {text:?}: use one of {}", all.join(", "))
        })
    }
}

/// Observed state of a Feedback object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackStatus {
    /// `Recorded` (and `Ready`, saying the same): whether it is in the run's chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The run it was chained to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Its link in the run's chain of corrections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}
