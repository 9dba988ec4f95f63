//! Softmax, centre and triplet losses against naive f64 references and finite differences;
//! the centre update against Wen et al.'s formula; triplet mining against hand-made batches; the
//! P×K batch sampler; centre and triplet training through the loop (resume, reports); plan-time
//! rejection of unusable settings.

use candle_core::{Device, Tensor, Var};
use fpipe_engine::Stage;
use fpipe_stages::kinds::train::TrainStage;
use fpipe_stages::loss::objective::ObjectiveConfig;
use fpipe_stages::loss::softmax::{center_term, center_update, SoftmaxHead};
use fpipe_stages::loss::triplet::{mine, triplet_loss, Mining, Triplet};
use fpipe_stages::models::{mobilefacenet, BackboneConfig};
use fpipe_stages::train::sampler::BatchSampler;
use fpipe_stages::train::trainer::{train, RunEnv, TrainConfig};
use fpipe_stages::train::{FaceSource, TrainError};
use fpipe_stages::util::rng::SplitMix;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

fn randn(n: usize, seed: u64) -> Vec<f64> {
    let mut r = SplitMix::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn fd(f: &dyn Fn(&[f64]) -> f64, at: &[f64]) -> Vec<f64> {
    let h = 1e-6;
    (0..at.len())
        .map(|i| {
            let mut p = at.to_vec();
            let mut m = at.to_vec();
            p[i] += h;
            m[i] -= h;
            (f(&p) - f(&m)) / (2.0 * h)
        })
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs reference {y}"
        );
    }
}

fn var(v: &[f64], shape: (usize, usize)) -> Var {
    Var::from_tensor(&Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()).unwrap()
}

