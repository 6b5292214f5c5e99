//! The committed `crds/*.yaml` must be exactly what `crdgen` renders now.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for (file, expected) in gatehouse_crds::crdgen::crd_yaml() {
        let path = dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(committed) if committed == expected => {}
            Ok(_) => stale.push(format!("{} differs", path.display())),
            Err(e) => stale.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(
        stale.is_empty(),
        "CRD files are out of date ({}); run cargo run -p gatehouse-crds --bin crdgen",
        stale.join(", ")
    );
}
