//! Holding and spending against quotas in the record store — the ledger every gateway replica
//! shares. Each change reads the ledgers of every quota a call answers to and writes them back
//! in one transaction guarded on what was read, so two replicas never both admit the call that
//! fills a limit: one of them reads again and finds it full.

use contextos_crds::spend_quota::WhenWindowFull;

use super::{
    ActiveQuota, amount_text,
    ledger::{Amounts, Crossing, Full, Ledger},
};
use crate::{
    memory::{
        backend::{Change, Guard, MemoryBackend, Write},
        keys,
    },
    records::{StoreError, TenantId},
};

/// How long a call may hold before its hold is charged in full (its replica is taken to be
/// gone): longer than any model turn or tool call takes.
pub const HOLD_MS: i64 = 15 * 60 * 1000;
/// Times a change is tried when another replica changed a ledger meanwhile.
const ATTEMPTS: u32 = 64;

/// What a call may cost at most, and in which currency its money is.
#[derive(Clone, Debug)]
pub struct Demand<'a> {
    /// The call's key, the same however often it is asked: `<run>/call/<call id>`,
    /// `<run>/turn/<step>`.
    pub call: &'a str,
    pub amounts: Amounts,
    /// What `amounts.nanos` is in; none for a model without a price.
    pub currency: Option<&'a str>,
    /// Whether it is a model turn (which a spend limit needs priced).
    pub model_turn: bool,
}

/// Why a call may not go ahead.
#[derive(Debug, thiserror::Error)]
pub enum QuotaRefusal {
    /// A limit is reached.
    #[error("{}", full_message(quota, full))]
    Full {
        quota: String,
        full: Full,
        /// The quota holds calls until the window allows them (`whenWindowFull: Wait`).
        wait: bool,
    },
    /// The call's cost cannot be counted against a spend limit.
    #[error("SpendQuota {quota} limits spend, and {reason}: the call is refused rather than counted as free")]
    Unpriced { quota: String, reason: String },
    #[error("the SpendQuota ledger could not be used: {0}")]
    Unavailable(String),
}

fn full_message(quota: &str, full: &Full) -> String {
    format!(
        "SpendQuota {quota}: {} in the last {} is {} of its limit {}",
        full.limit.resource.as_str(),
        full.limit.window.as_str(),
        amount_text(full.limit.resource, full.used),
        amount_text(full.limit.resource, full.limit.max)
    )
}

/// A limit of a quota that crossed a threshold (an Event is due).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub quota: String,
    pub crossing: Crossing,
}

/// What `demand` takes from `quota`: its money only if the quota counts money in its currency.
fn share(quota: &ActiveQuota, amounts: &Amounts, currency: Option<&str>) -> Amounts {
    let counts_money = quota.currency.is_some() && quota.currency.as_deref() == currency;
    Amounts {
        nanos: if counts_money { amounts.nanos } else { 0 },
        ..*amounts
    }
}

/// Whether `quota` can count `demand`'s money.
fn priced(quota: &ActiveQuota, demand: &Demand<'_>) -> Result<(), QuotaRefusal> {
    let Some(wanted) = &quota.currency else {
        return Ok(());
    };
    if !demand.model_turn {
        return Ok(());
    }
    let reason = match demand.currency {
        None => "the run's model has no price (add it to a PriceList)".to_owned(),
        Some(c) if c != wanted => format!("counts it in {wanted}, but the run's model is priced in {c}"),
        Some(_) => return Ok(()),
    };
    Err(QuotaRefusal::Unpriced {
        quota: quota.name.clone(),
        reason,
    })
}

/// The ledgers of `quotas` as stored (absent: empty), with what was read, for the guard.
async fn read<B: MemoryBackend>(
    backend: &B,
    tenant: &TenantId,
    quotas: &[&ActiveQuota],
) -> Result<Vec<(Vec<u8>, Option<Vec<u8>>, Ledger)>, StoreError> {
    let keys: Vec<Vec<u8>> = quotas
        .iter()
        .map(|q| keys::quota_ledger(tenant, &q.name, &q.uid))
        .collect();
    let values = backend.memory_get(tenant, keys.clone()).await?;
    keys.into_iter()
        .zip(values)
        .map(|(key, value)| {
            let ledger = match &value {
                Some(bytes) => Ledger::decode(bytes).map_err(|problem| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    problem,
                })?,
                None => Ledger::default(),
            };
            Ok((key, value, ledger))
        })
        .collect()
}

