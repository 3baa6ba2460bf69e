//! Spend over a window, read from the records: each model turn's tokens and the cost recorded
//! with it, and each priced tool call's cost, summed by agent, model, tool or a Session label
//! (a team), per currency. Turns recorded without a price (no PriceList then, or a scripted
//! model) are counted as unpriced tokens. A tool call answered again from the record (asked
//! again after a crash) records no second cost, so each priced result counts once, as the
//! quotas count it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    pricing::Nanos,
    records::{EntryBody, RecordEntry},
};

/// What spend is summed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum By {
    Agent,
    /// The model of each turn; priced tool calls as [`TOOL_CALLS`].
    Model,
    /// The tool of each priced call; model turns as [`MODEL_TURNS`].
    Tool,
    /// A Session label's value (`team`, `environment`, …); runs without it are `(none)`.
    Label(String),
}

impl By {
    /// `agent`, `model`, `tool` or `label=<key>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "agent" => Ok(Self::Agent),
            "model" => Ok(Self::Model),
            "tool" => Ok(Self::Tool),
            _ => match text.strip_prefix("label=") {
                Some(key) if !key.is_empty() => Ok(Self::Label(key.to_owned())),
                _ => Err(format!(
                    "--by {text:?}: say agent, model, tool or label=<key> (e.g. label=team)"
                )),
            },
        }
    }

    fn name(&self) -> String {
        match self {
            Self::Agent => "agent".into(),
            Self::Model => "model".into(),
            Self::Tool => "tool".into(),
            Self::Label(key) => format!("label {key}"),
        }
    }
}

/// The group of priced tool calls when spend is summed by model.
pub const TOOL_CALLS: &str = "(tool calls)";
/// The group of model turns when spend is summed by tool.
pub const MODEL_TURNS: &str = "(model turns)";

