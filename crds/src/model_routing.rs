//! An Agent's model routing: other models than `spec.model` (which is named `primary`), rules
//! choosing one per step — by the kind of step, the riskiest tool the run has called, and how
//! much of its token budget is left — and an ordered fallback when the chosen model fails, with
//! a circuit breaker per model. The gateway records which model answered each turn and why, so
//! a replay reads the same routes; a changed routing policy is a candidate the Agent's replay
//! gate judges, with its cost beside the recorded one.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::{agent::ModelSpec, common::ToolRisk};

/// The most fallbacks `spec.routing.fallback` names (its schema's `maxItems`): a turn is asked
/// of at most this many models after the chosen one.
pub const MAX_FALLBACKS: usize = 8;

/// The name `spec.model` is routed to by.
pub const PRIMARY: &str = "primary";

/// Which model answers each step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.models.all(m, m.name != 'primary')").message("routing.models: primary is spec.model's name; name the others differently"),
    validation = Rule::new("self.models.all(m, self.models.exists_one(n, n.name == m.name))").message("routing.models names a model twice"),
    validation = Rule::new("!has(self.rules) || self.rules.all(r, r.use == 'primary' || self.models.exists(m, m.name == r.use))").message("routing.rules[].use names a model that is neither primary nor in routing.models"),
    validation = Rule::new("!has(self.fallback) || self.fallback.all(f, f == 'primary' || self.models.exists(m, m.name == f))").message("routing.fallback names a model that is neither primary nor in routing.models")
)]
pub struct ModelRouting {
    /// The models a step may be routed to besides `spec.model` (named `primary`).
    #[schemars(length(min = 1, max = 8))]
    pub models: Vec<RoutedModel>,
    /// Checked in order for each step; the first that matches chooses the model. None
    /// matching: `primary`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub rules: Vec<RouteRule>,
    /// Models tried in this order when the chosen one fails (an error, a timeout, its breaker
    /// open), each at most once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 63)))] // MAX_FALLBACKS
    pub fallback: Vec<String>,
    /// When a model is skipped after failing.
    #[serde(default)]
    pub breaker: RouteBreaker,
}

/// A model a step may be routed to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutedModel {
    /// How rules and fallback name it (lowercase letters, digits and `-`).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The model, as `spec.model` says one.
    pub model: ModelSpec,
}

/// A routing rule: every condition set must hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// The model chosen when the rule matches (`primary` or a name in `models`).
    #[serde(rename = "use")]
    #[schemars(length(min = 1, max = 63))]
    pub use_: String,
    /// The kind of step: `plan` (the first), `act` (one after tool results) or `answer` (the
    /// last step the budget allows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_kind: Option<StepKind>,
    /// The riskiest tool the run has called so far is at least this risky.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_at_least: Option<ToolRisk>,
    /// Less than this percentage of the run's token budget is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub budget_left_below_percent: Option<u32>,
}

/// What a step is for, as routing sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The run's first step: the request, no results yet.
    Plan,
    /// A step after tool results.
    Act,
    /// The last step the run's step budget allows: what it says is the answer.
    Answer,
}

impl StepKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Plan => "plan",
            Self::Act => "act",
            Self::Answer => "answer",
        }
    }
}

/// A model's circuit breaker: after `failures` failed turns in a row it is skipped for
/// `openSeconds`, then tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteBreaker {
    /// Failed turns in a row that open the breaker.
    #[serde(default = "default_failures")]
    #[schemars(range(min = 1, max = 100))]
    pub failures: u32,
    /// Seconds the model is skipped once its breaker opened.
    #[serde(default = "default_open_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub open_seconds: u32,
}

fn default_failures() -> u32 {
    3
}

fn default_open_seconds() -> u32 {
    60
}

impl Default for RouteBreaker {
    fn default() -> Self {
        Self {
            failures: default_failures(),
            open_seconds: default_open_seconds(),
        }
    }
}

impl ModelRouting {
    /// The model named `name` (`primary`: `primary`).
    pub fn model<'a>(&'a self, primary: &'a ModelSpec, name: &str) -> Option<&'a ModelSpec> {
        if name == PRIMARY {
            return Some(primary);
        }
        self.models.iter().find(|m| m.name == name).map(|m| &m.model)
    }
}

#[cfg(test)]
mod max_fallbacks {
    #[test]
    fn the_schema_admits_max_fallbacks_and_no_more() {
        let schema = serde_json::to_value(schemars::schema_for!(super::ModelRouting)).expect("schema");
        assert_eq!(
            schema
                .pointer("/properties/fallback/maxItems")
                .and_then(serde_json::Value::as_u64),
            Some(super::MAX_FALLBACKS as u64)
        );
    }
}
