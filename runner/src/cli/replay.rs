//! `contextos replay`: re-run recorded sessions under the same or candidate Policy/ContextPack
//! files and gate on the divergence.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use contextos_runner::{
    manifests::ManifestSet,
    records::{RecordStore as _, RunFilter, store::any::AnyStore},
    run::{
        bundle::Candidate,
        gate::{
            BUSY_PATIENCE, GATE_DEADLINE, GATE_PATH, SignedGateVerdict, asked_until_started,
            jittered_busy_pause,
        },
        replay::{Judging, Reexecution, ReplayError, ReplayGate, ReplaySummary, replay_run_as, replay_runs},
    },
};

use contextos_runner::run::pod::in_pod;

use super::GlobalArgs;

/// Exit code when the divergence is above the threshold: the gate a pipeline checks.
pub const EXIT_DIVERGED: u8 = 3;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Replay this run.
    #[arg(long, conflicts_with_all = ["session", "sample", "agents", "since", "selector"])]
    run: Option<String>,
    /// Replay the latest finished run of this Session.
    #[arg(long, conflicts_with = "sample")]
    session: Option<String>,
    /// Replay up to this many recent finished runs (newest first).
    #[arg(long)]
    sample: Option<usize>,
    /// Read at most this many runs of the window to fill the sample (default: 20 a place, at
    /// least 2,000); a sample left short when the window held more fails.
    #[arg(long)]
    examine: Option<usize>,
    /// With --sample or --session: only runs of these Agents (repeatable).
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// With --sample or --session: only runs started within this long ago: e.g. 30m, 12h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// With --sample or --session: only runs whose Session had these labels, `key=value[,…]`.
    #[arg(long)]
    selector: Option<String>,
    /// Candidate Policy / ContextPack / Agent / Ontology files (or directories); each replaces
    /// the recorded revision of the same name. None: replay under the recorded versions.
    #[arg(long = "candidate")]
    candidates: Vec<PathBuf>,
    /// Fail (exit 3) when more than this percentage of replayed steps diverge.
    #[arg(long, default_value_t = 0.0)]
    max_divergence_percent: f64,
    #[command(flatten)]
    reexecute: ReexecuteArgs,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Also write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write a short JSON summary here (at most 4 KiB: a replay Job's termination message).
    #[arg(long)]
    summary: Option<PathBuf>,
}

/// Exit code when there is no finished run to replay (a gate cannot pass or fail on nothing).
pub const EXIT_NO_HISTORY: u8 = 4;

#[derive(Debug, Args)]
pub struct GateArgs {
    /// The candidate object (JSON or YAML), as the operator mounted it.
    #[arg(long)]
    candidate: PathBuf,
    /// Write the gateway's signed verdict here (a replay Job's termination file).
    #[arg(long)]
    summary: PathBuf,
}

/// A replay Job's gate: the gateway replays the candidate its grant orders and signs the
/// verdict; this only carries it to the termination file.
pub async fn gate(global: &GlobalArgs, args: GateArgs) -> anyhow::Result<ExitCode> {
    let AnyStore::Gateway(gateway) = global.open_store().await? else {
        bail!("replay-gate needs the gateway service as its store (gateway+http://…)");
    };
    let path = in_pod(&args.candidate);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let object: serde_json::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not a manifest", path.display()))?;
    // The gateway bounds a gate by GATE_DEADLINE; the answer is waited for a little longer. A
    // gateway whose gates are all busy is asked again (this pod ends once, and an end without a
    // verdict spends one of the gate's attempts).
    let signed: SignedGateVerdict = asked_until_started(
        || {
            gateway.post_json_once(
                GATE_PATH,
                &object,
                GATE_DEADLINE + std::time::Duration::from_secs(120),
            )
        },
        BUSY_PATIENCE,
        jittered_busy_pause,
    )
    .await?;
    let gate = &signed.verdict.gate;
    let path = in_pod(&args.summary);
    std::fs::write(&path, serde_json::to_vec(&signed)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "replayed {} run(s), {} step(s), {} divergent: {}",
        gate.runs,
        gate.steps,
        gate.divergent_steps,
        if gate.no_history {
            "nothing recorded to replay"
        } else if gate.passed {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(if gate.no_history {
        ExitCode::from(EXIT_NO_HISTORY)
    } else if gate.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIVERGED)
    })
}

