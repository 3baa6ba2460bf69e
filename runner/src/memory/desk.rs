//! The memory desk: what a run does with memory, in one place for both places a run's effects
//! are carried out (the gateway service in a cluster, the run's own process locally) — the
//! candidate stage of a `remember` call and the recall of a ContextPack's memory sources or of a
//! `recall` call. Every scope is taken from the run's signed RunContext (its agent, its subject),
//! never from what the model or the runner asks for, and consent is read fresh for every
//! decision.

use std::{
    collections::BTreeSet,
    sync::{Arc, OnceLock},
};

use contextos_crds::{
    agent::{AgentMemory, MemoryOperation},
    context_pack::MemorySource,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    EvidenceHandle, Exclusion, ItemId, ItemScope, MAX_TEXT, MemoryError, MemoryItem, MemoryScope, MemoryType,
    Provenance, RecallQuery, admit,
    backend::MemoryBackend,
    bank::{Kept, MemoryBank},
    consents::ConsentBook,
    held::HeldCandidates,
};
use crate::{
    consent::{Candidate, ConsentLedger, MemoryPolicy, Promotion, Purpose},
    keys::PublicKey,
    ontology::{EntityRef, Ontology},
    personal_data::{Category, Classifier, TenantPattern},
    records::{Hash, TenantId},
    run_context::RunContext,
};

/// Milliseconds in a day (`retainDays`).
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// One agent's memory rules, and the key its tenant's consent heads are signed with.
#[derive(Clone, Debug)]
pub struct MemoryDesk {
    policy: Option<MemoryPolicy>,
    retain_ms: Option<i64>,
    consent_key: PublicKey,
    /// The built-in detectors and the agent's own patterns.
    classifier: Arc<Classifier>,
    /// The tenant's entity types: found in what is kept, filtered on in recalls.
    ontology: Arc<Ontology>,
    /// The run acts for a caller from outside the namespace (see [`Candidate::outside_caller`]).
    outside_caller: bool,
}

/// What a recall asks for, before it is bound to a run's scopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecallAsk {
    pub scope: MemoryScope,
    pub memory_type: Option<MemoryType>,
    pub query: String,
    pub max_items: usize,
    /// Only items referring to an entity of this type of the tenant's Ontology.
    pub entity_type: Option<String>,
}

impl From<&MemorySource> for RecallAsk {
    fn from(source: &MemorySource) -> Self {
        Self {
            scope: source.scope,
            memory_type: source.memory_type,
            query: source.query.clone().unwrap_or_default(),
            max_items: source.max_items as usize,
            entity_type: source.entity_type.clone(),
        }
    }
}

/// What a recall is for: a ContextPack memory source (by name) or a `recall` call (by id).
#[derive(Clone, Copy, Debug)]
pub enum RecallFor<'a> {
    Source(&'a str),
    Call(&'a str),
}

/// A recall as the run's record keeps it: what was asked, which items were offered (by id) and
/// which were held back and why, the consent head it was checked against, and the text the run
/// was given — so a resumed or replayed run compiles the very same context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecallRecord {
    /// The ContextPack memory source recalled for (when the run started) …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// … or the `recall` call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// The scope read; none when nothing could be (see `note`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ItemScope>,
    // Not `type`: entries are tagged by their `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_type: Option<MemoryType>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query: String,
    /// The scope and the most items asked for (what a replay checks a candidate pack against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked_scope: Option<MemoryScope>,
    #[serde(default)]
    pub max_items: usize,
    /// The entity type asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_type: Option<String>,
    pub offered: Vec<ItemId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<Exclusion>,
    #[serde(default)]
    pub excluded_total: usize,
    /// The subject's consent chain head the recall was checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_head: Option<Hash>,
    /// Why nothing was read, when nothing could be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What the run was given.
    pub content: String,
}

impl RecallRecord {
    /// Whether this recall answered `ask` (a replay offers a recorded recall only to the same
    /// question).
    pub fn answers(&self, ask: &RecallAsk) -> bool {
        self.asked_scope == Some(ask.scope)
            && self.memory_type == ask.memory_type
            && self.query == ask.query
            && self.max_items == ask.max_items
            && self.entity_type == ask.entity_type
    }
}

/// A `remember` call's candidate as the record keeps it: what was proposed (not its text, which
/// the call's own entry holds), the personal data found in it, the decision and its reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CandidateRecord {
    pub call_id: String,
    pub memory_type: MemoryType,
    pub scope: MemoryScope,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub categories: BTreeSet<Category>,
    pub decision: Promotion,
    /// The item it became (or had become, for a retried call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<ItemId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_head: Option<Hash>,
}

