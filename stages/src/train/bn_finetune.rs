//! `bn-finetune`: BatchNorm fine-tuning (docs/methods.md §5; 3DiVi `open_midas/bn_finetune`).
//!
//! Every parameter stays frozen; batches go through the backbone in training mode with no
//! backward pass, so the only thing that moves is each BatchNorm's running mean and variance
//! (momentum 0.1, PyTorch's convention). One of three perturbations is mixed into the batches:
//!
//! - `blur`: each image, with probability `fraction` (0.05), gets a Gaussian blur with σ drawn
//!   uniformly from `sigma_min..sigma_max` (3..5). σ is in pixels of a 112×112 face and is
//!   scaled by `image side / 112`, so a 64×64 data set is blurred as much relative to the face;
//! - `noise`: `max(1, round(fraction · batch))` extra N(0, 1) tensors, already in the model's
//!   normalised input space, are appended to every batch;
//! - `out-of-domain`: each image, with probability `fraction`, is replaced by a random image of
//!   the `ood` input (non-faces).
//!
//! A snapshot is taken every `snapshot_every` steps and after the last; each is evaluated on the
//! held-out `pairs` (flip-sum embeddings, as `evaluate`) and the best by `select` becomes the
//! output model. The input model is evaluated as step 0 for reference and competes only with
//! `include_input`. All random choices are functions of (seed, step, image slot).

use super::artifact::{save_model, LoadedModel, CENTRES};
use super::evaluate::{verify, EvalResult};
use super::png::{Canvas, Series};
use super::stages::{embed_all, with_threads};
use super::trainer::{batch_tensor, epoch_order, stream};
use super::{parse_device, FaceSource, TrainError};
use crate::data::PackedDataset;
use crate::models::is_buffer;
use candle_core::{Device, Tensor};
use fpipe_engine::{
    ParamSpec, ParamType, PortSpec, Stage, StageContext, StageError, StageSignature,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// What is mixed into the batches.
#[derive(Clone, Debug, PartialEq)]
pub enum Mix {
    /// Plain batches.
    None,
    /// Gaussian blur on a fraction of images, σ uniform in the range (pixels at 112×112).
    Blur { fraction: f64, sigma: (f64, f64) },
    /// Extra N(0, 1) tensors appended to every batch.
    Noise { fraction: f64 },
    /// A fraction of images replaced by out-of-domain images.
    OutOfDomain { fraction: f64 },
}

/// How snapshots are ranked (higher is better).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Select {
    /// Area under the ROC.
    Auc,
    /// 10-fold accuracy.
    Accuracy,
    /// TPR at the given FPR.
    Tpr(f64),
}

impl Select {
    fn score(&self, r: &EvalResult) -> f64 {
        match self {
            Select::Auc => r.auc,
            Select::Accuracy => r.accuracy,
            Select::Tpr(f) => crate::metrics::tpr_at_fpr(
                &crate::metrics::Roc {
                    fpr: r.roc.iter().map(|p| p.0).collect(),
                    tpr: r.roc.iter().map(|p| p.1).collect(),
                    thresholds: vec![0.0; r.roc.len()],
                },
                &[*f],
            )[0],
        }
    }
}

/// Settings of one fine-tuning run.
#[derive(Clone, Debug)]
pub struct FinetuneConfig {
    /// Perturbation mixed into the batches.
    pub mix: Mix,
    /// Batches (steps) to run.
    pub steps: u64,
    /// Images per batch (before noise tensors are appended).
    pub batch_size: usize,
    /// Snapshot every this many steps (and after the last).
    pub snapshot_every: u64,
    /// Snapshot ranking.
    pub select: Select,
    /// Let the input model (step 0) win the selection.
    pub include_input: bool,
    /// Random horizontal flips of the batches (p = 0.5).
    pub flip: bool,
    /// Seed of order, flips and mixing.
    pub seed: u64,
    /// FPR targets reported per snapshot.
    pub fprs: Vec<f64>,
    /// Images per forward pass when evaluating.
    pub eval_batch: usize,
}

/// One evaluated snapshot.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Steps done (0 = the input model).
    pub step: u64,
    /// Verification metrics on the held-out pairs.
    pub result: EvalResult,
    /// Its ranking score.
    pub score: f64,
}

/// Result of [`bn_finetune`]: the model's running statistics are those of `snapshots[best]`.
pub struct Finetuned {
    /// Every snapshot, step 0 first.
    pub snapshots: Vec<Snapshot>,
    /// Index of the kept one.
    pub best: usize,
}

const MIX: u64 = 21;
const NOISE: u64 = 22;
const FLIP: u64 = 23;

