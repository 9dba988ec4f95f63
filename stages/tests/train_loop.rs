//! The training loop: resume after a kill continues with identical losses, a diverging run
//! stops naming the step, and a small model trained by the `train` stage on `synthetic-faces`
//! beats chance on held-out identities by a wide margin (`evaluate`), then `distil` and
//! `embed` run on its outputs.

use candle_core::Device;
use fpipe_engine::{Stage, StageContext};
use fpipe_stages::data::synth::{generate, Monitor, SynthParams};
use fpipe_stages::kinds::{
    evaluate::EvaluateStage,
    train::{DistilStage, EmbedStage, TrainStage},
};
use fpipe_stages::loss::{MarginConfig, MarginVariant};
use fpipe_stages::models::{mobilefacenet, BackboneConfig};
use fpipe_stages::train::trainer::{train, RunEnv, TrainConfig};
use fpipe_stages::train::{FaceSource, TrainError};
use fpipe_stages::util::rng::SplitMix;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// In-memory faces: each class a fixed random pattern, each image that pattern plus noise.
struct Blobs {
    classes: usize,
    per: usize,
    size: usize,
}

impl FaceSource for Blobs {
    fn len(&self) -> usize {
        self.classes * self.per
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        (self.size, self.size, 3)
    }
    fn label(&self, i: usize) -> u32 {
        (i / self.per) as u32
    }
    fn read_image(&self, i: usize, out: &mut [u8]) -> Result<(), TrainError> {
        let mut base = SplitMix::new(self.label(i) as u64);
        let mut noise = SplitMix::new(1000 + i as u64);
        for o in out.iter_mut() {
            *o = ((base.uniform() * 200.0) + noise.uniform() * 55.0) as u8;
        }
        Ok(())
    }
}

fn tiny_config(steps: u64) -> TrainConfig {
    let backbone = BackboneConfig::Mobilefacenet(mobilefacenet::Config {
        width: 0.0625,
        input_size: 32,
        num_features: 16,
        ..Default::default()
    });
    TrainConfig {
        margin: MarginConfig {
            s: 16.0,
            ..MarginConfig::arcface()
        },
        sample_rate: 0.5,
        lr: 0.05,
        warmup_steps: 2,
        batch_size: 8,
        seed: 3,
        ..TrainConfig::arcface_torch(backbone, steps)
    }
}

fn env<'a>(
    scratch: &Path,
    every: u64,
    stop: Option<u64>,
    on_step: &'a (dyn Fn(u64, u64, f64, f64, f64) + Sync),
    cancelled: &'a (dyn Fn() -> bool + Sync),
) -> RunEnv<'a> {
    RunEnv {
        device: Device::Cpu,
        scratch: scratch.to_path_buf(),
        checkpoint_every: every,
        init: None,
        teacher: None,
        on_step,
        cancelled,
        stop_after: stop,
    }
}

#[test]
fn resume_after_kill_continues_with_identical_losses() {
    let data = Blobs {
        classes: 6,
        per: 5,
        size: 24,
    };
    let cfg = tiny_config(9);
    let tmp = tempfile::tempdir().unwrap();
    let nop = |_: u64, _: u64, _: f64, _: f64, _: f64| {};
    let no = || false;
    let full = train(&cfg, &data, &env(&tmp.path().join("a"), 0, None, &nop, &no)).unwrap();
    assert_eq!(full.curve.len(), 9);
    let b = tmp.path().join("b");
    // "Killed" after 5 steps: the checkpoint of step 3 survives, steps 4-5 are lost.
    let first = train(&cfg, &data, &env(&b, 3, Some(5), &nop, &no)).unwrap();
    assert_eq!(first.steps_done, 5);
    let resumed = train(&cfg, &data, &env(&b, 3, None, &nop, &no)).unwrap();
    assert_eq!(resumed.resumed_at, 3);
    assert_eq!(resumed.curve.len(), 9);
    for (a, r) in full.curve.iter().zip(&resumed.curve) {
        assert_eq!(a, r, "step {}", a.step);
    }
    let wa = full.store.tensors("");
    let wr = resumed.store.tensors("");
    for (k, t) in &wa {
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = wr[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x, y, "{k}");
    }
}

