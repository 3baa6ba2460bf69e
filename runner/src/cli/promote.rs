//! `contextos promote status <kind>/<name>`: where a ContextPack, Policy or Agent revision stands on its
//! replay gate — candidate and promoted digests, conditions, the replay Job and its top
//! divergences — read from the cluster in the current kubeconfig. With `--wait` it blocks until
//! the candidate is decided; its exit code is the gate, for release pipelines.

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use contextos_crds::{
    Agent, ContextPack, Policy,
    common::RevisionStatus,
    kube::{self, Api},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

#[derive(Debug, Subcommand)]
pub enum PromoteCommand {
    /// Print a ContextPack's, Policy's or Agent's promotion state and exit with the gate's verdict:
    /// 0 promoted, 3 replay failed, 4 no recorded history, 5 still undecided.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// `policy/<name>`, `contextpack/<name>` or `agent/<name>` (its composition).
    target: String,
    /// Namespace (default: the kubeconfig's).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Wait up to this long for the candidate to be decided, e.g. 10m.
    #[arg(long)]
    wait: Option<String>,
}

/// How the current spec stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    Promoted,
    ReplayFailed,
    NoHistory,
    Undecided,
}

pub async fn run(command: PromoteCommand) -> anyhow::Result<ExitCode> {
    let PromoteCommand::Status(args) = command;
    let (kind, name) = args.target.split_once('/').with_context(|| {
        format!(
            "{:?}: expected policy/<name>, contextpack/<name> or agent/<name>",
            args.target
        )
    })?;
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the cluster in the current kubeconfig")?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let deadline = match &args.wait {
        Some(text) => Some(tokio::time::Instant::now() + parse_duration(text)?),
        None => None,
    };
    loop {
        let (generation, (observed, conditions, revisions)) = match kind.to_ascii_lowercase().as_str() {
            "policy" | "policies" | "cpol" => {
                observe::<Policy>(&client, &namespace, name, |p| {
                    let s = p.status.unwrap_or_default();
                    (s.observed_generation, s.conditions, s.revisions)
                })
                .await?
            }
            "contextpack" | "contextpacks" | "cpack" => {
                observe::<ContextPack>(&client, &namespace, name, |p| {
                    let s = p.status.unwrap_or_default();
                    (s.observed_generation, s.conditions, s.revisions)
                })
                .await?
            }
            "agent" | "agents" => {
                observe::<Agent>(&client, &namespace, name, |a| {
                    let s = a.status.unwrap_or_default();
                    (s.observed_generation, s.conditions, s.revisions)
                })
                .await?
            }
            other => {
                bail!("{other}: promotion applies to policy/<name>, contextpack/<name> and agent/<name>")
            }
        };
        let revisions = revisions.unwrap_or_default();
        let current = observed.is_some() && observed == generation;
        let standing = if current {
            standing(&conditions, &revisions)
        } else {
            Standing::Undecided
        };
        let waiting = deadline.is_some_and(|d| tokio::time::Instant::now() < d);
        if standing != Standing::Undecided || !waiting {
            // Conditions and divergences name recorded calls and their errors.
            print!(
                "{}",
                contextos_runner::text::for_terminal_keeping_lines(&report(
                    kind,
                    &namespace,
                    name,
                    &conditions,
                    &revisions
                ))
            );
            return Ok(ExitCode::from(match standing {
                Standing::Promoted => 0,
                Standing::ReplayFailed => 3,
                Standing::NoHistory => 4,
                Standing::Undecided => 5,
            }));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// What a gated object shows of its gate: the generation its status describes, its conditions
/// and its revisions.
type GateStatus = (Option<i64>, Vec<Condition>, Option<RevisionStatus>);

/// Reads `name` and returns its generation with what `status` takes from it.
async fn observe<K>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    status: impl FnOnce(K) -> GateStatus,
) -> anyhow::Result<(Option<i64>, GateStatus)>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let object = Api::<K>::namespaced(client.clone(), namespace).get(name).await?;
    Ok((object.meta().generation, status(object)))
}

fn standing(conditions: &[Condition], revisions: &RevisionStatus) -> Standing {
    let reason = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.status.as_str(), c.reason.as_str()))
    };
    if revisions.candidate.is_some() && revisions.candidate == revisions.promoted {
        return Standing::Promoted;
    }
    match reason("ReplayPassed") {
        Some(("False", "ReplayFailed")) => Standing::ReplayFailed,
        Some(("False", "NoRecordedHistory")) => Standing::NoHistory,
        _ => Standing::Undecided,
    }
}

fn report(
    kind: &str,
    namespace: &str,
    name: &str,
    conditions: &[Condition],
    revisions: &RevisionStatus,
) -> String {
    let mut out = format!("{kind} {namespace}/{name}\n");
    let digest = |d: &Option<String>| d.clone().unwrap_or_else(|| "-".into());
    out.push_str(&format!("  candidate  {}\n", digest(&revisions.candidate)));
    out.push_str(&format!(
        "  promoted   {}{}\n",
        digest(&revisions.promoted),
        revisions
            .promoted_snapshot
            .as_ref()
            .map(|s| format!("  (ControllerRevision {s})"))
            .unwrap_or_default()
    ));
    for c in conditions {
        out.push_str(&format!(
            "  {:<18} {:<5} {:<18} {}\n",
            c.type_, c.status, c.reason, c.message
        ));
    }
    if let Some(replay) = &revisions.replay {
        out.push_str(&format!(
            "  replay Job {}: {} session(s), {} step(s), {} divergent → {}\n",
            replay.job.as_deref().unwrap_or("-"),
            replay.sessions,
            replay.decisions,
            replay.divergences,
            if replay.passed { "PASS" } else { "FAIL" }
        ));
        for line in &replay.top_divergences {
            out.push_str(&format!("    - {line}\n"));
        }
        if let Some(report) = &replay.report {
            out.push_str(&format!(
                "  full report: contextos --tenant {namespace} --store <record store> records blob {report}\n"
            ));
        }
    }
    out
}

fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    // A bare number is seconds, as it always was for --wait.
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return super::parse_span("--wait", &format!("{text}s"));
    }
    super::parse_span("--wait", text)
}
