//! `contextos run | resume | approve`: a governed session on this machine — the gateway in
//! process, records in the data directory's embedded store (or `--store`), and approvals kept
//! beside them the way a Session's `spec.approvals` keeps them in a cluster.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::Args;
use contextos_crds::session::{ApprovalDecision, Resolution, ResolvedOutcome};
use contextos_runner::text::{for_terminal, for_terminal_keeping_lines};
use contextos_runner::{
    gateway::{CallOutcome, envelope::ApprovalGrant},
    keys::KeyPair,
    manifests::ManifestSet,
    model::Model,
    records::{AnyStore, EntryBody, RecordStore, RunFilter, TenantId, read_run},
    run::{
        Harness, Progress, RunOutcome, RunReport,
        bundle::RunBundle,
        checkpoint::{AwaitingApproval, UnresolvedCall},
    },
    run_context::random_hex,
};
use tracing::Instrument as _;

use super::GlobalArgs;

/// Exit code of a run that waits for a human's approval.
pub const EXIT_AWAITING_APPROVAL: u8 = 4;
/// Exit code of a run that ended without an accepted output (recorded as failed).
pub const EXIT_RUN_FAILED: u8 = 5;

/// How calls reach tools from this machine (models are reached at their Agent's
/// `model.endpoint`, with the key `--secret` gives).
#[derive(Debug, Args)]
pub struct ToolAccess {
    /// Secret value for `<secret>/<key>` (as a Secret would hold it), e.g.
    /// `ops-tools-webhook/hmac-key=...`; `=@file` reads the value from a file. Secrets found
    /// in the `-f` files are used too.
    #[arg(long = "secret", value_name = "SECRET/KEY=VALUE")]
    secrets: Vec<String>,
    /// Send tool calls for URLs starting with FROM to TO instead, e.g.
    /// `http://ops-tools.shop-platform.svc:8080=http://127.0.0.1:8080`, to run against local
    /// stand-ins of in-cluster services.
    #[arg(long = "endpoint-override", value_name = "FROM=TO")]
    endpoint_overrides: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Manifest files or directories: the Session and the Agent, ContextPack, Policies,
    /// SandboxProfile and ConfigMaps it references.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Which Session to run, when the files hold several.
    #[arg(long)]
    session: Option<String>,
    /// Run although a SpendQuota in the files selects this run: quotas are enforced by the
    /// gateway service in a cluster, and a local run is not held to them.
    #[arg(long)]
    without_quotas: bool,
    #[command(flatten)]
    access: ToolAccess,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The Session whose run continues from its latest checkpoint (under the specs it was
    /// pinned to when it started).
    session: String,
    /// Files to read Secrets from (the run's specs come from its record, not from these).
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    #[command(flatten)]
    access: ToolAccess,
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The Session whose pending call to decide.
    session: String,
    /// The call hash printed when the run paused (a prefix of at least 12 characters is enough).
    #[arg(long = "call")]
    call_hash: String,
    /// Who decides: a user the rule lists, or a member of a group it lists (see --group).
    #[arg(long = "as")]
    approver: String,
    /// Groups the approver belongs to.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Refuse the call instead of approving it.
    #[arg(long)]
    reject: bool,
    /// Why (recorded with the decision).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// The Session whose call's outcome was unknown.
    session: String,
    /// The call id printed when the run paused (e.g. `4.0`).
    #[arg(long = "call")]
    call_id: String,
    /// The tool did what was asked: the run goes on as if it had answered.
    #[arg(long, conflicts_with_all = ["did_not_act", "answer"], required_unless_present_any = ["did_not_act", "answer"])]
    acted: bool,
    /// The tool did not act: the run goes on as if the call had failed. For a remote agent's
    /// question: decline it (its task is cancelled).
    #[arg(long, conflicts_with = "answer")]
    did_not_act: bool,
    /// For a remote agent's question (`--call <call>.q<n>`): the answer sent to it, which
    /// continues its task.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    answer: Option<String>,
    /// Who found out.
    #[arg(long = "as")]
    resolver: String,
    /// What was found (shown to the agent and recorded). An answer (`--answer`) is its own
    /// note.
    #[arg(long, conflicts_with = "answer")]
    note: Option<String>,
}

/// Records a human's finding on a call whose outcome was unknown; `resume` then goes on.
pub async fn resolve(global: &GlobalArgs, args: ResolveArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_store().await?;
    let Some(unresolved) = unresolved_call(&store, &tenant, &args.session).await? else {
        bail!("session {} has no call whose outcome is unknown", args.session);
    };
    if unresolved.call_id != args.call_id {
        bail!(
            "session {} waits for a finding on call {} ({}), not {}",
            args.session,
            unresolved.call_id,
            unresolved.tool,
            args.call_id
        );
    }
    let path = decisions_path(global, "resolutions", &tenant, &args.session);
    let question = unresolved.for_call.is_some();
    let (outcome, note) = match (&args.answer, args.acted) {
        (Some(answer), _) if question => (ResolvedOutcome::Answered, Some(answer.clone())),
        (Some(_), _) => bail!(
            "call {} asked no question: say whether it acted with --acted or --did-not-act",
            args.call_id
        ),
        (None, true) if question => bail!(
            "{} is a question of the remote agent of {}: answer it with --answer, or decline it with --did-not-act",
            args.call_id,
            unresolved.tool
        ),
        (None, true) => (ResolvedOutcome::Acted, args.note.clone()),
        (None, false) => (ResolvedOutcome::DidNotAct, args.note.clone()),
    };
    let mut resolutions: Vec<Resolution> = read_decisions(&path)?;
    resolutions.retain(|r| r.call_id != args.call_id);
    resolutions.push(Resolution {
        call_id: args.call_id.clone(),
        outcome,
        resolver: args.resolver.clone(),
        note,
    });
    write_decisions(&path, &resolutions)?;
    let what = match outcome {
        ResolvedOutcome::Acted => "acted",
        ResolvedOutcome::DidNotAct if question => "is declined",
        ResolvedOutcome::DidNotAct => "did not act",
        ResolvedOutcome::Answered => "is answered",
    };
    println!(
        "{}: {} {} {what}; continue with `contextos resume {}`",
        args.resolver, unresolved.tool, unresolved.arguments, args.session
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn run(global: &GlobalArgs, args: RunArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let set = ManifestSet::load(&args.files)?;
    if let Some(refused) = set.consent_in_files() {
        return Err(refused.into());
    }
    let bundle = set.bundle(tenant.as_str(), args.session.as_deref())?;
    if let Some(tool) = bundle
        .agent_spec
        .tools
        .iter()
        .find(|t| t.adapter.mcp.as_ref().is_some_and(|mcp| mcp.command.is_some()))
    {
        // The profile's pod settings have nothing to apply to here: said, not silently skipped.
        eprintln!(
            "note: tool {} starts an MCP server with a command; a local run starts it as a process of this machine with a clean environment, outside any sandbox: its SandboxProfile's pod settings (image, resources, egress, seccompProfile, runAsUser, runtimeClassName, readOnlyRootFilesystem, activeDeadlineSeconds) confine it only in a cluster, in its capability pod",
            tool.name
        );
    }
    let quotas = set.quotas_selecting(args.session.as_deref())?;
    if !quotas.is_empty() && !args.without_quotas {
        bail!(
            "{}: selects this run, but SpendQuotas are enforced by the gateway service in a cluster and a local run is not held to them; leave the SpendQuota out of -f, or pass --without-quotas to run without it",
            quotas.join("; ")
        );
    }
    let store = global.open_store().await?;
    if let Some(run) = store
        .list_runs(
            &tenant,
            &RunFilter {
                session_id: Some(bundle.session.clone()),
                limit: Some(1),
                ..RunFilter::default()
            },
        )
        .await?
        .into_iter()
        .find(|r| r.outcome == "running")
    {
        bail!(
            "session {} already has an unfinished run {} (paused for approval or interrupted); continue it with `contextos resume {}`",
            bundle.session,
            run.run_id,
            bundle.session
        );
    }
    let key = KeyPair::load_or_create(&global.key_path())?;
    let secrets = secrets(&set, &args.access)?;
    let harness = harness(global, &store, key, bundle, secrets, &args.access)?;
    let run_id = format!("{}-{}", harness.bundle().session, random_hex(4));
    // The Session's trace: the one its `contextos.dev/traceparent` annotation names, or its own.
    let caller = traceparent_annotation(&set, &harness.bundle().session)?;
    let trace_id = caller
        .as_deref()
        .and_then(contextos_runner::telemetry::traceparent_trace_id)
        .unwrap_or_else(|| random_hex(16));
    let session = contextos_runner::telemetry::trace_id_of(&trace_id).map(|trace| {
        contextos_runner::telemetry::session_span(
            tenant.as_str(),
            &harness.bundle().session,
            trace,
            caller.as_deref(),
        )
    });
    let mut observer = Terminal::default();
    let mut show = |p: &contextos_runner::run::Progress<'_>| observer.show(p);
    let started = harness.start(&run_id, &trace_id, &mut show);
    let report = match &session {
        Some(span) => started.instrument(span.clone()).await?,
        None => started.await?,
    };
    if let Some(span) = session {
        span.record("contextos.outcome", report.outcome.name());
    }
    finish(global, &tenant, &report)
}

/// The Session's `contextos.dev/traceparent` annotation, when it has one; an annotation that
/// is not a W3C traceparent is an error naming it.
fn traceparent_annotation(set: &ManifestSet, session: &str) -> anyhow::Result<Option<String>> {
    use contextos_runner::telemetry::{TRACEPARENT_ANNOTATION, parse_traceparent};
    let Some(manifest) = set.find("Session", session) else {
        return Ok(None);
    };
    let Some(value) = manifest
        .value
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(TRACEPARENT_ANNOTATION))
    else {
        return Ok(None);
    };
    match value.as_str().filter(|v| parse_traceparent(v).is_some()) {
        Some(traceparent) => Ok(Some(traceparent.to_owned())),
        None => bail!(
            "{}: Session {session}: metadata.annotations[{TRACEPARENT_ANNOTATION}]: {value} is not a W3C traceparent (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>); fix it or remove it",
            manifest.file.display()
        ),
    }
}

pub async fn resume(global: &GlobalArgs, args: ResumeArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_store().await?;
    let bundle = recorded_bundle(&store, &tenant, &args.session).await?;
    let set = ManifestSet::load(&args.files)?;
    let key = KeyPair::load_or_create(&global.key_path())?;
    let secrets = secrets(&set, &args.access)?;
    let approvals = read_decisions::<ApprovalGrant>(&approvals_path(global, &tenant, &args.session))?;
    let resolutions = read_decisions(&decisions_path(global, "resolutions", &tenant, &args.session))?;
    let harness = harness(global, &store, key, bundle, secrets, &args.access)?.with_resolutions(resolutions);
    let mut observer = Terminal::default();
    let report = harness.resume(&approvals, &mut |p| observer.show(p)).await?;
    finish(global, &tenant, &report)
}

pub async fn approve(global: &GlobalArgs, args: ApproveArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_store().await?;
    let Some(awaiting) = pending_approval(&store, &tenant, &args.session).await? else {
        bail!("session {} has no call waiting for approval", args.session);
    };
    if args.call_hash.len() < 12 || !awaiting.call_hash.starts_with(&args.call_hash) {
        bail!(
            "session {} waits for approval of call {} ({}), not {}",
            args.session,
            awaiting.call_hash,
            awaiting.tool,
            args.call_hash
        );
    }
    let approvers = &awaiting.approvers;
    let allowed =
        approvers.users.contains(&args.approver) || args.groups.iter().any(|g| approvers.groups.contains(g));
    if !allowed {
        bail!(
            "{} may not decide this call: rule {} lets users [{}] and groups [{}] approve (pass --group if the approver is in one)",
            args.approver,
            awaiting.rule,
            approvers.users.join(", "),
            approvers.groups.join(", ")
        );
    }
    let path = approvals_path(global, &tenant, &args.session);
    let mut approvals = read_decisions::<ApprovalGrant>(&path)?;
    approvals.push(ApprovalGrant {
        call_hash: awaiting.call_hash.clone(),
        decision: if args.reject {
            ApprovalDecision::Reject
        } else {
            ApprovalDecision::Approve
        },
        approver: args.approver.clone(),
        reason: args.reason.clone(),
    });
    write_decisions(&path, &approvals)?;
    println!(
        "{} {} of {} {} (call {}); continue with `contextos resume {}`",
        args.approver,
        if args.reject { "rejected" } else { "approved" },
        awaiting.tool,
        awaiting.arguments,
        &awaiting.call_hash[..12],
        args.session
    );
    Ok(ExitCode::SUCCESS)
}

fn harness<'s>(
    global: &GlobalArgs,
    store: &'s AnyStore,
    key: KeyPair,
    bundle: RunBundle,
    secrets: BTreeMap<String, String>,
    access: &ToolAccess,
) -> anyhow::Result<Harness<'s, AnyStore>> {
    let gateway = bundle
        .gateway_bundle(secrets.clone())
        .build(key.public())
        .map_err(|e| anyhow::anyhow!("agent {}: {e}", bundle.agent))?
        .with_endpoint_overrides(parse_overrides(&access.endpoint_overrides)?)
        // A stdio MCP server's diagnostics go to its own file, not this terminal.
        .with_stdio_logs(global.data_dir.join("logs"));
    let model = model_of(&bundle, &secrets)?;
    let models =
        contextos_runner::model::routing::Models::for_bundle(&bundle, &secrets, |model, _| Ok(model))
            .map_err(|e| anyhow::anyhow!("{e}; pass --secret <secret>/<key>=... for a model key"))?;
    // The model is loaded (about a second) only for an Agent that scores its tools with it.
    let embedder = contextos_runner::discovery::by_embeddings(&bundle.agent_spec)
        .then(contextos_runner::discovery::configured_embedder)
        .flatten();
    Ok(Harness::new(store, key, bundle, gateway, model)?
        .with_models(models)
        .with_embedder(embedder))
}

