//! `contextos session-run`: the runner pod's entrypoint. It runs (or resumes) the Session the
//! operator handed it — the pinned bundle from a ConfigMap, the attempt's RunContext and the
//! approvals from the environment — with every record write, tool call and model turn going to
//! the gateway service (`CONTEXTOS_GATEWAY`), authenticated by the pod's projected token. It
//! holds no credential, signing key or store address. It writes the outcome to the termination
//! message and exits 0 (completed), 4 (awaiting approval) or 5 (failed).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Args;
use contextos_crds::session::Approval;
use contextos_runner::{
    gateway::{
        envelope::ApprovalGrant,
        remote::{GatewayClient, TokenSource},
    },
    keys::KeyPair,
    records::{RecordStore, TenantId},
    run::pod::in_pod,
    run::{
        Harness, RunError, RunOutcome, RunReport,
        pod::{
            APPROVALS_ENV, BUNDLE_KEY, GATEWAY_ENV, PodBundle, PodReport, RESOLUTIONS_ENV, RUN_CONTEXT_ENV,
            paths, run_context_from,
        },
    },
};

use super::run::{EXIT_AWAITING_APPROVAL, EXIT_RUN_FAILED, Terminal};

#[derive(Debug, Args)]
pub struct SessionRunArgs {
    /// Directory holding the bundle ConfigMap's `bundle.json`.
    #[arg(long, default_value = paths::BUNDLE_DIR)]
    bundle_dir: PathBuf,
    /// The gateway service's base URL.
    #[arg(long, env = GATEWAY_ENV)]
    gateway: String,
    /// The pod's projected service-account token for the gateway's audience.
    #[arg(long, default_value_t = format!("{}/{}", paths::TOKEN_DIR, paths::TOKEN_FILE))]
    token_file: String,
    /// Where the outcome is written for the operator.
    #[arg(long, default_value = paths::TERMINATION_LOG)]
    termination_log: PathBuf,
}

impl SessionRunArgs {
    /// The credentials the pod's spans go to the gateway's relay with: its token and its run's
    /// RunContext, as every request of the run (`None` without a RunContext: the run then
    /// fails to start with the reason, and there are no spans to send).
    pub fn trace_relay(&self) -> Option<contextos_runner::telemetry::RelayCredentials> {
        use base64::Engine as _;
        let text = std::env::var(RUN_CONTEXT_ENV).ok()?;
        let context = run_context_from(&text).ok()?;
        let json = serde_json::to_vec(&context).ok()?;
        Some(contextos_runner::telemetry::RelayCredentials {
            token_file: in_pod(Path::new(&self.token_file)),
            run_context: base64::engine::general_purpose::STANDARD.encode(json),
        })
    }
}

pub async fn run(args: SessionRunArgs) -> anyhow::Result<ExitCode> {
    let bundle_path = in_pod(&args.bundle_dir.join(BUNDLE_KEY));
    let text =
        std::fs::read(&bundle_path).with_context(|| format!("cannot read {}", bundle_path.display()))?;
    let pod: PodBundle = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a run bundle", bundle_path.display()))?;
    let approvals = approvals_from_env()?;
    let run_context_text = std::env::var(RUN_CONTEXT_ENV).with_context(|| {
        format!("{RUN_CONTEXT_ENV} is not set: the operator issues a RunContext per attempt")
    })?;
    let run_context = run_context_from(&run_context_text)
        .with_context(|| format!("{RUN_CONTEXT_ENV} is not a signed RunContext"))?;
    let token = TokenSource::File(in_pod(Path::new(&args.token_file)));
    let client = GatewayClient::new(&args.gateway, token, &run_context)?;

    let bundle = pod.bundle;
    let tenant = TenantId::new(bundle.tenant.clone())?;
    // Resume only this run: a Session deleted and created again under the same name is a new
    // run (a new uid, so a new run id) and must not continue the old one's checkpoint.
    let resuming = client
        .records()
        .latest_checkpoint(&tenant, &bundle.session)
        .await?
        .is_some_and(|c| c.run_id == run_context.context.run_id);
    let context = run_context.context.clone();
    // Batches are sealed in transit with a throw-away key: the service re-signs every head with
    // the tenant's key, which never leaves it.
    let transit = KeyPair::generate()?;
    let embedder = gateway_embedder(&client, &bundle).await;
    let harness = Harness::through_gateway(&client, transit, bundle, run_context)?
        .with_resolutions(resolutions_from_env()?)
        .with_embedder(embedder);
    let mut terminal = Terminal::default();
    let outcome = if resuming {
        harness.resume(&approvals, &mut |p| terminal.show(p)).await
    } else {
        harness
            .start(&context.run_id, &context.trace_id, &mut |p| terminal.show(p))
            .await
    };
    let report = match outcome {
        Ok(report) => report,
        // The gateway refused the run for good (e.g. a Secret the Agent may not use): say so
        // in the report, so the Session fails with the reason instead of being retried.
        Err(e) if refused(&e) || e.is_subject_erased() => RunReport {
            run_id: context.run_id.clone(),
            session: context.session_id.clone(),
            outcome: RunOutcome::Failed {
                reason: if e.is_subject_erased() {
                    "SubjectErased".into()
                } else {
                    "GatewayRefused".into()
                },
                message: e.to_string(),
            },
            steps: 0,
            usage: Default::default(),
            head: None,
            replayed: Vec::new(),
        },
        Err(e) => return Err(e.into()),
    };
    let mut pod_report = PodReport::of(&report);
    if let RunOutcome::Completed { .. } = &report.outcome {
        // Without the gateway's word the operator does not believe a completion: an attempt
        // that cannot get it ends without a report, and the next resumes from the record.
        let attested = attested_completion(&client).await?;
        if pod_report.output.as_deref() != Some(attested.shown_output.as_str())
            || pod_report.output_digest.as_deref() != Some(attested.output_digest.as_str())
        {
            anyhow::bail!(
                "the gateway service attests another output for run {} than this runner reached; the next attempt resumes from the record",
                context.run_id
            );
        }
        pod_report.completion_attestation = Some(attested.signature);
    }
    // How far the run got, in the gateway's words: the operator shows a Session's progress
    // only from them. Without them (the service cannot say now) the report still says how the
    // attempt ended, and the Session keeps the progress it showed.
    match client.progress().await {
        Ok(signed) => {
            pod_report.progress = Some(signed);
            pod_report.fit();
        }
        Err(e) => eprintln!(
            "contextos: the gateway service did not sign the run's progress ({e}); the report goes without it"
        ),
    }
    let message = serde_json::to_vec(&pod_report)?;
    let log = in_pod(&args.termination_log);
    if let Err(e) = std::fs::write(&log, &message) {
        eprintln!(
            "contextos: cannot write the termination message {}: {e}",
            log.display()
        );
    }
    Ok(match report.outcome {
        RunOutcome::Completed { .. } => ExitCode::SUCCESS,
        RunOutcome::AwaitingApproval(_) | RunOutcome::AwaitingResolution(_) => {
            ExitCode::from(EXIT_AWAITING_APPROVAL)
        }
        RunOutcome::Failed { .. } => ExitCode::from(EXIT_RUN_FAILED),
    })
}

