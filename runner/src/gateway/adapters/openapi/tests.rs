use serde_json::json;

use super::*;

const DOC: &str = "http://tickets.svc:8080/openapi.json";

/// A document as FastAPI writes one (OpenAPI 3.1, no `servers`: the API is at the document's
/// origin).
fn tickets() -> Value {
    json!({
        "openapi": "3.1.0",
        "paths": {
            "/tickets/{ticket_id}": {
                "parameters": [{"name": "ticket_id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "get": {
                    "operationId": "get_ticket",
                    "parameters": [
                        {"name": "fields", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}},
                        {"name": "x-region", "in": "header", "schema": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                        {"name": "session", "in": "cookie", "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ticket"}}}},
                        "4XX": {"content": {"application/problem+json": {"schema": {"type": "object", "required": ["detail"]}}}}
                    }
                },
                "delete": {"operationId": "close_ticket", "responses": {"204": {"description": "closed"}}}
            },
            "/tickets": {
                "post": {
                    "operationId": "create_ticket",
                    "parameters": [{"name": "notify", "in": "query", "schema": {"type": "boolean"}}],
                    "requestBody": {"required": true, "content": {"application/json; charset=utf-8": {"schema": {"$ref": "#/components/schemas/NewTicket"}}}},
                    "responses": {"default": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ticket"}}}}}
                }
            }
        },
        "components": {"schemas": {
            "Ticket": {"type": "object", "required": ["id", "status"], "properties": {"id": {"type": "string"}, "status": {"enum": ["open", "closed"]}}},
            "NewTicket": {"type": "object", "required": ["title"], "properties": {"title": {"type": "string", "minLength": 1}}}
        }}
    })
}

fn bind(document: &Value, operation: &str) -> Binding {
    Binding::new(DOC, document, operation, None).expect("bound")
}

fn refusal(document: &Value, operation: &str, server: Option<&str>) -> String {
    Binding::new(DOC, document, operation, server).expect_err("refused")
}

