//! Rules about spend: namespaces whose runs no SpendQuota bounds, quotas that can never decide
//! (selecting no Agent, or looser than the tenant's own), and money limits nothing can price.

use std::collections::{BTreeMap, BTreeSet};

use contextos_crds::{PriceListSpec, SpendQuotaSpec, spend_quota::WindowLimits};

use super::{Check, Sink, spec};
use crate::audit::{
    finding::{Rule, RuleId, Severity},
    harness::{Harness, Object},
};

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("spend/no-tenant-quota"),
            severity: Severity::Medium,
            title: "a namespace that runs agents with no SpendQuota for the whole tenant",
            why: "each run is bounded by its own budget, but nothing bounds the tenant's runs together: a loop that starts Session after Session, or many Sessions at once, spends without limit",
            fix: "add a SpendQuota without selectors to the namespace (spend, tokens and tool calls per day or month, `concurrentSessions`), kept by cluster admins",
        },
        no_tenant_quota,
    ),
    (
        Rule {
            id: RuleId("spend/quota-selects-nothing"),
            severity: Severity::Low,
            title: "a team SpendQuota whose agentSelector matches no Agent of its namespace",
            why: "it bounds nothing: the team it was written for runs under the tenant's quota alone (a label that changed, or a typo)",
            fix: "correct `spec.agentSelector.matchLabels` to labels the team's Agents carry, or remove the quota",
        },
        selects_nothing,
    ),
    (
        Rule {
            id: RuleId("spend/quota-never-binds"),
            severity: Severity::Low,
            title: "a team SpendQuota limit no tighter than the tenant's quota for the same window",
            why: "every quota that selects a run applies and the strictest decides: a team limit at or above the tenant-wide one for the same window is never the one that stops a call",
            fix: "lower the team's limit below the tenant's, or remove it",
        },
        never_binds,
    ),
    (
        Rule {
            id: RuleId("spend/quota-currency-unpriced"),
            severity: Severity::Medium,
            title: "a SpendQuota spend limit in a currency no PriceList prices in",
            why: "the quota is Ready=False (PriceMissing) and every model turn it covers is refused: what cannot be priced is never let through as free",
            fix: "write the limit in the currency of the cluster's PriceList, or add a PriceList in that currency",
        },
        currency_unpriced,
    ),
];

/// The SpendQuotas among the audited objects that read, with their namespaces.
fn quotas(harness: &Harness) -> Vec<(&Object<serde_json::Value>, SpendQuotaSpec)> {
    harness
        .others_of("SpendQuota")
        .filter_map(|q| Some((q, serde_json::from_value(q.spec["spec"].clone()).ok()?)))
        .collect()
}

fn is_tenant_wide(quota: &SpendQuotaSpec) -> bool {
    quota.agent_selector.is_none() && quota.session_selector.is_none()
}

fn no_tenant_quota(harness: &Harness, sink: &mut Sink<'_>) {
    let quotas = quotas(harness);
    // Judged where quotas are known: in a live cluster, or in input that carries SpendQuotas
    // (a tenant's own repository rarely does; the admins' does).
    if !harness.from_cluster && quotas.is_empty() {
        return;
    }
    let covered: BTreeSet<Option<&str>> = quotas
        .iter()
        .filter(|(_, spec)| is_tenant_wide(spec))
        .map(|(q, _)| q.id.namespace.as_deref())
        .collect();
    let mut reported = BTreeSet::new();
    for agent in &harness.agents {
        let namespace = agent.id.namespace.as_deref();
        if covered.contains(&namespace) || !reported.insert(namespace) {
            continue;
        }
        sink.report(
            agent,
            spec(&[]),
            format!(
                "namespace {} runs Agent {} and has no SpendQuota without selectors",
                namespace.unwrap_or("(unset)"),
                agent.id.name
            ),
        );
    }
}

