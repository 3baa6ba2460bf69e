//! How many bytes of request bodies a replica holds at once: in all, and for each tenant. The
//! slots of `MAX_IN_FLIGHT` bound how many requests are handled, not how large they are: 64
//! requests of one tenant with the largest body each would be 512 MiB, a replica's whole memory
//! limit, and one crashed replica drops every tenant's calls in flight. A request's body is
//! accounted before it is read — by the length it declares, or the most a body may be when it
//! declares none — and the bytes stay taken until the request has been handled. The last bytes
//! of a replica's budget are kept for tenants holding little: tenants that hold their whole
//! share cannot shut every other out.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bodies are counted in units of this many bytes (a semaphore counts in `u32`).
const UNIT: usize = 1024;

/// Bytes of request bodies a replica holds at once, in all and per tenant.
pub(super) struct BodyBudget {
    replica: Arc<Semaphore>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Units one tenant may hold.
    per_tenant: u32,
    /// The replica's last units, kept for tenants holding at most `small` units.
    reserved: u32,
    small: u32,
}

/// Bytes of a body taken from the budget, given back when dropped.
#[derive(Debug)]
pub(super) struct BodyBytes {
    _replica: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
}

/// Whose budget a body does not fit in now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Exhausted {
    Tenant,
    /// Only the replica's reserve is left, and the tenant holds more than a small share.
    Reserved,
    Replica,
}

impl BodyBudget {
    /// A budget of `replica_bytes` in all and `tenant_bytes` for each tenant, the replica's last
    /// `reserved_bytes` for tenants holding at most `small_bytes`.
    pub(super) fn new(
        replica_bytes: usize,
        tenant_bytes: usize,
        reserved_bytes: usize,
        small_bytes: usize,
    ) -> Self {
        Self {
            replica: Arc::new(Semaphore::new(units(replica_bytes) as usize)),
            tenants: Mutex::new(HashMap::new()),
            per_tenant: units(tenant_bytes),
            reserved: units(reserved_bytes),
            small: units(small_bytes),
        }
    }

    /// Takes `bytes` for a body of `tenant`'s, if both its budget and the replica's have them
    /// now (nothing waits: a caller told to try again later holds nothing meanwhile).
    pub(super) fn take(&self, tenant: &str, bytes: usize) -> Result<BodyBytes, Exhausted> {
        let needed = units(bytes);
        let semaphore = {
            let mut tenants = self.tenants.lock().map_err(|_| Exhausted::Replica)?;
            // Tenants holding nothing are forgotten now and then.
            if tenants.len() > 4096 {
                let whole = self.per_tenant as usize;
                tenants.retain(|_, s| s.available_permits() < whole);
            }
            tenants
                .entry(tenant.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant as usize)))
                .clone()
        };
        let tenant = semaphore
            .clone()
            .try_acquire_many_owned(needed)
            .map_err(|_| Exhausted::Tenant)?;
        let held = self.per_tenant as usize - semaphore.available_permits();
        let left = self.replica.available_permits().saturating_sub(needed as usize);
        if needed > 0 && left < self.reserved as usize && held > self.small as usize {
            return Err(Exhausted::Reserved);
        }
        let replica = self
            .replica
            .clone()
            .try_acquire_many_owned(needed)
            .map_err(|_| Exhausted::Replica)?;
        Ok(BodyBytes {
            _replica: replica,
            _tenant: tenant,
        })
    }
}

/// `bytes` in units, rounded up.
fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_tenant_holds_its_share_and_the_replica_its_whole() {
        let budget = BodyBudget::new(4 * MIB, 2 * MIB, 0, 0);
        let first = budget.take("shop", MIB).expect("within the tenant's share");
        let second = budget.take("shop", MIB).expect("the rest of it");
        assert_eq!(budget.take("shop", 1).err(), Some(Exhausted::Tenant));
        // Empty bodies take nothing, whoever sends them.
        assert!(budget.take("shop", 0).is_ok());
        // Another tenant has its own share, up to what the replica has left.
        let other = budget.take("bank", 2 * MIB).expect("another tenant's share");
        assert_eq!(budget.take("ops", 1).err(), Some(Exhausted::Replica));
        // Bytes come back when the request is done.
        drop(first);
        assert!(budget.take("shop", MIB).is_ok());
        drop((second, other));
        assert!(budget.take("ops", 2 * MIB).is_ok());
    }

    #[test]
    fn tenants_holding_their_whole_share_leave_the_reserve_to_small_bodies() {
        // 8 MiB in all, 4 per tenant, the last 2 for tenants holding at most 256 KiB.
        let budget = BodyBudget::new(8 * MIB, 4 * MIB, 2 * MIB, MIB / 4);
        let first = budget.take("a", 4 * MIB).expect("a's share");
        let second = budget.take("b", 2 * MIB).expect("down to the reserve");
        // b would hold more than a small share out of the reserve; c's small body fits.
        assert_eq!(budget.take("b", MIB).err(), Some(Exhausted::Reserved));
        let small = budget.take("c", MIB / 4).expect("a small body");
        assert_eq!(
            budget.take("c", MIB / 4).err(),
            Some(Exhausted::Reserved),
            "c's small share is taken"
        );
        assert!(budget.take("d", MIB / 4).is_ok(), "another small one");
        drop((first, second, small));
        assert!(
            budget.take("b", 4 * MIB).is_ok(),
            "the reserve is only for what is left"
        );
    }
}
