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

use super::{
    allowance::{Allowance, Allowances, Went},
    identity::{AuthError, authenticated},
};

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
/// Access reviews one person may have in the making or denied at once, and how fast that
/// refills. A person with a valid token naming namespace after namespace (or agent after agent)
/// would otherwise have the gateway ask the API server about each; answers that allow give
/// theirs back, so someone reading what they may read is never held back.
const ACCESS_REVIEWS: Allowance = Allowance::full(50.0, 5.0);
/// The same for all people who had an access review denied lately, together: many identities
/// (service accounts are cheap to make) cost the API server no more than this. People with no
/// denial lately are not held to it.
const DENIED_PEOPLE: Allowance = Allowance::full(500.0, 50.0);
/// How long a person counts as one who had an access review denied.
const DENIED_LATELY: Duration = Duration::from_secs(30);
/// People whose access reviews are counted at most; past that, the rest share one allowance.
const MAX_PEOPLE: usize = 4096;

/// A reader, as the API server vouches for them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reader {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What a person asks to do in a namespace through the gateway, and the Kubernetes permission
/// (in group `contextos.dev`) it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Read the namespace's records: `get` on `sessions/records`.
    ReadRecords,
    /// Read its subjects' consent histories: `get` on `consents`.
    ReadConsents,
    /// Append a grant or a revocation of consent: `create` on `consents`.
    RecordConsent,
    /// Read the namespace's memory items: `get` on `memories`.
    ReadMemory,
    /// Forget memory items (one, or a whole scope such as a subject's) or reject a held
    /// candidate: `delete` on `memories`.
    ForgetMemory,
    /// Approve a held candidate, which keeps it: `create` on `memories`.
    KeepMemory,
    /// See whether a subject is erased: `get` on `subjects`.
    ReadSubjects,
    /// Erase a subject (and rotate the namespace's key-encryption key): `delete` on `subjects`.
    EraseSubject,
}

impl Access {
    /// (verb, resource, subresource).
    pub fn permission(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            Self::ReadRecords => (RECORDS_VERB, RECORDS_RESOURCE, Some(RECORDS_SUBRESOURCE)),
            Self::ReadConsents => ("get", CONSENTS_RESOURCE, None),
            Self::RecordConsent => ("create", CONSENTS_RESOURCE, None),
            Self::ReadMemory => ("get", MEMORIES_RESOURCE, None),
            Self::ForgetMemory => ("delete", MEMORIES_RESOURCE, None),
            Self::KeepMemory => ("create", MEMORIES_RESOURCE, None),
            Self::ReadSubjects => ("get", SUBJECTS_RESOURCE, None),
            Self::EraseSubject => ("delete", SUBJECTS_RESOURCE, None),
        }
    }

    /// The permission in words, for a refusal that says what to grant.
    pub fn describe(self) -> String {
        let (verb, resource, subresource) = self.permission();
        let resource = subresource.map_or_else(|| resource.to_owned(), |sub| format!("{resource}/{sub}"));
        let role = match self {
            Self::ReadRecords => "contextos-records-reader",
            Self::ReadConsents => "contextos-consent-reader",
            Self::RecordConsent => "contextos-consent-keeper",
            Self::ReadMemory => "contextos-memory-reader",
            Self::ForgetMemory | Self::KeepMemory => "contextos-memory-keeper",
            Self::ReadSubjects | Self::EraseSubject => "contextos-subject-eraser",
        };
        format!(
            "`{verb}` on {resource} (group {RECORDS_GROUP}) there, e.g. a RoleBinding to ClusterRole {role}"
        )
    }
}

/// The resource whose permissions govern consent records.
pub const CONSENTS_RESOURCE: &str = "consents";
/// The resource whose permissions govern memory items.
pub const MEMORIES_RESOURCE: &str = "memories";
/// The resource whose permissions govern subjects in the identity vault (erasure).
pub const SUBJECTS_RESOURCE: &str = "subjects";

/// Who reads, and whether they may do what they ask in a namespace.
pub trait ReaderAuthority: Send + Sync {
    fn authenticate_reader(
        &self,
        token: &str,
    ) -> impl std::future::Future<Output = Result<Reader, AuthError>> + Send;
    fn may(
        &self,
        reader: &Reader,
        namespace: &str,
        access: Access,
    ) -> impl std::future::Future<Output = Result<bool, AuthError>> + Send;
    /// The caller of an Agent over A2A whose token this is: a token for [`A2A_AUDIENCE`] only, so
    /// that neither a token minted to read records nor one the API server itself would take
    /// starts runs here.
    fn authenticate_a2a_caller(
        &self,
        token: &str,
    ) -> impl std::future::Future<Output = Result<Reader, AuthError>> + Send;
    /// Whether `reader` may start Sessions of Agent `agent` in `namespace` over A2A: RBAC verb
    /// `invoke` on that agent ([`INVOKE_VERB`] on `agents`, the agent as resource name).
    fn may_invoke(
        &self,
        reader: &Reader,
        namespace: &str,
        agent: &str,
    ) -> impl std::future::Future<Output = Result<bool, AuthError>> + Send;
}

