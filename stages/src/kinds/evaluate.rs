//! `evaluate`: verification of a model on the pairs of a packed verification set (held-out
//! identities, or a converted `.bin` set): 10-fold accuracy ± std on squared distances of
//! flip-sum embeddings (insightface protocol), ROC on cosine scores with TPR@FPR, AUC and EER,
//! using [`crate::eval::metrics`]. With the `ijb` parameter, IJB-B/C 1:1 template verification
//! instead ([`crate::eval::ijb`]).
//!
//! With a `quality` input (one score per image of the pairs set) it also writes the
//! error-versus-reject curve (pair quality = the lower of the two images' scores; FNMR at FMR
//! 1e-2, 1e-3, 1e-4 with the threshold recomputed after each rejection, see
//! [`crate::eval::metrics::error_vs_reject`]), and `drop_lowest` discards that fraction of the
//! lowest-quality pairs before every other metric, with the table of both in
//! `drop_lowest.csv`.

use super::params::kind_params;
use crate::data::PackedDataset;
use crate::eval::ijb::{ijb_features, ijb_verify, read_protocol};
use crate::eval::metrics::{error_vs_reject, pair_distances, IJB_FPRS};
use crate::eval::verify::{erc_rejects, kept_indices, pair_quality, verify, EvalResult, ERC_FMRS};
use crate::train::artifact::load_model_for_inference;
use crate::train::embed::embed_all;
use crate::train::TrainError;
use crate::util::chart::{save_chart, Line, Panel, PALETTE};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

kind_params! {
    /// Parameters of `evaluate`.
    pub struct EvaluateParams {
        batch_size: i64 = Int, default 64, volatile, "images per forward pass";
        flip: bool = Bool, default true, "flip-sum embeddings";
        fprs: Vec<f64> = List(Box::new(Float)), default [1e-4, 1e-3, 1e-2, 1e-1],
            "FPR targets for TPR@FPR (IJB: always 1e-6 ... 1e-1)";
        ijb: Vec<String> = List(Box::new(Path { companions: &[] })), default [],
            "IJB-B/C folder (meta/*_face_tid_mid.txt, *_template_pair_label.txt, *_name_5pts_score.txt, loose_crop/): template verification instead of `pairs`";
        drop_lowest: f64 = Float, default 0.0,
            "discard this fraction of pairs with the lowest quality (needs `quality`)";
    }
}

/// The `evaluate` stage kind.
pub struct EvaluateStage;

