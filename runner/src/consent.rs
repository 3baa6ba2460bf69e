//! Consent: the append-only records of what a person agreed to, what is in force from them, and
//! the decision that gates a memory candidate on them.
//!
//! A consent record grants or revokes, for one subject (a pseudonymous handle, never a raw
//! identifier) and one purpose, some categories of personal data. Records are never edited: a
//! revocation is a new record, and what is in force is read from all of them in the order they
//! were appended — a revocation always counts, and a grant counts against a revocation only if
//! it was made after it or both are Consent objects (chained in the order the API server
//! accepted them), so a grant chained late never undoes a revocation.
//! Everything here is pure: the records come from the caller (read fresh from the store, so a
//! revocation appended before a recall is always seen by it), and nothing is written.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use serde::{Deserialize, Serialize};

use crate::personal_data::{Category, Classification};

/// The most bytes of a record's free-text fields (who, evidence).
pub const MAX_TEXT_FIELD: usize = 512;
/// The most categories one record names.
pub const MAX_CATEGORIES: usize = 64;

/// A pseudonymous handle for a person: what records and memory carry instead of their name,
/// e-mail or account id (`[a-z0-9][a-z0-9._:-]*`, at most 128 bytes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubjectHandle(String);

/// What data is used for, as consents name it (a DNS label such as `incident-follow-up`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Purpose(String);

macro_rules! checked_name {
    ($type:ident, $what:literal, $max:literal, $extra:expr, $rule:literal) => {
        impl $type {
            pub fn new(value: &str) -> Result<Self, ConsentError> {
                let extra: fn(u8) -> bool = $extra;
                let valid = !value.is_empty()
                    && value.len() <= $max
                    && value.as_bytes()[0].is_ascii_alphanumeric()
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || extra(b));
                if valid {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(ConsentError::BadName {
                        what: $what,
                        value: value.chars().take(64).collect(),
                        rule: $rule,
                    })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // pad: a table's column width applies.
                f.pad(&self.0)
            }
        }

        impl TryFrom<String> for $type {
            type Error = ConsentError;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(&value)
            }
        }

        impl From<$type> for String {
            fn from(value: $type) -> Self {
                value.0
            }
        }
    };
}

checked_name!(
    SubjectHandle,
    "subject handle",
    128,
    |b| b == b'.' || b == b'_' || b == b':',
    "lowercase letters, digits and . _ : -, starting with a letter or digit, at most 128 bytes"
);
checked_name!(
    Purpose,
    "purpose",
    63,
    |_| false,
    "lowercase letters, digits and -, starting with a letter or digit, at most 63 bytes"
);

/// Whether a record gives consent or takes it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsentAction {
    Grant,
    Revoke,
}

/// One consent record, as appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentRecord {
    pub subject: SubjectHandle,
    pub purpose: Purpose,
    pub action: ConsentAction,
    /// The categories granted or revoked; a revocation naming none revokes every category of
    /// the purpose.
    pub categories: BTreeSet<Category>,
    /// Who recorded it: the authenticated identity that appended it.
    pub by: String,
    /// Where the person's decision is kept (a ticket, a signed form); required for a grant.
    #[serde(default)]
    pub evidence: String,
    pub at_ms: i64,
    /// A grant ends here unless revoked sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// The id the recording client gave its request (letters, digits, `.`, `_`, `-`; at most
    /// 64 bytes): a request sent again — its answer lost — finds its record instead of
    /// appending it twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The most bytes of a request id.
pub const MAX_REQUEST_ID: usize = 64;

