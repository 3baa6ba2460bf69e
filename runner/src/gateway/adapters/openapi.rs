//! A tool bound to one operation of an OpenAPI 3 document.
//!
//! The gateway reads the document from the URL the Agent names (bounded while it is read, kept a
//! minute, its SHA-256 checked against `documentSha256` when the Agent pins one) and binds the
//! operation its `operationId` names once per document version ([`Binding::new`], pure): its
//! method, path, parameters, JSON request body, the schema the call's arguments must satisfy, and
//! the schemas of its answers. A call then maps its arguments onto a request
//! ([`Binding::request`], pure), sends it, and checks the answer against the schema the document
//! gives for its status ([`Binding::check_answer`]).
//!
//! The document is trusted no more than the API that serves it: without a `server` in the
//! Agent, the API's URL must be on the document's own scheme, host and port (a document cannot
//! send calls, and the tool's bearer token, elsewhere); the operation's method bounds the tool's
//! declared risk ([`minimum_risk`]), so a document cannot turn a `read_only` tool into a
//! DELETE; a parameter cannot set a header the gateway owns; and an argument cannot leave its
//! path segment.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use contextos_crds::{
    agent::{HttpMethod, OpenApiAdapter},
    common::ToolRisk,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value, json};
use sha2::Digest as _;

use super::{AdapterError, AdapterResponse, CallContext, http};
use crate::openapi::{Budget, inline_within, method_name, parse_document, resolve};

/// Most bytes of a document read; a larger one is refused while it is read.
pub const DOCUMENT_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Documents read, or operations bound, at once in this process: each may take a few hundred
/// megabytes while it runs (a large YAML document, its schemas inlined), and the calls that
/// ask for them may be many.
static READING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
const DOCUMENT_TTL: Duration = Duration::from_secs(60);

/// What an argument may hold in a path segment as it is: everything else is percent-encoded,
/// `/`, `?`, `#` and `%` included, so an argument stays inside its segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Headers the gateway sets itself, that say how the request is framed, that change its method
/// (which bounds the tool's risk) or that speak for the client's address: a parameter naming
/// one is refused (OpenAPI says `Accept`, `Content-Type` and `Authorization` parameters are
/// ignored; the gateway refuses the operation rather than silently drop an argument).
const GATEWAY_HEADERS: [&str; 20] = [
    "accept",
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "host",
    "idempotency-key",
    "proxy-authorization",
    "te",
    "traceparent",
    "tracestate",
    "transfer-encoding",
    "upgrade",
    "x-http-method",
    "x-http-method-override",
    "x-method-override",
    "x-real-ip",
    "baggage",
];

/// Whether a header parameter named `name` would set what the gateway owns (see
/// [`GATEWAY_HEADERS`]; also every `X-Forwarded-*` and `X-ContextOS-*` header).
fn gateway_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    GATEWAY_HEADERS.contains(&name.as_str())
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-contextos-")
}

/// Query parameters frameworks read as the request's method.
const METHOD_OVERRIDE_QUERIES: [&str; 2] = ["_method", "x-http-method-override"];

/// The least risk a tool bound to an operation of `method` may declare. Only a GET is safe
/// (RFC 9110): every other method changes something outside the sandbox, and DELETE removes it.
pub fn minimum_risk(method: HttpMethod) -> ToolRisk {
    match method {
        HttpMethod::Get => ToolRisk::ReadOnly,
        HttpMethod::Post | HttpMethod::Put | HttpMethod::Patch => ToolRisk::Network,
        HttpMethod::Delete => ToolRisk::Destructive,
    }
}

/// Where a parameter goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Location {
    Path,
    Query,
    Header,
}

/// One parameter of a bound operation; its argument has its name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Parameter {
    name: String,
    location: Location,
    /// Arrays as repeated query pairs (`form`, exploded) rather than one comma-joined value.
    explode: bool,
}

/// Which answers a documented response schema is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Answers {
    Status(u16),
    /// `2XX`, … (the hundreds digit).
    Class(u16),
    Default,
}