fn grad(g: &candle_core::backprop::GradStore, v: &Var) -> Vec<f64> {
    g.get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

const B: usize = 6;
const D: usize = 4;
const C: usize = 5;

/// Naive mean cross-entropy of `x·Wᵀ + b`.
fn ref_softmax(x: &[f64], w: &[f64], b: &[f64], labels: &[u32]) -> f64 {
    let mut total = 0.0;
    for i in 0..B {
        let z: Vec<f64> = (0..C)
            .map(|j| (0..D).map(|k| x[i * D + k] * w[j * D + k]).sum::<f64>() + b[j])
            .collect();
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        total += lse - z[labels[i] as usize];
    }
    total / B as f64
}

#[test]
fn softmax_value_and_gradients_match_naive_reference() {
    let (x, w, b) = (randn(B * D, 1), randn(C * D, 2), randn(C, 3));
    let labels = [0u32, 4, 2, 2, 1, 3];
    let (xv, wv, bv) = (var(&x, (B, D)), var(&w, (C, D)), var(&b, (1, C)));
    let bv = Var::from_tensor(&bv.as_tensor().reshape(C).unwrap()).unwrap();
    let head = SoftmaxHead {
        weight: wv.clone(),
        bias: bv.clone(),
    };
    let loss = head.loss(xv.as_tensor(), &labels).unwrap();
    let l = loss.to_scalar::<f64>().unwrap();
    let r = ref_softmax(&x, &w, &b, &labels);
    assert!((l - r).abs() < 1e-12, "{l} vs {r}");
    let g = loss.backward().unwrap();
    let rx = fd(&|v| ref_softmax(v, &w, &b, &labels), &x);
    let rw = fd(&|v| ref_softmax(&x, v, &b, &labels), &w);
    let rb = fd(&|v| ref_softmax(&x, &w, v, &labels), &b);
    assert_close(&grad(&g, &xv), &rx, 1e-6, "dL/dx");
    assert_close(&grad(&g, &wv), &rw, 1e-6, "dL/dW");
    assert_close(&grad(&g, &bv), &rb, 1e-6, "dL/db");
}

#[test]
fn center_term_value_and_gradient_match_formula() {
    let (x, c) = (randn(B * D, 4), randn(C * D, 5));
    let labels = [0u32, 4, 2, 2, 1, 0];
    let lambda = 0.3;
    // λ/2 · (1/B) Σ ‖x_i − c_{y_i}‖².
    let reference = |x: &[f64]| {
        (0..B)
            .map(|i| {
                let y = labels[i] as usize;
                (0..D)
                    .map(|k| (x[i * D + k] - c[y * D + k]).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            * lambda
            / (2.0 * B as f64)
    };
    let xv = var(&x, (B, D));
    let ct = Tensor::from_vec(c.clone(), (C, D), &Device::Cpu).unwrap();
    let t = center_term(xv.as_tensor(), &ct, &labels, lambda).unwrap();
    assert!((t.to_scalar::<f64>().unwrap() - reference(&x)).abs() < 1e-12);
    let g = grad(&t.backward().unwrap(), &xv);
    assert_close(&g, &fd(&reference, &x), 1e-6, "dLc/dx");
    // Out-of-range labels are an error, not a panic.
    assert!(center_term(xv.as_tensor(), &ct, &[9, 0, 0, 0, 0, 0], lambda).is_err());
}

#[test]
fn center_update_matches_wen_formula() {
    let dev = Device::Cpu;
    // Centres c0 = (1, 0), c1 = (0, 1), c2 = (5, 5); class 0 twice, class 1 once, 2 absent.
    let c = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0], [5.0, 5.0]], &dev).unwrap();
    let x = Tensor::new(&[[3.0f64, 0.0], [0.0, 3.0], [1.0, 2.0]], &dev).unwrap();
    let new: Vec<Vec<f64>> = center_update(&c, &x, &[0, 1, 0], 0.5)
        .unwrap()
        .to_vec2()
        .unwrap();
    // Δc0 = ((c0 − x0) + (c0 − x2)) / (1 + 2) = (−2/3, −2/3); c0 − 0.5·Δc0 = (4/3, 1/3).
    // Δc1 = (c1 − x1) / (1 + 1) = (0, −1); c1 − 0.5·Δc1 = (0, 1.5). c2 unchanged.
    let want = [[4.0 / 3.0, 1.0 / 3.0], [0.0, 1.5], [5.0, 5.0]];
    for (r, w) in new.iter().zip(&want) {
        assert_close(r, w, 1e-12, "centre");
    }
}

/// Squared distances between points on a line.
fn line_dist(pos: &[f64]) -> Vec<f64> {
    pos.iter()
        .flat_map(|a| pos.iter().map(move |b| (a - b) * (a - b)))
        .collect()
}

fn t(anchor: usize, positive: usize, negative: usize) -> Triplet {
    Triplet {
        anchor,
        positive,
        negative,
    }
}

#[test]
fn semi_hard_mining_picks_the_triplets_of_the_definition() {
    // a0 = 0, a1 = 1 (identity 0); b0 = 1.5, b1 = 3 (identity 1); c0 = −0.4 (identity 2).
    let pos = [0.0, 1.0, 1.5, 3.0, -0.4];
    let labels = [0u32, 0, 1, 1, 2];
    let got = mine(&line_dist(&pos), &labels, Mining::SemiHard);
    // For each (anchor, positive): the closest negative strictly farther than the positive.
    // a0: d(a0,a1) = 1; negatives b0 2.25, b1 9, c0 0.16 → b0.
    // a1: d = 1; b0 0.25, b1 4, c0 1.96 → c0.
    // b0: d(b0,b1) = 2.25; a0 2.25 (equal: not farther), a1 0.25, c0 3.61 → c0.
    // b1: d = 2.25; a0 9, a1 4, c0 11.56 → a1.
    // c0 has no positive.
    assert_eq!(got, vec![t(0, 1, 2), t(1, 0, 4), t(2, 3, 4), t(3, 2, 1)]);
    // No negative farther than the positive: the farthest negative.
    let got = mine(
        &line_dist(&[0.0, 5.0, 1.0, -2.0]),
        &[0, 0, 1, 2],
        Mining::SemiHard,
    );
    // anchor 0: d(0,1) = 25 > 1, 4 → farthest negative 3; anchor 1: 16, 49 → 3 (49 > 25).
    assert_eq!(got, vec![t(0, 1, 3), t(1, 0, 3)]);
    // Every anchor-positive pair is used: three images of one identity give six pairs.
    let got = mine(
        &line_dist(&[0.0, 0.1, 0.2, 5.0]),
        &[7, 7, 7, 8],
        Mining::SemiHard,
    );
    assert_eq!(got.len(), 6);
}

#[test]
fn batch_hard_mining_takes_farthest_positive_and_closest_negative() {
    let pos = [0.0, 1.0, 1.5, 3.0, -0.4, 2.0];
    let labels = [0u32, 0, 1, 1, 2, 0];
    let got = mine(&line_dist(&pos), &labels, Mining::BatchHard);
    // a0: positives a1 (1), a2 (4) → a2 = 5; negatives b0 2.25, b1 9, c0 0.16 → 4.
    // a1: positives 1, 1 (tie → lower index 0); negatives 0.25, 4, 1.96 → 2.
    // b0: positive 3; negatives a0 2.25, a1 0.25, c0 3.61, a2 0.25 (tie → 1) → 1.
    // b1: positive 2; negatives 9, 4, 11.56, 1 → 5.
    // c0: no positive. a2: positives 4, 1 → 0; negatives 0.25, 1, 5.76 → 2.
    assert_eq!(
        got,
        vec![t(0, 5, 4), t(1, 0, 2), t(2, 3, 1), t(3, 2, 5), t(5, 0, 2)]
    );
}

fn normalise(v: &[f64], d: usize) -> Vec<f64> {
    v.chunks(d)
        .flat_map(|r| {
            let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
            r.iter().map(move |x| x / n)
        })
        .collect()
}

/// Naive triplet loss on normalised rows with fixed triplets; returns (mean hinge, active).
fn ref_triplet(x: &[f64], triplets: &[Triplet], margin: f64) -> (f64, usize) {
    let e = normalise(x, D);
    let d = |i: usize, j: usize| {
        (0..D)
            .map(|k| (e[i * D + k] - e[j * D + k]).powi(2))
            .sum::<f64>()
    };
    let h: Vec<f64> = triplets
        .iter()
        .map(|t| (d(t.anchor, t.positive) - d(t.anchor, t.negative) + margin).max(0.0))
        .collect();
    (
        h.iter().sum::<f64>() / h.len() as f64,
        h.iter().filter(|v| **v > 0.0).count(),
    )
}

#[test]
fn triplet_loss_value_gradient_and_active_fraction_match_reference() {
    const N: usize = 8;
    let x = randn(N * D, 21);
    let labels = [0u32, 0, 1, 1, 2, 2, 3, 3];
    for mining in [Mining::SemiHard, Mining::BatchHard] {
        let xv = var(&x, (N, D));
        let out = triplet_loss(xv.as_tensor(), &labels, 0.5, mining).unwrap();
        // The mined triplets are those of the definition on the normalised embeddings.
        let e = normalise(&x, D);
        let dist: Vec<f64> = (0..N * N)
            .map(|ij| {
                let (i, j) = (ij / N, ij % N);
                (0..D).map(|k| (e[i * D + k] - e[j * D + k]).powi(2)).sum()
            })
            .collect();
        assert_eq!(out.triplets, mine(&dist, &labels, mining));
        let (rl, active) = ref_triplet(&x, &out.triplets, 0.5);
        let l = out.loss.to_scalar::<f64>().unwrap();
        assert!((l - rl).abs() < 1e-12, "{mining:?}: {l} vs {rl}");
        let frac = active as f64 / out.triplets.len() as f64;
        assert_eq!(out.active_fraction, frac);
        assert!(
            frac > 0.0 && frac < 1.0,
            "{mining:?}: the batch mixes active and inactive triplets ({frac})"
        );
        let g = grad(&out.loss.backward().unwrap(), &xv);
        let r = fd(&|v| ref_triplet(v, &out.triplets, 0.5).0, &x);
        assert_close(&g, &r, 1e-5, &format!("{mining:?} dL/dx"));
    }
}

/// Labels from a list; images are flat grey levels per label.
struct Labelled(Vec<u32>);

impl FaceSource for Labelled {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn num_classes(&self) -> usize {
        self.0.iter().max().map_or(0, |m| *m as usize + 1)
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        (24, 24, 3)
    }
    fn label(&self, i: usize) -> u32 {
        self.0[i]
    }
    fn read_image(&self, i: usize, out: &mut [u8]) -> Result<(), TrainError> {
        let mut base = SplitMix::new(self.label(i) as u64);
        let mut noise = SplitMix::new(1000 + i as u64);
        for o in out.iter_mut() {
            *o = ((base.uniform() * 200.0) + noise.uniform() * 55.0) as u8;
        }
        Ok(())
    }
}

#[test]
fn identity_sampler_builds_p_by_k_batches_deterministically() {
    // Identity 0: 5 images, 1: 3, 2: 1 (cannot give a positive: never sampled), 3: 2, 4: 4.
    let labels: Vec<u32> = [0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4].to_vec();
    let data = Labelled(labels.clone());
    let (p, k) = (2, 3);
    let mut s = BatchSampler::identities(&data, p, k, 9).unwrap();
    let mut seen_per_epoch = vec![];
    // Four eligible identities, two per batch: steps 0-1 are epoch 0, 2-3 epoch 1.
    for step in 0..4u64 {
        let b = s.batch(step);
        assert_eq!(b.len(), p * k);
        for g in b.chunks(k) {
            let l = labels[g[0]];
            assert!(g.iter().all(|&i| labels[i] == l), "a group is one identity");
            assert_ne!(l, 2, "an identity with one image is never sampled");
            let n = labels.iter().filter(|&&x| x == l).count();
            let mut distinct = g.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                n.min(k),
                "images repeat only when fewer than K"
            );
            seen_per_epoch.push(l);
        }
        // A fresh sampler (a resumed run) gives the same batch.
        let mut fresh = BatchSampler::identities(&data, p, k, 9).unwrap();
        assert_eq!(fresh.batch(step), b);
    }
    for epoch in seen_per_epoch.chunks(4) {
        let mut e = epoch.to_vec();
        e.sort_unstable();
        assert_eq!(
            e,
            vec![0, 1, 3, 4],
            "each epoch visits every eligible identity once"
        );
    }
    // Another seed, another order.
    let mut other = BatchSampler::identities(&data, p, k, 10).unwrap();
    assert!((0..4).any(|st| other.batch(st) != s.batch(st)));
    // Too few identities for P.
    let e = BatchSampler::identities(&data, 5, 2, 0).err().unwrap();
    assert!(e.to_string().contains("need 5 identities"), "{e}");
}

