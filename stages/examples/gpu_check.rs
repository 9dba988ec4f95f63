//! The Rust half of `scripts/gpu-check.sh`: checks the CUDA path against the CPU one and times
//! training steps on the GPU. Built here with `--features cuda` and carried to a GPU machine,
//! which has no Rust toolchain (`scripts/gpu-bundle.sh`).
//!
//! `gpu_check step [--batch 8]`: one training step (ArcFace head over 100 classes) of each
//!   backbone on `cuda:0` and on the CPU from the same weights and images: loss and every
//!   gradient must agree within `--tol` (relative to the gradient's largest magnitude), no NaN.
//! `gpu_check conv [--batch 128]`: the grouped and depthwise convolutions of the backbones,
//!   forward and both gradients, on `cuda:0` against the CPU kernels.
//! `gpu_check time [--batch 128] [--reps 10]`: iresnet50 and MobileFaceNet steps at 112 px on
//!   `cuda:0`, milliseconds per step (fp32; the peer is `scripts/bench_step_torch_cuda.py`).
//!
//! Prints one line per check and exits 1 when any check fails.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use fpipe_stages::loss::{MarginConfig, MarginHead};
use fpipe_stages::models::{is_buffer, Backbone, BackboneConfig, BackboneOptions, ParamStore};
use fpipe_stages::train::optim::{Optimizer, ParamEntry};
use fpipe_stages::util::rng::SplitMix;

const CLASSES: usize = 100;

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

fn cfg(name: &str, size: usize) -> Result<BackboneConfig> {
    let opts = BackboneOptions {
        width: 1.0,
        input_size: size,
        num_features: 512,
        se: false,
    };
    BackboneConfig::from_name(name, &opts).map_err(err)
}

/// A model, its head and optimiser on `dev`, initialised from seed 0 (the same weights on any
/// device: the store draws them on the CPU).
struct Model {
    store: ParamStore,
    backbone: Backbone,
    head: MarginHead,
}

fn model(cfg: &BackboneConfig, dev: &Device) -> Result<Model> {
    let store = ParamStore::new(0);
    let vb = store.vb(dev);
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
        .ok_or_else(|| err("head weight missing"))?;
    let head = MarginHead::new(var, MarginConfig::arcface(), 1.0).map_err(err)?;
    Ok(Model {
        store,
        backbone,
        head,
    })
}

fn images(batch: usize, size: usize) -> Result<(Tensor, Vec<u32>)> {
    let mut rng = SplitMix::new(7);
    let n = batch * 3 * size * size;
    let data: Vec<f32> = (0..n).map(|_| rng.uniform_f32() * 2.0 - 1.0).collect();
    let x = Tensor::from_vec(data, (batch, 3, size, size), &Device::Cpu)?;
    let labels = (0..batch as u32)
        .map(|i| (i * 37) % CLASSES as u32)
        .collect();
    Ok((x, labels))
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Largest difference of `a` and `b` relative to `a`'s largest magnitude.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let b = b.to_device(&Device::Cpu)?;
    let scale = max_abs(a)?.max(1e-6);
    Ok(max_abs(&(a - b)?)? / scale)
}

fn step_check(name: &str, batch: usize, tol: f32, gpu: &Device) -> Result<bool> {
    let size = 112;
    let c = cfg(name, size)?;
    let (x, labels) = images(batch, size)?;
    let mut out = Vec::new();
    for dev in [&Device::Cpu, gpu] {
        let m = model(&c, dev)?;
        let emb = m.backbone.forward(&x.to_device(dev)?, true)?;
        let loss = m.head.loss(&emb, &labels, &mut SplitMix::new(1))?;
        let grads = loss.backward()?;
        let loss = loss.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let mut g = Vec::new();
        for (k, v) in m.store.vars() {
            if let Some(t) = grads.get(v.as_tensor()) {
                g.push((k, t.to_device(&Device::Cpu)?));
            }
        }
        out.push((loss.to_scalar::<f32>()?, g));
    }
    let (cpu_loss, cpu_grads) = &out[0];
    let (gpu_loss, gpu_grads) = &out[1];
    let loss_diff = (cpu_loss - gpu_loss).abs() / cpu_loss.abs().max(1e-6);
    let mut worst = (0f32, String::new());
    let mut nan = !gpu_loss.is_finite();
    for ((k, a), (_, b)) in cpu_grads.iter().zip(gpu_grads) {
        let d = rel_diff(a, b)?;
        nan |= !d.is_finite();
        if d > worst.0 || !d.is_finite() {
            worst = (d, k.clone());
        }
    }
    let ok = !nan && loss_diff <= tol && worst.0 <= tol && cpu_grads.len() == gpu_grads.len();
    println!(
        "step {name:<14} batch {batch}: loss cpu {cpu_loss:.6} gpu {gpu_loss:.6} (rel {loss_diff:.2e}); {} gradients, worst rel diff {:.2e} at {}; {}",
        gpu_grads.len(),
        worst.0,
        worst.1,
        if ok { "ok" } else { "FAIL" }
    );
    Ok(ok)
}

