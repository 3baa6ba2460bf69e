//! Runner and capability pods as their Sessions need to hear of them. A Session waits on its
//! pods' ends (phase, a container's termination and its message, eviction) and their going
//! away; a starting pod's other status changes (scheduled, sandbox ready, address) each used to
//! bring its Session back for a pass that found nothing to do, reading its bundle and pod from
//! the API server each time.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher as _, Hash as _, Hasher as _, RandomState},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};

/// The pods with `selector` (whole: their status is what matters), passed on when what a
/// Session waits for changed since the pod was last passed on, and when they go — also when
/// they went while the watch was down (its relist no longer holds them).
pub fn turns(client: &Client, selector: &str) -> impl Stream<Item = Result<Pod, watcher::Error>> + use<> {
    let mut turns = Turns::default();
    watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(selector),
    )
    .default_backoff()
    .flat_map(move |event| futures::stream::iter(turns.heard(event)))
}

/// What was passed on of each pod, by uid: its turn, and enough of it to tell its Session it
/// went. A few hundred bytes a pod, where a cache would hold them whole.
#[derive(Default)]
struct Turns {
    /// Keys the turns' hashes: a runner writes its termination message, so a fixed hash could
    /// be aimed at (an end that hashes as the running pod did would not be heard).
    keys: RandomState,
    passed: HashMap<String, (u64, Pod)>,
    /// The pods a relist under way has listed.
    relisted: Option<HashSet<String>>,
}

impl Turns {
    fn heard(
        &mut self,
        event: Result<watcher::Event<Pod>, watcher::Error>,
    ) -> Vec<Result<Pod, watcher::Error>> {
        match event {
            Ok(watcher::Event::Apply(pod)) => self.applied(pod).into_iter().map(Ok).collect(),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some(relisted) = &mut self.relisted {
                    relisted.insert(pod.uid().unwrap_or_default());
                }
                self.applied(pod).into_iter().map(Ok).collect()
            }
            Ok(watcher::Event::Delete(pod)) => {
                self.passed.remove(&pod.uid().unwrap_or_default());
                vec![Ok(pod)]
            }
            Ok(watcher::Event::Init) => {
                self.relisted = Some(HashSet::new());
                Vec::new()
            }
            Ok(watcher::Event::InitDone) => {
                // Pods the relist did not hold went while the watch was down: their Sessions
                // hear of it as of a deletion.
                let relisted = self.relisted.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .passed
                    .keys()
                    .filter(|uid| !relisted.contains(*uid))
                    .cloned()
                    .collect();
                gone.iter()
                    .filter_map(|uid| self.passed.remove(uid))
                    .map(|(_, pod)| Ok(pod))
                    .collect()
            }
            Err(e) => vec![Err(e)],
        }
    }

    fn applied(&mut self, pod: Pod) -> Option<Pod> {
        let turn = turn(&pod, &self.keys);
        // Only the controlling owner is kept (a Session's, for its own pods; the API server
        // allows one): anyone may label a pod of theirs as a Session's and give it thousands of
        // other owners, which kept for every such pod would fill this process.
        let controller = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|owner| owner.controller == Some(true))
            .cloned();
        let known = Pod {
            metadata: ObjectMeta {
                name: pod.metadata.name.clone(),
                namespace: pod.metadata.namespace.clone(),
                uid: pod.metadata.uid.clone(),
                owner_references: controller.map(|owner| vec![owner]),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        match self.passed.insert(pod.uid().unwrap_or_default(), (turn, known)) {
            Some((last, _)) if last == turn => None,
            _ => Some(pod),
        }
    }
}