fn tiny_config(steps: u64, objective: ObjectiveConfig) -> TrainConfig {
    let backbone = BackboneConfig::Mobilefacenet(mobilefacenet::Config {
        width: 0.0625,
        input_size: 32,
        num_features: 16,
        ..Default::default()
    });
    TrainConfig {
        objective,
        lr: 0.05,
        warmup_steps: 2,
        batch_size: 8,
        seed: 3,
        ..TrainConfig::arcface_torch(backbone, steps)
    }
}

fn env<'a>(
    scratch: &Path,
    every: u64,
    stop: Option<u64>,
    on_step: &'a (dyn Fn(u64, u64, f64, f64, f64) + Sync),
    cancelled: &'a (dyn Fn() -> bool + Sync),
) -> RunEnv<'a> {
    RunEnv {
        device: Device::Cpu,
        scratch: scratch.to_path_buf(),
        checkpoint_every: every,
        init: None,
        teacher: None,
        on_step,
        cancelled,
        stop_after: stop,
    }
}

#[test]
fn center_and_triplet_training_resume_identically_and_report_extras() {
    let data = Labelled((0..30).map(|i| i / 5).collect());
    let nop = |_: u64, _: u64, _: f64, _: f64, _: f64| {};
    let no = || false;
    let objectives = [
        ObjectiveConfig::Center {
            lambda: 0.003,
            alpha: 0.5,
        },
        ObjectiveConfig::Triplet {
            margin: 0.2,
            mining: Mining::SemiHard,
            per_identity: 4,
        },
    ];
    for objective in objectives {
        let cfg = tiny_config(7, objective.clone());
        let tmp = tempfile::tempdir().unwrap();
        let full = train(&cfg, &data, &env(&tmp.path().join("a"), 0, None, &nop, &no)).unwrap();
        let b = tmp.path().join("b");
        train(&cfg, &data, &env(&b, 3, Some(5), &nop, &no)).unwrap();
        let resumed = train(&cfg, &data, &env(&b, 3, None, &nop, &no)).unwrap();
        assert_eq!(resumed.resumed_at, 3);
        assert_eq!(full.curve, resumed.curve, "{objective:?}");
        let (wa, wr) = (full.store.tensors(""), resumed.store.tensors(""));
        assert_eq!(wa.len(), wr.len());
        for (k, t) in &wa {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = wr[k].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(x, y, "{objective:?}: {k}");
        }
        for c in &full.curve {
            let e = c.extra.expect("every step reports its extra");
            match objective {
                ObjectiveConfig::Triplet { .. } => assert!((0.0..=1.0).contains(&e)),
                _ => assert!(e >= 0.0 && e.is_finite()),
            }
        }
        match objective {
            ObjectiveConfig::Center { .. } => {
                // The centres moved off zero, by the update rule rather than the optimiser, and
                // have no head bias in the optimiser's way.
                let c: Vec<f32> = wa["loss.centres"].flatten_all().unwrap().to_vec1().unwrap();
                assert!(c.iter().any(|v| *v != 0.0));
                assert!(wa.contains_key("head.bias"));
            }
            _ => assert!(
                !wa.keys().any(|k| k.starts_with("head.")),
                "triplet has no head"
            ),
        }
    }
}

