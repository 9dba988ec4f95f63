//! One training step (forward, margin loss, backward, SGD-momentum update) and forward-only
//! throughput of a backbone at 112×112, for `docs/benchmarks.md`.
//!
//! `RAYON_NUM_THREADS=2 cargo run -p fpipe-stages --example bench_train_step -- mbf 32 3`
//! (arch `mbf` or `r18`, batch, measured steps). Prints one JSON line.

use candle_core::{Device, Tensor};
use fpipe_stages::loss::{MarginConfig, MarginHead};
use fpipe_stages::models::{iresnet, is_buffer, Backbone, BackboneConfig, ParamStore, SplitMix};
use fpipe_stages::train::optim::{Optimizer, ParamEntry};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arch = args.get(1).map(String::as_str).unwrap_or("mbf");
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let cfg = match arch {
        "r18" => BackboneConfig::Iresnet(iresnet::Config {
            depth: 18,
            ..Default::default()
        }),
        _ => BackboneConfig::Mobilefacenet(Default::default()),
    };
    let dev = Device::Cpu;
    let store = ParamStore::new(0);
    let vb = store.vb(&dev);
    let model = Backbone::new(&cfg, vb.pp("backbone"))?;
    let classes = 1000;
    vb.pp("head").get_with_hints(
        (classes, cfg.embedding_size()),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        },
    )?;
    let (_, w) = store
        .vars()
        .into_iter()
        .find(|(k, _)| k == "head.weight")
        .ok_or("no head")?;
    let head = MarginHead::new(w, MarginConfig::arcface(), 1.0)?;
    let params: Vec<ParamEntry> = store
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
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 112, 112), &dev)?;
    let labels: Vec<u32> = (0..batch as u32).map(|i| i * 7 % classes as u32).collect();
    let mut rng = SplitMix::new(0);
    let mut step = || -> Result<f64, Box<dyn std::error::Error>> {
        let t = Instant::now();
        let emb = model.forward(&x, true)?;
        let loss = head.loss(&emb, &labels, &mut rng)?;
        let g = loss.backward()?;
        opt.step(&g, 0.01)?;
        Ok(t.elapsed().as_secs_f64())
    };
    step()?; // warm-up
    let mut train = Vec::new();
    for _ in 0..steps {
        train.push(step()?);
    }
    let fwd = || -> Result<f64, Box<dyn std::error::Error>> {
        let t = Instant::now();
        model.forward(&x, false)?.sum_all()?.to_scalar::<f32>()?;
        Ok(t.elapsed().as_secs_f64())
    };
    fwd()?;
    let mut f = Vec::new();
    for _ in 0..steps {
        f.push(fwd()?);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ts, fs) = (med(&mut train), med(&mut f));
    let flop = 2.0 * cfg.macs() as f64 * batch as f64;
    println!(
        "{{\"impl\":\"fpipe\",\"arch\":\"{arch}\",\"batch\":{batch},\"threads\":\"{}\",\"train_step_s\":{ts:.3},\"train_gflops\":{:.1},\"forward_s\":{fs:.3},\"forward_img_s\":{:.1},\"forward_gflops\":{:.1}}}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        3.0 * flop / ts / 1e9,
        batch as f64 / fs,
        flop / fs / 1e9
    );
    Ok(())
}
