//! Holding and spending against quotas in the record store — the ledger every gateway replica
//! shares. Each change reads the ledgers of every quota a call answers to and writes them back
//! in one transaction guarded on what was read, so two replicas never both admit the call that
//! fills a limit: one of them reads again and finds it full.

use contextos_crds::spend_quota::WhenWindowFull;

pub use crate::memory::backend::Durability;

use super::{
    ActiveQuota, amount_text,
    ledger::{Amounts, Crossing, Full, Ledger},
};
use crate::{
    memory::{backend::MemoryBackend, keys},
    records::{StoreError, TenantId},
};

/// How long a tool call may hold before its hold is charged in full (its replica is taken to
/// be gone). A tool call holds exactly what it costs, so a hold that ends before a slow call
/// (retried at its longest timeout) settles charges the same.
pub const HOLD_MS: i64 = 15 * 60 * 1000;

/// How long a model turn may hold: longer than a routed turn can take — the chosen model and
/// every fallback (at most [`contextos_crds::model_routing::MAX_FALLBACKS`]) each given
/// [`crate::model::MODEL_TIMEOUT`] — so the turn's settlement finds its hold, whatever the
/// models cut off cost beside the answer (a hold charged in full when its time is up is all
/// that is ever charged of it).
pub const TURN_HOLD_MS: i64 = 30 * 60 * 1000;

const _: () = assert!(
    (TURN_HOLD_MS as u128)
        > (1 + contextos_crds::model_routing::MAX_FALLBACKS as u128)
            * crate::model::MODEL_TIMEOUT.as_millis()
);

/// What a call may cost at most, and in which currency its money is.
#[derive(Clone, Debug)]
pub struct Demand<'a> {
    /// The call's key, the same however often it is asked (`<run>/call/<call id>`); a model
    /// turn, which spends each time it is asked, has one per request.
    pub call: &'a str,
    /// The request carrying it (a runner may send one call to two replicas at once).
    pub owner: &'a str,
    pub amounts: Amounts,
    /// What `amounts.nanos` is in; none for a model or tool without a price.
    pub currency: Option<&'a str>,
    /// Whether it is a model turn: its amounts are the most it may cost (and a spend limit
    /// needs it priced). Otherwise (a tool call) they are what it costs, and must fit whole.
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

/// Whether `quota` limits something `amounts` holds.
fn counts(quota: &ActiveQuota, amounts: &Amounts) -> bool {
    quota.limits.iter().any(|l| amounts.get(l.resource) > 0)
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
    let what = if demand.model_turn {
        "the run's model"
    } else {
        "the tool"
    };
    let reason = match demand.currency {
        // A tool no PriceList prices costs nothing in money (its calls count as calls).
        None if !demand.model_turn => return Ok(()),
        None => "the run's model has no price (add it to a PriceList)".to_owned(),
        Some(c) if c != wanted => format!("counts it in {wanted}, but {what} is priced in {c}"),
        Some(_) => return Ok(()),
    };
    Err(QuotaRefusal::Unpriced {
        quota: quota.name.clone(),
        reason,
    })
}

/// The ledger rows of `quotas`.
fn ledger_keys(tenant: &TenantId, quotas: &[&ActiveQuota]) -> Vec<Vec<u8>> {
    quotas
        .iter()
        .map(|q| keys::quota_ledger(tenant, &q.name, &q.uid))
        .collect()
}

/// The ledgers stored under `keys` (absent: empty).
fn decode_all(keys: &[Vec<u8>], values: &[Option<Vec<u8>>]) -> Result<Vec<Ledger>, StoreError> {
    keys.iter()
        .zip(values)
        .map(|(key, value)| match value {
            Some(bytes) => Ledger::decode(bytes).map_err(|problem| StoreError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                problem,
            }),
            None => Ok(Ledger::default()),
        })
        .collect()
}

