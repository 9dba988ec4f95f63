//! 1:N identification: exact nearest-neighbour search of probes against a gallery, the
//! k-NN decision of face_recognition's `face_recognition_knn.py` example (vote among the `k`
//! nearest gallery images, "unknown" when the nearest is farther than a distance threshold),
//! the CMC curve (closed set) and DIR at FPIR (open set, NIST FRVT 1:N).
//!
//! Search: similarity is the dot product of (L2-normalised) embeddings. The gallery is stored
//! transposed in blocks of [`GALLERY_BLOCK`] rows so that a block of probes is scored against
//! a block of gallery rows as a small matrix product whose inner loop vectorises across
//! gallery rows. Every score is still accumulated over the embedding dimension in order,
//! `s = 0; s += p[0]·g[0]; s += p[1]·g[1]; ...`, so the scores are bit-identical to the
//! brute-force loop and so are the neighbours and ranks.
//!
//! Ties (equal scores) are ordered by gallery row, then by identity index: the lower one
//! first. Distances are Euclidean between unit vectors, `d = sqrt(max(0, 2 − 2s))`.

use super::MetricError;
use crate::util::rng::SplitMix;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Gallery rows per block of the search.
pub const GALLERY_BLOCK: usize = 64;
/// Probes scored together against one transposed gallery block.
const PROBE_BLOCK: usize = 4;

/// How the `k` nearest gallery images vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vote {
    /// One vote each (majority vote).
    Uniform,
    /// Weight `1/d`; neighbours at distance 0 take all the weight (scikit-learn's
    /// `weights='distance'`, which face_recognition's k-NN example uses).
    Distance,
}

/// What one probe's search found.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeOutcome {
    /// The `k` nearest gallery rows `(row, score)`, by score descending, then row ascending.
    pub neighbours: Vec<(u32, f32)>,
    /// Gallery identity (index into the sorted gallery labels) with the highest score, the
    /// score of an identity being the best of its gallery images.
    pub best_identity: u32,
    /// That identity's score.
    pub best_score: f32,
    /// 1-based rank of the probe's own identity among gallery identities; `None` when its
    /// identity is not in the gallery (a non-mated probe).
    pub rank: Option<u32>,
}

/// Distance between unit vectors of similarity `s`.
pub fn distance(s: f32) -> f64 {
    (2.0 - 2.0 * s as f64).max(0.0).sqrt()
}

fn check_rows(what: &'static str, v: &[f32], dim: usize) -> Result<usize, MetricError> {
    if dim == 0 || !v.len().is_multiple_of(dim) {
        return Err(MetricError::Invalid(format!(
            "{what}: {} values are not rows of {dim}",
            v.len()
        )));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(MetricError::Invalid(format!(
            "{what}: value {i} (row {}) is not finite",
            i / dim
        )));
    }
    Ok(v.len() / dim)
}

/// The plain dot product the blocked search must reproduce bit for bit.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0f32;
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// Gallery transposed in blocks: block `b` holds rows `b*GB..` as `[dim][GB]`, zero-padded.
fn transpose_blocks(gallery: &[f32], dim: usize, rows: usize) -> Vec<f32> {
    let blocks = rows.div_ceil(GALLERY_BLOCK);
    let mut out = vec![0f32; blocks * dim * GALLERY_BLOCK];
    out.par_chunks_mut(dim * GALLERY_BLOCK)
        .enumerate()
        .for_each(|(b, blk)| {
            for j in 0..GALLERY_BLOCK.min(rows - b * GALLERY_BLOCK) {
                let row = &gallery[(b * GALLERY_BLOCK + j) * dim..][..dim];
                for (d, x) in row.iter().enumerate() {
                    blk[d * GALLERY_BLOCK + j] = *x;
                }
            }
        });
    out
}

