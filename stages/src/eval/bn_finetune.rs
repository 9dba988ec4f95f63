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

use super::verify::{verify, EvalResult};
use super::EvalError;
use crate::models::is_buffer;
use crate::train::artifact::LoadedModel;
use crate::train::embed::embed_all;
use crate::train::trainer::{batch_tensor, epoch_order};
use crate::train::FaceSource;
use crate::util::rng::stream;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

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
            Select::Tpr(f) => crate::eval::metrics::tpr_at_fpr(
                &crate::eval::metrics::Roc {
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
fn buffers(model: &LoadedModel) -> Result<HashMap<String, Tensor>, EvalError> {
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
) -> Result<Snapshot, EvalError> {
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
) -> Result<(), EvalError> {
    let (sh, sw, _) = src.image_shape();
    if (sh, sw) == (h, w) {
        return Ok(src.read_image(i, out)?);
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
) -> Result<Finetuned, EvalError> {
    let n = data.len();
    if n == 0 {
        return Err(EvalError::Config("the fine-tuning set is empty".into()));
    }
    if cfg.batch_size < 2 {
        return Err(EvalError::Config(
            "batch_size must be at least 2 (BatchNorm)".into(),
        ));
    }
    let ood = match (&cfg.mix, ood) {
        (Mix::OutOfDomain { .. }, None) => {
            return Err(EvalError::Config(
                "mix out-of-domain needs the `ood` input (non-face images)".into(),
            ))
        }
        (Mix::OutOfDomain { .. }, Some(o)) if o.is_empty() => {
            return Err(EvalError::Config("the `ood` input is empty".into()))
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
            return Err(EvalError::Interrupted);
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

/// The FPR targets resolvable with `impostors` impostor pairs (at least 1/impostors).
pub fn available_fprs(fprs: &[f64], impostors: usize) -> Vec<f64> {
    let min = 1.0 / impostors.max(1) as f64;
    fprs.iter()
        .copied()
        .filter(|&f| f >= min * (1.0 - 1e-9))
        .collect()
}
