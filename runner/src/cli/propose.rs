//! `contextos propose`: the insights of a window (as `contextos insights` finds them, people's
//! corrections included) compiled into typed Proposal objects against the current specs of the
//! Agents, Policies and ContextPacks they are about — read from files or the live cluster.
//! Proposals are printed as YAML for `kubectl apply -f -` (or a Git commit); nothing is
//! applied here, and nothing a proposal names changes until a reviewer accepts it. Insights no
//! rule turns into a patch, and the research queue, are said on stderr.

use std::{path::PathBuf, process::ExitCode};

use super::{GlobalArgs, insights::corrections, targets::Specs};
use anyhow::Context as _;
use contextos_runner::{
    insights::{self, Insight, Thresholds, open_questions, signals::CallSample, synthesize},
    proposals::{Compiled, compile},
    records::{RunFilter, recorder::now_ms},
};

#[derive(Debug, clap::Args)]
pub struct ProposeArgs {
    /// Files or directories holding the Agents, Policies and ContextPacks the insights are
    /// about (a GitOps checkout). Default: the live cluster of the current kubeconfig, in the
    /// tenant's namespace.
    paths: Vec<PathBuf>,
    /// The window: runs started this long ago or later (e.g. 24h, 7d).
    #[arg(long, default_value = "7d")]
    since: String,
    /// Only this agent's runs.
    #[arg(long)]
    agent: Option<String>,
    /// Runs a pattern must be seen in to be an insight.
    #[arg(long, default_value_t = 2)]
    min_runs: u64,
    /// Approvals under a rule before "always granted" or "always refused" counts.
    #[arg(long, default_value_t = 3)]
    min_approvals: u64,
}

pub async fn run(global: &GlobalArgs, args: ProposeArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let specs = Specs::read(&args.paths, &tenant).await?;
    let store = global.open_records(&tenant).await?;
    let window = super::parse_span("--since", &args.since)?;
    let since_ms = now_ms().saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX));
    let filter = RunFilter {
        agent: args.agent.clone(),
        since_ms: Some(since_ms),
        ..RunFilter::default()
    };
    let key = match &store {
        contextos_runner::records::AnyStore::Gateway(_) => None,
        _ => global.verifying_key(None).ok(),
    };
    let corrections = corrections(&store, &tenant, key.as_ref());
    let gathered = insights::gather(&store, &tenant, &filter, &corrections)
        .await
        .with_context(|| format!("reading the records of tenant {tenant}"))?;
    let thresholds = Thresholds {
        min_runs: args.min_runs,
        min_approvals: args.min_approvals,
    };
    let mut drafted = 0;
    for insight in synthesize(&gathered.signals, thresholds) {
        let compiled = match specs.world(&insight.agent) {
            Ok(world) => compile(&insight, &world, &samples(&gathered.signals, &insight)),
            Err(why) => Compiled::Open(why),
        };
        match compiled {
            Compiled::Draft(draft) => {
                let manifest = draft.manifest(tenant.as_str());
                print!("---\n{}", serde_yaml::to_string(&manifest)?);
                eprintln!(
                    "proposed {}: {} ({})",
                    draft.name(),
                    insight.summary,
                    insight.kind.as_str()
                );
                drafted += 1;
            }
            Compiled::Open(why) => eprintln!(
                "not proposed: {} ({}): {why}",
                insight.summary,
                insight.kind.as_str()
            ),
        }
    }
    eprint!(
        "{}",
        super::insights::research(&open_questions(&gathered.signals, thresholds))
    );
    eprintln!(
        "{drafted} proposal(s) from {} run(s) of tenant {tenant} in the last {}",
        gathered.runs, args.since
    );
    Ok(ExitCode::SUCCESS)
}

/// The calls of the insight's tool, by every agent: a rule in a shared policy decides them all.
fn samples(signals: &insights::Signals, insight: &Insight) -> Vec<CallSample> {
    signals
        .agents
        .values()
        .filter_map(|a| a.tools.get(&insight.about))
        .flat_map(|t| t.samples.iter().cloned())
        .collect()
}