/// Gaussian blur of HWC RGB `img` (`h`×`w`) with standard deviation `sigma` pixels, separable,
/// kernel radius `ceil(3σ)`, edges clamped.
pub fn gaussian_blur(img: &[u8], h: usize, w: usize, sigma: f64) -> Vec<u8> {
    if sigma <= 0.0 {
        return img.to_vec();
    }
    let r = (3.0 * sigma).ceil() as isize;
    let k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let sum: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / sum).collect();
    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    let mut tmp = vec![0f32; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut s = 0f32;
                for (j, kv) in k.iter().enumerate() {
                    let xx = clamp(x as isize + j as isize - r, w);
                    s += kv * img[(y * w + xx) * 3 + c] as f32;
                }
                tmp[(y * w + x) * 3 + c] = s;
            }
        }
    }
    let mut out = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut s = 0f32;
                for (j, kv) in k.iter().enumerate() {
                    let yy = clamp(y as isize + j as isize - r, h);
                    s += kv * tmp[(yy * w + x) * 3 + c];
                }
                out[(y * w + x) * 3 + c] = s.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Copies of the running statistics (deep: `Var::set` writes in place).
fn buffers(model: &LoadedModel) -> Result<HashMap<String, Tensor>, TrainError> {
    model
        .store
        .vars()
        .into_iter()
        .filter(|(k, _)| is_buffer(k))
        .map(|(k, v)| Ok((k, v.as_tensor().copy()?)))
        .collect()
}

fn evaluate_snapshot(
    model: &LoadedModel,
    pairs_data: &dyn FaceSource,
    pairs: &[(u32, u32, bool)],
    cfg: &FinetuneConfig,
    dev: &Device,
    step: u64,
) -> Result<Snapshot, TrainError> {
    let emb = embed_all(model, pairs_data, cfg.eval_batch, true, dev, &|_, _| {})?;
    let result = verify(&emb, model.card.embedding_size, pairs, &cfg.fprs)?;
    let score = cfg.select.score(&result);
    Ok(Snapshot {
        step,
        result,
        score,
    })
}

/// Reads image `i` of `src` into `out` at `h`x`w`: non-face images come from anywhere, so
/// other sizes are resized (bilinear, half-pixel centres) rather than refused.
fn read_resized(
    src: &dyn FaceSource,
    i: usize,
    (h, w): (usize, usize),
    out: &mut [u8],
) -> Result<(), TrainError> {
    let (sh, sw, _) = src.image_shape();
    if (sh, sw) == (h, w) {
        return src.read_image(i, out);
    }
    let mut img = vec![0u8; sh * sw * 3];
    src.read_image(i, &mut img)?;
    crate::data::align::resize_bilinear(&img, sh, sw, out, h, w);
    Ok(())
}

