//! `contextos digest`: the Chief-of-Staff digest of a tenant's window — what its agents did,
//! what failed and why, what recurs, the proposals that wait for a decision with their replay
//! verdicts, and what was promoted — as text, JSON or one self-contained HTML page. Proposals
//! and promotions are read from the cluster (`--cluster`), runs from the record store.

use std::process::ExitCode;

use anyhow::Context as _;
use contextos_crds::{
    Agent, ContextPack, Policy, Proposal,
    common::RevisionStatus,
    proposal::{DecisionAction, ProposalStatus},
};
use contextos_runner::{
    digest::{Digest, Promotion, ProposalLine},
    insights::{Thresholds, open_questions, synthesize},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Api, api::ListParams};

use super::GlobalArgs;

#[derive(Debug, clap::Args)]
pub struct DigestArgs {
    /// The window (e.g. 24h, 7d).
    #[arg(long, default_value = "7d")]
    since: String,
    /// Read the tenant's Proposals and promotions from the cluster of the current kubeconfig.
    #[arg(long)]
    cluster: bool,
    /// text (default), json, or html (one self-contained page).
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Format {
    Text,
    Json,
    Html,
}

pub async fn run(global: &GlobalArgs, args: DigestArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let (gathered, since_ms) = super::insights::gather_since(global, &tenant, &args.since, None).await?;
    let thresholds = Thresholds::default();
    let mut digest = Digest::new(
        tenant.as_str(),
        &args.since,
        &gathered,
        synthesize(&gathered.signals, thresholds),
        open_questions(&gathered.signals, thresholds),
    );
    if args.cluster {
        let client = kube::Client::try_default()
            .await
            .context("cannot reach the cluster of the current kubeconfig (KUBECONFIG, ~/.kube/config)")?;
        let namespace = tenant.as_str();
        digest.proposals = Some(proposals(&client, namespace).await?);
        digest.promotions = Some(promotions(&client, namespace, since_ms).await?);
    }
    match args.format {
        Format::Text => print!(
            "{}",
            contextos_runner::text::for_terminal_keeping_lines(&digest.text())
        ),
        Format::Json => println!("{}", serde_json::to_string_pretty(&digest)?),
        Format::Html => print!("{}", digest.html()),
    }
    Ok(ExitCode::SUCCESS)
}

async fn proposals(client: &kube::Client, namespace: &str) -> anyhow::Result<Vec<ProposalLine>> {
    let listed = Api::<Proposal>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .with_context(|| format!("cannot list Proposals in namespace {namespace}"))?;
    Ok(listed
        .items
        .into_iter()
        .map(|p| {
            let status: ProposalStatus = p.status.clone().unwrap_or_default();
            let replay = status.replay.as_ref().map(|r| {
                format!(
                    "{} — {} session(s), {} changed as intended, {} other divergence(s)",
                    if r.passed { "passed" } else { "failed" },
                    r.sessions,
                    status.intended_divergences.unwrap_or(0),
                    r.divergences
                )
            });
            let why = condition(&status.conditions, "Ready").map(|c| c.message.clone());
            ProposalLine {
                name: p.metadata.name.clone().unwrap_or_default(),
                target: format!("{}/{}", p.spec.target.kind.as_str(), p.spec.target.name),
                phase: status
                    .phase
                    .map_or_else(|| "New".to_owned(), |phase| format!("{phase:?}")),
                changes: status.changes.clone(),
                replay,
                why,
                decided_by: p.spec.decision.as_ref().map(|d| {
                    format!(
                        "{} ({})",
                        d.by,
                        match d.action {
                            DecisionAction::Accept => "accepted",
                            DecisionAction::Reject => "rejected",
                        }
                    )
                }),
            }
        })
        .collect())
}

fn condition<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Revisions that came into force in the window: each object's `Promoted` condition turned
/// True then.
async fn promotions(client: &kube::Client, namespace: &str, since_ms: i64) -> anyhow::Result<Vec<Promotion>> {
    let mut out = Vec::new();
    let mut add =
        |kind: &str, name: Option<String>, conditions: &[Condition], revisions: Option<&RevisionStatus>| {
            let (Some(promoted), Some(revisions)) = (condition(conditions, "Promoted"), revisions) else {
                return;
            };
            let at = promoted.last_transition_time.0;
            if promoted.status != "True" || at.as_millisecond() < since_ms {
                return;
            }
            out.push(Promotion {
                object: format!("{kind}/{}", name.unwrap_or_default()),
                revision: revisions.promoted.clone().unwrap_or_default(),
                by: revisions
                    .promoted_by
                    .and_then(|b| serde_json::to_value(b).ok())
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                at: at.to_string(),
            });
        };
    let context = |kind: &str| format!("cannot list {kind} objects in namespace {namespace}");
    for p in Api::<Policy>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .with_context(|| context("Policy"))?
    {
        let status = p.status.unwrap_or_default();
        add(
            "Policy",
            p.metadata.name,
            &status.conditions,
            status.revisions.as_ref(),
        );
    }
    for p in Api::<ContextPack>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .with_context(|| context("ContextPack"))?
    {
        let status = p.status.unwrap_or_default();
        add(
            "ContextPack",
            p.metadata.name,
            &status.conditions,
            status.revisions.as_ref(),
        );
    }
    for a in Api::<Agent>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .with_context(|| context("Agent"))?
    {
        let status = a.status.unwrap_or_default();
        add(
            "Agent",
            a.metadata.name,
            &status.conditions,
            status.revisions.as_ref(),
        );
    }
    out.sort_by(|a, b| b.at.cmp(&a.at));
    Ok(out)
}
