"""The one torch-free home of ONNX file handling: load, save, metadata, graph tidying, stats.

Exporters (:mod:`compresskit.export`, QAT export), quantizers (:mod:`compresskit.quantize.ptq`)
and the measurement side (:mod:`compresskit.bench`, the report) all read and write ONNX files;
keeping loading, atomic saving, ``metadata_props`` handling and op counting here gives them one
implementation each, and keeps them usable where torch is not installed (only onnx and numpy
are imported).

:func:`model_stats` works on FP32 graphs and on INT8 graphs in both ONNX quantization formats:
QDQ (weights stored as int8 initializers feeding ``DequantizeLinear`` -> ``Conv``) and QOperator
(``QLinearConv``, ``ConvInteger``, ...). Counting the weights behind ``DequantizeLinear`` lets
the same model report the same parameter count before and after quantization. The QDQ graph
rewrites used by QAT export live in :mod:`compresskit.quantize.qdq`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import Error as ProtobufError
from onnx import numpy_helper

from compresskit.artifacts import atomic_path


class ModelFileNotFoundError(FileNotFoundError, ValueError):
    """A model path that does not exist; catchable as FileNotFoundError or ValueError."""


# Input slots that carry weights or biases, mapped to the slot of their zero point (or None).
_PARAM_SLOTS: dict[str, dict[int, int | None]] = {
    "Conv": {1: None, 2: None},
    "ConvTranspose": {1: None, 2: None},
    "Gemm": {0: None, 1: None, 2: None},
    "MatMul": {0: None, 1: None},
    "ConvInteger": {1: 3},
    "MatMulInteger": {0: 2, 1: 3},
    "QLinearConv": {3: 5, 8: None},
    "QLinearMatMul": {0: 2, 3: 5},
    "QGemm": {0: 2, 3: 5, 6: None},
}
# Weight slot of each convolution-like op (MACs = output elements x prod(weight.shape[1:])).
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
# (A slot, B slot) of each matrix-product op.
_MATMUL_AB = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_GEMM_AB = {"Gemm": (0, 1), "QGemm": (0, 3)}
# Ops a weight may pass through on its way to a consumer without changing its element count.
_PASS_THROUGH = {"Identity", "Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
# Producers whose output an Add may turn into a biased result (MatMul + Add = Linear).
_BIAS_PRODUCERS = {"MatMul", "MatMulInteger", "Conv", "ConvInteger"}


def check_model_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path, raising a clear error if no file is there."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileNotFoundError(2, "no such model file", str(path))
    return path


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX protobuf file, turning parse failures into a ValueError naming the file."""
    path = check_model_path(path)
    try:
        model = onnx.load(path, format="protobuf", load_external_data=load_external_data)
    except ProtobufError as err:
        raise ValueError(f"{path} is not an ONNX model (protobuf parse failed: {err})") from err
    if model.ir_version == 0 or not model.HasField("graph"):
        raise ValueError(f"{path} is not an ONNX model (no IR version or no graph)")
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are fed at run time (older exporters also list initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``metadata`` into ``model``, check it and save it atomically (temp file + rename).

    The parent directory is created; a crash never leaves a half-written model at ``path``.
    """
    path = Path(path)
    if metadata:
        set_metadata(model, metadata)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


def op_counts(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """Operator type -> count for the main graph of a model or file (sorted by op type)."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model, load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


# --------------------------------------------------------------------------- metadata


def set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> onnx.ModelProto:
    """Add or replace ``metadata_props`` entries of an in-memory model (others are kept).

    Values must be strings (serialise numbers or dicts to JSON first); returns ``model``.
    """
    for key, value in props.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be str, got {key!r}: {value!r}")
    merged = {p.key: p.value for p in model.metadata_props}
    merged.update(props)
    del model.metadata_props[:]
    for key, value in merged.items():
        model.metadata_props.add(key=key, value=value)
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict (weights are not loaded)."""
    model = load_model(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def write_metadata(
    path: str | os.PathLike,
    props: Mapping[str, str],
    out: str | os.PathLike | None = None,
) -> Path:
    """Add or replace ``metadata_props`` entries and save to ``out`` (default: in place).

    Values must be strings. The save is atomic. External weight files are left where they are
    when writing into the same directory; otherwise the weights are loaded and stored inside
    the new file.
    """
    path = check_model_path(path)
    target = Path(out) if out is not None else path
    same_dir = target.resolve().parent == path.resolve().parent
    model = load_model(path, load_external_data=not same_dir)
    set_metadata(model, props)
    with atomic_path(target) as tmp:
        onnx.save_model(model, tmp, format="protobuf")
    return target


# --------------------------------------------------------------------------- graph hygiene


def tidy_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn ``Constant`` nodes into initializers and bypass ``Identity`` nodes, in place.

    The TorchScript exporter leaves both behind (an Identity per shared initializer); runtimes
    remove them anyway, but graph rewrites and readers of the file are simpler without them.
    Graphs with subgraphs are left as they are (a subgraph may capture the names).
    """
    g = model.graph
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in kinds for n in g.node for a in n.attribute):
        return model
    graph_outputs = {o.name for o in g.output}
    keep = []
    rename: dict[str, str] = {}
    for node in g.node:
        value = _constant_tensor(node)
        if value is not None and node.domain in ("", "ai.onnx"):
            t = onnx.TensorProto()
            t.CopyFrom(value)
            t.name = node.output[0]
            g.initializer.append(t)
        elif node.op_type == "Identity" and node.output[0] not in graph_outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


