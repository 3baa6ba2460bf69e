//! The embedding model tests and benchmarks score tools with: the directory
//! CONTEXTOS_EMBEDDING_MODEL names (`make test` sets it), or the one
//! `runner/models/all-minilm-l6-v2.sh` fetches (once) and caches.

use std::path::PathBuf;

pub fn model_dir() -> PathBuf {
    if let Some(dir) = contextos_runner::discovery::minilm::configured_dir() {
        return dir;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
