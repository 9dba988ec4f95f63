//! Plain softmax (a linear classifier with bias on the raw embedding, cross-entropy) and the
//! centre loss of Wen et al. 2016 ("A Discriminative Feature Learning Approach for Deep Face
//! Recognition"): `L = L_softmax + λ/2 · ‖x_i − c_{y_i}‖²` averaged over the batch, with the
//! centres moved towards their batch features at rate α after every step (not by the
//! optimiser).

use super::{cross_entropy, one_hot};
use candle_core::{DType, Result, Tensor, Var};

/// Linear classifier `logits = x·Wᵀ + b` over the un-normalised embedding.
pub struct SoftmaxHead {
    /// Weights `[classes, emb]`.
    pub weight: Var,
    /// Bias `[classes]`.
    pub bias: Var,
}

impl SoftmaxHead {
    /// Logits `[B, classes]` of the embeddings `[B, emb]`.
    pub fn logits(&self, emb: &Tensor) -> Result<Tensor> {
        emb.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())
    }

    /// Mean softmax cross-entropy of the batch.
    pub fn loss(&self, emb: &Tensor, labels: &[u32]) -> Result<Tensor> {
        cross_entropy(&self.logits(emb)?, labels)
    }
}

/// Each row's class centre `c_{y_i}` `[B, emb]` (centres detached: they are state, not
/// parameters).
fn batch_centres(centres: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let classes = centres.dim(0)?;
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        candle_core::bail!("label {l} out of range for {classes} centres");
    }
    let idx = Tensor::new(labels, centres.device())?;
    centres.detach().index_select(&idx, 0)
}

/// Centre term `λ/2 · (1/B) Σ_i ‖x_i − c_{y_i}‖²` (the paper sums over the batch, as it sums the
/// softmax loss; dividing both by B keeps the same balance with fpipe's mean cross-entropy).
/// Gradient `λ/B · (x_i − c_{y_i})` on the embeddings only.
pub fn center_term(emb: &Tensor, centres: &Tensor, labels: &[u32], lambda: f64) -> Result<Tensor> {
    let b = emb.dim(0)?;
    let c = batch_centres(centres, labels)?.to_dtype(emb.dtype())?;
    let d = (emb - c)?.sqr()?.sum_all()?;
    (d * (lambda / (2.0 * b as f64)))?.reshape(())
}

/// Centre update of Wen et al. (their Eq. 4): for every class j of the batch,
/// `Δc_j = Σ_{i: y_i = j} (c_j − x_i) / (1 + n_j)` and `c_j ← c_j − α·Δc_j`; classes absent from
/// the batch keep their centre. Returns the new centres `[classes, emb]`.
pub fn center_update(centres: &Tensor, emb: &Tensor, labels: &[u32], alpha: f64) -> Result<Tensor> {
    let classes = centres.dim(0)?;
    let emb = emb.detach().to_dtype(centres.dtype())?;
    // oh [B, C]: Σ_i oh_ij x_i = ohᵀ·x; n_j = Σ_i oh_ij.
    let oh = one_hot(labels, classes, centres.dtype(), centres.device())?;
    let n = oh.sum(0)?.unsqueeze(1)?; // [C, 1]
    let sum_x = oh.t()?.matmul(&emb)?; // [C, emb]
    let delta = (centres.broadcast_mul(&n)? - sum_x)?.broadcast_div(&(n + 1.0)?)?;
    centres - (delta * alpha)?
}

/// Mean squared distance of the batch features to their centres, `(1/B) Σ ‖x_i − c_{y_i}‖²`,
/// for reports (host f64).
pub fn center_distance(emb: &Tensor, centres: &Tensor, labels: &[u32]) -> Result<f64> {
    let b = emb.dim(0)?;
    let c = batch_centres(centres, labels)?.to_dtype(emb.dtype())?;
    let d = (emb.detach() - c)?.sqr()?.sum_all()?;
    Ok(d.to_dtype(DType::F64)?.to_scalar::<f64>()? / b as f64)
}