fn selects_nothing(harness: &Harness, sink: &mut Sink<'_>) {
    for (quota, spec_) in quotas(harness) {
        let Some(selector) = &spec_.agent_selector else {
            continue;
        };
        let mut agents = harness
            .agents
            .iter()
            .filter(|a| a.same_namespace(quota))
            .peekable();
        // Without the namespace's Agents in the input, nothing can be said.
        if agents.peek().is_none() {
            continue;
        }
        let labels_match = |agent: &&Object<contextos_crds::agent::AgentSpec>| {
            let labels: BTreeMap<&str, &str> = agent.labels().collect();
            selector
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k.as_str()) == Some(&v.as_str()))
        };
        if !agents.any(|a| labels_match(&a)) {
            sink.report(
                quota,
                spec(&["agentSelector", "matchLabels"]),
                format!(
                    "SpendQuota {} selects {:?}, which no Agent of its namespace carries",
                    quota.id.name, selector.match_labels
                ),
            );
        }
    }
}

/// Each limit of a window as (resource, amount), money as (spend <currency>, amount).
fn limits_of(limits: &WindowLimits) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    if let Some(spend) = &limits.spend
        && let Ok(amount) = spend.amount.parse::<f64>()
    {
        out.push((format!("spend ({})", spend.currency), amount));
    }
    for (resource, value) in [
        ("tokens", limits.tokens),
        ("toolCalls", limits.tool_calls),
        ("sessions", limits.sessions.map(u64::from)),
    ] {
        if let Some(value) = value {
            out.push((resource.to_owned(), value as f64));
        }
    }
    out
}

fn never_binds(harness: &Harness, sink: &mut Sink<'_>) {
    let quotas = quotas(harness);
    for (team, team_spec) in quotas.iter().filter(|(_, s)| !is_tenant_wide(s)) {
        let tenant_wide = quotas
            .iter()
            .filter(|(q, s)| is_tenant_wide(s) && q.same_namespace(team));
        // The tenant's tightest limit per (window, resource).
        let mut tightest: BTreeMap<(String, String), f64> = BTreeMap::new();
        for (_, tenant) in tenant_wide {
            for window in &tenant.limits {
                for (resource, amount) in limits_of(window) {
                    let key = (format!("{:?}", window.window), resource);
                    let entry = tightest.entry(key).or_insert(amount);
                    *entry = entry.min(amount);
                }
            }
        }
        for (i, window) in team_spec.limits.iter().enumerate() {
            for (resource, amount) in limits_of(window) {
                let key = (format!("{:?}", window.window), resource.clone());
                if let Some(&tenant) = tightest.get(&key)
                    && amount >= tenant
                {
                    sink.report(
                        *team,
                        spec(&["limits"]).index(i),
                        format!(
                            "{resource} per {:?}: the team's {amount} is not below the tenant's {tenant}",
                            window.window
                        ),
                    );
                }
            }
        }
    }
}

