//! Margin losses, angular distillation, PartialFC sampling and the optimisers against naive
//! f64 reference computations (with `acos`, which candle lacks) and finite differences.

use candle_core::{DType, Device, Tensor, Var};
use fpipe_stages::loss::{
    angular_distillation, cross_entropy, margin_logits, partial_fc_sample, LambdaSchedule,
    MarginConfig, MarginHead, MarginVariant,
};
use fpipe_stages::train::optim::{clip_grad_norm, Optimizer, ParamEntry, PolySchedule};
use fpipe_stages::util::rng::SplitMix;
use std::f64::consts::PI;

const B: usize = 5;
const D: usize = 6;
const C: usize = 7;

fn randn(n: usize, seed: u64) -> Vec<f64> {
    let mut r = SplitMix::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn norm_rows(v: &[f64], d: usize) -> Vec<f64> {
    v.chunks(d)
        .flat_map(|r| {
            let n = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            r.iter().map(move |x| x / n)
        })
        .collect()
}

/// Target value by the textbook definition (acos), for each variant; `lambda` is SphereFace's
/// blend `(λ·cosθ + ψ(θ))/(1 + λ)`.
fn ref_target(t: f64, cfg: &MarginConfig, lambda: f64) -> f64 {
    let theta = t.acos();
    if cfg.m1 != 1.0 {
        let phi = cfg.m1 * theta + cfg.m2;
        // The last piece ends at θ = π: k < ⌈(m1·π + m2)/π⌉.
        let k_max = ((cfg.m1 * PI + cfg.m2) / PI).ceil() - 1.0;
        let k = (phi / PI).floor().min(k_max);
        let sign = if (k as usize).is_multiple_of(2) {
            1.0
        } else {
            -1.0
        };
        let psi = sign * phi.cos() - 2.0 * k;
        return (lambda * t + psi) / (1.0 + lambda) - cfg.m3;
    }
    let m = cfg.m2;
    let v = match cfg.variant {
        MarginVariant::StraightThrough => (theta + m).cos(),
        MarginVariant::Differentiable => {
            if m == 0.0 || t > (PI - m).cos() {
                (theta + m).cos()
            } else {
                t - (PI - m).sin() * m
            }
        }
        MarginVariant::EasyMargin => {
            if m == 0.0 || t > 0.0 {
                (theta + m).cos()
            } else {
                t
            }
        }
    };
    v - cfg.m3
}

/// Naive loss. `fixed_delta`: straight-through surrogate (target offset held constant).
/// Returns (value with p_y clamped at 1e-30, unclamped value, target offsets).
fn ref_loss3(
    x: &[f64],
    w: &[f64],
    labels: &[u32],
    cfg: &MarginConfig,
    fixed_delta: Option<&[f64]>,
    lambda: f64,
) -> (f64, f64, Vec<f64>) {
    let xn = norm_rows(x, D);
    let wn = norm_rows(w, D);
    let mut total = 0.0;
    let mut clamped = 0.0;
    let mut deltas = vec![];
    for i in 0..B {
        let y = labels[i] as usize;
        let mut logits = [0.0; C];
        for j in 0..C {
            let c: f64 = (0..D).map(|k| xn[i * D + k] * wn[j * D + k]).sum();
            let mut c = c.clamp(-1.0, 1.0);
            if cfg.interclass_threshold > 0.0 && j != y && c > cfg.interclass_threshold {
                c = 0.0;
            }
            logits[j] = c;
        }
        let t = logits[y];
        let delta = match fixed_delta {
            Some(d) => d[i],
            None => ref_target(t, cfg, lambda) - t,
        };
        deltas.push(delta);
        logits[y] = t + delta;
        let z: Vec<f64> = logits.iter().map(|l| l * cfg.s).collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln() + mx;
        total += lse - z[y];
        clamped += (lse - z[y]).min(-(1e-30f64.ln()));
    }
    (clamped / B as f64, total / B as f64, deltas)
}

/// (clamped value, offsets) for value checks; finite differences use the unclamped value.
fn ref_loss(
    x: &[f64],
    w: &[f64],
    labels: &[u32],
    cfg: &MarginConfig,
    fixed_delta: Option<&[f64]>,
    lambda: f64,
) -> (f64, Vec<f64>) {
    let (c, _, d) = ref_loss3(x, w, labels, cfg, fixed_delta, lambda);
    (c, d)
}

fn setup(seed: u64) -> (Vec<f64>, Vec<f64>, Vec<u32>) {
    let mut x = randn(B * D, seed);
    let w = randn(C * D, seed + 100);
    let labels = vec![0u32, 3, 6, 2, 3];
    // Row 4 points away from its class centre: θ near π exercises the threshold branches.
    for k in 0..D {
        x[4 * D + k] = -w[3 * D + k] + 0.05 * x[4 * D + k];
    }
    (x, w, labels)
}

fn candle_loss(
    x: &[f64],
    w: &[f64],
    labels: &[u32],
    cfg: &MarginConfig,
    iter: u64,
) -> (f64, Vec<f64>, Vec<f64>) {
    let dev = Device::Cpu;
    let xv = Var::from_tensor(&Tensor::from_vec(x.to_vec(), (B, D), &dev).unwrap()).unwrap();
    let wv = Var::from_tensor(&Tensor::from_vec(w.to_vec(), (C, D), &dev).unwrap()).unwrap();
    let head = MarginHead::new(wv.clone(), cfg.clone(), 1.0).unwrap();
    let loss = head
        .loss_at(xv.as_tensor(), labels, &mut SplitMix::new(0), iter)
        .unwrap();
    let g = loss.backward().unwrap();
    let gx = g
        .get(xv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let gw = g
        .get(wv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (loss.to_scalar::<f64>().unwrap(), gx, gw)
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

fn check(cfg: MarginConfig) {
    check_at(cfg, 0);
}

/// Value and gradients at training iteration `iter` (SphereFace's λ depends on it).
fn check_at(cfg: MarginConfig, iter: u64) {
    let (x, w, labels) = setup(7);
    let lambda = cfg.lambda_at(iter);
    let (loss, gx, gw) = candle_loss(&x, &w, &labels, &cfg, iter);
    let (rl, deltas) = ref_loss(&x, &w, &labels, &cfg, None, lambda);
    assert!(
        (loss - rl).abs() < 1e-9 * rl.abs().max(1.0),
        "{cfg:?}: loss {loss} vs {rl}"
    );
    // SphereFace's ψ is differentiable under every variant.
    let straight = cfg.variant == MarginVariant::StraightThrough && cfg.m2 != 0.0 && cfg.m1 == 1.0;
    let fixed = if straight {
        Some(deltas.as_slice())
    } else {
        None
    };
    let rx = fd(&|xx| ref_loss3(xx, &w, &labels, &cfg, fixed, lambda).1, &x);
    let rw = fd(&|ww| ref_loss3(&x, ww, &labels, &cfg, fixed, lambda).1, &w);
    assert_close(&gx, &rx, 1e-5, &format!("{cfg:?} dL/dx"));
    assert_close(&gw, &rw, 1e-5, &format!("{cfg:?} dL/dW"));
}

fn cfg(m1: f64, m2: f64, m3: f64, variant: MarginVariant) -> MarginConfig {
    MarginConfig {
        s: 16.0,
        m1,
        m2,
        m3,
        variant,
        interclass_threshold: 0.0,
        sphere_lambda: None,
    }
}

#[test]
fn arcface_differentiable_matches_reference() {
    check(cfg(1.0, 0.5, 0.0, MarginVariant::Differentiable));
}

#[test]
fn arcface_easy_margin_matches_reference() {
    check(cfg(1.0, 0.5, 0.0, MarginVariant::EasyMargin));
}

#[test]
fn arcface_straight_through_value_and_surrogate_gradient() {
    check(cfg(1.0, 0.5, 0.0, MarginVariant::StraightThrough));
}

#[test]
fn cosface_and_combined_match_reference() {
    check(cfg(1.0, 0.0, 0.4, MarginVariant::Differentiable));
    check(cfg(1.0, 0.3, 0.2, MarginVariant::Differentiable));
    check(cfg(1.0, 0.3, 0.2, MarginVariant::StraightThrough));
}

#[test]
fn sphereface_psi_matches_reference() {
    check(cfg(2.0, 0.0, 0.0, MarginVariant::Differentiable));
    check(cfg(4.0, 0.0, 0.0, MarginVariant::Differentiable));
    check(cfg(3.0, 0.0, 0.1, MarginVariant::Differentiable));
}

#[test]
fn sphereface_real_m_and_combined_m2_match_reference() {
    // Real m1: k = ⌊m1·θ/π⌋ with a partial last piece.
    check(cfg(1.5, 0.0, 0.0, MarginVariant::Differentiable));
    check(cfg(2.7, 0.0, 0.2, MarginVariant::Differentiable));
    // The full combined margin: ψ of m1·θ + m2, then − m3; the ArcFace paper's CM2 has m1 < 1.
    check(cfg(2.0, 0.3, 0.1, MarginVariant::Differentiable));
    check(cfg(0.9, 0.4, 0.15, MarginVariant::StraightThrough));
    // ψ is trained through even with the straight-through default.
    check(cfg(4.0, 0.0, 0.0, MarginVariant::StraightThrough));
}

#[test]
fn sphereface_lambda_schedule_and_blend_match_reference() {
    let sched = LambdaSchedule::default();
    // λ = max(5, 1000·(1 + 0.12·iter)^−1).
    assert_eq!(sched.at(0), 1000.0);
    assert!((sched.at(100) - 1000.0 / 13.0).abs() < 1e-12);
    assert_eq!(sched.at(10_000), 5.0);
    let mut c = cfg(4.0, 0.0, 0.0, MarginVariant::Differentiable);
    c.sphere_lambda = Some(sched);
    assert_eq!(c.lambda_at(100), sched.at(100));
    for iter in [0, 100, 10_000] {
        check_at(c.clone(), iter);
    }
    // Far into training (λ = 5) the loss is larger than early on (λ = 1000, nearly softmax):
    // the margin is phased in.
    let (x, w, labels) = setup(7);
    let early = candle_loss(&x, &w, &labels, &c, 0).0;
    let late = candle_loss(&x, &w, &labels, &c, 10_000).0;
    assert!(late > early, "λ=5 loss {late} vs λ=1000 loss {early}");
    // Without m1 > 1 there is no λ.
    let mut a = MarginConfig::arcface();
    a.sphere_lambda = Some(sched);
    assert_eq!(a.lambda_at(0), 0.0);
}

#[test]
fn interclass_filtering_matches_reference() {
    let mut c = cfg(1.0, 0.5, 0.0, MarginVariant::Differentiable);
    c.interclass_threshold = 0.2;
    // The check requires that some non-target cosine is above the threshold.
    let (x, w, labels) = setup(7);
    let (xn, wn) = (norm_rows(&x, D), norm_rows(&w, D));
    let above = (0..B).any(|i| {
        (0..C).any(|j| {
            j != labels[i] as usize
                && (0..D).map(|k| xn[i * D + k] * wn[j * D + k]).sum::<f64>() > 0.2
        })
    });
    assert!(above);
    check(c);
}

#[test]
fn invalid_margins_are_rejected_with_a_message() {
    for m1 in [0.0, -1.0, 9.0, f64::NAN] {
        let e = cfg(m1, 0.0, 0.0, MarginVariant::Differentiable)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("m1 must lie in (0, 8]"), "{e}");
    }
    let mut c = cfg(4.0, 0.0, 0.0, MarginVariant::Differentiable);
    c.sphere_lambda = Some(LambdaSchedule {
        min: -1.0,
        ..LambdaSchedule::default()
    });
    let e = c.validate().unwrap_err();
    assert!(e.to_string().contains("sphere_lambda"), "{e}");
    assert!(cfg(1.5, 0.0, 0.0, MarginVariant::Differentiable)
        .validate()
        .is_ok());
    assert!(cfg(4.0, 0.5, 0.0, MarginVariant::Differentiable)
        .validate()
        .is_ok());
    assert!(MarginConfig::arcface().validate().is_ok());
    assert!(MarginConfig::cosface().validate().is_ok());
    assert!(MarginConfig::norm_softmax().validate().is_ok());
}

#[test]
fn cross_entropy_matches_naive_softmax() {
    let dev = Device::Cpu;
    let z = randn(B * C, 3);
    let labels = [1u32, 0, 6, 2, 2];
    let t = Tensor::from_vec(z.clone(), (B, C), &dev).unwrap();
    let l = cross_entropy(&t, &labels)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let mut r = 0.0;
    for i in 0..B {
        let row = &z[i * C..(i + 1) * C];
        let s: f64 = row.iter().map(|v| v.exp()).sum();
        r -= (row[labels[i] as usize].exp() / s).ln();
    }
    assert!((l - r / B as f64).abs() < 1e-12);
    // margin_logits with zero margins is s·cos.
    let cos = Tensor::from_vec(vec![0.1f64, -0.2, 0.3, 0.4], (2, 2), &dev).unwrap();
    let c = MarginConfig {
        s: 2.0,
        m2: 0.0,
        ..MarginConfig::arcface()
    };
    let ml: Vec<f64> = margin_logits(&cos, &[0, 1], &c, 0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_close(&ml, &[0.2, -0.4, 0.6, 0.8], 1e-12, "logits");
}

#[test]
fn angular_distillation_value_and_gradient() {
    let dev = Device::Cpu;
    let s = randn(B * D, 11);
    let t = randn(B * D, 12);
    let ref_l = |s: &[f64]| {
        let (sn, tn) = (norm_rows(s, D), norm_rows(&t, D));
        sn.iter()
            .zip(&tn)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            / B as f64
    };
    let sv = Var::from_tensor(&Tensor::from_vec(s.clone(), (B, D), &dev).unwrap()).unwrap();
    let tt = Tensor::from_vec(t.clone(), (B, D), &dev).unwrap();
    let l = angular_distillation(sv.as_tensor(), &tt).unwrap();
    assert!((l.to_scalar::<f64>().unwrap() - ref_l(&s)).abs() < 1e-12);
    let g: Vec<f64> = l
        .backward()
        .unwrap()
        .get(sv.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_close(&g, &fd(&ref_l, &s), 1e-6, "distil grad");
}

#[test]
fn partial_fc_keeps_positives_and_remaps_labels() {
    let labels = [5u32, 17, 5, 99, 0];
    let mut rng = SplitMix::new(1);
    let (idx, remap) = partial_fc_sample(&labels, 100, 0.1, &mut rng);
    assert_eq!(idx.len(), 10);
    assert!(idx.windows(2).all(|w| w[0] < w[1]));
    for (l, r) in labels.iter().zip(&remap) {
        assert_eq!(idx[*r as usize], *l);
    }
    // More positives than the sample size: exactly the positives.
    let (idx, _) = partial_fc_sample(&labels, 100, 0.02, &mut rng);
    assert_eq!(idx, vec![0, 5, 17, 99]);
}

#[test]
fn partial_fc_loss_and_gradient_only_touch_sampled_centres() {
    let dev = Device::Cpu;
    let (x, w, labels) = setup(3);
    let c = cfg(1.0, 0.5, 0.0, MarginVariant::Differentiable);
    let xv = Tensor::from_vec(x.clone(), (B, D), &dev).unwrap();
    let wv = Var::from_tensor(&Tensor::from_vec(w.clone(), (C, D), &dev).unwrap()).unwrap();
    let head = MarginHead::new(wv.clone(), c.clone(), 0.5).unwrap();
    let mut r1 = SplitMix::new(9);
    let loss = head.loss(&xv, &labels, &mut r1).unwrap();
    let (idx, remap) = partial_fc_sample(&labels, C, 0.5, &mut SplitMix::new(9));
    // Reference: the full loss over the sampled rows only, labels remapped.
    let sub: Vec<f64> = idx
        .iter()
        .flat_map(|&j| w[j as usize * D..(j as usize + 1) * D].to_vec())
        .collect();
    let wsub = Var::from_tensor(&Tensor::from_vec(sub, (idx.len(), D), &dev).unwrap()).unwrap();
    let full = MarginHead::new(wsub, c, 1.0).unwrap();
    let l2 = full.loss(&xv, &remap, &mut SplitMix::new(0)).unwrap();
    let (a, b) = (
        loss.to_scalar::<f64>().unwrap(),
        l2.to_scalar::<f64>().unwrap(),
    );
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    let g: Vec<Vec<f64>> = loss
        .backward()
        .unwrap()
        .get(wv.as_tensor())
        .unwrap()
        .to_vec2()
        .unwrap();
    for (j, row) in g.iter().enumerate() {
        if !idx.contains(&(j as u32)) {
            assert!(
                row.iter().all(|v| *v == 0.0),
                "row {j} not sampled but has gradient"
            );
        }
    }
}

#[test]
fn sgd_momentum_weight_decay_matches_pytorch_formula() {
    let dev = Device::Cpu;
    let p0 = vec![1.0f64, -2.0, 0.5];
    let var = Var::from_tensor(&Tensor::from_vec(p0.clone(), 3, &dev).unwrap()).unwrap();
    let mut opt = Optimizer::sgd(
        vec![ParamEntry {
            name: "p".into(),
            var: var.clone(),
            weight_decay: 0.1,
        }],
        0.9,
    );
    // f(p) = Σ p³/3 → grad p².
    let (mut p, mut buf) = (p0.clone(), vec![0.0; 3]);
    for step in 0..3 {
        let l = var
            .as_tensor()
            .powf(3.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .affine(1.0 / 3.0, 0.0)
            .unwrap();
        let g = l.backward().unwrap();
        opt.step(&g, 0.05).unwrap();
        for i in 0..3 {
            let gi = p[i] * p[i] + 0.1 * p[i];
            buf[i] = if step == 0 { gi } else { 0.9 * buf[i] + gi };
            p[i] -= 0.05 * buf[i];
        }
        let got: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        assert_close(&got, &p, 1e-12, "sgd");
    }
    // State round trip: a fresh optimiser with the saved state continues identically.
    let state = opt.state().unwrap();
    let var2 = Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap();
    let mut opt2 = Optimizer::sgd(
        vec![ParamEntry {
            name: "p".into(),
            var: var2.clone(),
            weight_decay: 0.1,
        }],
        0.9,
    );
    opt2.load_state(&state).unwrap();
    for (o, v) in [(&mut opt, &var), (&mut opt2, &var2)] {
        let l = v.as_tensor().sqr().unwrap().sum_all().unwrap();
        o.step(&l.backward().unwrap(), 0.05).unwrap();
    }
    let a: Vec<f64> = var.as_tensor().to_vec1().unwrap();
    let b: Vec<f64> = var2.as_tensor().to_vec1().unwrap();
    assert_eq!(a, b);
}

#[test]
fn adamw_matches_pytorch_formula() {
    let dev = Device::Cpu;
    let var = Var::from_tensor(&Tensor::new(&[0.3f64, -1.2], &dev).unwrap()).unwrap();
    let mut opt = Optimizer::adamw(vec![ParamEntry {
        name: "p".into(),
        var: var.clone(),
        weight_decay: 0.01,
    }]);
    let (mut p, mut m, mut v) = (vec![0.3, -1.2], vec![0.0; 2], vec![0.0; 2]);
    let lr = 0.01;
    for t in 1..=3 {
        let l = var.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&l.backward().unwrap(), lr).unwrap();
        for i in 0..2 {
            let g = 2.0 * p[i];
            p[i] *= 1.0 - lr * 0.01;
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.999 * v[i] + 0.001 * g * g;
            let mh = m[i] / (1.0 - 0.9f64.powi(t));
            let vh = v[i] / (1.0 - 0.999f64.powi(t));
            p[i] -= lr * mh / (vh.sqrt() + 1e-8);
        }
        let got: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        assert_close(&got, &p, 1e-12, "adamw");
    }
}

#[test]
fn poly_schedule_and_grad_clip() {
    let s = PolySchedule {
        base_lr: 0.1,
        warmup: 10,
        total: 110,
        power: 1.0,
    };
    assert_eq!(s.lr(0), 0.0);
    assert!((s.lr(5) - 0.05).abs() < 1e-15);
    assert!((s.lr(10) - 0.1).abs() < 1e-15);
    assert!((s.lr(60) - 0.05).abs() < 1e-15);
    assert_eq!(s.lr(110), 0.0);
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[3.0f64, 0.0], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[4.0f64], &dev).unwrap()).unwrap();
    // grads: 2a = (6, 0), 2b = 8 → norm 10.
    let l = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
        + b.as_tensor().sqr().unwrap().sum_all().unwrap())
    .unwrap();
    let mut g = l.backward().unwrap();
    let n = clip_grad_norm(&mut g, &[a.clone(), b.clone()], 5.0).unwrap();
    assert!((n.to_scalar::<f64>().unwrap() - 10.0).abs() < 1e-12);
    let ga: Vec<f64> = g.get(a.as_tensor()).unwrap().to_vec1().unwrap();
    assert!((ga[0] - 6.0 * 5.0 / (10.0 + 1e-6)).abs() < 1e-12);
    // Below the limit the gradients stay exactly as they were.
    let mut g = l.backward().unwrap();
    let n = clip_grad_norm(&mut g, &[a.clone(), b.clone()], 50.0).unwrap();
    assert_eq!(n.to_scalar::<f64>().unwrap(), 10.0);
    let ga: Vec<f64> = g.get(a.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(ga, [6.0, 0.0]);
    let _ = DType::F64;
}

#[test]
fn one_hot_is_built_on_the_device_and_checks_its_labels() {
    let dev = Device::Cpu;
    let oh = fpipe_stages::loss::one_hot(&[2, 0], 3, DType::F32, &dev).unwrap();
    assert_eq!(
        oh.to_vec2::<f32>().unwrap(),
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    );
    let e = fpipe_stages::loss::one_hot(&[1, 3], 3, DType::F32, &dev).unwrap_err();
    assert!(
        e.to_string().contains("label 3 out of range for 3 classes"),
        "{e}"
    );
}
