//! Who is calling the gateway service: a runner pod proves its workload identity with a
//! projected service-account token issued for the gateway's audience, which the gateway checks
//! with the API server (TokenReview). The tenant of every call is the namespace of that verified
//! pod — never a field, header or bundle value the caller could write.

use std::{
    collections::HashMap,
    future::Future,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus, UserInfo};
use kube::{Api, Client, api::PostParams};
use sha2::{Digest as _, Sha256};

use super::readers::{Access, ApiServerReaders, Reader, ReaderAuthority, StaticReaders};

/// The audience runner pods request their projected token for; a token for any other audience
/// (e.g. the API server's own) is refused.
pub const GATEWAY_AUDIENCE: &str = "contextos-gateway";

/// Extra keys the API server puts into a TokenReview of a pod-bound token.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// How long a positive review is reused (tokens live ≥ 10 minutes; a deleted pod's token is
/// refused at most this long after the deletion).
const REVIEW_TTL: Duration = Duration::from_secs(30);
/// Reviews remembered at most (then the memory starts over).
const REVIEW_CACHE: usize = 4096;

/// A runner pod, as the API server vouches for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// The pod's namespace: the tenant.
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
}

/// Why a caller was not identified.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no bearer token: a runner pod authenticates with its projected token for audience {GATEWAY_AUDIENCE}"
    )]
    Missing,
    #[error("the token was refused by the API server: {0}")]
    Refused(String),
    #[error("the token is not bound to a pod (user {0}); only runner pods' projected tokens are accepted")]
    NotAPod(String),
    #[error("the token could not be reviewed (API server unreachable?): {0}")]
    Unavailable(String),
    #[error(
        "too many tokens from your address are being reviewed or were refused lately: this one was not reviewed; try again in {0} s"
    )]
    Throttled(u64),
    #[error(
        "you asked about too many namespaces or agents you may not use lately: this one was not looked at; try again in {0} s"
    )]
    AccessThrottled(u64),
}

/// Turns a bearer token into a verified pod identity.
pub trait Authenticator: Send + Sync {
    fn authenticate(&self, token: &str) -> impl Future<Output = Result<PodIdentity, AuthError>> + Send;
}

/// Positive reviews by SHA-256 of the token, with when they were made.
type ReviewCache = HashMap<[u8; 32], (PodIdentity, Instant)>;

/// The API server's TokenReview, for [`GATEWAY_AUDIENCE`], with a short positive cache.
#[derive(Clone)]
pub struct TokenReviewer {
    client: Client,
    audience: String,
    cache: std::sync::Arc<Mutex<ReviewCache>>,
    /// The same API server, for people reading records with their own identity.
    readers: std::sync::Arc<ApiServerReaders>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: Client) -> Self {
        Self {
            readers: std::sync::Arc::new(ApiServerReaders::new(client.clone())),
            client,
            audience: GATEWAY_AUDIENCE.to_owned(),
            cache: Default::default(),
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<PodIdentity> {
        let cache = self.cache.lock().ok()?;
        let (identity, at) = cache.get(key)?;
        (at.elapsed() < REVIEW_TTL).then(|| identity.clone())
    }

    fn remember(&self, key: [u8; 32], identity: &PodIdentity) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= REVIEW_CACHE {
                cache.retain(|_, (_, at)| at.elapsed() < REVIEW_TTL);
                if cache.len() >= REVIEW_CACHE {
                    cache.clear();
                }
            }
            cache.insert(key, (identity.clone(), Instant::now()));
        }
    }
}

impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<PodIdentity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(identity) = self.cached(&key) {
            return Ok(identity);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        // Out of the request's turn, if it holds one (the review is the API server's work).
        let reviews = Api::<TokenReview>::all(self.client.clone());
        let reviewed = crate::gateway::fair::away(reviews.create(&PostParams::default(), &review))
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let identity = identity_of(&reviewed, &self.audience)?;
        self.remember(key, &identity);
        Ok(identity)
    }
}

impl ReaderAuthority for TokenReviewer {
    async fn authenticate_reader(&self, token: &str) -> Result<Reader, AuthError> {
        self.readers.authenticate_reader(token).await
    }

    async fn may(&self, reader: &Reader, namespace: &str, access: Access) -> Result<bool, AuthError> {
        self.readers.may(reader, namespace, access).await
    }

    async fn may_invoke(&self, reader: &Reader, namespace: &str, agent: &str) -> Result<bool, AuthError> {
        self.readers.may_invoke(reader, namespace, agent).await
    }

    async fn authenticate_a2a_caller(&self, token: &str) -> Result<Reader, AuthError> {
        self.readers.authenticate_a2a_caller(token).await
    }
}