/// Scores of up to [`PROBE_BLOCK`] probes (`probes`, row-major) against every gallery row,
/// into `out` (`probes × rows`).
fn score_block(probes: &[f32], dim: usize, blocks: &[f32], rows: usize, out: &mut [f32]) {
    let np = probes.len() / dim;
    let mut acc = [[0f32; GALLERY_BLOCK]; PROBE_BLOCK];
    for (b, gt) in blocks.chunks_exact(dim * GALLERY_BLOCK).enumerate() {
        for a in acc.iter_mut().take(np) {
            *a = [0f32; GALLERY_BLOCK];
        }
        for (d, grow) in gt.chunks_exact(GALLERY_BLOCK).enumerate() {
            for (p, a) in acc.iter_mut().take(np).enumerate() {
                let x = probes[p * dim + d];
                for (s, g) in a.iter_mut().zip(grow) {
                    *s += x * g;
                }
            }
        }
        let start = b * GALLERY_BLOCK;
        let n = GALLERY_BLOCK.min(rows - start);
        for (p, a) in acc.iter().take(np).enumerate() {
            out[p * rows + start..p * rows + start + n].copy_from_slice(&a[..n]);
        }
    }
}

/// True when `(s, i)` comes before `(t, j)`: higher score, then lower index.
fn before(s: f32, i: u32, t: f32, j: u32) -> bool {
    s > t || (s == t && i < j)
}

/// Searches every probe against the gallery (exact, blocked; see the module doc).
///
/// `gallery_ids[r]` is the identity index (`0..identities`) of gallery row `r`;
/// `probe_ids[p]` the identity index of probe `p`, or `None` when it is not enrolled. `k` is
/// the number of nearest gallery images kept per probe.
pub fn search(
    probes: &[f32],
    probe_ids: &[Option<u32>],
    gallery: &[f32],
    gallery_ids: &[u32],
    dim: usize,
    k: usize,
) -> Result<Vec<ProbeOutcome>, MetricError> {
    let np = check_rows("probes", probes, dim)?;
    let ng = check_rows("gallery", gallery, dim)?;
    for (what, a, b) in [
        ("probe identities", probe_ids.len(), np),
        ("gallery identities", gallery_ids.len(), ng),
    ] {
        if a != b {
            return Err(MetricError::Length { what, a, b });
        }
    }
    if ng == 0 {
        return Err(MetricError::Invalid("the gallery is empty".into()));
    }
    if k == 0 {
        return Err(MetricError::Invalid("k must be at least 1".into()));
    }
    let identities = gallery_ids.iter().max().map_or(0, |m| *m as usize + 1);
    if let Some(&Some(bad)) = probe_ids
        .iter()
        .find(|p| p.is_some_and(|i| i as usize >= identities))
    {
        return Err(MetricError::Invalid(format!(
            "probe identity {bad} is not in the gallery ({identities} identities)"
        )));
    }
    let blocks = transpose_blocks(gallery, dim, ng);
    let k = k.min(ng);
    let out: Vec<Vec<ProbeOutcome>> = probes
        .par_chunks(PROBE_BLOCK * dim)
        .zip(probe_ids.par_chunks(PROBE_BLOCK))
        .map(|(pb, ids)| {
            let n = pb.len() / dim;
            let mut scores = vec![0f32; n * ng];
            score_block(pb, dim, &blocks, ng, &mut scores);
            let mut id_score = vec![f32::NEG_INFINITY; identities];
            scores
                .chunks_exact(ng)
                .zip(ids)
                .map(|(row, id)| outcome(row, *id, gallery_ids, &mut id_score, k))
                .collect()
        })
        .collect();
    Ok(out.into_iter().flatten().collect())
}

/// Neighbours, best identity and rank from one probe's score row.
fn outcome(
    row: &[f32],
    id: Option<u32>,
    gallery_ids: &[u32],
    id_score: &mut [f32],
    k: usize,
) -> ProbeOutcome {
    let mut nb: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    id_score.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
    for (j, (&s, &g)) in row.iter().zip(gallery_ids).enumerate() {
        let j = j as u32;
        if id_score[g as usize] < s {
            id_score[g as usize] = s;
        }
        if nb.len() < k || before(s, j, nb[k - 1].1, nb[k - 1].0) {
            let pos = nb.partition_point(|&(i, t)| before(t, i, s, j));
            nb.insert(pos, (j, s));
            nb.truncate(k);
        }
    }
    let (mut best_identity, mut best_score) = (0u32, f32::NEG_INFINITY);
    for (i, &s) in id_score.iter().enumerate() {
        if s > best_score {
            best_identity = i as u32;
            best_score = s;
        }
    }
    let rank = id.map(|t| {
        let st = id_score[t as usize];
        1 + id_score
            .iter()
            .enumerate()
            .filter(|&(i, &s)| before(s, i as u32, st, t))
            .count() as u32
    });
    ProbeOutcome {
        neighbours: nb,
        best_identity,
        best_score,
        rank,
    }
}