# --------------------------------------------------------------------------- helpers


def _iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """All nodes, including those in subgraphs of If/Loop/Scan."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_nodes(sub)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a ``Constant`` node with a ``value`` attribute, else None."""
    if node.op_type != "Constant" or not node.output:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers plus tensors held by Constant nodes (some exporters use those for weights)."""
    consts = {init.name: init for init in graph.initializer}
    for node in graph.node:
        value = _constant_tensor(node)
        if value is not None:
            consts[node.output[0]] = value
    return consts


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(onnx.helper.get_attribute_value(attr))
    return default


def _dims(type_proto: onnx.TypeProto) -> list[int | str] | None:
    """Dims of a tensor type: ints, the symbol name for symbolic dims, '?' for unknown ones."""
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for dim in type_proto.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append("?")
    return dims


def _dtype_name(elem_type: int) -> str:
    if elem_type == onnx.TensorProto.UNDEFINED:
        return "undefined"
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def _io_info(value: onnx.ValueInfoProto) -> dict:
    return {
        "name": value.name,
        "shape": _dims(value.type),
        "dtype": _dtype_name(value.type.tensor_type.elem_type),
    }


# --------------------------------------------------------------------------- parameters


class _Weights:
    """Finds the constant tensors behind weight inputs, through DequantizeLinear and reshapes."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.consts = _constants(graph)
        self.producer = {out: node for node in graph.node for out in node.output}
        self.found: dict[str, tuple[int, int]] = {}  # const name -> (elements, nonzero)

    def _trace(self, name: str) -> tuple[str, np.ndarray | None, int | None] | None:
        """(constant name, zero point, zero-point axis) of the constant feeding ``name``."""
        if name in self.consts:
            return name, None, None
        node = self.producer.get(name)
        if node is None or not node.input:
            return None
        if node.op_type in _PASS_THROUGH:
            return self._trace(node.input[0])
        if node.op_type == "DequantizeLinear":
            inner = self._trace(node.input[0])
            if inner is None:
                return None
            zp = None
            if len(node.input) > 2 and node.input[2] in self.consts:
                zp = numpy_helper.to_array(self.consts[node.input[2]])
            return inner[0], zp, _attr(node, "axis", 1)
        return None

    def add(self, name: str, zp_name: str | None = None, axis: int | None = None) -> None:
        """Record the constant behind input ``name`` (once, however many consumers it has)."""
        traced = self._trace(name) if name else None
        if traced is None:
            return
        const, zp, zp_axis = traced
        if const in self.found:
            return
        if zp is None and zp_name and zp_name in self.consts:
            zp, zp_axis = numpy_helper.to_array(self.consts[zp_name]), axis
        values = numpy_helper.to_array(self.consts[const])
        self.found[const] = (int(values.size), _nonzero(values, zp, zp_axis))

    def totals(self) -> tuple[int, int]:
        return (
            sum(size for size, _ in self.found.values()),
            sum(nz for _, nz in self.found.values()),
        )


