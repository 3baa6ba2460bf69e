//! A replica's shares of something every tenant draws on — requests in flight, bytes of request
//! bodies held, trace batches being forwarded — in all and per tenant, taken without waiting
//! and given back when dropped. The replica's last units are kept for tenants holding little,
//! so tenants that hold their whole share cannot shut every other out. (Request slots bound how
//! many requests are handled, body bytes how large they are: 64 requests of one tenant with
//! the largest body each would be 512 MiB, a replica's whole memory limit.)

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Units a replica hands out, in all and per tenant.
#[derive(Debug)]
pub(crate) struct Shares {
    replica: Arc<Semaphore>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Units one tenant may hold.
    per_tenant: u32,
    /// The replica's last units, kept for tenants holding at most `small` units.
    reserved: u32,
    small: u32,
}

/// Units taken, given back when dropped.
#[derive(Debug)]
pub(crate) struct Share {
    _replica: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
}

/// Whose units a request does not fit in now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Exhausted {
    Tenant,
    /// Only the replica's reserve is left, and the tenant would hold more than a small share.
    Reserved,
    Replica,
}

impl Shares {
    /// `replica` units in all and `per_tenant` for each tenant, the replica's last `reserved`
    /// for tenants holding at most `small`.
    pub(crate) fn new(replica: u32, per_tenant: u32, reserved: u32, small: u32) -> Self {
        Self {
            replica: Arc::new(Semaphore::new(replica as usize)),
            tenants: Mutex::new(HashMap::new()),
            per_tenant,
            reserved,
            small,
        }
    }

    /// Takes `needed` units for `tenant`, if both its share and the replica's have them now
    /// (nothing waits: a caller told to try again later holds nothing meanwhile).
    pub(crate) fn take(&self, tenant: &str, needed: u32) -> Result<Share, Exhausted> {
        let semaphore = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
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
        Ok(Share {
            _replica: replica,
            _tenant: tenant,
        })
    }
}

/// `bytes` in KiB, rounded up: how body bytes are counted (a semaphore counts in `u32`).
pub(crate) fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_tenant_holds_its_share_and_the_replica_its_whole() {
        let budget = Shares::new(kib(4 * MIB), kib(2 * MIB), 0, 0);
        let first = budget.take("shop", kib(MIB)).expect("within the tenant's share");
        let second = budget.take("shop", kib(MIB)).expect("the rest of it");
        assert_eq!(budget.take("shop", kib(1)).err(), Some(Exhausted::Tenant));
        // Empty bodies take nothing, whoever sends them.
        assert!(budget.take("shop", kib(0)).is_ok());
        // Another tenant has its own share, up to what the replica has left.
        let other = budget.take("bank", kib(2 * MIB)).expect("another tenant's share");
        assert_eq!(budget.take("ops", kib(1)).err(), Some(Exhausted::Replica));
        // Bytes come back when the request is done.
        drop(first);
        assert!(budget.take("shop", kib(MIB)).is_ok());
        drop((second, other));
        assert!(budget.take("ops", kib(2 * MIB)).is_ok());
    }

    #[test]
    fn tenants_holding_their_whole_share_leave_the_reserve_to_small_bodies() {
        // 8 MiB in all, 4 per tenant, the last 2 for tenants holding at most 256 KiB.
        let budget = Shares::new(kib(8 * MIB), kib(4 * MIB), kib(2 * MIB), kib(MIB / 4));
        let first = budget.take("a", kib(4 * MIB)).expect("a's share");
        let second = budget.take("b", kib(2 * MIB)).expect("down to the reserve");
        // b would hold more than a small share out of the reserve; c's small body fits.
        assert_eq!(budget.take("b", kib(MIB)).err(), Some(Exhausted::Reserved));
        let small = budget.take("c", kib(MIB / 4)).expect("a small body");
        assert_eq!(
            budget.take("c", kib(MIB / 4)).err(),
            Some(Exhausted::Reserved),
            "c's small share is taken"
        );
        assert!(budget.take("d", kib(MIB / 4)).is_ok(), "another small one");
        drop((first, second, small));
        assert!(
            budget.take("b", kib(4 * MIB)).is_ok(),
            "the reserve is only for what is left"
        );
    }
}
