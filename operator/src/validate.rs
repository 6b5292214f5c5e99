//! `gatehouse-operator validate --manifests DIR`: the operator's verdicts, offline, for CI and
//! GitOps pipelines.

use std::io::Write;
use std::path::PathBuf;

use gatehouse_crds::{Phase, compile, manifests};

/// Prints one line per resource; returns true when everything is valid (pending approval is
/// not an error).
pub fn run(paths: &[PathBuf], out: &mut dyn Write) -> std::io::Result<bool> {
    let (resources, errors) = manifests::load_paths(paths)?;
    let mut ok = errors.is_empty();
    for e in &errors {
        writeln!(out, "ERROR    {e}")?;
    }
    let compiled = compile(&resources);
    for v in &compiled.verdicts {
        let label = match v.phase {
            Phase::Active => "OK      ",
            Phase::PendingApproval => "PENDING ",
            Phase::Invalid => {
                ok = false;
                "INVALID "
            }
        };
        write!(out, "{label} {} {}/{}", v.kind, v.namespace, v.name)?;
        if v.phase != Phase::Active {
            write!(out, ": {} ({})", v.message, v.reason)?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "{} resources, {} clients compiled, config hash {}",
        compiled.verdicts.len(),
        compiled.config.clients.len(),
        &compiled.config.hash[..12]
    )?;
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_validate_and_a_broken_resource_fails() {
        let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/mobile");
        let mut out = Vec::new();
        assert!(
            run(std::slice::from_ref(&examples), &mut out).unwrap(),
            "{}",
            String::from_utf8_lossy(&out)
        );

        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&examples).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
        let api = dir.path().join("api.yaml");
        let text = std::fs::read_to_string(&api)
            .unwrap()
            .replace("pathPrefix: /mobile", "pathPrefix: mobile");
        std::fs::write(&api, text).unwrap();
        let mut out = Vec::new();
        assert!(!run(&[dir.path().to_path_buf()], &mut out).unwrap());
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("INVALID  Api demo/mobile"), "{out}");
        assert!(out.contains("OK       Plan demo/basic"), "{out}");
    }
}
