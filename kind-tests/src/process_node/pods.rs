//! The node's pod loop: watches every pod, binds unscheduled ones to this node (there is no
//! scheduler), and hands each pod bound here to its own supervisor task.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use kube::{
    Api, Resource, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::{
        WatchStreamExt,
        events::{Event as K8sEvent, EventType},
        watcher::{self, Event},
    },
};
use tokio::sync::{mpsc, watch};

use super::{
    AbortOnDrop, NodeShared,
    supervisor::{PodEvent, supervise},
};

/// What the node does with a pod it sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Unscheduled and schedulable here: bind it to this node.
    Bind,
    /// Bound to this node: run it.
    Ours,
    /// Bound elsewhere, terminal, being deleted, or not for this node (the reason says why).
    Ignore(&'static str),
}

/// Decides what to do with `pod`, the way a one-node scheduler would: only pods for the default
/// scheduler, without scheduling gates, whose `nodeSelector` matches the node's labels.
pub fn placement(pod: &Pod, node_name: &str, node_labels: &BTreeMap<String, String>) -> Placement {
    let Some(spec) = &pod.spec else {
        return Placement::Ignore("no spec");
    };
    match spec.node_name.as_deref() {
        Some(name) if name == node_name => return Placement::Ours,
        Some(name) if !name.is_empty() => return Placement::Ignore("bound to another node"),
        _ => {}
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Placement::Ignore("terminal");
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Placement::Ignore("being deleted");
    }
    if !matches!(
        spec.scheduler_name.as_deref(),
        None | Some("" | "default-scheduler")
    ) {
        return Placement::Ignore("uses another scheduler");
    }
    if spec.scheduling_gates.as_ref().is_some_and(|g| !g.is_empty()) {
        return Placement::Ignore("has scheduling gates");
    }
    let selector_matches = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| node_labels.get(k) == Some(v));
    if !selector_matches {
        return Placement::Ignore("nodeSelector does not match the node");
    }
    Placement::Bind
}

struct Supervised {
    events: watch::Sender<PodEvent>,
    _task: AbortOnDrop,
}

/// Watches pods forever.
pub(crate) async fn run(shared: Arc<NodeShared>, node_labels: BTreeMap<String, String>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut supervised: HashMap<String, Supervised> = HashMap::new();
    let mut binding: HashSet<String> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let (bound_tx, mut bound_rx) = mpsc::unbounded_channel::<String>();
    let mut listed: Option<HashSet<String>> = None;
    loop {
        tokio::select! {
            event = stream.next() => match event {
                Some(Ok(Event::Init)) => listed = Some(HashSet::new()),
                Some(Ok(Event::InitApply(pod) | Event::Apply(pod))) => {
                    if let Some(listed) = listed.as_mut() {
                        listed.insert(pod.uid().unwrap_or_default());
                    }
                    let placement = placement(&pod, &shared.node_name, &node_labels);
                    match placement {
                        Placement::Bind => bind(&shared, pod, &mut binding, &bound_tx),
                        Placement::Ours => dispatch(&shared, pod, &mut supervised, &done_tx),
                        Placement::Ignore(reason) => tracing::trace!(pod = %pod.name_any(), reason, "not for this node"),
                    }
                }
                Some(Ok(Event::Delete(pod))) => gone(&mut supervised, &pod.uid().unwrap_or_default()),
                Some(Ok(Event::InitDone)) => {
                    // Pods deleted while the watch was down never get a Delete event.
                    let seen = listed.take().unwrap_or_default();
                    let vanished: Vec<String> =
                        supervised.keys().filter(|uid| !seen.contains(*uid)).cloned().collect();
                    for uid in vanished {
                        gone(&mut supervised, &uid);
                    }
                }
                Some(Err(err)) => tracing::warn!(%err, "pod watch error; retrying"),
                None => return,
            },
            Some(uid) = done_rx.recv() => drop(supervised.remove(&uid)),
            Some(uid) = bound_rx.recv() => drop(binding.remove(&uid)),
        }
    }
}

