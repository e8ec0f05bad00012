"""ONNX export, float-vs-ONNX parity check and ORT-format conversion.

The exported graph has one input named ``input`` (dynamic batch) and one output named
``logits``. The TorchScript exporter (``dynamo=False``) is the default: for conv nets in this
torch version it exports in well under a second where the dynamo exporter takes several, it
exports the fake-quant ops of :mod:`compresskit.quantize.qat` (the dynamo exporter has no fake
kernel for their tensor-qparams form), and it writes ``GlobalAveragePool``, which onnxruntime
fuses into ``QLinearGlobalAveragePool`` in INT8 graphs, where dynamo writes ``ReduceMean``.
BatchNorm is folded into the preceding conv by the exporter's constant folding; the
``Constant``/``Identity`` clutter it leaves is removed by :func:`compresskit.onnxutil.tidy_graph`.
Saving, ``metadata_props`` and op counting live in :mod:`compresskit.onnxutil` (torch-free).

The metadata builders at the bottom (preprocessing, labels) need no torch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compresskit.onnxutil import save_onnx, tidy_graph

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
DYNAMO_MIN_OPSET = 18
PREPROCESS_KEY = "compresskit.preprocess"
LABELS_KEY = "compresskit.labels"

_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_TS_DEPRECATION_MESSAGES = (
    r".*legacy TorchScript-based ONNX export.*",
    r".*The feature will be removed.*",
)


# --------------------------------------------------------------------------------------------
# torch -> ONNX
# --------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    metadata: Mapping[str, str] | None = None,
    dynamo: bool = False,
) -> Path:
    """Export ``model`` to ONNX at ``path`` and return the path.

    The model is traced in eval mode on CPU without its hooks; its train/eval flags, hooks and
    device are left as they were. The file is checked with ``onnx.checker`` and written
    atomically. ``dynamo=True`` uses the torch.export-based exporter (opset at least 18).
    """
    proto = export_to_proto(
        model, example_input, opset=opset, dynamic_batch=dynamic_batch, dynamo=dynamo
    )
    return save_onnx(proto, path, metadata)


def export_to_proto(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamo: bool = False,
) -> onnx.ModelProto:
    """Trace ``model`` into a tidied in-memory ONNX model (see :func:`export_onnx`)."""
    _check_example(example_input)
    if opset < 13:
        raise ValueError(f"opset must be >= 13 (per-channel QuantizeLinear), got {opset}")
    x = example_input.detach().to("cpu", torch.float32)
    with _inference_view(model) as m, tempfile.TemporaryDirectory() as tmp:
        m = _on_cpu(m)
        _check_forward(m, x)
        f = Path(tmp) / "model.onnx"
        if dynamo:
            _export_dynamo(m, x, f, opset, dynamic_batch)
        else:
            _export_torchscript(m, x, f, opset, dynamic_batch)
        proto = onnx.load(str(f))
    tidy_graph(proto)
    return proto


def _export_torchscript(m: nn.Module, x: torch.Tensor, f: Path, opset: int, dyn: bool) -> None:
    """TorchScript-based export; silences only its own deprecation notices."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dyn else None
    with warnings.catch_warnings():
        for msg in _TS_DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=msg, category=DeprecationWarning)
        torch.onnx.export(
            m,
            (x,),
            str(f),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _export_dynamo(m: nn.Module, x: torch.Tensor, f: Path, opset: int, dyn: bool) -> None:
    """torch.export-based export. A batch of 1 is widened to 2 so the batch dim stays symbolic."""
    shapes = None
    if dyn:
        if x.shape[0] == 1:
            x = x.expand(2, *x.shape[1:]).contiguous()
        shapes = ({0: torch.export.Dim("batch")},)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            m,
            (x,),
            str(f),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=max(opset, DYNAMO_MIN_OPSET),
            dynamic_shapes=shapes,
            external_data=False,
        )


def _check_example(example_input: torch.Tensor) -> None:
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.dim() < 2 or example_input.shape[0] < 1:
        shape = tuple(example_input.shape)
        raise ValueError(f"example_input must be a batch (N, ...) with N >= 1, got shape {shape}")


def _check_forward(model: nn.Module, x: torch.Tensor) -> None:
    """Run one forward so a wrong input shape or a non-tensor output fails with a clear message."""
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as e:
        raise ValueError(f"model forward failed on an input of shape {tuple(x.shape)}: {e}") from e
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"model must return a single tensor (the logits), got {type(out).__name__}"
        )


