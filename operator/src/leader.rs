//! Leader election over a `coordination.k8s.io` Lease, so two or more replicas can run and only
//! one reconciles. The holder renews the Lease every `renew`; a replica takes it over only after
//! the holder has not renewed for the whole `duration`. Updates use the Lease's
//! resourceVersion, so two replicas can never both win a takeover.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// Who competes for which Lease.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease: String,
    /// This replica's name (its pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

/// The outcome of one attempt to take or keep the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    Leader,
    /// Someone else holds it.
    Follower {
        holder: String,
    },
}

impl LeaderElection {
    /// Takes the Lease if it is free, expired or already ours; renews it if ours.
    pub async fn try_acquire(&self, client: &Client) -> Result<Standing, kube::Error> {
        let api = Api::<Lease>::namespaced(client.clone(), &self.namespace);
        let now = Timestamp::now();
        let Some(mut lease) = api.get_opt(&self.lease).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Standing::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(self.follower("another replica")),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renewed = spec
            .renew_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(Timestamp::UNIX_EPOCH);
        let duration =
            Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
        let expired =
            now.duration_since(renewed).as_secs() >= i64::try_from(duration.as_secs()).unwrap_or(i64::MAX);
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(self.follower(&holder));
        }
        let (acquired, transitions) = if holder == self.identity {
            (
                spec.acquire_time.map_or(now, |t| t.0),
                spec.lease_transitions.unwrap_or(0),
            )
        } else {
            (now, spec.lease_transitions.unwrap_or(0) + 1)
        };
        lease.spec = Some(self.spec(acquired, now, transitions));
        // The resourceVersion from the read makes this a compare-and-swap.
        match api.replace(&self.lease, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Standing::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(self.follower("another replica")),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self, client: &Client) {
        loop {
            match self.try_acquire(client).await {
                Ok(Standing::Leader) => return,
                Ok(Standing::Follower { holder }) => {
                    tracing::info!(%holder, lease = %self.lease, "waiting for leadership");
                }
                Err(error) => tracing::warn!(%error, "cannot read or take the leader Lease"),
            }
            tokio::time::sleep(self.renew).await;
        }
    }

    /// Keeps renewing while leader; returns when leadership is lost (the Lease was taken, or
    /// could not be renewed within its duration), so the caller stops reconciling.
    pub async fn hold(&self, client: &Client) {
        // Step down well before another replica may take over (two thirds of the duration), and
        // never wait on a hung API call past that deadline.
        let deadline = self.duration * 2 / 3;
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew).await;
            let attempt = tokio::time::timeout(self.renew, self.try_acquire(client)).await;
            match attempt {
                Ok(Ok(Standing::Leader)) => last_renewed = tokio::time::Instant::now(),
                Ok(Ok(Standing::Follower { holder })) => {
                    tracing::warn!(%holder, "leadership lost");
                    return;
                }
                Ok(Err(error)) => tracing::warn!(%error, "cannot renew the leader Lease"),
                Err(_) => tracing::warn!("renewing the leader Lease timed out"),
            }
            if last_renewed.elapsed() >= deadline {
                tracing::warn!("the leader Lease was not renewed in time; stepping down");
                return;
            }
        }
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn follower(&self, holder: &str) -> Standing {
        Standing::Follower {
            holder: holder.to_owned(),
        }
    }
}
