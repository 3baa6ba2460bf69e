//! What the records show agents did, for the dynamic audit (`contextos audit --records`): per run
//! in a window, each call's tool and the decisions on it (applied and dryRun), dead letters, and
//! how the run ended. Gathering reads the store (IO); [`RunEvidence::from_entries`] is pure.

use std::collections::BTreeMap;

use contextos_crds::{
    common::{ToolKind, ToolRisk},
    policy::PolicyEffect,
};

use crate::records::{
    EntryBody, RecordEntry, RecordStore, RunFilter, TenantId,
    read::{ReadError, read_run},
};

/// Most runs one audit reads (newest first); a wider window is cut to these.
pub const MAX_RUNS: usize = 10_000;

/// The runs of one tenant in the audited window.
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    /// The tenant (namespace) the runs belong to: only that namespace's objects are judged.
    pub tenant: String,
    pub runs: Vec<RunEvidence>,
    /// Runs left out: unreadable (id and why), and whether the window held more than
    /// [`MAX_RUNS`].
    pub unreadable: Vec<(String, String)>,
    pub truncated: bool,
}

/// One run, reduced to what the audit judges.
#[derive(Clone, Debug, Default)]
pub struct RunEvidence {
    pub run_id: String,
    pub agent: String,
    /// How it failed (`reason`, `message`), if it did.
    pub failure: Option<(String, String)>,
    pub calls: Vec<CallEvidence>,
}

/// One tool call of a run.
#[derive(Clone, Debug, Default)]
pub struct CallEvidence {
    pub tool: String,
    /// As the call was requested (what a rule's static match is judged by).
    pub risk: Option<ToolRisk>,
    pub kind: Option<ToolKind>,
    /// The applied decision's rule (`policy/rule`, `policy/default`, `safety/…`) and effect.
    pub decision: Option<(String, PolicyEffect)>,
    /// dryRun policies' decisions: rule and effect.
    pub shadows: Vec<(String, PolicyEffect)>,
    pub dead_lettered: bool,
}

impl RunEvidence {
    /// The evidence in a run's entries.
    pub fn from_entries(run_id: &str, agent: &str, entries: &[RecordEntry]) -> Self {
        let mut calls: BTreeMap<String, CallEvidence> = BTreeMap::new();
        let mut order = Vec::new();
        let mut failure = None;
        for entry in entries {
            match &entry.body {
                EntryBody::ToolCallRequested(call) => {
                    order.push(call.call_id.clone());
                    let evidence = calls.entry(call.call_id.clone()).or_default();
                    evidence.tool = call.tool.clone();
                    evidence.risk = Some(call.risk);
                    evidence.kind = Some(call.kind);
                }
                EntryBody::PolicyDecision(decision) => {
                    let call = calls.entry(decision.call_id.clone()).or_default();
                    if decision.dry_run {
                        call.shadows.push((decision.rule.clone(), decision.effect));
                    } else {
                        call.decision = Some((decision.rule.clone(), decision.enforced));
                    }
                }
                EntryBody::DeadLettered { call_id, tool, .. } => {
                    let call = calls.entry(call_id.clone()).or_default();
                    call.dead_lettered = true;
                    if call.tool.is_empty() {
                        call.tool = tool.clone();
                    }
                }
                EntryBody::Failed { reason, message } => failure = Some((reason.clone(), message.clone())),
                _ => {}
            }
        }
        Self {
            run_id: run_id.to_owned(),
            agent: agent.to_owned(),
            failure,
            calls: order.iter().filter_map(|id| calls.remove(id)).collect(),
        }
    }
}

/// The runs of `tenant` started at or after `since_ms` (at most [`MAX_RUNS`], newest first).
pub async fn gather<S: RecordStore>(
    store: &S,
    tenant: &TenantId,
    since_ms: i64,
) -> Result<Evidence, ReadError> {
    let filter = RunFilter {
        since_ms: Some(since_ms),
        limit: Some(MAX_RUNS),
        ..RunFilter::default()
    };
    let mut runs = Vec::new();
    let mut unreadable = Vec::new();
    let summaries = store.list_runs(tenant, &filter).await?;
    let truncated = summaries.len() >= MAX_RUNS;
    for summary in summaries {
        // One damaged run is noted and skipped, not a reason to audit nothing.
        match read_run(store, tenant, &summary.run_id).await {
            Ok(entries) => {
                let entries: Vec<RecordEntry> = entries.into_iter().map(|(_, entry)| entry).collect();
                runs.push(RunEvidence::from_entries(
                    &summary.run_id,
                    &summary.agent,
                    &entries,
                ));
            }
            Err(ReadError::Store(error)) => return Err(ReadError::Store(error)),
            Err(error) => unreadable.push((summary.run_id.clone(), error.to_string())),
        }
    }
    Ok(Evidence {
        tenant: tenant.to_string(),
        runs,
        unreadable,
        truncated,
    })
}