def _nonzero(values: np.ndarray, zp: np.ndarray | None, axis: int | None) -> int:
    """Elements whose real value is non-zero, i.e. that differ from their zero point."""
    if zp is None or zp.size == 0 or not np.any(zp):
        return int(np.count_nonzero(values))
    if zp.size == 1:
        return int(np.count_nonzero(values != zp.reshape(())))
    zp = zp.reshape(-1)
    axes = [a for a in range(values.ndim) if values.shape[a] == zp.size]
    if not axes:
        return int(np.count_nonzero(values))
    if axis is not None and (axis % max(values.ndim, 1)) in axes:
        axis = axis % values.ndim
    else:
        axis = axes[0]
    shape = [1] * values.ndim
    shape[axis] = zp.size
    return int(np.count_nonzero(values != zp.reshape(shape)))


def _count_params(graph: onnx.GraphProto) -> tuple[int, int]:
    weights = _Weights(graph)
    for node in graph.node:
        slots = _PARAM_SLOTS.get(node.op_type)
        if slots is not None:
            axis = 0 if node.op_type in {"QLinearConv", "ConvInteger"} else -1
            for slot, zp_slot in slots.items():
                if slot < len(node.input):
                    zp_name = node.input[zp_slot] if zp_slot is not None and zp_slot < len(node.input) else None
                    weights.add(node.input[slot], zp_name, axis)
        elif node.op_type == "Add" and len(node.input) == 2:
            # A separate bias: MatMul/Conv output + constant.
            for this, other in (node.input, node.input[::-1]):
                src = weights.producer.get(other)
                if src is not None and src.op_type in _BIAS_PRODUCERS:
                    weights.add(this)
    return weights.totals()


# --------------------------------------------------------------------------- MACs


def _batch_one(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy whose inputs have batch 1 where the batch is symbolic; also the fixed batch (>=1)
    of the first input, by which MACs of a fixed-batch model are divided."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    init_names = {init.name for init in fixed.graph.initializer}
    divisor = 0
    for value in fixed.graph.input:
        if value.name in init_names or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims:
            continue
        if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            divisor = divisor or int(dims[0].dim_value)
        else:
            dims[0].Clear()
            dims[0].dim_value = 1
            divisor = divisor or 1
    return fixed, max(divisor, 1)


def _shape_map(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    graph = model.graph
    shapes: dict[str, tuple[int, ...] | None] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = _dims(value.type)
        known = dims is not None and all(isinstance(d, int) for d in dims)
        shapes[value.name] = tuple(dims) if known else None  # type: ignore[arg-type]
    for name, tensor in _constants(graph).items():
        shapes[name] = tuple(int(d) for d in tensor.dims)
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...] | None]) -> int | None:
    """Multiply-accumulates of one node, None when its shapes are not known."""

    def shape(slot: int) -> tuple[int, ...] | None:
        return shapes.get(node.input[slot]) if slot < len(node.input) else None

    op = node.op_type
    if op in _CONV_WEIGHT:
        out = shapes.get(node.output[0])
        weight = shape(_CONV_WEIGHT[op])
        if out is None or weight is None:
            return None
        return math.prod(out) * math.prod(weight[1:])
    if op == "ConvTranspose":
        x, weight = shape(0), shape(1)
        if x is None or weight is None:
            return None
        return math.prod(x) * math.prod(weight[1:])
    if op in _GEMM_AB:
        a_slot, b_slot = _GEMM_AB[op]
        a, b = shape(a_slot), shape(b_slot)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else a
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m * n * k
    if op in _MATMUL_AB:
        a = shape(_MATMUL_AB[op][0])
        out = shapes.get(node.output[0])
        if a is None or out is None or not a:
            return None
        return math.prod(out) * a[-1]
    return 0


