//! SpendQuotas at the gateway service: which quotas a run answers to (read from its namespace,
//! kept a few seconds), holding and spending a call against them in the shared ledger, and
//! reporting usage and crossed thresholds back to the quota objects (status and Events),
//! at most every few seconds per quota.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::StatusCode;

use super::{Caller, GatewayService, Refusal, RunSlot, unavailable};
use crate::{
    gateway::tenancy::{QUOTA_NEARLY_REACHED, QUOTA_REACHED, QuotaReport, QuotaSummary, TenantView},
    memory::backend::MemoryBackend,
    quota::{
        ActiveQuota, Amounts, Resource, amount_text, applying,
        book::{self, Announcement, Demand, QuotaRefusal},
        ledger::percent,
    },
    records::{RecordStore, TenantId, recorder::now_ms},
};

/// How long a namespace's quotas are used as read: a changed quota applies within this.
const FRESH_FOR: Duration = Duration::from_secs(2);
/// How long quotas last read are used while the API server cannot be asked.
const USABLE_FOR: Duration = Duration::from_secs(60);
/// A quota's status is written at most this often by one replica.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Namespaces whose quotas are kept at most.
const MAX_CACHED: usize = 4096;

/// The refusal code of a call a quota refuses for good: the gateway has ended the run
/// `QuotaExceeded` on record. (Not the store's `quota_exceeded`, which is about the bytes a run
/// writes and ends it `StoreQuotaExceeded`.)
pub const QUOTA_EXCEEDED_CODE: &str = "spend_quota_exceeded";
/// The refusal code of a call a quota holds (`whenWindowFull: Wait`): the runner asks again
/// later.
pub const QUOTA_WAIT_CODE: &str = "quota_wait";

/// A namespace's quotas as last read, or why one of them cannot be enforced.
#[derive(Clone)]
struct Read {
    at: Instant,
    quotas: Result<Arc<[ActiveQuota]>, String>,
}

/// What this replica knows of quotas: as read, and what is due to be reported.
#[derive(Default)]
pub(super) struct QuotaDesk {
    read: Mutex<HashMap<String, Read>>,
    reports: Mutex<Reports>,
}

#[derive(Default)]
struct Reports {
    /// Quotas whose report is scheduled, by (namespace, quota).
    pending: std::collections::HashSet<(String, String)>,
    /// When each quota was last reported.
    last: HashMap<(String, String), Instant>,
    /// Events due, by quota.
    events: HashMap<(String, String), Vec<(String, String)>>,
}

