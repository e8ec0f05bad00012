"""Post-training static INT8 quantization of an ONNX model with onnxruntime (no torch).

``quantize_ptq`` runs onnxruntime's ``quant_pre_process`` (shape inference and graph
optimization), calibrates activation ranges on a numpy array, and writes a QDQ model with
``quantize_static``. Defaults are U8S8 (uint8 activations, int8 per-channel weights): on x86
with VNNI, S8 activations ran slower than FP32 while U8S8 ran faster (see the field notes), so
the format must be measured on the target rather than taken from onnxruntime's defaults.

Calibration reads the array one batch at a time (``CalibStridedMinMax`` with a stride of one
batch), so only one batch of intermediate activations is held in memory; onnxruntime's own
``CalibMaxIntermediateOutputs`` is not used because it drops data instead of merging it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from compresskit.artifacts import atomic_path

CALIBRATE_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "distribution": CalibrationMethod.Distribution,
}
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
QUANTIZATION_KEY = "compresskit.quantization"


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds an (N, C, H, W) array to onnxruntime's calibrator in float32 batches.

    Batches are sliced on demand (a memory-mapped array is never loaded whole). Supports
    ``set_range`` in batch units, which onnxruntime's strided calibration uses, and records the
    time between the first and the last request as the calibration time.
    """

    def __init__(self, data: np.ndarray, input_name: str, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"calibration batch size must be >= 1, got {batch_size}")
        if len(data) == 0:
            raise ValueError("calibration array is empty")
        self._data = data
        self._name = input_name
        self._bs = batch_size
        self._n_batches = -(-len(data) // batch_size)
        self._next, self._end = 0, self._n_batches
        self.first_call: float | None = None
        self.last_call: float | None = None
        self.batches_served = 0

    def __len__(self) -> int:
        return self._n_batches

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, self._n_batches)

    def rewind(self) -> None:
        self._next, self._end = 0, self._n_batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        now = time.perf_counter()
        self.first_call = now if self.first_call is None else self.first_call
        self.last_call = now
        if self._next >= self._end:
            return None
        i = self._next
        self._next += 1
        self.batches_served += 1
        batch = self._data[i * self._bs : (i + 1) * self._bs]
        return {self._name: np.ascontiguousarray(batch, dtype=np.float32)}

    @property
    def seconds(self) -> float:
        if self.first_call is None or self.last_call is None:
            return 0.0
        return self.last_call - self.first_call


def quantize_ptq(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib: np.ndarray,
    *,
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

    ``calib`` is the calibration input (N, ...) matching the model's single input. The float
    model's ``metadata_props`` are carried over (plus ``compresskit.quantization`` with the
    settings). Returns a JSON-able dict: settings, operator counts of the float, the QDQ and
    the onnxruntime-optimized INT8 graphs, sizes and seconds spent.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    _check_options(activation_type, weight_type, calibrate_method, percentile, calib_batch_size)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"float ONNX model not found: {fp32_path}")
    fp32 = onnx.load(str(fp32_path))
    input_name = _check_calibration(fp32, calib, fp32_path)
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
        "calib_batch_size": calib_batch_size,
        "symmetric_activation": symmetric_activation,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compresskit-ptq-") as tmp:
        t0 = time.perf_counter()
        src = fp32_path
        if preprocess:
            src = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(fp32_path), str(src))
        preprocess_s = time.perf_counter() - t0
        _check_nodes(onnx.load(str(src), load_external_data=False), nodes_to_exclude)
        reader = ArrayCalibrationReader(calib, input_name, calib_batch_size)
        raw = Path(tmp) / "quantized.onnx"
        t1 = time.perf_counter()
        _run_quantize_static(src, raw, reader, settings)
        total_s = time.perf_counter() - t1
        int8 = onnx.load(str(raw))
        _carry_metadata(fp32, int8, settings)
        onnx.checker.check_model(int8)
        _save_atomic(int8, out_path)
        optimized = optimized_op_counts(out_path, Path(tmp) / "optimized.onnx")
    return {
        "output": str(out_path),
        "settings": settings,
        "calib_samples": int(len(calib)),
        "calib_batches": reader.batches_served,
        "ops_fp32": _counts(fp32),
        "ops_int8": _counts(int8),
        "ops_int8_optimized": optimized,
        "size_fp32_bytes": fp32_path.stat().st_size,
        "size_int8_bytes": out_path.stat().st_size,
        "preprocess_s": preprocess_s,
        "calibration_s": reader.seconds,
        "quantization_s": max(total_s - reader.seconds, 0.0),
    }


