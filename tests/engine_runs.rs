//! The engine driven through the `fpipe` binary: caching, early cutoff, families, sharing,
//! crashes and concurrency. Only `shell` stages, so these run without the face stages.

mod common;
use common::{Project, Run};

const DEMO: &str = r#"name: demo
params: {greeting: hello}
stages:
  make:
    uses: shell
    with:
      run: echo "{{ params.greeting }}" > out/msg.txt
      outputs: [out/msg.txt]
  upper:
    uses: shell
    inputs: {msg: make}          # the whole output of `make`, placed at in/msg/
    with:
      run: tr a-z A-Z < in/msg/out/msg.txt > out/up.txt
      outputs: [out/up.txt]
"#;

#[test]
fn demo_runs_then_is_cached_and_out_finds_it() {
    let p = Project::new();
    p.write("demo.yaml", DEMO);
    assert_eq!(p.fpipe(&["run", "demo.yaml"]).ok().counts(), (2, 0, 0));
    assert_eq!(p.fpipe(&["run", "demo.yaml"]).ok().counts(), (0, 2, 0));
    let out = p.fpipe(&["out", "upper"]).ok();
    let dir = out.stdout.trim();
    assert_eq!(
        std::fs::read_to_string(format!("{dir}/out/up.txt")).unwrap(),
        "HELLO\n"
    );
    let out = p.fpipe(&["out", "upper.files", "-f", "demo.yaml"]).ok();
    assert_eq!(out.stdout.trim(), dir);
    // Only the declared output is kept.
    let files: Vec<_> = walk(std::path::Path::new(dir));
    assert_eq!(files, vec!["out/up.txt".to_string()]);
}

fn walk(root: &std::path::Path) -> Vec<String> {
    let mut v = Vec::new();
    fn rec(root: &std::path::Path, d: &std::path::Path, v: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                rec(root, &p, v);
            } else {
                v.push(p.strip_prefix(root).unwrap().to_string_lossy().to_string());
            }
        }
    }
    rec(root, root, &mut v);
    v.sort();
    v
}

#[test]
fn only_changed_stages_rerun_and_status_says_why() {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"fpipe: 1
params: {a: 1, c: 1}
stages:
  a:
    uses: shell
    with: {run: "echo {{ params.a }} > out", outputs: [out]}
  b:
    uses: shell
    inputs: {x: a}
    with: {run: "cat in/x/out > out2", outputs: [out2]}
  c:
    uses: shell
    with: {run: "echo c{{ params.c }} > out", outputs: [out]}
"#,
    );
    assert_eq!(p.fpipe(&["run", "p.yaml"]).ok().counts(), (3, 0, 0));
    let st = p.fpipe(&["status", "p.yaml", "-p", "c=2"]).ok();
    assert!(
        st.stdout
            .contains("c  will run: param run: \"echo c1 > out\" -> \"echo c2 > out\""),
        "{}",
        st.stdout
    );
    assert!(
        st.stdout.contains("1 of 3 stages would run"),
        "{}",
        st.stdout
    );
    assert_eq!(
        p.fpipe(&["run", "p.yaml", "-p", "c=2"]).ok().counts(),
        (1, 2, 0)
    );
    let st = p
        .fpipe(&["status", "p.yaml", "-p", "a=5", "-p", "c=2"])
        .ok();
    assert!(
        st.stdout
            .contains("b  will run: input a.files will be recomputed"),
        "{}",
        st.stdout
    );
    // Going back to an earlier value is a cache hit.
    assert_eq!(
        p.fpipe(&["run", "p.yaml", "-p", "c=1"]).ok().counts(),
        (0, 3, 0)
    );
    // --force reruns a cached stage; --target runs only it and what it needs.
    assert_eq!(
        p.fpipe(&["run", "p.yaml", "--force", "a", "--target", "b"])
            .ok()
            .counts(),
        (1, 1, 0)
    );
}

