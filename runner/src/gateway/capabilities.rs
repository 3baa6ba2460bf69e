//! How the gateway service reaches a run's capability pods (see [`crate::capability`]): it
//! finds the pod the operator made for the Session and server, checks whose it is, and dials it
//! at its pod address — never at an address a tenant wrote into an object.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use contextos_crds::labels;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use tokio::{
    io::BufReader,
    net::tcp::{OwnedReadHalf, OwnedWriteHalf},
};

use super::egress::EgressGuard;
use crate::capability::{self, ChannelKey, Hello, ServerDigest};

/// How long a call waits for its Session's capability pod to be running (it is created with
/// the Session's first attempt, so normally it already is).
const WAIT_FOR_POD: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(500);

/// A future the resolver returns (the trait is used as an object).
pub type Resolving<'a> = Pin<Box<dyn Future<Output = Result<Lookup, String>> + Send + 'a>>;

/// What a look-up for a capability pod found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Running and ready at this address, proving itself with this key.
    At(SocketAddr, ChannelKey),
    /// Not running yet (or not yet there): worth asking again.
    NotYet(String),
}

/// Finds the capability pod serving a server of a Session.
pub trait CapabilityResolver: Send + Sync {
    fn find<'a>(&'a self, namespace: &'a str, session: &'a str, server: &'a ServerDigest) -> Resolving<'a>;
}

/// The API server, with the gateway's own service account (`get` on pods).
#[derive(Clone)]
pub struct KubeCapabilities {
    client: Client,
}

impl std::fmt::Debug for KubeCapabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCapabilities").finish_non_exhaustive()
    }
}

impl KubeCapabilities {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl CapabilityResolver for KubeCapabilities {
    fn find<'a>(&'a self, namespace: &'a str, session: &'a str, server: &'a ServerDigest) -> Resolving<'a> {
        Box::pin(async move {
            let name = capability::pod_name(session, server);
            let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading Pod {namespace}/{name}: {e}"))?;
            match pod {
                None => Ok(Lookup::NotYet(format!(
                    "pod {namespace}/{name} does not exist yet"
                ))),
                Some(pod) => judge(&pod, session, server),
            }
        })
    }
}

/// Whether `pod` is the running capability pod of `session` for `server`, and its address
/// (pure). The name alone proves nothing: a tenant can create pods.
pub fn judge(pod: &Pod, session: &str, server: &ServerDigest) -> Result<Lookup, String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let owned = pod.metadata.owner_references.iter().flatten().any(|o| {
        o.controller == Some(true)
            && o.kind == "Session"
            && o.api_version.starts_with("contextos.dev/")
            && o.name == session
    });
    let labelled = |key: &str, value: &str| {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .is_some_and(|v| v == value)
    };
    if !owned
        || !labelled(labels::ROLE, capability::ROLE)
        || !labelled(capability::SERVER_LABEL, server.as_str())
    {
        return Err(format!(
            "pod {name} is not the capability pod of Session {session} for server {server}"
        ));
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return Err(format!(
            "pod {name} uses the node's network; capability pods never do"
        ));
    }
    let key = spec
        .containers
        .first()
        .into_iter()
        .flat_map(|c| c.args.iter().flatten())
        .take_while(|a| *a != "--")
        .find_map(|a| a.strip_prefix("--key="))
        .and_then(ChannelKey::parse)
        .ok_or_else(|| format!("pod {name} names no channel key"))?;
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(format!("capability pod {name} is being deleted"));
    }
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_default();
    match phase.as_str() {
        "Running" => {}
        "Succeeded" | "Failed" => return Err(format!("capability pod {name} has ended ({phase})")),
        _ => return Ok(Lookup::NotYet(format!("capability pod {name} is {phase}"))),
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return Ok(Lookup::NotYet(format!("capability pod {name} is not ready")));
    }
    let ip = status
        .pod_ip
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| format!("capability pod {name} has no address yet"))?;
    Ok(Lookup::At(SocketAddr::new(ip, capability::PORT), key))
}

/// The capability pods of one run: where the gateway's MCP client sends a command-started
/// server's traffic instead of starting it.
#[derive(Clone)]
pub struct CapabilityRoute {
    resolver: Arc<dyn CapabilityResolver>,
    namespace: String,
    session: String,
    egress: EgressGuard,
}

