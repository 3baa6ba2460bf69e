//! Which of an Agent's models answers a step: the route chosen by its routing rules (pure,
//! [`choose`]), the fallback order, per-model circuit breakers, and [`Models`] — the run's
//! models, asked in that order. The route of each turn is recorded with it ([`Route`]), so a
//! replay reads the same routes and a candidate routing policy can be judged against them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use contextos_crds::{
    common::ToolRisk,
    model_routing::{ModelRouting, PRIMARY, RouteRule, StepKind},
};
use serde::{Deserialize, Serialize};

use super::{Model, ModelError, ModelRequest, ModelTurn};

/// What routing looks at for a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteFacts {
    pub step: u32,
    pub max_steps: u32,
    /// The riskiest tool the run has called before this step.
    pub riskiest_called: Option<ToolRisk>,
    pub tokens_used: u64,
    pub max_tokens: u64,
}

impl RouteFacts {
    /// The kind of the step: its last allowed one answers, its first plans, the rest act.
    pub fn step_kind(&self) -> StepKind {
        if self.step >= self.max_steps {
            StepKind::Answer
        } else if self.step <= 1 {
            StepKind::Plan
        } else {
            StepKind::Act
        }
    }

    /// The percentage of the token budget left, rounded down.
    fn budget_left_percent(&self) -> u64 {
        if self.max_tokens == 0 {
            return 0;
        }
        u64::try_from(
            u128::from(self.max_tokens.saturating_sub(self.tokens_used)) * 100 / u128::from(self.max_tokens),
        )
        .unwrap_or(0)
    }
}

/// A model that failed a turn, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub model: String,
    pub error: String,
    /// The request may have been worked on (cut off, or answered unreadably): it may have
    /// cost.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub may_have_cost: bool,
}

/// How a turn was routed: the model the rules chose and why, the models that failed before one
/// answered (fallback), and the one that answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub chosen: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<Failed>,
    pub answered_by: String,
}

fn matches(rule: &RouteRule, facts: &RouteFacts) -> bool {
    rule.step_kind.is_none_or(|kind| kind == facts.step_kind())
        && rule
            .risk_at_least
            .is_none_or(|risk| facts.riskiest_called.is_some_and(|called| called >= risk))
        && rule
            .budget_left_below_percent
            .is_none_or(|below| facts.budget_left_percent() < u64::from(below))
}

/// The model `routing` chooses for a step with `facts`, and why (pure).
pub fn choose(routing: &ModelRouting, facts: &RouteFacts) -> (String, String) {
    for (i, rule) in routing.rules.iter().enumerate() {
        if matches(rule, facts) {
            let mut why = Vec::new();
            if let Some(kind) = rule.step_kind {
                why.push(format!("step kind {}", kind.as_str()));
            }
            if let Some(risk) = rule.risk_at_least {
                why.push(format!("a {} tool was called", risk.as_str()));
            }
            if let Some(below) = rule.budget_left_below_percent {
                why.push(format!(
                    "{} % of the token budget left, below {below} %",
                    facts.budget_left_percent()
                ));
            }
            let why = if why.is_empty() {
                "always".to_owned()
            } else {
                why.join(", ")
            };
            return (rule.use_.clone(), format!("routing.rules[{i}]: {why}"));
        }
    }
    (PRIMARY.to_owned(), "no routing rule matched".to_owned())
}

/// `chosen`, then the fallback models in order, each once.
pub fn order(routing: &ModelRouting, chosen: &str) -> Vec<String> {
    let mut order = vec![chosen.to_owned()];
    for name in &routing.fallback {
        if !order.contains(name) {
            order.push(name.clone());
        }
    }
    order
}

/// Whether a model's error is the provider failing (worth the next model) rather than the run's
/// own doing (a script run out, a budget spent).
fn provider_failed(error: &ModelError) -> bool {
    matches!(
        error,
        ModelError::Unreachable { .. }
            | ModelError::Interrupted { .. }
            | ModelError::Status { .. }
            | ModelError::Malformed { .. }
    )
}

/// Per-model circuit breakers: consecutive failures, and until when a model is skipped.
#[derive(Debug, Default)]
struct Breakers(Mutex<HashMap<String, (u32, Option<Instant>)>>);