/// Why a consent record or a name is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConsentError {
    #[error("{what} {value:?} is not valid: use {rule}")]
    BadName {
        what: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error(
        "a grant names the categories of personal data it covers (e.g. email, phone); this one names none"
    )]
    NothingGranted,
    #[error("a record names at most {MAX_CATEGORIES} categories; this one names {0}")]
    TooManyCategories(usize),
    #[error("a grant says where the person's decision is kept (evidence: a ticket or form reference)")]
    NoEvidence,
    #[error("{field} has {bytes} bytes; at most {MAX_TEXT_FIELD}")]
    TooLong { field: &'static str, bytes: usize },
    #[error("the grant expires ({expires_at_ms}) before it is given ({at_ms})")]
    ExpiresBeforeGiven { at_ms: i64, expires_at_ms: i64 },
    #[error("a revocation does not expire; remove expiresAtMs")]
    RevocationExpires,
    #[error("{who} must be who appends the record")]
    NoAuthor { who: &'static str },
    #[error("{field} holds a control character; use printable text")]
    ControlCharacter { field: &'static str },
    #[error("requestId {0:?} is not valid: use at most 64 letters, digits, '.', '_' or '-'")]
    BadRequestId(String),
}

impl ConsentRecord {
    /// Checks a record on its own, before it is appended.
    pub fn validate(&self) -> Result<(), ConsentError> {
        if self.categories.len() > MAX_CATEGORIES {
            return Err(ConsentError::TooManyCategories(self.categories.len()));
        }
        for (field, value) in [("by", &self.by), ("evidence", &self.evidence)] {
            if value.len() > MAX_TEXT_FIELD {
                return Err(ConsentError::TooLong {
                    field,
                    bytes: value.len(),
                });
            }
        }
        if self.by.trim().is_empty() {
            return Err(ConsentError::NoAuthor { who: "by" });
        }
        // Printed in histories: a line break or an escape sequence could forge the lines after it.
        for (field, value) in [("by", &self.by), ("evidence", &self.evidence)] {
            if value.chars().any(char::is_control) {
                return Err(ConsentError::ControlCharacter { field });
            }
        }
        if let Some(id) = &self.request_id {
            let valid = !id.is_empty()
                && id.len() <= MAX_REQUEST_ID
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !valid {
                return Err(ConsentError::BadRequestId(
                    id.chars().take(MAX_REQUEST_ID).collect(),
                ));
            }
        }
        match self.action {
            ConsentAction::Grant => {
                if self.categories.is_empty() {
                    return Err(ConsentError::NothingGranted);
                }
                if self.evidence.trim().is_empty() {
                    return Err(ConsentError::NoEvidence);
                }
                if let Some(expires_at_ms) = self.expires_at_ms
                    && expires_at_ms <= self.at_ms
                {
                    return Err(ConsentError::ExpiresBeforeGiven {
                        at_ms: self.at_ms,
                        expires_at_ms,
                    });
                }
            }
            ConsentAction::Revoke => {
                if self.expires_at_ms.is_some() {
                    return Err(ConsentError::RevocationExpires);
                }
            }
        }
        Ok(())
    }
}

/// The newest record about one category of one subject and purpose.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Standing {
    granted: bool,
    from_ms: i64,
    until_ms: Option<i64>,
    /// Whether it stands for a Consent object (chained in the order the API server accepted
    /// the objects).
    object: bool,
}

impl Standing {
    /// Whether `next`, appended after this one, replaces it. A revocation always does: none is
    /// ever lost, whatever its time says (a record made through the gateway has its replica's
    /// clock). Between two Consent objects the order they were appended in is the order the
    /// API server accepted them, so the later one does. Otherwise a grant replaces a revocation
    /// only if it was made strictly later — so a grant held back while the store was away (a
    /// Consent object chained late, dated by the API server to the second) never undoes a
    /// revocation made through the gateway after it — and another grant if made no earlier.
    /// Where clocks or the second's rounding leave it unclear, the revocation stands: the
    /// person can grant again.
    fn replaced_by(&self, next: &Standing) -> bool {
        if !next.granted || (self.object && next.object) {
            return true;
        }
        if self.granted {
            next.from_ms >= self.from_ms
        } else {
            next.from_ms > self.from_ms
        }
    }

    /// Whether it grants at `now_ms`: a grant, made by then, not expired.
    fn grants_at(&self, now_ms: i64) -> bool {
        self.granted && self.from_ms <= now_ms && self.until_ms.is_none_or(|u| now_ms < u)
    }
}

/// One subject's consents for one purpose: the newest record about each category, and when
/// every category was last revoked at once.
#[derive(Clone, Debug, Default)]
struct Consents {
    categories: BTreeMap<Category, Standing>,
    revoked_all: Option<Standing>,
}

/// What is in force, folded from a subject's records in the order they were appended, a grant
/// counting against a revocation only if made after it (the gateway's time for one recorded
/// through it, the API server's for a Consent object) or both are objects: see
/// [`Standing::replaced_by`].
#[derive(Clone, Debug, Default)]
pub struct ConsentLedger {
    standing: BTreeMap<(SubjectHandle, Purpose), Consents>,
}

impl ConsentLedger {
    /// Folds `records`, in the order they were appended.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a ConsentRecord>) -> Self {
        let mut ledger = Self::default();
        for record in records {
            ledger.apply(record);
        }
        ledger
    }

    /// Folds one more record (the last appended).
    pub fn apply(&mut self, record: &ConsentRecord) {
        let consents = self
            .standing
            .entry((record.subject.clone(), record.purpose.clone()))
            .or_default();
        let revokes = record.action == ConsentAction::Revoke;
        let standing = Standing {
            granted: !revokes,
            from_ms: record.at_ms,
            until_ms: if revokes { None } else { record.expires_at_ms },
            object: record
                .request_id
                .as_deref()
                .is_some_and(|id| id.starts_with(crate::gateway::object_chains::OBJECT_REQUEST_PREFIX)),
        };
        if revokes && record.categories.is_empty() {
            for value in consents.categories.values_mut() {
                *value = standing.clone();
            }
            consents.revoked_all = Some(standing);
            return;
        }
        for category in &record.categories {
            // A category never named before still answers to an earlier revocation of all.
            let current = consents
                .categories
                .get(category)
                .or(consents.revoked_all.as_ref());
            if current.is_none_or(|current| current.replaced_by(&standing)) {
                consents.categories.insert(category.clone(), standing.clone());
            }
        }
    }

    /// The categories a consent of `subject` for `purpose` covers at `now_ms`.
    pub fn in_force(&self, subject: &SubjectHandle, purpose: &Purpose, now_ms: i64) -> BTreeSet<Category> {
        self.standing
            .get(&(subject.clone(), purpose.clone()))
            .into_iter()
            .flat_map(|consents| &consents.categories)
            .filter(|(_, s)| s.grants_at(now_ms))
            .map(|(category, _)| category.clone())
            .collect()
    }

    /// The categories of `wanted` that no consent of `subject` for `purpose` covers at `now_ms`
    /// (empty: all are covered).
    pub fn uncovered(
        &self,
        subject: &SubjectHandle,
        purpose: &Purpose,
        wanted: &BTreeSet<Category>,
        now_ms: i64,
    ) -> BTreeSet<Category> {
        let standing = self.standing.get(&(subject.clone(), purpose.clone()));
        wanted
            .iter()
            .filter(|category| {
                !standing
                    .and_then(|s| s.categories.get(*category))
                    .is_some_and(|s| s.grants_at(now_ms))
            })
            .cloned()
            .collect()
    }
}

