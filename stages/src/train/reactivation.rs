//! Reactivation of inactive first-layer filters (CRAFT, docs/methods.md section 4) and the
//! directed scaled-random baseline, plus the filter analysis the `filters` stage reports.
//!
//! The source describes the method but its body was not available; every constant below is a
//! parameter whose default is fpipe's reading of that description (docs/training.md).
//! - Activity of filter i: `a_i = ‖W_i‖₂`; inactive when `a_i < τ·max_j a_j` (or below an
//!   absolute threshold when one is given).
//! - `scaled-random`: `W_i ← z·‖W_max‖/‖z‖`, `z ~ N(0, I)`.
//! - `craft`: active filters ranked by activity, strongest first; the k-th inactive filter
//!   becomes the complement `−W_c` of the k-th ranked active filter whose complement is not
//!   already present. "Present" is a signed test: some other filter `j` has
//!   `cos(−W_c, W_j) > 0.9` (with `|cos|` every complement would count as present through its
//!   own source). When inactive filters outnumber candidates the ranking is cycled, each
//!   further copy perturbed by `perturb·‖W_c‖` of isotropic noise.

use crate::util::rng::SplitMix;
use serde::{Deserialize, Serialize};

/// What happens to inactive filters.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ReactivationMode {
    /// Leave them (standard training); the history is still recorded.
    None,
    /// Directed scaled random: a random direction with the strongest filter's norm.
    ScaledRandom,
    /// CRAFT: complements of the strongest filters.
    Craft,
}

/// Reactivation settings (the `reactivation*` parameters of `train` and `distil`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReactivationConfig {
    /// Mode.
    pub mode: ReactivationMode,
    /// Relative threshold τ: inactive when `a_i < τ·max a` (0.1).
    pub tau: f64,
    /// Absolute threshold on `a_i`; when > 0 it replaces τ.
    pub threshold: f64,
    /// Check at the end of every this many epochs (1).
    pub every: u64,
    /// No reactivation in this last fraction of training (0.2).
    pub quiet: f64,
    /// Cosine above which two filters are the same pattern (0.9).
    pub same_cos: f64,
    /// Relative noise added to cycled complements (0.05).
    pub perturb: f64,
}

impl Default for ReactivationConfig {
    fn default() -> Self {
        ReactivationConfig {
            mode: ReactivationMode::None,
            tau: 0.1,
            threshold: 0.0,
            every: 1,
            quiet: 0.2,
            same_cos: 0.9,
            perturb: 0.05,
        }
    }
}

impl ReactivationConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.tau > 0.0 && self.tau < 1.0) {
            return Err("reactivation_tau must lie in (0, 1)".into());
        }
        if self.threshold.is_nan() || self.threshold < 0.0 {
            return Err("reactivation_threshold must be >= 0 (0 = use reactivation_tau)".into());
        }
        if self.every == 0 {
            return Err("reactivation_every must be at least 1 epoch".into());
        }
        if !(0.0..1.0).contains(&self.quiet) {
            return Err("reactivation_quiet must lie in [0, 1)".into());
        }
        if !(self.same_cos > 0.0 && self.same_cos < 1.0) {
            return Err("reactivation_same_cos must lie in (0, 1)".into());
        }
        if self.perturb.is_nan() || self.perturb < 0.0 {
            return Err("reactivation_perturb must be >= 0".into());
        }
        Ok(())
    }
}

/// One row of the per-epoch history.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct FilterEpoch {
    /// Epochs completed when measured (1-based).
    pub epoch: u64,
    /// Inactive filters over all filters, before any reactivation of this check.
    pub inactive_fraction: f64,
    /// Unique filters (greedy, |cos| < same_cos to every earlier kept filter).
    pub unique_filters: usize,
    /// Filters re-initialised at this check.
    pub reactivated: usize,
}

/// Activity analysis of one conv layer's filters.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterStats {
    /// `‖W_i‖₂` per filter.
    pub activity: Vec<f64>,
    /// Indices of inactive filters.
    pub inactive: Vec<usize>,
    /// Unique-filter count.
    pub unique: usize,
}

