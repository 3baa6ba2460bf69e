//! People (and workloads other than runner pods) who read a namespace's records through the
//! gateway service with their own Kubernetes identity: `contextos records … --store
//! gateway+http://…` with the reader's bearer token. The API server says who the token belongs
//! to (TokenReview, the API server's own audience) and whether that user may read the
//! namespace's records (SubjectAccessReview for `get` on `sessions/records` in group
//! `contextos.dev`, which the `contextos-records-reader` ClusterRole grants). Nothing a reader sends
//! besides the token decides what they see; reading never writes.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use sha2::{Digest as _, Sha256};

use super::identity::{AuthError, authenticated};

/// The permission a reader needs in a namespace: `get` on this subresource of Sessions.
pub const RECORDS_GROUP: &str = "contextos.dev";
pub const RECORDS_RESOURCE: &str = "sessions";
pub const RECORDS_SUBRESOURCE: &str = "records";
pub const RECORDS_VERB: &str = "get";

/// The audience a reader may mint a token for (`kubectl create token … --audience
/// contextos-records`): such a token is accepted here and nowhere else, so the gateway could not
/// replay it against the API server. Tokens for the API server's own audience (a person's
/// OIDC id-token, `kubectl create token` without `--audience`) are accepted too.
pub const READER_AUDIENCE: &str = "contextos-records";

/// How long a review (of a token, or of a reader's permission) is reused: a revoked binding or
/// token stops working at most this long after the revocation.
const REVIEW_TTL: Duration = Duration::from_secs(10);
/// Reviews remembered at most (then the memory starts over).
const REVIEW_CACHE: usize = 4096;

/// A reader, as the API server vouches for them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reader {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Who reads, and whether they may read a namespace's records.
pub trait ReaderAuthority: Send + Sync {
    fn authenticate_reader(
        &self,
        token: &str,
    ) -> impl std::future::Future<Output = Result<Reader, AuthError>> + Send;
    fn may_read(
        &self,
        reader: &Reader,
        namespace: &str,
    ) -> impl std::future::Future<Output = Result<bool, AuthError>> + Send;
}

/// A completed TokenReview of a reader's token (pure, so its checks are unit-tested).
pub fn reader_of(review: &TokenReview) -> Result<Reader, AuthError> {
    let (_, user) = authenticated(review)?;
    let username = user.username.clone().unwrap_or_default();
    if username.is_empty() {
        return Err(AuthError::Refused("the review names no user".into()));
    }
    Ok(Reader {
        username,
        uid: user.uid.clone().unwrap_or_default(),
        groups: user.groups.clone().unwrap_or_default(),
        extra: user.extra.clone().unwrap_or_default(),
    })
}

/// The question put to the API server for `reader` and `namespace` (pure).
pub fn records_access_review(reader: &Reader, namespace: &str) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(reader.username.clone()),
            uid: (!reader.uid.is_empty()).then(|| reader.uid.clone()),
            groups: Some(reader.groups.clone()),
            extra: (!reader.extra.is_empty()).then(|| reader.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some(RECORDS_VERB.to_owned()),
                group: Some(RECORDS_GROUP.to_owned()),
                resource: Some(RECORDS_RESOURCE.to_owned()),
                subresource: Some(RECORDS_SUBRESOURCE.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A short-lived memory of reviews.
struct Reviews<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Reviews<K, V> {
    fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().ok()?;
        let (value, at) = entries.get(key)?;
        (at.elapsed() < REVIEW_TTL).then(|| value.clone())
    }

    fn put(&self, key: K, value: V) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= REVIEW_CACHE {
                entries.retain(|_, (_, at)| at.elapsed() < REVIEW_TTL);
                if entries.len() >= REVIEW_CACHE {
                    entries.clear();
                }
            }
            entries.insert(key, (value, Instant::now()));
        }
    }
}

/// The API server's TokenReview and SubjectAccessReview, each remembered briefly.
pub struct ApiServerReaders {
    client: Client,
    tokens: Reviews<[u8; 32], Reader>,
    access: Reviews<(Reader, String), bool>,
}

impl std::fmt::Debug for ApiServerReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerReaders").finish_non_exhaustive()
    }
}

impl ApiServerReaders {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            tokens: Reviews::new(),
            access: Reviews::new(),
        }
    }
}

