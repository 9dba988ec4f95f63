//! The pipeline front end tested in process, as `just` tests its analyzer: each case loads and
//! plans a pipeline text and compares the whole error (file, line, stage, message) or the
//! expanded result, without starting the binary.

use fpipe_engine::{load, plan, Overrides, PipelineError, Registry};

/// Loads and plans `text` as `p.yaml` in a fresh folder; returns the stage names or the
/// errors as `line: stage: message`. Stages come in declaration order, items in item order.
fn front_end(text: &str, pairs: &[&str]) -> Result<Vec<String>, Vec<String>> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, text).unwrap();
    let overrides = Overrides {
        files: vec![],
        pairs: pairs.iter().map(|s| s.to_string()).collect(),
    };
    let shown = |e: &PipelineError| {
        assert_eq!(e.file, file, "errors name the file");
        format!(
            "{}: {}: {}",
            e.line.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            e.stage.as_deref().unwrap_or("-"),
            e.message
        )
    };
    let pipeline = load(&file, &overrides).map_err(|e| vec![shown(&e)])?;
    let plan = plan(pipeline, &Registry::with_builtins())
        .map_err(|es| es.iter().map(shown).collect::<Vec<_>>())?;
    Ok(plan.stages.iter().map(|s| s.name().to_string()).collect())
}

fn error(text: &str) -> String {
    let errs = front_end(text, &[]).expect_err("expected an error");
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs[0].clone()
}

#[test]
fn families_expand_in_item_order_and_prev_chains_them() {
    let names = front_end(
        "params: {n: 3}\nstages:\n  gen:\n    foreach: \"{{ params.n }}\"\n    uses: shell\n    inputs: {prev: \"${prev}\"}\n    with: {run: \"echo ${index}\"}\n  grid:\n    matrix: {a: [x, y], b: [1, 2]}\n    uses: shell\n    inputs: {g: gen@last}\n    with: {run: \"echo ${item.a}${item.b}\"}\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        names,
        ["gen@1", "gen@2", "gen@3", "grid@x-1", "grid@x-2", "grid@y-1", "grid@y-2"]
    );
    let names = front_end(
        "params: {n: 3}\nstages:\n  gen:\n    foreach: \"{{ params.n }}\"\n    uses: shell\n    with: {run: \"true\"}\n",
        &["n=1"],
    )
    .unwrap();
    assert_eq!(names, ["gen@1"]);
}

#[test]
fn errors_carry_line_and_stage() {
    assert_eq!(
        error("stages:\n  a:\n    uses: shell\n    with:\n      run: x\n      rnu: y\n"),
        "6: a: unknown parameter `rnu` for kind `shell`"
    );
    assert_eq!(
        error("stages:\n  a:\n    uses: shell\n    with: {run: x}\n  b:\n    uses: shell\n    inputs:\n      m: nope\n    with: {run: x}\n"),
        "8: b: input `m`: refers to missing stage `nope`"
    );
    assert_eq!(
        error("stages:\n  a.b:\n    uses: shell\n    with: {run: x}\n"),
        "2: a.b: invalid stage name `a.b`"
    );
    assert_eq!(
        error("stages:\n  s:\n    foreach: 30000\n    uses: shell\n    with: {run: x}\n"),
        "2: s: `foreach:` has 30000 items and the pipeline expands to more than 20000 stages; split the experiment into several pipelines"
    );
    assert_eq!(
        error(
            "stages:\n  a:\n    uses: shell\n    with:\n      run: x\n      deps: [/etc/passwd]\n"
        ),
        "6: a: parameter `deps`: `/etc/passwd` is an absolute path"
    );
    assert_eq!(
        error("stages:\n  a:\n    uses: shell\n    with:\n      run: x\n      outputs: [o, ./o]\n"),
        "4: a: output `./o` is listed twice; list each output once"
    );
}

#[test]
fn template_limits_name_the_line_where_known() {
    let e = error("stages:\n  a:\n    uses: shell\n    with: {run: \"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\"}\n");
    assert!(
        e.starts_with(
            "4: -: the template did too much work: it ran out of its budget of 5000000 steps"
        ),
        "{e}"
    );
}

#[test]
fn a_cli_value_that_breaks_the_yaml_is_named() {
    let errs = front_end(
        "params: {k: 1}\nstages:\n  a:\n    uses: shell\n    with: {run: {{ params.k }}}\n",
        &["k={a: [1"],
    )
    .unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("5: -: malformed YAML:"), "{errs:?}");
    assert!(
        errs[0].ends_with("(after templates, line 5 reads `with: {run: {a: [1}`)"),
        "{errs:?}"
    );
}

#[test]
fn deep_flow_nesting_is_refused_before_the_yaml_parser_sees_it() {
    let deep = format!(
        "stages:\n  a:\n    uses: shell\n    with:\n      run: \"[[[ # not counted\"\n      env: {}\n",
        "[".repeat(100_000)
    );
    assert_eq!(error(&deep), "6: -: `[`/`{` nested more than 128 deep");
    // Brackets in quotes and comments do not count; 128 levels are allowed (and then the
    // YAML parser decides).
    let ok = format!(
        "stages:\n  a:  # {}\n    uses: shell\n    with: {{run: '{}', env: {}{}}}\n",
        "[".repeat(500),
        "{".repeat(500),
        "{a: ".repeat(20),
        "}".repeat(20)
    );
    assert!(!error(&ok).contains("nested more than"), "{}", error(&ok));
}