/// A fresh name for one request's part in a hold (see [`crate::quota::ledger::Ledger::hold`]).
pub(super) fn request_owner() -> String {
    let mut bytes = [0u8; 8];
    // Without randomness every request is one owner: a release then waits for the hold's time.
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

/// The quotas a run answers to, for one call.
#[derive(Clone, Debug, Default)]
pub struct RunQuotas {
    pub quotas: Vec<ActiveQuota>,
}

impl RunQuotas {
    pub(super) fn all(&self) -> Vec<&ActiveQuota> {
        self.quotas.iter().collect()
    }
}

/// How a quota's refusal is answered: held calls are asked again, refused ones end the run.
pub(super) fn refusal(refused: QuotaRefusal) -> Refusal {
    match &refused {
        QuotaRefusal::Full { wait: true, full, .. } => Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            QUOTA_WAIT_CODE,
            format!("{refused}; the call waits until the window allows it"),
        )
        .retry_after(std::time::Duration::from_millis(
            u64::try_from(full.retry_after_ms).unwrap_or(1_000),
        )),
        QuotaRefusal::Full { .. } | QuotaRefusal::Unpriced { .. } => Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            QUOTA_EXCEEDED_CODE,
            refused.to_string(),
        ),
        QuotaRefusal::Unavailable(_) => unavailable(refused),
    }
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Send + Sync + 'static,
    T: TenantView + 'static,
{
    /// The quotas `slot`'s run answers to now.
    pub(super) async fn run_quotas(&self, caller: &Caller, slot: &RunSlot) -> Result<RunQuotas, Refusal> {
        self.quotas_of_bundle(&caller.tenant, &slot.bundle).await
    }

    async fn namespace_quotas(&self, namespace: &str) -> Result<Arc<[ActiveQuota]>, Refusal> {
        let known = self
            .quota_desk
            .read
            .lock()
            .ok()
            .and_then(|read| read.get(namespace).cloned());
        if let Some(known) = &known
            && known.at.elapsed() < FRESH_FOR
        {
            return known.quotas.clone().map_err(quota_broken);
        }
        let quotas = match self.tenants.spend_quotas(namespace).await {
            Ok(objects) => objects
                .iter()
                .map(|q| {
                    ActiveQuota::compile(q).map_err(|e| {
                        format!(
                            "SpendQuota {namespace}/{} cannot be enforced: {e}",
                            kube::ResourceExt::name_any(q)
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Arc::from),
            Err(error) => {
                // The API server is away: what was read a little while ago still holds.
                return match known {
                    Some(known) if known.at.elapsed() < USABLE_FOR => known.quotas.map_err(quota_broken),
                    _ => Err(unavailable(format!(
                        "the tenant's SpendQuotas cannot be read, and calls are not made unchecked: {error}"
                    ))),
                };
            }
        };
        if let Ok(mut read) = self.quota_desk.read.lock() {
            if read.len() >= MAX_CACHED {
                read.clear();
            }
            read.insert(
                namespace.to_owned(),
                Read {
                    at: Instant::now(),
                    quotas: quotas.clone(),
                },
            );
        }
        quotas.map_err(quota_broken)
    }
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Send + Sync + 'static,
    T: TenantView + 'static,
{
    /// The quotas of `tenant` a run of `bundle` answers to now (a replay gate re-executing the
    /// run answers to the same ones).
    pub(super) async fn quotas_of_bundle(
        &self,
        tenant: &TenantId,
        bundle: &crate::run::bundle::RunBundle,
    ) -> Result<RunQuotas, Refusal> {
        let quotas = self.namespace_quotas(tenant.as_str()).await?;
        Ok(RunQuotas {
            quotas: applying(&quotas, &bundle.agent_labels, &bundle.session_labels)
                .into_iter()
                .cloned()
                .collect(),
        })
    }
}

/// A replay gate's re-executed model turns, charged like a run's: each holds what it may cost
/// in the quotas the recorded run answers to before it is sent (priced at the run's pinned
/// price), and is charged what it cost after. A quota that refuses stops the gate, which then
/// fails saying so.
pub(super) struct GateCharge<S, A, T> {
    pub service: Arc<GatewayService<S, A, T>>,
    pub tenant: TenantId,
    pub quotas: RunQuotas,
    /// The recorded run's model price (re-execution asks only the recorded model).
    pub price: Option<crate::pricing::PinnedPrice>,
    /// The output limit a turn is asked with (and holds) when its request names none: the
    /// model's own, or the recorded run's token budget.
    pub output_bound: u32,
}

impl<S, A, T> crate::model::charged::TurnCharge for GateCharge<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Send + Sync + 'static,
    T: TenantView + 'static,
{
    fn complete<'a>(
        &'a self,
        model: &'a crate::model::Model,
        request: &'a crate::model::ModelRequest,
        step: u32,
    ) -> crate::model::charged::Charged<'a> {
        Box::pin(async move {
            let owner = request_owner();
            let key = format!("gate/{}", owner);
            // Every turn is asked with an output limit, so what it holds bounds what it spends.
            let bounded;
            let request = match request.max_output_tokens {
                Some(_) => request,
                None => {
                    bounded = crate::model::ModelRequest {
                        max_output_tokens: Some(self.output_bound),
                        ..request.clone()
                    };
                    &bounded
                }
            };
            let most_in = crate::model::most_prompt_tokens(request);
            let most_out = u64::from(request.max_output_tokens.unwrap_or(self.output_bound));
            let price = self.price.as_ref();
            let demand = Demand {
                call: &key,
                owner: &owner,
                amounts: Amounts {
                    tokens: most_in.saturating_add(most_out),
                    nanos: price.map_or(0, |p| p.cost(most_in, 0, most_out).nanos.0),
                    calls: 0,
                },
                currency: price.map(|p| p.currency.as_str()),
                model_turn: true,
            };
            self.service
                .hold_in_quotas(&self.tenant, &self.quotas, &demand, book::Durability::Now)
                .await
                .map_err(|refused| crate::model::ModelError::QuotaExceeded {
                    detail: refused.to_string(),
                })?;
            let asked = Box::pin(model.complete(request, step)).await;
            let spent = match &asked {
                Ok(turn) => {
                    let cost = price.map(|p| {
                        p.cost(
                            turn.prompt_tokens,
                            turn.cached_prompt_tokens,
                            turn.completion_tokens,
                        )
                    });
                    if let Some(cost) = &cost {
                        self.service.spend.record_gate_spend(self.tenant.as_str(), cost);
                    }
                    Amounts {
                        tokens: turn.prompt_tokens.saturating_add(turn.completion_tokens),
                        nanos: cost.map_or(0, |c| c.nanos.0),
                        calls: 0,
                    }
                }
                // Cut off or unreadable, it may have cost what it could: the hold is spent.
                Err(e) if e.may_have_cost() => demand.amounts,
                Err(_) => Amounts::default(),
            };
            self.service
                .settle_in_quotas(
                    &self.tenant,
                    &self.quotas,
                    (&key, &owner),
                    &spent,
                    demand.currency,
                )
                .await;
            asked
        })
    }
}

/// A quota that cannot be enforced refuses the calls it would count (never lets them through).
fn quota_broken(why: String) -> Refusal {
    Refusal::new(StatusCode::TOO_MANY_REQUESTS, QUOTA_EXCEEDED_CODE, why)
}

impl<S, A, T> GatewayService<S, A, T>
where
    S: RecordStore + MemoryBackend + 'static,
    A: Send + Sync + 'static,
    T: TenantView + 'static,
{
    /// Holds what call `key` may cost in every quota of `quotas`.
    pub(super) async fn hold_in_quotas(
        &self,
        tenant: &TenantId,
        quotas: &RunQuotas,
        demand: &Demand<'_>,
        durability: book::Durability,
    ) -> Result<(), QuotaRefusal> {
        book::hold(&self.store, tenant, &quotas.all(), demand, durability, now_ms()).await
    }

    /// Ends request `owner`'s part in call `key`'s holds with what it `cost`, and schedules the
    /// quotas' reports.
    pub(super) async fn settle_in_quotas(
        self: &Arc<Self>,
        tenant: &TenantId,
        quotas: &RunQuotas,
        (key, owner): (&str, &str),
        cost: &Amounts,
        currency: Option<&str>,
    ) {
        if quotas.quotas.is_empty() {
            return;
        }
        let settled = book::settle(
            &self.store,
            tenant,
            &quotas.all(),
            key,
            owner,
            cost,
            currency,
            now_ms(),
        )
        .await;
        match settled {
            Ok(announced) => self.schedule_reports(tenant, quotas, announced),
            // The hold stays; when its time is up it is charged in full (never lost).
            Err(error) => {
                tracing::warn!(%tenant, call = key, %error, "a call's quota holds could not be settled; they are charged in full when they expire")
            }
        }
    }

    /// Reports `quotas`' usage (and `announced` thresholds) soon: at most every
    /// [`REPORT_EVERY`] per quota, the last change always reported.
    fn schedule_reports(
        self: &Arc<Self>,
        tenant: &TenantId,
        quotas: &RunQuotas,
        announced: Vec<Announcement>,
    ) {
        let Ok(mut reports) = self.quota_desk.reports.lock() else {
            return;
        };
        for Announcement { quota, crossing } in announced {
            let reason = if crossing.percent >= 100 {
                QUOTA_REACHED
            } else {
                QUOTA_NEARLY_REACHED
            };
            let message = format!(
                "{} in the last {} reached {} % of the limit: {} of {}",
                crossing.limit.resource.as_str(),
                crossing.limit.window.as_str(),
                crossing.percent,
                amount_text(crossing.limit.resource, crossing.used),
                amount_text(crossing.limit.resource, crossing.limit.max)
            );
            reports
                .events
                .entry((tenant.as_str().to_owned(), quota))
                .or_default()
                .push((reason.to_owned(), message));
        }
        for quota in &quotas.quotas {
            let key = (tenant.as_str().to_owned(), quota.name.clone());
            if !reports.pending.insert(key.clone()) {
                continue;
            }
            let wait = reports
                .last
                .get(&key)
                .map_or(Duration::ZERO, |last| REPORT_EVERY.saturating_sub(last.elapsed()));
            let service = self.clone();
            let (tenant, quota) = (tenant.clone(), quota.clone());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                service.report(&tenant, &quota).await;
            });
        }
    }

    async fn report(&self, tenant: &TenantId, quota: &ActiveQuota) {
        let key = (tenant.as_str().to_owned(), quota.name.clone());
        let events = match self.quota_desk.reports.lock() {
            Ok(mut reports) => {
                reports.pending.remove(&key);
                if reports.last.len() >= MAX_CACHED {
                    reports.last.clear();
                }
                reports.last.insert(key.clone(), Instant::now());
                reports.events.remove(&key).unwrap_or_default()
            }
            Err(_) => return,
        };
        let usage = match book::usage(&self.store, tenant, quota, now_ms()).await {
            Ok(usage) => usage,
            Err(error) => {
                tracing::warn!(%tenant, quota = quota.name, %error, "cannot read a SpendQuota's ledger to report it");
                return;
            }
        };
        let report = quota_report(quota, &usage, events);
        if let Err(error) = self
            .tenants
            .report_quota(tenant.as_str(), &quota.name, report)
            .await
        {
            tracing::warn!(%tenant, quota = quota.name, %error, "cannot report a SpendQuota's usage");
        }
    }
}

/// The status the gateway writes for `quota` with `usage` of each limit.
fn quota_report(
    quota: &ActiveQuota,
    usage: &[(crate::quota::Limit, u64)],
    events: Vec<(String, String)>,
) -> QuotaReport {
    let currency = match &quota.currency {
        Some(currency) => format!(" {currency}"),
        None => String::new(),
    };
    let usage_rows = usage
        .iter()
        .map(|(limit, used)| contextos_crds::spend_quota::LimitUsage {
            window: limit.window,
            resource: limit.resource.as_str().to_owned(),
            used: amount_text(limit.resource, *used),
            limit: amount_text(limit.resource, limit.max),
            percent: percent(*used, limit.max),
        })
        .collect();
    // The column shows, per resource, the limit nearest to full.
    let column = |resource: Resource| {
        usage
            .iter()
            .filter(|(l, _)| l.resource == resource)
            .max_by_key(|(l, used)| percent(*used, l.max))
            .map(|(l, used)| {
                format!(
                    "{}/{}{} ({})",
                    amount_text(resource, *used),
                    amount_text(resource, l.max),
                    if resource == Resource::Spend {
                        currency.as_str()
                    } else {
                        ""
                    },
                    l.window.as_str()
                )
            })
    };
    QuotaReport {
        usage: usage_rows,
        summary: QuotaSummary {
            spend: column(Resource::Spend),
            tokens: column(Resource::Tokens),
            tool_calls: column(Resource::ToolCalls),
        },
        measured_at: jiff::Timestamp::now().to_string(),
        events,
    }
}