/// The operation an OpenAPI tool calls, bound from its document.
#[derive(Debug)]
pub struct Binding {
    pub operation_id: String,
    pub method: HttpMethod,
    /// The API's URL (scheme, host, port, path prefix), without a trailing `/`.
    base: reqwest::Url,
    /// The path as the document writes it (`/tickets/{ticket_id}`).
    path: String,
    parameters: Vec<Parameter>,
    /// The operation takes a JSON body, as the argument `body`.
    body: bool,
    /// The schema of the arguments: one property per parameter (and `body`), nothing else.
    pub arguments_schema: Value,
    arguments: jsonschema::Validator,
    /// The JSON schema of each documented answer, most specific first.
    answers: Vec<(Answers, jsonschema::Validator)>,
}

/// A request of a call, ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: HttpMethod,
    pub url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Vec<u8>>,
}

impl Binding {
    /// Binds operation `operation_id` of `document` (read from `document_url`); `server` is
    /// the Agent's base URL for the API, in place of the document's. Every reason the operation
    /// cannot be called as governed is an error naming it.
    pub fn new(
        document_url: &str,
        document: &Value,
        operation_id: &str,
        server: Option<&str>,
    ) -> Result<Self, String> {
        let version = document["openapi"].as_str().unwrap_or_default();
        if !version.starts_with("3.") {
            return Err(format!(
                "{document_url} is not an OpenAPI 3 document (openapi: {version:?})"
            ));
        }
        let legacy = version.starts_with("3.0");
        let (path, method, item, operation) =
            find(document, operation_id).map_err(|e| format!("{document_url}: {e}"))?;
        let base = base_url(document_url, document, item, operation, server)?;
        // One budget for every schema of the operation: parameters by the thousand, each
        // inlining a fan-out of references, must not cost thousands of budgets.
        let left = std::cell::Cell::new(Budget::default());
        let schema_of = |schema: &Value| -> Result<Value, String> {
            let mut budget = left.get();
            let inlined = inline_within(document, schema, 0, &mut budget);
            left.set(budget);
            let mut inlined =
                inlined.map_err(|e| format!("operation {operation_id} of {document_url}: {e}"))?;
            if legacy {
                as_json_schema(&mut inlined);
            }
            Ok(inlined)
        };

        let mut parameters = Vec::new();
        let mut properties = Map::new();
        let mut required = Vec::new();
        for parameter in declared_parameters(document, item, operation)
            .map_err(|e| format!("operation {operation_id}: {e}"))?
        {
            let name = parameter["name"].as_str().unwrap_or_default().to_owned();
            let refuse = |why: &str| {
                Err(format!(
                    "operation {operation_id}: parameter {name:?} ({}) {why}",
                    parameter["in"].as_str().unwrap_or("?")
                ))
            };
            let location = match parameter["in"].as_str() {
                Some("path") => Location::Path,
                Some("query") => Location::Query,
                Some("header") => Location::Header,
                Some("cookie") if parameter["required"] != Value::Bool(true) => continue,
                Some("cookie") => return refuse("is a required cookie, which the gateway does not send"),
                _ => return refuse("has no location the gateway knows (path, query, header)"),
            };
            if name.is_empty() {
                return refuse("has no name");
            }
            if location == Location::Path && !path.contains(&format!("{{{name}}}")) {
                return refuse("is not in the operation's path");
            }
            if location == Location::Header
                && (gateway_header(&name) || HeaderName::from_bytes(name.as_bytes()).is_err())
            {
                return refuse(
                    "is a header the gateway sets itself (or one that changes the method or the client's address), or not a header name",
                );
            }
            if location == Location::Query
                && METHOD_OVERRIDE_QUERIES.contains(&name.to_ascii_lowercase().as_str())
            {
                return refuse("overrides the request's method, which bounds the tool's risk");
            }
            let style = parameter["style"].as_str();
            let default_style = if location == Location::Query {
                "form"
            } else {
                "simple"
            };
            if style.is_some_and(|s| s != default_style) {
                return refuse(&format!(
                    "has style {:?}; the gateway sends {default_style} only",
                    style.unwrap_or_default()
                ));
            }
            if parameter.get("schema").is_none() {
                return refuse(
                    "is described by `content`, not `schema`; the gateway sends schema parameters only",
                );
            }
            if properties.contains_key(&name) {
                return refuse("is declared twice (in two locations): its argument would be ambiguous");
            }
            let is_required = location == Location::Path || parameter["required"] == Value::Bool(true);
            if is_required {
                required.push(Value::String(name.clone()));
            }
            properties.insert(name.clone(), schema_of(&parameter["schema"])?);
            parameters.push(Parameter {
                name,
                location,
                explode: parameter["explode"]
                    .as_bool()
                    .unwrap_or(location == Location::Query),
            });
        }
        for segment in path.split('/') {
            if let Some(name) = segment
                .split('{')
                .skip(1)
                .filter_map(|s| s.split_once('}').map(|(n, _)| n))
                .find(|n| {
                    !parameters
                        .iter()
                        .any(|p| p.location == Location::Path && p.name == *n)
                })
            {
                return Err(format!(
                    "operation {operation_id}: its path {path} has {{{name}}}, which no path parameter declares"
                ));
            }
        }

        let request_body = resolve(document, &operation["requestBody"], 0)
            .map_err(|e| format!("operation {operation_id}: requestBody: {e}"))?;
        let body_schema = request_body["content"]
            .as_object()
            .and_then(|content| content.iter().find(|(media, _)| is_json(media)))
            .map(|(_, media)| media["schema"].clone());
        let body_required = request_body["required"] == Value::Bool(true);
        let body = match body_schema {
            Some(schema) => {
                if properties.contains_key("body") {
                    return Err(format!(
                        "operation {operation_id}: a parameter is named \"body\", which is the argument of the request body"
                    ));
                }
                let schema = if schema.is_null() {
                    json!({})
                } else {
                    schema_of(&schema)?
                };
                properties.insert("body".to_owned(), schema);
                if body_required {
                    required.push(Value::String("body".to_owned()));
                }
                true
            }
            None if body_required => {
                return Err(format!(
                    "operation {operation_id}: its request body is not JSON (it takes {}); the gateway sends JSON bodies only",
                    request_body["content"]
                        .as_object()
                        .map(|c| c.keys().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                ));
            }
            None => false,
        };
        let arguments_schema = json!({
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        });
        let arguments = crate::json_schema::compile(&arguments_schema).map_err(|e| {
            format!("operation {operation_id}: its parameters' schemas are not valid JSON Schema: {e}")
        })?;

        let mut answers = Vec::new();
        for (status, response) in operation["responses"].as_object().into_iter().flatten() {
            let Some(answers_to) = answers_of(status) else {
                return Err(format!(
                    "operation {operation_id}: response {status:?} is not a status, a range like 2XX, or default"
                ));
            };
            let response = resolve(document, response, 0)
                .map_err(|e| format!("operation {operation_id}: response {status}: {e}"))?;
            let Some(schema) = response["content"]
                .as_object()
                .and_then(|content| content.iter().find(|(media, _)| is_json(media)))
                .map(|(_, media)| &media["schema"])
                .filter(|schema| !schema.is_null())
            else {
                continue;
            };
            let validator = crate::json_schema::compile(&schema_of(schema)?).map_err(|e| {
                format!(
                    "operation {operation_id}: the schema of response {status} is not valid JSON Schema: {e}"
                )
            })?;
            answers.push((answers_to, validator));
        }
        answers.sort_by_key(|(answers_to, _)| *answers_to);

        Ok(Self {
            operation_id: operation_id.to_owned(),
            method,
            base,
            path: path.to_owned(),
            parameters,
            body,
            arguments_schema,
            arguments,
            answers,
        })
    }

    /// Why a tool declared `risk` may not call this operation, naming the fix.
    pub fn risk_problem(&self, tool: &str, risk: ToolRisk) -> Option<String> {
        let least = minimum_risk(self.method);
        (risk < least).then(|| {
            format!(
                "tool {tool} declares risk {}, but operation {} is {} {}, which is at least {}: raise the tool's risk to {} (and review the policies that match it)",
                risk.as_str(),
                self.operation_id,
                method_name(self.method),
                self.path,
                least.as_str(),
                least.as_str()
            )
        })
    }

    /// The request `args` make (pure): each parameter from the argument of its name, the body
    /// from `body`. Arguments that do not satisfy the operation's schema are refused, naming
    /// the first violation.
    pub fn request(&self, args: &Value) -> Result<Request, String> {
        if let Some(error) = self.arguments.iter_errors(args).next() {
            let at = error.instance_path().to_string();
            let field = if at.is_empty() {
                "the arguments".to_owned()
            } else {
                format!("argument {at}")
            };
            return Err(format!(
                "{field} do not fit operation {}: {error}",
                self.operation_id
            ));
        }
        let mut path = self.path.clone();
        let mut query = Vec::new();
        let mut headers = Vec::new();
        for parameter in &self.parameters {
            let value = &args[parameter.name.as_str()];
            if parameter.location == Location::Path && (value.is_null() || value.as_str() == Some("")) {
                return Err(format!(
                    "argument {} is empty: a path segment of operation {} needs a value",
                    parameter.name, self.operation_id
                ));
            }
            if value.is_null() {
                continue;
            }
            let texts = texts(value).ok_or_else(|| {
                format!(
                    "argument {} is an object; the gateway sends scalars and arrays of scalars as parameters",
                    parameter.name
                )
            })?;
            match parameter.location {
                Location::Path => {
                    let text = texts.join(",");
                    if text.is_empty() {
                        return Err(format!(
                            "argument {} is empty: a path segment of operation {} needs a value",
                            parameter.name, self.operation_id
                        ));
                    }
                    let encoded = utf8_percent_encode(&text, SEGMENT).to_string();
                    path = path.replace(&format!("{{{}}}", parameter.name), &encoded);
                }
                Location::Query if parameter.explode && value.is_array() => {
                    query.extend(texts.into_iter().map(|t| (parameter.name.clone(), t)));
                }
                Location::Query => query.push((parameter.name.clone(), texts.join(","))),
                Location::Header => {
                    let header = HeaderName::from_bytes(parameter.name.as_bytes())
                        .map_err(|e| format!("parameter {}: {e}", parameter.name))?;
                    let value = HeaderValue::from_str(&texts.join(",")).map_err(|_| {
                        format!(
                            "argument {} cannot be sent as header {}: it holds characters a header cannot carry",
                            parameter.name, parameter.name
                        )
                    })?;
                    headers.push((header, value));
                }
            }
        }
        if path.split('/').any(|segment| segment == "." || segment == "..") {
            return Err(format!(
                "the arguments make path {path}, with a `.` or `..` segment, which would leave operation {}",
                self.operation_id
            ));
        }
        let mut url = self.base.clone();
        let joined = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&joined);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let prefix = self.base.path().trim_end_matches('/');
        let below = url.path() == prefix || url.path().starts_with(&format!("{prefix}/"));
        if !same_origin(&url, &self.base) || !below {
            return Err(format!(
                "the arguments make URL {url}, which is not below the API's URL {}",
                self.base
            ));
        }
        let body = match (self.body, &args["body"]) {
            (true, body) if !body.is_null() => {
                Some(serde_json::to_vec(body).map_err(|e| format!("argument body: {e}"))?)
            }
            _ => None,
        };
        Ok(Request {
            method: self.method,
            url: url.to_string(),
            headers,
            body,
        })
    }

