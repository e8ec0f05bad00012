"""Torch-free QDQ graph rewrites on ONNX models: constant-folding weight quantizers and
storing biases as int32.

The QAT exporter (:mod:`compresskit.quantize.qat`) writes fake-quantized float weights as
``QuantizeLinear -> DequantizeLinear`` pairs on float initializers. These passes turn that into
the layout onnxruntime's own static quantizer writes (int8 weights, int32 biases behind
``DequantizeLinear``), so the file is about 4x smaller and onnxruntime fuses convs into
``QLinearConv``. They need only onnx and numpy, so they live apart from the torch code.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

INT32_MAX = 2**31 - 1


def _initializers(g: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in g.initializer}


def _rename_inputs(g: onnx.GraphProto, old: str, new: str) -> None:
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new


def _axis(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return 1


def _broadcast(v: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if v.ndim == 0:
        return v
    shape = [1] * rank
    shape[axis] = -1
    return v.reshape(shape)


def fold_constant_quantize(model: onnx.ModelProto) -> int:
    """Replace QuantizeLinear nodes of constant tensors by their int8/uint8 result, in place.

    The exported graph fake-quantizes float weights (Q then DQ); storing the quantized tensor
    makes the file about 4x smaller and is the layout onnxruntime expects. Returns the count.
    """
    g = model.graph
    inits = _initializers(g)
    keep, folded = [], 0
    for node in g.node:
        if node.op_type != "QuantizeLinear" or not all(i in inits for i in node.input[:3]):
            keep.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[node.input[2]])
        axis = _axis(node) % max(w.ndim, 1)
        info = np.iinfo(zp.dtype)
        q = np.rint(w / _broadcast(scale, w.ndim, axis)) + _broadcast(
            zp.astype(np.int64), w.ndim, axis
        )
        q = np.clip(q, info.min, info.max).astype(zp.dtype)
        name = f"{node.input[0]}_quantized"
        g.initializer.append(numpy_helper.from_array(q, name))
        _rename_inputs(g, node.output[0], name)
        folded += 1
    del g.node[:]
    g.node.extend(keep)
    return folded


def quantize_biases(model: onnx.ModelProto) -> int:
    """Store float biases of Conv/Gemm nodes with DQ inputs as int32 + DequantizeLinear.

    Bias scale = input scale x weight scale, zero point 0. Where a bias would overflow int32
    (a near-zero weight channel with a large bias), that channel's weight scale is raised
    until it fits, as onnxruntime's quantizer does. Returns the number of biases converted.
    """
    g = model.graph
    inits = _initializers(g)
    producers = {o: n for n in g.node for o in n.output}
    done = 0
    for node in list(g.node):
        if (
            node.op_type not in ("Conv", "Gemm")
            or len(node.input) < 3
            or node.input[2] not in inits
        ):
            continue
        if node.op_type == "Gemm" and not _gemm_is_xwt(node):
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if not (_is_dq(dq_x) and _is_dq(dq_w) and dq_w.input[0] in inits):
            continue
        if not (dq_x.input[1] in inits and dq_w.input[1] in inits):
            continue
        _quantize_one_bias(g, node, dq_x, dq_w, inits)
        done += 1
    return done


def _is_dq(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"


def _gemm_is_xwt(node: onnx.NodeProto) -> bool:
    attrs = {a.name: a for a in node.attribute}
    trans_a = attrs["transA"].i if "transA" in attrs else 0
    trans_b = attrs["transB"].i if "transB" in attrs else 0
    alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
    beta = attrs["beta"].f if "beta" in attrs else 1.0
    return trans_a == 0 and trans_b == 1 and alpha == 1.0 and beta == 1.0


def _quantize_one_bias(g, node, dq_x, dq_w, inits) -> None:
    bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
    x_scale = float(numpy_helper.to_array(inits[dq_x.input[1]]))
    w_scale = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
    needed = np.abs(bias) / (x_scale * INT32_MAX) * 1.0001
    if w_scale.ndim == 0:
        needed = needed.max(initial=0.0)
    if np.any(w_scale < needed):
        w_scale = _raise_weight_scale(g, dq_w, inits, np.maximum(w_scale, needed))
    b_scale = np.broadcast_to(x_scale * w_scale, bias.shape if w_scale.ndim else ())
    b_scale = b_scale.astype(np.float32)
    q = np.clip(np.rint(bias / b_scale.astype(np.float64)), -INT32_MAX, INT32_MAX).astype(np.int32)
    base = f"{node.output[0]}_bias"  # per node: one bias initializer may feed several nodes
    names = (f"{base}_quantized", f"{base}_scale", f"{base}_zero_point")
    zp = np.zeros(b_scale.shape, dtype=np.int32)
    for arr, name in zip((q, b_scale, zp), names, strict=True):
        g.initializer.append(numpy_helper.from_array(arr, name))
    dq = onnx.helper.make_node("DequantizeLinear", list(names), [f"{base}_dequantized"])
    if b_scale.ndim:
        dq.attribute.append(onnx.helper.make_attribute("axis", 0))
    g.node.insert(list(g.node).index(node), dq)
    node.input[2] = dq.output[0]


def _raise_weight_scale(g, dq_w, inits, new_scale: np.ndarray) -> np.ndarray:
    """Requantize a weight to a larger scale (only channels that need it change).

    The result goes to new initializers wired into ``dq_w`` alone, so nothing shared moves.
    """
    w_q = numpy_helper.to_array(inits[dq_w.input[0]])
    old = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
    axis = _axis(dq_w) % w_q.ndim
    ratio = _broadcast(old / new_scale, w_q.ndim, axis)
    info = np.iinfo(w_q.dtype)
    requant = np.clip(np.rint(w_q.astype(np.float64) * ratio), info.min, info.max)
    scale32 = new_scale.astype(np.float32)
    for i, arr in ((0, requant.astype(w_q.dtype)), (1, scale32)):
        name = f"{dq_w.input[i]}_rescaled"
        g.initializer.append(numpy_helper.from_array(arr, name))
        inits[name] = g.initializer[-1]
        dq_w.input[i] = name
    return scale32.astype(np.float64)