impl CandidateRecord {
    /// What the model is told.
    pub fn answer(&self) -> Value {
        let (outcome, reason) = match &self.decision {
            Promotion::Promote { reason } => ("kept", reason),
            Promotion::Hold { reason } => ("held", reason),
            Promotion::Drop { reason } => ("dropped", reason),
        };
        json!({ "outcome": outcome, "reason": reason, "item": self.item })
    }
}

/// The arguments of a `remember` call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RememberArgs {
    text: String,
    #[serde(rename = "type")]
    memory_type: MemoryType,
    scope: MemoryScope,
    #[serde(default)]
    entities: Vec<NamedEntity>,
}

/// An entity a `remember` call names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedEntity {
    #[serde(rename = "type")]
    entity_type: String,
    id: String,
}

/// The most entities a `remember` call names (more may be found in its text).
const MAX_NAMED_ENTITIES: usize = 16;

/// The arguments of a `recall` call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RecallArgs {
    #[serde(default)]
    query: String,
    #[serde(default, rename = "type")]
    memory_type: Option<MemoryType>,
    scope: MemoryScope,
    #[serde(default = "default_recall_items")]
    max_items: usize,
    #[serde(default)]
    entity_type: Option<String>,
}

fn default_recall_items() -> usize {
    10
}

/// The JSON Schema of a memory tool's arguments: what the model is offered and the gateway
/// checks every call against (an Agent cannot declare its own).
pub fn tool_schema(operation: MemoryOperation) -> Value {
    let types = json!(["fact", "preference", "procedure", "episode"]);
    let scopes = json!(["agent", "subject", "tenant"]);
    match operation {
        MemoryOperation::Remember => json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["text", "type", "scope"],
            "properties": {
                "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT,
                         "description": "What to remember, in one or two sentences."},
                "type": {"enum": types},
                "scope": {"enum": scopes,
                          "description": "subject: about the person this session is for; agent: for this agent; tenant: for every agent here."},
                "entities": {"type": "array", "maxItems": MAX_NAMED_ENTITIES,
                             "description": "Entities it is about, by type and id (ids the tenant's id patterns find in the text are added).",
                             "items": {"type": "object", "additionalProperties": false, "required": ["type", "id"],
                                       "properties": {"type": {"type": "string", "maxLength": 63},
                                                      "id": {"type": "string", "minLength": 1, "maxLength": crate::ontology::MAX_ID_BYTES}}}}
            }
        }),
        MemoryOperation::Recall => json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["scope"],
            "properties": {
                "query": {"type": "string", "maxLength": 512,
                          "description": "Words every item must contain; empty for the newest."},
                "type": {"enum": types},
                "scope": {"enum": scopes},
                "maxItems": {"type": "integer", "minimum": 1, "maximum": super::MAX_RECALL_ITEMS},
                "entityType": {"type": "string", "maxLength": 63,
                               "description": "Only items about an entity of this type (service, incident, …)."}
            }
        }),
    }
}

/// Why a ContextPack's memory sources cannot be recalled, naming the field: a query must hold
/// a word the index keeps (two characters or more) and at most a few words.
pub fn source_problem(pack: &contextos_crds::ContextPackSpec) -> Option<String> {
    pack.sources.iter().enumerate().find_map(|(i, source)| {
        let query = source.memory.as_ref()?.query.as_deref()?;
        match super::terms::query_terms(query) {
            Err(why) => Some(format!("spec.sources[{i}].memory.query: {why}")),
            Ok(terms) if terms.is_empty() => Some(format!(
                "spec.sources[{i}].memory.query: {query:?} has no word of two characters or more; name the words every recalled item must hold, or remove the query for the newest items"
            )),
            Ok(_) => None,
        }
    })
}

/// Why an Agent's memory settings cannot run, naming the field and the fix: a memory tool
/// needs the Agent's `spec.memory` (without it nothing could be kept or told apart by purpose).
pub fn memory_problem(spec: &contextos_crds::AgentSpec) -> Option<String> {
    if let Some(memory) = &spec.memory
        && let Err(e) = rules("agent", memory)
    {
        return Some(e);
    }
    if spec.memory.is_some() {
        return None;
    }
    spec.tools.iter().enumerate().find_map(|(i, tool)| {
        tool.adapter.memory.map(|_| {
            format!(
                "spec.tools[{i}].adapter.memory ({}): the Agent has no spec.memory; add spec.memory with the purpose its memory is kept for and the types and scopes it may keep",
                tool.name
            )
        })
    })
}

