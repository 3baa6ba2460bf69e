//! OpenAPI 3 documents, for `contextos audit --openapi` and `contextos tools import --openapi`:
//! each operation (method, path, URL, the arguments it takes as one JSON Schema), and the HTTP
//! tool declaration it implies — risk from the method's semantics, marked for review where the
//! method does not settle it.

use std::collections::BTreeMap;

use contextos_crds::{
    agent::{
        DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT_SECONDS, HttpAdapter, HttpMethod, OpenApiAdapter, Tool,
        ToolAdapter,
    },
    common::{ToolKind, ToolRisk},
};
use serde_json::{Map, Value, json};

use super::live::{Imported, declared_name};
use crate::gateway::adapters::openapi::{Binding, minimum_risk};
pub use crate::openapi::method_name;
use crate::openapi::{inline_within, resolve};

/// Most bytes of a document read (a URL or a file).
pub const MAX_DOCUMENT_BYTES: usize = 8 * 1024 * 1024;

/// One operation of a document.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    /// `operationId`, or `<method>_<path>` when it has none.
    pub id: String,
    /// The `operationId` the document gives (what an OpenAPI tool binds to).
    pub operation_id: Option<String>,
    pub method: HttpMethod,
    /// The path as the document writes it (`/pets/{id}`).
    pub path: String,
    /// The server URL and the path.
    pub url: String,
    pub summary: String,
    /// Query parameters and the JSON request body, as one object schema.
    pub input_schema: Value,
    /// Path parameters (`{id}`): an HTTP tool sends arguments as a body or query, not in the path.
    pub path_params: Vec<String>,
}

/// An OpenAPI document: where it came from, its server URL, its operations and its content.
#[derive(Clone, Debug)]
pub struct ApiDocument {
    pub source: String,
    pub server: String,
    pub operations: Vec<Operation>,
    pub content: Value,
    /// The document's SHA-256 (hex), as the gateway computes it of what it reads.
    pub sha256: String,
}

impl ApiDocument {
    /// The document's operation that `url` and `method` name, if `url` is under its server.
    pub fn find(&self, url: &str, method: HttpMethod) -> Option<Option<&Operation>> {
        let path = url.strip_prefix(self.server.trim_end_matches('/'))?;
        let path = path.split(['?', '#']).next().unwrap_or_default();
        Some(
            self.operations
                .iter()
                .find(|op| op.method == method && path_matches(&op.path, path)),
        )
    }
}

/// Whether a document path (`/pets/{id}`) matches a concrete path (`/pets/7`).
fn path_matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b || (a.starts_with('{') && a.ends_with('}') && !b.is_empty()) => {}
            _ => return false,
        }
    }
}

/// The operations of `document` (JSON or YAML text), read from `source`; `server` overrides the
/// document's first server URL.
pub fn parse(source: &str, text: &str, server: Option<&str>) -> Result<ApiDocument, String> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(format!("{source}: more than {MAX_DOCUMENT_BYTES} bytes"));
    }
    let document =
        crate::openapi::parse_document(text).map_err(|e| format!("{source}: not JSON or YAML: {e}"))?;
    let version = document["openapi"].as_str().unwrap_or_default();
    if !version.starts_with("3.") {
        return Err(format!(
            "{source}: not an OpenAPI 3 document (openapi: {version:?})"
        ));
    }
    let server = server
        .map(str::to_owned)
        .or_else(|| document["servers"][0]["url"].as_str().map(str::to_owned))
        .ok_or_else(|| format!("{source}: no servers[0].url; give the API's base URL"))?;
    let mut operations = Vec::new();
    // One bound for the whole document: every operation's schemas are held at once.
    let mut budget = crate::openapi::Budget::for_document();
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        let shared = item["parameters"].as_array().cloned().unwrap_or_default();
        for (key, method) in [
            ("get", HttpMethod::Get),
            ("post", HttpMethod::Post),
            ("put", HttpMethod::Put),
            ("patch", HttpMethod::Patch),
            ("delete", HttpMethod::Delete),
        ] {
            let Some(operation) = item.get(key).filter(|o| o.is_object()) else {
                continue;
            };
            let mut parameters = shared.clone();
            parameters.extend(operation["parameters"].as_array().cloned().unwrap_or_default());
            operations.push(operation_of(
                &document,
                &server,
                path,
                method,
                operation,
                &parameters,
                &mut budget,
            )?);
        }
    }
    Ok(ApiDocument {
        source: source.to_owned(),
        server,
        operations,
        content: document,
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())),
    })
}