impl Breakers {
    fn open_for(&self, model: &str, now: Instant) -> Option<Duration> {
        let breakers = self.0.lock().ok()?;
        let (_, until) = breakers.get(model)?;
        until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    fn failed(&self, model: &str, failures: u32, open: Duration, now: Instant) {
        if let Ok(mut breakers) = self.0.lock() {
            let entry = breakers.entry(model.to_owned()).or_default();
            entry.0 = entry.0.saturating_add(1);
            if entry.0 >= failures {
                entry.1 = Some(now + open);
                entry.0 = 0;
            }
        }
    }

    fn succeeded(&self, model: &str) {
        if let Ok(mut breakers) = self.0.lock() {
            breakers.remove(model);
        }
    }
}

/// A run's models: the Agent's own, and those its routing names.
#[derive(Debug)]
pub struct Models {
    primary: Model,
    routed: Option<Routed>,
}

#[derive(Debug)]
struct Routed {
    routing: ModelRouting,
    /// By name (`primary` is [`Models::primary`]), with each one's model name and output cap.
    models: BTreeMap<String, (Model, String, Option<u32>)>,
    breakers: Breakers,
}

impl Models {
    /// Only the Agent's model.
    pub fn single(primary: Model) -> Self {
        Self {
            primary,
            routed: None,
        }
    }

    /// The Agent's model and, by name, those `routing` names (`(model, its name at the
    /// endpoint, its output cap)`).
    pub fn routed(
        primary: Model,
        routing: ModelRouting,
        models: BTreeMap<String, (Model, String, Option<u32>)>,
    ) -> Self {
        Self {
            primary,
            routed: Some(Routed {
                routing,
                models,
                breakers: Breakers::default(),
            }),
        }
    }

    /// The Agent's own model.
    pub fn primary(&self) -> &Model {
        &self.primary
    }

    /// The models `bundle`'s Agent names, each passed through `govern` (the gateway service
    /// confines endpoints to its egress rules), with API keys from `secrets`.
    pub fn for_bundle(
        bundle: &crate::run::bundle::RunBundle,
        secrets: &BTreeMap<String, String>,
        govern: impl Fn(Model, &contextos_crds::agent::ModelSpec) -> Result<Model, String>,
    ) -> Result<Self, String> {
        let primary = govern(Model::for_bundle(bundle, secrets)?, &bundle.agent_spec.model)?;
        let Some(routing) = &bundle.agent_spec.routing else {
            return Ok(Self::single(primary));
        };
        let mut models = BTreeMap::new();
        for (i, routed) in routing.models.iter().enumerate() {
            let field = format!("spec.routing.models[{i}].model");
            let named = super::Named {
                agent: &bundle.agent,
                field: &field,
                spec: &routed.model,
                script: bundle.routed_scripts.get(&routed.name).map(String::as_str),
            };
            let model = govern(Model::for_spec(&named, secrets)?, &routed.model)?;
            models.insert(
                routed.name.clone(),
                (model, routed.model.model.clone(), routed.model.max_output_tokens),
            );
        }
        Ok(Self::routed(primary, routing.clone(), models))
    }

    /// Whether steps are routed.
    pub fn is_routed(&self) -> bool {
        self.routed.is_some()
    }

