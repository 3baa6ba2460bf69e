//! The RunContexts whose signature the service verified, so that the context a runner sends
//! with every request is checked in full only once.
//!
//! Looked up first by the hash of the header's bytes (no decoding at all), then — for a header
//! not seen before — by the signature of the context it decodes to: a context equal to one
//! verified before is not verified again. Only a few byte forms of one context are remembered,
//! so a runner that re-encodes its own context endlessly (spaces, key order, unknown fields)
//! pays for decoding each form and cannot fill the cache that every other runner uses.

use std::collections::HashMap;

use crate::run_context::SignedRunContext;

/// Verified contexts remembered at most (≈ 2 KiB each; then the memory starts over).
const CONTEXTS: usize = 4096;
/// Byte forms of one context remembered at most.
const FORMS_PER_CONTEXT: u8 = 4;

#[derive(Debug, Default)]
pub(super) struct ContextCache {
    /// SHA-256 of a header → the context it carried.
    by_header: HashMap<[u8; 32], SignedRunContext>,
    /// Signature → the context, and how many header forms point to it.
    by_signature: HashMap<String, (SignedRunContext, u8)>,
}

impl ContextCache {
    /// The context a header with this hash carried, if it was verified before.
    pub(super) fn by_header(&self, header: &[u8; 32]) -> Option<SignedRunContext> {
        self.by_header.get(header).cloned()
    }

    /// Whether `context` (decoded from a header not seen before) equals one verified before;
    /// if so, its header is remembered too, up to a few forms a context.
    pub(super) fn known_as(&mut self, header: [u8; 32], context: &SignedRunContext) -> bool {
        let Some((known, forms)) = self.by_signature.get_mut(&context.signature) else {
            return false;
        };
        if known != context {
            return false;
        }
        if *forms < FORMS_PER_CONTEXT {
            *forms += 1;
            self.by_header.insert(header, context.clone());
        }
        true
    }

    /// Remembers a context whose signature just verified.
    pub(super) fn verified(&mut self, header: [u8; 32], context: &SignedRunContext) {
        if self.by_signature.len() >= CONTEXTS {
            self.by_header.clear();
            self.by_signature.clear();
        }
        self.by_signature
            .insert(context.signature.clone(), (context.clone(), 1));
        self.by_header.insert(header, context.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(run: &str, signature: &str) -> SignedRunContext {
        SignedRunContext {
            context: crate::run_context::RunContext {
                run_id: run.into(),
                ..crate::run_context::tests::context("shop")
            },
            key_id: "k".into(),
            signature: signature.into(),
        }
    }

    #[test]
    fn a_context_is_known_by_its_header_or_its_signature_and_forms_are_bounded() {
        let mut cache = ContextCache::default();
        let one = context("run-1", "sig-1");
        assert!(cache.by_header(&[1; 32]).is_none());
        assert!(!cache.known_as([1; 32], &one), "nothing verified yet");
        cache.verified([1; 32], &one);
        assert_eq!(cache.by_header(&[1; 32]), Some(one.clone()));
        // Another byte form of the same context: known, and remembered up to the bound.
        for form in 2..=10u8 {
            assert!(cache.known_as([form; 32], &one));
        }
        let remembered = (2..=10u8)
            .filter(|f| cache.by_header(&[*f; 32]).is_some())
            .count();
        assert_eq!(remembered, usize::from(FORMS_PER_CONTEXT) - 1);
        // The same signature on a different context is not the verified one.
        let forged = context("run-2", "sig-1");
        assert!(!cache.known_as([11; 32], &forged));
        assert!(cache.by_header(&[11; 32]).is_none());
    }
}
