//! Fuzzing on stable Rust: every decoder of bytes that come from outside the trusted core — a
//! tenant's YAML, a runner's envelope and report, a model's answer, a tool server's response,
//! a record read back from the store, a signed context or verdict — is fed mutated inputs, and
//! none may panic. Each target starts from real seeds (the quickstart, signed contexts, a
//! recorded chain) and mutates them with a seeded generator, so a run is reproducible.
//!
//! `cargo test` runs a short pass (`CONTEXTOS_FUZZ_SECONDS`, default 1 s per target);
//! `make fuzz` runs each target for a minute in release. A panic is reported with its input
//! (saved under `target/fuzz/`); a crash that cannot be caught (a stack overflow) leaves the
//! input it died on in `target/fuzz/last-input-<target>`.

use std::{
    collections::BTreeMap,
    panic::AssertUnwindSafe,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use contextos_crds::{Agent, ContextPack, Policy, SandboxProfile, Session};
use contextos_runner::{
    audit,
    gateway::envelope::CallEnvelope,
    keys::KeyPair,
    manifests::ManifestSet,
    model::{openai::parse_turn, scripted::ScriptedModel},
    policy::{CallFacts, PolicySet, RunFacts, StateFacts, compile_policy},
    read_grant::SignedReadGrant,
    records::{
        EntryBody, Hash, RecordEntry, TenantId, entry::StoredEntry, store::SignedHead, verify_entries,
    },
    run::{
        bundle::RunBundle,
        gate::{GateVerdict, GatedKind, SignedGateVerdict},
        issue_run_context,
        pod::PodReport,
        replay::ReplayGate,
        validate,
    },
    run_context::{SignedRunContext, effective_limits},
};
use serde_json::{Value, json};

/// What every target may use: keys, a clock, the quickstart.
struct Fixtures {
    key: KeyPair,
    now: i64,
    bundle: RunBundle,
}

type Target = fn(&[u8], &Fixtures);

struct Spec {
    name: &'static str,
    run: Target,
    seeds: Vec<Vec<u8>>,
}

fn main() {
    let seconds: f64 = std::env::var("CONTEXTOS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join("target/fuzz");
    std::fs::create_dir_all(&out).expect("target/fuzz");
    let fixtures = fixtures(&root);
    let specs = specs(&root, &fixtures);
    let panics: Arc<Mutex<Option<String>>> = Arc::default();
    let hook_panics = panics.clone();
    std::panic::set_hook(Box::new(move |info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if let Ok(mut slot) = hook_panics.lock() {
            *slot = Some(format!("{message} at {at}"));
        }
    }));
    println!(
        "{:<18} {:>12} {:>12} {:>8}",
        "target", "inputs", "inputs/s", "panics"
    );
    let mut failed = Vec::new();
    let mut total = 0u64;
    for spec in specs {
        if only.as_deref().is_some_and(|o| !spec.name.contains(o)) {
            continue;
        }
        let last = out.join(format!("last-input-{}", spec.name));
        let mut rng = Rng::new(0x5eed ^ spec.name.len() as u64);
        let budget = Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let mut inputs = 0u64;
        let mut found: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        // Seeds first, unchanged; then mutations.
        let mut queue: Vec<Vec<u8>> = spec.seeds.clone();
        while started.elapsed() < budget || !queue.is_empty() {
            let input = queue.pop().unwrap_or_else(|| mutate(&mut rng, &spec.seeds));
            // Written before each input only every so often is not enough to find an abort's
            // input, and one small write is cheap next to a decode.
            let _ = std::fs::write(&last, &input);
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| (spec.run)(&input, &fixtures)));
            inputs += 1;
            if result.is_err() {
                let message = panics.lock().ok().and_then(|mut p| p.take()).unwrap_or_default();
                found.entry(message).or_insert(input);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        total += inputs;
        println!(
            "{:<18} {:>12} {:>12.0} {:>8}",
            spec.name,
            inputs,
            inputs as f64 / elapsed.max(1e-9),
            found.len()
        );
        for (i, (message, input)) in found.iter().enumerate() {
            let path = out.join(format!("crash-{}-{i}", spec.name));
            let _ = std::fs::write(&path, input);
            failed.push(format!("{}: {message} (input: {})", spec.name, path.display()));
        }
    }
    println!("{total} inputs in all");
    if !failed.is_empty() {
        eprintln!("panics:\n  {}", failed.join("\n  "));
        std::process::exit(1);
    }
}

fn fixtures(root: &std::path::Path) -> Fixtures {
    let bundle = ManifestSet::load(&[root.join("examples/quickstart")])
        .expect("the quickstart loads")
        .bundle("shop", None)
        .expect("a bundle");
    Fixtures {
        key: KeyPair::from_seed([7; 32]),
        now: 1_800_000_000_000,
        bundle,
    }
}

fn json_bytes(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("json")
}

fn specs(root: &std::path::Path, fx: &Fixtures) -> Vec<Spec> {
    let context = issue_run_context(
        &fx.bundle,
        "run-1",
        &"ab".repeat(16),
        Some("s-run-1"),
        &fx.key,
        fx.now,
    )
    .expect("a context");
    let envelope = json!({
        "call_id": "1.0", "tool": "restart_deployment", "arguments": {"deployment": "checkout-api"},
        "risk": "destructive", "kind": "act", "idempotency_key": "k-1",
        "traceparent": format!("00-{}-0000000000000001-01", "ab".repeat(16)),
        "run_context": context,
    });
    let chain = chain_seed(fx);
    let example = |name: &str| std::fs::read(root.join("examples/quickstart").join(name)).expect("example");
    let script: Value = serde_yaml::from_slice::<Value>(&example("configmaps.yaml"))
        .ok()
        .and_then(|v| {
            v["data"]["script.json"]
                .as_str()
                .map(|s| Value::String(s.to_owned()))
        })
        .unwrap_or(Value::Null);
    let configmaps = String::from_utf8_lossy(&example("configmaps.yaml")).into_owned();
    let script_seed = configmaps
        .split("script.json: |")
        .nth(1)
        .map(|s| s.lines().map(str::trim).collect::<Vec<_>>().join("\n"))
        .unwrap_or_else(|| script.to_string());
    let verdict = SignedGateVerdict::sign(
        GateVerdict {
            job: "replay-policy-p-0123456789".into(),
            job_uid: "0d4c6a1e-5b7f-4c39-9e2a-7f1b2c3d4e5f".into(),
            round: Some(contextos_runner::run::gate::GateRound {
                uid: "6e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b".into(),
                serial: 3,
            }),
            kind: GatedKind::Policy,
            name: "p".into(),
            candidate_digest: "sha256:00".into(),
            gate: ReplayGate::no_history(&["run r is still running".into()]),
        },
        &fx.key,
    );
    let completion = json!({"choices": [{"message": {"content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_service_status", "arguments": "{\"service\":\"checkout-api\"}"}}
    ]}}], "usage": {"prompt_tokens": 12, "completion_tokens": 3}});
    let report = json!({"outcome": "awaiting_approval", "runId": "r", "steps": 3,
        "usage": {"steps": 3, "tokens": 10, "tool_calls": 2, "wall_ms": 5},
        "head": "00", "awaiting": {"callId": "3.0", "callHash": "h", "tool": "restart_deployment",
        "arguments": {}, "rule": "p/r", "reason": "why", "approvers": {"users": ["a"]}}});
    let conditions: Vec<Vec<u8>> = [
        "call.risk == 'destructive' && !('sre' in run.groups)",
        "call.args.severity == 'sev1'",
        "call.args.lines.all(l, size(l) < 200) && state.budget == 'ok'",
        "run.input.data.priority > 3 || call.tool.startsWith('get_')",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    vec![
        Spec {
            name: "run_context",
            run: target_run_context,
            seeds: vec![json_bytes(&context)],
        },
        Spec {
            name: "call_envelope",
            run: target_call_envelope,
            seeds: vec![json_bytes(&envelope)],
        },
        Spec {
            name: "record_entry",
            run: target_record_entry,
            seeds: chain.clone(),
        },
        Spec {
            name: "record_chain",
            run: target_record_chain,
            seeds: vec![chain.join(&b'\n')],
        },
        Spec {
            name: "pod_report",
            run: target_pod_report,
            seeds: vec![json_bytes(&report)],
        },
        Spec {
            name: "gate_verdict",
            run: target_gate_verdict,
            seeds: vec![json_bytes(&verdict)],
        },
        Spec {
            name: "model_script",
            run: target_model_script,
            seeds: vec![script_seed.into_bytes()],
        },
        Spec {
            name: "chat_completion",
            run: target_chat_completion,
            seeds: vec![json_bytes(&completion)],
        },
        Spec {
            name: "cel_condition",
            run: target_cel_condition,
            seeds: conditions,
        },
        Spec {
            name: "crd_specs",
            run: target_crd_specs,
            seeds: [
                "agent.yaml",
                "skills.yaml",
                "policy.yaml",
                "contextpack.yaml",
                "sandboxprofile.yaml",
                "session.yaml",
            ]
            .iter()
            .map(|f| example(f))
            .collect(),
        },
        Spec {
            name: "audit_manifests",
            run: target_audit_manifests,
            seeds: vec![
                std::fs::read(root.join("runner/tests/audit/good/harness.yaml")).expect("good harness"),
                std::fs::read(root.join("runner/tests/audit/good/install.yaml")).expect("install"),
                example("agent.yaml"),
            ],
        },
        Spec {
            name: "personal_data",
            run: target_personal_data,
            seeds: vec![
                b"mail jane.doe@example.com, call +44 20 7946 0958 or (555) 123-4567".to_vec(),
                b"card 4111 1111 1111 1111, iban DE89 3704 0044 0532 0130 00, ssn 123-45-6789".to_vec(),
                b"from 8.8.4.4 and 2606:4700:4700::1111 not 10.0.0.1; NINO AB 12 34 56 C".to_vec(),
            ],
        },
        Spec {
            name: "openapi_document",
            run: target_openapi_document,
            seeds: vec![
                std::fs::read(root.join("runner/examples/ops_tools.openapi.json")).expect("document"),
            ],
        },
    ]
}

