//! Pod security, enforced by the kernel: a probe in the runner pod the operator writes (its
//! exact security context, volumes, limits and deadline; busybox instead of `contextos`) and the
//! same probe in a control pod with the protections taken off. Each protection is shown by a
//! probe that the runner fails and the control passes.

use anyhow::{Result, ensure};
use k8s_openapi::{
    api::core::v1::{Capabilities, PodSecurityContext, SeccompProfile, SecurityContext},
    apimachinery::pkg::api::resource::Quantity,
};

use crate::support::{self, Probe};

/// Prints what the sandbox allows: identity, capabilities, no-new-privileges, seccomp (and a
/// syscall RuntimeDefault forbids), root filesystem writes, service-account tokens, the CPU
/// quota (and whether a busy loop is throttled) and the memory limit.
const POD_PROBE: &str = r#"
echo uid=$(id -u)
echo capeff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
echo capbnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
echo nonewprivs=$(awk '/^NoNewPrivs:/ {print $2}' /proc/self/status)
echo seccomp=$(awk '/^Seccomp:/ {print $2}' /proc/self/status)
unshare -U true 2>/dev/null && echo unshare=allowed || echo unshare=refused
touch /var/tmp/probe 2>/dev/null && echo rootwrite=allowed || echo rootwrite=refused
[ -e /var/run/secrets/kubernetes.io/serviceaccount/token ] && echo apitoken=present || echo apitoken=absent
[ -e /var/run/secrets/contextos/gateway-token ] && echo gatewaytoken=present || echo gatewaytoken=absent
echo cpuquota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)
timeout 2 sh -c 'while :; do :; done'
echo throttled=$(awk '/^nr_throttled/ {print $2}' /sys/fs/cgroup/cpu/cpu.stat)
echo memlimit=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)
echo done=yes
"#;