pub(super) fn model_of(bundle: &RunBundle, secrets: &BTreeMap<String, String>) -> anyhow::Result<Model> {
    Model::for_bundle(bundle, secrets)
        .map_err(|e| anyhow::anyhow!("{e}; pass --secret <secret>/<key>=... for a model key"))
}

fn secrets(set: &ManifestSet, access: &ToolAccess) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = set.secrets()?;
    out.extend(secret_values(&access.secrets)?);
    Ok(out)
}

/// `--secret <secret>/<key>=VALUE` (or `=@file`) arguments, by `<secret>/<key>`.
pub(super) fn secret_values(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items {
        let (id, value) = item
            .split_once('=')
            .with_context(|| format!("--secret {item:?}: expected SECRET/KEY=VALUE"))?;
        if !id.contains('/') {
            bail!("--secret {item:?}: name the key as <secret>/<key>, e.g. ops-tools-webhook/hmac-key");
        }
        let value = match value.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("--secret {id}: cannot read {path}"))?
                .trim_end()
                .to_owned(),
            None => value.to_owned(),
        };
        out.insert(id.to_owned(), value);
    }
    Ok(out)
}

fn parse_overrides(items: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|item| {
            let (from, to) = item
                .split_once('=')
                .with_context(|| format!("--endpoint-override {item:?}: expected FROM=TO"))?;
            Ok((from.to_owned(), to.to_owned()))
        })
        .collect()
}

