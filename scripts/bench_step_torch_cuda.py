"""PyTorch peer of `gpu_check time` (scripts/gpu-check.sh, step d): iresnet50 and MobileFaceNet
training steps at 112 px on cuda:0, fp32 and AMP (bf16 autocast), SGD momentum 0.9 with an
ArcFace-shaped linear head over 100 classes, as arcface_torch steps. Uses the peer model
definitions of scripts/make_model_fixtures.py. Prints ms per step (median).

python3 scripts/bench_step_torch_cuda.py [--batch 128] [--reps 10]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_model_fixtures as fx  # noqa: E402


def step_ms(model, batch, reps, amp):
    dev = torch.device("cuda:0")
    model = model.to(dev).train()
    head = torch.nn.Parameter(torch.randn(100, 512, device=dev) * 0.01)
    opt = torch.optim.SGD(list(model.parameters()) + [head], lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, 112, 112, device=dev) * 2 - 1
    y = (torch.arange(batch, device=dev) * 37) % 100
    times = []
    for rep in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            emb = model(x)
            logits = F.linear(F.normalize(emb.float()), F.normalize(head)) * 64.0
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if rep > 0:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    for name, make in [("iresnet50", lambda: fx.IResNet(50)), ("mobilefacenet", lambda: fx.MobileFaceNet())]:
        for amp in (False, True):
            torch.manual_seed(0)
            ms = step_ms(make(), a.batch, a.reps, amp)
            label = "amp bf16" if amp else "fp32"
            print(f"torch {name:<14} batch {a.batch} {label}: {ms:.1f} ms/step, {a.batch / ms * 1e3:.0f} images/s")


if __name__ == "__main__":
    main()