#[test]
fn non_finite_loss_stops_naming_the_step() {
    let data = Blobs {
        classes: 4,
        per: 4,
        size: 24,
    };
    let mut cfg = tiny_config(50);
    cfg.lr = 1e30;
    cfg.grad_clip = 0.0;
    cfg.warmup_steps = 0;
    cfg.margin.variant = MarginVariant::Differentiable;
    let tmp = tempfile::tempdir().unwrap();
    let nop = |_: u64, _: u64, _: f64, _: f64, _: f64| {};
    let no = || false;
    match train(&cfg, &data, &env(tmp.path(), 0, None, &nop, &no)) {
        Err(e @ TrainError::NonFinite { .. }) => {
            assert!(e.to_string().contains("at step"), "{e}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("training with lr 1e30 did not diverge"),
    }
}

struct Quiet;
impl Monitor for Quiet {
    fn progress(&self, _: u64, _: u64) {}
}

fn ctx(
    name: &str,
    params: Value,
    inputs: &[(&str, &Path)],
    outputs: &[&str],
    root: &Path,
) -> StageContext {
    let params: BTreeMap<String, Value> = params
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let inputs = inputs
        .iter()
        .map(|(k, p)| (k.to_string(), p.to_path_buf()))
        .collect();
    let outputs: BTreeMap<String, PathBuf> = outputs
        .iter()
        .map(|o| {
            let d = root.join(format!("{name}-{o}"));
            std::fs::create_dir_all(&d).unwrap();
            (o.to_string(), d)
        })
        .collect();
    let mut c = StageContext::standalone(
        name,
        params,
        inputs,
        outputs,
        root.join(format!("{name}-scratch")),
    );
    c.threads = 2;
    c
}

/// Declared defaults plus overrides, as the engine resolves them.
fn params_for(stage: &dyn Stage, over: Value) -> Value {
    let mut m = serde_json::Map::new();
    for p in stage.signature().params {
        if let Some(d) = p.default {
            m.insert(p.name.to_string(), d);
        }
    }
    for (k, v) in over.as_object().unwrap() {
        m.insert(k.clone(), v.clone());
    }
    Value::Object(m)
}

#[test]
fn small_model_on_synthetic_faces_beats_chance_on_held_out_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (train_dir, pairs_dir) = (root.join("train"), root.join("pairs"));
    let sp = SynthParams {
        identities: 40,
        images_per_identity: 12,
        image_size: 32,
        seed: 1,
        test_identities: 30,
        test_images_per_identity: 6,
        pairs: 600,
        ..Default::default()
    };
    generate(&sp, &train_dir, Some(&pairs_dir), &Quiet).unwrap();

    let stage = TrainStage;
    let p = params_for(
        &stage,
        json!({
            "backbone": "mobilefacenet", "width": 0.125, "input_size": 32, "embedding_size": 32,
            "loss": "cosface", "scale": 16.0, "lr": 0.05, "batch_size": 32, "epochs": 24.0,
            "warmup_epochs": 1.0, "weight_decay": 5e-4, "checkpoint_every": 50
        }),
    );
    stage
        .check_params(&serde_json::from_value(p.clone()).unwrap())
        .unwrap();
    let mut c = ctx(
        "train",
        p,
        &[("dataset", &train_dir)],
        &["model", "report"],
        root,
    );
    stage.run(&mut c).unwrap();
    let model = root.join("train-model");
    let card: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(card["classes"], 40);
    assert_eq!(card["input_size"], 32);
    assert!(model.join("model.safetensors").exists() && model.join("centres.safetensors").exists());
    let report = root.join("train-report");
    let csv = std::fs::read_to_string(report.join("curve.csv")).unwrap();
    // 480 images / 32 per step × 24 epochs.
    assert_eq!(csv.lines().count(), 1 + 360);
    assert!(std::fs::read(report.join("curve.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));

    let ev = EvaluateStage;
    let mut c = ctx(
        "eval",
        params_for(&ev, json!({})),
        &[("model", &model), ("pairs", &pairs_dir)],
        &["metrics", "report"],
        root,
    );
    ev.run(&mut c).unwrap();
    let acc = c.metrics()["accuracy"];
    let auc = c.metrics()["auc"];
    eprintln!("held-out verification: accuracy {acc:.3}, AUC {auc:.3}");
    assert!(acc > 0.7, "accuracy {acc} is not far above chance (0.5)");
    assert!(auc > 0.8, "AUC {auc}");
    assert!(root.join("eval-report/roc.png").exists());

    // Distil a student from it (a few steps), then embed with the student.
    let ds = DistilStage;
    let p = params_for(
        &ds,
        json!({
            "backbone": "iresnet18", "width": 0.125, "input_size": 32, "embedding_size": 32,
            "batch_size": 16, "steps": 4, "lr": 0.01
        }),
    );
    let mut c = ctx(
        "distil",
        p,
        &[("dataset", &train_dir), ("teacher", &model)],
        &["model", "report"],
        root,
    );
    ds.run(&mut c).unwrap();
    let es = EmbedStage;
    let mut c = ctx(
        "embed",
        params_for(&es, json!({})),
        &[
            ("model", &root.join("distil-model")),
            ("dataset", &pairs_dir),
        ],
        &["embeddings"],
        root,
    );
    es.run(&mut c).unwrap();
    let t = candle_core::safetensors::load(
        root.join("embed-embeddings/embeddings.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(t["embeddings"].dims(), &[30 * 6, 32]);
}