/// Whether every quota of `quotas` that limits money can count a model turn answered by any
/// model priced in one of `currencies` (a routed Agent's models may be priced apart): a turn
/// answered in another currency would be charged nothing against the limit.
pub fn one_currency(
    quotas: &[&ActiveQuota],
    currencies: &std::collections::BTreeSet<&str>,
) -> Result<(), QuotaRefusal> {
    for quota in quotas {
        let Some(wanted) = quota.currency.as_deref() else {
            continue;
        };
        let others: Vec<&str> = currencies.iter().copied().filter(|c| *c != wanted).collect();
        if !others.is_empty() {
            return Err(QuotaRefusal::Unpriced {
                quota: quota.name.clone(),
                reason: format!(
                    "counts it in {wanted}, but the Agent's models (spec.model and spec.routing) are priced in {} too: route only to models priced in {wanted}",
                    others.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// Admits `demand` against every quota of `quotas` and holds it there — or, if one is full,
/// holds nothing anywhere and says which. One change of every ledger involved: two replicas
/// never both admit the call that fills a limit.
pub async fn hold<B: MemoryBackend>(
    backend: &B,
    tenant: &TenantId,
    quotas: &[&ActiveQuota],
    demand: &Demand<'_>,
    durability: Durability,
    now: i64,
) -> Result<(), QuotaRefusal> {
    // Only the quotas limiting something the call takes hold it (a tool call holds nothing in
    // a quota of tokens and money): no row grows with calls it does not count.
    let quotas: Vec<&ActiveQuota> = quotas
        .iter()
        .copied()
        .filter(|q| counts(q, &demand.amounts) || (demand.model_turn && q.currency.is_some()))
        .collect();
    if quotas.is_empty() {
        return Ok(());
    }
    let quotas = quotas.as_slice();
    quotas.iter().try_for_each(|q| priced(q, demand))?;
    let keys = ledger_keys(tenant, quotas);
    let owned: Vec<ActiveQuota> = quotas.iter().map(|q| (*q).clone()).collect();
    let (call, owner, amounts, currency, exact) = (
        demand.call.to_owned(),
        demand.owner.to_owned(),
        demand.amounts,
        demand.currency.map(str::to_owned),
        !demand.model_turn,
    );
    let rows = keys.clone();
    backend
        .memory_update(tenant, keys, durability, move |values| {
            let mut ledgers = match decode_all(&rows, values) {
                Ok(ledgers) => ledgers,
                Err(e) => return (Vec::new(), Err(QuotaRefusal::Unavailable(e.to_string()))),
            };
            // Every full quota is found: one that refuses outranks one that waits.
            let mut refused: Option<QuotaRefusal> = None;
            for (quota, ledger) in owned.iter().zip(ledgers.iter_mut()) {
                ledger.expire(&quota.limits, now);
                let share = share(quota, &amounts, currency.as_deref());
                if !ledger.has_room_for(&call) {
                    let crowded = QuotaRefusal::Unavailable(format!(
                        "SpendQuota {} holds {} calls in flight, as many as it keeps; try again when some end",
                        quota.name,
                        super::ledger::MAX_HOLDS
                    ));
                    return (Vec::new(), Err(crowded));
                }
                if let Err(full) = ledger.admit(&quota.limits, &call, &share, exact, now) {
                    // A call no window will ever have room for is refused, not held for ever;
                    // one that only calls in flight stand in the way of waits for them, whatever
                    // the quota says of a full window (they may spend less than they hold).
                    let wait = !full.never_fits && (quota.when_full == WhenWindowFull::Wait || full.held_back);
                    let outranks = refused
                        .as_ref()
                        .is_none_or(|r| matches!(r, QuotaRefusal::Full { wait: true, .. }) && !wait);
                    if outranks {
                        refused = Some(QuotaRefusal::Full {
                            quota: quota.name.clone(),
                            full,
                            wait,
                        });
                    }
                    continue;
                }
                ledger.hold(&call, &owner, share, now + if exact { HOLD_MS } else { TURN_HOLD_MS });
            }
            if let Some(refused) = refused {
                return (Vec::new(), Err(refused));
            }
            let puts = rows
                .iter()
                .cloned()
                .zip(ledgers.iter().map(Ledger::encode))
                .collect();
            (puts, Ok(()))
        })
        .await
        .map_err(|e| QuotaRefusal::Unavailable(e.to_string()))?
}

/// Ends request `owner`'s part in `call`'s holds: what it `cost` (in `currency`) is spent in
/// every quota it held in (nothing: released, see [`Ledger::settle`]). Ending a call twice
/// spends once. The thresholds crossed, for Events.
///
/// Durable with the store's next flush: lost to a crash before it, the hold it ends stays and is
/// charged in full when its time is up — spend is over-counted then, never lost.
#[allow(clippy::too_many_arguments)]
pub async fn settle<B: MemoryBackend>(
    backend: &B,
    tenant: &TenantId,
    quotas: &[&ActiveQuota],
    call: &str,
    owner: &str,
    cost: &Amounts,
    currency: Option<&str>,
    now: i64,
) -> Result<Vec<Announcement>, StoreError> {
    if quotas.is_empty() {
        return Ok(Vec::new());
    }
    let keys = ledger_keys(tenant, quotas);
    let owned: Vec<ActiveQuota> = quotas.iter().map(|q| (*q).clone()).collect();
    let (call, owner, cost, currency) = (
        call.to_owned(),
        owner.to_owned(),
        *cost,
        currency.map(str::to_owned),
    );
    let rows = keys.clone();
    backend
        .memory_update(tenant, keys, Durability::WithNextRecord, move |values| {
            let mut ledgers = match decode_all(&rows, values) {
                Ok(ledgers) => ledgers,
                Err(e) => return (Vec::new(), Err(e)),
            };
            let mut announced = Vec::new();
            let mut changed = false;
            for (quota, ledger) in owned.iter().zip(ledgers.iter_mut()) {
                let before = ledger.clone();
                ledger.expire(&quota.limits, now);
                let share = share(quota, &cost, currency.as_deref());
                ledger.settle(&quota.windows(), &call, &owner, &share, now);
                announced.extend(ledger.crossings(&quota.limits, now).into_iter().map(|crossing| {
                    Announcement {
                        quota: quota.name.clone(),
                        crossing,
                    }
                }));
                // Thresholds announced or forgotten are kept too.
                changed |= *ledger != before;
            }
            if !changed {
                return (Vec::new(), Ok(Vec::new()));
            }
            let puts = rows
                .iter()
                .cloned()
                .zip(ledgers.iter().map(Ledger::encode))
                .collect();
            (puts, Ok(announced))
        })
        .await?
}

/// What each of `quota`'s limits has used at `now` (spent and held), as the ledger has it.
pub async fn usage<B: MemoryBackend>(
    backend: &B,
    tenant: &TenantId,
    quota: &ActiveQuota,
    now: i64,
) -> Result<Vec<(super::Limit, u64)>, StoreError> {
    let keys = ledger_keys(tenant, &[quota]);
    let values = backend.memory_get(tenant, keys.clone()).await?;
    let Some(mut ledger) = decode_all(&keys, &values)?.pop() else {
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

#[cfg(test)]
mod tests {
    use contextos_crds::{SpendQuota, SpendQuotaSpec};

    use super::*;

    fn quota(yaml: &str) -> ActiveQuota {
        let spec: SpendQuotaSpec = serde_yaml::from_str(yaml).expect("spec");
        let mut object = SpendQuota::new("tenant", spec);
        object.metadata.uid = Some("u-1".into());
        ActiveQuota::compile(&object).expect("quota")
    }

    #[test]
    fn a_money_limit_refuses_an_agent_whose_models_are_priced_in_another_currency_too() {
        let usd = quota("limits:\n- window: hour\n  spend: {amount: \"5\", currency: USD}\n");
        let calls = quota("limits:\n- window: hour\n  toolCalls: 7\n");
        let one = ["USD"].into();
        assert!(one_currency(&[&usd, &calls], &one).is_ok());
        // Routed to a model priced in EUR beside the USD one: a turn it answers would count
        // nothing against the USD limit.
        let mixed = ["EUR", "USD"].into();
        let refused = one_currency(&[&usd], &mixed).expect_err("refused");
        assert!(
            matches!(&refused, QuotaRefusal::Unpriced { quota, .. } if quota == "tenant"),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("priced in EUR too"), "{refused}");
        // A quota of calls or tokens only counts no money: any currency will do.
        assert!(one_currency(&[&calls], &mixed).is_ok());
    }
}