pub use contextos_crds::common::{MemoryScope, MemoryType};

pub use contextos_crds::agent::{FromSubjectRuns, Review, WithoutConsent};

/// An agent's memory policy: what it may keep, for which purpose, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPolicy {
    pub agent: String,
    pub purpose: Purpose,
    pub keeps: BTreeSet<(MemoryType, MemoryScope)>,
    pub review: Review,
    pub without_consent: WithoutConsent,
    /// Whether a run about a subject may keep items outside that subject's scope.
    pub from_subject_runs: FromSubjectRuns,
}

/// A proposed memory item, as far as the decision needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub memory_type: MemoryType,
    pub scope: MemoryScope,
    /// The person it is about, if any.
    pub subject: Option<SubjectHandle>,
    /// Proposed by a run that acts for a caller from outside the namespace (an A2A task): kept
    /// in the Agent's or the tenant's scope, what it says would be recalled by every other
    /// caller's runs (a caller could plant instructions there, or read back what an earlier
    /// caller left), so it waits for a person's review whatever `review` says.
    pub outside_caller: bool,
}

/// What becomes of a candidate, with the reason that goes on record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Promotion {
    Promote { reason: String },
    Hold { reason: String },
    Drop { reason: String },
}

impl MemoryPolicy {
    /// Decides a candidate whose text was classified as `found`, against the consents in force
    /// at `now_ms`.
    pub fn decide(
        &self,
        candidate: &Candidate,
        found: &Classification,
        consents: &ConsentLedger,
        now_ms: i64,
    ) -> Promotion {
        match self.admit(candidate, found, consents, now_ms) {
            Ok(consented) => self.reviewed(candidate, consented),
            Err(decided) => decided,
        }
    }

