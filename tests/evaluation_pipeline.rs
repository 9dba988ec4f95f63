//! Evaluation stages through the `fpipe` binary on a tiny model trained in the test:
//! `identify` on synthetic-faces' held-out identities (open set) and on a split given as
//! lists, from a model and from `embed`'s embeddings (same numbers); `evaluate` on an IJB
//! protocol whose files and loose crops the test writes.
#![cfg(feature = "faces")]

mod common;
use common::Project;
use serde_json::Value;

const PIPELINE: &str = r#"stages:
  faces:
    uses: synthetic-faces
    with: {identities: 20, images_per_identity: 5, image_size: 32, test_identities: 10, test_images_per_identity: 4, pairs: 20}
  train:
    uses: train
    inputs: {dataset: faces.dataset}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 16, epochs: 1, batch_size: 16}
  heldout:
    uses: identify
    inputs: {model: train.model, pairs: faces.pairs}
    with: {gallery_per_identity: 1, unknown_fraction: 0.3, k: 3, vote: uniform}
  emb:
    uses: embed
    inputs: {model: train.model, dataset: faces.dataset}
  listed_model:
    uses: identify
    inputs: {model: train.model, dataset: faces.dataset}
    with: {gallery_list: [gallery.txt], probe_list: [probes.txt], k: 2}
  listed_emb:
    uses: identify
    inputs: {embeddings: emb.embeddings}
    with: {gallery_list: [gallery.txt], probe_list: [probes.txt], k: 2}
"#;

fn report(p: &Project, stage: &str) -> Value {
    let out = p
        .fpipe(&["out", &format!("{stage}.report"), "-f", "p.yaml"])
        .ok();
    let dir = std::path::PathBuf::from(out.stdout.trim());
    serde_json::from_str(&std::fs::read_to_string(dir.join("identify.json")).unwrap()).unwrap()
}

