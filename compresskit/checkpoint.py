"""Checkpoints: save a model with what rebuilds it and what it expects as input, read one back,
rebuild the model.

A checkpoint is a dict readable with ``torch.load(..., weights_only=True)``: the architecture
spec (`compresskit.nets.build_model`), the pruning state (`compresskit.prune.rebuild_pruned`),
the QAT state (`compresskit.quantize.qat.rebuild_qat`), the preprocessing it was trained with
(`preprocess`: scale, mean, std, layout, channels, size and class names, as
`compresskit.data.DataBundle.checkpoint_preprocess`), free-form `meta` and the weights. Plain
state dicts (and ``{"model": ...}`` / ``{"state_dict": ...}`` files) are read too; rebuilding
those needs the spec from the caller. Keys saved through a DataParallel / DDP wrapper
(``module.``) or from a ``torch.compile``d model (``_orig_mod.``) load as the bare model's.

Every problem with a file is a `ValueError` whose message is one line, ``path: what is wrong``
(a missing file: `FileNotFoundError`, worded the same way).
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.nets import build_model

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "PREPROCESS_POLICIES", "describe_preprocess_differences",
           "fit_problems", "load_for_data", "load_model", "model_from_checkpoint", "preprocess_differences",
           "read_checkpoint", "save_checkpoint", "strip_wrapper_prefixes"]

CHECKPOINT_FORMAT = "compresskit.checkpoint"
CHECKPOINT_VERSION = 1
PREPROCESS_POLICIES = ("refuse", "convert", "ignore")
NORMALISATION_KEYS = ("scale", "mean", "std")
PREPROCESS_KEYS = (*NORMALISATION_KEYS, "channels", "size", "class_names")
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net", "weights")


def save_checkpoint(path: Path, model: nn.Module, spec: dict[str, Any], *,
                    pruning: dict[str, Any] | None = None, qat: dict[str, Any] | None = None,
                    preprocess: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Save weights with the spec (and pruning / QAT state) that rebuild the model, atomically.

    `preprocess` is the input the model was trained on, normally
    ``data.checkpoint_preprocess()`` of the run's `compresskit.data.DataBundle` (scale, mean,
    std, layout, channels, size, class_names): a later run on other data refuses (or converts)
    the checkpoint instead of scoring chance."""
    from compresskit.artifacts import atomic_path

    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": spec,
        "pruning": pruning,
        "qat": qat,
        "preprocess": _plain(preprocess) if preprocess is not None else None,
        "meta": meta or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _plain(value: Any) -> Any:
    """JSON-like plain values (weights_only loads only those): tuples become lists, numbers floats/ints."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------ reading files

def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file with weights_only=True. Plain state dicts are wrapped as
    `{"state_dict": ..., "spec": None}` (also `{"model": ...}` / `{"state_dict": ...}` layouts).

    Raises FileNotFoundError for a missing file and ValueError (one line, ``path: what is
    wrong``) for anything else that is not a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises anything (KeyError, IndexError, ...) on junk
        raise ValueError(f"{path}: {_why_unreadable(path, err)}") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if not isinstance(obj.get("state_dict"), dict):
            raise ValueError(f"{path}: a compresskit checkpoint without weights (no state_dict)")
        return obj
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return {"state_dict": obj[key], "spec": None}
        if obj and _is_state_dict(obj):
            return {"state_dict": obj, "spec": None}
        keys = ", ".join(map(str, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
        raise ValueError(f"{path}: holds a dict without weights (keys: {keys or 'none'}); expected a state "
                         f"dict or a dict with one under {' / '.join(STATE_DICT_KEYS[:3])}")
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict or a compresskit checkpoint")


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _why_unreadable(path: Path, err: BaseException) -> str:
    """What is wrong with a file torch.load refused, in words (from its first bytes and the error)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as os_err:
        return f"cannot read: {os_err.strerror or os_err}"
    message = str(err)
    first = (message.strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:120]
    if not head:
        return "empty file, not a checkpoint"
    pickled = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")
    if pickled and isinstance(err, pickle.UnpicklingError) and "weights only" in message.lower():
        found = re.search(r"GLOBAL ([\w.]+)", message)
        what = f" (e.g. {found[1]})" if found else ""
        return (f"holds Python objects{what} that torch.load(weights_only=True) refuses to unpickle; "
                "save model.state_dict() (tensors only) instead")
    if head.startswith(b"PK\x03\x04"):
        return f"damaged or truncated checkpoint (a torch.save zip file that does not read back: {first})"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file, not a PyTorch checkpoint"
    if len(head) > 10 and head[8:10] == b'{"':
        return "looks like a safetensors file; load it with safetensors.torch.load_file and torch.save the dict"
    if pickled:
        return f"a damaged pickle, not a checkpoint ({type(err).__name__}: {first})"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        start = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"a text file, not a checkpoint (it starts with {start!r})"
    return "not a PyTorch checkpoint (unrecognised content; expected a file written by torch.save)"


