//! The training loop shared by `train` and `distil`: seeded batches from a [`FaceSource`],
//! backbone + objective (margin head, softmax, centre or triplet loss: see
//! [`crate::loss::objective`]), + α · angular distillation against a fixed teacher,
//! SGD-momentum or AdamW, polynomial decay with warm-up, gradient clipping, checkpoints in the
//! scratch area and resume from the last one.
//!
//! Every random choice (batch composition, flips, PartialFC samples) is a function of the seed
//! and the step, so a resumed run sees exactly the batches the uninterrupted run would have.

pub use super::loader::batch_tensor;
use super::loader::{with_loader, Batch, BatchPlan};
use super::optim::{clip_grad_norm, Optimizer, OptimizerKind, ParamEntry, PolySchedule};
use super::reactivation::{FilterEpoch, ReactivationConfig, Reactivator};
use super::sampler::BatchSampler;
use super::{load_model_weights, FaceSource, TrainError};
use crate::loss::objective::{Objective, ObjectiveConfig};
use crate::loss::{angular_distillation, MarginConfig};
use crate::models::{is_buffer, Backbone, BackboneConfig, ParamStore};
use crate::util::rng::stream;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Hyper-parameters of a training run (everything that shapes the result).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Student backbone.
    pub backbone: BackboneConfig,
    /// Margin head (used by the margin objective).
    pub margin: MarginConfig,
    /// Training objective: margin head, softmax, centre or triplet loss.
    #[serde(default)]
    pub objective: ObjectiveConfig,
    /// PartialFC sample rate (1 = every class every step).
    pub sample_rate: f64,
    /// SGD (momentum) or AdamW.
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay (every parameter unless `no_decay_bn` is set).
    pub weight_decay: f64,
    /// Exempt BN and PReLU parameters from weight decay (arcface_torch decays everything).
    pub no_decay_bn: bool,
    /// Total optimiser steps.
    pub steps: u64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// Gradient-norm clip on the backbone (0 = off; arcface_torch: 5).
    pub grad_clip: f64,
    /// Random horizontal flip with p = 0.5.
    pub flip: bool,
    /// Seed of initialisation, order, flips and sampling.
    pub seed: u64,
    /// Weight α of the angular distillation term (used with a teacher).
    pub distil_alpha: f64,
    /// Reactivation of inactive first-layer filters (CRAFT); `none` records the history only.
    #[serde(default)]
    pub reactivation: ReactivationConfig,
}

impl TrainConfig {
    /// `steps` of arcface_torch's recipe for `backbone`: ArcFace (s 64, m 0.5) over every
    /// class, SGD lr 0.1 momentum 0.9 weight decay 5e-4 on every parameter, gradient clip 5,
    /// random flips, batch 128, no warm-up, seed 0, no distillation or reactivation. Callers
    /// change what they need with struct-update syntax.
    pub fn arcface_torch(backbone: BackboneConfig, steps: u64) -> Self {
        TrainConfig {
            backbone,
            margin: MarginConfig::arcface(),
            objective: ObjectiveConfig::default(),
            sample_rate: 1.0,
            optimizer: OptimizerKind::Sgd,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            no_decay_bn: false,
            steps,
            warmup_steps: 0,
            batch_size: 128,
            grad_clip: 5.0,
            flip: true,
            seed: 0,
            distil_alpha: 0.0,
            reactivation: ReactivationConfig::default(),
        }
    }
}

/// A fixed teacher for distillation.
pub struct Teacher {
    /// Its backbone (eval mode).
    pub model: Backbone,
    /// Its configuration (input size and normalisation).
    pub config: BackboneConfig,
}

