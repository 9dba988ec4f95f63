//! Every shipped pipeline switches from synthetic faces to real data files with parameters
//! alone (`-p data=recordio -p train_rec=... -p pairs_bin=...`), as a user with an insightface
//! `train.rec` and `lfw.bin` would run it. The files here are the small golden ones written by
//! MXNet and Python pickle (`stages/tests/golden/`).

mod common;
use common::Project;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/stages/tests/golden");

fn project() -> Project {
    let p = Project::new();
    let copy = |from: &str, to: &str| {
        let dst = p.path().join(to);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(format!("{GOLDEN}/{from}"), dst).unwrap();
    };
    copy("recordio/insight.rec", "data/train.rec");
    copy("recordio/insight.idx", "data/train.idx");
    copy("bin/protocol4.bin", "data/lfw.bin");
    copy("bin/protocol5.bin", "data/val.bin");
    // Non-face images of another size than the training set's (they are resized).
    for i in 0..4 {
        copy(&format!("bin/img{i}.png"), &format!("ood/any/{i}.png"));
    }
    for name in [
        "quickstart",
        "vargface",
        "craft",
        "losses",
        "training-features",
    ] {
        let text = std::fs::read_to_string(format!(
            "{}/pipelines/{name}.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        p.write(&format!("{name}.yaml"), &text);
    }
    p
}

const REAL: &[&str] = &[
    "-p",
    "data=recordio",
    "-p",
    "train_rec=data/train.rec",
    "-p",
    "pairs_bin=data/lfw.bin",
    "-p",
    "epochs=1",
    "-p",
    "batch_size=8",
];

fn metrics(p: &Project, file: &str) -> serde_json::Value {
    let show = p.fpipe(&["show", file, "--json"]).ok();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&show.stdout).unwrap();
    let mut by_stage = serde_json::Map::new();
    for r in rows {
        by_stage.insert(r["stage"].as_str().unwrap().into(), r["metrics"].clone());
    }
    serde_json::Value::Object(by_stage)
}

#[test]
fn every_pipeline_runs_on_recordio_and_a_verification_bin() {
    let p = project();
    let extra: &[(&str, &[&str])] = &[
        ("quickstart", &[]),
        ("vargface", &["-p", "generations=1"]),
        ("craft", &[]),
        ("losses", &[]),
        (
            "training-features",
            &[
                "-p",
                "val_bin=data/val.bin",
                "-p",
                "ood_folder=ood",
                "-p",
                "noisy_rec=data/train.rec",
                "-p",
                "qaa_iterations=5",
            ],
        ),
    ];
    for (name, more) in extra {
        let file = format!("{name}.yaml");
        let mut args = vec!["run", file.as_str()];
        args.extend_from_slice(REAL);
        args.extend_from_slice(more);
        let r = p.fpipe(&args).ok();
        let (ran, _, failed) = r.counts();
        assert!(ran > 0 && failed == 0, "{name}: {}", r.all());
        let m = metrics(&p, &file);
        // The training set is the .rec's 8 images; the pairs are the .bin's 10 images.
        assert_eq!(m["faces"]["images"], 8.0, "{name}: {m}");
        assert_eq!(m["heldout"]["images"], 10.0, "{name}: {m}");
        // Nothing synthetic is generated on this route.
        let mut dag_args = vec!["dag", file.as_str()];
        dag_args.extend_from_slice(REAL);
        dag_args.extend_from_slice(more);
        let dag = p.fpipe(&dag_args).ok();
        assert!(
            !dag.stdout.contains("synthetic-faces"),
            "{name}: {}",
            dag.stdout
        );
    }
    let m = metrics(&p, "training-features.yaml");
    assert_eq!(m["nonfaces"]["images"], 4.0, "{m}");
    // A real set to filter has no ground truth: counts, no precision or recall.
    for f in ["filter-graph", "filter-dbscan"] {
        assert_eq!(
            m[f]["kept"].as_f64().unwrap() + m[f]["removed"].as_f64().unwrap(),
            8.0
        );
        assert!(m[f].get("precision").is_none(), "{f}: {m}");
    }
    // The error-versus-reject curve of 5 pairs ends early instead of failing the stage.
    assert!(m["eval-qaa"].get("erc_auc@fmr=1e-2").is_some(), "{m}");
}

#[test]
fn an_unknown_data_choice_or_missing_file_is_a_plan_time_error() {
    let p = project();
    let r = p.fpipe(&["run", "quickstart.yaml", "-p", "data=lfw"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("quickstart.yaml") && r.stderr.contains("use synthetic or recordio"),
        "{}",
        r.stderr
    );
    let r = p.fpipe(&[
        "run",
        "vargface.yaml",
        "-p",
        "data=recordio",
        "-p",
        "train_rec=data/missing.rec",
        "-p",
        "pairs_bin=data/lfw.bin",
    ]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("stage `faces`") && r.stderr.contains("missing.rec"),
        "{}",
        r.stderr
    );
}
