"""Post-training static INT8 quantization of an ONNX model with onnxruntime (no torch).

``quantize_ptq`` runs onnxruntime's ``quant_pre_process`` (shape inference and graph
optimization), takes activation ranges (calibrating on a numpy array with
:func:`compresskit.quantize.calibrate.calibrate_graph`, or precomputed :class:`CalibrationRanges`
so that several formats share one calibration), and writes a QDQ model with ``quantize_static``.
Defaults are U8S8 (uint8 activations, int8 per-channel weights): on x86 with VNNI, S8
activations ran slower than FP32 while U8S8 ran faster (see the field notes), so the format must
be measured on the target rather than taken from onnxruntime's defaults.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from compresskit.artifacts import sha256_file
from compresskit.onnxutil import load_model, op_counts, save_onnx, set_metadata
from compresskit.quantize.calibrate import (
    CALIBRATE_METHODS,
    CalibrationRanges,
    calibrate_graph,
    calibration_options,
    check_calibration_data,
    pre_process,
    write_ort_cache,
)

QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
QUANTIZATION_KEY = "compresskit.quantization"


def ptq_calibration(calibrate_method: str, percentile: float | None, symmetric_activation: bool | None) -> dict:
    """The calibration :func:`quantize_ptq` runs for these settings (:func:`calibration_options`).

    Ranges are two-sided unless symmetric activations were asked for. For the percentile
    method that overrides onnxruntime's default, a symmetric |x| range, which wastes half of a
    uint8 range on ReLU outputs; the other methods are two-sided by default already.
    """
    symmetric = calibrate_method == "percentile" and bool(symmetric_activation)
    return calibration_options(calibrate_method, percentile, symmetric)


def quantize_ptq(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib: np.ndarray | None = None,
    *,
    ranges: CalibrationRanges | None = None,
    activation_type: str = "uint8",
    weight_type: str = "int8",
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    percentile: float = 99.999,
    reduce_range: bool = False,
    preprocess: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    calib_batch_size: int = 32,
    symmetric_activation: bool | None = None,
) -> dict:
    """Quantize ``fp32_path`` to a QDQ INT8 model at ``out_path`` and describe what was done.

    Give either ``calib``, the calibration input (N, ...) matching the model's single input,
    or ``ranges`` from :func:`compresskit.quantize.calibrate.calibrate` on the same file with the
    same calibration settings (method, percentile, symmetry, ``preprocess``): then nothing is
    calibrated, ``calib_batch_size`` is the ranges' own, and the model is byte for byte the one
    the same ``calib`` would have given (ValueError when the ranges do not fit). The float model's
    ``metadata_props`` are carried over (plus ``compresskit.quantization`` with the settings).
    Returns a JSON-able dict: settings, operator counts of the float, the QDQ and the
    onnxruntime-optimized INT8 graphs, sizes, seconds spent and whether it ``calibrated``.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    _check_options(activation_type, weight_type, calibrate_method, percentile, calib_batch_size)
    if (calib is None) == (ranges is None):
        raise ValueError("quantize_ptq needs calibration data (calib) or precomputed ranges, exactly one of them")
    fp32 = load_model(fp32_path)
    options = ptq_calibration(calibrate_method, percentile, symmetric_activation)
    if ranges is not None:
        _check_ranges(ranges, options, fp32_path, preprocess)
    else:
        check_calibration_data(fp32, calib, fp32_path)
    settings = {
        "format": "QDQ",
        "activation_type": activation_type,
        "weight_type": weight_type,
        "per_channel": per_channel,
        "calibrate_method": calibrate_method,
        "percentile": percentile if calibrate_method == "percentile" else None,
        "reduce_range": reduce_range,
        "preprocess": preprocess,
        "nodes_to_exclude": list(nodes_to_exclude),
        "calib_batch_size": ranges.batch_size if ranges is not None else calib_batch_size,
        "symmetric_activation": symmetric_activation,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compresskit-ptq-") as tmp:
        t0 = time.perf_counter()
        src = fp32_path
        preprocess_note = None
        if preprocess:
            src = Path(tmp) / "preprocessed.onnx"
            preprocess_note = pre_process(fp32_path, src)
        preprocess_s = time.perf_counter() - t0
        _check_nodes(load_model(src, load_external_data=False), nodes_to_exclude, ranges)
        calibrated = ranges is None
        if ranges is None:
            ranges = calibrate_graph(src, calib, source_sha256=sha256_file(fp32_path), preprocess=preprocess,
                                     batch_size=calib_batch_size, **options)
        raw = Path(tmp) / "quantized.onnx"
        t1 = time.perf_counter()
        _run_quantize_static(src, raw, ranges, settings, Path(tmp) / "calibration.json")
        quantization_s = time.perf_counter() - t1
        int8 = load_model(raw)
        _carry_metadata(fp32, int8, settings)
        save_onnx(int8, out_path)
        optimized = optimized_op_counts(out_path, Path(tmp) / "optimized.onnx")
    return {
        "output": str(out_path),
        "settings": settings,
        "calibrated": calibrated,
        "calib_samples": ranges.samples,
        "calib_batches": ranges.batches,
        "ops_fp32": op_counts(fp32),
        "ops_int8": op_counts(int8),
        "ops_int8_optimized": optimized,
        "size_fp32_bytes": fp32_path.stat().st_size,
        "size_int8_bytes": out_path.stat().st_size,
        "preprocess_s": preprocess_s,
        "preprocess_skipped": preprocess_note,
        "calibration_s": ranges.seconds if calibrated else 0.0,
        "quantization_s": quantization_s,
    }


def _run_quantize_static(src: Path, dst: Path, ranges: CalibrationRanges, settings: Mapping, cache: Path) -> None:
    """``quantize_static`` in QDQ format on precomputed ranges (its calibration cache); its
    progress prints are dropped."""
    extra: dict = {}
    if settings["symmetric_activation"] is not None:
        extra["ActivationSymmetric"] = bool(settings["symmetric_activation"])
    if settings["calibrate_method"] == "distribution":
        # its ranges are symmetric about 0 (it targets float8); onnxruntime would still drop
        # ReLU/Clip as if the range started at 0 and let negative values through
        extra["QDQKeepRemovableActivations"] = True
    write_ort_cache(ranges, cache)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(src),
            str(dst),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=settings["per_channel"],
            reduce_range=settings["reduce_range"],
            activation_type=QUANT_TYPES[settings["activation_type"]],
            weight_type=QUANT_TYPES[settings["weight_type"]],
            nodes_to_exclude=list(settings["nodes_to_exclude"]),
            calibrate_method=CALIBRATE_METHODS[settings["calibrate_method"]],
            extra_options=extra,
            calibration_cache_path=str(cache),
        )