def _run_quantize_static(src: Path, dst: Path, reader, settings: Mapping) -> None:
    """``quantize_static`` in QDQ format with the settings; its progress prints are dropped."""
    method = settings["calibrate_method"]
    extra: dict = {"CalibStridedMinMax": 1}
    if settings["symmetric_activation"] is not None:
        extra["ActivationSymmetric"] = bool(settings["symmetric_activation"])
    if method == "percentile":
        extra["CalibPercentile"] = settings["percentile"]
        # onnxruntime's percentile default is a symmetric |x| range, which wastes half of a
        # uint8 range on ReLU outputs; two-sided unless symmetric activations were asked for
        extra["CalibTensorRangeSymmetric"] = bool(settings["symmetric_activation"])
    if method == "distribution":
        # its ranges are symmetric about 0 (it targets float8); onnxruntime would still drop
        # ReLU/Clip as if the range started at 0 and let negative values through
        extra["QDQKeepRemovableActivations"] = True
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(src),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=settings["per_channel"],
            reduce_range=settings["reduce_range"],
            activation_type=QUANT_TYPES[settings["activation_type"]],
            weight_type=QUANT_TYPES[settings["weight_type"]],
            nodes_to_exclude=list(settings["nodes_to_exclude"]),
            calibrate_method=CALIBRATE_METHODS[method],
            extra_options=extra,
        )


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


def _check_calibration(model: onnx.ModelProto, calib: np.ndarray, path: Path) -> str:
    """Validate ``calib`` against the model's only input; return the input name."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"{path} has {len(inputs)} inputs; quantize_ptq supports one")
    if not isinstance(calib, np.ndarray):
        raise ValueError(f"calibration data must be a numpy array, got {type(calib).__name__}")
    if calib.size == 0 or len(calib) == 0:
        raise ValueError("calibration array is empty")
    if not np.issubdtype(calib.dtype, np.floating):
        raise ValueError(
            f"calibration data must be floating point (preprocessed), got {calib.dtype}"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    if calib.ndim != len(dims):
        raise ValueError(
            f"calibration array has rank {calib.ndim} (shape {calib.shape}) but input "
            f"'{inputs[0].name}' of {path} has rank {len(dims)}"
        )
    for axis, (d, n) in enumerate(zip(dims, calib.shape, strict=True)):
        if axis > 0 and d.HasField("dim_value") and d.dim_value != n:
            want = [x.dim_value if x.HasField("dim_value") else x.dim_param for x in dims]
            raise ValueError(
                f"calibration array shape {calib.shape} does not match input "
                f"'{inputs[0].name}' shape {want} of {path} at axis {axis}"
            )
    return inputs[0].name


def _check_nodes(model: onnx.ModelProto, names: Sequence[str]) -> None:
    known = {n.name for n in model.graph.node}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"nodes_to_exclude names not in the model being quantized: {unknown}; "
            f"names are those after preprocessing, e.g. {sorted(known)[:5]}"
        )


def _carry_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, settings: Mapping) -> None:
    """Copy the float model's metadata_props onto the INT8 model (src wins on clashes)."""
    props = {p.key: p.value for p in dst.metadata_props}
    props.update({p.key: p.value for p in src.metadata_props})
    props[QUANTIZATION_KEY] = json.dumps({"method": "ptq", **settings})
    del dst.metadata_props[:]
    for k, v in props.items():
        entry = dst.metadata_props.add()
        entry.key, entry.value = k, v


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


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
        return _counts(onnx.load(str(dump)))
