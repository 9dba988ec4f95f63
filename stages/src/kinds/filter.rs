//! `filter`: removes images whose embedding does not sit with the rest of its identity, by the
//! quality graph (default) or DBSCAN ([`crate::eval::filter`]), and writes the cleaned packed data set
//! and a report.
//!
//! Labels are renumbered only when an identity loses every image: the remaining identities
//! then get dense labels `0..` in their old order, `dataset.json` records the old label of each
//! new one (`filter.label_map`), class names follow, and a ground-truth `true_label` whose
//! identity was dropped is cleared. Otherwise labels are unchanged. Verification pairs with
//! both images kept are kept (re-indexed); ground-truth flags travel with their images.

use super::params::kind_params;
use crate::data::{PackedDataset, PackedWriter, DATASET};
use crate::eval::filter::{filter, precision_recall, Method, Outcome, Reason};
use crate::eval::quality::{QUALITY, SCORES};
use candle_core::{DType, Device};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Port type of `embed`'s output.
pub const EMBEDDINGS: fpipe_engine::PortType = "embeddings";
/// Quality assumed for every image when no `quality` input is wired: with the default
/// `offset` 0.1, images of one identity are joined when their cosine is at least 0.4.
pub const QUALITY_DEFAULT: f64 = 0.5;

fn err(m: impl Into<String>) -> StageError {
    StageError::msg(m.into())
}

fn load(path: &Path) -> Result<std::collections::HashMap<String, candle_core::Tensor>, StageError> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

/// Embeddings `[n, dim]` (row-major) and labels of an `embed` output.
fn read_embeddings(dir: &Path) -> Result<(Vec<f32>, Vec<i64>, usize), StageError> {
    let path = dir.join("embeddings.safetensors");
    let t = load(&path)?;
    let get = |name: &str| {
        t.get(name)
            .ok_or_else(|| err(format!("{}: no tensor `{name}`", path.display())))
    };
    let ctx = |e: candle_core::Error| err(format!("{}: {e}", path.display()));
    let e = get("embeddings")?;
    let (n, d) = e.dims2().map_err(ctx)?;
    let emb = e
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ctx)?;
    let labels = get("labels")?
        .to_dtype(DType::I64)
        .and_then(|t| t.to_vec1::<i64>())
        .map_err(ctx)?;
    if labels.len() != n {
        return Err(err(format!(
            "{}: {n} embeddings but {} labels",
            path.display(),
            labels.len()
        )));
    }
    if let Some(k) = emb.iter().position(|v| !v.is_finite()) {
        return Err(err(format!(
            "{}: embedding of image {} is not finite",
            path.display(),
            k / d.max(1)
        )));
    }
    Ok((emb, labels, d))
}

/// Quality in 0..1 per image from a `qaa` output (`scores` in 0..100).
fn read_quality(dir: &Path, n: usize) -> Result<Vec<f32>, StageError> {
    let path = dir.join(SCORES);
    let t = load(&path)?;
    let s = t
        .get("scores")
        .ok_or_else(|| err(format!("{}: no tensor `scores`", path.display())))?
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    if s.len() != n {
        return Err(err(format!(
            "{}: {} quality scores for a data set of {n} images: wire the quality of the same data set",
            path.display(),
            s.len()
        )));
    }
    if let Some(i) = s.iter().position(|v| !(0.0..=100.0).contains(v)) {
        return Err(err(format!(
            "{}: score of image {i} is {}, not in 0..100",
            path.display(),
            s[i]
        )));
    }
    Ok(s.iter().map(|v| v / 100.0).collect())
}

/// The embeddings must be of this data set, row for row.
fn check_aligned(data: &PackedDataset, labels: &[i64]) -> Result<(), StageError> {
    if labels.len() != data.len() {
        return Err(err(format!(
            "embeddings have {} rows but the data set has {} images: wire the embeddings `embed` made from this data set",
            labels.len(),
            data.len()
        )));
    }
    if let Some(i) = (0..data.len()).find(|&i| data.label(i) != labels[i]) {
        return Err(err(format!(
            "embeddings row {i} has label {} but image {i} of the data set has label {}: wire the embeddings `embed` made from this data set",
            labels[i],
            data.label(i)
        )));
    }
    Ok(())
}

