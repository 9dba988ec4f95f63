//! Convolution benchmark (docs/benchmarks.md, "Convolution and training step"): per-layer
//! forward and backward GFLOP/s of fpipe's CPU convolution for the layer shapes of iresnet,
//! MobileFaceNet and VarGFaceNet at batch 32, plus the machine's matmul GFLOP/s through the
//! same `gemm`. The two layers named `issue ...` are the depthwise and grouped shapes on which
//! the per-layer target was first stated (docs/benchmarks.md); the names stay so that the
//! tables of different dates line up.
//!
//! `cargo bench -p fpipe-kernels --bench conv -- [--threads N] [--reps R] [--json PATH]
//! [--only SUBSTRING] [--stock]`. `scripts/bench-conv.sh` runs this and the PyTorch peer
//! (`scripts/bench_conv_torch.py`) on the same shapes and prints the ratios.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fpipe_kernels::conv::{self, Geom};

/// Page-reusing allocator: candle allocates every intermediate afresh, and the system
/// allocator returns large blocks to the kernel, so each op would fault its pages back in.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// (name, in channels, input size, out channels, kernel, stride, padding, groups)
type Layer = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const BATCH: usize = 32;

const LAYERS: &[Layer] = &[
    ("ir.stem 3x3 3-64 @112", 3, 112, 64, 3, 1, 1, 1),
    ("ir.l1 3x3 64-64 @56", 64, 56, 64, 3, 1, 1, 1),
    ("ir.l2a 3x3 64-128 @56", 64, 56, 128, 3, 1, 1, 1),
    ("ir.l2b 3x3 s2 128-128 @56", 128, 56, 128, 3, 2, 1, 1),
    ("ir.l2 3x3 128-128 @28", 128, 28, 128, 3, 1, 1, 1),
    ("ir.down 1x1 s2 64-128 @56", 64, 56, 128, 1, 2, 0, 1),
    ("ir.l3 3x3 256-256 @14", 256, 14, 256, 3, 1, 1, 1),
    ("ir.l4 3x3 512-512 @7", 512, 7, 512, 3, 1, 1, 1),
    ("mbf.stem 3x3 s2 3-128 @112", 3, 112, 128, 3, 2, 1, 1),
    ("mbf.g64 3x3 128 g64 @56", 128, 56, 128, 3, 1, 1, 64),
    ("mbf.pw 1x1 128-128 @56", 128, 56, 128, 1, 1, 0, 1),
    ("mbf.dw 3x3 s2 128 @56", 128, 56, 128, 3, 2, 1, 128),
    ("issue dw 3x3 128 @56", 128, 56, 128, 3, 1, 1, 128),
    ("mbf.dw 3x3 128 @28", 128, 28, 128, 3, 1, 1, 128),
    ("mbf.pw 1x1 128-256 @28", 128, 28, 256, 1, 1, 0, 1),
    ("mbf.dw 3x3 256 @14", 256, 14, 256, 3, 1, 1, 256),
    ("mbf.pw 1x1 256-512 @14", 256, 14, 512, 1, 1, 0, 1),
    ("mbf.dw 3x3 s2 512 @14", 512, 14, 512, 3, 2, 1, 512),
    ("mbf.gdc 7x7 512 @7", 512, 7, 512, 7, 1, 0, 512),
    ("varg.stem 3x3 3-40 @112", 3, 112, 40, 3, 1, 1, 1),
    ("varg.head 3x3 s2 40 g5 @112", 40, 112, 40, 3, 2, 1, 5),
    ("varg.g 3x3 80-160 g10 @28", 80, 28, 160, 3, 1, 1, 10),
    ("varg.pw 1x1 160-80 @28", 160, 28, 80, 1, 1, 0, 1),
    ("varg.down 3x3 s2 80-160 g10 @28", 80, 28, 160, 3, 2, 1, 10),
    ("varg.g 3x3 160-320 g20 @14", 160, 14, 320, 3, 1, 1, 20),
    ("issue g 3x3 256 g32 @14", 256, 14, 256, 3, 1, 1, 32),
    ("varg.g 3x3 320-640 g40 @7", 320, 7, 640, 3, 1, 1, 40),
    ("varg.emb 7x7 1024 g128 @7", 1024, 7, 1024, 7, 1, 0, 128),
];

