#!/usr/bin/env python3
"""Golden files for `evaluate`'s IJB template protocol (`fpipe_stages::train::ijb`).

Run from this folder with numpy + scikit-learn: `python make_ijb.py`.

Writes a small protocol in insightface's layout (`meta/tiny_face_tid_mid.txt`,
`meta/tiny_template_pair_label.txt`, `meta/tiny_name_5pts_score.txt`), per-image flip-sum
features (`feats.f32`, not normalised) and `expected.json`: the pair scores and TPR@FPR of
insightface's `eval_ijbc.py` steps transcribed below (use_norm_score=True, i.e. features
not normalised; use_detector_score=True; image2template_feature; verification;
sklearn roc_curve; TPR at the point with minimal |FPR - target|, ties to the highest TPR as
docs/methods.md section 9 says).
"""
import json

import numpy as np
from sklearn.metrics import roc_curve, auc
from sklearn.preprocessing import normalize

rng = np.random.default_rng(3)
n, dim, ntpl = 40, 6, 12
ident = rng.integers(0, 4, size=ntpl)            # identity of each template
centres = rng.normal(size=(4, dim))
tid = rng.integers(0, ntpl, size=n)
tid[:ntpl] = np.arange(ntpl)                     # every template has an image
mid = 100 + rng.integers(0, 3, size=n) + 10 * tid  # a few media per template
feats = (centres[ident[tid]] + 2.5 * rng.normal(size=(n, dim))) * rng.uniform(0.5, 2, size=(n, 1))
feats = feats.astype(np.float32)
score = rng.uniform(0.5, 1.0, size=n).astype(np.float32)
names = [f"{i}.jpg" for i in range(n)]
feats.tofile("feats.f32")
with open("meta/tiny_face_tid_mid.txt", "w") as f:
    for i in range(n):
        f.write(f"{names[i]} {tid[i] + 1} {mid[i]}\n")
with open("meta/tiny_name_5pts_score.txt", "w") as f:
    for i in range(n):
        lm = " ".join(f"{v:.3f}" for v in rng.uniform(20, 90, size=10))
        f.write(f"{names[i]} {lm} {score[i]:.6f}\n")
score = np.array([float(f"{s:.6f}") for s in score], dtype=np.float32)
pairs = [(a, b) for a in range(ntpl) for b in range(a + 1, ntpl)]
with open("meta/tiny_template_pair_label.txt", "w") as f:
    for a, b in pairs:
        f.write(f"{a + 1} {b + 1} {int(ident[a] == ident[b])}\n")

# eval_ijbc.py
templates, medias = tid + 1, mid
img_input_feats = feats.astype(np.float32) * score[:, np.newaxis]
unique_templates = np.unique(templates)
template_feats = np.zeros((len(unique_templates), dim))
for c, uqt in enumerate(unique_templates):
    (ind_t,) = np.where(templates == uqt)
    face_norm_feats = img_input_feats[ind_t]
    face_medias = medias[ind_t]
    unique_medias, counts = np.unique(face_medias, return_counts=True)
    media_norm_feats = []
    for u, ct in zip(unique_medias, counts):
        (ind_m,) = np.where(face_medias == u)
        if ct == 1:
            media_norm_feats += [face_norm_feats[ind_m]]
        else:
            media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
    template_feats[c] = np.sum(np.array(media_norm_feats), axis=0)
template_norm_feats = normalize(template_feats)
t2i = {t: i for i, t in enumerate(unique_templates)}
p1 = np.array([a + 1 for a, _ in pairs])
p2 = np.array([b + 1 for _, b in pairs])
label = np.array([int(ident[a] == ident[b]) for a, b in pairs])
s = np.sum(template_norm_feats[[t2i[t] for t in p1]] * template_norm_feats[[t2i[t] for t in p2]], -1)
fpr, tpr, _ = roc_curve(label, s.astype(np.float32))
targets = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
tprs = []
for t in targets:
    d = np.abs(fpr - t)
    tprs.append(float(np.max(tpr[d == d.min()])))
json.dump({"dim": dim, "scores": s.tolist(), "tpr_at_fpr": tprs, "auc": float(auc(fpr, tpr)),
           "templates": int(len(unique_templates))}, open("expected.json", "w"), indent=1)
print(tprs, auc(fpr, tpr), label.mean())