/// A short recorded chain: each line one entry's canonical bytes.
fn chain_seed(fx: &Fixtures) -> Vec<Vec<u8>> {
    let bodies = [
        EntryBody::ModelTurn {
            step: 1,
            model: "m".into(),
            response: json!({"content": "x", "tool_calls": [], "prompt_tokens": 1, "completion_tokens": 1}),
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_prompt_tokens: 0,
            cost: Some(contextos_runner::pricing::TurnCost {
                currency: "USD".into(),
                nanos: contextos_runner::pricing::Nanos(12_500),
            }),
        },
        EntryBody::Failed {
            reason: "OutcomeUnknown".into(),
            message: "call 1.0 has no recorded result".into(),
        },
    ];
    let mut prev: Option<Hash> = None;
    bodies
        .into_iter()
        .enumerate()
        .map(|(seq, body)| {
            let entry = RecordEntry {
                run_id: "run-1".into(),
                seq: seq as u64,
                prev,
                at_ms: fx.now,
                body,
                vaulted: None,
            };
            let stored = StoredEntry::seal(&entry);
            prev = Some(stored.hash);
            stored.bytes
        })
        .collect()
}

fn target_run_context(input: &[u8], fx: &Fixtures) {
    if let Ok(signed) = serde_json::from_slice::<SignedRunContext>(input) {
        let _ = signed.verify(&fx.key.public(), "shop", fx.now);
        let _ = signed.context.check_tool("restart_deployment");
    }
}

