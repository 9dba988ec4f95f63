//! BatchNorm fine-tuning, BatchNorm-input quality features, the gradient-boosted regressor and
//! the error-versus-reject / drop-lowest definitions (docs/methods.md §5, §6).

use candle_core::{DType, Device, Tensor};
use fpipe_stages::data::synth::{generate, SynthParams};
use fpipe_stages::data::PackedDataset;
use fpipe_stages::eval::bn_finetune::{
    available_fprs, bn_finetune, gaussian_blur, FinetuneConfig, Mix, Select,
};
use fpipe_stages::eval::metrics::error_vs_reject;
use fpipe_stages::eval::quality::gbt::{Gbt, GbtParams};
use fpipe_stages::eval::verify::{drop_lowest, kept_indices, verify};
use fpipe_stages::models::probe::record_bn_inputs;
use fpipe_stages::models::{bn, is_buffer, mobilefacenet, BackboneConfig, ParamStore};
use fpipe_stages::train::artifact::{load_model, save_model};
use fpipe_stages::train::embed::embed_all;
use fpipe_stages::train::trainer::build_student;
use fpipe_stages::util::rng::SplitMix;
use std::collections::HashMap;
use std::sync::Mutex;

fn tiny_backbone() -> BackboneConfig {
    BackboneConfig::Mobilefacenet(mobilefacenet::Config {
        width: 0.0625,
        input_size: 32,
        num_features: 16,
        ..Default::default()
    })
}

fn snapshot(store: &ParamStore) -> HashMap<String, Vec<u8>> {
    store
        .vars()
        .into_iter()
        .map(|(k, v)| {
            let t = v.as_tensor().to_dtype(DType::F32).unwrap();
            let b: Vec<u8> = t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (k, b)
        })
        .collect()
}

#[test]
fn bn_finetune_moves_only_running_stats_and_keeps_the_best_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (train_dir, pairs_dir) = (dir.path().join("train"), dir.path().join("pairs"));
    let p = SynthParams {
        identities: 6,
        images_per_identity: 4,
        image_size: 32,
        test_identities: 6,
        test_images_per_identity: 3,
        pairs: 40,
        ..Default::default()
    };
    generate(&p, &train_dir, Some(&pairs_dir), &()).unwrap();
    let dev = Device::Cpu;
    // A model artifact as `train` writes it (untrained weights are enough here).
    let cfg = fpipe_stages::train::trainer::TrainConfig {
        batch_size: 8,
        grad_clip: 0.0,
        flip: false,
        seed: 3,
        ..fpipe_stages::train::trainer::TrainConfig::arcface_torch(tiny_backbone(), 1)
    };
    let (store, _, _) = build_student(&cfg, 6, &dev, None).unwrap();
    let model_dir = dir.path().join("model");
    save_model(
        &model_dir,
        &store,
        &cfg.backbone,
        6,
        serde_json::json!(null),
        serde_json::json!(null),
    )
    .unwrap();
    let model = load_model(&model_dir, &dev).unwrap();
    let data = PackedDataset::open(&train_dir).unwrap();
    let pairs_data = PackedDataset::open(&pairs_dir).unwrap();
    let pairs = pairs_data.pairs().unwrap().to_vec();
    let before = snapshot(&model.store);
    let ft = FinetuneConfig {
        mix: Mix::Blur {
            fraction: 0.5,
            sigma: (3.0, 5.0),
        },
        steps: 5,
        batch_size: 8,
        snapshot_every: 1,
        select: Select::Auc,
        include_input: false,
        flip: true,
        seed: 1,
        fprs: vec![0.1],
        eval_batch: 16,
    };
    // The running statistics at every snapshot, read from the model as it goes.
    let seen: Mutex<HashMap<u64, HashMap<String, Vec<u8>>>> = Mutex::new(HashMap::new());
    let on_snapshot = |s: &fpipe_stages::eval::bn_finetune::Snapshot, _: u64| {
        seen.lock().unwrap().insert(s.step, snapshot(&model.store));
    };
    let out = bn_finetune(
        &model,
        &data,
        None,
        &pairs_data,
        &pairs,
        &ft,
        &dev,
        &on_snapshot,
        &|| false,
    )
    .unwrap();
    assert_eq!(
        out.snapshots.iter().map(|s| s.step).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
    let after = snapshot(&model.store);
    let mut moved = 0;
    for (k, b) in &before {
        if is_buffer(k) {
            moved += usize::from(after[k] != *b);
        } else {
            assert_eq!(after[k], *b, "learnable `{k}` changed");
        }
    }
    assert!(moved > 0, "no running statistic moved");
    // The kept snapshot: the best score among steps 1.., earliest on ties.
    let best = (1..out.snapshots.len())
        .reduce(|a, b| {
            if out.snapshots[b].score > out.snapshots[a].score {
                b
            } else {
                a
            }
        })
        .unwrap();
    assert_eq!(out.best, best);
    let seen = seen.into_inner().unwrap();
    let kept_step = out.snapshots[best].step;
    assert_eq!(
        after, seen[&kept_step],
        "model holds the best snapshot's stats"
    );
    for (step, s) in &seen {
        if out
            .snapshots
            .iter()
            .any(|x| x.step == *step && x.score != out.snapshots[best].score)
        {
            assert_ne!(after, *s, "stats of a worse snapshot (step {step})");
        }
    }
    // Re-evaluating the kept model gives the kept snapshot's numbers.
    let emb = embed_all(&model, &pairs_data, 16, true, &dev, &|_, _| {}).unwrap();
    let r = verify(&emb, 16, &pairs, &[0.1]).unwrap();
    assert_eq!(r.auc, out.snapshots[best].result.auc);
    // Out-of-domain mixing without non-face images is refused.
    let bad = FinetuneConfig {
        mix: Mix::OutOfDomain { fraction: 0.1 },
        ..ft
    };
    let e = bn_finetune(
        &model,
        &data,
        None,
        &pairs_data,
        &pairs,
        &bad,
        &dev,
        &|_, _| {},
        &|| false,
    );
    assert!(e.is_err_and(|e| e.to_string().contains("`ood` input")));
}