    /// The schema the document gives for answers with `status`, if any.
    fn answer_schema(&self, status: u16) -> Option<&(Answers, jsonschema::Validator)> {
        self.answers.iter().find(|(answers_to, _)| match answers_to {
            Answers::Status(s) => *s == status,
            Answers::Class(c) => *c == status / 100,
            Answers::Default => true,
        })
    }

    /// Whether the document gives a schema for answers with `status` (an answer cut short
    /// cannot be checked against it, so it is not taken).
    pub fn describes_answer(&self, status: u16) -> bool {
        self.answer_schema(status).is_some()
    }

    /// Whether `body`, the answer with `status`, is what the document says it is: the schema of
    /// the exact status, else of its range (`2XX`), else `default`. An answer the document gives
    /// no JSON schema for is not checked.
    pub fn check_answer(&self, status: u16, body: &Value) -> Result<(), String> {
        let Some((answers_to, validator)) = self.answer_schema(status) else {
            return Ok(());
        };
        match validator.iter_errors(body).next() {
            None => Ok(()),
            Some(error) => {
                let at = error.instance_path().to_string();
                Err(format!(
                    "the answer of operation {} (HTTP {status}) does not match the schema its document gives for {}: {}{error}",
                    self.operation_id,
                    match answers_to {
                        Answers::Status(s) => s.to_string(),
                        Answers::Class(c) => format!("{c}XX"),
                        Answers::Default => "default".to_owned(),
                    },
                    if at.is_empty() {
                        String::new()
                    } else {
                        format!("at {at}: ")
                    }
                ))
            }
        }
    }
}