fn operation_of(
    document: &Value,
    server: &str,
    path: &str,
    method: HttpMethod,
    operation: &Value,
    parameters: &[Value],
    budget: &mut crate::openapi::Budget,
) -> Result<Operation, String> {
    let mut properties = Map::new();
    let mut required = Vec::new();
    let mut path_params = Vec::new();
    for parameter in parameters {
        let parameter = resolve(document, parameter, 0)?;
        let name = parameter["name"].as_str().unwrap_or_default().to_owned();
        match parameter["in"].as_str() {
            Some("query") => {
                if parameter["required"] == Value::Bool(true) {
                    required.push(Value::String(name.clone()));
                }
                properties.insert(name, inline_within(document, &parameter["schema"], 0, budget)?);
            }
            Some("path") => path_params.push(name),
            _ => {}
        }
    }
    let body = &operation["requestBody"];
    let body = resolve(document, body, 0)?;
    let body_schema = &body["content"]["application/json"]["schema"];
    let input_schema = match (body_schema.is_object(), properties.is_empty()) {
        (true, true) => inline_within(document, body_schema, 0, budget)?,
        (true, false) => {
            // Query parameters next to a JSON body: one object with both.
            let mut merged = inline_within(document, body_schema, 0, budget)?;
            if let Some(body_properties) = merged["properties"].as_object_mut() {
                body_properties.extend(properties);
            }
            if let Some(body_required) = merged["required"].as_array_mut() {
                body_required.extend(required);
            }
            merged
        }
        (false, _) => {
            let mut schema = json!({"type": "object", "properties": properties});
            if !required.is_empty() {
                schema["required"] = Value::Array(required);
            }
            schema
        }
    };
    let summary = operation["summary"]
        .as_str()
        .or_else(|| operation["description"].as_str())
        .unwrap_or_default();
    let id = operation["operationId"].as_str().map_or_else(
        || {
            let key = crate::openapi::method_name(method).to_ascii_lowercase();
            format!("{key}_{}", path.trim_matches('/'))
        },
        str::to_owned,
    );
    Ok(Operation {
        id,
        operation_id: operation["operationId"].as_str().map(str::to_owned),
        method,
        path: path.to_owned(),
        url: format!("{}{path}", server.trim_end_matches('/')),
        summary: summary.chars().take(2048).collect(),
        input_schema,
        path_params,
    })
}

/// The HTTP tool declaration `operation` implies:
/// - GET → read_only, observe, idempotent;
/// - PUT, PATCH → network, act (PUT idempotent), marked for review (what does it change?);
/// - POST → network, act, marked for review (POST may only read, or may destroy);
/// - DELETE → destructive, act, idempotent.
pub fn infer(operation: &Operation) -> Imported {
    let mut review = Vec::new();
    let (risk, kind, idempotent) = match operation.method {
        HttpMethod::Get => (ToolRisk::ReadOnly, ToolKind::Observe, true),
        HttpMethod::Delete => (ToolRisk::Destructive, ToolKind::Act, true),
        method @ (HttpMethod::Put | HttpMethod::Patch | HttpMethod::Post) => {
            review.push(format!(
                "{} {}: declared network; raise it to destructive if the operation cannot be undone, lower it if it only reads",
                method_name(method),
                operation.path
            ));
            (ToolRisk::Network, ToolKind::Act, method == HttpMethod::Put)
        }
    };
    for parameter in &operation.path_params {
        review.push(format!(
            "path parameter {{{parameter}}}: an HTTP tool sends its arguments as a body or query, so the URL keeps {{{parameter}}} literally; bind it to one value or leave this operation out"
        ));
    }
    let tool = Tool {
        name: declared_name(&operation.id),
        description: operation.summary.clone(),
        risk,
        kind,
        adapter: ToolAdapter {
            http: Some(HttpAdapter {
                url: operation.url.clone(),
                method: operation.method,
                max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
                secret_ref: None,
            }),
            mcp: None,
            webhook: None,
            a2a: None,
            openapi: None,
            memory: None,
        },
        input_schema: Some(operation.input_schema.clone()),
        timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
        retry: None,
        idempotent,
        touches: Vec::new(),
        examples: Vec::new(),
        cache: None,
    };
    Imported { tool, review }
}

