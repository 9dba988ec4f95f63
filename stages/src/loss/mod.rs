//! Margin-based softmax losses (insightface arcface_torch `losses.py`, `partial_fc_v2.py`) and
//! angular distillation (VarGFaceNet).
//!
//! Logits are `s · cos θ` with `cos θ = normalize(x) · normalize(W)ᵀ` clamped to [-1, 1]; the
//! target class gets the combined margin `cos(m1·θ + m2) − m3`. Two ArcFace variants:
//! [`MarginVariant::StraightThrough`] (current arcface_torch: the margin is added under
//! no-grad, the gradient passes as if d/dcos = 1) and [`MarginVariant::Differentiable`]
//! (earlier arcface_torch, MagFace: `cosθ·cos m − sinθ·sin m` with the threshold or easy-margin
//! fallback). SphereFace (m1 ≠ 1, integer or real) uses the monotone
//! ψ(θ) = (−1)^k cos(m1·θ + m2) − 2k, k = ⌊(m1·θ + m2)/π⌋, blended with cos θ by the annealed λ
//! of the SphereFace paper ([`LambdaSchedule`]).
//!
//! The other objectives of `train`: plain and centre-loss softmax ([`softmax`]), triplet loss
//! with online mining ([`triplet`]); [`objective`] puts them behind one interface for the
//! training loop.

pub mod objective;
pub mod softmax;
pub mod triplet;

use crate::util::rng::SplitMix;
use candle_core::{DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Errors in a margin configuration.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// The combination of margins cannot be trained.
    #[error("margin configuration: {0}")]
    Config(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// How the additive angular margin (m2) reaches the gradient.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MarginVariant {
    /// Forward value `cos(m1θ + m2) − m3`, gradient as if the margin were a constant (current
    /// arcface_torch `CombinedMarginLoss`).
    StraightThrough,
    /// Fully differentiable `cosθ·cos m − sinθ·sin m`; where θ + m would pass π the target
    /// falls back to `cosθ − sin(π − m)·m` (monotone), or to `cosθ` for θ > π/2 with easy
    /// margin.
    Differentiable,
    /// Differentiable with easy margin.
    EasyMargin,
}

/// Combined margin head configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MarginConfig {
    /// Scale s (64).
    pub s: f64,
    /// Multiplicative angular margin (SphereFace); real, in (0, 8]; 1 = none.
    pub m1: f64,
    /// Additive angular margin (ArcFace).
    pub m2: f64,
    /// Additive cosine margin (CosFace).
    pub m3: f64,
    /// Gradient treatment of the angular margin.
    pub variant: MarginVariant,
    /// Inter-class filtering: non-target cosines above this are zeroed (0 = off).
    pub interclass_threshold: f64,
    /// SphereFace (m1 ≠ 1): the annealed blend of cos θ into the target logit; `None` trains
    /// with ψ(θ) alone (λ = 0).
    #[serde(default)]
    pub sphere_lambda: Option<LambdaSchedule>,
}

/// SphereFace's annealed softmax blend: the target logit is `(λ·cosθ + ψ(θ))/(1 + λ)` with
/// `λ = max(λ_min, base·(1 + γ·iter)^(−power))` (the reference Caffe `MarginInnerProduct`
/// defaults base 1000, γ 0.12, power 1, λ_min 5).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct LambdaSchedule {
    /// λ at iteration 0.
    pub base: f64,
    /// Decay rate γ.
    pub gamma: f64,
    /// Decay power.
    pub power: f64,
    /// Floor λ_min.
    pub min: f64,
}

impl Default for LambdaSchedule {
    fn default() -> Self {
        LambdaSchedule {
            base: 1000.0,
            gamma: 0.12,
            power: 1.0,
            min: 5.0,
        }
    }
}

impl LambdaSchedule {
    /// λ at 0-based iteration `iter`.
    pub fn at(&self, iter: u64) -> f64 {
        (self.base * (1.0 + self.gamma * iter as f64).powf(-self.power)).max(self.min)
    }
}

