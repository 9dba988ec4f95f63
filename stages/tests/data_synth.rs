//! synthetic-faces: determinism, counts, ground truth, landmarks.

use fpipe_stages::data::synth::{generate, SynthParams};
use fpipe_stages::data::PackedDataset;

fn small() -> SynthParams {
    SynthParams {
        identities: 12,
        images_per_identity: 5,
        image_size: 48,
        seed: 7,
        label_noise: 0.1,
        low_quality: 0.1,
        out_of_domain: 0.05,
        test_identities: 6,
        test_images_per_identity: 4,
        pairs: 40,
    }
}

#[test]
fn synthetic_is_byte_identical_for_same_params() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = small();
    generate(&p, &a.path().join("t"), Some(&a.path().join("p")), &()).unwrap();
    generate(&p, &b.path().join("t"), Some(&b.path().join("p")), &()).unwrap();
    for f in [
        "t/images.u8",
        "t/records.bin",
        "t/dataset.json",
        "p/images.u8",
        "p/pairs.bin",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f} differs"
        );
    }
    let mut q = p.clone();
    q.seed = 8;
    generate(&q, &b.path().join("t2"), None, &()).unwrap();
    assert_ne!(
        std::fs::read(a.path().join("t/images.u8")).unwrap(),
        std::fs::read(b.path().join("t2/images.u8")).unwrap()
    );
}

#[test]
fn synthetic_counts_truth_landmarks_and_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let p = small();
    let c = generate(&p, &dir.path().join("t"), Some(&dir.path().join("p")), &()).unwrap();
    let d = PackedDataset::open(&dir.path().join("t")).unwrap();
    assert_eq!(d.len(), 60);
    assert_eq!(d.num_classes(), 12);
    assert_eq!(d.image_shape(), (48, 48, 3));
    let (mut noise, mut low, mut ood) = (0, 0, 0);
    for i in 0..d.len() {
        let t = d.truth(i);
        assert_eq!(d.label(i), (i / 5) as i64);
        noise += t.label_noise as usize;
        low += t.low_quality as usize;
        ood += t.out_of_domain as usize;
        if t.label_noise {
            assert_ne!(t.true_label, Some(d.label(i)));
        } else if !t.out_of_domain {
            assert_eq!(t.true_label, Some(d.label(i)));
        }
        let lm = d.landmarks(i).unwrap();
        if !t.out_of_domain {
            // Eyes above the nose above the mouth, left eye left of right eye, all in view.
            assert!(lm[0][0] < lm[1][0] + 4.0);
            for pt in lm {
                assert!(
                    pt[0] > 0.0 && pt[0] < 48.0 && pt[1] > 0.0 && pt[1] < 48.0,
                    "{lm:?}"
                );
            }
        }
    }
    assert_eq!((noise, low, ood), (6, 6, 3));
    assert_eq!((c.label_noise, c.low_quality, c.out_of_domain), (6, 6, 3));
    let v = PackedDataset::open(&dir.path().join("p")).unwrap();
    assert_eq!(v.len(), 24);
    let pairs = v.pairs().unwrap();
    assert_eq!(pairs.len(), 40);
    assert_eq!(pairs.iter().filter(|x| x.2).count(), 20);
    for &(a, b, same) in pairs {
        assert_ne!(a, b);
        assert_eq!(v.label(a as usize) == v.label(b as usize), same);
    }
}

#[test]
fn align_synthetic_puts_landmarks_on_the_template() {
    use fpipe_stages::data::align::{align_dataset, arcface_template, OnMissing};
    let dir = tempfile::tempdir().unwrap();
    let mut p = small();
    p.out_of_domain = 0.0;
    generate(&p, &dir.path().join("t"), Some(&dir.path().join("p")), &()).unwrap();
    let c = align_dataset(
        &dir.path().join("p"),
        &dir.path().join("a"),
        112,
        OnMissing::Fail,
        &(),
    )
    .unwrap();
    assert_eq!(c.aligned, 24);
    let a = PackedDataset::open(&dir.path().join("a")).unwrap();
    assert_eq!(a.image_shape(), (112, 112, 3));
    assert_eq!(a.pairs().unwrap().len(), 40);
    let t = arcface_template(112);
    for i in 0..a.len() {
        let lm = a.landmarks(i).unwrap();
        // A similarity cannot map 5 points exactly; residuals stay within a few pixels.
        for k in 0..5 {
            let d =
                ((lm[k][0] as f64 - t[k][0]).powi(2) + (lm[k][1] as f64 - t[k][1]).powi(2)).sqrt();
            assert!(d < 16.0, "image {i} point {k} off by {d}");
        }
    }
    let v = fpipe_stages::data::inspect(&dir.path().join("a")).unwrap();
    assert_eq!(v["images"], 24);
    assert_eq!(v["kind"], "pairs");
}

