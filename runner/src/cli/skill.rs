//! `contextos skill eval`: a Skill's evaluation suite on this machine, as its promotion gate
//! runs it in a cluster — every scenario through the real harness with its scripted model and
//! tool answers; nothing is reached, nothing is kept.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};
use contextos_runner::{manifests::ManifestSet, skills::eval};

use super::replay::EXIT_DIVERGED;

#[derive(Debug, Subcommand)]
pub enum SkillCommand {
    /// Run the evaluation suites of the Skills in the files (the Policies they name must be in
    /// them too); exits 0 when every scenario passes, 3 when one fails.
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Manifest files or directories.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Only this Skill.
    #[arg(long)]
    skill: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(command: SkillCommand) -> anyhow::Result<ExitCode> {
    let SkillCommand::Eval(args) = command;
    let set = ManifestSet::load(&args.files)?;
    let candidates = set.skill_candidates(args.skill.as_deref())?;
    if candidates.is_empty() {
        anyhow::bail!("the files hold no Skill");
    }
    let mut passed = true;
    let mut reports = Vec::new();
    for (name, candidate) in &candidates {
        let report = eval::evaluate(name, candidate).await;
        passed &= report.passed();
        if !args.json {
            print_report(&report);
        }
        reports.push(report);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIVERGED)
    })
}

fn print_report(report: &eval::SuiteReport) {
    println!(
        "Skill {} (version {}): {} scenario(s), {} check(s), {} failed: {}",
        report.skill,
        report.version,
        report.scenarios.len(),
        report.checks(),
        report.failed_checks(),
        if report.passed() { "PASS" } else { "FAIL" }
    );
    for scenario in &report.scenarios {
        let verdict = if scenario.passed() { "pass" } else { "FAIL" };
        println!(
            "  {verdict} {} ({}, {} check(s))",
            scenario.name,
            contextos_runner::text::for_terminal(&scenario.outcome.to_string()),
            scenario.checks
        );
        for failure in &scenario.failures {
            println!(
                "       {}",
                contextos_runner::text::for_terminal(&failure.to_string())
            );
        }
    }
}
