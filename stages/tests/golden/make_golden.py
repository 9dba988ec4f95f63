#!/usr/bin/env python3
"""Golden files for fpipe's data and metrics tests, made with the real peer tools.

Run from this folder (the Rust tests read what it writes; they never run Python):

    # scikit-image, OpenCV, scikit-learn (numpy 2):
    python make_golden.py align metrics bin
    # MXNet 1.9.1 needs numpy < 1.24 (separate venv: pip install "numpy<1.24" mxnet==1.9.1
    # opencv-python-headless==4.8.1.78):
    python make_golden.py recordio align-warp

What each section uses:
- align: skimage.transform.SimilarityTransform.estimate (the matrix insightface's
  face_align.estimate_norm returns) and cv2.warpAffine (insightface's norm_crop) on generated
  images with landmarks around the template, output sizes 112, 128, 224, 96.
- metrics: sklearn.metrics.roc_curve / auc on scores with ties; TPR@FPR with insightface's
  eval_ijbc.py argmin rule and with docs/methods.md's "ties to the highest TPR" rule; the 10-fold
  accuracy of insightface's verification.py calculate_roc/calculate_accuracy, transcribed
  below (insightface's pip package does not ship verification.py) on sklearn's KFold.
- bin: verification .bin files written by Python's pickle (protocols 2, 4, 5; numpy-array
  variants). The "py2" file is written opcode by opcode the way Python 2's cPickle writes
  protocol 2 (SHORT_BINSTRING/BINSTRING for str), since no Python 2 is available here.
- recordio: .rec/.idx written by MXNet's own mx.recordio.MXIndexedRecordIO with
  mx.recordio.pack / pack_img (OpenCV JPEG of BGR, as insightface's tools do), in the
  insightface header convention and plain im2rec style, including records whose payload
  contains the RecordIO magic (MXNet splits them, cflag 1/2/3).
"""
import hashlib
import json
import os
import pickle
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ARCFACE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def out(*p):
    path = os.path.join(HERE, *p)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def test_image(rng, h, w):
    """Smooth colour pattern with edges and mild noise (compresses well, has detail)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0, 6)
        img[..., c] = 127 + 90 * np.sin(fx * x + ph) * np.cos(fy * y)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 20)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def estimate_norm(lmk, image_size, precision=np.float64):
    """insightface python-package/insightface/utils/face_align.py estimate_norm (arcface).

    insightface passes float32 arrays (its template and the detector's landmarks), and
    scikit-image then computes the Umeyama solution in float32 (~1e-5 px of rounding noise).
    `precision=np.float64` runs the same estimate on the same values cast to float64 (the
    reference the Rust code is held to within 1e-6); `np.float32` is insightface's exact path.
    """
    from skimage import transform as trans

    if image_size % 112 == 0:
        ratio = float(image_size) / 112.0
        diff_x = 0
    else:
        ratio = float(image_size) / 128.0
        diff_x = 8.0 * ratio
    dst = ARCFACE * ratio
    dst[:, 0] += diff_x
    tform = trans.SimilarityTransform()
    tform.estimate(lmk.astype(precision), dst.astype(precision))
    return tform.params[0:2, :]


def make_align():
    import cv2
    import skimage

    rng = np.random.default_rng(2024)
    cases = []
    for k in range(6):
        h, w = [(160, 140), (120, 120), (200, 180), (90, 110), (250, 250), (130, 150)][k]
        img = test_image(rng, h, w)  # RGB
        cv2.imwrite(out("align", f"img{k}.png"), img[:, :, ::-1])
        # Landmarks: the template under a random similarity plus per-point jitter.
        s = rng.uniform(0.6, 1.8) * min(h, w) / 130
        th = rng.uniform(-0.6, 0.6)
        R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) * s
        lmk = (ARCFACE - 56) @ R.T + [w / 2 + rng.uniform(-10, 10), h / 2 + rng.uniform(-10, 10)]
        lmk = (lmk + rng.normal(0, 2.0, lmk.shape)).astype(np.float32)
        if k == 5:
            lmk[3, 1] = h + 5.0  # a landmark below the image: still aligned, border 0
        for size in (112, 128, 96) + ((224,) if k == 0 else ()):
            M = estimate_norm(lmk, size)
            M32 = estimate_norm(lmk, size, np.float32)
            cases.append(
                {
                    "image": f"img{k}.png",
                    "landmarks": lmk.tolist(),
                    "size": size,
                    "matrix": M.tolist(),
                    "matrix_insightface_float32": M32.tolist(),
                }
            )
    meta = {"tools": {"scikit-image": skimage.__version__}, "cases": cases}
    json.dump(meta, open(out("align", "cases.json"), "w"), indent=1)
    make_align_warp()


def make_align_warp():
    """cv2.warpAffine (insightface's norm_crop) of every case, with the float64 matrix, into
    files named by OpenCV's major version: OpenCV 5 changed the u8 bilinear path (it differs
    from 4.x by up to a few levels), so both are kept. Run in each environment."""
    import cv2

    major = cv2.__version__.split(".")[0]
    path = out("align", "cases.json")
    meta = json.load(open(path))
    for i, c in enumerate(meta["cases"]):
        img = cv2.imread(out("align", c["image"]), cv2.IMREAD_COLOR)  # BGR, as insightface
        M = np.array(c["matrix"])
        warped = cv2.warpAffine(img, M, (c["size"], c["size"]), borderValue=0.0)
        name = f"out{i}_cv{major}.png"
        cv2.imwrite(out("align", name), warped)
        c["warped_cv" + major] = name
    meta["tools"]["opencv" + major] = cv2.__version__
    json.dump(meta, open(path, "w"), indent=1)


def insightface_10fold(dist, actual_issame, nrof_folds=10):
    """recognition/arcface_torch/eval/verification.py calculate_roc (accuracy part)."""
    from sklearn.model_selection import KFold

    thresholds = np.arange(0, 4, 0.01)
    nrof_pairs = len(actual_issame)
    nrof_thresholds = len(thresholds)
    k_fold = KFold(n_splits=nrof_folds, shuffle=False)
    accuracy = np.zeros((nrof_folds))
    best = np.zeros((nrof_folds))
    indices = np.arange(nrof_pairs)

    def calculate_accuracy(threshold, dist, actual_issame):
        predict_issame = np.less(dist, threshold)
        tp = np.sum(np.logical_and(predict_issame, actual_issame))
        tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
        return float(tp + tn) / dist.size

    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        acc_train = np.zeros((nrof_thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            acc_train[threshold_idx] = calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        best[fold_idx] = thresholds[best_threshold_index]
        accuracy[fold_idx] = calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set]
        )
    return accuracy, best


def make_metrics():
    import sklearn
    from sklearn.metrics import auc, roc_curve

    rng = np.random.default_rng(7)
    cases = []
    for k, (n, ties) in enumerate([(6000, False), (7001, True), (3000, True)]):
        same = rng.random(n) < 0.5
        # Embedding-like: unit vectors, noisy for same pairs.
        dim = 16
        a = rng.normal(size=(n, dim)).astype(np.float32)
        noise = 0.6 + 0.8 * rng.random((n, 1))
        b = np.where(same[:, None], a + noise * rng.normal(size=(n, dim)), rng.normal(size=(n, dim)))
        b = b.astype(np.float32)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        score = np.sum(a * b, 1).astype(np.float32)
        if ties:
            score = (np.round(score * 50) / 50).astype(np.float32)
        dist = np.sum(np.square(a - b), 1).astype(np.float32)
        if ties:
            dist = (np.round(dist * 100) / 100).astype(np.float32)
        fpr, tpr, thr = roc_curve(same.astype(int), score)
        x_labels = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
        tpr_argmin = [float(tpr[np.argmin(np.abs(fpr - x))]) for x in x_labels]
        tpr_high = []
        for x in x_labels:
            d = np.abs(fpr - x)
            tpr_high.append(float(tpr[d == d.min()].max()))
        acc, best = insightface_10fold(dist, same)
        base = f"case{k}"
        score.tofile(out("metrics", base + "_score.f32"))
        dist.tofile(out("metrics", base + "_dist.f32"))
        same.astype(np.uint8).tofile(out("metrics", base + "_same.u8"))
        cases.append(
            {
                "name": base,
                "n": n,
                "fpr": fpr.tolist(),
                "tpr": tpr.tolist(),
                "thresholds": [None if not np.isfinite(t) else float(t) for t in thr],
                "auc": float(auc(fpr, tpr)),
                "fpr_targets": x_labels,
                "tpr_at_fpr_insightface_argmin": tpr_argmin,
                "tpr_at_fpr_ties_highest": tpr_high,
                "acc_folds": acc.tolist(),
                "acc_mean": float(np.mean(acc)),
                "acc_std": float(np.std(acc)),
                "best_thresholds": best.tolist(),
            }
        )
    json.dump(
        {"tools": {"scikit-learn": sklearn.__version__, "numpy": np.__version__}, "cases": cases},
        open(out("metrics", "expected.json"), "w"),
    )


def py2_protocol2(bins, issame):
    """The bytes Python 2's cPickle.dumps((bins, issame), 2) writes for a list of str and a
    list of bool: PROTO 2, EMPTY_LIST, BINPUT, MARK, SHORT_BINSTRING/BINSTRING + BINPUT per
    item, APPENDS, then the bools with NEWTRUE/NEWFALSE, TUPLE2, BINPUT, STOP."""
    o = bytearray(b"\x80\x02")
    memo = 0

    def put():
        nonlocal memo
        r = (b"q" + bytes([memo])) if memo < 256 else (b"r" + struct.pack("<I", memo))
        memo += 1
        return r

    o += b"]" + put() + b"("
    for s in bins:
        if len(s) < 256:
            o += b"U" + bytes([len(s)]) + s
        else:
            o += b"T" + struct.pack("<i", len(s)) + s
        o += put()
    o += b"e"
    o += b"]" + put() + b"("
    for v in issame:
        o += b"\x88" if v else b"\x89"
    o += b"e"
    o += b"\x86" + put() + b"."
    return bytes(o)


def make_bin():
    import cv2

    rng = np.random.default_rng(11)
    n_pairs = 5
    imgs = [test_image(rng, 40, 36) for _ in range(2 * n_pairs)]
    bins = []
    for i, im in enumerate(imgs):
        ext = ".png" if i % 3 == 0 else ".jpg"
        ok, enc = cv2.imencode(ext, im[:, :, ::-1])
        assert ok
        bins.append(enc.tobytes())
        cv2.imwrite(out("bin", f"img{i}.png"), cv2.imdecode(enc, cv2.IMREAD_COLOR))
    issame = [True, False, True, True, False]
    files = {}
    files["py2_protocol2.bin"] = py2_protocol2(bins, issame)
    for proto in (2, 4, 5):
        files[f"protocol{proto}.bin"] = pickle.dumps((bins, issame), protocol=proto)
    arrs = [np.frombuffer(b, dtype=np.uint8) for b in bins]
    np_same = np.array(issame, dtype=bool)
    files["numpy_protocol2.bin"] = pickle.dumps((arrs, np_same), protocol=2)
    files["numpy_protocol4.bin"] = pickle.dumps((arrs, np_same), protocol=4)
    files["numpy_scalars_protocol5.bin"] = pickle.dumps((arrs, [np.bool_(v) for v in issame]), protocol=5)
    # Wrong structures.
    files["bad_three_items.bin"] = pickle.dumps((bins, issame, 1), protocol=2)
    files["bad_count.bin"] = pickle.dumps((bins[:-1], issame), protocol=4)
    for name, data in files.items():
        open(out("bin", name), "wb").write(data)
        if not name.startswith("bad"):
            # The standard library reads back what the tests expect.
            b2, s2 = pickle.loads(data, encoding="bytes")
            assert [bytes(x) for x in b2] == bins and [bool(x) for x in s2] == issame, name
    json.dump(
        {
            "issame": issame,
            "sha256": [hashlib.sha256(b).hexdigest() for b in bins],
            "files": sorted(k for k in files if not k.startswith("bad")),
        },
        open(out("bin", "expected.json"), "w"),
        indent=1,
    )


def make_recordio():
    import cv2
    import mxnet as mx

    rng = np.random.default_rng(5)
    MAGIC = struct.pack("<I", 0xCED7230A)
    # insightface convention: record 0 header, images 1..N, identity ranges N+1..N+C.
    labels = [0, 0, 0, 1, 1, 2, 2, 2]
    n, c = len(labels), 3
    rec = mx.recordio.MXIndexedRecordIO(out("recordio", "insight.idx"), out("recordio", "insight.rec"), "w")
    rec.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [n + 1, n + 1 + c], 0, 0), b""))
    expected = []
    for i, lab in enumerate(labels):
        img = test_image(rng, 48, 40)  # RGB
        key = i + 1
        if i == 6:
            # A PNG whose payload carries the magic at 4-aligned offsets (the PNG decoder
            # ignores bytes after IEND), so MXNet's writer splits the record (cflag 1/2/3).
            ok, enc = cv2.imencode(".png", img[:, :, ::-1])
            enc = enc.tobytes()
            pad = (-(24 + len(enc))) % 4
            data = enc + b"\0" * pad + MAGIC + b"abcd" + MAGIC + MAGIC + b"tail"
            s = mx.recordio.pack(mx.recordio.IRHeader(0, float(lab), key, 0), data)
            kind = "png+magic"
        elif i == 2:
            ok, enc = cv2.imencode(".png", img[:, :, ::-1])
            s = mx.recordio.pack(mx.recordio.IRHeader(0, float(lab), key, 0), enc.tobytes())
            kind = "png"
        else:
            # insightface's tools: mx.recordio.pack_img of a BGR array (OpenCV JPEG, q95).
            s = mx.recordio.pack_img(mx.recordio.IRHeader(0, float(lab), key, 0), img[:, :, ::-1], quality=95)
            kind = "jpeg"
        rec.write_idx(key, s)
        header, payload = mx.recordio.unpack(s)
        decoded = mx.image.imdecode(payload).asnumpy()  # RGB, as MXFaceDataset does
        cv2.imwrite(out("recordio", f"insight_{key}.png"), decoded[:, :, ::-1])
        expected.append(
            {
                "key": key,
                "label": lab,
                "kind": kind,
                "record_sha256": hashlib.sha256(s).hexdigest(),
                "decoded": f"insight_{key}.png",
            }
        )
    for j in range(c):
        start = 1 + labels.index(j)
        end = 1 + len(labels) - labels[::-1].index(j)
        rec.write_idx(n + 1 + j, mx.recordio.pack(mx.recordio.IRHeader(0, [start, end], n + 1 + j, 0), b""))
    rec.close()
    # Plain im2rec style: keys from 0, no header, one multi-label record.
    rec = mx.recordio.MXIndexedRecordIO(out("recordio", "plain.idx"), out("recordio", "plain.rec"), "w")
    plain = []
    for key in range(4):
        img = test_image(rng, 30, 30)
        ok, enc = cv2.imencode(".png", img[:, :, ::-1])
        lab = [float(key % 2), 7.0] if key == 3 else float(key % 2)
        s = mx.recordio.pack(mx.recordio.IRHeader(0, lab, key, 0), enc.tobytes())
        rec.write_idx(key, s)
        cv2.imwrite(out("recordio", f"plain_{key}.png"), img[:, :, ::-1])
        plain.append({"key": key, "label": key % 2, "record_sha256": hashlib.sha256(s).hexdigest(), "decoded": f"plain_{key}.png"})
    rec.close()
    # Read back with MXNet's reader, as insightface's MXFaceDataset does.
    r = mx.recordio.MXIndexedRecordIO(out("recordio", "insight.idx"), out("recordio", "insight.rec"), "r")
    h0, _ = mx.recordio.unpack(r.read_idx(0))
    assert h0.flag > 0 and int(h0.label[0]) == n + 1
    for e in expected:
        s = r.read_idx(e["key"])
        assert hashlib.sha256(s).hexdigest() == e["record_sha256"]
    # Records split by the writer, as found in the file.
    raw = open(out("recordio", "insight.rec"), "rb").read()
    cflags = []
    pos = 0
    while pos < len(raw):
        magic, lrec = struct.unpack("<II", raw[pos : pos + 8])
        assert magic == 0xCED7230A
        cflags.append(lrec >> 29)
        ln = lrec & ((1 << 29) - 1)
        pos += 8 + ((ln + 3) // 4) * 4
    assert 1 in cflags and 2 in cflags and 3 in cflags, cflags
    json.dump(
        {
            "tools": {"mxnet": mx.__version__, "opencv": cv2.__version__, "numpy": np.__version__},
            "insight": {"header": [n + 1, n + 1 + c], "images": expected, "cflags": cflags},
            "plain": plain,
        },
        open(out("recordio", "expected.json"), "w"),
        indent=1,
    )


if __name__ == "__main__":
    for section in sys.argv[1:]:
        {"align": make_align, "align-warp": make_align_warp, "metrics": make_metrics, "bin": make_bin, "recordio": make_recordio}[section]()
        print("made", section)
