//! SpendQuotas as the gateway enforces them: which quotas a run answers to ([`applying`]), what
//! each limits ([`ActiveQuota`]), their ledgers ([`ledger`], pure) and how calls hold and spend
//! against them in the record store ([`book`]).
//!
//! Every quota selecting a run is enforced: with a tenant's quota and a narrower team quota,
//! a call must fit both, so the strictest decides.

pub mod book;
pub mod ledger;

use std::collections::BTreeMap;

use contextos_crds::{
    SpendQuota,
    spend_quota::{QuotaWindow, WhenWindowFull},
};
use kube::ResourceExt;

use crate::pricing::Nanos;
pub use ledger::{Amounts, Limit, Resource};

/// The rule id a tool call refused by a quota is recorded with: `quota/<name>`.
pub const RULE_PREFIX: &str = "quota/";
/// The reason a run refused by a quota ends with.
pub const EXCEEDED: &str = "QuotaExceeded";

/// A SpendQuota as enforced.
#[derive(Clone, Debug, PartialEq)]
pub struct ActiveQuota {
    pub name: String,
    /// Its ledger's key (a quota made again under its name starts afresh).
    pub uid: String,
    pub limits: Vec<Limit>,
    /// The currency of its spend limits, if it has any.
    pub currency: Option<String>,
    pub when_full: WhenWindowFull,
    agent_labels: Option<BTreeMap<String, String>>,
    session_labels: Option<BTreeMap<String, String>>,
}

impl ActiveQuota {
    /// The quota `object` enforces; an error names the field (admission checks the same, so only
    /// an object written around it gets here).
    pub fn compile(object: &SpendQuota) -> Result<Self, String> {
        let spec = &object.spec;
        let mut limits = Vec::new();
        let mut currency: Option<String> = None;
        for (i, window) in spec.limits.iter().enumerate() {
            let mut add = |resource, max| {
                limits.push(Limit {
                    window: window.window,
                    resource,
                    max,
                })
            };
            if let Some(spend) = &window.spend {
                let nanos =
                    Nanos::parse(&spend.amount).map_err(|e| format!("spec.limits[{i}].spend.amount: {e}"))?;
                match &currency {
                    Some(c) if *c != spend.currency => {
                        return Err(format!(
                            "spec.limits[{i}].spend.currency is {} but an earlier limit's is {c}: use one currency",
                            spend.currency
                        ));
                    }
                    _ => currency = Some(spend.currency.clone()),
                }
                add(Resource::Spend, nanos.0);
            }
            if let Some(tokens) = window.tokens {
                add(Resource::Tokens, tokens);
            }
            if let Some(calls) = window.tool_calls {
                add(Resource::ToolCalls, calls);
            }
        }
        Ok(Self {
            name: object.name_any(),
            uid: object.uid().unwrap_or_else(|| object.name_any()),
            limits,
            currency,
            when_full: spec.when_window_full,
            agent_labels: spec.agent_selector.as_ref().map(|s| s.match_labels.clone()),
            session_labels: spec.session_selector.as_ref().map(|s| s.match_labels.clone()),
        })
    }

    /// A quota built in code (tests, benchmarks): the whole namespace's runs.
    pub fn new(name: &str, limits: Vec<Limit>, currency: Option<&str>, when_full: WhenWindowFull) -> Self {
        Self {
            name: name.to_owned(),
            uid: name.to_owned(),
            limits,
            currency: currency.map(str::to_owned),
            when_full,
            agent_labels: None,
            session_labels: None,
        }
    }

    /// Only runs of Sessions labelled with all of `labels`.
    pub fn for_sessions(mut self, labels: &[(&str, &str)]) -> Self {
        self.session_labels = Some(labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect());
        self
    }

    /// The windows its limits count in.
    pub fn windows(&self) -> Vec<QuotaWindow> {
        let mut windows: Vec<_> = self.limits.iter().map(|l| l.window).collect();
        windows.sort();
        windows.dedup();
        windows
    }