impl ApiServerReaders {
    async fn review(&self, token: &str, audience: Option<&str>) -> Result<TokenReview, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: audience.map(|a| vec![a.to_owned()]),
            },
            ..Default::default()
        };
        Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))
    }
}

impl ReaderAuthority for ApiServerReaders {
    async fn authenticate_reader(&self, token: &str) -> Result<Reader, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(reader) = self.tokens.get(&key) {
            return Ok(reader);
        }
        // First for the readers' own audience, then for the API server's (no audiences). A runner
        // pod's token (audience contextos-gateway) is neither.
        let reader = match reader_of(&self.review(token, Some(READER_AUDIENCE)).await?) {
            Ok(reader) => reader,
            Err(_) => reader_of(&self.review(token, None).await?)?,
        };
        self.tokens.put(key, reader.clone());
        Ok(reader)
    }

    async fn may_read(&self, reader: &Reader, namespace: &str) -> Result<bool, AuthError> {
        let key = (reader.clone(), namespace.to_owned());
        if let Some(allowed) = self.access.get(&key) {
            return Ok(allowed);
        }
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &records_access_review(reader, namespace))
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let allowed = reviewed
            .status
            .is_some_and(|s| s.allowed && s.denied != Some(true));
        self.access.put(key, allowed);
        Ok(allowed)
    }
}

/// Fixed tokens → readers and the namespaces each may read: a test double of the two reviews
/// (the real ones are exercised by the cluster tests).
#[derive(Clone, Debug, Default)]
pub struct StaticReaders {
    readers: HashMap<String, (Reader, Vec<String>)>,
}

impl StaticReaders {
    pub fn with(mut self, token: &str, username: &str, namespaces: &[&str]) -> Self {
        let reader = Reader {
            username: username.to_owned(),
            uid: String::new(),
            groups: Vec::new(),
            extra: BTreeMap::new(),
        };
        let namespaces = namespaces.iter().map(|n| (*n).to_owned()).collect();
        self.readers.insert(token.to_owned(), (reader, namespaces));
        self
    }
}

impl ReaderAuthority for StaticReaders {
    async fn authenticate_reader(&self, token: &str) -> Result<Reader, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        self.readers
            .get(token)
            .map(|(reader, _)| reader.clone())
            .ok_or_else(|| AuthError::Refused("unknown token".into()))
    }

    async fn may_read(&self, reader: &Reader, namespace: &str) -> Result<bool, AuthError> {
        Ok(self
            .readers
            .values()
            .any(|(r, namespaces)| r == reader && namespaces.iter().any(|n| n == namespace)))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    use super::*;

    fn review(authenticated: bool, user: Option<&str>) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                user: user.map(|name| UserInfo {
                    username: Some(name.to_owned()),
                    groups: Some(vec!["sre".into()]),
                    uid: Some("u-1".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_authenticated_review_names_the_reader_with_their_groups() {
        let reader = reader_of(&review(true, Some("dana@example.com"))).expect("reader");
        assert_eq!(reader.username, "dana@example.com");
        assert_eq!(reader.groups, ["sre"]);
        assert_eq!(reader.uid, "u-1");
    }

    #[test]
    fn unauthenticated_or_anonymous_reviews_name_no_reader() {
        assert!(reader_of(&review(false, Some("dana@example.com"))).is_err());
        assert!(reader_of(&review(true, None)).is_err());
        assert!(reader_of(&review(true, Some(""))).is_err());
        assert!(reader_of(&TokenReview::default()).is_err());
    }

    #[test]
    fn the_access_review_asks_for_get_on_sessions_records_in_exactly_that_namespace() {
        let reader = reader_of(&review(true, Some("dana@example.com"))).expect("reader");
        let sar = records_access_review(&reader, "shop");
        let attributes = sar.spec.resource_attributes.expect("resource attributes");
        assert_eq!(sar.spec.user.as_deref(), Some("dana@example.com"));
        assert_eq!(sar.spec.groups, Some(vec!["sre".to_owned()]));
        assert_eq!(attributes.namespace.as_deref(), Some("shop"));
        assert_eq!(attributes.verb.as_deref(), Some("get"));
        assert_eq!(attributes.group.as_deref(), Some("contextos.dev"));
        assert_eq!(attributes.resource.as_deref(), Some("sessions"));
        assert_eq!(attributes.subresource.as_deref(), Some("records"));
        assert_eq!(
            attributes.name, None,
            "every run of the namespace, not one Session"
        );
    }
}
