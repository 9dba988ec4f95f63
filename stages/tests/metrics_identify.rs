//! 1:N identification metrics (`fpipe_stages::eval::metrics::identify`): the blocked search against
//! brute force, the k-NN vote and threshold, CMC and DIR@FPIR on hand-made cases, the split,
//! and scikit-learn's k-NN (golden files of `tests/golden/identify/make_identify.py`).

use fpipe_stages::eval::metrics::{
    cmc, dir_at_fpir, identify, knn_predict, search, split_gallery_probe, IdentifyConfig, Vote,
};
use std::path::Path;

/// Deterministic uniform values in [-1, 1).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn brute_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0f32;
    for i in 0..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[test]
fn blocked_search_equals_brute_force() {
    let (dim, ng, np, nid) = (37, 150, 13, 11);
    let mut gallery = random(ng * dim, 1);
    // Exact duplicates make equal scores: lower gallery row first, lower identity first.
    let dup: Vec<f32> = gallery[5 * dim..6 * dim].to_vec();
    gallery[70 * dim..71 * dim].copy_from_slice(&dup);
    gallery[140 * dim..141 * dim].copy_from_slice(&dup);
    let mut probes = random(np * dim, 2);
    probes[..dim].copy_from_slice(&dup);
    let gids: Vec<u32> = (0..ng).map(|r| ((r * 7) % nid) as u32).collect();
    let pids: Vec<Option<u32>> = (0..np)
        .map(|p| (p % 4 != 3).then_some((p % nid) as u32))
        .collect();
    for k in [1, 7, 150, 400] {
        let got = search(&probes, &pids, &gallery, &gids, dim, k).unwrap();
        assert_eq!(got.len(), np);
        for (p, o) in got.iter().enumerate() {
            let pr = &probes[p * dim..(p + 1) * dim];
            let scores: Vec<f32> = (0..ng)
                .map(|r| brute_dot(pr, &gallery[r * dim..(r + 1) * dim]))
                .collect();
            let mut order: Vec<usize> = (0..ng).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let want: Vec<(u32, f32)> = order
                .iter()
                .take(k.min(ng))
                .map(|&r| (r as u32, scores[r]))
                .collect();
            // Bit-identical scores, same order.
            let bits = |v: &[(u32, f32)]| -> Vec<(u32, u32)> {
                v.iter().map(|&(r, s)| (r, s.to_bits())).collect()
            };
            assert_eq!(bits(&o.neighbours), bits(&want), "probe {p} k {k}");
            let mut best = vec![f32::NEG_INFINITY; nid];
            for r in 0..ng {
                best[gids[r] as usize] = best[gids[r] as usize].max(scores[r]);
            }
            let mut ids: Vec<usize> = (0..nid).collect();
            ids.sort_by(|&a, &b| best[b].total_cmp(&best[a]).then(a.cmp(&b)));
            assert_eq!(o.best_identity as usize, ids[0]);
            assert_eq!(o.best_score.to_bits(), best[ids[0]].to_bits());
            let rank =
                pids[p].map(|t| ids.iter().position(|&i| i == t as usize).unwrap() as u32 + 1);
            assert_eq!(o.rank, rank, "probe {p}");
        }
    }
    // The duplicated row: probe 0 hits rows 5, 70, 140 with the same score, in that order.
    let o = &search(&probes, &pids, &gallery, &gids, dim, 3).unwrap()[0];
    assert_eq!(
        o.neighbours.iter().map(|n| n.0).collect::<Vec<_>>(),
        [5, 70, 140]
    );
    assert!(search(&probes, &pids, &gallery, &gids, dim, 0).is_err());
    assert!(search(&probes, &pids, &gallery[..dim * 3], &gids[..3], dim, 1).is_err());
    assert!(search(&probes[..5], &pids, &gallery, &gids, dim, 1).is_err());
    let mut nan = probes.clone();
    nan[3] = f32::NAN;
    assert!(search(&nan, &pids, &gallery, &gids, dim, 1).is_err());
}

