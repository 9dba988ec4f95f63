//! Triplet loss on L2-normalised embeddings with online mining inside a P×K batch (FaceNet,
//! Schroff et al. 2015; batch-hard: Hermans et al. 2017):
//! `max(0, ‖a − p‖² − ‖a − n‖² + margin)`.
//!
//! - Semi-hard (FaceNet's online selection): every anchor-positive pair (a, p) of the batch,
//!   a ≠ p, with the negative n that is closest to a among those farther than p
//!   (`‖a − n‖² > ‖a − p‖²`); when there is none, the farthest negative (as TensorFlow's
//!   `triplet_semihard_loss`), so every pair contributes a defined triplet.
//! - Batch-hard: every anchor with its farthest positive and its closest negative.
//!
//! Selection runs on the host without gradient; the loss of the chosen triplets is
//! differentiable. The mean is over all chosen triplets; the active fraction (loss > 0) is
//! reported.

use super::l2_normalize;
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Online triplet selection.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mining {
    /// FaceNet: all anchor-positive pairs, semi-hard negatives.
    SemiHard,
    /// Hermans et al.: hardest positive and hardest negative per anchor.
    BatchHard,
}

/// One triplet: indices of anchor, positive and negative in the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Triplet {
    pub anchor: usize,
    pub positive: usize,
    pub negative: usize,
}

/// Chooses triplets from the squared distances `dist` (`n×n`, row-major) of a batch with
/// `labels`. Ties go to the lower index. Anchors without a positive or a negative in the batch
/// contribute nothing.
pub fn mine(dist: &[f64], labels: &[u32], mining: Mining) -> Vec<Triplet> {
    let n = labels.len();
    let d = |i: usize, j: usize| dist[i * n + j];
    let mut out = Vec::new();
    for a in 0..n {
        let negatives: Vec<usize> = (0..n).filter(|&j| labels[j] != labels[a]).collect();
        let positives: Vec<usize> = (0..n)
            .filter(|&j| j != a && labels[j] == labels[a])
            .collect();
        if negatives.is_empty() || positives.is_empty() {
            continue;
        }
        // Strict comparisons keep the first index among equals.
        let argmin = |it: &mut dyn Iterator<Item = usize>| {
            it.fold(None::<usize>, |best, j| match best {
                Some(b) if d(a, b) <= d(a, j) => Some(b),
                _ => Some(j),
            })
        };
        let argmax = |it: &mut dyn Iterator<Item = usize>| {
            it.fold(None::<usize>, |best, j| match best {
                Some(b) if d(a, b) >= d(a, j) => Some(b),
                _ => Some(j),
            })
        };
        match mining {
            Mining::SemiHard => {
                for &p in &positives {
                    let dap = d(a, p);
                    let semi = argmin(&mut negatives.iter().copied().filter(|&j| d(a, j) > dap));
                    let neg = semi.or_else(|| argmax(&mut negatives.iter().copied()));
                    if let Some(negative) = neg {
                        out.push(Triplet {
                            anchor: a,
                            positive: p,
                            negative,
                        });
                    }
                }
            }
            Mining::BatchHard => {
                if let (Some(positive), Some(negative)) = (
                    argmax(&mut positives.iter().copied()),
                    argmin(&mut negatives.iter().copied()),
                ) {
                    out.push(Triplet {
                        anchor: a,
                        positive,
                        negative,
                    });
                }
            }
        }
    }
    out
}

/// Squared Euclidean distances `n×n` (row-major, f64) between the rows of `e` `[n, d]`.
pub fn squared_distances(e: &Tensor) -> Result<Vec<f64>> {
    let rows: Vec<Vec<f64>> = e.detach().to_dtype(DType::F64)?.to_vec2()?;
    let n = rows.len();
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = rows[i]
                .iter()
                .zip(&rows[j])
                .map(|(x, y)| (x - y) * (x - y))
                .sum();
        }
    }
    Ok(out)
}

/// Result of one batch.
pub struct TripletLoss {
    /// Mean hinge over the chosen triplets (0 when there are none), differentiable.
    pub loss: Tensor,
    /// Triplets with a positive hinge / triplets chosen (0 when none).
    pub active_fraction: f64,
    /// The chosen triplets.
    pub triplets: Vec<Triplet>,
}

/// Triplet loss of embeddings `emb` `[B, d]` (L2-normalised here) with `labels`.
pub fn triplet_loss(
    emb: &Tensor,
    labels: &[u32],
    margin: f64,
    mining: Mining,
) -> Result<TripletLoss> {
    let e = l2_normalize(emb)?;
    let dist = squared_distances(&e)?;
    let triplets = mine(&dist, labels, mining);
    if triplets.is_empty() {
        return Ok(TripletLoss {
            loss: (e.sum_all()? * 0.0)?,
            active_fraction: 0.0,
            triplets,
        });
    }
    let dev = e.device();
    let pick = |f: fn(&Triplet) -> usize| -> Result<Tensor> {
        let idx: Vec<u32> = triplets.iter().map(|t| f(t) as u32).collect();
        e.index_select(&Tensor::new(idx, dev)?, 0)
    };
    let (a, p, n) = (
        pick(|t| t.anchor)?,
        pick(|t| t.positive)?,
        pick(|t| t.negative)?,
    );
    let dap = (&a - p)?.sqr()?.sum(1)?;
    let dan = (&a - n)?.sqr()?.sum(1)?;
    let hinge = ((dap - dan)? + margin)?.relu()?;
    let host: Vec<f64> = hinge.to_dtype(DType::F64)?.to_vec1()?;
    let active = host.iter().filter(|&&h| h > 0.0).count() as f64 / host.len() as f64;
    Ok(TripletLoss {
        loss: hinge.mean_all()?,
        active_fraction: active,
        triplets,
    })
}
