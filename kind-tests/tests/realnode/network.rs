//! NetworkPolicy, enforced (kube-router on the real node): a runner pod under the policy the
//! operator writes reaches the cluster DNS pods and the gateway and nothing else — not a pod of
//! its own namespace, not port 53 of any other pod (the DNS exfiltration path), not the kubelet —
//! and nothing reaches it, from its own tenant or another. The same probe without the policy
//! reaches all of them.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, ensure};
use contextos_crds::sandbox_profile::SandboxProfileSpec;
use contextos_kind_tests::{
    Check, TestEnv, operator_env,
    real_node::{BUSYBOX_IMAGE, COREDNS_IMAGE, NODE_IP},
    wait_for, wait_for_object,
};
use contextos_operator::session_children::{self, RunnerSettings};
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use crate::support::{self, TIMEOUT};

/// `reach HOST PORT` prints yes when an HTTP answer comes back (every listener here speaks
/// HTTP; the kubelet answers a plain request on its TLS port with a 400).
const REACH: &str = r#"reach() { printf 'GET / HTTP/1.0\r\n\r\n' | timeout 5 nc -w 3 "$1" "$2" 2>/dev/null | grep -q '^HTTP/' && echo yes || echo no; }
reach_soon() { for _ in 1 2 3 4; do [ "$(reach "$1" "$2")" = yes ] && { echo yes; return; }; sleep 1; done; echo no; }
resolve() { timeout 5 nslookup kubernetes.default.svc.cluster.local "$1" 2>/dev/null | grep -q ' 10\.0\.0\.1$' && echo yes || echo no; }"#;

/// A pod outside the runner's policy: busybox as `user`, with `script`.
fn plain_pod(name: &str, labels: serde_json::Value, user: i64, script: &str) -> Result<Pod> {
    let restricted = user != 0;
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": false,
            "securityContext": {
                "runAsNonRoot": restricted,
                "runAsUser": user,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "runner",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": if restricted { json!({"drop": ["ALL"]}) } else { json!({"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}) },
                },
            }],
        },
    }))?)
}

/// A DNS server that is not the cluster DNS: CoreDNS (the node's image) answering for
/// cluster.local from its own pod in `namespace` — the UDP/53 exfiltration target. Its service
/// account may read what CoreDNS reads.
async fn rogue_dns(env: &'static TestEnv, namespace: &str) -> Result<Ipv4Addr> {
    let client = env.client();
    let config: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "rogue-dns"},
        "data": {"Corefile": ".:53 {\n    kubernetes cluster.local\n}\n"},
    }))?;
    Api::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &config)
        .await?;
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("rogue-dns-{namespace}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
    }))?;
    Api::all(client).create(&PostParams::default(), &binding).await?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "rogue-dns", "labels": {"app": "rogue-dns"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}],
            },
            "containers": [{
                "name": "dns",
                "image": COREDNS_IMAGE,
                "imagePullPolicy": "Never",
                "args": ["-conf", "/etc/coredns/Corefile"],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
            }],
            "volumes": [{"name": "config", "configMap": {"name": "rogue-dns"}}],
        },
    }))?;
    running(env, namespace, pod).await
}

/// Creates `pod` in `namespace` and waits until it runs; its IP.
async fn running(env: &'static TestEnv, namespace: &str, pod: Pod) -> Result<Ipv4Addr> {
    let pods: Api<Pod> = Api::namespaced(env.client(), namespace);
    let name = pod.metadata.name.clone().context("pod name")?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {name}"))?;
    let pod = wait_for_object(&pods, &name, "Running with an IP", TIMEOUT, |p: &Pod| {
        let status = p.status.clone().unwrap_or_default();
        Check::when(
            status.phase.as_deref() == Some("Running") && status.pod_ip.is_some(),
            || format!("phase {:?}", status.phase),
        )
    })
    .await?;
    Ok(pod.status.and_then(|s| s.pod_ip).context("pod IP")?.parse()?)
}

/// Waits until the container's log has the line `done`, and returns its `key=value` lines.
async fn output(
    env: &'static TestEnv,
    namespace: &str,
    pod: &str,
    done: &str,
) -> Result<Vec<(String, String)>> {
    let log = wait_for(format!("{namespace}/{pod} to print {done}"), TIMEOUT, || async {
        let log = env
            .container_log(namespace, pod, "runner")
            .await
            .unwrap_or_default();
        if log.lines().any(|l| l == done) {
            Check::Done(log)
        } else {
            Check::NotYet(log)
        }
    })
    .await?;
    Ok(log
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn value<'a>(values: &'a [(String, String)], key: &str) -> &'a str {
    values
        .iter()
        .find(|(k, _)| k == key)
        .map_or("(not printed)", |(_, v)| v.as_str())
}

