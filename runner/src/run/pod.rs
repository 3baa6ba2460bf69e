//! The contract between the operator and a runner pod: what the pod is handed (the pinned
//! bundle, the signed RunContext, a projected token for the gateway service, the service's
//! address) and what it hands back in its termination message (how the attempt ended). The pod
//! needs no API access, and holds no credential, key or store address.

use serde::{Deserialize, Serialize};

use super::{
    bundle::RunBundle,
    checkpoint::{AwaitingApproval, UnresolvedCall},
    engine::{RunOutcome, RunReport},
    state::Usage,
};
use crate::{
    gateway::approvals::{ApprovalRequest, CompletedRun},
    run_context::SignedRunContext,
};

/// Where a runner pod finds what it is given (volume mounts the operator sets up).
pub mod paths {
    /// The run's bundle ConfigMap, key [`super::BUNDLE_KEY`].
    pub const BUNDLE_DIR: &str = "/var/run/contextos/bundle";
    /// The projected service-account token for the gateway's audience (file [`TOKEN_FILE`]).
    pub const TOKEN_DIR: &str = "/var/run/secrets/contextos";
    /// File name of the token in [`TOKEN_DIR`].
    pub const TOKEN_FILE: &str = "gateway-token";
    /// Where the pod's outcome is written for the operator.
    pub const TERMINATION_LOG: &str = "/dev/termination-log";
}

/// Key of the bundle in its ConfigMap.
pub const BUNDLE_KEY: &str = "bundle.json";
/// Environment variable with the Session's approvals (JSON list), set per attempt. The gateway
/// service honours an approval only if the Session holds it too.
pub const APPROVALS_ENV: &str = "CONTEXTOS_APPROVALS";
/// Environment variable with the Session's `spec.resolutions` (JSON list).
pub const RESOLUTIONS_ENV: &str = "CONTEXTOS_RESOLUTIONS";
/// Environment variable with the signed RunContext (JSON) the operator issued for the attempt:
/// the specs are pinned once per run, the RunContext is fresh per attempt (an attempt may start
/// hours later, after an approval).
pub const RUN_CONTEXT_ENV: &str = "CONTEXTOS_RUN_CONTEXT";
/// Environment variable with the gateway service's base URL.
pub const GATEWAY_ENV: &str = "CONTEXTOS_GATEWAY";

/// What the operator pins for one run (an immutable ConfigMap).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodBundle {
    pub bundle: RunBundle,
    /// The SandboxProfile the run is confined by, pinned with the rest: retries run in the same
    /// sandbox even if the profile is edited or deleted meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<contextos_crds::SandboxProfileSpec>,
}

/// A path inside the pod. Sandboxes that mount a pod's volumes under a root directory instead
/// of at `/` (the test process node) say so with `CONTEXTOS_ROOT`; in a real pod it is unset.
pub fn in_pod(path: &std::path::Path) -> std::path::PathBuf {
    match std::env::var_os("CONTEXTOS_ROOT") {
        Some(root) if !root.is_empty() => {
            let mut rooted = std::path::PathBuf::from(root);
            rooted.push(path.strip_prefix("/").unwrap_or(path));
            rooted
        }
        _ => path.to_owned(),
    }
}

/// Reads the RunContext an attempt runs under.
pub fn run_context_from(text: &str) -> Result<SignedRunContext, serde_json::Error> {
    serde_json::from_str(text)
}

/// How an attempt ended, as the pod's termination message (at most 4 KiB).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    pub outcome: ReportedOutcome,
    pub run_id: String,
    pub steps: u32,
    pub usage: Usage,
    /// Hash of the newest record entry.
    #[serde(default)]
    pub head: Option<String>,
    /// The accepted output (cut to fit the message: see [`shown_output`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// `sha256:` of the whole accepted output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_digest: Option<String>,
    /// The gateway's signature over the completion (a
    /// [`crate::gateway::approvals::CompletedRun`]): without it a completion is not believed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_attestation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<AwaitingApproval>,
    /// The call whose outcome is unknown (outcome `awaiting_resolution`; arguments cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<UnresolvedCall>,
    /// How far the run got, as the gateway signed it (the latest checkpoint too): the operator
    /// shows a Session's steps, usage, record head and checkpoint only from it (`steps`, `usage`
    /// and `head` above are the runner's word; only its wall time is shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::gateway::approvals::SignedRunProgress>,
}