# ------------------------------------------------------------------ state dicts and models

WRAPPER_PREFIX = "module."  # DataParallel / DistributedDataParallel
COMPILE_SEGMENT = "_orig_mod"  # torch.compile's OptimizedModule (also on submodules)


def strip_wrapper_prefixes(state_dict: Mapping[str, Any], expected: Iterable[str] | None = None) -> dict[str, Any]:
    """The keys of a state dict saved through DataParallel / DDP (``module.`` before every key) or
    from a torch.compile'd model (``_orig_mod.``, also inside a key for compiled submodules), as
    the bare model names them. `expected` (the model's own keys) keeps prefixes the model really
    has (a model whose top-level child is called ``module``)."""
    expected = list(expected) if expected is not None else []
    out = dict(state_dict)
    if not any(COMPILE_SEGMENT in k.split(".") for k in expected):
        out = {".".join(p for p in k.split(".") if p != COMPILE_SEGMENT): v for k, v in out.items()}
    own = set(expected)
    while out and all(k.startswith(WRAPPER_PREFIX) for k in out):
        stripped = {k[len(WRAPPER_PREFIX):]: v for k, v in out.items()}
        now, then = len(own.intersection(out)), len(own.intersection(stripped))
        if own and not (then > now or (now == 0 and not all(k.startswith(WRAPPER_PREFIX) for k in own))):
            break
        out = stripped
    return out


def _names(keys: Sequence[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)})" if len(keys) > limit else "")


