//! `contextos records list|show|verify|export`.

use std::{
    io::{BufWriter, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Subcommand;
use contextos_runner::records::{
    AnyStore, EntryBody, RecordEntry, RecordStore, RunFilter, RunSummary, TenantId, read_run, timeline,
    verify_run,
};
use contextos_runner::text::for_terminal;

use super::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum RecordsCommand {
    /// List runs, newest first.
    List {
        /// Only runs of this Agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only runs of this Session.
        #[arg(long)]
        session: Option<String>,
        /// Only runs started within this long ago: e.g. 30m, 12h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print a run's timeline: who did what and why, step by step.
    Show {
        /// Run id (see `records list`).
        run: String,
    },
    /// Check a run's hash chain, blobs and head signature (or every run with --all).
    Verify {
        /// Run id.
        #[arg(required_unless_present = "all")]
        run: Option<String>,
        /// Verify every run of the tenant.
        #[arg(long, conflicts_with = "run")]
        all: bool,
        /// Public key (hex) of the signer; default: the data directory's key.
        #[arg(long, env = "CONTEXTOS_RECORD_PUBLIC_KEY")]
        public_key: Option<String>,
    },
    /// Print a blob of the tenant's store (a large entry body, a replay report) by its hash.
    Blob {
        /// SHA-256 (hex) of the blob.
        hash: String,
    },
    /// List calls that exhausted their retries (or met an open circuit), newest runs first.
    DeadLetters {
        /// Only this run.
        #[arg(long)]
        run: Option<String>,
        /// Look at this many recent runs.
        #[arg(long, default_value_t = 100)]
        runs: usize,
    },
    /// Write a run as JSON Lines: one entry per line with its hash, blobs inlined.
    Export {
        /// Run id.
        run: String,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

pub async fn run(global: &GlobalArgs, command: RecordsCommand) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_records(&tenant).await?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        RecordsCommand::List {
            agent,
            session,
            since,
            limit,
        } => {
            let since_ms = since.as_deref().map(parse_since).transpose()?;
            let filter = RunFilter {
                agent,
                session_id: session,
                since_ms,
                until_ms: None,
                limit: Some(limit),
                after: None,
            };
            let runs = store.list_runs(&tenant, &filter).await?;
            print_runs(&mut out, &tenant, &runs)?;
        }
        RecordsCommand::Show { run } => show(&store, &tenant, &run, &mut out).await?,
        RecordsCommand::Verify { run, all, public_key } => {
            let key = global.verifying_key(public_key.as_deref())?;
            let runs = match (run, all) {
                (Some(run), _) => vec![run],
                (None, _) => store
                    .list_runs(&tenant, &RunFilter::default())
                    .await?
                    .into_iter()
                    .map(|r| r.run_id)
                    .collect(),
            };
            let mut failed = 0;
            for run in &runs {
                match verify_run(&store, &tenant, run, &key).await {
                    Ok(v) => writeln!(
                        out,
                        "run {run}: OK — {} entries, {} bytes, head {} signed by key {}",
                        v.entries,
                        v.bytes,
                        &v.head.to_hex()[..16],
                        v.key_id
                    )?,
                    Err(e) => {
                        failed += 1;
                        writeln!(out, "run {run}: FAILED — {e}")?;
                    }
                }
            }
            if failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        RecordsCommand::Blob { hash } => {
            let parsed = contextos_runner::records::Hash::parse(&hash)
                .with_context(|| format!("{hash:?} is not a SHA-256 hash (64 hex characters)"))?;
            let bytes = store
                .get_blob(&tenant, &parsed)
                .await?
                .with_context(|| format!("no blob {hash} in tenant {tenant}"))?;
            out.write_all(&bytes)?;
            writeln!(out)?;
        }
        RecordsCommand::DeadLetters { run, runs } => {
            let run_ids = match run {
                Some(run) => vec![run],
                None => {
                    let filter = RunFilter {
                        limit: Some(runs),
                        ..RunFilter::default()
                    };
                    store
                        .list_runs(&tenant, &filter)
                        .await?
                        .into_iter()
                        .map(|r| r.run_id)
                        .collect()
                }
            };
            let mut found = 0;
            for run in &run_ids {
                for (_, entry) in resolved_entries(&store, &tenant, run).await? {
                    if let EntryBody::DeadLettered {
                        call_id,
                        tool,
                        idempotency_key,
                        attempts,
                        error,
                    } = &entry.body
                    {
                        found += 1;
                        writeln!(
                            out,
                            "run {run} entry #{}: {} (call {}, idempotency key {}) failed after {attempts} attempt(s): {}",
                            entry.seq,
                            for_terminal(tool),
                            for_terminal(call_id),
                            for_terminal(idempotency_key),
                            for_terminal(error)
                        )?;
                    }
                }
            }
            if found == 0 {
                writeln!(
                    out,
                    "no dead-lettered calls in {} run(s) of tenant {tenant}",
                    run_ids.len()
                )?;
            }
        }
        RecordsCommand::Export { run, output } => {
            let entries = resolved_entries(&store, &tenant, &run).await?;
            let mut sink: Box<dyn Write> = match &output {
                Some(path) => Box::new(BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(&mut out),
            };
            for (hash, entry) in &entries {
                let line = serde_json::json!({"hash": hash, "entry": entry});
                writeln!(sink, "{line}")?;
            }
            sink.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Entries of a run with blob references replaced by the bodies they stand for.
async fn resolved_entries(
    store: &AnyStore,
    tenant: &TenantId,
    run: &str,
) -> anyhow::Result<Vec<(String, RecordEntry)>> {
    let entries = read_run(store, tenant, run).await?;
    Ok(entries
        .into_iter()
        .map(|(hash, entry)| (hash.to_hex(), entry))
        .collect())
}

async fn show(store: &AnyStore, tenant: &TenantId, run: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let entries = resolved_entries(store, tenant, run).await?;
    writeln!(out, "run {run} (tenant {tenant}), {} entries", entries.len())?;
    for (_, entry) in &entries {
        writeln!(out, "{}", timeline::line(entry))?;
    }
    Ok(())
}

fn print_runs(out: &mut impl Write, tenant: &TenantId, runs: &[RunSummary]) -> anyhow::Result<()> {
    if runs.is_empty() {
        writeln!(out, "no runs recorded in tenant {tenant}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<36} {:<24} {:<20} {:<20} {:<10} {:>7}",
        "RUN", "SESSION", "AGENT", "STARTED", "OUTCOME", "ENTRIES"
    )?;
    for r in runs {
        let started = jiff::Timestamp::from_millisecond(r.started_at_ms)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        writeln!(
            out,
            "{:<36} {:<24} {:<20} {:<20} {:<10} {:>7}",
            r.run_id, r.session_id, r.agent, started, r.outcome, r.entries
        )?;
    }
    Ok(())
}

/// `30m`, `12h`, `7d` → the start of that window in ms since the epoch.
pub(super) fn parse_since(text: &str) -> anyhow::Result<i64> {
    let span = super::parse_span("--since", text)?;
    Ok(contextos_runner::records::recorder::now_ms() - span.as_millis() as i64)
}