/// The OpenAPI tool declaration binding `operation` of `api` (read from its URL; `server`
/// overrides the API's URL): risk and kind as [`infer`] says, within what the method allows
/// ([`minimum_risk`]), and the arguments the gateway maps as the input schema. An operation
/// the gateway could not call is an error saying why.
pub fn infer_bound(
    api: &ApiDocument,
    operation: &Operation,
    server: Option<&str>,
) -> Result<Imported, String> {
    let Some(operation_id) = &operation.operation_id else {
        return Err(format!(
            "{} {} has no operationId, which an OpenAPI tool binds to",
            method_name(operation.method),
            operation.path
        ));
    };
    let binding = Binding::new(&api.source, &api.content, operation_id, server)?;
    let Imported { mut tool, review } = infer(operation);
    tool.risk = tool.risk.max(minimum_risk(operation.method));
    tool.input_schema = Some(binding.arguments_schema);
    tool.adapter = ToolAdapter {
        openapi: Some(OpenApiAdapter {
            document: api.source.clone(),
            operation_id: operation_id.clone(),
            server: server.map(str::to_owned),
            // Pinned to the document that was reviewed: a changed document fails the call as
            // stale until the tools are imported (and reviewed) again.
            document_sha256: Some(api.sha256.clone()),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            secret_ref: None,
        }),
        ..tool.adapter
    };
    tool.adapter.http = None;
    // Path parameters are arguments like any other here.
    let review = review
        .into_iter()
        .filter(|line| !line.starts_with("path parameter"))
        .collect();
    Ok(Imported { tool, review })
}

/// Operation ids that map to one declared name, so an import would declare a tool twice.
pub fn colliding_names(operations: &[Operation]) -> BTreeMap<String, Vec<String>> {
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for operation in operations {
        by_name
            .entry(declared_name(&operation.id))
            .or_default()
            .push(operation.id.clone());
    }
    by_name.retain(|_, ids| ids.len() > 1);
    by_name
}

#[cfg(test)]
mod tests {
    use super::*;

    const PETS: &str = r##"
openapi: 3.0.3
servers: [{url: "https://pets.example.com/v1"}]
components:
  schemas:
    Pet: {type: object, required: [name], properties: {name: {type: string}}}
paths:
  /pets:
    get:
      operationId: listPets
      parameters: [{name: limit, in: query, schema: {type: integer}}]
    post:
      operationId: createPet
      requestBody: {content: {application/json: {schema: {$ref: "#/components/schemas/Pet"}}}}
  /pets/{id}:
    parameters: [{name: id, in: path, required: true, schema: {type: string}}]
    delete:
      summary: Deletes a pet.
"##;

    #[test]
    fn operations_carry_their_arguments_as_one_schema() {
        let doc = parse("pets.yaml", PETS, None).expect("parsed");
        assert_eq!(doc.server, "https://pets.example.com/v1");
        let list = doc.operations.iter().find(|o| o.id == "listPets").expect("list");
        assert_eq!(
            list.input_schema,
            json!({"type": "object", "properties": {"limit": {"type": "integer"}}})
        );
        let create = doc
            .operations
            .iter()
            .find(|o| o.id == "createPet")
            .expect("create");
        assert_eq!(
            create.input_schema["required"],
            json!(["name"]),
            "the $ref is inlined"
        );
        let delete = doc
            .operations
            .iter()
            .find(|o| o.method == HttpMethod::Delete)
            .expect("delete");
        assert_eq!(
            (delete.id.as_str(), delete.path_params.as_slice()),
            ("delete_pets/{id}", &["id".to_owned()][..])
        );
        assert_eq!(
            doc.find("https://pets.example.com/v1/pets/7", HttpMethod::Delete),
            Some(Some(delete))
        );
        assert_eq!(
            doc.find("https://pets.example.com/v1/cats", HttpMethod::Get),
            Some(None)
        );
        assert_eq!(
            doc.find("https://elsewhere.example.com/pets", HttpMethod::Get),
            None
        );
    }

