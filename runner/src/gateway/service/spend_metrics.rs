//! What the model turns this replica recorded cost, as Prometheus counters by tenant, agent and
//! model: turns, tokens by kind, and spend by currency; and what the priced tool calls it
//! carried out cost, by tenant, agent and tool. Served on the gateway's metrics listener
//! (never on the port runner pods reach: one tenant must not read another's spend). Each
//! replica counts its own turns; Prometheus sums the replicas.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex};

use crate::{model::ModelTurn, pricing::TurnCost};

/// Whose turns a counter counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    tenant: String,
    agent: String,
    model: String,
}

#[derive(Clone, Debug, Default)]
struct Counters {
    turns: u64,
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
    completion_tokens: u64,
    /// Nano-units, by currency.
    cost: BTreeMap<String, u64>,
}

/// Whose priced tool calls a counter counts: (tenant, agent, tool).
type ToolKey = (String, String, String);

/// Priced tool calls carried out, and what they cost by currency (nano-units).
#[derive(Clone, Debug, Default)]
struct ToolCounters {
    calls: u64,
    cost: BTreeMap<String, u64>,
}

/// The replica's spend counters.
#[derive(Debug, Default)]
pub struct SpendMetrics {
    counters: Mutex<BTreeMap<Key, Counters>>,
    tools: Mutex<BTreeMap<ToolKey, ToolCounters>>,
    /// Model tokens replay gates spent re-executing a tenant's runs.
    gate_tokens: Mutex<BTreeMap<String, u64>>,
    /// What those tokens cost, by (tenant, currency), in nano-units.
    gate_spend: Mutex<BTreeMap<(String, String), u64>>,
}

/// Series kept before new agents and models of a tenant are counted together as `(other)`:
/// names are the tenants' to choose, and a scrape must stay small.
const MAX_SERIES: usize = 10_000;

impl SpendMetrics {
    /// Counts a recorded turn of `tenant`'s `agent` with `model`, and what it cost.
    pub fn record(&self, tenant: &str, agent: &str, model: &str, turn: &ModelTurn, cost: Option<&TurnCost>) {
        let key = Key {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
            model: model.to_owned(),
        };
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let key = if counters.contains_key(&key) || counters.len() < MAX_SERIES {
            key
        } else {
            Key {
                agent: "(other)".into(),
                model: "(other)".into(),
                ..key
            }
        };
        let c = counters.entry(key).or_default();
        c.turns += 1;
        c.prompt_tokens = c.prompt_tokens.saturating_add(turn.prompt_tokens);
        c.cached_prompt_tokens = c.cached_prompt_tokens.saturating_add(turn.cached_prompt_tokens);
        c.completion_tokens = c.completion_tokens.saturating_add(turn.completion_tokens);
        if let Some(cost) = cost {
            let sum = c.cost.entry(cost.currency.clone()).or_default();
            *sum = sum.saturating_add(cost.nanos.0);
        }
    }

    /// Counts a priced call of `tenant`'s `agent` to `tool` that was carried out, and its cost.
    pub fn record_tool_call(&self, tenant: &str, agent: &str, tool: &str, cost: &TurnCost) {
        let mut tools = self.tools.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = (tenant.to_owned(), agent.to_owned(), tool.to_owned());
        if !tools.contains_key(&key) && tools.len() >= MAX_SERIES {
            key = (tenant.to_owned(), "(other)".into(), "(other)".into());
        }
        let c = tools.entry(key).or_default();
        c.calls = c.calls.saturating_add(1);
        let sum = c.cost.entry(cost.currency.clone()).or_default();
        *sum = sum.saturating_add(cost.nanos.0);
    }

    /// Counts the model tokens a replay gate of `tenant` spent re-executing its runs.
    pub fn record_gate(&self, tenant: &str, tokens: u64) {
        let mut gates = self.gate_tokens.lock().unwrap_or_else(|e| e.into_inner());
        let sum = gates.entry(tenant.to_owned()).or_default();
        *sum = sum.saturating_add(tokens);
    }

