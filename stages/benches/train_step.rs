//! Whole training steps (docs/benchmarks.md, "Whole training steps"), the one train-step
//! benchmark: iresnet18, MobileFaceNet and VarGFaceNet at 112x112, batch 32, with the ArcFace
//! head over 1000 classes and SGD (momentum 0.9, weight decay 5e-4). Per model it times the
//! forward of a training step, forward+loss+backward, the full step with the update, and
//! forward-only inference (eval mode, no gradient); achieved GFLOP/s (2·MACs per image forward,
//! 3x that for a step) against the same run's measured matmul rate; then, unless `--no-peer`,
//! runs the PyTorch peer (`scripts/bench_step_torch.py`, same models from
//! `scripts/make_model_fixtures.py`) in the same run and prints the ratios.
//!
//! `cargo bench -p fpipe-stages --bench train_step -- [--threads N] [--reps R]
//! [--json PATH] [--only NAME] [--python PATH | --no-peer]` (defaults: 2 threads, 3 reps,
//! `.venv-peers/bin/python`, made by `scripts/peer-venv.sh`). `scripts/bench-conv.sh
//! --steps` runs it with the mimalloc settings of docs/benchmarks.md.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use fpipe_stages::loss::{MarginConfig, MarginHead};
use fpipe_stages::models::{
    iresnet, is_buffer, mobilefacenet, vargfacenet, Backbone, BackboneConfig, ParamStore,
};
use fpipe_stages::train::optim::{Optimizer, ParamEntry};
use fpipe_stages::util::rng::SplitMix;

/// See benches/conv.rs: page reuse across candle's per-op allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 32;
const CLASSES: usize = 1000;

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Seconds of each phase, medians of `reps` after one warm-up.
struct Times {
    fwd: f64,
    fwd_bwd: f64,
    step: f64,
    infer: f64,
}

fn bench(cfg: &BackboneConfig, reps: usize) -> Result<Times> {
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
        .ok_or_else(|| err("head weight missing"))?;
    let head = MarginHead::new(var, MarginConfig::arcface(), 1.0).map_err(err)?;
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
    let (mut tf, mut tb, mut ts, mut ti) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..=reps {
        let t0 = Instant::now();
        let emb = backbone.forward(&x, true)?;
        emb.device().synchronize()?;
        let t1 = Instant::now();
        let loss = head.loss(&emb, &labels, &mut rng)?;
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, 0.01)?;
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
    for rep in 0..=reps {
        let t0 = Instant::now();
        let emb = backbone.forward(&x.detach(), false)?.detach();
        emb.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if rep > 0 {
            ti.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(Times {
        fwd: median(tf),
        fwd_bwd: median(tb),
        step: median(ts),
        infer: median(ti),
    })
}

/// GFLOP/s of a 2048³ f32 matmul through candle (the same `gemm` the convolutions use).
fn matmul_gflops(reps: usize) -> Result<f64> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    a.matmul(&b)?;
    let mut t = Vec::new();
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        a.matmul(&b)?;
        t.push(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / median(t) / 1e9)
}

struct Args {
    threads: usize,
    reps: usize,
    json: Option<String>,
    only: Option<String>,
    python: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut a = Args {
        threads: 2,
        reps: 3,
        json: None,
        only: None,
        python: Some(root.join(".venv-peers/bin/python")),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, flag: &str| -> Result<usize> {
        v.and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .ok_or_else(|| err(format!("{flag} needs a positive integer")))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--threads" => a.threads = num(it.next(), "--threads")?,
            "--reps" => a.reps = num(it.next(), "--reps")?,
            "--json" => a.json = it.next(),
            "--only" => a.only = it.next(),
            "--python" => a.python = it.next().map(PathBuf::from),
            "--no-peer" => a.python = None,
            "--bench" => {} // passed by `cargo bench`
            other => candle_core::bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // candle re-reads /proc/cpuinfo for its thread count unless this is set.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .map_err(err)?;
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
    let mm = matmul_gflops(args.reps)?;
    println!(
        "fpipe: threads {}, batch {BATCH}, 112x112, {CLASSES} classes, matmul 2048^3 {mm:.1} GFLOP/s",
        args.threads
    );
    println!(
        "{:<14} {:>7} {:>9} {:>7} {:>8} {:>9} {:>8} {:>9} {:>8}",
        "model",
        "fwd s",
        "fwd+bwd s",
        "step s",
        "infer s",
        "img/s",
        "step GF/s",
        "infer GF/s",
        "% matmul"
    );
    let mut rows = Vec::new();
    for (name, cfg) in &models {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !name.contains(o.as_str()))
        {
            continue;
        }
        let t = bench(cfg, args.reps)?;
        let flop = 2.0 * cfg.macs() as f64 * BATCH as f64;
        let (step_gf, infer_gf) = (3.0 * flop / t.step / 1e9, flop / t.infer / 1e9);
        println!(
            "{name:<14} {:>7.3} {:>9.3} {:>7.3} {:>8.3} {:>9.1} {step_gf:>8.1} {infer_gf:>9.1} {:>7.0} %",
            t.fwd,
            t.fwd_bwd,
            t.step,
            t.infer,
            BATCH as f64 / t.infer,
            100.0 * step_gf / mm
        );
        rows.push(serde_json::json!({
            "model": name, "macs": cfg.macs(), "fwd_s": t.fwd, "fwd_bwd_s": t.fwd_bwd,
            "step_s": t.step, "infer_s": t.infer,
        }));
    }
    let out = serde_json::json!({
        "threads": args.threads, "batch": BATCH, "classes": CLASSES, "reps": args.reps,
        "matmul_gflops": mm, "models": rows,
    });
    let dir = tempdir_path()?;
    let json = args
        .json
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("fpipe-step.json"));
    std::fs::write(&json, serde_json::to_string_pretty(&out).map_err(err)?)
        .map_err(|e| err(format!("writing {}: {e}", json.display())))?;
    let Some(python) = args.python else {
        return Ok(());
    };
    if !python.exists() {
        println!(
            "\nno PyTorch peer: {} missing (scripts/peer-venv.sh makes it; --no-peer skips)",
            python.display()
        );
        return Ok(());
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_step_torch.py");
    println!();
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg(&json)
        .arg("--json")
        .arg(&json)
        .status()
        .map_err(|e| err(format!("running {}: {e}", python.display())))?;
    if !status.success() {
        candle_core::bail!("PyTorch peer failed: {status}");
    }
    Ok(())
}

/// Where the JSON goes without `--json`: the target directory's `bench-step/`.
fn tempdir_path() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("bench-step");
    std::fs::create_dir_all(&dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}
