//! The read API (`/v1/records/…`): a replay Job's pods read their tenant's runs and store their
//! report, with the operator's read grant for their own Job; and people (or other workloads)
//! read a namespace's runs with their own Kubernetes identity, if the API server says they may
//! (`get` on `sessions/records` there) — they write nothing.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
};
use base64::Engine as _;

use super::*;
use crate::{
    read_grant::ReadGrant,
    run::{
        gate::{
            GATE_DEADLINE, GATE_RUNNING, GATES_BUSY, GATES_PER_REPLICA, GATES_PER_TENANT, GateVerdict,
            SignedGateVerdict,
        },
        replay::ReplayGate,
    },
};

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    /// Who reads which tenant's records: a reader naming a namespace in
    /// [`READER_NAMESPACE_HEADER`] with their own token, if the API server lets them `get`
    /// `sessions/records` there; otherwise a replay Job's pod with its grant ([`Self::granted`]).
    pub(super) async fn reader(&self, headers: &HeaderMap) -> Result<TenantId, Refusal> {
        if !headers.contains_key(READER_NAMESPACE_HEADER) {
            let (tenant, grant, _) = self.granted(headers).await?;
            // A skill's evaluation reads nothing recorded: its grant orders the suite only.
            if grant
                .gate
                .as_ref()
                .is_some_and(|g| g.kind == crate::run::gate::GatedKind::Skill)
            {
                return Err(forbidden(format!(
                    "the read grant of Job {} orders a skill's evaluation, which reads no records",
                    grant.job
                )));
            }
            return Ok(tenant);
        }
        let (namespace, person) = self.permitted_person(headers, Access::ReadRecords).await?;
        // The audit trail of people's reads.
        tracing::info!(user = %person.username, %namespace, "records read");
        Ok(namespace)
    }

    /// `read`, once everything the store was given is durable: a reader outside the run is
    /// never shown an entry or a head a crash could still take back. Flushed after the read,
    /// not before it: a write committed between a flush and the read (another run's result
    /// written after its answer, a go-ahead whose flush is under way) would be shown before it
    /// is durable.
    pub(super) async fn durable<R>(&self, read: R) -> Result<R, Refusal> {
        self.store.flush_pending().await.map_err(unavailable)?;
        Ok(read)
    }

    /// The namespace a person names in [`READER_NAMESPACE_HEADER`] and the person, if the API
    /// server lets them do `access` there.
    pub(super) async fn permitted_person(
        &self,
        headers: &HeaderMap,
        access: Access,
    ) -> Result<(TenantId, crate::gateway::readers::Reader), Refusal> {
        let namespace = headers
            .get(READER_NAMESPACE_HEADER)
            .ok_or_else(|| bad(format!("header {READER_NAMESPACE_HEADER} is missing")))?
            .to_str()
            .ok()
            .and_then(|n| TenantId::new(n).ok())
            .ok_or_else(|| {
                bad(format!(
                    "header {READER_NAMESPACE_HEADER} does not name a namespace"
                ))
            })?;
        if self.is_own(namespace.as_str()) {
            return Err(forbidden(format!(
                "namespace {namespace} is ContextOS's own; it holds no records"
            )));
        }
        let person = self.person(headers).await?;
        let allowed = self.auth.may(&person, namespace.as_str(), access).await.map_err(|e| {
            if let AuthError::AccessThrottled(_) = e {
                return super::throttled(&e);
            }
            // The API server's own answer stays in the gateway's log.
            tracing::warn!(error = %e, user = %person.username, %namespace, ?access, "cannot review a person's request");
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the gateway cannot ask the API server whether you may do this now; try again".into(),
            )
        })?;
        if !allowed {
            tracing::info!(user = %person.username, %namespace, ?access, "refused a person's request without permission");
            let what = match access {
                Access::ReadRecords => "read the records",
                Access::ReadConsents => "read the consent records",
                Access::RecordConsent => "record consent",
                Access::ReadMemory => "read the memory",
                Access::ForgetMemory => "forget the memory",
                Access::KeepMemory => "approve memory candidates",
                Access::ReadSubjects => "see the subjects",
                Access::EraseSubject => "erase subjects",
            };
            return Err(forbidden(format!(
                "user {} may not {what} of namespace {namespace}: that needs {}",
                person.username,
                access.describe()
            )));
        }
        Ok((namespace, person))
    }

    /// [`Self::reader`], the grant the reader presented, and the uid of the Job its pod is of.
    async fn granted(&self, headers: &HeaderMap) -> Result<(TenantId, ReadGrant, String), Refusal> {
        let identity = self.identify(headers).await?;
        let grant = headers
            .get(READ_GRANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .and_then(|bytes| serde_json::from_slice::<SignedReadGrant>(&bytes).ok())
            .ok_or_else(|| {
                bad(format!(
                    "header {READ_GRANT_HEADER} does not hold a signed read grant"
                ))
            })?;
        let grant = match grant.verify(&self.trust, &identity.namespace, now_ms()) {
            Ok(grant) => grant,
            Err(e) => {
                self.record_refusal(&identity, &e.to_string()).await;
                return Err(forbidden(e.to_string()));
            }
        };
        let controller = self
            .tenants
            .pod_controller(&identity.namespace, &identity.pod)
            .await
            .map_err(unavailable)?;
        // Labelled a replay pod too: only the job controller makes a Job's pod one (admission
        // policy contextos-replay-pods), while anyone who may create pods can name a Job as
        // their pod's owner.
        let Some(job_uid) = controller
            .filter(|c| {
                c.is("batch", "Job", &grant.job, &identity.pod_uid) && c.role.as_deref() == Some("replay")
            })
            .map(|c| c.owner_uid)
        else {
            tracing::warn!(namespace = %identity.namespace, pod = %identity.pod, job = %grant.job,
                "refused a read grant presented by a pod its Job does not own");
            let why = format!(
                "the read grant is for the pods of Job {}, and pod {}/{} is not one",
                grant.job, identity.namespace, identity.pod
            );
            self.record_refusal(&identity, &why).await;
            return Err(forbidden(why));
        };
        let grant = grant.clone();
        let tenant = TenantId::new(identity.namespace).map_err(|e| bad(e.to_string()))?;
        Ok((tenant, grant, job_uid))
    }

    /// A replay Job's gate: the candidate it posts must be the one its grant orders (by
    /// digest); the gateway replays the tenant's recorded runs under it and signs the verdict
    /// with the tenant's key, so no pod can report a verdict of its own.
    pub(super) async fn reader_gate(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        let (tenant, grant, job_uid) = service.granted(&headers).await?;
        let order = grant.gate.as_ref().ok_or_else(|| {
            forbidden(format!(
                "the read grant of Job {} orders no replay gate",
                grant.job
            ))
        })?;
        let object: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| bad(format!("the candidate is not JSON: {e}")))?;
        let candidate = order.candidate(&object).map_err(|e| bad(e.to_string()))?;
        let _running = RunningGate::start(&service.gates, &grant.job, tenant.as_str())?;
        if let Some(skill) = &candidate.skill {
            // A skill's suite runs here, offline: its verdict is the gateway's like a replay's.
            // Bounded by its own deadline and the gates a replica runs, it takes no turn from
            // the requests of runs (and gives its thread back every step).
            let report = crate::gateway::fair::away(crate::skills::eval::evaluate(&order.name, skill)).await;
            crate::gateway::metrics::gateway().gate(
                order.kind.api_kind(),
                if report.passed() {
                    crate::gateway::metrics::GateResult::passed
                } else {
                    crate::gateway::metrics::GateResult::failed
                },
            );
            let verdict = GateVerdict {
                job: grant.job.clone(),
                job_uid,
                round: order.round.clone(),
                kind: order.kind,
                name: order.name.clone(),
                candidate_digest: order.candidate_digest.clone(),
                gate: report.as_gate(),
            };
            // A skill's evaluation read nothing recorded: nothing to make durable first.
            let signed = SignedGateVerdict::sign(verdict, &service.keys.for_tenant(tenant.as_str()));
            return Ok(Json(signed).into_response());
        }
        let models = Arc::new(TenantModels {
            service: service.clone(),
            tenant: tenant.clone(),
        });
        let gating = crate::run::gate::run_gate(&service.store, &tenant, order, &candidate, models, now_ms());
        // A gate runs for minutes and is bounded by its own limit (a few per replica): it takes
        // no turn from the requests of runs while it does.
        let gate = match crate::gateway::fair::away(tokio::time::timeout(GATE_DEADLINE, gating)).await {
            Ok(gate) => {
                let gate = gate.map_err(unavailable)?;
                if let Some(r) = &gate.reexecution {
                    service.spend.record_gate(tenant.as_str(), r.tokens);
                }
                gate
            }
            Err(_) => ReplayGate::refused(&format!(
                "the gate ran longer than {} minutes and was stopped: sample fewer sessions (replay.sampleSize) or fewer times (replay.reexecute.samples)",
                GATE_DEADLINE.as_secs() / 60
            )),
        };
        crate::gateway::metrics::gateway().gate(
            order.kind.api_kind(),
            match (gate.no_history, gate.passed) {
                (true, _) => crate::gateway::metrics::GateResult::no_history,
                (false, true) => crate::gateway::metrics::GateResult::passed,
                (false, false) => crate::gateway::metrics::GateResult::failed,
            },
        );
        let verdict = GateVerdict {
            job: grant.job.clone(),
            job_uid,
            round: order.round.clone(),
            kind: order.kind,
            name: order.name.clone(),
            candidate_digest: order.candidate_digest.clone(),
            gate,
        };
        // Signed from the records it read: those are durable before the verdict leaves.
        let signed = SignedGateVerdict::sign(verdict, &service.keys.for_tenant(tenant.as_str()));
        Ok(Json(service.durable(signed).await?).into_response())
    }

    pub(super) async fn reader_runs(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunsQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let after = match (q.after_ms, q.after_run) {
            (None, None) => None,
            (Some(started_at_ms), Some(run_id)) => {
                crate::records::store::validate_id("run", &run_id).map_err(|e| bad(e.to_string()))?;
                Some(crate::records::RunCursor {
                    started_at_ms,
                    run_id,
                })
            }
            _ => {
                return Err(bad(
                    "after_ms and after_run go together: where the last page ended",
                ));
            }
        };
        let filter = crate::records::RunFilter {
            agent: q.agent,
            session_id: q.session,
            since_ms: q.since_ms,
            until_ms: q.until_ms,
            limit: Some(q.limit.unwrap_or(MAX_LISTED_RUNS).min(MAX_LISTED_RUNS)),
            after,
        };
        let runs = service
            .store
            .list_runs(&tenant, &filter)
            .await
            .map_err(unavailable)?;
        Ok(Json(service.durable(runs).await?).into_response())
    }

    pub(super) async fn reader_head(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let head = service.store.head(&tenant, &q.run).await.map_err(unavailable)?;
        Ok(Json(service.durable(head).await?).into_response())
    }

    pub(super) async fn reader_chain(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let chain = service
            .store
            .read_chain_page(&tenant, &q.run, q.from, q.page())
            .await
            .map_err(unavailable)?;
        let chain = service.durable(chain).await?;
        Ok(Json(chain.iter().map(WireEntry::of).collect::<Vec<_>>()).into_response())
    }

    pub(super) async fn reader_checkpoint(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<SessionQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let checkpoint = service
            .store
            .latest_checkpoint(&tenant, &q.session)
            .await
            .map_err(unavailable)?;
        Ok(Json(service.durable(checkpoint).await?).into_response())
    }

    pub(super) async fn reader_put_blob(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Reply {
        // Only a replay Job stores (its report); a reader's POST never gets here (refused in
        // `identified_first`).
        let (tenant, grant, job_uid) = service.granted(&headers).await?;
        service.tenant_room(&tenant, body.len() as u64).await?;
        // Charged to the Job (by uid: a Job made again under its name is another), as a run's
        // blobs are to the run: a Job's pods store at most `MAX_JOB_BLOB_BYTES`.
        let charged = service
            .blob_bytes
            .lock()
            .map_err(|_| unavailable("the blob charges are unavailable"))?
            .charge(
                tenant.as_str(),
                &format!("job/{job_uid}"),
                0,
                body.len() as u64,
                MAX_JOB_BLOB_BYTES,
            );
        if let Err(over) = charged {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                crate::records::store::remote::QUOTA_EXCEEDED,
                format!(
                    "replay Job {} has stored {} bytes through this gateway replica and this upload adds {}; \
                     a Job stores at most {} MiB (its report) per replica",
                    grant.job,
                    over.used,
                    body.len(),
                    MAX_JOB_BLOB_BYTES >> 20
                ),
            ));
        }
        let hash = service
            .store
            .put_blob(&tenant, body.to_vec())
            .await
            .map_err(unavailable)?;
        Ok(Json(hash.to_hex()).into_response())
    }

    pub(super) async fn reader_get_blob(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Path(hash): Path<String>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let hash = Hash::parse(&hash).ok_or_else(|| bad("not a blob hash"))?;
        let blob = service
            .store
            .get_blob(&tenant, &hash)
            .await
            .map_err(unavailable)?;
        match service.durable(blob).await? {
            Some(bytes) => Ok(bytes.into_response()),
            None => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no blob {hash}"),
            )),
        }
    }
}