#[test]
fn blur_and_fpr_availability() {
    // A single bright pixel spreads into a symmetric, mass-preserving blob.
    let (h, w) = (21, 21);
    let mut img = vec![0u8; h * w * 3];
    for c in 0..3 {
        img[(10 * w + 10) * 3 + c] = 255;
    }
    let out = gaussian_blur(&img, h, w, 1.0);
    let px = |y: usize, x: usize| out[(y * w + x) * 3] as i32;
    assert!(px(10, 10) > px(10, 11) && px(10, 11) > px(10, 12));
    assert_eq!(px(10, 11), px(10, 9));
    assert_eq!(px(9, 10), px(11, 10));
    let mass: i32 = (0..h * w).map(|i| out[i * 3] as i32).sum();
    assert!((mass - 255).abs() <= 20, "mass {mass}");
    assert_eq!(gaussian_blur(&img, h, w, 0.0), img);
    assert_eq!(
        available_fprs(&[1e-6, 1e-4, 1e-3, 1e-2, 1e-1], 1000),
        vec![1e-3, 1e-2, 1e-1]
    );
}

/// Naive features of one BatchNorm input: per image [var over C of v, mean over C of v],
/// v_c = unbiased variance over H·W (both unbiased), in f64.
fn naive(x: &Tensor) -> Vec<[f64; 2]> {
    let (b, c, h, w) = x.dims4().unwrap();
    let flat = x
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let unbiased = |vals: &[f64]| {
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        vals.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (vals.len() - 1) as f64
    };
    (0..b)
        .map(|i| {
            let v: Vec<f64> = (0..c)
                .map(|j| unbiased(&flat[(i * c + j) * h * w..(i * c + j + 1) * h * w]))
                .collect();
            [unbiased(&v), v.iter().sum::<f64>() / c as f64]
        })
        .collect()
}

#[test]
fn bn_input_features_match_a_naive_computation() {
    let dev = Device::Cpu;
    let store = ParamStore::new(7);
    let vb = store.vb(&dev);
    let bn1 = bn(4, 1e-5, vb.pp("bn1")).unwrap();
    let bn2 = bn(4, 1e-5, vb.pp("bn2")).unwrap();
    let bn1d = bn(4, 1e-5, vb.pp("bn1d")).unwrap();
    let mut rng = SplitMix::new(5);
    let data: Vec<f32> = (0..3 * 4 * 5 * 6)
        .map(|i| (rng.normal() * (1.0 + (i % 7) as f64)) as f32)
        .collect();
    let x = Tensor::from_vec(data, (3, 4, 5, 6), &dev).unwrap();
    let forward = || -> candle_core::Result<(Tensor, Tensor)> {
        let y = bn1.forward_t(&x, false)?;
        let z = y.sqr()?.affine(0.5, 1.0)?;
        let out = bn2.forward_t(&z, false)?;
        // A rank-2 (BatchNorm1d) input is not a feature.
        let pooled = out.mean((2, 3))?;
        bn1d.forward_t(&pooled, false)?;
        Ok((y, z))
    };
    let ((_, z), rows) = record_bn_inputs(forward).unwrap();
    assert_eq!(rows.len(), 3);
    let (n1, n2) = (naive(&x), naive(&z));
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.len(), 4, "two BatchNorm2d inputs, two features each");
        let want = [n1[i][0], n1[i][1], n2[i][0], n2[i][1]];
        for (a, b) in r.iter().zip(want) {
            assert!(
                ((*a as f64) - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{a} vs {b}"
            );
        }
    }
    // Outside a recording nothing is collected; a real backbone gives 2 features per BN2d.
    let (_, rows) = record_bn_inputs(|| Ok(())).unwrap();
    assert!(rows.is_empty());
    let store = ParamStore::new(1);
    let m = fpipe_stages::models::Backbone::new(&tiny_backbone(), store.vb(&dev).pp("b")).unwrap();
    let img = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    let (_, a) = record_bn_inputs(|| m.forward(&img, false)).unwrap();
    let (_, b) = record_bn_inputs(|| m.forward(&img, false)).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 2);
    assert!(a[0].len() >= 20 && a[0].len() % 2 == 0, "{}", a[0].len());
}