    /// Counts what a turn a replay gate of `tenant` re-executed cost, at its run's price.
    pub fn record_gate_spend(&self, tenant: &str, cost: &TurnCost) {
        let mut spend = self.gate_spend.lock().unwrap_or_else(|e| e.into_inner());
        let sum = spend
            .entry((tenant.to_owned(), cost.currency.clone()))
            .or_default();
        *sum = sum.saturating_add(cost.nanos.0);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        {
            let gates = self.gate_tokens.lock().unwrap_or_else(|e| e.into_inner());
            out.push_str("# HELP contextos_gate_model_tokens Model tokens replay gates spent re-executing recorded runs.\n");
            out.push_str("# TYPE contextos_gate_model_tokens counter\n");
            for (tenant, tokens) in gates.iter() {
                let _ = writeln!(
                    out,
                    "contextos_gate_model_tokens_total{{tenant=\"{}\"}} {tokens}",
                    escape(tenant)
                );
            }
            let spend = self.gate_spend.lock().unwrap_or_else(|e| e.into_inner());
            out.push_str("# HELP contextos_gate_model_spend What the model turns replay gates re-executed cost, in units of the currency, at the prices the runs pinned.\n");
            out.push_str("# TYPE contextos_gate_model_spend counter\n");
            for ((tenant, currency), nanos) in spend.iter() {
                let _ = writeln!(
                    out,
                    "contextos_gate_model_spend_total{{tenant=\"{}\",currency=\"{}\"}} {}",
                    escape(tenant),
                    escape(currency),
                    crate::pricing::Nanos(*nanos)
                );
            }
        }
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let labels = |k: &Key| {
            format!(
                "tenant=\"{}\",agent=\"{}\",model=\"{}\"",
                escape(&k.tenant),
                escape(&k.agent),
                escape(&k.model)
            )
        };
        out.push_str("# HELP contextos_model_turns Model turns the gateway asked for and recorded.\n");
        out.push_str("# TYPE contextos_model_turns counter\n");
        for (k, c) in counters.iter() {
            let _ = writeln!(out, "contextos_model_turns_total{{{}}} {}", labels(k), c.turns);
        }
        out.push_str("# HELP contextos_model_tokens Model tokens of the recorded turns, by kind (prompt includes cached_prompt).\n");
        out.push_str("# TYPE contextos_model_tokens counter\n");
        for (k, c) in counters.iter() {
            for (kind, n) in [
                ("prompt", c.prompt_tokens),
                ("cached_prompt", c.cached_prompt_tokens),
                ("completion", c.completion_tokens),
            ] {
                let _ = writeln!(
                    out,
                    "contextos_model_tokens_total{{{},kind=\"{kind}\"}} {n}",
                    labels(k)
                );
            }
        }
        out.push_str("# HELP contextos_model_spend What the recorded turns cost, in units of the currency, at the prices their runs pinned.\n");
        out.push_str("# TYPE contextos_model_spend counter\n");
        for (k, c) in counters.iter() {
            for (currency, nanos) in &c.cost {
                let _ = writeln!(
                    out,
                    "contextos_model_spend_total{{{},currency=\"{}\"}} {}",
                    labels(k),
                    escape(currency),
                    crate::pricing::Nanos(*nanos)
                );
            }
        }
        drop(counters);
        let tools = self.tools.lock().unwrap_or_else(|e| e.into_inner());
        let labels = |(tenant, agent, tool): &ToolKey| {
            format!(
                "tenant=\"{}\",agent=\"{}\",tool=\"{}\"",
                escape(tenant),
                escape(agent),
                escape(tool)
            )
        };
        out.push_str("# HELP contextos_priced_tool_calls Calls to priced tools the gateway carried out.\n");
        out.push_str("# TYPE contextos_priced_tool_calls counter\n");
        for (k, c) in tools.iter() {
            let _ = writeln!(
                out,
                "contextos_priced_tool_calls_total{{{}}} {}",
                labels(k),
                c.calls
            );
        }
        out.push_str("# HELP contextos_tool_spend What the priced tool calls cost, in units of the currency, at the prices their runs pinned.\n");
        out.push_str("# TYPE contextos_tool_spend counter\n");
        for (k, c) in tools.iter() {
            for (currency, nanos) in &c.cost {
                let _ = writeln!(
                    out,
                    "contextos_tool_spend_total{{{},currency=\"{}\"}} {}",
                    labels(k),
                    escape(currency),
                    crate::pricing::Nanos(*nanos)
                );
            }
        }
        out
    }
}

