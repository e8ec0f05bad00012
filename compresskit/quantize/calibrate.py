"""Calibrate once, quantize many times: activation ranges of a float ONNX model (no torch).

onnxruntime's ``quantize_static`` runs the calibration pass (the float model on every
calibration batch) and then quantizes. The ranges depend only on the graph, the data and the
calibration settings, not on the activation/weight types, per-channel, ``reduce_range`` or
``nodes_to_exclude``, so a search over formats needs one calibration per calibration method.
:func:`calibrate` runs onnxruntime's own calibrators (``create_calibrator``, ``collect_data``
one batch at a time, ``compute_data``) exactly as ``quantize_static`` does and returns
:class:`CalibrationRanges`, a plain-JSON artifact. ``quantize_ptq(ranges=...)`` hands them back
to ``quantize_static`` through its calibration cache (``calibration_cache_path``), which skips
the calibration pass and otherwise runs the same code, so the model is the same, byte for byte.

Calibration reads the array one batch at a time (onnxruntime's strided calibration with a
stride of one batch), so only one batch of intermediate activations is held in memory;
``CalibMaxIntermediateOutputs`` is not used because it drops data instead of merging it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from compresskit.artifacts import atomic_write_json, sha256_file
from compresskit.onnxutil import check_model_path, graph_inputs, load_model

CALIBRATE_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "distribution": CalibrationMethod.Distribution,
}
RANGES_SCHEMA = "compresskit.calibration_ranges"
# quantize_static calibrates the tensors around every op type it can quantize; so do we, so
# the ranges cover exactly the tensors it would have calibrated itself
_OP_TYPES = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


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


@dataclass(frozen=True)
class CalibrationRanges:
    """Per-tensor activation ranges of one float model, with what produced them.

    ``ranges`` maps tensor name -> (low, high) as onnxruntime's calibrator computed them (float32
    values, exact through JSON); ``dtypes`` names the few whose dtype is not float32 (float16
    graphs), since onnxruntime derives the scale's dtype from the range's. ``model_sha256`` is
    the sha256 of the float file given to :func:`calibrate`; with ``preprocess`` the ranges
    belong to its ``quant_pre_process`` output, whose tensor names may differ from the file's.
    """

    method: str
    ranges: dict[str, tuple[float, float]]
    model_sha256: str
    preprocess: bool = True
    percentile: float | None = None
    symmetric: bool = False
    samples: int = 0
    batch_size: int = 32
    seconds: float = 0.0
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return -(-self.samples // self.batch_size)

    def options(self) -> dict:
        """The calibration settings that decide the ranges (what :func:`calibration_options` gives)."""
        return calibration_options(self.method, self.percentile, self.symmetric)

    def to_json(self) -> dict:
        """A JSON-able dict (ranges as [low, high] lists); :meth:`from_json` reads it back."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["ranges"] = {name: [lo, hi] for name, (lo, hi) in self.ranges.items()}
        return {"schema": RANGES_SCHEMA, **doc}

    @classmethod
    def from_json(cls, doc: Mapping) -> CalibrationRanges:
        if doc.get("schema") != RANGES_SCHEMA:
            raise ValueError(f"not a calibration ranges document (schema {doc.get('schema')!r})")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["ranges"] = {name: (float(lo), float(hi)) for name, (lo, hi) in doc["ranges"].items()}
        return cls(**values)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ranges as JSON, atomically."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationRanges:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def tensors_data(self) -> TensorsData:
        """A fresh onnxruntime ``TensorsData`` (the quantizer edits the one it is given)."""
        data = {
            name: TensorData(lowest=np.array(lo, dtype=self.dtypes.get(name, "float32")),
                             highest=np.array(hi, dtype=self.dtypes.get(name, "float32")))
            for name, (lo, hi) in self.ranges.items()
        }
        return TensorsData(CALIBRATE_METHODS[self.method], data)


def calibration_options(method: str, percentile: float | None = 99.999, symmetric: bool = False) -> dict:
    """The settings that decide a calibration: two runs with equal options give equal ranges.

    ``percentile`` only matters for the percentile method (None = 99.999) and is dropped (None)
    for the others; ``symmetric`` makes each range symmetric about 0 (onnxruntime's
    ``CalibTensorRangeSymmetric``).
    """
    percentile = 99.999 if percentile is None else percentile
    if method not in CALIBRATE_METHODS:
        raise ValueError(f"calibrate_method must be one of {sorted(CALIBRATE_METHODS)}, got {method!r}")
    if method == "percentile" and not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    return {"method": method, "percentile": float(percentile) if method == "percentile" else None,
            "symmetric": bool(symmetric)}


