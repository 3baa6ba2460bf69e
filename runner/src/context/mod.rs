//! The context compiler: a ContextPack, its resolved sources and a request become one budgeted,
//! content-addressed context. Pure and deterministic: the same inputs give the same bytes and
//! the same digest. Tokens are counted with a real tokenizer (`o200k_base`); what was cut or
//! dropped, and why, is reported so it can be recorded.

use contextos_crds::context_pack::{ContextPackSpec, SourceKind};
use contextos_tokenizer::Tokenizer;
use sha2::{Digest as _, Sha256};

use crate::records::entry::SourceNote;

/// A source with its content resolved (ConfigMap keys read by the caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedSource {
    pub name: String,
    pub content: String,
}

impl ResolvedSource {
    /// Each of `contents` (by source name) as the compiler takes it.
    pub fn all(contents: &std::collections::BTreeMap<String, String>) -> Vec<Self> {
        contents
            .iter()
            .map(|(name, content)| Self {
                name: name.clone(),
                content: content.clone(),
            })
            .collect()
    }
}

/// The compiled context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledContext {
    pub text: String,
    pub tokens: u64,
    pub budget: u64,
    /// `sha256:<hex>` of `text`.
    pub digest: String,
    /// Every source, in the order considered: included, cut (with why) or dropped.
    pub sources: Vec<SourceNote>,
}

/// Why a context cannot be compiled.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "the instructions and the request need {needed} tokens but the ContextPack's tokenBudget is {budget}; raise spec.tokenBudget or shorten spec.instructions"
    )]
    NoRoomForRequest { needed: u64, budget: u64 },
    #[error(
        "source {name} is required but only {available} of its {needed} tokens fit; raise spec.tokenBudget, lower other sources' priority, or set required: false"
    )]
    RequiredSourceDoesNotFit {
        name: String,
        needed: u64,
        available: u64,
    },
    #[error("source {0} has no content: its ConfigMap key was not resolved")]
    Unresolved(String),
}

/// Bytes of text examined per token of budget when a source is far larger than its room; text
/// beyond that cannot fit anyway, so it is not tokenized (this keeps huge sources cheap).
const BYTES_PER_TOKEN_CEILING: usize = 16;

/// The tokenizer all budgets are counted with.
pub fn tokenizer() -> &'static Tokenizer {
    Tokenizer::o200k()
}

/// Compiles `pack` with `sources` (by name) for `request`, recalled `memory` included as
/// evidence after the pack's own sources.
pub fn compile(
    pack: &ContextPackSpec,
    sources: &[ResolvedSource],
    request: &str,
    memory: &[String],
) -> Result<CompiledContext, CompileError> {
    let bpe = tokenizer();
    let budget = u64::from(pack.token_budget);
    let fixed = count(bpe, &pack.instructions) + count(bpe, request) + 16;
    if fixed > budget {
        return Err(CompileError::NoRoomForRequest {
            needed: fixed,
            budget,
        });
    }
    let mut remaining = budget - fixed;
    let mut order: Vec<_> = pack.sources.iter().collect();
    // Highest priority first; ties by name so the order never depends on the YAML's order.
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)));
    let mut included: Vec<(SourceKind, String, String)> = Vec::new();
    let mut notes = Vec::new();
    for source in order {
        let content = match (&source.inline, sources.iter().find(|s| s.name == source.name)) {
            (Some(inline), _) => inline.as_str(),
            (None, Some(resolved)) => resolved.content.as_str(),
            // A memory source is what the run recalled; nothing recalled (yet) is empty.
            (None, None) if source.memory.is_some() => "",
            (None, None) => return Err(CompileError::Unresolved(source.name.clone())),
        };
        // The section's headings and the seams between sections cost tokens too.
        let overhead = count(bpe, &format!("\n# Reference\n\n## {}\n\n", source.name)) + 2;
        let room = remaining.saturating_sub(overhead);
        let cap = source.max_tokens.map_or(room, |m| u64::from(m).min(room));
        let section = fit(bpe, content, cap);
        if source.required && section.cut.is_some() {
            return Err(CompileError::RequiredSourceDoesNotFit {
                name: source.name.clone(),
                needed: section.total_hint,
                available: cap,
            });
        }
        let why = section.cut.map(|limit| {
            let by = if source.max_tokens.is_some_and(|m| u64::from(m) <= remaining) {
                "its maxTokens"
            } else {
                "the pack's remaining budget"
            };
            match limit {
                Cut::Dropped => format!("dropped: no room left ({by} is {cap})"),
                Cut::Truncated => format!("cut to {} tokens by {by}", section.tokens),
            }
        });
        notes.push(SourceNote {
            source: source.name.clone(),
            tokens: section.tokens,
            cut: why,
        });
        if section.tokens > 0 {
            remaining -= section.tokens + overhead;
            included.push((source.kind, source.name.clone(), section.text));
        }
    }
    for (i, item) in memory.iter().enumerate() {
        let name = format!("memory-{i}");
        let overhead = count(bpe, &format!("\n# Evidence\n\n## {name}\n\n")) + 2;
        let section = fit(bpe, item, remaining.saturating_sub(overhead));
        let why = section
            .cut
            .map(|_| "cut by the pack's remaining budget".to_owned());
        notes.push(SourceNote {
            source: name.clone(),
            tokens: section.tokens,
            cut: why,
        });
        if section.tokens > 0 {
            remaining -= section.tokens + overhead;
            included.push((SourceKind::Evidence, name, section.text));
        }
    }
    let text = render(&pack.instructions, &included, request);
    let tokens = count(bpe, &text);
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())));
    Ok(CompiledContext {
        text,
        tokens,
        budget,
        digest,
        sources: notes,
    })
}

