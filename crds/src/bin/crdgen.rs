//! Writes the CustomResourceDefinitions to `crds/*.yaml`:
//! `cargo run -p gatehouse-crds --bin crdgen [OUTPUT_DIR]` (default: the crds crate folder).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for (file, yaml) in gatehouse_crds::crdgen::crd_yaml() {
        let path = dir.join(file);
        if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
