//! `identify`: 1:N identification of a labelled set. Its images are split into a gallery
//! (enrolled) and probes, or taken from given lists; embeddings come from a model or from an
//! `embed` output. Reports rank-1/rank-5 and the CMC curve (closed set), DIR at FPIR for
//! identities kept out of the gallery (open set) and the accuracy of face_recognition's k-NN
//! decision, using [`crate::eval::metrics::identify`](crate::eval::metrics::identify()).

use super::params::kind_params;
use crate::data::PackedDataset;
use crate::eval::metrics::{identify, split_gallery_probe, IdentifyConfig, Split, Vote};
use crate::train::artifact::load_model_for_inference;
use crate::train::embed::embed_all;
use crate::train::{FaceSource, TrainError};
use crate::util::chart::{save_chart, Line, Panel, PALETTE};
use candle_core::{DType, Device};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Rows of a packed data set, as a [`FaceSource`].
struct Subset<'a> {
    data: &'a PackedDataset,
    rows: &'a [usize],
}

impl FaceSource for Subset<'_> {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn num_classes(&self) -> usize {
        self.data.num_classes()
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        self.data.image_shape()
    }
    fn label(&self, i: usize) -> u32 {
        self.data.label(self.rows[i]).max(0) as u32
    }
    fn read_image(&self, i: usize, out: &mut [u8]) -> Result<(), TrainError> {
        Ok(self.data.read_image(self.rows[i], out)?)
    }
}

/// Reads image indices, one per line (`#` comments and blank lines ignored), from `files`.
fn read_list(files: &[String], n: usize) -> Result<Vec<usize>, TrainError> {
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).map_err(|e| TrainError::Invalid(format!("{f}: {e}")))?;
        for (ln, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let i: usize = line.parse().map_err(|_| {
                TrainError::Invalid(format!(
                    "{f}: line {}: `{line}` is not an image index",
                    ln + 1
                ))
            })?;
            if i >= n {
                return Err(TrainError::Invalid(format!(
                    "{f}: line {}: image {i} out of range ({n} images)",
                    ln + 1
                )));
            }
            out.push(i);
        }
    }
    Ok(out)
}

/// The split from `gallery_list`/`probe_list` when given, otherwise the seeded split.
fn make_split(p: &IdentifyParams, labels: &[i64]) -> Result<Split, StageError> {
    if p.gallery_list.is_empty() {
        return split_gallery_probe(
            labels,
            p.gallery_per_identity.max(1) as usize,
            p.unknown_fraction,
            p.seed as u64,
        )
        .map_err(|e| StageError::msg(e.to_string()));
    }
    let gallery = read_list(&p.gallery_list, labels.len())?;
    let probes = read_list(&p.probe_list, labels.len())?;
    // 0 unlisted, 1 gallery, 2 probe.
    let mut seen = vec![0u8; labels.len()];
    for (list, which) in [(&gallery, 1u8), (&probes, 2u8)] {
        for &i in list {
            if seen[i] != 0 {
                let both = if seen[i] != which {
                    " (in the gallery and the probe list)"
                } else {
                    ""
                };
                return Err(StageError::msg(format!("image {i} is listed twice{both}")));
            }
            seen[i] = which;
        }
    }
    let enrolled: std::collections::BTreeSet<i64> = gallery.iter().map(|&i| labels[i]).collect();
    let mut unknown: Vec<i64> = probes
        .iter()
        .map(|&i| labels[i])
        .filter(|l| !enrolled.contains(l))
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    Ok(Split {
        gallery,
        probes,
        unknown,
    })
}

/// Embeddings `[n, dim]` and labels of an `embed` output.
fn read_embeddings(dir: &Path) -> Result<(Vec<f32>, Vec<i64>, usize), TrainError> {
    let path = dir.join("embeddings.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let get = |name: &str| {
        t.get(name)
            .ok_or_else(|| TrainError::Invalid(format!("{}: no tensor `{name}`", path.display())))
    };
    let e = get("embeddings")?;
    let (n, d) = e.dims2()?;
    let emb = e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let labels = get("labels")?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if labels.len() != n {
        return Err(TrainError::Invalid(format!(
            "{}: {n} embeddings but {} labels",
            path.display(),
            labels.len()
        )));
    }
    Ok((emb, labels, d))
}

fn rows(v: &[f32], dim: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter()
        .flat_map(|&i| v[i * dim..(i + 1) * dim].iter().copied())
        .collect()
}