fn currency_unpriced(harness: &Harness, sink: &mut Sink<'_>) {
    let currencies: BTreeSet<String> = harness
        .others_of("PriceList")
        .filter_map(|l| serde_json::from_value::<PriceListSpec>(l.spec["spec"].clone()).ok())
        .map(|l| l.currency)
        .collect();
    // Without any PriceList in the input (and not a cluster) where prices are kept is unknown.
    if currencies.is_empty() && !harness.from_cluster {
        return;
    }
    for (quota, spec_) in quotas(harness) {
        for (i, window) in spec_.limits.iter().enumerate() {
            if let Some(spend) = &window.spend
                && !currencies.contains(&spend.currency)
            {
                sink.report(
                    quota,
                    spec(&["limits"]).index(i).key("spend").key("currency"),
                    format!(
                        "SpendQuota {} limits spend in {}; the PriceLists price in {}",
                        quota.id.name,
                        spend.currency,
                        if currencies.is_empty() {
                            "nothing (there are none)".to_owned()
                        } else {
                            currencies.iter().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{rules::findings_of, source};

    fn harness(yaml: &str) -> Harness {
        let documents = source::parse(std::path::Path::new("spend.yaml"), yaml).expect("yaml");
        Harness::from_documents(documents, false)
    }

    const AGENTS: &str = r#"
apiVersion: contextos.dev/v1alpha1
kind: Agent
metadata: {name: payments-bot, namespace: shop, labels: {team: payments}}
spec:
  model: {provider: openai_compatible, model: gpt-4o, endpoint: "https://api.openai.com/v1"}
  contextPackRef: {name: pack}
  sandboxProfileRef: {name: sandbox}
  policyRefs: []
  tools: []
  budget: {maxSteps: 5, maxToolCalls: 5, maxTokens: 1000, maxWallSeconds: 60}
---
apiVersion: contextos.dev/v1alpha1
kind: Agent
metadata: {name: ops-bot, namespace: bank}
spec:
  model: {provider: openai_compatible, model: gpt-4o, endpoint: "https://api.openai.com/v1"}
  contextPackRef: {name: pack}
  sandboxProfileRef: {name: sandbox}
  policyRefs: []
  tools: []
  budget: {maxSteps: 5, maxToolCalls: 5, maxTokens: 1000, maxWallSeconds: 60}
---
apiVersion: contextos.dev/v1alpha1
kind: PriceList
metadata: {name: prices}
spec:
  currency: USD
  models:
  - {provider: openai_compatible, model: gpt-4o, inputPerMillion: "2.5", outputPerMillion: "10"}
"#;

    #[test]
    fn quotas_that_bound_nothing_or_never_decide_are_found() {
        let yaml = format!(
            "{AGENTS}---\n{}",
            r#"apiVersion: contextos.dev/v1alpha1
kind: SpendQuota
metadata: {name: tenant, namespace: shop}
spec:
  limits:
  - {window: day, toolCalls: 100, spend: {amount: "20", currency: USD}}
---
apiVersion: contextos.dev/v1alpha1
kind: SpendQuota
metadata: {name: team-typo, namespace: shop}
spec:
  agentSelector: {matchLabels: {team: paymnets}}
  limits:
  - {window: day, toolCalls: 10}
---
apiVersion: contextos.dev/v1alpha1
kind: SpendQuota
metadata: {name: team-loose, namespace: shop}
spec:
  agentSelector: {matchLabels: {team: payments}}
  limits:
  - {window: day, toolCalls: 500, spend: {amount: "5", currency: EUR}}
  - {window: hour, toolCalls: 500}
"#
        );
        let harness = harness(&yaml);
        assert!(harness.unreadable.is_empty(), "{:?}", harness.unreadable);
        let mut found = findings_of(RULES, &harness);
        found.sort();
        let ids: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "spend/no-tenant-quota",
                "spend/quota-currency-unpriced",
                "spend/quota-never-binds",
                "spend/quota-selects-nothing",
            ],
            "{found:#?}"
        );
        let message = |id: &str| &found.iter().find(|(i, _)| i == id).expect("found").1;
        // Only the bank namespace lacks a tenant-wide quota.
        assert!(message("spend/no-tenant-quota").contains("namespace bank runs Agent ops-bot"));
        // The team's day limit on tool calls is looser; its hour limit has no tenant counterpart,
        // and its EUR spend is compared with no USD limit.
        assert!(
            message("spend/quota-never-binds")
                .contains("toolCalls per Day: the team's 500 is not below the tenant's 100"),
            "{found:?}"
        );
        assert!(message("spend/quota-selects-nothing").contains("team-typo"));
        assert!(
            message("spend/quota-currency-unpriced")
                .contains("limits spend in EUR; the PriceLists price in USD")
        );
    }

    #[test]
    fn a_repository_without_quotas_is_not_judged_for_them() {
        assert!(findings_of(RULES, &harness(AGENTS)).is_empty());
    }
}