def _check_ranges(ranges: CalibrationRanges, options: Mapping, fp32_path: Path, preprocess: bool) -> None:
    """Precomputed ranges must come from this file, with these calibration settings."""
    if ranges.options() != dict(options):
        raise ValueError(f"ranges were calibrated with {ranges.options()} but these settings need {dict(options)}")
    if ranges.preprocess != preprocess:
        raise ValueError(f"ranges were calibrated with preprocess={ranges.preprocess}, quantizing with {preprocess}")
    if ranges.model_sha256 != sha256_file(fp32_path):
        raise ValueError(f"ranges were calibrated on another model than {fp32_path} (sha256 differs)")


def _check_options(act: str, weight: str, method: str, percentile: float, batch: int) -> None:
    if act not in QUANT_TYPES:
        raise ValueError(f"activation_type must be one of {sorted(QUANT_TYPES)}, got {act!r}")
    if weight not in QUANT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(QUANT_TYPES)}, got {weight!r}")
    if method not in CALIBRATE_METHODS:
        raise ValueError(
            f"calibrate_method must be one of {sorted(CALIBRATE_METHODS)}, got {method!r}"
        )
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if batch < 1:
        raise ValueError(f"calib_batch_size must be >= 1, got {batch}")


def _check_nodes(model: onnx.ModelProto, names: Sequence[str], ranges: CalibrationRanges | None) -> None:
    """``nodes_to_exclude`` and the tensors of precomputed ranges must exist in the graph."""
    known = {n.name for n in model.graph.node}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"nodes_to_exclude names not in the model being quantized: {unknown}; "
            f"names are those after preprocessing, e.g. {sorted(known)[:5]}"
        )
    if ranges is not None:
        tensors = {t for n in model.graph.node for t in (*n.input, *n.output)}
        missing = sorted(set(ranges.ranges) - tensors)
        if missing:
            raise ValueError(f"ranges name tensors the graph being quantized lacks: {missing[:5]}")


def _carry_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, settings: Mapping) -> None:
    """Copy the float model's metadata_props onto the INT8 model (src wins on clashes)."""
    props = {p.key: p.value for p in src.metadata_props}
    props[QUANTIZATION_KEY] = json.dumps({"method": "ptq", **settings})
    set_metadata(dst, props)


def optimized_op_counts(
    path: str | os.PathLike, dump_path: str | os.PathLike | None = None
) -> dict[str, int]:
    """Operator counts of the graph onnxruntime actually runs (extended optimizations, CPU).

    Shows which QDQ groups were fused into int8 kernels (QLinearConv, QLinearAdd, QGemm, ...)
    and which stayed as float islands between DequantizeLinear/QuantizeLinear.
    """
    with tempfile.TemporaryDirectory(prefix="compresskit-opt-") as tmp:
        dump = Path(dump_path) if dump_path is not None else Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(dump)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return op_counts(load_model(dump))