/// Runs BatchNorm fine-tuning of `model` on `data` (with `ood` images for
/// [`Mix::OutOfDomain`]), evaluating snapshots on `pairs` of `pairs_data`. On return the
/// model holds the best snapshot's running statistics; no other variable has changed.
#[allow(clippy::too_many_arguments)]
pub fn bn_finetune(
    model: &LoadedModel,
    data: &dyn FaceSource,
    ood: Option<&dyn FaceSource>,
    pairs_data: &dyn FaceSource,
    pairs: &[(u32, u32, bool)],
    cfg: &FinetuneConfig,
    dev: &Device,
    on_snapshot: &dyn Fn(&Snapshot, u64),
    cancelled: &dyn Fn() -> bool,
) -> Result<Finetuned, TrainError> {
    let n = data.len();
    if n == 0 {
        return Err(TrainError::Invalid("the fine-tuning set is empty".into()));
    }
    if cfg.batch_size < 2 {
        return Err(TrainError::Invalid(
            "batch_size must be at least 2 (BatchNorm)".into(),
        ));
    }
    let ood = match (&cfg.mix, ood) {
        (Mix::OutOfDomain { .. }, None) => {
            return Err(TrainError::Invalid(
                "mix out-of-domain needs the `ood` input (non-face images)".into(),
            ))
        }
        (Mix::OutOfDomain { .. }, Some(o)) if o.is_empty() => {
            return Err(TrainError::Invalid("the `ood` input is empty".into()))
        }
        (Mix::OutOfDomain { .. }, Some(o)) => Some(o),
        _ => None,
    };
    let (h, w, _) = data.image_shape();
    let arch = &model.card.architecture;
    let (size, norm) = (arch.input_size(), arch.normalisation());
    let bs = cfg.batch_size;
    let mut snapshots = vec![evaluate_snapshot(model, pairs_data, pairs, cfg, dev, 0)?];
    on_snapshot(&snapshots[0], cfg.steps);
    let mut best: Option<(usize, HashMap<String, Tensor>)> = if cfg.include_input {
        Some((0, buffers(model)?))
    } else {
        None
    };
    let mut order: (u64, Vec<usize>) = (u64::MAX, vec![]);
    for step in 0..cfg.steps {
        if cancelled() {
            return Err(TrainError::Interrupted);
        }
        let mut raw = Vec::with_capacity(bs);
        let mut flips = Vec::with_capacity(bs);
        for j in 0..bs as u64 {
            let g = step * bs as u64 + j;
            let epoch = g / n as u64;
            if order.0 != epoch {
                order = (epoch, epoch_order(n, cfg.seed, epoch));
            }
            let mut buf = vec![0u8; h * w * 3];
            let mut rng = stream(cfg.seed, MIX, g);
            match (&cfg.mix, ood) {
                (Mix::OutOfDomain { fraction }, Some(o)) if rng.uniform() < *fraction => {
                    read_resized(o, rng.below(o.len()), (h, w), &mut buf)?;
                }
                (Mix::Blur { fraction, sigma }, _) => {
                    data.read_image(order.1[(g % n as u64) as usize], &mut buf)?;
                    if rng.uniform() < *fraction {
                        let s = sigma.0 + (sigma.1 - sigma.0) * rng.uniform();
                        buf = gaussian_blur(&buf, h, w, s * h as f64 / 112.0);
                    }
                }
                _ => data.read_image(order.1[(g % n as u64) as usize], &mut buf)?,
            }
            raw.push(buf);
            flips.push(cfg.flip && stream(cfg.seed, FLIP, g).next_u64() & 1 == 1);
        }
        let mut x = batch_tensor(&raw, (h, w), &flips, size, norm, dev)?;
        if let Mix::Noise { fraction } = cfg.mix {
            let k = ((fraction * bs as f64).round() as usize).max(1);
            let mut rng = stream(cfg.seed, NOISE, step);
            let v: Vec<f32> = (0..k * 3 * size * size)
                .map(|_| rng.normal() as f32)
                .collect();
            let noise = Tensor::from_vec(v, (k, 3, size, size), dev)?;
            x = Tensor::cat(&[&x, &noise], 0)?;
        }
        // Training-mode forward: BatchNorm uses and accumulates batch statistics. No backward.
        drop(model.backbone.forward(&x, true)?);
        let done = step + 1;
        if done % cfg.snapshot_every == 0 || done == cfg.steps {
            let s = evaluate_snapshot(model, pairs_data, pairs, cfg, dev, done)?;
            on_snapshot(&s, cfg.steps);
            let better = match &best {
                None => true,
                Some((b, _)) => s.score > snapshots[*b].score,
            };
            snapshots.push(s);
            if better {
                best = Some((snapshots.len() - 1, buffers(model)?));
            }
        }
    }
    let best = match best {
        Some((i, stats)) => {
            model.store.assign("", &stats, "best snapshot", true)?;
            i
        }
        None => 0,
    };
    Ok(Finetuned { snapshots, best })
}

const MIXES: &[&str] = &["none", "blur", "noise", "out-of-domain"];
const SELECTS: &[&str] = &["auc", "accuracy", "tpr"];

fn params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::with_default(
            "mix",
            ParamType::Enum(MIXES),
            json!("none"),
            "what is mixed into the batches",
        ),
        ParamSpec::with_default(
            "fraction",
            ParamType::Float,
            json!(0.05),
            "blur/out-of-domain: probability per image; noise: extra tensors per batch image",
        ),
        ParamSpec::with_default(
            "sigma_min",
            ParamType::Float,
            json!(3.0),
            "blur: smallest σ, pixels at 112x112 (scaled by image side/112)",
        ),
        ParamSpec::with_default(
            "sigma_max",
            ParamType::Float,
            json!(5.0),
            "blur: largest σ, pixels at 112x112",
        ),
        ParamSpec::with_default(
            "epochs",
            ParamType::Float,
            json!(1.0),
            "passes over the data set (unless steps > 0)",
        ),
        ParamSpec::with_default(
            "steps",
            ParamType::Int,
            json!(0),
            "batches (overrides epochs)",
        ),
        ParamSpec::with_default("batch_size", ParamType::Int, json!(64), "images per batch"),
        ParamSpec::with_default(
            "snapshot_every",
            ParamType::Int,
            json!(10),
            "evaluate a snapshot every N steps (and after the last)",
        ),
        ParamSpec::with_default(
            "select",
            ParamType::Enum(SELECTS),
            json!("auc"),
            "snapshot ranking on the held-out pairs",
        ),
        ParamSpec::with_default(
            "select_fpr",
            ParamType::Float,
            json!(1e-2),
            "select tpr: the FPR",
        ),
        ParamSpec::with_default(
            "include_input",
            ParamType::Bool,
            json!(false),
            "the input model (step 0) may win the selection",
        ),
        ParamSpec::with_default(
            "fprs",
            ParamType::List(Box::new(ParamType::Float)),
            json!([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]),
            "FPR targets reported (those below 1 / impostor pairs are dropped)",
        ),
        ParamSpec::with_default(
            "flip",
            ParamType::Bool,
            json!(true),
            "random horizontal flip",
        ),
        ParamSpec::with_default(
            "seed",
            ParamType::Int,
            json!(0),
            "seed of order, flips and mixing",
        ),
        ParamSpec::with_default(
            "eval_batch_size",
            ParamType::Int,
            json!(64),
            "images per forward pass when evaluating",
        )
        .volatile(),
    ]
}

