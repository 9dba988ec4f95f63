//! ROC exactly as scikit-learn's `roc_curve(y, score)` (default `drop_intermediate=True`),
//! TPR at fixed FPR as in insightface's `eval_ijbc.py`, AUC and EER.
//!
//! Speed: each `(score, label)` is packed into one `u64` whose order is the descending score
//! order, and the keys are sorted in parallel; 15 million pairs take about a second.

use super::MetricError;
use rayon::prelude::*;

/// The FPR targets of the IJB protocol: 1e-6 ... 1e-1.
pub const IJB_FPRS: [f64; 6] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1];

/// A ROC curve: points sorted by increasing FPR, starting at (0, 0) with threshold `+inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct Roc {
    /// False-positive rate at each point.
    pub fpr: Vec<f64>,
    /// True-positive rate at each point.
    pub tpr: Vec<f64>,
    /// Score threshold of each point: pairs with `score >= threshold` are accepted.
    pub thresholds: Vec<f64>,
}

/// Maps an `f32` to a `u32` whose unsigned order is the float order (NaN excluded).
fn ordered(x: f32) -> u32 {
    // -0.0 and 0.0 are the same score.
    let b = if x == 0.0 { 0 } else { x.to_bits() };
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// ROC of `scores` (higher = more likely the same identity) against `labels`, with
/// scikit-learn's rules: one point per distinct score, collinear points dropped
/// (`drop_intermediate=True`), a first point (0, 0) at threshold `+inf`.
pub fn roc(scores: &[f32], labels: &[bool]) -> Result<Roc, MetricError> {
    if scores.len() != labels.len() {
        return Err(MetricError::Length {
            what: "scores and labels",
            a: scores.len(),
            b: labels.len(),
        });
    }
    if let Some(i) = scores.par_iter().position_any(|s| s.is_nan()) {
        return Err(MetricError::NaN {
            what: "scores",
            index: i,
        });
    }
    // Descending score: sort ascending on the complement of the ordered bits.
    let mut keys: Vec<u64> = scores
        .par_iter()
        .zip(labels.par_iter())
        .map(|(&s, &l)| ((!ordered(s) as u64) << 1) | l as u64)
        .collect();
    keys.par_sort_unstable();
    // One point per distinct score (the last index of each run of equal scores).
    let mut tps = Vec::new();
    let mut fps = Vec::new();
    let mut thr = Vec::new();
    let (mut tp, mut fp) = (0u64, 0u64);
    for (i, &k) in keys.iter().enumerate() {
        if k & 1 == 1 {
            tp += 1;
        } else {
            fp += 1;
        }
        let last = i + 1 == keys.len() || (keys[i + 1] >> 1) != (k >> 1);
        if last {
            tps.push(tp);
            fps.push(fp);
            let bits = !((k >> 1) as u32);
            let bits = if bits & 0x8000_0000 != 0 {
                bits & 0x7fff_ffff
            } else {
                !bits
            };
            thr.push(f32::from_bits(bits) as f64);
        }
    }
    if tp == 0 || fp == 0 {
        return Err(MetricError::OneClass("roc"));
    }
    // drop_intermediate: keep ends and points where either second difference is non-zero.
    let m = tps.len();
    let keep: Vec<usize> = if m > 2 {
        (0..m)
            .filter(|&i| {
                i == 0
                    || i == m - 1
                    || fps[i + 1] + fps[i - 1] != 2 * fps[i]
                    || tps[i + 1] + tps[i - 1] != 2 * tps[i]
            })
            .collect()
    } else {
        (0..m).collect()
    };
    let mut out = Roc {
        fpr: Vec::with_capacity(keep.len() + 1),
        tpr: Vec::with_capacity(keep.len() + 1),
        thresholds: Vec::with_capacity(keep.len() + 1),
    };
    out.fpr.push(0.0);
    out.tpr.push(0.0);
    out.thresholds.push(f64::INFINITY);
    for i in keep {
        out.fpr.push(fps[i] as f64 / fp as f64);
        out.tpr.push(tps[i] as f64 / tp as f64);
        out.thresholds.push(thr[i]);
    }
    Ok(out)
}

/// TPR at each target FPR: the ROC point with the smallest `|FPR − target|`; among equally
/// near points the highest TPR (insightface's `np.argmin` takes the first, which is the
/// lowest TPR of a vertical run; the rule here is docs/methods.md §9's).
pub fn tpr_at_fpr(roc: &Roc, targets: &[f64]) -> Vec<f64> {
    targets
        .iter()
        .map(|&t| {
            let mut best = f64::INFINITY;
            let mut tpr = 0.0;
            for (f, r) in roc.fpr.iter().zip(&roc.tpr) {
                let d = (f - t).abs();
                if d < best || (d == best && *r > tpr) {
                    best = d;
                    tpr = *r;
                }
            }
            tpr
        })
        .collect()
}

/// Area under the ROC curve by the trapezoidal rule (scikit-learn's `auc(fpr, tpr)`).
pub fn auc(roc: &Roc) -> f64 {
    roc.fpr
        .windows(2)
        .zip(roc.tpr.windows(2))
        .map(|(f, t)| (f[1] - f[0]) * (t[1] + t[0]) * 0.5)
        .sum()
}

/// Equal error rate: where FPR equals the false-negative rate `1 − TPR`, linearly
/// interpolated between the two ROC points that bracket the crossing.
pub fn eer(roc: &Roc) -> f64 {
    for i in 1..roc.fpr.len() {
        let d1 = roc.fpr[i] - (1.0 - roc.tpr[i]);
        if d1 >= 0.0 {
            let d0 = roc.fpr[i - 1] - (1.0 - roc.tpr[i - 1]);
            if d1 == d0 {
                return roc.fpr[i];
            }
            let a = -d0 / (d1 - d0);
            return roc.fpr[i - 1] + a * (roc.fpr[i] - roc.fpr[i - 1]);
        }
    }
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_roc_matches_sklearn_by_hand() {
        // sklearn: roc_curve([0,0,1,1], [0.1,0.4,0.35,0.8])
        // fpr [0, 0, 0.5, 0.5, 1], tpr [0, 0.5, 0.5, 1, 1], thr [inf, 0.8, 0.4, 0.35, 0.1]
        let r = roc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert_eq!(r.fpr, vec![0.0, 0.0, 0.5, 0.5, 1.0]);
        assert_eq!(r.tpr, vec![0.0, 0.5, 0.5, 1.0, 1.0]);
        assert_eq!(
            r.thresholds[1..],
            [0.8f32 as f64, 0.4f32 as f64, 0.35f32 as f64, 0.1f32 as f64]
        );
        assert_eq!(auc(&r), 0.75);
        assert_eq!(eer(&r), 0.5);
        // Tie between (0.5, 0.5) and (0.5, 1.0): highest TPR.
        assert_eq!(tpr_at_fpr(&r, &[0.5]), vec![1.0]);
    }

    #[test]
    fn ties_and_negative_scores() {
        let r = roc(
            &[-1.0, -1.0, 2.0, 0.0, -0.0],
            &[true, false, true, false, true],
        )
        .unwrap();
        // Distinct scores: 2, 0 (== -0), -1; the point at 0 is collinear and dropped.
        assert_eq!(r.thresholds, vec![f64::INFINITY, 2.0, -1.0]);
        assert_eq!(r.fpr, vec![0.0, 0.0, 1.0]);
        assert_eq!(r.fpr.last(), Some(&1.0));
        assert_eq!(r.tpr.last(), Some(&1.0));
        assert!(roc(&[1.0, 2.0], &[true, true]).is_err());
        assert!(roc(&[1.0, f32::NAN], &[true, false]).is_err());
    }
}