/// Writes `ledgers` back if none changed since `read`; whether they were.
async fn write_back<B: MemoryBackend>(
    backend: &B,
    tenant: &TenantId,
    rows: Vec<(Vec<u8>, Option<Vec<u8>>, Ledger)>,
) -> Result<bool, StoreError> {
    let mut guards = Vec::with_capacity(rows.len());
    let mut changes = Vec::with_capacity(rows.len());
    for (key, read, ledger) in rows {
        guards.push(match read {
            Some(value) => Guard::Holds(key.clone(), value),
            None => Guard::Absent(key.clone()),
        });
        changes.push(Change::Put(key, ledger.encode()));
    }
    let applied = backend
        .memory_write(
            tenant,
            vec![Write {
                guard: Guard::All(guards),
                changes,
            }],
        )
        .await?;
    Ok(applied.first().copied().unwrap_or(false))
}

/// A short pause before reading again after a conflict, growing with the attempt.
async fn back_off(attempt: u32) {
    let mut byte = [0u8; 1];
    let jitter = getrandom::fill(&mut byte).map_or(0, |()| u64::from(byte[0] % 4));
    let millis = u64::from(attempt.min(10)) + jitter;
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
}

/// Admits `demand` against every quota of `quotas` and holds it there — or, if one is full,
/// holds nothing anywhere and says which.
pub async fn hold<B: MemoryBackend>(
    backend: &B,
    tenant: &TenantId,
    quotas: &[&ActiveQuota],
    demand: &Demand<'_>,
    now: i64,
) -> Result<(), QuotaRefusal> {
    if quotas.is_empty() {
        return Ok(());
    }
    quotas.iter().try_for_each(|q| priced(q, demand))?;
    let unavailable = |e: StoreError| QuotaRefusal::Unavailable(e.to_string());
    for attempt in 0..ATTEMPTS {
        let mut rows = read(backend, tenant, quotas).await.map_err(unavailable)?;
        for (quota, (_, _, ledger)) in quotas.iter().zip(rows.iter_mut()) {
            ledger.expire(&quota.limits, now);
            let amounts = share(quota, &demand.amounts, demand.currency);
            if let Err(full) = ledger.admit(&quota.limits, demand.call, &amounts, now) {
                return Err(QuotaRefusal::Full {
                    quota: quota.name.clone(),
                    full,
                    wait: quota.when_full == WhenWindowFull::Wait,
                });
            }
            ledger.hold(demand.call, amounts, now + HOLD_MS);
        }
        if write_back(backend, tenant, rows).await.map_err(unavailable)? {
            return Ok(());
        }
        back_off(attempt).await;
    }
    Err(QuotaRefusal::Unavailable(format!(
        "other calls kept changing the ledger; tried {ATTEMPTS} times"
    )))
}

/// Ends `call`'s holds: what it `cost` (in `currency`) is spent in every quota it held in
/// (nothing: released). Ending a call twice spends once. The thresholds crossed, for Events.
pub async fn settle<B: MemoryBackend>(
    backend: &B,
    tenant: &TenantId,
    quotas: &[&ActiveQuota],
    call: &str,
    cost: &Amounts,
    currency: Option<&str>,
    now: i64,
) -> Result<Vec<Announcement>, StoreError> {
    if quotas.is_empty() {
        return Ok(Vec::new());
    }
    for attempt in 0..ATTEMPTS {
        let mut rows = read(backend, tenant, quotas).await?;
        let mut announced = Vec::new();
        let mut changed = false;
        for (quota, (_, _, ledger)) in quotas.iter().zip(rows.iter_mut()) {
            let windows = quota.windows();
            changed |= ledger.expire(&quota.limits, now);
            changed |= ledger.settle(&windows, call, &share(quota, cost, currency), now);
            announced.extend(
                ledger
                    .crossings(&quota.limits, now)
                    .into_iter()
                    .map(|crossing| Announcement {
                        quota: quota.name.clone(),
                        crossing,
                    }),
            );
        }
        if !changed {
            return Ok(Vec::new());
        }
        if write_back(backend, tenant, rows).await? {
            return Ok(announced);
        }
        back_off(attempt).await;
    }
    Err(StoreError::Backend(format!(
        "settling call {call}: other calls kept changing the SpendQuota ledger; tried {ATTEMPTS} times"
    )))
}

/// What each of `quota`'s limits has used at `now` (spent and held), as the ledger has it.
pub async fn usage<B: MemoryBackend>(
    backend: &B,
    tenant: &TenantId,
    quota: &ActiveQuota,
    now: i64,
) -> Result<Vec<(super::Limit, u64)>, StoreError> {
    let mut rows = read(backend, tenant, &[quota]).await?;
    let Some((_, _, mut ledger)) = rows.pop() else {
        return Ok(Vec::new());
    };
    ledger.expire(&quota.limits, now);
    Ok(quota
        .limits
        .iter()
        .map(|limit| (*limit, ledger.used(limit.window, now).get(limit.resource)))
        .collect())
}

impl QuotaRefusal {
    /// The quota that refused, if one did.
    pub fn quota(&self) -> Option<&str> {
        match self {
            Self::Full { quota, .. } | Self::Unpriced { quota, .. } => Some(quota),
            Self::Unavailable(_) => None,
        }
    }
}
