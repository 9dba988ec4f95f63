//! Embedding post-processing and IJB-style template pooling (insightface `eval_ijbc.py`,
//! `image2template_feature`).

use super::MetricError;
use rayon::prelude::*;
use std::collections::BTreeMap;

fn check_rows(what: &'static str, v: &[f32], dim: usize) -> Result<usize, MetricError> {
    if dim == 0 || !v.len().is_multiple_of(dim) {
        return Err(MetricError::Invalid(format!(
            "{what}: {} values are not rows of {dim}",
            v.len()
        )));
    }
    Ok(v.len() / dim)
}

fn normalize_rows(v: &mut [f32], dim: usize) {
    v.par_chunks_mut(dim).for_each(|row| {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        // sklearn.preprocessing.normalize leaves zero rows as they are.
        if n > 0.0 {
            row.iter_mut().for_each(|x| *x /= n);
        }
    });
}

/// The verification embedding `normalize(f(x) + f(flip x))`, row-wise (`dim` columns).
pub fn flip_sum_normalize(
    emb: &[f32],
    emb_flip: &[f32],
    dim: usize,
) -> Result<Vec<f32>, MetricError> {
    check_rows("embeddings", emb, dim)?;
    if emb.len() != emb_flip.len() {
        return Err(MetricError::Length {
            what: "embeddings and flipped embeddings",
            a: emb.len(),
            b: emb_flip.len(),
        });
    }
    let mut out: Vec<f32> = emb.iter().zip(emb_flip).map(|(a, b)| a + b).collect();
    normalize_rows(&mut out, dim);
    Ok(out)
}

/// Pooled template features: `ids[t]` is the template id of row `t` of `features`.
#[derive(Clone, Debug, PartialEq)]
pub struct PooledTemplates {
    /// Template ids, ascending (`np.unique`).
    pub ids: Vec<i64>,
    /// L2-normalised template features, row-major, one row per id.
    pub features: Vec<f32>,
    /// Feature dimension.
    pub dim: usize,
}

/// IJB template pooling: per image feature `feats` row (already flip-summed), optionally
/// scaled by `weights` (detector scores); within a template, features of the same media are
/// averaged; the media means are summed; the sum is L2-normalised.
pub fn pool_templates(
    feats: &[f32],
    dim: usize,
    templates: &[i64],
    medias: &[i64],
    weights: Option<&[f32]>,
) -> Result<PooledTemplates, MetricError> {
    let rows = check_rows("features", feats, dim)?;
    for (what, n) in [("templates", templates.len()), ("medias", medias.len())] {
        if n != rows {
            return Err(MetricError::Length {
                what,
                a: n,
                b: rows,
            });
        }
    }
    if let Some(w) = weights {
        if w.len() != rows {
            return Err(MetricError::Length {
                what: "weights",
                a: w.len(),
                b: rows,
            });
        }
    }
    // template -> media -> image rows (ordered maps: np.unique order).
    let mut groups: BTreeMap<i64, BTreeMap<i64, Vec<usize>>> = BTreeMap::new();
    for i in 0..rows {
        groups
            .entry(templates[i])
            .or_default()
            .entry(medias[i])
            .or_default()
            .push(i);
    }
    let ids: Vec<i64> = groups.keys().copied().collect();
    let groups: Vec<&BTreeMap<i64, Vec<usize>>> = groups.values().collect();
    let mut features = vec![0f32; ids.len() * dim];
    features
        .par_chunks_mut(dim)
        .zip(groups.par_iter())
        .for_each(|(out, media)| {
            let mut acc = vec![0f32; dim];
            for rows in media.values() {
                acc.iter_mut().for_each(|a| *a = 0.0);
                for &i in rows {
                    let w = weights.map_or(1.0, |w| w[i]);
                    for (a, x) in acc.iter_mut().zip(&feats[i * dim..(i + 1) * dim]) {
                        *a += x * w;
                    }
                }
                let n = rows.len() as f32;
                for (o, a) in out.iter_mut().zip(&acc) {
                    *o += a / n;
                }
            }
        });
    normalize_rows(&mut features, dim);
    Ok(PooledTemplates { ids, features, dim })
}

/// Cosine scores (dot products of the normalised template features) for template-id pairs.
/// A pair naming an unknown template is an error naming the pair.
pub fn pair_scores_cosine(
    t: &PooledTemplates,
    pairs: &[(i64, i64)],
) -> Result<Vec<f32>, MetricError> {
    let index: std::collections::HashMap<i64, usize> =
        t.ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    pairs
        .par_iter()
        .enumerate()
        .map(|(k, (a, b))| {
            let (ia, ib) = match (index.get(a), index.get(b)) {
                (Some(&ia), Some(&ib)) => (ia, ib),
                _ => {
                    return Err(MetricError::Invalid(format!(
                        "pair {k}: template {a} or {b} has no images"
                    )))
                }
            };
            let d = t.dim;
            Ok(t.features[ia * d..(ia + 1) * d]
                .iter()
                .zip(&t.features[ib * d..(ib + 1) * d])
                .map(|(x, y)| x * y)
                .sum())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_mean_then_template_sum_then_normalise() {
        // Template 5: media 1 has [1,0] and [3,0] (mean [2,0]), media 2 has [0,2] -> [2,2].
        let feats = [1.0, 0.0, 3.0, 0.0, 0.0, 2.0, 0.0, -4.0];
        let t = pool_templates(&feats, 2, &[5, 5, 5, 3], &[1, 1, 2, 9], None).unwrap();
        assert_eq!(t.ids, vec![3, 5]);
        let s = 0.5f32.sqrt();
        assert_eq!(t.features, vec![0.0, -1.0, s, s]);
        let sc = pair_scores_cosine(&t, &[(3, 5)]).unwrap();
        assert!((sc[0] + s).abs() < 1e-6);
        assert!(pair_scores_cosine(&t, &[(3, 4)]).is_err());
        let f = flip_sum_normalize(&[3.0, 0.0], &[0.0, 4.0], 2).unwrap();
        assert_eq!(f, vec![0.6, 0.8]);
    }
}
