//! The `qaa` and `qaa-score` stage kinds.

use super::params::kind_params;
use crate::data::PackedDataset;
use crate::eval::quality::gbt::{Gbt, GbtParams};
use crate::eval::quality::{
    bn_features, centre_cosines, load_centres, to_score, write_quality, QAA_FILE, QAA_MODEL,
    QUALITY,
};
use crate::eval::EvalError;
use crate::kinds::with_threads;
use crate::train::artifact::load_model_for_inference;
use crate::train::{FaceSource, TrainError};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A fitted QAA model: which backbone's features it reads and the regressor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QaaModel {
    /// `fpipe-qaa/1`.
    pub format: String,
    /// Architecture name of the recognition model whose BatchNorm inputs are the features.
    pub backbone: String,
    /// Number of features (2 per BatchNorm2d).
    pub features: usize,
    /// The regressor of the class-centre cosine.
    pub regressor: Gbt,
}

kind_params! {
    /// Parameters of `qaa`.
    pub struct QaaParams {
        depth: i64 = Int, default 6,
            "tree depth (reference CatBoost: 10; 6 suits a few thousand images)";
        lr: f64 = Float, default 0.05, "learning rate (reference: 0.03)";
        iterations: i64 = Int, default 300, "trees (reference: 2500; 300 is CPU-sized)";
        l2: f64 = Float, default 2.0, "L2 regularisation of leaves (reference: 2)";
        bins: i64 = Int, default 64, "quantisation bins per feature (2..=256)";
        holdout: f64 = Float, default 0.2,
            "fraction of images (every k-th) held out of a second fit to report out-of-sample error (0 = skip)";
        batch_size: i64 = Int, default 64, volatile, "images per forward pass";
    }
}

impl QaaParams {
    /// The regressor's settings, checked, and the holdout fraction.
    fn gbt(&self) -> Result<GbtParams, String> {
        let nonneg = |k: &str, v: i64| -> Result<usize, String> {
            usize::try_from(v).map_err(|_| format!("{k} must be >= 0"))
        };
        let g = GbtParams {
            depth: nonneg("depth", self.depth)?,
            lr: self.lr,
            iterations: nonneg("iterations", self.iterations)?,
            l2: self.l2,
            bins: nonneg("bins", self.bins)?,
        };
        g.check()?;
        let h = self.holdout;
        if !(0.0..0.9).contains(&h) {
            return Err(format!("holdout {h} must lie in [0, 0.9)"));
        }
        Ok(g)
    }
}

kind_params! {
    /// Parameters of `qaa-score`.
    pub struct QaaScoreParams {
        batch_size: i64 = Int, default 64, volatile, "images per forward pass";
    }
}

fn rmse(pred: &[f64], y: &[f32]) -> f64 {
    let s: f64 = pred
        .iter()
        .zip(y)
        .map(|(p, &t)| (p - t as f64) * (p - t as f64))
        .sum();
    (s / y.len().max(1) as f64).sqrt()
}

fn std_dev(y: &[f32]) -> f64 {
    let n = y.len().max(1) as f64;
    let m = y.iter().map(|&v| v as f64).sum::<f64>() / n;
    (y.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n).sqrt()
}

fn mean(v: impl Iterator<Item = f32>) -> Option<f64> {
    let (s, n) = v.fold((0f64, 0usize), |a, x| (a.0 + x as f64, a.1 + 1));
    (n > 0).then(|| s / n as f64)
}

/// `qaa`: fits the quality regressor on a model's training set and scores that set.
pub struct QaaStage;

