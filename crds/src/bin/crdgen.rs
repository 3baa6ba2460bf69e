//! Writes the CustomResourceDefinitions of every ContextOS kind as YAML, one file per kind, and a
//! kustomization listing them (so the base and its overlays can include the CRDs).
//!
//! Usage: `crdgen [DIR]` (default `manifests/crds`). The output is committed; a test fails when
//! it no longer matches the types.

use std::{fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "manifests/crds".to_owned()),
    );
    if let Err(err) = fs::create_dir_all(&dir) {
        eprintln!("crdgen: cannot create {}: {err}", dir.display());
        return ExitCode::FAILURE;
    }
    let kustomization = dir.join("kustomization.yaml");
    if let Err(err) = fs::write(&kustomization, contextos_crds::crds_kustomization()) {
        eprintln!("crdgen: cannot write {}: {err}", kustomization.display());
        return ExitCode::FAILURE;
    }
    for crd in contextos_crds::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let path = dir.join(contextos_crds::crd_file_name(&crd));
        let yaml = match contextos_crds::crd_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(err) => {
                eprintln!("crdgen: cannot serialize {name}: {err}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(err) = fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