    #[test]
    fn methods_decide_risk_and_what_they_cannot_settle_is_marked() {
        let doc = parse("pets.yaml", PETS, None).expect("parsed");
        let by_id = |id: &str| infer(doc.operations.iter().find(|o| o.id == id).expect("op"));
        let list = by_id("listPets");
        assert_eq!(
            (list.tool.risk, list.tool.name.as_str()),
            (ToolRisk::ReadOnly, "listpets")
        );
        assert!(list.review.is_empty());
        let create = by_id("createPet");
        assert_eq!(create.tool.risk, ToolRisk::Network);
        assert_eq!(create.review.len(), 1);
        let delete = by_id("delete_pets/{id}");
        assert_eq!(delete.tool.risk, ToolRisk::Destructive);
        assert!(
            delete.review.iter().any(|r| r.contains("{id}")),
            "{:?}",
            delete.review
        );
    }

    /// Every operation's schemas are held at once: each parameter naming one large schema
    /// (within one operation's bound alone) is counted against one bound for the document.
    #[test]
    fn a_document_whose_parameters_each_inline_a_large_schema_is_refused() {
        // A schema of 2^14 nodes, named by 64 parameters of 64 operations: 67 million nodes
        // inlined if each parameter had a bound of its own.
        let mut text =
            String::from("openapi: 3.0.0\nservers: [{url: 'http://a'}]\ncomponents:\n  schemas:\n");
        for i in 0..14 {
            text.push_str(&format!("    S{i}: {{properties: {{a: {{$ref: '#/components/schemas/S{n}'}}, b: {{$ref: '#/components/schemas/S{n}'}}}}}}\n", n = i + 1));
        }
        text.push_str("    S14: {type: string}\npaths:\n");
        let parameters: Vec<String> = (0..64)
            .map(|p| format!("{{name: q{p}, in: query, schema: {{$ref: '#/components/schemas/S0'}}}}"))
            .collect();
        for op in 0..64 {
            text.push_str(&format!(
                "  /op{op}: {{get: {{operationId: op{op}, parameters: [{}]}}}}\n",
                parameters.join(", ")
            ));
        }
        let refused = parse("x", &text, None).expect_err("refused");
        assert!(refused.contains("more than 800000 nodes"), "{refused}");
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        assert!(
            parse("x", "openapi: 2.0\n", None)
                .expect_err("refused")
                .contains("not an OpenAPI 3")
        );
        let cyclic = "openapi: 3.0.0\nservers: [{url: 'http://a'}]\ncomponents: {schemas: {A: {$ref: '#/components/schemas/A'}}}\npaths: {/a: {post: {requestBody: {content: {application/json: {schema: {$ref: '#/components/schemas/A'}}}}}}}\n";
        assert!(parse("x", cyclic, None).expect_err("refused").contains("deep"));
        // Each level references the next twice: 2^40 nodes if inlined naively.
        let mut fan = String::from("openapi: 3.0.0\nservers: [{url: 'http://a'}]\ncomponents:\n  schemas:\n");
        for i in 0..40 {
            fan.push_str(&format!("    S{i}: {{properties: {{a: {{$ref: '#/components/schemas/S{n}'}}, b: {{$ref: '#/components/schemas/S{n}'}}}}}}\n", n = i + 1));
        }
        fan.push_str("    S40: {type: string}\npaths: {/a: {post: {requestBody: {content: {application/json: {schema: {$ref: '#/components/schemas/S0'}}}}}}}\n");
        assert!(parse("x", &fan, None).expect_err("refused").contains("nodes"));
        let external = "openapi: 3.0.0\nservers: [{url: 'http://a'}]\npaths: {/a: {post: {requestBody: {$ref: 'other.yaml#/x'}}}}\n";
        assert!(
            parse("x", external, None)
                .expect_err("refused")
                .contains("inside the document")
        );
    }
}