/// The operation of `document` with `operation_id`: its path, method, path item and operation.
fn find<'d>(
    document: &'d Value,
    operation_id: &str,
) -> Result<(&'d str, HttpMethod, &'d Value, &'d Value), String> {
    let mut found = Vec::new();
    let mut ids = Vec::new();
    for (path, item) in document["paths"].as_object().into_iter().flatten() {
        for (key, operation) in item.as_object().into_iter().flatten() {
            let Some(id) = operation.get("operationId").and_then(Value::as_str) else {
                continue;
            };
            if id != operation_id {
                ids.push(id);
                continue;
            }
            let method = match key.as_str() {
                "get" => HttpMethod::Get,
                "post" => HttpMethod::Post,
                "put" => HttpMethod::Put,
                "patch" => HttpMethod::Patch,
                "delete" => HttpMethod::Delete,
                other => {
                    return Err(format!(
                        "operation {operation_id} is {}, which ContextOS tools do not call (GET, POST, PUT, PATCH, DELETE)",
                        other.to_ascii_uppercase()
                    ));
                }
            };
            found.push((path.as_str(), method, item, operation));
        }
    }
    match found.as_slice() {
        [one] if one.0.starts_with('/') => Ok(*one),
        [one] => Err(format!(
            "operation {operation_id}: path {:?} does not start with /",
            one.0
        )),
        [] => {
            ids.sort_unstable();
            ids.truncate(20);
            Err(format!(
                "no operation has operationId {operation_id:?} (it has: {})",
                if ids.is_empty() {
                    "none".to_owned()
                } else {
                    ids.join(", ")
                }
            ))
        }
        _ => Err(format!(
            "{} operations have operationId {operation_id:?}; operation ids must be unique",
            found.len()
        )),
    }
}