/// The cluster DNS Service's address (the kubelet's `clusterDNS`).
const DNS_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

/// Where the runner's probe reaches: a pod of its own namespace, the DNS pod, another pod's port
/// 53, the gateway, the kubelet.
struct Targets {
    victim: Ipv4Addr,
    dns: Ipv4Addr,
    exfil: Ipv4Addr,
    /// A DNS server that is not the cluster's (UDP/53 elsewhere).
    rogue_dns: Ipv4Addr,
    gateway_port: u16,
}

/// The runner's probe: waits — under a policy — until kube-router has programmed it (its own
/// namespace's pod is refused), tries every target, then serves on 8080 for the ingress checks
/// for as long as the pod lives (the test checks it is still running afterwards).
fn runner_probe(targets: &Targets, await_policy: bool) -> String {
    let Targets {
        victim,
        dns,
        exfil,
        rogue_dns,
        gateway_port,
    } = targets;
    let wait = if await_policy { 30 } else { 0 };
    format!(
        r#"{REACH}
i=0
while [ $i -lt {wait} ] && [ "$(reach {victim} 8080)" = yes ]; do sleep 1; i=$((i + 1)); done
echo waited=$i
echo victim=$(reach {victim} 8080)
echo dns=$(resolve {dns})
echo dns_service=$(resolve {DNS_SERVICE})
echo exfil=$(reach {exfil} 53)
echo exfil_udp=$(resolve {rogue_dns})
# The gateway is a process on the busy host: asked a few times (it is allowed in both cases).
echo gateway=$(reach_soon {NODE_IP} {gateway_port})
echo kubelet=$(reach {NODE_IP} 10250)
echo outbound=done
exec httpd -f -p 8080 -h /etc
"#
    )
}

/// Runs the runner's probe ([`runner_probe`]) in the runner pod of Session `session` under
/// `sandbox`, and returns the pod's name and address and what it printed once it tried every
/// target.
async fn reach_probe(
    env: &'static TestEnv,
    namespace: &str,
    session: &str,
    sandbox: &SandboxProfileSpec,
    settings: &RunnerSettings,
    targets: &Targets,
    await_policy: bool,
) -> Result<(String, Ipv4Addr, Vec<(String, String)>)> {
    let runner = support::probe_pod(
        namespace,
        session,
        sandbox,
        settings,
        &runner_probe(targets, await_policy),
    )?;
    let name = runner.metadata.name.clone().context("name")?;
    support::ensure_bundle(env, namespace, &runner).await?;
    let ip = running(env, namespace, runner).await?;
    let printed = output(env, namespace, &name, "outbound=done").await?;
    Ok((name, ip, printed))
}

/// A pod in `namespace` that tries to reach `target`:8080 once and prints `ingress=yes|no`.
async fn ingress_from(
    env: &'static TestEnv,
    namespace: &str,
    name: &str,
    target: Ipv4Addr,
) -> Result<String> {
    let script = format!("{REACH}\necho ingress=$(reach {target} 8080)\necho ingress=done\n");
    let pods: Api<Pod> = Api::namespaced(env.client(), namespace);
    pods.create(
        &PostParams::default(),
        &plain_pod(name, json!({"app": name}), 65532, &script)?,
    )
    .await?;
    let values = output(env, namespace, name, "ingress=done").await?;
    Ok(values
        .iter()
        .find(|(k, v)| k == "ingress" && v != "done")
        .map_or_else(|| "(not printed)".into(), |(_, v)| v.clone()))
}

/// The address of the node's running CoreDNS pod.
async fn cluster_dns_pod(env: &TestEnv) -> Result<Ipv4Addr> {
    let pods = Api::<Pod>::namespaced(env.client(), "kube-system")
        .list(&ListParams::default().labels("k8s-app=kube-dns"))
        .await?;
    pods.items
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .find_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
        .context("no running CoreDNS pod (k8s-app=kube-dns) in kube-system")
}