fn method(p: &FilterParams) -> Method {
    match p.method.as_str() {
        "dbscan" => Method::Dbscan {
            eps: p.eps,
            min_samples: p.min_samples.max(1) as usize,
        },
        _ => Method::Graph { offset: p.offset },
    }
}

/// Writes the kept images of `data` into `out`; returns the label map (new label -> old)
/// when labels were renumbered.
fn write_dataset(
    data: &PackedDataset,
    o: &Outcome,
    out: &Path,
    provenance: Value,
    meta: Value,
) -> Result<Option<Vec<i64>>, StageError> {
    let (h, w, _) = data.image_shape();
    let emptied = o.identities.iter().any(|id| id.kept.is_none());
    // Old label -> new label, only when an identity disappears.
    let map: Option<BTreeMap<i64, i64>> = emptied.then(|| {
        o.identities
            .iter()
            .filter(|id| id.kept.is_some())
            .enumerate()
            .map(|(k, id)| (id.label, k as i64))
            .collect()
    });
    let relabel = |l: i64| map.as_ref().map_or(Some(l), |m| m.get(&l).copied());
    let mut wr = PackedWriter::create(out, h, w)?;
    let mut new_index = vec![u32::MAX; data.len()];
    for i in (0..data.len()).filter(|&i| o.removed[i].is_none()) {
        let label = relabel(data.label(i)).ok_or_else(|| {
            err(format!(
                "image {i}: kept, but its identity was dropped (bug)"
            ))
        })?;
        let mut truth = data.truth(i);
        truth.true_label = truth.true_label.and_then(relabel);
        new_index[i] = wr.len() as u32;
        wr.push(data.image(i), label, data.landmarks(i), truth)?;
    }
    if let Some(pairs) = data.pairs() {
        let kept: Vec<(u32, u32, bool)> = pairs
            .iter()
            .filter_map(|&(a, b, s)| {
                let (a, b) = (new_index[a as usize], new_index[b as usize]);
                (a != u32::MAX && b != u32::MAX).then_some((a, b, s))
            })
            .collect();
        wr.set_pairs(kept);
    }
    let src = data.metadata();
    if let Some(sk) = src.get("skipped").and_then(Value::as_object) {
        for (k, v) in sk {
            wr.add_skipped(k, v.as_u64().unwrap_or(0));
        }
    }
    for (reason, what) in [
        (Reason::Noise, "filter: in no cluster"),
        (
            Reason::SmallerCluster,
            "filter: not in its identity's largest cluster",
        ),
    ] {
        let c = o.removed.iter().filter(|r| **r == Some(reason)).count();
        if c > 0 {
            wr.add_skipped(what, c as u64);
        }
    }
    if let Some(names) = src.get("class_names").and_then(Value::as_array) {
        let names: Vec<String> = names
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        let names = match &map {
            None => names,
            Some(m) => m
                .keys()
                .map(|&old| names.get(old as usize).cloned().unwrap_or_default())
                .collect(),
        };
        wr.set_class_names(names);
    }
    if src.get("corruptions").is_some() {
        let (mut noise, mut low, mut ood) = (0usize, 0usize, 0usize);
        for i in (0..data.len()).filter(|&i| o.removed[i].is_none()) {
            let t = data.truth(i);
            noise += t.label_noise as usize;
            low += t.low_quality as usize;
            ood += t.out_of_domain as usize;
        }
        wr.set_meta(
            "corruptions",
            json!({"label_noise": noise, "low_quality": low, "out_of_domain": ood}),
        );
    }
    let label_map: Option<Vec<i64>> = map.as_ref().map(|m| m.keys().copied().collect());
    let mut meta = meta;
    meta["label_map"] = json!(label_map);
    wr.set_meta("filter", meta);
    wr.finish(provenance)?;
    Ok(label_map)
}

fn opt(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!(x))
}