#[test]
fn identify_runs_open_set_and_from_lists() {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    // Training set: identity i holds images 5i..5i+5. Enrol the first image of identities
    // 0..15; probe with the other images of 0..15 (mated) and all of 15..20 (non-mated).
    let gallery: String = (0..15).map(|i| format!("{}\n", 5 * i)).collect();
    let probes: String = (0..100)
        .filter(|i| !(i % 5 == 0 && *i < 75))
        .map(|i| format!("{i}\n"))
        .collect();
    p.write("gallery.txt", &format!("# first image of 0..15\n{gallery}"));
    p.write("probes.txt", &probes);
    assert_eq!(p.fpipe(&["run", "p.yaml"]).ok().counts(), (6, 0, 0));

    // Held-out identities: 10 x 4 images, 3 identities kept out.
    let h = report(&p, "heldout");
    assert_eq!(h["source"], "model");
    assert_eq!(h["gallery_images"], 7);
    assert_eq!(h["gallery_identities"], 7);
    assert_eq!(h["mated_probes"], 21);
    assert_eq!(h["nonmated_probes"], 12);
    assert_eq!(h["unknown_identities"].as_array().unwrap().len(), 3);
    assert_eq!(h["cmc"].as_array().unwrap().len(), 7);
    assert_eq!(h["cmc"][6], 1.0);
    let dir = h["dir_at_fpir"].as_array().unwrap();
    assert_eq!(dir.len(), 2);
    for d in dir {
        assert!(d["fpir"].as_f64().unwrap() <= d["fpir_target"].as_f64().unwrap());
        assert!(d["dir"].as_f64().unwrap() <= h["rank1"].as_f64().unwrap());
    }

    let m = report(&p, "listed_model");
    let e = report(&p, "listed_emb");
    assert_eq!(m["gallery_images"], 15);
    assert_eq!(
        (m["mated_probes"].clone(), m["nonmated_probes"].clone()),
        (60.into(), 25.into())
    );
    assert_eq!(
        m["unknown_identities"],
        serde_json::json!([15, 16, 17, 18, 19])
    );
    for key in ["rank1", "rank5", "cmc", "dir_at_fpir", "knn"] {
        assert_eq!(m[key], e[key], "{key}: model and embeddings paths agree");
    }

    // Metrics reach `fpipe show`.
    let show = p.fpipe(&["show", "p.yaml", "--json"]).ok();
    let v: Value = serde_json::from_str(&show.stdout).unwrap();
    let row = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == "heldout")
        .unwrap_or_else(|| panic!("no heldout row: {}", show.stdout));
    for k in [
        "rank1",
        "rank5",
        "knn_accuracy",
        "dir_at_fpir_0.01",
        "dir_at_fpir_0.1",
    ] {
        assert!(row["metrics"].get(k).is_some(), "{k} in {row}");
    }
    assert_eq!(row["metrics"]["rank1"], h["rank1"]);

    // A CMC PNG and CSV, and one prediction per probe.
    let out = p.fpipe(&["out", "heldout.report", "-f", "p.yaml"]).ok();
    let dir = std::path::PathBuf::from(out.stdout.trim());
    let png = std::fs::read(dir.join("cmc.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let csv = std::fs::read_to_string(dir.join("cmc.csv")).unwrap();
    assert_eq!(csv.lines().count(), 8);
    let pred = std::fs::read_to_string(dir.join("predictions.csv")).unwrap();
    assert_eq!(pred.lines().count(), 34);
}

#[test]
fn bad_identify_params_are_rejected_at_plan_time() {
    let p = Project::new();
    let cases = [
        (
            "unknown_fraction: 1.0",
            "unknown_fraction must lie in [0, 1)",
        ),
        ("k: 0", "k must be at least 1"),
        ("fpirs: [0.0]", "fpirs: 0 is not in (0, 1]"),
        (
            "gallery_list: [g.txt]",
            "give both gallery_list and probe_list",
        ),
    ];
    p.write("g.txt", "0\n");
    for (with, msg) in cases {
        p.write(
            "b.yaml",
            &format!("stages:\n  faces:\n    uses: synthetic-faces\n  i:\n    uses: identify\n    inputs: {{pairs: faces.pairs}}\n    with: {{{with}}}\n"),
        );
        let r = p.fpipe(&["run", "b.yaml"]);
        assert_eq!(r.code, 2, "{with}: {}", r.all());
        assert!(r.stderr.contains(msg), "{with}: {}", r.stderr);
    }
}

const IJB: &str = r#"stages:
  faces:
    uses: synthetic-faces
    with: {identities: 20, images_per_identity: 5, image_size: 32, test_identities: 10, test_images_per_identity: 4, pairs: 20}
  train:
    uses: train
    inputs: {dataset: faces.dataset}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 16, epochs: 1, batch_size: 16}
"#;

