//! The tenant's ontology: the types of entity (service, incident, customer account, …) that
//! memory and tool calls refer to, and finding them — in the text of a memory item by each
//! type's id pattern, in a call's arguments by the tool's `touches` declarations and the same
//! patterns. Pure: compiled once per bundle, then only read.
//!
//! A run pins the ontology with the rest of its bundle, so a replay finds the very entities the
//! run found and a policy condition on `call.entityTypes` decides the same way.

use std::{collections::BTreeSet, fmt};

use contextos_crds::{agent::EntityArgument, ontology::OntologySpec};
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The name of a namespace's one Ontology (admission refuses any other).
pub const ONTOLOGY_NAME: &str = "default";
/// The most entities one memory item names.
pub const MAX_ENTITIES: usize = 64;
/// The most entities a call may touch and still be decided by conditions that read them: one
/// naming more is denied whole (a rule on an id must see every id, and listing more for every
/// decision would cost more than any call is worth).
pub const MAX_CALL_ENTITIES: usize = 1024;
/// The most bytes of an entity's id; a longer id is cut (at a character boundary).
pub const MAX_ID_BYTES: usize = 128;
/// The most entity types an Ontology declares.
pub const MAX_TYPES: usize = 64;
/// The most bytes of an id pattern.
pub const MAX_PATTERN_BYTES: usize = 256;
/// Compiled size allowed for one id pattern (and for all of them as a set).
const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// The id of an entity a call's argument names in something other than a string or a number.
pub const UNKNOWN_ID: &str = "*";

/// The name of an entity type: a DNS label (lowercase letters, digits and `-`, at most 63).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntityTypeName(String);

impl EntityTypeName {
    pub fn new(name: &str) -> Result<Self, String> {
        if crate::records::store::is_dns_label(name) {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "{:?} is not an entity type name (lowercase letters, digits and '-', at most 63)",
                name.chars().take(64).collect::<String>()
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EntityTypeName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        Self::new(&name)
    }
}

impl From<EntityTypeName> for String {
    fn from(name: EntityTypeName) -> Self {
        name.0
    }
}

impl fmt::Display for EntityTypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entity: its type and its id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntityRef {
    #[serde(rename = "type")]
    pub entity_type: EntityTypeName,
    pub id: String,
}

impl EntityRef {
    /// Checks an entity as stored with a memory item: a non-empty id of at most
    /// [`MAX_ID_BYTES`], on one line.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.trim().is_empty() || self.id.len() > MAX_ID_BYTES || self.id.chars().any(char::is_control)
        {
            return Err(format!(
                "entity {}: an id is 1 to {MAX_ID_BYTES} bytes on one line",
                self.entity_type
            ));
        }
        Ok(())
    }
}

impl fmt::Display for EntityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.entity_type, self.id)
    }
}

/// What an Ontology declares that cannot be used, naming the field.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct OntologyError {
    pub field: String,
    pub problem: String,
}

/// One declared type, compiled.
#[derive(Clone, Debug)]
struct KnownType {
    name: EntityTypeName,
    /// Finds ids in text (the pattern as written).
    find: Option<Regex>,
    /// Checks a whole id (the pattern anchored at both ends).
    whole: Option<Regex>,
}

/// The entities a call touches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallEntities {
    /// At most [`MAX_CALL_ENTITIES`], sorted.
    pub entities: Vec<EntityRef>,
    /// Every type found, also of the entities past the bound.
    pub types: BTreeSet<EntityTypeName>,
    /// More than [`MAX_CALL_ENTITIES`] were found: `entities` is not all of them.
    pub overflow: bool,
}

/// A tenant's entity types, compiled.
#[derive(Clone, Debug, Default)]
pub struct Ontology {
    types: Vec<KnownType>,
    /// The types' find patterns as one set, to scan text once for which of them occur;
    /// `patterned[i]` is the index in `types` of the set's pattern `i`.
    set: Option<RegexSet>,
    patterned: Vec<usize>,
}