impl MarginConfig {
    /// ArcFace (1, 0.5, 0), s = 64.
    pub fn arcface() -> Self {
        MarginConfig {
            s: 64.0,
            m1: 1.0,
            m2: 0.5,
            m3: 0.0,
            variant: MarginVariant::StraightThrough,
            interclass_threshold: 0.0,
            sphere_lambda: None,
        }
    }
    /// CosFace (1, 0, 0.4), s = 64.
    pub fn cosface() -> Self {
        MarginConfig {
            m2: 0.0,
            m3: 0.4,
            ..Self::arcface()
        }
    }
    /// SphereFace's λ at iteration `iter` (0 when m1 = 1 or without a schedule).
    pub fn lambda_at(&self, iter: u64) -> f64 {
        match &self.sphere_lambda {
            Some(l) if self.m1 != 1.0 => l.at(iter),
            _ => 0.0,
        }
    }
    /// Normalised softmax (1, 0, 0), s = 64: features and weights normalised, no margin.
    pub fn norm_softmax() -> Self {
        MarginConfig {
            m2: 0.0,
            ..Self::arcface()
        }
    }
    /// Checks that the margins can be trained: s > 0, m1 in (0, 8] (real values allowed: ψ
    /// needs only k = ⌊(m1·θ + m2)/π⌋; the ArcFace paper's CM2 uses m1 = 0.9), margins
    /// non-negative, λ schedule non-negative.
    pub fn validate(&self) -> std::result::Result<(), LossError> {
        if self.s.is_nan() || self.s <= 0.0 {
            return Err(LossError::Config(format!(
                "scale s must be > 0, got {}",
                self.s
            )));
        }
        if !(self.m1 > 0.0 && self.m1 <= 8.0) {
            return Err(LossError::Config(format!(
                "m1 must lie in (0, 8] (SphereFace's multiplicative angular margin), got {}",
                self.m1
            )));
        }
        if let Some(l) = &self.sphere_lambda {
            if [l.base, l.gamma, l.power, l.min]
                .iter()
                .any(|v| v.is_nan() || *v < 0.0)
            {
                return Err(LossError::Config(
                    "sphere_lambda_base, _gamma, _power and _min must be >= 0".into(),
                ));
            }
        }
        if self.m2 < 0.0 || self.m3 < 0.0 || self.m2 >= std::f64::consts::PI {
            return Err(LossError::Config(
                "m2 must lie in [0, π) and m3 must be >= 0".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.interclass_threshold) {
            return Err(LossError::Config(
                "interclass_threshold must lie in [0, 1) (0 turns it off)".into(),
            ));
        }
        Ok(())
    }
}

/// One-hot `[B, C]` of `labels` in `dtype`, built on the device: only the B labels are
/// uploaded, not the B x C matrix (44 MB a step at 85,000 classes and batch 128).
pub fn one_hot(labels: &[u32], classes: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        candle_core::bail!("label {l} out of range for {classes} classes");
    }
    let rows = Tensor::new(labels, dev)?.unsqueeze(1)?;
    let columns = Tensor::arange(0u32, classes as u32, dev)?.unsqueeze(0)?;
    rows.broadcast_eq(&columns)?.to_dtype(dtype)
}

/// Rows scaled to unit L2 norm (norm clamped at 1e-12 as `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&n)
}

/// SphereFace's ψ for target cosines `t` `[B]`: value `(−1)^k cos(φ) − 2k` with
/// `φ = m1·acos(t) + m2`, `k = ⌊φ/π⌋`, and gradient `dψ/dt = (−1)^k·m1·sin φ / sin θ`. candle has
/// no `acos`, so both are computed on the host in f64 and joined as `t·g + (ψ − t·g)` with
/// `g` and `ψ − t·g` held constant: the forward value is ψ, the gradient exactly ψ'(t).
fn sphere_psi(t: &Tensor, m1: f64, m2: f64) -> Result<Tensor> {
    let host: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
    // k never exceeds the last piece: θ ≤ π gives φ ≤ m1·π + m2.
    let k_max = ((m1 * std::f64::consts::PI + m2) / std::f64::consts::PI).ceil() - 1.0;
    let (mut val, mut grad) = (
        Vec::with_capacity(host.len()),
        Vec::with_capacity(host.len()),
    );
    for &c in &host {
        let c = c.clamp(-1.0, 1.0);
        let theta = c.acos();
        let phi = m1 * theta + m2;
        let k = (phi / std::f64::consts::PI).floor().min(k_max).max(0.0);
        let sign = if (k as u64).is_multiple_of(2) {
            1.0
        } else {
            -1.0
        };
        let sin_t = theta.sin();
        // Near θ = 0 with m2 = 0, sin(m1·θ)/sin θ → m1; elsewhere sin θ is kept off 0.
        let ratio = if sin_t < 1e-6 && m2 == 0.0 && theta < 1.0 {
            m1
        } else {
            phi.sin() / sin_t.max(1e-6)
        };
        val.push(sign * phi.cos() - 2.0 * k);
        grad.push(sign * m1 * ratio);
    }
    let dev = t.device();
    let g = Tensor::new(grad, dev)?.to_dtype(t.dtype())?;
    let v = Tensor::new(val, dev)?.to_dtype(t.dtype())?;
    let tg = t.mul(&g)?;
    let offset = (v - tg.detach())?.detach();
    tg + offset
}