/// An Agent's memory policy and the detectors its candidates are classified with, or what is
/// wrong with its `spec.memory` (naming the field).
fn rules(agent: &str, spec: &AgentMemory) -> Result<(MemoryPolicy, Arc<Classifier>), String> {
    let purpose = Purpose::new(&spec.purpose).map_err(|e| format!("spec.memory.purpose: {e}"))?;
    let policy = MemoryPolicy {
        agent: agent.to_owned(),
        purpose,
        keeps: spec.keep.iter().map(|k| (k.memory_type, k.scope)).collect(),
        review: spec.review,
        without_consent: spec.without_consent,
        from_subject_runs: spec.from_subject_runs,
    };
    let classifier = if spec.patterns.is_empty() {
        built_in()
    } else {
        let patterns: Vec<TenantPattern> = spec
            .patterns
            .iter()
            .map(|p| TenantPattern {
                name: p.name.clone(),
                regex: p.regex.clone(),
            })
            .collect();
        Arc::new(Classifier::with_patterns(&patterns).map_err(|e| format!("spec.memory.patterns: {e}"))?)
    };
    Ok((policy, classifier))
}

/// The built-in detectors, compiled once for every desk without patterns of its own.
fn built_in() -> Arc<Classifier> {
    static BUILT_IN: OnceLock<Arc<Classifier>> = OnceLock::new();
    BUILT_IN.get_or_init(|| Arc::new(Classifier::built_in())).clone()
}

impl MemoryDesk {
    /// The desk of agent `agent` with memory rules `spec` (none: it keeps nothing); consent
    /// heads are verified against `consent_key`.
    pub fn new(agent: &str, spec: Option<&AgentMemory>, consent_key: PublicKey) -> Result<Self, String> {
        let (policy, classifier) = match spec {
            Some(spec) => {
                let (policy, classifier) = rules(agent, spec)?;
                (Some(policy), classifier)
            }
            None => (None, built_in()),
        };
        Ok(Self {
            policy,
            retain_ms: spec.and_then(|s| s.retain_days).map(|d| i64::from(d) * DAY_MS),
            consent_key,
            classifier,
            ontology: Arc::default(),
            outside_caller: false,
        })
    }

    /// The same rules, for a run that acts for a caller from outside the namespace (an A2A
    /// task) when `outside` (see [`Candidate::outside_caller`]).
    pub fn for_outside_caller(mut self, outside: bool) -> Self {
        self.outside_caller = outside;
        self
    }

    /// The same rules, with entities found and filtered on by `ontology` (the tenant's).
    pub fn with_ontology(mut self, ontology: Arc<Ontology>) -> Self {
        self.ontology = ontology;
        self
    }

    /// The same rules, with consent heads verified against `key`.
    pub fn with_consent_key(mut self, key: PublicKey) -> Self {
        self.consent_key = key;
        self
    }

    fn purpose(&self) -> Option<&Purpose> {
        self.policy.as_ref().map(|p| &p.purpose)
    }

    /// The scope `scope` means for `run`: its own agent, its own subject, or its tenant.
    fn bind(run: &RunContext, scope: MemoryScope) -> Option<ItemScope> {
        match scope {
            MemoryScope::Agent => Some(ItemScope::Agent(run.agent.name.clone())),
            MemoryScope::Subject => run.subject.clone().map(ItemScope::Subject),
            MemoryScope::Tenant => Some(ItemScope::Tenant),
        }
    }

    /// The consents of the scope's subject in force, read now, and their chain's head.
    async fn consents<S: MemoryBackend>(
        &self,
        store: &S,
        tenant: &TenantId,
        scope: &ItemScope,
    ) -> Result<(ConsentLedger, Option<Hash>), MemoryError> {
        match scope.subject() {
            Some(subject) => {
                let history = ConsentBook::new(store, tenant)
                    .history(subject, &self.consent_key)
                    .await?;
                Ok((history.ledger(), history.head_hash()))
            }
            None => Ok((ConsentLedger::default(), None)),
        }
    }