#[tokio::test]
async fn a_runner_reaches_only_dns_pods_and_the_gateway_and_nothing_reaches_it() -> Result<()> {
    let Some(env) = support::env().await? else {
        return Ok(());
    };
    let op = support::operator(env).await?;
    let settings: RunnerSettings = operator_env::runner_settings(&op.gateway);
    let gateway_port = settings
        .egress
        .first()
        .map(|(_, port)| *port)
        .context("gateway port")?;
    let tenant = support::tenant(env, "real-net-a").await?;
    let other_tenant = support::tenant(env, "real-net-b").await?;
    let outside = support::unrestricted(env, "real-net-outside").await?;
    let unpoliced = support::tenant(env, "real-net-control").await?;

    // The cluster DNS (CoreDNS, which the node runs), as the policy selects it: kube-system,
    // k8s-app=kube-dns.
    let dns = cluster_dns_pod(env).await?;
    let victim = running(
        env,
        tenant.name(),
        plain_pod(
            "victim",
            json!({"app": "victim"}),
            65532,
            "exec httpd -f -p 8080 -h /etc",
        )?,
    )
    .await?;
    let exfil = running(
        env,
        outside.name(),
        plain_pod("exfil", json!({"app": "exfil"}), 0, "exec httpd -f -p 53 -h /etc")?,
    )
    .await?;
    let rogue_dns = rogue_dns(env, outside.name()).await?;
    let targets = Targets {
        victim,
        dns,
        exfil,
        rogue_dns,
        gateway_port,
    };

    // The runner under the operator's NetworkPolicy.
    let sandbox = support::quickstart_sandbox()?;
    let policy: NetworkPolicy = session_children::network_policy(tenant.name(), &settings);
    Api::<NetworkPolicy>::namespaced(env.client(), tenant.name())
        .create(&PostParams::default(), &policy)
        .await?;
    let (runner_name, runner_ip, policed) =
        reach_probe(env, tenant.name(), "policed", &sandbox, &settings, &targets, true).await?;
    // The same runner on gVisor (RuntimeClass gvisor): its own network stack, the same veth,
    // the same policy.
    let mut on_gvisor = sandbox.clone();
    on_gvisor.runtime_class_name = Some("gvisor".into());
    let (_, _, policed_gvisor) = reach_probe(
        env,
        tenant.name(),
        "policed-gvisor",
        &on_gvisor,
        &settings,
        &targets,
        true,
    )
    .await?;
    // The same probe with no policy.
    let (control_name, control_ip, open) = reach_probe(
        env,
        unpoliced.name(),
        "open",
        &sandbox,
        &settings,
        &targets,
        false,
    )
    .await?;

    let report =
        format!("under the policy: {policed:?}\non gVisor: {policed_gvisor:?}\nwithout it: {open:?}");
    for (key, policed_wants) in [
        ("victim", "no"),
        ("dns", "yes"),
        ("dns_service", "yes"),
        ("exfil", "no"),
        ("exfil_udp", "no"),
        ("gateway", "yes"),
        ("kubelet", "no"),
    ] {
        ensure!(
            value(&policed, key) == policed_wants,
            "runner {key}: expected {policed_wants}\n{report}"
        );
        ensure!(
            value(&policed_gvisor, key) == policed_wants,
            "runner on gVisor {key}: expected {policed_wants}\n{report}"
        );
        ensure!(
            value(&open, key) == "yes",
            "control {key}: expected yes\n{report}"
        );
    }

    // Ingress: from the runner's own tenant and from another tenant, refused; the control is open.
    ensure!(
        ingress_from(env, tenant.name(), "same-tenant", runner_ip).await? == "no",
        "same tenant reached the runner"
    );
    ensure!(
        ingress_from(env, other_tenant.name(), "other-tenant", runner_ip).await? == "no",
        "another tenant reached the runner"
    );
    ensure!(
        ingress_from(env, other_tenant.name(), "to-control", control_ip).await? == "yes",
        "the unpoliced control is reachable"
    );
    // A refusal counts only if the runner was still there to refuse it.
    for (namespace, pod) in [(tenant.name(), &runner_name), (unpoliced.name(), &control_name)] {
        let phase = Api::<Pod>::namespaced(env.client(), namespace)
            .get(pod)
            .await?
            .status
            .and_then(|s| s.phase);
        ensure!(
            phase.as_deref() == Some("Running"),
            "{namespace}/{pod} still serves: {phase:?}"
        );
    }

    let _ = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(env.client())
        .delete(&format!("rogue-dns-{}", outside.name()), &Default::default())
        .await;
    tenant.pass();
    other_tenant.pass();
    outside.pass();
    unpoliced.pass();
    Ok(())
}
