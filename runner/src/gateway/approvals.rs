//! What the gateway asks of humans, and how its requests are vouched for: single-use approvals
//! (each approved call hash may execute once), approval requests and reports of calls whose
//! outcome is unknown, both signed with the tenant's key so that whoever relays them (a runner
//! pod's report) cannot change what people are shown.

use std::{collections::HashSet, sync::Mutex};

/// Call hashes whose approval has been used.
#[derive(Debug, Default)]
pub struct ApprovalBook {
    used: Mutex<HashSet<String>>,
}

impl ApprovalBook {
    /// Marks `call_hash` used; false if it was used before.
    pub fn consume(&self, call_hash: &str) -> bool {
        self.used
            .lock()
            .map(|mut used| used.insert(call_hash.to_owned()))
            .unwrap_or(false)
    }

    /// Forgets every used approval (before they are restored from a record again).
    pub fn clear(&self) {
        if let Ok(mut used) = self.used.lock() {
            used.clear();
        }
    }

    /// Restores used approvals (e.g. read back from a run's record after a restart).
    pub fn restore(&self, hashes: impl IntoIterator<Item = String>) {
        if let Ok(mut used) = self.used.lock() {
            used.extend(hashes);
        }
    }
}

/// A call whose outcome is unknown, as the gateway reports it to the humans who resolve it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UnresolvedReport<'a> {
    pub run_id: &'a str,
    pub call_id: &'a str,
    pub tool: &'a str,
    /// See [`ApprovalRequest::arguments_digest`].
    pub arguments_digest: String,
    pub reason: &'a str,
    /// For a remote agent's question (`call_id` is the question's id): the call it belongs
    /// to. Absent otherwise, so a plain unresolved call signs as it always did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub for_call: Option<&'a str>,
}

impl Attested for UnresolvedReport<'_> {
    const DOMAIN: &'static [u8] = b"contextos-unresolved-call/v1\n";
}

/// A run that completed, as its record says (the output checked by the gateway when it was
/// written: the model's last answer, passing every validator). The gateway signs it for the
/// runner to relay; the operator marks a Session Succeeded, showing the output, only on it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CompletedRun<'a> {
    pub run_id: &'a str,
    /// The output as a report shows it (see [`crate::run::pod::shown_output`]).
    pub shown_output: &'a str,
    /// `sha256:` of the whole output.
    pub output_digest: String,
}

impl CompletedRun<'_> {
    /// The digest of a whole output.
    pub fn digest_of(output: &str) -> String {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(output.as_bytes())))
    }
}

impl Attested for CompletedRun<'_> {
    const DOMAIN: &'static [u8] = b"contextos-completed-run/v1\n";
}

/// How far a run got, as its record says. The gateway signs it for the runner to relay in its
/// report, whatever the outcome; the operator shows a Session's steps, usage, record head and
/// checkpoint only from it (a runner's own figures are its word, and people check a run's
/// chain against the head a Session shows).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunProgress {
    pub run_id: String,
    /// The runner pod that asked (name and uid): the attempt whose report relays it. A
    /// progress asked by an earlier attempt is not this one's. (Defaults only so that a report
    /// relaying an older form still reads; its signature does not verify.)
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub pod_uid: String,
    /// Whether the run's record had ended (completed or failed) when it was signed: nothing is
    /// written after an end, so an ended run's progress is its last.
    #[serde(default)]
    pub ended: bool,
    /// Hash (hex) of the newest entry on record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// The latest step a model turn on record answered.
    pub steps: u32,
    /// Tokens on record: the model turns' and those paid for that no turn holds.
    pub tokens: u64,
    /// Tool calls made, as the gateway counts them against the run's budget.
    pub tool_calls: u32,
    /// The run's latest checkpoint: (step, hash (hex) of its entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<(u32, String)>,
}

impl Attested for RunProgress {
    const DOMAIN: &'static [u8] = b"contextos-run-progress/v1\n";
}

/// A [`RunProgress`] and the gateway's signature over it with the tenant's key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedRunProgress {
    pub progress: RunProgress,
    pub signature: String,
}

impl SignedRunProgress {
    pub fn sign(progress: RunProgress, key: &crate::keys::KeyPair) -> Self {
        let signature = progress.sign(key);
        Self { progress, signature }
    }

    /// The progress, if `key` (the tenant's) signed it.
    pub fn verify(&self, key: &crate::keys::PublicKey) -> Option<&RunProgress> {
        self.progress
            .verify(key, &self.signature)
            .then_some(&self.progress)
    }
}

/// A statement the gateway signs with the tenant's key for whoever relays it (a runner pod's
/// report): the operator shows people what it says only if the signature holds.
pub trait Attested: serde::Serialize + Sized {
    /// What kind of statement it is, so that one kind's signature never verifies another.
    const DOMAIN: &'static [u8];

    /// The signed bytes: the domain, then the statement's canonical JSON.
    fn message(&self) -> Vec<u8> {
        let mut out = Self::DOMAIN.to_vec();
        // Plain data with string keys: serialization cannot fail.
        out.extend(crate::records::canonical::canonical_bytes_of(self).unwrap_or_default());
        out
    }

    /// The signature (hex) of `key` over it.
    fn sign(&self, key: &crate::keys::KeyPair) -> String {
        key.sign_hex(&self.message())
    }

    /// Whether `signature` is `key`'s over it.
    fn verify(&self, key: &crate::keys::PublicKey, signature: &str) -> bool {
        key.verify_hex(&self.message(), signature)
    }
}