#[test]
fn parameters_and_body_are_the_arguments_of_their_names_and_nothing_else() {
    let get = bind(&tickets(), "get_ticket");
    assert_eq!(get.method, HttpMethod::Get);
    assert_eq!(
        get.arguments_schema["required"],
        json!(["ticket_id"]),
        "path parameters are required, optional cookies are not offered"
    );
    assert!(get.arguments_schema["properties"].get("session").is_none());
    let request = get
        .request(&json!({"ticket_id": "T 1/../x?y#z%2e", "fields": ["a", "b c"], "x-region": "eu"}))
        .expect("mapped");
    assert_eq!(
        request.url, "http://tickets.svc:8080/tickets/T%201%2F..%2Fx%3Fy%23z%252e?fields=a&fields=b+c",
        "an argument stays inside its path segment"
    );
    assert_eq!(
        request.headers,
        vec![(
            HeaderName::from_static("x-region"),
            HeaderValue::from_static("eu")
        )]
    );
    assert_eq!(request.body, None);
    // A null optional argument is left out, as FastAPI's `anyOf [T, null]` allows.
    let request = get
        .request(&json!({"ticket_id": "7", "x-region": null}))
        .expect("mapped");
    assert_eq!(request.url, "http://tickets.svc:8080/tickets/7");
    assert!(request.headers.is_empty());

    let create = bind(&tickets(), "create_ticket");
    let request = create
        .request(&json!({"notify": true, "body": {"title": "disk full"}}))
        .expect("mapped");
    assert_eq!(request.url, "http://tickets.svc:8080/tickets?notify=true");
    assert_eq!(request.body.as_deref(), Some(&br#"{"title":"disk full"}"#[..]));
}

#[test]
fn arguments_the_operation_does_not_take_are_refused_naming_them() {
    let get = bind(&tickets(), "get_ticket");
    for (args, says) in [
        (json!({"ticket_id": "7", "force": true}), "force"),
        (json!({"fields": ["a"]}), "ticket_id"),
        (json!({"ticket_id": ".."}), "`..` segment"),
        (json!({"ticket_id": "."}), "`..` segment"),
        (json!({"ticket_id": ""}), "is empty"),
        (
            json!({"ticket_id": "7", "x-region": "eu\r\nx-admin: 1"}),
            "cannot be sent as header",
        ),
        (json!({"ticket_id": {"id": 7}}), "ticket_id"),
        (json!(["7"]), "the arguments"),
    ] {
        let refused = get.request(&args).expect_err("refused");
        assert!(refused.contains(says), "{args}: {refused}");
    }
    let create = bind(&tickets(), "create_ticket");
    let refused = create
        .request(&json!({"body": {"title": ""}}))
        .expect_err("refused");
    assert!(refused.starts_with("argument /body/title"), "{refused}");
    assert!(
        create
            .request(&json!({"notify": true}))
            .expect_err("refused")
            .contains("body")
    );
}

#[test]
fn the_method_bounds_the_declared_risk() {
    let document = tickets();
    let close = bind(&document, "close_ticket");
    let problem = close
        .risk_problem("close", ToolRisk::Network)
        .expect("a DELETE declared network");
    assert!(
        problem.contains("DELETE /tickets/{ticket_id}, which is at least destructive"),
        "{problem}"
    );
    assert_eq!(close.risk_problem("close", ToolRisk::Destructive), None);
    let create = bind(&document, "create_ticket");
    assert!(create.risk_problem("create", ToolRisk::ReadOnly).is_some());
    assert!(create.risk_problem("create", ToolRisk::LocalWrite).is_some());
    assert_eq!(create.risk_problem("create", ToolRisk::Network), None);
    assert_eq!(
        bind(&document, "get_ticket").risk_problem("get", ToolRisk::ReadOnly),
        None
    );
}

#[test]
fn answers_are_checked_against_the_most_specific_documented_schema() {
    let get = bind(&tickets(), "get_ticket");
    assert_eq!(
        get.check_answer(200, &json!({"id": "7", "status": "open"})),
        Ok(())
    );
    let wrong = get
        .check_answer(200, &json!({"id": 7, "status": "open"}))
        .expect_err("refused");
    assert!(wrong.contains("HTTP 200") && wrong.contains("at /id:"), "{wrong}");
    assert!(
        get.check_answer(404, &json!({"error": "x"}))
            .expect_err("refused")
            .contains("4XX")
    );
    assert_eq!(
        get.check_answer(503, &json!("anything")),
        Ok(()),
        "undocumented: not checked"
    );
    let create = bind(&tickets(), "create_ticket");
    assert!(
        create
            .check_answer(201, &json!({}))
            .expect_err("refused")
            .contains("default")
    );
    assert_eq!(
        bind(&tickets(), "close_ticket").check_answer(204, &Value::Null),
        Ok(())
    );
}

#[test]
fn openapi_3_0_yaml_documents_bind_with_their_schemas_as_json_schema() {
    let yaml = r"
openapi: 3.0.3
servers: [{url: '/api/{version}', variables: {version: {default: v2}}}]
paths:
  /limits:
    put:
      operationId: setLimit
      requestBody:
        content: {application/json: {schema: {type: object, properties: {max: {type: integer, minimum: 0, exclusiveMinimum: true, nullable: true}}}}}
      responses:
        200: {description: ok, content: {application/json: {schema: {type: object, properties: {max: {type: integer, nullable: true}}}}}}
";
    let document: Value = serde_yaml::from_str(yaml).expect("yaml");
    let put = bind(&document, "setLimit");
    let request = put.request(&json!({"body": {"max": null}})).expect("nullable");
    assert_eq!(request.url, "http://tickets.svc:8080/api/v2/limits");
    assert!(
        put.request(&json!({"body": {"max": 0}})).is_err(),
        "exclusive minimum"
    );
    assert!(put.request(&json!({"body": {"max": 1}})).is_ok());
    assert!(put.request(&json!({})).is_ok(), "the body is optional");
    assert!(
        put.check_answer(200, &json!({"max": "1"})).is_err(),
        "integer keys of YAML are statuses"
    );
    assert_eq!(put.check_answer(200, &json!({"max": null})), Ok(()));
}

#[test]
fn a_document_cannot_send_calls_off_its_origin_unless_the_agent_says_so() {
    let mut document = tickets();
    document["servers"] = json!([{"url": "https://collector.example.net/v1"}]);
    let refused = refusal(&document, "get_ticket", None);
    assert!(refused.contains("set adapter.openapi.server"), "{refused}");
    let bound = Binding::new(
        DOC,
        &document,
        "get_ticket",
        Some("https://tickets.example.com/v1/"),
    )
    .expect("the Agent names the API");
    assert_eq!(
        bound.request(&json!({"ticket_id": "7"})).expect("mapped").url,
        "https://tickets.example.com/v1/tickets/7"
    );
    document["servers"] = json!([{"url": "//collector.example.net/"}]);
    assert!(refusal(&document, "get_ticket", None).contains("not on its own scheme"));
    document["servers"] = json!([{"url": "http://user:pw@tickets.svc:8080/"}]);
    assert!(refusal(&document, "get_ticket", None).contains("credentials"));
}

#[test]
fn operations_that_cannot_be_called_as_governed_are_refused_with_the_reason() {
    // `document` with the member at `path` set to `value`.
    let with = |path: &str, value: Value| {
        let mut document = tickets();
        let (parent, key) = path.rsplit_once('/').expect("a member");
        let key = key.replace("~1", "/").replace("~0", "~");
        match document.pointer_mut(parent).expect("parent") {
            Value::Object(map) => {
                map.insert(key, value);
            }
            Value::Array(items) => items[key.parse::<usize>().expect("index")] = value,
            other => panic!("{parent} is {other}"),
        }
        document
    };
    let cases = [
        (
            tickets(),
            "nope",
            "no operation has operationId \"nope\" (it has: close_ticket, create_ticket, get_ticket)",
        ),
        (
            with("/paths/~1tickets/post/operationId", json!("get_ticket")),
            "get_ticket",
            "2 operations have operationId",
        ),
        (
            with(
                "/paths/~1tickets~1{ticket_id}/get/parameters/1/name",
                json!("Authorization"),
            ),
            "get_ticket",
            "header the gateway sets itself",
        ),
        (
            with(
                "/paths/~1tickets~1{ticket_id}/get/parameters/1/name",
                json!("X-HTTP-Method-Override"),
            ),
            "get_ticket",
            "changes the method",
        ),
        (
            with(
                "/paths/~1tickets~1{ticket_id}/get/parameters/1/name",
                json!("X-Forwarded-For"),
            ),
            "get_ticket",
            "client's address",
        ),
        (
            with(
                "/paths/~1tickets~1{ticket_id}/get/parameters/0/name",
                json!("_method"),
            ),
            "get_ticket",
            "overrides the request's method",
        ),
        (
            with(
                "/paths/~1tickets~1{ticket_id}/get/parameters/2/required",
                json!(true),
            ),
            "get_ticket",
            "required cookie",
        ),
        (
            with(
                "/paths/~1tickets~1{ticket_id}/get/parameters/0/style",
                json!("deepObject"),
            ),
            "get_ticket",
            "style \"deepObject\"",
        ),
        (
            with(
                "/paths/~1tickets/post/requestBody/content",
                json!({"multipart/form-data": {}}),
            ),
            "create_ticket",
            "not JSON (it takes multipart/form-data)",
        ),
        (
            with("/paths/~1tickets/post/parameters/0/name", json!("body")),
            "create_ticket",
            "named \"body\"",
        ),
        (
            with("/paths/~1tickets~1{ticket_id}/parameters", json!([])),
            "get_ticket",
            "no path parameter declares",
        ),
        (
            with(
                "/paths/~1tickets~1{ticket_id}/get/responses/200/content/application~1json/schema",
                json!({"type": 7}),
            ),
            "get_ticket",
            "not valid JSON Schema",
        ),
        (
            with("/openapi", json!("2.0")),
            "get_ticket",
            "not an OpenAPI 3 document",
        ),
    ];
    for (document, operation, says) in cases {
        let refused = refusal(&document, operation, None);
        assert!(refused.contains(says), "{says}: {refused}");
    }
    let mut head = tickets();
    head["paths"]["/tickets"]["head"] = json!({"operationId": "peek"});
    assert!(refusal(&head, "peek", None).contains("HEAD"));
}

#[test]
fn keywords_beside_a_reference_constrain_too() {
    let mut document = tickets();
    document["paths"]["/tickets"]["post"]["requestBody"]["content"]["application/json; charset=utf-8"]["schema"] =
        json!({"$ref": "#/components/schemas/NewTicket", "required": ["title", "owner"]});
    let create = bind(&document, "create_ticket");
    let refused = create
        .request(&json!({"body": {"title": "x"}}))
        .expect_err("owner is required beside the $ref");
    assert!(refused.contains("owner"), "{refused}");
    assert!(
        create
            .request(&json!({"body": {"title": "x", "owner": "ops"}}))
            .is_ok()
    );
}

#[test]
fn one_operation_has_one_inlining_budget() {
    // A reference that fans out to ~2^15 nodes, and 40 parameters each using it: within one
    // budget per schema each, far beyond one budget for the operation.
    let mut schemas = serde_json::Map::new();
    for i in 0..15 {
        let next = format!("#/components/schemas/S{}", i + 1);
        schemas.insert(
            format!("S{i}"),
            json!({"properties": {"a": {"$ref": next}, "b": {"$ref": next}}}),
        );
    }
    schemas.insert("S15".into(), json!({"type": "string"}));
    let parameters: Vec<Value> = (0..40)
        .map(|i| json!({"name": format!("p{i}"), "in": "query", "schema": {"$ref": "#/components/schemas/S0"}}))
        .collect();
    let document = json!({
        "openapi": "3.1.0",
        "paths": {"/x": {"get": {"operationId": "x", "parameters": parameters}}},
        "components": {"schemas": schemas},
    });
    assert!(refusal(&document, "x", None).contains("more than 100000 nodes"));
}

#[test]
fn yaml_aliases_cannot_blow_a_small_document_up() {
    // 200,000 values named once and used 25 times: 5 million values from 400 kB, within what
    // the YAML reader's own repetition limit lets through (100 times the document's events).
    let mut yaml = format!(
        "openapi: 3.1.0\nmany: &many [{}]\nuses:\n",
        vec!["1"; 200_000].join(",")
    );
    yaml.push_str(&"  - *many\n".repeat(25));
    let refused = crate::openapi::parse_document(&yaml).expect_err("5 million values refused");
    assert!(refused.contains("aliases are expanded"), "{refused}");
    let small: Value =
        crate::openapi::parse_document("openapi: 3.0.0\nresponses: {200: {a: &x [1, 2]}, 404: {b: *x}}\n")
            .expect("a small YAML document");
    assert_eq!(
        small["responses"]["404"]["b"],
        json!([1, 2]),
        "aliases and numeric keys read"
    );
}

#[test]
fn parameters_are_bounded_however_they_are_referenced() {
    // Thousands of references to one parameter: each resolves to the same declaration, and a
    // list this long is refused before its names are compared with the path item's.
    let parameters = vec![json!({"$ref": "#/components/parameters/P"}); 5_000];
    let document = json!({
        "openapi": "3.1.0",
        "paths": {"/x": {"parameters": parameters, "get": {"operationId": "x", "parameters": parameters}}},
        "components": {"parameters": {"P": {"name": "p", "in": "query", "schema": {"type": "string"}}}},
    });
    let refused = refusal(&document, "x", None);
    assert!(
        refused.contains("5000 parameters in one list; at most 1024"),
        "{refused}"
    );
}
