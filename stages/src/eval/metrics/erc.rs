//! Error-versus-reject curve for quality scores (docs/methods.md §6; CR-FIQA `ERC/erc.py`).
//!
//! Variant used: pair quality = `min(q_a, q_b)`; for each reject fraction `r` the
//! `floor(r·N)` lowest-quality pairs (all pairs, genuine and impostor; ties by pair index) are
//! discarded; on the remaining pairs the threshold is recomputed for each target FMR as the
//! `floor(FMR·n_impostor)`-th highest impostor score (a pair is accepted iff its score is
//! strictly above it, so the realised FMR is at most the target) and FNMR is the fraction of
//! genuine pairs not accepted. The area under each curve is the trapezoid over `r`. On a
//! small set a large `r` can leave no genuine or no impostor pair: the curve then ends at the
//! last fraction that leaves both (the first fraction must).

use super::MetricError;

/// One error-versus-reject curve per target FMR.
#[derive(Clone, Debug, PartialEq)]
pub struct ErcCurve {
    /// Reject fractions `r`.
    pub reject: Vec<f64>,
    /// Target FMRs.
    pub fmr: Vec<f64>,
    /// `fnmr[j][i]`: FNMR at target `fmr[j]` after rejecting `reject[i]`.
    pub fnmr: Vec<Vec<f64>>,
    /// Trapezoidal area under each `fnmr[j]` over `reject`.
    pub auc: Vec<f64>,
}

/// The error-versus-reject curve of similarity `scores` (higher = same) with ground truth
/// `same` and pair qualities `quality` (`min` of the two images' scores), at reject fractions
/// `reject` (e.g. 0, 0.05, ..., 0.95) and target FMRs `fmrs` (e.g. 1e-2, 1e-3, 1e-4).
pub fn error_vs_reject(
    scores: &[f32],
    same: &[bool],
    quality: &[f32],
    reject: &[f64],
    fmrs: &[f64],
) -> Result<ErcCurve, MetricError> {
    let n = scores.len();
    for (what, m) in [("labels", same.len()), ("quality", quality.len())] {
        if m != n {
            return Err(MetricError::Length { what, a: m, b: n });
        }
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(MetricError::NaN {
            what: "scores",
            index: i,
        });
    }
    if let Some(i) = quality.iter().position(|s| s.is_nan()) {
        return Err(MetricError::NaN {
            what: "quality",
            index: i,
        });
    }
    if let Some(r) = reject.iter().find(|r| !(0.0..1.0).contains(*r)) {
        return Err(MetricError::Invalid(format!(
            "reject fraction {r} must be in [0, 1)"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| quality[a].total_cmp(&quality[b]).then(a.cmp(&b)));
    let mut fnmr = vec![Vec::with_capacity(reject.len()); fmrs.len()];
    let mut done = 0;
    for &r in reject {
        let kept = &order[(r * n as f64).floor() as usize..];
        let mut imp: Vec<f32> = kept
            .iter()
            .filter(|&&i| !same[i])
            .map(|&i| scores[i])
            .collect();
        let gen: Vec<f32> = kept
            .iter()
            .filter(|&&i| same[i])
            .map(|&i| scores[i])
            .collect();
        if imp.is_empty() || gen.is_empty() {
            if done == 0 {
                return Err(MetricError::OneClass("error_vs_reject"));
            }
            break;
        }
        done += 1;
        for (j, &f) in fmrs.iter().enumerate() {
            // The k-th highest impostor score by selection (linear time), not a full sort.
            let k = ((f * imp.len() as f64).floor() as usize).min(imp.len() - 1);
            let (_, &mut t, _) = imp.select_nth_unstable_by(k, |a, b| b.total_cmp(a));
            let rejected = gen.iter().filter(|&&s| s <= t).count();
            fnmr[j].push(rejected as f64 / gen.len() as f64);
        }
    }
    let reject = &reject[..done];
    let auc = fnmr
        .iter()
        .map(|c| {
            reject
                .windows(2)
                .zip(c.windows(2))
                .map(|(r, v)| (r[1] - r[0]) * (v[0] + v[1]) * 0.5)
                .sum()
        })
        .collect();
    Ok(ErcCurve {
        reject: reject.to_vec(),
        fmr: fmrs.to_vec(),
        fnmr,
        auc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejecting_low_quality_errors_lowers_fnmr() {
        // Genuine pairs: two low-quality failures (score 0.1) among good ones (0.9).
        let scores = [0.9, 0.1, 0.9, 0.1, 0.9, 0.2, 0.3, 0.25, 0.15, 0.05];
        let same = [
            true, true, true, true, true, false, false, false, false, false,
        ];
        let quality = [0.9, 0.1, 0.8, 0.2, 0.7, 0.5, 0.6, 0.55, 0.65, 0.75];
        let e = error_vs_reject(&scores, &same, &quality, &[0.0, 0.2], &[0.0]).unwrap();
        // r = 0: threshold 0.3 (highest impostor); 2 of 5 genuine rejected.
        // r = 0.2: the two failures are the lowest-quality pairs and go; FNMR 0.
        assert_eq!(e.fnmr[0], vec![0.4, 0.0]);
        assert!((e.auc[0] - 0.04).abs() < 1e-12);
        assert!(error_vs_reject(&scores, &same, &quality, &[1.0], &[0.1]).is_err());
        // r = 0.9 keeps only the best pair (genuine): the curve ends at 0.2.
        let e = error_vs_reject(&scores, &same, &quality, &[0.0, 0.2, 0.9], &[0.0]).unwrap();
        assert_eq!((e.reject.len(), e.fnmr[0].len()), (2, 2));
        assert!((e.auc[0] - 0.04).abs() < 1e-12);
        // No impostor pair at all: an error, not an empty curve.
        let e = error_vs_reject(&scores[..5], &same[..5], &quality[..5], &[0.0], &[0.1]);
        assert!(e.is_err());
    }
}
