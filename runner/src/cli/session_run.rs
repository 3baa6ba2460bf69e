//! `contextos session-run`: the runner pod's entrypoint. It runs (or resumes) the Session the
//! operator handed it — the pinned bundle from a ConfigMap, the record key and tool secrets from
//! Secrets, the attempt's RunContext and the approvals from the environment — with the gateway in process, writes the
//! outcome to the termination message, and exits 0 (completed), 4 (awaiting approval) or 5
//! (failed). It needs no Kubernetes API access.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Args;
use contextos_crds::session::Approval;
use contextos_runner::{
    gateway::envelope::ApprovalGrant,
    keys::{KeyPair, PublicKey},
    records::{RecordStore, TenantId},
    run::{
        Harness, RunOutcome,
        pod::{
            APPROVALS_ENV, BUNDLE_KEY, PodBundle, PodReport, RECORD_KEY, RUN_CONTEXT_ENV, paths,
            run_context_from,
        },
    },
};

use super::{
    GlobalArgs,
    run::{EXIT_AWAITING_APPROVAL, EXIT_RUN_FAILED, Terminal, model_of},
};

#[derive(Debug, Args)]
pub struct SessionRunArgs {
    /// Directory holding the bundle ConfigMap's `bundle.json`.
    #[arg(long, default_value = paths::BUNDLE_DIR)]
    bundle_dir: PathBuf,
    /// Directory holding the Session's key Secret (`record.key`).
    #[arg(long, default_value = paths::KEYS_DIR)]
    keys_dir: PathBuf,
    /// Directory with one sub-directory per mounted Secret the tools and model reference.
    #[arg(long, default_value = paths::SECRETS_DIR)]
    secrets_dir: PathBuf,
    /// Where the outcome is written for the operator.
    #[arg(long, default_value = paths::TERMINATION_LOG)]
    termination_log: PathBuf,
}

pub async fn run(global: &GlobalArgs, args: SessionRunArgs) -> anyhow::Result<ExitCode> {
    let bundle_path = in_pod(&args.bundle_dir.join(BUNDLE_KEY));
    let text =
        std::fs::read(&bundle_path).with_context(|| format!("cannot read {}", bundle_path.display()))?;
    let pod: PodBundle = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a run bundle", bundle_path.display()))?;
    let trust = PublicKey::from_hex(&pod.trust_key).context("the bundle's trustKey")?;
    let key_path = in_pod(&args.keys_dir.join(RECORD_KEY));
    let key_text =
        std::fs::read_to_string(&key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let record_key = KeyPair::from_hex(key_text.trim())
        .with_context(|| format!("{} is not an ed25519 key", key_path.display()))?;
    let secrets = read_secrets(&in_pod(&args.secrets_dir))?;
    let approvals = approvals_from_env()?;
    let run_context_text = std::env::var(RUN_CONTEXT_ENV).with_context(|| {
        format!("{RUN_CONTEXT_ENV} is not set: the operator issues a RunContext per attempt")
    })?;
    let run_context = run_context_from(&run_context_text)
        .with_context(|| format!("{RUN_CONTEXT_ENV} is not a signed RunContext"))?;

    let bundle = pod.bundle;
    let gateway = bundle
        .gateway_bundle(secrets.clone())
        .build(trust)
        .map_err(|e| anyhow::anyhow!("agent {}: {e}", bundle.agent))?;
    let model = model_of(&bundle, &secrets)?;
    let store = global.open_store().await?;
    let tenant = TenantId::new(bundle.tenant.clone())?;
    // Resume only this run: a Session deleted and created again under the same name is a new
    // run (a new uid, so a new run id) and must not continue the old one's checkpoint.
    let resuming = store
        .latest_checkpoint(&tenant, &bundle.session)
        .await?
        .is_some_and(|c| c.run_id == run_context.context.run_id);
    let context = run_context.context.clone();
    let harness = Harness::new(&store, record_key, bundle, gateway, model)?.with_run_context(run_context);
    let mut terminal = Terminal::default();
    let report = if resuming {
        harness.resume(&approvals, &mut |p| terminal.show(p)).await?
    } else {
        harness
            .start(&context.run_id, &context.trace_id, &mut |p| terminal.show(p))
            .await?
    };
    let mut pod_report = PodReport::of(&report);
    if let Some(checkpoint) = store.latest_checkpoint(&tenant, &context.session_id).await? {
        pod_report.checkpoint = Some((checkpoint.step, checkpoint.entry_hash.to_hex()));
    }
    let message = serde_json::to_vec(&pod_report)?;
    let log = in_pod(&args.termination_log);
    if let Err(e) = std::fs::write(&log, &message) {
        eprintln!(
            "contextos: cannot write the termination message {}: {e}",
            log.display()
        );
    }
    println!("{}", String::from_utf8_lossy(&message));
    Ok(match report.outcome {
        RunOutcome::Completed { .. } => ExitCode::SUCCESS,
        RunOutcome::AwaitingApproval(_) => ExitCode::from(EXIT_AWAITING_APPROVAL),
        RunOutcome::Failed { .. } => ExitCode::from(EXIT_RUN_FAILED),
    })
}

/// A path inside the pod. Sandboxes that mount a pod's volumes under a root directory instead
/// of at `/` (the test process node) say so with `CONTEXTOS_ROOT`; in a real pod it is unset.
pub(super) fn in_pod(path: &Path) -> PathBuf {
    match std::env::var_os("CONTEXTOS_ROOT") {
        Some(root) if !root.is_empty() => {
            let mut rooted = PathBuf::from(root);
            rooted.push(path.strip_prefix("/").unwrap_or(path));
            rooted
        }
        _ => path.to_owned(),
    }
}

/// `<dir>/<secret>/<key>` files as `secret/key` → value. Kubernetes mounts each key as a file
/// (plus `..data` links, skipped).
fn read_secrets(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Ok(secrets) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for secret in secrets.flatten() {
        let name = secret.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") || !secret.path().is_dir() {
            continue;
        }
        for key in std::fs::read_dir(secret.path())?.flatten() {
            let key_name = key.file_name().to_string_lossy().into_owned();
            if key_name.starts_with("..") || !key.path().is_file() {
                continue;
            }
            let value = std::fs::read_to_string(key.path())
                .with_context(|| format!("cannot read secret file {}", key.path().display()))?;
            out.insert(format!("{name}/{key_name}"), value);
        }
    }
    Ok(out)
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
