//! What a process pays for the tokenizer: loading it (once per process; every runner pod,
//! replay Job and CLI call does) and the memory it keeps, beside tiktoken-rs building the same
//! vocabulary in the same run (the baseline), then encoding speed on the repository's README.
//!
//! `cargo bench -p contextos-tokenizer --bench load`

use std::time::{Duration, Instant};

use contextos_tokenizer::Tokenizer;

fn resident_bytes() -> u64 {
    // statm's second field: resident pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn timed<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed()
        })
        .collect();
    (percentile(&mut samples, 0.5), percentile(&mut samples, 0.99))
}

fn main() {
    // Memory first, each kept alive, in a process that has loaded neither yet.
    let before = resident_bytes();
    let ours = Tokenizer::load_o200k();
    let after_ours = resident_bytes();
    let reference = tiktoken_rs::o200k_base().expect("the reference tokenizer builds");
    let after_reference = resident_bytes();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("resident memory kept by one tokenizer (MiB):");
    println!(
        "  tiktoken-rs o200k_base (baseline)  {:>6.1}",
        mib(after_reference.saturating_sub(after_ours))
    );
    println!(
        "  contextos-tokenizer                {:>6.1}",
        mib(after_ours.saturating_sub(before))
    );

    let runs = 30;
    let (reference_p50, reference_p99) = timed(runs, || {
        tiktoken_rs::o200k_base().map(|b| b.encode_ordinary("x").len())
    });
    let (ours_p50, ours_p99) = timed(runs, || Tokenizer::load_o200k().count("x"));
    println!("loading, ready to encode ({runs} loads each):");
    println!("  tiktoken-rs o200k_base (baseline)  p50 {reference_p50:>10.2?}  p99 {reference_p99:>10.2?}");
    println!("  contextos-tokenizer                p50 {ours_p50:>10.2?}  p99 {ours_p99:>10.2?}");

    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("the repository's README is readable");
    assert_eq!(
        ours.encode(&readme),
        reference.encode_ordinary(&readme),
        "the two disagree on the README"
    );
    let megabytes = readme.len() as f64 / 1e6;
    let (reference_p50, _) = timed(20, || reference.encode_ordinary(&readme).len());
    let (ours_p50, _) = timed(20, || ours.count(&readme));
    println!(
        "encoding the README ({:.2} MB, {} tokens; 20 runs each, p50):",
        megabytes,
        ours.count(&readme)
    );
    println!(
        "  tiktoken-rs (baseline)             {reference_p50:>10.2?}  {:>6.1} MB/s",
        megabytes / reference_p50.as_secs_f64()
    );
    println!(
        "  contextos-tokenizer                {ours_p50:>10.2?}  {:>6.1} MB/s",
        megabytes / ours_p50.as_secs_f64()
    );
}