/// What a replay Job's pods may store through one replica (their report): far more than any
/// report of a gate's sample, far less than a tenant's store.
const MAX_JOB_BLOB_BYTES: u64 = 64 << 20;

/// A limit on a listing.
#[derive(Debug, Deserialize)]
pub(super) struct LimitQuery {
    limit: Option<usize>,
}

/// The most runs one listing of corrected runs returns.
const MAX_LISTED_CORRECTED: usize = 100_000;

/// A correction error as the reader sees it.
fn feedback_refusal(error: crate::feedback::FeedbackError) -> Refusal {
    use crate::feedback::FeedbackError;
    match error {
        FeedbackError::Invalid(message) => bad(message),
        FeedbackError::Read(e @ crate::records::read::ReadError::NotFound { .. }) => {
            Refusal::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
        }
        FeedbackError::Read(e) => unavailable(e),
        FeedbackError::Memory(e) => super::consent_api::refusal(e),
        FeedbackError::Vault(e) => super::consent_api::vault_refusal(e),
        FeedbackError::Remote(e) => unavailable(e),
    }
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    /// The runs of the reader's namespace that people corrected.
    pub(super) async fn reader_feedback_runs(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<LimitQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let limit = q.limit.unwrap_or(MAX_LISTED_CORRECTED).min(MAX_LISTED_CORRECTED);
        let runs = crate::feedback::FeedbackBook::new(&service.store, &tenant)
            .runs(limit)
            .await
            .map_err(feedback_refusal)?;
        Ok(Json(service.durable(runs).await?).into_response())
    }

    /// One run's corrections, verified with the tenant's key (a run about a person's opened
    /// with its key, or read as erased).
    pub(super) async fn reader_feedback(
        State(service): State<Arc<Self>>,
        headers: HeaderMap,
        Query(q): Query<RunQuery>,
    ) -> Reply {
        let tenant = service.reader(&headers).await?;
        let key = service.keys.for_tenant(tenant.as_str()).public();
        let history = crate::feedback::FeedbackBook::new(&service.store, &tenant)
            .of_run(&q.run, &key)
            .await
            .map_err(feedback_refusal)?;
        let records: Vec<_> = history.links.into_iter().map(|l| l.record).collect();
        Ok(Json(service.durable(records).await?).into_response())
    }
}