impl Stage for EvaluateStage {
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    /// Embedding the pairs set uses every core.
    fn default_cpus(&self) -> usize {
        usize::MAX
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "verification accuracy, TPR@FPR, AUC, EER and ROC of a model on a pairs set (with quality \
         scores: error-versus-reject curve and drop_lowest), or IJB-B/C templates"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::new("model", "model", "the model"),
                PortSpec::optional(
                    "pairs",
                    "pairs",
                    "verification set (images + pairs); or give the `ijb` parameter",
                ),
                PortSpec::optional(
                    "quality",
                    crate::eval::quality::QUALITY,
                    "quality scores of the pairs set's images (error-versus-reject, drop_lowest)",
                ),
            ],
            outputs: vec![
                PortSpec::new("metrics", "metrics", "metrics.json"),
                PortSpec::new(
                    "report",
                    "report",
                    "roc.png, roc.csv and scores.csv (per-pair scores)",
                ),
            ],
            params: EvaluateParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        let p = EvaluateParams::from_params(p)?;
        if p.ijb.len() > 1 {
            return Err("ijb: give one IJB folder".into());
        }
        if let Some(f) = p.fprs.iter().find(|f| !(**f > 0.0 && **f <= 1.0)) {
            return Err(format!("fprs: {f} is not in (0, 1]"));
        }
        let d = p.drop_lowest;
        if !(0.0..0.95).contains(&d) {
            return Err(format!("drop_lowest {d} must lie in [0, 0.95)"));
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = EvaluateParams::from_params(&ctx.params).map_err(StageError::msg)?;
        let dev = super::device(ctx)?;
        let model = load_model_for_inference(ctx.input("model")?, &dev)?;
        if let Some(dir) = p.ijb.first() {
            if ctx.input_opt("pairs").is_some() {
                return Err(StageError::msg(
                    "give the `pairs` input or the `ijb` parameter, not both",
                ));
            }
            if ctx.input_opt("quality").is_some() || p.drop_lowest > 0.0 {
                return Err(StageError::msg(
                    "`quality` and `drop_lowest` apply to a `pairs` input, not to IJB templates",
                ));
            }
            return run_ijb(ctx, &p, &model, Path::new(dir), &dev);
        }
        let Some(pairs_dir) = ctx.input_opt("pairs") else {
            return Err(StageError::msg(
                "wire a `pairs` input (verification set) or give the `ijb` parameter",
            ));
        };
        let data = PackedDataset::open(pairs_dir).map_err(TrainError::from)?;
        let pairs = data
            .pairs()
            .ok_or_else(|| StageError::msg("the `pairs` input has no verification pairs"))?
            .to_vec();
        let fprs = &p.fprs;
        let bs = p.batch_size.max(1) as usize;
        let flip = p.flip;
        let sink = &*ctx;
        let emb = embed_all(&model, &data, bs, flip, &dev, &|d, t| {
            sink.progress(d, t, "embedding")
        })?;
        let dim = model.card.embedding_size;
        let drop = p.drop_lowest;
        let report = ctx.output("report")?.to_path_buf();
        let title = format!("{} on {}", model.card.name, data.display_name());
        // The pairs evaluated and, for each, its index in the pairs set's list.
        let (pairs, index): (Vec<(u32, u32, bool)>, Vec<usize>) = match ctx.input_opt("quality") {
            Some(qdir) => {
                let q = crate::eval::quality::read_quality(qdir)?;
                if q.len() != data.len() {
                    return Err(StageError::msg(format!(
                        "the quality input scores {} images, the pairs set has {}: score the \
                         pairs set with qaa-score",
                        q.len(),
                        data.len()
                    )));
                }
                let pq = pair_quality(&pairs, &q)?;
                let erc = write_erc(&report, &emb, dim, &pairs, &pq, &title)?;
                for (f, a) in erc.fmr.iter().zip(&erc.auc) {
                    ctx.metric(&format!("erc_auc@fmr={f:e}"), *a);
                }
                if drop > 0.0 {
                    let full = verify(&emb, dim, &pairs, fprs)?;
                    let index = kept_indices(&pq, drop);
                    let kept: Vec<_> = index.iter().map(|&i| pairs[i]).collect();
                    let cut = verify(&emb, dim, &kept, fprs)?;
                    write_drop_table(&report, &[(0.0, &full), (drop, &cut)])?;
                    ctx.metric("dropped_pairs", (pairs.len() - kept.len()) as f64);
                    (kept, index)
                } else {
                    let index = (0..pairs.len()).collect();
                    (pairs, index)
                }
            }
            None if drop > 0.0 => {
                return Err(StageError::msg(
                    "drop_lowest needs the `quality` input (scores of the pairs set's images)",
                ))
            }
            None => {
                let index = (0..pairs.len()).collect();
                (pairs, index)
            }
        };
        let r = verify(&emb, dim, &pairs, fprs)?;
        write_scores(&report, &emb, dim, &pairs, &index)?;
        let mut m = serde_json::Map::new();
        m.insert("accuracy".into(), json!(r.accuracy));
        m.insert("accuracy_std".into(), json!(r.accuracy_std));
        ctx.metric("accuracy", r.accuracy);
        ctx.metric("accuracy_std", r.accuracy_std);
        write_outputs(ctx, m, &r, &title)?;
        Ok(())
    }
}