impl Ontology {
    /// Compiles `spec`, naming the first type that cannot be used.
    pub fn compile(spec: &OntologySpec) -> Result<Self, OntologyError> {
        let error = |field: String, problem: String| OntologyError { field, problem };
        if spec.entity_types.len() > MAX_TYPES {
            return Err(error(
                "spec.entityTypes".into(),
                format!("{} types, more than {MAX_TYPES}", spec.entity_types.len()),
            ));
        }
        let mut types: Vec<KnownType> = Vec::with_capacity(spec.entity_types.len());
        for (i, declared) in spec.entity_types.iter().enumerate() {
            let field = format!("spec.entityTypes[{i}]");
            let name =
                EntityTypeName::new(&declared.name).map_err(|why| error(format!("{field}.name"), why))?;
            if types.iter().any(|t| t.name == name) {
                return Err(error(
                    format!("{field}.name"),
                    format!("type {name} is declared twice; remove the duplicate"),
                ));
            }
            let (find, whole) = match &declared.id_pattern {
                None => (None, None),
                Some(pattern) => {
                    let field = format!("{field}.idPattern");
                    let (find, whole) = compile_pattern(pattern).map_err(|why| error(field, why))?;
                    (Some(find), Some(whole))
                }
            };
            types.push(KnownType { name, find, whole });
        }
        let patterned: Vec<usize> = (0..types.len()).filter(|i| types[*i].find.is_some()).collect();
        let set = if patterned.is_empty() {
            None
        } else {
            let patterns = patterned
                .iter()
                .filter_map(|i| types[*i].find.as_ref().map(Regex::as_str));
            Some(
                RegexSetBuilder::new(patterns)
                    .size_limit(PATTERN_SIZE_LIMIT)
                    .dfa_size_limit(PATTERN_SIZE_LIMIT)
                    .build()
                    .map_err(|e| {
                        error(
                            "spec.entityTypes".into(),
                            format!("the id patterns together are too large to run: {e}"),
                        )
                    })?,
            )
        };
        Ok(Self {
            types,
            set,
            patterned,
        })
    }

    /// Whether no type is declared (nothing is ever found).
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    fn known(&self, name: &str) -> Option<&KnownType> {
        self.types.iter().find(|t| t.name.as_str() == name)
    }

    /// The type named `name`, or why it is not one of this ontology's.
    pub fn entity_type(&self, name: &str) -> Result<EntityTypeName, String> {
        match self.known(name) {
            Some(known) => Ok(known.name.clone()),
            None => Err(format!(
                "{:?} is not an entity type of the namespace's Ontology ({})",
                name.chars().take(64).collect::<String>(),
                self.type_list()
            )),
        }
    }

    fn type_list(&self) -> String {
        if self.types.is_empty() {
            return "it declares none, or there is no Ontology named default".into();
        }
        let names: Vec<&str> = self.types.iter().map(|t| t.name.as_str()).collect();
        format!("its types: {}", names.join(", "))
    }

    /// An entity someone names explicitly (a `remember` call's `entities`): of a declared type,
    /// with an id its pattern matches whole.
    pub fn named(&self, entity_type: &str, id: &str) -> Result<EntityRef, String> {
        let known = self.known(entity_type).ok_or_else(|| {
            format!(
                "{:?} is not an entity type of the namespace's Ontology ({})",
                entity_type.chars().take(64).collect::<String>(),
                self.type_list()
            )
        })?;
        let entity = EntityRef {
            entity_type: known.name.clone(),
            id: id.to_owned(),
        };
        entity.validate()?;
        if let Some(whole) = &known.whole
            && !whole.is_match(id)
        {
            return Err(format!(
                "entity {}: {:?} does not look like an id of this type (idPattern {})",
                known.name,
                id.chars().take(64).collect::<String>(),
                known.find.as_ref().map_or("", Regex::as_str)
            ));
        }
        Ok(entity)
    }

    /// The entities the id patterns find in `text`, sorted, at most `max`: each match that is
    /// not part of a longer word (`INC-12` is not found in `XINC-12` or `INC-123`).
    pub fn in_text(&self, text: &str, max: usize) -> BTreeSet<EntityRef> {
        let mut found = BTreeSet::new();
        self.scan(text, &mut found, &mut BTreeSet::new(), max, &mut false);
        found
    }

    /// Adds what the patterns find in `text` to `found` (at most `max` entities) and every type
    /// found to `types`.
    fn scan(
        &self,
        text: &str,
        found: &mut BTreeSet<EntityRef>,
        types: &mut BTreeSet<EntityTypeName>,
        max: usize,
        overflow: &mut bool,
    ) {
        let Some(set) = &self.set else { return };
        for matched in set.matches(text).iter() {
            let known = &self.types[self.patterned[matched]];
            let Some(find) = &known.find else { continue };
            for m in find.find_iter(text) {
                // The type counts wherever its pattern matches, inside a longer word too: a
                // rule on the type cannot be stepped around by what is written around an id
                // (`xCUST-123456` or `CUST-123456-` reach a lenient search all the same).
                types.insert(known.name.clone());
                let before = text[..m.start()].chars().next_back();
                let after = text[m.end()..].chars().next();
                // The id itself is listed only as a whole word, and only if it can be one.
                if before.is_some_and(is_id_char) || after.is_some_and(is_id_char) {
                    continue;
                }
                let entity = EntityRef {
                    entity_type: known.name.clone(),
                    id: clip(m.as_str()),
                };
                if entity.validate().is_ok() && found.len() < max {
                    found.insert(entity);
                } else if entity.validate().is_ok() {
                    *overflow = true;
                }
            }
        }
    }