#[cfg(test)]
mod tests {
    use super::{ApprovalBook, ApprovalRequest, Attested as _};
    use crate::keys::KeyPair;

    #[test]
    fn an_approval_request_verifies_only_as_the_gateway_signed_it() {
        let key = KeyPair::from_seed([4; 32]);
        let approvers = contextos_crds::common::Approvers {
            users: vec![],
            groups: vec!["sre-oncall".into()],
        };
        let request = ApprovalRequest {
            run_id: "r",
            call_id: "4.0",
            call_hash: "h",
            tool: "restart_deployment",
            arguments_digest: ApprovalRequest::digest_of(&serde_json::json!({"deployment": "api"})),
            rule: "guardrails/destructive",
            reason: "restarts need an SRE's approval",
            approvers: &approvers,
        };
        let signature = request.sign(&key);
        assert!(request.verify(&key.public(), &signature));
        // A runner that names itself an approver, or shows harmless arguments, is caught.
        let mallory = contextos_crds::common::Approvers {
            users: vec!["mallory@example.com".into()],
            groups: vec!["sre-oncall".into()],
        };
        let widened = ApprovalRequest {
            approvers: &mallory,
            ..request.clone()
        };
        assert!(!widened.verify(&key.public(), &signature));
        let harmless = ApprovalRequest {
            arguments_digest: ApprovalRequest::digest_of(&serde_json::json!({"deployment": "test"})),
            ..request.clone()
        };
        assert!(!harmless.verify(&key.public(), &signature));
        // Nor one that tells the approver another reason.
        let reassuring = ApprovalRequest {
            reason: "read-only health check, pre-approved by SRE",
            ..request.clone()
        };
        assert!(!reassuring.verify(&key.public(), &signature));
        // A long reason is signed as shown, which a report cut to fit keeps.
        let long = "x".repeat(1000);
        let shown = ApprovalRequest::shown_reason(&long);
        assert_eq!(shown.chars().count(), 161);
        assert_eq!(ApprovalRequest::shown_reason(&shown), shown);
        assert_eq!(ApprovalRequest::shown_reason("short"), "short");
        assert!(!request.verify(&KeyPair::from_seed([5; 32]).public(), &signature));
    }

    #[test]
    fn an_unresolved_call_report_verifies_only_as_the_gateway_signed_it() {
        let key = KeyPair::from_seed([4; 32]);
        let report = super::UnresolvedReport {
            run_id: "r",
            call_id: "4.0",
            tool: "restart_deployment",
            arguments_digest: ApprovalRequest::digest_of(&serde_json::json!({"deployment": "api"})),
            reason: "interrupted",
            for_call: None,
        };
        let signature = report.sign(&key);
        assert!(report.verify(&key.public(), &signature));
        // A runner that shows another call, or harmless arguments, is caught.
        let other = super::UnresolvedReport {
            call_id: "5.0",
            ..report.clone()
        };
        assert!(!other.verify(&key.public(), &signature));
        let harmless = super::UnresolvedReport {
            arguments_digest: ApprovalRequest::digest_of(&serde_json::json!({"deployment": "test"})),
            ..report.clone()
        };
        assert!(!harmless.verify(&key.public(), &signature));
    }

    #[test]
    fn an_approval_is_used_once() {
        let book = ApprovalBook::default();
        assert!(book.consume("h"));
        assert!(!book.consume("h"));
        book.restore(["g".to_owned()]);
        assert!(!book.consume("g"));
    }
}

/// A call waiting for approval, as the gateway attests it: the runner relays it to the operator
/// (in its termination report), and the operator shows it in the Session's status only if the
/// tenant's key signed it — so a runner cannot choose who may approve, or present a harmless
/// call under a destructive call's hash.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ApprovalRequest<'a> {
    pub run_id: &'a str,
    pub call_id: &'a str,
    pub call_hash: &'a str,
    pub tool: &'a str,
    /// SHA-256 (hex) of the call's arguments in canonical JSON (the arguments themselves may be
    /// cut to fit a report).
    pub arguments_digest: String,
    pub rule: &'a str,
    /// Why the rule asks for approval, as the policy says it and an approver is shown it
    /// ([`ApprovalRequest::shown_reason`]).
    pub reason: &'a str,
    pub approvers: &'a contextos_crds::common::Approvers,
}

/// Characters of a rule's reason an approver is shown whole (see [`ApprovalRequest::shown_reason`]).
const SHOWN_REASON_CHARS: usize = 160;

impl ApprovalRequest<'_> {
    /// A rule's reason as an approver is shown it, and as the gateway signs it: whole up to
    /// 161 characters, otherwise its first 160 and `…` — what a runner's report keeps when it
    /// must be cut to fit, so a cut report still verifies (and a reason shown twice is the
    /// same: the shown form is its own).
    pub fn shown_reason(reason: &str) -> String {
        if reason.chars().nth(SHOWN_REASON_CHARS + 1).is_none() {
            return reason.to_owned();
        }
        let mut shown: String = reason.chars().take(SHOWN_REASON_CHARS).collect();
        shown.push('…');
        shown
    }

    /// The digest of `arguments` as [`ApprovalRequest::arguments_digest`] holds it.
    pub fn digest_of(arguments: &serde_json::Value) -> String {
        crate::records::Hash::of(&crate::records::canonical::to_canonical_bytes(arguments)).to_hex()
    }
}

impl Attested for ApprovalRequest<'_> {
    // v2: the reason is signed too (a runner could otherwise tell approvers anything).
    const DOMAIN: &'static [u8] = b"contextos-approval-request/v2\n";
}