/// Writes `scores.csv`: one row per pair evaluated (after `drop_lowest`), its index in the
/// pairs set's list (`index[i]` for `pairs[i]`), both image indices, the cosine score of the flip-sum embeddings (the
/// score the ROC uses) and whether both images show one identity.
fn write_scores(
    report: &Path,
    emb: &[f32],
    dim: usize,
    pairs: &[(u32, u32, bool)],
    index: &[usize],
) -> Result<(), StageError> {
    let ab: Vec<(u32, u32)> = pairs.iter().map(|p| (p.0, p.1)).collect();
    let dist = pair_distances(emb, dim, &ab).map_err(crate::eval::EvalError::from)?;
    let mut csv = String::with_capacity(pairs.len() * 24 + 32);
    csv.push_str("pair,image_a,image_b,score,same\n");
    for ((i, (a, b, same)), d) in index.iter().zip(pairs).zip(&dist) {
        let score = 1.0 - d / 2.0;
        csv.push_str(&format!("{i},{a},{b},{score},{}\n", u8::from(*same)));
    }
    std::fs::write(report.join("scores.csv"), csv)?;
    Ok(())
}

/// Writes `metrics.json` (`m` plus AUC, EER, pairs, TPR@FPR), `roc.csv`, `roc.png`, and
/// reports the same numbers to the engine.
fn write_outputs(
    ctx: &mut StageContext,
    mut m: serde_json::Map<String, Value>,
    r: &EvalResult,
    title: &str,
) -> Result<(), StageError> {
    m.insert("auc".into(), json!(r.auc));
    m.insert("eer".into(), json!(r.eer));
    m.insert("pairs".into(), json!(r.pairs));
    for (f, t) in &r.tpr_at_fpr {
        m.insert(format!("tpr@fpr={f:e}"), json!(t));
    }
    std::fs::write(
        ctx.output("metrics")?.join("metrics.json"),
        serde_json::to_string_pretty(&Value::Object(m)).map_err(TrainError::from)?,
    )?;
    let report = ctx.output("report")?.to_path_buf();
    let mut csv = String::from("fpr,tpr\n");
    for (f, t) in &r.roc {
        csv.push_str(&format!("{f},{t}\n"));
    }
    std::fs::write(report.join("roc.csv"), csv)?;
    let pts: Vec<(f64, f64)> = r.roc.iter().filter(|p| p.0 > 0.0).copied().collect();
    save_chart(
        &report.join("roc.png"),
        (560, 480),
        &[Panel {
            title: format!("ROC: {title}"),
            x_label: "false positive rate (log)".into(),
            y_label: "true positive rate".into(),
            log_x: true,
            y_range: Some((0.0, 1.0)),
            lines: vec![Line {
                name: format!("AUC {:.4}, EER {:.4}", r.auc, r.eer),
                points: &pts,
                color: PALETTE[0],
            }],
        }],
    )?;
    ctx.metric("auc", r.auc);
    ctx.metric("eer", r.eer);
    for (f, t) in &r.tpr_at_fpr {
        ctx.metric(&format!("tpr@fpr={f:e}"), *t);
    }
    Ok(())
}

/// IJB-B/C template verification of `model` on the protocol in `dir`.
fn run_ijb(
    ctx: &mut StageContext,
    p: &EvaluateParams,
    model: &crate::train::artifact::LoadedModel,
    dir: &Path,
    dev: &candle_core::Device,
) -> Result<(), StageError> {
    let protocol = read_protocol(dir)?;
    let bs = p.batch_size.max(1) as usize;
    let flip = p.flip;
    let sink = &*ctx;
    let feats = ijb_features(model, &protocol, bs, flip, dev, &|d, t| {
        sink.progress(d, t, "embedding")
    })?;
    let r = ijb_verify(&feats, model.card.embedding_size, &protocol, &IJB_FPRS)?;
    let mut csv = String::from("template1,template2,label,score\n");
    for ((a, b), (l, s)) in protocol
        .pairs
        .iter()
        .zip(protocol.labels.iter().zip(&r.scores))
    {
        csv.push_str(&format!("{a},{b},{},{s}\n", u8::from(*l)));
    }
    std::fs::write(ctx.output("report")?.join("scores.csv"), csv)?;
    let mut m = serde_json::Map::new();
    m.insert("protocol".into(), json!("ijb"));
    m.insert("images".into(), json!(protocol.images.len()));
    m.insert("templates".into(), json!(r.templates));
    ctx.log(&format!(
        "IJB: {} images, {} templates, {} pairs",
        protocol.images.len(),
        r.templates,
        protocol.pairs.len()
    ));
    let label = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "IJB".into());
    let title = format!("{} on {label} templates", model.card.name);
    write_outputs(ctx, m, &r.eval, &title)
}