fn check(p: &BTreeMap<String, Value>) -> Result<(), String> {
    let f = |k: &str| p.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let i = |k: &str| p.get(k).and_then(Value::as_i64).unwrap_or(0);
    let fraction = f("fraction");
    if !(fraction > 0.0 && fraction <= 0.5) {
        return Err(format!("fraction {fraction} must lie in (0, 0.5]"));
    }
    if !(f("sigma_min") > 0.0 && f("sigma_max") >= f("sigma_min") && f("sigma_max") <= 50.0) {
        return Err("need 0 < sigma_min <= sigma_max <= 50".into());
    }
    if i("batch_size") < 2 {
        return Err("batch_size must be at least 2 (BatchNorm)".into());
    }
    if i("snapshot_every") < 1 {
        return Err("snapshot_every must be at least 1".into());
    }
    if f("epochs") <= 0.0 && i("steps") <= 0 {
        return Err("give epochs > 0 or steps > 0".into());
    }
    let fprs = p
        .get("fprs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if fprs.is_empty()
        || fprs
            .iter()
            .any(|v| !v.as_f64().is_some_and(|x| x > 0.0 && x < 1.0))
    {
        return Err("fprs must be a non-empty list of rates in (0, 1)".into());
    }
    if !(f("select_fpr") > 0.0 && f("select_fpr") < 1.0) {
        return Err("select_fpr must lie in (0, 1)".into());
    }
    Ok(())
}

/// The FPR targets resolvable with `impostors` impostor pairs (at least 1/impostors).
pub fn available_fprs(fprs: &[f64], impostors: usize) -> Vec<f64> {
    let min = 1.0 / impostors.max(1) as f64;
    fprs.iter()
        .copied()
        .filter(|&f| f >= min * (1.0 - 1e-9))
        .collect()
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
            params: params(),
        }
    }
    fn check_params(&self, p: &BTreeMap<String, Value>) -> Result<(), String> {
        check(p)
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let dev = parse_device(&ctx.device)?;
        let model_dir = ctx.input("model")?.to_path_buf();
        let model = super::artifact::load_model(&model_dir, &dev)?;
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
        let fraction = ctx.param_f64("fraction")?;
        let mix = match ctx.param_str("mix")? {
            "blur" => Mix::Blur {
                fraction,
                sigma: (ctx.param_f64("sigma_min")?, ctx.param_f64("sigma_max")?),
            },
            "noise" => Mix::Noise { fraction },
            "out-of-domain" => Mix::OutOfDomain { fraction },
            _ => Mix::None,
        };
        let select = match ctx.param_str("select")? {
            "accuracy" => Select::Accuracy,
            "tpr" => Select::Tpr(ctx.param_f64("select_fpr")?),
            _ => Select::Auc,
        };
        let requested: Vec<f64> = ctx
            .param("fprs")?
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let impostors = pairs.iter().filter(|p| !p.2).count();
        let fprs = available_fprs(&requested, impostors);
        if fprs.len() < requested.len() {
            ctx.log(&format!(
                "{impostors} impostor pairs: TPR reported at FPR {fprs:?} only"
            ));
        }
        let bs = ctx.param_i64("batch_size")?.max(2) as usize;
        let steps = match ctx.param_i64("steps")? {
            s if s > 0 => s as u64,
            _ => (ctx.param_f64("epochs")? * data.len() as f64 / bs as f64)
                .ceil()
                .max(1.0) as u64,
        };
        let cfg = FinetuneConfig {
            mix,
            steps,
            batch_size: bs,
            snapshot_every: ctx.param_i64("snapshot_every")?.max(1) as u64,
            select,
            include_input: ctx.param_bool("include_input")?,
            flip: ctx.param_bool("flip")?,
            seed: ctx.param_i64("seed")? as u64,
            fprs,
            eval_batch: ctx.param_i64("eval_batch_size")?.max(1) as usize,
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
            "mix": ctx.param_str("mix")?,
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
        write_report(ctx.output("report")?, &out, &cfg)?;
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
    let mut cv = Canvas::new(480, 360);
    cv.chart(
        &[Series {
            points: &pts,
            color: [30, 90, 200],
        }],
        false,
    );
    cv.save(&dir.join("snapshots.png"))?;
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