fn target_call_envelope(input: &[u8], _: &Fixtures) {
    if let Ok(envelope) = serde_json::from_slice::<CallEnvelope>(input) {
        let _ = envelope.call_hash(&["sha256:00".into()]);
    }
}

fn target_record_entry(input: &[u8], _: &Fixtures) {
    if let Ok(entry) = RecordEntry::decode(input) {
        let _ = entry.body.encode();
        let _ = StoredEntry::seal(&entry);
    }
}

fn target_record_chain(input: &[u8], fx: &Fixtures) {
    let entries: Vec<StoredEntry> = input
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(seq, bytes)| StoredEntry::from_bytes(seq as u64, bytes.to_vec()))
        .collect();
    let Some(last) = entries.last() else { return };
    let tenant = TenantId::new("shop").expect("tenant");
    let message = SignedHead::message(&tenant, "run-1", last.seq, &last.hash);
    let head = SignedHead {
        seq: last.seq,
        hash: last.hash,
        key_id: fx.key.key_id(),
        signature: fx.key.sign_hex(&message),
    };
    let _ = verify_entries(&tenant, "run-1", &entries, &head, &fx.key.public());
}

fn target_pod_report(input: &[u8], _: &Fixtures) {
    let text = String::from_utf8_lossy(input);
    let _ = serde_json::from_str::<PodReport>(text.trim());
}