/// Whether every required source of `pack` certainly fits its budget with the instructions and
/// an empty request, decided without the tokenizer: a token is at least one byte, so byte
/// lengths bound token counts from above, and every room is bounded from below. `false` means
/// "not certain": count with [`compile`]. (The operator checks packs this way first, so that it
/// loads the tokenizer — about 46 MiB resident — only for packs that come close to their
/// budget.)
pub fn certainly_fits(pack: &ContextPackSpec, sources: &[ResolvedSource]) -> bool {
    let budget = u64::from(pack.token_budget);
    let bytes = |text: &str| u64::try_from(text.len()).unwrap_or(u64::MAX);
    let fixed = bytes(&pack.instructions).saturating_add(16);
    if fixed > budget {
        return false;
    }
    // A lower bound of what `compile` has left at each step.
    let mut remaining = budget - fixed;
    let mut order: Vec<_> = pack.sources.iter().collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)));
    for source in order {
        let content = match (&source.inline, sources.iter().find(|s| s.name == source.name)) {
            (Some(inline), _) => inline.as_str(),
            (None, Some(resolved)) => resolved.content.as_str(),
            (None, None) if source.memory.is_some() => "",
            (None, None) => return false,
        };
        let overhead = bytes(&format!("\n# Reference\n\n## {}\n\n", source.name)).saturating_add(2);
        let room = remaining.saturating_sub(overhead);
        let cap = source.max_tokens.map_or(room, |m| u64::from(m).min(room));
        if source.required && bytes(content) > cap {
            return false;
        }
        // At most the whole content (or nothing) is taken, with its overhead.
        remaining = remaining.saturating_sub(bytes(content).saturating_add(overhead));
    }
    true
}

enum Cut {
    Dropped,
    Truncated,
}

struct Section {
    text: String,
    tokens: u64,
    cut: Option<Cut>,
    /// Tokens of the whole source when counted; a lower bound when it was too large to count.
    total_hint: u64,
}

fn count(bpe: &Tokenizer, text: &str) -> u64 {
    bpe.count(text) as u64
}

/// The longest prefix of `content` that fits in `cap` tokens.
fn fit(bpe: &Tokenizer, content: &str, cap: u64) -> Section {
    let window = usize::try_from(cap)
        .unwrap_or(usize::MAX)
        .saturating_mul(BYTES_PER_TOKEN_CEILING)
        .max(64);
    let examined = if content.len() > window {
        prefix_at_char_boundary(content, window)
    } else {
        content
    };
    let tokens = bpe.encode(examined);
    let whole = examined.len() == content.len();
    if whole && tokens.len() as u64 <= cap {
        return Section {
            text: content.to_owned(),
            tokens: tokens.len() as u64,
            cut: None,
            total_hint: tokens.len() as u64,
        };
    }
    let total_hint = tokens.len() as u64;
    if cap == 0 {
        return Section {
            text: String::new(),
            tokens: 0,
            cut: Some(Cut::Dropped),
            total_hint,
        };
    }
    // Back off until the kept tokens decode to whole characters.
    let mut keep = usize::try_from(cap).unwrap_or(usize::MAX).min(tokens.len());
    while keep > 0 {
        if let Some(bytes) = bpe.decode(&tokens[..keep])
            && let Ok(text) = String::from_utf8(bytes)
        {
            return Section {
                text,
                tokens: keep as u64,
                cut: Some(Cut::Truncated),
                total_hint,
            };
        }
        keep -= 1;
    }
    Section {
        text: String::new(),
        tokens: 0,
        cut: Some(Cut::Dropped),
        total_hint,
    }
}