/// Target-logit function f(t) (before scaling) for target cosines `t` `[B]`, with gradient;
/// `lambda` blends cos θ into SphereFace's ψ (unused when m1 = 1).
fn target_fn(t: &Tensor, cfg: &MarginConfig, lambda: f64) -> Result<Tensor> {
    if cfg.m1 != 1.0 {
        let psi = sphere_psi(t, cfg.m1, cfg.m2)?;
        let f = ((t * lambda)? + psi)? / (1.0 + lambda);
        return f? - cfg.m3;
    }
    if cfg.m2 == 0.0 {
        return t - cfg.m3;
    }
    let (cos_m, sin_m) = (cfg.m2.cos(), cfg.m2.sin());
    let sin_t = (1.0 - t.sqr()?)?.clamp(0.0, 1.0)?.sqrt()?;
    let cos_tm = ((t * cos_m)? - (sin_t * sin_m)?)?;
    let out = match cfg.variant {
        // cos(θ + m) for every θ, as arccos → +m → cos does.
        MarginVariant::StraightThrough => cos_tm,
        MarginVariant::Differentiable => {
            let th = (std::f64::consts::PI - cfg.m2).cos();
            let mm = (std::f64::consts::PI - cfg.m2).sin() * cfg.m2;
            let cond = t.gt(th)?;
            cond.where_cond(&cos_tm, &(t - mm)?)?
        }
        MarginVariant::EasyMargin => t.gt(0.0)?.where_cond(&cos_tm, t)?,
    };
    out - cfg.m3
}

/// Scaled logits `[B, C]` with the margin on each row's target class, at 0-based training
/// iteration `iter` (which sets SphereFace's λ).
pub fn margin_logits(
    cos: &Tensor,
    labels: &[u32],
    cfg: &MarginConfig,
    iter: u64,
) -> Result<Tensor> {
    let (_, c) = cos.dims2()?;
    let oh = one_hot(labels, c, cos.dtype(), cos.device())?;
    let mut cos = cos.clone();
    if cfg.interclass_threshold > 0.0 {
        // Non-target cosines above the threshold are likely label noise (the same identity
        // under two labels): zero them (mask under no-grad, as arcface_torch).
        let dirty = cos.gt(cfg.interclass_threshold)?.to_dtype(cos.dtype())?;
        let keep = (1.0 - (dirty * (1.0 - &oh)?)?)?;
        cos = (cos * keep.detach())?;
    }
    let t = (&cos * &oh)?.sum(1)?;
    let f = target_fn(&t, cfg, cfg.lambda_at(iter))?;
    let delta = (f - &t)?;
    // ψ is always differentiable: SphereFace's λ annealing exists to tame its gradient.
    let delta = match cfg.variant {
        MarginVariant::StraightThrough if cfg.m1 == 1.0 => delta.detach(),
        _ => delta,
    };
    let logits = (cos + oh.broadcast_mul(&delta.unsqueeze(1)?)?)?;
    logits * cfg.s
}

/// Mean softmax cross-entropy with max subtraction: `−mean log max(p_y, 1e-30)` (gradient
/// of the unclamped loss, as arcface_torch's `DistCrossEntropyFunc`).
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    let max = logits.max_keepdim(1)?.detach();
    let z = logits.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(1)?.log()?;
    let logp = z.broadcast_sub(&lse)?;
    let oh = one_hot(labels, c, logits.dtype(), logits.device())?;
    let lp = (logp * oh)?.sum(1)?;
    // Value clamped at p_y = 1e-30 as arcface_torch; its backward ignores the clamp
    // (softmax − one-hot for every row), so the gradient here does too.
    let clamped = lp.maximum(1e-30f64.ln())?;
    let lp = (&lp + (clamped - &lp)?.detach())?;
    (lp.sum_all()? * (-1.0 / b as f64))?.reshape(())
}