    /// Recalls for `run` what `ask` names, for `purpose` (a pack source or a call), checked at
    /// `now_ms`.
    pub async fn recall<S: MemoryBackend>(
        &self,
        store: &S,
        run: &RunContext,
        purpose: RecallFor<'_>,
        ask: &RecallAsk,
        now_ms: i64,
    ) -> Result<RecallRecord, MemoryError> {
        let (source, call_id) = match purpose {
            RecallFor::Source(name) => (Some(name.to_owned()), None),
            RecallFor::Call(id) => (None, Some(id.to_owned())),
        };
        let mut record = RecallRecord {
            source,
            call_id,
            scope: None,
            memory_type: ask.memory_type,
            query: ask.query.clone(),
            asked_scope: Some(ask.scope),
            max_items: ask.max_items,
            entity_type: ask.entity_type.clone(),
            offered: Vec::new(),
            excluded: Vec::new(),
            excluded_total: 0,
            consent_head: None,
            note: None,
            content: String::new(),
        };
        let Some(scope) = Self::bind(run, ask.scope) else {
            record.note =
                Some("the Session names no subject (spec.subject), so no subject's memory is read".into());
            return Ok(record);
        };
        let entity_type = match ask.entity_type.as_deref().map(|t| self.ontology.entity_type(t)) {
            None => None,
            Some(Ok(known)) => Some(known),
            // Said on record, and nothing offered (the operator refuses such a pack source).
            // A call's is refused (the model may ask again) and never recorded: what is on
            // record is always a type the tenant declares, never a word the model made up.
            Some(Err(why)) if matches!(purpose, RecallFor::Call(_)) => {
                return Err(MemoryError::BadQuery(format!("entityType: {why}")));
            }
            // A pack source's is said on record, and nothing offered (the operator refuses
            // such a source).
            Some(Err(why)) => {
                record.note = Some(format!("entityType: {why}"));
                record.scope = Some(scope);
                return Ok(record);
            }
        };
        let tenant = TenantId::new(run.tenant_id.clone())?;
        let (ledger, head) = self.consents(store, &tenant, &scope).await?;
        let purpose = self.purpose().cloned();
        let query = RecallQuery {
            scope: scope.clone(),
            memory_type: ask.memory_type,
            text: ask.query.clone(),
            max_items: ask.max_items,
            purpose: purpose.clone(),
            entity_type,
        };
        let recalled = match MemoryBank::new(store, &tenant)
            .recall(&query, |item| self.admit(item, purpose.as_ref(), &ledger, now_ms))
            .await
        {
            Ok(recalled) => recalled,
            // Said on record, and nothing offered: a query the index cannot answer does not end
            // the run (admission and the operator refuse such a source in a ContextPack).
            Err(MemoryError::BadQuery(why)) => {
                record.note = Some(why);
                record.scope = Some(scope);
                return Ok(record);
            }
            Err(e) => return Err(e),
        };
        record.content = render(&recalled.offered);
        record.offered = recalled.offered.into_iter().map(|(id, _)| id).collect();
        record.excluded = recalled.excluded;
        record.excluded_total = recalled.excluded_total;
        record.consent_head = head;
        record.scope = Some(scope);
        Ok(record)
    }

    /// Whether `item` may be offered to this agent's run now: [`admit`], with the item read
    /// again by this agent's detectors (an item kept by an agent without the tenant's pattern
    /// for badge numbers still holds badge numbers; a consent revoked for them counts) and under
    /// the Agent's retention as it is now (a lowered `retainDays` applies to what was kept before).
    fn admit(
        &self,
        item: &MemoryItem,
        purpose: Option<&Purpose>,
        consents: &ConsentLedger,
        now_ms: i64,
    ) -> Result<(), String> {
        if let Some(retain) = self.retain_ms
            && item.provenance.at_ms.saturating_add(retain) <= now_ms
        {
            return Err("it is older than the Agent's memory.retainDays".into());
        }
        let mut said = item.text.clone();
        for entity in &item.entities {
            said.push('\n');
            said.push_str(&entity.id);
        }
        let found = self
            .classifier
            .classify(&said)
            .map(|c| c.categories())
            .unwrap_or_default();
        if found.is_subset(&item.categories) {
            return admit(item, purpose, consents, now_ms);
        }
        let mut seen = item.clone();
        seen.categories.extend(found);
        admit(&seen, purpose, consents, now_ms)
    }

    /// A `recall` call's arguments as an ask.
    pub fn recall_ask(arguments: &Value) -> Result<RecallAsk, MemoryError> {
        let args: RecallArgs = serde_json::from_value(arguments.clone())
            .map_err(|e| MemoryError::BadQuery(format!("arguments: {e}")))?;
        Ok(RecallAsk {
            scope: args.scope,
            memory_type: args.memory_type,
            query: args.query,
            max_items: args.max_items,
            entity_type: args.entity_type,
        })
    }

    /// The entities a `remember` call's item refers to: those it names (of the tenant's types,
    /// ids as their pattern says) and those the patterns find in its text.
    fn entities_of(&self, args: &RememberArgs) -> Result<BTreeSet<EntityRef>, MemoryError> {
        if args.entities.len() > MAX_NAMED_ENTITIES {
            return Err(MemoryError::Invalid(format!(
                "entities: {} named, more than {MAX_NAMED_ENTITIES}",
                args.entities.len()
            )));
        }
        let mut entities = BTreeSet::new();
        for (i, named) in args.entities.iter().enumerate() {
            let entity = self
                .ontology
                .named(&named.entity_type, &named.id)
                .map_err(|why| MemoryError::Invalid(format!("entities[{i}]: {why}")))?;
            entities.insert(entity);
        }
        let room = crate::ontology::MAX_ENTITIES - entities.len();
        entities.extend(self.ontology.in_text(&args.text, room));
        Ok(entities)
    }