    /// Whether the policy and the consents in force let the candidate be kept, before anyone
    /// reviews it: why (`Ok`), or what becomes of it instead (dropped, or held for a consent).
    pub fn admit(
        &self,
        candidate: &Candidate,
        found: &Classification,
        consents: &ConsentLedger,
        now_ms: i64,
    ) -> Result<String, Promotion> {
        let (kind, scope) = (candidate.memory_type, candidate.scope);
        if !self.keeps.contains(&(kind, scope)) {
            return Err(Promotion::Drop {
                reason: format!(
                    "the memory policy of agent {} keeps no {} items in {} scope",
                    self.agent,
                    name(&kind),
                    name(&scope)
                ),
            });
        }
        if scope == MemoryScope::Subject && candidate.subject.is_none() {
            return Err(Promotion::Drop {
                reason: "a subject-scoped item names no subject".into(),
            });
        }
        // What a run about a person learns is about them until someone decides otherwise: kept
        // elsewhere, it would outlive their erasure.
        if let Some(subject) = &candidate.subject
            && scope != MemoryScope::Subject
            && self.from_subject_runs == FromSubjectRuns::SubjectOnly
        {
            return Err(Promotion::Drop {
                reason: format!(
                    "this run is about subject {subject}: what it learns is kept only in their scope, where it is erased with them (the Agent's spec.memory.fromSubjectRuns is subjectOnly; allScopes keeps {} items in {} scope, not erased with them)",
                    name(&kind),
                    name(&scope)
                ),
            });
        }
        let categories = found.categories();
        let consented = if categories.is_empty() {
            match (scope, &candidate.subject) {
                // Nothing the detectors know, but about a person all the same ("prefers calls
                // after 6pm"): kept only while they consent to anything for the purpose — as
                // recall offers it only then.
                (MemoryScope::Subject, Some(subject)) => {
                    if consents.in_force(subject, &self.purpose, now_ms).is_empty() {
                        let reason = format!(
                            "is about subject {subject}, who has no consent for purpose {} in force now",
                            self.purpose
                        );
                        return Err(match self.without_consent {
                            WithoutConsent::Drop => Promotion::Drop { reason },
                            WithoutConsent::Hold => Promotion::Hold { reason },
                        });
                    }
                    format!(
                        "holds no personal data the detectors know, and subject {subject} consents for purpose {}",
                        self.purpose
                    )
                }
                _ => "holds no personal data".to_owned(),
            }
        } else {
            // Personal data is kept only as one subject's, under that subject's consent: in an
            // agent's or the tenant's memory it could be anyone's (a third party named in a
            // note), and no one consent could cover it.
            let (MemoryScope::Subject, Some(subject)) = (scope, &candidate.subject) else {
                return Err(Promotion::Drop {
                    reason: format!(
                        "holds personal data ({}) in {} scope; only subject-scoped items, under their subject's consent, may hold personal data",
                        list(&categories),
                        name(&scope)
                    ),
                });
            };
            let missing = consents.uncovered(subject, &self.purpose, &categories, now_ms);
            if !missing.is_empty() {
                let reason = format!(
                    "holds personal data ({}) of subject {subject} that no consent for purpose {} covers now",
                    list(&missing),
                    self.purpose
                );
                return Err(match self.without_consent {
                    WithoutConsent::Drop => Promotion::Drop { reason },
                    WithoutConsent::Hold => Promotion::Hold { reason },
                });
            }
            format!(
                "its personal data ({}) is covered by consent of subject {subject} for purpose {}",
                list(&categories),
                self.purpose
            )
        };
        Ok(consented)
    }