/// The bundle a session's latest run was pinned to, from its record.
async fn recorded_bundle(store: &AnyStore, tenant: &TenantId, session: &str) -> anyhow::Result<RunBundle> {
    let checkpoint = store.latest_checkpoint(tenant, session).await?.with_context(|| {
        format!("session {session} has no run in tenant {tenant}; start it with `contextos run -f <files>`")
    })?;
    let entries = read_run(store, tenant, &checkpoint.run_id).await?;
    let first = &entries
        .first()
        .with_context(|| format!("run {} has no entries", checkpoint.run_id))?
        .1;
    contextos_runner::run::bundle::recorded_bundle(store, tenant, &checkpoint.run_id, first)
        .await
        .map_err(|problem| anyhow::anyhow!("run {}: {problem}", checkpoint.run_id))?
        .with_context(|| {
            format!(
                "run {} has no recorded bundle; it cannot be resumed",
                checkpoint.run_id
            )
        })
}

/// The call a session's run waits on, from its latest checkpoint.
async fn pending_approval(
    store: &AnyStore,
    tenant: &TenantId,
    session: &str,
) -> anyhow::Result<Option<AwaitingApproval>> {
    checkpoint_field(store, tenant, session, "awaiting").await
}

/// The call of the session's run whose outcome is unknown, if it waits on one.
async fn unresolved_call(
    store: &AnyStore,
    tenant: &TenantId,
    session: &str,
) -> anyhow::Result<Option<UnresolvedCall>> {
    checkpoint_field(store, tenant, session, "unresolved").await
}

