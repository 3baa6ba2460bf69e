//! A model whose turns someone else charges for: each turn is asked through a [`TurnCharge`],
//! which may refuse it before it is sent and counts what it cost after. The gateway service
//! charges a replay gate's re-executed turns to the tenant's SpendQuotas this way, so asking a
//! tenant's models again to judge a candidate is spend like any other, not a way around it.

use std::{fmt, future::Future, pin::Pin, sync::Arc};

use super::{Model, ModelError, ModelRequest, ModelTurn};

/// A turn being asked and charged.
pub type Charged<'a> = Pin<Box<dyn Future<Output = Result<ModelTurn, ModelError>> + Send + 'a>>;

/// Who charges a model's turns.
pub trait TurnCharge: Send + Sync {
    /// Asks `model` for `request` (the run's `step`-th turn), holding what the turn may cost
    /// before and charging what it cost after; refused, the turn is never sent
    /// ([`ModelError::QuotaExceeded`]).
    fn complete<'a>(&'a self, model: &'a Model, request: &'a ModelRequest, step: u32) -> Charged<'a>;
}

/// A charger, as a model variant holds it.
#[derive(Clone)]
pub struct Charger(pub Arc<dyn TurnCharge>);

impl fmt::Debug for Charger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Charger")
    }
}

impl Model {
    /// This model, its turns charged by `charge`.
    pub fn charged(self, charge: Arc<dyn TurnCharge>) -> Self {
        Self::Charged(Box::new(self), Charger(charge))
    }
}
