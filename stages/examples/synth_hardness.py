#!/usr/bin/env python3
"""How hard is synthetic-faces? Trains small CNNs (PyTorch, CPU) with softmax on the training
identities of a packed data set and reports insightface-protocol verification accuracy
(flip-sum embeddings, 10 folds) on the held-out pairs; also raw-pixel and PCA baselines.

    python synth_hardness.py TRAIN_DIR PAIRS_DIR [epochs]
"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn

torch.manual_seed(0)
torch.set_num_threads(2)


def load(d):
    m = json.load(open(d + "/dataset.json"))
    n, h, w = m["images"], m["height"], m["width"]
    x = np.fromfile(d + "/images.u8", np.uint8).reshape(n, h, w, 3)
    rec = np.fromfile(d + "/records.bin", np.uint8).reshape(n, 64)
    y = rec[:, :8].copy().view(np.int64)[:, 0]
    try:
        p = np.fromfile(d + "/pairs.bin", np.uint32).reshape(-1, 3)
    except FileNotFoundError:
        p = None
    return x, y, p


def acc10(e, p):
    """insightface verification.py: squared L2 of normalised embeddings, 10 folds."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    dist = ((e[p[:, 0]] - e[p[:, 1]]) ** 2).sum(1)
    same = p[:, 2] == 1
    th = np.arange(0, 4, 0.01)
    folds = np.array_split(np.arange(len(dist)), 10)
    accs = []
    for f in folds:
        tr = np.setdiff1d(np.arange(len(dist)), f)
        a = [((dist[tr] < t) == same[tr]).mean() for t in th]
        t = th[int(np.argmax(a))]
        accs.append(((dist[f] < t) == same[f]).mean())
    return float(np.mean(accs))


def cnn(width, classes):
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    body = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 128), nn.BatchNorm1d(128))
    return body, nn.Linear(128, classes)


def embed(body, x):
    body.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            b = torch.tensor(x[i:i + 256]).permute(0, 3, 1, 2).float() / 127.5 - 1
            out.append((body(b) + body(torch.flip(b, [3]))).numpy())
    return np.concatenate(out)


xt, yt, _ = load(sys.argv[1])
xv, _, pv = load(sys.argv[2])
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 8
g = lambda x: x.reshape(len(x), -1).astype(np.float32) - x.reshape(len(x), -1).mean(1, keepdims=True)
print("raw pixels", round(acc10(g(xv), pv), 4))
for width, ep in [(8, max(1, epochs // 4)), (8, epochs), (24, epochs)]:
    body, head = cnn(width, int(yt.max()) + 1)
    opt = torch.optim.AdamW(list(body.parameters()) + list(head.parameters()), 2e-3, weight_decay=5e-4)
    t0 = time.time()
    for e in range(ep):
        body.train()
        perm = np.random.default_rng(e).permutation(len(xt))
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            b = torch.tensor(xt[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
            if np.random.rand() < 0.5:
                b = torch.flip(b, [3])
            loss = nn.functional.cross_entropy(head(body(b)), torch.tensor(yt[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"cnn width {width}, {ep} epochs ({time.time() - t0:.0f}s): train loss {loss.item():.3f}, "
          f"verification {acc10(embed(body, xv), pv):.4f}")
