"""PyTorch CPU peer of stages/benches/train_step.rs (docs/benchmarks.md, "Whole training
steps"); that bench runs it.

Same models (the reference definitions in scripts/make_model_fixtures.py), batch 32 at
112x112, ArcFace head (s 64, m 0.5, straight-through margin as fpipe's default) over 1000
classes, SGD momentum 0.9 and weight decay 5e-4, the thread count of the Rust run. Times the
forward of a training step, forward+loss+backward, the full step and forward-only inference
(eval, no_grad), medians of the Rust run's `reps` after one warm-up, plus a 2048^3 matmul,
and prints them beside fpipe's numbers (ratio = PyTorch time / fpipe time, > 1: fpipe faster).
Usage: python bench_step_torch.py RUST_JSON [--json OUT]
"""
import argparse
import importlib.util
import json
import math
import os
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("fixtures", os.path.join(HERE, "make_model_fixtures.py"))
fx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fx)

CLASSES = 1000
med = lambda v: sorted(v)[len(v) // 2]


def arcface_loss(emb, weight, labels, s=64.0, m=0.5):
    cos = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    with torch.no_grad():
        target = cos.gather(1, labels[:, None])
        delta = torch.cos(torch.acos(target) + m) - target
    logits = cos.scatter_add(1, labels[:, None], delta) * s
    return F.cross_entropy(logits, labels)


def bench(model, reps, batch):
    model.train()
    weight = torch.nn.Parameter(torch.randn(CLASSES, 512) * 0.01)
    opt = torch.optim.SGD(list(model.parameters()) + [weight], lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 112, 112)
    labels = torch.tensor([(i * 31) % CLASSES for i in range(batch)])
    tf, tb, ts, ti = [], [], [], []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        emb = model(x)
        t1 = time.perf_counter()
        loss = arcface_loss(emb, weight, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        assert not math.isnan(loss.item())
        if rep > 0:
            tf.append(t1 - t0)
            tb.append(t2 - t0)
            ts.append(t3 - t0)
    model.eval()
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x).sum().item()
        if rep > 0:
            ti.append(time.perf_counter() - t0)
    return med(tf), med(tb), med(ts), med(ti)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rust_json")
    ap.add_argument("--json")
    a = ap.parse_args()
    rust = json.load(open(a.rust_json))
    reps = rust.get("reps", 3)
    torch.set_num_threads(rust["threads"])
    torch.manual_seed(0)
    n = 2048
    ma, mb = torch.randn(n, n), torch.randn(n, n)
    ma @ mb
    mm_t = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        ma @ mb
        mm_t.append(time.perf_counter() - t0)
    mm = 2 * n**3 / med(mm_t) / 1e9
    makers = {
        "iresnet18": lambda: fx.IResNet(18),
        "mobilefacenet": lambda: fx.MobileFaceNet(),
        "vargfacenet": lambda: fx.VarGFaceNet(use_se=True),
    }
    print(f"torch {torch.__version__}: threads {torch.get_num_threads()}, batch {rust['batch']}, "
          f"matmul 2048^3 {mm:.1f} GFLOP/s (fpipe run: {rust['matmul_gflops']:.1f})")
    print(f"{'model':<14} {'phase':<8} {'fpipe s':>8} {'torch s':>8} {'ratio':>6} "
          f"{'fpipe GF/s':>10} {'torch GF/s':>10} {'fpipe %mm':>9} {'torch %mm':>9}")
    out = []
    for r in rust["models"]:
        f, b, s, i = bench(makers[r["model"]](), reps, rust["batch"])
        flop = 2.0 * r["macs"] * rust["batch"]
        for phase, ours, theirs, fl in [("fwd", r["fwd_s"], f, flop), ("fwd+bwd", r["fwd_bwd_s"], b, 3 * flop),
                                        ("step", r["step_s"], s, 3 * flop), ("infer", r["infer_s"], i, flop)]:
            og, tg = fl / ours / 1e9, fl / theirs / 1e9
            print(f"{r['model']:<14} {phase:<8} {ours:>8.3f} {theirs:>8.3f} {theirs / ours:>6.2f} "
                  f"{og:>10.1f} {tg:>10.1f} {100 * og / rust['matmul_gflops']:>8.0f}% {100 * tg / mm:>8.0f}%")
        out.append({**r, "torch_fwd_s": f, "torch_fwd_bwd_s": b, "torch_step_s": s, "torch_infer_s": i})
    if a.json:
        json.dump({**{k: v for k, v in rust.items() if k != "models"}, "torch_matmul_gflops": mm,
                   "torch_version": torch.__version__, "models": out}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
