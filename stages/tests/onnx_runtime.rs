//! `export-onnx` against ONNX Runtime: for every backbone family, the exported graph passes
//! `onnx.checker` (full check) and ONNX Runtime's embeddings of the same images equal fpipe's
//! own forward within 1e-4 (max abs after L2 normalisation), at batch 1 and batch 7. The
//! graph then comes back through `import-model`'s ONNX reader with the same embeddings.
//!
//! The models are built with seeded weights and BatchNorm statistics moved off the identity
//! (so the folding of BatchNorm into the convolutions is exercised), saved as model artifacts
//! and exported by the same function the `export-onnx` kind runs. Python: a venv under the
//! target folder (`tests/common/onnx_venv.rs`).

#[path = "../../tests/common/onnx_venv.rs"]
mod onnx_venv;

use candle_core::{Device, Tensor};
use fpipe_stages::kinds::onnx::{export_dir, ONNX_CARD, ONNX_FILE};
use fpipe_stages::models::onnx::import::{import_file, ImportOptions};
use fpipe_stages::models::{Backbone, BackboneConfig, BackboneOptions, ParamStore};
use fpipe_stages::train::artifact::{load_model, save_model};
use fpipe_stages::train::trainer::batch_tensor;
use fpipe_stages::util::rng::SplitMix;
use std::path::Path;

/// `n` face-sized RGB images with smooth structure and noise, HWC u8.
fn images(n: usize, size: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut r = SplitMix::new(seed);
    (0..n)
        .map(|_| {
            let (a, b, c) = (r.uniform(), r.uniform(), r.uniform());
            let mut img = vec![0u8; size * size * 3];
            for y in 0..size {
                for x in 0..size {
                    for ch in 0..3 {
                        let v = 128.0
                            + 60.0 * ((x as f64 * (0.05 + a * 0.1)) + ch as f64 * b).sin()
                            + 40.0 * ((y as f64 * (0.04 + c * 0.1)) - ch as f64).cos()
                            + 20.0 * r.normal();
                        img[(y * size + x) * 3 + ch] = v.clamp(0.0, 255.0) as u8;
                    }
                }
            }
            img
        })
        .collect()
}

fn normal(shape: &[usize], std: f64, seed: u64) -> Tensor {
    let mut r = SplitMix::new(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (std * r.normal()) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A model artifact in `dir`: seeded weights, BatchNorm statistics and biases moved.
fn model(dir: &Path, name: &str, width: f64) -> BackboneConfig {
    let o = BackboneOptions {
        width,
        input_size: 112,
        num_features: 128,
        se: true,
    };
    let cfg = BackboneConfig::from_name(name, &o).unwrap();
    let store = ParamStore::new(11);
    Backbone::new(&cfg, store.vb(&Device::Cpu).pp("backbone")).unwrap();
    for (i, (k, v)) in store.vars().into_iter().enumerate() {
        let d = v.dims().to_vec();
        let t = if k.ends_with("running_mean") || k.ends_with("bias") {
            normal(&d, 0.1, i as u64)
        } else if k.ends_with("running_var") {
            (normal(&d, 0.3, i as u64).abs().unwrap() + 0.6).unwrap()
        } else {
            continue;
        };
        v.set(&t).unwrap();
    }
    save_model(
        dir,
        &store,
        &cfg,
        0,
        serde_json::json!(null),
        serde_json::json!(null),
    )
    .unwrap();
    cfg
}

fn l2(v: &[f32], d: usize) -> Vec<f32> {
    v.chunks(d)
        .flat_map(|r| {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            r.iter().map(move |x| x / n)
        })
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn exported_backbones_match_onnx_runtime_and_pass_the_checker() {
    let Some(python) = onnx_venv::python(env!("CARGO_TARGET_TMPDIR")) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // Widths keep the test to seconds; the graphs have every layer of the full networks.
    let cases = [
        ("iresnet18", 0.25),
        ("iresnet50", 0.125),
        ("mobilefacenet", 0.5),
        ("vargfacenet", 0.25),
    ];
    for (name, width) in cases {
        let mdir = tmp.path().join(name);
        let cfg = model(&mdir, name, width);
        let odir = tmp.path().join(format!("{name}-onnx"));
        export_dir(&mdir, &odir).unwrap();
        let card: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(odir.join(ONNX_CARD)).unwrap()).unwrap();
        assert_eq!(card["opset"], 17);
        assert_eq!(card["input_size"], 112);
        assert_eq!(card["embedding_size"], 128);
        assert_eq!(card["colour_order"], "RGB");
        assert_eq!(card["normalisation"]["mean"], cfg.normalisation().mean);
        assert_eq!(card["normalisation"]["std"], cfg.normalisation().std);
        let onnx = odir.join(ONNX_FILE);
        let loaded = load_model(&mdir, &Device::Cpu).unwrap();
        let imported = import_file(
            &onnx,
            &ImportOptions {
                name: name.into(),
                input_size: None,
                mean: cfg.normalisation().mean,
                scale: 1.0 / cfg.normalisation().std,
                bgr: false,
            },
        )
        .unwrap();
        let back = BackboneConfig::Onnx(imported.config);
        let store = ParamStore::new(0);
        let rt = Backbone::new(&back, store.vb(&Device::Cpu).pp("backbone")).unwrap();
        store
            .assign("backbone.", &imported.weights, "model.onnx", false)
            .unwrap();
        for (k, batch) in [1usize, 7].into_iter().enumerate() {
            let raw = images(batch, 112, 100 + k as u64);
            let x = batch_tensor(
                &raw,
                (112, 112),
                &vec![false; batch],
                112,
                cfg.normalisation(),
                &Device::Cpu,
            )
            .unwrap();
            let ours = loaded.backbone.forward(&x, false).unwrap();
            let ours = l2(&ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 128);
            let theirs = l2(
                &onnx_venv::run_onnx_runtime(&python, &onnx, &x, tmp.path(), k == 0).0,
                128,
            );
            let d = max_abs(&ours, &theirs);
            eprintln!("{name} batch {batch}: fpipe vs ONNX Runtime max abs {d:.2e}");
            assert!(d < 1e-4, "{name} batch {batch}: max abs {d}");
            let again = rt.forward(&x, false).unwrap();
            let again = l2(&again.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 128);
            let d = max_abs(&ours, &again);
            eprintln!("{name} batch {batch}: fpipe vs re-imported max abs {d:.2e}");
            assert!(d < 1e-4, "{name} batch {batch}: round trip max abs {d}");
        }
    }
}