impl std::fmt::Debug for CapabilityRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapabilityRoute")
            .field("namespace", &self.namespace)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl CapabilityRoute {
    pub fn new(
        resolver: Arc<dyn CapabilityResolver>,
        namespace: &str,
        session: &str,
        egress: EgressGuard,
    ) -> Self {
        Self {
            resolver,
            namespace: namespace.into(),
            session: session.into(),
            egress,
        }
    }

    /// A connection to the server `command` starts, greeted and ready for MCP.
    pub async fn connect(
        &self,
        command: &[String],
    ) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf), String> {
        let server = ServerDigest::of(command);
        let deadline = tokio::time::Instant::now() + WAIT_FOR_POD;
        let (address, key) = loop {
            match self
                .resolver
                .find(&self.namespace, &self.session, &server)
                .await?
            {
                Lookup::At(address, key) => break (address, key),
                Lookup::NotYet(why) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("{why} after {WAIT_FOR_POD:?}"));
                }
                Lookup::NotYet(_) => tokio::time::sleep(POLL).await,
            }
        };
        // The address is the kubelet's report for the Session's own pod, not a destination an
        // Agent names: the platform's deny list (often the whole pod range) is not for it.
        // Metadata services and unroutable addresses never are capability pods.
        let ip = address.ip();
        if ip.is_unspecified() || ip.is_multicast() || !self.egress.allows_always(ip) {
            return Err(format!("{address} cannot be a capability pod's address"));
        }
        let hello = Hello {
            namespace: self.namespace.clone(),
            session: self.session.clone(),
            server,
        };
        capability::dial(address, &hello, &key, Duration::from_secs(10)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn pod(owner: &str, role: &str, server: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "s1-cap-x",
                "labels": {labels::ROLE: role, capability::SERVER_LABEL: server},
                "ownerReferences": [{"apiVersion": "contextos.dev/v1alpha1", "kind": "Session", "name": owner, "uid": "u", "controller": true}],
            },
            "spec": {"containers": [{"name": "capability", "args": ["capability", "serve", format!("--key={KEY}"), "--", "srv"]}]},
            "status": {"phase": phase, "podIP": "10.244.0.7", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("pod")
    }

    #[test]
    fn only_the_sessions_running_capability_pod_for_that_server_is_dialled() {
        let server = ServerDigest::of(&["srv".into()]);
        let at = SocketAddr::from(([10, 244, 0, 7], capability::PORT));
        let key = ChannelKey::parse(KEY).expect("key");
        let running = || pod("s1", capability::ROLE, server.as_str(), "Running");
        assert_eq!(judge(&running(), "s1", &server), Ok(Lookup::At(at, key)));
        let mut unready = running();
        if let Some(status) = unready.status.as_mut() {
            status.conditions = None;
        }
        assert!(matches!(judge(&unready, "s1", &server), Ok(Lookup::NotYet(_))));
        let mut leaving = running();
        leaving.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(judge(&leaving, "s1", &server).is_err(), "a pod being deleted");
        let mut on_the_node = running();
        if let Some(spec) = on_the_node.spec.as_mut() {
            spec.host_network = Some(true);
        }
        assert!(
            judge(&on_the_node, "s1", &server).is_err(),
            "a pod on the node's network"
        );
        let mut keyless = running();
        if let Some(spec) = keyless.spec.as_mut() {
            spec.containers[0].args = Some(vec!["--".into(), format!("--key={KEY}")]);
        }
        assert!(
            judge(&keyless, "s1", &server).is_err(),
            "a key after `--` is the server's argument"
        );
        assert!(matches!(
            judge(
                &pod("s1", capability::ROLE, server.as_str(), "Pending"),
                "s1",
                &server
            ),
            Ok(Lookup::NotYet(_))
        ));
        for (owner, role, label) in [
            ("s2", capability::ROLE, server.as_str()),
            ("s1", "runner", server.as_str()),
            ("s1", capability::ROLE, "000000000000"),
        ] {
            assert!(judge(&pod(owner, role, label, "Running"), "s1", &server).is_err());
        }
        assert!(
            judge(
                &pod("s1", capability::ROLE, server.as_str(), "Failed"),
                "s1",
                &server
            )
            .is_err()
        );
    }
}
