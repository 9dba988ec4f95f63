#!/usr/bin/env python3
"""Cosine statistics behind the filtering table of docs/results.md: per identity label, the
cosines of genuine pairs (same true identity) and impostor pairs (a mislabelled image against
the rest), and each image's highest and median cosine with the other images of its label,
split into mislabelled and correctly labelled images; plus mean QAA quality per kind.

    P="-f pipelines/training-features.yaml"     # add -p epochs=N for the other rows
    python3 scripts/filter_cosines.py $(fpipe out noisy.dataset $P) \
        $(fpipe out noisy-emb.embeddings $P) $(fpipe out noisy-quality.quality $P)

Needs numpy and safetensors (pip install numpy safetensors).
"""
import sys

import numpy as np
from safetensors.numpy import load_file

# records.bin: 64-byte records; label at 0, true label at 8, flags (u32) at 56 (docs/formats.md).
F_LABEL_NOISE, F_LOW_QUALITY = 2, 4


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    ds, emb_dir, q_dir = sys.argv[1:4]
    rec = np.fromfile(ds + "/records.bin", dtype=np.uint8).reshape(-1, 64)
    label = rec[:, 0:8].copy().view("<i8")[:, 0]
    true = rec[:, 8:16].copy().view("<i8")[:, 0]
    flags = rec[:, 56:60].copy().view("<u4")[:, 0]
    noise, low = (flags & F_LABEL_NOISE) > 0, (flags & F_LOW_QUALITY) > 0
    e = load_file(emb_dir + "/embeddings.safetensors")["embeddings"].astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    q = next(iter(load_file(q_dir + "/quality.safetensors").values())).astype(np.float64) / 100
    print(f"images {len(label)}, mislabelled {noise.sum()}, low-quality {low.sum()}")
    print("mean quality: clean %.3f  mislabelled %.3f  low-quality %.3f"
          % (q[~noise & ~low].mean(), q[noise].mean(), q[low].mean()))
    gen, imp = [], []
    best = {True: [], False: []}
    med = {True: [], False: []}
    for lab in np.unique(label):
        idx = np.where(label == lab)[0]
        c = e[idx] @ e[idx].T
        for a, i in enumerate(idx):
            others = np.delete(c[a], a)
            best[bool(noise[i])].append(others.max())
            med[bool(noise[i])].append(np.median(others))
            for b in range(a + 1, len(idx)):
                (gen if true[i] == true[idx[b]] else imp).append(c[a, b])

    def pct(v):
        return " ".join("%.2f" % x for x in np.percentile(v, [5, 25, 50, 75, 95]))

    print("percentiles 5/25/50/75/95")
    print("genuine pair cosine:            ", pct(gen))
    print("impostor pair cosine:           ", pct(imp))
    print("highest cosine, mislabelled:    ", pct(best[True]))
    print("highest cosine, right label:    ", pct(best[False]))
    print("median cosine, mislabelled:     ", pct(med[True]))
    print("median cosine, right label:     ", pct(med[False]))


if __name__ == "__main__":
    main()