def calibrate(
    fp32_model_path: str | os.PathLike,
    calib_x: np.ndarray,
    *,
    method: str = "minmax",
    percentile: float | None = 99.999,
    symmetric: bool = False,
    preprocess: bool = True,
    batch_size: int = 32,
) -> CalibrationRanges:
    """Activation ranges of ``fp32_model_path`` on ``calib_x`` (N, ...), with onnxruntime's
    calibrator for ``method``.

    ``preprocess`` (the default of ``quantize_ptq``) calibrates the ``quant_pre_process`` output,
    the graph ``quantize_ptq`` quantizes. ``batch_size`` matters for the histogram methods
    (their bins grow batch by batch), not for minmax.
    """
    path = check_model_path(fp32_model_path)
    options = calibration_options(method, percentile, symmetric)
    with tempfile.TemporaryDirectory(prefix="compresskit-calib-") as tmp:
        src = path
        if preprocess:
            src = Path(tmp) / "preprocessed.onnx"
            pre_process(path, src)
        return calibrate_graph(src, calib_x, source_sha256=sha256_file(path), preprocess=preprocess,
                               batch_size=batch_size, **options)


def pre_process(src: str | os.PathLike, dst: str | os.PathLike) -> str | None:
    """onnxruntime's ``quant_pre_process`` (symbolic shape inference, graph optimisation) of
    ``src`` into ``dst``. A graph it cannot handle (its shape inference asserts on some Reshape
    patterns, e.g. a vision transformer's) is copied unchanged and the reason returned, so
    quantization goes on without the optimisation; None when it ran. Deterministic: calibration
    and quantization of one file fall back alike, so their tensor names agree."""
    try:
        quant_pre_process(str(src), str(dst))
    except (AssertionError, RuntimeError, ValueError, KeyError, IndexError, TypeError,
            onnx.shape_inference.InferenceError) as err:
        shutil.copyfile(src, dst)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"quant_pre_process failed ({type(err).__name__}: {first[:200]}); quantized without it"
    return None


def calibrate_graph(
    graph_path: str | os.PathLike,
    calib_x: np.ndarray,
    *,
    source_sha256: str,
    preprocess: bool,
    method: str = "minmax",
    percentile: float | None = None,
    symmetric: bool = False,
    batch_size: int = 32,
) -> CalibrationRanges:
    """:func:`calibrate` on a graph already pre-processed (or not) by the caller.

    ``source_sha256`` and ``preprocess`` describe the float file the graph came from; they are
    recorded, not checked. The calibrator sees one batch per ``collect_data`` call, as in
    ``quantize_static`` with ``CalibStridedMinMax=1``.
    """
    graph_path = check_model_path(graph_path)
    options = calibration_options(method, percentile, symmetric)
    input_name = check_calibration_data(load_model(graph_path, load_external_data=False), calib_x, graph_path)
    reader = ArrayCalibrationReader(calib_x, input_name, batch_size)
    extra = {"symmetric": options["symmetric"]}
    if method == "percentile":
        extra["percentile"] = options["percentile"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compresskit-calib-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        calibrator = create_calibrator(graph_path, _OP_TYPES, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CALIBRATE_METHODS[method], extra_options=extra)
        for i in range(len(reader)):
            reader.set_range(i, i + 1)
            calibrator.collect_data(reader)
        data = calibrator.compute_data()
        del calibrator  # its session holds the augmented model open
    ranges, dtypes = {}, {}
    for name, td in data.items():
        lo, hi = (np.asarray(v).reshape(()) for v in td.range_value)
        ranges[name] = (float(lo), float(hi))
        if lo.dtype != np.float32:
            dtypes[name] = lo.dtype.name
    return CalibrationRanges(ranges=ranges, model_sha256=source_sha256, preprocess=preprocess, samples=len(calib_x),
                             batch_size=batch_size, seconds=time.perf_counter() - start, dtypes=dtypes, **options)


def write_ort_cache(ranges: CalibrationRanges, path: str | os.PathLike) -> Path:
    """Write ``ranges`` as an onnxruntime calibration cache for ``quantize_static``."""
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise RuntimeError("quantizing with precomputed ranges needs onnxruntime>=1.32 "
                           "(quantize_static's calibration_cache_path)")
    save_tensors_data(ranges.tensors_data(), path)
    return Path(path)


def check_calibration_data(model: onnx.ModelProto, calib: np.ndarray, path: Path) -> str:
    """Validate ``calib`` against the model's only input; return the input name."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise ValueError(f"{path} has {len(inputs)} inputs; calibration supports one")
    if not isinstance(calib, np.ndarray):
        raise ValueError(f"calibration data must be a numpy array, got {type(calib).__name__}")
    if calib.size == 0 or len(calib) == 0:
        raise ValueError("calibration array is empty")
    if not np.issubdtype(calib.dtype, np.floating):
        raise ValueError(f"calibration data must be floating point (preprocessed), got {calib.dtype}")
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


def ranges_file_name(options: Mapping) -> str:
    """``ranges-<method>[-p<percentile>][-sym].json``: one file per calibration of a search."""
    parts = ["ranges", options["method"]]
    if options.get("percentile") is not None:
        parts.append(f"p{options['percentile']:g}")
    if options.get("symmetric"):
        parts.append("sym")
    return "-".join(parts) + ".json"
