//! A limit on model spend shared by several runs (a replay gate's re-execution): a turn is
//! refused once the limit is spent, a turn's output is capped to what is left, and a model
//! that reports no usage is charged an estimate — so a gate's `maxTokens` holds turn by turn,
//! whatever the model says, not only between runs.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use super::{Model, ModelError, ModelRequest, ModelTurn, estimated_tokens};

/// Tokens spent so far, and the most that may be.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    spent: Arc<AtomicU64>,
    /// A turn was refused: what is left would not cover its prompt, or a SpendQuota said no.
    refused: Arc<AtomicBool>,
    /// Why a SpendQuota refused a turn, if one did.
    quota: Arc<Mutex<Option<String>>>,
    limit: Option<u64>,
}

impl Meter {
    pub fn new(limit: Option<u64>) -> Self {
        Self {
            spent: Arc::default(),
            refused: Arc::default(),
            quota: Arc::default(),
            limit,
        }
    }

    /// Why a SpendQuota refused a turn, once one has: no more turns are asked for.
    pub fn refused_by_quota(&self) -> Option<String> {
        self.quota.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn spent(&self) -> u64 {
        self.spent.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether the limit is spent, or a turn was refused for what is left.
    pub fn exhausted(&self) -> bool {
        self.refused.load(Ordering::Relaxed) || self.limit.is_some_and(|limit| self.spent() >= limit)
    }

    /// `model`, counted against this meter.
    pub fn metering(&self, model: Model) -> Model {
        Model::Metered(Box::new(model), self.clone())
    }

    pub(super) async fn complete(
        &self,
        model: &Model,
        request: &ModelRequest,
        step: u32,
    ) -> Result<ModelTurn, ModelError> {
        let mut request = request.clone();
        if let Some(limit) = self.limit {
            let prompt = estimated_tokens(&request);
            let spent = self.spent();
            if spent.saturating_add(prompt) >= limit {
                self.refused.store(true, Ordering::Relaxed);
                return Err(ModelError::SpendLimit { spent, limit });
            }
            let left = u32::try_from(limit - spent - prompt).unwrap_or(u32::MAX);
            request.max_output_tokens = Some(request.max_output_tokens.unwrap_or(left).min(left));
        }
        // Charged as the model reports it, or an estimate when it reports nothing.
        let turn = match Box::pin(model.complete(&request, step)).await {
            Ok(turn) => turn,
            Err(ModelError::QuotaExceeded { detail }) => {
                // The tenant's quota is spent: every run after this one would be refused too.
                *self.quota.lock().unwrap_or_else(|e| e.into_inner()) = Some(detail.clone());
                self.refused.store(true, Ordering::Relaxed);
                return Err(ModelError::QuotaExceeded { detail });
            }
            Err(e) => return Err(e),
        };
        self.spent.fetch_add(
            turn.prompt_tokens.saturating_add(turn.completion_tokens),
            Ordering::Relaxed,
        );
        Ok(turn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Message, Role, scripted::ScriptedModel};

    fn request() -> ModelRequest {
        ModelRequest {
            model: "m".into(),
            messages: vec![
                Message::new(Role::System, "x".repeat(400)),
                Message::new(Role::User, "go"),
            ],
            tools: vec![],
            max_output_tokens: None,
        }
    }

    #[tokio::test]
    async fn turns_are_counted_and_refused_once_the_shared_limit_is_spent() {
        // The scripted model reports ≈ 4 bytes a token: each turn costs ≈ 100 + 1.
        let script = r#"{"turns": [{"content": "a"}, {"content": "b"}, {"content": "c"}]}"#;
        let model = Model::Scripted(ScriptedModel::parse("s", script).expect("script"));
        let meter = Meter::new(Some(250));
        let metered = meter.metering(model);
        metered.complete(&request(), 1).await.expect("first turn");
        let first = meter.spent();
        assert!(first > 100, "charged {first}");
        // The second turn's output is capped to what is left of the limit.
        metered.complete(&request(), 2).await.expect("second turn");
        let refused = metered.complete(&request(), 3).await.expect_err("past the limit");
        assert!(
            matches!(refused, ModelError::SpendLimit { limit: 250, .. }),
            "{refused}"
        );
        // Without a limit, turns are counted and never refused.
        let unlimited = Meter::new(None);
        let model = Model::Scripted(ScriptedModel::parse("s", script).expect("script"));
        let metered = unlimited.metering(model);
        for step in 1..=3 {
            metered.complete(&request(), step).await.expect("a turn");
        }
        assert!(unlimited.spent() > 300 && !unlimited.exhausted());
    }
}
