//! The `contextos` command line: local runs, records, replay, and the runner-pod entrypoint.

use clap::Parser;

/// Run AI agents with replayable decisions.
#[derive(Debug, Parser)]
#[command(name = "contextos", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