/// The most parameters an operation, or its path item, may declare.
const MAX_PARAMETERS: usize = 1024;

/// The parameters of an operation: its path item's, each replaced by the operation's own of the
/// same name and location; references resolved.
fn declared_parameters<'a>(
    document: &'a Value,
    item: &'a Value,
    operation: &'a Value,
) -> Result<Vec<&'a Value>, String> {
    let resolved = |list: &'a Value| -> Result<Vec<&'a Value>, String> {
        let list = list.as_array().map_or(&[][..], Vec::as_slice);
        if list.len() > MAX_PARAMETERS {
            return Err(format!(
                "{} parameters in one list; at most {MAX_PARAMETERS}",
                list.len()
            ));
        }
        list.iter().map(|p| resolve(document, p, 0)).collect()
    };
    let own = resolved(&operation["parameters"])?;
    let mut all: Vec<&Value> = resolved(&item["parameters"])?
        .into_iter()
        .filter(|shared| {
            !own.iter()
                .any(|o| o["name"] == shared["name"] && o["in"] == shared["in"])
        })
        .collect();
    all.extend(own);
    Ok(all)
}

/// The API's URL: `server` when the Agent names one; else the operation's, path item's or
/// document's first server (relative to the document's URL, variables at their defaults), which
/// must be on the document's own origin.
fn base_url(
    document_url: &str,
    document: &Value,
    item: &Value,
    operation: &Value,
    server: Option<&str>,
) -> Result<reqwest::Url, String> {
    let document_url =
        reqwest::Url::parse(document_url).map_err(|e| format!("document URL {document_url}: {e}"))?;
    let base = match server {
        Some(server) => reqwest::Url::parse(server).map_err(|e| format!("server {server}: {e}"))?,
        None => {
            let declared = [&operation["servers"], &item["servers"], &document["servers"]]
                .into_iter()
                .find_map(|servers| servers.get(0).filter(|s| s.is_object()))
                .cloned()
                .unwrap_or_else(|| json!({"url": "/"}));
            let mut url = declared["url"].as_str().unwrap_or("/").to_owned();
            for (name, variable) in declared["variables"].as_object().into_iter().flatten() {
                let default = variable["default"].as_str().unwrap_or_default();
                url = url.replace(&format!("{{{name}}}"), default);
            }
            if url.contains('{') {
                return Err(format!(
                    "the document's server URL {url} has a variable without a default; set adapter.openapi.server"
                ));
            }
            let base = document_url
                .join(&url)
                .map_err(|e| format!("the document's server URL {url}: {e}"))?;
            if !same_origin(&base, &document_url) {
                return Err(format!(
                    "the document at {document_url} names server {base}, which is not on its own scheme, host and port; set adapter.openapi.server to call that API (its credentials go there)"
                ));
            }
            base
        }
    };
    if !base.username().is_empty() || base.password().is_some() {
        return Err(format!("the API's URL {base} carries credentials; use secretRef"));
    }
    let mut base = base;
    base.set_query(None);
    base.set_fragment(None);
    let trimmed = base.path().trim_end_matches('/').to_owned();
    base.set_path(&trimmed);
    Ok(base)
}

fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str().map(str::to_ascii_lowercase) == b.host_str().map(str::to_ascii_lowercase)
        && a.port_or_known_default() == b.port_or_known_default()
}

/// `application/json`, `application/problem+json`, … (parameters such as `; charset` aside).
fn is_json(media: &str) -> bool {
    let essence = media
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn answers_of(status: &str) -> Option<Answers> {
    if status == "default" {
        return Some(Answers::Default);
    }
    match status.as_bytes() {
        [d @ b'1'..=b'5', x, y] if x.eq_ignore_ascii_case(&b'x') && y.eq_ignore_ascii_case(&b'x') => {
            Some(Answers::Class(u16::from(d - b'0')))
        }
        _ => status
            .parse()
            .ok()
            .filter(|s| (100..600).contains(s))
            .map(Answers::Status),
    }
}

/// A parameter's value as text: a scalar, or each element of an array of scalars.
fn texts(value: &Value) -> Option<Vec<String>> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match value {
        Value::Array(items) => items.iter().map(scalar).collect(),
        other => scalar(other).map(|s| vec![s]),
    }
}

/// An OpenAPI 3.0 schema as the JSON Schema it means: `nullable: true` adds `null` to the type,
/// and boolean `exclusiveMinimum`/`exclusiveMaximum` become the bounds they qualify.
fn as_json_schema(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("nullable") == Some(&Value::Bool(true)) {
                map.remove("nullable");
                if let Some(Value::String(t)) = map.get("type").cloned() {
                    map.insert("type".into(), json!([t, "null"]));
                }
            }
            for (flag, bound) in [("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")] {
                if let Some(Value::Bool(exclusive)) = map.get(flag).cloned() {
                    map.remove(flag);
                    if exclusive && let Some(limit) = map.remove(bound) {
                        map.insert(flag.into(), limit);
                    }
                }
            }
            map.values_mut().for_each(as_json_schema);
        }
        Value::Array(items) => items.iter_mut().for_each(as_json_schema),
        _ => {}
    }
}

/// An operation bound from a document, or why it cannot be: kept either way, so a document
/// the gateway refuses is not bound again on every call.
type Bound = Arc<Result<Binding, String>>;

/// A document as read: its digest and its content.
#[derive(Debug)]
struct Document {
    sha256: String,
    content: Value,
}

/// Documents and operations kept at once.
const KEPT: usize = 64;

/// The OpenAPI side of a gateway: one HTTP client (the gateway's, egress-guarded in the
/// service), the documents it read (by URL and by the credential they were read with: a
/// server may show each caller its own) and the operations bound from them.
#[derive(Debug)]
pub struct OpenApiClient {
    http: reqwest::Client,
    documents: Mutex<HashMap<DocumentKey, (Instant, Arc<Document>)>>,
    bound: Mutex<HashMap<BindingKey, (Instant, Bound)>>,
}

/// A document read: the URL it was read from, and a digest of the token it was read with.
type DocumentKey = (String, Option<String>);
/// An operation bound: the document's digest, its declared URL (servers resolve against it),
/// the operation id and the Agent's `server`.
type BindingKey = (String, String, String, Option<String>);