struct Args {
    threads: usize,
    reps: usize,
    json: Option<String>,
    only: Option<String>,
    stock: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        threads: 2,
        reps: 5,
        json: None,
        only: None,
        stock: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => args.threads = it.next().and_then(|v| v.parse().ok()).unwrap_or(2),
            "--reps" => args.reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(5),
            "--json" => args.json = it.next(),
            "--only" => args.only = it.next(),
            "--stock" => args.stock = true,
            // `cargo bench` passes `--bench`; ignore it and anything unknown.
            _ => {}
        }
    }
    args
}

/// Median wall time of `reps` runs of `f` after one warm-up run.
fn time(reps: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    let [t] = time_each(reps, [&mut f])?;
    Ok(t)
}

/// Median seconds of each of `fs`, run in turn (one round as warm-up, then `reps` rounds).
/// Timing each op's repetitions back to back made the first op of a layer 1.5x slower than
/// the same kernel timed later on the small layers, in some runs and not others; taking
/// turns exposes every op to the same state of the machine and the allocator.
fn time_each<const K: usize>(
    reps: usize,
    mut fs: [&mut dyn FnMut() -> candle_core::Result<()>; K],
) -> candle_core::Result<[f64; K]> {
    for f in fs.iter_mut() {
        f()?;
    }
    let mut t = [(); K].map(|()| Vec::with_capacity(reps.max(1)));
    for _ in 0..reps.max(1) {
        for (f, tk) in fs.iter_mut().zip(t.iter_mut()) {
            let start = Instant::now();
            f()?;
            tk.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(t.map(|mut tk| {
        tk.sort_by(f64::total_cmp);
        tk[tk.len() / 2]
    }))
}

fn matmul_gflops(reps: usize) -> candle_core::Result<f64> {
    let dev = Device::Cpu;
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let t = time(reps, || a.matmul(&b).map(|_| ()))?;
    Ok(2.0 * (n * n * n) as f64 / t / 1e9)
}

fn main() -> candle_core::Result<()> {
    let args = parse_args();
    // candle re-reads /proc/cpuinfo for its thread count unless this is set.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let dev = Device::Cpu;
    // `--only` is for looking at a few layers: a short matmul reference, no norm bench.
    let mm = matmul_gflops(if args.only.is_some() { 2 } else { args.reps })?;
    println!("threads {}  matmul 2048^3: {mm:.1} GFLOP/s", args.threads);
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}{}",
        "layer (batch 32)",
        "fwd s",
        "fwd GF/s",
        "bwd s",
        "bwd GF/s",
        "dgrad s",
        "wgrad s",
        if args.stock {
            "   stock fwd s   stock bwd s"
        } else {
            ""
        }
    );
    let mut rows = Vec::new();
    for &(name, c, hw, o, k, s, p, groups) in LAYERS {
        if args
            .only
            .as_ref()
            .is_some_and(|f| !name.contains(f.as_str()))
        {
            continue;
        }
        let g = Geom::new(&[BATCH, c, hw, hw], &[o, c / groups, k, k], s, p, groups)?;
        let x = Tensor::randn(0f32, 1.0, (BATCH, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (o, c / groups, k, k), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (BATCH, o, g.ho, g.wo), &dev)?;
        // The backward pass is what training runs (both gradients, `conv2d_backward`); the
        // two gradients are also timed apart (input = "dgrad", weight = "wgrad").
        let [fwd, bwd, dgrad, wgrad] = time_each(
            args.reps,
            [
                &mut || conv::conv2d(&x, &w, s, p, groups).map(|_| ()),
                &mut || conv::conv2d_backward(&x, &w, &dy, g, true).map(|_| ()),
                &mut || conv::conv2d_backward_data(&dy, &w, g).map(|_| ()),
                &mut || conv::conv2d_backward_filter(&x, &dy, g).map(|_| ()),
            ],
        )?;
        let flops = 2.0 * g.macs() as f64;
        let mut line = format!(
            "{name:<34} {fwd:>9.4} {:>9.1} {bwd:>9.4} {:>9.1} {dgrad:>9.4} {wgrad:>9.4}",
            flops / fwd / 1e9,
            2.0 * flops / bwd / 1e9
        );
        let mut stock = serde_json::Value::Null;
        if args.stock {
            // candle's own convolution and its autograd, the before of fpipe's kernels.
            let xv = candle_core::Var::from_tensor(&x)?;
            let wv = candle_core::Var::from_tensor(&w)?;
            let sf = time(1, || x.conv2d(&w, p, s, 1, groups).map(|_| ()))?;
            let y = xv.as_tensor().conv2d(wv.as_tensor(), p, s, 1, groups)?;
            let loss = (y * &dy)?.sum_all()?;
            let sb = time(1, || loss.backward().map(|_| ()))?;
            line += &format!(" {sf:>13.4} {sb:>13.4}");
            stock = serde_json::json!({ "fwd_s": sf, "bwd_s": sb });
        }
        println!("{line}");
        rows.push(serde_json::json!({
            "name": name, "n": BATCH, "c": c, "hw": hw, "o": o, "k": k, "stride": s,
            "pad": p, "groups": groups, "flops": flops, "fwd_s": fwd, "bwd_s": bwd,
            "dgrad_s": dgrad, "wgrad_s": wgrad,
            "stock": stock,
        }));
    }
    let norm = if args.only.is_some() {
        serde_json::Value::Null
    } else {
        norm_bench(args.reps)?
    };
    if let Some(path) = args.json {
        let out = serde_json::json!({
            "threads": args.threads, "matmul_gflops": mm, "layers": rows, "norm": norm,
        });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&out).unwrap_or_default(),
        )
        .map_err(|e| candle_core::Error::Msg(format!("writing {path}: {e}")))?;
    }
    Ok(())
}

