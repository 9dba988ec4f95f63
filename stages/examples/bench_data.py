#!/usr/bin/env python3
"""The peers of `bench_data.rs`, on the same files (run by `bench_data.sh`).

    python bench_data.py DIR align roc        # numpy 2, OpenCV, scikit-image, scikit-learn
    python bench_data.py DIR recordio         # mxnet 1.9.1 (numpy < 1.24)

align: insightface's face_align.norm_crop (estimate_norm with skimage SimilarityTransform,
cv2.warpAffine), transcribed (the pip package pulls in onnx and a Cython build), in a loop as
insightface calls it. recordio: insightface MXFaceDataset.__getitem__'s read_idx + unpack +
mx.image.imdecode over every key, in one process (a DataLoader worker's work).
roc: sklearn.metrics.roc_curve.
"""
import json
import os
import sys
import time

import numpy as np

d = sys.argv[1]


def best_of(n, f):
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def packed(path):
    m = json.load(open(os.path.join(path, "dataset.json")))
    n, h, w = m["images"], m["height"], m["width"]
    images = np.memmap(os.path.join(path, "images.u8"), np.uint8, "r", shape=(n, h, w, 3))
    rec = np.fromfile(os.path.join(path, "records.bin"), np.uint8).reshape(n, 64)
    lmk = rec[:, 16:56].copy().view(np.float32).reshape(n, 5, 2)
    return images, lmk


def bench_align():
    import cv2
    from skimage import transform as trans

    cv2.setNumThreads(2)
    arcface_dst = np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
        dtype=np.float32,
    )

    def estimate_norm(lmk, image_size=112):
        ratio = float(image_size) / 112.0
        dst = arcface_dst * ratio
        tform = trans.SimilarityTransform()
        tform.estimate(lmk, dst)
        return tform.params[0:2, :]

    def norm_crop(img, landmark, image_size=112):
        M = estimate_norm(landmark, image_size)
        return cv2.warpAffine(img, M, (image_size, image_size), borderValue=0.0)

    images, lmk = packed(os.path.join(d, "faces"))
    images = np.ascontiguousarray(images)  # in memory, as a loader would hold them
    t, _ = best_of(3, lambda: [norm_crop(images[i], lmk[i]) for i in range(len(images))])
    print(json.dumps({"tool": "insightface norm_crop (skimage + OpenCV %s)" % cv2.__version__, "task": "align",
                      "images": len(images), "seconds": round(t, 4), "per_second": round(len(images) / t)}))


def bench_recordio():
    import mxnet as mx

    rec = mx.recordio.MXIndexedRecordIO(os.path.join(d, "rec/train.idx"), os.path.join(d, "rec/train.rec"), "r")
    header, _ = mx.recordio.unpack(rec.read_idx(0))
    keys = range(1, int(header.label[0]))

    def run():
        n = 0
        for k in keys:
            h, img = mx.recordio.unpack(rec.read_idx(k))
            n += mx.image.imdecode(img).asnumpy().size > 0
        return n

    t, n = best_of(3, run)
    print(json.dumps({"tool": "MXNet %s MXIndexedRecordIO + mx.image.imdecode" % mx.__version__,
                      "task": "recordio read+decode", "images": n, "seconds": round(t, 4), "per_second": round(n / t)}))


def bench_roc():
    import sklearn
    from sklearn.metrics import auc, roc_curve

    s = np.fromfile(os.path.join(d, "scores.f32"), np.float32)
    y = np.fromfile(os.path.join(d, "labels.u8"), np.uint8)
    t, (fpr, tpr, thr) = best_of(3, lambda: roc_curve(y, s))
    i = np.argmin(np.abs(fpr - 1e-4))
    print(json.dumps({"tool": "scikit-learn %s roc_curve" % sklearn.__version__, "task": "roc 15M pairs",
                      "pairs": len(s), "seconds": round(t, 4), "points": len(fpr), "auc": round(float(auc(fpr, tpr)), 6),
                      "tpr_at_1e-4": round(float(tpr[i]), 6)}))


for task in sys.argv[2:]:
    {"align": bench_align, "recordio": bench_recordio, "roc": bench_roc}[task]()