/// face_recognition's k-NN decision from a probe's neighbours: the identity with the most
/// vote weight among them (ties: the lower identity index), or `None` ("unknown") when the
/// nearest neighbour is farther than `threshold` (a match needs `d <= threshold`).
pub fn knn_predict(
    neighbours: &[(u32, f32)],
    gallery_ids: &[u32],
    vote: Vote,
    threshold: f64,
) -> Option<u32> {
    let &(_, s0) = neighbours.first()?;
    if distance(s0) > threshold {
        return None;
    }
    let dists: Vec<f64> = neighbours.iter().map(|&(_, s)| distance(s)).collect();
    let exact = dists.contains(&0.0);
    let mut votes: BTreeMap<u32, f64> = BTreeMap::new();
    for (&(r, _), &d) in neighbours.iter().zip(&dists) {
        let w = match vote {
            Vote::Uniform => 1.0,
            Vote::Distance if exact => f64::from(u8::from(d == 0.0)),
            Vote::Distance => 1.0 / d,
        };
        *votes.entry(gallery_ids[r as usize]).or_default() += w;
    }
    let mut best: Option<(u32, f64)> = None;
    for (id, w) in votes {
        if best.is_none_or(|(_, bw)| w > bw) {
            best = Some((id, w));
        }
    }
    best.map(|(id, _)| id)
}

/// Cumulative match characteristic: entry `r − 1` is the fraction of mated probes whose
/// identity ranks `r` or better, for `r = 1..=identities`. Non-mated probes (`None`) are
/// ignored; no mated probe gives an error.
pub fn cmc(ranks: &[Option<u32>], identities: usize) -> Result<Vec<f64>, MetricError> {
    let mut hist = vec![0u64; identities + 1];
    let mut n = 0u64;
    for r in ranks.iter().flatten() {
        let r = *r as usize;
        if r == 0 || r > identities {
            return Err(MetricError::Invalid(format!(
                "rank {r} outside 1..={identities}"
            )));
        }
        hist[r] += 1;
        n += 1;
    }
    if n == 0 {
        return Err(MetricError::Invalid(
            "no mated probe: every probe's identity is missing from the gallery".into(),
        ));
    }
    let mut acc = 0u64;
    Ok(hist[1..]
        .iter()
        .map(|h| {
            acc += h;
            acc as f64 / n as f64
        })
        .collect())
}

/// One point of the open-set curve.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DirPoint {
    /// The FPIR asked for.
    pub fpir_target: f64,
    /// Score threshold: a probe is accepted when its best score is strictly above it.
    pub threshold: f64,
    /// FPIR reached: fraction of non-mated probes with best score above the threshold.
    pub fpir: f64,
    /// Detection and identification rate: fraction of mated probes whose own identity is at
    /// rank 1 with a score above the threshold.
    pub dir: f64,
}

