"""PyTorch CPU peer of stages/benches/train_step.rs (issue 5).

Same models (the reference definitions in scripts/make_model_fixtures.py), batch 32 at
112x112, ArcFace head (s 64, m 0.5, straight-through margin as fpipe's default) over 1000
classes, SGD momentum 0.9 and weight decay 5e-4. Times forward, forward+loss+backward and the
full step (median of `reps` after one warm-up) and prints them beside fpipe's numbers.
Usage: python bench_step_torch.py RUST_JSON [--reps R] [--json OUT]
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
    opt = torch.optim.SGD(list(model.parameters()) + [weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 112, 112)
    labels = torch.tensor([(i * 31) % CLASSES for i in range(batch)])
    tf, tb, ts = [], [], []
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
    med = lambda v: sorted(v)[len(v) // 2]
    return med(tf), med(tb), med(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rust_json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    rust = json.load(open(a.rust_json))
    torch.set_num_threads(rust["threads"])
    torch.manual_seed(0)
    makers = {
        "iresnet18": lambda: fx.IResNet(18),
        "mobilefacenet": lambda: fx.MobileFaceNet(),
        "vargfacenet": lambda: fx.VarGFaceNet(use_se=True),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {rust['batch']}")
    print(f"{'model':<14} {'fwd s':>7} {'torch':>7} {'ratio':>6} {'fwd+bwd':>8} {'torch':>7} {'ratio':>6} "
          f"{'step s':>7} {'torch':>7} {'ratio':>6}")
    out = []
    for r in rust["models"]:
        f, b, s = bench(makers[r["model"]](), a.reps, rust["batch"])
        # ratio > 1: fpipe is faster.
        print(f"{r['model']:<14} {r['fwd_s']:>7.3f} {f:>7.3f} {f / r['fwd_s']:>6.2f} "
              f"{r['fwd_bwd_s']:>8.3f} {b:>7.3f} {b / r['fwd_bwd_s']:>6.2f} "
              f"{r['step_s']:>7.3f} {s:>7.3f} {s / r['step_s']:>6.2f}")
        out.append({**r, "torch_fwd_s": f, "torch_fwd_bwd_s": b, "torch_step_s": s})
    if a.json:
        json.dump({**{k: v for k, v in rust.items() if k != "models"}, "models": out}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
