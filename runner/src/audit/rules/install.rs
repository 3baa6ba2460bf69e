//! Rules about the installation the trust model stands on: the admission policies that make
//! identities and approvals unforgeable, Pod Security on the namespaces that run Sessions, the
//! gateway's own egress guard and its replicas, and the rights ContextOS leaves to be granted on
//! purpose (reading records, recording consent, promoting, delegating) — never to everyone, never
//! through Kubernetes' aggregated roles. They apply when the audited objects include the
//! installation (its CRDs or Deployments) or come from a live cluster, or name those rights.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{Check, Sink};
use crate::audit::{
    field::FieldPath,
    finding::{Rule, RuleId, Severity},
    harness::{Harness, ObjectRef},
    source::Document,
};

/// The admission policies ContextOS's security model depends on (`manifests/admission`), each
/// with a binding of the same name.
pub const TRUST_ADMISSION_POLICIES: [(&str, &str); 13] = [
    ("contextos-session-identity", "a Session's user is who created it"),
    (
        "contextos-session-approvals",
        "approvals are given in the approver's own name, by an approver",
    ),
    (
        "contextos-promotion-approvals",
        "promotion gates are changed and passed only by their approvers",
    ),
    (
        "contextos-sandbox-images",
        "runner pods run the ContextOS runner image",
    ),
    (
        "contextos-runner-pods",
        "only the operator makes a pod a Session's runner pod",
    ),
    (
        "contextos-replay-pods",
        "only the job controller makes a pod a replay Job's, whose read grant the gateway honours",
    ),
    (
        "contextos-pod-exec",
        "no one but cluster admins runs a command in a runner or replay pod, whose token it holds",
    ),
    (
        "contextos-gateway-tokens",
        "only a node's kubelet gets a token for the gateway's audience",
    ),
    (
        "contextos-replay-jobs",
        "only the operator makes a replay Job, whose read grant its pods carry",
    ),
    (
        "contextos-consent-author",
        "a consent names the person who recorded it",
    ),
    (
        "contextos-feedback-author",
        "a correction names the person who gave it",
    ),
    (
        "contextos-proposal-decisions",
        "a proposal reaches its target only by its reviewers' acceptance of a replayed candidate",
    ),
    (
        "contextos-a2a-sessions",
        "the gateway starts and changes only A2A callers' tasks, and only it marks a Session as one",
    ),
];
const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";

/// The ClusterRoles whose rights ContextOS never aggregates into `view`/`edit`/`admin`
/// (`manifests/tenant-roles`), each with what it lets its holder do.
pub const DELIBERATE_ROLES: [(&str, &str); 9] = [
    (
        "contextos-records-reader",
        "read every decision record of the namespace",
    ),
    (
        "contextos-consent-keeper",
        "record and revoke the consent of the namespace's subjects",
    ),
    (
        "contextos-consent-reader",
        "read the consent histories of the namespace's subjects",
    ),
    (
        "contextos-feedback-giver",
        "correct the namespace's runs, which insights and proposals draw on",
    ),
    (
        "contextos-memory-keeper",
        "forget the namespace's memory items, a subject's whole memory included",
    ),
    (
        "contextos-memory-reader",
        "read every memory item of the namespace",
    ),
    ("contextos-promoter", "decide promotions and name approvers"),
    (
        "contextos-session-delegator",
        "start Sessions in other users' names",
    ),
    (
        "contextos-a2a-caller",
        "start runs of the namespace's agents offered over A2A",
    ),
];
/// Subjects that are everyone (or every workload of a kind), not someone.
const EVERYONE: [&str; 3] = [
    "system:authenticated",
    "system:unauthenticated",
    "system:serviceaccounts",
];

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("install/admission-policy-missing"),
            severity: Severity::Critical,
            title: "an admission policy the trust model depends on is missing, unbound or not enforcing",
            why: "without it anyone who may edit a Session can approve its calls or act in another user's name, and promotion gates can be passed by anyone",
            fix: "install `manifests/admission` unchanged: each ValidatingAdmissionPolicy with `failurePolicy: Fail` and its binding with `validationActions: [Deny]`",
        },
        admission_policies,
    ),
    (
        Rule {
            id: RuleId("install/namespace-not-restricted"),
            severity: Severity::High,
            title: "a namespace running Agents without Pod Security `restricted`",
            why: "runner pods are built restricted, but any other pod a tenant starts next to them may run privileged or as root",
            fix: "label the namespace `pod-security.kubernetes.io/enforce: restricted`",
        },
        namespaces_not_restricted,
    ),
    (
        Rule {
            id: RuleId("install/gateway-no-deny-destination"),
            severity: Severity::Medium,
            title: "a gateway that may call into the cluster's own networks",
            why: "tools' URLs come from tenants; without `--deny-destination` for the pod and Service ranges an Agent's tool can reach internal services the gateway can reach",
            fix: "add `--deny-destination=<CIDR>` for the pod and Service ranges to the gateway's arguments (unless Agents must call in-cluster services)",
        },
        gateway_deny_destination,
    ),
    (
        Rule {
            id: RuleId("install/gateway-single-replica"),
            severity: Severity::Medium,
            title: "a gateway Deployment with fewer than two replicas",
            why: "the gateway is every run's only path to tools, models and records: with one replica, every run stalls whenever it restarts, is evicted or its node drains",
            fix: "run at least 2 replicas against a shared store: the TiKV overlay (`manifests/overlays/tikv`) does; the base's embedded store is one file and allows one",
        },
        gateway_replicas,
    ),
    (
        Rule {
            id: RuleId("install/deliberate-right-to-everyone"),
            severity: Severity::High,
            title: "a right ContextOS leaves to be granted on purpose is bound for every namespace or to everyone",
            why: "reading records, recording consent, reading or forgetting memory, promoting and delegating are granted per namespace to named people; a ClusterRoleBinding grants them in every namespace, and a group such as system:authenticated to every user or workload",
            fix: "bind the ClusterRole with a RoleBinding in each namespace, to the users, groups or service accounts who need it",
        },
        deliberate_rights_to_everyone,
    ),
    (
        Rule {
            id: RuleId("install/deliberate-right-aggregated"),
            severity: Severity::High,
            title: "a right ContextOS leaves to be granted on purpose is aggregated into a built-in role",
            why: "with an aggregate-to-view/edit/admin label, everyone bound to that role in any namespace — most of a cluster's users — gets the right without anyone granting it",
            fix: "remove the `rbac.authorization.k8s.io/aggregate-to-*` labels from the ClusterRole",
        },
        deliberate_rights_aggregated,
    ),
];