pub async fn run(global: &GlobalArgs, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_store().await?;
    let candidate = candidate(&args.candidates)?;
    let reexecution = args.reexecute.reexecution()?;
    let summary = if let Some(run_id) = &args.run {
        let replays = match replay_run_as(&store, &tenant, run_id, &candidate, reexecution.as_ref()).await {
            Ok(replay) => vec![replay],
            // The limit was spent before the run was re-executed: it fails, saying so.
            Err(ReplayError::SpendLimit(_)) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let summary = ReplaySummary::new(replays, Vec::new(), args.max_divergence_percent);
        match &reexecution {
            Some(r) => {
                let stopped = r.over_budget(summary.replays.len());
                summary.reexecuted(r.samples(), stopped)
            }
            None => summary,
        }
    } else {
        let since_ms = match &args.since {
            Some(text) => Some(super::records::parse_since(text)?),
            None => None,
        };
        let filter = RunFilter {
            session_id: args.session.clone(),
            since_ms,
            limit: Some(args.sample.unwrap_or(1)),
            ..RunFilter::default()
        };
        if args.session.is_none() && args.sample.is_none() {
            bail!("say what to replay: --run <id>, --session <name> or --sample <n>");
        }
        let labels = parse_labels(args.selector.as_deref())?;
        replay_runs(
            &store,
            &tenant,
            &filter,
            &args.agents,
            &labels,
            &candidate,
            &Judging {
                max_divergence_percent: args.max_divergence_percent,
                reexecution,
                examine_at_most: args.examine,
                ..Judging::default()
            },
        )
        .await?
    };
    if summary.runs == 0 && summary.stopped.is_none() {
        if let Some(path) = &args.summary {
            write_summary(path, &ReplayGate::no_history(&summary.skipped))?;
            eprintln!("no finished run matched in tenant {tenant}: nothing to replay");
            return Ok(ExitCode::from(EXIT_NO_HISTORY));
        }
        bail!(
            "no finished run matched in tenant {tenant}{}",
            if summary.skipped.is_empty() {
                String::new()
            } else {
                format!(" ({})", summary.skipped.join("; "))
            }
        );
    }
    let json = serde_json::to_string_pretty(&summary)?;
    if let Some(path) = &args.summary {
        // The full report stays with the records; the summary names it.
        let mut gate = ReplayGate::of(&summary);
        let hash = store.put_blob(&tenant, json.clone().into_bytes()).await?;
        gate.report = Some(hash.to_hex());
        write_summary(path, &gate)?;
    }
    if let Some(path) = &args.report {
        std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    match args.output {
        // Recorded outputs and failure messages are the model's and the tools' words.
        Output::Text => print!(
            "{}",
            contextos_runner::text::for_terminal_keeping_lines(&summary.text())
        ),
        Output::Json => println!("{json}"),
    }
    Ok(if summary.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIVERGED)
    })
}

fn candidate(paths: &[PathBuf]) -> anyhow::Result<Candidate> {
    if paths.is_empty() {
        return Ok(Candidate::default());
    }
    let paths: Vec<PathBuf> = paths.iter().map(|p| in_pod(p)).collect();
    let set = ManifestSet::load(&paths)?;
    let policies = set.policies()?;
    let mut packs = set.context_packs()?;
    if packs.len() > 1 {
        bail!(
            "the candidate files hold {} ContextPacks; replay one at a time",
            packs.len()
        );
    }
    let ontology = match set.ontology()? {
        Some((manifest, spec)) => {
            contextos_runner::ontology::Ontology::compile(&spec).map_err(|e| {
                anyhow::anyhow!("{}: Ontology {}: {e}", manifest.file.display(), manifest.name)
            })?;
            Some(spec)
        }
        None => None,
    };
    let mut agents = set.agents()?;
    if agents.len() > 1 {
        bail!(
            "the candidate files hold {} Agents; replay one at a time (with --agent)",
            agents.len()
        );
    }
    if policies.is_empty() && packs.is_empty() && ontology.is_none() && agents.is_empty() {
        bail!("the candidate files hold no Policy, ContextPack, Agent or Ontology");
    }
    // The candidate Agent's models as the candidate files' PriceLists price them (a routing
    // change is judged on its cost too).
    let mut prices = std::collections::BTreeMap::new();
    let lists = set.price_lists()?;
    if let Some(agent) = agents.last().filter(|_| !lists.is_empty()) {
        let named = std::iter::once((
            contextos_crds::model_routing::PRIMARY.to_owned(),
            &agent.spec.model,
        ))
        .chain(
            agent
                .spec
                .routing
                .iter()
                .flat_map(|r| r.models.iter().map(|m| (m.name.clone(), &m.model))),
        );
        for (name, model) in named {
            let price = contextos_runner::pricing::price_for(&lists, model)
                .map_err(|e| anyhow::anyhow!("candidate Agent {}: model {name}: {e}", agent.name))?;
            if let Some(price) = price {
                prices.insert(name, price);
            }
        }
    }
    Ok(Candidate {
        policies,
        context_pack: packs.pop(),
        composition: None,
        agent: agents.pop(),
        ontology,
        prices,
        skill: None,
    })
}

fn write_summary(path: &std::path::Path, gate: &ReplayGate) -> anyhow::Result<()> {
    let path = in_pod(path);
    std::fs::write(&path, serde_json::to_vec(gate)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn parse_labels(text: Option<&str>) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for pair in text
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.trim().is_empty())
    {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--selector {pair:?}: expected key=value"))?;
        out.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(out)
}

/// How `replay` and `autotune` re-execute runs, when asked to.
#[derive(Debug, clap::Args)]
pub struct ReexecuteArgs {
    /// Re-execute: ask the Agent's model again with the candidate's context instead of playing
    /// the recorded turns (what judges a changed ContextPack). Calls the recorded run made are
    /// answered from the record; any other call is refused and reported, never executed.
    #[arg(long)]
    reexecute: bool,
    /// With --reexecute: times each run is re-executed (to bound the model's nondeterminism).
    #[arg(long, default_value_t = 3, requires = "reexecute")]
    samples: u32,
    /// With --reexecute: the most model tokens all the re-executions may use; past it they stop
    /// and fail, as a gate's `reexecute.maxTokens` does.
    #[arg(long, value_name = "TOKENS", requires = "reexecute", value_parser = clap::value_parser!(u64).range(1..))]
    max_tokens: Option<u64>,
    /// With --reexecute: a model key as `<secret>/<key>=VALUE` (`=@file` reads a file).
    #[arg(long = "secret", value_name = "SECRET/KEY=VALUE", requires = "reexecute")]
    secrets: Vec<String>,
}

impl ReexecuteArgs {
    /// The re-execution asked for, if any.
    pub fn reexecution(&self) -> anyhow::Result<Option<Reexecution>> {
        Ok(match self.reexecute {
            true => Some(
                Reexecution::with_keys(self.samples, super::run::secret_values(&self.secrets)?)
                    .limited(self.max_tokens),
            ),
            false => None,
        })
    }
}