    /// The candidate stage of `run`'s `remember` call `call_id`: the proposal is classified for
    /// personal data, decided by the agent's memory policy against the subject's consents in
    /// force at `at_ms`, and kept if promoted — once: what is kept already (a call retried after
    /// a crash, a fact learned again) is not kept twice. `evidence` is the record entry the call
    /// was made after.
    pub async fn remember<S: MemoryBackend>(
        &self,
        store: &S,
        run: &RunContext,
        call_id: &str,
        evidence: Option<EvidenceHandle>,
        at_ms: i64,
        arguments: &Value,
    ) -> Result<CandidateRecord, MemoryError> {
        let args: RememberArgs = serde_json::from_value(arguments.clone())
            .map_err(|e| MemoryError::Invalid(format!("arguments: {e}")))?;
        let Some(policy) = &self.policy else {
            return Err(MemoryError::Invalid(format!(
                "agent {} has no spec.memory, so it keeps nothing",
                run.agent.name
            )));
        };
        // The ids it names are kept with it: classified with its text (an e-mail address named
        // as a customer's id is personal data like one in the text).
        let mut classified = args.text.clone();
        for named in &args.entities {
            classified.push('\n');
            classified.push_str(&named.id);
        }
        let found = self
            .classifier
            .classify(&classified)
            .map_err(|e| MemoryError::Invalid(format!("text: {e}")))?;
        let entities = self.entities_of(&args)?;
        let scope = Self::bind(run, args.scope);
        let mut record = CandidateRecord {
            call_id: call_id.to_owned(),
            memory_type: args.memory_type,
            scope: args.scope,
            categories: found.categories(),
            decision: Promotion::Drop {
                reason: String::new(),
            },
            item: None,
            consent_head: None,
        };
        let tenant = TenantId::new(run.tenant_id.clone())?;
        let (ledger, head) = match &scope {
            Some(scope) => self.consents(store, &tenant, scope).await?,
            None => (ConsentLedger::default(), None),
        };
        record.consent_head = head;
        let candidate = Candidate {
            memory_type: args.memory_type,
            scope: args.scope,
            subject: run.subject.clone(),
            outside_caller: self.outside_caller,
        };
        // Admitted by the policy and the consents in force (else dropped, or held for a
        // consent), then reviewed: only an item held for a person's review is the same as one
        // approved before.
        let admitted = policy.admit(&candidate, &found, &ledger, at_ms);
        record.decision = match &admitted {
            Ok(consented) => policy.reviewed(&candidate, consented.clone()),
            Err(decided) => decided.clone(),
        };
        let (hold, scope) = match (&record.decision, scope) {
            (Promotion::Drop { .. }, _) | (_, None) => return Ok(record),
            (Promotion::Hold { reason }, Some(scope)) => (Some(reason.clone()), scope),
            (Promotion::Promote { .. }, Some(scope)) => (None, scope),
        };
        let subject_scoped = scope.subject().is_some();
        let item = MemoryItem {
            scope,
            memory_type: args.memory_type,
            text: args.text,
            categories: record.categories.clone(),
            purpose: subject_scoped.then(|| policy.purpose.clone()),
            provenance: Provenance {
                run_id: run.run_id.clone(),
                evidence: evidence.into_iter().collect(),
                at_ms,
                context_pack: run.pinned.context_pack.clone(),
                policies: run.pinned.policies.clone(),
                reviewed_by: None,
            },
            expires_at_ms: self.retain_ms.map(|r| at_ms.saturating_add(r)),
            entities,
        };
        let bank = MemoryBank::new(store, &tenant);
        record.item = Some(match hold {
            Some(_)
                if admitted.is_ok()
                    && let Some(kept) = bank.kept_already(&item, at_ms).await? =>
            {
                // Approved before, and consented to now: nothing is held again.
                record.decision = Promotion::Promote {
                    reason: format!("the same item is kept already ({kept})"),
                };
                kept
            }
            // Held for a person (or a consent), never recalled meanwhile.
            Some(reason) => {
                HeldCandidates::new(store, &tenant)
                    .hold(&item, &reason, at_ms)
                    .await?
            }
            None => match bank.keep_new(&item, at_ms).await? {
                Kept::New(id) | Kept::AlreadyKept(id) => id,
            },
        });
        Ok(record)
    }
}