/// The permission to call an Agent over A2A: this verb on `agents` (group `contextos.dev`),
/// the Agent as resource name — ClusterRole `contextos-a2a-caller` grants it for every agent,
/// a Role with `resourceNames` for some.
pub const INVOKE_VERB: &str = "invoke";
/// The resource [`INVOKE_VERB`] is on.
pub const AGENTS_RESOURCE: &str = "agents";
/// The audience of the tokens A2A callers present (`kubectl create token <account> --audience
/// contextos-a2a`, or a workload's projected token for it): accepted for calling agents only.
pub const A2A_AUDIENCE: &str = "contextos-a2a";

/// The question put to the API server for `reader` invoking `agent` in `namespace` (pure).
pub fn invoke_review(reader: &Reader, namespace: &str, agent: &str) -> SubjectAccessReview {
    let mut review = access_review(reader, namespace, Access::ReadRecords);
    if let Some(attributes) = review.spec.resource_attributes.as_mut() {
        attributes.verb = Some(INVOKE_VERB.to_owned());
        attributes.resource = Some(AGENTS_RESOURCE.to_owned());
        attributes.subresource = None;
        attributes.name = Some(agent.to_owned());
    }
    review
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

/// A completed TokenReview of an A2A caller's token (pure): a reader whose token the API server
/// says is for [`A2A_AUDIENCE`] — an authenticator that ignores audiences answers with none,
/// which means the API server's own, and is refused.
pub fn a2a_caller_of(review: &TokenReview) -> Result<Reader, AuthError> {
    let caller = reader_of(review)?;
    let audiences = review.status.as_ref().and_then(|s| s.audiences.as_ref());
    if !audiences.is_some_and(|a| a.iter().any(|a| a == A2A_AUDIENCE)) {
        return Err(AuthError::Refused(format!(
            "the token is not for audience {A2A_AUDIENCE}"
        )));
    }
    Ok(caller)
}

/// The question put to the API server for `reader`, `namespace` and `access` (pure).
pub fn access_review(reader: &Reader, namespace: &str, access: Access) -> SubjectAccessReview {
    let (verb, resource, subresource) = access.permission();
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(reader.username.clone()),
            uid: (!reader.uid.is_empty()).then(|| reader.uid.clone()),
            groups: Some(reader.groups.clone()),
            extra: (!reader.extra.is_empty()).then(|| reader.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some(verb.to_owned()),
                group: Some(RECORDS_GROUP.to_owned()),
                resource: Some(resource.to_owned()),
                subresource: subresource.map(str::to_owned),
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

/// Each person's allowance of access reviews ([`ACCESS_REVIEWS`]) and the one people denied
/// lately share ([`DENIED_PEOPLE`]).
fn access_allowances() -> Allowances<String> {
    Allowances::new(ACCESS_REVIEWS, DENIED_PEOPLE, DENIED_LATELY, MAX_PEOPLE)
}

/// The API server's TokenReview and SubjectAccessReview, each remembered briefly.
pub struct ApiServerReaders {
    client: Client,
    tokens: Reviews<[u8; 32], Reader>,
    access: Reviews<(Reader, String, Access), bool>,
    invoke: Reviews<(Reader, String, String), bool>,
    a2a_tokens: Reviews<[u8; 32], Reader>,
    /// Each person's allowance of access reviews, and the one people denied lately share.
    allowances: Allowances<String>,
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
            invoke: Reviews::new(),
            a2a_tokens: Reviews::new(),
            allowances: access_allowances(),
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

    async fn authenticate_a2a_caller(&self, token: &str) -> Result<Reader, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut hash = Sha256::new();
        hash.update(A2A_AUDIENCE.as_bytes());
        hash.update([0]);
        hash.update(token.as_bytes());
        let key: [u8; 32] = hash.finalize().into();
        if let Some(caller) = self.a2a_tokens.get(&key) {
            return Ok(caller);
        }
        let caller = a2a_caller_of(&self.review(token, Some(A2A_AUDIENCE)).await?)?;
        self.a2a_tokens.put(key, caller.clone());
        Ok(caller)
    }

    async fn may(&self, reader: &Reader, namespace: &str, access: Access) -> Result<bool, AuthError> {
        let key = (reader.clone(), namespace.to_owned(), access);
        if let Some(allowed) = self.access.get(&key) {
            return Ok(allowed);
        }
        let allowed = self
            .review_within_allowance(reader, &access_review(reader, namespace, access))
            .await?;
        self.access.put(key, allowed);
        Ok(allowed)
    }

    async fn may_invoke(&self, reader: &Reader, namespace: &str, agent: &str) -> Result<bool, AuthError> {
        let key = (reader.clone(), namespace.to_owned(), agent.to_owned());
        if let Some(allowed) = self.invoke.get(&key) {
            return Ok(allowed);
        }
        let allowed = self
            .review_within_allowance(reader, &invoke_review(reader, namespace, agent))
            .await?;
        self.invoke.put(key, allowed);
        Ok(allowed)
    }
}

impl ApiServerReaders {
    /// [`ApiServerReaders::review_access`], within `reader`'s allowance of reviews that do not
    /// allow (taken before asking, given back if the answer allows; see [`ACCESS_REVIEWS`]).
    async fn review_within_allowance(
        &self,
        reader: &Reader,
        review: &SubjectAccessReview,
    ) -> Result<bool, AuthError> {
        let taken = self
            .allowances
            .take(Some(reader.username.clone()), Instant::now())
            .map_err(|wait| AuthError::AccessThrottled(wait.as_secs_f64().ceil() as u64))?;
        let allowed = self.review_access(review).await;
        let went = match allowed {
            Ok(true) => Went::Well,
            Ok(false) => Went::Badly,
            Err(_) => Went::Unanswered,
        };
        self.allowances.after(&taken, went, Instant::now());
        allowed
    }

    async fn review_access(&self, review: &SubjectAccessReview) -> Result<bool, AuthError> {
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        Ok(reviewed
            .status
            .is_some_and(|s| s.allowed && s.denied != Some(true)))
    }
}

/// Fixed tokens → readers and what each may do in which namespace: a test double of the two
/// reviews (the real ones are exercised by the cluster tests).
#[derive(Clone, Debug, Default)]
pub struct StaticReaders {
    readers: HashMap<String, (Reader, Vec<(String, Access)>)>,
    /// (username, namespace, agent) each caller may invoke.
    invokers: Vec<(String, String, String)>,
}

impl StaticReaders {
    /// `username` may read the records of `namespaces`.
    pub fn with(self, token: &str, username: &str, namespaces: &[&str]) -> Self {
        let grants: Vec<(&str, Access)> = namespaces.iter().map(|n| (*n, Access::ReadRecords)).collect();
        self.with_access(token, username, &grants)
    }

    /// `username` may do each access in its namespace.
    pub fn with_access(mut self, token: &str, username: &str, grants: &[(&str, Access)]) -> Self {
        let reader = Reader {
            username: username.to_owned(),
            uid: String::new(),
            groups: Vec::new(),
            extra: BTreeMap::new(),
        };
        let grants = grants.iter().map(|(n, a)| ((*n).to_owned(), *a)).collect();
        self.readers.insert(token.to_owned(), (reader, grants));
        self
    }

    /// `username` may invoke `agent` in `namespace` over A2A.
    pub fn with_invoke(mut self, username: &str, namespace: &str, agent: &str) -> Self {
        self.invokers
            .push((username.to_owned(), namespace.to_owned(), agent.to_owned()));
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

    async fn may(&self, reader: &Reader, namespace: &str, access: Access) -> Result<bool, AuthError> {
        Ok(self
            .readers
            .values()
            .any(|(r, grants)| r == reader && grants.iter().any(|(n, a)| n == namespace && *a == access)))
    }

    async fn authenticate_a2a_caller(&self, token: &str) -> Result<Reader, AuthError> {
        self.authenticate_reader(token).await
    }

    async fn may_invoke(&self, reader: &Reader, namespace: &str, agent: &str) -> Result<bool, AuthError> {
        Ok(self
            .invokers
            .iter()
            .any(|(u, n, a)| *u == reader.username && n == namespace && a == agent))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    use super::*;

    /// An API server answering only SubjectAccessReviews — allowed in namespaces named `ok-…`,
    /// denied elsewhere — and counting them; the readers asking it.
    async fn readers_asking_a_counting_api_server()
    -> (ApiServerReaders, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::{Arc, atomic::AtomicUsize, atomic::Ordering};
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = asked.clone();
        let answer = move |axum::Json(mut review): axum::Json<serde_json::Value>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let namespace = review["spec"]["resourceAttributes"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            review["status"] = serde_json::json!({"allowed": namespace.starts_with("ok-")});
            async move { axum::Json(review) }
        };
        let app = axum::Router::new().route(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            axum::routing::post(answer),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let config = kube::Config::new(url.parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        (ApiServerReaders::new(client), asked)
    }

    fn person(name: &str) -> Reader {
        Reader {
            username: name.to_owned(),
            uid: String::new(),
            groups: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn a_person_naming_namespace_after_namespace_causes_a_bounded_number_of_access_reviews() {
        use std::sync::atomic::Ordering;
        let (readers, asked) = readers_asking_a_counting_api_server().await;
        let mallory = person("mallory@example.com");
        let started = Instant::now();
        let mut throttled = 0;
        for n in 0..200 {
            match readers
                .may(&mallory, &format!("team-{n}"), Access::ReadRecords)
                .await
            {
                Ok(false) => {}
                Err(AuthError::AccessThrottled(_)) => throttled += 1,
                other => panic!("namespace team-{n}: {other:?}"),
            }
        }
        // What refilled while they were asked (five a second) may have been asked too.
        let burst = ACCESS_REVIEWS.burst() as usize;
        let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
        let denied = asked.load(Ordering::SeqCst);
        assert!(
            (burst..=burst + refilled).contains(&denied),
            "{denied} reviews asked of the API server for 200 namespaces"
        );
        assert_eq!(throttled, 200 - denied);
        // Agents to invoke share the allowance.
        let mut invoked = 0;
        while !matches!(
            readers
                .may_invoke(&mallory, "team-999", &format!("agent-{invoked}"))
                .await,
            Err(AuthError::AccessThrottled(_))
        ) {
            invoked += 1;
            assert!(invoked < 10, "may_invoke is not held to the allowance");
        }
        // Another person is not held back, and answers that allow give theirs back: someone
        // reading what they may read is never throttled.
        let audra = person("audra@example.com");
        for n in 0..200 {
            assert!(
                matches!(
                    readers.may(&audra, &format!("ok-{n}"), Access::ReadRecords).await,
                    Ok(true)
                ),
                "namespace ok-{n}"
            );
        }
        assert_eq!(asked.load(Ordering::SeqCst), denied + invoked + 200);
    }

    #[test]
    fn people_denied_lately_share_one_allowance_and_others_are_not_held_to_it() {
        let allowances = access_allowances();
        let now = Instant::now();
        let who = |n: usize| format!("system:serviceaccount:mallory:sa-{n}");
        // Forty identities each have one review denied: now they are people denied lately.
        for n in 0..40 {
            let taken = allowances.take(Some(who(n)), now).expect("a first review");
            allowances.after(&taken, Went::Badly, now);
        }
        // Each has 49 of its own left, but together they have the shared allowance.
        let mut reviewed = 0;
        for n in 0..40 {
            while let Ok(taken) = allowances.take(Some(who(n)), now) {
                allowances.after(&taken, Went::Badly, now);
                reviewed += 1;
            }
        }
        assert_eq!(reviewed, DENIED_PEOPLE.burst() as usize);
        // Someone denied nothing lately is not held to it.
        let taken = allowances
            .take(Some("audra@example.com".to_owned()), now)
            .expect("not held back");
        allowances.after(&taken, Went::Well, now);
    }

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
    fn an_a2a_caller_is_one_whose_token_is_for_the_a2a_audience_by_the_api_servers_word() {
        let mut for_a2a = review(true, Some("system:serviceaccount:partners:caller"));
        if let Some(status) = for_a2a.status.as_mut() {
            status.audiences = Some(vec![A2A_AUDIENCE.to_owned()]);
        }
        assert_eq!(
            a2a_caller_of(&for_a2a).expect("caller").username,
            "system:serviceaccount:partners:caller"
        );
        // An authenticator that ignores audiences answers with none: the API server's own.
        let without = review(true, Some("system:serviceaccount:partners:caller"));
        assert!(matches!(a2a_caller_of(&without), Err(AuthError::Refused(_))));
        let mut for_records = without.clone();
        if let Some(status) = for_records.status.as_mut() {
            status.audiences = Some(vec![READER_AUDIENCE.to_owned()]);
        }
        assert!(matches!(a2a_caller_of(&for_records), Err(AuthError::Refused(_))));
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
        let sar = access_review(&reader, "shop", Access::ReadRecords);
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

    #[test]
    fn consent_is_read_with_get_and_recorded_with_create_on_consents() {
        let reader = reader_of(&review(true, Some("dana@example.com"))).expect("reader");
        for (access, verb) in [(Access::ReadConsents, "get"), (Access::RecordConsent, "create")] {
            let attributes = access_review(&reader, "shop", access)
                .spec
                .resource_attributes
                .expect("resource attributes");
            assert_eq!(attributes.verb.as_deref(), Some(verb));
            assert_eq!(attributes.resource.as_deref(), Some("consents"));
            assert_eq!(attributes.subresource, None);
            assert_eq!(attributes.namespace.as_deref(), Some("shop"));
        }
    }
}
