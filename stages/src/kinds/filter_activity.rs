//! The `filter-activity` stage kind (formerly `filters`): activity analysis of a model's first convolution (CRAFT, docs/methods.md
//! section 4): inactive fraction, unique filters, a PNG grid of the filters, and the per-epoch
//! history when the model was trained with `reactivation` checks.

use super::params::kind_params;
use crate::train::artifact::{ModelCard, CARD, WEIGHTS};
use crate::train::reactivation::{analyse, first_conv, FilterEpoch, ReactivationConfig};
use crate::train::TrainError;
use crate::util::chart::save_rgb_png;
use candle_core::{DType, Device};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

kind_params! {
    /// Parameters of the first-layer filter analysis.
    pub struct FilterActivityParams {
        tau: f64 = Float, default 0.1, "inactive when ‖W_i‖ < tau · max_j ‖W_j‖";
        threshold: f64 = Float, default 0.0, "absolute activity threshold; > 0 replaces tau";
        same_cos: f64 = Float, default 0.9,
            "|cos| at or above which two filters count as one pattern";
    }
}

/// Pixels per weight in the grid.
const CELL: usize = 8;
/// Gap between filters in the grid, in pixels.
const GAP: usize = 4;

/// Writes the filters `w` (`[n, 3, k, k]`) as a grid of RGB tiles: one colour channel per
/// input channel, mid-grey at zero, one scale for the whole layer so that dead filters show
/// as flat grey.
pub fn filter_grid(w: &[f32], n: usize, k: usize, path: &Path) -> std::io::Result<()> {
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    let rows = n.div_ceil(cols).max(1);
    let tile = k * CELL;
    let (wd, ht) = (cols * (tile + GAP) + GAP, rows * (tile + GAP) + GAP);
    let mut px = vec![255u8; wd * ht * 3];
    let max = w
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    for f in 0..n {
        let (ox, oy) = (
            GAP + (f % cols) * (tile + GAP),
            GAP + (f / cols) * (tile + GAP),
        );
        for y in 0..tile {
            for x in 0..tile {
                let (ky, kx) = (y / CELL, x / CELL);
                let i = ((oy + y) * wd + ox + x) * 3;
                for c in 0..3 {
                    let v = w[((f * 3 + c) * k + ky) * k + kx] / max;
                    px[i + c] = (127.5 + 127.5 * v).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    save_rgb_png(path, wd as u32, ht as u32, &px)
}

/// `filter-activity`: analysis of a model's first conv layer (called `filters` before
/// 2026-12-07; the old name is registered as an alias).
pub struct FilterActivityStage;

/// The analysis settings (the other fields matter only to training).
fn config_from(p: &FilterActivityParams) -> ReactivationConfig {
    ReactivationConfig {
        tau: p.tau,
        threshold: p.threshold,
        same_cos: p.same_cos,
        ..ReactivationConfig::default()
    }
}

impl Stage for FilterActivityStage {
    fn kind(&self) -> &'static str {
        "filter-activity"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "first-layer filter analysis: inactive fraction, unique filters, PNG grid, reactivation history"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![PortSpec::new("model", "model", "any model artifact")],
            outputs: vec![PortSpec::new(
                "report",
                "report",
                "filters.json, filters.png, history.csv",
            )],
            params: FilterActivityParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        config_from(&FilterActivityParams::from_params(p)?)
            .validate()
            .map_err(|e| e.replace("reactivation_", ""))
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let cfg =
            config_from(&FilterActivityParams::from_params(&ctx.params).map_err(StageError::msg)?);
        let dir = ctx.input("model")?.to_path_buf();
        let weights = dir.join(WEIGHTS);
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
            .map_err(|e| StageError::msg(format!("{}: {e}", weights.display())))?;
        let (name, t) = first_conv(tensors.iter().map(|(k, t)| (k.as_str(), t.clone())), |t| {
            t.dims().to_vec()
        })
        .map_err(|e| StageError::msg(format!("{}: {e}", weights.display())))?;
        let dims = t.dims().to_vec();
        let (n, k) = (dims[0], dims[2]);
        let w = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(TrainError::from)?;
        let stats = analyse(&w, 3 * k * dims[3], &cfg);
        let history: Vec<FilterEpoch> = std::fs::read_to_string(dir.join(CARD))
            .ok()
            .and_then(|s| serde_json::from_str::<ModelCard>(&s).ok())
            .and_then(|c| c.training.get("reactivation_history").cloned())
            .and_then(|h| serde_json::from_value(h).ok())
            .unwrap_or_default();
        let out = ctx.output("report")?.to_path_buf();
        if dims[2] == dims[3] {
            filter_grid(&w, n, k, &out.join("filters.png"))?;
        }
        let mut csv = String::from("epoch,inactive_fraction,unique_filters,reactivated\n");
        for h in &history {
            csv.push_str(&format!(
                "{},{},{},{}\n",
                h.epoch, h.inactive_fraction, h.unique_filters, h.reactivated
            ));
        }
        std::fs::write(out.join("history.csv"), csv)?;
        let report = json!({
            "layer": name,
            "shape": dims,
            "filters": n,
            "inactive": stats.inactive,
            "inactive_fraction": stats.inactive_fraction(),
            "unique_filters": stats.unique,
            "activity": stats.activity,
            "tau": cfg.tau,
            "threshold": cfg.threshold,
            "same_cos": cfg.same_cos,
            "history": history,
        });
        std::fs::write(
            out.join("filters.json"),
            serde_json::to_string_pretty(&report).map_err(TrainError::from)?,
        )?;
        ctx.metric("inactive_fraction", stats.inactive_fraction());
        ctx.metric("unique_filters", stats.unique as f64);
        ctx.metric("filters", n as f64);
        ctx.log(&format!(
            "{name}: {} of {n} filters inactive, {} unique",
            stats.inactive.len(),
            stats.unique
        ));
        Ok(())
    }
}
