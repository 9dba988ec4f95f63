#!/usr/bin/env python3
"""Runs an ONNX model in ONNX Runtime on inputs fpipe wrote, for side-by-side checks.

    onnx_check.py MODEL.onnx INPUT.f32 N C H W OUTPUT.f32 [--checker] [--threads T]
    onnx_check.py --bench MODEL.onnx N H W SECONDS [--threads T]

INPUT.f32 holds N*C*H*W little-endian float32 values (NCHW); OUTPUT.f32 receives the
model's first output, float32. With --checker, onnx.checker.check_model(full_check=True)
runs first. A model whose input has a fixed batch of 1 is run one image at a time; declared
inputs that no node reads are dropped first.
--bench runs batches of N random images for about SECONDS and prints images/s as JSON.
Prints one JSON line with what it did. Needs numpy, onnx and onnxruntime (PyPI).
"""
import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

ort.set_default_logger_severity(3)


def session(path, threads):
    # Declared inputs that no node reads (OpenCV Zoo's quantised files list their former
    # float weights as inputs) are dropped: ONNX Runtime would ask for them.
    model = onnx.load(path)
    read = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.input if i.name in read]
    if len(kept) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(kept)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def fixed_batch(sess):
    d = sess.get_inputs()[0].shape[0]
    return d if isinstance(d, int) else None


def run(sess, x):
    name = sess.get_inputs()[0].name
    if fixed_batch(sess) == 1 and x.shape[0] != 1:
        return np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(x.shape[0])])
    return sess.run(None, {name: x})[0]


def option(args, name, default):
    if name in args:
        i = args.index(name)
        v = args[i + 1]
        del args[i : i + 2]
        return v
    return default


def main():
    args = sys.argv[1:]
    threads = int(option(args, "--threads", "2"))
    if args and args[0] == "--bench":
        path, n, h, w, secs = args[1], int(args[2]), int(args[3]), int(args[4]), float(args[5])
        sess = session(path, threads)
        x = np.random.default_rng(0).standard_normal((n, 3, h, w)).astype(np.float32)
        run(sess, x)  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < secs:
            run(sess, x)
            done += n
        dt = time.perf_counter() - t0
        print(json.dumps({"images_per_s": done / dt, "images": done, "seconds": dt,
                          "threads": threads, "onnxruntime": ort.__version__}))
        return
    checker = "--checker" in args
    args = [a for a in args if a != "--checker"]
    path, inp, n, c, h, w, out = args[0], args[1], *map(int, args[2:6]), args[6]
    info = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
    if checker:
        onnx.checker.check_model(onnx.load(path), full_check=True)
        info["checker"] = "passed"
    x = np.fromfile(inp, dtype="<f4").reshape(n, c, h, w)
    y = run(session(path, threads), x).astype("<f4")
    y.tofile(out)
    info["output_shape"] = list(y.shape)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
