//! Face-recognition stages through the `fpipe` binary: a training stage killed with SIGKILL
//! resumes from its checkpoint on the next run; wiring and inspection of real artifacts.
#![cfg(feature = "faces")]

mod common;
use common::Project;
use std::time::{Duration, Instant};

const SMALL: &str = r#"stages:
  faces:
    uses: synthetic-faces
    with: {identities: 40, images_per_identity: 10, image_size: 32, test_identities: 10, pairs: 100}
  train:
    uses: train
    inputs: {dataset: faces.dataset}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 32, epochs: 8, batch_size: 32, checkpoint_every: 20}
"#;

#[test]
fn killed_training_resumes_from_its_checkpoint() {
    let p = Project::new();
    p.write("r.yaml", SMALL);
    let mut child = p
        .cmd(&["run", "r.yaml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until training is past its second checkpoint (step 40), then SIGKILL.
    let runs = p.path().join(".fpipe/runs");
    let t = Instant::now();
    let mut seen = false;
    while t.elapsed() < Duration::from_secs(300) && !seen {
        std::thread::sleep(Duration::from_millis(100));
        seen = std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("logs/train.log")).ok())
            .any(|log| log.contains("step 50/"));
    }
    assert!(seen, "training reached step 50");
    child.kill().unwrap();
    child.wait().unwrap();
    let c = p.path().join(".fpipe");
    let v = p
        .fpipe(&["--cache", c.to_str().unwrap(), "cache", "verify"])
        .ok();
    assert!(v.stdout.contains("0 problem(s)"), "{}", v.stdout);
    let r = p.fpipe(&["run", "r.yaml"]).ok();
    assert_eq!(r.counts(), (1, 1, 0), "faces cached, train resumed");
    let logs: String = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("logs/train.log")).ok())
        .collect();
    assert!(
        logs.contains("resumed from the checkpoint at step 40"),
        "{logs}"
    );
    // The checkpoint is gone once the stage succeeded.
    let scratch: Vec<_> = std::fs::read_dir(c.join("scratch")).unwrap().collect();
    assert!(scratch.is_empty());
    let info = p
        .fpipe(&["inspect", "faces.dataset", "-f", "r.yaml", "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(v["images"], 400);
    assert_eq!(v["identities"], 40);
}

#[test]
fn a_shell_output_cannot_feed_a_dataset_port() {
    let p = Project::new();
    p.write(
        "w.yaml",
        "stages:\n  files:\n    uses: shell\n    with: {run: 'touch x', outputs: [x]}\n  train:\n    uses: train\n    inputs:\n      dataset: files\n",
    );
    let r = p.fpipe(&["run", "w.yaml"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("w.yaml:8: stage `train`: wrong port type: input `dataset` takes `dataset` but `files.files` is `files`"),
        "{}",
        r.stderr
    );
}

#[test]
fn vargface_pipeline_runs_and_grows_by_one_generation() {
    let p = Project::new();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/vargface.yaml"
    ))
    .unwrap();
    p.write("vargface.yaml", &text);
    let tiny = [
        "-p",
        "identities=20",
        "-p",
        "images_per_identity=5",
        "-p",
        "image_size=32",
        "-p",
        "input_size=32",
        "-p",
        "teacher_width=0.125",
        "-p",
        "student_width=0.125",
        "-p",
        "epochs=1",
        "-p",
        "batch_size=16",
    ];
    let args = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["run", "vargface.yaml"];
        v.extend_from_slice(&tiny);
        v.extend_from_slice(extra);
        v
    };
    assert_eq!(p.fpipe(&args(&[])).ok().counts(), (9, 0, 0));
    assert_eq!(
        p.fpipe(&args(&[])).ok().counts(),
        (0, 9, 0),
        "a second run executes nothing"
    );
    assert_eq!(
        p.fpipe(&args(&["-p", "generations=3"])).ok().counts(),
        (2, 9, 0),
        "only student@3 and eval@3"
    );
    let show = p.fpipe(&["show", "vargface.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let evals = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["metrics"].get("accuracy").is_some())
        .count();
    assert!(
        evals >= 5,
        "every evaluation reports accuracy: {}",
        show.stdout
    );
}

#[test]
fn training_features_pipeline_runs_end_to_end_and_reruns_nothing() {
    let p = Project::new();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/training-features.yaml"
    ))
    .unwrap();
    p.write("tf.yaml", &text);
    let mut args = vec!["run", "tf.yaml"];
    for kv in [
        "identities=10",
        "images_per_identity=5",
        "image_size=32",
        "input_size=32",
        "width=0.125",
        "embedding_size=16",
        "epochs=1",
        "batch_size=16",
        "snapshot_every=2",
        "qaa_iterations=20",
        "qaa_depth=3",
        "noisy_identities=8",
    ] {
        args.extend(["-p", kv]);
    }
    // 3 data sets, baseline + its evaluation, 4 fine-tunings + 4 evaluations, qaa,
    // qaa-score and the quality evaluation; the noisy set, its embeddings and quality, and
    // three filters.
    assert_eq!(p.fpipe(&args).ok().counts(), (22, 0, 0));
    assert_eq!(
        p.fpipe(&args).ok().counts(),
        (0, 22, 0),
        "a second run executes nothing"
    );
    let show = p.fpipe(&["show", "tf.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let stage = |name: &str| {
        rows.iter()
            .find(|r| r["stage"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {}", show.stdout))
    };
    for mix in ["none", "blur", "noise", "out-of-domain"] {
        assert!(stage(&format!("bnft@{mix}"))["metrics"]["best_step"].as_f64() > Some(0.0));
        assert!(stage(&format!("eval-bnft@{mix}"))["metrics"]["tpr@fpr=1e-2"].is_number());
    }
    let q = &stage("eval-qaa")["metrics"];
    assert_eq!(q["dropped_pairs"], 50.0, "5 % of 1000 pairs");
    assert!(q["erc_auc@fmr=1e-3"].is_number());
    assert!(stage("qaa")["metrics"]["quality_clean"].is_number());
    // Each filter is scored against the injected label noise (8 identities x 5 images x 0.1).
    for f in ["filter-graph", "filter-graph-flat", "filter-dbscan"] {
        let m = &stage(f)["metrics"];
        let (kept, removed) = (m["kept"].as_f64(), m["removed"].as_f64());
        assert_eq!(
            kept.zip(removed).map(|(k, r)| k + r),
            Some(40.0),
            "{f}: {m}"
        );
    }
}

#[test]
fn bad_training_feature_params_are_rejected_at_plan_time() {
    let p = Project::new();
    let head = "stages:\n  faces:\n    uses: synthetic-faces\n  train:\n    uses: train\n    inputs: {dataset: faces.dataset}\n";
    let cases = [
        (
            "bn-finetune",
            "{model: train.model, dataset: faces.dataset, pairs: faces.pairs}",
            "fraction: 0.9",
            "fraction 0.9 must lie in (0, 0.5]",
        ),
        (
            "bn-finetune",
            "{model: train.model, dataset: faces.dataset, pairs: faces.pairs}",
            "sigma_min: 5, sigma_max: 3",
            "need 0 < sigma_min <= sigma_max <= 50",
        ),
        (
            "qaa",
            "{model: train.model, dataset: faces.dataset}",
            "depth: 0",
            "depth 0 must lie in 1..=16",
        ),
        (
            "qaa",
            "{model: train.model, dataset: faces.dataset}",
            "bins: 1000",
            "bins 1000 must lie in 2..=256",
        ),
        (
            "evaluate",
            "{model: train.model, pairs: faces.pairs}",
            "drop_lowest: 0.99",
            "drop_lowest 0.99 must lie in [0, 0.95)",
        ),
    ];
    for (kind, inputs, with, msg) in cases {
        p.write(
            "b.yaml",
            &format!("{head}  s:\n    uses: {kind}\n    inputs: {inputs}\n    with: {{{with}}}\n"),
        );
        let r = p.fpipe(&["run", "b.yaml"]);
        assert_eq!(r.code, 2, "{kind} {with}: {}", r.all());
        assert!(r.stderr.contains(msg), "{kind} {with}: {}", r.stderr);
    }
}

#[test]
fn losses_pipeline_trains_every_loss_and_a_rerun_executes_nothing() {
    let p = Project::new();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/losses.yaml"
    ))
    .unwrap();
    p.write("losses.yaml", &text);
    let tiny = [
        "-p",
        "identities=16",
        "-p",
        "images_per_identity=4",
        "-p",
        "image_size=32",
        "-p",
        "test_identities=10",
        "-p",
        "pairs=100",
        "-p",
        "width=0.125",
        "-p",
        "embedding_size=32",
        "-p",
        "epochs=1",
        "-p",
        "batch_size=16",
    ];
    let mut args = vec!["run", "losses.yaml"];
    args.extend_from_slice(&tiny);
    // faces + 9 trainings (8 presets and CM2) + 9 evaluations + 9 identifications.
    assert_eq!(p.fpipe(&args).ok().counts(), (28, 0, 0));
    assert_eq!(
        p.fpipe(&args).ok().counts(),
        (0, 28, 0),
        "a second run executes nothing"
    );
    let show = p.fpipe(&["show", "losses.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let rows = v.as_array().unwrap();
    // Rows of both runs may be listed: count stages.
    let stages_with = |name: &str| {
        let mut v: Vec<(String, f64)> = rows
            .iter()
            .filter_map(|r| {
                let m = r["metrics"].get(name).and_then(|m| m.as_f64())?;
                Some((r["stage"].as_str()?.to_string(), m))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        v
    };
    assert_eq!(
        stages_with("accuracy").len(),
        9,
        "every loss is evaluated: {}",
        show.stdout
    );
    assert_eq!(
        stages_with("rank1").len(),
        9,
        "every loss is identified: {}",
        show.stdout
    );
    // Each loss with a per-step extra reports it.
    let metric = |name: &str| {
        stages_with(name)
            .into_iter()
            .map(|s| s.1)
            .collect::<Vec<_>>()
    };
    let active = metric("final_active_triplets");
    assert_eq!(active.len(), 1, "{}", show.stdout);
    assert!((0.0..=1.0).contains(&active[0]));
    assert_eq!(metric("final_lambda").len(), 2, "sphereface and CM2");
    assert_eq!(metric("final_center_distance").len(), 1);
}
