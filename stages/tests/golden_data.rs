//! Golden tests against the real peer tools (files made by `tests/golden/make_golden.py`):
//! skimage + OpenCV alignment, MXNet RecordIO, Python pickle `.bin`, scikit-learn ROC and
//! insightface's 10-fold protocol. No Python is needed to run these.

use fpipe_stages::data::align::{estimate_norm, warp_affine};
use fpipe_stages::data::recordio::{import_recordio, write_indexed, OnError, RecReader};
use fpipe_stages::data::vbin::{import_bin, read_bin_structure};
use fpipe_stages::data::PackedDataset;
use fpipe_stages::eval::metrics;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn golden(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(p)
}

fn json(p: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden(p)).unwrap()).unwrap()
}

fn rgb(p: &Path) -> (usize, usize, Vec<u8>) {
    let i = image::open(p).unwrap().into_rgb8();
    (i.height() as usize, i.width() as usize, i.into_raw())
}

#[test]
fn align_matches_skimage_and_opencv() {
    let meta = json("align/cases.json");
    // (worst, values off by one, total) against OpenCV 4.x and 5.x.
    let mut stats = [(0i32, 0usize, 0usize); 2];
    for (i, case) in meta["cases"].as_array().unwrap().iter().enumerate() {
        let lm: Vec<[f32; 2]> = case["landmarks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| [p[0].as_f64().unwrap() as f32, p[1].as_f64().unwrap() as f32])
            .collect();
        let lm: [[f32; 2]; 5] = lm.try_into().unwrap();
        let size = case["size"].as_u64().unwrap() as usize;
        let m = estimate_norm(&lm, size).unwrap();
        for r in 0..2 {
            for c in 0..3 {
                let want = case["matrix"][r][c].as_f64().unwrap();
                assert!(
                    (m[r][c] - want).abs() < 1e-6,
                    "case {i} size {size}: M[{r}][{c}] {} vs skimage {want}",
                    m[r][c]
                );
                // insightface's own float32 computation: equal up to its rounding noise.
                let f32_path = case["matrix_insightface_float32"][r][c].as_f64().unwrap();
                assert!((m[r][c] - f32_path).abs() < 1e-4);
            }
        }
        let (h, w, src) = rgb(&golden(&format!(
            "align/{}",
            case["image"].as_str().unwrap()
        )));
        // Warp with the peer's matrix so that only the warp is compared.
        let mut mm = [[0f64; 3]; 2];
        for r in 0..2 {
            for c in 0..3 {
                mm[r][c] = case["matrix"][r][c].as_f64().unwrap();
            }
        }
        let mut out = vec![0u8; size * size * 3];
        warp_affine(&src, h, w, &mm, &mut out, size, size);
        for (k, key) in ["warped_cv4", "warped_cv5"].iter().enumerate() {
            let Some(name) = case[*key].as_str() else {
                continue;
            };
            let (_, _, want) = rgb(&golden(&format!("align/{name}")));
            for (a, b) in out.iter().zip(&want) {
                let d = (*a as i32 - *b as i32).abs();
                stats[k].0 = stats[k].0.max(d);
                stats[k].1 += (d == 1) as usize;
            }
            stats[k].2 += out.len();
        }
    }
    eprintln!(
        "align vs OpenCV 4 (worst, off by one, values): {:?}",
        stats[0]
    );
    eprintln!(
        "align vs OpenCV 5 (worst, off by one, values): {:?}",
        stats[1]
    );
    assert!(
        stats[0].2 > 0 && stats[0].0 <= 1,
        "warp differs from OpenCV 4 by {}",
        stats[0].0
    );
    // OpenCV 5 changed its u8 bilinear path; it differs from OpenCV 4 itself by up to 5.
    assert!(
        stats[1].2 == 0 || stats[1].0 <= 6,
        "vs OpenCV 5: {}",
        stats[1].0
    );
}

#[test]
fn recordio_reads_mxnet_files_exactly_and_writes_them_byte_identically() {
    let meta = json("recordio/expected.json");
    let rec = golden("recordio/insight.rec");
    let r = RecReader::open(&rec).unwrap();
    let (keys, header) = r.image_keys().unwrap();
    assert_eq!(keys, (1..=8).collect::<Vec<u64>>());
    assert_eq!(header.unwrap(), vec![9.0, 12.0]);
    // Re-writing every record MXNet wrote (split ones included) gives identical files.
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<(u64, Vec<u8>)> = r.keys().map(|k| (k, r.read_key(k).unwrap())).collect();
    let cflags = meta["insight"]["cflags"].as_array().unwrap();
    assert!(
        cflags.iter().any(|c| c == 2),
        "golden file has split records"
    );
    write_indexed(&dir.path().join("x.rec"), records).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("x.rec")).unwrap(),
        std::fs::read(&rec).unwrap()
    );
    assert_eq!(
        std::fs::read(dir.path().join("x.idx")).unwrap(),
        std::fs::read(rec.with_extension("idx")).unwrap()
    );
    // Import: labels exact; PNG records pixel-exact; JPEG within decoder rounding.
    let c = import_recordio(&rec, &dir.path().join("d"), OnError::Fail, &()).unwrap();
    assert_eq!(c.images, 8);
    let d = PackedDataset::open(&dir.path().join("d")).unwrap();
    assert_eq!(d.image_shape(), (48, 40, 3));
    for (i, e) in meta["insight"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(d.label(i), e["label"].as_i64().unwrap());
        let (_, _, want) = rgb(&golden(&format!(
            "recordio/{}",
            e["decoded"].as_str().unwrap()
        )));
        let (worst, mean) = diff(d.image(i), &want);
        if e["kind"].as_str().unwrap().starts_with("png") {
            assert_eq!(worst, 0, "record {i}");
        } else {
            // JPEG decoders differ in chroma upsampling and IDCT rounding (zune-jpeg here,
            // libjpeg-turbo in MXNet/OpenCV): small on average, larger at sharp colour edges.
            eprintln!("record {i}: JPEG decode vs MXNet: max {worst}, mean {mean:.3}");
            assert!(
                mean < 1.0 && worst <= 32,
                "record {i}: max {worst}, mean {mean}"
            );
        }
    }
    // Plain im2rec file: every key is an image, multi-label records take label[0].
    let plain = golden("recordio/plain.rec");
    import_recordio(&plain, &dir.path().join("p"), OnError::Fail, &()).unwrap();
    let p = PackedDataset::open(&dir.path().join("p")).unwrap();
    assert_eq!(p.len(), 4);
    for (i, e) in meta["plain"].as_array().unwrap().iter().enumerate() {
        assert_eq!(p.label(i), e["label"].as_i64().unwrap());
        let (_, _, want) = rgb(&golden(&format!(
            "recordio/{}",
            e["decoded"].as_str().unwrap()
        )));
        assert_eq!(p.image(i), &want[..]);
    }
}

