//! Scale on the local control plane: 200 Sessions created at once → time until every runner
//! pod exists and until every Session succeeded; then the operator's memory with ≈ 1,000
//! ContextOS objects and 1,000 unrelated ConfigMaps and Secrets of 4 KiB each. The operator
//! and the gateway service run as their own processes (the workspace's `contextos-operator` and
//! `contextos gateway`), so their memory is measured alone; runner pods run the real
//! `contextos` binary and send everything to that gateway.
//!
//! As root the runner pods run on the real node (kubelet, containerd, runc, CNI, kube-router;
//! `kind-tests/realnode`): the image packed from the workspace's binaries of the profile the
//! benchmark was built in (release with `make kind-bench`), scheduled by kube-scheduler, under
//! their NetworkPolicy, the gateway reached at the node's address; it also prints each pod's
//! start-up latency (created → its container started, as a watch sees it) at p50/p99. Without
//! root, or with `CONTEXTOS_CLUSTER_NODE=process`, they run on the process node.
//!
//! Run: `make kind-bench` (builds what it needs). Figures, not assertions.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use contextos_crds::{Agent, Policy, Session, session::SessionPhase};
use contextos_kind_tests::{
    Check, TestEnv, TestNamespace,
    operator_env::{self, QUICK_SCRIPT, quickstart_for, start_tools_with, tikv_testserver::TestServer},
    process_node::workspace_binary,
    wait_for, wait_for_object,
};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
    discovery::pinned_kind,
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::{Value, json};

/// Sessions created at once (`CONTEXTOS_BENCH_SESSIONS` overrides it).
const DEFAULT_SESSIONS: usize = 200;
const EXTRA_POLICIES: usize = 800;
const LABEL: &str = "contextos.dev/operator-test";
const OPERATOR_NAMESPACE: &str = "contextos-scale-operator";
const UNRELATED: usize = 1_000;
/// The runner pods' memory on the real node; their CPU is the node's 1.8 cores shared out (see
/// `measure`).
const BENCH_MEMORY: &str = "64Mi";

fn sessions() -> usize {
    std::env::var("CONTEXTOS_BENCH_SESSIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_SESSIONS)
}

/// Millicores per runner pod so that every Session's pod fits on the 2-core node at once.
fn bench_cpu() -> String {
    format!("{}m", (1800 / sessions()).max(1))
}

fn main() -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run())
}

/// Whether the runner pods run on the real node.
fn real_node(env: &TestEnv) -> bool {
    env.real().is_some()
}

/// Whether the workspace's binaries next to this benchmark are a release build.
fn release_build() -> bool {
    !cfg!(debug_assertions)
}

async fn run() -> Result<()> {
    let env = TestEnv::shared().await?;
    let host = env.host_address();
    let kubeconfig = env
        .kubeconfig()
        .context("the scale benchmark runs on the local control plane (unset KUBECONFIG)")?
        .to_owned();
    let tikv_bin = std::env::var("CONTEXTOS_TIKV_TESTSERVER_BIN").context("CONTEXTOS_TIKV_TESTSERVER_BIN")?;
    let tikv = TestServer::start(&tikv_bin, &[]);
    let (mut tools, tools_url) = start_tools_with(&[]).map_err(anyhow::Error::msg)?;
    let client = env.client();
    let namespaces = Api::<Namespace>::all(client.clone());
    let _ = namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": OPERATOR_NAMESPACE}}))?,
        )
        .await;
    let operator_bin = workspace_binary("contextos-operator").context("build contextos-operator first")?;
    let gateway_port = free_port()?;
    let gateway_url = format!("http://{host}:{gateway_port}");
    let mut gateway = Command::new(workspace_binary("contextos").context("build contextos first")?)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .args([
            "--store",
            &format!("tikv://{}", tikv.pd),
            "gateway",
            "--namespace",
            OPERATOR_NAMESPACE,
            "--listen",
            &format!("{host}:{gateway_port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut operator = Command::new(operator_bin)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .args([
            "--leader-election=false",
            "--namespace",
            OPERATOR_NAMESPACE,
            "--runner-gateway",
            &gateway_url,
            "--gateway-namespace",
            OPERATOR_NAMESPACE,
            "--runner-egress",
            &format!("{host}/32:{gateway_port}"),
            "--replay-image",
            env.runner_image(),
            "--listen",
            "127.0.0.1:0",
            "--selector",
            &format!("{LABEL}=scale"),
            "--concurrency",
            "16",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(stderr) = operator.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("operator: {line}");
            }
        });
    }
    let pids = (operator.id(), gateway.id());
    let result = measure(env, &client, &tools_url, pids).await;
    let _ = operator.kill();
    let _ = operator.wait();
    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = tools.kill();
    result
}

