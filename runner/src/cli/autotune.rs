//! `contextos autotune`: the tightest value of a numeric knob (an Agent's run budget or critic
//! revisions, its ContextPack's token budget or a source's cap) that the Agent's recorded runs
//! replay under without a new divergence, measured by replays (or re-executions), proposed with
//! headroom as a typed patch printed as a Proposal; or a value the caller names, measured and
//! refused when it would change a recorded run. Nothing is applied here.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use contextos_runner::{
    proposals::autotune::{AutotuneError, Knob, Workload},
    records::{RunFilter, recorder::now_ms},
    run::bundle::NamedPack,
};

use super::{GlobalArgs, targets::Specs};

/// Exit code when the value asked for would change recorded runs (or nothing can be measured).
const EXIT_REFUSED: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct AutotuneArgs {
    /// Files or directories holding the Agent (a GitOps checkout). Default: the live cluster of
    /// the current kubeconfig, in the tenant's namespace.
    paths: Vec<PathBuf>,
    /// The Agent whose recorded runs are measured; the knob is its own or its ContextPack's.
    #[arg(long)]
    agent: String,
    /// The limit to tighten.
    #[arg(long, value_enum, default_value = "max-tokens")]
    knob: Knob,
    /// With --knob source-max-tokens: the ContextPack source whose cap is tuned.
    #[arg(long)]
    source: Option<String>,
    // --reexecute judges each trial by asking the model again with the candidate, as a
    // ContextPack's gate does; --max-tokens bounds the whole search.
    #[command(flatten)]
    reexecute: super::replay::ReexecuteArgs,
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
    let pack_name = &spec.context_pack_ref.name;
    let pack = specs
        .packs
        .get(pack_name)
        .map(|spec| NamedPack::new(pack_name.clone(), spec.clone()));
    if args.source.is_some() && args.knob != Knob::SourceMaxTokens {
        anyhow::bail!(
            "--source names the source of --knob source-max-tokens; the knob is {:?}",
            args.knob
        );
    }
    let reexecution = args.reexecute.reexecution()?;
    let store = global.open_records(&tenant).await?;
    let window = super::parse_span("--since", &args.since)?;
    let workload = Workload {
        store: &store,
        tenant: &tenant,
        agent: &args.agent,
        spec,
        pack: pack.as_ref(),
        source: args.source.as_deref(),
        filter: RunFilter {
            since_ms: Some(now_ms().saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))),
            limit: Some(args.sample.max(1)),
            ..RunFilter::default()
        },
        reexecution,
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
            | AutotuneError::BelowFloor { .. }
            | AutotuneError::Stopped(_)
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
            tuned.setting.field,
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
    if tuned.proposed == tuned.setting.current {
        eprintln!("nothing to propose: the current value is already the tightest with headroom");
        return Ok(ExitCode::SUCCESS);
    }
    let draft = workload.draft(&tuned)?;
    print!(
        "---\n{}",
        serde_yaml::to_string(&draft.manifest(tenant.as_str()))?
    );
    eprintln!("proposed {}", draft.name());
    Ok(ExitCode::SUCCESS)
}
