#!/usr/bin/env python3
"""Golden files for `fpipe_stages::eval::metrics::identify` (tests/metrics_identify.rs).

Run from this folder with numpy + scikit-learn: `python make_identify.py`.

The k-NN decision is face_recognition's `examples/face_recognition_knn.py`:
`KNeighborsClassifier(n_neighbors=k, weights=...)` fitted on the gallery, `predict`, and
"unknown" where `kneighbors(n_neighbors=1)` distance > `distance_threshold`. The CMC rank is
the position of the probe's identity when identities are ordered by their best cosine score
(ties: lower identity first). Data: random unit vectors in float32 (no ties in distance).
"""
import json

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

rng = np.random.default_rng(7)
dim, ids, per = 16, 20, 3
centres = rng.normal(size=(ids + 5, dim))
# Gallery: identities 0..19, 3 images each; probes: 2 more of each enrolled identity plus 2
# of each of 5 identities that are not enrolled (labels 20..24).
def sample(label, n):
    x = centres[label] + 0.9 * rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)

gallery = np.concatenate([sample(i, per) for i in range(ids)]).astype(np.float32)
g_labels = np.repeat(np.arange(ids), per).astype(np.int64)
probes = np.concatenate([sample(i, 2) for i in range(ids + 5)]).astype(np.float32)
p_labels = np.repeat(np.arange(ids + 5), 2).astype(np.int64)
gallery.tofile("gallery.f32")
probes.tofile("probes.f32")
g_labels.tofile("gallery_labels.i64")
p_labels.tofile("probe_labels.i64")

g64, p64 = gallery.astype(np.float64), probes.astype(np.float64)
cases = []
for k, weights, thr in [(1, "distance", 0.9), (3, "distance", 0.9), (4, "uniform", 1.0), (5, "distance", 10.0)]:
    knn = KNeighborsClassifier(n_neighbors=k, weights=weights, algorithm="brute").fit(g64, g_labels)
    dist, _ = knn.kneighbors(p64, n_neighbors=1)
    pred = knn.predict(p64)
    out = [int(p) if d[0] <= thr else -1 for p, d in zip(pred, dist)]
    cases.append({"k": k, "vote": weights, "threshold": thr, "predictions": out})

sims = p64 @ g64.T
best = np.full((len(probes), ids), -np.inf)
for j, l in enumerate(g_labels):
    best[:, l] = np.maximum(best[:, l], sims[:, j])
ranks = []
for p, l in enumerate(p_labels):
    if l >= ids:
        ranks.append(None)
        continue
    order = sorted(range(ids), key=lambda i: (-best[p, i], i))
    ranks.append(order.index(int(l)) + 1)
mated = [r for r in ranks if r is not None]
cmc = [float(np.mean([r <= k for r in mated])) for k in range(1, ids + 1)]
json.dump({"dim": dim, "cases": cases, "ranks": ranks, "cmc": cmc}, open("expected.json", "w"), indent=1)
print("rank1", cmc[0], "rank5", cmc[4], [sum(1 for a, b in zip(c["predictions"], p_labels) if a == b or (a == -1 and b >= ids)) / len(p_labels) for c in cases])