def _contrib_output_shape(
    node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...] | None]
) -> tuple[tuple[int, ...], str] | None:
    """(output shape, input it takes its element type from) of the onnxruntime contrib ops that
    QOperator quantization emits, which onnx's shape inference does not know."""
    op, ins = node.op_type, list(node.input)
    if op in {"QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"}:
        shape = shapes.get(ins[0])
        return (shape, ins[0]) if shape is not None else None
    if op in {"QLinearAdd", "QLinearMul"} and len(ins) > 3:
        a, b = shapes.get(ins[0]), shapes.get(ins[3])
        if a is None or b is None:
            return None
        return tuple(np.broadcast_shapes(a, b)), ins[0]
    if op == "QLinearGlobalAveragePool":
        x = shapes.get(ins[0])
        if x is None or len(x) < 3:
            return None
        ones = (1,) * (len(x) - 2)
        out = (x[0], *ones, x[-1]) if _attr(node, "channels_last", 0) else (x[0], x[1], *ones)
        return out, ins[0]
    if op == "QLinearConcat":
        parts = [shapes.get(name) for name in ins[2::3]]
        if not parts or any(p is None for p in parts):
            return None
        axis = _attr(node, "axis", 1) % len(parts[0])
        out = list(parts[0])
        out[axis] = sum(p[axis] for p in parts)
        return tuple(out), ins[2]
    return None


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    types.update({name: t.data_type for name, t in _constants(graph).items()})
    return types


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference, repeated while contrib ops' outputs can be filled in by hand:
    each round lets onnx carry the new shapes on to the next contrib op. Adds value_info to
    ``model`` (the caller's private copy)."""
    contrib = sum(1 for node in model.graph.node if node.domain == "com.microsoft")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    for _ in range(contrib):
        shapes, types = _shape_map(inferred), _elem_types(inferred)
        added = 0
        for node in inferred.graph.node:
            if node.domain != "com.microsoft" or shapes.get(node.output[0]) is not None:
                continue
            found = _contrib_output_shape(node, shapes)
            if found is not None:
                shape, like = found
                info = _value_info(node.output[0], types.get(like, 0), shape)
                model.graph.value_info.append(info)
                added += 1
        if not added:
            break
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    return inferred


def _value_info(name: str, elem_type: int, shape: Sequence[int]) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, elem_type, list(shape))


def _count_macs(model: onnx.ModelProto) -> tuple[int, int, str | None]:
    """(MACs per sample, nodes whose MACs could not be resolved, shape-inference error)."""
    fixed, divisor = _batch_one(model)
    error = None
    try:
        fixed = _infer(fixed)
    except onnx.shape_inference.InferenceError as err:
        error = str(err)
    shapes = _shape_map(fixed)
    total, unresolved = 0, 0
    for node in fixed.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            unresolved += 1
        else:
            total += macs
    return total // divisor, unresolved, error


# --------------------------------------------------------------------------- public API


def is_int8(op_types: set[str] | Mapping[str, int]) -> bool:
    """Whether a graph with these op types computes in INT8 (QDQ or QOperator format)."""
    return any(
        op in {"QuantizeLinear", "DynamicQuantizeLinear", "QGemm"} or op.startswith("QLinear") or op.endswith("Integer")
        for op in op_types
    )


def model_stats(path: str | os.PathLike) -> dict:
    """Size, weight count (total and non-zero), MACs per sample, op counts, I/O, metadata and
    whether the model is INT8.

    ``params`` counts the constants feeding weight and bias inputs of Conv/ConvTranspose/Gemm/
    MatMul and their quantized forms, directly or through DequantizeLinear (scales and zero
    points are not weights). ``macs`` is per sample at batch 1; ``macs_unresolved`` counts
    compute nodes whose shapes shape inference could not determine (their MACs are missing).
    """
    path = check_model_path(path)
    model = load_model(path)
    graph = model.graph
    init_names = {init.name for init in graph.initializer}
    inputs = [_io_info(v) for v in graph.input if v.name not in init_names]
    outputs = [_io_info(v) for v in graph.output]
    op_counts = Counter(node.op_type for node in _iter_nodes(graph))
    params, nonzero = _count_params(graph)
    macs, unresolved, inference_error = _count_macs(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    stats = {
        "size_bytes": path.stat().st_size,
        "params": params,
        "nonzero_params": nonzero,
        "macs": macs,
        "macs_unresolved": unresolved,
        "op_counts": dict(sorted(op_counts.items())),
        "nodes": sum(op_counts.values()),
        "input": inputs[0] if inputs else None,
        "output": outputs[0] if outputs else None,
        "inputs": inputs,
        "outputs": outputs,
        "metadata": {p.key: p.value for p in model.metadata_props},
        "int8": is_int8(op_counts),
        "opset": opset,
        "ir_version": int(model.ir_version),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }
    if inference_error is not None:
        stats["shape_inference_error"] = inference_error
    return stats
