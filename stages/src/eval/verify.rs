//! Verification metrics of a model's embeddings on pairs: 10-fold accuracy ± std on squared
//! distances of flip-sum embeddings (insightface protocol), ROC on cosine scores with TPR@FPR,
//! AUC and EER (see [`crate::eval::metrics`]); dropping the lowest-quality pairs for the
//! error-versus-reject analysis.

use super::metrics::{auc, eer, pair_distances, roc, tpr_at_fpr, verification_10fold};
use super::EvalError;

/// Verification numbers of one evaluation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalResult {
    /// 10-fold accuracy (0..1).
    pub accuracy: f64,
    /// Standard deviation over folds.
    pub accuracy_std: f64,
    /// Area under the ROC.
    pub auc: f64,
    /// Equal error rate.
    pub eer: f64,
    /// (FPR target, TPR).
    pub tpr_at_fpr: Vec<(f64, f64)>,
    /// ROC points (fpr, tpr).
    pub roc: Vec<(f64, f64)>,
    /// Pairs evaluated.
    pub pairs: usize,
}

/// Verification metrics of normalised embeddings `emb` (`dim` columns) on `pairs`.
pub fn verify(
    emb: &[f32],
    dim: usize,
    pairs: &[(u32, u32, bool)],
    fprs: &[f64],
) -> Result<EvalResult, EvalError> {
    let ab: Vec<(u32, u32)> = pairs.iter().map(|p| (p.0, p.1)).collect();
    let same: Vec<bool> = pairs.iter().map(|p| p.2).collect();
    let dist = pair_distances(emb, dim, &ab)?;
    let folds = 10.min(pairs.len());
    let v = verification_10fold(&dist, &same, folds)?;
    // Unit vectors: cosine = 1 − d²/2.
    let scores: Vec<f32> = dist.iter().map(|d| 1.0 - d / 2.0).collect();
    let r = roc(&scores, &same)?;
    let tprs = tpr_at_fpr(&r, fprs);
    Ok(EvalResult {
        accuracy: v.accuracy,
        accuracy_std: v.std,
        auc: auc(&r),
        eer: eer(&r),
        tpr_at_fpr: fprs.iter().copied().zip(tprs).collect(),
        roc: r.fpr.iter().copied().zip(r.tpr.iter().copied()).collect(),
        pairs: pairs.len(),
    })
}

/// Pair quality: the lower of the two images' scores.
pub fn pair_quality(pairs: &[(u32, u32, bool)], q: &[f32]) -> Result<Vec<f32>, EvalError> {
    pairs
        .iter()
        .map(|&(a, b, _)| match (q.get(a as usize), q.get(b as usize)) {
            (Some(x), Some(y)) => Ok(x.min(*y)),
            _ => Err(EvalError::Mismatch(format!(
                "pair ({a}, {b}) refers to an image without a quality score"
            ))),
        })
        .collect()
}

/// The pairs left after discarding the `floor(fraction·N)` lowest-quality ones (ties by pair
/// index, as the error-versus-reject curve), in their original order.
pub fn drop_lowest(
    pairs: &[(u32, u32, bool)],
    pair_quality: &[f32],
    fraction: f64,
) -> Vec<(u32, u32, bool)> {
    kept_indices(pair_quality, fraction)
        .into_iter()
        .map(|i| pairs[i])
        .collect()
}

/// Indices (ascending) of the pairs [`drop_lowest`] keeps, given one quality per pair.
pub fn kept_indices(pair_quality: &[f32], fraction: f64) -> Vec<usize> {
    let n = pair_quality.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| pair_quality[a].total_cmp(&pair_quality[b]).then(a.cmp(&b)));
    let k = (fraction * n as f64).floor() as usize;
    let mut keep = vec![true; n];
    for &i in order.iter().take(k) {
        keep[i] = false;
    }
    (0..n).filter(|&i| keep[i]).collect()
}

/// Reject fractions of the error-versus-reject curve: 0, 0.05, ..., 0.95.
pub fn erc_rejects() -> Vec<f64> {
    (0..20).map(|i| i as f64 * 0.05).collect()
}

/// FMR targets of the error-versus-reject curve.
pub const ERC_FMRS: [f64; 3] = [1e-2, 1e-3, 1e-4];