impl FilterStats {
    /// Inactive over all.
    pub fn inactive_fraction(&self) -> f64 {
        self.inactive.len() as f64 / self.activity.len().max(1) as f64
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let n = norm(a) * norm(b);
    if n == 0.0 {
        0.0
    } else {
        d / n
    }
}

/// Greedy unique count: a filter is new if `|cos|` to every earlier kept filter is below
/// `same_cos`. All-zero filters are never new.
pub fn unique_filters(w: &[f32], len: usize, same_cos: f64) -> usize {
    let mut kept: Vec<&[f32]> = Vec::new();
    for f in w.chunks_exact(len) {
        if norm(f) == 0.0 {
            continue;
        }
        if kept.iter().all(|k| cos(f, k).abs() < same_cos) {
            kept.push(f);
        }
    }
    kept.len()
}

/// Activity, inactive set and unique count of filters `w` (`[n, len]` row-major).
pub fn analyse(w: &[f32], len: usize, cfg: &ReactivationConfig) -> FilterStats {
    let activity: Vec<f64> = w.chunks_exact(len).map(norm).collect();
    let max = activity.iter().cloned().fold(0.0, f64::max);
    let cut = if cfg.threshold > 0.0 {
        cfg.threshold
    } else {
        cfg.tau * max
    };
    let inactive = activity
        .iter()
        .enumerate()
        .filter(|(_, &a)| a < cut)
        .map(|(i, _)| i)
        .collect();
    FilterStats {
        activity,
        inactive,
        unique: unique_filters(w, len, cfg.same_cos),
    }
}

fn random_direction(len: usize, rng: &mut SplitMix) -> Vec<f32> {
    (0..len).map(|_| rng.normal() as f32).collect()
}

/// Re-initialises the inactive filters of `w` in place per `cfg.mode`; returns the indices
/// rewritten (empty for `none`, or when nothing is inactive or every filter is zero).
pub fn reactivate(
    w: &mut [f32],
    len: usize,
    stats: &FilterStats,
    cfg: &ReactivationConfig,
    rng: &mut SplitMix,
) -> Vec<usize> {
    let n = stats.activity.len();
    let mut active: Vec<usize> = (0..n).filter(|i| !stats.inactive.contains(i)).collect();
    // Strongest first; equal activity keeps index order.
    active.sort_by(|&a, &b| {
        stats.activity[b]
            .total_cmp(&stats.activity[a])
            .then(a.cmp(&b))
    });
    let Some(&strongest) = active.first() else {
        return vec![];
    };
    let top = stats.activity[strongest];
    if top == 0.0 || stats.inactive.is_empty() {
        return vec![];
    }
    match cfg.mode {
        ReactivationMode::None => vec![],
        ReactivationMode::ScaledRandom => {
            for &i in &stats.inactive {
                let z = random_direction(len, rng);
                let s = (top / norm(&z).max(f64::MIN_POSITIVE)) as f32;
                for (d, v) in w[i * len..(i + 1) * len].iter_mut().zip(z) {
                    *d = v * s;
                }
            }
            stats.inactive.clone()
        }
        ReactivationMode::Craft => {
            let mut out = Vec::new();
            // Candidates: active filters whose complement no other filter already covers.
            let candidates: Vec<usize> = active
                .iter()
                .copied()
                .filter(|&c| {
                    let comp: Vec<f32> = w[c * len..(c + 1) * len].iter().map(|v| -v).collect();
                    !(0..n).any(|j| {
                        j != c
                            && !stats.inactive.contains(&j)
                            && cos(&comp, &w[j * len..(j + 1) * len]) > cfg.same_cos
                    })
                })
                .collect();
            if candidates.is_empty() {
                return vec![];
            }
            for (placed, &i) in stats.inactive.iter().enumerate() {
                let c = candidates[placed % candidates.len()];
                let cycle = placed / candidates.len();
                let src: Vec<f32> = w[c * len..(c + 1) * len].to_vec();
                let scale = (cfg.perturb * stats.activity[c] / (len as f64).sqrt()) as f32;
                for (k, d) in w[i * len..(i + 1) * len].iter_mut().enumerate() {
                    let noise = if cycle > 0 {
                        rng.normal() as f32 * scale
                    } else {
                        0.0
                    };
                    *d = -src[k] + noise;
                }
                out.push(i);
            }
            out
        }
    }
}

/// The first convolution of a backbone: the one variable under `prefix` of shape
/// `[filters, 3, k, k]` (every backbone here has exactly one conv reading the RGB input).
pub fn first_conv<'a, T>(
    named: impl IntoIterator<Item = (&'a str, T)>,
    dims: impl Fn(&T) -> Vec<usize>,
) -> Result<(String, T), String> {
    let mut found: Vec<(String, T)> = named
        .into_iter()
        .filter(|(_, t)| {
            let d = dims(t);
            d.len() == 4 && d[1] == 3
        })
        .map(|(k, t)| (k.to_string(), t))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err("the model has no convolution over the 3 input channels".into()),
        _ => Err(format!(
            "the model has {} convolutions over the 3 input channels; expected one",
            found.len()
        )),
    }
}