/// A gate's re-execution asks each recorded run's own model, as the run did: its key from the
/// tenant's namespace, its endpoint reached through this service's egress rules, its turns
/// charged to the SpendQuotas the run answers to. Only the model's key is read: re-executed
/// tool calls are answered from the record, never made.
struct TenantModels<S, A, T> {
    service: Arc<GatewayService<S, A, T>>,
    tenant: TenantId,
}

impl<S, A, T> crate::run::reexecute::ModelSource for TenantModels<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Authenticator + ReaderAuthority + 'static,
    T: TenantView + 'static,
{
    fn model_for<'a>(&'a self, bundle: &'a RunBundle) -> crate::run::reexecute::ModelLookup<'a> {
        Box::pin(async move {
            let key = bundle.agent_spec.model.secret_ref.clone().into_iter().collect();
            let secrets = self
                .service
                .secret_values(&self.tenant, key)
                .await
                .map_err(|refusal| refusal.message)?;
            let model = self
                .service
                .governed_model(bundle, &secrets)
                .map_err(|refusal| refusal.message)?;
            // Its turns are the tenant's spend, in the quotas the recorded run answers to.
            let quotas = self
                .service
                .quotas_of_bundle(&self.tenant, bundle)
                .await
                .map_err(|refusal| refusal.message)?;
            Ok(model.charged(Arc::new(super::quotas::GateCharge {
                service: self.service.clone(),
                tenant: self.tenant.clone(),
                quotas,
                price: bundle.model_price.clone(),
                output_bound: bundle
                    .agent_spec
                    .model
                    .max_output_tokens
                    .unwrap_or(u32::try_from(bundle.agent_spec.budget.max_tokens).unwrap_or(u32::MAX)),
            })))
        })
    }
}

