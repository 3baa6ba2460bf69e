//! Context compilation: 1 MB of sources into an 8k-token budget, next to tokenizing the same
//! megabyte in full (the naive way) in the same run.
//!
//! Run: `cargo bench -p contextos-runner --bench context`. Target: < 50 ms.

use std::time::Instant;

use contextos_crds::context_pack::{ContextPackSpec, ContextSource, SourceKind};
use contextos_runner::context::{ResolvedSource, compile, tokenizer};

fn main() {
    let paragraph = "When checkout-api returns elevated 5xx after a deploy, check the error rate, \
                     the last deploy time and connection-pool saturation before restarting. ";
    let sources: Vec<ResolvedSource> = (0..8)
        .map(|i| ResolvedSource {
            name: format!("runbook-{i}"),
            content: paragraph.repeat(128 * 1024 / paragraph.len()),
        })
        .collect();
    let total: usize = sources.iter().map(|s| s.content.len()).sum();
    let pack = ContextPackSpec {
        instructions: "You are the on-call assistant.".into(),
        sources: sources
            .iter()
            .enumerate()
            .map(|(i, s)| ContextSource {
                name: s.name.clone(),
                kind: SourceKind::Reference,
                priority: 100 + i as u32,
                max_tokens: Some(2048),
                required: false,
                inline: None,
                config_map_ref: Some(contextos_crds::common::KeyRef {
                    name: s.name.clone(),
                    key: "md".into(),
                }),
                memory: None,
            })
            .collect(),
        token_budget: 8192,
        promotion: None,
    };
    let _ = tokenizer(); // load the vocabulary outside the timing
    let mut times = Vec::new();
    let mut tokens = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let ctx = compile(&pack, &sources, "checkout-api 5xx since 14:05", &[]).expect("compiles");
        times.push(started.elapsed().as_secs_f64() * 1e3);
        tokens = ctx.tokens;
    }
    times.sort_by(f64::total_cmp);
    let started = Instant::now();
    let full: usize = sources.iter().map(|s| tokenizer().count(&s.content)).sum();
    let naive = started.elapsed().as_secs_f64() * 1e3;
    println!(
        "context compile — {:.1} MB of sources into an 8192-token budget ({tokens} tokens out)",
        total as f64 / 1e6
    );
    println!(
        "  compile p50 {:.1} ms, max {:.1} ms   (target < 50 ms)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    println!("  baseline: tokenizing all {full} tokens of the sources takes {naive:.1} ms");
}
