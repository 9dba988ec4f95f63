//! Model artifacts: `model.safetensors` (backbone, PyTorch-compatible names), `model.json`
//! (the model card) and `centres.safetensors` (class-centre matrix `weight [classes, emb]`);
//! loss/lr curves as CSV and PNG.

use super::trainer::CurvePoint;
use super::TrainError;
use crate::models::{Backbone, BackboneConfig, Normalisation, ParamStore};
use crate::util::chart::{save_chart, Line, Panel, PALETTE};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Backbone weights file in a model directory.
pub const WEIGHTS: &str = "model.safetensors";
/// Model card file.
pub const CARD: &str = "model.json";
/// Class-centre matrix file.
pub const CENTRES: &str = "centres.safetensors";

/// The model card: what a model is and how to feed it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    /// `fpipe-model/1`.
    pub format: String,
    /// Short architecture name, e.g. `iresnet50`.
    pub name: String,
    /// Full backbone configuration (tagged by `arch`).
    pub architecture: BackboneConfig,
    /// Parameter count (running statistics excluded).
    pub parameters: usize,
    /// Multiply-accumulates per image (convolutions and FC).
    pub macs: u64,
    /// Square input size, RGB, NCHW.
    pub input_size: usize,
    /// Input normalisation on 0..255 RGB.
    pub normalisation: Normalisation,
    /// Embedding dimension.
    pub embedding_size: usize,
    /// Classes of the margin head (0 when none).
    pub classes: usize,
    /// Identifier of the training data (its artifact directory name) and image count.
    pub training_data: serde_json::Value,
    /// Training configuration (loss, optimiser, schedule, seed), or where it came from.
    pub training: serde_json::Value,
}

/// Writes weights, centres (if any) and the card into `dir`.
pub fn save_model(
    dir: &Path,
    store: &ParamStore,
    cfg: &BackboneConfig,
    classes: usize,
    training_data: serde_json::Value,
    training: serde_json::Value,
) -> Result<ModelCard, TrainError> {
    std::fs::create_dir_all(dir)?;
    store.save("backbone.", &dir.join(WEIGHTS))?;
    if store.vars().iter().any(|(k, _)| k == "head.weight") {
        store.save("head.", &dir.join(CENTRES))?;
    }
    let card = ModelCard {
        format: "fpipe-model/1".into(),
        name: cfg.name(),
        architecture: cfg.clone(),
        parameters: store.num_params("backbone."),
        macs: cfg.macs(),
        input_size: cfg.input_size(),
        normalisation: cfg.normalisation(),
        embedding_size: cfg.embedding_size(),
        classes,
        training_data,
        training,
    };
    std::fs::write(dir.join(CARD), serde_json::to_string_pretty(&card)?)?;
    Ok(card)
}

/// A loaded model.
pub struct LoadedModel {
    /// The card.
    pub card: ModelCard,
    /// The backbone (variables under `backbone.` of `store`).
    pub backbone: Backbone,
    /// Its variables.
    pub store: ParamStore,
}

/// Loads a model directory written by [`save_model`], with trainable variables.
pub fn load_model(dir: &Path, dev: &Device) -> Result<LoadedModel, TrainError> {
    load_model_with(dir, dev, ParamStore::new(0))
}

/// Loads a model for inference only (embedding, evaluation, a distillation teacher): its
/// forward records no autograd graph (see [`ParamStore::for_inference`]).
pub fn load_model_for_inference(dir: &Path, dev: &Device) -> Result<LoadedModel, TrainError> {
    load_model_with(dir, dev, ParamStore::for_inference(0))
}

fn load_model_with(dir: &Path, dev: &Device, store: ParamStore) -> Result<LoadedModel, TrainError> {
    let card_path = dir.join(CARD);
    let text = std::fs::read_to_string(&card_path).map_err(|e| {
        TrainError::Invalid(format!(
            "{}: cannot read model card: {e}",
            card_path.display()
        ))
    })?;
    let card: ModelCard = serde_json::from_str(&text)?;
    let backbone = Backbone::new(&card.architecture, store.vb(dev).pp("backbone"))?;
    store.load("backbone.", &dir.join(WEIGHTS))?;
    Ok(LoadedModel {
        card,
        backbone,
        store,
    })
}

/// Writes `curve.csv` (step, loss, lr) and `curve.png` (loss above, learning rate below,
/// under `title`) into `dir`.
pub fn write_curve(dir: &Path, curve: &[CurvePoint], title: &str) -> Result<(), TrainError> {
    write_curve_with(dir, curve, None, title)
}

/// [`write_curve`] with the objective's per-step extra as a fourth CSV column named `extra`
/// (e.g. `active_triplets`, `lambda`).
pub fn write_curve_with(
    dir: &Path,
    curve: &[CurvePoint],
    extra: Option<&str>,
    title: &str,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir)?;
    let mut csv = match extra {
        Some(name) => format!("step,loss,lr,{name}\n"),
        None => String::from("step,loss,lr\n"),
    };
    for c in curve {
        match extra {
            Some(_) => {
                let e = c.extra.map(|v| v.to_string()).unwrap_or_default();
                csv.push_str(&format!("{},{},{},{e}\n", c.step, c.loss, c.lr))
            }
            None => csv.push_str(&format!("{},{},{}\n", c.step, c.loss, c.lr)),
        }
    }
    std::fs::write(dir.join("curve.csv"), csv)?;
    let loss: Vec<(f64, f64)> = curve.iter().map(|c| (c.step as f64, c.loss)).collect();
    let lr: Vec<(f64, f64)> = curve.iter().map(|c| (c.step as f64, c.lr)).collect();
    let panel = |title: String, y: &str, points, color| Panel {
        title,
        x_label: "step".into(),
        y_label: y.into(),
        log_x: false,
        y_range: None,
        lines: vec![Line {
            name: y.into(),
            points,
            color,
        }],
    };
    save_chart(
        &dir.join("curve.png"),
        (640, 520),
        &[
            panel(format!("Training loss: {title}"), "loss", &loss, PALETTE[0]),
            panel("Learning rate".into(), "learning rate", &lr, PALETTE[1]),
        ],
    )?;
    Ok(())
}
