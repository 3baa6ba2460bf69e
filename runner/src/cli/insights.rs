//! `contextos insights`: what the records of a window show — signals per agent, tool, rule and
//! context source, and the insights grouped from them, strongest first, each with the runs and
//! entries it rests on. Reads only; nothing is changed from here.

use std::process::ExitCode;

use anyhow::Context as _;
use contextos_runner::text::for_terminal_keeping_lines;
use contextos_runner::{
    feedback::{Corrections, FeedbackBook},
    insights::{self, Gathered, Insight, Question, Thresholds, open_questions, synthesize},
    keys::PublicKey,
    records::{AnyStore, RunFilter, TenantId, recorder::now_ms},
};
use serde_json::json;

use super::{GlobalArgs, format_ms};

/// The window of runs insights are read from, and how much makes an insight.
#[derive(Debug, clap::Args)]
pub struct Window {
    /// The window: runs started this long ago or later (e.g. 24h, 7d).
    #[arg(long, default_value = "7d")]
    pub since: String,
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

impl Window {
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            min_runs: self.min_runs,
            min_approvals: self.min_approvals,
        }
    }

    /// The tenant's runs of the window with their corrections, read as signals.
    pub async fn gather(&self, global: &GlobalArgs, tenant: &TenantId) -> anyhow::Result<(Gathered, i64)> {
        gather_since(global, tenant, &self.since, self.agent.clone()).await
    }
}

/// The runs of `tenant` started within `since` (of `agent`, if named), with people's
/// corrections of them, read as signals; and the window's start (ms).
pub async fn gather_since(
    global: &GlobalArgs,
    tenant: &TenantId,
    since: &str,
    agent: Option<String>,
) -> anyhow::Result<(Gathered, i64)> {
    let store = global.open_records(tenant).await?;
    let window = super::parse_span("--since", since)?;
    let since_ms = now_ms().saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX));
    let filter = RunFilter {
        agent,
        since_ms: Some(since_ms),
        ..RunFilter::default()
    };
    let key = match &store {
        AnyStore::Gateway(_) => None,
        _ => global.verifying_key(None).ok(),
    };
    let corrections = corrections(&store, tenant, key.as_ref());
    let gathered = insights::gather(&store, tenant, &filter, &corrections)
        .await
        .with_context(|| format!("reading the records of tenant {tenant}"))?;
    Ok((gathered, since_ms))
}

#[derive(Debug, clap::Args)]
pub struct InsightsArgs {
    #[command(flatten)]
    window: Window,
    /// text (default) or json (the signals too).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

pub async fn run(global: &GlobalArgs, args: InsightsArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let (gathered, since_ms) = args.window.gather(global, &tenant).await?;
    let thresholds = args.window.thresholds();
    let found = synthesize(&gathered.signals, thresholds);
    let questions = open_questions(&gathered.signals, thresholds);
    match args.format {
        Format::Text => print!(
            "{}{}",
            for_terminal_keeping_lines(&text(&gathered, &found, &args.window.since)),
            for_terminal_keeping_lines(&research(&questions))
        ),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "tenant": tenant.as_str(),
                "sinceMs": since_ms,
                "runs": gathered.runs,
                "unreadable": gathered.unreadable,
                "truncated": gathered.truncated,
                "insights": found,
                "openQuestions": questions,
                "signals": gathered.signals,
            }))?
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Where people's corrections of the tenant's runs are read from: through the gateway service
/// when the store is behind it, else beside the local store, verified with its key.
pub fn corrections<'a>(
    store: &'a AnyStore,
    tenant: &TenantId,
    key: Option<&'a PublicKey>,
) -> Corrections<'a, AnyStore> {
    match (store, key) {
        (AnyStore::Gateway(remote), _) => Corrections::Gateway(remote),
        (_, Some(key)) => Corrections::Local {
            book: FeedbackBook::new(store, tenant),
            key,
        },
        (_, None) => Corrections::Unread,
    }
}

fn text(gathered: &Gathered, found: &[Insight], since: &str) -> String {
    let mut out = format!("{} run(s) in the last {since}", gathered.runs);
    if gathered.truncated {
        out.push_str(&format!(" (the newest {}; narrow --since)", insights::MAX_RUNS));
    }
    out.push('\n');
    for (run, why) in &gathered.unreadable {
        out.push_str(&format!("  left out: run {run}: {why}\n"));
    }
    if found.is_empty() {
        out.push_str("no insights: nothing recurred often enough (see --min-runs)\n");
    }
    for insight in found {
        // Newest first, each once; the evidence keeps the newest entries only.
        let mut runs: Vec<&str> = Vec::new();
        for entry in &insight.evidence {
            if !runs.contains(&entry.run_id.as_str()) {
                runs.push(&entry.run_id);
            }
        }
        let more = insight.strength.runs.saturating_sub(runs.len() as u64);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        out.push_str(&format!(
            "\n{} — agent {}: {}\n  strength: {} run(s), {} time(s), newest {}\n  consider: {}\n  runs: {}{more}\n",
            insight.kind.as_str(),
            insight.agent,
            insight.summary,
            insight.strength.runs,
            insight.strength.count,
            format_ms(insight.strength.newest_ms),
            insight.consider,
            runs.join(" "),
        ));
    }
    out
}

/// The research queue: patterns that wait for more evidence, and what would settle each.
pub fn research(questions: &[Question]) -> String {
    if questions.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\nopen questions ({}): seen, not yet enough to act on\n",
        questions.len()
    );
    for q in questions {
        out.push_str(&format!(
            "  {} — agent {}: {}\n    settled by: {}\n",
            q.insight.kind.as_str(),
            q.insight.agent,
            q.insight.summary,
            q.settle
        ));
    }
    out
}
