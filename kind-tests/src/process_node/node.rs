//! The Node object the process node registers (labels, capacity, addresses, nodeInfo, conditions)
//! and its heartbeat: a Lease in `kube-node-lease` renewed every few seconds, and node status
//! refreshed at the kubelet's report frequency.

use std::{collections::BTreeMap, fs, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    },
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;

/// Field manager of every write the process node makes.
pub const FIELD_MANAGER: &str = "contextos.dev/process-node";
/// Label on the Node, so tests and tools can tell it from a real kubelet.
pub const PROCESS_NODE_LABEL: &str = "contextos.dev/process-node";
const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_DURATION_SECONDS: i32 = 40;
const KUBELET_VERSION: &str = "v1.36.3-contextos-process-node";
/// Taint the TaintNodesByCondition admission plugin puts on new Nodes; the node-lifecycle
/// controller (not run here) would remove it once the node is Ready.
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

/// Facts about this machine that go into the Node's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub cpus: usize,
    pub memory_kib: u64,
    pub boot_id: String,
    pub machine_id: String,
    pub kernel_version: String,
    pub os_image: String,
}

impl HostFacts {
    /// Reads `/proc` and `/etc`; anything unreadable is left empty rather than failing.
    pub fn read() -> Self {
        let read = |path: &str| {
            fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let memory_kib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let os_image = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "Linux".to_owned());
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_kib,
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            machine_id: read("/etc/machine-id"),
            kernel_version: read("/proc/sys/kernel/osrelease"),
            os_image,
        }
    }
}

/// Node metadata and spec, as applied.
pub fn node_object(name: &str) -> serde_json::Value {
    let arch = go_arch();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                PROCESS_NODE_LABEL: "true",
            },
        },
    })
}

/// Node status: Ready, no pressure, loopback address, this host's capacity.
pub fn node_status(
    name: &str,
    host_ip: &str,
    host: &HostFacts,
    since: Timestamp,
    now: Timestamp,
) -> NodeStatus {
    let capacity = BTreeMap::from([
        ("cpu".to_owned(), Quantity(host.cpus.to_string())),
        ("memory".to_owned(), Quantity(format!("{}Ki", host.memory_kib))),
        ("pods".to_owned(), Quantity("110".to_owned())),
    ]);
    let address = |type_: &str, address: &str| NodeAddress {
        type_: type_.to_owned(),
        address: address.to_owned(),
    };
    NodeStatus {
        conditions: Some(node_conditions(since, now)),
        addresses: Some(vec![address("InternalIP", host_ip), address("Hostname", name)]),
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        node_info: Some(node_info(host)),
        ..Default::default()
    }
}

/// Ready since `since`, and no memory, disk or PID pressure; heartbeat `now`.
fn node_conditions(since: Timestamp, now: Timestamp) -> Vec<NodeCondition> {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    };
    vec![
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "process node has sufficient memory",
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "process node has no disk pressure",
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "process node has sufficient PID available",
        ),
        condition(
            "Ready",
            "True",
            "KubeletReady",
            "process node is posting ready status",
        ),
    ]
}

/// The architecture as Kubernetes names it (Go's `GOARCH`).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn node_info(host: &HostFacts) -> NodeSystemInfo {
    NodeSystemInfo {
        architecture: go_arch().to_owned(),
        boot_id: host.boot_id.clone(),
        container_runtime_version: format!("contextos-process-node://{}", env!("CARGO_PKG_VERSION")),
        kernel_version: host.kernel_version.clone(),
        kube_proxy_version: String::new(),
        kubelet_version: KUBELET_VERSION.to_owned(),
        machine_id: host.machine_id.clone(),
        operating_system: "linux".to_owned(),
        os_image: host.os_image.clone(),
        system_uuid: host.machine_id.clone(),
        swap: None,
    }
}

