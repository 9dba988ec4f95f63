//! The `identify` stage through the `fpipe` binary: a tiny model trained in the test,
//! identification of synthetic-faces' held-out identities (open set), and the same split
//! given as lists, from a model and from `embed`'s embeddings, giving the same numbers.
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
