//! `contextos feedback give|list`: corrections of runs, each appended to its run's signed chain
//! beside the record (never edited), in the name of whoever gives it.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use contextos_runner::{
    feedback::{FeedbackBook, FeedbackLabel, FeedbackRecord, FeedbackRequest},
    keys::KeyPair,
    memory::chain::Link,
    records::{AnyStore, recorder::now_ms},
    text::for_terminal,
};

use super::{GlobalArgs, format_ms};

/// The most runs `feedback list` looks through.
const LIST_LIMIT: usize = 10_000;

#[derive(Debug, Subcommand)]
pub enum FeedbackCommand {
    /// Correct a run: what was wrong (a label), what should have happened, and optionally the
    /// entry it is about (its position, as `contextos records show <run>` prints it).
    Give {
        /// The run (`contextos records list`).
        run: String,
        /// wrong-tool, should-have-asked, should-not-have-acted, missing-context, wrong-answer
        /// or too-slow-or-costly.
        #[arg(long)]
        label: String,
        /// What should have happened, in a sentence or two.
        #[arg(long)]
        correction: String,
        /// The position of the entry it is about.
        #[arg(long)]
        entry: Option<u64>,
        /// Who gives it (default: the local user).
        #[arg(long)]
        by: Option<String>,
        /// The Session the run must be of (refused if it is another's).
        #[arg(long)]
        session: Option<String>,
    },
    /// The corrections of one run, or of every run that has some, verified.
    List {
        /// Only this run's.
        run: Option<String>,
        /// text (default) or json.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Public key (hex) the chains' heads are verified with; default: the data directory's.
        #[arg(long, env = "CONTEXTOS_RECORD_PUBLIC_KEY")]
        public_key: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub async fn run(global: &GlobalArgs, command: FeedbackCommand) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_records(&tenant).await?;
    if matches!(store, AnyStore::Gateway(_)) {
        bail!(
            "through the gateway service, give feedback as a Feedback object (kubectl apply -f; see examples/improvement/feedback.yaml): the gateway chains it into the run's corrections in your name, and `contextos insights` and `contextos propose` read them through the gateway; `feedback give|list` work on the machine that holds the store"
        );
    }
    let book = FeedbackBook::new(&store, &tenant);
    match command {
        FeedbackCommand::Give {
            run,
            label,
            correction,
            entry,
            by,
            session,
        } => {
            let label: FeedbackLabel = label.parse().map_err(anyhow::Error::msg).context("--label")?;
            let key_path = global.key_path();
            let key = KeyPair::load_or_create(&key_path)
                .with_context(|| format!("the signing key {}", key_path.display()))?;
            let request = FeedbackRequest {
                run_id: run,
                session,
                entry,
                label,
                correction,
                request_id: None,
            };
            let by = by.unwrap_or_else(GlobalArgs::local_user);
            let link = book.give(request, by, now_ms(), &key).await?;
            println!(
                "kept: correction {} of run {} ({}) {}",
                link.seq, link.record.run_id, link.record.label, link.hash
            );
        }
        FeedbackCommand::List {
            run,
            format,
            public_key,
        } => {
            let key = global.verifying_key(public_key.as_deref())?;
            let runs = match run {
                Some(run) => vec![run],
                None => book.runs(LIST_LIMIT).await?,
            };
            let mut all: Vec<Link<FeedbackRecord>> = Vec::new();
            for run in &runs {
                all.extend(book.of_run(run, &key).await?.links);
            }
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&all)?),
                Format::Text => print_links(&all),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_links(links: &[Link<FeedbackRecord>]) {
    if links.is_empty() {
        println!("no corrections");
    }
    for link in links {
        let r = &link.record;
        let about = match &r.entry {
            Some(entry) => format!(
                " entry {}{}",
                entry.seq,
                entry
                    .tool
                    .as_deref()
                    .map(|t| format!(" ({})", for_terminal(t)))
                    .unwrap_or_default()
            ),
            None => String::new(),
        };
        // Escaped: a correction's text cannot forge the lines after it.
        println!(
            "run {}{about}  {}  by {} at {}\n    {}",
            r.run_id,
            r.label,
            for_terminal(&r.by),
            format_ms(r.at_ms),
            for_terminal(&r.correction)
        );
    }
}
