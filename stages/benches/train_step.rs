//! Whole training steps (issue 5): iresnet18, MobileFaceNet and VarGFaceNet at 112x112,
//! batch 32, with the ArcFace head over 1000 classes and SGD (momentum 0.9, weight decay
//! 5e-4), timed as forward, forward+loss+backward, and the full step with the update.
//!
//! `cargo bench -p fpipe-stages --bench train_step -- [--threads N] [--reps R]
//! [--json PATH] [--only NAME]`; `scripts/bench-conv.sh --steps` runs it with the PyTorch
//! peer (`scripts/bench_step_torch.py`, same models from `scripts/make_model_fixtures.py`).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use fpipe_stages::loss::{MarginConfig, MarginHead};
use fpipe_stages::models::{
    iresnet, is_buffer, mobilefacenet, vargfacenet, Backbone, BackboneConfig, ParamStore, SplitMix,
};
use fpipe_stages::train::optim::{Optimizer, ParamEntry};

/// See benches/conv.rs: page reuse across candle's per-op allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 32;
const CLASSES: usize = 1000;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// (forward s, forward+loss+backward s, full step s), medians of `reps` after one warm-up.
fn bench(cfg: &BackboneConfig, reps: usize) -> Result<(f64, f64, f64)> {
    let dev = Device::Cpu;
    let store = ParamStore::new(0);
    let vb = store.vb(&dev);
    let backbone = Backbone::new(cfg, vb.pp("backbone"))?;
    vb.pp("head").get_with_hints(
        (CLASSES, cfg.embedding_size()),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        },
    )?;
    let var = store
        .vars()
        .into_iter()
        .find(|(k, _)| k == "head.weight")
        .map(|(_, v)| v)
        .ok_or_else(|| candle_core::Error::Msg("head weight missing".into()))?;
    let head = MarginHead::new(var, MarginConfig::arcface(), 1.0)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let params = store
        .vars()
        .into_iter()
        .filter(|(k, _)| !is_buffer(k))
        .map(|(name, var)| ParamEntry {
            name,
            var,
            weight_decay: 5e-4,
        })
        .collect();
    let mut opt = Optimizer::sgd(params, 0.9);
    let x = Tensor::randn(0f32, 1.0, (BATCH, 3, 112, 112), &dev)?;
    let labels: Vec<u32> = (0..BATCH as u32)
        .map(|i| (i * 31) % CLASSES as u32)
        .collect();
    let mut rng = SplitMix::new(1);
    let (mut tf, mut tb, mut ts) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..=reps {
        let t0 = Instant::now();
        let emb = backbone.forward(&x, true)?;
        emb.device().synchronize()?;
        let t1 = Instant::now();
        let loss = head.loss(&emb, &labels, &mut rng)?;
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, 0.1)?;
        let t3 = Instant::now();
        if loss.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_nan() {
            candle_core::bail!("loss is NaN");
        }
        if rep > 0 {
            tf.push((t1 - t0).as_secs_f64());
            tb.push((t2 - t0).as_secs_f64());
            ts.push((t3 - t0).as_secs_f64());
        }
    }
    Ok((median(tf), median(tb), median(ts)))
}

fn main() -> Result<()> {
    let (mut threads, mut reps, mut json, mut only) = (2usize, 3usize, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => threads = it.next().and_then(|v| v.parse().ok()).unwrap_or(2),
            "--reps" => reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--json" => json = it.next(),
            "--only" => only = it.next(),
            _ => {}
        }
    }
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let models = [
        (
            "iresnet18",
            BackboneConfig::Iresnet(iresnet::Config {
                depth: 18,
                ..Default::default()
            }),
        ),
        (
            "mobilefacenet",
            BackboneConfig::Mobilefacenet(mobilefacenet::Config::default()),
        ),
        (
            "vargfacenet",
            BackboneConfig::Vargfacenet(vargfacenet::Config::default()),
        ),
    ];
    println!("threads {threads}, batch {BATCH}, 112x112, {CLASSES} classes");
    println!(
        "{:<14} {:>9} {:>12} {:>9}",
        "model", "fwd s", "fwd+bwd s", "step s"
    );
    let mut rows = Vec::new();
    for (name, cfg) in &models {
        if only
            .as_ref()
            .is_some_and(|o: &String| !name.contains(o.as_str()))
        {
            continue;
        }
        let (f, b, s) = bench(cfg, reps)?;
        println!("{name:<14} {f:>9.3} {b:>12.3} {s:>9.3}");
        rows.push(serde_json::json!({ "model": name, "fwd_s": f, "fwd_bwd_s": b, "step_s": s }));
    }
    if let Some(path) = json {
        let out = serde_json::json!({ "threads": threads, "batch": BATCH, "classes": CLASSES, "models": rows });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&out).unwrap_or_default(),
        )
        .map_err(|e| candle_core::Error::Msg(format!("writing {path}: {e}")))?;
    }
    Ok(())
}
