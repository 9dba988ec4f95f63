//! Margin-based softmax losses (insightface arcface_torch `losses.py`, `partial_fc_v2.py`) and
//! angular distillation (VarGFaceNet).
//!
//! Logits are `s · cos θ` with `cos θ = normalize(x) · normalize(W)ᵀ` clamped to [-1, 1]; the
//! target class gets the combined margin `cos(m1·θ + m2) − m3`. Two ArcFace variants:
//! [`MarginVariant::StraightThrough`] (current arcface_torch: the margin is added under
//! no-grad, the gradient passes as if d/dcos = 1) and [`MarginVariant::Differentiable`]
//! (earlier arcface_torch, MagFace: `cosθ·cos m − sinθ·sin m` with the threshold or easy-margin
//! fallback). SphereFace (integer m1 > 1) uses the monotone ψ(θ) = (−1)^k cos(m1·θ) − 2k.

use crate::models::SplitMix;
use candle_core::{DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Errors in a margin configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LossError {
    /// The combination of margins cannot be trained.
    #[error("margin configuration: {0}")]
    Config(String),
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
    /// Multiplicative angular margin (SphereFace); integer ≥ 1.
    pub m1: f64,
    /// Additive angular margin (ArcFace).
    pub m2: f64,
    /// Additive cosine margin (CosFace).
    pub m3: f64,
    /// Gradient treatment of the angular margin.
    pub variant: MarginVariant,
    /// Inter-class filtering: non-target cosines above this are zeroed (0 = off).
    pub interclass_threshold: f64,
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
    /// Checks that the margins can be trained: m1 a positive integer, m1 > 1 only without m2
    /// (ψ(θ) has no closed form with an additive angle), margins non-negative, s > 0.
    pub fn validate(&self) -> std::result::Result<(), LossError> {
        if self.s.is_nan() || self.s <= 0.0 {
            return Err(LossError::Config(format!(
                "scale s must be > 0, got {}",
                self.s
            )));
        }
        if self.m1 < 1.0 || self.m1.fract() != 0.0 || self.m1 > 8.0 {
            return Err(LossError::Config(format!(
                "m1 must be an integer from 1 to 8 (SphereFace's multiplicative margin uses \
                 cos(m1·θ) as a Chebyshev polynomial), got {}",
                self.m1
            )));
        }
        if self.m1 > 1.0 && self.m2 != 0.0 {
            return Err(LossError::Config(
                "m1 > 1 (SphereFace) cannot be combined with m2 > 0: use m1 with m3 only".into(),
            ));
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

/// One-hot `[B, C]` of `labels` in `dtype` (built on the host: labels are host data).
pub fn one_hot(labels: &[u32], classes: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        if (l as usize) >= classes {
            candle_core::bail!("label {l} out of range for {classes} classes");
        }
        v[i * classes + l as usize] = 1.0;
    }
    Tensor::from_vec(v, (labels.len(), classes), dev)?.to_dtype(dtype)
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

/// Chebyshev polynomial T_k(t) = cos(k·acos t), by the recurrence.
fn chebyshev(t: &Tensor, k: usize) -> Result<Tensor> {
    let mut a = t.ones_like()?;
    let mut b = t.clone();
    if k == 0 {
        return Ok(a);
    }
    for _ in 1..k {
        let c = ((t * 2.0)?.mul(&b)? - &a)?;
        a = b;
        b = c;
    }
    Ok(b)
}

/// Target-logit function f(t) (before scaling) for target cosines `t` `[B]`, with gradient.
fn target_fn(t: &Tensor, cfg: &MarginConfig) -> Result<Tensor> {
    let m1 = cfg.m1 as usize;
    if m1 > 1 {
        // ψ(θ) = (−1)^k cos(m1θ) − 2k, k = ⌊m1θ/π⌋: θ ≥ jπ/m1 ⇔ t ≤ cos(jπ/m1).
        let host: Vec<f64> = t.to_dtype(DType::F64)?.to_vec1()?;
        let ks: Vec<f64> = host
            .iter()
            .map(|&c| {
                (1..m1)
                    .filter(|&j| c <= (j as f64 * std::f64::consts::PI / m1 as f64).cos())
                    .count() as f64
            })
            .collect();
        let sign: Vec<f64> = ks
            .iter()
            .map(|k| {
                if (*k as usize).is_multiple_of(2) {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let dev = t.device();
        let k = Tensor::new(ks, dev)?.to_dtype(t.dtype())?;
        let sign = Tensor::new(sign, dev)?.to_dtype(t.dtype())?;
        let psi = (chebyshev(t, m1)?.mul(&sign)? - (k * 2.0)?)?;
        return psi - cfg.m3;
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

/// Scaled logits `[B, C]` with the margin on each row's target class.
pub fn margin_logits(cos: &Tensor, labels: &[u32], cfg: &MarginConfig) -> Result<Tensor> {
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
    let f = target_fn(&t, cfg)?;
    let delta = (f - &t)?;
    let delta = match cfg.variant {
        MarginVariant::StraightThrough => delta.detach(),
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

    /// Loss of a batch; `rng` drives PartialFC sampling (unused at rate 1).
    pub fn loss(&self, emb: &Tensor, labels: &[u32], rng: &mut SplitMix) -> Result<Tensor> {
        let classes = self.weight.dim(0)?;
        let (w, labels) = if self.sample_rate < 1.0 {
            let (idx, remapped) = partial_fc_sample(labels, classes, self.sample_rate, rng);
            let idx = Tensor::new(idx, self.weight.device())?;
            (self.weight.as_tensor().index_select(&idx, 0)?, remapped)
        } else {
            (self.weight.as_tensor().clone(), labels.to_vec())
        };
        let cos = self.cosines(emb, &w)?;
        let logits = margin_logits(&cos, &labels, &self.cfg)?;
        cross_entropy(&logits, &labels)
    }
}