/// How an attempt ended, in its report. An attempt that reports nothing (or something else)
/// crashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedOutcome {
    /// The run ended with an output that passed validation (`output`).
    Completed,
    /// The run ended without one (`reason`, `message`).
    Failed,
    /// A call waits for a person's decision (`awaiting`).
    AwaitingApproval,
    /// A call's outcome is unknown until a person says whether it acted (`unresolved`).
    AwaitingResolution,
}

/// Bytes of output and messages kept so the report fits a termination message.
const TEXT_LIMIT: usize = 1024;
/// The kubelet keeps at most 4096 bytes of a termination message; the report stays below.
const MESSAGE_LIMIT: usize = 3800;

impl PodReport {
    pub fn of(report: &RunReport) -> Self {
        let mut out = Self {
            outcome: match &report.outcome {
                RunOutcome::Completed { .. } => ReportedOutcome::Completed,
                RunOutcome::Failed { .. } => ReportedOutcome::Failed,
                RunOutcome::AwaitingApproval(_) => ReportedOutcome::AwaitingApproval,
                RunOutcome::AwaitingResolution(_) => ReportedOutcome::AwaitingResolution,
            },
            run_id: report.run_id.clone(),
            steps: report.steps,
            usage: report.usage.clone(),
            head: report.head.map(|h| h.to_hex()),
            output: None,
            output_digest: None,
            completion_attestation: None,
            reason: None,
            message: None,
            awaiting: None,
            unresolved: None,
            progress: None,
        };
        match &report.outcome {
            RunOutcome::Completed { output, .. } => {
                out.output = Some(shown_output(output));
                out.output_digest = Some(CompletedRun::digest_of(output));
            }
            RunOutcome::Failed { reason, message } => {
                out.reason = Some(reason.clone());
                out.message = Some(cut(message));
            }
            RunOutcome::AwaitingApproval(awaiting) => {
                let mut awaiting = awaiting.clone();
                let arguments = awaiting.arguments.to_string();
                if arguments.len() > TEXT_LIMIT {
                    awaiting.arguments_digest = Some(ApprovalRequest::digest_of(&awaiting.arguments));
                    awaiting.arguments = serde_json::Value::String(cut(&arguments));
                }
                out.awaiting = Some(awaiting);
            }
            RunOutcome::AwaitingResolution(unresolved) => {
                let mut unresolved = unresolved.clone();
                let arguments = unresolved.arguments.to_string();
                if arguments.len() > TEXT_LIMIT {
                    unresolved.arguments_digest = Some(ApprovalRequest::digest_of(&unresolved.arguments));
                    unresolved.arguments = serde_json::Value::String(cut(&arguments));
                }
                out.unresolved = Some(unresolved);
            }
        }
        out.fit();
        out
    }

    /// Shrinks the free-text parts until the JSON fits a termination message (escaping can
    /// make text several times longer than its characters); again after the gateway's signed
    /// progress is added.
    pub fn fit(&mut self) {
        let size = |r: &Self| serde_json::to_vec(r).map_or(usize::MAX, |v| v.len());
        let short = |text: &mut Option<String>| {
            if let Some(t) = text {
                *t = t.chars().take(160).collect::<String>() + "…";
            }
        };
        if size(self) <= MESSAGE_LIMIT {
            return;
        }
        // The output is shown as the gateway attests it ([`shown_output`] keeps it small
        // enough): shortening it would void the attestation.
        short(&mut self.message);
        short(&mut self.reason);
        if let Some(awaiting) = &mut self.awaiting {
            if awaiting.arguments_digest.is_none() {
                awaiting.arguments_digest = Some(ApprovalRequest::digest_of(&awaiting.arguments));
            }
            awaiting.arguments = serde_json::Value::String("(cut; see the record)".into());
            // As the gateway signed it (a reason longer is signed in this form).
            awaiting.reason = ApprovalRequest::shown_reason(&awaiting.reason);
        }
        // Its reason is signed and stays whole (the gateway keeps it short); the arguments
        // are shown by their digest.
        if let Some(unresolved) = &mut self.unresolved {
            if unresolved.arguments_digest.is_none() {
                unresolved.arguments_digest = Some(ApprovalRequest::digest_of(&unresolved.arguments));
            }
            unresolved.arguments = serde_json::Value::String("(cut; see the record)".into());
        }
        if size(self) > MESSAGE_LIMIT {
            self.message = None;
        }
    }
}