kind_params! {
    /// Parameters of `identify`.
    pub struct IdentifyParams {
        gallery_per_identity: i64 = Int, default 1,
            "images of each enrolled identity put in the gallery; the rest are probes";
        unknown_fraction: f64 = Float, default 0.2,
            "fraction of identities kept out of the gallery (open-set probes), in [0, 1)";
        k: i64 = Int, default 1, "neighbours that vote in the k-NN decision";
        vote: String = Enum(&["distance", "uniform"]), default "distance",
            "k-NN vote: weight 1/distance (face_recognition's example) or one vote each";
        distance_threshold: f64 = Float, default 1.0,
            "k-NN: unknown when the nearest gallery image is farther (Euclidean, unit vectors: 1.0 = cosine 0.5)";
        fpirs: Vec<f64> = List(Box::new(Float)), default [0.01, 0.1], "FPIR targets for DIR@FPIR";
        seed: i64 = Int, default 0, "seed of the gallery/probe split";
        gallery_list: Vec<String> = List(Box::new(Path { companions: &[] })), default [],
            "files of gallery image indices (one a line) instead of the seeded split; needs probe_list";
        probe_list: Vec<String> = List(Box::new(Path { companions: &[] })), default [],
            "files of probe image indices (one a line); needs gallery_list";
        batch_size: i64 = Int, default 64, volatile, "images per forward pass";
        flip: bool = Bool, default true, "flip-sum embeddings";
    }
}

/// The `identify` stage kind.
pub struct IdentifyStage;

