//! Objects people apply (with `kubectl`, or from Git) that the gateway appends to a signed
//! chain in the record store: Consents (a subject's consent history) and Feedback (a run's
//! corrections). Every replica watches them in every namespace and appends each new one once
//! (its uid is the request id, so the chain holds it once however many replicas try), then says
//! so on its status (`Recorded`, and `Ready` for `kubectl wait` and kstatus). Objects watched
//! are appended in the order the API server accepted them; objects listed at start (or after
//! the watch was lost) by their creation time, which is to the second (see
//! [`ChainedObject::within_second`]). Their specs never change (admission refuses it), and
//! deleting one does not undo what it recorded.

use std::{fmt::Debug, future::Future, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Resource, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;

use crate::{keys::TenantKeys, records::RecordStore};

/// The field manager of the status the gateway writes.
const FIELD_MANAGER: &str = "contextos.dev/gateway";
/// The condition on a chained object that says whether it is in its chain.
pub const RECORDED: &str = "Recorded";
/// Request ids the gateway gives objects' records (`object.<uid>`); the APIs refuse them from
/// anyone else, so no one can take an object's place in a chain.
pub const OBJECT_REQUEST_PREFIX: &str = "object.";
/// The reason on an object whose chaining waits for the store.
pub const STORE_UNAVAILABLE: &str = "StoreUnavailable";
/// The longest wait between two attempts to chain an object while the store is unavailable.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Attempts to write an object's status.
const STATUS_ATTEMPTS: u32 = 5;

/// What became of one attempt to chain an object.
#[derive(Debug)]
pub enum Chaining {
    /// Appended or refused for good: the status to write.
    Done(serde_json::Value),
    /// The store is away: the object waits (and so do the ones after it).
    Wait(String),
}

/// A kind whose objects the gateway chains.
pub trait ChainedObject:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Where it goes among objects created in the same second, when a listing is chained (the
    /// API server dates objects to the second, and lists them by name): lower first. A Consent
    /// revocation goes after grants, so where the order is unclear the revocation stands.
    fn within_second(&self) -> u8 {
        0
    }

    /// Whether its status already says what became of it (appended, or refused for good: its
    /// spec cannot change, so neither can the answer). Only a hint: appending it again finds
    /// its record by request id and appends nothing.
    fn decided(&self) -> bool;

    /// Appends it to its chain in `store`.
    fn chain<S: RecordStore>(
        &self,
        client: &kube::Client,
        store: &S,
        keys: &TenantKeys,
    ) -> impl Future<Output = Chaining> + Send;
}

/// Whether `conditions` already say the object was decided at `generation`.
pub fn decided(conditions: &[Condition], generation: Option<i64>) -> bool {
    conditions.iter().any(|c| {
        c.type_ == RECORDED
            && c.observed_generation == generation
            && (c.status == "True" || c.reason != STORE_UNAVAILABLE)
    })
}

/// `Recorded`, and `Ready` saying the same (what `kubectl wait`, kstatus and Argo CD read).
pub fn conditions(generation: Option<i64>, recorded: bool, reason: &str, message: String) -> Vec<Condition> {
    [RECORDED, "Ready"]
        .into_iter()
        .map(|type_| Condition {
            type_: type_.into(),
            status: if recorded { "True" } else { "False" }.into(),
            reason: reason.into(),
            message: message.clone(),
            observed_generation: generation,
            last_transition_time: Time(jiff::Timestamp::now()),
        })
        .collect()
}

/// Watches the objects of `K` in every namespace and chains each new one, for as long as the
/// gateway runs.
pub async fn chain_objects<K: ChainedObject, S: RecordStore>(
    client: kube::Client,
    store: Arc<S>,
    keys: TenantKeys,
) {
    let kind = K::kind(&()).into_owned();
    let api = Api::<K>::all(client.clone());
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut listed: Vec<K> = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(object)) => listed.push(object),
            Ok(watcher::Event::InitDone) => {
                let mut batch = std::mem::take(&mut listed);
                // The API server lists by name; what was accepted first is chained first (to the
                // second: within one, as `within_second` says, then by name).
                batch.sort_by(|a, b| {
                    a.meta()
                        .creation_timestamp
                        .cmp(&b.meta().creation_timestamp)
                        .then_with(|| a.within_second().cmp(&b.within_second()))
                        .then_with(|| a.meta().namespace.cmp(&b.meta().namespace))
                        .then_with(|| a.name_any().cmp(&b.name_any()))
                });
                for object in batch {
                    chain_one(&client, &*store, &keys, &object).await;
                }
            }
            Ok(watcher::Event::Apply(object)) => chain_one(&client, &*store, &keys, &object).await,
            Ok(watcher::Event::Delete(_)) => {}
            Err(e) => tracing::warn!(%kind, error = %e, "watching objects failed; watching again"),
        }
    }
}

/// Chains one object (waiting out a store that is unavailable: the objects after it must come
/// after it in the chain) and writes its status.
async fn chain_one<K: ChainedObject, S: RecordStore>(
    client: &kube::Client,
    store: &S,
    keys: &TenantKeys,
    object: &K,
) {
    if object.decided() {
        return;
    }
    let Some(namespace) = object.namespace() else {
        return;
    };
    let kind = K::kind(&());
    let mut wait = Duration::from_secs(1);
    let status = loop {
        match object.chain(client, store, keys).await {
            Chaining::Done(status) => break status,
            Chaining::Wait(why) => {
                tracing::warn!(%kind, name = %object.name_any(), %namespace, %why, "cannot chain an object yet; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_RETRY);
            }
        }
    };
    let api = Api::<K>::namespaced(client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": kind,
        "status": status,
    });
    // Written again until it lands: a status that never says Recorded leaves the object to be
    // chained again on the next listing (harmless — found by its request id — but a wait for
    // `kubectl wait` that never ends).
    for attempt in 1..=STATUS_ATTEMPTS {
        match api
            .patch_status(
                &object.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => return,
            // Deleted meanwhile: what it recorded stays recorded.
            Err(kube::Error::Api(status)) if status.code == 404 => return,
            Err(e) => {
                tracing::warn!(%kind, name = %object.name_any(), %namespace, attempt, error = %e, "cannot write an object's status");
                tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
            }
        }
    }
}