/// Runs the checks during training: at every epoch end it measures the first conv layer,
/// records a [`FilterEpoch`], and when a check is due rewrites the inactive filters and resets
/// their optimiser state.
pub struct Reactivator {
    cfg: ReactivationConfig,
    name: String,
    var: candle_core::Var,
    seed: u64,
    /// Per-epoch history so far (restored from checkpoints).
    pub history: Vec<FilterEpoch>,
}

impl Reactivator {
    /// Finds the first conv among `vars` (store names, e.g. `backbone.conv1.weight`).
    pub fn new(
        cfg: &ReactivationConfig,
        vars: &[(String, candle_core::Var)],
        seed: u64,
    ) -> Result<Self, String> {
        let (name, var) = first_conv(
            vars.iter()
                .filter(|(k, _)| k.starts_with("backbone."))
                .map(|(k, v)| (k.as_str(), v.clone())),
            |v| v.dims().to_vec(),
        )?;
        Ok(Reactivator {
            cfg: cfg.clone(),
            name,
            var,
            seed,
            history: vec![],
        })
    }

    /// Store name of the watched layer.
    pub fn layer(&self) -> &str {
        &self.name
    }

    /// Called after optimiser step `step` (0-based) of `total`, `batch` images per step over a
    /// data set of `n` images; `reset` clears the optimiser state of the given filter rows.
    pub fn after_step(
        &mut self,
        step: u64,
        total: u64,
        batch: usize,
        n: usize,
        reset: &mut dyn FnMut(&str, &[usize]) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let (b, n) = (batch as u64, n.max(1) as u64);
        let epoch = (step + 1) * b / n;
        if epoch == step * b / n {
            return Ok(());
        }
        let t = self.var.as_tensor();
        let dims = t.dims().to_vec();
        let len = dims[1..].iter().product::<usize>();
        let mut w = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let stats = analyse(&w, len, &self.cfg);
        let due = self.cfg.mode != ReactivationMode::None
            && epoch.is_multiple_of(self.cfg.every)
            && ((step + 1) as f64) <= (1.0 - self.cfg.quiet) * total as f64;
        let changed = if due {
            let mut rng = SplitMix::new(
                self.seed ^ 0xC4AF_7000_0000_0000 ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            reactivate(&mut w, len, &stats, &self.cfg, &mut rng)
        } else {
            vec![]
        };
        if !changed.is_empty() {
            let new = candle_core::Tensor::from_vec(w, dims, t.device())?.to_dtype(t.dtype())?;
            self.var.set(&new)?;
            reset(&self.name, &changed)?;
        }
        self.history.push(FilterEpoch {
            epoch,
            inactive_fraction: stats.inactive_fraction(),
            unique_filters: stats.unique,
            reactivated: changed.len(),
        });
        Ok(())
    }

    /// The history as a `[E, 4]` f64 tensor (epoch, inactive fraction, unique, reactivated)
    /// for checkpoints; `None` when empty.
    pub fn history_tensor(&self) -> candle_core::Result<Option<candle_core::Tensor>> {
        if self.history.is_empty() {
            return Ok(None);
        }
        let flat: Vec<f64> = self
            .history
            .iter()
            .flat_map(|h| {
                [
                    h.epoch as f64,
                    h.inactive_fraction,
                    h.unique_filters as f64,
                    h.reactivated as f64,
                ]
            })
            .collect();
        candle_core::Tensor::from_vec(flat, (self.history.len(), 4), &candle_core::Device::Cpu)
            .map(Some)
    }

    /// Restores the history written by [`Reactivator::history_tensor`].
    pub fn restore_history(&mut self, t: &candle_core::Tensor) -> candle_core::Result<()> {
        self.history = t
            .to_dtype(candle_core::DType::F64)?
            .to_vec2::<f64>()?
            .into_iter()
            .map(|r| FilterEpoch {
                epoch: r[0] as u64,
                inactive_fraction: r[1],
                unique_filters: r[2] as usize,
                reactivated: r[3] as usize,
            })
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: ReactivationMode) -> ReactivationConfig {
        ReactivationConfig {
            mode,
            ..Default::default()
        }
    }

    /// Four 3-element filters: a strong, b medium, c and d nearly dead.
    fn weights() -> Vec<f32> {
        vec![
            3.0, 0.0, 0.0, // a, ‖a‖ = 3
            0.0, 2.0, 0.0, // b, ‖b‖ = 2
            0.01, 0.0, 0.0, // c (parallel to a)
            0.0, 0.0, 0.02, // d
        ]
    }

    #[test]
    fn analysis_finds_inactive_and_unique_filters() {
        let w = weights();
        let s = analyse(&w, 3, &cfg(ReactivationMode::None));
        assert_eq!(s.inactive, vec![2, 3]);
        assert!((s.activity[0] - 3.0).abs() < 1e-9);
        assert_eq!(s.inactive_fraction(), 0.5);
        // c is parallel to a (|cos| = 1): a, b, d are unique.
        assert_eq!(s.unique, 3);
        let abs = ReactivationConfig {
            threshold: 2.5,
            ..cfg(ReactivationMode::None)
        };
        assert_eq!(analyse(&w, 3, &abs).inactive, vec![1, 2, 3]);
    }

    #[test]
    fn craft_uses_complements_of_the_strongest_filters_in_order() {
        let mut w = weights();
        let c = cfg(ReactivationMode::Craft);
        let s = analyse(&w, 3, &c);
        let changed = reactivate(&mut w, 3, &s, &c, &mut SplitMix::new(0));
        assert_eq!(changed, vec![2, 3]);
        assert_eq!(
            &w[6..9],
            &[-3.0, 0.0, 0.0],
            "first inactive <- -a (strongest)"
        );
        assert_eq!(&w[9..12], &[0.0, -2.0, 0.0], "second inactive <- -b");
        let after = analyse(&w, 3, &c);
        assert!(after.inactive.is_empty());
    }

    #[test]
    fn craft_skips_filters_whose_complement_is_present() {
        // a's complement is already there (filter 1 = -a): the first inactive gets -b.
        let mut w = vec![
            3.0, 0.0, 0.0, // a
            -2.9, 0.1, 0.0, // ≈ -a
            0.0, 2.0, 0.0, // b
            0.0, 0.0, 0.01, // dead
        ];
        let c = cfg(ReactivationMode::Craft);
        let s = analyse(&w, 3, &c);
        assert_eq!(s.inactive, vec![3]);
        reactivate(&mut w, 3, &s, &c, &mut SplitMix::new(0));
        assert_eq!(&w[9..12], &[0.0, -2.0, 0.0]);
    }

    #[test]
    fn craft_cycles_with_perturbation_when_candidates_run_out() {
        let mut w = vec![
            3.0, 0.0, 0.0, // the only active filter
            0.0, 0.01, 0.0, // dead
            0.0, 0.0, 0.01, // dead
        ];
        let c = cfg(ReactivationMode::Craft);
        let s = analyse(&w, 3, &c);
        reactivate(&mut w, 3, &s, &c, &mut SplitMix::new(7));
        assert_eq!(&w[3..6], &[-3.0, 0.0, 0.0], "first copy exact");
        let second = &w[6..9];
        assert_ne!(second, &[-3.0, 0.0, 0.0], "second copy perturbed");
        assert!(
            cos(second, &[-3.0, 0.0, 0.0]) > 0.99,
            "still the complement"
        );
    }

    #[test]
    fn scaled_random_matches_the_strongest_norm_and_is_seeded() {
        let c = cfg(ReactivationMode::ScaledRandom);
        let mut w1 = weights();
        let s = analyse(&w1, 3, &c);
        let changed = reactivate(&mut w1, 3, &s, &c, &mut SplitMix::new(3));
        assert_eq!(changed, vec![2, 3]);
        for i in changed {
            assert!((norm(&w1[i * 3..i * 3 + 3]) - 3.0).abs() < 1e-5);
        }
        let mut w2 = weights();
        reactivate(&mut w2, 3, &s, &c, &mut SplitMix::new(3));
        assert_eq!(w1, w2);
        assert_eq!(&w1[0..6], &weights()[0..6], "active filters untouched");
    }

    #[test]
    fn none_changes_nothing_and_bad_settings_are_rejected() {
        let c = cfg(ReactivationMode::None);
        let mut w = weights();
        let s = analyse(&w, 3, &c);
        assert!(reactivate(&mut w, 3, &s, &c, &mut SplitMix::new(0)).is_empty());
        assert_eq!(w, weights());
        assert!(ReactivationConfig {
            tau: 1.5,
            ..c.clone()
        }
        .validate()
        .is_err());
        assert!(ReactivationConfig {
            every: 0,
            ..c.clone()
        }
        .validate()
        .is_err());
        assert!(ReactivationConfig { quiet: 1.0, ..c }.validate().is_err());
    }
}
