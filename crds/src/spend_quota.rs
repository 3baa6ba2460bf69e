//! The SpendQuota kind: how much a tenant — or a team within it, selected by label — may spend
//! on model and tool calls, and how many Sessions it may run, per rolling window. Kept by
//! cluster admins in the tenant's namespace (tenants read it, never write it): the gateway
//! service enforces money, tokens and tool calls on every call, with the record store as its
//! ledger; the operator enforces Sessions (started per window, running at once).
//!
//! Several quotas may select one run: each is enforced, so the strictest decides.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Limits on a tenant's (or a team's) spend and Sessions.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "SpendQuota",
    plural = "spendquotas",
    doc = "How much the namespace's runs (or those an agent or Session selector picks) may spend on models and tools, in tokens and tool calls, and how many Sessions they may start and run at once, per rolling window. The gateway refuses a call past a limit before it is made (or holds it, whenWindowFull: Wait); the operator keeps Sessions past a Session limit Pending.",
    namespaced,
    status = "SpendQuotaStatus",
    shortname = "squota",
    category = "contextos",
    printcolumn(name = "Spend", type_ = "string", json_path = ".status.summary.spend"),
    printcolumn(name = "Tokens", type_ = "string", json_path = ".status.summary.tokens"),
    printcolumn(
        name = "Tool calls",
        type_ = "string",
        json_path = ".status.summary.toolCalls"
    ),
    printcolumn(name = "Sessions", type_ = "string", json_path = ".status.summary.sessions"),
    printcolumn(name = "Running", type_ = "string", json_path = ".status.summary.running"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.limits) && size(self.limits) > 0) || has(self.concurrentSessions)").message("a SpendQuota limits nothing: add spec.limits or spec.concurrentSessions"))]
pub struct SpendQuotaSpec {
    /// Only runs of Agents carrying these labels count; unset: every Agent of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_selector: Option<QuotaSelector>,
    /// Only Sessions carrying these labels count (a team, an environment); unset: every
    /// Session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_selector: Option<QuotaSelector>,
    /// What may be spent per rolling window, one entry per window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(l, self.exists_one(m, m.window == l.window))").message("spec.limits names a window twice: put its limits in one entry"))]
    #[schemars(length(max = 3))]
    pub limits: Vec<WindowLimits>,
    /// At most this many selected Sessions run at once; the next waits `Pending` until one
    /// ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub concurrent_sessions: Option<u32>,
    /// What a model or tool call past a limit does: `Refuse` (the default) refuses it and ends
    /// the Session `QuotaExceeded`; `Wait` holds it until enough of the window has passed.
    #[serde(default)]
    pub when_window_full: WhenWindowFull,
}

/// Runs selected by label: all of these must be present with these values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSelector {
    /// Labels and the values they must have (1 to 16; an empty selector would select every
    /// run, which a quota without a selector already does).
    #[schemars(extend("minProperties" = 1, "maxProperties" = 16))]
    pub match_labels: BTreeMap<String, String>,
}

/// A rolling window: what was spent within its length before now counts.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum QuotaWindow {
    /// The last 60 minutes.
    Hour,
    /// The last 24 hours.
    Day,
    /// The last 30 days.
    Month,
}

impl QuotaWindow {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The window's length in milliseconds.
    pub const fn millis(self) -> i64 {
        match self {
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
            Self::Month => 30 * 86_400_000,
        }
    }
}

/// Limits within one rolling window; unset ones do not limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.spend) || has(self.tokens) || has(self.toolCalls) || has(self.sessions)").message("a window limits nothing: set spend, tokens, toolCalls or sessions"))]
pub struct WindowLimits {
    pub window: QuotaWindow,
    /// Money spent on model calls (at the PriceList's prices) in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<Money>,
    /// Model tokens (prompt and completion) in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub tokens: Option<u64>,
    /// Tool calls made (not those refused) in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub tool_calls: Option<u64>,
    /// Sessions started in the window; the next waits `Pending`. At most 2000 (each start is
    /// kept in the quota's status while it counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2000))]
    pub sessions: Option<u32>,
}

/// An amount of money.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Money {
    /// A decimal such as `25.00`.
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub amount: String,
    /// The ISO 4217 code of the PriceList the models are priced in, e.g. `USD`.
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
}

/// What a call past a limit does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum WhenWindowFull {
    /// Refuse the call before it is made; the Session ends `QuotaExceeded`.
    #[default]
    Refuse,
    /// Hold the call until the window allows it (within the Session's deadline).
    Wait,
}

/// Usage against each limit, and the Session starts counted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpendQuotaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the gateway can enforce the quota (or why not: a limit it cannot count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Spend, tokens and tool calls in each window, as the gateway's ledger has them (written
    /// by the gateway service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<LimitUsage>,
    /// When the gateway last measured `usage` (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<String>,
    /// Sessions started within the longest Session window, oldest first (written by the
    /// operator when it starts one; the ledger of `sessions` limits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub session_starts: Vec<SessionStart>,
    /// Selected Sessions running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_sessions: Option<u32>,
    /// One line per kind of limit, for `kubectl get spendquota`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<UsageSummary>,
}

/// What one limit has used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitUsage {
    pub window: QuotaWindow,
    /// `spend`, `tokens` or `toolCalls`.
    pub resource: String,
    /// Used in the window, including calls in flight (a decimal for spend).
    pub used: String,
    pub limit: String,
    /// `used` as a percentage of `limit`, rounded down.
    pub percent: u32,
}

/// A Session the operator started, counted against `sessions` limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionStart {
    pub session: String,
    /// The Session's uid: a Session deleted and made again under its name counts again.
    pub uid: String,
    /// When it started (RFC 3339).
    pub at: String,
}

/// Usage as `kubectl get` shows it, e.g. `3.20/25 USD (day)`; the tightest window of each kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSummary {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
}

impl QuotaSelector {
    /// Whether `labels` carry every label this selects on.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl SpendQuotaSpec {
    /// Whether a run of an Agent labelled `agent` in a Session labelled `session` counts.
    pub fn selects(&self, agent: &BTreeMap<String, String>, session: &BTreeMap<String, String>) -> bool {
        self.agent_selector.as_ref().is_none_or(|s| s.selects(agent))
            && self.session_selector.as_ref().is_none_or(|s| s.selects(session))
    }
}