fn check(over: Value) -> Result<(), String> {
    let stage = TrainStage;
    let mut p: BTreeMap<String, Value> = stage
        .signature()
        .params
        .iter()
        .filter_map(|s| s.default.clone().map(|d| (s.name.to_string(), d)))
        .collect();
    for (k, v) in over.as_object().unwrap() {
        p.insert(k.clone(), v.clone());
    }
    stage.check_params(&p)
}

#[test]
fn unusable_loss_settings_are_rejected_at_plan_time() {
    for loss in [
        "softmax",
        "norm-softmax",
        "center",
        "triplet",
        "sphereface",
        "arcface",
    ] {
        assert_eq!(check(json!({"loss": loss})), Ok(()), "{loss}");
    }
    let cases = [
        (
            json!({"loss": "triplet", "batch_size": 30, "triplet_k": 4}),
            "must be a multiple of triplet_k",
        ),
        (
            json!({"loss": "triplet", "triplet_k": 1}),
            "triplet_k must be at least 2",
        ),
        (
            json!({"loss": "triplet", "triplet_margin": 0.0}),
            "triplet_margin must be > 0",
        ),
        (
            json!({"loss": "center", "center_alpha": 1.5}),
            "center_alpha",
        ),
        (
            json!({"loss": "center", "center_lambda": -1.0}),
            "center_lambda",
        ),
        (
            json!({"loss": "softmax", "sample_rate": 0.5}),
            "margin losses only",
        ),
        (
            json!({"loss": "custom", "m1": 9.5}),
            "m1 must lie in (0, 8]",
        ),
        (
            json!({"loss": "sphereface", "sphere_lambda_min": -1.0}),
            "sphere_lambda",
        ),
    ];
    for (over, msg) in cases {
        let e = check(over.clone()).unwrap_err();
        assert!(e.contains(msg), "{over}: {e}");
    }
    // Real m1 with m2: the full combined margin is accepted.
    assert_eq!(
        check(json!({"loss": "custom", "m1": 1.35, "m2": 0.2, "m3": 0.1})),
        Ok(())
    );
}
