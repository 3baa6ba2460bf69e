//! `contextos propose`: the insights of a window (as `contextos insights` finds them, people's
//! corrections included) compiled into typed Proposal objects against the current specs of the
//! Agents, Policies and ContextPacks they are about — read from files or the live cluster.
//! Proposals are printed as YAML for `kubectl apply -f -` (or a Git commit); nothing is
//! applied here, and nothing a proposal names changes until a reviewer accepts it. Insights no
//! rule turns into a patch, and the research queue, are said on stderr.

use std::{path::PathBuf, process::ExitCode};

use super::{GlobalArgs, insights::Window, targets::Specs};
use contextos_runner::{
    insights::{self, Insight, open_questions, signals::CallSample, synthesize},
    proposals::{Compiled, compile},
};

#[derive(Debug, clap::Args)]
pub struct ProposeArgs {
    /// Files or directories holding the Agents, Policies and ContextPacks the insights are
    /// about (a GitOps checkout). Default: the live cluster of the current kubeconfig, in the
    /// tenant's namespace.
    paths: Vec<PathBuf>,
    #[command(flatten)]
    window: Window,
}

pub async fn run(global: &GlobalArgs, args: ProposeArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let specs = Specs::read(&args.paths, &tenant).await?;
    let (gathered, _) = args.window.gather(global, &tenant).await?;
    let thresholds = args.window.thresholds();
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
        gathered.runs, args.window.since
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