async fn measure(env: &'static TestEnv, client: &Client, tools_url: &str, pids: (u32, u32)) -> Result<()> {
    let (pid, gateway_pid) = pids;
    let sessions_count = sessions();
    let ns = TestNamespace::new(env, "scale").await?;
    let label = json!({LABEL: "scale"});
    for mut object in quickstart_for(env, tools_url).map_err(anyhow::Error::msg)? {
        if object["metadata"]["name"] == "quickstart-script" {
            object["data"]["script.json"] = json!(QUICK_SCRIPT);
        }
        if object["kind"] == "SandboxProfile" {
            object["spec"]["image"] = json!(env.runner_image());
            if real_node(env) {
                // Runner pods are Guaranteed (requests = limits): with the quickstart's 500m a
                // 2-core node runs four at a time. All of them at once need the node's CPU
                // shared out (9m each for 200).
                object["spec"]["resources"]["cpu"] = json!(bench_cpu());
                object["spec"]["resources"]["memory"] = json!(BENCH_MEMORY);
            }
        }
        operator_env::add_labels(&mut object, &label);
        apply(client, ns.name(), &object).await?;
    }
    let agents: Api<Agent> = ns.api();
    // Sessions pin the Agent's promoted composition; its first one is replayed (no history here)
    // before any Session can start, which is timed on its own.
    let installed = Instant::now();
    wait_for_object(
        &agents,
        "oncall-assistant",
        "Ready and its composition promoted",
        Duration::from_secs(300),
        |a: &Agent| {
            let is_true = |type_: &str| {
                a.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == type_ && c.status == "True")
                })
            };
            Check::when(is_true("Ready") && is_true("Promoted"), || {
                format!("{:?}", a.status)
            })
        },
    )
    .await?;
    let promoted_after = installed.elapsed();
    let idle_rss = rss_kib(pid)?;

    let session_text = std::fs::read_to_string(
        contextos_kind_tests::env::repo_root().join("examples/quickstart/session.yaml"),
    )?;
    let template: Value = serde_yaml::from_str(&session_text)?;
    let pods: Api<Pod> = ns.api();
    let baseline = if real_node(env) {
        Some(plain_pods(env, &pods, sessions_count).await?)
    } else {
        None
    };
    let startups = watch_startups(pods.clone(), contextos_crds::labels::SESSION);
    let cpu_at_burst = CpuTimes::now(gateway_pid);
    let api_at_burst = ApiRequests::now(client).await;
    let started = Instant::now();
    futures::stream::iter(0..sessions_count)
        .map(|i| {
            let mut session = template.clone();
            session["metadata"]["name"] = json!(format!("scale-{i:03}"));
            session["metadata"]["labels"] = label.clone();
            let client = client.clone();
            let namespace = ns.name().to_owned();
            async move { apply(&client, &namespace, &session).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let created = started.elapsed();
    wait_for("every runner pod exists", Duration::from_secs(600), || async {
        let count = pods
            .list(&ListParams::default().labels(contextos_crds::labels::SESSION))
            .await
            .map(|l| l.items.len());
        Check::when(count.as_ref().is_ok_and(|n| *n >= sessions_count), || {
            format!("{count:?} pods")
        })
    })
    .await?;
    let pods_at = started.elapsed();
    let all_started = wait_for(
        "every runner pod's container started",
        Duration::from_secs(600),
        || async {
            let seen = startups.lock().map(|s| s.clone()).unwrap_or_default();
            let started_count = seen.values().filter(|s| s.started()).count();
            if started_count >= sessions_count {
                Check::Done(seen)
            } else {
                Check::NotYet(format!("{started_count} of {} seen pods started", seen.len()))
            }
        },
    )
    .await?;
    let startup = StartupFigures::of(&all_started, started);
    let cpu_at_started = CpuTimes::now(gateway_pid);
    let api_at_started = ApiRequests::now(client).await;
    let sessions: Api<Session> = ns.api();
    wait_for("every Session succeeded", Duration::from_secs(1800), || async {
        let list = sessions.list(&ListParams::default()).await;
        let done = list.as_ref().map(|l| {
            l.items
                .iter()
                .filter(|s| s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Succeeded))
                .count()
        });
        let failed = list.as_ref().map(|l| {
            l.items
                .iter()
                .filter(|s| s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Failed))
                .count()
        });
        Check::when(done.as_ref().is_ok_and(|n| *n >= sessions_count), || {
            format!("{done:?} succeeded, {failed:?} failed")
        })
    })
    .await?;
    let done_at = started.elapsed();
    let cpu_at_done = CpuTimes::now(gateway_pid);
    let api_at_done = ApiRequests::now(client).await;
    let sessions_rss = rss_kib(pid)?;

    let policy_template: Value = serde_yaml::from_str(&std::fs::read_to_string(
        contextos_kind_tests::env::repo_root().join("examples/quickstart/policy.yaml"),
    )?)?;
    futures::stream::iter(0..EXTRA_POLICIES)
        .map(|i| {
            let mut policy = policy_template.clone();
            policy["metadata"]["name"] = json!(format!("policy-{i:03}"));
            policy["metadata"]["labels"] = label.clone();
            let client = client.clone();
            let namespace = ns.name().to_owned();
            async move { apply(&client, &namespace, &policy).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let policies: Api<Policy> = ns.api();
    wait_for("every Policy reconciled", Duration::from_secs(600), || async {
        let list = policies.list(&ListParams::default()).await;
        let ready = list
            .as_ref()
            .map(|l| l.items.iter().filter(|p| p.status.is_some()).count());
        Check::when(ready.as_ref().is_ok_and(|n| *n > EXTRA_POLICIES), || {
            format!("{ready:?} reconciled")
        })
    })
    .await?;
    let objects = sessions_count + EXTRA_POLICIES + 5;
    let full_rss = rss_kib(pid)?;
    // Objects the operator has no business with: 1,000 ConfigMaps and Secrets of 4 KiB each.
    let filler = "x".repeat(4096);
    futures::stream::iter(0..UNRELATED)
        .map(|i| {
            let kind = if i % 2 == 0 { "ConfigMap" } else { "Secret" };
            let object = json!({
                "apiVersion": "v1", "kind": kind,
                "metadata": {"name": format!("unrelated-{i:04}")},
                "data": {"payload": if kind == "Secret" { json!(base64_of(&filler)) } else { json!(filler) }},
            });
            let client = client.clone();
            let namespace = ns.name().to_owned();
            async move { apply(&client, &namespace, &object).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    // Let the watches deliver them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let unrelated_rss = rss_kib(pid)?;
    let gateway_rss = rss_kib(gateway_pid)?;
    let node = if real_node(env) {
        "the real node"
    } else {
        "the process node"
    };
    println!(
        "scale — {sessions_count} Sessions created at once on the local control plane and {node} (2 cores)"
    );
    let build = if release_build() {
        "release binaries"
    } else {
        "debug binaries"
    };
    if real_node(env) {
        println!(
            "  runner pods: cpu {}, memory {BENCH_MEMORY} (requests = limits), {build} in the image",
            bench_cpu()
        );
    } else {
        println!("  {build}");
    }
    println!(
        "  Agent's first composition promoted          {:>8.1} s   (its replay Job; no history)",
        promoted_after.as_secs_f64()
    );
    println!(
        "  Sessions created (API writes)          {:>8.1} s",
        created.as_secs_f64()
    );
    println!(
        "  every runner pod exists                {:>8.1} s",
        pods_at.as_secs_f64()
    );
    println!(
        "  every runner container started         {:>8.1} s   (target on the real node: ≤ 60 s)",
        startup.all_started.as_secs_f64()
    );
    println!(
        "  pod start-up, created → started        {}   (Kubernetes' SLO: p99 ≤ 5 s)",
        startup.latencies()
    );
    println!("{}", startup.phase_lines());
    println!(
        "  every Session succeeded                {:>8.1} s",
        done_at.as_secs_f64()
    );
    println!(
        "  CPU seconds by process (with the children it reaped), Sessions created → every container started → every Session succeeded:"
    );
    println!(
        "{}",
        CpuTimes::table(&cpu_at_burst, &cpu_at_started, &cpu_at_done)
    );
    println!(
        "  API requests served, by verb and resource (the API server's own count), same windows, per Session:"
    );
    println!(
        "{}",
        ApiRequests::table(&api_at_burst, &api_at_started, &api_at_done, sessions_count)
    );
    if let Some(baseline) = &baseline {
        println!(
            "baseline, same node, same run: {sessions_count} plain pods at once (busybox `sleep`, same CPU and memory, \
             no NetworkPolicy, no volumes)"
        );
        println!(
            "  every container started                {:>8.1} s",
            baseline.all_started.as_secs_f64()
        );
        println!(
            "  pod start-up, created → started        {}",
            baseline.latencies()
        );
        println!("{}", baseline.phase_lines());
    }
    println!("operator memory (RSS of the contextos-operator process)");
    println!(
        "  idle, quickstart objects only          {:>8.1} MiB   (baseline)",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  with {sessions_count} finished Sessions              {:>8.1} MiB",
        sessions_rss as f64 / 1024.0
    );
    println!(
        "  with ≈ {objects} ContextOS objects          {:>8.1} MiB",
        full_rss as f64 / 1024.0
    );
    println!(
        "  … and {UNRELATED} unrelated ConfigMaps/Secrets   {:>8.1} MiB   (target ≤ 64 MiB)",
        unrelated_rss as f64 / 1024.0
    );
    println!(
        "gateway service RSS after {sessions_count} runs          {:>8.1} MiB",
        gateway_rss as f64 / 1024.0
    );
    ns.pass();
    Ok(())
}

/// CPU time of every process on the machine by command name (user and system, with the
/// children each has reaped: `runc` and the CNI plugins count under containerd, an exited
/// container under its shim), the pods' containers (the node's `kubepods` cgroup, exited ones
/// included), and the machine's busy time, at one moment. The gateway, whose command is the
/// same binary's as the runners', is counted apart; init is counted without the orphans it
/// reaps (the shims of removed pods, whose containers the pods' line already holds).
struct CpuTimes {
    by_command: HashMap<String, f64>,
    busy: f64,
}

impl CpuTimes {
    /// Clock ticks a second in `/proc` (USER_HZ, 100 on Linux for x86-64 and ARM64).
    const TICKS: f64 = 100.0;

    fn now(gateway_pid: u32) -> Self {
        let mut by_command: HashMap<String, f64> = HashMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state …`: the command may hold spaces and parentheses.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // utime, stime, cutime, cstime are fields 14–17 of the line; 12–15 after `state`'s.
            let own_and_reaped = if pid == 1 { 11..13 } else { 11..15 };
            let ticks: f64 = fields
                .get(own_and_reaped)
                .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
                .unwrap_or(0.0);
            let command = if pid == gateway_pid {
                "contextos (gateway)".to_owned()
            } else {
                stat[open + 1..close].to_owned()
            };
            *by_command.entry(command).or_default() += ticks / Self::TICKS;
        }
        let root = std::env::var("REALNODE_CGROUP_ROOT").unwrap_or_else(|_| "/contextos-realnode".into());
        if let Some(nanos) =
            std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct{root}/kubepods/cpuacct.usage"))
                .ok()
                .and_then(|n| n.trim().parse::<f64>().ok())
        {
            by_command.insert("pods' containers (kubepods)".into(), nanos / 1e9);
        }
        let busy = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let cpu: Vec<f64> = s
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal: all but idle and iowait.
                let total: f64 = cpu.iter().take(8).sum();
                Some((total - cpu.get(3)? - cpu.get(4)?) / Self::TICKS)
            })
            .unwrap_or(0.0);
        Self { by_command, busy }
    }

    /// The processes that used at least half a second in either window, most first, and the
    /// machine's busy time in each.
    fn table(start: &Self, middle: &Self, end: &Self) -> String {
        let used = |from: &Self, to: &Self, command: &str| {
            (to.by_command.get(command).copied().unwrap_or(0.0)
                - from.by_command.get(command).copied().unwrap_or(0.0))
            .max(0.0)
        };
        let mut rows: Vec<(String, f64, f64)> = end
            .by_command
            .keys()
            .chain(middle.by_command.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|c| (c.clone(), used(start, middle, c), used(middle, end, c)))
            .filter(|(_, a, b)| *a >= 0.5 || *b >= 0.5)
            .collect();
        rows.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
        let mut lines: Vec<String> = rows
            .iter()
            .map(|(c, a, b)| format!("    {c:<28}{a:>8.1} s {b:>8.1} s"))
            .collect();
        lines.push(format!(
            "    {:<28}{:>8.1} s {:>8.1} s",
            "the machine, busy",
            middle.busy - start.busy,
            end.busy - middle.busy
        ));
        lines.join("\n")
    }
}

/// Requests the API server served, by `verb resource[/subresource]`, summed over its
/// `apiserver_request_total` series (every response code): who asks for what shows in which
/// resources are asked for (pods/status: the kubelet; sessions/status: the operator; tokenreviews:
/// the gateway; …). The bench's own requests are counted too: its polls (LIST pods, LIST
/// sessions) and these reads of the metrics.
#[derive(Default)]
struct ApiRequests(HashMap<String, f64>);

impl ApiRequests {
    /// The rows shown: the largest in either window.
    const ROWS: usize = 16;

    async fn now(client: &Client) -> Self {
        let request = http::Request::get("/metrics").body(Vec::new());
        match request {
            Ok(request) => match client.request_text(request).await {
                Ok(text) => Self::parse(&text),
                Err(e) => {
                    eprintln!("scale: the API server's metrics could not be read: {e}");
                    Self::default()
                }
            },
            Err(_) => Self::default(),
        }
    }

    fn parse(text: &str) -> Self {
        let mut by_kind: HashMap<String, f64> = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split("\",")
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let subresource = label("subresource");
            let kind = if subresource.is_empty() {
                format!("{} {}", label("verb"), label("resource"))
            } else {
                format!("{} {}/{subresource}", label("verb"), label("resource"))
            };
            *by_kind.entry(kind).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        Self(by_kind)
    }

    fn table(start: &Self, middle: &Self, end: &Self, sessions: usize) -> String {
        let served = |from: &Self, to: &Self, kind: &str| {
            (to.0.get(kind).copied().unwrap_or(0.0) - from.0.get(kind).copied().unwrap_or(0.0)).max(0.0)
        };
        let mut rows: Vec<(String, f64, f64)> = end
            .0
            .keys()
            .map(|k| (k.clone(), served(start, middle, k), served(middle, end, k)))
            .filter(|(_, a, b)| *a + *b > 0.0)
            .collect();
        rows.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
        let per = |n: f64| n / sessions.max(1) as f64;
        let mut lines: Vec<String> = rows
            .iter()
            .take(Self::ROWS)
            .map(|(k, a, b)| format!("    {k:<40}{:>8.2} {:>8.2}", per(*a), per(*b)))
            .collect();
        let (all_a, all_b) = rows.iter().fold((0.0, 0.0), |(x, y), (_, a, b)| (x + a, y + b));
        lines.push(format!(
            "    {:<40}{:>8.2} {:>8.2}   ({} kinds)",
            "every request",
            per(all_a),
            per(all_b),
            rows.len()
        ));
        lines.join("\n")
    }
}

/// What a watch saw of one pod's start-up, and when: created (first seen), bound to the node,
/// its container started (running, or already ended). (The kubelet reports the pod's address
/// and its container's start in one status update, so the sandbox's share cannot be told apart
/// from here.)
#[derive(Clone, Copy, Debug)]
struct Seen {
    created: Instant,
    scheduled: Option<Instant>,
    started: Option<Instant>,
}

impl Seen {
    fn started(&self) -> bool {
        self.started.is_some()
    }
}

/// Per pod of a burst, by name.
type Startups = Arc<Mutex<HashMap<String, Seen>>>;

/// Fills [`Startups`] from a watch of the pods matching `selector`, until the process ends.
fn watch_startups(pods: Api<Pod>, selector: &str) -> Startups {
    let seen = Startups::default();
    let record = seen.clone();
    let config = watcher::Config::default().labels(selector);
    tokio::spawn(async move {
        let mut stream = watcher(pods, config).applied_objects().boxed();
        while let Some(event) = stream.next().await {
            let Ok(pod) = event else { continue };
            let now = Instant::now();
            let status = pod.status.as_ref();
            let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
            let container_started = status
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| {
                    c.iter().any(|c| {
                        c.state
                            .as_ref()
                            .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                    })
                });
            let Ok(mut seen) = record.lock() else { return };
            let entry = seen.entry(pod.name_any()).or_insert(Seen {
                created: now,
                scheduled: None,
                started: None,
            });
            for (happened, at) in [
                (scheduled, &mut entry.scheduled),
                (container_started, &mut entry.started),
            ] {
                if happened && at.is_none() {
                    *at = Some(now);
                }
            }
        }
    });
    seen
}

/// When the containers of a burst of pods started, from the watch's view.
struct StartupFigures {
    /// From the first create to the last container seen started.
    all_started: Duration,
    /// Each pod's created → started, sorted.
    latencies: Vec<Duration>,
    /// Each pod's phases, sorted apiece: created → bound to the node (the scheduler), bound →
    /// container started (the kubelet, containerd, runc and CNI).
    phases: [Vec<Duration>; 2],
}

impl StartupFigures {
    fn of(seen: &HashMap<String, Seen>, burst_started: Instant) -> Self {
        let all_started = seen
            .values()
            .filter_map(|s| s.started)
            .max()
            .map_or(Duration::ZERO, |last| {
                last.saturating_duration_since(burst_started)
            });
        let between = |from: Option<Instant>, to: Option<Instant>| Some(to?.saturating_duration_since(from?));
        let sorted = |mut values: Vec<Duration>| {
            values.sort();
            values
        };
        let latencies = sorted(
            seen.values()
                .filter_map(|s| between(Some(s.created), s.started))
                .collect(),
        );
        let phases = [
            sorted(
                seen.values()
                    .filter_map(|s| between(Some(s.created), s.scheduled))
                    .collect(),
            ),
            sorted(
                seen.values()
                    .filter_map(|s| between(s.scheduled, s.started))
                    .collect(),
            ),
        ];
        Self {
            all_started,
            latencies,
            phases,
        }
    }

    fn latencies(&self) -> String {
        spread(&self.latencies)
    }

    /// The phase lines, indented under the start-up line.
    fn phase_lines(&self) -> String {
        ["created → bound to the node", "bound → container started"]
            .iter()
            .zip(&self.phases)
            .map(|(name, values)| format!("    {name:<35}{}", spread(values)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// p50, p99 and the largest of sorted `values`.
fn spread(values: &[Duration]) -> String {
    let at = |p: usize| {
        values
            .get((values.len() * p / 100).min(values.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
    };
    format!(
        "p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        at(50),
        at(99),
        values.last().copied().unwrap_or_default().as_secs_f64()
    )
}

/// The node's own share of pod start-up, as a baseline for the runner pods: `count` busybox pods
/// that only sleep, with the runner pods' CPU and memory, created at once; timed until every
/// container started, then deleted (and waited for) so the Sessions find the node as before.
async fn plain_pods(env: &TestEnv, pods: &Api<Pod>, count: usize) -> Result<StartupFigures> {
    const SELECTOR: &str = "contextos.dev/bench=plain";
    let startups = watch_startups(pods.clone(), SELECTOR);
    let started = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let pod: serde_json::Result<Pod> = serde_json::from_value(json!({
                "metadata": {"name": format!("plain-{i:03}"), "labels": {"contextos.dev/bench": "plain"}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "main", "image": env.busybox_image(), "command": ["sleep", "3600"],
                        "resources": {
                            "requests": {"cpu": bench_cpu(), "memory": BENCH_MEMORY},
                            "limits": {"cpu": bench_cpu(), "memory": BENCH_MEMORY},
                        },
                    }],
                },
            }));
            let pods = pods.clone();
            async move { anyhow::Ok(pods.create(&PostParams::default(), &pod?).await?) }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let seen = wait_for(
        "every plain pod's container started",
        Duration::from_secs(600),
        || async {
            let seen = startups.lock().map(|s| s.clone()).unwrap_or_default();
            let started_count = seen.values().filter(|s| s.started()).count();
            if started_count >= count {
                Check::Done(seen)
            } else {
                Check::NotYet(format!("{started_count} of {} seen pods started", seen.len()))
            }
        },
    )
    .await?;
    let figures = StartupFigures::of(&seen, started);
    pods.delete_collection(
        &kube::api::DeleteParams::default(),
        &ListParams::default().labels(SELECTOR),
    )
    .await?;
    wait_for("every plain pod is gone", Duration::from_secs(600), || async {
        let left = pods
            .list(&ListParams::default().labels(SELECTOR))
            .await
            .map(|l| l.items.len());
        Check::when(left.as_ref().is_ok_and(|n| *n == 0), || format!("{left:?} left"))
    })
    .await?;
    Ok(figures)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            return Ok(rest.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no VmRSS for process {pid}")
}

async fn apply(client: &Client, namespace: &str, object: &Value) -> Result<DynamicObject> {
    let mut object = object.clone();
    object["metadata"]["namespace"] = json!(namespace);
    let api_version = object["apiVersion"].as_str().context("apiVersion")?;
    let kind = object["kind"].as_str().context("kind")?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let (resource, _) = pinned_kind(client, &kube::api::GroupVersionKind::gvk(group, version, kind)).await?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let name = object["metadata"]["name"].as_str().context("name")?.to_owned();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply("contextos.dev/scale-bench"),
            &Patch::Apply(&object),
        )
        .await?)
}