fn prefix_at_char_boundary(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn render(instructions: &str, included: &[(SourceKind, String, String)], request: &str) -> String {
    let mut out = String::with_capacity(instructions.len() + request.len() + 1024);
    out.push_str("# Instructions\n");
    out.push_str(instructions.trim_end());
    out.push('\n');
    for (kind, heading) in [
        (SourceKind::Guideline, "Guidelines"),
        (SourceKind::Reference, "Reference"),
        (SourceKind::Example, "Examples"),
        (SourceKind::Evidence, "Evidence"),
    ] {
        let mut first = true;
        for (_, name, text) in included.iter().filter(|(k, _, _)| *k == kind) {
            if first {
                out.push_str(&format!("\n# {heading}\n"));
                first = false;
            }
            out.push_str(&format!("\n## {name}\n{}\n", text.trim_end()));
        }
    }
    out.push_str("\n# Request\n");
    out.push_str(request.trim_end());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use contextos_crds::ContextPack;

    use super::*;

    fn quickstart() -> (ContextPackSpec, Vec<ResolvedSource>) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let pack: ContextPack =
            serde_yaml::from_str(&std::fs::read_to_string(root.join("contextpack.yaml")).expect("pack"))
                .expect("parses");
        let runbook = ResolvedSource {
            name: "checkout-runbook".into(),
            content: "1. Check status.\n2. Restart.\n".into(),
        };
        (pack.spec, vec![runbook])
    }

    #[test]
    fn what_certainly_fits_by_bytes_fits_when_counted() {
        let (pack, sources) = quickstart();
        assert!(
            certainly_fits(&pack, &sources),
            "the quickstart pack fits by bytes alone"
        );
        // Around every boundary: required sources of several sizes, ASCII and multi-byte, under
        // budgets from far too small to ample. Whenever bytes say "fits", counting agrees.
        let (mut certain, mut counted) = (0, 0);
        for content in [
            "restart the deployment. ",
            "héllo wörld ✓ ",
            "{\"k\": [1, 2, 3]} ",
        ] {
            for repeat in [1, 10, 100] {
                let mut sources = sources.clone();
                sources[0].content = content.repeat(repeat);
                for budget in (0..6000).step_by(37) {
                    let mut pack = pack.clone();
                    pack.token_budget = budget;
                    for source in &mut pack.sources {
                        source.required = true;
                    }
                    let fits = compile(&pack, &sources, "", &[]).is_ok();
                    counted += usize::from(fits);
                    if certainly_fits(&pack, &sources) {
                        certain += 1;
                        assert!(
                            fits,
                            "budget {budget}, {repeat}× {content:?}: fits by bytes, not when counted"
                        );
                    }
                }
            }
        }
        // The shortcut decides most packs that fit (the rest are counted).
        assert!(
            certain * 2 > counted,
            "{certain} of {counted} fitting packs decided by bytes"
        );
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes() {
        let (pack, sources) = quickstart();
        let a = compile(&pack, &sources, "checkout 5xx", &[]).expect("compiles");
        let b = compile(&pack, &sources, "checkout 5xx", &[]).expect("compiles");
        assert_eq!(a, b);
        assert!(a.tokens <= a.budget);
        assert!(
            a.text.find("# Guidelines").expect("guidelines") < a.text.find("# Reference").expect("reference")
        );
        assert!(a.sources.iter().all(|s| s.cut.is_none()), "{:?}", a.sources);
    }

    #[test]
    fn priorities_and_caps_decide_what_is_cut_and_the_cut_is_explained() {
        let (mut pack, mut sources) = quickstart();
        pack.token_budget = 300;
        sources[0].content = "restart the deployment. ".repeat(2000);
        let ctx = compile(&pack, &sources, "checkout 5xx", &[]).expect("compiles");
        assert!(ctx.tokens <= 300, "{} tokens", ctx.tokens);
        let runbook = ctx
            .sources
            .iter()
            .find(|s| s.source == "checkout-runbook")
            .expect("noted");
        assert!(
            runbook.cut.as_deref().is_some_and(|c| c.starts_with("cut to")),
            "{runbook:?}"
        );
        let example = ctx
            .sources
            .iter()
            .find(|s| s.source == "example-incident")
            .expect("noted");
        assert!(
            example.cut.as_deref().is_some_and(|c| c.starts_with("dropped")),
            "{example:?}"
        );
        assert_eq!(ctx.sources[0].source, "guidelines", "highest priority first");
    }

    #[test]
    fn a_required_source_that_does_not_fit_is_an_error_naming_it() {
        let (mut pack, sources) = quickstart();
        pack.sources[0].inline = Some("always page the on-call. ".repeat(5000));
        let err = compile(&pack, &sources, "x", &[]).expect_err("does not fit");
        assert!(
            matches!(err, CompileError::RequiredSourceDoesNotFit { ref name, .. } if name == "guidelines")
        );
    }

    #[test]
    fn a_request_larger_than_the_budget_is_refused() {
        let (pack, sources) = quickstart();
        let err = compile(&pack, &sources, &"word ".repeat(20_000), &[]).expect_err("too big");
        assert!(err.to_string().contains("raise spec.tokenBudget"));
    }

    #[test]
    fn the_compiled_context_never_exceeds_its_budget() {
        let (mut pack, mut sources) = quickstart();
        sources[0].content =
            "Restart clears stale connection pools; verify the error rate after. ".repeat(300);
        let memory = vec!["Last week the same alert was a bad deploy. ".repeat(50)];
        for budget in (400..4000).step_by(97) {
            pack.token_budget = budget;
            let ctx = compile(&pack, &sources, "checkout-api 5xx since 14:05", &memory).expect("compiles");
            assert!(
                ctx.tokens <= u64::from(budget),
                "{} tokens for a budget of {budget}",
                ctx.tokens
            );
        }
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        let section = fit(tokenizer(), &"héllo wörld ✓ ".repeat(100), 7);
        assert_eq!(section.tokens, 7);
        assert!(section.text.is_char_boundary(section.text.len()));
    }
}