    /// The entities a call of a tool that `touches` these arguments makes with `arguments`:
    /// the values at the declared pointers (a string or number, or an array of them; a `*`
    /// segment stands for every element or member), and what the id patterns find in every
    /// string and number of the arguments. A declared argument that holds something else, or
    /// a path that meets a value where it expects an object or array, still counts its type (id
    /// [`UNKNOWN_ID`]): a condition on the type cannot be stepped around by the shape of an
    /// argument.
    pub fn of_call(&self, touches: &[EntityArgument], arguments: &Value) -> CallEntities {
        let mut found = BTreeSet::new();
        let mut types = BTreeSet::new();
        let mut overflow = false;
        for declared in touches {
            let Ok(entity_type) = EntityTypeName::new(&declared.entity_type) else {
                continue;
            };
            let mut ids = Vec::new();
            let tokens: Vec<String> = declared
                .argument
                .split('/')
                .skip(1)
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect();
            resolve(arguments, &tokens, &mut ids);
            if ids.is_empty() {
                continue;
            }
            types.insert(entity_type.clone());
            for id in ids {
                if found.len() >= MAX_CALL_ENTITIES {
                    overflow = true;
                    break;
                }
                found.insert(EntityRef {
                    entity_type: entity_type.clone(),
                    id,
                });
            }
        }
        if self.set.is_some() {
            walk_scalars(arguments, &mut |text| {
                self.scan(text, &mut found, &mut types, MAX_CALL_ENTITIES, &mut overflow);
            });
        }
        CallEntities {
            entities: found.into_iter().collect(),
            types,
            overflow,
        }
    }

    /// Why `tools` cannot run under this ontology: a `touches` type it does not declare.
    pub fn touches_problem(&self, tools: &[contextos_crds::agent::Tool]) -> Option<String> {
        tools.iter().enumerate().find_map(|(i, tool)| {
            tool.touches.iter().enumerate().find_map(|(j, declared)| {
                self.entity_type(&declared.entity_type).err().map(|why| {
                    format!(
                        "spec.tools[{i}].touches[{j}].type ({}): {why}; declare the type in the Ontology or fix the name",
                        tool.name
                    )
                })
            })
        })
    }

    /// Why a ContextPack's memory sources cannot be recalled under this ontology: an
    /// `entityType` it does not declare.
    pub fn sources_problem(&self, pack: &contextos_crds::ContextPackSpec) -> Option<String> {
        pack.sources.iter().enumerate().find_map(|(i, source)| {
            let wanted = source.memory.as_ref()?.entity_type.as_deref()?;
            self.entity_type(wanted).err().map(|why| {
                format!(
                    "spec.sources[{i}].memory.entityType: {why}; declare the type in the Ontology or fix the name"
                )
            })
        })
    }
}

/// Compiles an id pattern twice: as written, to find ids in text, and anchored, to check one
/// id whole.
fn compile_pattern(pattern: &str) -> Result<(Regex, Regex), String> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "{} bytes, more than the {MAX_PATTERN_BYTES} an id pattern may have",
            pattern.len()
        ));
    }
    let build = |source: &str| {
        RegexBuilder::new(source)
            .size_limit(PATTERN_SIZE_LIMIT)
            .dfa_size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("it does not compile as a regular expression (RE2 syntax): {e}"))
    };
    let find = build(pattern)?;
    if find.is_match("") {
        return Err(
            "it matches the empty text, so it would find an entity everywhere; describe what an id looks like"
                .into(),
        );
    }
    let whole = build(&format!("^(?:{pattern})$"))?;
    Ok((find, whole))
}

/// Letters, digits and the joiners ids are made of: a match next to one is part of a longer id.
fn is_id_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