/// (name, channels, groups, kernel, stride, spatial size) of convolutions the backbones use.
const CONVS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("mobilefacenet dw 3x3 s2", 64, 64, 3, 2, 56),
    ("mobilefacenet dw 3x3 s1", 128, 128, 3, 1, 14),
    ("mobilefacenet gdc 7x7", 512, 512, 7, 1, 7),
    ("vargfacenet group 3x3 (8/group)", 64, 8, 3, 1, 28),
    ("vargfacenet group 3x3 s2", 128, 16, 3, 2, 28),
];

fn conv_check(batch: usize, tol: f32, gpu: &Device) -> Result<bool> {
    let mut all = true;
    for &(name, ch, groups, k, stride, hw) in CONVS {
        let mut rng = SplitMix::new(3);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform_f32() - 0.5).collect() };
        let x = Tensor::from_vec(
            rand(batch * ch * hw * hw),
            (batch, ch, hw, hw),
            &Device::Cpu,
        )?;
        let w = Tensor::from_vec(
            rand(ch * (ch / groups) * k * k),
            (ch, ch / groups, k, k),
            &Device::Cpu,
        )?;
        let mut res = Vec::new();
        for dev in [&Device::Cpu, gpu] {
            let xv = Var::from_tensor(&x.to_device(dev)?)?;
            let wv = Var::from_tensor(&w.to_device(dev)?)?;
            let y = fpipe_kernels::conv2d(xv.as_tensor(), wv.as_tensor(), stride, k / 2, groups)?;
            let r = y.ones_like()?.affine(0.5, 0.25)?;
            let g = (&y * &r)?.sum_all()?.backward()?;
            let gx = g
                .get(xv.as_tensor())
                .ok_or_else(|| err("no input gradient"))?;
            let gw = g
                .get(wv.as_tensor())
                .ok_or_else(|| err("no weight gradient"))?;
            res.push([
                y.to_device(&Device::Cpu)?,
                gx.to_device(&Device::Cpu)?,
                gw.to_device(&Device::Cpu)?,
            ]);
        }
        let d: Vec<f32> = (0..3)
            .map(|i| rel_diff(&res[0][i], &res[1][i]))
            .collect::<Result<_>>()?;
        let ok = d.iter().all(|v| v.is_finite() && *v <= tol);
        all &= ok;
        println!(
            "conv {name:<32} batch {batch}: rel diff forward {:.2e}, input grad {:.2e}, weight grad {:.2e}; {}",
            d[0],
            d[1],
            d[2],
            if ok { "ok" } else { "FAIL" }
        );
    }
    Ok(all)
}

fn time_steps(batch: usize, reps: usize, gpu: &Device) -> Result<()> {
    for name in ["iresnet50", "mobilefacenet"] {
        let c = cfg(name, 112)?;
        let m = model(&c, gpu)?;
        let params = m
            .store
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
        let (x, labels) = images(batch, 112)?;
        let x = x.to_device(gpu)?;
        let mut rng = SplitMix::new(1);
        let mut times = Vec::new();
        for rep in 0..=reps {
            let t0 = Instant::now();
            let emb = m.backbone.forward(&x, true)?;
            let loss = m.head.loss(&emb, &labels, &mut rng)?;
            let grads = loss.backward()?;
            opt.step(&grads, 0.01)?;
            gpu.synchronize()?;
            if rep > 0 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "time {name:<14} batch {batch} fp32: {:.1} ms/step (median of {reps}), {:.0} images/s",
            times[times.len() / 2],
            batch as f64 / times[times.len() / 2] * 1e3
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_default();
    let mut batch = None;
    let mut reps = 10;
    let mut tol = 2e-3f32;
    while let Some(a) = args.next() {
        let v = args
            .next()
            .ok_or_else(|| err(format!("{a} needs a value")))?;
        match a.as_str() {
            "--batch" => batch = Some(v.parse().map_err(err)?),
            "--reps" => reps = v.parse().map_err(err)?,
            "--tol" => tol = v.parse().map_err(err)?,
            _ => return Err(err(format!("unknown argument {a}"))),
        }
    }
    let gpu = fpipe_stages::util::device::parse_device("cuda:0").map_err(err)?;
    let ok = match what.as_str() {
        "step" => {
            let mut ok = true;
            for name in ["iresnet18", "iresnet50", "mobilefacenet", "vargfacenet"] {
                ok &= step_check(name, batch.unwrap_or(8), tol, &gpu)?;
            }
            ok
        }
        "conv" => conv_check(batch.unwrap_or(128), tol, &gpu)?,
        "time" => {
            time_steps(batch.unwrap_or(128), reps, &gpu)?;
            true
        }
        _ => {
            return Err(err(
                "usage: gpu_check step|conv|time [--batch N] [--reps R] [--tol T]",
            ))
        }
    };
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
