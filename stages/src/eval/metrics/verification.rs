//! insightface's verification protocol (`recognition/arcface_torch/eval/verification.py`):
//! squared L2 distance between flip-summed, L2-normalised embeddings; thresholds
//! `0, 0.01, ..., 3.99`; contiguous folds (`KFold(shuffle=False)`); the best threshold on the
//! other folds (first maximum of training accuracy), accuracy on the held-out fold; mean and
//! population standard deviation over folds.

use super::MetricError;
use rayon::prelude::*;

/// Number of thresholds (`np.arange(0, 4, 0.01)`).
const NT: usize = 400;

/// Threshold `k` exactly as numpy's `arange(0, 4, 0.01)` produces it.
fn threshold(k: usize) -> f64 {
    k as f64 * 0.01
}

/// Smallest `k` with `d < threshold(k)`, i.e. from which threshold on the pair is predicted
/// "same"; `NT` when never.
fn first_accepting(d: f64) -> usize {
    if d < 0.0 {
        return 0;
    }
    let mut k = ((d / 0.01).floor() as usize).min(NT);
    while k > 0 && d < threshold(k - 1) {
        k -= 1;
    }
    while k < NT && d >= threshold(k) {
        k += 1;
    }
    k
}

/// Result of the k-fold verification protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct Verification {
    /// Mean accuracy over folds (0..1).
    pub accuracy: f64,
    /// Population standard deviation of the fold accuracies (`np.std`).
    pub std: f64,
    /// Accuracy of each fold.
    pub fold_accuracy: Vec<f64>,
    /// Best threshold (on the other folds) used for each fold.
    pub fold_threshold: Vec<f64>,
}

/// Squared L2 distances `‖e_a − e_b‖²` for pairs of rows of `emb` (row-major, `dim` columns).
pub fn pair_distances(
    emb: &[f32],
    dim: usize,
    pairs: &[(u32, u32)],
) -> Result<Vec<f32>, MetricError> {
    if dim == 0 || !emb.len().is_multiple_of(dim) {
        return Err(MetricError::Invalid(format!(
            "embeddings: {} values are not rows of {dim}",
            emb.len()
        )));
    }
    let rows = emb.len() / dim;
    if let Some(p) = pairs
        .iter()
        .find(|p| p.0 as usize >= rows || p.1 as usize >= rows)
    {
        return Err(MetricError::Invalid(format!(
            "pair ({}, {}) out of range for {rows} embeddings",
            p.0, p.1
        )));
    }
    Ok(pairs
        .par_iter()
        .map(|&(a, b)| {
            let ea = &emb[a as usize * dim..(a as usize + 1) * dim];
            let eb = &emb[b as usize * dim..(b as usize + 1) * dim];
            ea.iter().zip(eb).map(|(x, y)| (x - y) * (x - y)).sum()
        })
        .collect())
}