/// The status and user of a review that authenticated its token (pure).
pub(super) fn authenticated(review: &TokenReview) -> Result<(&TokenReviewStatus, &UserInfo), AuthError> {
    let status = review
        .status
        .as_ref()
        .ok_or_else(|| AuthError::Refused("the review has no status".into()))?;
    if status.authenticated != Some(true) {
        return Err(AuthError::Refused(
            status.error.clone().unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| AuthError::Refused("the review names no user".into()))?;
    Ok((status, user))
}

/// Reads a completed TokenReview (pure, so its checks are unit-tested).
pub fn identity_of(review: &TokenReview, audience: &str) -> Result<PodIdentity, AuthError> {
    let (status, user) = authenticated(review)?;
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(AuthError::Refused(format!(
            "the token is not for audience {audience}"
        )));
    }
    let username = user.username.clone().unwrap_or_default();
    let namespace = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .map(|(ns, _)| ns.to_owned())
        .ok_or_else(|| AuthError::NotAPod(username.clone()))?;
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .cloned()
    };
    let (Some(pod), Some(pod_uid)) = (extra(POD_NAME_EXTRA), extra(POD_UID_EXTRA)) else {
        return Err(AuthError::NotAPod(username));
    };
    Ok(PodIdentity {
        namespace,
        pod,
        pod_uid,
        username,
    })
}

/// Fixed tokens → identities: for tests and single-machine setups without an API server (a test
/// double of the TokenReview; the real one is exercised by the cluster tests).
#[derive(Clone, Debug, Default)]
pub struct StaticTokens {
    tokens: HashMap<String, PodIdentity>,
    readers: StaticReaders,
    /// Tokens looked up (each stands for one TokenReview), by every clone together.
    reviews: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl StaticTokens {
    pub fn with(mut self, token: &str, identity: PodIdentity) -> Self {
        self.tokens.insert(token.to_owned(), identity);
        self
    }

    /// A reader's token: `username` may read the records of `namespaces`.
    pub fn with_reader(mut self, token: &str, username: &str, namespaces: &[&str]) -> Self {
        self.readers = self.readers.with(token, username, namespaces);
        self
    }

    /// A person's token: `username` may do each access in its namespace.
    pub fn with_person(mut self, token: &str, username: &str, grants: &[(&str, Access)]) -> Self {
        self.readers = self.readers.with_access(token, username, grants);
        self
    }

    /// How many tokens were looked up: the TokenReviews a real API server would have been asked.
    pub fn reviews(&self) -> usize {
        self.reviews.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reviewed(&self) {
        self.reviews.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ReaderAuthority for StaticTokens {
    async fn authenticate_reader(&self, token: &str) -> Result<Reader, AuthError> {
        self.reviewed();
        self.readers.authenticate_reader(token).await
    }

    async fn may(&self, reader: &Reader, namespace: &str, access: Access) -> Result<bool, AuthError> {
        self.readers.may(reader, namespace, access).await
    }

    async fn may_invoke(&self, reader: &Reader, namespace: &str, agent: &str) -> Result<bool, AuthError> {
        self.readers.may_invoke(reader, namespace, agent).await
    }

    async fn authenticate_a2a_caller(&self, token: &str) -> Result<Reader, AuthError> {
        self.reviewed();
        self.readers.authenticate_a2a_caller(token).await
    }
}

impl Authenticator for StaticTokens {
    async fn authenticate(&self, token: &str) -> Result<PodIdentity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        self.reviewed();
        self.tokens
            .get(token)
            .cloned()
            .ok_or_else(|| AuthError::Refused("unknown token".into()))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    use super::*;

    fn review(authenticated: bool, audience: &str, user: &str, pod: Option<(&str, &str)>) -> TokenReview {
        let mut extra = std::collections::BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert(POD_NAME_EXTRA.to_owned(), vec![name.to_owned()]);
            extra.insert(POD_UID_EXTRA.to_owned(), vec![uid.to_owned()]);
        }
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(vec![audience.to_owned()]),
                user: Some(UserInfo {
                    username: Some(user.to_owned()),
                    extra: Some(extra),
                    ..Default::default()
                }),
                error: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_bound_token_for_the_gateway_names_its_pod_and_namespace() {
        let identity = identity_of(
            &review(
                true,
                GATEWAY_AUDIENCE,
                "system:serviceaccount:shop:default",
                Some(("s-run-1", "u1")),
            ),
            GATEWAY_AUDIENCE,
        )
        .expect("identified");
        assert_eq!(identity.namespace, "shop");
        assert_eq!(identity.pod, "s-run-1");
        assert_eq!(identity.pod_uid, "u1");
    }

    #[test]
    fn other_audiences_users_and_unbound_tokens_are_refused() {
        let user = "system:serviceaccount:shop:default";
        let pod = Some(("s-run-1", "u1"));
        assert!(identity_of(&review(false, GATEWAY_AUDIENCE, user, pod), GATEWAY_AUDIENCE).is_err());
        assert!(
            identity_of(
                &review(true, "https://kubernetes.default.svc", user, pod),
                GATEWAY_AUDIENCE
            )
            .is_err()
        );
        assert!(matches!(
            identity_of(&review(true, GATEWAY_AUDIENCE, user, None), GATEWAY_AUDIENCE),
            Err(AuthError::NotAPod(_))
        ));
        assert!(matches!(
            identity_of(
                &review(true, GATEWAY_AUDIENCE, "dana@example.com", pod),
                GATEWAY_AUDIENCE
            ),
            Err(AuthError::NotAPod(_))
        ));
    }
}
