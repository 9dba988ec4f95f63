//! Inference throughput of ONNX models in fpipe against ONNX Runtime, side by side, on the
//! same cores (docs/benchmarks.md):
//!
//! ```text
//! scripts/real-faces.sh target/real-faces          # SFace (optional; skipped when absent)
//! RAYON_NUM_THREADS=2 cargo bench -p fpipe-stages --bench onnx_inference
//! ```
//!
//! Models: a full-size iresnet50 (112×112, 512-D, seeded weights) run natively, exported by
//! `export-onnx` and imported back; and OpenCV Zoo's SFace imported from its int8
//! block-quantised file (`FPIPE_SFACE`, default `target/real-faces/sface_int8bq.onnx`), with
//! ONNX Runtime on the original and on `scripts/sface_fp32.py`'s float32 conversion (batched).
//! ONNX Runtime runs through `scripts/onnx_check.py --bench` in the test venv
//! (`<target>/tmp/onnx-venv`, created on first use) with `--threads` = fpipe's thread count.
//! Prints images/s for each and the ratio fpipe / ONNX Runtime.

#[path = "../../tests/common/onnx_venv.rs"]
mod onnx_venv;

use candle_core::{DType, Device, Tensor};
use fpipe_stages::kinds::onnx::export_dir;
use fpipe_stages::models::onnx::import::{import_file, ImportOptions};
use fpipe_stages::models::{Backbone, BackboneConfig, BackboneOptions, ParamStore};
use fpipe_stages::train::artifact::save_model;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts");
const SECONDS: f64 = 8.0;

/// Images per second of `f` on batches of `n`, over about [`SECONDS`] after one warm-up.
fn rate(n: usize, f: impl Fn() -> candle_core::Result<Tensor>) -> f64 {
    f().expect("warm-up");
    let t = Instant::now();
    let mut done = 0;
    while t.elapsed().as_secs_f64() < SECONDS {
        f().expect("forward");
        done += n;
    }
    done as f64 / t.elapsed().as_secs_f64()
}

fn ort(python: &Path, onnx: &Path, n: usize, threads: usize) -> f64 {
    let o = Command::new(python)
        .arg(format!("{SCRIPTS}/onnx_check.py"))
        .args(["--bench"])
        .arg(onnx)
        .args([
            n.to_string(),
            "112".into(),
            "112".into(),
            SECONDS.to_string(),
        ])
        .args(["--threads", &threads.to_string()])
        .output()
        .expect("run onnx_check.py");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    v["images_per_s"].as_f64().expect("images_per_s")
}

fn imported(path: &Path, mean: f64, scale: f64) -> Backbone {
    let imp = import_file(
        path,
        &ImportOptions {
            name: "bench".into(),
            input_size: Some(112),
            mean,
            scale,
            bgr: false,
        },
    )
    .expect("import");
    let cfg = BackboneConfig::Onnx(imp.config);
    let store = ParamStore::new(0);
    let b = Backbone::new(&cfg, store.vb(&Device::Cpu).pp("backbone")).expect("build");
    store
        .assign("backbone.", &imp.weights, "bench", false)
        .expect("weights");
    b
}

fn row(what: &str, batch: usize, ours: f64, theirs: f64) {
    println!(
        "| {what} | {batch} | {ours:.1} | {theirs:.1} | {:.2} |",
        ours / theirs
    );
}

fn main() {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize);
    let python = onnx_venv::python(env!("CARGO_TARGET_TMPDIR")).expect("python with onnxruntime");
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = BackboneOptions {
        width: 1.0,
        input_size: 112,
        num_features: 512,
        se: false,
    };
    let cfg = BackboneConfig::from_name("iresnet50", &o).expect("iresnet50");
    let store = ParamStore::new(1);
    Backbone::new(&cfg, store.vb(&Device::Cpu).pp("backbone")).expect("build");
    let mdir = tmp.path().join("model");
    save_model(
        &mdir,
        &store,
        &cfg,
        0,
        serde_json::json!(null),
        serde_json::json!(null),
    )
    .expect("save");
    let odir = tmp.path().join("onnx");
    export_dir(&mdir, &odir).expect("export");
    let native = fpipe_stages::train::artifact::load_model(&mdir, &Device::Cpu).expect("load");
    let exported = imported(&odir.join("model.onnx"), 127.5, 1.0 / 127.5);

    println!("threads: fpipe (rayon) {threads}, ONNX Runtime intra-op {threads}");
    println!("| model | batch | fpipe images/s | ONNX Runtime images/s | fpipe / ORT |");
    println!("|---|---|---|---|---|");
    let batch = 8;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 112, 112), &Device::Cpu).expect("x");
    let theirs = ort(&python, &odir.join("model.onnx"), batch, threads);
    let ours = rate(batch, || exported.forward(&x, false));
    row(
        "iresnet50 exported, imported into fpipe",
        batch,
        ours,
        theirs,
    );
    let ours = rate(batch, || native.backbone.forward(&x, false));
    row("iresnet50 native fpipe (same weights)", batch, ours, theirs);

    let sface = std::env::var("FPIPE_SFACE").unwrap_or_else(|_| {
        format!(
            "{}/../target/real-faces/sface_int8bq.onnx",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let sface = Path::new(&sface);
    if !sface.exists() {
        println!(
            "SFace: {} not found (scripts/real-faces.sh): skipped",
            sface.display()
        );
        return;
    }
    let fp32 = tmp.path().join("sface_fp32.onnx");
    let conv = Command::new(&python)
        .arg(format!("{SCRIPTS}/sface_fp32.py"))
        .arg(sface)
        .arg(&fp32)
        .output()
        .expect("sface_fp32.py");
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let s = imported(sface, 0.0, 1.0);
    let x1 = (Tensor::rand(0f32, 255.0, (1, 3, 112, 112), &Device::Cpu).expect("x"))
        .to_dtype(DType::F32)
        .expect("f32");
    let xb = Tensor::rand(0f32, 255.0, (batch, 3, 112, 112), &Device::Cpu).expect("x");
    let theirs = ort(&python, sface, 1, threads);
    row(
        "SFace int8bq (ORT: original file)",
        1,
        rate(1, || s.forward(&x1, false)),
        theirs,
    );
    let theirs = ort(&python, &fp32, 1, threads);
    row(
        "SFace (ORT: float32 conversion)",
        1,
        rate(1, || s.forward(&x1, false)),
        theirs,
    );
    let theirs = ort(&python, &fp32, batch, threads);
    row(
        "SFace (ORT: float32 conversion)",
        batch,
        rate(batch, || s.forward(&xb, false)),
        theirs,
    );
}