#[test]
fn verification_bin_reads_every_pickle_variant() {
    let meta = json("bin/expected.json");
    let issame: Vec<bool> = meta["issame"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let files: Vec<&str> = meta["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() >= 7);
    let reference = std::fs::read(golden("bin/protocol4.bin")).unwrap();
    let (ref_bins, _) = read_bin_structure(Path::new("protocol4.bin"), &reference).unwrap();
    let ref_bytes: Vec<Vec<u8>> = ref_bins.iter().map(|b| b.to_vec()).collect();
    let dir = tempfile::tempdir().unwrap();
    for f in &files {
        let path = golden(&format!("bin/{f}"));
        let data = std::fs::read(&path).unwrap();
        let (bins, same) = read_bin_structure(&path, &data).unwrap();
        assert_eq!(same, issame, "{f}");
        let bytes: Vec<Vec<u8>> = bins.iter().map(|b| b.to_vec()).collect();
        assert_eq!(bytes, ref_bytes, "{f}");
        let out = dir.path().join(f);
        import_bin(&path, &out, OnError::Fail, &()).unwrap();
        let d = PackedDataset::open(&out).unwrap();
        assert_eq!(d.len(), 10);
        let pairs = d.pairs().unwrap();
        assert_eq!(pairs.iter().map(|p| p.2).collect::<Vec<_>>(), issame);
        for i in 0..10 {
            let (_, _, want) = rgb(&golden(&format!("bin/img{i}.png")));
            let (worst, mean) = diff(d.image(i), &want);
            if i % 3 == 0 {
                assert_eq!(worst, 0, "{f} image {i} (PNG)");
            } else {
                assert!(
                    mean < 1.0 && worst <= 32,
                    "{f} image {i} (JPEG): max {worst}, mean {mean}"
                );
            }
        }
    }
    for bad in ["bad_three_items.bin", "bad_count.bin"] {
        let path = golden(&format!("bin/{bad}"));
        let e = import_bin(&path, &dir.path().join(bad), OnError::Fail, &())
            .unwrap_err()
            .to_string();
        assert!(e.contains(bad) && e.contains("pickle structure"), "{e}");
        assert!(!dir.path().join(bad).join("dataset.json").exists());
    }
}

/// Largest and mean absolute difference of two images.
fn diff(a: &[u8], b: &[u8]) -> (i32, f64) {
    assert_eq!(a.len(), b.len());
    let d: Vec<i32> = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as i32 - *y as i32).abs())
        .collect();
    (
        *d.iter().max().unwrap(),
        d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64,
    )
}

/// serde_json (without `float_roundtrip`) may parse a float one ulp off: compare to 1e-15.
fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs());
        assert!(ok, "{what}[{i}]: {x} vs {y}");
    }
}

fn read_f32(p: &str) -> Vec<f32> {
    std::fs::read(golden(p))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn metrics_match_sklearn_and_insightface() {
    let meta = json("metrics/expected.json");
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let score = read_f32(&format!("metrics/{name}_score.f32"));
        let dist = read_f32(&format!("metrics/{name}_dist.f32"));
        let same: Vec<bool> = std::fs::read(golden(&format!("metrics/{name}_same.u8")))
            .unwrap()
            .iter()
            .map(|&b| b != 0)
            .collect();
        let roc = metrics::roc(&score, &same).unwrap();
        let f = |k: &str| -> Vec<f64> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap_or(f64::INFINITY))
                .collect()
        };
        assert_close(&roc.fpr, &f("fpr"), &format!("{name} fpr"));
        assert_close(&roc.tpr, &f("tpr"), &format!("{name} tpr"));
        assert_close(
            &roc.thresholds,
            &f("thresholds"),
            &format!("{name} thresholds"),
        );
        assert!((metrics::auc(&roc) - case["auc"].as_f64().unwrap()).abs() < 1e-12);
        let targets = f("fpr_targets");
        assert_close(
            &metrics::tpr_at_fpr(&roc, &targets),
            &f("tpr_at_fpr_ties_highest"),
            name,
        );
        let v = metrics::verification_10fold(&dist, &same, 10).unwrap();
        assert_close(&v.fold_accuracy, &f("acc_folds"), &format!("{name} folds"));
        assert_close(
            &v.fold_threshold,
            &f("best_thresholds"),
            &format!("{name} best thresholds"),
        );
        assert!((v.accuracy - case["acc_mean"].as_f64().unwrap()).abs() < 1e-12);
        assert!((v.std - case["acc_std"].as_f64().unwrap()).abs() < 1e-12);
    }
}