#[test]
fn identical_output_stops_invalidation() {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"params: {cmd: "printf 'hi' > out"}
stages:
  a:
    uses: shell
    with: {run: "{{ params.cmd }}", outputs: [out]}
  b:
    uses: shell
    inputs: {x: a}
    with: {run: "cat in/x/out in/x/out > twice", outputs: [twice]}
"#,
    );
    assert_eq!(p.fpipe(&["run", "p.yaml"]).ok().counts(), (2, 0, 0));
    // A different command that writes the same bytes: `a` reruns, `b` is cut off.
    let r = p
        .fpipe(&["run", "p.yaml", "-p", "cmd=echo -n hi > out"])
        .ok();
    assert_eq!(r.counts(), (1, 1, 0), "{}", r.all());
    // Different bytes: both run.
    assert_eq!(
        p.fpipe(&["run", "p.yaml", "-p", "cmd=printf ho > out"])
            .ok()
            .counts(),
        (2, 0, 0)
    );
}

const FAMILY: &str = r#"fpipe: 1
params: {generations: 3}
stages:
  teacher:
    uses: shell
    with: {run: "echo teacher > model", outputs: [model]}
  student:
    foreach: {{ params.generations }}
    uses: shell
    inputs:
      teacher: teacher
      init: ${prev}
    with:
      run: "cat in/teacher/model > model; echo gen ${item} >> model; cat in/init/model >> model 2>/dev/null || true"
      outputs: [model]
  eval:
    foreach: {{ params.generations }}
    uses: shell
    inputs: {model: "student@${item}"}
    with: {run: "wc -l < in/model/model > lines", outputs: [lines]}
"#;

