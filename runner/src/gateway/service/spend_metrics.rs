//! What the model turns this replica recorded cost, as Prometheus counters by tenant, agent and
//! model: turns, tokens by kind, and spend by currency; and what the priced tool calls it
//! carried out cost, by tenant, agent and tool. Served on the gateway's metrics listener
//! (never on the port runner pods reach: one tenant must not read another's spend). Each
//! replica counts its own turns; Prometheus sums the replicas.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
    registry::Registry,
};

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
    /// Tokens paid for that no recorded turn holds (`model_spend` entries).
    unanswered_tokens: u64,
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

/// The replica's spend counters, and the registry that encodes them.
#[derive(Debug)]
pub struct SpendMetrics {
    ledger: Arc<Ledger>,
    registry: Registry,
}

impl Default for SpendMetrics {
    fn default() -> Self {
        let ledger = Arc::new(Ledger::default());
        let mut registry = Registry::with_prefix("contextos");
        registry.register_collector(Box::new(ledger.clone()));
        Self { ledger, registry }
    }
}

/// What the replica counted. Kept as exact integers (money in nano-units) and encoded at each
/// scrape: the series are the tenants' names, bounded here, not families fixed in advance.
#[derive(Debug, Default)]
struct Ledger {
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
/// Series one tenant's names may take of them: one tenant naming agents and models by the
/// thousand runs into its own bound, not everyone's.
const MAX_SERIES_PER_TENANT: usize = 1_000;

/// Whether a new series may be added to `series` for the tenant of `first` (the least key
/// of that tenant: keys order by tenant first), or its names are counted as `(other)`.
fn room_for<K: Ord, V>(series: &BTreeMap<K, V>, first: &K, tenant_of: impl Fn(&K) -> &str) -> bool {
    let tenant = tenant_of(first);
    series.len() < MAX_SERIES
        && series
            .range(first..)
            .take_while(|(k, _)| tenant_of(k) == tenant)
            .take(MAX_SERIES_PER_TENANT)
            .count()
            < MAX_SERIES_PER_TENANT
}

impl SpendMetrics {
    /// Counts a recorded turn of `tenant`'s `agent` with `model`, and what it cost.
    pub fn record(&self, tenant: &str, agent: &str, model: &str, turn: &ModelTurn, cost: Option<&TurnCost>) {
        self.count(tenant, agent, model, cost, |c| {
            c.turns += 1;
            c.prompt_tokens = c.prompt_tokens.saturating_add(turn.prompt_tokens);
            c.cached_prompt_tokens = c.cached_prompt_tokens.saturating_add(turn.cached_prompt_tokens);
            c.completion_tokens = c.completion_tokens.saturating_add(turn.completion_tokens);
        });
    }

    /// Counts `tokens` of `model` that `tenant`'s `agent` paid for and no recorded turn holds (a
    /// recorded `model_spend` entry), and what they cost.
    pub fn record_unanswered(
        &self,
        tenant: &str,
        agent: &str,
        model: &str,
        tokens: u64,
        cost: Option<&TurnCost>,
    ) {
        self.count(tenant, agent, model, cost, |c| {
            c.unanswered_tokens = c.unanswered_tokens.saturating_add(tokens);
        });
    }

    fn count(
        &self,
        tenant: &str,
        agent: &str,
        model: &str,
        cost: Option<&TurnCost>,
        add: impl FnOnce(&mut Counters),
    ) {
        let key = Key {
            tenant: tenant.to_owned(),
            agent: agent.to_owned(),
            model: model.to_owned(),
        };
        let mut counters = self.ledger.counters.lock().unwrap_or_else(|e| e.into_inner());
        let key = if counters.contains_key(&key)
            || room_for(
                &counters,
                &Key {
                    tenant: tenant.to_owned(),
                    agent: String::new(),
                    model: String::new(),
                },
                |k| k.tenant.as_str(),
            ) {
            key
        } else {
            Key {
                agent: "(other)".into(),
                model: "(other)".into(),
                ..key
            }
        };
        let c = counters.entry(key).or_default();
        add(c);
        if let Some(cost) = cost {
            let sum = c.cost.entry(cost.currency.clone()).or_default();
            *sum = sum.saturating_add(cost.nanos.0);
        }
    }

    /// Counts a priced call of `tenant`'s `agent` to `tool` that was carried out, and its cost.
    pub fn record_tool_call(&self, tenant: &str, agent: &str, tool: &str, cost: &TurnCost) {
        let mut tools = self.ledger.tools.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = (tenant.to_owned(), agent.to_owned(), tool.to_owned());
        if !tools.contains_key(&key)
            && !room_for(&tools, &(tenant.to_owned(), String::new(), String::new()), |k| {
                k.0.as_str()
            })
        {
            key = (tenant.to_owned(), "(other)".into(), "(other)".into());
        }
        let c = tools.entry(key).or_default();
        c.calls = c.calls.saturating_add(1);
        let sum = c.cost.entry(cost.currency.clone()).or_default();
        *sum = sum.saturating_add(cost.nanos.0);
    }

    /// Counts the model tokens a replay gate of `tenant` spent re-executing its runs.
    pub fn record_gate(&self, tenant: &str, tokens: u64) {
        let mut gates = self.ledger.gate_tokens.lock().unwrap_or_else(|e| e.into_inner());
        let sum = gates.entry(tenant.to_owned()).or_default();
        *sum = sum.saturating_add(tokens);
    }