/// For an Agent that discovers its tools by embeddings, the gateway service's (a pod holds no
/// model); none if the service has none or cannot say — the run then scores by BM25 and records
/// why.
async fn gateway_embedder(
    client: &GatewayClient,
    bundle: &contextos_runner::run::bundle::RunBundle,
) -> Option<contextos_runner::discovery::embedding::Embedder> {
    use contextos_runner::discovery::embedding::{Embedder, GatewayEmbeddings};
    let wants = contextos_runner::discovery::by_embeddings(&bundle.agent_spec);
    if !wants {
        return None;
    }
    match GatewayEmbeddings::ask(client.records()).await {
        Ok(served) => served.map(Embedder::Gateway),
        Err(error) => {
            eprintln!(
                "contextos: the gateway service did not say which embeddings it serves ({error}); tools are scored by BM25"
            );
            None
        }
    }
}

/// The gateway service's word on the run's completion, asked a few times over about 15 s (a
/// replica restarting, a moment's overload) before the attempt gives up.
async fn attested_completion(
    client: &GatewayClient,
) -> anyhow::Result<contextos_runner::gateway::service::completion::CompletionAttestation> {
    let mut pause = std::time::Duration::from_millis(500);
    let mut tries = 0;
    loop {
        tries += 1;
        match client.completion().await {
            Ok(attested) => return Ok(attested),
            Err(e) if tries < 5 => {
                eprintln!(
                    "contextos: the gateway service did not attest the run's completion yet ({e}); asking again"
                );
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context("the gateway service did not attest the run's completion")
                );
            }
        }
    }
}

/// Whether the gateway service refused the run for good (retrying would change nothing),
/// including a run whose store quota is spent before its loop began (the bundle alone).
fn refused(error: &RunError) -> bool {
    use contextos_runner::records::{RecordError, StoreError};
    error.is_store_quota()
        || matches!(
            error,
            RunError::Store(StoreError::Refused(_))
                | RunError::Record(RecordError::Store(StoreError::Refused(_)))
        )
}

/// The Session's `spec.resolutions` (the gateway service checks each against the Session).
fn resolutions_from_env() -> anyhow::Result<Vec<contextos_crds::session::Resolution>> {
    match std::env::var(RESOLUTIONS_ENV) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{RESOLUTIONS_ENV} is not a list of resolutions")),
        Err(_) => Ok(Vec::new()),
    }
}

fn approvals_from_env() -> anyhow::Result<Vec<ApprovalGrant>> {
    let Ok(text) = std::env::var(APPROVALS_ENV) else {
        return Ok(Vec::new());
    };
    let approvals: Vec<Approval> =
        serde_json::from_str(&text).with_context(|| format!("{APPROVALS_ENV} is not a list of approvals"))?;
    Ok(approvals
        .into_iter()
        .map(|a| ApprovalGrant {
            call_hash: a.call_hash,
            decision: a.decision,
            approver: a.approver,
            reason: a.reason,
        })
        .collect())
}