impl OpenApiClient {
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            documents: Mutex::new(HashMap::new()),
            bound: Mutex::new(HashMap::new()),
        }
    }

    /// Calls the operation `adapter` names for tool `tool` (declared `risk`) with `args`:
    /// `rewrite` is the endpoint override (applied to the document's URL and to the request's,
    /// after every check is made on the URLs the Agent declared). Reading the document and the
    /// call share the tool's timeout.
    pub async fn call(
        &self,
        adapter: &OpenApiAdapter,
        tool: &str,
        risk: ToolRisk,
        rewrite: &(dyn Fn(&str) -> String + Sync),
        args: &Value,
        ctx: &CallContext,
    ) -> Result<AdapterResponse, AdapterError> {
        let started = Instant::now();
        let binding = self.binding(adapter, rewrite, ctx).await?;
        let binding = binding
            .as_ref()
            .as_ref()
            .map_err(|e| AdapterError::Mismatch(e.clone()))?;
        if let Some(problem) = binding.risk_problem(tool, risk) {
            return Err(AdapterError::Mismatch(problem));
        }
        let request = binding.request(args).map_err(AdapterError::Mismatch)?;
        let Some(left) = ctx
            .timeout
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
        else {
            return Err(AdapterError::DocumentUnavailable {
                detail: format!(
                    "reading it took the whole timeout ({:?}); nothing was sent",
                    ctx.timeout
                ),
                retryable: true,
            });
        };
        let url = rewrite(&request.url);
        let endpoint = http::endpoint_of(&url);
        let mut builder = self
            .http
            .request(method_of(request.method), &url)
            .timeout(left)
            .header("accept", "application/json")
            .header("idempotency-key", &ctx.idempotency_key)
            .header("traceparent", &ctx.traceparent);
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder.header("content-type", "application/json").body(body);
        }
        if let Some(token) = &ctx.bearer_token {
            builder = builder.bearer_auth(token);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| http::classify(&endpoint, ctx, &e))?;
        let status = response.status().as_u16();
        let (bytes, truncated) = http::read_capped(response, ctx.max_response_bytes, &endpoint, ctx).await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !(200..300).contains(&status) {
            return Err(AdapterError::Status {
                status,
                body: text.chars().take(512).collect(),
            });
        }
        if truncated {
            if binding.describes_answer(status) {
                // A cut answer cannot be checked, and unchecked it would pass for one.
                return Err(AdapterError::Protocol(format!(
                    "the answer of operation {} (HTTP {status}) is longer than maxResponseBytes ({}), so it cannot be checked against its document",
                    binding.operation_id, ctx.max_response_bytes
                )));
            }
            return Ok(AdapterResponse {
                status,
                body: Value::String(text),
                truncated,
            });
        }
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(text))
        };
        binding
            .check_answer(status, &body)
            .map_err(AdapterError::Protocol)?;
        Ok(AdapterResponse {
            status,
            body,
            truncated,
        })
    }

    /// The operation `adapter` names, bound from its document (read at most once a minute).
    async fn binding(
        &self,
        adapter: &OpenApiAdapter,
        rewrite: &(dyn Fn(&str) -> String + Sync),
        ctx: &CallContext,
    ) -> Result<Bound, AdapterError> {
        let document = self.document(adapter, rewrite, ctx).await?;
        if let Some(pinned) = &adapter.document_sha256
            && *pinned != document.sha256
        {
            return Err(pin_mismatch(adapter, &document.sha256));
        }
        let key = (
            document.sha256.clone(),
            adapter.document.clone(),
            adapter.operation_id.clone(),
            adapter.server.clone(),
        );
        if let Some((_, bound)) = lock(&self.bound).get(&key) {
            return Ok(bound.clone());
        }
        // Bound outside the lock and off the threads that serve requests: a large document
        // takes a while, and other calls go on.
        let (url, operation, server) = (
            adapter.document.clone(),
            adapter.operation_id.clone(),
            adapter.server.clone(),
        );
        // Held by the work itself: a caller that gives up does not free it before it ends.
        let reading = READING.acquire().await;
        let bound = Arc::new(
            tokio::task::spawn_blocking(move || {
                let _reading = reading;
                Binding::new(&url, &document.content, &operation, server.as_deref())
            })
            .await
            .unwrap_or_else(|e| Err(format!("binding the operation failed: {e}"))),
        );
        keep(&mut lock(&self.bound), key, bound.clone());
        Ok(bound)
    }

    async fn document(
        &self,
        adapter: &OpenApiAdapter,
        rewrite: &(dyn Fn(&str) -> String + Sync),
        ctx: &CallContext,
    ) -> Result<Arc<Document>, AdapterError> {
        let url = rewrite(&adapter.document);
        // The token is the API's: it goes to the document only on the API's own origin (always,
        // when the API's URL comes from the document, which must keep to its origin).
        let api = reqwest::Url::parse(adapter.base_url());
        let declared = reqwest::Url::parse(&adapter.document);
        let token = match (&ctx.bearer_token, api, declared) {
            (Some(token), Ok(api), Ok(declared)) if same_origin(&api, &declared) => Some(token),
            _ => None,
        };
        let key = (
            url.clone(),
            token.map(|t| hex::encode(sha2::Sha256::digest(t.as_bytes()))),
        );
        if let Some((at, document)) = lock(&self.documents).get(&key)
            && at.elapsed() < DOCUMENT_TTL
        {
            return Ok(document.clone());
        }
        let unavailable = |error: AdapterError| AdapterError::DocumentUnavailable {
            retryable: error.is_retryable(),
            detail: format!("{url}: {error}"),
        };
        let endpoint = http::endpoint_of(&url);
        let mut request = self
            .http
            .get(&url)
            .timeout(ctx.timeout)
            .header("accept", "application/json, application/yaml;q=0.9, */*;q=0.1")
            .header("traceparent", &ctx.traceparent);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(http::classify(&endpoint, ctx, &e)))?;
        let status = response.status().as_u16();
        let bytes = http::read_bounded(response, DOCUMENT_MAX_BYTES, &endpoint, ctx)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                unavailable(AdapterError::Protocol(format!(
                    "larger than {DOCUMENT_MAX_BYTES} bytes"
                )))
            })?;
        if !(200..300).contains(&status) {
            return Err(unavailable(AdapterError::Status {
                status,
                body: String::from_utf8_lossy(&bytes).chars().take(512).collect(),
            }));
        }
        let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        // A pinned document that changed is not read at all: reading is where a hostile one
        // would cost the most.
        if let Some(pinned) = &adapter.document_sha256
            && *pinned != sha256
        {
            return Err(pin_mismatch(adapter, &sha256));
        }
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| unavailable(AdapterError::Protocol("not UTF-8 text".into())))?;
        // Reading a large YAML document takes a while: off the threads that serve requests.
        let reading = READING.acquire().await;
        let content = tokio::task::spawn_blocking(move || {
            let _reading = reading;
            parse_document(&text)
        })
        .await
        .map_err(|e| unavailable(AdapterError::Protocol(format!("reading it failed: {e}"))))?
        .map_err(|e| unavailable(AdapterError::Protocol(format!("not JSON or YAML: {e}"))))?;
        let document = Arc::new(Document { sha256, content });
        keep(&mut lock(&self.documents), key, document.clone());
        Ok(document)
    }
}