    /// Counts what a turn a replay gate of `tenant` re-executed cost, at its run's price.
    pub fn record_gate_spend(&self, tenant: &str, cost: &TurnCost) {
        let mut spend = self.ledger.gate_spend.lock().unwrap_or_else(|e| e.into_inner());
        let sum = spend
            .entry((tenant.to_owned(), cost.currency.clone()))
            .or_default();
        *sum = sum.saturating_add(cost.nanos.0);
    }

    /// The OpenMetrics text of the spend families (without the closing `# EOF`: the metrics
    /// listener appends the gateway's own families first).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        out
    }
}

/// Money in units of its currency, from nano-units (a float, as every sample value is).
fn money(nanos: u64) -> f64 {
    // Whole units and the nanos apart, so that amounts below 2^53 nano-units stay exact.
    (nanos / 1_000_000_000) as f64 + (nanos % 1_000_000_000) as f64 / 1e9
}

type Labels = Vec<(&'static str, String)>;

/// One counter family: its samples by label set.
fn family<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> Result<(), std::fmt::Error>
where
    ConstCounter<V>: prometheus_client::encoding::EncodeMetric,
{
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Ledger {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let gates = self.gate_tokens.lock().unwrap_or_else(|e| e.into_inner());
            family(
                &mut encoder,
                "gate_model_tokens",
                "Model tokens replay gates spent re-executing recorded runs.",
                gates
                    .iter()
                    .map(|(tenant, tokens)| (vec![("tenant", tenant.clone())], *tokens)),
            )?;
            let spend = self.gate_spend.lock().unwrap_or_else(|e| e.into_inner());
            family(
                &mut encoder,
                "gate_model_spend",
                "What the model turns replay gates re-executed cost, in units of the currency, at the prices the runs pinned.",
                spend.iter().map(|((tenant, currency), nanos)| {
                    (
                        vec![("tenant", tenant.clone()), ("currency", currency.clone())],
                        money(*nanos),
                    )
                }),
            )?;
        }
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let labels = |k: &Key| -> Labels {
            vec![
                ("tenant", k.tenant.clone()),
                ("agent", k.agent.clone()),
                ("model", k.model.clone()),
            ]
        };
        family(
            &mut encoder,
            "model_turns",
            "Model turns the gateway asked for and recorded.",
            counters.iter().map(|(k, c)| (labels(k), c.turns)),
        )?;
        family(
            &mut encoder,
            "model_tokens",
            "Model tokens of the recorded turns, by kind (prompt includes cached_prompt), and tokens paid for that no recorded turn holds (unanswered: answers dropped, models cut off).",
            counters.iter().flat_map(|(k, c)| {
                [
                    ("prompt", c.prompt_tokens),
                    ("cached_prompt", c.cached_prompt_tokens),
                    ("completion", c.completion_tokens),
                    ("unanswered", c.unanswered_tokens),
                ]
                .map(|(kind, n)| {
                    let mut labels = labels(k);
                    labels.push(("kind", kind.to_owned()));
                    (labels, n)
                })
            }),
        )?;
        family(
            &mut encoder,
            "model_spend",
            "What the recorded turns and unanswered tokens cost, in units of the currency, at the prices their runs pinned.",
            counters.iter().flat_map(|(k, c)| {
                c.cost.iter().map(move |(currency, nanos)| {
                    let mut labels = labels(k);
                    labels.push(("currency", currency.clone()));
                    (labels, money(*nanos))
                })
            }),
        )?;
        drop(counters);
        let tools = self.tools.lock().unwrap_or_else(|e| e.into_inner());
        let labels = |(tenant, agent, tool): &ToolKey| -> Labels {
            vec![
                ("tenant", tenant.clone()),
                ("agent", agent.clone()),
                ("tool", tool.clone()),
            ]
        };
        family(
            &mut encoder,
            "priced_tool_calls",
            "Calls to priced tools the gateway carried out.",
            tools.iter().map(|(k, c)| (labels(k), c.calls)),
        )?;
        family(
            &mut encoder,
            "tool_spend",
            "What the priced tool calls cost, in units of the currency, at the prices their runs pinned.",
            tools.iter().flat_map(|(k, c)| {
                c.cost.iter().map(move |(currency, nanos)| {
                    let mut labels = labels(k);
                    labels.push(("currency", currency.clone()));
                    (labels, money(*nanos))
                })
            }),
        )
    }
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
        // Tokens paid for that no turn holds: a kind of their own, their cost in the model's.
        metrics.record_unanswered("shop", "oncall", "gpt", 600, Some(&usd(3_000_000)));
        let text = metrics.render();
        for line in [
            "contextos_model_turns_total{tenant=\"shop\",agent=\"oncall\",model=\"gpt\"} 2",
            "contextos_model_tokens_total{tenant=\"shop\",agent=\"oncall\",model=\"gpt\",kind=\"unanswered\"} 600",
            "contextos_model_spend_total{tenant=\"shop\",agent=\"oncall\",model=\"gpt\",currency=\"USD\"} 0.005",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
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
        for i in 0..MAX_SERIES_PER_TENANT + 5 {
            metrics.record("shop", "a", &format!("model-{i}"), &turn, None);
        }
        let text = metrics.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("contextos_model_turns_total{"))
            .count();
        assert_eq!(series, MAX_SERIES_PER_TENANT + 1);
        assert!(text.lines().any(
            |l| l == "contextos_model_turns_total{tenant=\"shop\",agent=\"(other)\",model=\"(other)\"} 5"
        ));
        // Another tenant's names are still its own: one tenant fills its bound only.
        metrics.record("bank", "teller", "m", &turn, None);
        assert!(
            metrics
                .render()
                .lines()
                .any(|l| l == "contextos_model_turns_total{tenant=\"bank\",agent=\"teller\",model=\"m\"} 1")
        );
    }
}
