#!/usr/bin/env python3
"""PyTorch peer of `stages/examples/bench_train_step.rs`: one training step (forward, ArcFace
margin loss over 1000 classes, backward, SGD momentum 0.9 / weight decay 5e-4) and forward-only
throughput at 112x112, same models as fpipe (scripts/make_model_fixtures.py re-creations).

.venv-peers/bin/python scripts/bench_train_torch.py mbf 32 3 2   # arch batch steps threads
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from make_model_fixtures import IResNet, MobileFaceNet, count  # noqa: E402


def arcface_loss(emb, w, labels, s=64.0, m=0.5):
    cos = torch.nn.functional.linear(torch.nn.functional.normalize(emb),
                                     torch.nn.functional.normalize(w)).clamp(-1, 1)
    idx = torch.arange(len(labels))
    with torch.no_grad():  # straight-through margin, as current arcface_torch
        t = cos[idx, labels]
        delta = torch.cos(torch.acos(t) + m) - t
    logits = cos.clone()
    logits[idx, labels] = logits[idx, labels] + delta
    return torch.nn.functional.cross_entropy(logits * s, labels)


def main():
    arch = sys.argv[1] if len(sys.argv) > 1 else "mbf"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = IResNet(18) if arch == "r18" else MobileFaceNet()
    macs = count(model, 112)["macs"]
    w = torch.nn.Parameter(torch.randn(1000, 512) * 0.01)
    opt = torch.optim.SGD(list(model.parameters()) + [w], lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 112, 112)
    labels = torch.tensor([i * 7 % 1000 for i in range(batch)])

    def step():
        t = time.perf_counter()
        model.train()
        opt.zero_grad()
        loss = arcface_loss(model(x), w, labels)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    def fwd():
        t = time.perf_counter()
        model.eval()
        with torch.no_grad():
            model(x).sum().item()
        return time.perf_counter() - t

    step()
    ts = sorted(step() for _ in range(steps))[steps // 2]
    fwd()
    fs = sorted(fwd() for _ in range(steps))[steps // 2]
    flop = 2.0 * macs * batch
    print(json.dumps({"impl": "pytorch " + torch.__version__, "arch": arch, "batch": batch,
                      "threads": threads, "train_step_s": round(ts, 3),
                      "train_gflops": round(3 * flop / ts / 1e9, 1), "forward_s": round(fs, 3),
                      "forward_img_s": round(batch / fs, 1),
                      "forward_gflops": round(flop / fs / 1e9, 1)}))
    assert math.isfinite(ts)


if __name__ == "__main__":
    main()