/// Similarity of unit vectors at distance `d`.
fn sim(d: f64) -> f32 {
    (1.0 - d * d / 2.0) as f32
}

#[test]
fn knn_vote_and_unknown_threshold() {
    // Gallery rows 0..3 of identities A=0, B=1, B=1; distances 0.2, 0.5, 0.6.
    let gids = [0u32, 1, 1];
    let nb = [(0u32, sim(0.2)), (1, sim(0.5)), (2, sim(0.6))];
    // Majority: B has two votes.
    assert_eq!(knn_predict(&nb, &gids, Vote::Uniform, 1.0), Some(1));
    // 1/d: A 5.0 against B 2.0 + 1.67.
    assert_eq!(knn_predict(&nb, &gids, Vote::Distance, 1.0), Some(0));
    // The nearest (0.2) is farther than the threshold: unknown, whatever the vote.
    assert_eq!(knn_predict(&nb, &gids, Vote::Uniform, 0.15), None);
    assert_eq!(knn_predict(&nb, &gids, Vote::Distance, 0.19), None);
    // A match needs d <= threshold: at 0.21 the nearest (0.2 up to rounding) matches.
    assert_eq!(knn_predict(&nb, &gids, Vote::Distance, 0.21), Some(0));
    // Uniform tie (one vote each): the lower identity.
    let nb2 = [(2u32, sim(0.3)), (0, sim(0.4))];
    assert_eq!(knn_predict(&nb2, &gids, Vote::Uniform, 1.0), Some(0));
    // A neighbour at distance 0 takes all the weight (sklearn's weights='distance').
    let nb3 = [(1u32, 1.0), (0, sim(0.01)), (2, sim(0.02))];
    let gids3 = [0u32, 1, 0];
    assert_eq!(knn_predict(&nb3, &gids3, Vote::Distance, 1.0), Some(1));
    assert_eq!(knn_predict(&nb3, &gids3, Vote::Uniform, 1.0), Some(0));
    assert_eq!(knn_predict(&[], &gids, Vote::Uniform, 1.0), None);
}

#[test]
fn cmc_and_dir_at_fpir_by_hand() {
    // Ranks of 4 mated probes (one non-mated) among 4 identities.
    let c = cmc(&[Some(1), Some(2), None, Some(1), Some(4)], 4).unwrap();
    assert_eq!(c, vec![0.5, 0.75, 0.75, 1.0]);
    assert!(cmc(&[None, None], 3).is_err());
    assert!(cmc(&[Some(5)], 3).is_err());
    // (rank 1?, best score) of mated probes; best scores of 10 non-mated probes.
    let mated = [(true, 0.9), (false, 0.8), (true, 0.5), (true, 0.3)];
    let non = [0.95, 0.7, 0.6, 0.55, 0.45, 0.4, 0.35, 0.2, 0.1, 0.05];
    let d = dir_at_fpir(&mated, &non, &[0.01, 0.1, 0.5, 1.0]).unwrap();
    // FPIR 1 %: threshold 0.95 accepts no non-mated probe, and no mated one.
    assert_eq!(
        (d[0].threshold as f32, d[0].fpir, d[0].dir),
        (0.95, 0.0, 0.0)
    );
    // 10 %: threshold 0.7 (strictly above: 0.95 only), the rank-1 probe at 0.9 is found.
    assert_eq!(
        (d[1].threshold as f32, d[1].fpir, d[1].dir),
        (0.7, 0.1, 0.25)
    );
    // 50 %: threshold 0.4; 0.9 and 0.5 found, 0.8 is not at rank 1, 0.3 below.
    assert_eq!(
        (d[2].threshold as f32, d[2].fpir, d[2].dir),
        (0.4, 0.5, 0.5)
    );
    // 100 %: everything accepted; DIR is the rank-1 rate.
    assert_eq!((d[3].fpir, d[3].dir), (1.0, 0.75));
    assert_eq!(d[3].threshold, f64::NEG_INFINITY);
    // Ties among non-mated scores: a threshold on the tie rejects all of them.
    let d = dir_at_fpir(&[(true, 0.6)], &[0.5, 0.5, 0.5, 0.1], &[0.5]).unwrap();
    assert_eq!(
        (d[0].threshold as f32, d[0].fpir, d[0].dir),
        (0.5, 0.0, 1.0)
    );
    assert!(dir_at_fpir(&mated, &[], &[0.1]).is_err());
    assert!(dir_at_fpir(&mated, &non, &[0.0]).is_err());
}

