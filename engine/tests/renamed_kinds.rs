//! A renamed stage kind keeps its old name working: the pipeline plans with the kind's new
//! name, and the plan carries a warning with the position of the old name.

use fpipe_engine::{load, plan, Overrides, Registry};

fn registry() -> Registry {
    let mut r = Registry::with_builtins();
    r.register_alias("sh", "shell");
    r
}

fn planned(text: &str) -> fpipe_engine::Plan {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, text).unwrap();
    let pipeline = load(&file, &Overrides::default()).unwrap();
    plan(pipeline, &registry()).unwrap_or_else(|e| panic!("{e:?}"))
}

#[test]
fn the_old_name_plans_as_the_new_kind_with_a_warning_at_its_line() {
    let plan = planned(
        "fpipe: 1\nstages:\n  a:\n    uses: shell\n    with: {run: 'true'}\n  b:\n    uses: sh\n    with: {run: 'true'}\n",
    );
    let kinds: Vec<&str> = plan.stages.iter().map(|s| s.kind.kind()).collect();
    assert_eq!(kinds, ["shell", "shell"]);
    // Records and listings read the stage's `uses`: they say the current name.
    assert_eq!(plan.stages[1].def.uses, "shell");
    assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
    let w = &plan.warnings[0];
    assert_eq!(w.line, Some(7));
    assert_eq!(w.stage.as_deref(), Some("b"));
    assert_eq!(w.message, "kind `sh` is now called `shell`");
    assert!(w.hint.as_deref().unwrap_or("").contains("uses: shell"));
}

#[test]
fn current_names_give_no_warning_and_unknown_names_still_fail() {
    let plan = planned("fpipe: 1\nstages:\n  a:\n    uses: shell\n    with: {run: 'true'}\n");
    assert!(plan.warnings.is_empty());
    let r = registry();
    assert!(r.resolve("nope").is_none());
    assert_eq!(
        r.resolve("sh").map(|(k, to)| (k.kind(), to)),
        Some(("shell", Some("shell")))
    );
    assert_eq!(r.aliases().collect::<Vec<_>>(), [("sh", "shell")]);
}
