//! The ReadGrant: what lets a replay Job read its tenant's records through the gateway service.
//! The operator signs one per replay Job, naming the tenant and the Job; the gateway honours it
//! only for a pod of that Job in that namespace (verified identity and owner), and only for
//! reading the tenant's runs and storing the replay's report. Nothing else may read records.

use serde::{Deserialize, Serialize};

use crate::{
    keys::{KeyPair, PublicKey},
    records::canonical::canonical_bytes_of,
};

/// Environment variable carrying a signed ReadGrant (JSON) into a replay Job's pod.
pub const READ_GRANT_ENV: &str = "CONTEXTOS_READ_GRANT";

/// Read access to one tenant's records, for the pods of one Job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadGrant {
    pub tenant_id: String,
    /// The Job whose pods may use it.
    pub job: String,
    pub issued_at_ms: i64,
    pub expires_at_ms: i64,
    /// The replay gate the Job runs: the gateway replays exactly this candidate and signs the
    /// verdict (see [`crate::run::gate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<crate::run::gate::GateOrder>,
}

/// A ReadGrant and the operator's signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReadGrant {
    pub grant: ReadGrant,
    pub key_id: String,
    pub signature: String,
}

/// Why a grant was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadGrantError {
    #[error("the read grant is not signed by the operator's key")]
    BadSignature,
    #[error("the read grant expired at {0}")]
    Expired(i64),
    #[error("the read grant was issued at {0}, later than now by more than the clock skew tolerated")]
    NotYetValid(i64),
    #[error("the read grant is for tenant {found}, not {expected}")]
    WrongTenant { expected: String, found: String },
}

impl SignedReadGrant {
    pub fn sign(grant: ReadGrant, key: &KeyPair) -> Self {
        let signature = key.sign_hex(&signing_bytes(&grant));
        Self {
            grant,
            key_id: key.key_id(),
            signature,
        }
    }

    /// The grant, if `key` signed it (whatever its time and tenant): how the operator tells
    /// the grants it wrote into Jobs from others.
    pub fn signed_by(&self, key: &PublicKey) -> Option<&ReadGrant> {
        (self.key_id == key.key_id() && key.verify_hex(&signing_bytes(&self.grant), &self.signature))
            .then_some(&self.grant)
    }

    /// Checks signature, expiry and tenant.
    pub fn verify(&self, key: &PublicKey, tenant: &str, now_ms: i64) -> Result<&ReadGrant, ReadGrantError> {
        if self.signed_by(key).is_none() {
            return Err(ReadGrantError::BadSignature);
        }
        if now_ms >= self.grant.expires_at_ms {
            return Err(ReadGrantError::Expired(self.grant.expires_at_ms));
        }
        if self.grant.issued_at_ms > now_ms.saturating_add(crate::run_context::CLOCK_SKEW_MS) {
            return Err(ReadGrantError::NotYetValid(self.grant.issued_at_ms));
        }
        if self.grant.tenant_id != tenant {
            return Err(ReadGrantError::WrongTenant {
                expected: tenant.to_owned(),
                found: self.grant.tenant_id.clone(),
            });
        }
        Ok(&self.grant)
    }
}

fn signing_bytes(grant: &ReadGrant) -> Vec<u8> {
    let mut out = b"contextos-read-grant/v1\n".to_vec();
    // Plain data: serialization cannot fail.
    out.extend(canonical_bytes_of(grant).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> ReadGrant {
        ReadGrant {
            tenant_id: "shop".into(),
            job: "replay-policy-guardrails-0123456789".into(),
            issued_at_ms: 1_000,
            expires_at_ms: 2_000,
            gate: None,
        }
    }

    #[test]
    fn a_grant_verifies_only_with_the_signer_in_time_and_for_its_tenant() {
        let key = KeyPair::from_seed([5; 32]);
        let signed = SignedReadGrant::sign(grant(), &key);
        assert!(signed.verify(&key.public(), "shop", 1_500).is_ok());
        assert_eq!(
            signed.verify(&KeyPair::from_seed([6; 32]).public(), "shop", 1_500),
            Err(ReadGrantError::BadSignature)
        );
        assert_eq!(
            signed.verify(&key.public(), "shop", 2_000),
            Err(ReadGrantError::Expired(2_000))
        );
        assert!(matches!(
            signed.verify(&key.public(), "bank", 1_500),
            Err(ReadGrantError::WrongTenant { .. })
        ));
        let mut widened = signed.clone();
        widened.grant.expires_at_ms = i64::MAX;
        assert_eq!(
            widened.verify(&key.public(), "shop", 1_500),
            Err(ReadGrantError::BadSignature)
        );
    }
}