@contextlib.contextmanager
def _inference_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put every submodule in eval mode with its hooks detached, then restore both.

    Per-module flags are restored (not just the top one), so a model with some modules kept in
    eval on purpose comes back exactly as it was. Hooks (feature taps, for instance) are not
    part of the deployable function and must not run while tracing.
    """
    saved = [(m, m.training, {a: getattr(m, a) for a in _HOOK_ATTRS}) for m in model.modules()]
    try:
        for m, _, _ in saved:
            for a in _HOOK_ATTRS:
                setattr(m, a, OrderedDict())
        model.eval()
        yield model
    finally:
        for m, training, hooks in saved:
            m.train(training)
            for a, h in hooks.items():
                setattr(m, a, h)


def _on_cpu(model: nn.Module) -> nn.Module:
    """The model itself if it lives on CPU, else a CPU copy (the original stays where it is)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()


def _model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Parity between the torch model and an ONNX file
# --------------------------------------------------------------------------------------------


def parity_check(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    inputs: torch.Tensor,
    *,
    batch_size: int = 64,
) -> dict:
    """Compare the model's eval outputs with onnxruntime's on ``inputs`` (N, ...).

    Returns ``{"n", "max_abs_diff", "mean_abs_diff", "max_rel_diff", "max_abs_logit",
    "top1_agreement"}``: ``max_abs_logit`` is the largest |logit| of the model on ``inputs`` and
    ``max_rel_diff = max_abs_diff / max_abs_logit`` (rounding error grows with the logits' scale,
    so this is the figure to judge an FP32 export by; see `parity_problem`). For an INT8 model
    against its float source the differences are quantization error; the top-1 agreement is
    the figure that matters there.
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    _check_example(inputs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = _single_input(sess, tuple(inputs.shape[1:]), onnx_path)
    device = _model_device(model)
    max_diff, sum_diff, count, agree, scale = 0.0, 0.0, 0, 0, 0.0
    with _inference_view(model) as m, torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            xb = inputs[start : start + batch_size].to(torch.float32)
            ref = m(xb.to(device)).float().cpu().numpy()
            got = sess.run(None, {name: xb.cpu().numpy()})[0]
            diff = np.abs(ref - got)
            # np.max propagates NaN; keep it (Python's max(0.0, nan) would drop it)
            max_diff = float(np.max([max_diff, diff.max()]))
            scale = float(np.max([scale, np.abs(ref).max()]))
            sum_diff += float(diff.sum(dtype=np.float64))
            count += diff.size
            if ref.ndim >= 2:
                agree += int((ref.argmax(1) == got.argmax(1)).sum())
    n = int(inputs.shape[0])
    return {
        "n": n,
        "max_abs_diff": max_diff,
        "mean_abs_diff": sum_diff / max(count, 1),
        "max_rel_diff": max_diff / scale if scale > 0 else (0.0 if max_diff == 0 else math.inf),
        "max_abs_logit": scale,
        "top1_agreement": agree / n,
    }


def parity_problem(figures: Mapping, *, max_abs_diff: float | None = 1e-3, max_rel_diff: float = 1e-4,
                   min_top1_agreement: float = 0.99) -> str | None:
    """Why an FP32 export fails its parity check (`parity_check`'s ``figures``), or None.

    Fails when the largest |logit difference| is above ``max_rel_diff`` times the largest
    |logit| (float32 rounding error is relative: a model with logits ~4e4 differs by ~1e-2 on
    rounding alone) and also above the absolute floor ``max_abs_diff`` (None: no floor; a
    difference up to the floor always passes, which keeps near-zero logits from failing on
    relative noise); or when fewer than ``min_top1_agreement`` of the images get the same top-1
    class from both.
    """
    diff, rel = figures["max_abs_diff"], figures["max_rel_diff"]
    if not (math.isfinite(diff) and math.isfinite(rel)) or (
            rel > max_rel_diff and (max_abs_diff is None or diff > max_abs_diff)):
        floor = "" if max_abs_diff is None else f" and > export.max_abs_diff={max_abs_diff:g}"
        return (f"max |logit difference| {diff:.2e} is {rel:.2e} of the max |logit| "
                f"{figures['max_abs_logit']:.3g} > export.max_rel_diff={max_rel_diff:g}{floor}")
    if figures["top1_agreement"] < min_top1_agreement:
        return (f"top-1 class agrees on {figures['top1_agreement']:.2%} of {figures['n']} images "
                f"< export.min_top1_agreement={min_top1_agreement:g}")
    return None


@torch.no_grad()
def logit_stats(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 64) -> dict:
    """``{"max_abs_logit", "finite"}`` of the model's eval-mode logits on ``inputs``."""
    device, scale, finite = _model_device(model), 0.0, True
    with _inference_view(model) as m:
        for start in range(0, inputs.shape[0], batch_size):
            out = m(inputs[start : start + batch_size].to(device, torch.float32)).float()
            ok = torch.isfinite(out)
            finite = finite and bool(ok.all())
            if ok.any():
                scale = max(scale, float(out[ok].abs().max()))
    return {"max_abs_logit": scale, "finite": finite}


def divergence_problem(stats: Mapping, max_abs_logit: float | None = 1e3) -> str | None:
    """Why a model looks diverged (`logit_stats`'s ``stats``), or None: logits that are not
    finite, or larger in magnitude than ``max_abs_logit`` (None: no bound). Softmax is already
    one-hot in float32 at logit gaps of ~100 and a cross-entropy-trained classifier has no reason
    to go far beyond; logits of 1e3 and more are the mark of training that blew up."""
    if not stats["finite"]:
        return "its logits are not finite (NaN or inf)"
    if max_abs_logit is not None and stats["max_abs_logit"] > max_abs_logit:
        return (f"its max |logit| {stats['max_abs_logit']:.3g} is above export.max_abs_logit={max_abs_logit:g} "
                "(trained classifiers stay far below)")
    return None


def _single_input(sess, sample_shape: tuple[int, ...], path: Path) -> str:
    """Name of the model's only input, after checking ``sample_shape`` against its static dims."""
    ins = sess.get_inputs()
    if len(ins) != 1:
        raise ValueError(f"{path} has {len(ins)} inputs; expected one")
    want = ins[0].shape[1:]
    ok = len(want) == len(sample_shape) and all(
        not isinstance(w, int) or w == s for w, s in zip(want, sample_shape, strict=True)
    )
    if not ok:
        raise ValueError(
            f"inputs have per-sample shape {sample_shape} but {path} expects {tuple(want)}"
        )
    return ins[0].name


# --------------------------------------------------------------------------------------------
# ORT format (mobile)
# --------------------------------------------------------------------------------------------


def export_ort_format(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    target_platform: str | None = None,
) -> Path:
    """Convert an ONNX file to onnxruntime's ``.ort`` format for mobile/minimal builds.

    Uses ``onnxruntime.tools.convert_onnx_models_to_ort`` (fixed optimizations, the
    hardware-specific NCHWc layout left out unless ``target_platform="amd64"``). Returns the
    ``.ort`` path; a ``required_operators.config`` for a reduced ORT build lands next to it.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    if target_platform not in (None, "arm", "amd64"):
        raise ValueError(f"target_platform must be 'arm', 'amd64' or None, got {target_platform!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        convert_onnx_models_to_ort(
            onnx_path,
            output_dir=out_dir,
            optimization_styles=[OptimizationStyle.Fixed],
            target_platform=target_platform,
        )
    out = out_dir / onnx_path.with_suffix(".ort").name
    if not out.is_file():
        raise FileNotFoundError(f"conversion finished but {out} was not written")
    return out


# --------------------------------------------------------------------------------------------
# Metadata (no torch needed)
# --------------------------------------------------------------------------------------------


def preprocess_metadata(
    mean: Sequence[float],
    std: Sequence[float],
    size: Sequence[int],
    *,
    scale: float = 1 / 255,
    layout: str = "NCHW",
    channels: int | None = None,
) -> dict[str, str]:
    """``{"compresskit.preprocess": JSON}``: how to turn raw pixels into the model's input.

    ``input = (pixel * scale - mean) / std`` per channel, for an image resized to ``size``
    (H, W) and laid out as ``layout``.
    """
    mean = [float(v) for v in mean]
    std = [float(v) for v in std]
    channels = len(mean) if channels is None else int(channels)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean ({len(mean)}) and std ({len(std)}) must both have `channels` ({channels}) values"
        )
    if any(s <= 0 or not math.isfinite(s) for s in std):
        raise ValueError(f"std values must be positive and finite, got {std}")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    size = [int(v) for v in size]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive values, got {size}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive, got {scale}")
    doc = {
        "scale": scale,
        "mean": mean,
        "std": std,
        "layout": layout,
        "channels": channels,
        "size": size,
    }
    return {PREPROCESS_KEY: json.dumps(doc)}


def labels_metadata(names: Sequence[str]) -> dict[str, str]:
    """``{"compresskit.labels": JSON list}``: class names in output order."""
    names = [str(n) for n in names]
    if not names:
        raise ValueError("labels must not be empty")
    return {LABELS_KEY: json.dumps(names)}