/// The spend of one group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spend {
    pub runs: u64,
    pub turns: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Calls to priced tools that were carried out.
    pub priced_tool_calls: u64,
    /// By currency, in nano-units (10⁻⁹ of the currency): turns and priced tool calls.
    #[serde(rename = "costNanos")]
    pub cost: BTreeMap<String, Nanos>,
    /// Tokens of turns recorded without a price.
    pub unpriced_tokens: u64,
    /// Tokens models were paid for that no turn on record holds (answers dropped, models cut
    /// off after they were asked); their cost is in `cost`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unanswered_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Spend {
    fn add(&mut self, other: &Self) {
        // Counts come from what endpoints reported: they saturate, never wrap.
        self.runs = self.runs.saturating_add(other.runs);
        self.turns = self.turns.saturating_add(other.turns);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.cached_prompt_tokens = self
            .cached_prompt_tokens
            .saturating_add(other.cached_prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.priced_tool_calls = self.priced_tool_calls.saturating_add(other.priced_tool_calls);
        self.unpriced_tokens = self.unpriced_tokens.saturating_add(other.unpriced_tokens);
        self.unanswered_tokens = self.unanswered_tokens.saturating_add(other.unanswered_tokens);
        for (currency, amount) in &other.cost {
            let sum = self.cost.entry(currency.clone()).or_default();
            *sum = *sum + *amount;
        }
    }

    fn cost_text(&self) -> String {
        if self.cost.is_empty() {
            return "—".into();
        }
        self.cost
            .iter()
            .map(|(currency, amount)| format!("{amount} {currency}"))
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

/// A tenant's spend over a window.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub tenant: String,
    pub since: String,
    pub by: String,
    pub groups: BTreeMap<String, Spend>,
    pub total: Spend,
    /// The window held more runs than were read (the newest were).
    pub truncated: bool,
    /// Runs are in the window by when they started; a run's turns all count with it.
    pub windowed_by: &'static str,
}

impl Report {
    pub fn new(tenant: &str, since: &str, by: &By) -> Self {
        Self {
            tenant: tenant.to_owned(),
            since: since.to_owned(),
            by: by.name(),
            groups: BTreeMap::new(),
            total: Spend::default(),
            truncated: false,
            windowed_by: "run start",
        }
    }

    /// Adds one run of `agent` (its Session's `labels`), grouped `by`.
    pub fn add_run(
        &mut self,
        by: &By,
        agent: &str,
        labels: &BTreeMap<String, String>,
        entries: &[RecordEntry],
    ) {
        let mut per_group: BTreeMap<String, Spend> = BTreeMap::new();
        let run_group = || match by {
            By::Label(key) => labels.get(key).cloned().unwrap_or_else(|| "(none)".into()),
            _ => agent.to_owned(),
        };
        // Model turns and what models were paid for beyond them: by model, or one group.
        let model_group = |model: &str| match by {
            By::Model => model.to_owned(),
            By::Tool => MODEL_TURNS.to_owned(),
            _ => run_group(),
        };
        let priced = |cost: &Option<crate::pricing::TurnCost>| -> BTreeMap<String, Nanos> {
            cost.iter().map(|c| (c.currency.clone(), c.nanos)).collect()
        };
        // The tool of each call, by call id.
        let mut calls: BTreeMap<&str, &str> = BTreeMap::new();
        for entry in entries {
            let (group, spend) = match &entry.body {
                EntryBody::ToolCallRequested(call) => {
                    calls.insert(&call.call_id, &call.tool);
                    continue;
                }
                // A call is charged once: on its result, or on the first question its remote
                // agent asked (then its result costs nothing more).
                EntryBody::ToolResult(crate::records::entry::ToolResultRecord {
                    call_id,
                    cost: Some(cost),
                    cached: None,
                    ..
                })
                | EntryBody::RemoteInputRequired {
                    call_id,
                    cost: Some(cost),
                    ..
                } => {
                    let tool = calls.get(call_id.as_str()).copied().unwrap_or("(unknown)");
                    let group = match by {
                        By::Model => TOOL_CALLS.to_owned(),
                        By::Tool => tool.to_owned(),
                        _ => run_group(),
                    };
                    let call = Spend {
                        priced_tool_calls: 1,
                        cost: BTreeMap::from([(cost.currency.clone(), cost.nanos)]),
                        ..Spend::default()
                    };
                    (group, call)
                }
                EntryBody::ModelTurn {
                    model,
                    prompt_tokens,
                    completion_tokens,
                    cached_prompt_tokens,
                    cost,
                    ..
                } => {
                    let turn = Spend {
                        turns: 1,
                        prompt_tokens: *prompt_tokens,
                        cached_prompt_tokens: *cached_prompt_tokens,
                        completion_tokens: *completion_tokens,
                        cost: priced(cost),
                        unpriced_tokens: match cost {
                            Some(_) => 0,
                            None => prompt_tokens.saturating_add(*completion_tokens),
                        },
                        ..Spend::default()
                    };
                    (model_group(model), turn)
                }
                EntryBody::ModelSpend {
                    model, tokens, cost, ..
                } => {
                    let paid = Spend {
                        unanswered_tokens: *tokens,
                        cost: priced(cost),
                        ..Spend::default()
                    };
                    (model_group(model), paid)
                }
                _ => continue,
            };
            per_group.entry(group).or_default().add(&spend);
        }
        if !per_group.is_empty() {
            self.total.runs += 1;
        }
        for (key, mut spend) in per_group {
            spend.runs = 1;
            self.total.add(&Spend {
                runs: 0,
                ..spend.clone()
            });
            self.groups.entry(key).or_default().add(&spend);
        }
    }

    /// The report as a person reads it.
    pub fn text(&self) -> String {
        let mut out = format!(
            "spend of namespace {} in the last {}, by {}\n",
            self.tenant, self.since, self.by
        );
        let mut rows = vec![[
            self.by.clone(),
            "runs".into(),
            "turns".into(),
            "prompt".into(),
            "cached".into(),
            "completion".into(),
            "unpriced".into(),
            "tool calls".into(),
            "cost".into(),
        ]];
        let row = |name: &str, s: &Spend| {
            [
                name.to_owned(),
                s.runs.to_string(),
                s.turns.to_string(),
                s.prompt_tokens.to_string(),
                s.cached_prompt_tokens.to_string(),
                s.completion_tokens.to_string(),
                s.unpriced_tokens.to_string(),
                s.priced_tool_calls.to_string(),
                s.cost_text(),
            ]
        };
        rows.extend(self.groups.iter().map(|(name, s)| row(name, s)));
        rows.push(row("total", &self.total));
        let widths: Vec<usize> = (0..9)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, w))| {
                    if i == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        if self.total.unpriced_tokens > 0 {
            out.push_str("unpriced: tokens of turns recorded without a price (no PriceList then, or a scripted model no list prices)\n");
        }
        if self.total.unanswered_tokens > 0 {
            out.push_str(&format!(
                "unanswered: {} tokens models were paid for that no turn on record holds (an answer dropped because another gateway replica recorded the step first, or a model cut off after it was asked); their cost is in the cost column\n",
                self.total.unanswered_tokens
            ));
        }
        if self.total.priced_tool_calls > 0 {
            out.push_str("tool calls: calls to tools a PriceList prices per call, carried out (their cost is in the cost column)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pricing::TurnCost, records::entry::UnansweredSpend};

    fn entry(seq: u64, body: EntryBody) -> RecordEntry {
        RecordEntry {
            run_id: "run-1".into(),
            seq,
            prev: None,
            at_ms: 0,
            body,
            vaulted: None,
        }
    }

    fn usd(nanos: u64) -> Option<TurnCost> {
        Some(TurnCost {
            currency: "USD".into(),
            nanos: Nanos(nanos),
        })
    }

    #[test]
    fn tokens_paid_for_that_no_turn_holds_are_spend_of_their_model() {
        let entries = [
            entry(
                0,
                EntryBody::ModelSpend {
                    step: 1,
                    model: "gpt-x".into(),
                    tokens: 900,
                    reason: UnansweredSpend::CutOff,
                    cost: usd(4_000),
                },
            ),
            entry(
                1,
                EntryBody::ModelTurn {
                    step: 1,
                    model: "gpt-x".into(),
                    response: serde_json::json!({"content": "ok"}),
                    prompt_tokens: 100,
                    completion_tokens: 20,
                    cached_prompt_tokens: 0,
                    cost: usd(600),
                },
            ),
        ];
        let mut report = Report::new("shop", "1d", &By::Model);
        report.add_run(&By::Model, "sre", &BTreeMap::new(), &entries);
        let spend = &report.groups["gpt-x"];
        assert_eq!(
            (spend.turns, spend.prompt_tokens, spend.unanswered_tokens),
            (1, 100, 900)
        );
        assert_eq!(spend.cost["USD"], Nanos(4_600), "both paid for");
        assert_eq!(report.total.unanswered_tokens, 900);
        assert!(
            report.text().contains("unanswered: 900 tokens"),
            "{}",
            report.text()
        );
    }
}
