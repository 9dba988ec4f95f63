//! Face-image quality assessment (QAA, docs/methods.md §6; 3DiVi `open_midas/bn_extraction`,
//! `qaa/`): BatchNorm-input statistics of a recognition model ([`crate::models::probe`]) are
//! regressed by gradient-boosted trees ([`gbt`]) onto the cosine of each training image's
//! embedding with its class centre; the score is `clip(prediction, 0, 1) · 100`.
//!
//! The stage kinds `qaa` (fit on a model's training set and score it) and `qaa-score` (score
//! another data set or a pairs set) are in `crate::kinds::quality`. Both write a `quality`
//! artifact, which `evaluate` takes for its error-versus-reject curve and `drop_lowest`, and
//! which dataset filtering reads.

pub mod gbt;

use super::EvalError;
use crate::models::probe::record_bn_inputs;
use crate::train::artifact::{LoadedModel, CENTRES};
use crate::train::trainer::batch_tensor;
use crate::train::FaceSource;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Port type of quality scores: `quality.safetensors` (`scores` `[N]` f32 in 0..100, one per
/// image of the data set scored, in its order) and `quality.json`.
pub const QUALITY: &str = "quality";
/// Port type of a fitted quality regressor: `qaa.json`.
pub const QAA_MODEL: &str = "qaa";
/// Scores file of a `quality` artifact.
pub const SCORES: &str = "quality.safetensors";
/// Regressor file of a `qaa` artifact.
pub const QAA_FILE: &str = "qaa.json";

/// Writes `scores` (0..100) into a `quality` artifact directory with `meta` as quality.json.
pub fn write_quality(dir: &Path, scores: &[f32], meta: serde_json::Value) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir)?;
    let mut t = HashMap::new();
    t.insert(
        "scores".to_string(),
        Tensor::from_vec(scores.to_vec(), scores.len(), &Device::Cpu)?,
    );
    candle_core::safetensors::save(&t, dir.join(SCORES))?;
    std::fs::write(
        dir.join("quality.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    Ok(())
}

/// Reads the scores (0..100, one per image) of a `quality` artifact directory.
pub fn read_quality(dir: &Path) -> Result<Vec<f32>, EvalError> {
    let path = dir.join(SCORES);
    let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let s = t
        .get("scores")
        .ok_or_else(|| EvalError::file(&path, "no `scores` tensor"))?;
    Ok(s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The class-centre matrix `[classes, emb]` of a model directory, row-major.
pub fn load_centres(dir: &Path) -> Result<(usize, Vec<f32>), EvalError> {
    let path = dir.join(CENTRES);
    if !path.exists() {
        return Err(EvalError::Mismatch(format!(
            "{}: the model has no class centres (QAA needs a model trained by `train` or \
             `distil` on this data set)",
            dir.display()
        )));
    }
    let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let w = t
        .get("weight")
        .ok_or_else(|| EvalError::file(&path, "no `weight` tensor"))?;
    let (classes, _) = w.dims2()?;
    Ok((classes, w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
}

/// BatchNorm-input features and L2-normalised embeddings (no flip, eval mode) of every image
/// of `data`: `(rows of 2·n_BN features, embeddings [N·D])`.
pub fn bn_features(
    model: &LoadedModel,
    data: &dyn FaceSource,
    batch: usize,
    dev: &Device,
    progress: &dyn Fn(u64, u64),
) -> Result<(Vec<Vec<f32>>, Vec<f32>), EvalError> {
    let (h, w, _) = data.image_shape();
    let cfg = &model.card.architecture;
    let (size, norm) = (cfg.input_size(), cfg.normalisation());
    let n = data.len();
    let mut rows = Vec::with_capacity(n);
    let mut emb = Vec::with_capacity(n * cfg.embedding_size());
    let batch = batch.max(1);
    let mut i = 0;
    while i < n {
        let j = (i + batch).min(n);
        let raw = data.read_images(&(i..j).collect::<Vec<_>>())?;
        let x = batch_tensor(&raw, (h, w), &vec![false; j - i], size, norm, dev)?;
        let (e, feats) = record_bn_inputs(|| model.backbone.forward(&x, false))?;
        if feats.len() != j - i || feats.first().is_none_or(|r| r.is_empty()) {
            return Err(EvalError::Mismatch(format!(
                "{}: no BatchNorm2d input was recorded for quality features",
                model.card.name
            )));
        }
        rows.extend(feats);
        let e = crate::loss::l2_normalize(&e)?.to_dtype(DType::F32)?;
        emb.extend(e.flatten_all()?.to_vec1::<f32>()?);
        i = j;
        progress(i as u64, n as u64);
    }
    Ok((rows, emb))
}

/// Cosine of each embedding (unit rows of `emb`, `dim` columns) with its label's class centre.
pub fn centre_cosines(
    emb: &[f32],
    dim: usize,
    labels: &[u32],
    centres: &[f32],
    classes: usize,
) -> Result<Vec<f32>, EvalError> {
    if centres.len() != classes * dim {
        return Err(EvalError::Mismatch(format!(
            "class centres hold {} values, expected {classes} x {dim}",
            centres.len()
        )));
    }
    labels
        .iter()
        .zip(emb.chunks_exact(dim))
        .map(|(&l, e)| {
            let l = l as usize;
            if l >= classes {
                return Err(EvalError::Mismatch(format!(
                    "label {l} has no class centre (the model has {classes} classes): score \
                     the data set the model was trained on"
                )));
            }
            let c = &centres[l * dim..(l + 1) * dim];
            let norm = c.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            Ok(e.iter().zip(c).map(|(a, b)| a * b).sum::<f32>() / norm)
        })
        .collect()
}

/// Quality score 0..100 from a regressor prediction of the cosine.
pub fn to_score(pred: f64) -> f32 {
    (pred.clamp(0.0, 1.0) * 100.0) as f32
}