/// BatchNorm (training) + PReLU forward and backward on a 32x64x56x56 activation:
/// candle_nn's composition against fpipe's fused op (`fpipe_kernels::batch_norm_prelu_train`: the
/// BatchNorm/PReLU kernels every conv unit of the backbones runs).
fn norm_bench(reps: usize) -> candle_core::Result<serde_json::Value> {
    use candle_core::{Module, Var};
    let dev = Device::Cpu;
    let (n, c, hw) = (BATCH, 64, 56);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?)?;
    let gamma = Var::from_tensor(&Tensor::ones(c, DType::F32, &dev)?)?;
    let beta = Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev)?)?;
    let alpha = Var::from_tensor(&Tensor::full(0.25f32, c, &dev)?)?;
    let dy = Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?;
    let stock = || -> candle_core::Result<Tensor> {
        let bn = candle_nn::BatchNorm::new(
            c,
            Tensor::zeros(c, DType::F32, &dev)?,
            Tensor::ones(c, DType::F32, &dev)?,
            gamma.as_tensor().clone(),
            beta.as_tensor().clone(),
            1e-5,
        )?;
        let y = bn.forward_train(x.as_tensor())?;
        candle_nn::PReLU::new(alpha.as_tensor().clone(), false).forward(&y)
    };
    let fused = || -> candle_core::Result<Tensor> {
        let (y, _, _) = fpipe_kernels::batch_norm_prelu_train(
            x.as_tensor(),
            gamma.as_tensor(),
            beta.as_tensor(),
            alpha.as_tensor(),
            1e-5,
        )?;
        Ok(y)
    };
    let mut out = serde_json::Map::new();
    println!("\nBatchNorm(train)+PReLU, {n}x{c}x{hw}x{hw}:   fwd s   fwd+bwd s");
    let variants: [(&str, &dyn Fn() -> candle_core::Result<Tensor>); 2] =
        [("candle_nn", &stock), ("fused", &fused)];
    for (name, f) in variants {
        let tf = time(reps, || f().map(|_| ()))?;
        let tb = time(reps, || (f()? * &dy)?.sum_all()?.backward().map(|_| ()))?;
        println!("  {name:<10} {tf:>28.4} {tb:>11.4}");
        out.insert(
            name.into(),
            serde_json::json!({ "fwd_s": tf, "fwd_bwd_s": tb }),
        );
    }
    Ok(serde_json::json!({ "shape": [n, c, hw, hw], "results": out }))
}