/// Where the run starts from and reports to.
pub struct RunEnv<'a> {
    /// Compute device.
    pub device: Device,
    /// Persistent checkpoint directory.
    pub scratch: PathBuf,
    /// Checkpoint every this many steps (0 = never).
    pub checkpoint_every: u64,
    /// Initial backbone weights (a model artifact directory or a `.pth`).
    pub init: Option<PathBuf>,
    /// Teacher for distillation.
    pub teacher: Option<Teacher>,
    /// Called after every step: (step done, total, loss, lr, images/s).
    pub on_step: &'a (dyn Fn(u64, u64, f64, f64, f64) + Sync),
    /// Polled before every step; true stops with [`TrainError::Interrupted`].
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Stop (as if killed) after this many steps of this invocation: tests of resume.
    pub stop_after: Option<u64>,
}

/// One row of the loss/lr curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// 0-based step.
    pub step: u64,
    /// Total loss of the step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// The objective's per-step extra (SphereFace λ, centre distance, active-triplet
    /// fraction), if it has one.
    pub extra: Option<f64>,
}

/// Result of a finished (or stopped) run.
pub struct Trained {
    /// Backbone variables under `backbone.`, class centres as `head.weight`.
    pub store: ParamStore,
    /// Loss and lr per step, from step 0 (including steps before a resume).
    pub curve: Vec<CurvePoint>,
    /// Step the run resumed at (0 if it started fresh).
    pub resumed_at: u64,
    /// Steps completed.
    pub steps_done: u64,
    /// First-layer filter history, one row per completed epoch.
    pub reactivation: Vec<FilterEpoch>,
}

const CKPT: &str = "checkpoint.safetensors";

// Stream 1 (epoch order) and 4, 5 (identity batches) are the sampler's, 2 the loader's flips.
const SAMPLE: u64 = 3;

/// Seeded permutation of `0..n` for `epoch`: the order the epoch sampler uses.
pub(crate) fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    super::sampler::epoch_order(n, seed, super::sampler::ORDER, epoch)
}

/// Builds the student and its objective in a fresh store (seeded), optionally loading initial
/// weights.
pub fn build_student(
    cfg: &TrainConfig,
    classes: usize,
    dev: &Device,
    init: Option<&Path>,
) -> Result<(ParamStore, Backbone, Objective), TrainError> {
    let store = ParamStore::new(cfg.seed);
    let vb = store.vb(dev);
    let backbone = Backbone::new(&cfg.backbone, vb.pp("backbone"))?;
    if let Some(p) = init {
        load_model_weights(&store, "backbone.", p)?;
    }
    let emb = cfg.backbone.embedding_size();
    let objective = Objective::build(
        &cfg.objective,
        &cfg.margin,
        cfg.sample_rate,
        &store,
        classes,
        emb,
        dev,
    )?;
    Ok((store, backbone, objective))
}

/// Optimiser groups: every non-buffer, non-frozen variable that is not loss state (centres);
/// BN/PReLU without decay when asked.
fn param_groups(store: &ParamStore, cfg: &TrainConfig) -> Vec<ParamEntry> {
    store
        .vars()
        .into_iter()
        .filter(|(k, _)| !is_buffer(k) && !Objective::is_state(k))
        .filter(|(k, _)| {
            !k.strip_prefix("backbone.")
                .is_some_and(|n| cfg.backbone.frozen(n))
        })
        .map(|(name, var)| {
            // 1-D tensors of the backbone are BN γ/β, PReLU slopes and biases.
            let exempt = cfg.no_decay_bn && name.starts_with("backbone.") && var.rank() == 1;
            ParamEntry {
                weight_decay: if exempt { 0.0 } else { cfg.weight_decay },
                name,
                var,
            }
        })
        .collect()
}

