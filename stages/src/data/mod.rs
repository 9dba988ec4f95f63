//! Layer 2: face data. The packed data set every stage reads and what produces it (synthetic
//! faces, image folders, insightface RecordIO and pickled verification `.bin`, alignment to
//! the 5-point template), and `inspect` for `fpipe inspect`.

pub mod align;
pub mod folder;
pub mod packed;
pub mod pairs;
pub mod pickle;
pub mod recordio;
pub mod synth;
pub mod vbin;

pub use packed::{DataError, ImageTruth, PackedDataset, PackedWriter};

/// Port type of a training data set (what `fpipe stages` shows for such ports).
pub const DATASET: &str = "dataset";
/// Port type of a verification set: a packed data set with pairs.
pub const PAIRS: &str = "pairs";

use serde_json::{json, Value};
use std::path::Path;

/// Summary of the packed data set in `dir` for `fpipe inspect --json`: images, identities,
/// image size, images per identity (min / median / mean / max), pairs, ground-truth counts,
/// skipped inputs with reasons, provenance.
pub fn inspect(dir: &Path) -> Result<Value, DataError> {
    let d = PackedDataset::open(dir)?;
    let counts = d.class_counts();
    let mut nonzero: Vec<usize> = counts.iter().copied().filter(|&c| c > 0).collect();
    nonzero.sort_unstable();
    let per_identity = if nonzero.is_empty() {
        json!(null)
    } else {
        json!({
            "min": nonzero[0],
            "median": nonzero[nonzero.len() / 2],
            "mean": d.len() as f64 / nonzero.len() as f64,
            "max": nonzero[nonzero.len() - 1],
        })
    };
    let (mut noise, mut low, mut ood, mut lms) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..d.len() {
        let t = d.truth(i);
        noise += t.label_noise as u64;
        low += t.low_quality as u64;
        ood += t.out_of_domain as u64;
        lms += d.landmarks(i).is_some() as u64;
    }
    let (h, w, c) = d.image_shape();
    let meta = d.metadata();
    let mut out = json!({
        "kind": if d.pairs().is_some() { PAIRS } else { DATASET },
        "images": d.len(),
        "identities": nonzero.len(),
        "num_classes": d.num_classes(),
        "image_size": [h, w, c],
        "images_per_identity": per_identity,
        "with_landmarks": lms,
        "ground_truth": {"label_noise": noise, "low_quality": low, "out_of_domain": ood},
        "skipped": meta.get("skipped").cloned().unwrap_or(json!({})),
    });
    if let Some(p) = d.pairs() {
        out["pairs"] = json!({"total": p.len(), "same": p.iter().filter(|x| x.2).count()});
    }
    out["provenance"] = meta.get("provenance").cloned().unwrap_or(Value::Null);
    Ok(out)
}

/// The same summary as [`inspect`], as a few human-readable lines.
pub fn inspect_text(dir: &Path) -> Result<String, DataError> {
    let v = inspect(dir)?;
    let mut s = String::new();
    let size = &v["image_size"];
    s.push_str(&format!(
        "{} `{}`: {} images, {} identities, {}x{}x{}\n",
        v["kind"].as_str().unwrap_or("dataset"),
        dir.display(),
        v["images"],
        v["identities"],
        size[0],
        size[1],
        size[2]
    ));
    let p = &v["images_per_identity"];
    if !p.is_null() {
        s.push_str(&format!(
            "images per identity: min {} median {} mean {:.1} max {}\n",
            p["min"],
            p["median"],
            p["mean"].as_f64().unwrap_or(0.0),
            p["max"]
        ));
    }
    s.push_str(&format!("with landmarks: {}\n", v["with_landmarks"]));
    let g = &v["ground_truth"];
    if g["label_noise"] != 0 || g["low_quality"] != 0 || g["out_of_domain"] != 0 {
        s.push_str(&format!(
            "ground truth: {} label noise, {} low quality, {} out of domain\n",
            g["label_noise"], g["low_quality"], g["out_of_domain"]
        ));
    }
    if let Some(pairs) = v.get("pairs") {
        s.push_str(&format!(
            "pairs: {} ({} same identity)\n",
            pairs["total"], pairs["same"]
        ));
    }
    match v["skipped"].as_object() {
        Some(m) if !m.is_empty() => {
            s.push_str("skipped inputs:\n");
            for (reason, n) in m {
                s.push_str(&format!("  {n} {reason}\n"));
            }
        }
        _ => s.push_str("skipped inputs: none\n"),
    }
    Ok(s)
}
