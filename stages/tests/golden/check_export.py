#!/usr/bin/env python3
"""Reads a data set fpipe's `write-recordio` wrote, the way insightface's arcface_torch
`dataset.py` MXFaceDataset does (its __init__ and __getitem__ transcribed without torch), and
compares labels and pixels with the packed data set it came from.

    python check_export.py REC_DIR PACKED_DIR      # needs mxnet 1.9.1 (numpy < 1.24)
"""
import json
import numbers
import os
import sys

import mxnet as mx
import numpy as np

rec_dir, packed = sys.argv[1], sys.argv[2]
# MXFaceDataset.__init__
imgrec = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "r")
header, _ = mx.recordio.unpack(imgrec.read_idx(0))
assert header.flag > 0
header0 = (int(header.label[0]), int(header.label[1]))
imgidx = np.array(range(1, int(header.label[0])))
# The packed data set (docs/formats.md).
meta = json.load(open(os.path.join(packed, "dataset.json")))
n, h, w = meta["images"], meta["height"], meta["width"]
images = np.fromfile(os.path.join(packed, "images.u8"), np.uint8).reshape(n, h, w, 3)
labels = np.fromfile(os.path.join(packed, "records.bin"), np.uint8).reshape(n, 64)[:, :8].copy().view(np.int64)[:, 0]
order = np.argsort(labels, kind="stable")
assert len(imgidx) == n, (len(imgidx), n)
worst, total = 0, 0.0
for index in range(len(imgidx)):
    # MXFaceDataset.__getitem__
    idx = imgidx[index]
    s = imgrec.read_idx(idx)
    header, img = mx.recordio.unpack(s)
    label = header.label
    if not isinstance(label, numbers.Number):
        label = label[0]
    sample = mx.image.imdecode(img).asnumpy()
    src = order[index]
    assert int(label) == labels[src], (index, label, labels[src])
    d = np.abs(sample.astype(int) - images[src].astype(int))
    worst, total = max(worst, d.max()), total + d.mean()
# Identity ranges (keys N+1..N+C), as insightface's tools write them.
for c in range(header0[1] - header0[0]):
    hdr, _ = mx.recordio.unpack(imgrec.read_idx(header0[0] + c))
    a, b = int(hdr.label[0]), int(hdr.label[1])
    assert all(labels[order[k - 1]] == c for k in range(a, b)), c
print(f"MXFaceDataset read {n} images, {header0[1] - header0[0]} identities; labels equal; "
      f"JPEG q95 vs original pixels: max {worst}, mean {total / n:.3f}")
