//! What a failed test prints about its namespace: pods with their status, Jobs, ContextOS
//! objects, Events, and the last lines of every container's log.

use std::fmt::Write as _;

use contextos_crds::{Agent, ContextPack, Policy, SandboxProfile, Session};
use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Event, Pod},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, ListParams},
};

use crate::{
    TestEnv,
    describe::{event_line, job_summary, pod_summary},
};

const LOG_TAIL_LINES: usize = 40;

/// A report of everything of interest in `namespace`.
pub async fn namespace_report(env: &TestEnv, namespace: &str) -> String {
    let client = env.client();
    let mut out = format!("==== namespace {namespace} ====\n");
    let list = ListParams::default();

    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&list)
        .await;
    section(&mut out, "pods", pods.map(|l| l.items), |pod| {
        format!("{}: {}", pod.name_any(), pod_summary(pod))
    });

    let jobs = Api::<Job>::namespaced(client.clone(), namespace)
        .list(&list)
        .await;
    section(&mut out, "jobs", jobs.map(|l| l.items), |job| {
        format!("{}: {}", job.name_any(), job_summary(job))
    });

    let custom = contextos_objects(&client, namespace).await;
    section(
        &mut out,
        "contextos objects",
        Ok::<_, kube::Error>(custom),
        |(kind, object)| {
            let status = object
                .data
                .get("status")
                .map(|s| s.to_string())
                .unwrap_or_default();
            format!("{kind}/{} status={status}", object.name_any())
        },
    );

    let events = Api::<Event>::namespaced(client.clone(), namespace)
        .list(&list)
        .await;
    let events = events.map(|l| {
        let mut items = l.items;
        items.sort_by_key(event_time);
        items
    });
    section(&mut out, "events (oldest first)", events, event_line);

    out.push_str("-- container logs\n");
    for (title, log) in container_logs(env, namespace).await {
        let _ = writeln!(out, "  {title}:");
        match log {
            Ok(text) if text.is_empty() => out.push_str("    (empty)\n"),
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                    let _ = writeln!(out, "    | {line}");
                }
            }
            Err(err) => {
                let _ = writeln!(out, "    (no log: {err})");
            }
        }
    }
    if let Some(dir) = env.node_dir() {
        let _ = writeln!(out, "(process node files: {})", dir.display());
    }
    out
}

/// Every ContextOS object in the namespace, with its kind.
async fn contextos_objects(client: &kube::Client, namespace: &str) -> Vec<(String, DynamicObject)> {
    let resources = [
        ApiResource::erase::<Agent>(&()),
        ApiResource::erase::<ContextPack>(&()),
        ApiResource::erase::<Policy>(&()),
        ApiResource::erase::<SandboxProfile>(&()),
        ApiResource::erase::<Session>(&()),
    ];
    let mut objects = Vec::new();
    for resource in &resources {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
        if let Ok(list) = api.list(&ListParams::default()).await {
            objects.extend(list.items.into_iter().map(|o| (resource.kind.clone(), o)));
        }
    }
    objects
}

/// Every container log of the namespace: locally the process node's files (which outlive
/// deleted pods), on a real cluster the `pods/log` of the pods that still exist.
async fn container_logs(env: &TestEnv, namespace: &str) -> Vec<(String, Result<String, String>)> {
    let mut logs = Vec::new();
    if let Some(node_dir) = env.node_dir() {
        let dir = node_dir.join("logs").join(namespace);
        let pods = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        let mut files: Vec<_> = pods
            .flat_map(|pod| std::fs::read_dir(pod.path()).into_iter().flatten().flatten())
            .map(|file| file.path())
            .collect();
        files.sort();
        for file in files {
            let title = file.strip_prefix(&dir).unwrap_or(&file).display().to_string();
            logs.push((title, std::fs::read_to_string(&file).map_err(|e| e.to_string())));
        }
        return logs;
    }
    let pods = Api::<Pod>::namespaced(env.client(), namespace)
        .list(&ListParams::default())
        .await;
    for pod in pods.map(|l| l.items).unwrap_or_default() {
        let spec = pod.spec.clone().unwrap_or_default();
        for container in spec.init_containers.iter().flatten().chain(&spec.containers) {
            let log = env
                .container_log(namespace, &pod.name_any(), &container.name)
                .await;
            logs.push((format!("{}/{}", pod.name_any(), container.name), log));
        }
    }
    logs
}

fn section<T, E: std::fmt::Display>(
    out: &mut String,
    title: &str,
    items: Result<Vec<T>, E>,
    line: impl Fn(&T) -> String,
) {
    let _ = writeln!(out, "-- {title}");
    match items {
        Ok(items) if items.is_empty() => out.push_str("  (none)\n"),
        Ok(items) => {
            for item in &items {
                let _ = writeln!(out, "  {}", line(item));
            }
        }
        Err(err) => {
            let _ = writeln!(out, "  (cannot list: {err})");
        }
    }
}

fn event_time(event: &Event) -> Option<jiff::Timestamp> {
    event
        .event_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.meta().creation_timestamp.as_ref().map(|t| t.0))
}
