//! `filter` through the `fpipe` binary: synthetic-faces with label noise, a tiny model
//! trained in the test, `embed`, then `filter` with the quality graph and with DBSCAN. The
//! cleaned data sets open and hold exactly the kept images; a rerun executes nothing; a
//! mismatched embeddings/data set pair and bad parameters fail with clear messages.
#![cfg(feature = "faces")]

mod common;
use common::Project;
use fpipe_stages::data::PackedDataset;
use serde_json::Value;
use std::path::PathBuf;

const PIPELINE: &str = r#"stages:
  faces:
    uses: synthetic-faces
    with: {identities: 20, images_per_identity: 8, image_size: 32, label_noise: 0.1, test_identities: 2, test_images_per_identity: 2, pairs: 2}
  train:
    uses: train
    inputs: {dataset: faces.dataset}
    with: {backbone: mobilefacenet, width: 0.125, input_size: 32, embedding_size: 16, epochs: 3, batch_size: 16}
  emb:
    uses: embed
    inputs: {model: train.model, dataset: faces.dataset}
  graph:
    uses: filter
    inputs: {dataset: faces.dataset, embeddings: emb.embeddings}
  dbscan:
    uses: filter
    inputs: {dataset: faces.dataset, embeddings: emb.embeddings}
    with: {method: dbscan, eps: 0.3, min_samples: 2}
  qaa:
    uses: qaa
    inputs: {model: train.model, dataset: faces.dataset}
    with: {iterations: 20, depth: 3}
  graph_q:
    uses: filter
    inputs: {dataset: faces.dataset, embeddings: emb.embeddings, quality: qaa.quality}
"#;

fn out(p: &Project, port: &str, file: &str) -> PathBuf {
    let r = p.fpipe(&["out", port, "-f", file]).ok();
    PathBuf::from(r.stdout.trim())
}