/// Writes `erc.csv` and `erc.png` (one line per FMR target) for cosine scores of `pairs`.
fn write_erc(
    report: &std::path::Path,
    emb: &[f32],
    dim: usize,
    pairs: &[(u32, u32, bool)],
    pq: &[f32],
    title: &str,
) -> Result<crate::eval::metrics::ErcCurve, crate::eval::EvalError> {
    let ab: Vec<(u32, u32)> = pairs.iter().map(|p| (p.0, p.1)).collect();
    let same: Vec<bool> = pairs.iter().map(|p| p.2).collect();
    let dist = pair_distances(emb, dim, &ab)?;
    let scores: Vec<f32> = dist.iter().map(|d| 1.0 - d / 2.0).collect();
    let erc = error_vs_reject(&scores, &same, pq, &erc_rejects(), &ERC_FMRS)?;
    let mut csv = String::from("reject");
    for f in &erc.fmr {
        csv.push_str(&format!(",fnmr@fmr={f:e}"));
    }
    csv.push('\n');
    for (i, r) in erc.reject.iter().enumerate() {
        csv.push_str(&format!("{r:.2}"));
        for c in &erc.fnmr {
            csv.push_str(&format!(",{}", c[i]));
        }
        csv.push('\n');
    }
    std::fs::write(report.join("erc.csv"), csv)?;
    let curves: Vec<Vec<(f64, f64)>> = erc
        .fnmr
        .iter()
        .map(|c| erc.reject.iter().copied().zip(c.iter().copied()).collect())
        .collect();
    let lines: Vec<Line> = curves
        .iter()
        .zip(&erc.fmr)
        .zip(PALETTE.iter().cycle())
        .map(|((p, f), c)| Line {
            name: format!("FNMR @ FMR {f:e}"),
            points: p,
            color: *c,
        })
        .collect();
    save_chart(
        &report.join("erc.png"),
        (560, 440),
        &[Panel {
            title: format!("Error versus reject: {title}"),
            x_label: "fraction of pairs rejected (lowest quality first)".into(),
            y_label: "false non-match rate".into(),
            log_x: false,
            y_range: None,
            lines,
        }],
    )?;
    Ok(erc)
}

/// Writes `drop_lowest.csv`: accuracy, AUC and TPR@FPR with and without the dropped pairs.
fn write_drop_table(
    report: &std::path::Path,
    rows: &[(f64, &EvalResult)],
) -> Result<(), TrainError> {
    let mut csv = String::from("dropped_fraction,pairs,accuracy,auc");
    if let Some((_, r)) = rows.first() {
        for (f, _) in &r.tpr_at_fpr {
            csv.push_str(&format!(",tpr@fpr={f:e}"));
        }
    }
    csv.push('\n');
    for (d, r) in rows {
        csv.push_str(&format!("{d},{},{},{}", r.pairs, r.accuracy, r.auc));
        for (_, t) in &r.tpr_at_fpr {
            csv.push_str(&format!(",{t}"));
        }
        csv.push('\n');
    }
    std::fs::write(report.join("drop_lowest.csv"), csv)?;
    Ok(())
}