    /// One turn for `request` (asked of the primary as the Agent names it), from the model the
    /// routing chooses with `facts` — or, when that one fails, the next of its fallback — with
    /// how it was routed in [`ModelTurn::route`] (none without routing). An error after every
    /// model failed carries the route too.
    pub async fn complete(
        &self,
        request: &ModelRequest,
        step: u32,
        facts: &RouteFacts,
    ) -> Result<ModelTurn, (ModelError, Option<Route>)> {
        let Some(routed) = &self.routed else {
            return self.primary.complete(request, step).await.map_err(|e| (e, None));
        };
        let (chosen, reason) = choose(&routed.routing, facts);
        let mut route = Route {
            chosen: chosen.clone(),
            reason,
            failed: Vec::new(),
            answered_by: String::new(),
        };
        let breaker = routed.routing.breaker;
        let mut last_error = None;
        for name in order(&routed.routing, &chosen) {
            let now = Instant::now();
            if let Some(left) = routed.breakers.open_for(&name, now) {
                route.failed.push(Failed {
                    model: name,
                    error: format!("its breaker is open for {} s more", left.as_secs().max(1)),
                    may_have_cost: false,
                });
                continue;
            }
            let (model, asked) = if name == PRIMARY {
                (&self.primary, request.clone())
            } else {
                let Some((model, model_name, cap)) = routed.models.get(&name) else {
                    route.failed.push(Failed {
                        model: name,
                        error: "not among the run's models".into(),
                        may_have_cost: false,
                    });
                    continue;
                };
                let mut asked = request.clone();
                asked.model = model_name.clone();
                asked.max_output_tokens = match (asked.max_output_tokens, *cap) {
                    (Some(left), Some(cap)) => Some(left.min(cap)),
                    (left, cap) => left.or(cap),
                };
                (model, asked)
            };
            match model.complete(&asked, step).await {
                Ok(mut turn) => {
                    routed.breakers.succeeded(&name);
                    route.answered_by = name;
                    turn.route = Some(route);
                    return Ok(turn);
                }
                Err(error) if provider_failed(&error) => {
                    routed.breakers.failed(
                        &name,
                        breaker.failures,
                        Duration::from_secs(u64::from(breaker.open_seconds)),
                        Instant::now(),
                    );
                    route.failed.push(Failed {
                        model: name,
                        error: error.to_string(),
                        may_have_cost: error.may_have_cost(),
                    });
                    last_error = Some(error);
                }
                Err(error) => return Err((error, Some(route))),
            }
        }
        let error = last_error.unwrap_or_else(|| ModelError::Unreachable {
            endpoint: "every routed model".into(),
            detail: "every model's breaker is open".into(),
        });
        Err((error, Some(route)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(yaml: &str) -> ModelRouting {
        serde_yaml::from_str(yaml).expect("routing")
    }

    fn facts(step: u32, riskiest: Option<ToolRisk>, used: u64) -> RouteFacts {
        RouteFacts {
            step,
            max_steps: 10,
            riskiest_called: riskiest,
            tokens_used: used,
            max_tokens: 1_000,
        }
    }

    const POLICY: &str = "models:\n- name: cheap\n  model: {provider: scripted, model: m, scriptRef: {name: s, key: k}}\n- name: careful\n  model: {provider: scripted, model: n, scriptRef: {name: s, key: k}}\nrules:\n- use: careful\n  riskAtLeast: destructive\n- use: cheap\n  budgetLeftBelowPercent: 20\n- use: cheap\n  stepKind: answer\nfallback: [cheap, primary]\n";

    #[test]
    fn the_first_matching_rule_chooses_and_says_why() {
        let routing = routing(POLICY);
        assert_eq!(
            choose(&routing, &facts(3, Some(ToolRisk::Destructive), 0)),
            (
                "careful".to_owned(),
                "routing.rules[0]: a destructive tool was called".to_owned()
            )
        );
        assert_eq!(
            choose(&routing, &facts(3, Some(ToolRisk::Network), 850)),
            (
                "cheap".to_owned(),
                "routing.rules[1]: 15 % of the token budget left, below 20 %".to_owned()
            )
        );
        assert_eq!(choose(&routing, &facts(10, None, 0)).0, "cheap");
        assert_eq!(
            choose(&routing, &facts(2, None, 0)),
            ("primary".to_owned(), "no routing rule matched".to_owned())
        );
        assert_eq!(facts(1, None, 0).step_kind(), StepKind::Plan);
        assert_eq!(facts(4, None, 0).step_kind(), StepKind::Act);
    }

    #[test]
    fn fallback_follows_the_chosen_model_each_once() {
        let routing = routing(POLICY);
        assert_eq!(order(&routing, "careful"), ["careful", "cheap", "primary"]);
        assert_eq!(order(&routing, "cheap"), ["cheap", "primary"]);
    }

    #[test]
    fn a_breaker_opens_after_failures_in_a_row_and_closes_on_success() {
        let breakers = Breakers::default();
        let now = Instant::now();
        let open = Duration::from_secs(60);
        breakers.failed("a", 2, open, now);
        assert_eq!(breakers.open_for("a", now), None);
        breakers.failed("a", 2, open, now);
        assert!(breakers.open_for("a", now).is_some());
        assert_eq!(
            breakers.open_for("a", now + open),
            None,
            "closed once its time is up"
        );
        breakers.succeeded("a");
        breakers.failed("a", 2, open, now);
        assert_eq!(
            breakers.open_for("a", now),
            None,
            "a success starts the count again"
        );
    }
}