fn gateway_replicas(harness: &Harness, sink: &mut Sink<'_>) {
    for gateway in harness
        .others_of("Deployment")
        .filter(|d| d.id.name == "contextos-gateway")
    {
        // Kubernetes defaults a Deployment without replicas to one.
        let replicas = gateway.spec["spec"]["replicas"].as_u64().unwrap_or(1);
        if replicas < 2 {
            sink.report(
                gateway,
                FieldPath::of(&["spec", "replicas"]),
                format!("the gateway runs {replicas} replica"),
            );
        }
    }
}

/// The deliberate role a binding grants, if it grants one (matched by name, also behind a
/// kustomize prefix or suffix).
fn deliberate_role(binding: &Value) -> Option<(&'static str, &'static str)> {
    let role = &binding["roleRef"];
    if role["kind"].as_str() != Some("ClusterRole") {
        return None;
    }
    let name = role["name"].as_str()?;
    DELIBERATE_ROLES.into_iter().find(|(role, _)| name.contains(role))
}

fn deliberate_rights_to_everyone(harness: &Harness, sink: &mut Sink<'_>) {
    for kind in ["RoleBinding", "ClusterRoleBinding"] {
        for binding in harness.others_of(kind) {
            let Some((role, lets)) = deliberate_role(&binding.spec) else {
                continue;
            };
            if kind == "ClusterRoleBinding" {
                sink.report(
                    binding,
                    FieldPath::of(&["roleRef"]),
                    format!("{role} is bound in every namespace: its subjects may {lets} everywhere"),
                );
                continue;
            }
            let subjects = binding.spec["subjects"].as_array().into_iter().flatten();
            for (index, subject) in subjects.enumerate() {
                let name = subject["name"].as_str().unwrap_or_default();
                let everyone = subject["kind"].as_str() == Some("Group")
                    && (EVERYONE.contains(&name) || name.starts_with("system:serviceaccounts:"));
                if everyone {
                    sink.report(
                        binding,
                        FieldPath::of(&["subjects"]).index(index),
                        format!("{role} is bound to group {name}: all of them may {lets}"),
                    );
                }
            }
        }
    }
}

fn deliberate_rights_aggregated(harness: &Harness, sink: &mut Sink<'_>) {
    for role in harness.others_of("ClusterRole") {
        let Some((name, lets)) = DELIBERATE_ROLES
            .into_iter()
            .find(|(name, _)| role.id.name.contains(name))
        else {
            continue;
        };
        for (label, value) in role.labels() {
            if label.starts_with("rbac.authorization.k8s.io/aggregate-to-") && value == "true" {
                sink.report(
                    role,
                    FieldPath::of(&["metadata", "labels"]).key(label),
                    format!("{name} is aggregated ({label}): everyone holding that role may {lets}"),
                );
            }
        }
    }
}