/// A label value as the exposition format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Nanos;

    #[test]
    fn turns_tokens_and_spend_are_counted_per_tenant_agent_and_model() {
        let metrics = SpendMetrics::default();
        let turn = |prompt, cached, completion| ModelTurn {
            content: String::new(),
            tool_calls: Vec::new(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: cached,
            dropped_tool_calls: 0,
            route: None,
        };
        let usd = |nanos| TurnCost {
            currency: "USD".into(),
            nanos: Nanos(nanos),
        };
        metrics.record("shop", "oncall", "gpt", &turn(100, 40, 10), Some(&usd(1_500_000)));
        metrics.record("shop", "oncall", "gpt", &turn(50, 0, 5), Some(&usd(500_000)));
        metrics.record("bank", "teller", "odd\"name", &turn(7, 0, 1), None);
        let text = metrics.render();
        for line in [
            "contextos_model_turns_total{tenant=\"shop\",agent=\"oncall\",model=\"gpt\"} 2",
            "contextos_model_tokens_total{tenant=\"shop\",agent=\"oncall\",model=\"gpt\",kind=\"prompt\"} 150",
            "contextos_model_tokens_total{tenant=\"shop\",agent=\"oncall\",model=\"gpt\",kind=\"cached_prompt\"} 40",
            "contextos_model_spend_total{tenant=\"shop\",agent=\"oncall\",model=\"gpt\",currency=\"USD\"} 0.002",
            "contextos_model_turns_total{tenant=\"bank\",agent=\"teller\",model=\"odd\\\"name\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        // An unpriced turn is counted, and has no spend line.
        assert!(!text.contains("tenant=\"bank\",agent=\"teller\",model=\"odd\\\"name\",currency"));
        metrics.record_tool_call("shop", "oncall", "search", &usd(5_000_000));
        metrics.record_tool_call("shop", "oncall", "search", &usd(5_000_000));
        let text = metrics.render();
        for line in [
            "contextos_priced_tool_calls_total{tenant=\"shop\",agent=\"oncall\",tool=\"search\"} 2",
            "contextos_tool_spend_total{tenant=\"shop\",agent=\"oncall\",tool=\"search\",currency=\"USD\"} 0.01",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        metrics.record_gate("shop", 900);
        metrics.record_gate("shop", 100);
        assert!(
            metrics
                .render()
                .lines()
                .any(|l| l == "contextos_gate_model_tokens_total{tenant=\"shop\"} 1000")
        );
    }

    #[test]
    fn past_the_series_bound_new_names_are_counted_together() {
        let metrics = SpendMetrics::default();
        let turn = ModelTurn {
            content: String::new(),
            tool_calls: Vec::new(),
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_prompt_tokens: 0,
            dropped_tool_calls: 0,
            route: None,
        };
        for i in 0..MAX_SERIES + 5 {
            metrics.record("shop", "a", &format!("model-{i}"), &turn, None);
        }
        let text = metrics.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("contextos_model_turns_total{"))
            .count();
        assert_eq!(series, MAX_SERIES + 1);
        assert!(text.lines().any(
            |l| l == "contextos_model_turns_total{tenant=\"shop\",agent=\"(other)\",model=\"(other)\"} 5"
        ));
    }
}