/// Angular distillation: `(1/N) Σ ‖t/‖t‖ − s/‖s‖‖²`; the teacher is detached.
pub fn angular_distillation(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let b = student.dim(0)?;
    let d = (l2_normalize(student)? - l2_normalize(&teacher.detach())?)?;
    (d.sqr()?.sum_all()? / b as f64)?.reshape(())
}

/// PartialFC v2 class sampling: every positive class of the batch plus random negatives up to
/// `⌊rate·classes⌋` in all (never fewer than the positives), sorted. Returns the sampled class
/// ids and the labels remapped into them.
pub fn partial_fc_sample(
    labels: &[u32],
    classes: usize,
    rate: f64,
    rng: &mut SplitMix,
) -> (Vec<u32>, Vec<u32>) {
    let mut positive: Vec<u32> = labels.to_vec();
    positive.sort_unstable();
    positive.dedup();
    let num_sample = ((rate * classes as f64) as usize).min(classes);
    let index: Vec<u32> = if num_sample <= positive.len() {
        positive
    } else {
        // Same rule as arcface_torch: random priorities, positives forced to the top.
        let mut pri: Vec<(f64, u32)> = (0..classes as u32).map(|c| (rng.uniform(), c)).collect();
        for &p in &positive {
            pri[p as usize].0 = 2.0;
        }
        pri.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut idx: Vec<u32> = pri[..num_sample].iter().map(|p| p.1).collect();
        idx.sort_unstable();
        idx
    };
    let remapped = labels
        .iter()
        .map(|l| index.binary_search(l).unwrap_or(0) as u32)
        .collect();
    (index, remapped)
}

/// The margin head: class-centre matrix `W [classes, emb]` (N(0, 0.01)), the combined margin
/// and optional PartialFC sampling.
pub struct MarginHead {
    /// Class centres, a trainable variable.
    pub weight: Var,
    /// Margins.
    pub cfg: MarginConfig,
    /// PartialFC sample rate (1 = all classes every step).
    pub sample_rate: f64,
}

impl MarginHead {
    /// Head over the variable `weight` (`[classes, emb]`).
    pub fn new(
        weight: Var,
        cfg: MarginConfig,
        sample_rate: f64,
    ) -> std::result::Result<Self, LossError> {
        cfg.validate()?;
        if !(sample_rate > 0.0 && sample_rate <= 1.0) {
            return Err(LossError::Config("sample_rate must lie in (0, 1]".into()));
        }
        Ok(MarginHead {
            weight,
            cfg,
            sample_rate,
        })
    }

    /// Cosines `[B, K]` of the embeddings to the (sampled) centres, clamped to [-1, 1].
    pub fn cosines(&self, emb: &Tensor, centres: &Tensor) -> Result<Tensor> {
        let x = l2_normalize(emb)?;
        let w = l2_normalize(centres)?;
        x.matmul(&w.t()?)?.clamp(-1.0, 1.0)
    }

    /// Loss of a batch at iteration 0; `rng` drives PartialFC sampling (unused at rate 1).
    pub fn loss(&self, emb: &Tensor, labels: &[u32], rng: &mut SplitMix) -> Result<Tensor> {
        self.loss_at(emb, labels, rng, 0)
    }

    /// Loss of a batch at 0-based iteration `iter` (SphereFace's λ depends on it).
    pub fn loss_at(
        &self,
        emb: &Tensor,
        labels: &[u32],
        rng: &mut SplitMix,
        iter: u64,
    ) -> Result<Tensor> {
        let classes = self.weight.dim(0)?;
        let (w, labels) = if self.sample_rate < 1.0 {
            let (idx, remapped) = partial_fc_sample(labels, classes, self.sample_rate, rng);
            let idx = Tensor::new(idx, self.weight.device())?;
            (self.weight.as_tensor().index_select(&idx, 0)?, remapped)
        } else {
            (self.weight.as_tensor().clone(), labels.to_vec())
        };
        let cos = self.cosines(emb, &w)?;
        let logits = margin_logits(&cos, &labels, &self.cfg, iter)?;
        cross_entropy(&logits, &labels)
    }
}
