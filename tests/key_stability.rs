//! Stage keys of the shipped pipelines stay what they were: a refactor that changes a kind's
//! name, version, parameter defaults or the set of parameters that enter the key shows up here.
//! Inputs get fixed stand-in artifact ids (the hash of the upstream stage and port), so the
//! keys do not depend on what upstream stages compute.
//!
//! `tests/golden/stage-keys.txt` holds `pipeline stage kind key` lines. When a key must change,
//! bump the kind's version, say so in the commit, and replace the lines this test prints.

#![cfg(feature = "faces")]

use fpipe_cache::ArtifactId;
use fpipe_engine::{load_plan, KeyParts, Overrides, Registry};
use serde_json::{json, Value};
use std::path::Path;

fn registry() -> Registry {
    let mut r = Registry::with_builtins();
    fpipe_stages::register_all(&mut r);
    r
}

fn keys_of(file: &Path, registry: &Registry) -> Vec<String> {
    let plan = load_plan(file, &Overrides::default(), registry)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let base = file.parent().expect("pipeline folder");
    let mut lines = Vec::new();
    for &i in &plan.order {
        let ps = &plan.stages[i];
        let mut params = ps.key_params.clone();
        // Path parameters enter the key as the content id of what they name; a stand-in from
        // the path relative to the pipeline keeps this test about the stage kinds.
        for (name, paths) in &ps.path_params {
            if !params.contains_key(name) {
                continue;
            }
            let ids: Vec<Value> = paths
                .iter()
                .map(|p| {
                    let rel = p.strip_prefix(base).unwrap_or(p);
                    json!({ "content": rel.display().to_string() })
                })
                .collect();
            let v = match params.get(name) {
                Some(Value::Array(_)) => Value::Array(ids),
                _ => ids.into_iter().next().unwrap_or(Value::Null),
            };
            params.insert(name.clone(), v);
        }
        let inputs = ps
            .wires
            .iter()
            .map(|w| {
                let from = plan.stages[w.from].name();
                let id = blake3::hash(format!("{from}/{}", w.from_port).as_bytes());
                (w.port.clone(), ArtifactId(*id.as_bytes()))
            })
            .collect();
        let parts = KeyParts {
            kind: ps.kind.kind().to_string(),
            version: ps.kind.version(),
            params,
            inputs,
        };
        let pipeline = file.file_name().unwrap_or_default().to_string_lossy();
        lines.push(format!(
            "{pipeline} {} {} {}",
            ps.name(),
            parts.kind,
            parts.key()
        ));
    }
    lines
}

#[test]
fn shipped_pipelines_keep_their_stage_keys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let registry = registry();
    let mut files = Vec::new();
    for dir in ["pipelines", "examples"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("read pipeline folder") {
            let p = entry.expect("dir entry").path();
            if p.extension().is_some_and(|e| e == "yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files.push(root.join("tests/golden/all-kinds/pipeline.yaml"));
    assert!(
        files.len() >= 9,
        "expected the shipped pipelines, found {files:?}"
    );
    let actual: Vec<String> = files.iter().flat_map(|f| keys_of(f, &registry)).collect();
    let golden = std::fs::read_to_string(root.join("tests/golden/stage-keys.txt"))
        .expect("tests/golden/stage-keys.txt");
    let expected: Vec<&str> = golden.lines().filter(|l| !l.starts_with('#')).collect();
    let changed: Vec<String> = actual
        .iter()
        .filter(|l| !expected.contains(&l.as_str()))
        .cloned()
        .collect();
    let gone: Vec<&str> = expected
        .iter()
        .filter(|l| !actual.contains(&l.to_string()))
        .copied()
        .collect();
    assert!(
        changed.is_empty() && gone.is_empty(),
        "stage keys changed.\nnow:\n{}\nexpected (tests/golden/stage-keys.txt):\n{}",
        changed.join("\n"),
        gone.join("\n")
    );
    // Every stage kind is covered at least once.
    let kinds: std::collections::BTreeSet<&str> =
        actual.iter().filter_map(|l| l.split(' ').nth(2)).collect();
    assert!(kinds.len() >= 19, "only {kinds:?} covered");
}
