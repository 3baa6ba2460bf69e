//! What a candidate's model routing would change in a recorded run (pure): each recorded turn
//! routed again with the candidate's rules and the facts the run had at that step, the turns
//! it would send to another model than answered them, and the run's cost at the candidate's
//! prices for the same tokens. The cost is an estimate — another model would have answered
//! otherwise, in other words — which is what a routing change is judged on before promotion,
//! beside the decisions the replay compares.

use std::collections::BTreeMap;

use contextos_crds::model_routing::PRIMARY;
use serde::{Deserialize, Serialize};

use super::bundle::RunBundle;
use crate::{
    model::{
        ModelTurn,
        routing::{RouteFacts, choose},
    },
    pricing::PinnedPrice,
    records::{EntryBody, RecordEntry},
};

/// A candidate routing's effect on recorded runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingEffect {
    /// Model turns looked at.
    pub turns: u32,
    /// Turns the candidate would send to another model than the one that answered them.
    pub rerouted: u32,
    /// What the turns cost as recorded, and at the candidate's prices, by currency (nano-units).
    pub recorded_nanos: BTreeMap<String, u64>,
    pub candidate_nanos: BTreeMap<String, u64>,
    /// Turns that cannot be priced on one side (a model no price was found for).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unpriced_turns: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl RoutingEffect {
    /// One line for a person: turns moved, and the cost before and after per currency.
    pub fn line(&self) -> String {
        let money = |nanos: &BTreeMap<String, u64>| {
            if nanos.is_empty() {
                return "unpriced".to_owned();
            }
            nanos
                .iter()
                .map(|(currency, n)| format!("{} {currency}", crate::pricing::Nanos(*n)))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        let unpriced = if self.unpriced_turns > 0 {
            format!("; {} turn(s) unpriced, left out", self.unpriced_turns)
        } else {
            String::new()
        };
        format!(
            "model routing: {} of {} turn(s) to another model; cost as recorded {} → {} at the candidate's prices for the same tokens{unpriced}",
            self.rerouted,
            self.turns,
            money(&self.recorded_nanos),
            money(&self.candidate_nanos)
        )
    }

    /// Adds another run's effect.
    pub fn add(&mut self, other: &Self) {
        self.turns += other.turns;
        self.rerouted += other.rerouted;
        self.unpriced_turns += other.unpriced_turns;
        for (currency, nanos) in &other.recorded_nanos {
            *self.recorded_nanos.entry(currency.clone()).or_default() += nanos;
        }
        for (currency, nanos) in &other.candidate_nanos {
            *self.candidate_nanos.entry(currency.clone()).or_default() += nanos;
        }
    }
}

/// The effect of `candidate`'s routing on the run recorded as `entries`, pricing the
/// candidate's models (by routing name, `primary` included) with `price`. None when neither
/// the run nor the candidate routes.
pub fn routing_effect(
    entries: &[RecordEntry],
    candidate: &RunBundle,
    price: &dyn Fn(&str) -> Option<PinnedPrice>,
) -> Option<RoutingEffect> {
    let turns: Vec<(u32, String, ModelTurn, Option<crate::pricing::TurnCost>)> = entries
        .iter()
        .filter_map(|e| match &e.body {
            EntryBody::ModelTurn {
                step,
                model,
                response,
                cost,
                ..
            } => serde_json::from_value::<ModelTurn>(response.clone())
                .ok()
                .map(|turn| (*step, model.clone(), turn, cost.clone())),
            _ => None,
        })
        .collect();
    let routed_before = turns.iter().any(|(_, _, t, _)| t.route.is_some());
    if candidate.agent_spec.routing.is_none() && !routed_before {
        return None;
    }
    let budget = &candidate.agent_spec.budget;
    let mut effect = RoutingEffect::default();
    let mut tokens_used = 0u64;
    for (step, model, turn, cost) in turns {
        // What the run had asked for before this step.
        let riskiest_called = entries
            .iter()
            .take_while(|e| !matches!(&e.body, EntryBody::ModelTurn { step: s, .. } if *s == step))
            .filter_map(|e| match &e.body {
                EntryBody::ToolCallRequested(call) => Some(call.risk),
                _ => None,
            })
            .max();
        // Tokens paid for that no turn holds, recorded before this step's turn, had counted
        // as the gateway's budget counts them (the models cut off before the turn answered
        // are recorded after it).
        let unanswered: u64 = entries
            .iter()
            .take_while(|e| !matches!(&e.body, EntryBody::ModelTurn { step: s, .. } if *s == step))
            .filter_map(|e| match &e.body {
                EntryBody::ModelSpend { tokens, .. } => Some(*tokens),
                _ => None,
            })
            .fold(0u64, u64::saturating_add);
        let facts = RouteFacts {
            step,
            max_steps: budget.max_steps,
            riskiest_called,
            tokens_used: tokens_used.saturating_add(unanswered),
            max_tokens: budget.max_tokens,
        };
        tokens_used = tokens_used.saturating_add(turn.prompt_tokens.saturating_add(turn.completion_tokens));
        let chosen = match &candidate.agent_spec.routing {
            Some(routing) => choose(routing, &facts).0,
            None => PRIMARY.to_owned(),
        };
        let chosen_model = candidate
            .agent_spec
            .routing
            .as_ref()
            .and_then(|r| r.model(&candidate.agent_spec.model, &chosen))
            .unwrap_or(&candidate.agent_spec.model);
        effect.turns += 1;
        if chosen_model.model != model {
            effect.rerouted += 1;
        }
        let again = price(&chosen).map(|p| {
            p.cost(
                turn.prompt_tokens,
                turn.cached_prompt_tokens,
                turn.completion_tokens,
            )
        });
        match (cost, again) {
            (Some(recorded), Some(again)) => {
                *effect.recorded_nanos.entry(recorded.currency).or_default() += recorded.nanos.0;
                *effect.candidate_nanos.entry(again.currency).or_default() += again.nanos.0;
            }
            _ => effect.unpriced_turns += 1,
        }
    }
    Some(effect)
}
