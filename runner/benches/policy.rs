//! Policy decision latency at 10, 100 and 1,000 rules with CEL conditions, next to the
//! `cedar-policy` crate deciding an equivalent rule set in the same run.
//!
//! Run: `cargo bench -p contextos-runner --bench policy`. Target: p50 ≤ 10 µs at 100 rules and
//! no slower than Cedar.
//!
//! Then the cost of the Ontology on a decision: finding the entities a call touches (eight
//! types with id patterns, about 1 KiB of arguments) for a condition on `call.entityTypes`,
//! next to the same decision on a call with nothing found (the baseline).
//!
//! The rule set: rule i applies to tool `tool_i` and allows the call when `amount > i`; the
//! decided call is for the last tool, so the engine scans every rule (the worst case for our
//! first-match evaluation; Cedar evaluates every policy anyway).

use std::{hint::black_box, str::FromStr, time::Instant};

use contextos_crds::{
    common::{Approvers, SafetyMode, ToolKind, ToolRisk},
    policy::{PolicyEffect, PolicyMode, PolicyRule, PolicySpec, RuleMatch},
};
use contextos_runner::policy::{CallFacts, PolicySet, RunFacts, StateFacts, compile_policy};
use serde_json::json;

const ITERATIONS: usize = 20_000;

fn ours(rules: usize) -> PolicySet {
    let spec = PolicySpec {
        rules: (0..rules)
            .map(|i| PolicyRule {
                name: format!("rule-{i}"),
                match_: RuleMatch {
                    tools: vec![format!("tool_{i}")],
                    ..RuleMatch::default()
                },
                condition: Some(format!("call.args.amount > {i}")),
                effect: PolicyEffect::Allow,
                reason: format!("amounts above {i} are fine for tool_{i}"),
                approvers: None,
            })
            .collect(),
        default_effect: PolicyEffect::Deny,
        mode: PolicyMode::Enforce,
        budget: None,
        promotion: None,
    };
    PolicySet {
        policies: vec![compile_policy("bench", &spec).expect("compiles")],
    }
}

fn cedar(rules: usize) -> cedar_policy::PolicySet {
    let text: String = (0..rules)
        .map(|i| {
            format!(
                "permit(principal, action == Action::\"call\", resource == Tool::\"tool_{i}\") when {{ context.amount > {i} }};\n"
            )
        })
        .collect();
    cedar_policy::PolicySet::from_str(&text).expect("cedar policies parse")
}

fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    (at(0.5), at(0.99))
}

fn time_ours(set: &PolicySet, rules: usize) -> (f64, f64) {
    let tool = format!("tool_{}", rules - 1);
    let args = json!({"amount": rules * 2});
    let run = RunFacts::default();
    let state = StateFacts::default();
    let approvers = Approvers::default();
    let entities = contextos_runner::ontology::CallEntities::default();
    let mut samples = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let started = Instant::now();
        let call = CallFacts {
            tool: &tool,
            risk: ToolRisk::Network,
            kind: ToolKind::Act,
            args: &args,
            entities: &entities,
        };
        let decision = set.decide(&call, &run, &state, SafetyMode::Autonomous, &approvers);
        black_box(&decision);
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(decision.effect, PolicyEffect::Allow);
    }
    percentiles(samples)
}

fn time_cedar(set: &cedar_policy::PolicySet, rules: usize) -> (f64, f64) {
    let authorizer = cedar_policy::Authorizer::new();
    let entities = cedar_policy::Entities::empty();
    let principal = cedar_policy::EntityUid::from_str("Agent::\"oncall\"").expect("uid");
    let action = cedar_policy::EntityUid::from_str("Action::\"call\"").expect("uid");
    let resource = cedar_policy::EntityUid::from_str(&format!("Tool::\"tool_{}\"", rules - 1)).expect("uid");
    let mut samples = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let started = Instant::now();
        // Building the request is part of deciding, as building CEL variables is for ours.
        let context =
            cedar_policy::Context::from_json_value(json!({"amount": rules * 2}), None).expect("context");
        let request =
            cedar_policy::Request::new(principal.clone(), action.clone(), resource.clone(), context, None)
                .expect("request");
        let response = authorizer.is_authorized(&request, set, &entities);
        black_box(&response);
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(response.decision(), cedar_policy::Decision::Allow);
    }
    percentiles(samples)
}