/// A gate this replica runs, counted while it runs: one at a time per Job (a pod that posts its
/// candidate again does not start a second), and a few per tenant and per replica, so one
/// tenant's gates — minutes of model calls each — cannot take the service from the others.
struct RunningGate<'a> {
    gates: &'a Mutex<Vec<(String, String)>>,
    /// (Job, tenant): Job names are the tenant's, so another tenant may have one alike.
    entry: (String, String),
}

impl<'a> RunningGate<'a> {
    fn start(gates: &'a Mutex<Vec<(String, String)>>, job: &str, tenant: &str) -> Result<Self, Refusal> {
        let mut running = gates.lock().unwrap_or_else(|e| e.into_inner());
        let busy = |why: String| Refusal::new(StatusCode::TOO_MANY_REQUESTS, GATES_BUSY, why);
        if running.iter().any(|(j, t)| j == job && t == tenant) {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                GATE_RUNNING,
                format!(
                    "the gate of Job {job} is already running; its answer goes to the request that started it"
                ),
            ));
        }
        if running.iter().filter(|(_, t)| t == tenant).count() >= GATES_PER_TENANT {
            return Err(busy(format!(
                "namespace {tenant} already has {GATES_PER_TENANT} replay gates running on this replica; the Job's pod asks again shortly"
            )));
        }
        if running.len() >= GATES_PER_REPLICA {
            return Err(busy(format!(
                "{GATES_PER_REPLICA} replay gates are running on this replica; the Job's pod asks again shortly"
            )));
        }
        let entry = (job.to_owned(), tenant.to_owned());
        running.push(entry.clone());
        Ok(Self { gates, entry })
    }
}