def _shape(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return "x".join(map(str, shape)) if shape is not None and len(shape) else "scalar"


def fit_problems(model: nn.Module, state_dict: Mapping[str, Any]) -> str | None:
    """Why `state_dict` does not load strictly into `model` (missing, unexpected and
    differently shaped keys, briefly), or None when it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {_shape(state_dict[k])} in the file, {_shape(v)} in the model" for k, v in own.items()
              if k in state_dict and getattr(v, "shape", None) != getattr(state_dict[k], "shape", None)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({_names(shapes, 2)})")
    return "; ".join(parts) or None


def model_from_checkpoint(ckpt: dict[str, Any], spec: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the model a checkpoint describes (pruned and QAT ones too) and load its weights
    strictly (after stripping DataParallel / torch.compile prefixes); a ValueError lists the keys
    that do not fit."""
    spec = ckpt.get("spec") or spec
    if spec is None:
        raise ValueError("checkpoint has no architecture spec and none was given")
    model = build_model(spec)
    if ckpt.get("pruning"):
        from compresskit.prune import rebuild_pruned

        model = rebuild_pruned(model, ckpt["pruning"])
    if ckpt.get("qat"):
        from compresskit.quantize.qat import rebuild_qat

        model = rebuild_qat(model, ckpt["qat"])
    state_dict = strip_wrapper_prefixes(ckpt["state_dict"], model.state_dict().keys())
    problems = fit_problems(model, state_dict)
    if problems:
        raise ValueError(f"checkpoint does not fit the architecture {spec.get('arch')!r}: {problems}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        lines = [s.strip() for s in str(err).splitlines() if s.strip()]
        raise ValueError(f"checkpoint does not fit the architecture {spec.get('arch')!r}: "
                         + "; ".join(lines[1:3] or lines[:1])) from None
    return model


def load_model(path: Path, spec: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Read a checkpoint file and rebuild its model: ``(model, checkpoint dict)``. `spec` is
    needed only for plain state dicts, which carry none."""
    ckpt = read_checkpoint(path)
    try:
        return model_from_checkpoint(ckpt, spec), ckpt
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ------------------------------------------------------------------ preprocessing

def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if (isinstance(a, (int, float)) and isinstance(b, (int, float))
            and not isinstance(a, bool) and not isinstance(b, bool)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def preprocess_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Field -> (recorded, wanted) for each preprocessing field both give and that differs."""
    return {key: (recorded[key], wanted[key]) for key in PREPROCESS_KEYS
            if key in recorded and key in wanted and not _same(recorded[key], wanted[key])}


def _fmt(key: str, value: Any) -> str:
    if key == "scale" and isinstance(value, (int, float)):
        return f"1/{1 / value:.6g}" if value else "0"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    if key == "class_names" and isinstance(value, (list, tuple)) and len(value) > 6:
        return "[" + ", ".join(map(repr, value[:5])) + f", ... ({len(value)})]"
    return str(value)


def describe_preprocess_differences(diffs: Mapping[str, tuple[Any, Any]]) -> str:
    """``mean [0.5] in the checkpoint vs [0.286] in the data, ...``, on one line."""
    parts = []
    for key, (recorded, wanted) in diffs.items():
        if key == "class_names" and len(recorded) == len(wanted):
            i = next(i for i, (a, b) in enumerate(zip(recorded, wanted, strict=True)) if a != b)
            parts.append(f"class {i} is {recorded[i]!r} in the checkpoint vs {wanted[i]!r} in the data")
        else:
            parts.append(f"{key} {_fmt(key, recorded)} in the checkpoint vs {_fmt(key, wanted)} in the data")
    return "; ".join(parts)


def _input_affine(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """(a, b) per channel with x_recorded = a * x_wanted + b: raw pixels p give
    x_wanted = (p * s_w - m_w) / d_w and x_recorded = (p * s_r - m_r) / d_r, so
    a = d_w * r / d_r and b = (m_w * r - m_r) / d_r with r = s_r / s_w."""
    r = float(recorded.get("scale", 1 / 255)) / float(wanted.get("scale", 1 / 255))
    a = [dw * r / dr for dw, dr in zip(wanted["std"], recorded["std"], strict=True)]
    b = [(mw * r - mr) / dr for mw, dr, mr in zip(wanted["mean"], recorded["std"], recorded["mean"], strict=True)]
    return a, b


def load_for_data(path: Path, spec: dict[str, Any] | None, preprocess: Mapping[str, Any],
                  policy: str = "refuse", *, option: str = "teacher.preprocess_mismatch",
                  ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Load a checkpoint to use on data with `preprocess` (``DataBundle.checkpoint_preprocess()``,
    or `compresskit.data.config_preprocess` before the data is loaded): ``(model, checkpoint,
    notes)``, `notes` being JSON-able words for the stage's metrics.

    Checked, each failure a one-line ValueError starting with the path: the file reads with
    weights_only; its classes and channels are the data's; its weights fit the architecture
    (`spec`, needed for plain state dicts); its recorded preprocessing is the data's. When that
    differs, `policy` says what happens: ``refuse``; ``convert`` folds a different normalisation
    (scale, mean, std) into the model's first convolution (other differences are still refused);
    ``ignore`` uses it as it is. A plain state dict records no preprocessing: accepted, with a note.
    """
    if policy not in PREPROCESS_POLICIES:
        raise ValueError(f"{option} must be one of {', '.join(PREPROCESS_POLICIES)}, got {policy!r}")
    ckpt = read_checkpoint(path)
    channels, classes = preprocess.get("channels"), preprocess.get("class_names")
    own = ckpt.get("spec")
    if own is not None and classes is not None and channels is not None:
        if (own.get("num_classes"), own.get("in_channels")) != (len(classes), channels):
            raise ValueError(f"{path}: the checkpoint is for {own.get('num_classes')} classes and "
                             f"{own.get('in_channels')} input channel(s); the data has {len(classes)} and {channels}")
    recorded = ckpt.get("preprocess")
    notes: dict[str, Any] = {}
    diffs = preprocess_differences(recorded, preprocess) if isinstance(recorded, Mapping) else {}
    if not isinstance(recorded, Mapping):
        notes["preprocess"] = ("not recorded (a plain state dict or an older checkpoint): assumed to be "
                               "the data's; check the normalisation it was trained with")
    elif not diffs:
        notes["preprocess"] = "recorded, the same as the data's"
    else:
        words = describe_preprocess_differences(diffs)
        others = [k for k in diffs if k not in NORMALISATION_KEYS]
        if policy == "refuse" or (policy == "convert" and others):
            if others:
                how = (f"only {', '.join(NORMALISATION_KEYS)} can be converted; set {option}: ignore to use it "
                       "as it is")
            else:
                how = (f"set {option}: convert to fold the normalisation into the first convolution, or ignore "
                       "to use it as it is")
            raise ValueError(f"{path}: trained on other preprocessing than the data's: {words} ({how})")
        notes["preprocess"] = f"differs from the data's, {'ignored' if policy == 'ignore' else 'converted'}: {words}"
    try:
        model = model_from_checkpoint(ckpt, spec)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if diffs and policy == "convert":
        from compresskit.nets import fold_input_affine

        try:
            a, b = _input_affine(recorded, preprocess)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise ValueError(f"{path}: cannot convert its preprocessing ({words}): the recorded and the data's "
                             "mean / std do not describe the same channels") from None
        size = list(preprocess.get("size") or [32, 32])
        example = torch.zeros(1, len(a), *size)
        try:
            where, exact = fold_input_affine(model, a, b, example)
        except ValueError as err:
            raise ValueError(f"{path}: cannot convert its preprocessing: {err}") from None
        notes["preprocess_converted"] = {
            "into": where, "scale_per_channel": a, "shift_per_channel": b,
            "exact": "yes" if exact else "away from the image border (the convolution zero-pads)"}
    return model, ckpt, notes
