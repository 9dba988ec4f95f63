//! Gradient-boosted regression trees with squared loss, the regressor of quality assessment
//! (docs/methods.md §6; the reference uses CatBoost with RMSE).
//!
//! The trees are CatBoost's default kind, *oblivious* (symmetric) trees: every level splits
//! all its nodes on the same `(feature, threshold)`, so a tree of depth `d` is `d` splits and
//! `2^d` leaves and a prediction is `d` comparisons. Features are quantised once into at most
//! `bins` bins at quantile borders (CatBoost's default border count is 254); a level picks
//! the split with the largest gain `Σ_nodes G_L²/(n_L+λ) + G_R²/(n_R+λ)` over the residuals
//! `G`, a leaf is `lr · Σ residual / (n + λ)` (λ = `l2`, CatBoost's `l2_leaf_reg`). There is
//! no sampling, so a fit is a deterministic function of its data and parameters: ties between
//! splits go to the lowest feature index, then the lowest border.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Hyper-parameters of a fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GbtParams {
    /// Depth of every tree (`2^depth` leaves).
    pub depth: usize,
    /// Shrinkage applied to every leaf.
    pub lr: f64,
    /// Number of trees.
    pub iterations: usize,
    /// L2 regularisation of leaf values (λ).
    pub l2: f64,
    /// Quantisation bins per feature (2..=256).
    pub bins: usize,
}

impl GbtParams {
    /// Checks ranges; the message names the parameter.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=16).contains(&self.depth) {
            return Err(format!("depth {} must lie in 1..=16", self.depth));
        }
        if !(self.lr > 0.0 && self.lr <= 1.0) {
            return Err(format!("lr {} must lie in (0, 1]", self.lr));
        }
        if self.iterations == 0 {
            return Err("iterations must be at least 1".into());
        }
        if !(self.l2 >= 0.0 && self.l2.is_finite()) {
            return Err(format!("l2 {} must be a finite number >= 0", self.l2));
        }
        if !(2..=256).contains(&self.bins) {
            return Err(format!("bins {} must lie in 2..=256", self.bins));
        }
        Ok(())
    }
}

/// One oblivious tree: the split of each level and the `2^depth` leaf values (shrinkage
/// included). Leaf index: `idx = 2·idx + (x[feature] > threshold)` level by level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    /// `(feature, threshold)` per level.
    pub splits: Vec<(usize, f32)>,
    /// Leaf values.
    pub leaves: Vec<f64>,
}

impl Tree {
    fn predict(&self, x: &[f32]) -> f64 {
        let mut idx = 0usize;
        for &(f, t) in &self.splits {
            idx = 2 * idx + usize::from(x[f] > t);
        }
        self.leaves[idx]
    }
}

/// A fitted ensemble.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gbt {
    /// Parameters of the fit.
    pub params: GbtParams,
    /// Number of features a row must have.
    pub features: usize,
    /// Initial prediction (mean of the targets).
    pub base: f64,
    /// The trees, in boosting order.
    pub trees: Vec<Tree>,
}

/// Errors of fitting and prediction.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GbtError {
    /// Parameters out of range.
    #[error("gradient boosting: {0}")]
    Params(String),
    /// Data unusable (empty, ragged, non-finite).
    #[error("gradient boosting: {0}")]
    Data(String),
}

/// Quantile borders of one feature: at most `bins − 1` distinct thresholds, each the midpoint
/// between two consecutive distinct values.
fn borders(values: &mut [f32], bins: usize) -> Vec<f32> {
    values.sort_by(f32::total_cmp);
    let n = values.len();
    let mut out: Vec<f32> = Vec::new();
    for k in 1..bins {
        let i = k * n / bins;
        if i == 0 || i >= n {
            continue;
        }
        // The first index whose value exceeds values[i-1]: a border between distinct values.
        let lo = values[i - 1];
        let j = i + values[i..].partition_point(|&v| v <= lo);
        if j >= n {
            continue;
        }
        let t = lo + (values[j] - lo) / 2.0;
        let t = if t > lo { t } else { lo };
        if out.last().is_none_or(|&b| t > b) {
            out.push(t);
        }
    }
    out
}