fn save_checkpoint(
    dir: &Path,
    store: &ParamStore,
    opt: &Optimizer,
    curve: &[CurvePoint],
    step: u64,
) -> Result<(), TrainError> {
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in store.vars() {
        t.insert(format!("p.{k}"), v.as_tensor().clone());
    }
    for (k, v) in opt.state()? {
        t.insert(format!("o.{k}"), v);
    }
    let flat: Vec<f64> = curve
        .iter()
        .flat_map(|c| [c.step as f64, c.loss, c.lr, c.extra.unwrap_or(f64::NAN)])
        .collect();
    let cpu = Device::Cpu;
    if !flat.is_empty() {
        t.insert(
            "curve".into(),
            Tensor::from_vec(flat, (curve.len(), 4), &cpu)?,
        );
    }
    t.insert("step".into(), Tensor::new(&[step as f64], &cpu)?);
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{CKPT}.tmp"));
    candle_core::safetensors::save(&t, &tmp)?;
    // Rename is atomic: a kill mid-write leaves the previous checkpoint intact.
    std::fs::rename(&tmp, dir.join(CKPT))?;
    Ok(())
}

/// Loads the checkpoint in `dir` if there is one; returns (step, curve).
fn load_checkpoint(
    dir: &Path,
    store: &ParamStore,
    opt: &mut Optimizer,
    dev: &Device,
) -> Result<Option<(u64, Vec<CurvePoint>)>, TrainError> {
    let path = dir.join(CKPT);
    if !path.exists() {
        return Ok(None);
    }
    let t = candle_core::safetensors::load(&path, dev)?;
    let mut params = HashMap::new();
    let mut ostate = HashMap::new();
    for (k, v) in &t {
        if let Some(n) = k.strip_prefix("p.") {
            params.insert(n.to_string(), v.clone());
        } else if let Some(n) = k.strip_prefix("o.") {
            ostate.insert(n.to_string(), v.clone());
        }
    }
    store.assign("", &params, &path.display().to_string(), false)?;
    opt.load_state(&ostate)?;
    let step = match t.get("step") {
        Some(s) => s.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as u64,
        None => return Err(TrainError::Invalid(format!("{}: no step", path.display()))),
    };
    let curve = match t.get("curve") {
        Some(c) => c
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?
            .into_iter()
            .map(|r| CurvePoint {
                step: r[0] as u64,
                loss: r[1],
                lr: r[2],
                extra: r.get(3).copied().filter(|v| !v.is_nan()),
            })
            .collect(),
        None => vec![],
    };
    Ok(Some((step, curve)))
}