    /// Whether it counts a run of an Agent labelled `agent` in a Session labelled `session`.
    pub fn selects(&self, agent: &BTreeMap<String, String>, session: &BTreeMap<String, String>) -> bool {
        let all = |wanted: &Option<BTreeMap<String, String>>, labels: &BTreeMap<String, String>| {
            wanted
                .as_ref()
                .is_none_or(|w| w.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        all(&self.agent_labels, agent) && all(&self.session_labels, session)
    }

    /// Whether it limits calls at all (a quota of only Session limits is the operator's).
    pub fn limits_calls(&self) -> bool {
        !self.limits.is_empty()
    }
}

/// The quotas of `quotas` a run answers to, in name order.
pub fn applying<'q>(
    quotas: &'q [ActiveQuota],
    agent: &BTreeMap<String, String>,
    session: &BTreeMap<String, String>,
) -> Vec<&'q ActiveQuota> {
    let mut applying: Vec<_> = quotas
        .iter()
        .filter(|q| q.limits_calls() && q.selects(agent, session))
        .collect();
    applying.sort_by(|a, b| a.name.cmp(&b.name));
    applying
}

/// How an amount of `resource` reads: money as a decimal, the rest as counts.
pub fn amount_text(resource: Resource, amount: u64) -> String {
    match resource {
        Resource::Spend => Nanos(amount).to_string(),
        Resource::Tokens | Resource::ToolCalls => amount.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use contextos_crds::SpendQuotaSpec;

    use super::*;

    fn quota(yaml: &str) -> SpendQuota {
        let spec: SpendQuotaSpec = serde_yaml::from_str(yaml).expect("spec");
        let mut object = SpendQuota::new("team", spec);
        object.metadata.uid = Some("u-1".into());
        object
    }

    #[test]
    fn a_quota_compiles_to_its_limits_in_nano_units() {
        let active = ActiveQuota::compile(&quota(
            "limits:\n- window: day\n  spend: {amount: \"25.50\", currency: USD}\n  toolCalls: 100\n- window: hour\n  tokens: 5000\n",
        ))
        .expect("compiles");
        assert_eq!(active.currency.as_deref(), Some("USD"));
        assert_eq!(
            active.limits,
            vec![
                Limit {
                    window: QuotaWindow::Day,
                    resource: Resource::Spend,
                    max: 25_500_000_000
                },
                Limit {
                    window: QuotaWindow::Day,
                    resource: Resource::ToolCalls,
                    max: 100
                },
                Limit {
                    window: QuotaWindow::Hour,
                    resource: Resource::Tokens,
                    max: 5000
                },
            ]
        );
        assert_eq!(active.windows(), vec![QuotaWindow::Hour, QuotaWindow::Day]);
        assert_eq!(active.uid, "u-1");
    }

    #[test]
    fn two_currencies_in_one_quota_are_refused_naming_the_field() {
        let error = ActiveQuota::compile(&quota(
            "limits:\n- window: day\n  spend: {amount: \"1\", currency: USD}\n- window: month\n  spend: {amount: \"9\", currency: EUR}\n",
        ))
        .expect_err("two currencies");
        assert!(
            error.starts_with("spec.limits[1].spend.currency is EUR"),
            "{error}"
        );
    }

    #[test]
    fn a_run_answers_to_every_quota_selecting_it_and_to_no_other() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
        };
        let calls = vec![Limit {
            window: QuotaWindow::Hour,
            resource: Resource::ToolCalls,
            max: 1,
        }];
        let tenant = ActiveQuota::new("tenant", calls.clone(), None, WhenWindowFull::Refuse);
        let team = ActiveQuota::new("team-pay", calls.clone(), None, WhenWindowFull::Refuse)
            .for_sessions(&[("team", "payments")]);
        let sessions_only = ActiveQuota::new("starts", vec![], None, WhenWindowFull::Refuse);
        let quotas = vec![team, tenant, sessions_only];
        let names = |session: &BTreeMap<String, String>| {
            applying(&quotas, &BTreeMap::new(), session)
                .iter()
                .map(|q| q.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&labels(&[("team", "payments")])), ["team-pay", "tenant"]);
        assert_eq!(names(&labels(&[("team", "search")])), ["tenant"]);
        assert_eq!(names(&BTreeMap::new()), ["tenant"]);
    }
}