fn target_gate_verdict(input: &[u8], fx: &Fixtures) {
    if let Ok(signed) = serde_json::from_slice::<SignedGateVerdict>(input) {
        let _ = signed.verify(&fx.key.public());
    }
    if let Ok(grant) = serde_json::from_slice::<SignedReadGrant>(input) {
        let _ = grant.verify(&fx.key.public(), "shop", fx.now);
    }
}

fn target_model_script(input: &[u8], _: &Fixtures) {
    let _ = ScriptedModel::parse("fuzz", &String::from_utf8_lossy(input));
}

/// A memory candidate's text: classified without a panic, every piece on character boundaries
/// and none overlapping another.
fn target_personal_data(input: &[u8], _: &Fixtures) {
    let text = String::from_utf8_lossy(input);
    let Ok(found) = contextos_runner::personal_data::Classifier::built_in().classify(&text) else {
        return;
    };
    let mut end = 0;
    for finding in found.findings {
        assert!(
            text.get(finding.span.clone()).is_some(),
            "{finding:?} is not on character boundaries"
        );
        assert!(
            finding.span.start >= end,
            "{finding:?} overlaps the piece before it"
        );
        end = finding.span.end;
    }
}

fn target_chat_completion(input: &[u8], _: &Fixtures) {
    if let Ok(mut turn) = parse_turn(&String::from_utf8_lossy(input)) {
        turn.cap_tool_calls(16);
    }
}

fn target_cel_condition(input: &[u8], fx: &Fixtures) {
    let source = String::from_utf8_lossy(input);
    let spec: contextos_crds::PolicySpec = serde_json::from_value(json!({
        "defaultEffect": "deny",
        "rules": [{"name": "r", "match": {"tools": ["*"]}, "condition": source, "effect": "allow", "reason": "fuzz"}],
    }))
    .expect("a policy");
    let Ok(compiled) = compile_policy("fuzz", &spec) else {
        return;
    };
    let set = PolicySet {
        policies: vec![compiled],
    };
    let args = json!({"severity": "sev1", "lines": ["a", "b"], "n": 3});
    let call = CallFacts {
        tool: "get_service_status",
        risk: contextos_crds::common::ToolRisk::ReadOnly,
        kind: contextos_crds::common::ToolKind::Observe,
        args: &args,
        entities: &Default::default(),
    };
    let _ = set.decide(
        &call,
        &RunFacts::default(),
        &StateFacts::default(),
        fx.bundle.agent_spec.safety_mode,
        &Default::default(),
    );
}

