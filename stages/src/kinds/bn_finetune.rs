//! The `bn-finetune` stage kind: parameters, reading its inputs and writing the snapshot
//! report around [`crate::eval::bn_finetune`].

use super::params::kind_params;
use super::with_threads;
use crate::data::PackedDataset;
use crate::eval::bn_finetune::{
    available_fprs, bn_finetune, FinetuneConfig, Finetuned, Mix, Select, Snapshot,
};
use crate::train::artifact::{save_model, CENTRES};
use crate::train::{FaceSource, TrainError};
use crate::util::chart::{save_chart, Line, Panel, PALETTE};
use fpipe_engine::{PortSpec, Stage, StageContext, StageError, StageSignature};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const MIXES: &[&str] = &["none", "blur", "noise", "out-of-domain"];
const SELECTS: &[&str] = &["auc", "accuracy", "tpr"];

kind_params! {
    /// Parameters of `bn-finetune`.
    pub struct BnFinetuneParams {
        mix: String = Enum(MIXES), default "none", "what is mixed into the batches";
        fraction: f64 = Float, default 0.05,
            "blur/out-of-domain: probability per image; noise: extra tensors per batch image";
        sigma_min: f64 = Float, default 3.0,
            "blur: smallest σ, pixels at 112x112 (scaled by image side/112)";
        sigma_max: f64 = Float, default 5.0, "blur: largest σ, pixels at 112x112";
        epochs: f64 = Float, default 1.0, "passes over the data set (unless steps > 0)";
        steps: i64 = Int, default 0, "batches (overrides epochs)";
        batch_size: i64 = Int, default 64, "images per batch";
        snapshot_every: i64 = Int, default 10,
            "evaluate a snapshot every N steps (and after the last)";
        select: String = Enum(SELECTS), default "auc", "snapshot ranking on the held-out pairs";
        select_fpr: f64 = Float, default 1e-2, "select tpr: the FPR";
        include_input: bool = Bool, default false,
            "the input model (step 0) may win the selection";
        fprs: Vec<f64> = List(Box::new(Float)), default [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
            "FPR targets reported (those below 1 / impostor pairs are dropped)";
        flip: bool = Bool, default true, "random horizontal flip";
        seed: i64 = Int, default 0, "seed of order, flips and mixing";
        eval_batch_size: i64 = Int, default 64, volatile,
            "images per forward pass when evaluating";
    }
}

impl BnFinetuneParams {
    fn check(&self) -> Result<(), String> {
        let fraction = self.fraction;
        if !(fraction > 0.0 && fraction <= 0.5) {
            return Err(format!("fraction {fraction} must lie in (0, 0.5]"));
        }
        if !(self.sigma_min > 0.0 && self.sigma_max >= self.sigma_min && self.sigma_max <= 50.0) {
            return Err("need 0 < sigma_min <= sigma_max <= 50".into());
        }
        if self.batch_size < 2 {
            return Err("batch_size must be at least 2 (BatchNorm)".into());
        }
        if self.snapshot_every < 1 {
            return Err("snapshot_every must be at least 1".into());
        }
        if self.epochs <= 0.0 && self.steps <= 0 {
            return Err("give epochs > 0 or steps > 0".into());
        }
        if self.fprs.is_empty() || self.fprs.iter().any(|&x| !(x > 0.0 && x < 1.0)) {
            return Err("fprs must be a non-empty list of rates in (0, 1)".into());
        }
        if !(self.select_fpr > 0.0 && self.select_fpr < 1.0) {
            return Err("select_fpr must lie in (0, 1)".into());
        }
        Ok(())
    }
}

/// The `bn-finetune` stage kind.
pub struct BnFinetuneStage;

impl Stage for BnFinetuneStage {
    fn kind(&self) -> &'static str {
        "bn-finetune"
    }
    fn default_cpus(&self) -> usize {
        usize::MAX
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "BatchNorm fine-tuning: only running statistics move (blur/noise/out-of-domain mixed \
         in); the best snapshot on held-out pairs is kept"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![
                PortSpec::new("model", "model", "the model to fine-tune"),
                PortSpec::new("dataset", "dataset", "face images (labels unused)"),
                PortSpec::new("pairs", "pairs", "held-out pairs ranking the snapshots"),
                PortSpec::optional("ood", "dataset", "non-face images for mix out-of-domain"),
            ],
            outputs: vec![
                PortSpec::new(
                    "model",
                    "model",
                    "the best snapshot (same format as `train`)",
                ),
                PortSpec::new("report", "report", "snapshots.csv/png and summary.json"),
            ],
            params: BnFinetuneParams::specs(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        BnFinetuneParams::from_params(p)?.check()
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p = BnFinetuneParams::from_params(&ctx.params).map_err(StageError::msg)?;
        let dev = super::device(ctx)?;
        let model_dir = ctx.input("model")?.to_path_buf();
        let model = crate::train::artifact::load_model(&model_dir, &dev)?;
        let data = PackedDataset::open(ctx.input("dataset")?).map_err(TrainError::from)?;
        let pairs_data = PackedDataset::open(ctx.input("pairs")?).map_err(TrainError::from)?;
        let pairs = pairs_data
            .pairs()
            .ok_or_else(|| StageError::msg("the `pairs` input has no verification pairs"))?
            .to_vec();
        let ood = match ctx.input_opt("ood") {
            Some(d) => Some(PackedDataset::open(d).map_err(TrainError::from)?),
            None => None,
        };
        let fraction = p.fraction;
        let mix = match p.mix.as_str() {
            "blur" => Mix::Blur {
                fraction,
                sigma: (p.sigma_min, p.sigma_max),
            },
            "noise" => Mix::Noise { fraction },
            "out-of-domain" => Mix::OutOfDomain { fraction },
            _ => Mix::None,
        };
        let select = match p.select.as_str() {
            "accuracy" => Select::Accuracy,
            "tpr" => Select::Tpr(p.select_fpr),
            _ => Select::Auc,
        };
        let requested = &p.fprs;
        let impostors = pairs.iter().filter(|p| !p.2).count();
        let fprs = available_fprs(requested, impostors);
        if fprs.len() < requested.len() {
            ctx.log(&format!(
                "{impostors} impostor pairs: TPR reported at FPR {fprs:?} only"
            ));
        }
        let bs = p.batch_size.max(2) as usize;
        let steps = match p.steps {
            s if s > 0 => s as u64,
            _ => (p.epochs * data.len() as f64 / bs as f64).ceil().max(1.0) as u64,
        };
        let cfg = FinetuneConfig {
            mix,
            steps,
            batch_size: bs,
            snapshot_every: p.snapshot_every.max(1) as u64,
            select,
            include_input: p.include_input,
            flip: p.flip,
            seed: p.seed as u64,
            fprs,
            eval_batch: p.eval_batch_size.max(1) as usize,
        };
        let sink = &*ctx;
        let on_snapshot = |s: &Snapshot, total: u64| {
            sink.progress(s.step, total, &format!("snapshot score {:.4}", s.score));
            sink.log(&format!(
                "step {}/{total}: accuracy {:.4} auc {:.4} score {:.4}",
                s.step, s.result.accuracy, s.result.auc, s.score
            ));
        };
        let cancelled = || sink.cancelled();
        let ood_ref = ood.as_ref().map(|o| o as &dyn FaceSource);
        let out = with_threads(ctx.threads, || {
            bn_finetune(
                &model,
                &data,
                ood_ref,
                &pairs_data,
                &pairs,
                &cfg,
                &dev,
                &on_snapshot,
                &cancelled,
            )
        })??;
        let best = &out.snapshots[out.best];
        let card = &model.card;
        let training = json!({
            "kind": "bn-finetune",
            "from": card.training,
            "mix": p.mix,
            "fraction": fraction,
            "steps": steps,
            "best_step": best.step,
        });
        let out_dir = ctx.output("model")?.to_path_buf();
        save_model(
            &out_dir,
            &model.store,
            &card.architecture,
            card.classes,
            card.training_data.clone(),
            training,
        )?;
        // The class centres are untouched: carry them over.
        if model_dir.join(CENTRES).exists() {
            std::fs::copy(model_dir.join(CENTRES), out_dir.join(CENTRES))?;
        }
        let title = format!("{} on {}", card.name, pairs_data.display_name());
        write_report(ctx.output("report")?, &out, &cfg, &title)?;
        ctx.metric("best_step", best.step as f64);
        ctx.metric("val_accuracy", best.result.accuracy);
        ctx.metric("val_auc", best.result.auc);
        for (f, t) in &best.result.tpr_at_fpr {
            ctx.metric(&format!("val_tpr@fpr={f:e}"), *t);
        }
        let input = &out.snapshots[0];
        ctx.metric("input_val_auc", input.result.auc);
        Ok(())
    }
}

fn write_report(
    dir: &std::path::Path,
    out: &Finetuned,
    cfg: &FinetuneConfig,
    title: &str,
) -> Result<(), TrainError> {
    let mut csv = String::from("step,accuracy,accuracy_std,auc,eer");
    for f in &cfg.fprs {
        csv.push_str(&format!(",tpr@fpr={f:e}"));
    }
    csv.push_str(",score,kept\n");
    for (i, s) in out.snapshots.iter().enumerate() {
        let r = &s.result;
        csv.push_str(&format!(
            "{},{},{},{},{}",
            s.step, r.accuracy, r.accuracy_std, r.auc, r.eer
        ));
        for (_, t) in &r.tpr_at_fpr {
            csv.push_str(&format!(",{t}"));
        }
        csv.push_str(&format!(",{},{}\n", s.score, i == out.best));
    }
    std::fs::write(dir.join("snapshots.csv"), csv)?;
    let pts: Vec<(f64, f64)> = out
        .snapshots
        .iter()
        .map(|s| (s.step as f64, s.score))
        .collect();
    let best: Vec<(f64, f64)> = vec![pts[out.best]];
    save_chart(
        &dir.join("snapshots.png"),
        (560, 400),
        &[Panel {
            title: format!("BN fine-tune snapshots: {title}"),
            x_label: "step".into(),
            y_label: "selection score".into(),
            log_x: false,
            y_range: None,
            lines: vec![
                Line {
                    name: "snapshot score".into(),
                    points: &pts,
                    color: PALETTE[0],
                },
                Line {
                    name: format!("kept (step {})", out.snapshots[out.best].step),
                    points: &best,
                    color: PALETTE[1],
                },
            ],
        }],
    )?;
    let best = &out.snapshots[out.best];
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&json!({
            "steps": cfg.steps,
            "mix": format!("{:?}", cfg.mix),
            "best_step": best.step,
            "best_score": best.score,
            "input_score": out.snapshots[0].score,
            "snapshots": out.snapshots.len(),
        }))?,
    )?;
    Ok(())
}