/// DIR at FPIR (rank 1). `mated` holds, per mated probe, whether its identity is at rank 1
/// and the best score; `nonmated` the best score of each non-mated probe. For each target
/// `f`, the threshold is the lowest that keeps FPIR ≤ `f`: with the non-mated scores sorted
/// descending and `m = ⌊f·N⌋`, it is the `(m+1)`-th highest (or −∞ when `m ≥ N`).
pub fn dir_at_fpir(
    mated: &[(bool, f32)],
    nonmated: &[f32],
    targets: &[f64],
) -> Result<Vec<DirPoint>, MetricError> {
    if mated.is_empty() || nonmated.is_empty() {
        return Err(MetricError::Invalid(
            "DIR at FPIR needs mated and non-mated probes".into(),
        ));
    }
    let mut non: Vec<f32> = nonmated.to_vec();
    if let Some(i) = non.iter().position(|s| s.is_nan()) {
        return Err(MetricError::NaN {
            what: "non-mated scores",
            index: i,
        });
    }
    non.sort_by(|a, b| b.total_cmp(a));
    let n = non.len();
    targets
        .iter()
        .map(|&f| {
            if !(f > 0.0 && f <= 1.0) {
                return Err(MetricError::Invalid(format!("FPIR {f} outside (0, 1]")));
            }
            // The epsilon keeps e.g. 0.29 · 100 = 28.999… at 29.
            let m = (f * n as f64 + 1e-9).floor() as usize;
            let t = if m >= n {
                f64::NEG_INFINITY
            } else {
                non[m] as f64
            };
            let fp = non.iter().filter(|&&s| s as f64 > t).count();
            let hit = mated.iter().filter(|&&(r1, s)| r1 && s as f64 > t).count();
            Ok(DirPoint {
                fpir_target: f,
                threshold: t,
                fpir: fp as f64 / n as f64,
                dir: hit as f64 / mated.len() as f64,
            })
        })
        .collect()
}

/// A gallery/probe split of a labelled set (indices into it, ascending).
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Gallery (enrolled) images.
    pub gallery: Vec<usize>,
    /// Probe images: the other images of enrolled identities (mated) and every image of the
    /// identities kept out (non-mated).
    pub probes: Vec<usize>,
    /// Identities kept out of the gallery, ascending.
    pub unknown: Vec<i64>,
}

/// Seeded split: `round(unknown_fraction · identities)` identities (at least one when the
/// fraction is above 0, at most all but one) are kept out of the gallery; of every other
/// identity, `gallery_per_identity` images chosen at random are enrolled and the rest are
/// probes. An identity with no image left over gives no probe.
pub fn split_gallery_probe(
    labels: &[i64],
    gallery_per_identity: usize,
    unknown_fraction: f64,
    seed: u64,
) -> Result<Split, MetricError> {
    if gallery_per_identity == 0 {
        return Err(MetricError::Invalid(
            "gallery_per_identity must be at least 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&unknown_fraction) {
        return Err(MetricError::Invalid(format!(
            "unknown_fraction {unknown_fraction} outside [0, 1)"
        )));
    }
    let mut by_id: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_id.entry(l).or_default().push(i);
    }
    let mut ids: Vec<i64> = by_id.keys().copied().collect();
    if ids.len() < 2 && unknown_fraction > 0.0 {
        return Err(MetricError::Invalid(format!(
            "unknown_fraction > 0 needs at least 2 identities, the data set has {}",
            ids.len()
        )));
    }
    SplitMix::new(seed ^ 0x6964_656e_7469_6679).shuffle(&mut ids); // "identify"
    let mut n_unknown = (unknown_fraction * ids.len() as f64).round() as usize;
    if unknown_fraction > 0.0 {
        n_unknown = n_unknown.clamp(1, ids.len() - 1);
    }
    let mut unknown: Vec<i64> = ids[..n_unknown].to_vec();
    unknown.sort_unstable();
    let (mut gallery, mut probes) = (Vec::new(), Vec::new());
    for (id, mut imgs) in by_id {
        if unknown.binary_search(&id).is_ok() {
            probes.extend(imgs);
            continue;
        }
        SplitMix::new(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).shuffle(&mut imgs);
        let g = gallery_per_identity.min(imgs.len());
        gallery.extend_from_slice(&imgs[..g]);
        probes.extend_from_slice(&imgs[g..]);
    }
    gallery.sort_unstable();
    probes.sort_unstable();
    Ok(Split {
        gallery,
        probes,
        unknown,
    })
}

/// Settings of [`identify`].
#[derive(Clone, Debug, PartialEq)]
pub struct IdentifyConfig {
    /// Neighbours that vote.
    pub k: usize,
    /// How they vote.
    pub vote: Vote,
    /// Largest distance to the nearest gallery image that still counts as a match.
    pub distance_threshold: f64,
    /// FPIR targets of the open-set curve.
    pub fpirs: Vec<f64>,
}

/// Everything one identification experiment measures.
#[derive(Clone, Debug, PartialEq)]
pub struct Identification {
    /// Gallery images and distinct gallery identities.
    pub gallery_images: usize,
    pub gallery_identities: usize,
    /// Probes whose identity is enrolled, and probes whose identity is not.
    pub mated: usize,
    pub nonmated: usize,
    /// Closed-set rank-1 and rank-5 identification rates (mated probes).
    pub rank1: f64,
    pub rank5: f64,
    /// CMC, entry `r − 1` for rank `r` (see [`cmc`]).
    pub cmc: Vec<f64>,
    /// Open-set DIR at each FPIR target; empty without non-mated probes.
    pub dir: Vec<DirPoint>,
    /// k-NN decision correct (the right identity for mated probes, "unknown" for
    /// non-mated ones), over all probes.
    pub knn_accuracy: f64,
    /// The same over mated probes only.
    pub knn_mated_accuracy: f64,
    /// Fraction of non-mated probes the k-NN calls "unknown" (`None` without any).
    pub knn_unknown_rejection: Option<f64>,
    /// Per probe: k-NN prediction (a label, `None` = unknown), rank of its own identity,
    /// best score.
    pub predictions: Vec<(Option<i64>, Option<u32>, f32)>,
}

fn normalized(v: &[f32], dim: usize) -> Vec<f32> {
    let mut out = v.to_vec();
    for row in out.chunks_mut(dim) {
        let n = dot(row, row).sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|x| *x /= n);
        }
    }
    out
}