/// The text a run is given for recalled items: one line each, newest first.
pub fn render(items: &[(ItemId, MemoryItem)]) -> String {
    let mut out = String::new();
    for (_, item) in items {
        let kind = super::remote::type_name(item.memory_type);
        // One item per line: its own line breaks would make it read as several.
        let text = item.text.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push_str(&format!("- ({kind}) {text}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{EntryBody, RecordEntry};

    /// What a `remember` call keeps is about the entities it names and those found in its text;
    /// a name the Ontology does not know is refused, and recalls filter on the types.
    #[tokio::test]
    async fn kept_items_refer_to_the_tenants_entities_and_recall_filters_on_them() {
        use contextos_crds::agent::{AgentMemory, MemoryKeep};

        use crate::{keys::KeyPair, records::store::scratch::ScratchStore};
        let store = ScratchStore::default();
        let spec = AgentMemory {
            purpose: "operations".into(),
            keep: vec![MemoryKeep {
                memory_type: MemoryType::Fact,
                scope: MemoryScope::Agent,
            }],
            retain_days: None,
            review: Default::default(),
            without_consent: Default::default(),
            from_subject_runs: Default::default(),
            patterns: Vec::new(),
        };
        let ontology: contextos_crds::OntologySpec = serde_yaml::from_str(
            "entityTypes: [{name: incident, idPattern: 'INC-[0-9]{3,8}'}, {name: service}]",
        )
        .expect("ontology");
        let desk = MemoryDesk::new("sre-agent", Some(&spec), KeyPair::from_seed([4; 32]).public())
            .expect("desk")
            .with_ontology(Arc::new(Ontology::compile(&ontology).expect("compiles")));
        let mut run = crate::run_context::tests::context("shop");
        run.pinned.context_pack = "sha256:pack".into();
        let remember = |args: Value| {
            let (desk, store, run) = (&desk, &store, &run);
            async move { desk.remember(store, run, "1.0", None, 1_000, &args).await }
        };
        let kept = remember(json!({
            "text": "INC-4242 came from a checkout deploy", "type": "fact", "scope": "agent",
            "entities": [{"type": "service", "id": "checkout"}]
        }))
        .await
        .expect("decided");
        let id = kept.item.expect("kept");
        // Personal data named as an id is personal data: not kept in the agent's memory.
        let smuggled = remember(json!({
            "text": "a note", "type": "fact", "scope": "agent",
            "entities": [{"type": "service", "id": "jane.doe@example.com"}]
        }))
        .await
        .expect("decided");
        assert!(
            matches!(&smuggled.decision, Promotion::Drop { reason } if reason.contains("email")),
            "{smuggled:?}"
        );
        remember(json!({"text": "deploys freeze on fridays", "type": "fact", "scope": "agent"}))
            .await
            .expect("decided");
        let bank = MemoryBank::new(&store, &TenantId::new("shop").expect("tenant"));
        let item = bank.get(&id).await.expect("get").expect("item");
        assert_eq!(
            item.entities.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["incident/INC-4242", "service/checkout"]
        );
        for (bad, why) in [
            (
                json!([{"type": "team", "id": "sre"}]),
                "its types: incident, service",
            ),
            (json!([{"type": "incident", "id": "INC-1"}]), "idPattern"),
            (json!([{"type": "incident"}]), "missing field"),
        ] {
            let refused = remember(json!({"text": "x y", "type": "fact", "scope": "agent", "entities": bad}))
                .await
                .expect_err("refused");
            assert!(refused.to_string().contains(why), "{refused}");
        }

        let ask = |entity_type: Option<&str>| RecallAsk {
            scope: MemoryScope::Agent,
            memory_type: None,
            query: String::new(),
            max_items: 10,
            entity_type: entity_type.map(str::to_owned),
        };
        let incidents = desk
            .recall(
                &store,
                &run,
                RecallFor::Source("incidents"),
                &ask(Some("incident")),
                2_000,
            )
            .await
            .expect("recall");
        assert_eq!(incidents.offered, [id]);
        assert!(incidents.answers(&ask(Some("incident"))) && !incidents.answers(&ask(None)));
        let unknown = desk
            .recall(
                &store,
                &run,
                RecallFor::Source("teams"),
                &ask(Some("team")),
                2_000,
            )
            .await
            .expect("recall");
        assert!(unknown.offered.is_empty());
        assert!(
            unknown
                .note
                .as_deref()
                .is_some_and(|n| n.starts_with("entityType:")),
            "{unknown:?}"
        );
        let refused = desk
            .recall(&store, &run, RecallFor::Call("2.0"), &ask(Some("made-up")), 2_000)
            .await
            .expect_err("a call naming an unknown type is refused");
        assert!(matches!(refused, MemoryError::BadQuery(_)), "{refused}");
        let by_call =
            MemoryDesk::recall_ask(&json!({"scope": "agent", "entityType": "incident"})).expect("ask");
        assert_eq!(by_call.entity_type.as_deref(), Some("incident"));
    }

    /// An item kept before under a consent since revoked is not "kept already" when a run
    /// proposes it again: the proposal is held for a consent, and the record says so.
    #[tokio::test]
    async fn after_a_revocation_the_same_item_again_is_held_for_a_consent_not_called_kept() {
        use contextos_crds::agent::{AgentMemory, MemoryKeep, WithoutConsent};

        use crate::{
            consent::ConsentAction, keys::KeyPair, memory::consents::ConsentRequest,
            records::store::scratch::ScratchStore,
        };
        let store = ScratchStore::default();
        let key = KeyPair::from_seed([5; 32]);
        let spec = AgentMemory {
            purpose: "support-history".into(),
            keep: vec![MemoryKeep {
                memory_type: MemoryType::Fact,
                scope: MemoryScope::Subject,
            }],
            retain_days: None,
            review: Default::default(),
            without_consent: WithoutConsent::Hold,
            from_subject_runs: Default::default(),
            patterns: Vec::new(),
        };
        let desk = MemoryDesk::new("support-agent", Some(&spec), key.public()).expect("desk");
        let mut run = crate::run_context::tests::context("shop");
        run.subject = Some(crate::consent::SubjectHandle::new("cust-7").expect("handle"));
        run.pinned.context_pack = "sha256:pack".into();
        let args = json!({"text": "reach them at jane@example.com", "type": "fact", "scope": "subject"});
        let consent = |action, at_ms| {
            ConsentRequest {
                subject: run.subject.clone().expect("subject"),
                purpose: Purpose::new("support-history").expect("purpose"),
                action,
                categories: [Category::Email].into_iter().collect(),
                evidence: "ticket 12".into(),
                expires_at_ms: None,
                request_id: None,
            }
            .into_record("privacy@example.com".into(), at_ms)
        };
        let book = ConsentBook::new(&store, &TenantId::new("shop").expect("tenant"));
        book.append(consent(ConsentAction::Grant, 1_000), &key)
            .await
            .expect("granted");
        let kept = desk
            .remember(&store, &run, "1.0", None, 2_000, &args)
            .await
            .expect("decided");
        assert!(matches!(kept.decision, Promotion::Promote { .. }), "{kept:?}");
        book.append(consent(ConsentAction::Revoke, 3_000), &key)
            .await
            .expect("revoked");
        let again = desk
            .remember(&store, &run, "2.0", None, 4_000, &args)
            .await
            .expect("decided");
        assert!(
            matches!(&again.decision, Promotion::Hold { reason } if reason.contains("no consent")),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn a_tenants_own_kind_of_personal_data_is_kept_only_under_consent_for_it() {
        use contextos_crds::agent::{AgentMemory, MemoryKeep, PersonalDataPattern};

        use crate::{
            consent::ConsentAction, keys::KeyPair, memory::consents::ConsentRequest,
            records::store::scratch::ScratchStore,
        };
        let store = ScratchStore::default();
        let key = KeyPair::from_seed([3; 32]);
        let spec = AgentMemory {
            purpose: "building-access".into(),
            keep: vec![MemoryKeep {
                memory_type: MemoryType::Fact,
                scope: MemoryScope::Subject,
            }],
            retain_days: Some(30),
            review: Default::default(),
            without_consent: Default::default(),
            from_subject_runs: Default::default(),
            patterns: vec![PersonalDataPattern {
                name: "badge".into(),
                regex: r"\bBADGE-[0-9]{6}\b".into(),
            }],
        };
        let desk = MemoryDesk::new("door-agent", Some(&spec), key.public()).expect("desk");
        let mut run = crate::run_context::tests::context("shop");
        run.subject = Some(crate::consent::SubjectHandle::new("emp-42").expect("handle"));
        run.pinned.context_pack = "sha256:pack".into();
        let args = json!({"text": "Uses badge BADGE-123456 at door 4", "type": "fact", "scope": "subject"});
        let grant = |categories: &[Category]| {
            ConsentRequest {
                subject: run.subject.clone().expect("subject"),
                purpose: Purpose::new("building-access").expect("purpose"),
                action: ConsentAction::Grant,
                categories: categories.iter().cloned().collect(),
                evidence: "HR form 7".into(),
                expires_at_ms: None,
                request_id: None,
            }
            .into_record("hr@example.com".into(), 1_000)
        };
        let book = ConsentBook::new(&store, &TenantId::new("shop").expect("tenant"));
        book.append(grant(&[Category::Email]), &key)
            .await
            .expect("granted");
        let badge = Category::Tenant(crate::personal_data::PatternName::new("badge").expect("name"));
        let dropped = desk
            .remember(&store, &run, "1.0", None, 2_000, &args)
            .await
            .expect("decided");
        assert_eq!(dropped.categories, [badge.clone()].into_iter().collect());
        assert!(
            matches!(&dropped.decision, Promotion::Drop { reason } if reason.contains("tenant:badge")),
            "{dropped:?}"
        );
        book.append(grant(&[badge]), &key).await.expect("granted");
        let kept = desk
            .remember(&store, &run, "2.0", None, 3_000, &args)
            .await
            .expect("decided");
        assert!(matches!(kept.decision, Promotion::Promote { .. }), "{kept:?}");
        assert!(kept.item.is_some());

        // What another agent kept without the pattern is read again at recall: a badge number
        // in the tenant's memory is personal data all the same, and is not offered; and what is
        // older than this Agent's retention now is not offered either.
        let tenant = TenantId::new("shop").expect("tenant");
        let bank = MemoryBank::new(&store, &tenant);
        let unscanned = MemoryItem {
            scope: ItemScope::Tenant,
            memory_type: MemoryType::Fact,
            text: "door 4 opens for BADGE-654321".into(),
            categories: Default::default(),
            purpose: None,
            provenance: Provenance {
                run_id: "run-9".into(),
                evidence: Vec::new(),
                at_ms: 2_000,
                context_pack: "sha256:pack".into(),
                policies: Vec::new(),
                reviewed_by: None,
            },
            expires_at_ms: None,
            entities: Default::default(),
        };
        bank.keep(&unscanned).await.expect("kept without the pattern");
        let ask = RecallAsk {
            scope: MemoryScope::Tenant,
            memory_type: None,
            query: String::new(),
            max_items: 10,
            entity_type: None,
        };
        let recalled = desk
            .recall(&store, &run, RecallFor::Source("site"), &ask, 4_000)
            .await
            .expect("recalled");
        assert!(recalled.offered.is_empty(), "{recalled:?}");
        assert!(
            recalled.excluded[0]
                .reason
                .contains("personal data outside a subject's scope")
        );
        let later = 2_000 + 31 * DAY_MS;
        let subject_ask = RecallAsk {
            scope: MemoryScope::Subject,
            ..ask
        };
        let recalled = desk
            .recall(&store, &run, RecallFor::Source("person"), &subject_ask, later)
            .await
            .expect("recalled");
        assert!(recalled.offered.is_empty(), "{recalled:?}");
        assert!(
            recalled
                .excluded
                .iter()
                .all(|e| e.reason.contains("older than the Agent's memory.retainDays")),
            "{recalled:?}"
        );
        assert!(
            memory_problem(&contextos_crds::AgentSpec {
                memory: Some(AgentMemory {
                    patterns: vec![PersonalDataPattern {
                        name: "bad".into(),
                        regex: "(unclosed".into(),
                    }],
                    ..spec
                }),
                ..serde_json::from_value(json!({
                    "model": {"provider": "scripted", "model": "m"},
                    "contextPackRef": {"name": "p"},
                    "policyRefs": [{"name": "p"}],
                    "sandboxProfileRef": {"name": "s"},
                    "budget": {"maxSteps": 1, "maxTokens": 1000, "maxToolCalls": 1, "maxWallSeconds": 60}
                }))
                .expect("agent spec")
            })
            .is_some_and(|p| p.starts_with("spec.memory.patterns:")),
            "a pattern that does not compile is refused naming the field"
        );
    }

    #[test]
    fn a_memory_source_whose_query_the_index_cannot_answer_is_named() {
        let pack = |query: &str| -> contextos_crds::ContextPackSpec {
            serde_json::from_value(json!({
                "instructions": "x",
                "tokenBudget": 1024,
                "sources": [
                    {"name": "notes", "inline": "n"},
                    {"name": "customer", "memory": {"scope": "subject", "query": query}}
                ]
            }))
            .expect("pack")
        };
        assert_eq!(source_problem(&pack("invoice vat")), None);
        for bad in ["a", "? !", "one two three four five six seven eight nine"] {
            let problem = source_problem(&pack(bad)).expect("refused");
            assert!(
                problem.starts_with("spec.sources[1].memory.query:"),
                "{bad}: {problem}"
            );
        }
    }

    #[test]
    fn memory_entries_read_back_as_they_were_written() {
        let item = ItemId(Hash::of(b"item"));
        let bodies = [
            EntryBody::MemoryRecalled(RecallRecord {
                source: Some("customer-memory".into()),
                call_id: None,
                scope: Some(ItemScope::Tenant),
                memory_type: Some(MemoryType::Preference),
                query: "invoice".into(),
                asked_scope: Some(MemoryScope::Tenant),
                max_items: 20,
                entity_type: Some("incident".into()),
                offered: vec![item],
                excluded: vec![Exclusion {
                    item,
                    reason: "it expired".into(),
                }],
                excluded_total: 1,
                consent_head: Some(Hash::of(b"head")),
                note: None,
                content: "- (preference) short answers\n".into(),
            }),
            EntryBody::MemoryCandidate(CandidateRecord {
                call_id: "2.0".into(),
                memory_type: MemoryType::Fact,
                scope: MemoryScope::Subject,
                categories: [Category::Email].into_iter().collect(),
                decision: Promotion::Drop {
                    reason: "no consent".into(),
                },
                item: None,
                consent_head: None,
            }),
        ];
        for body in bodies {
            let entry = RecordEntry {
                run_id: "run-1".into(),
                seq: 3,
                prev: Some(Hash::of(b"prev")),
                at_ms: 1,
                body,
                vaulted: None,
            };
            let decoded = RecordEntry::decode(&entry.encode()).expect("decodes");
            assert_eq!(decoded, entry);
        }
    }
}