/// What of `pod` its Session acts on (pure), as a hash: its phase and why (an eviction, a
/// deadline), whether it is being deleted, and each ended container's end with its message
/// (the runner's report). Equal turns mean nothing a Session decides on changed.
fn turn(pod: &Pod, keys: &RandomState) -> u64 {
    let mut hasher = keys.build_hasher();
    pod.metadata.deletion_timestamp.is_some().hash(&mut hasher);
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()).hash(&mut hasher);
    status.and_then(|s| s.reason.as_deref()).hash(&mut hasher);
    for container in status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default()
    {
        if let Some(ended) = container.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            container.name.hash(&mut hasher);
            (ended.exit_code, ended.reason.as_deref(), ended.message.as_deref()).hash(&mut hasher);
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(uid: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": format!("s-{uid}"), "uid": uid}, "status": status}),
        )
        .expect("a pod")
    }

    fn container(state: serde_json::Value) -> serde_json::Value {
        json!([{"name": "runner", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": state}])
    }

    #[test]
    fn a_starting_pod_has_one_turn_and_its_end_another() {
        let keys = RandomState::new();
        let turn = |p: &Pod| turn(p, &keys);
        let created = pod("u1", json!({"phase": "Pending"}));
        let scheduled = pod(
            "u1",
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}),
        );
        let creating = pod(
            "u1",
            json!({"phase": "Pending", "podIP": "10.0.0.7",
                "containerStatuses": container(json!({"waiting": {"reason": "ContainerCreating"}}))}),
        );
        assert_eq!(turn(&created), turn(&scheduled));
        assert_eq!(turn(&created), turn(&creating));
        let running = pod(
            "u1",
            json!({"phase": "Running", "podIP": "10.0.0.7",
                "containerStatuses": container(json!({"running": {"startedAt": "2026-12-06T10:00:00Z"}}))}),
        );
        assert_ne!(turn(&creating), turn(&running));
        let ended = |message: &str| {
            pod(
                "u1",
                json!({"phase": "Succeeded", "containerStatuses": container(
                    json!({"terminated": {"exitCode": 0, "reason": "Completed", "message": message}}))}),
            )
        };
        assert_ne!(turn(&running), turn(&ended("{}")));
        // The report is part of the turn: a message written late is heard.
        assert_ne!(turn(&ended("")), turn(&ended("{\"outcome\":\"completed\"}")));
        let evicted = pod("u1", json!({"phase": "Failed", "reason": "Evicted"}));
        assert_ne!(turn(&pod("u1", json!({"phase": "Failed"}))), turn(&evicted));
        let mut deleting = running.clone();
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-06T10:00:05Z".parse().expect("a time"),
        ));
        assert_ne!(turn(&running), turn(&deleting));
    }

    #[test]
    fn of_a_pods_owners_only_its_controller_is_kept() {
        let mut turns = Turns::default();
        let mut crowded = pod("c", json!({"phase": "Running"}));
        let owner = |i: usize, controller: bool| {
            serde_json::from_value(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "name": format!("o-{i}"),
                "uid": format!("uid-{i}"), "controller": controller}),
            )
            .expect("an owner reference")
        };
        let mut owners: Vec<_> = (0..10_000).map(|i| owner(i, false)).collect();
        owners.push(owner(10_000, true));
        crowded.metadata.owner_references = Some(owners);
        turns.heard(Ok(watcher::Event::Apply(crowded)));
        let kept = turns
            .passed
            .get("c")
            .and_then(|(_, p)| p.metadata.owner_references.clone());
        assert_eq!(
            kept.map(|o| o.into_iter().map(|o| o.name).collect::<Vec<_>>()),
            Some(vec!["o-10000".to_owned()])
        );
    }

    fn names(passed: Vec<Result<Pod, watcher::Error>>) -> Vec<String> {
        passed
            .into_iter()
            .filter_map(|p| p.ok())
            .map(|p| p.name_any())
            .collect()
    }

    #[test]
    fn a_pod_is_passed_on_at_each_turn_and_when_it_goes_even_unseen() {
        let mut turns = Turns::default();
        let running = || pod("a", json!({"phase": "Running"}));
        assert_eq!(
            names(turns.heard(Ok(watcher::Event::Apply(pod("a", json!({"phase": "Pending"})))))),
            ["s-a"]
        );
        assert_eq!(names(turns.heard(Ok(watcher::Event::Apply(running())))), ["s-a"]);
        // A status change that is not a turn is not passed on.
        let mut addressed = running();
        addressed.status.as_mut().expect("a status").pod_ip = Some("10.0.0.9".into());
        assert!(names(turns.heard(Ok(watcher::Event::Apply(addressed)))).is_empty());
        assert_eq!(
            names(turns.heard(Ok(watcher::Event::Apply(pod("b", json!({"phase": "Running"})))))),
            ["s-b"]
        );
        // The watch restarts; meanwhile b went. The relist holds a, unchanged: only b is heard
        // of, as gone.
        assert!(names(turns.heard(Ok(watcher::Event::Init))).is_empty());
        assert!(names(turns.heard(Ok(watcher::Event::InitApply(running())))).is_empty());
        let gone = turns.heard(Ok(watcher::Event::InitDone));
        assert_eq!(names(gone), ["s-b"]);
        assert_eq!(turns.passed.len(), 1);
        assert_eq!(names(turns.heard(Ok(watcher::Event::Delete(running())))), ["s-a"]);
        assert!(turns.passed.is_empty());
    }
}