#[test]
fn foreach_growth_runs_only_the_new_items() {
    let p = Project::new();
    p.write("kd.yaml", FAMILY);
    assert_eq!(p.fpipe(&["run", "kd.yaml"]).ok().counts(), (7, 0, 0));
    let st = p.fpipe(&["status", "kd.yaml", "-p", "generations=4"]).ok();
    assert!(
        st.stdout.contains("student@4  will run: new"),
        "{}",
        st.stdout
    );
    assert!(
        st.stdout.contains("2 of 9 stages would run"),
        "{}",
        st.stdout
    );
    assert_eq!(
        p.fpipe(&["run", "kd.yaml", "-p", "generations=4"])
            .ok()
            .counts(),
        (2, 7, 0)
    );
    // Generation 3 was initialised from generation 2, which was from 1.
    let dir = p
        .fpipe(&["out", "student@3"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let model = std::fs::read_to_string(format!("{dir}/model")).unwrap();
    assert_eq!(model.matches("gen ").count(), 3, "{model}");
    let lines = p
        .fpipe(&["out", "eval@last", "-f", "kd.yaml", "-p", "generations=4"])
        .ok();
    let n = std::fs::read_to_string(format!("{}/lines", lines.stdout.trim())).unwrap();
    assert_eq!(
        n.trim(),
        "8",
        "teacher + own line, plus generation 3's six lines"
    );
    let dag = p.fpipe(&["dag", "kd.yaml", "--format", "dot"]).ok();
    assert!(
        dag.stdout
            .contains("\"student@1\" -> \"student@2\" [label=\"init\"]"),
        "{}",
        dag.stdout
    );
}

#[test]
fn matrix_expands_every_combination() {
    let p = Project::new();
    p.write(
        "m.yaml",
        r#"stages:
  sweep:
    matrix: {lr: [0.1, 0.01], arch: [r18, r50]}
    uses: shell
    with: {run: "echo ${item.arch} ${item.lr} > r", outputs: [r]}
"#,
    );
    assert_eq!(p.fpipe(&["run", "m.yaml"]).ok().counts(), (4, 0, 0));
    let dir = p
        .fpipe(&["out", "sweep@0.01-r50"])
        .ok()
        .stdout
        .trim()
        .to_string();
    assert_eq!(
        std::fs::read_to_string(format!("{dir}/r")).unwrap(),
        "r50 0.01\n"
    );
}

#[test]
fn failure_stops_dependants_and_lets_others_finish() {
    let p = Project::new();
    p.write(
        "f.yaml",
        r#"stages:
  bad:
    uses: shell
    with: {run: "echo preparing; echo something broke >&2; exit 3", outputs: [x]}
  after:
    uses: shell
    inputs: {x: bad}
    with: {run: "touch y", outputs: [y]}
  other:
    uses: shell
    with: {run: "touch z", outputs: [z]}
"#,
    );
    let r = p.fpipe(&["run", "f.yaml"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.counts(), (1, 0, 1));
    assert!(r.stderr.contains("exit status 3"), "{}", r.stderr);
    assert!(
        r.stderr.contains("something broke"),
        "the log tail is shown: {}",
        r.stderr
    );
    assert!(r.stderr.contains("after skipped"), "{}", r.stderr);
    // Nothing of the failed stage was committed; the next run tries again.
    assert_eq!(p.fpipe(&["run", "f.yaml"]).counts(), (0, 1, 1));
}

#[test]
fn missing_declared_output_fails_the_stage() {
    let p = Project::new();
    p.write(
        "f.yaml",
        "stages:\n  a:\n    uses: shell\n    with: {run: 'true', outputs: [out/model.bin]}\n",
    );
    let r = p.fpipe(&["run", "f.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("did not create declared output `out/model.bin`"),
        "{}",
        r.stderr
    );
}

#[test]
fn parallel_stages_overlap_and_gpu_slots_do_not() {
    let p = Project::new();
    let stamp =
        "date +%s%N > start; sleep 0.4; date +%s%N > end; echo ${CUDA_VISIBLE_DEVICES:-none} > gpu";
    p.write(
        "par.yaml",
        &format!(
            r#"stages:
  a: {{uses: shell, with: {{run: "{stamp}", outputs: [start, end, gpu]}}}}
  b: {{uses: shell, with: {{run: "{stamp}", outputs: [start, end, gpu]}}}}
  g1: {{uses: shell, resources: {{gpu: 1}}, with: {{run: "{stamp}; echo 1 > tag", outputs: [start, end, gpu, tag]}}}}
  g2: {{uses: shell, resources: {{gpu: 1}}, with: {{run: "{stamp}; echo 2 > tag", outputs: [start, end, gpu, tag]}}}}
"#
        ),
    );
    // One GPU visible to the parent, physical GPU 3: the stages' slot 0 is that GPU.
    let run = p
        .cmd(&["run", "par.yaml", "-j", "4", "--gpus", "1"])
        .env("CUDA_VISIBLE_DEVICES", "3")
        .output()
        .unwrap();
    Run::from(run).ok();
    let span = |s: &str| {
        let d = p.fpipe(&["out", s]).ok().stdout.trim().to_string();
        let r = |f: &str| {
            std::fs::read_to_string(format!("{d}/{f}"))
                .unwrap()
                .trim()
                .to_string()
        };
        (
            r("start").parse::<u128>().unwrap(),
            r("end").parse::<u128>().unwrap(),
            r("gpu"),
        )
    };
    let (a0, a1, ga) = span("a");
    let (b0, b1, _) = span("b");
    assert!(a0 < b1 && b0 < a1, "independent stages ran in parallel");
    // A stage without GPU resources inherits the environment unchanged.
    assert_eq!(ga, "3");
    let (g10, g11, gg1) = span("g1");
    let (g20, g21, gg2) = span("g2");
    assert!(
        g11 <= g20 || g21 <= g10,
        "two gpu:1 stages never share the one GPU slot"
    );
    assert_eq!((gg1.as_str(), gg2.as_str()), ("3", "3"));
}

/// A stage that records the GPUs it was given.
const TWO_GPU_STAGES: &str = r#"stages:
  g1: {uses: shell, resources: {gpu: 1}, with: {run: "sleep 0.3; echo $CUDA_VISIBLE_DEVICES > gpu; echo 1 > tag", outputs: [gpu, tag]}}
  g2: {uses: shell, resources: {gpu: 1}, with: {run: "sleep 0.3; echo $CUDA_VISIBLE_DEVICES > gpu; echo 2 > tag", outputs: [gpu, tag]}}
"#;

#[test]
fn gpu_slots_map_to_the_devices_the_parent_may_use() {
    let p = Project::new();
    p.write("g.yaml", TWO_GPU_STAGES);
    let run = p
        .cmd(&["run", "g.yaml", "-j", "2"])
        .env("CUDA_VISIBLE_DEVICES", "2,3")
        .output()
        .unwrap();
    assert_eq!(Run::from(run).ok().counts(), (2, 0, 0));
    let gpu = |s: &str| {
        let d = p.fpipe(&["out", s]).ok().stdout.trim().to_string();
        std::fs::read_to_string(format!("{d}/gpu"))
            .unwrap()
            .trim()
            .to_string()
    };
    let mut got = vec![gpu("g1"), gpu("g2")];
    got.sort();
    assert_eq!(got, ["2", "3"], "each stage gets one of the parent's GPUs");
}

#[test]
fn more_gpus_than_visible_or_an_unusable_device_is_refused_before_anything_runs() {
    let p = Project::new();
    p.write("g.yaml", TWO_GPU_STAGES);
    let run = p
        .cmd(&["run", "g.yaml", "--gpus", "3"])
        .env("CUDA_VISIBLE_DEVICES", "2,3")
        .output()
        .unwrap();
    let r = Run::from(run);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr
            .contains("--gpus 3: only 2 GPU(s) are visible to fpipe (CUDA_VISIBLE_DEVICES=2,3)"),
        "{}",
        r.stderr
    );
    let run = p
        .cmd(&["run", "g.yaml", "--gpus", "1"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert_eq!(Run::from(run).code, 2);
    #[cfg(not(feature = "cuda"))]
    {
        let r = p.fpipe(&["run", "g.yaml", "--device", "cuda:0"]);
        assert_eq!(r.code, 2, "{}", r.all());
        assert!(r.stderr.contains("device `cuda:0`"), "{}", r.stderr);
        assert!(
            r.stderr.contains("built without")
                && (r.stderr.contains("--features cuda") || r.stderr.contains("`faces`")),
            "{}",
            r.stderr
        );
        let r = p.fpipe(&["run", "g.yaml", "--device", "tpu"]);
        assert_eq!(r.code, 2, "{}", r.all());
    }
    // Nothing ran: both stages would still run.
    let st = p.fpipe(&["status", "g.yaml"]).ok();
    assert!(
        st.stdout.contains("2 of 2 stages would run"),
        "{}",
        st.stdout
    );
}

#[test]
fn deps_enter_the_key_by_content_and_keys_travel_between_machines() {
    let team_a = Project::new();
    let pipeline = r#"stages:
  prep:
    uses: shell
    with:
      run: sh scripts/prep.sh > data.txt
      deps: [scripts/prep.sh]
      outputs: [data.txt]
  use:
    uses: shell
    inputs: {d: prep}
    with: {run: "wc -c < in/d/data.txt > n", outputs: [n]}
"#;
    team_a.write("exp/p.yaml", pipeline);
    team_a.write("exp/scripts/prep.sh", "echo prepared\n");
    assert_eq!(
        team_a.fpipe(&["run", "exp/p.yaml"]).ok().counts(),
        (2, 0, 0)
    );
    assert!(
        team_a.path().join("exp/.fpipe/objects").is_dir(),
        "default cache sits beside the pipeline"
    );
    // Same bytes elsewhere: same keys.
    let team_b = Project::new();
    team_b.write("somewhere/else/p.yaml", pipeline);
    team_b.write("somewhere/else/scripts/prep.sh", "echo prepared\n");
    let key = |p: &Project, f: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&p.fpipe(&["status", f, "--json"]).ok().stdout).unwrap();
        v[0]["key"].as_str().unwrap().to_string()
    };
    assert_eq!(
        key(&team_a, "exp/p.yaml"),
        key(&team_b, "somewhere/else/p.yaml")
    );
    // A shared cache hands team A's results to team B.
    let shared = Project::new();
    let shared_dir = shared.path().to_str().unwrap();
    let a_cache = team_a.path().join("exp/.fpipe");
    team_a
        .fpipe(&[
            "--cache",
            a_cache.to_str().unwrap(),
            "cache",
            "push",
            shared_dir,
        ])
        .ok();
    let b_cache = team_b.path().join("somewhere/else/.fpipe");
    team_b
        .fpipe(&[
            "--cache",
            b_cache.to_str().unwrap(),
            "cache",
            "pull",
            shared_dir,
        ])
        .ok();
    assert_eq!(
        team_b
            .fpipe(&["run", "somewhere/else/p.yaml"])
            .ok()
            .counts(),
        (0, 2, 0)
    );
    // Editing the script reruns `prep`, and `use`, since prep's bytes changed.
    team_b.write("somewhere/else/scripts/prep.sh", "echo PREPARED\n");
    let st = team_b.fpipe(&["status", "somewhere/else/p.yaml"]).ok();
    assert!(
        st.stdout.contains("prep  will run: file `deps` changed"),
        "{}",
        st.stdout
    );
    assert_eq!(
        team_b
            .fpipe(&["run", "somewhere/else/p.yaml"])
            .ok()
            .counts(),
        (2, 0, 0)
    );
}

#[test]
fn include_and_relative_paths() {
    let p = Project::new();
    p.write(
        "lib/stages.yaml",
        "params: {word: from-lib}\nstages:\n  lib_stage:\n    uses: shell\n    with: {run: 'cat data/x.txt > o; echo {{ params.word }} >> o', deps: [data/x.txt], outputs: [o]}\n",
    );
    p.write("lib/data/x.txt", "lib data\n");
    p.write(
        "main.yaml",
        "fpipe: 1\ninclude: [lib/stages.yaml]\nparams: {word: from-main}\nstages:\n  top:\n    uses: shell\n    inputs: {l: lib_stage}\n    with: {run: 'cat in/l/o > t', outputs: [t]}\n",
    );
    p.fpipe(&["run", "main.yaml"]).ok();
    let d = p.fpipe(&["out", "top"]).ok().stdout.trim().to_string();
    assert_eq!(
        std::fs::read_to_string(format!("{d}/t")).unwrap(),
        "lib data\nfrom-main\n"
    );
    let pf = p.write("over.yaml", "word: from-file\n");
    let r = p
        .fpipe(&["run", "main.yaml", "--params", pf.to_str().unwrap()])
        .ok();
    assert_eq!(r.counts(), (2, 0, 0));
}

#[test]
fn metrics_reach_show_and_records() {
    let p = Project::new();
    p.write(
        "m.yaml",
        "params: {acc: 0.9}\nstages:\n  eval:\n    uses: shell\n    with: {run: 'echo \"{\\\"accuracy\\\": {{ params.acc }}, \\\"eer\\\": 0.1}\" > $FPIPE_METRICS; touch r', outputs: [r]}\n",
    );
    p.fpipe(&["run", "m.yaml"]).ok();
    p.fpipe(&["run", "m.yaml", "-p", "acc=0.95"]).ok();
    let show = p.fpipe(&["show", "m.yaml"]).ok();
    assert!(show.stdout.contains("accuracy"), "{}", show.stdout);
    assert!(
        show.stdout.contains("0.9000") && show.stdout.contains("0.9500"),
        "{}",
        show.stdout
    );
    let js: serde_json::Value =
        serde_json::from_str(&p.fpipe(&["show", "m.yaml", "--json"]).ok().stdout).unwrap();
    assert_eq!(js.as_array().unwrap().len(), 2);
    // A cached rerun still reports the stage's metrics.
    p.fpipe(&["run", "m.yaml"]).ok();
    let js: serde_json::Value =
        serde_json::from_str(&p.fpipe(&["show", "m.yaml", "--json"]).ok().stdout).unwrap();
    assert_eq!(js[2]["metrics"]["accuracy"], 0.9);
}

#[test]
fn gc_keeps_recent_and_removes_the_rest() {
    let p = Project::new();
    p.write("g.yaml", "params: {v: 1}\nstages:\n  a:\n    uses: shell\n    with: {run: 'echo {{ params.v }} > o', outputs: [o]}\n");
    for v in 1..=3 {
        p.fpipe(&["run", "g.yaml", "-p", &format!("v={v}")]).ok();
    }
    let c = p.path().join(".fpipe");
    let cache = c.to_str().unwrap();
    let dry = p
        .fpipe(&["--cache", cache, "gc", "--keep-runs", "1", "--dry-run"])
        .ok();
    assert!(
        dry.stdout.starts_with("would remove 2 artifacts"),
        "{}",
        dry.stdout
    );
    assert_eq!(
        p.fpipe(&["run", "g.yaml", "-p", "v=1"]).ok().counts(),
        (0, 1, 0),
        "dry run removed nothing"
    );
    let gc = p.fpipe(&["--cache", cache, "gc", "--keep-runs", "1"]).ok();
    assert!(
        gc.stdout.starts_with("removed 2 artifacts"),
        "{}",
        gc.stdout
    );
    assert_eq!(
        p.fpipe(&["run", "g.yaml", "-p", "v=1"]).ok().counts(),
        (0, 1, 0),
        "the newest run's output is kept"
    );
    assert_eq!(
        p.fpipe(&["run", "g.yaml", "-p", "v=2"]).ok().counts(),
        (1, 0, 0),
        "older outputs were removed"
    );
    p.fpipe(&["--cache", cache, "cache", "verify"]).ok();
}

#[test]
fn verify_detects_tampering() {
    let p = Project::new();
    p.write("demo.yaml", DEMO);
    p.fpipe(&["run", "demo.yaml"]).ok();
    let c = p.path().join(".fpipe");
    let cache = c.to_str().unwrap();
    assert!(p
        .fpipe(&["--cache", cache, "cache", "verify"])
        .ok()
        .stdout
        .contains("0 problem(s)"));
    let d = p.fpipe(&["out", "upper"]).ok().stdout.trim().to_string();
    let f = format!("{d}/out/up.txt");
    let mut perm = std::fs::metadata(&f).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&f, perm).unwrap();
    std::fs::write(&f, "tampered").unwrap();
    let r = p.fpipe(&["--cache", cache, "cache", "verify"]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("content hashes to"), "{}", r.stdout);
    p.fpipe(&["--cache", cache, "cache", "verify", "--repair"])
        .ok();
    assert_eq!(
        p.fpipe(&["run", "demo.yaml"]).ok().counts(),
        (1, 1, 0),
        "the damaged entry is recomputed"
    );
}

#[test]
fn the_documented_example_is_valid() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/pipeline-format.md"
    ))
    .unwrap();
    let start = doc.find("```yaml\n").unwrap() + 8;
    let end = start + doc[start..].find("```").unwrap();
    let p = Project::new();
    p.write("kd.yaml", &doc[start..end]);
    for s in ["prepare", "train", "distil", "eval"] {
        p.write(&format!("scripts/{s}.py"), "print('stub')\n");
    }
    p.write("lib/common.yaml", "params: {greeting: from-lib}\n");
    let v = p.fpipe(&["validate", "kd.yaml"]).ok();
    assert!(v.stdout.contains("ok, 12 stages (shell)"), "{}", v.stdout);
    let v = p
        .fpipe(&["validate", "kd.yaml", "-p", "generations=4"])
        .ok();
    assert!(v.stdout.contains("ok, 14 stages"), "{}", v.stdout);
    assert!(
        v.stdout
            .contains("python scripts/prepare.py --greeting \"hello\""),
        "{}",
        v.stdout
    );
}