/// Bytes the output shown in a report may take as JSON (escaping included), so a report with
/// it always fits a termination message whole.
const SHOWN_OUTPUT_BYTES: usize = 1200;

/// An output as a report shows it, and the gateway attests it: the whole output if it is short,
/// otherwise its first part (whole characters, at most [`SHOWN_OUTPUT_BYTES`] as JSON) and `…`.
pub fn shown_output(output: &str) -> String {
    let escaped = |c: char| match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    };
    let mut used = 0;
    for (i, c) in output.char_indices() {
        used += escaped(c);
        // Room is kept for the `…` (3 bytes).
        if used > SHOWN_OUTPUT_BYTES - 3 {
            return format!("{}…", &output[..i]);
        }
    }
    output.to_owned()
}

fn cut(text: &str) -> String {
    if text.len() <= TEXT_LIMIT {
        return text.to_owned();
    }
    let mut end = TEXT_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::engine::RunOutcome;

    /// The gateway's signed progress at its longest.
    fn largest_progress() -> crate::gateway::approvals::SignedRunProgress {
        crate::gateway::approvals::SignedRunProgress {
            progress: crate::gateway::approvals::RunProgress {
                run_id: "r".repeat(256),
                pod: "p".repeat(253),
                pod_uid: "0d4c6a1e-5b7f-4c39-9e2a-7f1b2c3d4e5f".into(),
                ended: true,
                head: Some("ef".repeat(32)),
                steps: u32::MAX,
                tokens: u64::MAX,
                tool_calls: u32::MAX,
                checkpoint: Some((u32::MAX, "cd".repeat(32))),
            },
            signature: "ab".repeat(64),
        }
    }

    #[test]
    fn a_failure_with_the_gateways_progress_fits_a_termination_message() {
        let report = RunReport {
            run_id: "r".repeat(256),
            session: "s".into(),
            // Just within the limit alone (quotes escape to two bytes each).
            outcome: RunOutcome::Failed {
                reason: "\"".repeat(400),
                message: "\"".repeat(2000),
            },
            steps: 3,
            usage: Usage::default(),
            head: None,
            replayed: vec![],
        };
        let mut pod_report = PodReport::of(&report);
        let alone = serde_json::to_vec(&pod_report).expect("json").len();
        assert!(alone > 3000 && alone <= MESSAGE_LIMIT, "{alone} bytes");
        pod_report.progress = Some(largest_progress());
        pod_report.fit();
        let json = serde_json::to_vec(&pod_report).expect("json");
        assert!(json.len() <= MESSAGE_LIMIT, "{} bytes", json.len());
        assert!(pod_report.progress.is_some(), "the signed progress is kept whole");
    }

    #[test]
    fn a_report_always_fits_a_termination_message() {
        let report = RunReport {
            run_id: "r".into(),
            session: "s".into(),
            outcome: RunOutcome::Completed {
                output: "\"\u{1}".repeat(5000),
                validators: vec![],
            },
            steps: 3,
            usage: Usage::default(),
            head: None,
            replayed: vec![],
        };
        let mut pod_report = PodReport::of(&report);
        // With everything a completion carries: its digest, the gateway's signature and a long
        // run id.
        pod_report.completion_attestation = Some("ab".repeat(64));
        pod_report.run_id = "r".repeat(256);
        // And the gateway's signed progress.
        pod_report.progress = Some(largest_progress());
        let json = serde_json::to_vec(&pod_report).expect("json");
        assert!(json.len() <= MESSAGE_LIMIT, "{} bytes", json.len());
        // The output is shown as the gateway attests it: its first part, whole characters.
        let shown = pod_report.output.as_deref().expect("shown");
        assert_eq!(shown, shown_output(&"\"\u{1}".repeat(5000)));
        assert!(shown.ends_with('…') && shown.len() < 600, "{}", shown.len());
        assert_eq!(shown_output("short"), "short");
        let wide = "é".repeat(2000);
        let shown = shown_output(&wide);
        assert!(shown.ends_with('…') && wide.starts_with(shown.trim_end_matches('…')));
    }
}