#[test]
fn evaluate_runs_the_ijb_template_protocol() {
    use fpipe_stages::data::PackedDataset;
    use fpipe_stages::util::chart::save_rgb_png;
    let p = Project::new();
    p.write("ijb.yaml", IJB);
    assert_eq!(p.fpipe(&["run", "ijb.yaml"]).ok().counts(), (2, 0, 0));
    // Loose crops: the held-out images padded by 8 pixels, landmarks shifted to match.
    let out = p.fpipe(&["out", "faces.pairs", "-f", "ijb.yaml"]).ok();
    let data = PackedDataset::open(std::path::Path::new(out.stdout.trim())).unwrap();
    assert_eq!(data.len(), 40);
    std::fs::create_dir_all(p.path().join("ijb/loose_crop")).unwrap();
    let mut lmk_lines = Vec::new();
    for i in 0..data.len() {
        let mut px = vec![0u8; 48 * 48 * 3];
        let img = data.image(i);
        for y in 0..32 {
            px[((y + 8) * 48 + 8) * 3..((y + 8) * 48 + 40) * 3]
                .copy_from_slice(&img[y * 32 * 3..(y + 1) * 32 * 3]);
        }
        save_rgb_png(
            &p.path().join(format!("ijb/loose_crop/{i}.png")),
            48,
            48,
            &px,
        )
        .unwrap();
        let lm = data.landmarks(i).unwrap();
        let xy: Vec<String> = lm
            .iter()
            .flatten()
            .map(|v| format!("{}", v + 8.0))
            .collect();
        lmk_lines.push(format!(
            "{i}.png {} {}",
            xy.join(" "),
            0.5 + 0.01 * i as f32
        ));
    }
    // Per identity k (images 4k..4k+4): template 3k+1 = images 4k, 4k+1 in two media;
    // 3k+2 = images 4k+2, 4k+3 in one media; 3k+3 = a copy of template 3k+1.
    let (mut tid, mut lmk) = (String::new(), String::new());
    for k in 0..10 {
        let rows = [
            (4 * k, 3 * k + 1, 1000 + 4 * k),
            (4 * k + 1, 3 * k + 1, 1001 + 4 * k),
            (4 * k + 2, 3 * k + 2, 2000 + k),
            (4 * k + 3, 3 * k + 2, 2000 + k),
            (4 * k, 3 * k + 3, 1000 + 4 * k),
            (4 * k + 1, 3 * k + 3, 1001 + 4 * k),
        ];
        for (img, t, m) in rows {
            tid.push_str(&format!("{img}.png {t} {m}\n"));
            lmk.push_str(&lmk_lines[img]);
            lmk.push('\n');
        }
    }
    let mut pairs = String::new();
    for a in 1..=30 {
        for b in a + 1..=30 {
            pairs.push_str(&format!(
                "{a} {b} {}\n",
                u8::from((a - 1) / 3 == (b - 1) / 3)
            ));
        }
    }
    p.write("ijb/meta/tiny_face_tid_mid.txt", &tid);
    p.write("ijb/meta/tiny_name_5pts_score.txt", &lmk);
    p.write("ijb/meta/tiny_template_pair_label.txt", &pairs);
    p.write(
        "ijb.yaml",
        &format!("{IJB}  ijbc:\n    uses: evaluate\n    inputs: {{model: train.model}}\n    with: {{ijb: [ijb]}}\n"),
    );
    assert_eq!(p.fpipe(&["run", "ijb.yaml"]).ok().counts(), (1, 2, 0));
    let out = p.fpipe(&["out", "ijbc.metrics", "-f", "ijb.yaml"]).ok();
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(out.stdout.trim()).join("metrics.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m["protocol"], "ijb");
    assert_eq!(
        (
            m["images"].clone(),
            m["templates"].clone(),
            m["pairs"].clone()
        ),
        (60.into(), 30.into(), 435.into())
    );
    for f in ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"] {
        let t = m[format!("tpr@fpr={f}")].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&t), "{f}: {t}");
    }
    let out = p.fpipe(&["out", "ijbc.report", "-f", "ijb.yaml"]).ok();
    let scores =
        std::fs::read_to_string(std::path::Path::new(out.stdout.trim()).join("scores.csv"))
            .unwrap();
    assert_eq!(scores.lines().count(), 436);
    for line in scores.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (a, b): (u32, u32) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let s: f32 = f[3].parse().unwrap();
        assert!((-1.0001..=1.0001).contains(&s), "{line}");
        // A template and its copy: the same pooled feature.
        if a % 3 == 1 && b == a + 2 {
            assert!((s - 1.0).abs() < 1e-5, "{line}");
            assert_eq!(f[2], "1");
        }
    }
    // `evaluate` needs pairs or an IJB folder.
    p.write(
        "none.yaml",
        &format!("{IJB}  e:\n    uses: evaluate\n    inputs: {{model: train.model}}\n"),
    );
    let r = p.fpipe(&["run", "none.yaml"]);
    assert_ne!(r.code, 0);
    assert!(
        r.all()
            .contains("wire a `pairs` input (verification set) or give the `ijb` parameter"),
        "{}",
        r.all()
    );
}