/// Eight entity types with id patterns, as a tenant might declare them.
fn ontology() -> contextos_runner::ontology::Ontology {
    let spec: contextos_crds::OntologySpec = serde_yaml::from_str(
        r#"
entityTypes:
  - {name: incident, idPattern: "INC-[0-9]{3,8}"}
  - {name: invoice, idPattern: "INV-[0-9]{6}"}
  - {name: ticket, idPattern: "TCK-[0-9]{4,8}"}
  - {name: change, idPattern: "CHG[0-9]{7}"}
  - {name: host, idPattern: "[a-z]+-[0-9]{2}\\.prod\\.example\\.com"}
  - {name: account, idPattern: "ACC-[A-Z]{2}[0-9]{8}"}
  - {name: order, idPattern: "ORD-[0-9]{10}"}
  - {name: build, idPattern: "build-[0-9a-f]{12}"}
"#,
    )
    .expect("ontology");
    contextos_runner::ontology::Ontology::compile(&spec).expect("compiles")
}

/// (find + decide, find alone, decide with nothing found) p50 in µs.
fn time_entities() -> (f64, f64, f64) {
    let spec: PolicySpec = serde_yaml::from_str(
        "rules: [{name: incidents, condition: \"'incident' in call.entityTypes\", effect: require_approval, reason: r, approvers: {users: [lee]}}]\ndefaultEffect: allow",
    )
    .expect("policy");
    let set = PolicySet {
        policies: vec![compile_policy("bench", &spec).expect("compiles")],
    };
    let ontology = ontology();
    let touches: Vec<contextos_crds::agent::EntityArgument> =
        serde_yaml::from_str("[{type: ticket, argument: /ticket}]").expect("touches");
    let note = "the checkout service returned 5xx after the deploy; ".repeat(14);
    let args = json!({
        "ticket": "TCK-48213",
        "query": format!("{note} see INC-4711 and host web-07.prod.example.com"),
        "filters": {"region": "eu-west-1", "limit": 50},
    });
    let quiet = json!({"ticket": "none", "query": note, "filters": {"region": "eu-west-1", "limit": 50}});
    let (run, state, approvers) = (RunFacts::default(), StateFacts::default(), Approvers::default());
    let decide = |args: &serde_json::Value, entities: &contextos_runner::ontology::CallEntities| {
        let call = CallFacts {
            tool: "search",
            risk: ToolRisk::ReadOnly,
            kind: ToolKind::Observe,
            args,
            entities,
        };
        set.decide(&call, &run, &state, SafetyMode::Autonomous, &approvers)
    };
    let mut both = Vec::with_capacity(ITERATIONS);
    let mut find = Vec::with_capacity(ITERATIONS);
    let mut baseline = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let started = Instant::now();
        let entities = ontology.of_call(&touches, &args);
        find.push(started.elapsed().as_secs_f64() * 1e6);
        let decision = decide(&args, &entities);
        both.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(decision.effect, PolicyEffect::RequireApproval);
        black_box(&decision);
        let nothing = contextos_runner::ontology::CallEntities::default();
        let started = Instant::now();
        let decision = decide(&quiet, &nothing);
        baseline.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(decision.effect, PolicyEffect::Allow);
        black_box(&decision);
    }
    (percentiles(both).0, percentiles(find).0, percentiles(baseline).0)
}

fn main() {
    println!(
        "policy decision latency — {ITERATIONS} decisions each, worst case (last rule matches), same run"
    );
    println!(
        "  {:>6}  {:>22}  {:>22}  {:>14}",
        "rules", "contextos p50 / p99 µs", "cedar p50 / p99 µs", "ours vs cedar"
    );
    for rules in [10, 100, 1000] {
        let (ours_p50, ours_p99) = time_ours(&ours(rules), rules);
        let (cedar_p50, cedar_p99) = time_cedar(&cedar(rules), rules);
        println!(
            "  {rules:>6}  {ours_p50:>10.2} / {ours_p99:>9.2}  {cedar_p50:>10.2} / {cedar_p99:>9.2}  {:>13.2}x",
            ours_p50 / cedar_p50
        );
    }
    println!("  target: p50 ≤ 10 µs at 100 rules and a ratio ≤ 1.0 (no slower than Cedar)");
    let (both, find, baseline) = time_entities();
    println!("entities a call touches — 8 id patterns, ~1 KiB of arguments, a condition on call.entityTypes");
    println!(
        "  find + decide p50 {both:.2} µs (finding alone {find:.2} µs); baseline, the decision with nothing found: {baseline:.2} µs"
    );
}