#[tokio::test]
async fn the_runner_pod_is_confined_by_the_kernel_and_a_pod_without_the_protections_is_not() -> Result<()> {
    let Some(env) = support::env().await? else {
        return Ok(());
    };
    let tenant = support::tenant(env, "real-confined").await?;
    let control_ns = support::unrestricted(env, "real-unconfined").await?;
    let sandbox = support::quickstart_sandbox()?;
    let settings = support::no_gateway();

    let runner = support::probe_pod(tenant.name(), "confined", &sandbox, &settings, POD_PROBE)?;
    // Admitted under Pod Security "restricted" (the namespace enforces it) — and enforced below.
    let confined = support::run_probe(env, tenant.name(), runner).await?;

    let mut control = support::probe_pod(control_ns.name(), "unconfined", &sandbox, &settings, POD_PROBE)?;
    if let Some(spec) = control.spec.as_mut() {
        spec.automount_service_account_token = Some(true);
        spec.security_context = Some(PodSecurityContext {
            run_as_user: Some(0),
            seccomp_profile: Some(SeccompProfile {
                type_: "Unconfined".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        for container in &mut spec.containers {
            container.resources = None;
            container.security_context = Some(SecurityContext {
                allow_privilege_escalation: Some(true),
                read_only_root_filesystem: Some(false),
                capabilities: Some(Capabilities {
                    add: Some(vec!["SYS_ADMIN".into()]),
                    drop: None,
                }),
                ..Default::default()
            });
        }
    }
    let unconfined = support::run_probe(env, control_ns.name(), control).await?;
    // The runner exactly, but for its seccomp profile: what refuses unshare is the filter, not
    // the user, the capabilities or the host's user-namespace settings.
    let mut unfiltered = support::probe_pod(control_ns.name(), "unfiltered", &sandbox, &settings, POD_PROBE)?;
    if let Some(context) = unfiltered.spec.as_mut().and_then(|s| s.security_context.as_mut()) {
        context.seccomp_profile = Some(SeccompProfile {
            type_: "Unconfined".into(),
            ..Default::default()
        });
    }
    let unfiltered = support::run_probe(env, control_ns.name(), unfiltered).await?;

    let expect = |probe: &Probe, key: &str, wanted: &str, who: &str| -> Result<()> {
        let value = probe.get(key)?;
        ensure!(
            value == wanted,
            "{who}: {key}={value}, expected {wanted}; its output:\n{}",
            probe.log
        );
        Ok(())
    };
    expect(&confined, "done", "yes", "runner")?;
    expect(&unconfined, "done", "yes", "control")?;
    expect(&confined, "uid", &sandbox.run_as_user.to_string(), "runner")?;
    expect(&unconfined, "uid", "0", "control")?;
    expect(&confined, "capeff", "0000000000000000", "runner")?;
    ensure!(
        unconfined.get("capeff")? != "0000000000000000",
        "the control has capabilities"
    );
    // Dropping ALL empties the bounding set too (a non-root process has no effective
    // capabilities either way; the bounding set is what `drop: [ALL]` changes).
    expect(&confined, "capbnd", "0000000000000000", "runner")?;
    ensure!(
        unconfined.get("capbnd")? != "0000000000000000",
        "the control keeps a bounding set"
    );
    expect(&confined, "nonewprivs", "1", "runner")?;
    expect(&unconfined, "nonewprivs", "0", "control")?;
    // Mode 2: a seccomp filter; RuntimeDefault forbids unshare(CLONE_NEWUSER) without SYS_ADMIN.
    expect(&confined, "seccomp", "2", "runner")?;
    expect(&unconfined, "seccomp", "0", "control")?;
    expect(&confined, "unshare", "refused", "runner")?;
    expect(&unconfined, "unshare", "allowed", "control")?;
    expect(&unfiltered, "done", "yes", "runner without seccomp")?;
    expect(&unfiltered, "seccomp", "0", "runner without seccomp")?;
    expect(&unfiltered, "unshare", "allowed", "runner without seccomp")?;
    expect(&confined, "rootwrite", "refused", "runner")?;
    expect(&unconfined, "rootwrite", "allowed", "control")?;
    expect(&confined, "apitoken", "absent", "runner")?;
    expect(&unconfined, "apitoken", "present", "control")?;
    expect(&confined, "gatewaytoken", "present", "runner")?;
    // 500m of the quickstart profile: 50 ms per 100 ms period, and a busy loop hits it.
    expect(&confined, "cpuquota", "50000", "runner")?;
    expect(&unconfined, "cpuquota", "-1", "control")?;
    ensure!(
        confined.get("throttled")?.parse::<u64>()? > 0,
        "the runner's busy loop was throttled: {}",
        confined.log
    );
    expect(&unconfined, "throttled", "0", "control")?;
    expect(&confined, "memlimit", &(512u64 << 20).to_string(), "runner")?;
    ensure!(
        unconfined.get("memlimit")?.parse::<u64>()? > 1 << 40,
        "the control has no memory limit: {}",
        unconfined.log
    );
    tenant.pass();
    control_ns.pass();
    Ok(())
}

#[tokio::test]
async fn a_runner_that_allocates_past_its_memory_limit_is_oom_killed() -> Result<()> {
    let Some(env) = support::env().await? else {
        return Ok(());
    };
    let tenant = support::tenant(env, "real-oom").await?;
    let mut sandbox = support::quickstart_sandbox()?;
    let settings = support::no_gateway();
    // 128 MiB touched at once (dd's buffer, filled from /dev/zero).
    let allocate = "dd if=/dev/zero of=/dev/null bs=128M count=1 && echo allocated=yes";

    sandbox.resources.memory = Quantity("64Mi".into());
    let capped = support::run_probe(
        env,
        tenant.name(),
        support::probe_pod(tenant.name(), "capped", &sandbox, &settings, allocate)?,
    )
    .await?;
    ensure!(
        capped.container_reason.as_deref() == Some("OOMKilled") && capped.phase == "Failed",
        "with 64Mi the runner is OOM-killed: {capped:?}"
    );

    sandbox.resources.memory = Quantity("256Mi".into());
    let roomy = support::run_probe(
        env,
        tenant.name(),
        support::probe_pod(tenant.name(), "roomy", &sandbox, &settings, allocate)?,
    )
    .await?;
    ensure!(
        roomy.get("allocated")? == "yes",
        "with 256Mi the same allocation succeeds: {roomy:?}"
    );
    tenant.pass();
    Ok(())
}

#[tokio::test]
async fn the_kubelet_ends_a_runner_at_its_deadline() -> Result<()> {
    let Some(env) = support::env().await? else {
        return Ok(());
    };
    let tenant = support::tenant(env, "real-deadline").await?;
    let mut sandbox = support::quickstart_sandbox()?;
    sandbox.active_deadline_seconds = 3;
    let started = std::time::Instant::now();
    let ended = support::run_probe(
        env,
        tenant.name(),
        support::probe_pod(
            tenant.name(),
            "overdue",
            &sandbox,
            &support::no_gateway(),
            "sleep 300",
        )?,
    )
    .await?;
    ensure!(
        ended.phase == "Failed" && ended.pod_reason.as_deref() == Some("DeadlineExceeded"),
        "the pod ends DeadlineExceeded: {ended:?}"
    );
    ensure!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "ended by the deadline, not by the sleep: {:?}",
        started.elapsed()
    );
    tenant.pass();
    Ok(())
}

/// What a pod sees of the kernel it runs on, and two of the runner's confinements.
const KERNEL_PROBE: &str = r#"
echo kernel=$(cat /proc/sys/kernel/osrelease)
echo uid=$(id -u)
touch /var/tmp/probe 2>/dev/null && echo rootwrite=allowed || echo rootwrite=refused
"#;

/// A SandboxProfile that names the node's gVisor RuntimeClass puts its runner pod on gVisor's
/// kernel (runsc, systrap platform), still non-root on a read-only root; the same pod without
/// it runs on the host's kernel.
#[tokio::test]
async fn a_runner_pod_under_the_gvisor_runtime_class_runs_on_the_gvisor_kernel() -> Result<()> {
    let Some(env) = support::env().await? else {
        return Ok(());
    };
    let tenant = support::tenant(env, "real-gvisor").await?;
    let settings = support::no_gateway();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();

    let mut sandbox = support::quickstart_sandbox()?;
    sandbox.runtime_class_name = Some("gvisor".into());
    let pod = support::probe_pod(tenant.name(), "gvisor", &sandbox, &settings, KERNEL_PROBE)?;
    let runtime_class = pod.spec.as_ref().and_then(|s| s.runtime_class_name.clone());
    ensure!(
        runtime_class.as_deref() == Some("gvisor"),
        "the operator writes the profile's runtime class into the pod: {runtime_class:?}"
    );
    let sandboxed = support::run_probe(env, tenant.name(), pod).await?;
    ensure!(
        sandboxed.get("kernel")?.contains("gvisor") && sandboxed.get("kernel")? != host_kernel,
        "under RuntimeClass gvisor the runner sees gVisor's kernel, not the host's {host_kernel}: {sandboxed:?}"
    );
    ensure!(
        sandboxed.get("uid")? != "0" && sandboxed.get("rootwrite")? == "refused",
        "non-root on a read-only root under gVisor too: {sandboxed:?}"
    );
    // What refuses the write is the read-only root, which gVisor keeps: with a writable root
    // (gVisor's own overlay) the same write succeeds.
    let mut writable = support::probe_pod(tenant.name(), "gvisor-rw", &sandbox, &settings, KERNEL_PROBE)?;
    for container in writable.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
        if let Some(context) = container.security_context.as_mut() {
            context.read_only_root_filesystem = Some(false);
        }
    }
    let writable = support::run_probe(env, tenant.name(), writable).await?;
    ensure!(
        writable.get("kernel")?.contains("gvisor") && writable.get("rootwrite")? == "allowed",
        "under gVisor with a writable root the write succeeds: {writable:?}"
    );

    let plain = support::run_probe(
        env,
        tenant.name(),
        support::probe_pod(
            tenant.name(),
            "runc",
            &support::quickstart_sandbox()?,
            &settings,
            KERNEL_PROBE,
        )?,
    )
    .await?;
    ensure!(
        plain.get("kernel")? == host_kernel,
        "without a runtime class the runner runs on the host's kernel {host_kernel}: {plain:?}"
    );
    tenant.pass();
    Ok(())
}