/// The node's heartbeat Lease.
pub fn lease(name: &str, node_uid: &str, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(LEASE_NAMESPACE.to_owned()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Node".to_owned(),
                name: name.to_owned(),
                uid: node_uid.to_owned(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.to_owned()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

/// Registers the Node and its Lease; returns the Node's uid.
pub async fn register(
    client: &Client,
    name: &str,
    host_ip: &str,
    host: &HostFacts,
) -> Result<String, kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let node = nodes
        .patch(name, &apply, &Patch::Apply(node_object(name)))
        .await?;
    let now = Timestamp::now();
    post_status(&nodes, name, host_ip, host, now, now).await?;
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    if taints.iter().any(|t| t.key == NOT_READY_TAINT) {
        let kept: Vec<_> = taints.into_iter().filter(|t| t.key != NOT_READY_TAINT).collect();
        let patch = json!({ "spec": { "taints": kept } });
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    let uid = node.metadata.uid.unwrap_or_default();
    renew_lease(client, name, &uid).await?;
    Ok(uid)
}

async fn post_status(
    nodes: &Api<Node>,
    name: &str,
    host_ip: &str,
    host: &HostFacts,
    since: Timestamp,
    now: Timestamp,
) -> Result<(), kube::Error> {
    let status = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "status": node_status(name, host_ip, host, since, now),
    });
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    nodes.patch_status(name, &apply, &Patch::Apply(status)).await?;
    Ok(())
}

async fn renew_lease(client: &Client, name: &str, node_uid: &str) -> Result<(), kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let mut lease =
        serde_json::to_value(lease(name, node_uid, Timestamp::now())).map_err(kube::Error::SerdeError)?;
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    lease["kind"] = json!("Lease");
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    leases.patch(name, &apply, &Patch::Apply(lease)).await?;
    Ok(())
}

/// Renews the Lease every `lease_every` and posts node status every `status_every`, forever.
pub async fn heartbeat(
    client: Client,
    name: String,
    node_uid: String,
    host_ip: String,
    host: HostFacts,
    lease_every: Duration,
    status_every: Duration,
) {
    let since = Timestamp::now();
    let nodes: Api<Node> = Api::all(client.clone());
    let mut last_status = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(lease_every).await;
        if let Err(err) = renew_lease(&client, &name, &node_uid).await {
            tracing::warn!(node = %name, %err, "cannot renew node lease");
        }
        if last_status.elapsed() >= status_every {
            last_status = tokio::time::Instant::now();
            if let Err(err) = post_status(&nodes, &name, &host_ip, &host, since, Timestamp::now()).await {
                tracing::warn!(node = %name, %err, "cannot post node status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            cpus: 2,
            memory_kib: 2048,
            boot_id: "b".into(),
            machine_id: "m".into(),
            kernel_version: "6.1".into(),
            os_image: "Debian".into(),
        }
    }

    #[test]
    fn status_is_ready_with_capacity_and_loopback() {
        let t0 = Timestamp::from_second(1_700_000_000).expect("valid");
        let t1 = Timestamp::from_second(1_700_000_060).expect("valid");
        let status = node_status("pn", "127.0.0.1", &host(), t0, t1);
        let ready = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .expect("Ready condition");
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_transition_time, Some(Time(t0)));
        assert_eq!(ready.last_heartbeat_time, Some(Time(t1)));
        let capacity = status.capacity.expect("capacity");
        assert_eq!(capacity["cpu"], Quantity("2".into()));
        assert_eq!(capacity["memory"], Quantity("2048Ki".into()));
        assert_eq!(status.addresses.expect("addresses")[0].address, "127.0.0.1");
        assert!(
            status
                .node_info
                .expect("info")
                .kubelet_version
                .starts_with("v1.36")
        );
    }

    #[test]
    fn lease_is_owned_by_the_node() {
        let lease = lease("pn", "uid-1", Timestamp::UNIX_EPOCH);
        assert_eq!(lease.metadata.namespace.as_deref(), Some("kube-node-lease"));
        assert_eq!(lease.metadata.owner_references.expect("owner")[0].uid, "uid-1");
        assert_eq!(lease.spec.expect("spec").holder_identity.as_deref(), Some("pn"));
    }

    #[test]
    fn host_facts_are_read_without_failing() {
        let facts = HostFacts::read();
        assert!(facts.cpus >= 1);
    }
}