impl Drop for RunningGate<'_> {
    fn drop(&mut self) {
        let mut running = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = running.iter().position(|e| *e == self.entry) {
            running.swap_remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_runs_one_gate_and_a_tenant_a_few() {
        let gates = Mutex::new(Vec::new());
        let first = RunningGate::start(&gates, "replay-a", "shop").expect("first");
        let again = RunningGate::start(&gates, "replay-a", "shop")
            .err()
            .expect("the same Job again");
        assert_eq!(again.status, StatusCode::CONFLICT);
        let _second = RunningGate::start(&gates, "replay-b", "shop").expect("second");
        let third = RunningGate::start(&gates, "replay-c", "shop")
            .err()
            .expect("a third of the tenant");
        assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
        // Another tenant is not held up by this one.
        let other = RunningGate::start(&gates, "replay-a", "bank").expect("another tenant, a Job alike");
        drop(other);
        drop(first);
        RunningGate::start(&gates, "replay-a", "shop").expect("the Job's gate ended, so it may run again");
        // The replica's bound holds across tenants.
        let held: Vec<_> = (0..GATES_PER_REPLICA)
            .map_while(|i| RunningGate::start(&gates, &format!("replay-{i}"), &format!("t{i}")).ok())
            .collect();
        assert!(
            gates.lock().expect("lock").len() <= GATES_PER_REPLICA,
            "{}",
            held.len()
        );
    }
}