/// Where install-level findings without an object of their own are reported: the gateway or
/// operator Deployment when the audit has one, the installation otherwise.
fn installation_anchor(harness: &Harness) -> (ObjectRef, Document) {
    harness
        .others
        .iter()
        .find(|o| o.id.kind == "Deployment" && o.id.name.starts_with("contextos-"))
        .map(|o| (o.id.clone(), o.doc.clone()))
        .unwrap_or_else(|| {
            let id = ObjectRef {
                kind: "Installation".into(),
                namespace: None,
                name: "contextos".into(),
            };
            (id, Document::unplaced(Value::Null))
        })
}

fn admission_policies(harness: &Harness, sink: &mut Sink<'_>) {
    if !harness.has_installation() {
        return;
    }
    let (anchor, anchor_doc) = installation_anchor(harness);
    for (name, guarantees) in TRUST_ADMISSION_POLICIES {
        // Matched by name, also behind a kustomize `namePrefix`/`nameSuffix`.
        let policy = harness
            .others_of("ValidatingAdmissionPolicy")
            .find(|o| o.id.name.contains(name));
        let name = policy.map_or(name, |p| p.id.name.as_str());
        // A binding names its policy in spec.policyName (kustomize may have renamed both).
        let binding = harness
            .others_of("ValidatingAdmissionPolicyBinding")
            .find(|o| o.spec["spec"]["policyName"].as_str() == Some(name));
        match (policy, binding) {
            (None, _) => sink.report_at(
                &anchor,
                &anchor_doc,
                FieldPath::root(),
                format!("ValidatingAdmissionPolicy {name} is not installed: nothing ensures {guarantees}"),
            ),
            (Some(policy), _) if policy.spec["spec"]["failurePolicy"].as_str() == Some("Ignore") => sink
                .report(
                    policy,
                    FieldPath::of(&["spec", "failurePolicy"]),
                    format!("{name} is skipped whenever it cannot be evaluated (failurePolicy: Ignore)"),
                ),
            (Some(_), None) => sink.report_at(
                &anchor,
                &anchor_doc,
                FieldPath::root(),
                format!(
                    "ValidatingAdmissionPolicyBinding {name} is not installed: the policy applies to nothing"
                ),
            ),
            (Some(_), Some(binding)) => {
                let actions: Vec<&str> = binding.spec["spec"]["validationActions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                if !actions.contains(&"Deny") {
                    sink.report(
                        binding,
                        FieldPath::of(&["spec", "validationActions"]),
                        format!(
                            "binding {name} does not deny ({}): violations only warn or audit",
                            actions.join(", ")
                        ),
                    );
                }
            }
        }
    }
}

fn namespaces_not_restricted(harness: &Harness, sink: &mut Sink<'_>) {
    let running: BTreeSet<&str> = harness
        .agents
        .iter()
        .filter_map(|a| a.id.namespace.as_deref())
        .chain(harness.sessions.iter().filter_map(|s| s.id.namespace.as_deref()))
        .collect();
    for namespace in harness.others_of("Namespace") {
        if !running.contains(namespace.id.name.as_str()) {
            continue;
        }
        let level = namespace
            .labels()
            .find(|(k, _)| *k == POD_SECURITY_ENFORCE)
            .map(|(_, v)| v.to_owned());
        if level.as_deref() != Some("restricted") {
            sink.report(
                namespace,
                FieldPath::of(&["metadata", "labels"]).key(POD_SECURITY_ENFORCE),
                format!(
                    "namespace {} runs Agents and enforces {}",
                    namespace.id.name,
                    level.map_or_else(
                        || "no Pod Security level".to_owned(),
                        |l| format!("Pod Security {l:?}")
                    )
                ),
            );
        }
    }
}

fn gateway_deny_destination(harness: &Harness, sink: &mut Sink<'_>) {
    for gateway in harness
        .others_of("Deployment")
        .filter(|d| d.id.name == "contextos-gateway")
    {
        let containers = gateway.spec["spec"]["template"]["spec"]["containers"].as_array();
        let guarded = containers.into_iter().flatten().any(|c| {
            c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .any(|a| a.starts_with("--deny-destination"))
        });
        if !guarded {
            sink.report(
                gateway,
                FieldPath::of(&["spec", "template", "spec", "containers"]),
                "the gateway's arguments have no --deny-destination",
            );
        }
    }
}