    /// What review does to a candidate the policy and consents let be kept (`consented` says
    /// why): kept at once, or held for a person.
    pub fn reviewed(&self, candidate: &Candidate, consented: String) -> Promotion {
        match self.review {
            _ if candidate.outside_caller && candidate.scope != MemoryScope::Subject => Promotion::Hold {
                reason: format!(
                    "{consented}; the run acts for a caller from outside the namespace, and what it keeps in {} scope is recalled by other callers' runs: a person reviews it first",
                    name(&candidate.scope)
                ),
            },
            Review::Auto => Promotion::Promote { reason: consented },
            Review::Required => Promotion::Hold {
                reason: format!("{consented}; the memory policy requires a person's review"),
            },
        }
    }
}

fn name(value: &impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn list(categories: &BTreeSet<Category>) -> String {
    categories
        .iter()
        .map(Category::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::personal_data::Classifier;

    const HOUR: i64 = 3_600_000;

    fn subject() -> SubjectHandle {
        SubjectHandle::new("subj:7f3a").expect("handle")
    }

    fn purpose() -> Purpose {
        Purpose::new("incident-follow-up").expect("purpose")
    }

    fn record(action: ConsentAction, categories: &[Category], at_ms: i64) -> ConsentRecord {
        ConsentRecord {
            subject: subject(),
            purpose: purpose(),
            action,
            categories: categories.iter().cloned().collect(),
            by: "system:serviceaccount:shop:privacy-desk".into(),
            evidence: "PRIV-1042".into(),
            at_ms,
            expires_at_ms: None,
            request_id: None,
        }
    }

    fn policy(review: Review, without_consent: WithoutConsent) -> MemoryPolicy {
        MemoryPolicy {
            agent: "sre-agent".into(),
            purpose: purpose(),
            keeps: [
                (MemoryType::Fact, MemoryScope::Subject),
                (MemoryType::Procedure, MemoryScope::Agent),
            ]
            .into_iter()
            .collect(),
            review,
            without_consent,
            from_subject_runs: FromSubjectRuns::SubjectOnly,
        }
    }

    fn candidate(memory_type: MemoryType, scope: MemoryScope, subject: Option<SubjectHandle>) -> Candidate {
        Candidate {
            memory_type,
            scope,
            subject,
            outside_caller: false,
        }
    }

    fn classify(text: &str) -> Classification {
        Classifier::built_in().classify(text).expect("classified")
    }

    #[test]
    fn a_revocation_always_counts_and_a_grant_only_if_made_after_it_or_both_are_objects() {
        let email: BTreeSet<Category> = [Category::Email].into_iter().collect();
        let both: BTreeSet<Category> = [Category::Email, Category::Phone].into_iter().collect();
        let grant = record(
            ConsentAction::Grant,
            &[Category::Email, Category::Phone],
            10 * HOUR,
        );
        let revoke_phone = record(ConsentAction::Revoke, &[Category::Phone], 11 * HOUR);
        let revoke_all = record(ConsentAction::Revoke, &[], 12 * HOUR);
        let regrant = record(ConsentAction::Grant, &[Category::Email], 13 * HOUR);
        let revoke_phone_noon = record(ConsentAction::Revoke, &[Category::Phone], 12 * HOUR);
        let grant_phone_early = record(ConsentAction::Grant, &[Category::Phone], 11 * HOUR);
        let revoke_at_grant = record(ConsentAction::Revoke, &[], 10 * HOUR);
        // Two Consent objects in the same second: chained in the order the API server took them.
        let object = |action, categories: &[Category], id: &str| ConsentRecord {
            request_id: Some(format!("object.{id}")),
            ..record(action, categories, 12 * HOUR)
        };
        let object_revoke = object(ConsentAction::Revoke, &[Category::Phone], "1");
        let object_grant = object(ConsentAction::Grant, &[Category::Phone], "2");
        let object_revoke_all = object(ConsentAction::Revoke, &[], "4");
        let object_grant_late = ConsentRecord {
            at_ms: 11 * HOUR,
            ..object(ConsentAction::Grant, &[Category::Phone], "3")
        };
        let cases: Vec<(&str, Vec<&ConsentRecord>, i64, BTreeSet<Category>)> = vec![
            ("no record", vec![], 11 * HOUR, both.clone()),
            ("granted", vec![&grant], 11 * HOUR, BTreeSet::new()),
            ("not yet in force", vec![&grant], 9 * HOUR, both.clone()),
            (
                "one category revoked",
                vec![&grant, &revoke_phone],
                13 * HOUR,
                [Category::Phone].into_iter().collect(),
            ),
            ("all revoked", vec![&grant, &revoke_all], 13 * HOUR, both.clone()),
            // A grant chained late (the store was away) after a revocation made later: the
            // revocation stands.
            (
                "grant appended late",
                vec![&revoke_all, &grant],
                13 * HOUR,
                both.clone(),
            ),
            (
                "a grant appended after a later revocation of one category",
                vec![&revoke_phone, &grant],
                13 * HOUR,
                [Category::Phone].into_iter().collect(),
            ),
            (
                "granted again after all were revoked",
                vec![&grant, &revoke_all, &regrant],
                14 * HOUR,
                [Category::Phone].into_iter().collect(),
            ),
            (
                "a category first named after all were revoked, granted earlier",
                vec![&revoke_all, &grant_phone_early],
                13 * HOUR,
                both.clone(),
            ),
            (
                "granted and revoked in the same millisecond",
                vec![&revoke_at_grant, &grant],
                11 * HOUR,
                both.clone(),
            ),
            (
                "revoked through a replica whose clock is behind the grant's",
                vec![&regrant, &revoke_all],
                14 * HOUR,
                both.clone(),
            ),
            (
                "objects revoking then granting in the same second",
                vec![&object_revoke, &object_grant],
                13 * HOUR,
                [Category::Email].into_iter().collect(),
            ),
            (
                "an object granting chained late after a revocation through the gateway",
                vec![&revoke_phone_noon, &object_grant_late],
                13 * HOUR,
                [Category::Email, Category::Phone].into_iter().collect(),
            ),
            (
                "objects: a blanket revocation, then a grant of a category not named before",
                vec![&object_revoke_all, &object_grant],
                13 * HOUR,
                [Category::Email].into_iter().collect(),
            ),
            (
                "an object granting in the second of a blanket revocation through the gateway",
                vec![&revoke_all, &object_grant],
                13 * HOUR,
                both.clone(),
            ),
            (
                "a grant through the gateway after an object's blanket revocation",
                vec![&object_revoke_all, &regrant],
                14 * HOUR,
                [Category::Phone].into_iter().collect(),
            ),
            (
                "renewed in the same millisecond",
                vec![&grant, &grant],
                11 * HOUR,
                BTreeSet::new(),
            ),
        ];
        for (label, records, now, missing) in cases {
            let ledger = ConsentLedger::from_records(records);
            assert_eq!(
                ledger.uncovered(&subject(), &purpose(), &both, now),
                missing,
                "{label}"
            );
        }
        let mut expiring = record(ConsentAction::Grant, &[Category::Email], 10 * HOUR);
        expiring.expires_at_ms = Some(12 * HOUR);
        let ledger = ConsentLedger::from_records([&expiring]);
        assert!(
            ledger
                .uncovered(&subject(), &purpose(), &email, 11 * HOUR)
                .is_empty()
        );
        assert_eq!(ledger.uncovered(&subject(), &purpose(), &email, 12 * HOUR), email);
        let other = Purpose::new("marketing").expect("purpose");
        assert_eq!(ledger.uncovered(&subject(), &other, &email, 11 * HOUR), email);
    }

    #[test]
    fn a_candidate_is_promoted_held_or_dropped_for_a_reason_that_names_what_decided_it() {
        let pii = classify("reach jane.doe@example.com on +44 20 7946 0958");
        let plain = classify("restart the checkout deployment before scaling it");
        let granted = ConsentLedger::from_records([&record(
            ConsentAction::Grant,
            &[Category::Email, Category::Phone],
            0,
        )]);
        let email_only = ConsentLedger::from_records([&record(ConsentAction::Grant, &[Category::Email], 0)]);
        let revoked = ConsentLedger::from_records([
            &record(ConsentAction::Grant, &[Category::Email, Category::Phone], 0),
            &record(ConsentAction::Revoke, &[], HOUR),
        ]);
        let none = ConsentLedger::default();
        let fact = |s| candidate(MemoryType::Fact, MemoryScope::Subject, s);
        let auto = policy(Review::Auto, WithoutConsent::Drop);
        type Case<'a> = (
            &'a str,
            &'a MemoryPolicy,
            Candidate,
            &'a Classification,
            &'a ConsentLedger,
            &'a str,
            &'a str,
        );
        let holding = policy(Review::Auto, WithoutConsent::Hold);
        let reviewed = policy(Review::Required, WithoutConsent::Drop);
        let all_scopes = MemoryPolicy {
            from_subject_runs: FromSubjectRuns::AllScopes,
            ..policy(Review::Auto, WithoutConsent::Drop)
        };
        let cases: Vec<Case> = vec![
            (
                "consented",
                &auto,
                fact(Some(subject())),
                &pii,
                &granted,
                "promote",
                "covered by consent of subject subj:7f3a",
            ),
            (
                "no consent",
                &auto,
                fact(Some(subject())),
                &pii,
                &none,
                "drop",
                "(email, phone) of subject subj:7f3a that no consent",
            ),
            (
                "partly consented",
                &auto,
                fact(Some(subject())),
                &pii,
                &email_only,
                "drop",
                "personal data (phone)",
            ),
            (
                "revoked",
                &auto,
                fact(Some(subject())),
                &pii,
                &revoked,
                "drop",
                "no consent for purpose incident-follow-up",
            ),
            (
                "held for consent",
                &holding,
                fact(Some(subject())),
                &pii,
                &none,
                "hold",
                "no consent",
            ),
            (
                "no subject",
                &auto,
                candidate(MemoryType::Procedure, MemoryScope::Agent, None),
                &pii,
                &granted,
                "drop",
                "in agent scope; only subject-scoped items",
            ),
            (
                "a subject's consent in agent scope",
                &auto,
                candidate(MemoryType::Procedure, MemoryScope::Agent, Some(subject())),
                &pii,
                &granted,
                "drop",
                "in agent scope",
            ),
            (
                "a subject's run learning for the agent",
                &auto,
                candidate(MemoryType::Procedure, MemoryScope::Agent, Some(subject())),
                &plain,
                &granted,
                "drop",
                "this run is about subject subj:7f3a: what it learns is kept only in their scope",
            ),
            (
                "a subject's run learning for the agent, all scopes allowed",
                &all_scopes,
                candidate(MemoryType::Procedure, MemoryScope::Agent, Some(subject())),
                &plain,
                &none,
                "promote",
                "holds no personal data",
            ),
            (
                "a subject's run, personal data for the agent, all scopes allowed",
                &all_scopes,
                candidate(MemoryType::Procedure, MemoryScope::Agent, Some(subject())),
                &pii,
                &granted,
                "drop",
                "only subject-scoped items, under their subject's consent, may hold personal data",
            ),
            (
                "not personal",
                &auto,
                candidate(MemoryType::Procedure, MemoryScope::Agent, None),
                &plain,
                &none,
                "promote",
                "holds no personal data",
            ),
            (
                "type not kept",
                &auto,
                candidate(MemoryType::Episode, MemoryScope::Tenant, None),
                &plain,
                &none,
                "drop",
                "keeps no episode items in tenant scope",
            ),
            (
                "subject scope without subject",
                &auto,
                fact(None),
                &plain,
                &none,
                "drop",
                "names no subject",
            ),
            (
                "about a subject, nothing detected, no consent",
                &auto,
                fact(Some(subject())),
                &plain,
                &none,
                "drop",
                "has no consent for purpose incident-follow-up in force",
            ),
            (
                "about a subject, nothing detected, after revoking everything",
                &auto,
                fact(Some(subject())),
                &plain,
                &revoked,
                "drop",
                "has no consent",
            ),
            (
                "about a subject, nothing detected, some consent",
                &auto,
                fact(Some(subject())),
                &plain,
                &email_only,
                "promote",
                "subject subj:7f3a consents for purpose incident-follow-up",
            ),
            (
                "review required",
                &reviewed,
                fact(Some(subject())),
                &pii,
                &granted,
                "hold",
                "requires a person's review",
            ),
            (
                "shared memory, for a caller from outside",
                &auto,
                Candidate {
                    outside_caller: true,
                    ..candidate(MemoryType::Procedure, MemoryScope::Agent, None)
                },
                &plain,
                &none,
                "hold",
                "acts for a caller from outside the namespace",
            ),
            (
                "the subject's own memory, for a caller from outside",
                &auto,
                Candidate {
                    outside_caller: true,
                    ..fact(Some(subject()))
                },
                &pii,
                &granted,
                "promote",
                "covered by consent",
            ),
            (
                "what is dropped stays dropped, for a caller from outside",
                &auto,
                Candidate {
                    outside_caller: true,
                    ..candidate(MemoryType::Procedure, MemoryScope::Agent, None)
                },
                &pii,
                &none,
                "drop",
                "holds personal data",
            ),
        ];
        for (label, policy, candidate, found, consents, outcome, says) in cases {
            let decided = policy.decide(&candidate, found, consents, 2 * HOUR);
            let (got, reason) = match &decided {
                Promotion::Promote { reason } => ("promote", reason),
                Promotion::Hold { reason } => ("hold", reason),
                Promotion::Drop { reason } => ("drop", reason),
            };
            assert_eq!(got, outcome, "{label}: {decided:?}");
            assert!(reason.contains(says), "{label}: {reason:?} does not say {says:?}");
        }
    }

    #[test]
    fn records_that_could_not_be_honoured_are_refused_before_they_are_appended() {
        let ok = record(ConsentAction::Grant, &[Category::Email], HOUR);
        assert_eq!(ok.validate(), Ok(()));
        let with = |change: fn(&mut ConsentRecord)| {
            let mut r = ok.clone();
            change(&mut r);
            r.validate().expect_err("refused").to_string()
        };
        assert!(with(|r| r.categories.clear()).contains("names none"));
        assert!(with(|r| r.evidence.clear()).contains("evidence"));
        assert!(with(|r| r.expires_at_ms = Some(HOUR)).contains("expires"));
        assert!(with(|r| r.by = " ".into()).contains("by must be"));
        assert!(with(|r| r.evidence = "x".repeat(MAX_TEXT_FIELD + 1)).contains("at most 512"));
        assert!(
            with(|r| {
                r.action = ConsentAction::Revoke;
                r.expires_at_ms = Some(2 * HOUR);
            })
            .contains("does not expire")
        );
        let mut revoke_all = record(ConsentAction::Revoke, &[], HOUR);
        revoke_all.evidence.clear();
        assert_eq!(revoke_all.validate(), Ok(()), "a revocation needs no evidence");
        assert!(SubjectHandle::new("Jane Doe").is_err());
        assert!(
            SubjectHandle::new("jane@example.com").is_err(),
            "a raw e-mail is not a handle"
        );
        assert!(Purpose::new("Marketing!").is_err());
        let json = r#"{"subject":"subj:1","purpose":"p","action":"grant","categories":["email","blood-type"],"by":"x","evidence":"t","atMs":1}"#;
        let error = serde_json::from_str::<ConsentRecord>(json)
            .expect_err("unknown category")
            .to_string();
        assert!(
            error.contains("unknown personal-data category \"blood-type\""),
            "{error}"
        );
    }
}