impl Gbt {
    /// Fits `rows` (each `features` values) to `targets`.
    pub fn fit(rows: &[Vec<f32>], targets: &[f32], params: &GbtParams) -> Result<Gbt, GbtError> {
        params.check().map_err(GbtError::Params)?;
        let n = rows.len();
        if n == 0 || targets.len() != n {
            return Err(GbtError::Data(format!(
                "{n} rows and {} targets: need the same positive number",
                targets.len()
            )));
        }
        let nf = rows[0].len();
        if let Some(i) = rows.iter().position(|r| r.len() != nf) {
            return Err(GbtError::Data(format!(
                "row {i} has {} features, row 0 has {nf}",
                rows[i].len()
            )));
        }
        if let Some(i) = rows.iter().position(|r| r.iter().any(|v| !v.is_finite())) {
            return Err(GbtError::Data(format!("row {i} has a non-finite feature")));
        }
        if let Some(i) = targets.iter().position(|v| !v.is_finite()) {
            return Err(GbtError::Data(format!("target {i} is not finite")));
        }
        // Column-major bins: bins[f][i] = number of borders of f below rows[i][f].
        let (borders, binned): (Vec<Vec<f32>>, Vec<Vec<u8>>) = (0..nf)
            .into_par_iter()
            .map(|f| {
                let mut col: Vec<f32> = rows.iter().map(|r| r[f]).collect();
                let b = borders(&mut col, params.bins);
                let bins = rows
                    .iter()
                    .map(|r| b.partition_point(|&t| r[f] > t) as u8)
                    .collect();
                (b, bins)
            })
            .unzip();
        let base = targets.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let mut pred = vec![base; n];
        let mut trees = Vec::with_capacity(params.iterations);
        let mut node = vec![0usize; n];
        for _ in 0..params.iterations {
            let resid: Vec<f64> = targets
                .iter()
                .zip(&pred)
                .map(|(&y, &p)| y as f64 - p)
                .collect();
            node.iter_mut().for_each(|v| *v = 0);
            let mut splits = Vec::with_capacity(params.depth);
            for level in 0..params.depth {
                let nodes = 1usize << level;
                // Best border per feature: (gain, border index).
                let best: Vec<Option<(f64, usize)>> = (0..nf)
                    .into_par_iter()
                    .map(|f| {
                        let nb = borders[f].len() + 1;
                        if nb < 2 {
                            return None;
                        }
                        let mut g = vec![0f64; nodes * nb];
                        let mut c = vec![0f64; nodes * nb];
                        for i in 0..n {
                            let k = node[i] * nb + binned[f][i] as usize;
                            g[k] += resid[i];
                            c[k] += 1.0;
                        }
                        let tot: Vec<(f64, f64)> = (0..nodes)
                            .map(|m| {
                                let r = m * nb..(m + 1) * nb;
                                (g[r.clone()].iter().sum(), c[r].iter().sum())
                            })
                            .collect();
                        let mut left = vec![(0f64, 0f64); nodes];
                        let mut out: Option<(f64, usize)> = None;
                        for k in 0..nb - 1 {
                            let mut gain = 0.0;
                            for m in 0..nodes {
                                left[m].0 += g[m * nb + k];
                                left[m].1 += c[m * nb + k];
                                let (gl, cl) = left[m];
                                let (gr, cr) = (tot[m].0 - gl, tot[m].1 - cl);
                                gain += gl * gl / (cl + params.l2).max(1e-12)
                                    + gr * gr / (cr + params.l2).max(1e-12);
                            }
                            if out.is_none_or(|(b, _)| gain > b) {
                                out = Some((gain, k));
                            }
                        }
                        out
                    })
                    .collect();
                let mut chosen: Option<(f64, usize, usize)> = None;
                for (f, b) in best.iter().enumerate() {
                    if let Some((gain, k)) = *b {
                        if chosen.is_none_or(|(g, _, _)| gain > g) {
                            chosen = Some((gain, f, k));
                        }
                    }
                }
                let split = match chosen {
                    Some((_, f, k)) => (f, borders[f][k]),
                    // Every feature is constant: a split that sends everything left.
                    None => (0, f32::INFINITY),
                };
                for i in 0..n {
                    node[i] = 2 * node[i] + usize::from(rows[i][split.0] > split.1);
                }
                splits.push(split);
            }
            let leaves_n = 1usize << params.depth;
            let mut g = vec![0f64; leaves_n];
            let mut c = vec![0f64; leaves_n];
            for i in 0..n {
                g[node[i]] += resid[i];
                c[node[i]] += 1.0;
            }
            let leaves: Vec<f64> = g
                .iter()
                .zip(&c)
                .map(|(&g, &c)| {
                    if c > 0.0 {
                        params.lr * g / (c + params.l2)
                    } else {
                        0.0
                    }
                })
                .collect();
            for i in 0..n {
                pred[i] += leaves[node[i]];
            }
            trees.push(Tree { splits, leaves });
        }
        Ok(Gbt {
            params: params.clone(),
            features: nf,
            base,
            trees,
        })
    }

    /// Prediction for one row of `features` values.
    pub fn predict(&self, x: &[f32]) -> Result<f64, GbtError> {
        if x.len() != self.features {
            return Err(GbtError::Data(format!(
                "a row has {} features, the model was fitted on {}",
                x.len(),
                self.features
            )));
        }
        Ok(self.base + self.trees.iter().map(|t| t.predict(x)).sum::<f64>())
    }

    /// Predictions for many rows (in parallel).
    pub fn predict_all(&self, rows: &[Vec<f32>]) -> Result<Vec<f64>, GbtError> {
        rows.par_iter().map(|r| self.predict(r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borders_lie_between_distinct_values() {
        let mut v = vec![3.0, 1.0, 1.0, 2.0, 2.0, 2.0, 5.0, 4.0];
        let b = borders(&mut v, 4);
        assert_eq!(b, vec![1.5, 2.5, 3.5]);
        let mut c = vec![7.0; 10];
        assert!(borders(&mut c, 8).is_empty());
    }

    #[test]
    fn a_stump_learns_a_step() {
        let rows: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32]).collect();
        let y: Vec<f32> = (0..100).map(|i| if i < 30 { 0.0 } else { 1.0 }).collect();
        let p = GbtParams {
            depth: 1,
            lr: 1.0,
            iterations: 1,
            l2: 0.0,
            bins: 256,
        };
        let m = Gbt::fit(&rows, &y, &p).unwrap();
        assert_eq!(m.trees[0].splits, vec![(0, 29.5)]);
        assert!((m.predict(&[10.0]).unwrap() - 0.0).abs() < 1e-9);
        assert!((m.predict(&[50.0]).unwrap() - 1.0).abs() < 1e-9);
        assert!(m.predict(&[1.0, 2.0]).is_err());
        assert!(Gbt::fit(&rows, &y[..5], &p).is_err());
        assert!(Gbt::fit(&rows, &y, &GbtParams { depth: 0, ..p }).is_err());
    }
}