#[test]
fn split_is_seeded_and_keeps_unknown_identities_out() {
    // 10 identities with 1..=10 images each.
    let labels: Vec<i64> = (0..10i64)
        .flat_map(|l| std::iter::repeat_n(l * 3, l as usize + 1))
        .collect();
    let s = split_gallery_probe(&labels, 2, 0.3, 5).unwrap();
    assert_eq!(s, split_gallery_probe(&labels, 2, 0.3, 5).unwrap());
    assert_ne!(s, split_gallery_probe(&labels, 2, 0.3, 6).unwrap());
    assert_eq!(s.unknown.len(), 3);
    let mut all: Vec<usize> = s.gallery.iter().chain(&s.probes).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());
    for l in (0..10i64).map(|l| l * 3) {
        let g = s.gallery.iter().filter(|&&i| labels[i] == l).count();
        let n = labels.iter().filter(|&&x| x == l).count();
        if s.unknown.contains(&l) {
            assert_eq!(g, 0);
        } else {
            assert_eq!(g, n.min(2), "identity {l}");
        }
    }
    // A fraction that rounds to zero still keeps one identity out; none with 0.
    assert_eq!(
        split_gallery_probe(&labels, 1, 0.01, 0)
            .unwrap()
            .unknown
            .len(),
        1
    );
    assert!(split_gallery_probe(&labels, 1, 0.0, 0)
        .unwrap()
        .unknown
        .is_empty());
    assert!(split_gallery_probe(&labels, 0, 0.0, 0).is_err());
    assert!(split_gallery_probe(&labels, 1, 1.0, 0).is_err());
    assert!(split_gallery_probe(&[4, 4], 1, 0.5, 0).is_err());
}

fn read_f32(p: &Path) -> Vec<f32> {
    std::fs::read(p)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn read_i64(p: &Path) -> Vec<i64> {
    std::fs::read(p)
        .unwrap()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn knn_and_cmc_match_scikit_learn() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/identify");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let dim = want["dim"].as_u64().unwrap() as usize;
    let g = read_f32(&dir.join("gallery.f32"));
    let p = read_f32(&dir.join("probes.f32"));
    let gl = read_i64(&dir.join("gallery_labels.i64"));
    let pl = read_i64(&dir.join("probe_labels.i64"));
    let ranks: Vec<Option<u32>> = want["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_u64().map(|r| r as u32))
        .collect();
    let want_cmc: Vec<f64> = want["cmc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for case in want["cases"].as_array().unwrap() {
        let cfg = IdentifyConfig {
            k: case["k"].as_u64().unwrap() as usize,
            vote: if case["vote"] == "uniform" {
                Vote::Uniform
            } else {
                Vote::Distance
            },
            distance_threshold: case["threshold"].as_f64().unwrap(),
            fpirs: vec![0.1],
        };
        let r = identify(&g, &gl, &p, &pl, dim, &cfg).unwrap();
        let got: Vec<i64> = r.predictions.iter().map(|x| x.0.unwrap_or(-1)).collect();
        let exp: Vec<i64> = case["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(got, exp, "case {case}");
        let got_ranks: Vec<Option<u32>> = r.predictions.iter().map(|x| x.1).collect();
        assert_eq!(got_ranks, ranks);
        assert_eq!(r.cmc, want_cmc);
        assert_eq!((r.mated, r.nonmated), (40, 10));
        let correct = exp
            .iter()
            .zip(&pl)
            .filter(|(e, l)| **e == **l || (**e == -1 && **l >= 20))
            .count();
        assert_eq!(r.knn_accuracy, correct as f64 / 50.0);
        assert_eq!(r.dir.len(), 1);
    }
}