kind_params! {
    /// Parameters of `filter`.
    pub struct FilterParams {
        method: String = Enum(&["graph", "dbscan"]), default "graph",
            "graph: quality graph + label propagation; dbscan: the DBSCAN baseline";
        offset: f64 = Float, default 0.1,
            "graph: images i, j are joined when cos >= min(q_i, q_j) - offset";
        eps: f64 = Float, default 0.3, "dbscan: neighbourhood radius in cosine distance 1 - cos";
        min_samples: i64 = Int, default 2,
            "dbscan: images within eps (itself included) that make a core image";
        quality_default: f64 = Float, default QUALITY_DEFAULT,
            "graph: quality (0..1) of every image when no `quality` input is wired";
    }
}

/// The `filter` stage kind.
pub struct FilterStage;

impl Stage for FilterStage {
    fn kind(&self) -> &'static str {
        "filter"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Removes images that do not cluster with their identity (quality graph + label propagation, or DBSCAN) and writes the cleaned data set"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::new("dataset", DATASET, "the labelled data set to clean"),
                PortSpec::new(
                    "embeddings",
                    EMBEDDINGS,
                    "`embed`'s embeddings of that same data set, row for row",
                ),
                PortSpec::optional(
                    "quality",
                    QUALITY,
                    "`qaa`'s quality scores (0..100) of that data set; without it every image has quality_default",
                ),
            ],
            outputs: vec![
                PortSpec::new("dataset", DATASET, "the cleaned data set"),
                PortSpec::new(
                    "report",
                    "report",
                    "filter.json (counts, clusters per identity, precision/recall vs ground truth), removed.csv",
                ),
            ],
            params: FilterParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        let p = FilterParams::from_params(p)?;
        let offset = p.offset;
        if !(-1.0..=2.0).contains(&offset) {
            return Err(format!(
                "offset must lie in [-1, 2] (it is subtracted from a quality in [0, 1] to give a cosine threshold), got {offset}"
            ));
        }
        let eps = p.eps;
        if !(eps > 0.0 && eps <= 2.0) {
            return Err(format!(
                "eps must lie in (0, 2] (a cosine distance), got {eps}"
            ));
        }
        if p.min_samples < 1 {
            return Err("min_samples must be at least 1".into());
        }
        let q = p.quality_default;
        if !(0.0..=1.0).contains(&q) {
            return Err(format!("quality_default must lie in [0, 1], got {q}"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = FilterParams::from_params(&ctx.params).map_err(StageError::msg)?;
        let data = PackedDataset::open(ctx.input("dataset")?)?;
        let (emb, labels, dim) = read_embeddings(ctx.input("embeddings")?)?;
        check_aligned(&data, &labels)?;
        let quality = match ctx.input_opt("quality") {
            Some(dir) => read_quality(dir, data.len())?,
            None => vec![p.quality_default as f32; data.len()],
        };
        let m = method(&p);
        // Identities are clustered in parallel, on the cores the engine granted.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(ctx.threads.max(1))
            .build()
            .map_err(|e| err(e.to_string()))?;
        let o = pool
            .install(|| filter(&emb, dim, &labels, &quality, m))
            .map_err(|e| err(e.to_string()))?;
        let kept = o.kept();
        let removed = data.len() - kept;
        let has_truth = data.metadata().get("corruptions").is_some();
        let truth: Vec<_> = (0..data.len()).map(|i| data.truth(i)).collect();
        let noisy: Vec<bool> = truth.iter().map(|t| t.label_noise).collect();
        let (precision, recall) = if has_truth {
            precision_recall(&o.removed, &noisy)
        } else {
            (None, None)
        };
        let params = json!({
            "method": p.method,
            "offset": p.offset,
            "eps": p.eps,
            "min_samples": p.min_samples,
            "quality": if ctx.input_opt("quality").is_some() { json!("input") } else { json!(p.quality_default) },
        });
        let count = |r: Reason| o.removed.iter().filter(|x| **x == Some(r)).count();
        let emptied = o.identities.iter().filter(|id| id.kept.is_none()).count();
        let meta = json!({"params": params, "images_before": data.len(), "kept": kept, "removed": removed});
        let provenance = json!({
            "stage": "filter",
            "params": params,
            "source": data.metadata().get("provenance").cloned().unwrap_or(Value::Null),
        });
        let label_map = write_dataset(&data, &o, ctx.output("dataset")?, provenance, meta)?;

        let per_identity: Vec<Value> = o
            .identities
            .iter()
            .map(|id| {
                let kept = id.kept.map_or(0, |k| id.sizes[k as usize]);
                json!({
                    "label": id.label,
                    "images": id.images.len(),
                    "cluster_sizes": id.sizes,
                    "noise": id.clusters.iter().filter(|&&c| c < 0).count(),
                    "kept_cluster": id.kept,
                    "kept": kept,
                })
            })
            .collect();
        let mut by_truth = BTreeMap::from([
            ("label_noise", 0usize),
            ("low_quality", 0),
            ("out_of_domain", 0),
            ("clean", 0),
        ]);
        for (i, t) in truth.iter().enumerate() {
            if o.removed[i].is_none() {
                continue;
            }
            let k = if t.label_noise {
                "label_noise"
            } else if t.low_quality {
                "low_quality"
            } else if t.out_of_domain {
                "out_of_domain"
            } else {
                "clean"
            };
            *by_truth.entry(k).or_default() += 1;
        }
        let ground_truth = if has_truth {
            json!({
                "label_noise": noisy.iter().filter(|&&b| b).count(),
                "precision": opt(precision),
                "recall": opt(recall),
                "removed_by_truth": by_truth,
            })
        } else {
            Value::Null
        };
        let summary = json!({
            "params": params,
            "images": data.len(),
            "identities": o.identities.len(),
            "kept": kept,
            "removed": removed,
            "removed_noise": count(Reason::Noise),
            "removed_smaller_cluster": count(Reason::SmallerCluster),
            "identities_emptied": emptied,
            "label_map": label_map,
            "ground_truth": ground_truth,
            "per_identity": per_identity,
        });
        let report = ctx.output("report")?.to_path_buf();
        let text = serde_json::to_string_pretty(&summary).map_err(|e| err(e.to_string()))?;
        std::fs::write(report.join("filter.json"), text)?;
        let mut csv = String::from(if has_truth {
            "image,label,reason,label_noise\n"
        } else {
            "image,label,reason\n"
        });
        for (i, r) in o.removed.iter().enumerate() {
            if let Some(r) = r {
                csv.push_str(&format!("{i},{},{}", labels[i], r.as_str()));
                if has_truth {
                    csv.push_str(&format!(",{}", u8::from(noisy[i])));
                }
                csv.push('\n');
            }
        }
        std::fs::write(report.join("removed.csv"), csv)?;
        ctx.metric("removed", removed as f64);
        ctx.metric("kept", kept as f64);
        if let Some(p) = precision {
            ctx.metric("precision", p);
        }
        if let Some(r) = recall {
            ctx.metric("recall", r);
        }
        ctx.log(&format!(
            "{}: kept {kept} of {} images, removed {removed} ({} in no cluster, {} outside the largest), {emptied} identities emptied{}",
            p.method,
            data.len(),
            count(Reason::Noise),
            count(Reason::SmallerCluster),
            match (precision, recall) {
                (Some(p), Some(r)) => format!("; vs label noise: precision {p:.3}, recall {r:.3}"),
                _ => String::new(),
            }
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageTruth;
    use candle_core::Tensor;

    fn save(path: &Path, name: &str, t: Tensor) {
        let mut m = std::collections::HashMap::new();
        m.insert(name.to_string(), t);
        candle_core::safetensors::save(&m, path).unwrap();
    }

    #[test]
    fn quality_scores_are_read_checked_and_scaled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quality.safetensors");
        save(
            &path,
            "scores",
            Tensor::new(&[0f32, 50.0, 100.0], &Device::Cpu).unwrap(),
        );
        assert_eq!(read_quality(dir.path(), 3).unwrap(), vec![0.0, 0.5, 1.0]);
        let e = read_quality(dir.path(), 4).unwrap_err().to_string();
        assert!(
            e.contains("3 quality scores for a data set of 4 images"),
            "{e}"
        );
        save(
            &path,
            "scores",
            Tensor::new(&[10f32, 101.0], &Device::Cpu).unwrap(),
        );
        let e = read_quality(dir.path(), 2).unwrap_err().to_string();
        assert!(e.contains("score of image 1 is 101"), "{e}");
        save(&path, "other", Tensor::new(&[10f32], &Device::Cpu).unwrap());
        let e = read_quality(dir.path(), 1).unwrap_err().to_string();
        assert!(e.contains("no tensor `scores`"), "{e}");
    }

    #[test]
    fn embeddings_must_match_the_data_set_row_for_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackedWriter::create(dir.path(), 2, 2).unwrap();
        for l in [0, 0, 1] {
            w.push(&[0u8; 12], l, None, ImageTruth::default()).unwrap();
        }
        w.finish(json!({})).unwrap();
        let d = PackedDataset::open(dir.path()).unwrap();
        assert!(check_aligned(&d, &[0, 0, 1]).is_ok());
        let e = check_aligned(&d, &[0, 1, 1]).unwrap_err().to_string();
        assert!(
            e.contains("embeddings row 1 has label 1 but image 1 of the data set has label 0"),
            "{e}"
        );
        let e = check_aligned(&d, &[0, 0]).unwrap_err().to_string();
        assert!(
            e.contains("embeddings have 2 rows but the data set has 3 images"),
            "{e}"
        );
    }

    #[test]
    fn an_emptied_identity_renumbers_labels_names_truth_and_pairs() {
        let src = tempfile::tempdir().unwrap();
        let mut w = PackedWriter::create(src.path(), 1, 1).unwrap();
        // Labels 0 0 1 1 2 2; image 5 shows identity 0 (label noise), image 4 shows 1.
        for (i, l) in [0i64, 0, 1, 1, 2, 2].into_iter().enumerate() {
            let truth = ImageTruth {
                true_label: Some(match i {
                    5 => 0,
                    4 => 1,
                    _ => l,
                }),
                label_noise: i >= 4,
                ..ImageTruth::default()
            };
            w.push(&[i as u8; 3], l, None, truth).unwrap();
        }
        w.set_pairs(vec![(0, 4, false), (1, 5, false), (4, 5, true)]);
        w.set_class_names(vec!["a".into(), "b".into(), "c".into()]);
        w.set_meta("corruptions", json!({"label_noise": 2}));
        w.finish(json!({})).unwrap();
        let d = PackedDataset::open(src.path()).unwrap();
        let labels: Vec<i64> = (0..6).map(|i| d.label(i)).collect();
        // Identity 1 is all noise: removed, and 2 becomes 1.
        let emb = [1f32, 0.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let o = filter(&emb, 2, &labels, &[0.9; 6], Method::Graph { offset: 0.1 }).unwrap();
        assert_eq!(o.kept(), 4);
        let out = tempfile::tempdir().unwrap();
        let map = write_dataset(&d, &o, out.path(), json!({}), json!({})).unwrap();
        assert_eq!(map, Some(vec![0, 2]));
        let c = PackedDataset::open(out.path()).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(
            (0..4).map(|i| c.label(i)).collect::<Vec<_>>(),
            vec![0, 0, 1, 1]
        );
        assert_eq!(c.image(3), &[5u8; 3]);
        // Image 5 showed identity 0 (still 0); image 4 showed 1, which is gone.
        assert_eq!(c.truth(3).true_label, Some(0));
        assert_eq!(c.truth(2).true_label, None);
        assert_eq!(
            c.pairs(),
            Some(&[(0, 2, false), (1, 3, false), (2, 3, true)][..])
        );
        assert_eq!(c.metadata()["class_names"], json!(["a", "c"]));
        assert_eq!(c.metadata()["corruptions"]["label_noise"], 2);
        assert_eq!(c.metadata()["filter"]["label_map"], json!([0, 2]));
        assert_eq!(c.metadata()["skipped"]["filter: in no cluster"], 2);
    }
}
