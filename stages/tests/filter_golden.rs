//! Data set filtering (`fpipe_stages::eval::filter`) against networkx and scikit-learn (golden files
//! of `tests/golden/filter/make_filter.py`), the quality-graph edge rule on a hand-made case,
//! and graph versus DBSCAN on a synthetic-faces set with injected label noise.

use fpipe_stages::eval::filter::dbscan::dbscan;
use fpipe_stages::eval::filter::graph::{communities, quality_graph, Graph};
use fpipe_stages::eval::filter::{filter, precision_recall, Method, Reason};
use serde_json::Value;
use std::path::Path;

fn golden() -> (Value, Vec<f32>, Vec<f32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/filter");
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        std::fs::read(dir.join(name))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    (v, f32s("points.f32"), f32s("quality.f32"))
}

fn edges(case: &Value) -> Vec<(usize, usize)> {
    case["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[0].as_u64().unwrap() as usize,
                e[1].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn label_propagation_matches_networkx() {
    let (v, _, _) = golden();
    let graphs = v["graphs"].as_array().unwrap();
    assert_eq!(graphs.len(), 9);
    let mut multi = 0;
    for (k, case) in graphs.iter().enumerate() {
        let n = case["n"].as_u64().unwrap() as usize;
        let g = Graph::from_edges(n, &edges(case)).unwrap();
        let want = ints(&case["communities"]);
        multi += (want.iter().max() > Some(&1)) as usize;
        assert_eq!(communities(&g).unwrap(), want, "graph {k} ({n} nodes)");
    }
    // The cases are not trivial: most split into several communities.
    assert!(multi >= 5, "{multi}");
}

#[test]
fn quality_graph_and_its_communities_match_python() {
    let (v, pts, q) = golden();
    let dim = v["dim"].as_u64().unwrap() as usize;
    for case in v["quality_graph"].as_array().unwrap() {
        let offset = case["offset"].as_f64().unwrap();
        let g = quality_graph(&pts, dim, &q, offset);
        let want = Graph::from_edges(q.len(), &edges(case)).unwrap();
        assert_eq!(g, want, "offset {offset}: edges");
        assert_eq!(
            communities(&g).unwrap(),
            ints(&case["communities"]),
            "offset {offset}"
        );
    }
}

#[test]
fn dbscan_matches_scikit_learn() {
    let (v, pts, _) = golden();
    let dim = v["dim"].as_u64().unwrap() as usize;
    for case in v["dbscan"].as_array().unwrap() {
        let eps = case["eps"].as_f64().unwrap();
        let ms = case["min_samples"].as_u64().unwrap() as usize;
        assert_eq!(
            dbscan(&pts, dim, eps, ms),
            ints(&case["labels"]),
            "eps {eps}, min_samples {ms}"
        );
    }
}

/// Unit vector at `deg` degrees in the plane.
fn at(deg: f64) -> [f32; 2] {
    let r = deg.to_radians();
    [r.cos() as f32, r.sin() as f32]
}

#[test]
fn edge_threshold_is_the_lower_quality_minus_offset() {
    // cos(60 deg) = 0.5. Qualities: 0 sharp (0.9), 1 sharp (0.9), 2 blurry (0.55).
    // 0-1 at 20 deg: cos 0.940 >= 0.9 - 0.1 = 0.8: joined.
    // 0-2 at 60 deg: cos 0.5 >= min(0.9, 0.55) - 0.1 = 0.45: joined (the blurry image's
    //   quality sets the bar); with quality 0.65 the bar is 0.55 and they are not joined.
    // 1-2 at 40 deg: cos 0.766 >= 0.45: joined.
    let emb: Vec<f32> = [0.0, 20.0, 60.0].iter().flat_map(|&d| at(d)).collect();
    let g = quality_graph(&emb, 2, &[0.9, 0.9, 0.55], 0.1);
    assert_eq!(g, Graph::from_edges(3, &[(0, 1), (0, 2), (1, 2)]).unwrap());
    let g = quality_graph(&emb, 2, &[0.9, 0.9, 0.65], 0.1);
    assert_eq!(g, Graph::from_edges(3, &[(0, 1), (1, 2)]).unwrap());
    // Equality joins: cos([1,0,0,0], [1,1,1,1]) = 1/2 exactly, and 0.75 - 0.25 = 0.5.
    let exact = [1.0f32, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
    assert_eq!(quality_graph(&exact, 4, &[0.75, 1.0], 0.25).edges(), 1);
    assert_eq!(quality_graph(&exact, 4, &[1.0, 0.75], 0.25).edges(), 1);
    assert_eq!(
        quality_graph(&exact, 4, &[0.75, 1.0], 0.25 - 1.0 / 1024.0).edges(),
        0
    );
    // Sharp images 50 degrees apart are not joined; offset 0.4 joins them.
    let emb: Vec<f32> = [0.0, 50.0].iter().flat_map(|&d| at(d)).collect();
    assert_eq!(quality_graph(&emb, 2, &[1.0, 1.0], 0.1).edges(), 0);
    assert_eq!(quality_graph(&emb, 2, &[1.0, 1.0], 0.4).edges(), 1);
}

#[test]
fn filter_keeps_the_largest_community_and_reports_reasons() {
    // Identity 7: images 0..4 together, 4 and 5 together elsewhere, 6 alone.
    // Identity 3: images 7, 8 together.
    let degs = [0.0, 5.0, 10.0, 15.0, 120.0, 125.0, 240.0, 30.0, 32.0];
    let emb: Vec<f32> = degs.iter().flat_map(|&d| at(d)).collect();
    let labels = [7, 7, 7, 7, 7, 7, 7, 3, 3];
    let q = [0.9f32; 9];
    for m in [
        Method::Graph { offset: 0.1 },
        Method::Dbscan {
            eps: 0.3,
            min_samples: 2,
        },
    ] {
        let o = filter(&emb, 2, &labels, &q, m).unwrap();
        let mut want = vec![None; 9];
        want[4] = Some(Reason::SmallerCluster);
        want[5] = Some(Reason::SmallerCluster);
        want[6] = Some(Reason::Noise);
        assert_eq!(o.removed, want, "{m:?}");
        assert_eq!(o.kept(), 6);
        assert_eq!(o.identities[0].label, 3);
        assert_eq!(o.identities[1].sizes, vec![4, 2]);
        assert_eq!(o.identities[1].kept, Some(0));
    }
    // A quality outside [0, 1] or misaligned inputs are errors.
    assert!(filter(&emb, 2, &labels, &[1.5; 9], Method::Graph { offset: 0.1 }).is_err());
    assert!(filter(
        &emb,
        2,
        &labels[..8],
        &q[..8],
        Method::Graph { offset: 0.1 }
    )
    .is_err());
}

/// Deterministic standard normal values (LCG + Box-Muller).
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn next(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// The data set is synthetic-faces' (30 identities x 10 images, 10% label noise, 10% low
/// quality), generated here. The embeddings are NOT from a model: they are built from the
/// ground truth, `normalise(centre[identity shown] + s * noise)` in 32 dimensions with a random
/// unit centre per identity, s = 0.08 for clean images (same-identity cosine about 0.83) and
/// 0.25 for low-quality ones (about 0.53 with a clean image, 0.33 with another low-quality
/// one); so a label-noise image sits with the identity it really shows. Quality is also from
/// the ground truth: 0.85 clean, 0.35 low quality. Graph (offset 0.1) and DBSCAN (eps 0.3,
/// min_samples 2) run on the same inputs. The case is the one the quality graph is made for:
/// blurry but correctly labelled images lie far from their identity, and DBSCAN's single
/// radius drops them while the graph lowers the bar for them. Measured: graph precision 1.000,
/// recall 0.933 (28 removed); DBSCAN precision 0.556, recall 1.000 (54 removed). The graph
/// does NOT beat DBSCAN on recall here: the lower bar also lets 2 of the 30 mislabelled images
/// join their false identity through a low-quality image. So the test asserts higher
/// precision, a higher F1, and recall of at least 0.9.
#[test]
fn graph_is_more_precise_than_dbscan_on_injected_label_noise() {
    use fpipe_stages::data::synth::{generate, SynthParams};
    use fpipe_stages::data::PackedDataset;
    let dir = tempfile::tempdir().unwrap();
    let p = SynthParams {
        identities: 30,
        images_per_identity: 10,
        image_size: 16,
        label_noise: 0.1,
        low_quality: 0.1,
        pairs: 0,
        test_identities: 0,
        test_images_per_identity: 0,
        ..SynthParams::default()
    };
    let counts = generate(&p, dir.path(), None, &()).unwrap();
    assert_eq!((counts.label_noise, counts.low_quality), (30, 30));
    let data = PackedDataset::open(dir.path()).unwrap();
    let n = data.len();
    let dim = 32;
    let mut rng = Normal(42);
    let centres: Vec<Vec<f64>> = (0..p.identities)
        .map(|_| {
            let c: Vec<f64> = (0..dim).map(|_| rng.next()).collect();
            let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
            c.iter().map(|x| x / norm).collect()
        })
        .collect();
    let (mut emb, mut quality, mut labels, mut noisy) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let t = data.truth(i);
        let shown = t.true_label.unwrap() as usize;
        let s = if t.low_quality { 0.25 } else { 0.08 };
        let e: Vec<f64> = centres[shown].iter().map(|c| c + s * rng.next()).collect();
        let norm = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        emb.extend(e.iter().map(|x| (x / norm) as f32));
        quality.push(if t.low_quality { 0.35f32 } else { 0.85 });
        labels.push(data.label(i));
        noisy.push(t.label_noise);
    }
    let run = |m: Method| {
        let o = filter(&emb, dim, &labels, &quality, m).unwrap();
        let (p, r) = precision_recall(&o.removed, &noisy);
        (p.unwrap(), r.unwrap(), n - o.kept())
    };
    let (gp, gr, gn) = run(Method::Graph { offset: 0.1 });
    let (dp, dr, dn) = run(Method::Dbscan {
        eps: 0.3,
        min_samples: 2,
    });
    println!("graph: precision {gp:.3} recall {gr:.3} removed {gn}; dbscan: precision {dp:.3} recall {dr:.3} removed {dn}");
    let f1 = |p: f64, r: f64| 2.0 * p * r / (p + r);
    assert!(gp > dp, "precision: graph {gp}, dbscan {dp}");
    assert!(
        f1(gp, gr) > f1(dp, dr),
        "F1: graph {gp}/{gr}, dbscan {dp}/{dr}"
    );
    assert!(gr >= 0.9, "recall: graph {gr}");
}
