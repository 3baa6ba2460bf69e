//! The SandboxProfile kind: the pinned image, hard resource caps, network allowlist and
//! security settings every runner pod of an Agent is created with.

use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Condition};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::ToolRisk;

/// Desired state of a SandboxProfile.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "SandboxProfile",
    doc = "The sandbox a runner pod runs in. Runner pods always meet Pod Security \"restricted\", get no service-account token, no host mounts and no inbound network; this profile sets the rest.",
    namespaced,
    cel,
    status = "SandboxProfileStatus",
    shortname = "sbx",
    category = "contextos",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "CPU", type_ = "string", json_path = ".spec.resources.cpu"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".spec.resources.memory"),
    printcolumn(
        name = "Deadline",
        type_ = "integer",
        json_path = ".spec.activeDeadlineSeconds"
    ),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxProfileSpec {
    /// Runner image, pinned by digest: `registry/repo@sha256:<64 hex>` (a tag may precede the
    /// digest). Tags alone are refused because they can change under a running fleet.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self.contains('@sha256:')").message("image must be pinned by digest, e.g. ghcr.io/contextos/runner@sha256:<64 hex characters>; a tag alone is not accepted"))]
    #[x_kube(validation = Rule::new("!self.contains('@sha256:') || self.matches('^[^@\\\\s]+@sha256:[a-f0-9]{64}$')").message("image digest must be sha256: followed by exactly 64 lowercase hex characters (the full digest, as `crane digest` or `docker buildx imagetools inspect` prints it)"))]
    pub image: String,
    /// RuntimeClass for stronger isolation (e.g. gVisor or Kata), if the cluster has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub runtime_class_name: Option<String>,
    /// Hard caps; requests equal limits so the pod gets exactly this much.
    pub resources: SandboxResources,
    /// Seconds after which the pod is stopped no matter what.
    #[serde(default = "default_deadline")]
    #[schemars(range(min = 30, max = 604_800))]
    pub active_deadline_seconds: u32,
    /// Destinations the Agent's capability pods (its command-started MCP servers) may reach,
    /// besides cluster DNS. Runner pods reach only the Tool Gateway, which calls tools and
    /// models for them; capability pods accept traffic from the gateway only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub egress: Vec<EgressRule>,
    /// Mount the root filesystem read-only (a writable scratch `emptyDir` is provided).
    #[serde(default = "default_true")]
    pub read_only_root_filesystem: bool,
    /// Seccomp profile; Pod Security "restricted" needs RuntimeDefault or Localhost.
    #[serde(default)]
    pub seccomp_profile: SeccompProfile,
    /// Non-root user id the runner runs as.
    #[serde(default = "default_user")]
    #[schemars(range(max = 2_147_483_647))]
    #[x_kube(validation = Rule::new("self != 0").message("runAsUser 0 is root, and runner pods never run as root; use a non-root uid such as 65532"))]
    #[x_kube(validation = Rule::new("self > 0").message("runAsUser must be a positive uid, such as 65532"))]
    pub run_as_user: i64,
    /// Which tools may execute code inside this sandbox.
    #[serde(default)]
    pub execution: ExecutionSpec,
    /// The riskiest tool an Agent under this profile may have at all, its own or a skill's
    /// (read_only, local_write, network, delegated, destructive). Unset: any. An Agent with a
    /// riskier tool is not Ready (reason SkillConflict for a skill's tool, InvalidSpec for its
    /// own) and no Session of it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tool_risk: Option<ToolRisk>,
}

fn default_deadline() -> u32 {
    3600
}

fn default_true() -> bool {
    true
}

fn default_user() -> i64 {
    65532
}

/// CPU, memory and scratch-disk caps of a runner pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxResources {
    /// CPU cap, e.g. `500m`.
    pub cpu: Quantity,
    /// Memory cap, e.g. `512Mi`.
    pub memory: Quantity,
    /// Scratch disk cap, e.g. `1Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<Quantity>,
}

/// One allowed egress destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Destination network in CIDR notation, e.g. `10.20.0.0/16`.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("egress[].cidr must be a CIDR such as 10.20.0.0/16 or 2001:db8::/32"))]
    pub cidr: String,
    /// Destination ports; empty means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ports: Vec<EgressPort>,
}

/// A destination port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressPort {
    /// Port number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// TCP (default) or UDP.
    #[serde(default)]
    pub protocol: EgressProtocol,
}

/// Transport protocol of an egress port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum EgressProtocol {
    #[default]
    Tcp,
    Udp,
}

/// Seccomp profile of the runner container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.type == 'Localhost') == has(self.localhostProfile)").message("seccompProfile.localhostProfile is required with type Localhost and not allowed otherwise"))]
pub struct SeccompProfile {
    /// RuntimeDefault (default) or Localhost.
    #[serde(default, rename = "type")]
    pub type_: SeccompType,
    /// Path of the profile on the node, relative to the kubelet's seccomp directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub localhost_profile: Option<String>,
}

/// Seccomp profile types allowed by Pod Security "restricted".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum SeccompType {
    #[default]
    RuntimeDefault,
    Localhost,
}

/// Which tools may run code in this sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionSpec {
    /// Tool-name globs allowed to execute code here; empty means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 128), regex(pattern = r"^[a-z0-9_*?-]+$"))
    )]
    pub allowed_tools: Vec<String>,
    /// Highest tool risk allowed to execute code here.
    #[serde(default = "default_max_risk")]
    pub max_risk: ToolRisk,
}

impl Default for ExecutionSpec {
    fn default() -> Self {
        Self {
            allowed_tools: Vec::new(),
            max_risk: default_max_risk(),
        }
    }
}

fn default_max_risk() -> ToolRisk {
    ToolRisk::LocalWrite
}

/// Observed state of a SandboxProfile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxProfileStatus {
    /// `Ready` is True when the profile can be applied to a pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `sha256:<hex>` of the canonical JSON of the spec; Sessions pin it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}