/// insightface's k-fold verification accuracy (`nfolds` = 10 in the protocol) over squared
/// distances `dist` (smaller = same) and ground truth `issame`.
pub fn verification_10fold(
    dist: &[f32],
    issame: &[bool],
    nfolds: usize,
) -> Result<Verification, MetricError> {
    if dist.len() != issame.len() {
        return Err(MetricError::Length {
            what: "distances and labels",
            a: dist.len(),
            b: issame.len(),
        });
    }
    let n = dist.len();
    if nfolds < 2 || n < nfolds {
        return Err(MetricError::Invalid(format!(
            "{nfolds} folds need at least {nfolds} pairs and 2 folds (got {n} pairs)"
        )));
    }
    if let Some(i) = dist.iter().position(|d| d.is_nan()) {
        return Err(MetricError::NaN {
            what: "distances",
            index: i,
        });
    }
    // sklearn KFold: the first n % k folds have one extra sample.
    let mut bounds = Vec::with_capacity(nfolds + 1);
    bounds.push(0usize);
    for f in 0..nfolds {
        let size = n / nfolds + usize::from(f < n % nfolds);
        bounds.push(bounds[f] + size);
    }
    // Per fold: histogram of first accepting threshold, for same and different pairs.
    let hists: Vec<[Vec<u64>; 2]> = (0..nfolds)
        .into_par_iter()
        .map(|f| {
            let mut h = [vec![0u64; NT + 1], vec![0u64; NT + 1]];
            for i in bounds[f]..bounds[f + 1] {
                h[issame[i] as usize][first_accepting(dist[i] as f64)] += 1;
            }
            h
        })
        .collect();
    // Correct predictions at threshold k: same pairs with first <= k + different with first > k.
    let correct = |h: &[Vec<u64>; 2]| -> Vec<u64> {
        let diff_total: u64 = h[0].iter().sum();
        let (mut tp, mut fp) = (0u64, 0u64);
        (0..NT)
            .map(|k| {
                tp += h[1][k];
                fp += h[0][k];
                tp + (diff_total - fp)
            })
            .collect()
    };
    let per_fold: Vec<Vec<u64>> = hists.iter().map(correct).collect();
    let total: Vec<u64> = (0..NT)
        .map(|k| per_fold.iter().map(|c| c[k]).sum())
        .collect();
    let mut fold_accuracy = Vec::with_capacity(nfolds);
    let mut fold_threshold = Vec::with_capacity(nfolds);
    for f in 0..nfolds {
        let mut best = 0usize;
        let mut best_v = 0u64;
        for k in 0..NT {
            let v = total[k] - per_fold[f][k];
            if k == 0 || v > best_v {
                best = k;
                best_v = v;
            }
        }
        let size = (bounds[f + 1] - bounds[f]) as f64;
        fold_accuracy.push(per_fold[f][best] as f64 / size);
        fold_threshold.push(threshold(best));
    }
    let mean = fold_accuracy.iter().sum::<f64>() / nfolds as f64;
    let var = fold_accuracy
        .iter()
        .map(|a| (a - mean) * (a - mean))
        .sum::<f64>()
        / nfolds as f64;
    Ok(Verification {
        accuracy: mean,
        std: var.sqrt(),
        fold_accuracy,
        fold_threshold,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct transcription of insightface's loops, for checking the histogram version.
    fn naive(dist: &[f32], same: &[bool], nfolds: usize) -> Vec<f64> {
        let n = dist.len();
        let mut bounds = vec![0];
        for f in 0..nfolds {
            bounds.push(bounds[f] + n / nfolds + usize::from(f < n % nfolds));
        }
        let acc = |idx: &[usize], t: f64| {
            idx.iter()
                .filter(|&&i| ((dist[i] as f64) < t) == same[i])
                .count() as f64
                / idx.len() as f64
        };
        (0..nfolds)
            .map(|f| {
                let test: Vec<usize> = (bounds[f]..bounds[f + 1]).collect();
                let train: Vec<usize> = (0..n).filter(|i| !test.contains(i)).collect();
                let mut best = 0;
                for k in 0..NT {
                    if acc(&train, threshold(k)) > acc(&train, threshold(best)) {
                        best = k;
                    }
                }
                acc(&test, threshold(best))
            })
            .collect()
    }

    #[test]
    fn histogram_protocol_equals_naive_loops() {
        let mut s = 12345u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as f32 / (1u64 << 31) as f32
        };
        let n = 613;
        let same: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
        let dist: Vec<f32> = same
            .iter()
            .map(|&s| {
                let base = if s { 0.9 } else { 1.6 };
                // Some distances exactly on thresholds.
                let r = next();
                if r < 0.1 {
                    (((r * 1000.0) as usize) as f64 * 0.01 + 1.0) as f32
                } else {
                    base + next() * 1.2 - 0.6
                }
            })
            .collect();
        let v = verification_10fold(&dist, &same, 10).unwrap();
        let want = naive(&dist, &same, 10);
        assert_eq!(v.fold_accuracy, want);
        assert!(v.accuracy > 0.6 && v.accuracy < 1.0);
    }

    #[test]
    fn first_accepting_is_exact_on_threshold_values() {
        for k in 0..NT {
            let t = threshold(k);
            assert_eq!(first_accepting(t), k + 1, "at {t}");
        }
        assert_eq!(first_accepting(-1.0), 0);
        assert_eq!(first_accepting(10.0), NT);
    }

    #[test]
    fn errors_not_panics() {
        assert!(verification_10fold(&[0.1; 5], &[true; 4], 2).is_err());
        assert!(verification_10fold(&[0.1; 5], &[true; 5], 10).is_err());
        assert!(verification_10fold(&[f32::NAN; 20], &[true; 20], 10).is_err());
        assert!(pair_distances(&[0.0; 6], 3, &[(0, 2)]).is_err());
    }
}