impl Stage for QaaStage {
    fn kind(&self) -> &'static str {
        "qaa"
    }
    fn default_cpus(&self) -> usize {
        usize::MAX
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "face-image quality: gradient-boosted trees from BatchNorm-input statistics to the \
         class-centre cosine, fitted on the model's training set, which it scores (0..100)"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::new("model", "model", "recognition model with class centres"),
                PortSpec::new(
                    "dataset",
                    "dataset",
                    "the data set the model was trained on",
                ),
            ],
            outputs: vec![
                PortSpec::new(
                    "quality",
                    QUALITY,
                    "quality scores of the data set's images",
                ),
                PortSpec::new("qaa", QAA_MODEL, "the fitted regressor (for qaa-score)"),
                PortSpec::new(
                    "report",
                    "report",
                    "fit.json: errors, quality by ground truth",
                ),
            ],
            params: QaaParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        QaaParams::from_params(p)?.gbt().map(|_| ())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = QaaParams::from_params(&ctx.params).map_err(StageError::msg)?;
        let params = p.gbt().map_err(StageError::msg)?;
        let holdout = p.holdout;
        let dev = super::device(ctx)?;
        let model_dir = ctx.input("model")?.to_path_buf();
        let model = load_model_for_inference(&model_dir, &dev)?;
        let (classes, centres) = load_centres(&model_dir)?;
        let data = PackedDataset::open(ctx.input("dataset")?).map_err(TrainError::from)?;
        if data.num_classes() != classes {
            return Err(StageError::msg(format!(
                "the data set has {} classes, the model's head {classes}: give `qaa` the data \
                 set the model was trained on",
                data.num_classes()
            )));
        }
        let bs = p.batch_size.max(1) as usize;
        let sink = &*ctx;
        let dim = model.card.embedding_size;
        let (rows, target, fit, held) = with_threads(ctx.threads, || {
            let (rows, emb) = bn_features(&model, &data, bs, &dev, &|d, t| {
                sink.progress(d, t, "BatchNorm features")
            })?;
            let labels: Vec<u32> = (0..data.len())
                .map(|i| FaceSource::label(&data, i))
                .collect();
            let target = centre_cosines(&emb, dim, &labels, &centres, classes)?;
            sink.log(&format!(
                "{} images, {} features; fitting {} trees of depth {}",
                rows.len(),
                rows.first().map_or(0, Vec::len),
                params.iterations,
                params.depth
            ));
            let fit = Gbt::fit(&rows, &target, &params)?;
            // Out-of-sample error: every k-th image held out of a second fit.
            let held = if holdout > 0.0 {
                let k = (1.0 / holdout).round().max(2.0) as usize;
                let (mut tr, mut ty, mut hr, mut hy) = (vec![], vec![], vec![], vec![]);
                for (i, (r, &y)) in rows.iter().zip(&target).enumerate() {
                    if i % k == k - 1 {
                        hr.push(r.clone());
                        hy.push(y);
                    } else {
                        tr.push(r.clone());
                        ty.push(y);
                    }
                }
                if hr.is_empty() || tr.is_empty() {
                    None
                } else {
                    let m = Gbt::fit(&tr, &ty, &params)?;
                    let p = m.predict_all(&hr)?;
                    Some((rmse(&p, &hy), std_dev(&hy)))
                }
            } else {
                None
            };
            Ok::<_, EvalError>((rows, target, fit, held))
        })??;
        let pred = fit.predict_all(&rows).map_err(EvalError::from)?;
        let scores: Vec<f32> = pred.iter().map(|&p| to_score(p)).collect();
        let n = scores.len();
        let qm = QaaModel {
            format: "fpipe-qaa/1".into(),
            backbone: model.card.name.clone(),
            features: fit.features,
            regressor: fit,
        };
        let qdir = ctx.output("qaa")?.to_path_buf();
        std::fs::write(
            qdir.join(QAA_FILE),
            serde_json::to_string(&qm).map_err(TrainError::from)?,
        )?;
        write_quality(
            ctx.output("quality")?,
            &scores,
            json!({"images": n, "model": model.card.name, "fitted_on_these_images": true}),
        )?;
        // Mean quality by ground truth, where the data set knows it (synthetic-faces does).
        let by =
            |pick: &dyn Fn(usize) -> bool| mean((0..n).filter(|&i| pick(i)).map(|i| scores[i]));
        let groups = [
            (
                "clean",
                by(&|i| {
                    let t = data.truth(i);
                    !(t.low_quality || t.out_of_domain || t.label_noise)
                }),
            ),
            ("low_quality", by(&|i| data.truth(i).low_quality)),
            ("out_of_domain", by(&|i| data.truth(i).out_of_domain)),
            ("label_noise", by(&|i| data.truth(i).label_noise)),
        ];
        let train_rmse = rmse(&pred, &target);
        let mut report = json!({
            "images": n,
            "features": qm.features,
            "target_std": std_dev(&target),
            "train_rmse": train_rmse,
            "params": params,
        });
        ctx.metric("target_std", std_dev(&target));
        ctx.metric("train_rmse", train_rmse);
        if let Some((r, s)) = held {
            report["holdout_rmse"] = json!(r);
            report["holdout_target_std"] = json!(s);
            ctx.metric("holdout_rmse", r);
        }
        for (name, m) in groups {
            if let Some(m) = m {
                report[format!("mean_quality_{name}")] = json!(m);
                ctx.metric(&format!("quality_{name}"), m);
            }
        }
        std::fs::write(
            ctx.output("report")?.join("fit.json"),
            serde_json::to_string_pretty(&report).map_err(TrainError::from)?,
        )?;
        Ok(())
    }
}