#[test]
fn filter_cleans_the_data_set_and_reruns_nothing() {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    assert_eq!(p.fpipe(&["run", "p.yaml"]).ok().counts(), (7, 0, 0));
    let source = PackedDataset::open(&out(&p, "faces.dataset", "p.yaml")).unwrap();
    assert_eq!(source.len(), 160);
    let mut removed_total = 0;
    for stage in ["graph", "dbscan", "graph_q"] {
        let rep = out(&p, &format!("{stage}.report"), "p.yaml");
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(rep.join("filter.json")).unwrap())
                .unwrap();
        let kept = r["kept"].as_u64().unwrap() as usize;
        let removed = r["removed"].as_u64().unwrap() as usize;
        assert_eq!(kept + removed, 160, "{stage}");
        // A model trained for 3 epochs on 160 images embeds loosely, so removals happen (the
        // precision/recall printed below are a tiny model's, not the methods'); which method
        // removes how many depends on the model's numerics, so only the total is asserted.
        removed_total += removed;
        assert_eq!(r["params"]["method"], stage.trim_end_matches("_q"));
        // With `qaa`'s scores the edge bar follows each image's quality.
        let q = if stage == "graph_q" {
            "input".into()
        } else {
            serde_json::json!(0.5)
        };
        assert_eq!(r["params"]["quality"], q, "{stage}");
        assert_eq!(r["ground_truth"]["label_noise"], 16, "{stage}");
        assert_eq!(r["per_identity"].as_array().unwrap().len(), 20);
        let per_kept: u64 = r["per_identity"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["kept"].as_u64().unwrap())
            .sum();
        assert_eq!(per_kept as usize, kept, "{stage}");
        // removed.csv: one line per removed image, with its label and ground-truth flag.
        let csv = std::fs::read_to_string(rep.join("removed.csv")).unwrap();
        assert_eq!(csv.lines().next(), Some("image,label,reason,label_noise"));
        let rows: Vec<Vec<&str>> = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        assert_eq!(rows.len(), removed, "{stage}");
        let mut removed_idx = std::collections::BTreeSet::new();
        let mut hits = 0;
        for f in &rows {
            let i: usize = f[0].parse().unwrap();
            assert_eq!(f[1].parse::<i64>().unwrap(), source.label(i));
            assert!(matches!(f[2], "noise" | "smaller_cluster"), "{f:?}");
            assert_eq!(f[3] == "1", source.truth(i).label_noise);
            hits += usize::from(f[3] == "1");
            removed_idx.insert(i);
        }
        if removed > 0 {
            let prec = r["ground_truth"]["precision"].as_f64().unwrap();
            assert!(
                (prec - hits as f64 / removed as f64).abs() < 1e-12,
                "{stage}"
            );
        }
        let recall = r["ground_truth"]["recall"].as_f64().unwrap();
        assert!((recall - hits as f64 / 16.0).abs() < 1e-12, "{stage}");

        // The cleaned data set: the kept images, in order, with their records.
        let clean = PackedDataset::open(&out(&p, &format!("{stage}.dataset"), "p.yaml")).unwrap();
        assert_eq!(clean.len(), kept, "{stage}");
        let kept_idx: Vec<usize> = (0..160).filter(|i| !removed_idx.contains(i)).collect();
        let map: Option<Vec<i64>> = serde_json::from_value(r["label_map"].clone()).unwrap();
        for (k, &i) in kept_idx.iter().enumerate() {
            assert_eq!(clean.image(k), source.image(i));
            assert_eq!(clean.landmarks(k), source.landmarks(i));
            assert_eq!(clean.truth(k).label_noise, source.truth(i).label_noise);
            let old = match &map {
                Some(m) => m[clean.label(k) as usize],
                None => clean.label(k),
            };
            assert_eq!(old, source.label(i));
        }
        let noise_left = kept_idx
            .iter()
            .filter(|&&i| source.truth(i).label_noise)
            .count();
        assert_eq!(
            clean.metadata()["corruptions"]["label_noise"],
            noise_left,
            "{stage}"
        );
        assert_eq!(clean.metadata()["filter"]["kept"], kept);
        println!(
            "{stage}: kept {kept}, removed {removed}, precision {}, recall {recall}",
            r["ground_truth"]["precision"]
        );
    }
    assert!(removed_total > 0, "some method removes images");

    // Metrics reach `fpipe show`.
    let show = p.fpipe(&["show", "p.yaml", "--json"]).ok();
    let v: Value = serde_json::from_str(&show.stdout).unwrap();
    for stage in ["graph", "dbscan"] {
        let row = v
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["stage"] == stage)
            .unwrap_or_else(|| panic!("no {stage} row: {}", show.stdout));
        for k in ["removed", "kept", "recall"] {
            assert!(row["metrics"].get(k).is_some(), "{k} in {row}");
        }
    }

    // Nothing changed: nothing runs.
    assert_eq!(p.fpipe(&["run", "p.yaml"]).ok().counts(), (0, 7, 0));

    // Embeddings of another data set: a clear error naming both sizes.
    p.write(
        "bad.yaml",
        &format!(
            "{PIPELINE}  other:\n    uses: synthetic-faces\n    with: {{identities: 10, images_per_identity: 8, image_size: 32, test_identities: 2, test_images_per_identity: 2, pairs: 2}}\n  emb_other:\n    uses: embed\n    inputs: {{model: train.model, dataset: other.dataset}}\n  mixed:\n    uses: filter\n    inputs: {{dataset: faces.dataset, embeddings: emb_other.embeddings}}\n"
        ),
    );
    let r = p.fpipe(&["run", "bad.yaml"]);
    assert_ne!(r.code, 0);
    assert!(
        r.all()
            .contains("embeddings have 80 rows but the data set has 160 images"),
        "{}",
        r.all()
    );
}

#[test]
fn bad_filter_params_are_rejected_at_plan_time() {
    let p = Project::new();
    let cases = [
        ("eps: 0.0", "eps must lie in (0, 2]"),
        ("min_samples: 0", "min_samples must be at least 1"),
        ("quality_default: 1.5", "quality_default must lie in [0, 1]"),
        ("offset: 3.0", "offset must lie in [-1, 2]"),
        ("method: kmeans", "method"),
    ];
    for (with, msg) in cases {
        p.write(
            "b.yaml",
            &format!("stages:\n  faces:\n    uses: synthetic-faces\n  train:\n    uses: train\n    inputs: {{dataset: faces.dataset}}\n  emb:\n    uses: embed\n    inputs: {{model: train.model, dataset: faces.dataset}}\n  f:\n    uses: filter\n    inputs: {{dataset: faces.dataset, embeddings: emb.embeddings}}\n    with: {{{with}}}\n"),
        );
        let r = p.fpipe(&["run", "b.yaml"]);
        assert_eq!(r.code, 2, "{with}: {}", r.all());
        assert!(r.stderr.contains(msg), "{with}: {}", r.stderr);
    }
}
