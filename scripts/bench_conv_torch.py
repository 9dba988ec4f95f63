"""PyTorch CPU peer of stages/benches/conv.rs (docs/benchmarks.md, "Convolution and training
step").

Reads the JSON the Rust benchmark wrote (same layer shapes, batch, thread count), times
PyTorch's conv2d forward and backward (both gradients, torch.autograd.grad) the same way
(the ops of a layer in turn, median of `reps` rounds after one warm-up round), and prints a side-by-side table with ratios.
Usage: python bench_conv_torch.py RUST_JSON [--reps R] [--json OUT]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def median_time(reps, f):
    """Median seconds of `reps` runs of `f` after one warm-up run."""
    return median_times(reps, [f])[0]


def median_times(reps, fs):
    """Median seconds of each of `fs`, run in turn (one warm-up round, then `reps` rounds),
    as the Rust side's `time_each` does."""
    for f in fs:
        f()
    ts = [[] for _ in fs]
    for _ in range(max(1, reps)):
        for f, t in zip(fs, ts):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in ts]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rust_json")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    rust = json.load(open(a.rust_json))
    torch.set_num_threads(rust["threads"])
    torch.manual_seed(0)
    n = 2048
    ma, mb = torch.randn(n, n), torch.randn(n, n)
    mm_t = median_time(a.reps, lambda: ma @ mb)
    mm = 2 * n**3 / mm_t / 1e9
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"matmul 2048^3 GFLOP/s: fpipe/candle {rust['matmul_gflops']:.1f}  torch {mm:.1f}")
    hdr = (f"{'layer (batch 32)':<34} {'fwd GF/s':>9} {'torch':>7} {'ratio':>6} "
           f"{'bwd GF/s':>9} {'torch':>7} {'ratio':>6} {'fwd %mm':>8} {'bwd %mm':>8}")
    print(hdr)
    out, split = [], []
    for L in rust["layers"]:
        x = torch.randn(L["n"], L["c"], L["hw"], L["hw"], requires_grad=True)
        w = (0.1 * torch.randn(L["o"], L["c"] // L["groups"], L["k"], L["k"])).requires_grad_()
        conv = lambda: F.conv2d(x, w, stride=L["stride"], padding=L["pad"], groups=L["groups"])
        def forward():
            with torch.no_grad():
                conv()
        y = conv()
        gy = torch.randn_like(y)
        tf, tb, td, tw = median_times(a.reps, [
            forward,
            lambda: torch.autograd.grad(y, (x, w), gy, retain_graph=True),
            lambda: torch.autograd.grad(y, x, gy, retain_graph=True),
            lambda: torch.autograd.grad(y, w, gy, retain_graph=True),
        ])
        split.append((L, td, tw))
        fl = L["flops"]
        ours_f, ours_b = fl / L["fwd_s"] / 1e9, 2 * fl / L["bwd_s"] / 1e9
        th_f, th_b = fl / tf / 1e9, 2 * fl / tb / 1e9
        print(f"{L['name']:<34} {ours_f:>9.1f} {th_f:>7.1f} {ours_f / th_f:>6.2f} "
              f"{ours_b:>9.1f} {th_b:>7.1f} {ours_b / th_b:>6.2f} "
              f"{100 * ours_f / rust['matmul_gflops']:>7.0f}% {100 * ours_b / rust['matmul_gflops']:>7.0f}%")
        out.append({**L, "torch_fwd_s": tf, "torch_bwd_s": tb, "torch_dgrad_s": td, "torch_wgrad_s": tw})
    print(f"\n{'backward split (s)':<34} {'dgrad':>8} {'torch':>8} {'ratio':>6} {'wgrad':>8} {'torch':>8} {'ratio':>6}")
    for L, td, tw in split:
        if "dgrad_s" in L:
            print(f"{L['name']:<34} {L['dgrad_s']:>8.4f} {td:>8.4f} {td / L['dgrad_s']:>6.2f} "
                  f"{L['wgrad_s']:>8.4f} {tw:>8.4f} {tw / L['wgrad_s']:>6.2f}")
    norm = rust.get("norm")
    if norm:
        shape = norm["shape"]
        x = torch.randn(*shape, requires_grad=True)
        bn, act = torch.nn.BatchNorm2d(shape[1]), torch.nn.PReLU(shape[1])
        bn.train()
        f = lambda: act(bn(x))
        with torch.no_grad():
            tf = median_time(a.reps, f)
        gy = torch.randn(*shape)
        # The same graph as the Rust side's `(f() * dy).sum_all().backward()`.
        tb = median_time(a.reps, lambda: (f() * gy).sum().backward())
        print(f"\nBatchNorm(train)+PReLU {'x'.join(map(str, shape))}:   fwd s  fwd+bwd s  torch/this fwd+bwd")
        for name, r in norm["results"].items():
            print(f"  {name:<10} {r['fwd_s']:>24.4f} {r['fwd_bwd_s']:>10.4f} {tb / r['fwd_bwd_s']:>8.2f}")
        print(f"  {'torch':<10} {tf:>24.4f} {tb:>10.4f}")
        norm["torch"] = {"fwd_s": tf, "fwd_bwd_s": tb}
    if a.json:
        json.dump({"torch_matmul_gflops": mm, "layers": out, **{k: v for k, v in rust.items() if k != "layers"}},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