impl Stage for IdentifyStage {
    fn kind(&self) -> &'static str {
        "identify"
    }
    /// Embedding the images uses every core.
    fn default_cpus(&self) -> usize {
        usize::MAX
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "1:N identification: rank-1/5, CMC, open-set DIR@FPIR and k-NN accuracy on a gallery/probe split"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::optional("model", "model", "the model (or give `embeddings`)"),
                PortSpec::optional("dataset", "dataset", "labelled images to split (with `model`)"),
                PortSpec::optional(
                    "pairs",
                    "pairs",
                    "or a verification set's labelled images, e.g. synthetic-faces' held-out identities (its pairs are ignored)",
                ),
                PortSpec::optional(
                    "embeddings",
                    "embeddings",
                    "embeddings and labels from `embed`, instead of model + images",
                ),
            ],
            outputs: vec![PortSpec::new(
                "report",
                "report",
                "identify.json, cmc.csv, cmc.png, predictions.csv",
            )],
            params: IdentifyParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        let p = IdentifyParams::from_params(p)?;
        if p.gallery_per_identity < 1 {
            return Err("gallery_per_identity must be at least 1".into());
        }
        if !(0.0..1.0).contains(&p.unknown_fraction) {
            return Err("unknown_fraction must lie in [0, 1)".into());
        }
        if p.k < 1 {
            return Err("k must be at least 1".into());
        }
        if p.distance_threshold.is_nan() || p.distance_threshold < 0.0 {
            return Err(
                "distance_threshold must be >= 0 (distances between unit vectors lie in [0, 2])"
                    .into(),
            );
        }
        if p.seed < 0 {
            return Err("seed must be >= 0".into());
        }
        if let Some(x) = p.fpirs.iter().find(|x| !(**x > 0.0 && **x <= 1.0)) {
            return Err(format!("fpirs: {x} is not in (0, 1]"));
        }
        if p.gallery_list.is_empty() != p.probe_list.is_empty() {
            return Err("give both gallery_list and probe_list, or neither".into());
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = IdentifyParams::from_params(&ctx.params).map_err(StageError::msg)?;
        let images = match (ctx.input_opt("dataset"), ctx.input_opt("pairs")) {
            (Some(_), Some(_)) => {
                return Err(StageError::msg(
                    "wire `dataset` or `pairs`, not both: they are the images to identify",
                ))
            }
            (a, b) => a.or(b).map(Path::to_path_buf),
        };
        let mut chart_title = String::from("precomputed embeddings");
        let (emb, labels, split, dim, source) =
            match (ctx.input_opt("embeddings"), ctx.input_opt("model"), images) {
                (Some(e), None, None) => {
                    let (emb, labels, dim) = read_embeddings(e)?;
                    let split = make_split(&p, &labels)?;
                    (emb, labels, split, dim, "embeddings")
                }
                (None, Some(m), Some(d)) => {
                    let dev = super::device(ctx)?;
                    let model = load_model_for_inference(m, &dev)?;
                    let data = PackedDataset::open(&d).map_err(TrainError::from)?;
                    let labels: Vec<i64> = (0..data.len()).map(|i| data.label(i)).collect();
                    let split = make_split(&p, &labels)?;
                    // Embed only the listed images: gallery then probes.
                    let used: Vec<usize> =
                        split.gallery.iter().chain(&split.probes).copied().collect();
                    let bs = p.batch_size.max(1) as usize;
                    let flip = p.flip;
                    let sink = &*ctx;
                    let e = embed_all(
                        &model,
                        &Subset {
                            data: &data,
                            rows: &used,
                        },
                        bs,
                        flip,
                        &dev,
                        &|d, t| sink.progress(d, t, "embedding"),
                    )?;
                    // Scatter back to data set rows so the split indices apply.
                    let dim = model.card.embedding_size;
                    let mut emb = vec![0f32; data.len() * dim];
                    for (k, &i) in used.iter().enumerate() {
                        emb[i * dim..(i + 1) * dim].copy_from_slice(&e[k * dim..(k + 1) * dim]);
                    }
                    chart_title = format!("{} on {}", model.card.name, data.display_name());
                    (emb, labels, split, dim, "model")
                }
                _ => {
                    return Err(StageError::msg(
                        "wire either `embeddings`, or `model` with `dataset` or `pairs`",
                    ))
                }
            };
        let vote = if p.vote == "uniform" {
            Vote::Uniform
        } else {
            Vote::Distance
        };
        let cfg = IdentifyConfig {
            k: p.k.max(1) as usize,
            vote,
            distance_threshold: p.distance_threshold,
            fpirs: p.fpirs.clone(),
        };
        let g_labels: Vec<i64> = split.gallery.iter().map(|&i| labels[i]).collect();
        let p_labels: Vec<i64> = split.probes.iter().map(|&i| labels[i]).collect();
        if split.probes.is_empty() {
            return Err(StageError::msg(format!(
                "no probes: every enrolled identity has at most gallery_per_identity images and unknown_fraction keeps none out ({} images)",
                labels.len()
            )));
        }
        let r = identify(
            &rows(&emb, dim, &split.gallery),
            &g_labels,
            &rows(&emb, dim, &split.probes),
            &p_labels,
            dim,
            &cfg,
        )
        .map_err(|e| StageError::msg(e.to_string()))?;
        let report = ctx.output("report")?.to_path_buf();
        let dir_json: Vec<Value> = r
            .dir
            .iter()
            .map(|p| json!({"fpir_target": p.fpir_target, "fpir": p.fpir, "dir": p.dir,
                "threshold": if p.threshold.is_finite() { json!(p.threshold) } else { Value::Null }}))
            .collect();
        let summary = json!({
            "source": source,
            "images": labels.len(),
            "gallery_images": r.gallery_images,
            "gallery_identities": r.gallery_identities,
            "mated_probes": r.mated,
            "nonmated_probes": r.nonmated,
            "unknown_identities": split.unknown,
            "rank1": r.rank1,
            "rank5": r.rank5,
            "dir_at_fpir": dir_json,
            "knn": {
                "k": cfg.k,
                "vote": p.vote,
                "distance_threshold": cfg.distance_threshold,
                "accuracy": r.knn_accuracy,
                "mated_accuracy": r.knn_mated_accuracy,
                "unknown_rejection": r.knn_unknown_rejection,
            },
            "cmc": r.cmc,
        });
        std::fs::write(
            report.join("identify.json"),
            serde_json::to_string_pretty(&summary).map_err(TrainError::from)?,
        )?;
        let mut csv = String::from("rank,identification_rate\n");
        for (i, v) in r.cmc.iter().enumerate() {
            csv.push_str(&format!("{},{v}\n", i + 1));
        }
        std::fs::write(report.join("cmc.csv"), csv)?;
        let mut csv = String::from("image,label,prediction,rank,best_score\n");
        for ((&i, &l), (p, rank, s)) in split.probes.iter().zip(&p_labels).zip(&r.predictions) {
            let p = p.map_or("unknown".to_string(), |p| p.to_string());
            let rank = rank.map_or(String::new(), |r| r.to_string());
            csv.push_str(&format!("{i},{l},{p},{rank},{s}\n"));
        }
        std::fs::write(report.join("predictions.csv"), csv)?;
        let pts: Vec<(f64, f64)> = r
            .cmc
            .iter()
            .enumerate()
            .map(|(i, v)| ((i + 1) as f64, *v))
            .collect();
        save_chart(
            &report.join("cmc.png"),
            (560, 440),
            &[Panel {
                title: format!("CMC: {chart_title}"),
                x_label: "rank".into(),
                y_label: "identification rate".into(),
                log_x: false,
                y_range: None,
                lines: vec![Line {
                    name: format!("rank-1 {:.4}, rank-5 {:.4}", r.rank1, r.rank5),
                    points: &pts,
                    color: PALETTE[0],
                }],
            }],
        )?;
        ctx.metric("rank1", r.rank1);
        ctx.metric("rank5", r.rank5);
        ctx.metric("knn_accuracy", r.knn_accuracy);
        for p in &r.dir {
            ctx.metric(&format!("dir_at_fpir_{}", p.fpir_target), p.dir);
        }
        ctx.log(&format!(
            "gallery {} images of {} identities, {} mated and {} non-mated probes: rank-1 {:.4}, rank-5 {:.4}, k-NN accuracy {:.4}",
            r.gallery_images, r.gallery_identities, r.mated, r.nonmated, r.rank1, r.rank5, r.knn_accuracy
        ));
        Ok(())
    }
}
