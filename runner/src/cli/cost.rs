//! `contextos cost`: a tenant's spend (model turns and priced tool calls) over a window, read
//! from its records (locally, or through the gateway with a records reader's identity), by
//! agent, model, tool or a Session label.

use std::process::ExitCode;

use anyhow::Context as _;
use contextos_runner::{
    cost::{By, Report},
    insights::MAX_RUNS,
    records::{RecordStore as _, RunFilter, read_run, recorder::now_ms},
    run::bundle::recorded_bundle,
};

use super::GlobalArgs;

#[derive(Debug, clap::Args)]
pub struct CostArgs {
    /// The window (e.g. 24h, 7d, 30d).
    #[arg(long, default_value = "7d")]
    since: String,
    /// Sum by `agent`, `model`, `tool`, or `label=<key>` (a Session label, such as label=team).
    #[arg(long, default_value = "agent")]
    by: String,
    /// Only this Agent's runs.
    #[arg(long)]
    agent: Option<String>,
    /// text (default) or json.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

pub async fn run(global: &GlobalArgs, args: CostArgs) -> anyhow::Result<ExitCode> {
    let by = By::parse(&args.by).map_err(anyhow::Error::msg)?;
    let tenant = global.tenant()?;
    let store = global.open_records(&tenant).await?;
    let window = super::parse_span("--since", &args.since)?;
    let filter = RunFilter {
        agent: args.agent.clone(),
        since_ms: Some(now_ms().saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))),
        limit: Some(MAX_RUNS + 1),
        ..RunFilter::default()
    };
    let mut runs = store
        .list_runs(&tenant, &filter)
        .await
        .with_context(|| format!("listing the runs of tenant {tenant}"))?;
    let truncated = runs.len() > MAX_RUNS;
    runs.truncate(MAX_RUNS);
    let mut report = Report::new(tenant.as_str(), &args.since, &by);
    report.truncated = truncated;
    for run in runs {
        let entries: Vec<_> = read_run(&store, &tenant, &run.run_id)
            .await
            .with_context(|| format!("reading run {}", run.run_id))?
            .into_iter()
            .map(|(_, entry)| entry)
            .collect();
        // A label is the Session's, kept in the run's bundle.
        let labels = match (&by, entries.first()) {
            (By::Label(_), Some(first)) => recorded_bundle(&store, &tenant, &run.run_id, first)
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("reading the bundle of run {}", run.run_id))?
                .map(|b| b.session_labels)
                .unwrap_or_default(),
            _ => Default::default(),
        };
        report.add_run(&by, &run.agent, &labels, &entries);
    }
    match args.format {
        Format::Text => {
            print!(
                "{}",
                contextos_runner::text::for_terminal_keeping_lines(&report.text())
            );
            if truncated {
                println!("(the window holds more than {MAX_RUNS} runs; the newest were read)");
            }
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(ExitCode::SUCCESS)
}