/// A field of the session's latest checkpoint state.
async fn checkpoint_field<T: serde::de::DeserializeOwned>(
    store: &AnyStore,
    tenant: &TenantId,
    session: &str,
    field: &str,
) -> anyhow::Result<Option<T>> {
    let Some(checkpoint) = store.latest_checkpoint(tenant, session).await? else {
        bail!("session {session} has no run in tenant {tenant}");
    };
    let entries = read_run(store, tenant, &checkpoint.run_id).await?;
    let state = entries.iter().find_map(|(_, e)| match &e.body {
        EntryBody::Checkpoint { state, .. } if e.seq == checkpoint.seq => Some(state.clone()),
        _ => None,
    });
    Ok(state
        .and_then(|s| s.get(field).cloned())
        .and_then(|a| serde_json::from_value(a).ok()))
}

/// Where a local session's human decisions are kept: `approvals` or `resolutions`.
fn decisions_path(global: &GlobalArgs, kind: &str, tenant: &TenantId, session: &str) -> PathBuf {
    global
        .data_dir
        .join(kind)
        .join(tenant.as_str())
        .join(format!("{session}.json"))
}

fn approvals_path(global: &GlobalArgs, tenant: &TenantId, session: &str) -> PathBuf {
    decisions_path(global, "approvals", tenant, session)
}

