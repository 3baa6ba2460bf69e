//! Personal-data classification of a 4 KiB memory candidate, next to two baselines measured on
//! the same texts in the same run: one pass over the bytes (counting digits) and one compiled
//! regular expression (an e-mail pattern) run over the text.
//!
//! Run: `cargo bench -p contextos-runner --bench personal_data`. Target: p50 ≤ 100 µs.
//!
//! Texts: prose with three pieces of personal data and a few identifiers (what most candidates
//! look like); an incident note dense in personal data among private addresses, timestamps and
//! versions (65 pieces in 4 KiB); 4 KiB dense in digits and separators (the detectors' worst case:
//! every position starts a candidate number); prose with neither digits nor `@` (what most
//! candidates are).

use std::{hint::black_box, time::Instant};

use contextos_runner::personal_data::{Classifier, TenantPattern};
use regex::Regex;

const TEXT_BYTES: usize = 4 * 1024;
const ITERATIONS: usize = 5_000;

fn to_size(seed: &str) -> String {
    let mut text = String::with_capacity(TEXT_BYTES);
    while text.len() + seed.len() <= TEXT_BYTES {
        text.push_str(seed);
    }
    text.push_str(&"x".repeat(TEXT_BYTES - text.len()));
    text
}

fn texts() -> Vec<(&'static str, String)> {
    let note = "2026-12-03T06:30:33Z checkout-7f9c pod 10.244.0.17 restarted (v1.13.2, exit 137). \
        On-call jane.doe@example.com paged via +44 20 7946 0958; customer refund to \
        DE89 3704 0044 0532 0130 00 pending, card ending 4111 1111 1111 1111 flagged. \
        Latency p99 1,850 ms from 203.0.113.9 and 8.8.4.4; runbook-7 step 3 applied. ";
    let digits = "4111-1111 1111.1112 10.0.0.1.2 +1 (555) 123 45 678-90-1234 ";
    let prose = "The checkout service restarted after its memory limit was reached; the on-call \
        engineer rolled back the deployment and the error rate returned to normal. ";
    // What most candidates look like: prose with a few identifiers, one e-mail address, one
    // phone number and one public address in the whole 4 KiB.
    let mut typical = to_size(prose);
    typical.replace_range(
        400..514,
        "Escalated to jane.doe@example.com, +44 20 7946 0958, from 81.2.69.160 at 06:30 on 2026-12-03 (INC-2041, v1.13.2). ",
    );
    vec![
        ("typical candidate", typical),
        ("incident note", to_size(note)),
        ("dense digits", to_size(digits)),
        ("prose only", to_size(prose)),
    ]
}

fn p50_p99(mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..200 {
        f();
    }
    let mut samples: Vec<f64> = (0..ITERATIONS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    (at(0.5), at(0.99))
}

fn main() {
    let built_in = Classifier::built_in();
    let with_tenant = Classifier::with_patterns(&[
        TenantPattern {
            name: "badge-id".into(),
            regex: r"\bBADGE-[0-9]{6}\b".into(),
        },
        TenantPattern {
            name: "customer-id".into(),
            regex: r"\bCUST-[A-Z]{2}[0-9]{8}\b".into(),
        },
    ])
    .expect("patterns");
    let email = Regex::new(r"(?i)[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}").expect("baseline regex");
    println!(
        "personal-data classification of {TEXT_BYTES}-byte texts, {ITERATIONS} runs each (target p50 ≤ 100 µs)"
    );
    for (label, text) in texts() {
        let found = built_in.classify(&text).expect("classified");
        let (bytes50, _) = p50_p99(|| {
            black_box(black_box(&text).bytes().filter(u8::is_ascii_digit).count());
        });
        let (regex50, _) = p50_p99(|| {
            black_box(email.find_iter(black_box(&text)).count());
        });
        let (ours50, ours99) = p50_p99(|| {
            black_box(built_in.classify(black_box(&text)).map(|c| c.findings.len()).ok());
        });
        let (tenant50, tenant99) = p50_p99(|| {
            black_box(
                with_tenant
                    .classify(black_box(&text))
                    .map(|c| c.findings.len())
                    .ok(),
            );
        });
        println!(
            "{label} ({} pieces found: {:?})",
            found.findings.len(),
            found.categories()
        );
        println!("  one pass over the bytes             p50 {bytes50:>7.1} µs   (baseline)");
        println!("  one regular expression (e-mail)     p50 {regex50:>7.1} µs   (baseline)");
        println!("  classified, built-in detectors      p50 {ours50:>7.1} µs   p99 {ours99:>7.1} µs");
        println!("  classified, with 2 tenant patterns  p50 {tenant50:>7.1} µs   p99 {tenant99:>7.1} µs");
    }
}