#[test]
fn gbt_fits_a_nonlinear_function_deterministically() {
    let mut rng = SplitMix::new(11);
    let mut sample = |n: usize| -> (Vec<Vec<f32>>, Vec<f32>) {
        let rows: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..4).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect())
            .collect();
        // Interaction, a sine and a step; feature 3 is irrelevant.
        let y = rows
            .iter()
            .map(|r| (3.0 * r[0]).sin() + r[1] * r[2] + if r[1] > 0.3 { 0.5 } else { 0.0 })
            .collect();
        (rows, y)
    };
    let (xtr, ytr) = sample(3000);
    let (xte, yte) = sample(500);
    let p = GbtParams {
        depth: 4,
        lr: 0.1,
        iterations: 300,
        l2: 1.0,
        bins: 64,
    };
    let m = Gbt::fit(&xtr, &ytr, &p).unwrap();
    let pred = m.predict_all(&xte).unwrap();
    let mean = yte.iter().map(|&v| v as f64).sum::<f64>() / yte.len() as f64;
    let var = yte.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / yte.len() as f64;
    let mse = pred
        .iter()
        .zip(&yte)
        .map(|(p, &y)| (p - y as f64).powi(2))
        .sum::<f64>()
        / yte.len() as f64;
    assert!(mse < 0.05 * var, "test MSE {mse} vs variance {var}");
    let again = Gbt::fit(&xtr, &ytr, &p).unwrap();
    assert_eq!(again, m, "two fits of the same data are identical");
    // Rows of another width are refused, not misread.
    assert!(m.predict(&[0.0; 3]).is_err());
    assert!(Gbt::fit(&xtr, &ytr[..10], &p).is_err());
}

#[test]
fn error_versus_reject_and_drop_lowest_on_a_hand_made_case() {
    // 10 genuine pairs, 10 impostors. Quality ranks the pairs 0..19 (pair i has quality i).
    // Genuine scores: the two lowest-quality genuine pairs (0, 2) fail badly.
    let mut scores = vec![0f32; 20];
    let mut same = vec![false; 20];
    let quality: Vec<f32> = (0..20).map(|i| i as f32).collect();
    for i in 0..20 {
        if i % 2 == 0 {
            same[i] = true;
            scores[i] = if i < 4 { 0.1 } else { 0.8 };
        } else {
            // Impostors: the lowest-quality one (1) scores above every genuine pair.
            scores[i] = if i == 1 { 0.85 } else { 0.2 + i as f32 * 0.01 };
        }
    }
    let e = error_vs_reject(&scores, &same, &quality, &[0.0, 0.1, 0.2], &[0.1, 0.0]).unwrap();
    // r = 0: 10 impostors; FMR 0.1 -> threshold = the 2nd highest impostor (0.39): genuine
    // 0.1, 0.1 rejected -> 0.2. FMR 0 -> threshold 0.85: every genuine pair rejected -> 1.
    // r = 0.1 (pairs 0 and 1 go): 9 impostors, floor(0.9) = 0 -> the highest left, 0.39, for
    // both targets (recomputed: a fixed threshold would keep FNMR 1 at FMR 0); genuine 0.1
    // (pair 2) rejected of 9 -> 1/9.
    // r = 0.2 (pairs 0..3 go): both failures gone -> 0.
    assert_eq!(e.fnmr[0], vec![0.2, 1.0 / 9.0, 0.0]);
    assert_eq!(e.fnmr[1], vec![1.0, 1.0 / 9.0, 0.0]);
    // drop_lowest keeps pair order and drops floor(f·N) lowest-quality pairs.
    let pairs: Vec<(u32, u32, bool)> = (0..20).map(|i| (i, i + 1, same[i as usize])).collect();
    let q_rev: Vec<f32> = (0..20).map(|i| 20.0 - i as f32).collect();
    let kept = drop_lowest(&pairs, &q_rev, 0.15);
    assert_eq!(kept.len(), 17);
    assert_eq!(kept, pairs[..17].to_vec());
    assert_eq!(drop_lowest(&pairs, &q_rev, 0.0), pairs);
    // kept_indices names the kept pairs by their index in the list (what scores.csv writes).
    let mut q_mid = vec![10.0f32; 20];
    (q_mid[5], q_mid[9], q_mid[13]) = (1.0, 2.0, 3.0);
    let index = kept_indices(&q_mid, 0.15);
    let want: Vec<usize> = (0..20).filter(|i| ![5, 9, 13].contains(i)).collect();
    assert_eq!(index, want);
    let kept: Vec<_> = index.iter().map(|&i| pairs[i]).collect();
    assert_eq!(drop_lowest(&pairs, &q_mid, 0.15), kept);
}