#[test]
fn recordio_export_then_import_roundtrips_labels_and_images() {
    use fpipe_stages::data::recordio::{export_recordio, import_recordio, OnError};
    let dir = tempfile::tempdir().unwrap();
    let mut p = small();
    p.pairs = 0;
    generate(&p, &dir.path().join("t"), None, &()).unwrap();
    let n = export_recordio(&dir.path().join("t"), &dir.path().join("rec"), 95).unwrap();
    assert_eq!(n, 60);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("rec/property")).unwrap(),
        "12,48,48\n"
    );
    let c = import_recordio(
        &dir.path().join("rec/train.rec"),
        &dir.path().join("back"),
        OnError::Fail,
        &(),
    )
    .unwrap();
    assert_eq!(c.images, 60);
    let a = PackedDataset::open(&dir.path().join("t")).unwrap();
    let b = PackedDataset::open(&dir.path().join("back")).unwrap();
    assert_eq!(b.num_classes(), 12);
    // Same labels in the same order (the data set is already sorted by label); JPEG q95 is
    // close to the original.
    for i in 0..60 {
        assert_eq!(a.label(i), b.label(i));
        let err: f64 = a
            .image(i)
            .iter()
            .zip(b.image(i))
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .sum::<f64>()
            / a.image(i).len() as f64;
        assert!(err < 6.0, "image {i}: mean abs error {err}");
    }
    // Corrupt one image's bytes: skip counts it, fail names the record.
    let rec = dir.path().join("rec/train.rec");
    let mut bytes = std::fs::read(&rec).unwrap();
    let original = bytes.clone();
    let idx = std::fs::read_to_string(rec.with_extension("idx")).unwrap();
    let off: usize = idx
        .lines()
        .nth(5)
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    for b in &mut bytes[off + 8 + 24..off + 8 + 24 + 40] {
        *b = 0;
    }
    std::fs::write(&rec, &bytes).unwrap();
    let c = import_recordio(&rec, &dir.path().join("skip"), OnError::Skip, &()).unwrap();
    assert_eq!((c.images, c.skipped), (59, 1));
    let e = import_recordio(&rec, &dir.path().join("fail"), OnError::Fail, &())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.rec") && e.contains("record key 5") && e.contains("undecodable"),
        "{e}"
    );
    assert!(!dir.path().join("fail/dataset.json").exists());
    let v = fpipe_stages::data::inspect(&dir.path().join("skip")).unwrap();
    assert_eq!(v["skipped"]["undecodable image"], 1);
    // Truncated file.
    std::fs::write(&rec, &original[..original.len() / 2]).unwrap();
    let e = import_recordio(&rec, &dir.path().join("trunc"), OnError::Fail, &())
        .unwrap_err()
        .to_string();
    assert!(e.contains("byte offset") || e.contains("disagrees"), "{e}");
}

#[test]
fn stage_kinds_are_registered_and_run_through_the_stage_trait() {
    use fpipe_engine::{Registry, StageContext};
    use std::collections::BTreeMap;
    let mut reg = Registry::with_builtins();
    fpipe_stages::register_all(&mut reg);
    for k in [
        "synthetic-faces",
        "align",
        "align-pairs",
        "recordio",
        "write-recordio",
        "verification-bin",
        "image-folder",
    ] {
        assert!(reg.get(k).is_some(), "{k} not registered");
    }
    let stage = reg.get("synthetic-faces").unwrap();
    let mut params: BTreeMap<String, serde_json::Value> = stage
        .signature()
        .params
        .iter()
        .map(|p| (p.name.to_string(), p.default.clone().unwrap()))
        .collect();
    for (k, v) in [
        ("identities", 6),
        ("images_per_identity", 3),
        ("image_size", 32),
        ("test_identities", 4),
        ("test_images_per_identity", 2),
        ("pairs", 10),
    ] {
        params.insert(k.into(), serde_json::json!(v));
    }
    assert!(stage.check_params(&params).is_ok());
    let mut bad = params.clone();
    bad.insert("label_noise".into(), serde_json::json!(1.5));
    assert!(stage
        .check_params(&bad)
        .unwrap_err()
        .contains("label_noise"));
    let dir = tempfile::tempdir().unwrap();
    let outputs: BTreeMap<String, std::path::PathBuf> = [("dataset", "d"), ("pairs", "p")]
        .iter()
        .map(|(k, v)| (k.to_string(), dir.path().join(v)))
        .collect();
    let mut ctx = StageContext::standalone(
        "synth",
        params,
        BTreeMap::new(),
        outputs,
        dir.path().join("scratch"),
    );
    stage.run(&mut ctx).unwrap();
    assert_eq!(ctx.metrics()["images"], 18.0);
    let text = fpipe_stages::data::inspect_text(&dir.path().join("p")).unwrap();
    assert!(
        text.starts_with("pairs") && text.contains("pairs: 10 (5 same identity)"),
        "{text}"
    );
}