/// The document at `adapter`'s URL hashes to `sha256`, not to the tool's pin.
fn pin_mismatch(adapter: &OpenApiAdapter, sha256: &str) -> AdapterError {
    AdapterError::Mismatch(format!(
        "the document at {} has SHA-256 {sha256}, not the {} the tool pins (adapter.openapi.documentSha256): review what changed, then update the pin",
        adapter.document,
        adapter.document_sha256.as_deref().unwrap_or_default()
    ))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps `value` under `key`, dropping the oldest entry when [`KEPT`] are kept already.
fn keep<K: Clone + Eq + std::hash::Hash, V>(kept: &mut HashMap<K, (Instant, V)>, key: K, value: V) {
    if kept.len() >= KEPT
        && !kept.contains_key(&key)
        && let Some(oldest) = kept.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone())
    {
        kept.remove(&oldest);
    }
    kept.insert(key, (Instant::now(), value));
}

fn method_of(method: HttpMethod) -> reqwest::Method {
    match method {
        HttpMethod::Get => reqwest::Method::GET,
        HttpMethod::Post => reqwest::Method::POST,
        HttpMethod::Put => reqwest::Method::PUT,
        HttpMethod::Patch => reqwest::Method::PATCH,
        HttpMethod::Delete => reqwest::Method::DELETE,
    }
}

#[cfg(test)]
mod tests;
