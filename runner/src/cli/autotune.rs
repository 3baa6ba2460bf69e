//! `contextos autotune`: the tightest run-budget limit an Agent's recorded runs replay under
//! without a new divergence, measured by deterministic replays, proposed (with headroom) as a
//! typed Agent patch printed as a Proposal; or a value the caller names, measured and refused
//! when it would change a recorded run. Nothing is applied here.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use contextos_runner::{
    proposals::autotune::{AutotuneError, Knob, Workload},
    records::{RunFilter, recorder::now_ms},
};

use super::{GlobalArgs, targets::Specs};

/// Exit code when the value asked for would change recorded runs (or nothing can be measured).
const EXIT_REFUSED: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct AutotuneArgs {
    /// Files or directories holding the Agent (a GitOps checkout). Default: the live cluster of
    /// the current kubeconfig, in the tenant's namespace.
    paths: Vec<PathBuf>,
    /// The Agent whose budget is tuned.
    #[arg(long)]
    agent: String,
    /// The limit to tighten.
    #[arg(long, value_enum, default_value = "max-tokens")]
    knob: Knob,
    /// Measure this value instead of searching: refused if a recorded run would change.
    #[arg(long)]
    value: Option<u64>,
    /// Room left above the tightest measured value, in percent.
    #[arg(long, default_value_t = 20)]
    headroom: u32,
    /// The recorded runs: those started this long ago or later (e.g. 24h, 7d).
    #[arg(long, default_value = "7d")]
    since: String,
    /// At most this many of the newest runs are replayed per trial.
    #[arg(long, default_value_t = 50)]
    sample: usize,
}

pub async fn run(global: &GlobalArgs, args: AutotuneArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let specs = Specs::read(&args.paths, &tenant).await?;
    let spec = specs
        .agents
        .get(&args.agent)
        .with_context(|| format!("Agent {} is not among the objects read", args.agent))?;
    let store = global.open_records(&tenant).await?;
    let window = super::parse_span("--since", &args.since)?;
    let workload = Workload {
        store: &store,
        tenant: &tenant,
        agent: &args.agent,
        spec,
        filter: RunFilter {
            since_ms: Some(now_ms().saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))),
            limit: Some(args.sample.max(1)),
            ..RunFilter::default()
        },
    };
    let tuned = match args.value {
        Some(value) => workload.check(args.knob, value).await,
        None => workload.search(args.knob, args.headroom).await,
    };
    let tuned = match tuned {
        Ok(tuned) => tuned,
        Err(
            e @ (AutotuneError::WouldChange { .. }
            | AutotuneError::NotClean { .. }
            | AutotuneError::NoRuns(_)),
        ) => {
            eprintln!("refused: {e}");
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
        Err(e) => return Err(e.into()),
    };
    for trial in &tuned.trials {
        eprintln!(
            "trial {} = {}: {} run(s), {}",
            args.knob.field(),
            trial.value,
            trial.runs,
            if trial.clean() {
                "no divergence".to_owned()
            } else {
                format!(
                    "{} divergent step(s) in {} run(s)",
                    trial.divergent_steps,
                    trial.changed_runs.len()
                )
            }
        );
    }
    eprintln!("{}", tuned.summary(&args.agent));
    if tuned.proposed == tuned.current {
        eprintln!("nothing to propose: the current value is already the tightest with headroom");
        return Ok(ExitCode::SUCCESS);
    }
    let draft = tuned.draft(&args.agent, spec);
    print!(
        "---\n{}",
        serde_yaml::to_string(&draft.manifest(tenant.as_str()))?
    );
    eprintln!("proposed {}", draft.name());
    Ok(ExitCode::SUCCESS)
}