fn clip(text: &str) -> String {
    if text.len() <= MAX_ID_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ID_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The ids at `tokens` under `value` (see [`Ontology::of_call`]): nothing when the argument
/// is absent (a missing member, null), [`UNKNOWN_ID`] where the path meets a value of another
/// shape.
fn resolve(value: &Value, tokens: &[String], ids: &mut Vec<String>) {
    let Some((token, rest)) = tokens.split_first() else {
        match value {
            Value::Null => {}
            Value::String(text) => ids.push(clip(text)),
            Value::Number(n) => ids.push(n.to_string()),
            Value::Array(items) => items.iter().for_each(|item| resolve(item, &[], ids)),
            _ => ids.push(UNKNOWN_ID.to_owned()),
        }
        return;
    };
    match value {
        Value::Null => {}
        Value::Object(map) if token == "*" => map.values().for_each(|v| resolve(v, rest, ids)),
        Value::Object(map) => {
            if let Some(v) = map.get(token) {
                resolve(v, rest, ids);
            }
        }
        Value::Array(items) if token == "*" => items.iter().for_each(|v| resolve(v, rest, ids)),
        Value::Array(items) => match token.parse::<usize>() {
            Ok(index) => {
                if let Some(v) = items.get(index) {
                    resolve(v, rest, ids);
                }
            }
            // A member name on an array: the tool may read it some other way.
            Err(_) => ids.push(UNKNOWN_ID.to_owned()),
        },
        // A string or number where the path goes on: the argument is shaped otherwise than
        // declared, and may still name the entity.
        _ => ids.push(UNKNOWN_ID.to_owned()),
    }
}

/// Calls `visit` on every string and number in `value`, object keys included (a tool may read
/// them as well as the values, so an id hidden in a key or given as a number is an id the call
/// names).
fn walk_scalars(value: &Value, visit: &mut impl FnMut(&str)) {
    match value {
        Value::String(text) => visit(text),
        Value::Number(n) => visit(&n.to_string()),
        Value::Array(items) => items.iter().for_each(|item| walk_scalars(item, visit)),
        Value::Object(map) => map.iter().for_each(|(key, item)| {
            visit(key);
            walk_scalars(item, visit);
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use contextos_crds::ontology::EntityType;
    use serde_json::json;

    use super::*;

    fn ontology() -> Ontology {
        let spec = OntologySpec {
            entity_types: vec![
                EntityType {
                    name: "incident".into(),
                    description: None,
                    id_pattern: Some("INC-[0-9]{3,8}".into()),
                },
                EntityType {
                    name: "service".into(),
                    description: Some("a deployed service".into()),
                    id_pattern: None,
                },
            ],
        };
        Ontology::compile(&spec).expect("compiles")
    }

    fn refs(found: impl IntoIterator<Item = EntityRef>) -> Vec<String> {
        found.into_iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn ids_are_found_in_text_only_as_whole_words() {
        let o = ontology();
        assert_eq!(
            refs(o.in_text(
                "INC-1234 reopened as INC-5678; see XINC-999, INC-12 and INC-123456789",
                64
            )),
            ["incident/INC-1234", "incident/INC-5678"]
        );
        assert!(o.in_text("nothing here", 64).is_empty());
        assert_eq!(o.in_text("INC-100 INC-200 INC-300", 2).len(), 2);
    }

    #[test]
    fn a_call_touches_declared_arguments_and_ids_found_in_any_string() {
        let o = ontology();
        let touches = vec![EntityArgument {
            entity_type: "service".into(),
            argument: "/target/service".into(),
        }];
        let found = o.of_call(
            &touches,
            &json!({"target": {"service": "checkout"}, "note": "for INC-4242", "INC-1111": 1}),
        );
        assert_eq!(
            refs(found.entities),
            ["incident/INC-1111", "incident/INC-4242", "service/checkout"]
        );
        assert_eq!(
            found.types.iter().map(EntityTypeName::as_str).collect::<Vec<_>>(),
            ["incident", "service"]
        );
        // An array names several; a value of another shape still counts its type.
        let found = o.of_call(&touches, &json!({"target": {"service": ["a", "b"]}}));
        assert_eq!(refs(found.entities), ["service/a", "service/b"]);
        let found = o.of_call(&touches, &json!({"target": {"service": {"name": "checkout"}}}));
        assert_eq!(refs(found.entities), ["service/*"]);
        // A path that meets a value of another shape still touches the type.
        let found = o.of_call(&touches, &json!({"target": "billing"}));
        assert_eq!(refs(found.entities), ["service/*"]);
        assert!(o.of_call(&touches, &json!({"other": 1})).types.is_empty());
        assert!(
            o.of_call(&touches, &json!({"target": {"service": null}}))
                .types
                .is_empty()
        );
        // `*` is every element or member; `~1` a slash in a member's name.
        let every = vec![EntityArgument {
            entity_type: "service".into(),
            argument: "/targets/*/name".into(),
        }];
        let found = o.of_call(
            &every,
            &json!({"targets": [null, {"name": "billing-db"}, {"name": 7}]}),
        );
        assert_eq!(refs(found.entities), ["service/7", "service/billing-db"]);
        let escaped = vec![EntityArgument {
            entity_type: "service".into(),
            argument: "/a~1b".into(),
        }];
        assert_eq!(
            refs(o.of_call(&escaped, &json!({"a/b": "x"})).entities),
            ["service/x"]
        );
        // Numbers are scanned like strings.
        let numeric: OntologySpec =
            serde_yaml::from_str("entityTypes: [{name: account, idPattern: '[0-9]{8}'}]").expect("spec");
        let numeric = Ontology::compile(&numeric).expect("compiles");
        assert_eq!(
            refs(numeric.of_call(&[], &json!({"account": 12345678})).entities),
            ["account/12345678"]
        );
    }

    #[test]
    fn a_long_id_still_counts_its_type() {
        let spec: OntologySpec = serde_yaml::from_str(
            "entityTypes: [{name: bucket, idPattern: 's3://customer-[a-z0-9-]+/[a-z]*'}]",
        )
        .expect("spec");
        let o = Ontology::compile(&spec).expect("compiles");
        let long = format!("s3://customer-pii/{}", "a".repeat(300));
        let found = o.of_call(&[], &json!({"path": long}));
        assert_eq!(found.types.len(), 1, "the type is seen");
        assert_eq!(found.entities.len(), 1);
        assert_eq!(found.entities[0].id.len(), MAX_ID_BYTES, "the id is cut");
    }

    /// A policy condition on `call.entityTypes` cannot be stepped around by writing an id
    /// inside a longer word: a lenient search finds `INC-1234` in `xINC-1234` all the same.
    #[test]
    fn an_id_inside_a_longer_word_counts_its_type_but_is_not_listed() {
        let o = ontology();
        for written in ["xINC-1234", "INC-1234-", "INC-1234x", "see_INC-1234"] {
            let found = o.of_call(&[], &json!({"q": written}));
            assert_eq!(
                found.types.iter().map(EntityTypeName::as_str).collect::<Vec<_>>(),
                ["incident"],
                "{written}"
            );
            assert!(found.entities.is_empty(), "{written}: not an id of its own");
        }
    }

    #[test]
    fn a_flood_of_ids_is_bounded_and_said_to_be() {
        let o = ontology();
        let touches = vec![EntityArgument {
            entity_type: "service".into(),
            argument: "/services".into(),
        }];
        let few: Vec<String> = (1000..1200).map(|n| format!("INC-{n}")).collect();
        let found = o.of_call(&touches, &json!({"notes": few, "services": ["checkout"]}));
        assert_eq!(found.entities.len(), 201, "every id is listed below the bound");
        assert!(!found.overflow);
        let many: Vec<String> = (10_000..11_100).map(|n| format!("INC-{n}")).collect();
        let found = o.of_call(&touches, &json!({"notes": many, "services": ["checkout"]}));
        assert_eq!(found.entities.len(), MAX_CALL_ENTITIES);
        assert!(found.overflow, "a call past the bound says so (and is denied)");
        assert_eq!(found.types.len(), 2, "the service type is seen past the bound");
    }

    #[test]
    fn named_entities_must_be_of_a_declared_type_and_look_like_one() {
        let o = ontology();
        assert_eq!(
            o.named("incident", "INC-123").expect("ok").to_string(),
            "incident/INC-123"
        );
        assert!(
            o.named("incident", "INC-1")
                .expect_err("refused")
                .contains("idPattern")
        );
        assert!(o.named("incident", "INC-123 and more").is_err());
        assert!(
            o.named("team", "sre")
                .expect_err("refused")
                .contains("its types: incident, service")
        );
        assert!(o.named("service", "").is_err());
        assert!(o.named("service", &"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(o.named("service", "a\nb").is_err());
    }

    #[test]
    fn unusable_declarations_name_the_field() {
        let bad = |name: &str, pattern: Option<&str>| {
            Ontology::compile(&OntologySpec {
                entity_types: vec![EntityType {
                    name: name.into(),
                    description: None,
                    id_pattern: pattern.map(str::to_owned),
                }],
            })
            .expect_err("refused")
        };
        assert_eq!(bad("Bad_Name", None).field, "spec.entityTypes[0].name");
        let e = bad("incident", Some("INC-("));
        assert_eq!(e.field, "spec.entityTypes[0].idPattern");
        assert!(bad("incident", Some("x*")).problem.contains("empty text"));
        assert!(bad("incident", Some(&"a".repeat(300))).problem.contains("256"));
        assert!(
            bad("incident", Some("(?=x)")).problem.contains("RE2"),
            "look-around is refused"
        );
    }
}
