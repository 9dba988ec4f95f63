"""Memory bandwidth of this machine as PyTorch's CPU kernels see it, for the roofline of the
memory-bound convolution layers in docs/benchmarks.md ("Convolution and training step").

    .venv-peers/bin/python scripts/bench_membw.py [--threads 2] [--mb 103] [--reps 5]

Prints the best of --reps for: read (sum of an array), fill (write only), copy (read +
write, counted as both). 103 MB is the output of iresnet's stem at batch 32 (32x64x112x112
f32).
"""

import argparse
import time

import torch


def best(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mb", type=float, default=103.0)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = int(a.mb * 1e6 / 4)
    x = torch.ones(n)
    y = torch.empty_like(x)
    y.fill_(0.0)  # fault the pages in before timing
    nbytes = n * 4
    read = best(lambda: x.sum(), a.reps)
    fill = best(lambda: y.fill_(3.0), a.reps)
    copy = best(lambda: y.copy_(x), a.reps)
    print(f"threads {a.threads}, {nbytes / 1e6:.0f} MB f32, best of {a.reps}")
    print(f"read  {nbytes / read / 1e9:6.1f} GB/s")
    print(f"fill  {nbytes / fill / 1e9:6.1f} GB/s")
    print(f"copy  {2 * nbytes / copy / 1e9:6.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()