/// Runs (or resumes) training of `cfg` on `data`.
pub fn train(
    cfg: &TrainConfig,
    data: &dyn FaceSource,
    env: &RunEnv,
) -> Result<Trained, TrainError> {
    let n = data.len();
    if n == 0 {
        return Err(TrainError::Invalid("the training set is empty".into()));
    }
    if cfg.batch_size < 2 {
        return Err(TrainError::Invalid(
            "batch_size must be at least 2 (BatchNorm)".into(),
        ));
    }
    let classes = data.num_classes();
    let dev = &env.device;
    let (store, backbone, objective) = build_student(cfg, classes, dev, env.init.as_deref())?;
    let params = param_groups(&store, cfg);
    let clip_vars: Vec<_> = params
        .iter()
        .filter(|p| p.name.starts_with("backbone."))
        .map(|p| p.var.clone())
        .collect();
    let mut opt = match cfg.optimizer {
        OptimizerKind::Sgd => Optimizer::sgd(params, cfg.momentum),
        OptimizerKind::Adamw => Optimizer::adamw(params),
    };
    let sched = PolySchedule {
        base_lr: cfg.lr,
        warmup: cfg.warmup_steps,
        total: cfg.steps,
        power: 1.0,
    };
    let (mut step, mut curve) = match load_checkpoint(&env.scratch, &store, &mut opt, dev)? {
        Some((s, c)) => (s, c),
        None => (0, vec![]),
    };
    let mut react = Reactivator::new(&cfg.reactivation, &store.vars(), cfg.seed)
        .map_err(TrainError::Invalid)?;
    react.history = load_history(&env.scratch, step * cfg.batch_size as u64 / n as u64)?;
    curve.truncate(step as usize);
    let resumed_at = step;
    let (h, w, _) = data.image_shape();
    let size = cfg.backbone.input_size();
    let norm = cfg.backbone.normalisation();
    let bs = cfg.batch_size;
    let sampler = match cfg.objective {
        ObjectiveConfig::Triplet { per_identity, .. } => {
            BatchSampler::identities(data, bs / per_identity.max(1), per_identity, cfg.seed)?
        }
        _ => BatchSampler::epochs(n, bs, cfg.seed),
    };
    let mut done_here = 0u64;
    let start = Instant::now();
    let plan = BatchPlan {
        flip: cfg.flip,
        seed: cfg.seed,
        size,
        norm,
        batch_size: bs,
    };
    // Two batches ahead: the next one is read while this step computes.
    with_loader(data, sampler, &plan, (step, cfg.steps), 2, dev, |batches| {
        while step < cfg.steps {
            if (env.cancelled)() {
                return Err(TrainError::Interrupted);
            }
            if env.stop_after.is_some_and(|s| done_here >= s) {
                break;
            }
            let Batch {
                step: loaded,
                labels,
                flips,
                raw,
                x,
                ..
            } = batches
                .recv()
                .map_err(|_| TrainError::Invalid("the batch loader ended early".into()))??;
            debug_assert_eq!(loaded, step, "the loader hands out batches in step order");
            let emb = backbone.forward(&x, true)?;
            let mut rng = stream(cfg.seed, SAMPLE, step);
            let out = objective.loss(&emb, &labels, step, &mut rng)?;
            let mut loss = out.loss;
            if let Some(t) = &env.teacher {
                let tx = if t.config.input_size() == size && t.config.normalisation() == norm {
                    x.clone()
                } else {
                    batch_tensor(
                        &raw,
                        (h, w),
                        &flips,
                        t.config.input_size(),
                        t.config.normalisation(),
                        dev,
                    )?
                };
                let te = t.model.forward(&tx, false)?.detach();
                loss = (loss + (angular_distillation(&emb, &te)? * cfg.distil_alpha)?)?;
            }
            let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !lv.is_finite() {
                return Err(TrainError::NonFinite { step, loss: lv });
            }
            let lr = sched.lr(step);
            let mut grads = loss.backward()?;
            if cfg.grad_clip > 0.0 {
                clip_grad_norm(&mut grads, &clip_vars, cfg.grad_clip)?;
            }
            opt.step(&grads, lr)?;
            react.after_step(step, cfg.steps, bs, n, &mut |name, rows| {
                opt.reset_rows(name, rows)
            })?;
            objective.after_step(&emb, &labels)?;
            curve.push(CurvePoint {
                step,
                loss: lv,
                lr,
                extra: out.extra,
            });
            step += 1;
            done_here += 1;
            let ips = (done_here * bs as u64) as f64 / start.elapsed().as_secs_f64().max(1e-9);
            (env.on_step)(step, cfg.steps, lv, lr, ips);
            if env.checkpoint_every > 0 && step % env.checkpoint_every == 0 && step < cfg.steps {
                save_history(&env.scratch, &react.history)?;
                save_checkpoint(&env.scratch, &store, &opt, &curve, step)?;
            }
        }
        Ok(())
    })?;
    Ok(Trained {
        store,
        curve,
        resumed_at,
        steps_done: step,
        reactivation: react.history,
    })
}

const HISTORY: &str = "reactivation.json";

/// Writes the filter history beside the checkpoint (before it, so a checkpoint never lacks
/// the history of its own epochs).
fn save_history(dir: &Path, history: &[FilterEpoch]) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{HISTORY}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(history)?)?;
    std::fs::rename(&tmp, dir.join(HISTORY))?;
    Ok(())
}

/// The saved history up to `epochs` completed epochs (the checkpoint's), or empty.
fn load_history(dir: &Path, epochs: u64) -> Result<Vec<FilterEpoch>, TrainError> {
    let path = dir.join(HISTORY);
    if epochs == 0 || !path.exists() {
        return Ok(vec![]);
    }
    let mut h: Vec<FilterEpoch> = serde_json::from_slice(&std::fs::read(&path)?)?;
    h.retain(|e| e.epoch <= epochs);
    Ok(h)
}
