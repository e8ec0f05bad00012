"""Choose the INT8 format by measuring it on the target, with an accuracy-aware fallback (no torch).

Which static INT8 format runs fastest depends on the CPU and on onnxruntime's kernels, not on a
rule: on the x86 machine of the field notes onnxruntime's default S8 activations ran *slower*
than FP32 while U8 activations ran faster, and onnxruntime's docs warn that U8S8 can saturate
on x86 without VNNI (use ``reduce_range``) and that ARM cores without dot-product instructions
may see INT8 slower than FP32. So :func:`search_ptq` quantizes several candidate formats
(:func:`format_candidates`), measures accuracy and latency of each on this machine, and keeps
the fastest one that stays within the accuracy budget. Every candidate is listed, including
those slower than FP32 (``speedup_vs_fp32`` < 1).

Calibration ranges do not depend on the format, only on the calibration settings, so each
calibration method is run once (:func:`compresskit.quantize.calibrate.calibrate`), saved next to
the models as ``ranges-<method>.json`` and reused by every candidate with that method.

When no candidate meets the budget, :func:`node_sensitivity` ranks the nodes by the
quantization noise on their outputs (onnxruntime's ``qdq_loss_debug``) and the most sensitive
ones are kept in float, 1, 2, 4, ... at a time, until the budget holds (same ranges again).

Only numpy, onnx, onnxruntime and compresskit's torch-free modules are imported.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import qdq_loss_debug
from onnxruntime.quantization.quant_utils import QUANT_INPUT_SUFFIX

from compresskit import bench, envinfo
from compresskit.onnxutil import graph_inputs, read_metadata
from compresskit.quantize.calibrate import (
    CALIBRATE_METHODS,
    ArrayCalibrationReader,
    CalibrationRanges,
    calibrate,
    pre_process,
    ranges_file_name,
)
from compresskit.quantize.ptq import (
    QUANT_TYPES,
    QUANTIZATION_KEY,
    optimized_op_counts,
    ptq_calibration,
    quantize_ptq,
)

ProgressFn = Callable[[str], None]

REQUIRED_KEYS = ("activation_type", "weight_type", "per_channel", "calibrate_method", "reduce_range")
OPTIONAL_KEYS = ("percentile", "symmetric_activation")
_TYPE_TAGS = {"uint8": "u8", "int8": "s8"}
# onnxruntime kernels that compute in integer arithmetic besides the QLinear* family
_INT8_KERNELS = {"QGemm", "QAttention", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                 "DynamicQuantizeMatMul", "QEmbedLayerNormalization"}
# heavy float kernels: what is left of a layer that was not quantized (or not fused)
_FLOAT_COMPUTE = {"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "FusedGemm",
                  "MatMul", "FusedMatMul"}
# accuracies are fractions of the same sample count; the slack only absorbs float rounding of
# ``fp32 - max_accuracy_drop`` (e.g. 0.92 - 0.005 != 0.915 exactly)
_FLOOR_SLACK = 1e-9


# --------------------------------------------------------------------------------------------
# candidates
# --------------------------------------------------------------------------------------------


def _check_choices(name: str, values: object, allowed: Iterable) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of choices, got {values!r}")
    values = tuple(values)
    allowed = tuple(allowed)
    if not values:
        raise ValueError(f"{name} must not be empty")
    bad = [v for v in values if v not in allowed or (isinstance(v, bool) != isinstance(allowed[0], bool))]
    if bad:
        raise ValueError(f"{name} must hold values from {list(allowed)}, got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {list(values)}")
    return values


def format_candidates(
    *,
    int8_dot: bool | None,
    activation_types: Sequence[str] = ("uint8", "int8"),
    per_channel: Sequence[bool] = (True, False),
    calibrate_methods: Sequence[str] = ("minmax",),
    weight_type: str = "int8",
) -> list[dict]:
    """The cross product of the formats to try, as settings dicts for ``quantize_ptq``.

    ``int8_dot`` says whether the CPU has VNNI / ARM dot-product instructions
    (``envinfo.cpu_info()["int8_dot"]``; None = unknown). Without them (False) onnxruntime's
    U8S8 kernels can saturate their 16-bit intermediate sums (onnxruntime's quantization docs),
    so every uint8-activation / int8-weight candidate also gets a ``reduce_range=True`` variant
    (7-bit weights), listed right after it. U8U8 and S8 activations do not use that kernel path
    and get no variant. Raises ValueError naming the bad argument.
    """
    if int8_dot is not None and not isinstance(int8_dot, bool):
        raise ValueError(f"int8_dot must be True, False or None, got {int8_dot!r}")
    acts = _check_choices("activation_types", activation_types, QUANT_TYPES)
    channels = _check_choices("per_channel", per_channel, (True, False))
    methods = _check_choices("calibrate_methods", calibrate_methods, CALIBRATE_METHODS)
    if weight_type not in QUANT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(QUANT_TYPES)}, got {weight_type!r}")
    out = []
    for act, pc, method in itertools.product(acts, channels, methods):
        base = {"activation_type": act, "weight_type": weight_type, "per_channel": pc,
                "calibrate_method": method, "reduce_range": False}
        out.append(base)
        if int8_dot is False and act == "uint8" and weight_type == "int8":
            out.append({**base, "reduce_range": True})
    return out


def candidates_for_host(**kwargs) -> list[dict]:
    """:func:`format_candidates` with ``int8_dot`` read from this machine's CPU flags."""
    return format_candidates(int8_dot=envinfo.cpu_info()["int8_dot"], **kwargs)


def _check_settings(settings: Mapping) -> None:
    if not isinstance(settings, Mapping):
        raise ValueError(f"candidate settings must be a dict, got {settings!r}")
    missing = [k for k in REQUIRED_KEYS if k not in settings]
    unknown = [k for k in settings if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if missing or unknown:
        raise ValueError(f"candidate settings {dict(settings)}: missing keys {missing}, unknown keys {unknown}")
    for key, allowed in (("activation_type", QUANT_TYPES), ("weight_type", QUANT_TYPES),
                         ("calibrate_method", CALIBRATE_METHODS)):
        if settings[key] not in allowed:
            raise ValueError(f"candidate {key} must be one of {sorted(allowed)}, got {settings[key]!r}")
    for key in ("per_channel", "reduce_range"):
        if not isinstance(settings[key], bool):
            raise ValueError(f"candidate {key} must be a bool, got {settings[key]!r}")


def candidate_name(settings: Mapping) -> str:
    """A short file-name-safe name that differs whenever the settings differ.

    ``<act><weight>-<pc|pt>-<method>`` plus ``-p<percentile>`` when given, ``-sym``/``-asym``
    when activation symmetry is forced, ``-rr`` for reduce_range: e.g. ``u8s8-pc-minmax``,
    ``s8s8-pt-entropy``, ``u8s8-pc-minmax-rr``.
    """
    _check_settings(settings)
    parts = [
        _TYPE_TAGS[settings["activation_type"]] + _TYPE_TAGS[settings["weight_type"]],
        "pc" if settings["per_channel"] else "pt",
        settings["calibrate_method"],
    ]
    if settings.get("percentile") is not None:
        parts.append(f"p{settings['percentile']:g}")
    if settings.get("symmetric_activation") is not None:
        parts.append("sym" if settings["symmetric_activation"] else "asym")
    if settings["reduce_range"]:
        parts.append("rr")
    return "-".join(parts)


# --------------------------------------------------------------------------------------------
# per-node sensitivity
# --------------------------------------------------------------------------------------------


def _fake_quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear then DequantizeLinear with a per-tensor scale (round half to even,
    saturate to the zero point's integer type), in float32 as onnxruntime computes it."""
    info = np.iinfo(zero_point.dtype)
    s = np.float32(scale.reshape(()))
    zp = np.float32(zero_point.reshape(()))
    q = np.clip(np.rint(np.asarray(x, np.float32) / s) + zp, info.min, info.max)
    return ((q - zp) * s).astype(np.float32)


def _collect(model_path: Path, aug_path: Path, calib: np.ndarray, input_name: str,
             batch_size: int) -> dict[str, list[np.ndarray]]:
    qdq_loss_debug.modify_model_output_intermediate_tensors(model_path, aug_path)
    reader = ArrayCalibrationReader(calib, input_name, batch_size)
    return qdq_loss_debug.collect_activations(str(aug_path), reader)


def _uses_preprocess(int8_path: Path) -> bool:
    """Whether ``quantize_ptq`` pre-processed the float model before quantizing (its default)."""
    raw = read_metadata(int8_path).get(QUANTIZATION_KEY)
    if raw is None:
        return True
    return bool(json.loads(raw).get("preprocess", True))


def node_sensitivity(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calib: np.ndarray,
    *,
    max_samples: int = 64,
    batch_size: int = 16,
    preprocess: bool | None = None,
) -> list[dict]:
    """Rank the float model's quantized nodes by the quantization noise on their outputs.

    Both models run on the first ``max_samples`` rows of ``calib`` with every intermediate
    tensor saved (``qdq_loss_debug.modify_model_output_intermediate_tensors`` /
    ``collect_activations`` / ``create_activation_matching``; augmented models live in a
    temporary directory that is removed). For each activation tensor ``t`` that the INT8 model
    quantizes, SQNR = 20 log10(||x|| / ||x - y||) in dB (``qdq_loss_debug``'s error function):

    - ``qdq_sqnr_db``: x = the float model's ``t``, y = that value quantized and dequantized with
      the INT8 model's scale and zero point: the error of ``t``'s own quantization, free of
      upstream error. onnxruntime's own ``qdq_err`` compares the tensors before and after the
      QDQ pair *inside* the INT8 model, which is wrong wherever the quantizer folded a
      Relu/Clip into the preceding node (the "before" tensor is then the pre-activation value,
      and clipping its negatives reads as huge noise); it is kept as ``ort_qdq_sqnr_db``.
    - ``xmodel_sqnr_db``: x = the float model's ``t``, y = the INT8 model's dequantized ``t``:
      all error accumulated up to ``t``, weights included (onnxruntime's ``xmodel_err``).

    ``node`` is the node that computes ``t`` in the INT8 graph (e.g. the Conv into which a Relu
    was folded; excluding the Relu alone would leave the conv in INT8), a name that exists in the
    float graph and that ``quantize_ptq(nodes_to_exclude=...)`` accepts; ``float_producer`` is
    the node that writes ``t`` in the float graph. Tensors with no producing node (the graph
    input) are left out, since no node can be excluded for them. One entry per node (its worst
    tensor), lowest ``qdq_sqnr_db`` (most sensitive) first.

    Node and tensor names: ``quantize_ptq`` pre-processes the float model (``quant_pre_process``)
    by default, so the INT8 model's names are those of the pre-processed graph. With
    ``preprocess=None`` the INT8 model's ``compresskit.quantization`` metadata says whether that
    happened (default yes); if so the same pre-processing is applied to ``fp32_path`` here and
    the sensitivity runs on that graph, whose names match the INT8 model and are exactly the
    names ``quantize_ptq`` checks ``nodes_to_exclude`` against.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if max_samples < 1 or batch_size < 1:
        raise ValueError(f"max_samples and batch_size must be >= 1, got {max_samples}, {batch_size}")
    for p in (fp32_path, int8_path):
        if not p.is_file():
            raise FileNotFoundError(f"ONNX model not found: {p}")
    calib = np.asarray(calib)[:max_samples]
    if len(calib) == 0:
        raise ValueError("calibration array is empty")
    if preprocess is None:
        preprocess = _uses_preprocess(int8_path)
    with tempfile.TemporaryDirectory(prefix="compresskit-sens-") as tmp:
        tmpdir = Path(tmp)
        src = fp32_path
        if preprocess:
            src = tmpdir / "preprocessed.onnx"
            pre_process(fp32_path, src)
        float_model = onnx.load(str(src))
        qdq_model = onnx.load(str(int8_path))
        input_name = _single_input(float_model, fp32_path)
        float_acts = _collect(src, tmpdir / "float_aug.onnx", calib, input_name, batch_size)
        qdq_acts = _collect(int8_path, tmpdir / "qdq_aug.onnx", calib, input_name, batch_size)
    matching = qdq_loss_debug.create_activation_matching(qdq_acts, float_acts)
    unmatched = sorted(t for t, m in matching.items() if "float" not in m)
    matching = {t: m for t, m in matching.items() if "float" in m}
    if not matching:
        raise ValueError(
            f"no quantized tensor of {int8_path} exists in the float graph of {fp32_path} "
            f"(preprocess={preprocess}); unmatched tensors: {unmatched[:5]}"
        )
    ort_err = qdq_loss_debug.compute_activation_error(matching)
    return _rank(matching, ort_err, float_model, qdq_model)


def _single_input(model: onnx.ModelProto, path: Path) -> str:
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise ValueError(f"{path} has {len(inputs)} inputs; node_sensitivity supports one")
    return inputs[0].name


def _rank(matching: Mapping, ort_err: Mapping, float_model: onnx.ModelProto,
          qdq_model: onnx.ModelProto) -> list[dict]:
    float_producer = {out: n for n in float_model.graph.node for out in n.output}
    float_names = {n.name for n in float_model.graph.node}
    qdq_producer = {out: n for n in qdq_model.graph.node for out in n.output}
    quantizers = {}
    for n in qdq_model.graph.node:
        if n.op_type == "QuantizeLinear":
            quantizers.setdefault(n.input[0], n)
    consts = {t.name: numpy_helper.to_array(t) for t in qdq_model.graph.initializer}
    worst: dict[str, dict] = {}
    for tensor, match in matching.items():
        pre = tensor if tensor in quantizers else tensor + QUANT_INPUT_SUFFIX
        qnode = quantizers.get(pre)
        producer = qdq_producer.get(pre)
        fprod = float_producer.get(tensor)
        node = producer if producer is not None and producer.name in float_names else fprod
        if node is None:
            continue  # a graph input: no node to keep in float
        own = ort_err[tensor]["qdq_err"]
        scale = consts.get(qnode.input[1]) if qnode is not None else None
        if scale is not None and scale.size == 1:
            zp = consts.get(qnode.input[2]) if len(qnode.input) > 2 and qnode.input[2] else None
            zp = np.zeros((), np.uint8) if zp is None else zp
            own_match = {tensor: {"pre_qdq": match["float"],
                                  "post_qdq": [_fake_quantize(a, scale, zp) for a in match["float"]],
                                  "float": []}}
            own = qdq_loss_debug.compute_activation_error(own_match)[tensor]["qdq_err"]
        entry = {
            "node": node.name,
            "op_type": node.op_type,
            "tensor": tensor,
            "qdq_sqnr_db": float(own),
            "xmodel_sqnr_db": float(ort_err[tensor].get("xmodel_err", math.nan)),
            "ort_qdq_sqnr_db": float(ort_err[tensor]["qdq_err"]),
            "float_producer": fprod.name if fprod is not None else None,
        }
        if node.name not in worst or entry["qdq_sqnr_db"] < worst[node.name]["qdq_sqnr_db"]:
            worst[node.name] = entry
    return sorted(worst.values(), key=lambda e: (e["qdq_sqnr_db"], e["xmodel_sqnr_db"], e["node"]))


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------


def graph_summary(ops: Mapping[str, int]) -> dict:
    """What onnxruntime runs, from the optimized graph's operator counts.

    ``int8_kernels`` counts fused integer kernels (QLinear*, QGemm, ...); ``float_compute`` the
    heavy float kernels left (Conv/Gemm/MatMul and their fused forms); each QuantizeLinear /
    DequantizeLinear beyond the pair at the graph's input and output marks the edge of a float
    island, where onnxruntime found no int8 kernel for a QDQ group.
    """
    return {
        "nodes": int(sum(ops.values())),
        "qlinear_conv": int(ops.get("QLinearConv", 0)),
        "qlinear_add": int(ops.get("QLinearAdd", 0)),
        "qgemm": int(ops.get("QGemm", 0)),
        "int8_kernels": int(sum(n for op, n in ops.items() if op.startswith("QLinear") or op in _INT8_KERNELS)),
        "float_compute": int(sum(n for op, n in ops.items() if op in _FLOAT_COMPUTE)),
        "quantize_linear": int(ops.get("QuantizeLinear", 0)),
        "dequantize_linear": int(ops.get("DequantizeLinear", 0)),
        "ops": dict(sorted(ops.items())),
    }


def _latencies(path: Path, batch_sizes: Sequence[int], threads: int, max_seconds: float) -> dict[str, float]:
    """p50 ms per batch size, keyed by the batch size as a string (the JSON form, so the dict
    is the same before and after a round trip through a file)."""
    return {
        str(b): float(bench.measure_latency(path, b, threads=threads, max_seconds=max_seconds)["p50_ms"])
        for b in batch_sizes
    }


def _check_batch(fp32_path: Path, batch_sizes: Sequence[int]) -> None:
    model = onnx.load(str(fp32_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            fixed = dims[0].dim_value
            if any(b != fixed for b in batch_sizes):
                raise ValueError(f"{fp32_path} has a fixed batch of {fixed}; pass batch_sizes=({fixed},)")


def _check_search_args(candidates: Sequence[Mapping], max_accuracy_drop: float, min_accuracy: float | None,
                       batch_sizes: Sequence[int], rank_batch_size: int, threads: int, max_seconds: float,
                       eval_threads: int, max_excluded: int) -> list[str]:
    """Validate :func:`search_ptq`'s arguments (ValueError naming the bad one); return the names."""
    if not candidates:
        raise ValueError("candidates must not be empty")
    names = [candidate_name(c) for c in candidates]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"candidates has duplicate settings: {dupes}")
    if not 0.0 <= max_accuracy_drop <= 1.0:
        raise ValueError(f"max_accuracy_drop must be in [0, 1], got {max_accuracy_drop}")
    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy must be in [0, 1] or None, got {min_accuracy}")
    if not batch_sizes or any(int(b) != b or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
    if rank_batch_size not in batch_sizes:
        raise ValueError(f"rank_batch_size {rank_batch_size} is not one of batch_sizes {list(batch_sizes)}")
    if threads < 0 or eval_threads < 0:
        raise ValueError(f"threads and eval_threads must be >= 0, got {threads}, {eval_threads}")
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    if max_excluded < 0:
        raise ValueError(f"max_excluded must be >= 0, got {max_excluded}")
    return names


def _exclusion_steps(max_excluded: int, available: int) -> list[int]:
    """k = 1, 2, 4, ... below ``max_excluded``, then ``max_excluded``; capped at ``available``."""
    steps, k = [], 1
    while k < max_excluded:
        steps.append(k)
        k *= 2
    if max_excluded >= 1:
        steps.append(max_excluded)
    return sorted({min(k, available) for k in steps if available > 0})


def search_ptq(
    fp32_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    calib: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    candidates: Sequence[Mapping],
    max_accuracy_drop: float = 0.005,
    min_accuracy: float | None = None,
    batch_sizes: Sequence[int] = (1, 64),
    rank_batch_size: int = 1,
    threads: int = 1,
    max_seconds: float = 0.5,
    eval_threads: int = 0,
    fallback: bool = True,
    max_excluded: int = 16,
    nodes_to_exclude: Sequence[str] = (),
    progress: ProgressFn | None = None,
) -> dict:
    """Quantize ``fp32_path`` in every candidate format, measure each here, keep the fastest
    within the accuracy budget.

    Accuracy floor = max(``min_accuracy`` or 0, FP32 val accuracy - ``max_accuracy_drop``).
    Each candidate is written to ``out_dir/<candidate_name>.onnx`` and gets a row: val accuracy
    (``bench.evaluate`` with ``eval_threads``), p50 latency per batch size
    (``bench.measure_latency`` with ``threads`` and ``max_seconds``, as for FP32),
    ``speedup_vs_fp32`` = FP32 p50 / INT8 p50 per batch size (< 1: INT8 is slower), size, and a
    :func:`graph_summary` of the graph onnxruntime runs. The winner is the row with the lowest
    p50 at ``rank_batch_size`` among those at or above the floor.

    If none is, and ``fallback``: the most accurate candidate's settings are re-quantized with
    the k most sensitive nodes (:func:`node_sensitivity` on that candidate's model) kept in
    float, k = 1, 2, 4, ... up to ``max_excluded``, one row ``<name>-float<k>`` each, stopping
    at the first that meets the floor. If nothing does, the most accurate row wins and
    ``met_budget`` is False, so the best model so far can still be written and reported.
    ``nodes_to_exclude`` (pre-processed graph names) stay float in every row.

    Returns a JSON-able dict: ``fp32`` (path, val_accuracy, latency_p50_ms, size_bytes, graph),
    ``floor``, the budget and timing settings, ``candidates`` (one row per model written, in
    order: name, path, settings, excluded_nodes, val_accuracy, accuracy_drop, latency_p50_ms,
    speedup_vs_fp32, size_bytes, size_vs_fp32, graph, meets_floor), ``chosen``, ``chosen_path``,
    ``met_budget``, ``excluded_nodes`` (the chosen row's), ``sensitivity`` (the node ranking when
    the fallback ran, else None), ``calibrations`` (how many calibration passes ran: one per
    calibration setting among the candidates), ``ranges`` (file name -> path of each saved
    :class:`CalibrationRanges`; each row names its own under ``ranges``) and ``seconds``. Latency
    and speedup dicts are keyed by the batch size as a string, JSON's form, so the dict reads the
    same after a round trip through a file.
    """
    start = time.perf_counter()
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    names = _check_search_args(candidates, max_accuracy_drop, min_accuracy, batch_sizes, rank_batch_size,
                               threads, max_seconds, eval_threads, max_excluded)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"float ONNX model not found: {fp32_path}")
    _check_batch(fp32_path, batch_sizes)
    note = progress or (lambda _msg: None)
    rank = str(rank_batch_size)

    note(f"fp32: accuracy and latency at batch {', '.join(map(str, batch_sizes))}")
    fp32_ops = optimized_op_counts(fp32_path)
    fp32 = {
        "path": str(fp32_path),
        "val_accuracy": bench.evaluate(fp32_path, val_x, val_y, threads=eval_threads)["accuracy"],
        "latency_p50_ms": _latencies(fp32_path, batch_sizes, threads, max_seconds),
        "size_bytes": fp32_path.stat().st_size,
        "graph": graph_summary(fp32_ops),
    }
    floor = max(min_accuracy or 0.0, fp32["val_accuracy"] - max_accuracy_drop)
    note(f"fp32: accuracy {fp32['val_accuracy']:.4f}, floor {floor:.4f}, p50 {fp32['latency_p50_ms'][rank]:.3f} ms")

    ranges_by_file: dict[str, CalibrationRanges] = {}

    def ranges_for(settings: Mapping) -> tuple[str, CalibrationRanges]:
        """The ranges of this candidate's calibration settings, calibrated on first use only."""
        options = ptq_calibration(settings["calibrate_method"], settings.get("percentile"),
                                  settings.get("symmetric_activation"))
        file = ranges_file_name(options)
        if file not in ranges_by_file:
            note(f"calibrate: {options['method']} on {len(calib)} samples")
            ranges = calibrate(fp32_path, calib, **options)
            ranges.save(out_dir / file)
            ranges_by_file[file] = ranges
        return file, ranges_by_file[file]

    def measure(name: str, settings: Mapping, excluded: list[str]) -> dict:
        path = out_dir / f"{name}.onnx"
        ranges_file, ranges = ranges_for(settings)
        note(f"{name}: quantize")
        options = {k: v for k, v in settings.items() if v is not None}  # None = quantize_ptq's default
        info = quantize_ptq(fp32_path, path, ranges=ranges, nodes_to_exclude=excluded, **options)
        note(f"{name}: accuracy and latency")
        acc = bench.evaluate(path, val_x, val_y, threads=eval_threads)["accuracy"]
        p50 = _latencies(path, batch_sizes, threads, max_seconds)
        row = {
            "name": name,
            "path": str(path),
            "settings": dict(settings),
            "excluded_nodes": list(excluded),
            "val_accuracy": acc,
            "accuracy_drop": fp32["val_accuracy"] - acc,
            "latency_p50_ms": p50,
            "speedup_vs_fp32": {b: fp32["latency_p50_ms"][b] / ms if ms > 0 else math.inf for b, ms in p50.items()},
            "size_bytes": path.stat().st_size,
            "size_vs_fp32": path.stat().st_size / fp32["size_bytes"],
            "graph": graph_summary(info["ops_int8_optimized"]),
            "meets_floor": acc >= floor - _FLOOR_SLACK,
            "ranges": ranges_file,
        }
        note(f"{name}: accuracy {acc:.4f}{'' if row['meets_floor'] else ' (below floor)'}, "
             f"p50 {p50[rank]:.3f} ms, {row['speedup_vs_fp32'][rank]:.2f}x fp32")
        return row

    user_excluded = list(nodes_to_exclude)
    rows = [measure(name, settings, user_excluded) for name, settings in zip(names, candidates, strict=True)]

    def fastest(pool: list[dict]) -> dict:
        return min(pool, key=lambda r: r["latency_p50_ms"][rank])

    def most_accurate(pool: list[dict]) -> dict:
        return min(pool, key=lambda r: (-r["val_accuracy"], r["latency_p50_ms"][rank]))

    eligible = [r for r in rows if r["meets_floor"]]
    chosen = fastest(eligible) if eligible else None
    sensitivity: list[dict] | None = None
    if chosen is None and fallback and max_excluded > 0:
        base = most_accurate(rows)
        note(f"no candidate meets the floor: ranking nodes of {base['name']} by sensitivity")
        sensitivity = node_sensitivity(fp32_path, base["path"], calib)
        ranked = [e["node"] for e in sensitivity if e["node"] not in user_excluded]
        for k in _exclusion_steps(max_excluded, len(ranked)):
            row = measure(f"{base['name']}-float{k}", base["settings"], user_excluded + ranked[:k])
            rows.append(row)
            if row["meets_floor"]:
                chosen = row
                break
    met_budget = chosen is not None
    if chosen is None:
        chosen = most_accurate(rows)
        note(f"nothing meets the floor {floor:.4f}: keeping the most accurate, {chosen['name']}")
    else:
        note(f"chosen: {chosen['name']}")
    return {
        "fp32": fp32,
        "floor": floor,
        "max_accuracy_drop": max_accuracy_drop,
        "min_accuracy": min_accuracy,
        "rank_batch_size": rank_batch_size,
        "batch_sizes": [int(b) for b in batch_sizes],
        "threads": threads,
        "candidates": rows,
        "chosen": chosen["name"],
        "chosen_path": chosen["path"],
        "met_budget": met_budget,
        "excluded_nodes": chosen["excluded_nodes"],
        "sensitivity": sensitivity,
        "calibrations": len(ranges_by_file),
        "ranges": {file: str(out_dir / file) for file in ranges_by_file},
        "seconds": time.perf_counter() - start,
    }