fn target_crd_specs(input: &[u8], fx: &Fixtures) {
    if let Ok(policy) = serde_yaml::from_slice::<Policy>(input) {
        let _ = compile_policy("fuzz", &policy.spec);
    }
    if let Ok(agent) = serde_yaml::from_slice::<Agent>(input) {
        let _ = validate::compile("fuzz", &agent.spec.validators);
        let _ = effective_limits(
            &agent.spec.budget,
            agent.spec.safety_mode,
            fx.bundle.session_spec.overrides.as_ref(),
        );
    }
    if let Ok(session) = serde_yaml::from_slice::<Session>(input) {
        let _ = effective_limits(
            &fx.bundle.agent_spec.budget,
            fx.bundle.agent_spec.safety_mode,
            session.spec.overrides.as_ref(),
        );
    }
    if let Ok(pack) = serde_yaml::from_slice::<ContextPack>(input) {
        let _ = contextos_runner::context::compile(&pack.spec, &[], "fuzz", &[]);
    }
    let _ = serde_yaml::from_slice::<SandboxProfile>(input);
    if let Ok(skill) = serde_yaml::from_slice::<contextos_crds::Skill>(input) {
        let candidate = contextos_runner::skills::SkillCandidate {
            skill: skill.spec,
            policies: fx.bundle.policies.clone(),
        };
        let _ = contextos_runner::skills::eval::suite_problem(&candidate);
    }
}

/// The audit: a manifest file read with its lines, sorted into a harness, every rule run and the
/// report rendered.
fn target_audit_manifests(input: &[u8], _: &Fixtures) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(documents) = audit::source::parse(std::path::Path::new("fuzz.yaml"), text) {
        let report = audit::audit(&audit::Harness::from_documents(documents, false));
        let _ = (report.text(), report.sarif());
    }
}

/// An OpenAPI document's operations and the tools they imply.
fn target_openapi_document(input: &[u8], _: &Fixtures) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(document) = audit::openapi::parse("fuzz", text, None) {
        for operation in &document.operations {
            let _ = audit::openapi::infer(operation);
        }
    }
}

/// xorshift64*: small, fast and seeded, so a pass is reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Tokens that tend to reach corners of JSON, YAML and CEL decoders.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e309",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"\\u0000",
    b"\\ud800",
    b"\xff\xfe",
    b"\xe2\x82",
    b"\n",
    b"- ",
    b"&a",
    b"*a",
    b"!!binary",
    b"((((((((",
    b"))))",
    b".all(x, ",
    b" + ",
    b" && ",
    b"size(",
    b"'",
    b"\"\"\"",
    b"0x7fffffffffffffff",
    b"\t",
    b"~",
    b"%",
];

/// One mutation (or a few) of a random seed.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let at = rng.below(len + 1);
                data.splice(at..at, token.iter().copied());
            }
            3 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(32)).min(len);
                data.drain(start..end);
            }
            4 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let copy = data[start..end].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, copy);
            }
            5 => data.truncate(rng.below(len + 1)),
            6 => {
                // Splice in part of another seed.
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = (start + 1 + rng.below(128)).min(other.len());
                    let at = rng.below(len + 1);
                    data.splice(at..at, other[start..end].iter().copied());
                }
            }
            7 => {
                // Deep nesting.
                let depth = 1 + rng.below(300);
                let (open, close) = [(b'[', b']'), (b'{', b'}'), (b'(', b')')][rng.below(3)];
                let at = rng.below(len + 1);
                let mut nest = vec![open; depth];
                nest.extend(std::iter::repeat_n(close, depth));
                data.splice(at..at, nest);
            }
            _ => {
                // A long run of one byte (huge strings and numbers).
                let at = rng.below(len + 1);
                let byte = b"9a\"x "[rng.below(5)];
                data.splice(at..at, std::iter::repeat_n(byte, 1 + rng.below(4096)));
            }
        }
    }
    data.truncate(1 << 16);
    data
}
