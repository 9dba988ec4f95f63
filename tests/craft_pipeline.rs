//! `pipelines/craft.yaml` end to end on tiny parameters: the three reactivation modes train,
//! are evaluated and analysed; CRAFT leaves fewer inactive first-layer filters than standard
//! training on a setting where filters die (strong weight decay); a rerun executes nothing.
#![cfg(feature = "faces")]

mod common;
use common::Project;

const TINY: [&str; 4] = [
    "identities=40",
    "image_size=32",
    "input_size=32",
    "embedding_size=64",
];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["run", "craft.yaml"];
    for kv in TINY.iter().chain(extra) {
        v.extend(["-p", kv]);
    }
    v
}

#[test]
fn craft_reduces_inactive_filters_and_reruns_nothing() {
    let p = Project::new();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/craft.yaml"))
            .unwrap();
    p.write("craft.yaml", &text);
    // faces, then train / filters / eval for none, scaled-random and craft.
    assert_eq!(p.fpipe(&args(&[])).ok().counts(), (10, 0, 0));
    assert_eq!(p.fpipe(&args(&[])).ok().counts(), (0, 10, 0), "rerun");
    let show = p.fpipe(&["show", "craft.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let metric = |stage: &str, m: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["stage"] == stage)
            .and_then(|r| r["metrics"][m].as_f64())
            .unwrap_or_else(|| panic!("{stage}.{m} in {}", show.stdout))
    };
    let none = metric("filters@none", "inactive_fraction");
    let craft = metric("filters@craft", "inactive_fraction");
    assert!(none > 0.0, "filters die without reactivation here ({none})");
    assert!(craft < none, "craft {craft} vs none {none}");
    assert_eq!(metric("train@none", "reactivated"), 0.0);
    assert!(metric("train@craft", "reactivated") > 0.0);
    // The analysis agrees with the trainer's last epoch record.
    assert_eq!(metric("train@craft", "inactive_fraction"), craft);
    for m in ["none", "scaled-random", "craft"] {
        assert!(metric(&format!("eval@{m}"), "accuracy") > 0.5);
    }
    let report = p.fpipe(&["out", "filters@craft.report"]).ok();
    let dir = std::path::PathBuf::from(report.stdout.trim());
    let png = std::fs::read(dir.join("filters.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let history = std::fs::read_to_string(dir.join("history.csv")).unwrap();
    assert_eq!(
        history.lines().count(),
        1 + 20,
        "header + one row per epoch"
    );
}

#[test]
fn bad_reactivation_params_are_rejected_at_plan_time() {
    let p = Project::new();
    let head = "stages:\n  faces:\n    uses: synthetic-faces\n  train:\n    uses: train\n    inputs: {dataset: faces.dataset}\n";
    for (with, msg) in [
        ("reactivation: revive", "reactivation"),
        (
            "reactivation: craft, reactivation_tau: 1.5",
            "reactivation_tau must lie in (0, 1)",
        ),
        (
            "reactivation: craft, reactivation_every: 0",
            "reactivation_every must be at least 1",
        ),
    ] {
        p.write("bad.yaml", &format!("{head}    with: {{{with}}}\n"));
        let r = p.fpipe(&["validate", "bad.yaml"]);
        assert_eq!(r.code, 2, "{with}: {}", r.stderr);
        assert!(r.stderr.contains(msg), "{with}: {}", r.stderr);
        assert!(
            r.stderr.contains("bad.yaml:"),
            "names the file: {}",
            r.stderr
        );
    }
}
