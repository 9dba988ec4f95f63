#!/usr/bin/env python3
"""Converts a weight-quantised ONNX model (OpenCV Zoo's *_int8bq.onnx: DequantizeLinear with
block_size, opset 21) to float32, and checks the result against the original in ONNX Runtime.

    sface_fp32.py IN.onnx OUT.onnx

Every DequantizeLinear whose inputs are initialisers is evaluated with numpy and replaced by
a float32 initialiser (as is a Reshape of one); the batch axis of the input and output
becomes dynamic (`batch`). fpipe imports the quantised file directly (it folds the same
nodes at import); this script is for runtimes that do not take blocked DequantizeLinear, and
for ONNX Runtime benchmarks at batch sizes above 1. Prints the max abs difference of the
L2-normalised outputs of both files on 8 random inputs. Needs numpy, onnx, onnxruntime.
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort

ort.set_default_logger_severity(3)
from onnx import numpy_helper


def dequantize(x, scale, zero, axis, block):
    x = x.astype(np.float32)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
    axis = axis % x.ndim
    if scale.size == 1:
        return (x - zero.reshape(())) * scale.reshape(())
    if block == 0:
        shape = [1] * x.ndim
        shape[axis] = -1
        return (x - zero.reshape(shape)) * scale.reshape(shape)
    s = np.repeat(scale, block, axis=axis)
    z = np.repeat(zero, block, axis=axis)
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(0, x.shape[axis])
    return (x - z[tuple(idx)]) * s[tuple(idx)]


def convert(model):
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    keep = []
    for n in g.node:
        ins = [i for i in n.input if i]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "DequantizeLinear" and all(i in consts for i in ins):
            z = consts[ins[2]] if len(ins) > 2 else None
            consts[n.output[0]] = dequantize(
                consts[ins[0]], consts[ins[1]].astype(np.float32), z,
                attrs.get("axis", 1), attrs.get("block_size", 0))
        elif n.op_type == "Reshape" and all(i in consts for i in ins):
            consts[n.output[0]] = consts[ins[0]].reshape(consts[ins[1]])
        else:
            keep.append(n)
    used = {i for n in keep for i in n.input}
    # Drop declared inputs no node reads (the OpenCV Zoo files list the float weights they no
    # longer hold as inputs).
    inputs = [i for i in g.input if i.name not in consts and i.name in used]
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(consts[k].astype(np.float32)
                                                 if consts[k].dtype != np.int64 else consts[k], k)
                         for k in sorted(used) if k in consts)
    del g.input[:]
    g.input.extend(inputs)
    for v in list(g.input) + list(g.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    model.opset_import[0].version = 13
    model.ir_version = 7
    return model


def l2(y):
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def main():
    src, dst = sys.argv[1], sys.argv[2]
    model = convert(onnx.load(src))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, dst)
    orig = onnx.load(src)
    read = {i for n in orig.graph.node for i in n.input}
    kept = [i for i in orig.graph.input if i.name in read]
    del orig.graph.input[:]
    orig.graph.input.extend(kept)
    a = ort.InferenceSession(orig.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
    shape = a.get_inputs()[0].shape
    shape = [1, 3, 112, 112] if not all(isinstance(d, int) for d in shape[1:]) else shape
    x = np.random.default_rng(0).uniform(0, 255, (8, *shape[1:])).astype(np.float32)
    ya = np.concatenate([a.run(None, {a.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(8)])
    yb = b.run(None, {b.get_inputs()[0].name: x})[0]
    print(f"{dst}: checker passed; max abs difference of L2-normalised outputs against "
          f"{src} on 8 random images: {np.abs(l2(ya) - l2(yb)).max():.2e}")


if __name__ == "__main__":
    main()
