//! Data set filtering (docs/methods.md section 7): per identity, cluster the images' embeddings
//! and keep the identity's largest cluster; the rest (noise and smaller clusters) is taken
//! to be mislabelled or unusable and removed.
//!
//! Two clusterings, both pure functions of embeddings and qualities (no model, no files):
//!
//! - [`Method::Graph`]: the quality graph ([`graph::quality_graph`]: an edge where
//!   `cos(e_i, e_j) >= min(q_i, q_j) - offset`) cut into communities by networkx's
//!   semi-synchronous label propagation ([`graph::communities`]); isolated images are noise;
//! - [`Method::Dbscan`]: the baseline, scikit-learn's DBSCAN with the cosine distance
//!   ([`dbscan::dbscan`]).
//!
//! The largest cluster wins; on a tie in size, the cluster holding the identity's
//! lowest-indexed image among the tied ones (clusters are numbered by their first image, so
//! this is the lowest cluster number). An identity whose images are all noise keeps none.
//! The `filter` stage kind around this is in `crate::kinds::filter`.

pub mod dbscan;
pub mod graph;

use rayon::prelude::*;
use std::collections::BTreeMap;

/// Errors of filtering.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A parameter or input is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// How the images of one identity are clustered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Quality graph and label propagation.
    Graph {
        /// Subtracted from `min(q_i, q_j)` to give the edge's cosine threshold.
        offset: f64,
    },
    /// DBSCAN with the cosine distance.
    Dbscan {
        /// Neighbourhood radius in cosine distance `1 - cos` (`<=`).
        eps: f64,
        /// Points in a neighbourhood (itself included) that make a core point.
        min_samples: usize,
    },
}

/// Why an image was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// In no cluster (isolated in the graph, DBSCAN noise).
    Noise,
    /// In a cluster of its identity other than the largest.
    SmallerCluster,
}

impl Reason {
    /// Name written in `removed.csv`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Noise => "noise",
            Reason::SmallerCluster => "smaller_cluster",
        }
    }
}

/// Clusters of one identity.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentityClusters {
    /// The identity label.
    pub label: i64,
    /// Its images (data set rows), ascending.
    pub images: Vec<usize>,
    /// Cluster per image (parallel to `images`), `-1` for noise.
    pub clusters: Vec<i64>,
    /// Size of each cluster, by cluster number.
    pub sizes: Vec<usize>,
    /// The cluster kept, `None` when every image is noise.
    pub kept: Option<i64>,
}

/// The result of [`filter`].
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// `None` for a kept image, else why it was removed (one per data set row).
    pub removed: Vec<Option<Reason>>,
    /// Per identity, ascending label.
    pub identities: Vec<IdentityClusters>,
}

impl Outcome {
    /// Number of images kept.
    pub fn kept(&self) -> usize {
        self.removed.iter().filter(|r| r.is_none()).count()
    }
}

/// Clusters the rows of one identity (`emb` holds only its rows, `dim` wide).
pub fn cluster(
    emb: &[f32],
    dim: usize,
    quality: &[f32],
    method: Method,
) -> Result<Vec<i64>, FilterError> {
    match method {
        Method::Graph { offset } => {
            graph::communities(&graph::quality_graph(emb, dim, quality, offset))
        }
        Method::Dbscan { eps, min_samples } => Ok(dbscan::dbscan(emb, dim, eps, min_samples)),
    }
}

/// The largest cluster of `clusters` (numbers `0..`), ties to the lowest number; `None` when
/// all are noise. Returns the sizes as well.
pub fn largest(clusters: &[i64]) -> (Vec<usize>, Option<i64>) {
    let k = clusters.iter().map(|&c| c + 1).max().unwrap_or(0).max(0) as usize;
    let mut sizes = vec![0usize; k];
    for &c in clusters.iter().filter(|&&c| c >= 0) {
        sizes[c as usize] += 1;
    }
    let mut best: Option<usize> = None;
    for (c, &s) in sizes.iter().enumerate() {
        if s > 0 && best.is_none_or(|b| s > sizes[b]) {
            best = Some(c);
        }
    }
    (sizes, best.map(|b| b as i64))
}

/// Filters a labelled set: `emb` is `[n, dim]` row-major, `labels` and `quality` (in 0..1)
/// have `n` entries. Identities are clustered independently (in parallel).
pub fn filter(
    emb: &[f32],
    dim: usize,
    labels: &[i64],
    quality: &[f32],
    method: Method,
) -> Result<Outcome, FilterError> {
    let n = labels.len();
    if dim == 0 || emb.len() != n * dim || quality.len() != n {
        return Err(FilterError::Invalid(format!(
            "{} embedding values of width {dim}, {n} labels and {} qualities do not match",
            emb.len(),
            quality.len()
        )));
    }
    if let Some(i) = quality.iter().position(|q| !(0.0..=1.0).contains(q)) {
        return Err(FilterError::Invalid(format!(
            "image {i}: quality {} is not in [0, 1]",
            quality[i]
        )));
    }
    let mut by_label: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_label.entry(l).or_default().push(i);
    }
    let groups: Vec<(i64, Vec<usize>)> = by_label.into_iter().collect();
    let identities = groups
        .into_par_iter()
        .map(|(label, images)| {
            let sub: Vec<f32> = images
                .iter()
                .flat_map(|&i| emb[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            let q: Vec<f32> = images.iter().map(|&i| quality[i]).collect();
            let clusters = cluster(&sub, dim, &q, method)?;
            let (sizes, kept) = largest(&clusters);
            Ok(IdentityClusters {
                label,
                images,
                clusters,
                sizes,
                kept,
            })
        })
        .collect::<Result<Vec<_>, FilterError>>()?;
    let mut removed = vec![None; n];
    for id in &identities {
        for (&i, &c) in id.images.iter().zip(&id.clusters) {
            removed[i] = if c < 0 {
                Some(Reason::Noise)
            } else if Some(c) != id.kept {
                Some(Reason::SmallerCluster)
            } else {
                None
            };
        }
    }
    Ok(Outcome {
        removed,
        identities,
    })
}

/// Precision and recall of the removed images against ground-truth flags (`truth[i]`: image
/// `i` is really bad). `None` where undefined (nothing removed; nothing bad).
pub fn precision_recall(removed: &[Option<Reason>], truth: &[bool]) -> (Option<f64>, Option<f64>) {
    let (mut tp, mut rem, mut bad) = (0usize, 0usize, 0usize);
    for (r, &t) in removed.iter().zip(truth) {
        rem += r.is_some() as usize;
        bad += t as usize;
        tp += (r.is_some() && t) as usize;
    }
    let p = (rem > 0).then(|| tp as f64 / rem as f64);
    let r = (bad > 0).then(|| tp as f64 / bad as f64);
    (p, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_ties_go_to_the_lowest_cluster() {
        assert_eq!(largest(&[0, 1, 1, 0, -1]), (vec![2, 2], Some(0)));
        assert_eq!(largest(&[0, 1, 1, -1]), (vec![1, 2], Some(1)));
        assert_eq!(largest(&[-1, -1]), (vec![], None));
        assert_eq!(largest(&[]), (vec![], None));
    }

    #[test]
    fn precision_recall_counts() {
        let r = [
            Some(Reason::Noise),
            None,
            Some(Reason::SmallerCluster),
            None,
        ];
        assert_eq!(
            precision_recall(&r, &[true, true, false, false]),
            (Some(0.5), Some(0.5))
        );
        assert_eq!(precision_recall(&[None], &[false]), (None, None));
    }
}