/// 1:N identification of `probes` against `gallery` (row-major, `dim` columns, L2-normalised
/// here), with identity `labels` of each row.
pub fn identify(
    gallery: &[f32],
    gallery_labels: &[i64],
    probes: &[f32],
    probe_labels: &[i64],
    dim: usize,
    cfg: &IdentifyConfig,
) -> Result<Identification, MetricError> {
    check_rows("gallery", gallery, dim)?;
    check_rows("probes", probes, dim)?;
    let ids: Vec<i64> = {
        let mut v = gallery_labels.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    let index = |l: &i64| ids.binary_search(l).ok().map(|i| i as u32);
    let gallery_ids: Vec<u32> = gallery_labels.iter().filter_map(index).collect();
    let probe_ids: Vec<Option<u32>> = probe_labels.iter().map(index).collect();
    let out = search(
        &normalized(probes, dim),
        &probe_ids,
        &normalized(gallery, dim),
        &gallery_ids,
        dim,
        cfg.k,
    )?;
    let ranks: Vec<Option<u32>> = out.iter().map(|o| o.rank).collect();
    let curve = cmc(&ranks, ids.len())?;
    let at = |r: usize| curve[r.min(curve.len()) - 1];
    let mated: Vec<(bool, f32)> = out
        .iter()
        .filter(|o| o.rank.is_some())
        .map(|o| (o.rank == Some(1), o.best_score))
        .collect();
    let nonmated: Vec<f32> = out
        .iter()
        .filter(|o| o.rank.is_none())
        .map(|o| o.best_score)
        .collect();
    let dir = if nonmated.is_empty() {
        vec![]
    } else {
        dir_at_fpir(&mated, &nonmated, &cfg.fpirs)?
    };
    let mut predictions = Vec::with_capacity(out.len());
    let (mut right_mated, mut rejected) = (0usize, 0usize);
    for (o, pid) in out.iter().zip(&probe_ids) {
        let p = knn_predict(
            &o.neighbours,
            &gallery_ids,
            cfg.vote,
            cfg.distance_threshold,
        );
        match (pid, p) {
            (Some(t), Some(p)) if *t == p => right_mated += 1,
            (None, None) => rejected += 1,
            _ => {}
        }
        predictions.push((p.map(|i| ids[i as usize]), o.rank, o.best_score));
    }
    Ok(Identification {
        gallery_images: gallery_ids.len(),
        gallery_identities: ids.len(),
        mated: mated.len(),
        nonmated: nonmated.len(),
        rank1: at(1),
        rank5: at(5),
        cmc: curve,
        dir,
        knn_accuracy: (right_mated + rejected) as f64 / out.len() as f64,
        knn_mated_accuracy: right_mated as f64 / mated.len() as f64,
        knn_unknown_rejection: (!nonmated.is_empty())
            .then(|| rejected as f64 / nonmated.len() as f64),
        predictions,
    })
}