fn read_decisions<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("{} is unreadable", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes atomically (temp file + rename) so a crash never leaves half a file. The temp file
/// is new (never opened through a link someone left at a name known in advance: a data
/// directory can come with a checkout), and the rename replaces a link at `path` instead of
/// writing where it points.
fn write_decisions<T: serde::Serialize>(path: &Path, decisions: &[T]) -> anyhow::Result<()> {
    use contextos_runner::whole_file;
    let dir = path.parent().context("the decisions path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = whole_file::temporary_beside(path, &format!("{name}."), ".tmp");
    let bytes = serde_json::to_vec_pretty(decisions)?;
    whole_file::replace(path, &temporary, &bytes, whole_file::Access::Shared)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Prints the outcome and picks the exit code.
fn finish(global: &GlobalArgs, tenant: &TenantId, report: &RunReport) -> anyhow::Result<ExitCode> {
    let usage = &report.usage;
    let totals = format!(
        "{} step(s), {} tool call(s), {} tokens, {:.1}s",
        usage.steps,
        usage.tool_calls,
        usage.tokens,
        usage.wall_ms as f64 / 1000.0
    );
    let tenant_flag = if tenant.as_str() == "default" {
        String::new()
    } else {
        format!(" --tenant {tenant}")
    };
    let data_flag = if global.data_dir == Path::new(".contextos") {
        String::new()
    } else {
        format!(" --data-dir {}", global.data_dir.display())
    };
    match &report.outcome {
        RunOutcome::Completed { output, validators } => {
            println!(
                "completed: {totals}; validators passed: {}",
                validators.join(", ")
            );
            println!("output: {}", for_terminal_keeping_lines(output));
            println!(
                "record: run {} — inspect with `contextos{data_flag}{tenant_flag} records show {}`",
                report.run_id, report.run_id
            );
            Ok(ExitCode::SUCCESS)
        }
        RunOutcome::Failed { reason, message } => {
            println!("failed ({}): {}", for_terminal(reason), for_terminal(message));
            println!("record: run {} ({totals})", report.run_id);
            Ok(ExitCode::from(EXIT_RUN_FAILED))
        }
        RunOutcome::AwaitingApproval(awaiting) => {
            let mut approvers: Vec<String> = awaiting.approvers.users.clone();
            approvers.extend(awaiting.approvers.groups.iter().map(|g| format!("group {g}")));
            println!(
                "paused: {} {} needs approval ({}: {})",
                for_terminal(&awaiting.tool),
                for_terminal(&awaiting.arguments.to_string()),
                for_terminal(&awaiting.rule),
                for_terminal(&awaiting.reason)
            );
            println!("  approvers: {}", for_terminal(&approvers.join(", ")));
            println!("  call hash: {}", awaiting.call_hash);
            println!(
                "  approve with `contextos{data_flag}{tenant_flag} approve {} --call {} --as <user> [--group <group>]`, then `contextos{data_flag}{tenant_flag} resume {}`",
                report.session,
                &awaiting.call_hash[..16.min(awaiting.call_hash.len())],
                report.session
            );
            Ok(ExitCode::from(EXIT_AWAITING_APPROVAL))
        }
        RunOutcome::AwaitingResolution(unresolved) if unresolved.for_call.is_some() => {
            println!(
                "paused: {} {} (call {}): {}",
                for_terminal(&unresolved.tool),
                for_terminal(&unresolved.arguments.to_string()),
                for_terminal(unresolved.for_call.as_deref().unwrap_or_default()),
                for_terminal(&unresolved.reason)
            );
            println!(
                "  `contextos{data_flag}{tenant_flag} resolve {} --call {} --answer '…' --as <you>` (or --did-not-act to decline), then `contextos{data_flag}{tenant_flag} resume {}`",
                report.session, unresolved.call_id, report.session
            );
            Ok(ExitCode::from(EXIT_AWAITING_APPROVAL))
        }
        RunOutcome::AwaitingResolution(unresolved) => {
            println!(
                "paused: the outcome of {} {} (call {}) is unknown: {}",
                for_terminal(&unresolved.tool),
                for_terminal(&unresolved.arguments.to_string()),
                for_terminal(&unresolved.call_id),
                for_terminal(&unresolved.reason)
            );
            println!(
                "  after checking, `contextos{data_flag}{tenant_flag} resolve {} --call {} --acted|--did-not-act --as <you> [--note …]`, then `contextos{data_flag}{tenant_flag} resume {}`",
                report.session, unresolved.call_id, report.session
            );
            Ok(ExitCode::from(EXIT_AWAITING_APPROVAL))
        }
    }
}

/// Progress lines on the terminal; also the fault-injection point the crash tests use.
pub(super) struct Terminal {
    boundaries: u32,
    /// Test hook: pause for good at this durable boundary (the test then SIGKILLs the process).
    pause_at: Option<u32>,
}

impl Default for Terminal {
    fn default() -> Self {
        Self {
            boundaries: 0,
            pause_at: std::env::var(PAUSE_AT_BOUNDARY_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }
}

/// Test hook: report durable boundaries and pause for good at the N-th.
const PAUSE_AT_BOUNDARY_ENV: &str = "CONTEXTOS_FAULT_PAUSE_AT_BOUNDARY";

impl Terminal {
    pub(super) fn show(&mut self, progress: &Progress<'_>) {
        let line = match progress {
            Progress::Started {
                run_id,
                session,
                resumed,
            } => format!(
                "{} run {run_id} of session {session}",
                if *resumed { "resuming" } else { "started" }
            ),
            Progress::Context { tokens, budget, cut } => {
                format!("context: {tokens} of {budget} tokens, {cut} source(s) cut")
            }
            Progress::Turn {
                step,
                content,
                calls,
                reused,
            } => format!(
                "step {step} model{}: {}{}",
                if *reused {
                    " (recorded before the restart)"
                } else {
                    ""
                },
                one_line(content, 100),
                if *calls > 0 {
                    format!(" → {calls} call(s)")
                } else {
                    String::new()
                }
            ),
            Progress::Call { step, tool, outcome } => {
                format!("step {step}   {tool}: {}", outcome_text(outcome))
            }
            Progress::Verdict {
                step,
                verdict,
                reason,
            } => {
                format!(
                    "step {step} critic: {} — {reason}",
                    serde_json::to_value(verdict)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or("?")
                )
            }
            Progress::Boundary { step, after } => {
                let Some(pause_at) = self.pause_at else {
                    return;
                };
                self.boundaries += 1;
                println!("fault: boundary {} (step {step}, after {after})", self.boundaries);
                let _ = std::io::stdout().flush();
                if pause_at == self.boundaries {
                    println!("fault: paused at boundary {}", self.boundaries);
                    let _ = std::io::stdout().flush();
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(3600));
                    }
                }
                return;
            }
        };
        // What the model, tools and critic said, as text: never as a terminal's commands.
        println!("{}", for_terminal(&line));
        let _ = std::io::stdout().flush();
    }
}

fn outcome_text(outcome: &CallOutcome) -> String {
    match outcome {
        CallOutcome::Executed(result) if result.ok && result.cached.is_some() => {
            format!("cached → {}", one_line(&result.output.to_string(), 90))
        }
        CallOutcome::Executed(result) if result.ok => {
            format!("executed → {}", one_line(&result.output.to_string(), 90))
        }
        CallOutcome::Executed(result) => format!(
            "failed after {} attempt(s): {}",
            result.attempts,
            result.error.as_deref().unwrap_or("unknown error")
        ),
        CallOutcome::Denied { rule, reason } => format!("DENIED by {rule}: {reason}"),
        CallOutcome::NeedsApproval { rule, .. } => format!("needs approval ({rule})"),
        CallOutcome::OutcomeUnknown { reason, .. } => format!("OUTCOME UNKNOWN: {reason}"),
        CallOutcome::InProgress { call_id } => format!("still in progress ({call_id})"),
    }
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}
