//! One trace per Session across the installed processes, read back from Jaeger (its OTLP
//! receiver on the node's address, where pods reach this machine): the operator and the gateway
//! are pointed at it the standard way (`OTEL_EXPORTER_OTLP_ENDPOINT` in their Deployments), and
//! so is the quickstart's tool service. Runner pods reach only the gateway: their spans come
//! through its relay. The quickstart's Session — paused for an approval, approved, resumed —
//! is then one tree: the operator's `session` root, both attempts' `run` spans from the runner
//! pods under it, their steps, the gateway's `model.proxy` under the runner's `model.call`, the
//! gateway's `tool.call` under the runner's step with its decision and approval waits, and the
//! tool service's spans under the gateway's calls that reached it.

use anyhow::{Context as _, Result, bail, ensure};
use contextos_crds::Session;

#[path = "../../../runner/tests/support/jaeger.rs"]
pub mod jaeger;

use jaeger::{Jaeger, Span, Trace};

/// The services of the installed processes, as the collector shows them.
const OPERATOR: &str = "contextos-operator";
const RUNNER: &str = "contextos-runner";
const GATEWAY: &str = "contextos-gateway";
const TOOLS: &str = "ops-tools";

/// The environment pointing a process at `jaeger` (short batches: the test reads soon after).
pub fn exporting_to(jaeger: &Jaeger) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
    ]
}

/// Checks the trace of `session` (Succeeded after two attempts) in `jaeger`.
pub async fn one_trace_per_session(jaeger: Jaeger, session: &Session) -> Result<()> {
    let trace_id = contextos_operator::session_children::trace_id(session);
    let jaeger = std::sync::Arc::new(jaeger);
    // Each process exports in batches, and a span is exported when it ends: the trace is
    // complete once every span has, which the Session's end does not wait for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (id, jaeger) = (trace_id.clone(), jaeger.clone());
        let trace =
            tokio::task::spawn_blocking(move || jaeger.trace(&id, &[OPERATOR, RUNNER, GATEWAY, TOOLS]))
                .await
                .context("reading the trace")?;
        match check(&trace) {
            Ok(()) => return Ok(()),
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                let spans: Vec<String> = trace
                    .spans
                    .iter()
                    .map(|s| {
                        format!(
                            "{} ({}) {} <- {:?} {:?}",
                            s.name, s.service, s.id, s.parent, s.tags
                        )
                    })
                    .collect();
                return Err(e.context(format!("trace {trace_id}:\n  {}", spans.join("\n  "))));
            }
        }
    }
}

fn check(trace: &Trace) -> Result<()> {
    let mut by_service = std::collections::BTreeMap::<&str, usize>::new();
    for span in &trace.spans {
        *by_service.entry(span.service.as_str()).or_default() += 1;
    }
    eprintln!(
        "the quickstart's trace: {} spans, by service {by_service:?}",
        trace.spans.len()
    );
    let roots = trace.named("session");
    ensure!(roots.len() == 1, "{} session spans", roots.len());
    let root = roots[0];
    ensure!(root.service == OPERATOR, "the root is {}'s", root.service);
    ensure!(root.parent.is_none(), "the root has a parent");
    ensure!(root.tags["contextos.outcome"] == "Succeeded", "{:?}", root.tags);
    ensure!(
        root.tags["contextos.session"] == "checkout-5xx",
        "{:?}",
        root.tags
    );

    // Every span but the root has its parent in the trace: nothing dangles.
    for span in &trace.spans {
        if span.id != root.id {
            let parent = span.parent.as_deref().unwrap_or_default();
            ensure!(
                trace.by_id(parent).is_some(),
                "{} ({}) has no parent in the trace",
                span.name,
                span.service
            );
        }
    }

    // Both attempts, from their runner pods, under the root; each pod named by the gateway.
    let runs = trace.named("run");
    ensure!(runs.len() == 2, "{} run spans", runs.len());
    let mut pods = Vec::new();
    for run in &runs {
        ensure!(run.service == RUNNER, "run span of {}", run.service);
        ensure!(run.parent.as_deref() == Some(root.id.as_str()), "{run:?}");
        pods.push(
            run.process["k8s.pod.name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    pods.sort();
    ensure!(
        pods == ["checkout-5xx-run-1", "checkout-5xx-run-2"],
        "the runs' pods: {pods:?}"
    );

    // Who made what, and under what.
    for (name, service, parent, parent_service) in [
        ("step", RUNNER, "run", RUNNER),
        ("context.compile", RUNNER, "run", RUNNER),
        ("model.call", RUNNER, "step", RUNNER),
        ("model.proxy", GATEWAY, "model.call", RUNNER),
        ("tool.call", GATEWAY, "step", RUNNER),
        ("gateway.decision", GATEWAY, "tool.call", GATEWAY),
        ("approval.wait", GATEWAY, "tool.call", GATEWAY),
        ("ops-tools.request", TOOLS, "tool.call", GATEWAY),
    ] {
        let spans = trace.named(name);
        ensure!(!spans.is_empty(), "no {name} span");
        for span in spans {
            ensure!(span.service == service, "{name} made by {}", span.service);
            let Some(up) = trace.by_id(span.parent.as_deref().unwrap_or_default()) else {
                bail!("{name} has no parent");
            };
            ensure!(
                (up.name.as_str(), up.service.as_str()) == (parent, parent_service),
                "{name} ({service}) is under {} ({}), not {parent} ({parent_service})",
                up.name,
                up.service
            );
        }
    }
    let restart = trace
        .named("ops-tools.request")
        .into_iter()
        .find(|s| s.tags["url.path"] == "/deployments/restart")
        .context("the restart reached ops-tools")?;
    let call = trace
        .by_id(restart.parent.as_deref().unwrap_or_default())
        .context("its call")?;
    ensure!(
        call.tags["contextos.tool"] == "restart_deployment",
        "{:?}",
        call.tags
    );
    ensure!(call.tags["contextos.outcome"] == "executed", "{:?}", call.tags);

    // The model's answers are counted at the boundary.
    let proxied: Vec<&Span> = trace.named("model.proxy");
    ensure!(
        proxied
            .iter()
            .any(|s| s.tags.contains_key("gen_ai.usage.output_tokens")),
        "no model.proxy span counts the model's tokens"
    );
    Ok(())
}
