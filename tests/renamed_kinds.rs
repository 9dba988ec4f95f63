//! `filter-activity` was called `filters` (one letter from `filter`, data set filtering): a
//! pipeline that still says `filters` validates and plans as before, with a warning naming the
//! line and the new name, and `fpipe stages` shows the kind under its new name.
#![cfg(feature = "faces")]

mod common;
use common::Project;

const PIPELINE: &str = "fpipe: 1
stages:
  model:
    uses: import-model
    with: {weights: w.pth}
  f:
    uses: filters
    inputs: {model: model.model}
";

#[test]
fn the_old_kind_name_still_plans_with_a_warning() {
    let p = Project::new();
    p.write("w.pth", "");
    p.write("p.yaml", PIPELINE);
    let v = p.fpipe(&["validate", "p.yaml"]).ok();
    assert!(
        v.stderr.contains(
            "warning: p.yaml:7: stage `f`: kind `filters` is now called `filter-activity`"
        ),
        "{}",
        v.stderr
    );
    // The same plan as with the new name: one warning, nothing else differs.
    p.write(
        "new.yaml",
        &PIPELINE.replace("uses: filters", "uses: filter-activity"),
    );
    let n = p.fpipe(&["validate", "new.yaml"]).ok();
    assert!(!n.stderr.contains("warning"), "{}", n.stderr);
    assert_eq!(v.stdout.replace("p.yaml", "new.yaml"), n.stdout);
}

#[test]
fn stages_lists_the_new_name_and_finds_the_old_one() {
    let p = Project::new();
    let out = p.fpipe(&["stages", "filters"]).ok().stdout;
    assert!(out.starts_with("filter-activity (v1): "), "{out}");
    assert!(out.contains("(formerly `filters`"), "{out}");
    let all = p.fpipe(&["stages"]).ok().stdout;
    assert!(!all.lines().any(|l| l.starts_with("filters ")), "{all}");
}