/// Loads a `qaa` artifact.
pub fn load_qaa(dir: &Path) -> Result<QaaModel, TrainError> {
    let path = dir.join(QAA_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(serde_json::from_str(&text)?)
}

/// `qaa-score`: quality scores of another data set (or the images of a pairs set).
pub struct QaaScoreStage;

impl Stage for QaaScoreStage {
    fn kind(&self) -> &'static str {
        "qaa-score"
    }
    fn default_cpus(&self) -> usize {
        usize::MAX
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "quality scores (0..100) of a data set or pairs set with a fitted qaa regressor"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::new(
                    "model",
                    "model",
                    "the recognition model the regressor was fitted with",
                ),
                PortSpec::new("qaa", QAA_MODEL, "fitted regressor from `qaa`"),
                PortSpec::optional("dataset", "dataset", "images to score (or give `pairs`)"),
                PortSpec::optional("pairs", "pairs", "verification set whose images to score"),
            ],
            outputs: vec![PortSpec::new("quality", QUALITY, "one score per image")],
            params: QaaScoreParams::specs(),
        }
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = QaaScoreParams::from_params(&ctx.params).map_err(StageError::msg)?;
        let images = match (ctx.input_opt("dataset"), ctx.input_opt("pairs")) {
            (Some(d), None) | (None, Some(d)) => d.to_path_buf(),
            _ => {
                return Err(StageError::msg(
                    "qaa-score: connect exactly one of the inputs `dataset` and `pairs`",
                ))
            }
        };
        let dev = super::device(ctx)?;
        let model = load_model_for_inference(ctx.input("model")?, &dev)?;
        let qaa = load_qaa(ctx.input("qaa")?)?;
        if qaa.backbone != model.card.name {
            return Err(StageError::msg(format!(
                "the qaa regressor was fitted on features of `{}`, the model is `{}`",
                qaa.backbone, model.card.name
            )));
        }
        let data = PackedDataset::open(&images).map_err(TrainError::from)?;
        let bs = p.batch_size.max(1) as usize;
        let sink = &*ctx;
        let rows = with_threads(ctx.threads, || {
            bn_features(&model, &data, bs, &dev, &|d, t| {
                sink.progress(d, t, "BatchNorm features")
            })
            .map(|r| r.0)
        })??;
        let pred = qaa.regressor.predict_all(&rows).map_err(|e| {
            StageError::msg(format!(
                "{e}: was the regressor fitted with this model's architecture and size?"
            ))
        })?;
        let scores: Vec<f32> = pred.iter().map(|&p| to_score(p)).collect();
        let m = mean(scores.iter().copied()).unwrap_or(0.0);
        write_quality(
            ctx.output("quality")?,
            &scores,
            json!({"images": scores.len(), "model": model.card.name, "fitted_on_these_images": false}),
        )?;
        ctx.metric("mean_quality", m);
        Ok(())
    }
}