fn dispatch(
    shared: &Arc<NodeShared>,
    pod: Pod,
    supervised: &mut HashMap<String, Supervised>,
    done: &mpsc::UnboundedSender<String>,
) {
    let uid = pod.uid().unwrap_or_default();
    let pod = Arc::new(pod);
    if let Some(existing) = supervised.get(&uid) {
        existing.events.send_replace(PodEvent::Current(pod));
        return;
    }
    let (events, receiver) = watch::channel(PodEvent::Current(pod.clone()));
    let shared = shared.clone();
    let done = done.clone();
    let key = uid.clone();
    let task = tokio::spawn(async move {
        supervise(shared, pod, receiver).await;
        let _ = done.send(key);
    });
    supervised.insert(
        uid,
        Supervised {
            events,
            _task: AbortOnDrop(task),
        },
    );
}

fn gone(supervised: &mut HashMap<String, Supervised>, uid: &str) {
    if let Some(entry) = supervised.get(uid) {
        entry.events.send_replace(PodEvent::Gone);
    }
}

/// Binds the pod to this node through the `pods/binding` subresource (retrying transient
/// errors; a conflict means someone else bound it).
fn bind(
    shared: &Arc<NodeShared>,
    pod: Pod,
    in_flight: &mut HashSet<String>,
    done: &mpsc::UnboundedSender<String>,
) {
    let uid = pod.uid().unwrap_or_default();
    if !in_flight.insert(uid.clone()) {
        return;
    }
    let shared = shared.clone();
    let done = done.clone();
    tokio::spawn(async move {
        let name = pod.name_any();
        let namespace = pod.namespace().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &namespace);
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                uid: pod.uid(),
                ..Default::default()
            },
            target: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Node".to_owned()),
                name: Some(shared.node_name.clone()),
                ..Default::default()
            },
        };
        for attempt in 1..=5u64 {
            let result: Result<serde_json::Value, _> = pods
                .create_subresource("binding", &name, &PostParams::default(), &binding)
                .await;
            match result {
                Ok(_) => {
                    let note = format!("Successfully assigned {namespace}/{name} to {}", shared.node_name);
                    record(&shared, &pod, "Scheduled", &note).await;
                    break;
                }
                Err(kube::Error::Api(status)) if matches!(status.code, 404 | 409) => break,
                Err(err) => {
                    tracing::warn!(pod = %name, %err, attempt, "cannot bind pod");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
        let _ = done.send(uid);
    });
}

async fn record(shared: &NodeShared, pod: &Pod, reason: &str, note: &str) {
    let event = K8sEvent {
        type_: EventType::Normal,
        reason: reason.to_owned(),
        note: Some(note.to_owned()),
        action: "Binding".to_owned(),
        secondary: None,
    };
    if let Err(err) = shared.recorder.publish(&event, &pod.object_ref(&())).await {
        tracing::debug!(%err, "cannot record event");
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{PodSchedulingGate, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::Time,
    };

    use super::*;

    fn pod(spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta::default(),
            spec: Some(spec),
            status: None,
        }
    }

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())])
    }

    #[test]
    fn binds_only_what_a_scheduler_would() {
        let check = |p: &Pod| placement(p, "pn", &labels());
        assert_eq!(check(&pod(PodSpec::default())), Placement::Bind);
        let selected = PodSpec {
            node_selector: Some(labels()),
            ..Default::default()
        };
        assert_eq!(check(&pod(selected)), Placement::Bind);
        let ours = PodSpec {
            node_name: Some("pn".into()),
            ..Default::default()
        };
        assert_eq!(check(&pod(ours)), Placement::Ours);

        let others = [
            PodSpec {
                node_name: Some("other".into()),
                ..Default::default()
            },
            PodSpec {
                scheduler_name: Some("volcano".into()),
                ..Default::default()
            },
            PodSpec {
                scheduling_gates: Some(vec![PodSchedulingGate { name: "wait".into() }]),
                ..Default::default()
            },
            PodSpec {
                node_selector: Some(BTreeMap::from([("gpu".into(), "true".into())])),
                ..Default::default()
            },
        ];
        for spec in others {
            assert!(
                matches!(check(&pod(spec.clone())), Placement::Ignore(_)),
                "{spec:?}"
            );
        }
        let mut deleted = pod(PodSpec::default());
        deleted.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert!(matches!(check(&deleted), Placement::Ignore(_)));
        let mut done = pod(PodSpec::default());
        done.status = Some(PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert!(matches!(check(&done), Placement::Ignore(_)));
    }
}
